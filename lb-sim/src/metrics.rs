//! Prometheus metrics in vLLM 0.33's names, labels and buckets, rendered as text format 0.0.4.
//!
//! Hand-rendered rather than through `prometheus-client`: that crate writes OpenMetrics
//! (`# EOF`, counter families without `_total`), while routers scrape vLLM's
//! `prometheus_client` (Python) text output, where a counter family is declared as
//! `# TYPE vllm:x_total counter`. Values live inside each engine (under its lock), so updates
//! cost a few adds and rendering happens only on scrape.

use std::fmt::Write as _;

/// `vllm:time_to_first_token_seconds` buckets.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// `vllm:inter_token_latency_seconds` buckets.
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// `vllm:e2e_request_latency_seconds` (and queue time) buckets.
pub const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// A fixed-bucket histogram.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// An empty histogram with the given upper bounds.
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one observation.
    pub fn observe(&mut self, v: f64) {
        let i = self.bounds.partition_point(|&b| b < v);
        if i < self.counts.len() {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of observations.
    pub fn sum(&self) -> f64 {
        self.sum
    }
}

/// Counters and histograms of one engine.
#[derive(Debug, Clone)]
pub struct EngineMetrics {
    /// Tokens looked up in the prefix cache.
    pub prefix_cache_queries: u64,
    /// Tokens found in the prefix cache.
    pub prefix_cache_hits: u64,
    /// Prompt tokens of requests whose prefill finished.
    pub prompt_tokens: u64,
    /// Prompt tokens served from the prefix cache.
    pub prompt_tokens_cached: u64,
    /// Generated tokens.
    pub generation_tokens: u64,
    /// Preemptions.
    pub num_preemptions: u64,
    /// Finished requests by reason: stop, length, abort.
    pub success_stop: u64,
    /// Finished with reason `length`.
    pub success_length: u64,
    /// Aborted requests.
    pub success_abort: u64,
    /// TTFT histogram.
    pub ttft: Histogram,
    /// Inter-token latency histogram.
    pub itl: Histogram,
    /// End-to-end latency histogram.
    pub e2e: Histogram,
    /// Queue time histogram.
    pub queue: Histogram,
    /// Engine steps executed.
    pub steps: u64,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self {
            prefix_cache_queries: 0,
            prefix_cache_hits: 0,
            prompt_tokens: 0,
            prompt_tokens_cached: 0,
            generation_tokens: 0,
            num_preemptions: 0,
            success_stop: 0,
            success_length: 0,
            success_abort: 0,
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
            queue: Histogram::new(E2E_BUCKETS),
            steps: 0,
        }
    }
}

/// Point-in-time gauges of one engine.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// Running sequences.
    pub running: usize,
    /// Waiting sequences.
    pub waiting: usize,
    /// KV usage 0..1.
    pub kv_usage: f64,
    /// Wall seconds the last engine step was applied after its scheduled time.
    pub clock_lag: f64,
}

