//! Activation quantization (see `kernels::acts`).

use std::arch::x86_64::*;

use super::super::acts::{finish_block, inverse, ActBlock, BLOCK};
use super::super::Isa;
use super::check;

/// Quantize `x` into `out` (lengths checked by the caller).
pub(in crate::kernels) fn quantize_row(isa: Isa, x: &[f32], out: &mut [ActBlock]) {
    check(isa);
    assert_eq!(x.len(), out.len() * BLOCK);
    for (x, block) in x.chunks_exact(BLOCK).zip(out) {
        // SAFETY: the CPU has `isa`; `x` is one block of 32 values.
        *block = unsafe {
            if isa == Isa::Avx512 {
                quantize_block_512(x.as_ptr())
            } else {
                quantize_block_256(x.as_ptr())
            }
        };
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn quantize_block_512(x: *const f32) -> ActBlock {
    // SAFETY: `x` points at 32 values.
    unsafe {
        let v0 = _mm512_loadu_ps(x);
        let v1 = _mm512_loadu_ps(x.add(16));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        let d = amax / 127.0;
        let id = _mm512_set1_ps(inverse(d));
        let q0 = _mm512_cvtps_epi32(round_away_512(_mm512_mul_ps(v0, id)));
        let q1 = _mm512_cvtps_epi32(round_away_512(_mm512_mul_ps(v1, id)));
        let mut qs = [0i8; BLOCK];
        _mm_storeu_si128(qs.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128(qs.as_mut_ptr().add(16).cast(), _mm512_cvtepi32_epi8(q1));
        finish_block(
            d,
            qs,
            _mm512_reduce_add_epi32(q0),
            _mm512_reduce_add_epi32(q1),
        )
    }
}

/// `f32::round` (half away from zero) on 16 lanes: truncate, then step
/// away from zero where the dropped part is at least one half (exact for
/// the magnitudes quantization sees).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn round_away_512(v: __m512) -> __m512 {
    let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
    let frac = _mm512_abs_ps(_mm512_sub_ps(v, t));
    let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, _mm512_set1_ps(0.5));
    // 1.0 with v's sign (AVX-512 F has the bitwise ops on integers only).
    let sign = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(i32::MIN));
    let one = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_castps_si512(_mm512_set1_ps(1.0)),
        sign,
    ));
    _mm512_mask_add_ps(t, away, t, one)
}

/// [`round_away_512`] on 8 lanes.
#[target_feature(enable = "avx2,fma,f16c")]
fn round_away_256(v: __m256) -> __m256 {
    let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
    let sign = _mm256_set1_ps(-0.0);
    let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(v, t));
    let away = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, _mm256_set1_ps(0.5));
    let one = _mm256_or_ps(_mm256_set1_ps(1.0), _mm256_and_ps(v, sign));
    _mm256_add_ps(t, _mm256_and_ps(away, one))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_block_256(x: *const f32) -> ActBlock {
    // SAFETY: `x` points at 32 values.
    unsafe {
        let sign = _mm256_set1_ps(-0.0);
        let mut v = [_mm256_setzero_ps(); 4];
        let mut m = _mm256_setzero_ps();
        for (c, v) in v.iter_mut().enumerate() {
            *v = _mm256_loadu_ps(x.add(8 * c));
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *v));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        let amax = lanes.iter().fold(0f32, |a, &b| a.max(b));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(inverse(d));
        let mut q = [0i32; BLOCK];
        for (c, v) in v.iter().enumerate() {
            let qi = _mm256_cvtps_epi32(round_away_256(_mm256_mul_ps(*v, id)));
            _mm256_storeu_si256(q.as_mut_ptr().add(8 * c).cast(), qi);
        }
        let qs = q.map(|v| v as i8);
        finish_block(d, qs, q[..16].iter().sum(), q[16..].iter().sum())
    }
}
