//! Upstream HTTP/1.1 connections: a keep-alive pool per backend, and one
//! request/response-head exchange on a connection.
//!
//! A connection belongs to exactly one request at a time and is driven by that
//! request's own task (no connection task, no channel hop): the engine writes the
//! request, reads the response head and then relays the body straight from the
//! socket, so everything one `read` returns can leave in one client write. A
//! connection goes back to the pool only after its response ended cleanly with
//! nothing left over; a connection whose response was cut short is closed, which
//! is how an abandoned request is cancelled at vLLM.
//!
//! Pooled connections the backend closed while idle are detected on reuse: the
//! exchange fails before any response byte, and the engine retries once on a new
//! connection to the same backend without counting a backend failure. Idle
//! connections older than `limits.pool_idle_timeout` are dropped; connections
//! idle for more than [`CHECK_AFTER`] get a non-blocking liveness check before
//! reuse.

use std::{
    io,
    sync::Mutex,
    time::{Duration, Instant},
};

use bytes::BytesMut;
use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::h1::{self, Framing, Head, HeadError};
use crate::model::{Backend, BackendId};

/// Idle connections older than this are checked for a close before reuse.
pub const CHECK_AFTER: Duration = Duration::from_secs(1);
/// Largest upstream response head, by its own length however many reads
/// brought it ([`h1::parse_response`]); a larger one fails the exchange (502).
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;
const READ_BUF: usize = 16 * 1024;

/// One upstream connection with its read buffer.
#[derive(Debug)]
pub struct UpConn {
    /// The socket.
    pub stream: TcpStream,
    /// Bytes read and not yet consumed.
    pub buf: BytesMut,
    /// Whether this connection served an earlier request.
    pub reused: bool,
    /// The backend answered before the request was all written: never reused.
    pub unfinished: bool,
    idle_since: Instant,
}

/// Idle connections by backend.
#[derive(Debug)]
pub struct Pool {
    /// Per backend (a short list: scanned, not hashed).
    idle: Mutex<Vec<(BackendId, Vec<UpConn>)>>,
    max_idle: usize,
    idle_timeout: Duration,
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum ExchangeError {
    /// I/O error or close; `started` tells whether any response byte arrived.
    Io {
        /// The error.
        error: io::Error,
        /// Some response bytes had arrived.
        started: bool,
    },
    /// The response head was not valid HTTP/1.x.
    Malformed(HeadError),
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io { error, .. } => write!(f, "{error}"),
            Self::Malformed(e) => write!(f, "invalid response: {e}"),
        }
    }
}

impl ExchangeError {
    /// Failed before any response byte: safe to resend on a new connection when
    /// the connection was reused (the backend closed it while idle).
    pub fn before_response(&self) -> bool {
        matches!(self, Self::Io { started: false, .. })
    }
}

impl Pool {
    /// A pool keeping at most `max_idle` idle connections per backend, each for
    /// at most `idle_timeout`.
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
        }
    }

    /// How long idle connections are kept.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    fn take_idle(&self, id: BackendId, now: Instant) -> Option<UpConn> {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (_, list) = idle.iter_mut().find(|(b, _)| *b == id)?;
        // Most recently used first: the warmest connection, least likely closed.
        while let Some(c) = list.pop() {
            let age = now.saturating_duration_since(c.idle_since);
            if age >= self.idle_timeout {
                // Everything older sits below it.
                list.clear();
                return None;
            }
            if age < CHECK_AFTER || alive(&c.stream) {
                return Some(c);
            }
        }
        None
    }

    /// An idle connection to `backend`, or a new one (`fresh` forces a new one).
    /// `now` is the caller's recent clock reading (idle ages are measured
    /// against it).
    pub async fn checkout(
        &self,
        backend: &Backend,
        fresh: bool,
        connect_timeout: Duration,
        now: Instant,
    ) -> io::Result<UpConn> {
        if !fresh && let Some(c) = self.take_idle(backend.id, now) {
            return Ok(c);
        }
        let stream = connect(backend, connect_timeout).await?;
        Ok(UpConn {
            stream,
            buf: BytesMut::with_capacity(READ_BUF),
            reused: false,
            unfinished: false,
            idle_since: now,
        })
    }

    /// Returns a connection whose last response ended cleanly at `now`.
    pub fn checkin(&self, backend: BackendId, mut conn: UpConn, now: Instant) {
        if !conn.buf.is_empty() || conn.unfinished || self.max_idle == 0 {
            return;
        }
        conn.reused = true;
        conn.idle_since = now;
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = match idle.iter().position(|(b, _)| *b == backend) {
            Some(i) => &mut idle[i].1,
            None => {
                idle.push((backend, Vec::new()));
                let last = idle.len() - 1;
                &mut idle[last].1
            }
        };
        if list.len() >= self.max_idle {
            // Drop the oldest.
            list.remove(0);
        }
        list.push(conn);
    }

    /// Drops the idle connections of backends not in `keep`, and those idle
    /// past the timeout.
    pub fn retain(&self, keep: &[BackendId]) {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        idle.retain(|(id, _)| keep.contains(id));
        for (_, list) in idle.iter_mut() {
            list.retain(|c| c.idle_since.elapsed() < self.idle_timeout);
        }
    }
}

