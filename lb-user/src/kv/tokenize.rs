//! In-process tokenization: the prompt token ids a vLLM backend will compute for a request.
//!
//! Precise KV-aware routing compares a request's prompt with the blocks (16 token ids each)
//! that backends report in their KV events, so agentlb must find the *same* ids vLLM finds
//! without asking it. [`ChatTokenizer`] loads the model's Hugging Face files (`tokenizer.json`
//! with the `tokenizers` crate, `tokenizer_config.json` / `chat_template.jinja` for the chat
//! template) and reproduces vLLM's pipeline:
//!
//! - **chat** (`/v1/chat/completions`): vLLM's message normalization (`parse_chat_messages`):
//!   text parts flattened into one string joined with `"\n"` for templates that read
//!   `message.content` as a string, or kept as `{"type": "text", "text": …}` parts for templates
//!   that loop over the content; `null` content becomes `""`; assistant `tool_calls` arguments
//!   parsed from their JSON strings (`{}` when empty), empty `tool_calls` dropped;
//!   `tool_call_id`, `name`, `reasoning` kept; `tools` as pydantic's `model_dump()` writes them
//!   (`description`/`parameters` null when absent). Then transformers' `apply_chat_template`
//!   rendering (jinja with `trim_blocks` and `lstrip_blocks`, `tojson` = Python's `json.dumps`,
//!   `raise_exception`, `strftime_now`, the tokenizer's special tokens, `add_generation_prompt`,
//!   `chat_template_kwargs`, `continue_final_message` truncation), then encoding **without**
//!   special tokens (the template writes BOS) unless the body sets `add_special_tokens`;
//! - **completions** (`/v1/completions`): a text prompt encoded **with** special tokens (unless
//!   `add_special_tokens: false`), token ids used as they are.
//!
//! Objects in the body keep their order (`tojson` of tools must match byte for byte): bodies
//! are parsed straight into template values.
//!
//! # Cost
//! The template is compiled once. Encoding splits the rendered text on the tokenizer's added
//! tokens exactly as `tokenizers` does (leftmost-longest, `lstrip`/`rstrip`) and encodes each
//! piece between them on its own, which is what `tokenizers` does internally; pieces are cached
//! (keyed by a keyed 64-bit hash of their text, bounded in entries and ids), so the long
//! messages agents resend are not encoded again. Tokenizers where a piece's ids could depend on
//! its position (a `Metaspace` pre-tokenizer with `prepend_scheme: "first"`, `single_word`
//! added tokens, normalized added tokens under a normalizer) are encoded whole, uncached; a
//! self-check at load time falls back the same way if piecewise encoding ever differs.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde::Deserialize;
use thiserror::Error;
use tokenizers::Tokenizer;

/// Why a prompt could not be tokenized (the router then routes without precise KV data).
#[derive(Debug, Error)]
pub enum TokenizeError {
    /// A tokenizer file could not be read.
    #[error("reading {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Malformed JSON (a tokenizer file or the request body).
    #[error("invalid JSON in {what}: {source}")]
    Json {
        /// What was being parsed.
        what: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The `tokenizers` library refused the tokenizer or failed to encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template is missing, does not compile, or failed to render.
    #[error("chat template: {0}")]
    Template(String),
    /// The request has a shape vLLM would refuse or that cannot be reproduced.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// No tokenizer found for a model in the Hugging Face cache.
    #[error("not found: {0}")]
    NotFound(String),
}

/// Which OpenAI endpoint a body was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptKind {
    /// `/v1/chat/completions`: `messages` rendered with the chat template.
    Chat,
    /// `/v1/completions`: `prompt` as text or token ids.
    Completion,
}

/// Default bound of the piece cache, in entries.
pub const DEFAULT_CACHE_ENTRIES: usize = 4096;
/// Default bound of the piece cache, in token ids held (16 MiB of ids).
pub const DEFAULT_CACHE_IDS: usize = 4 << 20;

/// A model's tokenizer and chat template, ready to tokenize requests as vLLM does.
///
/// `Send + Sync`; share it in an `Arc`.
pub struct ChatTokenizer {
    inner: Tokenizer,
    env: Environment<'static>,
    has_default: bool,
    has_tool_use: bool,
    /// Special-token variables of the template context (`bos_token`, ...).
    specials: Vec<(&'static str, String)>,
    /// The template loops over `message.content` (vLLM's "openai" content format).
    content_parts: bool,
    /// `None` when pieces cannot be encoded independently: whole-text encoding, no cache.
    splitter: Option<Splitter>,
    cache: PieceCache,
}

impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("chat_template", &self.has_default)
            .field("content_parts", &self.content_parts)
            .field("piece_cache", &self.splitter.is_some())
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TokenizeError + '_ {
    move |source| TokenizeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn json_err(what: impl std::fmt::Display) -> impl FnOnce(serde_json::Error) -> TokenizeError {
    let what = what.to_string();
    move |source| TokenizeError::Json { what, source }
}

/// A special token in `tokenizer_config.json`: `"<s>"` or `{"content": "<s>", ...}`.
fn config_token(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => Some(o.get("content")?.as_str()?.to_owned()),
        _ => None,
    }
}

