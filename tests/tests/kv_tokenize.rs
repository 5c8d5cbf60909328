//! End-to-end agreement of the two tokenizer implementations: agentlb's in-process
//! [`ChatTokenizer`] and a real `vllm-sim --tokenizer <dir>` process, meeting only through the
//! HF tokenizer directory that `vllm-sim export-tokenizer <dir>` writes.
//!
//! - the prompt ids agentlb computes for chat bodies (system + user, a multi-turn conversation
//!   whose assistant answer comes from a real completion, tools and tool calls, content parts,
//!   `add_generation_prompt`/`continue_final_message`/`chat_template_kwargs`, a raw body whose
//!   keys are not sorted) and completions bodies equal the `tokens` of the sim's `/tokenize`;
//! - `usage.prompt_tokens` of real completions equals their count, and the second turn of a
//!   conversation is a prefix-cache hit through the answer of the first;
//! - agentlb's piece cache gives the ids of an uncached encode with this tokenizer.
//!
//! `encode_timing_40kb_chat` (ignored) prints cold and warm encode times of a ~40 KB prompt.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use agentlb::kv::tokenize::{ChatTokenizer, PromptKind};
use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use testkit::{Sim, sh, unique, workspace_bin};

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        Self(std::env::temp_dir().join(unique(tag)))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `vllm-sim export-tokenizer <dir>`.
fn export(dir: &Path) -> Result<()> {
    sh(Command::new(workspace_bin("vllm-sim"))
        .arg("export-tokenizer")
        .arg(dir))?;
    ensure!(dir.join("tokenizer.json").exists() && dir.join("tokenizer_config.json").exists());
    Ok(())
}

fn post(sim: &Sim, path: &str, body: &[u8]) -> Result<Value> {
    let url = format!("{}{path}", sim.url());
    let resp = ureq::post(&url)
        .timeout(Duration::from_secs(20))
        .set("content-type", "application/json")
        .send_bytes(body)
        .with_context(|| format!("POST {url} {}", String::from_utf8_lossy(body)))?;
    Ok(resp.into_json()?)
}

fn ids(v: &Value) -> Result<Vec<u32>> {
    v.as_array()
        .context("not an array")?
        .iter()
        .map(|x| {
            x.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .context("not a token id")
        })
        .collect()
}

/// The sim's `/tokenize` for a chat body (messages, tools, flags: the body as is) or for a
/// completions `prompt`.
fn sim_tokens(sim: &Sim, body: &[u8]) -> Result<Vec<u32>> {
    let t = post(sim, "/tokenize", body)?;
    let tokens = ids(&t["tokens"])?;
    ensure!(
        t["count"] == json!(tokens.len()),
        "count disagrees with tokens: {t}"
    );
    Ok(tokens)
}

fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

