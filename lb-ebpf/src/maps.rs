//! The `#[map]` statics. Names, sizes and layouts come from `lb-common`; the
//! userspace contract test checks that the loaded object matches them.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf, SockHash},
};
use lb_common::{
    AbiMeta, BackendKey, BackendValue, EVENTS_BYTES, KernelConfig, MAX_BACKENDS, MAX_LISTENERS,
    MAX_PAIRS, MAX_SOCKETS, NUM_COUNTERS, PairValue, TcpStats,
};

/// ABI description of the pinned maps (pinned; written by userspace).
#[map(name = "ALB_META")]
pub static META: Array<AbiMeta> = Array::pinned(1, 0);

/// Published backends (pinned; written by the controller).
#[map(name = "ALB_BACKENDS")]
pub static BACKENDS: HashMap<BackendKey, BackendValue> = HashMap::pinned(MAX_BACKENDS, 0);

/// Proxy listener ports (host order) → flags.
#[map(name = "ALB_LISTEN")]
pub static LISTEN: HashMap<u32, u32> = HashMap::with_max_entries(MAX_LISTENERS, 0);

/// Registered sockets keyed by socket cookie.
#[map(name = "ALB_SOCKS")]
pub static SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Pinned pairs: socket cookie → its peer (written by userspace at hand-off).
#[map(name = "ALB_PAIRS")]
pub static PAIRS: HashMap<u64, PairValue> = HashMap::with_max_entries(MAX_PAIRS, 0);

/// TCP statistics of connections to each backend address (written by `sock_ops`).
#[map(name = "ALB_TCP")]
pub static TCP: HashMap<BackendKey, TcpStats> = HashMap::with_max_entries(MAX_BACKENDS, 0);

/// Backend connections closed by the peer or aborted, for the controller.
#[map(name = "ALB_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Per-CPU counters indexed by `lb_common::CTR_*`.
#[map(name = "ALB_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);

/// Runtime configuration written by userspace at start.
#[map(name = "ALB_CONFIG")]
pub static CONFIG: Array<KernelConfig> = Array::with_max_entries(1, 0);

/// Adds `by` to counter `idx` on this CPU. Programs run with migration disabled, so a
/// plain add is enough; a nested program on the same CPU may rarely lose an increment,
/// which is acceptable for statistics.
#[inline(always)]
pub fn bump(idx: u32, by: u64) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: the pointer comes from the map lookup and is valid for this CPU's slot.
        unsafe { *p += by };
    }
}

/// The current configuration flags (0 if userspace has not written them).
#[inline(always)]
pub fn config_flags() -> u32 {
    CONFIG.get(0).map_or(0, |c| c.flags)
}
