//! Closed-loop HTTP/1.1 load generator.
//!
//! `concurrency` keep-alive connections (hyper client, one task each), each sending
//! the next request as soon as the previous response body has been read in full.
//! A run is `warmup` then a measured window of `duration`: throughput counts the
//! responses completed inside the window, latencies are those of the same
//! responses, and the CPU sampler is called at both edges of the window (so CPU per
//! request = CPU used in the window / responses completed in it). Responses are
//! checked (status 200, exact body length); a failed request is counted as an
//! error and its connection replaced. A connection the server closes between
//! requests (e.g. `keepalive_requests` reached) is replaced without an error.
//! Requests can carry an `X-Workflow-Id` ([`WorkflowIds`]): one fixed id, or a new
//! one on every request.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, client::conn::http1, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// What to send and how.
#[derive(Clone)]
pub struct LoadSpec {
    /// Target address.
    pub addr: SocketAddr,
    /// Request path.
    pub path: &'static str,
    /// Request body (JSON).
    pub body: Bytes,
    /// Exact expected response body length.
    pub expect_len: usize,
    /// Open connections (= requests in flight).
    pub concurrency: usize,
    /// Unmeasured lead-in.
    pub warmup: Duration,
    /// Measured window.
    pub duration: Duration,
    /// The `X-Workflow-Id` each request carries.
    pub workflow_ids: WorkflowIds,
}

/// Which `X-Workflow-Id` the requests of a run carry.
#[derive(Clone, Debug, Default)]
pub enum WorkflowIds {
    /// No workflow id.
    #[default]
    None,
    /// The same id on every request ([`workflow_id`]`(0)`).
    Fixed,
    /// A new id on every request, numbered by this counter (share it between the
    /// runs against one target and no id repeats).
    Unique(Arc<AtomicU64>),
}

/// A UUID-shaped workflow id: `wf-` and 36 characters (39 bytes), distinct for every
/// `n` below 2^48 (its last 12 hex digits), the other digits scrambled from `n` as a
/// random (version 4) UUID's would be.
pub fn workflow_id(n: u64) -> String {
    let h = mix64(n);
    format!(
        "wf-{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        h >> 32,
        (h >> 16) & 0xffff,
        h & 0xfff,
        0x8000 | ((h >> 12) & 0x3fff),
        n & 0xffff_ffff_ffff
    )
}

/// SplitMix64's output function: a cheap, well-mixed 64-bit hash of `z`.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What one run measured.
#[derive(Debug, Default)]
pub struct LoadResult {
    /// Responses completed (and valid) inside the window.
    pub requests: u64,
    /// Failed requests inside the window (bad status, length, I/O).
    pub errors: u64,
    /// Connections replaced after the server closed them.
    pub reconnects: u64,
    /// Window length in seconds.
    pub secs: f64,
    /// Request start → end of body, ns, sorted.
    pub total_ns: Vec<u64>,
    /// Request start → first body bytes, ns, sorted.
    pub ttfb_ns: Vec<u64>,
    /// Body frames received per response (mean).
    pub frames_per_resp: f64,
    /// Sampler value at the start and end of the window.
    pub cpu: (CpuSample, CpuSample),
}

/// CPU ticks of the proxy, the backend and this whole process at one instant.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuSample {
    /// Proxy process tree (0 for direct).
    pub proxy: u64,
    /// Backend thread.
    pub backend: u64,
    /// This process: load generator + backend.
    pub harness: u64,
    /// Run-queue wait of the proxy's threads, ns.
    pub proxy_wait_ns: u64,
    /// Run-queue wait of this process's threads, ns.
    pub harness_wait_ns: u64,
    /// Busy ticks of all CPUs ([`super::procs::system_busy_ticks`]).
    pub system: u64,
}

#[derive(Default)]
struct TaskStats {
    ok: u64,
    errors: u64,
    reconnects: u64,
    frames: u64,
    total_ns: Vec<u64>,
    ttfb_ns: Vec<u64>,
}

