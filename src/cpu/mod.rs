//! The f32 CPU reference: plain ops (forward and backward) and the batched KV-cache engine.
//! It is the oracle the CUDA kernels and the CUDA engine are tested against.

pub mod engine;
pub mod model;
pub mod ops;
pub mod train;
