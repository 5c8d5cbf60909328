//! One subscriber per KV-event source (a backend's publisher, one per data-parallel rank):
//! ZMQ SUB on the publisher, batches applied to the [`KvIndex`] strictly in sequence order.
//!
//! - **Late start**: on connecting, the subscriber replays from sequence 0 (as much as the
//!   publisher buffered), so a subscriber that starts after the backend has been serving
//!   begins with the backend's current view, not an empty one; live messages the replay
//!   already covered are skipped as duplicates.
//! - **Gaps** (ZMQ dropped messages: high-water mark, a slow reader): the missing batches
//!   are fetched from the replay endpoint and applied in order; a batch already applied is
//!   never applied again, so a replay cannot re-add a block removed since. If the replay
//!   cannot cover the gap (no replay endpoint, or the publisher no longer buffers it), the
//!   source's whole view is dropped: missing a removal would predict hits that are not
//!   there, a cleared view only under-predicts until new events arrive.
//! - **Publisher restarts** (sequence going backwards, or the backend seen unhealthy and
//!   back: a new engine has an empty cache): the source's view is dropped, then rebuilt
//!   from the new incarnation's replay.
//! - `AllBlocksCleared` drops the view; block sizes other than `kv.block_size` are
//!   reported and not indexed (their keys could never match a request's).
//! - **Staleness** ([`SourceState::fresh`]): a source is stale when it is not connected,
//!   or when a request was routed to its backend more than `kv.stale_after_ms` ago and no
//!   event has arrived since. Routing then falls back to the approximate index for it.

use std::{
    collections::HashMap,
    hash::BuildHasherDefault,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::watch;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use super::{
    index::{BlockKeys, KvIndex},
    wire::{self, Batch, Event},
};
use crate::{
    controller::table::KeyHasher,
    model::{Backend, BackendId},
};

/// Where a source publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourceSpec {
    /// The backend whose cache it describes.
    pub backend: BackendId,
    /// Data-parallel rank.
    pub dp_rank: u32,
    /// PUB endpoint, e.g. `tcp://10.0.0.5:5557`.
    pub endpoint: String,
    /// Replay ROUTER endpoint, if the publisher has one.
    pub replay: Option<String>,
    /// Topic (empty: every message).
    pub topic: String,
}

/// Shared state of one source: freshness and counters (read by routing and `/admin`).
#[derive(Debug)]
pub struct SourceState {
    /// What it subscribes to.
    pub spec: SourceSpec,
    epoch: Instant,
    connected: AtomicBool,
    mismatch: AtomicU64,
    last_event_ms: AtomicU64,
    waiting_since_ms: AtomicU64,
    stale_after_ms: u64,
    /// Batches applied (live or replayed).
    pub applied: AtomicU64,
    /// Batches applied from the replay endpoint.
    pub replayed: AtomicU64,
    /// Batches known lost (gaps the replay could not cover) or undecodable.
    pub dropped: AtomicU64,
    /// Gaps seen in the sequence.
    pub gaps: AtomicU64,
    /// Publisher restarts seen.
    pub restarts: AtomicU64,
    /// Times the source's view was dropped (clears, restarts, uncovered gaps).
    pub resets: AtomicU64,
    /// Blocks the source holds in the index (as far as its events say).
    pub blocks: AtomicU64,
    /// Stored blocks that could not be keyed (parent unknown, e.g. older than the replay
    /// buffer) or did not fit (`kv.max_blocks`).
    pub unkeyed: AtomicU64,
    /// XOR of the engine hashes the source holds: equal to the backend's own digest of
    /// its cache when the view is exact (`/admin/kv`, tests).
    pub digest: AtomicU64,
    reconnect: AtomicU64,
    reconnect_pause_ms: AtomicU64,
}

/// Freshness as shown in `/admin/backends`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Freshness {
    /// Events flow: the precise index is used.
    Fresh,
    /// Not connected yet, or events stopped: the approximate index is used.
    Stale,
    /// The source's block size differs from `kv.block_size`.
    BlockSizeMismatch,
}

