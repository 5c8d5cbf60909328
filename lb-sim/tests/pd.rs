//! Disaggregated prefill/decode (vLLM NixlConnector protocol) between real `vllm-sim`
//! processes: prefill leg, KV pull, decode leg (streaming and not), failures and role refusals.

mod common;

use common::{Sim, client, get_json, hdr_f64, metric, text};
use serde_json::{Value, json};

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// The `kv_transfer_params` a P/D proxy puts in a prefill leg.
fn prefill_params() -> Value {
    json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
        "remote_block_ids": null, "remote_host": null, "remote_port": null})
}

fn chat_body(prompt: &str, max_tokens: u64, stream: bool, params: Option<&Value>) -> Value {
    let mut b = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": stream,
    });
    if stream {
        b["stream_options"] = json!({"include_usage": true});
    }
    if let Some(p) = params {
        b["kv_transfer_params"] = p.clone();
    }
    b
}

/// POSTs a JSON body; returns (status, headers, body text).
async fn post(
    c: &reqwest::Client,
    url: &str,
    body: &Value,
) -> (reqwest::StatusCode, reqwest::header::HeaderMap, String) {
    let r = c
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let (s, h) = (r.status(), r.headers().clone());
    (s, h, r.text().await.expect("body"))
}

fn parse(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// A prefill leg (as the proxy sends it: non-streaming, one token); returns its answer.
async fn prefill_leg(c: &reqwest::Client, url: &str, prompt: &str) -> Value {
    let (s, _, b) = post(
        c,
        url,
        &chat_body(prompt, 1, false, Some(&prefill_params())),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    parse(&b)
}

async fn pd_info(c: &reqwest::Client, sim: &Sim, i: usize) -> Value {
    get_json(c, &sim.url(i, "/sim/info")).await["pd"].clone()
}

#[tokio::test]
async fn prefill_then_decode_across_processes() {
    // Instance 0 of `p` is a producer, instance 1 serves both legs (and plain requests).
    let p = Sim::spawn(&[
        "--time-scale",
        "10",
        "--instances",
        "2",
        "--kv-role",
        "producer,both",
        "--admin-port",
        "0",
    ]);
    let d = Sim::spawn(&["--time-scale", "10", "--kv-role", "consumer"]);
    let c = client();
    let prompt = text(1, 64_000); // ≈ 16,000 tokens

    // Reference: a plain request with the same prompt on a fresh instance.
    let (s, h, b) = post(
        &c,
        &p.url(1, "/v1/chat/completions"),
        &chat_body(&prompt, 4, false, None),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let plain_ttft = hdr_f64(&h, "x-sim-ttft");
    assert!(parse(&b)["kv_transfer_params"].is_null());

    // 1. Prefill leg on the producer.
    let pre = prefill_leg(&c, &p.url(0, "/v1/chat/completions"), &prompt).await;
    let n = pre["usage"]["prompt_tokens"]
        .as_u64()
        .expect("prompt_tokens");
    assert!(n > 15_000, "{n}");
    assert_eq!(pre["usage"]["completion_tokens"], 1);
    let kv = pre["kv_transfer_params"].clone();
    let p0 = pd_info(&c, &p, 0).await;
    assert_eq!(kv["do_remote_prefill"], true);
    assert_eq!(kv["do_remote_decode"], false);
    assert_eq!(kv["remote_engine_id"], p0["engine_id"]);
    assert_eq!(kv["remote_host"], "127.0.0.1");
    assert_eq!(kv["remote_port"], p.ports[0]);
    assert_eq!(kv["tp_size"], 1);
    let ids = kv["remote_block_ids"].as_array().expect("block ids");
    assert_eq!(
        ids.len() as u64,
        n.div_ceil(16),
        "one id per block, partial included"
    );
    assert!(ids.iter().all(Value::is_u64));
    assert_eq!(p0["kv_role"], "producer");
    assert_eq!(p0["prefill_legs"], 1);
    assert_eq!(p0["pending_transfers"], 1);

    // 2. Decode leg (streaming) on the consumer: the KV is pulled, the prompt not recomputed.
    let (s, _, sse) = post(
        &c,
        &d.url(0, "/v1/chat/completions"),
        &chat_body(&prompt, 8, true, Some(&kv)),
    )
    .await;
    assert_eq!(s, 200, "{sse}");
    assert!(sse.ends_with("data: [DONE]\n\n"), "{sse}");
    let usage = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
        .map(parse)
        .find(|v| !v["usage"].is_null())
        .expect("usage chunk")["usage"]
        .clone();
    assert_eq!(usage["completion_tokens"], 8);
    assert_eq!(usage["prompt_tokens"], n);
    // As vLLM's num_cached_tokens: the transferred tokens, bar the recomputed last one.
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], n - 1);
    let ttft = metric(
        &c,
        &d.url(0, "/metrics"),
        "vllm:time_to_first_token_seconds_sum",
    )
    .await;
    let transfer = n as f64 * 2e-6;
    assert!(
        ttft >= transfer - 1e-9,
        "TTFT {ttft} includes the transfer {transfer}"
    );
    assert!(
        ttft * 4.0 < plain_ttft,
        "decode TTFT {ttft} vs plain {plain_ttft}"
    );
    let d0 = pd_info(&c, &d, 0).await;
    assert_eq!(d0["kv_role"], "consumer");
    assert_eq!(d0["decode_legs"], 1);
    assert_eq!(d0["transferred_tokens"], n);
    assert_eq!(d0["transfer_failures"], 0);
    assert_eq!(d0["prefill_legs"], 0);
    assert_eq!(pd_info(&c, &p, 0).await["pending_transfers"], 0);

    // 3. The same params again: the transfer is gone (404), the decode leg recomputes.
    let pull = json!({"engine_id": kv["remote_engine_id"], "block_ids": kv["remote_block_ids"]});
    let (s, _, b) = post(&c, &p.url(0, "/sim/kv_transfer"), &pull).await;
    assert_eq!(s, 404, "{b}");
    assert_eq!(parse(&b)["error"]["code"], 404);
    let (s, _, b) = post(
        &c,
        &d.url(0, "/v1/chat/completions"),
        &chat_body(&prompt, 2, false, Some(&kv)),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert!(parse(&b)["kv_transfer_params"].is_null());
    let d0 = pd_info(&c, &d, 0).await;
    assert_eq!(d0["decode_legs"], 2);
    assert_eq!(d0["transfer_failures"], 1);
    assert_eq!(d0["transferred_tokens"], n);

    // 4. Non-streaming decode leg of a fresh prompt: x-sim-ttft is about one decode step plus
    //    the transfer, far below a local prefill.
    let prompt2 = text(2, 64_000);
    let pre = prefill_leg(&c, &p.url(0, "/v1/chat/completions"), &prompt2).await;
    let n2 = pre["usage"]["prompt_tokens"]
        .as_u64()
        .expect("prompt_tokens");
    let (s, h, b) = post(
        &c,
        &d.url(0, "/v1/chat/completions"),
        &chat_body(&prompt2, 4, false, Some(&pre["kv_transfer_params"])),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let ttft = hdr_f64(&h, "x-sim-ttft");
    assert!(ttft >= n2 as f64 * 2e-6 - 1e-9, "{ttft}");
    assert!(
        ttft * 4.0 < plain_ttft,
        "decode TTFT {ttft} vs plain {plain_ttft}"
    );
    assert_eq!(pd_info(&c, &d, 0).await["transfer_failures"], 1);

    // 5. Completions on a `both` instance, decoding on itself.
    let (s, _, b) = post(
        &c,
        &p.url(1, "/v1/completions"),
        &json!({"model": MODEL, "prompt": text(3, 4000), "max_tokens": 1,
            "kv_transfer_params": prefill_params()}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let kv3 = parse(&b)["kv_transfer_params"].clone();
    assert_eq!(kv3["remote_port"], p.ports[1]);
    let (s, _, b) = post(
        &c,
        &p.url(1, "/v1/completions"),
        &json!({"model": MODEL, "prompt": text(3, 4000), "max_tokens": 3, "stream": true,
            "kv_transfer_params": kv3}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert!(b.ends_with("data: [DONE]\n\n"), "{b}");
    let p1 = pd_info(&c, &p, 1).await;
    assert_eq!(
        (p1["prefill_legs"].clone(), p1["decode_legs"].clone()),
        (json!(1), json!(1))
    );
    assert_eq!(p1["transfer_failures"], 0);
    assert_eq!(p1["plain_requests"], 1);

    // 6. A revived producer is a new incarnation: new engine id, its old KV gone.
    let pre = prefill_leg(&c, &p.url(0, "/v1/chat/completions"), &text(4, 2000)).await;
    let old_id = pd_info(&c, &p, 0).await["engine_id"].clone();
    for mode in ["die", "none"] {
        let r = c
            .post(p.admin("/instances/0/fault"))
            .json(&json!({"mode": mode}))
            .send()
            .await
            .expect("fault");
        assert_eq!(r.status(), 200);
    }
    common::wait_up(&p.url(0, "/health"))
        .await
        .expect("back up");
    let p0 = pd_info(&c, &p, 0).await;
    assert_ne!(p0["engine_id"], old_id);
    assert_eq!(p0["pending_transfers"], 0);
    let (s, _, b) = post(
        &c,
        &d.url(0, "/v1/chat/completions"),
        &chat_body(&text(4, 2000), 2, false, Some(&pre["kv_transfer_params"])),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(pd_info(&c, &d, 0).await["transfer_failures"], 2);
}

#[tokio::test]
async fn roles_refuse_the_other_leg_and_bad_params() {
    let sim = Sim::spawn(&["--instances", "2", "--kv-role", "producer,consumer"]);
    let c = client();
    let (producer, consumer) = (
        sim.url(0, "/v1/chat/completions"),
        sim.url(1, "/v1/chat/completions"),
    );
    let decode = json!({"do_remote_prefill": true, "do_remote_decode": false,
        "remote_engine_id": "x", "remote_block_ids": [0], "remote_host": "127.0.0.1",
        "remote_port": sim.ports[0], "tp_size": 1});
    let refusals = [
        (&producer, chat_body("hi", 2, true, Some(&decode))),
        (
            &consumer,
            chat_body("hi", 1, false, Some(&prefill_params())),
        ),
        (&producer, chat_body("hi", 1, false, Some(&json!("yes")))),
        (
            &producer,
            chat_body("hi", 1, false, Some(&json!({"do_remote_decode": 1}))),
        ),
        (
            &consumer,
            chat_body("hi", 1, false, Some(&json!({"do_remote_prefill": true}))),
        ),
        (
            &consumer,
            chat_body(
                "hi",
                1,
                false,
                Some(&json!({"do_remote_prefill": true, "remote_engine_id": "x",
                    "remote_block_ids": "0", "remote_host": "h", "remote_port": 1})),
            ),
        ),
    ];
    for (url, body) in &refusals {
        let (s, _, b) = post(&c, url, body).await;
        assert_eq!(s, 400, "{body}: {b}");
        let e = parse(&b)["error"].clone();
        assert_eq!(e["type"], "BadRequestError", "{b}");
        assert_eq!(e["code"], 400);
        assert!(
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("kv_transfer_params")),
            "{b}"
        );
    }
    // Plain requests (and `kv_transfer_params: null`) are served by every role.
    for url in [&producer, &consumer] {
        let (s, _, b) = post(&c, url, &chat_body("hi", 2, false, None)).await;
        assert_eq!(s, 200, "{b}");
        let (s, _, b) = post(&c, url, &chat_body("hi", 2, false, Some(&Value::Null))).await;
        assert_eq!(s, 200, "{b}");
    }
    // A decode leg whose KV is unknown to its prefill instance still succeeds (recompute).
    let both = Sim::spawn(&[]);
    let (s, _, b) = post(
        &c,
        &both.url(0, "/v1/chat/completions"),
        &chat_body("hi", 2, false, Some(&decode)),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let pd = pd_info(&c, &both, 0).await;
    assert_eq!(pd["kv_role"], "both");
    assert_eq!(pd["decode_legs"], 1);
    assert_eq!(pd["transfer_failures"], 1);
    for i in 0..2 {
        let pd = pd_info(&c, &sim, i).await;
        assert_eq!(pd["plain_requests"], 2);
        assert_eq!(pd["prefill_legs"], 0);
        assert_eq!(pd["decode_legs"], 0);
    }
    // Malformed pulls.
    let (s, _, _) = post(
        &c,
        &sim.url(0, "/sim/kv_transfer"),
        &json!({"engine_id": 1}),
    )
    .await;
    assert_eq!(s, 400);
}
