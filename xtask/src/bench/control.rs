//! `cargo xtask bench control`: what agentlb's control plane costs: the routing
//! decision's latency and the memory of a workflow in process, and the proxy's
//! throughput when every request names a new workflow.
//!
//! **In process** (the `agentlb` library linked into this binary, no network):
//!
//! - *Decision latency.* For every (live workflows N, backends B) of the grid
//!   (default N ∈ 10^3…10^6, B ∈ 4…256): a `Controller` with policy `workflow`
//!   whose table holds N idle workflows (each routed once and recorded answered:
//!   `pick`, then `workflows.start` and `.finish`, as the proxy does), then
//!   `--decisions` timed calls of `Controller::pick` (candidate filtering, table
//!   lookup or insert, prefix index, policy). A fraction `--new-fraction`
//!   (default 10%) names a workflow never seen (inserted, then removed untimed so
//!   the table stays at N); the rest an existing one drawn uniformly. Each request
//!   carries the prefix-index block hashes of a `--prompt-bytes` prompt (default
//!   2 KiB, half shared by all workflows), as the proxy computes them. Each call
//!   is timed on its own with `Instant` (its own cost, ~30 ns, is measured and
//!   reported; a workflow decision takes microseconds, so no batching). Existing
//!   workflows are then recorded answered (`start` + `finish`, timed separately
//!   as *bookkeeping*). Also `round_robin` (no table) and `rendezvous_order`
//!   alone at each B, and one repeat without prompt blocks at the largest N, to
//!   show where the time goes; and how often the machine interrupts a running
//!   thread (gaps in a loop that only reads the clock), which sets p99 here.
//! - *Full table.* `max_workflows = N`, filled, then 2N decisions that each name a
//!   new workflow: every insert evicts the least recently seen idle entry.
//! - *Memory per idle workflow.* A counting global allocator ([`CountingAlloc`])
//!   gives the live heap bytes before and after a fresh table is filled with N
//!   workflows (B = 16): bytes Rust asked for, bytes glibc reserved (usable size
//!   plus an 8-byte chunk header), split into allocations under 4 KiB (per entry:
//!   the id string, the per-backend counts) and bulk ones (shard slabs and hash
//!   tables, with their capacity slack), with the RSS delta (after `malloc_trim`)
//!   as a cross-check. The lineage map (request id → workflow, bounded separately
//!   by `max_lineage`) is measured apart. Ids are UUID-shaped, `wf-` + 36
//!   characters.
//!
//! **Through the proxy**: one `agentlb run --no-kernel --workers 1 --policy
//! workflow` with `[workflows] max_workflows = 10000`, in front of the built-in
//! backend of `bench proxy`, driven by its load generator with small
//! completions. Its table is filled with new workflow ids first; then two cases
//! take turns against it slice by slice (reversed every other slice) at each
//! concurrency: *new ids* (a new `X-Workflow-Id` on every request: each inserts a
//! workflow and evicts one) and *fixed id* (the same id every time, found in the
//! full table). One process for both: two processes sent identical traffic
//! differed by up to 7% at concurrency 64. Requests/s, CPU per request, RSS and
//! evictions per request per case, and the new ÷ fixed ratios within each
//! repeat. Pinning as in `bench proxy` (agentlb on CPU 1, load generator +
//! backend on CPU 0), and by default agentlb is capped at `--proxy-cpu-limit
//! 0.35` of a core, so that agentlb, not the load generator sharing the two
//! cores, is the bottleneck and requests/s measures it.
//!
//! Output: Markdown on stdout and in `DIR/control.md`, every number in
//! `DIR/control.json` (`DIR` = `--out`, default `target/bench`); `--publish`
//! copies the Markdown to `bench/CONTROL.md`. Values are medians over
//! `--repeats` with the [min–max] spread; the targets of the issue are checked
//! in the first table.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::HashMap,
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use agentlb::{
    config::{self, PolicyName},
    controller::{Controller, policies, workflows},
    model::{Backend as LbBackend, RequestMeta},
};
use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use serde::Serialize;
use serde_json::json;

use super::{
    Target,
    backend::{self, Backend},
    cgroup::CpuLimit,
    load::{self, CpuSample, LoadSpec, WorkflowIds},
    procs::{self, ChildGuard, TempDir},
    report::{Record, Stat},
};

/// The targets.
const TARGET_P99_US: f64 = 20.0;
const TARGET_BYTES: f64 = 512.0;
const TARGET_RATIO: f64 = 0.90;
/// The live-workflow count the latency and memory targets are set at.
const TARGET_N: usize = 1_000_000;
/// Backends of the memory runs (an idle entry's size does not depend on it).
const MEM_BACKENDS: usize = 16;
/// glibc's per-chunk header (`SIZE_SZ` on 64-bit).
const MALLOC_HEADER: i64 = 8;
/// Allocations from this size up count as bulk (slabs, hash tables).
const SMALL: usize = 4096;
/// Share of a core (or of the cap) above which a process counts as saturated.
const SATURATED: f64 = 0.95;

/// Options of `cargo xtask bench control -- [OPTIONS]`.
#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask bench control --",
    about = "Routing decision latency, memory per workflow and proxy throughput at a full table"
)]
struct Args {
    /// Small settings (under a minute): 10^3,10^4 workflows × 4,16 backends,
    /// 20,000 decisions, 2 repeats, concurrency 16 and 1.5 s proxy windows.
    #[arg(long)]
    quick: bool,
    /// Live workflows (default 1000,10000,100000,1000000).
    #[arg(long, value_delimiter = ',')]
    workflows: Option<Vec<usize>>,
    /// Backends (default 4,16,64,256).
    #[arg(long, value_delimiter = ',')]
    backends: Option<Vec<usize>>,
    /// Timed decisions per cell and repeat (default 200000).
    #[arg(long)]
    decisions: Option<usize>,
    /// Repeats of every measurement (default 3).
    #[arg(long)]
    repeats: Option<usize>,
    /// Share of the timed decisions that name a new workflow.
    #[arg(long, default_value_t = 0.1)]
    new_fraction: f64,
    /// Bytes of the prompt each timed request carries (half shared by all
    /// workflows, half its own), hashed into blocks for the prefix index as the
    /// proxy does; 0 = no prompt blocks.
    #[arg(long, default_value_t = 2048)]
    prompt_bytes: usize,
    /// Backends of the full-table (evicting) runs.
    #[arg(long, default_value_t = 16)]
    full_backends: usize,
    /// Seed of the workload's random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Proxy: concurrency levels (default 16,64).
    #[arg(long, value_delimiter = ',')]
    concurrency: Option<Vec<usize>>,
    /// Proxy: measured seconds per case, concurrency and repeat (default 6).
    #[arg(long)]
    duration: Option<f64>,
    /// Proxy: unmeasured warm-up per case, concurrency and repeat, seconds (default 1).
    #[arg(long)]
    warmup: Option<f64>,
    /// Proxy: slices per window, the cases taking turns (default 6; 1 with --quick).
    #[arg(long)]
    slices: Option<usize>,
    /// Proxy: agentlb's `workflows.max_workflows`.
    #[arg(long, default_value_t = 10_000)]
    proxy_max_workflows: usize,
    /// Proxy: cap agentlb at this many cores (CFS bandwidth in a child cgroup;
    /// root). 0 = uncapped. When the cgroup cannot be made the run goes uncapped
    /// and says so.
    #[arg(long, default_value_t = 0.35)]
    proxy_cpu_limit: f64,
    /// Skip the in-process part.
    #[arg(long)]
    no_table: bool,
    /// Skip the proxy part.
    #[arg(long)]
    no_proxy: bool,
    /// Do not pin processes to CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Do not build agentlb first (use the existing release binary).
    #[arg(long)]
    no_build: bool,
    /// agentlb binary to use instead of building `target/release/agentlb`.
    #[arg(long)]
    agentlb: Option<PathBuf>,
    /// Output directory (default `<workspace>/target/bench`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also copy the Markdown to `bench/CONTROL.md`.
    #[arg(long)]
    publish: bool,
}

// ---------------------------------------------------------------------------
// Counting allocator
// ---------------------------------------------------------------------------

/// The process's global allocator: the system allocator, counting live
/// allocations while [`CountingAlloc::enable`] is on (one relaxed load
/// otherwise). Only differences between two [`HeapSample`]s taken while it is on
/// mean anything.
pub struct CountingAlloc;

static COUNTING: AtomicBool = AtomicBool::new(false);
/// Bytes the program asked for.
static LIVE: AtomicI64 = AtomicI64::new(0);
/// Bytes malloc reserved for them (`malloc_usable_size`).
static USABLE: AtomicI64 = AtomicI64::new(0);
/// Allocations.
static ALLOCS: AtomicI64 = AtomicI64::new(0);
/// The same two for allocations under [`SMALL`] bytes.
static SMALL_USABLE: AtomicI64 = AtomicI64::new(0);
static SMALL_ALLOCS: AtomicI64 = AtomicI64::new(0);

fn usable_size(p: *mut u8) -> usize {
    // SAFETY: `p` is a live block from the system allocator, which is glibc's
    // malloc (posix_memalign for large alignments) on Linux.
    unsafe { libc::malloc_usable_size(p.cast()) }
}

