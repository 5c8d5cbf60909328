//! Instances, listeners, the process admin port, and [`run`], which wires them together.
//!
//! Each instance owns an engine driver task, a listener task (which closes and re-binds its
//! socket as `refuse`/`die` faults come and go) and, optionally, a KV event publisher.
//! All instances share one tokio runtime, so 64 backends cost 64 mostly-sleeping tasks.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use http::{Method, Request, Response, StatusCode};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{self, SimBody};
use crate::config::{EngineConfig, PdConfig, SimConfig};
use crate::engine::{Engine, EngineHandle, run_engine};
use crate::faults::{FaultMode, FaultSpec};
use crate::pd::PdState;
use crate::responses::ResponseStore;
use crate::tokenizer::Tokenizer;

/// Errors starting the simulator.
#[derive(Debug, Error)]
pub enum SimError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A socket could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// KV event publisher failure.
    #[error("kv events: {0}")]
    KvEvents(String),
    /// Other I/O.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// KV event endpoints of an instance.
#[derive(Debug, Clone)]
pub struct KvPorts {
    /// PUB port.
    pub pub_port: u16,
    /// Replay ROUTER port.
    pub replay_port: u16,
    /// Topic.
    pub topic: String,
    /// Batches kept for replay.
    pub buffer_steps: usize,
}

/// One simulated vLLM instance.
pub struct Instance {
    /// Index in the process.
    pub idx: usize,
    /// Bound host.
    pub host: String,
    /// Bound port.
    pub port: u16,
    /// Engine settings.
    pub cfg: EngineConfig,
    /// The tokenizer (the stand-in, or an HF tokenizer in HF mode).
    pub tokenizer: Tokenizer,
    /// Unix time of start (`created` of `/v1/models`).
    pub created: u64,
    /// In-flight completion requests (`/load`).
    pub in_flight: AtomicUsize,
    /// KV event endpoints, if enabled.
    pub kv: Option<KvPorts>,
    /// Stored Responses API objects of this instance (`previous_response_id`, `GET`).
    pub responses: ResponseStore,
    /// `POST /tokenize` requests served (a router tokenizing in-process makes none).
    pub tokenize_requests: AtomicU64,
    /// Disaggregated prefill/decode: role, engine id, pending transfers, counters.
    pub pd: PdState,
    /// Requests served per serving route (`/score`, `/v1/embeddings`, ...; see
    /// [`crate::serving`]).
    pub serving: crate::serving::ServingCounters,
    ids: AtomicU64,
    id_seed: u64,
    random_ids: AtomicU64,
    random_seed: u64,
    engine: ArcSwap<EngineHandle>,
    engine_task: Mutex<Option<JoinHandle<()>>>,
    fault_tx: watch::Sender<FaultSpec>,
    fault_epoch: AtomicU64,
    slow_factor: Mutex<f64>,
}

