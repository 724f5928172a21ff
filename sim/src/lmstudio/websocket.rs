//! The SDK's WebSocket namespaces (`/llm`, `/embedding`, `/system`, ...): enough of the
//! `lmstudio` SDK protocol for the real Python SDK (`lmstudio` 1.6) to list, load, predict
//! with and unload models, on the same model state as the REST API.
//!
//! Facts taken from the SDKs' public sources (read, not copied):
//! - Handshake: the client probes `GET /lmstudio-greeting` (`{"lmstudio":true}`), then opens
//!   `ws://host/<namespace>` without an `Authorization` header (lmstudio-python
//!   `src/lmstudio/json_api.py` `ClientBase._get_probe_url`, `sync_api.py` `connect`).
//! - Auth: the first text frame is `{"authVersion":1,"clientIdentifier","clientPasskey"}`; the
//!   server answers `{"success":true}`, or `{"success":false,"error":"<message>"}` and closes
//!   (lmstudio-python `_ws_impl.py` `_authenticate`; lmstudio-js
//!   `packages/lms-client/src/createAuthenticatedClientPort.ts`,
//!   `packages/lms-communication-server/src/AuthenticatedWsServer.ts`). An API token
//!   `sk-lm-<identifier 8 alnum>:<passkey 20 alnum>` splits into the two fields
//!   (`json_api.py` `_LMS_API_TOKEN_REGEX`). Without a token the SDK sends a random
//!   `guest:<uuid>` identifier and passkey.
//! - Multiplexing (`json_api.py` `MultiplexingManager`, `ChannelHandler`, `RemoteCallHandler`;
//!   lmstudio-js `packages/lms-communication/src/Transport.ts`): client →
//!   `rpcCall{endpoint,callId,parameter?}`, `channelCreate{endpoint,channelId,creationParameter}`,
//!   `channelSend{channelId,message}`; server → `rpcResult{callId,result?}`,
//!   `rpcError{callId,error}`, `channelSend{channelId,message}`, `channelClose{channelId}`,
//!   `channelError{channelId,error}`, `communicationWarning{warning}`.
//! - Endpoints of a model namespace (lmstudio-js
//!   `packages/lms-external-backend-interfaces/src/baseModelBackendInterface.ts`,
//!   `llmBackendInterface.ts`): rpc `listLoaded`, `getModelInfo`, `unloadModel`,
//!   `getLoadConfig`; channels `loadModel` (`resolved`, `progress`, `success{info}`),
//!   `getOrLoad` (`alreadyLoaded` | `startLoading`, `loadProgress`, `loadSuccess{info}`) and
//!   `predict` (`fragment{fragment}` …, `success{stats,modelInfo,loadModelConfig,
//!   predictionConfig}`; the client may send `cancel`). Field names of instance info, fragment
//!   and stats: lmstudio-python `src/lmstudio/_sdk_models/__init__.py` (`LlmInstanceInfo`,
//!   `LlmPredictionFragment`, `LlmPredictionStats`); config keys (`llm.load.contextLength`,
//!   `llm.prediction.maxPredictedTokens` as `{checked,value}`): `src/lmstudio/_kv_config.py`.
//!
//! Simulator choices: an `api_key` of the `sk-lm-…` form requires its identifier and passkey;
//! any other key is compared with `clientPasskey`. Binary frames (the SDK never sends any) are
//! echoed, so transport tests can check large frames through a proxy. Other namespaces
//! authenticate and answer every call with an error.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::config::{display_name, publisher};
use super::generate::GenGuard;
use super::state::{Instance, LoadOpts};
use super::wire::{json as json_response, UnknownEndpoint};
use super::LmStudioSim;
use crate::common::{count_tokens, full, hash_bytes, reply_pieces, respond, Call, SimBody};

pub(super) fn is_websocket_upgrade(call: &Call) -> bool {
    call.headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Accepts a WebSocket upgrade and runs an SDK session on the upgraded connection.
pub(super) fn websocket(
    sim: Arc<LmStudioSim>,
    call: &Call,
    on_upgrade: hyper::upgrade::OnUpgrade,
) -> Response<SimBody> {
    let Some(key) = call.headers.get(header::SEC_WEBSOCKET_KEY) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &UnknownEndpoint {
                error: "Missing Sec-WebSocket-Key header".to_string(),
            },
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let Ok(accept) = HeaderValue::from_str(&accept) else {
        return respond(StatusCode::INTERNAL_SERVER_ERROR, "", Bytes::new());
    };
    let namespace = call.path.trim_start_matches('/').to_string();
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let io = hyper_util::rt::TokioIo::new(upgraded);
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
        session(sim, namespace, ws).await;
    });
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    resp
}

