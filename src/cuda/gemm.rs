//! The decode step's GEMMs: kernels/gemm.cu's skinny tensor-core GEMM (M ≤ 64 rows) next to
//! cuBLAS, and the per-shape choice between them.
//!
//! It owns which kernel multiplies a (rows, d_in) activation by a (d_out, d_in) weight in the
//! rollout engine ([`gemm`], called by engine.rs's `gemm_checked`): cuBLAS for more than
//! [`SKINNY_MAX_ROWS`] rows, for shapes the skinny kernel does not take, and when
//! `RFT_SKINNY_GEMM=0`; otherwise the faster of cuBLAS and the skinny kernel (with and without
//! split-K) for that exact (rows, d_in, d_out, output type), timed once per device the first
//! time the shape runs outside a CUDA-graph capture ([`GemmTuner`]). The decode step's first,
//! eager run of a bucket therefore tunes its shapes, and the graph captured at the bucket's
//! second step replays the choice. Each choice and its timings are kept
//! ([`CudaDevice::gemm_tuning`]; `rft bench rollout --json` prints them).
//!
//! Once the down projection's shape has chosen the skinny kernel, the engine runs SwiGLU and
//! the down GEMM as one launch of its SwiGLU variant (act computed inside the GEMM; bit-identical
//! to the two launches, so a bucket's eager first step and its graph agree).
//!
//! The skinny kernel's result for a row does not depend on the other rows (see the kernel's
//! comment), so with it decode steps are batch-invariant for a fixed split count; which kernel
//! wins may differ between buckets, so across buckets the engine keeps its documented caveat
//! (bf16-rounding differences, a different token only at a near-tie).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use cudarc::cublas::sys::cudaDataType;
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags, CUstreamCaptureStatus};
use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, DevicePtr, PushKernelArg};
use std::sync::Arc;

use super::train_kernels::{as_i32, cfg};
use super::{cuda_err, CudaDevice};
use crate::{Error, Result};

/// Most rows the skinny kernel takes (4 tiles of 16).
pub const SKINNY_MAX_ROWS: usize = 64;
/// Output columns per block (SK_NB) and k per pipeline stage (SK_KC) in kernels/gemm.cu.
const SK_NB: usize = 64;
const SK_KC: usize = 64;
const SK_THREADS: u32 = 128;
/// kernels/gemm.cu's SK_SMEM(mt): 4 stages × (64 + 16·mt rows) × 72 bf16.
pub const fn skinny_smem_bytes(mt: usize) -> usize {
    4 * (SK_NB + 16 * mt) * (SK_KC + 8) * 2
}
/// kernels/gemm.cu's SK_SMEM_SWIGLU(mt): also 16·mt up rows per stage.
pub const fn skinny_swiglu_smem_bytes(mt: usize) -> usize {
    4 * (SK_NB + 32 * mt) * (SK_KC + 8) * 2
}
/// f32 elements of the split-K partial sums (8 MiB): S·rows·d_out must fit, which bounds S.
pub const SKINNY_PARTIAL_LEN: usize = 1 << 21;
/// Column tiles a split-K launch may have (one counter each).
const SKINNY_MAX_TILES: usize = 4096;
/// Most k-splits the split rule gives (the tuner also tries twice that): the last block of a
/// tile adds the S partial tiles alone.
const SKINNY_MAX_SPLITS: usize = 8;

/// Every kernel name of kernels/gemm.cu (for the fatbin-content test).
pub const GEMM_KERNEL_NAMES: &[&str] = &[
    "skinny_gemm_m16_bf16",
    "skinny_gemm_m32_bf16",
    "skinny_gemm_m48_bf16",
    "skinny_gemm_m64_bf16",
    "skinny_gemm_m16_f32",
    "skinny_gemm_m32_f32",
    "skinny_gemm_m48_f32",
    "skinny_gemm_m64_f32",
    "skinny_gemm_swiglu_m16_bf16",
    "skinny_gemm_swiglu_m32_bf16",
    "skinny_gemm_swiglu_m48_bf16",
    "skinny_gemm_swiglu_m64_bf16",
    "gemm_tune_spin",
];

