//! `tiny-backend NAME ADDR [IDLE_CLOSE_MS]`: a minimal HTTP/1.1 keep-alive
//! backend for the proxy tests. Every request gets `200` with a JSON body naming
//! the backend, the method, the path, the body it received (length and FNV-1a),
//! and the serial number of the connection it came on. With `IDLE_CLOSE_MS`,
//! connections idle that long between requests are closed (like uvicorn's
//! keep-alive timeout), so a proxy's pooled connections go stale.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};

static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "backend".into());
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:9000".into())
        .parse()?;
    let idle_close: Option<u64> = args.next().map(|v| v.parse()).transpose()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!(
        "tiny-backend {name} listening on {}",
        listener.local_addr()?
    );
    loop {
        let (stream, _) = listener.accept().await?;
        let name = name.clone();
        let conn = CONNECTIONS.fetch_add(1, Ordering::Relaxed) + 1;
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let name = name.clone();
                async move {
                    let method = req.method().to_string();
                    let path = req.uri().path().to_owned();
                    let wf = req
                        .headers()
                        .get("x-workflow-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let bytes = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let body = serde_json::json!({
                        "backend": name, "method": method, "path": path,
                        "body_bytes": bytes.len(), "body_fnv": testkit::fnv1a(&bytes),
                        "workflow_id": wf, "connection": conn,
                    });
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(body.to_string())))
                            .unwrap_or_default(),
                    )
                }
            });
            let mut builder = http1::Builder::new();
            if let Some(ms) = idle_close {
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_millis(ms));
            }
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
