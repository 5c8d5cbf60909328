//! End-to-end suite of the `workflow` policy: real `vllm-sim` backends, real `agentlb`
//! processes, and workloads from the benchmark's own generator (`lb_sim::workload`).
//!
//! - the calls of each workflow (planner, parallel workers, aggregator) land on one
//!   backend, with ids in headers and with no ids at all (conversation roots);
//! - that placement gives more cache hits than round robin on the same workload (the
//!   backends' own `cached_tokens`), which shows the check can fail;
//! - three independent agentlb processes, with the client alternating between them,
//!   place every workflow on the same backend.

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

/// What the replay saw: backend per call, and Σ prompt / cached tokens.
struct Seen {
    backend_of: Vec<String>,
    prompt: u64,
    cached: u64,
}

/// Sends every call in order (dependencies come first), call `i` to `lbs[i % n]`.
fn replay(w: &Workload, lbs: &[&Lb], ids: &IdMode) -> Result<Seen> {
    let mut seen = Seen {
        backend_of: Vec::new(),
        prompt: 0,
        cached: 0,
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
