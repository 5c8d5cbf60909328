//! `cargo xtask setup`: the eBPF toolchain, installed by the project itself.
//!
//! 1. `rust-src` for the nightly toolchain (`-Z build-std=core`).
//! 2. `bpf-linker` 0.13.0 built against the nightly's own libLLVM (no system LLVM):
//!    a prefix directory whose `lib/libLLVM.so` links to the nightly's
//!    `libLLVM.so.<ver>-rust-*`, `LLVM_PREFIX` pointing at it, and an rpath to the
//!    nightly's lib dir so the linker finds libLLVM at run time.
//! 3. (for tests) a Python venv in `target/venv` with `tests/python-requirements.txt`.
//!
//! Each step checks first and says "ok (already ...)" when there is nothing to do.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_FEATURE: &str = "llvm-22";

fn output(cmd: &mut Command) -> Option<String> {
    let o = cmd.output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

/// Runs every setup step. Returns whether anything was installed.
pub fn run(root: &Path) -> Result<bool> {
    let mut changed = false;
    if output(Command::new("rustup").arg("--version")).is_none() {
        bail!("setup: rustup is required (it manages the nightly toolchain used for eBPF)");
    }
    let sysroot = output(
        Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]),
    )
    .context(
        "setup: the `nightly` toolchain is not installed (rustup toolchain install nightly)",
    )?;
    let sysroot = PathBuf::from(sysroot);

    // 1. rust-src
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: rust-src for nightly: ok (already installed)");
    } else {
        println!("setup: installing rust-src for nightly");
        let st = Command::new("rustup")
            .args(["component", "add", "rust-src", "--toolchain", "nightly"])
            .status()?;
        if !st.success() {
            bail!("setup: `rustup component add rust-src --toolchain nightly` failed");
        }
        changed = true;
    }

    // 2. bpf-linker
    let have = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if have.contains(BPF_LINKER_VERSION) && linker_works() {
        println!("setup: bpf-linker {BPF_LINKER_VERSION}: ok (already installed)");
    } else {
        install_bpf_linker(root, &sysroot)?;
        changed = true;
    }
    if !changed {
        println!("setup: nothing to do");
    }
    Ok(changed)
}

/// bpf-linker loads libLLVM dynamically; make sure it still starts (a nightly
/// update would remove the library it was linked against).
fn linker_works() -> bool {
    output(Command::new("bpf-linker").arg("--help")).is_some()
}

fn install_bpf_linker(root: &Path, sysroot: &Path) -> Result<()> {
    let libdir = sysroot.join("lib");
    let llvm = fs::read_dir(&libdir)
        .with_context(|| format!("setup: reading {}", libdir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("libLLVM.so.") || (n.starts_with("libLLVM-") && n.ends_with(".so"))
            })
        })
        .with_context(|| {
            format!(
                "setup: no libLLVM in {} (is the nightly toolchain complete?)",
                libdir.display()
            )
        })?;
    let prefix = root.join("target/xtask/llvm-prefix");
    fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)
        .with_context(|| format!("setup: linking {}", link.display()))?;
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute)",
        llvm.display()
    );
    let st = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            LLVM_FEATURE,
            "--force",
        ])
        .env("LLVM_PREFIX", &prefix)
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", libdir.display()),
        )
        .status()
        .context("setup: running cargo install bpf-linker")?;
    if !st.success() {
        bail!("setup: building bpf-linker failed (needs crates.io access and a C toolchain)");
    }
    if !linker_works() {
        bail!("setup: bpf-linker was installed but does not start (is ~/.cargo/bin on PATH?)");
    }
    println!("setup: bpf-linker {BPF_LINKER_VERSION}: installed");
    Ok(())
}

/// Ensures `target/venv` has the Python packages the client tests use; returns the
/// interpreter, or `None` when there is no requirements file.
pub fn python_env(root: &Path) -> Result<Option<PathBuf>> {
    let req = root.join("tests/python-requirements.txt");
    if !req.exists() {
        return Ok(None);
    }
    let venv = root.join("target/venv");
    let py = venv.join("bin/python");
    let stamp = venv.join(".requirements");
    let wanted = fs::read_to_string(&req)?;
    if py.exists() && fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        println!("setup: python venv: ok (already up to date)");
        return Ok(Some(py));
    }
    if !py.exists() {
        println!("setup: creating python venv in {}", venv.display());
        let st = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()?;
        if !st.success() {
            bail!("setup: `python3 -m venv` failed (install python3-venv)");
        }
    }
    println!("setup: installing {}", req.display());
    let st = Command::new(&py)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&req)
        .status()?;
    if !st.success() {
        bail!("setup: pip install -r {} failed", req.display());
    }
    fs::write(&stamp, wanted)?;
    Ok(Some(py))
}
