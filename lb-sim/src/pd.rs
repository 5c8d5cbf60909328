//! Simulated disaggregated prefill/decode (P/D), speaking vLLM's NixlConnector protocol.
//!
//! A P/D proxy sends each request twice, reading `kv_transfer_params` of the request body:
//! 1. **Prefill leg** (`do_remote_decode: true`) to a prefill instance: served as usual (prompt
//!    prefill plus one token); its JSON answer carries `kv_transfer_params` with
//!    `do_remote_prefill: true`, this incarnation's `remote_engine_id`, `remote_block_ids` (one
//!    per prompt block, a partial last block included), `remote_host`/`remote_port` (the
//!    instance's HTTP address) and `tp_size: 1`. The instance keeps a *pending transfer* for it
//!    until it is pulled, `--kv-transfer-timeout` virtual seconds pass, or
//!    `--max-pending-transfers` newer ones push it out.
//! 2. **Decode leg** (`do_remote_prefill: true` with those fields) to a decode instance, which
//!    pulls the KV (the NIXL read) with `POST http://{remote_host}:{remote_port}/sim/kv_transfer`
//!    `{"engine_id", "block_ids"}` → 200 `{"tokens": n}` (the transfer is forgotten) or 404.
//!    It then waits `n × --kv-transfer-time-per-token` virtual seconds and runs the request with
//!    those prompt tokens already computed ([`crate::engine::RequestSpec::remote_tokens`]).
//!    A failed pull is vLLM's `kv_load_failure_policy=recompute`: the prompt is prefilled locally
//!    and the failure counted.
//!
//! `--kv-role` (`both`, `producer`, `consumer`; one value or one per instance) refuses the leg
//! an instance cannot serve with a 400, as a vLLM instance without the matching `kv_role` would
//! fail the request. Requests without `kv_transfer_params` are served by every role.
//! A revived instance (fault `die` then `none`) is a new incarnation: new engine id, no pending
//! transfers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use thiserror::Error;
use tokio::time::Instant;

use crate::config::PdConfig;

/// Wall-clock limit of one KV pull (connect, request and answer).
pub const PULL_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the P/D layer: bad roles, bad `kv_transfer_params`.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PdError {
    /// An unknown `--kv-role`.
    #[error("invalid kv role {0:?}: expected both, producer or consumer")]
    Role(String),
    /// Malformed `kv_transfer_params`.
    #[error("invalid kv_transfer_params: {0}")]
    Params(String),
}

/// An instance's KV connector role (vLLM's `kv_role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvRole {
    /// `kv_both`: serves prefill and decode legs.
    #[default]
    Both,
    /// `kv_producer`: serves prefill legs only.
    Producer,
    /// `kv_consumer`: serves decode legs only.
    Consumer,
}

impl KvRole {
    /// Parses `both|producer|consumer` (vLLM's `kv_both|kv_producer|kv_consumer` too).
    pub fn parse(s: &str) -> Result<Self, PdError> {
        match s.trim() {
            "both" | "kv_both" => Ok(Self::Both),
            "producer" | "kv_producer" | "prefill" => Ok(Self::Producer),
            "consumer" | "kv_consumer" | "decode" => Ok(Self::Consumer),
            other => Err(PdError::Role(other.to_string())),
        }
    }

    /// Parses a comma-separated list (`producer,producer,consumer`).
    pub fn parse_list(s: &str) -> Result<Vec<Self>, PdError> {
        s.split(',').map(Self::parse).collect()
    }

    /// The CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Both => "both",
            Self::Producer => "producer",
            Self::Consumer => "consumer",
        }
    }

    /// Whether this role serves prefill legs (`do_remote_decode: true`).
    pub fn produces(self) -> bool {
        self != Self::Consumer
    }

    /// Whether this role serves decode legs (`do_remote_prefill: true`).
    pub fn consumes(self) -> bool {
        self != Self::Producer
    }
}

