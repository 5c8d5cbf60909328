//! HF mode: render and tokenize with a Hugging Face tokenizer directory, as vLLM does.
//!
//! `vllm-sim --tokenizer <dir>` loads `<dir>/tokenizer.json` (the `tokenizers` format) and
//! `<dir>/tokenizer_config.json` (`chat_template`, `bos_token`, `eos_token`, ...; a
//! `<dir>/chat_template.jinja` wins over the config's template) and makes every instance compute
//! prompt token ids the way vLLM's OpenAI server does:
//! - **chat** (`/v1/chat/completions`, `/tokenize` with `messages`, `/v1/responses`): the
//!   messages are normalized as vLLM's `parse_chat_messages` does (text parts joined with `"\n"`
//!   for string-content templates or kept as `{"type":"text"}` parts for templates that loop
//!   over `message['content']`; `null` content is `""`; `tool_calls` arguments parsed from their
//!   JSON string; `tool_call_id`, `name`, `reasoning` kept), `tools` as pydantic's `model_dump`
//!   gives them, then the chat template is rendered the way transformers' `apply_chat_template`
//!   renders it (`trim_blocks`, `lstrip_blocks`, Python-`json.dumps` `tojson`, `raise_exception`,
//!   `strftime_now`, the special tokens, `add_generation_prompt`, `continue_final_message`,
//!   `chat_template_kwargs`) and the text is encoded **without** special tokens (the template
//!   carries BOS) unless the request sets `add_special_tokens`;
//! - **completions**: a string prompt is encoded **with** special tokens (the post-processor
//!   adds BOS); token-id prompts are used as they are.
//!
//! Generated text must re-tokenize to the ids the engine reports (a multi-turn conversation
//! sends the answer back and must hit the blocks it filled), so output tokens are drawn from a
//! set chosen at load time and checked: with the stand-in written by [`export_standin`] they are
//! 3-character strings over the simulator's text alphabet (see below), with another tokenizer
//! they are vocabulary entries that decode to a space and a lowercase word.
//!
//! # The stand-in tokenizer ([`export_standin`], `vllm-sim export-tokenizer <dir>`)
//! A deterministic HF tokenizer that any HF-compatible implementation can load:
//! - `pre_tokenizer`: `Split` on the regex `\n{1,3}|[^\n]{1,3}` (isolated), then `ByteLevel`
//!   without its own regex. Each piece of text between added tokens is cut, left to right, into
//!   chunks of at most 3 characters (newline runs apart), so about 3 characters per token and no
//!   dependence on what follows a chunk.
//! - `model`: `WordPiece` with an empty `continuing_subword_prefix` (greedy longest match inside
//!   a chunk) whose vocabulary is the 256 ByteLevel byte symbols (ids 0..=255, id = byte), every
//!   2-character (ids 256..) and 3-character (ids 1097..) string over the 29-character alphabet
//!   ` ,.a-z` in ByteLevel form (space is `Ġ`), and `ĊĊ`, `ĊĊĊ`; any byte string encodes.
//! - added special tokens `<|begin_of_text|>` 128000, `<|end_of_text|>` 128001,
//!   `<|start_header_id|>` 128006, `<|end_header_id|>` 128007, `<|eot_id|>` 128009; a
//!   `TemplateProcessing` post-processor that puts BOS first with `add_special_tokens`; a
//!   `ByteLevel` decoder.
//! - `tokenizer_config.json`: `bos_token`, `eos_token` (`<|eot_id|>`) and a Llama-3-shaped
//!   [`STANDIN_CHAT_TEMPLATE`].
//!
//! Generated tokens are 3-character alphabet strings: their concatenation is cut at the same
//! 3-character boundaries, and the answer follows the generation prompt's `"\n\n"` (its own
//! chunk) and is followed by `<|eot_id|>` when sent back, so it re-tokenizes to the same ids.
//!
//! # Piece cache
//! `tokenizers` first cuts a text on its added tokens (special tokens and the like, matched
//! leftmost-longest, `lstrip`/`rstrip` tokens taking the whitespace next to them) and then
//! normalizes, pre-tokenizes and encodes each piece in between on its own, so equal pieces give
//! equal ids. [`HfTokenizer::encode`] cuts the text the same way (its own splitter, checked at
//! load time against the library's `AddedVocabulary::extract_and_normalize`, which is ~100 times
//! slower) and takes each piece's ids from a cache keyed by the piece's exact text, or encodes the
//! piece alone and caches it; the post-processor (`add_special_tokens`) runs on the joined ids.
//! The long messages an agent resends with every request are therefore encoded once: a ~40 KB
//! chat prompt takes ~25 ms of CPU to encode cold and ~0.1 ms (mostly rendering) once its
//! messages are cached. The cache keeps two generations, each of at most 4096 pieces, 2 Mi ids
//! and 8 MiB of text (so at most 8192 pieces, 16 MiB of ids, 16 MiB of text); a full young
//! generation becomes the old one (dropping the previous old one), and a piece found in the old
//! one moves to the young one. The tokenizer, and so the cache, is shared by every instance of
//! the process: one mutex, held to look up and to insert, never while encoding.
//!
//! The cache is off (every text encoded whole) for tokenizers where a piece's ids could depend
//! on its position: a `Metaspace` pre-tokenizer with `prepend_scheme: "first"` (it prefixes only
//! the piece at offset 0), `single_word` added tokens, `normalized` added tokens under a
//! normalizer (matched in normalized text), `encode_special_tokens`, two added tokens with the
//! same text, an added token starting with whitespace next to an `rstrip` one. A self-check at
//! load time turns it off too if, on texts made of the tokenizer's added tokens with text and
//! whitespace around them, the splitter disagrees with the library or piecewise encoding with
//! whole encoding (with and without special tokens).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use rustc_hash::FxHashMap;
use serde_json::json;
use thiserror::Error;
use tokenizers::{Encoding, NormalizerWrapper, OffsetReferential, OffsetType, Token};

use crate::tokenizer::{ALPHABET, ChatTurn, TokenText, fnv1a64, mix64};

/// Errors of HF mode: loading a tokenizer directory, rendering a request, encoding.
#[derive(Debug, Error)]
pub enum HfError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A JSON file is malformed.
    #[error("{}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// The `tokenizers` library refused the tokenizer or the text.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to compile or render (including `raise_exception`).
    #[error("chat template: {0}")]
    Template(String),
    /// The request cannot be rendered (what vLLM answers with 400).
    #[error("{0}")]
    Request(String),
}

/// Special token ids of the stand-in (Llama-3 ids).
pub const STANDIN_SPECIAL_TOKENS: [(&str, u32); 5] = [
    ("<|begin_of_text|>", 128_000),
    ("<|end_of_text|>", 128_001),
    ("<|start_header_id|>", 128_006),
    ("<|end_header_id|>", 128_007),
    ("<|eot_id|>", 128_009),
];

/// The stand-in's text alphabet (sorted bytes): every 2- and 3-character string over it is one
/// token.
pub const STANDIN_ALPHABET: &[u8; 29] = b" ,.abcdefghijklmnopqrstuvwxyz";

/// The stand-in's pre-tokenizer regex: newline runs and other text in chunks of 1 to 3 chars.
pub const STANDIN_SPLIT_REGEX: &str = "\\n{1,3}|[^\\n]{1,3}";

/// The stand-in's chat template (Llama-3 shaped).
pub const STANDIN_CHAT_TEMPLATE: &str = "{{- bos_token }}\n\
{%- if tools %}\n\
    {{- '<|start_header_id|>tools<|end_header_id|>\\n\\n' + tools | tojson + '<|eot_id|>' }}\n\
{%- endif %}\n\
{%- for message in messages %}\n\
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n\
    {%- if message['content'] is string %}\n\
        {{- message['content'] }}\n\
    {%- endif %}\n\
    {%- if message['tool_calls'] is defined and message['tool_calls'] %}\n\
        {{- message['tool_calls'] | tojson }}\n\
    {%- endif %}\n\
    {{- '<|eot_id|>' }}\n\
{%- endfor %}\n\
{%- if add_generation_prompt %}\n\
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n\
{%- endif %}\n";

const N_ALPHA: usize = STANDIN_ALPHABET.len();
const FIRST_PAIR_ID: usize = 256;
const FIRST_TRIPLE_ID: usize = FIRST_PAIR_ID + N_ALPHA * N_ALPHA;
const NEWLINES_ID: usize = FIRST_TRIPLE_ID + N_ALPHA * N_ALPHA * N_ALPHA;

/// GPT-2's reversible byte → printable character map (the `ByteLevel` alphabet).
fn byte_symbol(b: u8) -> char {
    let printable = |x: u8| (b'!'..=b'~').contains(&x) || (0xA1..=0xAC).contains(&x) || x >= 0xAE;
    if printable(b) {
        return char::from(b);
    }
    // Non-printable bytes get 256, 257, ... in byte order.
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).unwrap_or('?')
}

fn byte_level(s: &str) -> String {
    s.bytes().map(byte_symbol).collect()
}

/// Index of an alphabet byte, or `usize::MAX`.
fn alpha_index(b: u8) -> usize {
    STANDIN_ALPHABET
        .iter()
        .position(|&a| a == b)
        .unwrap_or(usize::MAX)
}

/// `tokenizer.json` of the stand-in.
pub fn standin_tokenizer_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        vocab.insert(byte_symbol(b).to_string(), json!(b));
    }
    let sym = |i: usize| byte_symbol(STANDIN_ALPHABET[i]);
    for a in 0..N_ALPHA {
        for b in 0..N_ALPHA {
            let s: String = [sym(a), sym(b)].iter().collect();
            vocab.insert(s, json!(FIRST_PAIR_ID + a * N_ALPHA + b));
            for c in 0..N_ALPHA {
                let s: String = [sym(a), sym(b), sym(c)].iter().collect();
                vocab.insert(s, json!(FIRST_TRIPLE_ID + (a * N_ALPHA + b) * N_ALPHA + c));
            }
        }
    }
    vocab.insert(byte_level("\n\n"), json!(NEWLINES_ID));
    vocab.insert(byte_level("\n\n\n"), json!(NEWLINES_ID + 1));
    let mut added = Vec::new();
    for (content, id) in STANDIN_SPECIAL_TOKENS {
        vocab.insert(content.to_string(), json!(id));
        added.push(json!({
            "id": id,
            "content": content,
            "single_word": false,
            "lstrip": false,
            "rstrip": false,
            "normalized": false,
            "special": true,
        }));
    }
    let bos = STANDIN_SPECIAL_TOKENS[0].0;
    let bos_id = STANDIN_SPECIAL_TOKENS[0].1;
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": STANDIN_SPLIT_REGEX},
                    "behavior": "Isolated",
                    "invert": false,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": false,
                    "trim_offsets": false,
                    "use_regex": false,
                },
            ],
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {
                bos: {"id": bos, "ids": [bos_id], "tokens": [bos]},
            },
        },
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": false,
            "trim_offsets": false,
            "use_regex": false,
        },
        "model": {
            "type": "WordPiece",
            "unk_token": "<unk>",
            "continuing_subword_prefix": "",
            "max_input_chars_per_word": 100,
            "vocab": vocab,
        },
    })
}