/// Which kernels the decode GEMMs may use (`RFT_SKINNY_GEMM`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmPolicy {
    /// cuBLAS or the skinny kernel, whichever the tuner timed faster for the shape (default).
    Auto,
    /// cuBLAS always (`RFT_SKINNY_GEMM=0`).
    Cublas,
    /// The skinny kernel whenever it takes the shape, with [`skinny_splits`] (`RFT_SKINNY_GEMM=1`).
    Skinny,
}

impl GemmPolicy {
    /// `RFT_SKINNY_GEMM`: unset or `auto` → Auto, `0`/`off`/`cublas` → Cublas, `1`/`on` → Skinny.
    pub fn from_env() -> Result<GemmPolicy> {
        match std::env::var("RFT_SKINNY_GEMM") {
            Err(_) => Ok(GemmPolicy::Auto),
            Ok(v) => match v.trim() {
                "" | "auto" => Ok(GemmPolicy::Auto),
                "0" | "off" | "cublas" => Ok(GemmPolicy::Cublas),
                "1" | "on" => Ok(GemmPolicy::Skinny),
                other => Err(Error::invalid(format!(
                    "RFT_SKINNY_GEMM={other:?}: expected auto (time cuBLAS against the skinny \
                     decode GEMM per shape), 0 (cuBLAS only) or 1 (the skinny GEMM wherever it applies)"
                ))),
            },
        }
    }
}

/// What runs one GEMM shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GemmChoice {
    Cublas,
    /// kernels/gemm.cu with this many k-splits.
    Skinny {
        splits: usize,
    },
}

/// One tuned shape: what each candidate took per launch (µs, back to back on the stream) and
/// what was chosen.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GemmTuneRecord {
    pub rows: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub f32_out: bool,
    pub timings_us: Vec<(GemmChoice, f64)>,
    pub choice: GemmChoice,
}

impl GemmTuneRecord {
    /// One JSON object (for logs and test messages).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("<{e}>"))
    }
}

type GemmKey = (usize, usize, usize, bool);

/// The device's GEMM choices: the policy, the per-shape table filled by timing, and the skinny
/// kernel's split-K scratch (allocated on the first split-K launch, before any capture that
/// could use it, and never re-allocated: graphs hold its address).
pub(super) struct GemmTuner {
    policy: Mutex<GemmPolicy>,
    table: Mutex<HashMap<GemmKey, GemmChoice>>,
    records: Mutex<Vec<GemmTuneRecord>>,
    scratch: OnceLock<(CudaSlice<f32>, CudaSlice<u32>)>,
    sms: usize,
}

/// The kernels of kernels/gemm.cu, looked up (and allowed their shared memory) at device open.
pub(super) struct GemmKernels {
    /// [mt − 1] for mt = rows / 16 rounded up, bf16 and f32 output.
    bf16_out: [CudaFunction; 4],
    f32_out: [CudaFunction; 4],
    /// The SwiGLU-input variant (bf16 output).
    swiglu: [CudaFunction; 4],
    spin: CudaFunction,
}

impl GemmKernels {
    pub(super) fn load(module: &Arc<CudaModule>) -> Result<GemmKernels> {
        let f = |name: String, smem: usize| -> Result<CudaFunction> {
            let func = super::load_kernel(module, &name)?;
            super::allow_smem(&func, &name, smem)?;
            Ok(func)
        };
        // name(rows) → the four row-tile variants (16, 32, 48, 64 rows), smem(mt) each.
        let set = |name: &dyn Fn(usize) -> String, smem: fn(usize) -> usize| -> Result<[CudaFunction; 4]> {
            Ok([
                f(name(16), smem(1))?,
                f(name(32), smem(2))?,
                f(name(48), smem(3))?,
                f(name(64), smem(4))?,
            ])
        };
        Ok(GemmKernels {
            bf16_out: set(&|m| format!("skinny_gemm_m{m}_bf16"), skinny_smem_bytes)?,
            f32_out: set(&|m| format!("skinny_gemm_m{m}_f32"), skinny_smem_bytes)?,
            swiglu: set(
                &|m| format!("skinny_gemm_swiglu_m{m}_bf16"),
                skinny_swiglu_smem_bytes,
            )?,
            spin: f("gemm_tune_spin".to_string(), 0)?,
        })
    }
}

