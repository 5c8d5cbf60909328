//! `sock_ops`: counts established connections and registers agentlb's client and
//! upstream sockets in `ALB_SOCKS`, so the sockmap programs see their traffic; on
//! connections to a published backend it also asks for the RTT, retransmit and state
//! callbacks and keeps per-backend TCP statistics in `ALB_TCP`, and reports a
//! connection the backend closed or that was reset through `ALB_EVENTS`.
//!
//! A client socket is an accepted socket whose local port is a proxy listener
//! (`ALB_LISTEN`); an upstream socket is an outgoing one whose peer is a published
//! backend (`ALB_BACKENDS`). Everything else (admin API, health probes to other hosts)
//! is only counted.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RETRANS_CB, BPF_SOCK_OPS_RETRANS_CB_FLAG,
        BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, bpf_sock_ops,
    },
    helpers::bpf_get_socket_cookie,
    programs::SockOpsContext,
};
use aya_log_ebpf::{debug, warn};
use lb_common::{
    BackendKey, CFG_F_LOG_SOCKETS, CFG_F_REGISTER_SOCKETS, CTR_SOCKOPS_ACTIVE_ESTABLISHED,
    CTR_SOCKOPS_CALLS, CTR_SOCKOPS_PASSIVE_ESTABLISHED, CTR_SOCKOPS_REGISTER_FAILED,
    CTR_SOCKOPS_REGISTERED_CLIENT, CTR_SOCKOPS_REGISTERED_UPSTREAM, EV_ABORTED, EV_PEER_CLOSED,
    FAMILY_V4, FAMILY_V6, TcpEvent, TcpStats,
};

use crate::maps::{BACKENDS, EVENTS, LISTEN, SOCKS, TCP, bump, config_flags};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// `TCP_ESTABLISHED`, `TCP_CLOSE`, `TCP_CLOSE_WAIT` (include/net/tcp_states.h).
const TCP_ESTABLISHED: u32 = 1;
const TCP_CLOSE: u32 = 7;
const TCP_CLOSE_WAIT: u32 = 8;

/// Handles one `sock_ops` callback. Always returns 1 (never rejects anything).
#[inline(always)]
pub fn handle(ctx: &SockOpsContext) -> u32 {
    bump(CTR_SOCKOPS_CALLS, 1);
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            bump(CTR_SOCKOPS_PASSIVE_ESTABLISHED, 1);
            // local_port is in host byte order.
            let port = ctx.local_port();
            // SAFETY: plain lookup; the value is only tested for presence.
            if unsafe { LISTEN.get(port) }.is_some() {
                register(ctx, CTR_SOCKOPS_REGISTERED_CLIENT, port);
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            bump(CTR_SOCKOPS_ACTIVE_ESTABLISHED, 1);
            if let Some(key) = peer_key(ctx) {
                // SAFETY: plain lookup; the value is only tested for presence.
                if unsafe { BACKENDS.get(key) }.is_some() {
                    register(ctx, CTR_SOCKOPS_REGISTERED_UPSTREAM, u32::from(key.port));
                    // RTT samples, retransmits and state changes of this connection
                    // from now on (a failure only loses statistics).
                    let _ = ctx.set_cb_flags(
                        (BPF_SOCK_OPS_RTT_CB_FLAG
                            | BPF_SOCK_OPS_RETRANS_CB_FLAG
                            | BPF_SOCK_OPS_STATE_CB_FLAG) as i32,
                    );
                    let _ = TCP.insert(key, TcpStats::default(), u64::from(BPF_NOEXIST));
                }
            }
        }
        BPF_SOCK_OPS_RTT_CB => {
            let srtt = srtt_us(ctx);
            with_stats(ctx, |s| {
                s.srtt_us = srtt;
                s.rtt_samples += 1;
            });
        }
        BPF_SOCK_OPS_RETRANS_CB => with_stats(ctx, |s| s.retransmits += 1),
        BPF_SOCK_OPS_STATE_CB => {
            let (old, new) = (ctx.arg(0), ctx.arg(1));
            let kind = match (old, new) {
                (TCP_ESTABLISHED, TCP_CLOSE_WAIT) => EV_PEER_CLOSED,
                (TCP_ESTABLISHED, TCP_CLOSE) => EV_ABORTED,
                _ => return 1,
            };
            with_stats(ctx, |s| {
                if kind == EV_PEER_CLOSED {
                    s.peer_closes += 1;
                } else {
                    s.aborts += 1;
                }
            });
            if let Some(key) = peer_key(ctx) {
                let ev = TcpEvent {
                    key,
                    kind,
                    srtt_us: srtt_us(ctx),
                };
                // A full ring loses the event; the statistics above still count it.
                let _ = EVENTS.output::<TcpEvent>(&ev, 0);
            }
        }
        _ => {}
    }
    1
}

