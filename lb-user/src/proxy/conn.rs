//! One task per client connection: read a request, answer or proxy it, relay
//! the response, repeat while the connection is kept alive.
//!
//! Limits: the request head must arrive within `limits.header_read_timeout`
//! (the same timer closes idle keep-alive connections) and fit in
//! `limits.max_header_bytes` (431); the body within `limits.body_read_timeout`
//! (408) and `limits.max_body_bytes` (413). A request with an unread body that
//! is answered with an error gets `Connection: close`. Malformed HTTP gets a
//! 400 JSON error and the connection is closed; other connections are not
//! affected.
//!
//! Relay: everything one upstream `read` returned leaves in one client write
//! (chunked upstream bodies are decoded and re-framed as one chunk per read), so
//! SSE events that arrive together are coalesced. While waiting for the backend
//! the client socket is watched: a client that closes cancels the upstream
//! request (its connection is closed, which vLLM treats as an abort).

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Instant,
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch},
    time::Sleep,
};

use super::{
    ApiError, Proxy, Settings, Upstream,
    h1::{self, Framing, Head, Known},
    meta, route_label,
    stream::{self, Outcome, Tracker},
};
use crate::model::{H_BACKEND, H_REQUEST_ID};

const READ_BUF: usize = 8 * 1024;
/// Bytes of a pipelined next request kept while a response is in flight.
const MAX_PIPELINED: usize = 64 * 1024;
/// Bodies larger than this are tokenized (precise KV routing) on the blocking pool.
const INLINE_TOKENIZE_BYTES: usize = 16 * 1024;

/// Serves the proxy on `listener` until `stop` turns true, then lets in-flight
/// requests finish for at most `grace` (idle connections close at once).
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    grace: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) {
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let stopping = Arc::new(AtomicBool::new(false));
    let limits = proxy.settings.load().limits.clone();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let tally = Arc::new(Tally::default());
    let pruner = {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let period = (proxy.pool.idle_timeout() / 3).max(std::time::Duration::from_millis(100));
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                proxy.prune_pool();
            }
        })
    };
    let trimmer = (!limits.memory_trim.is_zero()).then(|| {
        tokio::spawn(trim_memory(
            tally.clone(),
            proxy.clone(),
            limits.memory_trim,
        ))
    });
    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                proxy.metrics.connections_at_limit();
                tracing::warn!(
                    max_connections = limits.max_connections,
                    "client connection limit reached; not accepting until one closes"
                );
                tokio::select! {
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    _ = stop.changed() => break,
                }
            }
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let live = Live::new(tally.clone(), proxy.clone(), permit);
                let conn = Conn::new(
                    proxy.clone(),
                    stream,
                    peer,
                    Stop { rx: Some(stop.clone()), flag: stopping.clone() },
                    done_tx.clone(),
                    live,
                );
                tokio::spawn(conn.run());
            }
            _ = stop.changed() => break,
        }
    }
    stopping.store(true, Ordering::Relaxed);
    drop(listener);
    drop(done_tx);
    pruner.abort();
    if let Some(t) = trimmer {
        t.abort();
    }
    tokio::select! {
        _ = done_rx.recv() => tracing::info!("proxy drained"),
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(?grace, "shutdown grace elapsed; closing remaining connections");
        }
    }
}

/// Client connections of one listener: open now, and the most open since
/// freed memory was last returned.
#[derive(Default)]
struct Tally {
    open: AtomicUsize,
    peak: AtomicUsize,
}

/// Connections that must have closed since the last trim (from the peak) before
/// the next one: below this, what was freed is too little to be worth a pass
/// over the heap.
const TRIM_MIN_CLOSED: usize = 64;

/// Returns freed heap memory to the system once many client connections have
/// closed. glibc keeps what a connection storm freed in its arenas (each
/// worker thread allocates from its own), so without this the resident set
/// stays at the storm's peak; `malloc_trim` releases the free pages inside
/// every arena. It walks the heap (a few ms at most), so it runs on the
/// blocking pool and only after at least [`TRIM_MIN_CLOSED`] connections closed.
async fn trim_memory(tally: Arc<Tally>, proxy: Arc<Proxy>, period: std::time::Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let open = tally.open.load(Ordering::Relaxed);
        let peak = tally.peak.load(Ordering::Relaxed);
        if peak.saturating_sub(open) < TRIM_MIN_CLOSED {
            continue;
        }
        tally.peak.store(open, Ordering::Relaxed);
        let trimmed = tokio::task::spawn_blocking(release_free_memory).await;
        if trimmed.is_ok() {
            proxy.metrics.memory_trimmed();
            tracing::debug!(closed = peak - open, "returned freed memory to the system");
        }
    }
}

/// `malloc_trim(0)` where the allocator is glibc's; nothing elsewhere.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases the allocator's free memory;
    // it has no preconditions and is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// One open client connection: counted while it lives, and holding one of
/// the listener's `limits.max_connections` slots.
struct Live {
    tally: Arc<Tally>,
    proxy: Arc<Proxy>,
    /// `user`, or `kernel` once the connection was handed to the kernel.
    path: &'static str,
    _slot: OwnedSemaphorePermit,
}

impl Live {
    fn new(tally: Arc<Tally>, proxy: Arc<Proxy>, slot: OwnedSemaphorePermit) -> Self {
        let open = tally.open.fetch_add(1, Ordering::Relaxed) + 1;
        tally.peak.fetch_max(open, Ordering::Relaxed);
        proxy.metrics.connection_opened("user");
        Self {
            tally,
            proxy,
            path: "user",
            _slot: slot,
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.tally.open.fetch_sub(1, Ordering::Relaxed);
        self.proxy.metrics.connection_closed(self.path);
    }
}

/// How the response body is framed towards the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientFraming {
    Empty,
    Length(u64),
    Chunked,
    /// HTTP/1.0 client, unknown length: the close marks the end.
    Close,
}

/// How a relay ended.
struct Relayed {
    outcome: Outcome,
    /// The upstream connection can serve another request.
    reusable: bool,
}

