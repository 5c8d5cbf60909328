//! OpenAI/vLLM API shape against a real `vllm-sim` process.

mod common;

use common::{Sim, client, get_json, post_json};
use serde_json::{Value, json};

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

#[tokio::test]
async fn endpoints_and_payload_shapes() {
    let sim = Sim::spawn(&["--time-scale", "20"]);
    let c = client();
    // /health: 200, empty.
    let r = c.get(sim.url(0, "/health")).send().await.expect("health");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.expect("body"), "");
    // /v1/models
    let m = get_json(&c, &sim.url(0, "/v1/models")).await;
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], MODEL);
    assert_eq!(m["data"][0]["max_model_len"], 131072);
    // /load
    let l = get_json(&c, &sim.url(0, "/load")).await;
    assert_eq!(l, json!({"server_load": 0}));
    // /tokenize (prompt and messages)
    let t = post_json(&c, &sim.url(0, "/tokenize"), &json!({"prompt": "abcdefgh"})).await;
    assert_eq!(t["count"], 3);
    assert_eq!(t["max_model_len"], 131072);
    assert_eq!(t["tokens"][0], 128000);
    let t2 = post_json(
        &c,
        &sim.url(0, "/tokenize"),
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert!(t2["count"].as_u64().expect("count") > 5);

    // Chat, non-streaming, with unknown fields and a request id.
    let r = c
        .post(sim.url(0, "/v1/chat/completions"))
        .header("X-Request-Id", "req-42")
        .json(&json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 7,
            "workflow_id": "wf-1",
            "vllm_xargs": {"agentic_context": "x"},
            "temperature": 0.0,
        }))
        .send()
        .await
        .expect("chat");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "req-42");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["id"], "chatcmpl-req-42");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], MODEL);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 7);
    assert_eq!(
        body["usage"]["total_tokens"],
        body["usage"]["prompt_tokens"].as_u64().expect("p") + 7
    );
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    // Generated text re-tokenizes to 7 tokens (4 chars each).
    assert_eq!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
            .len(),
        28
    );

    // Completions, non-streaming; default max_tokens 16.
    let body = post_json(
        &c,
        &sim.url(0, "/v1/completions"),
        &json!({"model": MODEL, "prompt": "once upon a time"}),
    )
    .await;
    assert_eq!(body["object"], "text_completion");
    assert!(body["id"].as_str().expect("id").starts_with("cmpl-"));
    assert_eq!(body["usage"]["completion_tokens"], 16);
    assert_eq!(body["usage"]["prompt_tokens"], 5);
    assert!(body["usage"]["prompt_tokens_details"]["cached_tokens"].is_number());
    // Token-id prompts are accepted.
    let body = post_json(
        &c,
        &sim.url(0, "/v1/completions"),
        &json!({"prompt": [1, 2, 3], "max_tokens": 2}),
    )
    .await;
    assert_eq!(body["usage"]["prompt_tokens"], 3);
}

#[tokio::test]
async fn malformed_requests_get_vllm_errors() {
    let sim = Sim::spawn(&["--time-scale", "20", "--max-model-len", "100"]);
    let c = client();
    let url = sim.url(0, "/v1/chat/completions");
    for (body, status) in [
        ("{not json".to_string(), 400),
        (json!({"model": MODEL}).to_string(), 400),
        (json!({"messages": "nope"}).to_string(), 400),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).to_string(),
            400,
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1000}).to_string(),
            400,
        ),
        (
            json!({"model": "other", "messages": [{"role": "user", "content": "x"}]}).to_string(),
            404,
        ),
    ] {
        let r = c
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), status, "{body}");
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["error"]["code"], status, "{v}");
        assert!(v["error"]["message"].is_string());
        assert!(v["error"]["type"].is_string());
    }
    let r = c.get(sim.url(0, "/nope")).send().await.expect("404");
    assert_eq!(r.status(), 404);
    let r = c.get(&url).send().await.expect("405");
    assert_eq!(r.status(), 405);
}

fn replace_created(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("\"created\":") {
        let (head, tail) = rest.split_at(i + "\"created\":".len());
        out.push_str(head);
        out.push_str("CREATED");
        let n = tail
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(tail.len());
        rest = &tail[n..];
    }
    out.push_str(rest);
    out
}

