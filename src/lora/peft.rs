//! PEFT-format adapters: `adapter_config.json` + `adapter_model.safetensors` with PEFT's key
//! names (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`), so an adapter
//! trained by rft loads in `peft.PeftModel.from_pretrained` and vLLM, and one saved by PEFT
//! loads here. Also the merge of an adapter into base weights (for `rft merge`).

use crate::error::{Error, Result};
use crate::lora::{LoraConfig, LoraPair, LoraWeights};
use crate::model::config::ModelConfig;
use crate::model::weights::{save_safetensors_f32, write_atomic, Checkpoint, Proj, Weights};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The PEFT key of a LoRA matrix (`which` is "lora_A" or "lora_B").
pub fn peft_key(layer: usize, p: Proj, which: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{}.{which}.weight",
        p.parent(),
        p.module_name()
    )
}

/// Reads and checks `adapter_config.json`.
pub fn read_config(dir: &Path) -> Result<(LoraConfig, Value)> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| Error::config(&path, format!("invalid JSON: {e}")))?;
    let o = v
        .as_object()
        .ok_or_else(|| Error::config(&path, "expected a JSON object"))?;
    let cfg_err = |m: String| Error::config(&path, m);
    if let Some(t) = o.get("peft_type").and_then(|t| t.as_str()) {
        if t != "LORA" {
            return Err(cfg_err(format!(
                "peft_type {t:?} is not supported (expected \"LORA\")"
            )));
        }
    }
    let r = o
        .get("r")
        .and_then(|x| x.as_u64())
        .filter(|&r| r > 0)
        .ok_or_else(|| cfg_err("missing or invalid key \"r\" (a positive integer)".into()))?
        as usize;
    let alpha = o
        .get("lora_alpha")
        .and_then(|x| x.as_f64())
        .ok_or_else(|| cfg_err("missing or invalid key \"lora_alpha\" (a number)".into()))?
        as f32;
    // PEFT takes any alpha (0 silences the adapter, a negative one flips it): so do we, but a
    // value past f32 would scale every delta to infinity.
    if !alpha.is_finite() {
        return Err(cfg_err(format!(
            "lora_alpha = {} does not fit a 32-bit float",
            o["lora_alpha"]
        )));
    }
    let targets = o
        .get("target_modules")
        .ok_or_else(|| cfg_err("missing key \"target_modules\"".into()))?;
    let target_modules = parse_targets(targets).map_err(cfg_err)?;
    let dropout = o.get("lora_dropout").and_then(|x| x.as_f64()).unwrap_or(0.0) as f32;
    if !(0.0..1.0).contains(&dropout) {
        return Err(cfg_err(format!(
            "lora_dropout = {dropout}: expected a probability in [0, 1)"
        )));
    }
    let use_rslora = o.get("use_rslora").and_then(|x| x.as_bool()).unwrap_or(false);
    if o.get("use_dora").and_then(|x| x.as_bool()).unwrap_or(false) {
        return Err(cfg_err("use_dora = true is not supported".into()));
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if o.get(key)
            .and_then(|x| x.as_object())
            .is_some_and(|m| !m.is_empty())
        {
            return Err(cfg_err(format!("a non-empty {key:?} is not supported")));
        }
    }
    if let Some(b) = o.get("bias").and_then(|x| x.as_str()) {
        if b != "none" {
            return Err(cfg_err(format!(
                "bias = {b:?} is not supported (expected \"none\")"
            )));
        }
    }
    if o.get("layers_to_transform").is_some_and(|x| !x.is_null()) {
        return Err(cfg_err("layers_to_transform is not supported".into()));
    }
    Ok((
        LoraConfig {
            r,
            alpha,
            dropout,
            use_rslora,
            target_modules,
        },
        v,
    ))
}

/// `target_modules` as PEFT writes it: a list of names, "all-linear", or one name.
pub fn parse_targets(v: &Value) -> std::result::Result<Vec<Proj>, String> {
    let names: Vec<String> = match v {
        Value::String(s) if s == "all-linear" => return Ok(Proj::ALL.to_vec()),
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| "target_modules: expected strings".to_string())
            })
            .collect::<std::result::Result<_, _>>()?,
        _ => return Err("target_modules: expected a list of module names".into()),
    };
    let mut out = Vec::new();
    for n in names {
        let p = Proj::from_module_name(&n).ok_or_else(|| {
            format!(
                "target_modules: {n:?} is not a supported module (supported: {})",
                Proj::ALL.map(|p| p.module_name()).join(", ")
            )
        })?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out.sort();
    if out.is_empty() {
        return Err("target_modules is empty".into());
    }
    Ok(out)
}

