//! The admin listener (separate address, optional bearer token on everything but
//! `/health`):
//! - `GET /health`, `GET /ready`, `GET /metrics` (Prometheus);
//! - `GET /admin/dataplane`: programs, maps, pins, kernel counters;
//! - `GET /admin/backends`, `POST /admin/backends` `{"url", "name"?}`,
//!   `POST /admin/backends/{id}/drain`, `DELETE /admin/backends/{id}`;
//! - `GET /admin/workflows?offset=&limit=`, `GET /admin/workflows/{id}` (home, secondary
//!   homes, spills, moves, agents, lineage edges, fan-out, tokens; `~<hex>` names an
//!   implicit workflow), `DELETE /admin/workflows/{id}` (ends it: forgotten, its next
//!   request is placed anew);
//! - `GET /admin/pinning`, `POST /admin/pinning` `{"enabled": bool}`: the kernel
//!   fast path's kill switch (connection pinning: new hand-offs stop, pinned pairs
//!   close at their next quiet moment, then the kernel stops redirecting);
//! - `POST /admin/reload`.
//!
//! The token is sent as `Authorization: Bearer <token>`, the scheme in any case
//! (RFC 9110 §11.1). A connection must send each request head within the header
//! read timeout ([`serve_with`]; `limits.header_read_timeout_ms`), which also
//! closes idle keep-alive connections.

pub mod client;
pub mod glance;
pub mod metrics;

use std::{
    convert::Infallible,
    sync::{Arc, atomic::Ordering},
};

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::{net::TcpListener, sync::watch};

use crate::{
    controller::Controller,
    dataplane::Dataplane,
    model::Backend,
    proxy::{ApiError, ProxyBody, json, respond},
    reload::Reloader,
};

/// State the admin API reads.
pub struct Admin {
    /// Dataplane.
    pub dataplane: Arc<Dataplane>,
    /// Controller.
    pub controller: Arc<Controller>,
    /// Metrics registry.
    pub metrics: Arc<metrics::Metrics>,
    /// Reloads.
    pub reloader: Arc<Reloader>,
    /// Bearer token, if required.
    pub token: Option<String>,
    /// The kernel fast path, when connection pinning is active.
    pub fastpath: Option<Arc<crate::proxy::pinned::FastPath>>,
}

/// `POST /admin/pinning`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SetPinning {
    enabled: bool,
}

