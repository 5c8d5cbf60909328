//! `cargo xtask bench kv`: the KV-event index, in process.
//!
//! - **Ingestion**: vLLM-shaped batches (msgpack, as the publishers send them) decoded and
//!   applied to a [`SourceView`] over a [`KvIndex`] on one thread: block events per
//!   second (a `BlockStored` of n blocks counts n, a `BlockRemoved` of n blocks n). The
//!   workload: requests storing chains of 32 blocks (16 tokens each, half of them
//!   continuing an earlier chain), decode steps storing one block, and evictions
//!   removing 32 blocks of an old chain, 4 events per batch, until the index holds
//!   `--blocks` blocks. Decoding alone is timed apart.
//! - **Memory per tracked block**: live heap bytes (counting allocator: what malloc
//!   holds, with its chunk headers) of the index and of the source's own view (engine
//!   hash → key) after storing `--blocks` blocks, per block; and the index's own
//!   estimate ([`KvIndex::bytes`], the `agentlb_kv_index_bytes` metric) beside it.
//! - **Lookup**: one request's prefix (`--prompt-blocks` keys) matched against 4 and 64
//!   backends.
//!
//! Medians over `--repeats` with [min–max]; output on stdout and in `DIR/kv.md` / `kv.json`
//! (`DIR` = `--out`, default `target/bench`); `--publish` copies the Markdown to
//! `bench/KV.md`.

use std::{fmt::Write as _, fs, path::Path, sync::Arc, time::Duration, time::Instant};

use agentlb::kv::{
    index::{BlockKeys, KvIndex},
    subscriber::{SourceSpec, SourceState, SourceView, SubscriberConfig},
};
use anyhow::{Context, Result};
use clap::Parser;
use rmpv::Value;

use super::control::CountingAlloc;

const BS: usize = 16;

/// Options of `cargo xtask bench kv -- [OPTIONS]`.
#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask bench kv --",
    about = "KV-event index: ingestion, memory, lookup"
)]
struct Args {
    /// Blocks the index ends up tracking.
    #[arg(long, default_value_t = 1_000_000)]
    blocks: usize,
    /// Keys of the prompt looked up.
    #[arg(long, default_value_t = 2048)]
    prompt_blocks: usize,
    /// Repeats.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Output directory (default `<workspace>/target/bench`).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Also copy the Markdown to `bench/KV.md`.
    #[arg(long)]
    publish: bool,
    /// Do not build first (release re-exec).
    #[arg(long)]
    no_build: bool,
}

fn s(x: &str) -> Value {
    Value::from(x)
}

fn stored(hashes: &[u64], parent: Option<u64>, tokens: &[u32]) -> Value {
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
            Value::Array(tokens.iter().map(|&t| Value::from(t)).collect()),
        ),
        (s("block_size"), Value::from(BS as u64)),
        (s("lora_id"), Value::Nil),
        (s("medium"), s("GPU")),
        (s("lora_name"), Value::Nil),
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

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Encoded batches and how many block events they carry; at the end `net` blocks are held.
struct Workload {
    payloads: Vec<Vec<u8>>,
    block_events: u64,
    net: usize,
}