/// Where a decode leg's KV lives (the prefill leg's answer, sent back by the proxy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteKv {
    /// `remote_engine_id`.
    pub engine_id: String,
    /// `remote_block_ids`.
    pub block_ids: Vec<u64>,
    /// `remote_host`.
    pub host: String,
    /// `remote_port`.
    pub port: u16,
}

/// The P/D part a request plays, from its `kv_transfer_params`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leg {
    /// `do_remote_decode: true`: compute the prompt's KV and keep it for a decode instance.
    Prefill,
    /// `do_remote_prefill: true`: pull the KV, then decode.
    Decode(RemoteKv),
}

fn field<'a>(o: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    o.get(k).filter(|v| !v.is_null())
}

fn opt_bool(o: &Map<String, Value>, k: &str) -> Result<bool, PdError> {
    match field(o, k) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(PdError::Params(format!("{k} must be a boolean, got {v}"))),
    }
}

fn opt_str(o: &Map<String, Value>, k: &str) -> Result<Option<String>, PdError> {
    match field(o, k) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(PdError::Params(format!("{k} must be a string, got {v}"))),
    }
}

fn opt_uint(o: &Map<String, Value>, k: &str, max: u64) -> Result<Option<u64>, PdError> {
    match field(o, k) {
        None => Ok(None),
        Some(v) => match v.as_u64().filter(|&n| n <= max) {
            Some(n) => Ok(Some(n)),
            None => Err(PdError::Params(format!(
                "{k} must be an integer in 0..={max}, got {v}"
            ))),
        },
    }
}

fn opt_ids(o: &Map<String, Value>, k: &str) -> Result<Option<Vec<u64>>, PdError> {
    let err = |v: &Value| PdError::Params(format!("{k} must be a list of integers, got {v}"));
    match field(o, k) {
        None => Ok(None),
        Some(v @ Value::Array(a)) => a
            .iter()
            .map(|x| x.as_u64().ok_or_else(|| err(v)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(v) => Err(err(v)),
    }
}

/// Reads a request's `kv_transfer_params`: `None` (absent, `null`, or neither flag set) for an
/// ordinary request; an error for a malformed object (wrong types, both flags, a decode leg
/// without its remote fields).
pub fn parse_params(v: Option<&Value>) -> Result<Option<Leg>, PdError> {
    let o = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(o)) => o,
        Some(other) => {
            return Err(PdError::Params(format!("must be an object, got {other}")));
        }
    };
    let decode = opt_bool(o, "do_remote_decode")?;
    let prefill = opt_bool(o, "do_remote_prefill")?;
    let engine_id = opt_str(o, "remote_engine_id")?;
    let block_ids = opt_ids(o, "remote_block_ids")?;
    let host = opt_str(o, "remote_host")?;
    let port = opt_uint(o, "remote_port", u64::from(u16::MAX))?;
    opt_uint(o, "tp_size", u64::from(u32::MAX))?;
    match (decode, prefill) {
        (false, false) => Ok(None),
        (true, true) => Err(PdError::Params(
            "do_remote_decode and do_remote_prefill cannot both be true".into(),
        )),
        (true, false) => Ok(Some(Leg::Prefill)),
        (false, true) => match (engine_id, block_ids, host, port) {
            (Some(engine_id), Some(block_ids), Some(host), Some(port)) => {
                Ok(Some(Leg::Decode(RemoteKv {
                    engine_id,
                    block_ids,
                    host,
                    port: port as u16,
                })))
            }
            _ => Err(PdError::Params(
                "do_remote_prefill needs remote_engine_id, remote_block_ids, remote_host and \
                 remote_port"
                    .into(),
            )),
        },
    }
}

