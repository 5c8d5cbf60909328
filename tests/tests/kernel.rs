//! Privileged suite: agentlb's kernel programs on real traffic in throwaway network
//! namespaces and cgroups, and clean teardown.
//!
//! Topology per test: a client namespace and a gateway namespace joined by a veth
//! pair (198.18.0.0/30, the benchmarking range); agentlb and a tiny backend run in
//! the gateway namespace inside the test's own cgroup; agentlb creates and joins
//! `<test cgroup>/agentlb` (its default), attaches XDP to the gateway's veth.

use std::{collections::BTreeSet, process::Command, time::Duration};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use testkit::{
    NetNs, PinDir, Proc, TestCgroup, get_json, privileged, veth_pair, wait_until, workspace_bin,
};

const GW_ADDR: &str = "198.18.0.2";
const ADMIN: &str = "127.0.0.1:9090";

/// The gateway world of one test.
struct World {
    client: NetNs,
    gw: NetNs,
    cg: TestCgroup,
    pins: PinDir,
}

impl World {
    fn new() -> Result<Self> {
        let client = NetNs::new("c")?;
        let gw = NetNs::new("g")?;
        veth_pair(
            &client,
            "eth0",
            "198.18.0.1/30",
            &gw,
            "eth0",
            "198.18.0.2/30",
        )?;
        Ok(Self {
            client,
            gw,
            cg: TestCgroup::new()?,
            pins: PinDir::new(),
        })
    }

    fn backend(&self, name: &str, port: u16) -> Result<Proc> {
        let mut cmd = self.gw.command(env!("CARGO_BIN_EXE_tiny-backend"));
        cmd.arg(name).arg(format!("127.0.0.1:{port}"));
        self.cg.place(&mut cmd);
        let p = Proc::spawn(name, cmd)?;
        let ok = wait_until(Duration::from_secs(10), || {
            p.output().contains("listening").then_some(())
        });
        ensure!(ok.is_some(), "backend {name} did not start: {}", p.output());
        Ok(p)
    }

    fn config(&self, backends: &[u16], mode: &str, xdp: bool) -> String {
        let mut s = format!(
            "[server]\nlisten = \"{GW_ADDR}:8080\"\nadmin = \"{ADMIN}\"\n\n\
             [routing]\npolicy = \"round_robin\"\n\n\
             [kernel]\nmode = \"{mode}\"\npin_dir = \"{}\"\nlog_level = \"debug\"\nlog_sockets = true\n",
            self.pins.path().display()
        );
        if xdp {
            s.push_str("xdp_interfaces = [\"eth0\"]\n");
        }
        s.push_str("\n[log]\nlevel = \"info,lb_ebpf=debug\"\n");
        for p in backends {
            s.push_str(&format!("\n[[backends]]\nurl = \"http://127.0.0.1:{p}\"\n"));
        }
        s
    }

    /// Starts agentlb in the gateway namespace and cgroup; waits for the admin API.
    fn agentlb(&self, config: &str) -> Result<(Proc, Value)> {
        let file = testkit::temp_file("agentlb.toml", config)?;
        let mut cmd = self.gw.command(workspace_bin("agentlb"));
        cmd.arg("run").arg("--config").arg(&file);
        self.cg.place(&mut cmd);
        let mut p = Proc::spawn("agentlb", cmd)?;
        let status = wait_until(Duration::from_secs(20), || {
            if p.try_wait().is_some() {
                return Some(Err(anyhow::anyhow!(
                    "agentlb exited early:\n{}",
                    p.output()
                )));
            }
            self.gw
                .run(|| get_json(&format!("http://{ADMIN}/admin/dataplane")))
                .ok()
                .and_then(Result::ok)
                .map(Ok)
        })
        .context("agentlb admin API did not come up")??;
        Ok((p, status))
    }

    fn status(&self) -> Result<Value> {
        self.gw
            .run(|| get_json(&format!("http://{ADMIN}/admin/dataplane")))?
    }
}

