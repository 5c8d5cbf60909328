//! KV events in vLLM's ZMQ wire format, consumed by a ZMQ SUB and a DEALER replay client.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Sim, chat, client, get_json, text};
use serde_json::{Value, json};
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

fn decode(payload: &[u8]) -> rmpv::Value {
    rmpv::decode::read_value(&mut &payload[..]).expect("msgpack")
}

/// Hashes of every BlockStored event in a PUB message.
fn stored_hashes(frames: &[Bytes], into: &mut std::collections::HashSet<u64>) {
    for ev in decode(&frames[2]).as_array().expect("batch")[1]
        .as_array()
        .expect("events")
    {
        if field(ev, "type").as_str() == Some("BlockStored") {
            for h in field(ev, "block_hashes").as_array().expect("hashes") {
                into.insert(h.as_u64().expect("u64 hash"));
            }
        }
    }
}

fn field<'a>(ev: &'a rmpv::Value, key: &str) -> &'a rmpv::Value {
    ev.as_map()
        .expect("event map")
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("field {key}"))
}

#[tokio::test]
async fn block_stored_and_removed_events_and_replay() {
    let sim = Sim::spawn(&[
        "--time-scale",
        "20",
        "--kv-events",
        "--kv-events-base-port",
        "0",
        "--kv-events-topic",
        "kv",
        "--num-gpu-blocks",
        "40",
    ]);
    let (pub_port, replay_port) = sim.kv_ports[0].expect("kv ports");
    let c = client();
    // /kv_event_sources advertises both endpoints.
    let src = get_json(&c, &sim.url(0, "/kv_event_sources")).await;
    assert_eq!(src["0"]["endpoint"], format!("tcp://127.0.0.1:{pub_port}"));
    assert_eq!(
        src["0"]["replay_endpoint"],
        format!("tcp://127.0.0.1:{replay_port}")
    );
    assert_eq!(src["0"]["topic"], "kv");

    let mut sub = zeromq::SubSocket::new();
    sub.connect(&format!("tcp://127.0.0.1:{pub_port}"))
        .await
        .expect("connect");
    sub.subscribe("kv").await.expect("subscribe");
    // Slow joiner: send small probe requests until the subscription delivers something.
    let mut stored = std::collections::HashSet::new();
    let mut probe = 0u64;
    loop {
        probe += 1;
        assert!(probe < 100, "subscription never became effective");
        let m = json!([{"role": "user", "content": text(10_000 + probe, 200)}]);
        chat(&c, &sim.url(0, "/v1/chat/completions"), m, 1).await;
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(200), sub.recv()).await {
            stored_hashes(&r.expect("recv").into_vec(), &mut stored);
            break;
        }
    }
    // Drain whatever else the probes produced.
    while let Ok(r) = tokio::time::timeout(Duration::from_millis(300), sub.recv()).await {
        stored_hashes(&r.expect("recv").into_vec(), &mut stored);
    }

    let messages = json!([{"role": "user", "content": text(1, 400)}]);
    let (s, _, _) = chat(&c, &sim.url(0, "/v1/chat/completions"), messages.clone(), 1).await;
    assert_eq!(s, 200);
    let tokens: Vec<u64> = c
        .post(sim.url(0, "/tokenize"))
        .json(&json!({"messages": messages}))
        .send()
        .await
        .expect("tok")
        .json::<Value>()
        .await
        .expect("json")["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_u64().expect("id"))
        .collect();

    let msg = tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .expect("event in time")
        .expect("recv");
    let frames = msg.into_vec();
    stored_hashes(&frames, &mut stored);
    assert_eq!(frames.len(), 3);
    assert_eq!(&frames[0][..], b"kv");
    assert_eq!(frames[1].len(), 8);
    let seq0 = i64::from_be_bytes(frames[1][..].try_into().expect("8 bytes"));
    assert!(seq0 >= 1, "probes came first");
    let batch = decode(&frames[2]);
    let arr = batch.as_array().expect("[ts, events]");
    assert!(arr[0].as_f64().expect("ts") > 1.6e9);
    let events = arr[1].as_array().expect("events");
    let ev = &events[0];
    assert_eq!(field(ev, "type").as_str(), Some("BlockStored"));
    assert!(field(ev, "parent_block_hash").is_nil());
    assert_eq!(field(ev, "block_size").as_u64(), Some(16));
    assert_eq!(field(ev, "medium").as_str(), Some("GPU"));
    let stored_ids: Vec<u64> = field(ev, "token_ids")
        .as_array()
        .expect("ids")
        .iter()
        .map(|t| t.as_u64().expect("u"))
        .collect();
    let nblocks = tokens.len() / 16;
    assert_eq!(stored_ids, tokens[..nblocks * 16].to_vec());
    let hashes = field(ev, "block_hashes").as_array().expect("hashes");
    assert_eq!(hashes.len(), nblocks);

    // Pressure: a unique request evicts the first prompt's blocks -> BlockRemoved.
    let big = json!([{"role": "user", "content": text(2, 2300)}]);
    let (s, _, _) = chat(&c, &sim.url(0, "/v1/chat/completions"), big, 1).await;
    assert_eq!(s, 200);
    let mut removed = 0;
    let mut last_seq = seq0;
    while removed == 0 {
        let msg = tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .expect("event in time")
            .expect("recv");
        let f = msg.into_vec();
        stored_hashes(&f, &mut stored);
        let seq = i64::from_be_bytes(f[1][..].try_into().expect("8"));
        assert_eq!(seq, last_seq + 1, "contiguous seq");
        last_seq = seq;
        for ev in decode(&f[2]).as_array().expect("batch")[1]
            .as_array()
            .expect("events")
        {
            if field(ev, "type").as_str() == Some("BlockRemoved") {
                removed += 1;
                let h = field(ev, "block_hashes").as_array().expect("h")[0]
                    .as_u64()
                    .expect("u64");
                assert!(stored.contains(&h), "removed a block never stored");
            }
        }
    }

    // Replay from seq 0 over a DEALER: every batch, then the seq = -1 end marker.
    let mut dealer = zeromq::DealerSocket::new();
    dealer
        .connect(&format!("tcp://127.0.0.1:{replay_port}"))
        .await
        .expect("connect replay");
    let req = ZmqMessage::try_from(vec![
        Bytes::new(),
        Bytes::copy_from_slice(&0i64.to_be_bytes()),
    ])
    .expect("msg");
    dealer.send(req).await.expect("send");
    let mut seqs = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), dealer.recv())
            .await
            .expect("replay in time")
            .expect("recv");
        let f = m.into_vec();
        assert_eq!(f.len(), 4, "[empty, topic, seq, payload]");
        assert!(f[0].is_empty());
        let seq = i64::from_be_bytes(f[2][..].try_into().expect("8"));
        if seq == -1 {
            assert!(f[1].is_empty() && f[3].is_empty());
            break;
        }
        assert_eq!(&f[1][..], b"kv");
        seqs.push(seq);
    }
    assert_eq!(seqs.first(), Some(&0));
    assert!(
        seqs.last().is_some_and(|&l| l >= last_seq),
        "{seqs:?} vs {last_seq}"
    );
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
}
