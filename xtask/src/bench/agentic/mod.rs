//! `cargo xtask bench agentic`: agentic workloads through agentlb and the anchor routers,
//! side by side on the same simulated cluster.
//!
//! For each preset ([`lb_sim::workload::presets`]) the workload is generated once for the
//! seed, and the [`oracle`](lb_sim::workload::oracle) computes the hit rate any placement
//! could reach and the KV demand, which sets the instances' KV pool so the preset's
//! demand ÷ capacity ratio holds. Then, for every router configuration ([`routers`]), once
//! as a single gateway and once as 3 replicas behind a client that spreads each workflow's
//! calls over them: a fresh `vllm-sim` process (the `h100-8b` latency model), the router(s),
//! the replay ([`client`]), the backends' counters and KV usage sampled every 250 ms, the
//! router's CPU seconds and peak RSS. Results: Markdown on stdout and in
//! `target/bench/agentic/RESULTS.md`, every number in `results.json`, SVG plots beside them
//! ([`report`]); `--publish` also writes them to `bench/` for the README.
//!
//! A run whose calls failed is flagged in the table and never counted as a router's best.

mod client;
mod report;
mod routers;
mod stats;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use lb_sim::workload::{self, IdMode, Workload, oracle, presets};
use serde::Serialize;

pub use self::routers::install_anchors;
use self::{
    client::Replay,
    routers::{Kind, KvSource, Programs, RouterConfig},
    stats::{BackendLoad, Summary, prom_sum},
};
use super::procs::{self, ChildGuard, TempDir};

/// Pinned sglang-router version (vllm-router's is the proxy benchmark's).
pub const SGLANG_ROUTER_VERSION: &str = "0.3.2";
const BLOCK_SIZE: usize = 16;
const CHARS_PER_TOKEN: f64 = 4.0;

/// Options of `cargo xtask bench agentic -- [OPTIONS]`.
#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask bench agentic --",
    about = "Agentic workloads through agentlb and the anchor routers"
)]
struct Args {
    /// Presets to run, comma-separated; `default` (workflows, hetero-tight, no-ids; with
    /// --quick only workflows) or `all`.
    #[arg(long, value_delimiter = ',', default_value = "default")]
    preset: Vec<String>,
    /// Smaller workloads, and only the `workflows` preset unless --preset names others.
    #[arg(long)]
    quick: bool,
    /// Seed of the workload generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Only router configurations whose name contains one of these (e.g. `agentlb,cache_aware`).
    #[arg(long, value_delimiter = ',')]
    routers: Vec<String>,
    /// Repeats of every run; tables give the median and, past one repeat, the
    /// [min–max] spread. Repeats are interleaved (each runs every configuration, in
    /// reverse order on odd repeats), so a slow spell of the machine does not fall on
    /// one router.
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// Gateway replica counts to run each router with.
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    replicas: Vec<usize>,
    /// Offered-load multipliers (workflow arrival rate × L) for the first preset; more than
    /// one draws completion time and hit rate against offered load.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    loads: Vec<f64>,
    /// Replay a JSONL trace (see `lb_sim::workload::trace`) on the cluster of the first preset.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Do not install the anchors when missing (skip them).
    #[arg(long)]
    no_install: bool,
    /// vllm-sim tokenizes with its HF-format stand-in tokenizer (`vllm-sim
    /// export-tokenizer`, about 3 characters per token), and agentlb's configurations with
    /// KV events load the same `tokenizer.json`: precise KV routing. The oracle and the KV
    /// pools are computed with that tokenizer too.
    #[arg(long)]
    hf_tokenizer: bool,
    /// Do not build agentlb and vllm-sim first.
    #[arg(long)]
    no_build: bool,
    /// Also write RESULTS.md and the plots to `bench/` (the committed copy).
    #[arg(long)]
    publish: bool,
    /// Output directory (default `<workspace>/target/bench/agentic`).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One router configuration's run on one preset.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    /// Preset name.
    pub preset: String,
    /// Offered-load multiplier.
    pub load: f64,
    /// Router configuration.
    pub router: String,
    /// Gateway replicas.
    pub replicas: usize,
    /// Repeat number (from 0).
    pub repeat: usize,
    /// Ids the client sent.
    pub ids: String,
    /// Metrics.
    pub summary: Summary,
    /// TTFT of every successful call, simulated seconds (for the CDF).
    pub ttfts: Vec<f64>,
    /// Why it did not run, if it did not.
    pub skipped: Option<String>,
}

