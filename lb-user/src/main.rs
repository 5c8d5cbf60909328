//! `agentlb` command line: parse arguments, build the configuration, run.

use std::{path::PathBuf, process::ExitCode};

use agentlb::config::{self, ConfigError, RawConfig};
use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

/// agentlb — a workflow-aware L7 load balancer for vLLM clusters, accelerated with eBPF.
#[derive(Parser, Debug)]
#[command(name = "agentlb", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the load balancer (config file and/or quick-start flags; flags win).
    Run(Box<RunArgs>),
    /// Validate a configuration file and report every error at once.
    CheckConfig {
        /// The TOML file.
        file: PathBuf,
    },
    /// Show a running agentlb's dataplane at a glance: kernel programs, the fast path,
    /// connections and bytes by path, hand-offs and refusals, pair closes, redirects.
    Status {
        /// Admin address of the running agentlb.
        #[arg(long, default_value = config::DEFAULT_ADMIN)]
        admin: String,
        /// Admin bearer token.
        #[arg(long, env = "AGENTLB_ADMIN_TOKEN")]
        token: Option<String>,
        /// Print `/admin/dataplane` as JSON (programs, maps, counters) instead.
        #[arg(long)]
        json: bool,
    },
    /// Remove agentlb's pinned maps (after the last agentlb using them stopped).
    Unpin {
        /// bpffs pin directory.
        #[arg(long, default_value = config::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Proxy listen address (server.listen).
    #[arg(long)]
    listen: Option<String>,
    /// Admin listen address (server.admin); "" disables it.
    #[arg(long)]
    admin: Option<String>,
    /// Backend base URL, repeatable (replaces [[backends]]).
    #[arg(long = "backend", value_name = "URL")]
    backends: Vec<String>,
    /// Prefill backend base URL for `--policy disaggregated`, repeatable (joins --backend).
    #[arg(long = "prefill", value_name = "URL")]
    prefill: Vec<String>,
    /// Decode backend base URL for `--policy disaggregated`, repeatable (joins --backend).
    #[arg(long = "decode", value_name = "URL")]
    decode: Vec<String>,
    /// Routing policy: workflow (default) | session | prefix | kv | disaggregated | round_robin | least_loaded (routing.policy).
    #[arg(long)]
    policy: Option<String>,
    /// Do not load kernel programs (kernel.mode = "off").
    #[arg(long, conflicts_with = "kernel_mode")]
    no_kernel: bool,
    /// auto | required | off (kernel.mode).
    #[arg(long)]
    kernel_mode: Option<String>,
    /// bpffs directory for pinned maps (kernel.pin_dir).
    #[arg(long)]
    pin_dir: Option<String>,
    /// cgroup v2 path for sock_ops (kernel.cgroup).
    #[arg(long)]
    cgroup: Option<String>,
    /// Interface to attach XDP to, repeatable (kernel.xdp_interfaces).
    #[arg(long = "xdp-iface", value_name = "IFACE")]
    xdp_ifaces: Vec<String>,
    /// text | json (log.format).
    #[arg(long)]
    log_format: Option<String>,
    /// tracing filter, e.g. info or agentlb=debug (log.level).
    #[arg(long)]
    log_level: Option<String>,
    /// Worker threads of the async runtime (default: one per CPU; 1 runs
    /// everything on one thread with the single-threaded scheduler).
    #[arg(long)]
    workers: Option<usize>,
}