/// Runs one load run on the current runtime.
pub async fn run(
    spec: &LoadSpec,
    sample: &(dyn Fn() -> Result<CpuSample> + Sync),
) -> Result<LoadResult> {
    let start = Instant::now();
    let t0 = start + spec.warmup;
    let t1 = t0 + spec.duration;
    let spec_arc = Arc::new(spec.clone());
    let mut tasks = Vec::with_capacity(spec.concurrency);
    for _ in 0..spec.concurrency {
        let s = spec_arc.clone();
        tasks.push(tokio::spawn(async move { conn_loop(&s, t0, t1).await }));
    }
    tokio::time::sleep_until(t0.into()).await;
    let c0 = sample()?;
    let w0 = Instant::now();
    tokio::time::sleep_until(t1.into()).await;
    let c1 = sample()?;
    let secs = w0.elapsed().as_secs_f64();

    let mut res = LoadResult {
        secs,
        cpu: (c0, c1),
        ..Default::default()
    };
    let mut frames = 0u64;
    let grace = tokio::time::Instant::from(t1) + Duration::from_secs(15);
    for t in tasks {
        let abort = t.abort_handle();
        match tokio::time::timeout_at(grace, t).await {
            Ok(joined) => {
                let st = joined.context("load task panicked")?;
                res.requests += st.ok;
                res.errors += st.errors;
                res.reconnects += st.reconnects;
                frames += st.frames;
                res.total_ns.extend(st.total_ns);
                res.ttfb_ns.extend(st.ttfb_ns);
            }
            Err(_) => {
                abort.abort();
                res.errors += 1;
            }
        }
    }
    res.total_ns.sort_unstable();
    res.ttfb_ns.sort_unstable();
    res.frames_per_resp = if res.requests > 0 {
        frames as f64 / res.requests as f64
    } else {
        0.0
    };
    Ok(res)
}

impl LoadResult {
    /// Adds `other` (a later window against the same target) to this result:
    /// counts, window lengths and CPU deltas add up, latencies are pooled.
    pub fn absorb(&mut self, other: LoadResult) {
        let frames = self.frames_per_resp * self.requests as f64
            + other.frames_per_resp * other.requests as f64;
        self.requests += other.requests;
        self.errors += other.errors;
        self.reconnects += other.reconnects;
        self.secs += other.secs;
        self.total_ns.extend(other.total_ns);
        self.total_ns.sort_unstable();
        self.ttfb_ns.extend(other.ttfb_ns);
        self.ttfb_ns.sort_unstable();
        self.frames_per_resp = if self.requests > 0 {
            frames / self.requests as f64
        } else {
            0.0
        };
        // The window's end moves on by what `other`'s window used.
        self.cpu.1.advance(&other.cpu.0, &other.cpu.1);
    }
}

impl CpuSample {
    /// Adds the counts used between `from` and `to` to this sample.
    fn advance(&mut self, from: &CpuSample, to: &CpuSample) {
        let d = |a: u64, b: u64| b.saturating_sub(a);
        self.proxy += d(from.proxy, to.proxy);
        self.backend += d(from.backend, to.backend);
        self.harness += d(from.harness, to.harness);
        self.proxy_wait_ns += d(from.proxy_wait_ns, to.proxy_wait_ns);
        self.harness_wait_ns += d(from.harness_wait_ns, to.harness_wait_ns);
        self.system += d(from.system, to.system);
    }
}

type Sender = http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Sender> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

enum Outcome {
    /// A valid response; `close`: the server closes the connection after it.
    Ok {
        ttfb: Duration,
        frames: u64,
        close: bool,
    },
    Bad,
}

async fn one(sender: &mut Sender, spec: &LoadSpec) -> Result<Outcome> {
    let mut req = Request::post(spec.path)
        .header(header::HOST, spec.addr.to_string())
        .header(header::CONTENT_TYPE, "application/json");
    // Both id modes format an id per request, so they cost the client the same.
    let wf = match &spec.workflow_ids {
        WorkflowIds::None => None,
        WorkflowIds::Fixed => Some(0),
        WorkflowIds::Unique(next) => Some(next.fetch_add(1, Ordering::Relaxed) + 1),
    };
    if let Some(n) = wf {
        req = req.header("x-workflow-id", workflow_id(n));
    }
    let req = req.body(Full::new(spec.body.clone()))?;
    let start = Instant::now();
    let resp = sender.send_request(req).await?;
    let close = resp
        .headers()
        .get(header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let ok_status = resp.status().is_success();
    let mut body = resp.into_body();
    let mut len = 0usize;
    let mut frames = 0u64;
    let mut ttfb = None;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if let Some(d) = frame.data_ref()
            && !d.is_empty()
        {
            if ttfb.is_none() {
                ttfb = Some(start.elapsed());
            }
            len += d.len();
            frames += 1;
        }
    }
    if !ok_status || len != spec.expect_len {
        return Ok(Outcome::Bad);
    }
    let ttfb = ttfb.unwrap_or_else(|| start.elapsed());
    Ok(Outcome::Ok {
        ttfb,
        frames,
        close,
    })
}

