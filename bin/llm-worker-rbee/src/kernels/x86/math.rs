//! Fixed-order sums, exp, RMS norm sums and SiLU (see `kernels::math`).

use std::arch::x86_64::*;

use super::super::math::{EXP_P, LANES, LN2_HI, LN2_LO};
use super::super::Isa;
use super::check;

/// Lanes 0..8 and 8..16 of a fixed-order sum, added pairwise.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn reduce_256(lo: __m256, hi: __m256) -> f32 {
    let s8 = _mm256_add_ps(lo, hi);
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) fn reduce_512(acc: __m512) -> f32 {
    reduce_256(
        _mm512_castps512_ps256(acc),
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc))),
    )
}

/// A mask of the first `n` (< 8) 32-bit lanes, for AVX2 masked loads.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn mask_256(n: usize) -> __m256i {
    let n = n.min(8) as i32;
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// The fixed-order sum of squares of `x`.
pub(in crate::kernels) fn sum_squares(isa: Isa, x: &[f32]) -> f32 {
    check(isa);
    // SAFETY: the CPU has `isa`; the bodies read `x.len()` values.
    unsafe {
        if isa == Isa::Avx512 {
            sum_squares_512(x.as_ptr(), x.len())
        } else {
            sum_squares_256(x.as_ptr(), x.len())
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn sum_squares_512(x: *const f32, n: usize) -> f32 {
    // SAFETY: reads `n` values from `x`; the tail load is masked.
    unsafe {
        let mut acc = _mm512_setzero_ps();
        let full = n / LANES * LANES;
        for c in (0..full).step_by(LANES) {
            let v = _mm512_loadu_ps(x.add(c));
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        if full < n {
            let v = _mm512_maskz_loadu_ps((1u16 << (n - full)) - 1, x.add(full));
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        reduce_512(acc)
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sum_squares_256(x: *const f32, n: usize) -> f32 {
    // SAFETY: reads `n` values from `x`; the tail loads are masked.
    unsafe {
        let mut lo = _mm256_setzero_ps();
        let mut hi = _mm256_setzero_ps();
        let full = n / LANES * LANES;
        for c in (0..full).step_by(LANES) {
            let a = _mm256_loadu_ps(x.add(c));
            let b = _mm256_loadu_ps(x.add(c + 8));
            lo = _mm256_fmadd_ps(a, a, lo);
            hi = _mm256_fmadd_ps(b, b, hi);
        }
        let rest = n - full;
        if rest > 0 {
            let a = _mm256_maskload_ps(x.add(full), mask_256(rest));
            lo = _mm256_fmadd_ps(a, a, lo);
            if rest > 8 {
                let b = _mm256_maskload_ps(x.add(full + 8), mask_256(rest - 8));
                hi = _mm256_fmadd_ps(b, b, hi);
            }
        }
        reduce_256(lo, hi)
    }
}

/// `math::exp` on 8 lanes: the same clamp, reduction and polynomial.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn exp_256(x: __m256) -> __m256 {
    let x = _mm256_max_ps(
        _mm256_min_ps(x, _mm256_set1_ps(88.0)),
        _mm256_set1_ps(-87.0),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_P[0]);
    for &c in &EXP_P[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let y = _mm256_add_ps(
        _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
        _mm256_set1_ps(1.0),
    );
    let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    )));
    _mm256_mul_ps(y, scale)
}

/// `math::exp` on 16 lanes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub(super) fn exp_512(x: __m512) -> __m512 {
    let x = _mm512_max_ps(
        _mm512_min_ps(x, _mm512_set1_ps(88.0)),
        _mm512_set1_ps(-87.0),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(EXP_P[0]);
    for &c in &EXP_P[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let y = _mm512_add_ps(
        _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
        _mm512_set1_ps(1.0),
    );
    let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvtps_epi32(n),
        _mm512_set1_epi32(127),
    )));
    _mm512_mul_ps(y, scale)
}

/// `out = silu(gate) * up`.
pub(in crate::kernels) fn silu_mul(isa: Isa, gate: &[f32], up: &[f32], out: &mut [f32]) {
    check(isa);
    assert!(gate.len() == up.len() && up.len() == out.len());
    let width = if isa == Isa::Avx512 { 16 } else { 8 };
    let full = gate.len() / width * width;
    // SAFETY: the CPU has `isa`; the bodies touch the first `full` values.
    unsafe {
        if isa == Isa::Avx512 {
            silu_512(gate.as_ptr(), up.as_ptr(), out.as_mut_ptr(), full);
        } else {
            silu_256(gate.as_ptr(), up.as_ptr(), out.as_mut_ptr(), full);
        }
    }
    for i in full..gate.len() {
        out[i] = gate[i] / (1.0 + super::super::math::exp(-gate[i])) * up[i];
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn silu_512(g: *const f32, u: *const f32, o: *mut f32, n: usize) {
    // SAFETY: `n` values at each pointer.
    unsafe {
        let one = _mm512_set1_ps(1.0);
        for i in (0..n).step_by(16) {
            let gv = _mm512_loadu_ps(g.add(i));
            let e = exp_512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            let s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
            _mm512_storeu_ps(o.add(i), _mm512_mul_ps(s, _mm512_loadu_ps(u.add(i))));
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn silu_256(g: *const f32, u: *const f32, o: *mut f32, n: usize) {
    // SAFETY: `n` values at each pointer.
    unsafe {
        let one = _mm256_set1_ps(1.0);
        for i in (0..n).step_by(8) {
            let gv = _mm256_loadu_ps(g.add(i));
            let e = exp_256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            let s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
            _mm256_storeu_ps(o.add(i), _mm256_mul_ps(s, _mm256_loadu_ps(u.add(i))));
        }
    }
}
