//! HTTP/1.1 on the wire through the real `agentlb` binary: pipelining, chunked
//! request bodies, `Expect: 100-continue`, HTTP/1.0 clients, smuggling shapes,
//! heads beyond any internal buffer, and upstream connection reuse (including
//! pooled connections the backend closed while idle). Backends are real
//! processes (`tiny-backend`, `vllm-sim`) or raw TCP servers in the test process
//! ([`raw_backend`]) when a test needs exact response bytes; clients are raw TCP
//! sockets so every byte is checked.
//!
//! The regression tests of issue #14 (an adversarial run) are at the end: label
//! injection into `/metrics`, trailers that hid a pipelined request, upstream heads
//! past 64 KiB, `Host` rules, the 431 message, admin authentication and header
//! timeout, and transfer codings relayed to the client.

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
        } else if headers.get("transfer-encoding").is_some_and(|v| {
            // The final coding (`gzip, chunked` is chunked on the wire).
            v.rsplit(',')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
        }) {
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

// ---- Issue #14 regressions ----

/// A backend on 127.0.0.1 in this process: health probes and other `GET`s get
/// `{}`; every `POST` gets `answer`, written with one `write_all`, and then the
/// connection is closed (so close-delimited answers end).
fn raw_backend(answer: Vec<u8>) -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    let answer = std::sync::Arc::new(answer);
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let answer = answer.clone();
            std::thread::spawn(move || {
                let _ = serve_raw(s, &answer);
            });
        }
    });
    Ok(port)
}

fn serve_raw(mut s: TcpStream, answer: &[u8]) -> Result<()> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16384];
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut tmp)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&tmp[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < end + len {
            let n = s.read(&mut tmp)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&tmp[..n]);
        }
        buf.drain(..end + len);
        if head.starts_with("post ") {
            s.write_all(answer)?;
            s.shutdown(std::net::Shutdown::Write)?;
            return Ok(());
        }
        s.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
        )?;
    }
}

/// One sample of an exposition: metric name, labels (unescaped), value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
}

/// Parses an OpenMetrics/Prometheus text exposition strictly, line by line:
/// `# HELP|TYPE|UNIT name ...`, `# EOF` last, and samples
/// `name{label="value",...} number [timestamp]` with label values escaped as
/// the format requires (only `\\`, `\"` and `\n`).
fn parse_exposition(text: &str) -> Result<Vec<Sample>> {
    fn name_ok(n: &str) -> bool {
        let mut c = n.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
    }
    fn number_ok(v: &str) -> bool {
        matches!(v, "+Inf" | "-Inf" | "NaN") || v.parse::<f64>().is_ok()
    }
    let mut samples = Vec::new();
    let mut lines = text.split('\n').collect::<Vec<_>>();
    if lines.last() == Some(&"") {
        lines.pop();
    }
    if lines.last() != Some(&"# EOF") {
        bail!("the exposition does not end with # EOF");
    }
    lines.pop();
    for (i, line) in lines.iter().enumerate() {
        let at = || format!("line {}: {line:?}", i + 1);
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap_or("");
            let name = parts.next().unwrap_or("");
            if !matches!(kind, "HELP" | "TYPE" | "UNIT") || !name_ok(name) {
                bail!("bad descriptor at {}", at());
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).context(at())?;
        let name = &line[..name_end];
        if !name_ok(name) {
            bail!("bad metric name at {}", at());
        }
        let mut labels = Vec::new();
        let mut rest = &line[name_end..];
        if let Some(mut r) = rest.strip_prefix('{') {
            loop {
                if let Some(after) = r.strip_prefix('}') {
                    r = after;
                    break;
                }
                let eq = r.find('=').context(at())?;
                let key = &r[..eq];
                if !name_ok(key) || key.contains(':') {
                    bail!("bad label name {key:?} at {}", at());
                }
                r = r[eq + 1..].strip_prefix('"').context(at())?;
                let mut value = String::new();
                let mut chars = r.char_indices();
                let close = loop {
                    match chars.next() {
                        Some((j, '"')) => break j,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, '\\')) => value.push('\\'),
                            Some((_, '"')) => value.push('"'),
                            Some((_, 'n')) => value.push('\n'),
                            _ => bail!("bad escape in a label value at {}", at()),
                        },
                        Some((_, c)) => value.push(c),
                        None => bail!("unterminated label value at {}", at()),
                    }
                };
                labels.push((key.to_owned(), value));
                r = &r[close + 1..];
                if let Some(after) = r.strip_prefix(',') {
                    r = after;
                } else if !r.starts_with('}') {
                    bail!("expected , or }} after a label at {}", at());
                }
            }
            rest = r;
        }
        let rest = rest.strip_prefix(' ').context(at())?;
        let mut fields = rest.split(' ');
        let value = fields.next().unwrap_or("");
        if !number_ok(value) || fields.any(|t| !number_ok(t)) {
            bail!("bad sample value at {}", at());
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels,
        });
    }
    Ok(samples)
}

