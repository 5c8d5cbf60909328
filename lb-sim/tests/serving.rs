//! vLLM's serving routes (detokenize, score, rerank, pooling, classify, embeddings, audio)
//! against real `vllm-sim` processes: shapes, determinism across instances, request ids,
//! per-route counters in `/sim/info`, errors, method checks and the fault gate.

mod common;

use common::{Sim, client, get_json};
use serde_json::{Value, json};

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// `POST url` with a JSON body and an `X-Request-Id`: status, echoed id, body.
async fn post(c: &reqwest::Client, url: &str, rid: &str, body: &Value) -> (u16, String, Value) {
    let r = c
        .post(url)
        .header("X-Request-Id", rid)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = r.status().as_u16();
    let echoed = r
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let v = r
        .json()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: not JSON: {e}"));
    (status, echoed, v)
}

/// A `multipart/form-data` body: `(name, filename, data)` fields.
fn multipart(fields: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "----vllm-sim-test-boundary";
    let mut b = Vec::new();
    for (name, filename, data) in fields {
        b.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        let disposition = match filename {
            Some(f) => format!(
                "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                 Content-Type: audio/wav\r\n\r\n"
            ),
            None => format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n"),
        };
        b.extend_from_slice(disposition.as_bytes());
        b.extend_from_slice(data);
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), b)
}

/// `POST url` with a multipart body: status, content type, body text.
async fn post_form(
    c: &reqwest::Client,
    url: &str,
    fields: &[(&str, Option<&str>, &[u8])],
) -> (u16, String, String) {
    let (ct, body) = multipart(fields);
    let r = c
        .post(url)
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = r.status().as_u16();
    let ctype = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, ctype, r.text().await.expect("body"))
}

/// A WAV file of `seconds` of 16 kHz 16-bit mono audio with a recognizable pattern.
fn wav(seconds: f64, salt: u8) -> Vec<u8> {
    let data = (seconds * 32_000.0) as usize;
    let mut w = Vec::with_capacity(44 + data);
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&((36 + data) as u32).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes()); // PCM
    w.extend_from_slice(&1u16.to_le_bytes()); // mono
    w.extend_from_slice(&16_000u32.to_le_bytes());
    w.extend_from_slice(&32_000u32.to_le_bytes()); // byte rate
    w.extend_from_slice(&2u16.to_le_bytes());
    w.extend_from_slice(&16u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&(data as u32).to_le_bytes());
    w.extend((0..data).map(|i| (i as u8).wrapping_mul(31) ^ salt));
    w
}

/// The body without its per-request fields (`id`, `created`).
fn stable(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("id");
        o.remove("created");
    }
    v
}

