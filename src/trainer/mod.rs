//! The RFT loop: rollouts → grades → advantages → update → log → save.

pub mod metrics;
pub mod plot;
