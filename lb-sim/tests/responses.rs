//! The Responses API (`/v1/responses`) against a real `vllm-sim` process: objects, the
//! per-instance store behind `previous_response_id`, streaming events, store bounds, cancel.

mod common;

use std::time::Duration;

use common::{Sim, client, get_json, post_json, text, wait_up};
use serde_json::{Value, json};

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// `POST /v1/responses`; returns (status, body).
async fn create(c: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let r = c.post(url).json(body).send().await.expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json body"))
}

/// `GET url`; returns (status, body).
async fn get(c: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = c.get(url).send().await.expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json body"))
}

fn not_found_body(id: &str) -> Value {
    json!({"error": {
        "message": format!("Response with id '{id}' not found."),
        "type": "invalid_request_error",
        "param": "response_id",
        "code": 404,
    }})
}

fn output_text(resp: &Value) -> &str {
    resp["output"][0]["content"][0]["text"]
        .as_str()
        .expect("output text")
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[tokio::test]
async fn create_retrieve_follow_up_and_instance_locality() {
    let sim = Sim::spawn(&["--time-scale", "20", "--instances", "2"]);
    let c = client();
    let url0 = sim.url(0, "/v1/responses");
    let system = text(1, 600);

    // First turn: instructions + string input, no max_output_tokens.
    let (s, r1) = create(
        &c,
        &url0,
        &json!({"model": MODEL, "instructions": system, "input": "What is a load balancer?",
                "temperature": 0.3, "metadata": {"k": "v"}}),
    )
    .await;
    assert_eq!(s, 200, "{r1}");
    let id1 = r1["id"].as_str().expect("id");
    assert!(id1.starts_with("resp_") && id1.len() == 5 + 32, "{id1}");
    assert_eq!(r1["object"], "response");
    assert_eq!(r1["model"], MODEL);
    assert_eq!(r1["status"], "completed");
    assert_eq!(r1["incomplete_details"], Value::Null);
    assert_eq!(r1["instructions"], system.as_str());
    assert_eq!(r1["previous_response_id"], Value::Null);
    assert_eq!(r1["temperature"], 0.3);
    assert_eq!(r1["metadata"], json!({"k": "v"}));
    assert_eq!(r1["tools"], json!([]));
    assert_eq!(r1["tool_choice"], "auto");
    assert_eq!(r1["parallel_tool_calls"], true);
    assert_eq!(r1["background"], false);
    assert!(u(&r1["created_at"]) > 1_600_000_000);
    let item = &r1["output"][0];
    assert_eq!(item["type"], "message");
    assert_eq!(item["role"], "assistant");
    assert_eq!(item["status"], "completed");
    assert!(item["id"].as_str().expect("msg id").starts_with("msg_"));
    assert_eq!(item["content"][0]["type"], "output_text");
    assert_eq!(item["content"][0]["annotations"], json!([]));
    let usage = &r1["usage"];
    let (in1, out1) = (u(&usage["input_tokens"]), u(&usage["output_tokens"]));
    assert_eq!(out1, 128, "default max tokens");
    assert_eq!(u(&usage["total_tokens"]), in1 + out1);
    assert_eq!(usage["input_tokens_details"]["cached_tokens"], 0);
    assert_eq!(usage["output_tokens_details"]["reasoning_tokens"], 0);
    assert_eq!(output_text(&r1).len() as u64, out1 * 4);

    // GET returns the stored object.
    let (s, g) = get(&c, &sim.url(0, &format!("/v1/responses/{id1}"))).await;
    assert_eq!(s, 200);
    assert_eq!(g, r1);

    // Follow-up on the same instance: the previous conversation is a cached prefix.
    let (s, r2) = create(
        &c,
        &url0,
        &json!({"model": MODEL, "previous_response_id": id1, "max_output_tokens": 6,
                "input": [{"role": "user", "content": [{"type": "input_text", "text": "Shorter please."}]}]}),
    )
    .await;
    assert_eq!(s, 200, "{r2}");
    assert_eq!(r2["previous_response_id"], id1);
    assert_eq!(r2["status"], "incomplete");
    assert_eq!(
        r2["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    assert_eq!(r2["max_output_tokens"], 6);
    assert_eq!(r2["usage"]["output_tokens"], 6);
    let in2 = u(&r2["usage"]["input_tokens"]);
    let cached2 = u(&r2["usage"]["input_tokens_details"]["cached_tokens"]);
    assert!(in2 > in1 + out1, "history replayed: {in2} vs {in1}+{out1}");
    // At least every full block of the first prompt, and more (the answer's blocks).
    assert!(
        cached2 >= in1 / 16 * 16 && cached2 > in1,
        "{cached2} vs {in1}"
    );
    assert!(
        cached2 < in2 && cached2.is_multiple_of(16),
        "{cached2} of {in2}"
    );
    assert_ne!(r2["id"], r1["id"]);

    // Same follow-up against the instance that did not create the response: 404.
    let (s, e) = create(
        &c,
        &sim.url(1, "/v1/responses"),
        &json!({"model": MODEL, "previous_response_id": id1, "input": "hi"}),
    )
    .await;
    assert_eq!(s, 404);
    assert_eq!(e, not_found_body(id1));
    let (s, e) = get(&c, &sim.url(1, &format!("/v1/responses/{id1}"))).await;
    assert_eq!(s, 404);
    assert_eq!(e, not_found_body(id1));

    // Unknown id on the creating instance too.
    let (s, e) = create(
        &c,
        &url0,
        &json!({"model": MODEL, "previous_response_id": "resp_nope", "input": "hi"}),
    )
    .await;
    assert_eq!(s, 404);
    assert_eq!(e, not_found_body("resp_nope"));

    // Cancelling a synchronous response is refused; unknown ids are 404.
    let (s, e) = create(
        &c,
        &sim.url(0, &format!("/v1/responses/{id1}/cancel")),
        &json!({}),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(
        e["error"]["message"],
        "Cannot cancel a synchronous response."
    );
    assert_eq!(e["error"]["type"], "invalid_request_error");
    let (s, _) = create(
        &c,
        &sim.url(0, "/v1/responses/resp_nope/cancel"),
        &json!({}),
    )
    .await;
    assert_eq!(s, 404);

    // Metrics count responses like any other request.
    let m = c
        .get(sim.url(0, "/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(m.contains(&format!(
        "vllm:prompt_tokens_cached_total{{engine=\"0\",model_name=\"{MODEL}\"}} {cached2}.0"
    )));
}

#[tokio::test]
async fn ids_are_unique_across_instances_and_processes() {
    let a = Sim::spawn(&["--time-scale", "50", "--instances", "2"]);
    let b = Sim::spawn(&["--time-scale", "50"]);
    let c = client();
    let mut ids = std::collections::HashSet::new();
    for (sim, i) in [(&a, 0), (&a, 1), (&b, 0)] {
        for _ in 0..5 {
            let body = json!({"input": "same prompt everywhere", "max_output_tokens": 1});
            let (s, r) = create(&c, &sim.url(i, "/v1/responses"), &body).await;
            assert_eq!(s, 200);
            assert!(ids.insert(r["id"].as_str().expect("id").to_string()));
            assert!(ids.insert(r["output"][0]["id"].as_str().expect("id").to_string()));
        }
    }
    // The body's `request_id` becomes the id, as in vLLM.
    let (_, r) = create(
        &c,
        &a.url(0, "/v1/responses"),
        &json!({"input": "x", "max_output_tokens": 1, "request_id": "resp_mine"}),
    )
    .await;
    assert_eq!(r["id"], "resp_mine");
}

/// Parses an SSE body into `(event name, data)` pairs, checking the framing.
fn sse_events(body: &str) -> Vec<(String, Value)> {
    assert!(body.ends_with("\n\n"), "{body}");
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (ev, data) = e.split_once('\n').expect("two lines");
            let name = ev.strip_prefix("event: ").expect("event: line");
            let data = data.strip_prefix("data: ").expect("data: line");
            let v: Value = serde_json::from_str(data).expect("event json");
            assert_eq!(v["type"], name);
            (name.to_string(), v)
        })
        .collect()
}

#[tokio::test]
async fn streaming_events_in_order_and_stored() {
    let sim = Sim::spawn(&["--time-scale", "10"]);
    let c = client();
    let url = sim.url(0, "/v1/responses");
    let (_, first) = create(
        &c,
        &url,
        &json!({"instructions": text(2, 400), "input": "first turn", "max_output_tokens": 10}),
    )
    .await;
    let r = c
        .post(&url)
        .json(
            &json!({"model": MODEL, "input": "stream the second turn", "stream": true,
                      "max_output_tokens": 12, "previous_response_id": first["id"]}),
        )
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let body = r.text().await.expect("body");
    assert!(!body.contains("[DONE]"));
    let events = sse_events(&body);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let n = names.len();
    assert_eq!(
        names[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ]
    );
    assert_eq!(
        names[n - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    assert!(
        names[4..n - 4]
            .iter()
            .all(|e| *e == "response.output_text.delta")
    );
    assert!(n > 8);
    for (i, (_, v)) in events.iter().enumerate() {
        assert_eq!(v["sequence_number"], i);
    }
    let created = &events[0].1["response"];
    let completed = &events[n - 1].1["response"];
    assert_eq!(created["status"], "in_progress");
    assert_eq!(created["output"], json!([]));
    assert_eq!(created["usage"], Value::Null);
    assert_eq!(created["id"], completed["id"]);
    assert_eq!(events[1].1["response"], *created);
    assert_eq!(completed["status"], "incomplete");
    assert_eq!(completed["previous_response_id"], first["id"]);
    assert_eq!(completed["usage"]["output_tokens"], 12);
    assert!(u(&completed["usage"]["input_tokens_details"]["cached_tokens"]) > 0);
    let item_id = &events[2].1["item"]["id"];
    assert_eq!(events[2].1["item"]["status"], "in_progress");
    assert_eq!(completed["output"][0]["id"], *item_id);
    let deltas: String = events[4..n - 4]
        .iter()
        .map(|(_, v)| {
            assert_eq!(v["item_id"], *item_id);
            v["delta"].as_str().expect("delta")
        })
        .collect();
    assert_eq!(deltas.len(), 12 * 4);
    assert_eq!(events[n - 4].1["text"], deltas.as_str());
    assert_eq!(events[n - 3].1["part"]["text"], deltas.as_str());
    assert_eq!(events[n - 2].1["item"]["status"], "completed");
    assert_eq!(output_text(completed), deltas);

    // Stored once completed.
    let id = completed["id"].as_str().expect("id");
    let (s, g) = get(&c, &sim.url(0, &format!("/v1/responses/{id}"))).await;
    assert_eq!(s, 200);
    assert_eq!(g, *completed);
}

#[tokio::test]
async fn store_false_bound_and_disabled_store() {
    let sim = Sim::spawn(&["--time-scale", "50", "--max-stored-responses", "2"]);
    let c = client();
    let url = sim.url(0, "/v1/responses");
    let get_status = |id: Value| {
        let c = c.clone();
        let url = sim.url(0, &format!("/v1/responses/{}", id.as_str().expect("id")));
        async move { c.get(url).send().await.expect("get").status().as_u16() }
    };

    let (_, r) = create(
        &c,
        &url,
        &json!({"input": "ephemeral", "store": false, "max_output_tokens": 2}),
    )
    .await;
    assert_eq!(r["status"], "incomplete");
    assert_eq!(get_status(r["id"].clone()).await, 404);
    // Nor can it be continued.
    let (s, _) = create(
        &c,
        &url,
        &json!({"input": "more", "previous_response_id": r["id"]}),
    )
    .await;
    assert_eq!(s, 404);

    // Bound 2: the third response evicts the first.
    let mut ids = Vec::new();
    for i in 0..3 {
        let (_, r) = create(
            &c,
            &url,
            &json!({"input": format!("turn {i}"), "max_output_tokens": 2}),
        )
        .await;
        ids.push(r["id"].clone());
    }
    assert_eq!(get_status(ids[0].clone()).await, 404);
    assert_eq!(get_status(ids[1].clone()).await, 200);
    assert_eq!(get_status(ids[2].clone()).await, 200);

    // --max-stored-responses 0: no store (vLLM's default), so no background mode either.
    let off = Sim::spawn(&["--time-scale", "50", "--max-stored-responses", "0"]);
    let (s, r) = create(
        &c,
        &off.url(0, "/v1/responses"),
        &json!({"input": "x", "max_output_tokens": 1}),
    )
    .await;
    assert_eq!(s, 200);
    let id = r["id"].as_str().expect("id");
    let (s, _) = get(&c, &off.url(0, &format!("/v1/responses/{id}"))).await;
    assert_eq!(s, 404);
    let (s, e) = create(
        &c,
        &off.url(0, "/v1/responses"),
        &json!({"input": "x", "background": true}),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(e["error"]["param"], "background");
}

#[tokio::test]
async fn background_queued_completes_or_cancels() {
    let sim = Sim::spawn(&["--time-scale", "1"]);
    let c = client();
    let url = sim.url(0, "/v1/responses");

    // A long background request: queued, then cancelled (the engine request is aborted).
    let (s, r) = create(
        &c,
        &url,
        &json!({"input": "long job", "background": true, "max_output_tokens": 5000}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(r["status"], "queued");
    assert_eq!(r["background"], true);
    let id = r["id"].as_str().expect("id").to_string();
    let (_, g) = get(&c, &sim.url(0, &format!("/v1/responses/{id}"))).await;
    assert_eq!(g["status"], "queued");
    let cancel_url = sim.url(0, &format!("/v1/responses/{id}/cancel"));
    let (s, x) = create(&c, &cancel_url, &json!({})).await;
    assert_eq!(s, 200);
    assert_eq!(x["status"], "cancelled");
    let (s, _) = create(&c, &cancel_url, &json!({})).await;
    assert_eq!(s, 400);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, g) = get(&c, &sim.url(0, &format!("/v1/responses/{id}"))).await;
    assert_eq!(g["status"], "cancelled");
    assert_eq!(
        get_json(&c, &sim.url(0, "/load")).await,
        json!({"server_load": 0})
    );

    // A short one completes and is stored with its output.
    let (_, r) = create(
        &c,
        &url,
        &json!({"input": "short job", "background": true, "max_output_tokens": 3}),
    )
    .await;
    let get_url = sim.url(
        0,
        &format!("/v1/responses/{}", r["id"].as_str().expect("id")),
    );
    let mut done = Value::Null;
    for _ in 0..200 {
        done = get_json(&c, &get_url).await;
        if done["status"] != "queued" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(done["status"], "incomplete");
    assert_eq!(done["usage"]["output_tokens"], 3);
    assert_eq!(output_text(&done).len(), 12);

    // Background with store=false is a validation error.
    let (s, _) = create(
        &c,
        &url,
        &json!({"input": "x", "background": true, "store": false}),
    )
    .await;
    assert_eq!(s, 400);
}

#[tokio::test]
async fn bad_requests_and_methods() {
    let sim = Sim::spawn(&["--time-scale", "50", "--max-model-len", "64"]);
    let c = client();
    let url = sim.url(0, "/v1/responses");
    for (body, status, param) in [
        (json!({"model": MODEL}), 400, Value::Null),
        (json!({"input": 5}), 400, json!("input")),
        (
            json!({"input": [{"content": "no role"}]}),
            400,
            json!("input"),
        ),
        (json!({"input": [7]}), 400, json!("input")),
        (
            json!({"input": "x", "max_output_tokens": 0}),
            400,
            Value::Null,
        ),
        (
            json!({"input": "x", "instructions": ["a"]}),
            400,
            Value::Null,
        ),
        (
            json!({"input": "x", "prompt": {"id": "p"}}),
            400,
            json!("prompt"),
        ),
        (json!({"input": text(3, 400)}), 400, json!("input")),
        (json!({"model": "other", "input": "x"}), 404, json!("model")),
    ] {
        let (s, e) = create(&c, &url, &body).await;
        assert_eq!(s, status, "{body} -> {e}");
        assert_eq!(e["error"]["code"], status, "{e}");
        assert_eq!(e["error"]["param"], param, "{body} -> {e}");
    }
    let r = c.post(&url).body("{not json").send().await.expect("send");
    assert_eq!(r.status(), 400);
    // Methods: no DELETE in vLLM; GET on the collection is not a route.
    let r = c
        .delete(sim.url(0, "/v1/responses/resp_x"))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 405);
    let r = c.get(&url).send().await.expect("get");
    assert_eq!(r.status(), 405);
    let r = c
        .get(sim.url(0, "/v1/responses/resp_x/cancel"))
        .send()
        .await
        .expect("get cancel");
    assert_eq!(r.status(), 405);
    let r = c
        .get(sim.url(0, "/v1/responses/a/b"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404);
    // max_output_tokens beyond the context is clamped, as vLLM does.
    let (s, r) = create(&c, &url, &json!({"input": "x", "max_output_tokens": 1000})).await;
    assert_eq!(s, 200, "{r}");
    let room = 64 - u(&r["usage"]["input_tokens"]);
    assert_eq!(r["max_output_tokens"], room);
    assert_eq!(r["usage"]["output_tokens"], room);
}

#[tokio::test]
async fn instance_death_forgets_responses() {
    let sim = Sim::spawn(&["--time-scale", "50", "--admin-port", "0"]);
    let c = client();
    let (_, r) = create(
        &c,
        &sim.url(0, "/v1/responses"),
        &json!({"input": "remember me", "max_output_tokens": 2}),
    )
    .await;
    let get_url = sim.url(
        0,
        &format!("/v1/responses/{}", r["id"].as_str().expect("id")),
    );
    assert_eq!(get(&c, &get_url).await.0, 200);
    for mode in ["die", "none"] {
        let r = post_json(
            &c,
            &sim.admin("/instances/0/fault"),
            &json!({ "mode": mode }),
        )
        .await;
        assert_eq!(r["ok"], true);
    }
    assert_eq!(
        wait_up(&sim.url(0, "/health")).await,
        Some(reqwest::StatusCode::OK)
    );
    assert_eq!(get(&client(), &get_url).await.0, 404);
}
