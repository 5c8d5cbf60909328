//! `cargo xtask bench proxy`: what agentlb's userspace proxy path costs.
//!
//! Measures requests/s, latency p50/p99 (and time to first chunk for streams) and
//! CPU per request of the proxy process for these targets, all on 127.0.0.1 in the
//! same run:
//!
//! - `direct`: the load generator talks to the backend itself (the baseline for
//!   added latency);
//! - `agentlb`: `agentlb run --no-kernel --workers N` (userspace path), N from
//!   `--agentlb-threads` (default 1);
//! - `nginx`: a plain reverse proxy, `worker_processes 1`, upstream keep-alive,
//!   `proxy_http_version 1.1`, `proxy_buffering off`. With `--nginx-headers same`
//!   (the default) it also does the header work agentlb does on every request:
//!   forwards `X-Request-Id` or generates one, echoes it to the client, appends
//!   `X-Forwarded-For` and names the upstream in a response header. So both
//!   proxies send the backend and the client the same header fields, and in cells
//!   where the load generator's core is the bottleneck neither is charged for
//!   the other's longer heads. `--nginx-headers plain` leaves those out;
//! - `vllm-router` 0.1.17 (pip, in `target/venv-bench`), `--policy round_robin`,
//!   for reference;
//! - `agentlb-kernel` (root only; not in the default targets): agentlb with the
//!   kernel fast path, `kernel.mode = "required"`, `kernel.pinning = true`, so
//!   each connection is handed to the kernel's sockmap after its first request.
//!   Both agentlb targets are sent an `X-Workflow-Id` (pinning needs one).
//!   `cargo xtask bench dataplane` runs this comparison (see [`dataplane`]).
//!
//! Besides the proxy's own CPU (its process tree), every cell reports the busy
//! CPU of the whole machine minus this process (load generator and backend) per
//! request: the proxy plus the kernel work done for it that no process is
//! charged with (softirq, the sockmap's redirect kworkers), which is where the
//! kernel path spends its CPU.
//!
//! Workloads: `small` (a small non-streaming `/v1/completions`) and `stream` (an
//! SSE response of `--chunks` events, default 100, then `[DONE]`). The backend is
//! built in ([`backend`]): vllm-sim runs a scheduler step per token, which would
//! make the backend, not the proxy, the cost being measured.
//!
//! Layout on a machine with ≥ 2 CPUs (unless `--no-pin`): every proxy process is
//! pinned to CPU 1, the load generator and the backend (two threads of this
//! process) to CPU 0. So each proxy gets exactly one core, and nginx (one worker)
//! and agentlb (one tokio worker) are compared on equal terms. The load generator
//! and the backend together cost about as much per request as a proxy, so from
//! concurrency 16 their core saturates first; `--proxy-cpu-limit F` caps every
//! proxy at F cores ([`cgroup`]) so that requests/s measures the proxy again.
//!
//! Every (repeat, workload, concurrency) cell cuts its window into `--slices`
//! parts and the targets take turns slice by slice (in reverse order on every
//! other slice), so a ratio taken within a repeat compares runs interleaved
//! within seconds, and a slowdown of this shared machine falls on all targets
//! alike; repeats give the median and min–max spread. Output: Markdown on stdout
//! and every raw number, with the settings and machine, in
//! `target/bench/proxy.json`.

pub mod agentic;
mod backend;
mod cgroup;
pub mod control;
mod instr;
pub mod kv;
mod load;
mod plots;
mod procs;
mod report;
pub mod storm;

use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::json;

use self::{
    backend::Backend,
    load::{CpuSample, LoadSpec},
    procs::{ChildGuard, TempDir},
    report::Record,
};

/// Set when a debug xtask hands the benchmark over to its release build.
const REEXEC_ENV: &str = "AGENTLB_BENCH_RELEASE";
pub const VLLM_ROUTER_VERSION: &str = "0.1.17";
const ALL_TARGETS: [&str; 5] = [
    "direct",
    "agentlb",
    "agentlb-kernel",
    "nginx",
    "vllm-router",
];