fn counter(status: &Value, name: &str) -> u64 {
    status["counters"][name].as_u64().unwrap_or(0)
}

fn program_ids(status: &Value) -> BTreeSet<u32> {
    status["programs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["id"].as_u64())
                .map(|i| i as u32)
                .collect()
        })
        .unwrap_or_default()
}

fn kinds(status: &Value) -> BTreeSet<String> {
    status["programs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["kind"].as_str())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Sends `conns` keep-alive connections × `per_conn` POSTs from the client namespace.
/// Returns (responses by backend, request body bytes sent).
fn traffic(w: &World, conns: usize, per_conn: usize) -> Result<(Vec<String>, u64)> {
    w.client.run(move || -> Result<(Vec<String>, u64)> {
        let body = format!("{{\"model\":\"m\",\"prompt\":\"{}\"}}", "x".repeat(975));
        assert_eq!(body.len(), 1000);
        let mut seen = Vec::new();
        let mut sent = 0u64;
        for c in 0..conns {
            let agent = ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(10))
                .build();
            for r in 0..per_conn {
                let resp = agent
                    .post(&format!("http://{GW_ADDR}:8080/v1/chat/completions"))
                    .set("x-workflow-id", &format!("wf-{c}"))
                    .set("content-type", "application/json")
                    .send_string(&body)
                    .with_context(|| format!("request {c}/{r}"))?;
                ensure!(resp.status() == 200, "status {}", resp.status());
                ensure!(
                    resp.header("x-request-id").is_some(),
                    "no request id echoed"
                );
                let v: Value = resp.into_json()?;
                ensure!(v["body_bytes"] == 1000, "backend saw {v}");
                ensure!(
                    v["workflow_id"] == format!("wf-{c}"),
                    "workflow header lost: {v}"
                );
                seen.push(v["backend"].as_str().unwrap_or("").to_owned());
                sent += body.len() as u64;
            }
        }
        Ok((seen, sent))
    })?
}

/// Programs and links of the kernel, by id.
fn kernel_prog_ids() -> BTreeSet<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| p.id())
        .collect()
}

fn kernel_link_prog_ids() -> BTreeSet<u32> {
    aya::programs::loaded_links()
        .filter_map(Result::ok)
        .map(|l| l.program_id())
        .collect()
}

