//! End-to-end suite of the `workflow` policy: real `vllm-sim` backends, real `agentlb`
//! processes, and workloads from the benchmark's own generator (`lb_sim::workload`).
//!
//! - the calls of each workflow (planner, parallel workers, aggregator) land on one
//!   backend, with ids in headers and with no ids at all (conversation roots);
//! - that placement gives more cache hits and a lower time to first token than round
//!   robin on the same workload (the backends' own `cached_tokens` and simulated TTFT),
//!   which shows the check can fail;
//! - three independent agentlb processes, with the client alternating between them,
//!   place every workflow on the same backend;
//! - the home table: placed/home/lineage/end/delete, a 503 home left and taken back;
//! - a home that dies: its workflow moves at once, the new backend is pre-warmed and the
//!   next call is a cache hit;
//! - 24 concurrent workflows on small instances: each keeps its backend, KV demand per
//!   backend within 1.25 × the mean;
//! - Responses API chains (`previous_response_id`, streaming and not, retrieve) with the
//!   real OpenAI SDK through 1 and 3 replicas in front of 4 instances: 0 errors, every
//!   continuation a cache hit; round robin without owner routing fails them with 404.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, Result, ensure};
use lb_sim::workload::{
    self, ContextOrder, IdMode, Size, Spec, WorkflowSpec, Workload, request::usage_of,
};
use testkit::{Lb, Sim};

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

fn sims(n: usize) -> Result<Vec<Sim>> {
    (0..n)
        .map(|_| Sim::start(&["--time-scale", "50", "--model", MODEL]))
        .collect()
}

fn lb(sims: &[Sim], policy: &str) -> Result<Lb> {
    let mut args: Vec<String> = vec!["--policy".into(), policy.into()];
    for s in sims {
        args.extend(["--backend".to_owned(), s.url()]);
    }
    Lb::start(&args)
}

/// Six workflows of a planner, 3 workers and an aggregator for 2 rounds over a
/// 1,500-token context behind a 300-token shared system prompt.
fn workload(seed: u64) -> Workload {
    workload::generate(&Spec {
        seed,
        workflows: Some(WorkflowSpec {
            workflows: 6,
            agents: 3,
            rounds: 2,
            system_tokens: 300,
            context: Size::fixed(1500.0),
            role_tokens: 20,
            planner_output: Size::fixed(8.0),
            worker_output: Size::fixed(16.0),
            aggregator_output: Size::fixed(8.0),
            tool_pause_ms: Size::fixed(0.0),
            arrival_gap_ms: 0.0,
            order: ContextOrder::SystemFirst,
        }),
        qa: None,
        stateless: None,
        stream: false,
        model: MODEL.to_owned(),
    })
}

/// What the replay saw: backend per call, Σ prompt / cached tokens, and Σ of the
/// engines' own (simulated) time to first token.
struct Seen {
    backend_of: Vec<String>,
    prompt: u64,
    cached: u64,
    ttft: f64,
}

/// Sends every call in order (dependencies come first), call `i` to `lbs[i % n]`.
fn replay(w: &Workload, lbs: &[&Lb], ids: &IdMode) -> Result<Seen> {
    let mut seen = Seen {
        backend_of: Vec::new(),
        prompt: 0,
        cached: 0,
        ttft: 0.0,
    };
    for (i, c) in w.calls.iter().enumerate() {
        let h = w.http_call(c, ids, "t");
        let mut req = ureq::post(&lbs[i % lbs.len()].url(h.path))
            .timeout(Duration::from_secs(30))
            .set("content-type", "application/json");
        for (k, v) in &h.headers {
            req = req.set(k, v);
        }
        let resp = req
            .send_bytes(&h.body)
            .with_context(|| format!("call {i}"))?;
        let backend = resp
            .header("x-agentlb-backend")
            .context("no x-agentlb-backend")?
            .to_owned();
        seen.ttft += resp
            .header("x-sim-ttft")
            .and_then(|t| t.parse::<f64>().ok())
            .context("no x-sim-ttft")?;
        let v: serde_json::Value = serde_json::from_str(&resp.into_string()?)?;
        let (p, cached, _) = usage_of(&v).context("no usage")?;
        seen.prompt += p;
        seen.cached += cached;
        seen.backend_of.push(backend);
    }
    Ok(seen)
}