impl GemmTuner {
    pub(super) fn new(ctx: &Arc<cudarc::driver::CudaContext>) -> Result<GemmTuner> {
        let sms = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(cuda_err("querying the multiprocessor count"))?;
        Ok(GemmTuner {
            policy: Mutex::new(GemmPolicy::from_env()?),
            table: Mutex::new(HashMap::new()),
            records: Mutex::new(Vec::new()),
            scratch: OnceLock::new(),
            sms: sms.max(1) as usize,
        })
    }
}

/// Whether the skinny kernel takes this shape: 1..=64 rows, d_in a multiple of 8 (16-byte rows),
/// d_out ≥ 1, the column tiles countable.
pub fn skinny_applies(rows: usize, d_in: usize, d_out: usize) -> bool {
    (1..=SKINNY_MAX_ROWS).contains(&rows)
        && d_in > 0
        && d_in.is_multiple_of(8)
        && d_out > 0
        && d_out.div_ceil(SK_NB) <= SKINNY_MAX_TILES
        && i32::try_from(d_in.max(d_out)).is_ok()
}

/// [`skinny_applies`] and every operand pointer 16-byte aligned (the kernel's cp.async copies).
fn skinny_takes(rows: usize, d_in: usize, d_out: usize, ptrs: &[u64]) -> bool {
    skinny_applies(rows, d_in, d_out) && ptrs.iter().all(|p| p.is_multiple_of(16))
}

/// The k-split count for (d_in, d_out) on a GPU with `sms` multiprocessors: enough blocks for
/// about two per multiprocessor, at least 2 k-chunks of 64 per split, at most
/// `SKINNY_MAX_SPLITS`, and the partials of 64 rows within [`SKINNY_PARTIAL_LEN`]; then
/// trimmed so that no split is empty. Depends on neither the row count nor the data.
pub fn skinny_splits(d_in: usize, d_out: usize, sms: usize) -> usize {
    let tiles = d_out.div_ceil(SK_NB);
    let chunks = d_in.div_ceil(SK_KC);
    let want = (2 * sms).div_ceil(tiles);
    let cap = (chunks / 2)
        .min(SKINNY_MAX_SPLITS)
        .min(SKINNY_PARTIAL_LEN / (SKINNY_MAX_ROWS * d_out).max(1));
    trim_splits(chunks, want.min(cap))
}

/// `splits` (at least 1) lowered so that none of them is empty when `chunks` k-chunks are dealt
/// out ceil(chunks / splits) to a split: the count the kernel's grid really has.
fn trim_splits(chunks: usize, splits: usize) -> usize {
    chunks.div_ceil(chunks.div_ceil(splits.max(1)))
}