#[test]
fn kernel_programs_run_on_real_proxied_traffic_and_detach_on_sigterm() -> Result<()> {
    if !privileged("kernel_programs_run_on_real_proxied_traffic_and_detach_on_sigterm") {
        return Ok(());
    }
    let w = World::new()?;
    let _b0 = w.backend("b0", 9000)?;
    let _b1 = w.backend("b1", 9001)?;
    let (mut lb, st) = w.agentlb(&w.config(&[9000, 9001], "required", true))?;

    assert_eq!(st["mode"], "kernel", "{st:#}");
    let want: BTreeSet<String> = ["sock_ops", "sk_skb/stream_verdict", "sk_msg"]
        .into_iter()
        .map(String::from)
        .collect();
    let got = kinds(&st);
    assert!(want.is_subset(&got), "programs {got:?}");
    assert!(
        got.iter().any(|k| k.starts_with("xdp/")),
        "xdp not attached: {got:?}"
    );
    let ids = program_ids(&st);
    assert_eq!(ids.len(), 4, "{st:#}");
    assert!(
        ids.is_subset(&kernel_prog_ids()),
        "programs not loaded in the kernel"
    );
    assert!(
        w.gw.ip(&["link", "show", "eth0"])?.contains("xdp"),
        "ip link does not show xdp on the gateway veth"
    );
    let agentlb_cg = w.cg.path().join("agentlb");
    assert!(agentlb_cg.is_dir(), "agentlb did not create its cgroup");
    let procs = std::fs::read_to_string(agentlb_cg.join("cgroup.procs"))?;
    assert!(
        procs.lines().any(|l| l.trim() == lb.pid().to_string()),
        "agentlb did not join its cgroup"
    );
    assert_eq!(st["published_backends"], 2);

    let before = w.status()?;
    let (seen, sent) = traffic(&w, 3, 5)?;
    assert_eq!(seen.len(), 15);
    assert!(
        seen.iter().any(|b| b == "b0") && seen.iter().any(|b| b == "b1"),
        "round robin used one backend: {seen:?}"
    );
    let after = w.status()?;
    let d = |n: &str| counter(&after, n) - counter(&before, n);

    eprintln!("kernel counter deltas for 3 connections x 5 requests:");
    for n in lb_common::COUNTER_NAMES {
        eprintln!("  {n:32} {}", d(n));
    }
    // sock_ops saw the 3 client connections (accepted) and the upstream ones.
    assert!(d("sockops_passive_established") >= 3);
    assert!(d("sockops_registered_client") >= 3);
    assert!(d("sockops_active_established") >= 1);
    assert!(d("sockops_registered_upstream") >= 1);
    assert_eq!(counter(&after, "sockops_register_failed"), 0);
    // Every request body crossed the sk_skb verdict (received from the client) and
    // the sk_msg program (sent upstream); responses add more on both.
    assert!(
        d("sk_skb_verdicts") >= 15,
        "sk_skb verdicts {}",
        d("sk_skb_verdicts")
    );
    assert!(
        d("sk_skb_bytes") >= sent,
        "sk_skb bytes {} < {sent}",
        d("sk_skb_bytes")
    );
    assert!(d("sk_msg_verdicts") >= 15);
    assert!(d("sk_msg_bytes") >= sent);
    // XDP on the gateway veth saw the packets and the 3 SYNs.
    assert!(d("xdp_packets") >= 30, "xdp packets {}", d("xdp_packets"));
    assert!(d("xdp_tcp_syn") >= 3);
    assert!(d("xdp_bytes") >= sent);

    // aya-log lines from the kernel reached agentlb's tracing log.
    let logged = wait_until(Duration::from_secs(5), || {
        lb.output()
            .contains("registered client socket")
            .then_some(())
    });
    assert!(
        logged.is_some(),
        "no kernel log line in agentlb's output:\n{}",
        lb.output()
    );

    // Metrics expose the same counters.
    let metrics = w.gw.run(|| -> Result<String> {
        Ok(ureq::get(&format!("http://{ADMIN}/metrics"))
            .call()?
            .into_string()?)
    })??;
    assert!(
        metrics.contains("agentlb_kernel_events_total{counter=\"sk_skb_verdicts\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("agentlb_kernel_dataplane_active 1"));

    // `agentlb status` shows the same programs.
    let out = w.gw.run(|| {
        Command::new(workspace_bin("agentlb"))
            .args(["status", "--admin", ADMIN])
            .output()
    })??;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("alb_sockops"),
        "{text}"
    );

    // SIGTERM: clean exit, nothing attached, only persistent pins remain.
    let status = lb.terminate(Duration::from_secs(15))?;
    assert!(status.success(), "agentlb exit {status}:\n{}", lb.output());
    assert!(lb.output().contains("kernel programs detached"));
    let live = kernel_prog_ids();
    assert!(
        ids.is_disjoint(&live),
        "programs still loaded: {:?}",
        ids.intersection(&live).collect::<Vec<_>>()
    );
    assert!(
        ids.is_disjoint(&kernel_link_prog_ids()),
        "links still exist"
    );
    assert!(
        !w.gw.ip(&["link", "show", "eth0"])?.contains("xdp"),
        "xdp still attached"
    );
    assert!(!agentlb_cg.exists(), "agentlb cgroup not removed");
    assert_eq!(
        w.pins.entries(),
        ["ALB_BACKENDS", "ALB_META"],
        "unexpected pins"
    );
    Ok(())
}

#[test]
fn pinned_maps_survive_restart_and_foreign_abi_is_refused() -> Result<()> {
    if !privileged("pinned_maps_survive_restart_and_foreign_abi_is_refused") {
        return Ok(());
    }
    let w = World::new()?;
    let _b0 = w.backend("b0", 9000)?;
    let _b1 = w.backend("b1", 9001)?;
    let backends_id = |st: &Value| {
        st["maps"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == "ALB_BACKENDS"))
            .and_then(|m| m["id"].as_u64())
    };

    let (mut lb, st) = w.agentlb(&w.config(&[9000, 9001], "required", false))?;
    assert_eq!(st["mode"], "kernel");
    assert_eq!(st["published_backends"], 2);
    let first_id = backends_id(&st).context("no ALB_BACKENDS id")?;
    assert!(lb.terminate(Duration::from_secs(15))?.success());

    // Restart with one backend: the pinned map is adopted (same kernel map) and
    // reconciled (the stale entry is gone).
    let (mut lb, st) = w.agentlb(&w.config(&[9001], "required", false))?;
    assert_eq!(
        backends_id(&st),
        Some(first_id),
        "pinned map not adopted: {st:#}"
    );
    assert_eq!(st["published_backends"], 1);
    assert!(lb.terminate(Duration::from_secs(15))?.success());

    // A pin written by another ABI version is refused.
    {
        let data = aya::maps::MapData::from_pin(w.pins.path().join("ALB_META"))?;
        let mut meta: aya::maps::Array<_, lb_common::AbiMeta> =
            aya::maps::Array::try_from(aya::maps::Map::Array(data))?;
        let mut m = meta.get(&0, 0)?;
        m.abi_version = lb_common::ABI_VERSION + 98;
        meta.set(0, m, 0)?;
    }
    let file = testkit::temp_file("agentlb.toml", &w.config(&[9000], "required", false))?;
    let mut cmd = w.gw.command(workspace_bin("agentlb"));
    cmd.arg("run").arg("--config").arg(&file);
    w.cg.place(&mut cmd);
    let mut p = Proc::spawn("agentlb-required", cmd)?;
    let st = p
        .wait_exit(Duration::from_secs(20))
        .context("agentlb did not exit")?;
    assert!(!st.success());
    assert!(p.output().contains("refusing to adopt"), "{}", p.output());

    // In auto mode the same situation falls back to userspace with the reason.
    let (mut lb, st) = w.agentlb(&w.config(&[9000], "auto", false))?;
    assert_eq!(st["mode"], "userspace");
    assert!(
        st["reason"].as_str().unwrap_or("").contains("ABI"),
        "{st:#}"
    );
    let (seen, _) = traffic(&w, 1, 2)?;
    assert_eq!(seen, ["b0", "b0"]);
    assert!(lb.terminate(Duration::from_secs(15))?.success());
    Ok(())
}

