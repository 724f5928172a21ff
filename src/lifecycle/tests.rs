//! Actor tests on paused time against a fake provider.
