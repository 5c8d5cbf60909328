//! Metrics of one run: hit rate (backends' own accounting), TTFT and ITL percentiles,
//! workflow completion times, per-backend load and imbalance, errors by kind.
//!
//! Latencies are reported in simulated seconds (wall × time scale), the unit the
//! simulator's latency model speaks; a router's own overhead is scaled alike.

use std::collections::BTreeMap;

use lb_sim::workload::Workload;
use serde::Serialize;

use super::client::CallResult;

/// Per-backend numbers from the instances' `/metrics`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BackendLoad {
    /// Finished requests.
    pub requests: f64,
    /// Prompt tokens.
    pub prompt_tokens: f64,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: f64,
    /// Mean KV cache usage over the run's samples (0..1).
    pub kv_usage_mean: f64,
    /// Peak KV cache usage (0..1).
    pub kv_usage_peak: f64,
    /// Largest simulator clock lag seen, seconds (simulator saturation).
    pub clock_lag_max: f64,
    /// Whether its counters could be read at the end (a failed instance's cannot).
    pub counted: bool,
}

/// Percentiles of a sample.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Pcts {
    /// Number of values.
    pub n: usize,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl Pcts {
    /// Percentiles by the nearest-rank method (NaN-free input expected).
    pub fn of(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Self {
            n: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: rank(0.50),
            p95: rank(0.95),
            p99: rank(0.99),
        }
    }
}

/// Everything reported about one run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Calls sent.
    pub calls: usize,
    /// Calls that failed, by kind.
    pub errors: BTreeMap<String, usize>,
    /// Σ cached_tokens / Σ prompt_tokens over successful calls (from their `usage`).
    pub hit_rate: f64,
    /// Hit rate ÷ the oracle's hit rate.
    pub hit_of_oracle: f64,
    /// The backends' counters: prefix cache hits ÷ queries summed over instances.
    pub backend_hit_rate: f64,
    /// Time to first token, simulated seconds.
    pub ttft: Pcts,
    /// Inter-token latency per call, simulated seconds.
    pub itl: Pcts,
    /// Workflow completion time (first call sent to last token), simulated seconds.
    pub completion: Pcts,
    /// Tool time on each workflow's critical path, simulated seconds.
    pub tool_time: Pcts,
    /// Requests per backend, max ÷ mean.
    pub request_imbalance: f64,
    /// Mean KV usage per backend, max ÷ mean.
    pub kv_imbalance: f64,
    /// Per-backend numbers.
    pub backends: Vec<BackendLoad>,
    /// Router CPU seconds (all its processes, all replicas).
    pub router_cpu_s: f64,
    /// Router peak RSS, MiB (sum over its processes and replicas).
    pub router_rss_mib: f64,
    /// Run length, wall seconds.
    pub wall_s: f64,
}

/// max ÷ mean of some values (1 = perfectly even; 0 when all are 0).
pub fn imbalance(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let max = values.iter().copied().fold(0.0, f64::max);
    if mean <= 0.0 { 0.0 } else { max / mean }
}

/// Computes a run's summary; `oracle_hit` is the oracle's hit rate for the workload.
pub fn summarize(
    w: &Workload,
    results: &[CallResult],
    backends: Vec<BackendLoad>,
    time_scale: f64,
    oracle_hit: f64,
) -> Summary {
    let mut s = Summary {
        calls: results.len(),
        ..Summary::default()
    };
    let (mut prompt, mut cached) = (0u64, 0u64);
    let mut ttft = Vec::new();
    let mut itl = Vec::new();
    for r in results {
        if let Some(e) = &r.error {
            *s.errors.entry(e.clone()).or_default() += 1;
            continue;
        }
        prompt += r.prompt_tokens;
        cached += r.cached_tokens;
        if let Some(t) = r.ttft {
            ttft.push(t * time_scale);
            if r.completion_tokens > 1 {
                itl.push((r.e2e - t) * time_scale / (r.completion_tokens - 1) as f64);
            }
        }
    }
    s.hit_rate = if prompt == 0 {
        0.0
    } else {
        cached as f64 / prompt as f64
    };
    s.hit_of_oracle = if oracle_hit > 0.0 {
        s.hit_rate / oracle_hit
    } else {
        0.0
    };
    s.ttft = Pcts::of(&ttft);
    s.itl = Pcts::of(&itl);
    // Workflow completion: first send to last end, over workflows whose calls all succeeded.
    let mut first = vec![f64::INFINITY; w.workflows];
    let mut last = vec![0.0_f64; w.workflows];
    let mut failed = vec![false; w.workflows];
    for r in results {
        let Some(c) = w.calls.get(r.id) else { continue };
        let Some(wi) = (c.workflow_index < w.workflows).then_some(c.workflow_index) else {
            continue;
        };
        failed[wi] |= r.error.is_some();
        first[wi] = first[wi].min(r.start);
        last[wi] = last[wi].max(r.start + r.e2e);
    }
    let completion: Vec<f64> = (0..w.workflows)
        .filter(|&i| !failed[i] && first[i].is_finite())
        .map(|i| (last[i] - first[i]) * time_scale)
        .collect();
    s.completion = Pcts::of(&completion);
    let tool: Vec<f64> = w
        .critical_pause_ms()
        .iter()
        .map(|&ms| ms as f64 / 1000.0)
        .collect();
    s.tool_time = Pcts::of(&tool);
    // Every successful call must have been served by a backend of this run: a router that
    // answered on its own (or to another cluster) is not a result.
    let ok = results.iter().filter(|r| r.error.is_none()).count();
    let served: f64 = backends.iter().map(|b| b.requests).sum();
    if backends.iter().all(|b| b.counted) && (served.round() as usize) < ok {
        s.errors.insert(
            "not_seen_by_backends".to_owned(),
            ok - served.round() as usize,
        );
    }
    let q: f64 = backends.iter().map(|b| b.prompt_tokens).sum();
    let h: f64 = backends.iter().map(|b| b.cached_tokens).sum();
    s.backend_hit_rate = if q > 0.0 { h / q } else { 0.0 };
    let reqs: Vec<f64> = backends.iter().map(|b| b.requests).collect();
    let kv: Vec<f64> = backends.iter().map(|b| b.kv_usage_mean).collect();
    s.request_imbalance = imbalance(&reqs);
    s.kv_imbalance = imbalance(&kv);
    s.backends = backends;
    s
}

