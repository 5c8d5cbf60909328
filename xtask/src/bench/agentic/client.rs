//! The benchmark's client: replays a workload against one or more gateways.
//!
//! Every call is a task that waits for its dependencies, its pause and its arrival time
//! (simulated milliseconds ÷ time scale), then sends its request to gateway
//! `call id mod gateways` (so each workflow's calls are spread over the replicas as ECMP or
//! a cloud load balancer would) over pooled keep-alive connections. A streaming response is
//! read event by event: TTFT is the arrival of the first chunk with generated text, and
//! `usage` (with `cached_tokens`) comes from the last chunk.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use indicatif::ProgressBar;
use lb_sim::workload::{IdMode, Workload, request::usage_of};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;

/// What happened to one call. Times are wall-clock seconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CallResult {
    /// Call id.
    pub id: usize,
    /// Gateway index it was sent to.
    pub gateway: usize,
    /// Send time after the start of the run.
    pub start: f64,
    /// Time to the first generated text (streaming) or to the whole response.
    pub ttft: Option<f64>,
    /// Time to the end of the response.
    pub e2e: f64,
    /// HTTP status (0 = no response).
    pub status: u16,
    /// Error kind, if the call failed.
    pub error: Option<String>,
    /// From the response's `usage`.
    pub prompt_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens`.
    pub cached_tokens: u64,
    /// `usage.completion_tokens`.
    pub completion_tokens: u64,
}

/// Options of one replay.
pub struct Replay {
    /// The workload.
    pub workload: Arc<Workload>,
    /// Gateways to spread calls over.
    pub gateways: Vec<SocketAddr>,
    /// How workflows are named.
    pub ids: IdMode,
    /// Request id prefix.
    pub run_tag: String,
    /// Simulated seconds per wall second.
    pub time_scale: f64,
    /// Per-call limit (wall).
    pub call_timeout: Duration,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Replays the workload; returns one result per call, in call order, and the errors so far
/// are counted in `errors` (shown by the progress bar).
pub async fn replay(r: Replay, progress: ProgressBar, errors: Arc<AtomicU64>) -> Vec<CallResult> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    let n = r.workload.calls.len();
    let (done_tx, done_rx): (Vec<_>, Vec<_>) =
        (0..n).map(|_| watch::channel(None::<Instant>)).unzip();
    let t0 = Instant::now();
    let r = Arc::new(r);
    let mut tasks = Vec::with_capacity(n);
    for (i, tx) in done_tx.into_iter().enumerate() {
        let deps: Vec<watch::Receiver<Option<Instant>>> = r.workload.calls[i]
            .deps
            .iter()
            .map(|&d| done_rx[d].clone())
            .collect();
        let (r, client, progress, errors) =
            (r.clone(), client.clone(), progress.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let call = &r.workload.calls[i];
            let wall = |ms: u64| Duration::from_secs_f64(ms as f64 / 1000.0 / r.time_scale);
            let mut ready = t0 + wall(call.at_ms);
            for mut d in deps {
                let end = match d.wait_for(Option::is_some).await {
                    Ok(v) => v.unwrap_or(t0),
                    Err(_) => t0,
                };
                ready = ready.max(end + wall(call.delay_ms));
            }
            tokio::time::sleep_until(ready.into()).await;
            let gateway = i % r.gateways.len();
            let http = r.workload.http_call(call, &r.ids, &r.run_tag);
            let start = Instant::now();
            let mut res = match tokio::time::timeout(
                r.call_timeout,
                send(&client, r.gateways[gateway], &http, start),
            )
            .await
            {
                Ok(res) => res,
                Err(_) => CallResult {
                    error: Some("timeout".to_owned()),
                    e2e: start.elapsed().as_secs_f64(),
                    ..CallResult::default()
                },
            };
            res.id = i;
            res.gateway = gateway;
            res.start = (start - t0).as_secs_f64();
            if res.error.is_some() {
                errors.fetch_add(1, Ordering::Relaxed);
            }
            progress.inc(1);
            let _ = tx.send(Some(Instant::now()));
            res
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| CallResult {
            error: Some(format!("task: {e}")),
            ..CallResult::default()
        }));
    }
    out
}

async fn send(
    client: &HttpClient,
    addr: SocketAddr,
    call: &lb_sim::workload::HttpCall,
    start: Instant,
) -> CallResult {
    let mut res = CallResult::default();
    let mut req = hyper::Request::post(format!("http://{addr}{}", call.path))
        .header("content-type", "application/json");
    for (k, v) in &call.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = match req.body(Full::new(Bytes::from(call.body.clone()))) {
        Ok(r) => r,
        Err(e) => {
            res.error = Some(format!("request: {e}"));
            return res;
        }
    };
    let resp = match client.request(req).await {
        Ok(r) => r,
        Err(e) => {
            res.error = Some(if e.is_connect() { "connect" } else { "io" }.to_owned());
            res.e2e = start.elapsed().as_secs_f64();
            return res;
        }
    };
    res.status = resp.status().as_u16();
    let streaming = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    let mut done = false;
    loop {
        match body.frame().await {
            None => break,
            Some(Err(_)) => {
                res.error = Some("stream_cut".to_owned());
                break;
            }
            Some(Ok(f)) => {
                let Ok(data) = f.into_data() else { continue };
                buf.extend_from_slice(&data);
                if streaming {
                    done |= scan_events(&mut buf, &mut res, start);
                }
            }
        }
    }
    res.e2e = start.elapsed().as_secs_f64();
    if res.error.is_some() {
        return res;
    }
    if res.status != 200 {
        res.error = Some(format!("http_{}", res.status));
        return res;
    }
    if streaming {
        if !done {
            res.error = Some("no_done".to_owned());
        }
    } else {
        res.ttft = Some(res.e2e);
        if let Some((p, c, g)) = serde_json::from_slice::<Value>(&buf)
            .ok()
            .as_ref()
            .and_then(usage_of)
        {
            (res.prompt_tokens, res.cached_tokens, res.completion_tokens) = (p, c, g);
        }
    }
    if res.error.is_none() && res.prompt_tokens == 0 {
        res.error = Some("no_usage".to_owned());
    }
    res
}

/// Consumes complete SSE events from `buf`; returns true once `[DONE]` was seen.
fn scan_events(buf: &mut Vec<u8>, res: &mut CallResult, start: Instant) -> bool {
    let mut done = false;
    let mut consumed = 0;
    while let Some(end) = find_event_end(&buf[consumed..]) {
        let event = &buf[consumed..consumed + end];
        consumed += end + 2;
        for line in event.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            let data = data.trim_ascii();
            if data == b"[DONE]" {
                done = true;
                continue;
            }
            let Ok(v) = serde_json::from_slice::<Value>(data) else {
                continue;
            };
            if res.ttft.is_none() && has_text(&v) {
                res.ttft = Some(start.elapsed().as_secs_f64());
            }
            if let Some((p, c, g)) = usage_of(&v) {
                (res.prompt_tokens, res.cached_tokens, res.completion_tokens) = (p, c, g);
            }
        }
    }
    buf.drain(..consumed);
    done
}

fn find_event_end(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\n\n")
}

/// Whether a chunk carries generated text (chat `delta.content` or completions `text`).
fn has_text(v: &Value) -> bool {
    v.get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .is_some_and(|c| {
            let s = c
                .get("delta")
                .and_then(|d| d.get("content"))
                .or_else(|| c.get("text"))
                .and_then(Value::as_str);
            s.is_some_and(|s| !s.is_empty())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_scan_finds_text_usage_and_done_across_reads() {
        let start = Instant::now();
        let mut res = CallResult::default();
        let mut buf = b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\ndata: {\"choi".to_vec();
        assert!(!scan_events(&mut buf, &mut res, start));
        assert!(
            res.ttft.is_none(),
            "a role-only chunk is not the first token"
        );
        buf.extend_from_slice(b"ces\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n");
        assert!(!scan_events(&mut buf, &mut res, start));
        assert!(res.ttft.is_some());
        buf.extend_from_slice(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":8}}}\n\ndata: [DONE]\n\n");
        assert!(scan_events(&mut buf, &mut res, start));
        assert_eq!(
            (res.prompt_tokens, res.cached_tokens, res.completion_tokens),
            (10, 8, 2)
        );
        assert!(buf.is_empty());
    }
}
