//! Element-wise and attention kernels: exp, RMS norm, SiLU, and attention
//! of one query head over a KV cache of f32 or f16 rows.
//!
//! Sums run in one fixed order whatever the instruction set: element `e`
//! goes to lane `e % 16`, lanes are added pairwise (8, 4, 2, 1). `exp` is a
//! polynomial every body evaluates with the same fused operations.

use super::Isa;

/// Lanes of the fixed summation order.
pub const LANES: usize = 16;

const EXP_HI: f32 = 88.0;
const EXP_LO: f32 = -87.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// exp(r) = 1 + r + r^2 * P(r) on [-ln2/2, ln2/2] (Cephes' coefficients).
pub(crate) const EXP_P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// e^x, within 2 ulp for finite x in [-87, 88]; inputs outside are
/// clamped to that range.
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(EXP_LO, EXP_HI);
    let n = (x * LOG2E).round_ties_even();
    let r = (-n).mul_add(LN2_HI, x);
    let r = (-n).mul_add(LN2_LO, r);
    let mut p = EXP_P[0];
    for &c in &EXP_P[1..] {
        p = p.mul_add(r, c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Sum the lanes pairwise: the last step of every fixed-order sum.
pub(crate) fn reduce(acc: [f32; LANES]) -> f32 {
    let mut s8 = [0f32; 8];
    for l in 0..8 {
        s8[l] = acc[l] + acc[l + 8];
    }
    let s4 = [s8[0] + s8[4], s8[1] + s8[5], s8[2] + s8[6], s8[3] + s8[7]];
    let s2 = [s4[0] + s4[2], s4[1] + s4[3]];
    s2[0] + s2[1]
}

/// `out = x / sqrt(mean(x^2) + eps) * weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    rms_norm_with(super::isa(), x, weight, eps, out);
}

/// [`rms_norm`] with a given instruction set.
pub fn rms_norm_with(isa: Isa, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    assert!(x.len() == weight.len() && x.len() == out.len());
    let sum = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 if isa.supported() => super::x86::sum_squares(isa, x),
        _ => {
            let mut acc = [0f32; LANES];
            for (e, &v) in x.iter().enumerate() {
                acc[e % LANES] = v.mul_add(v, acc[e % LANES]);
            }
            reduce(acc)
        }
    };
    let scale = 1.0 / (sum / x.len() as f32 + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// `out = silu(gate) * up`, with `silu(g) = g / (1 + e^-g)`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    silu_mul_with(super::isa(), gate, up, out);
}

/// [`silu_mul`] with a given instruction set.
pub fn silu_mul_with(isa: Isa, gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == up.len() && gate.len() == out.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 if isa.supported() => super::x86::silu_mul(isa, gate, up, out),
        _ => {
            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                *o = g / (1.0 + exp(-g)) * u;
            }
        }
    }
}

/// Cached key or value rows: f32, or f16 as bits.
#[derive(Debug, Clone, Copy)]
pub enum KvRows<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// f16 values, as bits.
    F16(&'a [u16]),
}

impl KvRows<'_> {
    /// Elements held.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows from element `at` on.
    pub fn offset(self, at: usize) -> Self {
        match self {
            Self::F32(v) => Self::F32(&v[at..]),
            Self::F16(v) => Self::F16(&v[at..]),
        }
    }

    /// Element `i` as f32.
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Self::F32(v) => v[i],
            Self::F16(v) => f16(v[i]),
        }
    }
}

/// Positions per block of the key layout.
pub const KEY_BLOCK: usize = 16;