/// Formats 32 hex characters as a uuid (vLLM engine ids are uuid4 strings).
pub fn uuid_from_hex(hex: &str) -> String {
    if hex.len() != 32 || !hex.is_ascii() {
        return hex.to_string();
    }
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Why a KV pull failed (the decode leg then recomputes).
#[derive(Debug, Error)]
pub enum PullError {
    /// `remote_host`/`remote_port` do not form a URL.
    #[error("bad KV source {0}")]
    Target(String),
    /// Connection or HTTP failure.
    #[error("KV pull from {0} failed: {1}")]
    Http(String, String),
    /// No answer within [`PULL_TIMEOUT`].
    #[error("KV pull from {0} timed out")]
    Timeout(String),
    /// The prefill instance does not hold this transfer (unknown, expired, pulled, restarted).
    #[error("KV pull from {0}: HTTP {1}")]
    Status(String, u16),
    /// A 200 answer without `{"tokens": n}`.
    #[error("KV pull from {0}: bad answer")]
    Body(String),
}

/// The body of `POST /sim/kv_transfer`.
#[derive(Debug, Deserialize)]
pub struct PullRequest {
    /// `remote_engine_id` of the prefill leg's answer.
    pub engine_id: String,
    /// `remote_block_ids` of the prefill leg's answer.
    pub block_ids: Vec<u64>,
}

/// A finished prefill whose KV waits for its decode instance.
#[derive(Debug)]
struct Pending {
    /// Blocks `first..first + blocks` (the map key is `first`).
    blocks: u64,
    /// Prompt tokens in those blocks.
    tokens: usize,
    /// Dropped after this wall instant.
    deadline: Instant,
}

#[derive(Debug)]
struct Inner {
    engine_id: String,
    next_block: u64,
    /// Keyed by first block id; ids only grow, so the first entry is the oldest.
    pending: BTreeMap<u64, Pending>,
}

impl Inner {
    fn purge_expired(&mut self, now: Instant) {
        // Deadlines grow with the key (one timeout for all), so expired entries come first.
        while let Some(e) = self.pending.first_entry() {
            if e.get().deadline > now {
                break;
            }
            e.remove();
        }
    }
}

/// Counters shown in `/sim/info` under `pd`.
#[derive(Debug, Default)]
pub struct PdCounters {
    /// Prefill legs received (`do_remote_decode: true`).
    pub prefill_legs: AtomicU64,
    /// Decode legs received (`do_remote_prefill: true`).
    pub decode_legs: AtomicU64,
    /// Prompt tokens pulled from prefill instances.
    pub transferred_tokens: AtomicU64,
    /// Failed pulls (the decode leg recomputed its prompt).
    pub transfer_failures: AtomicU64,
    /// Generating requests without `kv_transfer_params`.
    pub plain_requests: AtomicU64,
}

/// The P/D state of one instance: its role, engine id, pending transfers and counters.
pub struct PdState {
    role: KvRole,
    timeout: Duration,
    time_per_token_v: f64,
    max_pending: usize,
    inner: Mutex<Inner>,
    /// Counters.
    pub counters: PdCounters,
    client: OnceLock<Client<HttpConnector, Full<Bytes>>>,
}

impl PdState {
    /// The state of a fresh instance; `time_scale` maps the virtual timeout to wall time.
    pub fn new(role: KvRole, cfg: &PdConfig, time_scale: f64, engine_id: String) -> Self {
        Self {
            role,
            timeout: Duration::from_secs_f64((cfg.transfer_timeout_s / time_scale).max(0.0)),
            time_per_token_v: cfg.transfer_time_per_token_s,
            max_pending: cfg.max_pending_transfers.max(1),
            inner: Mutex::new(Inner {
                engine_id,
                next_block: 0,
                pending: BTreeMap::new(),
            }),
            counters: PdCounters::default(),
            client: OnceLock::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The instance's role.
    pub fn role(&self) -> KvRole {
        self.role
    }

    /// The current incarnation's engine id.
    pub fn engine_id(&self) -> String {
        self.lock().engine_id.clone()
    }

    /// Virtual seconds a pull of `tokens` takes.
    pub fn transfer_time_v(&self, tokens: usize) -> f64 {
        tokens as f64 * self.time_per_token_v
    }

    /// Drops every pending transfer (the instance died).
    pub fn clear(&self) {
        self.lock().pending.clear();
    }

    /// Starts a new incarnation (a revived instance): new engine id, no pending transfers.
    pub fn new_incarnation(&self, engine_id: String) {
        let mut g = self.lock();
        g.engine_id = engine_id;
        g.pending.clear();
    }

    /// Records the KV of a finished prefill leg and returns the `kv_transfer_params` of its
    /// answer.
    pub fn offer(&self, prompt_tokens: usize, block_size: usize, host: &str, port: u16) -> Value {
        let blocks = prompt_tokens.div_ceil(block_size.max(1)).max(1) as u64;
        let now = Instant::now();
        let mut g = self.lock();
        g.purge_expired(now);
        let first = g.next_block;
        g.next_block += blocks;
        g.pending.insert(
            first,
            Pending {
                blocks,
                tokens: prompt_tokens,
                deadline: now + self.timeout,
            },
        );
        while g.pending.len() > self.max_pending {
            g.pending.pop_first();
        }
        json!({
            "do_remote_prefill": true,
            "do_remote_decode": false,
            "remote_engine_id": g.engine_id,
            "remote_block_ids": (first..first + blocks).collect::<Vec<u64>>(),
            "remote_host": host,
            "remote_port": port,
            "tp_size": 1,
        })
    }

    /// Hands over a pending transfer (the prefill side of a pull): its token count, once.
    pub fn take(&self, engine_id: &str, block_ids: &[u64]) -> Option<usize> {
        let mut g = self.lock();
        g.purge_expired(Instant::now());
        if g.engine_id != engine_id {
            return None;
        }
        let first = *block_ids.first()?;
        let p = g.pending.get(&first)?;
        let contiguous = block_ids.len() as u64 == p.blocks
            && block_ids.iter().zip(first..).all(|(&a, b)| a == b);
        if !contiguous {
            return None;
        }
        g.pending.remove(&first).map(|p| p.tokens)
    }

    /// Pending transfers (expired ones dropped).
    pub fn pending(&self) -> usize {
        let mut g = self.lock();
        g.purge_expired(Instant::now());
        g.pending.len()
    }

    /// The `pd` object of `/sim/info`.
    pub fn info(&self) -> Value {
        let c = &self.counters;
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "kv_role": self.role.as_str(),
            "engine_id": self.engine_id(),
            "prefill_legs": ld(&c.prefill_legs),
            "decode_legs": ld(&c.decode_legs),
            "transferred_tokens": ld(&c.transferred_tokens),
            "transfer_failures": ld(&c.transfer_failures),
            "pending_transfers": self.pending(),
            "plain_requests": ld(&c.plain_requests),
        })
    }

    /// The decode side of a pull: asks the prefill instance for the KV; its token count.
    pub async fn pull(&self, remote: &RemoteKv) -> Result<usize, PullError> {
        let host = if remote.host.contains(':') && !remote.host.starts_with('[') {
            format!("[{}]", remote.host)
        } else {
            remote.host.clone()
        };
        let url = format!("http://{host}:{}/sim/kv_transfer", remote.port);
        let body = serde_json::to_vec(&json!({
            "engine_id": remote.engine_id,
            "block_ids": remote.block_ids,
        }))
        .map_err(|e| PullError::Body(e.to_string()))?;
        let req = http::Request::post(url.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| PullError::Target(url.clone()))?;
        let client = self
            .client
            .get_or_init(|| Client::builder(TokioExecutor::new()).build_http());
        let exchange = async {
            let resp = client
                .request(req)
                .await
                .map_err(|e| PullError::Http(url.clone(), e.to_string()))?;
            let status = resp.status();
            let bytes = http_body_util::Limited::new(resp.into_body(), 64 << 10)
                .collect()
                .await
                .map_err(|e| PullError::Http(url.clone(), e.to_string()))?
                .to_bytes();
            if !status.is_success() {
                return Err(PullError::Status(url.clone(), status.as_u16()));
            }
            serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v.get("tokens").and_then(Value::as_u64))
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| PullError::Body(url.clone()))
        };
        match tokio::time::timeout(PULL_TIMEOUT, exchange).await {
            Ok(r) => r,
            Err(_) => Err(PullError::Timeout(url)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(max_pending: usize, timeout_s: f64) -> PdState {
        let cfg = PdConfig {
            max_pending_transfers: max_pending,
            transfer_timeout_s: timeout_s,
            ..PdConfig::default()
        };
        PdState::new(KvRole::Producer, &cfg, 1.0, "e1".into())
    }

    #[test]
    fn params_parse_legs_and_reject_bad_types() {
        let prefill = json!({"do_remote_decode": true, "do_remote_prefill": false,
            "remote_engine_id": null, "remote_block_ids": null, "remote_host": null,
            "remote_port": null});
        assert_eq!(parse_params(Some(&prefill)), Ok(Some(Leg::Prefill)));
        let decode = json!({"do_remote_prefill": true, "do_remote_decode": false,
            "remote_engine_id": "e", "remote_block_ids": [0, 1], "remote_host": "127.0.0.1",
            "remote_port": 8000, "tp_size": 1});
        assert_eq!(
            parse_params(Some(&decode)),
            Ok(Some(Leg::Decode(RemoteKv {
                engine_id: "e".into(),
                block_ids: vec![0, 1],
                host: "127.0.0.1".into(),
                port: 8000,
            })))
        );
        assert_eq!(parse_params(None), Ok(None));
        assert_eq!(parse_params(Some(&Value::Null)), Ok(None));
        assert_eq!(parse_params(Some(&json!({}))), Ok(None));
        for bad in [
            json!("x"),
            json!([1]),
            json!({"do_remote_decode": "yes"}),
            json!({"do_remote_decode": true, "remote_block_ids": [1, "a"]}),
            json!({"do_remote_decode": true, "remote_port": 70000}),
            json!({"do_remote_decode": true, "do_remote_prefill": true}),
            json!({"do_remote_prefill": true, "remote_engine_id": "e"}),
            json!({"do_remote_prefill": true, "remote_engine_id": 5, "remote_block_ids": [0],
                "remote_host": "h", "remote_port": 1}),
        ] {
            assert!(parse_params(Some(&bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn roles_parse() {
        assert_eq!(
            KvRole::parse_list("producer,kv_consumer,both"),
            Ok(vec![KvRole::Producer, KvRole::Consumer, KvRole::Both])
        );
        assert!(KvRole::parse("decoder").is_err());
        assert!(KvRole::Producer.produces() && !KvRole::Producer.consumes());
        assert!(KvRole::Consumer.consumes() && !KvRole::Consumer.produces());
    }

    #[tokio::test]
    async fn transfers_are_taken_once_and_bounded() {
        let s = state(2, 480.0);
        let a = s.offer(33, 16, "127.0.0.1", 9000);
        assert_eq!(a["remote_block_ids"], json!([0, 1, 2]));
        assert_eq!(a["remote_engine_id"], "e1");
        assert_eq!(a["remote_port"], 9000);
        assert_eq!(s.take("e1", &[0, 1]), None, "partial block list");
        assert_eq!(s.take("e2", &[0, 1, 2]), None, "other engine");
        assert_eq!(s.take("e1", &[0, 1, 2]), Some(33));
        assert_eq!(s.take("e1", &[0, 1, 2]), None, "taken once");
        s.offer(16, 16, "h", 1); // [3]
        s.offer(17, 16, "h", 1); // [4, 5]
        s.offer(1, 16, "h", 1); // [6]: drops [3]
        assert_eq!(s.pending(), 2);
        assert_eq!(s.take("e1", &[3]), None);
        assert_eq!(s.take("e1", &[4, 5]), Some(17));
        s.new_incarnation("e2".into());
        assert_eq!(s.pending(), 0);
        assert_eq!(s.take("e2", &[6]), None);
    }

    #[tokio::test]
    async fn transfers_expire() {
        let s = state(10, 0.2);
        s.offer(10, 16, "h", 1);
        assert_eq!(s.pending(), 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(s.pending(), 0);
        assert_eq!(s.take("e1", &[0]), None);
    }
}
