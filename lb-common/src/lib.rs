//! The kernel⇄userspace ABI of agentlb.
//!
//! This crate is the *only* definition of every structure shared between the eBPF
//! programs (`lb-ebpf`, target `bpfel-unknown-none`) and the userspace controller
//! (`lb-user`). It holds no logic: map names, map sizes, `#[repr(C)]` key and value
//! types with explicit padding, counter indices and the ABI version.
//!
//! Rules (see ARCHITECTURE.md): no `bool`, `Option` or data-carrying enums in shared
//! types; byte order is part of each field's documentation; every type has a
//! compile-time size assertion that holds on both targets; bump [`ABI_VERSION`]
//! whenever anything in this file changes shape or meaning.
#![no_std]

/// Version of the kernel⇄user ABI. Pinned maps carry it in [`MAP_META`]; agentlb
/// refuses to adopt pins written by another version.
pub const ABI_VERSION: u32 = 3;

/// Magic stored in [`AbiMeta::magic`] ("ALB1" little-endian) to recognise our pins.
pub const ABI_MAGIC: u32 = u32::from_le_bytes(*b"ALB1");

// ---------------------------------------------------------------------------
// Map names. Kernel object names are limited to 15 bytes; keep every name short.
// ---------------------------------------------------------------------------

/// `Array<AbiMeta>` with one entry; pinned. Describes the ABI of the pinned maps.
pub const MAP_META: &str = "ALB_META";
/// `HashMap<BackendKey, BackendValue>`; pinned. Backend addresses the controller
/// has published; `sock_ops` registers upstream sockets whose peer is listed here.
pub const MAP_BACKENDS: &str = "ALB_BACKENDS";
/// `HashMap<u32 /* port, host order */, u32 /* listener flags */>`; not pinned.
/// Local TCP ports of agentlb's proxy listeners: accepted sockets on these ports are
/// client sockets.
pub const MAP_LISTEN: &str = "ALB_LISTEN";
/// `SockHash<u64 /* socket cookie */>`; not pinned (sockets die with the process).
pub const MAP_SOCKS: &str = "ALB_SOCKS";
/// `PerCpuArray<u64>` indexed by the `CTR_*` constants; not pinned.
pub const MAP_COUNTERS: &str = "ALB_COUNTERS";
/// `Array<KernelConfig>` with one entry; not pinned. Written by userspace at start.
pub const MAP_CONFIG: &str = "ALB_CONFIG";
/// `HashMap<u64 /* socket cookie */, PairValue>`; not pinned. Pinned pairs: each
/// side of a client⇄upstream pair handed to the kernel names its peer. Written by
/// userspace (hand-off, teardown); the `sk_skb` verdict reads it and updates the
/// activity fields.
pub const MAP_PAIRS: &str = "ALB_PAIRS";
/// `HashMap<BackendKey, TcpStats>`; not pinned. Written by `sock_ops` for connections
/// to a published backend: RTT, retransmits, closes.
pub const MAP_TCP: &str = "ALB_TCP";
/// `RingBuf` of [`TcpEvent`]s; not pinned. A backend connection closed by the peer or
/// aborted: the controller learns of it without waiting for a health check.
pub const MAP_EVENTS: &str = "ALB_EVENTS";
/// Bytes of [`MAP_EVENTS`].
pub const EVENTS_BYTES: u32 = 64 * 1024;

/// Names of the maps that are pinned under the bpffs pin directory and survive restarts.
pub const PINNED_MAPS: [&str; 2] = [MAP_META, MAP_BACKENDS];

// ---------------------------------------------------------------------------
// Sizes.
// ---------------------------------------------------------------------------

/// Capacity of [`MAP_BACKENDS`].
pub const MAX_BACKENDS: u32 = 4096;
/// Capacity of [`MAP_LISTEN`].
pub const MAX_LISTENERS: u32 = 64;
/// Capacity of [`MAP_SOCKS`] (registered client + upstream sockets).
pub const MAX_SOCKETS: u32 = 65_536;
/// Capacity of [`MAP_PAIRS`] (two entries per pinned pair).
pub const MAX_PAIRS: u32 = MAX_SOCKETS;

// ---------------------------------------------------------------------------
// Program names (the ELF symbol names; the kernel keeps the first 15 bytes).
// ---------------------------------------------------------------------------

/// `sock_ops` program attached to agentlb's cgroup.
pub const PROG_SOCKOPS: &str = "alb_sockops";
/// `sk_skb` stream-verdict program attached to [`MAP_SOCKS`].
pub const PROG_SK_SKB: &str = "alb_sk_skb";
/// `sk_msg` program attached to [`MAP_SOCKS`].
pub const PROG_SK_MSG: &str = "alb_sk_msg";
/// `xdp` ingress program attached to configured interfaces.
pub const PROG_XDP: &str = "alb_xdp";
/// Every program in the object, in load order.
pub const PROGRAMS: [&str; 4] = [PROG_SOCKOPS, PROG_SK_SKB, PROG_SK_MSG, PROG_XDP];

// ---------------------------------------------------------------------------
// Shared types.
// ---------------------------------------------------------------------------

