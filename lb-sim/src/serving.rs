//! vLLM's serving API beyond generation: `/detokenize`, scoring (`/score`, `/rerank`), pooling
//! (`/pooling`, `/classify`, `/v1/embeddings`) and speech to text (`/v1/audio/transcriptions`,
//! `/v1/audio/translations`).
//!
//! Request and response shapes, ids (`score-<id>`, `rerank-<id>`, `pool-<id>`,
//! `classify-<id>`, `embd-<id>`, where `<id>` is `X-Request-Id` when sent), error bodies and
//! status codes are vLLM's. Results are deterministic functions of the request: scores,
//! embeddings and class probabilities come from a hash of the prompt's token ids (the instance
//! tokenizer, also used for `usage`), transcripts from a hash of the audio file's bytes. So an
//! answer through a router can be compared with a direct one. These requests do not go through
//! the engine (no KV, no metrics); each route's requests are counted in [`ServingCounters`]
//! (`"serving"` in `/sim/info`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{
    ChatMessage, Resp, SimBody, bad_request, chat_turns, check_served_model, error_response,
    json_response, parse_body, read_body, unix_now,
};
use crate::server::Instance;
use crate::tokenizer::{Tokenizer, fnv1a64, mix64};

/// Size of the simulated embeddings (`dimensions` may ask for fewer: matryoshka truncation).
pub const EMBED_DIM: usize = 64;
/// Number of classes of `/classify` (labels `LABEL_0`, `LABEL_1`, ...).
pub const NUM_CLASSES: usize = 2;
/// Largest audio file accepted (vLLM's `VLLM_MAX_AUDIO_CLIP_FILESIZE_MB` default, 25 MB).
pub const MAX_AUDIO_BYTES: u64 = 25 << 20;

/// A serving route (several paths may map to one, e.g. `/v1/rerank`, `/rerank`, `/v2/rerank`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST /detokenize`.
    Detokenize,
    /// `POST /score`, `POST /v1/score`.
    Score,
    /// `POST /rerank`, `POST /v1/rerank`, `POST /v2/rerank`.
    Rerank,
    /// `POST /pooling`.
    Pooling,
    /// `POST /classify`.
    Classify,
    /// `POST /v1/embeddings`.
    Embeddings,
    /// `POST /v1/audio/transcriptions`.
    Transcriptions,
    /// `POST /v1/audio/translations`.
    Translations,
}

impl Route {
    /// Every route, in the order of [`ServingCounters`].
    pub const ALL: [Route; 8] = [
        Route::Detokenize,
        Route::Score,
        Route::Rerank,
        Route::Pooling,
        Route::Classify,
        Route::Embeddings,
        Route::Transcriptions,
        Route::Translations,
    ];

    /// The route's key in `/sim/info`'s `serving` object.
    pub fn name(self) -> &'static str {
        match self {
            Route::Detokenize => "detokenize",
            Route::Score => "score",
            Route::Rerank => "rerank",
            Route::Pooling => "pooling",
            Route::Classify => "classify",
            Route::Embeddings => "embeddings",
            Route::Transcriptions => "transcriptions",
            Route::Translations => "translations",
        }
    }

    /// The route serving `path`, if any.
    pub fn of_path(path: &str) -> Option<Route> {
        Some(match path {
            "/detokenize" => Route::Detokenize,
            "/score" | "/v1/score" => Route::Score,
            "/rerank" | "/v1/rerank" | "/v2/rerank" => Route::Rerank,
            "/pooling" => Route::Pooling,
            "/classify" => Route::Classify,
            "/v1/embeddings" => Route::Embeddings,
            "/v1/audio/transcriptions" => Route::Transcriptions,
            "/v1/audio/translations" => Route::Translations,
            _ => return None,
        })
    }
}

/// Requests served per route by one instance (errors included).
#[derive(Debug, Default)]
pub struct ServingCounters([AtomicU64; Route::ALL.len()]);

impl ServingCounters {
    /// Counts one request of `route`.
    pub fn count(&self, route: Route) {
        self.0[route as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests of `route` so far.
    pub fn get(&self, route: Route) -> u64 {
        self.0[route as usize].load(Ordering::Relaxed)
    }

    /// `{"detokenize": n, "score": n, ...}` (every route, zeros included).
    pub fn info(&self) -> Value {
        Value::Object(
            Route::ALL
                .iter()
                .map(|&r| (r.name().to_string(), json!(self.get(r))))
                .collect(),
        )
    }
}

/// What a handler needs of its instance (unit tests build one without a server).
struct Ctx<'a> {
    tok: &'a Tokenizer,
    model: &'a str,
    max_model_len: usize,
    /// `X-Request-Id`, or a fresh id.
    id: String,
    created: u64,
}

/// Serves one request of `route` (POST only; the caller answers other methods).
pub(crate) async fn serve(
    inst: &Arc<Instance>,
    route: Route,
    req: Request<hyper::body::Incoming>,
    request_id: Option<String>,
) -> Resp {
    inst.serving.count(route);
    // vLLM's `load_aware_call`: these requests count in `/load` while served.
    let _load = inst.load_guard();
    let ctx = Ctx {
        tok: &inst.tokenizer,
        model: &inst.cfg.model,
        max_model_len: inst.cfg.max_model_len,
        id: request_id.unwrap_or_else(|| inst.new_id()),
        created: unix_now(),
    };
    let handler: fn(&Ctx<'_>, &[u8]) -> Resp = match route {
        Route::Detokenize => detokenize,
        Route::Score => score,
        Route::Rerank => rerank,
        Route::Pooling => |c, b| pool(c, b, Pooling::Pool),
        Route::Classify => |c, b| pool(c, b, Pooling::Classify),
        Route::Embeddings => |c, b| pool(c, b, Pooling::Embed),
        Route::Transcriptions | Route::Translations => {
            let content_type = req
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let stream = req.into_body().into_data_stream();
            return audio(
                &ctx,
                route == Route::Translations,
                content_type.as_deref(),
                stream,
            )
            .await;
        }
    };
    match read_body(req).await {
        Ok(body) => handler(&ctx, &body),
        Err(r) => *r,
    }
}

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(r) => return *r,
        }
    };
}

/// A 200 answer with the JSON body `v`.
fn ok_json(v: &Value) -> Resp {
    json_response(StatusCode::OK, v)
}

