//! Sampling (to be written)