/// Value of [`MAP_META`]`[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AbiMeta {
    /// Always [`ABI_MAGIC`].
    pub magic: u32,
    /// The [`ABI_VERSION`] of the agentlb that created the pins.
    pub abi_version: u32,
    /// Unix time (seconds) when the pins were created.
    pub created_unix: u64,
}

/// Address family values used in [`BackendKey::family`].
pub const FAMILY_V4: u16 = 4;
/// See [`FAMILY_V4`].
pub const FAMILY_V6: u16 = 6;

/// Key of [`MAP_BACKENDS`]: a backend's TCP address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendKey {
    /// Address bytes in network order: IPv4 in the first 4 bytes (rest zero), or IPv6.
    pub addr: [u8; 16],
    /// TCP port, host order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u16,
    /// Must be zero.
    pub _pad: u32,
}

/// Value of [`MAP_BACKENDS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendValue {
    /// The controller's backend index (stable for the life of the backend).
    pub backend_id: u32,
    /// `BACKEND_F_*` flags.
    pub flags: u32,
}

/// [`BackendValue::flags`]: the backend is draining (no new steering).
pub const BACKEND_F_DRAINING: u32 = 1;

/// Value of [`MAP_CONFIG`]`[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KernelConfig {
    /// `CFG_F_*` flags.
    pub flags: u32,
    /// Must be zero.
    pub _pad: u32,
}

/// [`KernelConfig::flags`]: `sock_ops` registers client and upstream sockets in
/// [`MAP_SOCKS`] (so the sockmap programs see their traffic).
pub const CFG_F_REGISTER_SOCKETS: u32 = 1;
/// [`KernelConfig::flags`]: emit an aya-log debug line for every registered socket.
pub const CFG_F_LOG_SOCKETS: u32 = 2;
/// [`KernelConfig::flags`]: the `sk_skb` verdict redirects the bytes of pinned
/// pairs ([`MAP_PAIRS`]) to the peer socket. Cleared, every byte goes to userspace
/// (the kill switch; userspace then closes the pinned pairs).
pub const CFG_F_STEER: u32 = 4;

/// Value of [`MAP_PAIRS`]: one side of a pinned pair.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PairValue {
    /// Socket cookie of the peer (its key in [`MAP_SOCKS`]).
    pub peer: u64,
    /// Bytes received on this socket and redirected to the peer (updated by the
    /// verdict without atomics: statistics and idle detection only).
    pub bytes: u64,
    /// `bpf_ktime_get_ns()` of the last redirect from this socket (0: none yet).
    pub last_ns: u64,
    /// The controller's backend id of the pair.
    pub backend_id: u32,
    /// `PAIR_F_*` flags.
    pub flags: u32,
}

/// [`PairValue::flags`]: this side is the upstream (backend) socket.
pub const PAIR_F_UPSTREAM: u32 = 1;

/// Value of [`MAP_TCP`]: TCP statistics of agentlb's connections to one backend
/// address, from `sock_ops` callbacks (plain adds, no atomics: statistics only).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TcpStats {
    /// The kernel's smoothed RTT of the latest sample, µs.
    pub srtt_us: u32,
    /// Padding (zero).
    pub _pad: u32,
    /// RTT samples taken (`BPF_SOCK_OPS_RTT_CB`).
    pub rtt_samples: u64,
    /// Segments retransmitted (`BPF_SOCK_OPS_RETRANS_CB`).
    pub retransmits: u64,
    /// Connections the backend closed (ESTABLISHED → CLOSE_WAIT: its FIN came first).
    pub peer_closes: u64,
    /// Connections that went from ESTABLISHED straight to CLOSE (a reset, sent or
    /// received).
    pub aborts: u64,
}

/// One entry of [`MAP_EVENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpEvent {
    /// The backend address.
    pub key: BackendKey,
    /// `EV_*`.
    pub kind: u32,
    /// Smoothed RTT of the connection when it ended, µs.
    pub srtt_us: u32,
}

/// [`TcpEvent::kind`]: the backend closed the connection.
pub const EV_PEER_CLOSED: u32 = 1;
/// [`TcpEvent::kind`]: the connection was reset.
pub const EV_ABORTED: u32 = 2;

// ---------------------------------------------------------------------------
// Counters: indices into MAP_COUNTERS.
// ---------------------------------------------------------------------------

