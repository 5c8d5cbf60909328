//! The userspace path: a complete OpenAI-compatible gateway on its own.
//!
//! Per request ([`conn`]): head parse ([`h1`]) with size and time limits → route
//! → content-type check → body read with a size limit and a timeout (buffered up
//! to `limits.max_body_bytes`, parsed once for metadata by [`meta`], forwarded
//! byte-exact) → admission ([`limits`]) → backend choice by the controller →
//! upstream attempt on a pooled connection ([`upstream`]) with retries on other
//! backends while nothing has reached the client (connect errors, resets,
//! first-byte timeout, 502/503/504) → the response relayed as it arrives, with
//! its bookkeeping in [`stream`]. Every error is an OpenAI-style JSON body
//! ([`error`]).
//!
//! Why an HTTP/1 engine of our own (on `httparse`) instead of hyper's server and
//! pooled client: the proxy must cost no more CPU per request than nginx. With
//! hyper, each request crossed a connection task and a pool channel, built two
//! header maps and re-serialised both heads, and every upstream chunk became one
//! client write. Here one task per client connection drives both sockets: heads
//! are forwarded from their parsed bytes, and everything one upstream read
//! returns leaves in one client write. Owning both sockets is also what the
//! kernel fast path needs to hand a connection pair over after its first
//! request. The admin listener stays on hyper.

pub mod conn;
pub mod error;
pub mod h1;
pub mod limits;
pub mod meta;
mod pd;
pub mod pinned;
pub mod responses;
pub mod stream;
pub mod upstream;

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};

pub use conn::serve;
pub use error::ApiError;

use crate::{
    admin::metrics::Metrics,
    config::{Config, Limits, RetryConfig},
    controller::{Controller, NoBackend},
    model::{Backend, H_REQUEST_ID, RequestMeta},
};

/// Boxed error of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body type of every response agentlb produces.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// The routes agentlb proxies (`POST`): vLLM's OpenAI-compatible API and the rest of
/// its serving API, each routed by model with the same metadata, limits, retries and
/// metrics.
const PROXIED: [&[u8]; 15] = [
    b"/v1/chat/completions",
    b"/v1/completions",
    b"/v1/embeddings",
    b"/v1/responses",
    b"/tokenize",
    b"/detokenize",
    b"/v1/score",
    b"/score",
    b"/v1/rerank",
    b"/rerank",
    b"/v2/rerank",
    b"/pooling",
    b"/classify",
    b"/v1/audio/transcriptions",
    b"/v1/audio/translations",
];

/// Routes whose body is `multipart/form-data` (the model is a form field).
pub(crate) fn multipart_route(path: &[u8]) -> bool {
    matches!(
        path,
        b"/v1/audio/transcriptions" | b"/v1/audio/translations"
    )
}

/// Settings that a reload can change without restarting.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Limits.
    pub limits: Limits,
    /// Retries.
    pub retry: RetryConfig,
    /// Metadata limits.
    pub meta: meta::MetaLimits,
    /// Consecutive failures that open a circuit.
    pub circuit_failures: u32,
    /// Open period.
    pub circuit_open: Duration,
    /// Add `x-agentlb-backend` to proxied responses.
    pub backend_header: bool,
    /// Send Responses API follow-ups to the backend that stored the response.
    pub follow_response_owner: bool,
}

impl Settings {
    /// From a validated config.
    pub fn from_config(c: &Config) -> Self {
        Self {
            limits: c.limits.clone(),
            retry: c.retry.clone(),
            meta: meta::MetaLimits {
                max_id_len: c.workflows.max_id_len,
                session_header: c.workflows.session_header.clone(),
                root_chars: c.routing.root_chars,
                root_min_chars: c.routing.root_min_chars,
                prefix_block: if c.routing.prefix_index_blocks > 0
                    && matches!(
                        c.policy,
                        crate::config::PolicyName::Workflow
                            | crate::config::PolicyName::Prefix
                            | crate::config::PolicyName::Disaggregated
                    ) {
                    c.routing.prefix_block_bytes
                } else {
                    0
                },
                prefix_max_blocks: c.routing.prefix_max_blocks,
            },
            circuit_failures: c.health.circuit_failures,
            circuit_open: c.health.circuit_open,
            backend_header: c.backend_header,
            follow_response_owner: c.routing.follow_response_owner,
        }
    }
}

/// A complete (non-streaming) body.
pub fn full(b: impl Into<Bytes>) -> ProxyBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A response with `content_type` and a complete body.
pub fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ProxyBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// `/ready` body and status, shared by both listeners.
pub fn ready_state(controller: &Controller) -> (StatusCode, serde_json::Value) {
    let n = controller
        .backends()
        .iter()
        .filter(|b| b.routable())
        .count();
    let st = if n > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        st,
        serde_json::json!({"ready": n > 0, "routable_backends": n}),
    )
}

