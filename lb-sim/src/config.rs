//! Simulator configuration: latency presets, engine limits and per-process settings.
//!
//! The latency model is the BLIS "blackbox" step model (see `research/agentic.md` §4.2):
//! `step = β0 + β1 · uncached_prefill_tokens_in_step + β2 · decode_sequences_in_step`.
//! Two presets exist:
//! - `h100-8b` (default): Llama-3.1-8B on one H100, TP1, BLIS fit on vLLM 0.8.4:
//!   β0 = 5.753 ms, β1 = 17.25 µs/token, β2 = 6.00 µs/sequence, 29,205 blocks of 16 tokens.
//! - `conservative`: llm-d-inference-sim "8B on H100" fine profile: 30 ms + 250 µs per
//!   prefill token, 12 ms ITL. Expressed in the same step model by putting the 30 ms
//!   prefill overhead into a per-step term that only applies to steps that contain a
//!   prefill (`prefill_overhead`), and β0 = 12 ms.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::hf_tokenizer::HfTokenizer;

/// Errors found while validating a configuration.
#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    /// A numeric setting is outside its allowed range.
    #[error("invalid value for {name}: {reason}")]
    Invalid {
        /// The setting's name.
        name: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// An unknown preset name.
    #[error("unknown preset {0:?} (expected h100-8b or conservative)")]
    UnknownPreset(String),
}

/// Coefficients of the step latency model, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyModel {
    /// β0: fixed cost of every engine step.
    pub beta0: f64,
    /// β1: cost per uncached prefill token computed in the step.
    pub beta1: f64,
    /// β2: cost per decode sequence in the step.
    pub beta2: f64,
    /// Extra fixed cost of a step that contains any prefill tokens (0 for the BLIS fit).
    pub prefill_overhead: f64,
}

impl LatencyModel {
    /// Duration of one engine step, in (virtual) seconds.
    pub fn step_seconds(&self, prefill_tokens: usize, decode_seqs: usize) -> f64 {
        let mut t =
            self.beta0 + self.beta1 * prefill_tokens as f64 + self.beta2 * decode_seqs as f64;
        if prefill_tokens > 0 {
            t += self.prefill_overhead;
        }
        t
    }
}

/// A named hardware/model preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// Llama-3.1-8B on one H100 (BLIS fit).
    H100Llama8b,
    /// llm-d-inference-sim's pessimistic 8B profile.
    Conservative,
}

impl Preset {
    /// Parses a preset name.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        match s {
            "h100-8b" | "default" | "llama-3.1-8b-h100" => Ok(Self::H100Llama8b),
            "conservative" => Ok(Self::Conservative),
            other => Err(ConfigError::UnknownPreset(other.to_string())),
        }
    }

    /// The preset's latency model.
    pub fn latency(self) -> LatencyModel {
        match self {
            Self::H100Llama8b => LatencyModel {
                beta0: 5.753e-3,
                beta1: 17.25e-6,
                beta2: 6.0e-6,
                prefill_overhead: 0.0,
            },
            Self::Conservative => LatencyModel {
                beta0: 12e-3,
                beta1: 250e-6,
                beta2: 0.0,
                prefill_overhead: 18e-3,
            },
        }
    }

    /// The preset's KV pool size in blocks (of 16 tokens).
    pub fn num_gpu_blocks(self) -> usize {
        29_205
    }
}

/// Settings of one simulated engine (one vLLM instance).
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Served model name.
    pub model: String,
    /// Maximum prompt + output length.
    pub max_model_len: usize,
    /// Maximum number of running sequences.
    pub max_num_seqs: usize,
    /// Token budget of one step (chunked prefill).
    pub max_num_batched_tokens: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Number of KV blocks in the pool.
    pub num_gpu_blocks: usize,
    /// Automatic prefix caching on/off.
    pub enable_prefix_caching: bool,
    /// Step latency model.
    pub latency: LatencyModel,
    /// Virtual seconds per wall-clock second.
    pub time_scale: f64,
    /// Output length when a request sets no `max_tokens`.
    pub default_max_tokens: usize,
    /// Characters per token of the stand-in tokenizer.
    pub chars_per_token: f64,
    /// HF mode: render and tokenize with this Hugging Face tokenizer instead of the stand-in
    /// (`--tokenizer <dir>`, see [`crate::hf_tokenizer`]).
    pub hf_tokenizer: Option<Arc<HfTokenizer>>,
    /// Tokens per SSE event when the client keeps up (1 = one event per engine step).
    pub stream_interval: usize,
    /// Responses API objects kept in the instance's memory (oldest evicted first); 0 disables
    /// the store, as vLLM without `VLLM_ENABLE_RESPONSES_API_STORE=1`.
    pub max_stored_responses: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        let preset = Preset::H100Llama8b;
        Self {
            model: "meta-llama/Llama-3.1-8B-Instruct".to_string(),
            max_model_len: 131_072,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            block_size: 16,
            num_gpu_blocks: preset.num_gpu_blocks(),
            enable_prefix_caching: true,
            latency: preset.latency(),
            time_scale: 1.0,
            default_max_tokens: 128,
            chars_per_token: 4.0,
            hf_tokenizer: None,
            stream_interval: 1,
            max_stored_responses: 10_000,
        }
    }
}

