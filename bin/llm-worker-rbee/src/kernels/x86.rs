//! AVX2 and AVX-512 bodies of the kernels, x86-64 only.
//!
//! Each public function checks that the CPU has the instruction set and
//! that every slice holds what the body will read or write, then calls a
//! `#[target_feature]` body. The bodies mirror the scalar references
//! operation for operation (see the parent module).

use std::arch::x86_64::*;

use super::acts::{finish_block, inverse, ActBlock, BLOCK};
use super::math::{Attention, KvRows, EXP_P, KEY_BLOCK, LANES, LN2_HI, LN2_LO};
use super::matmul::{Input, MAX_TILE_ROWS};
use super::packed::{
    Format, GROUP, Q4K_D, Q4K_DMIN, Q4K_MIN, Q4K_SC, Q4K_SUPER_BYTES, Q4SYM_BLOCK_BYTES,
    Q4_BLOCK_BYTES, Q6K_BLOCK_BYTES, Q6K_D, Q6K_SC, Q6K_SUPER_BYTES, Q8_BLOCK_BYTES,
};
use super::Isa;

fn check(isa: Isa) {
    assert!(
        isa != Isa::Scalar && isa.supported(),
        "{isa:?} is not supported here"
    );
}

// ---------------------------------------------------------------- matmul

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
        // SAFETY: a prefetch has no architectural effect: it reads nothing
        // into the program and cannot fault, for any address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast()) };
    }
}

/// Prefetch the line at `p` into L1 (never faults, whatever it names).
#[inline(always)]
fn prefetch_line(p: *const u8) {
    // SAFETY: a prefetch has no architectural effect and cannot fault.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) };
}

/// One group of weights times `out.len()` input rows.
pub(super) fn matmul_group(
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
                // SAFETY: the CPU has `isa` (checked); the group holds
                // `k * 16` f32 (checked above), `x` holds `rows * k` values
                // from here and `o` points at `rows` outputs.
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
                // SAFETY: the CPU has `isa`; the group holds the bytes its
                // format needs for `k` (checked above), `a` holds `rows * nb`
                // blocks from here and `o` points at `rows` outputs.
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

// ---------------------------------------------------------- activations

/// Quantize `x` into `out` (lengths checked by the caller).
pub(super) fn quantize_row(isa: Isa, x: &[f32], out: &mut [ActBlock]) {
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

// ---------------------------------------------------------- element-wise

/// Lanes 0..8 and 8..16 of a fixed-order sum, added pairwise.
#[target_feature(enable = "avx2,fma,f16c")]
fn reduce_256(lo: __m256, hi: __m256) -> f32 {
    let s8 = _mm256_add_ps(lo, hi);
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn reduce_512(acc: __m512) -> f32 {
    reduce_256(
        _mm512_castps512_ps256(acc),
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc))),
    )
}

