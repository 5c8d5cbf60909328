//! Agentic workloads for benchmarks and tests: a deterministic generator, presets, trace
//! replay, the HTTP request each call becomes, and an offline oracle of the achievable
//! prefix-cache hit rate.
//!
//! A [`Workload`] is a list of [`Call`]s with their dependencies: a call is sent once every
//! call in `deps` has finished, `delay_ms` later (a tool pause or think time), and not before
//! `at_ms` after the start. Prompts are fully fixed by the seed: where an agent framework would
//! append a model's answer to the shared context, the generator appends a stand-in text of the
//! call's output length, so the same seed gives byte-identical requests on every router and
//! the [`oracle`] can compute what any placement could have hit without running anything.
//!
//! - [`generate`]: multi-agent workflows (planner → K parallel workers → aggregator, for R
//!   rounds, over a growing shared context), production-stack's multi-round QA, and stateless
//!   requests mixed in; [`presets`] names the scenarios the benchmark runs.
//! - [`trace`]: replay of a JSONL trace (own format, or Mooncake-style `hash_ids`).
//! - [`request`]: the JSON body and headers of a call for each way a client may name its
//!   workflow ([`IdMode`]).

pub mod oracle;
pub mod presets;
pub mod request;
pub mod text;
pub mod trace;

use serde::{Deserialize, Serialize};

pub use self::request::{HttpCall, IdMode};

/// Where a workflow's shared context sits relative to an agent's own instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContextOrder {
    /// System prompt (shared by all workflows), then the workflow's context, then the
    /// agent's role and task: every agent of a workflow shares the whole context prefix.
    SystemFirst,
    /// The agent's role first: agents of one workflow share no prefix with each other, only
    /// with their own earlier calls.
    RoleFirst,
}

/// A random size: fixed, or lognormal around a mean.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Size {
    /// Mean, in tokens (or milliseconds for pauses).
    pub mean: f64,
    /// σ of the underlying normal; 0 = always `mean`.
    pub sigma: f64,
}

impl Size {
    /// A fixed size.
    pub const fn fixed(mean: f64) -> Self {
        Self { mean, sigma: 0.0 }
    }

    /// A lognormal size whose mean is `mean`.
    pub const fn lognormal(mean: f64, sigma: f64) -> Self {
        Self { mean, sigma }
    }

    /// Draws one value (≥ 0).
    pub fn sample(&self, rng: &mut Rng) -> f64 {
        if self.sigma <= 0.0 || self.mean <= 0.0 {
            return self.mean.max(0.0);
        }
        // E[exp(N(μ, σ²))] = exp(μ + σ²/2) = mean.
        let mu = self.mean.ln() - self.sigma * self.sigma / 2.0;
        (mu + self.sigma * rng.normal()).exp()
    }
}

/// Parameters of multi-agent workflows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowSpec {
    /// Number of workflows.
    pub workflows: usize,
    /// Workers fanned out in parallel per round (the planner and aggregator come on top).
    pub agents: usize,
    /// Rounds per workflow.
    pub rounds: usize,
    /// System prompt shared by every workflow, tokens.
    pub system_tokens: usize,
    /// Initial workflow context (task, documents), tokens.
    pub context: Size,
    /// Each agent's own instructions, tokens.
    pub role_tokens: usize,
    /// Output tokens of the planner, of each worker, of the aggregator.
    pub planner_output: Size,
    /// Output tokens of each worker.
    pub worker_output: Size,
    /// Output tokens of the aggregator.
    pub aggregator_output: Size,
    /// Pause before each call once its inputs are ready (tool time), milliseconds.
    pub tool_pause_ms: Size,
    /// Mean gap between workflow starts (Poisson arrivals), milliseconds; 0 = all at once.
    pub arrival_gap_ms: f64,
    /// Where the shared context sits.
    pub order: ContextOrder,
}

/// Parameters of production-stack's multi-round QA benchmark (`multi-round-qa.py`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QaSpec {
    /// Concurrent users.
    pub users: usize,
    /// Rounds per user.
    pub rounds: usize,
    /// Shared system prompt, tokens.
    pub system_tokens: usize,
    /// Per-user history at the start, tokens.
    pub history_tokens: usize,
    /// Answer length, tokens.
    pub answer_tokens: usize,
    /// Question length, tokens.
    pub question_tokens: usize,
    /// Requests per second over all users: each user asks every `users / qps` seconds.
    pub qps: f64,
}

