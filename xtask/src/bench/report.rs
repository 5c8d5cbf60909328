//! Results of `bench proxy`: one [`Record`] per (repeat, target, workload,
//! concurrency) run, summaries over repeats (median and min–max), the derived
//! comparisons (added latency against direct, agentlb's CPU per request and
//! throughput against nginx and vllm-router, each ratio taken within one repeat,
//! i.e. between runs made back to back) and their Markdown rendering.

use std::fmt::Write as _;

use serde::Serialize;

/// One measured run.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Repeat index (0-based).
    pub repeat: usize,
    /// `direct`, `agentlb`, `nginx` or `vllm-router`.
    pub target: String,
    /// `small` or `stream`.
    pub workload: String,
    /// Connections / requests in flight.
    pub concurrency: usize,
    /// Valid responses completed in the window.
    pub requests: u64,
    /// Failed requests in the window.
    pub errors: u64,
    /// Connections replaced after a server-side close.
    pub reconnects: u64,
    /// Window, seconds.
    pub secs: f64,
    /// Requests per second.
    pub rps: f64,
    /// Latency (start → last body byte) percentiles, µs.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Maximum, µs.
    pub max_us: f64,
    /// Time to first body bytes, median, µs.
    pub ttfb_p50_us: f64,
    /// Time to first body bytes, 99th percentile, µs.
    pub ttfb_p99_us: f64,
    /// Mean body frames received per response.
    pub frames_per_resp: f64,
    /// CPU of the proxy process tree per request, µs (none for direct).
    pub proxy_cpu_us_per_req: Option<f64>,
    /// Proxy CPU utilisation in the window, in cores (none for direct).
    pub proxy_cores: Option<f64>,
    /// CPU of the backend thread per request, µs.
    pub backend_cpu_us_per_req: f64,
    /// Busy CPU of the whole machine minus this process (load generator and
    /// backend) per request, µs: the proxy plus the kernel work done for it
    /// that no process is charged with (softirq, kworkers).
    pub path_cpu_us_per_req: f64,
    /// CPU of the load generator + backend (this process) in the window, cores.
    pub harness_cores: f64,
    /// Run-queue wait of the proxy's threads per second of window (none for direct).
    pub proxy_wait_frac: Option<f64>,
    /// Run-queue wait of the harness threads per second of window.
    pub harness_wait_frac: f64,
}

/// Median and range of one metric over repeats.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stat {
    /// Median.
    pub median: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
    /// Number of values.
    pub n: usize,
}

impl Stat {
    /// Summary of `values`; `None` when empty.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

/// Summary of one (workload, concurrency, target) cell.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Workload.
    pub workload: String,
    /// Concurrency.
    pub concurrency: usize,
    /// Target.
    pub target: String,
    /// Requests per second.
    pub rps: Option<Stat>,
    /// p50 latency, µs.
    pub p50_us: Option<Stat>,
    /// p99 latency, µs.
    pub p99_us: Option<Stat>,
    /// Time to first chunk p50, µs.
    pub ttfb_p50_us: Option<Stat>,
    /// Time to first chunk p99, µs.
    pub ttfb_p99_us: Option<Stat>,
    /// p50 minus direct's p50 in the same repeat, µs.
    pub added_p50_us: Option<Stat>,
    /// p99 minus direct's p99 in the same repeat, µs.
    pub added_p99_us: Option<Stat>,
    /// Proxy CPU per request, µs.
    pub proxy_cpu_us_per_req: Option<Stat>,
    /// Machine CPU outside the harness per request, µs.
    pub path_cpu_us_per_req: Option<Stat>,
    /// Proxy CPU utilisation, cores.
    pub proxy_cores: Option<Stat>,
    /// Body frames received per response.
    pub frames_per_resp: Option<Stat>,
    /// Load generator + backend CPU, cores.
    pub harness_cores: Option<Stat>,
    /// Proxy run-queue wait per second.
    pub proxy_wait_frac: Option<Stat>,
    /// Harness run-queue wait per second.
    pub harness_wait_frac: Option<Stat>,
    /// Total errors over repeats.
    pub errors: u64,
}

