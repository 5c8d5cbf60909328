//! Workflow metadata extraction: headers first, then the JSON body, parsed once.
//!
//! Accepted shapes (header wins over body; the first present body shape wins):
//! - workflow: `X-Workflow-Id` | body `workflow_id` | `workflow_metadata.workflow_id`
//!   (production-stack PR #625) | `vllm_xargs.agentic_context.{task_id|program_id}`
//!   (vllm-router; object or JSON string) | cookie `agentlb_wf`;
//! - agent: `X-Agent-Id` | `agent_id` | `workflow_metadata.agent_id` |
//!   `agentic_context.agent_id`;
//! - parent: `X-Parent-Request-Id` | `parent_request_id` |
//!   `workflow_metadata.parent_request_id` | `agentic_context.parent_program_id`;
//! - session: a configurable header (default `x-user-id`);
//! - conversation root (only for requests without a workflow id): a stable hash of the
//!   leading `system`/`developer` messages and the first `root_chars` characters of the
//!   first other message (or of a completions `prompt`), as the JSON text the client sent;
//!   none when that message is shorter than `root_min_chars`, so a system prompt that all
//!   clients share never becomes everyone's key. The agents of one workflow repeat its
//!   shared context at the start of their conversation, so they share a root without
//!   sending ids; the `workflow` policy routes by it.
//!
//! The body is deserialised into borrowed fields only (everything else is skipped,
//! never re-serialised); the proxy forwards the original bytes.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::controller::policies::workflow::StableHasher;

use super::{
    ApiError,
    h1::{Head, Known},
};

/// Where the workflow id came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkflowSource {
    /// `X-Workflow-Id`.
    Header,
    /// body `workflow_id`.
    Body,
    /// body `workflow_metadata.workflow_id`.
    WorkflowMetadata,
    /// body `vllm_xargs.agentic_context`.
    AgenticContext,
    /// cookie `agentlb_wf`.
    Cookie,
    /// Inherited from the parent request (`X-Parent-Request-Id`).
    Lineage,
    /// Inherited from the stored response it continues (`previous_response_id`).
    Response,
}

/// Per-request metadata, extracted once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestMeta {
    /// Workflow id.
    pub workflow_id: Option<String>,
    /// Its source.
    pub workflow_source: Option<WorkflowSource>,
    /// Agent id.
    pub agent_id: Option<String>,
    /// Parent request id (lineage).
    pub parent_request_id: Option<String>,
    /// Request id (the client's `X-Request-Id` or generated).
    pub request_id: String,
    /// Session key (configured header).
    pub session: Option<String>,
    /// Requested model.
    pub model: Option<String>,
    /// `stream: true`.
    pub stream: bool,
    /// Hash of the conversation root when no workflow id was sent.
    pub root_key: Option<u64>,
    /// Body length in bytes (a bound on the prompt's size).
    pub body_len: usize,
    /// The client asked to end its workflow after this request (`X-Workflow-End: true`).
    pub workflow_end: bool,
    /// Responses API: the stored response this request continues.
    pub previous_response_id: Option<String>,
    /// The request must go to this backend (the owner of the stored response it names).
    pub pinned: Option<crate::model::BackendId>,
    /// Chained hashes of the prompt's blocks (see [`crate::controller::prefix`]).
    pub blocks: Vec<u64>,
    /// The prompt's KV blocks, from in-process tokenization (see [`crate::kv`]; `None`
    /// without a tokenizer or event source).
    pub kv: Option<crate::kv::PromptKeys>,
}

impl RequestMeta {
    /// A rough prompt size in tokens: a token is about 4 bytes of text.
    pub fn prompt_tokens_estimate(&self) -> u64 {
        (self.body_len / 4) as u64
    }
}

/// Limits for ids.
#[derive(Debug, Clone)]
pub struct MetaLimits {
    /// Maximum id length in bytes.
    pub max_id_len: usize,
    /// Header carrying the session key (lower case).
    pub session_header: String,
    /// Characters of the first non-system message in the conversation root.
    pub root_chars: usize,
    /// Shorter first messages give no root.
    pub root_min_chars: usize,
    /// Block size of the prefix index in bytes (0: no block hashes).
    pub prefix_block: usize,
    /// Blocks hashed at most per request.
    pub prefix_max_blocks: usize,
}

