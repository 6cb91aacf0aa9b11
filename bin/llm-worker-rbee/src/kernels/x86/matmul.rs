//! The quantized and dense matrix products (see `kernels::matmul`).

use std::arch::x86_64::*;

use super::super::acts::{ActBlock, BLOCK};
use super::super::matmul::{Input, MAX_TILE_ROWS};
use super::super::packed::{
    Format, GROUP, Q4K_D, Q4K_DMIN, Q4K_MIN, Q4K_SC, Q4K_SUPER_BYTES, Q4SYM_BLOCK_BYTES,
    Q4_BLOCK_BYTES, Q6K_BLOCK_BYTES, Q6K_D, Q6K_SC, Q6K_SUPER_BYTES, Q8_BLOCK_BYTES,
};
use super::super::Isa;
use super::check;

/// Bytes ahead of the weights being read that the bodies prefetch: the
/// streams of a decode step are short (a tile is tens of KB), too short for
/// the hardware prefetcher to reach full speed on its own.
const PREFETCH_AHEAD: usize = 2048;

/// Prefetch the cache lines `PREFETCH_AHEAD` past the `bytes` at `p` into
/// L1 (the address is computed without stepping a pointer out of bounds:
/// a prefetch never faults, whatever it names).
#[inline(always)]
fn prefetch(p: *const u8, bytes: usize) {
    let ahead = p.wrapping_add(PREFETCH_AHEAD);
    for line in (0..bytes).step_by(64) {
        // A prefetch has no architectural effect: it reads nothing
        // into the program and cannot fault, for any address.
        // SAFETY: a prefetch reads nothing and cannot fault.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast()) };
    }
}

/// One group of weights times `out.len()` input rows.
pub(in crate::kernels) fn matmul_group(
    isa: Isa,
    format: Format,
    weights: &[u8],
    k: usize,
    input: Input<'_>,
    out: &mut [[f32; GROUP]],
) {
    check(isa);
    let needed = format.group_bytes(k);
    assert!(weights.len() >= needed);
    let g = weights.as_ptr();
    for (tile, out) in out.chunks_mut(MAX_TILE_ROWS).enumerate() {
        let rows = out.len();
        let o = out.as_mut_ptr();
        match input {
            Input::Dense(x) => {
                assert!(format == Format::F32 && x.len() >= (tile * MAX_TILE_ROWS + rows) * k);
                let x = x[tile * MAX_TILE_ROWS * k..].as_ptr();
                // The CPU has `isa` (checked); the group holds
                // `k * 16` f32 (checked above), `x` holds `rows * k` values
                // from here and `o` points at `rows` outputs.
                // SAFETY: the CPU has `isa` and every range was checked.
                unsafe {
                    match (isa, rows) {
                        (Isa::Avx512, 1) => f32_512::<1>(g, k, x, o),
                        (Isa::Avx512, 2) => f32_512::<2>(g, k, x, o),
                        (Isa::Avx512, 3) => f32_512::<3>(g, k, x, o),
                        (Isa::Avx512, _) => f32_512::<4>(g, k, x, o),
                        (_, 1) => f32_256::<1>(g, k, x, o),
                        (_, 2) => f32_256::<2>(g, k, x, o),
                        (_, 3) => f32_256::<3>(g, k, x, o),
                        (_, _) => f32_256::<4>(g, k, x, o),
                    }
                }
            }
            Input::Quantized(a) => {
                let nb = k / BLOCK;
                assert!(format != Format::F32 && a.len() >= (tile * MAX_TILE_ROWS + rows) * nb);
                let a = a[tile * MAX_TILE_ROWS * nb..].as_ptr();
                // The CPU has `isa`; the group holds the bytes its
                // format needs for `k` (checked above), `a` holds `rows * nb`
                // blocks from here and `o` points at `rows` outputs.
                // SAFETY: the CPU has `isa` and every range was checked.
                unsafe { quantized(isa, format, rows, g, nb, a, o) }
            }
        }
    }
}

