//! Plain f32 reference ops, forward and backward, over row-major slices.
//!
//! These are the oracles for the CUDA kernels: each is written to be obviously right, with
//! the shapes in comments. GEMMs go through `matrixmultiply` (threaded); everything else is
//! a readable loop.

/// C[m, n] (+)= alpha · A[m, k] · B[k, n] with explicit strides (row stride, column stride).
/// `beta` = 0 overwrites C, 1 accumulates.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_strided(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    rsa: isize,
    csa: isize,
    b: &[f32],
    rsb: isize,
    csb: isize,
    beta: f32,
    c: &mut [f32],
    rsc: isize,
    csc: isize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if beta == 0.0 {
            c.iter_mut().for_each(|v| *v = 0.0);
        }
        return;
    }
    // Bounds are checked here once; matrixmultiply trusts the strides.
    let last =
        |rows: usize, cols: usize, rs: isize, cs: isize| (rows as isize - 1) * rs + (cols as isize - 1) * cs;
    assert!(last(m, k, rsa, csa) < a.len() as isize, "sgemm: A too small");
    assert!(last(k, n, rsb, csb) < b.len() as isize, "sgemm: B too small");
    assert!(last(m, n, rsc, csc) < c.len() as isize, "sgemm: C too small");
    // SAFETY: the asserts above keep every index inside the slices (strides are non-negative).
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa,
            csa,
            b.as_ptr(),
            rsb,
            csb,
            beta,
            c.as_mut_ptr(),
            rsc,
            csc,
        );
    }
}

/// y[n, out] = x[n, in] · W[out, in]ᵀ (a PyTorch `Linear` without bias).
pub fn matmul_wt(x: &[f32], w: &[f32], n: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    let mut y = vec![0.0; n * d_out];
    matmul_wt_acc(x, w, n, d_in, d_out, 1.0, 0.0, &mut y);
    y
}

/// y[n, out] = beta·y + alpha · x[n, in] · W[out, in]ᵀ.
#[allow(clippy::too_many_arguments)]
pub fn matmul_wt_acc(
    x: &[f32],
    w: &[f32],
    n: usize,
    d_in: usize,
    d_out: usize,
    alpha: f32,
    beta: f32,
    y: &mut [f32],
) {
    debug_assert_eq!(x.len(), n * d_in);
    debug_assert_eq!(w.len(), d_out * d_in);
    sgemm_strided(
        n,
        d_in,
        d_out,
        alpha,
        x,
        d_in as isize,
        1,
        w,
        1,
        d_in as isize,
        beta,
        y,
        d_out as isize,
        1,
    );
}

/// y[n, out] = beta·y + alpha · x[n, in] · W[in, out] (plain row-major product).
#[allow(clippy::too_many_arguments)]
pub fn matmul_acc(
    x: &[f32],
    w: &[f32],
    n: usize,
    d_in: usize,
    d_out: usize,
    alpha: f32,
    beta: f32,
    y: &mut [f32],
) {
    sgemm_strided(
        n,
        d_in,
        d_out,
        alpha,
        x,
        d_in as isize,
        1,
        w,
        d_out as isize,
        1,
        beta,
        y,
        d_out as isize,
        1,
    );
}

/// dW[out, in] = beta·dW + alpha · dy[n, out]ᵀ · x[n, in] (weight gradient of `matmul_wt`).
#[allow(clippy::too_many_arguments)]
pub fn matmul_tn_acc(
    dy: &[f32],
    x: &[f32],
    n: usize,
    d_out: usize,
    d_in: usize,
    alpha: f32,
    beta: f32,
    dw: &mut [f32],
) {
    sgemm_strided(
        d_out,
        n,
        d_in,
        alpha,
        dy,
        1,
        d_out as isize,
        x,
        d_in as isize,
        1,
        beta,
        dw,
        d_in as isize,
        1,
    );
}

/// RMSNorm forward, HF style: y = x / sqrt(mean(x²) + eps) · weight, row by row.
/// x: [rows, dim], weight: \[dim\] → y: [rows, dim].
pub fn rmsnorm_fwd(x: &[f32], weight: &[f32], eps: f32, dim: usize) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    for (xr, yr) in x.chunks_exact(dim).zip(y.chunks_exact_mut(dim)) {
        let inv = rms_inv(xr, eps);
        for ((yv, &xv), &wv) in yr.iter_mut().zip(xr).zip(weight) {
            *yv = xv * inv * wv;
        }
    }
    y
}