/// Counts one in-flight completion request until dropped (for streams: when the stream ends).
pub struct LoadGuard(Arc<Instance>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Instance {
    fn new(
        idx: usize,
        host: &str,
        port: u16,
        cfg: EngineConfig,
        kv: Option<KvPorts>,
        pd: &PdConfig,
    ) -> Arc<Self> {
        let engine = EngineHandle::new(Engine::new(cfg.clone(), kv.is_some()));
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let (fault_tx, _) = watch::channel(FaultSpec::default());
        let responses = ResponseStore::new(cfg.max_stored_responses);
        let random_seed = crate::tokenizer::mix64(process_entropy() ^ ((port as u64) << 32))
            ^ crate::tokenizer::mix64(idx as u64);
        let pd = PdState::new(
            pd.role_of(idx),
            pd,
            cfg.time_scale,
            crate::pd::uuid_from_hex(&api::hex_id(random_seed, u64::MAX)),
        );
        Arc::new(Self {
            idx,
            host: host.to_string(),
            port,
            tokenizer: Tokenizer::for_config(&cfg),
            cfg,
            created,
            in_flight: AtomicUsize::new(0),
            kv,
            responses,
            ids: AtomicU64::new(0),
            id_seed: crate::tokenizer::mix64(created ^ ((port as u64) << 32) ^ idx as u64),
            random_ids: AtomicU64::new(0),
            tokenize_requests: AtomicU64::new(0),
            pd,
            serving: Default::default(),
            random_seed,
            engine: ArcSwap::from(engine),
            engine_task: Mutex::new(None),
            fault_tx,
            fault_epoch: AtomicU64::new(0),
            slow_factor: Mutex::new(1.0),
        })
    }

    /// The current engine.
    pub fn engine(&self) -> Arc<EngineHandle> {
        self.engine.load_full()
    }

    fn start_engine(&self) {
        let h = self.engine();
        let task = tokio::spawn(run_engine(h));
        let mut slot = self.engine_task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = slot.replace(task) {
            old.abort();
        }
    }

    /// A receiver of fault changes.
    pub fn fault_rx(&self) -> watch::Receiver<FaultSpec> {
        self.fault_tx.subscribe()
    }

    /// The current fault.
    pub fn fault(&self) -> FaultSpec {
        *self.fault_tx.borrow()
    }

    /// Counts an in-flight completion request.
    pub fn load_guard(self: &Arc<Self>) -> LoadGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        LoadGuard(self.clone())
    }

    /// A fresh 32-hex-char id.
    pub fn new_id(&self) -> String {
        api::hex_id(self.id_seed, self.ids.fetch_add(1, Ordering::Relaxed))
    }

    /// A fresh 32-hex-char id that is also unique across instances and processes (it mixes in
    /// per-process randomness): Responses API `resp_…` and `msg_…` ids.
    pub fn new_random_id(&self) -> String {
        api::hex_id(
            self.random_seed,
            self.random_ids.fetch_add(1, Ordering::Relaxed),
        )
    }

    /// Applies a fault (see [`crate::faults`]).
    pub fn set_fault(self: &Arc<Self>, spec: FaultSpec) {
        let prev = self.fault();
        let epoch = self.fault_epoch.fetch_add(1, Ordering::SeqCst) + 1;
        let factor = match spec.mode {
            FaultMode::Slow { factor } => factor,
            _ => 1.0,
        };
        *self.slow_factor.lock().unwrap_or_else(|e| e.into_inner()) = factor;
        if spec.mode == FaultMode::Die && prev.mode != FaultMode::Die {
            // Stop the engine and abort everything in flight.
            if let Some(t) = self
                .engine_task
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
            {
                t.abort();
            }
            let woken = self.engine().lock().abort_all();
            for w in woken {
                w.waker.wake();
            }
            // The stored responses and the KV kept for decode instances lived in the dead
            // server's memory.
            self.responses.clear();
            self.pd.clear();
        }
        if prev.mode == FaultMode::Die && spec.mode != FaultMode::Die {
            // Restart: a fresh engine with an empty cache; KV subscribers are told to drop
            // everything they indexed for this instance.
            let mut fresh = Engine::new(self.cfg.clone(), self.kv.is_some());
            fresh.reset_prefix_cache();
            let e = EngineHandle::new(fresh);
            self.engine.store(e);
            self.start_engine();
            // A new incarnation: decode instances can no longer pull the old one's KV.
            self.pd
                .new_incarnation(crate::pd::uuid_from_hex(&self.new_random_id()));
        }
        self.engine().lock().set_slow_factor(factor);
        self.fault_tx.send_replace(spec);
        if let Some(d) = spec.duration_s
            && spec.mode != FaultMode::None
        {
            let me = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_secs_f64(d)).await;
                if me.fault_epoch.load(Ordering::SeqCst) == epoch {
                    me.set_fault(FaultSpec::default());
                }
            });
        }
    }

    /// A JSON description (for `/sim/info` and the admin port).
    pub fn info(&self) -> Value {
        let stored_responses = self.responses.len();
        let e = self.engine();
        let eng = e.lock();
        let g = eng.gauges();
        let m = eng.metrics();
        json!({
            "index": self.idx,
            "port": self.port,
            "model": self.cfg.model,
            "tokenizer": self.cfg.hf_tokenizer.as_ref().map(|h| h.dir().display().to_string()),
            "time_scale": self.cfg.time_scale,
            "block_size": self.cfg.block_size,
            "num_gpu_blocks": self.cfg.num_gpu_blocks,
            "max_num_seqs": self.cfg.max_num_seqs,
            "max_num_batched_tokens": self.cfg.max_num_batched_tokens,
            "latency": {
                "beta0": self.cfg.latency.beta0,
                "beta1": self.cfg.latency.beta1,
                "beta2": self.cfg.latency.beta2,
                "prefill_overhead": self.cfg.latency.prefill_overhead,
            },
            "fault": self.fault(),
            "running": g.running,
            "waiting": g.waiting,
            "kv_cache_usage": g.kv_usage,
            "cached_blocks": eng.pool().num_cached(),
            "cached_digest": eng.pool().cached_digest(),
            "tokenize_requests": self.tokenize_requests.load(std::sync::atomic::Ordering::Relaxed),
            "free_blocks": eng.pool().num_free(),
            "evictions": eng.pool().evictions(),
            "steps": m.steps,
            "virtual_time": eng.clock_v(),
            "clock_lag_seconds": eng.lag().0,
            "max_clock_lag_seconds": eng.lag().1,
            "stored_responses": stored_responses,
            "kv_events": self.kv.as_ref().map(|k| json!({"pub_port": k.pub_port, "replay_port": k.replay_port, "topic": k.topic})),
            "pd": self.pd.info(),
            "serving": self.serving.info(),
        })
    }
}