/// Dispatch on format, instruction set and tile rows.
///
/// # Safety
/// As [`matmul_group`] checks.
unsafe fn quantized(
    isa: Isa,
    format: Format,
    rows: usize,
    g: *const u8,
    nb: usize,
    a: *const ActBlock,
    o: *mut [f32; GROUP],
) {
    macro_rules! by_rows {
        ($f:ident $(, $extra:expr)?) => {
            match rows {
                1 => $f::<1 $(, $extra)?>(g, nb, a, o),
                2 => $f::<2 $(, $extra)?>(g, nb, a, o),
                3 => $f::<3 $(, $extra)?>(g, nb, a, o),
                _ => $f::<4 $(, $extra)?>(g, nb, a, o),
            }
        };
    }
    // SAFETY: the caller's guarantees are the bodies' requirements.
    unsafe {
        match (isa, format) {
            (Isa::Avx512, Format::Q4) => by_rows!(q4_512, true),
            (Isa::Avx512, Format::Q4Sym) => by_rows!(q4_512, false),
            (Isa::Avx512, Format::Q8) => by_rows!(q8_512),
            (Isa::Avx512, Format::Q4K) => by_rows!(q4k_512),
            (Isa::Avx512, Format::Q6K) => by_rows!(q6k_512),
            (_, Format::Q4) => by_rows!(q4_256, true),
            (_, Format::Q4Sym) => by_rows!(q4_256, false),
            (_, Format::Q8) => by_rows!(q8_256),
            (_, Format::Q4K) => by_rows!(q4k_256),
            (_, Format::Q6K) => by_rows!(q6k_256),
            (_, Format::F32) => unreachable!("dense weights take dense input"),
        }
    }
}

/// The 8 activation words of a block, each broadcast as 4 bytes.
macro_rules! act_word {
    ($act:expr, $t:expr) => {
        $act.qs.as_ptr().cast::<i32>().add($t).read_unaligned()
    };
}

/// Unpack 4 vectors of nibbles (at `$blk`) into U0..U7.
macro_rules! unpack_q4_512 {
    ($blk:expr, $mask:expr) => {{
        let p0 = _mm512_loadu_si512($blk.cast());
        let p1 = _mm512_loadu_si512($blk.add(64).cast());
        let p2 = _mm512_loadu_si512($blk.add(128).cast());
        let p3 = _mm512_loadu_si512($blk.add(192).cast());
        [
            _mm512_and_si512(p0, $mask),
            _mm512_and_si512(p1, $mask),
            _mm512_and_si512(p2, $mask),
            _mm512_and_si512(p3, $mask),
            _mm512_and_si512(_mm512_srli_epi16::<4>(p0), $mask),
            _mm512_and_si512(_mm512_srli_epi16::<4>(p1), $mask),
            _mm512_and_si512(_mm512_srli_epi16::<4>(p2), $mask),
            _mm512_and_si512(_mm512_srli_epi16::<4>(p3), $mask),
        ]
    }};
}

/// Sum over U`$from..$to` of `vpdpbusd` against the block's activations.
macro_rules! dot_512 {
    ($u:expr, $act:expr, $from:expr, $to:expr) => {{
        let mut acc = _mm512_setzero_si512();
        for t in $from..$to {
            acc = _mm512_dpbusd_epi32(acc, $u[t], _mm512_set1_epi32(act_word!($act, t)));
        }
        acc
    }};
}

