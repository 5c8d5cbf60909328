//! The userspace (hyper) path: accepts HTTP/1.1 keep-alive connections, asks the
//! controller for a backend and streams the request and response through without
//! buffering or re-serialising bodies.
//!
//! Today it forwards with the configured policy, strips hop-by-hop headers, adds a
//! request id and `X-Forwarded-For`, pools upstream keep-alive connections and
//! answers upstream failures with OpenAI-style JSON errors. Retries, limits and
//! metadata from bodies build on this.

pub mod error;

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, Uri, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, combinators::BoxBody};
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
    config::Limits,
    controller::Controller,
    model::{Backend, H_BACKEND, H_REQUEST_ID, RequestMeta},
};

/// Body type of every response agentlb produces.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Headers that describe one hop and are never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// Shared proxy state.
pub struct Proxy {
    controller: Arc<Controller>,
    client: Client<HttpConnector, Incoming>,
    metrics: Arc<Metrics>,
}

impl Proxy {
    /// Creates the proxy with a pooled upstream client.
    pub fn new(controller: Arc<Controller>, metrics: Arc<Metrics>, limits: &Limits) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(limits.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(limits.pool_max_idle_per_backend)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Self {
            controller,
            client,
            metrics,
        }
    }

    /// Handles one request. Never fails: errors become JSON responses.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let started = Instant::now();
        let request_id = request_id(req.headers());
        let meta = RequestMeta::from_headers(req.headers());
        let Some(backend) = self.controller.pick(&meta) else {
            self.metrics.observe("none", 503, started);
            return Ok(
                ApiError::unavailable("no backend is available").into_response(Some(&request_id))
            );
        };
        let guard = Inflight::new(backend.clone());
        let upstream = match build_upstream(req, &backend, peer, &request_id) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.observe(&backend.name, 502, started);
                return Ok(e.into_response(Some(&request_id)));
            }
        };
        tracing::debug!(
            request_id = ?request_id,
            workflow_id = meta.workflow_id.as_deref().unwrap_or(""),
            backend = %backend.name,
            "forwarding"
        );
        match self.client.request(upstream).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                parts
                    .headers
                    .entry(H_REQUEST_ID)
                    .or_insert_with(|| request_id.clone());
                if let Ok(v) = HeaderValue::from_str(&backend.name) {
                    parts.headers.insert(H_BACKEND, v);
                }
                self.metrics
                    .observe(&backend.name, parts.status.as_u16(), started);
                let body = Tracked {
                    inner: body,
                    _guard: guard,
                }
                .boxed();
                Ok(Response::from_parts(parts, body))
            }
            Err(e) => {
                backend.errors.fetch_add(1, Ordering::Relaxed);
                self.metrics.upstream_error(&backend.name);
                let msg = crate::error_chain(&e);
                tracing::warn!(backend = %backend.name, error = %msg, "upstream request failed");
                let err = if e.is_connect() && msg.contains("timed out") {
                    ApiError::gateway_timeout(format!("backend {} timed out: {msg}", backend.name))
                } else {
                    ApiError::bad_gateway(format!("backend {} failed: {msg}", backend.name))
                };
                self.metrics
                    .observe(&backend.name, err.status.as_u16(), started);
                Ok(err.into_response(Some(&request_id)))
            }
        }
    }
}

/// The client's request id, or a new one.
fn request_id(h: &HeaderMap) -> HeaderValue {
    h.get(H_REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .cloned()
        .unwrap_or_else(|| {
            let id = format!("agentlb-{:032x}", rand::random::<u128>());
            HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("agentlb"))
        })
}

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
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

/// Rewrites a client request for `backend`.
fn build_upstream(
    req: Request<Incoming>,
    backend: &Backend,
    peer: SocketAddr,
    request_id: &HeaderValue,
) -> Result<Request<Incoming>, ApiError> {
    let (mut parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let authority = backend
        .url
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(pq)
        .build()
        .map_err(|e| ApiError::bad_gateway(format!("cannot build upstream URI: {e}")))?;
    strip_hop_by_hop(&mut parts.headers);
    if let Ok(v) = HeaderValue::from_str(&authority) {
        parts.headers.insert(header::HOST, v);
    }
    parts.headers.insert(H_REQUEST_ID, request_id.clone());
    let xff = match parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => format!("{prev}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        parts.headers.insert("x-forwarded-for", v);
    }
    parts.version = http::Version::HTTP_11;
    Ok(Request::from_parts(parts, body))
}

/// Counts a request as in flight on its backend until dropped.
struct Inflight(Arc<Backend>);

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

/// A response body that keeps the request in flight until it is fully sent (or the
/// client goes away and hyper drops it, which also cancels the upstream request).
struct Tracked {
    inner: Incoming,
    _guard: Inflight,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves the proxy on `listener` until `stop` turns true, then drains in-flight
/// connections for at most `limits.shutdown_grace`.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let proxy = proxy.clone();
                let svc = hyper::service::service_fn(move |req| proxy.clone().handle(req, peer));
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
        _ = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!(grace = ?limits.shutdown_grace, "shutdown grace elapsed; closing remaining connections");
        }
    }
}
