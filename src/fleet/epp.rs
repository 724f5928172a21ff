//! The endpoint picker (EPP) of the Gateway API Inference Extension: a gRPC server speaking
//! Envoy's `ext_proc` protocol (`envoy.service.ext_proc.v3.ExternalProcessor/Process`), so
//! that Envoy (or an Envoy-based gateway) asks llm-warden which node serves each request and
//! routes it there itself. The decision is the built-in front's (`fleet::front`): the same
//! pool, the same node views, the same [`super::picker`], the same fleet single-flight.
//!
//! One `Process` stream is one HTTP request (facts and sources: `docs/epp-notes.md`):
//! 1. **Request headers.** Without a body (a `GET`), the node is picked at once (the least
//!    busy node up). Otherwise the EPP waits for the body.
//! 2. **Request body.** With `FULL_DUPLEX_STREAMED` (the shipped Envoy config) the chunks
//!    are held only until the model is found ([`super::scan`]); then the EPP answers the
//!    headers (the pick), and sends the held chunks back as `StreamedBodyResponse`s, and
//!    every later chunk as it comes (in this mode Envoy forwards what the EPP sends back, not
//!    its own copy). In `BUFFERED` mode the body comes whole; its answer carries the pick.
//!    No message timeout runs in full-duplex mode, so a pick may wait; this picker does not
//!    wait: a node that must load the model gets the request and queues it (Decision).
//! 3. **The pick** sets the request header `x-gateway-destination-endpoint: <ip:port>` (the
//!    node's provider listener; a host name is resolved) and the same key in the dynamic
//!    metadata namespace `envoy.lb`, and clears the route cache. A subset hint from the data
//!    plane (`envoy.lb.subset_hint` / `x-gateway-destination-endpoint-subset`, a list of
//!    `ip:port`) restricts the candidates. Nothing can serve: an `ImmediateResponse` 503 with
//!    a body in the client's error shape (by the request's path, as the front answers).
//! 4. **Response headers**: passed unchanged. The request is counted for its node at the pick
//!    (routed by reason, in flight until the stream ends): with the shipped `ORIGINAL_DST`
//!    cluster Envoy sends it to exactly the picked endpoint, so the pick is the served
//!    endpoint (plain Envoy sets no `x-gateway-destination-endpoint-served`; nodes add no
//!    header of their own). Their `:status` is read: a node that answers an error for a
//!    model it was picked to load did not take the load, and the single-flight choice is
//!    forgotten.
//!
//! The conversation's affinity key (ties between equal nodes) is read when the whole body is
//! in hand at the pick (the model came after the messages, or the body ended); a body whose
//! model comes first is picked on the model alone rather than held for the key.
//!
//! Decision (issue 22 §2, lazy loads under Envoy's timeouts): answer at once with the node
//! that will load the model (its own queue holds the request), instead of holding the answer
//! until the load is done. Holding would need a raised `message_timeout` in `BUFFERED` mode
//! and would tie the EPP's stream to a load the node already tracks; answering at once keeps
//! one owner of the wait (the node's lifecycle) and makes the pick independent of load time.
//!
//! Health (`grpc.health.v1`): `""`, `liveness` and the ext_proc service are serving while
//! the server runs; `readiness` is serving while at least one node of the pool is up.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::ext_proc::v3 as ep;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use futures_util::Stream;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use super::front::PoolState;
use super::picker::{affinity_key, BodyShape, Pick, Reason};
use super::scan::{scan, Scan};
use crate::providers::ErrorStyle;
use crate::proxy::ProxyError;

/// The request header (and `envoy.lb` metadata key) naming the picked endpoint.
pub const DESTINATION: &str = "x-gateway-destination-endpoint";
/// The metadata namespace of the pick.
pub const LB_NAMESPACE: &str = "envoy.lb";
/// The data plane's subset hint: namespace and key.
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
pub const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";
/// The ext_proc service's name, as health checks ask for it.
pub const SERVICE: &str = "envoy.service.ext_proc.v3.ExternalProcessor";

/// The picker behind the gRPC service: one pool of the front's state (its nodes, their
/// views, its single-flight), shared with that pool's own listener.
pub struct Epp {
    pub pools: Arc<[PoolState]>,
    pub index: usize,
    /// The largest body held while the model is looked for (`proxy.max_request_body`).
    pub max_body: usize,
}