/// Query rows of one sequence attending over a run of its cached positions
/// with one key/value head: for each row, the query heads that share that
/// key/value head (the slices start at the run's first position, a multiple
/// of 16; row `r` attends to the run's first `positions[r]` positions, its
/// causal prefix). Rows share every key and value load, which is what makes
/// a prompt's attention a matrix product rather than a loop of rows.
///
/// Keys are stored in blocks of [`KEY_BLOCK`] positions, each block
/// `head_dim x 16` (element `e` of position `j` at
/// `(j / 16) * head_dim * 16 + e * 16 + j % 16`), so one vector holds one
/// element of 16 positions and 16 scores are summed side by side. Values
/// are stored by position (`values[j * head_dim + e]`). Every score is the
/// plain sum over `e` in order; the softmax sum and each output element
/// sum over positions in order (the softmax in the fixed lane order). A
/// row's result is the same whatever rows it is computed with.
///
/// The result is partial: per row and query head the unnormalized sum
/// `sum_j exp(s_j - max) v_j`, the run's `max` and `sum_j exp(s_j - max)`
/// ([`partial_len`] values per row). [`merge`] combines the runs of a row
/// into the attention output; a row's runs are fixed by its position
/// alone, so the result never depends on how work was split.
#[derive(Debug)]
pub struct Attention<'a> {
    /// The queries (rotated): row `r`'s `heads` vectors of `head_dim`
    /// values at `q[r * q_stride..]`.
    pub q: &'a [f32],
    /// Elements between the queries of consecutive rows.
    pub q_stride: usize,
    /// Query heads sharing the key/value head.
    pub heads: usize,
    /// The keys, in blocks (see above).
    pub keys: KvRows<'a>,
    /// The values, by position.
    pub values: KvRows<'a>,
    /// Width of one head.
    pub head_dim: usize,
    /// Per row, how many of the run's positions it attends to (at least 1).
    pub positions: &'a [usize],
    /// Score scale, `1 / sqrt(head_dim)`.
    pub scale: f32,
}

impl Attention<'_> {
    /// The most positions any row attends to.
    pub fn longest(&self) -> usize {
        self.positions.iter().copied().max().unwrap_or(0)
    }

    /// The longest row's positions rounded up to whole key blocks: the
    /// stride of each query vector's scores in the scratch `attention` takes.
    pub fn padded(&self) -> usize {
        self.longest().div_ceil(KEY_BLOCK) * KEY_BLOCK
    }

    /// Query vectors: rows times heads.
    pub fn vectors(&self) -> usize {
        self.positions.len() * self.heads
    }

    /// Element `e` of position `j`'s key.
    fn key(&self, j: usize, e: usize) -> f32 {
        self.keys
            .get((j / KEY_BLOCK) * self.head_dim * KEY_BLOCK + e * KEY_BLOCK + j % KEY_BLOCK)
    }
}

/// Values of one partial result: `heads * head_dim` weighted sums, then
/// `heads` maxima, then `heads` sums.
pub const fn partial_len(heads: usize, head_dim: usize) -> usize {
    heads * (head_dim + 2)
}

/// The partial attention of each row and query head over the run (see
/// [`Attention`]) into `part` ([`partial_len`] values per row, rows one
/// after another); `scores` holds at least `a.vectors() * a.padded()` values.
pub fn attention(a: &Attention<'_>, scores: &mut [f32], part: &mut [f32]) {
    attention_with(super::isa(), a, scores, part);
}

/// [`attention`] with a given instruction set.
pub fn attention_with(isa: Isa, a: &Attention<'_>, scores: &mut [f32], part: &mut [f32]) {
    let (hd, rows) = (a.head_dim, a.positions.len());
    assert!(rows > 0 && a.heads > 0 && hd > 0 && a.positions.iter().all(|&p| p > 0));
    assert!(a.q_stride >= a.heads * hd && a.q.len() >= (rows - 1) * a.q_stride + a.heads * hd);
    assert!(part.len() == rows * partial_len(a.heads, hd));
    assert!(scores.len() >= a.vectors() * a.padded());
    assert!(a.keys.len() >= a.padded() * hd && a.values.len() >= a.longest() * hd);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 if isa.supported() && hd.is_multiple_of(LANES) => {
            super::x86::attention(isa, a, scores, part);
        }
        _ => attention_scalar(a, scores, part),
    }
}

/// The attention output of each query head (`out`, `heads * head_dim`)
/// from the partial results of a row's runs, in run order: the largest
/// maximum, each run rescaled by `exp(max_run - max)`, then normalized.
/// One run gives that run's weighted sum over its sum, exactly.
pub fn merge<'p>(
    parts: impl Iterator<Item = &'p [f32]> + Clone,
    heads: usize,
    head_dim: usize,
    out: &mut [f32],
) {
    let hd = head_dim;
    assert_eq!(out.len(), heads * hd);
    for g in 0..heads {
        let max = parts
            .clone()
            .fold(f32::NEG_INFINITY, |m, p| m.max(p[heads * hd + g]));
        let out = &mut out[g * hd..(g + 1) * hd];
        out.fill(0.0);
        let mut sum = 0f32;
        // Plain multiplies and adds (not fused): the same on every CPU and
        // fast without FMA; one run reproduces its values exactly.
        for p in parts.clone() {
            let f = exp(p[heads * hd + g] - max);
            sum += f * p[heads * (hd + 1) + g];
            for (o, &v) in out.iter_mut().zip(&p[g * hd..(g + 1) * hd]) {
                *o += f * v;
            }
        }
        let inv = 1.0 / sum;
        for o in out.iter_mut() {
            *o *= inv;
        }
    }
}

