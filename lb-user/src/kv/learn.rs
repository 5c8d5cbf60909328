//! KV events without a tokenizer: a workflow's blocks learned from the backend's own
//! `/tokenize` answer, off the request path.
//!
//! Without `tokenizer.json` agentlb cannot turn a request into the token ids the events
//! carry, so it routes by its approximate index (bytes of the messages). The events can
//! still correct that prediction for workflows (or conversation roots) it has served:
//! when a request has been answered, agentlb asks the backend that served it
//! `POST /tokenize` with the same prompt (messages and the fields the chat template
//! reads, or the completion prompt) — after the answer, never before routing — and keeps
//! the block keys of the answer for the workflow's key. The next request of that
//! workflow starts with that prompt (agent conversations grow by appending), so the
//! events say exactly how much of it each backend still holds: a backend that evicted
//! the context is no longer credited with it, and one that still holds all of it is
//! credited with the approximate prediction (which also covers what was appended since).
//!
//! Bounded: at most `kv.learn_max_prompts` prompts remembered (ended workflows
//! forgotten first, then the least recently used), at most `kv.learn_concurrency`
//! `/tokenize` calls at once (a learning that finds none free is skipped, and the next
//! request of the workflow tries again), one at a time per workflow.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde_json::{Map, Value};

use super::{PromptKeys, index::BlockKeys, tokenize::PromptKind};
use crate::controller::table::{Class, Classify, Table};

/// Fields of a chat request that `/tokenize` renders the same way.
const CHAT_FIELDS: [&str; 9] = [
    "model",
    "messages",
    "tools",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template",
    "chat_template_kwargs",
    "add_special_tokens",
    "documents",
];

/// Fields of a completion request `/tokenize` reads.
const COMPLETION_FIELDS: [&str; 3] = ["model", "prompt", "add_special_tokens"];

/// Largest `/tokenize` answer read (a few bytes per token).
const MAX_ANSWER: usize = 16 << 20;

struct Learned {
    keys: Arc<Vec<u64>>,
    ended: bool,
}

impl Classify for Learned {
    fn class(&self) -> Class {
        if self.ended {
            Class::Ended
        } else {
            Class::Idle
        }
    }
}

/// Counters of learning (`/admin/kv`).
#[derive(Debug, Default)]
pub struct LearnStats {
    /// `/tokenize` answers learned.
    pub learned: AtomicU64,
    /// Learnings skipped: every slot busy.
    pub skipped: AtomicU64,
    /// `/tokenize` calls that failed (error status, bad answer, timeout).
    pub failed: AtomicU64,
}

/// Prompts learned from the backends, by workflow key.
pub struct Learner {
    table: Table<Learned>,
    keys: BlockKeys,
    max_blocks: usize,
    slots: Arc<tokio::sync::Semaphore>,
    busy: Mutex<HashSet<u64>>,
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    /// Counters.
    pub stats: LearnStats,
}

impl std::fmt::Debug for Learner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Learner")
            .field("prompts", &self.table.len())
            .finish()
    }
}

/// The `/tokenize` body for a request body: the fields that decide its tokens.
pub fn tokenize_body(body: &[u8], kind: PromptKind) -> Option<Vec<u8>> {
    let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    let fields: &[&str] = match kind {
        PromptKind::Chat => &CHAT_FIELDS,
        PromptKind::Completion => &COMPLETION_FIELDS,
    };
    let out: Map<String, Value> = fields
        .iter()
        .filter_map(|&f| m.get(f).map(|v| (f.to_owned(), v.clone())))
        .collect();
    // A completion prompt must be one prompt (text or ids): a batch is not learned.
    if matches!(kind, PromptKind::Completion)
        && !matches!(out.get("prompt"), Some(Value::String(_)))
        && !matches!(out.get("prompt"), Some(Value::Array(a)) if a.iter().all(Value::is_u64))
    {
        return None;
    }
    if matches!(kind, PromptKind::Chat) && !out.contains_key("messages") {
        return None;
    }
    serde_json::to_vec(&Value::Object(out)).ok()
}

/// Token ids of a `/tokenize` answer (`{"tokens": [...]}`).
pub fn answer_tokens(answer: &[u8]) -> Option<Vec<u32>> {
    #[derive(serde::Deserialize)]
    struct Tokenized {
        tokens: Vec<u32>,
    }
    serde_json::from_slice::<Tokenized>(answer)
        .ok()
        .map(|t| t.tokens)
}

