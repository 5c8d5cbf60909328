//! The routers the agentic benchmark compares, each configured the best way it supports for
//! a workload with workflow ids, and how to start them.
//!
//! - agentlb: every policy it has, ids as `X-Workflow-Id`/`X-Agent-Id`/`X-Parent-Request-Id`,
//!   userspace path, backends' `/metrics` scraped every 500 ms (`health.interval_ms`);
//!   `kv` and `workflow + kv events` subscribe to vllm-sim's KV events (precise with
//!   `--hf-tokenizer`, when agentlb can tokenize as the simulator does), the others do not.
//! - vllm-router 0.1.17: `round_robin`; `cache_aware` (its radix tree is fed by vllm-sim's
//!   `/tokenize`); `consistent_hash` and `sticky_least_loaded` keyed by the workflow id in
//!   `X-Session-ID`; `kv_aware` subscribed to vllm-sim's KV events; program scheduling with
//!   the workflow as `vllm_xargs.agentic_context`.
//! - sglang-router 0.3.2 (`smg`): `cache_aware`; `manual` keyed by `X-SMG-Routing-Key`
//!   (`--assignment-mode min_group`: a new key goes to the worker with fewest keys).
//!
//! When a preset's clients send no ids, every router gets none.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use lb_sim::workload::IdMode;

use crate::bench::procs::{self, ChildGuard, TempDir};

/// Which program a router configuration runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Our own gateway.
    Agentlb,
    /// vllm-router from PyPI.
    VllmRouter,
    /// sglang-router from PyPI.
    SglangRouter,
}

/// One router configuration.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Label in tables and plots.
    pub name: String,
    /// The program.
    pub kind: Kind,
    /// Policy and extra flags.
    pub args: Vec<String>,
    /// How the client names workflows for it.
    pub ids: IdMode,
    /// Needs vllm-sim's KV events.
    pub kv_events: bool,
    /// agentlb: extra `[routing]` settings (TOML lines).
    pub routing_toml: String,
}

fn cfg(kind: Kind, name: &str, args: &[&str], ids: IdMode, kv_events: bool) -> RouterConfig {
    RouterConfig {
        name: name.to_owned(),
        kind,
        args: args.iter().map(|s| (*s).to_owned()).collect(),
        ids,
        kv_events,
        routing_toml: String::new(),
    }
}

/// agentlb `workflow` with its optional parts turned on, to measure what each brings
/// (only run when `--routers` names "ablation").
pub fn ablations() -> Vec<RouterConfig> {
    [
        ("footprint placement", "footprint_placement = true\n"),
        ("spill hysteresis", "spill_hysteresis = true\n"),
        (
            "both",
            "footprint_placement = true\nspill_hysteresis = true\n",
        ),
    ]
    .into_iter()
    .flat_map(|(what, toml)| {
        // Without and with KV events: with them (and --hf-tokenizer), replicas that never
        // saw a workflow place it where its context is, whatever their own ledgers say.
        [(false, ""), (true, " + kv events")].map(|(kv, tag)| {
            let mut c = cfg(
                Kind::Agentlb,
                &format!("agentlb workflow{tag} [ablation: + {what}]"),
                &["--policy", "workflow"],
                IdMode::Headers,
                kv,
            );
            c.routing_toml = toml.to_owned();
            c
        })
    })
    .collect()
}

