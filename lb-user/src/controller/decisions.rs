//! Workflow → backend decisions, published by a single writer.
//!
//! The kernel fast path (and anything else that must know where each workflow lives)
//! consumes the controller's placement decisions through this interface: every time a
//! workflow's effective backend changes — placed, migrated, moved away from an unhealthy
//! home and back, ended or forgotten — the request path hands a [`Decision`] to a bounded
//! channel without waiting (a full channel drops it and counts the drop; the next change
//! of that workflow publishes again), and one writer task applies them in batches to a
//! [`DecisionSink`]. Writes to the sink (a BPF map, later) thus come from one place, in
//! order, off the request path. The default sink keeps the map in the writer's memory, so
//! its size and the counters are observable before the kernel consumes it.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::mpsc;

use crate::model::BackendId;

/// How long the writer waits after applying a batch before taking the next.
const COALESCE: std::time::Duration = std::time::Duration::from_millis(1);

/// One decision: workflow key → backend (`None`: the workflow is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Workflow key (hash of the workflow id, or the conversation root).
    pub key: u64,
    /// Where its requests go now.
    pub backend: Option<BackendId>,
}

/// Where decisions are applied (one writer calls it).
pub trait DecisionSink: Send {
    /// Applies a batch, in order.
    fn apply(&mut self, batch: &[Decision]);
    /// Entries held.
    fn len(&self) -> usize;
    /// Whether empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The default sink: the map in memory, bounded (past `max` entries new workflows are
/// not added).
#[derive(Debug, Default)]
pub struct MemorySink {
    map: HashMap<u64, BackendId>,
    max: usize,
    /// New workflows not added because the map was full.
    pub refused: u64,
}

impl MemorySink {
    /// At most `max` entries.
    pub fn new(max: usize) -> Self {
        Self {
            map: HashMap::new(),
            max,
            refused: 0,
        }
    }

    /// The backend of a workflow key.
    pub fn get(&self, key: u64) -> Option<BackendId> {
        self.map.get(&key).copied()
    }
}

impl DecisionSink for MemorySink {
    fn apply(&mut self, batch: &[Decision]) {
        for d in batch {
            match d.backend {
                // Full: new workflows are not added (O(1); the kernel's map will be an
                // LRU map of its own), known ones are updated.
                Some(_) if self.map.len() >= self.max && !self.map.contains_key(&d.key) => {
                    self.refused += 1;
                }
                Some(b) => {
                    self.map.insert(d.key, b);
                }
                None => {
                    self.map.remove(&d.key);
                }
            }
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// Counters of the publisher.
#[derive(Debug, Default)]
pub struct PublishStats {
    /// Decisions applied to the sink.
    pub published: AtomicU64,
    /// Decisions dropped because the channel was full.
    pub dropped: AtomicU64,
    /// Entries in the sink after the last batch.
    pub entries: AtomicU64,
}

/// The request path's end of the channel.
#[derive(Debug)]
pub struct Publisher {
    tx: mpsc::Sender<Decision>,
    rx: Mutex<Option<mpsc::Receiver<Decision>>>,
    /// Counters.
    pub stats: Arc<PublishStats>,
}

/// Decisions buffered between the request path and the writer.
const CHANNEL: usize = 65_536;
/// Decisions applied per batch at most.
const BATCH: usize = 1024;

impl Default for Publisher {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(CHANNEL);
        Self {
            tx,
            rx: Mutex::new(Some(rx)),
            stats: Arc::default(),
        }
    }
}

impl Publisher {
    /// Hands a decision to the writer without waiting.
    pub fn send(&self, d: Decision) {
        if self.tx.try_send(d).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Starts the single writer on `sink` (once; later calls return `None`).
    pub fn start(&self, mut sink: Box<dyn DecisionSink>) -> Option<tokio::task::JoinHandle<()>> {
        let mut rx = self
            .rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()?;
        let stats = self.stats.clone();
        Some(tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            while rx.recv_many(&mut batch, BATCH).await > 0 {
                sink.apply(&batch);
                stats
                    .published
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                stats.entries.store(sink.len() as u64, Ordering::Relaxed);
                batch.clear();
                // Let decisions gather: at most one wake-up per COALESCE, not one per
                // new workflow (a decision lands within a millisecond).
                tokio::time::sleep(COALESCE).await;
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Shared(Arc<Mutex<MemorySink>>);

    impl DecisionSink for Shared {
        fn apply(&mut self, batch: &[Decision]) {
            if let Ok(mut m) = self.0.lock() {
                m.apply(batch);
            }
        }
        fn len(&self) -> usize {
            self.0.lock().map_or(0, |m| m.len())
        }
    }

    #[tokio::test]
    async fn one_writer_applies_decisions_in_order() {
        let p = Publisher::default();
        let mem = Arc::new(Mutex::new(MemorySink::new(100)));
        let task = p.start(Box::new(Shared(mem.clone()))).expect("first start");
        assert!(
            p.start(Box::new(MemorySink::new(1))).is_none(),
            "one writer"
        );
        p.send(Decision {
            key: 1,
            backend: Some(3),
        });
        p.send(Decision {
            key: 2,
            backend: Some(4),
        });
        p.send(Decision {
            key: 1,
            backend: Some(5),
        });
        p.send(Decision {
            key: 2,
            backend: None,
        });
        for _ in 0..100 {
            if p.stats.published.load(Ordering::Relaxed) == 4 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let m = mem.lock().expect("lock");
        assert_eq!((m.get(1), m.get(2), m.len()), (Some(5), None, 1));
        assert_eq!(p.stats.entries.load(Ordering::Relaxed), 1);
        task.abort();
    }

    #[test]
    fn a_full_memory_sink_updates_known_workflows_and_refuses_new_ones() {
        let mut m = MemorySink::new(2);
        m.apply(&[
            Decision {
                key: 1,
                backend: Some(0),
            },
            Decision {
                key: 2,
                backend: Some(0),
            },
            Decision {
                key: 3,
                backend: Some(0),
            },
            Decision {
                key: 1,
                backend: Some(7),
            },
        ]);
        assert_eq!(
            (m.len(), m.get(1), m.get(3), m.refused),
            (2, Some(7), None, 1)
        );
    }

    #[test]
    fn a_full_channel_drops_and_counts() {
        let p = Publisher::default();
        for k in 0..(CHANNEL as u64 + 10) {
            p.send(Decision {
                key: k,
                backend: Some(0),
            });
        }
        assert_eq!(p.stats.dropped.load(Ordering::Relaxed), 10);
    }
}
