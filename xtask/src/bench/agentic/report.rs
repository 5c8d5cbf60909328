//! The agentic benchmark's report: `RESULTS.md` (settings, one table per preset, plots),
//! `results.json` (every number) and SVG plots, all in one directory.

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path};

use anyhow::{Context, Result};
use serde_json::json;

use super::{PresetRecord, RunRecord};
use crate::bench::{
    plots::{self, Series},
    report::Stat,
};

/// Facts about the whole run.
pub struct Meta {
    /// UTC date.
    pub date: String,
    /// CPU, cores, kernel.
    pub machine: String,
    /// Generator seed.
    pub seed: u64,
    /// `--quick`.
    pub quick: bool,
    /// Wall time of the benchmark.
    pub elapsed_s: f64,
    /// Skipped parts and why.
    pub notes: Vec<String>,
    /// The command line.
    pub command: String,
}

/// Today's UTC date (`YYYY-MM-DD`).
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Whether a run counts: it ran and no call failed.
pub fn valid(r: &RunRecord) -> bool {
    r.skipped.is_none() && r.summary.errors.is_empty() && r.summary.calls > 0
}

fn label(r: &RunRecord) -> String {
    if r.replicas == 1 {
        r.router.clone()
    } else {
        format!("{} ×{}", r.router, r.replicas)
    }
}

/// Writes everything into `dir`; returns the Markdown.
pub fn write(
    dir: &Path,
    meta: &Meta,
    presets: &[(f64, PresetRecord)],
    runs: &[RunRecord],
) -> Result<String> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut md = String::new();
    let _ = writeln!(md, "# Agentic benchmark results\n");
    let _ = writeln!(
        md,
        "`{}` on {}, {}. Seed {}{}; the whole run took {:.0} s.\n",
        meta.command.trim(),
        meta.date,
        meta.machine,
        meta.seed,
        if meta.quick { ", --quick" } else { "" },
        meta.elapsed_s
    );
    let _ = writeln!(
        md,
        "Backends: `vllm-sim` instances with the `h100-8b` latency model (Llama-3.1-8B on one H100: \
step = 5.753 ms + 17.25 µs × uncached prefill tokens + 6 µs × decode sequences), blocks of 16 tokens, \
prefix caching on; a fresh simulator for every run. Latencies are simulated seconds (wall × time scale; \
a router's own overhead is scaled alike). Hit rate = Σ `cached_tokens` ÷ Σ `prompt_tokens` from the \
responses' `usage`; \"of oracle\" divides it by the best any placement could reach (all instances' KV \
pooled, Belady eviction; `lb_sim::workload::oracle`). Completion = a workflow's first call sent to its \
last token (tool time on its critical path is included and given separately). Imbalance = max ÷ mean \
over backends of requests and of mean KV usage. Router CPU and peak RSS cover all its processes and \
replicas. ×3 = three independent replicas, each workflow's calls spread over them (as ECMP does). \
A row with errors is marked ✗ and never counts as a router's best.\n"
    );
    for n in &meta.notes {
        let _ = writeln!(md, "- Note: {n}");
    }
    let mut json_runs = Vec::new();
    for (load, p) in presets {
        let rs: Vec<&RunRecord> = runs
            .iter()
            .filter(|r| r.preset == p.preset.name && r.load == *load)
            .collect();
        section(&mut md, *load, p, &rs);
        let tag = if *load == 1.0 {
            p.preset.name.to_owned()
        } else {
            format!("{}-load{load}", p.preset.name)
        };
        plots_of(dir, &tag, &rs, &mut md)?;
        json_runs.extend(rs.iter().map(|r| json!(r)));
    }
    load_plots(dir, presets, runs, &mut md)?;
    fs::write(dir.join("RESULTS.md"), &md)?;
    let j = json!({
        "date": meta.date,
        "machine": meta.machine,
        "seed": meta.seed,
        "quick": meta.quick,
        "elapsed_s": meta.elapsed_s,
        "notes": meta.notes,
        "presets": presets.iter().map(|(l, p)| json!({"load": l, "setup": p})).collect::<Vec<_>>(),
        "runs": json_runs,
    });
    fs::write(dir.join("results.json"), serde_json::to_string_pretty(&j)?)?;
    Ok(md)
}

/// One table row: a router configuration and replica count over its repeats.
struct Row<'a> {
    runs: Vec<&'a RunRecord>,
}