/// Backends used by each workflow.
fn homes(w: &Workload, seen: &Seen) -> BTreeMap<usize, Vec<String>> {
    let mut m: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for c in &w.calls {
        let v = m.entry(c.workflow_index).or_default();
        if !v.contains(&seen.backend_of[c.id]) {
            v.push(seen.backend_of[c.id].clone());
        }
    }
    m
}

fn check_affinity(w: &Workload, seen: &Seen) -> Result<()> {
    let homes = homes(w, seen);
    for (wf, b) in &homes {
        ensure!(b.len() == 1, "workflow {wf} used backends {b:?}");
    }
    let distinct: std::collections::BTreeSet<&String> = homes.values().flatten().collect();
    ensure!(
        distinct.len() >= 2,
        "6 workflows all on one backend: {distinct:?}"
    );
    Ok(())
}

#[test]
fn agents_of_a_workflow_share_a_backend_and_hit_its_cache() -> Result<()> {
    let s = sims(4)?;
    let w = workload(1);
    let wf = lb(&s, "workflow")?;
    let seen = replay(&w, &[&wf], &IdMode::Headers)?;
    check_affinity(&w, &seen)?;
    drop(wf);
    // The same workload on fresh backends through round robin.
    let s2 = sims(4)?;
    let rr = lb(&s2, "round_robin")?;
    let base = replay(&w, &[&rr], &IdMode::Headers)?;
    ensure!(
        check_affinity(&w, &base).is_err(),
        "round robin kept every workflow on one backend: the affinity check cannot fail"
    );
    let hit = |s: &Seen| s.cached as f64 / s.prompt as f64;
    ensure!(
        hit(&seen) > hit(&base) + 0.1,
        "workflow hit {:.3} vs round robin {:.3}",
        hit(&seen),
        hit(&base)
    );
    // Cache hits skip prefill: the engines' own time to first token is lower.
    ensure!(
        seen.ttft < base.ttft * 0.9,
        "workflow TTFT {:.3} s vs round robin {:.3} s (simulated, summed)",
        seen.ttft,
        base.ttft
    );
    Ok(())
}

#[test]
fn clients_without_ids_get_affinity_by_conversation_root() -> Result<()> {
    let s = sims(4)?;
    let w = workload(2);
    let lb = lb(&s, "workflow")?;
    let seen = replay(&w, &[&lb], &IdMode::None)?;
    check_affinity(&w, &seen)
}

#[test]
fn three_replicas_agree_on_every_workflow_home() -> Result<()> {
    let s = sims(4)?;
    let w = workload(3);
    let a = lb(&s, "workflow")?;
    let b = lb(&s, "workflow")?;
    let c = lb(&s, "workflow")?;
    // Calls alternate between the replicas; each workflow still has one backend.
    check_affinity(&w, &replay(&w, &[&a, &b, &c], &IdMode::Headers)?)?;
    let w = workload(4);
    check_affinity(&w, &replay(&w, &[&a, &b, &c], &IdMode::None)?)
}

/// One chat call through `lb` with `headers`: (status, backend, `x-agentlb-route`).
fn call(lb: &Lb, headers: &[(&str, &str)], user: &str) -> Result<(u16, String, String)> {
    let body = serde_json::json!({
        "model": MODEL,
        "max_tokens": 4,
        "messages": [
            {"role": "system", "content": "You are a careful planner. ".repeat(40)},
            {"role": "user", "content": user},
        ],
    });
    let mut req = ureq::post(&lb.url("/v1/chat/completions"))
        .timeout(Duration::from_secs(30))
        .set("content-type", "application/json");
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let r = match req.send_string(&body.to_string()) {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.into()),
    };
    let backend = r.header("x-agentlb-backend").unwrap_or("").to_owned();
    let route = r.header("x-agentlb-route").unwrap_or("").to_owned();
    let status = r.status();
    let _ = r.into_string();
    Ok((status, backend, route))
}

