//! The dataplane: the ONLY module that names `aya`.
//!
//! [`Dataplane::start`] loads and attaches the kernel programs (see [`kernel`]) or,
//! when that is impossible or disabled, runs userspace-only and records one reason
//! (logged once). Everything else in agentlb talks to this type: it publishes
//! backends to the kernel, reads counters and reports status; in userspace-only
//! mode those calls are cheap no-ops, so the proxy never depends on the kernel.

pub mod cgroup;
#[cfg(feature = "ebpf")]
pub mod kernel;
pub mod pins;

use std::{net::SocketAddr, sync::Mutex};

use serde::Serialize;
use thiserror::Error;

use crate::config::{KernelConfig, KernelMode};

/// Dataplane failures.
#[derive(Debug, Error)]
pub enum DataplaneError {
    /// The object could not be loaded (verifier, permissions, kernel features).
    #[error("loading the eBPF object failed: {0}")]
    Load(String),
    /// A program step failed.
    #[error("{what}: {message}")]
    Program {
        /// Step.
        what: &'static str,
        /// Details.
        message: String,
    },
    /// A map step failed.
    #[error("map {what}: {message}")]
    Map {
        /// Map or step.
        what: &'static str,
        /// Details.
        message: String,
    },
    /// Pin directory / ABI problems.
    #[error(transparent)]
    Pins(#[from] pins::PinError),
    /// cgroup problems.
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    /// The binary has no kernel programs.
    #[error("this agentlb was built without the `ebpf` feature (userspace-only build)")]
    NotBuilt,
}

/// A backend as the kernel sees it: an id and its resolved addresses.
#[derive(Debug, Clone)]
pub struct PublishedBackend {
    /// Controller backend id.
    pub id: u32,
    /// Resolved TCP addresses.
    pub addrs: Vec<SocketAddr>,
}

/// The socket cookies of a pair handed to the kernel (their keys in
/// `ALB_SOCKS` and `ALB_PAIRS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairKeys {
    /// Client socket.
    pub client: u64,
    /// Upstream socket.
    pub upstream: u64,
}

/// What the kernel recorded for a pinned pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PairActivity {
    /// Bytes the kernel forwarded client → upstream.
    pub to_upstream: u64,
    /// Bytes the kernel forwarded upstream → client.
    pub to_client: u64,
    /// `CLOCK_MONOTONIC` ns of the last client → upstream redirect (0: none).
    pub last_request_ns: u64,
    /// `CLOCK_MONOTONIC` ns of the last upstream → client redirect (0: none).
    pub last_response_ns: u64,
}

/// How a backend connection ended, as `sock_ops` saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnEnd {
    /// The backend closed it (its FIN came first).
    PeerClosed,
    /// It was reset.
    Aborted,
}

impl ConnEnd {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PeerClosed => "peer_closed",
            Self::Aborted => "aborted",
        }
    }
}

/// A connection to a backend address ended (`ALB_EVENTS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnEvent {
    /// The backend address.
    pub addr: SocketAddr,
    /// How.
    pub end: ConnEnd,
    /// Its smoothed RTT then, µs.
    pub srtt_us: u32,
}

/// TCP statistics of agentlb's connections to one backend address (`ALB_TCP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct TcpStats {
    /// Smoothed RTT of the latest sample, µs.
    pub srtt_us: u32,
    /// RTT samples taken.
    pub rtt_samples: u64,
    /// Segments retransmitted.
    pub retransmits: u64,
    /// Connections the backend closed.
    pub peer_closes: u64,
    /// Connections reset.
    pub aborts: u64,
}

/// One attached program.
#[derive(Debug, Clone, Serialize)]
pub struct ProgramStatus {
    /// ELF/kernel name.
    pub name: String,
    /// Program type (and mode).
    pub kind: String,
    /// Kernel program id.
    pub id: u32,
    /// Attachment point.
    pub attached_to: String,
}

/// One map.
#[derive(Debug, Clone, Serialize)]
pub struct MapStatus {
    /// Name.
    pub name: String,
    /// Kernel map id.
    pub id: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
    /// Pin path, for maps that survive restarts.
    pub pinned: Option<String>,
}