/// Q4 (`MIN`: a minimum per block) or Q4Sym (an offset of 8).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_512<const MR: usize, const MIN: bool>(
    g: *const u8,
    nb: usize,
    a: *const ActBlock,
    o: *mut [f32; GROUP],
) {
    // SAFETY: reads stay inside the group and the rows' blocks (see `quantized`).
    unsafe {
        let size = if MIN {
            Q4_BLOCK_BYTES
        } else {
            Q4SYM_BLOCK_BYTES
        };
        let mask = _mm512_set1_epi8(0x0F);
        let mut f = [_mm512_setzero_ps(); MR];
        for b in 0..nb {
            let blk = g.add(b * size);
            prefetch(blk, size);
            let u = unpack_q4_512!(blk, mask);
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(256).cast()));
            for (i, f) in f.iter_mut().enumerate() {
                let act = &*a.add(i * nb + b);
                let acc = dot_512!(u, act, 0, 8);
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(act.d));
                if MIN {
                    let mw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(288).cast()));
                    *f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), scale, *f);
                    *f = _mm512_fmadd_ps(mw, _mm512_set1_ps(act.s), *f);
                } else {
                    // The weights are offset by 8: take 8 * sum(a) back off.
                    let offset = _mm512_set1_epi32(8 * (act.sum_lo + act.sum_hi));
                    let acc = _mm512_sub_epi32(acc, offset);
                    *f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), scale, *f);
                }
            }
        }
        for (i, f) in f.iter().enumerate() {
            _mm512_storeu_ps((*o.add(i)).as_mut_ptr(), *f);
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q8_512<const MR: usize>(
    g: *const u8,
    nb: usize,
    a: *const ActBlock,
    o: *mut [f32; GROUP],
) {
    // SAFETY: reads stay inside the group and the rows' blocks (see `quantized`).
    unsafe {
        let mut f = [_mm512_setzero_ps(); MR];
        for b in 0..nb {
            let blk = g.add(b * Q8_BLOCK_BYTES);
            prefetch(blk, Q8_BLOCK_BYTES);
            let mut u = [_mm512_setzero_si512(); 8];
            for (t, u) in u.iter_mut().enumerate() {
                *u = _mm512_loadu_si512(blk.add(64 * t).cast());
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(512).cast()));
            for (i, f) in f.iter_mut().enumerate() {
                let act = &*a.add(i * nb + b);
                let acc = dot_512!(u, act, 0, 8);
                // The weights are biased by 128: take 128 * sum(a) back off.
                let acc = _mm512_sub_epi32(acc, _mm512_set1_epi32(128 * (act.sum_lo + act.sum_hi)));
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(act.d));
                *f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), scale, *f);
            }
        }
        for (i, f) in f.iter().enumerate() {
            _mm512_storeu_ps((*o.add(i)).as_mut_ptr(), *f);
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4k_512<const MR: usize>(
    g: *const u8,
    nb: usize,
    a: *const ActBlock,
    o: *mut [f32; GROUP],
) {
    // SAFETY: reads stay inside the group and the rows' blocks (see `quantized`).
    unsafe {
        let mask = _mm512_set1_epi8(0x0F);
        let mut f = [_mm512_setzero_ps(); MR];
        for sb in 0..nb / 8 {
            let sup = g.add(sb * Q4K_SUPER_BYTES);
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(sup.add(Q4K_D).cast()));
            let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(sup.add(Q4K_DMIN).cast()));
            for s in 0..8 {
                let u = unpack_q4_512!(sup.add(s * 256), mask);
                let sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                    sup.add(Q4K_SC + s * GROUP).cast(),
                )));
                let mn = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                    sup.add(Q4K_MIN + s * GROUP).cast(),
                )));
                let d_eff = _mm512_mul_ps(d, sc);
                let m_eff = _mm512_mul_ps(dmin, mn);
                for (i, f) in f.iter_mut().enumerate() {
                    let act = &*a.add(i * nb + sb * 8 + s);
                    let acc = dot_512!(u, act, 0, 8);
                    let scale = _mm512_mul_ps(d_eff, _mm512_set1_ps(act.d));
                    *f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), scale, *f);
                    *f = _mm512_fnmadd_ps(m_eff, _mm512_set1_ps(act.s), *f);
                }
            }
        }
        for (i, f) in f.iter().enumerate() {
            _mm512_storeu_ps((*o.add(i)).as_mut_ptr(), *f);
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q6k_512<const MR: usize>(
    g: *const u8,
    nb: usize,
    a: *const ActBlock,
    o: *mut [f32; GROUP],
) {
    // SAFETY: reads stay inside the group and the rows' blocks (see `quantized`).
    unsafe {
        let mask = _mm512_set1_epi8(0x0F);
        let high = _mm512_set1_epi8(0x30);
        let mut f = [_mm512_setzero_ps(); MR];
        for sb in 0..nb / 8 {
            let sup = g.add(sb * Q6K_SUPER_BYTES);
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(sup.add(Q6K_D).cast()));
            for b in 0..8 {
                let blk = sup.add(b * Q6K_BLOCK_BYTES);
                let lo = unpack_q4_512!(blk, mask);
                let h0 = _mm512_loadu_si512(blk.add(256).cast());
                let h1 = _mm512_loadu_si512(blk.add(320).cast());
                // Bits 2c..2c+2 of the high vectors, moved to bits 4..6.
                let hi = [
                    _mm512_and_si512(_mm512_slli_epi16::<4>(h0), high),
                    _mm512_and_si512(_mm512_slli_epi16::<2>(h0), high),
                    _mm512_and_si512(h0, high),
                    _mm512_and_si512(_mm512_srli_epi16::<2>(h0), high),
                    _mm512_and_si512(_mm512_slli_epi16::<4>(h1), high),
                    _mm512_and_si512(_mm512_slli_epi16::<2>(h1), high),
                    _mm512_and_si512(h1, high),
                    _mm512_and_si512(_mm512_srli_epi16::<2>(h1), high),
                ];
                let mut u = [_mm512_setzero_si512(); 8];
                for t in 0..8 {
                    u[t] = _mm512_or_si512(lo[t], hi[t]);
                }
                let sc_lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    sup.add(Q6K_SC + 2 * b * GROUP).cast(),
                )));
                let sc_hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    sup.add(Q6K_SC + (2 * b + 1) * GROUP).cast(),
                )));
                let d_lo = _mm512_mul_ps(d, sc_lo);
                let d_hi = _mm512_mul_ps(d, sc_hi);
                for (i, f) in f.iter_mut().enumerate() {
                    let act = &*a.add(i * nb + sb * 8 + b);
                    let acc_lo = dot_512!(u, act, 0, 4);
                    let acc_hi = dot_512!(u, act, 4, 8);
                    let acc_lo = _mm512_sub_epi32(acc_lo, _mm512_set1_epi32(32 * act.sum_lo));
                    let acc_hi = _mm512_sub_epi32(acc_hi, _mm512_set1_epi32(32 * act.sum_hi));
                    let da = _mm512_set1_ps(act.d);
                    *f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc_lo), _mm512_mul_ps(d_lo, da), *f);
                    *f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc_hi), _mm512_mul_ps(d_hi, da), *f);
                }
            }
        }
        for (i, f) in f.iter().enumerate() {
            _mm512_storeu_ps((*o.add(i)).as_mut_ptr(), *f);
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn f32_512<const MR: usize>(g: *const u8, k: usize, x: *const f32, o: *mut [f32; GROUP]) {
    // SAFETY: the group holds `k` vectors of 16 f32; `x` holds MR rows of `k`.
    unsafe {
        let w = g.cast::<f32>();
        let mut f = [_mm512_setzero_ps(); MR];
        for kk in 0..k {
            let wv = _mm512_loadu_ps(w.add(kk * GROUP));
            for (i, f) in f.iter_mut().enumerate() {
                *f = _mm512_fmadd_ps(wv, _mm512_set1_ps(*x.add(i * k + kk)), *f);
            }
        }
        for (i, f) in f.iter().enumerate() {
            _mm512_storeu_ps((*o.add(i)).as_mut_ptr(), *f);
        }
    }
}

/// AVX2 has no `vpdpbusd`: `vpmaddubsw` (pairs, exact here) then
/// `vpmaddwd` by ones gives the same 4-byte sums per 32-bit lane.
macro_rules! dot_256 {
    ($u:expr, $act:expr, $from:expr, $to:expr, $ones:expr) => {{
        let mut acc = _mm256_setzero_si256();
        for t in $from..$to {
            let pairs = _mm256_maddubs_epi16($u[t], _mm256_set1_epi32(act_word!($act, t)));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, $ones));
        }
        acc
    }};
}

