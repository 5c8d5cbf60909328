//! Live reconfiguration (SIGHUP or `POST /admin/reload`): boot and reload share the
//! same parse + validate path. Backends are reconciled (unchanged ones keep their
//! state and connections), the policy, limits, retries, health and metadata
//! settings are swapped atomically (the proxy reads them per request); listeners,
//! kernel settings, the upstream pool's size and idle timeout and the global
//! concurrency limit need a restart and are reported as such. Existing connections are never dropped by a reload.

use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::watch;

use crate::{
    config::{Config, ConfigError, HealthConfig},
    controller::Controller,
    dataplane::Dataplane,
    proxy::{Proxy, Settings},
};

/// Produces a fresh validated config (file + the original CLI overrides).
pub type ConfigSource = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// What a reload did.
#[derive(Debug, Serialize)]
pub struct ReloadReport {
    /// Backends added.
    pub backends_added: usize,
    /// Backends removed.
    pub backends_removed: usize,
    /// Policy now in use.
    pub policy: String,
    /// Changed settings that only take effect after a restart.
    pub restart_required: Vec<&'static str>,
}

/// Applies reloads.
pub struct Reloader {
    source: Option<ConfigSource>,
    current: Mutex<Config>,
    controller: Arc<Controller>,
    dataplane: Arc<Dataplane>,
    proxy: Arc<Proxy>,
    health: watch::Sender<HealthConfig>,
    lock: tokio::sync::Mutex<()>,
}

impl Reloader {
    /// A reloader; without a source (no `--config`) reloads are refused.
    pub fn new(
        source: Option<ConfigSource>,
        current: Config,
        controller: Arc<Controller>,
        dataplane: Arc<Dataplane>,
        proxy: Arc<Proxy>,
        health: watch::Sender<HealthConfig>,
    ) -> Self {
        Self {
            source,
            current: Mutex::new(current),
            controller,
            dataplane,
            proxy,
            health,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Re-reads and applies the configuration.
    pub async fn reload(&self) -> Result<ReloadReport, String> {
        let _one_at_a_time = self.lock.lock().await;
        let Some(source) = &self.source else {
            return Err("agentlb was started without --config; nothing to reload".into());
        };
        let new = source().map_err(|e| e.to_string())?;
        let old = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut restart = Vec::new();
        if new.listen != old.listen {
            restart.push("server.listen");
        }
        if new.admin != old.admin {
            restart.push("server.admin");
        }
        if new.admin_token != old.admin_token {
            restart.push("server.admin_token");
        }
        if new.kernel != old.kernel {
            restart.push("kernel");
        }
        if new.limits.pool_max_idle_per_backend != old.limits.pool_max_idle_per_backend
            || new.limits.pool_idle_timeout != old.limits.pool_idle_timeout
        {
            restart.push("limits.pool_max_idle_per_backend/pool_idle_timeout_ms");
        }
        if new.limits.max_concurrent != old.limits.max_concurrent
            || new.limits.max_queue != old.limits.max_queue
        {
            restart.push("limits.max_concurrent/max_queue");
        }
        if new.limits.max_connections != old.limits.max_connections
            || new.limits.memory_trim != old.limits.memory_trim
        {
            restart.push("limits.max_connections/memory_trim_ms");
        }
        let (added, removed) = self
            .controller
            .reconcile(&new.backends)
            .await
            .map_err(|e| e.to_string())?;
        if added + removed > 0
            && let Err(e) = self
                .dataplane
                .publish_backends(&self.controller.published())
        {
            tracing::warn!(error = %e, "could not publish backends to the kernel");
        }
        self.controller.set_policy(new.policy, &new.routing);
        self.proxy
            .settings
            .store(Arc::new(Settings::from_config(&new)));
        let _ = self.health.send(new.health.clone());
        let report = ReloadReport {
            backends_added: added,
            backends_removed: removed,
            policy: self.controller.policy_name().into(),
            restart_required: restart,
        };
        tracing::info!(?report, "configuration reloaded");
        *self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = new;
        Ok(report)
    }
}