impl ChatTokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` (`chat_template` — a
    /// string, or a list of `{name, template}` of which `default` is used, and `tool_use` when
    /// the request has tools —, `bos_token`, `eos_token`, `unk_token`, `pad_token`, as strings or
    /// `{"content": …}` objects) from `dir`. A `chat_template.jinja` file (newer HF layout)
    /// replaces the config's default template.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizeError> {
        Self::with_cache_bounds(dir, DEFAULT_CACHE_ENTRIES, DEFAULT_CACHE_IDS)
    }

    /// [`ChatTokenizer::from_dir`] with explicit piece-cache bounds (`entries == 0` disables
    /// the cache).
    pub fn with_cache_bounds(
        dir: &Path,
        entries: usize,
        ids: usize,
    ) -> Result<Self, TokenizeError> {
        let tok_path = dir.join("tokenizer.json");
        let raw = std::fs::read(&tok_path).map_err(io_err(&tok_path))?;
        let mut inner = Tokenizer::from_bytes(&raw)
            .map_err(|e| TokenizeError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        // The backend never truncates or pads a prompt because the file says so.
        inner
            .with_truncation(None)
            .map_err(|e| TokenizeError::Tokenizer(e.to_string()))?;
        inner.with_padding(None);
        let tok_json: serde_json::Value =
            serde_json::from_slice(&raw).map_err(json_err(tok_path.display()))?;

        let cfg_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read(&cfg_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(json_err(cfg_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
            Err(e) => return Err(io_err(&cfg_path)(e)),
        };
        let mut default_src: Option<String> = None;
        let mut tool_use_src: Option<String> = None;
        match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => default_src = Some(s.clone()),
            Some(serde_json::Value::Array(named)) => {
                for t in named {
                    let name = t.get("name").and_then(serde_json::Value::as_str);
                    let src = t.get("template").and_then(serde_json::Value::as_str);
                    match (name, src) {
                        (Some("default"), Some(s)) => default_src = Some(s.to_owned()),
                        (Some("tool_use"), Some(s)) => tool_use_src = Some(s.to_owned()),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        let jinja_path = dir.join("chat_template.jinja");
        match std::fs::read_to_string(&jinja_path) {
            Ok(s) => default_src = Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&jinja_path)(e)),
        }

        let mut env = template_env();
        let content_parts = default_src.as_deref().is_some_and(iterates_content);
        for (name, src) in [("default", &default_src), ("tool_use", &tool_use_src)] {
            if let Some(src) = src {
                env.add_template_owned(name, without_generation_tags(src))
                    .map_err(|e| TokenizeError::Template(format!("{name}: {e:#}")))?;
            }
        }
        let mut specials = Vec::new();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            if let Some(t) = config_token(config.get(key)) {
                specials.push((key, t));
            }
        }

        let mut this = Self {
            has_default: default_src.is_some(),
            has_tool_use: tool_use_src.is_some(),
            splitter: None,
            cache: PieceCache::new(entries, ids),
            inner,
            env,
            specials,
            content_parts,
        };
        this.splitter = Splitter::for_tokenizer(&this.inner, &tok_json)
            .filter(|s| this.piecewise_matches_whole(s));
        Ok(this)
    }

    /// Resolves `model` (`org/name`) in the Hugging Face hub cache and loads its snapshot.
    ///
    /// The root is `cache` if given, else `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`; the directory is `models--org--name/snapshots/<rev>/`, where
    /// `<rev>` is `refs/main` when present, else the only (or most recently modified) snapshot.
    pub fn from_hf_cache(model: &str, cache: Option<&Path>) -> Result<Self, TokenizeError> {
        let root = match cache {
            Some(c) => c.to_path_buf(),
            None => hub_cache_root()?,
        };
        let repo = root.join(format!("models--{}", model.replace('/', "--")));
        if !repo.is_dir() {
            return Err(TokenizeError::NotFound(format!(
                "model {model} is not in the Hugging Face cache ({} does not exist)",
                repo.display()
            )));
        }
        let snapshots = repo.join("snapshots");
        let refs_main = repo.join("refs").join("main");
        let snapshot = match std::fs::read_to_string(&refs_main) {
            Ok(rev) => {
                let dir = snapshots.join(rev.trim());
                if !dir.is_dir() {
                    return Err(TokenizeError::NotFound(format!(
                        "{} names snapshot {} which does not exist",
                        refs_main.display(),
                        rev.trim()
                    )));
                }
                dir
            }
            Err(_) => newest_snapshot(&snapshots)?,
        };
        Self::from_dir(&snapshot)
    }

    /// Token ids of the prompt the backend will compute for this request body (JSON bytes).
    pub fn prompt_tokens(&self, body: &[u8], kind: PromptKind) -> Result<Vec<u32>, TokenizeError> {
        match kind {
            PromptKind::Chat => {
                let req: Value = serde_json::from_slice(body).map_err(json_err("request body"))?;
                let text = self.render_request(&req)?;
                let special = field(&req, "add_special_tokens").is_true();
                self.encode(&text, special)
            }
            PromptKind::Completion => {
                #[derive(Deserialize)]
                struct Completion {
                    #[serde(default)]
                    prompt: serde_json::Value,
                    #[serde(default)]
                    add_special_tokens: Option<bool>,
                }
                let req: Completion =
                    serde_json::from_slice(body).map_err(json_err("request body"))?;
                let special = req.add_special_tokens.unwrap_or(true);
                self.completion_tokens(&req.prompt, special)
            }
        }
    }

    /// Renders the chat template for a chat request (for tests and debugging). Objects of a
    /// `serde_json::Value` are key-sorted; [`ChatTokenizer::render_chat_body`] keeps the body's
    /// order, as [`ChatTokenizer::prompt_tokens`] does.
    pub fn render_chat(&self, body: &serde_json::Value) -> Result<String, TokenizeError> {
        self.render_request(&Value::from_serialize(body))
    }

    /// Renders the chat template for a chat request body (JSON bytes), keeping its key order.
    pub fn render_chat_body(&self, body: &[u8]) -> Result<String, TokenizeError> {
        let req: Value = serde_json::from_slice(body).map_err(json_err("request body"))?;
        self.render_request(&req)
    }

    /// Token ids of `text` as `tokenizer.encode(text, add_special_tokens)` gives them, through
    /// the piece cache when the tokenizer allows it.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizeError> {
        let Some(splitter) = &self.splitter else {
            return self.encode_uncached(text, add_special_tokens);
        };
        if !self.cache.enabled() {
            return self.encode_uncached(text, add_special_tokens);
        }
        let segments = splitter.split(text);
        let keys: Vec<u64> = segments
            .iter()
            .map(|s| match s {
                Segment::Text(r) => self.cache.key(&text[r.clone()]),
                Segment::Added(_) => 0,
            })
            .collect();
        let hits = self.cache.lookup(&segments, &keys);
        let mut ids = Vec::with_capacity(text.len() / 3 + 8);
        let mut fresh: Vec<(u64, Arc<[u32]>)> = Vec::new();
        for ((seg, key), hit) in segments.iter().zip(&keys).zip(hits) {
            match seg {
                Segment::Added(id) => ids.push(*id),
                Segment::Text(r) => match hit {
                    Some(piece) => ids.extend_from_slice(&piece),
                    None => {
                        let piece: Arc<[u32]> =
                            self.encode_uncached(&text[r.clone()], false)?.into();
                        ids.extend_from_slice(&piece);
                        fresh.push((*key, piece));
                    }
                },
            }
        }
        self.cache.insert(fresh);
        if add_special_tokens {
            ids = self.post_process(ids)?;
        }
        Ok(ids)
    }

    /// `tokenizer.encode(text, add_special_tokens)`, without the piece cache.
    pub fn encode_uncached(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, TokenizeError> {
        self.inner
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizeError::Tokenizer(e.to_string()))
    }

    /// Whether encoding goes through the piece cache (false for tokenizers whose pieces are not
    /// independent; see the module documentation).
    pub fn uses_piece_cache(&self) -> bool {
        self.splitter.is_some() && self.cache.enabled()
    }

    /// Pieces currently cached.
    pub fn cached_pieces(&self) -> usize {
        self.cache.len()
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner
    }

    /// Adds the special tokens of the post-processor (`add_special_tokens = true`) around ids.
    fn post_process(&self, ids: Vec<u32>) -> Result<Vec<u32>, TokenizeError> {
        let n = ids.len();
        let enc = tokenizers::Encoding::new(
            ids,
            vec![0; n],
            vec![String::new(); n],
            vec![None; n],
            vec![(0, 0); n],
            vec![0; n],
            vec![1; n],
            Vec::new(),
            Default::default(),
        );
        self.inner
            .post_process(enc, None, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizeError::Tokenizer(e.to_string()))
    }

    /// Load-time check that piecewise encoding equals whole encoding on text around every
    /// kind of added token.
    fn piecewise_matches_whole(&self, splitter: &Splitter) -> bool {
        let mut probe = String::from(" Hello  world\n\n");
        for t in splitter.contents().take(16) {
            probe.push_str(t);
            probe.push_str("user\n\n  x y, z.\t");
            probe.push_str(t);
            probe.push(' ');
        }
        probe.push_str("end ");
        let whole = self.encode_uncached(&probe, false);
        let mut pieces = Vec::new();
        for seg in splitter.split(&probe) {
            match seg {
                Segment::Added(id) => pieces.push(id),
                Segment::Text(r) => match self.encode_uncached(&probe[r], false) {
                    Ok(ids) => pieces.extend(ids),
                    Err(_) => return false,
                },
            }
        }
        whole.is_ok_and(|w| w == pieces)
    }

    fn completion_tokens(
        &self,
        prompt: &serde_json::Value,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, TokenizeError> {
        use serde_json::Value as J;
        fn token_ids(items: &[J]) -> Result<Vec<u32>, TokenizeError> {
            items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|x| u32::try_from(x).ok())
                        .ok_or_else(|| {
                            TokenizeError::BadRequest("prompt token ids must be integers".into())
                        })
                })
                .collect()
        }
        match prompt {
            J::String(s) => self.encode(s, add_special_tokens),
            J::Array(items) => match items.as_slice() {
                [] => Err(TokenizeError::BadRequest("prompt is empty".into())),
                [J::String(s)] => self.encode(s, add_special_tokens),
                [J::Array(inner)] => token_ids(inner),
                [J::Number(_), ..] => token_ids(items),
                _ => Err(TokenizeError::BadRequest(
                    "prompt must be a string, one string in a list, or token ids".into(),
                )),
            },
            J::Null => Err(TokenizeError::BadRequest("`prompt` is required".into())),
            _ => Err(TokenizeError::BadRequest(
                "prompt must be a string or a list".into(),
            )),
        }
    }

    /// Renders the chat template for a parsed request.
    fn render_request(&self, req: &Value) -> Result<String, TokenizeError> {
        if req.kind() != ValueKind::Map {
            return Err(TokenizeError::BadRequest(
                "the body must be an object".into(),
            ));
        }
        if field(req, "chat_template").kind() == ValueKind::String {
            return Err(TokenizeError::BadRequest(
                "a chat_template in the request cannot be reproduced".into(),
            ));
        }
        let messages = field(req, "messages");
        if messages.kind() != ValueKind::Seq {
            return Err(TokenizeError::BadRequest(
                "`messages` must be a list".into(),
            ));
        }
        let add_generation_prompt = bool_field(req, "add_generation_prompt", true)?;
        let continue_final = bool_field(req, "continue_final_message", false)?;
        if add_generation_prompt && continue_final {
            return Err(TokenizeError::BadRequest(
                "cannot set both `continue_final_message` and `add_generation_prompt`".into(),
            ));
        }
        let mut conversation = Vec::new();
        for (i, m) in iter_values(&messages)?.enumerate() {
            conversation.push(
                normalize_message(&m, self.content_parts)
                    .map_err(|e| TokenizeError::BadRequest(format!("messages[{i}]: {e}")))?,
            );
        }
        let tools = model_dump_tools(&field(req, "tools"))?;
        let template = if !tools.is_none() && self.has_tool_use {
            "tool_use"
        } else if self.has_default {
            "default"
        } else {
            return Err(TokenizeError::Template(
                "the model has no chat template".into(),
            ));
        };
        let final_content = conversation.last().map(|m| field(m, "content"));

        let mut ctx: Vec<(Value, Value)> = Vec::with_capacity(8);
        for (k, v) in &self.specials {
            ctx.push((Value::from(*k), Value::from(v.as_str())));
        }
        ctx.push((Value::from("messages"), Value::from(conversation)));
        ctx.push((Value::from("tools"), tools));
        let documents = field(req, "documents");
        ctx.push((
            Value::from("documents"),
            if documents.is_undefined() {
                Value::from(())
            } else {
                documents
            },
        ));
        ctx.push((
            Value::from("add_generation_prompt"),
            Value::from(add_generation_prompt),
        ));
        let kwargs = field(req, "chat_template_kwargs");
        if kwargs.kind() == ValueKind::Map {
            for k in iter_values(&kwargs)? {
                if k.as_str() == Some("messages") {
                    continue;
                }
                let v = kwargs.get_item(&k).unwrap_or_default();
                // Later entries win: the request's kwargs override the defaults above.
                ctx.push((k, v));
            }
        }
        let ctx: Value = ctx.into_iter().collect();
        let rendered = self
            .env
            .get_template(template)
            .and_then(|t| t.render(ctx))
            .map_err(|e| TokenizeError::Template(format!("{e:#}")))?;
        if continue_final {
            cut_after_final_message(rendered, final_content)
        } else {
            Ok(rendered)
        }
    }
}

fn hub_cache_root() -> Result<PathBuf, TokenizeError> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("HF_HUB_CACHE") {
        return Ok(p);
    }
    if let Some(p) = var("HF_HOME") {
        return Ok(p.join("hub"));
    }
    match var("HOME") {
        Some(home) => Ok(home.join(".cache").join("huggingface").join("hub")),
        None => Err(TokenizeError::NotFound(
            "no Hugging Face cache: set HF_HUB_CACHE, HF_HOME or HOME".into(),
        )),
    }
}

fn newest_snapshot(snapshots: &Path) -> Result<PathBuf, TokenizeError> {
    let entries = std::fs::read_dir(snapshots).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            TokenizeError::NotFound(format!("{} does not exist", snapshots.display()))
        } else {
            io_err(snapshots)(e)
        }
    })?;
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in entries {
        let entry = entry.map_err(io_err(snapshots))?;
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let modified = entry
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        if best.as_ref().is_none_or(|(t, _)| modified > *t) {
            best = Some((modified, path));
        }
    }
    best.map(|(_, p)| p)
        .ok_or_else(|| TokenizeError::NotFound(format!("no snapshot in {}", snapshots.display())))
}

// ---------------------------------------------------------------------------------------------
// Request → template context (vLLM's parse_chat_messages, pydantic's model_dump).

/// `v[key]`, undefined when absent.
fn field(v: &Value, key: &str) -> Value {
    v.get_attr(key).unwrap_or_default()
}

fn iter_values(v: &Value) -> Result<minijinja::value::ValueIter, TokenizeError> {
    v.try_iter()
        .map_err(|e| TokenizeError::BadRequest(e.to_string()))
}

fn bool_field(req: &Value, key: &str, default: bool) -> Result<bool, TokenizeError> {
    let v = field(req, key);
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => Ok(default),
        ValueKind::Bool => Ok(v.is_true()),
        _ => Err(TokenizeError::BadRequest(format!(
            "`{key}` must be a boolean"
        ))),
    }
}

/// One conversation message as vLLM hands it to the template.
fn normalize_message(m: &Value, content_parts: bool) -> Result<Value, String> {
    if m.kind() != ValueKind::Map {
        return Err("not an object".into());
    }
    let role = field(m, "role");
    let Some(role_name) = role.as_str().map(str::to_owned) else {
        return Err("`role` must be a string".into());
    };
    let raw_content = field(m, "content");
    let content = if !content_parts && raw_content.kind() == ValueKind::String {
        // The common case: the string itself, not a copy.
        raw_content
    } else if content_parts {
        let texts = message_texts(&raw_content)?;
        texts
            .into_iter()
            .map(|t| {
                [("type", Value::from("text")), ("text", Value::from(t))]
                    .into_iter()
                    .collect::<Value>()
            })
            .collect::<Vec<Value>>()
            .into()
    } else {
        Value::from(message_texts(&raw_content)?.join("\n"))
    };
    let mut out: Vec<(&str, Value)> = vec![("role", role), ("content", content)];
    if role_name == "assistant" {
        let calls = field(m, "tool_calls");
        if !calls.is_undefined() && !calls.is_none() {
            if calls.kind() == ValueKind::Seq {
                let parsed = parse_tool_calls(&calls)?;
                if !parsed.is_empty() {
                    out.push(("tool_calls", Value::from(parsed)));
                }
            } else {
                out.push(("tool_calls", calls));
            }
        }
        let reasoning = field(m, "reasoning");
        if !reasoning.is_undefined() && !reasoning.is_none() {
            out.push(("reasoning", reasoning.clone()));
            out.push(("reasoning_content", reasoning));
        }
    } else if role_name == "tool" {
        let id = field(m, "tool_call_id");
        if !id.is_undefined() {
            out.push(("tool_call_id", id));
        }
    }
    let name = field(m, "name");
    if name.kind() == ValueKind::String {
        out.push(("name", name));
    }
    if role_name == "developer" {
        let tools = field(m, "tools");
        out.push((
            "tools",
            if tools.is_undefined() {
                Value::from(())
            } else {
                tools
            },
        ));
    }
    Ok(out.into_iter().collect())
}

/// The texts of a message's content: a string, null (no text) or a list of parts.
fn message_texts(content: &Value) -> Result<Vec<String>, String> {
    let mut texts = Vec::new();
    match content.kind() {
        ValueKind::Undefined | ValueKind::None => {}
        ValueKind::String => texts.push(content.as_str().unwrap_or_default().to_owned()),
        ValueKind::Seq => {
            for part in content.try_iter().map_err(|e| e.to_string())? {
                if let Some(s) = part.as_str() {
                    texts.push(s.to_owned());
                    continue;
                }
                if part.kind() != ValueKind::Map {
                    return Err("content parts must be strings or objects".into());
                }
                let ty = field(&part, "type");
                let key = match ty.as_str() {
                    Some("text" | "input_text" | "output_text") => "text",
                    Some("refusal") => "refusal",
                    Some("thinking") => "thinking",
                    Some(other) => return Err(format!("content part type `{other}`")),
                    None => return Err("content part without `type`".into()),
                };
                let text = field(&part, key);
                if let Some(s) = text.as_str() {
                    texts.push(s.to_owned());
                } else if !text.is_undefined() && !text.is_none() {
                    return Err(format!("content part `{key}` must be a string"));
                }
            }
        }
        _ => return Err("`content` must be a string, a list or null".into()),
    }
    Ok(texts)
}

/// Assistant `tool_calls` with `function.arguments` parsed from JSON (`{}` when empty).
fn parse_tool_calls(calls: &Value) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for call in calls.try_iter().map_err(|e| e.to_string())? {
        if call.kind() != ValueKind::Map {
            return Err("tool_calls entries must be objects".into());
        }
        let function = field(&call, "function");
        if function.kind() != ValueKind::Map {
            return Err("tool call without a `function` object".into());
        }
        let args = field(&function, "arguments");
        let args = if !args.is_true() {
            std::iter::empty::<(Value, Value)>().collect()
        } else if matches!(args.kind(), ValueKind::Map | ValueKind::Seq) {
            args
        } else if let Some(s) = args.as_str() {
            serde_json::from_str::<Value>(s)
                .map_err(|e| format!("tool call arguments are not JSON: {e}"))?
        } else {
            return Err("tool call arguments must be a JSON string".into());
        };
        let function = with_entry(&function, "arguments", args)?;
        out.push(with_entry(&call, "function", function)?);
    }
    Ok(out)
}

/// `map` with `key` set to `value`, keeping the key order.
fn with_entry(map: &Value, key: &str, value: Value) -> Result<Value, String> {
    let mut pairs: Vec<(Value, Value)> = Vec::new();
    let mut replaced = false;
    for k in map.try_iter().map_err(|e| e.to_string())? {
        if k.as_str() == Some(key) {
            pairs.push((k, value.clone()));
            replaced = true;
        } else {
            let v = map.get_item(&k).unwrap_or_default();
            pairs.push((k, v));
        }
    }
    if !replaced {
        pairs.push((Value::from(key), value));
    }
    Ok(pairs.into_iter().collect())
}

/// `[tool.model_dump() for tool in request.tools]`, or none.
fn model_dump_tools(tools: &Value) -> Result<Value, TokenizeError> {
    let bad = |m: &str| TokenizeError::BadRequest(m.to_owned());
    match tools.kind() {
        ValueKind::Undefined | ValueKind::None => return Ok(Value::from(())),
        ValueKind::Seq => {}
        _ => return Err(bad("`tools` must be a list")),
    }
    let mut out = Vec::new();
    for tool in iter_values(tools)? {
        if tool.kind() != ValueKind::Map {
            return Err(bad("tools must be objects"));
        }
        let ty = field(&tool, "type");
        if !(ty.is_undefined() || ty.is_none() || ty.as_str() == Some("function")) {
            return Err(bad("only tools of type `function` are supported"));
        }
        let function = field(&tool, "function");
        if function.kind() != ValueKind::Map || field(&function, "name").as_str().is_none() {
            return Err(bad("a tool needs a `function` with a string `name`"));
        }
        const DECLARED: [&str; 3] = ["name", "description", "parameters"];
        let mut f: Vec<(Value, Value)> = DECLARED
            .iter()
            .map(|k| {
                let v = field(&function, k);
                let v = if v.is_undefined() { Value::from(()) } else { v };
                (Value::from(*k), v)
            })
            .collect();
        for k in iter_values(&function)? {
            if !k.as_str().is_some_and(|s| DECLARED.contains(&s)) {
                let v = function.get_item(&k).unwrap_or_default();
                f.push((k, v));
            }
        }
        let mut t: Vec<(Value, Value)> = vec![
            (Value::from("type"), Value::from("function")),
            (Value::from("function"), f.into_iter().collect()),
        ];
        for k in iter_values(&tool)? {
            if !matches!(k.as_str(), Some("type" | "function")) {
                let v = tool.get_item(&k).unwrap_or_default();
                t.push((k, v));
            }
        }
        out.push(t.into_iter().collect::<Value>());
    }
    Ok(Value::from(out))
}

/// transformers' `continue_final_message`: the rendering ends right after the last message's
/// text.
fn cut_after_final_message(
    mut rendered: String,
    content: Option<Value>,
) -> Result<String, TokenizeError> {
    let bad = |m: &str| TokenizeError::BadRequest(m.to_owned());
    let content = content.ok_or_else(|| bad("continue_final_message without messages"))?;
    let last: String = if let Some(s) = content.as_str() {
        s.to_owned()
    } else if content.kind() == ValueKind::Seq {
        let parts: Vec<Value> = iter_values(&content)?.collect();
        parts
            .iter()
            .rev()
            .map(|p| field(p, "text"))
            .find(|t| !t.is_undefined())
            .map(|t| t.as_str().unwrap_or_default().to_owned())
            .ok_or_else(|| bad("continue_final_message: the final message has no text"))?
    } else {
        String::new()
    };
    let trimmed = last.trim();
    let at = rendered
        .rfind(trimmed)
        .ok_or_else(|| bad("continue_final_message: the final message is not in the rendering"))?;
    let keep = last.trim_start().len();
    let end = if rendered.get(at..at + keep) == Some(last.as_str()) {
        at + keep
    } else {
        at + trimmed.len()
    };
    rendered.truncate(end);
    Ok(rendered)
}

// ---------------------------------------------------------------------------------------------
// The template environment (transformers' ImmutableSandboxedEnvironment, as far as it matters).

fn template_env() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", py_tojson);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_function("strftime_now", |format: String| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        strftime(&format, secs)
    });
    env
}

/// Whether the template loops over a message's content (`{% for x in message['content'] %}`).
fn iterates_content(src: &str) -> bool {
    src.split("{%").skip(1).any(|tag| {
        let tag = tag.split("%}").next().unwrap_or_default();
        let tag = tag.trim_start_matches(['-', '+']).trim_start();
        let Some(rest) = tag.strip_prefix("for") else {
            return false;
        };
        let Some(pos) = rest.find(" in ") else {
            return false;
        };
        let expr = rest[pos + 4..].trim_end_matches(['-', '+']).trim();
        let expr = expr.split(['|', ' ']).next().unwrap_or_default();
        [".content", "['content']", "[\"content\"]"]
            .iter()
            .any(|suffix| expr.ends_with(suffix))
    })
}

/// Drops `{% generation %}` / `{% endgeneration %}` (transformers' assistant-mask markers).
fn without_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(open) = rest.find("{%") {
        let Some(close) = rest[open..].find("%}").map(|c| open + c + 2) else {
            break;
        };
        let inner = rest[open + 2..close - 2]
            .trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..open]);
        if !matches!(inner, "generation" | "endgeneration") {
            out.push_str(&rest[open..close]);
        }
        rest = &rest[close..];
    }
    out.push_str(rest);
    out
}

/// Python's `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`,
/// the `tojson` transformers installs.
fn py_tojson(value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let style = JsonStyle {
        indent: match indent {
            Some(v) if v.is_number() => Some(" ".repeat(usize::try_from(v).unwrap_or(0))),
            Some(v) if v.as_str().is_some() => v.as_str().map(str::to_owned),
            _ => None,
        },
        separators: match separators {
            Some(v) if v.kind() == ValueKind::Seq => {
                let item = v.get_item(&Value::from(0))?;
                let key = v.get_item(&Value::from(1))?;
                Some((
                    item.as_str().unwrap_or(", ").to_owned(),
                    key.as_str().unwrap_or(": ").to_owned(),
                ))
            }
            _ => None,
        },
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    style.write(&mut out, value, 0)?;
    Ok(Value::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<String>,
    separators: Option<(String, String)>,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl JsonStyle {
    fn item_sep(&self) -> &str {
        match (&self.separators, &self.indent) {
            (Some((item, _)), _) => item,
            (None, Some(_)) => ",",
            (None, None) => ", ",
        }
    }

    fn key_sep(&self) -> &str {
        self.separators.as_ref().map_or(": ", |(_, k)| k)
    }

    fn line(&self, out: &mut String, depth: usize) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    fn write(&self, out: &mut String, v: &Value, depth: usize) -> Result<(), minijinja::Error> {
        let unsupported = |what: &str| {
            minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: {what} is not JSON serializable"),
            )
        };
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
            ValueKind::Number => {
                let f = f64::try_from(v.clone()).map_err(|_| unsupported("this number"))?;
                out.push_str(&python_float_repr(f));
            }
            ValueKind::String => self.string(out, v.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep());
                    }
                    self.line(out, depth + 1);
                    self.write(out, item, depth + 1)?;
                }
                if !items.is_empty() {
                    self.line(out, depth);
                }
                out.push(']');
            }
            ValueKind::Map => {
                let mut entries: Vec<(String, Value)> = Vec::new();
                for k in v.try_iter()? {
                    let item = v.get_item(&k)?;
                    let key = match k.kind() {
                        ValueKind::String => k.as_str().unwrap_or_default().to_owned(),
                        ValueKind::None => "null".to_owned(),
                        ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).to_owned(),
                        ValueKind::Number if k.is_integer() => k.to_string(),
                        ValueKind::Number => {
                            python_float_repr(f64::try_from(k.clone()).unwrap_or(f64::NAN))
                        }
                        _ => return Err(unsupported("a key of this kind")),
                    };
                    entries.push((key, item));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                out.push('{');
                for (i, (key, item)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep());
                    }
                    self.line(out, depth + 1);
                    self.string(out, key);
                    out.push_str(self.key_sep());
                    self.write(out, item, depth + 1)?;
                }
                if !entries.is_empty() {
                    self.line(out, depth);
                }
                out.push('}');
            }
            ValueKind::Undefined => return Err(unsupported("Undefined")),
            _ => return Err(unsupported("this value")),
        }
        Ok(())
    }

    fn string(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// `repr(f)` as Python prints floats (Rust's `Debug` picks the same digits and notation; Python
/// writes the exponent with a sign and at least two digits).
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return (if f < 0.0 { "-Infinity" } else { "Infinity" }).into();
    }
    let s = format!("{f:?}");
    match s.split_once('e') {
        None => s,
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
    }
}

/// `strftime` for a UTC clock at `secs` since the epoch (the directives chat templates use).
fn strftime(format: &str, secs: u64) -> String {
    const MONTH: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const WEEKDAY: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = secs / 86_400;
    let (hour, minute, second) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    let mut year = 1970u64;
    let mut day_of_year = days;
    let leap = |y: u64| (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400);
    loop {
        let len = if leap(year) { 366 } else { 365 };
        if day_of_year < len {
            break;
        }
        day_of_year -= len;
        year += 1;
    }
    let mut month = 0usize;
    let mut day = day_of_year;
    for (i, len) in [
        31,
        if leap(year) { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ]
    .into_iter()
    .enumerate()
    {
        if day < len {
            month = i;
            break;
        }
        day -= len;
    }
    let weekday = WEEKDAY[(days % 7) as usize];
    let mut out = String::with_capacity(format.len() + 16);
    let mut it = format.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(d) = it.next() else {
            out.push('%');
            break;
        };
        let piece = match d {
            'Y' => year.to_string(),
            'y' => format!("{:02}", year % 100),
            'm' => format!("{:02}", month + 1),
            'd' => format!("{:02}", day + 1),
            'e' => format!("{:>2}", day + 1),
            'j' => format!("{:03}", day_of_year + 1),
            'H' => format!("{hour:02}"),
            'I' => format!("{:02}", if hour % 12 == 0 { 12 } else { hour % 12 }),
            'M' => format!("{minute:02}"),
            'S' => format!("{second:02}"),
            'p' => (if hour < 12 { "AM" } else { "PM" }).to_owned(),
            'B' => MONTH[month].to_owned(),
            'b' | 'h' => MONTH[month][..3].to_owned(),
            'A' => weekday.to_owned(),
            'a' => weekday[..3].to_owned(),
            'Z' => "UTC".to_owned(),
            'z' => "+0000".to_owned(),
            '%' => "%".to_owned(),
            other => format!("%{other}"),
        };
        out.push_str(&piece);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Added-token splitting and the piece cache.

/// A stretch of rendered text: an added token, or text between added tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Added(u32),
    Text(std::ops::Range<usize>),
}

#[derive(Debug, Clone)]
struct Added {
    content: String,
    id: u32,
    lstrip: bool,
    rstrip: bool,
}

/// Leftmost-longest matching of one set of added tokens.
#[derive(Debug, Clone)]
struct Matcher {
    /// Tokens by first byte, longest first.
    by_first: HashMap<u8, Vec<Added>>,
    /// Whether a token starts with this byte.
    starts: [bool; 256],
    /// The distinct first bytes when they are few and ASCII (then searched with `str::find`,
    /// which is vectorized, instead of byte by byte).
    firsts: Vec<char>,
}

impl Matcher {
    fn new(tokens: Vec<Added>) -> Self {
        let mut by_first: HashMap<u8, Vec<Added>> = HashMap::new();
        let mut starts = [false; 256];
        for t in tokens {
            if let Some(&b) = t.content.as_bytes().first() {
                starts[usize::from(b)] = true;
                by_first.entry(b).or_default().push(t);
            }
        }
        for list in by_first.values_mut() {
            list.sort_by_key(|t| std::cmp::Reverse(t.content.len()));
        }
        let firsts = if by_first.len() <= 4 && by_first.keys().all(u8::is_ascii) {
            by_first.keys().map(|&b| char::from(b)).collect()
        } else {
            Vec::new()
        };
        Self {
            by_first,
            starts,
            firsts,
        }
    }

    fn is_empty(&self) -> bool {
        self.by_first.is_empty()
    }

    /// Splits `text[range]` like `AddedVocabulary::find_matches`: leftmost-longest matches,
    /// `lstrip`/`rstrip` tokens taking the whitespace next to them.
    fn split_into(&self, text: &str, range: std::ops::Range<usize>, out: &mut Vec<Segment>) {
        let end = range.end;
        let hay = &text[..end];
        let bytes = hay.as_bytes();
        // Next occurrence of each first character (`None` once there is none left).
        let mut next: Vec<Option<usize>> = self
            .firsts
            .iter()
            .map(|&c| hay[range.start..].find(c).map(|p| range.start + p))
            .collect();
        let mut pos = range.start;
        let mut emitted = range.start;
        while pos < end {
            let at = if self.firsts.is_empty() {
                match bytes[pos..]
                    .iter()
                    .position(|&b| self.starts[usize::from(b)])
                {
                    Some(p) => pos + p,
                    None => break,
                }
            } else {
                for (slot, &c) in next.iter_mut().zip(&self.firsts) {
                    if slot.is_some_and(|n| n < pos) {
                        *slot = hay[pos..].find(c).map(|p| pos + p);
                    }
                }
                match next.iter().flatten().min() {
                    Some(&p) => p,
                    None => break,
                }
            };
            let hit = self.by_first.get(&bytes[at]).and_then(|list| {
                list.iter()
                    .find(|t| hay[at..].starts_with(t.content.as_str()))
            });
            let Some(tok) = hit else {
                pos = at + 1;
                continue;
            };
            let mut start = at;
            let mut stop = at + tok.content.len();
            if tok.lstrip {
                let before = &hay[emitted..at];
                start = at - (before.len() - before.trim_end().len());
            }
            if tok.rstrip {
                stop = end - hay[stop..].trim_start().len();
            }
            if emitted < start {
                out.push(Segment::Text(emitted..start));
            }
            out.push(Segment::Added(tok.id));
            emitted = stop;
            pos = stop;
        }
        if emitted < end {
            out.push(Segment::Text(emitted..end));
        }
    }
}

/// Splits text on added tokens exactly as `tokenizers` does before encoding each piece.
#[derive(Debug, Clone)]
struct Splitter {
    /// Tokens matched on the raw text (`normalized: false`).
    raw: Matcher,
    /// Tokens matched in the pieces left by `raw` (`normalized: true`, no normalizer).
    normalized: Matcher,
}

impl Splitter {
    /// `None` when pieces cannot be encoded independently of their position.
    fn for_tokenizer(tok: &Tokenizer, json: &serde_json::Value) -> Option<Self> {
        if tok.get_encode_special_tokens() || has_metaspace_first(json) {
            return None;
        }
        let has_normalizer = tok.get_normalizer().is_some();
        let mut raw = Vec::new();
        let mut normalized = Vec::new();
        for (id, t) in tok.get_added_tokens_decoder() {
            if t.content.is_empty() {
                continue;
            }
            if t.single_word || (t.normalized && has_normalizer) {
                return None;
            }
            let a = Added {
                content: t.content.clone(),
                id,
                lstrip: t.lstrip,
                rstrip: t.rstrip,
            };
            if t.normalized {
                normalized.push(a);
            } else {
                raw.push(a);
            }
        }
        Some(Self {
            raw: Matcher::new(raw),
            normalized: Matcher::new(normalized),
        })
    }

    fn split(&self, text: &str) -> Vec<Segment> {
        let mut first = Vec::new();
        self.raw.split_into(text, 0..text.len(), &mut first);
        if self.normalized.is_empty() {
            return first;
        }
        let mut out = Vec::with_capacity(first.len());
        for seg in first {
            match seg {
                Segment::Text(r) => self.normalized.split_into(text, r, &mut out),
                added => out.push(added),
            }
        }
        out
    }

    fn contents(&self) -> impl Iterator<Item = &str> {
        self.raw
            .by_first
            .values()
            .chain(self.normalized.by_first.values())
            .flatten()
            .map(|t| t.content.as_str())
    }
}

/// A `Metaspace` step that prepends its replacement only at the very start of the input.
fn has_metaspace_first(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Object(o) => {
            (o.get("type").and_then(serde_json::Value::as_str) == Some("Metaspace")
                && o.get("prepend_scheme").and_then(serde_json::Value::as_str) == Some("first"))
                || o.values().any(has_metaspace_first)
        }
        serde_json::Value::Array(a) => a.iter().any(has_metaspace_first),
        _ => false,
    }
}

/// Ids of text pieces by keyed hash: two generations, the young one rotated into the old one
/// when it holds half the entries or half the ids; a hit in the old one moves to the young.
struct PieceCache {
    hasher: RandomState,
    max_entries: usize,
    max_ids: usize,
    maps: Mutex<Generations>,
}

#[derive(Default)]
struct Generations {
    young: HashMap<u64, Arc<[u32]>>,
    young_ids: usize,
    old: HashMap<u64, Arc<[u32]>>,
}

impl PieceCache {
    fn new(max_entries: usize, max_ids: usize) -> Self {
        Self {
            hasher: RandomState::new(),
            max_entries,
            max_ids,
            maps: Mutex::new(Generations::default()),
        }
    }

    fn enabled(&self) -> bool {
        self.max_entries > 0 && self.max_ids > 0
    }

    fn key(&self, piece: &str) -> u64 {
        self.hasher.hash_one(piece)
    }

    fn len(&self) -> usize {
        let g = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        g.young.len() + g.old.len()
    }

    fn lookup(&self, segments: &[Segment], keys: &[u64]) -> Vec<Option<Arc<[u32]>>> {
        let mut g = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        segments
            .iter()
            .zip(keys)
            .map(|(s, k)| match s {
                Segment::Added(_) => None,
                Segment::Text(_) => {
                    if let Some(v) = g.young.get(k) {
                        return Some(v.clone());
                    }
                    let v = g.old.remove(k)?;
                    self.put(&mut g, *k, v.clone());
                    Some(v)
                }
            })
            .collect()
    }

    fn insert(&self, fresh: Vec<(u64, Arc<[u32]>)>) {
        if fresh.is_empty() {
            return;
        }
        let mut g = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in fresh {
            self.put(&mut g, k, v);
        }
    }

    fn put(&self, g: &mut Generations, key: u64, ids: Arc<[u32]>) {
        if ids.len() > self.max_ids / 2 {
            return; // Would flush everything else.
        }
        if g.young.len() + 1 > self.max_entries.div_ceil(2)
            || g.young_ids + ids.len() > self.max_ids / 2
        {
            g.old = std::mem::take(&mut g.young);
            g.young_ids = 0;
        }
        g.young_ids += ids.len();
        if let Some(prev) = g.young.insert(key, ids) {
            g.young_ids -= prev.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A temporary directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p =
                std::env::temp_dir().join(format!("agentlb-tok-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("mkdir");
            Self(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const CHATML: &str = "{%- if tools %}{{ '<|im_start|>tools\n' + tools | tojson + '<|im_end|>\n' }}{% endif %}\
{%- for message in messages %}\
{%- if message.role not in ['system', 'user', 'assistant', 'tool'] %}{{ raise_exception('bad role ' + message.role) }}{% endif %}\
{{- '<|im_start|>' + message['role'] + '\n' }}\
{%- if message.content is string %}{{ message.content }}{% endif %}\
{%- if message.tool_calls is defined %}{{ message.tool_calls | tojson }}{% endif %}\
{{- '<|im_end|>\n' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// A small byte-level tokenizer: chunks of up to 2 characters (newline runs apart), a
    /// vocabulary of all byte symbols plus every pair over "a-e" and space, and ChatML specials.
    fn tiny_tokenizer_json(extra_pre: Option<serde_json::Value>) -> serde_json::Value {
        let sym = |b: u8| -> char {
            // GPT-2 byte map, enough for the bytes used here.
            let keep = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
            if keep {
                char::from(b)
            } else {
                let n = (0..b)
                    .filter(|x| {
                        !((b'!'..=b'~').contains(x) || (0xA1..=0xAC).contains(x) || *x >= 0xAE)
                    })
                    .count() as u32;
                char::from_u32(256 + n).expect("char")
            }
        };
        let mut vocab = serde_json::Map::new();
        for b in 0..=255u8 {
            vocab.insert(sym(b).to_string(), json!(b));
        }
        vocab.insert("<unk>".into(), json!(999));
        let alpha = b" abcde";
        let mut id = 300;
        for &x in alpha {
            for &y in alpha {
                vocab.insert([sym(x), sym(y)].iter().collect(), json!(id));
                id += 1;
            }
        }
        let specials = [
            ("<|im_start|>", 1000, true, false, false),
            ("<|im_end|>", 1001, true, false, false),
            ("<s>", 1002, true, false, false),
            ("<sep>", 1003, false, true, true),
        ];
        let mut added = Vec::new();
        for (content, id, special, lstrip, rstrip) in specials {
            vocab.insert(content.into(), json!(id));
            added.push(json!({"id": id, "content": content, "single_word": false,
                "lstrip": lstrip, "rstrip": rstrip, "normalized": false, "special": special}));
        }
        let mut pre = vec![
            json!({"type": "Split", "pattern": {"Regex": "\\n+|[^\\n]{1,2}"}, "behavior": "Isolated", "invert": false}),
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}),
        ];
        if let Some(p) = extra_pre {
            pre = vec![p];
        }
        json!({
            "version": "1.0",
            "truncation": {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0},
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1002], "tokens": ["<s>"]}}
            },
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
            "model": {"type": "WordPiece", "unk_token": "<unk>", "continuing_subword_prefix": "",
                "max_input_chars_per_word": 100, "vocab": vocab}
        })
    }

    fn write_dir(tag: &str, tok: &serde_json::Value, config: Option<serde_json::Value>) -> TempDir {
        let d = TempDir::new(tag);
        std::fs::write(d.0.join("tokenizer.json"), tok.to_string()).expect("write");
        if let Some(c) = config {
            std::fs::write(d.0.join("tokenizer_config.json"), c.to_string()).expect("write");
        }
        d
    }

    fn tiny(tag: &str) -> (TempDir, ChatTokenizer) {
        let d = write_dir(
            tag,
            &tiny_tokenizer_json(None),
            Some(json!({
                "chat_template": CHATML,
                "bos_token": {"content": "<s>", "lstrip": false},
                "eos_token": "<|im_end|>",
            })),
        );
        let t = ChatTokenizer::from_dir(&d.0).expect("load");
        (d, t)
    }

    fn body(v: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&v).expect("json")
    }

    #[test]
    fn renders_messages_tools_and_parts() {
        let (_d, t) = tiny("render");
        assert!(t.uses_piece_cache());
        let req = json!({
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "ab"}, {"type": "text", "text": "cd"}]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"z\": 1, \"a\": 2.50}"}}]},
                {"role": "tool", "tool_call_id": "1", "content": "ok"}
            ],
            "tools": [{"type": "function", "function": {"name": "f", "description": "d", "strict": true}}]
        });
        let text = t.render_chat(&req).expect("render");
        assert_eq!(
            text,
            "<|im_start|>tools\n[{\"type\": \"function\", \"function\": {\"name\": \"f\", \"description\": \"d\", \"parameters\": null, \"strict\": true}}]<|im_end|>\n\
             <|im_start|>system\nbe brief<|im_end|>\n\
             <|im_start|>user\nab\ncd<|im_end|>\n\
             <|im_start|>assistant\n[{\"function\": {\"arguments\": {\"z\": 1, \"a\": 2.5}, \"name\": \"f\"}, \"id\": \"1\", \"type\": \"function\"}]<|im_end|>\n\
             <|im_start|>tool\nok<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        // The body's own key order is kept (json! sorts, a raw body does not).
        let raw = br#"{"messages":[{"role":"user","content":"x"}],"tools":[{"function":{"parameters":{"b":1,"a":2},"name":"g"},"type":"function"}]}"#;
        let text = t.render_chat_body(raw).expect("render");
        assert!(text.contains(r#"{"type": "function", "function": {"name": "g", "description": null, "parameters": {"b": 1, "a": 2}}}"#), "{text}");
        // Chat encodes without special tokens; the body may ask for them.
        let ids = t
            .prompt_tokens(&body(req.clone()), PromptKind::Chat)
            .expect("ids");
        assert_eq!(ids[0], 1000);
        assert_eq!(
            ids,
            t.encode_uncached(&t.render_chat(&req).expect("r"), false)
                .expect("e")
        );
        let mut with = req.clone();
        with["add_special_tokens"] = json!(true);
        let ids2 = t.prompt_tokens(&body(with), PromptKind::Chat).expect("ids");
        assert_eq!(ids2[0], 1002);
        assert_eq!(&ids2[1..], &ids[..]);
        // The truncation in tokenizer.json (max 8) is ignored, as vLLM ignores it.
        assert!(ids.len() > 8);
    }

    #[test]
    fn generation_prompt_kwargs_and_continue_final() {
        let (_d, t) = tiny("flags");
        let msgs =
            json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ab  "}]);
        let r = |extra: serde_json::Value| {
            let mut b = json!({"messages": msgs});
            for (k, v) in extra.as_object().expect("obj") {
                b[k] = v.clone();
            }
            t.render_chat(&b)
        };
        assert!(
            r(json!({}))
                .expect("r")
                .ends_with("<|im_start|>assistant\n")
        );
        let no_gen = r(json!({"add_generation_prompt": false})).expect("r");
        assert!(no_gen.ends_with("ab  <|im_end|>\n"));
        // kwargs override the request's own flag, as vLLM merges them.
        let kw = r(json!({"chat_template_kwargs": {"add_generation_prompt": false}})).expect("r");
        assert_eq!(kw, no_gen);
        let cont =
            r(json!({"add_generation_prompt": false, "continue_final_message": true})).expect("r");
        assert!(cont.ends_with("<|im_start|>assistant\nab  "), "{cont:?}");
        assert!(matches!(
            r(json!({"continue_final_message": true})),
            Err(TokenizeError::BadRequest(_))
        ));
        // raise_exception from the template.
        let bad = t.render_chat(&json!({"messages": [{"role": "wizard", "content": "x"}]}));
        assert!(
            matches!(bad, Err(TokenizeError::Template(ref m)) if m.contains("bad role wizard")),
            "{bad:?}"
        );
    }

    #[test]
    fn completions_prompts() {
        let (_d, t) = tiny("completions");
        let p = |v: serde_json::Value| t.prompt_tokens(&body(v), PromptKind::Completion);
        let text = p(json!({"prompt": "abc de"})).expect("text");
        assert_eq!(text[0], 1002, "BOS from the post-processor");
        assert_eq!(
            &text[1..],
            &t.encode_uncached("abc de", false).expect("e")[..]
        );
        assert_eq!(p(json!({"prompt": ["abc de"]})).expect("list"), text);
        assert_eq!(
            p(json!({"prompt": "abc de", "add_special_tokens": false})).expect("no bos"),
            text[1..].to_vec()
        );
        assert_eq!(p(json!({"prompt": [5, 6, 7]})).expect("ids"), vec![5, 6, 7]);
        assert_eq!(p(json!({"prompt": [[5, 6]]})).expect("ids"), vec![5, 6]);
        for bad in [
            json!({"prompt": []}),
            json!({"prompt": ["a", "b"]}),
            json!({"prompt": [1, "a"]}),
            json!({"prompt": [-1]}),
            json!({"prompt": 3}),
            json!({}),
        ] {
            assert!(
                matches!(p(bad.clone()), Err(TokenizeError::BadRequest(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            t.prompt_tokens(b"{not json", PromptKind::Completion),
            Err(TokenizeError::Json { .. })
        ));
        assert!(matches!(
            t.prompt_tokens(b"{\"messages\": 3}", PromptKind::Chat),
            Err(TokenizeError::BadRequest(_))
        ));
    }

    #[test]
    fn cached_equals_uncached() {
        let (_d, t) = tiny("cache");
        let uncached = ChatTokenizer::with_cache_bounds(&_d.0, 0, 0).expect("load");
        assert!(t.uses_piece_cache());
        assert!(!uncached.uses_piece_cache());
        // Pieces repeat across and within requests; <sep> strips spaces on both sides.
        let long = "abcde eddcba ".repeat(40);
        let texts = [
            format!("<s><|im_start|>user\n{long}<|im_end|>\n<|im_start|>user\n{long}<|im_end|>"),
            format!("x <sep>  y<sep>{long}  <sep><|im_start|><|im_end|>é€😀\n\n\n"),
            String::new(),
            "<|im_start|>".into(),
            format!("{long}<|im_start|>assistant\n{long}"),
        ];
        for round in 0..3 {
            for text in &texts {
                for special in [false, true] {
                    let a = t.encode(text, special).expect("cached");
                    let b = uncached.encode(text, special).expect("uncached");
                    let c = t.encode_uncached(text, special).expect("direct");
                    assert_eq!(a, b, "round {round} {text:?}");
                    assert_eq!(a, c);
                }
            }
        }
        assert!(t.cached_pieces() > 0);
        // A conversation whose messages repeat: same ids with and without the cache.
        let mut msgs = Vec::new();
        for i in 0..12 {
            msgs.push(json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": long.clone()}));
            let b = body(json!({"messages": msgs}));
            assert_eq!(
                t.prompt_tokens(&b, PromptKind::Chat).expect("cached"),
                uncached
                    .prompt_tokens(&b, PromptKind::Chat)
                    .expect("uncached")
            );
        }
    }

    #[test]
    fn cache_stays_bounded() {
        let (d, _) = tiny("bounded");
        let t = ChatTokenizer::with_cache_bounds(&d.0, 8, 1 << 20).expect("load");
        for i in 0..100 {
            let text = format!("<|im_start|>{}<|im_end|>", "ab".repeat(i + 1));
            assert_eq!(
                t.encode(&text, false).expect("e"),
                t.encode_uncached(&text, false).expect("u")
            );
            assert!(t.cached_pieces() <= 8);
        }
        let t = ChatTokenizer::with_cache_bounds(&d.0, 4096, 64).expect("load");
        for i in 0..50 {
            let text = format!("<|im_start|>{}", "abcd".repeat(i + 1));
            assert_eq!(
                t.encode(&text, false).expect("e"),
                t.encode_uncached(&text, false).expect("u")
            );
        }
        let g = t.cache.maps.lock().expect("lock");
        let held: usize = g
            .young
            .values()
            .chain(g.old.values())
            .map(|v| v.len())
            .sum();
        assert!(held <= 64, "{held}");
    }

    #[test]
    fn metaspace_first_is_encoded_whole() {
        let meta = json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": true});
        let d = write_dir("meta", &tiny_tokenizer_json(Some(meta)), None);
        let t = ChatTokenizer::from_dir(&d.0).expect("load");
        assert!(!t.uses_piece_cache());
        let text = "ab<|im_start|>ab cd";
        assert_eq!(
            t.encode(text, false).expect("e"),
            t.encode_uncached(text, false).expect("u")
        );
        // No chat template in this directory.
        let r = t.prompt_tokens(
            &body(json!({"messages": [{"role": "user", "content": "a"}]})),
            PromptKind::Chat,
        );
        assert!(matches!(r, Err(TokenizeError::Template(_))), "{r:?}");
    }

    #[test]
    fn template_sources_and_content_parts() {
        let tj = tiny_tokenizer_json(None);
        // A list of named templates; `tool_use` is taken when tools are given.
        let d = write_dir(
            "named",
            &tj,
            Some(json!({"chat_template": [
                {"name": "default", "template": "D{% for m in messages %}{{ m.content }}{% endfor %}"},
                {"name": "tool_use", "template": "T{{ tools | length }}"}
            ]})),
        );
        let t = ChatTokenizer::from_dir(&d.0).expect("load");
        let m = json!([{"role": "user", "content": "x"}]);
        assert_eq!(t.render_chat(&json!({"messages": m})).expect("r"), "Dx");
        let tools = json!([{"type": "function", "function": {"name": "f"}}]);
        assert_eq!(
            t.render_chat(&json!({"messages": m, "tools": tools}))
                .expect("r"),
            "T1"
        );
        // chat_template.jinja wins; a template looping over content gets parts.
        std::fs::write(
            d.0.join("chat_template.jinja"),
            "{% for m in messages %}{%- for p in m['content'] -%}[{{ p.type }}:{{ p.text }}]{%- endfor %}{% endfor %}{% generation %}{% endgeneration %}",
        )
        .expect("write");
        let t = ChatTokenizer::from_dir(&d.0).expect("load");
        let parts = json!([{"role": "user", "content": [{"type": "text", "text": "a"}, "b", {"type": "input_text", "text": "c"}]},
            {"role": "assistant", "content": "d"}, {"role": "user", "content": null}]);
        assert_eq!(
            t.render_chat(&json!({"messages": parts})).expect("r"),
            "[text:a][text:b][text:c][text:d]"
        );
        let img = json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]);
        assert!(matches!(
            t.render_chat(&json!({"messages": img})),
            Err(TokenizeError::BadRequest(_))
        ));
        assert!(iterates_content(
            "{%- for c in message.content | selectattr('type') %}"
        ));
        assert!(!iterates_content(CHATML));
    }

    #[test]
    fn python_json_and_time() {
        let env = template_env();
        let r = |src: &str, v: serde_json::Value| {
            env.render_str(src, minijinja::context! { v => Value::from_serialize(&v) })
                .expect("render")
        };
        let v = json!({"b": [1, 2.0, 1e20, 0.00001, "q\"\n\u{1}é"], "a": {}, "c": null, "d": true});
        assert_eq!(
            r("{{ v | tojson }}", v.clone()),
            r#"{"a": {}, "b": [1, 2.0, 1e+20, 1e-05, "q\"\n\u0001é"], "c": null, "d": true}"#
        );
        assert_eq!(
            r("{{ v.b | tojson(indent=2) }}", v.clone()),
            "[\n  1,\n  2.0,\n  1e+20,\n  1e-05,\n  \"q\\\"\\n\\u0001é\"\n]"
        );
        assert_eq!(
            r("{{ v.b[4] | tojson(ensure_ascii=true) }}", v.clone()),
            r#""q\"\n\u0001\u00e9""#
        );
        assert_eq!(
            r(
                "{{ v | tojson(separators=[',', ':'], sort_keys=true) }}",
                json!({"z": 1, "y": [1, 2]})
            ),
            r#"{"y":[1,2],"z":1}"#
        );
        assert_eq!(python_float_repr(0.1), "0.1");
        assert_eq!(python_float_repr(1e16), "1e+16");
        assert_eq!(python_float_repr(123.0), "123.0");
        assert_eq!(python_float_repr(-2.5e-7), "-2.5e-07");
        assert_eq!(
            strftime("%d %b %Y, %A %H:%M:%S %j", 1_709_251_199),
            "29 Feb 2024, Thursday 23:59:59 060"
        );
        assert_eq!(strftime("%Y-%m-%d %I%p", 951_782_400), "2000-02-29 12AM");
        assert!(
            env.render_str("{{ strftime_now('%Y') }}", ())
                .expect("r")
                .starts_with("20")
        );
        assert_eq!(
            without_generation_tags(
                "a{%- generation -%}b{% endgeneration %}{% if x %}c{% endif %}"
            ),
            "ab{% if x %}c{% endif %}"
        );
    }

    #[test]
    fn hf_cache_layout() {
        let root = TempDir::new("hub");
        let tj = tiny_tokenizer_json(None).to_string();
        let repo = root.0.join("models--org--model");
        for rev in ["aaa", "bbb"] {
            let snap = repo.join("snapshots").join(rev);
            std::fs::create_dir_all(&snap).expect("mkdir");
            std::fs::write(snap.join("tokenizer.json"), &tj).expect("write");
            let cfg = json!({"chat_template": format!("{rev}{{{{ messages | length }}}}")});
            std::fs::write(snap.join("tokenizer_config.json"), cfg.to_string()).expect("write");
        }
        let one = json!({"messages": [{"role": "user", "content": "x"}]});
        // refs/main picks the revision.
        std::fs::create_dir_all(repo.join("refs")).expect("mkdir");
        std::fs::write(repo.join("refs/main"), "aaa\n").expect("write");
        let t = ChatTokenizer::from_hf_cache("org/model", Some(&root.0)).expect("load");
        assert_eq!(t.render_chat(&one).expect("r"), "aaa1");
        // Without refs/main: the newest snapshot.
        std::fs::remove_file(repo.join("refs/main")).expect("rm");
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(repo.join("snapshots/aaa/touch"), "").expect("touch");
        let t = ChatTokenizer::from_hf_cache("org/model", Some(&root.0)).expect("load");
        assert_eq!(t.render_chat(&one).expect("r"), "aaa1");
        // Errors: unknown model, dangling ref.
        assert!(matches!(
            ChatTokenizer::from_hf_cache("org/other", Some(&root.0)),
            Err(TokenizeError::NotFound(_))
        ));
        std::fs::write(repo.join("refs/main"), "ccc").expect("write");
        assert!(matches!(
            ChatTokenizer::from_hf_cache("org/model", Some(&root.0)),
            Err(TokenizeError::NotFound(_))
        ));
        assert!(matches!(
            ChatTokenizer::from_dir(&root.0),
            Err(TokenizeError::Io { .. })
        ));
    }

    #[test]
    fn shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTokenizer>();
        let (_d, t) = tiny("threads");
        let t = Arc::new(t);
        let text = format!("<|im_start|>user\n{}<|im_end|>", "abc ".repeat(50));
        let want = t.encode_uncached(&text, false).expect("u");
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (t, text, want) = (t.clone(), text.clone(), want.clone());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        assert_eq!(t.encode(&text, false).expect("e"), want);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
    }
}