impl SourceState {
    /// State of a new source.
    pub fn new(spec: SourceSpec, epoch: Instant, stale_after: Duration) -> Self {
        Self {
            spec,
            epoch,
            connected: AtomicBool::new(false),
            mismatch: AtomicU64::new(0),
            last_event_ms: AtomicU64::new(0),
            waiting_since_ms: AtomicU64::new(0),
            stale_after_ms: stale_after.as_millis() as u64,
            applied: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            blocks: AtomicU64::new(0),
            unkeyed: AtomicU64::new(0),
            digest: AtomicU64::new(0),
            reconnect: AtomicU64::new(0),
            reconnect_pause_ms: AtomicU64::new(0),
        }
    }

    /// Drops the subscription socket and reconnects after `pause` (what a network
    /// blip does; the batches published meanwhile come from the replay endpoint).
    pub fn resubscribe(&self, pause: Duration) {
        self.reconnect_pause_ms
            .store(pause.as_millis() as u64, Ordering::Relaxed);
        self.reconnect.fetch_add(1, Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        // +1 so that 0 means "never".
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// A request was routed to the backend: its events are expected.
    pub fn expect_events(&self) {
        let now = self.now_ms();
        let _ =
            self.waiting_since_ms
                .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn heard(&self) {
        self.last_event_ms.store(self.now_ms(), Ordering::Relaxed);
        self.waiting_since_ms.store(0, Ordering::Relaxed);
    }

    /// Whether routing may trust this source's view now.
    pub fn freshness(&self) -> Freshness {
        if self.mismatch.load(Ordering::Relaxed) != 0 {
            return Freshness::BlockSizeMismatch;
        }
        if !self.connected.load(Ordering::Relaxed) {
            return Freshness::Stale;
        }
        let since = self.waiting_since_ms.load(Ordering::Relaxed);
        if since != 0 && self.now_ms().saturating_sub(since) > self.stale_after_ms {
            return Freshness::Stale;
        }
        Freshness::Fresh
    }

    /// [`Self::freshness`] is `Fresh`.
    pub fn fresh(&self) -> bool {
        self.freshness() == Freshness::Fresh
    }

    /// Milliseconds since the last batch (`None`: none yet).
    pub fn last_event_age_ms(&self) -> Option<u64> {
        match self.last_event_ms.load(Ordering::Relaxed) {
            0 => None,
            t => Some(self.now_ms().saturating_sub(t)),
        }
    }

    /// The block size the source publishes, when it differs from the configured one.
    pub fn mismatched_block_size(&self) -> Option<u64> {
        match self.mismatch.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }
}

/// What one source holds, applied to the index: engine hash → (key, media) of every
/// block, owned by the source's subscriber task (public for the ingestion benchmark).
pub struct SourceView {
    index: Arc<KvIndex>,
    state: Arc<SourceState>,
    block_size: usize,
    max_blocks: usize,
    /// Engine hashes are digests already (vLLM: the low 64 bits of a SHA-256): used as
    /// they are, no rehashing.
    held: HashMap<u64, (u64, u8), BuildHasherDefault<KeyHasher>>,
    /// Publisher timestamp of the newest batch applied.
    last_ts: f64,
}

impl SourceView {
    /// An empty view of `state`'s source over `index`.
    pub fn new(index: Arc<KvIndex>, state: Arc<SourceState>, cfg: &SubscriberConfig) -> Self {
        Self {
            index,
            state,
            block_size: cfg.block_size,
            max_blocks: cfg.max_blocks,
            held: HashMap::default(),
            last_ts: f64::NEG_INFINITY,
        }
    }

    /// Decodes one batch payload and applies it.
    pub fn apply_payload(&mut self, payload: &[u8]) -> Result<(), wire::WireError> {
        let b = wire::batch(payload)?;
        self.apply(&b);
        Ok(())
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Drops everything the source holds from the index.
    pub fn drop_all(&mut self) {
        let b = self.state.spec.backend;
        for (_, (key, mask)) in self.held.drain() {
            self.index.remove(key, b, mask);
        }
        self.state.blocks.store(0, Ordering::Relaxed);
        self.state.digest.store(0, Ordering::Relaxed);
        self.state.resets.fetch_add(1, Ordering::Relaxed);
    }

    /// Applies one batch.
    pub fn apply(&mut self, batch: &Batch) {
        let b = self.state.spec.backend;
        for ev in &batch.events {
            match ev {
                Event::Stored {
                    hashes,
                    parent,
                    token_ids,
                    block_size,
                    lora_name,
                    medium,
                } => {
                    if *block_size != self.block_size {
                        if self
                            .state
                            .mismatch
                            .swap(*block_size as u64, Ordering::Relaxed)
                            == 0
                        {
                            tracing::warn!(
                                backend = b,
                                published = block_size,
                                configured = self.block_size,
                                "KV events with another block size than kv.block_size: not indexed"
                            );
                        }
                        continue;
                    }
                    let mut parent_key = match parent {
                        None => Some(BlockKeys::root(lora_name.as_deref())),
                        Some(p) => self.held.get(&p.0).map(|&(k, _)| k),
                    };
                    for (i, h) in hashes.iter().enumerate() {
                        let tokens = token_ids.get(i * block_size..(i + 1) * block_size);
                        let (Some(p), Some(tokens)) = (parent_key, tokens) else {
                            self.state
                                .unkeyed
                                .fetch_add((hashes.len() - i) as u64, Ordering::Relaxed);
                            break;
                        };
                        let key = BlockKeys::key(p, tokens);
                        parent_key = Some(key);
                        let known = self.held.contains_key(&h.0);
                        if !known && self.held.len() >= self.max_blocks {
                            self.state.unkeyed.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        if !known {
                            self.state.digest.fetch_xor(h.0, Ordering::Relaxed);
                        }
                        let e = self.held.entry(h.0).or_insert((key, 0));
                        if e.0 != key {
                            // The engine reused a hash for other tokens (a collision or a
                            // restart we missed): the old holding goes.
                            self.index.remove(e.0, b, e.1);
                            *e = (key, 0);
                        }
                        e.1 |= medium.bit();
                        self.index.store(key, b, *medium);
                    }
                }
                Event::Removed { hashes, medium } => {
                    for h in hashes {
                        if let Some(e) = self.held.get_mut(&h.0) {
                            self.index.remove(e.0, b, medium.bit());
                            e.1 &= !medium.bit();
                            if e.1 == 0 {
                                self.held.remove(&h.0);
                                self.state.digest.fetch_xor(h.0, Ordering::Relaxed);
                            }
                        }
                    }
                }
                Event::Cleared => self.drop_all(),
                Event::Other => {}
            }
        }
        self.last_ts = self.last_ts.max(batch.ts);
        self.state
            .blocks
            .store(self.held.len() as u64, Ordering::Relaxed);
        self.state.applied.fetch_add(1, Ordering::Relaxed);
        self.state.heard();
    }
}

/// Settings of a subscriber.
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// Tokens per block (`kv.block_size`).
    pub block_size: usize,
    /// Most blocks one source may hold in the index.
    pub max_blocks: usize,
    /// Longest wait for a replay answer.
    pub replay_timeout: Duration,
}

/// Fetches batches `from..` from the replay endpoint, in order.
async fn replay(endpoint: &str, from: i64, timeout: Duration) -> Result<Vec<(i64, Batch)>, String> {
    let run = async {
        let mut s = zeromq::DealerSocket::new();
        s.connect(endpoint).await.map_err(|e| e.to_string())?;
        let req = ZmqMessage::try_from(vec![
            Bytes::new(),
            Bytes::copy_from_slice(&from.to_be_bytes()),
        ])
        .map_err(|e| e.to_string())?;
        s.send(req).await.map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        loop {
            let m = s.recv().await.map_err(|e| e.to_string())?;
            let mut frames = m.into_vec();
            // [empty delimiter, topic, seq, payload]
            if frames.first().is_some_and(|f| f.is_empty()) && frames.len() == 4 {
                frames.remove(0);
            }
            if frames.len() != 3 {
                return Err(format!("replay message of {} frames", frames.len()));
            }
            let seq = wire::seq(&frames[1]).map_err(|e| e.to_string())?;
            if seq == wire::END_SEQ {
                return Ok(out);
            }
            match wire::batch(&frames[2]) {
                Ok(b) => out.push((seq, b)),
                Err(e) => return Err(format!("replay batch {seq}: {e}")),
            }
        }
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(r) => r,
        Err(_) => Err(format!("no complete answer within {timeout:?}")),
    }
}

/// Applies the replayed batches `from..upto`, in order, skipping what it applied
/// already. With `contiguous`, every sequence from `from` must be there (a gap repair or
/// a resume): `None` when the publisher no longer buffers part of it or does not answer.
/// Returns the sequence expected next.
async fn replay_into(
    view: &mut SourceView,
    from: i64,
    upto: i64,
    contiguous: bool,
    cfg: &SubscriberConfig,
) -> Option<i64> {
    let ep = view.state.spec.replay.clone()?;
    let batches = match replay(&ep, from, cfg.replay_timeout).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(backend = view.state.spec.backend, endpoint = %ep, "KV event replay failed: {e}");
            return None;
        }
    };
    let mut at = from;
    for (seq, b) in batches {
        if seq < at {
            continue;
        }
        if contiguous && seq > at {
            return None;
        }
        if seq >= upto {
            break;
        }
        // Counted before it is applied: `applied - replayed` never counts a replayed
        // batch as live, even mid-replay.
        view.state.replayed.fetch_add(1, Ordering::Relaxed);
        view.apply(&b);
        at = seq + 1;
    }
    if contiguous && upto != i64::MAX && at < upto {
        return None;
    }
    Some(at)
}

/// Runs one source until `stop` fires or the backend is gone. `backend` is watched for
/// health: unhealthy and back means a new engine (the view is rebuilt).
pub async fn run(
    index: Arc<KvIndex>,
    state: Arc<SourceState>,
    backend: Arc<Backend>,
    cfg: SubscriberConfig,
    mut stop: watch::Receiver<bool>,
) {
    let mut view = SourceView::new(index, state.clone(), &cfg);
    let spec = state.spec.clone();
    // The sequence expected next from the publisher's current incarnation. It survives a
    // reconnect: the subscriber then resumes from it instead of replaying everything.
    let mut next: Option<i64> = None;
    'outer: loop {
        // (Re)connect.
        let mut sub = zeromq::SubSocket::new();
        let connected = tokio::select! {
            r = sub.connect(&spec.endpoint) => r,
            _ = stop.changed() => break 'outer,
        };
        if let Err(e) = connected {
            tracing::debug!(backend = spec.backend, endpoint = %spec.endpoint, "KV event source: {e}");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'outer,
                _ = stop.changed() => break 'outer,
            }
        }
        if let Err(e) = sub.subscribe(&spec.topic).await {
            tracing::warn!(backend = spec.backend, "KV event subscribe: {e}");
            continue;
        }
        state.connected.store(true, Ordering::Relaxed);
        tracing::info!(backend = spec.backend, rank = spec.dp_rank, endpoint = %spec.endpoint, "KV event source connected");
        next = match next {
            // Back after a disconnection: what was missed meanwhile, from the replay.
            Some(n) => match replay_into(&mut view, n, i64::MAX, true, &cfg).await {
                Some(at) => Some(at),
                None => {
                    tracing::warn!(
                        backend = spec.backend,
                        from = n,
                        "KV events missed while disconnected are no longer buffered: view dropped"
                    );
                    state.dropped.fetch_add(1, Ordering::Relaxed);
                    view.drop_all();
                    replay_into(&mut view, 0, i64::MAX, false, &cfg).await
                }
            },
            // First connection (or a new incarnation): everything the publisher buffered
            // (the backend may have served long before this subscriber existed).
            None => replay_into(&mut view, 0, i64::MAX, false, &cfg).await,
        }
        .filter(|&at| at > 0);
        let mut was_healthy = backend.healthy.load(Ordering::Relaxed);
        let reconnects = state.reconnect.load(Ordering::Relaxed);
        loop {
            let msg = tokio::select! {
                m = tokio::time::timeout(Duration::from_millis(500), sub.recv()) => m,
                _ = stop.changed() => break 'outer,
            };
            if state.reconnect.load(Ordering::Relaxed) != reconnects {
                // Asked to drop the socket (`POST /admin/kv/resubscribe`).
                state.connected.store(false, Ordering::Relaxed);
                drop(sub);
                let pause = Duration::from_millis(state.reconnect_pause_ms.load(Ordering::Relaxed));
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue 'outer,
                    _ = stop.changed() => break 'outer,
                }
            }
            let healthy = backend.healthy.load(Ordering::Relaxed);
            if was_healthy != healthy {
                was_healthy = healthy;
                if !healthy {
                    state.connected.store(false, Ordering::Relaxed);
                } else {
                    // Back from unhealthy: likely a new engine; start over from its replay.
                    state.restarts.fetch_add(1, Ordering::Relaxed);
                    view.drop_all();
                    next = None;
                    continue 'outer;
                }
            }
            let m = match msg {
                Err(_) => continue, // no message within the tick
                Ok(Err(e)) => {
                    tracing::debug!(backend = spec.backend, "KV event recv: {e}");
                    state.connected.store(false, Ordering::Relaxed);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue 'outer,
                        _ = stop.changed() => break 'outer,
                    }
                }
                Ok(Ok(m)) => m,
            };
            state.connected.store(healthy, Ordering::Relaxed);
            let frames = m.into_vec();
            if frames.len() != 3 {
                state.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let (seq, batch) = match (wire::seq(&frames[1]), wire::batch(&frames[2])) {
                (Ok(s), Ok(b)) => (s, b),
                (s, b) => {
                    tracing::debug!(
                        backend = spec.backend,
                        "bad KV event message: {:?} {:?}",
                        s.err(),
                        b.err()
                    );
                    state.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            match next {
                Some(n) if seq == n => {}
                // Already applied from a replay (live messages queued meanwhile): not
                // newer than the last batch applied.
                Some(n) if seq < n && batch.ts <= view.last_ts => continue,
                Some(n) if seq < n => {
                    // Sequence went backwards with newer batches: a new incarnation.
                    state.restarts.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        backend = spec.backend,
                        seq,
                        expected = n,
                        "KV event publisher restarted"
                    );
                    view.drop_all();
                    next = if seq > 0 {
                        replay_into(&mut view, 0, seq, false, &cfg).await
                    } else {
                        None
                    };
                }
                Some(n) => {
                    state.gaps.fetch_add(1, Ordering::Relaxed);
                    next = replay_into(&mut view, n, seq, true, &cfg).await;
                    if next.is_none() {
                        state.dropped.fetch_add((seq - n) as u64, Ordering::Relaxed);
                        tracing::warn!(
                            backend = spec.backend,
                            from = n,
                            to = seq,
                            "KV events lost beyond replay: view dropped"
                        );
                        view.drop_all();
                    }
                }
                None if seq > 0 => {
                    // Nothing buffered at connect time but batches before this one exist.
                    next = replay_into(&mut view, 0, seq, false, &cfg).await;
                }
                None => {}
            }
            if next.is_none_or(|n| n <= seq) {
                view.apply(&batch);
                next = Some(seq + 1);
            }
        }
    }
    state.connected.store(false, Ordering::Relaxed);
    view.drop_all();
}
