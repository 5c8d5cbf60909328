//! Tests of the generator: determinism, shapes, ids as configured.

use serde_json::Value;

use super::{
    presets::{self, preset},
    request::usage_of,
    *,
};

fn small_spec(seed: u64) -> Spec {
    Spec {
        seed,
        workflows: Some(WorkflowSpec {
            workflows: 3,
            agents: 2,
            rounds: 2,
            system_tokens: 50,
            context: Size::lognormal(200.0, 0.5),
            role_tokens: 10,
            planner_output: Size::fixed(20.0),
            worker_output: Size::fixed(30.0),
            aggregator_output: Size::fixed(25.0),
            tool_pause_ms: Size::fixed(100.0),
            arrival_gap_ms: 500.0,
            order: ContextOrder::SystemFirst,
        }),
        qa: None,
        stateless: None,
        stream: true,
        model: "m".to_owned(),
    }
}

#[test]
fn same_seed_same_workload_other_seed_other_text() {
    let a = generate(&small_spec(42));
    let b = generate(&small_spec(42));
    assert_eq!(a, b);
    let c = generate(&small_spec(43));
    assert_ne!(a.calls[0].messages, c.calls[0].messages);
    // The shared system prompt is the same for every workflow and every seed's workflows.
    assert_eq!(
        a.calls[0].messages[0],
        a.calls[a.calls.len() - 1].messages[0]
    );
}

#[test]
fn workflow_shape_and_dependencies() {
    let w = generate(&small_spec(1));
    // Per workflow and round: planner + 2 workers + aggregator.
    assert_eq!(w.calls.len(), 3 * 2 * 4);
    assert_eq!(w.workflows, 3);
    for (i, c) in w.calls.iter().enumerate() {
        assert_eq!(c.id, i);
        assert!(
            c.deps.iter().all(|&d| d < i),
            "dependency after its dependent"
        );
        assert!(
            c.deps
                .iter()
                .all(|&d| w.calls[d].workflow_index == c.workflow_index)
        );
    }
    for calls in w.calls_by_workflow() {
        let agents: Vec<&str> = calls.iter().map(|&i| w.calls[i].agent.as_str()).collect();
        assert_eq!(agents.iter().filter(|a| **a == "planner").count(), 2);
        assert_eq!(agents.iter().filter(|a| **a == "aggregator").count(), 2);
        let last = calls
            .iter()
            .filter(|&&i| w.calls[i].last_of_workflow)
            .count();
        assert_eq!(last, 1);
        // Workers of a round run in parallel: same deps (the planner).
        let workers: Vec<&Call> = calls
            .iter()
            .map(|&i| &w.calls[i])
            .filter(|c| c.agent.starts_with("worker"))
            .collect();
        assert_eq!(workers[0].deps, workers[1].deps);
        // The aggregator waits for both workers of its round.
        let agg = calls
            .iter()
            .map(|&i| &w.calls[i])
            .find(|c| c.agent == "aggregator")
            .expect("aggregator");
        assert_eq!(agg.deps.len(), 2);
    }
    // Pauses of 100 ms: per round the planner (after round 1), one worker and the aggregator
    // lie on the critical path: 2 + 3 = 5 pauses over two rounds.
    assert_eq!(w.critical_pause_ms(), vec![500; 3]);
}

#[test]
fn context_grows_and_is_shared_as_a_prefix() {
    let w = generate(&small_spec(7));
    let calls: Vec<&Call> = w.calls.iter().filter(|c| c.workflow_index == 0).collect();
    let user = |c: &Call| c.messages[1].content.clone();
    // Every later call of the workflow starts with the first call's context.
    let first = user(calls[0]);
    let ctx = &first[..first.find("\n\n").expect("context end")];
    for c in &calls {
        assert!(
            user(c).starts_with(ctx),
            "{} lost the shared context",
            c.agent
        );
    }
    // Round 2's planner sees round 1's results.
    let planners: Vec<&&Call> = calls.iter().filter(|c| c.agent == "planner").collect();
    assert!(user(planners[1]).len() > user(planners[0]).len() + 4 * (20 + 2 * 30 + 25));
    assert!(user(planners[1]).contains("Result 1:"));
    // Role first: the agent's role comes before the shared system prompt.
    let mut s = small_spec(7);
    if let Some(ws) = s.workflows.as_mut() {
        ws.order = ContextOrder::RoleFirst;
    }
    let r = generate(&s);
    assert_ne!(
        r.calls[0].messages[0].content,
        w.calls[0].messages[0].content
    );
    assert!(
        r.calls[0].messages[0]
            .content
            .ends_with(&w.calls[0].messages[0].content)
    );
}

#[test]
fn sizes_follow_the_spec() {
    let w = generate(&small_spec(3));
    let sys = &w.calls[0].messages[0].content;
    assert_eq!(sys.len(), 50 * text::CHARS_PER_TOKEN);
    for c in &w.calls {
        let want = match c.agent.as_str() {
            "planner" => 20,
            "aggregator" => 25,
            _ => 30,
        };
        assert_eq!(c.max_tokens, want);
    }
    // Lognormal contexts average near their mean over many draws.
    let mut rng = Rng::new(9);
    let s = Size::lognormal(1000.0, 1.0);
    let mean: f64 = (0..20_000).map(|_| s.sample(&mut rng)).sum::<f64>() / 20_000.0;
    assert!((mean - 1000.0).abs() < 60.0, "{mean}");
}

