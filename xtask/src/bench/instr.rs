//! `cargo xtask bench proxy -- --instructions N`: user-space instructions per
//! request of agentlb and nginx, counted by valgrind's callgrind.
//!
//! CPU time on a shared machine moves by ±10% between runs; an instruction
//! count does not. Each target runs twice under callgrind against the built-in
//! backend, once serving `W` requests and once `W + N`, all on one keep-alive
//! connection from a plain blocking client; the difference of the two totals,
//! divided by `N`, is what one request costs in user space (start-up and
//! shutdown cancel out). The kernel's share (system calls, TCP) is not counted:
//! both proxies make the same system calls per request (see the strace notes in
//! the README).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use super::{backend, procs::ChildGuard};

/// Requests served before the measured ones (caches, pools, lazy statics).
pub const WARMUP: usize = 100;

/// A proxy command to run under callgrind: program, arguments, address served.
pub struct Launch {
    /// Program and arguments (run after `valgrind --tool=callgrind ...`).
    pub argv: Vec<String>,
    /// Where it serves the proxy.
    pub addr: SocketAddr,
}

/// Whether valgrind is installed.
pub fn available() -> bool {
    Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Total instructions of one callgrind run serving `n` requests.
fn total(
    name: &str,
    launch: &Launch,
    n: usize,
    stream: bool,
    chunks: usize,
    dir: &Path,
) -> Result<u64> {
    let out = dir.join(format!("callgrind.{name}.{n}.{stream}.out"));
    let _ = std::fs::remove_file(&out);
    let mut cmd = Command::new("valgrind");
    cmd.arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .args(&launch.argv);
    let mut child = ChildGuard::spawn(
        &format!("{name} (callgrind)"),
        cmd,
        dir.join(format!("{name}.callgrind.log")),
        None,
    )?;
    let body = backend::request_body(stream);
    let want = backend::expected_len(stream, chunks);
    let mut conn = connect(launch.addr, &mut child)?;
    for i in 0..n {
        let got = one(&mut conn, &body, stream)
            .with_context(|| format!("{name}: request {i} under callgrind"))?;
        if got != want {
            bail!("{name}: response body of {got} bytes, expected {want}");
        }
    }
    drop(conn);
    child.terminate(Duration::from_secs(60))?;
    let text = std::fs::read_to_string(&out)
        .with_context(|| format!("{name}: no callgrind output {}", out.display()))?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{name}: no totals in {}", out.display()))
}

/// Instructions per request: the difference of a `WARMUP + n` run and a
/// `WARMUP` run, divided by `n`.
pub fn per_request(
    name: &str,
    launch: &dyn Fn() -> Result<Launch>,
    n: usize,
    stream: bool,
    chunks: usize,
    dir: &Path,
) -> Result<f64> {
    let base = total(name, &launch()?, WARMUP, stream, chunks, dir)?;
    let more = total(name, &launch()?, WARMUP + n, stream, chunks, dir)?;
    Ok(more.saturating_sub(base) as f64 / n as f64)
}

/// Connects once the target accepts (valgrind starts slowly).
fn connect(addr: SocketAddr, child: &mut ChildGuard) -> Result<TcpStream> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        child.check_alive()?;
        match TcpStream::connect(addr) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) if std::time::Instant::now() > deadline => {
                bail!("{addr} not accepting under callgrind: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// One request on a keep-alive connection; returns the decoded body length.
fn one(s: &mut TcpStream, body: &[u8], stream: bool) -> Result<usize> {
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut buf = Vec::with_capacity(8192);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        fill(s, &mut buf)?;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        bail!("unexpected response head: {head}");
    }
    buf.drain(..head_end);
    if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        while buf.len() < len {
            fill(s, &mut buf)?;
        }
        return Ok(len);
    }
    if !head.contains("transfer-encoding: chunked") {
        bail!("response without length or chunked coding (stream: {stream})");
    }
    // Chunked: sizes until the last chunk.
    let mut got = 0;
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            fill(s, &mut buf)?;
        };
        let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        buf.drain(..line_end + 2);
        while buf.len() < size + 2 {
            fill(s, &mut buf)?;
        }
        buf.drain(..size + 2);
        got += size;
        if size == 0 {
            return Ok(got);
        }
    }
}

fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<()> {
    let mut tmp = [0u8; 16384];
    let n = s.read(&mut tmp)?;
    if n == 0 {
        bail!("connection closed mid-response");
    }
    buf.extend_from_slice(&tmp[..n]);
    Ok(())
}