/// `/ready`: 200 while at least one backend is routable, else 503.
pub fn ready(controller: &Controller) -> Response<ProxyBody> {
    let (st, v) = ready_state(controller);
    json(st, &v)
}

/// A JSON response.
pub fn json(status: StatusCode, v: &serde_json::Value) -> Response<ProxyBody> {
    respond(status, "application/json", v.to_string())
}

/// What went wrong with one upstream attempt.
enum Attempt {
    /// A 502/503/504 answer (rare: boxed to keep the enum small).
    Status(Box<(upstream::UpConn, h1::Head)>),
    Error {
        connect: bool,
        message: String,
    },
    Timeout,
}

/// A response head from a backend, with the connection to read its body from.
pub struct Upstream {
    /// The connection (its buffer may hold the first body bytes).
    pub conn: upstream::UpConn,
    /// The response head.
    pub head: h1::Head,
    /// The backend that answered.
    pub backend: Arc<Backend>,
    /// Counts the request in flight on `backend` until dropped.
    pub inflight: Inflight,
    /// Why the request went to `backend`.
    pub reason: crate::controller::Reason,
    /// Prompt tokens `backend` was predicted to have cached.
    pub predicted_cached: u64,
    /// The prefill backend whose KV the decode backend pulled (`disaggregated`).
    pub prefill: Option<Arc<Backend>>,
}

/// Shared proxy state.
pub struct Proxy {
    controller: Arc<Controller>,
    pool: upstream::Pool,
    metrics: Arc<Metrics>,
    /// Hot settings.
    pub settings: ArcSwap<Settings>,
    /// Admission.
    pub limiter: Arc<limits::Limiter>,
    budget: limits::RetryBudget,
    /// Client of the Responses owner lookup.
    probe: crate::controller::health::ProbeClient,
    /// The kernel fast path (connection pinning), when on.
    pub fastpath: Option<Arc<pinned::FastPath>>,
}

/// Bodies up to this size are sent in the same write as the upstream head.
const INLINE_BODY: usize = 16 * 1024;

impl Proxy {
    /// Creates the proxy with an empty upstream pool.
    pub fn new(
        controller: Arc<Controller>,
        metrics: Arc<Metrics>,
        limiter: Arc<limits::Limiter>,
        config: &Config,
        fastpath: Option<pinned::FastPath>,
    ) -> Self {
        Self {
            controller,
            pool: upstream::Pool::new(
                config.limits.pool_max_idle_per_backend,
                config.limits.pool_idle_timeout,
            ),
            metrics,
            settings: ArcSwap::from_pointee(Settings::from_config(config)),
            limiter,
            budget: limits::RetryBudget::default(),
            probe: crate::controller::health::probe_client(),
            fastpath: fastpath.map(Arc::new),
        }
    }

    /// Counts a failed upstream attempt of `kind` against `backend`. A refused or failed
    /// connect is a strong signal: it opens the circuit at once.
    fn attempt_failed(&self, backend: &Backend, kind: &'static str, s: &Settings) {
        let threshold = if kind == "connect" {
            1
        } else {
            s.circuit_failures
        };
        backend.record_failure(threshold, s.circuit_open);
        self.metrics.upstream_error(&backend.name, kind);
    }

    /// Whether a request may try another backend after `attempts` failed ones: within
    /// `max_retries` and the retry budget (which a granted retry consumes).
    fn may_retry(&self, attempts: u32, retry: &RetryConfig) -> bool {
        attempts <= retry.max_retries && self.budget.try_retry(retry.budget_ratio, retry.budget_min)
    }

    /// Drops idle upstream connections of removed backends.
    pub fn prune_pool(&self) {
        let ids: Vec<_> = self.controller.backends().iter().map(|b| b.id).collect();
        self.pool.retain(&ids);
    }

    /// One attempt on `backend`: a pooled connection, or a new one when the
    /// pooled one turns out closed before any response byte.
    async fn attempt(
        &self,
        backend: &Backend,
        head: &[u8],
        body: &[u8],
        connect_timeout: Duration,
        now: Instant,
    ) -> Result<(upstream::UpConn, h1::Head), Attempt> {
        let mut fresh = false;
        loop {
            let mut conn = self
                .pool
                .checkout(backend, fresh, connect_timeout, now)
                .await
                .map_err(|e| Attempt::Error {
                    connect: true,
                    message: e.to_string(),
                })?;
            match upstream::exchange(&mut conn, head, body).await {
                Ok(h) => {
                    self.metrics.user_bytes((head.len() + body.len()) as u64, 0);
                    return Ok((conn, h));
                }
                Err(e) if conn.reused && !fresh && e.before_response() => {
                    tracing::debug!(backend = %backend.name, error = %e, "pooled connection was closed; reconnecting");
                    fresh = true;
                }
                Err(e) => {
                    return Err(Attempt::Error {
                        connect: false,
                        message: e.to_string(),
                    });
                }
            }
        }
    }