impl Default for MetaLimits {
    fn default() -> Self {
        Self {
            max_id_len: 256,
            session_header: "x-user-id".into(),
            root_chars: 1024,
            root_min_chars: 256,
            prefix_block: 0,
            prefix_max_blocks: 0,
        }
    }
}

#[derive(Deserialize, Default)]
struct BodyFields<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(borrow, default)]
    workflow_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    agent_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    parent_request_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    workflow_metadata: Option<WorkflowMetadata<'a>>,
    #[serde(borrow, default)]
    vllm_xargs: Option<Xargs<'a>>,
    #[serde(borrow, default)]
    messages: Option<Vec<MessageRef<'a>>>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    /// Responses API: the system text.
    #[serde(borrow, default)]
    instructions: Option<&'a RawValue>,
    /// Responses API: a string or a list of input items (messages).
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    /// Responses API: the stored response this one continues.
    #[serde(borrow, default)]
    previous_response_id: Option<Cow<'a, str>>,
}

/// A chat message as far as the conversation root needs it.
#[derive(Deserialize)]
struct MessageRef<'a> {
    #[serde(borrow, default)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

/// Feeds one piece of the root, then a separator byte (never in UTF-8 text), so
/// ("ab","c") and ("a","bc") differ.
fn write_piece(h: &mut StableHasher, bytes: &[u8]) {
    h.write(bytes);
    h.write(&[0xff]);
}

/// The first `n` bytes of `s`, cut back to a character boundary.
fn head(s: &str, n: usize) -> &str {
    let mut end = n.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Block hashes of the prompt's message stream (see [`crate::controller::prefix`]).
fn prompt_blocks(fields: &BodyFields<'_>, limits: &MetaLimits) -> Vec<u64> {
    let mut h =
        crate::controller::prefix::BlockHasher::new(limits.prefix_block, limits.prefix_max_blocks);
    if let Some(msgs) = fields.messages.as_deref() {
        for m in msgs {
            h.write(m.role.as_deref().unwrap_or("").as_bytes());
            h.write(&[0xff]);
            h.write(m.content.map_or("", RawValue::get).as_bytes());
            h.write(&[0xfe]);
        }
    } else {
        for part in [fields.instructions, fields.prompt, fields.input]
            .into_iter()
            .flatten()
        {
            h.write(part.get().as_bytes());
            h.write(&[0xfe]);
        }
    }
    h.finish()
}

/// The conversation root's hash (see the module docs).
fn root_key(fields: &BodyFields<'_>, limits: &MetaLimits) -> Option<u64> {
    let mut h = StableHasher::default();
    // Responses API input items have the shape of chat messages.
    let items: Option<Vec<MessageRef<'_>>> = match fields.input {
        Some(i) if i.get().starts_with('[') => serde_json::from_str(i.get()).ok(),
        _ => None,
    };
    if let Some(ins) = fields.instructions {
        write_piece(&mut h, b"system");
        write_piece(&mut h, ins.get().as_bytes());
    }
    let first = match (
        fields.messages.as_deref().or(items.as_deref()),
        fields.prompt.or(fields.input),
    ) {
        (Some(msgs), _) => {
            let mut rest = msgs.iter();
            let mut first = None;
            for m in rest.by_ref() {
                let role = m.role.as_deref().unwrap_or("");
                let content = m.content.map_or("", RawValue::get);
                if role == "system" || role == "developer" {
                    write_piece(&mut h, role.as_bytes());
                    write_piece(&mut h, content.as_bytes());
                } else {
                    first = Some(content);
                    break;
                }
            }
            first?
        }
        (None, Some(p)) => p.get(),
        (None, None) => return None,
    };
    if first.len() < limits.root_min_chars {
        return None;
    }
    write_piece(&mut h, head(first, limits.root_chars).as_bytes());
    Some(h.finish())
}

#[derive(Deserialize, Default)]
struct WorkflowMetadata<'a> {
    #[serde(borrow, default)]
    workflow_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    agent_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    parent_request_id: Option<Cow<'a, str>>,
}

#[derive(Deserialize, Default)]
struct Xargs<'a> {
    #[serde(borrow, default)]
    agentic_context: Option<AgenticField<'a>>,
}

/// `agentic_context` may be an object or a JSON string holding one.
#[derive(Deserialize)]
#[serde(untagged)]
enum AgenticField<'a> {
    Object(AgenticContext),
    #[serde(borrow)]
    Text(Cow<'a, str>),
}

