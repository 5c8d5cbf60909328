//! Shared test kit for agentlb's end-to-end and privileged suites.
//!
//! Every privileged test builds its own world and tears it down on drop, even when
//! it fails: network namespaces ([`NetNs`], with veth pairs), a child cgroup
//! ([`TestCgroup`], whose processes are killed on drop), a bpffs pin directory
//! ([`PinDir`]) and child processes ([`Proc`]). Nothing is attached to the host's
//! root cgroup, the host's `lo` or a real interface.
//!
//! [`privileged`] decides whether a privileged test runs: as non-root it prints the
//! reason and skips, unless `AGENTLB_REQUIRE_PRIVILEGED=1`, which makes it fail.

use std::{
    fs,
    io::Write as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `PREFIX-<pid>-<n>`.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether a privileged test may run. As non-root: prints why it is skipped and
/// returns false, or panics when `AGENTLB_REQUIRE_PRIVILEGED=1`.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let reason = format!(
        "{test}: skipped: needs root (loads BPF programs, creates network namespaces and cgroups)"
    );
    if std::env::var("AGENTLB_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{reason}, and AGENTLB_REQUIRE_PRIVILEGED=1");
    }
    eprintln!("{reason}");
    false
}

/// Runs a command and fails with its output if it fails.
pub fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The workspace's target directory for this profile (where `agentlb` is built).
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("AGENTLB_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/<test-binary>
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent()?.parent().map(Path::to_owned))
        .unwrap_or_else(|| PathBuf::from("target/debug"))
}

