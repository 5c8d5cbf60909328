//! Loading and attaching the kernel programs with aya, typed access to their maps,
//! and teardown. Only compiled with the `ebpf` feature (the object is embedded).

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    time::{SystemTime, UNIX_EPOCH},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, RingBuf, SockHash},
    programs::{CgroupAttachMode, ProgramError, SkMsg, SkSkb, SockOps, Xdp, XdpMode},
};
use lb_common::{
    ABI_MAGIC, ABI_VERSION, AbiMeta, BackendKey, BackendValue, CFG_F_LOG_SOCKETS,
    CFG_F_REGISTER_SOCKETS, CFG_F_STEER, COUNTER_NAMES, EV_PEER_CLOSED, FAMILY_V4, FAMILY_V6,
    KernelConfig as AbiConfig, MAP_BACKENDS, MAP_CONFIG, MAP_COUNTERS, MAP_EVENTS, MAP_LAYOUT,
    MAP_LISTEN, MAP_META, MAP_PAIRS, MAP_SOCKS, MAP_TCP, NUM_COUNTERS, PAIR_F_UPSTREAM,
    PROG_SK_MSG, PROG_SK_SKB, PROG_SOCKOPS, PROG_XDP, PairValue, TcpEvent, TcpStats as AbiTcpStats,
};
use tokio::io::unix::AsyncFd;

use super::{
    ConnEnd, ConnEvent, DataplaneError, MapStatus, PairKeys, ProgramStatus, PublishedBackend,
    TcpStats,
    cgroup::{self, CgroupGuard},
    pins,
};
use crate::{
    config::{KernelConfig, XdpAttachMode},
    error_chain,
};

/// The embedded eBPF object.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Loaded and attached kernel programs with their maps.
pub struct KernelDataplane {
    // Field order is drop order: links and programs (inside `ebpf`) go before the
    // maps and the cgroup guard.
    ebpf: Ebpf,
    socks: Option<SockHash<MapData, u64>>,
    counters: PerCpuArray<MapData, u64>,
    backends: HashMap<MapData, BackendKey, BackendValue>,
    listen: HashMap<MapData, u32, u32>,
    pairs: HashMap<MapData, u64, PairValue>,
    tcp: HashMap<MapData, BackendKey, AbiTcpStats>,
    config: Array<MapData, AbiConfig>,
    /// `CFG_F_*` flags as written to `ALB_CONFIG`.
    flags: u32,
    logger: Option<tokio::task::JoinHandle<()>>,
    /// Reads `ALB_EVENTS` into `conn_events`.
    events_task: Option<tokio::task::JoinHandle<()>>,
    conn_events: Option<tokio::sync::mpsc::Receiver<ConnEvent>>,
    cgroup: CgroupGuard,
    programs: Vec<ProgramStatus>,
    maps: Vec<MapStatus>,
}

fn prog_err(what: &'static str) -> impl FnOnce(ProgramError) -> DataplaneError {
    move |e| DataplaneError::Program {
        what,
        message: error_chain(&e),
    }
}

fn map_err<E: std::error::Error>(what: &'static str) -> impl FnOnce(E) -> DataplaneError {
    move |e| DataplaneError::Map {
        what,
        message: error_chain(&e),
    }
}

impl KernelDataplane {
    /// Loads the object, checks/adopts pins, joins the cgroup, attaches everything.
    /// On error everything done so far is undone by drop.
    pub fn start(
        cfg: &KernelConfig,
        listen_ports: &[u16],
        backends: &[PublishedBackend],
    ) -> Result<Self, DataplaneError> {
        raise_memlock();
        pins::prepare_dir(&cfg.pin_dir, cfg.mount_bpffs)?;
        let adopted = pins::check_existing(&cfg.pin_dir)?;

        let level = cfg.log_level as u8;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&cfg.pin_dir)
            .override_global(aya_log::LEVEL, &level, false)
            .load(OBJECT)
            .map_err(|e| DataplaneError::Load(error_chain(&e)))?;

        let maps = map_status(&ebpf, cfg)?;

