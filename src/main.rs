//! The `rft` command line: train, generate, score, sft, merge, eval, data, plot, bench.
//! A thin layer over the library: parse options, load, call the engine, print JSON lines.
//! Errors surface as one readable line on stderr and a non-zero exit status.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use rft::cpu::engine::CpuEngine;
use rft::data::input::{encode_completion, encode_prompt, read_inputs, PromptSpec};
use rft::engine::Engine;
// What `rft merge` / `rft sft --full` write into their output directory.
use rft::lora::peft::MERGED_FILES;
use rft::model::tokenizer::Tokenizer;
use rft::sampling::{SamplingParams, StopCriteria};
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "rft",
    version,
    about = "Reinforcement fine-tuning (GRPO over LoRA) for Hugging Face models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Device {
    Cpu,
    Cuda,
    Auto,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Backend: cpu (f32 reference), cuda, or auto (cuda when available, else cpu).
    #[arg(long, value_enum, default_value = "cpu")]
    device: Device,
}

#[derive(Subcommand)]
enum Cmd {
    /// Sample completions; prints one JSON object per sample on stdout.
    Generate {
        #[command(flatten)]
        m: ModelArgs,
        /// A prompt given inline (raw text, no template unless --chat).
        #[arg(long, conflicts_with = "input", required_unless_present = "input")]
        prompt: Option<String>,
        /// Wrap --prompt as a user message and render the model's chat template.
        #[arg(long, requires = "prompt")]
        chat: bool,
        /// JSONL file: {"prompt": ..} | {"messages": [..]} | {"prompt_ids": [..]} per line.
        #[arg(long)]
        input: Option<PathBuf>,
        #[arg(long, default_value_t = 256)]
        max_new_tokens: usize,
        /// 0 means greedy.
        #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
        top_p: f32,
        /// 0 means off.
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// 0 means off.
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        min_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Samples per prompt (G).
        #[arg(long, default_value_t = 1)]
        num_samples: usize,
        /// Stop when the completion contains this text (repeatable).
        #[arg(long = "stop")]
        stop: Vec<String>,
        /// Do not stop at the model's EOS tokens.
        #[arg(long)]
        ignore_eos: bool,
        /// Sequences decoded together (memory bound; results do not depend on it).
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
    },
    /// Draw RUN_DIR/plot.png from RUN_DIR/metrics.jsonl.
    Plot {
        /// A run's output directory.
        run_dir: PathBuf,
    },
    /// Log-probabilities of given completions; one JSON object per input line.
    Score {
        #[command(flatten)]
        m: ModelArgs,
        /// JSONL with prompt/messages/prompt_ids and completion/completion_ids per line.
        #[arg(long)]
        input: PathBuf,
        /// Logits are divided by this before the log-softmax.
        #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
        temperature: f32,
    },
    /// GRPO training from a TOML config (no config: the embedded default on the tiny model).
    Train(TrainArgs),
    /// Greedy validation accuracy of a model (and adapter) on a config's validation set.
    Eval {
        /// TOML config (default: the embedded one); its [data] and grader are used.
        config: Option<PathBuf>,
        /// Overrides the config's model directory.
        #[arg(long)]
        model: Option<PathBuf>,
        /// A PEFT adapter to evaluate.
        #[arg(long)]
        adapter: Option<PathBuf>,
    },
    /// Print a config's data as JSONL: the training prompts, the validation prompts, or
    /// labelled (prompt, completion) pairs of a built-in task for `rft sft`.
    Data {
        /// TOML config (default: the embedded one).
        config: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "train")]
        split: DataSplit,
        /// How many rows (default: all; required for --split sft).
        #[arg(long)]
        num: Option<usize>,
    },
    /// Supervised fine-tuning (cross-entropy on completions) of a LoRA adapter or all weights.
    Sft(SftArgs),
    /// Benchmarks (need a GPU).
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Merge a PEFT LoRA adapter into the base weights; writes an HF model directory.
    Merge {
        /// Base Hugging Face model directory.
        #[arg(long)]
        model: PathBuf,
        /// PEFT adapter directory.
        #[arg(long)]
        adapter: PathBuf,
        /// Output directory (config, tokenizer files, f32 model.safetensors).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// CUDA rollout throughput on random weights of a real model shape (no files needed).
    Rollout {
        /// qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b, llama3.2-1b, or a model directory (its
        /// config.json's shape; the weights are random either way).
        #[arg(long, default_value = "qwen2.5-0.5b")]
        shape: String,
        #[arg(long, default_value_t = 8)]
        prompts: usize,
        /// Samples per prompt (G).
        #[arg(long, default_value_t = 8)]
        num_generations: usize,
        #[arg(long, default_value_t = 128)]
        prompt_len: usize,
        #[arg(long, default_value_t = 256)]
        new_tokens: usize,
        /// Rank of a live random LoRA adapter on every projection, as in GRPO's rollouts (0: none).
        #[arg(long, default_value_t = 0)]
        lora_rank: usize,
        /// Peak memory bandwidth in bytes/s for the roofline fraction (H200: 4.24e12 measured).
        #[arg(long, default_value_t = 4.24e12, allow_negative_numbers = true)]
        peak_bandwidth: f64,
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// Print one JSON object instead of a text summary.
        #[arg(long)]
        json: bool,
    },
    /// One CUDA GRPO training step (forward, loss, LoRA backward, AdamW) on random weights of
    /// a real model shape: step time, tokens/s, peak GPU memory.
    Train {
        /// qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b, llama3.2-1b, or a model directory (its
        /// config.json's shape; the weights are random either way).
        #[arg(long, default_value = "qwen2.5-0.5b")]
        shape: String,
        #[arg(long, default_value_t = 64)]
        sequences: usize,
        /// Tokens per sequence (prompt + completion).
        #[arg(long, default_value_t = 384)]
        seq_len: usize,
        /// Prompt tokens per sequence (the rest are scored completion tokens).
        #[arg(long, default_value_t = 128)]
        prompt_len: usize,
        /// LoRA rank on every projection.
        #[arg(long, default_value_t = 16)]
        lora_rank: usize,
        /// Activation memory: `layer` recomputes each layer in the backward, `none` saves all.
        #[arg(long, value_enum, default_value = "layer")]
        recompute: RecomputeArg,
        /// With `--recompute layer`, keep the last K layers' activations (their backward skips
        /// the recompute: faster, K layers' activations more memory).
        #[arg(long, default_value_t = 0)]
        keep_layers: usize,
        /// Sequences per forward/backward (0: the whole batch at once).
        #[arg(long, default_value_t = 0)]
        micro_batch_size: usize,
        /// Cap the training step's device memory (activations, backward scratch, lm_head chunk,
        /// LoRA state; not the weights) at this many GiB: a layout that does not fit falls back
        /// to smaller micro-batches, then layer recompute (the JSON says which ran). 0: no cap
        /// beyond the free device memory.
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        max_train_memory_gib: f64,
        /// Train every weight (f32 master weights, grads, AdamW moments: 16 bytes a parameter)
        /// instead of a LoRA adapter; --lora-rank is then unused.
        #[arg(long)]
        full_fine_tuning: bool,
        /// Timed steps (after one warm-up step); the median is reported.
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// Print one JSON object instead of a text summary.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum RecomputeArg {
    Layer,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DataSplit {
    Train,
    Val,
    Sft,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// TOML config (keys follow TRL's GRPOConfig; see the README). Default: the embedded
    /// configs/default.toml (GRPO on the tiny model in models/).
    config: Option<PathBuf>,
    /// Overrides the config's `device`.
    #[arg(long, value_enum)]
    device: Option<Device>,
    /// Where metrics.jsonl, checkpoints, adapters, plot.png and summary.json go.
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Continue a run from its checkpoint (a run directory or its `checkpoint/`). Without a
    /// CONFIG the checkpoint's own config is used.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Overrides the config's `max_steps`.
    #[arg(long)]
    max_steps: Option<usize>,
    /// No progress bar (metrics still go to metrics.jsonl).
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct SftArgs {
    /// Hugging Face model directory (with --init-random: config.json + tokenizer files only).
    #[arg(long)]
    model: PathBuf,
    /// JSONL: {"prompt" | "messages" | "prompt_ids", "completion" | "completion_ids"} per line.
    #[arg(long)]
    data: PathBuf,
    /// Output: a PEFT adapter (LoRA) or an HF model directory (--full).
    #[arg(long)]
    output: PathBuf,
    #[arg(long, default_value_t = 16)]
    lora_r: usize,
    #[arg(long, default_value_t = 32.0, allow_negative_numbers = true)]
    lora_alpha: f32,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    lora_dropout: f32,
    /// scale = alpha / sqrt(r) instead of alpha / r.
    #[arg(long)]
    use_rslora: bool,
    /// Comma-separated module names, or all-linear.
    #[arg(long, default_value = "all-linear")]
    target_modules: String,
    /// Train every weight instead of a LoRA adapter.
    #[arg(long)]
    full: bool,
    /// Train from scratch: random weights (normal, std = initializer_range or 0.02; norms 1)
    /// from this seed instead of the directory's safetensors. Implies --full.
    #[arg(long)]
    init_random: Option<u64>,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Examples per optimiser step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Examples per forward/backward (0: the whole batch); results do not depend on it.
    #[arg(long, default_value_t = 0)]
    micro_batch_size: usize,
    #[arg(long, default_value_t = 2e-4, allow_negative_numbers = true)]
    lr: f64,
    /// constant, constant_with_warmup, linear, cosine.
    #[arg(long, default_value = "linear")]
    lr_scheduler: String,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    warmup_ratio: f64,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    weight_decay: f64,
    /// 0 disables clipping.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    max_grad_norm: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop after this many optimiser steps (0: run every epoch).
    #[arg(long, default_value_t = 0)]
    max_steps: usize,
    /// Print a loss line every N steps (and at the last step).
    #[arg(long, default_value_t = 10)]
    log_every: usize,
    /// Do not append the model's EOS token to each completion.
    #[arg(long)]
    no_eos: bool,
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            // One readable line (clap's first), then the usage hint.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("{first} (see `rft --help`)");
            std::process::exit(2);
        }
        Err(e) => e.exit(), // --help, --version
    };
    if let Err(e) = run(cli) {
        let msg = format!("{e:#}");
        eprintln!("error: {}", msg.replace('\n', " "));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Generate {
            m,
            prompt,
            chat,
            input,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            min_p,
            seed,
            num_samples,
            stop,
            ignore_eos,
            batch_size,
        } => {
            let params = SamplingParams {
                temperature,
                top_k,
                top_p,
                min_p,
                seed,
                first_stream: 0,
            };
            params.validate()?;
            if batch_size == 0 {
                bail!("--batch-size must be at least 1");
            }
            if stop.iter().any(String::is_empty) {
                bail!("--stop: an empty stop string matches nothing; give the text to stop at");
            }
            let (mut engine, tok) = load(&m)?;
            let prompts: Vec<Vec<u32>> = match (&prompt, &input) {
                (Some(text), _) => {
                    let spec = if chat {
                        PromptSpec::Messages(serde_json::json!([{"role": "user", "content": text}]))
                    } else {
                        PromptSpec::Text(text.clone())
                    };
                    vec![encode_prompt(&spec, &tok)?]
                }
                (None, Some(path)) => read_inputs(path, false)?
                    .iter()
                    .map(|l| {
                        let ids = encode_prompt(&l.prompt, &tok)
                            .with_context(|| format!("{}:{}", path.display(), l.line))?;
                        check_fits(engine.config(), ids.len(), 0)
                            .with_context(|| format!("{}:{}", path.display(), l.line))?;
                        Ok(ids)
                    })
                    .collect::<Result<_>>()?,
                (None, None) => bail!("give --prompt TEXT or --input FILE.jsonl"),
            };
            let eos = if ignore_eos {
                vec![]
            } else {
                engine.config().eos_token_ids.clone()
            };
            let stop = StopCriteria {
                eos_ids: eos,
                stop_strings: stop,
                max_new_tokens,
            };
            let decode = |ids: &[u32]| tok.decode(ids, false).unwrap_or_default();
            engine.set_max_batch_seqs(batch_size);
            let rollouts = engine.generate(&prompts, num_samples, &params, &stop, Some(&decode))?;
            let mut out = std::io::stdout().lock();
            for r in rollouts {
                let completion = tok.decode(&r.completion_ids, true)?;
                let line = serde_json::json!({
                    "prompt_ids": prompts[r.prompt_index],
                    "completion_ids": r.completion_ids,
                    "completion": completion,
                    "logprobs": r.logprobs,
                    "finish_reason": r.finish_reason,
                });
                writeln!(out, "{line}")?;
            }
            Ok(())
        }
        Cmd::Plot { run_dir } => {
            let png = rft::trainer::plot::plot_run(&run_dir)?;
            println!("{}", png.display());
            Ok(())
        }
        Cmd::Score {
            m,
            input,
            temperature,
        } => {
            let (mut engine, tok) = load(&m)?;
            let lines = read_inputs(&input, true)?;
            let mut items = Vec::with_capacity(lines.len());
            for l in &lines {
                let ctx = || format!("{}:{}", input.display(), l.line);
                let p = encode_prompt(&l.prompt, &tok).with_context(ctx)?;
                let c = l
                    .completion
                    .as_ref()
                    .ok_or_else(|| anyhow!("{}: missing completion", ctx()))?;
                let c = encode_completion(c, &tok).with_context(ctx)?;
                check_fits(engine.config(), p.len(), c.len()).with_context(ctx)?;
                items.push((p, c));
            }
            let scores = engine.score(&items, temperature)?;
            let mut out = std::io::stdout().lock();
            for ((_, c), lp) in items.iter().zip(scores) {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"completion_ids": c, "logprobs": lp})
                )?;
            }
            Ok(())
        }
        Cmd::Train(a) => train(a),
        Cmd::Bench {
            what:
                BenchCmd::Rollout {
                    shape,
                    prompts,
                    num_generations,
                    prompt_len,
                    new_tokens,
                    lora_rank,
                    peak_bandwidth,
                    device,
                    json,
                },
        } => {
            let r = rft::cuda::engine::bench_rollout(
                &shape,
                prompts,
                num_generations,
                prompt_len,
                new_tokens,
                lora_rank,
                peak_bandwidth,
                device,
            )
            .context("rft bench rollout")?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} on {}: {} prompts × {} samples, prompt {} + {} new tokens: {:.0} tok/s, \
                     {:.3} ms/decode step, {:.1}% of the {:.2} TB/s roofline, weights {:.2} GiB, \
                     plan {:.2} GiB, measured {:.2} GiB",
                    r.shape,
                    r.device,
                    r.prompts,
                    r.num_generations,
                    r.prompt_len,
                    r.new_tokens,
                    r.tok_s,
                    r.decode_ms_per_step,
                    100.0 * r.roofline_fraction,
                    r.peak_bandwidth_bytes_s / 1e12,
                    r.weight_bytes as f64 / (1u64 << 30) as f64,
                    r.plan_bytes as f64 / (1u64 << 30) as f64,
                    r.peak_gpu_bytes_measured as f64 / (1u64 << 30) as f64,
                );
                let skinny = r
                    .gemm_tuning
                    .iter()
                    .filter(|t| matches!(t.choice, rft::cuda::GemmChoice::Skinny { .. }))
                    .count();
                println!(
                    "decode GEMMs ({}): {} shapes timed, {skinny} on the skinny kernel, the rest on cuBLAS",
                    r.gemm_policy,
                    r.gemm_tuning.len()
                );
            }
            Ok(())
        }
        Cmd::Bench {
            what:
                BenchCmd::Train {
                    shape,
                    sequences,
                    seq_len,
                    prompt_len,
                    lora_rank,
                    recompute,
                    keep_layers,
                    micro_batch_size,
                    max_train_memory_gib,
                    full_fine_tuning,
                    steps,
                    device,
                    json,
                },
        } => {
            let budget = rft::trainer::run::memory_budget_bytes(max_train_memory_gib)
                .context("--max-train-memory-gib")?;
            let r = rft::cuda::train::bench_train(
                &shape,
                sequences,
                seq_len,
                prompt_len,
                lora_rank,
                match recompute {
                    RecomputeArg::Layer => rft::cpu::train::Recompute::Layer,
                    RecomputeArg::None => rft::cpu::train::Recompute::None,
                },
                keep_layers,
                micro_batch_size,
                budget,
                full_fine_tuning,
                steps,
                device,
            )
            .context("rft bench train")?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
                println!(
                    "{} on {}: {} × {} tokens (prompt {}), {} ({} params), {} micro-batch(es) of \
                     ≤ {} sequences, recompute {} (last {} layers kept): {:.1} ms/step, {:.0} tok/s, \
                     weights {:.2} GiB, plan {:.2} GiB, measured {:.2} GiB",
                    r.shape,
                    r.device,
                    r.sequences,
                    r.seq_len,
                    r.prompt_len,
                    if r.full_fine_tuning {
                        "full fine-tuning".to_string()
                    } else {
                        format!("LoRA r{}", r.lora_rank)
                    },
                    r.trainable_params,
                    r.micro_batches,
                    r.micro_batch_size,
                    r.recompute,
                    r.kept_layers,
                    r.step_ms,
                    r.tokens_per_s,
                    gib(r.weight_bytes),
                    gib(r.plan_bytes),
                    gib(r.peak_gpu_bytes_measured),
                );
            }
            Ok(())
        }
        Cmd::Eval {
            config,
            model,
            adapter,
        } => {
            use rft::trainer::run::{TrainConfig, Trainer};
            let (text, origin, base) = read_config(config.as_deref())?;
            let mut cfg = TrainConfig::from_toml_str(&text, &origin)?;
            if let Some(m) = model {
                let m = std::path::absolute(&m).unwrap_or(m);
                if let Some(sec) = cfg.model.as_mut() {
                    sec.path = m;
                    sec.adapter = None;
                }
            }
            if let (Some(a), Some(sec)) = (adapter, cfg.model.as_mut()) {
                sec.adapter = Some(std::path::absolute(&a).unwrap_or(a));
            }
            let mut t = Trainer::from_config(cfg, &text, &base)?;
            let rec = t
                .validation()?
                .ok_or_else(|| anyhow!("the config has no validation data"))?;
            println!("{}", serde_json::to_string(&rec)?);
            Ok(())
        }
        Cmd::Data { config, split, num } => {
            use rft::trainer::run::TrainConfig;
            let (text, origin, base) = read_config(config.as_deref())?;
            let cfg = TrainConfig::from_toml_str(&text, &origin)?;
            let mut out = std::io::stdout().lock();
            let prompt_json = |p: &PromptSpec| match p {
                PromptSpec::Text(t) => ("prompt", serde_json::json!(t)),
                PromptSpec::Messages(m) => ("messages", m.clone()),
                PromptSpec::Ids(ids) => ("prompt_ids", serde_json::json!(ids)),
            };
            if split == DataSplit::Sft {
                let task = cfg
                    .data
                    .task()?
                    .ok_or_else(|| anyhow!("--split sft needs a built-in task in [data]"))?;
                let n = num.ok_or_else(|| anyhow!("--split sft needs --num N"))?;
                for p in task.sft_pairs(cfg.data.seed, n)? {
                    let (k, v) = prompt_json(&p.prompt);
                    writeln!(out, "{}", serde_json::json!({k: v, "completion": p.completion}))?;
                }
            } else {
                let splits = cfg.data.load(&base)?;
                let ds = if split == DataSplit::Train {
                    splits.train
                } else {
                    splits.val
                };
                for item in ds.iter().take(num.unwrap_or(usize::MAX)) {
                    writeln!(out, "{}", item.to_jsonl())?;
                }
            }
            Ok(())
        }
        Cmd::Sft(a) => sft(a),
        Cmd::Merge { model, adapter, out } => {
            check_output_dir(
                "--out",
                &out,
                &[("--model", &model), ("--adapter", &adapter)],
                MERGED_FILES,
            )?;
            let engine = CpuEngine::load(&model)?;
            let config = engine.model.config.clone();
            let lora = rft::lora::peft::load(&adapter, &config)
                .with_context(|| format!("--adapter {}", adapter.display()))?;
            let mut weights = engine.model.weights;
            rft::lora::peft::merge_into(&mut weights, &lora);
            rft::lora::peft::write_merged(&model, &out, &config, &weights)?;
            eprintln!("merged {} into {}", adapter.display(), out.display());
            Ok(())
        }
    }
}

