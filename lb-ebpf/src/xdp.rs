//! XDP on the gateway's ingress interfaces: for now accounting only (packets, bytes,
//! TCP SYNs). Admission (CIDR allow/deny, SYN buckets, shedding) builds on this parse.
//! Anything unparsed or unexpected is `XDP_PASS`.

use aya_ebpf::{bindings::xdp_action::XDP_PASS, programs::XdpContext};
use lb_common::{CTR_XDP_BYTES, CTR_XDP_PACKETS, CTR_XDP_TCP_SYN};

use crate::maps::bump;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Handles one packet. Always passes it on.
#[inline(always)]
pub fn handle(ctx: &XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    bump(CTR_XDP_PACKETS, 1);
    bump(CTR_XDP_BYTES, (end - start) as u64);
    if is_tcp_syn(start, end) {
        bump(CTR_XDP_TCP_SYN, 1);
    }
    XDP_PASS
}

/// Reads a `T` at `start + off` if it lies within the packet.
#[inline(always)]
fn load<T: Copy>(start: usize, end: usize, off: usize) -> Option<T> {
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    // SAFETY: bounds checked against data_end just above; unaligned read.
    Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
}

/// True for a TCP segment with SYN set and ACK clear (a new connection attempt).
#[inline(always)]
fn is_tcp_syn(start: usize, end: usize) -> bool {
    let Some(ethertype) = load::<u16>(start, end, 12).map(u16::from_be) else {
        return false;
    };
    let tcp_off = match ethertype {
        ETH_P_IP => {
            // Only option-less IPv4 headers are parsed: a variable header length
            // would need a variable packet offset, which costs verifier gymnastics
            // for a rare case. Packets with options are still passed and counted.
            if load::<u8>(start, end, ETH_HLEN) != Some(0x45) {
                return false;
            }
            if load::<u8>(start, end, ETH_HLEN + 9) != Some(IPPROTO_TCP) {
                return false;
            }
            ETH_HLEN + 20
        }
        ETH_P_IPV6 => {
            if load::<u8>(start, end, ETH_HLEN + 6) != Some(IPPROTO_TCP) {
                return false;
            }
            ETH_HLEN + 40
        }
        _ => return false,
    };
    match load::<u8>(start, end, tcp_off + 13) {
        Some(flags) => flags & TCP_SYN != 0 && flags & TCP_ACK == 0,
        None => false,
    }
}