impl EngineConfig {
    /// Checks ranges; returns the first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad(name: &'static str, reason: &str) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid {
                name,
                reason: reason.to_string(),
            })
        }
        if self.block_size == 0 || self.block_size > 4096 {
            return bad("block_size", "must be in 1..=4096");
        }
        if self.num_gpu_blocks == 0 {
            return bad("num_gpu_blocks", "must be > 0");
        }
        if self.num_gpu_blocks >= u32::MAX as usize {
            return bad("num_gpu_blocks", "too large");
        }
        if self.max_num_seqs == 0 {
            return bad("max_num_seqs", "must be > 0");
        }
        if self.max_num_batched_tokens == 0 {
            return bad("max_num_batched_tokens", "must be > 0");
        }
        if self.stream_interval == 0 {
            return bad("stream_interval", "must be >= 1");
        }
        if self.max_model_len < 2 {
            return bad("max_model_len", "must be >= 2");
        }
        if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
            return bad("time_scale", "must be a positive number");
        }
        if !(self.chars_per_token >= 1.0 && self.chars_per_token <= 16.0) {
            return bad("chars_per_token", "must be in 1..=16");
        }
        let l = &self.latency;
        for (name, v) in [
            ("beta0", l.beta0),
            ("beta1", l.beta1),
            ("beta2", l.beta2),
            ("prefill_overhead", l.prefill_overhead),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ConfigError::Invalid {
                    name,
                    reason: "must be a non-negative number".to_string(),
                });
            }
        }
        if l.beta0 <= 0.0 {
            return bad("beta0", "must be > 0 (a step takes time)");
        }
        Ok(())
    }

    /// Converts a virtual duration to wall-clock time.
    pub fn to_wall(&self, virtual_secs: f64) -> Duration {
        Duration::from_secs_f64((virtual_secs / self.time_scale).max(0.0))
    }
}

/// KV event publisher settings of a process (ports per instance are derived).
#[derive(Debug, Clone, PartialEq)]
pub struct KvEventsConfig {
    /// PUB port of instance 0; instance i uses `base_port + 2i`, replay `base_port + 2i + 1`.
    pub base_port: u16,
    /// Topic prefix sent as the first frame.
    pub topic: String,
    /// Batches kept for replay.
    pub buffer_steps: usize,
}

/// Disaggregated prefill/decode settings of a process (see [`crate::pd`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PdConfig {
    /// KV roles: one for every instance, or one per instance (`--kv-role producer,consumer`).
    pub roles: Vec<crate::pd::KvRole>,
    /// Virtual seconds a prefill instance keeps a finished prefill's KV for a decode instance
    /// to pull (vLLM's `VLLM_NIXL_ABORT_REQUEST_TIMEOUT`, 480 s).
    pub transfer_timeout_s: f64,
    /// Virtual seconds per transferred token of a KV pull (2 µs ≈ a fast NIXL link).
    pub transfer_time_per_token_s: f64,
    /// Pending transfers an instance keeps at most (the oldest is dropped beyond).
    pub max_pending_transfers: usize,
}

impl Default for PdConfig {
    fn default() -> Self {
        Self {
            roles: vec![crate::pd::KvRole::Both],
            transfer_timeout_s: 480.0,
            transfer_time_per_token_s: 2e-6,
            max_pending_transfers: 10_000,
        }
    }
}

