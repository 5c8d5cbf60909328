//! A tiny admin client for `agentlb status` (hyper, one request).

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use thiserror::Error;

/// Admin client errors.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Could not connect or talk HTTP.
    #[error("admin API at {addr}: {message}")]
    Http {
        /// Address.
        addr: String,
        /// Error text.
        message: String,
    },
    /// Non-200 answer.
    #[error("admin API at {addr} answered {status}: {body}")]
    Status {
        /// Address.
        addr: String,
        /// Status.
        status: u16,
        /// Body.
        body: String,
    },
}

/// GETs `path` from the admin API at `addr` and returns the body.
pub async fn get(addr: &str, path: &str, token: Option<&str>) -> Result<String, ClientError> {
    let err = |m: String| ClientError::Http {
        addr: addr.to_owned(),
        message: m,
    };
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| err(e.to_string()))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| err(e.to_string()))?;
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", addr);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| err(e.to_string()))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| err(e.to_string()))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| err(e.to_string()))?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if status != 200 {
        return Err(ClientError::Status {
            addr: addr.to_owned(),
            status,
            body,
        });
    }
    Ok(body)
}
