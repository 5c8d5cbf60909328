//! `cargo xtask bench storm`: agentlb's memory across connection storms.
//!
//! A storm opens `--conns` keep-alive connections to agentlb (at most
//! `--open-concurrency` being opened at once), sends one small
//! `/v1/completions` on each and reads the whole answer, then keeps every
//! connection open and idle; the resident set (`VmRSS`) is read with all of them
//! open. Then every connection is closed, the benchmark waits until agentlb's
//! open file descriptors are back to where they were before the storm, lets it
//! settle for `--settle-ms`, and reads the resident set again. `--rounds` storms
//! make the curve: a leak shows as an after-close RSS that keeps climbing, memory
//! kept by the allocator as one that climbs, then stays high.
//!
//! Several agentlb processes (`--variant`s, each its own process, same binary)
//! take the storms in turn, round by round, in front of one built-in backend
//! (the one of `bench proxy`), so the curves come from the same minutes of this
//! shared machine. The default variants are `default` (agentlb as shipped) and
//! `no-trim` (`limits.memory_trim_ms = 0`: freed memory is left to the
//! allocator, which is how agentlb behaved before it returned memory after
//! connections close); more can be named with `--variant NAME=KEY=VALUE,...`
//! where a key is `section.key` in agentlb's TOML (value written as is) or
//! `env.NAME` (an environment variable, e.g. `env.MALLOC_ARENA_MAX=2`).
//!
//! Output: Markdown on stdout and in `DIR/storm.md`, every number in
//! `DIR/storm.json` (`DIR` = `--out`, default `target/bench`); `--publish` copies
//! the Markdown to `bench/STORM.md`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::Semaphore,
};

use super::{
    backend::{self, Backend},
    procs::{self, ChildGuard, TempDir},
};

/// Options of `cargo xtask bench storm -- [OPTIONS]`.
#[derive(Parser, Debug)]
#[command(about = "agentlb's resident memory across rounds of connection storms")]
struct Args {
    /// Storms per variant.
    #[arg(long, default_value_t = 8)]
    rounds: usize,
    /// Connections per storm (all open at once at the peak).
    #[arg(long, default_value_t = 5000)]
    conns: usize,
    /// Connections being opened (and served their request) at once.
    #[arg(long, default_value_t = 200)]
    open_concurrency: usize,
    /// Open the connections without sending a request on them.
    #[arg(long)]
    idle_only: bool,
    /// Wait after the last connection closed before reading the RSS (ms).
    #[arg(long, default_value_t = 3000)]
    settle_ms: u64,
    /// `NAME=KEY=VALUE,...` (repeatable; replaces the default variants).
    #[arg(long)]
    variant: Vec<String>,
    /// agentlb worker threads.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Output directory.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Copy the Markdown to bench/STORM.md.
    #[arg(long)]
    publish: bool,
    /// Do not build agentlb first (use the existing release binary).
    #[arg(long)]
    no_build: bool,
    /// agentlb binary to use instead of building `target/release/agentlb`.
    #[arg(long)]
    agentlb: Option<PathBuf>,
}

/// Open fds above the level before the storm that still count as "closed":
/// the idle upstream connections agentlb's pool may keep.
const UPSTREAM_IDLE_SLACK: usize = 300;

/// One agentlb configuration under test.
struct Variant {
    name: String,
    toml: String,
    env: Vec<(String, String)>,
}

fn parse_variant(spec: &str) -> Result<Variant> {
    let Some((name, rest)) = spec.split_once('=') else {
        bail!("--variant {spec:?}: want NAME=KEY=VALUE,...");
    };
    let mut sections: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut env = Vec::new();
    for item in rest.split(',').filter(|s| !s.is_empty()) {
        let Some((key, value)) = item.split_once('=') else {
            bail!("--variant {spec:?}: {item:?} is not KEY=VALUE");
        };
        if let Some(var) = key.strip_prefix("env.") {
            env.push((var.to_owned(), value.to_owned()));
            continue;
        }
        let Some((section, field)) = key.split_once('.') else {
            bail!("--variant {spec:?}: key {key:?} is not section.key or env.NAME");
        };
        sections
            .entry(section.to_owned())
            .or_default()
            .push(format!("{field} = {value}"));
    }
    let mut toml = String::new();
    for (section, lines) in sections {
        let _ = writeln!(toml, "[{section}]\n{}", lines.join("\n"));
    }
    Ok(Variant {
        name: name.to_owned(),
        toml,
        env,
    })
}