/// Stateless requests mixed into a workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatelessSpec {
    /// Number of requests.
    pub requests: usize,
    /// Prompt size, tokens.
    pub prompt: Size,
    /// Output size, tokens.
    pub output: Size,
    /// Mean gap between them (Poisson), milliseconds.
    pub gap_ms: f64,
}

/// Everything the generator needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    /// Seed of every random choice.
    pub seed: u64,
    /// Multi-agent workflows, if any.
    pub workflows: Option<WorkflowSpec>,
    /// Multi-round QA users, if any.
    pub qa: Option<QaSpec>,
    /// Stateless requests, if any.
    pub stateless: Option<StatelessSpec>,
    /// Whether calls stream (SSE with a usage chunk).
    pub stream: bool,
    /// Model name sent in each body.
    pub model: String,
}

/// What kind of caller made a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallKind {
    /// A step of a multi-agent workflow.
    Agent,
    /// A round of a multi-round QA user.
    Qa,
    /// A request with no context to share.
    Stateless,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// One LLM call of a workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Call {
    /// Index in [`Workload::calls`].
    pub id: usize,
    /// The workflow (or QA user) key; empty for stateless calls.
    pub workflow: String,
    /// Index of the workflow in the workload (`usize::MAX` for stateless calls).
    pub workflow_index: usize,
    /// Agent name (`planner`, `worker-3`, `aggregator`, `user`).
    pub agent: String,
    /// What made the call.
    pub kind: CallKind,
    /// The call whose output this one continues (lineage), if any.
    pub parent: Option<usize>,
    /// Calls that must finish before this one is sent.
    pub deps: Vec<usize>,
    /// Earliest send time after the start of the run, milliseconds.
    pub at_ms: u64,
    /// Pause after the last dependency finished, milliseconds.
    pub delay_ms: u64,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Output tokens asked for (`max_tokens`, with `ignore_eos`).
    pub max_tokens: usize,
    /// Whether the last call of its workflow (the client then says the workflow ended).
    pub last_of_workflow: bool,
}

/// A generated (or replayed) workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    /// The calls, in an order where every dependency comes first.
    pub calls: Vec<Call>,
    /// Number of workflows (and QA users).
    pub workflows: usize,
    /// Whether calls stream.
    pub stream: bool,
    /// Model name.
    pub model: String,
}

impl Workload {
    /// Tool time on each workflow's critical path: the longest chain of pauses through its
    /// dependency graph, milliseconds (parallel workers' pauses overlap and count once).
    pub fn critical_pause_ms(&self) -> Vec<u64> {
        let mut chain = vec![0u64; self.calls.len()];
        let mut out = vec![0u64; self.workflows];
        for c in &self.calls {
            let before = c.deps.iter().map(|&d| chain[d]).max().unwrap_or(0);
            chain[c.id] = before + c.delay_ms;
            if let Some(w) = out.get_mut(c.workflow_index) {
                *w = (*w).max(chain[c.id]);
            }
        }
        out
    }

    /// The calls grouped by workflow index (stateless calls are left out).
    pub fn calls_by_workflow(&self) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); self.workflows];
        for c in &self.calls {
            if let Some(v) = out.get_mut(c.workflow_index) {
                v.push(c.id);
            }
        }
        out
    }
}

/// A small deterministic generator (splitmix64): the same seed gives the same workload on
/// every machine and with every version of external crates.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    /// A generator derived from this seed and a stream number (independent sequences).
    pub fn fork(&self, stream: u64) -> Self {
        Self(crate::tokenizer::mix64(
            self.0 ^ stream.wrapping_mul(0xd1b5_4a32_d192_ed03),
        ))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        crate::tokenizer::mix64(self.0)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Exponential with the given mean.
    pub fn exponential(&mut self, mean: f64) -> f64 {
        if mean <= 0.0 {
            return 0.0;
        }
        -mean * (1.0 - self.uniform()).ln()
    }
}