/// What is known about a preset's setup.
#[derive(Debug, Clone, Serialize)]
pub struct PresetRecord {
    /// The preset.
    pub preset: presets::Preset,
    /// Calls, workflows and prompt tokens.
    pub calls: usize,
    /// Workflows.
    pub workflows: usize,
    /// Prompt tokens over all calls.
    pub prompt_tokens: u64,
    /// KV blocks per instance.
    pub num_gpu_blocks: usize,
    /// KV demand ÷ capacity.
    pub demand_ratio: f64,
    /// The oracle.
    pub oracle: oracle::OracleResult,
    /// The latest estimated call start (uncontended schedule), simulated ms.
    pub last_start_ms: f64,
}

/// Entry point.
pub fn run(root: &Path, args_in: &[String]) -> Result<()> {
    let args = match Args::try_parse_from(
        std::iter::once("bench-agentic").chain(args_in.iter().map(String::as_str)),
    ) {
        Ok(a) => a,
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp) => {
            print!("{e}");
            return Ok(());
        }
        Err(e) => bail!("{e}"),
    };
    if super::run_in_release(
        root,
        "agentic",
        args_in,
        &["lb-user", "lb-sim"],
        args.no_build,
    )? {
        return Ok(());
    }
    let names: Vec<String> = args
        .preset
        .iter()
        .flat_map(|p| match p.as_str() {
            "default" if args.quick => vec!["workflows".to_owned()],
            "default" => presets::DEFAULTS.iter().map(|s| (*s).to_owned()).collect(),
            "all" => presets::NAMES.iter().map(|s| (*s).to_owned()).collect(),
            other => vec![other.to_owned()],
        })
        .collect();
    for n in &names {
        if presets::preset(n, 1, false).is_none() {
            bail!(
                "unknown preset {n:?} (expected one of {:?})",
                presets::NAMES
            );
        }
    }
    if args.replicas.contains(&0) || args.loads.iter().any(|&l| l <= 0.0) || args.repeats == 0 {
        bail!("--replicas, --loads and --repeats need positive values");
    }
    let bin = super::release_dir(root);
    let mut notes = Vec::new();
    let anchors = match routers::install_anchors(root, args.no_install) {
        Ok(a) => Some(a),
        Err(e) => {
            notes.push(format!("anchors skipped: {e:#}"));
            None
        }
    };
    let mut progs = Programs {
        agentlb: bin.join("agentlb"),
        vllm_router: anchors.as_ref().map(|a| a.0.clone()),
        sglang_python: anchors.map(|a| a.1),
        tokenizer: None,
    };
    let sim = bin.join("vllm-sim");
    let ablate = args.routers.iter().any(|f| f.contains("ablation"));
    let configs: Vec<RouterConfig> = routers::all()
        .into_iter()
        .chain(routers::ablations().into_iter().filter(|_| ablate))
        .filter(|c| {
            args.routers.is_empty() || args.routers.iter().any(|f| c.name.contains(f.as_str()))
        })
        .collect();
    if configs.is_empty() {
        bail!("--routers matched no configuration");
    }
    procs::install_interrupt_handler()?;
    let tmp = TempDir::new("agentlb-bench-agentic")?;
    let hf_dir = if args.hf_tokenizer {
        let dir = tmp.path().join("tokenizer");
        let st = Command::new(&sim)
            .arg("export-tokenizer")
            .arg(&dir)
            .status()
            .context("vllm-sim export-tokenizer")?;
        if !st.success() {
            bail!("vllm-sim export-tokenizer failed ({st})");
        }
        notes.push(
            "vllm-sim in HF-tokenizer mode (its exported stand-in `tokenizer.json`, ≈ 3 characters per token); agentlb's configurations with KV events load the same file".to_owned(),
        );
        Some(dir)
    } else {
        None
    };
    progs.tokenizer = hf_dir.clone();
    let sim_tokenizer = match &hf_dir {
        Some(d) => lb_sim::tokenizer::Tokenizer::with_hf(
            CHARS_PER_TOKEN,
            Arc::new(
                lb_sim::hf_tokenizer::HfTokenizer::from_dir(d)
                    .map_err(|e| anyhow::anyhow!("loading {}: {e}", d.display()))?,
            ),
        ),
        None => lb_sim::tokenizer::Tokenizer::new(CHARS_PER_TOKEN),
    };
    let started = Instant::now();
    let mut preset_records = Vec::new();
    let mut runs: Vec<RunRecord> = Vec::new();
    for (pi, name) in names.iter().enumerate() {
        let Some(mut p) = presets::preset(name, args.seed, args.quick) else {
            continue;
        };
        let loads: Vec<f64> = if pi == 0 {
            args.loads.clone()
        } else {
            vec![1.0]
        };
        let base = match (&args.trace, pi) {
            (Some(path), 0) => {
                let text = fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                p.name = "trace";
                workload::trace::parse(&text, &p.spec.model, p.spec.stream)?
            }
            _ => workload::generate(&p.spec),
        };
        for &load in &loads {
            let w = if load == 1.0 {
                base.clone()
            } else {
                let mut spec = p.spec.clone();
                if let Some(wf) = spec.workflows.as_mut() {
                    wf.arrival_gap_ms /= load;
                }
                if let Some(qa) = spec.qa.as_mut() {
                    qa.qps *= load;
                }
                workload::generate(&spec)
            };
            let rec = setup_preset(&p, &w, &sim_tokenizer);
            eprintln!(
                "bench: preset {} (load ×{load}): {} calls, {} workflows, {} prompt tokens; {} instances × {} blocks; demand/capacity {:.2}; oracle hit {:.1}%",
                p.name,
                rec.calls,
                rec.workflows,
                rec.prompt_tokens,
                p.cluster.instances,
                rec.num_gpu_blocks,
                rec.demand_ratio,
                rec.oracle.hit_rate * 100.0
            );
            let w = Arc::new(w);
            let cells: Vec<(&RouterConfig, usize)> = configs
                .iter()
                .flat_map(|c| args.replicas.iter().map(move |&r| (c, r)))
                .collect();
            let total = cells.len() * args.repeats;
            let mut done = 0;
            for repeat in 0..args.repeats {
                let order: Vec<&(&RouterConfig, usize)> = if repeat % 2 == 0 {
                    cells.iter().collect()
                } else {
                    cells.iter().rev().collect()
                };
                for &&(cfg, replicas) in &order {
                    procs::check_interrupted()?;
                    done += 1;
                    let ids = p.force_ids.clone().unwrap_or_else(|| cfg.ids.clone());
                    let label = format!("[{done}/{total}] {} ×{replicas}", cfg.name);
                    let mut record = RunRecord {
                        preset: p.name.to_owned(),
                        load,
                        router: cfg.name.clone(),
                        replicas,
                        repeat,
                        ids: ids.label(),
                        summary: Summary::default(),
                        ttfts: Vec::new(),
                        skipped: None,
                    };
                    let one = RunOne {
                        preset: &p,
                        rec: &rec,
                        workload: w.clone(),
                        cfg,
                        ids,
                        replicas,
                        progs: &progs,
                        sim: &sim,
                        tokenizer: hf_dir.as_deref(),
                        tmp: &tmp,
                        label: &label,
                    };
                    match one.run() {
                        Ok((summary, ttfts)) => {
                            eprintln!(
                                "bench: {} {label}: hit {:.1}% ({:.0}% of oracle), TTFT p95 {:.3}s, completion mean {:.2}s, errors {}",
                                p.name,
                                summary.hit_rate * 100.0,
                                summary.hit_of_oracle * 100.0,
                                summary.ttft.p95,
                                summary.completion.mean,
                                summary.errors.values().sum::<usize>()
                            );
                            record.summary = summary;
                            record.ttfts = ttfts;
                        }
                        Err(e) => {
                            procs::check_interrupted()?;
                            eprintln!("bench: {} {label} skipped: {e:#}", p.name);
                            record.skipped = Some(format!("{e:#}"));
                        }
                    }
                    runs.push(record);
                }
            }
            preset_records.push((load, rec));
        }
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/bench/agentic"));
    let meta = report::Meta {
        date: report::today(),
        machine: super::machine_line(),
        seed: args.seed,
        quick: args.quick,
        elapsed_s: started.elapsed().as_secs_f64(),
        notes,
        command: format!("cargo xtask bench agentic -- {}", args_in.join(" ")),
    };
    let md = report::write(&out, &meta, &preset_records, &runs)?;
    println!("{md}");
    println!("\nResults: {}", out.display());
    if args.publish {
        let dir = root.join("bench");
        report::write(&dir, &meta, &preset_records, &runs)?;
        // The committed copy keeps the Markdown and plots; the raw JSON stays in target/.
        let _ = fs::remove_file(dir.join("results.json"));
        println!("Published to {}", dir.display());
    }
    Ok(())
}