impl Relayed {
    /// Writing to the client failed: its deadline passed (`timeout`) or it left.
    fn write_failed(timeout: bool) -> Self {
        Self {
            outcome: if timeout {
                Outcome::TimedOut
            } else {
                Outcome::ClientGone
            },
            reusable: false,
        }
    }
}

/// Shutdown signal of one connection: the flag is read per request; the
/// receiver wakes an idle connection (its wait is registered once per
/// connection, not per request).
struct Stop {
    rx: Option<watch::Receiver<bool>>,
    flag: Arc<AtomicBool>,
}

/// One client connection.
struct Conn {
    proxy: Arc<Proxy>,
    stream: TcpStream,
    peer: String,
    buf: BytesMut,
    out: Vec<u8>,
    scratch: Vec<u8>,
    /// The upstream request head being built (kept to reuse its allocation).
    upstream_head: Vec<u8>,
    stop: Stop,
    /// The current request still has body bytes unread on the socket.
    body_pending: bool,
    /// The client asked to close after this request (`Connection: close`, or
    /// HTTP/1.0 without keep-alive).
    client_closes: bool,
    /// Deadlines, one timer each per connection (see [`Deadline`]).
    timers: Timers,
    /// A clock reading taken when the last response ended: the next head
    /// deadline counts from it instead of reading the clock again.
    last_end: Option<Instant>,
    live: Live,
    /// Set by the relay when the connection was handed to the kernel with this
    /// upstream connection.
    pinned: Option<(super::upstream::UpConn, super::pinned::Pinned)>,
    /// A hand-off the relay of the current response should arm.
    pin_plan: Option<(Arc<super::pinned::FastPath>, crate::model::BackendId)>,
    /// A hand-off armed by the relay of the current response.
    pin_armed: Option<super::pinned::Pinned>,
    /// Bytes of the current response written to the client (added to the metrics
    /// when it ends).
    to_client: u64,
    _done: mpsc::Sender<()>,
}

/// The per-connection timers (see [`Conn::timers`]).
struct Timers {
    /// Request head (and idle keep-alive) deadline.
    head: Deadline,
    /// Backend first-byte deadline.
    first_byte: Deadline,
    /// Whole-request deadline.
    total: Deadline,
}

/// A deadline on a timer that is re-armed lazily. Each connection sets its
/// deadlines once or twice per request, nearly always later than before; that
/// only records the new deadline. The timer, when it fires before the recorded
/// deadline, re-arms itself for it. Re-arming tokio's timer on every request
/// (even with its cheap path for later deadlines) cost ~3% of the proxy's
/// instructions per request.
pub struct Deadline {
    sleep: Pin<Box<Sleep>>,
    at: tokio::time::Instant,
}

impl Deadline {
    fn new() -> Self {
        let sleep = Box::pin(tokio::time::sleep(std::time::Duration::from_secs(
            86_400 * 365,
        )));
        let at = sleep.deadline();
        Self { sleep, at }
    }

    /// Sets the deadline.
    pub fn set(&mut self, at: tokio::time::Instant) {
        if at < self.sleep.deadline() {
            self.sleep.as_mut().reset(at);
        }
        self.at = at;
    }

    /// Resolves once the deadline has passed.
    pub fn fired(&mut self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            loop {
                std::task::ready!(self.sleep.as_mut().poll(cx));
                if self.sleep.deadline() >= self.at {
                    return std::task::Poll::Ready(());
                }
                let at = self.at;
                self.sleep.as_mut().reset(at);
            }
        })
    }
}

impl Conn {
    fn new(
        proxy: Arc<Proxy>,
        stream: TcpStream,
        peer: SocketAddr,
        stop: Stop,
        done: mpsc::Sender<()>,
        live: Live,
    ) -> Self {
        Self {
            proxy,
            stream,
            peer: peer.ip().to_string(),
            buf: BytesMut::with_capacity(READ_BUF),
            out: Vec::with_capacity(READ_BUF),
            scratch: Vec::new(),
            upstream_head: Vec::new(),
            stop,
            body_pending: false,
            client_closes: false,
            timers: Timers {
                head: Deadline::new(),
                first_byte: Deadline::new(),
                total: Deadline::new(),
            },
            last_end: None,
            live,
            pinned: None,
            pin_plan: None,
            pin_armed: None,
            to_client: 0,
            _done: done,
        }
    }

    fn stopping(&self) -> bool {
        self.stop.flag.load(Ordering::Relaxed)
    }