#[test]
fn qa_matches_multi_round_qa() {
    let p = preset("prodstack-qa", 1, false).expect("preset");
    let qa = p.spec.qa.clone().expect("qa");
    assert_eq!(
        (
            qa.users,
            qa.rounds,
            qa.system_tokens,
            qa.history_tokens,
            qa.answer_tokens
        ),
        (320, 10, 1000, 20_000, 100)
    );
    let mut small = p.spec.clone();
    small.qa = Some(QaSpec {
        users: 4,
        rounds: 3,
        history_tokens: 100,
        system_tokens: 20,
        ..qa
    });
    let w = generate(&small);
    assert_eq!(w.calls.len(), 12);
    let gap = (4.0 / small.qa.as_ref().map_or(1.0, |q| q.qps) * 1000.0) as u64;
    for user in w.calls_by_workflow() {
        let c: Vec<&Call> = user.iter().map(|&i| &w.calls[i]).collect();
        assert_eq!(c[1].at_ms - c[0].at_ms, gap);
        assert_eq!(c[1].deps, vec![c[0].id]);
        // History accumulates: the previous question and answer are replayed.
        assert_eq!(c[2].messages.len(), 1 + 2 * 2 + 1);
        assert_eq!(c[2].messages[2].role, "assistant");
    }
}

#[test]
fn mixed_adds_stateless_calls_without_ids() {
    let p = preset("mixed", 5, true).expect("preset");
    let w = generate(&p.spec);
    let stateless: Vec<&Call> = w
        .calls
        .iter()
        .filter(|c| c.kind == CallKind::Stateless)
        .collect();
    assert_eq!(stateless.len(), 80);
    let h = w.http_call(stateless[0], &IdMode::Headers, "r");
    assert!(!h.headers.iter().any(|(k, _)| k == "X-Workflow-Id"));
}

fn body(h: &HttpCall) -> Value {
    serde_json::from_slice(&h.body).expect("json body")
}

fn header<'a>(h: &'a HttpCall, name: &str) -> Option<&'a str> {
    h.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[test]
fn ids_are_sent_as_configured() {
    let w = generate(&small_spec(11));
    let c = w
        .calls
        .iter()
        .find(|c| c.parent.is_some())
        .expect("a child call");
    let parent_rid = request::request_id("run", c.parent.expect("parent"));

    let h = w.http_call(c, &IdMode::Headers, "run");
    assert_eq!(header(&h, "x-workflow-id"), Some(c.workflow.as_str()));
    assert_eq!(header(&h, "x-agent-id"), Some(c.agent.as_str()));
    assert_eq!(header(&h, "x-parent-request-id"), Some(parent_rid.as_str()));
    assert_eq!(
        header(&h, "x-request-id"),
        Some(request::request_id("run", c.id).as_str())
    );
    assert!(body(&h).get("workflow_id").is_none());

    let h = w.http_call(c, &IdMode::Body, "run");
    let b = body(&h);
    assert_eq!(b["workflow_id"], c.workflow.as_str());
    assert_eq!(b["agent_id"], c.agent.as_str());
    assert_eq!(b["parent_request_id"], parent_rid.as_str());
    assert!(header(&h, "x-workflow-id").is_none());

    let h = w.http_call(c, &IdMode::AgenticContext, "run");
    assert_eq!(
        body(&h)["vllm_xargs"]["agentic_context"]["task_id"],
        c.workflow.as_str()
    );

    let h = w.http_call(c, &IdMode::SessionHeader("X-Session-ID".to_owned()), "run");
    assert_eq!(header(&h, "x-session-id"), Some(c.workflow.as_str()));

    let h = w.http_call(c, &IdMode::None, "run");
    assert_eq!(h.headers.len(), 1, "only X-Request-Id");
    let b = body(&h);
    for k in ["workflow_id", "agent_id", "vllm_xargs", "parent_request_id"] {
        assert!(b.get(k).is_none(), "{k} sent");
    }
    assert_eq!(b["stream"], true);
    assert_eq!(b["stream_options"]["include_usage"], true);
    assert_eq!(b["max_tokens"], c.max_tokens);
    assert_eq!(b["messages"][0]["role"], "system");

    // The last call of a workflow says so, in header mode.
    let last = w.calls.iter().find(|c| c.last_of_workflow).expect("last");
    assert_eq!(
        header(&w.http_call(last, &IdMode::Headers, "r"), "x-workflow-end"),
        Some("true")
    );

    for m in [
        "headers",
        "body",
        "agentic_context",
        "none",
        "header:X-SMG-Routing-Key",
    ] {
        let parsed = IdMode::parse(m).expect(m);
        assert_eq!(parsed.label(), m);
    }
    assert!(IdMode::parse("header:").is_none());
}

#[test]
fn usage_is_read_from_bodies_and_chunks() {
    let v: Value = serde_json::from_str(
        r#"{"usage":{"prompt_tokens":100,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":64}}}"#,
    )
    .expect("json");
    assert_eq!(usage_of(&v), Some((100, 64, 5)));
    let v: Value = serde_json::from_str(r#"{"usage":null}"#).expect("json");
    assert_eq!(usage_of(&v), None);
}

#[test]
fn oracle_of_a_preset_is_bounded_by_the_unbounded_cache() {
    let p = presets::preset("workflows", 3, true).expect("preset");
    let w = generate(&p.spec);
    let small = oracle::run(&w, 4.0, 16, 2000);
    let big = oracle::run(&w, 4.0, 16, u64::MAX);
    assert!(small.hit_rate <= big.hit_rate + 1e-12);
    assert!((big.hit_rate - big.unbounded_hit_rate).abs() < 1e-12);
    assert!(
        big.hit_rate > 0.5,
        "workflows share most of their prompts: {}",
        big.hit_rate
    );
    assert_eq!(small.prompt_tokens, big.prompt_tokens);
    assert!(big.demand_blocks > 2000);
}
