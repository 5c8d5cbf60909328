//! `vllm-sim-bench`: measures the simulator's own cost.
//!
//! Starts `vllm-sim` (the sibling binary, or `--sim PATH`) as a child process with N instances at
//! time-scale 1 on one runtime thread, offers an open-loop load of streamed chat requests
//! (unique ~1k-token prompts, 100-token answers, round-robin over the instances) for a bounded
//! time, and reports achieved simulated requests/s, the child's CPU seconds (from
//! `/proc/<pid>/stat`) and requests/s per core of simulator CPU, as a table and as JSON.
//!
//! `cargo build --release -p lb-sim --bins && target/release/vllm-sim-bench --instances 64 --rate 2000 --duration 15`

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "vllm-sim-bench",
    about = "Measure vllm-sim's CPU cost per simulated request"
)]
struct Args {
    /// Simulated instances.
    #[arg(long, default_value_t = 64)]
    instances: usize,
    /// Offered load, requests per second (open loop).
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Measured seconds (after warm-up).
    #[arg(long, default_value_t = 15.0)]
    duration: f64,
    /// Warm-up seconds (not measured).
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// Prompt length in tokens (4 characters each).
    #[arg(long, default_value_t = 1024)]
    prompt_tokens: usize,
    /// Leading prompt tokens shared by every request (a common system prompt); 0 = all unique.
    #[arg(long, default_value_t = 0)]
    shared_prefix_tokens: usize,
    /// Streamed answer length in tokens.
    #[arg(long, default_value_t = 100)]
    output_tokens: usize,
    /// Tokens per SSE event (the simulator's `--stream-interval`).
    #[arg(long, default_value_t = 1)]
    stream_interval: usize,
    /// Runtime threads of the simulator (1 = one core).
    #[arg(long, default_value_t = 1)]
    sim_threads: usize,
    /// Path of the `vllm-sim` binary (default: next to this one).
    #[arg(long)]
    sim: Option<std::path::PathBuf>,
    /// Write the JSON result here too.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = s.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the comm: state(0) ... utime is field 14 overall → index 11 here, stime 12.
    let ut: f64 = f.get(11).context("utime")?.parse()?;
    let st: f64 = f.get(12).context("stime")?.parse()?;
    Ok((ut + st) / clk_tck())
}

fn self_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id()).unwrap_or(f64::NAN)
}

#[derive(Default)]
struct Stats {
    done: AtomicU64,
    errors: AtomicU64,
    bytes: AtomicU64,
    events: AtomicU64,
    lat_us_sum: AtomicU64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    lb_sim::server::raise_nofile_limit();
    let sim_path = match &args.sim {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("vllm-sim"),
    };
    if !sim_path.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p lb-sim --bins) or pass --sim",
            sim_path.display()
        );
    }
    let mut child = Command::new(&sim_path)
        .args([
            "--host",
            "127.0.0.1",
            "--base-port",
            "0",
            "--time-scale",
            "1",
            "--instances",
            &args.instances.to_string(),
            "--threads",
            &args.sim_threads.to_string(),
            "--default-max-tokens",
            &args.output_tokens.to_string(),
            "--stream-interval",
            &args.stream_interval.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("spawn {}", sim_path.display()))?;
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let ready: serde_json::Value = serde_json::from_str(&line).context("ready line")?;
    let ports: Vec<u16> = ready["ports"]
        .as_array()
        .context("ports")?
        .iter()
        .filter_map(|p| p.as_u64().map(|p| p as u16))
        .collect();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(drive(&args, &ports, pid));
    let _ = child.kill();
    let _ = child.wait();
    let result = result?;
    println!("{}", result.0);
    println!("{}", result.1);
    if let Some(p) = &args.json {
        std::fs::write(p, result.1.to_string())?;
    }
    Ok(())
}