fn note(size: usize, usable: usize, sign: i64) {
    LIVE.fetch_add(sign * size as i64, Ordering::Relaxed);
    USABLE.fetch_add(sign * usable as i64, Ordering::Relaxed);
    ALLOCS.fetch_add(sign, Ordering::Relaxed);
    if size < SMALL {
        SMALL_USABLE.fetch_add(sign * usable as i64, Ordering::Relaxed);
        SMALL_ALLOCS.fetch_add(sign, Ordering::Relaxed);
    }
}

impl CountingAlloc {
    /// Turns counting on or off.
    pub fn enable(on: bool) {
        COUNTING.store(on, Ordering::SeqCst);
    }

    /// Live heap bytes counted so far: (asked for, reserved by malloc with its 8-byte
    /// chunk headers).
    pub fn live() -> (i64, i64) {
        (
            LIVE.load(Ordering::SeqCst),
            USABLE.load(Ordering::SeqCst) + 8 * ALLOCS.load(Ordering::SeqCst),
        )
    }
}

// SAFETY: every call is forwarded unchanged to `System`; the bookkeeping only
// updates atomics and asks malloc for the size of blocks it handed out.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() && COUNTING.load(Ordering::Relaxed) {
            note(layout.size(), usable_size(p), 1);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() && COUNTING.load(Ordering::Relaxed) {
            note(layout.size(), usable_size(p), 1);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if COUNTING.load(Ordering::Relaxed) {
            note(layout.size(), usable_size(ptr), -1);
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let on = COUNTING.load(Ordering::Relaxed);
        let old = if on { usable_size(ptr) } else { 0 };
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if on && !p.is_null() {
            note(layout.size(), old, -1);
            note(new_size, usable_size(p), 1);
        }
        p
    }
}

/// The heap counters and RSS at one instant.
#[derive(Debug, Clone, Copy, Default)]
struct HeapSample {
    live: i64,
    usable: i64,
    allocs: i64,
    small_usable: i64,
    small_allocs: i64,
    rss: i64,
}

impl HeapSample {
    fn now() -> Self {
        Self {
            live: LIVE.load(Ordering::SeqCst),
            usable: USABLE.load(Ordering::SeqCst),
            allocs: ALLOCS.load(Ordering::SeqCst),
            small_usable: SMALL_USABLE.load(Ordering::SeqCst),
            small_allocs: SMALL_ALLOCS.load(Ordering::SeqCst),
            rss: rss_bytes("/proc/self/status").unwrap_or(0) as i64,
        }
    }

    /// Gives freed memory back to the kernel first, so that the RSS of what is
    /// allocated next is new pages.
    fn trimmed() -> Self {
        // SAFETY: malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) };
        Self::now()
    }

    fn minus(&self, o: &Self) -> Self {
        Self {
            live: self.live - o.live,
            usable: self.usable - o.usable,
            allocs: self.allocs - o.allocs,
            small_usable: self.small_usable - o.small_usable,
            small_allocs: self.small_allocs - o.small_allocs,
            rss: self.rss - o.rss,
        }
    }

    /// What glibc holds for these allocations: usable bytes + one header each.
    fn footprint(&self) -> i64 {
        self.usable + MALLOC_HEADER * self.allocs
    }

    fn small_footprint(&self) -> i64 {
        self.small_usable + MALLOC_HEADER * self.small_allocs
    }

    fn bulk_footprint(&self) -> i64 {
        self.footprint() - self.small_footprint()
    }
}

/// `VmRSS` of a `/proc/.../status` file, bytes.
fn rss_bytes(status: &str) -> Option<u64> {
    proc_status_kib(status, "VmRSS:").map(|k| k * 1024)
}

fn proc_status_kib(status: &str, field: &str) -> Option<u64> {
    fs::read_to_string(status).ok().and_then(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    })
}

// ---------------------------------------------------------------------------
// In process
// ---------------------------------------------------------------------------

/// A deterministic random stream (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        load::mix64(self.0)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The request id agentlb would generate (`agentlb-` + 32 hex digits).
fn request_id(n: u64) -> String {
    format!("agentlb-{:016x}{n:016x}", 0x5eed_u64)
}

/// A validated configuration with these table bounds (everything else default).
fn lb_config(max_workflows: usize, max_lineage: usize) -> Result<config::Config> {
    let text = format!(
        "[[backends]]\nurl = \"http://127.0.0.1:9\"\n\n[workflows]\nmax_workflows = {max_workflows}\nmax_lineage = {max_lineage}\n"
    );
    let raw = config::parse_str(&text).context("bench configuration")?;
    config::validate(&raw).context("bench configuration")
}

/// A controller over `backends` fake backends (never contacted).
fn controller(
    backends: usize,
    policy: PolicyName,
    max_workflows: usize,
    max_lineage: usize,
) -> Result<Controller> {
    let cfg = lb_config(max_workflows, max_lineage)?;
    let mut list = Vec::with_capacity(backends);
    for i in 0..backends {
        let host = format!("10.0.{}.{}", i / 250, 1 + i % 250);
        let url: hyper::Uri = format!("http://{host}:8000")
            .parse()
            .with_context(|| format!("backend URL for {host}"))?;
        let addr: SocketAddr = format!("{host}:8000").parse()?;
        let id = u32::try_from(i).context("too many backends")?;
        let b = LbBackend::new(id, format!("b{i}"), url, vec![addr]);
        // As learned from `/v1/models`: every request names the model.
        b.set_models(vec![MODEL.to_owned()]);
        list.push(b);
    }
    Ok(Controller::new(list, policy, &cfg.routing, &cfg.workflows))
}

/// A request of workflow `n` (the rest as the proxy would fill it for a small
/// chat request).
fn meta_for(meta: &mut RequestMeta, n: u64, rid: u64, prompt: Option<&Prompt>) {
    meta.workflow_id = Some(load::workflow_id(n));
    meta.request_id = request_id(rid);
    if let Some(p) = prompt {
        meta.blocks = p.blocks(n);
        meta.body_len = p.bytes + 100;
    }
}

/// The prompt a decision's request carries, as the proxy hashes it for the
/// prefix index: `bytes` long, its first half shared by every workflow (a system
/// prompt), the second half the workflow's own.
struct Prompt {
    shared: Vec<u8>,
    bytes: usize,
    block: usize,
    max_blocks: usize,
}

impl Prompt {
    fn new(bytes: usize) -> Result<Option<Self>> {
        if bytes == 0 {
            return Ok(None);
        }
        let r = lb_config(1, 1)?.routing;
        let shared: Vec<u8> = "You are a careful planning agent. "
            .bytes()
            .cycle()
            .take(bytes / 2)
            .collect();
        Ok(Some(Self {
            shared,
            bytes,
            block: r.prefix_block_bytes,
            max_blocks: r.prefix_max_blocks,
        }))
    }

    fn blocks(&self, n: u64) -> Vec<u64> {
        let own = load::workflow_id(n);
        let mut text = self.shared.clone();
        while text.len() < self.bytes {
            text.extend_from_slice(own.as_bytes());
        }
        text.truncate(self.bytes);
        agentlb::controller::prefix::block_hashes(&text, self.block, self.max_blocks)
    }
}

/// The model every backend serves and every request names.
const MODEL: &str = "bench-model";

fn new_meta() -> RequestMeta {
    RequestMeta {
        body_len: 2_000,
        model: Some(MODEL.to_owned()),
        ..RequestMeta::default()
    }
}

/// Routes workflow `n` and records its request answered, as the proxy does for a
/// request that completes; returns the key.
fn route_and_answer(
    c: &Controller,
    meta: &mut RequestMeta,
    n: u64,
    rid: u64,
    prompt: Option<&Prompt>,
) -> Result<u64> {
    meta_for(meta, n, rid, prompt);
    let picked = c
        .pick(meta, &[], u64::MAX)
        .map_err(|e| anyhow!("no backend picked: {e:?}"))?;
    answer(c, meta, picked.backend.id);
    Ok(workflow_key(meta))
}

fn workflow_key(meta: &RequestMeta) -> u64 {
    workflows::lookup_key(meta.workflow_id.as_deref().unwrap_or(""))
}

/// `workflows.start` + `.finish`: what the proxy records for an answered request.
fn answer(c: &Controller, meta: &RequestMeta, backend: u32) {
    let key = workflow_key(meta);
    let id = meta.workflow_id.as_deref().unwrap_or("");
    c.workflows
        .start(key, id, false, None, None, &meta.request_id, backend);
    c.workflows.finish(
        key,
        backend,
        Some(workflows::Usage {
            prompt_tokens: 500,
            completion_tokens: 16,
            cached_tokens: 480,
        }),
    );
}

/// Latency of one repeat of one cell, ns.
#[derive(Debug, Clone, Default, Serialize)]
struct LatRep {
    decisions: usize,
    p50: f64,
    p99: f64,
    p999: f64,
    mean: f64,
    max: f64,
    /// Decisions for an existing workflow.
    hit_p50: Option<f64>,
    hit_p99: Option<f64>,
    /// Decisions for a new workflow.
    new_p50: Option<f64>,
    new_p99: Option<f64>,
    /// `start` + `finish` after a decision.
    book_p50: Option<f64>,
    book_p99: Option<f64>,
    /// Entries evicted during the repeat.
    evictions: u64,
    /// Entries in the table after it.
    table_len: usize,
    /// Decisions that took 20 µs or more.
    over_20us: usize,
    /// Involuntary context switches of this thread during the repeat (another
    /// process took the CPU).
    preempted: i64,
}

