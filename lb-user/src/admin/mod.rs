//! The admin listener: `/health`, `/ready`, `/metrics`, `/admin/dataplane` (what the
//! kernel side is doing: programs, maps, pins, counters) and `/admin/backends`.
//! An optional bearer token protects everything but `/health`.

pub mod client;
pub mod metrics;

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::watch};

use crate::{
    controller::Controller,
    dataplane::Dataplane,
    proxy::{ApiError, ProxyBody},
};

/// State the admin API reads.
pub struct Admin {
    /// Dataplane.
    pub dataplane: Arc<Dataplane>,
    /// Controller.
    pub controller: Arc<Controller>,
    /// Metrics registry.
    pub metrics: Arc<metrics::Metrics>,
    /// Bearer token, if required.
    pub token: Option<String>,
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(v.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

impl Admin {
    /// Routes one admin request.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let path = req.uri().path().to_owned();
        if path == "/health" {
            return Ok(json(StatusCode::OK, &serde_json::json!({"status": "ok"})));
        }
        if let Some(token) = &self.token {
            let ok = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|t| t == token);
            if !ok {
                return Ok(ApiError::unauthorized().into_response(None));
            }
        }
        if req.method() != Method::GET {
            let mut e = ApiError::not_found(format!("{} {path} is not supported", req.method()));
            e.status = StatusCode::METHOD_NOT_ALLOWED;
            e.code = "method_not_allowed";
            return Ok(e.into_response(None));
        }
        let resp = match path.as_str() {
            "/ready" => {
                let n = self.controller.backends().len();
                let st = if n > 0 {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json(st, &serde_json::json!({"ready": n > 0, "backends": n}))
            }
            "/metrics" => {
                let mut r = Response::new(
                    Full::new(Bytes::from(self.metrics.encode()))
                        .map_err(|never| match never {})
                        .boxed(),
                );
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            "/admin/dataplane" => {
                let st = self.dataplane.status();
                json(
                    StatusCode::OK,
                    &serde_json::to_value(st).unwrap_or(serde_json::Value::Null),
                )
            }
            "/admin/backends" => {
                let list: Vec<_> = self
                    .controller
                    .backends()
                    .iter()
                    .map(|b| {
                        serde_json::json!({
                            "id": b.id,
                            "name": b.name,
                            "url": b.url.to_string(),
                            "addrs": b.addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                            "inflight": b.load(),
                            "requests": b.requests.load(std::sync::atomic::Ordering::Relaxed),
                            "errors": b.errors.load(std::sync::atomic::Ordering::Relaxed),
                        })
                    })
                    .collect();
                json(
                    StatusCode::OK,
                    &serde_json::json!({"policy": self.controller.policy_name(), "backends": list}),
                )
            }
            _ => ApiError::not_found(format!("no admin route {path}")).into_response(None),
        };
        Ok(resp)
    }
}

/// Serves the admin API until `stop` turns true.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, mut stop: watch::Receiver<bool>) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(10));
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
