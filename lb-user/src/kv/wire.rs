//! vLLM's KV-event wire format, decoded.
//!
//! - The PUB socket sends multipart messages `[topic, seq, payload]`: `seq` is 8 bytes,
//!   big-endian, counting up from 0 per publisher incarnation; the replay socket ends its
//!   answer with `seq = -1`.
//! - `payload` is msgpack: `[ts, [event, ...], dp_rank?]` (a positional `KVEventBatch`).
//! - Events are maps tagged with `"type"`: `BlockStored {block_hashes, parent_block_hash,
//!   token_ids, block_size, lora_id, medium, lora_name, ...}`, `BlockRemoved {block_hashes,
//!   medium, ...}`, `AllBlocksCleared {}`. vLLM omits defaulted fields, so every field but
//!   the hashes may be absent; unknown fields and unknown event types are skipped.
//! - A block hash is an unsigned 64-bit int by default (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`:
//!   the low 64 bits of the digest) or the digest's bytes; bytes are folded to the same low
//!   64 bits, so both forms name a block alike.

use serde::{Deserialize, Deserializer, de};
use thiserror::Error;

/// Decoding errors (the batch is dropped and counted).
#[derive(Debug, Error)]
pub enum WireError {
    /// The message does not have three frames.
    #[error("expected 3 frames (topic, seq, payload), got {0}")]
    Frames(usize),
    /// The sequence frame is not 8 bytes.
    #[error("sequence frame of {0} bytes (expected 8)")]
    Seq(usize),
    /// The payload is not a valid batch.
    #[error("payload: {0}")]
    Payload(#[from] rmp_serde::decode::Error),
}

/// Where a block lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Medium {
    /// GPU memory (the prefix cache proper).
    Gpu,
    /// CPU offload.
    Cpu,
    /// Disk or remote storage (LMCache and similar connectors).
    Storage,
}

impl Medium {
    /// Bit of this medium in a mask.
    pub fn bit(self) -> u8 {
        match self {
            Medium::Gpu => 1,
            Medium::Cpu => 2,
            Medium::Storage => 4,
        }
    }

    fn parse(s: &str) -> Self {
        match s.to_ascii_uppercase().as_str() {
            "CPU" => Medium::Cpu,
            "GPU" | "CUDA" | "" => Medium::Gpu,
            _ => Medium::Storage,
        }
    }
}

/// One block hash as the engine names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EngineHash(pub u64);

impl<'de> Deserialize<'de> for EngineHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = EngineHash;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a block hash (int or bytes)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<EngineHash, E> {
                Ok(EngineHash(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<EngineHash, E> {
                Ok(EngineHash(v as u64))
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<EngineHash, E> {
                // The low 64 bits of the big-endian digest, as vLLM's int form.
                let mut b = [0u8; 8];
                let tail = &v[v.len().saturating_sub(8)..];
                b[8 - tail.len()..].copy_from_slice(tail);
                Ok(EngineHash(u64::from_be_bytes(b)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<EngineHash, E> {
                self.visit_bytes(v.as_bytes())
            }
        }
        d.deserialize_any(V)
    }
}

/// A decoded event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Blocks stored, in chain order.
    Stored {
        /// Engine hashes of the blocks.
        hashes: Vec<EngineHash>,
        /// The engine hash of the block before the first (none: the chain starts here).
        parent: Option<EngineHash>,
        /// Token ids of all the blocks, `block_size` per block.
        token_ids: Vec<u32>,
        /// Tokens per block.
        block_size: usize,
        /// LoRA adapter, if any (its blocks never match the base model's).
        lora_name: Option<String>,
        /// Where.
        medium: Medium,
    },
    /// Blocks evicted from one medium.
    Removed {
        /// Engine hashes.
        hashes: Vec<EngineHash>,
        /// From where.
        medium: Medium,
    },
    /// Everything evicted (cache reset).
    Cleared,
    /// An event type this version does not know (skipped).
    Other,
}

#[derive(Deserialize)]
struct RawEvent {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    block_hashes: Vec<EngineHash>,
    #[serde(default)]
    parent_block_hash: Option<EngineHash>,
    #[serde(default)]
    token_ids: Vec<u32>,
    #[serde(default)]
    block_size: Option<usize>,
    #[serde(default)]
    lora_name: Option<String>,
    #[serde(default)]
    medium: Option<String>,
}

impl From<RawEvent> for Event {
    fn from(r: RawEvent) -> Self {
        let medium = Medium::parse(r.medium.as_deref().unwrap_or(""));
        match r.kind.as_str() {
            "BlockStored" => {
                let n = r.block_hashes.len().max(1);
                Event::Stored {
                    block_size: r.block_size.unwrap_or(r.token_ids.len() / n),
                    hashes: r.block_hashes,
                    parent: r.parent_block_hash,
                    token_ids: r.token_ids,
                    lora_name: r.lora_name,
                    medium,
                }
            }
            "BlockRemoved" => Event::Removed {
                hashes: r.block_hashes,
                medium,
            },
            "AllBlocksCleared" => Event::Cleared,
            _ => Event::Other,
        }
    }
}

/// A decoded batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Publisher's timestamp (seconds).
    pub ts: f64,
    /// Events in order.
    pub events: Vec<Event>,
    /// Data-parallel rank, when the publisher sends it.
    pub dp_rank: Option<i64>,
}

impl<'de> Deserialize<'de> for Batch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Batch;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("[ts, events, dp_rank?]")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut s: A) -> Result<Batch, A::Error> {
                let ts: f64 = s
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let raw: Vec<RawEvent> = s
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(1, &self))?;
                let dp_rank: Option<i64> = s.next_element::<Option<i64>>()?.flatten();
                // Later fields (if a newer vLLM adds any) are skipped.
                while s.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(Batch {
                    ts,
                    events: raw.into_iter().map(Event::from).collect(),
                    dp_rank,
                })
            }
        }
        d.deserialize_seq(V)
    }
}

