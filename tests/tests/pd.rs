//! End-to-end suite of the `disaggregated` policy: real `vllm-sim` processes in the
//! prefill (`--kv-role producer`), decode (`--kv-role consumer`) and unified roles,
//! speaking vLLM's NixlConnector protocol (`kv_transfer_params`, the decode side pulling
//! the prefilled KV from the prefill side), behind a real `agentlb` process.
//!
//! - a request is prefilled on a prefill instance and answered by a decode instance, for
//!   chat and completions, streamed and not; the answer is the one the client asked for
//!   (same text as a unified instance gives for the same request, the client's
//!   `max_tokens`), the decode instance pulled the KV instead of prefilling;
//! - a conversation's next turn is prefilled where its prefix is cached (KV events);
//! - prefill instances down: the request is served whole by the unified instance;
//!   decode instances failing: the same; nothing is lost.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, ensure};
use testkit::{Lb, Reply, Sim, export_tokenizer, get_json, post_json, temp_file, text, wait_until};

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

fn sim(tok: &str, role: &str) -> Result<Sim> {
    Sim::start(&[
        "--time-scale",
        "50",
        "--model",
        MODEL,
        "--kv-events",
        "--kv-events-base-port",
        "0",
        "--tokenizer",
        tok,
        "--kv-role",
        role,
    ])
}

fn pd_info(s: &Sim) -> Result<serde_json::Value> {
    let v = get_json(&format!("{}/sim/info", s.url()))?;
    v.get("pd").cloned().context("no pd in /sim/info")
}

fn counter(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// A `pd` counter of each of `sims`.
fn counts(sims: &[Sim], k: &str) -> Result<Vec<u64>> {
    sims.iter().map(|s| Ok(counter(&pd_info(s)?, k))).collect()
}

/// Sum of a `pd` counter over `sims`.
fn total(sims: &[Sim], k: &str) -> Result<u64> {
    Ok(counts(sims, k)?.into_iter().sum())
}

/// Text of a chat or completion answer, streamed (SSE) or not.
fn content(a: &Reply) -> Result<String> {
    let pick = |v: &serde_json::Value| {
        let c = &v["choices"][0];
        c["message"]["content"]
            .as_str()
            .or(c["delta"]["content"].as_str())
            .or(c["text"].as_str())
            .unwrap_or("")
            .to_owned()
    };
    if a.body.starts_with("data:") {
        ensure!(
            a.body.contains("data: [DONE]"),
            "stream not ended: {}",
            a.body
        );
        let mut out = String::new();
        for line in a.body.lines() {
            if let Some(d) = line.strip_prefix("data: ")
                && d != "[DONE]"
            {
                out.push_str(&pick(&serde_json::from_str(d)?));
            }
        }
        Ok(out)
    } else {
        Ok(pick(&serde_json::from_str(&a.body)?))
    }
}

fn chat(system: &str, user: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": MODEL,
        "max_tokens": 12,
        "stream": stream,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
        ],
    })
}

struct Cluster {
    _tok: PathBuf,
    prefill: Vec<Sim>,
    decode: Vec<Sim>,
    unified: Sim,
    lb: Lb,
}

impl Cluster {
    fn start() -> Result<Self> {
        let tok = export_tokenizer()?;
        let t = tok.to_string_lossy().into_owned();
        let prefill = vec![sim(&t, "producer")?, sim(&t, "producer")?];
        let decode = vec![sim(&t, "consumer")?, sim(&t, "consumer")?];
        let unified = sim(&t, "both")?;
        let conf = temp_file(
            "pd.toml",
            &format!(
                "[kv]\ndiscover_interval_ms = 300\ntokenizer = {:?}\n[health]\ninterval_ms = 200\n",
                t
            ),
        )?;
        let mut args: Vec<String> = vec![
            "--config".into(),
            conf.to_string_lossy().into_owned(),
            "--policy".into(),
            "disaggregated".into(),
            "--backend".into(),
            unified.url(),
        ];
        for s in &prefill {
            args.extend(["--prefill".to_owned(), s.url()]);
        }
        for s in &decode {
            args.extend(["--decode".to_owned(), s.url()]);
        }
        let lb = Lb::start(&args)?;
        // Every instance's KV events indexed before the first request.
        wait_until(Duration::from_secs(20), || {
            let v = get_json(&lb.admin_url("/admin/kv")).ok()?;
            let fresh = v["sources"]
                .as_array()?
                .iter()
                .filter(|s| s["freshness"] == "fresh")
                .count();
            (fresh == 5).then_some(())
        })
        .context("KV event sources never all fresh")?;
        Ok(Self {
            _tok: tok,
            prefill,
            decode,
            unified,
            lb,
        })
    }

    fn name_of(s: &Sim) -> String {
        s.url().trim_start_matches("http://").to_owned()
    }

    fn is_decode(&self, name: &str) -> bool {
        self.decode.iter().any(|s| Self::name_of(s) == name)
    }