impl Epp {
    fn pool(&self) -> &PoolState {
        &self.pools[self.index]
    }
}

type ProcessStream = Pin<Box<dyn Stream<Item = Result<ep::ProcessingResponse, Status>> + Send>>;

/// The gRPC service: a handle on the picker.
pub struct Service(pub Arc<Epp>);

#[tonic::async_trait]
impl ExternalProcessor for Service {
    type ProcessStream = ProcessStream;

    async fn process(
        &self,
        request: Request<Streaming<ep::ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let inbound = request.into_inner();
        let (tx, mut rx) = mpsc::channel::<Result<ep::ProcessingResponse, Status>>(16);
        let epp = self.0.clone();
        tokio::spawn(async move { epp.serve_stream(inbound, tx).await });
        let out = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        Ok(Response::new(Box::pin(out)))
    }
}

/// One request's state on its stream.
#[derive(Default)]
struct Exchange {
    /// The request's path (`:path`), for the error shape.
    path: String,
    /// The subset hint, if the data plane gave one.
    subset: Option<Vec<String>>,
    /// Whether the body streams both ways (`FULL_DUPLEX_STREAMED`).
    duplex: bool,
    /// The body held while the model is looked for, and where the scan resumes.
    held: Vec<Vec<u8>>,
    seen: Vec<u8>,
    resume: usize,
    /// The pick is made (the headers were answered).
    picked: bool,
    /// The node's in-flight count, held while the request lasts.
    hold: Option<super::front::InFlight>,
    /// The model, when the pick chose a node to load it (single-flight): a node that then
    /// answers with an error did not take the load, and the choice is forgotten.
    loading: Option<String>,
    /// The conversation's affinity key, when the whole body was in hand at the pick.
    affinity: Option<u64>,
    /// The body's length at which the model is looked for again.
    next_scan: usize,
}

impl Epp {
    async fn serve_stream(
        self: Arc<Self>,
        mut inbound: Streaming<ep::ProcessingRequest>,
        tx: mpsc::Sender<Result<ep::ProcessingResponse, Status>>,
    ) {
        let mut ex = Exchange::default();
        loop {
            let msg = match inbound.message().await {
                Ok(Some(m)) => m,
                Ok(None) | Err(_) => return,
            };
            if ex.subset.is_none() {
                ex.subset = subset_hint(&msg);
            }
            if let Some(pc) = &msg.protocol_config {
                ex.duplex = pc.request_body_mode
                    == envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode::FullDuplexStreamed as i32;
            }
            let replies = match msg.request {
                Some(ep::processing_request::Request::RequestHeaders(h)) => {
                    ex.path = header(&h, ":path").unwrap_or_default();
                    if h.end_of_stream {
                        let pick = self.pick(&mut ex, None).await;
                        vec![self.headers_answer(&mut ex, pick)]
                    } else if ex.duplex {
                        // Answered once the model is known.
                        vec![]
                    } else {
                        // Buffered: the body comes whole next, and its answer carries the pick.
                        vec![ep::ProcessingResponse {
                            response: Some(ep::processing_response::Response::RequestHeaders(
                                ep::HeadersResponse::default(),
                            )),
                            ..Default::default()
                        }]
                    }
                }
                Some(ep::processing_request::Request::RequestBody(b)) => {
                    self.body(&mut ex, b).await
                }
                Some(ep::processing_request::Request::RequestTrailers(_)) => {
                    let mut out = Vec::new();
                    if !ex.picked {
                        // The body ended without a model: pick for none.
                        let pick = self.pick(&mut ex, None).await;
                        out.push(self.headers_answer(&mut ex, pick));
                        out.extend(flush(&mut ex, false));
                    }
                    out.push(ep::ProcessingResponse {
                        response: Some(ep::processing_response::Response::RequestTrailers(
                            ep::TrailersResponse::default(),
                        )),
                        ..Default::default()
                    });
                    out
                }
                Some(ep::processing_request::Request::ResponseHeaders(h)) => {
                    let status = header(&h, ":status").unwrap_or_default();
                    if let Some(model) = ex.loading.take() {
                        if !status.starts_with('2') {
                            self.pool().forget_pending(&model);
                        }
                    }
                    vec![ep::ProcessingResponse {
                        response: Some(ep::processing_response::Response::ResponseHeaders(
                            ep::HeadersResponse::default(),
                        )),
                        ..Default::default()
                    }]
                }
                Some(ep::processing_request::Request::ResponseBody(b)) => {
                    // Not asked for by the shipped config; echoed if a config sends it.
                    vec![streamed_body(b.body, b.end_of_stream, true)]
                }
                Some(ep::processing_request::Request::ResponseTrailers(_)) => {
                    vec![ep::ProcessingResponse {
                        response: Some(ep::processing_response::Response::ResponseTrailers(
                            ep::TrailersResponse::default(),
                        )),
                        ..Default::default()
                    }]
                }
                None => vec![],
            };
            for r in replies {
                if tx.send(Ok(r)).await.is_err() {
                    return;
                }
            }
        }
    }