/// 1 / sqrt(mean(x²) + eps) of one row.
pub fn rms_inv(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// RMSNorm backward. x, dy: [rows, dim]. Returns dx and accumulates dweight\[dim\] (if given).
/// With r = rsqrt(mean(x²)+eps), y_i = w_i x_i r:
///   dx_i = r (w_i dy_i) − r³/dim · x_i · Σ_j (w_j dy_j x_j);   dw_i += dy_i x_i r.
pub fn rmsnorm_bwd(
    x: &[f32],
    weight: &[f32],
    dy: &[f32],
    eps: f32,
    dim: usize,
    mut dweight: Option<&mut [f32]>,
) -> Vec<f32> {
    let mut dx = vec![0.0; x.len()];
    for ((xr, dyr), dxr) in x
        .chunks_exact(dim)
        .zip(dy.chunks_exact(dim))
        .zip(dx.chunks_exact_mut(dim))
    {
        let r = rms_inv(xr, eps);
        let dot: f32 = xr.iter().zip(dyr).zip(weight).map(|((x, g), w)| x * g * w).sum();
        let c = r * r * r / dim as f32 * dot;
        for i in 0..dim {
            dxr[i] = r * weight[i] * dyr[i] - c * xr[i];
        }
        if let Some(dw) = dweight.as_deref_mut() {
            for i in 0..dim {
                dw[i] += dyr[i] * xr[i] * r;
            }
        }
    }
    dx
}

/// SiLU(g) · u, elementwise (SwiGLU). gate, up: \[n\] → \[n\].
pub fn swiglu_fwd(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter().zip(up).map(|(&g, &u)| silu(g) * u).collect()
}

/// Backward of SwiGLU: returns (dgate, dup).
/// d/dg [g σ(g)] = σ(g) (1 + g (1 − σ(g))).
pub fn swiglu_bwd(gate: &[f32], up: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0.0; gate.len()];
    let mut du = vec![0.0; gate.len()];
    for i in 0..gate.len() {
        let s = sigmoid(gate[i]);
        du[i] = dy[i] * gate[i] * s;
        dg[i] = dy[i] * up[i] * s * (1.0 + gate[i] * (1.0 - s));
    }
    (dg, du)
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// Numerically stable log-sum-exp of a row.
pub fn logsumexp(x: &[f32]) -> f32 {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return m;
    }
    let s: f32 = x.iter().map(|v| (v - m).exp()).sum();
    m + s.ln()
}

/// In-place softmax of a row.
pub fn softmax_inplace(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0.0;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    for v in x.iter_mut() {
        *v /= s;
    }
}

/// RoPE (HF "rotate_half" layout) applied in place to `n_heads` heads of one token.
/// x: [n_heads, hd]; angle_i = pos · inv_freq\[i\] (f32, as transformers computes it);
/// (x_i, x_{i+hd/2}) ← (x_i cos − x_{i+hd/2} sin, x_{i+hd/2} cos + x_i sin).
/// `inverse` rotates by −angle: the backward of RoPE (a rotation's transpose).
pub fn rope_inplace(x: &mut [f32], pos: usize, inv_freq: &[f32], hd: usize, inverse: bool) {
    let half = hd / 2;
    debug_assert_eq!(inv_freq.len(), half);
    for head in x.chunks_exact_mut(hd) {
        for i in 0..half {
            let angle = pos as f32 * inv_freq[i];
            let (s, c) = angle.sin_cos();
            let s = if inverse { -s } else { s };
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * c - b * s;
            head[i + half] = b * c + a * s;
        }
    }
}

/// Adds a bias \[d\] to every row of y [n, d].
pub fn add_bias(y: &mut [f32], b: &[f32]) {
    for row in y.chunks_exact_mut(b.len()) {
        for (v, &bb) in row.iter_mut().zip(b) {
            *v += bb;
        }
    }
}

/// log-softmax of `logits` at `token`, with the row's entropy −Σ p log p.
pub fn logprob_and_entropy(logits: &[f32], token: usize) -> (f32, f32) {
    let lse = logsumexp(logits);
    let mut ent = 0.0;
    for &z in logits {
        let lp = z - lse;
        if lp > f32::NEG_INFINITY {
            ent -= lp.exp() * lp;
        }
    }
    (logits[token] - lse, ent)
}