fn workload(target: usize) -> Workload {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut next_hash = 1u64;
    // Chains still held: their engine hashes.
    let mut chains: Vec<Vec<u64>> = Vec::new();
    let (mut events, mut payloads, mut block_events, mut net) =
        (Vec::new(), Vec::new(), 0u64, 0usize);
    let flush = |events: &mut Vec<Value>, payloads: &mut Vec<Vec<u8>>, force: bool| {
        if events.len() >= 4 || (force && !events.is_empty()) {
            let mut out = Vec::new();
            let batch = Value::Array(vec![Value::F64(0.0), Value::Array(std::mem::take(events))]);
            let _ = rmpv::encode::write_value(&mut out, &batch);
            payloads.push(out);
        }
    };

    while net < target {
        let kind = rng.next() % 10;
        if kind < 6 || chains.is_empty() {
            // A prefill: 32 blocks, half the time continuing a held chain.
            let (parent, base) = match (rng.next().is_multiple_of(2), chains.last()) {
                (true, Some(c)) => (c.last().copied(), c.len()),
                _ => (None, 0),
            };
            let hashes: Vec<u64> = (0..32).map(|i| next_hash + i).collect();
            next_hash += 32;
            let tokens: Vec<u32> = (0..32 * BS)
                .map(|i| ((rng.next() as u32) ^ (i as u32 + base as u32)) % 128_000)
                .collect();
            events.push(stored(&hashes, parent, &tokens));
            block_events += 32;
            net += 32;
            chains.push(hashes);
        } else if kind < 9 {
            // A decode step filled one block of the newest chain.
            if let Some(c) = chains.last_mut() {
                let h = next_hash;
                next_hash += 1;
                let tokens: Vec<u32> = (0..BS).map(|_| (rng.next() % 128_000) as u32).collect();
                events.push(stored(&[h], c.last().copied(), &tokens));
                c.push(h);
                block_events += 1;
                net += 1;
            }
        } else if chains.len() > 8 {
            // An eviction: an old chain's blocks, tail first.
            let i = (rng.next() as usize) % (chains.len() / 2);
            let c = chains.swap_remove(i);
            let mut rev = c.clone();
            rev.reverse();
            events.push(removed(&rev));
            block_events += c.len() as u64;
            net -= c.len();
        }
        flush(&mut events, &mut payloads, false);
    }
    flush(&mut events, &mut payloads, true);
    Workload {
        payloads,
        block_events,
        net,
    }
}

fn view(max_blocks: usize) -> (Arc<KvIndex>, SourceView) {
    let index = Arc::new(KvIndex::new(max_blocks));
    let state = Arc::new(SourceState::new(
        SourceSpec {
            backend: 0,
            dp_rank: 0,
            endpoint: String::new(),
            replay: None,
            topic: String::new(),
        },
        Instant::now(),
        Duration::from_secs(10),
    ));
    let cfg = SubscriberConfig {
        block_size: BS,
        max_blocks,
        replay_timeout: Duration::from_secs(1),
    };
    (index.clone(), SourceView::new(index, state, &cfg))
}

