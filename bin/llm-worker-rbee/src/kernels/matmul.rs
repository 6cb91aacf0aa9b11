//! Matrix products against [`PackedMatrix`] weights, one group of 16
//! output columns at a time, for any number of input rows.
//!
//! A group's weights are unpacked once per block and used for up to
//! [`MAX_TILE_ROWS`] input rows (a register tile), so a prompt runs as a
//! real GEMM rather than a loop of dot products. Every row's arithmetic is
//! the same whichever rows it is computed with.

use super::acts::ActBlock;
use super::packed::{
    f16_at, f32_at, nibble, q6, Format, PackedMatrix, BLOCK, GROUP, Q4K_D, Q4K_DMIN, Q4K_MIN,
    Q4K_SC, Q4K_SUPER_BYTES, Q4SYM_BLOCK_BYTES, Q4_BLOCK_BYTES, Q6K_BLOCK_BYTES, Q6K_D, Q6K_SC,
    Q6K_SUPER_BYTES, Q8_BLOCK_BYTES, SUPER,
};
use super::Isa;

/// Input rows one kernel call handles at most.
pub const MAX_TILE_ROWS: usize = 4;

/// The input rows of a product: quantized for quantized weights, f32 for dense.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// `k / 32` blocks per row.
    Quantized(&'a [ActBlock]),
    /// `k` values per row.
    Dense(&'a [f32]),
}

impl Input<'_> {
    fn len(&self) -> usize {
        match self {
            Self::Quantized(a) => a.len(),
            Self::Dense(x) => x.len(),
        }
    }
}

/// `out[i][c] = sum_j w[16 * group + c][j] * input[i][j]` for each input row `i`.
pub fn matmul_group(w: &PackedMatrix, group: usize, input: Input<'_>, out: &mut [[f32; GROUP]]) {
    matmul_group_with(super::isa(), w, group, input, out);
}

/// [`matmul_group`] with a given instruction set (for tests and benchmarks).
pub fn matmul_group_with(
    isa: Isa,
    w: &PackedMatrix,
    group: usize,
    input: Input<'_>,
    out: &mut [[f32; GROUP]],
) {
    let per_row = match (w.format(), input) {
        (Format::F32, Input::Dense(_)) => w.k(),
        (f, Input::Quantized(_)) if f.is_quantized() => w.k() / BLOCK,
        (f, _) => panic!("a {f:?} matrix was given the other kind of input"),
    };
    assert!(group < w.groups(), "group {group} of {}", w.groups());
    assert_eq!(
        input.len(),
        out.len() * per_row,
        "input does not hold {} rows",
        out.len()
    );
    let weights = w.group(group);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 if isa.supported() => {
            super::x86::matmul_group(isa, w.format(), weights, w.k(), input, out);
        }
        _ => scalar(w.format(), weights, w.k(), input, out),
    }
}

/// The scalar reference.
fn scalar(format: Format, g: &[u8], k: usize, input: Input<'_>, out: &mut [[f32; GROUP]]) {
    match input {
        Input::Dense(x) => {
            for (row, out) in x.chunks_exact(k).zip(out) {
                *out = [0.0; GROUP];
                for (kk, &xv) in row.iter().enumerate() {
                    for (lane, o) in out.iter_mut().enumerate() {
                        *o = f32_at(g, (kk * GROUP + lane) * 4).mul_add(xv, *o);
                    }
                }
            }
        }
        Input::Quantized(a) => {
            let nb = k / BLOCK;
            for (row, out) in a.chunks_exact(nb).zip(out) {
                for (lane, o) in out.iter_mut().enumerate() {
                    *o = scalar_lane(format, g, lane, row);
                }
            }
        }
    }
}

fn dot(values: impl Iterator<Item = u8>, qs: &[i8]) -> i32 {
    values
        .zip(qs)
        .map(|(w, &a)| i32::from(w) * i32::from(a))
        .sum()
}

