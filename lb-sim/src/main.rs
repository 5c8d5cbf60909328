//! `vllm-sim`: CLI → [`lb_sim::run`]. See `lb-sim/README.md`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use lb_sim::config::{EngineConfig, KvEventsConfig, PdConfig, Preset, SimConfig};
use lb_sim::faults::FaultSpec;
use lb_sim::hf_tokenizer::{self, HfTokenizer};
use lb_sim::pd::KvRole;

#[derive(Parser, Debug)]
#[command(
    name = "vllm-sim",
    version,
    about = "A fast simulated vLLM 0.33 server (one or many instances)"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Set a fault on a running instance: `vllm-sim fault --url http://127.0.0.1:9000 slow:3`.
    Fault {
        /// Base URL of the instance (its `/sim/fault`), or of the admin port with `--instance`.
        #[arg(long)]
        url: String,
        /// With an admin-port URL: the instance index or `all`.
        #[arg(long)]
        instance: Option<String>,
        /// none | refuse | 503 | hang | slow:K | reset:N | die
        spec: String,
        /// Revert to `none` after this many seconds.
        #[arg(long)]
        duration: Option<f64>,
    },
    /// Write the HF-format stand-in tokenizer (`tokenizer.json`, `tokenizer_config.json`) into
    /// DIR and exit; serve with it using `--tokenizer DIR`.
    ExportTokenizer {
        /// Output directory (created if missing).
        dir: PathBuf,
    },
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port of instance 0; instance i listens on base-port + i (0: free ports, see the ready line).
    #[arg(long, alias = "port", default_value_t = 8000)]
    base_port: u16,
    /// Number of simulated backends in this process.
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Served model name.
    #[arg(
        long,
        alias = "served-model-name",
        default_value = "meta-llama/Llama-3.1-8B-Instruct"
    )]
    model: String,
    /// Latency/KV preset: h100-8b (default) or conservative.
    #[arg(long, default_value = "h100-8b")]
    preset: String,
    /// Override β0 (ms per step).
    #[arg(long)]
    beta0_ms: Option<f64>,
    /// Override β1 (µs per uncached prefill token).
    #[arg(long)]
    beta1_us: Option<f64>,
    /// Override β2 (µs per decode sequence).
    #[arg(long)]
    beta2_us: Option<f64>,
    /// Override the per-step prefill overhead (ms, only for steps with prefill).
    #[arg(long)]
    prefill_overhead_ms: Option<f64>,
    /// Virtual seconds per wall second (e.g. 10 runs ten times faster).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Maximum prompt + output tokens per request.
    #[arg(long, default_value_t = 131_072)]
    max_model_len: usize,
    /// Maximum running sequences per engine step.
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    /// Token budget per engine step (chunked prefill).
    #[arg(long, default_value_t = 8192)]
    max_num_batched_tokens: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// KV pool size in blocks (default: the preset's, 29,205).
    #[arg(long)]
    num_gpu_blocks: Option<usize>,
    /// Disable automatic prefix caching.
    #[arg(long)]
    no_enable_prefix_caching: bool,
    /// Output length of requests without max_tokens (chat).
    #[arg(long, default_value_t = 128)]
    default_max_tokens: usize,
    /// Characters per token of the stand-in tokenizer.
    #[arg(long, default_value_t = 4.0)]
    chars_per_token: f64,
    /// HF mode: a directory with `tokenizer.json` and `tokenizer_config.json` (chat template);
    /// prompts are rendered and tokenized with it as vLLM does, instead of by the stand-in.
    #[arg(long, value_name = "DIR")]
    tokenizer: Option<PathBuf>,
    /// Tokens per SSE event (1 = one event per engine step, as vLLM streams by default).
    #[arg(long, default_value_t = 1)]
    stream_interval: usize,
    /// Responses API objects each instance keeps in memory for `previous_response_id` and
    /// `GET /v1/responses/{id}` (oldest evicted first; 0 = no store, like vLLM without
    /// VLLM_ENABLE_RESPONSES_API_STORE=1).
    #[arg(long, default_value_t = 10_000)]
    max_stored_responses: usize,
    /// Publish KV events (ZMQ PUB + replay ROUTER per instance).
    #[arg(long)]
    kv_events: bool,
    /// PUB port of instance 0 (replay = +1; instance i uses +2i). 0 = free ports.
    #[arg(long, default_value_t = 5557)]
    kv_events_base_port: u16,
    /// KV event topic.
    #[arg(long, default_value = "")]
    kv_events_topic: String,
    /// Batches kept for replay.
    #[arg(long, default_value_t = 10_000)]
    kv_events_buffer_steps: usize,
    /// Process admin port (faults for any instance, including undoing refuse/die).
    #[arg(long)]
    admin_port: Option<u16>,
    /// Fault applied to every instance at start (none|refuse|503|hang|slow:K|reset:N|die).
    #[arg(long)]
    fault: Option<String>,
    /// Write the ready JSON line (ports) to this file too.
    #[arg(long)]
    ports_file: Option<PathBuf>,
    /// Runtime worker threads (0 = single-threaded runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Disaggregated prefill/decode role (vLLM's kv_role): both | producer | consumer, or one
    /// per instance, comma-separated (`producer,producer,consumer`).
    #[arg(long, default_value = "both")]
    kv_role: String,
    /// Virtual seconds a prefill instance keeps a finished prefill's KV for its decode instance
    /// (vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT).
    #[arg(long, default_value_t = 480.0)]
    kv_transfer_timeout: f64,
    /// Virtual seconds per token of a KV transfer to a decode instance.
    #[arg(long, default_value_t = 2e-6)]
    kv_transfer_time_per_token: f64,
    /// Pending KV transfers an instance keeps at most (oldest dropped beyond).
    #[arg(long, default_value_t = 10_000)]
    max_pending_transfers: usize,
}

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<SimConfig> {
        let preset = Preset::parse(&self.preset)?;
        let mut latency = preset.latency();
        if let Some(v) = self.beta0_ms {
            latency.beta0 = v * 1e-3;
        }
        if let Some(v) = self.beta1_us {
            latency.beta1 = v * 1e-6;
        }
        if let Some(v) = self.beta2_us {
            latency.beta2 = v * 1e-6;
        }
        if let Some(v) = self.prefill_overhead_ms {
            latency.prefill_overhead = v * 1e-3;
        }
        let hf_tokenizer = match &self.tokenizer {
            Some(dir) => {
                Some(Arc::new(HfTokenizer::from_dir(dir).with_context(|| {
                    format!("loading the tokenizer in {}", dir.display())
                })?))
            }
            None => None,
        };
        let engine = EngineConfig {
            model: self.model,
            max_model_len: self.max_model_len,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            block_size: self.block_size,
            num_gpu_blocks: self.num_gpu_blocks.unwrap_or(preset.num_gpu_blocks()),
            enable_prefix_caching: !self.no_enable_prefix_caching,
            latency,
            time_scale: self.time_scale,
            default_max_tokens: self.default_max_tokens,
            chars_per_token: self.chars_per_token,
            hf_tokenizer,
            stream_interval: self.stream_interval,
            max_stored_responses: self.max_stored_responses,
        };
        engine.validate()?;
        if self.instances == 0 {
            bail!("--instances must be at least 1");
        }
        let initial_fault = self.fault.as_deref().map(FaultSpec::parse).transpose()?;
        let pd = PdConfig {
            roles: KvRole::parse_list(&self.kv_role)?,
            transfer_timeout_s: self.kv_transfer_timeout,
            transfer_time_per_token_s: self.kv_transfer_time_per_token,
            max_pending_transfers: self.max_pending_transfers,
        };
        pd.validate(self.instances)?;
        Ok(SimConfig {
            engine,
            instances: self.instances,
            host: self.host,
            base_port: self.base_port,
            admin_port: self.admin_port,
            kv_events: self.kv_events.then_some(KvEventsConfig {
                base_port: self.kv_events_base_port,
                topic: self.kv_events_topic,
                buffer_steps: self.kv_events_buffer_steps,
            }),
            initial_fault,
            ports_file: self.ports_file,
            worker_threads: self.threads,
            pd,
        })
    }
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let rt = if threads == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    Ok(rt)
}

