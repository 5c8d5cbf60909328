//! Privileged suite: the kernel fast path's connection pinning (`kernel.pinning`)
//! across real network stacks.
//!
//! Topology per test: three network namespaces — client, gateway, backends —
//! joined by two veth pairs (198.18.0.0/30 client⇄gateway, 198.18.1.0/30
//! gateway⇄backends), so every byte crosses real TCP stacks on both sides of
//! agentlb. agentlb runs in the gateway namespace inside the test's own cgroup
//! with `kernel.mode = "required"` and pinning on; `vllm-sim` instances run in
//! the backend namespace. Clients are raw sockets in the client namespace that
//! decode every response (chunked SSE) themselves.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use testkit::{
    NetNs, PinDir, Proc, TestCgroup, get_json, privileged, veth_pair, wait_until, workspace_bin,
};

const GW: &str = "198.18.0.2";
const BACKEND_NET: &str = "198.18.1.2";
const ADMIN: &str = "127.0.0.1:9090";
const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

struct World {
    client: NetNs,
    gw: NetNs,
    be: NetNs,
    cg: TestCgroup,
    pins: PinDir,
}

impl World {
    fn new() -> Result<Self> {
        let client = NetNs::new("pc")?;
        let gw = NetNs::new("pg")?;
        let be = NetNs::new("pb")?;
        veth_pair(
            &client,
            "eth0",
            "198.18.0.1/30",
            &gw,
            "eth0",
            "198.18.0.2/30",
        )?;
        veth_pair(&gw, "eth1", "198.18.1.1/30", &be, "eth0", "198.18.1.2/30")?;
        Ok(Self {
            client,
            gw,
            be,
            cg: TestCgroup::new()?,
            pins: PinDir::new(),
        })
    }

    /// `vllm-sim` in the backend namespace on 198.18.1.2:`port`.
    fn sim(&self, port: u16) -> Result<Proc> {
        let mut cmd = self.be.command(workspace_bin("vllm-sim"));
        cmd.args([
            "--host",
            BACKEND_NET,
            "--instances",
            "1",
            "--base-port",
            &port.to_string(),
            "--time-scale",
            "50",
            "--kv-events-base-port",
            "0",
        ]);
        self.cg.place(&mut cmd);
        let mut p = Proc::spawn("vllm-sim", cmd)?;
        let url = format!("http://{BACKEND_NET}:{port}/health");
        let up = wait_until(Duration::from_secs(20), || {
            if p.try_wait().is_some() {
                return Some(false);
            }
            self.be
                .run({
                    let url = url.clone();
                    move || ureq::get(&url).call().is_ok()
                })
                .ok()
                .filter(|ok| *ok)
        });
        ensure!(up == Some(true), "vllm-sim did not start: {}", p.output());
        Ok(p)
    }

    fn agentlb(&self, backends: &[u16], extra: &str) -> Result<Proc> {
        self.agentlb_health(backends, extra, "interval_ms = 200\ntimeout_ms = 500\n")
    }

    /// agentlb with these `[health]` settings.
    fn agentlb_health(&self, backends: &[u16], extra: &str, health: &str) -> Result<Proc> {
        let mut conf = format!(
            "[server]\nlisten = \"{GW}:8080\"\nadmin = \"{ADMIN}\"\n\n\
             [routing]\npolicy = \"workflow\"\n\n\
             [health]\n{health}\n\
             [kernel]\nmode = \"required\"\npin_dir = \"{}\"\npinning = true\n{extra}\n",
            self.pins.path().display()
        );
        for p in backends {
            conf.push_str(&format!(
                "\n[[backends]]\nurl = \"http://{BACKEND_NET}:{p}\"\n"
            ));
        }
        let file = testkit::temp_file("agentlb-pinning.toml", &conf)?;
        let mut cmd = self.gw.command(workspace_bin("agentlb"));
        cmd.arg("run").arg("--config").arg(&file);
        self.cg.place(&mut cmd);
        let mut p = Proc::spawn("agentlb", cmd)?;
        let ready = wait_until(Duration::from_secs(20), || {
            if p.try_wait().is_some() {
                return Some(false);
            }
            self.gw
                .run(|| get_json(&format!("http://{ADMIN}/ready")))
                .ok()
                .and_then(Result::ok)
                .filter(|v| v["ready"] == true)
                .map(|_| true)
        });
        ensure!(
            ready == Some(true),
            "agentlb did not start:\n{}",
            p.output()
        );
        Ok(p)
    }

    fn metrics(&self) -> Result<String> {
        self.gw.run(|| -> Result<String> {
            Ok(ureq::get(&format!("http://{ADMIN}/metrics"))
                .call()?
                .into_string()?)
        })?
    }

    fn dataplane(&self) -> Result<Value> {
        self.gw
            .run(|| get_json(&format!("http://{ADMIN}/admin/dataplane")))?
    }
}

