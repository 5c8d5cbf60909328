//! Trace replay: a JSONL file, one call per line, becomes a [`Workload`].
//!
//! Fields of a line (all optional but a prompt):
//!
//! | field | meaning |
//! |---|---|
//! | `id` | the call's name, for `parent` references (default: its line number, from 0) |
//! | `t_ms` (alias `timestamp`) | earliest send time after the start, milliseconds |
//! | `workflow`, `agent` | workflow (session) key and agent name |
//! | `parent` | id of an earlier call: this call is sent after it finished (lineage) |
//! | `tool_ms` | pause after the parent finished (tool time), milliseconds |
//! | `messages` | the chat messages, `[{"role","content"}]` |
//! | `prompt` | a prompt text (one user message) |
//! | `prompt_tokens` (alias `input_length`) | a prompt size; text is synthesized |
//! | `hash_ids` + `block_tokens` | Mooncake-style: the prompt is these blocks of `block_tokens` tokens (default 512), equal ids give equal text, so prefix sharing is kept |
//! | `output_tokens` (alias `output_length`) | tokens to generate (default 128) |
//!
//! A Mooncake trace line (`{"timestamp", "input_length", "output_length", "hash_ids"}`) is
//! therefore read as it is.

use std::collections::HashMap;

use serde::Deserialize;
use thiserror::Error;

use super::{Call, CallKind, Message, Workload, text::Words};