/// Outgoing JSON messages, from the session and from its channel tasks.
type Outbox = mpsc::UnboundedSender<Value>;

async fn session<S>(sim: Arc<LmStudioSim>, namespace: String, mut ws: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<Value>();
    let mut authenticated = false;
    // Cancel flags of open channels, by channel id.
    let mut channels: HashMap<u64, watch::Sender<bool>> = HashMap::new();
    loop {
        tokio::select! {
            incoming = ws.next() => {
                let Some(Ok(msg)) = incoming else { break };
                let sent = match msg {
                    Message::Text(text) if !authenticated => {
                        match sim.authenticate(&text) {
                            Ok(()) => {
                                authenticated = true;
                                ws.send(Message::text(json!({"success": true}).to_string())).await
                            }
                            Err(error) => {
                                let reply = json!({"success": false, "error": error});
                                let _ = ws.send(Message::text(reply.to_string())).await;
                                let _ = ws.close(None).await;
                                break;
                            }
                        }
                    }
                    Message::Text(text) => {
                        sim.dispatch(&namespace, &text, &tx, &mut channels);
                        Ok(())
                    }
                    Message::Binary(_) => ws.send(msg).await,
                    // Pongs to pings and the close reply are queued by tungstenite; flush them.
                    Message::Ping(_) | Message::Close(_) => ws.flush().await,
                    Message::Pong(_) | Message::Frame(_) => Ok(()),
                };
                if sent.is_err() {
                    break;
                }
            }
            Some(out) = rx.recv() => {
                if ws.send(Message::text(out.to_string())).await.is_err() {
                    break;
                }
            }
        }
    }
    // Dropping the receiver makes the channel tasks' sends fail: their generations stop and
    // count as cancelled, like a REST client that went away.
}

/// A request for a model, from a `modelSpecifier` or an identifier.
enum Spec {
    /// Instance id or model key; `None`: any loaded model.
    Identifier(Option<String>),
    InstanceReference(String),
}

impl LmStudioSim {
    /// Checks the auth packet against `api_key`; the error text is what the client gets.
    fn authenticate(&self, text: &str) -> Result<(), String> {
        let packet: Value =
            serde_json::from_str(text).map_err(|_| "Invalid authentication packet".to_string())?;
        let field = |k: &str| packet.get(k).and_then(Value::as_str);
        let (Some(1), Some(identifier), Some(passkey)) = (
            packet.get("authVersion").and_then(Value::as_u64),
            field("clientIdentifier"),
            field("clientPasskey"),
        ) else {
            return Err("Invalid authentication packet".to_string());
        };
        let Some(key) = &self.cfg.api_key else {
            return Ok(());
        };
        let ok = match key
            .strip_prefix("sk-lm-")
            .and_then(|rest| rest.split_once(':'))
        {
            Some((id, pass)) => identifier == id && passkey == pass,
            None => passkey == key,
        };
        if ok {
            Ok(())
        } else {
            Err("Invalid client identifier or passkey".to_string())
        }
    }

