//! The userspace (hyper) path: a complete OpenAI-compatible gateway on its own.
//!
//! Per request: route → header-size and content-type checks → body read with a
//! size limit and a timeout (the body is buffered up to `limits.max_body_bytes`,
//! parsed once for metadata by [`meta`], and forwarded byte-exact) → admission
//! ([`limits`]) → backend choice by the controller → upstream attempt with retries
//! on other backends while nothing has reached the client (connect errors, resets,
//! first-byte timeout, 502/503/504) → the response streamed back frame by frame
//! ([`stream`]). Every error is an OpenAI-style JSON body ([`error`]).

pub mod error;
pub mod limits;
pub mod meta;
pub mod stream;

use std::{
    convert::Infallible,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header, request::Parts,
};
use http_body::Body as _;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use tokio::{net::TcpListener, sync::watch};

pub use error::ApiError;

use crate::{
    admin::metrics::Metrics,
    config::{Config, Limits, RetryConfig},
    controller::{Controller, NoBackend},
    model::{Backend, H_BACKEND, H_REQUEST_ID, RequestMeta},
};

/// Boxed error of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body type of every response agentlb produces.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Headers that describe one hop and are never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The OpenAI routes agentlb proxies.
const PROXIED: [&str; 3] = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"];

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
            },
            circuit_failures: c.health.circuit_failures,
            circuit_open: c.health.circuit_open,
        }
    }
}

/// Shared proxy state.
pub struct Proxy {
    controller: Arc<Controller>,
    client: Client<HttpConnector, Full<Bytes>>,
    metrics: Arc<Metrics>,
    /// Hot settings.
    pub settings: ArcSwap<Settings>,
    /// Admission.
    pub limiter: Arc<limits::Limiter>,
    budget: limits::RetryBudget,
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

/// `/ready`: 200 while at least one backend is routable, else 503.
pub fn ready(controller: &Controller) -> Response<ProxyBody> {
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
    json(
        st,
        &serde_json::json!({"ready": n > 0, "routable_backends": n}),
    )
}

/// A JSON response.
pub fn json(status: StatusCode, v: &serde_json::Value) -> Response<ProxyBody> {
    respond(status, "application/json", v.to_string())
}

fn json_response(
    status: StatusCode,
    v: &serde_json::Value,
    rid: &HeaderValue,
) -> Response<ProxyBody> {
    let mut r = json(status, v);
    r.headers_mut().insert(H_REQUEST_ID, rid.clone());
    r
}

/// What went wrong with one upstream attempt.
enum Attempt {
    Status(Response<Incoming>),
    Error(hyper_util::client::legacy::Error),
    Timeout,
}

impl Proxy {
    /// Creates the proxy with a pooled upstream client.
    pub fn new(
        controller: Arc<Controller>,
        metrics: Arc<Metrics>,
        limiter: Arc<limits::Limiter>,
        config: &Config,
    ) -> Self {
        let limits = &config.limits;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(limits.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(limits.pool_max_idle_per_backend)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .build(connector);
        Self {
            controller,
            client,
            metrics,
            settings: ArcSwap::from_pointee(Settings::from_config(config)),
            limiter,
            budget: limits::RetryBudget::default(),
        }
    }

    /// Handles one request. Never fails: errors become JSON responses.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: HeaderValue,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let started = Instant::now();
        let rid = request_id(req.headers());
        let path = req.uri().path().to_owned();
        let route = route_label(&path);
        // Every log line of this request carries its request id and workflow id.
        // Debug level: free when not logging at debug; warnings below name the
        // request id themselves.
        let span = tracing::debug_span!("request", request_id = rid.to_str().unwrap_or(""));
        let resp = match tracing::Instrument::instrument(
            self.clone().dispatch(req, peer, started, &rid),
            span.clone(),
        )
        .await
        {
            Ok(r) => r,
            Err(e) => {
                self.metrics.answered(route, "none", e.status.as_u16());
                let _g = span.enter();
                if e.status.is_server_error() {
                    tracing::warn!(request_id = rid.to_str().unwrap_or(""), status = e.status.as_u16(), error = %e.message, "request failed");
                } else {
                    tracing::debug!(status = e.status.as_u16(), error = %e.message, "request rejected");
                }
                e.into_response(Some(&rid))
            }
        };
        Ok(resp)
    }

