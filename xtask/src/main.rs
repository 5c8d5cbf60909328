//! `cargo xtask`: developer and CI tasks for agentlb.
//!
//! - `setup`: installs the eBPF toolchain the project needs (rust-src for the nightly
//!   toolchain, bpf-linker 0.13 built against the nightly's own libLLVM); idempotent.
//! - `build`: release build of `agentlb` and `vllm-sim`.
//! - `lint`: rustfmt check, clippy `-D warnings` on the host crates, and clippy on
//!   `lb-ebpf` for `bpfel-unknown-none` separately.
//! - `test`: setup + lint + every test; privileged suites need root
//!   (`AGENTLB_REQUIRE_PRIVILEGED=1` turns their skips into failures).
//! - `demo`: agentlb in front of simulated vLLM backends.
//! - `bench sim`: the simulator's own cost; `bench proxy`: the proxy path's cost against
//!   nginx and vllm-router; `bench agentic`: agentic workloads through agentlb and the
//!   anchor routers on simulated vLLM instances; `bench control`: the control plane's
//!   routing decision latency and memory per workflow, and proxy throughput at a full
//!   workflow table; `bench kv`: KV-aware routing; `bench storm`: resident memory
//!   across connection storms.

mod bench;
mod demo;
mod fuzz;
mod setup;

/// Counts live heap bytes while `bench control` asks it to (a pass-through otherwise).
#[global_allocator]
static ALLOC: bench::control::CountingAlloc = bench::control::CountingAlloc;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "agentlb developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the eBPF toolchain (idempotent).
    Setup,
    /// Release build of agentlb and vllm-sim.
    Build,
    /// rustfmt check and clippy -D warnings (host crates, then lb-ebpf).
    Lint,
    /// Setup, lint and run every test suite.
    Test {
        /// Skip the lint step.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run agentlb in front of simulated vLLM backends and show what it does.
    Demo {
        /// Number of simulated backends.
        #[arg(long, default_value_t = 3)]
        backends: u16,
        /// Keep running after the scripted traffic (until Ctrl-C).
        #[arg(long)]
        keep_running: bool,
    },
    /// Fuzz every parser of untrusted input (cargo-fuzz targets in tests/fuzz).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        time: u64,
        /// Targets to run (all when none).
        #[arg(long = "target")]
        targets: Vec<String>,
    },
    /// Benchmarks.
    Bench {
        /// Which benchmark: `sim`, `proxy`, `agentic`, `control`, `kv` or `storm`.
        which: String,
        /// Extra arguments for the benchmark.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.cmd {
        Cmd::Setup => setup::run(&root).map(|_| ()),
        Cmd::Build => {
            setup::run(&root)?;
            build_release(&root)
        }
        Cmd::Lint => {
            setup::run(&root)?;
            lint(&root)
        }
        Cmd::Test { no_lint, args } => {
            setup::run(&root)?;
            if !no_lint {
                lint(&root)?;
            }
            test(&root, &args)
        }
        Cmd::Demo {
            backends,
            keep_running,
        } => {
            setup::run(&root)?;
            demo(&root, backends, keep_running)
        }
        Cmd::Fuzz { time, targets } => {
            setup::run(&root)?;
            fuzz::run(&root, time, &targets)
        }
        Cmd::Bench { which, args } => {
            setup::run(&root)?;
            bench(&root, &which, &args)
        }
    }
}

fn workspace_root() -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(dir
        .parent()
        .context("xtask has no parent directory")?
        .to_owned())
}

/// Runs `cargo ARGS` in the workspace root with the given toolchain override.
fn cargo_with(
    root: &Path,
    toolchain: Option<&str>,
    args: &[&str],
    envs: &[(&str, &str)],
) -> Result<()> {
    let mut cmd = match toolchain {
        Some(tc) => {
            let mut c = Command::new("rustup");
            c.args(["run", tc, "cargo"]);
            c
        }
        None => Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())),
    };
    cmd.current_dir(root).args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    println!("xtask: $ cargo {}", args.join(" "));
    let status = cmd
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    cargo_with(root, None, args, &[])
}

fn lint(root: &Path) -> Result<()> {
    cargo(root, &["fmt", "--all", "--", "--check"])?;
    cargo(
        root,
        &[
            "clippy",
            "--locked",
            "--workspace",
            "--exclude",
            "lb-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    cargo_with(
        root,
        Some("nightly"),
        &[
            "clippy",
            "--locked",
            "-p",
            "lb-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ],
        &[(
            "CARGO_TARGET_DIR",
            &root.join("target/ebpf-lint").display().to_string(),
        )],
    )
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    // Binaries the suites spawn.
    cargo(
        root,
        &[
            "build",
            "--locked",
            "-p",
            "lb-user",
            "-p",
            "lb-sim",
            "-p",
            "agentlb-tests",
        ],
    )?;
    let mut envs: Vec<(&str, String)> = Vec::new();
    if let Some(py) = setup::python_env(root)? {
        envs.push(("AGENTLB_PYTHON", py.display().to_string()));
    }
    let mut args = vec![
        "test",
        "--locked",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--no-fail-fast",
    ];
    if !extra.is_empty() {
        args.push("--");
        args.extend(extra.iter().map(String::as_str));
    }
    println!("xtask: $ cargo {}", args.join(" "));
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root)
        .args(&args)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().context("running cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    // Pass the output through and add up every binary's result line, so the run
    // ends with one total instead of the last (often empty) doc-test binary's.
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.trim().strip_prefix("test result: ") {
            let num = |key: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(key).map(str::trim))
                    .and_then(|n| n.rsplit(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            };
            passed += num("passed");
            failed += num("failed");
            ignored += num("ignored");
        }
    }
    let status = child.wait()?;
    println!("\ntests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() || failed > 0 {
        bail!("cargo test failed ({status})");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// Release build of the two binaries users run.
fn build_release(root: &Path) -> Result<()> {
    cargo(
        root,
        &[
            "build",
            "--release",
            "--locked",
            "-p",
            "lb-user",
            "-p",
            "lb-sim",
        ],
    )
}

fn demo(root: &Path, backends: u16, keep_running: bool) -> Result<()> {
    build_release(root)?;
    demo::run(&root.join("target/release"), backends, keep_running)
}

fn bench(root: &Path, which: &str, args: &[String]) -> Result<()> {
    match which {
        "sim" => {
            cargo(root, &["build", "--release", "--locked", "-p", "lb-sim"])?;
            let status = Command::new(root.join("target/release/vllm-sim-bench"))
                .args(args)
                .status()
                .context("running vllm-sim-bench")?;
            if !status.success() {
                bail!("bench sim failed ({status})");
            }
            Ok(())
        }
        "proxy" => bench::proxy(root, args),
        "dataplane" => bench::dataplane(root, args),
        "agentic" => bench::agentic::run(root, args),
        "control" => bench::control::run(root, args),
        "kv" => bench::kv::run(root, args),
        "storm" => bench::storm::run(root, args),
        other => bail!(
            "unknown benchmark {other:?} (available: sim, proxy, dataplane, agentic, control, kv, storm)"
        ),
    }
}
