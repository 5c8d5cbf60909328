//! `cargo xtask fuzz`: builds the cargo-fuzz targets in `tests/fuzz` (libFuzzer on the
//! nightly toolchain, AddressSanitizer) and runs each for a bounded time from its
//! committed seed corpus (`tests/fuzz/corpus/<target>`), keeping new inputs under
//! `target/fuzz-corpus/<target>` and crashes under `target/fuzz-artifacts/<target>`.
//! Prints executions, executions per second and coverage per target; any crash (or a
//! failed assertion: the differential and split-read invariants) fails the run, and the
//! input that caused it becomes a seed plus a regression test.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// Every target, in the order they run.
pub const TARGETS: [&str; 9] = [
    "request_head",
    "response_head",
    "chunked",
    "differential_request",
    "meta",
    "usage_tail",
    "config",
    "admin_backend",
    "kv_wire",
];

/// One target's result.
struct Run {
    target: String,
    execs: u64,
    per_sec: u64,
    cov: u64,
}

fn nightly_cargo() -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", "cargo"]);
    c
}

/// Installs cargo-fuzz when missing (idempotent).
fn ensure_cargo_fuzz() -> Result<()> {
    let ok = nightly_cargo()
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Ok(());
    }
    println!("xtask: installing cargo-fuzz");
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["install", "cargo-fuzz", "--locked"])
        .status()
        .context("cargo install cargo-fuzz")?;
    if !st.success() {
        bail!("cargo install cargo-fuzz failed ({st})");
    }
    Ok(())
}

/// Runs `targets` (all when empty) for `secs` seconds each.
pub fn run(root: &Path, secs: u64, targets: &[String]) -> Result<()> {
    ensure_cargo_fuzz()?;
    let dir = root.join("tests/fuzz");
    let names: Vec<String> = if targets.is_empty() {
        TARGETS.iter().map(|s| (*s).to_owned()).collect()
    } else {
        for t in targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("unknown fuzz target {t} (one of: {})", TARGETS.join(", "));
            }
        }
        targets.to_vec()
    };
    println!("xtask: building the fuzz targets (nightly, AddressSanitizer)");
    let st = nightly_cargo()
        .current_dir(root)
        .args(["fuzz", "build", "--fuzz-dir"])
        .arg(&dir)
        .status()
        .context("cargo fuzz build")?;
    if !st.success() {
        bail!("cargo fuzz build failed ({st})");
    }
    let mut runs = Vec::new();
    let mut failed = Vec::new();
    for t in &names {
        let work = root.join("target/fuzz-corpus").join(t);
        let artifacts = root.join("target/fuzz-artifacts").join(t);
        let seeds = dir.join("corpus").join(t);
        std::fs::create_dir_all(&work)?;
        std::fs::create_dir_all(&artifacts)?;
        println!("xtask: fuzzing {t} for {secs} s");
        let out = nightly_cargo()
            .current_dir(root)
            .args(["fuzz", "run", "--fuzz-dir"])
            .arg(&dir)
            .arg(t)
            .arg(&work)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={secs}"))
            .arg("-print_final_stats=1")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("cargo fuzz run {t}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let stat = |key: &str| -> u64 {
            log.lines()
                .filter_map(|l| l.strip_prefix(key))
                .filter_map(|v| v.trim_start_matches(':').trim().parse().ok())
                .next_back()
                .unwrap_or(0)
        };
        let cov = log
            .lines()
            .filter_map(|l| l.split(" cov: ").nth(1))
            .filter_map(|v| v.split_whitespace().next()?.parse().ok())
            .next_back()
            .unwrap_or(0);
        runs.push(Run {
            target: t.clone(),
            execs: stat("stat::number_of_executed_units"),
            per_sec: stat("stat::average_exec_per_sec"),
            cov,
        });
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "xtask: fuzz target {t} failed:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            failed.push(t.clone());
        }
    }
    println!("\n| target | executions | exec/s | coverage (edges) |\n|---|---:|---:|---:|");
    for r in &runs {
        println!("| {} | {} | {} | {} |", r.target, r.execs, r.per_sec, r.cov);
    }
    if !failed.is_empty() {
        bail!(
            "fuzzing found failures in: {} (inputs under target/fuzz-artifacts)",
            failed.join(", ")
        );
    }
    Ok(())
}