impl CudaDevice {
    /// The decode-GEMM policy of this device (from `RFT_SKINNY_GEMM` at open).
    pub fn gemm_policy(&self) -> GemmPolicy {
        *self.gemm.policy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the policy and forgets the shapes tuned so far (tests compare the kernels this way;
    /// an engine's decode graphs captured earlier keep the kernels they were captured with).
    pub fn set_gemm_policy(&self, policy: GemmPolicy) {
        *self.gemm.policy.lock().unwrap_or_else(|e| e.into_inner()) = policy;
        self.gemm.table.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Every shape tuned on this device so far, in order.
    pub fn gemm_tuning(&self) -> Vec<GemmTuneRecord> {
        self.gemm
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Multiprocessors of this GPU.
    pub fn multiprocessors(&self) -> usize {
        self.gemm.sms
    }

    fn skinny_scratch(&self) -> Result<&(CudaSlice<f32>, CudaSlice<u32>)> {
        if let Some(s) = self.gemm.scratch.get() {
            return Ok(s);
        }
        let s = (
            self.alloc_zeros::<f32>(SKINNY_PARTIAL_LEN)?,
            self.alloc_zeros::<u32>(SKINNY_MAX_TILES)?,
        );
        let _ = self.gemm.scratch.set(s);
        Ok(self.gemm.scratch.get().expect("set above"))
    }

    /// y (rows, d_out) = x (rows, d_in) · wᵀ by kernels/gemm.cu with `splits` k-splits; raw
    /// device pointers of buffers holding rows·d_in, d_out·d_in and rows·d_out elements (the
    /// caller checked the lengths), y bf16 or f32 (`f32_out`). x and w must be 16-byte aligned.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn skinny_gemm_raw(
        &self,
        x: u64,
        w: u64,
        y: u64,
        f32_out: bool,
        rows: usize,
        d_in: usize,
        d_out: usize,
        splits: usize,
    ) -> Result<()> {
        let mt = rows.div_ceil(16).clamp(1, 4);
        let k = &self.gemm_kernels;
        let func = if f32_out {
            &k.f32_out[mt - 1]
        } else {
            &k.bf16_out[mt - 1]
        };
        self.skinny_launch(
            func,
            skinny_smem_bytes(mt),
            x,
            w,
            y,
            None,
            rows,
            d_in,
            d_out,
            splits,
        )
    }

    /// y (rows, d_out) bf16 = act · wᵀ with act = silu(gate) · up (rows, inter) computed inside
    /// the GEMM from gate_up (rows, 2·inter) bf16, bit-identical to swiglu_fused_fwd_bf16 then
    /// [`Self::skinny_gemm_raw`] with the same splits; `act_out` (rows·inter bf16, 16-byte
    /// aligned) also receives act when given. Raw pointers, lengths checked by the caller.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn skinny_gemm_swiglu_raw(
        &self,
        gate_up: u64,
        w: u64,
        y: u64,
        act_out: Option<u64>,
        rows: usize,
        inter: usize,
        d_out: usize,
        splits: usize,
    ) -> Result<()> {
        let mt = rows.div_ceil(16).clamp(1, 4);
        let func = &self.gemm_kernels.swiglu[mt - 1];
        let act = Some(act_out.unwrap_or(0));
        self.skinny_launch(
            func,
            skinny_swiglu_smem_bytes(mt),
            gate_up,
            w,
            y,
            act,
            rows,
            inter,
            d_out,
            splits,
        )
    }

    /// One launch of a kernels/gemm.cu kernel; `act` is Some (the act_out pointer, 0 = none)
    /// for the SwiGLU variant, whose x rows are 2·d_in wide.
    #[allow(clippy::too_many_arguments)]
    fn skinny_launch(
        &self,
        func: &CudaFunction,
        smem: usize,
        x: u64,
        w: u64,
        y: u64,
        act: Option<u64>,
        rows: usize,
        d_in: usize,
        d_out: usize,
        splits: usize,
    ) -> Result<()> {
        let kn = if act.is_some() {
            "skinny_gemm_swiglu"
        } else {
            "skinny_gemm"
        };
        if !skinny_takes(rows, d_in, d_out, &[x, w, act.unwrap_or(0)]) {
            return Err(Error::invalid(format!(
                "{kn}: {rows}×{d_in} · ({d_out}×{d_in})ᵀ is not a shape it takes (1–64 rows, \
                 in a multiple of 8, 16-byte aligned operands)"
            )));
        }
        let chunks = d_in.div_ceil(SK_KC);
        let splits = trim_splits(chunks, splits);
        let cps = chunks.div_ceil(splits);
        if splits > 1 && splits * rows * d_out > SKINNY_PARTIAL_LEN {
            return Err(Error::invalid(format!(
                "{kn}: {splits} splits of {rows}×{d_out} partial sums exceed the scratch of \
                 {SKINNY_PARTIAL_LEN} floats"
            )));
        }
        let (partial, counters) = if splits > 1 {
            let (p, c) = self.skinny_scratch()?;
            let s = self.stream();
            (p.device_ptr(s).0, c.device_ptr(s).0)
        } else {
            (0u64, 0u64)
        };
        let (m_i, n_i, k_i, c_i) = (
            as_i32(kn, "rows", rows)?,
            as_i32(kn, "out", d_out)?,
            as_i32(kn, "in", d_in)?,
            as_i32(kn, "cps", cps)?,
        );
        let grid = (d_out.div_ceil(SK_NB) as u32, splits as u32, 1);
        let mut l = self.stream().launch_builder(func);
        l.arg(&y)
            .arg(&x)
            .arg(&w)
            .arg(&partial)
            .arg(&counters)
            .arg(&m_i)
            .arg(&n_i)
            .arg(&k_i)
            .arg(&c_i);
        if let Some(a) = &act {
            l.arg(a);
        }
        // SAFETY: (OutT* y, const bf16* x, const bf16* w, float* partial, unsigned* counters,
        // int M, int N, int K, int cps[, bf16* act_out]): pointers of live device buffers of the
        // stated lengths (caller; x rows 2·K wide for the SwiGLU variant), 16-byte aligned x, w
        // and act_out, K % 8 == 0; with splits > 1 the scratch holds splits·M·N floats and
        // ≥ ceil(N/64) counters that are zero between launches (the kernel resets them); every
        // split has ≥ 1 chunk (splits recomputed from cps above); shared memory allowed at load
        // (GemmKernels::load).
        unsafe { l.launch(cfg(grid, SK_THREADS, smem as u32)) }.map_err(cuda_err(kn))?;
        Ok(())
    }

    /// The kernel chosen for a decode GEMM shape so far (None: not yet decided, or cuBLAS-only).
    pub(super) fn gemm_choice(
        &self,
        rows: usize,
        d_in: usize,
        d_out: usize,
        f32_out: bool,
    ) -> Option<GemmChoice> {
        let t = self.gemm.table.lock().unwrap_or_else(|e| e.into_inner());
        t.get(&(rows, d_in, d_out, f32_out)).copied()
    }
}

/// y (rows, d_out) = x (rows, d_in) · wᵀ in the rollout engine: cuBLAS or the skinny kernel by
/// the device's policy and tuning table (module comment). Raw pointers as [`super::engine`]'s
/// `gemm_raw` takes them; y_type bf16 or f32.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
    dev: &CudaDevice,
    blas: &CudaBlas,
    x: u64,
    w: u64,
    y: u64,
    y_type: cudaDataType,
    rows: usize,
    d_in: usize,
    d_out: usize,
) -> Result<()> {
    let f32_out = matches!(y_type, cudaDataType::CUDA_R_32F);
    let run = |c| run_choice(dev, Some(blas), c, x, w, y, f32_out, rows, d_in, d_out);
    let policy = dev.gemm_policy();
    if policy == GemmPolicy::Cublas || !skinny_takes(rows, d_in, d_out, &[x, w]) {
        return run(GemmChoice::Cublas);
    }
    let choice = match dev.gemm_choice(rows, d_in, d_out, f32_out) {
        Some(c) => c,
        None => {
            let capturing = dev
                .stream()
                .capture_status()
                .map_err(cuda_err("querying the stream's capture status"))?
                != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
            if capturing {
                // Nothing can be timed (or allocated) inside a capture; the eager step that
                // precedes every capture has tuned the engine's shapes, so this is a stray one.
                return run(GemmChoice::Cublas);
            }
            let auto = skinny_splits(d_in, d_out, dev.gemm.sms);
            let choice = if policy == GemmPolicy::Skinny {
                GemmChoice::Skinny { splits: auto }
            } else {
                tune(dev, blas, x, w, y, f32_out, rows, d_in, d_out, auto)?
            };
            dev.gemm
                .table
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert((rows, d_in, d_out, f32_out), choice);
            choice
        }
    };
    run(choice)
}

/// Runs y = x · wᵀ by exactly `choice` (raw pointers, lengths checked by the caller). `blas`
/// None: the device's handle, fetched (created on first use) only if cuBLAS runs.
#[allow(clippy::too_many_arguments)]
fn run_choice(
    dev: &CudaDevice,
    blas: Option<&CudaBlas>,
    choice: GemmChoice,
    x: u64,
    w: u64,
    y: u64,
    f32_out: bool,
    rows: usize,
    d_in: usize,
    d_out: usize,
) -> Result<()> {
    match choice {
        GemmChoice::Cublas => {
            let y_type = if f32_out {
                cudaDataType::CUDA_R_32F
            } else {
                cudaDataType::CUDA_R_16BF
            };
            let blas = match blas {
                Some(b) => b,
                None => dev.blas()?,
            };
            super::engine::gemm_raw(dev, blas, x, w, y, y_type, rows, d_in, d_out, 0.0)
        }
        GemmChoice::Skinny { splits } => dev.skinny_gemm_raw(x, w, y, f32_out, rows, d_in, d_out, splits),
    }
}

/// Launches per candidate in a timing.
const TUNE_REPS: usize = 16;
/// SM clock cycles the spin kernel holds the stream (~1 ms at 2 GHz): more than the host needs
/// to queue every timed launch, so the events time the GPU alone.
const TUNE_SPIN_CYCLES: i64 = 2_000_000;

/// Times cuBLAS and the skinny kernel (1, auto/2, auto and 2·auto splits) on this exact shape and
/// operands (y is overwritten; the caller's launch then writes it for real), records the result
/// and returns the fastest.
#[allow(clippy::too_many_arguments)]
fn tune(
    dev: &CudaDevice,
    blas: &CudaBlas,
    x: u64,
    w: u64,
    y: u64,
    f32_out: bool,
    rows: usize,
    d_in: usize,
    d_out: usize,
    auto: usize,
) -> Result<GemmChoice> {
    // cuBLAS; the skinny kernel without split-K, with half, all and twice the rule's splits
    // (at most 16, ≥ 2 k-chunks each, partials within the scratch), each trimmed so that no
    // split is empty.
    let chunks = d_in.div_ceil(SK_KC);
    let cap = (chunks / 2)
        .min(2 * SKINNY_MAX_SPLITS)
        .min(SKINNY_PARTIAL_LEN / (rows * d_out).max(1))
        .max(1);
    let mut candidates = vec![GemmChoice::Cublas];
    for s in [1, auto / 2, auto, 2 * auto] {
        let s = trim_splits(chunks, s.clamp(1, cap));
        if !candidates.contains(&GemmChoice::Skinny { splits: s }) {
            candidates.push(GemmChoice::Skinny { splits: s });
        }
    }
    let run = |c| run_choice(dev, Some(blas), c, x, w, y, f32_out, rows, d_in, d_out);
    for &c in &candidates {
        run(c)?; // warm: loads the kernel, lets cuBLAS choose, allocates the split-K scratch
    }
    let s = dev.stream();
    let ctx = dev.context();
    let ev = || {
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda_err("creating a timing event"))
    };
    let mut timings = Vec::with_capacity(candidates.len());
    for &c in &candidates {
        let (start, end) = (ev()?, ev()?);
        let mut l = s.launch_builder(&dev.gemm_kernels.spin);
        l.arg(&TUNE_SPIN_CYCLES);
        // SAFETY: gemm_tune_spin(long long cycles) reads and writes nothing.
        unsafe { l.launch(cfg((1, 1, 1), 32, 0)) }.map_err(cuda_err("gemm_tune_spin"))?;
        start.record(s).map_err(cuda_err("recording a timing event"))?;
        for _ in 0..TUNE_REPS {
            run(c)?;
        }
        end.record(s).map_err(cuda_err("recording a timing event"))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(cuda_err("reading a timing event"))?;
        timings.push((c, ms as f64 * 1e3 / TUNE_REPS as f64));
    }
    let choice = timings
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|t| t.0)
        .unwrap_or(GemmChoice::Cublas);
    let rec = GemmTuneRecord {
        rows,
        d_in,
        d_out,
        f32_out,
        timings_us: timings,
        choice,
    };
    if super::engine::debug_enabled() {
        eprintln!("rft: gemm tuning {}", rec.to_json());
    }
    dev.gemm
        .records
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(rec);
    Ok(choice)
}