/// A mask of the first `n` (< 8) 32-bit lanes, for AVX2 masked loads.
#[target_feature(enable = "avx2,fma,f16c")]
fn mask_256(n: usize) -> __m256i {
    let n = n.min(8) as i32;
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// The fixed-order sum of squares of `x`.
pub(super) fn sum_squares(isa: Isa, x: &[f32]) -> f32 {
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
fn exp_256(x: __m256) -> __m256 {
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
fn exp_512(x: __m512) -> __m512 {
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
pub(super) fn silu_mul(isa: Isa, gate: &[f32], up: &[f32], out: &mut [f32]) {
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
        out[i] = gate[i] / (1.0 + super::math::exp(-gate[i])) * up[i];
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

// ------------------------------------------------------------ attention

/// Query vectors a score or weighted-value body takes at once.
const VECTORS: usize = 6;

/// Partial attention of the query rows and heads sharing one key/value
/// head; `head_dim` is a multiple of 16 and the slices were checked by the
/// caller.
pub(super) fn attention(isa: Isa, a: &Attention<'_>, scores: &mut [f32], part: &mut [f32]) {
    check(isa);
    let (hd, np, heads, rows) = (a.head_dim, a.padded(), a.heads, a.positions.len());
    let vectors = a.vectors();
    let len = heads * (hd + 2);
    assert!(hd.is_multiple_of(LANES) && part.len() == rows * len);
    assert!(a.q_stride >= heads * hd && a.q.len() >= (rows - 1) * a.q_stride + heads * hd);
    assert!(scores.len() >= vectors * np);
    assert!(a.keys.len() >= np * hd && a.values.len() >= a.longest() * hd);
    let blocks = np / KEY_BLOCK;
    // Vector `v` is head `v % heads` of row `v / heads`.
    let query = |v: usize| a.q[(v / heads) * a.q_stride + (v % heads) * hd..].as_ptr();
    // One pointer into the scores for the whole loop, offsets from it.
    let base = scores.as_mut_ptr();
    for v0 in (0..vectors).step_by(VECTORS) {
        let n = (vectors - v0).min(VECTORS);
        let mut qs = [std::ptr::null::<f32>(); VECTORS];
        let mut ss = [std::ptr::null_mut::<f32>(); VECTORS];
        for k in 0..n {
            qs[k] = query(v0 + k);
            ss[k] = base.wrapping_add((v0 + k) * np);
        }
        // SAFETY: the CPU has `isa`; the first `n` pointers name query
        // vectors of `hd` and score rows of `np` inside their slices, and
        // the `blocks` key blocks of `hd * 16` elements are inside the keys
        // (checked above).
        unsafe {
            macro_rules! run {
                ($f:ident, $k:expr) => {
                    match n {
                        1 => $f::<1>(&qs, hd, $k, blocks, a.scale, &ss),
                        2 => $f::<2>(&qs, hd, $k, blocks, a.scale, &ss),
                        3 => $f::<3>(&qs, hd, $k, blocks, a.scale, &ss),
                        4 => $f::<4>(&qs, hd, $k, blocks, a.scale, &ss),
                        5 => $f::<5>(&qs, hd, $k, blocks, a.scale, &ss),
                        _ => $f::<6>(&qs, hd, $k, blocks, a.scale, &ss),
                    }
                };
            }
            match (isa, a.keys) {
                (Isa::Avx512, KvRows::F32(k)) => run!(scores_512_f32, k.as_ptr()),
                (Isa::Avx512, KvRows::F16(k)) => run!(scores_512_f16, k.as_ptr()),
                (_, KvRows::F32(k)) => run!(scores_256_f32, k.as_ptr()),
                (_, KvRows::F16(k)) => run!(scores_256_f16, k.as_ptr()),
            }
        }
    }
    for v in 0..vectors {
        let (r, g) = (v / heads, v % heads);
        let n = a.positions[r];
        let row = &mut scores[v * np..(v + 1) * np];
        // SAFETY: as above; this vector's first `n` scores.
        let (max, sum) = unsafe {
            if isa == Isa::Avx512 {
                softmax_512(row.as_mut_ptr(), n)
            } else {
                softmax_256(row.as_mut_ptr(), n)
            }
        };
        // Past its own positions a row weighs nothing: adding 0 * v keeps
        // its sums exactly as if it stopped there.
        row[n..].fill(0.0);
        let stats = &mut part[r * len + heads * hd..(r + 1) * len];
        stats[g] = max;
        stats[heads + g] = sum;
    }
    let (scores, outs) = (scores.as_ptr(), part.as_mut_ptr());
    for v0 in (0..vectors).step_by(VECTORS) {
        let n = (vectors - v0).min(VECTORS);
        let mut ps = [std::ptr::null::<f32>(); VECTORS];
        let mut os = [std::ptr::null_mut::<f32>(); VECTORS];
        let mut positions = 0;
        for k in 0..n {
            let v = v0 + k;
            ps[k] = scores.wrapping_add(v * np);
            os[k] = outs.wrapping_add((v / heads) * len + (v % heads) * hd);
            positions = positions.max(a.positions[v / heads]);
        }
        // SAFETY: as above; the first `n` pointers name probability rows
        // of at least `positions` values (zero past each row's own) and
        // output rows of `hd` inside `part`, distinct per vector.
        unsafe {
            macro_rules! run {
                ($f:ident, $v:expr) => {
                    match n {
                        1 => $f::<1>(&ps, $v, hd, positions, &os),
                        2 => $f::<2>(&ps, $v, hd, positions, &os),
                        3 => $f::<3>(&ps, $v, hd, positions, &os),
                        4 => $f::<4>(&ps, $v, hd, positions, &os),
                        5 => $f::<5>(&ps, $v, hd, positions, &os),
                        _ => $f::<6>(&ps, $v, hd, positions, &os),
                    }
                };
            }
            match (isa, a.values) {
                (Isa::Avx512, KvRows::F32(v)) => run!(weighted_512_f32, v.as_ptr()),
                (Isa::Avx512, KvRows::F16(v)) => run!(weighted_512_f16, v.as_ptr()),
                (_, KvRows::F32(v)) => run!(weighted_256_f32, v.as_ptr()),
                (_, KvRows::F16(v)) => run!(weighted_256_f16, v.as_ptr()),
            }
        }
    }
}

/// 16 cached elements as f32.
macro_rules! load16_f32 {
    ($p:expr) => {
        _mm512_loadu_ps($p)
    };
}
macro_rules! load16_f16 {
    ($p:expr) => {
        _mm512_cvtph_ps(_mm256_loadu_si256($p.cast()))
    };
}
/// 8 cached elements as f32.
macro_rules! load8_f32 {
    ($p:expr) => {
        _mm256_loadu_ps($p)
    };
}
macro_rules! load8_f16 {
    ($p:expr) => {
        _mm256_cvtph_ps(_mm_loadu_si128($p.cast()))
    };
}

/// The AVX-512 score and weighted-value bodies for one cache element type.
macro_rules! attention_512 {
    ($scores:ident, $weighted:ident, $t:ty, $load:ident) => {
        /// The scores of `NV` query vectors, 16 positions per key block, two
        /// blocks at a time (each score is a chain of dependent FMAs, so
        /// more chains in flight keep the units busy).
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn $scores<const NV: usize>(
            q: &[*const f32; VECTORS],
            hd: usize,
            keys: *const $t,
            blocks: usize,
            scale: f32,
            scores: &[*mut f32; VECTORS],
        ) {
            // SAFETY: see `attention`.
            unsafe {
                let scale = _mm512_set1_ps(scale);
                let mut b = 0;
                while b < blocks {
                    let two = b + 1 < blocks;
                    let k0 = keys.add(b * hd * KEY_BLOCK);
                    let k1 = if two { k0.add(hd * KEY_BLOCK) } else { k0 };
                    let mut a0 = [_mm512_setzero_ps(); NV];
                    let mut a1 = [_mm512_setzero_ps(); NV];
                    for e in 0..hd {
                        prefetch_line(
                            k0.add(e * KEY_BLOCK)
                                .wrapping_add(2 * hd * KEY_BLOCK)
                                .cast(),
                        );
                        let kv0 = $load!(k0.add(e * KEY_BLOCK));
                        let kv1 = $load!(k1.add(e * KEY_BLOCK));
                        for v in 0..NV {
                            let qe = _mm512_set1_ps(*q[v].add(e));
                            a0[v] = _mm512_fmadd_ps(qe, kv0, a0[v]);
                            a1[v] = _mm512_fmadd_ps(qe, kv1, a1[v]);
                        }
                    }
                    for v in 0..NV {
                        let at = scores[v].add(b * KEY_BLOCK);
                        _mm512_storeu_ps(at, _mm512_mul_ps(a0[v], scale));
                        if two {
                            _mm512_storeu_ps(at.add(KEY_BLOCK), _mm512_mul_ps(a1[v], scale));
                        }
                    }
                    b += 2;
                }
            }
        }

        /// `out[v] = sum_j p[v][j] v_j` for `NV` vectors, in column slices
        /// of 64 so the accumulators stay in registers.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn $weighted<const NV: usize>(
            p: &[*const f32; VECTORS],
            values: *const $t,
            hd: usize,
            positions: usize,
            out: &[*mut f32; VECTORS],
        ) {
            // SAFETY: see `attention`.
            unsafe {
                for d0 in (0..hd).step_by(4 * LANES) {
                    let chunks = ((hd - d0) / LANES).min(4);
                    let mut acc = [[_mm512_setzero_ps(); 4]; NV];
                    for j in 0..positions {
                        let row = values.add(j * hd + d0);
                        prefetch_line(row.wrapping_add(8 * hd).cast());
                        for c in 0..chunks {
                            let vv = $load!(row.add(c * LANES));
                            for v in 0..NV {
                                acc[v][c] =
                                    _mm512_fmadd_ps(_mm512_set1_ps(*p[v].add(j)), vv, acc[v][c]);
                            }
                        }
                    }
                    for v in 0..NV {
                        for c in 0..chunks {
                            _mm512_storeu_ps(out[v].add(d0 + c * LANES), acc[v][c]);
                        }
                    }
                }
            }
        }
    };
}

/// The AVX2 score and weighted-value bodies for one cache element type.
macro_rules! attention_256 {
    ($scores:ident, $weighted:ident, $t:ty, $load:ident) => {
        /// As the AVX-512 body, positions 0..8 and 8..16 of a block in two registers.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $scores<const NV: usize>(
            q: &[*const f32; VECTORS],
            hd: usize,
            keys: *const $t,
            blocks: usize,
            scale: f32,
            scores: &[*mut f32; VECTORS],
        ) {
            // SAFETY: see `attention`.
            unsafe {
                let scale = _mm256_set1_ps(scale);
                for b in 0..blocks {
                    let kb = keys.add(b * hd * KEY_BLOCK);
                    let mut lo = [_mm256_setzero_ps(); NV];
                    let mut hi = [_mm256_setzero_ps(); NV];
                    for e in 0..hd {
                        let k0 = $load!(kb.add(e * KEY_BLOCK));
                        let k1 = $load!(kb.add(e * KEY_BLOCK + 8));
                        for v in 0..NV {
                            let qe = _mm256_set1_ps(*q[v].add(e));
                            lo[v] = _mm256_fmadd_ps(qe, k0, lo[v]);
                            hi[v] = _mm256_fmadd_ps(qe, k1, hi[v]);
                        }
                    }
                    for v in 0..NV {
                        let at = scores[v].add(b * KEY_BLOCK);
                        _mm256_storeu_ps(at, _mm256_mul_ps(lo[v], scale));
                        _mm256_storeu_ps(at.add(8), _mm256_mul_ps(hi[v], scale));
                    }
                }
            }
        }

        /// As the AVX-512 body, column slices of 16.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $weighted<const NV: usize>(
            p: &[*const f32; VECTORS],
            values: *const $t,
            hd: usize,
            positions: usize,
            out: &[*mut f32; VECTORS],
        ) {
            // SAFETY: see `attention`.
            unsafe {
                for d0 in (0..hd).step_by(16) {
                    let mut acc = [[_mm256_setzero_ps(); 2]; NV];
                    for j in 0..positions {
                        let row = values.add(j * hd + d0);
                        let v0 = $load!(row);
                        let v1 = $load!(row.add(8));
                        for v in 0..NV {
                            let pj = _mm256_set1_ps(*p[v].add(j));
                            acc[v][0] = _mm256_fmadd_ps(pj, v0, acc[v][0]);
                            acc[v][1] = _mm256_fmadd_ps(pj, v1, acc[v][1]);
                        }
                    }
                    for v in 0..NV {
                        _mm256_storeu_ps(out[v].add(d0), acc[v][0]);
                        _mm256_storeu_ps(out[v].add(d0 + 8), acc[v][1]);
                    }
                }
            }
        }
    };
}

attention_512!(scores_512_f32, weighted_512_f32, f32, load16_f32);
attention_512!(scores_512_f16, weighted_512_f16, u16, load16_f16);
attention_256!(scores_256_f32, weighted_256_f32, f32, load8_f32);
attention_256!(scores_256_f16, weighted_256_f16, u16, load8_f16);

/// `math::softmax_in_place` on the `n` scores at `s`: the maximum, then
/// `exp(s - max)` in place and their sum; the last partial vector is
/// masked, so every score takes the vector path.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn softmax_512(s: *mut f32, n: usize) -> (f32, f32) {
    // SAFETY: `n` scores at `s`; the tail accesses are masked to them.
    unsafe {
        let full = n / LANES * LANES;
        let tail: u16 = ((1u32 << (n - full)) - 1) as u16;
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        for j in (0..full).step_by(LANES) {
            m = _mm512_max_ps(m, _mm512_loadu_ps(s.add(j)));
        }
        if tail != 0 {
            m = _mm512_mask_max_ps(m, tail, m, _mm512_maskz_loadu_ps(tail, s.add(full)));
        }
        let top = _mm512_reduce_max_ps(m);
        let max = _mm512_set1_ps(top);
        let mut acc = _mm512_setzero_ps();
        for j in (0..full).step_by(LANES) {
            let e = exp_512(_mm512_sub_ps(_mm512_loadu_ps(s.add(j)), max));
            _mm512_storeu_ps(s.add(j), e);
            acc = _mm512_add_ps(acc, e);
        }
        if tail != 0 {
            let e = exp_512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s.add(full)), max));
            _mm512_mask_storeu_ps(s.add(full), tail, e);
            acc = _mm512_mask_add_ps(acc, tail, acc, e);
        }
        (top, reduce_512(acc))
    }
}