#[tokio::test]
async fn every_serving_route_over_http() {
    let sim = Sim::spawn(&["--time-scale", "20", "--instances", "2"]);
    let c = client();

    // /v1/score (and /score): 1:N, deterministic across instances.
    let score_body = json!({"model": MODEL, "text_1": "what is the capital of france", "text_2": ["paris is the capital", "berlin is in germany"]});
    let (s, rid, v) = post(&c, &sim.url(0, "/v1/score"), "sc-1", &score_body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(rid, "sc-1");
    assert_eq!(v["id"], "score-sc-1");
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], MODEL);
    assert!(v["created"].is_u64());
    assert_eq!(v["data"].as_array().expect("data").len(), 2);
    assert_eq!(v["data"][0]["object"], "score");
    assert!(v["data"][0]["score"].is_f64());
    assert_eq!(v["usage"]["completion_tokens"], 0);
    assert!(v["usage"]["prompt_tokens"].as_u64().expect("n") > 0);
    let (s, _, v1) = post(&c, &sim.url(1, "/score"), "sc-2", &score_body).await;
    assert_eq!(s, 200);
    assert_eq!(stable(&v1), stable(&v));

    // /v1/rerank, /rerank, /v2/rerank: same answer, sorted, top_n; scores equal /score's.
    let rr = json!({"model": MODEL, "query": "what is the capital of france", "documents": ["paris is the capital", "berlin is in germany", {"text": "rome"}], "top_n": 2});
    let mut reranks = Vec::new();
    for (i, path) in ["/v1/rerank", "/rerank", "/v2/rerank"].iter().enumerate() {
        let (s, rid, v) = post(&c, &sim.url(i % 2, path), &format!("rr-{i}"), &rr).await;
        assert_eq!(s, 200, "{path}: {v}");
        assert_eq!(rid, format!("rr-{i}"));
        assert_eq!(v["id"], format!("rerank-rr-{i}"));
        reranks.push(stable(&v));
    }
    assert_eq!(reranks[0], reranks[1]);
    assert_eq!(reranks[0], reranks[2]);
    let results = reranks[0]["results"].as_array().expect("results").clone();
    assert_eq!(results.len(), 2);
    assert!(
        results[0]["relevance_score"].as_f64().expect("s")
            >= results[1]["relevance_score"].as_f64().expect("s")
    );
    for r in &results {
        let i = r["index"].as_u64().expect("i") as usize;
        if i < 2 {
            assert_eq!(r["relevance_score"], v["data"][i]["score"]);
        }
    }
    assert!(reranks[0]["usage"]["total_tokens"].as_u64().expect("n") > 0);

    // /v1/embeddings: float and base64; equal on both instances.
    let emb = json!({"model": MODEL, "input": ["hello world", "second input"]});
    let (s, rid, e0) = post(&c, &sim.url(0, "/v1/embeddings"), "em-1", &emb).await;
    assert_eq!(s, 200, "{e0}");
    assert_eq!(rid, "em-1");
    assert_eq!(e0["id"], "embd-em-1");
    assert_eq!(e0["object"], "list");
    assert_eq!(e0["data"][1]["object"], "embedding");
    assert_eq!(e0["data"][1]["index"], 1);
    assert!(!e0["data"][0]["embedding"].as_array().expect("e").is_empty());
    // BOS + 3 tokens, BOS + 3 tokens (stand-in, 4 chars per token).
    assert_eq!(e0["usage"]["prompt_tokens"], 8);
    assert_eq!(e0["usage"]["total_tokens"], 8);
    let (_, _, e1) = post(&c, &sim.url(1, "/v1/embeddings"), "em-2", &emb).await;
    assert_eq!(stable(&e1), stable(&e0));
    let (s, _, b64) = post(
        &c,
        &sim.url(0, "/v1/embeddings"),
        "em-3",
        &json!({"input": "hello world", "encoding_format": "base64", "dimensions": 4}),
    )
    .await;
    assert_eq!(s, 200, "{b64}");
    // 4 f32 = 16 bytes = 24 base64 characters.
    assert_eq!(b64["data"][0]["embedding"].as_str().expect("b64").len(), 24);

    // /pooling: input or messages.
    let (s, _, p) = post(
        &c,
        &sim.url(1, "/pooling"),
        "po-1",
        &json!({"model": MODEL, "input": "hello world"}),
    )
    .await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["id"], "pool-po-1");
    assert_eq!(p["data"][0]["object"], "pooling");
    assert_eq!(p["data"][0]["data"], e0["data"][0]["embedding"]);
    let (s, _, pm) = post(
        &c,
        &sim.url(1, "/pooling"),
        "po-2",
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(s, 200, "{pm}");
    assert!(pm["usage"]["prompt_tokens"].as_u64().expect("n") > 3);

    // /classify.
    let (s, _, cl) = post(
        &c,
        &sim.url(0, "/classify"),
        "cl-1",
        &json!({"model": MODEL, "input": ["great movie", "awful movie"]}),
    )
    .await;
    assert_eq!(s, 200, "{cl}");
    assert_eq!(cl["id"], "classify-cl-1");
    assert_eq!(cl["object"], "list");
    assert_eq!(cl["data"].as_array().expect("d").len(), 2);
    assert!(
        cl["data"][0]["label"]
            .as_str()
            .expect("l")
            .starts_with("LABEL_")
    );
    assert_eq!(cl["data"][0]["num_classes"], 2);
    assert_eq!(cl["data"][0]["probs"].as_array().expect("p").len(), 2);

    // /detokenize: the stand-in cannot.
    let (s, _, d) = post(
        &c,
        &sim.url(0, "/detokenize"),
        "dt-1",
        &json!({"model": MODEL, "tokens": [128000, 1, 2]}),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(d["error"]["type"], "BadRequestError");
    assert!(
        d["error"]["message"]
            .as_str()
            .expect("m")
            .contains("--tokenizer"),
        "{d}"
    );

    // Audio: transcriptions (json, text, verbose_json) and translations.
    let audio = wav(2.0, 5);
    let tr_url = sim.url(1, "/v1/audio/transcriptions");
    let (s, ct, t) = post_form(
        &c,
        &tr_url,
        &[
            ("file", Some("a.wav"), &audio),
            ("model", None, MODEL.as_bytes()),
        ],
    )
    .await;
    assert_eq!(s, 200, "{t}");
    assert!(ct.starts_with("application/json"));
    let tj: Value = serde_json::from_str(&t).expect("json");
    let text = tj["text"].as_str().expect("text").to_string();
    assert!(!text.is_empty());
    assert_eq!(tj["usage"], json!({"type": "duration", "seconds": 2}));
    let (s, ct, plain) = post_form(
        &c,
        &sim.url(0, "/v1/audio/transcriptions"),
        &[
            ("model", None, MODEL.as_bytes()),
            ("response_format", None, b"text"),
            ("language", None, b"en"),
            ("file", Some("a.wav"), &audio),
        ],
    )
    .await;
    assert_eq!(s, 200);
    assert!(ct.starts_with("text/plain"), "{ct}");
    assert_eq!(plain, text);
    let (s, _, vj) = post_form(
        &c,
        &tr_url,
        &[
            ("file", Some("a.wav"), &audio),
            ("response_format", None, b"verbose_json"),
        ],
    )
    .await;
    assert_eq!(s, 200);
    let vj: Value = serde_json::from_str(&vj).expect("json");
    assert_eq!(vj["text"], text);
    assert_eq!(vj["language"], "en");
    assert_eq!(vj["duration"], "2.0");
    assert!(vj["segments"].is_array());
    let (s, _, tl) = post_form(
        &c,
        &sim.url(0, "/v1/audio/translations"),
        &[
            ("file", Some("a.wav"), &audio),
            ("model", None, MODEL.as_bytes()),
        ],
    )
    .await;
    assert_eq!(s, 200, "{tl}");
    let tl: Value = serde_json::from_str(&tl).expect("json");
    assert!(tl["text"].is_string());
    // Another file, another transcript.
    let (_, _, other) = post_form(&c, &tr_url, &[("file", Some("b.wav"), &wav(2.0, 9))]).await;
    let other: Value = serde_json::from_str(&other).expect("json");
    assert_ne!(other["text"], text);
    // Missing file: 400; unknown model: 404.
    let (s, _, e) = post_form(&c, &tr_url, &[("model", None, MODEL.as_bytes())]).await;
    assert_eq!(s, 400, "{e}");
    let e: Value = serde_json::from_str(&e).expect("json");
    assert_eq!(e["error"]["code"], 400);
    let (s, _, e) = post_form(
        &c,
        &tr_url,
        &[("file", Some("a.wav"), &audio), ("model", None, b"nope")],
    )
    .await;
    assert_eq!(s, 404, "{e}");

    // Unknown model on a JSON route: vLLM's 404 body.
    let (s, _, e) = post(
        &c,
        &sim.url(0, "/v1/embeddings"),
        "x",
        &json!({"model": "other", "input": "x"}),
    )
    .await;
    assert_eq!(s, 404);
    assert_eq!(
        e,
        json!({"error": {"message": "The model `other` does not exist.", "type": "NotFoundError", "param": "model", "code": 404}})
    );
    // Malformed JSON: 400.
    let r = c
        .post(sim.url(0, "/v1/score"))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    // GET on a POST route: 405.
    let r = c.get(sim.url(0, "/v1/rerank")).send().await.expect("get");
    assert_eq!(r.status(), 405);

    // Counters per instance and route (errors included).
    let i0 = get_json(&c, &sim.url(0, "/sim/info")).await;
    let i1 = get_json(&c, &sim.url(1, "/sim/info")).await;
    assert_eq!(
        i0["serving"],
        json!({"detokenize": 1, "score": 2, "rerank": 2, "pooling": 0, "classify": 1,
               "embeddings": 3, "transcriptions": 1, "translations": 1}),
        "{}",
        i0["serving"]
    );
    assert_eq!(
        i1["serving"],
        json!({"detokenize": 0, "score": 1, "rerank": 1, "pooling": 2, "classify": 0,
               "embeddings": 1, "transcriptions": 5, "translations": 0}),
        "{}",
        i1["serving"]
    );
    // Nothing left in flight.
    assert_eq!(
        get_json(&c, &sim.url(0, "/load")).await,
        json!({"server_load": 0})
    );

    // The fault gate applies (503), and a cleared fault serves again.
    let r = c
        .post(sim.url(0, "/sim/fault"))
        .json(&json!({"mode": "503"}))
        .send()
        .await
        .expect("fault");
    assert_eq!(r.status(), 200);
    let (s, _, _) = post(&c, &sim.url(0, "/v1/score"), "f", &score_body).await;
    assert_eq!(s, 503);
    let r = c
        .post(sim.url(0, "/sim/fault"))
        .json(&json!({"mode": "none"}))
        .send()
        .await
        .expect("fault");
    assert_eq!(r.status(), 200);
    let (s, _, after) = post(&c, &sim.url(0, "/v1/score"), "g", &score_body).await;
    assert_eq!(s, 200);
    assert_eq!(stable(&after), stable(&v));
}

#[tokio::test]
async fn detokenize_in_hf_mode() {
    let dir = std::env::temp_dir().join(format!("vllm-sim-serving-tok-{}", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vllm-sim"))
        .arg("export-tokenizer")
        .arg(&dir)
        .output()
        .expect("export-tokenizer");
    assert!(out.status.success());
    let sim = Sim::spawn(&[
        "--time-scale",
        "20",
        "--tokenizer",
        dir.to_str().expect("utf-8 path"),
    ]);
    let c = client();
    let (s, _, t) = post(
        &c,
        &sim.url(0, "/tokenize"),
        "t",
        &json!({"prompt": "the quick brown fox"}),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _, d) = post(
        &c,
        &sim.url(0, "/detokenize"),
        "d",
        &json!({"model": MODEL, "tokens": t["tokens"]}),
    )
    .await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d, json!({"prompt": "<|begin_of_text|>the quick brown fox"}));
    let (s, _, e) = post(
        &c,
        &sim.url(0, "/detokenize"),
        "e",
        &json!({"tokens": [999_999_999]}),
    )
    .await;
    assert_eq!(s, 400, "{e}");
    // Usage counts HF tokens.
    let (s, _, emb) = post(
        &c,
        &sim.url(0, "/v1/embeddings"),
        "e",
        &json!({"input": "the quick brown fox"}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(emb["usage"]["prompt_tokens"], t["count"]);
    let _ = std::fs::remove_dir_all(dir);
}
