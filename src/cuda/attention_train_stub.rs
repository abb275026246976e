//! TEMPORARY stub of the training attention launchers (replaced by attention_train.rs).
use super::CudaDevice;
use crate::{Error, Result};
use cudarc::driver::{DevicePtr, DevicePtrMut};
use half::bf16;

#[derive(Clone, Copy, Debug)]
pub struct TrainAttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub window: Option<usize>,
}

#[allow(clippy::too_many_arguments, unused_variables)]
impl CudaDevice {
    pub fn attention_train_fwd_bf16(
        &self,
        q: &impl DevicePtr<bf16>,
        k: &impl DevicePtr<bf16>,
        v: &impl DevicePtr<bf16>,
        cu_rows: &impl DevicePtr<i32>,
        out: &mut impl DevicePtrMut<bf16>,
        lse: &mut impl DevicePtrMut<f32>,
        shape: &TrainAttnShape,
        num_seqs: usize,
        rows: usize,
        max_rows: usize,
    ) -> Result<()> {
        Err(Error::invalid("stub"))
    }
    pub fn attention_train_bwd_bf16(
        &self,
        q: &impl DevicePtr<bf16>,
        k: &impl DevicePtr<bf16>,
        v: &impl DevicePtr<bf16>,
        out: &impl DevicePtr<bf16>,
        dout: &impl DevicePtr<bf16>,
        lse: &impl DevicePtr<f32>,
        cu_rows: &impl DevicePtr<i32>,
        dq: &mut impl DevicePtrMut<bf16>,
        dk: &mut impl DevicePtrMut<bf16>,
        dv: &mut impl DevicePtrMut<bf16>,
        delta: &mut impl DevicePtrMut<f32>,
        shape: &TrainAttnShape,
        num_seqs: usize,
        rows: usize,
        max_rows: usize,
    ) -> Result<()> {
        Err(Error::invalid("stub"))
    }
    pub fn scatter_rows_bf16(
        &self,
        src: &impl DevicePtr<bf16>,
        rows_idx: &impl DevicePtr<u32>,
        dst: &mut impl DevicePtrMut<bf16>,
        m: usize,
        dim: usize,
    ) -> Result<()> {
        Err(Error::invalid("stub"))
    }
}
