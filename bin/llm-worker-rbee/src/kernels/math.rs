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

/// One query head attending over `positions` cached positions.
#[derive(Debug)]
pub struct Attention<'a> {
    /// The query (rotated), `head_dim` values.
    pub q: &'a [f32],
    /// Keys: position `j` at `keys[j * stride..][..head_dim]`.
    pub keys: KvRows<'a>,
    /// Values, laid out as the keys; the same element type.
    pub values: KvRows<'a>,
    /// Elements between consecutive positions.
    pub stride: usize,
    /// Positions to attend to (the causal prefix).
    pub positions: usize,
    /// Score scale, `1 / sqrt(head_dim)`.
    pub scale: f32,
}

/// `out = softmax(scale * q.K) V`; `scores` holds at least `positions` values.
pub fn attention(a: &Attention<'_>, scores: &mut [f32], out: &mut [f32]) {
    attention_with(super::isa(), a, scores, out);
}

/// [`attention`] with a given instruction set.
pub fn attention_with(isa: Isa, a: &Attention<'_>, scores: &mut [f32], out: &mut [f32]) {
    let hd = a.q.len();
    assert!(a.positions > 0 && scores.len() >= a.positions && out.len() == hd);
    let last = (a.positions - 1) * a.stride + hd;
    assert!(a.keys.len() >= last && a.values.len() >= last && a.stride >= hd);
    let scores = &mut scores[..a.positions];
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 if isa.supported() && hd.is_multiple_of(LANES) => {
            super::x86::attention(isa, a, scores, out);
        }
        _ => attention_scalar(a, scores, out),
    }
}

fn f16(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

fn attention_scalar(a: &Attention<'_>, scores: &mut [f32], out: &mut [f32]) {
    for (j, s) in scores.iter_mut().enumerate() {
        let mut acc = [0f32; LANES];
        for (e, &q) in a.q.iter().enumerate() {
            acc[e % LANES] = q.mul_add(a.keys.get(j * a.stride + e), acc[e % LANES]);
        }
        *s = reduce(acc) * a.scale;
    }
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut acc = [0f32; LANES];
    for (j, s) in scores.iter_mut().enumerate() {
        *s = exp(*s - max);
        acc[j % LANES] += *s;
    }
    let inv = 1.0 / reduce(acc);
    out.fill(0.0);
    for (j, &p) in scores.iter().enumerate() {
        for (e, o) in out.iter_mut().enumerate() {
            *o = p.mul_add(a.values.get(j * a.stride + e), *o);
        }
    }
    for o in out.iter_mut() {
        *o *= inv;
    }
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
            positions in 1usize..300,
            extra in 0usize..3,
            seed in any::<u64>(),
            half in any::<bool>(),
        ) {
            let stride = hd * (1 + extra);
            let q = random_values(hd, seed, 1.0);
            let keys16 = f16_bits(&random_values(positions * stride, seed ^ 1, 2.0));
            let values16 = f16_bits(&random_values(positions * stride, seed ^ 2, 1.0));
            let keys32: Vec<f32> = keys16.iter().map(|&b| f16(b)).collect();
            let values32: Vec<f32> = values16.iter().map(|&b| f16(b)).collect();
            let (keys, values) = if half {
                (KvRows::F16(&keys16), KvRows::F16(&values16))
            } else {
                (KvRows::F32(&keys32), KvRows::F32(&values32))
            };
            let a = Attention { q: &q, keys, values, stride, positions, scale: 1.0 / (hd as f32).sqrt() };
            let mut scores = vec![0f32; positions + 5];
            let mut want = vec![0f32; hd];
            attention_with(Isa::Scalar, &a, &mut scores, &mut want);
            // Against a plain f64 softmax.
            let s: Vec<f64> = (0..positions).map(|j| {
                (0..hd).map(|e| f64::from(q[e]) * f64::from(keys32[j * stride + e])).sum::<f64>() * f64::from(a.scale)
            }).collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
            let total: f64 = p.iter().sum();
            for e in 0..hd {
                let exact: f64 = (0..positions).map(|j| p[j] / total * f64::from(values32[j * stride + e])).sum();
                prop_assert!((f64::from(want[e]) - exact).abs() <= 1e-5, "{} vs {}", want[e], exact);
            }
            for isa in Isa::available() {
                let mut got = vec![0f32; hd];
                attention_with(isa, &a, &mut scores, &mut got);
                prop_assert!(got == want, "attention {:?}", isa);
            }
        }
    }
}
