//! `config.json` (and `generation_config.json`) of a Hugging Face causal LM, normalised into
//! one [`ModelConfig`] for the four supported families: Llama, Qwen2, Qwen3 and Mistral.
//!
//! Both key styles are read: the older one (top-level `rope_theta`, `rope_scaling`,
//! `torch_dtype`) and the transformers-5 one (`rope_parameters`, `dtype`). Everything the
//! engines need is resolved here (head_dim, KV heads, biases, q/k norm, RoPE frequencies), so
//! no engine ever looks at raw JSON.

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// The model families rft implements, by their HF `architectures` name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Mistral,
}

pub const SUPPORTED_ARCHS: &[&str] = &[
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
];

impl Arch {
    pub fn from_hf_name(name: &str) -> Option<Arch> {
        match name {
            "LlamaForCausalLM" => Some(Arch::Llama),
            "Qwen2ForCausalLM" => Some(Arch::Qwen2),
            "Qwen3ForCausalLM" => Some(Arch::Qwen3),
            "MistralForCausalLM" => Some(Arch::Mistral),
            _ => None,
        }
    }
    pub fn hf_name(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
        }
    }
    /// `model_type` as HF writes it.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Mistral => "mistral",
        }
    }
}

/// RoPE frequency scaling.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE: inv_freq\[i\] = theta^(-2i/d).
    Default,
    /// Llama 3.x: long wavelengths divided by `factor`, a smooth blend in between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: f32,
    },
}

/// Storage dtype named by the checkpoint's config (informational: tensors carry their own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v projections (Qwen2 always; Llama/Mistral with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama `attention_bias` only).
    pub o_bias: bool,
    /// Biases on gate/up/down (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Attention only to the last `w` positions (Mistral `sliding_window`).
    pub sliding_window: Option<usize>,
    pub torch_dtype: Option<DType>,
    pub bos_token_id: Option<u32>,
    /// Union of config.json's and generation_config.json's `eos_token_id`.
    pub eos_token_ids: Vec<u32>,
    /// The activation must be SiLU (checked at load).
    pub hidden_act: String,
}