    /// A body chunk: held until the model is found, then the pick and the held chunks.
    async fn body(&self, ex: &mut Exchange, b: ep::HttpBody) -> Vec<ep::ProcessingResponse> {
        if ex.picked {
            return vec![if ex.duplex {
                streamed_body(b.body, b.end_of_stream, false)
            } else {
                body_continue()
            }];
        }
        let end = b.end_of_stream;
        ex.seen.extend_from_slice(&b.body);
        ex.held.push(b.body);
        let over = ex.seen.len() > self.max_body;
        if !end && !over && ex.seen.len() < ex.next_scan {
            // A scan resumes at the start of the member it stopped in: rescanning a long
            // member (a large `messages`) on every small chunk would cost the square of its
            // length. Scanning again only once the body doubled keeps the total linear.
            return vec![];
        }
        let found = match scan(&ex.seen, ex.resume) {
            Scan::Found(m) => Some(Some(m)),
            Scan::None => Some(None),
            Scan::More(_) if end || ex.seen.len() > self.max_body => Some(None),
            Scan::More(r) => {
                ex.resume = r;
                ex.next_scan = next_scan(ex.seen.len(), r);
                None
            }
        };
        let Some(model) = found else {
            return vec![];
        };
        let kind = self.pool().config.kind;
        let model = model.map(|m| kind.canonical_model(&m).into_owned());
        if end {
            let path = ex.path.split('?').next().unwrap_or_default();
            ex.affinity = BodyShape::of_path(path).and_then(|s| affinity_key(s, &ex.seen));
        }
        let pick = self.pick(ex, model.as_deref()).await;
        let mut out = Vec::new();
        if ex.duplex {
            out.push(self.headers_answer(ex, pick));
            out.extend(flush(ex, end));
        } else {
            out.push(self.body_answer(ex, pick));
        }
        out
    }

    /// Picks the node for `model` (none: the least busy node up), within the subset hint.
    async fn pick(
        &self,
        ex: &mut Exchange,
        model: Option<&str>,
    ) -> Result<(usize, String, &'static str), ProxyError> {
        let p = self.pool();
        let picks: Vec<(usize, &'static str, bool)> = match model {
            Some(m) => p
                .rank(m, ex.affinity)
                .iter()
                .map(|k: &Pick| {
                    let loads = matches!(k.reason, Reason::Load | Reason::Pending);
                    (k.node, k.label(), loads)
                })
                .collect(),
            None => p
                .least_busy()
                .into_iter()
                .map(|i| (i, "other", false))
                .collect(),
        };
        for (i, label, loads) in picks {
            let Some(endpoint) = endpoint_of(&p.nodes[i].config.url.authority).await else {
                continue;
            };
            if ex.subset.as_ref().is_some_and(|s| !s.contains(&endpoint)) {
                continue;
            }
            if loads {
                ex.loading = model.map(str::to_string);
            }
            return Ok((i, endpoint, label));
        }
        Err(ProxyError::NoNode {
            pool: p.config.name.clone(),
            reason: match (model, &ex.subset) {
                (_, Some(_)) => "no node up in the data plane's subset hint".to_string(),
                (Some(m), None) if p.nodes_up() > 0 => {
                    format!(
                        "no node up serves `{m}` through its `{}` listener",
                        p.config.kind.as_str()
                    )
                }
                _ => "no node is up".to_string(),
            },
        })
    }

