//! Builds the kernel programs (`lb-ebpf`) with the nightly toolchain and bpf-linker
//! and leaves the object in `OUT_DIR/lb-ebpf`, which `dataplane` embeds.
//!
//! Without the `ebpf` feature nothing is built and the binary is userspace-only.
//! With it, a missing toolchain is a hard error that says how to fix it.

use std::process::Command;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_EBPF");
    if std::env::var_os("CARGO_FEATURE_EBPF").is_none() {
        return Ok(());
    }
    preflight()?;
    let package = aya_build::Package {
        name: "lb-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}

/// Fails early, with the fix, when the eBPF toolchain is missing.
fn preflight() -> anyhow::Result<()> {
    const HINT: &str = "run `cargo xtask setup` (installs rust-src for nightly and bpf-linker), \
                        or build a userspace-only agentlb with `--no-default-features`";
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !matches!(linker, Ok(ref o) if o.status.success()) {
        anyhow::bail!("agentlb: bpf-linker not found on PATH; {HINT}");
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output();
    let sysroot = match sysroot {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        _ => anyhow::bail!("agentlb: the nightly toolchain is not installed; {HINT}"),
    };
    let src = std::path::Path::new(&sysroot).join("lib/rustlib/src/rust/library/core");
    if !src.exists() {
        anyhow::bail!("agentlb: rust-src is missing for nightly; {HINT}");
    }
    Ok(())
}