fn admin_workflow(lb: &Lb, id: &str) -> Result<serde_json::Value> {
    testkit::get_json(&lb.admin_url(&format!("/admin/workflows/{id}")))
}

#[test]
fn home_table_lineage_end_and_migration() -> Result<()> {
    let sims = sims(3)?;
    let lb = lb(&sims, "workflow")?;

    // Placed, then home; the route header says so, with the predicted cached tokens.
    let (st, home, route) = call(
        &lb,
        &[("x-workflow-id", "wf-a"), ("x-request-id", "a1")],
        "step one",
    )?;
    ensure!(st == 200, "status {st}");
    ensure!(
        route.starts_with("policy=workflow; reason=placed; cached=0"),
        "{route}"
    );
    let (_, b2, route) = call(
        &lb,
        &[("x-workflow-id", "wf-a"), ("x-request-id", "a2")],
        "step one",
    )?;
    ensure!(b2 == home, "second call left home: {b2} vs {home}");
    ensure!(route.contains("reason=home"), "{route}");
    let cached: u64 = route
        .rsplit('=')
        .next()
        .and_then(|n| n.parse().ok())
        .context("cached=N")?;
    ensure!(
        cached > 100,
        "the home was predicted to hold the context: {route}"
    );

    // Lineage: a call naming only its parent joins the parent's workflow and home.
    let (_, b3, _) = call(
        &lb,
        &[("x-parent-request-id", "a2"), ("x-request-id", "a3")],
        "a child",
    )?;
    ensure!(b3 == home, "an inheriting child left home");
    let w = admin_workflow(&lb, "wf-a")?;
    ensure!(w["requests"] == 3, "{w}");
    ensure!(
        w["edges"] == serde_json::json!([{"parent": "a2", "child": "a3"}]),
        "{w}"
    );
    ensure!(w["home_name"] == serde_json::json!(home), "{w}");

    // Explicit end, then DELETE forgets it.
    call(
        &lb,
        &[("x-workflow-id", "wf-a"), ("x-workflow-end", "true")],
        "done",
    )?;
    ensure!(admin_workflow(&lb, "wf-a")?["ended"] == true);
    let del = ureq::delete(&lb.admin_url("/admin/workflows/wf-a")).call()?;
    ensure!(del.status() == 200);
    ensure!(matches!(
        ureq::get(&lb.admin_url("/admin/workflows/wf-a")).call(),
        Err(ureq::Error::Status(404, _))
    ));

    // Migration: the home of wf-b answers 503; the next call moves, with no error for
    // the client.
    let (_, home_b, _) = call(&lb, &[("x-workflow-id", "wf-b")], "migrating work")?;
    let dead = sims
        .iter()
        .find(|s| s.url().ends_with(&home_b))
        .context("home of wf-b")?;
    dead.fault("503")?;
    let (st, moved_to, route) = call(&lb, &[("x-workflow-id", "wf-b")], "migrating work")?;
    ensure!(st == 200, "a call to a failed home failed: {st}");
    ensure!(moved_to != home_b, "still on the failed home");
    ensure!(route.contains("reason=migrated"), "{route}");
    let w = admin_workflow(&lb, "wf-b")?;
    ensure!(
        w["moves"] == 1 && w["away_name"] == serde_json::json!(moved_to),
        "{w}"
    );
    // The home answers again: the workflow goes back (every replica does the same).
    dead.fault("none")?;
    std::thread::sleep(Duration::from_millis(300));
    let (_, again, route) = call(&lb, &[("x-workflow-id", "wf-b")], "migrating work")?;
    ensure!(
        again == home_b && route.contains("reason=home"),
        "the workflow did not come back: {again} {route}"
    );
    ensure!(admin_workflow(&lb, "wf-b")?["away"].is_null());

    let m = ureq::get(&lb.admin_url("/metrics")).call()?.into_string()?;
    for reason in ["placed", "home", "migrated"] {
        ensure!(
            m.contains(&format!(
                "agentlb_routed_requests_total{{policy=\"workflow\",reason=\"{reason}\"}}"
            )),
            "no {reason} decisions in the metrics"
        );
    }
    let published: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("agentlb_decisions_total{kind=\"published\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    ensure!(
        published >= 2.0,
        "placements reach the decision writer: {published}"
    );
    ensure!(
        m.contains("agentlb_predicted_cached_tokens_total{"),
        "no reuse metric"
    );
    Ok(())
}