/// Involuntary context switches of the calling thread so far.
fn preemptions() -> i64 {
    // SAFETY: getrusage only writes into the zeroed struct it is given.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_THREAD, &mut ru) == 0 {
            ru.ru_nivcsw
        } else {
            0
        }
    }
}

/// One cell of the latency grid.
#[derive(Debug, Clone, Serialize)]
struct LatCell {
    /// `mixed` (existing + new workflows), `baseline` (round_robin) or `full`
    /// (every decision inserts and evicts).
    kind: &'static str,
    policy: &'static str,
    workflows: usize,
    backends: usize,
    /// Seconds to fill the table (pick + start + finish per workflow).
    fill_secs: f64,
    /// Baseline rows: p50 of the workflow policy's `rendezvous_order` alone over
    /// these backends, ns (what ranking the backends for a key costs).
    rendezvous_p50: Option<f64>,
    reps: Vec<LatRep>,
    /// Mixed rows at the largest N: one more repeat whose requests carry no
    /// prompt blocks (what the prefix index adds).
    no_prompt: Option<LatRep>,
}

fn summarize_ns(all: &mut [u64]) -> (f64, f64, f64, f64, f64) {
    all.sort_unstable();
    let q = |p| load::quantile(all, p) as f64;
    let mean = all.iter().sum::<u64>() as f64 / all.len().max(1) as f64;
    (q(0.5), q(0.99), q(0.999), mean, q(1.0))
}

fn q_opt(v: &mut [u64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    Some(load::quantile(v, p) as f64)
}

/// How the timed decisions of a repeat pick their workflows.
#[derive(Clone, Copy)]
enum Mix {
    /// Existing workflows `0..live` uniformly, a share `new` of never-seen ones
    /// (removed again, untimed, so the table keeps its size).
    Mixed { live: u64, new: f64 },
    /// Only never-seen workflows, kept (the table evicts).
    AllNew,
}

/// What follows a decision for an existing or kept workflow.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Book {
    /// Nothing (round_robin: no table).
    Skip,
    /// `start` + `finish`, timed apart.
    Timed,
}

/// Times `m` decisions; `next_new` numbers the never-seen workflows.
fn time_decisions(
    c: &Controller,
    m: usize,
    mix: Mix,
    next_new: &mut u64,
    rng: &mut Rng,
    book: Book,
    prompt: Option<&Prompt>,
) -> Result<LatRep> {
    let mut hit: Vec<u64> = Vec::with_capacity(m);
    let mut new: Vec<u64> = Vec::with_capacity(m);
    let mut bk: Vec<u64> = Vec::with_capacity(if book == Book::Timed { m } else { 0 });
    let mut meta = new_meta();
    let ev0 = c.workflows.evictions();
    let cs0 = preemptions();
    for k in 0..m {
        if k % 65_536 == 65_535 {
            procs::check_interrupted()?;
        }
        let (n, fresh) = match mix {
            Mix::Mixed { live, new } if rng.unit() >= new => (rng.below(live), false),
            _ => {
                *next_new += 1;
                (*next_new, true)
            }
        };
        meta_for(&mut meta, n, rng.next(), prompt);
        let t0 = Instant::now();
        let picked = c.pick(&meta, &[], u64::MAX);
        let dt = t0.elapsed().as_nanos() as u64;
        let picked = picked.map_err(|e| anyhow!("no backend picked: {e:?}"))?;
        if fresh {
            new.push(dt);
        } else {
            hit.push(dt);
        }
        match (mix, book) {
            (Mix::Mixed { .. }, _) if fresh => {
                c.workflows.remove(workflow_key(&meta));
            }
            (_, Book::Timed) => {
                let t0 = Instant::now();
                answer(c, &meta, picked.backend.id);
                bk.push(t0.elapsed().as_nanos() as u64);
            }
            (_, Book::Skip) => {}
        }
    }
    let preempted = preemptions() - cs0;
    let mut all: Vec<u64> = hit.iter().chain(new.iter()).copied().collect();
    let over_20us = all.iter().filter(|&&x| x >= 20_000).count();
    let (p50, p99, p999, mean, max) = summarize_ns(&mut all);
    Ok(LatRep {
        decisions: m,
        p50,
        p99,
        p999,
        mean,
        max,
        hit_p50: q_opt(&mut hit, 0.5),
        hit_p99: q_opt(&mut hit, 0.99),
        new_p50: q_opt(&mut new, 0.5),
        new_p99: q_opt(&mut new, 0.99),
        book_p50: q_opt(&mut bk, 0.5),
        book_p99: q_opt(&mut bk, 0.99),
        evictions: c.workflows.evictions() - ev0,
        table_len: c.workflows.len(),
        over_20us,
        preempted,
    })
}

/// p50 of `rendezvous_order` alone (the workflow policy's ranking of the
/// backends for a key), ns.
fn rendezvous_p50(c: &Controller, m: usize, rng: &mut Rng) -> f64 {
    let backends = c.backends();
    let mut v: Vec<u64> = (0..m)
        .map(|_| {
            let key = rng.next();
            let t = Instant::now();
            std::hint::black_box(policies::workflow::rendezvous_order(&backends, key));
            t.elapsed().as_nanos() as u64
        })
        .collect();
    v.sort_unstable();
    load::quantile(&v, 0.5) as f64
}