/// Generates the workload of `spec`.
pub fn generate(spec: &Spec) -> Workload {
    let root = Rng::new(spec.seed);
    let mut calls: Vec<Call> = Vec::new();
    let mut workflows = 0;
    let system = text::Words::new(root.fork(1).next_u64());
    if let Some(w) = &spec.workflows {
        workflows += gen_workflows(w, &root, &system, workflows, &mut calls);
    }
    if let Some(q) = &spec.qa {
        workflows += gen_qa(q, &root, workflows, &mut calls);
    }
    if let Some(s) = &spec.stateless {
        gen_stateless(s, &root, &mut calls);
    }
    // Order by earliest possible start so the runner can walk the list; dependencies always
    // precede their dependents because they were pushed first and start no later.
    let mut order: Vec<usize> = (0..calls.len()).collect();
    order.sort_by_key(|&i| (calls[i].at_ms, i));
    let mut new_id = vec![0; calls.len()];
    for (new, &old) in order.iter().enumerate() {
        new_id[old] = new;
    }
    let mut sorted: Vec<Call> = order.iter().map(|&i| calls[i].clone()).collect();
    for c in &mut sorted {
        c.id = new_id[c.id];
        c.parent = c.parent.map(|p| new_id[p]);
        for d in &mut c.deps {
            *d = new_id[*d];
        }
    }
    Workload {
        calls: sorted,
        workflows,
        stream: spec.stream,
        model: spec.model.clone(),
    }
}

fn tokens(size: &Size, rng: &mut Rng) -> usize {
    size.sample(rng).round().max(1.0) as usize
}

/// Pushes a call and returns its id.
#[allow(clippy::too_many_arguments)]
fn push_call(
    calls: &mut Vec<Call>,
    workflow: (&str, usize),
    agent: String,
    kind: CallKind,
    parent: Option<usize>,
    deps: Vec<usize>,
    at_ms: u64,
    delay_ms: u64,
    messages: Vec<Message>,
    max_tokens: usize,
) -> usize {
    let id = calls.len();
    calls.push(Call {
        id,
        workflow: workflow.0.to_owned(),
        workflow_index: workflow.1,
        agent,
        kind,
        parent,
        deps,
        at_ms,
        delay_ms,
        messages,
        max_tokens,
        last_of_workflow: false,
    });
    id
}

fn msg(role: &str, content: String) -> Message {
    Message {
        role: role.to_owned(),
        content,
    }
}

fn gen_workflows(
    w: &WorkflowSpec,
    root: &Rng,
    system_words: &text::Words,
    first_index: usize,
    calls: &mut Vec<Call>,
) -> usize {
    let mut arrivals = root.fork(2);
    let system = system_words.clone().take(w.system_tokens);
    let mut start_ms = 0.0;
    for wi in 0..w.workflows {
        if wi > 0 {
            start_ms += arrivals.exponential(w.arrival_gap_ms);
        }
        let index = first_index + wi;
        let key = format!(
            "wf-{index:05}-{:08x}",
            root.fork(3 + index as u64).next_u64() as u32
        );
        let mut rng = root.fork(1_000 + index as u64);
        let mut source = text::Words::new(rng.next_u64());
        let mut context = source.take(tokens(&w.context, &mut rng));
        let at = start_ms as u64;
        let role_text = |agent: &str| -> String {
            // The same role text for an agent in every workflow (frameworks reuse prompts).
            text::Words::new(text::fnv(agent.as_bytes())).take(w.role_tokens)
        };
        let messages = |agent: &str, context: &str, task: &str| -> Vec<Message> {
            let role = role_text(agent);
            match w.order {
                ContextOrder::SystemFirst => vec![
                    msg("system", system.clone()),
                    msg("user", format!("{context}\n\n{role}\n{task}")),
                ],
                ContextOrder::RoleFirst => vec![
                    msg("system", format!("{role}\n{system}")),
                    msg("user", format!("{context}\n\n{task}")),
                ],
            }
        };
        let mut prev_agg: Option<usize> = None;
        for r in 0..w.rounds {
            let pause = |rng: &mut Rng| w.tool_pause_ms.sample(rng).round() as u64;
            let out = tokens(&w.planner_output, &mut rng);
            let planner = push_call(
                calls,
                (&key, index),
                "planner".to_owned(),
                CallKind::Agent,
                prev_agg,
                prev_agg.into_iter().collect(),
                at,
                if prev_agg.is_some() {
                    pause(&mut rng)
                } else {
                    0
                },
                messages(
                    "planner",
                    &context,
                    &format!("Round {r}: plan the next steps."),
                ),
                out,
            );
            let plan = source.take(out);
            let mut workers = Vec::with_capacity(w.agents);
            let mut results = String::new();
            for k in 0..w.agents {
                let out = tokens(&w.worker_output, &mut rng);
                let agent = format!("worker-{k}");
                workers.push(push_call(
                    calls,
                    (&key, index),
                    agent.clone(),
                    CallKind::Agent,
                    Some(planner),
                    vec![planner],
                    at,
                    pause(&mut rng),
                    messages(
                        &agent,
                        &format!("{context}\nPlan: {plan}"),
                        &format!("Do part {k} of the plan."),
                    ),
                    out,
                ));
                results.push_str(&format!("\nResult {k}: {}", source.take(out)));
            }
            let out = tokens(&w.aggregator_output, &mut rng);
            let agg = push_call(
                calls,
                (&key, index),
                "aggregator".to_owned(),
                CallKind::Agent,
                Some(planner),
                workers,
                at,
                pause(&mut rng),
                messages(
                    "aggregator",
                    &format!("{context}\nPlan: {plan}{results}"),
                    "Combine the results.",
                ),
                out,
            );
            context = format!(
                "{context}\nPlan: {plan}{results}\nSummary: {}",
                source.take(out)
            );
            prev_agg = Some(agg);
        }
        if let Some(last) = prev_agg {
            calls[last].last_of_workflow = true;
        }
    }
    w.workflows
}