/// The fields of vllm-router's `agentic_context` that agentlb uses (small; owned).
#[derive(Deserialize, Default)]
struct AgenticContext {
    #[serde(default)]
    task_id: Option<String>,
    #[serde(default)]
    program_id: Option<String>,
    #[serde(default)]
    agent_id: Option<String>,
    #[serde(default)]
    parent_program_id: Option<String>,
}

/// The first value of a metadata header (`name` is for the error message).
fn header<'h>(value: Option<&'h [u8]>, name: &str) -> Result<Option<&'h str>, ApiError> {
    match value {
        None => Ok(None),
        Some(v) => std::str::from_utf8(v)
            .ok()
            .filter(|s| s.is_ascii())
            .map(|s| Some(s.trim()).filter(|s| !s.is_empty()))
            .ok_or(())
            .map_err(|_| {
                ApiError::invalid_request(
                    format!("header {name} is not valid ASCII"),
                    "invalid_header",
                )
            }),
    }
}

fn cookie<'h>(h: &'h Head, name: &str) -> Option<&'h str> {
    h.values_of(Known::Cookie)
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// The header value if present, else the first body shape that has one.
fn header_or<const N: usize>(header: Option<&str>, body: [Option<&str>; N]) -> Option<String> {
    header
        .or_else(|| body.into_iter().flatten().next())
        .map(str::to_owned)
}

/// Validates an id: 1..=max bytes of visible ASCII.
fn check_id(what: &str, v: &str, limits: &MetaLimits) -> Result<String, ApiError> {
    if v.len() > limits.max_id_len {
        return Err(ApiError::invalid_request(
            format!("{what} is longer than {} bytes", limits.max_id_len),
            "invalid_id",
        ));
    }
    if v.is_empty() || !v.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(ApiError::invalid_request(
            format!(
                "{what} must be 1-{} visible ASCII characters",
                limits.max_id_len
            ),
            "invalid_id",
        ));
    }
    Ok(v.to_owned())
}

fn opt_id(what: &str, v: Option<&str>, limits: &MetaLimits) -> Result<Option<String>, ApiError> {
    v.map(|v| check_id(what, v, limits)).transpose()
}

/// The `model` field of a `multipart/form-data` body (the audio routes), `None` when
/// the form has none. A malformed form is a 400.
pub async fn form_model(
    content_type: &[u8],
    body: &bytes::Bytes,
    limits: &MetaLimits,
) -> Result<Option<String>, ApiError> {
    let bad = |m: String| ApiError::invalid_request(m, "invalid_multipart");
    let ct =
        std::str::from_utf8(content_type).map_err(|_| bad("Content-Type is not ASCII".into()))?;
    let boundary =
        multer::parse_boundary(ct).map_err(|e| bad(format!("multipart/form-data: {e}")))?;
    let data = body.clone();
    let stream = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(data) });
    let constraints = multer::Constraints::new()
        .size_limit(multer::SizeLimit::new().for_field("model", limits.max_id_len as u64 * 4 + 64));
    let mut form = multer::Multipart::with_constraints(stream, boundary, constraints);
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| bad(format!("multipart/form-data body: {e}")))?
    {
        if field.name() == Some("model") {
            let text = field
                .text()
                .await
                .map_err(|e| bad(format!("multipart/form-data field model: {e}")))?;
            return Ok(Some(text.trim().to_owned()).filter(|m| !m.is_empty()));
        }
    }
    Ok(None)
}