/// agentlb against one baseline proxy in one (workload, concurrency) cell.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// Workload.
    pub workload: String,
    /// Concurrency.
    pub concurrency: usize,
    /// The baseline (`nginx` or `vllm-router`).
    pub baseline: String,
    /// agentlb CPU per request / baseline's, same repeat.
    pub cpu_ratio: Option<Stat>,
    /// agentlb requests/s / baseline's, same repeat.
    pub rps_ratio: Option<Stat>,
    /// The target (vs nginx): median CPU ratio ≤ 1 and median rps ratio ≥ 1.
    pub target_met: Option<bool>,
    /// What bounded requests/s in most of the paired runs: `harness` (the load
    /// generator + backend core was saturated, so requests/s measures the
    /// harness), `proxy` (a proxy used all the CPU it may) or `latency`
    /// (neither: closed-loop round trips).
    pub bound: &'static str,
}

/// Share of a core (or of the cap) above which a process counts as saturated.
const SATURATED: f64 = 0.95;

/// What bounded requests/s in a pair of runs (see [`Ratio::bound`]); `cap` is
/// the CPU a proxy may use, in cores.
fn bound_of(a: &Record, b: &Record, cap: f64) -> &'static str {
    if a.harness_cores.max(b.harness_cores) >= SATURATED {
        "harness"
    } else if a
        .proxy_cores
        .unwrap_or(0.0)
        .max(b.proxy_cores.unwrap_or(0.0))
        >= SATURATED * cap
    {
        "proxy"
    } else {
        "latency"
    }
}

fn find<'a>(
    recs: &'a [Record],
    repeat: usize,
    target: &str,
    workload: &str,
    conc: usize,
) -> Option<&'a Record> {
    recs.iter().find(|r| {
        r.repeat == repeat && r.target == target && r.workload == workload && r.concurrency == conc
    })
}

fn cells(recs: &[Record]) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = Vec::new();
    for r in recs {
        let k = (r.workload.clone(), r.concurrency);
        if !out.contains(&k) {
            out.push(k);
        }
    }
    out
}

fn targets(recs: &[Record]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in recs {
        if !out.contains(&r.target) {
            out.push(r.target.clone());
        }
    }
    out
}