/// Options of `cargo xtask bench proxy -- [OPTIONS]`.
///
/// A debug build of xtask (as `cargo xtask` makes) builds `xtask` in release and
/// runs the benchmark there, since the load generator runs in this process.
#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask bench proxy --",
    about = "Proxy overhead of agentlb vs direct, nginx and vllm-router"
)]
struct Args {
    /// Small settings (~1 minute): concurrency 1,16, 2 repeats, 1 s windows.
    #[arg(long)]
    quick: bool,
    /// Concurrency levels (default 1,16,64).
    #[arg(long, value_delimiter = ',')]
    concurrency: Option<Vec<usize>>,
    /// Repeats of the whole matrix (default 3).
    #[arg(long)]
    repeats: Option<usize>,
    /// Measured window of each run, seconds (default 4).
    #[arg(long)]
    duration: Option<f64>,
    /// Unmeasured warm-up before each window, seconds (default 1).
    #[arg(long)]
    warmup: Option<f64>,
    /// Cut each window (and its warm-up) into this many slices, the targets
    /// taking turns slice by slice (default 4; 1 with --quick).
    #[arg(long)]
    slices: Option<usize>,
    /// Targets to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,agentlb,nginx,vllm-router"
    )]
    targets: Vec<String>,
    /// Workloads: small, stream.
    #[arg(long, value_delimiter = ',', default_value = "small,stream")]
    workloads: Vec<String>,
    /// SSE events per streamed response (before `[DONE]`).
    #[arg(long, default_value_t = 100)]
    chunks: usize,
    /// Worker threads of agentlb (`agentlb run --workers`).
    #[arg(long, default_value_t = 1)]
    agentlb_threads: usize,
    /// Do not pin processes to CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Cap every proxy at this many cores (CFS bandwidth in a child cgroup; needs
    /// root). Makes the proxy, not the load generator, the bottleneck, so
    /// requests/s compares what each proxy serves on the same CPU.
    #[arg(long)]
    proxy_cpu_limit: Option<f64>,
    /// Do not build agentlb first (use the existing release binary).
    #[arg(long)]
    no_build: bool,
    /// Do not create the vllm-router venv when it is missing (skip it instead).
    #[arg(long)]
    no_install: bool,
    /// nginx binary.
    #[arg(long, default_value = "nginx")]
    nginx: String,
    /// Header work of nginx: `same` = the fields agentlb adds (request id
    /// forwarded or generated and echoed, X-Forwarded-For, upstream address in
    /// the response); `plain` = none of them.
    #[arg(long, value_enum, default_value_t = NginxHeaders::Same)]
    nginx_headers: NginxHeaders,
    /// agentlb binary to use instead of building `target/release/agentlb`
    /// (implies not building it).
    #[arg(long)]
    agentlb: Option<PathBuf>,
    /// Also count user-space instructions per request of agentlb and nginx with
    /// callgrind (valgrind): N measured requests per target and workload; 0 = off.
    #[arg(long, default_value_t = 0)]
    instructions: usize,
    /// Only the instruction counts (no timed runs); needs --instructions.
    #[arg(long)]
    instructions_only: bool,
    /// JSON output (default: <workspace>/target/bench/proxy.json).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Which header fields the benchmark's nginx adds (see the module docs).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum NginxHeaders {
    /// The fields agentlb adds to requests and responses.
    Same,
    /// None: nginx's defaults.
    Plain,
}

/// Resolved settings of one benchmark run.
struct Settings {
    concurrency: Vec<usize>,
    repeats: usize,
    duration: Duration,
    warmup: Duration,
    /// Turns each target takes per window.
    slices: usize,
    workloads: Vec<String>,
    chunks: usize,
    harness_cpu: Option<usize>,
    proxy_cpu: Option<usize>,
    /// CPU cap of the proxies, if any.
    cpu_limit: Option<cgroup::CpuLimit>,
    nginx_headers: NginxHeaders,
}

/// A proxy (or the backend itself) the load is sent to.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    proc: Option<ChildGuard>,
}

/// Parses a benchmark's options (`name` is the program name in help and errors); `None`
/// when `--help` or `--version` was printed instead.
pub fn parse_args<A: Parser>(name: &str, args_in: &[String]) -> Result<Option<A>> {
    match A::try_parse_from(std::iter::once(name).chain(args_in.iter().map(String::as_str))) {
        Ok(a) => Ok(Some(a)),
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            print!("{e}");
            Ok(None)
        }
        Err(e) => bail!("{e}"),
    }
}

