//! Datasets and inputs: JSONL inputs of `generate`/`score` ([`input`]), training datasets with
//! validation splits and the prompt sampler ([`dataset`]), and the built-in generated tasks with
//! their checkers and the `[data]` config table ([`tasks`]).

pub mod dataset;
pub mod input;
pub mod tasks;

pub use dataset::{Dataset, Item, PromptSampler, SamplerState, SftPair, ValSplit};
pub use input::PromptSpec;
pub use tasks::{
    arithmetic_score, countdown_score, countdown_score_with, score_item, AnswerFormat, DataSplits,
    PromptFormat, Task, TaskConfig,
};