/// Computes the preset's KV pool from its demand ratio and runs the oracle.
fn setup_preset(
    p: &presets::Preset,
    w: &Workload,
    tok: &lb_sim::tokenizer::Tokenizer,
) -> PresetRecord {
    let prepared = oracle::Prepared::with_tokenizer(w, tok, BLOCK_SIZE);
    let unbounded = prepared.run(u64::MAX);
    let instances = p.cluster.instances.max(1);
    // The pool must at least hold the largest single request (prompt + output).
    let largest = prepared
        .lens
        .iter()
        .zip(&w.calls)
        .map(|(len, c)| (len + c.max_tokens).div_ceil(BLOCK_SIZE) + 1)
        .max()
        .unwrap_or(1);
    let blocks = ((unbounded.demand_blocks as f64 / (instances as f64 * p.cluster.demand_ratio))
        .ceil() as usize)
        .max(largest + 16);
    let capacity = (blocks * instances) as u64;
    let o = prepared.run(capacity);
    PresetRecord {
        preset: p.clone(),
        calls: w.calls.len(),
        workflows: w.workflows,
        prompt_tokens: o.prompt_tokens,
        num_gpu_blocks: blocks,
        demand_ratio: o.demand_blocks as f64 / capacity as f64,
        oracle: o,
        last_start_ms: prepared.last_start_ms,
    }
}