/// Fills a table with workflows `0..n`, each routed and answered once.
fn fill(c: &Controller, n: usize, prompt: Option<&Prompt>) -> Result<f64> {
    let t = Instant::now();
    let mut meta = new_meta();
    for i in 0..n as u64 {
        route_and_answer(c, &mut meta, i, i, prompt)?;
        if i % 65_536 == 0 {
            procs::check_interrupted()?;
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Memory of a table of N idle workflows.
#[derive(Debug, Clone, Default, Serialize)]
struct MemCell {
    workflows: usize,
    /// Per workflow: bytes the program asked for.
    requested: f64,
    /// Per workflow: glibc's footprint (usable bytes + 8-byte headers).
    footprint: f64,
    /// Per workflow: RSS growth.
    rss: f64,
    /// Per workflow: allocations.
    allocs: f64,
    /// Per workflow: bulk allocations (slabs + hash tables, with slack).
    bulk: f64,
    /// Per workflow: small allocations made by routing (the id string).
    small_route: f64,
    /// Per workflow: small allocations made by recording the answer (the
    /// per-backend counts).
    small_answer: f64,
    /// Per entry of the lineage map (request id → workflow), footprint.
    lineage: f64,
    /// At `max_workflows = N`: footprint per entry after the fill (some shards
    /// evict already) and after 2N more new workflows (each evicting one), and
    /// the entries held then.
    full_fill: f64,
    full_churned: f64,
    full_len: usize,
    /// RSS growth per entry over the 2N evictions (fragmentation shows here).
    full_churn_rss: f64,
}

/// Counts allocations while `f` runs.
fn counting<R>(f: impl FnOnce() -> R) -> R {
    CountingAlloc::enable(true);
    let r = f();
    CountingAlloc::enable(false);
    r
}

/// A fresh controller for the memory runs, its lazily allocated parts warmed.
fn mem_controller(max_workflows: usize, max_lineage: usize) -> Result<(Controller, RequestMeta)> {
    let c = controller(
        MEM_BACKENDS,
        PolicyName::Workflow,
        max_workflows,
        max_lineage,
    )?;
    let mut meta = new_meta();
    meta_for(&mut meta, u64::MAX >> 16, 0, None);
    let _ = c.pick(&meta, &[], u64::MAX);
    c.workflows.remove(workflow_key(&meta));
    Ok((c, meta))
}

/// Fills a fresh table with `n` workflows: the heap deltas after routing them
/// and after recording their answers, and the entries held. Call with counting
/// on.
fn measure_fill(
    n: usize,
    max_workflows: usize,
    max_lineage: usize,
) -> Result<(HeapSample, HeapSample, usize)> {
    let (c, mut meta) = mem_controller(max_workflows, max_lineage)?;
    let h0 = HeapSample::trimmed();
    for i in 0..n as u64 {
        if i % 65_536 == 65_535 {
            procs::check_interrupted()?;
        }
        meta_for(&mut meta, i, i, None);
        c.pick(&meta, &[], u64::MAX)
            .map_err(|e| anyhow!("no backend picked: {e:?}"))?;
    }
    let h1 = HeapSample::now();
    for i in 0..n as u64 {
        meta_for(&mut meta, i, i, None);
        let key = workflow_key(&meta);
        // Entries evicted already (full shards) are recorded anew, as the proxy would.
        let home = c.workflows.homes(key).and_then(|h| h.home).unwrap_or(0);
        answer(&c, &meta, home);
    }
    let h2 = HeapSample::now();
    let len = c.workflows.len();
    drop(c);
    Ok((h1.minus(&h0), h2.minus(&h0), len))
}

fn measure_memory(n: usize) -> Result<MemCell> {
    counting(|| {
        // Room for 2N: no shard evicts, the table holds exactly N.
        let (routed, answered, len) = measure_fill(n, 2 * n, 1)?;
        let (_, with_lineage, len2) = measure_fill(n, 2 * n, n)?;
        if len != n || len2 != n {
            bail!("the table holds {len} / {len2} of {n} workflows");
        }
        let per = |x: i64| x as f64 / n as f64;
        // A full table, then 2N new workflows, each evicting one.
        let (c, mut meta) = mem_controller(n, 1)?;
        let h0 = HeapSample::trimmed();
        let mut rid = 0;
        for i in 0..n as u64 {
            rid += 1;
            route_and_answer(&c, &mut meta, i, rid, None)?;
        }
        let filled = HeapSample::now().minus(&h0);
        let len_filled = c.workflows.len();
        for i in 0..2 * n as u64 {
            if i % 65_536 == 65_535 {
                procs::check_interrupted()?;
            }
            rid += 1;
            route_and_answer(&c, &mut meta, (1u64 << 40) + i, rid, None)?;
        }
        let churned = HeapSample::now().minus(&h0);
        let full_len = c.workflows.len();
        drop(c);
        Ok(MemCell {
            workflows: n,
            requested: per(answered.live),
            footprint: per(answered.footprint()),
            rss: per(answered.rss),
            allocs: per(answered.allocs),
            bulk: per(answered.bulk_footprint()),
            small_route: per(routed.small_footprint()),
            small_answer: per(answered.small_footprint() - routed.small_footprint()),
            lineage: per(with_lineage.footprint() - answered.footprint()),
            full_fill: filled.footprint() as f64 / len_filled.max(1) as f64,
            full_churned: churned.footprint() as f64 / full_len.max(1) as f64,
            full_len,
            full_churn_rss: (churned.rss - filled.rss) as f64 / full_len.max(1) as f64,
        })
    })
}

/// The size of one slab slot: a one-shard table of 512 entries holds exactly a
/// 512-slot slab and a 1,024-bucket `HashMap<u64, u32>`; the latter is measured
/// on its own and taken off.
fn slot_bytes() -> Result<f64> {
    counting(|| {
        let (routed, _, len) = measure_fill(512, 512, 1)?;
        if len != 512 {
            bail!("the calibration table holds {len} of 512 workflows");
        }
        let h0 = HeapSample::now();
        let mut m: HashMap<u64, u32> = HashMap::new();
        for i in 0..512u64 {
            m.insert(load::mix64(i), i as u32);
        }
        let h1 = HeapSample::now().minus(&h0);
        drop(m);
        Ok((routed.bulk_footprint() - h1.bulk_footprint()) as f64 / 512.0)
    })
}

/// The timer's own cost: p50 and p99 of an empty timed region, ns.
fn timer_overhead() -> (f64, f64) {
    let mut v: Vec<u64> = (0..200_000)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(());
            t.elapsed().as_nanos() as u64
        })
        .collect();
    v.sort_unstable();
    (
        load::quantile(&v, 0.5) as f64,
        load::quantile(&v, 0.99) as f64,
    )
}

/// How often a running thread is interrupted, and for how long: gaps of 5 µs or
/// more in a loop that only reads the clock for `dur`.
#[derive(Debug, Clone, Copy, Serialize)]
struct Interruptions {
    per_sec: f64,
    median_us: f64,
    p90_us: f64,
}

fn interruptions(dur: Duration) -> Interruptions {
    let start = Instant::now();
    let mut prev = start;
    let mut gaps: Vec<u64> = Vec::with_capacity(100_000);
    loop {
        let now = Instant::now();
        let d = now.duration_since(prev).as_nanos() as u64;
        if d >= 5_000 && gaps.len() < gaps.capacity() {
            gaps.push(d);
        }
        prev = now;
        if now.duration_since(start) >= dur {
            break;
        }
    }
    gaps.sort_unstable();
    Interruptions {
        per_sec: gaps.len() as f64 / dur.as_secs_f64(),
        median_us: load::quantile(&gaps, 0.5) as f64 / 1000.0,
        p90_us: load::quantile(&gaps, 0.9) as f64 / 1000.0,
    }
}

struct TableResults {
    cells: Vec<LatCell>,
    memory: Vec<MemCell>,
    slot_bytes: f64,
    timer: (f64, f64),
    interruptions: Interruptions,
}

fn run_table(s: &Settings) -> Result<TableResults> {
    let timer = timer_overhead();
    eprintln!(
        "bench: timer overhead p50 {:.0} ns, p99 {:.0} ns",
        timer.0, timer.1
    );
    let intr = interruptions(Duration::from_secs(1));
    eprintln!(
        "bench: interruptions of a running thread: {:.0}/s, median {:.1} µs, p90 {:.1} µs",
        intr.per_sec, intr.median_us, intr.p90_us
    );
    let slot = slot_bytes()?;
    eprintln!("bench: slab slot {slot:.0} B");
    let mut memory = Vec::new();
    for &n in &s.workflows {
        procs::check_interrupted()?;
        let m = measure_memory(n)?;
        eprintln!(
            "bench: memory N={n}: {:.0} B/workflow footprint ({:.0} requested, RSS {:.0}); lineage {:.0} B/entry; full table {:.0} B/entry, {:.0} after 2N evictions",
            m.footprint, m.requested, m.rss, m.lineage, m.full_fill, m.full_churned
        );
        memory.push(m);
    }
    // Latency runs: the allocator does not count (it would add to every call).
    let prompt = Prompt::new(s.prompt_bytes)?;
    let prompt = prompt.as_ref();
    let mut rng = Rng(s.seed);
    let mut cells = Vec::new();
    for &b in &s.backends {
        procs::check_interrupted()?;
        let c = controller(b, PolicyName::RoundRobin, 1000, 1000)?;
        let mut next = 0;
        let mut cell = LatCell {
            kind: "baseline",
            policy: "round_robin",
            workflows: 0,
            backends: b,
            fill_secs: 0.0,
            rendezvous_p50: Some(rendezvous_p50(&c, s.decisions.min(50_000), &mut rng)),
            reps: Vec::new(),
            no_prompt: None,
        };
        for _ in 0..s.repeats {
            let mix = Mix::Mixed {
                live: 1000,
                new: 0.0,
            };
            cell.reps.push(time_decisions(
                &c,
                s.decisions,
                mix,
                &mut next,
                &mut rng,
                Book::Skip,
                prompt,
            )?);
        }
        log_cell(&cell);
        cells.push(cell);
    }
    for &n in &s.workflows {
        for &b in &s.backends {
            procs::check_interrupted()?;
            // Room to spare (no shard evicts); lineage at its default bound.
            let c = controller(b, PolicyName::Workflow, 2 * n, 100_000)?;
            let fill_secs = fill(&c, n, prompt)?;
            let mut next = 1u64 << 40;
            let mut cell = LatCell {
                kind: "mixed",
                policy: "workflow",
                workflows: n,
                backends: b,
                fill_secs,
                rendezvous_p50: None,
                reps: Vec::new(),
                no_prompt: None,
            };
            for _ in 0..s.repeats {
                let mix = Mix::Mixed {
                    live: n as u64,
                    new: s.new_fraction,
                };
                cell.reps.push(time_decisions(
                    &c,
                    s.decisions,
                    mix,
                    &mut next,
                    &mut rng,
                    Book::Timed,
                    prompt,
                )?);
            }
            if prompt.is_some() && Some(&n) == s.workflows.iter().max() {
                let mix = Mix::Mixed {
                    live: n as u64,
                    new: s.new_fraction,
                };
                cell.no_prompt = Some(time_decisions(
                    &c,
                    s.decisions,
                    mix,
                    &mut next,
                    &mut rng,
                    Book::Timed,
                    None,
                )?);
            }
            log_cell(&cell);
            cells.push(cell);
        }
    }
    for &n in &s.workflows {
        procs::check_interrupted()?;
        let b = s.full_backends;
        let c = controller(b, PolicyName::Workflow, n, 100_000)?;
        let fill_secs = fill(&c, n, prompt)?;
        let mut next = 1u64 << 40;
        let mut cell = LatCell {
            kind: "full",
            policy: "workflow",
            workflows: n,
            backends: b,
            fill_secs,
            rendezvous_p50: None,
            reps: Vec::new(),
            no_prompt: None,
        };
        for _ in 0..s.repeats {
            cell.reps.push(time_decisions(
                &c,
                2 * n,
                Mix::AllNew,
                &mut next,
                &mut rng,
                Book::Timed,
                prompt,
            )?);
        }
        log_cell(&cell);
        cells.push(cell);
    }
    Ok(TableResults {
        cells,
        memory,
        slot_bytes: slot,
        timer,
        interruptions: intr,
    })
}

fn log_cell(c: &LatCell) {
    let st = |f: fn(&LatRep) -> f64| Stat::of(&c.reps.iter().map(f).collect::<Vec<_>>());
    let us = |s: Option<Stat>| s.map_or(0.0, |s| s.median / 1000.0);
    eprintln!(
        "bench: {:8} {:11} N={:<8} B={:<3} p50 {:6.2} µs p99 {:6.2} µs p99.9 {:6.2} µs mean {:6.2} µs (fill {:.1} s)",
        c.kind,
        c.policy,
        c.workflows,
        c.backends,
        us(st(|r| r.p50)),
        us(st(|r| r.p99)),
        us(st(|r| r.p999)),
        us(st(|r| r.mean)),
        c.fill_secs
    );
}

// ---------------------------------------------------------------------------
// Through the proxy
// ---------------------------------------------------------------------------

/// One case's run at one (repeat, concurrency).
#[derive(Debug, Clone, Serialize)]
struct ProxyRun {
    /// `new ids` or `fixed id`.
    case: &'static str,
    #[serde(flatten)]
    rec: Record,
    /// agentlb's RSS after this case's last slice, KiB.
    rss_kib: Option<u64>,
    /// Workflows in agentlb's table after the repeat.
    tracked: Option<f64>,
    /// Table evictions per request during this case's runs.
    evictions_per_req: Option<f64>,
}

struct ProxyResults {
    runs: Vec<ProxyRun>,
    cap: Option<f64>,
    notes: Vec<String>,
    pinned: bool,
}

/// A value of agentlb's `/metrics` (the first sample of `name`).
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let rest = rest.strip_prefix(' ').or_else(|| {
            rest.strip_prefix('{')
                .and_then(|r| r.split_once("} ").map(|x| x.1))
        })?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// (tracked workflows, evictions) from agentlb's admin listener.
fn table_stats(admin: SocketAddr) -> (Option<f64>, Option<f64>) {
    let text = ureq::get(&format!("http://{admin}/metrics"))
        .timeout(Duration::from_secs(5))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .unwrap_or_default();
    (
        metric(&text, "agentlb_tracked_workflows"),
        metric(&text, "agentlb_workflow_evictions_total")
            .or_else(|| metric(&text, "agentlb_workflow_evictions")),
    )
}

/// One way of naming workflows, sent to the same agentlb.
struct Case {
    name: &'static str,
    ids: WorkflowIds,
}

fn start_agentlb(
    bin: &Path,
    name: &'static str,
    backend: SocketAddr,
    tmp: &TempDir,
    s: &Settings,
    limit: Option<&CpuLimit>,
) -> Result<(Target, SocketAddr)> {
    let conf = tmp.path().join(format!("{}.toml", name.replace(' ', "-")));
    fs::write(
        &conf,
        format!("[workflows]\nmax_workflows = {}\n", s.proxy_max_workflows),
    )
    .with_context(|| format!("writing {}", conf.display()))?;
    let (mut cmd, port, admin) = super::agentlb_command(bin, Some(&conf), false, backend, 1)?;
    cmd.args(["--policy", "workflow"]);
    let proc = ChildGuard::spawn_capped(
        name,
        cmd,
        tmp.path().join(format!("{}.log", name.replace(' ', "-"))),
        s.proxy_cpu,
        limit,
    )?;
    Ok((
        Target {
            name,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            proc: Some(proc),
        },
        SocketAddr::from(([127, 0, 0, 1], admin)),
    ))
}

fn run_proxy(s: &Settings, agentlb: &Path) -> Result<ProxyResults> {
    let mut notes = Vec::new();
    let limit = if s.proxy_cpu_limit > 0.0 {
        match CpuLimit::new(s.proxy_cpu_limit) {
            Ok(l) => Some(l),
            Err(e) => {
                notes.push(format!(
                    "no CPU cap ({e:#}): requests/s may measure the load generator; compare CPU per request"
                ));
                None
            }
        }
    } else {
        None
    };
    let cap = limit.as_ref().map(CpuLimit::fraction);
    let tmp = TempDir::new("agentlb-bench-control")?;
    if let Some(cpu) = s.harness_cpu {
        procs::pin_current_thread(cpu)?;
    }
    let backend = Backend::start(1, s.harness_cpu)?;
    let body = backend::request_body(false);
    let len = backend::expected_len(false, 1);
    // One agentlb for both cases: two processes differed by up to 7% at c=64
    // when they were sent the same traffic.
    let (mut target, admin) =
        start_agentlb(agentlb, "agentlb", backend.addr, &tmp, s, limit.as_ref())?;
    if let Some(p) = target.proc.as_mut() {
        procs::wait_ready(target.addr, &body, len, p, Duration::from_secs(20))?;
    }
    eprintln!("bench: agentlb ready on {}", target.addr);
    let cases = [
        Case {
            name: "new ids",
            ids: WorkflowIds::Unique(Arc::new(AtomicU64::new(0))),
        },
        Case {
            name: "fixed id",
            ids: WorkflowIds::Fixed,
        },
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("load generator runtime")?;
    let tck = procs::ticks_per_sec();
    let spec_for = |c: &Case, conc: usize, warmup: Duration, duration: Duration| LoadSpec {
        addr: target.addr,
        path: "/v1/completions",
        body: body.clone(),
        expect_len: len,
        concurrency: conc,
        warmup,
        duration,
        workflow_ids: c.ids.clone(),
    };
    // Fill the table with new ids: from then on every new id inserts and evicts.
    let fill_conc = s.concurrency.first().copied().unwrap_or(16);
    let began = Instant::now();
    loop {
        procs::check_interrupted()?;
        let spec = spec_for(&cases[0], fill_conc, Duration::ZERO, Duration::from_secs(1));
        rt.block_on(load::run(&spec, &|| Ok(CpuSample::default())))?;
        let (tracked, ev) = table_stats(admin);
        let full = tracked.unwrap_or(0.0) >= 0.95 * s.proxy_max_workflows as f64
            && ev.unwrap_or(0.0) > 0.0;
        if full {
            eprintln!(
                "bench: table full after {:.1} s: {} workflows, {} evictions",
                began.elapsed().as_secs_f64(),
                tracked.unwrap_or(0.0),
                ev.unwrap_or(0.0)
            );
            break;
        }
        if began.elapsed() > Duration::from_secs(60) {
            bail!("the table did not fill in 60 s (tracked {tracked:?}, evictions {ev:?})");
        }
    }
    let mut runs = Vec::new();
    for rep in 0..s.repeats {
        for &conc in &s.concurrency {
            let n = cases.len();
            let mut results: Vec<Option<load::LoadResult>> = (0..n).map(|_| None).collect();
            let mut evicted = vec![0.0; n];
            let mut rss = vec![None; n];
            let pids: Vec<i32> = target
                .proc
                .as_ref()
                .map(ChildGuard::pids)
                .unwrap_or_default();
            for slice in 0..s.slices {
                let order: Vec<usize> = if (rep * s.slices + slice).is_multiple_of(2) {
                    (0..n).collect()
                } else {
                    (0..n).rev().collect()
                };
                for &i in &order {
                    procs::check_interrupted()?;
                    if let Some(p) = target.proc.as_mut() {
                        p.check_alive()?;
                    }
                    let spec = spec_for(
                        &cases[i],
                        conc,
                        s.warmup / s.slices as u32,
                        s.duration / s.slices as u32,
                    );
                    let backend_ref = &backend;
                    let pids = &pids;
                    let me = [std::process::id() as i32];
                    let sampler = move || -> Result<CpuSample> {
                        Ok(CpuSample {
                            proxy: procs::ticks_of(pids),
                            backend: backend_ref.cpu_ticks()?,
                            harness: procs::stat_ticks("/proc/self/stat")?,
                            proxy_wait_ns: procs::wait_ns_of(pids),
                            harness_wait_ns: procs::wait_ns_of(&me),
                            system: procs::system_busy_ticks()?,
                        })
                    };
                    let ev0 = table_stats(admin).1.unwrap_or(0.0);
                    let res = rt.block_on(load::run(&spec, &sampler))?;
                    evicted[i] += table_stats(admin).1.unwrap_or(0.0) - ev0;
                    rss[i] = target.proc.as_ref().and_then(|p| {
                        proc_status_kib(&format!("/proc/{}/status", p.pid()), "VmRSS:")
                    });
                    match &mut results[i] {
                        Some(acc) => acc.absorb(res),
                        slot @ None => *slot = Some(res),
                    }
                }
            }
            let (tracked, _) = table_stats(admin);
            for (i, res) in results.into_iter().enumerate() {
                let Some(res) = res else { continue };
                let rec = super::record(rep, &target, "small", conc, &res, tck);
                // The evictions counted include the warm-ups; so do these requests.
                let sent = rec.rps * (s.duration + s.warmup).as_secs_f64();
                let evictions_per_req = (sent > 0.0).then(|| evicted[i] / sent);
                eprintln!(
                    "bench: rep {rep} c={conc:<3} {:9} {:>8.0} req/s cpu/req {} RSS {} KiB, {:.2} evictions/request, errors {}",
                    cases[i].name,
                    rec.rps,
                    rec.proxy_cpu_us_per_req
                        .map_or_else(|| "–".to_owned(), |v| format!("{v:.1} µs")),
                    rss[i].unwrap_or(0),
                    evictions_per_req.unwrap_or(0.0),
                    rec.errors
                );
                runs.push(ProxyRun {
                    case: cases[i].name,
                    rec,
                    rss_kib: rss[i],
                    tracked,
                    evictions_per_req,
                });
            }
        }
    }
    drop(target);
    drop(backend);
    drop(tmp);
    drop(limit);
    Ok(ProxyResults {
        runs,
        cap,
        notes,
        pinned: s.harness_cpu.is_some(),
    })
}

// ---------------------------------------------------------------------------
// Entry point, settings, report
// ---------------------------------------------------------------------------

/// Resolved settings.
struct Settings {
    workflows: Vec<usize>,
    backends: Vec<usize>,
    decisions: usize,
    repeats: usize,
    new_fraction: f64,
    prompt_bytes: usize,
    full_backends: usize,
    seed: u64,
    concurrency: Vec<usize>,
    duration: Duration,
    warmup: Duration,
    slices: usize,
    proxy_max_workflows: usize,
    proxy_cpu_limit: f64,
    harness_cpu: Option<usize>,
    proxy_cpu: Option<usize>,
}

fn settings(a: &Args) -> Result<Settings> {
    let pin = !a.no_pin && procs::cpus() >= 2;
    let s = Settings {
        workflows: a.workflows.clone().unwrap_or_else(|| {
            if a.quick {
                vec![1_000, 10_000]
            } else {
                vec![1_000, 10_000, 100_000, 1_000_000]
            }
        }),
        backends: a.backends.clone().unwrap_or_else(|| {
            if a.quick {
                vec![4, 16]
            } else {
                vec![4, 16, 64, 256]
            }
        }),
        decisions: a
            .decisions
            .unwrap_or(if a.quick { 20_000 } else { 200_000 }),
        repeats: a.repeats.unwrap_or(if a.quick { 2 } else { 3 }),
        new_fraction: a.new_fraction,
        prompt_bytes: a.prompt_bytes,
        full_backends: a.full_backends,
        seed: a.seed,
        concurrency: a
            .concurrency
            .clone()
            .unwrap_or_else(|| if a.quick { vec![16] } else { vec![16, 64] }),
        duration: Duration::from_secs_f64(a.duration.unwrap_or(if a.quick { 1.5 } else { 6.0 })),
        warmup: Duration::from_secs_f64(a.warmup.unwrap_or(if a.quick { 0.3 } else { 1.0 })),
        slices: a.slices.unwrap_or(if a.quick { 1 } else { 6 }),
        proxy_max_workflows: a.proxy_max_workflows,
        proxy_cpu_limit: a.proxy_cpu_limit,
        harness_cpu: pin.then_some(0),
        proxy_cpu: pin.then_some(1),
    };
    if s.workflows.is_empty() || s.workflows.contains(&0) {
        bail!("--workflows needs positive values");
    }
    if s.backends.is_empty() || s.backends.contains(&0) || s.full_backends == 0 {
        bail!("--backends and --full-backends need positive values");
    }
    if s.concurrency.is_empty() || s.concurrency.contains(&0) {
        bail!("--concurrency needs positive values");
    }
    if s.decisions == 0 || s.repeats == 0 || s.slices == 0 || s.proxy_max_workflows == 0 {
        bail!("--decisions, --repeats, --slices and --proxy-max-workflows need positive values");
    }
    if !(0.0..=1.0).contains(&s.new_fraction) {
        bail!("--new-fraction must be within 0..=1");
    }
    if s.duration.is_zero() {
        bail!("--duration must be positive");
    }
    if s.proxy_cpu_limit < 0.0 {
        bail!("--proxy-cpu-limit must not be negative");
    }
    Ok(s)
}

/// Entry point: `cargo xtask bench control -- [OPTIONS]`.
pub fn run(root: &Path, args_in: &[String]) -> Result<()> {
    let Some(args) = super::parse_args::<Args>("bench-control", args_in)? else {
        return Ok(());
    };
    let s = settings(&args)?;
    let build_agentlb = !args.no_proxy && args.agentlb.is_none();
    let extra: &[&str] = if build_agentlb { &["lb-user"] } else { &[] };
    if super::run_in_release(root, "control", args_in, extra, args.no_build)? {
        return Ok(());
    }
    if build_agentlb && !args.no_build {
        crate::cargo(root, &["build", "--release", "--locked", "-p", "lb-user"])?;
    }
    let agentlb = args
        .agentlb
        .clone()
        .unwrap_or_else(|| super::release_dir(root).join("agentlb"));
    procs::install_interrupt_handler()?;
    // Before any pinning (the CPU count follows this thread's affinity).
    let machine = super::machine_line();
    let load_start = super::read_trim("/proc/loadavg");
    let began = Instant::now();
    let table = if args.no_table {
        None
    } else {
        Some(run_table(&s)?)
    };
    let table_secs = began.elapsed().as_secs_f64();
    let proxy = if args.no_proxy {
        None
    } else {
        Some(run_proxy(&s, &agentlb)?)
    };
    let elapsed = began.elapsed().as_secs_f64();
    let load_end = super::read_trim("/proc/loadavg");
    let meta = Meta {
        command: if args_in.is_empty() {
            "cargo xtask bench control".to_owned()
        } else {
            format!("cargo xtask bench control -- {}", args_in.join(" "))
        },
        date: today(),
        machine,
        lb_user: lb_user_version(root),
        load: format!("{load_start} / {load_end}"),
        elapsed,
        table_secs,
    };
    let md = markdown(&meta, &s, table.as_ref(), proxy.as_ref());
    println!("{md}");
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/bench"));
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let md_path = out.join("control.md");
    fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    let doc = json!({
        "benchmark": "control",
        "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "command": meta.command,
        "lb_user": meta.lb_user,
        "elapsed_secs": elapsed,
        "settings": {
            "workflows": s.workflows,
            "backends": s.backends,
            "decisions": s.decisions,
            "repeats": s.repeats,
            "new_fraction": s.new_fraction,
            "prompt_bytes": s.prompt_bytes,
            "full_backends": s.full_backends,
            "memory_backends": MEM_BACKENDS,
            "seed": s.seed,
            "workflow_id_bytes": load::workflow_id(0).len(),
            "concurrency": s.concurrency,
            "duration_secs": s.duration.as_secs_f64(),
            "warmup_secs": s.warmup.as_secs_f64(),
            "slices": s.slices,
            "proxy_max_workflows": s.proxy_max_workflows,
            "proxy_cpu_limit_cores": proxy.as_ref().and_then(|p| p.cap),
            "pinning": {"harness_cpu": s.harness_cpu, "proxy_cpu": s.proxy_cpu},
            "agentlb": agentlb.display().to_string(),
        },
        "machine": {
            "line": meta.machine,
            "loadavg_start_end": meta.load,
        },
        "timer_overhead_ns": table.as_ref().map(|t| json!({"p50": t.timer.0, "p99": t.timer.1})),
        "interruptions": table.as_ref().map(|t| t.interruptions),
        "slab_slot_bytes": table.as_ref().map(|t| t.slot_bytes),
        "latency": table.as_ref().map(|t| &t.cells),
        "memory": table.as_ref().map(|t| &t.memory),
        "proxy": proxy.as_ref().map(|p| &p.runs),
    });
    let json_path = out.join("control.json");
    fs::write(&json_path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!(
        "\nResults: {} and {}",
        md_path.display(),
        json_path.display()
    );
    if args.publish {
        let dest = root.join("bench/CONTROL.md");
        fs::create_dir_all(root.join("bench"))?;
        fs::write(&dest, &md).with_context(|| format!("writing {}", dest.display()))?;
        println!("Published to {}", dest.display());
    }
    Ok(())
}

/// Today's date (`date +%F`).
fn today() -> String {
    Command::new("date")
        .arg("+%F")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "an unknown date".to_owned(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        )
}

/// The commit lb-user was built from, and whether it had local changes.
fn lb_user_version(root: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(rev) => {
            let dirty =
                git(&["status", "--porcelain", "--", "lb-user"]).is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{rev} with uncommitted changes in lb-user")
            } else {
                rev
            }
        }
        None => "unknown (not a git checkout)".to_owned(),
    }
}

struct Meta {
    command: String,
    date: String,
    machine: String,
    lb_user: String,
    load: String,
    elapsed: f64,
    table_secs: f64,
}

fn stat_of<T>(xs: &[T], f: impl Fn(&T) -> Option<f64>) -> Option<Stat> {
    Stat::of(&xs.iter().filter_map(f).collect::<Vec<_>>())
}

/// `median [min–max]` scaled by `k`, `prec` decimals.
fn fmt_stat(s: Option<Stat>, k: f64, prec: usize) -> String {
    match s {
        None => "–".to_owned(),
        Some(s) if s.n == 1 || (s.max - s.min) * k < 0.5 * 10f64.powi(-(prec as i32)) => {
            format!("{:.prec$}", s.median * k)
        }
        Some(s) => format!(
            "{:.prec$} [{:.prec$}–{:.prec$}]",
            s.median * k,
            s.min * k,
            s.max * k
        ),
    }
}

fn fmt_med(s: Option<Stat>, k: f64, prec: usize) -> String {
    s.map_or_else(|| "–".to_owned(), |s| format!("{:.prec$}", s.median * k))
}

fn fmt_n(n: usize) -> String {
    match n {
        0 => "–".to_owned(),
        n => {
            let mut e = 0;
            let mut m = n;
            while m >= 10 && m.is_multiple_of(10) {
                m /= 10;
                e += 1;
            }
            if e >= 3 && m == 1 {
                format!("10^{e}")
            } else {
                n.to_string()
            }
        }
    }
}

/// The targets, met or missed.
fn targets_md(s: &Settings, t: Option<&TableResults>, p: Option<&ProxyResults>) -> String {
    let mut md = String::from("| target | measured | met |\n|---|---|---|\n");
    let mark = |ok: bool| if ok { "✓ met" } else { "✗ missed" };
    if let Some(t) = t {
        let at = s
            .workflows
            .iter()
            .copied()
            .filter(|&n| n <= TARGET_N)
            .max()
            .unwrap_or(0);
        let note = if at == TARGET_N {
            String::new()
        } else {
            format!(" (largest N run: {}, not 10^6)", fmt_n(at))
        };
        let mut worst: Option<(f64, usize)> = None;
        let mut parts = Vec::new();
        for c in t
            .cells
            .iter()
            .filter(|c| c.kind == "mixed" && c.workflows == at)
        {
            if let Some(st) = stat_of(&c.reps, |r| Some(r.p99)) {
                parts.push(format!("B={}: {:.2} µs", c.backends, st.median / 1000.0));
                if worst.is_none_or(|(w, _)| st.median > w) {
                    worst = Some((st.median, c.backends));
                }
            }
        }
        if let Some((w, b)) = worst {
            let _ = writeln!(
                md,
                "| decision p99 ≤ {TARGET_P99_US} µs at 10^6 live workflows, 4…256 backends | worst {:.2} µs (B={b}){note}; {} | {} |",
                w / 1000.0,
                parts.join(", "),
                mark(w / 1000.0 <= TARGET_P99_US)
            );
        }
        if let Some(m) = t.memory.iter().find(|m| m.workflows == at) {
            let _ = writeln!(
                md,
                "| ≤ {TARGET_BYTES} B per idle workflow at 10^6 | {:.0} B heap (glibc footprint; {:.0} B requested, RSS {:.0} B){note}; {:.0} B with its request's lineage entry | {} |",
                m.footprint,
                m.requested,
                m.rss,
                m.footprint + m.lineage,
                mark(m.footprint <= TARGET_BYTES)
            );
        }
    }
    if let Some(p) = p {
        for &conc in &s.concurrency {
            let ratios = proxy_ratios(p, conc);
            if let Some(st) = Stat::of(&ratios.iter().map(|r| r.0).collect::<Vec<_>>()) {
                let _ = writeln!(
                    md,
                    "| no throughput cliff at a full table: req/s new ids ÷ one fixed id ≥ {TARGET_RATIO:.2} (c={conc}) | {} (bound by {}) | {} |",
                    fmt_stat(Some(st), 1.0, 3),
                    majority(&ratios.iter().map(|r| r.2).collect::<Vec<_>>()),
                    mark(st.median >= TARGET_RATIO)
                );
            }
        }
    }
    md
}

/// Per repeat at `conc`: (req/s ratio new ÷ fixed, CPU/request ratio, bound).
fn proxy_ratios(p: &ProxyResults, conc: usize) -> Vec<(f64, Option<f64>, &'static str)> {
    let reps = p
        .runs
        .iter()
        .map(|r| r.rec.repeat)
        .max()
        .map_or(0, |m| m + 1);
    let cap = p.cap.unwrap_or(1.0);
    (0..reps)
        .filter_map(|rep| {
            let find = |case: &str| {
                p.runs
                    .iter()
                    .find(|r| r.case == case && r.rec.repeat == rep && r.rec.concurrency == conc)
            };
            let (a, b) = (find("new ids")?, find("fixed id")?);
            let cpu = match (a.rec.proxy_cpu_us_per_req, b.rec.proxy_cpu_us_per_req) {
                (Some(x), Some(y)) if y > 0.0 => Some(x / y),
                _ => None,
            };
            let bound = if a.rec.harness_cores.max(b.rec.harness_cores) >= SATURATED {
                "harness"
            } else if a
                .rec
                .proxy_cores
                .unwrap_or(0.0)
                .max(b.rec.proxy_cores.unwrap_or(0.0))
                >= SATURATED * cap
            {
                "proxy"
            } else {
                "latency"
            };
            (b.rec.rps > 0.0).then_some((a.rec.rps / b.rec.rps, cpu, bound))
        })
        .collect()
}

fn majority(v: &[&'static str]) -> &'static str {
    ["proxy", "harness", "latency"]
        .into_iter()
        .max_by_key(|k| v.iter().filter(|b| *b == k).count())
        .unwrap_or("latency")
}

fn markdown(
    meta: &Meta,
    s: &Settings,
    t: Option<&TableResults>,
    p: Option<&ProxyResults>,
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Control-plane benchmark results\n");
    let _ = writeln!(
        md,
        "`{}` on {}, {}; lb-user at {}. Load average before / after: {}. The whole run took {:.0} s ({:.0} s in process).\n",
        meta.command,
        meta.date,
        meta.machine,
        meta.lb_user,
        meta.load,
        meta.elapsed,
        meta.table_secs
    );
    let _ = writeln!(
        md,
        "Values are medians over {} repeat(s) with [min–max] where they differ. Workflow ids are UUID-shaped, `wf-` + 36 characters ({} bytes). The machine is shared (another engineer compiling at times): a busy spell shows as spread, mostly in p99.9 and max.\n",
        s.repeats,
        load::workflow_id(0).len()
    );
    let _ = writeln!(md, "## Targets (issue #11)\n");
    md.push_str(&targets_md(s, t, p));
    if let Some(t) = t {
        table_md(&mut md, s, t);
    }
    if let Some(p) = p {
        proxy_md(&mut md, s, p);
    }
    md
}

fn table_md(md: &mut String, s: &Settings, t: &TableResults) {
    let us = 1e-3;
    let _ = writeln!(
        md,
        "\n## Routing decision latency (in process)\n\n`Controller::pick` for one request: candidate filtering, the workflow table's lookup (or insert), the policy. Table filled with N idle workflows (each routed once and answered: `start` + `finish`); then {} timed decisions per repeat, {:.0}% for a workflow never seen (inserted, then removed untimed so N holds), the rest for an existing one drawn uniformly; existing ones are then answered (`start` + `finish`, timed apart: *bookkeeping*). Backends idle (no load reported), so every new workflow lands on its first rendezvous choice. {} Each call timed alone with `Instant` (timer overhead p50 {:.0} ns, p99 {:.0} ns, included; the allocator does not count during these runs). *Preempted*: involuntary context switches of the timing thread during a repeat (another process took the CPU). µs.\n",
        s.decisions,
        s.new_fraction * 100.0,
        if s.prompt_bytes > 0 {
            format!(
                "Each request carries the block hashes of a {}-byte prompt (half shared by all workflows, half its own) as the proxy computes them, so the decision includes the prefix index's lookup and insert (default `routing.prefix_index_*`).",
                s.prompt_bytes
            )
        } else {
            "Requests carry no prompt blocks (the prefix index is not consulted).".to_owned()
        },
        t.timer.0,
        t.timer.1
    );
    let i = t.interruptions;
    let _ = writeln!(
        md,
        "The machine interrupts a running thread about {:.0} times a second for a median {:.0} µs (p90 {:.0} µs): gaps of 5 µs or more in a loop that only reads the clock for 1 s (interrupts, VM exits, other processes). A call of d µs meets one with a probability of about d × {:.0}/s, so from about {:.0} µs per call p99 includes them, and p99.9 does for much shorter calls.\n",
        i.per_sec,
        i.median_us,
        i.p90_us,
        i.per_sec,
        if i.per_sec > 0.0 {
            0.01 / i.per_sec * 1e6
        } else {
            f64::INFINITY
        }
    );
    let _ = writeln!(
        md,
        "| policy | live workflows | backends | p50 | p99 | p99.9 | mean | existing p99 | new p99 | bookkeeping p50 / p99 | calls ≥ 20 µs, % | preempted | fill s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for c in t.cells.iter().filter(|c| c.kind != "full") {
        let f = |g: fn(&LatRep) -> Option<f64>, prec| fmt_stat(stat_of(&c.reps, g), us, prec);
        let med = |g: fn(&LatRep) -> Option<f64>, k, prec| fmt_med(stat_of(&c.reps, g), k, prec);
        let baseline = c.kind == "baseline";
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} |",
            c.policy,
            if baseline {
                "– (no table)".to_owned()
            } else {
                fmt_n(c.workflows)
            },
            c.backends,
            f(|r| Some(r.p50), 2),
            f(|r| Some(r.p99), 2),
            f(|r| Some(r.p999), 2),
            f(|r| Some(r.mean), 2),
            med(|r| r.hit_p99, us, 2),
            med(|r| r.new_p99, us, 2),
            med(|r| r.book_p50, us, 2),
            med(|r| r.book_p99, us, 2),
            med(
                |r| Some(100.0 * r.over_20us as f64 / r.decisions.max(1) as f64),
                1.0,
                2
            ),
            med(|r| Some(r.preempted as f64), 1.0, 0),
            if baseline {
                "–".to_owned()
            } else {
                format!("{:.1}", c.fill_secs)
            },
        );
    }
    // Where a decision's time goes, by backend count (p50).
    let _ = writeln!(
        md,
        "\nWhere the time of a decision goes, p50 µs by backend count, at the largest N: *candidates* = `round_robin`'s whole decision (the snapshot, one health/circuit check per backend); *ranking* = the workflow policy's full `rendezvous_order` alone (a hash per backend, then a sort), which it needs only to spill, move or adopt a workflow: a workflow at home under its bound is decided in O(1) (its home's checks against the cluster's cached mean load), a new one is placed in one pass without sorting; *prefix index* = the decision with the prompt's blocks minus one repeat without them (the chosen backend's match, then the insert of the blocks not recorded for it recently); *workflow* = the whole decision.\n\n| backends | candidates | ranking | prefix index | workflow | ranking ÷ workflow |\n|---:|---:|---:|---:|---:|---:|"
    );
    let top = s.workflows.iter().copied().max().unwrap_or(0);
    for c in t.cells.iter().filter(|c| c.kind == "baseline") {
        let cand = stat_of(&c.reps, |r| Some(r.p50)).map(|x| x.median);
        let cell = t
            .cells
            .iter()
            .find(|x| x.kind == "mixed" && x.backends == c.backends && x.workflows == top);
        let wf = cell
            .and_then(|x| stat_of(&x.reps, |r| Some(r.p50)))
            .map(|x| x.median);
        let without = cell.and_then(|x| x.no_prompt.as_ref()).map(|r| r.p50);
        let f = |x: Option<f64>| x.map_or_else(|| "–".to_owned(), |x| format!("{:.2}", x * us));
        let share = match (c.rendezvous_p50, wf) {
            (Some(r), Some(w)) if w > 0.0 => format!("{:.0}%", 100.0 * r / w),
            _ => "–".to_owned(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {share} |",
            c.backends,
            f(cand),
            f(c.rendezvous_p50),
            f(wf.zip(without).map(|(w, o)| w - o)),
            f(wf)
        );
    }
    let _ = writeln!(
        md,
        "\n### Full table: every decision inserts a new workflow and evicts one\n\n`max_workflows = N`, filled with N, then 2N decisions per repeat, each for a never-seen workflow (answered afterwards, so the entries evicted later are realistic), {} backends. µs.\n",
        s.full_backends
    );
    let _ = writeln!(
        md,
        "| table (N) | p50 | p99 | p99.9 | mean | max | evictions per decision | entries after | calls ≥ 20 µs, % | preempted |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for c in t.cells.iter().filter(|c| c.kind == "full") {
        let f = |g: fn(&LatRep) -> Option<f64>, prec| fmt_stat(stat_of(&c.reps, g), us, prec);
        let med = |g: fn(&LatRep) -> Option<f64>, k, prec| fmt_med(stat_of(&c.reps, g), k, prec);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            fmt_n(c.workflows),
            f(|r| Some(r.p50), 2),
            f(|r| Some(r.p99), 2),
            f(|r| Some(r.p999), 2),
            f(|r| Some(r.mean), 2),
            med(|r| Some(r.max), us, 0),
            fmt_stat(
                stat_of(&c.reps, |r| Some(
                    r.evictions as f64 / r.decisions.max(1) as f64
                )),
                1.0,
                3
            ),
            c.reps.last().map_or(0, |r| r.table_len),
            med(
                |r| Some(100.0 * r.over_20us as f64 / r.decisions.max(1) as f64),
                1.0,
                2
            ),
            med(|r| Some(r.preempted as f64), 1.0, 0),
        );
    }
    let _ = writeln!(
        md,
        "\n## Memory per idle workflow\n\nA fresh table ({MEM_BACKENDS} backends) filled with N workflows, each routed once and answered once; exact live heap bytes from a counting global allocator, per workflow. *Footprint* = glibc's usable size of every block + its 8-byte header (what the heap holds); *requested* = what the code asked for; RSS growth (after `malloc_trim`) as a cross-check. *Bulk* = blocks ≥ 4 KiB: the shards' slabs and hash tables, capacity slack included. *Lineage* = the separate request id → workflow map (bounded by `max_lineage`, default 100,000, not by the workflow count), per entry. The memory runs' requests carry no prompt blocks: the prefix index is bounded on its own (`routing.prefix_index_blocks`). These columns leave room for 2N (`max_workflows = 2N`) so that no shard evicts; *full table* = `max_workflows = N`, filled with N, then 2N new workflows each evicting one. Bytes.\n"
    );
    let _ = writeln!(
        md,
        "| live workflows | footprint | requested | RSS growth | allocations | bulk (slab + hash) | id string | per-backend counts | lineage entry | full table: footprint / entry | after 2N evictions | RSS growth over them / entry |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for m in &t.memory {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} ({} entries) | {:.0} |",
            fmt_n(m.workflows),
            m.footprint,
            m.requested,
            m.rss,
            m.allocs,
            m.bulk,
            m.small_route,
            m.small_answer,
            m.lineage,
            m.full_fill,
            m.full_churned,
            m.full_len,
            m.full_churn_rss,
        );
    }
    if let Some(m) = t.memory.iter().max_by_key(|m| m.workflows) {
        let id = load::workflow_id(0).len();
        let _ = writeln!(
            md,
            "\nAt {} workflows, per entry: slab slot {:.0} B (the size of the table's slot, measured on a one-shard table of 512), slab capacity slack + hash buckets {:.0} B, id string {:.0} B (a {id}-byte `Box<str>`: {} B usable + 8 B header), per-backend counts {:.0} B (a `Vec<(u32, u32)>` of capacity 4: 32 B + 16 B rounding and header); total {:.0} B.",
            fmt_n(m.workflows),
            t.slot_bytes,
            m.bulk - t.slot_bytes,
            m.small_route,
            (id + 8).div_ceil(16) * 16 - 8,
            m.small_answer,
            m.footprint
        );
    }
}