/// Whether an idle connection is still open: no EOF, error or stray bytes queued.
fn alive(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.try_read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

async fn connect(backend: &Backend, timeout: Duration) -> io::Result<TcpStream> {
    let attempt = async {
        let mut last = io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            format!("backend {} has no address", backend.name),
        );
        for a in &backend.addrs {
            match TcpStream::connect(a).await {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    return Ok(s);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect timed out after {} ms", timeout.as_millis()),
        )),
    }
}

/// Reads a whole response body of `framing` (the bytes after the head in `conn.buf`
/// first), up to `max` bytes. Returns the body and whether the connection can be reused
/// (the body ended by its framing, not by a close). For agentlb's own sub-requests (the
/// prefill leg), never for relaying.
pub async fn read_whole_body(
    conn: &mut UpConn,
    framing: Framing,
    max: usize,
) -> Result<(bytes::Bytes, bool), String> {
    let mut out: Vec<u8> = Vec::new();
    let mut chunked = h1::Chunked::new();
    let mut eof = false;
    loop {
        // Consume what is buffered.
        match framing {
            Framing::Empty => return Ok((bytes::Bytes::new(), true)),
            Framing::Length(n) => {
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                if n > max {
                    return Err(format!("response body of {n} bytes exceeds {max}"));
                }
                let take = (n - out.len()).min(conn.buf.len());
                out.extend_from_slice(&conn.buf.split_to(take));
                if out.len() == n {
                    return Ok((out.into(), conn.buf.is_empty()));
                }
            }
            Framing::Chunked => {
                let used = chunked
                    .decode(&conn.buf, |d| out.extend_from_slice(d))
                    .map_err(|e| e.to_string())?;
                let _ = conn.buf.split_to(used);
                if chunked.done() {
                    return Ok((out.into(), conn.buf.is_empty()));
                }
            }
            Framing::Close => {
                out.extend_from_slice(&conn.buf.split());
                if eof {
                    return Ok((out.into(), false));
                }
            }
        }
        if out.len() > max {
            return Err(format!("response body exceeds {max} bytes"));
        }
        if eof {
            return Err("connection closed inside the response body".into());
        }
        if conn.buf.capacity() - conn.buf.len() < 1024 {
            conn.buf.reserve(READ_BUF);
        }
        match tokio::io::AsyncReadExt::read_buf(&mut conn.stream, &mut conn.buf).await {
            Ok(0) => eof = true,
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Writes `head` and `body` while reading, until a complete final response head is
/// buffered (1xx heads are skipped). The caller bounds it with its first-byte
/// timeout.
///
/// A backend may answer before it has read the whole request body (an early 413 or
/// 400) and close: the answer is read while the body is still being written, so it is
/// relayed rather than lost to the reset the close causes, and the write stops
/// (as nginx does). Such a connection is not reused ([`UpConn::unfinished`]).
pub async fn exchange(conn: &mut UpConn, head: &[u8], body: &[u8]) -> Result<Head, ExchangeError> {
    let io_err = |error, started| ExchangeError::Io { error, started };
    conn.buf.clear();
    let mut started = false;
    let mut sent = false;
    let mut write_failed: Option<io::Error> = None;
    let (mut rd, mut wr) = conn.stream.split();
    let write = async {
        if body.is_empty() {
            wr.write_all(head).await
        } else {
            write_two(&mut wr, head, body).await
        }
    };
    tokio::pin!(write);
    loop {
        match h1::parse_response(&mut conn.buf, MAX_RESPONSE_HEAD) {
            Ok(Some(h)) if (100..200).contains(&h.status) => {
                if h.status == 101 {
                    return Err(ExchangeError::Malformed(HeadError::Malformed(
                        "unexpected protocol switch",
                    )));
                }
                continue;
            }
            Ok(Some(h)) => {
                // Answered before the request was all sent: this connection's request
                // stream is cut short.
                conn.unfinished = !sent;
                return Ok(h);
            }
            Ok(None) => {}
            Err(e) => return Err(ExchangeError::Malformed(e)),
        }
        if conn.buf.capacity() - conn.buf.len() < 1024 {
            conn.buf.reserve(READ_BUF);
        }
        let writing = !sent && write_failed.is_none();
        tokio::select! {
            biased;
            r = tokio::io::AsyncReadExt::read_buf(&mut rd, &mut conn.buf) => match r {
                Ok(0) => {
                    // A write error says more than the close it caused.
                    let e = write_failed.take().unwrap_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed before a response",
                        )
                    });
                    return Err(io_err(e, started));
                }
                Ok(_) => started = true,
                Err(e) => return Err(io_err(write_failed.take().unwrap_or(e), started)),
            },
            w = &mut write, if writing => match w {
                Ok(()) => sent = true,
                // Keep reading: the backend may have answered before it closed.
                Err(e) => write_failed = Some(e),
            },
        }
    }
}

/// Writes `a` then `b`, with one `writev` when the socket takes both.
async fn write_two(
    s: &mut (impl tokio::io::AsyncWrite + Unpin),
    a: &[u8],
    b: &[u8],
) -> io::Result<()> {
    let mut off = 0usize;
    let total = a.len() + b.len();
    while off < total {
        let n = if off < a.len() {
            let bufs = [io::IoSlice::new(&a[off..]), io::IoSlice::new(b)];
            s.write_vectored(&bufs).await?
        } else {
            s.write(&b[off - a.len()..]).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        off += n;
    }
    Ok(())
}
