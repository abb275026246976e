//! Safetensors checkpoints read through mmap (one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`), and the f32 weight tables of the CPU reference.
//!
//! [`Checkpoint`] owns the mmaps and hands out raw tensor views (dtype, shape, bytes): the
//! CUDA backend uploads bf16 straight from them. [`Weights`] is the CPU engine's f32 copy,
//! with every tensor's shape checked against the config and named in errors.

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The mmap'd safetensors files of a model directory.
pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap)>,
    /// tensor name → (file index, dtype, shape, byte range in the mmap)
    index: HashMap<String, TensorEntry>,
}

#[derive(Clone, Debug)]
struct TensorEntry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A borrowed tensor of the checkpoint in its stored dtype.
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl Checkpoint {
    /// Opens `DIR/model.safetensors` or the shards named by `DIR/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Safetensors {
                path: index_path.clone(),
                msg: format!("invalid JSON: {e}"),
            })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Safetensors {
                    path: index_path.clone(),
                    msg: "missing object \"weight_map\"".into(),
                })?;
            let mut names: Vec<String> = Vec::new();
            for (tensor, f) in map {
                let f = f.as_str().ok_or_else(|| Error::Safetensors {
                    path: index_path.clone(),
                    msg: format!("weight_map[{tensor:?}]: expected a file name"),
                })?;
                if !names.iter().any(|n| n == f) {
                    names.push(f.to_string());
                }
            }
            names.sort();
            let files: Vec<PathBuf> = names.into_iter().map(|n| dir.join(n)).collect();
            if let Some(missing) = files.iter().find(|f| !f.is_file()) {
                return Err(Error::Safetensors {
                    path: missing.clone(),
                    msg: format!("shard listed in {} is missing", index_path.display()),
                });
            }
            files
        } else if single.exists() {
            vec![single]
        } else {
            return Err(Error::Safetensors {
                path: dir.to_path_buf(),
                msg: "no model.safetensors or model.safetensors.index.json in this directory".into(),
            });
        };
        Self::open_files(&files)
    }

    /// Opens the given safetensors files (e.g. an adapter's) as one table.
    pub fn open_files(paths: &[PathBuf]) -> Result<Checkpoint> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the file is opened read-only; rft never writes a checkpoint it has mapped
            // (writes go to a temp file and are renamed over). A concurrent external truncation
            // is outside what any mmap-based loader can guard against.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| Error::Safetensors {
                path: path.clone(),
                msg: match truncation(&mmap) {
                    Some(why) => format!("truncated safetensors file: {why}"),
                    None => format!("not a valid safetensors file (truncated or corrupt?): {e}"),
                },
            })?;
            let base = mmap.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let data = view.data();
                let start = data.as_ptr() as usize - base;
                let entry = TensorEntry {
                    file: fi,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    start,
                    end: start + data.len(),
                };
                index.insert(name, entry);
            }
            files.push((path.clone(), mmap));
        }
        Ok(Checkpoint { files, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|s| s.as_str())
    }

    /// The path shown in messages: the single file, or the directory of the shards.
    pub fn display_path(&self) -> PathBuf {
        match self.files.as_slice() {
            [(p, _)] => p.clone(),
            [(p, _), ..] => p.parent().map(|d| d.to_path_buf()).unwrap_or_else(|| p.clone()),
            [] => PathBuf::new(),
        }
    }

    pub fn view(&self, name: &str) -> Result<TensorView<'_>> {
        let (key, e) = self
            .index
            .get_key_value(name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.display_path(),
                name: name.to_string(),
            })?;
        Ok(TensorView {
            name: key,
            dtype: e.dtype,
            shape: &e.shape,
            bytes: &self.files[e.file].1[e.start..e.end],
        })
    }

    /// Reads tensor `name`, checks its shape, converts to f32.
    pub fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let v = self.view(name)?;
        if v.shape != expected {
            return Err(Error::Shape {
                path: self.file_of(name),
                name: name.to_string(),
                expected: expected.to_vec(),
                found: v.shape.to_vec(),
            });
        }
        to_f32(&v).map_err(|msg| Error::Safetensors {
            path: self.file_of(name),
            msg,
        })
    }

    fn file_of(&self, name: &str) -> PathBuf {
        self.index
            .get(name)
            .map(|e| self.files[e.file].0.clone())
            .unwrap_or_default()
    }
}

