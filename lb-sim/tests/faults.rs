//! Each fault mode behaves as named, against a real `vllm-sim` process.

mod common;

use std::time::Duration;

use common::{Sim, chat, client, get_json, hdr_f64, text, wait_up};
use serde_json::{Value, json};

fn one_msg(s: &str) -> Value {
    json!([{"role": "user", "content": s}])
}

/// The status `GET url` answers with.
async fn health(c: &reqwest::Client, url: &str) -> reqwest::StatusCode {
    c.get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .status()
}

async fn set_fault(c: &reqwest::Client, url: &str, spec: Value) {
    let r = c.post(url).json(&spec).send().await.expect("fault");
    assert_eq!(r.status(), 200, "{spec}");
}

#[tokio::test]
async fn unavailable_hang_and_slow() {
    let sim = Sim::spawn(&["--time-scale", "10", "--admin-port", "0"]);
    let c = client();
    let url = sim.url(0, "/v1/chat/completions");
    let fault = sim.url(0, "/sim/fault");

    // 503 on vLLM endpoints, /sim still answers.
    set_fault(&c, &fault, json!({"mode": "503"})).await;
    let r = c.get(sim.url(0, "/health")).send().await.expect("health");
    assert_eq!(r.status(), 503);
    let (s, _, body) = chat(&c, &url, one_msg("x"), 2).await;
    assert_eq!(s, 503);
    assert_eq!(body["error"]["code"], 503);

    // Hang: no answer within the client's timeout; clearing the fault releases it.
    set_fault(&c, &fault, json!({"mode": "hang"})).await;
    let short = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(400))
        .build()
        .expect("client");
    let e = short.get(sim.url(0, "/health")).send().await;
    assert!(e.is_err_and(|e| e.is_timeout()));
    let c2 = c.clone();
    let url2 = url.clone();
    let pending = tokio::spawn(async move { chat(&c2, &url2, one_msg("held"), 2).await.0 });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pending.is_finished());
    set_fault(&c, &fault, json!({"mode": "none"})).await;
    assert_eq!(pending.await.expect("join"), 200);

    // Slow ×4: the prefill step takes exactly 4× the model.
    let m = one_msg(&text(5, 4000));
    let (_, h1, _) = chat(&c, &url, m.clone(), 1).await;
    let base = hdr_f64(&h1, "x-sim-ttft") - hdr_f64(&h1, "x-sim-queue");
    set_fault(&c, &fault, json!({"mode": "slow", "factor": 4.0})).await;
    let (_, h2, b2) = chat(&c, &url, one_msg(&text(6, 4000)), 1).await;
    assert_eq!(b2["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let slow = hdr_f64(&h2, "x-sim-ttft") - hdr_f64(&h2, "x-sim-queue");
    assert!((slow / base - 4.0).abs() < 0.01, "{slow} vs {base}");
    // A fault with a duration reverts by itself.
    set_fault(&c, &fault, json!({"mode": "503", "duration_s": 0.3})).await;
    assert_eq!(health(&c, &sim.url(0, "/health")).await, 503);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(health(&c, &sim.url(0, "/health")).await, 200);
    // The admin port sees the instance.
    let v = get_json(&c, &sim.admin("/instances")).await;
    assert_eq!(v[0]["fault"]["mode"], "none");
}

#[tokio::test]
async fn reset_mid_stream_after_n_tokens() {
    let sim = Sim::spawn(&["--time-scale", "10", "--fault", "reset:5"]);
    let c = client();
    let r = c
        .post(sim.url(0, "/v1/chat/completions"))
        .json(&json!({"messages": one_msg("cut me"), "max_tokens": 50, "stream": true}))
        .send()
        .await
        .expect("headers arrive");
    assert_eq!(r.status(), 200);
    let mut got = Vec::new();
    let mut stream = r;
    let err = loop {
        match stream.chunk().await {
            Ok(Some(b)) => got.extend_from_slice(&b),
            Ok(None) => panic!("stream ended cleanly: {}", String::from_utf8_lossy(&got)),
            Err(e) => break e,
        }
    };
    let _ = err;
    let text = String::from_utf8_lossy(&got);
    assert!(!text.contains("[DONE]"));
    let mut content = String::new();
    for ev in text.split("\n\n").filter(|e| !e.is_empty()) {
        let v: Value = serde_json::from_str(ev.trim_start_matches("data: ")).expect("chunk");
        if let Some(s) = v["choices"][0]["delta"]["content"].as_str() {
            content.push_str(s);
        }
    }
    assert_eq!(
        content.len(),
        5 * 4,
        "exactly 5 tokens before the cut: {content:?}"
    );
}

#[tokio::test]
async fn refuse_and_die_then_recover() {
    let sim = Sim::spawn(&["--time-scale", "5", "--admin-port", "0", "--instances", "2"]);
    let c = client();
    let url = sim.url(0, "/v1/chat/completions");
    let m = one_msg(&text(9, 1000));
    let (s, _, _) = chat(&c, &url, m.clone(), 2).await;
    assert_eq!(s, 200);

    // Refuse: connections are refused (a fresh client has no pooled connection).
    set_fault(
        &c,
        &sim.admin("/instances/0/fault"),
        json!({"mode": "refuse"}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fresh = client();
    let e = fresh
        .get(sim.url(0, "/health"))
        .send()
        .await
        .expect_err("refused");
    assert!(e.is_connect(), "{e:?}");
    // The other instance is unaffected.
    assert_eq!(health(&fresh, &sim.url(1, "/health")).await, 200);
    set_fault(
        &c,
        &sim.admin("/instances/0/fault"),
        json!({"mode": "none"}),
    )
    .await;
    assert!(
        wait_up(&sim.url(0, "/health")).await.is_some(),
        "listener re-bound"
    );
    // Cache survived refuse.
    let (_, _, b) = chat(&client(), &url, m.clone(), 2).await;
    assert!(
        b["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("c")
            > 0
    );

    // Die: an in-flight stream is cut, new connections are refused.
    let c3 = client();
    let url3 = url.clone();
    let inflight = tokio::spawn(async move {
        let r = c3
            .post(&url3)
            .json(&json!({"messages": one_msg("long"), "max_tokens": 2000, "stream": true}))
            .send()
            .await
            .expect("stream headers");
        r.text().await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    set_fault(&c, &sim.admin("/instances/0/fault"), json!({"mode": "die"})).await;
    let res = inflight.await.expect("join");
    assert!(
        res.is_err() || !res.as_ref().is_ok_and(|t| t.contains("[DONE]")),
        "stream should break"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(client().get(sim.url(0, "/health")).send().await.is_err());
    // Revive: a fresh engine with an empty cache.
    set_fault(
        &c,
        &sim.admin("/instances/0/fault"),
        json!({"mode": "none"}),
    )
    .await;
    assert_eq!(
        wait_up(&sim.url(0, "/health")).await,
        Some(reqwest::StatusCode::OK)
    );
    let (_, _, b) = chat(&client(), &url, m, 2).await;
    assert_eq!(b["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
}

#[tokio::test]
async fn fault_cli_subcommand() {
    let sim = Sim::spawn(&["--time-scale", "5"]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vllm-sim"))
        .args(["fault", "--url", &sim.url(0, ""), "503"])
        .output()
        .expect("run fault cli");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = client();
    assert_eq!(health(&c, &sim.url(0, "/health")).await, 503);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vllm-sim"))
        .args(["fault", "--url", &sim.url(0, ""), "none"])
        .output()
        .expect("run fault cli");
    assert!(out.status.success());
    assert_eq!(health(&c, &sim.url(0, "/health")).await, 200);
}