    async fn run(mut self) {
        let mut rx = self.stop.rx.take();
        let stopped = async move {
            if let Some(rx) = rx.as_mut() {
                let _ = rx.wait_for(|stop| *stop).await;
            }
        };
        tokio::pin!(stopped);
        loop {
            let settings = self.proxy.settings.load_full();
            let head = match self.read_head(&settings, &mut stopped).await {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    let rid = new_request_id();
                    tracing::debug!(request_id = %rid, status = e.status.as_u16(), error = %e.message, "bad request head");
                    self.proxy
                        .metrics
                        .answered_locally("other", e.status.as_u16());
                    self.body_pending = true;
                    self.send_error(e, &rid, &settings).await;
                    break;
                }
            };
            let rid = request_id(&head);
            let span = tracing::debug_span!(
                "request",
                request_id = %rid,
                workflow_id = tracing::field::Empty,
                agent_id = tracing::field::Empty,
            );
            // Spans cost a little per poll even when disabled; skip them then.
            let keep = if span.is_disabled() {
                self.request(head, &rid, &settings).await
            } else {
                tracing::Instrument::instrument(self.request(head, &rid, &settings), span).await
            };
            if let Some((up, pair)) = self.pinned.take()
                && let Some(fp) = self.proxy.fastpath.clone()
            {
                // From here the kernel forwards both directions; this task only
                // watches the pair.
                self.live.path = "kernel";
                fp.watch(
                    &self.stream,
                    &up.stream,
                    pair,
                    &self.proxy.controller,
                    &mut stopped,
                )
                .await;
                return;
            }
            if !keep || self.stopping() {
                break;
            }
        }
        if self.body_pending {
            self.linger().await;
        }
        let _ = self.stream.shutdown().await;
    }

    /// Lingering close (as nginx does): the answer to a request whose body was left
    /// unread (413, 408, a bad head...) is out, but a client that sends its whole body
    /// before reading (Python's `urllib`) would get a reset instead of it if the socket
    /// closed with unread bytes. Half-close, then read and discard until the client
    /// closes, `limits.linger_ms` pass (at most 5 s without a byte), or
    /// `limits.linger_bytes` are read.
    async fn linger(&mut self) {
        let (total, max) = {
            let s = self.proxy.settings.load();
            (s.limits.linger, s.limits.linger_bytes)
        };
        if total.is_zero() || max == 0 {
            return;
        }
        let _ = self.stream.shutdown().await;
        let deadline = Instant::now() + total;
        let idle = total.min(std::time::Duration::from_secs(5));
        let mut read = 0usize;
        self.buf.clear();
        self.buf.reserve(READ_BUF);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            self.buf.clear();
            match tokio::time::timeout(idle.min(left), self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0) | Err(_)) | Err(_) => break,
                Ok(Ok(n)) => {
                    read += n;
                    if read >= max {
                        break;
                    }
                }
            }
        }
        tracing::debug!(bytes = read, "lingering close done");
    }

    /// Reads the next request head. `Ok(None)`: the connection is done (closed,
    /// idle past the header timeout, or shutting down).
    async fn read_head(
        &mut self,
        s: &Settings,
        stopped: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<Option<Head>, ApiError> {
        let max = s.limits.max_header_bytes;
        let timeout = s.limits.header_read_timeout;
        let from = self.last_end.take().unwrap_or_else(Instant::now);
        self.timers
            .head
            .set(tokio::time::Instant::from_std(from) + timeout);
        loop {
            if !self.buf.is_empty() {
                match h1::parse_request(&mut self.buf, max) {
                    Ok(Some(h)) => return Ok(Some(h)),
                    Ok(None) => {}
                    Err(h1::HeadError::TooLarge) => {
                        return Err(ApiError::headers_too_large(max));
                    }
                    Err(h1::HeadError::TooManyHeaders) => {
                        // The same 431, naming the limit that was hit.
                        let mut e = ApiError::headers_too_large(max);
                        e.message = format!(
                            "request headers exceed the limit of {} header fields",
                            h1::MAX_HEADERS
                        );
                        return Err(e);
                    }
                    Err(e @ h1::HeadError::Malformed(_)) => {
                        return Err(ApiError::invalid_request(e.to_string(), "malformed_http"));
                    }
                }
            }
            let idle = self.buf.is_empty();
            if idle && self.stopping() {
                return Ok(None);
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(READ_BUF);
            }
            tokio::select! {
                biased;
                r = self.stream.read_buf(&mut self.buf) => match r {
                    Ok(0) | Err(_) => return Ok(None),
                    Ok(_) => {}
                },
                () = self.timers.head.fired() => {
                    if idle {
                        return Ok(None);
                    }
                    return Err(ApiError::request_timeout(format!(
                        "the request head was not received within {} ms",
                        timeout.as_millis()
                    )));
                }
                () = stopped.as_mut(), if idle => return Ok(None),
            }
        }
    }

    /// Serves one request. Returns whether the connection stays open.
    async fn request(&mut self, head: Head, rid: &str, s: &Arc<Settings>) -> bool {
        let started = Instant::now();
        let path = head.path();
        let route = route_label(path);
        self.client_closes = !head.keep_alive();
        // RFC 9112 §3.2: exactly one Host in HTTP/1.1, at most one in HTTP/1.0.
        let hosts = head.values_of(Known::Host).take(2).count();
        if hosts > 1 || (hosts == 0 && head.minor >= 1) {
            self.body_pending = true;
            let m = if hosts > 1 {
                "more than one Host header field"
            } else {
                "an HTTP/1.1 request must have a Host header field"
            };
            self.reject(ApiError::invalid_request(m, "invalid_host"), rid, route, s)
                .await;
            return false;
        }
        let framing = match h1::request_framing(&head) {
            Ok(f) => f,
            Err(m) => {
                self.body_pending = true;
                self.reject(
                    ApiError::invalid_request(m, "invalid_framing"),
                    rid,
                    route,
                    s,
                )
                .await;
                return false;
            }
        };
        self.body_pending = framing != Framing::Empty;
        enum Target {
            Health,
            Ready,
            Models,
            Proxied,
            Stored(super::responses::StoredOp),
            Refused(ApiError),
        }
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let target = match (path, head.method()) {
            (p, m) if let Some(op) = super::responses::stored_op(p, m) => Target::Stored(op),
            (b"/health", b"GET") => Target::Health,
            (b"/ready", b"GET") => Target::Ready,
            (b"/v1/models", b"GET") => Target::Models,
            (p, b"POST") if super::PROXIED.contains(&p) => Target::Proxied,
            (p @ (b"/health" | b"/ready" | b"/v1/models"), m) => Target::Refused(
                ApiError::method_not_allowed(format!("{} {}: use GET", text(m), text(p))),
            ),
            (p, m) if super::PROXIED.contains(&p) => Target::Refused(ApiError::method_not_allowed(
                format!("{} {}: use POST", text(m), text(p)),
            )),
            (p, m) => Target::Refused(ApiError::not_found(format!(
                "no route for {} {}",
                text(m),
                text(p)
            ))),
        };
        let result = match target {
            Target::Health => {
                self.local(200, serde_json::json!({"status": "ok"}), rid, route);
                Ok(())
            }
            Target::Ready => {
                let (st, v) = super::ready_state(&self.proxy.controller);
                self.local(st.as_u16(), v, rid, route);
                Ok(())
            }
            Target::Models => {
                let data: Vec<_> = self
                    .proxy
                    .controller
                    .models()
                    .into_iter()
                    .map(|m| serde_json::json!({"id": m, "object": "model", "created": 0, "owned_by": "agentlb"}))
                    .collect();
                self.local(
                    200,
                    serde_json::json!({"object": "list", "data": data}),
                    rid,
                    route,
                );
                Ok(())
            }
            Target::Proxied | Target::Stored(_) => {
                let op = match target {
                    Target::Stored(op) => Some(op),
                    _ => None,
                };
                return match self
                    .proxied(head, framing, rid, s, started, route, op)
                    .await
                {
                    Ok(keep) => keep,
                    Err(e) => {
                        // A slot may have been released without a response.
                        self.proxy.limiter.released.notify_waiters();
                        self.reject(e, rid, route, s).await;
                        !self.closing()
                    }
                };
            }
            Target::Refused(e) => Err(e),
        };
        match result {
            Ok(()) => {
                if !self.write_out(s).await {
                    return false;
                }
            }
            Err(e) => self.reject(e, rid, route, s).await,
        }
        !self.closing()
    }

    /// Whether the connection closes after the current answer: a request body
    /// left unread, the client asked for it, or agentlb is stopping.
    fn closing(&self) -> bool {
        self.body_pending || self.client_closes || self.stopping()
    }

    /// Puts a locally generated JSON answer into `out`.
    fn local(&mut self, status: u16, v: serde_json::Value, rid: &str, route: &'static str) {
        self.proxy.metrics.answered_locally(route, status);
        let close = self.closing();
        let body = v.to_string();
        self.out.clear();
        put_json_head(&mut self.out, status, body.len(), rid, None, close);
        self.out.extend_from_slice(body.as_bytes());
    }

    /// Answers with an error (and logs it).
    async fn reject(&mut self, e: ApiError, rid: &str, route: &'static str, s: &Settings) {
        self.proxy
            .metrics
            .answered_locally(route, e.status.as_u16());
        if e.status.is_server_error() {
            tracing::warn!(request_id = rid, status = e.status.as_u16(), error = %e.message, "request failed");
        } else {
            tracing::debug!(status = e.status.as_u16(), error = %e.message, "request rejected");
        }
        self.send_error(e, rid, s).await;
    }

    async fn send_error(&mut self, e: ApiError, rid: &str, s: &Settings) {
        let body = e.json().to_string();
        let close = self.closing();
        self.out.clear();
        put_json_head(
            &mut self.out,
            e.status.as_u16(),
            body.len(),
            rid,
            e.retry_after,
            close,
        );
        self.out.extend_from_slice(body.as_bytes());
        self.write_out(s).await;
    }

    /// Writes the first `len` bytes of `out` to the client within the request's total
    /// deadline (see [`write_by`]) and counts them as written.
    async fn send_out(&mut self, len: usize) -> Result<(), bool> {
        write_by(&mut self.stream, &self.out[..len], &mut self.timers.total).await?;
        self.to_client += len as u64;
        Ok(())
    }

    /// Writes `out` within the header timeout (answers agentlb makes itself).
    async fn write_out(&mut self, s: &Settings) -> bool {
        let w = self.stream.write_all(&self.out);
        let ok = matches!(
            tokio::time::timeout(s.limits.header_read_timeout, w).await,
            Ok(Ok(()))
        );
        if ok {
            self.proxy.metrics.user_bytes(0, self.out.len() as u64);
        }
        ok
    }

    /// Reads more of the request body into `buf`; a close is an error.
    async fn read_more(&mut self) -> Result<(), ApiError> {
        if self
            .stream
            .read_buf(&mut self.buf)
            .await
            .map_err(body_err)?
            == 0
        {
            return Err(body_err("the client closed the connection"));
        }
        Ok(())
    }

    /// Reads the request body (`body_pending` is cleared once it is all read).
    async fn read_body(&mut self, framing: Framing, s: &Settings) -> Result<Bytes, ApiError> {
        let max = s.limits.max_body_bytes;
        let timeout = s.limits.body_read_timeout;
        let read = async {
            match framing {
                Framing::Empty | Framing::Close => Ok(Bytes::new()),
                Framing::Length(n) => {
                    let n = usize::try_from(n).unwrap_or(usize::MAX);
                    if n > max {
                        return Err(ApiError::too_large(max));
                    }
                    while self.buf.len() < n {
                        self.buf.reserve(n - self.buf.len());
                        self.read_more().await?;
                    }
                    self.body_pending = false;
                    Ok(self.buf.split_to(n).freeze())
                }
                Framing::Chunked => {
                    let mut dec = h1::Chunked::new();
                    let mut body = Vec::new();
                    let mut over = false;
                    loop {
                        let used = dec
                            .decode(&self.buf, |d| {
                                if body.len() + d.len() > max {
                                    over = true;
                                } else {
                                    body.extend_from_slice(d);
                                }
                            })
                            .map_err(|e| {
                                ApiError::invalid_request(e.to_string(), "invalid_framing")
                            })?;
                        self.buf.advance(used);
                        if over {
                            return Err(ApiError::too_large(max));
                        }
                        if dec.done() {
                            self.body_pending = false;
                            return Ok(Bytes::from(body));
                        }
                        self.buf.reserve(READ_BUF);
                        self.read_more().await?;
                    }
                }
            }
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::request_timeout(format!(
                "the request body was not received within {} ms",
                timeout.as_millis()
            ))),
        }
    }

    /// A proxied route: body, metadata, admission, upstream, relay. `stored` is a request
    /// on a stored Responses API response (no body needed).
    #[allow(clippy::too_many_arguments)]
    async fn proxied(
        &mut self,
        head: Head,
        framing: Framing,
        rid: &str,
        s: &Arc<Settings>,
        started: Instant,
        route: &'static str,
        stored: Option<super::responses::StoredOp>,
    ) -> Result<bool, ApiError> {
        let limits = &s.limits;
        let bodyless = stored.is_some() && framing == Framing::Empty;
        let multipart = super::multipart_route(head.path());
        let content_type = head.values_of(Known::ContentType).next();
        let mime = content_type
            .and_then(|v| v.split(|&b| b == b';').next())
            .map(<[u8]>::trim_ascii);
        let expected: &[u8] = if multipart {
            b"multipart/form-data"
        } else {
            b"application/json"
        };
        if !(bodyless || mime.is_some_and(|m| m.eq_ignore_ascii_case(expected))) {
            return Err(ApiError::invalid_request(
                format!("Content-Type must be {}", String::from_utf8_lossy(expected)),
                "invalid_content_type",
            ));
        }
        if let Framing::Length(n) = framing
            && n > limits.max_body_bytes as u64
        {
            return Err(ApiError::too_large(limits.max_body_bytes));
        }
        if self.body_pending && head.expects_continue() {
            self.out.clear();
            self.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            if !self.write_out(s).await {
                return Ok(false);
            }
        }
        let body = self.read_body(framing, s).await?;
        let mut meta = if multipart {
            // Audio: the model is a form field; the file is not a prompt.
            let mut m = meta::extract(&head, None, rid.to_owned(), &s.meta)?;
            m.model = meta::form_model(content_type.unwrap_or_default(), &body, &s.meta).await?;
            m
        } else {
            meta::extract(
                &head,
                (!bodyless).then_some(&body[..]),
                rid.to_owned(),
                &s.meta,
            )?
        };
        let proxy = self.proxy.clone();
        // Responses API: a request on a stored response goes to the backend that has it,
        // and a continuation joins the chain's workflow.
        let owner_of = stored
            .as_ref()
            .map(|o| o.id.clone())
            .or_else(|| meta.previous_response_id.clone())
            .filter(|_| s.follow_response_owner);
        if let Some(id) = &owner_of {
            let timeout = limits
                .connect_timeout
                .max(std::time::Duration::from_secs(2));
            let owner = proxy.response_owner(id, timeout).await?;
            meta.pinned = Some(owner.backend);
            if meta.workflow_id.is_none()
                && let Some(w) = owner.workflow
            {
                meta.workflow_id = Some(w);
                meta.workflow_source = Some(meta::WorkflowSource::Response);
                meta.root_key = None;
            }
        }
        // Lineage: a call that names its parent but no workflow joins the parent's.
        if meta.workflow_id.is_none()
            && let Some(p) = meta.parent_request_id.as_deref()
            && let Some(inh) = proxy.controller.workflows.parent(p)
        {
            meta.workflow_id = Some(inh.id);
            meta.workflow_source = Some(meta::WorkflowSource::Lineage);
            meta.root_key = None;
        }
        if let Some(m) = meta.model.as_deref()
            && !proxy
                .controller
                .backends()
                .iter()
                .any(|b| b.serves(Some(m)))
        {
            return Err(ApiError::model_not_found(m));
        }
        // Precise KV routing: the prompt's blocks as the backend will compute them.
        if let Some(kv) = proxy.controller.kv_for(&meta) {
            let kind = match route {
                "chat" => Some(crate::kv::tokenize::PromptKind::Chat),
                "completions" => Some(crate::kv::tokenize::PromptKind::Completion),
                _ => None,
            };
            if let Some(kind) = kind {
                // A long prompt whose pieces are not cached takes milliseconds to
                // tokenize: off the reactor, so other connections are not held up.
                meta.kv = if body.len() > INLINE_TOKENIZE_BYTES {
                    let (kv, body) = (kv.clone(), body.clone());
                    tokio::task::spawn_blocking(move || kv.prompt_keys(&body, kind, None))
                        .await
                        .ok()
                        .flatten()
                } else {
                    kv.prompt_keys(&body, kind, None)
                };
            }
        }
        // Without a tokenizer: an earlier prompt of the workflow, learned from a backend.
        let prompt_kind = match route {
            "chat" => Some(crate::kv::tokenize::PromptKind::Chat),
            "completions" => Some(crate::kv::tokenize::PromptKind::Completion),
            _ => None,
        };
        let learning = proxy
            .controller
            .kv
            .as_ref()
            .filter(|k| k.learner.is_some() && prompt_kind.is_some())
            .and_then(|_| crate::controller::policies::workflow::routing_key(&meta));
        if meta.kv.is_none() && learning.is_some() {
            meta.kv = proxy.controller.kv_learned(&meta);
        }
        let span = tracing::Span::current();
        if !span.is_disabled() {
            span.record("workflow_id", meta.workflow_id.as_deref().unwrap_or(""));
            span.record("agent_id", meta.agent_id.as_deref().unwrap_or(""));
        }
        let permit = proxy.limiter.acquire(limits.queue_timeout).await?;
        proxy.budget.request(started);

        // Upstream, watching for the client leaving meanwhile.
        let up = {
            let fwd = proxy.route(
                &head,
                &body,
                &meta,
                s,
                &self.peer,
                rid,
                started,
                &mut self.timers.first_byte,
                &mut self.upstream_head,
                route,
            );
            tokio::pin!(fwd);
            tokio::select! {
                biased;
                r = &mut fwd => r?,
                () = client_gone(&self.stream, &mut self.buf) => {
                    proxy.metrics.finished(route, started.elapsed().as_secs_f64(), Outcome::ClientGone);
                    proxy.limiter.released.notify_waiters();
                    tracing::debug!(request_id = rid, "client left before the response head");
                    return Ok(false);
                }
            }
        };
        let head_at = Instant::now();
        proxy
            .metrics
            .response_head(head_at.saturating_duration_since(started).as_secs_f64());
        let Upstream {
            mut conn,
            head: uh,
            backend,
            inflight,
            reason,
            predicted_cached,
            prefill,
        } = up;
        let ufr = h1::response_framing(&uh)
            .map_err(|m| ApiError::bad_gateway(format!("backend {} sent {m}", backend.name)))?;
        let cfr = match ufr {
            Framing::Empty => ClientFraming::Empty,
            Framing::Length(n) => ClientFraming::Length(n),
            Framing::Chunked | Framing::Close if head.minor >= 1 => ClientFraming::Chunked,
            Framing::Chunked | Framing::Close => ClientFraming::Close,
        };
        // Transfer codings other than the final chunked (`gzip, chunked`, or a
        // close-delimited `gzip`) stay in the client's Transfer-Encoding: the body
        // is relayed as it came, only re-chunked. HTTP/1.0 has no transfer codings.
        let codings = match ufr {
            Framing::Chunked | Framing::Close => h1::inner_codings(&uh)
                .map_err(|m| ApiError::bad_gateway(format!("backend {} sent {m}", backend.name)))?,
            _ => Vec::new(),
        };
        if !codings.is_empty() && cfr == ClientFraming::Close {
            return Err(ApiError::bad_gateway(format!(
                "backend {} sent a body with transfer coding {}, which an HTTP/1.0 client cannot receive",
                backend.name,
                String::from_utf8_lossy(&codings)
            )));
        }
        // An HTTP/1.0 client learns the end of such a body from the close.
        self.client_closes |= cfr == ClientFraming::Close;
        let keep = !self.closing();
        // Kernel hand-off (connection pinning) for a workflow's keep-alive
        // connection whose response framing the engine understands.
        let pin = proxy
            .fastpath
            .clone()
            .filter(|f| f.enabled())
            .filter(|_| {
                keep && head.minor >= 1
                    && meta.workflow_id.is_some()
                    && matches!(route, "chat" | "completions")
                    && prefill.is_none()
                    && uh.status == 200
                    && uh.keep_alive()
                    && matches!(ufr, Framing::Length(_) | Framing::Chunked)
            })
            .map(|f| (f, backend.id));

        // The client's response head, from the upstream one.
        let out = &mut self.out;
        out.clear();
        h1::put_status_line(out, uh.status, uh.reason());
        let mut sse = false;
        for (kind, name, value, line) in uh.fields() {
            match kind {
                Known::ContentType => sse = value.starts_with(b"text/event-stream"),
                Known::RequestId | Known::AgentlbBackend | Known::ContentLength => continue,
                _ if uh.is_hop_by_hop(kind, name) => continue,
                _ => {}
            }
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
        h1::put_header(out, H_REQUEST_ID.as_bytes(), rid.as_bytes());
        let policy = proxy.controller.policy_name();
        if s.backend_header {
            h1::put_header(out, H_BACKEND.as_bytes(), backend.name.as_bytes());
            out.extend_from_slice(b"x-agentlb-route: policy=");
            out.extend_from_slice(policy.as_bytes());
            out.extend_from_slice(b"; reason=");
            out.extend_from_slice(reason.as_str().as_bytes());
            out.extend_from_slice(b"; cached=");
            h1::put_dec(out, predicted_cached);
            if let Some(p) = &prefill {
                out.extend_from_slice(b"; prefill=");
                out.extend_from_slice(p.name.as_bytes());
            }
            out.extend_from_slice(b"\r\n");
        }
        match cfr {
            // 204 and 304 carry no Content-Length (RFC 9110 §8.6).
            ClientFraming::Empty if matches!(uh.status, 204 | 304) => {}
            ClientFraming::Empty => out.extend_from_slice(b"content-length: 0\r\n"),
            ClientFraming::Length(n) => {
                out.extend_from_slice(b"content-length: ");
                h1::put_dec(out, n);
                out.extend_from_slice(b"\r\n");
            }
            ClientFraming::Chunked => {
                out.extend_from_slice(b"transfer-encoding: ");
                if !codings.is_empty() {
                    out.extend_from_slice(&codings);
                    out.extend_from_slice(b", ");
                }
                out.extend_from_slice(b"chunked\r\n");
            }
            ClientFraming::Close => {}
        }
        if !keep {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");

        let status = uh.status;
        proxy.metrics.answered(route, &backend.label, status);
        proxy.metrics.routed(policy, reason);
        // The workflow this request belongs to in the table: its id, or its conversation
        // root when the policy keeps homes for implicit workflows.
        let tracked: Option<(u64, Option<String>)> = match (&meta.workflow_id, meta.root_key) {
            (Some(w), _) => Some((crate::controller::workflows::lookup_key(w), None)),
            (None, Some(k)) if proxy.controller.uses_homes() => {
                Some((k, Some(crate::controller::workflows::implicit_id(k))))
            }
            _ => None,
        };
        if let Some((key, implicit)) = &tracked {
            // Kept for a pre-warm, should this workflow have to move.
            if proxy.controller.uses_homes() {
                proxy.controller.prewarm.remember(*key, head.path(), &body);
            }
            let id = implicit
                .as_deref()
                .or(meta.workflow_id.as_deref())
                .unwrap_or("");
            if proxy.controller.workflows.start(
                *key,
                id,
                implicit.is_some(),
                meta.agent_id.as_deref(),
                meta.parent_request_id.as_deref(),
                &meta.request_id,
                backend.id,
            ) {
                proxy.metrics.lineage_edge();
            }
            if let Some(w) = &meta.workflow_id {
                proxy.metrics.workflow_request(w, meta.agent_id.as_deref());
            }
        }
        // Responses API: learn the owner of a new response; forget a deleted one.
        let learn_owner = route == "responses" && stored.is_none() && status == 200;
        if let Some(op) = &stored
            && head.method() == b"DELETE"
            && status == 200
        {
            proxy.controller.responses.forget(&op.id);
        }
        let chain_workflow: Option<String> = tracked
            .as_ref()
            .and_then(|(_, implicit)| implicit.clone().or_else(|| meta.workflow_id.clone()));
        let wf_key = tracked.map(|(k, _)| k);
        let end_workflow = meta.workflow_end;
        // The last prompt of an ended workflow goes first from the prefix index.
        if end_workflow && let Some(ix) = &proxy.controller.prefix {
            ix.demote(&meta.blocks);
        }
        if end_workflow && let (Some(kv), Some(p)) = (&proxy.controller.kv, &meta.kv) {
            kv.index.demote(&p.keys);
        }
        let metrics = proxy.metrics.clone();
        let this = proxy.clone();
        let backend_log = backend.clone();
        let rid_log = meta.request_id;
        let want_usage = wf_key.is_some() || predicted_cached > 0;
        // Learned after a complete 200 answer, from the backend that gave it.
        let learn = learning
            .zip(prompt_kind)
            .filter(|_| status == 200)
            .map(|(k, kind)| (k, kind, body.clone()));
        let on_end = move |outcome: Outcome,
                           usage: Option<crate::controller::workflows::Usage>,
                           ended: Instant| {
            this.metrics.finished(
                route,
                ended.saturating_duration_since(started).as_secs_f64(),
                outcome,
            );
            if let (Some((k, kind, body)), Some(kv)) = (learn, &this.controller.kv) {
                if end_workflow {
                    kv.end_learned(k);
                } else if outcome == Outcome::Complete {
                    kv.learn(k, backend_log.url.to_string(), body, kind);
                }
            }
            if let Some(u) = usage {
                this.metrics.cache_reuse(
                    &backend_log.label,
                    policy,
                    predicted_cached,
                    u.cached_tokens,
                );
            }
            if let Some(k) = wf_key {
                this.controller.workflows.finish(k, backend_log.id, usage);
                if end_workflow {
                    this.controller.workflows.end(k);
                    this.controller.prewarm.forget(k);
                    this.controller
                        .decisions
                        .send(crate::controller::decisions::Decision {
                            key: k,
                            backend: None,
                        });
                }
            }
            match outcome {
                Outcome::Complete => {}
                Outcome::ClientGone => {
                    tracing::debug!(request_id = %rid_log, backend = %backend_log.name, "client left before the response ended");
                }
                _ => {
                    tracing::info!(request_id = %rid_log, backend = %backend_log.name, ?outcome, "response ended early");
                }
            }
            this.limiter.released.notify_waiters();
        };
        let mut tracker = Tracker::new(
            started,
            want_usage,
            move |t| metrics.first_byte(route, t),
            on_end,
            (permit, inflight),
        );
        if learn_owner {
            let owners = proxy.clone();
            let owner = backend.id;
            tracker.capture_response_id(Box::new(move |id: String| {
                owners
                    .controller
                    .responses
                    .record(&id, owner, chain_workflow.as_deref());
            }));
        }
        if !conn.buf.is_empty() {
            tracker.arrived(head_at);
        }
        let deadline = tokio::time::Instant::from_std(started + limits.total_timeout);
        self.pin_plan = pin;
        let relayed = self
            .relay(&mut conn, ufr, cfr, sse, &mut tracker, deadline)
            .await;
        self.pin_plan = None;
        let ended = Instant::now();
        self.last_end = Some(ended);
        tracker.end(relayed.outcome, ended);
        proxy
            .metrics
            .user_bytes(0, std::mem::take(&mut self.to_client));
        if let Some(p) = self.pin_armed.take() {
            self.pinned = Some((conn, p));
            return Ok(false);
        }
        let upstream_keep = uh.keep_alive();
        if relayed.reusable && upstream_keep {
            proxy.pool.checkin(backend.id, conn, ended);
        }
        Ok(keep && !self.client_closes && relayed.outcome == Outcome::Complete)
    }

    /// Relays the upstream body to the client.
    async fn relay<F, E, H>(
        &mut self,
        conn: &mut super::upstream::UpConn,
        ufr: Framing,
        cfr: ClientFraming,
        sse: bool,
        tracker: &mut Tracker<F, E, H>,
        deadline: tokio::time::Instant,
    ) -> Relayed
    where
        F: FnOnce(f64),
        E: FnOnce(Outcome, Option<crate::controller::workflows::Usage>, Instant),
    {
        let mut dec = h1::Chunked::new();
        let mut remaining = match ufr {
            Framing::Length(n) => n,
            _ => 0,
        };
        self.timers.total.set(deadline);
        let mut eof = false;
        loop {
            // Everything buffered goes out in one write.
            let finished: bool;
            match ufr {
                Framing::Empty => finished = true,
                Framing::Length(_) => {
                    let n = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(conn.buf.len());
                    let data = conn.buf.split_to(n);
                    tracker.data(&data);
                    self.out.extend_from_slice(&data);
                    remaining -= n as u64;
                    finished = remaining == 0;
                }
                Framing::Chunked => {
                    self.scratch.clear();
                    let scratch = &mut self.scratch;
                    match dec.decode(&conn.buf, |d| scratch.extend_from_slice(d)) {
                        Ok(used) => conn.buf.advance(used),
                        Err(e) => {
                            return self
                                .fail(Outcome::UpstreamFailed, &e.to_string(), cfr, sse)
                                .await;
                        }
                    }
                    tracker.data(&self.scratch);
                    put_body(&mut self.out, &self.scratch, cfr);
                    finished = dec.done();
                }
                Framing::Close => {
                    let data = conn.buf.split();
                    tracker.data(&data);
                    put_body(&mut self.out, &data, cfr);
                    finished = eof;
                }
            }
            if eof && !finished {
                // A length-delimited or chunked body cut short.
                return self
                    .fail(
                        Outcome::UpstreamFailed,
                        "the backend closed the connection mid-response",
                        cfr,
                        sse,
                    )
                    .await;
            }
            if finished && cfr == ClientFraming::Chunked {
                self.out.extend_from_slice(h1::LAST_CHUNK);
            }
            if finished && let Some((fp, backend)) = self.pin_plan.take() {
                // Armed before the last byte: the client cannot have sent its
                // next request yet.
                if !self.buf.is_empty() || self.body_pending || !conn.buf.is_empty() {
                    fp.refused(super::pinned::refusal::PIPELINED);
                } else if self.out.is_empty() {
                    fp.refused(super::pinned::refusal::NO_TAIL);
                } else {
                    let last = self.out.len() - 1;
                    if let Err(timeout) = self.send_out(last).await {
                        self.out.clear();
                        return Relayed::write_failed(timeout);
                    }
                    self.out.drain(..last);
                    match fp.arm(&self.stream, &conn.stream, backend) {
                        Ok(p) => self.pin_armed = Some(p),
                        Err(reason) => {
                            fp.refused(reason);
                            if reason == super::pinned::refusal::RACE {
                                // Bytes may already have been forwarded: close
                                // both after this response.
                                self.client_closes = true;
                            }
                        }
                    }
                }
            }
            if !self.out.is_empty() {
                match self.send_out(self.out.len()).await {
                    Ok(()) => self.out.clear(),
                    Err(timeout) => {
                        self.out.clear();
                        return Relayed::write_failed(timeout);
                    }
                }
            }
            if finished {
                return Relayed {
                    outcome: Outcome::Complete,
                    reusable: ufr != Framing::Close && conn.buf.is_empty() && !self.client_closes,
                };
            }
            if conn.buf.capacity() - conn.buf.len() < 4096 {
                conn.buf.reserve(16 * 1024);
            }
            tokio::select! {
                biased;
                r = conn.stream.read_buf(&mut conn.buf) => match r {
                    Ok(0) => eof = true,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "upstream failed after the first byte");
                        let msg = format!("the backend failed mid-stream: {e}");
                        return self.fail(Outcome::UpstreamFailed, &msg, cfr, sse).await;
                    }
                },
                () = client_gone(&self.stream, &mut self.buf) => {
                    return Relayed { outcome: Outcome::ClientGone, reusable: false };
                }
                () = self.timers.total.fired() => {
                    return self
                        .fail(Outcome::TimedOut, "the request exceeded its total time limit", cfr, sse)
                        .await;
                }
            }
        }
    }

    /// Ends a response agentlb cannot finish: an SSE stream gets an error event
    /// and a clean end; other bodies are cut (the connection closes).
    async fn fail(
        &mut self,
        outcome: Outcome,
        message: &str,
        cfr: ClientFraming,
        sse: bool,
    ) -> Relayed {
        if outcome == Outcome::UpstreamFailed {
            tracing::warn!(error = message, "upstream failed after the first byte");
        }
        // `out` still holds the response head if it has not been written yet.
        if sse && matches!(cfr, ClientFraming::Chunked | ClientFraming::Close) {
            let event = stream::error_event(&format!("agentlb: {message}"));
            put_body(&mut self.out, &event, cfr);
            if cfr == ClientFraming::Chunked {
                self.out.extend_from_slice(h1::LAST_CHUNK);
            }
            let _ = self.send_out(self.out.len()).await;
        }
        self.out.clear();
        Relayed {
            outcome,
            reusable: false,
        }
    }
}