/// `tokenizer_config.json` of the stand-in.
pub fn standin_tokenizer_config() -> serde_json::Value {
    let mut decoder = serde_json::Map::new();
    for (content, id) in STANDIN_SPECIAL_TOKENS {
        decoder.insert(
            id.to_string(),
            json!({
                "content": content,
                "lstrip": false,
                "normalized": false,
                "rstrip": false,
                "single_word": false,
                "special": true,
            }),
        );
    }
    json!({
        "added_tokens_decoder": decoder,
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "chat_template": STANDIN_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131_072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
}

/// Writes the stand-in's `tokenizer.json` and `tokenizer_config.json` into `dir` (created if
/// missing). The output is deterministic.
pub fn export_standin(dir: &Path) -> Result<(), HfError> {
    std::fs::create_dir_all(dir).map_err(|source| HfError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for (name, value) in [
        ("tokenizer.json", standin_tokenizer_json()),
        ("tokenizer_config.json", standin_tokenizer_config()),
    ] {
        let path = dir.join(name);
        let mut text = serde_json::to_vec_pretty(&value).map_err(|source| HfError::Json {
            path: path.clone(),
            source,
        })?;
        text.push(b'\n');
        std::fs::write(&path, text).map_err(|source| HfError::Io { path, source })?;
    }
    Ok(())
}

/// The tokens generated text is made of.
enum OutputVocab {
    /// The stand-in: 3 characters from [`ALPHABET`]; ids indexed by alphabet positions.
    Chunks(Vec<u32>),
    /// Another tokenizer: single-token words (` foo`), with their ids.
    Words(Vec<(u32, TokenText)>),
}

impl OutputVocab {
    /// Text and id of the `j`-th generated token for output seed `seed`.
    fn token(&self, seed: u64, j: usize) -> (u32, TokenText) {
        let r = mix64(seed ^ (j as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        match self {
            OutputVocab::Chunks(ids) => {
                let chars = [
                    ALPHABET[(r & 31) as usize],
                    ALPHABET[((r >> 5) & 31) as usize],
                    ALPHABET[((r >> 10) & 31) as usize],
                ];
                let idx = chars
                    .iter()
                    .fold(0usize, |acc, &c| acc * N_ALPHA + alpha_index(c));
                (
                    ids.get(idx).copied().unwrap_or(0),
                    TokenText::from_ascii(&chars),
                )
            }
            OutputVocab::Words(words) => words
                .get((r % words.len().max(1) as u64) as usize)
                .copied()
                .unwrap_or((0, TokenText::from_ascii(b" "))),
        }
    }
}

/// A loaded HF tokenizer with its chat template (see the module documentation).
pub struct HfTokenizer {
    dir: PathBuf,
    tok: tokenizers::Tokenizer,
    env: Environment<'static>,
    /// Names of the compiled templates (`default`, `tool_use`, ...).
    templates: Vec<String>,
    /// `bos_token`, `eos_token`, ... as transformers passes them to the template.
    specials: Vec<(String, String)>,
    /// The template loops over `message['content']` (vLLM's "openai" content format).
    openai_content: bool,
    output: OutputVocab,
    fingerprint: u64,
    /// How `tokenizers` cuts a text on the added tokens; `None` when this tokenizer's pieces
    /// cannot be encoded on their own (see the module documentation).
    splitter: Option<AddedSplitter>,
    /// Ids of the pieces between added tokens; `None` (every text encoded whole) when
    /// `splitter` is.
    pieces: Option<PieceCache>,
}

impl fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("dir", &self.dir)
            .field("templates", &self.templates)
            .field("openai_content", &self.openai_content)
            .field("fingerprint", &self.fingerprint)
            .field("piece_cache", &self.piece_cache_enabled())
            .finish_non_exhaustive()
    }
}

/// Two tokenizers are equal when they were loaded from identical files.
impl PartialEq for HfTokenizer {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
    }
}

fn read(path: &Path) -> Result<Vec<u8>, HfError> {
    std::fs::read(path).map_err(|source| HfError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A special token given as a string or as an `AddedToken` object.
fn token_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl HfTokenizer {
    /// Loads `tokenizer.json`, `tokenizer_config.json` (optional) and `chat_template.jinja`
    /// (optional) from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, HfError> {
        let tj_path = dir.join("tokenizer.json");
        let tj = read(&tj_path)?;
        let mut tok = tokenizers::Tokenizer::from_bytes(&tj)
            .map_err(|e| HfError::Tokenizer(format!("{}: {e}", tj_path.display())))?;
        // vLLM tokenizes without truncation or padding whatever the file says.
        tok.with_truncation(None)
            .map_err(|e| HfError::Tokenizer(e.to_string()))?;
        tok.with_padding(None);

        let cfg_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = if cfg_path.exists() {
            serde_json::from_slice(&read(&cfg_path)?).map_err(|source| HfError::Json {
                path: cfg_path.clone(),
                source,
            })?
        } else {
            serde_json::Value::Null
        };
        let mut sources: Vec<(String, String)> = Vec::new();
        match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => sources.push(("default".into(), s.clone())),
            Some(serde_json::Value::Array(list)) => {
                for t in list {
                    if let (Some(name), Some(src)) = (
                        t.get("name").and_then(|v| v.as_str()),
                        t.get("template").and_then(|v| v.as_str()),
                    ) {
                        sources.push((name.to_string(), src.to_string()));
                    }
                }
            }
            _ => {}
        }
        let jinja_path = dir.join("chat_template.jinja");
        if jinja_path.exists() {
            let src = String::from_utf8_lossy(&read(&jinja_path)?).into_owned();
            sources.retain(|(n, _)| n != "default");
            sources.push(("default".into(), src));
        }
        let mut specials = Vec::new();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            if let Some(t) = config.get(key).and_then(token_text) {
                specials.push((key.to_string(), t));
            }
        }

        let mut env = environment();
        let mut templates = Vec::new();
        let mut openai_content = false;
        let mut fp = fnv1a64(&tj);
        for (name, src) in sources {
            let src = strip_generation_tags(&src);
            fp = mix64(fp ^ fnv1a64(name.as_bytes()) ^ fnv1a64(src.as_bytes()).rotate_left(7));
            if name == "default" {
                openai_content = loops_over_content(&src);
            }
            env.add_template_owned(name.clone(), src)
                .map_err(|e| HfError::Template(format!("{name}: {e:#}")))?;
            templates.push(name);
        }
        for (k, v) in &specials {
            fp = mix64(fp ^ fnv1a64(k.as_bytes()) ^ fnv1a64(v.as_bytes()).rotate_left(13));
        }
        let mut hf = Self {
            dir: dir.to_path_buf(),
            tok,
            env,
            templates,
            specials,
            openai_content,
            output: OutputVocab::Chunks(Vec::new()),
            fingerprint: fp,
            splitter: None,
            pieces: None,
        };
        let splitter = match hf.piecewise_obstacle() {
            Some(reason) => Err(reason),
            None => {
                AddedSplitter::new(&hf.tok).and_then(|s| hf.piecewise_self_check(&s).map(|()| s))
            }
        };
        match splitter {
            Ok(s) => {
                hf.splitter = Some(s);
                hf.pieces = Some(PieceCache::new(PIECE_LIMITS));
            }
            Err(reason) => tracing::info!(
                dir = %hf.dir.display(),
                %reason,
                "HF tokenizer: piece cache off, every prompt is encoded whole"
            ),
        }
        hf.output = hf.output_vocab()?;
        Ok(hf)
    }

    /// The directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Token ids of `text`; `add_special_tokens` runs the post-processor (BOS for the stand-in).
    ///
    /// Goes through the piece cache when this tokenizer allows it (see the module
    /// documentation); the ids are those of [`HfTokenizer::encode_uncached`] either way.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, HfError> {
        match (&self.splitter, &self.pieces) {
            (Some(splitter), Some(cache)) if !text.is_empty() => {
                self.encode_pieces(splitter, Some(cache), text, add_special_tokens)
            }
            _ => self.encode_uncached(text, add_special_tokens),
        }
    }

    /// Token ids of `text` encoded whole by the `tokenizers` library, without the piece cache.
    pub fn encode_uncached(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, HfError> {
        let enc = self
            .tok
            .encode_fast(text, add_special_tokens)
            .map_err(|e| HfError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Whether [`HfTokenizer::encode`] uses the piece cache with this tokenizer.
    pub fn piece_cache_enabled(&self) -> bool {
        self.splitter.is_some() && self.pieces.is_some()
    }

    /// `text` cut by the library itself (`AddedVocabulary::extract_and_normalize`, without
    /// normalizing): added tokens and the text between them (empty pieces left out). What
    /// [`AddedSplitter`] must reproduce, at a fraction of the cost; `None` if an offset does not
    /// fall on a character boundary of `text` (never expected).
    fn library_pieces<'a>(&self, text: &'a str) -> Option<Vec<Piece<'a>>> {
        let split = self
            .tok
            .get_added_vocabulary()
            .extract_and_normalize(None::<&NormalizerWrapper>, text);
        let mut pieces = Vec::new();
        for (_, (start, end), tokens) in
            split.get_splits(OffsetReferential::Original, OffsetType::Byte)
        {
            match tokens {
                Some(tokens) => pieces.extend(tokens.iter().map(|t| Piece::Added(t.id))),
                None if start < end => pieces.push(Piece::Text(text.get(start..end)?)),
                None => {}
            }
        }
        Some(pieces)
    }

    /// Encodes `text` piece by piece: cached ids for pieces found in `cache`, the others encoded
    /// alone (and added to `cache`); then the post-processor if `add_special_tokens`.
    fn encode_pieces(
        &self,
        splitter: &AddedSplitter,
        cache: Option<&PieceCache>,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, HfError> {
        let Some(pieces) = splitter.split(text) else {
            return self.encode_uncached(text, add_special_tokens);
        };
        let texts: Vec<&str> = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Text(t) => Some(*t),
                Piece::Added(_) => None,
            })
            .collect();
        let mut hits = match cache {
            Some(cache) => cache.lookup(&texts),
            None => vec![None; texts.len()],
        }
        .into_iter();
        let mut ids = Vec::with_capacity(text.len() / 3 + 8);
        // Pieces encoded by this call (a text may repeat a piece the cache does not hold yet).
        let mut fresh: FxHashMap<&str, Arc<[u32]>> = FxHashMap::default();
        for piece in &pieces {
            match *piece {
                Piece::Added(id) => ids.push(id),
                Piece::Text(t) => match hits.next().flatten().or_else(|| fresh.get(t).cloned()) {
                    Some(known) => ids.extend_from_slice(&known),
                    None => {
                        let piece_ids: Arc<[u32]> = self.encode_uncached(t, false)?.into();
                        ids.extend_from_slice(&piece_ids);
                        fresh.insert(t, piece_ids);
                    }
                },
            }
        }
        if let Some(cache) = cache {
            cache.insert(fresh);
        }
        if add_special_tokens {
            ids = self.post_process(ids)?;
        }
        Ok(ids)
    }

    /// The post-processor with `add_special_tokens` applied to the ids of a text (BOS first for
    /// the stand-in), as `encode(text, true)` applies it after encoding.
    fn post_process(&self, ids: Vec<u32>) -> Result<Vec<u32>, HfError> {
        let tokens = ids
            .into_iter()
            .map(|id| Token::new(id, String::new(), (0, 0)))
            .collect();
        let enc = self
            .tok
            .post_process(Encoding::from_tokens(tokens, 0), None, true)
            .map_err(|e| HfError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Why the pieces between added tokens cannot be encoded on their own with this tokenizer,
    /// judged from its configuration (see the module documentation).
    fn piecewise_obstacle(&self) -> Option<String> {
        if self.tok.get_encode_special_tokens() {
            return Some("encode_special_tokens is set".into());
        }
        let pre = serde_json::to_value(self.tok.get_pre_tokenizer()).unwrap_or_default();
        if metaspace_prepends_first(&pre) {
            return Some("a Metaspace pre-tokenizer with prepend_scheme \"first\"".into());
        }
        let has_normalizer = self.tok.get_normalizer().is_some();
        let added = self.tok.get_added_tokens_decoder();
        let any_rstrip = added.values().any(|t| t.rstrip);
        let mut added: Vec<_> = added.into_iter().collect();
        added.sort_by_key(|(id, _)| *id);
        let mut contents = std::collections::HashSet::new();
        for (id, t) in added {
            if !contents.insert(t.content.clone()) {
                return Some(format!(
                    "added token {id} {:?} is not the only one with its text",
                    t.content
                ));
            }
            if t.single_word {
                return Some(format!("added token {id} {:?} is single_word", t.content));
            }
            if t.normalized && has_normalizer {
                return Some(format!(
                    "added token {id} {:?} is matched in normalized text",
                    t.content
                ));
            }
            if any_rstrip && t.content.starts_with(char::is_whitespace) {
                return Some(format!(
                    "added token {id} {:?} starts with whitespace an rstrip token may take",
                    t.content
                ));
            }
        }
        None
    }

    /// Load-time check, on texts made of the tokenizer's added tokens and text around them,
    /// that `splitter` cuts them as the library does and that piecewise encoding gives the ids
    /// of whole encoding, with and without special tokens.
    fn piecewise_self_check(&self, splitter: &AddedSplitter) -> Result<(), String> {
        let mut added: Vec<_> = self.tok.get_added_tokens_decoder().into_iter().collect();
        added.sort_by_key(|(id, _)| *id);
        // Every token with whitespace or normalization rules, and the first 64 others.
        let (flagged, plain): (Vec<_>, Vec<_>) = added
            .into_iter()
            .filter(|(_, t)| !t.content.is_empty())
            .partition(|(_, t)| t.lstrip || t.rstrip || t.normalized);
        let tokens: Vec<String> = flagged
            .into_iter()
            .chain(plain.into_iter().take(64))
            .map(|(_, t)| t.content)
            .collect();
        let mut body = String::new();
        for t in &tokens {
            body.push_str(&format!(
                "{t}user\n\n  Hello, wörld 12.\t{t}{t} x {t} \n {t}\n\n"
            ));
        }
        let probes = [
            format!("  Hi there,  é 7\n\n{body} the end. "),
            format!("{body}tail"),
            " \n plain text only, no added tokens \n\n ".to_string(),
        ];
        for probe in &probes {
            if splitter.split(probe) != self.library_pieces(probe) {
                return Err(
                    "self-check: added tokens are not split as the library splits them".into(),
                );
            }
            for special in [false, true] {
                let whole = self.encode_uncached(probe, special);
                let pieces = self.encode_pieces(splitter, None, probe, special);
                match (whole, pieces) {
                    (Ok(w), Ok(p)) if w == p => {}
                    (Ok(_), Ok(_)) => {
                        return Err(format!(
                            "self-check: piecewise encoding differs from whole encoding \
                             (add_special_tokens: {special})"
                        ));
                    }
                    (Err(e), _) | (_, Err(e)) => return Err(format!("self-check: {e}")),
                }
            }
        }
        Ok(())
    }

    /// Vocabulary strings of `ids` (`/tokenize`'s `token_strs`).
    pub fn token_strs(&self, ids: &[u32]) -> Vec<Option<String>> {
        ids.iter().map(|&id| self.tok.id_to_token(id)).collect()
    }

    /// Text of `ids` (vLLM's `/detokenize`: `tokenizer.decode(ids)`, special tokens kept); an id
    /// outside the vocabulary is an error naming it.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, HfError> {
        if let Some(bad) = ids.iter().find(|&&id| self.tok.id_to_token(id).is_none()) {
            return Err(HfError::Request(format!(
                "Token id {bad} is out of vocabulary"
            )));
        }
        self.tok
            .decode(ids, skip_special_tokens)
            .map_err(|e| HfError::Tokenizer(e.to_string()))
    }

    /// Prompt ids of a chat request body (`/v1/chat/completions` or `/tokenize` with
    /// `messages`): rendered, then encoded without special tokens unless the body sets
    /// `add_special_tokens: true`.
    pub fn chat_request_tokens(&self, body: &[u8]) -> Result<Vec<u32>, HfError> {
        let req: Value = serde_json::from_slice(body)
            .map_err(|e| HfError::Request(format!("JSON decode error: {e}")))?;
        let text = self.render_request(&req)?;
        let special = attr(&req, "add_special_tokens").is_true();
        self.encode(&text, special)
    }

    /// Renders the chat template for a request object (`messages`, `tools`,
    /// `add_generation_prompt`, `continue_final_message`, `chat_template_kwargs`, `documents`).
    pub fn render_request(&self, req: &Value) -> Result<String, HfError> {
        let messages = attr(req, "messages");
        if messages.kind() != ValueKind::Seq {
            return Err(HfError::Request("`messages` must be a list".into()));
        }
        let add_generation_prompt = flag(req, "add_generation_prompt", true)?;
        let continue_final = flag(req, "continue_final_message", false)?;
        let conversation = self.conversation(&messages)?;
        let tools = tool_dicts(&attr(req, "tools"))?;
        let kwargs = attr(req, "chat_template_kwargs");
        let documents = attr(req, "documents");
        self.render(
            conversation,
            tools,
            present(&documents).then_some(documents),
            add_generation_prompt,
            continue_final,
            &kwargs,
        )
    }

    /// Renders and encodes the simulator's own conversations (the Responses API).
    pub fn render_turns(
        &self,
        turns: &[ChatTurn<'_>],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, HfError> {
        let msgs: Vec<Value> = turns
            .iter()
            .map(|t| {
                let mut m: Vec<(&str, Value)> = vec![("role", Value::from(t.role))];
                if let Some(c) = t.content {
                    m.push(("content", Value::from_serialize(c)));
                }
                if let Some(tc) = t.tool_calls {
                    m.push(("tool_calls", Value::from_serialize(tc)));
                }
                Value::from_iter(m)
            })
            .collect();
        let conversation = self.conversation(&Value::from(msgs))?;
        let tools = match tools {
            Some(t) => tool_dicts(&Value::from_serialize(t))?,
            None => None,
        };
        let text = self.render(
            conversation,
            tools,
            None,
            add_generation_prompt,
            false,
            &Value::UNDEFINED,
        )?;
        self.encode(&text, false)
    }

    /// vLLM's `parse_chat_messages`: one conversation message per request message.
    fn conversation(&self, messages: &Value) -> Result<Vec<Value>, HfError> {
        let iter = messages
            .try_iter()
            .map_err(|e| HfError::Request(e.to_string()))?;
        iter.enumerate()
            .map(|(i, m)| {
                self.conversation_message(&m)
                    .map_err(|e| HfError::Request(format!("messages[{i}]: {e}")))
            })
            .collect()
    }

    fn conversation_message(&self, m: &Value) -> Result<Value, String> {
        if m.kind() != ValueKind::Map {
            return Err("a message must be an object".into());
        }
        let role = attr(m, "role");
        let Some(role_s) = role.as_str() else {
            return Err("`role` must be a string".into());
        };
        let role_s = role_s.to_string();
        let texts = content_texts(&attr(m, "content"))?;
        let content = if self.openai_content {
            Value::from(
                texts
                    .into_iter()
                    .map(|t| Value::from_iter([("type", Value::from("text")), ("text", t)]))
                    .collect::<Vec<_>>(),
            )
        } else {
            let joined: Vec<String> = texts
                .iter()
                .map(|t| t.as_str().unwrap_or_default().to_string())
                .collect();
            Value::from(joined.join("\n"))
        };
        let mut out: Vec<(&str, Value)> = vec![("role", role), ("content", content)];
        match role_s.as_str() {
            "assistant" => {
                let calls = attr(m, "tool_calls");
                if present(&calls)
                    && let Some(calls) = assistant_tool_calls(&calls)?
                {
                    out.push(("tool_calls", calls));
                }
                let reasoning = attr(m, "reasoning");
                if present(&reasoning) {
                    out.push(("reasoning", reasoning.clone()));
                    out.push(("reasoning_content", reasoning));
                }
            }
            "tool" => {
                let id = attr(m, "tool_call_id");
                if !id.is_undefined() {
                    out.push(("tool_call_id", id));
                }
            }
            _ => {}
        }
        let name = attr(m, "name");
        if name.kind() == ValueKind::String {
            out.push(("name", name));
        }
        if role_s == "developer" {
            let tools = attr(m, "tools");
            out.push((
                "tools",
                if tools.is_undefined() {
                    Value::from(())
                } else {
                    tools
                },
            ));
        }
        Ok(Value::from_iter(out))
    }

    fn render(
        &self,
        conversation: Vec<Value>,
        tools: Option<Value>,
        documents: Option<Value>,
        add_generation_prompt: bool,
        continue_final: bool,
        kwargs: &Value,
    ) -> Result<String, HfError> {
        if add_generation_prompt && continue_final {
            return Err(HfError::Request(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
                    .into(),
            ));
        }
        let name = if tools.is_some() && self.templates.iter().any(|n| n == "tool_use") {
            "tool_use"
        } else if self.templates.iter().any(|n| n == "default") {
            "default"
        } else {
            return Err(HfError::Template(
                "the tokenizer has no chat template (tokenizer_config.json `chat_template` or \
                 chat_template.jinja)"
                    .into(),
            ));
        };
        let last_content = conversation.last().map(|m| attr(m, "content"));
        let mut ctx: Vec<(String, Value)> = self
            .specials
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        ctx.push(("messages".into(), Value::from(conversation)));
        ctx.push(("tools".into(), tools.unwrap_or(Value::from(()))));
        ctx.push(("documents".into(), documents.unwrap_or(Value::from(()))));
        ctx.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        if kwargs.kind() == ValueKind::Map
            && let Ok(keys) = kwargs.try_iter()
        {
            for k in keys {
                let Some(key) = k.as_str() else { continue };
                if key == "messages" {
                    continue;
                }
                let v = kwargs.get_item(&k).unwrap_or(Value::UNDEFINED);
                match ctx.iter_mut().find(|(n, _)| n == key) {
                    Some(slot) => slot.1 = v,
                    None => ctx.push((key.to_string(), v)),
                }
            }
        }
        let tmpl = self
            .env
            .get_template(name)
            .map_err(|e| HfError::Template(e.to_string()))?;
        let rendered = tmpl
            .render(Value::from_iter(ctx))
            .map_err(|e| HfError::Template(format!("{e:#}")))?;
        if !continue_final {
            return Ok(rendered);
        }
        truncate_after_final(rendered, last_content.as_ref())
    }

    /// Text and id of the `j`-th generated token of a request with output seed `seed`.
    pub fn output_token(&self, seed: u64, j: usize) -> (u32, TokenText) {
        self.output.token(seed, j)
    }

    /// Chooses the output tokens and checks that their concatenation re-tokenizes to them.
    fn output_vocab(&self) -> Result<OutputVocab, HfError> {
        let chunks: Option<Vec<u32>> = (0..N_ALPHA * N_ALPHA * N_ALPHA)
            .map(|i| {
                let s = [
                    STANDIN_ALPHABET[i / (N_ALPHA * N_ALPHA)],
                    STANDIN_ALPHABET[(i / N_ALPHA) % N_ALPHA],
                    STANDIN_ALPHABET[i % N_ALPHA],
                ];
                let s: String = s.iter().map(|&b| byte_symbol(b)).collect();
                self.tok.token_to_id(&s)
            })
            .collect();
        if let Some(ids) = chunks {
            let candidate = OutputVocab::Chunks(ids);
            if self.retokenizes(&candidate) {
                return Ok(candidate);
            }
        }
        // Any other tokenizer: single-token words " xyz" (as a BPE vocabulary has plenty of).
        let mut vocab: Vec<(String, u32)> = self.tok.get_vocab(false).into_iter().collect();
        vocab.sort_by_key(|&(_, id)| id);
        let mut words = Vec::new();
        for (_, id) in vocab {
            let Ok(text) = self.tok.decode(&[id], false) else {
                continue;
            };
            let b = text.as_bytes();
            let wordlike = (3..=13).contains(&b.len())
                && b[0] == b' '
                && b[1..].iter().all(u8::is_ascii_lowercase);
            if wordlike && self.encode(&text, false).is_ok_and(|e| e == [id]) {
                words.push((id, TokenText::from_ascii(b)));
                if words.len() == 4096 {
                    break;
                }
            }
        }
        if words.is_empty() {
            return Err(HfError::Tokenizer(
                "found no vocabulary entries usable as generated text".into(),
            ));
        }
        let candidate = OutputVocab::Words(words);
        if !self.retokenizes(&candidate) {
            tracing::warn!(
                dir = %self.dir.display(),
                "generated text may not re-tokenize to the generated ids with this tokenizer"
            );
        }
        Ok(candidate)
    }

    /// Whether 300 generated tokens, after the generation prompt's `"\n\n"`, re-tokenize to
    /// the same ids.
    fn retokenizes(&self, vocab: &OutputVocab) -> bool {
        let mut text = String::new();
        let mut ids = Vec::new();
        for j in 0..300 {
            let (id, t) = vocab.token(0x5eed, j);
            ids.push(id);
            text.push_str(t.as_str());
        }
        let Ok(alone) = self.encode(&text, false) else {
            return false;
        };
        let Ok(nl) = self.encode("\n\n", false) else {
            return false;
        };
        let Ok(after) = self.encode(&format!("\n\n{text}"), false) else {
            return false;
        };
        alone == ids && after.len() == nl.len() + ids.len() && after.ends_with(&ids)
    }
}

/// A stretch of text as `tokenizers` encodes it: an added token, or text between added tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece<'a> {
    Added(u32),
    Text(&'a str),
}

/// Whether a (serialized) pre-tokenizer has a `Metaspace` step that prepends its replacement
/// only to the piece at offset 0.
fn metaspace_prepends_first(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Object(o) => {
            let first = o.get("type").and_then(|t| t.as_str()) == Some("Metaspace")
                && o.get("prepend_scheme").and_then(|p| p.as_str()) == Some("first");
            first || o.values().any(metaspace_prepends_first)
        }
        serde_json::Value::Array(a) => a.iter().any(metaspace_prepends_first),
        _ => false,
    }
}

/// An added token as the splitter matches it.
#[derive(Debug, Clone)]
struct SplitToken {
    content: Box<str>,
    id: u32,
    lstrip: bool,
    rstrip: bool,
}

/// One set of added tokens matched as `tokenizers`' `AddedVocabulary::find_matches` matches it:
/// leftmost, then longest; an `lstrip` token takes the whitespace before it (not before the end
/// of the previous match), an `rstrip` token the whitespace after it.
#[derive(Debug, Clone)]
struct TokenSet {
    /// Tokens by first byte, longest first (`by_first[b]` is empty when none starts with `b`).
    by_first: Vec<Vec<SplitToken>>,
    /// The first byte of every token, when they all share one ASCII byte (`<` for the usual
    /// special tokens): candidates are then found with `str::find`, which is vectorized.
    only_first: Option<char>,
}

impl TokenSet {
    fn new(tokens: Vec<SplitToken>) -> Self {
        let mut by_first = vec![Vec::new(); 256];
        for t in tokens {
            if let Some(&b) = t.content.as_bytes().first() {
                by_first[usize::from(b)].push(t);
            }
        }
        for list in &mut by_first {
            list.sort_by_key(|t| std::cmp::Reverse(t.content.len()));
        }
        let firsts: Vec<usize> = (0..256).filter(|&b| !by_first[b].is_empty()).collect();
        let only_first = match firsts[..] {
            [b] => u8::try_from(b).ok().filter(u8::is_ascii).map(char::from),
            _ => None,
        };
        Self {
            by_first,
            only_first,
        }
    }

    fn is_empty(&self) -> bool {
        self.by_first.iter().all(Vec::is_empty)
    }

    /// The next position at or after `pos` where a token may start.
    fn candidate(&self, text: &str, pos: usize) -> Option<usize> {
        if let (Some(c), Some(rest)) = (self.only_first, text.get(pos..)) {
            return rest.find(c).map(|i| pos + i);
        }
        text.as_bytes()
            .get(pos..)?
            .iter()
            .position(|&b| !self.by_first[usize::from(b)].is_empty())
            .map(|i| pos + i)
    }

    /// Appends the pieces of `text` (added tokens and the non-empty text between them);
    /// `None` if a cut falls inside a character (not expected).
    fn split_into<'a>(&self, text: &'a str, out: &mut Vec<Piece<'a>>) -> Option<()> {
        let bytes = text.as_bytes();
        // End of the last match (with the whitespace it took) and where to look next.
        let (mut done, mut pos) = (0, 0);
        while let Some(at) = self.candidate(text, pos) {
            let found = self.by_first[usize::from(bytes[at])]
                .iter()
                .find(|t| bytes[at..].starts_with(t.content.as_bytes()));
            let Some(tok) = found else {
                pos = at + 1;
                continue;
            };
            let mut start = at;
            let mut stop = at + tok.content.len();
            if tok.lstrip {
                start = done + text.get(done..at)?.trim_end().len();
            }
            if tok.rstrip {
                stop = text.len() - text.get(stop..)?.trim_start().len();
            }
            if done < start {
                out.push(Piece::Text(text.get(done..start)?));
            }
            out.push(Piece::Added(tok.id));
            // No token starts with whitespace when one is `rstrip` (else the cache is off), so
            // the search may resume after the whitespace taken.
            (done, pos) = (stop, stop);
        }
        if done < text.len() {
            out.push(Piece::Text(text.get(done..)?));
        }
        Some(())
    }
}