/// Per-process randomness (std's randomly keyed hasher, the time and the pid).
fn process_entropy() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

async fn bind(host: &str, port: u16) -> Result<TcpListener, SimError> {
    let addr = format!("{host}:{port}");
    TcpListener::bind(&addr)
        .await
        .map_err(|source| SimError::Bind { addr, source })
}

fn refusing(spec: &FaultSpec) -> bool {
    matches!(spec.mode, FaultMode::Refuse | FaultMode::Die)
}

async fn serve_instance(inst: Arc<Instance>, listener: TcpListener) {
    let mut listener = Some(listener);
    let mut rx = inst.fault_rx();
    loop {
        if refusing(&rx.borrow_and_update()) {
            listener = None;
            if rx.changed().await.is_err() {
                return;
            }
            continue;
        }
        let Some(l) = listener.as_ref() else {
            match bind(&inst.host, inst.port).await {
                Ok(l) => listener = Some(l),
                Err(e) => {
                    tracing::warn!(instance = inst.idx, "re-bind failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
            continue;
        };
        tokio::select! {
            r = l.accept() => match r {
                Ok((stream, _)) => {
                    tokio::spawn(serve_conn(inst.clone(), stream));
                }
                Err(e) => {
                    tracing::debug!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            },
            r = rx.changed() => {
                if r.is_err() {
                    return;
                }
            }
        }
    }
}

async fn serve_conn(inst: Arc<Instance>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut rx = inst.fault_rx();
    let svc_inst = inst.clone();
    let svc = service_fn(move |req| api::handle(svc_inst.clone(), req));
    let conn = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            r = rx.changed() => {
                if r.is_err() || rx.borrow_and_update().mode == FaultMode::Die {
                    return; // drop the connection
                }
            }
        }
    }
}

/// A running simulator (all listeners bound).
pub struct Running {
    /// The instances.
    pub instances: Vec<Arc<Instance>>,
    /// The admin port, if any.
    pub admin_port: Option<u16>,
}

impl Running {
    /// The JSON "ready" line printed on stdout.
    pub fn ready_json(&self) -> Value {
        json!({
            "event": "ready",
            "ports": self.instances.iter().map(|i| i.port).collect::<Vec<_>>(),
            "admin_port": self.admin_port,
            "kv_events": self.instances.iter().map(|i| i.kv.as_ref().map(|k| json!([k.pub_port, k.replay_port]))).collect::<Vec<_>>(),
            "time_scale": self.instances.first().map(|i| i.cfg.time_scale),
        })
    }
}

/// Binds every listener and starts every task. Must be called inside a tokio runtime.
pub async fn start(cfg: &SimConfig) -> Result<Running, SimError> {
    cfg.engine.validate()?;
    cfg.pd.validate(cfg.instances)?;
    let mut instances = Vec::with_capacity(cfg.instances);
    let mut listeners = Vec::with_capacity(cfg.instances);
    for i in 0..cfg.instances {
        let want = if cfg.base_port == 0 {
            0
        } else {
            cfg.base_port.checked_add(i as u16).ok_or_else(|| {
                SimError::Config(crate::config::ConfigError::Invalid {
                    name: "base_port",
                    reason: "base_port + instances exceeds 65535".into(),
                })
            })?
        };
        let l = bind(&cfg.host, want).await?;
        let port = l.local_addr()?.port();
        let (kv, sockets) = match &cfg.kv_events {
            None => (None, None),
            Some(k) => {
                let (p, r) = if k.base_port == 0 {
                    (0, 0)
                } else {
                    let p = k.base_port as usize + 2 * i;
                    if p + 1 > u16::MAX as usize {
                        return Err(SimError::KvEvents("kv event ports exceed 65535".into()));
                    }
                    (p as u16, p as u16 + 1)
                };
                let mut ports = KvPorts {
                    pub_port: p,
                    replay_port: r,
                    topic: k.topic.clone(),
                    buffer_steps: k.buffer_steps,
                };
                let sockets = crate::kv_events::bind_sockets(&cfg.host, &mut ports).await?;
                (Some(ports), Some(sockets))
            }
        };
        instances.push(Instance::new(
            i,
            &cfg.host,
            port,
            cfg.engine.clone(),
            kv,
            &cfg.pd,
        ));
        listeners.push((l, sockets));
    }
    for (inst, (l, sockets)) in instances.iter().zip(listeners) {
        inst.start_engine();
        if let (Some(kv), Some(sockets)) = (&inst.kv, sockets) {
            crate::kv_events::start_publisher(inst.clone(), kv.clone(), sockets);
        }
        if let Some(f) = cfg.initial_fault {
            inst.set_fault(f);
        }
        tokio::spawn(serve_instance(inst.clone(), l));
    }
    let admin_port = match cfg.admin_port {
        None => None,
        Some(p) => {
            let l = bind(&cfg.host, p).await?;
            let port = l.local_addr()?.port();
            tokio::spawn(serve_admin(instances.clone(), l));
            Some(port)
        }
    };
    Ok(Running {
        instances,
        admin_port,
    })
}

async fn serve_admin(instances: Vec<Arc<Instance>>, l: TcpListener) {
    let instances = Arc::new(instances);
    loop {
        let Ok((stream, _)) = l.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            continue;
        };
        let inst = instances.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| admin_handle(inst.clone(), req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn admin_handle(
    instances: Arc<Vec<Arc<Instance>>>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<SimBody>, std::convert::Infallible> {
    use http_body_util::BodyExt;
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let json = |status: StatusCode, v: Value| {
        let mut r = Response::new(SimBody::Full(Some(
            serde_json::to_vec(&v).unwrap_or_default().into(),
        )));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        r
    };
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let resp = match (method, parts.as_slice()) {
        (Method::GET, ["health"]) => json(StatusCode::OK, json!({"ok": true})),
        (Method::GET, ["instances"]) => json(
            StatusCode::OK,
            Value::Array(instances.iter().map(|i| i.info()).collect()),
        ),
        (Method::POST, ["instances", which, "fault"]) => {
            let targets: Vec<Arc<Instance>> = if *which == "all" {
                instances.iter().cloned().collect()
            } else {
                match which.parse::<usize>().ok().and_then(|i| instances.get(i)) {
                    Some(i) => vec![i.clone()],
                    None => {
                        return Ok(json(
                            StatusCode::NOT_FOUND,
                            json!({"error": "no such instance"}),
                        ));
                    }
                }
            };
            let body = match http_body_util::Limited::new(req.into_body(), 1 << 20)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return Ok(json(
                        StatusCode::BAD_REQUEST,
                        json!({"error": e.to_string()}),
                    ));
                }
            };
            match serde_json::from_slice::<FaultSpec>(&body) {
                Ok(spec) if spec.validate().is_ok() => {
                    for t in &targets {
                        t.set_fault(spec);
                    }
                    json(StatusCode::OK, json!({"ok": true, "fault": spec}))
                }
                Ok(spec) => json(
                    StatusCode::BAD_REQUEST,
                    json!({"error": format!("invalid fault {spec:?}")}),
                ),
                Err(e) => json(StatusCode::BAD_REQUEST, json!({"error": e.to_string()})),
            }
        }
        _ => json(StatusCode::NOT_FOUND, json!({"detail": "Not Found"})),
    };
    Ok(resp)
}

/// Raises the soft open-files limit to the hard limit (many instances × many connections).
pub fn raise_nofile_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the rlimit struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Runs the simulator until ctrl-c / SIGTERM; prints the ready line on stdout.
pub async fn run(cfg: SimConfig) -> Result<(), SimError> {
    let running = start(&cfg).await?;
    let line = running.ready_json().to_string();
    if let Some(path) = &cfg.ports_file {
        std::fs::write(path, &line)?;
    }
    println!("{line}");
    tracing::info!(
        instances = running.instances.len(),
        time_scale = cfg.engine.time_scale,
        "vllm-sim ready"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