#[test]
fn missing_privileges_fall_back_to_userspace_with_one_reason() -> Result<()> {
    if !privileged("missing_privileges_fall_back_to_userspace_with_one_reason") {
        return Ok(());
    }
    // An unprivileged agentlb (uid/gid nobody) on loopback of a throwaway namespace
    // is entered by a root nsenter that then drops privileges with setpriv.
    let w = World::new()?;
    let _b0 = w.backend("b0", 9000)?;
    let file = testkit::temp_file("agentlb.toml", &w.config(&[9000], "auto", false))?;
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    let mut cmd = w.gw.command("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--",
    ])
    .arg(workspace_bin("agentlb"))
    .arg("run")
    .arg("--config")
    .arg(&file);
    w.cg.place(&mut cmd);
    let mut p = Proc::spawn("agentlb-nobody", cmd)?;
    let st = wait_until(Duration::from_secs(20), || w.status().ok())
        .context(format!("no admin API: {}", p.output()))?;
    assert_eq!(st["mode"], "userspace", "{st:#}");
    let reason = st["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("privileges") || reason.contains("ermission"),
        "{reason}"
    );
    assert_eq!(
        p.output().matches("running userspace-only").count(),
        1,
        "{}",
        p.output()
    );
    let (seen, _) = traffic(&w, 1, 3)?;
    assert_eq!(seen.len(), 3);
    assert!(p.terminate(Duration::from_secs(15))?.success());
    Ok(())
}