/// Cuts text on a tokenizer's added tokens as `tokenizers` does before encoding: first the
/// tokens matched in the raw text (`normalized: false`), then, in the text between them, the
/// `normalized` ones (only used without a normalizer, so matched in the same text).
#[derive(Debug, Clone)]
struct AddedSplitter {
    raw: TokenSet,
    normalized: TokenSet,
}

impl AddedSplitter {
    fn new(tok: &tokenizers::Tokenizer) -> Result<Self, String> {
        let (mut raw, mut normalized) = (Vec::new(), Vec::new());
        for (id, t) in tok.get_added_tokens_decoder() {
            if t.content.is_empty() {
                continue;
            }
            if tok.token_to_id(&t.content) != Some(id) {
                return Err(format!(
                    "added token {id} {:?} encodes to another id",
                    t.content
                ));
            }
            let st = SplitToken {
                content: t.content.as_str().into(),
                id,
                lstrip: t.lstrip,
                rstrip: t.rstrip,
            };
            if t.normalized {
                normalized.push(st);
            } else {
                raw.push(st);
            }
        }
        Ok(Self {
            raw: TokenSet::new(raw),
            normalized: TokenSet::new(normalized),
        })
    }

    /// The pieces of `text`; `None` if a cut falls inside a character (not expected).
    fn split<'a>(&self, text: &'a str) -> Option<Vec<Piece<'a>>> {
        let mut pieces = Vec::new();
        self.raw.split_into(text, &mut pieces)?;
        if self.normalized.is_empty() {
            return Some(pieces);
        }
        let mut out = Vec::with_capacity(pieces.len());
        for p in pieces {
            match p {
                Piece::Text(t) => self.normalized.split_into(t, &mut out)?,
                added => out.push(added),
            }
        }
        Some(out)
    }
}

