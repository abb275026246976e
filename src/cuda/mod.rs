//! CUDA backend: the kernels build.rs compiled from `kernels/*.cu`, whether this machine can
//! run them ([`availability`]), and the device that runs them ([`CudaDevice`]: context, stream,
//! loaded kernel module, lazily created cuBLAS handle, typed kernel launchers).
//!
//! It owns the device side only. It does not own what to compute: the CPU reference
//! (`crate::cpu`) is the oracle every launcher here is tested against (tests/cuda_kernels.rs),
//! and engines built on top plan their memory and call the launchers in order.
//!
//! Everything here builds and links on machines without CUDA: cudarc loads libcuda and cuBLAS
//! dynamically, and nothing touches cudarc before [`availability`] has checked that libcuda can
//! be loaded (cudarc panics when it cannot).
//!
//! Layout: `device.rs` (context, stream, module, cuBLAS, host⇄device copies),
//! `kernels.rs` (one launcher per `extern "C"` kernel: grid, block, argument order, shape checks),
//! `rollout.rs` (the rollout kernels' launchers: embedding, RoPE, SwiGLU, KV cache, attention,
//! LoRA, sampling, log-prob gather), `fused.rs` (the rollout forward's fused per-layer kernels),
//! `gemm.rs` (the skinny decode GEMM and its per-shape tuning against cuBLAS), `engine.rs` (the rollout engine: memory plan, forward,
//! generate/score on the GPU), `train_kernels.rs` (the training step's kernels: log-softmax
//! gather forward/backward, GRPO loss, LoRA / RMSNorm / SwiGLU / RoPE backward, grad norm, AdamW;
//! it also loads the handles of every training kernel), `attention_train.rs` (training attention
//! over packed sequences: forward saving the log-sum-exp, deterministic backward, row scatter),
//! `lora_train.rs` (the training step's tensor-core LoRA: fused forward, fused input gradient,
//! deterministic A / B gradients), `train.rs` (the GRPO training step on the GPU: `CudaTrainer`, its memory plan, `bench_train`).
//! This file also holds what every kernel table shares: the lookup of a kernel by name
//! (`load_kernel`) and the opt-in to more than 48 KiB of dynamic shared memory (`allow_smem`).

mod attention_train;
mod device;
pub mod engine;
mod fused;
mod gemm;
mod kernels;
mod lora_train;
mod rollout;
pub mod train;
mod train_kernels;

pub use attention_train::{
    attention_train_row_tiles, packed_max_rows, TrainAttnShape, ATTN_TRAIN_COMPILED_HEAD_DIMS,
};
pub use device::{CudaDevice, CUBLAS_WORKSPACE_BYTES};
pub use engine::{CudaEngine, MemoryPlan};
pub use fused::{LoraMember, FUSED_KERNEL_NAMES};
pub use gemm::{
    skinny_applies, skinny_smem_bytes, skinny_splits, GemmChoice, GemmOut, GemmPolicy, GemmTuneRecord,
    GEMM_KERNEL_NAMES, SKINNY_MAX_ROWS, SKINNY_PARTIAL_LEN,
};
pub use lora_train::{
    lora_train_col_splits, lora_train_compiled_rank, lora_train_fused_smem_bytes,
    lora_train_grad_scratch_len, lora_train_grad_smem_bytes, lora_train_grad_split,
    set_lora_train_target_blocks, LoraDropoutSite, LoraOut, FUSED_TARGET_BLOCKS, LORA_TRAIN_COMPILED_RANKS,
    LORA_TRAIN_MAX_RANK,
};
pub use rollout::{
    decode_partitions, sample_scratch_len, AttnShape, SamplingParamsDev, DECODE_PARTITION_SIZE,
    ROLLOUT_KERNEL_NAMES, SAMPLE_CHUNK,
};
pub use train::{CudaTrainer, PackedBatch, TrainPlan};
pub use train_kernels::{
    clip_report_from_stats, embedding_grad_index, grad_norm_blocks, grad_norm_partials_len, grpo_loss_blocks,
    grpo_loss_partials_len, lora_grad_scratch_len, lora_grad_splits, rmsnorm_bwd_blocks,
    rmsnorm_bwd_partials_len, GrpoLossScalars, GrpoLossTotals, GRPO_FIELDS, RMSNORM_BWD_MAX_DIM,
    TRAIN_KERNEL_NAMES,
};

/// What build.rs generated: `KERNELS_FATBIN`, `KERNELS_MISSING_REASON`, `NVCC_REQUIRED`.
mod built {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The fatbin of every `kernels/*.cu` (sm_80 and sm_90a cubins plus compute_90 PTX), or None
/// when the crate was built without nvcc (see [`availability`] for the reason).
pub fn kernels_fatbin() -> Option<&'static [u8]> {
    built::KERNELS_FATBIN
}

/// Whether this build ran with `RFT_REQUIRE_NVCC=1` (then [`kernels_fatbin`] is always Some).
pub fn nvcc_required_at_build() -> bool {
    built::NVCC_REQUIRED
}

/// Ok when the CUDA backend can run here: the kernels were compiled into this binary, libcuda
/// (the NVIDIA driver library) can be loaded, and the driver sees at least one device.
/// Otherwise a readable reason. Never panics, also on machines without any CUDA.
pub fn availability() -> Result<(), String> {
    if kernels_fatbin().is_none() {
        return Err(built::KERNELS_MISSING_REASON.to_string());
    }
    driver_availability().map(|_| ())
}

/// libcuda loadable and the number of devices the driver sees (≥ 1), or why not.
fn driver_availability() -> Result<usize, String> {
    // SAFETY: only tries to dlopen libcuda's usual names and closes it again; this is the check
    // cudarc offers for exactly this purpose, before anything that would panic without libcuda.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("libcuda (the NVIDIA driver library) could not be loaded: \
                    no NVIDIA driver on this machine"
            .to_string());
    }
    match cudarc::driver::CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(n as usize),
        Ok(_) => Err("the NVIDIA driver is installed but reports no CUDA devices".to_string()),
        Err(e) => Err(format!("the NVIDIA driver failed to initialize (cuInit): {e}")),
    }
}

/// A kernel of the embedded fatbin by its `extern "C"` name (every kernel table loads its
/// kernels through here when the device is opened).
fn load_kernel(
    module: &std::sync::Arc<cudarc::driver::CudaModule>,
    name: &str,
) -> crate::Result<cudarc::driver::CudaFunction> {
    module
        .load_function(name)
        .map_err(cuda_err(format_args!("kernel {name} in the embedded fatbin")))
}

/// Shared memory (static + dynamic) a block may use without opting in.
const SMEM_DEFAULT_BYTES: usize = 48 * 1024;

/// Lets `func` use `smem` bytes of dynamic shared memory: the opt-in CUDA requires above
/// [`SMEM_DEFAULT_BYTES`] (every sm_80+ GPU allows up to 99 KiB), nothing below. Set once it
/// holds for every later launch and graph capture. `kn` names the kernel in the error.
fn allow_smem(func: &cudarc::driver::CudaFunction, kn: &str, smem: usize) -> crate::Result<()> {
    if smem > SMEM_DEFAULT_BYTES {
        func.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(cuda_err(format_args!(
            "{kn}: allowing {smem} bytes of dynamic shared memory per block"
        )))?;
    }
    Ok(())
}

/// Maps a cudarc driver error to [`crate::Error::Cuda`], saying what was being done.
fn cuda_err(what: impl std::fmt::Display) -> impl FnOnce(cudarc::driver::DriverError) -> crate::Error {
    move |e| crate::Error::Cuda(format!("{what}: {e}"))
}