/// Sums the samples of `name` in a Prometheus text page (every label set).
pub fn prom_sum(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_sim::workload::{Call, CallKind, Message};

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Pcts::of(&v);
        assert_eq!((p.n, p.p50, p.p95, p.p99), (100, 50.0, 95.0, 99.0));
        assert!((p.mean - 50.5).abs() < 1e-12);
        assert_eq!(Pcts::of(&[f64::NAN, 3.0]).p99, 3.0);
        assert_eq!(Pcts::of(&[]), Pcts::default());
    }

    #[test]
    fn imbalance_is_max_over_mean() {
        assert_eq!(imbalance(&[1.0, 1.0, 1.0, 1.0]), 1.0);
        assert_eq!(imbalance(&[4.0, 0.0, 0.0, 0.0]), 4.0);
        assert_eq!(imbalance(&[0.0, 0.0]), 0.0);
    }

    #[test]
    fn prometheus_sums_over_labels_and_not_prefixes() {
        let page = "# TYPE vllm:prompt_tokens_total counter\nvllm:prompt_tokens_total{engine=\"0\"} 10\nvllm:prompt_tokens_total{engine=\"1\"} 5.5\nvllm:prompt_tokens_cached_total{engine=\"0\"} 99\nvllm:x 1\n";
        assert_eq!(prom_sum(page, "vllm:prompt_tokens_total"), 15.5);
        assert_eq!(prom_sum(page, "vllm:x"), 1.0);
    }

    fn call(id: usize, wf: usize, deps: Vec<usize>, delay_ms: u64) -> Call {
        Call {
            id,
            workflow: format!("w{wf}"),
            workflow_index: wf,
            agent: "a".to_owned(),
            kind: CallKind::Agent,
            parent: deps.first().copied(),
            deps,
            at_ms: 0,
            delay_ms,
            messages: vec![Message {
                role: "user".to_owned(),
                content: "x".to_owned(),
            }],
            max_tokens: 4,
            last_of_workflow: false,
        }
    }

    fn ok(id: usize, start: f64, ttft: f64, e2e: f64, prompt: u64, cached: u64) -> CallResult {
        CallResult {
            id,
            start,
            ttft: Some(ttft),
            e2e,
            status: 200,
            prompt_tokens: prompt,
            cached_tokens: cached,
            completion_tokens: 5,
            ..CallResult::default()
        }
    }

    #[test]
    fn summary_of_a_hand_made_run() {
        let w = Workload {
            calls: vec![
                call(0, 0, vec![], 0),
                call(1, 0, vec![0], 500),
                call(2, 1, vec![], 0),
            ],
            workflows: 2,
            stream: true,
            model: "m".to_owned(),
        };
        let results = vec![
            ok(0, 0.0, 0.1, 0.5, 100, 0),
            ok(1, 1.0, 0.05, 0.25, 200, 150),
            CallResult {
                id: 2,
                error: Some("http_502".to_owned()),
                status: 502,
                ..CallResult::default()
            },
        ];
        let backends = vec![
            BackendLoad {
                requests: 3.0,
                kv_usage_mean: 0.2,
                prompt_tokens: 300.0,
                cached_tokens: 150.0,
                ..BackendLoad::default()
            },
            BackendLoad {
                requests: 1.0,
                kv_usage_mean: 0.2,
                ..BackendLoad::default()
            },
        ];
        let s = summarize(&w, &results, backends, 2.0, 0.75);
        assert_eq!(s.errors.get("http_502"), Some(&1));
        assert!((s.hit_rate - 0.5).abs() < 1e-12, "{}", s.hit_rate);
        assert!((s.hit_of_oracle - 0.5 / 0.75).abs() < 1e-12);
        assert!((s.backend_hit_rate - 0.5).abs() < 1e-12);
        // TTFTs scaled by 2: 0.2 and 0.1.
        assert_eq!(s.ttft.n, 2);
        assert!((s.ttft.p99 - 0.2).abs() < 1e-12);
        // ITL of call 0: (0.5 - 0.1) × 2 / 4 = 0.2.
        assert!((s.itl.p99 - 0.2).abs() < 1e-12);
        // Workflow 0: from 0.0 to 1.25 wall = 2.5 simulated; workflow 1 failed and is left out.
        assert_eq!(s.completion.n, 1);
        assert!((s.completion.mean - 2.5).abs() < 1e-12);
        assert_eq!(s.tool_time.p99, 0.5);
        assert!((s.request_imbalance - 1.5).abs() < 1e-12);
        assert!((s.kv_imbalance - 1.0).abs() < 1e-12);
        // Backends that saw fewer requests than the client got answers: flagged.
        let few = vec![BackendLoad {
            requests: 1.0,
            counted: true,
            ..BackendLoad::default()
        }];
        let s = summarize(&w, &results, few, 1.0, 0.75);
        assert_eq!(s.errors.get("not_seen_by_backends"), Some(&1));
    }
}