/// One keep-alive HTTP/1.1 connection per in-flight request, pooled per instance. The client
/// reads raw bytes and only checks the status line and the chunked terminator after
/// `data: [DONE]`, so the load generator costs far less CPU than the simulator it measures.
type Pool = Arc<std::sync::Mutex<Vec<Vec<tokio::net::TcpStream>>>>;

/// `GET path` with `Connection: close`; the JSON body, if any.
async fn get_json(port: u16, path: &str) -> Option<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n");
    c.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    c.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf);
    let (_, body) = text.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}

/// Counts `data: ` occurrences (SSE events), including ones split across reads.
fn count_events(carry: &mut Vec<u8>, data: &[u8]) -> u64 {
    const PAT: &[u8] = b"data: ";
    let mut n = 0;
    carry.extend_from_slice(data);
    let mut i = 0;
    while i + PAT.len() <= carry.len() {
        if carry[i] == b'd' && &carry[i..i + PAT.len()] == PAT {
            n += 1;
            i += PAT.len();
        } else {
            i += 1;
        }
    }
    let keep = carry
        .len()
        .saturating_sub(PAT.len() - 1)
        .max(i.min(carry.len()));
    carry.drain(..keep.min(carry.len()));
    n
}

async fn one_request(
    pool: &Pool,
    idx: usize,
    port: u16,
    req: &[u8],
) -> std::io::Result<(u64, u64)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pooled = pool.lock().map(|mut p| p[idx].pop()).unwrap_or(None);
    let mut conn = match pooled {
        Some(c) => c,
        None => {
            let c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            c.set_nodelay(true)?;
            c
        }
    };
    conn.write_all(req).await?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut tail: Vec<u8> = Vec::with_capacity(64);
    let mut total = 0u64;
    let mut events = 0u64;
    let mut carry = Vec::with_capacity(4096);
    let mut first = true;
    loop {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed",
            ));
        }
        if first {
            first = false;
            if !buf[..n].starts_with(b"HTTP/1.1 200") {
                return Err(std::io::Error::other("non-200"));
            }
        }
        total += n as u64;
        events += count_events(&mut carry, &buf[..n]);
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 48 {
            tail.drain(..tail.len() - 48);
        }
        if tail.ends_with(b"data: [DONE]\n\n\r\n0\r\n\r\n") {
            break;
        }
    }
    if let Ok(mut p) = pool.lock() {
        p[idx].push(conn);
    }
    Ok((total, events))
}