/// The config `rft train` runs when given none.
const DEFAULT_CONFIG: &str = include_str!("../configs/default.toml");

/// `rft train`: parse the config, build the trainer, run with Ctrl-C saving a checkpoint.
fn train(a: TrainArgs) -> Result<()> {
    use rft::trainer::run::{Device as TDevice, TrainConfig, Trainer};
    let resume_dir = a.resume.as_ref().map(|d| {
        let ck = d.join("checkpoint");
        if ck.join("trainer_state.json").exists() {
            ck
        } else {
            d.clone()
        }
    });
    if let (Some(d), Some(ck)) = (&a.resume, &resume_dir) {
        if !ck.join("trainer_state.json").is_file() {
            bail!("--resume {}: {}", d.display(), no_checkpoint_why(d));
        }
    }
    let (text, origin, base_dir) = match (&a.config, &resume_dir) {
        (Some(p), _) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let base = p.parent().map(|d| d.to_path_buf()).unwrap_or_default();
            (text, p.clone(), base)
        }
        (None, Some(ck)) => {
            let state = ck.join("trainer_state.json");
            let v: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(&state)
                    .with_context(|| format!("--resume: reading {}", state.display()))?,
            )
            .with_context(|| format!("--resume: {} is not JSON", state.display()))?;
            let text = v["config"]["toml"]
                .as_str()
                .ok_or_else(|| anyhow!("--resume: {} holds no config; give CONFIG too", state.display()))?
                .to_string();
            // Relative paths in it start where the original config was.
            let base = v["config"]["base_dir"]
                .as_str()
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."));
            (text, state, base)
        }
        (None, None) => (
            DEFAULT_CONFIG.to_string(),
            PathBuf::from("<embedded configs/default.toml>"),
            default_base(),
        ),
    };
    let mut cfg = TrainConfig::from_toml_str(&text, &origin)?;
    if let Some(d) = a.device {
        cfg.device = match d {
            Device::Cpu => TDevice::Cpu,
            Device::Cuda => TDevice::Cuda,
            Device::Auto => TDevice::Auto,
        };
    }
    if let Some(o) = &a.output_dir {
        cfg.output_dir = Some(o.clone());
    } else if let Some(d) = &a.resume {
        cfg.output_dir = Some(if d.ends_with("checkpoint") {
            d.parent().unwrap_or(d).to_path_buf()
        } else {
            d.clone()
        });
    }
    if let Some(n) = a.max_steps {
        cfg.max_steps = n;
    }
    cfg.validate(&origin)?;
    if let Some(out) = &cfg.output_dir {
        // The resumed run's own directory continues; any other must not hold a run already.
        let resumed_run = resume_dir.as_ref().and_then(|ck| ck.parent());
        let continuing = resumed_run.is_some_and(|r| same_dir(r, out));
        if !continuing {
            check_fresh_run_dir(out, a.output_dir.is_some())?;
        }
    }
    let mut trainer = Trainer::from_config(cfg, &text, &base_dir)?;
    if let Some(ck) = &resume_dir {
        trainer
            .resume_from(ck)
            .with_context(|| format!("--resume {}", ck.display()))?;
        eprintln!("resumed from {} at step {}", ck.display(), trainer.step_count());
    }
    if trainer.truncated_prompts() > 0 {
        eprintln!(
            "note: {} prompts were longer than max_prompt_length and lost their start",
            trainer.truncated_prompts()
        );
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || {
            eprintln!("\ninterrupted: finishing the current step, then saving a checkpoint");
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    }
    eprintln!("rft train: output in {}", trainer.output_dir.display());
    let summary = trainer.run(&stop, !a.quiet)?;
    eprintln!("{}", rft::trainer::metrics::summary_table(&summary));
    if summary.interrupted {
        eprintln!(
            "stopped early; continue with: rft train --resume {}",
            trainer.output_dir.display()
        );
    }
    Ok(())
}