/// Bounds of one generation of the [`PieceCache`] (it keeps two).
#[derive(Debug, Clone, Copy)]
struct PieceLimits {
    /// Pieces.
    entries: usize,
    /// Token ids, all pieces together.
    ids: usize,
    /// Bytes of piece text (the keys), all pieces together.
    bytes: usize,
}

/// The sim's bounds: at most 8192 pieces, 4 Mi ids (16 MiB) and 16 MiB of text in all.
const PIECE_LIMITS: PieceLimits = PieceLimits {
    entries: 4096,
    ids: 2 << 20,
    bytes: 8 << 20,
};

/// Pieces and their ids, with running totals.
#[derive(Default)]
struct Generation {
    map: FxHashMap<Box<str>, Arc<[u32]>>,
    ids: usize,
    bytes: usize,
}

impl Generation {
    fn fits(&self, limits: PieceLimits, ids: usize, bytes: usize) -> bool {
        self.map.len() < limits.entries
            && self.ids + ids <= limits.ids
            && self.bytes + bytes <= limits.bytes
    }
}

/// Two generations: pieces go into `young`; a full `young` becomes `old`, dropping the
/// previous `old`; a piece found in `old` moves to `young`.
#[derive(Default)]
struct Generations {
    young: Generation,
    old: Generation,
}

/// Ids of text pieces keyed by their exact text, bounded by [`PieceLimits`] per generation.
/// `Sync`: one mutex, taken once per lookup and once per insertion, never while encoding.
struct PieceCache {
    limits: PieceLimits,
    gens: Mutex<Generations>,
}

impl PieceCache {
    fn new(limits: PieceLimits) -> Self {
        Self {
            limits,
            gens: Mutex::new(Generations::default()),
        }
    }

