//! `agentlb status` at a glance: the dataplane (`/admin/dataplane`), the kernel fast
//! path (`/admin/pinning`) and the counters that say which path traffic took
//! (`/metrics`), as a few lines a person reads. `agentlb status --json` prints the
//! dataplane's JSON instead.

use std::fmt::Write as _;

use serde_json::Value;

/// The values of every series of `name` in a Prometheus text exposition, with their
/// label sets as written (`path="kernel",direction="to_client"`; empty without labels).
pub fn series<'a>(metrics: &'a str, name: &str) -> Vec<(&'a str, f64)> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => {
                    let (labels, v) = r.split_once('}')?;
                    (labels, v)
                }
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            let v = value.split_whitespace().next()?.parse::<f64>().ok()?;
            Some((labels, v))
        })
        .collect()
}

/// The value of `name{labels}` (exactly those labels), 0 when absent.
fn value(metrics: &str, name: &str, labels: &str) -> f64 {
    series(metrics, name)
        .into_iter()
        .find(|(l, _)| *l == labels)
        .map_or(0.0, |(_, v)| v)
}

/// `label="x"` → `x`.
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.trim_matches('"'))
    })
}

/// Bytes as a person reads them.
fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `a 3, b 0` from every series of `name` by its `reason` label ("none" when empty).
fn by_reason(metrics: &str, name: &str) -> String {
    let mut v: Vec<(String, f64)> = series(metrics, name)
        .into_iter()
        .filter_map(|(l, v)| Some((label(l, "reason")?.to_owned(), v)))
        .filter(|(_, v)| *v > 0.0)
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    if v.is_empty() {
        return "none".to_owned();
    }
    v.iter()
        .map(|(r, n)| format!("{r} {n:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The summary. `pinning` is `None` when the fast path is off (the admin API answers
/// 409 then).
pub fn render(dataplane: &Value, pinning: Option<&Value>, metrics: &str) -> String {
    let mut out = String::new();
    let mode = dataplane["mode"].as_str().unwrap_or("unknown");
    let names: Vec<&str> = dataplane["programs"]
        .as_array()
        .map(|p| p.iter().filter_map(|p| p["name"].as_str()).collect())
        .unwrap_or_default();
    let _ = write!(out, "dataplane    {mode}");
    if mode == "kernel" {
        let _ = write!(
            out,
            ", {} programs attached ({})",
            names.len(),
            names.join(", ")
        );
        if let Some(c) = dataplane["cgroup"].as_str() {
            let _ = write!(out, ", cgroup {c}");
        }
    } else if let Some(r) = dataplane["reason"].as_str() {
        let _ = write!(out, " ({r})");
    }
    out.push('\n');
    match pinning {
        Some(p) => {
            let _ = writeln!(
                out,
                "pinning      {}, {} pairs open (ALB_PAIRS {}, ALB_SOCKS {})",
                if p["enabled"] == true {
                    "on"
                } else {
                    "off (kill switch)"
                },
                p["open_pairs"].as_u64().unwrap_or(0),
                p["pair_entries"].as_u64().unwrap_or(0),
                p["socket_entries"].as_u64().unwrap_or(0),
            );
        }
        None => out.push_str("pinning      not enabled (kernel.pinning)\n"),
    }
    let conns = |path: &str| {
        let l = format!("path=\"{path}\"");
        (
            value(metrics, "agentlb_connections_total", &l),
            value(metrics, "agentlb_connections_open", &l),
        )
    };
    let ((ut, uo), (kt, ko)) = (conns("user"), conns("kernel"));
    let _ = writeln!(
        out,
        "connections  user {ut:.0} ({uo:.0} open), kernel {kt:.0} ({ko:.0} open)"
    );
    let b = |path: &str, dir: &str| {
        bytes(value(
            metrics,
            "agentlb_bytes_total",
            &format!("path=\"{path}\",direction=\"{dir}\""),
        ))
    };
    let _ = writeln!(
        out,
        "bytes        user: to clients {}, to backends {}; kernel (closed pairs): to clients {}, to backends {}",
        b("user", "to_client"),
        b("user", "to_upstream"),
        b("kernel", "to_client"),
        b("kernel", "to_upstream"),
    );
    let _ = writeln!(
        out,
        "hand-offs    {:.0}; refused: {}",
        value(metrics, "agentlb_kernel_handoffs_total", ""),
        by_reason(metrics, "agentlb_kernel_handoff_refusals_total"),
    );
    let _ = writeln!(
        out,
        "pair closes  {}",
        by_reason(metrics, "agentlb_pinned_pair_closes_total")
    );
    let c = &dataplane["counters"];
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    let _ = writeln!(
        out,
        "kernel       redirected {} ({}), redirect failed {}, unpaired {}",
        n("sk_skb_redirected"),
        bytes(n("sk_skb_redirected_bytes") as f64),
        n("sk_skb_redirect_failed"),
        n("sk_skb_unpaired"),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "# HELP agentlb_connections_total x\n\
agentlb_connections_total{path=\"user\"} 120\n\
agentlb_connections_total{path=\"kernel\"} 30\n\
agentlb_connections_open{path=\"user\"} 4\n\
agentlb_connections_open{path=\"kernel\"} 3\n\
agentlb_bytes_total{path=\"kernel\",direction=\"to_upstream\"} 2048\n\
agentlb_bytes_total{path=\"user\",direction=\"to_client\"} 3000\n\
agentlb_bytes_total{path=\"kernel\",direction=\"to_client\"} 5242880\n\
agentlb_kernel_handoffs_total 30\n\
agentlb_kernel_handoffs_total_extra 9\n\
agentlb_kernel_handoff_refusals_total{reason=\"pipelined\"} 2\n\
agentlb_kernel_handoff_refusals_total{reason=\"race\"} 0\n\
agentlb_pinned_pair_closes_total{reason=\"client_closed\"} 27\n";

    #[test]
    fn reads_series_with_and_without_labels() {
        assert_eq!(
            series(METRICS, "agentlb_connections_open"),
            vec![("path=\"user\"", 4.0), ("path=\"kernel\"", 3.0)]
        );
        assert_eq!(
            series(METRICS, "agentlb_kernel_handoffs_total"),
            vec![("", 30.0)],
            "a longer name is another metric"
        );
    }

    #[test]
    fn renders_every_line_a_person_looks_for() {
        let dp = serde_json::json!({
            "mode": "kernel",
            "programs": [{"name": "a"}, {"name": "b"}],
            "cgroup": "/sys/fs/cgroup/agentlb",
            "counters": {"sk_skb_redirected": 1234, "sk_skb_redirected_bytes": 5_242_880u64,
                         "sk_skb_redirect_failed": 0, "sk_skb_unpaired": 1},
        });
        let pin = serde_json::json!({"enabled": true, "open_pairs": 3,
                                     "pair_entries": 6, "socket_entries": 6});
        let text = render(&dp, Some(&pin), METRICS);
        for want in [
            "dataplane    kernel, 2 programs attached (a, b), cgroup /sys/fs/cgroup/agentlb",
            "pinning      on, 3 pairs open (ALB_PAIRS 6, ALB_SOCKS 6)",
            "connections  user 120 (4 open), kernel 30 (3 open)",
            "bytes        user: to clients 2.9 KiB, to backends 0 B; kernel (closed pairs): to clients 5.0 MiB, to backends 2.0 KiB",
            "hand-offs    30; refused: pipelined 2",
            "pair closes  client_closed 27",
            "kernel       redirected 1234 (5.0 MiB), redirect failed 0, unpaired 1",
        ] {
            assert!(text.contains(want), "{want:?} not in:\n{text}");
        }
        let off = render(
            &serde_json::json!({"mode": "userspace", "reason": "kernel.mode = off"}),
            None,
            "",
        );
        assert!(off.starts_with("dataplane    userspace (kernel.mode = off)\n"));
        assert!(off.contains("pinning      not enabled"));
        assert!(off.contains("hand-offs    0; refused: none"));
    }
}
