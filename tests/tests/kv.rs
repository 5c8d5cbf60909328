//! End-to-end suite of precise KV-aware routing: real `vllm-sim` processes publishing
//! KV events over ZMQ (vLLM's wire format) and tokenizing with an HF-format
//! `tokenizer.json`; real `agentlb` processes that discover the publishers, index the
//! events, and tokenize requests in-process with the same `tokenizer.json`.
//!
//! - `kv`: a conversation sent straight to one instance *before* agentlb starts (its
//!   subscriber catches up from the replay endpoint) is continued through agentlb on
//!   that instance, with `cached=` exactly what the instance then reports;
//! - `workflow` with events: replicas that never saw a workflow place it where the
//!   events show its context (`reason=cached`), not on their own first choice; a
//!   replica without a tokenizer places it on its first choice (the check can fail);
//! - a publisher restart (instance killed and revived) drops that instance's view.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result, ensure};
use testkit::{Lb, Sim, export_tokenizer, get_json, temp_file, text, wait_until};

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

fn sim(tok: &Path, extra: &[&str]) -> Result<Sim> {
    let tok = tok.to_string_lossy().into_owned();
    let mut args = vec![
        "--time-scale",
        "50",
        "--model",
        MODEL,
        "--kv-events",
        "--kv-events-base-port",
        "0",
        "--tokenizer",
        &tok,
    ];
    args.extend_from_slice(extra);
    Sim::start(&args)
}

fn sims(n: usize, tok: &Path) -> Result<Vec<Sim>> {
    (0..n).map(|_| sim(tok, &[])).collect()
}

/// agentlb over `sims` with `[kv]` discovery (fast) and, if given, the tokenizer.
fn lb(sims: &[Sim], policy: &str, tok: Option<&Path>) -> Result<Lb> {
    let mut toml = String::from("[kv]\ndiscover_interval_ms = 300\nstale_after_ms = 5000\n");
    if let Some(t) = tok {
        toml.push_str(&format!("tokenizer = {:?}\n", t.to_string_lossy()));
    }
    let conf = temp_file("kv.toml", &toml)?;
    let mut args: Vec<String> = vec![
        "--config".into(),
        conf.to_string_lossy().into_owned(),
        "--policy".into(),
        policy.into(),
    ];
    for s in sims {
        args.extend(["--backend".to_owned(), s.url()]);
    }
    Lb::start(&args)
}

/// Waits until agentlb indexes events from every instance, in `mode`.
fn wait_sources(lb: &Lb, n: usize, mode: &str) -> Result<serde_json::Value> {
    wait_until(Duration::from_secs(20), || {
        let v = get_json(&lb.admin_url("/admin/kv")).ok()?;
        let fresh = v["sources"]
            .as_array()?
            .iter()
            .filter(|s| s["freshness"] == "fresh")
            .count();
        (v["mode"] == mode && fresh == n).then_some(v)
    })
    .with_context(|| {
        format!(
            "agentlb never saw {n} fresh sources in mode {mode}: {:?}",
            get_json(&lb.admin_url("/admin/kv")).ok()
        )
    })
}

fn conversation(seed: u64, turns: &[(&str, String)]) -> serde_json::Value {
    let mut messages = vec![
        serde_json::json!({"role": "system", "content": format!("You are agent {seed}. {}", text(seed, 300))}),
    ];
    for (role, content) in turns {
        messages.push(serde_json::json!({"role": role, "content": content}));
    }
    serde_json::json!({"model": MODEL, "max_tokens": 8, "messages": messages})
}

struct Answer {
    backend: Option<String>,
    route: String,
    cached: u64,
    prompt: u64,
    content: String,
}

fn chat(url: &str, body: &serde_json::Value, headers: &[(&str, &str)]) -> Result<Answer> {
    let mut req = ureq::post(url)
        .timeout(Duration::from_secs(30))
        .set("content-type", "application/json");
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let r = req.send_string(&body.to_string())?;
    let backend = r.header("x-agentlb-backend").map(str::to_owned);
    let route = r.header("x-agentlb-route").unwrap_or("").to_owned();
    let v: serde_json::Value = serde_json::from_str(&r.into_string()?)?;
    Ok(Answer {
        backend,
        route,
        cached: v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
        prompt: v["usage"]["prompt_tokens"].as_u64().context("no usage")?,
        content: v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
            .to_owned(),
    })
}

/// Backend name (as in `x-agentlb-backend`) → index of its sim.
fn index_of(lb: &Lb, sims: &[Sim], name: &str) -> Result<usize> {
    let v = get_json(&lb.admin_url("/admin/backends"))?;
    let url = v["backends"]
        .as_array()
        .context("backends")?
        .iter()
        .find(|b| b["name"] == name)
        .and_then(|b| b["url"].as_str())
        .context("backend by name")?
        .trim_end_matches('/')
        .to_owned();
    sims.iter()
        .position(|s| s.url() == url)
        .with_context(|| format!("no sim at {url}"))
}

