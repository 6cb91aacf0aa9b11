//! Activations quantized to 8 bits for the quantized matrix products: 32
//! values per [`ActBlock`], as llama.cpp's and candle's Q8_0/Q8_1 blocks
//! (scale rounded to f16, values rounded half away from zero, the scaled
//! sum computed in f16), plus the integer sums the weight formats with
//! offsets need.

use super::Isa;

/// Values per block.
pub const BLOCK: usize = 32;

/// 32 activations as `d * qs[i]`, with their sums.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[repr(C, align(16))]
pub struct ActBlock {
    /// The values, `round(x * 127 / amax)`, in -127..=127.
    pub qs: [i8; BLOCK],
    /// The scale: the largest magnitude over 127, rounded to f16.
    pub d: f32,
    /// `d` times the sum of all 32 `qs`, computed in f16.
    pub s: f32,
    /// Sum of `qs[0..16]`.
    pub sum_lo: i32,
    /// Sum of `qs[16..32]`.
    pub sum_hi: i32,
}

/// Quantize `x` (a multiple of 32 values) into `out` (one block per 32).
pub fn quantize_row(x: &[f32], out: &mut [ActBlock]) {
    quantize_row_with(super::isa(), x, out);
}

/// [`quantize_row`] with a given instruction set (for tests and benchmarks).
pub fn quantize_row_with(isa: Isa, x: &[f32], out: &mut [ActBlock]) {
    assert!(
        x.len().is_multiple_of(BLOCK) && out.len() == x.len() / BLOCK,
        "{} values into {} blocks",
        x.len(),
        out.len()
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2 if isa.supported() => super::x86::quantize_row(isa, x, out),
        _ => {
            for (x, block) in x.chunks_exact(BLOCK).zip(out) {
                *block = quantize_block(x);
            }
        }
    }
}

/// The scalar reference for one block.
pub fn quantize_block(x: &[f32]) -> ActBlock {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    let mut qs = [0i8; BLOCK];
    for (q, &v) in qs.iter_mut().zip(x) {
        // Within -127..=127 by construction; `as` saturates anyway.
        *q = (v * id).round() as i8;
    }
    let sum_lo = qs[..16].iter().map(|&q| i32::from(q)).sum();
    let sum_hi = qs[16..].iter().map(|&q| i32::from(q)).sum();
    finish_block(d, qs, sum_lo, sum_hi)
}

/// `1 / d`, or 0 for an all-zero block.
pub(crate) fn inverse(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

/// The block from its values: the scale rounded to f16 and the scaled sum
/// computed in f16, as the reference formats store them.
pub(crate) fn finish_block(d: f32, qs: [i8; BLOCK], sum_lo: i32, sum_hi: i32) -> ActBlock {
    use half::f16;
    let d16 = f16::from_f32(d);
    ActBlock {
        qs,
        d: d16.to_f32(),
        s: (f16::from_f32((sum_lo + sum_hi) as f32) * d16).to_f32(),
        sum_lo,
        sum_hi,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_block_keeps_values_within_half_a_step() {
        let x: Vec<f32> = (0..32).map(|i| (i as f32 - 15.5) * 0.37).collect();
        let b = quantize_block(&x);
        for (q, v) in b.qs.iter().zip(&x) {
            assert!((f32::from(*q) * b.d - v).abs() <= b.d / 2.0 + 1e-6);
        }
        assert_eq!(b.qs.iter().map(|q| q.unsigned_abs()).max(), Some(127));
        let zero = quantize_block(&[0.0; 32]);
        assert_eq!((zero.d, zero.s, zero.qs), (0.0, 0.0, [0; 32]));
    }

    proptest! {
        #[test]
        fn simd_quantization_equals_the_reference(
            blocks in 1usize..40,
            seed in any::<u64>(),
            scale in prop::sample::select(vec![1e-6f32, 0.01, 1.0, 300.0]),
        ) {
            let x = crate::kernels::math::tests::random_values(blocks * BLOCK, seed, scale);
            let mut want = vec![ActBlock::default(); blocks];
            quantize_row_with(Isa::Scalar, &x, &mut want);
            for isa in Isa::available() {
                let mut got = vec![ActBlock::default(); blocks];
                quantize_row_with(isa, &x, &mut got);
                prop_assert_eq!(&got, &want, "{:?}", isa);
            }
        }
    }
}