impl RunArgs {
    fn apply(&self, raw: &mut RawConfig) {
        if let Some(v) = &self.listen {
            raw.server.listen = Some(v.clone());
        }
        if let Some(v) = &self.admin {
            raw.server.admin = Some(v.clone());
        }
        if !(self.backends.is_empty() && self.prefill.is_empty() && self.decode.is_empty()) {
            let with = |urls: &[String], role: &str| {
                urls.iter()
                    .map(|u| config::raw::RawBackend {
                        url: Some(u.clone()),
                        name: None,
                        role: Some(role.to_owned()),
                    })
                    .collect::<Vec<_>>()
            };
            raw.backends = with(&self.backends, "unified");
            raw.backends.extend(with(&self.prefill, "prefill"));
            raw.backends.extend(with(&self.decode, "decode"));
        }
        if let Some(v) = &self.policy {
            raw.routing.policy = Some(v.clone());
        }
        if self.no_kernel {
            raw.kernel.mode = Some("off".into());
        }
        if let Some(v) = &self.kernel_mode {
            raw.kernel.mode = Some(v.clone());
        }
        if let Some(v) = &self.pin_dir {
            raw.kernel.pin_dir = Some(v.clone());
        }
        if let Some(v) = &self.cgroup {
            raw.kernel.cgroup = Some(v.clone());
        }
        if !self.xdp_ifaces.is_empty() {
            raw.kernel.xdp_interfaces = Some(self.xdp_ifaces.clone());
        }
        if let Some(v) = &self.log_format {
            raw.log.format = Some(v.clone());
        }
        if let Some(v) = &self.log_level {
            raw.log.level = Some(v.clone());
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::CheckConfig { file } => check_config(&file),
        Command::Status { admin, token, json } => status(&admin, token.as_deref(), json),
        Command::Unpin { pin_dir } => unpin(&pin_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentlb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(args: &RunArgs) -> Result<config::Config, ConfigError> {
    let mut raw = match &args.config {
        Some(path) => config::parse_file(path)?,
        None => RawConfig::default(),
    };
    args.apply(&mut raw);
    config::validate(&raw)
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = load(&args)?;
    agentlb::telemetry::init(&cfg.log_level, cfg.log_format);
    // One worker: tokio's single-threaded scheduler, which skips the
    // work-stealing bookkeeping (about 6% of the proxy's instructions per
    // request, measured with callgrind). More: the multi-threaded one.
    let mut rt = match args.workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = rt
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let source: Option<agentlb::reload::ConfigSource> = args
        .config
        .is_some()
        .then(|| Box::new(move || load(&args)) as agentlb::reload::ConfigSource);
    rt.block_on(agentlb::run(cfg, source))
}

fn check_config(file: &std::path::Path) -> anyhow::Result<()> {
    let cfg = config::parse_file(file).and_then(|raw| config::validate(&raw))?;
    println!(
        "{}: OK ({} backend(s), policy {}, kernel mode {:?}, listen {}, admin {})",
        file.display(),
        cfg.backends.len(),
        cfg.policy.as_str(),
        cfg.kernel.mode,
        cfg.listen,
        cfg.admin.map_or_else(|| "off".into(), |a| a.to_string())
    );
    Ok(())
}

fn status(admin: &str, token: Option<&str>, json: bool) -> anyhow::Result<()> {
    use agentlb::admin::client::{ClientError, get};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let body = rt.block_on(get(admin, "/admin/dataplane", token))?;
    let dataplane: serde_json::Value =
        serde_json::from_str(&body).context("parsing /admin/dataplane")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&dataplane)?);
        return Ok(());
    }
    // 404: the fast path is not active.
    let pinning = match rt.block_on(get(admin, "/admin/pinning", token)) {
        Ok(b) => Some(serde_json::from_str(&b).context("parsing /admin/pinning")?),
        Err(ClientError::Status { status: 404, .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let metrics = rt.block_on(get(admin, "/metrics", token))?;
    print!(
        "{}",
        agentlb::admin::glance::render(&dataplane, pinning.as_ref(), &metrics)
    );
    Ok(())
}

fn unpin(dir: &std::path::Path) -> anyhow::Result<()> {
    let removed = agentlb::dataplane::pins::unpin(dir)
        .with_context(|| format!("removing pins in {}", dir.display()))?;
    if removed.is_empty() {
        println!("no agentlb pins in {}", dir.display());
    }
    for p in removed {
        println!("removed {}", p.display());
    }
    Ok(())
}