        // ABI metadata (pinned): written once when the pins are created.
        {
            let mut meta: Array<&mut MapData, AbiMeta> = map_mut(&mut ebpf, MAP_META)?
                .try_into()
                .map_err(map_err("ALB_META"))?;
            if !adopted {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let m = AbiMeta {
                    magic: ABI_MAGIC,
                    abi_version: ABI_VERSION,
                    created_unix: now,
                };
                meta.set(0, m, 0).map_err(map_err("writing ALB_META"))?;
            }
        }
        // With pinning, sockets join ALB_SOCKS only when userspace hands a pair
        // over (the rest of the traffic never crosses the sockmap); without it
        // sock_ops registers every client and upstream socket (counting only).
        let mut flags = 0;
        if cfg.sockmap && !cfg.pinning {
            flags |= CFG_F_REGISTER_SOCKETS;
        }
        if cfg.pinning {
            flags |= CFG_F_STEER;
        }
        if cfg.log_sockets {
            flags |= CFG_F_LOG_SOCKETS;
        }
        let mut config: Array<MapData, AbiConfig> = take_map(&mut ebpf, MAP_CONFIG)?
            .try_into()
            .map_err(map_err("ALB_CONFIG"))?;
        config
            .set(0, AbiConfig { flags, _pad: 0 }, 0)
            .map_err(map_err("writing ALB_CONFIG"))?;
        let pairs: HashMap<MapData, u64, PairValue> = take_map(&mut ebpf, MAP_PAIRS)?
            .try_into()
            .map_err(map_err("ALB_PAIRS"))?;
        let backends_map: HashMap<MapData, BackendKey, BackendValue> =
            take_map(&mut ebpf, MAP_BACKENDS)?
                .try_into()
                .map_err(map_err("ALB_BACKENDS"))?;
        let listen: HashMap<MapData, u32, u32> = take_map(&mut ebpf, MAP_LISTEN)?
            .try_into()
            .map_err(map_err("ALB_LISTEN"))?;
        let counters: PerCpuArray<MapData, u64> = take_map(&mut ebpf, MAP_COUNTERS)?
            .try_into()
            .map_err(map_err("ALB_COUNTERS"))?;
        let socks: SockHash<MapData, u64> = take_map(&mut ebpf, MAP_SOCKS)?
            .try_into()
            .map_err(map_err("ALB_SOCKS"))?;
        let tcp: HashMap<MapData, BackendKey, AbiTcpStats> = take_map(&mut ebpf, MAP_TCP)?
            .try_into()
            .map_err(map_err("ALB_TCP"))?;
        let ring: RingBuf<MapData> = take_map(&mut ebpf, MAP_EVENTS)?
            .try_into()
            .map_err(map_err("ALB_EVENTS"))?;
        let (events_tx, conn_events) = tokio::sync::mpsc::channel(EVENT_QUEUE);
        let events_task = spawn_events(ring, events_tx)?;