impl Row<'_> {
    fn first(&self) -> &RunRecord {
        self.runs[0]
    }

    fn ran(&self) -> impl Iterator<Item = &RunRecord> {
        self.runs.iter().copied().filter(|r| r.skipped.is_none())
    }

    /// Median, min and max of `f` over the runs that ran (NaN when none did).
    fn med(&self, f: impl Fn(&RunRecord) -> f64) -> (f64, f64, f64) {
        let v: Vec<f64> = self.ran().map(f).collect();
        Stat::of(&v).map_or((f64::NAN, f64::NAN, f64::NAN), |s| (s.median, s.min, s.max))
    }

    /// Every repeat ran without a failed call.
    fn valid(&self) -> bool {
        self.runs.iter().all(|r| valid(r))
    }

    fn errors(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for r in &self.runs {
            for (k, v) in &r.summary.errors {
                *m.entry(k.clone()).or_default() += v;
            }
        }
        m
    }
}

/// Runs grouped by (router, replicas), in the order they first appear.
fn rows<'a>(rs: &[&'a RunRecord]) -> Vec<Row<'a>> {
    let mut out: Vec<Row<'a>> = Vec::new();
    for r in rs {
        match out
            .iter_mut()
            .find(|row| row.first().router == r.router && row.first().replicas == r.replicas)
        {
            Some(row) => row.runs.push(r),
            None => out.push(Row { runs: vec![r] }),
        }
    }
    // Table order: configuration order of the first repeat.
    out.sort_by_key(|row| {
        rs.iter()
            .position(|r| std::ptr::eq(*r, row.first()))
            .unwrap_or(usize::MAX)
    });
    out
}

/// `median` or, over several repeats, `median [min–max]`.
fn spread((m, lo, hi): (f64, f64, f64), repeats: usize, prec: usize) -> String {
    if repeats > 1 {
        format!("{m:.prec$} [{lo:.prec$}–{hi:.prec$}]")
    } else {
        format!("{m:.prec$}")
    }
}

fn section(md: &mut String, load: f64, p: &PresetRecord, rs: &[&RunRecord]) {
    let c = &p.preset.cluster;
    let table = rows(rs);
    let repeats = table.iter().map(|r| r.runs.len()).max().unwrap_or(1);
    let _ = writeln!(
        md,
        "\n## {}{}\n\n{}. {} calls in {} workflows, {} prompt tokens; {} instances × {} KV blocks; \
KV demand ÷ capacity {:.2}; time scale {}×, {} tokens per SSE event; ids: {}. Oracle hit rate {:.1}% \
(unbounded KV: {:.1}%). {}\n",
        p.preset.name,
        if load == 1.0 {
            String::new()
        } else {
            format!(" (offered load ×{load})")
        },
        p.preset.about,
        p.calls,
        p.workflows,
        p.prompt_tokens,
        c.instances,
        p.num_gpu_blocks,
        p.demand_ratio,
        c.time_scale,
        c.stream_interval,
        p.preset
            .force_ids
            .as_ref()
            .map_or("each router's best".to_owned(), |i| i.label()),
        p.oracle.hit_rate * 100.0,
        p.oracle.unbounded_hit_rate * 100.0,
        if repeats > 1 {
            format!("Medians of {repeats} interleaved repeats, [min–max] on the headline columns.")
        } else {
            "One run per row.".to_owned()
        },
    );
    let _ = writeln!(
        md,
        "| router | ids | hit % | of oracle | TTFT p50 / p95 / p99 s | ITL ms | completion mean / p95 s | errors | req imb. | KV imb. | CPU s | RSS MiB |"
    );
    let _ = writeln!(
        md,
        "|---|---|---:|---:|---|---:|---|---:|---:|---:|---:|---:|"
    );
    for row in &table {
        let r0 = row.first();
        if row.ran().next().is_none() {
            let why = r0.skipped.as_deref().unwrap_or("");
            let short: String = why.lines().next().unwrap_or("").chars().take(100).collect();
            let _ = writeln!(
                md,
                "| {} | {} | skipped: {short} |||||||||| ",
                label(r0),
                r0.ids
            );
            continue;
        }
        let errors = row.errors();
        let errs: usize = errors.values().sum();
        let err_text = if errs == 0 {
            "0".to_owned()
        } else {
            let kinds: Vec<String> = errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            format!("✗ {errs} ({})", kinds.join(", "))
        };
        let m = |f: &dyn Fn(&RunRecord) -> f64| row.med(f).0;
        let _ = writeln!(
            md,
            "| {}{} | {} | {} | {:.0}% | {:.3} / {} / {:.3} | {:.1} | {} / {:.2} | {} | {:.2} | {:.2} | {:.1} | {:.0} |",
            if row.valid() { "" } else { "✗ " },
            label(r0),
            r0.ids,
            spread(row.med(|r| r.summary.hit_rate * 100.0), repeats, 1),
            m(&|r| r.summary.hit_of_oracle * 100.0),
            m(&|r| r.summary.ttft.p50),
            spread(row.med(|r| r.summary.ttft.p95), repeats, 3),
            m(&|r| r.summary.ttft.p99),
            m(&|r| r.summary.itl.mean * 1000.0),
            spread(row.med(|r| r.summary.completion.mean), repeats, 2),
            m(&|r| r.summary.completion.p95),
            err_text,
            m(&|r| r.summary.request_imbalance),
            m(&|r| r.summary.kv_imbalance),
            m(&|r| r.summary.router_cpu_s),
            m(&|r| r.summary.router_rss_mib),
        );
    }
    if let Some(r) = rs.iter().find(|r| r.skipped.is_none()) {
        let _ = writeln!(
            md,
            "\nTool time on the critical path: mean {:.2} s, p95 {:.2} s per workflow. Max simulator clock lag in this preset: {:.3} s (the simulator kept up when this is near 0).",
            r.summary.tool_time.mean,
            r.summary.tool_time.p95,
            rs.iter()
                .flat_map(|r| r.summary.backends.iter().map(|b| b.clock_lag_max))
                .fold(0.0, f64::max)
        );
    }
    best_lines(md, &table);
}