/// `cargo xtask bench dataplane -- [OPTIONS]`: `bench proxy` comparing the
/// userspace path, the kernel path and nginx on streamed responses at 100, 500
/// and 2,000 concurrent streams and on small requests (the defaults; any
/// `bench proxy` option given afterwards overrides them).
pub fn dataplane(root: &Path, args_in: &[String]) -> Result<()> {
    let out = root.join("target/bench/dataplane.json");
    let mut args: Vec<String> = [
        "--targets",
        "direct,agentlb,agentlb-kernel,nginx",
        "--workloads",
        "stream,small",
        "--concurrency",
        "100,500,2000",
        "--out",
        &out.display().to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    // Drop the defaults the caller gives itself (clap would reject a repeat).
    for flag in ["--targets", "--workloads", "--concurrency", "--out"] {
        if args_in
            .iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
            && let Some(i) = args.iter().position(|a| a == flag)
        {
            args.drain(i..i + 2);
        }
    }
    args.extend(args_in.iter().cloned());
    proxy(root, &args)
}

/// Entry point: `cargo xtask bench proxy -- [OPTIONS]`.
pub fn proxy(root: &Path, args_in: &[String]) -> Result<()> {
    let Some(args) = parse_args::<Args>("bench-proxy", args_in)? else {
        return Ok(());
    };
    for t in &args.targets {
        if !ALL_TARGETS.contains(&t.as_str()) {
            bail!("unknown target {t:?} (expected one of {ALL_TARGETS:?})");
        }
    }
    for w in &args.workloads {
        if w != "small" && w != "stream" {
            bail!("unknown workload {w:?} (expected small or stream)");
        }
    }
    let pin = !args.no_pin && procs::cpus() >= 2;
    let settings = Settings {
        concurrency: args.concurrency.clone().unwrap_or_else(|| {
            if args.quick {
                vec![1, 16]
            } else {
                vec![1, 16, 64]
            }
        }),
        repeats: args
            .repeats
            .unwrap_or(if args.quick { 2 } else { 3 })
            .max(1),
        duration: Duration::from_secs_f64(args.duration.unwrap_or(if args.quick {
            1.0
        } else {
            4.0
        })),
        warmup: Duration::from_secs_f64(args.warmup.unwrap_or(if args.quick { 0.3 } else { 1.0 })),
        slices: args
            .slices
            .unwrap_or(if args.quick { 1 } else { 4 })
            .clamp(1, 1000),
        workloads: args.workloads.clone(),
        chunks: args.chunks,
        harness_cpu: pin.then_some(0),
        proxy_cpu: pin.then_some(1),
        cpu_limit: args
            .proxy_cpu_limit
            .map(cgroup::CpuLimit::new)
            .transpose()?,
        nginx_headers: args.nginx_headers,
    };
    if settings.concurrency.is_empty() || settings.concurrency.contains(&0) {
        bail!("--concurrency needs positive values");
    }
    let wants = |t: &str| args.targets.iter().any(|x| x == t);
    let mut notes: Vec<String> = Vec::new();

    // Binaries. The load generator and the backend live in this process: an
    // unoptimised build would measure itself.
    let bin_dir = release_dir(root);
    let extra: &[&str] = if wants("agentlb") && args.agentlb.is_none() {
        &["lb-user"]
    } else {
        &[]
    };
    if run_in_release(root, "proxy", args_in, extra, args.no_build)? {
        return Ok(());
    }
    if wants("agentlb") && !args.no_build && args.agentlb.is_none() {
        crate::cargo(root, &["build", "--release", "--locked", "-p", "lb-user"])?;
    }
    let agentlb = args
        .agentlb
        .clone()
        .unwrap_or_else(|| bin_dir.join("agentlb"));
    let nginx = which(&args.nginx);
    let router = if wants("vllm-router") {
        match vllm_router(root, args.no_install) {
            Ok(p) => Some(p),
            Err(e) => {
                notes.push(format!("vllm-router skipped: {e:#}"));
                None
            }
        }
    } else {
        None
    };

    procs::install_interrupt_handler()?;
    let tmp = TempDir::new("agentlb-bench-proxy")?;
    if let Some(cpu) = settings.harness_cpu {
        procs::pin_current_thread(cpu)?;
    }
    let backend = Backend::start(settings.chunks, settings.harness_cpu)?;
    let small_body = backend::request_body(false);
    let small_len = backend::expected_len(false, settings.chunks);

    // Instruction counts first: nothing else runs meanwhile.
    if args.instructions_only && args.instructions == 0 {
        bail!("--instructions-only needs --instructions N");
    }
    let instructions = if args.instructions == 0 {
        None
    } else if !instr::available() {
        notes.push("instruction counts skipped: valgrind is not installed".to_owned());
        None
    } else {
        Some(count_instructions(
            &args,
            &settings,
            &agentlb,
            nginx.as_deref(),
            backend.addr,
            &tmp,
        )?)
    };
    if args.instructions_only {
        if let Some(v) = &instructions {
            println!("{}", instructions_markdown(v, &settings.workloads));
            let out = args
                .out
                .clone()
                .unwrap_or_else(|| root.join("target/bench/proxy-instructions.json"));
            if let Some(dir) = out.parent() {
                fs::create_dir_all(dir)?;
            }
            fs::write(&out, serde_json::to_string_pretty(v)?)?;
            println!("\nRaw numbers: {}", out.display());
        } else {
            println!("{}", notes.join("\n"));
        }
        return Ok(());
    }

    // Removed after the targets stop (declared first, dropped last).
    let _pins = PinCleanup(wants("agentlb-kernel").then(kernel_pin_dir));
    // Start every requested target once, up front.
    let mut targets: Vec<Target> = Vec::new();
    for &name in ALL_TARGETS.iter().filter(|t| wants(t)) {
        let started = match name {
            "direct" => Ok(Target {
                name,
                addr: backend.addr,
                proc: None,
            }),
            "agentlb" => start_agentlb(
                &agentlb,
                backend.addr,
                &tmp,
                &settings,
                args.agentlb_threads,
            ),
            "agentlb-kernel" => start_agentlb_kernel(
                &agentlb,
                backend.addr,
                &tmp,
                &settings,
                args.agentlb_threads,
            ),
            "nginx" => match &nginx {
                Some(bin) => start_nginx(bin, backend.addr, &tmp, &settings),
                None => Err(anyhow::anyhow!(
                    "`{}` not found (apt-get install -y nginx-light)",
                    args.nginx
                )),
            },
            _ => match &router {
                Some(bin) => start_router(bin, backend.addr, &tmp, &settings),
                None => continue,
            },
        };
        let mut t = match started {
            Ok(t) => t,
            Err(e) => {
                notes.push(format!("{name} skipped: {e:#}"));
                eprintln!("bench: {name} skipped: {e:#}");
                continue;
            }
        };
        if let Some(p) = t.proc.as_mut() {
            let timeout = Duration::from_secs(if name == "vllm-router" { 60 } else { 20 });
            if let Err(e) = procs::wait_ready(t.addr, &small_body, small_len, p, timeout) {
                notes.push(format!("{name} skipped: {e:#}"));
                eprintln!("bench: {name} skipped: {e:#}");
                continue;
            }
        }
        eprintln!("bench: {name} ready on {}", t.addr);
        targets.push(t);
    }
    if targets.is_empty() {
        bail!("no target could be started");
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("load generator runtime")?;
    let tck = procs::ticks_per_sec();
    let load_start = read_trim("/proc/loadavg");
    let began = Instant::now();
    let mut records: Vec<Record> = Vec::new();
    let total_runs =
        settings.repeats * settings.workloads.len() * settings.concurrency.len() * targets.len();
    for rep in 0..settings.repeats {
        for wl in &settings.workloads {
            let stream = wl == "stream";
            for &conc in &settings.concurrency {
                // The window is cut into `slices` parts and the targets take
                // turns, slice by slice: a slowdown of the machine lasting a
                // second or two then falls on every target instead of one.
                // Odd slices run the targets in reverse order, so no target
                // always follows the same neighbour.
                let n = targets.len();
                let mut results: Vec<Option<load::LoadResult>> = (0..n).map(|_| None).collect();
                // The proxies' process trees, found once per cell (a /proc scan).
                let pids: Vec<Vec<i32>> = targets
                    .iter()
                    .map(|t| t.proc.as_ref().map(ChildGuard::pids).unwrap_or_default())
                    .collect();
                for slice in 0..settings.slices {
                    let order: Vec<usize> = if (rep * settings.slices + slice).is_multiple_of(2) {
                        (0..n).collect()
                    } else {
                        (0..n).rev().collect()
                    };
                    for &i in &order {
                        let t = &mut targets[i];
                        procs::check_interrupted()?;
                        if let Some(p) = t.proc.as_mut() {
                            p.check_alive()?;
                        }
                        let pids = &pids[i];
                        let spec = LoadSpec {
                            addr: t.addr,
                            path: "/v1/completions",
                            body: backend::request_body(stream),
                            expect_len: backend::expected_len(stream, settings.chunks),
                            concurrency: conc,
                            warmup: settings.warmup / settings.slices as u32,
                            duration: settings.duration / settings.slices as u32,
                            // Both agentlb paths see a workflow id: the kernel
                            // one needs it to hand connections over.
                            workflow_ids: if t.name.starts_with("agentlb") {
                                load::WorkflowIds::Fixed
                            } else {
                                load::WorkflowIds::None
                            },
                        };
                        let backend_ref = &backend;
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
                        let res = rt.block_on(load::run(&spec, &sampler))?;
                        match &mut results[i] {
                            Some(acc) => acc.absorb(res),
                            slot @ None => *slot = Some(res),
                        }
                    }
                }
                for (i, res) in results.into_iter().enumerate() {
                    let Some(res) = res else { continue };
                    let t = &targets[i];
                    let rec = record(rep, t, wl, conc, &res, tck);
                    eprintln!(
                        "bench: [{}/{total_runs}] rep {rep} {wl:6} c={conc:<3} {:11} {:>8.0} req/s p50 {:>7.0} µs p99 {:>7.0} µs cpu/req {} err {}",
                        records.len() + 1,
                        t.name,
                        rec.rps,
                        rec.p50_us,
                        rec.p99_us,
                        rec.proxy_cpu_us_per_req
                            .map_or_else(|| "–".to_owned(), |c| format!("{c:.1} µs")),
                        rec.errors,
                    );
                    records.push(rec);
                }
            }
        }
    }
    let elapsed = began.elapsed().as_secs_f64();
    let load_end = read_trim("/proc/loadavg");

    let summaries = report::summarize(&records);
    let cap = settings
        .cpu_limit
        .as_ref()
        .map_or(1.0, cgroup::CpuLimit::fraction);
    let ratios = report::ratios(&records, cap);
    notes.push(layout_note(&settings, args.agentlb_threads));
    notes.push(
        "frames/resp: body frames the client read per streamed response (chunks + 1 = every SSE event in its own write; fewer = the proxy coalesced events that arrived together)".to_owned(),
    );
    if let Some(l) = &settings.cpu_limit {
        notes.push(format!(
            "every proxy capped at {:.2} of a core (CFS bandwidth, 10 ms period): the proxy, not the load generator, is the bottleneck, so req/s is what each proxy serves on that CPU",
            l.fraction()
        ));
    } else if settings.harness_cpu.is_some() {
        notes.push(
            "client+backend cores near 1.00: the harness core was saturated, so req/s there is bounded by the load generator, not by the proxy; CPU/req stays comparable".to_owned(),
        );
    }
    notes.push(
        "run-queue wait: time the proxy's (or the harness's) threads were runnable but not running, per second of window, from schedstat; for the proxy, well above 0 means other work on its core took the CPU; the harness figure also counts the load generator and the backend waiting for each other on their shared core".to_owned(),
    );
    notes.push(format!(
        "load average before/after: {load_start} / {load_end}; other work on the machine shows up as noise"
    ));
    let md = report::markdown(&summaries, &ratios, &notes);
    let mut header = String::new();
    let _ = writeln!(
        header,
        "## bench proxy: {} repeat(s) × {:.1} s windows (+{:.1} s warm-up) in {} interleaved slice(s), concurrency {:?}, {} chunks per stream; {:.0} s",
        settings.repeats,
        settings.duration.as_secs_f64(),
        settings.warmup.as_secs_f64(),
        settings.slices,
        settings.concurrency,
        settings.chunks,
        elapsed
    );
    let _ = writeln!(
        header,
        "\nBackend: built-in hyper HTTP/1.1 server. Values: median [min–max] over repeats; \"added\" = target − direct in the same repeat."
    );
    let instr_md = instructions
        .as_ref()
        .map(|v| instructions_markdown(v, &settings.workloads))
        .unwrap_or_default();
    println!("{header}{md}{instr_md}");

    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/bench/proxy.json"));
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let doc = json!({
        "benchmark": "proxy",
        "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "elapsed_secs": elapsed,
        "settings": {
            "targets": targets.iter().map(|t| t.name).collect::<Vec<_>>(),
            "workloads": settings.workloads,
            "concurrency": settings.concurrency,
            "repeats": settings.repeats,
            "duration_secs": settings.duration.as_secs_f64(),
            "warmup_secs": settings.warmup.as_secs_f64(),
            "slices": settings.slices,
            "chunks": settings.chunks,
            "agentlb_worker_threads": args.agentlb_threads,
            "pinning": {"harness_cpu": settings.harness_cpu, "proxy_cpu": settings.proxy_cpu},
            "proxy_cpu_limit_cores": settings.cpu_limit.as_ref().map(cgroup::CpuLimit::fraction),
            "backend": "built-in hyper HTTP/1.1 (xtask/src/bench/backend.rs)",
            "small_request_bytes": small_body.len(),
            "small_response_bytes": small_len,
            "stream_response_bytes": backend::expected_len(true, settings.chunks),
            "nginx": nginx.as_ref().map(|p| p.display().to_string()),
            "nginx_version": nginx.as_ref().map(|p| nginx_version(p)),
            "nginx_headers": clap::ValueEnum::to_possible_value(&settings.nginx_headers)
                .map(|v| v.get_name().to_owned()),
            "vllm_router_version": router.as_ref().map(|_| VLLM_ROUTER_VERSION),
            "agentlb": agentlb.display().to_string(),
        },
        "machine": {
            "cpu_model": cpu_model(),
            "cpus": procs::cpus(),
            "kernel": read_trim("/proc/sys/kernel/osrelease"),
            "loadavg_start": load_start,
            "loadavg_end": load_end,
            "clock_ticks_per_sec": tck,
        },
        "instructions": instructions,
        "records": records,
        "summaries": summaries,
        "ratios": ratios,
        "notes": notes,
    });
    fs::write(&out, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("\nRaw numbers: {}", out.display());
    // Targets (child guards), the backend and the temp dir are dropped here, in
    // that order; on an early `?` return the same drops run.
    drop(targets);
    drop(backend);
    drop(tmp);
    Ok(())
}

fn record(
    rep: usize,
    t: &Target,
    wl: &str,
    conc: usize,
    res: &load::LoadResult,
    tck: f64,
) -> Record {
    let us = |ns: u64| ns as f64 / 1000.0;
    let n = res.requests.max(1) as f64;
    let proxy_secs = res.cpu.1.proxy.saturating_sub(res.cpu.0.proxy) as f64 / tck;
    let backend_secs = res.cpu.1.backend.saturating_sub(res.cpu.0.backend) as f64 / tck;
    let harness_secs = res.cpu.1.harness.saturating_sub(res.cpu.0.harness) as f64 / tck;
    let system_secs = res.cpu.1.system.saturating_sub(res.cpu.0.system) as f64 / tck;
    let has_proxy = t.proc.is_some();
    Record {
        repeat: rep,
        target: t.name.to_owned(),
        workload: wl.to_owned(),
        concurrency: conc,
        requests: res.requests,
        errors: res.errors,
        reconnects: res.reconnects,
        secs: res.secs,
        rps: res.requests as f64 / res.secs.max(1e-9),
        p50_us: us(load::quantile(&res.total_ns, 0.50)),
        p90_us: us(load::quantile(&res.total_ns, 0.90)),
        p99_us: us(load::quantile(&res.total_ns, 0.99)),
        max_us: us(load::quantile(&res.total_ns, 1.0)),
        ttfb_p50_us: us(load::quantile(&res.ttfb_ns, 0.50)),
        ttfb_p99_us: us(load::quantile(&res.ttfb_ns, 0.99)),
        frames_per_resp: res.frames_per_resp,
        proxy_cpu_us_per_req: (has_proxy && res.requests > 0).then(|| proxy_secs * 1e6 / n),
        proxy_cores: has_proxy.then(|| proxy_secs / res.secs.max(1e-9)),
        backend_cpu_us_per_req: backend_secs * 1e6 / n,
        path_cpu_us_per_req: (system_secs - harness_secs).max(0.0) * 1e6 / n,
        harness_cores: harness_secs / res.secs.max(1e-9),
        proxy_wait_frac: has_proxy.then(|| {
            res.cpu
                .1
                .proxy_wait_ns
                .saturating_sub(res.cpu.0.proxy_wait_ns) as f64
                / 1e9
                / res.secs.max(1e-9)
        }),
        harness_wait_frac: res
            .cpu
            .1
            .harness_wait_ns
            .saturating_sub(res.cpu.0.harness_wait_ns) as f64
            / 1e9
            / res.secs.max(1e-9),
    }
}

fn layout_note(s: &Settings, agentlb_threads: usize) -> String {
    let nginx_headers = match s.nginx_headers {
        NginxHeaders::Same => {
            "as agentlb's (X-Request-Id forwarded or generated and echoed, X-Forwarded-For, upstream address in the response)"
        }
        NginxHeaders::Plain => "none (nginx defaults)",
    };
    let pin = match (s.harness_cpu, s.proxy_cpu) {
        (Some(h), Some(p)) => format!(
            "each proxy pinned to CPU {p} (one core), load generator + backend pinned to CPU {h}"
        ),
        _ => "no CPU pinning".to_owned(),
    };
    format!(
        "{pin}; agentlb: --workers {agentlb_threads}, --no-kernel; nginx: worker_processes 1, upstream keepalive, proxy_buffering off, header work {nginx_headers}; vllm-router: --policy round_robin, default threads; proxy CPU = utime+stime of the proxy's process tree (10 ms ticks)"
    )
}

/// `agentlb run [--config CONFIG] [--no-kernel] --listen 127.0.0.1:<free>
/// --admin 127.0.0.1:<free> --backend http://BACKEND --workers N` (the kernel
/// path only with `kernel`), with its proxy and admin ports.
pub fn agentlb_command(
    bin: &Path,
    config: Option<&Path>,
    kernel: bool,
    backend: SocketAddr,
    workers: usize,
) -> Result<(Command, u16, u16)> {
    if !bin.exists() {
        bail!(
            "{} missing (cargo build --release -p lb-user)",
            bin.display()
        );
    }
    let port = procs::free_port()?;
    let admin = procs::free_port()?;
    let mut cmd = Command::new(bin);
    cmd.arg("run");
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    if !kernel {
        cmd.arg("--no-kernel");
    }
    cmd.args([
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--admin",
        &format!("127.0.0.1:{admin}"),
        "--backend",
        &format!("http://{backend}"),
        "--workers",
        &workers.to_string(),
    ]);
    Ok((cmd, port, admin))
}

fn start_agentlb(
    bin: &Path,
    backend: SocketAddr,
    tmp: &TempDir,
    s: &Settings,
    threads: usize,
) -> Result<Target> {
    let (cmd, port, _) = agentlb_command(bin, None, false, backend, threads)?;
    spawn_proxy("agentlb", cmd, port, tmp, s)
}

/// Removes the `agentlb-kernel` pin directory on drop.
struct PinCleanup(Option<PathBuf>);

impl Drop for PinCleanup {
    fn drop(&mut self) {
        if let Some(d) = &self.0 {
            let _ = fs::remove_dir_all(d);
        }
    }
}

/// The bpffs pin directory of the benchmark's `agentlb-kernel` (removed at
/// the end of the run).
fn kernel_pin_dir() -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/agentlb-bench-{}", std::process::id()))
}

/// agentlb with the kernel fast path: `kernel.mode = "required"` (root),
/// `kernel.pinning = true`, pins under [`kernel_pin_dir`], `sock_ops` on the
/// child cgroup `agentlb` of this process's cgroup (agentlb's default).
fn start_agentlb_kernel(
    bin: &Path,
    backend: SocketAddr,
    tmp: &TempDir,
    s: &Settings,
    threads: usize,
) -> Result<Target> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the kernel path needs root");
    }
    let conf = tmp.path().join("agentlb-kernel.toml");
    fs::write(
        &conf,
        format!(
            "[kernel]\nmode = \"required\"\npinning = true\npin_dir = \"{}\"\n",
            kernel_pin_dir().display()
        ),
    )?;
    let (cmd, port, _) = agentlb_command(bin, Some(&conf), true, backend, threads)?;
    spawn_proxy("agentlb-kernel", cmd, port, tmp, s)
}

