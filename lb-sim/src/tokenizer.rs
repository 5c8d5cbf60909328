//! A deterministic, model-agnostic stand-in tokenizer with a fixed chat template.
//!
//! Definition (stable across processes and versions; other crates may rely on it):
//! - A *text segment* is cut into tokens by character count: token `k` of a segment covers the
//!   characters `[floor(k·r), floor((k+1)·r))`, where `r` is the chars-per-token ratio
//!   (default 4.0). The last token may be shorter.
//! - A token's id is `fnv1a64(utf8 bytes of its characters) mod 128000`.
//! - Special tokens (Llama-3 ids): `<|begin_of_text|>` 128000, `<|start_header_id|>` 128006,
//!   `<|end_header_id|>` 128007, `<|eot_id|>` 128009.
//! - Chat template (Llama-3 shaped): `BOS`, then, if `tools` is given, a `tools` header block whose
//!   content is the compact JSON of `tools`; then per message
//!   `START role END "\n\n" content EOT`, where `role`, `"\n\n"` and `content` are separate
//!   segments; then the generation prompt `START "assistant" END "\n\n"`.
//!   Content is the string, or the concatenation of the `text` of its parts; `tool_calls` are
//!   appended as compact JSON.
//! - Completions prompts are `BOS` + the text as one segment; a prompt given as token ids is used as is.
//!
//! Consequences: identical message prefixes give identical token prefixes, and generated text
//! (see [`Tokenizer::output_token`]) re-tokenizes to exactly the generated ids, so a multi-turn
//! conversation that replays the assistant's answer hits the blocks that answer filled.
//!
//! **HF mode** (`vllm-sim --tokenizer <dir>`): a [`Tokenizer`] built with [`Tokenizer::with_hf`]
//! delegates prompts, chat rendering and generated tokens to a
//! [`crate::hf_tokenizer::HfTokenizer`] (a real Hugging Face tokenizer and chat template, used as
//! vLLM uses them); the rules above then do not apply. The default stays the stand-in above.

use std::sync::Arc;

use serde_json::Value;

use crate::config::EngineConfig;
use crate::hf_tokenizer::HfTokenizer;

/// Number of ordinary (text) token ids.
pub const TEXT_VOCAB: u64 = 128_000;
/// `<|begin_of_text|>`.
pub const BOS: u32 = 128_000;
/// `<|start_header_id|>`.
pub const START_HEADER: u32 = 128_006;
/// `<|end_header_id|>`.
pub const END_HEADER: u32 = 128_007;
/// `<|eot_id|>`.
pub const EOT: u32 = 128_009;

/// Longest text of one generated token, in bytes (the ratio is at most 16).
pub const MAX_TOKEN_CHARS: usize = 16;

/// One chat message as the template sees it.
#[derive(Debug, Clone, Copy)]
pub struct ChatTurn<'a> {
    /// `system`, `user`, `assistant`, `tool`, ...
    pub role: &'a str,
    /// `content` as sent (string, array of parts, or null).
    pub content: Option<&'a Value>,
    /// `tool_calls` as sent, if any.
    pub tool_calls: Option<&'a Value>,
}

/// Text of one generated token, stored inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenText {
    buf: [u8; MAX_TOKEN_CHARS],
    len: u8,
}

impl TokenText {
    /// A token text from ASCII bytes (at most [`MAX_TOKEN_CHARS`] are kept).
    pub(crate) fn from_ascii(bytes: &[u8]) -> Self {
        let len = bytes.len().min(MAX_TOKEN_CHARS);
        let mut buf = [b' '; MAX_TOKEN_CHARS];
        buf[..len].copy_from_slice(&bytes[..len]);
        Self {
            buf,
            len: len as u8,
        }
    }

    /// The token's characters (ASCII).
    pub fn as_str(&self) -> &str {
        // Only bytes from ALPHABET are ever written, all ASCII.
        std::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or("")
    }
}

/// Characters of generated text, weighted (`e` and space appear more than once).
pub(crate) const ALPHABET: &[u8; 32] = b"etaoinshrdlucmfwypvbgkqjxz  .,e ";

/// The stand-in tokenizer, or (HF mode) a handle on a loaded HF tokenizer.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    ratio: f64,
    hf: Option<Arc<HfTokenizer>>,
}

/// 64-bit FNV-1a.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SplitMix64 finalizer, used for deterministic pseudo-randomness.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn text_token_id(bytes: &[u8]) -> u32 {
    (fnv1a64(bytes) % TEXT_VOCAB) as u32
}

