//! The Responses API of one instance, as vLLM serves it for a non-harmony model:
//! `POST /v1/responses` (JSON or SSE), `GET /v1/responses/{id}`, `POST /v1/responses/{id}/cancel`
//! (vLLM has no `DELETE`).
//!
//! What a router sees, mirrored from vLLM's `OpenAIServingResponses`:
//! - **State lives in the instance.** Completed responses (`store`, default true) are kept in the
//!   memory of the instance that produced them, with the messages of their conversation. A
//!   request whose `previous_response_id` is unknown *to this instance* (made by another one,
//!   evicted, or lost when the instance died) gets 404
//!   `{"error":{"message":"Response with id '…' not found.","type":"invalid_request_error","param":"response_id","code":404}}`.
//! - **Conversation = stored messages + output + new input.** The prompt of a follow-up is built
//!   as vLLM builds it: this request's `instructions` (as a system message), the stored messages
//!   of the previous response (its own instructions, history and input), the previous output as
//!   assistant messages, then the new `input`; it is rendered with the chat template and run
//!   through the engine like `/v1/chat/completions`, so the previous turn's blocks are
//!   prefix-cache hits on the instance that made it. As in vLLM, repeating `instructions` on a
//!   follow-up puts a second system message in front of the history (and so breaks the cached
//!   prefix after the first one).
//! - **Objects.** A response is vLLM's `ResponsesResponse`: `id` (`resp_` + 32 hex, random per
//!   process, or the body's `request_id` as in vLLM), `status` `completed`, or `incomplete` with
//!   `incomplete_details.reason = "max_output_tokens"` when `max_output_tokens` ended it, one
//!   `message` output item with one `output_text` part, and `usage` with
//!   `input_tokens_details.cached_tokens`.
//! - **Streaming** sends vLLM's event sequence (`event: <type>\ndata: <json>\n\n`, numbered by
//!   `sequence_number`): `response.created`, `response.in_progress`, `response.output_item.added`,
//!   `response.content_part.added`, one `response.output_text.delta` per engine wake-up (paced and
//!   coalesced as chat streams are), `response.output_text.done`, `response.content_part.done`,
//!   `response.output_item.done`, `response.completed`; no `[DONE]`.
//! - **Background** (`background: true`, not streamed): answered at once with status `queued`,
//!   generated in a task, stored when done; `cancel` aborts it (status `cancelled`). Cancelling
//!   anything else is vLLM's 400 "Cannot cancel a synchronous response.".
//! - **Store bound.** vLLM never evicts; the simulator keeps at most
//!   `EngineConfig::max_stored_responses` per instance and evicts the oldest. 0 disables the
//!   store (vLLM's default without `VLLM_ENABLE_RESPONSES_API_STORE=1`): nothing is kept and
//!   `background` is refused.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body::Frame;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::api::{
    self, ChatMessage, Outcome, Resp, SimBody, TokenPump, bad_request, error_response,
};
use crate::engine::FinishReason;
use crate::server::{Instance, LoadGuard};
use crate::tokenizer::Tokenizer;

const INVALID_REQUEST: &str = "invalid_request_error";

/// The body of `POST /v1/responses` (unknown fields are ignored, as `temperature` mostly is).
#[derive(Debug, Deserialize)]
struct ResponsesRequest {
    #[serde(default)]
    model: Option<String>,
    input: Value,
    #[serde(default)]
    instructions: Option<String>,
    #[serde(default)]
    previous_response_id: Option<String>,
    #[serde(default)]
    max_output_tokens: Option<i64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    store: Option<bool>,
    #[serde(default)]
    background: Option<bool>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    max_tool_calls: Option<i64>,
    #[serde(default)]
    reasoning: Option<Value>,
    #[serde(default)]
    service_tier: Option<String>,
    #[serde(default)]
    text: Option<Value>,
    #[serde(default)]
    truncation: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    prompt: Option<Value>,
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    cache_salt: Option<Value>,
    #[serde(default)]
    previous_input_messages: Option<Value>,
}

/// `incomplete_details`.
#[derive(Debug, Clone, Serialize)]
struct IncompleteDetails {
    reason: &'static str,
}

/// An `output_text` content part.
#[derive(Debug, Clone, Serialize)]
struct OutputText {
    annotations: [(); 0],
    text: String,
    #[serde(rename = "type")]
    kind: &'static str,
    logprobs: Option<[(); 0]>,
}

