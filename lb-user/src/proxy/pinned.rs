//! Connection pinning: the kernel fast path's hand-off protocol (research
//! `ebpf.md` §4.2).
//!
//! After the userspace engine has served the first request of a connection
//! carrying a workflow id, and while it relays that response, it may hand the
//! client socket and its (now dedicated) upstream socket to the kernel: both
//! join `ALB_SOCKS` and name each other in `ALB_PAIRS`, and from then on the
//! `sk_skb` verdict forwards every byte client → upstream and upstream → client
//! without waking agentlb. The hand-off is armed *before the last byte* of
//! response 1 is written, with both sockets' receive queues and agentlb's
//! buffers empty: a client that does not pipeline cannot have sent request 2
//! yet, so request 2 meets the pair; if bytes show up anyway (a pipelining
//! client, an unsolicited upstream byte) their order against what the kernel
//! may have forwarded is unknowable, and the pair is closed after response 1.
//!
//! Afterwards agentlb only watches the pair ([`FastPath::watch`]): the kernel
//! does not forward FIN, so an EOF or error on either side closes the other;
//! bytes that reach userspace (a redirect the kernel refused) close both; a
//! pair idle for `kernel.pin_idle_timeout_ms` closes; and once the last
//! response has been quiet for `kernel.pin_quiet_ms` a pair closes when it
//! outlived `kernel.pin_max_lifetime_ms`, its backend stopped being routable
//! (failure, drain, removal) or the kill switch was thrown. Clients then
//! reconnect and their next request is routed afresh by the userspace path.

use std::{
    os::fd::{AsFd, AsRawFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{io::Interest, net::TcpStream};

use crate::{
    admin::metrics::Metrics,
    config::KernelConfig,
    controller::Controller,
    dataplane::{Dataplane, PairActivity, PairKeys},
};

/// Why a hand-off did not happen (the `reason` label of
/// `agentlb_handoff_refusals_total`).
pub mod refusal {
    /// Bytes of a next request were already buffered (pipelining).
    pub const PIPELINED: &str = "pipelined";
    /// The response ended with nothing left to write after arming.
    pub const NO_TAIL: &str = "no_tail";
    /// The kernel refused the map updates.
    pub const MAP_ERROR: &str = "map_error";
    /// Bytes arrived while arming: the pair was closed after response 1.
    pub const RACE: &str = "race";
    /// The kill switch was thrown while the response was relayed.
    pub const DISABLED: &str = "disabled";
}

/// Why a pinned pair ended (the `reason` label of
/// `agentlb_pinned_pair_closes_total`).
pub mod closed {
    /// The client closed its connection.
    pub const CLIENT: &str = "client_closed";
    /// The backend closed its connection (or failed).
    pub const BACKEND: &str = "backend_closed";
    /// Bytes reached userspace on a pinned socket.
    pub const PASSED: &str = "passed_to_user";
    /// No bytes for `kernel.pin_idle_timeout_ms`.
    pub const IDLE: &str = "idle";
    /// Older than `kernel.pin_max_lifetime_ms`.
    pub const LIFETIME: &str = "lifetime";
    /// The backend is no longer routable (failed, draining, removed).
    pub const BACKEND_GONE: &str = "backend_not_routable";
    /// The kill switch was thrown.
    pub const KILL_SWITCH: &str = "kill_switch";
    /// agentlb is shutting down.
    pub const SHUTDOWN: &str = "shutdown";
    /// A socket error.
    pub const ERROR: &str = "error";
}

/// The fast path's state, shared by every connection.
pub struct FastPath {
    dataplane: Arc<Dataplane>,
    metrics: Arc<Metrics>,
    idle_timeout: Duration,
    max_lifetime: Duration,
    quiet: Duration,
    /// Longest wait for a quiet moment once the kill switch is thrown or
    /// agentlb stops (`limits.shutdown_grace_ms`): then the pair closes anyway.
    grace: Duration,
    /// Cleared by the kill switch: no new hand-offs, pinned pairs close.
    enabled: AtomicBool,
    open: AtomicUsize,
}

impl std::fmt::Debug for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastPath")
            .field("enabled", &self.enabled.load(Ordering::Relaxed))
            .field("open", &self.open.load(Ordering::Relaxed))
            .finish()
    }
}

/// A pair handed to the kernel.
pub struct Pinned {
    /// The map keys.
    pub keys: PairKeys,
    /// The backend.
    pub backend: crate::model::BackendId,
    /// When it was handed over.
    pub since: tokio::time::Instant,
}

