//! Training state and checkpoints with exact resume.
//!
//! A checkpoint directory holds
//! ```text
//! adapter_config.json + adapter_model.safetensors   (LoRA: a PEFT adapter, loadable as is)
//!   or model.safetensors                            (full fine-tuning: HF names, f32)
//! optimizer.safetensors                             AdamW moments m.{i}, v.{i} (f32, exact)
//! trainer_state.json                                step, AdamW step, seed, skipped steps,
//!                                                   the run's config (opaque JSON)
//! ```
//! It is written into a temporary sibling directory (every file fsynced), which is then
//! renamed to the final name (an older checkpoint of that name is moved aside first and
//! removed after), and the parent directory is fsynced: a crash never leaves a half-written
//! checkpoint under the final name. All randomness is counter-based on (seed, step), so the
//! state above is everything a bit-identical resume needs.
//!
//! [`base_model_fingerprint`] identifies the base model the checkpoint was trained on without
//! reading its weights, so a resume can refuse another model of the same shape.

use crate::error::{Error, Result};
use crate::lora::{peft, LoraWeights};
use crate::model::config::ModelConfig;
use crate::model::weights::{
    fsync_dir, save_safetensors_f32, write_atomic, Checkpoint as StCheckpoint, Weights,
};
use crate::optim::AdamWState;
use crate::trainer::{lora_params, weight_params};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Step counters, seed and optimiser moments.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainState {
    /// Optimiser steps attempted so far (skipped ones included): the schedule's step.
    pub step: u64,
    /// Steps skipped because the loss or a gradient was non-finite.
    pub skipped_steps: u64,
    /// Seed of every random choice of the run (LoRA dropout masks, data order).
    pub seed: u64,
    pub adam: AdamWState,
}

impl TrainState {
    pub fn new(seed: u64) -> TrainState {
        TrainState {
            seed,
            ..Default::default()
        }
    }

    /// The LoRA-dropout seed of the current step: a pure function of (seed, step).
    pub fn dropout_seed(&self) -> u64 {
        splitmix(self.seed ^ splitmix(self.step.wrapping_add(0xD20F)))
    }
}

pub(crate) fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What is trained.
#[derive(Clone, Debug)]
pub enum Trainable {
    Lora(LoraWeights),
    Full(Weights),
}

/// A loaded checkpoint.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub params: Trainable,
    pub state: TrainState,
    pub config: Value,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    format: String,
    kind: String,
    step: u64,
    skipped_steps: u64,
    seed: u64,
    adam_step: u64,
    num_tensors: usize,
    config: Value,
}

const FORMAT: &str = "rft-trainer-state-v1";

/// Bytes of each weight file's data section hashed by [`base_model_fingerprint`], in
/// [`FINGERPRINT_SAMPLES`] slices spread evenly from its first to its last byte.
const FINGERPRINT_SAMPLE_BYTES: u64 = 4096;
const FINGERPRINT_SAMPLES: u64 = 16;

/// A cheap identity of the base model in `dir`, independent of where the directory lies:
/// FNV-1a 64 over `config.json` and, per `*.safetensors` file (sorted by name), its name,
/// size, header (tensor names, dtypes, shapes, offsets) and 16 slices of 4 KiB spread over
/// its data. Two models of the same shape differ in their data (a fine-tune changes every
/// tensor), so the slices tell them apart; reading them costs a few hundred KiB, not the weights.
pub fn base_model_fingerprint(dir: &Path) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut h = Fnv64::new();
    let cfg = dir.join("config.json");
    h.field(&std::fs::read(&cfg).map_err(|e| Error::io(&cfg, e))?);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
        .collect();
    files.sort();
    for path in files {
        let mut f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let size = f.metadata().map_err(|e| Error::io(&path, e))?.len();
        h.field(path.file_name().expect("a file name").as_encoded_bytes());
        h.field(&size.to_le_bytes());
        let mut read_at = |at: u64, n: u64| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; n.min(size.saturating_sub(at)) as usize];
            f.seek(SeekFrom::Start(at)).map_err(|e| Error::io(&path, e))?;
            f.read_exact(&mut buf).map_err(|e| Error::io(&path, e))?;
            Ok(buf)
        };
        let len = read_at(0, 8)?;
        let header_len = match <[u8; 8]>::try_from(len.as_slice()) {
            Ok(b) => u64::from_le_bytes(b).min(size - 8),
            Err(_) => 0,
        };
        h.field(&read_at(8, header_len)?);
        let data = (8 + header_len).min(size);
        let span = size - data;
        for i in 0..FINGERPRINT_SAMPLES {
            let room = span.saturating_sub(FINGERPRINT_SAMPLE_BYTES);
            h.field(&read_at(
                data + room * i / (FINGERPRINT_SAMPLES - 1),
                FINGERPRINT_SAMPLE_BYTES,
            )?);
        }
    }
    Ok(format!("fnv1a64:{:016x}", h.0))
}

/// FNV-1a, 64 bits: stable across platforms and releases (unlike std's hasher).
struct Fnv64(u64);

impl Fnv64 {
    fn new() -> Fnv64 {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }

