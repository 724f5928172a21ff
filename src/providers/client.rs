//! The control plane's HTTP client: polls, loads and unloads, `/api/show`, `/props`, the
//! summarizer's requests. One pooled hyper client shared by every provider (the data plane
//! has its own connections: `crate::transport::pool`).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The one pooled HTTP/1.1 client of the control plane.
pub type UpstreamClient = Client<HttpConnector, Full<Bytes>>;

/// A client that connects within `connect_timeout` and keeps idle connections 90 s.
pub fn build_client(connect_timeout: Duration) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector)
}