impl FastPath {
    /// The fast path when `kernel.pinning` is on and the kernel dataplane runs.
    pub fn new(
        cfg: &KernelConfig,
        grace: Duration,
        dataplane: Arc<Dataplane>,
        metrics: Arc<Metrics>,
    ) -> Option<Self> {
        (cfg.pinning && dataplane.is_kernel()).then(|| Self {
            dataplane,
            metrics,
            idle_timeout: cfg.pin_idle_timeout,
            max_lifetime: cfg.pin_max_lifetime,
            quiet: cfg.pin_quiet,
            grace,
            enabled: AtomicBool::new(true),
            open: AtomicUsize::new(0),
        })
    }

    /// New hand-offs are allowed (the kill switch is off).
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Throws (false) or resets (true) the kill switch. Thrown: no pair is
    /// handed over, pinned pairs close at their next quiet moment (at the
    /// latest after `limits.shutdown_grace_ms`), and once the last one closed
    /// the verdict stops redirecting (so no response is cut by the switch
    /// itself).
    pub fn set_enabled(&self, on: bool) -> Result<(), crate::dataplane::DataplaneError> {
        self.enabled.store(on, Ordering::Relaxed);
        if on || self.open.load(Ordering::Relaxed) == 0 {
            self.dataplane.set_steering(on)
        } else {
            Ok(())
        }
    }

    /// Pinned pairs open now.
    pub fn open_pairs(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Arms the hand-off of `client` and `upstream` (see the module docs). On
    /// `Err(reason)` nothing is left in the maps; on `Err(RACE)` the caller must
    /// close both connections after writing the rest of the response.
    pub fn arm(
        &self,
        client: &TcpStream,
        upstream: &TcpStream,
        backend: crate::model::BackendId,
    ) -> Result<Pinned, &'static str> {
        if !self.enabled() {
            return Err(refusal::DISABLED);
        }
        if pending(client.as_raw_fd()) || pending(upstream.as_raw_fd()) {
            return Err(refusal::PIPELINED);
        }
        let keys = match self
            .dataplane
            .pin_pair(client.as_fd(), upstream.as_fd(), backend)
        {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "kernel hand-off refused");
                return Err(refusal::MAP_ERROR);
            }
        };
        if pending(client.as_raw_fd()) || pending(upstream.as_raw_fd()) {
            self.dataplane.unpin_pair(keys);
            return Err(refusal::RACE);
        }
        self.open.fetch_add(1, Ordering::Relaxed);
        self.metrics.handoff();
        Ok(Pinned {
            keys,
            backend,
            since: tokio::time::Instant::now(),
        })
    }

    /// Counts a refused hand-off.
    pub fn refused(&self, reason: &'static str) {
        self.metrics.handoff_refused(reason);
    }

    /// Watches a pinned pair until it ends (see the module docs), then removes
    /// its map entries and closes both sockets. `stopping` resolves when
    /// agentlb shuts down.
    pub async fn watch(
        &self,
        client: &TcpStream,
        upstream: &TcpStream,
        pair: Pinned,
        controller: &Controller,
        stopping: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stopping);
        let mut shutting_down = false;
        // Since when the pair has been asked to close (kill switch, shutdown).
        let mut asked: Option<tokio::time::Instant> = None;
        let tick = (self.quiet / 2)
            .min(self.idle_timeout / 4)
            .max(Duration::from_millis(20));
        let mut timer = tokio::time::interval(tick);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let reason = loop {
            tokio::select! {
                r = client.ready(Interest::READABLE) => {
                    if let Some(why) = readable(client, r, closed::CLIENT) {
                        break why;
                    }
                }
                r = upstream.ready(Interest::READABLE) => {
                    if let Some(why) = readable(upstream, r, closed::BACKEND) {
                        break why;
                    }
                }
                () = &mut stopping, if !shutting_down => shutting_down = true,
                _ = timer.tick() => {
                    let act = self.dataplane.pair_activity(pair.keys).unwrap_or_default();
                    let now = monotonic_ns();
                    let since_ns = now.saturating_sub(
                        u64::try_from(pair.since.elapsed().as_nanos()).unwrap_or(u64::MAX),
                    );
                    let last = act.last_request_ns.max(act.last_response_ns).max(since_ns);
                    if now.saturating_sub(last) >= nanos(self.idle_timeout) {
                        break closed::IDLE;
                    }
                    let ask = if shutting_down {
                        Some(closed::SHUTDOWN)
                    } else if !self.enabled() {
                        Some(closed::KILL_SWITCH)
                    } else {
                        None
                    };
                    if let Some(why) = ask {
                        let since = *asked.get_or_insert_with(tokio::time::Instant::now);
                        if since.elapsed() >= self.grace {
                            break why;
                        }
                    }
                    if !quiet(&act, now, since_ns, self.quiet) {
                        continue;
                    }
                    if let Some(why) = ask {
                        break why;
                    }
                    if pair.since.elapsed() >= self.max_lifetime {
                        break closed::LIFETIME;
                    }
                    if !controller.backend(pair.backend).is_some_and(|b| b.routable()) {
                        break closed::BACKEND_GONE;
                    }
                }
            }
        };
        let act = self.dataplane.pair_activity(pair.keys).unwrap_or_default();
        self.metrics
            .pinned_closed(reason, act.to_upstream, act.to_client);
        self.dataplane.unpin_pair(pair.keys);
        let left = self.open.fetch_sub(1, Ordering::Relaxed) - 1;
        if left == 0 && !self.enabled() {
            // The kill switch: the last pair is gone, stop the redirects too.
            if let Err(e) = self.dataplane.set_steering(false) {
                tracing::warn!(error = %e, "could not clear the kernel steering flag");
            }
        }
        tracing::debug!(
            reason,
            to_upstream = act.to_upstream,
            to_client = act.to_client,
            "pinned pair closed"
        );
        close(client);
        close(upstream);
    }
}

