//! The OpenAI-compatible HTTP API of one instance: request types, vLLM-shaped responses, SSE.
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (JSON or SSE),
//! `POST /v1/responses` (JSON or SSE), `GET /v1/responses/{id}`,
//! `POST /v1/responses/{id}/cancel` (the Responses API, see [`crate::responses`]),
//! `GET /v1/models`, `GET /health`, `POST /tokenize`, `GET /load`, `GET /metrics`,
//! `GET /version`, `GET /kv_event_sources`, vLLM's serving API beyond generation
//! (`POST /detokenize`, `/score`, `/rerank`, `/pooling`, `/classify`, `/v1/embeddings`,
//! `/v1/audio/transcriptions`, `/v1/audio/translations`, see [`crate::serving`]), and the
//! simulator's own `GET/POST /sim/fault`,
//! `GET /sim/info`, `POST /sim/reset_prefix_cache`, `POST /sim/kv_transfer` (the KV pull of
//! disaggregated prefill/decode, see [`crate::pd`]).
//!
//! Chat and completions requests may carry vLLM's `kv_transfer_params` (NixlConnector P/D):
//! a prefill leg's JSON answer then carries the params of its KV, and a decode leg pulls that
//! KV from the prefill instance before it is submitted (see [`crate::pd`]).
//!
//! Every generating endpoint goes through `submit` (engine admission) and then either
//! `wait_finished` (JSON) or a `TokenPump` (SSE), so cached tokens, timings, metrics and
//! faults behave the same whatever the API.
//!
//! Every completion response carries `usage.prompt_tokens_details.cached_tokens` (as vLLM does
//! with `--enable-prompt-tokens-details`). Non-streaming responses also carry the engine's
//! virtual timings in `x-sim-*` headers (seconds of simulated time), so tests can check the
//! latency model without reading wall clocks.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::engine::{
    EngineHandle, FinishReason, Progress, RequestShared, RequestSpec, SubmitError, Timings,
};
use crate::faults::{FaultMode, FaultSpec};
use crate::pd::{Leg, PullRequest};
use crate::server::{Instance, LoadGuard};
use crate::serving::Route;
use crate::tokenizer::{ChatTurn, Tokenizer, fnv1a64, mix64};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 << 20;

/// The response body: a complete buffer or an SSE stream.
pub enum SimBody {
    /// A complete body.
    Full(Option<Bytes>),
    /// A live SSE stream of chat/completions chunks.
    Sse(Box<SseStream>),
    /// A live SSE stream of Responses API events.
    Responses(Box<crate::responses::ResponseStream>),
    /// A body that fails once polled (cuts the connection).
    Cut(Option<Pin<Box<tokio::time::Sleep>>>),
}

impl SimBody {
    pub(crate) fn full(b: impl Into<Bytes>) -> Self {
        Self::Full(Some(b.into()))
    }
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            SimBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            SimBody::Sse(s) => s.poll_next(cx),
            SimBody::Responses(s) => s.poll_next(cx),
            SimBody::Cut(sleep) => {
                if let Some(s) = sleep {
                    if s.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    *sleep = None;
                }
                Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "fault: reset",
                ))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, SimBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            SimBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            SimBody::Full(None) => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

use std::future::Future as _;

/// A response.
pub type Resp = Response<SimBody>;