        // aya-log: drained by a task; lines go to `log`, which tracing captures.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(spawn_logger(logger)?),
            Err(e) => {
                tracing::warn!(error = %e, "kernel log channel unavailable");
                None
            }
        };

        // cgroup before any attach and before the proxy opens sockets: sockets take
        // the cgroup of the task that creates them.
        let cg_path = cgroup::resolve(cfg.cgroup.as_deref())?;
        let cgroup = CgroupGuard::setup(cg_path, cfg.join_cgroup)?;

        let mut dp = Self {
            ebpf,
            socks: Some(socks),
            counters,
            backends: backends_map,
            listen,
            pairs,
            tcp,
            config,
            flags,
            logger,
            events_task: Some(events_task),
            conn_events: Some(conn_events),
            cgroup,
            programs: Vec::new(),
            maps,
        };
        dp.publish_backends(backends)?;
        dp.set_listen_ports(listen_ports)?;
        dp.attach(cfg)?;
        Ok(dp)
    }

    fn attach(&mut self, cfg: &KernelConfig) -> Result<(), DataplaneError> {
        let cg = std::fs::File::open(&self.cgroup.path).map_err(|e| DataplaneError::Program {
            what: "opening cgroup",
            message: format!("{}: {e}", self.cgroup.path.display()),
        })?;
        let prog: &mut SockOps = program(&mut self.ebpf, PROG_SOCKOPS)?;
        prog.load().map_err(prog_err("loading sock_ops"))?;
        // bpf_link attachments coexist with other programs on the cgroup and take no
        // flags (the kernel rejects BPF_F_ALLOW_MULTI on links).
        prog.attach(cg.as_fd(), CgroupAttachMode::Single)
            .map_err(prog_err("attaching sock_ops"))?;
        let id = prog.info().map(|i| i.id()).unwrap_or_default();
        self.programs.push(ProgramStatus {
            name: PROG_SOCKOPS.into(),
            kind: "sock_ops".into(),
            id,
            attached_to: format!("cgroup {}", self.cgroup.path.display()),
        });

        if cfg.sockmap {
            let Some(socks) = self.socks.as_ref() else {
                return Err(DataplaneError::Map {
                    what: "ALB_SOCKS",
                    message: "missing".into(),
                });
            };
            let map_fd = socks
                .fd()
                .try_clone()
                .map_err(map_err("cloning ALB_SOCKS fd"))?;
            let skb: &mut SkSkb = program(&mut self.ebpf, PROG_SK_SKB)?;
            skb.load().map_err(prog_err("loading sk_skb"))?;
            skb.attach(&map_fd).map_err(prog_err("attaching sk_skb"))?;
            let id = skb.info().map(|i| i.id()).unwrap_or_default();
            self.programs.push(ProgramStatus {
                name: PROG_SK_SKB.into(),
                kind: "sk_skb/stream_verdict".into(),
                id,
                attached_to: MAP_SOCKS.into(),
            });
            let msg: &mut SkMsg = program(&mut self.ebpf, PROG_SK_MSG)?;
            msg.load().map_err(prog_err("loading sk_msg"))?;
            msg.attach(&map_fd).map_err(prog_err("attaching sk_msg"))?;
            let id = msg.info().map(|i| i.id()).unwrap_or_default();
            self.programs.push(ProgramStatus {
                name: PROG_SK_MSG.into(),
                kind: "sk_msg".into(),
                id,
                attached_to: MAP_SOCKS.into(),
            });
        }

        if !cfg.xdp_interfaces.is_empty() {
            let xdp: &mut Xdp = program(&mut self.ebpf, PROG_XDP)?;
            xdp.load().map_err(prog_err("loading xdp"))?;
            let id = xdp.info().map(|i| i.id()).unwrap_or_default();
            for iface in &cfg.xdp_interfaces {
                let mode = attach_xdp(xdp, iface, cfg.xdp_mode)?;
                self.programs.push(ProgramStatus {
                    name: PROG_XDP.into(),
                    kind: format!("xdp/{mode}"),
                    id,
                    attached_to: format!("interface {iface}"),
                });
            }
        }
        Ok(())
    }

    /// Reconciles `ALB_BACKENDS` with `backends`: adds what is missing, removes what
    /// is no longer published (the map is pinned and may hold a previous run's set).
    pub fn publish_backends(
        &mut self,
        backends: &[PublishedBackend],
    ) -> Result<(), DataplaneError> {
        let mut desired = std::collections::HashMap::new();
        for b in backends {
            for addr in &b.addrs {
                desired.insert(
                    backend_key(*addr),
                    BackendValue {
                        backend_id: b.id,
                        flags: 0,
                    },
                );
            }
        }
        let existing: HashSet<BackendKey> = self.backends.keys().filter_map(Result::ok).collect();
        for k in existing.iter().filter(|k| !desired.contains_key(*k)) {
            self.backends
                .remove(k)
                .map_err(map_err("removing from ALB_BACKENDS"))?;
        }
        for (k, v) in desired {
            self.backends
                .insert(k, v, 0)
                .map_err(map_err("writing ALB_BACKENDS"))?;
        }
        Ok(())
    }

    /// Replaces the set of proxy listener ports.
    pub fn set_listen_ports(&mut self, ports: &[u16]) -> Result<(), DataplaneError> {
        let existing: Vec<u32> = self.listen.keys().filter_map(Result::ok).collect();
        for p in existing
            .iter()
            .filter(|p| !ports.iter().any(|q| u32::from(*q) == **p))
        {
            self.listen
                .remove(p)
                .map_err(map_err("removing from ALB_LISTEN"))?;
        }
        for p in ports {
            self.listen
                .insert(u32::from(*p), 1, 0)
                .map_err(map_err("writing ALB_LISTEN"))?;
        }
        Ok(())
    }

    /// Sums of the per-CPU counters, indexed like `lb_common::COUNTER_NAMES`.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        (0..NUM_COUNTERS)
            .map(|i| {
                let v = self
                    .counters
                    .get(&i, 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (COUNTER_NAMES[i as usize], v)
            })
            .collect()
    }

    /// Backend entries currently in the kernel map.
    pub fn published_backends(&self) -> usize {
        self.backends.keys().filter_map(Result::ok).count()
    }

    /// Hands a client⇄upstream pair to the kernel: both sockets join `ALB_SOCKS`
    /// and name each other in `ALB_PAIRS`, after which the `sk_skb` verdict
    /// forwards their bytes. Undone on failure.
    pub fn pin_pair(
        &mut self,
        client: BorrowedFd<'_>,
        upstream: BorrowedFd<'_>,
        backend_id: u32,
    ) -> Result<PairKeys, DataplaneError> {
        let keys = PairKeys {
            client: socket_cookie(client)?,
            upstream: socket_cookie(upstream)?,
        };
        let socks = self.socks.as_mut().ok_or(DataplaneError::Map {
            what: "ALB_SOCKS",
            message: "sockmap programs not attached".into(),
        })?;
        let side = |peer, flags| PairValue {
            peer,
            bytes: 0,
            last_ns: 0,
            backend_id,
            flags,
        };
        let r = (|| {
            self.pairs
                .insert(keys.client, side(keys.upstream, 0), 0)
                .map_err(map_err("writing ALB_PAIRS"))?;
            self.pairs
                .insert(keys.upstream, side(keys.client, PAIR_F_UPSTREAM), 0)
                .map_err(map_err("writing ALB_PAIRS"))?;
            socks
                .insert(keys.upstream, upstream.as_raw_fd(), 0)
                .map_err(map_err("inserting the upstream socket into ALB_SOCKS"))?;
            socks
                .insert(keys.client, client.as_raw_fd(), 0)
                .map_err(map_err("inserting the client socket into ALB_SOCKS"))
        })();
        if r.is_err() {
            self.unpin_pair(keys);
        }
        r.map(|()| keys)
    }

    /// Removes a pair's entries (missing ones are fine: closed sockets leave
    /// `ALB_SOCKS` by themselves).
    pub fn unpin_pair(&mut self, keys: PairKeys) {
        for k in [keys.client, keys.upstream] {
            let _ = self.pairs.remove(&k);
            if let Some(s) = self.socks.as_mut() {
                let _ = s.remove(&k);
            }
        }
    }

    /// The kernel's activity record of both sides of a pair: (client, upstream).
    pub fn pair_activity(&self, keys: PairKeys) -> Option<(PairValue, PairValue)> {
        Some((
            self.pairs.get(&keys.client, 0).ok()?,
            self.pairs.get(&keys.upstream, 0).ok()?,
        ))
    }

    /// Turns the verdict's redirects on or off (the kill switch).
    pub fn set_steering(&mut self, on: bool) -> Result<(), DataplaneError> {
        let flags = if on {
            self.flags | CFG_F_STEER
        } else {
            self.flags & !CFG_F_STEER
        };
        self.config
            .set(0, AbiConfig { flags, _pad: 0 }, 0)
            .map_err(map_err("writing ALB_CONFIG"))?;
        self.flags = flags;
        Ok(())
    }

    /// The receiver of ended backend connections (once).
    pub fn take_conn_events(&mut self) -> Option<tokio::sync::mpsc::Receiver<ConnEvent>> {
        self.conn_events.take()
    }

    /// `ALB_TCP`: statistics per backend address.
    pub fn tcp_stats(&self) -> Vec<(SocketAddr, TcpStats)> {
        self.tcp
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, v)| {
                Some((
                    key_addr(&k)?,
                    TcpStats {
                        srtt_us: v.srtt_us,
                        rtt_samples: v.rtt_samples,
                        retransmits: v.retransmits,
                        peer_closes: v.peer_closes,
                        aborts: v.aborts,
                    },
                ))
            })
            .collect()
    }

    /// Entries in `ALB_PAIRS` and `ALB_SOCKS` (leak checks, status).
    pub fn pair_entries(&self) -> (usize, usize) {
        let pairs = self.pairs.keys().filter_map(Result::ok).count();
        let socks = self
            .socks
            .as_ref()
            .map_or(0, |s| s.keys().filter_map(Result::ok).count());
        (pairs, socks)
    }

    /// Attached programs.
    pub fn programs(&self) -> &[ProgramStatus] {
        &self.programs
    }

    /// Maps and their pin state.
    pub fn maps(&self) -> &[MapStatus] {
        &self.maps
    }

    /// The cgroup `sock_ops` is attached to.
    pub fn cgroup_path(&self) -> &std::path::Path {
        &self.cgroup.path
    }

    /// Detaches every program (links are not pinned), stops the log task, moves
    /// agentlb back to its original cgroup and removes the cgroup it created.
    /// Pinned maps stay.
    pub fn shutdown(mut self) {
        if let Some(l) = self.logger.take() {
            l.abort();
        }
        if let Some(t) = self.events_task.take() {
            t.abort();
        }
        let Self {
            ebpf,
            socks,
            mut cgroup,
            ..
        } = self;
        drop(ebpf);
        drop(socks);
        cgroup.release();
    }
}