fn cached_of(route: &str) -> Option<u64> {
    route
        .split(';')
        .find_map(|p| p.trim().strip_prefix("cached="))
        .and_then(|n| n.parse().ok())
}

#[test]
fn kv_policy_follows_the_events_from_before_agentlb_started() -> Result<()> {
    let tok = export_tokenizer()?;
    let s = sims(4, &tok)?;
    // A conversation served by instance 2 before any agentlb exists.
    let first = conversation(1, &[("user", text(11, 600))]);
    let a = chat(&format!("{}/v1/chat/completions", s[2].url()), &first, &[])?;
    ensure!(a.prompt > 600, "prompt of {} tokens", a.prompt);
    let lb = lb(&s, "kv", Some(&tok))?;
    let kv = wait_sources(&lb, 4, "precise")?;
    ensure!(
        kv["index"]["blocks"].as_u64().unwrap_or(0) > 0,
        "the late subscriber replayed nothing: {kv}"
    );
    // Its next turn through agentlb: instance 2, predicted = reported cached tokens.
    let next = conversation(
        1,
        &[
            ("user", text(11, 600)),
            ("assistant", a.content.clone()),
            ("user", text(12, 50)),
        ],
    );
    let b = chat(&lb.url("/v1/chat/completions"), &next, &[])?;
    let name = b.backend.clone().context("x-agentlb-backend")?;
    ensure!(
        index_of(&lb, &s, &name)? == 2,
        "went to {name}, route {:?}",
        b.route
    );
    ensure!(
        b.route.contains("policy=kv") && b.route.contains("reason=prefix"),
        "{}",
        b.route
    );
    let predicted = cached_of(&b.route).context("cached= in the route header")?;
    ensure!(
        b.cached > 0 && predicted.abs_diff(b.cached) <= 16,
        "predicted {predicted} cached tokens, the instance reported {} of {}",
        b.cached,
        b.prompt
    );
    // New conversations hold nothing anywhere: spread by load, not piled on instance 2.
    let mut used = std::collections::BTreeSet::new();
    for i in 0..8 {
        let c = chat(
            &lb.url("/v1/chat/completions"),
            &conversation(100 + i, &[("user", text(200 + i, 100))]),
            &[],
        )?;
        used.insert(c.backend.unwrap_or_default());
    }
    ensure!(used.len() >= 2, "8 new conversations all went to {used:?}");
    let m = ureq::get(&lb.admin_url("/metrics")).call()?.into_string()?;
    ensure!(
        m.lines().any(|l| l.starts_with("agentlb_kv_events_total{")
            && l.contains("kind=\"replayed\"")
            && !l.ends_with(" 0")),
        "no replayed batches counted"
    );
    Ok(())
}

#[test]
fn replicas_that_never_saw_a_workflow_agree_through_kv_events() -> Result<()> {
    let tok = export_tokenizer()?;
    let s = sims(4, &tok)?;
    let probe = lb(&s, "workflow", Some(&tok))?;
    wait_sources(&probe, 4, "precise")?;
    let wf = "wf-kv-agree";
    let hdr = [("x-workflow-id", wf)];
    // Where would a gateway place the workflow on its own?
    let p = chat(
        &probe.url("/v1/chat/completions"),
        &conversation(2, &[("user", "hello".into())]),
        &hdr,
    )?;
    ensure!(p.route.contains("reason=placed"), "{}", p.route);
    let own = index_of(&probe, &s, &p.backend.context("backend")?)?;
    // Its context is built elsewhere (another gateway, or the client, put it there).
    let there = (own + 1) % 4;
    let ctx = conversation(2, &[("user", text(21, 600))]);
    let a = chat(
        &format!("{}/v1/chat/completions", s[there].url()),
        &ctx,
        &hdr,
    )?;
    let next = conversation(
        2,
        &[
            ("user", text(21, 600)),
            ("assistant", a.content),
            ("user", text(22, 40)),
        ],
    );
    // Two fresh replicas with events: both go where the context is.
    for _ in 0..2 {
        let r = lb(&s, "workflow", Some(&tok))?;
        wait_sources(&r, 4, "precise")?;
        let c = chat(&r.url("/v1/chat/completions"), &next, &hdr)?;
        let at = index_of(&r, &s, &c.backend.clone().context("backend")?)?;
        ensure!(
            at == there && c.route.contains("reason=cached"),
            "a replica placed the workflow on {at} ({}), its context is on {there}",
            c.route
        );
        ensure!(c.cached > 0, "no cache hit: {} of {}", c.cached, c.prompt);
        // Its later calls stay there.
        let c2 = chat(&r.url("/v1/chat/completions"), &next, &hdr)?;
        ensure!(
            c2.route.contains("reason=home") && c2.backend == c.backend,
            "{}",
            c2.route
        );
    }
    // Without a tokenizer the events cannot be matched: its own first choice.
    let blind = lb(&s, "workflow", None)?;
    wait_sources(&blind, 4, "events_only")?;
    let c = chat(&blind.url("/v1/chat/completions"), &next, &hdr)?;
    let at = index_of(&blind, &s, &c.backend.context("backend")?)?;
    ensure!(
        at == own && c.route.contains("reason=placed"),
        "without a tokenizer: {at} ({}), expected its own choice {own}",
        c.route
    );
    Ok(())
}

