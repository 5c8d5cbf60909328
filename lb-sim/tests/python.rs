//! Python clients against real `vllm-sim` processes: the `openai` SDK (+ `prometheus_client`'s
//! parser) and vllm-router 0.1.17 (cache_aware, round_robin, kv_aware over the sim's KV events).
//!
//! The interpreter comes from `AGENTLB_PYTHON` (a venv with tests/python-requirements.txt). If it
//! is unset the tests print why and pass, unless `AGENTLB_REQUIRE_PYTHON=1`, which makes them fail.

mod common;

use std::process::Command;
use std::time::Duration;

use common::Sim;

fn python() -> Option<String> {
    match std::env::var("AGENTLB_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            if std::env::var("AGENTLB_REQUIRE_PYTHON").as_deref() == Ok("1") {
                panic!("AGENTLB_REQUIRE_PYTHON=1 but AGENTLB_PYTHON is not set");
            }
            eprintln!(
                "skipping: AGENTLB_PYTHON is not set (a venv with openai, vllm-router==0.1.17, prometheus-client)"
            );
            None
        }
    }
}

fn run_script(py: &str, script: &str, args: &[String]) {
    let path = format!("{}/tests/py/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new(py)
        .arg(&path)
        .args(args)
        .spawn()
        .unwrap_or_else(|e| panic!("run {py} {path}: {e}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "{script} failed: {status}");
            return;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{script} timed out");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn openai_sdk_against_vllm_sim() {
    let Some(py) = python() else { return };
    let sim = Sim::spawn(&["--time-scale", "10"]);
    run_script(&py, "openai_sdk.py", &[sim.url(0, "")]);
}

#[test]
fn vllm_router_against_vllm_sim() {
    let Some(py) = python() else { return };
    let sim = Sim::spawn(&[
        "--time-scale",
        "10",
        "--instances",
        "2",
        "--kv-events",
        "--kv-events-base-port",
        "0",
    ]);
    let mut args = vec![sim.url(0, ""), sim.url(1, "")];
    for kv in &sim.kv_ports {
        let (p, r) = kv.expect("kv ports");
        args.push(p.to_string());
        args.push(r.to_string());
    }
    run_script(&py, "vllm_router.py", &args);
}
