//! JSONL inputs of `rft generate` / `rft score` (to be written)