/// A `message` output item.
#[derive(Debug, Clone, Serialize)]
struct OutputMessage {
    id: String,
    content: Vec<OutputText>,
    role: &'static str,
    status: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Debug, Clone, Serialize)]
struct InputTokensDetails {
    cached_tokens: usize,
    input_tokens_per_turn: [(); 0],
    cached_tokens_per_turn: [(); 0],
}

#[derive(Debug, Clone, Serialize)]
struct OutputTokensDetails {
    reasoning_tokens: usize,
    tool_output_tokens: usize,
    output_tokens_per_turn: [(); 0],
    tool_output_tokens_per_turn: [(); 0],
}

/// vLLM's `ResponseUsage`.
#[derive(Debug, Clone, Serialize)]
struct ResponseUsage {
    input_tokens: usize,
    input_tokens_details: InputTokensDetails,
    output_tokens: usize,
    output_tokens_details: OutputTokensDetails,
    total_tokens: usize,
}

/// vLLM's `ResponsesResponse`, fields in its order.
#[derive(Debug, Clone, Serialize)]
struct ResponseObject {
    id: String,
    created_at: u64,
    incomplete_details: Option<IncompleteDetails>,
    instructions: Option<String>,
    metadata: Option<Value>,
    model: String,
    object: &'static str,
    output: Vec<OutputMessage>,
    parallel_tool_calls: bool,
    temperature: f64,
    tool_choice: Value,
    tools: Vec<Value>,
    top_p: f64,
    background: bool,
    max_output_tokens: usize,
    max_tool_calls: Option<i64>,
    previous_response_id: Option<String>,
    prompt: Option<Value>,
    reasoning: Option<Value>,
    service_tier: String,
    status: &'static str,
    text: Option<Value>,
    top_logprobs: Option<i64>,
    truncation: String,
    usage: Option<ResponseUsage>,
    user: Option<String>,
    input_messages: Option<Value>,
    output_messages: Option<Value>,
}

impl ResponseObject {
    /// The finished response: output, usage and status (`incomplete` when `max_output_tokens`
    /// ended it, as vLLM reports a `length` finish).
    fn finished(
        &self,
        msg_id: &str,
        text: String,
        reason: FinishReason,
        input_tokens: usize,
        output_tokens: usize,
        cached_tokens: usize,
    ) -> ResponseObject {
        let mut r = self.clone();
        let incomplete = reason == FinishReason::Length;
        r.status = if incomplete {
            "incomplete"
        } else {
            "completed"
        };
        r.incomplete_details = incomplete.then_some(IncompleteDetails {
            reason: "max_output_tokens",
        });
        r.output = if text.is_empty() {
            Vec::new()
        } else {
            vec![OutputMessage {
                id: msg_id.to_string(),
                content: vec![output_text_part(text, None)],
                role: "assistant",
                status: "completed",
                kind: "message",
            }]
        };
        r.usage = Some(ResponseUsage {
            input_tokens,
            input_tokens_details: InputTokensDetails {
                cached_tokens,
                input_tokens_per_turn: [],
                cached_tokens_per_turn: [],
            },
            output_tokens,
            output_tokens_details: OutputTokensDetails {
                reasoning_tokens: 0,
                tool_output_tokens: 0,
                output_tokens_per_turn: [],
                tool_output_tokens_per_turn: [],
            },
            total_tokens: input_tokens + output_tokens,
        });
        r
    }

    /// The output as the assistant messages a follow-up replays (vLLM skips non-message items).
    fn output_as_messages(&self) -> Vec<ChatMessage> {
        self.output
            .iter()
            .flat_map(|m| &m.content)
            .map(|part| ChatMessage {
                role: "assistant".to_string(),
                content: Some(Value::String(part.text.clone())),
                tool_calls: None,
            })
            .collect()
    }

    fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

fn output_text_part(text: String, logprobs: Option<[(); 0]>) -> OutputText {
    OutputText {
        annotations: [],
        text,
        kind: "output_text",
        logprobs,
    }
}

/// The messages vLLM stores for a response (its `msg_store` entry), shared with the
/// conversations that continue it instead of copied into each of them.
#[derive(Debug)]
struct Conversation {
    /// The request's `instructions`, as a system message.
    instructions: Option<ChatMessage>,
    /// The conversation continued (`previous_response_id`) and that response's output messages.
    parent: Option<(Arc<Conversation>, Vec<ChatMessage>)>,
    /// The request's own `input`.
    input: Vec<ChatMessage>,
}

impl Conversation {
    /// The messages in prompt order. vLLM builds `[instructions] + stored(prev) + output(prev) +
    /// input` at every turn, so the instructions of all turns come first, newest first, then
    /// each turn's input after the previous turn's output.
    fn messages(&self) -> Vec<&ChatMessage> {
        let mut chain = vec![self];
        while let Some((p, _)) = &chain[chain.len() - 1].parent {
            chain.push(p);
        }
        let mut out: Vec<&ChatMessage> = chain
            .iter()
            .filter_map(|c| c.instructions.as_ref())
            .collect();
        for c in chain.iter().rev() {
            if let Some((_, prev_output)) = &c.parent {
                out.extend(prev_output);
            }
            out.extend(&c.input);
        }
        out
    }
}

impl Drop for Conversation {
    /// Unlinks long chains iteratively (a recursive drop of thousands of turns would overflow).
    fn drop(&mut self) {
        let mut next = self.parent.take();
        while let Some((p, _)) = next {
            next = match Arc::try_unwrap(p) {
                Ok(mut c) => c.parent.take(),
                Err(_) => None,
            };
        }
    }
}

struct Stored {
    response: ResponseObject,
    conversation: Arc<Conversation>,
}

#[derive(Default)]
struct StoreInner {
    map: FxHashMap<String, Stored>,
    /// Ids in insertion order (eviction order).
    order: VecDeque<String>,
    /// Running background requests.
    tasks: FxHashMap<String, tokio::task::AbortHandle>,
}

/// The stored responses of one instance (vLLM's in-process `response_store` and `msg_store`),
/// bounded: beyond `max` entries the oldest is evicted.
pub struct ResponseStore {
    max: usize,
    inner: Mutex<StoreInner>,
}

/// Why a cancel failed.
enum CancelError {
    NotFound,
    NotCancellable,
}

impl ResponseStore {
    /// A store keeping at most `max` responses (0: store disabled).
    pub fn new(max: usize) -> Self {
        Self {
            max,
            inner: Mutex::new(StoreInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StoreInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether responses are stored at all.
    pub fn enabled(&self) -> bool {
        self.max > 0
    }

    /// Number of stored responses.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `id` is stored.
    pub fn contains(&self, id: &str) -> bool {
        self.lock().map.contains_key(id)
    }

    /// Forgets everything (the instance died) and stops background requests.
    pub fn clear(&self) {
        let (tasks, map) = {
            let mut g = self.lock();
            g.order.clear();
            (std::mem::take(&mut g.tasks), std::mem::take(&mut g.map))
        };
        // Outside the lock: nothing else is locked while holding the store's.
        for (_, t) in tasks {
            t.abort();
        }
        drop(map);
    }

    /// Stores or updates a response; a cancelled one is never overwritten (as in vLLM).
    fn put(&self, response: ResponseObject, conversation: Arc<Conversation>) {
        if !self.enabled() {
            return;
        }
        let mut g = self.lock();
        if let Some(old) = g.map.get_mut(&response.id) {
            if old.response.status != "cancelled" {
                old.response = response;
                old.conversation = conversation;
            }
            return;
        }
        while g.map.len() >= self.max {
            let Some(oldest) = g.order.pop_front() else {
                break;
            };
            g.map.remove(&oldest);
        }
        g.order.push_back(response.id.clone());
        g.map.insert(
            response.id.clone(),
            Stored {
                response,
                conversation,
            },
        );
    }

    /// What a follow-up needs: the stored conversation and the response's output messages.
    fn continuation(&self, id: &str) -> Option<(Arc<Conversation>, Vec<ChatMessage>)> {
        let g = self.lock();
        let s = g.map.get(id)?;
        Some((s.conversation.clone(), s.response.output_as_messages()))
    }

    fn get_json(&self, id: &str) -> Option<Vec<u8>> {
        self.lock().map.get(id).map(|s| s.response.to_json())
    }

    /// Remembers a background request's task, unless it already finished.
    fn register_task(&self, id: &str, task: tokio::task::AbortHandle) {
        let mut g = self.lock();
        if g.map.get(id).is_some_and(|s| s.response.status == "queued") {
            g.tasks.insert(id.to_string(), task);
        }
    }

    fn task_done(&self, id: &str) {
        self.lock().tasks.remove(id);
    }

    /// Marks a background request that failed (engine abort), unless it completed or was
    /// cancelled meanwhile.
    fn fail(&self, id: &str) {
        let mut g = self.lock();
        if let Some(s) = g.map.get_mut(id)
            && !matches!(s.response.status, "completed" | "incomplete" | "cancelled")
        {
            s.response.status = "failed";
        }
    }

    /// vLLM's cancel: only `queued`/`in_progress` (background) responses can be cancelled.
    fn cancel(&self, id: &str) -> Result<Vec<u8>, CancelError> {
        let mut g = self.lock();
        let s = g.map.get_mut(id).ok_or(CancelError::NotFound)?;
        if !matches!(s.response.status, "queued" | "in_progress") {
            return Err(CancelError::NotCancellable);
        }
        s.response.status = "cancelled";
        let body = s.response.to_json();
        let task = g.tasks.remove(id);
        drop(g);
        // Dropping the task's future aborts its engine request.
        if let Some(t) = task {
            t.abort();
        }
        Ok(body)
    }
}

fn not_found_error(id: &str) -> Resp {
    error_response(
        StatusCode::NOT_FOUND,
        INVALID_REQUEST,
        &format!("Response with id '{id}' not found."),
        Some("response_id"),
    )
}

fn invalid(message: &str, param: &str) -> Resp {
    error_response(
        StatusCode::BAD_REQUEST,
        INVALID_REQUEST,
        message,
        Some(param),
    )
}

fn message(role: &str, content: Value) -> ChatMessage {
    ChatMessage {
        role: role.to_string(),
        content: Some(content),
        tool_calls: None,
    }
}

/// The chat messages of `input`: a string is one user message; a list holds messages
/// (`role` + `content` string or parts such as `input_text`/`output_text`), `function_call`,
/// `function_call_output` and `reasoning` items, converted as vLLM converts them.
fn input_messages(input: &Value) -> Result<Vec<ChatMessage>, String> {
    match input {
        Value::String(s) => Ok(vec![message("user", Value::String(s.clone()))]),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| input_item(i, item))
            .collect(),
        _ => Err("`input` must be a string or a list of input items".to_string()),
    }
}

fn input_item(i: usize, item: &Value) -> Result<ChatMessage, String> {
    let Value::Object(o) = item else {
        return Err(format!("input[{i}] must be an object"));
    };
    let field = |name: &str| o.get(name).and_then(Value::as_str);
    match field("type") {
        Some("function_call") => {
            let (Some(call_id), Some(name), Some(arguments)) =
                (field("call_id"), field("name"), field("arguments"))
            else {
                return Err(format!(
                    "input[{i}]: a function_call needs string `call_id`, `name` and `arguments`"
                ));
            };
            Ok(ChatMessage {
                role: "assistant".to_string(),
                content: None,
                tool_calls: Some(json!([{
                    "id": call_id,
                    "function": {"name": name, "arguments": arguments},
                    "type": "function",
                }])),
            })
        }
        Some("function_call_output") => {
            if field("call_id").is_none() {
                return Err(format!(
                    "input[{i}]: a function_call_output needs a string `call_id`"
                ));
            }
            match o.get("output") {
                Some(v @ (Value::String(_) | Value::Array(_))) => Ok(message("tool", v.clone())),
                _ => Err(format!(
                    "input[{i}]: a function_call_output needs an `output` string or list"
                )),
            }
        }
        Some("reasoning") => Ok(ChatMessage {
            role: "assistant".to_string(),
            content: None,
            tool_calls: None,
        }),
        None | Some("message") => {
            let Some(role) = field("role") else {
                return Err(format!("input[{i}] needs a `role`"));
            };
            if !matches!(role, "user" | "assistant" | "system" | "developer") {
                return Err(format!("input[{i}]: unknown role `{role}`"));
            }
            match o.get("content") {
                Some(v @ (Value::String(_) | Value::Array(_))) => Ok(message(role, v.clone())),
                _ => Err(format!(
                    "input[{i}]: `content` must be a string or a list of content parts"
                )),
            }
        }
        Some(other) => Err(format!(
            "input[{i}]: input items of type `{other}` are not supported by vllm-sim"
        )),
    }
}

/// `POST /v1/responses`.
pub(crate) async fn create(inst: &Arc<Instance>, body: &[u8], load: LoadGuard) -> Resp {
    let req: ResponsesRequest = match api::parse_body(body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let background = req.background.unwrap_or(false);
    let want_store = req.store.unwrap_or(true);
    let stream = req.stream.unwrap_or(false);
    if req.prompt.as_ref().is_some_and(|p| !p.is_null()) {
        return invalid("prompt template is not supported", "prompt");
    }
    if background && !want_store {
        return bad_request("background can only be used when `store` is true");
    }
    if req
        .cache_salt
        .as_ref()
        .is_some_and(|s| !s.is_null() && s.as_str().is_none_or(str::is_empty))
    {
        return bad_request("Parameter 'cache_salt' must be a non-empty string if provided.");
    }
    if let Err(r) = api::check_model(inst, req.model.as_deref()) {
        return *r;
    }
    if background && !inst.responses.enabled() {
        return invalid(
            "This vLLM engine does not support `store=True` and therefore does not support the \
             background mode. To enable these features, set the environment variable \
             `VLLM_ENABLE_RESPONSES_API_STORE=1` when launching the vLLM server.",
            "background",
        );
    }
    if req
        .previous_input_messages
        .as_ref()
        .is_some_and(|v| !v.is_null())
        && req.previous_response_id.is_some()
    {
        return invalid(
            "Only one of `previous_input_messages` and `previous_response_id` can be set.",
            "previous_response_id",
        );
    }
    if background && stream {
        return bad_request("vllm-sim does not support streamed background responses");
    }
    let store = want_store && inst.responses.enabled();
    let parent = match &req.previous_response_id {
        None => None,
        Some(id) => match inst.responses.continuation(id) {
            Some(c) => Some(c),
            None => return not_found_error(id),
        },
    };
    let input = match input_messages(&req.input) {
        Ok(m) => m,
        Err(e) => return invalid(&e, "input"),
    };
    let tools = req.tools.unwrap_or_default();
    let tool_choice = req.tool_choice.unwrap_or_else(|| json!("auto"));
    // vLLM hands the chat template `{"type": "function", "function": tool}` per tool, none when
    // `tool_choice` is "none".
    let tool_dicts = (!tools.is_empty() && tool_choice != "none").then(|| {
        Value::Array(
            tools
                .iter()
                .map(|t| json!({"type": "function", "function": t}))
                .collect(),
        )
    });
    let conversation = Arc::new(Conversation {
        instructions: req
            .instructions
            .as_ref()
            .filter(|s| !s.is_empty())
            .map(|s| message("system", Value::String(s.clone()))),
        parent,
        input,
    });
    let prompt = match inst.tokenizer.try_render_chat(
        &api::chat_turns(conversation.messages()),
        tool_dicts.as_ref(),
        true,
    ) {
        Ok(p) => p,
        Err(e) => return bad_request(&e),
    };
    let prompt_len = prompt.len();
    let max_model_len = inst.cfg.max_model_len;
    if prompt_len >= max_model_len {
        return invalid(
            &format!(
                "The engine prompt length {prompt_len} exceeds the max_model_len \
                 {max_model_len}. Please reduce prompt."
            ),
            "input",
        );
    }
    let room = max_model_len - prompt_len;
    let (max_tokens, explicit) = match req.max_output_tokens {
        Some(n) if n < 1 => {
            return bad_request(&format!("max_tokens must be at least 1, got {n}."));
        }
        Some(n) => (usize::try_from(n).unwrap_or(usize::MAX).min(room), true),
        None => (inst.cfg.default_max_tokens.min(room), false),
    };
    let seed = api::output_seed(&prompt, None);
    let id = req
        .request_id
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("resp_{}", inst.new_random_id()));
    let template = ResponseObject {
        id,
        created_at: api::unix_now(),
        incomplete_details: None,
        instructions: req.instructions,
        metadata: req.metadata,
        model: inst.cfg.model.clone(),
        object: "response",
        output: Vec::new(),
        parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
        temperature: req.temperature.unwrap_or(1.0),
        tool_choice,
        tools,
        top_p: req.top_p.unwrap_or(1.0),
        background,
        max_output_tokens: max_tokens,
        max_tool_calls: req.max_tool_calls,
        previous_response_id: req.previous_response_id,
        prompt: None,
        reasoning: req.reasoning,
        service_tier: req.service_tier.unwrap_or_else(|| "auto".to_string()),
        status: if background { "queued" } else { "in_progress" },
        text: req.text,
        top_logprobs: None,
        truncation: req.truncation.unwrap_or_else(|| "disabled".to_string()),
        usage: None,
        user: req.user,
        input_messages: None,
        output_messages: None,
    };
    let msg_id = format!("msg_{}", inst.new_random_id());
    let sub = match api::submit(inst, prompt, max_tokens, explicit, seed, stream) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let run = Run {
        inst: inst.clone(),
        template,
        conversation: store.then_some(conversation),
        msg_id,
        seed,
        prompt_len,
    };
    if background {
        return run.background(sub, load);
    }
    if stream {
        let mut r = Response::new(SimBody::Responses(Box::new(ResponseStream {
            pump: sub.into_pump(),
            run,
            tokenizer: inst.tokenizer.clone(),
            sequence_number: 0,
            started: false,
            item_open: false,
            text: String::new(),
            _load: load,
        })));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        return r;
    }
    let (progress, reason, timings) = match api::wait_finished(sub).await {
        Outcome::Done {
            progress,
            reason,
            timings,
        } => (progress, reason, timings),
        Outcome::Cut => return api::cut_response(),
        Outcome::Aborted => return api::aborted_response(),
    };
    let text = api::output_text(&inst.tokenizer, seed, 0, progress.generated);
    let done = run.finish(text, reason, progress.generated, progress.cached_tokens);
    let mut r = Response::new(SimBody::full(done.to_json()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    api::add_sim_headers(&mut r, inst, &timings, progress.preemptions);
    r
}

/// One admitted request: what is needed to produce and store its final response.
struct Run {
    inst: Arc<Instance>,
    template: ResponseObject,
    /// The conversation to store with the response (`None`: `store` is off).
    conversation: Option<Arc<Conversation>>,
    msg_id: String,
    seed: u64,
    prompt_len: usize,
}

impl Run {
    /// Builds the finished response and stores it (if `store`).
    fn finish(
        &self,
        text: String,
        reason: FinishReason,
        generated: usize,
        cached: usize,
    ) -> ResponseObject {
        let done = self.template.finished(
            &self.msg_id,
            text,
            reason,
            self.prompt_len,
            generated,
            cached,
        );
        if let Some(c) = &self.conversation {
            self.inst.responses.put(done.clone(), c.clone());
        }
        done
    }

    /// Stores the `queued` response, answers with it and generates in a task.
    fn background(self, sub: api::Submitted, load: LoadGuard) -> Resp {
        let inst = self.inst.clone();
        let body = self.template.to_json();
        let id = self.template.id.clone();
        if let Some(c) = &self.conversation {
            inst.responses.put(self.template.clone(), c.clone());
        }
        let task_inst = self.inst.clone();
        let task_id = id.clone();
        let task = tokio::spawn(async move {
            let _load = load;
            let mut sub = sub;
            // No HTTP body to cut: the reset fault does not apply.
            sub.reset_after = None;
            match api::wait_finished(sub).await {
                Outcome::Done {
                    progress, reason, ..
                } => {
                    let text =
                        api::output_text(&task_inst.tokenizer, self.seed, 0, progress.generated);
                    self.finish(text, reason, progress.generated, progress.cached_tokens);
                }
                Outcome::Cut | Outcome::Aborted => task_inst.responses.fail(&task_id),
            }
            task_inst.responses.task_done(&task_id);
        });
        inst.responses.register_task(&id, task.abort_handle());
        let mut r = Response::new(SimBody::full(body));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }
}

/// The SSE stream of one streamed response: vLLM's event sequence, one text delta per
/// [`TokenPump`] poll.
pub struct ResponseStream {
    pump: TokenPump,
    run: Run,
    tokenizer: Tokenizer,
    sequence_number: u64,
    started: bool,
    item_open: bool,
    text: String,
    _load: LoadGuard,
}

/// One SSE event: `type` and `sequence_number`, then the event's own fields.
#[derive(Serialize)]
struct Event<'a, T: Serialize> {
    #[serde(rename = "type")]
    kind: &'a str,
    sequence_number: u64,
    #[serde(flatten)]
    body: T,
}

#[derive(Serialize)]
struct WithResponse<'a> {
    response: &'a ResponseObject,
}

impl ResponseStream {
    fn push<T: Serialize>(&mut self, out: &mut String, kind: &str, body: T) {
        let ev = Event {
            kind,
            sequence_number: self.sequence_number,
            body,
        };
        self.sequence_number += 1;
        out.push_str("event: ");
        out.push_str(kind);
        out.push_str("\ndata: ");
        out.push_str(&serde_json::to_string(&ev).unwrap_or_default());
        out.push_str("\n\n");
    }

    fn open_item(&mut self, out: &mut String) {
        let item = OutputMessage {
            id: self.run.msg_id.clone(),
            content: Vec::new(),
            role: "assistant",
            status: "in_progress",
            kind: "message",
        };
        self.push(
            out,
            "response.output_item.added",
            json!({"output_index": 0, "item": item}),
        );
        let part = output_text_part(String::new(), Some([]));
        let item_id = self.run.msg_id.clone();
        self.push(
            out,
            "response.content_part.added",
            json!({"output_index": 0, "item_id": item_id, "content_index": 0, "part": part}),
        );
        self.item_open = true;
    }

    fn close_item(&mut self, out: &mut String) {
        let item_id = self.run.msg_id.clone();
        let text = self.text.clone();
        self.push(
            out,
            "response.output_text.done",
            json!({"output_index": 0, "item_id": item_id, "content_index": 0, "text": text,
                   "logprobs": []}),
        );
        let part = output_text_part(text, None);
        self.push(
            out,
            "response.content_part.done",
            json!({"output_index": 0, "item_id": item_id, "content_index": 0, "part": part}),
        );
        let item = OutputMessage {
            id: item_id,
            content: vec![part],
            role: "assistant",
            status: "completed",
            kind: "message",
        };
        self.push(
            out,
            "response.output_item.done",
            json!({"output_index": 0, "item": item}),
        );
    }

    pub(crate) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let mut out = String::new();
        if !self.started {
            self.started = true;
            let initial = self.run.template.clone();
            self.push(
                &mut out,
                "response.created",
                WithResponse { response: &initial },
            );
            self.push(
                &mut out,
                "response.in_progress",
                WithResponse { response: &initial },
            );
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
        }
        let ev = match self.pump.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(ev))) => ev,
        };
        if ev.to > ev.from {
            if !self.item_open {
                self.open_item(&mut out);
            }
            let delta = api::output_text(&self.tokenizer, self.run.seed, ev.from, ev.to);
            let item_id = self.run.msg_id.clone();
            self.push(
                &mut out,
                "response.output_text.delta",
                json!({"output_index": 0, "item_id": item_id, "content_index": 0,
                       "delta": delta, "logprobs": []}),
            );
            self.text.push_str(&delta);
        }
        if let Some(reason) = ev.finish {
            if self.item_open {
                self.close_item(&mut out);
            }
            let done = self
                .run
                .finish(std::mem::take(&mut self.text), reason, ev.to, ev.cached);
            self.push(
                &mut out,
                "response.completed",
                WithResponse { response: &done },
            );
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))))
    }
}

