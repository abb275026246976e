//! The `rft` command line: generate, score (and, as they land, train, sft, merge, bench).
//! A thin layer over the library: parse options, load, call the engine, print JSON lines.
//! Errors surface as one readable line on stderr and a non-zero exit status.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use rft::cpu::engine::CpuEngine;
use rft::data::input::{encode_completion, encode_prompt, read_inputs, PromptSpec};
use rft::engine::Engine;
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
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// 0 means off.
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// 0 means off.
        #[arg(long, default_value_t = 0.0)]
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
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
    },
}

fn main() {
    let cli = Cli::parse();
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
            };
            params.validate()?;
            if batch_size == 0 {
                bail!("--batch-size must be at least 1");
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
                        encode_prompt(&l.prompt, &tok)
                            .with_context(|| format!("{}:{}", path.display(), l.line))
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
            engine.max_batch_seqs = batch_size;
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
    }
}

/// Loads the model (and adapter) for the chosen device, with the tokenizer.
fn load(m: &ModelArgs) -> Result<(CpuEngine, Tokenizer)> {
    match m.device {
        Device::Cpu | Device::Auto => {}
        Device::Cuda => {
            let why = rft::cuda::availability().err().unwrap_or_else(|| {
                "the CUDA rollout engine is not implemented yet; use --device cpu".to_string()
            });
            bail!("--device cuda: {why}");
        }
    }
    let mut engine = CpuEngine::load(&m.model)?;
    let tok = Tokenizer::from_dir(&m.model)?;
    if let Some(dir) = &m.adapter {
        let lora = rft::lora::peft::load(dir, engine.config())
            .with_context(|| format!("--adapter {}", dir.display()))?;
        engine.set_adapter(Some(lora));
    }
    Ok((engine, tok))
}
