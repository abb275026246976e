//! Global gradient-norm clipping, as `torch.nn.utils.clip_grad_norm_`.

/// What [`clip_grad_norm`] found and did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClipReport {
    /// The global L2 norm before clipping (NaN or ∞ when a gradient is not finite).
    pub norm: f32,
    /// Whether every gradient is finite. When `false` nothing was scaled and the caller must
    /// skip the optimiser step.
    pub finite: bool,
    /// The factor the gradients were multiplied by (1 when not clipped).
    pub scale: f32,
}

/// `sqrt(Σ g²)` over all tensors (accumulated in f64). NaN or ∞ if any entry is.
pub fn grad_norm(grads: &[&[f32]]) -> f32 {
    let ss: f64 = grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&x| (x as f64) * (x as f64))
        .sum();
    ss.sqrt() as f32
}

/// Whether every gradient entry is finite.
pub fn check_finite(grads: &[&[f32]]) -> bool {
    grads.iter().all(|g| g.iter().all(|x| x.is_finite()))
}

/// Clips the global norm to `max_norm` as torch does: `coef = max_norm / (norm + 1e-6)`, and
/// when `coef < 1` every gradient is multiplied by it. `max_norm <= 0` disables clipping (the
/// norm is still computed). A non-finite norm leaves the gradients untouched and reports
/// `finite: false`.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> ClipReport {
    let norm = {
        let views: Vec<&[f32]> = grads.iter().map(|g| &**g).collect();
        grad_norm(&views)
    };
    if !norm.is_finite() {
        return ClipReport {
            norm,
            finite: false,
            scale: 1.0,
        };
    }
    let mut scale = 1.0f32;
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            scale = coef;
            for g in grads.iter_mut() {
                g.iter_mut().for_each(|x| *x *= coef);
            }
        }
    }
    ClipReport {
        norm,
        finite: true,
        scale,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // grads [3, 0] and [4]: norm 5. max_norm 1 → coef 1/(5 + 1e-6), grads ≈ [0.6, 0], [0.8].
    #[test]
    fn clips_to_max_norm() {
        let (mut a, mut b) = (vec![3.0f32, 0.0], vec![4.0f32]);
        let r = clip_grad_norm(&mut [&mut a, &mut b], 1.0);
        assert_eq!(r.norm, 5.0);
        assert!(r.finite);
        let coef = 1.0 / (5.0 + 1e-6);
        assert_eq!(r.scale, coef);
        assert_eq!(a, vec![3.0 * coef, 0.0]);
        assert_eq!(b, vec![4.0 * coef]);
        assert!((grad_norm(&[&a, &b]) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn below_max_or_disabled_is_untouched() {
        let mut a = vec![3.0f32, 4.0];
        let r = clip_grad_norm(&mut [&mut a], 10.0);
        assert_eq!((r.norm, r.scale, r.finite), (5.0, 1.0, true));
        assert_eq!(a, vec![3.0, 4.0]);
        let r = clip_grad_norm(&mut [&mut a], 0.0);
        assert_eq!((r.norm, r.scale), (5.0, 1.0));
        assert_eq!(a, vec![3.0, 4.0]);
    }

    #[test]
    fn non_finite_is_reported_and_untouched() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let (mut a, mut b) = (vec![3.0f32, 4.0], vec![1.0, bad]);
            assert!(!check_finite(&[&a, &b]));
            let r = clip_grad_norm(&mut [&mut a, &mut b], 1.0);
            assert!(!r.finite);
            assert!(!r.norm.is_finite());
            assert_eq!(a, vec![3.0, 4.0]);
            assert_eq!(b[0], 1.0);
        }
        assert!(check_finite(&[&[1.0, 2.0], &[]]));
    }
}
