//! The response body agentlb sends: the upstream body passed through frame by
//! frame (no buffering), plus bookkeeping — time to first byte, end-to-end time,
//! token usage from the body's tail, in-flight accounting until the last byte —
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
    deferred: Option<Next>,
    held: Option<Held>,
    yields: u8,
    just_yielded: bool,
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
            deferred: None,
            held: None,
            yields: 0,
            just_yielded: false,
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

/// What comes after the data already sent.
enum Next {
    Frame(Frame<Bytes>),
    Failed(String),
    End,
}

/// Upper bound of one coalesced write.
const COALESCE_MAX: usize = 64 * 1024;
/// Scheduler turns given to the upstream connection per coalesced write.
const MAX_YIELDS: u8 = 16;

/// Data received but not yet handed to hyper.
enum Held {
    One(Bytes),
    Many(bytes::BytesMut),
}

impl Held {
    fn len(&self) -> usize {
        match self {
            Held::One(b) => b.len(),
            Held::Many(b) => b.len(),
        }
    }
}

impl Streamed {
    fn finish(&mut self, next: Next) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match next {
            Next::Frame(f) => Poll::Ready(Some(Ok(f))),
            Next::Failed(e) => {
                let msg = format!("agentlb: the backend failed mid-stream: {e}");
                tracing::warn!(error = %e, "upstream failed after the first byte");
                self.end(Outcome::UpstreamFailed);
                if self.sse {
                    Poll::Ready(Some(Ok(Frame::data(Self::error_event(&msg)))))
                } else {
                    Poll::Ready(Some(Err(msg.into())))
                }
            }
            Next::End => {
                self.end(Outcome::Complete);
                Poll::Ready(None)
            }
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
        if let Some(next) = this.deferred.take() {
            return this.finish(next);
        }
        // Coalesce data frames into one write: hyper yields one frame per upstream
        // chunk (one SSE event each) and hands them over one at a time, and a
        // write per event costs a syscall. While an SSE stream keeps producing,
        // give the upstream connection task a turn (a self-wake) before writing,
        // so events that are already in its socket join this write; stop at the
        // first turn that brings nothing, after MAX_YIELDS turns, or at 64 KiB.
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => {
                    let have = this.held.is_some();
                    if have && this.sse && !this.just_yielded && this.yields < MAX_YIELDS {
                        this.yields += 1;
                        this.just_yielded = true;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    break;
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if data.is_empty() {
                            continue;
                        }
                        this.just_yielded = false;
                        if this.ttfb.is_none() {
                            let t = this.started.elapsed().as_secs_f64();
                            this.ttfb = Some(t);
                            if let Some(f) = this.on_first.take() {
                                f(t);
                            }
                        }
                        this.remember(&data);
                        let held = match this.held.take() {
                            None => Held::One(data),
                            Some(Held::One(f)) => {
                                let mut b = bytes::BytesMut::with_capacity(f.len() + data.len());
                                b.extend_from_slice(&f);
                                b.extend_from_slice(&data);
                                Held::Many(b)
                            }
                            Some(Held::Many(mut b)) => {
                                b.extend_from_slice(&data);
                                Held::Many(b)
                            }
                        };
                        let full = held.len() >= COALESCE_MAX;
                        this.held = Some(held);
                        if full {
                            break;
                        }
                    }
                    // Trailers: send what we have first.
                    Err(frame) => {
                        if this.held.is_none() {
                            return Poll::Ready(Some(Ok(frame)));
                        }
                        this.deferred = Some(Next::Frame(frame));
                        break;
                    }
                },
                Poll::Ready(Some(Err(e))) => {
                    this.deferred = Some(Next::Failed(e.to_string()));
                    break;
                }
                Poll::Ready(None) => {
                    this.deferred = Some(Next::End);
                    break;
                }
            }
        }
        this.yields = 0;
        this.just_yielded = false;
        match this.held.take() {
            Some(Held::One(b)) => return Poll::Ready(Some(Ok(Frame::data(b)))),
            Some(Held::Many(b)) => return Poll::Ready(Some(Ok(Frame::data(b.freeze())))),
            None => {}
        }
        match this.deferred.take() {
            Some(next) => this.finish(next),
            None => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.deferred.is_none() && self.held.is_none() && self.inner.is_end_stream())
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
            let complete = self.held.is_none()
                && match &self.deferred {
                    Some(Next::End) => true,
                    None => self.inner.is_end_stream(),
                    Some(_) => false,
                };
            self.end(if complete {
                Outcome::Complete
            } else {
                Outcome::ClientGone
            });
        }
    }
}