/// Path of a workspace binary (built by `cargo xtask test` / `cargo build`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` (cargo xtask test does this) first",
        p.display()
    );
    p
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `agentlb-<tag>-<pid>-<n>` with `lo` up.
    pub fn new(tag: &str) -> Result<Self> {
        let name = unique(&format!("alb{tag}"));
        sh(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Namespace name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/var/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// `ip -n <name> ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        sh(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs `program` inside this namespace. Only the network
    /// namespace is entered (`nsenter --net`), so `/sys` (cgroups, bpffs) stays the
    /// host's view — `ip netns exec` would remount `/sys`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        c
    }

    /// Runs `f` on a thread that has entered this namespace (sockets it creates live
    /// there) and returns its result.
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Result<R> {
        let path = self.path();
        std::thread::spawn(move || -> Result<R> {
            let f_ns =
                fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            use std::os::fd::AsRawFd as _;
            // SAFETY: valid fd; affects only this thread's network namespace.
            if unsafe { libc::setns(f_ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Creates a veth pair between two namespaces and configures addresses (CIDR).
pub fn veth_pair(
    a: &NetNs,
    a_if: &str,
    a_cidr: &str,
    b: &NetNs,
    b_if: &str,
    b_cidr: &str,
) -> Result<()> {
    sh(Command::new("ip").args([
        "link",
        "add",
        "name",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]))?;
    a.ip(&["addr", "add", a_cidr, "dev", a_if])?;
    b.ip(&["addr", "add", b_cidr, "dev", b_if])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

/// A child cgroup of the cgroup2 root for one test. On drop its processes (and
/// those of sub-cgroups) are killed and every directory is removed.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// Creates `<cgroup2>/agentlb-test-<pid>-<n>`.
    pub fn new() -> Result<Self> {
        let path = agentlb::dataplane::cgroup::cgroup2_mount()?.join(unique("agentlb-test"));
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    /// Absolute path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `cmd` start inside this cgroup.
    pub fn place(&self, cmd: &mut Command) {
        let procs = std::ffi::CString::new(
            self.path
                .join("cgroup.procs")
                .as_os_str()
                .as_encoded_bytes(),
        )
        .unwrap_or_default();
        // SAFETY: only async-signal-safe calls (open/write/close) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let rc = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if rc != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// PIDs in this cgroup and below.
    pub fn pids(&self) -> Vec<u32> {
        fn walk(dir: &Path, out: &mut Vec<u32>) {
            if let Ok(t) = fs::read_to_string(dir.join("cgroup.procs")) {
                out.extend(t.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
            if let Ok(rd) = fs::read_dir(dir) {
                for e in rd.flatten() {
                    if e.path().is_dir() {
                        walk(&e.path(), out);
                    }
                }
            }
        }
        let mut v = Vec::new();
        walk(&self.path, &mut v);
        v
    }

    /// Sub-cgroups (direct children).
    pub fn children(&self) -> Vec<PathBuf> {
        fs::read_dir(&self.path)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for pid in self.pids() {
            // SAFETY: plain kill(2).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = wait_until(Duration::from_secs(5), || {
            self.pids().is_empty().then_some(())
        });
        fn rm(dir: &Path) {
            if let Ok(rd) = fs::read_dir(dir) {
                for e in rd.flatten() {
                    if e.path().is_dir() {
                        rm(&e.path());
                    }
                }
            }
            let _ = fs::remove_dir(dir);
        }
        rm(&self.path);
    }
}

/// A bpffs pin directory for one test, removed (with its pins) on drop.
#[derive(Debug)]
pub struct PinDir(PathBuf);

impl PinDir {
    /// `/sys/fs/bpf/agentlb-test-<pid>-<n>` (not created: agentlb creates it).
    pub fn new() -> Self {
        Self(PathBuf::from("/sys/fs/bpf").join(unique("agentlb-test")))
    }

    /// Path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Names of the entries in the directory.
    pub fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&self.0)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A child process whose output goes to a log file; killed on drop.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    log: PathBuf,
    name: String,
}

impl Proc {
    /// Spawns `cmd` with stdout+stderr to a fresh temporary log file.
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Self> {
        let log = std::env::temp_dir().join(format!("{}.log", unique(name)));
        let f = fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(Self {
            child,
            log,
            name: name.into(),
        })
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has exited (and how).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `sig` to the process. With nsenter in front, nsenter execs the target,
    /// so this reaches the real program.
    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGTERM, then waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM);
        match wait_until(timeout, || self.child.try_wait().ok().flatten()) {
            Some(st) => Ok(st),
            None => bail!(
                "{} did not exit within {timeout:?} after SIGTERM:\n{}",
                self.name,
                self.output()
            ),
        }
    }

    /// Waits for exit up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || self.child.try_wait().ok().flatten())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- {} output ----\n{}", self.name, self.output());
        }
        let _ = fs::remove_file(&self.log);
    }
}

/// Writes `text` to a fresh temporary file and returns its path.
pub fn temp_file(name: &str, text: &str) -> Result<PathBuf> {
    let p = std::env::temp_dir().join(unique(name));
    fs::File::create(&p)?.write_all(text.as_bytes())?;
    Ok(p)
}

/// GETs `url` and parses the JSON body (blocking; call inside [`NetNs::run`] when
/// the server lives in a namespace).
pub fn get_json(url: &str) -> Result<serde_json::Value> {
    let resp = ureq::get(url)
        .timeout(Duration::from_secs(5))
        .call()
        .with_context(|| format!("GET {url}"))?;
    Ok(resp.into_json()?)
}

/// An HTTP answer: the status, agentlb's `x-agentlb-backend` and `x-agentlb-route` and the
/// `content-type` header (each empty when absent) and the body.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// `x-agentlb-backend`.
    pub backend: String,
    /// `x-agentlb-route`.
    pub route: String,
    /// `content-type`.
    pub content_type: String,
    /// The body.
    pub body: String,
}

/// POSTs `body` as `content_type` to `url` (30 s timeout). Error statuses are replies
/// too; only a transport failure is an error.
pub fn post(url: &str, content_type: &str, body: &[u8]) -> Result<Reply> {
    let r = match ureq::post(url)
        .timeout(Duration::from_secs(30))
        .set("content-type", content_type)
        .send_bytes(body)
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.into()),
    };
    let header = |name| r.header(name).unwrap_or("").to_owned();
    Ok(Reply {
        status: r.status(),
        backend: header("x-agentlb-backend"),
        route: header("x-agentlb-route"),
        content_type: header("content-type"),
        body: r.into_string()?,
    })
}

/// [`post`] of a JSON body.
pub fn post_json(url: &str, body: &serde_json::Value) -> Result<Reply> {
    post(url, "application/json", body.to_string().as_bytes())
}

/// Words of a deterministic text (`seed` makes texts distinct).
pub fn text(seed: u64, words: usize) -> String {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..words)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = 3 + (x % 6) as usize;
            (0..len)
                .map(|i| (b'a' + ((x >> (5 * i)) % 26) as u8) as char)
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Exports vllm-sim's stand-in tokenizer (HF format) to a fresh directory.
pub fn export_tokenizer() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(unique("agentlb-tok"));
    sh(Command::new(workspace_bin("vllm-sim"))
        .arg("export-tokenizer")
        .arg(&dir))?;
    ensure!(
        dir.join("tokenizer.json").exists(),
        "no tokenizer.json exported"
    );
    Ok(dir)
}

/// A free TCP port on 127.0.0.1 of the current namespace.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// FNV-1a 64-bit hash, hex: lets a backend prove it received the exact bytes.
pub fn fnv1a(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Waits until `GET url` answers 200 (or `proc` exits).
pub fn wait_http_ok(url: &str, proc_: &mut Proc, timeout: Duration) -> Result<()> {
    let ok = wait_until(timeout, || {
        if proc_.try_wait().is_some() {
            return Some(false);
        }
        ureq::get(url)
            .timeout(Duration::from_secs(1))
            .call()
            .ok()
            .map(|_| true)
    });
    match ok {
        Some(true) => Ok(()),
        _ => bail!("{url} did not come up:\n{}", proc_.output()),
    }
}

/// A running agentlb on loopback: process, proxy port, admin port.
#[derive(Debug)]
pub struct Lb {
    /// The process.
    pub proc_: Proc,
    /// Proxy port.
    pub port: u16,
    /// Admin port.
    pub admin: u16,
}

impl Lb {
    /// `agentlb run --no-kernel --listen 127.0.0.1:<free> --admin 127.0.0.1:<free> ARGS`.
    pub fn start(args: &[String]) -> Result<Self> {
        let (port, admin) = (free_port(), free_port());
        let mut cmd = Command::new(workspace_bin("agentlb"));
        cmd.args([
            "run",
            "--no-kernel",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .args(args);
        let mut p = Proc::spawn("agentlb", cmd)?;
        wait_http_ok(
            &format!("http://127.0.0.1:{admin}/health"),
            &mut p,
            Duration::from_secs(20),
        )?;
        Ok(Self {
            proc_: p,
            port,
            admin,
        })
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `http://127.0.0.1:<admin><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin)
    }
}

/// A running `vllm-sim` with one instance on a free loopback port.
#[derive(Debug)]
pub struct Sim {
    /// The process.
    pub proc_: Proc,
    /// Its port.
    pub port: u16,
}

impl Sim {
    /// Starts `vllm-sim --instances 1 --base-port <free> ARGS` and waits for `/health`.
    pub fn start(args: &[&str]) -> Result<Self> {
        let port = free_port();
        let mut cmd = Command::new(workspace_bin("vllm-sim"));
        cmd.args(["--instances", "1", "--base-port", &port.to_string()])
            .args(args);
        let mut p = Proc::spawn("vllm-sim", cmd)?;
        wait_http_ok(
            &format!("http://127.0.0.1:{port}/health"),
            &mut p,
            Duration::from_secs(20),
        )?;
        Ok(Self { proc_: p, port })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Sets a fault (`none`, `refuse`, `503`, `hang`, `slow:K`, `reset:N`, `die`).
    pub fn fault(&self, spec: &str) -> Result<()> {
        sh(Command::new(workspace_bin("vllm-sim")).args(["fault", "--url", &self.url(), spec]))?;
        Ok(())
    }
}
