//! Bookkeeping of one response on its way to the client: time to first byte,
//! end-to-end time, token usage read from the body's tail, guards (admission
//! permit, in-flight counter) held until the last byte, and how it ended.
//!
//! The relay itself is in [`super::conn`]; a [`Tracker`] dropped without
//! [`Tracker::end`] (the connection task was cancelled) counts as the client
//! having gone away.

use std::time::Instant;

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

/// The SSE event that ends a stream agentlb could not finish.
pub fn error_event(message: &str) -> Vec<u8> {
    let v = serde_json::json!({"error": {
        "message": message, "type": "upstream_error", "param": null, "code": "stream_interrupted"
    }});
    format!("data: {v}\n\ndata: [DONE]\n\n").into_bytes()
}

/// Per-response bookkeeping. Generic over its callbacks and the guards it
/// holds, so a request allocates none of them.
pub struct Tracker<F, E, H>
where
    F: FnOnce(f64),
    E: FnOnce(Outcome, Option<Usage>, Instant),
{
    started: Instant,
    ttfb: Option<f64>,
    /// When the bytes of the next [`Tracker::data`] call arrived, if known.
    arrived: Option<Instant>,
    on_first: Option<F>,
    tail: Vec<u8>,
    want_usage: bool,
    on_end: Option<E>,
    /// Responses API: the first body bytes, until a response id is found in them.
    capture: Option<(Vec<u8>, OnId)>,
    _hold: H,
}

/// Called with the response id found at the start of a Responses API body.
pub type OnId = Box<dyn FnOnce(String) + Send>;

/// Bytes of a body searched for a response id.
const CAPTURE: usize = 8 * 1024;

impl<F, E, H> Tracker<F, E, H>
where
    F: FnOnce(f64),
    E: FnOnce(Outcome, Option<Usage>, Instant),
{
    /// Tracks a response whose request started at `started`: `on_first` gets
    /// the time to the first body byte, `on_end` how it ended (with its usage
    /// and the time it ended); `hold` keeps guards alive until then. Usage is
    /// read from the body's tail only when `want_usage` (someone records it).
    pub fn new(started: Instant, want_usage: bool, on_first: F, on_end: E, hold: H) -> Self {
        Self {
            started,
            ttfb: None,
            arrived: None,
            on_first: Some(on_first),
            tail: Vec::new(),
            want_usage,
            on_end: Some(on_end),
            capture: None,
            _hold: hold,
        }
    }

    /// Looks for a Responses API response id at the start of the body and hands it to
    /// `on_id` as soon as it has arrived.
    pub fn capture_response_id(&mut self, on_id: OnId) {
        self.capture = Some((Vec::new(), on_id));
    }

    /// The bytes of the next [`Tracker::data`] call arrived at `at` (they came
    /// with the response head), so the clock need not be read for them.
    pub fn arrived(&mut self, at: Instant) {
        self.arrived = Some(at);
    }

    /// Body bytes about to be sent to the client.
    pub fn data(&mut self, data: &[u8]) {
        let arrived = self.arrived.take();
        if data.is_empty() {
            return;
        }
        if self.ttfb.is_none() {
            let t = arrived
                .map_or_else(
                    || self.started.elapsed(),
                    |a| a.saturating_duration_since(self.started),
                )
                .as_secs_f64();
            self.ttfb = Some(t);
            if let Some(f) = self.on_first.take() {
                f(t);
            }
        }
        if let Some((buf, _)) = &mut self.capture {
            let take = data.len().min(CAPTURE.saturating_sub(buf.len()));
            buf.extend_from_slice(&data[..take]);
            let id = crate::controller::responses::response_id_in(buf);
            if id.is_some() || buf.len() >= CAPTURE {
                if let (Some(id), Some((_, on_id))) = (id, self.capture.take()) {
                    on_id(id);
                } else {
                    self.capture = None;
                }
            }
        }
        if !self.want_usage {
            return;
        }
        if data.len() >= TAIL {
            self.tail.clear();
            self.tail.extend_from_slice(&data[data.len() - TAIL..]);
        } else {
            let over = (self.tail.len() + data.len()).saturating_sub(TAIL);
            self.tail.drain(..over);
            self.tail.extend_from_slice(data);
        }
    }

    /// The response ended at `at`.
    pub fn end(mut self, outcome: Outcome, at: Instant) {
        self.finish(outcome, at);
    }

    fn finish(&mut self, outcome: Outcome, at: Instant) {
        if let Some(f) = self.on_end.take() {
            let usage = if self.want_usage {
                usage_from_tail(&self.tail)
            } else {
                None
            };
            f(outcome, usage, at);
        }
    }
}

impl<F, E, H> Drop for Tracker<F, E, H>
where
    F: FnOnce(f64),
    E: FnOnce(Outcome, Option<Usage>, Instant),
{
    fn drop(&mut self) {
        if self.on_end.is_some() {
            self.finish(Outcome::ClientGone, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn tracker_reports_usage_ttfb_and_outcome_once() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let first = Arc::new(Mutex::new(Vec::new()));
        let f2 = first.clone();
        let started = Instant::now();
        let end = started + std::time::Duration::from_millis(900);
        let mut t = Tracker::new(
            started,
            true,
            move |t| f2.lock().expect("lock").push(t),
            move |o, u, at| s2.lock().expect("lock").push((o, u, at)),
            (),
        );
        // The first bytes came with the head, 250 ms in: that is the TTFB.
        t.arrived(started + std::time::Duration::from_millis(250));
        t.data(b"data: {\"usage\":{\"prompt_tokens\":3,");
        t.data(b"\"completion_tokens\":4,\"total_tokens\":7}}\n\ndata: [DONE]\n\n");
        t.end(Outcome::Complete, end);
        let seen = seen.lock().expect("lock");
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, Outcome::Complete);
        assert!(seen[0].1.is_some(), "usage parsed from the tail");
        assert_eq!(seen[0].2, end);
        assert_eq!(*first.lock().expect("lock"), vec![0.25]);
    }

    #[test]
    fn dropped_tracker_counts_as_client_gone() {
        let seen = Arc::new(Mutex::new(None));
        let s2 = seen.clone();
        drop(Tracker::new(
            Instant::now(),
            false,
            |_| {},
            move |o, _, _| *s2.lock().expect("lock") = Some(o),
            (),
        ));
        assert_eq!(*seen.lock().expect("lock"), Some(Outcome::ClientGone));
    }
}