/// One storm's readings.
#[derive(Clone, Copy, Default)]
struct Round {
    /// RSS with every connection open (KiB).
    open_kib: u64,
    /// RSS after every connection closed and the settle time (KiB).
    after_kib: u64,
    /// Open fds of agentlb at the peak.
    fds_open: usize,
    /// Open fds of agentlb after the storm (idle upstream connections remain).
    fds_after: usize,
    /// Seconds the storm took to open.
    open_secs: f64,
    /// Requests answered (or connections opened with `--idle-only`).
    served: usize,
}

struct Proc {
    variant: Variant,
    addr: SocketAddr,
    guard: ChildGuard,
    base_kib: u64,
    base_fds: usize,
    rounds: Vec<Round>,
}

/// `VmRSS` of `pid` in KiB.
fn rss_kib(pid: i32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

fn fd_count(pid: i32) -> Result<usize> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .count())
}

/// Opens one connection and, unless `idle`, has one request answered on it.
async fn open_one(addr: SocketAddr, req: Arc<Vec<u8>>, idle: bool) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await.context("connect")?;
    if idle {
        return Ok(s);
    }
    s.write_all(&req).await.context("write")?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.context("read")?;
        if n == 0 {
            bail!("closed before the answer ended");
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            bail!(
                "answer: {}",
                head.lines().next().unwrap_or_default().to_owned()
            );
        }
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .context("answer without content-length")?;
        if buf.len() >= end + 4 + len {
            return Ok(s);
        }
    }
}

/// Opens `n` connections (`conc` at a time); returns them open.
async fn storm(
    addr: SocketAddr,
    n: usize,
    conc: usize,
    idle: bool,
    req: Arc<Vec<u8>>,
) -> Result<Vec<TcpStream>> {
    let sem = Arc::new(Semaphore::new(conc));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let req = req.clone();
        tasks.push(tokio::spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(30), open_one(addr, req, idle)).await;
            drop(permit);
            r.context("timed out")?
        }));
    }
    let mut open = Vec::with_capacity(n);
    for t in tasks {
        open.push(t.await.context("storm task")??);
    }
    Ok(open)
}