/// Runs `py/openai_responses.py` against `urls`; its JSON report.
fn responses_chains(
    py: &str,
    urls: &[String],
    chains: usize,
    turns: usize,
) -> Result<serde_json::Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/openai_responses.py");
    let out = std::process::Command::new(py)
        .arg(script)
        .arg(MODEL)
        .arg(chains.to_string())
        .arg(turns.to_string())
        .args(urls)
        .output()?;
    ensure!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn python() -> Option<String> {
    match std::env::var("AGENTLB_PYTHON") {
        Ok(p) => Some(p),
        Err(_) => {
            assert!(
                std::env::var("AGENTLB_REQUIRE_PYTHON").as_deref() != Ok("1"),
                "AGENTLB_PYTHON is unset and AGENTLB_REQUIRE_PYTHON=1"
            );
            None
        }
    }
}

#[test]
fn responses_chains_follow_their_owner_through_one_and_three_replicas() -> Result<()> {
    let Some(py) = python() else {
        eprintln!("responses chains: skipped: AGENTLB_PYTHON unset (cargo xtask test sets it)");
        return Ok(());
    };
    let sims = sims(4)?;
    let (chains, turns) = (6, 3);

    // One gateway, then three with the client alternating between them.
    for n in [1usize, 3] {
        let lbs: Vec<Lb> = (0..n)
            .map(|_| lb(&sims, "workflow"))
            .collect::<Result<_>>()?;
        let urls: Vec<String> = lbs.iter().map(|l| l.url("")).collect();
        let v = responses_chains(&py, &urls, chains, turns)?;
        ensure!(v["errors"] == serde_json::json!([]), "{n} replica(s): {v}");
        ensure!(v["calls"] == chains * (turns + 1), "{v}");
        ensure!(v["retrieved"] == chains, "{v}");
        let cached: Vec<u64> = v["cached"]
            .as_array()
            .context("cached")?
            .iter()
            .filter_map(serde_json::Value::as_u64)
            .collect();
        ensure!(
            cached.len() == chains * turns && cached.iter().all(|&c| c > 0),
            "every continuation hits its owner's cache: {v}"
        );
        if n == 3 {
            // Replicas that had not seen an id asked the backends.
            let asked: u64 = lbs
                .iter()
                .filter_map(|l| ureq::get(&l.admin_url("/metrics")).call().ok())
                .filter_map(|r| r.into_string().ok())
                .filter(|m| m.contains("agentlb_response_owner_lookups_total{kind=\"found\"}"))
                .count() as u64;
            ensure!(asked > 0, "no replica looked an owner up");
        }
    }

    // Without owner routing (what other routers do), round robin breaks the chains:
    // the check can fail.
    let mut args: Vec<String> = vec!["--policy".into(), "round_robin".into()];
    for s in &sims {
        args.extend(["--backend".to_owned(), s.url()]);
    }
    let cfg = testkit::temp_file(
        "no-owner.toml",
        "[routing]\nfollow_response_owner = false\n",
    )?;
    args.extend(["--config".to_owned(), cfg.display().to_string()]);
    let rr = Lb::start(&args)?;
    let v = responses_chains(&py, &[rr.url("")], chains, turns)?;
    let failed = v["errors"].as_array().map_or(0, Vec::len);
    ensure!(
        failed > chains / 2,
        "round robin without owner routing should break chains: {v}"
    );
    ensure!(
        v["errors"]
            .as_array()
            .is_some_and(|e| e.iter().all(|x| x["status"] == 404)),
        "{v}"
    );
    Ok(())
}