/// Summaries of every cell, in run order.
pub fn summarize(recs: &[Record]) -> Vec<Summary> {
    let mut out = Vec::new();
    for (wl, conc) in cells(recs) {
        for t in targets(recs) {
            let rs: Vec<&Record> = recs
                .iter()
                .filter(|r| r.workload == wl && r.concurrency == conc && r.target == t)
                .collect();
            if rs.is_empty() {
                continue;
            }
            let col = |f: &dyn Fn(&Record) -> Option<f64>| -> Option<Stat> {
                Stat::of(&rs.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
            };
            let added = |f: &dyn Fn(&Record) -> f64| -> Option<Stat> {
                if t == "direct" {
                    return None;
                }
                let v: Vec<f64> = rs
                    .iter()
                    .filter_map(|r| {
                        find(recs, r.repeat, "direct", &wl, conc)
                            .filter(|d| d.requests > 0 && r.requests > 0)
                            .map(|d| f(r) - f(d))
                    })
                    .collect();
                Stat::of(&v)
            };
            let ok = |r: &Record| r.requests > 0;
            out.push(Summary {
                workload: wl.clone(),
                concurrency: conc,
                target: t.clone(),
                rps: col(&|r| Some(r.rps)),
                p50_us: col(&|r| ok(r).then_some(r.p50_us)),
                p99_us: col(&|r| ok(r).then_some(r.p99_us)),
                ttfb_p50_us: col(&|r| ok(r).then_some(r.ttfb_p50_us)),
                ttfb_p99_us: col(&|r| ok(r).then_some(r.ttfb_p99_us)),
                added_p50_us: added(&|r| r.p50_us),
                added_p99_us: added(&|r| r.p99_us),
                proxy_cpu_us_per_req: col(&|r| r.proxy_cpu_us_per_req),
                path_cpu_us_per_req: col(&|r| ok(r).then_some(r.path_cpu_us_per_req)),
                proxy_cores: col(&|r| r.proxy_cores),
                frames_per_resp: col(&|r| ok(r).then_some(r.frames_per_resp)),
                harness_cores: col(&|r| Some(r.harness_cores)),
                proxy_wait_frac: col(&|r| r.proxy_wait_frac),
                harness_wait_frac: col(&|r| Some(r.harness_wait_frac)),
                errors: rs.iter().map(|r| r.errors).sum(),
            });
        }
    }
    out
}

/// agentlb against each baseline present, per cell; `cap`: the CPU each proxy
/// may use, in cores (1.0 when pinned to one core and not capped).
pub fn ratios(recs: &[Record], cap: f64) -> Vec<Ratio> {
    let repeats = recs.iter().map(|r| r.repeat + 1).max().unwrap_or(0);
    let mut out = Vec::new();
    for (wl, conc) in cells(recs) {
        for base in ["nginx", "vllm-router"] {
            let mut cpu = Vec::new();
            let mut rps = Vec::new();
            let mut bounds = Vec::new();
            for rep in 0..repeats {
                let (Some(a), Some(b)) = (
                    find(recs, rep, "agentlb", &wl, conc),
                    find(recs, rep, base, &wl, conc),
                ) else {
                    continue;
                };
                if let (Some(ca), Some(cb)) = (a.proxy_cpu_us_per_req, b.proxy_cpu_us_per_req)
                    && cb > 0.0
                {
                    cpu.push(ca / cb);
                }
                if b.rps > 0.0 {
                    rps.push(a.rps / b.rps);
                }
                bounds.push(bound_of(a, b, cap));
            }
            if cpu.is_empty() && rps.is_empty() {
                continue;
            }
            let cpu_ratio = Stat::of(&cpu);
            let rps_ratio = Stat::of(&rps);
            let target_met = match (base, cpu_ratio, rps_ratio) {
                ("nginx", Some(c), Some(r)) => Some(c.median <= 1.0 && r.median >= 1.0),
                _ => None,
            };
            out.push(Ratio {
                workload: wl.clone(),
                concurrency: conc,
                baseline: base.to_owned(),
                cpu_ratio,
                rps_ratio,
                target_met,
                bound: ["harness", "proxy", "latency"]
                    .into_iter()
                    .max_by_key(|k| bounds.iter().filter(|b| *b == k).count())
                    .unwrap_or("latency"),
            });
        }
    }
    out
}

fn fmt_stat(s: Option<Stat>, digits: usize) -> String {
    match s {
        None => "–".into(),
        Some(s) if s.n == 1 => format!("{:.*}", digits, s.median),
        Some(s) => format!(
            "{:.*} [{:.*}–{:.*}]",
            digits, s.median, digits, s.min, digits, s.max
        ),
    }
}

/// The Markdown report.
pub fn markdown(summaries: &[Summary], ratios: &[Ratio], notes: &[String]) -> String {
    let mut md = String::new();
    let mut workloads: Vec<&str> = Vec::new();
    for s in summaries {
        if !workloads.contains(&s.workload.as_str()) {
            workloads.push(&s.workload);
        }
    }
    for wl in workloads {
        let stream = wl == "stream";
        let _ = writeln!(
            md,
            "\n### {}\n",
            if stream {
                "Streaming responses (SSE)"
            } else {
                "Small non-streaming requests"
            }
        );
        let mut head = String::from(
            "| conc | target | req/s | p50 µs | p99 µs | added p50 µs | added p99 µs |",
        );
        let mut sep = String::from("|---:|---|---:|---:|---:|---:|---:|");
        if stream {
            head.push_str(" first chunk p50 µs | frames/resp |");
            sep.push_str("---:|---:|");
        }
        head.push_str(
            " proxy CPU µs/req | proxy + kernel CPU µs/req | proxy cores | client+backend cores | run-queue wait proxy / harness | errors |",
        );
        sep.push_str("---:|---:|---:|---:|---:|---:|");
        let _ = writeln!(md, "{head}\n{sep}");
        for s in summaries.iter().filter(|s| s.workload == wl) {
            let _ = write!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                s.concurrency,
                s.target,
                fmt_stat(s.rps, 0),
                fmt_stat(s.p50_us, 0),
                fmt_stat(s.p99_us, 0),
                fmt_stat(s.added_p50_us, 0),
                fmt_stat(s.added_p99_us, 0),
            );
            if stream {
                let _ = write!(
                    md,
                    " {} | {} |",
                    fmt_stat(s.ttfb_p50_us, 0),
                    fmt_stat(s.frames_per_resp, 0)
                );
            }
            let _ = writeln!(
                md,
                " {} | {} | {} | {} | {} / {} | {} |",
                fmt_stat(s.proxy_cpu_us_per_req, 1),
                fmt_stat(s.path_cpu_us_per_req, 1),
                fmt_stat(s.proxy_cores, 2),
                fmt_stat(s.harness_cores, 2),
                s.proxy_wait_frac
                    .map_or_else(|| "–".to_owned(), |w| format!("{:.2}", w.median)),
                s.harness_wait_frac
                    .map_or_else(|| "–".to_owned(), |w| format!("{:.2}", w.median)),
                s.errors
            );
        }
    }
    if !ratios.is_empty() {
        let _ = writeln!(
            md,
            "\n### agentlb against the baselines (ratio per repeat, then median [min–max])\n"
        );
        let _ = writeln!(
            md,
            "| workload | conc | baseline | CPU/req agentlb ÷ baseline | req/s agentlb ÷ baseline | req/s bound by | target met |\n|---|---:|---|---:|---:|---|---|"
        );
        for r in ratios {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.workload,
                r.concurrency,
                r.baseline,
                fmt_stat(r.cpu_ratio, 2),
                fmt_stat(r.rps_ratio, 2),
                r.bound,
                match r.target_met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "–",
                }
            );
        }
    }
    if !notes.is_empty() {
        md.push('\n');
        for n in notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(repeat: usize, target: &str, rps: f64, p50: f64, cpu: Option<f64>) -> Record {
        Record {
            repeat,
            target: target.into(),
            workload: "small".into(),
            concurrency: 1,
            requests: 100,
            errors: 0,
            reconnects: 0,
            secs: 1.0,
            rps,
            p50_us: p50,
            p90_us: p50,
            p99_us: p50,
            max_us: p50,
            ttfb_p50_us: p50,
            ttfb_p99_us: p50,
            frames_per_resp: 1.0,
            proxy_cpu_us_per_req: cpu,
            proxy_cores: cpu.map(|_| 0.5),
            backend_cpu_us_per_req: 1.0,
            path_cpu_us_per_req: 1.0,
            harness_cores: 1.0,
            proxy_wait_frac: cpu.map(|_| 0.0),
            harness_wait_frac: 0.0,
        }
    }

    #[test]
    fn stat_median_even_and_odd() {
        let s = Stat::of(&[3.0, 1.0, 2.0]).expect("values");
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Stat::of(&[4.0, 1.0, 2.0, 3.0]).expect("values");
        assert_eq!(s.median, 2.5);
        assert!(Stat::of(&[]).is_none());
    }

    #[test]
    fn added_latency_and_ratios_use_the_same_repeat() {
        let recs = vec![
            rec(0, "direct", 1000.0, 100.0, None),
            rec(0, "agentlb", 800.0, 150.0, Some(10.0)),
            rec(0, "nginx", 400.0, 180.0, Some(20.0)),
            rec(1, "direct", 1000.0, 200.0, None),
            rec(1, "agentlb", 800.0, 230.0, Some(10.0)),
            rec(1, "nginx", 400.0, 260.0, Some(20.0)),
        ];
        let s = summarize(&recs);
        let a = s.iter().find(|s| s.target == "agentlb").expect("agentlb");
        let added = a.added_p50_us.expect("added");
        assert_eq!((added.min, added.max), (30.0, 50.0));
        let r = ratios(&recs, 1.0);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].bound, "harness");
        assert_eq!(r[0].cpu_ratio.expect("cpu").median, 0.5);
        assert_eq!(r[0].rps_ratio.expect("rps").median, 2.0);
        assert_eq!(r[0].target_met, Some(true));
        let md = markdown(&s, &r, &[]);
        assert!(md.contains("| 1 | agentlb |"));
        assert!(md.contains("| harness | yes |"));
    }

    #[test]
    fn bound_names_the_saturated_side() {
        let mut a = rec(0, "agentlb", 800.0, 150.0, Some(10.0));
        let mut b = rec(0, "nginx", 400.0, 180.0, Some(20.0));
        a.harness_cores = 0.6;
        b.harness_cores = 0.7;
        // Proxies at 0.5 cores: saturated under a 0.5 cap, not on a whole core.
        assert_eq!(bound_of(&a, &b, 0.5), "proxy");
        assert_eq!(bound_of(&a, &b, 1.0), "latency");
        b.harness_cores = 0.96;
        assert_eq!(bound_of(&a, &b, 0.5), "harness");
    }
}