    fn pd_metric(&self, kind: &str) -> Result<f64> {
        let m = ureq::get(&self.lb.admin_url("/metrics"))
            .call()?
            .into_string()?;
        Ok(m.lines()
            .filter(|l| {
                l.starts_with("agentlb_pd_requests_total{")
                    && l.contains(&format!("kind=\"{kind}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

#[test]
fn requests_are_prefilled_on_prefill_instances_and_answered_by_decode_instances() -> Result<()> {
    let c = Cluster::start()?;
    let system = format!("You are a planner. {}", text(1, 400));
    let mut prefill_legs = 0;
    for (i, stream) in [false, true].into_iter().enumerate() {
        let body = chat(&system, &text(10 + i as u64, 40), stream);
        let a = post_json(&c.lb.url("/v1/chat/completions"), &body)?;
        ensure!(a.status == 200, "status {}: {}", a.status, a.body);
        ensure!(
            c.is_decode(&a.backend),
            "answered by {} ({})",
            a.backend,
            a.route
        );
        ensure!(
            a.route.contains("policy=disaggregated") && a.route.contains("prefill="),
            "{}",
            a.route
        );
        // The answer the client asked for: the same text a unified instance gives for the
        // same request (12 tokens, not the prefill leg's one).
        let direct = post_json(&format!("{}/v1/chat/completions", c.unified.url()), &body)?;
        ensure!(direct.status == 200, "direct: {}", direct.body);
        let (got, want) = (content(&a)?, content(&direct)?);
        ensure!(
            !got.is_empty() && got == want,
            "decode answer {got:?} != unified answer {want:?}"
        );
        prefill_legs += 1;
        ensure!(
            total(&c.prefill, "prefill_legs")? == prefill_legs,
            "prefill legs"
        );
        ensure!(
            total(&c.decode, "decode_legs")? == prefill_legs,
            "decode legs"
        );
    }
    ensure!(
        total(&c.decode, "transfer_failures")? == 0,
        "a KV pull failed"
    );
    ensure!(
        total(&c.decode, "transferred_tokens")? > 800,
        "little KV pulled"
    );
    ensure!(
        total(&c.decode, "plain_requests")? == 0,
        "a decode instance prefilled a whole request"
    );
    ensure!(
        total(&c.prefill, "plain_requests")? == 0,
        "a prefill instance served a whole request"
    );

    // Completions, streamed.
    let body = serde_json::json!({"model": MODEL, "prompt": text(3, 300), "max_tokens": 7, "stream": true});
    let a = post_json(&c.lb.url("/v1/completions"), &body)?;
    ensure!(
        a.status == 200 && c.is_decode(&a.backend),
        "{} {}",
        a.status,
        a.body
    );
    let direct = post_json(&format!("{}/v1/completions", c.unified.url()), &body)?;
    ensure!(content(&a)? == content(&direct)?, "completion text differs");

    // The next turns of one conversation (a long shared prefix) are prefilled where that
    // prefix is cached: every one on the same prefill instance.
    let before = counts(&c.prefill, "prefill_legs")?;
    let convo = format!("You are agent 7. {}", text(7, 600));
    for turn in 0..4 {
        let a = post_json(
            &c.lb.url("/v1/chat/completions"),
            &chat(&convo, &text(70 + turn, 20), false),
        )?;
        ensure!(a.status == 200, "{}", a.body);
        std::thread::sleep(Duration::from_millis(150)); // events reach agentlb
    }
    let after = counts(&c.prefill, "prefill_legs")?;
    let grew: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    ensure!(
        grew.contains(&4),
        "the conversation's prefills spread: {grew:?}"
    );
    ensure!(c.pd_metric("disaggregated")? >= 7.0, "pd metric");
    Ok(())
}

#[test]
fn failed_legs_fall_back_to_the_unified_instance() -> Result<()> {
    let c = Cluster::start()?;
    let unified = Cluster::name_of(&c.unified);
    let system = format!("You are a tester. {}", text(2, 300));
    // Prefill instances answer 503: served whole by the unified instance.
    for s in &c.prefill {
        s.fault("503")?;
    }
    for i in 0..3 {
        let a = post_json(
            &c.lb.url("/v1/chat/completions"),
            &chat(&system, &text(20 + i, 30), i % 2 == 1),
        )?;
        ensure!(a.status == 200, "status {}: {}", a.status, a.body);
        ensure!(
            a.backend == unified,
            "served by {} ({})",
            a.backend,
            a.route
        );
        ensure!(!content(&a)?.is_empty(), "empty answer");
    }
    ensure!(
        c.pd_metric("prefill_failed")? + c.pd_metric("no_prefill")? >= 3.0,
        "fallbacks not counted"
    );
    for s in &c.prefill {
        s.fault("none")?;
    }
    // Prefill instances back (health checks close their circuits): split again.
    wait_until(Duration::from_secs(20), || {
        let a = post_json(
            &c.lb.url("/v1/chat/completions"),
            &chat(&system, "again", false),
        )
        .ok()?;
        (a.status == 200 && c.is_decode(&a.backend)).then_some(())
    })
    .context("never disaggregated again after the prefill instances came back")?;

    // Decode instances answer 503: the request is served whole by the unified instance.
    for s in &c.decode {
        s.fault("503")?;
    }
    let plain_before = counter(&pd_info(&c.unified)?, "plain_requests");
    let a = post_json(
        &c.lb.url("/v1/chat/completions"),
        &chat(&system, &text(30, 30), true),
    )?;
    ensure!(a.status == 200, "status {}: {}", a.status, a.body);
    ensure!(
        a.backend == unified,
        "served by {} ({})",
        a.backend,
        a.route
    );
    ensure!(content(&a)?.len() > 1, "answer too short");
    ensure!(
        counter(&pd_info(&c.unified)?, "plain_requests") == plain_before + 1,
        "the unified instance did not serve it whole"
    );
    ensure!(
        c.pd_metric("decode_failed")? >= 1.0,
        "decode fallback not counted"
    );
    Ok(())
}
