//! Sockmap programs on `ALB_SOCKS`.
//!
//! `alb_sk_skb` is a stream verdict *without* a parser (verdict-only mode: one call per
//! received skb, no HTTP framing in the kernel). `alb_sk_msg` runs on every send by
//! agentlb on a registered socket. For now both only count and return `SK_PASS`, which
//! hands the bytes to userspace unchanged; splicing pinned pairs is a later step and
//! will still fall back to `SK_PASS` on any failure (never `SK_DROP`).

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    programs::{SkBuffContext, SkMsgContext},
};
use lb_common::{CTR_SK_MSG_BYTES, CTR_SK_MSG_VERDICTS, CTR_SK_SKB_BYTES, CTR_SK_SKB_VERDICTS};

use crate::maps::bump;

/// Verdict for bytes received on a registered socket.
#[inline(always)]
pub fn skb_verdict(ctx: &SkBuffContext) -> u32 {
    bump(CTR_SK_SKB_VERDICTS, 1);
    bump(CTR_SK_SKB_BYTES, u64::from(ctx.len()));
    SK_PASS
}

/// Verdict for bytes agentlb sends on a registered socket.
#[inline(always)]
pub fn msg_verdict(ctx: &SkMsgContext) -> u32 {
    bump(CTR_SK_MSG_VERDICTS, 1);
    bump(CTR_SK_MSG_BYTES, u64::from(ctx.size()));
    SK_PASS
}