/// Every configuration, in table order.
pub fn all() -> Vec<RouterConfig> {
    use Kind::*;
    let session = || IdMode::SessionHeader("X-Session-ID".to_owned());
    vec![
        cfg(
            Agentlb,
            "agentlb round_robin",
            &["--policy", "round_robin"],
            IdMode::Headers,
            false,
        ),
        cfg(
            Agentlb,
            "agentlb least_loaded",
            &["--policy", "least_loaded"],
            IdMode::Headers,
            false,
        ),
        cfg(
            Agentlb,
            "agentlb workflow",
            &["--policy", "workflow"],
            IdMode::Headers,
            false,
        ),
        cfg(
            Agentlb,
            "agentlb workflow + kv events",
            &["--policy", "workflow"],
            IdMode::Headers,
            true,
        ),
        cfg(
            Agentlb,
            "agentlb kv",
            &["--policy", "kv"],
            IdMode::None,
            true,
        ),
        cfg(
            VllmRouter,
            "vllm-router round_robin",
            &["--policy", "round_robin"],
            IdMode::None,
            false,
        ),
        cfg(
            VllmRouter,
            "vllm-router cache_aware",
            &["--policy", "cache_aware"],
            IdMode::None,
            false,
        ),
        cfg(
            VllmRouter,
            "vllm-router consistent_hash",
            &["--policy", "consistent_hash"],
            session(),
            false,
        ),
        cfg(
            VllmRouter,
            "vllm-router sticky_least_loaded",
            &["--policy", "sticky_least_loaded"],
            session(),
            false,
        ),
        cfg(
            VllmRouter,
            "vllm-router kv_aware",
            &["--policy", "kv_aware"],
            IdMode::None,
            true,
        ),
        cfg(
            VllmRouter,
            "vllm-router program",
            &["--policy", "round_robin", "--enable-program-scheduling"],
            IdMode::AgenticContext,
            false,
        ),
        cfg(
            SglangRouter,
            "sglang-router cache_aware",
            &["--policy", "cache_aware"],
            IdMode::None,
            false,
        ),
        cfg(
            SglangRouter,
            "sglang-router manual",
            &["--policy", "manual", "--assignment-mode", "min_group"],
            IdMode::SessionHeader("X-SMG-Routing-Key".to_owned()),
            false,
        ),
    ]
}

/// Installed programs.
pub struct Programs {
    /// `agentlb` release binary.
    pub agentlb: PathBuf,
    /// `vllm-router` in the benchmark venv, if installed.
    pub vllm_router: Option<PathBuf>,
    /// `sglang-router` launcher (`python -m sglang_router.launch_router`), if installed.
    pub sglang_python: Option<PathBuf>,
    /// The simulator's HF-format tokenizer directory (`--hf-tokenizer`).
    pub tokenizer: Option<PathBuf>,
}

/// One started router process.
pub struct Started {
    /// Where clients send requests.
    pub addr: SocketAddr,
    /// The process.
    pub proc: ChildGuard,
}

/// KV event endpoint of one simulated instance.
#[derive(Debug, Clone)]
pub struct KvSource {
    /// Instance URL.
    pub url: String,
    /// ZMQ PUB endpoint.
    pub publisher: String,
}

/// Starts one replica of `cfg` in front of `backends`.
pub fn start(
    cfg: &RouterConfig,
    progs: &Programs,
    backends: &[String],
    kv: &[KvSource],
    tmp: &TempDir,
    replica: usize,
    model: &str,
) -> Result<Started> {
    let port = procs::free_port()?;
    let metrics_port = procs::free_port()?;
    let tag: String = cfg
        .name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let log = tmp.path().join(format!("{tag}-{replica}.log"));
    let cmd = match cfg.kind {
        Kind::Agentlb => {
            // Backends' /metrics (load, KV usage) scraped every 500 ms instead of
            // every 2 s: the `workflow` policy balances on them.
            let mut toml = format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:{metrics_port}\"\n\
                 [kernel]\nmode = \"off\"\n[health]\ninterval_ms = 500\ntimeout_ms = 400\n"
            );
            if !cfg.routing_toml.is_empty() {
                toml.push_str("[routing]\n");
                toml.push_str(&cfg.routing_toml);
            }
            // KV events: the publishers are discovered (`/kv_event_sources`) right away;
            // requests are matched against them when the tokenizer is the simulator's.
            if cfg.kv_events {
                toml.push_str("[kv]\ndiscover_interval_ms = 500\n");
                if let Some(t) = &progs.tokenizer {
                    toml.push_str(&format!("tokenizer = {:?}\n", t.to_string_lossy()));
                }
            } else {
                toml.push_str("[kv]\ndiscover = false\n");
            }
            for b in backends {
                toml.push_str(&format!("[[backends]]\nurl = \"{b}\"\n"));
            }
            let file = tmp.path().join(format!("{tag}-{replica}.toml"));
            std::fs::write(&file, toml).with_context(|| format!("writing {}", file.display()))?;
            let mut c = Command::new(&progs.agentlb);
            c.args(["run", "--config"])
                .arg(&file)
                .args(&cfg.args)
                .env("RUST_LOG", "warn");
            c
        }
        Kind::VllmRouter => {
            let bin = progs
                .vllm_router
                .as_ref()
                .context("vllm-router is not installed")?;
            let mut c = anchor_command(bin, &[], port, metrics_port, backends, &cfg.args);
            if cfg.kv_events {
                c.args(["--kv-event-block-size", "16", "--kv-event-model", model]);
                // No replay source: with several subscribers replaying at once,
                // zeromq 0.4's ROUTER socket in vllm-sim can deadlock (zmq.rs #210),
                // and every run starts with a fresh simulator, so there is no
                // history to replay.
                for s in kv {
                    c.arg("--kv-event-source")
                        .arg(format!("{}={}", s.url, s.publisher));
                }
            }
            c
        }
        Kind::SglangRouter => {
            let py = progs
                .sglang_python
                .as_ref()
                .context("sglang-router is not installed")?;
            let launcher = ["-m", "sglang_router.launch_router"];
            anchor_command(py, &launcher, port, metrics_port, backends, &cfg.args)
        }
    };
    let proc = ChildGuard::spawn(&format!("{} #{replica}", cfg.name), cmd, log, None)?;
    Ok(Started {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        proc,
    })
}