/// [`softmax_512`] on 8-lane halves.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn softmax_256(s: *mut f32, n: usize) -> (f32, f32) {
    // SAFETY: `n` scores at `s`; the tail accesses are masked to them.
    unsafe {
        let full = n / LANES * LANES;
        let rest = n - full;
        let (mask_lo, mask_hi) = (mask_256(rest), mask_256(rest.saturating_sub(8)));
        let neg = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut m = neg;
        for j in (0..full).step_by(8) {
            m = _mm256_max_ps(m, _mm256_loadu_ps(s.add(j)));
        }
        if rest > 0 {
            let lo = _mm256_blendv_ps(
                neg,
                _mm256_maskload_ps(s.add(full), mask_lo),
                _mm256_castsi256_ps(mask_lo),
            );
            let hi = _mm256_blendv_ps(
                neg,
                _mm256_maskload_ps(s.add(full + 8), mask_hi),
                _mm256_castsi256_ps(mask_hi),
            );
            m = _mm256_max_ps(m, _mm256_max_ps(lo, hi));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        let top = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let max = _mm256_set1_ps(top);
        let mut lo = _mm256_setzero_ps();
        let mut hi = _mm256_setzero_ps();
        for j in (0..full).step_by(LANES) {
            let e0 = exp_256(_mm256_sub_ps(_mm256_loadu_ps(s.add(j)), max));
            let e1 = exp_256(_mm256_sub_ps(_mm256_loadu_ps(s.add(j + 8)), max));
            _mm256_storeu_ps(s.add(j), e0);
            _mm256_storeu_ps(s.add(j + 8), e1);
            lo = _mm256_add_ps(lo, e0);
            hi = _mm256_add_ps(hi, e1);
        }
        if rest > 0 {
            let e0 = exp_256(_mm256_sub_ps(_mm256_maskload_ps(s.add(full), mask_lo), max));
            let e1 = exp_256(_mm256_sub_ps(
                _mm256_maskload_ps(s.add(full + 8), mask_hi),
                max,
            ));
            _mm256_maskstore_ps(s.add(full), mask_lo, e0);
            _mm256_maskstore_ps(s.add(full + 8), mask_hi, e1);
            lo = _mm256_add_ps(lo, _mm256_and_ps(e0, _mm256_castsi256_ps(mask_lo)));
            hi = _mm256_add_ps(hi, _mm256_and_ps(e1, _mm256_castsi256_ps(mask_hi)));
        }
        (top, reduce_256(lo, hi))
    }
}