/// A trace line that cannot be used.
#[derive(Debug, Error)]
pub enum TraceError {
    /// Not JSON of the expected shape.
    #[error("line {line}: {source}")]
    Json {
        /// 1-based line number.
        line: usize,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A semantic problem.
    #[error("line {line}: {reason}")]
    Invalid {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    id: Option<String>,
    #[serde(alias = "timestamp")]
    t_ms: Option<f64>,
    workflow: Option<String>,
    agent: Option<String>,
    parent: Option<String>,
    tool_ms: Option<f64>,
    messages: Option<Vec<Message>>,
    prompt: Option<String>,
    #[serde(alias = "input_length")]
    prompt_tokens: Option<usize>,
    hash_ids: Option<Vec<u64>>,
    block_tokens: Option<usize>,
    #[serde(alias = "output_length")]
    output_tokens: Option<usize>,
}

/// Parses a JSONL trace (blank lines are skipped).
pub fn parse(text: &str, model: &str, stream: bool) -> Result<Workload, TraceError> {
    let mut calls: Vec<Call> = Vec::new();
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut workflows: HashMap<String, usize> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(raw).map_err(|source| TraceError::Json {
            line: line_no,
            source,
        })?;
        let bad = |reason: String| TraceError::Invalid {
            line: line_no,
            reason,
        };
        let messages = match (l.messages, l.prompt, l.prompt_tokens, l.hash_ids) {
            (Some(m), None, None, None) if !m.is_empty() => m,
            (None, Some(p), None, None) => vec![user(p)],
            (None, None, n, Some(h)) => {
                let bt = l.block_tokens.unwrap_or(512).max(1);
                let total = n.unwrap_or(h.len() * bt);
                let blocks = h.len();
                if blocks == 0 || total > blocks * bt || total <= (blocks - 1) * bt {
                    return Err(bad(format!(
                        "{total} prompt tokens do not fit {blocks} blocks of {bt}"
                    )));
                }
                let mut text = String::new();
                let mut left = total;
                for id in h {
                    let n = left.min(bt);
                    text.push_str(&Words::new(id ^ 0x6861_7368).take(n));
                    left -= n;
                }
                vec![user(text)]
            }
            (None, None, Some(n), None) => {
                vec![user(Words::new(line_no as u64).take(n))]
            }
            _ => {
                return Err(bad(
                    "give exactly one of messages, prompt, prompt_tokens or hash_ids".to_owned(),
                ));
            }
        };
        let id = calls.len();
        let name = l.id.unwrap_or_else(|| (line_no - 1).to_string());
        if ids.insert(name.clone(), id).is_some() {
            return Err(bad(format!("duplicate id {name:?}")));
        }
        let parent = match &l.parent {
            Some(p) => Some(
                *ids.get(p)
                    .ok_or_else(|| bad(format!("parent {p:?} is not an earlier call")))?,
            ),
            None => None,
        };
        let (workflow, workflow_index, kind) = match l.workflow {
            Some(w) if !w.is_empty() => {
                let n = workflows.len();
                let idx = *workflows.entry(w.clone()).or_insert(n);
                (w, idx, CallKind::Agent)
            }
            _ => (String::new(), usize::MAX, CallKind::Stateless),
        };
        let ms = |v: Option<f64>| v.filter(|x| x.is_finite() && *x > 0.0).unwrap_or(0.0) as u64;
        calls.push(Call {
            id,
            workflow,
            workflow_index,
            agent: l.agent.unwrap_or_else(|| "agent".to_owned()),
            kind,
            parent,
            deps: parent.into_iter().collect(),
            at_ms: ms(l.t_ms),
            delay_ms: ms(l.tool_ms),
            messages,
            max_tokens: l.output_tokens.unwrap_or(128).max(1),
            last_of_workflow: false,
        });
    }
    let mut last: HashMap<usize, usize> = HashMap::new();
    for c in &calls {
        if c.workflow_index != usize::MAX {
            last.insert(c.workflow_index, c.id);
        }
    }
    for id in last.into_values() {
        calls[id].last_of_workflow = true;
    }
    Ok(Workload {
        calls,
        workflows: workflows.len(),
        stream,
        model: model.to_owned(),
    })
}

fn user(content: String) -> Message {
    Message {
        role: "user".to_owned(),
        content,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_format_with_lineage() {
        let t = r#"{"id":"p","t_ms":5,"workflow":"w1","agent":"planner","prompt":"hello there","output_tokens":8}
{"id":"c","workflow":"w1","agent":"worker","parent":"p","tool_ms":250,"messages":[{"role":"system","content":"s"},{"role":"user","content":"u"}]}

{"prompt_tokens":40}"#;
        let w = parse(t, "m", true).expect("parses");
        assert_eq!(w.calls.len(), 3);
        assert_eq!(w.workflows, 1);
        assert_eq!(w.calls[0].at_ms, 5);
        assert_eq!(w.calls[1].deps, vec![0]);
        assert_eq!(w.calls[1].delay_ms, 250);
        assert_eq!(w.calls[1].messages.len(), 2);
        assert!(w.calls[1].last_of_workflow && !w.calls[0].last_of_workflow);
        assert_eq!(w.calls[2].kind, CallKind::Stateless);
        assert_eq!(w.calls[2].messages[0].content.len(), 160);
    }

    #[test]
    fn mooncake_lines_share_text_by_hash_id() {
        let t = r#"{"timestamp": 0, "input_length": 1000, "output_length": 10, "hash_ids": [1, 2]}
{"timestamp": 100, "input_length": 700, "output_length": 10, "hash_ids": [1, 3]}"#;
        let w = parse(t, "m", false).expect("parses");
        let a = &w.calls[0].messages[0].content;
        let b = &w.calls[1].messages[0].content;
        assert_eq!(a.len(), 4000);
        assert_eq!(b.len(), 2800);
        assert_eq!(a[..2048], b[..2048]);
        assert_ne!(a[2048..2400], b[2048..2400]);
        assert_eq!(w.calls[1].at_ms, 100);
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse(
            "{\"prompt\":\"x\"}\n{\"parent\":\"nope\",\"prompt\":\"y\"}",
            "m",
            false,
        )
        .expect_err("unknown parent");
        assert!(e.to_string().starts_with("line 2:"), "{e}");
        let e =
            parse("{\"prompt\":\"x\",\"prompt_tokens\":3}", "m", false).expect_err("two prompts");
        assert!(e.to_string().contains("exactly one"), "{e}");
        let e = parse("{\"bogus\":1}", "m", false).expect_err("unknown field");
        assert!(e.to_string().starts_with("line 1:"), "{e}");
        let e = parse("{\"hash_ids\":[1],\"input_length\":600}", "m", false).expect_err("too long");
        assert!(e.to_string().contains("do not fit"), "{e}");
    }
}