fn start_nginx(bin: &Path, backend: SocketAddr, tmp: &TempDir, s: &Settings) -> Result<Target> {
    let port = procs::free_port()?;
    let dir = tmp.path().join("nginx");
    let conf_path = nginx_conf(&dir, backend, port, s.nginx_headers)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-p")
        .arg(&dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&conf_path)
        .args(["-g", "daemon off;"]);
    spawn_proxy("nginx", cmd, port, tmp, s)
}

/// Starts proxy `name` on `port` (pinned and capped as `s` says; log in `tmp`).
fn spawn_proxy(
    name: &'static str,
    cmd: Command,
    port: u16,
    tmp: &TempDir,
    s: &Settings,
) -> Result<Target> {
    let proc = ChildGuard::spawn_capped(
        name,
        cmd,
        tmp.path().join(format!("{name}.log")),
        s.proxy_cpu,
        s.cpu_limit.as_ref(),
    )?;
    Ok(Target {
        name,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        proc: Some(proc),
    })
}

/// Writes the benchmark's nginx configuration (one worker, upstream keep-alive,
/// no buffering, header work as `headers` says) into `dir`.
fn nginx_conf(
    dir: &Path,
    backend: SocketAddr,
    port: u16,
    headers: NginxHeaders,
) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let d = dir.display();
    // What agentlb does per request: keep the client's X-Request-Id or make one,
    // send it upstream and back, append X-Forwarded-For, and say which backend
    // answered.
    let (http_extra, location_extra) = match headers {
        NginxHeaders::Plain => ("", ""),
        NginxHeaders::Same => (
            r#"map $http_x_request_id $agentlb_request_id {
        default $http_x_request_id;
        "" $request_id;
    }
"#,
            r#"proxy_set_header X-Request-Id $agentlb_request_id;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            add_header X-Request-Id $agentlb_request_id always;
            add_header X-Agentlb-Backend $upstream_addr always;
"#,
        ),
    };
    let conf = format!(
        r#"worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    {http_extra}upstream backend {{
        server {backend};
        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            {location_extra}}}
    }}
}}
"#
    );
    let conf_path = dir.join("nginx.conf");
    fs::write(&conf_path, conf)?;
    Ok(conf_path)
}