#[test]
fn exposition_validator_rejects_forged_and_broken_lines() {
    let ok = "# TYPE a counter\na_total{w=\"x\\\",forged=\\\"yes\",b=\"\\\\\"} 1\n# EOF\n";
    let s = parse_exposition(ok).expect("valid");
    assert_eq!(
        s[0].labels,
        [
            ("w".to_owned(), "x\",forged=\"yes".to_owned()),
            ("b".to_owned(), "\\".to_owned())
        ]
    );
    for bad in [
        "a_total{w=\"wf\"}evil{x=\"1\\\"} 1\n# EOF\n",
        "a_total{w=\"x\\q\"} 1\n# EOF\n",
        "a_total{w=\"x\n\"} 1\n# EOF\n",
        "a_total 1\n",
    ] {
        assert!(parse_exposition(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn request_ids_cannot_inject_metric_labels() -> Result<()> {
    let (_b, port) = backend("b0", None)?;
    let lb = lb_for(port)?;
    let workflow = r#"x",forged="yes"#;
    let agent = r#"wf"}evil{x="1\"#;
    let mut c = Client::connect(lb.port)?;
    c.send(&post(
        "/v1/completions",
        &format!("x-workflow-id: {workflow}\r\nx-agent-id: {agent}\r\n"),
        "{}",
    ))?;
    assert_eq!(c.read_response()?.status, 200);
    // From the body too: a backslash and a quote.
    let body_wf = r#"b\"s"#;
    let body = json!({"workflow_id": body_wf, "agent_id": "a\\"}).to_string();
    c.send(&post("/v1/completions", "", &body))?;
    assert_eq!(c.read_response()?.status, 200);

    let text = ureq::get(&lb.admin_url("/metrics")).call()?.into_string()?;
    let samples = parse_exposition(&text).with_context(|| text.clone())?;
    for s in &samples {
        for (k, _) in &s.labels {
            assert!(
                !matches!(k.as_str(), "forged" | "x"),
                "forged label {k} on {}:\n{text}",
                s.name
            );
        }
    }
    let has = |name: &str, key: &str, value: &str| {
        samples
            .iter()
            .any(|s| s.name == name && s.labels == [(key.to_owned(), value.to_owned())])
    };
    for (name, key, value) in [
        ("agentlb_workflow_requests_total", "workflow", workflow),
        ("agentlb_agent_requests_total", "agent", agent),
        ("agentlb_workflow_requests_total", "workflow", body_wf),
        ("agentlb_agent_requests_total", "agent", "a\\"),
    ] {
        assert!(
            has(name, key, value),
            "no {name}{{{key}={value:?}}}:\n{text}"
        );
    }
    Ok(())
}

fn chunked_post(tail: &str) -> Vec<u8> {
    format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{{}}\r\n{tail}"
    )
    .into_bytes()
}

#[test]
fn trailers_cannot_hide_a_pipelined_request() -> Result<()> {
    let (_b, port) = backend("b0", None)?;
    let lb = lb_for(port)?;
    let next = "GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n";
    // A well-formed trailer, then the next request: two answers.
    let mut c = Client::connect(lb.port)?;
    c.send(&chunked_post(&format!("0\r\nX: 1\r\n\r\n{next}")))?;
    assert_eq!(c.read_response()?.status, 200);
    assert_eq!(c.read_response()?.json()?["object"], "list");
    // A bare LF in a trailer (the head parser would take it as a line end) and a
    // trailer line without a colon: 400, the connection closed; never one answer
    // that swallowed the next request.
    for tail in [
        format!("0\r\nX: 1\n\r\n{next}"),
        format!("0\r\nnocolon\r\n\r\n{next}"),
        format!("0\r\n{next}"),
    ] {
        let mut c = Client::connect(lb.port)?;
        c.send(&chunked_post(&tail))?;
        let r = c.read_response()?;
        assert_eq!(
            r.status,
            400,
            "{tail:?}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()?["error"]["code"], "invalid_framing", "{tail:?}");
        assert!(c.closed(), "{tail:?}: the connection is closed");
    }
    // Bare LF in a head is refused the same way.
    let mut c = Client::connect(lb.port)?;
    c.send(b"GET /v1/models HTTP/1.1\nHost: x\r\n\r\n")?;
    let r = c.read_response()?;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()?["error"]["code"], "malformed_http");
    Ok(())
}

#[test]
fn upstream_heads_past_64_kib_are_502_even_in_one_read() -> Result<()> {
    let answer = |n: usize| {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-big: {}\r\ncontent-length: 2\r\n\r\n{{}}",
            "a".repeat(n)
        )
        .into_bytes()
    };
    for (size, status) in [(60_000, 200), (70_000, 502), (200_000, 502)] {
        let port = raw_backend(answer(size))?;
        let lb = lb_for(port)?;
        let mut c = Client::connect(lb.port)?;
        c.send(&post("/v1/completions", "", "{}"))?;
        let r = c.read_response()?;
        assert_eq!(r.status, status, "a {size}-byte header");
        if status == 200 {
            assert_eq!(r.headers.get("x-big").map(String::len), Some(size));
        } else {
            assert_eq!(r.json()?["error"]["code"], "bad_gateway", "{size}");
        }
    }
    Ok(())
}

#[test]
fn http11_requests_need_exactly_one_host() -> Result<()> {
    let (_b, port) = backend("b0", None)?;
    let lb = lb_for(port)?;
    for (req, status) in [
        ("GET /v1/models HTTP/1.1\r\n\r\n", 400),
        ("GET /v1/models HTTP/1.1\r\nhost: a\r\nHost: b\r\n\r\n", 400),
        ("GET /v1/models HTTP/1.1\r\nhost: a\r\nhost: a\r\n\r\n", 400),
        ("GET /v1/models HTTP/1.0\r\nhost: a\r\nhost: b\r\n\r\n", 400),
        ("GET /v1/models HTTP/1.0\r\n\r\n", 200),
        (
            "GET /v1/models HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
            200,
        ),
    ] {
        let mut c = Client::connect(lb.port)?;
        c.send(req.as_bytes())?;
        let r = c.read_response()?;
        assert_eq!(r.status, status, "{req:?}");
        if status == 400 {
            assert_eq!(r.json()?["error"]["code"], "invalid_host", "{req:?}");
            assert!(c.closed(), "{req:?}");
        }
    }
    // A POST without Host is refused before its body is read.
    let mut c = Client::connect(lb.port)?;
    c.send(b"POST /v1/completions HTTP/1.1\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")?;
    assert_eq!(c.read_response()?.status, 400);
    Ok(())
}

#[test]
fn the_431_message_names_the_limit_that_was_hit() -> Result<()> {
    let (_b, port) = backend("b0", None)?;
    let lb = lb_for(port)?;
    let many: String = (0..200).map(|i| format!("x-h{i}: 1\r\n")).collect();
    let mut c = Client::connect(lb.port)?;
    c.send(format!("GET /v1/models HTTP/1.1\r\nhost: x\r\n{many}\r\n").as_bytes())?;
    let r = c.read_response()?;
    assert_eq!(r.status, 431);
    let msg = r.json()?["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(msg.contains("128 header fields"), "{msg}");
    assert!(!msg.contains("bytes"), "{msg}");
    let mut c = Client::connect(lb.port)?;
    let big = "a".repeat(20_000);
    let _ =
        c.send(format!("GET /v1/models HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n").as_bytes());
    let r = c.read_response()?;
    assert_eq!(r.status, 431);
    let msg = r.json()?["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(msg.contains("16384 bytes"), "{msg}");
    Ok(())
}

/// agentlb with a config file (`[server] admin_token`, `[limits]`) and one backend.
fn lb_with_config(port: u16, toml: &str) -> Result<Lb> {
    let file = testkit::temp_file("agentlb-h1.toml", toml)?;
    Lb::start(&[
        "--config".into(),
        file.display().to_string(),
        "--backend".into(),
        format!("http://127.0.0.1:{port}"),
    ])
}

#[test]
fn admin_bearer_scheme_is_case_insensitive() -> Result<()> {
    let (_b, port) = backend("b0", None)?;
    let lb = lb_with_config(port, "[server]\nadmin_token = \"s3cret\"\n")?;
    let status = |auth: Option<&str>| -> Result<u16> {
        let mut req = ureq::get(&lb.admin_url("/admin/backends"));
        if let Some(a) = auth {
            req = req.set("authorization", a);
        }
        Ok(match req.call() {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(code, _)) => code,
            Err(e) => bail!("{e}"),
        })
    };
    for auth in [
        "Bearer s3cret",
        "bearer s3cret",
        "BEARER s3cret",
        "bEaReR  s3cret",
    ] {
        assert_eq!(status(Some(auth))?, 200, "{auth}");
    }
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Basic s3cret"),
        Some("bearers3cret"),
    ] {
        assert_eq!(status(auth)?, 401, "{auth:?}");
    }
    Ok(())
}

#[test]
fn admin_connections_honour_the_header_read_timeout() -> Result<()> {
    let (_b, port) = backend("b0", None)?;
    let lb = lb_with_config(port, "[limits]\nheader_read_timeout_ms = 500\n")?;
    for partial in [&b""[..], b"GET /metrics HTTP/1.1\r\nhost: x\r\n"] {
        let mut s = TcpStream::connect(("127.0.0.1", lb.admin))?;
        s.set_read_timeout(Some(Duration::from_secs(8)))?;
        s.write_all(partial)?;
        let t = std::time::Instant::now();
        let mut sink = Vec::new();
        // EOF (or a reset) ends it; a read timeout would be an error.
        match s.read_to_end(&mut sink) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => bail!("not closed: {e}"),
        }
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_secs(3),
            "closed after {took:?}, expected about 500 ms"
        );
    }
    Ok(())
}

