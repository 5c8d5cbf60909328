//! `lb-sim`: a faithful, fast simulator of vLLM 0.33 as a router sees it.
//!
//! One process hosts N simulated instances, each with its own engine ([`engine`]), KV block pool
//! with automatic prefix caching ([`prefix_cache`]), OpenAI-compatible HTTP API ([`api`], with
//! the Responses API and its per-instance response store in [`responses`]), Prometheus metrics
//! ([`metrics`]), optional KV event publisher ([`kv_events`]) and runtime faults ([`faults`]).
//! [`server`] wires them together; `src/main.rs` is only the CLI. Prompts are tokenized by the
//! stand-in [`tokenizer`], or in HF mode by a Hugging Face tokenizer ([`hf_tokenizer`]).
//! [`workload`] generates the agentic workloads that benchmarks and tests send to it.
//! [`pd`] simulates disaggregated prefill/decode with vLLM's NixlConnector protocol.
//! [`serving`] answers vLLM's non-generating routes (score, rerank, pooling, classify,
//! embeddings, detokenize, audio transcriptions and translations).

pub mod api;
pub mod config;
pub mod engine;
pub mod faults;
pub mod hf_tokenizer;
pub mod kv_events;
pub mod metrics;
pub mod pd;
pub mod prefix_cache;
pub mod responses;
pub mod server;
pub mod serving;
pub mod tokenizer;
pub mod workload;

pub use server::{Running, SimError, run, start};