    async fn dispatch(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: HeaderValue,
        started: Instant,
        rid: &HeaderValue,
    ) -> Result<Response<ProxyBody>, ApiError> {
        let settings = self.settings.load_full();
        let path = req.uri().path();
        let method = req.method().clone();
        let proxied = PROXIED.contains(&path);
        match (path, &method) {
            ("/health", &Method::GET) => {
                return Ok(json_response(
                    StatusCode::OK,
                    &serde_json::json!({"status": "ok"}),
                    rid,
                ));
            }
            ("/ready", &Method::GET) => {
                let mut r = ready(&self.controller);
                r.headers_mut().insert(H_REQUEST_ID, rid.clone());
                return Ok(r);
            }
            ("/v1/models", &Method::GET) => {
                let data: Vec<_> = self
                    .controller
                    .models()
                    .into_iter()
                    .map(|m| serde_json::json!({"id": m, "object": "model", "created": 0, "owned_by": "agentlb"}))
                    .collect();
                return Ok(json_response(
                    StatusCode::OK,
                    &serde_json::json!({"object": "list", "data": data}),
                    rid,
                ));
            }
            (_, &Method::POST) if proxied => {}
            ("/health" | "/ready" | "/v1/models", _) => {
                return Err(ApiError::method_not_allowed(format!(
                    "{method} {path}: use GET"
                )));
            }
            _ if proxied => {
                return Err(ApiError::method_not_allowed(format!(
                    "{method} {path}: use POST"
                )));
            }
            _ => return Err(ApiError::not_found(format!("no route for {method} {path}"))),
        }

        let limits = &settings.limits;
        check_headers(&req, limits.max_header_bytes)?;
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !is_json {
            return Err(ApiError::invalid_request(
                "Content-Type must be application/json",
                "invalid_content_type",
            ));
        }
        let (parts, body) = req.into_parts();
        let body = read_body(body, limits.max_body_bytes, limits.body_read_timeout).await?;
        let meta = meta::extract(
            &parts.headers,
            Some(&body),
            rid.to_str().unwrap_or("").to_owned(),
            &settings.meta,
        )?;
        let wf_span = tracing::debug_span!(
            "workflow",
            workflow_id = meta.workflow_id.as_deref().unwrap_or(""),
            agent_id = meta.agent_id.as_deref().unwrap_or(""),
        );
        if let Some(m) = meta.model.as_deref()
            && !self.controller.backends().iter().any(|b| b.serves(Some(m)))
        {
            return Err(ApiError::model_not_found(m));
        }

        let permit = self.limiter.acquire(limits.queue_timeout).await?;
        self.budget.request();
        let route = route_label(parts.uri.path());
        let (resp, backend, inflight) = tracing::Instrument::instrument(
            self.forward(&parts, body, &meta, &settings, &peer, rid, started),
            wf_span,
        )
        .await?;
        self.metrics.response_head(started.elapsed().as_secs_f64());

        let (mut head, upstream_body) = resp.into_parts();
        strip_hop_by_hop(&mut head.headers);
        head.headers.insert(H_REQUEST_ID, rid.clone());
        if let Ok(v) = HeaderValue::from_str(&backend.name) {
            head.headers.insert(H_BACKEND, v);
        }
        let status = head.status.as_u16();
        self.metrics.answered(route, &backend.name, status);
        let sse = head
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));