/// One router configuration on one preset.
struct RunOne<'a> {
    preset: &'a presets::Preset,
    rec: &'a PresetRecord,
    workload: Arc<Workload>,
    cfg: &'a RouterConfig,
    ids: IdMode,
    replicas: usize,
    progs: &'a Programs,
    sim: &'a Path,
    tokenizer: Option<&'a Path>,
    tmp: &'a TempDir,
    label: &'a str,
}

/// The simulator process and where its instances listen.
struct Sim {
    proc: ChildGuard,
    urls: Vec<String>,
    admin: u16,
    kv: Vec<KvSource>,
}

impl RunOne<'_> {
    fn run(&self) -> Result<(Summary, Vec<f64>)> {
        let c = &self.preset.cluster;
        let mut sim = self.start_sim()?;
        let mut gateways = Vec::new();
        for r in 0..self.replicas {
            let mut g = routers::start(
                self.cfg,
                self.progs,
                &sim.urls,
                &sim.kv,
                self.tmp,
                r,
                &self.workload.model,
            )?;
            let timeout = Duration::from_secs(if self.cfg.kind == Kind::Agentlb {
                20
            } else {
                90
            });
            routers::wait_ready(&mut g, &self.workload.model, timeout)?;
            gateways.push(g);
        }
        // Counters after the readiness probes: the run's numbers are differences.
        let before = scrape_all(&sim.urls);
        let pids: Vec<i32> = gateways.iter().flat_map(|g| g.proc.pids()).collect();
        let ticks0 = procs::ticks_of(&pids);
        // KV usage sampler.
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (urls, stop) = (sim.urls.clone(), stop.clone());
            std::thread::spawn(move || sample_kv(&urls, &stop))
        };
        // A backend failing mid-run.
        let failer = c.failure.map(|f| {
            let at = Duration::from_secs_f64(
                self.rec.last_start_ms * f.at_fraction / 1000.0 / c.time_scale,
            );
            let (admin, stop) = (sim.admin, stop.clone());
            std::thread::spawn(move || {
                let t = Instant::now();
                while t.elapsed() < at {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let url = format!("http://127.0.0.1:{admin}/instances/{}/fault", f.instance);
                if let Err(e) = ureq::post(&url).send_string(r#"{"mode":"die"}"#) {
                    eprintln!("bench: failing instance {}: {e}", f.instance);
                }
            })
        });
        let pb = ProgressBar::new(self.workload.calls.len() as u64);
        pb.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} calls, {msg} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        pb.set_prefix(format!("{} {}", self.preset.name, self.label));
        let errors = Arc::new(AtomicU64::new(0));
        let t0 = Instant::now();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let replay = Replay {
            workload: self.workload.clone(),
            gateways: gateways.iter().map(|g| g.addr).collect(),
            ids: self.ids.clone(),
            run_tag: format!("{}-{}", self.preset.name, std::process::id()),
            time_scale: c.time_scale,
            call_timeout: Duration::from_secs(120),
        };
        let results = {
            let (pb2, errors2) = (pb.clone(), errors.clone());
            let fut = client::replay(replay, pb2, errors2);
            let ticker = {
                let (pb, errors) = (pb.clone(), errors.clone());
                rt.spawn(async move {
                    loop {
                        pb.set_message(format!("{} errors", errors.load(Ordering::Relaxed)));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                })
            };
            let r = rt.block_on(fut);
            ticker.abort();
            r
        };
        pb.finish_and_clear();
        let wall_s = t0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let kv = sampler.join().unwrap_or_default();
        if let Some(f) = failer {
            let _ = f.join();
        }
        let cpu_s = (procs::ticks_of(&pids).saturating_sub(ticks0)) as f64 / procs::ticks_per_sec();
        let rss_kib: u64 = pids.iter().map(|&p| peak_rss_kib(p)).sum();
        let after = scrape_all(&sim.urls);
        let backends: Vec<BackendLoad> = (0..sim.urls.len())
            .map(|i| {
                let d = |name: &str| {
                    let a = after.get(i).map_or(0.0, |p| prom_sum(p, name));
                    let b = before.get(i).map_or(0.0, |p| prom_sum(p, name));
                    (a - b).max(0.0)
                };
                let samples = kv.get(i).cloned().unwrap_or_default();
                let n = samples.len().max(1) as f64;
                BackendLoad {
                    requests: d("vllm:request_success_total"),
                    prompt_tokens: d("vllm:prefix_cache_queries_total"),
                    cached_tokens: d("vllm:prefix_cache_hits_total"),
                    kv_usage_mean: samples.iter().map(|s| s.0).sum::<f64>() / n,
                    kv_usage_peak: samples.iter().map(|s| s.0).fold(0.0, f64::max),
                    clock_lag_max: samples.iter().map(|s| s.1).fold(0.0, f64::max),
                    counted: after.get(i).is_some_and(|p| !p.is_empty()),
                }
            })
            .collect();
        // Everything is read: stop without waiting for graceful shutdowns (the
        // anchors take ~2 s each after SIGTERM).
        for g in &mut gateways {
            g.proc.kill();
        }
        sim.proc.kill();
        let mut summary = stats::summarize(
            &self.workload,
            &results,
            backends,
            c.time_scale,
            self.rec.oracle.hit_rate,
        );
        summary.router_cpu_s = cpu_s;
        summary.router_rss_mib = rss_kib as f64 / 1024.0;
        summary.wall_s = wall_s;
        let ttfts = results
            .iter()
            .filter(|r| r.error.is_none())
            .filter_map(|r| r.ttft)
            .map(|t| t * c.time_scale)
            .collect();
        Ok((summary, ttfts))
    }

    fn start_sim(&self) -> Result<Sim> {
        let c = &self.preset.cluster;
        if !self.sim.exists() {
            bail!(
                "{} missing (cargo build --release -p lb-sim)",
                self.sim.display()
            );
        }
        let ports_file = self.tmp.path().join("sim-ports.json");
        let _ = fs::remove_file(&ports_file);
        let admin = procs::free_port()?;
        let mut cmd = Command::new(self.sim);
        cmd.args(["--base-port", "0", "--instances"])
            .arg(c.instances.to_string())
            .arg("--time-scale")
            .arg(c.time_scale.to_string())
            .arg("--num-gpu-blocks")
            .arg(self.rec.num_gpu_blocks.to_string())
            .arg("--stream-interval")
            .arg(c.stream_interval.to_string())
            .arg("--model")
            .arg(&self.workload.model)
            .arg("--admin-port")
            .arg(admin.to_string())
            .arg("--ports-file")
            .arg(&ports_file)
            .env("RUST_LOG", "warn");
        if let Some(t) = self.tokenizer {
            cmd.arg("--tokenizer").arg(t);
        }
        if self.cfg.kv_events {
            cmd.args(["--kv-events", "--kv-events-base-port"])
                .arg(free_port_run(2 * c.instances)?.to_string());
        }
        let mut proc = ChildGuard::spawn("vllm-sim", cmd, self.tmp.path().join("sim.log"), None)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let ready: serde_json::Value = loop {
            proc.check_alive()?;
            if let Ok(t) = fs::read_to_string(&ports_file)
                && let Ok(v) = serde_json::from_str(&t)
            {
                break v;
            }
            if Instant::now() > deadline {
                bail!("vllm-sim not ready; log:\n{}", proc.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let ports: Vec<u64> = ready["ports"]
            .as_array()
            .context("ports file without ports")?
            .iter()
            .filter_map(serde_json::Value::as_u64)
            .collect();
        let urls: Vec<String> = ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect();
        let kv = ready["kv_events"]
            .as_array()
            .map(|a| {
                a.iter()
                    .zip(&urls)
                    .filter_map(|(pair, url)| {
                        Some(KvSource {
                            url: url.clone(),
                            publisher: format!("tcp://127.0.0.1:{}", pair.get(0)?.as_u64()?),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Sim {
            proc,
            urls,
            admin,
            kv,
        })
    }
}

/// The first of `n` consecutive free loopback ports (the simulator's KV event publishers
/// take `base + 2i` and `base + 2i + 1`).
fn free_port_run(n: usize) -> Result<u16> {
    let n = u16::try_from(n).context("too many ports")?;
    for _ in 0..50 {
        let base = procs::free_port()?;
        if base.checked_add(n).is_none() {
            continue;
        }
        let all_free =
            (base..base + n).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if all_free {
            return Ok(base);
        }
    }
    bail!("no run of {n} free ports found")
}

fn scrape(url: &str) -> String {
    ureq::get(&format!("{url}/metrics"))
        .timeout(Duration::from_secs(2))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .unwrap_or_default()
}

fn scrape_all(urls: &[String]) -> Vec<String> {
    urls.iter().map(|u| scrape(u)).collect()
}

/// Samples `(kv usage, clock lag)` of every instance every 250 ms until `stop`.
fn sample_kv(urls: &[String], stop: &AtomicBool) -> Vec<Vec<(f64, f64)>> {
    let mut out = vec![Vec::new(); urls.len()];
    while !stop.load(Ordering::Relaxed) {
        for (i, u) in urls.iter().enumerate() {
            let page = scrape(u);
            if !page.is_empty() {
                out[i].push((
                    prom_sum(&page, "vllm:kv_cache_usage_perc"),
                    prom_sum(&page, "vllm_sim:clock_lag_seconds"),
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    out
}

/// Peak resident set (`VmHWM`) of a process, KiB (0 once it is gone).
fn peak_rss_kib(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