impl Learner {
    /// A learner remembering at most `max_prompts` prompts of at most `max_blocks`
    /// blocks, with `concurrency` `/tokenize` calls at once.
    pub fn new(
        max_prompts: usize,
        concurrency: usize,
        keys: BlockKeys,
        max_blocks: usize,
        timeout: Duration,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Self {
            table: Table::new(max_prompts.max(1)),
            keys,
            max_blocks,
            slots: Arc::new(tokio::sync::Semaphore::new(concurrency.max(1))),
            busy: Mutex::new(HashSet::new()),
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(2)
                .build(connector),
            timeout,
            stats: LearnStats::default(),
        }
    }

    /// Prompts remembered.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The blocks learned for `key` (an earlier prompt of that workflow).
    pub fn get(&self, key: u64) -> Option<PromptKeys> {
        let keys = self.table.get(key, |l| l.keys.clone())?;
        Some(PromptKeys {
            tokens: keys.len() * self.keys.block_size,
            keys: keys.to_vec(),
            learned: true,
        })
    }

    /// The workflow ended: its prompt goes first when room is needed.
    pub fn end(&self, key: u64) {
        self.table.update(key, |l| l.ended = true);
    }

    /// Learns `body`'s blocks for `key` from `base_url` (the backend that served it), in
    /// the background. Returns at once.
    pub fn learn(self: &Arc<Self>, key: u64, base_url: String, body: Bytes, kind: PromptKind) {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        {
            let mut busy = self
                .busy
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !busy.insert(key) {
                return;
            }
        }
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let got = match tokenize_body(&body, kind) {
                Some(req) => this.ask(&base_url, req).await,
                None => None,
            };
            match got {
                Some(tokens) => {
                    let keys = Arc::new(this.keys.keys(
                        BlockKeys::root(None),
                        &tokens,
                        this.max_blocks,
                    ));
                    let fresh = keys.clone();
                    this.table.upsert(
                        key,
                        || Learned {
                            keys: fresh,
                            ended: false,
                        },
                        |e, _| {
                            if let Some(e) = e {
                                e.keys = keys;
                            }
                        },
                    );
                    this.stats.learned.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    this.stats.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            this.busy
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&key);
        });
    }

    async fn ask(&self, base_url: &str, req: Vec<u8>) -> Option<Vec<u32>> {
        let uri = format!("{}/tokenize", base_url.trim_end_matches('/'));
        let r = http::Request::post(uri)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(req)))
            .ok()?;
        let call = async {
            let resp = self.client.request(r).await.ok()?;
            if resp.status() != http::StatusCode::OK {
                return None;
            }
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .ok()?
                .to_bytes();
            answer_tokens(&body)
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .ok()
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenize_bodies_keep_what_decides_the_tokens() {
        let chat = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5,"stream":true,"tools":[],"chat_template_kwargs":{"enable_thinking":false}}"#;
        let v: Value =
            serde_json::from_slice(&tokenize_body(chat, PromptKind::Chat).expect("chat"))
                .expect("json");
        assert_eq!(v["messages"][0]["content"], "hi");
        assert_eq!(v["chat_template_kwargs"]["enable_thinking"], false);
        assert!(v.get("max_tokens").is_none() && v.get("stream").is_none());
        let c = br#"{"model":"m","prompt":"once upon","max_tokens":5}"#;
        let v: Value =
            serde_json::from_slice(&tokenize_body(c, PromptKind::Completion).expect("completion"))
                .expect("json");
        assert_eq!(v["prompt"], "once upon");
        // A batch of prompts, a chat without messages, not JSON: not learned.
        assert!(tokenize_body(br#"{"prompt":["a","b"]}"#, PromptKind::Completion).is_none());
        assert!(tokenize_body(br#"{"model":"m"}"#, PromptKind::Chat).is_none());
        assert!(tokenize_body(b"nope", PromptKind::Chat).is_none());
        assert_eq!(
            answer_tokens(br#"{"count":3,"max_model_len":8192,"tokens":[1,2,3]}"#),
            Some(vec![1, 2, 3])
        );
        assert_eq!(answer_tokens(br#"{"error":"x"}"#), None);
    }
}