fn gen_qa(q: &QaSpec, root: &Rng, first_index: usize, calls: &mut Vec<Call>) -> usize {
    let system = text::Words::new(root.fork(4).next_u64()).take(q.system_tokens);
    // Each user asks every users/qps seconds. Users join one after another, spread over one
    // session lifetime, as multi-round-qa.py ramps up to its steady state.
    let gap_ms = if q.qps > 0.0 {
        q.users as f64 / q.qps * 1000.0
    } else {
        0.0
    };
    let lifetime = gap_ms * q.rounds.saturating_sub(1) as f64;
    for u in 0..q.users {
        let index = first_index + u;
        let key = format!("user-{index:05}");
        let mut rng = root.fork(50_000 + index as u64);
        let mut source = text::Words::new(rng.next_u64());
        let history = source.take(q.history_tokens);
        let start = (u as f64 * lifetime / q.users.max(1) as f64) as u64;
        let mut prev: Option<usize> = None;
        let mut turns: Vec<Message> = Vec::new();
        for r in 0..q.rounds {
            let question = format!("Question #{r}: {}", source.take(q.question_tokens));
            let mut messages = vec![msg("system", format!("{system}\n{history}"))];
            messages.extend(turns.iter().cloned());
            messages.push(msg("user", question.clone()));
            let id = push_call(
                calls,
                (&key, index),
                "user".to_owned(),
                CallKind::Qa,
                prev,
                prev.into_iter().collect(),
                start + (r as f64 * gap_ms) as u64,
                0,
                messages,
                q.answer_tokens,
            );
            turns.push(msg("user", question));
            turns.push(msg("assistant", source.take(q.answer_tokens)));
            prev = Some(id);
        }
        if let Some(last) = prev {
            calls[last].last_of_workflow = true;
        }
    }
    q.users
}

fn gen_stateless(s: &StatelessSpec, root: &Rng, calls: &mut Vec<Call>) {
    let mut rng = root.fork(5);
    let mut at = 0.0;
    for _ in 0..s.requests {
        at += rng.exponential(s.gap_ms);
        let mut source = text::Words::new(rng.next_u64());
        let prompt = source.take(tokens(&s.prompt, &mut rng));
        let out = tokens(&s.output, &mut rng);
        push_call(
            calls,
            ("", usize::MAX),
            "stateless".to_owned(),
            CallKind::Stateless,
            None,
            Vec::new(),
            at as u64,
            0,
            vec![msg("user", prompt)],
            out,
        );
    }
}

#[cfg(test)]
mod tests;