pub(crate) fn json_response(status: StatusCode, v: &Value) -> Resp {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(SimBody::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A vLLM-style error response (`{"error": {message, type, param, code}}`).
pub fn error_response(status: StatusCode, kind: &str, message: &str, param: Option<&str>) -> Resp {
    json_response(
        status,
        &json!({
            "error": {
                "message": message,
                "type": kind,
                "param": param,
                "code": status.as_u16(),
            }
        }),
    )
}

pub(crate) fn bad_request(message: &str) -> Resp {
    error_response(StatusCode::BAD_REQUEST, "BadRequestError", message, None)
}

pub(crate) fn not_found() -> Resp {
    json_response(StatusCode::NOT_FOUND, &json!({"detail": "Not Found"}))
}

pub(crate) fn method_not_allowed() -> Resp {
    json_response(
        StatusCode::METHOD_NOT_ALLOWED,
        &json!({"detail": "Method Not Allowed"}),
    )
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One chat message as sent (also the stored conversation of the Responses API).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ChatMessage {
    pub(crate) role: String,
    #[serde(default)]
    pub(crate) content: Option<Value>,
    #[serde(default)]
    pub(crate) tool_calls: Option<Value>,
}

#[derive(Debug, Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    add_generation_prompt: Option<bool>,
    #[serde(default)]
    n: Option<i64>,
    /// Disaggregated prefill/decode (see [`crate::pd`]).
    #[serde(default)]
    kv_transfer_params: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    model: Option<String>,
    prompt: Value,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    n: Option<i64>,
    /// HF mode only (the stand-in always starts with BOS).
    #[serde(default)]
    add_special_tokens: Option<bool>,
    /// Disaggregated prefill/decode (see [`crate::pd`]).
    #[serde(default)]
    kv_transfer_params: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct TokenizeRequest {
    #[serde(default)]
    prompt: Option<Value>,
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    add_generation_prompt: Option<bool>,
    /// HF mode only: for `prompt` (default true; chat bodies read it themselves).
    #[serde(default)]
    add_special_tokens: Option<bool>,
    /// HF mode only: answer the vocabulary strings in `token_strs`.
    #[serde(default)]
    return_token_strs: Option<bool>,
}

pub(crate) fn chat_turns<'a>(
    messages: impl IntoIterator<Item = &'a ChatMessage>,
) -> Vec<ChatTurn<'a>> {
    messages
        .into_iter()
        .map(|m| ChatTurn {
            role: &m.role,
            content: m.content.as_ref(),
            tool_calls: m.tool_calls.as_ref(),
        })
        .collect()
}

/// Tokens of a completions `prompt` (string, [string], [int] or [[int]]); `add_special_tokens`
/// applies to text prompts in HF mode.
fn prompt_tokens(
    tok: &Tokenizer,
    prompt: &Value,
    add_special_tokens: bool,
) -> Result<Vec<u32>, String> {
    fn ids(a: &[Value]) -> Option<Vec<u32>> {
        a.iter()
            .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect()
    }
    match prompt {
        Value::String(s) => tok.try_encode_prompt(s, add_special_tokens),
        Value::Array(a) if a.is_empty() => Err("prompt must not be empty".into()),
        Value::Array(a) => match &a[0] {
            Value::String(s) if a.len() == 1 => tok.try_encode_prompt(s, add_special_tokens),
            Value::Number(_) => ids(a).ok_or_else(|| "prompt token ids must be integers".into()),
            Value::Array(inner) if a.len() == 1 => {
                ids(inner).ok_or_else(|| "prompt token ids must be integers".into())
            }
            _ => Err(
                "batched prompts are not supported by vllm-sim; send one prompt per request".into(),
            ),
        },
        _ => Err("prompt must be a string, a list of strings or a list of token ids".into()),
    }
}

pub(crate) fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Box<Resp>> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = if e.is_syntax() || e.is_eof() {
            format!("JSON decode error: {e}")
        } else {
            format!("1 validation error: {e}")
        };
        Box::new(bad_request(&msg))
    })
}

/// Handles one HTTP request for an instance.
pub async fn handle(
    inst: Arc<Instance>,
    req: Request<hyper::body::Incoming>,
) -> Result<Resp, Infallible> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if let Some(rest) = path.strip_prefix("/sim/") {
        return Ok(sim_admin(&inst, rest, method, req).await);
    }
    // Faults that gate every vLLM endpoint.
    let mut fault_rx = inst.fault_rx();
    loop {
        let mode = fault_rx.borrow_and_update().mode;
        match mode {
            FaultMode::Hang => {
                if fault_rx.changed().await.is_err() {
                    return Ok(error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "ServiceUnavailableError",
                        "instance stopped",
                        None,
                    ));
                }
            }
            FaultMode::Unavailable | FaultMode::Die => {
                return Ok(error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailableError",
                    "The server is unavailable (vllm-sim fault).",
                    None,
                ));
            }
            _ => break,
        }
    }
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 256)
        .map(str::to_string);
    let mut resp = match (method, path.as_str()) {
        (Method::GET, "/health") => Response::new(SimBody::Full(None)),
        (Method::GET, "/v1/models") => models(&inst),
        (Method::GET, "/version") => json_response(StatusCode::OK, &json!({"version": "0.33.0"})),
        (Method::GET, "/load") => json_response(
            StatusCode::OK,
            &json!({"server_load": inst.in_flight.load(Ordering::Relaxed)}),
        ),
        (Method::GET, "/metrics") => metrics(&inst),
        (Method::GET, "/kv_event_sources") => kv_event_sources(&inst),
        (Method::POST, "/tokenize") => match read_body(req).await {
            Ok(b) => {
                inst.tokenize_requests
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokenize(&inst, &b)
            }
            Err(r) => *r,
        },
        (Method::POST, "/v1/chat/completions") => {
            let load = inst.load_guard();
            match read_body(req).await {
                Ok(b) => chat(&inst, &b, request_id.clone(), load).await,
                Err(r) => *r,
            }
        }
        (Method::POST, "/v1/completions") => {
            let load = inst.load_guard();
            match read_body(req).await {
                Ok(b) => completion(&inst, &b, request_id.clone(), load).await,
                Err(r) => *r,
            }
        }
        (Method::POST, "/v1/responses") => {
            let load = inst.load_guard();
            match read_body(req).await {
                Ok(b) => crate::responses::create(&inst, &b, load).await,
                Err(r) => *r,
            }
        }
        // vLLM's serving API beyond generation (see [`crate::serving`]).
        (
            Method::POST,
            p @ ("/detokenize"
            | "/score"
            | "/v1/score"
            | "/rerank"
            | "/v1/rerank"
            | "/v2/rerank"
            | "/pooling"
            | "/classify"
            | "/v1/embeddings"
            | "/v1/audio/transcriptions"
            | "/v1/audio/translations"),
        ) => match Route::of_path(p) {
            Some(route) => crate::serving::serve(&inst, route, req, request_id.clone()).await,
            None => not_found(),
        },
        (
            _,
            "/health"
            | "/v1/models"
            | "/version"
            | "/load"
            | "/metrics"
            | "/kv_event_sources"
            | "/tokenize"
            | "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/responses"
            | "/detokenize"
            | "/score"
            | "/v1/score"
            | "/rerank"
            | "/v1/rerank"
            | "/v2/rerank"
            | "/pooling"
            | "/classify"
            | "/v1/embeddings"
            | "/v1/audio/transcriptions"
            | "/v1/audio/translations",
        ) => method_not_allowed(),
        (m, p) if p.starts_with("/v1/responses/") => {
            let query = req.uri().query().map(str::to_string);
            crate::responses::by_id(&inst, m, &p["/v1/responses/".len()..], query.as_deref())
        }
        _ => not_found(),
    };
    if let Some(id) = request_id
        && let Ok(v) = HeaderValue::from_str(&id)
    {
        resp.headers_mut().insert("x-request-id", v);
    }
    Ok(resp)
}

