//! LoRA adapters: configuration, weights, and (later) PEFT-format I/O.
//!
//! A LoRA pair on a projection W [out, in] adds `scale · B A x` to `W x`, with
//! A [r, in], B [out, r] and scale = alpha / r (or alpha / √r with rsLoRA). It is applied live
//! — never merged into W during training or rollouts.

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