#[test]
fn agentlb_and_vllm_sim_agree_on_prompt_tokens() -> Result<()> {
    let dir = TempDir::new("standin-tokenizer");
    export(&dir.0)?;
    let dir_arg = dir.0.to_string_lossy().into_owned();
    let sim = Sim::start(&["--tokenizer", &dir_arg, "--time-scale", "50"])?;
    let tok = ChatTokenizer::from_dir(&dir.0)?;
    ensure!(
        tok.uses_piece_cache(),
        "the stand-in must take the cached path"
    );

    // A real answer to build a multi-turn conversation from.
    let system = json!({"role": "system", "content": "you are a terse planner. answer in short lowercase sentences."});
    let user =
        json!({"role": "user", "content": "plan a trip along the coast, then list what to pack."});
    let first = json!({"messages": [system, user], "max_tokens": 48});
    let first_ids = tok.prompt_tokens(&bytes(&first), PromptKind::Chat)?;
    ensure!(sim_tokens(&sim, &bytes(&first))? == first_ids);
    let resp = post(&sim, "/v1/chat/completions", &bytes(&first))?;
    ensure!(
        resp["usage"]["prompt_tokens"] == json!(first_ids.len()),
        "{resp}"
    );
    let answer = resp["choices"][0]["message"]["content"]
        .as_str()
        .context("answer")?
        .to_owned();
    ensure!(resp["usage"]["completion_tokens"] == json!(48));
    ensure!(
        tok.encode(&answer, false)?.len() == 48,
        "the answer re-tokenizes to 48 ids"
    );

    let second = json!({"messages": [
        system, user,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "shorter, please."},
    ], "max_tokens": 4});
    let tools = json!({
        "messages": [
            {"role": "user", "content": "what is the weather in nice?"},
            {"role": "assistant", "content": null, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Nice\", \"days\": 2, \"units\": \"c\"}"}
            }]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 c."},
        ],
        "tools": [{
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather by city. Returns “sunny”, “rain”…",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}}, "required": ["city"]},
            },
        }, {"type": "function", "function": {"name": "noop"}}],
    });
    let parts = json!({"messages": [
        {"role": "system", "content": [{"type": "text", "text": "rules:"}, {"type": "text", "text": "be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "first part"}, "second part", {"type": "input_text", "text": "third"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "noted."}], "name": "planner"},
        {"role": "user", "content": ""},
    ]});
    let no_gen = json!({"messages": [user], "add_generation_prompt": false});
    let cont = json!({"messages": [user, {"role": "assistant", "content": "day one: "}],
        "add_generation_prompt": false, "continue_final_message": true});
    let kwargs =
        json!({"messages": [user], "chat_template_kwargs": {"add_generation_prompt": false}});
    let specials = json!({"messages": [user], "add_special_tokens": true});
    // A raw body: keys in a non-sorted order must be rendered in the sent order by both sides.
    let raw = br#"{"tools":[{"function":{"parameters":{"type":"object","required":["q"],"properties":{"q":{"type":"string"}}},"name":"search","description":"web search","strict":true},"type":"function"}],"messages":[{"content":"find rust docs","role":"user"}]}"#.to_vec();

    let chats: Vec<(&str, Vec<u8>)> = vec![
        ("system+user", bytes(&json!({"messages": [system, user]}))),
        ("multi-turn", bytes(&second)),
        ("tools", bytes(&tools)),
        ("content parts", bytes(&parts)),
        ("no generation prompt", bytes(&no_gen)),
        ("continue final message", bytes(&cont)),
        ("chat_template_kwargs", bytes(&kwargs)),
        ("add_special_tokens", bytes(&specials)),
        ("raw body", raw),
    ];
    for (name, body) in &chats {
        let ours = tok.prompt_tokens(body, PromptKind::Chat)?;
        let theirs = sim_tokens(&sim, body)?;
        ensure!(
            ours == theirs,
            "{name}: agentlb {ours:?}\n vs vllm-sim {theirs:?}"
        );
        // Same ids without the piece cache.
        let text = tok.render_chat_body(body)?;
        let special = name == &"add_special_tokens";
        ensure!(
            tok.encode_uncached(&text, special)? == ours,
            "{name}: cache"
        );
    }
    ensure!(tok.cached_pieces() > 0);

    // Completions prompts.
    for prompt in [
        json!({"prompt": "the quick brown fox jumps over the lazy dog."}),
        json!({"prompt": ["Mixed CASE, ünïcode & {json}: 42\n\nend"]}),
        json!({"prompt": "no bos here", "add_special_tokens": false}),
        json!({"prompt": [128000, 5, 6, 7, 1097]}),
    ] {
        let ours = tok.prompt_tokens(&bytes(&prompt), PromptKind::Completion)?;
        let theirs = sim_tokens(&sim, &bytes(&prompt))?;
        ensure!(
            ours == theirs,
            "{prompt}: agentlb {ours:?}\n vs vllm-sim {theirs:?}"
        );
    }

    // Real requests: usage.prompt_tokens is agentlb's count; the second turn hits the blocks
    // the first answer filled (its ids re-tokenize identically).
    let second_ids = tok.prompt_tokens(&chats[1].1, PromptKind::Chat)?;
    let resp = post(&sim, "/v1/chat/completions", &chats[1].1)?;
    ensure!(
        resp["usage"]["prompt_tokens"] == json!(second_ids.len()),
        "{resp}"
    );
    let cached = resp["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .context("cached_tokens")? as usize;
    ensure!(
        cached == (first_ids.len() + 48 - 1) / 16 * 16 && cached > first_ids.len(),
        "cached {cached} of {}, first prompt {}",
        second_ids.len(),
        first_ids.len()
    );
    let tools_req = {
        let mut v: Value = serde_json::from_slice(&chats[2].1)?;
        v["max_tokens"] = json!(2);
        bytes(&v)
    };
    let resp = post(&sim, "/v1/chat/completions", &tools_req)?;
    let want = tok.prompt_tokens(&tools_req, PromptKind::Chat)?.len();
    ensure!(resp["usage"]["prompt_tokens"] == json!(want), "{resp}");
    let completion = json!({"prompt": "abc def ghi", "max_tokens": 3});
    let resp = post(&sim, "/v1/completions", &bytes(&completion))?;
    let want = tok
        .prompt_tokens(&bytes(&completion), PromptKind::Completion)?
        .len();
    ensure!(resp["usage"]["prompt_tokens"] == json!(want), "{resp}");

    Ok(())
}

/// An agent conversation: an 8 KB system prompt and `turns` alternating 2 KB turns of the
/// workload generator's filler text (16 turns: ~40 KB).
fn big_conversation(turns: usize) -> Value {
    let mut words = lb_sim::workload::text::Words::new(7);
    let mut messages = vec![json!({"role": "system", "content": words.take(2000)})];
    for i in 0..turns {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        messages.push(json!({"role": role, "content": words.take(500)}));
    }
    json!({"messages": messages})
}

#[test]
#[ignore = "prints timings; run with --ignored --nocapture (numbers mean little unoptimized)"]
fn encode_timing_40kb_chat() -> Result<()> {
    let dir = TempDir::new("standin-tokenizer-timing");
    export(&dir.0)?;
    let body = bytes(&big_conversation(16));
    let next = {
        // The next agent step: the same conversation plus one new user message.
        let mut v = big_conversation(16);
        if let Some(m) = v["messages"].as_array_mut() {
            m.push(json!({"role": "user", "content": "and now summarize all of it."}));
        }
        bytes(&v)
    };
    let t0 = Instant::now();
    let tok = ChatTokenizer::from_dir(&dir.0)?;
    let load = t0.elapsed();
    let text = tok.render_chat_body(&body)?;
    let best = |f: &mut dyn FnMut() -> Result<usize>, n: usize| -> Result<(Duration, usize)> {
        let mut best = Duration::MAX;
        let mut out = 0;
        for _ in 0..n {
            let t = Instant::now();
            out = f()?;
            best = best.min(t.elapsed());
        }
        Ok((best, out))
    };
    let (render, _) = best(&mut || Ok(tok.render_chat_body(&body)?.len()), 5)?;
    let (uncached, n) = best(&mut || Ok(tok.encode_uncached(&text, false)?.len()), 3)?;
    let t = Instant::now();
    let cold_ids = tok.prompt_tokens(&body, PromptKind::Chat)?;
    let cold = t.elapsed();
    let (warm, _) = best(
        &mut || Ok(tok.prompt_tokens(&body, PromptKind::Chat)?.len()),
        20,
    )?;
    let t = Instant::now();
    let next_ids = tok.prompt_tokens(&next, PromptKind::Chat)?;
    let step = t.elapsed();
    ensure!(cold_ids.len() == n && next_ids.len() > n);
    println!(
        "prompt: {} bytes of body, {} chars rendered, {} tokens\n\
         load {load:?}; render only {render:?}; encode uncached {uncached:?}\n\
         prompt_tokens cold {cold:?}; warm {warm:?}; next turn (one new message) {step:?}",
        body.len(),
        text.len(),
        n
    );
    Ok(())
}