async fn drive(
    args: &Args,
    ports: &[u16],
    pid: u32,
) -> anyhow::Result<(String, serde_json::Value)> {
    let pool: Pool = Arc::new(std::sync::Mutex::new(
        (0..ports.len()).map(|_| Vec::new()).collect(),
    ));
    // ~4 chars per token; the template adds ~10 tokens.
    let filler: String = "lorem ipsum dolor sit amet, "
        .chars()
        .cycle()
        .take((args.prompt_tokens.saturating_sub(10)) * 4)
        .collect();
    let shared_chars = (args.shared_prefix_tokens * 4).min(filler.len());
    let stats = Arc::new(Stats::default());
    let start = Instant::now();
    let total = Duration::from_secs_f64(args.warmup + args.duration);
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(1.0));
    let mut next = tokio::time::Instant::now();
    let mut n: u64 = 0;
    let mut cpu0 = (0.0, 0.0);
    let mut t0 = Instant::now();
    let mut done0 = 0;
    let mut measured_started = false;
    while start.elapsed() < total {
        if !measured_started && start.elapsed().as_secs_f64() >= args.warmup {
            measured_started = true;
            cpu0 = (cpu_seconds(pid)?, self_cpu_seconds());
            t0 = Instant::now();
            done0 = stats.done.load(Ordering::Relaxed);
        }
        // Issue all requests due by now (open loop).
        let now = tokio::time::Instant::now();
        while next <= now {
            let idx = (n as usize) % ports.len();
            let port = ports[idx];
            // A unique block right after the shared prefix: no hits beyond it.
            let content = format!(
                "{}req {n:012} {}",
                &filler[..shared_chars],
                &filler[shared_chars..]
            );
            let body = format!(
                "{{\"model\":\"meta-llama/Llama-3.1-8B-Instruct\",\"messages\":[{{\"role\":\"user\",\"content\":\"{content}\"}}],\"max_tokens\":{},\"stream\":true}}",
                args.output_tokens
            );
            let req = format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let pool = pool.clone();
            let stats = stats.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                match one_request(&pool, idx, port, req.as_bytes()).await {
                    Ok((bytes, events)) => {
                        stats.bytes.fetch_add(bytes, Ordering::Relaxed);
                        stats.events.fetch_add(events, Ordering::Relaxed);
                        stats.done.fetch_add(1, Ordering::Relaxed);
                        stats
                            .lat_us_sum
                            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                    }
                    Err(_) => {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            n += 1;
            next += interval;
        }
        tokio::time::sleep_until(next.max(now + Duration::from_millis(1))).await;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu1 = (cpu_seconds(pid)?, self_cpu_seconds());
    // How late the simulator applied its engine steps (its own saturation), worst instance.
    let mut max_lag: f64 = 0.0;
    for &p in ports {
        if let Some(v) = get_json(p, "/sim/info").await {
            max_lag = max_lag.max(v["max_clock_lag_seconds"].as_f64().unwrap_or(0.0));
        }
    }
    let done = stats.done.load(Ordering::Relaxed) - done0;
    let errors = stats.errors.load(Ordering::Relaxed);
    let sim_cpu = cpu1.0 - cpu0.0;
    let gen_cpu = cpu1.1 - cpu0.1;
    let rps = done as f64 / wall;
    let per_core = if sim_cpu > 0.0 {
        done as f64 / sim_cpu
    } else {
        f64::NAN
    };
    let all_done = stats.done.load(Ordering::Relaxed).max(1);
    let mean_lat = stats.lat_us_sum.load(Ordering::Relaxed) as f64 / all_done as f64 / 1e6;
    let events_per_req = stats.events.load(Ordering::Relaxed) as f64 / all_done as f64;
    let table = format!(
        "vllm-sim-bench (time-scale 1, {} instances, {} sim thread(s), {}-token prompts ({} shared), {}-token streamed answers, stream interval {})\n\
         | offered req/s | completed req/s | errors | SSE events/req | sim CPU s | sim cores used | loadgen CPU s | req/s per sim core | mean e2e (s) | max step lateness (ms) |\n\
         |---|---|---|---|---|---|---|---|---|---|\n\
         | {:.0} | {:.1} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {:.0} | {:.3} | {:.1} |",
        args.instances,
        args.sim_threads,
        args.prompt_tokens,
        args.shared_prefix_tokens,
        args.output_tokens,
        args.stream_interval,
        args.rate,
        rps,
        errors,
        events_per_req,
        sim_cpu,
        sim_cpu / wall,
        gen_cpu,
        per_core,
        mean_lat,
        max_lag * 1e3
    );
    let json = serde_json::json!({
        "bench": "vllm-sim",
        "time_scale": 1.0,
        "instances": args.instances,
        "sim_threads": args.sim_threads,
        "prompt_tokens": args.prompt_tokens,
        "shared_prefix_tokens": args.shared_prefix_tokens,
        "output_tokens": args.output_tokens,
        "stream_interval": args.stream_interval,
        "offered_rps": args.rate,
        "measured_seconds": wall,
        "completed": done,
        "errors": errors,
        "sse_events_per_request": events_per_req,
        "completed_rps": rps,
        "sim_cpu_seconds": sim_cpu,
        "sim_cores_used": sim_cpu / wall,
        "loadgen_cpu_seconds": gen_cpu,
        "rps_per_sim_core": per_core,
        "mean_e2e_seconds": mean_lat,
        "max_step_lateness_seconds": max_lag,
        "response_bytes": stats.bytes.load(Ordering::Relaxed),
    });
    Ok((table, json))
}