/// Why `--resume DIR` finds no checkpoint, and where a save that was cut short (between its
/// renames) left a complete one.
fn no_checkpoint_why(d: &std::path::Path) -> String {
    if !d.is_dir() {
        return "no such run directory".into();
    }
    let run = if d.ends_with("checkpoint") {
        d.parent().unwrap_or(d)
    } else {
        d
    };
    let mut left: Vec<PathBuf> = std::fs::read_dir(run)
        .map(|es| {
            es.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    let n = p.file_name().unwrap_or_default().to_string_lossy();
                    (n.starts_with(".checkpoint.tmp") || n.starts_with(".checkpoint.old"))
                        && p.join("trainer_state.json").is_file()
                })
                .collect()
        })
        .unwrap_or_default();
    // The newest first: a save writes .checkpoint.tmp* completely (state last) before it moves
    // the previous checkpoint aside to .checkpoint.old*.
    left.sort_by_key(|p| {
        let n = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
        (!n.starts_with(".checkpoint.tmp"), n)
    });
    let mut why = format!(
        "no checkpoint there (expected {})",
        run.join("checkpoint/trainer_state.json").display()
    );
    if let Some(p) = left.first() {
        why += &format!(
            "; a save was interrupted and left {}: rename it to {} to resume from it",
            p.display(),
            run.join("checkpoint").display()
        );
    }
    why
}

