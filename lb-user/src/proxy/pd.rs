//! Prefill/decode disaggregation: the `disaggregated` policy's two legs, as vLLM's P/D
//! proxies drive instances that share KV through a connector (NIXL and the like).
//!
//! A chat or completion request first goes to a `prefill` backend — chosen by the `kv`
//! scorer among the prefill backends: the longest cached prefix weighed against the
//! queue — as a one-token, non-streaming request carrying
//! `kv_transfer_params: {do_remote_decode: true, ...}`. That backend computes the
//! prompt's KV, keeps it for the decode side to pull and answers with the parameters
//! to pull it (`remote_engine_id`, `remote_block_ids`, `remote_host`, `remote_port`).
//! The client's own request then goes, with those parameters, to a `decode` backend
//! (the same scorer among the decode backends), whose answer — streamed or not — is the
//! client's. Only the decode answer reaches the client; the prefill leg's token is
//! dropped.
//!
//! Failures never lose the request:
//! - no routable prefill backend, a prefill leg that fails (connect error, 5xx,
//!   timeout) on every prefill backend tried, or an answer without
//!   `kv_transfer_params` (a backend without a KV connector): the whole request goes to
//!   a `unified` backend — or, when there is none, to a decode backend, which then
//!   prefills itself;
//! - a decode leg that fails on every decode backend tried before any byte reached the
//!   client: the original request goes to a unified backend when there is one (the
//!   prefilled KV is then wasted, the answer is not).
//!
//! A request that carries its own `kv_transfer_params` (a client driving P/D itself) is
//! forwarded untouched. Each path is counted in `agentlb_pd_requests_total{kind}`, and
//! `x-agentlb-route` names the prefill backend (`prefill=`).

use std::{sync::Arc, time::Instant};

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::{
    Attempt, Inflight, Proxy, Settings, Upstream, build_upstream, conn, error::ApiError, h1,
    upstream,
};
use crate::model::{Backend, RequestMeta, Role};

/// Largest prefill-leg answer read (a one-token completion is well under a kilobyte).
const MAX_PREFILL_ANSWER: usize = 1 << 20;

/// Why a request did not take the prefill → decode path.
#[derive(Debug)]
enum Skip {
    /// The client sent `kv_transfer_params` itself.
    ClientParams,
    /// No routable prefill backend.
    NoPrefill,
    /// Every prefill attempt failed.
    Failed(String),
}

/// The first leg's result: the decode leg's body and the prefill backend.
struct Prefilled {
    body: Bytes,
    backend: Arc<Backend>,
}

/// The prefill leg's body: the client's request for one token, not streamed, asking the
/// backend to keep the KV for a remote decode.
fn prefill_body(m: &Map<String, Value>) -> Map<String, Value> {
    let mut p = m.clone();
    p.insert("stream".into(), Value::Bool(false));
    p.remove("stream_options");
    p.insert("max_tokens".into(), json!(1));
    if p.contains_key("max_completion_tokens") {
        p.insert("max_completion_tokens".into(), json!(1));
    }
    p.insert(
        "kv_transfer_params".into(),
        json!({
            "do_remote_decode": true,
            "do_remote_prefill": false,
            "remote_engine_id": null,
            "remote_block_ids": null,
            "remote_host": null,
            "remote_port": null,
        }),
    );
    p
}

/// The parameters a decode backend needs, from the prefill answer.
fn transfer_params(answer: &[u8]) -> Result<Value, String> {
    let v: Value =
        serde_json::from_slice(answer).map_err(|e| format!("prefill answer is not JSON: {e}"))?;
    match v.get("kv_transfer_params") {
        Some(p @ Value::Object(_)) => Ok(p.clone()),
        _ => Err("prefill answer has no kv_transfer_params (is the backend running with a KV connector?)".into()),
    }
}

/// What every upstream send of one client request shares: the arguments of
/// [`Proxy::forward`] but the body and the backends to exclude.
struct Request<'a> {
    head: &'a h1::Head,
    meta: &'a RequestMeta,
    settings: &'a Settings,
    peer: &'a str,
    rid: &'a str,
    started: Instant,
    first_byte: &'a mut conn::Deadline,
    req: &'a mut Vec<u8>,
}

/// Whether one of `backends` is a routable unified backend.
fn unified_routable(backends: &[Arc<Backend>]) -> bool {
    backends
        .iter()
        .any(|b| b.role == Role::Unified && b.routable())
}

impl Proxy {
    /// Ids of the configured backends whose role is not `role`.
    fn ids_without(&self, role: Role) -> Vec<u32> {
        self.controller
            .backends()
            .iter()
            .filter(|b| b.role != role)
            .map(|b| b.id)
            .collect()
    }