/// What `/admin/dataplane` and `agentlb status` show.
#[derive(Debug, Clone, Serialize)]
pub struct DataplaneStatus {
    /// `kernel` or `userspace`.
    pub mode: &'static str,
    /// Why userspace-only, if so.
    pub reason: Option<String>,
    /// Attached programs.
    pub programs: Vec<ProgramStatus>,
    /// Maps.
    pub maps: Vec<MapStatus>,
    /// cgroup of `sock_ops`.
    pub cgroup: Option<String>,
    /// Pin directory.
    pub pin_dir: Option<String>,
    /// Backend entries published to the kernel.
    pub published_backends: usize,
    /// Kernel counters (summed over CPUs).
    pub counters: std::collections::BTreeMap<&'static str, u64>,
    /// Entries in `ALB_PAIRS` (two per pinned pair).
    pub pairs: usize,
    /// Sockets in `ALB_SOCKS`.
    pub sockets: usize,
}

/// The running dataplane.
pub struct Dataplane {
    #[cfg(feature = "ebpf")]
    kernel: Mutex<Option<kernel::KernelDataplane>>,
    #[cfg(not(feature = "ebpf"))]
    kernel: Mutex<Option<()>>,
    reason: Option<String>,
    pin_dir: String,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("kernel", &self.is_kernel())
            .field("reason", &self.reason)
            .finish()
    }
}

impl Dataplane {
    /// Starts the kernel dataplane according to `cfg.mode`. In `auto` mode any
    /// failure falls back to userspace-only with one logged reason; in `required`
    /// mode it is returned.
    pub fn start(
        cfg: &KernelConfig,
        listen_ports: &[u16],
        backends: &[PublishedBackend],
    ) -> Result<Self, DataplaneError> {
        let pin_dir = cfg.pin_dir.display().to_string();
        if cfg.mode == KernelMode::Off {
            return Ok(Self::userspace(
                "disabled by configuration (--no-kernel or kernel.mode = \"off\")",
                pin_dir,
            ));
        }
        match Self::try_kernel(cfg, listen_ports, backends) {
            Ok(dp) => Ok(dp),
            Err(e) if cfg.mode == KernelMode::Auto => {
                Ok(Self::userspace(&fallback_reason(&e), pin_dir))
            }
            Err(e) => Err(e),
        }
    }

    #[cfg(feature = "ebpf")]
    fn try_kernel(
        cfg: &KernelConfig,
        listen_ports: &[u16],
        backends: &[PublishedBackend],
    ) -> Result<Self, DataplaneError> {
        let k = kernel::KernelDataplane::start(cfg, listen_ports, backends)?;
        for p in k.programs() {
            tracing::info!(program = %p.name, kind = %p.kind, id = p.id, attached_to = %p.attached_to, "kernel program attached");
        }
        tracing::info!(
            pin_dir = %cfg.pin_dir.display(),
            cgroup = %k.cgroup_path().display(),
            "kernel dataplane active"
        );
        Ok(Self {
            kernel: Mutex::new(Some(k)),
            reason: None,
            pin_dir: cfg.pin_dir.display().to_string(),
        })
    }

    #[cfg(not(feature = "ebpf"))]
    fn try_kernel(
        _cfg: &KernelConfig,
        _listen_ports: &[u16],
        _backends: &[PublishedBackend],
    ) -> Result<Self, DataplaneError> {
        Err(DataplaneError::NotBuilt)
    }

    /// A userspace-only dataplane; logs the reason once.
    pub fn userspace(reason: &str, pin_dir: String) -> Self {
        tracing::warn!(
            reason,
            "running userspace-only: kernel dataplane not in use"
        );
        Self {
            kernel: Mutex::new(None),
            reason: Some(reason.to_owned()),
            pin_dir,
        }
    }

    /// True when the kernel programs are attached.
    pub fn is_kernel(&self) -> bool {
        lock(&self.kernel).is_some()
    }

    /// Publishes the backend set to the kernel (no-op in userspace mode).
    pub fn publish_backends(&self, backends: &[PublishedBackend]) -> Result<(), DataplaneError> {
        #[cfg(feature = "ebpf")]
        if let Some(k) = lock(&self.kernel).as_mut() {
            return k.publish_backends(backends);
        }
        let _ = backends;
        Ok(())
    }

    /// Declares the proxy's listening ports: accepted sockets on them are client
    /// sockets (no-op in userspace mode).
    pub fn set_listen_ports(&self, ports: &[u16]) -> Result<(), DataplaneError> {
        #[cfg(feature = "ebpf")]
        if let Some(k) = lock(&self.kernel).as_mut() {
            return k.set_listen_ports(ports);
        }
        let _ = ports;
        Ok(())
    }