fn fmt_f(v: f64) -> String {
    // Python prometheus_client prints floats with repr(): 1.0, 0.25, 1e-05.
    if v.is_infinite() {
        return if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
    }
    if v == v.trunc() && v.abs() < 1e16 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the metrics text of one instance; `cache` is (block size, GPU blocks).
pub fn render(
    model: &str,
    engine_idx: usize,
    g: &Gauges,
    m: &EngineMetrics,
    cache: Option<(usize, usize)>,
) -> String {
    let labels = format!(
        "engine=\"{engine_idx}\",model_name=\"{}\"",
        escape_label(model)
    );
    let mut out = String::with_capacity(8192);
    let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(out, "{name}{{{labels}}} {}", fmt_f(v));
    };
    let counter = |out: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(out, "# HELP {name}_total {help}");
        let _ = writeln!(out, "# TYPE {name}_total counter");
        let _ = writeln!(out, "{name}_total{{{labels}}} {}", fmt_f(v as f64));
    };
    let hist = |out: &mut String, name: &str, help: &str, h: &Histogram| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cum = 0u64;
        for (b, c) in h.bounds.iter().zip(&h.counts) {
            cum += c;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{}\"}} {}",
                fmt_f(*b),
                fmt_f(cum as f64)
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels},le=\"+Inf\"}} {}",
            fmt_f(h.count as f64)
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", fmt_f(h.count as f64));
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", fmt_f(h.sum));
    };
    gauge(
        &mut out,
        "vllm:num_requests_running",
        "Number of requests in model execution batches.",
        g.running as f64,
    );
    gauge(
        &mut out,
        "vllm:num_requests_waiting",
        "Number of requests waiting to be processed.",
        g.waiting as f64,
    );
    gauge(
        &mut out,
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        g.kv_usage,
    );
    // vLLM's cache configuration as an info gauge: value 1, the settings as labels.
    if let Some((block_size, blocks)) = cache {
        let _ = writeln!(
            out,
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig"
        );
        let _ = writeln!(out, "# TYPE vllm:cache_config_info gauge");
        let _ = writeln!(
            out,
            "vllm:cache_config_info{{block_size=\"{block_size}\",enable_prefix_caching=\"True\",num_gpu_blocks=\"{blocks}\",{labels}}} 1.0"
        );
    }
    gauge(
        &mut out,
        "vllm_sim:clock_lag_seconds",
        "vllm-sim only: wall seconds the last engine step ran late (simulator saturation).",
        g.clock_lag,
    );
    counter(
        &mut out,
        "vllm:prefix_cache_queries",
        "Prefix cache queries, in terms of number of queried tokens.",
        m.prefix_cache_queries,
    );
    counter(
        &mut out,
        "vllm:prefix_cache_hits",
        "Prefix cache hits, in terms of number of cached tokens.",
        m.prefix_cache_hits,
    );
    counter(
        &mut out,
        "vllm:num_preemptions",
        "Cumulative number of preemption from the engine.",
        m.num_preemptions,
    );
    counter(
        &mut out,
        "vllm:prompt_tokens",
        "Number of prefill tokens processed.",
        m.prompt_tokens,
    );
    counter(
        &mut out,
        "vllm:prompt_tokens_cached",
        "Number of cached prompt tokens (local prefix cache hits).",
        m.prompt_tokens_cached,
    );
    counter(
        &mut out,
        "vllm:generation_tokens",
        "Number of generation tokens processed.",
        m.generation_tokens,
    );
    let _ = writeln!(
        out,
        "# HELP vllm:request_success_total Count of successfully processed requests."
    );
    let _ = writeln!(out, "# TYPE vllm:request_success_total counter");
    for (reason, v) in [
        ("stop", m.success_stop),
        ("length", m.success_length),
        ("abort", m.success_abort),
    ] {
        let _ = writeln!(
            out,
            "vllm:request_success_total{{{labels},finished_reason=\"{reason}\"}} {}",
            fmt_f(v as f64)
        );
    }
    hist(
        &mut out,
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &m.ttft,
    );
    hist(
        &mut out,
        "vllm:inter_token_latency_seconds",
        "Histogram of inter-token latency in seconds.",
        &m.itl,
    );
    hist(
        &mut out,
        "vllm:e2e_request_latency_seconds",
        "Histogram of e2e request latency in seconds.",
        &m.e2e,
    );
    hist(
        &mut out,
        "vllm:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
        &m.queue,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::new(TTFT_BUCKETS);
        h.observe(0.001); // le 0.001 inclusive
        h.observe(0.03);
        h.observe(1e6);
        let m = EngineMetrics {
            ttft: h,
            ..EngineMetrics::default()
        };
        let text = render("m", 0, &Gauges::default(), &m, Some((16, 1000)));
        assert!(text.contains("vllm:cache_config_info{block_size=\"16\",enable_prefix_caching=\"True\",num_gpu_blocks=\"1000\""));
        assert!(text.contains(
            "vllm:time_to_first_token_seconds_bucket{engine=\"0\",model_name=\"m\",le=\"0.001\"} 1.0"
        ));
        assert!(text.contains(
            "vllm:time_to_first_token_seconds_bucket{engine=\"0\",model_name=\"m\",le=\"0.04\"} 2.0"
        ));
        assert!(text.contains(
            "vllm:time_to_first_token_seconds_bucket{engine=\"0\",model_name=\"m\",le=\"+Inf\"} 3.0"
        ));
        assert!(text.contains("# TYPE vllm:prefix_cache_hits_total counter"));
    }
}
