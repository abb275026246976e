//! Datasets and inputs.

pub mod input;
