//! KV cache events in vLLM 0.33's ZMQ wire format (pure-Rust `zeromq`).
//!
//! - PUB socket, one multipart message per engine step that stored or evicted blocks:
//!   `[topic, seq (8-byte big-endian), msgpack([ts, [event, ...]])]`, `seq` counting from 0.
//! - Events are msgpack maps tagged with `"type"`:
//!   `BlockStored{block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name}`,
//!   `BlockRemoved{block_hashes, medium}`, `AllBlocksCleared{}`. Block hashes are unsigned 64-bit
//!   ints (vLLM's default `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`), `medium` is `"GPU"`.
//! - Replay ROUTER socket: a request `[identity, "", start_seq]` is answered with every buffered
//!   batch whose seq ≥ start_seq as `[identity, "", topic, seq, payload]`, then
//!   `[identity, "", "", seq=-1, ""]`. The last `buffer_steps` batches are kept.
//! - An instance revived after the `die` fault is a new process to its subscribers: the
//!   sequence restarts at 0 and the replay buffer is empty.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use rmpv::Value;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::prefix_cache::KvEvent;
use crate::server::{Instance, KvPorts, SimError};

/// The replay end marker (`-1` as 8 signed big-endian bytes).
pub const END_SEQ: [u8; 8] = [0xff; 8];

fn s(v: &str) -> Value {
    Value::from(v)
}

/// Encodes one event as vLLM's tagged msgpack map.
pub fn event_value(ev: &KvEvent) -> Value {
    match ev {
        KvEvent::BlockStored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
        } => Value::Map(vec![
            (s("type"), s("BlockStored")),
            (
                s("block_hashes"),
                Value::Array(block_hashes.iter().map(|&h| Value::from(h)).collect()),
            ),
            (
                s("parent_block_hash"),
                parent_block_hash.map(Value::from).unwrap_or(Value::Nil),
            ),
            (
                s("token_ids"),
                Value::Array(token_ids.iter().map(|&t| Value::from(t)).collect()),
            ),
            (s("block_size"), Value::from(*block_size as u64)),
            (s("lora_id"), Value::Nil),
            (s("medium"), s("GPU")),
            (s("lora_name"), Value::Nil),
        ]),
        KvEvent::BlockRemoved { block_hashes } => Value::Map(vec![
            (s("type"), s("BlockRemoved")),
            (
                s("block_hashes"),
                Value::Array(block_hashes.iter().map(|&h| Value::from(h)).collect()),
            ),
            (s("medium"), s("GPU")),
        ]),
        KvEvent::AllBlocksCleared => Value::Map(vec![(s("type"), s("AllBlocksCleared"))]),
    }
}

/// Encodes a batch `[ts, events]`.
pub fn encode_batch(ts: f64, events: &[KvEvent]) -> Vec<u8> {
    let v = Value::Array(vec![
        Value::F64(ts),
        Value::Array(events.iter().map(event_value).collect()),
    ]);
    let mut out = Vec::with_capacity(64 + events.len() * 64);
    // Writing into a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, &v);
    out
}

/// The bound sockets of one instance's publisher.
pub struct KvSockets {
    pub_sock: zeromq::PubSocket,
    router: zeromq::RouterSocket,
}

fn bound_port(ep: &zeromq::Endpoint, asked: u16) -> u16 {
    match ep {
        zeromq::Endpoint::Tcp(_, p) => *p,
        _ => asked,
    }
}

/// Binds the PUB and replay ROUTER sockets (port 0 = any free port); `ports` gets the real ports.
pub async fn bind_sockets(host: &str, ports: &mut KvPorts) -> Result<KvSockets, SimError> {
    let mut pub_sock = zeromq::PubSocket::new();
    let ep = pub_sock
        .bind(&format!("tcp://{host}:{}", ports.pub_port))
        .await
        .map_err(|e| SimError::KvEvents(format!("bind PUB {}: {e}", ports.pub_port)))?;
    ports.pub_port = bound_port(&ep, ports.pub_port);
    let mut router = zeromq::RouterSocket::new();
    let ep = router
        .bind(&format!("tcp://{host}:{}", ports.replay_port))
        .await
        .map_err(|e| SimError::KvEvents(format!("bind ROUTER {}: {e}", ports.replay_port)))?;
    ports.replay_port = bound_port(&ep, ports.replay_port);
    Ok(KvSockets { pub_sock, router })
}