/// The value of `series` in an exposition (0 when absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// A streamed chat request with a workflow id, kept alive.
fn chat(workflow: &str, prompt: &str) -> Vec<u8> {
    let body = serde_json::json!({
        "model": MODEL,
        "stream": true,
        "max_tokens": 24,
        "messages": [{"role": "user", "content": prompt}],
    })
    .to_string();
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n\
         x-workflow-id: {workflow}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One decoded response.
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// Reads one HTTP/1.1 response (Content-Length or chunked) from `s`, keeping
/// what follows it in `buf`.
fn read_answer(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Answer> {
    fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<()> {
        let mut tmp = [0u8; 16384];
        let n = s.read(&mut tmp)?;
        if n == 0 {
            bail!(
                "connection closed mid-response ({} bytes buffered)",
                buf.len()
            );
        }
        buf.extend_from_slice(&tmp[..n]);
        Ok(())
    }
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        fill(s, buf)?;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    buf.drain(..end);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .context("status line")?;
    let field = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    };
    let mut body = Vec::new();
    if let Some(len) = field("content-length") {
        let len: usize = len.parse()?;
        while buf.len() < len {
            fill(s, buf)?;
        }
        body.extend(buf.drain(..len));
    } else if field("transfer-encoding").is_some_and(|t| t.ends_with("chunked")) {
        loop {
            let line_end = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                fill(s, buf)?;
            };
            let size_text = String::from_utf8_lossy(&buf[..line_end]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .with_context(|| format!("chunk size {size_text:?}"))?;
            buf.drain(..line_end + 2);
            if size == 0 {
                while !buf.starts_with(b"\r\n") {
                    if buf.len() >= 2 {
                        bail!("trailers not expected");
                    }
                    fill(s, buf)?;
                }
                buf.drain(..2);
                break;
            }
            while buf.len() < size + 2 {
                fill(s, buf)?;
            }
            body.extend(buf.drain(..size));
            ensure!(buf.starts_with(b"\r\n"), "chunk not followed by CRLF");
            buf.drain(..2);
        }
    } else {
        bail!("response without length: {head}");
    }
    Ok(Answer { status, head, body })
}

/// The generated text of an SSE chat stream (ids and timestamps differ between
/// runs; the text does not: vllm-sim is deterministic per prompt), and whether
/// it ended with `[DONE]`.
fn sse_text(body: &[u8]) -> Result<(String, bool)> {
    let text = std::str::from_utf8(body)?;
    let mut out = String::new();
    let mut done = false;
    for ev in text.split("\n\n").filter(|e| !e.trim().is_empty()) {
        let data = ev
            .strip_prefix("data: ")
            .with_context(|| format!("not an SSE data event: {ev:?}"))?;
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).with_context(|| format!("event {data:?}"))?;
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            out.push_str(c);
        }
    }
    Ok((out, done))
}

/// A request of connection `c`, round `r`: odd connections send no workflow id
/// (they stay on the userspace path).
fn mixed_request(c: usize, r: usize) -> Vec<u8> {
    let req = chat(&format!("wf-{c}"), &format!("p-{c}-{r}"));
    if c % 2 == 1 {
        let text = String::from_utf8_lossy(&req).replace(&format!("x-workflow-id: wf-{c}\r\n"), "");
        return text.into_bytes();
    }
    req
}