fn proxy_md(md: &mut String, s: &Settings, p: &ProxyResults) {
    let cap = p.cap.map_or_else(
        || "uncapped".to_owned(),
        |c| format!("capped at {c:.2} of a core (CFS, 10 ms period)"),
    );
    let pin = if p.pinned {
        "agentlb pinned to CPU 1, load generator + backend to CPU 0"
    } else {
        "no pinning"
    };
    let _ = writeln!(
        md,
        "\n## Throughput through the proxy at a full table\n\nOne `agentlb run --no-kernel --workers 1 --policy workflow` with `[workflows] max_workflows = {}`, {cap}; {pin}. Small non-streaming completions from the built-in backend of `bench proxy`. Its table is filled with new ids first; then the two cases take turns against it: *new ids* = a new `X-Workflow-Id` on every request, so each one inserts a workflow and evicts one; *fixed id* = one id on every request, found in that full table every time. Both go to the same process (two processes sent identical traffic differed by up to 7% at c=64). Per case, repeat and concurrency {:.1} s measured (+{:.1} s warm-up) in {} slice(s), the order reversed every other slice; ratios within each repeat. The cap throttles agentlb in 10 ms periods, hence the millisecond latencies.\n",
        s.proxy_max_workflows,
        s.duration.as_secs_f64(),
        s.warmup.as_secs_f64(),
        s.slices
    );
    let _ = writeln!(
        md,
        "| conc | case | req/s | p50 µs | p99 µs | agentlb CPU µs/req | agentlb cores | client+backend cores | agentlb RSS MiB after | workflows tracked | evictions per request | errors |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for &conc in &s.concurrency {
        for case in ["new ids", "fixed id"] {
            let rs: Vec<&ProxyRun> = p
                .runs
                .iter()
                .filter(|r| r.case == case && r.rec.concurrency == conc)
                .collect();
            if rs.is_empty() {
                continue;
            }
            let st = |f: &dyn Fn(&ProxyRun) -> Option<f64>| {
                Stat::of(&rs.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
            };
            let _ = writeln!(
                md,
                "| {conc} | {case} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                fmt_stat(st(&|r| Some(r.rec.rps)), 1.0, 0),
                fmt_med(st(&|r| Some(r.rec.p50_us)), 1.0, 0),
                fmt_med(st(&|r| Some(r.rec.p99_us)), 1.0, 0),
                fmt_stat(st(&|r| r.rec.proxy_cpu_us_per_req), 1.0, 1),
                fmt_med(st(&|r| r.rec.proxy_cores), 1.0, 2),
                fmt_med(st(&|r| Some(r.rec.harness_cores)), 1.0, 2),
                fmt_stat(st(&|r| r.rss_kib.map(|k| k as f64 / 1024.0)), 1.0, 1),
                fmt_med(st(&|r| r.tracked), 1.0, 0),
                fmt_med(st(&|r| r.evictions_per_req), 1.0, 2),
                rs.iter().map(|r| r.rec.errors).sum::<u64>(),
            );
        }
    }
    let _ = writeln!(
        md,
        "\n| conc | req/s new ÷ fixed | CPU/request new ÷ fixed | req/s bound by |\n|---:|---:|---:|---|"
    );
    for &conc in &s.concurrency {
        let r = proxy_ratios(p, conc);
        let _ = writeln!(
            md,
            "| {conc} | {} | {} | {} |",
            fmt_stat(Stat::of(&r.iter().map(|x| x.0).collect::<Vec<_>>()), 1.0, 3),
            fmt_stat(
                Stat::of(&r.iter().filter_map(|x| x.1).collect::<Vec<_>>()),
                1.0,
                3
            ),
            majority(&r.iter().map(|x| x.2).collect::<Vec<_>>()),
        );
    }
    let _ = writeln!(
        md,
        "\n\"Bound by\": `proxy` = agentlb used ≥ 95% of the CPU it may, so req/s measures it; `harness` = the load generator + backend core was saturated, so req/s measures the client and CPU/request is the comparison; `latency` = neither."
    );
    for n in &p.notes {
        let _ = writeln!(md, "\n- {n}");
    }
}