/// A new run must not append to another run's metrics.jsonl nor replace its checkpoint and
/// adapters: `out` is new, empty, or holds no run yet.
fn check_fresh_run_dir(out: &std::path::Path, from_flag: bool) -> Result<()> {
    let what = if from_flag { "--output-dir" } else { "output_dir" };
    if out.exists() && !out.is_dir() {
        bail!("{what} {}: exists and is not a directory", out.display());
    }
    for f in ["metrics.jsonl", "checkpoint", "summary.json"] {
        if out.join(f).exists() {
            bail!(
                "{what} {}: already holds a run ({f}); continue it with `rft train --resume {}`, \
                 or choose a new output directory",
                out.display(),
                out.display()
            );
        }
    }
    Ok(())
}

/// Whether two paths name the same existing directory.
fn same_dir(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// What a PEFT adapter output holds.
const ADAPTER_FILES: &[&str] = &["adapter_config.json", "adapter_model.safetensors"];

/// An output directory (`flag`) must be checked before any work: not a file, not one of the
/// `inputs` (it would be overwritten), and new, empty, or holding only files of an earlier
/// output of the same kind (`writes`, replaced). Anything else there (another model's shards,
/// its index) would be mixed with the output, and a loader could pick the stale files.
fn check_output_dir(
    flag: &str,
    out: &std::path::Path,
    inputs: &[(&str, &std::path::Path)],
    writes: &[&str],
) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        bail!("{flag} {}: exists and is not a directory", out.display());
    }
    for (input, dir) in inputs {
        if same_dir(out, dir) {
            bail!(
                "{flag} {} is the {input} directory: writing there would overwrite it; choose another directory",
                out.display()
            );
        }
    }
    let entries = std::fs::read_dir(out).with_context(|| format!("{flag} {}", out.display()))?;
    let mut foreign: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.') && !writes.contains(&n.as_str()))
        .collect();
    foreign.sort();
    if !foreign.is_empty() {
        let more = match foreign.len().saturating_sub(3) {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        bail!(
            "{flag} {}: the directory already holds {}{more}, which would be mixed with the \
             output; choose a new or empty directory",
            out.display(),
            foreign[..foreign.len().min(3)].join(", ")
        );
    }
    Ok(())
}

