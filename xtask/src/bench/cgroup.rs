//! A CPU cap for the proxies under test: a child cgroup with CFS bandwidth
//! control (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us` where the `cpu`
//! controller is still on a v1 hierarchy, as on hybrid hosts).
//!
//! Why: on a two-core machine the load generator and the backend share one
//! core, and at concurrency 16 and more that core saturates before the proxy's
//! does; requests/s then measures the harness, not the proxy. Capping the proxy
//! below what the harness can drive makes the proxy the bottleneck, so its
//! requests/s shows how much it serves on the CPU it is given.
//!
//! The cgroup is created under the controller's mount root, joined by each
//! child between fork and exec (so every thread and process it starts is
//! capped), and removed on drop.

use std::{
    ffi::{CStr, CString},
    fs,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};

/// CFS period: short, so a capped proxy is paused for at most a few ms at a time.
const PERIOD_US: u64 = 10_000;

/// A child cgroup capping CPU time to a fraction of one core.
pub struct CpuLimit {
    dir: PathBuf,
    procs: CString,
    fraction: f64,
}

/// Where the `cpu` controller is mounted, and whether that is cgroup v2.
fn cpu_controller() -> Result<(PathBuf, bool)> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let mut v1 = None;
    for line in info.lines() {
        // `id parent dev root mount-point options [optional...] - type source super-options`
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount) = left.split_whitespace().nth(4).map(PathBuf::from) else {
            continue;
        };
        let mut r = right.split_whitespace();
        match (r.next(), r.nth(1)) {
            (Some("cgroup2"), _) => {
                let controllers =
                    fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
                if controllers.split_whitespace().any(|c| c == "cpu") {
                    return Ok((mount, true));
                }
            }
            (Some("cgroup"), Some(opts)) if opts.split(',').any(|o| o == "cpu") => {
                v1 = Some(mount);
            }
            _ => {}
        }
    }
    v1.map(|m| (m, false))
        .context("no cgroup hierarchy with the cpu controller is mounted")
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
}

impl CpuLimit {
    /// A new cgroup limited to `fraction` of one core (needs root).
    pub fn new(fraction: f64) -> Result<Self> {
        if !(0.05..=64.0).contains(&fraction) {
            bail!("CPU limit {fraction} out of range (0.05 to 64 cores)");
        }
        let (root, v2) = cpu_controller()?;
        let dir = root.join(format!("agentlb-bench-{}", std::process::id()));
        if dir.exists() {
            let _ = fs::remove_dir(&dir);
        }
        fs::create_dir(&dir)
            .with_context(|| format!("creating {} (the CPU limit needs root)", dir.display()))?;
        let quota = ((fraction * PERIOD_US as f64).round() as u64).max(1_000);
        let limit = Self {
            procs: CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())?,
            dir,
            fraction,
        };
        if v2 {
            // Children get the controller only when the parent delegates it.
            let subtree = root.join("cgroup.subtree_control");
            let on = fs::read_to_string(&subtree).unwrap_or_default();
            if !on.split_whitespace().any(|c| c == "cpu") {
                write(&subtree, "+cpu")?;
            }
            write(&limit.dir.join("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
        } else {
            write(&limit.dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
            write(&limit.dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
        }
        Ok(limit)
    }

    /// The cap, in cores.
    pub fn fraction(&self) -> f64 {
        self.fraction
    }

    /// The cgroup's `cgroup.procs` file, for [`join`] in a child.
    pub fn procs_file(&self) -> CString {
        self.procs.clone()
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `procs`.
/// Only system calls on data prepared in advance: safe between fork and exec.
pub fn join(procs: &CStr) -> std::io::Result<()> {
    // SAFETY: open/write/close on a NUL-terminated path and a static buffer.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // "0" stands for the writing process.
        let n = libc::write(fd, b"0".as_ptr().cast(), 1);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if n != 1 {
            return Err(err);
        }
    }
    Ok(())
}

impl Drop for CpuLimit {
    fn drop(&mut self) {
        // The proxies have been reaped by now; the kernel may take a moment to
        // notice the cgroup is empty.
        for _ in 0..50 {
            if fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("bench: could not remove {}", self.dir.display());
    }
}