/// Every `sock_ops` invocation.
pub const CTR_SOCKOPS_CALLS: u32 = 0;
/// `BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB` (connections agentlb opened).
pub const CTR_SOCKOPS_ACTIVE_ESTABLISHED: u32 = 1;
/// `BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB` (connections agentlb accepted).
pub const CTR_SOCKOPS_PASSIVE_ESTABLISHED: u32 = 2;
/// Accepted sockets on a proxy listener registered in [`MAP_SOCKS`].
pub const CTR_SOCKOPS_REGISTERED_CLIENT: u32 = 3;
/// Sockets to a published backend registered in [`MAP_SOCKS`].
pub const CTR_SOCKOPS_REGISTERED_UPSTREAM: u32 = 4;
/// Failed [`MAP_SOCKS`] insertions.
pub const CTR_SOCKOPS_REGISTER_FAILED: u32 = 5;
/// `sk_skb` stream-verdict invocations (bytes received on registered sockets).
pub const CTR_SK_SKB_VERDICTS: u32 = 6;
/// Bytes seen by the `sk_skb` verdict.
pub const CTR_SK_SKB_BYTES: u32 = 7;
/// `sk_msg` invocations (sends on registered sockets).
pub const CTR_SK_MSG_VERDICTS: u32 = 8;
/// Bytes seen by `sk_msg`.
pub const CTR_SK_MSG_BYTES: u32 = 9;
/// Packets seen by XDP.
pub const CTR_XDP_PACKETS: u32 = 10;
/// Bytes seen by XDP.
pub const CTR_XDP_BYTES: u32 = 11;
/// TCP SYN (without ACK) packets seen by XDP.
pub const CTR_XDP_TCP_SYN: u32 = 12;
/// `sk_skb` verdicts redirected to the paired socket.
pub const CTR_SK_SKB_REDIRECTED: u32 = 13;
/// Bytes redirected by the `sk_skb` verdict.
pub const CTR_SK_SKB_REDIRECTED_BYTES: u32 = 14;
/// Redirects the kernel refused (peer gone): the bytes went to userspace.
pub const CTR_SK_SKB_REDIRECT_FAILED: u32 = 15;
/// `sk_skb` verdicts on a socket with no pair (passed to userspace).
pub const CTR_SK_SKB_UNPAIRED: u32 = 16;
/// Number of counters (size of [`MAP_COUNTERS`]).
pub const NUM_COUNTERS: u32 = 17;

/// Stable names of the counters, indexed by `CTR_*` (used in metrics and status output).
pub const COUNTER_NAMES: [&str; NUM_COUNTERS as usize] = [
    "sockops_calls",
    "sockops_active_established",
    "sockops_passive_established",
    "sockops_registered_client",
    "sockops_registered_upstream",
    "sockops_register_failed",
    "sk_skb_verdicts",
    "sk_skb_bytes",
    "sk_msg_verdicts",
    "sk_msg_bytes",
    "xdp_packets",
    "xdp_bytes",
    "xdp_tcp_syn",
    "sk_skb_redirected",
    "sk_skb_redirected_bytes",
    "sk_skb_redirect_failed",
    "sk_skb_unpaired",
];

// ---------------------------------------------------------------------------
// Layout assertions (compiled for both targets).
// ---------------------------------------------------------------------------

const _: () = assert!(core::mem::size_of::<AbiMeta>() == 16);
const _: () = assert!(core::mem::size_of::<BackendKey>() == 24);
const _: () = assert!(core::mem::size_of::<BackendValue>() == 8);
const _: () = assert!(core::mem::size_of::<KernelConfig>() == 8);
const _: () = assert!(core::mem::align_of::<BackendKey>() == 4);
const _: () = assert!(core::mem::size_of::<PairValue>() == 32);
const _: () = assert!(core::mem::size_of::<TcpStats>() == 40);
const _: () = assert!(core::mem::size_of::<TcpEvent>() == 32);

/// Key and value sizes of every map, for the userspace contract check:
/// `(name, key_size, value_size, max_entries)`. `max_entries` 0 means "not checked"
/// (aya-log's ring buffer is sized by aya).
pub const MAP_LAYOUT: [(&str, u32, u32, u32); 8] = [
    (MAP_META, 4, core::mem::size_of::<AbiMeta>() as u32, 1),
    (
        MAP_BACKENDS,
        core::mem::size_of::<BackendKey>() as u32,
        core::mem::size_of::<BackendValue>() as u32,
        MAX_BACKENDS,
    ),
    (MAP_LISTEN, 4, 4, MAX_LISTENERS),
    (MAP_SOCKS, 8, 4, MAX_SOCKETS),
    (MAP_COUNTERS, 4, 8, NUM_COUNTERS),
    (
        MAP_CONFIG,
        4,
        core::mem::size_of::<KernelConfig>() as u32,
        1,
    ),
    (
        MAP_PAIRS,
        8,
        core::mem::size_of::<PairValue>() as u32,
        MAX_PAIRS,
    ),
    (
        MAP_TCP,
        core::mem::size_of::<BackendKey>() as u32,
        core::mem::size_of::<TcpStats>() as u32,
        MAX_BACKENDS,
    ),
];

#[cfg(feature = "user")]
mod pod {
    //! `aya::Pod` impls so userspace maps can use the shared types.
    // SAFETY: all of these are #[repr(C)], Copy, contain only integers and byte
    // arrays, and have explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for super::AbiMeta {}
    unsafe impl aya::Pod for super::BackendKey {}
    unsafe impl aya::Pod for super::BackendValue {}
    unsafe impl aya::Pod for super::KernelConfig {}
    unsafe impl aya::Pod for super::PairValue {}
    unsafe impl aya::Pod for super::TcpStats {}
    unsafe impl aya::Pod for super::TcpEvent {}
}