impl Tokenizer {
    /// A tokenizer with `chars_per_token` characters per token (clamped to 1..=16).
    pub fn new(chars_per_token: f64) -> Self {
        Self {
            ratio: chars_per_token.clamp(1.0, MAX_TOKEN_CHARS as f64),
            hf: None,
        }
    }

    /// HF mode: prompts, chat rendering and generated tokens come from `hf`.
    pub fn with_hf(chars_per_token: f64, hf: Arc<HfTokenizer>) -> Self {
        Self {
            hf: Some(hf),
            ..Self::new(chars_per_token)
        }
    }

    /// The tokenizer an engine with this configuration uses (HF mode when it names one).
    pub fn for_config(cfg: &EngineConfig) -> Self {
        match &cfg.hf_tokenizer {
            Some(hf) => Self::with_hf(cfg.chars_per_token, hf.clone()),
            None => Self::new(cfg.chars_per_token),
        }
    }

    /// The HF tokenizer, in HF mode.
    pub fn hf(&self) -> Option<&Arc<HfTokenizer>> {
        self.hf.as_ref()
    }

    /// Character index where token `k` of a segment starts.
    fn boundary(&self, k: usize) -> usize {
        (k as f64 * self.ratio).floor() as usize
    }

    /// Appends the tokens of one text segment (the stand-in's rule, whatever the mode).
    pub fn encode_segment(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        if text.is_ascii() && self.ratio.fract() == 0.0 {
            let r = self.ratio as usize;
            out.extend(text.as_bytes().chunks(r).map(text_token_id));
            return;
        }
        let bytes = text.as_bytes();
        let mut k = 0usize;
        let mut start = 0usize;
        let mut next = self.boundary(1);
        for (nchars, (bi, _)) in text.char_indices().enumerate() {
            if nchars == next && bi > start {
                out.push(text_token_id(&bytes[start..bi]));
                start = bi;
                k += 1;
                next = self.boundary(k + 1);
            }
        }
        if start < bytes.len() {
            out.push(text_token_id(&bytes[start..]));
        }
    }

    /// Number of tokens of one segment, without materializing them (the stand-in's rule).
    pub fn count_segment(&self, text: &str) -> usize {
        let n = text.chars().count();
        if n == 0 {
            return 0;
        }
        (n as f64 / self.ratio).ceil() as usize
    }

    /// Tokens of a completions prompt given as text (HF mode: encoded with special tokens, empty
    /// if the tokenizer fails; see [`Tokenizer::try_encode_prompt`]).
    pub fn encode_prompt(&self, text: &str) -> Vec<u32> {
        if self.hf.is_some() {
            return self.try_encode_prompt(text, true).unwrap_or_default();
        }
        let mut out = Vec::with_capacity(2 + (text.len() as f64 / self.ratio) as usize);
        out.push(BOS);
        self.encode_segment(text, &mut out);
        out
    }