#[test]
fn transfer_codings_other_than_chunked_reach_the_client() -> Result<()> {
    // gzip("hello, agentlb"), as a backend would send it.
    const GZ: [u8; 34] = [
        31, 139, 8, 0, 0, 0, 0, 0, 2, 3, 203, 72, 205, 201, 201, 215, 81, 72, 76, 79, 205, 43, 201,
        73, 2, 0, 18, 12, 61, 60, 14, 0, 0, 0,
    ];
    let chunked = {
        let mut a = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: gzip, chunked\r\n\r\n".to_vec();
        for part in GZ.chunks(20) {
            a.extend(format!("{:x}\r\n", part.len()).as_bytes());
            a.extend(part);
            a.extend(b"\r\n");
        }
        a.extend(b"0\r\n\r\n");
        a
    };
    let close_delimited = {
        let mut a =
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: gzip\r\n\r\n"
                .to_vec();
        a.extend(GZ);
        a
    };
    for answer in [chunked, close_delimited] {
        let port = raw_backend(answer)?;
        let lb = lb_for(port)?;
        let mut c = Client::connect(lb.port)?;
        c.send(&post("/v1/completions", "", "{}"))?;
        let r = c.read_response()?;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.headers.get("transfer-encoding").map(String::as_str),
            Some("gzip, chunked")
        );
        assert_eq!(r.body, GZ, "the gzip coding arrives intact");
        // An HTTP/1.0 client cannot be sent a transfer coding: 502, not a
        // silently different body.
        let mut c = Client::connect(lb.port)?;
        c.send(b"POST /v1/completions HTTP/1.0\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")?;
        let r = c.read_response()?;
        assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    }
    Ok(())
}

