//! CUDA backend (to be written)
