//! The HTTP request a [`Call`] becomes, for each way a client may name its workflow.
//!
//! Every call is a `POST /v1/chat/completions` with `max_tokens` and `ignore_eos` (so the
//! output length is the workload's), `temperature: 0`, and, when streaming,
//! `stream_options.include_usage` so the backend's `cached_tokens` arrive in the last chunk.
//! Each call carries `X-Request-Id: <run>-<call id>`, so a parent's request id is known
//! before it is sent.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Call, CallKind, Workload};

/// Which workflow ids the client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode", content = "name")]
pub enum IdMode {
    /// `X-Workflow-Id`, `X-Agent-Id`, `X-Parent-Request-Id` (and `X-Workflow-End: true`
    /// on a workflow's last call).
    Headers,
    /// Body fields `workflow_id`, `agent_id`, `parent_request_id`.
    Body,
    /// vllm-router's program identity: `vllm_xargs.agentic_context` with the workflow as
    /// `program_id` and `task_id`, the agent as `agent_id`.
    AgenticContext,
    /// One header carrying the workflow key (`X-Session-ID` for vllm-router's
    /// consistent_hash/sticky_least_loaded, `X-SMG-Routing-Key` for sglang-router's
    /// manual policy, `x-user-id` for production-stack's session router).
    SessionHeader(String),
    /// No ids at all (most agent clients).
    None,
}

impl IdMode {
    /// Parses `headers`, `body`, `agentic_context`, `none` or `header:NAME`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "headers" => Some(Self::Headers),
            "body" => Some(Self::Body),
            "agentic_context" => Some(Self::AgenticContext),
            "none" => Some(Self::None),
            _ => s
                .strip_prefix("header:")
                .filter(|n| !n.is_empty())
                .map(|n| Self::SessionHeader(n.to_owned())),
        }
    }

    /// Short label for tables.
    pub fn label(&self) -> String {
        match self {
            Self::Headers => "headers".to_owned(),
            Self::Body => "body".to_owned(),
            Self::AgenticContext => "agentic_context".to_owned(),
            Self::SessionHeader(n) => format!("header:{n}"),
            Self::None => "none".to_owned(),
        }
    }
}

/// A request ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpCall {
    /// Request path.
    pub path: &'static str,
    /// Header fields besides Host, Content-Type and Content-Length.
    pub headers: Vec<(String, String)>,
    /// JSON body.
    pub body: Vec<u8>,
}

/// The request id of call `id` in run `run`.
pub fn request_id(run: &str, id: usize) -> String {
    format!("{run}-{id}")
}

impl Workload {
    /// The request for call `call` with ids sent as `ids`; `run` tags request ids.
    pub fn http_call(&self, call: &Call, ids: &IdMode, run: &str) -> HttpCall {
        let mut body = json!({
            "model": self.model,
            "messages": call.messages,
            "max_tokens": call.max_tokens,
            "ignore_eos": true,
            "temperature": 0,
        });
        if self.stream {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
        }
        let rid = request_id(run, call.id);
        let mut headers = vec![("X-Request-Id".to_owned(), rid)];
        let has_workflow = call.kind != CallKind::Stateless && !call.workflow.is_empty();
        let parent = call.parent.map(|p| request_id(run, p));
        if has_workflow {
            match ids {
                IdMode::Headers => {
                    headers.push(("X-Workflow-Id".to_owned(), call.workflow.clone()));
                    headers.push(("X-Agent-Id".to_owned(), call.agent.clone()));
                    if let Some(p) = &parent {
                        headers.push(("X-Parent-Request-Id".to_owned(), p.clone()));
                    }
                    if call.last_of_workflow {
                        headers.push(("X-Workflow-End".to_owned(), "true".to_owned()));
                    }
                }
                IdMode::Body => {
                    body["workflow_id"] = json!(call.workflow);
                    body["agent_id"] = json!(call.agent);
                    if let Some(p) = &parent {
                        body["parent_request_id"] = json!(p);
                    }
                }
                IdMode::AgenticContext => {
                    body["vllm_xargs"] = json!({"agentic_context": {
                        "program_id": call.workflow,
                        "task_id": call.workflow,
                        "agent_id": call.agent,
                    }});
                }
                IdMode::SessionHeader(name) => {
                    headers.push((name.clone(), call.workflow.clone()));
                }
                IdMode::None => {}
            }
        }
        HttpCall {
            path: "/v1/chat/completions",
            headers,
            body: serde_json::to_vec(&body).unwrap_or_default(),
        }
    }
}

/// Reads `usage` of a non-streaming response or of the last SSE chunk that has one:
/// `(prompt_tokens, cached_tokens, completion_tokens)`.
pub fn usage_of(v: &Value) -> Option<(u64, u64, u64)> {
    let u = v.get("usage").filter(|u| !u.is_null())?;
    let prompt = u.get("prompt_tokens")?.as_u64()?;
    let cached = u
        .get("prompt_tokens_details")
        .and_then(|d| d.get("cached_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let completion = u
        .get("completion_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Some((prompt, cached, completion))
}