/// Loads a PEFT adapter for a model, checking every tensor's presence and shape.
pub fn load(dir: &Path, model: &ModelConfig) -> Result<LoraWeights> {
    if !dir.is_dir() {
        return Err(Error::invalid(format!(
            "adapter directory {} does not exist",
            dir.display()
        )));
    }
    let (config, _) = read_config(dir)?;
    let wpath = dir.join(WEIGHTS_FILE);
    if !wpath.exists() {
        return Err(Error::Safetensors {
            path: wpath,
            msg: "file not found".into(),
        });
    }
    let ckpt = Checkpoint::open_files(std::slice::from_ref(&wpath))?;
    // Every key must be one we understand: a stray key means another architecture.
    for name in ckpt.names() {
        if !is_known_key(name, model.num_hidden_layers, &config.target_modules) {
            return Err(Error::Safetensors {
                path: wpath.clone(),
                msg: format!(
                    "unexpected tensor {name:?}: not a LoRA matrix of a target module of this \
                     {}-layer {} model (is the adapter for another model?)",
                    model.num_hidden_layers,
                    model.arch.hf_name()
                ),
            });
        }
    }
    let r = config.r;
    let mut layers = Vec::with_capacity(model.num_hidden_layers);
    for l in 0..model.num_hidden_layers {
        let mut slot: [Option<LoraPair>; 7] = Default::default();
        for &p in &config.target_modules {
            let (d_in, d_out) = p.dims(model);
            let a = ckpt.read_f32(&peft_key(l, p, "lora_A"), &[r, d_in])?;
            let b = ckpt.read_f32(&peft_key(l, p, "lora_B"), &[d_out, r])?;
            slot[p as usize] = Some(LoraPair { a, b });
        }
        layers.push(slot);
    }
    Ok(LoraWeights { config, layers })
}

fn is_known_key(name: &str, n_layers: usize, targets: &[Proj]) -> bool {
    let Some(rest) = name.strip_prefix("base_model.model.model.layers.") else {
        return false;
    };
    let Some((layer, rest)) = rest.split_once('.') else {
        return false;
    };
    let Ok(layer) = layer.parse::<usize>() else {
        return false;
    };
    layer < n_layers
        && targets.iter().any(|&p| {
            ["lora_A", "lora_B"]
                .iter()
                .any(|w| rest == format!("{}.{}.{w}.weight", p.parent(), p.module_name()))
        })
}

/// Saves an adapter in PEFT format (atomically: each file written then renamed).
pub fn save(dir: &Path, lora: &LoraWeights, base_model_name_or_path: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors: BTreeMap<String, (Vec<usize>, &[f32])> = BTreeMap::new();
    let r = lora.config.r;
    for (l, slot) in lora.layers.iter().enumerate() {
        for p in Proj::ALL {
            if let Some(pair) = &slot[p as usize] {
                let d_in = pair.a.len() / r;
                let d_out = pair.b.len() / r;
                tensors.insert(peft_key(l, p, "lora_A"), (vec![r, d_in], &pair.a));
                tensors.insert(peft_key(l, p, "lora_B"), (vec![d_out, r], &pair.b));
            }
        }
    }
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    save_safetensors_f32(&dir.join(WEIGHTS_FILE), &tensors, Some(meta))?;
    let c = &lora.config;
    let cfg = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": c.r,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "use_rslora": c.use_rslora,
        "target_modules": c.target_modules.iter().map(|p| p.module_name()).collect::<Vec<_>>(),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": false,
        "revision": null,
    });
    let text = serde_json::to_string_pretty(&cfg).expect("json");
    write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
}

/// W ← W + scale · B A for every adapted projection (used by `rft merge`, never in training).
pub fn merge_into(weights: &mut Weights, lora: &LoraWeights) {
    let s = lora.config.scale();
    let r = lora.config.r;
    for (lw, slot) in weights.layers.iter_mut().zip(&lora.layers) {
        for p in Proj::ALL {
            if let Some(pair) = &slot[p as usize] {
                let lin = lw.proj_mut(p);
                // W[out, in] += s · B[out, r] · A[r, in]
                crate::cpu::ops::matmul_acc(&pair.b, &pair.a, lin.d_out, r, lin.d_in, s, 1.0, &mut lin.w);
            }
        }
    }
}

/// The weights file of a merged checkpoint ([`write_merged`]).
pub const MERGED_WEIGHTS: &str = "model.safetensors";

/// Everything [`write_merged`] writes (the base model's config and tokenizer files that exist,
/// and [`MERGED_WEIGHTS`]).
pub const MERGED_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    MERGED_WEIGHTS,
];

/// Writes a merged HF checkpoint: the base dir's config/tokenizer files copied, weights
/// saved as one f32 `model.safetensors` (transformers loads it in any dtype asked for).
pub fn write_merged(base_dir: &Path, out_dir: &Path, config: &ModelConfig, weights: &Weights) -> Result<()> {
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    for &f in MERGED_FILES.iter().filter(|&&f| f != MERGED_WEIGHTS) {
        let src: PathBuf = base_dir.join(f);
        if src.exists() {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            let bytes = if f == "config.json" {
                float32_config(&bytes, &src)?
            } else {
                bytes
            };
            write_atomic(&out_dir.join(f), &bytes)?;
        } else if out_dir.join(f).is_file() && !same_dir(base_dir, out_dir) {
            // A stale copy from an earlier output (another template, other EOS ids) would
            // otherwise be read as this model's.
            let stale = out_dir.join(f);
            std::fs::remove_file(&stale).map_err(|e| Error::io(&stale, e))?;
        }
    }
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    save_safetensors_f32(
        &out_dir.join(MERGED_WEIGHTS),
        &weights.named_tensors(config),
        Some(meta),
    )
}

/// Whether two paths name the same existing directory.
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// config.json with the dtype keys set to float32 (the merged weights are written in f32).
fn float32_config(bytes: &[u8], path: &Path) -> Result<Vec<u8>> {
    let mut v: Value =
        serde_json::from_slice(bytes).map_err(|e| Error::config(path, format!("invalid JSON: {e}")))?;
    if let Some(o) = v.as_object_mut() {
        for k in ["torch_dtype", "dtype"] {
            if o.contains_key(k) {
                o.insert(k.to_string(), json!("float32"));
            }
        }
    }
    Ok(serde_json::to_vec_pretty(&v).expect("json"))
}
