//! One CUDA device: its context, the stream all work goes to, the module holding every kernel
//! of the embedded fatbin, and a cuBLAS handle created on first use. Also plain host⇄device
//! copies (synchronous from the host's view), including f32 ⇄ bf16 conversion for tests.
//!
//! All work of a device goes to ONE stream of its own (non-blocking, created at open), so every
//! launch is ordered after the previous one. It is not the legacy null stream because CUDA-graph
//! capture (the rollout engine's decode step) cannot capture that one. cudarc's cross-stream
//! event tracking is switched off before anything is allocated: with a single stream it buys
//! nothing, and its per-use event records/waits would break capture (a captured wait on an event
//! recorded outside the capture invalidates it). The cuBLAS handle gets a workspace of its own
//! (`cublasSetWorkspace`), so a GEMM under capture never allocates.

use std::sync::{Arc, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, PinnedHostSlice,
    ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;
use half::bf16;

use super::{
    cuda_err, driver_availability,
    fused::FusedKernels,
    gemm::{GemmKernels, GemmTuner},
    kernels::Kernels,
    kernels_fatbin,
    rollout::RolloutKernels,
    train_kernels::TrainKernels,
};
use crate::{Error, Result};

/// Bytes of the cuBLAS workspace (the cuBLAS documentation recommends 32 MiB on Hopper).
pub const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Every kernel of `kernels/*.cu`, from the fatbin embedded by build.rs.
    module: Arc<CudaModule>,
    pub(super) kernels: Kernels,
    /// The rollout kernels (src/cuda/rollout.rs).
    pub(super) rollout: RolloutKernels,
    /// The training-step kernels (src/cuda/train_kernels.rs).
    pub(super) train: TrainKernels,
    /// The rollout forward's fused kernels (src/cuda/fused.rs).
    pub(super) fused: FusedKernels,
    /// The skinny decode GEMM (src/cuda/gemm.rs) and the per-shape choice against cuBLAS.
    pub(super) gemm_kernels: GemmKernels,
    pub(super) gemm: GemmTuner,
    /// The cuBLAS handle and its workspace (the handle is dropped first).
    blas: OnceLock<(CudaBlas, CudaSlice<u8>)>,
    name: String,
    compute_capability: (i32, i32),
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ctx.ordinal())
            .field("name", &self.name)
            .field("compute_capability", &self.compute_capability)
            .finish()
    }
}