fn backend_json(b: &Backend) -> serde_json::Value {
    serde_json::json!({
        "id": b.id,
        "name": b.name,
        "url": b.url.to_string(),
        "role": b.role,
        "addrs": b.addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "healthy": b.healthy.load(Ordering::Relaxed),
        "draining": b.draining.load(Ordering::Relaxed),
        "circuit": b.circuit_state(),
        "routable": b.routable(),
        "inflight": b.inflight(),
        "requests": b.requests.load(Ordering::Relaxed),
        "errors": b.errors.load(Ordering::Relaxed),
        "models": **b.models.load(),
        "load": **b.load(),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBackend {
    url: String,
    #[serde(default)]
    name: Option<String>,
    /// `unified` (default), `prefill` or `decode`.
    #[serde(default)]
    role: Option<String>,
}

/// The request's JSON body (at most `limit` bytes) as a `T`; 400s name the
/// shape `expected`.
async fn json_body<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    limit: usize,
    expected: &str,
) -> Result<T, ApiError> {
    let body = Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map_err(|e| ApiError::invalid_request(format!("cannot read body: {e}"), "invalid_body"))?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid_request(format!("expected {expected}: {e}"), "invalid_json"))
}

fn query_param(q: Option<&str>, key: &str) -> Option<usize> {
    q?.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

impl Admin {
    fn fastpath(&self) -> Result<&Arc<crate::proxy::pinned::FastPath>, ApiError> {
        self.fastpath.as_ref().ok_or_else(|| {
            ApiError::not_found(
                "connection pinning is not active (kernel.pinning is off or the kernel dataplane is not running)",
            )
        })
    }

    fn pinning_json(&self) -> Result<serde_json::Value, ApiError> {
        let fp = self.fastpath()?;
        let (pairs, sockets) = self.dataplane.pair_entries();
        Ok(serde_json::json!({
            "enabled": fp.enabled(),
            "open_pairs": fp.open_pairs(),
            "pair_entries": pairs,
            "socket_entries": sockets,
        }))
    }

    /// Precise KV routing: mode, index and every source (`GET /admin/kv`).
    fn kv_json(&self) -> serde_json::Value {
        let Some(kv) = &self.controller.kv else {
            return serde_json::json!({"mode": crate::kv::Mode::Approximate, "enabled": false});
        };
        let r = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let sources: Vec<_> = kv
            .states()
            .iter()
            .map(|s| {
                serde_json::json!({
                    "backend": s.spec.backend,
                    "dp_rank": s.spec.dp_rank,
                    "endpoint": s.spec.endpoint,
                    "replay": s.spec.replay,
                    "topic": s.spec.topic,
                    "freshness": s.freshness(),
                    "last_event_age_ms": s.last_event_age_ms(),
                    "published_block_size": s.mismatched_block_size(),
                    "blocks": r(&s.blocks),
                    "applied": r(&s.applied),
                    "replayed": r(&s.replayed),
                    "dropped": r(&s.dropped),
                    "gaps": r(&s.gaps),
                    "restarts": r(&s.restarts),
                    "resets": r(&s.resets),
                    "unkeyed": r(&s.unkeyed),
                    "digest": r(&s.digest),
                })
            })
            .collect();
        let st = &kv.index.stats;
        serde_json::json!({
            "enabled": true,
            "mode": kv.mode(),
            "tokenizer": kv.can_key(),
            "learned": kv.learner.as_ref().map(|l| serde_json::json!({
                "prompts": l.len(),
                "learned": r(&l.stats.learned),
                "skipped": r(&l.stats.skipped),
                "failed": r(&l.stats.failed),
            })),
            "block_size": kv.block_size(),
            "index": {
                "blocks": kv.index.len(),
                "bytes": kv.index.bytes(),
                "evictions": kv.index.evictions(),
                "stored": r(&st.stored),
                "removed": r(&st.removed),
                "overflow": r(&st.overflow),
            },
            "tokenize_errors": r(&kv.tokenize_errors),
            "sources": sources,
        })
    }

    /// Routes one admin request.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        Ok(match self.route(req).await {
            Ok(r) => r,
            Err(e) => e.into_response(None),
        })
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Response<ProxyBody>, ApiError> {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().map(str::to_owned);
        let method = req.method().clone();
        if path == "/health" {
            return Ok(json(StatusCode::OK, &serde_json::json!({"status": "ok"})));
        }
        if let Some(token) = &self.token {
            let ok = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| bearer_token(v.as_bytes()))
                .is_some_and(|t| same_secret(t, token.as_bytes()));
            if !ok {
                return Err(ApiError::unauthorized());
            }
        }
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (&method, segs.as_slice()) {
            (&Method::GET, ["ready"]) => Ok(crate::proxy::ready(&self.controller)),
            (&Method::GET, ["metrics"]) => Ok(respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics.encode(),
            )),
            (&Method::GET, ["admin", "dataplane"]) => Ok(json(
                StatusCode::OK,
                &serde_json::to_value(self.dataplane.status()).unwrap_or(serde_json::Value::Null),
            )),
            (&Method::GET, ["admin", "backends"]) => {
                let kv = self.controller.kv.as_ref();
                let list: Vec<_> = self
                    .controller
                    .backends()
                    .iter()
                    .map(|b| {
                        let mut v = backend_json(b);
                        v["kv_events"] =
                            serde_json::json!(kv.and_then(|k| k.backend_freshness(b.id)));
                        v
                    })
                    .collect();
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "policy": self.controller.policy_name(),
                        "kv_mode": kv.map_or(crate::kv::Mode::Approximate, |k| k.mode()),
                        "backends": list,
                    }),
                ))
            }
            (&Method::GET, ["admin", "kv"]) => Ok(json(StatusCode::OK, &self.kv_json())),
            (&Method::GET, ["admin", "pinning"]) => Ok(json(StatusCode::OK, &self.pinning_json()?)),
            (&Method::POST, ["admin", "pinning"]) => {
                let set: SetPinning = json_body(req, 4096, r#"{"enabled": true|false}"#).await?;
                let fp = self.fastpath()?;
                fp.set_enabled(set.enabled).map_err(|e| {
                    ApiError::internal(
                        format!("could not change the kernel steering flag: {e}"),
                        "dataplane_error",
                    )
                })?;
                tracing::warn!(
                    enabled = set.enabled,
                    "connection pinning switched by the admin API"
                );
                Ok(json(StatusCode::OK, &self.pinning_json()?))
            }
            (&Method::POST, ["admin", "kv", "resubscribe"]) => {
                let Some(kv) = &self.controller.kv else {
                    return Err(ApiError::not_found("KV-aware routing is not set up"));
                };
                let pause = query_param(query.as_deref(), "pause_ms").unwrap_or(0);
                let n = kv.resubscribe(std::time::Duration::from_millis(pause as u64));
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({"resubscribed": n, "pause_ms": pause}),
                ))
            }
            (&Method::POST, ["admin", "backends"]) => {
                let add: AddBackend =
                    json_body(req, 64 * 1024, r#"{"url", "name"?, "role"?}"#).await?;
                let cfg = crate::config::parse_backend(
                    &add.url,
                    add.name.as_deref(),
                    add.role.as_deref(),
                )
                .map_err(|e| ApiError::invalid_request(e.to_string(), "invalid_backend"))?;
                let b = self.controller.add(&cfg).await.map_err(|e| {
                    let mut err = ApiError::invalid_request(e.to_string(), "invalid_backend");
                    if matches!(e, crate::controller::ControllerError::Duplicate(_)) {
                        err.status = StatusCode::CONFLICT;
                    }
                    err
                })?;
                if let Err(e) = self
                    .dataplane
                    .publish_backends(&self.controller.published())
                {
                    tracing::warn!(error = %e, "could not publish backends to the kernel");
                }
                Ok(json(StatusCode::CREATED, &backend_json(&b)))
            }
            (&Method::POST, ["admin", "backends", id, "drain"]) => {
                let id = id
                    .parse()
                    .map_err(|_| ApiError::not_found("backend ids are integers"))?;
                let b = self
                    .controller
                    .drain(id)
                    .map_err(|e| ApiError::not_found(e.to_string()))?;
                Ok(json(StatusCode::OK, &backend_json(&b)))
            }
            (&Method::DELETE, ["admin", "backends", id]) => {
                let id = id
                    .parse()
                    .map_err(|_| ApiError::not_found("backend ids are integers"))?;
                let b = self
                    .controller
                    .remove(id)
                    .map_err(|e| ApiError::not_found(e.to_string()))?;
                if let Err(e) = self
                    .dataplane
                    .publish_backends(&self.controller.published())
                {
                    tracing::warn!(error = %e, "could not publish backends to the kernel");
                }
                Ok(json(StatusCode::OK, &backend_json(&b)))
            }
            (&Method::GET, ["admin", "workflows"]) => {
                let offset = query_param(query.as_deref(), "offset").unwrap_or(0);
                let limit = query_param(query.as_deref(), "limit")
                    .unwrap_or(100)
                    .min(1000);
                let (total, page) = self.controller.workflows.page(offset, limit);
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({"total": total, "offset": offset, "limit": limit, "workflows": page}),
                ))
            }
            (&Method::GET, ["admin", "workflows", id]) => {
                let id = percent_decode(id);
                let e = self
                    .controller
                    .workflows
                    .get(&id)
                    .ok_or_else(|| ApiError::not_found(format!("no workflow {id}")))?;
                let mut v = serde_json::to_value(&e).unwrap_or(serde_json::Value::Null);
                let name = |b: Option<u32>| {
                    b.and_then(|b| self.controller.backend(b))
                        .map(|b| b.name.clone())
                };
                v["home_name"] = name(e.home).into();
                v["secondary_names"] = e
                    .secondaries
                    .iter()
                    .map(|&b| name(Some(b)).into())
                    .collect::<Vec<serde_json::Value>>()
                    .into();
                v["last_backend_name"] = name(e.last_backend).into();
                v["away_name"] = name(e.away).into();
                v["edges"] = e
                    .edges
                    .iter()
                    .map(|(p, c)| serde_json::json!({"parent": p, "child": c}))
                    .collect();
                v["agents"] = e
                    .agents
                    .iter()
                    .map(|(a, n)| (a.clone(), serde_json::Value::from(*n)))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
                v["backends"] = e
                    .backends
                    .iter()
                    .map(|&(b, n)| {
                        (
                            name(Some(b)).unwrap_or_else(|| format!("#{b}")),
                            serde_json::Value::from(n),
                        )
                    })
                    .collect::<serde_json::Map<_, _>>()
                    .into();
                Ok(json(StatusCode::OK, &v))
            }
            (&Method::DELETE, ["admin", "workflows", id]) => {
                // Ends the workflow: its entry is forgotten, its next request is placed anew.
                let id = percent_decode(id);
                let key = crate::controller::workflows::lookup_key(&id);
                if self.controller.workflows.remove(key) {
                    self.controller.prewarm.forget(key);
                    self.controller
                        .decisions
                        .send(crate::controller::decisions::Decision { key, backend: None });
                    Ok(json(
                        StatusCode::OK,
                        &serde_json::json!({"id": id, "deleted": true}),
                    ))
                } else {
                    Err(ApiError::not_found(format!("no workflow {id}")))
                }
            }
            (&Method::POST, ["admin", "reload"]) => match self.reloader.reload().await {
                Ok(r) => Ok(json(
                    StatusCode::OK,
                    &serde_json::to_value(r).unwrap_or_default(),
                )),
                Err(e) => Err(ApiError::invalid_request(e, "reload_failed")),
            },
            (_, ["ready" | "metrics"] | ["admin", ..]) => Err(ApiError::not_found(format!(
                "no admin route {method} {path}"
            ))),
            _ => Err(ApiError::not_found(format!(
                "no admin route {method} {path}"
            ))),
        }
    }
}

