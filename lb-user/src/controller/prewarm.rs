//! Migration and pre-warm: when a backend fails (active health check) or is drained, the
//! workflows whose home it was move at once to the best other backend (the `workflow`
//! policy's own choice, as if their next call had come), and each new home is sent the
//! workflow's latest request again with `max_tokens: 1` (non-streaming), so the prefill
//! of its context happens now and the next agent call hits the cache instead of paying it.
//!
//! The latest request body of each workflow is kept for this (a reference to the buffer
//! the proxy read anyway) within a byte budget (`routing.prewarm_budget_bytes`; bodies
//! past `routing.prewarm_max_body_bytes` are not kept), and at most
//! `routing.prewarm_concurrency` pre-warm requests run at once. `prewarm_budget_bytes = 0`
//! turns pre-warming off; migration still happens.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::sync::Semaphore;

use super::table::{Class, Classify, Table};
use crate::model::Backend;

/// The latest request of a workflow.
#[derive(Debug)]
struct Kept {
    path: Box<str>,
    body: Bytes,
}

impl Classify for Kept {
    fn class(&self) -> Class {
        Class::Idle
    }
}

/// Pre-warm settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrewarmConfig {
    /// Bytes of request bodies kept in all (0: no pre-warming).
    pub budget_bytes: usize,
    /// Larger bodies are not kept.
    pub max_body_bytes: usize,
    /// Pre-warm requests at once.
    pub concurrency: usize,
    /// Timeout of one pre-warm request.
    pub timeout: Duration,
}

/// Outcome counters.
#[derive(Debug, Default)]
pub struct PrewarmStats {
    /// Workflows moved off a failed or drained home.
    pub migrated: AtomicU64,
    /// Pre-warm requests answered 200.
    pub ok: AtomicU64,
    /// Pre-warm requests that failed.
    pub failed: AtomicU64,
    /// Migrated workflows with no kept request to pre-warm with.
    pub skipped: AtomicU64,
}

/// Kept bodies and the pre-warm client.
pub struct Prewarmer {
    kept: Table<Kept>,
    bytes: Arc<AtomicUsize>,
    cfg: PrewarmConfig,
    sem: Arc<Semaphore>,
    client: Client<HttpConnector, Full<Bytes>>,
    /// Counters.
    pub stats: Arc<PrewarmStats>,
}