impl ModelConfig {
    /// Reads `DIR/config.json` and, when present, `DIR/generation_config.json`.
    pub fn from_dir(dir: &Path) -> Result<ModelConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let mut cfg = Self::from_json_str(&text, &path)?;
        let gpath = dir.join("generation_config.json");
        if gpath.exists() {
            let gtext = std::fs::read_to_string(&gpath).map_err(|e| Error::io(&gpath, e))?;
            let g: Value = serde_json::from_str(&gtext)
                .map_err(|e| Error::config(&gpath, format!("invalid JSON: {e}")))?;
            let ids = eos_ids(g.get("eos_token_id"), &gpath)?;
            check_token_ids(&ids, cfg.vocab_size, &gpath)?;
            for id in ids {
                if !cfg.eos_token_ids.contains(&id) {
                    cfg.eos_token_ids.push(id);
                }
            }
            if cfg.bos_token_id.is_none() {
                cfg.bos_token_id = opt_u32(g.get("bos_token_id"));
            }
        }
        Ok(cfg)
    }

    /// Parses the text of a config.json; `path` is only used in messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<ModelConfig> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| Error::config(path, format!("invalid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::config(path, "expected a JSON object at the top level"))?;
        let r = Reader { obj, path };

        let arch_name = match obj.get("architectures").and_then(|a| a.as_array()) {
            Some(list) if !list.is_empty() => list[0].as_str().unwrap_or("").to_string(),
            _ => obj
                .get("model_type")
                .and_then(|m| m.as_str())
                .map(|m| format!("model_type {m:?} (no `architectures`)"))
                .unwrap_or_else(|| "<none: `architectures` missing>".to_string()),
        };
        let arch = Arch::from_hf_name(&arch_name).ok_or_else(|| Error::UnsupportedArch {
            path: path.to_path_buf(),
            found: arch_name.clone(),
            supported: SUPPORTED_ARCHS.join(", "),
        })?;

        let hidden_size = r.usize_req("hidden_size")?;
        let num_attention_heads = r.usize_req("num_attention_heads")?;
        let num_key_value_heads = r.usize_opt("num_key_value_heads")?.unwrap_or(num_attention_heads);
        let head_dim = match r.usize_opt("head_dim")? {
            Some(h) => h,
            None => {
                if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
                    return Err(Error::config(
                        path,
                        format!(
                            "hidden_size {hidden_size} is not divisible by num_attention_heads \
                             {num_attention_heads} and no head_dim is given"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::config(
                path,
                format!(
                    "num_attention_heads {num_attention_heads} must be a multiple of \
                     num_key_value_heads {num_key_value_heads}"
                ),
            ));
        }
        if head_dim % 2 != 0 {
            return Err(Error::config(
                path,
                format!("head_dim {head_dim} must be even for RoPE"),
            ));
        }

        // RoPE: new style `rope_parameters` (may hold rope_theta), else old `rope_scaling` +
        // top-level `rope_theta`.
        let rope_params = obj.get("rope_parameters").filter(|v| !v.is_null());
        let rope_scaling_v = obj.get("rope_scaling").filter(|v| !v.is_null());
        let rope_obj = rope_params.or(rope_scaling_v);
        let mut rope_theta = r.f32_opt("rope_theta")?;
        if let Some(rp) = rope_params.and_then(|v| v.as_object()) {
            if let Some(t) = rp.get("rope_theta") {
                rope_theta =
                    Some(num_f32(t).ok_or_else(|| {
                        Error::config(path, "rope_parameters.rope_theta: expected a number")
                    })?);
            }
        }
        let rope_theta = rope_theta.unwrap_or(10000.0);
        let rope_scaling = match rope_obj {
            None => RopeScaling::Default,
            Some(v) => parse_rope(v, path)?,
        };

        let eps = r.f32_opt("rms_norm_eps")?.unwrap_or(1e-6);
        let attention_bias = r.bool_opt("attention_bias")?;
        let (qkv_bias, o_bias) = match arch {
            Arch::Qwen2 => (true, false),
            Arch::Qwen3 => {
                let b = attention_bias.unwrap_or(false);
                (b, b)
            }
            Arch::Llama | Arch::Mistral => {
                let b = attention_bias.unwrap_or(false);
                (b, b)
            }
        };
        let mlp_bias = r.bool_opt("mlp_bias")?.unwrap_or(false);

        let sliding_window = match arch {
            Arch::Mistral => r.usize_opt("sliding_window")?,
            Arch::Qwen2 | Arch::Qwen3 => {
                if r.bool_opt("use_sliding_window")?.unwrap_or(false) {
                    return Err(Error::config(
                        path,
                        "use_sliding_window = true is not supported for Qwen2/Qwen3 \
                         (per-layer windows); set it to false",
                    ));
                }
                None
            }
            Arch::Llama => None,
        };

        let hidden_act = obj
            .get("hidden_act")
            .and_then(|v| v.as_str())
            .unwrap_or("silu")
            .to_string();
        if hidden_act != "silu" {
            return Err(Error::config(
                path,
                format!("hidden_act {hidden_act:?} is not supported (expected \"silu\")"),
            ));
        }

        let dtype_v = obj
            .get("dtype")
            .filter(|v| !v.is_null())
            .or(obj.get("torch_dtype"));
        let torch_dtype = match dtype_v.and_then(|v| v.as_str()) {
            None => None,
            Some("float32") => Some(DType::F32),
            Some("float16") => Some(DType::F16),
            Some("bfloat16") => Some(DType::BF16),
            Some(other) => {
                return Err(Error::config(
                    path,
                    format!("dtype {other:?}: expected float32, float16 or bfloat16"),
                ))
            }
        };

        let cfg = ModelConfig {
            arch,
            vocab_size: r.usize_req("vocab_size")?,
            hidden_size,
            intermediate_size: r.usize_req("intermediate_size")?,
            num_hidden_layers: r.usize_req("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: r.usize_opt("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: r.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm: arch == Arch::Qwen3,
            sliding_window,
            torch_dtype,
            bos_token_id: opt_u32(obj.get("bos_token_id")),
            eos_token_ids: eos_ids(obj.get("eos_token_id"), path)?,
            hidden_act,
        };
        if cfg.vocab_size == 0 || cfg.hidden_size == 0 || cfg.num_hidden_layers == 0 {
            return Err(Error::config(
                path,
                "vocab_size, hidden_size and num_hidden_layers must be > 0",
            ));
        }
        // Values that would only show up as NaN logits or a model that cannot take a token.
        if !(cfg.rms_norm_eps >= 0.0 && cfg.rms_norm_eps.is_finite()) {
            return Err(Error::config(
                path,
                format!(
                    "rms_norm_eps must be a finite number ≥ 0, got {}",
                    cfg.rms_norm_eps
                ),
            ));
        }
        if !(cfg.rope_theta > 0.0 && cfg.rope_theta.is_finite()) {
            return Err(Error::config(
                path,
                format!("rope_theta must be a finite number > 0, got {}", cfg.rope_theta),
            ));
        }
        if cfg.intermediate_size == 0 || cfg.max_position_embeddings == 0 {
            return Err(Error::config(
                path,
                "intermediate_size and max_position_embeddings must be > 0",
            ));
        }
        check_token_ids(&cfg.eos_token_ids, cfg.vocab_size, path)?;
        Ok(cfg)
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// RoPE inverse frequencies [head_dim / 2], computed in f32 as transformers does
    /// (`1 / theta ** (arange(0, d, 2) / d)`), then the llama3 rescaling when configured.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f32 / d as f32))
            .collect();
        match &self.rope_scaling {
            RopeScaling::Default => base,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_ctx,
            } => {
                let low_freq_wavelen = old_ctx / low_freq_factor;
                let high_freq_wavelen = old_ctx / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen > low_freq_wavelen {
                            f / factor
                        } else if wavelen < high_freq_wavelen {
                            f
                        } else {
                            let smooth =
                                (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// A random-weights config of a real model's shape (for `rft bench` and tests).
    pub fn preset(name: &str) -> Option<ModelConfig> {
        let base = |arch, vocab, hidden, inter, layers, heads, kv, theta: f32, tie| ModelConfig {
            arch,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: hidden / heads,
            rms_norm_eps: 1e-6,
            rope_theta: theta,
            rope_scaling: RopeScaling::Default,
            max_position_embeddings: 32768,
            tie_word_embeddings: tie,
            qkv_bias: arch == Arch::Qwen2,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            sliding_window: None,
            torch_dtype: Some(DType::BF16),
            bos_token_id: None,
            eos_token_ids: vec![],
            hidden_act: "silu".into(),
        };
        Some(match name {
            "qwen2.5-0.5b" => base(Arch::Qwen2, 151936, 896, 4864, 24, 14, 2, 1e6, true),
            "qwen2.5-1.5b" => base(Arch::Qwen2, 151936, 1536, 8960, 28, 12, 2, 1e6, true),
            "qwen2.5-7b" => base(Arch::Qwen2, 152064, 3584, 18944, 28, 28, 4, 1e6, false),
            "llama3.2-1b" => {
                let mut c = base(Arch::Llama, 128256, 2048, 8192, 16, 32, 8, 500000.0, true);
                c.rms_norm_eps = 1e-5;
                c.rope_scaling = RopeScaling::Llama3 {
                    factor: 32.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192.0,
                };
                c.max_position_embeddings = 131072;
                c
            }
            _ => return None,
        })
    }
}

fn parse_rope(v: &Value, path: &Path) -> Result<RopeScaling> {
    let o = v
        .as_object()
        .ok_or_else(|| Error::config(path, "rope_scaling/rope_parameters: expected an object"))?;
    let ty = o
        .get("rope_type")
        .or_else(|| o.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |k: &str| -> Result<f32> {
        o.get(k)
            .and_then(num_f32)
            .ok_or_else(|| Error::config(path, format!("rope scaling {ty:?}: key {k:?} must be a number")))
    };
    match ty {
        "default" => Ok(RopeScaling::Default),
        "llama3" => {
            let s = RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            };
            if let RopeScaling::Llama3 {
                low_freq_factor,
                high_freq_factor,
                ..
            } = &s
            {
                if high_freq_factor <= low_freq_factor {
                    return Err(Error::config(
                        path,
                        "rope scaling llama3: high_freq_factor must be > low_freq_factor",
                    ));
                }
            }
            Ok(s)
        }
        other => Err(Error::config(
            path,
            format!("rope_type {other:?} is not supported (supported: default, llama3)"),
        )),
    }
}

/// EOS ids must be in the vocabulary: one outside it would never be sampled, so generation
/// would silently never stop at it.
fn check_token_ids(ids: &[u32], vocab_size: usize, path: &Path) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= vocab_size) {
        Some(id) => Err(Error::config(
            path,
            format!("eos_token_id {id} is outside the vocabulary (vocab_size {vocab_size})"),
        )),
        None => Ok(()),
    }
}

fn num_f32(v: &Value) -> Option<f32> {
    v.as_f64().map(|f| f as f32)
}

fn opt_u32(v: Option<&Value>) -> Option<u32> {
    v.and_then(|v| v.as_u64()).and_then(|u| u32::try_from(u).ok())
}

fn eos_ids(v: Option<&Value>, path: &Path) -> Result<Vec<u32>> {
    let bad = || Error::config(path, "eos_token_id: expected an integer or a list of integers");
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(a)) => a.iter().map(|x| opt_u32(Some(x)).ok_or_else(bad)).collect(),
        Some(x) => Ok(vec![opt_u32(Some(x)).ok_or_else(bad)?]),
    }
}

/// Typed access to config keys with messages naming the key.
struct Reader<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

impl Reader<'_> {
    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(|u| Some(u as usize)).ok_or_else(|| {
                Error::config(
                    self.path,
                    format!("key {key:?}: expected a non-negative integer, found {v}"),
                )
            }),
        }
    }
    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| Error::config(self.path, format!("missing required key {key:?}")))
    }
    fn f32_opt(&self, key: &str) -> Result<Option<f32>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => num_f32(v).map(Some).ok_or_else(|| {
                Error::config(self.path, format!("key {key:?}: expected a number, found {v}"))
            }),
        }
    }
    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                Error::config(
                    self.path,
                    format!("key {key:?}: expected true or false, found {v}"),
                )
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(s, Path::new("config.json"))
    }

    const BASE: &str = r#""hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100"#;

    #[test]
    fn old_and_new_rope_keys_agree() {
        let old = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rope_theta": 500000.0,
            "rope_scaling": {{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
            "torch_dtype": "bfloat16"}}"#
        ))
        .unwrap();
        let new = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE},
            "rope_parameters": {{"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}}, "dtype": "bfloat16"}}"#
        ))
        .unwrap();
        assert_eq!(old.rope_theta, new.rope_theta);
        assert_eq!(old.rope_scaling, new.rope_scaling);
        assert_eq!(old.torch_dtype, Some(DType::BF16));
        assert_eq!(new.torch_dtype, Some(DType::BF16));
        assert_eq!(old.rope_inv_freq(), new.rope_inv_freq());
    }

    #[test]
    fn llama3_scaling_formula() {
        // head_dim 16, theta 10000: wavelengths run from 2π to 2π·10000^(14/16) ≈ 19869.
        let c = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rope_theta": 10000.0,
            "rope_scaling": {{"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}}}"#
        ))
        .unwrap();
        let f = c.rope_inv_freq();
        let base: Vec<f32> = (0..8)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / 16.0))
            .collect();
        for (i, (&s, &b)) in f.iter().zip(&base).enumerate() {
            let wl = 2.0 * std::f32::consts::PI / b;
            if wl < 16.0 {
                assert_eq!(s, b, "high frequency {i} must be untouched");
            } else if wl > 64.0 {
                assert_eq!(s, b / 4.0, "low frequency {i} must be divided by the factor");
            } else {
                assert!(s < b && s > b / 4.0, "medium frequency {i} must be blended");
            }
        }
    }

    #[test]
    fn unsupported_arch_lists_supported() {
        let e = parse(&format!(r#"{{"architectures": ["GPT2LMHeadModel"], {BASE}}}"#)).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("GPT2LMHeadModel") && msg.contains("Qwen3ForCausalLM"),
            "{msg}"
        );
    }

    #[test]
    fn bad_keys_are_named() {
        let e = parse(r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": "big"}"#).unwrap_err();
        assert!(e.to_string().contains("hidden_size"), "{e}");
        let e = parse(r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 9}"#)
            .unwrap_err();
        assert!(e.to_string().contains("intermediate_size"), "{e}");
        let e = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rope_scaling": {{"rope_type": "yarn", "factor": 2.0}}}}"#
        ))
        .unwrap_err();
        assert!(e.to_string().contains("yarn"), "{e}");
        let e = parse("{not json").unwrap_err();
        assert!(
            e.to_string().contains("config.json") && e.to_string().contains("invalid JSON"),
            "{e}"
        );
    }

    #[test]
    fn eos_list_or_int_and_qwen_flags() {
        let c = parse(&format!(
            r#"{{"architectures": ["Qwen3ForCausalLM"], {BASE}, "head_dim": 32, "eos_token_id": [5, 7]}}"#
        ))
        .unwrap();
        assert_eq!(c.eos_token_ids, vec![5, 7]);
        assert_eq!(c.head_dim, 32);
        assert!(c.qk_norm && !c.qkv_bias);
        let c = parse(&format!(
            r#"{{"architectures": ["Qwen2ForCausalLM"], {BASE}, "eos_token_id": 3}}"#
        ))
        .unwrap();
        assert_eq!(c.eos_token_ids, vec![3]);
        assert!(c.qkv_bias && !c.o_bias && !c.qk_norm);
        assert_eq!(c.head_dim, 16);
    }
}