/// A config's text, its name for messages, and the directory its relative paths start from.
fn read_config(path: Option<&std::path::Path>) -> Result<(String, PathBuf, PathBuf)> {
    Ok(match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            (
                text,
                p.to_path_buf(),
                p.parent().map(|d| d.to_path_buf()).unwrap_or_default(),
            )
        }
        None => (
            DEFAULT_CONFIG.to_string(),
            PathBuf::from("<embedded configs/default.toml>"),
            default_base(),
        ),
    })
}

/// The embedded config behaves as the file `configs/default.toml` of the repository: its
/// relative paths resolve against `./configs` when the working directory has `models/`, else
/// against the source tree the binary was built from.
fn default_base() -> PathBuf {
    if std::path::Path::new("models").is_dir() {
        PathBuf::from("configs")
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs")
    }
}

/// `rft sft`: load (or randomly initialise) the model, encode the data, run epochs of
/// shuffled batches through `trainer::sft_step`, print JSON loss lines, save the result.
fn sft(a: SftArgs) -> Result<()> {
    use rft::cpu::model::CpuModel;
    use rft::lora::{LoraConfig, LoraWeights};
    use rft::optim::{AdamW, LrSchedule, SchedulerType, Warmup};
    use rft::trainer::{epoch_order, init, sft_step, SftExample, SftOptions, TrainState};

    let full = a.full || a.init_random.is_some();
    if a.batch_size == 0 || a.epochs == 0 {
        bail!("--batch-size and --epochs must be at least 1");
    }
    if a.log_every == 0 {
        bail!("--log-every must be at least 1 (a loss line every N steps)");
    }
    if !(a.lr >= 0.0 && a.lr.is_finite()) {
        bail!("--lr: must be a finite learning rate ≥ 0, got {}", a.lr);
    }
    if a.max_grad_norm.is_nan() || a.max_grad_norm < 0.0 {
        bail!(
            "--max-grad-norm: must be ≥ 0 (0: no clipping), got {}",
            a.max_grad_norm
        );
    }
    if !full {
        if !(a.lora_alpha > 0.0 && a.lora_alpha.is_finite()) {
            bail!("--lora-alpha: must be > 0, got {}", a.lora_alpha);
        }
        if !(0.0..1.0).contains(&a.lora_dropout) {
            bail!("--lora-dropout: must be in [0, 1), got {}", a.lora_dropout);
        }
    }
    // The output is checked before the training, not after it.
    check_output_dir(
        "--output",
        &a.output,
        &[("--model", &a.model)],
        if full { MERGED_FILES } else { ADAPTER_FILES },
    )?;
    let tok = Tokenizer::from_dir(&a.model)?;
    let mut model = match a.init_random {
        Some(seed) => {
            let config = rft::model::config::ModelConfig::from_dir(&a.model)?;
            let w = init::init_weights(&config, seed, init::initializer_range(&a.model));
            CpuModel::new(config, w)
        }
        None => CpuEngine::load(&a.model)?.model,
    };
    let eos = model.config.eos_token_ids.first().copied();
    let mut examples = Vec::new();
    for l in read_inputs(&a.data, true)? {
        let (p, c) = rft::data::input::encode_line(&a.data, &l, &tok)?;
        let at = || format!("{}:{}", a.data.display(), l.line);
        let mut c = c.ok_or_else(|| anyhow!("{}: missing completion", at()))?;
        if let (false, Some(e)) = (a.no_eos, eos) {
            if c.last() != Some(&e) {
                c.push(e);
            }
        }
        if c.is_empty() {
            bail!(
                "{}: the completion is empty and --no-eos adds no EOS: nothing to train on",
                at()
            );
        }
        check_fits(&model.config, p.len(), c.len()).with_context(at)?;
        examples.push(SftExample {
            prompt_ids: p,
            completion_ids: c,
        });
    }
    if examples.is_empty() {
        bail!("{}: no examples", a.data.display());
    }
    let mut lora = if full {
        None
    } else {
        let targets = rft::lora::peft::parse_targets(&if a.target_modules == "all-linear" {
            serde_json::json!("all-linear")
        } else {
            serde_json::json!(a.target_modules.split(',').map(str::trim).collect::<Vec<_>>())
        })
        .map_err(|e| anyhow!("--target-modules: {e}"))?;
        if a.lora_r == 0 {
            bail!("--lora-r must be at least 1");
        }
        let cfg = LoraConfig {
            r: a.lora_r,
            alpha: a.lora_alpha,
            dropout: a.lora_dropout,
            use_rslora: a.use_rslora,
            target_modules: targets,
        };
        Some(LoraWeights::init(cfg, &model.config, a.seed))
    };
    let steps_per_epoch = examples.len().div_ceil(a.batch_size);
    let mut total = steps_per_epoch * a.epochs;
    if a.max_steps > 0 {
        total = total.min(a.max_steps);
    }
    let kind: SchedulerType = serde_json::from_value(serde_json::json!(a.lr_scheduler))
        .map_err(|_| anyhow!("--lr-scheduler: expected constant, constant_with_warmup, linear or cosine"))?;
    let opts = SftOptions {
        micro_batch_size: a.micro_batch_size,
        max_grad_norm: a.max_grad_norm,
        full_fine_tuning: full,
        optimizer: AdamW {
            weight_decay: a.weight_decay,
            ..AdamW::default()
        },
        schedule: LrSchedule::new(kind, a.lr, total, Warmup::Ratio(a.warmup_ratio))
            .context("--warmup-ratio")?,
        ..SftOptions::default()
    };
    opts.optimizer.validate().context("--weight-decay")?;
    let mut state = TrainState::new(a.seed);
    let mut out = std::io::stdout().lock();
    let t0 = std::time::Instant::now();
    'epochs: for epoch in 0..a.epochs {
        let order = epoch_order(examples.len(), a.seed, epoch as u64);
        for chunk in order.chunks(a.batch_size) {
            if state.step as usize >= total {
                break 'epochs;
            }
            let batch: Vec<SftExample> = chunk.iter().map(|&i| examples[i].clone()).collect();
            let m = sft_step(&mut model, lora.as_mut(), &mut state, &batch, &opts)?;
            let step = m.step as usize + 1;
            if step.is_multiple_of(a.log_every) || step == total || m.skipped {
                let line = serde_json::json!({
                    "step": step, "epoch": epoch, "loss": m.loss, "lr": m.lr,
                    "grad_norm": m.grad_norm, "tokens": m.num_tokens, "skipped": m.skipped,
                    "elapsed_s": (t0.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
                });
                writeln!(out, "{line}")?;
            }
        }
    }
    match &lora {
        Some(l) => rft::lora::peft::save(&a.output, l, &a.model.to_string_lossy())?,
        None => rft::lora::peft::write_merged(&a.model, &a.output, &model.config, &model.weights)?,
    }
    eprintln!(
        "saved {} to {} after {} steps",
        if full { "model" } else { "adapter" },
        a.output.display(),
        state.step
    );
    Ok(())
}