impl std::fmt::Debug for Prewarmer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prewarmer")
            .field("bytes", &self.bytes.load(Ordering::Relaxed))
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl Prewarmer {
    /// A pre-warmer for at most `max_workflows` workflows.
    pub fn new(cfg: PrewarmConfig, max_workflows: usize) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Self {
            kept: Table::new(max_workflows),
            bytes: Arc::new(AtomicUsize::new(0)),
            sem: Arc::new(Semaphore::new(cfg.concurrency.max(1))),
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(2)
                .build(connector),
            cfg,
            stats: Arc::default(),
        }
    }

    /// Whether bodies are kept.
    pub fn enabled(&self) -> bool {
        self.cfg.budget_bytes > 0
    }

    /// Bytes of bodies kept.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Keeps the latest request of workflow `key` (within the budget).
    pub fn remember(&self, key: u64, path: &[u8], body: &Bytes) {
        if !self.enabled() || body.len() > self.cfg.max_body_bytes {
            return;
        }
        let Ok(path) = std::str::from_utf8(path) else {
            return;
        };
        let bytes = &self.bytes;
        let budget = self.cfg.budget_bytes;
        self.kept.upsert_evicting(
            key,
            || Kept {
                path: path.into(),
                body: Bytes::new(),
            },
            |e, _| {
                let Some(e) = e else { return };
                let old = e.body.len();
                if bytes.load(Ordering::Relaxed) + body.len() > budget + old {
                    // Over budget: keep nothing rather than something stale.
                    bytes.fetch_sub(old, Ordering::Relaxed);
                    e.body = Bytes::new();
                    return;
                }
                bytes.fetch_add(body.len(), Ordering::Relaxed);
                bytes.fetch_sub(old, Ordering::Relaxed);
                e.path = path.into();
                e.body = body.clone();
            },
            |old| {
                bytes.fetch_sub(old.body.len(), Ordering::Relaxed);
            },
        );
    }

    /// Forgets a workflow's request.
    pub fn forget(&self, key: u64) {
        if let Some(k) = self.kept.remove(key) {
            self.bytes.fetch_sub(k.body.len(), Ordering::Relaxed);
        }
    }

    /// Sends workflow `key`'s latest request to `to` with `max_tokens: 1`, in the
    /// background (bounded concurrency).
    pub fn prewarm(&self, key: u64, to: Arc<Backend>) {
        let Some((path, body)) = self
            .kept
            .get(key, |k| (k.path.to_string(), k.body.clone()))
            .filter(|(_, b)| !b.is_empty())
        else {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(body) = warm_body(&body) else {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let (sem, client, stats, timeout) = (
            self.sem.clone(),
            self.client.clone(),
            self.stats.clone(),
            self.cfg.timeout,
        );
        tokio::spawn(async move {
            let Ok(_permit) = sem.acquire_owned().await else {
                return;
            };
            let uri = format!("{}{path}", to.url.to_string().trim_end_matches('/'));
            let req = Request::post(uri)
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::HOST, to.host_header.clone())
                .header("x-agentlb-prewarm", "1")
                .body(Full::new(body));
            let Ok(req) = req else {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let done = tokio::time::timeout(timeout, async {
                let resp = client.request(req).await.ok()?;
                let ok = resp.status().is_success();
                resp.into_body().collect().await.ok()?;
                Some(ok)
            })
            .await;
            if matches!(done, Ok(Some(true))) {
                stats.ok.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(backend = %to.name, "pre-warmed a migrated workflow");
            } else {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(backend = %to.name, "pre-warm request failed");
            }
        });
    }
}

/// The body of a pre-warm request: the original with one output token, not streamed.
fn warm_body(body: &[u8]) -> Option<Bytes> {
    let mut v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let o = v.as_object_mut()?;
    o.remove("stream");
    o.remove("stream_options");
    o.remove("max_completion_tokens");
    o.remove("n");
    if o.contains_key("input") {
        // Responses API.
        o.insert("max_output_tokens".into(), 1.into());
        o.insert("store".into(), false.into());
    } else {
        o.insert("max_tokens".into(), 1.into());
    }
    serde_json::to_vec(&v).ok().map(Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(budget: usize) -> PrewarmConfig {
        PrewarmConfig {
            budget_bytes: budget,
            max_body_bytes: 100,
            concurrency: 2,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn bodies_are_kept_within_the_budget() {
        let p = Prewarmer::new(cfg(150), 10);
        p.remember(1, b"/v1/chat/completions", &Bytes::from(vec![b'a'; 80]));
        assert_eq!(p.bytes(), 80);
        p.remember(1, b"/v1/chat/completions", &Bytes::from(vec![b'a'; 90]));
        assert_eq!(p.bytes(), 90, "replaced, not added");
        p.remember(2, b"/v1/chat/completions", &Bytes::from(vec![b'a'; 90]));
        assert_eq!(p.bytes(), 90, "over budget: not kept");
        p.remember(3, b"/v1/chat/completions", &Bytes::from(vec![b'a'; 200]));
        assert_eq!(p.bytes(), 90, "too large: not kept");
        p.forget(1);
        assert_eq!(p.bytes(), 0);
        let off = Prewarmer::new(cfg(0), 10);
        off.remember(1, b"/x", &Bytes::from_static(b"{}"));
        assert_eq!(off.bytes(), 0);
    }

    #[test]
    fn warm_bodies_ask_for_one_token() {
        let b = warm_body(
            br#"{"model":"m","stream":true,"stream_options":{},"max_tokens":900,"messages":[]}"#,
        )
        .expect("json");
        let v: serde_json::Value = serde_json::from_slice(&b).expect("json");
        assert_eq!(v["max_tokens"], 1);
        assert!(v.get("stream").is_none());
        let r = warm_body(br#"{"model":"m","input":"hi","max_output_tokens":50}"#).expect("json");
        let v: serde_json::Value = serde_json::from_slice(&r).expect("json");
        assert_eq!(
            (v["max_output_tokens"].clone(), v["store"].clone()),
            (1.into(), false.into())
        );
        assert!(warm_body(b"not json").is_none());
    }
}