pub(crate) async fn read_body(req: Request<hyper::body::Incoming>) -> Result<Bytes, Box<Resp>> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY_BYTES);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => Err(Box::new(bad_request(&format!(
            "could not read request body: {e}"
        )))),
    }
}

fn models(inst: &Instance) -> Resp {
    let c = &inst.cfg;
    json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": [{
                "id": c.model,
                "object": "model",
                "created": inst.created,
                "owned_by": "vllm",
                "root": c.model,
                "parent": null,
                "max_model_len": c.max_model_len,
                "permission": [{
                    "id": format!("modelperm-{}", inst.new_id()),
                    "object": "model_permission",
                    "created": inst.created,
                    "allow_create_engine": false,
                    "allow_sampling": true,
                    "allow_logprobs": true,
                    "allow_search_indices": false,
                    "allow_view": true,
                    "allow_fine_tuning": false,
                    "organization": "*",
                    "group": null,
                    "is_blocking": false
                }]
            }]
        }),
    )
}

fn metrics(inst: &Instance) -> Resp {
    let engine = inst.engine();
    let text = {
        let e = engine.lock();
        crate::metrics::render(
            &inst.cfg.model,
            0,
            &e.gauges(),
            e.metrics(),
            Some((inst.cfg.block_size, inst.cfg.num_gpu_blocks)),
        )
    };
    let mut r = Response::new(SimBody::full(text));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

fn kv_event_sources(inst: &Instance) -> Resp {
    match &inst.kv {
        None => json_response(StatusCode::OK, &json!({})),
        Some(kv) => json_response(
            StatusCode::OK,
            &json!({
                "0": {
                    "enable_kv_cache_events": true,
                    "publisher": "zmq",
                    "endpoint": format!("tcp://{}:{}", inst.host, kv.pub_port),
                    "replay_endpoint": format!("tcp://{}:{}", inst.host, kv.replay_port),
                    "buffer_steps": kv.buffer_steps,
                    "hwm": 100000,
                    "max_queue_size": 100000,
                    "topic": kv.topic,
                }
            }),
        ),
    }
}

pub(crate) fn check_model(inst: &Instance, model: Option<&str>) -> Result<(), Box<Resp>> {
    check_served_model(&inst.cfg.model, model)
}

/// vLLM's 404 when a request names a model other than the served one (`None` is the served one).
pub(crate) fn check_served_model(served: &str, model: Option<&str>) -> Result<(), Box<Resp>> {
    match model {
        Some(m) if m != served => Err(Box::new(error_response(
            StatusCode::NOT_FOUND,
            "NotFoundError",
            &format!("The model `{m}` does not exist."),
            Some("model"),
        ))),
        _ => Ok(()),
    }
}

fn tokenize(inst: &Instance, body: &[u8]) -> Resp {
    let req: TokenizeRequest = match parse_body(body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let hf = inst.tokenizer.hf();
    let tokens = if let Some(msgs) = &req.messages {
        match hf {
            Some(hf) => match hf.chat_request_tokens(body) {
                Ok(t) => t,
                Err(e) => return bad_request(&e.to_string()),
            },
            None => inst.tokenizer.render_chat(
                &chat_turns(msgs),
                req.tools.as_ref(),
                req.add_generation_prompt.unwrap_or(true),
            ),
        }
    } else if let Some(p) = &req.prompt {
        match prompt_tokens(&inst.tokenizer, p, req.add_special_tokens.unwrap_or(true)) {
            Ok(t) => t,
            Err(m) => return bad_request(&m),
        }
    } else {
        return bad_request("either `prompt` or `messages` is required");
    };
    let token_strs = match hf {
        Some(hf) if req.return_token_strs == Some(true) => json!(hf.token_strs(&tokens)),
        _ => Value::Null,
    };
    json_response(
        StatusCode::OK,
        &json!({
            "count": tokens.len(),
            "max_model_len": inst.cfg.max_model_len,
            "tokens": tokens,
            "token_strs": token_strs,
        }),
    )
}

fn max_tokens_arg(v: Option<i64>) -> Result<Option<usize>, Box<Resp>> {
    match v {
        None => Ok(None),
        Some(n) if n >= 1 => Ok(Some(n as usize)),
        Some(n) => Err(Box::new(bad_request(&format!(
            "max_tokens must be at least 1, got {n}."
        )))),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

struct Prepared {
    kind: Kind,
    prompt: Vec<u32>,
    max_tokens: Option<usize>,
    stream: bool,
    include_usage: bool,
    seed: u64,
    /// The P/D leg this request is (from `kv_transfer_params`), if any.
    leg: Option<Leg>,
}

/// Reads a request's `kv_transfer_params` and checks the instance's role can serve it: a
/// malformed object, a decode leg on a `producer` or a prefill leg on a `consumer` gets a 400.
fn pd_leg(inst: &Instance, params: Option<&Value>) -> Result<Option<Leg>, Box<Resp>> {
    let leg = crate::pd::parse_params(params).map_err(|e| Box::new(bad_request(&e.to_string())))?;
    let role = inst.pd.role();
    match &leg {
        Some(Leg::Prefill) if !role.produces() => Err(Box::new(bad_request(&format!(
            "kv_transfer_params: do_remote_decode requires a KV producer, but this instance has \
             kv_role={} (it cannot serve a prefill leg)",
            role.as_str()
        )))),
        Some(Leg::Decode(_)) if !role.consumes() => Err(Box::new(bad_request(&format!(
            "kv_transfer_params: do_remote_prefill requires a KV consumer, but this instance has \
             kv_role={} (it cannot serve a decode leg)",
            role.as_str()
        )))),
        _ => Ok(leg),
    }
}

async fn chat(inst: &Arc<Instance>, body: &[u8], rid: Option<String>, load: LoadGuard) -> Resp {
    let req: ChatRequest = match parse_body(body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    if let Err(r) = check_model(inst, req.model.as_deref()) {
        return *r;
    }
    if req.messages.is_empty() {
        return bad_request("messages must contain at least one message");
    }
    if req.n.is_some_and(|n| n != 1) {
        return bad_request("vllm-sim supports n=1 only");
    }
    let leg = match pd_leg(inst, req.kv_transfer_params.as_ref()) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    let max = match max_tokens_arg(req.max_completion_tokens.or(req.max_tokens)) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    let prompt = match inst.tokenizer.hf() {
        // HF mode renders the raw body: every field vLLM hands the template, in the sent order.
        Some(hf) => match hf.chat_request_tokens(body) {
            Ok(p) => p,
            Err(e) => return bad_request(&e.to_string()),
        },
        None => inst.tokenizer.render_chat(
            &chat_turns(&req.messages),
            req.tools.as_ref(),
            req.add_generation_prompt.unwrap_or(true),
        ),
    };
    let p = Prepared {
        kind: Kind::Chat,
        seed: output_seed(&prompt, req.seed),
        prompt,
        max_tokens: max,
        stream: req.stream.unwrap_or(false),
        include_usage: req
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        leg,
    };
    generate(inst, p, rid, load).await
}

async fn completion(
    inst: &Arc<Instance>,
    body: &[u8],
    rid: Option<String>,
    load: LoadGuard,
) -> Resp {
    let req: CompletionRequest = match parse_body(body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    if let Err(r) = check_model(inst, req.model.as_deref()) {
        return *r;
    }
    if req.n.is_some_and(|n| n != 1) {
        return bad_request("vllm-sim supports n=1 only");
    }
    let leg = match pd_leg(inst, req.kv_transfer_params.as_ref()) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    let max = match max_tokens_arg(req.max_tokens) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    let add_special = req.add_special_tokens.unwrap_or(true);
    let prompt = match prompt_tokens(&inst.tokenizer, &req.prompt, add_special) {
        Ok(p) => p,
        Err(m) => return bad_request(&m),
    };
    let p = Prepared {
        kind: Kind::Completion,
        seed: output_seed(&prompt, req.seed),
        prompt,
        // vLLM's completions default is 16 tokens.
        max_tokens: Some(max.unwrap_or(16)),
        stream: req.stream.unwrap_or(false),
        include_usage: req
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        leg,
    };
    generate(inst, p, rid, load).await
}

/// Deterministic output seed: identical prompts give identical answers (greedy-like).
pub(crate) fn output_seed(prompt: &[u32], seed: Option<i64>) -> u64 {
    let mut h = prompt.len() as u64;
    for &t in prompt.iter().rev().take(64) {
        h = mix64(h ^ u64::from(t));
    }
    h ^ seed.map(|s| mix64(s as u64)).unwrap_or(0)
}

/// Aborts the engine request when the HTTP side goes away first.
struct AbortGuard {
    engine: Arc<EngineHandle>,
    id: u64,
    shared: Arc<RequestShared>,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if !self.shared.is_finished() {
            self.engine.abort(self.id);
        }
    }
}

/// A request admitted by the engine: what its HTTP side needs to follow it. Dropping it before
/// the request finishes aborts the request (client gone).
pub(crate) struct Submitted {
    shared: Arc<RequestShared>,
    guard: AbortGuard,
    /// Cut the response after this many generated tokens (`reset:N` fault).
    pub(crate) reset_after: Option<usize>,
}

/// KV a decode leg brought from its prefill instance (see [`crate::pd`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct KvLoad {
    /// Prompt tokens transferred ([`RequestSpec::remote_tokens`]).
    remote_tokens: usize,
    /// Virtual seconds the transfer took ([`RequestSpec::waited_v`]).
    waited_v: f64,
}

/// Submits a prompt to the instance's engine, as every generating endpoint does, and counts it
/// as a plain (non-P/D) request.
///
/// `explicit` says whether `max_tokens` came from the request (the request then finishes with
/// `length`) or is a default (`stop`). `stream` sets how often the engine wakes the HTTP side.
/// Refusals (too long, too large for the KV pool, empty) become vLLM's 400.
pub(crate) fn submit(
    inst: &Arc<Instance>,
    prompt: Vec<u32>,
    max_tokens: usize,
    explicit: bool,
    seed: u64,
    stream: bool,
) -> Result<Submitted, Box<Resp>> {
    inst.pd
        .counters
        .plain_requests
        .fetch_add(1, Ordering::Relaxed);
    submit_kv(
        inst,
        prompt,
        (max_tokens, explicit),
        seed,
        stream,
        KvLoad::default(),
    )
}

/// [`submit`] for any request, with the KV a decode leg brought (`kv`); not counted.
/// `max_tokens` is `(count, explicit)`.
fn submit_kv(
    inst: &Arc<Instance>,
    prompt: Vec<u32>,
    (max_tokens, explicit): (usize, bool),
    seed: u64,
    stream: bool,
    kv: KvLoad,
) -> Result<Submitted, Box<Resp>> {
    let engine = inst.engine();
    let reset_after = match inst.fault().mode {
        FaultMode::Reset { after_tokens } => Some(after_tokens),
        _ => None,
    };
    let spec = RequestSpec {
        prompt,
        max_tokens,
        explicit_max_tokens: explicit,
        seed,
        wake_every: if stream {
            inst.cfg.stream_interval
        } else if reset_after.is_some() {
            1
        } else {
            usize::MAX
        },
        remote_tokens: kv.remote_tokens,
        waited_v: kv.waited_v,
    };
    let (id, shared) = match engine.submit(spec) {
        Ok(x) => x,
        Err(e @ (SubmitError::TooLong { .. } | SubmitError::TooLarge { .. })) => {
            return Err(Box::new(bad_request(&e.to_string())));
        }
        Err(e) => return Err(Box::new(bad_request(&e.to_string()))),
    };
    let guard = AbortGuard {
        engine,
        id,
        shared: shared.clone(),
    };
    Ok(Submitted {
        shared,
        guard,
        reset_after,
    })
}

impl Submitted {
    /// Follows the request token by token (SSE).
    pub(crate) fn into_pump(self) -> TokenPump {
        TokenPump {
            shared: self.shared,
            guard: Some(self.guard),
            reset_after: self.reset_after,
            sent: 0,
            done: false,
            cut: None,
        }
    }
}

/// How a request followed by [`wait_finished`] ended.
pub(crate) enum Outcome {
    /// Finished normally (`stop` or `length`).
    Done {
        /// Final progress (tokens, cached tokens, preemptions).
        progress: Progress,
        /// `stop` or `length`.
        reason: FinishReason,
        /// Virtual timings.
        timings: Timings,
    },
    /// The `reset` fault fired: the response must be cut.
    Cut,
    /// Aborted by the engine (instance death).
    Aborted,
}

/// Waits until the request finishes (or the `reset` fault's token count is reached).
pub(crate) async fn wait_finished(sub: Submitted) -> Outcome {
    let reset_after = sub.reset_after;
    let finished = std::future::poll_fn(|cx| {
        sub.shared.waker.register(cx.waker());
        let pr = sub.shared.snapshot();
        if pr.finished.is_some() || reset_after.is_some_and(|n| pr.generated >= n) {
            Poll::Ready(pr)
        } else {
            Poll::Pending
        }
    })
    .await;
    drop(sub);
    match finished.finished {
        None => Outcome::Cut,
        Some((FinishReason::Abort, _)) => Outcome::Aborted,
        Some((reason, timings)) => Outcome::Done {
            progress: finished,
            reason,
            timings,
        },
    }
}

/// The answer to a non-streaming request cut by the `reset` fault: headers, then a cut body.
pub(crate) fn cut_response() -> Resp {
    let mut r = Response::new(SimBody::Cut(None));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The answer to a non-streaming request aborted by the engine.
pub(crate) fn aborted_response() -> Resp {
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "ServiceUnavailableError",
        "request aborted",
        None,
    )
}

/// Text of generated tokens `from..to` of a request with output seed `seed`.
pub(crate) fn output_text(tok: &Tokenizer, seed: u64, from: usize, to: usize) -> String {
    let mut text = String::with_capacity(to.saturating_sub(from) * 5);
    for j in from..to {
        text.push_str(tok.output_token(seed, j).1.as_str());
    }
    text
}

/// Adds the engine's virtual timings as `x-sim-*` headers.
pub(crate) fn add_sim_headers(r: &mut Resp, inst: &Instance, t: &Timings, preemptions: u32) {
    let h = r.headers_mut();
    for (k, v) in [
        ("x-sim-ttft", t.ttft),
        ("x-sim-e2e", t.e2e),
        ("x-sim-queue", t.queue),
        ("x-sim-itl", t.mean_itl),
        ("x-sim-time-scale", inst.cfg.time_scale),
    ] {
        if let Ok(v) = HeaderValue::from_str(&format!("{v:.9}")) {
            h.insert(k, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&preemptions.to_string()) {
        h.insert("x-sim-preemptions", v);
    }
}

/// The P/D part of a request before its submission: counts its leg and, for a decode leg, pulls
/// its KV from the prefill instance and waits the modelled transfer time. A failed pull is
/// counted and the prompt recomputed (vLLM's `kv_load_failure_policy=recompute`).
async fn load_kv(inst: &Instance, leg: Option<&Leg>) -> KvLoad {
    let c = &inst.pd.counters;
    let remote = match leg {
        None => {
            c.plain_requests.fetch_add(1, Ordering::Relaxed);
            return KvLoad::default();
        }
        Some(Leg::Prefill) => {
            c.prefill_legs.fetch_add(1, Ordering::Relaxed);
            return KvLoad::default();
        }
        Some(Leg::Decode(r)) => r,
    };
    c.decode_legs.fetch_add(1, Ordering::Relaxed);
    match inst.pd.pull(remote).await {
        Ok(tokens) => {
            c.transferred_tokens
                .fetch_add(tokens as u64, Ordering::Relaxed);
            let waited_v = inst.pd.transfer_time_v(tokens);
            tokio::time::sleep(inst.cfg.to_wall(waited_v)).await;
            KvLoad {
                remote_tokens: tokens,
                waited_v,
            }
        }
        Err(e) => {
            c.transfer_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(instance = inst.idx, "{e}; recomputing the prompt");
            KvLoad::default()
        }
    }
}

async fn generate(inst: &Arc<Instance>, p: Prepared, rid: Option<String>, load: LoadGuard) -> Resp {
    let max_tokens = p.max_tokens.unwrap_or(inst.cfg.default_max_tokens);
    let prompt_len = p.prompt.len();
    let kv = load_kv(inst, p.leg.as_ref()).await;
    let sub = match submit_kv(
        inst,
        p.prompt,
        (max_tokens, p.max_tokens.is_some()),
        p.seed,
        p.stream,
        kv,
    ) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let base = rid.unwrap_or_else(|| inst.new_id());
    let oid = match p.kind {
        Kind::Chat => format!("chatcmpl-{base}"),
        Kind::Completion => format!("cmpl-{base}"),
    };
    let created = unix_now();
    let model_json = serde_json::to_string(&inst.cfg.model).unwrap_or_else(|_| "\"\"".into());
    let oid_json = serde_json::to_string(&oid).unwrap_or_else(|_| "\"\"".into());
    if p.stream {
        let object = match p.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let prefix = format!(
            "data: {{\"id\":{oid_json},\"object\":\"{object}\",\"created\":{created},\"model\":{model_json},\"choices\":["
        );
        let s = SseStream {
            pump: sub.into_pump(),
            tokenizer: inst.tokenizer.clone(),
            seed: p.seed,
            kind: p.kind,
            prefix,
            include_usage: p.include_usage,
            prompt_tokens: prompt_len,
            sent_role: false,
            _load: load,
        };
        let mut r = Response::new(SimBody::Sse(Box::new(s)));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        return r;
    }
    // Non-streaming: wait for the end (or the reset fault).
    let (finished, reason, t) = match wait_finished(sub).await {
        Outcome::Done {
            progress,
            reason,
            timings,
        } => (progress, reason, timings),
        Outcome::Cut => return cut_response(),
        Outcome::Aborted => return aborted_response(),
    };
    let text = output_text(&inst.tokenizer, p.seed, 0, finished.generated);
    // A prefill leg's KV now waits for its decode instance.
    let kv_transfer_params = matches!(p.leg, Some(Leg::Prefill)).then(|| {
        inst.pd
            .offer(prompt_len, inst.cfg.block_size, &inst.host, inst.port)
    });
    let usage = Usage {
        prompt_tokens: prompt_len,
        total_tokens: prompt_len + finished.generated,
        completion_tokens: finished.generated,
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: finished.cached_tokens,
        },
    };
    let body = match p.kind {
        Kind::Chat => serde_json::to_vec(&ChatResponse {
            id: &oid,
            object: "chat.completion",
            created,
            model: &inst.cfg.model,
            choices: [ChatChoice {
                index: 0,
                message: ChatMessageOut {
                    role: "assistant",
                    content: &text,
                    refusal: None,
                    annotations: None,
                    audio: None,
                    function_call: None,
                    tool_calls: [],
                    reasoning_content: None,
                },
                logprobs: None,
                finish_reason: reason.as_str(),
                stop_reason: None,
            }],
            service_tier: None,
            system_fingerprint: None,
            usage,
            prompt_logprobs: None,
            kv_transfer_params: kv_transfer_params.as_ref(),
        }),
        Kind::Completion => serde_json::to_vec(&CompletionResponse {
            id: &oid,
            object: "text_completion",
            created,
            model: &inst.cfg.model,
            choices: [CompletionChoice {
                index: 0,
                text: &text,
                logprobs: None,
                finish_reason: reason.as_str(),
                stop_reason: None,
                prompt_logprobs: None,
            }],
            service_tier: None,
            system_fingerprint: None,
            usage,
            kv_transfer_params: kv_transfer_params.as_ref(),
        }),
    }
    .unwrap_or_default();
    let mut r = Response::new(SimBody::full(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    add_sim_headers(&mut r, inst, &t, finished.preemptions);
    r
}

#[derive(Serialize)]
struct PromptTokensDetails {
    cached_tokens: usize,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
    completion_tokens: usize,
    prompt_tokens_details: PromptTokensDetails,
}

#[derive(Serialize)]
struct ChatMessageOut<'a> {
    role: &'static str,
    content: &'a str,
    refusal: Option<()>,
    annotations: Option<()>,
    audio: Option<()>,
    function_call: Option<()>,
    tool_calls: [(); 0],
    reasoning_content: Option<()>,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: ChatMessageOut<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
    stop_reason: Option<()>,
}

#[derive(Serialize)]
struct ChatResponse<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [ChatChoice<'a>; 1],
    service_tier: Option<()>,
    system_fingerprint: Option<()>,
    usage: Usage,
    prompt_logprobs: Option<()>,
    kv_transfer_params: Option<&'a Value>,
}

#[derive(Serialize)]
struct CompletionChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: Option<()>,
    finish_reason: &'static str,
    stop_reason: Option<()>,
    prompt_logprobs: Option<()>,
}

#[derive(Serialize)]
struct CompletionResponse<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [CompletionChoice<'a>; 1],
    service_tier: Option<()>,
    system_fingerprint: Option<()>,
    usage: Usage,
    kv_transfer_params: Option<&'a Value>,
}

/// New tokens of a request, as seen by one poll of a [`TokenPump`].
pub(crate) struct Pumped {
    /// First new token.
    pub(crate) from: usize,
    /// One past the last new token (`from == to` when only the finish is new).
    pub(crate) to: usize,
    /// Set on the last poll of a finished request (never `abort`).
    pub(crate) finish: Option<FinishReason>,
    /// Prompt tokens served from the prefix cache.
    pub(crate) cached: usize,
}

/// Follows a streamed request: each poll yields the tokens produced since the last one
/// (coalescing, as vLLM's output collector does when the client lags), applies the `reset`
/// fault (the tokens up to N, then a cut connection) and turns an engine abort into an error.
pub(crate) struct TokenPump {
    shared: Arc<RequestShared>,
    guard: Option<AbortGuard>,
    reset_after: Option<usize>,
    sent: usize,
    done: bool,
    cut: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl TokenPump {
    /// `Ready(None)` once the finish was yielded; `Ready(Some(Err))` for a cut or an abort.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<std::io::Result<Pumped>>> {
        if let Some(c) = &mut self.cut {
            if c.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.cut = None;
            self.done = true;
            return Poll::Ready(Some(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "fault: reset mid-stream",
            ))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        self.shared.waker.register(cx.waker());
        let (generated, finished, cached) = {
            let p = self.shared.snapshot();
            (p.generated, p.finished, p.cached_tokens)
        };
        let mut upto = generated;
        let mut cut_now = false;
        if let Some(n) = self.reset_after
            && upto >= n
        {
            upto = n;
            cut_now = true;
        }
        if upto == self.sent && finished.is_none() && !cut_now {
            return Poll::Pending;
        }
        let finish = if cut_now { None } else { finished.map(|f| f.0) };
        if finish == Some(FinishReason::Abort) {
            self.done = true;
            return Poll::Ready(Some(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "request aborted",
            ))));
        }
        let from = self.sent;
        self.sent = upto;
        if finish.is_some() {
            self.done = true;
            self.guard = None;
        }
        if cut_now {
            // Let the bytes so far reach the socket, then cut.
            self.cut = Some(Box::pin(tokio::time::sleep(
                std::time::Duration::from_millis(50),
            )));
        }
        Poll::Ready(Some(Ok(Pumped {
            from,
            to: upto,
            finish,
            cached,
        })))
    }
}

/// An SSE stream of one chat/completions request, one chunk per [`TokenPump`] poll.
pub struct SseStream {
    pump: TokenPump,
    tokenizer: Tokenizer,
    seed: u64,
    kind: Kind,
    prefix: String,
    include_usage: bool,
    prompt_tokens: usize,
    sent_role: bool,
    _load: LoadGuard,
}

impl SseStream {
    fn push_chunk(&self, out: &mut String, from: usize, to: usize, finish: Option<FinishReason>) {
        out.push_str(&self.prefix);
        match self.kind {
            Kind::Chat => out.push_str("{\"index\":0,\"delta\":{\"content\":\""),
            Kind::Completion => out.push_str("{\"index\":0,\"text\":\""),
        }
        for j in from..to {
            out.push_str(self.tokenizer.output_token(self.seed, j).1.as_str());
        }
        out.push('"');
        if self.kind == Kind::Chat {
            out.push('}');
        }
        match (finish, self.kind) {
            (None, Kind::Chat) => out.push_str(",\"logprobs\":null,\"finish_reason\":null}]}\n\n"),
            (None, Kind::Completion) => out.push_str(
                ",\"logprobs\":null,\"finish_reason\":null,\"stop_reason\":null}],\"usage\":null}\n\n",
            ),
            (Some(f), Kind::Chat) => {
                out.push_str(",\"logprobs\":null,\"finish_reason\":\"");
                out.push_str(f.as_str());
                out.push_str("\",\"stop_reason\":null}]}\n\n");
            }
            (Some(f), Kind::Completion) => {
                out.push_str(",\"logprobs\":null,\"finish_reason\":\"");
                out.push_str(f.as_str());
                out.push_str("\",\"stop_reason\":null}],\"usage\":null}\n\n");
            }
        }
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let ev = match self.pump.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(ev))) => ev,
        };
        let mut out = String::with_capacity(self.prefix.len() * 2 + 256);
        if !self.sent_role && self.kind == Kind::Chat && (ev.to > 0 || ev.finish.is_some()) {
            out.push_str(&self.prefix);
            out.push_str("{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n");
            self.sent_role = true;
        }
        match ev.finish {
            Some(f) => {
                self.push_chunk(&mut out, ev.from, ev.to, Some(f));
                if self.include_usage {
                    out.push_str(&self.prefix);
                    out.push_str(&format!(
                        "],\"usage\":{{\"prompt_tokens\":{},\"total_tokens\":{},\"completion_tokens\":{},\"prompt_tokens_details\":{{\"cached_tokens\":{}}}}}}}\n\n",
                        self.prompt_tokens,
                        self.prompt_tokens + ev.to,
                        ev.to,
                        ev.cached
                    ));
                }
                out.push_str("data: [DONE]\n\n");
            }
            None => {
                if ev.to > ev.from {
                    self.push_chunk(&mut out, ev.from, ev.to, None);
                }
            }
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))))
    }
}

