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
    slots::Slots,
    wire::{self, Batch, Event},
};
use crate::model::{Backend, BackendId};

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
    /// The index refused the source's last store: every backend slot of the index is
    /// held by other backends' blocks. The source is then stale (routing uses the
    /// approximate index for its backend) until a store goes through.
    unindexed: AtomicBool,
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
            unindexed: AtomicBool::new(false),
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
        if !self.connected.load(Ordering::Relaxed) || self.unindexed.load(Ordering::Relaxed) {
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

/// Media bits ([`wire::Medium::bit`]) in a view slot's meta byte.
const MEDIA: u8 = 7;

/// Of the media a block leaves (`before` → `after`), those the index must clear: GPU,
/// and CPU or storage only once the block is in neither (one bit in the index).
fn gone(before: u8, after: u8) -> u8 {
    let g = (before & !after) & 1;
    if after & 6 == 0 { g | (before & 6) } else { g }
}

/// What one source holds, applied to the index: engine hash → (key, media) of every
/// block, owned by the source's subscriber task (public for the ingestion benchmark).
pub struct SourceView {
    index: Arc<KvIndex>,
    state: Arc<SourceState>,
    block_size: usize,
    max_blocks: usize,
    /// Engine hash → key, the media in the slot's meta byte: 16 bytes and a meta byte
    /// per block in a compact open-addressing table ([`Slots`]) that grows up to what
    /// `max_blocks` needs (18 bytes per slot, 7/8 full at most).
    held: Slots<u64>,
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
            held: Slots::new(cfg.max_blocks),
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
        self.held.len() == 0
    }

    /// Drops everything the source holds from the index.
    pub fn drop_all(&mut self) {
        let b = self.state.spec.backend;
        let index = &self.index;
        self.held
            .drain(|_, key, meta| index.remove(key, b, meta & MEDIA));
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
                        Some(p) => self.held.find(p.0).map(|at| self.held.val(at)),
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
                        match self.held.find(h.0) {
                            Some(at) => {
                                let (old, meta) = (self.held.val(at), self.held.meta(at));
                                if old != key {
                                    // The engine reused a hash for other tokens (a
                                    // collision or a restart we missed): the old holding
                                    // goes.
                                    self.index.remove(old, b, meta & MEDIA);
                                    *self.held.val_mut(at) = key;
                                    self.held.set_meta(at, medium.bit());
                                } else {
                                    self.held.set_meta(at, (meta & MEDIA) | medium.bit());
                                }
                            }
                            None if self.held.len() >= self.max_blocks => {
                                self.state.unkeyed.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            None => {
                                self.state.digest.fetch_xor(h.0, Ordering::Relaxed);
                                self.held.insert(h.0, key, medium.bit());
                            }
                        }
                        let indexed = self.index.store(key, b, *medium);
                        if indexed == self.state.unindexed.load(Ordering::Relaxed) {
                            self.state.unindexed.store(!indexed, Ordering::Relaxed);
                        }
                    }
                }
                Event::Removed { hashes, medium } => {
                    for h in hashes {
                        if let Some(at) = self.held.find(h.0) {
                            let before = self.held.meta(at) & MEDIA;
                            let after = before & !medium.bit();
                            let g = gone(before, after);
                            if g != 0 {
                                self.index.remove(self.held.val(at), b, g);
                            }
                            if after == 0 {
                                self.held.remove_at(at);
                                self.state.digest.fetch_xor(h.0, Ordering::Relaxed);
                            } else {
                                self.held.set_meta(at, after);
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

#[cfg(test)]
mod view_tests {
    use super::*;
    use crate::kv::{
        index::Held,
        wire::{EngineHash, Medium},
    };

    const BS: usize = 2;

    fn view(index: &Arc<KvIndex>, backend: BackendId, max_blocks: usize) -> SourceView {
        let state = Arc::new(SourceState::new(
            SourceSpec {
                backend,
                dp_rank: 0,
                endpoint: String::new(),
                replay: None,
                topic: String::new(),
            },
            Instant::now(),
            Duration::from_secs(10),
        ));
        SourceView::new(
            index.clone(),
            state,
            &SubscriberConfig {
                block_size: BS,
                max_blocks,
                replay_timeout: Duration::from_secs(1),
            },
        )
    }

    fn stored(hashes: &[u64], parent: Option<u64>, tokens: &[u32], medium: Medium) -> Event {
        Event::Stored {
            hashes: hashes.iter().map(|&h| EngineHash(h)).collect(),
            parent: parent.map(EngineHash),
            token_ids: tokens.to_vec(),
            block_size: BS,
            lora_name: None,
            medium,
        }
    }

    fn removed(hashes: &[u64], medium: Medium) -> Event {
        Event::Removed {
            hashes: hashes.iter().map(|&h| EngineHash(h)).collect(),
            medium,
        }
    }

    fn apply(v: &mut SourceView, events: Vec<Event>) {
        v.apply(&Batch {
            ts: 0.0,
            events,
            dp_rank: None,
        });
    }

    fn keys(tokens: &[u32]) -> Vec<u64> {
        BlockKeys { block_size: BS }.keys(BlockKeys::root(None), tokens, 100)
    }

    #[test]
    fn view_tracks_media_chains_digest_and_drops_only_its_own_blocks() {
        let index = Arc::new(KvIndex::new(1000));
        let mut a = view(&index, 1, 1000);
        let mut b = view(&index, 2, 1000);
        let t: Vec<u32> = (0..8).collect();
        let k = keys(&t);
        // A chain of 4 blocks in two events (the second by its parent's engine hash),
        // the last two also offloaded to CPU and storage.
        apply(
            &mut a,
            vec![
                stored(&[10, 11], None, &t[..4], Medium::Gpu),
                stored(&[12, 13], Some(11), &t[4..], Medium::Gpu),
                stored(&[12, 13], Some(11), &t[4..], Medium::Cpu),
                stored(&[12, 13], Some(11), &t[4..], Medium::Storage),
            ],
        );
        apply(&mut b, vec![stored(&[20, 21], None, &t[..4], Medium::Gpu)]);
        assert_eq!(a.len(), 4);
        assert_eq!(a.state.digest.load(Ordering::Relaxed), 10 ^ 11 ^ 12 ^ 13);
        assert_eq!(
            index.matched(&k, &[1, 2]),
            vec![Held { gpu: 4, any: 4 }, Held { gpu: 2, any: 2 }]
        );
        // Off the GPU, then off CPU: still in storage.
        apply(
            &mut a,
            vec![removed(&[13, 12], Medium::Gpu), removed(&[13], Medium::Cpu)],
        );
        assert_eq!(index.matched(&k, &[1])[0], Held { gpu: 2, any: 4 });
        apply(&mut a, vec![removed(&[13], Medium::Storage)]);
        assert_eq!(index.matched(&k, &[1])[0], Held { gpu: 2, any: 3 });
        assert_eq!(a.len(), 3);
        assert_eq!(a.state.digest.load(Ordering::Relaxed), 10 ^ 11 ^ 12);
        // A hash reused for other tokens: the old holding goes.
        let u: Vec<u32> = (100..102).collect();
        apply(&mut a, vec![stored(&[10], None, &u, Medium::Gpu)]);
        assert_eq!(index.matched(&keys(&u), &[1])[0].gpu, 1);
        assert_eq!(index.matched(&k, &[1])[0], Held::default());
        assert_eq!(a.len(), 3);
        // Cleared: only this source's blocks go.
        apply(&mut a, vec![Event::Cleared]);
        assert!(a.is_empty());
        assert_eq!(a.state.digest.load(Ordering::Relaxed), 0);
        assert_eq!(index.matched(&k, &[1, 2])[1], Held { gpu: 2, any: 2 });
        assert_eq!(index.len(), 2);
        b.drop_all();
        assert!(index.is_empty());
    }

    #[test]
    fn view_is_bounded_by_max_blocks() {
        let index = Arc::new(KvIndex::new(1000));
        let mut a = view(&index, 0, 3);
        let t: Vec<u32> = (0..10).collect();
        apply(
            &mut a,
            vec![stored(&[1, 2, 3, 4, 5], None, &t, Medium::Gpu)],
        );
        assert_eq!(a.len(), 3);
        assert_eq!(a.state.unkeyed.load(Ordering::Relaxed), 2);
        assert_eq!(index.len(), 3);
    }

    #[test]
    fn gone_media() {
        assert_eq!(gone(1, 0), 1);
        assert_eq!(gone(1 | 2, 1), 2);
        assert_eq!(
            gone(2 | 4, 4),
            0,
            "still in storage: the index keeps the bit"
        );
        assert_eq!(gone(1 | 2 | 4, 2 | 4), 1);
        assert_eq!(gone(2, 2), 0);
    }
}