fn attach_xdp(
    xdp: &mut Xdp,
    iface: &str,
    mode: XdpAttachMode,
) -> Result<&'static str, DataplaneError> {
    let native = || xdp_attach_err(iface, "native");
    match mode {
        XdpAttachMode::Native => {
            xdp.attach(iface, XdpMode::Driver)
                .map_err(|e| native()(e))?;
            Ok("native")
        }
        XdpAttachMode::Generic => {
            xdp.attach(iface, XdpMode::Skb)
                .map_err(|e| xdp_attach_err(iface, "generic")(e))?;
            Ok("generic")
        }
        XdpAttachMode::Auto => match xdp.attach(iface, XdpMode::Driver) {
            Ok(_) => Ok("native"),
            Err(e) => {
                tracing::info!(iface, error = %error_chain(&e), "native XDP unavailable; using generic mode");
                xdp.attach(iface, XdpMode::Skb)
                    .map_err(|e| xdp_attach_err(iface, "generic")(e))?;
                Ok("generic")
            }
        },
    }
}

fn xdp_attach_err(iface: &str, mode: &'static str) -> impl FnOnce(ProgramError) -> DataplaneError {
    let iface = iface.to_owned();
    move |e| DataplaneError::Program {
        what: "attaching xdp",
        message: format!("{iface} ({mode}): {}", error_chain(&e)),
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DataplaneError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DataplaneError::Program {
            what: "finding program",
            message: name.into(),
        })?
        .try_into()
        .map_err(prog_err("program type"))
}