async fn conn_loop(spec: &LoadSpec, t0: Instant, t1: Instant) -> TaskStats {
    let mut st = TaskStats::default();
    let mut sender: Option<Sender> = None;
    while Instant::now() < t1 {
        let s = match sender.as_mut() {
            Some(s) if !s.is_closed() => s,
            Some(_) => {
                st.reconnects += 1;
                sender = None;
                continue;
            }
            None => match connect(spec.addr).await {
                Ok(s) => sender.insert(s),
                Err(_) => {
                    if Instant::now() >= t0 {
                        st.errors += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        if s.ready().await.is_err() {
            st.reconnects += 1;
            sender = None;
            continue;
        }
        let start = Instant::now();
        let out = tokio::time::timeout(Duration::from_secs(10), one(s, spec)).await;
        let end = Instant::now();
        let in_window = end >= t0 && end <= t1;
        match out {
            Ok(Ok(Outcome::Ok {
                ttfb,
                frames,
                close,
            })) => {
                if in_window {
                    st.ok += 1;
                    st.frames += frames;
                    st.total_ns.push((end - start).as_nanos() as u64);
                    st.ttfb_ns.push(ttfb.as_nanos() as u64);
                }
                if close {
                    st.reconnects += 1;
                    sender = None;
                }
            }
            _ => {
                if in_window {
                    st.errors += 1;
                }
                sender = None;
            }
        }
    }
    st
}

/// The `q`-quantile (0..=1) of sorted values, nearest rank.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::{CpuSample, LoadResult, quantile};

    #[test]
    fn workflow_ids_are_uuid_shaped_and_distinct() {
        let a = super::workflow_id(0);
        assert_eq!(a.len(), 39, "{a}");
        assert!(a.starts_with("wf-"));
        let dashes: Vec<usize> = a.match_indices('-').map(|(i, _)| i).collect();
        assert_eq!(dashes, [2, 11, 16, 21, 26]);
        let ids: std::collections::HashSet<String> = (0..10_000).map(super::workflow_id).collect();
        assert_eq!(ids.len(), 10_000);
        assert_eq!(super::workflow_id(u64::MAX >> 16).len(), 39);
    }

    #[test]
    fn quantiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), 50);
        assert_eq!(quantile(&v, 0.99), 99);
        assert_eq!(quantile(&v, 1.0), 100);
        assert_eq!(quantile(&[], 0.5), 0);
    }

    #[test]
    fn absorbed_slices_add_up() {
        let cpu = |proxy, harness| CpuSample {
            proxy,
            backend: proxy / 2,
            harness,
            proxy_wait_ns: 10 * proxy,
            harness_wait_ns: 0,
            system: 2 * proxy + harness,
        };
        // (requests, seconds, latencies, ttfb, frames per response, CPU at the edges)
        let window = |requests, secs, total_ns, ttfb_ns, frames_per_resp, cpu| LoadResult {
            requests,
            secs,
            total_ns,
            ttfb_ns,
            frames_per_resp,
            cpu,
            ..Default::default()
        };
        let mut a = window(
            100,
            1.0,
            vec![5, 9],
            vec![2],
            2.0,
            (cpu(1000, 50), cpu(1100, 70)),
        );
        a.errors = 1;
        let mut b = window(
            300,
            3.0,
            vec![1, 7],
            vec![1],
            4.0,
            (cpu(5000, 90), cpu(5300, 100)),
        );
        b.reconnects = 2;
        a.absorb(b);
        assert_eq!((a.requests, a.errors, a.reconnects), (400, 1, 2));
        assert_eq!(a.secs, 4.0);
        assert_eq!(a.total_ns, vec![1, 5, 7, 9]);
        assert_eq!(a.ttfb_ns, vec![1, 2]);
        assert_eq!(a.frames_per_resp, 3.5);
        // CPU: 100 + 300 proxy ticks, 20 + 10 harness ticks.
        assert_eq!(a.cpu.1.proxy - a.cpu.0.proxy, 400);
        assert_eq!(a.cpu.1.backend - a.cpu.0.backend, 200);
        assert_eq!(a.cpu.1.harness - a.cpu.0.harness, 30);
        assert_eq!(a.cpu.1.proxy_wait_ns - a.cpu.0.proxy_wait_ns, 4000);
    }
}
