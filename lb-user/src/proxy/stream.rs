//! The response body agentlb sends: the upstream body passed through frame by
//! frame (no buffering; no coalescing either: hyper's client hands over one
//! upstream chunk at a time, and batching attempts measured no fewer writes),
//! plus bookkeeping — time to first byte, end-to-end time, token usage from the
//! body's tail, in-flight accounting until the last byte —
//! and failure handling: an upstream error after the first byte ends an SSE
//! stream with a well-formed error event and a clean close (other bodies are
//! aborted, as the client cannot be told otherwise); the total timeout applies.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use super::BoxError;
use crate::controller::workflows::{Usage, usage_from_tail};

const TAIL: usize = 4096;

/// How a response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// All bytes delivered.
    Complete,
    /// Upstream failed after the first byte.
    UpstreamFailed,
    /// The total timeout fired.
    TimedOut,
    /// The client went away (the upstream request is cancelled with it).
    ClientGone,
}

/// Called once when the body ends or is dropped.
pub type OnEnd = Box<dyn FnOnce(Outcome, Option<Usage>, Option<f64>) + Send + Sync>;

/// The streaming body.
pub struct Streamed {
    inner: Incoming,
    sse: bool,
    started: Instant,
    ttfb: Option<f64>,
    on_first: Option<Box<dyn FnOnce(f64) + Send + Sync>>,
    tail: Vec<u8>,
    deadline: Pin<Box<Sleep>>,
    on_end: Option<OnEnd>,
    done: bool,
    _hold: Arc<dyn Send + Sync>,
}

impl Streamed {
    /// Wraps `inner`. `hold` keeps guards (permits, in-flight counters) alive until
    /// the body is finished or dropped.
    pub fn new(
        inner: Incoming,
        sse: bool,
        started: Instant,
        deadline: tokio::time::Instant,
        on_first: Box<dyn FnOnce(f64) + Send + Sync>,
        on_end: OnEnd,
        hold: Arc<dyn Send + Sync>,
    ) -> Self {
        Self {
            inner,
            sse,
            started,
            ttfb: None,
            on_first: Some(on_first),
            tail: Vec::new(),
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            on_end: Some(on_end),
            done: false,
            _hold: hold,
        }
    }

    fn end(&mut self, outcome: Outcome) {
        self.done = true;
        if let Some(f) = self.on_end.take() {
            let usage = usage_from_tail(&self.tail);
            f(outcome, usage, self.ttfb);
        }
    }

    fn error_event(message: &str) -> Bytes {
        let v = serde_json::json!({"error": {
            "message": message, "type": "upstream_error", "param": null, "code": "stream_interrupted"
        }});
        Bytes::from(format!("data: {v}\n\ndata: [DONE]\n\n"))
    }

    fn remember(&mut self, data: &Bytes) {
        if data.len() >= TAIL {
            self.tail.clear();
            self.tail.extend_from_slice(&data[data.len() - TAIL..]);
        } else {
            let over = (self.tail.len() + data.len()).saturating_sub(TAIL);
            self.tail.drain(..over);
            self.tail.extend_from_slice(data);
        }
    }
}

impl Body for Streamed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.end(Outcome::TimedOut);
            return if this.sse {
                Poll::Ready(Some(Ok(Frame::data(Self::error_event(
                    "agentlb: the request exceeded its total time limit",
                )))))
            } else {
                Poll::Ready(Some(Err("total timeout exceeded".into())))
            };
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if this.ttfb.is_none() && !data.is_empty() {
                        let t = this.started.elapsed().as_secs_f64();
                        this.ttfb = Some(t);
                        if let Some(f) = this.on_first.take() {
                            f(t);
                        }
                    }
                    this.remember(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let msg = format!("agentlb: the backend failed mid-stream: {e}");
                tracing::warn!(error = %e, "upstream failed after the first byte");
                this.end(Outcome::UpstreamFailed);
                if this.sse {
                    Poll::Ready(Some(Ok(Frame::data(Self::error_event(&msg)))))
                } else {
                    Poll::Ready(Some(Err(msg.into())))
                }
            }
            Poll::Ready(None) => {
                this.end(Outcome::Complete);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Streamed {
    fn drop(&mut self) {
        if !self.done {
            // hyper stops polling once `is_end_stream` says so (known length, all
            // bytes sent), so a body dropped at its end is complete; otherwise the
            // client went away mid-response.
            let complete = self.inner.is_end_stream();
            self.end(if complete {
                Outcome::Complete
            } else {
                Outcome::ClientGone
            });
        }
    }
}