fn median(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn fmt3((m, lo, hi): (f64, f64, f64), scale: f64, digits: usize) -> String {
    if (hi - lo).abs() < f64::EPSILON {
        format!("{:.*}", digits, m * scale)
    } else {
        format!(
            "{:.*} [{:.*}–{:.*}]",
            digits,
            m * scale,
            digits,
            lo * scale,
            digits,
            hi * scale
        )
    }
}

/// Entry point.
pub fn run(root: &Path, args_in: &[String]) -> Result<()> {
    let Some(args) = super::parse_args::<Args>("bench-kv", args_in)? else {
        return Ok(());
    };
    if super::run_in_release(root, "kv", args_in, &[], args.no_build)? {
        return Ok(());
    }
    let machine = super::machine_line();
    eprintln!("bench kv: generating batches for {} blocks", args.blocks);
    let w = workload(args.blocks);
    // The index sized for what it tracks (as `kv.max_blocks` would be), a little slack.
    let cap = args.blocks + args.blocks / 16;
    let (mut ingest, mut decode, mut per_block, mut index_b, mut view_b, mut lookup4, mut lookup64) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut reported = vec![];
    for r in 0..args.repeats.max(1) {
        // Decoding alone.
        let t = Instant::now();
        let mut n = 0usize;
        for p in &w.payloads {
            n += agentlb::kv::wire::batch(p).map_or(0, |b| b.events.len());
        }
        decode.push(w.block_events as f64 / t.elapsed().as_secs_f64());
        std::hint::black_box(n);
        // Decode + apply, timed (the allocator not counting).
        let (index, mut v) = view(cap);
        let t = Instant::now();
        for p in &w.payloads {
            v.apply_payload(p).context("payload")?;
        }
        ingest.push(w.block_events as f64 / t.elapsed().as_secs_f64());
        drop(v);
        drop(index);
        // Again with the heap counted.
        CountingAlloc::enable(true);
        let before = CountingAlloc::live().1;
        let (index, mut v) = view(cap);
        for p in &w.payloads {
            v.apply_payload(p).context("payload")?;
        }
        let with_view = CountingAlloc::live().1;
        let held = v.len();
        per_block.push((with_view - before) as f64 / held.max(1) as f64);
        // The view's own map alone: dropped without touching the index.
        drop(v);
        let index_only = CountingAlloc::live().1;
        index_b.push((index_only - before) as f64 / index.len().max(1) as f64);
        reported.push(index.bytes() as f64 / index.len().max(1) as f64);
        view_b.push((with_view - index_only) as f64 / held.max(1) as f64);
        CountingAlloc::enable(false);
        // Lookup of a prompt whose first half is held by backend 0.
        let keys = BlockKeys { block_size: BS };
        let toks: Vec<u32> = (0..(args.prompt_blocks * BS) as u32).collect();
        let pk = keys.keys(BlockKeys::root(None), &toks, args.prompt_blocks);
        for &k in &pk[..pk.len() / 2] {
            index.store(k, 0, agentlb::kv::wire::Medium::Gpu);
        }
        for (backends, out) in [(4u32, &mut lookup4), (64u32, &mut lookup64)] {
            let ids: Vec<u32> = (0..backends).collect();
            let reps = 2000;
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(index.matched(&pk, &ids));
            }
            out.push(t.elapsed().as_secs_f64() / reps as f64);
        }
        eprintln!(
            "bench kv: repeat {r}: ingest {:.2} M block events/s (decode alone {:.2} M/s), {:.1} B per tracked block",
            ingest[r] / 1e6,
            decode[r] / 1e6,
            per_block[r]
        );
    }
    let ing = median(&mut ingest);
    let pb = median(&mut per_block);
    let mut md = String::new();
    let _ = writeln!(md, "# KV-event index benchmark\n");
    let _ = writeln!(
        md,
        "`cargo xtask bench kv -- {}` on {machine}. {} batches carrying {} block events, ending with {} blocks tracked; {} repeat(s), medians with [min–max].\n",
        args_in.join(" "),
        w.payloads.len(),
        w.block_events,
        w.net,
        args.repeats
    );
    let _ = writeln!(md, "| target (issue #12) | measured | met |\n|---|---|---|");
    let _ = writeln!(
        md,
        "| event ingestion ≥ 1M block events/s on one core | {} M/s | {} |",
        fmt3(ing, 1e-6, 2),
        if ing.0 >= 1e6 {
            "✓ met"
        } else {
            "✗ missed"
        }
    );
    let _ = writeln!(
        md,
        "| index memory ≤ 64 B per tracked block | {} B (index {} B + the source's view {} B) | {} |\n",
        fmt3(pb, 1.0, 1),
        fmt3(median(&mut index_b), 1.0, 1),
        fmt3(median(&mut view_b), 1.0, 1),
        if pb.0 <= 64.0 {
            "✓ met"
        } else {
            "✗ missed"
        }
    );
    let _ = writeln!(
        md,
        "| measure | value |\n|---|---|\n| index memory per block as the index reports it (`agentlb_kv_index_bytes`), B | {} |\n| decode alone (rmp-serde), M block events/s | {} |\n| lookup of a {}-block prompt (binary search per backend), 4 backends, µs | {} |\n| the same, 64 backends, µs | {} |",
        fmt3(median(&mut reported), 1.0, 1),
        fmt3(median(&mut decode), 1e-6, 2),
        args.prompt_blocks,
        fmt3(median(&mut lookup4), 1e6, 2),
        fmt3(median(&mut lookup64), 1e6, 2),
    );
    println!("{md}");
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/bench"));
    fs::create_dir_all(&out)?;
    fs::write(out.join("kv.md"), &md)?;
    fs::write(
        out.join("kv.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "ingest_block_events_per_s": ingest,
            "bytes_per_block": per_block,
            "index_bytes_per_block": index_b,
            "view_bytes_per_block": view_b,
            "reported_index_bytes_per_block": reported,
            "decode_block_events_per_s": decode,
            "lookup_s_4": lookup4,
            "lookup_s_64": lookup64,
        }))?,
    )?;
    if args.publish {
        fs::write(root.join("bench/KV.md"), &md)?;
    }
    Ok(())
}