    /// Sends the request upstream, retrying on other backends while nothing has
    /// reached the client.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
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
        exclude: &[u32],
    ) -> Result<Upstream, ApiError> {
        let limits = &settings.limits;
        let retry = &settings.retry;
        // Backends not to use (another role under `disaggregated`), then the ones tried.
        let mut tried: Vec<u32> = exclude.to_vec();
        let skip = tried.len();
        let mut last: Option<ApiError> = None;
        // The last upstream 5xx answer: passed through to the client when no
        // other backend can be tried.
        let mut last_status: Option<Upstream> = None;
        loop {
            let picked = match self.pick(meta, &tried, limits).await {
                Ok(b) => b,
                Err(e) => {
                    // Nothing left to try: answer with the last failure.
                    if let Some(t) = last_status.take() {
                        return Ok(t);
                    }
                    return Err(last.unwrap_or(e));
                }
            };
            let backend = picked.backend;
            if !backend.admit() {
                tried.push(backend.id);
                continue;
            }
            let inflight = Inflight::new(backend.clone());
            req.clear();
            build_upstream(req, head, &backend, peer, rid, body.len());
            let inline = body.len() <= INLINE_BODY;
            if inline {
                req.extend_from_slice(body);
            }
            let now = Instant::now();
            if tried.len() == skip {
                self.metrics
                    .overhead(now.saturating_duration_since(started).as_secs_f64());
            }
            tracing::debug!(backend = %backend.name, attempt = tried.len() - skip, "forwarding");
            first_byte.set(tokio::time::Instant::from_std(now) + limits.first_byte_timeout);
            let timed = {
                let sent = self.attempt(
                    &backend,
                    req,
                    if inline { &[] } else { body },
                    limits.connect_timeout,
                    now,
                );
                tokio::pin!(sent);
                tokio::select! {
                    biased;
                    r = &mut sent => Ok(r),
                    () = first_byte.fired() => Err(()),
                }
            };
            let attempt = match timed {
                Ok(Ok((conn, h))) if matches!(h.status, 502..=504) => {
                    Attempt::Status(Box::new((conn, h)))
                }
                Ok(Ok((conn, h))) => {
                    backend.record_success();
                    if tried.len() > skip {
                        tracing::info!(request_id = rid, workflow_id = meta.workflow_id.as_deref().unwrap_or(""), backend = %backend.name, failed_attempts = tried.len() - skip, reason = picked.reason.as_str(), "request moved to another backend");
                    }
                    return Ok(Upstream {
                        conn,
                        head: h,
                        backend,
                        inflight,
                        reason: picked.reason,
                        predicted_cached: picked.predicted_cached,
                        prefill: None,
                    });
                }
                Ok(Err(e)) => e,
                Err(_) => Attempt::Timeout,
            };
            tried.push(backend.id);
            let (kind, err) = match attempt {
                Attempt::Status(answer) => {
                    let (conn, h) = *answer;
                    let st = h.status;
                    last_status = Some(Upstream {
                        conn,
                        head: h,
                        backend: backend.clone(),
                        inflight,
                        reason: picked.reason,
                        predicted_cached: picked.predicted_cached,
                        prefill: None,
                    });
                    (
                        "status",
                        ApiError::bad_gateway(format!("backend {} answered {st}", backend.name)),
                    )
                }
                Attempt::Error { connect, message } => {
                    drop(inflight);
                    last_status = None;
                    (
                        if connect { "connect" } else { "io" },
                        ApiError::bad_gateway(format!(
                            "backend {} failed: {message}",
                            backend.name
                        )),
                    )
                }
                Attempt::Timeout => {
                    drop(inflight);
                    last_status = None;
                    (
                        "timeout",
                        ApiError::gateway_timeout(format!(
                            "backend {} sent no response within {} ms",
                            backend.name,
                            limits.first_byte_timeout.as_millis()
                        )),
                    )
                }
            };
            self.attempt_failed(&backend, kind, settings);
            tracing::warn!(request_id = rid, workflow_id = meta.workflow_id.as_deref().unwrap_or(""), backend = %backend.name, kind, error = %err.message, "upstream attempt failed");
            last = Some(err);
            let n = (tried.len() - skip) as u32;
            if !self.may_retry(n, retry) {
                if let Some(t) = last_status.take() {
                    return Ok(t);
                }
                return Err(last.unwrap_or_else(|| ApiError::bad_gateway("upstream failed")));
            }
            if started.elapsed() + retry.backoff_base >= limits.total_timeout {
                return Err(last.unwrap_or_else(|| ApiError::gateway_timeout("total timeout")));
            }
            self.metrics.retry(kind);
            let backoff = retry
                .backoff_base
                .saturating_mul(1 << (n - 1).min(10))
                .min(retry.backoff_max);
            let jitter = rand::random::<f64>() * 0.2 + 0.9;
            tokio::time::sleep(backoff.mul_f64(jitter)).await;
        }
    }

    /// Picks a backend, waiting in the bounded queue while all are at their limit.
    async fn pick(
        &self,
        meta: &RequestMeta,
        tried: &[u32],
        limits: &Limits,
    ) -> Result<crate::controller::Picked, ApiError> {
        let mut deadline = None;
        let mut place = None;
        loop {
            let notified = self.limiter.released.notified();
            match self
                .controller
                .pick(meta, tried, limits.max_concurrent_per_backend as u64)
            {
                Ok(b) => return Ok(b),
                Err(NoBackend::Busy) => {
                    if place.is_none() {
                        place = Some(self.limiter.enter_queue()?);
                    }
                    let deadline =
                        *deadline.get_or_insert_with(|| Instant::now() + limits.queue_timeout);
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                        return Err(ApiError::overloaded(
                            "every backend is at its concurrency limit",
                        ));
                    }
                }
                Err(NoBackend::UnknownModel) => {
                    return Err(ApiError::model_not_found(
                        meta.model.as_deref().unwrap_or(""),
                    ));
                }
                Err(NoBackend::Empty) => {
                    return Err(ApiError::unavailable("no backend is configured"));
                }
                Err(NoBackend::Unavailable) => {
                    return Err(ApiError::unavailable("no healthy backend is available"));
                }
            }
        }
    }
}