/// `SO_COOKIE` of a socket.
fn socket_cookie(fd: BorrowedFd<'_>) -> Result<u64, DataplaneError> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which we own.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        return Err(DataplaneError::Map {
            what: "SO_COOKIE",
            message: std::io::Error::last_os_error().to_string(),
        });
    }
    Ok(cookie)
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Map, DataplaneError> {
    ebpf.map_mut(name).ok_or(DataplaneError::Map {
        what: name,
        message: "missing from the object".into(),
    })
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, DataplaneError> {
    ebpf.take_map(name).ok_or(DataplaneError::Map {
        what: name,
        message: "missing from the object".into(),
    })
}

/// Kernel view of every map in the object (ids, sizes, pins), checked against
/// `lb_common::MAP_LAYOUT`: the runtime half of the ABI contract.
fn map_status(ebpf: &Ebpf, cfg: &KernelConfig) -> Result<Vec<MapStatus>, DataplaneError> {
    let mut out = Vec::new();
    for (name, map) in ebpf.maps() {
        let info = map_data(map).info().map_err(map_err("reading map info"))?;
        let st = MapStatus {
            name: name.to_owned(),
            id: info.id(),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            pinned: lb_common::PINNED_MAPS
                .contains(&name)
                .then(|| cfg.pin_dir.join(name).display().to_string()),
        };
        if let Some(&(_, k, v, m)) = MAP_LAYOUT.iter().find(|(n, ..)| *n == name)
            && (st.key_size, st.value_size, st.max_entries) != (k, v, m)
        {
            return Err(DataplaneError::Map {
                what: "ABI contract",
                message: format!(
                    "{name}: object has {:?}, lb-common says {:?}",
                    (st.key_size, st.value_size, st.max_entries),
                    (k, v, m)
                ),
            });
        }
        out.push(st);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn map_data(map: &Map) -> &MapData {
    match map {
        Map::Array(m)
        | Map::HashMap(m)
        | Map::PerCpuArray(m)
        | Map::SockHash(m)
        | Map::RingBuf(m)
        | Map::PerCpuHashMap(m)
        | Map::LruHashMap(m)
        | Map::LpmTrie(m)
        | Map::SockMap(m)
        | Map::ProgramArray(m)
        | Map::Unsupported(m) => m,
        Map::ArrayOfMaps(m)
        | Map::BloomFilter(m)
        | Map::CgroupArray(m)
        | Map::CgroupStorage(m)
        | Map::CgrpStorage(m)
        | Map::CpuMap(m)
        | Map::DevMap(m)
        | Map::DevMapHash(m)
        | Map::HashOfMaps(m)
        | Map::InodeStorage(m)
        | Map::PerCpuCgroupStorage(m)
        | Map::PerCpuLruHashMap(m)
        | Map::PerfEventArray(m)
        | Map::Queue(m)
        | Map::ReusePortSockArray(m)
        | Map::SkStorage(m)
        | Map::Stack(m)
        | Map::StackTraceMap(m)
        | Map::XskMap(m) => m,
    }
}

/// The map key for a backend address (IPv4-mapped IPv6 is stored as IPv4, like the
/// kernel side does).
pub fn backend_key(addr: SocketAddr) -> BackendKey {
    let mut key = BackendKey {
        addr: [0; 16],
        port: addr.port(),
        family: FAMILY_V4,
        _pad: 0,
    };
    match addr.ip() {
        IpAddr::V4(v4) => key.addr[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => key.addr[..4].copy_from_slice(&v4.octets()),
            None => {
                key.family = FAMILY_V6;
                key.addr = v6.octets();
            }
        },
    }
    key
}

/// Ended-connection reports queued for the controller at most (more are dropped: the
/// statistics in `ALB_TCP` still count them).
const EVENT_QUEUE: usize = 1024;

/// The address of a map key.
fn key_addr(k: &BackendKey) -> Option<SocketAddr> {
    let ip = match k.family {
        FAMILY_V4 => IpAddr::from([k.addr[0], k.addr[1], k.addr[2], k.addr[3]]),
        FAMILY_V6 => IpAddr::from(k.addr),
        _ => return None,
    };
    Some(SocketAddr::new(ip, k.port))
}

/// Runs `drain` on `inner` each time its fd (a ring buffer the kernel fills) turns
/// readable, on a task of its own; `what` names it in errors.
fn spawn_reader<T: std::os::fd::AsRawFd + Send + 'static>(
    inner: T,
    what: &'static str,
    mut drain: impl FnMut(&mut T) + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>, DataplaneError> {
    // SAFETY: the fd belongs to `inner`, which the AsyncFd owns for its whole life; it
    // is never closed or replaced meanwhile.
    let mut fd = unsafe { AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE) }
        .map_err(|e| DataplaneError::Map {
        what,
        message: e.to_string(),
    })?;
    Ok(tokio::spawn(async move {
        loop {
            let mut guard = match fd.readable_mut().await {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(error = %e, what, "kernel channel closed");
                    return;
                }
            };
            drain(guard.get_inner_mut());
            guard.clear_ready();
        }
    }))
}

/// Reads `ALB_EVENTS` as the kernel fills it and forwards each event.
fn spawn_events(
    ring: RingBuf<MapData>,
    tx: tokio::sync::mpsc::Sender<ConnEvent>,
) -> Result<tokio::task::JoinHandle<()>, DataplaneError> {
    spawn_reader(ring, "ALB_EVENTS", move |ring| {
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<TcpEvent>() {
                continue;
            }
            // SAFETY: the kernel wrote a whole `TcpEvent` (repr(C), plain integers,
            // every bit pattern valid); the read is unaligned-safe.
            let ev: TcpEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let Some(addr) = key_addr(&ev.key) else {
                continue;
            };
            let end = if ev.kind == EV_PEER_CLOSED {
                ConnEnd::PeerClosed
            } else {
                ConnEnd::Aborted
            };
            let _ = tx.try_send(ConnEvent {
                addr,
                end,
                srtt_us: ev.srtt_us,
            });
        }
    })
}

/// aya-log's lines, drained into `log` (which tracing captures).
fn spawn_logger(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
) -> Result<tokio::task::JoinHandle<()>, DataplaneError> {
    spawn_reader(logger, "AYA_LOGS", |l| l.flush())
}

/// Pre-5.11 kernels charge BPF memory to RLIMIT_MEMLOCK; newer ones use memcg.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer; failure is harmless on 5.11+.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if rc != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK (fine on kernels >= 5.11)");
    }
}

/// Object bytes, for the contract test.
pub fn object() -> &'static [u8] {
    OBJECT
}
