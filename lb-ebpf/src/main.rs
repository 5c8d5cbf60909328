//! agentlb kernel programs: entry points only.
//!
//! Each entry point delegates to its program family's module:
//! - [`sockops`]: `sock_ops` on agentlb's cgroup — counts established connections and
//!   registers client/upstream sockets in the sockhash;
//! - [`steer`]: `sk_skb` stream verdict (verdict-only, no strparser) and `sk_msg` on the
//!   sockhash — today they count and pass; steering arrives with the fast-path issue;
//! - [`xdp`]: ingress accounting on the gateway's interfaces.
//!
//! Invariant: no program ever drops or redirects data it was not told to by the
//! controller. Every failure path returns `SK_PASS`/`XDP_PASS`.
#![no_std]
#![no_main]

mod maps;
mod sockops;
mod steer;
mod xdp;

use aya_ebpf::{
    macros::{sk_msg, sock_ops, stream_verdict, xdp},
    programs::{SkBuffContext, SkMsgContext, SockOpsContext, XdpContext},
};

/// `sock_ops` entry point (attached to agentlb's cgroup).
#[sock_ops]
pub fn alb_sockops(ctx: SockOpsContext) -> u32 {
    sockops::handle(&ctx)
}

/// `sk_skb` stream-verdict entry point (attached to `ALB_SOCKS`).
#[stream_verdict]
pub fn alb_sk_skb(ctx: SkBuffContext) -> u32 {
    steer::skb_verdict(&ctx)
}

/// `sk_msg` entry point (attached to `ALB_SOCKS`).
#[sk_msg]
pub fn alb_sk_msg(ctx: SkMsgContext) -> u32 {
    steer::msg_verdict(&ctx)
}

/// XDP entry point (attached to configured interfaces).
#[xdp]
pub fn alb_xdp(ctx: XdpContext) -> u32 {
    xdp::handle(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// License: some helpers (e.g. the sockmap ones used later) are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