/// The connection's smoothed RTT, µs (the kernel keeps it ×8).
#[inline(always)]
fn srtt_us(ctx: &SockOpsContext) -> u32 {
    // SAFETY: `ops` is the program's context pointer, valid for this invocation.
    unsafe { (*ctx.ops).srtt_us >> 3 }
}

/// Updates the statistics of the connection's backend (callbacks are only asked for
/// on connections to published backends, whose entry was made then).
#[inline(always)]
fn with_stats(ctx: &SockOpsContext, f: impl FnOnce(&mut TcpStats)) {
    if let Some(key) = peer_key(ctx)
        && let Some(p) = TCP.get_ptr_mut(key)
    {
        // SAFETY: the pointer comes from the map lookup and is valid during this call.
        f(unsafe { &mut *p });
    }
}

/// Inserts the socket into `ALB_SOCKS` keyed by its cookie, if registration is enabled.
#[inline(always)]
fn register(ctx: &SockOpsContext, counter: u32, port: u32) {
    let flags = config_flags();
    if flags & CFG_F_REGISTER_SOCKETS == 0 {
        return;
    }
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: `ops` is the program's context pointer, valid for this invocation.
    let mut cookie = unsafe { bpf_get_socket_cookie(ops.cast()) };
    // SAFETY: as above; the helper only reads the socket behind the context.
    match SOCKS.update(&mut cookie, unsafe { &mut *ops }, u64::from(BPF_ANY)) {
        Ok(()) => {
            bump(counter, 1);
            if flags & CFG_F_LOG_SOCKETS != 0 {
                let kind = if counter == CTR_SOCKOPS_REGISTERED_CLIENT {
                    "client"
                } else {
                    "upstream"
                };
                debug!(
                    ctx,
                    "registered {} socket cookie={} port={}", kind, cookie, port
                );
            }
        }
        Err(e) => {
            bump(CTR_SOCKOPS_REGISTER_FAILED, 1);
            warn!(ctx, "sockhash insert failed: err={} cookie={}", e, cookie);
        }
    }
}

/// The peer address of the socket as a `BackendKey` (IPv4-mapped IPv6 → IPv4).
#[inline(always)]
fn peer_key(ctx: &SockOpsContext) -> Option<BackendKey> {
    // remote_port holds the network-order port in its upper 16 bits on little-endian.
    let port = u32::from_be(ctx.remote_port()) as u16;
    let mut key = BackendKey {
        addr: [0; 16],
        port,
        family: FAMILY_V4,
        _pad: 0,
    };
    match ctx.family() {
        AF_INET => {
            let a = ctx.remote_ip4().to_ne_bytes();
            key.addr[..4].copy_from_slice(&a);
        }
        AF_INET6 => {
            let w = ctx.remote_ip6();
            let mapped = w[0] == 0 && w[1] == 0 && w[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]);
            if mapped {
                key.addr[..4].copy_from_slice(&w[3].to_ne_bytes());
            } else {
                key.family = FAMILY_V6;
                key.addr[0..4].copy_from_slice(&w[0].to_ne_bytes());
                key.addr[4..8].copy_from_slice(&w[1].to_ne_bytes());
                key.addr[8..12].copy_from_slice(&w[2].to_ne_bytes());
                key.addr[12..16].copy_from_slice(&w[3].to_ne_bytes());
            }
        }
        _ => return None,
    }
    Some(key)
}