/// vLLM's 400 for `message`, boxed as the error of a `tri!` operand.
fn bad(message: String) -> Box<Resp> {
    Box::new(bad_request(&message))
}

/// The list answer of a scoring or pooling request: `data`, its id `<prefix>-<id>` and the
/// usage of `prompt_tokens`.
fn list_response(ctx: &Ctx<'_>, prefix: &str, data: Vec<Value>, prompt_tokens: usize) -> Resp {
    ok_json(&json!({
        "id": format!("{prefix}-{}", ctx.id),
        "object": "list",
        "created": ctx.created,
        "model": ctx.model,
        "data": data,
        "usage": usage(prompt_tokens),
    }))
}

/// vLLM's `UsageInfo` of a pooling request.
fn usage(prompt_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens,
        "completion_tokens": 0,
        "prompt_tokens_details": null,
    })
}

fn check_model(ctx: &Ctx<'_>, model: Option<&str>) -> Result<(), Box<Resp>> {
    check_served_model(ctx.model, model)
}

/// vLLM's 400 for a prompt longer than the context.
fn check_len(ctx: &Ctx<'_>, tokens: usize, operation: &str) -> Result<(), Box<Resp>> {
    if tokens > ctx.max_model_len {
        return Err(bad(format!(
            "This model's maximum context length is {} tokens. However, you requested {tokens} \
             tokens in the input for {operation}. Please reduce the length of the input.",
            ctx.max_model_len
        )));
    }
    Ok(())
}

/// Tokens of `text` without special tokens (the second text of a scored pair).
fn encode_plain(tok: &Tokenizer, text: &str) -> Result<Vec<u32>, String> {
    match tok.hf() {
        Some(hf) => hf.encode(text, false).map_err(|e| e.to_string()),
        None => {
            let mut out = Vec::new();
            tok.encode_segment(text, &mut out);
            Ok(out)
        }
    }
}

/// A hash of a token sequence (the seed of every simulated output).
fn token_hash(tokens: &[u32], salt: u64) -> u64 {
    let mut h = mix64(salt ^ tokens.len() as u64);
    for &t in tokens {
        h = mix64(h ^ u64::from(t));
    }
    h
}

/// A uniform number in `[0, 1)` from a hash.
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

const SCORE_SALT: u64 = 0x5c0e_5c0e_5c0e_5c0e;
const EMBED_SALT: u64 = 0xe3bd_e3bd_e3bd_e3bd;
const CLASS_SALT: u64 = 0xc1a5_c1a5_c1a5_c1a5;

/// The relevance score of a (query, document) pair's tokens, in `(0, 1)`.
fn pair_score(tokens: &[u32]) -> f64 {
    f64::from(unit(token_hash(tokens, SCORE_SALT)) as f32)
}