impl PdConfig {
    /// Checks ranges against the number of instances of the process.
    pub fn validate(&self, instances: usize) -> Result<(), ConfigError> {
        let bad = |name: &'static str, reason: &str| ConfigError::Invalid {
            name,
            reason: reason.to_string(),
        };
        if self.roles.is_empty() || (self.roles.len() != 1 && self.roles.len() != instances) {
            return Err(bad(
                "kv_role",
                &format!(
                    "give one role or one per instance ({instances}), got {}",
                    self.roles.len()
                ),
            ));
        }
        if !(self.transfer_timeout_s.is_finite() && self.transfer_timeout_s > 0.0) {
            return Err(bad("kv_transfer_timeout", "must be a positive number"));
        }
        if !(self.transfer_time_per_token_s.is_finite() && self.transfer_time_per_token_s >= 0.0) {
            return Err(bad(
                "kv_transfer_time_per_token",
                "must be a non-negative number",
            ));
        }
        if self.max_pending_transfers == 0 {
            return Err(bad("max_pending_transfers", "must be > 0"));
        }
        Ok(())
    }

    /// The role of instance `idx`.
    pub fn role_of(&self, idx: usize) -> crate::pd::KvRole {
        match self.roles.as_slice() {
            [one] => *one,
            many => many.get(idx).copied().unwrap_or_default(),
        }
    }
}

/// Settings of the whole `vllm-sim` process.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Engine settings shared by every instance.
    pub engine: EngineConfig,
    /// Number of simulated backends.
    pub instances: usize,
    /// Address to bind (loopback by default).
    pub host: String,
    /// Port of instance 0 (0 = pick free ports).
    pub base_port: u16,
    /// Optional process admin port (faults across instances, including un-refusing).
    pub admin_port: Option<u16>,
    /// Optional KV event publishing.
    pub kv_events: Option<KvEventsConfig>,
    /// Fault to apply to every instance at start.
    pub initial_fault: Option<crate::faults::FaultSpec>,
    /// Where to write the `{"instances":[{"port":..}]}` JSON once all listeners are bound.
    pub ports_file: Option<std::path::PathBuf>,
    /// Worker threads of the tokio runtime (0 = current-thread runtime).
    pub worker_threads: usize,
    /// Disaggregated prefill/decode (roles, transfer timing).
    pub pd: PdConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            engine: EngineConfig::default(),
            instances: 1,
            host: "127.0.0.1".to_string(),
            base_port: 8000,
            admin_port: None,
            kv_events: None,
            initial_fault: None,
            ports_file: None,
            worker_threads: 1,
            pd: PdConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_preset_numbers() {
        let l = Preset::H100Llama8b.latency();
        // A pure decode step with 64 sequences: 5.753 ms + 64 * 6 µs ≈ 6.137 ms.
        let s = l.step_seconds(0, 64);
        assert!((s - 6.137e-3).abs() < 1e-6, "{s}");
        // A 1,000-token prefill step alone: 5.753 + 17.25 = 23.003 ms.
        let s = l.step_seconds(1000, 0);
        assert!((s - 23.003e-3).abs() < 1e-6, "{s}");
    }

    #[test]
    fn conservative_matches_profile() {
        let l = Preset::Conservative.latency();
        // TTFT of a 256-token prompt alone = 30 ms + 256 * 250 µs = 94 ms.
        assert!((l.step_seconds(256, 0) - 0.094).abs() < 1e-9);
        // ITL is 12 ms whatever the batch.
        assert!((l.step_seconds(0, 100) - 0.012).abs() < 1e-9);
    }

    #[test]
    fn validation_rejects_bad_values() {
        let mut c = EngineConfig::default();
        assert!(c.validate().is_ok());
        c.time_scale = 0.0;
        assert!(c.validate().is_err());
        c = EngineConfig {
            block_size: 0,
            ..EngineConfig::default()
        };
        assert!(c.validate().is_err());
        assert!(Preset::parse("nope").is_err());
    }

    #[test]
    fn pd_roles_one_or_per_instance() {
        use crate::pd::KvRole;
        let mut p = PdConfig::default();
        assert!(p.validate(3).is_ok());
        assert_eq!(p.role_of(2), KvRole::Both);
        p.roles = vec![KvRole::Producer, KvRole::Consumer];
        assert!(p.validate(3).is_err());
        assert!(p.validate(2).is_ok());
        assert_eq!(p.role_of(1), KvRole::Consumer);
        p.transfer_timeout_s = 0.0;
        assert!(p.validate(2).is_err());
    }
}