    /// The cached ids of each piece, if any.
    fn lookup(&self, pieces: &[&str]) -> Vec<Option<Arc<[u32]>>> {
        let mut g = self.gens.lock().unwrap_or_else(PoisonError::into_inner);
        pieces
            .iter()
            .map(|&p| {
                if let Some(ids) = g.young.map.get(p) {
                    return Some(ids.clone());
                }
                let (key, ids) = g.old.map.remove_entry(p)?;
                g.old.ids -= ids.len();
                g.old.bytes -= key.len();
                self.put(&mut g, key, ids.clone());
                Some(ids)
            })
            .collect()
    }

    /// Caches freshly encoded pieces.
    fn insert<'a>(&self, fresh: impl IntoIterator<Item = (&'a str, Arc<[u32]>)>) {
        let mut fresh = fresh.into_iter().peekable();
        if fresh.peek().is_none() {
            return;
        }
        let mut g = self.gens.lock().unwrap_or_else(PoisonError::into_inner);
        for (piece, ids) in fresh {
            if !g.young.map.contains_key(piece) {
                self.put(&mut g, piece.into(), ids);
            }
        }
    }

    /// Adds a piece absent from `young`, rotating the generations when `young` is full.
    fn put(&self, g: &mut Generations, key: Box<str>, ids: Arc<[u32]>) {
        if !Generation::default().fits(self.limits, ids.len(), key.len()) {
            return; // Larger than a whole generation.
        }
        if !g.young.fits(self.limits, ids.len(), key.len()) {
            g.old = std::mem::take(&mut g.young);
        }
        g.young.ids += ids.len();
        g.young.bytes += key.len();
        g.young.map.insert(key, ids);
    }

    /// Pieces, ids and text bytes held (both generations).
    #[cfg(test)]
    fn totals(&self) -> (usize, usize, usize) {
        let g = self.gens.lock().unwrap_or_else(PoisonError::into_inner);
        (
            g.young.map.len() + g.old.map.len(),
            g.young.ids + g.old.ids,
            g.young.bytes + g.old.bytes,
        )
    }
}

fn attr(v: &Value, key: &str) -> Value {
    v.get_attr(key).unwrap_or(Value::UNDEFINED)
}

fn present(v: &Value) -> bool {
    !v.is_undefined() && !v.is_none()
}

fn flag(req: &Value, key: &str, default: bool) -> Result<bool, HfError> {
    let v = attr(req, key);
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => Ok(default),
        ValueKind::Bool => Ok(v.is_true()),
        _ => Err(HfError::Request(format!("`{key}` must be a boolean"))),
    }
}

/// The text of a message's content, part by part (vLLM's `_parse_chat_message_content_parts`).
fn content_texts(content: &Value) -> Result<Vec<Value>, String> {
    match content.kind() {
        ValueKind::Undefined | ValueKind::None => Ok(Vec::new()),
        ValueKind::String => Ok(vec![content.clone()]),
        ValueKind::Seq => {
            let mut out = Vec::new();
            for part in content.try_iter().map_err(|e| e.to_string())? {
                match part.kind() {
                    ValueKind::String => out.push(part),
                    ValueKind::Map => {
                        let kind = attr(&part, "type");
                        let field = match kind.as_str() {
                            Some("text" | "input_text" | "output_text") => "text",
                            Some("refusal") => "refusal",
                            Some("thinking") => "thinking",
                            Some(other) => {
                                return Err(format!(
                                    "content parts of type `{other}` are not supported by vllm-sim"
                                ));
                            }
                            None => return Err("a content part needs a `type`".into()),
                        };
                        let text = attr(&part, field);
                        match text.kind() {
                            ValueKind::String => out.push(text),
                            ValueKind::Undefined | ValueKind::None => {}
                            _ => {
                                return Err(format!(
                                    "`{field}` of a content part must be a string"
                                ));
                            }
                        }
                    }
                    _ => return Err("a content part must be a string or an object".into()),
                }
            }
            Ok(out)
        }
        _ => Err("`content` must be a string, a list of parts or null".into()),
    }
}

/// vLLM's `_postprocess_messages` for one assistant message: no empty lists, `arguments` as
/// JSON values (`{}` when empty).
fn assistant_tool_calls(calls: &Value) -> Result<Option<Value>, String> {
    if calls.kind() != ValueKind::Seq {
        return Ok(Some(calls.clone()));
    }
    let mut out = Vec::new();
    for call in calls.try_iter().map_err(|e| e.to_string())? {
        if call.kind() != ValueKind::Map {
            return Err("assistant tool_calls entries must be objects.".into());
        }
        let function = attr(&call, "function");
        if function.kind() != ValueKind::Map {
            return Err("a tool call needs a `function` object".into());
        }
        let args = attr(&function, "arguments");
        let parsed = if !args.is_true() {
            Value::from_iter(Vec::<(Value, Value)>::new())
        } else if matches!(args.kind(), ValueKind::Map | ValueKind::Seq) {
            args
        } else if let Some(s) = args.as_str() {
            serde_json::from_str::<Value>(s)
                .map_err(|e| format!("tool call arguments are not valid JSON: {e}"))?
        } else {
            return Err("tool call `arguments` must be a JSON string".into());
        };
        let function = replace_entry(&function, "arguments", parsed)?;
        out.push(replace_entry(&call, "function", function)?);
    }
    Ok((!out.is_empty()).then(|| Value::from(out)))
}

/// A copy of map `m` with `key` set to `v` (in place when present, last otherwise).
fn replace_entry(m: &Value, key: &str, v: Value) -> Result<Value, String> {
    let mut entries: Vec<(Value, Value)> = Vec::new();
    let mut done = false;
    for k in m.try_iter().map_err(|e| e.to_string())? {
        if k.as_str() == Some(key) {
            entries.push((k, v.clone()));
            done = true;
        } else {
            let item = m.get_item(&k).unwrap_or(Value::UNDEFINED);
            entries.push((k, item));
        }
    }
    if !done {
        entries.push((Value::from(key), v));
    }
    Ok(Value::from_iter(entries))
}

/// `[tool.model_dump() for tool in request.tools]`: `type`, then `function` with `name`,
/// `description` and `parameters` (null when absent) first, then any extra fields as sent.
fn tool_dicts(tools: &Value) -> Result<Option<Value>, HfError> {
    if !present(tools) {
        return Ok(None);
    }
    if tools.kind() != ValueKind::Seq {
        return Err(HfError::Request("`tools` must be a list".into()));
    }
    let bad = |m: &str| HfError::Request(m.to_string());
    let mut out = Vec::new();
    for tool in tools.try_iter().map_err(|e| bad(&e.to_string()))? {
        if tool.kind() != ValueKind::Map {
            return Err(bad("a tool must be an object"));
        }
        let kind = attr(&tool, "type");
        if present(&kind) && kind.as_str() != Some("function") {
            return Err(bad("tools[].type must be \"function\""));
        }
        let function = attr(&tool, "function");
        if function.kind() != ValueKind::Map || attr(&function, "name").as_str().is_none() {
            return Err(bad("tools[].function needs a string `name`"));
        }
        let mut f: Vec<(Value, Value)> = Vec::new();
        for key in ["name", "description", "parameters"] {
            let v = attr(&function, key);
            f.push((
                Value::from(key),
                if v.is_undefined() { Value::from(()) } else { v },
            ));
        }
        for k in function.try_iter().map_err(|e| bad(&e.to_string()))? {
            if !matches!(k.as_str(), Some("name" | "description" | "parameters")) {
                let v = function.get_item(&k).unwrap_or(Value::UNDEFINED);
                f.push((k, v));
            }
        }
        let mut t: Vec<(Value, Value)> = vec![
            (Value::from("type"), Value::from("function")),
            (Value::from("function"), Value::from_iter(f)),
        ];
        for k in tool.try_iter().map_err(|e| bad(&e.to_string()))? {
            if !matches!(k.as_str(), Some("type" | "function")) {
                let v = tool.get_item(&k).unwrap_or(Value::UNDEFINED);
                t.push((k, v));
            }
        }
        out.push(Value::from_iter(t));
    }
    Ok(Some(Value::from(out)))
}

/// transformers' `continue_final_message`: cut the rendering right after the final message's
/// text.
fn truncate_after_final(rendered: String, content: Option<&Value>) -> Result<String, HfError> {
    let fail = |m: &str| HfError::Request(m.to_string());
    let Some(content) = content else {
        return Err(fail("continue_final_message needs at least one message"));
    };
    let final_text: String = match content.kind() {
        ValueKind::String => content.as_str().unwrap_or_default().to_string(),
        ValueKind::Seq => {
            let parts: Vec<Value> = content
                .try_iter()
                .map_err(|e| fail(&e.to_string()))?
                .collect();
            let text = parts.iter().rev().find_map(|p| {
                let t = attr(p, "text");
                (!t.is_undefined()).then(|| t.as_str().unwrap_or_default().to_string())
            });
            text.ok_or_else(|| {
                fail(
                    "continue_final_message is set but we could not find any text to continue in \
                     the final message!",
                )
            })?
        }
        _ => String::new(),
    };
    let stripped = final_text.trim();
    let Some(loc) = rendered.rfind(stripped) else {
        return Err(fail(
            "continue_final_message is set but the final message does not appear in the chat \
             after applying the chat template!",
        ));
    };
    let lstripped_len = final_text.trim_start().len();
    let end = if rendered.get(loc..loc + lstripped_len) == Some(final_text.as_str()) {
        loc + lstripped_len
    } else {
        loc + stripped.len()
    };
    let mut rendered = rendered;
    rendered.truncate(end);
    Ok(rendered)
}

/// Whether a template iterates over `message['content']` (vLLM then passes content as a list of
/// parts: the "openai" content format); otherwise content is a string.
fn loops_over_content(src: &str) -> bool {
    let mut rest = src;
    while let Some(start) = rest.find("{%") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("%}") else { break };
        let tag = after[..end].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        if let Some(head) = tag.strip_prefix("for ")
            && let Some((_, iterable)) = head.split_once(" in ")
        {
            let iterable = iterable.split(['|']).next().unwrap_or_default();
            let iterable = iterable.split(" if ").next().unwrap_or_default().trim();
            if iterable.ends_with("['content']")
                || iterable.ends_with("[\"content\"]")
                || iterable.ends_with(".content")
            {
                return true;
            }
        }
        rest = &after[end + 2..];
    }
    false
}