/// The unit-norm embedding of a prompt, truncated to `dim` (≤ [`EMBED_DIM`]) and renormalized.
fn embedding(tokens: &[u32], dim: usize) -> Vec<f32> {
    let seed = token_hash(tokens, EMBED_SALT);
    let v: Vec<f64> = (0..dim.min(EMBED_DIM))
        .map(|i| {
            unit(mix64(
                seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            )) * 2.0
                - 1.0
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    v.iter().map(|x| (x / norm) as f32).collect()
}

/// Softmax probabilities of [`NUM_CLASSES`] classes of a prompt.
fn class_probs(tokens: &[u32]) -> Vec<f64> {
    let seed = token_hash(tokens, CLASS_SALT);
    let logits: Vec<f64> = (0..NUM_CLASSES as u64)
        .map(|k| unit(mix64(seed ^ k)) * 8.0 - 4.0)
        .collect();
    let max = logits.iter().copied().fold(f64::MIN, f64::max);
    let exps: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| f64::from((e / sum) as f32)).collect()
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        out.push(A[(n >> 18) as usize & 63] as char);
        out.push(A[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            A[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            A[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

// ---------------------------------------------------------------------------------------------
// /detokenize

#[derive(Debug, Deserialize)]
struct DetokenizeRequest {
    #[serde(default)]
    model: Option<String>,
    tokens: Vec<i64>,
}

/// Why the stand-in cannot detokenize.
pub const DETOKENIZE_NEEDS_HF: &str = "vllm-sim cannot detokenize with its stand-in tokenizer \
     (its token ids are hashes of the text, a one-way mapping); start vllm-sim with \
     --tokenizer DIR (HF mode) to serve /detokenize";

fn detokenize(ctx: &Ctx<'_>, body: &[u8]) -> Resp {
    let req: DetokenizeRequest = tri!(parse_body(body));
    tri!(check_model(ctx, req.model.as_deref()));
    let Some(hf) = ctx.tok.hf() else {
        return bad_request(DETOKENIZE_NEEDS_HF);
    };
    let mut ids = Vec::with_capacity(req.tokens.len());
    for &t in &req.tokens {
        match u32::try_from(t) {
            Ok(id) => ids.push(id),
            Err(_) => return bad_request(&format!("Token id {t} is out of vocabulary")),
        }
    }
    match hf.decode(&ids, false) {
        Ok(prompt) => ok_json(&json!({ "prompt": prompt })),
        Err(e) => bad_request(&e.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// /score and /rerank

#[derive(Debug, Deserialize)]
struct ScoreRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    text_1: Option<Value>,
    #[serde(default)]
    text_2: Option<Value>,
    #[serde(default)]
    queries: Option<Value>,
    #[serde(default)]
    documents: Option<Value>,
    #[serde(default)]
    items: Option<Value>,
    #[serde(default)]
    data_1: Option<Value>,
    #[serde(default)]
    data_2: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct RerankRequest {
    #[serde(default)]
    model: Option<String>,
    query: Value,
    documents: Value,
    #[serde(default)]
    top_n: Option<i64>,
}

/// Texts of a score input: a string or a list of strings (rerank documents may also be
/// `{"text": ...}` objects). Multimodal inputs are refused.
fn score_texts(v: &Value, name: &str, objects: bool) -> Result<Vec<String>, String> {
    let one = |x: &Value| -> Result<String, String> {
        match x {
            Value::String(s) => Ok(s.clone()),
            Value::Object(o) if objects => match o.get("text") {
                Some(Value::String(s)) => Ok(s.clone()),
                _ => Err(format!(
                    "{name}: vllm-sim scores text only (a string or {{\"text\": ...}})"
                )),
            },
            _ => Err(format!(
                "{name}: vllm-sim scores text only (a string or a list of strings)"
            )),
        }
    };
    match v {
        Value::Array(a) => a.iter().map(one).collect(),
        Value::Object(o) if o.contains_key("content") => Err(format!(
            "{name}: multimodal score inputs are not supported by vllm-sim"
        )),
        other => Ok(vec![one(other)?]),
    }
}

/// Pairs `(i, j)` of vLLM's 1:1, 1:N or N:N scoring.
fn score_pairs(n1: usize, n2: usize) -> Result<Vec<(usize, usize)>, String> {
    if n1 == 0 {
        return Err("At least one text element must be given".into());
    }
    if n2 == 0 {
        return Err("At least one text_pair element must be given".into());
    }
    if n1 == 1 {
        Ok((0..n2).map(|j| (0, j)).collect())
    } else if n1 == n2 {
        Ok((0..n1).map(|i| (i, i)).collect())
    } else {
        Err("Input lengths must be either 1:1, 1:N or N:N".into())
    }
}

/// Scores of `(first, second)` text pairs and the prompt tokens used (a cross-encoder's pair
/// prompt: the first text with special tokens, then the second without).
fn score_all(
    ctx: &Ctx<'_>,
    first: &[String],
    second: &[String],
    operation: &str,
) -> Result<(Vec<f64>, usize), Box<Resp>> {
    let pairs = score_pairs(first.len(), second.len()).map_err(bad)?;
    let mut firsts: Vec<Option<Vec<u32>>> = vec![None; first.len()];
    let mut scores = Vec::with_capacity(pairs.len());
    let mut total = 0;
    for (i, j) in pairs {
        let a = match &firsts[i] {
            Some(a) => a.clone(),
            None => {
                let a = ctx.tok.try_encode_prompt(&first[i], true).map_err(bad)?;
                firsts[i] = Some(a.clone());
                a
            }
        };
        let mut tokens = a;
        tokens.extend(encode_plain(ctx.tok, &second[j]).map_err(bad)?);
        check_len(ctx, tokens.len(), operation)?;
        total += tokens.len();
        scores.push(pair_score(&tokens));
    }
    Ok((scores, total))
}

fn score(ctx: &Ctx<'_>, body: &[u8]) -> Resp {
    let req: ScoreRequest = tri!(parse_body(body));
    tri!(check_model(ctx, req.model.as_deref()));
    let (a, b, names) = match (&req.text_1, &req.text_2, &req.queries, &req.data_1) {
        (Some(a), Some(b), _, _) => (a, b, ("text_1", "text_2")),
        (_, _, Some(q), _) if req.documents.is_some() || req.items.is_some() => {
            match (&req.documents, &req.items) {
                (Some(d), _) => (q, d, ("queries", "documents")),
                (_, Some(i)) => (q, i, ("queries", "items")),
                _ => return bad_request("`queries` needs `documents` or `items`"),
            }
        }
        (_, _, _, Some(d1)) if req.data_2.is_some() => match &req.data_2 {
            Some(d2) => (d1, d2, ("data_1", "data_2")),
            None => return bad_request("`data_1` needs `data_2`"),
        },
        _ => {
            return bad_request(
                "1 validation error: the request needs `text_1` and `text_2` (or `queries` and \
                 `documents`/`items`, or `data_1` and `data_2`)",
            );
        }
    };
    let first = tri!(score_texts(a, names.0, false).map_err(bad));
    let second = tri!(score_texts(b, names.1, false).map_err(bad));
    let (scores, tokens) = tri!(score_all(ctx, &first, &second, "score"));
    let data: Vec<Value> = scores
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"index": i, "object": "score", "score": s}))
        .collect();
    list_response(ctx, "score", data, tokens)
}

fn rerank(ctx: &Ctx<'_>, body: &[u8]) -> Resp {
    let req: RerankRequest = tri!(parse_body(body));
    tri!(check_model(ctx, req.model.as_deref()));
    let query = match &req.query {
        Value::String(s) => s.clone(),
        _ => return bad_request("query: vllm-sim reranks text only (a string)"),
    };
    if !req.documents.is_array() {
        return bad_request("documents: must be a list of strings or {\"text\": ...} objects");
    }
    let docs = tri!(score_texts(&req.documents, "documents", true).map_err(bad));
    let (scores, tokens) = if docs.is_empty() {
        (Vec::new(), 0)
    } else {
        tri!(score_all(
            ctx,
            std::slice::from_ref(&query),
            &docs,
            "rerank"
        ))
    };
    let mut order: Vec<usize> = (0..docs.len()).collect();
    order.sort_by(|&x, &y| scores[y].total_cmp(&scores[x]).then(x.cmp(&y)));
    let top_n = match req.top_n {
        Some(n) if n > 0 => (n as usize).min(docs.len()),
        _ => docs.len(),
    };
    let results: Vec<Value> = order[..top_n]
        .iter()
        .map(|&i| {
            json!({
                "index": i,
                "document": {"text": docs[i], "multi_modal": null},
                "relevance_score": scores[i],
            })
        })
        .collect();
    ok_json(&json!({
        "id": format!("rerank-{}", ctx.id),
        "model": ctx.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "results": results,
    }))
}

// ---------------------------------------------------------------------------------------------
// /pooling, /classify, /v1/embeddings

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pooling {
    Pool,
    Classify,
    Embed,
}

#[derive(Debug, Deserialize)]
struct PoolingRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    add_special_tokens: Option<bool>,
    #[serde(default)]
    add_generation_prompt: Option<bool>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    embed_dtype: Option<String>,
    #[serde(default)]
    endianness: Option<String>,
    #[serde(default)]
    dimensions: Option<i64>,
    #[serde(default)]
    truncate_prompt_tokens: Option<i64>,
}

/// How vectors are sent: JSON floats, or base64 of their f32 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Float,
    Base64 { big_endian: bool },
}

fn encoding(req: &PoolingRequest) -> Result<Encoding, String> {
    match req.embed_dtype.as_deref() {
        None | Some("float32") => {}
        Some(d) => return Err(format!("embed_dtype {d:?}: vllm-sim supports float32 only")),
    }
    let big_endian = match req.endianness.as_deref() {
        None | Some("native") | Some("little") => false,
        Some("big") => true,
        Some(e) => return Err(format!("endianness {e:?}: expected native, little or big")),
    };
    match req.encoding_format.as_deref() {
        None | Some("float") => Ok(Encoding::Float),
        Some("base64") => Ok(Encoding::Base64 { big_endian }),
        Some(f) => Err(format!(
            "encoding_format {f:?}: vllm-sim supports float and base64"
        )),
    }
}

fn vector_value(v: &[f32], enc: Encoding) -> Value {
    match enc {
        Encoding::Float => Value::Array(v.iter().map(|&x| json!(f64::from(x))).collect()),
        Encoding::Base64 { big_endian } => {
            let bytes: Vec<u8> = v
                .iter()
                .flat_map(|x| {
                    if big_endian {
                        x.to_be_bytes()
                    } else {
                        x.to_le_bytes()
                    }
                })
                .collect();
            Value::String(base64(&bytes))
        }
    }
}

/// Prompts of a pooling `input`: a string, a list of strings, a list of token ids or a list of
/// lists of token ids.
fn input_prompts(tok: &Tokenizer, input: &Value, special: bool) -> Result<Vec<Vec<u32>>, String> {
    fn ids(a: &[Value]) -> Result<Vec<u32>, String> {
        a.iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or_else(|| {
                        format!("input: token ids must be non-negative integers, got {v}")
                    })
            })
            .collect()
    }
    match input {
        Value::String(s) => Ok(vec![tok.try_encode_prompt(s, special)?]),
        Value::Array(a) if a.is_empty() => Err("input: must not be empty".into()),
        Value::Array(a) => match &a[0] {
            Value::Number(_) => Ok(vec![ids(a)?]),
            Value::String(_) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => tok.try_encode_prompt(s, special),
                    _ => Err("input: a list must hold only strings or only token ids".into()),
                })
                .collect(),
            Value::Array(_) => a
                .iter()
                .map(|v| match v {
                    Value::Array(inner) if !inner.is_empty() => ids(inner),
                    Value::Array(_) => Err("input: a token id list must not be empty".into()),
                    _ => Err("input: a list must hold only lists of token ids".into()),
                })
                .collect(),
            _ => Err("input: expected a string, a list of strings or token ids".into()),
        },
        _ => Err("input: expected a string, a list of strings or token ids".into()),
    }
}