    fn dispatch(
        self: &Arc<Self>,
        namespace: &str,
        text: &str,
        tx: &Outbox,
        channels: &mut HashMap<u64, watch::Sender<bool>>,
    ) {
        let Ok(msg) = serde_json::from_str::<Value>(text) else {
            let _ = tx.send(warning("Received a message that is not JSON"));
            return;
        };
        let kind = msg.get("type").and_then(Value::as_str).unwrap_or("");
        let endpoint = msg.get("endpoint").and_then(Value::as_str).unwrap_or("");
        self.lock()
            .sdk_messages
            .push(format!("{namespace} {kind} {endpoint}"));
        let model_ns = match namespace {
            "llm" => Some(false),
            "embedding" => Some(true),
            _ => None,
        };
        match kind {
            "rpcCall" => {
                let call_id = msg.get("callId").cloned().unwrap_or(Value::Null);
                let param = msg.get("parameter").unwrap_or(&Value::Null);
                let result = match model_ns {
                    Some(embedding) => self.rpc(embedding, endpoint, param),
                    None => Err(format!("Unknown RPC endpoint \"{endpoint}\"")),
                };
                let reply = match result {
                    Ok(Some(result)) => {
                        json!({"type": "rpcResult", "callId": call_id, "result": result})
                    }
                    Ok(None) => json!({"type": "rpcResult", "callId": call_id}),
                    Err(title) => {
                        json!({"type": "rpcError", "callId": call_id, "error": error_of(&title)})
                    }
                };
                let _ = tx.send(reply);
            }
            "channelCreate" => {
                let Some(id) = msg.get("channelId").and_then(Value::as_u64) else {
                    let _ = tx.send(warning("channelCreate without a channelId"));
                    return;
                };
                let param = msg.get("creationParameter").cloned().unwrap_or(Value::Null);
                let (cancel_tx, cancel_rx) = watch::channel(false);
                channels.insert(id, cancel_tx);
                let out = ChannelOut { id, tx: tx.clone() };
                let sim = self.clone();
                match (model_ns, endpoint) {
                    (Some(embedding), "loadModel") => {
                        tokio::spawn(async move { sim.ch_load(embedding, param, out).await });
                    }
                    (Some(embedding), "getOrLoad") => {
                        tokio::spawn(
                            async move { sim.ch_get_or_load(embedding, param, out).await },
                        );
                    }
                    (Some(false), "predict") => {
                        tokio::spawn(async move { sim.ch_predict(param, out, cancel_rx).await });
                    }
                    _ => out.error(&format!("Unknown channel endpoint \"{endpoint}\"")),
                }
            }
            "channelSend" => {
                let id = msg.get("channelId").and_then(Value::as_u64);
                let cancel = msg.pointer("/message/type").and_then(Value::as_str) == Some("cancel");
                if let (Some(id), true) = (id, cancel) {
                    if let Some(flag) = channels.get(&id) {
                        let _ = flag.send(true);
                    }
                }
            }
            "keepAlive" => {
                let _ = tx.send(json!({"type": "keepAliveAck"}));
            }
            _ => {
                let _ = tx.send(warning(&format!("Unknown message type \"{kind}\"")));
            }
        }
    }

    /// The RPC endpoints of `/llm` and `/embedding`; `Ok(None)` is a void result.
    fn rpc(&self, embedding: bool, endpoint: &str, param: &Value) -> Result<Option<Value>, String> {
        match endpoint {
            "listLoaded" => {
                let st = self.lock();
                let list: Vec<Value> = st
                    .instances
                    .iter()
                    .filter_map(|i| self.instance_info(i, embedding))
                    .collect();
                Ok(Some(Value::Array(list)))
            }
            "getModelInfo" | "getLoadConfig" => {
                let spec = spec_of(param.get("specifier").unwrap_or(&Value::Null));
                let found = self.find_instance(&spec, embedding);
                match (endpoint, found) {
                    ("getLoadConfig", Some(i)) => Ok(Some(load_config(i.context_length))),
                    (_, Some(i)) => Ok(self.instance_info(&i, embedding)),
                    (_, None) if param.get("throwIfNotFound") == Some(&Value::Bool(false)) => {
                        Ok(None)
                    }
                    (_, None) => Err(NO_MODEL.to_string()),
                }
            }
            // `EmbeddingRpcEmbedStringParameter` {modelSpecifier, inputString} →
            // `{embedding}` (lmstudio-python `async_api.py` `_embed_text`).
            "embedString" if embedding => {
                let spec = spec_of(param.get("modelSpecifier").unwrap_or(&Value::Null));
                let Some(inst) = self.find_instance(&spec, true) else {
                    return Err(NO_MODEL.to_string());
                };
                self.touch(&inst.id);
                let input = param
                    .get("inputString")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let v = crate::common::embedding(input, self.cfg.embedding_dims);
                Ok(Some(json!({ "embedding": v })))
            }
            "unloadModel" => {
                let id = param
                    .get("identifier")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if self.unload_instance(id) {
                    Ok(None)
                } else {
                    Err(format!("Cannot find a model with the identifier \"{id}\""))
                }
            }
            _ => Err(format!("Unknown RPC endpoint \"{endpoint}\"")),
        }
    }

