//! HTTP/1.1 on the wire through the real `agentlb` binary: pipelining, chunked
//! request bodies, `Expect: 100-continue`, HTTP/1.0 clients, smuggling shapes,
//! heads beyond any internal buffer, and upstream connection reuse (including
//! pooled connections the backend closed while idle). Backends are real
//! processes (`tiny-backend`, `vllm-sim`); clients are raw TCP sockets so every
//! byte is checked.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use testkit::{Lb, Proc, Sim, fnv1a, free_port, wait_until};

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

fn backend(name: &str, idle_close_ms: Option<u64>) -> Result<(Proc, u16)> {
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tiny-backend"));
    cmd.arg(name).arg(format!("127.0.0.1:{port}"));
    if let Some(ms) = idle_close_ms {
        cmd.arg(ms.to_string());
    }
    let p = Proc::spawn(name, cmd)?;
    wait_until(Duration::from_secs(10), || {
        p.output().contains("listening").then_some(())
    })
    .context("backend did not start")?;
    Ok((p, port))
}

/// agentlb with one worker (the single-threaded scheduler; the other suites
/// run the multi-threaded default).
fn lb_for(port: u16) -> Result<Lb> {
    Lb::start(&[
        "--backend".into(),
        format!("http://127.0.0.1:{port}"),
        "--workers".into(),
        "1".into(),
    ])
}

/// One parsed response.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// A client connection that reads responses one at a time (Content-Length,
/// chunked, or until close).
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(port: u16) -> Result<Self> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Self { s, buf: Vec::new() })
    }

    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.s.write_all(bytes)?;
        Ok(())
    }

    fn fill(&mut self) -> Result<bool> {
        let mut tmp = [0u8; 16384];
        let n = self.s.read(&mut tmp)?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n > 0)
    }

    fn read_response(&mut self) -> Result<Resp> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !self.fill()? {
                bail!("closed before a response head");
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end);
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .context("status line")?;
        let mut headers = HashMap::new();
        for l in lines.filter(|l| !l.is_empty()) {
            if let Some((k, v)) = l.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let mut body = Vec::new();
        if (100..200).contains(&status) {
            return Ok(Resp {
                status,
                headers,
                body,
            });
        }
        if let Some(n) = headers.get("content-length") {
            let n: usize = n.parse()?;
            while self.buf.len() < n {
                if !self.fill()? {
                    bail!("closed mid-body");
                }
            }
            body = self.buf.drain(..n).collect();
        } else if headers
            .get("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let line_end = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    if !self.fill()? {
                        bail!("closed in chunk size");
                    }
                };
                let size = usize::from_str_radix(
                    String::from_utf8_lossy(&self.buf[..line_end])
                        .split(';')
                        .next()
                        .unwrap_or(""),
                    16,
                )?;
                self.buf.drain(..line_end + 2);
                while self.buf.len() < size + 2 {
                    if !self.fill()? {
                        bail!("closed in chunk data");
                    }
                }
                body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
                if size == 0 {
                    break;
                }
            }
        } else {
            while self.fill()? {}
            body = std::mem::take(&mut self.buf);
        }
        Ok(Resp {
            status,
            headers,
            body,
        })
    }

    /// Whether the server closed the connection (EOF with nothing buffered).
    fn closed(&mut self) -> bool {
        self.buf.is_empty() && matches!(self.fill(), Ok(false) | Err(_))
    }
}

fn post(path: &str, extra: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn pipelined_requests_are_answered_in_order() -> Result<()> {
    let (_b, port) = backend("b0", None)?;
    let lb = lb_for(port)?;
    let mut c = Client::connect(lb.port)?;
    let mut all = Vec::new();
    for i in 0..3 {
        all.extend(post(
            "/v1/completions",
            &format!("x-workflow-id: wf-{i}\r\n"),
            r#"{"model":"m","prompt":"hi"}"#,
        ));
    }
    c.send(&all)?;
    for i in 0..3 {
        let r = c.read_response()?;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()?["workflow_id"], format!("wf-{i}"));
        assert!(r.headers.contains_key("x-request-id"));
        assert!(r.headers.contains_key("x-agentlb-backend"));
    }
    Ok(())
}

#[test]
fn chunked_request_body_is_forwarded_byte_exact() -> Result<()> {
    let (_b, port) = backend("b0", None)?;
    let lb = lb_for(port)?;
    let body =
        json!({"model": "m", "prompt": "é ".repeat(3000), "workflow_id": "wf-chunked"}).to_string();
    let bytes = body.as_bytes();
    let (a, rest) = bytes.split_at(10);
    let (b, c) = rest.split_at(rest.len() / 2);
    let mut req = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for (i, part) in [a, b, c].iter().enumerate() {
        req.extend(format!("{:x};ext={i}\r\n", part.len()).as_bytes());
        req.extend(*part);
        req.extend(b"\r\n");
    }
    req.extend(b"0\r\nx-trailer: 1\r\n\r\n");
    let mut cl = Client::connect(lb.port)?;
    // Sent in pieces, as a streaming client would.
    for piece in req.chunks(700) {
        cl.send(piece)?;
        std::thread::sleep(Duration::from_millis(2));
    }
    let r = cl.read_response()?;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json()?;
    assert_eq!(v["body_bytes"], bytes.len());
    assert_eq!(v["body_fnv"], fnv1a(bytes));
    // The connection stays usable.
    cl.send(&post("/v1/completions", "", "{}"))?;
    assert_eq!(cl.read_response()?.status, 200);
    Ok(())
}