/// Route label for metrics (bounded set).
fn route_label(path: &[u8]) -> &'static str {
    match path {
        b"/v1/chat/completions" => "chat",
        b"/v1/completions" => "completions",
        b"/v1/embeddings" => "embeddings",
        b"/v1/responses" => "responses",
        p if p.starts_with(b"/v1/responses/") => "responses",
        b"/v1/models" => "models",
        b"/health" | b"/ready" => "health",
        b"/tokenize" | b"/detokenize" => "tokenize",
        b"/v1/score" | b"/score" => "score",
        b"/v1/rerank" | b"/rerank" | b"/v2/rerank" => "rerank",
        b"/pooling" | b"/classify" => "pooling",
        b"/v1/audio/transcriptions" | b"/v1/audio/translations" => "audio",
        _ => "other",
    }
}

/// Writes the upstream request head for `backend`: same method and target,
/// the client's fields minus hop-by-hop ones, then `Host`, `X-Request-Id`,
/// `X-Forwarded-For` (appended to) and `Content-Length` of the original body.
fn build_upstream(
    out: &mut Vec<u8>,
    head: &h1::Head,
    backend: &Backend,
    peer: &str,
    rid: &str,
    body_len: usize,
) {
    out.extend_from_slice(head.method());
    out.push(b' ');
    out.extend_from_slice(head.path_and_query());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    h1::put_header(out, b"host", backend.host_header.as_bytes());
    let mut xff: Vec<&[u8]> = Vec::new();
    for (kind, name, value, line) in head.fields() {
        match kind {
            h1::Known::ForwardedFor => xff.push(value),
            h1::Known::Host
            | h1::Known::ContentLength
            | h1::Known::RequestId
            | h1::Known::Expect => {}
            _ if head.is_hop_by_hop(kind, name) => {}
            _ => {
                out.extend_from_slice(line);
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    h1::put_header(out, H_REQUEST_ID.as_bytes(), rid.as_bytes());
    out.extend_from_slice(b"x-forwarded-for: ");
    for v in xff {
        out.extend_from_slice(v);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(peer.as_bytes());
    out.extend_from_slice(b"\r\ncontent-length: ");
    h1::put_dec(out, body_len as u64);
    out.extend_from_slice(b"\r\n\r\n");
}

/// Counts a request as in flight on its backend until dropped.
pub struct Inflight(Arc<Backend>);

impl Inflight {
    /// Counts one more request on `b`.
    pub fn new(b: Arc<Backend>) -> Self {
        b.inflight.fetch_add(1, Ordering::Relaxed);
        Self(b)
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}