fn scalar_lane(format: Format, g: &[u8], lane: usize, row: &[ActBlock]) -> f32 {
    let mut f = 0f32;
    match format {
        Format::Q4 => {
            for (b, a) in row.iter().enumerate() {
                let blk = &g[b * Q4_BLOCK_BYTES..];
                let d = dot((0..BLOCK).map(|e| nibble(blk, lane, e)), &a.qs);
                let dw = f16_at(blk, 256 + 2 * lane);
                let mw = f16_at(blk, 288 + 2 * lane);
                f = (d as f32).mul_add(dw * a.d, f);
                f = mw.mul_add(a.s, f);
            }
        }
        Format::Q4Sym => {
            for (b, a) in row.iter().enumerate() {
                let blk = &g[b * Q4SYM_BLOCK_BYTES..];
                let d = dot((0..BLOCK).map(|e| nibble(blk, lane, e)), &a.qs)
                    - 8 * (a.sum_lo + a.sum_hi);
                let dw = f16_at(blk, 256 + 2 * lane);
                f = (d as f32).mul_add(dw * a.d, f);
            }
        }
        Format::Q8 => {
            for (b, a) in row.iter().enumerate() {
                let blk = &g[b * Q8_BLOCK_BYTES..];
                let w = (0..BLOCK).map(|e| blk[(e / 4) * 64 + lane * 4 + e % 4]);
                let d = dot(w, &a.qs) - 128 * (a.sum_lo + a.sum_hi);
                let dw = f16_at(blk, 512 + 2 * lane);
                f = (d as f32).mul_add(dw * a.d, f);
            }
        }
        Format::Q4K => {
            for (sb, a) in row.chunks_exact(SUPER / BLOCK).enumerate() {
                let sup = &g[sb * Q4K_SUPER_BYTES..];
                let d = f16_at(sup, Q4K_D + 2 * lane);
                let dmin = f16_at(sup, Q4K_DMIN + 2 * lane);
                for (s, a) in a.iter().enumerate() {
                    let blk = &sup[s * 256..];
                    let dt = dot((0..BLOCK).map(|e| nibble(blk, lane, e)), &a.qs);
                    let d_eff = d * f32::from(sup[Q4K_SC + s * GROUP + lane]);
                    let m_eff = dmin * f32::from(sup[Q4K_MIN + s * GROUP + lane]);
                    f = (dt as f32).mul_add(d_eff * a.d, f);
                    f = (-m_eff).mul_add(a.s, f);
                }
            }
        }
        Format::Q6K => {
            for (sb, a) in row.chunks_exact(SUPER / BLOCK).enumerate() {
                let sup = &g[sb * Q6K_SUPER_BYTES..];
                let d = f16_at(sup, Q6K_D + 2 * lane);
                for (b, a) in a.iter().enumerate() {
                    let blk = &sup[b * Q6K_BLOCK_BYTES..];
                    let lo = dot((0..16).map(|e| q6(blk, lane, e)), &a.qs[..16]) - 32 * a.sum_lo;
                    let hi = dot((16..32).map(|e| q6(blk, lane, e)), &a.qs[16..]) - 32 * a.sum_hi;
                    let sc_lo = f32::from(sup[Q6K_SC + 2 * b * GROUP + lane] as i8);
                    let sc_hi = f32::from(sup[Q6K_SC + (2 * b + 1) * GROUP + lane] as i8);
                    f = (lo as f32).mul_add(d * sc_lo * a.d, f);
                    f = (hi as f32).mul_add(d * sc_hi * a.d, f);
                }
            }
        }
        Format::F32 => unreachable!("dense weights take dense input"),
    }
    f
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::acts::quantize_row_with;
    use crate::kernels::math::tests::random_values;
    use crate::kernels::packed::SourceType;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use proptest::prelude::*;

    /// A random `rows` x `k` matrix quantized by candle into `dtype`, with
    /// its raw GGUF bytes and candle's own dequantization.
    pub(crate) fn candle_matrix(
        dtype: GgmlDType,
        rows: usize,
        k: usize,
        seed: u64,
    ) -> (Vec<u8>, Vec<f32>) {
        let values = random_values(rows * k, seed, 0.5);
        let t = Tensor::from_vec(values, (rows, k), &Device::Cpu).expect("tensor");
        let q = QTensor::quantize(&t, dtype).expect("quantize");
        let bytes = q.data().expect("data").into_owned();
        let deq = q
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("dequantize");
        (bytes, deq)
    }

    pub(crate) fn source(dtype: GgmlDType) -> SourceType {
        match dtype {
            GgmlDType::Q4_0 => SourceType::Q4_0,
            GgmlDType::Q4_1 => SourceType::Q4_1,
            GgmlDType::Q8_0 => SourceType::Q8_0,
            GgmlDType::Q4K => SourceType::Q4K,
            GgmlDType::Q6K => SourceType::Q6K,
            other => panic!("no source type for {other:?}"),
        }
    }

    fn quant_types() -> impl Strategy<Value = GgmlDType> {
        prop::sample::select(vec![
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ])
    }

    /// Every group of `w` times the rows of `input`, computed with `isa`
    /// in calls of `tile` rows: `rows` x `w.rows()` values.
    pub(crate) fn product(
        isa: Isa,
        w: &PackedMatrix,
        input: Input<'_>,
        rows: usize,
        tile: usize,
    ) -> Vec<f32> {
        let per_row = input.len() / rows.max(1);
        let mut out = vec![0f32; rows * w.rows()];
        for g in 0..w.groups() {
            let mut r0 = 0;
            while r0 < rows {
                let r1 = (r0 + tile).min(rows);
                let mut part = vec![[0f32; GROUP]; r1 - r0];
                let slice = match input {
                    Input::Quantized(a) => Input::Quantized(&a[r0 * per_row..r1 * per_row]),
                    Input::Dense(x) => Input::Dense(&x[r0 * per_row..r1 * per_row]),
                };
                matmul_group_with(isa, w, g, slice, &mut part);
                for (i, p) in part.iter().enumerate() {
                    for (c, &v) in p.iter().enumerate() {
                        let col = g * GROUP + c;
                        if col < w.rows() {
                            out[(r0 + i) * w.rows() + col] = v;
                        }
                    }
                }
                r0 = r1;
            }
        }
        out
    }

    #[test]
    fn packed_rows_dequantize_exactly_as_candle_does() {
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let (rows, k) = (19, 512);
            let (bytes, deq) = candle_matrix(dtype, rows, k, 7);
            let w = PackedMatrix::pack(source(dtype), &bytes, rows, k).expect("pack");
            let mut row = vec![0f32; k];
            for r in 0..rows {
                w.dequantize_row(r, &mut row);
                assert_eq!(row, deq[r * k..(r + 1) * k], "{dtype:?} row {r}");
            }
            // The packed size is the file's: the 4-bit formats stay 4-bit.
            let file = bytes.len() as f64;
            let padded = (rows.div_ceil(GROUP) * GROUP) as f64 / rows as f64;
            let ratio = w.size_bytes() as f64 / (file * padded);
            assert!((1.0..1.03).contains(&ratio), "{dtype:?}: {ratio}");
        }
    }

    #[test]
    fn bad_shapes_are_refused_with_a_reason() {
        let err = PackedMatrix::pack(SourceType::Q4_1, &[0; 20], 1, 48).expect_err("k");
        assert!(err.to_string().contains("whole number"), "{err}");
        let err = PackedMatrix::pack(SourceType::Q8_0, &[0; 33], 1, 32).expect_err("size");
        assert!(err.to_string().contains("34 expected"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Every body equals the scalar reference bit for bit, whatever the
        /// tile size; and the reference is the product of the dequantized
        /// weights with the dequantized activations, to float rounding.
        #[test]
        fn quantized_products_match_the_reference(
            dtype in quant_types(),
            rows in 1usize..40,
            m in 1usize..11,
            k_blocks in 1usize..20,
            tile in 1usize..=MAX_TILE_ROWS,
            seed in any::<u64>(),
        ) {
            let block = if matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K) { SUPER } else { BLOCK };
            // Awkward k: any number of blocks, so not a multiple of 256 for
            // the 32-blocks; odd rows and input counts.
            let k = k_blocks.div_ceil(if block == SUPER { 8 } else { 1 }) * block;
            let (bytes, deq) = candle_matrix(dtype, rows, k, seed);
            let w = PackedMatrix::pack(source(dtype), &bytes, rows, k).expect("pack");
            let x = random_values(m * k, seed ^ 1, 1.0);
            let mut a = vec![ActBlock::default(); m * k / BLOCK];
            quantize_row_with(Isa::Scalar, &x, &mut a);
            let want = product(Isa::Scalar, &w, Input::Quantized(&a), m, 1);
            for isa in Isa::available() {
                let got = product(isa, &w, Input::Quantized(&a), m, tile);
                prop_assert!(got == want, "{:?} {:?} differs from scalar", isa, dtype);
            }
            for i in 0..m {
                let blocks = &a[i * k / BLOCK..(i + 1) * k / BLOCK];
                let xa: Vec<f32> = blocks
                    .iter()
                    .flat_map(|b| b.qs.map(|q| f32::from(q) * b.d))
                    .collect();
                for r in 0..rows {
                    let w = &deq[r * k..(r + 1) * k];
                    let exact: f64 = w
                        .iter()
                        .zip(&xa)
                        .map(|(&w, &x)| f64::from(w) * f64::from(x))
                        .sum();
                    let scale: f64 = w
                        .iter()
                        .zip(&xa)
                        .map(|(&w, &x)| (f64::from(w) * f64::from(x)).abs())
                        .sum();
                    // Formats with a minimum use the block's scaled sum as
                    // the reference formats keep it: computed in f16.
                    let sums: f64 = blocks
                        .iter()
                        .zip(w.chunks_exact(BLOCK))
                        .map(|(b, w)| {
                            let s = f64::from(b.d) * f64::from(b.sum_lo + b.sum_hi);
                            let wmax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                            (f64::from(b.s) - s).abs() * f64::from(wmax)
                        })
                        .sum();
                    let got = f64::from(want[i * rows + r]);
                    prop_assert!(
                        (got - exact).abs() <= 1e-5 * scale + sums + 1e-6,
                        "{:?} row {} input {}: {} vs {}", dtype, r, i, got, exact
                    );
                }
            }
        }

        #[test]
        fn dense_products_match_the_reference(
            rows in 1usize..40,
            m in 1usize..11,
            k in 1usize..300,
            tile in 1usize..=MAX_TILE_ROWS,
            seed in any::<u64>(),
            kind in prop::sample::select(vec![SourceType::F32, SourceType::F16, SourceType::BF16]),
        ) {
            let values = random_values(rows * k, seed, 0.5);
            let bytes: Vec<u8> = match kind {
                SourceType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                SourceType::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
                _ => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
            };
            let w = PackedMatrix::pack(kind, &bytes, rows, k).expect("pack");
            let x = random_values(m * k, seed ^ 3, 1.0);
            let want = product(Isa::Scalar, &w, Input::Dense(&x), m, 1);
            for isa in Isa::available() {
                let got = product(isa, &w, Input::Dense(&x), m, tile);
                prop_assert!(got == want, "{:?} differs from scalar", isa);
            }
            let mut row = vec![0f32; k];
            for r in 0..rows {
                w.dequantize_row(r, &mut row);
                for i in 0..m {
                    let exact: f64 = row.iter().zip(&x[i * k..(i + 1) * k]).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                    let scale: f64 = row.iter().zip(&x[i * k..(i + 1) * k]).map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs()).sum();
                    prop_assert!((f64::from(want[i * rows + r]) - exact).abs() <= 1e-5 * scale + 1e-6);
                }
            }
        }
    }
}
