//! Named scenarios of the agentic benchmark: a workload, the simulated cluster it runs on and
//! the cluster's KV capacity, set from the preset's KV demand ÷ capacity ratio.
//!
//! Times are in simulated milliseconds; the benchmark divides them by the time scale.

use serde::Serialize;

use super::{ContextOrder, IdMode, QaSpec, Size, Spec, StatelessSpec, WorkflowSpec};

/// A backend that fails during the run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Failure {
    /// Instance index.
    pub instance: usize,
    /// When, as a fraction of the run's expected length (0..1).
    pub at_fraction: f64,
}

/// The simulated cluster of a preset.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cluster {
    /// vLLM instances.
    pub instances: usize,
    /// KV demand of the workload ÷ the cluster's KV capacity; sets `num_gpu_blocks`.
    pub demand_ratio: f64,
    /// Simulated seconds per wall-clock second.
    pub time_scale: f64,
    /// Tokens per SSE event (the simulator's `--stream-interval`; TTFT is unchanged).
    pub stream_interval: usize,
    /// A backend failing mid-run, if any.
    pub failure: Option<Failure>,
}

/// A named scenario.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Preset {
    /// Name used on the command line.
    pub name: &'static str,
    /// One line on what it shows.
    pub about: &'static str,
    /// Whether it is one of the hard presets (where routers differ most).
    pub hard: bool,
    /// The workload.
    pub spec: Spec,
    /// The cluster.
    pub cluster: Cluster,
    /// When set, every router gets these ids instead of its best (`none`: clients send none).
    pub force_ids: Option<IdMode>,
}

/// Every preset name, in the order `--preset all` runs them.
pub const NAMES: &[&str] = &[
    "workflows",
    "one-workflow",
    "mixed",
    "scale",
    "prodstack-qa",
    "hetero-tight",
    "small-pools",
    "long-pauses",
    "failure",
    "no-ids",
];

/// The presets run when none is named: the standard case and three hard ones.
pub const DEFAULTS: &[&str] = &["workflows", "hetero-tight", "no-ids"];

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

fn base_workflows(n: usize) -> WorkflowSpec {
    WorkflowSpec {
        workflows: n,
        agents: 3,
        rounds: 3,
        system_tokens: 1500,
        context: Size::lognormal(6000.0, 0.6),
        role_tokens: 100,
        planner_output: Size::fixed(96.0),
        worker_output: Size::lognormal(128.0, 0.3),
        aggregator_output: Size::fixed(96.0),
        tool_pause_ms: Size::lognormal(1000.0, 0.8),
        arrival_gap_ms: 400.0,
        order: ContextOrder::SystemFirst,
    }
}

fn spec(seed: u64, workflows: Option<WorkflowSpec>) -> Spec {
    Spec {
        seed,
        workflows,
        qa: None,
        stateless: None,
        stream: true,
        model: MODEL.to_owned(),
    }
}

/// The preset's workflow parameters (created when it has none).
fn wf(spec: &mut Spec) -> &mut WorkflowSpec {
    spec.workflows.get_or_insert_with(|| base_workflows(1))
}

fn cluster(instances: usize, demand_ratio: f64) -> Cluster {
    Cluster {
        instances,
        demand_ratio,
        time_scale: 4.0,
        stream_interval: 4,
        failure: None,
    }
}