/// `GET /v1/responses/{id}` and `POST /v1/responses/{id}/cancel`; `rest` is the path after
/// `/v1/responses/`.
pub(crate) fn by_id(inst: &Instance, method: Method, rest: &str, query: Option<&str>) -> Resp {
    let (id, action) = match rest.split_once('/') {
        None => (rest, None),
        Some((id, action)) => (id, Some(action)),
    };
    if id.is_empty() {
        return api::not_found();
    }
    match (action, method) {
        (None, Method::GET) => retrieve(inst, id, query),
        (Some("cancel"), Method::POST) => cancel(inst, id),
        (None | Some("cancel"), _) => api::method_not_allowed(),
        _ => api::not_found(),
    }
}

fn retrieve(inst: &Instance, id: &str, query: Option<&str>) -> Resp {
    let Some(body) = inst.responses.get_json(id) else {
        return not_found_error(id);
    };
    let stream = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|kv| kv.split_once('='))
        .any(|(k, v)| {
            k == "stream"
                && matches!(
                    v.to_ascii_lowercase().as_str(),
                    "true" | "1" | "yes" | "on" | "t" | "y"
                )
        });
    if stream {
        // vLLM replays the stored events of streamed background requests only; vllm-sim has
        // none (it refuses streamed background requests).
        return invalid(&format!("Unknown response_id: {id}"), "response_id");
    }
    let mut r = Response::new(SimBody::full(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn cancel(inst: &Instance, id: &str) -> Resp {
    match inst.responses.cancel(id) {
        Ok(body) => {
            let mut r = Response::new(SimBody::full(body));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(CancelError::NotFound) => not_found_error(id),
        Err(CancelError::NotCancellable) => {
            invalid("Cannot cancel a synchronous response.", "response_id")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(id: &str) -> ResponseObject {
        ResponseObject {
            id: id.to_string(),
            created_at: 0,
            incomplete_details: None,
            instructions: None,
            metadata: None,
            model: "m".to_string(),
            object: "response",
            output: Vec::new(),
            parallel_tool_calls: true,
            temperature: 1.0,
            tool_choice: json!("auto"),
            tools: Vec::new(),
            top_p: 1.0,
            background: false,
            max_output_tokens: 16,
            max_tool_calls: None,
            previous_response_id: None,
            prompt: None,
            reasoning: None,
            service_tier: "auto".to_string(),
            status: "completed",
            text: None,
            top_logprobs: None,
            truncation: "disabled".to_string(),
            usage: None,
            user: None,
            input_messages: None,
            output_messages: None,
        }
    }

    fn conv(
        instructions: Option<&str>,
        parent: Option<(Arc<Conversation>, &str)>,
        input: &str,
    ) -> Arc<Conversation> {
        Arc::new(Conversation {
            instructions: instructions.map(|s| message("system", json!(s))),
            parent: parent.map(|(p, out)| (p, vec![message("assistant", json!(out))])),
            input: vec![message("user", json!(input))],
        })
    }

    fn texts(c: &Conversation) -> Vec<String> {
        c.messages()
            .iter()
            .map(|m| {
                format!(
                    "{}:{}",
                    m.role,
                    m.content.as_ref().and_then(Value::as_str).unwrap_or("")
                )
            })
            .collect()
    }

    #[test]
    fn conversation_order_matches_vllm() {
        let c1 = conv(Some("sys"), None, "u1");
        assert_eq!(texts(&c1), ["system:sys", "user:u1"]);
        let c2 = conv(None, Some((c1.clone(), "a1")), "u2");
        assert_eq!(
            texts(&c2),
            ["system:sys", "user:u1", "assistant:a1", "user:u2"]
        );
        // Instructions repeated on a follow-up go in front of the stored history.
        let c3 = conv(Some("sys2"), Some((c2, "a2")), "u3");
        assert_eq!(
            texts(&c3),
            [
                "system:sys2",
                "system:sys",
                "user:u1",
                "assistant:a1",
                "user:u2",
                "assistant:a2",
                "user:u3"
            ]
        );
    }

    #[test]
    fn long_chains_drop_without_recursion() {
        let mut c = conv(None, None, "u");
        for _ in 0..200_000 {
            c = conv(None, Some((c, "a")), "u");
        }
        drop(c);
    }

    #[test]
    fn store_evicts_oldest_and_keeps_cancelled() {
        let s = ResponseStore::new(2);
        for id in ["a", "b", "c"] {
            s.put(obj(id), conv(None, None, id));
        }
        assert!(!s.contains("a") && s.contains("b") && s.contains("c"));
        assert_eq!(s.len(), 2);
        // Updating an entry does not evict anything.
        s.put(obj("b"), conv(None, None, "b"));
        assert_eq!(s.len(), 2);
        assert!(s.contains("c"));
        // Only queued (background) responses can be cancelled; cancelled ones stay so.
        assert!(matches!(s.cancel("b"), Err(CancelError::NotCancellable)));
        assert!(matches!(s.cancel("zz"), Err(CancelError::NotFound)));
        let mut q = obj("q");
        q.status = "queued";
        s.put(q, conv(None, None, "q"));
        assert!(s.cancel("q").is_ok());
        s.put(obj("q"), conv(None, None, "q"));
        let v: Value =
            serde_json::from_slice(&s.get_json("q").unwrap_or_default()).unwrap_or(Value::Null);
        assert_eq!(v["status"], "cancelled");
        let disabled = ResponseStore::new(0);
        disabled.put(obj("a"), conv(None, None, "a"));
        assert!(disabled.is_empty() && !disabled.enabled());
    }

    #[test]
    fn input_items_convert() {
        let msgs = input_messages(&json!([
            {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "yo"}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
        ]))
        .unwrap_or_default();
        let roles: Vec<&str> = msgs.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["user", "assistant", "assistant", "tool"]);
        assert!(msgs[2].tool_calls.is_some());
        assert!(input_messages(&json!(3)).is_err());
        assert!(input_messages(&json!([{"content": "no role"}])).is_err());
        assert!(input_messages(&json!([{"type": "item_reference", "id": "x"}])).is_err());
        assert_eq!(input_messages(&json!("plain")).map(|m| m.len()), Ok(1));
    }
}
