//! LoRA adapters: configuration, weights, and (later) PEFT-format I/O.
//!
//! A LoRA pair on a projection W [out, in] adds `scale · B A x` to `W x`, with
//! A [r, in], B [out, r] and scale = alpha / r (or alpha / √r with rsLoRA). It is applied live
//! — never merged into W during training or rollouts.

pub mod peft;

use crate::model::config::ModelConfig;
use crate::model::weights::Proj;

#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub use_rslora: bool,
    pub target_modules: Vec<Proj>,
}

impl LoraConfig {
    /// The factor multiplying B A x.
    pub fn scale(&self) -> f32 {
        if self.use_rslora {
            self.alpha / (self.r as f32).sqrt()
        } else {
            self.alpha / self.r as f32
        }
    }
}

/// One LoRA pair: a [r, in], b [out, r], row-major like PyTorch's Linear weights.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// The adapter: per layer, an optional pair per projection (indexed by `Proj as usize`).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraWeights {
    pub config: LoraConfig,
    pub layers: Vec<[Option<LoraPair>; 7]>,
}

impl LoraWeights {
    pub fn pair(&self, layer: usize, p: Proj) -> Option<&LoraPair> {
        self.layers.get(layer).and_then(|l| l[p as usize].as_ref())
    }
}

impl LoraWeights {
    /// A fresh adapter initialised as PEFT does by default: A ~ Kaiming-uniform with
    /// a = √5, i.e. U(−1/√in, 1/√in); B = 0 (so the adapter starts as the identity).
    /// The generator is rft's own (seeded splitmix64), so values differ from torch's.
    pub fn init(config: LoraConfig, model: &ModelConfig, seed: u64) -> LoraWeights {
        let mut state = seed ^ 0x5EED_1075_A5A5_0001;
        let mut uniform = move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0 // [-1, 1)
        };
        let r = config.r;
        let mut layers = Vec::with_capacity(model.num_hidden_layers);
        for _ in 0..model.num_hidden_layers {
            let mut slot: [Option<LoraPair>; 7] = Default::default();
            for &p in &config.target_modules {
                let (d_in, d_out) = p.dims(model);
                let bound = 1.0 / (d_in as f32).sqrt();
                let a = (0..r * d_in).map(|_| uniform() * bound).collect();
                slot[p as usize] = Some(LoraPair {
                    a,
                    b: vec![0.0; d_out * r],
                });
            }
            layers.push(slot);
        }
        LoraWeights { config, layers }
    }

    /// Number of trainable parameters.
    pub fn num_params(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(|p| p.a.len() + p.b.len())
            .sum()
    }

    /// The same structure (config, present pairs, shapes) filled with zeros: the shape of
    /// this adapter's gradients and optimizer moments.
    pub fn zeros_like(&self) -> LoraWeights {
        let zero = |p: &Option<LoraPair>| {
            p.as_ref().map(|p| LoraPair {
                a: vec![0.0; p.a.len()],
                b: vec![0.0; p.b.len()],
            })
        };
        LoraWeights {
            config: self.config.clone(),
            layers: self
                .layers
                .iter()
                .map(|l| std::array::from_fn(|i| zero(&l[i])))
                .collect(),
        }
    }

    /// Deterministic random pairs on every `target_modules` projection of every layer, with
    /// uniform entries of std `std_a` (A) and `std_b` (B). PEFT initialises B to zero; tests
    /// want both non-zero so that every gradient path is exercised. Small xorshift generator.
    pub fn new_random(
        config: LoraConfig,
        model: &crate::model::config::ModelConfig,
        seed: u64,
        std_a: f32,
        std_b: f32,
    ) -> LoraWeights {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move |std: f32| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * std * 3f32.sqrt()
        };
        let r = config.r;
        let mut layers = Vec::with_capacity(model.num_hidden_layers);
        for _ in 0..model.num_hidden_layers {
            let mut layer: [Option<LoraPair>; 7] = Default::default();
            for p in Proj::ALL {
                if config.target_modules.contains(&p) {
                    let (d_in, d_out) = p.dims(model);
                    let a = (0..r * d_in).map(|_| next(std_a)).collect();
                    let b = (0..d_out * r).map(|_| next(std_b)).collect();
                    layer[p as usize] = Some(LoraPair { a, b });
                }
            }
            layers.push(layer);
        }
        LoraWeights { config, layers }
    }
}