    /// Hashes `bytes` preceded by their length (so field boundaries count).
    fn field(&mut self, bytes: &[u8]) {
        for &b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// Saves `params` + `state` + `config` as the checkpoint directory `dir`, atomically.
/// `base_model` is written into the adapter config (`base_model_name_or_path`).
pub fn save_checkpoint(
    dir: &Path,
    params: &Trainable,
    model_config: &ModelConfig,
    state: &TrainState,
    config: &Value,
    base_model: &str,
) -> Result<()> {
    let name = dir
        .file_name()
        .ok_or_else(|| Error::invalid(format!("checkpoint path {} has no name", dir.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = parent.join(format!(".{name}.tmp{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;

    let (kind, sizes) = match params {
        Trainable::Lora(l) => {
            peft::save(&tmp, l, base_model)?;
            ("lora", lora_params(l).iter().map(|p| p.len()).collect::<Vec<_>>())
        }
        Trainable::Full(w) => {
            let mut meta = std::collections::HashMap::new();
            meta.insert("format".to_string(), "pt".to_string());
            save_safetensors_f32(
                &tmp.join("model.safetensors"),
                &w.named_tensors(model_config),
                Some(meta),
            )?;
            ("full", weight_params(w).iter().map(|p| p.len()).collect())
        }
    };
    // An empty AdamW state (no step taken yet) is saved as zeros.
    let adam = if state.adam.m.is_empty() {
        AdamWState::new(&sizes)
    } else {
        state.adam.clone()
    };
    adam.check_sizes(&sizes)?;
    let mut tensors: BTreeMap<String, (Vec<usize>, &[f32])> = BTreeMap::new();
    for (i, (m, v)) in adam.m.iter().zip(&adam.v).enumerate() {
        tensors.insert(format!("m.{i:05}"), (vec![m.len()], m));
        tensors.insert(format!("v.{i:05}"), (vec![v.len()], v));
    }
    save_safetensors_f32(&tmp.join(OPTIMIZER_FILE), &tensors, None)?;
    let sf = StateFile {
        format: FORMAT.into(),
        kind: kind.into(),
        step: state.step,
        skipped_steps: state.skipped_steps,
        seed: state.seed,
        adam_step: state.adam.step,
        num_tensors: sizes.len(),
        config: config.clone(),
    };
    let text = serde_json::to_string_pretty(&sf).expect("json");
    write_atomic(&tmp.join(STATE_FILE), text.as_bytes())?;
    fsync_dir(&tmp)?;

    // Swap into place: old → aside, tmp → final, remove old.
    let old: Option<PathBuf> = if dir.exists() {
        let aside = parent.join(format!(".{name}.old{}", std::process::id()));
        if aside.exists() {
            std::fs::remove_dir_all(&aside).map_err(|e| Error::io(&aside, e))?;
        }
        std::fs::rename(dir, &aside).map_err(|e| Error::io(dir, e))?;
        Some(aside)
    } else {
        None
    };
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    fsync_dir(&parent)?;
    if let Some(o) = old {
        std::fs::remove_dir_all(&o).map_err(|e| Error::io(&o, e))?;
    }
    Ok(())
}

/// Loads a checkpoint saved by [`save_checkpoint`] for a model of `model_config`.
pub fn load_checkpoint(dir: &Path, model_config: &ModelConfig) -> Result<Checkpoint> {
    let spath = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&spath).map_err(|e| Error::io(&spath, e))?;
    let sf: StateFile = serde_json::from_str(&text)
        .map_err(|e| Error::config(&spath, format!("not an rft trainer state: {e}")))?;
    if sf.format != FORMAT {
        return Err(Error::config(
            &spath,
            format!("unknown format {:?} (expected {FORMAT:?})", sf.format),
        ));
    }
    let params = match sf.kind.as_str() {
        "lora" => Trainable::Lora(peft::load(dir, model_config)?),
        "full" => {
            let ck = StCheckpoint::open_files(&[dir.join("model.safetensors")])?;
            Trainable::Full(Weights::load(&ck, model_config)?)
        }
        k => return Err(Error::config(&spath, format!("unknown kind {k:?}"))),
    };
    let sizes: Vec<usize> = match &params {
        Trainable::Lora(l) => lora_params(l).iter().map(|p| p.len()).collect(),
        Trainable::Full(w) => weight_params(w).iter().map(|p| p.len()).collect(),
    };
    if sizes.len() != sf.num_tensors {
        return Err(Error::config(
            &spath,
            format!(
                "{} optimizer tensors recorded, the parameters have {}",
                sf.num_tensors,
                sizes.len()
            ),
        ));
    }
    let opath = dir.join(OPTIMIZER_FILE);
    let ck = StCheckpoint::open_files(&[opath])?;
    let mut adam = AdamWState {
        step: sf.adam_step,
        m: Vec::with_capacity(sizes.len()),
        v: Vec::with_capacity(sizes.len()),
    };
    for (i, &n) in sizes.iter().enumerate() {
        adam.m.push(ck.read_f32(&format!("m.{i:05}"), &[n])?);
        adam.v.push(ck.read_f32(&format!("v.{i:05}"), &[n])?);
    }
    // A state that never stepped stays "lazy" (as AdamW initialises it).
    if adam.step == 0 {
        adam = AdamWState::default();
    }
    Ok(Checkpoint {
        params,
        state: TrainState {
            step: sf.step,
            skipped_steps: sf.skipped_steps,
            seed: sf.seed,
            adam,
        },
        config: sf.config,
    })
}