async fn post_fault(
    url: &str,
    instance: Option<&str>,
    mut spec: FaultSpec,
) -> anyhow::Result<String> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    spec.validate()?;
    let base = url.trim_end_matches('/');
    let target = match instance {
        Some(i) => format!("{base}/instances/{i}/fault"),
        None => format!("{base}/sim/fault"),
    };
    if spec.duration_s.is_some_and(|d| d <= 0.0) {
        spec.duration_s = None;
    }
    let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::post(&target)
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(serde_json::to_vec(&spec)?)))?;
    let resp = client
        .request(req)
        .await
        .with_context(|| format!("POST {target}"))?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&body).to_string();
    if !status.is_success() {
        bail!("{target}: {status}: {text}");
    }
    Ok(text)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        Some(Cmd::Fault {
            url,
            instance,
            spec,
            duration,
        }) => {
            let mut spec = FaultSpec::parse(&spec)?;
            spec.duration_s = duration;
            let rt = runtime(0)?;
            let out = rt.block_on(post_fault(&url, instance.as_deref(), spec))?;
            println!("{out}");
            Ok(())
        }
        Some(Cmd::ExportTokenizer { dir }) => {
            hf_tokenizer::export_standin(&dir)
                .with_context(|| format!("writing the tokenizer to {}", dir.display()))?;
            println!("{}", dir.display());
            Ok(())
        }
        None => {
            let cfg = cli.serve.into_config()?;
            lb_sim::server::raise_nofile_limit();
            let rt = runtime(cfg.worker_threads)?;
            rt.block_on(lb_sim::run(cfg))?;
            Ok(())
        }
    }
}
