//! Sockmap programs on `ALB_SOCKS`.
//!
//! `alb_sk_skb` is a stream verdict *without* a parser (verdict-only mode: one call
//! per received skb, no HTTP framing in the kernel). A socket userspace has pinned
//! to a peer (`ALB_PAIRS`) has its bytes redirected to the peer's egress: the
//! kernel forwards client → upstream and upstream → client. Anything else — no
//! pair, steering switched off (`CFG_F_STEER` cleared: the kill switch), a redirect
//! the kernel refuses — is `SK_PASS`: the bytes go to userspace unchanged, never
//! dropped. `alb_sk_msg` runs on every send by agentlb on a registered socket and
//! only counts.

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    programs::{SkBuffContext, SkMsgContext},
};
use lb_common::{
    CFG_F_STEER, CTR_SK_MSG_BYTES, CTR_SK_MSG_VERDICTS, CTR_SK_SKB_BYTES,
    CTR_SK_SKB_REDIRECT_FAILED, CTR_SK_SKB_REDIRECTED, CTR_SK_SKB_REDIRECTED_BYTES,
    CTR_SK_SKB_UNPAIRED, CTR_SK_SKB_VERDICTS,
};

use crate::maps::{PAIRS, SOCKS, bump, config_flags};

/// Verdict for bytes received on a registered socket.
#[inline(always)]
pub fn skb_verdict(ctx: &SkBuffContext) -> u32 {
    let len = u64::from(ctx.len());
    bump(CTR_SK_SKB_VERDICTS, 1);
    bump(CTR_SK_SKB_BYTES, len);
    if config_flags() & CFG_F_STEER == 0 {
        return SK_PASS;
    }
    // SAFETY: the context's skb pointer is valid for this invocation.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(pair) = PAIRS.get_ptr_mut(cookie) else {
        bump(CTR_SK_SKB_UNPAIRED, 1);
        return SK_PASS;
    };
    // SAFETY: the pointer comes from the map lookup and stays valid while this
    // program runs (RCU); racing writers only make the statistics approximate.
    let mut peer = unsafe { (*pair).peer };
    let r = SOCKS.redirect_skb(ctx, &mut peer, 0);
    if r == i64::from(SK_PASS) {
        bump(CTR_SK_SKB_REDIRECTED, 1);
        bump(CTR_SK_SKB_REDIRECTED_BYTES, len);
        // SAFETY: as above.
        unsafe {
            (*pair).bytes += len;
            (*pair).last_ns = bpf_ktime_get_ns();
        }
    } else {
        // The peer left the sockhash (closed): userspace reads these bytes and
        // tears the pair down. Returning `r` here would drop them.
        bump(CTR_SK_SKB_REDIRECT_FAILED, 1);
    }
    SK_PASS
}

/// Verdict for bytes agentlb sends on a registered socket.
#[inline(always)]
pub fn msg_verdict(ctx: &SkMsgContext) -> u32 {
    bump(CTR_SK_MSG_VERDICTS, 1);
    bump(CTR_SK_MSG_BYTES, u64::from(ctx.size()));
    SK_PASS
}
