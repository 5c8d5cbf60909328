//! The subscriber against a real ZMQ publisher in the test (PUB + replay ROUTER on
//! loopback), driven through late start, dropped messages, over-eager replays, publisher
//! restarts, cache clears, replay buffers too short for a gap, and staleness.

use std::{
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use bytes::Bytes;
use rmpv::Value;
use tokio::sync::watch;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use super::{
    index::{BlockKeys, KvIndex},
    subscriber::{self, Freshness, SourceSpec, SourceState, SubscriberConfig},
};
use crate::controller::policies::test_backends;

const BS: usize = 4;

fn s(x: &str) -> Value {
    Value::from(x)
}

/// Token ids of a chain of `n` blocks, distinct per `salt`.
fn tokens(n: usize, salt: u32) -> Vec<u32> {
    (0..(n * BS) as u32)
        .map(|i| i * 31 + salt * 1_000_003)
        .collect()
}

fn stored(hashes: &[u64], parent: Option<u64>, toks: &[u32]) -> Value {
    Value::Map(vec![
        (s("type"), s("BlockStored")),
        (
            s("block_hashes"),
            Value::Array(hashes.iter().map(|&h| Value::from(h)).collect()),
        ),
        (
            s("parent_block_hash"),
            parent.map_or(Value::Nil, Value::from),
        ),
        (
            s("token_ids"),
            Value::Array(toks.iter().map(|&t| Value::from(t)).collect()),
        ),
        (s("block_size"), Value::from(BS as u64)),
        (s("medium"), s("GPU")),
    ])
}

fn removed(hashes: &[u64]) -> Value {
    Value::Map(vec![
        (s("type"), s("BlockRemoved")),
        (
            s("block_hashes"),
            Value::Array(hashes.iter().map(|&h| Value::from(h)).collect()),
        ),
        (s("medium"), s("GPU")),
    ])
}

fn cleared() -> Value {
    Value::Map(vec![(s("type"), s("AllBlocksCleared"))])
}

/// A batch stamped with the wall clock, as vLLM's `time.time()`.
fn payload(events: Vec<Value>) -> Bytes {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mut out = Vec::new();
    rmpv::encode::write_value(
        &mut out,
        &Value::Array(vec![Value::F64(ts), Value::Array(events)]),
    )
    .expect("encode");
    Bytes::from(out)
}

/// The test's publisher: every batch is buffered for replay; `publish(.., false)` buffers
/// without sending (a message ZMQ dropped). The replay socket answers with the whole
/// buffer whatever start is asked (an over-eager publisher: the subscriber must skip
/// what it applied).
struct Publisher {
    pub_sock: zeromq::PubSocket,
    seq: i64,
    buffer: Arc<Mutex<Vec<(i64, Bytes)>>>,
    endpoint: String,
    replay: String,
}

impl Publisher {
    async fn start() -> Self {
        let mut pub_sock = zeromq::PubSocket::new();
        let ep = pub_sock.bind("tcp://127.0.0.1:0").await.expect("bind pub");
        let mut router = zeromq::RouterSocket::new();
        let rep = router.bind("tcp://127.0.0.1:0").await.expect("bind router");
        let buffer: Arc<Mutex<Vec<(i64, Bytes)>>> = Arc::default();
        let buf = buffer.clone();
        tokio::spawn(async move {
            while let Ok(m) = router.recv().await {
                let frames = m.into_vec();
                let Some(id) = frames.first().cloned() else {
                    continue;
                };
                let all: Vec<(i64, Bytes)> = buf.lock().expect("lock").clone();
                for (sq, p) in all {
                    let m = ZmqMessage::try_from(vec![
                        id.clone(),
                        Bytes::new(),
                        Bytes::new(),
                        Bytes::copy_from_slice(&sq.to_be_bytes()),
                        p,
                    ])
                    .expect("msg");
                    let _ = router.send(m).await;
                }
                let end = ZmqMessage::try_from(vec![
                    id,
                    Bytes::new(),
                    Bytes::new(),
                    Bytes::copy_from_slice(&(-1i64).to_be_bytes()),
                    Bytes::new(),
                ])
                .expect("msg");
                let _ = router.send(end).await;
            }
        });
        Self {
            pub_sock,
            seq: 0,
            buffer,
            endpoint: ep.to_string(),
            replay: rep.to_string(),
        }
    }

    async fn publish(&mut self, events: Vec<Value>, send: bool) {
        let p = payload(events);
        self.buffer
            .lock()
            .expect("lock")
            .push((self.seq, p.clone()));
        if send {
            let m = ZmqMessage::try_from(vec![
                Bytes::new(),
                Bytes::copy_from_slice(&self.seq.to_be_bytes()),
                p,
            ])
            .expect("msg");
            self.pub_sock.send(m).await.expect("send");
        }
        self.seq += 1;
    }

    /// A new incarnation: sequence from 0, nothing buffered.
    fn restart(&mut self) {
        self.seq = 0;
        self.buffer.lock().expect("lock").clear();
    }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// [`until`] while the publisher sends an empty batch every 200 ms: a message lost to
/// ZMQ's slow joiner (a subscription not yet at the publisher) shows up as a gap and is
/// repaired from the replay, as in production, instead of stalling the test.
async fn until_live(p: &mut Publisher, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    let mut last = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        if last.elapsed() >= Duration::from_millis(200) {
            p.publish(vec![], true).await;
            last = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn keys(toks: &[u32]) -> Vec<u64> {
    BlockKeys { block_size: BS }.keys(BlockKeys::root(None), toks, 1000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_survives_late_start_gaps_restarts_and_clears() {
    let mut p = Publisher::start().await;
    let index = Arc::new(KvIndex::new(10_000));
    let backend = test_backends(1).remove(0);
    let state = Arc::new(SourceState::new(
        SourceSpec {
            backend: backend.id,
            dp_rank: 0,
            endpoint: p.endpoint.clone(),
            replay: Some(p.replay.clone()),
            topic: String::new(),
        },
        Instant::now(),
        Duration::from_millis(300),
    ));
    assert_eq!(state.freshness(), Freshness::Stale, "not connected yet");

    // Before the subscriber exists: blocks A (engine hashes 100..) in two events, the
    // second chained to the first by its parent hash.
    let a = tokens(6, 1);
    p.publish(vec![stored(&[100, 101, 102], None, &a[..3 * BS])], true)
        .await;
    p.publish(
        vec![stored(&[103, 104, 105], Some(102), &a[3 * BS..])],
        true,
    )
    .await;

    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(subscriber::run(
        index.clone(),
        state.clone(),
        backend.clone(),
        SubscriberConfig {
            block_size: BS,
            max_blocks: 1000,
            replay_timeout: Duration::from_secs(2),
        },
        stop_rx,
    ));
    // Late start: live messages until one is received (applied counts replayed batches
    // too: a live one is applied beyond them), then the replay fills what came before.
    // Until a live message arrives the subscription may not have reached the publisher
    // (ZMQ's slow joiner), and B would be lost with nothing after it to show the gap.
    let b = tokens(2, 2);
    let mut sent = 0;
    while state.applied.load(Ordering::Relaxed) <= state.replayed.load(Ordering::Relaxed) {
        assert!(sent < 500, "the subscriber never received a message");
        p.publish(vec![], true).await;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.publish(vec![stored(&[200, 201], None, &b)], true).await;
    let ka = keys(&a);
    let kb = keys(&b);
    until_live(&mut p, "A and B indexed", || {
        index.matched(&ka, &[0])[0].gpu == 6 && index.matched(&kb, &[0])[0].gpu == 2
    })
    .await;
    assert!(
        state.replayed.load(Ordering::Relaxed) >= 2,
        "A came from the replay"
    );
    assert_eq!(state.freshness(), Freshness::Fresh);

    // A dropped message (A's last two blocks removed), then a live one: the gap is
    // replayed; the replay also resends everything before (the publisher ignores the
    // start), which must not re-add anything.
    p.publish(vec![removed(&[104, 105])], false).await;
    let c = tokens(3, 3);
    p.publish(vec![stored(&[300, 301, 302], None, &c)], true)
        .await;
    let kc = keys(&c);
    until_live(&mut p, "C indexed", || index.matched(&kc, &[0])[0].gpu == 3).await;
    assert_eq!(
        index.matched(&ka, &[0])[0].gpu,
        4,
        "the dropped removal was replayed"
    );
    assert_eq!(state.gaps.load(Ordering::Relaxed), 1);
    // Removed again later, live: nothing breaks on a hash already gone.
    let applied = state.applied.load(Ordering::Relaxed);
    p.publish(vec![removed(&[105, 999])], true).await;
    until("the removal applied", || {
        state.applied.load(Ordering::Relaxed) > applied
    })
    .await;

    // Staleness: a request routed here and no event for longer than stale_after.
    state.expect_events();
    until("stale", || state.freshness() == Freshness::Stale).await;
    p.publish(vec![], true).await;
    until("fresh again", || state.freshness() == Freshness::Fresh).await;

    // Publisher restart: sequence back to 0; the old view goes, the new one is built.
    p.restart();
    let d = tokens(2, 4);
    p.publish(vec![stored(&[400, 401], None, &d)], true).await;
    let kd = keys(&d);
    until_live(&mut p, "D indexed after the restart", || {
        index.matched(&kd, &[0])[0].gpu == 2
    })
    .await;
    assert_eq!(
        index.matched(&ka, &[0])[0].gpu,
        0,
        "the old incarnation's blocks are gone"
    );
    assert_eq!(index.matched(&kc, &[0])[0].gpu, 0);
    assert!(state.restarts.load(Ordering::Relaxed) >= 1);

    // A gap the replay cannot cover (the publisher's buffer lost it): the view is
    // dropped rather than trusted.
    p.publish(vec![stored(&[500], None, &tokens(1, 5))], false)
        .await;
    p.buffer.lock().expect("lock").clear();
    let e = tokens(1, 6);
    p.publish(vec![stored(&[600], None, &e)], true).await;
    let ke = keys(&e);
    until_live(&mut p, "E indexed", || index.matched(&ke, &[0])[0].gpu == 1).await;
    assert_eq!(
        index.matched(&kd, &[0])[0].gpu,
        0,
        "view dropped on an uncovered gap"
    );
    assert!(state.dropped.load(Ordering::Relaxed) >= 1);

    // The subscription socket dropped mid-run: what was published meanwhile comes from
    // the replay (resumed where it stopped, nothing before applied again).
    let resets = state.resets.load(Ordering::Relaxed);
    state.resubscribe(Duration::from_millis(300));
    until("disconnected", || state.freshness() == Freshness::Stale).await;
    let f = tokens(2, 7);
    p.publish(vec![stored(&[700, 701], None, &f)], true).await;
    p.publish(vec![removed(&[600])], true).await;
    let kf = keys(&f);
    until_live(&mut p, "F indexed after the reconnect", || {
        index.matched(&kf, &[0])[0].gpu == 2
    })
    .await;
    assert_eq!(
        index.matched(&ke, &[0])[0].gpu,
        0,
        "the removal published while disconnected was applied"
    );
    assert_eq!(
        state.resets.load(Ordering::Relaxed),
        resets,
        "resumed, not rebuilt"
    );
    assert_eq!(
        state.digest.load(Ordering::Relaxed),
        700 ^ 701,
        "the digest is the XOR of the engine hashes held"
    );

    // AllBlocksCleared.
    p.publish(vec![cleared()], true).await;
    until_live(&mut p, "cleared", || index.matched(&kf, &[0])[0].gpu == 0).await;
    assert_eq!(state.blocks.load(Ordering::Relaxed), 0);

    // Another block size is reported, not indexed.
    p.publish(
        vec![Value::Map(vec![
            (s("type"), s("BlockStored")),
            (s("block_hashes"), Value::Array(vec![Value::from(700u64)])),
            (s("parent_block_hash"), Value::Nil),
            (
                s("token_ids"),
                Value::Array((0..8u32).map(Value::from).collect()),
            ),
            (s("block_size"), Value::from(8u64)),
        ])],
        true,
    )
    .await;
    until("mismatch reported", || {
        state.freshness() == Freshness::BlockSizeMismatch
    })
    .await;
    assert_eq!(state.blocks.load(Ordering::Relaxed), 0);

    let _ = stop_tx.send(true);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the subscriber stops")
        .expect("no panic");
    assert!(index.is_empty(), "a stopped source leaves nothing behind");
}