/// Whether the pair is between requests: the last bytes were a response, and
/// `quiet` has passed since (or nothing moved since the hand-off).
fn quiet(act: &PairActivity, now: u64, since_ns: u64, quiet: Duration) -> bool {
    let q = nanos(quiet);
    if act.last_request_ns == 0 && act.last_response_ns == 0 {
        return now.saturating_sub(since_ns) >= q;
    }
    act.last_response_ns >= act.last_request_ns && now.saturating_sub(act.last_response_ns) >= q
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A pinned socket became readable: EOF, an error, or bytes the kernel did not
/// forward. `None` when it was a spurious wake-up.
fn readable(
    s: &TcpStream,
    ready: std::io::Result<tokio::io::Ready>,
    eof_reason: &'static str,
) -> Option<&'static str> {
    if ready.is_err() {
        return Some(closed::ERROR);
    }
    match s.try_io(Interest::READABLE, || peek(s.as_raw_fd())) {
        Ok(0) => Some(eof_reason),
        Ok(_) => Some(closed::PASSED),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(_) => Some(eof_reason),
    }
}

/// `recv(MSG_PEEK | MSG_DONTWAIT)` of one byte: Ok(0) at EOF.
fn peek(fd: RawFd) -> std::io::Result<usize> {
    let mut b = 0u8;
    // SAFETY: recv writes at most 1 byte into `b`, which we own.
    let n = unsafe {
        libc::recv(
            fd,
            (&raw mut b).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Whether bytes (or an EOF) wait on the socket.
fn pending(fd: RawFd) -> bool {
    !matches!(peek(fd), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// `shutdown(SHUT_RDWR)`: the peer sees a FIN now even if the fd lives on.
fn close(s: &TcpStream) {
    // SAFETY: shutdown on a socket fd we own has no memory effects.
    unsafe {
        libc::shutdown(s.as_raw_fd(), libc::SHUT_RDWR);
    }
}

/// `CLOCK_MONOTONIC` in ns: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we own.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts);
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn act(req: u64, resp: u64) -> PairActivity {
        PairActivity {
            to_upstream: 1,
            to_client: 1,
            last_request_ns: req,
            last_response_ns: resp,
        }
    }

    #[test]
    fn a_pair_is_quiet_only_after_a_response_and_the_quiet_time() {
        let q = Duration::from_millis(100);
        let since = 1_000 * MS;
        // Nothing moved since the hand-off: quiet once the time has passed.
        assert!(!quiet(&act(0, 0), since + 50 * MS, since, q));
        assert!(quiet(&act(0, 0), since + 100 * MS, since, q));
        // A request is in flight (its bytes were the last): never quiet, however
        // long the backend thinks (a long prefill sends nothing for seconds).
        assert!(!quiet(&act(2_000 * MS, 1_500 * MS), 60_000 * MS, since, q));
        // The response was last: quiet after 100 ms without bytes.
        assert!(!quiet(&act(2_000 * MS, 2_010 * MS), 2_050 * MS, since, q));
        assert!(quiet(&act(2_000 * MS, 2_010 * MS), 2_110 * MS, since, q));
    }

    #[test]
    fn peek_tells_pending_bytes_eof_and_nothing_apart() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut a = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (b, _) = l.accept().expect("accept");
        b.set_nonblocking(true).expect("nonblocking");
        assert!(!pending(b.as_raw_fd()));
        std::io::Write::write_all(&mut a, b"x").expect("write");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !pending(b.as_raw_fd()) {
            assert!(std::time::Instant::now() < deadline, "byte never arrived");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(peek(b.as_raw_fd()).expect("peek"), 1);
        // Peeking consumed nothing.
        assert_eq!(peek(b.as_raw_fd()).expect("peek"), 1);
        let mut c = [0u8; 1];
        std::io::Read::read_exact(&mut &b, &mut c).expect("read");
        drop(a);
        while peek(b.as_raw_fd()).map_or(true, |n| n != 0) {
            assert!(std::time::Instant::now() < deadline, "EOF never seen");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