/// Why a safetensors file that failed to parse looks cut short, if it does: its size is below
/// what its 8-byte header length or its tensors' data offsets need.
fn truncation(bytes: &[u8]) -> Option<String> {
    let len = bytes.len();
    let Some(n) = bytes.get(..8) else {
        return Some(format!("{len} bytes, shorter than the 8-byte header length"));
    };
    let n = u64::from_le_bytes(n.try_into().ok()?);
    if n > 100_000_000 {
        return None; // not a plausible header length: corrupt rather than cut
    }
    let header_end = 8 + n as usize;
    if header_end > len {
        return Some(format!(
            "the header needs {header_end} bytes but the file has only {len}"
        ));
    }
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..header_end]).ok()?;
    let data_end = header
        .as_object()?
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()?;
    let need = header_end as u64 + data_end;
    (need > len as u64).then(|| format!("its tensors need {need} bytes but the file has only {len}"))
}

/// Converts a stored tensor (f32, f16 or bf16, little-endian) to f32.
pub fn to_f32(v: &TensorView) -> std::result::Result<Vec<f32>, String> {
    let b = v.bytes;
    let out = match v.dtype {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(format!(
                "tensor {}: dtype {other:?} is not supported (expected F32, F16 or BF16)",
                v.name
            ))
        }
    };
    Ok(out)
}

/// The seven projections of a decoder layer that carry weights (and may carry LoRA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// PEFT / HF module name: `q_proj`, …, `down_proj`.
    pub fn module_name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    pub fn from_module_name(s: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.module_name() == s)
    }

    /// `self_attn` or `mlp`.
    pub fn parent(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            _ => "mlp",
        }
    }

    /// (in, out) features of this projection for a config.
    pub fn dims(self, c: &ModelConfig) -> (usize, usize) {
        let (d, i) = (c.hidden_size, c.intermediate_size);
        match self {
            Proj::Q => (d, c.q_dim()),
            Proj::K | Proj::V => (d, c.kv_dim()),
            Proj::O => (c.q_dim(), d),
            Proj::Gate | Proj::Up => (d, i),
            Proj::Down => (i, d),
        }
    }

    pub fn has_bias(self, c: &ModelConfig) -> bool {
        match self {
            Proj::Q | Proj::K | Proj::V => c.qkv_bias,
            Proj::O => c.o_bias,
            _ => c.mlp_bias,
        }
    }
}

/// A frozen `nn.Linear`: w [out, in] row-major, optional bias \[out\].
#[derive(Clone, Debug)]
pub struct Linear {
    pub w: Vec<f32>,
    pub b: Option<Vec<f32>>,
    pub d_in: usize,
    pub d_out: usize,
}

#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub input_norm: Vec<f32>,     // [D]
    pub q: Linear,                // [H·hd, D]
    pub k: Linear,                // [KV·hd, D]
    pub v: Linear,                // [KV·hd, D]
    pub o: Linear,                // [D, H·hd]
    pub q_norm: Option<Vec<f32>>, // [hd] (Qwen3)
    pub k_norm: Option<Vec<f32>>, // [hd] (Qwen3)
    pub post_norm: Vec<f32>,      // [D]
    pub gate: Linear,             // [I, D]
    pub up: Linear,               // [I, D]
    pub down: Linear,             // [D, I]
}