        let wf = meta.workflow_id.clone();
        if let Some(w) = &wf {
            if self.controller.workflows.start(
                w,
                meta.agent_id.as_deref(),
                meta.parent_request_id.as_deref(),
                &meta.request_id,
                &backend.name,
            ) {
                self.metrics.lineage_edge();
            }
            self.metrics.workflow_request(w, meta.agent_id.as_deref());
        }
        let metrics = self.metrics.clone();
        let metrics2 = self.metrics.clone();
        let this = self.clone();
        let backend_name = backend.name.clone();
        let rid_log = rid.clone();
        let on_end: stream::OnEnd = Box::new(move |outcome, usage, _ttfb| {
            metrics.finished(route, started.elapsed().as_secs_f64(), outcome);
            if let Some(w) = &wf {
                this.controller.workflows.finish(w, usage);
            }
            match outcome {
                stream::Outcome::Complete => {}
                stream::Outcome::ClientGone => {
                    tracing::debug!(request_id = ?rid_log, backend = %backend_name, "client left before the response ended");
                }
                _ => {
                    tracing::info!(request_id = ?rid_log, backend = %backend_name, ?outcome, "response ended early")
                }
            }
            this.limiter.released.notify_waiters();
        });
        let body = stream::Streamed::new(
            upstream_body,
            sse,
            started,
            tokio::time::Instant::from_std(started + limits.total_timeout),
            Box::new(move |t| metrics2.first_byte(route, t)),
            on_end,
            Arc::new((permit, inflight)),
        );
        Ok(Response::from_parts(head, body.boxed()))
    }

    /// Sends the request upstream, retrying on other backends while nothing has
    /// reached the client.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        parts: &Parts,
        body: Bytes,
        meta: &RequestMeta,
        settings: &Settings,
        peer: &HeaderValue,
        rid: &HeaderValue,
        started: Instant,
    ) -> Result<(Response<Incoming>, Arc<Backend>, Inflight), ApiError> {
        let limits = &settings.limits;
        let retry = &settings.retry;
        let mut tried: Vec<u32> = Vec::new();
        let mut last: Option<ApiError> = None;
        // The last upstream 5xx answer (with its backend and in-flight guard): passed
        // through to the client when no other backend can be tried.
        let mut last_status: Option<(Response<Incoming>, Arc<Backend>, Inflight)> = None;
        loop {
            let backend = match self.pick(meta, &tried, limits).await {
                Ok(b) => b,
                Err(e) => {
                    // Nothing left to try: answer with the last failure.
                    if let Some(t) = last_status.take() {
                        return Ok(t);
                    }
                    return Err(last.unwrap_or(e));
                }
            };
            if !backend.admit() {
                tried.push(backend.id);
                continue;
            }
            let inflight = Inflight::new(backend.clone());
            let req = build_upstream(parts, body.clone(), &backend, peer, rid)?;
            if tried.is_empty() {
                self.metrics.overhead(started.elapsed().as_secs_f64());
            }
            tracing::debug!(backend = %backend.name, attempt = tried.len(), "forwarding");
            let attempt = match tokio::time::timeout(
                limits.first_byte_timeout,
                self.client.request(req),
            )
            .await
            {
                Ok(Ok(resp)) if matches!(resp.status().as_u16(), 502..=504) => {
                    Attempt::Status(resp)
                }
                Ok(Ok(resp)) => {
                    backend.record_success();
                    if !tried.is_empty() {
                        if let Some(w) = &meta.workflow_id {
                            self.controller.workflows.moved(w);
                        }
                        tracing::info!(request_id = rid.to_str().unwrap_or(""), workflow_id = meta.workflow_id.as_deref().unwrap_or(""), backend = %backend.name, failed_attempts = tried.len(), "request moved to another backend");
                    }
                    return Ok((resp, backend, inflight));
                }
                Ok(Err(e)) => Attempt::Error(e),
                Err(_) => Attempt::Timeout,
            };
            tried.push(backend.id);
            let (kind, err) = match attempt {
                Attempt::Status(r) => {
                    let st = r.status();
                    last_status = Some((r, backend.clone(), inflight));
                    (
                        "status",
                        ApiError::bad_gateway(format!("backend {} answered {st}", backend.name)),
                    )
                }
                Attempt::Error(e) => {
                    drop(inflight);
                    last_status = None;
                    let msg = crate::error_chain(&e);
                    let kind = if e.is_connect() { "connect" } else { "io" };
                    (
                        kind,
                        ApiError::bad_gateway(format!("backend {} failed: {msg}", backend.name)),
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
            // A refused/failed connect is a strong signal: open the circuit at once.
            let threshold = if kind == "connect" {
                1
            } else {
                settings.circuit_failures
            };
            backend.record_failure(threshold, settings.circuit_open);
            self.metrics.upstream_error(&backend.name, kind);
            tracing::warn!(request_id = rid.to_str().unwrap_or(""), workflow_id = meta.workflow_id.as_deref().unwrap_or(""), backend = %backend.name, kind, error = %err.message, "upstream attempt failed");
            last = Some(err);
            let n = tried.len() as u32;
            if n > retry.max_retries || !self.budget.try_retry(retry.budget_ratio, retry.budget_min)
            {
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
    ) -> Result<Arc<Backend>, ApiError> {
        let deadline = Instant::now() + limits.queue_timeout;
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
fn route_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "chat",
        "/v1/completions" => "completions",
        "/v1/embeddings" => "embeddings",
        "/v1/models" => "models",
        "/health" | "/ready" => "health",
        _ => "other",
    }
}

/// Rejects request heads larger than `max` with 431.
fn check_headers(req: &Request<Incoming>, max: usize) -> Result<(), ApiError> {
    let mut size = req.uri().path_and_query().map_or(1, |p| p.as_str().len()) + 16;
    for (k, v) in req.headers() {
        size += k.as_str().len() + v.len() + 4;
    }
    if size > max {
        return Err(ApiError::headers_too_large(max));
    }
    Ok(())
}

/// Reads the whole body, failing with 413 past `max` bytes and 408 past `timeout`.
async fn read_body(body: Incoming, max: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    if body.size_hint().lower() > max as u64 {
        return Err(ApiError::too_large(max));
    }
    let read = async {
        let mut body = body;
        let mut buf = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::invalid_request(
                    format!("error reading the request body: {e}"),
                    "body_read_error",
                )
            })?;
            if let Some(d) = frame.data_ref() {
                if buf.len() + d.len() > max {
                    return Err(ApiError::too_large(max));
                }
                buf.extend_from_slice(d);
            }
        }
        Ok(buf.freeze())
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::request_timeout(format!(
            "the request body was not received within {} ms",
            timeout.as_millis()
        ))),
    }
}