#[test]
fn a_restarted_instance_loses_its_indexed_blocks() -> Result<()> {
    let tok = export_tokenizer()?;
    let admin = testkit::free_port();
    let s = vec![
        sim(&tok, &["--admin-port", &admin.to_string()])?,
        sim(&tok, &[])?,
    ];
    let lb = lb(&s, "kv", Some(&tok))?;
    wait_sources(&lb, 2, "precise")?;
    let c = chat(
        &format!("{}/v1/chat/completions", s[0].url()),
        &conversation(3, &[("user", text(31, 400))]),
        &[],
    )?;
    ensure!(c.prompt > 400);
    let blocks_of = |lb: &Lb, i: usize| -> Option<(u64, u64)> {
        let v = get_json(&lb.admin_url("/admin/kv")).ok()?;
        let src = v["sources"].as_array()?.get(i)?.clone();
        Some((src["blocks"].as_u64()?, src["restarts"].as_u64()?))
    };
    wait_until(Duration::from_secs(10), || {
        blocks_of(&lb, 0).filter(|(b, _)| *b > 0)
    })
    .context("instance 0's blocks never indexed")?;
    // Killed (agentlb sees it unhealthy) and revived: a new engine with an empty cache
    // and a new publisher incarnation.
    s[0].fault("die")?;
    wait_until(Duration::from_secs(20), || {
        let v = get_json(&lb.admin_url("/admin/backends")).ok()?;
        (v["backends"][0]["healthy"] == false).then_some(())
    })
    .context("the dead instance never seen unhealthy")?;
    ureq::post(&format!("http://127.0.0.1:{admin}/instances/0/fault"))
        .send_string(r#"{"mode":"none"}"#)
        .context("reviving instance 0")?;
    wait_until(Duration::from_secs(20), || {
        blocks_of(&lb, 0).filter(|(b, r)| *b == 0 && *r >= 1)
    })
    .with_context(|| {
        format!(
            "view kept after the restart: {:?}",
            get_json(&lb.admin_url("/admin/kv")).ok()
        )
    })?;
    Ok(())
}

fn sim_info(s: &Sim) -> Result<serde_json::Value> {
    get_json(&format!("{}/sim/info", s.url()))
}

#[test]
fn the_index_matches_each_instance_cache_through_eviction_and_a_dropped_socket() -> Result<()> {
    let tok = export_tokenizer()?;
    // Small KV pools: the workload evicts.
    let s = vec![
        sim(&tok, &["--num-gpu-blocks", "400"])?,
        sim(&tok, &["--num-gpu-blocks", "400"])?,
    ];
    let lb = lb(&s, "kv", Some(&tok))?;
    wait_sources(&lb, 2, "precise")?;
    let send = |url: &str, seed: u64, words: usize| -> Result<()> {
        let first = conversation(seed, &[("user", text(seed * 7, words))]);
        let a = chat(url, &first, &[])?;
        let next = conversation(
            seed,
            &[
                ("user", text(seed * 7, words)),
                ("assistant", a.content),
                ("user", text(seed * 7 + 1, 30)),
            ],
        );
        chat(url, &next, &[])?;
        Ok(())
    };
    for i in 0..12 {
        send(
            &lb.url("/v1/chat/completions"),
            40 + i,
            150 + 40 * i as usize,
        )?;
    }
    // The subscription sockets dropped for 1.5 s while both instances keep serving.
    let replayed_before: u64 = get_json(&lb.admin_url("/admin/kv"))?["sources"]
        .as_array()
        .context("sources")?
        .iter()
        .map(|x| x["replayed"].as_u64().unwrap_or(0))
        .sum();
    ureq::post(&lb.admin_url("/admin/kv/resubscribe?pause_ms=1500")).call()?;
    std::thread::sleep(Duration::from_millis(600));
    for (i, sm) in s.iter().enumerate() {
        send(
            &format!("{}/v1/chat/completions", sm.url()),
            90 + i as u64,
            400,
        )?;
    }
    for i in 0..6 {
        send(&lb.url("/v1/chat/completions"), 100 + i, 200)?;
    }
    // Quiet: every instance's cache, as it reports it, is what agentlb holds for it.
    let views = wait_until(Duration::from_secs(20), || {
        let kv = get_json(&lb.admin_url("/admin/kv")).ok()?;
        let src = kv["sources"].as_array()?.clone();
        let infos: Vec<serde_json::Value> = s.iter().filter_map(|x| sim_info(x).ok()).collect();
        let same = src.len() == s.len()
            && src.iter().zip(&infos).all(|(a, b)| {
                a["blocks"] == b["cached_blocks"] && a["digest"] == b["cached_digest"]
            });
        same.then_some((kv, infos))
    });
    let (kv, infos) = views.with_context(|| {
        format!(
            "agentlb's view never matched the instances' caches: agentlb {:?}, instances {:?}",
            get_json(&lb.admin_url("/admin/kv")).ok(),
            s.iter().map(|x| sim_info(x).ok()).collect::<Vec<_>>()
        )
    })?;
    let evictions: u64 = infos
        .iter()
        .map(|i| i["evictions"].as_u64().unwrap_or(0))
        .sum();
    ensure!(evictions > 0, "no eviction happened: the check is too easy");
    let replayed: u64 = kv["sources"]
        .as_array()
        .context("sources")?
        .iter()
        .map(|x| x["replayed"].as_u64().unwrap_or(0))
        .sum();
    ensure!(
        replayed > replayed_before,
        "nothing was replayed after the sockets dropped: {kv}"
    );
    // Tokenized in-process: the instances never saw a /tokenize.
    for i in &infos {
        ensure!(i["tokenize_requests"] == 0, "/tokenize was called: {i}");
    }
    Ok(())
}

#[test]
fn without_a_tokenizer_a_workflows_blocks_are_learned_and_an_eviction_is_seen() -> Result<()> {
    let tok = export_tokenizer()?;
    let s = sims(2, &tok)?;
    // No tokenizer: agentlb cannot key requests itself; it learns from `/tokenize`.
    let lb = lb(&s, "kv", None)?;
    wait_sources(&lb, 2, "events_only")?;
    let hdr = [("x-workflow-id", "wf-learn")];
    let tokenized = |s: &[Sim]| -> Result<u64> {
        s.iter()
            .map(|x| Ok(sim_info(x)?["tokenize_requests"].as_u64().unwrap_or(0)))
            .sum()
    };
    let first = conversation(5, &[("user", text(51, 500))]);
    let a = chat(&lb.url("/v1/chat/completions"), &first, &hdr)?;
    let home = index_of(&lb, &s, &a.backend.clone().context("backend")?)?;
    // Learned after the answer, from the instance that gave it: one /tokenize there.
    wait_until(Duration::from_secs(10), || {
        let v = get_json(&lb.admin_url("/admin/kv")).ok()?;
        (v["learned"]["learned"].as_u64()? == 1).then_some(())
    })
    .context("the first prompt was never learned")?;
    ensure!(
        sim_info(&s[home])?["tokenize_requests"] == 1 && tokenized(&s)? == 1,
        "expected one /tokenize on the instance that answered"
    );
    // The next turn: its earlier prompt is all held there (the events say so).
    let turns = |answer: &str, seed: u64| {
        conversation(
            5,
            &[
                ("user", text(51, 500)),
                ("assistant", answer.to_owned()),
                ("user", text(seed, 30)),
            ],
        )
    };
    let b = chat(
        &lb.url("/v1/chat/completions"),
        &turns(&a.content, 52),
        &hdr,
    )?;
    ensure!(
        index_of(&lb, &s, &b.backend.clone().context("backend")?)? == home,
        "left the instance holding its context: {}",
        b.route
    );
    let predicted = cached_of(&b.route).context("cached=")?;
    ensure!(
        predicted >= a.prompt / 2 && b.cached >= a.prompt / 2,
        "predicted {predicted}, reported {} (first prompt {} tokens)",
        b.cached,
        a.prompt
    );
    // The instance drops its cache (AllBlocksCleared): no longer credited with it,
    // although agentlb's own approximate index still remembers routing it there.
    ureq::post(&format!("{}/sim/reset_prefix_cache", s[home].url())).call()?;
    wait_until(Duration::from_secs(10), || {
        let v = get_json(&lb.admin_url("/admin/kv")).ok()?;
        (v["sources"].as_array()?.get(home)?["blocks"].as_u64()? == 0).then_some(())
    })
    .context("the cleared cache never reached the index")?;
    let c = chat(
        &lb.url("/v1/chat/completions"),
        &turns(&a.content, 53),
        &hdr,
    )?;
    let predicted = cached_of(&c.route).context("cached=")?;
    ensure!(
        predicted == 0 && c.cached == 0,
        "after the eviction: predicted {predicted}, reported {} ({})",
        c.cached,
        c.route
    );
    Ok(())
}
