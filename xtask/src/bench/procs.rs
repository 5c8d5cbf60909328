//! Processes of the benchmark: the proxies under test (agentlb, nginx, vllm-router)
//! as child processes with kill-on-drop guards, CPU accounting from `/proc`, CPU
//! pinning, free ports, readiness probes and a self-removing temporary directory.

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::cgroup::CpuLimit;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT, SIGTERM and SIGHUP into a flag ([`interrupted`]) so that the
/// benchmark stops between runs and its guards stop every process it started.
pub fn install_interrupt_handler() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe); the
        // sigaction struct is zero-initialised plain data.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            bail!("sigaction({sig}): {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Fails once a termination signal has arrived.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// A directory removed (recursively) on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(prefix: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A child process started in its own process group; dropping it sends SIGTERM to
/// the group, waits up to 3 s, then SIGKILLs the group and reaps the child.
pub struct ChildGuard {
    name: String,
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout/stderr to `log`, in a new process group, optionally
    /// pinned to one CPU (inherited by every thread and child it creates).
    pub fn spawn(name: &str, cmd: Command, log: PathBuf, cpu: Option<usize>) -> Result<Self> {
        Self::spawn_capped(name, cmd, log, cpu, None)
    }

    /// Like [`ChildGuard::spawn`], and inside the CPU-limited cgroup `limit`
    /// (joined before exec, so everything the child starts is limited too).
    pub fn spawn_capped(
        name: &str,
        mut cmd: Command,
        log: PathBuf,
        cpu: Option<usize>,
        limit: Option<&CpuLimit>,
    ) -> Result<Self> {
        let procs = limit.map(CpuLimit::procs_file);
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        // SAFETY: between fork and exec the closure only makes the prctl,
        // sched_setaffinity and cgroup-join (open/write/close) system calls on
        // stack data or data allocated before the fork, and reads errno; it
        // does not allocate or take locks.
        unsafe {
            cmd.pre_exec(move || {
                // If this process dies without running the guards (SIGKILL), the
                // child gets SIGTERM (nginx then stops its workers).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(p) = &procs {
                    super::cgroup::join(p)?;
                }
                match cpu {
                    Some(cpu) if raw_affinity(0, cpu) != 0 => Err(std::io::Error::last_os_error()),
                    _ => Ok(()),
                }
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({cmd:?})"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Fails with the end of its log if it has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("{} exited ({st}); log:\n{}", self.name, self.log_tail());
        }
        Ok(())
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Sends SIGTERM to the group and waits up to `wait` for a clean exit
    /// (the guard's drop then only reaps).
    pub fn terminate(&mut self, wait: Duration) -> Result<std::process::ExitStatus> {
        // SAFETY: plain kill(2) on our own child's process group.
        unsafe { libc::kill(-self.pid(), libc::SIGTERM) };
        let deadline = Instant::now() + wait;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {wait:?} of SIGTERM", self.name);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the process group and reaps the child (for processes whose clean
    /// shutdown would only cost time, once their numbers are read).
    pub fn kill(&mut self) {
        // SAFETY: plain kill(2) on our own child's process group.
        unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
        let _ = self.child.wait();
    }

    /// The process and every descendant alive now (scan of `/proc`).
    pub fn pids(&self) -> Vec<i32> {
        descendants(self.pid())
    }
}

/// CPU ticks (user + system) summed over `pids`; a pid that has exited counts 0.
pub fn ticks_of(pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|p| stat_ticks(&format!("/proc/{p}/stat")).ok())
        .sum()
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let pgid = self.pid();
        let _ = self.terminate(Duration::from_secs(3));
        // SAFETY: plain kill(2) on our own child's process group; also reaps
        // stragglers left in the group.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// `pid` and all its descendants (from the ppid field of `/proc/*/stat`).
fn descendants(pid: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Ok(fields) = stat_fields(&format!("/proc/{p}/stat"))
                && let Some(ppid) = fields.get(1).and_then(|f| f.parse::<i32>().ok())
            {
                parent_of.push((p, ppid));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i];
        out.extend(
            parent_of
                .iter()
                .filter(|(_, pp)| *pp == cur)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    out
}

/// Run-queue wait (ns) summed over every thread of `pids`, from
/// `/proc/PID/task/TID/schedstat` (second field: time runnable but not running).
/// Threads that exit between two samples are lost; the proxies keep theirs.
pub fn wait_ns_of(pids: &[i32]) -> u64 {
    let mut total = 0;
    for pid in pids {
        let Ok(rd) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for e in rd.flatten() {
            if let Ok(text) = fs::read_to_string(e.path().join("schedstat"))
                && let Some(w) = text
                    .split_whitespace()
                    .nth(1)
                    .and_then(|f| f.parse::<u64>().ok())
            {
                total += w;
            }
        }
    }
    total
}

/// Fields of a `/proc/.../stat` line after the `(comm)` field: index 0 is `state`
/// (field 3 in proc(5)), index 1 `ppid`, 11 `utime`, 12 `stime`.
fn stat_fields(path: &str) -> Result<Vec<String>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let rest = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .with_context(|| format!("malformed {path}"))?;
    Ok(rest.split_whitespace().map(str::to_owned).collect())
}

/// utime + stime of a `/proc/.../stat` file, in clock ticks.
pub fn stat_ticks(path: &str) -> Result<u64> {
    let f = stat_fields(path)?;
    let get = |i: usize| -> Result<u64> {
        f.get(i)
            .with_context(|| format!("{path}: field missing"))?
            .parse::<u64>()
            .with_context(|| format!("{path}: bad number"))
    };
    Ok(get(11)? + get(12)?)
}

/// Busy clock ticks of all CPUs together (`/proc/stat` line `cpu`: everything
/// but idle and iowait), which includes kernel work no process is charged with
/// (softirq, kworkers such as the sockmap's redirect backlog).
pub fn system_busy_ticks() -> Result<u64> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat: no cpu line")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let busy = v
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| *x)
        .sum();
    Ok(busy)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// sched_setaffinity to one CPU without allocating (usable between fork and exec).
fn raw_affinity(tid: libc::pid_t, cpu: usize) -> i32 {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write into it and
    // sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    }
}

fn set_affinity(tid: libc::pid_t, cpu: usize) -> Result<()> {
    if raw_affinity(tid, cpu) != 0 {
        bail!(
            "sched_setaffinity(cpu {cpu}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> Result<()> {
    set_affinity(0, cpu)
}

/// Number of CPUs this process may run on.
pub fn cpus() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

/// A free TCP port on 127.0.0.1 (bound then released; the race is acceptable here).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Waits until `POST http://addr/v1/completions` answers 200 with the expected body
/// length, checking that `child` is still alive in between.
pub fn wait_ready(
    addr: SocketAddr,
    body: &[u8],
    expect_len: usize,
    child: &mut ChildGuard,
    timeout: Duration,
) -> Result<()> {
    let url = format!("http://{addr}/v1/completions");
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no attempt");
    while Instant::now() < deadline {
        check_interrupted()?;
        child.check_alive()?;
        match ureq::post(&url)
            .timeout(Duration::from_secs(2))
            .set("content-type", "application/json")
            .send_bytes(body)
        {
            Ok(resp) => {
                let status = resp.status();
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut resp.into_reader(), &mut buf)?;
                if status == 200 && buf.len() == expect_len {
                    return Ok(());
                }
                last = format!(
                    "status {status}, {} body bytes (want {expect_len})",
                    buf.len()
                );
            }
            Err(e) => last = e.to_string(),
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "{url} not ready after {timeout:?} ({last}); log:\n{}",
        child.log_tail()
    )
}