/// Half `$h` (rows 0..8 or 8..16) of 4 vectors of nibbles into U0..U7.
macro_rules! unpack_q4_256 {
    ($blk:expr, $h:expr, $mask:expr) => {{
        let p0 = _mm256_loadu_si256($blk.add($h * 32).cast());
        let p1 = _mm256_loadu_si256($blk.add(64 + $h * 32).cast());
        let p2 = _mm256_loadu_si256($blk.add(128 + $h * 32).cast());
        let p3 = _mm256_loadu_si256($blk.add(192 + $h * 32).cast());
        [
            _mm256_and_si256(p0, $mask),
            _mm256_and_si256(p1, $mask),
            _mm256_and_si256(p2, $mask),
            _mm256_and_si256(p3, $mask),
            _mm256_and_si256(_mm256_srli_epi16::<4>(p0), $mask),
            _mm256_and_si256(_mm256_srli_epi16::<4>(p1), $mask),
            _mm256_and_si256(_mm256_srli_epi16::<4>(p2), $mask),
            _mm256_and_si256(_mm256_srli_epi16::<4>(p3), $mask),
        ]
    }};
}

/// Store half `$h` of each row's 16 outputs.
macro_rules! store_half {
    ($f:expr, $o:expr, $h:expr) => {
        for (i, f) in $f.iter().enumerate() {
            _mm256_storeu_ps((*$o.add(i)).as_mut_ptr().add($h * 8), *f);
        }
    };
}

