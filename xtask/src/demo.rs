//! `cargo xtask demo`: agentlb in front of simulated vLLM instances (`vllm-sim`),
//! driven by a small multi-agent workload through the OpenAI API, then a report of
//! where each workflow's calls landed, how much of their prompts hit the prefix
//! cache, and what the kernel programs counted. Run as root, the kernel fast
//! path is on (`kernel.pinning`): each agent keeps its own keep-alive
//! connection, which is handed to the kernel after its first call, and the
//! report shows how many calls the kernel forwarded without agentlb's
//! userspace engine.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

const LISTEN: &str = "127.0.0.1:8080";
const ADMIN: &str = "127.0.0.1:9090";
const BASE_PORT: u16 = 18000;
/// The demo's own pin directory, removed at the end.
const PIN_DIR: &str = "/sys/fs/bpf/agentlb-demo";

/// Kills the child on drop.
struct Guard(Child, &'static str);

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        eprintln!("demo: {} had to be killed", self.1);
    }
}

fn wait_http(url: &str, what: &str) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end {
        if ureq::get(url)
            .timeout(Duration::from_secs(1))
            .call()
            .is_ok()
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{what} did not come up at {url}")
}

/// Runs the demo with binaries from `bin_dir`.
pub fn run(bin_dir: &Path, backends: u16, keep_running: bool) -> Result<()> {
    println!(
        "demo: starting {backends} simulated vLLM instances (vllm-sim, Llama-3.1-8B/H100 latency model)"
    );
    let sim = Command::new(bin_dir.join("vllm-sim"))
        .args([
            "--instances",
            &backends.to_string(),
            "--base-port",
            &BASE_PORT.to_string(),
        ])
        .stdout(Stdio::null())
        .spawn()
        .context("starting vllm-sim")?;
    let _sim = Guard(sim, "vllm-sim");
    for i in 0..backends {
        wait_http(
            &format!("http://127.0.0.1:{}/health", BASE_PORT + i),
            "vllm-sim",
        )?;
    }

    let conf = std::env::temp_dir().join(format!("agentlb-demo-{}.toml", std::process::id()));
    std::fs::write(&conf, "[kernel]\npinning = true\n")
        .with_context(|| format!("writing {}", conf.display()))?;
    let mut cmd = Command::new(bin_dir.join("agentlb"));
    cmd.arg("run").arg("--config").arg(&conf).args([
        "--listen",
        LISTEN,
        "--admin",
        ADMIN,
        "--pin-dir",
        PIN_DIR,
        "--policy",
        "workflow",
    ]);
    for i in 0..backends {
        cmd.args(["--backend", &format!("http://127.0.0.1:{}", BASE_PORT + i)]);
    }
    println!(
        "demo: starting agentlb on {LISTEN} (admin {ADMIN}); kernel programs load when run as root"
    );
    let lb = cmd.spawn().context("starting agentlb")?;
    let _lb = Guard(lb, "agentlb");
    wait_http(&format!("http://{ADMIN}/ready"), "agentlb")?;
    let _ = std::fs::remove_file(&conf);
    let dp: Value = ureq::get(&format!("http://{ADMIN}/admin/dataplane"))
        .call()?
        .into_json()?;
    let before = dp["counters"].clone();

    // Workload: 4 workflows (a planner + 2 agents each) share a long per-workflow
    // context; every call appends to the agent's history.
    let workflows = 4;
    let agents = ["planner", "researcher", "writer"];
    let rounds = 3;
    let mut rows: BTreeMap<String, (BTreeSet<String>, u64, u64, Vec<f64>)> = BTreeMap::new();
    // Each agent of each workflow is its own client with its own keep-alive
    // connection (as separate agent processes would be).
    let mut clients: BTreeMap<(String, &str), (ureq::Agent, String)> = BTreeMap::new();
    let mut kernel_calls = 0usize;
    let started = Instant::now();
    for w in 0..workflows {
        let wf = format!("wf-{w}");
        let context = format!(
            "You are part of workflow {wf}. Shared task brief: {}",
            (0..120)
                .map(|i| format!("fact {w}-{i} about the task; "))
                .collect::<String>()
        );
        let mut histories: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
        for r in 0..rounds {
            for a in agents {
                let h = histories.entry(a).or_default();
                h.push(
                    json!({"role": "user", "content": format!("{a} step {r}: continue the work")}),
                );
                let mut messages = vec![json!({"role": "system", "content": context})];
                messages.extend(h.iter().cloned());
                let t = Instant::now();
                let (agent, home) = clients.entry((wf.clone(), a)).or_insert_with(|| {
                    (
                        ureq::AgentBuilder::new()
                            .timeout(Duration::from_secs(60))
                            .max_idle_connections_per_host(1)
                            .build(),
                        String::new(),
                    )
                });
                let resp = agent
                    .post(&format!("http://{LISTEN}/v1/chat/completions"))
                    .set("x-workflow-id", &wf)
                    .set("x-agent-id", a)
                    .send_json(json!({
                        "model": "meta-llama/Llama-3.1-8B-Instruct",
                        "messages": messages,
                        "max_tokens": 16,
                    }))
                    .with_context(|| format!("{wf}/{a} round {r}"))?;
                // Calls the kernel forwarded carry no agentlb header: they went to
                // the backend the connection was pinned to after its first call.
                let backend = match resp.header("x-agentlb-backend") {
                    Some(b) => {
                        *home = b.to_owned();
                        b.to_owned()
                    }
                    None => {
                        kernel_calls += 1;
                        home.clone()
                    }
                };
                let v: Value = resp.into_json()?;
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                let reply = v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned();
                h.push(json!({"role": "assistant", "content": reply}));
                let usage = &v["usage"];
                let row = rows.entry(wf.clone()).or_default();
                row.0.insert(backend);
                row.1 += usage["prompt_tokens"].as_u64().unwrap_or(0);
                row.2 += usage["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0);
                row.3.push(ms);
            }
        }
    }
    let elapsed = started.elapsed();

    println!(
        "\nworkflow  calls  backends used                                    prompt tok  cached tok  hit %   mean ms"
    );
    let (mut tp, mut tc) = (0, 0);
    for (wf, (used, p, c, lat)) in &rows {
        tp += p;
        tc += c;
        let mean = lat.iter().sum::<f64>() / lat.len().max(1) as f64;
        println!(
            "{wf:8}  {:5}  {:47}  {p:10}  {c:10}  {:5.1}  {mean:7.1}",
            lat.len(),
            used.iter().cloned().collect::<Vec<_>>().join(","),
            100.0 * *c as f64 / (*p).max(1) as f64
        );
    }
    println!(
        "total: {} calls in {:.1}s, prefix-cache hit rate {:.1}% of prompt tokens",
        rows.values().map(|r| r.3.len()).sum::<usize>(),
        elapsed.as_secs_f64(),
        100.0 * tc as f64 / tp.max(1) as f64
    );

    let calls: usize = rows.values().map(|r| r.3.len()).sum();
    drop(clients);
    std::thread::sleep(Duration::from_millis(300));
    let metrics = ureq::get(&format!("http://{ADMIN}/metrics"))
        .call()?
        .into_string()?;
    let metric = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0)
    };
    let handoffs = metric("agentlb_kernel_handoffs_total");
    if handoffs > 0.0 {
        println!(
            "\nkernel fast path: {handoffs} agent connections were handed to the kernel after their first call;\n  \
             {kernel_calls} of {calls} calls were then forwarded by the kernel's sockmap, never parsed or copied\n  \
             by agentlb's userspace engine ({} bytes to the backends, {} bytes back to the agents).",
            metric(r#"agentlb_bytes_total{path="kernel",direction="to_upstream"}"#),
            metric(r#"agentlb_bytes_total{path="kernel",direction="to_client"}"#),
        );
    } else {
        println!(
            "\nkernel fast path: not used ({}); every call went through the userspace engine.",
            if kernel_calls == 0 && metrics.contains("agentlb_kernel_dataplane_active 1") {
                "no hand-off"
            } else {
                "run as root to load the kernel programs"
            }
        );
    }

    let dp: Value = ureq::get(&format!("http://{ADMIN}/admin/dataplane"))
        .call()?
        .into_json()?;
    println!("\ndataplane: {}", dp["mode"].as_str().unwrap_or("?"));
    if let Some(reason) = dp["reason"].as_str() {
        println!("  reason: {reason}");
    }
    for p in dp["programs"].as_array().into_iter().flatten() {
        println!(
            "  program {:12} {:22} id {:5} on {}",
            p["name"].as_str().unwrap_or(""),
            p["kind"].as_str().unwrap_or(""),
            p["id"],
            p["attached_to"].as_str().unwrap_or("")
        );
    }
    if let Some(c) = dp["counters"].as_object() {
        println!("  kernel counters during the run:");
        for (k, v) in c {
            let d = v.as_u64().unwrap_or(0) - before[k].as_u64().unwrap_or(0);
            println!("    {k:30} {d}");
        }
    }
    println!(
        "\nThe policy here is {}: each workflow's calls stay on one instance, where its shared\ncontext is cached (with `--policy round_robin` they spread over all instances and each\nrebuilds it). `cargo xtask bench agentic` compares the policies with vllm-router and\nsglang-router.",
        ureq::get(&format!("http://{ADMIN}/admin/backends"))
            .call()?
            .into_json::<Value>()?["policy"]
    );
    let result = finish(keep_running);
    drop(_lb);
    let _ = Command::new(bin_dir.join("agentlb"))
        .args(["unpin", "--pin-dir", PIN_DIR])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    result
}

fn finish(keep_running: bool) -> Result<()> {
    if keep_running {
        println!("\nagentlb keeps running on {LISTEN} (admin {ADMIN}); press Ctrl-C to stop.");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    Ok(())
}
