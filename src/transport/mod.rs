//! The data plane's own HTTP/1 transport, apart from what the proxy does with a request:
//!
//! - [`codec`]: what the server and the client share: body framing (length, chunked, until
//!   close), decoding a body out of a buffer, header facts noted while parsing a head, a
//!   head's raw lines;
//! - [`server`]: the HTTP/1.x server provider listeners' clients talk to (HTTP/2: hyper);
//! - [`client`]: the HTTP/1.1 exchange with a provider for a request whose body is in hand;
//! - [`pool`]: the upstream connections, per provider and lane, of two kinds (this crate's
//!   client for bodies in hand, hyper's client connection for streamed uploads and upgrades);
//! - [`websocket`]: the pieces of the WebSocket wire format the proxy reads a spliced socket
//!   with (a frame's head, unmasking, writing a frame, the handshake's accept key);
//! - [`lanes`]: the data plane's threads (one single-threaded runtime per core; a
//!   connection and the upstream connections it uses stay on one), and `lanes::deadline`,
//!   the response timeout without a timer per request.
//!
//! Nothing here knows about models, providers or the proxy's state: it moves HTTP messages.

pub mod client;
pub mod codec;
pub mod lanes;
pub mod pool;
pub mod server;
pub mod websocket;

use bytes::Bytes;
use http_body_util::{Either, Full};

/// A request body on its way upstream: the client's, streamed through, or one in hand.
pub type UpstreamBody = Either<server::RequestBody, Full<Bytes>>;