    /// The `instanceInfo` of a loaded instance of the namespace's kind (`LlmInstanceInfo`,
    /// `EmbeddingModelInstanceInfo`).
    fn instance_info(&self, i: &Instance, embedding: bool) -> Option<Value> {
        let m = self.cfg.models.iter().find(|m| m.name == i.key)?;
        if m.embedding != embedding {
            return None;
        }
        let mut info = self.sdk_model_info(&i.key, embedding)?;
        info["identifier"] = json!(i.id);
        info["instanceReference"] = json!(instance_reference(&i.id));
        info["contextLength"] = json!(i.context_length);
        Some(info)
    }

    /// The `info` of a downloaded model (`LlmInfo`, `EmbeddingModelInfo`).
    fn sdk_model_info(&self, key: &str, embedding: bool) -> Option<Value> {
        let m = self.cfg.models.iter().find(|m| m.name == key)?;
        if m.embedding != embedding {
            return None;
        }
        let file = key.rsplit('/').next().unwrap_or(key);
        let mut info = json!({
            "type": if embedding { "embedding" } else { "llm" },
            "modelKey": m.name,
            "format": "gguf",
            "displayName": display_name(&m.name),
            "path": format!("{}/{file}-GGUF/{file}-{}.gguf", publisher(&m.name), m.quantization),
            "sizeBytes": m.size_bytes,
            "maxContextLength": m.context_length,
            "paramsString": m.parameter_size,
            "architecture": m.arch,
        });
        if !embedding {
            info["vision"] = json!(false);
            info["trainedForToolUse"] = json!(true);
        }
        Some(info)
    }

    /// The loaded instance a specifier names: an instance id, else the first instance of a
    /// model key, else (no identifier) the first loaded instance of the kind.
    fn find_instance(&self, spec: &Spec, embedding: bool) -> Option<Instance> {
        let st = self.lock();
        let of_kind = |i: &&Instance| {
            self.cfg
                .models
                .iter()
                .any(|m| m.name == i.key && m.embedding == embedding)
        };
        let mut kind = st.instances.iter().filter(of_kind);
        match spec {
            Spec::Identifier(None) => kind.next().cloned(),
            Spec::Identifier(Some(id)) => {
                let all: Vec<&Instance> = kind.collect();
                all.iter()
                    .find(|i| &i.id == id)
                    .or_else(|| all.iter().find(|i| &i.key == id))
                    .map(|i| (*i).clone())
            }
            Spec::InstanceReference(r) => kind.find(|i| instance_reference(&i.id) == *r).cloned(),
        }
    }

    /// Removes an instance (the RPC `unloadModel`); counts an unload of a busy instance.
    fn unload_instance(&self, id: &str) -> bool {
        let mut st = self.lock();
        let before = st.instances.len();
        st.instances.retain(|i| i.id != id);
        let removed = st.instances.len() != before;
        if removed && st.busy.get(id).is_some_and(|n| *n > 0) {
            self.unloads_while_busy
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        removed
    }

    /// Channel `loadModel`: a manual load (never auto-evicted), with the SDK's `ttlMs`
    /// (the Python SDK sends one hour by default) and optional custom `identifier`.
    async fn ch_load(self: Arc<Self>, embedding: bool, param: Value, out: ChannelOut) {
        let key = param
            .get("modelKey")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let Some(m) = self.cfg.models.iter().find(|m| m.name == key).cloned() else {
            return out.error(&format!("Cannot find a model with the key \"{key}\""));
        };
        let Some(info) = self.sdk_model_info(&key, embedding) else {
            return out.error(&format!("\"{key}\" is not a model of this namespace"));
        };
        let wanted = param
            .get("identifier")
            .and_then(Value::as_str)
            .map(str::to_string);
        if let Some(id) = &wanted {
            if self.lock().instances.iter().any(|i| &i.id == id) {
                return out.error(&format!(
                    "An instance with identifier \"{id}\" already exists"
                ));
            }
        }
        let ttl = param
            .get("ttlMs")
            .and_then(Value::as_u64)
            .map(std::time::Duration::from_millis);
        let ctx_req = config_field(param.get("loadConfigStack"), "llm.load.contextLength")
            .or_else(|| config_field(param.get("loadConfigStack"), "embedding.load.contextLength"))
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok());
        let ctx = self.context_for(&m, ctx_req);
        out.send(json!({"type": "resolved", "info": info}));
        out.send(json!({"type": "progress", "progress": 0.0}));
        let failure = self.lock().fail_next_load.take();
        if !self.cfg.load_latency.is_zero() {
            tokio::time::sleep(self.cfg.load_latency).await;
        }
        let id = match self.finish_load(&key, ctx, None, LoadOpts::default(), failure) {
            Ok(id) => id,
            Err(msg) => return out.error(&format!("Failed to load model \"{key}\": {msg}")),
        };
        let instance = {
            let mut st = self.lock();
            let taken: Vec<String> = st.instances.iter().map(|i| i.id.clone()).collect();
            st.instances.iter_mut().find(|i| i.id == id).map(|i| {
                if let Some(w) = &wanted {
                    if !taken.contains(w) {
                        i.id = w.clone();
                    }
                }
                i.ttl = ttl;
                i.clone()
            })
        };
        let Some(info) = instance.and_then(|i| self.instance_info(&i, embedding)) else {
            return out.error("The model was unloaded while loading");
        };
        out.send(json!({"type": "progress", "progress": 1.0}));
        out.send(json!({"type": "success", "info": info}));
        out.close();
    }