impl LayerWeights {
    pub fn proj(&self, p: Proj) -> &Linear {
        match p {
            Proj::Q => &self.q,
            Proj::K => &self.k,
            Proj::V => &self.v,
            Proj::O => &self.o,
            Proj::Gate => &self.gate,
            Proj::Up => &self.up,
            Proj::Down => &self.down,
        }
    }
    pub fn proj_mut(&mut self, p: Proj) -> &mut Linear {
        match p {
            Proj::Q => &mut self.q,
            Proj::K => &mut self.k,
            Proj::V => &mut self.v,
            Proj::O => &mut self.o,
            Proj::Gate => &mut self.gate,
            Proj::Up => &mut self.up,
            Proj::Down => &mut self.down,
        }
    }
}

/// All weights of a decoder-only model in f32.
#[derive(Clone, Debug)]
pub struct Weights {
    pub embed: Vec<f32>,           // [V, D]
    pub layers: Vec<LayerWeights>, // L
    pub final_norm: Vec<f32>,      // [D]
    /// [V, D]; `None` when tied to `embed`.
    pub lm_head: Option<Vec<f32>>,
}

impl Weights {
    pub fn lm_head(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.embed)
    }

    /// Loads and shape-checks every tensor the config implies.
    pub fn load(ckpt: &Checkpoint, c: &ModelConfig) -> Result<Weights> {
        let (v, d, hd) = (c.vocab_size, c.hidden_size, c.head_dim);
        let embed = ckpt.read_f32("model.embed_tokens.weight", &[v, d])?;
        // Not `with_capacity(num_hidden_layers)`: the count comes from config.json, and an absurd
        // value must end in a missing-tensor error, not an allocation failure.
        let mut layers = Vec::new();
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let lin = |proj: Proj| -> Result<Linear> {
                let (d_in, d_out) = proj.dims(c);
                let base = format!("{p}.{}.{}", proj.parent(), proj.module_name());
                let w = ckpt.read_f32(&format!("{base}.weight"), &[d_out, d_in])?;
                let b = if proj.has_bias(c) {
                    Some(ckpt.read_f32(&format!("{base}.bias"), &[d_out])?)
                } else {
                    None
                };
                Ok(Linear { w, b, d_in, d_out })
            };
            let norm = |name: &str, n: usize| ckpt.read_f32(&format!("{p}.{name}.weight"), &[n]);
            layers.push(LayerWeights {
                input_norm: norm("input_layernorm", d)?,
                q: lin(Proj::Q)?,
                k: lin(Proj::K)?,
                v: lin(Proj::V)?,
                o: lin(Proj::O)?,
                q_norm: if c.qk_norm {
                    Some(norm("self_attn.q_norm", hd)?)
                } else {
                    None
                },
                k_norm: if c.qk_norm {
                    Some(norm("self_attn.k_norm", hd)?)
                } else {
                    None
                },
                post_norm: norm("post_attention_layernorm", d)?,
                gate: lin(Proj::Gate)?,
                up: lin(Proj::Up)?,
                down: lin(Proj::Down)?,
            });
        }
        let final_norm = ckpt.read_f32("model.norm.weight", &[d])?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(ckpt.read_f32("lm_head.weight", &[v, d])?)
        };
        Ok(Weights {
            embed,
            layers,
            final_norm,
            lm_head,
        })
    }

    /// Zeros of a config's shape (e.g. the layout of full fine-tuning gradients).
    pub fn zeros(c: &ModelConfig) -> Weights {
        crate::cpu::train::zeros_like_weights(&Weights::random(c, 0, 0.0))
    }

    /// Deterministic random weights of a config's shape (std `std`, norms around 1), for
    /// tests and benches. Uses a small xorshift generator: no statistical claims.
    pub fn random(c: &ModelConfig, seed: u64, std: f32) -> Weights {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            // uniform in [-1, 1) scaled to the requested std (uniform std = 1/sqrt(3))
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * std * 3f32.sqrt()
        };
        let mut vec = |n: usize| (0..n).map(|_| next()).collect::<Vec<f32>>();
        let (v, d, hd) = (c.vocab_size, c.hidden_size, c.head_dim);
        let embed = vec(v * d);
        let mut layers = Vec::new();
        for _ in 0..c.num_hidden_layers {
            let mut lin = |p: Proj| {
                let (d_in, d_out) = p.dims(c);
                Linear {
                    w: vec(d_in * d_out),
                    b: p.has_bias(c).then(|| vec(d_out)),
                    d_in,
                    d_out,
                }
            };
            let (q, k, vv, o, gate, up, down) = (
                lin(Proj::Q),
                lin(Proj::K),
                lin(Proj::V),
                lin(Proj::O),
                lin(Proj::Gate),
                lin(Proj::Up),
                lin(Proj::Down),
            );
            let mut norm = |n: usize| vec(n).into_iter().map(|x| 1.0 + x).collect::<Vec<f32>>();
            layers.push(LayerWeights {
                input_norm: norm(d),
                q,
                k,
                v: vv,
                o,
                q_norm: c.qk_norm.then(|| norm(hd)),
                k_norm: c.qk_norm.then(|| norm(hd)),
                post_norm: norm(d),
                gate,
                up,
                down,
            });
        }
        let final_norm = vec(d).into_iter().map(|x| 1.0 + x).collect();
        let lm_head = (!c.tie_word_embeddings).then(|| vec(v * d));
        Weights {
            embed,
            layers,
            final_norm,
            lm_head,
        }
    }

    /// Named tensors in HF's layout (for saving a merged or fully fine-tuned checkpoint).
    pub fn named_tensors(&self, c: &ModelConfig) -> BTreeMap<String, (Vec<usize>, &[f32])> {
        let (v, d, hd) = (c.vocab_size, c.hidden_size, c.head_dim);
        let mut m: BTreeMap<String, (Vec<usize>, &[f32])> = BTreeMap::new();
        m.insert("model.embed_tokens.weight".into(), (vec![v, d], &self.embed));
        for (l, lw) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            m.insert(format!("{p}.input_layernorm.weight"), (vec![d], &lw.input_norm));
            m.insert(
                format!("{p}.post_attention_layernorm.weight"),
                (vec![d], &lw.post_norm),
            );
            if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
                m.insert(format!("{p}.self_attn.q_norm.weight"), (vec![hd], qn));
                m.insert(format!("{p}.self_attn.k_norm.weight"), (vec![hd], kn));
            }
            for proj in Proj::ALL {
                let lin = lw.proj(proj);
                let base = format!("{p}.{}.{}", proj.parent(), proj.module_name());
                m.insert(format!("{base}.weight"), (vec![lin.d_out, lin.d_in], &lin.w));
                if let Some(b) = &lin.b {
                    m.insert(format!("{base}.bias"), (vec![lin.d_out], b));
                }
            }
        }
        m.insert("model.norm.weight".into(), (vec![d], &self.final_norm));
        if let Some(h) = &self.lm_head {
            m.insert("lm_head.weight".into(), (vec![v, d], h));
        }
        m
    }
}

/// Writes f32 tensors as a safetensors file atomically (temp file in the same directory,
/// then rename), so a crash never leaves a half-written file under the final name.
pub fn save_safetensors_f32(
    path: &Path,
    tensors: &BTreeMap<String, (Vec<usize>, &[f32])>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, (shape, data))| {
            let bytes: &[u8] = bytemuck::cast_slice(data);
            let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map_err(|e| Error::invalid(format!("tensor {name}: {e}")))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::tensor::serialize(views, metadata)
        .map_err(|e| Error::invalid(format!("serializing {}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// fsync of a directory (its entries: a rename into it is durable after this).
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let f = std::fs::File::open(dir).map_err(|e| Error::io(dir, e))?;
    f.sync_all().map_err(|e| Error::io(dir, e))
}

/// Write `bytes` to `path` through a temp file + fsync + rename + fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let fname = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{fname}.tmp{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        // The rename itself survives a power loss once the directory entry is on disk.
        fsync_dir(dir)
    })();
    if written.is_err() {
        // A failed write (disk full, a directory in the way) leaves no stray temp file.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