/// A chat call with a long shared context: (status, backend, route header, cached tokens).
fn long_call(lb: &Lb, wf: &str, turn: usize) -> Result<(u16, String, String, u64)> {
    let body = serde_json::json!({
        "model": MODEL,
        "max_tokens": 4,
        "messages": [
            {"role": "system", "content": "You coordinate a team of agents. ".repeat(60)},
            {"role": "user", "content": format!("{} (turn {turn})", "Shared findings so far: the data shows a steady trend. ".repeat(80))},
        ],
    });
    let r = ureq::post(&lb.url("/v1/chat/completions"))
        .timeout(Duration::from_secs(30))
        .set("content-type", "application/json")
        .set("x-workflow-id", wf)
        .send_string(&body.to_string());
    let r = match r {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.into()),
    };
    let backend = r.header("x-agentlb-backend").unwrap_or("").to_owned();
    let route = r.header("x-agentlb-route").unwrap_or("").to_owned();
    let status = r.status();
    let v: serde_json::Value = serde_json::from_str(&r.into_string()?)?;
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    Ok((status, backend, route, cached))
}

#[test]
fn a_failed_home_migrates_its_workflows_and_prewarms_the_new_home() -> Result<()> {
    let sims = sims(3)?;
    let cfg = testkit::temp_file(
        "fast-health.toml",
        "[health]\ninterval_ms = 150\nunhealthy_threshold = 1\n",
    )?;
    let mut args: Vec<String> = vec![
        "--policy".into(),
        "workflow".into(),
        "--config".into(),
        cfg.display().to_string(),
    ];
    for s in &sims {
        args.extend(["--backend".to_owned(), s.url()]);
    }
    let lb = Lb::start(&args)?;
    let (st, home, _, _) = long_call(&lb, "wf-k", 0)?;
    ensure!(st == 200);
    let (_, again, _, cached) = long_call(&lb, "wf-k", 1)?;
    ensure!(
        again == home && cached > 500,
        "second call: {again} cached {cached}"
    );

    // The home dies between two calls of the workflow.
    let dead = sims
        .iter()
        .find(|s| s.url().ends_with(&home))
        .context("home")?;
    dead.fault("die")?;
    let warmed = testkit::wait_until(Duration::from_secs(15), || {
        let m = ureq::get(&lb.admin_url("/metrics"))
            .call()
            .ok()?
            .into_string()
            .ok()?;
        m.contains("agentlb_migrations_total{kind=\"prewarm_ok\"} 1")
            .then_some(())
    });
    if warmed.is_none() {
        let m = ureq::get(&lb.admin_url("/metrics")).call()?.into_string()?;
        let lines: Vec<&str> = m
            .lines()
            .filter(|l| l.contains("migrations") || l.contains("healthy") || l.contains("prewarm"))
            .collect();
        anyhow::bail!(
            "no pre-warm after the home died: {lines:#?}\n{}",
            admin_workflow(&lb, "wf-k")?
        );
    }
    let w = admin_workflow(&lb, "wf-k")?;
    ensure!(w["moves"] == 1, "{w}");
    let new_home = w["away_name"].as_str().unwrap_or("").to_owned();
    ensure!(!new_home.is_empty() && new_home != home, "{w}");

    // The next call goes where the workflow moved and hits the cache the pre-warm built.
    let (st, b, route, cached) = long_call(&lb, "wf-k", 2)?;
    ensure!(st == 200, "status {st}");
    ensure!(
        b == new_home && route.contains("reason=migrated"),
        "{b} {route}"
    );
    ensure!(
        cached > 500,
        "the pre-warm made the next call a hit: cached {cached}"
    );
    Ok(())
}