/// Q4 (`MIN`: a minimum per block) or Q4Sym (an offset of 8).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_256<const MR: usize, const MIN: bool>(
    g: *const u8,
    nb: usize,
    a: *const ActBlock,
    o: *mut [f32; GROUP],
) {
    // SAFETY: reads stay inside the group and the rows' blocks (see `quantized`).
    unsafe {
        let size = if MIN {
            Q4_BLOCK_BYTES
        } else {
            Q4SYM_BLOCK_BYTES
        };
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        for h in 0..2 {
            let mut f = [_mm256_setzero_ps(); MR];
            for b in 0..nb {
                let blk = g.add(b * size);
                let u = unpack_q4_256!(blk, h, mask);
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(256 + h * 16).cast()));
                for (i, f) in f.iter_mut().enumerate() {
                    let act = &*a.add(i * nb + b);
                    let acc = dot_256!(u, act, 0, 8, ones);
                    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(act.d));
                    if MIN {
                        let mw = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(288 + h * 16).cast()));
                        *f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), scale, *f);
                        *f = _mm256_fmadd_ps(mw, _mm256_set1_ps(act.s), *f);
                    } else {
                        let offset = _mm256_set1_epi32(8 * (act.sum_lo + act.sum_hi));
                        let acc = _mm256_sub_epi32(acc, offset);
                        *f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), scale, *f);
                    }
                }
            }
            store_half!(f, o, h);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_256<const MR: usize>(
    g: *const u8,
    nb: usize,
    a: *const ActBlock,
    o: *mut [f32; GROUP],
) {
    // SAFETY: reads stay inside the group and the rows' blocks (see `quantized`).
    unsafe {
        let bias = _mm256_set1_epi8(-128);
        let ones = _mm256_set1_epi16(1);
        for h in 0..2 {
            let mut f = [_mm256_setzero_ps(); MR];
            for b in 0..nb {
                let blk = g.add(b * Q8_BLOCK_BYTES);
                let mut w = [_mm256_setzero_si256(); 8];
                for (t, w) in w.iter_mut().enumerate() {
                    *w =
                        _mm256_xor_si256(_mm256_loadu_si256(blk.add(64 * t + 32 * h).cast()), bias);
                }
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(512 + h * 16).cast()));
                for (i, f) in f.iter_mut().enumerate() {
                    let act = &*a.add(i * nb + b);
                    let mut acc = _mm256_setzero_si256();
                    for (t, &w) in w.iter().enumerate() {
                        // |w| times a with w's sign: signed bytes through the
                        // unsigned-by-signed multiply, with no saturation.
                        let av = _mm256_sign_epi8(_mm256_set1_epi32(act_word!(act, t)), w);
                        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), av);
                        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
                    }
                    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(act.d));
                    *f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), scale, *f);
                }
            }
            store_half!(f, o, h);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_256<const MR: usize>(
    g: *const u8,
    nb: usize,
    a: *const ActBlock,
    o: *mut [f32; GROUP],
) {
    // SAFETY: reads stay inside the group and the rows' blocks (see `quantized`).
    unsafe {
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        for h in 0..2 {
            let mut f = [_mm256_setzero_ps(); MR];
            for sb in 0..nb / 8 {
                let sup = g.add(sb * Q4K_SUPER_BYTES);
                let d = _mm256_cvtph_ps(_mm_loadu_si128(sup.add(Q4K_D + h * 16).cast()));
                let dmin = _mm256_cvtph_ps(_mm_loadu_si128(sup.add(Q4K_DMIN + h * 16).cast()));
                for s in 0..8 {
                    let u = unpack_q4_256!(sup.add(s * 256), h, mask);
                    let sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                        sup.add(Q4K_SC + s * GROUP + h * 8).cast(),
                    )));
                    let mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                        sup.add(Q4K_MIN + s * GROUP + h * 8).cast(),
                    )));
                    let d_eff = _mm256_mul_ps(d, sc);
                    let m_eff = _mm256_mul_ps(dmin, mn);
                    for (i, f) in f.iter_mut().enumerate() {
                        let act = &*a.add(i * nb + sb * 8 + s);
                        let acc = dot_256!(u, act, 0, 8, ones);
                        let scale = _mm256_mul_ps(d_eff, _mm256_set1_ps(act.d));
                        *f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), scale, *f);
                        *f = _mm256_fnmadd_ps(m_eff, _mm256_set1_ps(act.s), *f);
                    }
                }
            }
            store_half!(f, o, h);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_256<const MR: usize>(
    g: *const u8,
    nb: usize,
    a: *const ActBlock,
    o: *mut [f32; GROUP],
) {
    // SAFETY: reads stay inside the group and the rows' blocks (see `quantized`).
    unsafe {
        let mask = _mm256_set1_epi8(0x0F);
        let high = _mm256_set1_epi8(0x30);
        let ones = _mm256_set1_epi16(1);
        for h in 0..2 {
            let mut f = [_mm256_setzero_ps(); MR];
            for sb in 0..nb / 8 {
                let sup = g.add(sb * Q6K_SUPER_BYTES);
                let d = _mm256_cvtph_ps(_mm_loadu_si128(sup.add(Q6K_D + h * 16).cast()));
                for b in 0..8 {
                    let blk = sup.add(b * Q6K_BLOCK_BYTES);
                    let lo = unpack_q4_256!(blk, h, mask);
                    let h0 = _mm256_loadu_si256(blk.add(256 + h * 32).cast());
                    let h1 = _mm256_loadu_si256(blk.add(320 + h * 32).cast());
                    let hi = [
                        _mm256_and_si256(_mm256_slli_epi16::<4>(h0), high),
                        _mm256_and_si256(_mm256_slli_epi16::<2>(h0), high),
                        _mm256_and_si256(h0, high),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(h0), high),
                        _mm256_and_si256(_mm256_slli_epi16::<4>(h1), high),
                        _mm256_and_si256(_mm256_slli_epi16::<2>(h1), high),
                        _mm256_and_si256(h1, high),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(h1), high),
                    ];
                    let mut u = [_mm256_setzero_si256(); 8];
                    for t in 0..8 {
                        u[t] = _mm256_or_si256(lo[t], hi[t]);
                    }
                    let sc_lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                        sup.add(Q6K_SC + 2 * b * GROUP + h * 8).cast(),
                    )));
                    let sc_hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                        sup.add(Q6K_SC + (2 * b + 1) * GROUP + h * 8).cast(),
                    )));
                    let d_lo = _mm256_mul_ps(d, sc_lo);
                    let d_hi = _mm256_mul_ps(d, sc_hi);
                    for (i, f) in f.iter_mut().enumerate() {
                        let act = &*a.add(i * nb + sb * 8 + b);
                        let acc_lo = dot_256!(u, act, 0, 4, ones);
                        let acc_hi = dot_256!(u, act, 4, 8, ones);
                        let acc_lo = _mm256_sub_epi32(acc_lo, _mm256_set1_epi32(32 * act.sum_lo));
                        let acc_hi = _mm256_sub_epi32(acc_hi, _mm256_set1_epi32(32 * act.sum_hi));
                        let da = _mm256_set1_ps(act.d);
                        *f = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(acc_lo),
                            _mm256_mul_ps(d_lo, da),
                            *f,
                        );
                        *f = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(acc_hi),
                            _mm256_mul_ps(d_hi, da),
                            *f,
                        );
                    }
                }
            }
            store_half!(f, o, h);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_256<const MR: usize>(g: *const u8, k: usize, x: *const f32, o: *mut [f32; GROUP]) {
    // SAFETY: the group holds `k` vectors of 16 f32; `x` holds MR rows of `k`.
    unsafe {
        let w = g.cast::<f32>();
        let mut lo = [_mm256_setzero_ps(); MR];
        let mut hi = [_mm256_setzero_ps(); MR];
        for kk in 0..k {
            let w0 = _mm256_loadu_ps(w.add(kk * GROUP));
            let w1 = _mm256_loadu_ps(w.add(kk * GROUP + 8));
            for i in 0..MR {
                let xv = _mm256_set1_ps(*x.add(i * k + kk));
                lo[i] = _mm256_fmadd_ps(w0, xv, lo[i]);
                hi[i] = _mm256_fmadd_ps(w1, xv, hi[i]);
            }
        }
        store_half!(lo, o, 0);
        store_half!(hi, o, 1);
    }
}