fn start(
    bin: &Path,
    v: Variant,
    backend: SocketAddr,
    tmp: &TempDir,
    workers: usize,
) -> Result<Proc> {
    let file = v.name.replace(|c: char| !c.is_ascii_alphanumeric(), "-");
    let conf = tmp.path().join(format!("{file}.toml"));
    fs::write(&conf, &v.toml).with_context(|| format!("writing {}", conf.display()))?;
    let (mut cmd, port, _) = super::agentlb_command(bin, Some(&conf), false, backend, workers)?;
    for (k, val) in &v.env {
        cmd.env(k, val);
    }
    let mut guard = ChildGuard::spawn(&v.name, cmd, tmp.path().join(format!("{file}.log")), None)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    procs::wait_ready(
        addr,
        &backend::request_body(false),
        backend::expected_len(false, 1),
        &mut guard,
        Duration::from_secs(20),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let pid = guard.pid();
    Ok(Proc {
        variant: v,
        addr,
        base_kib: rss_kib(pid)?,
        base_fds: fd_count(pid)?,
        guard,
        rounds: Vec::new(),
    })
}

/// Entry point: `cargo xtask bench storm -- [OPTIONS]`.
pub fn run(root: &Path, args_in: &[String]) -> Result<()> {
    let Some(args) = super::parse_args::<Args>("bench-storm", args_in)? else {
        return Ok(());
    };
    let build_agentlb = args.agentlb.is_none();
    let extra: &[&str] = if build_agentlb { &["lb-user"] } else { &[] };
    if super::run_in_release(root, "storm", args_in, extra, args.no_build)? {
        return Ok(());
    }
    if build_agentlb && !args.no_build {
        crate::cargo(root, &["build", "--release", "--locked", "-p", "lb-user"])?;
    }
    let bin = args
        .agentlb
        .clone()
        .unwrap_or_else(|| super::release_dir(root).join("agentlb"));
    if !bin.exists() {
        bail!(
            "{} missing (cargo build --release -p lb-user)",
            bin.display()
        );
    }
    let specs: Vec<String> = if args.variant.is_empty() {
        vec![
            "default=".to_owned(),
            "no-trim=limits.memory_trim_ms=0".to_owned(),
        ]
    } else {
        args.variant.clone()
    };
    let variants = specs
        .iter()
        .map(|s| parse_variant(s))
        .collect::<Result<Vec<_>>>()?;
    // Every storm holds 2 fds per connection here (client and server side),
    // plus agentlb's upstream connections.
    raise_nofile((args.conns * 2 + 1024) as u64)?;
    procs::install_interrupt_handler()?;
    let machine = super::machine_line();
    let began = Instant::now();
    let tmp = TempDir::new("agentlb-bench-storm")?;
    let backend = Backend::start(1, None)?;
    let mut procs_v = Vec::new();
    for v in variants {
        procs_v.push(start(&bin, v, backend.addr, &tmp, args.workers)?);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let req = Arc::new(completion_request());
    for round in 0..args.rounds {
        for p in &mut procs_v {
            procs::check_interrupted()?;
            p.guard.check_alive()?;
            let pid = p.guard.pid();
            let t0 = Instant::now();
            let conns = rt.block_on(storm(
                p.addr,
                args.conns,
                args.open_concurrency,
                args.idle_only,
                req.clone(),
            ))?;
            let open_secs = t0.elapsed().as_secs_f64();
            // Let agentlb finish its bookkeeping for the last answers.
            std::thread::sleep(Duration::from_millis(300));
            let open_kib = rss_kib(pid)?;
            let fds_open = fd_count(pid)?;
            let served = conns.len();
            drop(conns);
            // Client connections close; idle upstream connections (kept by
            // agentlb's pool, at most `limits.upstream_idle_per_backend`) may stay.
            let deadline = Instant::now() + Duration::from_secs(60);
            let (mut last, mut stable_since) = (usize::MAX, Instant::now());
            loop {
                let now = fd_count(pid)?;
                if now != last {
                    (last, stable_since) = (now, Instant::now());
                } else if now <= p.base_fds + UPSTREAM_IDLE_SLACK
                    && stable_since.elapsed() >= Duration::from_secs(1)
                {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{}: {now} fds still open 60 s after the storm closed (base {})",
                        p.variant.name,
                        p.base_fds
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let fds_after = last;
            std::thread::sleep(Duration::from_millis(args.settle_ms));
            let after_kib = rss_kib(pid)?;
            println!(
                "round {:>2} {:<12} open {:>7.1} MiB ({} fds, {:.1} s)  after close {:>7.1} MiB ({} fds)",
                round + 1,
                p.variant.name,
                open_kib as f64 / 1024.0,
                fds_open,
                open_secs,
                after_kib as f64 / 1024.0,
                fds_after
            );
            p.rounds.push(Round {
                open_kib,
                after_kib,
                fds_open,
                fds_after,
                open_secs,
                served,
            });
        }
    }
    let elapsed = began.elapsed().as_secs_f64();
    for p in &mut procs_v {
        let _ = p.guard.terminate(Duration::from_secs(5));
    }
    drop(backend);
    let md = markdown(&args, &procs_v, &machine, elapsed);
    print!("\n{md}");
    let out = root.join(&args.out);
    fs::create_dir_all(&out)?;
    fs::write(out.join("storm.md"), &md)?;
    let json = json!({
        "machine": machine,
        "rounds": args.rounds,
        "conns": args.conns,
        "idle_only": args.idle_only,
        "workers": args.workers,
        "settle_ms": args.settle_ms,
        "elapsed_s": elapsed,
        "variants": procs_v.iter().map(|p| json!({
            "name": p.variant.name,
            "config": p.variant.toml,
            "env": p.variant.env,
            "base_kib": p.base_kib,
            "rounds": p.rounds.iter().map(|r| json!({
                "open_kib": r.open_kib,
                "after_kib": r.after_kib,
                "fds_open": r.fds_open,
                "fds_after": r.fds_after,
                "open_s": r.open_secs,
                "served": r.served,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    fs::write(out.join("storm.json"), serde_json::to_vec_pretty(&json)?)?;
    if args.publish {
        fs::write(root.join("bench/STORM.md"), &md)?;
    }
    Ok(())
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn markdown(args: &Args, ps: &[Proc], machine: &str, elapsed: f64) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Connection storms: agentlb's resident memory\n\n`cargo xtask bench storm` — {} rounds of {} keep-alive connections{} per variant, all open at once, then all closed; RSS read with all open and {} ms after agentlb's fds were back to their level before the storm. agentlb `--workers {}`, `--no-kernel`, variants interleaved round by round. {machine}; {elapsed:.0} s.\n",
        args.rounds,
        args.conns,
        if args.idle_only {
            " (opened, no request)"
        } else {
            " (one small completion answered on each)"
        },
        args.settle_ms,
        args.workers,
    );
    let _ = write!(md, "| round |");
    for p in ps {
        let _ = write!(
            md,
            " {} open (MiB) | {} after close (MiB) |",
            p.variant.name, p.variant.name
        );
    }
    let _ = write!(md, "\n|---|");
    for _ in ps {
        let _ = write!(md, "---:|---:|");
    }
    let _ = write!(md, "\n| before |");
    for p in ps {
        let _ = write!(md, " | {} |", mib(p.base_kib));
    }
    md.push('\n');
    for r in 0..args.rounds {
        let _ = write!(md, "| {} |", r + 1);
        for p in ps {
            match p.rounds.get(r) {
                Some(x) => {
                    let _ = write!(md, " {} | {} |", mib(x.open_kib), mib(x.after_kib));
                }
                None => {
                    let _ = write!(md, " – | – |");
                }
            }
        }
        md.push('\n');
    }
    md.push('\n');
    for p in ps {
        let afters: Vec<u64> = p.rounds.iter().map(|r| r.after_kib).collect();
        let peak = p.rounds.iter().map(|r| r.open_kib).max().unwrap_or(0);
        let last = afters.last().copied().unwrap_or(0);
        let first = afters.first().copied().unwrap_or(0);
        let _ = writeln!(
            md,
            "- **{}**{}: before {} MiB, peak {} MiB, after round 1 {} MiB, after round {} {} MiB (last − first after-close: {:+.1} MiB).",
            p.variant.name,
            if p.variant.toml.is_empty() && p.variant.env.is_empty() {
                String::new()
            } else {
                let mut s: Vec<String> = p
                    .variant
                    .toml
                    .lines()
                    .filter(|l| !l.starts_with('['))
                    .map(|l| format!("`{l}`"))
                    .collect();
                s.extend(p.variant.env.iter().map(|(k, v)| format!("`{k}={v}`")));
                format!(" ({})", s.join(", "))
            },
            mib(p.base_kib),
            mib(peak),
            mib(first),
            afters.len(),
            mib(last),
            (last as f64 - first as f64) / 1024.0,
        );
    }
    md
}

/// The request every connection sends: a small non-streaming completion, kept
/// alive.
fn completion_request() -> Vec<u8> {
    let body = backend::request_body(false);
    let mut req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    req
}

/// Raises this process's open-file limit (inherited by the agentlb processes).
fn raise_nofile(want: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    if lim.rlim_cur >= want {
        return Ok(());
    }
    lim.rlim_cur = want.max(lim.rlim_cur);
    lim.rlim_max = lim.rlim_max.max(lim.rlim_cur);
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        bail!(
            "cannot raise the open-file limit to {want} ({}); run with a higher `ulimit -n`",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