#[test]
fn concurrent_workflows_are_balanced_on_kv_demand_and_keep_their_affinity() -> Result<()> {
    // Four instances of 2,048 blocks (32,768 tokens) each; 24 workflows of ≈ 2.3k tokens
    // of context each, all starting at once: ≈ 40% of the cluster's KV. Placement by
    // predicted KV footprint on (a single gateway's setting).
    let sims: Vec<Sim> = (0..4)
        .map(|_| {
            Sim::start(&[
                "--time-scale",
                "50",
                "--model",
                MODEL,
                "--num-gpu-blocks",
                "2048",
            ])
        })
        .collect::<Result<_>>()?;
    let cfg = testkit::temp_file("footprint.toml", "[routing]\nfootprint_placement = true\n")?;
    let mut args: Vec<String> = vec![
        "--policy".into(),
        "workflow".into(),
        "--config".into(),
        cfg.display().to_string(),
    ];
    for s in &sims {
        args.extend(["--backend".to_owned(), s.url()]);
    }
    let lb = Lb::start(&args)?;
    let known = testkit::wait_until(Duration::from_secs(15), || {
        let v = testkit::get_json(&lb.admin_url("/admin/backends")).ok()?;
        v["backends"]
            .as_array()?
            .iter()
            .all(|b| b["load"]["kv_capacity_tokens"].as_f64().unwrap_or(0.0) > 0.0)
            .then_some(())
    });
    ensure!(known.is_some(), "KV capacities were not scraped");
    let url = lb.url("/v1/chat/completions");
    let threads: Vec<_> = (0..24)
        .map(|w| {
            let url = url.clone();
            std::thread::spawn(move || -> Result<(Vec<String>, u64)> {
                let mut backends = Vec::new();
                let mut prompt = 0;
                let context =
                    format!("Workflow {w} context: ") + &"observations and notes ".repeat(400);
                for turn in 0..3 {
                    let body = serde_json::json!({
                        "model": MODEL,
                        "max_tokens": 8,
                        "messages": [
                            {"role": "system", "content": "You are one agent of a team."},
                            {"role": "user", "content": format!("{context} turn {turn}")},
                        ],
                    });
                    let r = ureq::post(&url)
                        .timeout(Duration::from_secs(60))
                        .set("content-type", "application/json")
                        .set("x-workflow-id", &format!("wf-bal-{w}"))
                        .send_string(&body.to_string())?;
                    backends.push(r.header("x-agentlb-backend").unwrap_or("").to_owned());
                    let v: serde_json::Value = serde_json::from_str(&r.into_string()?)?;
                    prompt = v["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
                }
                Ok((backends, prompt))
            })
        })
        .collect();
    let mut demand: BTreeMap<String, u64> = BTreeMap::new();
    for t in threads {
        let (backends, prompt) = t
            .join()
            .map_err(|_| anyhow::anyhow!("workflow thread panicked"))??;
        ensure!(
            backends.iter().all(|b| *b == backends[0]),
            "a workflow left its backend: {backends:?}"
        );
        *demand.entry(backends[0].clone()).or_default() += prompt;
    }
    let total: u64 = demand.values().sum();
    let mean = total as f64 / sims.len() as f64;
    let max = demand.values().copied().max().unwrap_or(0) as f64;
    ensure!(
        demand.len() == sims.len() && max / mean <= 1.25,
        "KV demand per backend {demand:?}: imbalance {:.2}",
        max / mean
    );
    Ok(())
}