/// The client's request id, or a new one.
fn request_id(h: &HeaderMap) -> HeaderValue {
    h.get(H_REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.to_str().is_ok())
        .cloned()
        .unwrap_or_else(|| {
            let id = format!("agentlb-{:032x}", rand::random::<u128>());
            HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("agentlb"))
        })
}

fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .filter(|s| !s.is_empty())
        .collect();
    for n in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        h.remove(n);
    }
}

/// The upstream request for `backend`: same method, path, headers (minus
/// hop-by-hop) and the original body bytes.
const X_FORWARDED_FOR: header::HeaderName = header::HeaderName::from_static("x-forwarded-for");

fn build_upstream(
    parts: &Parts,
    body: Bytes,
    backend: &Backend,
    peer: &HeaderValue,
    rid: &HeaderValue,
) -> Result<Request<Full<Bytes>>, ApiError> {
    // Authority and Host come precomputed with the backend; the path is shared.
    let mut up = http::uri::Parts::default();
    up.scheme = Some(http::uri::Scheme::HTTP);
    up.authority = Some(backend.authority.clone());
    up.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    let uri = Uri::from_parts(up)
        .map_err(|e| ApiError::bad_gateway(format!("cannot build upstream URI: {e}")))?;
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    headers.insert(header::HOST, backend.host_header.clone());
    headers.insert(H_REQUEST_ID, rid.clone());
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    let xff = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => {
            HeaderValue::from_str(&format!("{prev}, {}", peer.to_str().unwrap_or(""))).ok()
        }
        None => Some(peer.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
    }
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    Ok(req)
}

/// Counts a request as in flight on its backend until dropped.
pub struct Inflight(Arc<Backend>);

impl Inflight {
    fn new(b: Arc<Backend>) -> Self {
        b.inflight.fetch_add(1, Ordering::Relaxed);
        Self(b)
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves the proxy on `listener` until `stop` turns true, then drains in-flight
/// connections for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    grace: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let settings = proxy.settings.load_full();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(settings.limits.header_read_timeout)
        // hyper's own hard cap on the head; our JSON 431 applies below it.
        .max_buf_size((settings.limits.max_header_bytes * 4).max(64 * 1024));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let proxy = proxy.clone();
                // The client address for X-Forwarded-For, formatted once per connection.
                let peer_ip = HeaderValue::from_str(&peer.ip().to_string())
                    .unwrap_or(HeaderValue::from_static("unknown"));
                let svc = hyper::service::service_fn(move |req| {
                    proxy.clone().handle(req, peer_ip.clone())
                });
                let conn = builder.serve_connection(TokioIo::new(stream), svc);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, %peer, "client connection ended with error");
                    }
                });
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("proxy drained"),
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(?grace, "shutdown grace elapsed; closing remaining connections");
        }
    }
}