/// The prompt of a pooling chat request (`add_generation_prompt` defaults to false, as vLLM's
/// pooling chat requests do).
fn chat_prompt(ctx: &Ctx<'_>, body: &[u8], req: &PoolingRequest) -> Result<Vec<u32>, String> {
    let msgs = req.messages.as_deref().unwrap_or_default();
    if msgs.is_empty() {
        return Err("messages must contain at least one message".into());
    }
    match ctx.tok.hf() {
        Some(hf) => {
            let mut v: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
            if let Some(o) = v.as_object_mut() {
                o.entry("add_generation_prompt").or_insert(json!(false));
            }
            let body = serde_json::to_vec(&v).map_err(|e| e.to_string())?;
            hf.chat_request_tokens(&body).map_err(|e| e.to_string())
        }
        None => Ok(ctx.tok.render_chat(
            &chat_turns(msgs),
            req.tools.as_ref(),
            req.add_generation_prompt.unwrap_or(false),
        )),
    }
}

fn pool(ctx: &Ctx<'_>, body: &[u8], kind: Pooling) -> Resp {
    let req: PoolingRequest = tri!(parse_body(body));
    tri!(check_model(ctx, req.model.as_deref()));
    let enc = tri!(encoding(&req).map_err(bad));
    let dim = match req.dimensions {
        None => EMBED_DIM,
        Some(d) if d >= 1 && d as usize <= EMBED_DIM => d as usize,
        Some(d) if d < 1 => return bad_request("Dimensions must be greater than 0"),
        Some(d) => {
            return bad_request(&format!(
                "Model \"{}\" only supports dimensions up to {EMBED_DIM} (vllm-sim's embedding \
                 size), got {d}",
                ctx.model
            ));
        }
    };
    let truncate = match req.truncate_prompt_tokens {
        None => None,
        Some(-1) => Some(ctx.max_model_len),
        Some(k) if k >= 0 && k as usize <= ctx.max_model_len => Some(k as usize),
        Some(k) if k >= 0 => {
            return bad_request(&format!(
                "truncate_prompt_tokens value ({k}) is greater than max_model_len ({}). Please, \
                 select a smaller truncation size.",
                ctx.max_model_len
            ));
        }
        Some(k) => {
            return bad_request(&format!(
                "truncate_prompt_tokens must be -1 or non-negative, got {k}"
            ));
        }
    };
    let prompts = if req.messages.is_some() {
        chat_prompt(ctx, body, &req).map(|p| vec![p])
    } else if let Some(input) = &req.input {
        input_prompts(ctx.tok, input, req.add_special_tokens.unwrap_or(true))
    } else {
        Err("1 validation error: either `input` or `messages` is required".into())
    };
    let mut prompts = tri!(prompts.map_err(bad));
    let operation = match kind {
        Pooling::Classify => "classification",
        Pooling::Embed => "embedding generation",
        Pooling::Pool => "pooling",
    };
    let mut tokens = 0;
    for p in &mut prompts {
        if let Some(k) = truncate
            && p.len() > k
        {
            p.drain(..p.len() - k);
        }
        tri!(check_len(ctx, p.len(), operation));
        tokens += p.len();
    }
    let (prefix, data): (&str, Vec<Value>) = match kind {
        Pooling::Embed | Pooling::Pool => {
            // An embedding's vector is `embedding`, a pooling output's `data`.
            let (prefix, object, field) = if kind == Pooling::Embed {
                ("embd", "embedding", "embedding")
            } else {
                ("pool", "pooling", "data")
            };
            (
                prefix,
                prompts
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        json!({
                            "index": i,
                            "object": object,
                            field: vector_value(&embedding(p, dim), enc),
                        })
                    })
                    .collect(),
            )
        }
        Pooling::Classify => (
            "classify",
            prompts
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let probs = class_probs(p);
                    let best = (0..probs.len())
                        .max_by(|&a, &b| probs[a].total_cmp(&probs[b]).then(b.cmp(&a)))
                        .unwrap_or(0);
                    json!({
                        "index": i,
                        "label": format!("LABEL_{best}"),
                        "probs": probs,
                        "num_classes": NUM_CLASSES,
                    })
                })
                .collect(),
        ),
    };
    list_response(ctx, prefix, data, tokens)
}

