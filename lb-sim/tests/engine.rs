//! Prefix caching, latency model, preemption and metrics against a real `vllm-sim` process.
//!
//! Timing assertions read the engine's own virtual times (`x-sim-*` headers), never wall clocks.

mod common;

use common::{Sim, chat, client, hdr_f64, metric, post_json, text};
use serde_json::{Value, json};

fn msgs(system: &str, user: &str) -> Value {
    json!([{"role": "system", "content": system}, {"role": "user", "content": user}])
}

async fn tokenize(c: &reqwest::Client, url: &str, messages: &Value) -> Vec<u64> {
    let v = post_json(c, url, &json!({"messages": messages})).await;
    v["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_u64().expect("id"))
        .collect()
}

#[tokio::test]
async fn shared_prefix_hits_exactly_the_full_blocks() {
    let sim = Sim::spawn(&["--time-scale", "20"]);
    let c = client();
    let url = sim.url(0, "/v1/chat/completions");
    let system = text(1, 2000);
    let a = msgs(&system, "What is the first question?");
    let b = msgs(&system, "Something else entirely, please.");
    let (s, _, r1) = chat(&c, &url, a.clone(), 4).await;
    assert_eq!(s, 200);
    assert_eq!(r1["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let (_, _, r2) = chat(&c, &url, b.clone(), 4).await;
    let ta = tokenize(&c, &sim.url(0, "/tokenize"), &a).await;
    let tb = tokenize(&c, &sim.url(0, "/tokenize"), &b).await;
    let common = ta.iter().zip(&tb).take_while(|(x, y)| x == y).count();
    assert!(common > 400);
    assert_eq!(
        r2["usage"]["prompt_tokens_details"]["cached_tokens"],
        (common / 16 * 16) as u64
    );
    assert_eq!(r2["usage"]["prompt_tokens"], tb.len() as u64);
    // Metrics count the hit in tokens.
    let m = sim.url(0, "/metrics");
    assert_eq!(
        metric(&c, &m, "vllm:prefix_cache_hits_total").await,
        (common / 16 * 16) as f64
    );
    assert_eq!(
        metric(&c, &m, "vllm:prefix_cache_queries_total").await,
        (ta.len() + tb.len()) as f64
    );
    // Multi-turn: replaying the assistant's answer hits the blocks the answer filled.
    let answer = r1["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    let long_answer_req = msgs(&system, "Tell me a long story.");
    let (_, _, r3) = chat(&c, &url, long_answer_req.clone(), 200).await;
    let story = r3["choices"][0]["message"]["content"]
        .as_str()
        .expect("story");
    let mut turn2 = long_answer_req.as_array().expect("arr").clone();
    turn2.push(json!({"role": "assistant", "content": story}));
    turn2.push(json!({"role": "user", "content": "And then?"}));
    let turn2 = Value::Array(turn2);
    let (_, _, r4) = chat(&c, &url, turn2.clone(), 2).await;
    let t3 = tokenize(&c, &sim.url(0, "/tokenize"), &long_answer_req).await;
    let cached = r4["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("c") as usize;
    // Prompt + 200 generated tokens were computed (the last sampled token is not), in full blocks.
    assert_eq!(cached, (t3.len() + 199) / 16 * 16, "answer {answer}");
}

#[tokio::test]
async fn eviction_is_lru_and_spares_in_use_blocks() {
    // 64 blocks of 16 tokens; each prompt below is ~20 blocks.
    // Time-scale 1: the long-running request below must outlive the churn requests.
    let sim = Sim::spawn(&["--time-scale", "1", "--num-gpu-blocks", "64"]);
    let c = client();
    let url = sim.url(0, "/v1/chat/completions");
    let p = |i: u64| msgs(&text(100 + i, 1250), "q");
    let cached = |v: &Value| {
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached")
    };
    for i in 0..3 {
        let (s, _, _) = chat(&c, &url, p(i), 1).await;
        assert_eq!(s, 200);
    }
    // A 30-block request evicts the least recently used free blocks: all of A, then B's tail.
    let (_, _, _) = chat(&c, &url, msgs(&text(999, 1900), "d"), 1).await;
    let full = |n: usize| ((n - 1) / 16 * 16) as u64;
    let nc = tokenize(&c, &sim.url(0, "/tokenize"), &p(2)).await.len();
    let (_, _, rc) = chat(&c, &url, p(2), 1).await;
    assert_eq!(cached(&rc), full(nc), "C (most recent) fully cached");
    let (_, _, rb) = chat(&c, &url, p(1), 1).await;
    assert!(
        cached(&rb) > 0 && cached(&rb) < full(nc),
        "B lost its tail: {}",
        cached(&rb)
    );
    let (_, _, ra) = chat(&c, &url, p(0), 1).await;
    assert_eq!(cached(&ra), 0, "A (least recent) fully evicted");

    // In-use blocks are never evicted: a long-running stream keeps its prompt cached while
    // other requests churn through the pool.
    let e = msgs(&text(500, 1250), "long");
    let c2 = c.clone();
    let url2 = url.clone();
    let e2 = e.clone();
    let long = tokio::spawn(async move {
        c2.post(&url2)
            .json(&json!({"messages": e2, "max_tokens": 300, "stream": true}))
            .send()
            .await
            .expect("stream")
            .text()
            .await
            .expect("text")
    });
    // Wait until it runs.
    for _ in 0..200 {
        if metric(&c, &sim.url(0, "/metrics"), "vllm:num_requests_running").await >= 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    for i in 10..13 {
        let (s, _, _) = chat(&c, &url, p(i), 1).await;
        assert_eq!(s, 200);
    }
    assert!(
        !long.is_finished(),
        "the long request must still be running"
    );
    let ne = tokenize(&c, &sim.url(0, "/tokenize"), &e).await.len();
    let (_, _, re) = chat(&c, &url, e.clone(), 1).await;
    assert_eq!(cached(&re), full(ne), "in-use prompt blocks survived");
    let out = long.await.expect("join");
    assert!(out.ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn ttft_follows_uncached_tokens_and_hits() {
    let sim = Sim::spawn(&["--time-scale", "10"]);
    let c = client();
    let url = sim.url(0, "/v1/chat/completions");
    let (b0, b1) = (5.753e-3, 17.25e-6);
    let mut last = 0.0;
    for (i, chars) in [400usize, 4000, 16000, 30000].into_iter().enumerate() {
        let m = msgs(&text(7000 + i as u64, chars), "x");
        let n = tokenize(&c, &sim.url(0, "/tokenize"), &m).await.len();
        let (s, h, body) = chat(&c, &url, m.clone(), 2).await;
        assert_eq!(s, 200);
        assert_eq!(body["usage"]["prompt_tokens"], n as u64);
        let prefill = hdr_f64(&h, "x-sim-ttft") - hdr_f64(&h, "x-sim-queue");
        // Chunked prefill: ceil(n / 8192) steps of β0 + β1·chunk.
        let steps = n.div_ceil(8192) as f64;
        let model = steps * b0 + b1 * n as f64;
        assert!(
            (prefill - model).abs() < 1e-6,
            "n={n}: {prefill} vs {model}"
        );
        assert!(prefill > last);
        last = prefill;
        // The same prompt again: only the uncached tail is prefilled.
        let (_, h2, body2) = chat(&c, &url, m, 2).await;
        let hit = body2["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("hit") as usize;
        assert_eq!(hit, (n - 1) / 16 * 16);
        let prefill2 = hdr_f64(&h2, "x-sim-ttft") - hdr_f64(&h2, "x-sim-queue");
        let model2 = b0 + b1 * (n - hit) as f64;
        assert!((prefill2 - model2).abs() < 1e-6, "{prefill2} vs {model2}");
        assert!(prefill2 < prefill);
    }
}

#[tokio::test]
async fn itl_grows_with_running_sequences() {
    let sim = Sim::spawn(&["--time-scale", "2"]);
    let c = client();
    let url = sim.url(0, "/v1/chat/completions");
    let (_, h, _) = chat(&c, &url, msgs("solo", "x"), 40).await;
    let itl1 = hdr_f64(&h, "x-sim-itl");
    assert!((itl1 - (5.753e-3 + 6e-6)).abs() < 1e-6, "{itl1}");
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let c = c.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let (_, h, _) = chat(&c, &url, msgs(&text(i, 200), "x"), 120).await;
            hdr_f64(&h, "x-sim-itl")
        }));
    }
    let mut itls = Vec::new();
    for t in tasks {
        itls.push(t.await.expect("join"));
    }
    let mean: f64 = itls.iter().sum::<f64>() / itls.len() as f64;
    assert!(mean > itl1 * 1.02, "batched ITL {mean} vs solo {itl1}");
    // At most one step per token, the largest decode batch costs β0 + 64·β2, plus prefills.
    assert!(itls.iter().all(|&x| x >= itl1 - 1e-9));
}

#[tokio::test]
async fn preemption_when_pool_is_exhausted() {
    // 40 blocks; 4 requests that grow to 20 blocks each.
    let sim = Sim::spawn(&["--time-scale", "50", "--num-gpu-blocks", "40"]);
    let c = client();
    let url = sim.url(0, "/v1/chat/completions");
    let mut tasks = Vec::new();
    for i in 0..4u64 {
        let c = c.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let (s, h, b) = chat(&c, &url, msgs(&text(i, 20), "x"), 300).await;
            assert_eq!(s, 200);
            assert_eq!(b["usage"]["completion_tokens"], 300);
            hdr_f64(&h, "x-sim-preemptions")
        }));
    }
    let mut pre = 0.0;
    for t in tasks {
        pre += t.await.expect("join");
    }
    assert!(pre > 0.0);
    let m = metric(&c, &sim.url(0, "/metrics"), "vllm:num_preemptions_total").await;
    assert_eq!(m, pre);
}

/// Parses `/metrics` with the strict text-format parser; returns family → value (histograms:
/// their count), after checking labels and cumulative buckets.
async fn scrape(c: &reqwest::Client, url: &str) -> std::collections::HashMap<String, f64> {
    let t = c.get(url).send().await.expect("m").text().await.expect("t");
    let (types, samples) = common::parse_prometheus(&t).expect("prometheus text parses");
    let mut out = std::collections::HashMap::new();
    for s in &samples {
        let keys: Vec<&str> = s.labels.iter().map(|(k, _)| k.as_str()).collect();
        assert!(
            keys.contains(&"model_name") && keys.contains(&"engine"),
            "{s:?}"
        );
    }
    for (fam, ty) in &types {
        let v = if ty == "histogram" {
            let buckets: Vec<f64> = samples
                .iter()
                .filter(|s| s.name == format!("{fam}_bucket"))
                .map(|s| s.value)
                .collect();
            assert!(
                buckets.windows(2).all(|w| w[0] <= w[1]),
                "{fam} buckets not cumulative"
            );
            samples
                .iter()
                .find(|s| s.name == format!("{fam}_count"))
                .map(|s| s.value)
                .expect("count")
        } else {
            samples
                .iter()
                .find(|s| &s.name == fam)
                .map(|s| s.value)
                .expect("sample")
        };
        out.insert(fam.clone(), v);
    }
    out
}

#[tokio::test]
async fn metrics_parse_and_move() {
    let sim = Sim::spawn(&["--time-scale", "5"]);
    let c = client();
    let url = sim.url(0, "/v1/chat/completions");
    let murl = sim.url(0, "/metrics");
    let before = scrape(&c, &murl).await;
    for n in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:num_preemptions_total",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
    ] {
        assert_eq!(before.get(n), Some(&0.0), "{n}");
    }
    // While a long request runs: running = 1 and KV usage > 0.
    let c2 = c.clone();
    let url2 = url.clone();
    let t = tokio::spawn(async move { chat(&c2, &url2, msgs(&text(3, 3000), "x"), 400).await });
    let mut saw = false;
    for _ in 0..400 {
        let s = scrape(&c, &murl).await;
        if s["vllm:num_requests_running"] == 1.0 && s["vllm:kv_cache_usage_perc"] > 0.0 {
            saw = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    assert!(saw, "running/kv usage gauges never moved");
    let (_, _, body) = t.await.expect("join");
    let after = scrape(&c, &murl).await;
    assert_eq!(after["vllm:generation_tokens_total"], 400.0);
    assert_eq!(
        after["vllm:prompt_tokens_total"],
        body["usage"]["prompt_tokens"].as_f64().expect("p")
    );
    assert_eq!(after["vllm:num_requests_running"], 0.0);
    assert_eq!(after["vllm:kv_cache_usage_perc"], 0.0);
    assert_eq!(after["vllm:time_to_first_token_seconds"], 1.0);
    assert_eq!(after["vllm:inter_token_latency_seconds"], 399.0);
    assert_eq!(after["vllm:e2e_request_latency_seconds"], 1.0);
    assert_eq!(
        after["vllm:prefix_cache_queries_total"],
        after["vllm:prompt_tokens_total"]
    );
}

#[tokio::test]
async fn client_disconnect_aborts_the_request() {
    let sim = Sim::spawn(&["--time-scale", "1"]);
    let c = client();
    let mut r = c
        .post(sim.url(0, "/v1/chat/completions"))
        .json(&json!({"messages": msgs("s", "long"), "max_tokens": 5000, "stream": true}))
        .send()
        .await
        .expect("stream");
    // Read the first event, then go away.
    let first = r.chunk().await.expect("chunk").expect("some bytes");
    assert!(first.starts_with(b"data: "));
    drop(r);
    let m = sim.url(0, "/metrics");
    let mut freed = false;
    for _ in 0..200 {
        if metric(&c, &m, "vllm:num_requests_running").await == 0.0
            && metric(&c, &m, "vllm:kv_cache_usage_perc").await == 0.0
        {
            freed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(freed, "aborted request still holds the engine");
    let text = c.get(&m).send().await.expect("m").text().await.expect("t");
    assert!(
        text.lines()
            .any(|l| l.contains("finished_reason=\"abort\"") && l.ends_with(" 1.0")),
        "abort counted"
    );
}