/// The preset `name`; `quick` shrinks it (fewer workflows) to run in seconds.
pub fn preset(name: &str, seed: u64, quick: bool) -> Option<Preset> {
    let q = |full: usize, small: usize| if quick { small } else { full };
    let mut p = Preset {
        name: "",
        about: "",
        hard: false,
        spec: spec(seed, Some(base_workflows(q(32, 12)))),
        cluster: cluster(4, 0.6),
        force_ids: None,
    };
    match name {
        "workflows" => {
            p.name = "workflows";
            p.about = "many concurrent multi-agent workflows (planner, 3 workers, aggregator, 3 rounds) on 4 instances";
        }
        "one-workflow" => {
            p.name = "one-workflow";
            p.about = "one workflow with 16 parallel agents over a 4,000-token context, 4 rounds";
            let w = wf(&mut p.spec);
            w.workflows = 1;
            w.agents = q(16, 8);
            w.rounds = q(4, 2);
            w.context = Size::fixed(4000.0);
        }
        "mixed" => {
            p.name = "mixed";
            p.about = "workflows plus stateless requests (about as many calls)";
            wf(&mut p.spec).workflows = q(16, 6);
            p.spec.stateless = Some(StatelessSpec {
                requests: q(240, 80),
                prompt: Size::lognormal(400.0, 0.6),
                output: Size::fixed(64.0),
                gap_ms: 120.0,
            });
        }
        "scale" => {
            p.name = "scale";
            p.about = "32 instances, 96 workflows arriving 4x faster";
            p.cluster.instances = q(32, 16);
            let w = wf(&mut p.spec);
            w.workflows = q(96, 32);
            w.arrival_gap_ms = 150.0;
        }
        "prodstack-qa" => {
            p.name = "prodstack-qa";
            p.about = "vLLM production-stack multi-round QA (run.sh: 320 users, 10 rounds, 1,000 system, 20,000 history, 100 answer)";
            p.spec.workflows = None;
            p.spec.qa = Some(QaSpec {
                users: q(320, 16),
                rounds: q(10, 3),
                system_tokens: 1000,
                history_tokens: q(20_000, 4000),
                answer_tokens: 100,
                question_tokens: 50,
                qps: q(2, 2) as f64,
            });
            p.cluster = Cluster {
                time_scale: 8.0,
                ..cluster(8, 1.2)
            };
        }
        "hetero-tight" => {
            p.name = "hetero-tight";
            p.about = "heterogeneous contexts (lognormal σ 1.2) with KV demand at 95% of capacity";
            p.hard = true;
            let w = wf(&mut p.spec);
            w.context = Size::lognormal(6000.0, 1.2);
            p.cluster.demand_ratio = 0.95;
        }
        "small-pools" => {
            p.name = "small-pools";
            p.about = "8 instances with small KV pools (demand 90% of capacity)";
            p.hard = true;
            p.cluster = cluster(8, 0.9);
            let w = wf(&mut p.spec);
            w.workflows = q(48, 16);
            w.arrival_gap_ms = 400.0;
        }
        "long-pauses" => {
            p.name = "long-pauses";
            p.about = "tool pauses of ~8 s with KV demand above capacity: contexts are evicted while agents wait";
            p.hard = true;
            let w = wf(&mut p.spec);
            w.tool_pause_ms = Size::lognormal(8000.0, 0.5);
            w.arrival_gap_ms = 300.0;
            p.cluster = Cluster {
                time_scale: 8.0,
                ..cluster(4, 1.5)
            };
        }
        "failure" => {
            p.name = "failure";
            p.about = "the workflows preset with instance 1 dying at 40% of the run";
            p.hard = true;
            p.cluster.failure = Some(Failure {
                instance: 1,
                at_fraction: 0.4,
            });
        }
        "no-ids" => {
            p.name = "no-ids";
            p.about = "the workflows preset with clients that send no ids at all";
            p.hard = true;
            p.force_ids = Some(IdMode::None);
        }
        _ => return None,
    }
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_resolves() {
        for n in NAMES {
            let p = preset(n, 1, false).expect(n);
            assert_eq!(&p.name, n);
            assert!(!p.about.is_empty());
            let q = preset(n, 1, true).expect(n);
            let calls = |p: &Preset| super::super::generate(&p.spec).calls.len();
            assert!(calls(&q) <= calls(&p), "{n}: quick is not smaller");
        }
        for n in DEFAULTS {
            assert!(NAMES.contains(n));
        }
        assert!(preset("nope", 1, false).is_none());
    }

    fn calls(name: &str) -> (Preset, crate::workload::Workload) {
        let p = preset(name, 7, false).expect(name);
        let w = crate::workload::generate(&p.spec);
        (p, w)
    }

    #[test]
    fn each_preset_has_its_shape() {
        use crate::workload::CallKind;
        let (p, w) = calls("workflows");
        assert_eq!((w.workflows, w.calls.len()), (32, 32 * 3 * 5));
        assert_eq!(p.cluster.instances, 4);
        assert!(p.force_ids.is_none() && p.cluster.failure.is_none());

        let (_, w) = calls("one-workflow");
        assert_eq!(w.workflows, 1);
        assert_eq!(
            w.calls
                .iter()
                .filter(|c| c.agent.starts_with("worker"))
                .count(),
            16 * 4
        );

        let (_, w) = calls("mixed");
        let stateless = w
            .calls
            .iter()
            .filter(|c| c.kind == CallKind::Stateless)
            .count();
        assert_eq!((w.workflows, stateless), (16, 240));

        let (p, _) = calls("scale");
        assert_eq!(p.cluster.instances, 32);

        let (p, w) = calls("prodstack-qa");
        assert!(w.calls.iter().all(|c| c.kind == CallKind::Qa));
        assert_eq!(w.calls.len(), 320 * 10);
        assert_eq!(p.cluster.instances, 8);

        let (p, _) = calls("hetero-tight");
        assert!(p.hard && p.cluster.demand_ratio > 0.9);
        assert!(
            p.spec
                .workflows
                .as_ref()
                .is_some_and(|w| w.context.sigma >= 1.0)
        );

        let (p, _) = calls("small-pools");
        assert_eq!(p.cluster.instances, 8);

        let (p, w) = calls("long-pauses");
        assert!(p.cluster.demand_ratio > 1.0);
        let mean_pause = w.calls.iter().map(|c| c.delay_ms as f64).sum::<f64>()
            / w.calls.iter().filter(|c| c.delay_ms > 0).count() as f64;
        assert!(mean_pause > 5000.0, "{mean_pause}");

        let (p, _) = calls("failure");
        assert!(
            p.cluster
                .failure
                .is_some_and(|f| f.instance < p.cluster.instances)
        );

        let (p, _) = calls("no-ids");
        assert_eq!(p.force_ids, Some(IdMode::None));
    }
}