/// Extracts metadata from headers and (for JSON requests) the body bytes.
/// `body` is `None` for requests without a JSON body.
pub fn extract(
    headers: &Head,
    body: Option<&[u8]>,
    request_id: String,
    limits: &MetaLimits,
) -> Result<RequestMeta, ApiError> {
    let mut fields: BodyFields<'_> = match body {
        // JSON is UTF-8 (RFC 8259 §8.1). Validating the whole body once is
        // cheaper than serde_json validating every string it borrows, and a
        // body with invalid bytes anywhere (even in a skipped string) is refused
        // here rather than by the backend.
        Some(b) if !b.is_empty() => std::str::from_utf8(b)
            .map_err(|e| format!("it is not UTF-8 ({e})"))
            .and_then(|text| {
                // A struct also deserializes from an array: require the object.
                if text.trim_start().starts_with('{') {
                    Ok(text)
                } else {
                    Err("expected a JSON object".to_owned())
                }
            })
            .and_then(|text| serde_json::from_str(text).map_err(|e| e.to_string()))
            .map_err(|e| {
                ApiError::invalid_request(
                    format!("request body is not valid JSON: {e}"),
                    "invalid_json",
                )
            })?,
        Some(_) => {
            return Err(ApiError::invalid_request(
                "request body is empty; expected a JSON object",
                "invalid_json",
            ));
        }
        None => BodyFields::default(),
    };
    let agentic: Option<AgenticContext> =
        match fields.vllm_xargs.take().and_then(|x| x.agentic_context) {
            None => None,
            Some(AgenticField::Object(o)) => Some(o),
            Some(AgenticField::Text(t)) => Some(serde_json::from_str(&t).map_err(|e| {
                ApiError::invalid_request(
                    format!("vllm_xargs.agentic_context is not a JSON object: {e}"),
                    "invalid_json",
                )
            })?),
        };
    let wm = fields.workflow_metadata.take().unwrap_or_default();

    let (workflow, source) =
        if let Some(v) = header(headers.values_of(Known::WorkflowId).next(), "x-workflow-id")? {
            (Some(v.to_owned()), Some(WorkflowSource::Header))
        } else if let Some(v) = &fields.workflow_id {
            (Some(v.to_string()), Some(WorkflowSource::Body))
        } else if let Some(v) = &wm.workflow_id {
            (Some(v.to_string()), Some(WorkflowSource::WorkflowMetadata))
        } else if let Some(v) = agentic
            .as_ref()
            .and_then(|a| a.task_id.clone().or_else(|| a.program_id.clone()))
        {
            (Some(v), Some(WorkflowSource::AgenticContext))
        } else if let Some(v) = cookie(headers, "agentlb_wf") {
            (Some(v.to_owned()), Some(WorkflowSource::Cookie))
        } else {
            (None, None)
        };
    let agent = header_or(
        header(headers.values_of(Known::AgentId).next(), "x-agent-id")?,
        [
            fields.agent_id.as_deref(),
            wm.agent_id.as_deref(),
            agentic.as_ref().and_then(|a| a.agent_id.as_deref()),
        ],
    );
    let parent = header_or(
        header(
            headers.values_of(Known::ParentRequestId).next(),
            "x-parent-request-id",
        )?,
        [
            fields.parent_request_id.as_deref(),
            wm.parent_request_id.as_deref(),
            agentic
                .as_ref()
                .and_then(|a| a.parent_program_id.as_deref()),
        ],
    );
    let session = header(
        headers.get_all(&limits.session_header).next(),
        &limits.session_header,
    )?;
    // A Responses API continuation belongs to its chain, not to a conversation root.
    let root_key = if workflow.is_none() && fields.previous_response_id.is_none() {
        root_key(&fields, limits)
    } else {
        None
    };
    let workflow_end = headers
        .get_all("x-workflow-end")
        .next()
        .is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"true") || v.trim_ascii() == b"1");
    let blocks = if limits.prefix_block > 0 {
        prompt_blocks(&fields, limits)
    } else {
        Vec::new()
    };
    Ok(RequestMeta {
        workflow_id: opt_id("workflow id", workflow.as_deref(), limits)?,
        workflow_source: source,
        agent_id: opt_id("agent id", agent.as_deref(), limits)?,
        parent_request_id: opt_id("parent request id", parent.as_deref(), limits)?,
        request_id,
        session: opt_id("session key", session, limits)?,
        model: fields.model.map(Cow::into_owned),
        stream: fields.stream.unwrap_or(false),
        root_key,
        body_len: body.map_or(0, <[u8]>::len),
        workflow_end,
        previous_response_id: opt_id(
            "previous_response_id",
            fields.previous_response_id.as_deref(),
            limits,
        )?,
        pinned: None,
        blocks,
        kv: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metadata of a request with header fields `h` and JSON `body`; the head
    /// goes through the engine's parser.
    fn ex(h: &[(&str, &str)], body: &str) -> Result<RequestMeta, ApiError> {
        let fields: String = h.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
        let mut raw = bytes::BytesMut::from(format!("POST / HTTP/1.1\r\n{fields}\r\n").as_str());
        let head = crate::proxy::h1::parse_request(&mut raw, 64 * 1024)
            .expect("valid head")
            .expect("complete head");
        extract(
            &head,
            Some(body.as_bytes()),
            "r".into(),
            &MetaLimits::default(),
        )
    }

    #[test]
    fn every_shape_is_accepted() {
        let m = ex(
            &[],
            r#"{"model":"m","workflow_id":"w1","agent_id":"a","parent_request_id":"p"}"#,
        )
        .expect("ok");
        assert_eq!(
            (
                m.workflow_id.as_deref(),
                m.workflow_source,
                m.agent_id.as_deref(),
                m.parent_request_id.as_deref()
            ),
            (Some("w1"), Some(WorkflowSource::Body), Some("a"), Some("p"))
        );
        assert_eq!(m.model.as_deref(), Some("m"));
        let m = ex(&[], r#"{"workflow_metadata":{"workflow_id":"w2","agent_id":"a2","parent_request_id":"p2"}}"#).expect("ok");
        assert_eq!(m.workflow_id.as_deref(), Some("w2"));
        assert_eq!(m.workflow_source, Some(WorkflowSource::WorkflowMetadata));
        assert_eq!(m.agent_id.as_deref(), Some("a2"));
        let m = ex(&[], r#"{"vllm_xargs":{"agentic_context":{"task_id":"w3","agent_id":"lead","parent_program_id":"p3"}}}"#).expect("ok");
        assert_eq!(m.workflow_id.as_deref(), Some("w3"));
        assert_eq!(m.workflow_source, Some(WorkflowSource::AgenticContext));
        assert_eq!(m.parent_request_id.as_deref(), Some("p3"));
        let m = ex(
            &[],
            r#"{"vllm_xargs":{"agentic_context":"{\"program_id\":\"w4:lead\"}"}}"#,
        )
        .expect("ok");
        assert_eq!(m.workflow_id.as_deref(), Some("w4:lead"));
        let m = ex(&[("cookie", "a=b; agentlb_wf=w5")], "{}").expect("ok");
        assert_eq!(m.workflow_source, Some(WorkflowSource::Cookie));
        assert_eq!(m.workflow_id.as_deref(), Some("w5"));
    }

    #[test]
    fn header_wins_over_body() {
        let m = ex(
            &[
                ("x-workflow-id", "h"),
                ("x-agent-id", "ha"),
                ("x-parent-request-id", "hp"),
                ("x-user-id", "u"),
            ],
            r#"{"workflow_id":"b","agent_id":"ba","parent_request_id":"bp","stream":true}"#,
        )
        .expect("ok");
        assert_eq!(m.workflow_id.as_deref(), Some("h"));
        assert_eq!(m.agent_id.as_deref(), Some("ha"));
        assert_eq!(m.parent_request_id.as_deref(), Some("hp"));
        assert_eq!(m.session.as_deref(), Some("u"));
        assert!(m.stream);
    }

    #[test]
    fn bad_input_is_a_400_not_a_panic() {
        for (h, b) in [
            (vec![], "{not json"),
            (vec![], ""),
            (vec![], r#"{"workflow_id": 5}"#),
            (vec![], r#"{"workflow_id": "has space"}"#),
            (vec![("x-workflow-id", "x".repeat(300))], "{}"),
            (vec![], r#"{"vllm_xargs":{"agentic_context":"nope"}}"#),
            (vec![], r#"[1,2]"#),
        ] {
            let h: Vec<(&str, &str)> = h
                .iter()
                .map(|(k, v): &(&str, String)| (*k, v.as_str()))
                .collect();
            let e = ex(&h, b).expect_err(b);
            assert_eq!(e.status, http::StatusCode::BAD_REQUEST, "{b}");
        }
    }

    #[test]
    fn bodies_that_are_not_utf8_are_refused() {
        let mut raw = bytes::BytesMut::from(&b"POST / HTTP/1.1\r\n\r\n"[..]);
        let head = crate::proxy::h1::parse_request(&mut raw, 1024)
            .expect("valid head")
            .expect("complete head");
        // Invalid bytes inside a string agentlb does not read itself.
        let body = b"{\"model\":\"m\",\"prompt\":\"caf\xe9\"}";
        let e =
            extract(&head, Some(body), "r".into(), &MetaLimits::default()).expect_err("not UTF-8");
        assert_eq!(e.status, http::StatusCode::BAD_REQUEST);
        assert!(e.message.contains("UTF-8"), "{}", e.message);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let m = ex(&[], r#"{"messages":[{"role":"user","content":"hi"}],"temperature":0.5,"x":{"y":[1,2,{"z":null}]}}"#).expect("ok");
        assert_eq!(m.workflow_id, None);
    }

    #[test]
    fn a_body_must_be_a_json_object() {
        for body in ["[]", "[\"m\", true]", "  [1]", "\"text\"", "7"] {
            let e = ex(&[], body).expect_err(body);
            assert_eq!(e.code, "invalid_json", "{body}");
        }
        assert!(ex(&[], " \n{\"model\":\"m\"}").is_ok());
    }

    #[tokio::test]
    async fn the_model_of_a_form_is_read_and_a_bad_form_refused() {
        let limits = MetaLimits::default();
        let form = "--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
                    Content-Type: audio/wav\r\n\r\nRIFF....\r\n--XyZ\r\n\
                    Content-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XyZ--\r\n";
        let body = bytes::Bytes::from(form);
        let got = form_model(b"multipart/form-data; boundary=XyZ", &body, &limits).await;
        assert_eq!(got.expect("form"), Some("whisper-1".to_owned()));
        let none = bytes::Bytes::from(
            "--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nx\r\n--XyZ--\r\n",
        );
        assert_eq!(
            form_model(b"multipart/form-data; boundary=XyZ", &none, &limits)
                .await
                .expect("form"),
            None
        );
        let e = form_model(b"multipart/form-data", &body, &limits)
            .await
            .expect_err("no boundary");
        assert_eq!(e.code, "invalid_multipart");
        let e = form_model(
            b"multipart/form-data; boundary=XyZ",
            &bytes::Bytes::from("--XyZ\r\ngarbage"),
            &limits,
        )
        .await
        .expect_err("truncated");
        assert_eq!(e.code, "invalid_multipart");
    }

    fn chat(system: &str, user: &str) -> String {
        serde_json::json!({"messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
        ]})
        .to_string()
    }

    #[test]
    fn conversation_root_is_shared_by_agents_of_one_context() {
        let ctx = "shared workflow context ".repeat(60);
        let a = ex(&[], &chat("sys", &format!("{ctx} agent A task"))).expect("ok");
        let b = ex(
            &[],
            &chat("sys", &format!("{ctx} agent B does something else")),
        )
        .expect("ok");
        assert!(a.root_key.is_some());
        assert_eq!(a.root_key, b.root_key, "same context prefix, same root");
        // Another workflow's context, or another system prompt: another root.
        let other = "another workflow entirely ".repeat(60);
        let c = ex(&[], &chat("sys", &other)).expect("ok");
        assert_ne!(a.root_key, c.root_key);
        let d = ex(&[], &chat("other sys", &format!("{ctx} agent A task"))).expect("ok");
        assert_ne!(a.root_key, d.root_key);
        // Later turns do not change the root.
        let body = serde_json::json!({"messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": format!("{ctx} agent A task")},
            {"role": "assistant", "content": "done"},
            {"role": "user", "content": "next"},
        ]})
        .to_string();
        assert_eq!(ex(&[], &body).expect("ok").root_key, a.root_key);
    }

    #[test]
    fn short_first_messages_and_explicit_workflows_have_no_root() {
        // A system prompt shared by every client plus a short question: no root, so
        // such requests are balanced instead of collapsing on one backend.
        let sys = "You are a helpful assistant. ".repeat(100);
        let m = ex(&[], &chat(&sys, "What is the capital of France?")).expect("ok");
        assert_eq!(m.root_key, None);
        let ctx = "x".repeat(2000);
        let m = ex(&[("x-workflow-id", "wf-1")], &chat("s", &ctx)).expect("ok");
        assert_eq!(m.root_key, None, "the workflow id is the key");
        let p = serde_json::json!({"prompt": ctx}).to_string();
        assert!(ex(&[], &p).expect("ok").root_key.is_some());
        // Multi-byte text is cut on a character boundary.
        let m = ex(&[], &chat("s", &"é".repeat(1500))).expect("ok");
        assert!(m.root_key.is_some());
    }
}
