//! The benchmark's backend: a minimal in-process HTTP/1.1 server that looks enough
//! like vLLM's OpenAI API for the proxies under test, and costs as little CPU as
//! possible so that the proxy dominates.
//!
//! - `GET /health` → `200` (vllm-router blocks until its workers answer it).
//! - `GET /v1/models` → one model.
//! - `POST /v1/completions` (and `/v1/chat/completions`): the body's `stream` field
//!   selects a small JSON answer (`Content-Length`) or an SSE stream of exactly
//!   `chunks` `data: {...}` events followed by `data: [DONE]` (chunked encoding).
//!   The stream body yields to the runtime after every event, so hyper writes each
//!   event with its own `write(2)`, as vLLM does when it emits one token at a time.
//!
//! It runs on its own OS thread with a current-thread tokio runtime, optionally
//! pinned to one CPU; its CPU time is read from `/proc/self/task/TID/stat`.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::mpsc,
    task::{Context as TaskContext, Poll},
    thread::JoinHandle,
};

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Body, Frame, Incoming, SizeHint},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::sync::oneshot;

use super::procs;

/// The non-streaming completion answer (about the size of a short vLLM reply).
const SMALL_JSON: &str = concat!(
    r#"{"id":"cmpl-bench","object":"text_completion","created":0,"model":"bench","#,
    r#""choices":[{"index":0,"text":" Paris is the capital of France.","logprobs":null,"#,
    r#""finish_reason":"length","stop_reason":null}],"#,
    r#""usage":{"prompt_tokens":8,"total_tokens":16,"completion_tokens":8}}"#
);

/// One SSE event of a streamed completion (one token).
const CHUNK: &str = concat!(
    r#"data: {"id":"cmpl-bench","object":"text_completion","created":0,"model":"bench","#,
    r#""choices":[{"index":0,"text":" tok","logprobs":null,"finish_reason":null,"stop_reason":null}]}"#,
    "\n\n"
);

/// The last token event (same length as [`CHUNK`] is not required).
const LAST_CHUNK: &str = concat!(
    r#"data: {"id":"cmpl-bench","object":"text_completion","created":0,"model":"bench","#,
    r#""choices":[{"index":0,"text":" end","logprobs":null,"finish_reason":"length","stop_reason":null}]}"#,
    "\n\n"
);

/// The stream terminator.
const DONE: &str = "data: [DONE]\n\n";

const MODELS_JSON: &str =
    r#"{"object":"list","data":[{"id":"bench","object":"model","created":0,"owned_by":"bench"}]}"#;

/// The body of every completion request this backend answers.
pub fn request_body(stream: bool) -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"bench","prompt":"What is the capital of France?","max_tokens":16,"stream":{stream}}}"#
    ))
}

/// Exact length of the response body a client must receive.
pub fn expected_len(stream: bool, chunks: usize) -> usize {
    if stream {
        chunks.saturating_sub(1) * CHUNK.len()
            + if chunks > 0 { LAST_CHUNK.len() } else { 0 }
            + DONE.len()
    } else {
        SMALL_JSON.len()
    }
}

/// A running backend; stopping it (drop) shuts its runtime down and joins the thread.
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    tid: i32,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    /// Binds 127.0.0.1 on a free port and starts serving on a new thread.
    pub fn start(chunks: usize, cpu: Option<usize>) -> Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the backend")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let (tid_tx, tid_rx) = mpsc::channel::<Result<i32, String>>();
        let thread = std::thread::Builder::new()
            .name("bench-backend".into())
            .spawn(move || {
                if let Some(cpu) = cpu
                    && let Err(e) = procs::pin_current_thread(cpu)
                {
                    let _ = tid_tx.send(Err(format!("{e:#}")));
                    return;
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tid_tx.send(Err(format!("backend runtime: {e}")));
                        return;
                    }
                };
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                let _ = tid_tx.send(Ok(tid));
                rt.block_on(serve(listener, chunks, stop_rx));
            })
            .context("spawning the backend thread")?;
        let tid = tid_rx
            .recv()
            .context("backend thread ended before starting")?
            .map_err(|e| anyhow!(e))?;
        Ok(Self {
            addr,
            tid,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// CPU time (user + system, clock ticks) the backend thread has used.
    pub fn cpu_ticks(&self) -> Result<u64> {
        procs::stat_ticks(&format!("/proc/self/task/{}/stat", self.tid))
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(listener: std::net::TcpListener, chunks: usize, mut stop: oneshot::Receiver<()>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bench backend: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = &mut stop => return,
            acc = listener.accept() => {
                let Ok((stream, _)) = acc else { continue };
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(req, chunks));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }
    }
}

#[derive(Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    stream: bool,
}

type Resp = Response<BenchBody>;

async fn handle(req: Request<Incoming>, chunks: usize) -> Result<Resp, Infallible> {
    let resp = match (req.method(), req.uri().path()) {
        (&Method::GET, "/health") => plain(StatusCode::OK, "text/plain", "ok"),
        (&Method::GET, "/v1/models") => plain(StatusCode::OK, "application/json", MODELS_JSON),
        (&Method::POST, "/v1/completions" | "/v1/chat/completions") => {
            match req.into_body().collect().await {
                Ok(body) => match serde_json::from_slice::<CompletionRequest>(&body.to_bytes()) {
                    Ok(r) if r.stream => stream(chunks),
                    Ok(_) => plain(StatusCode::OK, "application/json", SMALL_JSON),
                    Err(_) => plain(StatusCode::BAD_REQUEST, "text/plain", "bad json"),
                },
                Err(_) => plain(StatusCode::BAD_REQUEST, "text/plain", "body"),
            }
        }
        _ => plain(StatusCode::NOT_FOUND, "text/plain", "not found"),
    };
    Ok(resp)
}

fn plain(status: StatusCode, ctype: &'static str, body: &'static str) -> Resp {
    let mut r = Response::new(BenchBody::Full(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    r
}

fn stream(chunks: usize) -> Resp {
    let mut r = Response::new(BenchBody::Sse(SseBody {
        next: 0,
        chunks,
        yielded: true,
    }));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    r
}

/// Response body: a full small body or the SSE event stream.
enum BenchBody {
    Full(Full<Bytes>),
    Sse(SseBody),
}

/// `chunks` token events then `[DONE]`, yielding once between events.
struct SseBody {
    next: usize,
    chunks: usize,
    yielded: bool,
}

impl Body for BenchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Full(f) => Pin::new(f).poll_frame(cx),
            Self::Sse(s) => {
                if s.next > s.chunks {
                    return Poll::Ready(None);
                }
                if !s.yielded {
                    s.yielded = true;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                s.yielded = false;
                let data = if s.next + 1 < s.chunks {
                    CHUNK
                } else if s.next + 1 == s.chunks {
                    LAST_CHUNK
                } else {
                    DONE
                };
                s.next += 1;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(data.as_bytes())))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(f) => f.is_end_stream(),
            Self::Sse(s) => s.next > s.chunks,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(f) => f.size_hint(),
            Self::Sse(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_lengths() {
        assert_eq!(expected_len(false, 100), SMALL_JSON.len());
        assert_eq!(
            expected_len(true, 3),
            2 * CHUNK.len() + LAST_CHUNK.len() + DONE.len()
        );
    }
}
