//! Active health checking: every `health.interval`, each backend gets
//! `GET /health`, a `GET /metrics` scrape (vLLM's load gauges, including the older
//! `vllm:gpu_*` names) and `GET /v1/models`. Consecutive failures past
//! `unhealthy_threshold` take a backend out of rotation; `healthy_threshold`
//! successes bring it back. Passive health (request failures → circuit breaker)
//! lives on [`Backend`] itself.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::sync::watch;

use super::Controller;
use crate::{
    config::HealthConfig,
    model::{Backend, BackendLoad},
};

/// The HTTP client of probes (and of the Responses owner lookup).
pub type ProbeClient = Client<HttpConnector, Empty<Bytes>>;

/// A probe client with a small pool per backend.
pub fn probe_client() -> ProbeClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(2)
        .build(connector)
}

/// Runs the checker until `stop` turns true. `cfg` is re-read every round, so a
/// reload takes effect on the next round.
pub async fn run(
    controller: Arc<Controller>,
    cfg: watch::Receiver<HealthConfig>,
    mut stop: watch::Receiver<bool>,
) {
    let client = probe_client();
    loop {
        let c = cfg.borrow().clone();
        let backends = controller.backends();
        let probes = backends
            .iter()
            .map(|b| probe(&client, b.clone(), c.clone()));
        // Workflows leave a backend that just failed at once (and their new homes are
        // pre-warmed), instead of on their next call.
        for (b, failed) in backends
            .iter()
            .zip(futures_util::future::join_all(probes).await)
        {
            if failed {
                controller.evacuate(b.id);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(c.interval) => {}
            // A backend connection ended badly: probe now rather than at the interval.
            () = controller.health_wake.notified() => {}
            _ = stop.changed() => return,
        }
    }
}

/// Consumes the kernel's reports of backend connections that the backend closed or
/// that were reset (`sock_ops`, `ALB_EVENTS`): each marks its backend suspect and wakes
/// the health checker, so a backend that died is out of rotation after one failed probe
/// instead of `unhealthy_threshold` probe intervals. A backend that closed an idle
/// connection answers the probe and is not suspect any more.
pub async fn watch_conn_events(
    controller: Arc<Controller>,
    mut events: tokio::sync::mpsc::Receiver<crate::dataplane::ConnEvent>,
    metrics: Arc<crate::admin::metrics::Metrics>,
) {
    while let Some(ev) = events.recv().await {
        let Some(b) = controller.backend_by_addr(ev.addr) else {
            continue;
        };
        metrics.conn_event(&b.label, ev.end.as_str());
        if b.healthy.load(Ordering::Relaxed) && !b.suspect.swap(true, Ordering::Relaxed) {
            tracing::debug!(backend = %b.name, end = ev.end.as_str(), "backend connection ended; probing now");
            controller.health_wake.notify_one();
        }
    }
}

/// `GET path` on a backend: status and body, `None` on any failure or after `timeout`.
pub async fn get(
    client: &ProbeClient,
    b: &Backend,
    path: &str,
    timeout: Duration,
) -> Option<(u16, Bytes)> {
    let uri = format!("{}{}", b.url.to_string().trim_end_matches('/'), path);
    let req = Request::get(uri).body(Empty::new()).ok()?;
    let fut = async {
        let resp = client.request(req).await.ok()?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, body))
    };
    tokio::time::timeout(timeout, fut).await.ok().flatten()
}

/// Weight of the newest scrape in the smoothed queue and KV usage.
const NEW_SAMPLE: f64 = 0.5;

/// The load the policies read: queue and KV usage averaged over the latest scrapes
/// (half the weight on the newest), so replicas that scrape at different moments of a
/// fluctuating queue see nearly the same numbers and agree on spills; the rest as
/// scraped.
fn smooth(prev: BackendLoad, now: BackendLoad) -> BackendLoad {
    let mix = |a: f64, b: f64| a * (1.0 - NEW_SAMPLE) + b * NEW_SAMPLE;
    BackendLoad {
        waiting: mix(prev.waiting, now.waiting),
        kv_usage: mix(prev.kv_usage, now.kv_usage),
        ..now
    }
}

/// Probes one backend; true when it just turned unhealthy.
async fn probe(client: &ProbeClient, b: Arc<Backend>, c: HealthConfig) -> bool {
    let ok = matches!(get(client, &b, "/health", c.timeout).await, Some((200, _)));
    let streak = if ok {
        let s = b.probe_streak.load(Ordering::Relaxed);
        let s = if s < 0 { 1 } else { s + 1 };
        b.probe_streak.store(s, Ordering::Relaxed);
        s
    } else {
        let s = b.probe_streak.load(Ordering::Relaxed);
        let s = if s > 0 { -1 } else { s - 1 };
        b.probe_streak.store(s, Ordering::Relaxed);
        s
    };
    let was = b.healthy.load(Ordering::Relaxed);
    let suspect = b.suspect.swap(false, Ordering::Relaxed);
    let mut failed = false;
    if was && (streak <= -(i64::from(c.unhealthy_threshold)) || (suspect && !ok)) {
        b.healthy.store(false, Ordering::Relaxed);
        tracing::warn!(backend = %b.name, "backend unhealthy (active check)");
        failed = true;
    } else if !was && streak >= i64::from(c.healthy_threshold) {
        b.healthy.store(true, Ordering::Relaxed);
        tracing::info!(backend = %b.name, "backend healthy again (active check)");
    }
    if !ok {
        return failed;
    }
    if let Some((200, body)) = get(client, &b, "/metrics", c.timeout).await {
        let now = parse_load(&String::from_utf8_lossy(&body));
        let prev = **b.load();
        b.set_load(smooth(prev, now));
    }
    if let Some((200, body)) = get(client, &b, "/v1/models", c.timeout).await
        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
    {
        let models: Vec<String> = v["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if **b.models.load() != models {
            b.set_models(models);
        }
    }
    false
}

/// Sums vLLM's load gauges over label sets (several engines per server).
pub fn parse_load(text: &str) -> BackendLoad {
    let mut load = BackendLoad::default();
    let (mut kv_sum, mut kv_n) = (0.0, 0u32);
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((name_labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let name = name_labels.split('{').next().unwrap_or("").trim();
        match name {
            "vllm:num_requests_running" => load.running += v,
            "vllm:num_requests_waiting" => load.waiting += v,
            "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => {
                kv_sum += v;
                kv_n += 1;
            }
            "vllm:cache_config_info" => {
                let label = |k: &str| -> Option<f64> {
                    let at = name_labels.find(&format!("{k}=\""))? + k.len() + 2;
                    let rest = &name_labels[at..];
                    rest[..rest.find('"')?].parse().ok()
                };
                if let (Some(bs), Some(n)) = (label("block_size"), label("num_gpu_blocks")) {
                    load.kv_capacity_tokens += bs * n;
                }
            }
            _ => {}
        }
    }
    if kv_n > 0 {
        load.kv_usage = kv_sum / f64::from(kv_n);
    }
    load
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_new_and_old_vllm_names() {
        let text = "# HELP x\nvllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3.0\n\
                    vllm:num_requests_running{engine=\"1\",model_name=\"m\"} 2\n\
                    vllm:num_requests_waiting{engine=\"0\"} 7\n\
                    vllm:gpu_cache_usage_perc{engine=\"0\"} 0.5\n\
                    vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"1000\",engine=\"0\"} 1.0\n";
        let l = parse_load(text);
        assert_eq!((l.running, l.waiting, l.kv_usage), (5.0, 7.0, 0.5));
        assert_eq!(l.kv_capacity_tokens, 16_000.0);
    }
}