/// A headline metric: name, value of a run, whether larger is better, unit.
type Headline<'a> = (&'a str, &'a dyn Fn(&RunRecord) -> f64, bool, &'a str);

/// Best valid agentlb row vs best valid anchor row on each headline metric (medians).
fn best_lines(md: &mut String, table: &[Row<'_>]) {
    let valid: Vec<&Row<'_>> = table.iter().filter(|r| r.valid()).collect();
    let (ours, anchors): (Vec<&Row<'_>>, Vec<&Row<'_>>) = valid
        .iter()
        .partition(|r| r.first().router.starts_with("agentlb"));
    let pick = |v: &[&Row<'_>], f: &dyn Fn(&RunRecord) -> f64, max: bool| {
        v.iter()
            .map(|r| (r.med(f).0, label(r.first())))
            .filter(|x| x.0.is_finite())
            .reduce(|a, b| if (b.0 > a.0) == max { b } else { a })
    };
    let metrics: [Headline; 3] = [
        ("hit rate", &|r| r.summary.hit_rate * 100.0, true, "%"),
        ("TTFT p95", &|r| r.summary.ttft.p95, false, " s"),
        (
            "completion mean",
            &|r| r.summary.completion.mean,
            false,
            " s",
        ),
    ];
    let _ = writeln!(md);
    for (name, f, max, unit) in metrics {
        if let (Some(a), Some(b)) = (pick(&ours, f, max), pick(&anchors, f, max)) {
            let _ = writeln!(
                md,
                "- Best {name}: agentlb {:.3}{unit} ({}), best anchor {:.3}{unit} ({}).",
                a.0, a.1, b.0, b.1
            );
        }
    }
}

fn plots_of(dir: &Path, tag: &str, rs: &[&RunRecord], md: &mut String) -> Result<()> {
    let table = rows(rs);
    let ran: Vec<&Row<'_>> = table.iter().filter(|r| r.ran().next().is_some()).collect();
    if ran.is_empty() {
        return Ok(());
    }
    let cdf: Vec<(String, Vec<f64>)> = ran
        .iter()
        .map(|r| {
            (
                label(r.first()),
                r.ran().flat_map(|x| x.ttfts.iter().copied()).collect(),
            )
        })
        .collect();
    let f1 = format!("{tag}-ttft-cdf.svg");
    plots::cdf_svg(
        &dir.join(&f1),
        &format!("TTFT CDF — {tag}"),
        "TTFT (simulated s)",
        &cdf,
    )?;
    // Mean over repeats of each backend's mean KV usage.
    let kv: Vec<(String, Vec<f64>)> = ran
        .iter()
        .map(|r| {
            let n = r.first().summary.backends.len();
            let per: Vec<f64> = (0..n)
                .map(|i| {
                    r.med(|x| {
                        x.summary
                            .backends
                            .get(i)
                            .map_or(0.0, |b| b.kv_usage_mean * 100.0)
                    })
                    .0
                })
                .collect();
            (label(r.first()), per)
        })
        .collect();
    let f2 = format!("{tag}-kv-per-backend.svg");
    plots::grouped_bars_svg(
        &dir.join(&f2),
        &format!("Mean KV usage per backend — {tag}"),
        "KV cache usage (%)",
        &kv,
    )?;
    let _ = writeln!(md, "\n![TTFT CDF]({f1})\n![KV per backend]({f2})");
    Ok(())
}

/// Completion time and hit rate against offered load, when several loads ran.
fn load_plots(
    dir: &Path,
    presets: &[(f64, PresetRecord)],
    runs: &[RunRecord],
    md: &mut String,
) -> Result<()> {
    let mut by_preset: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for (l, p) in presets {
        by_preset.entry(p.preset.name).or_default().push(*l);
    }
    for (name, loads) in by_preset {
        if loads.len() < 2 {
            continue;
        }
        let mut comp: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        let mut hit: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for load in loads {
            let rs: Vec<&RunRecord> = runs
                .iter()
                .filter(|r| r.preset == name && r.load == load)
                .collect();
            for row in rows(&rs).iter().filter(|r| r.valid()) {
                let l = label(row.first());
                comp.entry(l.clone())
                    .or_default()
                    .push((load, row.med(|r| r.summary.completion.mean).0));
                hit.entry(l)
                    .or_default()
                    .push((load, row.med(|r| r.summary.hit_rate * 100.0).0));
            }
        }
        let series = |m: BTreeMap<String, Vec<(f64, f64)>>| -> Vec<Series> {
            m.into_iter()
                .map(|(label, points)| Series { label, points })
                .collect()
        };
        let f1 = format!("{name}-completion-vs-load.svg");
        let f2 = format!("{name}-hit-vs-load.svg");
        plots::lines_svg(
            &dir.join(&f1),
            &format!("Workflow completion vs offered load — {name}"),
            "offered load (× preset arrival rate)",
            "mean completion (simulated s)",
            &series(comp),
        )?;
        plots::lines_svg(
            &dir.join(&f2),
            &format!("Prefix-cache hit rate vs offered load — {name}"),
            "offered load (× preset arrival rate)",
            "hit rate (%)",
            &series(hit),
        )?;
        let _ = writeln!(
            md,
            "\n## {name}: against offered load\n\n![completion]({f1})\n![hit rate]({f2})"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_is_civil() {
        let d = today();
        assert_eq!(d.len(), 10);
        assert!(d.starts_with("20"));
    }

    fn run(router: &str, replicas: usize, repeat: usize, hit: f64) -> RunRecord {
        let mut summary = crate::bench::agentic::stats::Summary {
            calls: 10,
            hit_rate: hit,
            ..Default::default()
        };
        if hit < 0.0 {
            summary.errors.insert("http_502".to_owned(), 1);
        }
        RunRecord {
            preset: "p".to_owned(),
            load: 1.0,
            router: router.to_owned(),
            replicas,
            repeat,
            ids: "none".to_owned(),
            summary,
            ttfts: Vec::new(),
            skipped: None,
        }
    }

    #[test]
    fn rows_group_repeats_and_take_medians() {
        let runs = [
            run("a", 1, 0, 0.5),
            run("a", 3, 0, 0.2),
            run("a", 3, 1, 0.4),
            run("a", 1, 1, 0.7),
            run("a", 1, 2, 0.6),
            run("a", 3, 2, -1.0),
        ];
        let refs: Vec<&RunRecord> = runs.iter().collect();
        let t = rows(&refs);
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].first().replicas, t[0].runs.len()), (1, 3));
        assert_eq!(t[0].med(|r| r.summary.hit_rate), (0.6, 0.5, 0.7));
        assert!(t[0].valid());
        // A repeat with a failed call makes the whole row invalid.
        assert!(!t[1].valid());
        assert_eq!(t[1].errors().get("http_502"), Some(&1));
        assert_eq!(spread((1.0, 0.5, 2.0), 3, 1), "1.0 [0.5–2.0]");
        assert_eq!(spread((1.0, 0.5, 2.0), 1, 2), "1.00");
    }
}