    /// The answer to the request headers: the pick, or the immediate 503.
    fn headers_answer(
        &self,
        ex: &mut Exchange,
        pick: Result<(usize, String, &'static str), ProxyError>,
    ) -> ep::ProcessingResponse {
        match pick {
            Ok((i, endpoint, label)) => {
                ex.picked = true;
                let node = &self.pool().nodes[i];
                node.routed(label);
                ex.hold = Some(super::front::InFlight::new(node.clone()));
                ep::ProcessingResponse {
                    response: Some(ep::processing_response::Response::RequestHeaders(
                        ep::HeadersResponse {
                            response: Some(routed(&endpoint)),
                        },
                    )),
                    dynamic_metadata: Some(metadata(&endpoint)),
                    ..Default::default()
                }
            }
            Err(e) => {
                ex.picked = true;
                self.pool()
                    .refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                immediate(&e, self.style(&ex.path))
            }
        }
    }

    /// Buffered mode: the answer to the whole body carries the pick.
    fn body_answer(
        &self,
        ex: &mut Exchange,
        pick: Result<(usize, String, &'static str), ProxyError>,
    ) -> ep::ProcessingResponse {
        match self.headers_answer(ex, pick) {
            ep::ProcessingResponse {
                response: Some(ep::processing_response::Response::RequestHeaders(h)),
                dynamic_metadata,
                ..
            } => ep::ProcessingResponse {
                response: Some(ep::processing_response::Response::RequestBody(
                    ep::BodyResponse {
                        response: h.response,
                    },
                )),
                dynamic_metadata,
                ..Default::default()
            },
            other => other,
        }
    }

    fn style(&self, path: &str) -> ErrorStyle {
        let path = path.split('?').next().unwrap_or(path);
        self.pool().config.kind.error_style(path)
    }
}

/// When to scan again after a scan of `len` bytes stopped in the member at `resume`: once
/// what arrived since is as long as the part of that member already scanned (at least
/// 4 KiB more), so each byte is scanned a bounded number of times.
fn next_scan(len: usize, resume: usize) -> usize {
    len + (len - resume.min(len)).max(4096)
}

/// The held chunks, sent back in order (full duplex).
fn flush(ex: &mut Exchange, end: bool) -> Vec<ep::ProcessingResponse> {
    let n = ex.held.len();
    let out = ex
        .held
        .drain(..)
        .enumerate()
        .map(|(k, b)| streamed_body(b, end && k + 1 == n, false))
        .collect();
    ex.seen = Vec::new();
    out
}

/// A body chunk sent back as it came (full duplex).
fn streamed_body(body: Vec<u8>, end_of_stream: bool, response: bool) -> ep::ProcessingResponse {
    let common = ep::CommonResponse {
        body_mutation: Some(ep::BodyMutation {
            mutation: Some(ep::body_mutation::Mutation::StreamedResponse(
                ep::StreamedBodyResponse {
                    body,
                    end_of_stream,
                    ..Default::default()
                },
            )),
        }),
        ..Default::default()
    };
    let body = ep::BodyResponse {
        response: Some(common),
    };
    ep::ProcessingResponse {
        response: Some(if response {
            ep::processing_response::Response::ResponseBody(body)
        } else {
            ep::processing_response::Response::RequestBody(body)
        }),
        ..Default::default()
    }
}

/// A buffered body's chunk after the pick: unchanged.
fn body_continue() -> ep::ProcessingResponse {
    ep::ProcessingResponse {
        response: Some(ep::processing_response::Response::RequestBody(
            ep::BodyResponse::default(),
        )),
        ..Default::default()
    }
}

/// Sets the destination header and clears the route cache.
fn routed(endpoint: &str) -> ep::CommonResponse {
    ep::CommonResponse {
        header_mutation: Some(ep::HeaderMutation {
            set_headers: vec![set_header(DESTINATION, endpoint.as_bytes())],
            ..Default::default()
        }),
        clear_route_cache: true,
        ..Default::default()
    }
}

/// A header for a `HeaderMutation`'s `set_headers`.
fn set_header(key: &str, value: &[u8]) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            raw_value: value.to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `envoy.lb: { x-gateway-destination-endpoint: <endpoint> }`.
fn metadata(endpoint: &str) -> Struct {
    let inner = Struct {
        fields: [(
            DESTINATION.to_string(),
            Value {
                kind: Some(Kind::StringValue(endpoint.to_string())),
            },
        )]
        .into_iter()
        .collect(),
    };
    Struct {
        fields: [(
            LB_NAMESPACE.to_string(),
            Value {
                kind: Some(Kind::StructValue(inner)),
            },
        )]
        .into_iter()
        .collect(),
    }
}

/// The immediate answer when nothing can serve, in the client's shape.
fn immediate(e: &ProxyError, style: ErrorStyle) -> ep::ProcessingResponse {
    let (status, content_type, body) = e.to_parts(style);
    let headers = vec![
        set_header("content-type", content_type.as_bytes()),
        set_header("retry-after", b"1"),
    ];
    ep::ProcessingResponse {
        response: Some(ep::processing_response::Response::ImmediateResponse(
            ep::ImmediateResponse {
                status: Some(envoy_types::pb::envoy::r#type::v3::HttpStatus {
                    code: i32::from(status.as_u16()),
                }),
                headers: Some(ep::HeaderMutation {
                    set_headers: headers,
                    ..Default::default()
                }),
                body: body.to_vec(),
                // Not `ext_proc_error...`: the shipped Envoy config rewrites those.
                details: format!("llm_warden_{}", e.kind()),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

/// A header of the request, by name (`raw_value` or `value`).
fn header(h: &ep::HttpHeaders, name: &str) -> Option<String> {
    h.headers.as_ref()?.headers.iter().find_map(|v| {
        (v.key.eq_ignore_ascii_case(name)).then(|| {
            if v.raw_value.is_empty() {
                v.value.clone()
            } else {
                String::from_utf8_lossy(&v.raw_value).into_owned()
            }
        })
    })
}

/// The data plane's subset hint (`metadata_context.filter_metadata`), if any.
fn subset_hint(msg: &ep::ProcessingRequest) -> Option<Vec<String>> {
    let ns = msg
        .metadata_context
        .as_ref()?
        .filter_metadata
        .get(SUBSET_NAMESPACE)?;
    let list = ns.fields.get(SUBSET_KEY)?;
    match &list.kind {
        Some(Kind::ListValue(l)) => Some(
            l.values
                .iter()
                .filter_map(|v| match &v.kind {
                    Some(Kind::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
        ),
        Some(Kind::StringValue(s)) => Some(s.split(',').map(|x| x.trim().to_string()).collect()),
        _ => None,
    }
}

/// The `ip:port` of a node's provider listener (a host name resolved; Envoy's
/// `ORIGINAL_DST` cluster needs an address).
async fn endpoint_of(authority: &http::uri::Authority) -> Option<String> {
    let port = authority.port_u16().unwrap_or(80);
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Some(SocketAddr::new(ip, port).to_string());
    }
    let mut addrs = tokio::net::lookup_host((host, port)).await.ok()?;
    addrs.next().map(|a| a.to_string())
}

/// Serves the EPP on `listener` until `stop`, with gRPC health; readiness follows the pool's
/// nodes.
pub async fn serve(
    epp: Arc<Epp>,
    listener: tokio::net::TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in ["", "liveness", SERVICE] {
        reporter
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let ready_epp = epp.clone();
    let mut ready_stop = stop.clone();
    tokio::spawn(async move {
        let mut was: Option<bool> = None;
        loop {
            let up = ready_epp.pool().nodes_up() > 0;
            if was != Some(up) {
                let status = if up {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                reporter.set_service_status("readiness", status).await;
                was = Some(up);
            }
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
                _ = ready_stop.wait_for(|s| *s) => return,
            }
        }
    });
    let incoming = tokio_stream_of(listener);
    let served = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(ExternalProcessorServer::new(Service(epp)))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = served {
        tracing::warn!(error = %e, "the endpoint picker stopped");
    }
}

/// The accepted connections of `listener`, as tonic's server takes them.
fn tokio_stream_of(
    listener: tokio::net::TcpListener,
) -> impl Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |l| async move {
        let accepted = l.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        });
        Some((accepted, l))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_member_is_rescanned_only_as_the_body_doubles() {
        // A body of one 8 MiB member before `model`, in 1 KiB chunks: scans counted, and the
        // bytes they cover, as `body` would do them.
        let member = 8usize << 20;
        let (mut len, mut next, mut scans, mut scanned) = (0usize, 0usize, 0u32, 0usize);
        while len < member {
            len += 1024;
            if len < next {
                continue;
            }
            scans += 1;
            scanned += len; // the member starts at offset 1: all of it, again
            next = next_scan(len, 1);
        }
        assert!(scans <= 14, "{scans} scans");
        assert!(
            scanned <= 3 * member,
            "{scanned} bytes scanned for {member}"
        );
        // A short body is scanned at its first chunk, and again within 4 KiB.
        assert_eq!(next_scan(100, 10), 100 + 4096);
    }
}