// ---------------------------------------------------------------------------------------------
// /v1/audio/transcriptions and /v1/audio/translations

/// The form fields of a transcription or translation request.
#[derive(Debug, Default)]
struct AudioForm {
    file: Option<Bytes>,
    model: Option<String>,
    language: Option<String>,
    response_format: Option<String>,
    temperature: Option<String>,
    stream: Option<String>,
}

/// Stand-in words of simulated transcripts.
const WORDS: [&str; 32] = [
    "the", "a", "and", "of", "to", "in", "is", "it", "that", "we", "for", "on", "with", "this",
    "was", "as", "you", "be", "at", "have", "from", "or", "one", "by", "what", "all", "were",
    "when", "there", "can", "more", "time",
];

/// Seconds of audio in `file`: a WAV header's byte rate, or 16 kHz 16-bit mono PCM.
fn audio_duration(file: &[u8]) -> f64 {
    if file.len() >= 44 && &file[..4] == b"RIFF" && &file[8..12] == b"WAVE" {
        let rate = u32::from_le_bytes([file[28], file[29], file[30], file[31]]);
        if rate > 0 {
            return (file.len() - 44) as f64 / f64::from(rate);
        }
    }
    file.len() as f64 / 32_000.0
}

/// The transcript of `file`: about 2.5 words per second of audio (at least one for a non-empty
/// file, at most 1,000), a function of the file's bytes and the task.
fn transcript(file: &[u8], translate: bool) -> String {
    if file.is_empty() {
        return String::new();
    }
    let n = ((audio_duration(file) * 2.5).ceil() as usize).clamp(1, 1000);
    let seed = fnv1a64(file) ^ if translate { 0x7a11_7a11 } else { 0 };
    let mut text = String::with_capacity(n * 5);
    for k in 0..n {
        let w = WORDS[(mix64(seed ^ k as u64) % WORDS.len() as u64) as usize];
        if k == 0 {
            let mut c = w.chars();
            if let Some(f) = c.next() {
                text.extend(f.to_uppercase());
                text.push_str(c.as_str());
            }
        } else {
            text.push(' ');
            text.push_str(w);
        }
    }
    text.push('.');
    text
}

/// Python's `str(float)` for the durations vLLM sends as strings.
fn py_float_str(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

fn missing_file(translate: bool) -> Resp {
    bad_request(&format!(
        "1 validation error for {}\nfile\n  Field required",
        if translate {
            "TranslationRequest"
        } else {
            "TranscriptionRequest"
        }
    ))
}

async fn read_form<S, E>(
    content_type: Option<&str>,
    stream: S,
    translate: bool,
) -> Result<AudioForm, Box<Resp>>
where
    S: futures_util::Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    let Some(boundary) = content_type.and_then(|ct| multer::parse_boundary(ct).ok()) else {
        return Err(Box::new(missing_file(translate)));
    };
    let limits = multer::SizeLimit::new()
        .whole_stream(MAX_AUDIO_BYTES + (1 << 20))
        .per_field(MAX_AUDIO_BYTES);
    let mut mp = multer::Multipart::with_constraints(
        stream,
        boundary,
        multer::Constraints::new().size_limit(limits),
    );
    let fail = |e: multer::Error| -> Box<Resp> {
        Box::new(match e {
            multer::Error::FieldSizeExceeded { .. } | multer::Error::StreamSizeExceeded { .. } => {
                bad_request("Maximum file size exceeded.")
            }
            e => bad_request(&format!("There was an error parsing the body: {e}")),
        })
    };
    let mut form = AudioForm::default();
    while let Some(field) = mp.next_field().await.map_err(fail)? {
        let name = field.name().unwrap_or_default().to_string();
        if name == "file" {
            if field.file_name().is_none() {
                return Err(Box::new(error_response(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Unprocessable Entity",
                    "Expected 'file' to be a file-like object, not 'str'.",
                    None,
                )));
            }
            form.file = Some(field.bytes().await.map_err(fail)?);
            continue;
        }
        let slot = match name.as_str() {
            "model" => &mut form.model,
            "language" => &mut form.language,
            "response_format" => &mut form.response_format,
            "temperature" => &mut form.temperature,
            "stream" => &mut form.stream,
            _ => {
                // Other fields (prompt, seed, timestamp_granularities[], ...) are accepted and
                // ignored; drain them.
                field.bytes().await.map_err(fail)?;
                continue;
            }
        };
        *slot = Some(field.text().await.map_err(fail)?);
    }
    Ok(form)
}