    /// Tokens of a completions prompt given as text. HF mode honours `add_special_tokens` (BOS
    /// from the post-processor); the stand-in always starts with BOS.
    pub fn try_encode_prompt(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, String> {
        match &self.hf {
            Some(hf) => hf
                .encode(text, add_special_tokens)
                .map_err(|e| e.to_string()),
            None => Ok(self.encode_prompt(text)),
        }
    }

    /// Renders and tokenizes a conversation; in HF mode with the model's chat template, whose
    /// errors (e.g. `raise_exception`) are returned.
    pub fn try_render_chat(
        &self,
        turns: &[ChatTurn<'_>],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, String> {
        match &self.hf {
            Some(hf) => hf
                .render_turns(turns, tools, add_generation_prompt)
                .map_err(|e| e.to_string()),
            None => Ok(self.render_chat(turns, tools, add_generation_prompt)),
        }
    }

    fn encode_content(&self, content: Option<&Value>, out: &mut Vec<u32>) {
        match content {
            Some(Value::String(s)) => self.encode_segment(s, out),
            Some(Value::Array(parts)) => {
                let mut joined = String::new();
                for p in parts {
                    match p {
                        Value::String(s) => joined.push_str(s),
                        Value::Object(o) => {
                            if let Some(Value::String(t)) = o.get("text") {
                                joined.push_str(t);
                            }
                        }
                        _ => {}
                    }
                }
                self.encode_segment(&joined, out);
            }
            Some(Value::Null) | None => {}
            Some(other) => self.encode_segment(&other.to_string(), out),
        }
    }

    /// Renders a chat conversation with the fixed template and tokenizes it (HF mode: with the
    /// model's template, empty on error; see [`Tokenizer::try_render_chat`]).
    pub fn render_chat(
        &self,
        turns: &[ChatTurn<'_>],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Vec<u32> {
        if self.hf.is_some() {
            return self
                .try_render_chat(turns, tools, add_generation_prompt)
                .unwrap_or_default();
        }
        let mut out = Vec::with_capacity(64);
        out.push(BOS);
        if let Some(tools) = tools.filter(|t| !t.is_null()) {
            out.push(START_HEADER);
            self.encode_segment("tools", &mut out);
            out.push(END_HEADER);
            self.encode_segment("\n\n", &mut out);
            self.encode_segment(&tools.to_string(), &mut out);
            out.push(EOT);
        }
        for t in turns {
            out.push(START_HEADER);
            self.encode_segment(t.role, &mut out);
            out.push(END_HEADER);
            self.encode_segment("\n\n", &mut out);
            match t.tool_calls.filter(|v| !v.is_null()) {
                None => self.encode_content(t.content, &mut out),
                Some(calls) => {
                    let mut text = match t.content {
                        Some(Value::String(s)) => s.clone(),
                        _ => String::new(),
                    };
                    text.push_str(&calls.to_string());
                    self.encode_segment(&text, &mut out);
                }
            }
            out.push(EOT);
        }
        if add_generation_prompt {
            out.push(START_HEADER);
            self.encode_segment("assistant", &mut out);
            out.push(END_HEADER);
            self.encode_segment("\n\n", &mut out);
        }
        out
    }

    /// The `j`-th generated token of a request with output seed `seed`: its text and id.
    ///
    /// Its length follows the segment rule, so the concatenated output re-tokenizes to the same ids.
    pub fn output_token(&self, seed: u64, j: usize) -> (u32, TokenText) {
        if let Some(hf) = &self.hf {
            return hf.output_token(seed, j);
        }
        let len = (self.boundary(j + 1) - self.boundary(j)).clamp(1, MAX_TOKEN_CHARS);
        let mut buf = [b' '; MAX_TOKEN_CHARS];
        let mut r = mix64(seed ^ (j as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for b in buf.iter_mut().take(len) {
            *b = ALPHABET[(r & 31) as usize];
            r = r.rotate_right(5);
        }
        let text = TokenText {
            buf,
            len: len as u8,
        };
        (text_token_id(&buf[..len]), text)
    }

    /// Characters per token of the stand-in.
    pub fn ratio(&self) -> f64 {
        self.ratio
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn segments_are_prefix_stable() {
        let t = Tokenizer::new(4.0);
        let mut a = Vec::new();
        let mut b = Vec::new();
        t.encode_segment("hello world, this is a test", &mut a);
        t.encode_segment("hello world, this is a test of prefixes", &mut b);
        assert_eq!(a.len(), 7);
        assert_eq!(&b[..6], &a[..6]);
        assert_eq!(t.count_segment("hello world, this is a test"), 7);
    }

    #[test]
    fn fractional_ratio_and_unicode() {
        let t = Tokenizer::new(3.5);
        let mut a = Vec::new();
        t.encode_segment("ééééééééééééé", &mut a); // 13 chars
        assert_eq!(a.len(), t.count_segment("ééééééééééééé"));
        let mut b = Vec::new();
        t.encode_segment("ééééééééééééééééééé", &mut b);
        assert_eq!(&b[..a.len() - 1], &a[..a.len() - 1]);
    }

    #[test]
    fn chat_prefixes_share_tokens() {
        let t = Tokenizer::new(4.0);
        let sys = json!("You are a helpful assistant that answers briefly.");
        let u1 = json!("first question");
        let u2 = json!("second question");
        let turn = |role, content| ChatTurn {
            role,
            content: Some(content),
            tool_calls: None,
        };
        let a = t.render_chat(&[turn("system", &sys), turn("user", &u1)], None, true);
        let b = t.render_chat(&[turn("system", &sys), turn("user", &u2)], None, true);
        let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        // BOS + header(3 + 1) + system content (13) + EOT + START + "user" + END + "\n\n".
        assert!(common >= 1 + 4 + 13 + 1 + 4, "common {common}");
        assert_eq!(a[0], BOS);
    }

    #[test]
    fn generated_text_retokenizes_to_same_ids() {
        for ratio in [4.0, 3.3, 1.0] {
            let t = Tokenizer::new(ratio);
            let mut text = String::new();
            let mut ids = Vec::new();
            for j in 0..50 {
                let (id, s) = t.output_token(42, j);
                ids.push(id);
                text.push_str(s.as_str());
            }
            let mut again = Vec::new();
            t.encode_segment(&text, &mut again);
            assert_eq!(ids, again, "ratio {ratio}");
        }
    }
}
