//! Unprivileged end-to-end suite: the real `agentlb` binary in userspace mode on
//! loopback in front of real HTTP backends, and its command line.

use std::{process::Command, time::Duration};

use anyhow::{Context, Result};
use serde_json::Value;
use testkit::{Proc, free_port, get_json, temp_file, wait_until, workspace_bin};

fn backend(name: &str) -> Result<(Proc, u16)> {
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tiny-backend"));
    cmd.arg(name).arg(format!("127.0.0.1:{port}"));
    let p = Proc::spawn(name, cmd)?;
    wait_until(Duration::from_secs(10), || {
        p.output().contains("listening").then_some(())
    })
    .context("backend did not start")?;
    Ok((p, port))
}

fn agentlb(args: &[String]) -> Result<(Proc, u16, u16)> {
    let lb = testkit::Lb::start(args)?;
    Ok((lb.proc_, lb.port, lb.admin))
}

#[test]
fn round_robin_over_real_backends_in_userspace_mode() -> Result<()> {
    let (_b0, p0) = backend("b0")?;
    let (_b1, p1) = backend("b1")?;
    let (mut lb, listen, admin) = agentlb(&[
        "--backend".into(),
        format!("http://127.0.0.1:{p0}"),
        "--backend".into(),
        format!("http://127.0.0.1:{p1}"),
    ])?;
    let agent = ureq::AgentBuilder::new().build();
    let mut seen = Vec::new();
    for i in 0..6 {
        let resp = agent
            .post(&format!("http://127.0.0.1:{listen}/v1/completions"))
            .set("x-request-id", &format!("req-{i}"))
            .set("content-type", "application/json")
            .send_string("{\"prompt\":\"hi\"}")?;
        assert_eq!(
            resp.header("x-request-id"),
            Some(format!("req-{i}").as_str())
        );
        let v: Value = resp.into_json()?;
        assert_eq!(v["body_bytes"], 15);
        seen.push(v["backend"].as_str().unwrap_or("").to_owned());
    }
    assert_eq!(seen, ["b0", "b1", "b0", "b1", "b0", "b1"]);

    let st = get_json(&format!("http://127.0.0.1:{admin}/admin/dataplane"))?;
    assert_eq!(st["mode"], "userspace");
    assert!(st["reason"].as_str().unwrap_or("").contains("--no-kernel"));
    let metrics = ureq::get(&format!("http://127.0.0.1:{admin}/metrics"))
        .call()?
        .into_string()?;
    assert!(
        metrics.contains("agentlb_requests_total{route=\"completions\",backend=\"127.0.0.1:"),
        "{metrics}"
    );
    assert!(metrics.contains("agentlb_kernel_dataplane_active 0"));
    assert!(lb.terminate(Duration::from_secs(10))?.success());
    assert_eq!(lb.output().matches("running userspace-only").count(), 1);
    Ok(())
}

#[test]
fn dead_backend_gives_openai_style_502() -> Result<()> {
    let dead = free_port();
    let (mut lb, listen, _) = agentlb(&["--backend".into(), format!("http://127.0.0.1:{dead}")])?;
    let err = ureq::post(&format!("http://127.0.0.1:{listen}/v1/chat/completions"))
        .set("content-type", "application/json")
        .send_string("{}")
        .expect_err("must fail");
    let ureq::Error::Status(code, resp) = err else {
        panic!("transport error: {err}");
    };
    assert_eq!(code, 502);
    assert!(resp.header("x-request-id").is_some());
    let v: Value = resp.into_json()?;
    assert_eq!(v["error"]["type"], "upstream_error");
    assert_eq!(v["error"]["code"], "bad_gateway");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("refused"),
        "{v}"
    );
    assert!(lb.terminate(Duration::from_secs(10))?.success());
    Ok(())
}

#[test]
fn check_config_reports_every_error_at_once() -> Result<()> {
    let bad = temp_file(
        "bad.toml",
        "[server]\nlisten = \"x\"\nbogus = 1\n[kernel]\nmode = \"maybe\"\n[[backends]]\nurl = \"ftp://a\"\n",
    )?;
    let out = Command::new(workspace_bin("agentlb"))
        .arg("check-config")
        .arg(&bad)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    {
        let want = "server.bogus: unknown key";
        assert!(err.contains(want), "{err}");
    }
    let good = temp_file(
        "good.toml",
        "[[backends]]\nurl = \"http://127.0.0.1:8000\"\n",
    )?;
    let out = Command::new(workspace_bin("agentlb"))
        .arg("check-config")
        .arg(&good)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Semantic errors are all listed together.
    let bad2 = temp_file(
        "bad2.toml",
        "[server]\nlisten = \"x\"\n[kernel]\nmode = \"maybe\"\n[[backends]]\nurl = \"ftp://a\"\n",
    )?;
    let out = Command::new(workspace_bin("agentlb"))
        .arg("check-config")
        .arg(&bad2)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "server.listen",
        "kernel.mode",
        "backends[0].url",
        "3 configuration error(s)",
    ] {
        assert!(err.contains(want), "missing {want}: {err}");
    }
    Ok(())
}

#[test]
fn example_config_is_valid_and_help_documents_flags() -> Result<()> {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/agentlb.toml");
    let out = Command::new(workspace_bin("agentlb"))
        .arg("check-config")
        .arg(example)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(workspace_bin("agentlb"))
        .args(["run", "--help"])
        .output()?;
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--listen",
        "--admin",
        "--backend",
        "--policy",
        "--no-kernel",
        "--xdp-iface",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    Ok(())
}