    /// Hands a client⇄upstream pair to the kernel (see
    /// [`kernel::KernelDataplane::pin_pair`]); an error in userspace mode.
    pub fn pin_pair(
        &self,
        client: std::os::fd::BorrowedFd<'_>,
        upstream: std::os::fd::BorrowedFd<'_>,
        backend_id: u32,
    ) -> Result<PairKeys, DataplaneError> {
        #[cfg(feature = "ebpf")]
        if let Some(k) = lock(&self.kernel).as_mut() {
            return k.pin_pair(client, upstream, backend_id);
        }
        let _ = (client, upstream, backend_id);
        Err(DataplaneError::Map {
            what: "ALB_PAIRS",
            message: "the kernel dataplane is not active".into(),
        })
    }

    /// Removes a pinned pair's map entries.
    pub fn unpin_pair(&self, keys: PairKeys) {
        #[cfg(feature = "ebpf")]
        if let Some(k) = lock(&self.kernel).as_mut() {
            k.unpin_pair(keys);
        }
        let _ = keys;
    }

    /// Bytes and last activity the kernel recorded for a pinned pair.
    pub fn pair_activity(&self, keys: PairKeys) -> Option<PairActivity> {
        #[cfg(feature = "ebpf")]
        if let Some(k) = lock(&self.kernel).as_ref() {
            let (c, u) = k.pair_activity(keys)?;
            return Some(PairActivity {
                to_upstream: c.bytes,
                to_client: u.bytes,
                last_request_ns: c.last_ns,
                last_response_ns: u.last_ns,
            });
        }
        let _ = keys;
        None
    }

    /// Kill switch: turns the kernel's redirects of pinned pairs on or off.
    pub fn set_steering(&self, on: bool) -> Result<(), DataplaneError> {
        #[cfg(feature = "ebpf")]
        if let Some(k) = lock(&self.kernel).as_mut() {
            return k.set_steering(on);
        }
        let _ = on;
        Ok(())
    }

    /// Entries in the pair map and the sockhash: (pairs, sockets).
    pub fn pair_entries(&self) -> (usize, usize) {
        #[cfg(feature = "ebpf")]
        if let Some(k) = lock(&self.kernel).as_ref() {
            return k.pair_entries();
        }
        (0, 0)
    }

    /// Kernel counters, empty in userspace mode.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        #[cfg(feature = "ebpf")]
        if let Some(k) = lock(&self.kernel).as_ref() {
            return k.counters();
        }
        Vec::new()
    }

    /// Full status.
    pub fn status(&self) -> DataplaneStatus {
        let guard = lock(&self.kernel);
        #[cfg_attr(not(feature = "ebpf"), allow(unused_mut))]
        let mut st = DataplaneStatus {
            mode: if guard.is_some() {
                "kernel"
            } else {
                "userspace"
            },
            reason: self.reason.clone(),
            programs: Vec::new(),
            maps: Vec::new(),
            cgroup: None,
            pin_dir: guard.is_some().then(|| self.pin_dir.clone()),
            published_backends: 0,
            counters: Default::default(),
            pairs: 0,
            sockets: 0,
        };
        #[cfg(feature = "ebpf")]
        if let Some(k) = guard.as_ref() {
            st.programs = k.programs().to_vec();
            st.maps = k.maps().to_vec();
            st.cgroup = Some(k.cgroup_path().display().to_string());
            st.published_backends = k.published_backends();
            st.counters = k.counters().into_iter().collect();
            (st.pairs, st.sockets) = k.pair_entries();
        }
        st
    }

    /// The kernel's reports of ended backend connections, once (the caller consumes
    /// them); `None` without the kernel dataplane or when already taken.
    pub fn take_conn_events(&self) -> Option<tokio::sync::mpsc::Receiver<ConnEvent>> {
        #[cfg(feature = "ebpf")]
        if let Some(k) = lock(&self.kernel).as_mut() {
            return k.take_conn_events();
        }
        None
    }

    /// TCP statistics per backend address (empty without the kernel dataplane).
    pub fn tcp_stats(&self) -> Vec<(SocketAddr, TcpStats)> {
        #[cfg(feature = "ebpf")]
        if let Some(k) = lock(&self.kernel).as_ref() {
            return k.tcp_stats();
        }
        Vec::new()
    }

    /// Detaches everything that does not persist (all programs; pinned maps stay).
    pub fn shutdown(&self) {
        #[cfg(feature = "ebpf")]
        if let Some(k) = lock(&self.kernel).take() {
            k.shutdown();
            tracing::info!(
                "kernel programs detached; pinned maps kept in {}",
                self.pin_dir
            );
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One line saying why the kernel path is not used, with the likely fix.
fn fallback_reason(e: &DataplaneError) -> String {
    let text = e.to_string();
    let lower = text.to_lowercase();
    if lower.contains("operation not permitted") || lower.contains("permission denied") {
        format!(
            "insufficient privileges ({text}); run as root or grant CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"
        )
    } else {
        text
    }
}