/// A prompt (plus a scored completion) must fit the model's context.
fn check_fits(c: &rft::model::config::ModelConfig, prompt: usize, completion: usize) -> Result<()> {
    let ctx = c.max_position_embeddings;
    if completion == 0 && prompt >= ctx {
        bail!("the prompt has {prompt} tokens: longer than the model's context of {ctx} (max_position_embeddings) minus one generated token");
    }
    if prompt + completion > ctx {
        bail!(
            "prompt + completion = {} tokens exceed the model's context of {ctx} (max_position_embeddings)",
            prompt + completion
        );
    }
    Ok(())
}

/// Loads the model (and adapter) for the chosen device, with the tokenizer.
fn load(m: &ModelArgs) -> Result<(Box<dyn Engine>, Tokenizer)> {
    let use_cuda = match m.device {
        Device::Cpu => false,
        Device::Cuda => {
            if let Err(why) = rft::cuda::availability() {
                bail!("--device cuda: {why}");
            }
            true
        }
        Device::Auto => match rft::cuda::availability() {
            Ok(()) => {
                eprintln!("rft: --device auto: using CUDA device 0");
                true
            }
            Err(why) => {
                eprintln!("rft: --device auto: using the CPU ({why})");
                false
            }
        },
    };
    let mut engine: Box<dyn Engine> = if use_cuda {
        Box::new(rft::cuda::CudaEngine::load(&m.model, 0)?)
    } else {
        Box::new(CpuEngine::load(&m.model)?)
    };
    let tok = Tokenizer::from_dir(&m.model)?;
    if let Some(dir) = &m.adapter {
        let lora = rft::lora::peft::load(dir, engine.config())
            .with_context(|| format!("--adapter {}", dir.display()))?;
        engine.set_adapter(Some(lora));
    }
    Ok((engine, tok))
}
