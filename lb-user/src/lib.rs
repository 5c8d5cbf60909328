//! agentlb: a workflow-aware L7 load balancer for vLLM clusters.
//!
//! Module map (see ARCHITECTURE.md):
//! - [`config`]: TOML + CLI → validated [`config::Config`];
//! - [`controller`]: backend registry and routing policies (the brain);
//! - [`proxy`]: the userspace hyper path;
//! - [`dataplane`]: the only module that names `aya` (kernel programs, maps, pins);
//! - [`admin`]: health, metrics and the admin API;
//! - [`model`]: shared domain types.
//!
//! Only [`run`] wires them together.

pub mod admin;
pub mod config;
pub mod controller;
pub mod dataplane;
pub mod kv;
pub mod model;
pub mod proxy;
pub mod reload;
pub mod telemetry;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch};

use crate::{
    admin::{Admin, metrics::Metrics},
    config::Config,
    controller::Controller,
    dataplane::Dataplane,
    proxy::{Proxy, limits::Limiter},
    reload::{ConfigSource, Reloader},
};

/// True when this binary embeds the kernel programs.
pub const EBPF_BUILT: bool = cfg!(feature = "ebpf");

/// Renders an error with all of its sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// Runs agentlb until SIGTERM/SIGINT. `source` re-reads the configuration for
/// reloads (SIGHUP, `POST /admin/reload`).
pub async fn run(config: Config, source: Option<ConfigSource>) -> anyhow::Result<()> {
    if !EBPF_BUILT {
        tracing::warn!(
            "this agentlb is a userspace-only build (compiled without the `ebpf` feature)"
        );
    }
    let backends = Controller::resolve(&config.backends).await?;
    let kv = kv::KvRouting::new(&config.kv).context("setting up KV-aware routing")?;
    let kv = kv.enabled().then(|| Arc::new(kv));
    let controller = Arc::new(
        Controller::new(backends, config.policy, &config.routing, &config.workflows).with_kv(kv),
    );

    // The dataplane joins its cgroup before any socket is created: sockets belong
    // to the cgroup of the task that creates them.
    let dataplane = Arc::new(
        Dataplane::start(&config.kernel, &[], &controller.published())
            .context("starting the kernel dataplane (kernel.mode = \"required\")")?,
    );
    let result = serve(config, source, controller, dataplane.clone()).await;
    dataplane.shutdown();
    result
}

async fn serve(
    config: Config,
    source: Option<ConfigSource>,
    controller: Arc<Controller>,
    dataplane: Arc<Dataplane>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding proxy listener {}", config.listen))?;
    let local = listener.local_addr()?;
    dataplane
        .set_listen_ports(&[local.port()])
        .context("publishing the listen port to the kernel")?;

    let limiter = Arc::new(Limiter::new(
        config.limits.max_concurrent,
        config.limits.max_queue,
    ));
    let metrics = Arc::new(Metrics::new(
        dataplane.clone(),
        controller.clone(),
        limiter.clone(),
        config.workflows.max_metric_labels,
    ));
    let fastpath = proxy::pinned::FastPath::new(
        &config.kernel,
        config.limits.shutdown_grace,
        dataplane.clone(),
        metrics.clone(),
    );
    if config.kernel.pinning && fastpath.is_none() {
        tracing::warn!(
            "kernel.pinning is on but the kernel dataplane is not active: every connection stays in userspace"
        );
    }
    let proxy = Arc::new(Proxy::new(
        controller.clone(),
        metrics.clone(),
        limiter,
        &config,
        fastpath,
    ));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (health_tx, health_rx) = watch::channel(config.health.clone());
    let reloader = Arc::new(Reloader::new(
        source,
        config.clone(),
        controller.clone(),
        dataplane.clone(),
        proxy.clone(),
        health_tx,
    ));

    let health_task = tokio::spawn(controller::health::run(
        controller.clone(),
        health_rx,
        stop_rx.clone(),
    ));
    // The kernel's reports of backend connections that ended badly wake the checker.
    let events_task = dataplane.take_conn_events().map(|rx| {
        tokio::spawn(controller::health::watch_conn_events(
            controller.clone(),
            rx,
            metrics.clone(),
        ))
    });
    let expiry_task = tokio::spawn(expire_workflows(controller.clone(), stop_rx.clone()));
    let kv_task = controller
        .kv
        .clone()
        .map(|kv| tokio::spawn(kv.run(controller.clone(), stop_rx.clone())));
    // The single writer of workflow decisions (in memory until the kernel consumes them).
    let decisions_task =
        controller
            .decisions
            .start(Box::new(controller::decisions::MemorySink::new(
                config.workflows.max_workflows,
            )));
    let admin_task = match config.admin {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding admin listener {addr}"))?;
            tracing::info!(addr = %l.local_addr()?, "admin API listening");
            let admin = Arc::new(Admin {
                dataplane: dataplane.clone(),
                controller: controller.clone(),
                metrics: metrics.clone(),
                reloader: reloader.clone(),
                token: config.admin_token.clone(),
                fastpath: proxy.fastpath.clone(),
            });
            Some(tokio::spawn(admin::serve_with(
                l,
                admin,
                stop_rx.clone(),
                config.limits.header_read_timeout,
            )))
        }
        None => None,
    };
    tracing::info!(
        addr = %local,
        backends = controller.backends().len(),
        policy = controller.policy_name(),
        dataplane = if dataplane.is_kernel() { "kernel" } else { "userspace" },
        "agentlb proxy listening"
    );
    let proxy_task = tokio::spawn(proxy::serve(
        listener,
        proxy,
        config.limits.shutdown_grace,
        stop_rx,
    ));

    wait_for_shutdown(&reloader).await?;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = proxy_task.await;
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    let _ = health_task.await;
    let _ = expiry_task.await;
    if let Some(t) = kv_task {
        let _ = t.await;
    }
    if let Some(t) = decisions_task {
        t.abort();
    }
    if let Some(t) = events_task {
        t.abort();
    }
    Ok(())
}

async fn expire_workflows(controller: Arc<Controller>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => {
                let n = controller.workflows.expire();
                if n > 0 {
                    tracing::debug!(expired = n, "idle workflows forgotten");
                }
            }
            _ = stop.changed() => return,
        }
    }
}

/// Waits for SIGTERM/SIGINT; SIGHUP reloads the configuration meanwhile.
async fn wait_for_shutdown(reloader: &Reloader) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM received"); return Ok(()); }
            _ = int.recv() => { tracing::info!("SIGINT received"); return Ok(()); }
            _ = hup.recv() => {
                tracing::info!("SIGHUP received: reloading configuration");
                if let Err(e) = reloader.reload().await {
                    tracing::error!(error = %e, "reload failed; keeping the running configuration");
                }
            }
        }
    }
}