/// The command line both anchors share: loopback listeners for traffic and metrics,
/// the workers, then the configuration's own flags.
fn anchor_command(
    program: &Path,
    pre: &[&str],
    port: u16,
    metrics_port: u16,
    backends: &[String],
    args: &[String],
) -> Command {
    let mut c = Command::new(program);
    c.args(pre)
        .args(["--host", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .args(["--prometheus-host", "127.0.0.1", "--prometheus-port"])
        .arg(metrics_port.to_string())
        .arg("--worker-urls")
        .args(backends)
        .args(args)
        .env("RUST_LOG", "warn");
    c
}

/// Waits until a small chat completion through `s` answers 200 (the whole chain works).
pub fn wait_ready(s: &mut Started, model: &str, timeout: Duration) -> Result<()> {
    let url = format!("http://{}/v1/chat/completions", s.addr);
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "ready?"}],
        "max_tokens": 1,
    })
    .to_string();
    let deadline = std::time::Instant::now() + timeout;
    let mut last = String::from("no attempt");
    while std::time::Instant::now() < deadline {
        procs::check_interrupted()?;
        s.proc.check_alive()?;
        match ureq::post(&url)
            .timeout(Duration::from_secs(3))
            .set("content-type", "application/json")
            .send_string(&body)
        {
            Ok(r) if r.status() == 200 => return Ok(()),
            Ok(r) => last = format!("status {}", r.status()),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "{url} not ready after {timeout:?} ({last}); log:\n{}",
        s.proc.log_tail()
    )
}

/// The venv with both anchors (`target/venv-bench`), created and filled when missing.
pub fn install_anchors(root: &Path, no_install: bool) -> Result<(PathBuf, PathBuf)> {
    let venv = root.join("target/venv-bench");
    let router = venv.join("bin/vllm-router");
    let python = venv.join("bin/python");
    let has_sglang = || {
        Command::new(&python)
            .args(["-c", "import sglang_router"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if router.exists() && has_sglang() {
        return Ok((router, python));
    }
    if no_install {
        bail!("anchors missing from {} (--no-install)", venv.display());
    }
    eprintln!(
        "bench: installing the anchor routers into {}",
        venv.display()
    );
    if !python.exists() {
        let st = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .context("python3 -m venv")?;
        if !st.success() {
            bail!("python3 -m venv {} failed ({st})", venv.display());
        }
    }
    let st = Command::new(venv.join("bin/pip"))
        .args([
            "install",
            "-q",
            &format!("vllm-router=={}", crate::bench::VLLM_ROUTER_VERSION),
            &format!("sglang-router=={}", super::SGLANG_ROUTER_VERSION),
        ])
        .status()
        .context("pip install")?;
    if !st.success() || !router.exists() || !has_sglang() {
        bail!("pip install of the anchor routers failed ({st})");
    }
    Ok((router, python))
}