/// Spawns the publisher and replay tasks of an instance on its bound sockets.
pub fn start_publisher(inst: Arc<Instance>, ports: KvPorts, sockets: KvSockets) {
    let KvSockets {
        mut pub_sock,
        mut router,
    } = sockets;
    let (req_tx, mut req_rx) = tokio::sync::mpsc::channel::<ZmqMessage>(64);
    let (rep_tx, mut rep_rx) = tokio::sync::mpsc::channel::<Vec<ZmqMessage>>(64);
    // The ROUTER socket lives in its own task: it receives requests and sends replies.
    tokio::spawn(async move {
        loop {
            tokio::select! {
                m = router.recv() => match m {
                    Ok(m) => {
                        if req_tx.send(m).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::debug!("kv replay recv: {e}"),
                },
                r = rep_rx.recv() => match r {
                    Some(msgs) => {
                        for m in msgs {
                            if let Err(e) = router.send(m).await {
                                tracing::debug!("kv replay send: {e}");
                                break;
                            }
                        }
                    }
                    None => return,
                },
            }
        }
    });
    let topic = Bytes::from(ports.topic.clone().into_bytes());
    let cap = ports.buffer_steps.max(1);
    tokio::spawn(async move {
        let mut seq: u64 = 0;
        let mut buffer: VecDeque<(u64, Bytes)> = VecDeque::with_capacity(cap.min(4096));
        // Held (not just its address) so a new engine can never reuse the old one's memory.
        let mut incarnation = inst.engine();
        loop {
            let engine = inst.engine();
            if !Arc::ptr_eq(&engine, &incarnation) {
                // A fresh engine (revived after `die`) is a new vLLM process: its publisher
                // starts over at sequence 0 with nothing buffered.
                incarnation = engine.clone();
                seq = 0;
                buffer.clear();
            }
            tokio::select! {
                _ = engine.kv_events_ready() => {}
                _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
                req = req_rx.recv() => {
                    let Some(req) = req else { return };
                    let frames = req.into_vec();
                    let (Some(id), Some(start)) = (frames.first(), frames.last()) else { continue };
                    let start = match <[u8; 8]>::try_from(start.as_ref()) {
                        Ok(b) => i64::from_be_bytes(b),
                        Err(_) => continue,
                    };
                    let mut replies = Vec::new();
                    for (sq, payload) in &buffer {
                        if (*sq as i64) >= start {
                            let m = ZmqMessage::try_from(vec![
                                id.clone(),
                                Bytes::new(),
                                topic.clone(),
                                Bytes::copy_from_slice(&sq.to_be_bytes()),
                                payload.clone(),
                            ]);
                            if let Ok(m) = m {
                                replies.push(m);
                            }
                        }
                    }
                    if let Ok(m) = ZmqMessage::try_from(vec![
                        id.clone(),
                        Bytes::new(),
                        Bytes::new(),
                        Bytes::copy_from_slice(&END_SEQ),
                        Bytes::new(),
                    ]) {
                        replies.push(m);
                    }
                    if rep_tx.send(replies).await.is_err() {
                        return;
                    }
                    continue;
                }
            }
            let batches = engine.lock().take_kv_events();
            for (_, events) in batches {
                // Wall-clock timestamp like vLLM's time.time() (subscribers tell a new
                // incarnation from a replay by it); the virtual time is not used.
                let ts = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                let payload = Bytes::from(encode_batch(ts, &events));
                let msg = ZmqMessage::try_from(vec![
                    topic.clone(),
                    Bytes::copy_from_slice(&seq.to_be_bytes()),
                    payload.clone(),
                ]);
                if let Ok(msg) = msg
                    && let Err(e) = pub_sock.send(msg).await
                {
                    tracing::debug!("kv pub send: {e}");
                }
                if buffer.len() == cap {
                    buffer.pop_front();
                }
                buffer.push_back((seq, payload));
                seq += 1;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_is_positional_with_tagged_maps() {
        let bytes = encode_batch(
            1.5,
            &[
                KvEvent::BlockStored {
                    block_hashes: vec![u64::MAX, 7],
                    parent_block_hash: None,
                    token_ids: vec![1, 2],
                    block_size: 1,
                },
                KvEvent::BlockRemoved {
                    block_hashes: vec![7],
                },
                KvEvent::AllBlocksCleared,
            ],
        );
        let v = rmpv::decode::read_value(&mut bytes.as_slice()).expect("decode");
        let arr = v.as_array().expect("array");
        assert_eq!(arr.len(), 2);
        assert_eq!(arr[0].as_f64(), Some(1.5));
        let evs = arr[1].as_array().expect("events");
        let first = evs[0].as_map().expect("map");
        assert_eq!(first[0].1.as_str(), Some("BlockStored"));
        assert_eq!(
            first[1].1.as_array().expect("hashes")[0].as_u64(),
            Some(u64::MAX)
        );
        assert!(first[2].1.is_nil());
        let third = evs[2].as_map().expect("map");
        assert_eq!(third.len(), 1);
    }
}