/// Instruction counts per request (callgrind) for agentlb and nginx.
fn count_instructions(
    args: &Args,
    settings: &Settings,
    agentlb: &Path,
    nginx: Option<&Path>,
    backend_addr: SocketAddr,
    tmp: &TempDir,
) -> Result<serde_json::Value> {
    let n = args.instructions;
    let wants = |t: &str| args.targets.iter().any(|x| x == t);
    let dir = tmp.path().join("callgrind");
    fs::create_dir_all(&dir)?;
    let threads = args.agentlb_threads;
    let agentlb_launch = || -> Result<instr::Launch> {
        let port = procs::free_port()?;
        let admin = procs::free_port()?;
        Ok(instr::Launch {
            argv: vec![
                agentlb.display().to_string(),
                "run".into(),
                "--no-kernel".into(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--admin".into(),
                format!("127.0.0.1:{admin}"),
                "--backend".into(),
                format!("http://{backend_addr}"),
                "--workers".into(),
                threads.to_string(),
            ],
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        })
    };
    let nginx_dir = dir.join("nginx");
    let nginx_launch = || -> Result<instr::Launch> {
        let bin = nginx.context("nginx not found")?;
        let port = procs::free_port()?;
        let conf = nginx_conf(&nginx_dir, backend_addr, port, settings.nginx_headers)?;
        Ok(instr::Launch {
            argv: vec![
                bin.display().to_string(),
                "-p".into(),
                nginx_dir.display().to_string(),
                "-e".into(),
                nginx_dir.join("error.log").display().to_string(),
                "-c".into(),
                conf.display().to_string(),
                "-g".into(),
                "daemon off; master_process off;".into(),
            ],
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        })
    };
    let mut per = serde_json::Map::new();
    for (name, launch) in [
        (
            "agentlb",
            &agentlb_launch as &dyn Fn() -> Result<instr::Launch>,
        ),
        ("nginx", &nginx_launch),
    ] {
        if !wants(name) {
            continue;
        }
        let mut by_wl = serde_json::Map::new();
        for wl in &settings.workloads {
            let v = instr::per_request(name, launch, n, wl == "stream", settings.chunks, &dir)?;
            eprintln!("bench: callgrind {name:8} {wl:6} {v:>10.0} instructions per request");
            by_wl.insert(wl.clone(), json!(v));
        }
        per.insert(name.to_owned(), serde_json::Value::Object(by_wl));
    }
    Ok(json!({"requests": n, "warmup_requests": instr::WARMUP, "per_request": per}))
}

/// Markdown for the instruction counts.
fn instructions_markdown(v: &serde_json::Value, workloads: &[String]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n### User-space instructions per request (callgrind, one keep-alive client, {} requests after {} warm-up)\n",
        v["requests"], v["warmup_requests"]
    );
    let _ = writeln!(
        md,
        "| workload | agentlb | nginx | agentlb ÷ nginx |\n|---|---:|---:|---:|"
    );
    for wl in workloads {
        let a = v["per_request"]["agentlb"][wl].as_f64();
        let n = v["per_request"]["nginx"][wl].as_f64();
        let fmt = |x: Option<f64>| x.map_or_else(|| "–".to_owned(), |x| format!("{x:.0}"));
        let ratio = match (a, n) {
            (Some(a), Some(n)) if n > 0.0 => format!("{:.2}", a / n),
            _ => "–".to_owned(),
        };
        let _ = writeln!(md, "| {wl} | {} | {} | {ratio} |", fmt(a), fmt(n));
    }
    md
}