/// `conns` keep-alive connections to `addr`, `per_conn` streamed requests each,
/// all connections in flight at once per round. Returns every answer's text
/// by (connection, round).
fn rounds(addr: (&'static str, u16), conns: usize, per_conn: usize) -> Result<Vec<Vec<String>>> {
    let mut socks = Vec::new();
    for _ in 0..conns {
        let s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        socks.push((s, Vec::new()));
    }
    let mut texts = vec![Vec::new(); conns];
    for r in 0..per_conn {
        for (c, (s, _)) in socks.iter_mut().enumerate() {
            s.write_all(&mixed_request(c, r))?;
        }
        for (c, (s, buf)) in socks.iter_mut().enumerate() {
            let a = read_answer(s, buf).with_context(|| format!("conn {c} request {r}"))?;
            ensure!(
                a.status == 200,
                "conn {c} request {r}: {} {}",
                a.status,
                a.head
            );
            let (text, done) = sse_text(&a.body)?;
            ensure!(done, "conn {c} request {r}: no [DONE]");
            ensure!(!text.is_empty(), "conn {c} request {r}: empty answer");
            ensure!(buf.is_empty(), "conn {c}: bytes after the response");
            texts[c].push(text);
        }
    }
    Ok(texts)
}

/// Through agentlb, from the client namespace.
fn run_clients(w: &World, conns: usize, per_conn: usize) -> Result<Vec<Vec<String>>> {
    w.client.run(move || rounds((GW, 8080), conns, per_conn))?
}

/// The same requests sent straight to the backend from the gateway namespace.
fn direct_texts(w: &World, port: u16, conns: usize, per_conn: usize) -> Result<Vec<Vec<String>>> {
    w.gw.run(move || rounds((BACKEND_NET, port), conns, per_conn))?
}

#[test]
fn pinned_connections_are_forwarded_by_the_kernel_byte_exact() -> Result<()> {
    if !privileged("pinned_connections_are_forwarded_by_the_kernel_byte_exact") {
        return Ok(());
    }
    let w = World::new()?;
    let _sim = w.sim(8000)?;
    let mut lb = w.agentlb(&[8000], "")?;
    // 10,000 streamed requests on 200 connections; half carry a workflow id
    // (handed to the kernel after request 1), half none (userspace throughout).
    let (conns, per_conn) = (200, 50);
    let pinned = conns / 2;
    let through = run_clients(&w, conns, per_conn)?;
    let direct = direct_texts(&w, 8000, conns, per_conn)?;
    ensure!(
        through == direct,
        "answers through agentlb differ from direct ones"
    );

    let m = w.metrics()?;
    let handoffs = metric(&m, "agentlb_kernel_handoffs_total");
    ensure!(
        handoffs == pinned as f64,
        "{handoffs} hand-offs for {pinned} workflow connections:\n{}",
        lb.output()
    );
    let dp = w.dataplane()?;
    let redirected = dp["counters"]["sk_skb_redirected_bytes"]
        .as_u64()
        .unwrap_or(0);
    let failed = dp["counters"]["sk_skb_redirect_failed"]
        .as_u64()
        .unwrap_or(1);
    ensure!(redirected > 0, "the kernel forwarded nothing: {dp}");
    ensure!(failed == 0, "{failed} redirects failed: {dp}");
    // Only request 1 of each workflow connection went through the engine.
    let user_requests: f64 = m
        .lines()
        .filter(|l| l.starts_with("agentlb_requests_total{") && l.contains("route=\"chat\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let want = pinned + (conns - pinned) * per_conn;
    ensure!(
        user_requests == want as f64,
        "{user_requests} requests through userspace, want {want}"
    );
    // Clients leave: every pair closes and leaves no map entry behind.
    let gone = wait_until(Duration::from_secs(10), || {
        let dp = w.dataplane().ok()?;
        (dp["pairs"].as_u64() == Some(0) && dp["sockets"].as_u64() == Some(0)).then_some(())
    });
    ensure!(gone.is_some(), "map entries left: {}", w.dataplane()?);
    let m = w.metrics()?;
    ensure!(
        metric(
            &m,
            r#"agentlb_pinned_pair_closes_total{reason="client_closed"}"#
        ) == pinned as f64,
        "closes:\n{m}"
    );
    ensure!(
        metric(
            &m,
            r#"agentlb_bytes_total{path="kernel",direction="to_client"}"#
        ) > 0.0
    );
    ensure!(metric(&m, r#"agentlb_connections_open{path="kernel"}"#) == 0.0);
    for dir in ["to_client", "to_upstream"] {
        ensure!(
            metric(
                &m,
                &format!(r#"agentlb_bytes_total{{path="user",direction="{dir}"}}"#)
            ) > 0.0,
            "no userspace bytes {dir}"
        );
    }
    // `agentlb status` says the same at a glance.
    let out =
        w.gw.command(workspace_bin("agentlb"))
            .args(["status", "--admin", ADMIN])
            .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "agentlb status: {out:?}");
    for want in [
        "dataplane    kernel, ".to_owned(),
        "pinning      on, 0 pairs open (ALB_PAIRS 0, ALB_SOCKS 0)".to_owned(),
        format!("hand-offs    {pinned}; refused: none"),
        format!("pair closes  client_closed {pinned}"),
        "redirect failed 0".to_owned(),
    ] {
        ensure!(
            text.contains(&want),
            "{want:?} not in agentlb status:\n{text}"
        );
    }
    lb.terminate(Duration::from_secs(10))?;
    Ok(())
}

/// The `x-agentlb-backend` field of a response head.
fn backend_of(a: &Answer) -> String {
    a.head
        .lines()
        .find_map(|l| l.strip_prefix("x-agentlb-backend:"))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

#[test]
fn a_dead_backend_closes_its_pinned_clients_and_they_move() -> Result<()> {
    if !privileged("a_dead_backend_closes_its_pinned_clients_and_they_move") {
        return Ok(());
    }
    let w = World::new()?;
    let a = w.sim(8000)?;
    let b = w.sim(8001)?;
    let (pid_a, pid_b) = (a.pid(), b.pid());
    let mut lb = w.agentlb(&[8000, 8001], "")?;
    let (home, eof_after, moved_to) =
        w.client
            .run(move || -> Result<(String, Duration, String)> {
                let mut s = TcpStream::connect((GW, 8080))?;
                s.set_read_timeout(Some(Duration::from_secs(20)))?;
                let mut buf = Vec::new();
                s.write_all(&chat("wf-move", "hello"))?;
                let first = read_answer(&mut s, &mut buf)?;
                ensure!(first.status == 200, "{}", first.head);
                let home = backend_of(&first);
                // Request 2 goes through the kernel (no agentlb header on it).
                s.write_all(&chat("wf-move", "again"))?;
                let second = read_answer(&mut s, &mut buf)?;
                ensure!(second.status == 200, "{}", second.head);
                ensure!(
                    backend_of(&second).is_empty(),
                    "request 2 went through userspace"
                );
                // The home dies while the pair is pinned and idle.
                let pid = if home.ends_with(":8000") {
                    pid_a
                } else {
                    pid_b
                };
                // SAFETY: plain kill(2) of a child process of this test.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                let t0 = Instant::now();
                let mut tmp = [0u8; 64];
                let n = s
                    .read(&mut tmp)
                    .context("reading the pinned connection after the kill")?;
                ensure!(n == 0, "{n} unexpected bytes instead of a clean close");
                let eof_after = t0.elapsed();
                // The client reconnects with the same workflow: routed to the survivor.
                let mut s = TcpStream::connect((GW, 8080))?;
                s.set_read_timeout(Some(Duration::from_secs(20)))?;
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    s.write_all(&chat("wf-move", "after"))?;
                    let mut buf = Vec::new();
                    match read_answer(&mut s, &mut buf) {
                        Ok(a) if a.status == 200 => return Ok((home, eof_after, backend_of(&a))),
                        r if Instant::now() < deadline => {
                            drop(r);
                            std::thread::sleep(Duration::from_millis(100));
                            s = TcpStream::connect((GW, 8080))?;
                            s.set_read_timeout(Some(Duration::from_secs(20)))?;
                        }
                        Ok(a) => bail!("after the kill: {} {}", a.status, a.head),
                        Err(e) => return Err(e),
                    }
                }
            })??;
    ensure!(!home.is_empty(), "no x-agentlb-backend header");
    ensure!(
        eof_after < Duration::from_secs(5),
        "the client saw the close only after {eof_after:?}"
    );
    ensure!(
        !moved_to.is_empty() && moved_to != home,
        "after the kill served by {moved_to:?} (home was {home})"
    );
    let m = w.metrics()?;
    ensure!(
        metric(
            &m,
            r#"agentlb_pinned_pair_closes_total{reason="backend_closed"}"#
        ) == 1.0,
        "closes:\n{m}"
    );
    lb.terminate(Duration::from_secs(10))?;
    drop((a, b));
    Ok(())
}

/// Sends `req` on `s` and reads the answer: `Ok(None)` when the connection was
/// closed before any byte of the answer (a keep-alive close at a request
/// boundary, which clients retry), an error when an answer was cut short.
fn exchange(s: &mut TcpStream, req: &[u8]) -> Result<Option<Answer>> {
    if s.write_all(req).is_err() {
        return Ok(None);
    }
    let mut buf = Vec::new();
    let mut tmp = [0u8; 1];
    match s.peek(&mut tmp) {
        Ok(0) | Err(_) => return Ok(None),
        Ok(_) => {}
    }
    read_answer(s, &mut buf).map(Some)
}

#[test]
fn the_kill_switch_under_load_stops_hand_offs_without_cutting_answers() -> Result<()> {
    if !privileged("the_kill_switch_under_load_stops_hand_offs_without_cutting_answers") {
        return Ok(());
    }
    let w = World::new()?;
    let _sim = w.sim(8000)?;
    let mut lb = w.agentlb(
        &[8000],
        "pin_quiet_ms = 150\n\n[limits]\nshutdown_grace_ms = 4000\n",
    )?;
    let admin = |enabled: bool| -> Result<Value> {
        w.gw.run(move || -> Result<Value> {
            Ok(ureq::post(&format!("http://{ADMIN}/admin/pinning"))
                .send_json(serde_json::json!({ "enabled": enabled }))?
                .into_json()?)
        })?
    };
    let handoffs = || -> Result<f64> { Ok(metric(&w.metrics()?, "agentlb_kernel_handoffs_total")) };
    let redirected = || -> Result<u64> {
        Ok(w.dataplane()?["counters"]["sk_skb_redirected"]
            .as_u64()
            .unwrap_or(0))
    };
    let clients = 8;
    let run_for = Duration::from_secs(9);
    let (load, checks) = std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            w.client.run(move || -> Result<(usize, usize)> {
                let workers: Vec<_> = (0..clients)
                    .map(|c| {
                        std::thread::spawn(move || -> Result<(usize, usize)> {
                            let end = Instant::now() + run_for;
                            let connect = || -> Result<TcpStream> {
                                let s = TcpStream::connect((GW, 8080))?;
                                s.set_read_timeout(Some(Duration::from_secs(20)))?;
                                Ok(s)
                            };
                            let mut s = connect()?;
                            let (mut answered, mut reconnects) = (0, 0);
                            let mut r = 0;
                            while Instant::now() < end {
                                let req = chat(&format!("wf-k{c}"), &format!("k-{c}-{r}"));
                                match exchange(&mut s, &req)
                                    .with_context(|| format!("client {c} request {r}"))?
                                {
                                    Some(a) => {
                                        ensure!(a.status == 200, "client {c}: {}", a.head);
                                        ensure!(sse_text(&a.body)?.1, "client {c}: no [DONE]");
                                        answered += 1;
                                        r += 1;
                                        std::thread::sleep(Duration::from_millis(250));
                                    }
                                    None => {
                                        reconnects += 1;
                                        s = connect()?;
                                    }
                                }
                            }
                            Ok((answered, reconnects))
                        })
                    })
                    .collect();
                let mut total = (0, 0);
                for h in workers {
                    let (a, r) = h.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
                    total.0 += a;
                    total.1 += r;
                }
                Ok(total)
            })
        });
        let checks = (|| -> Result<(f64, f64, f64, u64, u64)> {
            std::thread::sleep(Duration::from_millis(1500));
            let before = handoffs()?;
            let st = admin(false)?;
            ensure!(st["enabled"] == false, "{st}");
            // Pairs close at request boundaries (quiet 150 ms) well within the grace.
            let closed = wait_until(Duration::from_secs(6), || {
                let st =
                    w.gw.run(|| get_json(&format!("http://{ADMIN}/admin/pinning")))
                        .ok()?
                        .ok()?;
                (st["open_pairs"] == 0 && st["pair_entries"] == 0).then_some(())
            });
            ensure!(closed.is_some(), "pairs still open after the kill switch");
            let disabled_at = handoffs()?;
            let r0 = redirected()?;
            std::thread::sleep(Duration::from_millis(1500));
            let r1 = redirected()?;
            let still_disabled = handoffs()?;
            ensure!(admin(true)?["enabled"] == true);
            Ok((before, disabled_at, still_disabled, r0, r1))
        })();
        (load.join(), checks)
    });
    let (answered, reconnects) = load.map_err(|_| anyhow::anyhow!("load thread panicked"))???;
    let (before, disabled_at, still_disabled, r0, r1) = checks?;
    ensure!(
        before >= clients as f64,
        "only {before} hand-offs before the switch"
    );
    ensure!(
        still_disabled == disabled_at,
        "hand-offs went on while disabled: {disabled_at} -> {still_disabled}"
    );
    ensure!(
        r1 == r0,
        "the kernel kept redirecting while disabled: {r0} -> {r1}"
    );
    ensure!(
        reconnects >= clients,
        "{reconnects} reconnects: pinned pairs were not closed"
    );
    let after = handoffs()?;
    ensure!(
        after > still_disabled,
        "no hand-off after the switch was reset ({after})"
    );
    ensure!(answered > 10 * clients, "only {answered} answers");
    let m = w.metrics()?;
    ensure!(
        metric(
            &m,
            r#"agentlb_pinned_pair_closes_total{reason="kill_switch"}"#
        ) >= clients as f64,
        "closes:\n{m}"
    );
    lb.terminate(Duration::from_secs(10))?;
    Ok(())
}

/// The answer to `req` straight from the backend on `port` (from the gateway
/// namespace): what any path through agentlb must deliver.
fn direct(w: &World, port: u16, req: Vec<u8>) -> Result<Answer> {
    w.gw.run(move || -> Result<Answer> {
        let mut s = TcpStream::connect((BACKEND_NET, port))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(&req)?;
        read_answer(&mut s, &mut Vec::new())
    })?
}

/// Chat requests served through userspace (the engine's own count).
fn user_chats(m: &str) -> f64 {
    m.lines()
        .filter(|l| l.starts_with("agentlb_requests_total{") && l.contains("route=\"chat\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn pipelining_and_non_http_clients_stay_in_userspace_and_a_pinned_connection_keeps_its_backend()
-> Result<()> {
    if !privileged(
        "pipelining_and_non_http_clients_stay_in_userspace_and_a_pinned_connection_keeps_its_backend",
    ) {
        return Ok(());
    }
    let w = World::new()?;
    let _a = w.sim(8000)?;
    let _b = w.sim(8001)?;
    let mut lb = w.agentlb(&[8000, 8001], "")?;

    // A pipelining client: two requests in one write. The second is already in
    // agentlb's buffer when the first answer ends, so there is no hand-off then
    // (both answers come whole, in order, from the engine); with nothing left
    // buffered after the second, the connection may be handed off then.
    let (p1, p2) = (chat("wf-pipe", "pipe one"), chat("wf-pipe", "pipe two"));
    let (d1, d2) = (direct(&w, 8000, p1.clone())?, direct(&w, 8000, p2.clone())?);
    let (a1, a2) = w.client.run({
        let (p1, p2) = (p1.clone(), p2.clone());
        move || -> Result<(Answer, Answer)> {
            let mut s = TcpStream::connect((GW, 8080))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            s.write_all(&[p1, p2].concat())?;
            let mut buf = Vec::new();
            let a1 = read_answer(&mut s, &mut buf)?;
            let a2 = read_answer(&mut s, &mut buf)?;
            ensure!(buf.is_empty(), "bytes after the second answer");
            Ok((a1, a2))
        }
    })??;
    for (i, (a, d)) in [(&a1, &d1), (&a2, &d2)].into_iter().enumerate() {
        ensure!(a.status == 200, "pipelined answer {i}: {}", a.head);
        ensure!(
            sse_text(&a.body)?.0 == sse_text(&d.body)?.0,
            "pipelined answer {i} differs from the direct one"
        );
        ensure!(
            !backend_of(a).is_empty(),
            "pipelined answer {i} did not come through userspace"
        );
    }
    let m = w.metrics()?;
    ensure!(
        metric(&m, "agentlb_kernel_handoffs_total") <= 1.0,
        "a pipelining client was handed off with a request buffered:\n{m}"
    );
    let after_pipelining = metric(&m, "agentlb_kernel_handoffs_total");
    ensure!(
        metric(
            &m,
            r#"agentlb_kernel_handoff_refusals_total{reason="pipelined"}"#
        ) >= 1.0,
        "refusals:\n{m}"
    );

    // A client that does not speak HTTP (a TLS ClientHello to the plain port):
    // an OpenAI-style 400 from userspace, then a close; nothing enters the maps.
    let raw = w.client.run(|| -> Result<Vec<u8>> {
        let mut s = TcpStream::connect((GW, 8080))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03not http at all\r\n\r\n")?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(out)
    })??;
    let text = String::from_utf8_lossy(&raw);
    ensure!(
        text.starts_with("HTTP/1.1 400"),
        "non-HTTP client got {text:?}"
    );
    ensure!(text.contains("\"error\""), "no JSON error body: {text:?}");
    let dp = w.dataplane()?;
    ensure!(
        dp["pairs"].as_u64() == Some(0) && dp["sockets"].as_u64() == Some(0),
        "map entries after non-HTTP clients: {dp}"
    );

    // A connection handed off for one workflow whose later request names
    // another: as documented, it stays on the pinned backend (the kernel does
    // not read requests), answered in full and without passing through the engine.
    let first = chat("wf-one", "first of one");
    let other = chat("wf-other", "a call of another workflow");
    let before = user_chats(&w.metrics()?);
    let (home, second) = w.client.run(move || -> Result<(String, Answer)> {
        let mut s = TcpStream::connect((GW, 8080))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut buf = Vec::new();
        s.write_all(&first)?;
        let a = read_answer(&mut s, &mut buf)?;
        ensure!(a.status == 200, "{}", a.head);
        s.write_all(&other)?;
        let b = read_answer(&mut s, &mut buf)?;
        Ok((backend_of(&a), b))
    })??;
    ensure!(second.status == 200, "{}", second.head);
    ensure!(
        backend_of(&second).is_empty(),
        "the later request went through userspace"
    );
    let port: u16 = home
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("home {home:?}"))?;
    let want = direct(&w, port, chat("wf-other", "a call of another workflow"))?;
    ensure!(
        sse_text(&second.body)?.0 == sse_text(&want.body)?.0,
        "the other workflow's answer differs from the pinned backend's own"
    );
    let m = w.metrics()?;
    ensure!(
        user_chats(&m) == before + 1.0,
        "userspace served {} chats for 2 requests on a pinned connection",
        user_chats(&m) - before
    );
    ensure!(metric(&m, "agentlb_kernel_handoffs_total") == after_pipelining + 1.0);
    lb.terminate(Duration::from_secs(10))?;
    Ok(())
}

#[test]
fn agentlb_killed_with_pinned_pairs_restarts_clean_and_hands_off_again() -> Result<()> {
    if !privileged("agentlb_killed_with_pinned_pairs_restarts_clean_and_hands_off_again") {
        return Ok(());
    }
    let w = World::new()?;
    let _sim = w.sim(8000)?;
    let mut lb = w.agentlb(&[8000], "")?;
    let conns = 10;
    // Each connection: request 1 in userspace, request 2 through the kernel.
    let open = w.client.run(move || -> Result<Vec<TcpStream>> {
        let mut out = Vec::new();
        for c in 0..conns {
            let mut s = TcpStream::connect((GW, 8080))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            let mut buf = Vec::new();
            for r in 0..2 {
                s.write_all(&chat(&format!("wf-r{c}"), &format!("r-{c}-{r}")))?;
                let a = read_answer(&mut s, &mut buf)?;
                ensure!(a.status == 200, "conn {c} request {r}: {}", a.head);
            }
            out.push(s);
        }
        Ok(out)
    })??;
    ensure!(metric(&w.metrics()?, "agentlb_kernel_handoffs_total") == conns as f64);
    // agentlb dies without any chance to clean up.
    lb.signal(libc::SIGKILL);
    ensure!(
        wait_until(Duration::from_secs(10), || lb.try_wait()).is_some(),
        "agentlb did not die"
    );
    // Every pinned client sees its connection end (the kernel closes a dead
    // process's sockets): no client is left hanging.
    let ended = w.client.run(move || -> Result<usize> {
        let mut n = 0;
        for mut s in open {
            let mut tmp = [0u8; 64];
            match s.read(&mut tmp) {
                Ok(0) | Err(_) => n += 1,
                Ok(k) => bail!("{k} bytes on a connection of a dead gateway"),
            }
        }
        Ok(n)
    })??;
    ensure!(ended == conns, "{ended} of {conns} clients saw the end");
    // A new agentlb on the same pin directory (the pinned maps adopted): the
    // clients reconnect, are handed off again, and nothing of the dead
    // process's pairs is left in the maps.
    let mut lb = w.agentlb(&[8000], "")?;
    let dp = w.dataplane()?;
    ensure!(
        dp["pairs"].as_u64() == Some(0) && dp["sockets"].as_u64() == Some(0),
        "entries of the dead process: {dp}"
    );
    let texts = w.client.run(move || -> Result<usize> {
        let mut answered = 0;
        for c in 0..conns {
            let mut s = TcpStream::connect((GW, 8080))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            let mut buf = Vec::new();
            for r in 0..3 {
                s.write_all(&chat(&format!("wf-r{c}"), &format!("again-{c}-{r}")))?;
                let a = read_answer(&mut s, &mut buf)?;
                ensure!(a.status == 200, "conn {c} request {r}: {}", a.head);
                ensure!(sse_text(&a.body)?.1, "conn {c} request {r}: no [DONE]");
                answered += 1;
            }
        }
        Ok(answered)
    })??;
    ensure!(texts == 3 * conns);
    ensure!(
        metric(&w.metrics()?, "agentlb_kernel_handoffs_total") == conns as f64,
        "the restarted agentlb did not hand off"
    );
    let gone = wait_until(Duration::from_secs(10), || {
        let dp = w.dataplane().ok()?;
        (dp["pairs"].as_u64() == Some(0) && dp["sockets"].as_u64() == Some(0)).then_some(())
    });
    ensure!(gone.is_some(), "map entries left: {}", w.dataplane()?);
    lb.terminate(Duration::from_secs(10))?;
    Ok(())
}

#[test]
fn fifty_thousand_connections_leave_no_map_entries() -> Result<()> {
    if !privileged("fifty_thousand_connections_leave_no_map_entries") {
        return Ok(());
    }
    let w = World::new()?;
    let _sim = w.sim(8000)?;
    let mut lb = w.agentlb(&[8000], "")?;
    let (total, workers) = (50_000usize, 16usize);
    let started = Instant::now();
    // Every connection is handed off after its first answer; every 10th also
    // sends a second request through the kernel; then each closes. Bounded
    // in count and in time.
    let done = w.client.run(move || -> Result<usize> {
        let handles: Vec<_> = (0..workers)
            .map(|k| {
                std::thread::spawn(move || -> Result<usize> {
                    let deadline = Instant::now() + Duration::from_secs(600);
                    let mut n = 0;
                    for c in (k..total).step_by(workers) {
                        ensure!(Instant::now() < deadline, "worker {k} ran out of time");
                        let mut s = TcpStream::connect((GW, 8080))?;
                        s.set_read_timeout(Some(Duration::from_secs(20)))?;
                        let mut buf = Vec::new();
                        let rounds = if c % 10 == 0 { 2 } else { 1 };
                        for r in 0..rounds {
                            let body = serde_json::json!({
                                "model": MODEL, "max_tokens": 2,
                                "messages": [{"role": "user", "content": format!("c{c}r{r}")}],
                            })
                            .to_string();
                            let req = format!(
                                "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n\
                                 content-type: application/json\r\nx-workflow-id: wf-{c}\r\n\
                                 content-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            s.write_all(req.as_bytes())?;
                            let a = read_answer(&mut s, &mut buf)
                                .with_context(|| format!("conn {c} request {r}"))?;
                            ensure!(a.status == 200, "conn {c}: {}", a.head);
                        }
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        let mut n = 0;
        for h in handles {
            n += h.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
        }
        Ok(n)
    })??;
    ensure!(done == total, "{done} of {total} connections completed");
    eprintln!(
        "{total} connections in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let gone = wait_until(Duration::from_secs(20), || {
        let dp = w.dataplane().ok()?;
        (dp["pairs"].as_u64() == Some(0) && dp["sockets"].as_u64() == Some(0)).then_some(())
    });
    ensure!(gone.is_some(), "map entries left: {}", w.dataplane()?);
    let m = w.metrics()?;
    let handoffs = metric(&m, "agentlb_kernel_handoffs_total");
    let closes: f64 = m
        .lines()
        .filter(|l| l.starts_with("agentlb_pinned_pair_closes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    ensure!(
        handoffs >= 0.99 * total as f64,
        "only {handoffs} hand-offs for {total} connections"
    );
    ensure!(
        closes == handoffs,
        "{handoffs} hand-offs but {closes} pair closes"
    );
    ensure!(metric(&m, r#"agentlb_connections_open{path="kernel"}"#) == 0.0);
    lb.terminate(Duration::from_secs(10))?;
    Ok(())
}

#[test]
fn draining_the_pinned_backend_closes_its_pairs_between_requests_and_they_move() -> Result<()> {
    if !privileged("draining_the_pinned_backend_closes_its_pairs_between_requests_and_they_move") {
        return Ok(());
    }
    let w = World::new()?;
    let _a = w.sim(8000)?;
    let _b = w.sim(8001)?;
    let mut lb = w.agentlb(&[8000, 8001], "pin_quiet_ms = 150\n")?;
    let conns = 6;
    // Pinned connections, each with request 2 through the kernel.
    let (open, homes) = w
        .client
        .run(move || -> Result<(Vec<TcpStream>, Vec<String>)> {
            let (mut out, mut homes) = (Vec::new(), Vec::new());
            for c in 0..conns {
                let mut s = TcpStream::connect((GW, 8080))?;
                s.set_read_timeout(Some(Duration::from_secs(20)))?;
                let mut buf = Vec::new();
                s.write_all(&chat(&format!("wf-d{c}"), "one"))?;
                let a = read_answer(&mut s, &mut buf)?;
                ensure!(a.status == 200, "{}", a.head);
                homes.push(backend_of(&a));
                s.write_all(&chat(&format!("wf-d{c}"), "two"))?;
                let b = read_answer(&mut s, &mut buf)?;
                ensure!(b.status == 200 && backend_of(&b).is_empty(), "{}", b.head);
                out.push(s);
            }
            Ok((out, homes))
        })??;
    // Drain the backend most of them are pinned to.
    let drained = if homes.iter().filter(|h| h.ends_with(":8000")).count() * 2 >= conns {
        ":8000"
    } else {
        ":8001"
    };
    let on_drained = homes.iter().filter(|h| h.ends_with(drained)).count();
    ensure!(on_drained > 0);
    let backends =
        w.gw.run(|| get_json(&format!("http://{ADMIN}/admin/backends")))??;
    let id = backends["backends"]
        .as_array()
        .and_then(|v| {
            v.iter()
                .find(|b| b["url"].as_str().is_some_and(|u| u.contains(drained)))
        })
        .and_then(|b| b["id"].as_u64())
        .with_context(|| format!("no backend {drained} in {backends}"))?;
    w.gw.run(move || -> Result<()> {
        ureq::post(&format!("http://{ADMIN}/admin/backends/{id}/drain")).call()?;
        Ok(())
    })??;
    // Pairs on the drained backend close at a quiet moment (clean EOF before
    // any new request); the others stay pinned.
    std::thread::sleep(Duration::from_secs(2));
    let results = w.client.run(move || -> Result<Vec<(bool, String)>> {
        let mut out = Vec::new();
        for (c, s) in open.into_iter().enumerate() {
            s.set_read_timeout(Some(Duration::from_millis(300)))?;
            let mut tmp = [0u8; 1];
            let closed = matches!(s.peek(&mut tmp), Ok(0));
            // Either way the workflow's next request succeeds: on the same
            // connection if it is still open, else on a new one.
            let mut s = if closed {
                let s = TcpStream::connect((GW, 8080))?;
                s.set_read_timeout(Some(Duration::from_secs(20)))?;
                s
            } else {
                s.set_read_timeout(Some(Duration::from_secs(20)))?;
                s
            };
            s.write_all(&chat(&format!("wf-d{c}"), "three"))?;
            let a = read_answer(&mut s, &mut Vec::new())?;
            ensure!(a.status == 200, "conn {c}: {}", a.head);
            out.push((closed, backend_of(&a)));
        }
        Ok(out)
    })??;
    for (c, ((closed, served), home)) in results.iter().zip(&homes).enumerate() {
        if home.ends_with(drained) {
            ensure!(
                *closed,
                "conn {c}: pinned to the drained backend and not closed"
            );
            ensure!(
                !served.is_empty() && !served.ends_with(drained),
                "conn {c}: after the drain served by {served:?}"
            );
        } else {
            ensure!(
                !*closed,
                "conn {c}: pinned elsewhere and closed by the drain"
            );
        }
    }
    let m = w.metrics()?;
    ensure!(
        metric(
            &m,
            r#"agentlb_pinned_pair_closes_total{reason="backend_not_routable"}"#
        ) == on_drained as f64,
        "closes:\n{m}"
    );
    lb.terminate(Duration::from_secs(10))?;
    Ok(())
}

#[test]
fn sock_ops_reports_backend_rtt_and_a_dead_backend_before_its_health_interval() -> Result<()> {
    if !privileged("sock_ops_reports_backend_rtt_and_a_dead_backend_before_its_health_interval") {
        return Ok(());
    }
    let w = World::new()?;
    let a = w.sim(8000)?;
    let _b = w.sim(8001)?;
    // Health checks every 10 s and 3 failures to go: 20 s or more to notice a dead
    // backend by probing alone.
    let mut lb = w.agentlb_health(
        &[8000, 8001],
        "",
        "interval_ms = 10000\ntimeout_ms = 500\nunhealthy_threshold = 3\n",
    )?;
    // Traffic to both backends (12 workflows spread over them), leaving pooled
    // upstream connections open.
    w.client.run(|| -> Result<()> {
        for i in 0..12 {
            let mut s = TcpStream::connect((GW, 8080))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            s.write_all(&chat(&format!("wf-t{i}"), "hello"))?;
            let a = read_answer(&mut s, &mut Vec::new())?;
            ensure!(a.status == 200, "{}", a.head);
        }
        Ok(())
    })??;
    let m = w.metrics()?;
    let srtt = |m: &str, port: u16| -> f64 {
        m.lines()
            .filter(|l| l.starts_with("agentlb_backend_tcp_srtt_seconds{"))
            .find(|l| l.contains(&format!(":{port}")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    ensure!(
        srtt(&m, 8000) > 0.0 && srtt(&m, 8001) > 0.0,
        "no RTT per backend:\n{m}"
    );
    // Backend A dies: its kernel closes every connection agentlb holds to it.
    let killed = Instant::now();
    // SAFETY: plain kill(2) of a child process of this test.
    unsafe { libc::kill(a.pid() as i32, libc::SIGKILL) };
    let healthy = |port: u16| -> Option<bool> {
        let v =
            w.gw.run(|| get_json(&format!("http://{ADMIN}/admin/backends")))
                .ok()?
                .ok()?;
        v["backends"].as_array()?.iter().find(|b| {
            b["url"]
                .as_str()
                .is_some_and(|u| u.contains(&format!(":{port}")))
        })?["healthy"]
            .as_bool()
    };
    let out = wait_until(Duration::from_secs(8), || {
        (healthy(8000) == Some(false)).then_some(())
    });
    ensure!(
        out.is_some(),
        "the dead backend was still healthy {:?} after the kill:\n{}",
        killed.elapsed(),
        lb.output()
    );
    let noticed = killed.elapsed();
    ensure!(
        noticed < Duration::from_secs(5),
        "noticed only after {noticed:?}"
    );
    ensure!(
        healthy(8001) == Some(true),
        "the live backend was taken out"
    );
    let m = w.metrics()?;
    let ends: f64 = m
        .lines()
        .filter(|l| l.starts_with("agentlb_backend_connection_ends_total{"))
        .filter(|l| l.contains(":8000") || l.contains("8000"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    ensure!(
        ends >= 1.0,
        "no connection end reported for the dead backend:\n{m}"
    );
    eprintln!("dead backend out of rotation {noticed:?} after the kill");
    lb.terminate(Duration::from_secs(10))?;
    Ok(())
}