fn f16(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

fn attention_scalar(a: &Attention<'_>, scores: &mut [f32], part: &mut [f32]) {
    let (hd, heads) = (a.head_dim, a.heads);
    let len = partial_len(heads, hd);
    for (r, &positions) in a.positions.iter().enumerate() {
        let (out, stats) = part[r * len..(r + 1) * len].split_at_mut(heads * hd);
        for g in 0..heads {
            let q = &a.q[r * a.q_stride + g * hd..][..hd];
            let scores = &mut scores[..positions];
            for (j, s) in scores.iter_mut().enumerate() {
                let mut acc = 0f32;
                for (e, &q) in q.iter().enumerate() {
                    acc = q.mul_add(a.key(j, e), acc);
                }
                *s = acc * a.scale;
            }
            let (max, sum) = softmax_in_place(scores);
            stats[g] = max;
            stats[heads + g] = sum;
            let out = &mut out[g * hd..(g + 1) * hd];
            out.fill(0.0);
            for (j, &p) in scores.iter().enumerate() {
                for (e, o) in out.iter_mut().enumerate() {
                    *o = p.mul_add(a.values.get(j * hd + e), *o);
                }
            }
        }
    }
}

/// Replace scores by `exp(s - max)`; return the maximum and their sum (in
/// the fixed lane order).
pub(crate) fn softmax_in_place(scores: &mut [f32]) -> (f32, f32) {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut acc = [0f32; LANES];
    for (j, s) in scores.iter_mut().enumerate() {
        *s = exp(*s - max);
        acc[j % LANES] += *s;
    }
    (max, reduce(acc))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `n` values in `[-scale, scale)` from a seed (xorshift; no rand state).
    pub(crate) fn random_values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    fn f16_bits(values: &[f32]) -> Vec<u16> {
        values
            .iter()
            .map(|&v| half::f16::from_f32(v).to_bits())
            .collect()
    }

    #[test]
    fn exp_is_within_two_ulp_over_its_range() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            let ulp = f64::from(f32::EPSILON) * want;
            assert!(
                (got - want).abs() <= 2.0 * ulp,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.0137;
        }
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) > 0.0 && exp(1000.0).is_finite());
    }

    proptest! {
        #[test]
        fn norm_and_silu_bodies_equal_the_reference(
            n in 1usize..700,
            seed in any::<u64>(),
        ) {
            let x = random_values(n, seed, 3.0);
            let w = random_values(n, seed ^ 5, 1.0);
            let up = random_values(n, seed ^ 9, 20.0);
            let mut want = vec![0f32; n];
            rms_norm_with(Isa::Scalar, &x, &w, 1e-5, &mut want);
            let ms: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / n as f64;
            for i in 0..n {
                let exact = f64::from(x[i]) / (ms + 1e-5).sqrt() * f64::from(w[i]);
                prop_assert!((f64::from(want[i]) - exact).abs() <= 1e-5 * exact.abs() + 1e-6);
            }
            let mut want_silu = vec![0f32; n];
            silu_mul_with(Isa::Scalar, &up, &x, &mut want_silu);
            for i in 0..n {
                let g = f64::from(up[i]);
                let exact = g / (1.0 + (-g).exp()) * f64::from(x[i]);
                prop_assert!((f64::from(want_silu[i]) - exact).abs() <= 1e-5 * exact.abs() + 1e-6);
            }
            for isa in Isa::available() {
                let mut got = vec![0f32; n];
                rms_norm_with(isa, &x, &w, 1e-5, &mut got);
                prop_assert!(got == want, "rms_norm {:?}", isa);
                silu_mul_with(isa, &up, &x, &mut got);
                prop_assert!(got == want_silu, "silu {:?}", isa);
            }
        }

        #[test]
        fn attention_bodies_equal_the_reference(
            hd in prop::sample::select(vec![16usize, 48, 64, 128, 20]),
            heads in 1usize..7,
            lens in prop::collection::vec(1usize..300, 1..6),
            seed in any::<u64>(),
            half in any::<bool>(),
        ) {
            let rows = lens.len();
            let longest = lens.iter().copied().max().unwrap_or(1);
            let blocks = longest.div_ceil(KEY_BLOCK);
            let q_stride = heads * hd + 3;
            let q = random_values(rows * q_stride, seed, 1.0);
            // Keys as a plain (position, element) matrix, then laid out in blocks.
            let k_plain = random_values(blocks * KEY_BLOCK * hd, seed ^ 1, 2.0);
            let mut k_blocked = vec![0f32; k_plain.len()];
            for j in 0..blocks * KEY_BLOCK {
                for e in 0..hd {
                    k_blocked[(j / KEY_BLOCK) * hd * KEY_BLOCK + e * KEY_BLOCK + j % KEY_BLOCK] = k_plain[j * hd + e];
                }
            }
            let values16 = f16_bits(&random_values(longest * hd, seed ^ 2, 1.0));
            let keys16 = f16_bits(&k_blocked);
            let keys32: Vec<f32> = keys16.iter().map(|&b| f16(b)).collect();
            let values32: Vec<f32> = values16.iter().map(|&b| f16(b)).collect();
            let (keys, values) = if half {
                (KvRows::F16(&keys16), KvRows::F16(&values16))
            } else {
                (KvRows::F32(&keys32), KvRows::F32(&values32))
            };
            let a = Attention { q: &q, q_stride, heads, keys, values, head_dim: hd, positions: &lens, scale: 1.0 / (hd as f32).sqrt() };
            let len = partial_len(heads, hd);
            let mut scores = vec![0f32; a.vectors() * a.padded() + 3];
            let mut part = vec![0f32; rows * len];
            attention_with(Isa::Scalar, &a, &mut scores, &mut part);
            // Each row alone gives its part of the rows together, bit for bit.
            for (r, &n) in lens.iter().enumerate() {
                let one = Attention { q: &q[r * q_stride..], positions: &lens[r..=r], ..a };
                for isa in Isa::available() {
                    let mut alone = vec![0f32; len];
                    attention_with(isa, &one, &mut scores, &mut alone);
                    prop_assert!(alone == part[r * len..(r + 1) * len], "row {} alone, {:?}", r, isa);
                }
                let mut want = vec![0f32; heads * hd];
                merge(std::iter::once(&part[r * len..(r + 1) * len]), heads, hd, &mut want);
                // Against a plain f64 softmax.
                for g in 0..heads {
                    let s: Vec<f64> = (0..n).map(|j| {
                        (0..hd).map(|e| f64::from(q[r * q_stride + g * hd + e]) * f64::from(a.key(j, e))).sum::<f64>() * f64::from(a.scale)
                    }).collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let p: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
                    let total: f64 = p.iter().sum();
                    for e in 0..hd {
                        let exact: f64 = (0..n).map(|j| p[j] / total * f64::from(values32[j * hd + e])).sum();
                        prop_assert!((f64::from(want[g * hd + e]) - exact).abs() <= 1e-5, "{} vs {}", want[g * hd + e], exact);
                    }
                }
                // The run split in two at a block boundary and merged
                // agrees with it to rounding.
                if n > KEY_BLOCK {
                    let cut = (n / 2).div_ceil(KEY_BLOCK) * KEY_BLOCK;
                    let first_len = [cut];
                    let second_len = [n - cut];
                    let first = Attention { positions: &first_len, ..one };
                    let second = Attention {
                        keys: keys.offset(cut * hd),
                        values: values.offset(cut * hd),
                        positions: &second_len,
                        ..one
                    };
                    let mut p1 = vec![0f32; len];
                    let mut p2 = vec![0f32; len];
                    attention_with(Isa::Scalar, &first, &mut scores, &mut p1);
                    attention_with(Isa::Scalar, &second, &mut scores, &mut p2);
                    let mut split = vec![0f32; heads * hd];
                    merge([p1.as_slice(), p2.as_slice()].into_iter(), heads, hd, &mut split);
                    for (x, y) in split.iter().zip(&want) {
                        prop_assert!((x - y).abs() <= 1e-5, "{} vs {}", x, y);
                    }
                }
            }
            for isa in Isa::available() {
                let mut got = vec![0f32; rows * len];
                attention_with(isa, &a, &mut scores, &mut got);
                prop_assert!(got == part, "attention {:?}", isa);
            }
        }
    }
}