    /// Channel `getOrLoad`: the loaded instance, else a just-in-time load (TTL `loadTtlMs`,
    /// auto-evict), shared with the REST routes' JIT loads.
    async fn ch_get_or_load(self: Arc<Self>, embedding: bool, param: Value, out: ChannelOut) {
        let ident = param
            .get("identifier")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if let Some(i) = self.find_instance(&Spec::Identifier(Some(ident.clone())), embedding) {
            if let Some(info) = self.instance_info(&i, embedding) {
                self.touch(&i.id);
                out.send(json!({"type": "alreadyLoaded", "info": info}));
                return out.close();
            }
        }
        let Some(info) = self.sdk_model_info(&ident, embedding) else {
            return out.error(&format!("Cannot find a model with the key \"{ident}\""));
        };
        let ttl = param
            .get("loadTtlMs")
            .and_then(Value::as_u64)
            .map(std::time::Duration::from_millis);
        let plan = match self.plan(&ident, ttl, None) {
            Ok(p) => p,
            Err(f) => return out.error(&f.parts().1),
        };
        out.send(json!({"type": "startLoading", "identifier": plan.instance(), "info": info}));
        let r = match self.resolve(&ident, plan).await {
            Ok(r) => r,
            Err(f) => return out.error(&f.parts().1),
        };
        let found = self.find_instance(&Spec::Identifier(Some(r.instance)), embedding);
        let Some(info) = found.and_then(|i| self.instance_info(&i, embedding)) else {
            return out.error("The model was unloaded while loading");
        };
        out.send(json!({"type": "loadProgress", "progress": 1.0}));
        out.send(json!({"type": "loadSuccess", "info": info}));
        out.close();
    }

    /// Channel `predict`: fragments, then `success` with the stats; a model that is not loaded
    /// is an error (the SDK loads through `getOrLoad` first). A `cancel` stops the generation
    /// with `stopReason: "userStopped"` (counted in `cancelled`, as is a client that goes
    /// away). The prompt count is capped at the loaded context (no overflow error here).
    async fn ch_predict(
        self: Arc<Self>,
        param: Value,
        out: ChannelOut,
        mut cancel: watch::Receiver<bool>,
    ) {
        let spec = spec_of(param.get("modelSpecifier").unwrap_or(&Value::Null));
        let Some(inst) = self.find_instance(&spec, false) else {
            return out.error(NO_MODEL);
        };
        let Some(model_info) = self.instance_info(&inst, false) else {
            return out.error(NO_MODEL);
        };
        self.touch(&inst.id);
        let messages = param
            .pointer("/history/messages")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let prompt: u32 = messages
            .iter()
            .map(|m| count_tokens(&message_text(m)) + 4)
            .sum();
        let prompt = prompt.min(inst.context_length);
        let max = config_field(
            param.get("predictionConfigStack"),
            "llm.prediction.maxPredictedTokens",
        )
        .filter(|v| v.get("checked") == Some(&Value::Bool(true)))
        .and_then(|v| v.get("value").and_then(Value::as_i64));
        let (n, limited) = self.reply_len(max);
        let pieces = reply_pieces(hash_bytes(param.to_string().as_bytes()), n);
        let mut guard = GenGuard::start(self.clone(), &inst.id);
        let mut predicted = 0u32;
        let mut stop = if limited {
            "maxPredictedTokensReached"
        } else {
            "eosFound"
        };
        for piece in pieces {
            if !self.cfg.token_delay.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(self.cfg.token_delay) => {}
                    _ = cancel.wait_for(|c| *c) => {}
                }
            }
            if *cancel.borrow() {
                // Counted as cancelled (the guard is not `done`), like a REST client that left.
                stop = "userStopped";
                break;
            }
            let fragment = json!({
                "content": piece,
                "tokensCount": 1,
                "containsDrafted": false,
                "reasoningType": "none",
                "isStructural": false,
            });
            if !out.send(json!({"type": "fragment", "fragment": fragment})) {
                return; // the client went away: the guard counts a cancellation
            }
            predicted += 1;
        }
        guard.done = stop != "userStopped";
        drop(guard);
        self.touch(&inst.id);
        let stats = json!({
            "stopReason": stop,
            "tokensPerSecond": self.tokens_per_second(),
            "numGpuLayers": -1,
            "timeToFirstTokenSec": self.cfg.token_delay.as_secs_f64(),
            "promptTokensCount": prompt,
            "predictedTokensCount": predicted,
            "totalTokensCount": prompt + predicted,
        });
        out.send(json!({
            "type": "success",
            "stats": stats,
            "modelInfo": model_info,
            "loadModelConfig": load_config(inst.context_length),
            "predictionConfig": {"fields": []},
        }));
        out.close();
    }
}