/// Removes transformers' `{% generation %}` / `{% endgeneration %}` markers (assistant masks; no
/// effect on the text), which minijinja does not know.
fn strip_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(start) = rest.find("{%") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("%}") else { break };
        let tag = after[..end].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        if tag != "generation" && tag != "endgeneration" {
            out.push_str(&rest[start..start + 2 + end + 2]);
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

/// The template environment transformers builds: `trim_blocks`, `lstrip_blocks`, loop controls,
/// Python string/dict methods, `tojson` as `json.dumps`, `raise_exception`, `strftime_now`.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<Value, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |fmt: String| strftime_utc(&fmt, unix_now()));
    env
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `json.dumps(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, JinjaError> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(n.max(0) as usize)),
            (_, Some(s)) => Some(s.to_string()),
            _ => return Err(JinjaError::new(ErrorKind::InvalidOperation, "bad indent")),
        },
    };
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([a, b]) => (a.clone(), b.clone()),
        Some(_) => {
            return Err(JinjaError::new(
                ErrorKind::InvalidOperation,
                "separators must be a pair",
            ));
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let fmt = PyJson {
        indent,
        item_sep,
        key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        depth: 0,
        nonempty: false,
    };
    let mut buf = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
    let written = if sort_keys.unwrap_or(false) {
        // serde_json's own map type is sorted by key, as `sort_keys` wants.
        serde_json::to_value(value)
            .and_then(|sorted| serde::Serialize::serialize(&sorted, &mut ser))
    } else {
        serde::Serialize::serialize(value, &mut ser)
    };
    written.map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(
        String::from_utf8_lossy(&buf).into_owned(),
    ))
}

/// A `serde_json` formatter that writes what Python's `json.dumps` writes.
struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    depth: usize,
    nonempty: bool,
}

impl PyJson {
    fn newline<W: ?Sized + std::io::Write>(&self, w: &mut W) -> std::io::Result<()> {
        if let Some(ind) = &self.indent {
            w.write_all(b"\n")?;
            for _ in 0..self.depth {
                w.write_all(ind.as_bytes())?;
            }
        }
        Ok(())
    }
}

impl serde_json::ser::Formatter for PyJson {
    fn write_f64<W: ?Sized + std::io::Write>(&mut self, w: &mut W, v: f64) -> std::io::Result<()> {
        w.write_all(py_float(v).as_bytes())
    }
    fn write_f32<W: ?Sized + std::io::Write>(&mut self, w: &mut W, v: f32) -> std::io::Result<()> {
        w.write_all(py_float(f64::from(v)).as_bytes())
    }
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        if !self.ensure_ascii || fragment.is_ascii() {
            return w.write_all(fragment.as_bytes());
        }
        for c in fragment.chars() {
            if c.is_ascii() {
                w.write_all(&[c as u8])?;
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    write!(w, "\\u{u:04x}")?;
                }
            }
        }
        Ok(())
    }
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.depth += 1;
        self.nonempty = false;
        w.write_all(b"[")
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.depth -= 1;
        if self.nonempty {
            self.newline(w)?;
        }
        self.nonempty = true;
        w.write_all(b"]")
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if !first {
            w.write_all(self.item_sep.as_bytes())?;
        }
        self.newline(w)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        self.nonempty = true;
        Ok(())
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.depth += 1;
        self.nonempty = false;
        w.write_all(b"{")
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.depth -= 1;
        if self.nonempty {
            self.newline(w)?;
        }
        self.nonempty = true;
        w.write_all(b"}")
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if !first {
            w.write_all(self.item_sep.as_bytes())?;
        }
        self.newline(w)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(self.key_sep.as_bytes())
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        self.nonempty = true;
        Ok(())
    }
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form below 1e-4 and from 1e16.
fn py_float(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sci = format!("{v:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let body = if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                format!("{digits}{}.0", "0".repeat(int_len - digits.len()))
            } else {
                format!("{}.{}", &digits[..int_len], &digits[int_len..])
            }
        } else {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        }
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits.clone()
        };
        let s = if exp < 0 { '-' } else { '+' };
        format!("{m}e{s}{:02}", exp.abs())
    };
    format!("{sign}{body}")
}

/// `datetime.now().strftime(fmt)` for a host on UTC (the common directives).
fn strftime_utc(fmt: &str, unix: i64) -> String {
    const MONTHS: [&str; 12] = [
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
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (h, mi, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    const CUM: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let wday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:>2}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('I') => out.push_str(&format!("{:02}", (h + 11) % 12 + 1)),
            Some('M') => out.push_str(&format!("{mi:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('p') => out.push_str(if h < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(month),
            Some('b') | Some('h') => out.push_str(&month[..3]),
            Some('A') => out.push_str(DAYS[wday]),
            Some('a') => out.push_str(&DAYS[wday][..3]),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Token ids of every generated-output token of the stand-in, for tests and tools: the id of
/// the 3-character string `s` over [`STANDIN_ALPHABET`].
pub fn standin_chunk_id(s: &[u8; 3]) -> Option<u32> {
    let mut idx = 0usize;
    for &b in s {
        let i = alpha_index(b);
        if i == usize::MAX {
            return None;
        }
        idx = idx * N_ALPHA + i;
    }
    Some((FIRST_TRIPLE_ID + idx) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standin() -> (PathBuf, HfTokenizer) {
        let dir = std::env::temp_dir().join(format!(
            "vllm-sim-hf-{}-{}",
            std::process::id(),
            mix64(
                unix_now() as u64
                    ^ fnv1a64(format!("{:?}", std::thread::current().id()).as_bytes())
            )
        ));
        export_standin(&dir).expect("export");
        let hf = HfTokenizer::from_dir(&dir).expect("load");
        (dir, hf)
    }

    #[test]
    fn export_is_deterministic_and_loads() {
        let (dir, hf) = standin();
        let a = std::fs::read(dir.join("tokenizer.json")).expect("read");
        let (dir2, hf2) = standin();
        let b = std::fs::read(dir2.join("tokenizer.json")).expect("read");
        assert_eq!(a, b);
        assert_eq!(hf, hf2);
        assert!(matches!(hf.output, OutputVocab::Chunks(_)));
        // Vocabulary: 256 bytes + 29² + 29³ + 2 newline runs + 5 specials.
        assert_eq!(hf.tok.get_vocab_size(true), 256 + 841 + 24_389 + 2 + 5);
        assert_eq!(hf.tok.token_to_id("<|eot_id|>"), Some(128_009));
        assert_eq!(
            hf.tok.token_to_id("Ġab"),
            Some(standin_chunk_id(b" ab").expect("id"))
        );
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(dir2);
    }

    #[test]
    fn standin_encoding_rules() {
        let (dir, hf) = standin();
        // Three characters per token, left to right; BOS with special tokens.
        let ids = hf.encode("hello world", true).expect("encode");
        let expect: Vec<u32> = [b"hel", b"lo ", b"wor"]
            .iter()
            .map(|s| standin_chunk_id(s).expect("id"))
            .chain(
                [FIRST_PAIR_ID as u32 + (alpha_index(b'l') * N_ALPHA + alpha_index(b'd')) as u32],
            )
            .collect();
        assert_eq!(ids[0], 128_000);
        assert_eq!(&ids[1..], &expect[..]);
        // Added tokens split the text; newline runs are their own chunks.
        let ids = hf
            .encode("<|start_header_id|>user<|end_header_id|>\n\nabcdef", false)
            .expect("encode");
        assert_eq!(ids[0], 128_006);
        assert_eq!(ids[3], 128_007);
        assert_eq!(ids[4], NEWLINES_ID as u32);
        assert_eq!(
            ids[5..],
            [
                standin_chunk_id(b"abc").expect("id"),
                standin_chunk_id(b"def").expect("id")
            ]
        );
        // Any bytes encode (uppercase and non-ASCII fall back to byte symbols) and decode back.
        let text = "Ünïcode & UPPER {\"json\": 1}\r\n\n\n\n\tend";
        let ids = hf.encode(text, false).expect("encode");
        assert_eq!(hf.tok.decode(&ids, false).expect("decode"), text);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn chat_body_renders_like_the_template() {
        let (dir, hf) = standin();
        let body = json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief."},
                {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"b\": 1, \"a\": [1.5, 2]}"}}
                ]},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"},
            ],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        });
        let req: Value =
            serde_json::from_slice(&serde_json::to_vec(&body).expect("json")).expect("value");
        let text = hf.render_request(&req).expect("render");
        assert_eq!(
            text,
            "<|begin_of_text|><|start_header_id|>tools<|end_header_id|>\n\n\
             [{\"type\": \"function\", \"function\": {\"name\": \"f\", \"description\": null, \"parameters\": {\"type\": \"object\"}}}]<|eot_id|>\
             <|start_header_id|>system<|end_header_id|>\n\nbe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nhi\nthere<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n\
             [{\"function\": {\"arguments\": {\"b\": 1, \"a\": [1.5, 2]}, \"name\": \"f\"}, \"id\": \"c1\", \"type\": \"function\"}]<|eot_id|>\
             <|start_header_id|>tool<|end_header_id|>\n\nok<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let ids = hf
            .chat_request_tokens(&serde_json::to_vec(&body).expect("json"))
            .expect("tokens");
        assert_eq!(ids, hf.encode(&text, false).expect("encode"));
        assert_eq!(ids[0], 128_000);
        assert_eq!(ids.iter().filter(|&&t| t == 128_000).count(), 1);
        // add_generation_prompt: false drops the trailer; both flags at once are refused.
        let mut b2 = body.clone();
        b2["add_generation_prompt"] = json!(false);
        let t2 = hf
            .render_request(
                &serde_json::from_slice(&serde_json::to_vec(&b2).expect("j")).expect("v"),
            )
            .expect("render");
        assert!(text.starts_with(&t2) && t2.ends_with("ok<|eot_id|>"));
        b2["continue_final_message"] = json!(true);
        let t3 = hf
            .render_request(
                &serde_json::from_slice(&serde_json::to_vec(&b2).expect("j")).expect("v"),
            )
            .expect("render");
        assert!(t3.ends_with("\n\nok"), "{t3}");
        b2["add_generation_prompt"] = json!(true);
        assert!(
            hf.chat_request_tokens(&serde_json::to_vec(&b2).expect("j"))
                .is_err()
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn generated_text_retokenizes_including_next_turn() {
        let (dir, hf) = standin();
        let msgs = |answer: Option<&str>| {
            let mut m = vec![json!({"role": "user", "content": "write something."})];
            if let Some(a) = answer {
                m.push(json!({"role": "assistant", "content": a}));
                m.push(json!({"role": "user", "content": "more."}));
            }
            serde_json::to_vec(&json!({"messages": m})).expect("json")
        };
        let first = hf.chat_request_tokens(&msgs(None)).expect("first");
        for seed in [1u64, 42, 0xdead_beef] {
            let mut text = String::new();
            let mut out = Vec::new();
            for j in 0..97 {
                let (id, t) = hf.output_token(seed, j);
                assert_eq!(t.as_str().len(), 3);
                out.push(id);
                text.push_str(t.as_str());
            }
            assert_eq!(hf.encode(&text, false).expect("encode"), out);
            // The next turn's prompt starts with the first prompt followed by the answer's ids.
            let second = hf.chat_request_tokens(&msgs(Some(&text))).expect("second");
            assert_eq!(&second[..first.len()], &first[..]);
            assert_eq!(&second[first.len()..first.len() + out.len()], &out[..]);
            assert_eq!(second[first.len() + out.len()], 128_009);
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn python_json_and_helpers() {
        assert_eq!(py_float(1.0), "1.0");
        assert_eq!(py_float(1234.5), "1234.5");
        assert_eq!(py_float(1e16), "1e+16");
        assert_eq!(py_float(1.5e-5), "1.5e-05");
        assert_eq!(py_float(0.0015), "0.0015");
        assert_eq!(py_float(-0.0), "-0.0");
        assert_eq!(py_float(123_456_789_012_345.6), "123456789012345.6");
        let env = environment();
        let v: Value =
            serde_json::from_str(r#"{"z": [1, 2.0, "é\n"], "a": {}, "n": null}"#).expect("v");
        let r = |src: &str| {
            env.render_str(src, minijinja::context! { v => v.clone() })
                .expect("render")
        };
        assert_eq!(
            r("{{ v | tojson }}"),
            "{\"z\": [1, 2.0, \"é\\n\"], \"a\": {}, \"n\": null}"
        );
        assert_eq!(
            r("{{ v | tojson(indent=2, sort_keys=true) }}"),
            "{\n  \"a\": {},\n  \"n\": null,\n  \"z\": [\n    1,\n    2.0,\n    \"é\\n\"\n  ]\n}"
        );
        assert_eq!(
            r("{{ v.z | tojson(ensure_ascii=true) }}"),
            "[1, 2.0, \"\\u00e9\\n\"]"
        );
        assert_eq!(
            r("{{ '  x '.strip() }}|{{ v.items() | list | length }}"),
            "x|3"
        );
        assert!(env.render_str("{{ raise_exception('no') }}", ()).is_err());
        assert_eq!(
            strftime_utc("%Y-%m-%d %H:%M:%S %a %b %j", 1_709_251_199),
            "2024-02-29 23:59:59 Thu Feb 060"
        );
        assert_eq!(strftime_utc("%d %B %Y", 0), "01 January 1970");
        assert!(loops_over_content(
            "{% for m in messages %}{%- for part in m['content'] -%}{% endfor %}{% endfor %}"
        ));
        assert!(!loops_over_content(STANDIN_CHAT_TEMPLATE));
        assert_eq!(
            strip_generation_tags("a{% generation %}b{%- endgeneration -%}c{% if x %}"),
            "abc{% if x %}"
        );
    }

    #[test]
    fn kv_events_carry_hf_ids() {
        use crate::config::EngineConfig;
        use crate::engine::{Engine, RequestSpec};
        use crate::prefix_cache::KvEvent;
        let (dir, hf) = standin();
        let hf = std::sync::Arc::new(hf);
        let cfg = EngineConfig {
            num_gpu_blocks: 1000,
            hf_tokenizer: Some(hf.clone()),
            ..EngineConfig::default()
        };
        let mut e = Engine::new(cfg, true);
        let body = serde_json::to_vec(&json!({"messages": [
            {"role": "system", "content": "you answer in lowercase words, briefly."},
            {"role": "user", "content": "tell me about the sea and the wind, please."}
        ]}))
        .expect("json");
        let prompt = hf.chat_request_tokens(&body).expect("prompt");
        let (seed, out) = (99u64, 40usize);
        e.submit(
            RequestSpec {
                prompt: prompt.clone(),
                max_tokens: out,
                explicit_max_tokens: true,
                seed,
                wake_every: usize::MAX,
                remote_tokens: 0,
                waited_v: 0.0,
            },
            0.0,
        )
        .expect("submit");
        while let Some(s) = e.schedule(0.0) {
            e.complete(&s);
        }
        let mut stored = Vec::new();
        for (_, batch) in e.take_kv_events() {
            for ev in batch {
                if let KvEvent::BlockStored { token_ids, .. } = ev {
                    stored.extend(token_ids);
                }
            }
        }
        let mut all = prompt.clone();
        all.extend((0..out).map(|j| hf.output_token(seed, j).0));
        // Every full block of prompt + output (the last sampled token is never computed).
        let full = (all.len() - 1) / 16 * 16;
        assert!(full > prompt.len(), "the output must reach a stored block");
        assert_eq!(stored, all[..full].to_vec());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn served_endpoints_use_the_hf_tokenizer() {
        use crate::config::{EngineConfig, SimConfig};
        let (dir, hf) = standin();
        let hf = std::sync::Arc::new(hf);
        let cfg = SimConfig {
            engine: EngineConfig {
                time_scale: 100.0,
                hf_tokenizer: Some(hf.clone()),
                ..EngineConfig::default()
            },
            base_port: 0,
            ..SimConfig::default()
        };
        let running = crate::server::start(&cfg).await.expect("start");
        let base = format!("http://127.0.0.1:{}", running.instances[0].port);
        let c = reqwest::Client::new();
        let post = |path: &'static str, body: serde_json::Value| {
            let req = c.post(format!("{base}{path}")).json(&body);
            async move {
                let r = req.send().await.expect("send");
                assert_eq!(r.status(), 200, "{path}");
                r.json::<serde_json::Value>().await.expect("json")
            }
        };
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .expect("array")
                .iter()
                .map(|x| x.as_u64().expect("id") as u32)
                .collect()
        };
        let msgs = json!([
            {"role": "system", "content": "you are terse."},
            {"role": "user", "content": [{"type": "text", "text": "name three rivers"}, {"type": "text", "text": "and seas."}]}
        ]);
        let chat = json!({"messages": msgs});
        let want = hf
            .chat_request_tokens(&serde_json::to_vec(&chat).expect("j"))
            .expect("tokens");
        let t = post("/tokenize", chat.clone()).await;
        assert_eq!(ids(&t["tokens"]), want);
        assert_eq!(t["count"], want.len());
        assert!(t["token_strs"].is_null());
        // Completion prompts: BOS + text, token_strs on request.
        let t = post(
            "/tokenize",
            json!({"prompt": "the sea", "return_token_strs": true}),
        )
        .await;
        assert_eq!(ids(&t["tokens"]), hf.encode("the sea", true).expect("e"));
        assert_eq!(
            t["token_strs"],
            json!(["<|begin_of_text|>", "the", "Ġse", "a"])
        );
        // A chat answer re-tokenizes to its ids: the next turn hits the blocks it filled.
        let mut first = chat.clone();
        first["max_tokens"] = json!(60);
        let r = post("/v1/chat/completions", first).await;
        assert_eq!(r["usage"]["prompt_tokens"], want.len());
        let answer = r["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
            .to_string();
        assert_eq!(hf.encode(&answer, false).expect("e").len(), 60);
        let mut history = msgs.as_array().expect("msgs").clone();
        history.push(json!({"role": "assistant", "content": answer}));
        history.push(json!({"role": "user", "content": "thanks."}));
        let second = json!({"messages": history, "max_tokens": 1});
        let r = post("/v1/chat/completions", second).await;
        let cached = r["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached") as usize;
        assert_eq!(cached, (want.len() + 60 - 1) / 16 * 16, "{r}");
        // Completions and the Responses API count HF tokens.
        let r = post(
            "/v1/completions",
            json!({"prompt": "abc def", "max_tokens": 2}),
        )
        .await;
        assert_eq!(
            r["usage"]["prompt_tokens"],
            hf.encode("abc def", true).expect("e").len()
        );
        let r = post(
            "/v1/responses",
            json!({"input": "hello there", "max_output_tokens": 3}),
        )
        .await;
        let t = post(
            "/tokenize",
            json!({"messages": [{"role": "user", "content": "hello there"}]}),
        )
        .await;
        assert_eq!(r["usage"]["input_tokens"], t["count"]);
        // Template errors are the client's 400.
        let bad = c
            .post(format!("{base}/v1/chat/completions"))
            .json(&json!({"messages": [{"role": "user", "content": "x"}], "continue_final_message": true}))
            .send()
            .await
            .expect("send");
        assert_eq!(bad.status(), 400);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A stand-in variant: the exported files with `edit` applied to `tokenizer.json`.
    fn variant(edit: impl FnOnce(&mut serde_json::Value)) -> (PathBuf, HfTokenizer) {
        let dir = std::env::temp_dir().join(format!(
            "vllm-sim-hf-variant-{}-{}",
            std::process::id(),
            mix64(
                unix_now() as u64
                    ^ fnv1a64(format!("{:?}", std::thread::current().id()).as_bytes())
                    ^ fnv1a64(format!("{:?}", std::time::Instant::now()).as_bytes())
            )
        ));
        export_standin(&dir).expect("export");
        let mut tj = standin_tokenizer_json();
        edit(&mut tj);
        std::fs::write(
            dir.join("tokenizer.json"),
            serde_json::to_vec(&tj).expect("json"),
        )
        .expect("write");
        let hf = HfTokenizer::from_dir(&dir).expect("load");
        (dir, hf)
    }

    /// Adds a non-special added token to a `tokenizer.json` (and to the model's vocabulary, so
    /// that it keeps its id).
    fn add_token(tj: &mut serde_json::Value, content: &str, id: u32, flags: serde_json::Value) {
        tj["model"]["vocab"][content] = json!(id);
        let mut t = json!({
            "id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": false,
        });
        if let (Some(t), Some(flags)) = (t.as_object_mut(), flags.as_object()) {
            t.extend(flags.clone());
        }
        tj["added_tokens"]
            .as_array_mut()
            .expect("added_tokens")
            .push(t);
    }

    /// The same tokenizer with the piece cache off.
    fn without_cache(dir: &Path) -> HfTokenizer {
        let mut hf = HfTokenizer::from_dir(dir).expect("load");
        hf.pieces = None;
        assert!(!hf.piece_cache_enabled());
        hf
    }

    /// A ~40 KB conversation of `turns` messages after a long system prompt (about 3
    /// characters per stand-in token).
    fn conversation(turns: usize, extra: &[&str]) -> serde_json::Value {
        let mut words = crate::workload::text::Words::new(7);
        let mut messages = vec![json!({"role": "system", "content": words.take(2000)})];
        for i in 0..turns {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            messages.push(json!({"role": role, "content": words.take(500)}));
        }
        for e in extra {
            messages.push(json!({"role": "user", "content": e}));
        }
        json!({"messages": messages})
    }

    /// Texts with repeated pieces, added tokens in odd places, whitespace around them.
    fn probe_texts(hf: &HfTokenizer, specials: &[&str]) -> Vec<String> {
        let mut texts = Vec::new();
        let mut words = crate::workload::text::Words::new(3);
        let long = words.take(300);
        let short = words.take(12);
        for body in [
            conversation(4, &[]),
            conversation(4, &["and one more thing."]),
            json!({"messages": [
                {"role": "system", "content": long},
                {"role": "user", "content": format!("quote: {} <|eot_id|> ok", long)},
                {"role": "assistant", "content": "\n\n\nÜber  café\t\r\n"},
                {"role": "user", "content": long},
            ], "tools": [{"type": "function", "function": {"name": "f"}}]}),
        ] {
            texts.push(
                hf.render_request(&Value::from_serialize(&body))
                    .expect("render"),
            );
        }
        let mut mixed = String::from("  lead ");
        for (i, s) in specials.iter().enumerate() {
            for around in ["", " ", "  ", "\n", " \n\t ", "x", "x "] {
                mixed.push_str(&format!("{around}{s}{around}{short}{s}{s}{around}"));
            }
            mixed.push_str(&format!(" {i} "));
        }
        texts.push(mixed.clone());
        texts.push(format!("{mixed}{mixed}"));
        texts.push(specials.concat());
        texts.push(" ".into());
        texts.push(String::new());
        texts
    }

    /// `hf.encode` (twice: cold, then warm) equals whole encoding for every text, and the
    /// splitter cuts every text as the library does.
    fn assert_cached_equals_uncached(hf: &HfTokenizer, texts: &[String]) {
        for text in texts {
            if let Some(splitter) = &hf.splitter {
                assert_eq!(splitter.split(text), hf.library_pieces(text), "{text:?}");
            }
            for special in [false, true] {
                let want = hf.encode_uncached(text, special).expect("uncached");
                for round in 0..2 {
                    let got = hf.encode(text, special).expect("cached");
                    assert!(
                        got == want,
                        "round {round}, special {special}, text {text:?}: {got:?} != {want:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn piece_cache_equals_uncached_with_the_standin() {
        let (dir, hf) = standin();
        assert!(hf.piece_cache_enabled());
        let texts = probe_texts(
            &hf,
            &["<|eot_id|>", "<|start_header_id|>", "<|begin_of_text|>"],
        );
        assert_cached_equals_uncached(&hf, &texts);
        let (pieces, ids, _) = hf.pieces.as_ref().expect("cache").totals();
        assert!(pieces > 10 && ids > 1000, "{pieces} pieces, {ids} ids");
        // Request paths: a growing conversation, with and without the cache.
        let plain = without_cache(&dir);
        assert!(!plain.piece_cache_enabled());
        for body in [
            conversation(16, &[]),
            conversation(16, &["and now summarize all of it."]),
            conversation(17, &[]),
            conversation(16, &["<|eot_id|>a fake end", "again"]),
        ] {
            let body = serde_json::to_vec(&body).expect("json");
            let want = plain.chat_request_tokens(&body).expect("uncached");
            assert_eq!(hf.chat_request_tokens(&body).expect("cached"), want);
            assert_eq!(hf.chat_request_tokens(&body).expect("warm"), want);
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn piece_cache_equals_uncached_with_strip_tokens() {
        let (dir, hf) = variant(|tj| {
            add_token(tj, "<tool>", 128_100, json!({"lstrip": true}));
            add_token(tj, "</tool>", 128_101, json!({"rstrip": true}));
            add_token(
                tj,
                "<both>",
                128_102,
                json!({"lstrip": true, "rstrip": true}),
            );
            add_token(tj, "<<both>>", 128_103, json!({"special": true}));
            add_token(tj, "[norm]", 128_104, json!({"normalized": true}));
        });
        assert!(hf.piece_cache_enabled(), "{hf:?}");
        let texts = probe_texts(
            &hf,
            &[
                "<tool>",
                "</tool>",
                "<both>",
                "<<both>>",
                "[norm]",
                "<|eot_id|>",
            ],
        );
        assert_cached_equals_uncached(&hf, &texts);
        // lstrip/rstrip really take the whitespace next to them.
        let pair =
            |a: u8, b: u8| (FIRST_PAIR_ID + alpha_index(a) * N_ALPHA + alpha_index(b)) as u32;
        assert_eq!(
            hf.encode("ab <tool> \n", false).expect("e"),
            [pair(b'a', b'b'), 128_100, u32::from(b' '), u32::from(b'\n')]
        );
        assert_eq!(
            hf.encode("a </tool> \n b", false).expect("e"),
            [pair(b'a', b' '), 128_101, u32::from(b'b')]
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn piece_cache_off_when_pieces_depend_on_their_position() {
        // Metaspace prepending only at offset 0 (with the space as replacement, so the stand-in
        // vocabulary still works); caught by the rule and by the self-check on its own.
        let (d1, meta) = variant(|tj| {
            let pre = tj["pre_tokenizer"]["pretokenizers"]
                .as_array_mut()
                .expect("sequence");
            pre.insert(
                0,
                json!({
                    "type": "Metaspace", "replacement": " ", "prepend_scheme": "first",
                    "split": false,
                }),
            );
        });
        assert!(!meta.piece_cache_enabled());
        assert!(meta.piecewise_obstacle().is_some());
        let splitter = AddedSplitter::new(&meta.tok).expect("splitter");
        assert!(meta.piecewise_self_check(&splitter).is_err());
        // A normalizer applied to a normalized added token.
        let (d2, norm) = variant(|tj| {
            tj["normalizer"] = json!({"type": "Lowercase"});
            add_token(tj, "[Norm]", 128_104, json!({"normalized": true}));
        });
        assert!(!norm.piece_cache_enabled());
        // A single_word token.
        let (d3, single) = variant(|tj| {
            add_token(tj, "tok", 128_105, json!({"single_word": true}));
        });
        assert!(!single.piece_cache_enabled());
        // They still encode (whole): encode equals uncached.
        for hf in [&meta, &norm, &single] {
            let texts = probe_texts(hf, &["<|eot_id|>", "[Norm]", "tok"]);
            assert_cached_equals_uncached(hf, &texts);
        }
        // A normalizer alone does not stop the cache (pieces are normalized on their own).
        let (d4, lower) = variant(|tj| tj["normalizer"] = json!({"type": "Lowercase"}));
        assert!(lower.piece_cache_enabled());
        assert_cached_equals_uncached(&lower, &probe_texts(&lower, &["<|eot_id|>"]));
        for d in [d1, d2, d3, d4] {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    #[test]
    fn piece_cache_stays_bounded() {
        let (dir, mut hf) = standin();
        let limits = PieceLimits {
            entries: 8,
            ids: 400,
            bytes: 100_000,
        };
        hf.pieces = Some(PieceCache::new(limits));
        let mut words = crate::workload::text::Words::new(11);
        let mut texts = Vec::new();
        for i in 0..60 {
            // Pieces of 10 to ~600 ids, some larger than a generation.
            let piece = words.take(3 + (i * 37) % 450);
            texts.push(format!("<|start_header_id|>{piece}<|eot_id|>{i}<|eot_id|>"));
        }
        for round in 0..2 {
            for t in &texts {
                assert_eq!(
                    hf.encode(t, true).expect("cached"),
                    hf.encode_uncached(t, true).expect("uncached"),
                    "round {round}"
                );
                let (pieces, ids, bytes) = hf.pieces.as_ref().expect("cache").totals();
                assert!(pieces <= 2 * limits.entries, "{pieces} pieces");
                assert!(ids <= 2 * limits.ids, "{ids} ids");
                assert!(bytes <= 2 * limits.bytes, "{bytes} bytes");
            }
        }
        // Bytes bound the cache too.
        hf.pieces = Some(PieceCache::new(PieceLimits {
            entries: 1000,
            ids: 1 << 20,
            bytes: 64,
        }));
        for t in &texts {
            hf.encode(t, false).expect("cached");
            let (_, _, bytes) = hf.pieces.as_ref().expect("cache").totals();
            assert!(bytes <= 128, "{bytes} bytes");
        }
        // A hit in the old generation moves to the young one.
        let cache = PieceCache::new(PieceLimits {
            entries: 2,
            ids: 100,
            bytes: 100,
        });
        let ids: Arc<[u32]> = Arc::from(vec![1u32, 2]);
        cache.insert([("a", ids.clone()), ("b", ids.clone())]);
        cache.insert([("c", ids.clone())]); // a, b now old
        assert!(cache.lookup(&["a"])[0].is_some()); // a young again, with c
        cache.insert([("d", ids.clone())]); // young {a, c} full: old = {a, c}
        let hits = cache.lookup(&["a", "b", "c", "d"]);
        assert_eq!(
            hits.iter().map(Option::is_some).collect::<Vec<_>>(),
            [true, false, true, true]
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn piece_cache_shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<HfTokenizer>();
        let (dir, hf) = standin();
        let hf = Arc::new(hf);
        let texts: Arc<Vec<String>> = Arc::new(probe_texts(&hf, &["<|eot_id|>"]));
        let want: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| hf.encode_uncached(t, false).expect("uncached"))
            .collect();
        let want = Arc::new(want);
        let threads: Vec<_> = (0..4)
            .map(|k| {
                let (hf, texts, want) = (hf.clone(), texts.clone(), want.clone());
                std::thread::spawn(move || {
                    for round in 0..3 {
                        for i in 0..texts.len() {
                            let i = (i + k) % texts.len();
                            let got = hf.encode(&texts[i], false).expect("cached");
                            assert!(got == want[i], "thread {k} round {round} text {i}");
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    #[ignore = "prints timings; run with --ignored --nocapture and optimized builds"]
    fn encode_timing_40kb_chat() {
        use std::time::{Duration, Instant};
        let (dir, mut hf) = standin();
        let plain = without_cache(&dir);
        let body = serde_json::to_vec(&conversation(16, &[])).expect("json");
        let next =
            serde_json::to_vec(&conversation(16, &["and now summarize all of it."])).expect("json");
        let best = |n: usize, f: &mut dyn FnMut() -> Duration| -> Duration {
            (0..n).map(|_| f()).min().unwrap_or_default()
        };
        let time = |f: &mut dyn FnMut()| {
            let t = Instant::now();
            f();
            t.elapsed()
        };
        let req: Value = serde_json::from_slice(&body).expect("json");
        let text = hf.render_request(&req).expect("render");
        let n = plain.encode_uncached(&text, false).expect("e").len();
        let render = best(5, &mut || {
            time(&mut || {
                let req: Value = serde_json::from_slice(&body).expect("json");
                hf.render_request(&req).expect("render");
            })
        });
        let library_split = best(5, &mut || {
            time(&mut || {
                hf.library_pieces(&text).expect("split");
            })
        });
        let split = best(5, &mut || {
            time(&mut || {
                hf.splitter
                    .as_ref()
                    .and_then(|s| s.split(&text))
                    .expect("split");
            })
        });
        let before = best(7, &mut || {
            time(&mut || {
                plain.chat_request_tokens(&body).expect("uncached");
            })
        });
        let before_next = best(7, &mut || {
            time(&mut || {
                plain.chat_request_tokens(&next).expect("uncached");
            })
        });
        let cold = best(7, &mut || {
            hf.pieces = Some(PieceCache::new(PIECE_LIMITS));
            time(&mut || {
                hf.chat_request_tokens(&body).expect("cold");
            })
        });
        let warm = best(20, &mut || {
            time(&mut || {
                hf.chat_request_tokens(&body).expect("warm");
            })
        });
        let step = best(5, &mut || {
            hf.pieces = Some(PieceCache::new(PIECE_LIMITS));
            hf.chat_request_tokens(&body).expect("first call");
            time(&mut || {
                hf.chat_request_tokens(&next).expect("next");
            })
        });
        let nextwarm = best(5, &mut || {
            time(&mut || {
                hf.chat_request_tokens(&next).expect("next");
            })
        });
        assert_eq!(
            hf.chat_request_tokens(&next).expect("cached"),
            plain.chat_request_tokens(&next).expect("uncached")
        );
        println!(
            "chat body {} bytes, rendered {} bytes, {n} tokens\n\
             render only {render:?}; split on added tokens {split:?} (library's split \
             {library_split:?})\n\
             before (no cache): {before:?}, next turn {before_next:?}\n\
             after: cold {cold:?}; warm {warm:?}; next turn (one new message) {step:?} as \
             the second call, {nextwarm:?} repeated",
            body.len(),
            text.len(),
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