#[tokio::test]
async fn sse_golden_byte_for_byte() {
    let sim = Sim::spawn(&["--time-scale", "20"]);
    let c = client();
    let mut got = String::new();
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "golden"}],
                   "max_tokens": 1, "stream": true, "stream_options": {"include_usage": true}}),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "golden", "max_tokens": 1, "stream": true,
                   "stream_options": {"include_usage": true}}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "golden"}],
                   "max_tokens": 1, "stream": true}),
        ),
    ] {
        let r = c
            .post(sim.url(0, path))
            .header("x-request-id", "golden")
            .json(&body)
            .send()
            .await
            .expect("stream");
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-type"],
            "text/event-stream; charset=utf-8"
        );
        got.push_str(&r.text().await.expect("text"));
    }
    let got = replace_created(&got);
    let golden_path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/sse.txt");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(golden_path, &got).expect("write golden");
    }
    let want = std::fs::read_to_string(golden_path).expect("golden file");
    assert_eq!(got, want);
}

#[tokio::test]
async fn sse_multi_token_stream_is_well_formed() {
    let sim = Sim::spawn(&["--time-scale", "5"]);
    let c = client();
    let req = json!({"model": MODEL, "messages": [{"role": "user", "content": "stream me please, I am a fairly long message of many tokens"}],
                     "max_tokens": 20, "stream": true, "stream_options": {"include_usage": true}});
    let text = c
        .post(sim.url(0, "/v1/chat/completions"))
        .json(&req)
        .send()
        .await
        .expect("stream")
        .text()
        .await
        .expect("text");
    assert!(text.ends_with("data: [DONE]\n\n"));
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    let mut content = String::new();
    let mut saw_finish = false;
    let mut usage = None;
    for (i, e) in events.iter().enumerate() {
        let data = e.strip_prefix("data: ").expect("data: prefix");
        if data == "[DONE]" {
            assert_eq!(i, events.len() - 1);
            continue;
        }
        let v: Value = serde_json::from_str(data).expect("chunk json");
        assert_eq!(v["object"], "chat.completion.chunk");
        let choices = v["choices"].as_array().expect("choices");
        if choices.is_empty() {
            usage = Some(v["usage"].clone());
            continue;
        }
        if i == 0 {
            assert_eq!(choices[0]["delta"]["role"], "assistant");
        }
        if let Some(s) = choices[0]["delta"]["content"].as_str() {
            content.push_str(s);
        }
        if !choices[0]["finish_reason"].is_null() {
            saw_finish = true;
        }
    }
    assert!(saw_finish);
    let usage = usage.expect("usage chunk");
    assert_eq!(usage["completion_tokens"], 20);
    // The same request without streaming yields the same text (deterministic output).
    let mut nreq = req.clone();
    nreq["stream"] = json!(false);
    let v = post_json(&c, &sim.url(0, "/v1/chat/completions"), &nreq).await;
    assert_eq!(v["choices"][0]["message"]["content"], content.as_str());
    // Second time round the prompt's full blocks were cached.
    assert!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached")
            > 0
    );
}

#[tokio::test]
async fn stream_interval_groups_tokens() {
    let sim = Sim::spawn(&["--time-scale", "5", "--stream-interval", "4"]);
    let c = client();
    let text = c
        .post(sim.url(0, "/v1/chat/completions"))
        .json(
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "group"}],
                      "max_tokens": 10, "stream": true}),
        )
        .send()
        .await
        .expect("stream")
        .text()
        .await
        .expect("text");
    let mut content = String::new();
    let mut content_events = 0;
    for e in text
        .split("\n\n")
        .filter(|e| !e.is_empty() && *e != "data: [DONE]")
    {
        let v: Value = serde_json::from_str(e.trim_start_matches("data: ")).expect("json");
        if let Some(s) = v["choices"][0]["delta"]["content"].as_str()
            && !s.is_empty()
        {
            content.push_str(s);
            content_events += 1;
        }
    }
    assert_eq!(content.len(), 40);
    // Token 1 alone (TTFT unchanged), then 2-4, 5-8, 9-10: at most 4 events.
    assert!((1..=4).contains(&content_events), "{content_events}");
}