/// The token of `Authorization: Bearer <token>`: the scheme in any case, then
/// one or more spaces (RFC 9110 §11.1, §11.4).
fn bearer_token(v: &[u8]) -> Option<&[u8]> {
    let sp = v.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = v.split_at(sp);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let start = rest.iter().position(|&b| b != b' ')?;
    Some(&rest[start..])
}

/// Compares a presented token with the configured one in time independent of
/// where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Header read timeout of [`serve`] (the default of [`serve_with`]'s callers that
/// have no configuration at hand).
pub const DEFAULT_HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The admin listener's HTTP/1 settings: each request head (and the first byte
/// of the next one on an idle keep-alive connection) must arrive within
/// `header_read_timeout`, or the connection is closed.
fn http1_builder(header_read_timeout: std::time::Duration) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder
}

/// Serves the admin API until `stop` turns true, with the default header read
/// timeout ([`DEFAULT_HEADER_READ_TIMEOUT`]); [`serve_with`] takes the configured one.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, stop: watch::Receiver<bool>) {
    serve_with(listener, admin, stop, DEFAULT_HEADER_READ_TIMEOUT).await;
}

/// Serves the admin API until `stop` turns true; a connection that does not send
/// a request head within `header_read_timeout` (`limits.header_read_timeout_ms`)
/// is closed.
pub async fn serve_with(
    listener: TcpListener,
    admin: Arc<Admin>,
    mut stop: watch::Receiver<bool>,
    header_read_timeout: std::time::Duration,
) {
    let builder = http1_builder(header_read_timeout);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let admin = admin.clone();
                let svc = hyper::service::service_fn(move |req| admin.clone().handle(req));
                let conn = builder.serve_connection(TokioIo::new(stream), svc);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = stop.changed() => break,
        }
    }
}

