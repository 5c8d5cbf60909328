//! A backend that answers before reading the whole request body and closes (an early
//! 413 from a server with a smaller body limit, as nginx or vLLM behind a proxy do): the
//! client gets that answer through agentlb, not a 502, and the connection is not reused.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use testkit::Lb;

const ANSWER: &str = r#"{"error":{"message":"body too large for this backend","type":"BadRequestError","param":null,"code":413}}"#;

/// A backend that reads the request head only, answers 413 and closes with the body
/// unread (the kernel then resets the connection). Counts connections.
fn early_backend(stop: Arc<AtomicBool>) -> Result<(u16, Arc<AtomicUsize>)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    l.set_nonblocking(true)?;
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut s, _)) = l.accept() else {
                thread::sleep(Duration::from_millis(5));
                continue;
            };
            c.fetch_add(1, Ordering::Relaxed);
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
                match s.read(&mut b) {
                    Ok(1) => head.push(b[0]),
                    _ => break,
                }
            }
            let health = head.starts_with(b"GET ");
            let body = if health { "{}" } else { ANSWER };
            let status = if health {
                "200 OK"
            } else {
                "413 Payload Too Large"
            };
            let _ = s.write_all(
                format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
            // Close with the request body unread.
            drop(s);
        }
    });
    Ok((port, conns))
}

fn post(port: u16, body_len: usize) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {body_len}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )?;
    let mut body = Vec::with_capacity(body_len);
    body.extend_from_slice(br#"{"model":"m","messages":[{"role":"user","content":""#);
    body.resize(body_len - 4, b'a');
    body.extend_from_slice(br#""}]}"#);
    s.write_all(&body)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[test]
fn an_early_backend_answer_reaches_the_client() -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let (port, _conns) = early_backend(stop.clone())?;
    let lb = Lb::start(&[
        "--backend".into(),
        format!("http://127.0.0.1:{port}"),
        "--policy".into(),
        "round_robin".into(),
    ])?;
    for (i, len) in [8 << 20, 8 << 20, 4 << 20].into_iter().enumerate() {
        let answer = post(lb.port, len).with_context(|| format!("attempt {i}"))?;
        ensure!(
            answer.starts_with("HTTP/1.1 413")
                && answer.contains("body too large for this backend"),
            "attempt {i}: {}",
            &answer[..answer.len().min(300)]
        );
    }
    stop.store(true, Ordering::Relaxed);
    Ok(())
}