async fn sim_admin(
    inst: &Arc<Instance>,
    rest: &str,
    method: Method,
    req: Request<hyper::body::Incoming>,
) -> Resp {
    match (method, rest) {
        (Method::GET, "fault") => json_response(
            StatusCode::OK,
            &serde_json::to_value(*inst.fault_rx().borrow()).unwrap_or(Value::Null),
        ),
        (Method::POST, "fault") => {
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(r) => return *r,
            };
            let spec: FaultSpec = match parse_body(&body) {
                Ok(s) => s,
                Err(r) => return *r,
            };
            if let Err(e) = spec.validate() {
                return bad_request(&e.to_string());
            }
            inst.set_fault(spec);
            json_response(StatusCode::OK, &json!({"ok": true, "fault": spec}))
        }
        (Method::GET, "info") => json_response(StatusCode::OK, &inst.info()),
        (Method::POST, "kv_transfer") => {
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(r) => return *r,
            };
            let pull: PullRequest = match parse_body(&body) {
                Ok(p) => p,
                Err(r) => return *r,
            };
            match inst.pd.take(&pull.engine_id, &pull.block_ids) {
                Some(tokens) => json_response(StatusCode::OK, &json!({"tokens": tokens})),
                None => error_response(
                    StatusCode::NOT_FOUND,
                    "NotFoundError",
                    &format!(
                        "no pending KV transfer for engine {} and these blocks (unknown, \
                         expired, already pulled or another incarnation)",
                        pull.engine_id
                    ),
                    None,
                ),
            }
        }
        (Method::POST, "reset_prefix_cache") => {
            let eng = inst.engine();
            eng.lock().reset_prefix_cache();
            json_response(StatusCode::OK, &json!({"ok": true}))
        }
        _ => not_found(),
    }
}

/// A short pseudo-random hex id (32 chars, uuid4-hex-like).
pub fn hex_id(seed: u64, n: u64) -> String {
    let a = mix64(seed ^ n);
    let b = mix64(a ^ fnv1a64(&n.to_le_bytes()));
    format!("{a:016x}{b:016x}")
}