/// Each (buffer, elements it has, elements the shape needs) must match exactly.
fn exact_lens(kn: &str, parts: &[(&str, usize, usize)]) -> Result<()> {
    for &(part, found, need) in parts {
        if found != need {
            return Err(Error::invalid(format!(
                "{kn}: {part} has {found} elements, expected {need}"
            )));
        }
    }
    Ok(())
}

/// An output element type of the decode GEMMs: bf16 (projections) or f32 (logits).
pub trait GemmOut: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy {
    const F32: bool;
    fn to_f32(self) -> f32;
}
impl GemmOut for half::bf16 {
    const F32: bool = false;
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}
impl GemmOut for f32 {
    const F32: bool = true;
    fn to_f32(self) -> f32 {
        self
    }
}

impl CudaDevice {
    /// y (rows, d_out) = x (rows, d_in) · wᵀ (w (d_out, d_in)) by exactly `choice` (tests and
    /// benches compare the kernels this way; the engine lets the tuner choose). Lengths checked.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_with<Y: GemmOut>(
        &self,
        choice: GemmChoice,
        x: &CudaSlice<half::bf16>,
        w: &CudaSlice<half::bf16>,
        y: &mut CudaSlice<Y>,
        rows: usize,
        d_in: usize,
        d_out: usize,
    ) -> Result<()> {
        exact_lens(
            "gemm_with",
            &[
                ("x", x.len(), rows * d_in),
                ("w", w.len(), d_out * d_in),
                ("y", y.len(), rows * d_out),
            ],
        )?;
        let s = self.stream();
        let (xp, _x) = x.device_ptr(s);
        let (wp, _w) = w.device_ptr(s);
        let (yp, _y) = cudarc::driver::DevicePtrMut::device_ptr_mut(y, s);
        run_choice(self, None, choice, xp, wp, yp, Y::F32, rows, d_in, d_out)
    }

    /// [`Self::gemm_with`] on host data: x and w rounded to bf16, y back as f32 (exact).
    pub fn gemm_host<Y: GemmOut>(
        &self,
        choice: GemmChoice,
        x: &[f32],
        w: &[f32],
        rows: usize,
        d_in: usize,
        d_out: usize,
    ) -> Result<Vec<f32>> {
        let (xd, wd) = (self.upload_bf16(x)?, self.upload_bf16(w)?);
        let mut y = self.alloc_zeros::<Y>(rows * d_out)?;
        self.gemm_with(choice, &xd, &wd, &mut y, rows, d_in, d_out)?;
        Ok(self.download(&y)?.into_iter().map(Y::to_f32).collect())
    }

    /// y (rows, d_out) bf16 = (silu(gate) · up) · wᵀ from gate_up (rows, 2·inter) by the skinny
    /// kernel's SwiGLU variant with `splits` k-splits, act (rows, inter) also written when given
    /// (tests and benches; the engine uses it once the down projection's shape chose the skinny
    /// kernel). Lengths checked.
    #[allow(clippy::too_many_arguments)]
    pub fn skinny_swiglu_gemm(
        &self,
        splits: usize,
        gate_up: &CudaSlice<half::bf16>,
        w: &CudaSlice<half::bf16>,
        y: &mut CudaSlice<half::bf16>,
        act: Option<&mut CudaSlice<half::bf16>>,
        rows: usize,
        inter: usize,
        d_out: usize,
    ) -> Result<()> {
        exact_lens(
            "skinny_swiglu_gemm",
            &[
                ("gate_up", gate_up.len(), rows * 2 * inter),
                ("w", w.len(), d_out * inter),
                ("y", y.len(), rows * d_out),
                (
                    "act",
                    act.as_ref().map_or(rows * inter, |a| a.len()),
                    rows * inter,
                ),
            ],
        )?;
        let s = self.stream();
        let (gp, _g) = gate_up.device_ptr(s);
        let (wp, _w) = w.device_ptr(s);
        let (yp, _y) = cudarc::driver::DevicePtrMut::device_ptr_mut(y, s);
        let act = act.map(|a| cudarc::driver::DevicePtrMut::device_ptr_mut(a, s));
        let ap = act.as_ref().map(|a| a.0);
        self.skinny_gemm_swiglu_raw(gp, wp, yp, ap, rows, inter, d_out, splits)
    }

    /// The shapes this device has decided so far (policy and tuning), in no particular order.
    pub fn gemm_choices(&self) -> Vec<((usize, usize, usize, bool), GemmChoice)> {
        let t = self.gemm.table.lock().unwrap_or_else(|e| e.into_inner());
        t.iter().map(|(k, v)| (*k, *v)).collect()
    }
}