#[test]
fn expect_100_continue_and_http10_clients() -> Result<()> {
    let sim = Sim::start(&["--time-scale", "50"])?;
    let lb = Lb::start(&["--backend".into(), sim.url()])?;
    wait_until(Duration::from_secs(10), || {
        testkit::get_json(&lb.url("/v1/models"))
            .ok()
            .filter(|v| v["data"].as_array().is_some_and(|a| !a.is_empty()))
    })
    .context("models")?;
    let body = json!({"model": MODEL, "prompt": "hello", "max_tokens": 3}).to_string();
    let mut c = Client::connect(lb.port)?;
    c.send(
        format!(
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )?;
    let interim = c.read_response()?;
    assert_eq!(interim.status, 100, "the body is asked for");
    c.send(body.as_bytes())?;
    let r = c.read_response()?;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()?["usage"]["completion_tokens"], 3);

    // HTTP/1.0 and a streamed answer: no chunked coding, the close ends it.
    let stream_body =
        json!({"model": MODEL, "prompt": "hello", "max_tokens": 5, "stream": true}).to_string();
    let mut c = Client::connect(lb.port)?;
    c.send(
        format!(
            "POST /v1/completions HTTP/1.0\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{stream_body}",
            stream_body.len()
        )
        .as_bytes(),
    )?;
    let r = c.read_response()?;
    assert_eq!(r.status, 200);
    assert!(
        !r.headers.contains_key("transfer-encoding"),
        "{:?}",
        r.headers
    );
    let text = String::from_utf8_lossy(&r.body);
    assert!(text.starts_with("data: {"), "{text}");
    assert!(text.contains(r#""finish_reason":"length""#), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    Ok(())
}

#[test]
fn smuggling_shapes_and_huge_heads_get_json_errors() -> Result<()> {
    let (_b, port) = backend("b0", None)?;
    let lb = lb_for(port)?;
    for head in [
        "content-length: 2\r\ntransfer-encoding: chunked\r\n",
        "content-length: 2\r\ncontent-length: 3\r\n",
        "transfer-encoding: gzip, chunked\r\n",
    ] {
        let mut c = Client::connect(lb.port)?;
        c.send(format!("POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{head}\r\n{{}}").as_bytes())?;
        let r = c.read_response()?;
        assert_eq!(r.status, 400, "{head}");
        assert_eq!(r.json()?["error"]["code"], "invalid_framing", "{head}");
        assert_eq!(
            r.headers.get("connection").map(String::as_str),
            Some("close")
        );
        assert!(c.closed(), "the connection is closed after {head}");
    }
    // A head far beyond the limit (and any internal buffer): JSON 431, closed.
    let mut c = Client::connect(lb.port)?;
    let big = "a".repeat(200 * 1024);
    let _ = c.send(format!("POST /v1/completions HTTP/1.1\r\nx-big: {big}\r\n\r\n").as_bytes());
    let r = c.read_response()?;
    assert_eq!(r.status, 431);
    assert_eq!(r.json()?["error"]["code"], "headers_too_large");
    // Not HTTP at all: JSON 400.
    let mut c = Client::connect(lb.port)?;
    c.send(b"\x16\x03\x01 not http\r\n\r\n")?;
    let r = c.read_response()?;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()?["error"]["code"], "malformed_http");
    // An error to a client that asked to close says so, and closes.
    let mut c = Client::connect(lb.port)?;
    c.send(b"GET /nope HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")?;
    let r = c.read_response()?;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()?["error"]["code"], "not_found");
    assert_eq!(
        r.headers.get("connection").map(String::as_str),
        Some("close")
    );
    assert!(c.closed());
    // Others are still served.
    let mut c = Client::connect(lb.port)?;
    c.send(&post("/v1/completions", "", "{}"))?;
    assert_eq!(c.read_response()?.status, 200);
    Ok(())
}

#[test]
fn upstream_connections_are_reused_and_stale_ones_replaced_silently() -> Result<()> {
    // The backend closes connections idle for 300 ms.
    let (_b, port) = backend("b0", Some(300))?;
    let lb = lb_for(port)?;
    let mut c = Client::connect(lb.port)?;
    let mut conns = Vec::new();
    for _ in 0..20 {
        c.send(&post("/v1/completions", "", "{}"))?;
        let r = c.read_response()?;
        assert_eq!(r.status, 200);
        conns.push(r.json()?["connection"].as_u64().context("connection")?);
    }
    conns.dedup();
    assert_eq!(
        conns.len(),
        1,
        "20 sequential requests share one upstream connection"
    );
    let first = conns[0];
    // Let the backend close the pooled connection, then use it: under the
    // liveness-check age (a failed send, then a new connection) and over it.
    for pause in [Duration::from_millis(600), Duration::from_millis(1500)] {
        std::thread::sleep(pause);
        c.send(&post("/v1/completions", "", "{}"))?;
        let r = c.read_response()?;
        assert_eq!(
            r.status,
            200,
            "after {pause:?}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_ne!(r.json()?["connection"].as_u64(), Some(first));
    }
    let m = ureq::get(&lb.admin_url("/metrics")).call()?.into_string()?;
    assert!(
        !m.lines()
            .any(|l| l.starts_with("agentlb_upstream_errors_total{") && !l.ends_with(" 0")),
        "a stale pooled connection is not a backend failure:\n{m}"
    );
    Ok(())
}
