//! Lingering close: a client that sends its whole (too large) body before reading gets
//! agentlb's 413 answer, not a reset. Wire-level with a raw socket, and with Python's
//! `urllib` (which does exactly that) when the test Python is available.

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use testkit::{Lb, Sim, temp_file};

const BODY: usize = 40 * 1024 * 1024;

/// `AGENTLB_TEST_LINGER_MS` overrides the lingering time (0 shows the reset it prevents).
fn linger() -> u64 {
    std::env::var("AGENTLB_TEST_LINGER_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn lb(sim: &Sim) -> Result<Lb> {
    let conf = temp_file(
        "linger.toml",
        &format!(
            "[limits]\nmax_body_bytes = 1048576\nlinger_ms = {}\n",
            linger()
        ),
    )?;
    Lb::start(&[
        "--config".into(),
        conf.to_string_lossy().into_owned(),
        "--backend".into(),
        sim.url(),
    ])
}

/// Sends the whole body, then reads the answer: the status line, or the error.
fn send_all_then_read(port: u16) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {BODY}\r\n\r\n"
    );
    s.write_all(head.as_bytes())?;
    let chunk = vec![b' '; 1 << 20];
    for _ in 0..BODY / chunk.len() {
        s.write_all(&chunk).context("writing the body")?;
    }
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[test]
fn a_client_sending_its_whole_body_first_gets_the_413() -> Result<()> {
    let sim = Sim::start(&[])?;
    let lb = lb(&sim)?;
    for i in 0..3 {
        let answer = send_all_then_read(lb.port).with_context(|| format!("attempt {i}"))?;
        ensure!(
            answer.starts_with("HTTP/1.1 413") && answer.contains("\"error\""),
            "attempt {i}: {answer:?}"
        );
    }
    // Python's urllib sends the body before reading the answer.
    let Ok(py) = std::env::var("AGENTLB_PYTHON") else {
        assert!(
            std::env::var("AGENTLB_REQUIRE_PYTHON").as_deref() != Ok("1"),
            "AGENTLB_PYTHON is unset and AGENTLB_REQUIRE_PYTHON=1"
        );
        eprintln!("urllib part skipped: AGENTLB_PYTHON unset (cargo xtask test sets it)");
        return Ok(());
    };
    let script = format!(
        r#"
import urllib.request, urllib.error, json
body = b" " * {BODY}
for i in range(3):
    req = urllib.request.Request("{url}", data=body, headers={{"Content-Type": "application/json"}})
    try:
        urllib.request.urlopen(req, timeout=30)
        raise SystemExit("attempt %d: no error" % i)
    except urllib.error.HTTPError as e:
        assert e.code == 413, e.code
        err = json.loads(e.read())["error"]
        assert err["type"], err
print("ok")
"#,
        url = lb.url("/v1/chat/completions")
    );
    let out = Command::new(py).args(["-c", &script]).output()?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "urllib: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