const NO_MODEL: &str = "No loaded model satisfies the query";

/// One channel's side of the outbox.
struct ChannelOut {
    id: u64,
    tx: Outbox,
}

impl ChannelOut {
    /// Sends `channelSend`; false when the client has gone away.
    fn send(&self, message: Value) -> bool {
        self.tx
            .send(json!({"type": "channelSend", "channelId": self.id, "message": message}))
            .is_ok()
    }

    fn close(&self) {
        let _ = self
            .tx
            .send(json!({"type": "channelClose", "channelId": self.id}));
    }

    fn error(&self, title: &str) {
        let _ = self
            .tx
            .send(json!({"type": "channelError", "channelId": self.id, "error": error_of(title)}));
    }
}

/// A serialized error (lmstudio-js `packages/lms-common`, `serializeError`: `title` and more).
fn error_of(title: &str) -> Value {
    json!({"title": title, "rootTitle": title})
}

fn warning(text: &str) -> Value {
    json!({"type": "communicationWarning", "warning": text})
}

/// An opaque per-instance reference, as `instanceReference` (stable for an instance id).
fn instance_reference(id: &str) -> String {
    format!("{:016x}", hash_bytes(id.as_bytes()))
}

/// A `ModelSpecifier`: `{type:"query",query:{identifier?}}` or
/// `{type:"instanceReference",instanceReference}`; a plain string is an identifier.
fn spec_of(v: &Value) -> Spec {
    if let Some(s) = v.as_str() {
        return Spec::Identifier(Some(s.to_string()));
    }
    match v.get("type").and_then(Value::as_str) {
        Some("instanceReference") => Spec::InstanceReference(
            v.get("instanceReference")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        ),
        _ => Spec::Identifier(
            v.pointer("/query/identifier")
                .or_else(|| v.get("identifier"))
                .and_then(Value::as_str)
                .map(str::to_string),
        ),
    }
}

/// A `KvConfig` with the loaded context length.
fn load_config(context_length: u32) -> Value {
    json!({"fields": [{"key": "llm.load.contextLength", "value": context_length}]})
}

/// The value of `key` in a `KvConfigStack` (`{layers:[{layerName,config:{fields}}]}`); the
/// last layer that sets it wins.
fn config_field<'a>(stack: Option<&'a Value>, key: &str) -> Option<&'a Value> {
    stack?
        .get("layers")?
        .as_array()?
        .iter()
        .rev()
        .filter_map(|l| l.pointer("/config/fields").and_then(Value::as_array))
        .flat_map(|fields| fields.iter().rev())
        .filter(|f| f.get("key").and_then(Value::as_str) == Some(key))
        .find_map(|f| f.get("value"))
}

/// The text of a chat history message (`content: [{type:"text",text}, ...]`).
fn message_text(m: &Value) -> String {
    match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}
