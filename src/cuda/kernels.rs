//! Kernel launchers: one typed method on [`CudaDevice`] per `extern "C"` kernel of
//! `kernels/*.cu`. Each checks shapes against the buffers, picks grid and block, and pushes the
//! arguments in the kernel's order; the kernel's own comment says what it computes.
//!
//! Buffers are anything cudarc can hand a device pointer for (`CudaSlice`, `CudaView`,
//! `CudaViewMut`), so arena views and owned buffers both work. Launches are asynchronous;
//! errors inside a kernel show up at the next synchronizing call.

use cudarc::driver::{CudaFunction, CudaModule, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::bf16;
use std::sync::Arc;

use super::train_kernels::{as_i32, check_len};
use super::{cuda_err, CudaDevice};
use crate::{Error, Result};

/// Every kernel, looked up once when the device is opened (a missing name fails early).
pub(super) struct Kernels {
    rmsnorm_fwd_bf16: CudaFunction,
    rmsnorm_fwd_f32: CudaFunction,
}

impl Kernels {
    pub(super) fn load(module: &Arc<CudaModule>) -> Result<Kernels> {
        let f = |name: &str| super::load_kernel(module, name);
        Ok(Kernels {
            rmsnorm_fwd_bf16: f("rmsnorm_fwd_bf16")?,
            rmsnorm_fwd_f32: f("rmsnorm_fwd_f32")?,
        })
    }
}

/// Rows (one warp each) per block of rmsnorm_fwd_* (kernels/rmsnorm.cu `RMS_FWD_WARPS`).
const RMS_FWD_WARPS: usize = 4;

impl CudaDevice {
    /// RMSNorm forward (HF LlamaRMSNorm): out = x · rsqrt(mean(x²) + eps) · weight, row-wise.
    /// x, out: bf16 (rows, dim); weight: bf16 (dim); f32 accumulation. See kernels/rmsnorm.cu.
    pub fn rmsnorm_fwd_bf16(
        &self,
        x: &impl DevicePtr<bf16>,
        weight: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        self.launch_rmsnorm_fwd(
            &self.kernels.rmsnorm_fwd_bf16,
            "rmsnorm_fwd_bf16",
            x,
            weight,
            out,
            rows,
            dim,
            eps,
        )
    }

    /// RMSNorm forward, f32 storage. x, out: f32 (rows, dim); weight: f32 (dim).
    pub fn rmsnorm_fwd_f32(
        &self,
        x: &impl DevicePtr<f32>,
        weight: &impl DevicePtr<f32>,
        out: &mut impl DevicePtrMut<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        self.launch_rmsnorm_fwd(
            &self.kernels.rmsnorm_fwd_f32,
            "rmsnorm_fwd_f32",
            x,
            weight,
            out,
            rows,
            dim,
            eps,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_rmsnorm_fwd<T>(
        &self,
        func: &CudaFunction,
        kernel: &str,
        x: &impl DevicePtr<T>,
        weight: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<T>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        if dim == 0 {
            return Err(Error::invalid(format!("{kernel}: dim must be > 0")));
        }
        let n = rows
            .checked_mul(dim)
            .ok_or_else(|| Error::invalid(format!("{kernel}: rows*dim overflows")))?;
        check_len("x", kernel, x.len(), n, "rows*dim")?;
        check_len("out", kernel, out.len(), n, "rows*dim")?;
        check_len("weight", kernel, weight.len(), dim, "dim")?;
        let (rows_i, dim_i) = (as_i32(kernel, "rows", rows)?, as_i32(kernel, "dim", dim)?);
        if rows == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(RMS_FWD_WARPS) as u32, 1, 1),
            block_dim: (32 * RMS_FWD_WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let stream = self.stream();
        let (x_ptr, _x_sync) = x.device_ptr(stream);
        let (w_ptr, _w_sync) = weight.device_ptr(stream);
        let (out_ptr, _out_sync) = out.device_ptr_mut(stream);
        let mut launch = stream.launch_builder(func);
        launch
            .arg(&out_ptr)
            .arg(&x_ptr)
            .arg(&w_ptr)
            .arg(&eps)
            .arg(&rows_i)
            .arg(&dim_i);
        // SAFETY: the arguments match the kernel's signature in kernels/rmsnorm.cu
        // (T* out, const T* x, const T* weight, float eps, int rows, int dim), with T the
        // element type of the buffers; their lengths were checked against rows and dim above,
        // and the grid has a warp for every row (one row per warp).
        unsafe { launch.launch(cfg) }.map_err(cuda_err(format_args!("launching {kernel}")))?;
        Ok(())
    }

    /// Test convenience: rounds host f32 `x` (rows, dim) and `weight` (dim) to bf16, runs
    /// [`Self::rmsnorm_fwd_bf16`], and returns the bf16 result as f32.
    pub fn rmsnorm_fwd_bf16_host(
        &self,
        x: &[f32],
        weight: &[f32],
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<Vec<f32>> {
        let x_dev = self.upload_bf16(x)?;
        let w_dev = self.upload_bf16(weight)?;
        let mut out = self.alloc_zeros::<bf16>(x.len())?;
        self.rmsnorm_fwd_bf16(&x_dev, &w_dev, &mut out, rows, dim, eps)?;
        self.download_bf16(&out)
    }

    /// Test convenience: [`Self::rmsnorm_fwd_f32`] on host slices.
    pub fn rmsnorm_fwd_f32_host(
        &self,
        x: &[f32],
        weight: &[f32],
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<Vec<f32>> {
        let x_dev = self.upload(x)?;
        let w_dev = self.upload(weight)?;
        let mut out = self.alloc_zeros::<f32>(x.len())?;
        self.rmsnorm_fwd_f32(&x_dev, &w_dev, &mut out, rows, dim, eps)?;
        self.download(&out)
    }
}