/// The replay socket's end marker (`seq = -1`).
pub const END_SEQ: i64 = -1;

/// Decodes the sequence frame.
pub fn seq(frame: &[u8]) -> Result<i64, WireError> {
    let b: [u8; 8] = frame.try_into().map_err(|_| WireError::Seq(frame.len()))?;
    Ok(i64::from_be_bytes(b))
}

/// Decodes a payload.
pub fn batch(payload: &[u8]) -> Result<Batch, WireError> {
    Ok(rmp_serde::from_slice(payload)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value;

    fn enc(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).expect("encode");
        out
    }

    fn s(x: &str) -> Value {
        Value::from(x)
    }

    #[test]
    fn decodes_vllm_batches_with_omitted_defaults_and_unknown_fields() {
        let stored = Value::Map(vec![
            (s("type"), s("BlockStored")),
            (
                s("block_hashes"),
                Value::Array(vec![Value::from(7u64), Value::from(u64::MAX)]),
            ),
            (s("parent_block_hash"), Value::Nil),
            (
                s("token_ids"),
                Value::Array((0..4u32).map(Value::from).collect()),
            ),
            (s("block_size"), Value::from(2u64)),
            (s("medium"), s("GPU")),
            (s("group_idx"), Value::from(0u64)),
        ]);
        let removed = Value::Map(vec![
            (s("type"), s("BlockRemoved")),
            (
                s("block_hashes"),
                Value::Array(vec![Value::Binary(vec![0xaa; 32])]),
            ),
            (s("medium"), s("CPU")),
        ]);
        let cleared = Value::Map(vec![(s("type"), s("AllBlocksCleared"))]);
        let future = Value::Map(vec![
            (s("type"), s("SomethingNew")),
            (s("x"), Value::from(1)),
        ]);
        let b = batch(&enc(&Value::Array(vec![
            Value::F64(1.5),
            Value::Array(vec![stored, removed, cleared, future]),
        ])))
        .expect("batch");
        assert_eq!(b.ts, 1.5);
        assert_eq!(b.dp_rank, None);
        assert_eq!(
            b.events,
            vec![
                Event::Stored {
                    hashes: vec![EngineHash(7), EngineHash(u64::MAX)],
                    parent: None,
                    token_ids: vec![0, 1, 2, 3],
                    block_size: 2,
                    lora_name: None,
                    medium: Medium::Gpu,
                },
                Event::Removed {
                    hashes: vec![EngineHash(0xaaaa_aaaa_aaaa_aaaa)],
                    medium: Medium::Cpu,
                },
                Event::Cleared,
                Event::Other,
            ]
        );
        // With the data-parallel rank.
        let b = batch(&enc(&Value::Array(vec![
            Value::F64(0.0),
            Value::Array(vec![]),
            Value::from(3),
        ])))
        .expect("batch");
        assert_eq!(b.dp_rank, Some(3));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(batch(b"").is_err());
        assert!(batch(&enc(&Value::from(1))).is_err());
        assert!(batch(&enc(&Value::Array(vec![Value::F64(0.0)]))).is_err());
        assert!(seq(&[0; 7]).is_err());
        assert_eq!(seq(&[0xff; 8]).expect("seq"), END_SEQ);
        assert_eq!(seq(&5u64.to_be_bytes()).expect("seq"), 5);
    }
}
