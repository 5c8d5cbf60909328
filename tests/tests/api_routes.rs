//! End-to-end suite of the serving routes beyond chat, completions and responses:
//! `/tokenize`, `/detokenize`, `/v1/embeddings`, `/v1/score` and `/score`, `/v1/rerank`,
//! `/rerank` and `/v2/rerank`, `/pooling`, `/classify`, and the multipart audio routes,
//! through a real `agentlb` process to real `vllm-sim` processes serving two different
//! models: every route reaches an instance of the model it names (and only that one),
//! with the answer that instance gives directly; an unknown model is a 404, a JSON array
//! body a 400, a form without its content type a 400, an unknown route a JSON 404.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use testkit::{Lb, Reply, Sim, export_tokenizer, get_json, post};

fn json_of(r: &Reply) -> Result<Value> {
    serde_json::from_str(&r.body).with_context(|| format!("not JSON: {}", r.body))
}

/// The answer without what differs per request (ids, timestamps).
fn payload(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("id");
        o.remove("created");
    }
    v
}

fn served(s: &Sim) -> Result<Value> {
    let v = get_json(&format!("{}/sim/info", s.url()))?;
    Ok(v.get("serving").cloned().unwrap_or(Value::Null))
}

fn form(boundary: &str, model: &str, file: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n"
        )
        .as_bytes(),
    );
    b.extend_from_slice(file);
    b.extend_from_slice(
        format!(
            "\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n--{boundary}--\r\n"
        )
        .as_bytes(),
    );
    b
}

#[test]
fn serving_routes_reach_an_instance_of_their_model() -> Result<()> {
    let tok = export_tokenizer()?;
    let t = tok.to_string_lossy().into_owned();
    let a = Sim::start(&["--model", "model-a", "--tokenizer", &t])?;
    let b = Sim::start(&["--model", "model-b", "--tokenizer", &t])?;
    let lb = Lb::start(&["--backend".into(), a.url(), "--backend".into(), b.url()])?;
    let b_name = b.url().trim_start_matches("http://").to_owned();
    // Both instances must have published their models to agentlb.
    testkit::wait_until(Duration::from_secs(20), || {
        let v = get_json(&lb.url("/v1/models")).ok()?;
        (v["data"].as_array()?.len() == 2).then_some(())
    })
    .context("agentlb never learned both models")?;

    let tokens: Value = {
        let r = post(
            &format!("{}/tokenize", b.url()),
            "application/json",
            br#"{"model":"model-b","prompt":"the quick brown fox"}"#,
        )?;
        json_of(&r)?["tokens"].clone()
    };
    let cases: Vec<(&str, Value)> = vec![
        (
            "/tokenize",
            json!({"model": "model-b", "prompt": "the quick brown fox"}),
        ),
        ("/detokenize", json!({"model": "model-b", "tokens": tokens})),
        (
            "/v1/embeddings",
            json!({"model": "model-b", "input": ["alpha", "beta"]}),
        ),
        (
            "/v1/score",
            json!({"model": "model-b", "text_1": "what is a fox", "text_2": ["a fox is an animal", "paris"]}),
        ),
        (
            "/score",
            json!({"model": "model-b", "text_1": "q", "text_2": "d"}),
        ),
        (
            "/v1/rerank",
            json!({"model": "model-b", "query": "fox", "documents": ["fox", "dog", "cat"], "top_n": 2}),
        ),
        (
            "/rerank",
            json!({"model": "model-b", "query": "fox", "documents": ["fox", "dog"]}),
        ),
        (
            "/v2/rerank",
            json!({"model": "model-b", "query": "fox", "documents": ["fox", "dog"]}),
        ),
        ("/pooling", json!({"model": "model-b", "input": "pool me"})),
        (
            "/classify",
            json!({"model": "model-b", "input": ["good", "bad"]}),
        ),
    ];
    for (path, body) in &cases {
        let bytes = body.to_string().into_bytes();
        let via = post(&lb.url(path), "application/json", &bytes)?;
        ensure!(via.status == 200, "{path}: {} {}", via.status, via.body);
        ensure!(
            via.backend == b_name,
            "{path} went to {}, not model-b's instance",
            via.backend
        );
        let direct = post(&format!("{}{path}", b.url()), "application/json", &bytes)?;
        ensure!(
            payload(json_of(&via)?) == payload(json_of(&direct)?),
            "{path}: through agentlb {} != direct {}",
            via.body,
            direct.body
        );
    }
    // Audio: a multipart form; the model is a form field.
    for path in ["/v1/audio/transcriptions", "/v1/audio/translations"] {
        let body = form("bNd4ry", "model-b", b"RIFF\x00\x01fake-wave-bytes");
        let ct = "multipart/form-data; boundary=bNd4ry";
        let via = post(&lb.url(path), ct, &body)?;
        ensure!(via.status == 200, "{path}: {} {}", via.status, via.body);
        ensure!(via.backend == b_name, "{path} went to {}", via.backend);
        let direct = post(&format!("{}{path}", b.url()), ct, &body)?;
        ensure!(
            json_of(&via)?["text"] == json_of(&direct)?["text"],
            "{path} text differs"
        );
        ensure!(
            via.content_type.starts_with("application/json"),
            "{}",
            via.content_type
        );
        // The same form sent as JSON: refused before any backend.
        let bad = post(&lb.url(path), "application/json", &body)?;
        ensure!(
            bad.status == 400 && json_of(&bad)?["error"]["code"] == "invalid_content_type",
            "{}",
            bad.body
        );
        // A form for a model nobody serves: 404.
        let none = post(&lb.url(path), ct, &form("bNd4ry", "model-z", b"x"))?;
        ensure!(
            none.status == 404,
            "{path} unknown model: {} {}",
            none.status,
            none.body
        );
    }
    // Only model-b's instance served any of it.
    let (sa, sb) = (served(&a)?, served(&b)?);
    ensure!(
        sa.as_object().is_none_or(|o| o.values().all(|v| v == 0)),
        "model-a's instance served {sa}"
    );
    ensure!(
        sb["rerank"].as_u64().unwrap_or(0) >= 6,
        "model-b served {sb}"
    );

    // Errors: unknown model, array body, unknown route.
    let r = post(
        &lb.url("/v1/score"),
        "application/json",
        br#"{"model":"nope","text_1":"a","text_2":"b"}"#,
    )?;
    ensure!(r.status == 404, "unknown model: {} {}", r.status, r.body);
    let r = post(
        &lb.url("/v1/rerank"),
        "application/json",
        br#"["model-b","fox"]"#,
    )?;
    ensure!(
        r.status == 400 && json_of(&r)?["error"]["code"] == "invalid_json",
        "array: {} {}",
        r.status,
        r.body
    );
    let r = post(&lb.url("/v1/nothing-here"), "application/json", b"{}")?;
    ensure!(
        r.status == 404 && json_of(&r)?["error"].is_object(),
        "unknown route: {} {}",
        r.status,
        r.body
    );
    // Metrics name the new routes.
    let m = ureq::get(&lb.admin_url("/metrics")).call()?.into_string()?;
    for route in [
        "tokenize",
        "score",
        "rerank",
        "pooling",
        "audio",
        "embeddings",
    ] {
        ensure!(
            m.lines().any(|l| l.starts_with("agentlb_requests_total{")
                && l.contains(&format!("route=\"{route}\""))
                && !l.ends_with(" 0")),
            "no requests counted for route {route}"
        );
    }
    Ok(())
}