async fn audio<S, E>(ctx: &Ctx<'_>, translate: bool, content_type: Option<&str>, stream: S) -> Resp
where
    S: futures_util::Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    let form = tri!(read_form(content_type, stream, translate).await);
    let Some(file) = form.file else {
        return missing_file(translate);
    };
    tri!(check_model(ctx, form.model.as_deref()));
    if let Some(t) = &form.temperature
        && t.trim().parse::<f64>().is_err()
    {
        return bad_request(&format!(
            "1 validation error: temperature: Input should be a valid number, got {t:?}"
        ));
    }
    if form
        .stream
        .as_deref()
        .is_some_and(|s| matches!(s.trim(), "true" | "True" | "1" | "on" | "yes"))
    {
        return bad_request("vllm-sim does not stream transcriptions or translations");
    }
    let format = form.response_format.as_deref().unwrap_or("json");
    if !matches!(format, "json" | "text" | "verbose_json") {
        return bad_request(
            "Currently only support response_format `text`, `json` or `verbose_json`",
        );
    }
    let text = transcript(&file, translate);
    let duration = audio_duration(&file);
    match format {
        "text" => {
            let mut r = Response::new(SimBody::full(text));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        }
        "verbose_json" => {
            let tokens = encode_plain(ctx.tok, &text).unwrap_or_default();
            let temperature = form
                .temperature
                .as_deref()
                .and_then(|t| t.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            let segments = if text.is_empty() {
                json!([])
            } else {
                json!([{
                    "id": 0,
                    "avg_logprob": -0.25,
                    "compression_ratio": 1.0,
                    "end": duration,
                    "no_speech_prob": null,
                    "seek": 0,
                    "start": 0.0,
                    "temperature": temperature,
                    "text": text,
                    "tokens": tokens,
                }])
            };
            ok_json(&json!({
                "duration": py_float_str(duration),
                "language": form.language.as_deref().unwrap_or("en"),
                "text": text,
                "segments": segments,
                "words": null,
            }))
        }
        _ if translate => ok_json(&json!({ "text": text })),
        _ => ok_json(&json!({
            "text": text,
            "usage": {"type": "duration", "seconds": duration.ceil() as u64},
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = "m";

    fn ctx(tok: &Tokenizer) -> Ctx<'_> {
        Ctx {
            tok,
            model: MODEL,
            max_model_len: 64,
            id: "rid".into(),
            created: 1,
        }
    }

    fn body(r: Resp) -> (StatusCode, Value) {
        let status = r.status();
        let bytes = match r.into_body() {
            SimBody::Full(Some(b)) => b,
            _ => panic!("not a full body"),
        };
        (
            status,
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned())),
        )
    }

    fn call(f: fn(&Ctx<'_>, &[u8]) -> Resp, tok: &Tokenizer, v: Value) -> (StatusCode, Value) {
        body(f(&ctx(tok), &serde_json::to_vec(&v).expect("json")))
    }

    fn embed(c: &Ctx<'_>, b: &[u8]) -> Resp {
        pool(c, b, Pooling::Embed)
    }
    fn pooling(c: &Ctx<'_>, b: &[u8]) -> Resp {
        pool(c, b, Pooling::Pool)
    }
    fn classify(c: &Ctx<'_>, b: &[u8]) -> Resp {
        pool(c, b, Pooling::Classify)
    }

    fn assert_error(r: (StatusCode, Value), status: u16, needle: &str) {
        assert_eq!(r.0.as_u16(), status, "{}", r.1);
        let e = &r.1["error"];
        assert_eq!(e["code"], status, "{}", r.1);
        assert!(
            e["message"].as_str().expect("message").contains(needle),
            "{} does not contain {needle:?}",
            r.1
        );
    }

    #[test]
    fn routes_and_counters() {
        assert_eq!(Route::of_path("/v2/rerank"), Some(Route::Rerank));
        assert_eq!(Route::of_path("/v1/score"), Some(Route::Score));
        assert_eq!(Route::of_path("/v1/embedding"), None);
        let c = ServingCounters::default();
        c.count(Route::Score);
        c.count(Route::Score);
        c.count(Route::Translations);
        let info = c.info();
        assert_eq!(info["score"], 2);
        assert_eq!(info["translations"], 1);
        assert_eq!(info["rerank"], 0);
        assert_eq!(info.as_object().expect("obj").len(), Route::ALL.len());
    }

    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn score_shapes_and_pairs() {
        let tok = Tokenizer::new(4.0);
        let (s, v) = call(
            score,
            &tok,
            json!({"model": MODEL, "text_1": "what is rust", "text_2": ["a language", "a mushroom"]}),
        );
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["id"], "score-rid");
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], MODEL);
        assert_eq!(v["data"].as_array().expect("data").len(), 2);
        assert_eq!(v["data"][1]["index"], 1);
        assert_eq!(v["data"][1]["object"], "score");
        let s0 = v["data"][0]["score"].as_f64().expect("score");
        assert!((0.0..1.0).contains(&s0));
        // BOS + 3 tokens of the query, plus 3 tokens of each document.
        assert_eq!(v["usage"]["prompt_tokens"], 2 * (4 + 3));
        assert_eq!(v["usage"]["total_tokens"], 14);
        assert_eq!(v["usage"]["completion_tokens"], 0);
        assert!(v["usage"]["prompt_tokens_details"].is_null());
        // Deterministic, and the same as 1:1 and the queries/documents spelling.
        let (_, one) = call(
            score,
            &tok,
            json!({"text_1": "what is rust", "text_2": "a language"}),
        );
        assert_eq!(one["data"][0]["score"], v["data"][0]["score"]);
        let (_, qd) = call(
            score,
            &tok,
            json!({"queries": "what is rust", "documents": ["a language", "a mushroom"]}),
        );
        assert_eq!(qd["data"], v["data"]);
        // N:N.
        let (_, nn) = call(
            score,
            &tok,
            json!({"text_1": ["what is rust", "x"], "text_2": ["a language", "y"]}),
        );
        assert_eq!(nn["data"][0]["score"], v["data"][0]["score"]);
        // Errors.
        assert_error(
            call(
                score,
                &tok,
                json!({"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}),
            ),
            400,
            "1:1, 1:N or N:N",
        );
        assert_error(call(score, &tok, json!({"text_1": "a"})), 400, "text_2");
        assert_error(
            call(
                score,
                &tok,
                json!({"model": "other", "text_1": "a", "text_2": "b"}),
            ),
            404,
            "The model `other` does not exist.",
        );
        assert_error(
            call(
                score,
                &tok,
                json!({"text_1": "a", "text_2": "b".repeat(400)}),
            ),
            400,
            "maximum context length is 64 tokens",
        );
    }

    #[test]
    fn rerank_sorts_and_applies_top_n() {
        let tok = Tokenizer::new(4.0);
        let docs = ["alpha doc", "beta doc", "gamma doc", "delta doc"];
        let (s, v) = call(
            rerank,
            &tok,
            json!({"model": MODEL, "query": "which doc", "documents": docs}),
        );
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["id"], "rerank-rid");
        assert_eq!(v["model"], MODEL);
        let results = v["results"].as_array().expect("results");
        assert_eq!(results.len(), 4);
        let scores: Vec<f64> = results
            .iter()
            .map(|r| r["relevance_score"].as_f64().expect("score"))
            .collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
        for r in results {
            let i = r["index"].as_u64().expect("index") as usize;
            assert_eq!(r["document"]["text"], docs[i]);
        }
        // Same scores as /score, same usage.
        let (_, sc) = call(score, &tok, json!({"text_1": "which doc", "text_2": docs}));
        for r in results {
            let i = r["index"].as_u64().expect("index") as usize;
            assert_eq!(r["relevance_score"], sc["data"][i]["score"]);
        }
        assert_eq!(v["usage"]["total_tokens"], sc["usage"]["prompt_tokens"]);
        // top_n, and {"text"} documents.
        let (_, top) = call(
            rerank,
            &tok,
            json!({"query": "which doc", "documents": [{"text": "alpha doc"}, "beta doc", {"text": "gamma doc"}, "delta doc"], "top_n": 2}),
        );
        assert_eq!(top["results"].as_array().expect("r").len(), 2);
        assert_eq!(top["results"][0], results[0]);
        assert_eq!(top["results"][1], results[1]);
        assert_error(
            call(rerank, &tok, json!({"query": "q"})),
            400,
            "validation error",
        );
        assert_error(
            call(rerank, &tok, json!({"query": "q", "documents": [1]})),
            400,
            "text only",
        );
        assert_error(
            call(
                rerank,
                &tok,
                json!({"model": "x", "query": "q", "documents": ["d"]}),
            ),
            404,
            "does not exist",
        );
    }

    #[test]
    fn embeddings_shapes_encodings_and_dimensions() {
        let tok = Tokenizer::new(4.0);
        let (s, v) = call(
            embed,
            &tok,
            json!({"model": MODEL, "input": ["hello world", "bye"]}),
        );
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["id"], "embd-rid");
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][1]["object"], "embedding");
        assert_eq!(v["data"][1]["index"], 1);
        let e: Vec<f64> = v["data"][0]["embedding"]
            .as_array()
            .expect("embedding")
            .iter()
            .map(|x| x.as_f64().expect("f"))
            .collect();
        assert_eq!(e.len(), EMBED_DIM);
        let norm: f64 = e.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
        // BOS + 3 and BOS + 1.
        assert_eq!(v["usage"]["prompt_tokens"], 6);
        assert_eq!(v["usage"]["total_tokens"], 6);
        // Token ids give the same vector as the text they tokenize to.
        let ids = tok.encode_prompt("hello world");
        let (_, by_ids) = call(embed, &tok, json!({"input": ids}));
        assert_eq!(by_ids["data"][0]["embedding"], v["data"][0]["embedding"]);
        let (_, batched) = call(embed, &tok, json!({"input": [ids, [1, 2]]}));
        assert_eq!(batched["data"][0]["embedding"], v["data"][0]["embedding"]);
        assert_eq!(batched["usage"]["prompt_tokens"], 6);
        // base64: little-endian f32 bytes of the same floats.
        let (_, b64) = call(
            embed,
            &tok,
            json!({"input": "hello world", "encoding_format": "base64"}),
        );
        let want: Vec<f32> = e.iter().map(|&x| x as f32).collect();
        let bytes: Vec<u8> = want.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(b64["data"][0]["embedding"], base64(&bytes));
        // dimensions: a renormalized prefix.
        let (_, d) = call(
            embed,
            &tok,
            json!({"input": "hello world", "dimensions": 8}),
        );
        let short = d["data"][0]["embedding"].as_array().expect("e");
        assert_eq!(short.len(), 8);
        let r = short[0].as_f64().expect("f") / e[0];
        for (k, x) in short.iter().enumerate() {
            assert!((x.as_f64().expect("f") / e[k] - r).abs() < 1e-3);
        }
        assert_error(
            call(embed, &tok, json!({"input": "x", "dimensions": 0})),
            400,
            "greater than 0",
        );
        assert_error(
            call(embed, &tok, json!({"input": "x", "dimensions": 100_000})),
            400,
            "dimensions",
        );
        assert_error(
            call(
                embed,
                &tok,
                json!({"input": "x", "encoding_format": "bytes"}),
            ),
            400,
            "encoding_format",
        );
        assert_error(call(embed, &tok, json!({"input": []})), 400, "empty");
        assert_error(call(embed, &tok, json!({"model": MODEL})), 400, "`input`");
        assert_error(
            call(embed, &tok, json!({"model": "nope", "input": "x"})),
            404,
            "does not exist",
        );
        assert_error(
            call(embed, &tok, json!({"input": "y".repeat(400)})),
            400,
            "embedding generation",
        );
        // Truncation keeps the last tokens.
        let (s, t) = call(
            embed,
            &tok,
            json!({"input": "y".repeat(400), "truncate_prompt_tokens": 10}),
        );
        assert_eq!(s, StatusCode::OK);
        assert_eq!(t["usage"]["prompt_tokens"], 10);
    }

    #[test]
    fn pooling_and_classify_shapes() {
        let tok = Tokenizer::new(4.0);
        let (s, p) = call(
            pooling,
            &tok,
            json!({"model": MODEL, "input": "hello world"}),
        );
        assert_eq!(s, StatusCode::OK);
        assert_eq!(p["id"], "pool-rid");
        assert_eq!(p["data"][0]["object"], "pooling");
        let (_, e) = call(embed, &tok, json!({"input": "hello world"}));
        assert_eq!(p["data"][0]["data"], e["data"][0]["embedding"]);
        assert_eq!(p["usage"], e["usage"]);
        // Chat messages: the stand-in template without a generation prompt.
        let msgs = json!([{"role": "user", "content": "hi there"}]);
        let (s, m) = call(pooling, &tok, json!({"messages": msgs}));
        assert_eq!(s, StatusCode::OK);
        let want = tok.render_chat(
            &[crate::tokenizer::ChatTurn {
                role: "user",
                content: Some(&json!("hi there")),
                tool_calls: None,
            }],
            None,
            false,
        );
        assert_eq!(m["usage"]["prompt_tokens"], want.len());

        let (s, c) = call(classify, &tok, json!({"input": ["good", "bad movie"]}));
        assert_eq!(s, StatusCode::OK);
        assert_eq!(c["id"], "classify-rid");
        assert_eq!(c["object"], "list");
        let d = c["data"].as_array().expect("data");
        assert_eq!(d.len(), 2);
        for (i, x) in d.iter().enumerate() {
            assert_eq!(x["index"], i);
            assert_eq!(x["num_classes"], NUM_CLASSES);
            let probs: Vec<f64> = x["probs"]
                .as_array()
                .expect("probs")
                .iter()
                .map(|p| p.as_f64().expect("p"))
                .collect();
            assert_eq!(probs.len(), NUM_CLASSES);
            assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-5);
            let best = if probs[1] > probs[0] { 1 } else { 0 };
            assert_eq!(x["label"], format!("LABEL_{best}"));
        }
        assert_error(
            call(classify, &tok, json!({"input": [1, "x"]})),
            400,
            "token ids",
        );
    }

    fn standin_hf() -> (std::path::PathBuf, Tokenizer) {
        let dir = std::env::temp_dir().join(format!(
            "vllm-sim-serving-{}-{}",
            std::process::id(),
            mix64(unix_now() ^ fnv1a64(format!("{:?}", std::thread::current().id()).as_bytes()))
        ));
        crate::hf_tokenizer::export_standin(&dir).expect("export");
        let hf = crate::hf_tokenizer::HfTokenizer::from_dir(&dir).expect("load");
        (dir, Tokenizer::with_hf(4.0, Arc::new(hf)))
    }

    #[test]
    fn detokenize_needs_hf_and_round_trips() {
        let tok = Tokenizer::new(4.0);
        assert_error(
            call(detokenize, &tok, json!({"tokens": [1, 2]})),
            400,
            "--tokenizer",
        );
        assert_error(
            call(detokenize, &tok, json!({"model": "x", "tokens": [1]})),
            404,
            "does not exist",
        );
        let (dir, hf) = standin_hf();
        let ids = hf
            .try_encode_prompt("the sea, and more.", true)
            .expect("ids");
        let (s, v) = call(detokenize, &hf, json!({"model": MODEL, "tokens": ids}));
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v, json!({"prompt": "<|begin_of_text|>the sea, and more."}));
        assert_error(
            call(detokenize, &hf, json!({"tokens": [4_000_000]})),
            400,
            "out of vocabulary",
        );
        assert_error(
            call(detokenize, &hf, json!({"tokens": [-1]})),
            400,
            "out of vocabulary",
        );
        assert_error(call(detokenize, &hf, json!({"prompt": "x"})), 400, "tokens");
        let _ = std::fs::remove_dir_all(dir);
    }

    fn multipart(fields: &[(&str, Option<&str>, &[u8])]) -> (String, Bytes) {
        let boundary = "sim-boundary-1234";
        let mut b = Vec::new();
        for (name, filename, data) in fields {
            b.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
            match filename {
                Some(f) => b.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                         Content-Type: application/octet-stream\r\n\r\n"
                    )
                    .as_bytes(),
                ),
                None => b.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
                ),
            }
            b.extend_from_slice(data);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        (
            format!("multipart/form-data; boundary={boundary}"),
            Bytes::from(b),
        )
    }

    async fn run_audio(
        translate: bool,
        fields: &[(&str, Option<&str>, &[u8])],
    ) -> (StatusCode, Value, Option<String>) {
        let tok = Tokenizer::new(4.0);
        let (ct, b) = multipart(fields);
        let stream = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(b)]);
        let r = audio(&ctx(&tok), translate, Some(&ct), stream).await;
        let ctype = r
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let (s, v) = body(r);
        (s, v, ctype)
    }

    #[tokio::test]
    async fn audio_formats_and_errors() {
        let file = vec![7u8; 64_000]; // 2 s of 16 kHz 16-bit PCM
        let (s, v, _) = run_audio(
            false,
            &[("file", Some("a.raw"), &file), ("model", None, b"m")],
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let text = v["text"].as_str().expect("text").to_string();
        assert_eq!(text.split(' ').count(), 5);
        assert!(text.ends_with('.'));
        assert_eq!(v["usage"], json!({"type": "duration", "seconds": 2}));
        // Deterministic; translations differ and carry no usage.
        let (_, again, _) = run_audio(false, &[("file", Some("b.raw"), &file)]).await;
        assert_eq!(again["text"], text);
        let (s, tr, _) = run_audio(true, &[("file", Some("a.raw"), &file)]).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(tr.as_object().expect("obj").len(), 1);
        assert_ne!(tr["text"], text);
        // text and verbose_json.
        let (s, t, ct) = run_audio(
            false,
            &[
                ("response_format", None, b"text"),
                ("file", Some("a.raw"), &file),
            ],
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(t, Value::String(text.clone()));
        assert_eq!(ct.as_deref(), Some("text/plain; charset=utf-8"));
        let (s, vj, _) = run_audio(
            false,
            &[
                ("file", Some("a.raw"), &file),
                ("response_format", None, b"verbose_json"),
                ("language", None, b"fr"),
                ("prompt", None, b"ignored"),
                ("temperature", None, b"0.2"),
            ],
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{vj}");
        assert_eq!(vj["text"], text);
        assert_eq!(vj["language"], "fr");
        assert_eq!(vj["duration"], "2.0");
        assert_eq!(vj["segments"][0]["text"], text);
        assert_eq!(vj["segments"][0]["end"], 2.0);
        // Errors.
        let (s, e, _) = run_audio(false, &[("model", None, b"m")]).await;
        assert_error((s, e), 400, "file\n  Field required");
        let (s, e, _) = run_audio(false, &[("file", None, b"not a file")]).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
        let (s, e, _) =
            run_audio(false, &[("file", Some("a"), b"x"), ("model", None, b"zz")]).await;
        assert_error((s, e), 404, "The model `zz` does not exist.");
        let (s, e, _) = run_audio(
            false,
            &[("file", Some("a"), b"x"), ("response_format", None, b"srt")],
        )
        .await;
        assert_error((s, e), 400, "response_format");
        let (s, e, _) = run_audio(
            false,
            &[("file", Some("a"), b"x"), ("temperature", None, b"hot")],
        )
        .await;
        assert_error((s, e), 400, "temperature");
        // Not multipart at all.
        let tok = Tokenizer::new(4.0);
        let stream =
            futures_util::stream::iter([Ok::<_, std::convert::Infallible>(Bytes::from("{}"))]);
        let r = audio(&ctx(&tok), false, Some("application/json"), stream).await;
        assert_error(body(r), 400, "Field required");
    }

    #[test]
    fn wav_duration_reads_the_header() {
        let mut wav = vec![0u8; 44 + 8000];
        wav[..4].copy_from_slice(b"RIFF");
        wav[8..12].copy_from_slice(b"WAVE");
        wav[28..32].copy_from_slice(&16_000u32.to_le_bytes());
        assert!((audio_duration(&wav) - 0.5).abs() < 1e-9);
        assert_eq!(py_float_str(3.0), "3.0");
        assert_eq!(py_float_str(0.25), "0.25");
    }
}