/// Decodes `%XX` escapes of a path segment (workflow ids may hold any character).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for v in [
            "Bearer s3cret",
            "bearer s3cret",
            "BEARER s3cret",
            "bEaReR   s3cret",
        ] {
            assert_eq!(bearer_token(v.as_bytes()), Some(&b"s3cret"[..]), "{v}");
        }
        for v in [
            "Bearers3cret",
            "Basic s3cret",
            "Bearer",
            "Bearer ",
            "s3cret",
        ] {
            assert_eq!(bearer_token(v.as_bytes()), None, "{v}");
        }
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cret", b"s3creT"));
        assert!(!same_secret(b"s3cret", b"s3cre"));
    }

    /// A connection served like the admin API's: closed when it sends no
    /// request head within the timeout, idle or half-way through one.
    #[tokio::test]
    async fn silent_and_slow_connections_are_closed_at_the_header_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let timeout = Duration::from_millis(300);
        tokio::spawn(async move {
            let builder = http1_builder(timeout);
            while let Ok((stream, _)) = listener.accept().await {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
                });
                let conn = builder.serve_connection(TokioIo::new(stream), svc);
                tokio::spawn(conn);
            }
        });
        for partial in [&b""[..], b"GET /metrics HTTP/1.1\r\nhost: x\r\n"] {
            let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            c.write_all(partial).await.expect("write");
            let t = Instant::now();
            let mut buf = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut buf))
                .await
                .expect("closed well before 5 s")
                .ok();
            let took = t.elapsed();
            assert!(
                took >= Duration::from_millis(250) && took < Duration::from_secs(2),
                "{took:?}"
            );
        }
    }
}
