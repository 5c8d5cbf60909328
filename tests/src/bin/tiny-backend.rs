//! `tiny-backend NAME ADDR`: a minimal HTTP/1.1 keep-alive backend for the
//! foundation tests. Every request gets `200` with a JSON body naming the backend,
//! the method, the path and the number of body bytes it received.

use std::{convert::Infallible, net::SocketAddr};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "backend".into());
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:9000".into())
        .parse()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!(
        "tiny-backend {name} listening on {}",
        listener.local_addr()?
    );
    loop {
        let (stream, _) = listener.accept().await?;
        let name = name.clone();
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
                        "workflow_id": wf,
                    });
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(body.to_string())))
                            .unwrap_or_default(),
                    )
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
