//! Shared helpers of the integration tests: spawn a real `vllm-sim` on free loopback ports.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// A running `vllm-sim` child process (killed on drop).
pub struct Sim {
    child: Child,
    /// HTTP ports of the instances.
    pub ports: Vec<u16>,
    /// Admin port, if started with `--admin-port 0`.
    pub admin_port: Option<u16>,
    /// `[pub, replay]` KV event ports per instance, if enabled.
    pub kv_ports: Vec<Option<(u16, u16)>>,
}

impl Sim {
    /// Starts `vllm-sim --base-port 0 ARGS...` and waits for its ready line.
    pub fn spawn(args: &[&str]) -> Sim {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vllm-sim"))
            .args(["--host", "127.0.0.1", "--base-port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn vllm-sim");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let mut r = BufReader::new(stdout);
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the child never blocks on a full pipe.
            let mut sink = String::new();
            while r.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("vllm-sim ready line");
        let v: Value = serde_json::from_str(&line).expect("ready json");
        let ports = v["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .map(|p| p.as_u64().expect("port") as u16)
            .collect();
        let admin_port = v["admin_port"].as_u64().map(|p| p as u16);
        let kv_ports = v["kv_events"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| {
                        x.as_array().map(|p| {
                            (
                                p[0].as_u64().expect("pub") as u16,
                                p[1].as_u64().expect("replay") as u16,
                            )
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Sim {
            child,
            ports,
            admin_port,
            kv_ports,
        }
    }

    /// `http://127.0.0.1:{port of instance i}{path}`.
    pub fn url(&self, i: usize, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.ports[i], path)
    }

    /// Admin URL.
    pub fn admin(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}{}",
            self.admin_port.expect("started with --admin-port"),
            path
        )
    }

    /// PID of the child.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client with a bounded timeout and no proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// `GET url`, answer parsed as JSON (panics naming the URL otherwise).
pub async fn get_json(c: &reqwest::Client, url: &str) -> Value {
    let r = c.get(url).send().await;
    r.unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

/// `POST url` with a JSON body, answer parsed as JSON.
pub async fn post_json(c: &reqwest::Client, url: &str, body: &Value) -> Value {
    let r = c.post(url).json(body).send().await;
    r.unwrap_or_else(|e| panic!("POST {url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: not JSON: {e}"))
}

/// The status of `GET url` once the server accepts connections (after a
/// restart of its listener), or `None` if it does not within 5 s.
pub async fn wait_up(url: &str) -> Option<reqwest::StatusCode> {
    for _ in 0..250 {
        if let Ok(r) = client().get(url).send().await {
            return Some(r.status());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Deterministic filler text of `n` characters (4 chars per token by default).
pub fn text(seed: u64, n: usize) -> String {
    const WORDS: &[&str] = &[
        "lorem ", "ipsum ", "dolor ", "sit ", "amet ", "quux ", "zeta ",
    ];
    let mut s = String::with_capacity(n + 8);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while s.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(WORDS[(x % WORDS.len() as u64) as usize]);
    }
    s.truncate(n);
    s
}

/// Posts a chat request; returns (status, headers, json body).
pub async fn chat(
    c: &reqwest::Client,
    url: &str,
    messages: Value,
    max_tokens: u64,
) -> (reqwest::StatusCode, reqwest::header::HeaderMap, Value) {
    let r = c
        .post(url)
        .json(&serde_json::json!({
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "messages": messages,
            "max_tokens": max_tokens,
        }))
        .send()
        .await
        .expect("send");
    let status = r.status();
    let headers = r.headers().clone();
    let body = r.json::<Value>().await.expect("json body");
    (status, headers, body)
}

/// A float `x-sim-*` header.
pub fn hdr_f64(h: &reqwest::header::HeaderMap, name: &str) -> f64 {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("header {name}"))
}

/// Scrapes `/metrics` and returns the value of a sample (first match on name).
pub async fn metric(c: &reqwest::Client, url: &str, name: &str) -> f64 {
    let text = c
        .get(url)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (lhs, v) = line.rsplit_once(' ').expect("sample");
        let n = lhs.split('{').next().expect("name");
        if n == name {
            return v.parse().expect("value");
        }
    }
    panic!("metric {name} not found");
}

/// `(family name, type)` from a `# TYPE` line.
pub type FamilyType = (String, String);

/// One parsed sample.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Metric name (with `_bucket`/`_sum`/`_count`/`_total` suffixes as written).
    pub name: String,
    /// Labels in order.
    pub labels: Vec<(String, String)>,
    /// Value.
    pub value: f64,
}

/// A strict parser of the Prometheus text exposition format 0.0.4 (the format vLLM serves):
/// `# HELP name text`, `# TYPE name counter|gauge|histogram|summary|untyped`, and samples
/// `name{l="v",...} value`, with names matching `[a-zA-Z_:][a-zA-Z0-9_:]*` and every sample
/// belonging to a declared family. Returns (family types, samples) or an error message.
pub fn parse_prometheus(text: &str) -> Result<(Vec<FamilyType>, Vec<Sample>), String> {
    fn valid_name(n: &str) -> bool {
        let mut ch = n.chars();
        matches!(ch.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
            && ch.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    let mut types: Vec<(String, String)> = Vec::new();
    let mut samples = Vec::new();
    for (ln, line) in text.lines().enumerate() {
        let err = |m: &str| format!("line {}: {m}: {line:?}", ln + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut it = rest.splitn(3, ' ');
            match (it.next(), it.next(), it.next()) {
                (Some("HELP"), Some(n), _) if valid_name(n) => {}
                (Some("TYPE"), Some(n), Some(t)) if valid_name(n) => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) {
                        return Err(err("bad type"));
                    }
                    if types.iter().any(|(x, _)| x == n) {
                        return Err(err("duplicate TYPE"));
                    }
                    types.push((n.to_string(), t.to_string()));
                }
                _ => return Err(err("bad comment")),
            }
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => return Err(err("no value")),
        };
        if !valid_name(name) {
            return Err(err("bad name"));
        }
        let mut labels = Vec::new();
        let rest = if let Some(r) = rest.strip_prefix('{') {
            let end = r.find('}').ok_or_else(|| err("unclosed labels"))?;
            for pair in r[..end].split(',').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').ok_or_else(|| err("bad label"))?;
                if !valid_name(k) || k.contains(':') {
                    return Err(err("bad label name"));
                }
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .ok_or_else(|| err("unquoted label value"))?;
                labels.push((k.to_string(), v.to_string()));
            }
            &r[end + 1..]
        } else {
            rest
        };
        let vtext = rest.trim_start_matches(' ');
        let value = match vtext {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse::<f64>().map_err(|_| err("bad value"))?,
        };
        let family = types.iter().find(|(f, t)| {
            name == f
                || (t == "histogram"
                    && [
                        format!("{f}_bucket"),
                        format!("{f}_sum"),
                        format!("{f}_count"),
                    ]
                    .iter()
                    .any(|x| x == name))
        });
        if family.is_none() {
            return Err(err("sample without a TYPE"));
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok((types, samples))
}