fn start_router(bin: &Path, backend: SocketAddr, tmp: &TempDir, s: &Settings) -> Result<Target> {
    let port = procs::free_port()?;
    let prom = procs::free_port()?;
    let mut cmd = Command::new(bin);
    cmd.args([
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        &prom.to_string(),
        "--worker-urls",
        &format!("http://{backend}"),
        "--policy",
        "round_robin",
        "--log-level",
        "warning",
    ]);
    spawn_proxy("vllm-router", cmd, port, tmp, s)
}

/// The release binaries' directory (`$CARGO_TARGET_DIR` or `<workspace>/target`).
pub fn release_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("release")
}

/// In a debug build of xtask (as `cargo xtask` makes), builds xtask and `extra` packages
/// in release (unless `no_build`: xtask only) and runs `bench WHICH -- ARGS --no-build`
/// there; returns true when it did, false when this process is the release build.
pub fn run_in_release(
    root: &Path,
    which: &str,
    args_in: &[String],
    extra: &[&str],
    no_build: bool,
) -> Result<bool> {
    if !cfg!(debug_assertions) || std::env::var_os(REEXEC_ENV).is_some() {
        return Ok(false);
    }
    let mut build = vec!["build", "--release", "--locked", "-p", "xtask"];
    if !no_build {
        for p in extra {
            build.extend(["-p", p]);
        }
    }
    crate::cargo(root, &build)?;
    let mut child_args: Vec<&str> = args_in.iter().map(String::as_str).collect();
    if !no_build {
        child_args.push("--no-build");
    }
    let exe = release_dir(root).join("xtask");
    let st = Command::new(&exe)
        .args(["bench", which, "--"])
        .args(&child_args)
        .env(REEXEC_ENV, "1")
        .status()
        .with_context(|| format!("running {}", exe.display()))?;
    if !st.success() {
        bail!("bench {which} (release build) failed ({st})");
    }
    Ok(true)
}

/// One line on the machine: CPU model, cores, kernel.
pub fn machine_line() -> String {
    format!(
        "{}, {} cores, Linux {}",
        cpu_model(),
        procs::cpus(),
        read_trim("/proc/sys/kernel/osrelease")
    )
}

/// `target/venv-bench/bin/vllm-router` (the venv is created and filled when missing).
fn vllm_router(root: &Path, no_install: bool) -> Result<PathBuf> {
    agentic::install_anchors(root, no_install).map(|(router, _)| router)
}

/// Resolves a program name through PATH (plus /usr/sbin, where nginx lives).
fn which(prog: &str) -> Option<PathBuf> {
    let p = Path::new(prog);
    if p.components().count() > 1 {
        return p.exists().then(|| p.to_owned());
    }
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/usr/local/sbin"])
        .map(|d| Path::new(d).join(prog))
        .find(|c| c.is_file())
}

fn nginx_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_default()
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn read_trim(path: &str) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