/// The value of the sample `series` (name with its label set as exposed, e.g.
/// `agentlb_connections_open{path="user"}`) in agentlb's `/metrics`, 0 when absent.
fn metric(lb: &Lb, series: &str) -> Result<f64> {
    let text = ureq::get(&lb.admin_url("/metrics")).call()?.into_string()?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0))
}

/// Defect 7 of #14: after a storm of connections closes, agentlb hands the freed
/// heap back (the RSS curve itself is `cargo xtask bench storm`); with
/// `memory_trim_ms = 0` it never does. Connections are counted per data path.
#[test]
fn closed_connection_storms_hand_memory_back() -> Result<()> {
    let (_b, port) = backend("b0", None)?;
    for (trim_ms, want_trims) in [(100, true), (0, false)] {
        let lb = lb_with_config(port, &format!("[limits]\nmemory_trim_ms = {trim_ms}\n"))?;
        let mut clients = Vec::new();
        for _ in 0..100 {
            let mut c = Client::connect(lb.port)?;
            c.send(&post("/v1/completions", "", "{}"))?;
            assert_eq!(c.read_response()?.status, 200);
            clients.push(c);
        }
        assert_eq!(
            metric(&lb, r#"agentlb_connections_open{path="user"}"#)?,
            100.0
        );
        assert_eq!(
            metric(&lb, r#"agentlb_connections_total{path="user"}"#)?,
            100.0
        );
        drop(clients);
        let closed = wait_until(Duration::from_secs(10), || {
            (metric(&lb, r#"agentlb_connections_open{path="user"}"#).ok()? == 0.0).then_some(())
        });
        assert!(closed.is_some(), "connections still counted open");
        // Ten trim periods.
        std::thread::sleep(Duration::from_secs(1));
        let trims = metric(&lb, "agentlb_memory_trims_total")?;
        assert_eq!(
            trims > 0.0,
            want_trims,
            "memory_trim_ms = {trim_ms}: {trims} trims"
        );
    }
    Ok(())
}

/// `limits.max_connections`: at the limit agentlb stops accepting; a connection
/// waiting in the backlog is served as soon as another closes.
#[test]
fn the_connection_limit_holds_new_connections_until_one_closes() -> Result<()> {
    let (_b, port) = backend("b0", None)?;
    let lb = lb_with_config(port, "[limits]\nmax_connections = 3\n")?;
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(lb.port)?;
        c.send(&post("/v1/completions", "", "{}"))?;
        assert_eq!(c.read_response()?.status, 200);
        open.push(c);
    }
    let mut waiting = Client::connect(lb.port)?;
    waiting.send(&post("/v1/completions", "", "{}"))?;
    waiting
        .s
        .set_read_timeout(Some(Duration::from_millis(700)))?;
    let mut tmp = [0u8; 64];
    match waiting.s.read(&mut tmp) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => bail!("the 4th connection was served past the limit: {other:?}"),
    }
    assert!(metric(&lb, "agentlb_connections_at_limit_total")? >= 1.0);
    assert_eq!(
        metric(&lb, r#"agentlb_connections_open{path="user"}"#)?,
        3.0
    );
    drop(open.pop());
    waiting.s.set_read_timeout(Some(Duration::from_secs(10)))?;
    assert_eq!(waiting.read_response()?.status, 200);
    Ok(())
}