    /// Where a request goes when the two legs cannot serve it: the unified backends, or,
    /// when none is routable, every backend but the prefill ones.
    fn fallback_exclude(&self) -> Vec<u32> {
        let backends = self.controller.backends();
        if unified_routable(&backends) {
            self.ids_without(Role::Unified)
        } else {
            backends
                .iter()
                .filter(|b| b.role == Role::Prefill)
                .map(|b| b.id)
                .collect()
        }
    }

    /// [`Proxy::forward`] of `body` for `r`, never to the backends in `exclude`.
    async fn send(
        &self,
        r: &mut Request<'_>,
        body: &Bytes,
        exclude: &[u32],
    ) -> Result<Upstream, ApiError> {
        self.forward(
            r.head,
            body,
            r.meta,
            r.settings,
            r.peer,
            r.rid,
            r.started,
            r.first_byte,
            r.req,
            exclude,
        )
        .await
    }

    /// Sends the request upstream as the policy says: under `disaggregated`, a chat or
    /// completion request takes the prefill leg, then the decode leg (see the module
    /// docs); anything else is forwarded to one backend.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn route(
        &self,
        head: &h1::Head,
        body: &Bytes,
        meta: &RequestMeta,
        settings: &Settings,
        peer: &str,
        rid: &str,
        started: Instant,
        first_byte: &mut conn::Deadline,
        req: &mut Vec<u8>,
        route: &'static str,
    ) -> Result<Upstream, ApiError> {
        let mut r = Request {
            head,
            meta,
            settings,
            peer,
            rid,
            started,
            first_byte,
            req,
        };
        let split = self.controller.disaggregated()
            && matches!(route, "chat" | "completions")
            && meta.pinned.is_none();
        if !split {
            return self.send(&mut r, body, &[]).await;
        }
        let prefilled = match self.prefill_leg(&mut r, body).await {
            Ok(p) => p,
            Err(Skip::ClientParams) => {
                self.metrics.pd("client_params");
                return self.send(&mut r, body, &[]).await;
            }
            Err(skip) => {
                let kind = match &skip {
                    Skip::NoPrefill => "no_prefill",
                    _ => "prefill_failed",
                };
                if let Skip::Failed(why) = &skip {
                    tracing::warn!(request_id = rid, error = %why, "prefill leg failed: serving the request whole");
                }
                self.metrics.pd(kind);
                let exclude = self.fallback_exclude();
                return self.send(&mut r, body, &exclude).await;
            }
        };
        let decode = self
            .send(&mut r, &prefilled.body, &self.ids_without(Role::Decode))
            .await;
        let failed = match &decode {
            Ok(up) => matches!(up.head.status, 502..=504),
            Err(_) => true,
        };
        if failed && unified_routable(&self.controller.backends()) {
            let why = match &decode {
                Ok(up) => format!(
                    "decode backend {} answered {}",
                    up.backend.name, up.head.status
                ),
                Err(e) => e.message.clone(),
            };
            drop(decode);
            tracing::warn!(request_id = rid, prefill = %prefilled.backend.name, error = %why, "decode leg failed: serving the request whole");
            self.metrics.pd("decode_failed");
            return self
                .send(&mut r, body, &self.ids_without(Role::Unified))
                .await;
        }
        self.metrics.pd("disaggregated");
        decode.map(|mut up| {
            up.prefill = Some(prefilled.backend);
            up
        })
    }

    /// The prefill leg on the best prefill backend, retried on others while attempts and
    /// the retry budget last.
    async fn prefill_leg(&self, r: &mut Request<'_>, body: &Bytes) -> Result<Prefilled, Skip> {
        let Request {
            head,
            meta,
            settings,
            peer,
            rid,
            ..
        } = *r;
        let req = &mut *r.req;
        let Ok(Value::Object(mut original)) = serde_json::from_slice::<Value>(body) else {
            // The decode side answers the client's error (meta already parsed it).
            return Err(Skip::Failed("the body is not a JSON object".into()));
        };
        if original
            .get("kv_transfer_params")
            .is_some_and(|v| !v.is_null())
        {
            return Err(Skip::ClientParams);
        }
        let pbody = serde_json::to_vec(&Value::Object(prefill_body(&original)))
            .map_err(|e| Skip::Failed(e.to_string()))?;
        let limits = &settings.limits;
        let mut tried = self.ids_without(Role::Prefill);
        let skip = tried.len();
        let mut last = String::new();
        loop {
            // Waits in the bounded queue while every prefill backend is at its limit.
            let picked = match self.pick(meta, &tried, limits).await {
                Ok(p) => p,
                Err(_) if tried.len() == skip => return Err(Skip::NoPrefill),
                Err(_) => return Err(Skip::Failed(last)),
            };
            let backend = picked.backend;
            tried.push(backend.id);
            if !backend.admit() {
                continue;
            }
            let inflight = Inflight::new(backend.clone());
            req.clear();
            build_upstream(req, head, &backend, peer, rid, pbody.len());
            let now = Instant::now();
            let leg = async {
                let (mut conn, h) = self
                    .attempt(&backend, req, &pbody, limits.connect_timeout, now)
                    .await
                    .map_err(|e| match e {
                        Attempt::Error {
                            connect: true,
                            message,
                        } => ("connect", message),
                        Attempt::Error { message, .. } => ("io", message),
                        Attempt::Status(_) => ("status", String::new()),
                        Attempt::Timeout => ("timeout", String::new()),
                    })?;
                let framing = h1::response_framing(&h).map_err(|m| ("io", m.to_owned()))?;
                let (answer, reusable) =
                    upstream::read_whole_body(&mut conn, framing, MAX_PREFILL_ANSWER)
                        .await
                        .map_err(|m| ("io", m))?;
                if h.status != 200 {
                    let text =
                        String::from_utf8_lossy(&answer[..answer.len().min(300)]).into_owned();
                    return Err(("status", format!("answered {}: {text}", h.status)));
                }
                if reusable && h.keep_alive() {
                    self.pool.checkin(backend.id, conn, Instant::now());
                }
                transfer_params(&answer).map_err(|m| ("params", m))
            };
            let result = match tokio::time::timeout(limits.first_byte_timeout, leg).await {
                Ok(r) => r,
                Err(_) => Err((
                    "timeout",
                    format!(
                        "no answer within {} ms",
                        limits.first_byte_timeout.as_millis()
                    ),
                )),
            };
            drop(inflight);
            match result {
                Ok(params) => {
                    backend.record_success();
                    original.insert("kv_transfer_params".into(), params);
                    let body = serde_json::to_vec(&Value::Object(original))
                        .map_err(|e| Skip::Failed(e.to_string()))?;
                    return Ok(Prefilled {
                        body: body.into(),
                        backend,
                    });
                }
                Err((kind, message)) => {
                    // A backend without a KV connector is not failing: do not trip it.
                    if kind != "params" {
                        self.attempt_failed(&backend, kind, settings);
                    }
                    last = format!("prefill backend {}: {message}", backend.name);
                    tracing::warn!(request_id = rid, backend = %backend.name, kind, error = %message, "prefill leg attempt failed");
                    if !self.may_retry((tried.len() - skip) as u32, &settings.retry) {
                        return Err(Skip::Failed(last));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_body_asks_for_one_token_and_a_remote_decode() {
        let m: Map<String, Value> = serde_json::from_str(
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,
                "stream_options":{"include_usage":true},"max_completion_tokens":300,"temperature":0}"#,
        )
        .expect("json");
        let p = prefill_body(&m);
        assert_eq!(p["stream"], json!(false));
        assert!(!p.contains_key("stream_options"));
        assert_eq!(p["max_tokens"], json!(1));
        assert_eq!(p["max_completion_tokens"], json!(1));
        assert_eq!(p["temperature"], json!(0));
        assert_eq!(p["messages"], m["messages"]);
        assert_eq!(p["kv_transfer_params"]["do_remote_decode"], json!(true));
        assert_eq!(p["kv_transfer_params"]["do_remote_prefill"], json!(false));
        // A completion without max_completion_tokens does not get one.
        let c: Map<String, Value> =
            serde_json::from_str(r#"{"prompt":"x","max_tokens":50}"#).expect("json");
        assert!(!prefill_body(&c).contains_key("max_completion_tokens"));
    }

    #[test]
    fn transfer_params_come_from_the_answer_or_fail_clearly() {
        let ok = br#"{"id":"x","choices":[],"kv_transfer_params":{"do_remote_prefill":true,"remote_engine_id":"e","remote_block_ids":[1,2],"remote_host":"10.0.0.1","remote_port":8000}}"#;
        let p = transfer_params(ok).expect("params");
        assert_eq!(p["remote_block_ids"], json!([1, 2]));
        let none = br#"{"id":"x","choices":[],"kv_transfer_params":null}"#;
        assert!(
            transfer_params(none)
                .expect_err("no params")
                .contains("KV connector")
        );
        assert!(
            transfer_params(b"not json")
                .expect_err("not json")
                .contains("not JSON")
        );
    }
}