impl CudaDevice {
    /// Opens device `ordinal`: creates (retains) its primary context and loads the embedded
    /// kernels. `Error::CudaUnavailable` when kernels were not compiled, there is no driver or
    /// no such device; `Error::Cuda` when the driver fails (e.g. the fatbin has no code for this
    /// GPU's architecture).
    pub fn new(ordinal: usize) -> Result<CudaDevice> {
        let fatbin = kernels_fatbin()
            .ok_or_else(|| Error::CudaUnavailable(super::built::KERNELS_MISSING_REASON.to_string()))?;
        let count = driver_availability().map_err(Error::CudaUnavailable)?;
        if ordinal >= count {
            return Err(Error::CudaUnavailable(format!(
                "CUDA device {ordinal} requested but the driver sees {count} device(s) (ordinals 0..{count})"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err(format_args!(
            "creating a context on CUDA device {ordinal}"
        )))?;
        let name = ctx.name().unwrap_or_else(|e| format!("<name unavailable: {e}>"));
        let compute_capability = ctx
            .compute_capability()
            .map_err(cuda_err("querying the compute capability"))?;
        // SAFETY: tracking is off before any buffer or stream of this context object exists, and
        // every buffer is only ever used on `stream` (module comment), so no cross-stream
        // synchronization is needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(cuda_err(format_args!(
            "creating a stream on CUDA device {ordinal}"
        )))?;
        let module = ctx.load_module(Ptx::from_binary(fatbin.to_vec())).map_err(|e| {
            Error::Cuda(format!(
                "loading the embedded kernels (sm_80, sm_90a cubins + compute_90 PTX) on device \
                 {ordinal} ({name}, compute capability {}.{}): {e}",
                compute_capability.0, compute_capability.1
            ))
        })?;
        let kernels = Kernels::load(&module)?;
        let rollout = RolloutKernels::load(&module)?;
        let train = TrainKernels::load(&module)?;
        let fused = FusedKernels::load(&module)?;
        let gemm_kernels = GemmKernels::load(&module)?;
        let gemm = GemmTuner::new(&ctx)?;
        Ok(CudaDevice {
            ctx,
            stream,
            module,
            kernels,
            rollout,
            train,
            fused,
            gemm_kernels,
            gemm,
            blas: OnceLock::new(),
            name,
            compute_capability,
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The GPU's name as the driver reports it, e.g. "NVIDIA H200".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// (major, minor), e.g. (9, 0) for H100/H200.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every launcher of this device enqueues on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The module of all embedded kernels (for launchers outside this module).
    pub fn module(&self) -> &Arc<CudaModule> {
        &self.module
    }

    /// A kernel of the embedded fatbin by its `extern "C"` name.
    pub fn function(&self, name: &str) -> Result<CudaFunction> {
        super::load_kernel(&self.module, name)
    }

    /// The cuBLAS handle bound to [`Self::stream`], created on first call with a workspace of
    /// [`CUBLAS_WORKSPACE_BYTES`] of its own. `CudaUnavailable` when libcublas cannot be loaded
    /// (on the GPU machine: LD_LIBRARY_PATH=/usr/local/cuda/lib64).
    pub fn blas(&self) -> Result<&CudaBlas> {
        if let Some((blas, _)) = self.blas.get() {
            return Ok(blas);
        }
        // SAFETY: only tries to dlopen libcublas; cudarc panics on first use if it is missing.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::CudaUnavailable(
                "libcublas could not be loaded (add the CUDA libraries, e.g. /usr/local/cuda/lib64, \
                 to LD_LIBRARY_PATH)"
                    .to_string(),
            ));
        }
        let blas = CudaBlas::new(self.stream.clone())
            .map_err(|e| Error::Cuda(format!("creating the cuBLAS handle: {e:?}")))?;
        // A workspace of our own, set AFTER the stream (cublasSetStream resets it to the
        // library's default pool). With it cuBLAS needs no allocation of its own inside a
        // stream capture (the cuBLAS docs' recommendation for CUDA graphs).
        let mut workspace = self.alloc_zeros::<u8>(CUBLAS_WORKSPACE_BYTES)?;
        {
            let (ptr, _w) = workspace.device_ptr_mut(&self.stream);
            // SAFETY: the handle is live, the buffer holds CUBLAS_WORKSPACE_BYTES bytes, is
            // 256-byte aligned (a fresh allocation) and lives as long as the handle (both sit in
            // `self.blas`, the handle dropped first).
            unsafe {
                cudarc::cublas::sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    ptr as *mut std::ffi::c_void,
                    CUBLAS_WORKSPACE_BYTES,
                )
            }
            .result()
            .map_err(|e| Error::Cuda(format!("setting the cuBLAS workspace: {e:?}")))?;
        }
        // A racing thread may have set it first; then ours is dropped.
        let _ = self.blas.set((blas, workspace));
        Ok(&self.blas.get().expect("set above").0)
    }

    /// Page-locked host memory of `len` zeros (asynchronous copies from and to it). Not
    /// write-combined: the host reads it back too.
    pub fn alloc_pinned<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<PinnedHostSlice<T>> {
        // SAFETY: flags 0 (plain page-locked memory); zeroed right below before any use.
        let mut p = unsafe { self.ctx.alloc_pinned_with_flags::<T>(len.max(1), 0) }.map_err(cuda_err(
            format_args!("allocating {len} elements of pinned host memory"),
        ))?;
        let host = p
            .as_mut_slice()
            .map_err(cuda_err("waiting for pinned host memory"))?;
        // SAFETY: T is ValidAsZeroBits, so all-zero bytes are a valid T.
        unsafe { std::ptr::write_bytes(host.as_mut_ptr(), 0, host.len()) };
        Ok(p)
    }

    /// Waits for all work queued on this device's stream; surfaces asynchronous kernel errors.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(cuda_err("synchronizing the stream"))
    }

    /// A device buffer of `len` zeros.
    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(len)
            .map_err(cuda_err(format_args!("allocating {len} elements")))
    }

    /// Copies a host slice into a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(host).map_err(cuda_err(format_args!(
            "copying {} elements to the device",
            host.len()
        )))
    }

    /// Copies a device buffer back to the host (waits for the work that writes it).
    pub fn download<T: DeviceRepr>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        let host = self.stream.clone_dtoh(dev).map_err(cuda_err(format_args!(
            "copying {} elements to the host",
            dev.len()
        )))?;
        self.synchronize()?;
        Ok(host)
    }

    /// f32 host values rounded to bf16 (nearest even), into a new device buffer.
    pub fn upload_bf16(&self, host: &[f32]) -> Result<CudaSlice<bf16>> {
        let v: Vec<bf16> = host.iter().map(|&x| bf16::from_f32(x)).collect();
        self.upload(&v)
    }

    /// A bf16 device buffer back to the host as f32 (exact).
    pub fn download_bf16(&self, dev: &CudaSlice<bf16>) -> Result<Vec<f32>> {
        Ok(self.download(dev)?.into_iter().map(bf16::to_f32).collect())
    }
}