fn put_body(out: &mut Vec<u8>, data: &[u8], cfr: ClientFraming) {
    match cfr {
        ClientFraming::Chunked => h1::put_chunk(out, data),
        _ => out.extend_from_slice(data),
    }
}

fn body_err(e: impl std::fmt::Display) -> ApiError {
    ApiError::invalid_request(
        format!("error reading the request body: {e}"),
        "body_read_error",
    )
}

/// Writes `buf`, giving up when `sleep` fires (`Err(true)`) or the client fails
/// (`Err(false)`). Most writes complete at once without arming anything.
async fn write_by(s: &mut TcpStream, buf: &[u8], deadline: &mut Deadline) -> Result<(), bool> {
    let mut off = 0;
    while off < buf.len() {
        match s.try_write(&buf[off..]) {
            Ok(0) => return Err(false),
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(_) => return Err(false),
        }
    }
    if off == buf.len() {
        return Ok(());
    }
    tokio::select! {
        r = s.write_all(&buf[off..]) => r.map_err(|_| false),
        () = deadline.fired() => Err(true),
    }
}

/// Resolves when the client closes (or its socket fails). Bytes it sends
/// meanwhile (a pipelined request) are kept in `buf`, up to a bound.
async fn client_gone(s: &TcpStream, buf: &mut BytesMut) {
    loop {
        if buf.len() >= MAX_PIPELINED {
            return std::future::pending().await;
        }
        if s.readable().await.is_err() {
            return;
        }
        buf.reserve(READ_BUF);
        match s.try_read_buf(buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

fn put_json_head(
    out: &mut Vec<u8>,
    status: u16,
    len: usize,
    rid: &str,
    retry_after: Option<u64>,
    close: bool,
) {
    h1::put_status_line(out, status, b"");
    out.extend_from_slice(b"content-type: application/json\r\ncontent-length: ");
    h1::put_dec(out, len as u64);
    out.extend_from_slice(b"\r\n");
    h1::put_header(out, H_REQUEST_ID.as_bytes(), rid.as_bytes());
    if let Some(s) = retry_after {
        out.extend_from_slice(b"retry-after: ");
        h1::put_dec(out, s);
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The client's request id (1–128 visible ASCII bytes), or a new one.
fn request_id(h: &Head) -> String {
    h.values_of(Known::RequestId)
        .next()
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.iter().all(|b| (0x21..=0x7e).contains(b)))
        .and_then(|v| std::str::from_utf8(v).ok())
        .map_or_else(new_request_id, str::to_owned)
}

/// `agentlb-` + 32 hex digits: a random per-process prefix and a counter, so
/// ids are unique without drawing random numbers per request.
fn new_request_id() -> String {
    use std::sync::{
        LazyLock,
        atomic::{AtomicU64, Ordering},
    };
    const HEX: &[u8; 16] = b"0123456789abcdef";
    static PREFIX: LazyLock<String> = LazyLock::new(|| {
        let r: u64 = rand::random();
        (0..16)
            .map(|i| char::from(HEX[((r >> ((15 - i) * 4)) & 15) as usize]))
            .collect()
    });
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut id = String::with_capacity(40);
    id.push_str("agentlb-");
    id.push_str(&PREFIX);
    let mut digits = [b'0'; 16];
    for (i, d) in digits.iter_mut().enumerate() {
        *d = HEX[((n >> ((15 - i) * 4)) & 15) as usize];
    }
    id.push_str(std::str::from_utf8(&digits).unwrap_or("0"));
    id
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Elapsed paused-clock time since `t`, in whole milliseconds (the timer
    /// wheel's resolution).
    fn ms_since(t: tokio::time::Instant) -> u128 {
        t.elapsed().as_millis()
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_move_later_lazily_and_earlier_at_once() {
        let start = tokio::time::Instant::now();
        let mut d = Deadline::new();
        d.set(start + Duration::from_secs(10));
        // Later: only recorded; the timer fires at 10 s, re-arms, fires at 30 s.
        d.set(start + Duration::from_secs(30));
        assert!(
            tokio::time::timeout(Duration::from_secs(29), d.fired())
                .await
                .is_err(),
            "must not fire at the superseded deadline"
        );
        d.fired().await;
        assert_eq!(ms_since(start), 30_000);

        // Earlier than the armed timer: re-armed at once.
        let t = tokio::time::Instant::now();
        d.set(t + Duration::from_secs(60));
        d.set(t + Duration::from_secs(5));
        d.fired().await;
        assert_eq!(ms_since(t), 5_000);

        // A deadline already passed fires without waiting.
        let t = tokio::time::Instant::now();
        d.set(t);
        d.fired().await;
        assert_eq!(ms_since(t), 0);
    }
}
