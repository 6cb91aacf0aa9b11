//! Weight matrices in the kernels' own layout, repacked once at load.
//!
//! Rows are taken 16 at a time (a *group*), and within a group the bytes
//! are interleaved so that one 64-byte vector holds 4 consecutive weights
//! of each of the 16 rows: a `vpdpbusd` against 4 activation bytes
//! broadcast to every lane then adds one partial dot product to each row's
//! own 32-bit lane, and no horizontal sums are needed. A 32-weight block
//! of a group is 8 such vectors once unpacked (`U0..U7`, `Ut` holding
//! weights `4t..4t+4` of every row).
//!
//! Formats (bytes per group; the sizes per weight are the GGUF ones):
//! - [`Format::Q4`] (from Q4_1): per 32-block, 4 vectors of nibbles (low
//!   nibbles are `U0..U3`, high nibbles `U4..U7`), then 16 f16 scales `d`
//!   and 16 f16 minimums `m`; weight = `d * q + m`, `q` in 0..16.
//! - [`Format::Q4Sym`] (from Q4_0): the same without minimums; weight =
//!   `d * (q - 8)`.
//! - [`Format::Q8`] (from Q8_0): per block, the 8 vectors as bytes biased
//!   by 128 (`q ^ 0x80`), then 16 f16 scales; weight = `d * q`.
//! - [`Format::Q4K`] (from Q4_K): per 256-superblock, 8 blocks of nibbles
//!   as in Q4, then f16 `d` and `dmin` per row, then the 6-bit scales and
//!   minimums unpacked to one byte each; weight = `d*sc*q - dmin*m`.
//! - [`Format::Q6K`] (from Q6_K): per superblock, 8 blocks each of 4 nibble
//!   vectors and 2 vectors of 2-bit high parts, then f16 `d` per row and
//!   the 16 signed scales per row; weight = `d*sc*(q - 32)`, `q` in 0..64.
//! - [`Format::F32`] (dense F32, F16 and BF16 tensors): `k` rows of 16
//!   f32, one per matrix row.

use std::fmt;

use half::{bf16, f16};

/// Matrix rows interleaved in one group.
pub const GROUP: usize = 16;
/// Weights per quantization block (and per activation block).
pub const BLOCK: usize = 32;
/// Weights per K-quant superblock.
pub const SUPER: usize = 256;

/// Bytes of one Q4 block of a group.
pub(crate) const Q4_BLOCK_BYTES: usize = 4 * 64 + 2 * 32;
/// Bytes of one Q4Sym block of a group.
pub(crate) const Q4SYM_BLOCK_BYTES: usize = 4 * 64 + 32;
/// Bytes of one Q8 block of a group.
pub(crate) const Q8_BLOCK_BYTES: usize = 8 * 64 + 32;
/// Bytes of one Q4_K superblock of a group.
pub(crate) const Q4K_SUPER_BYTES: usize = 8 * 256 + 2 * 32 + 2 * 128;
/// Offsets inside a Q4_K superblock of a group.
pub(crate) const Q4K_D: usize = 2048;
pub(crate) const Q4K_DMIN: usize = Q4K_D + 32;
pub(crate) const Q4K_SC: usize = Q4K_DMIN + 32;
pub(crate) const Q4K_MIN: usize = Q4K_SC + 128;
/// Bytes of one Q6_K block (4 nibble vectors, 2 high-bit vectors).
pub(crate) const Q6K_BLOCK_BYTES: usize = 6 * 64;
/// Bytes of one Q6_K superblock of a group, and offsets inside it.
pub(crate) const Q6K_SUPER_BYTES: usize = 8 * Q6K_BLOCK_BYTES + 32 + 256;
pub(crate) const Q6K_D: usize = 8 * Q6K_BLOCK_BYTES;
pub(crate) const Q6K_SC: usize = Q6K_D + 32;

/// The kernels' weight formats; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// 4-bit unsigned with an f16 scale and minimum per 32 weights.
    Q4,
    /// 4-bit with an offset of 8 and an f16 scale per 32 weights.
    Q4Sym,
    /// 8-bit with an f16 scale per 32 weights.
    Q8,
    /// 4-bit K-quant superblocks.
    Q4K,
    /// 6-bit K-quant superblocks.
    Q6K,
    /// Dense f32.
    F32,
}

impl Format {
    /// Bytes of one group of 16 rows of `k` weights.
    pub fn group_bytes(self, k: usize) -> usize {
        match self {
            Self::Q4 => k / BLOCK * Q4_BLOCK_BYTES,
            Self::Q4Sym => k / BLOCK * Q4SYM_BLOCK_BYTES,
            Self::Q8 => k / BLOCK * Q8_BLOCK_BYTES,
            Self::Q4K => k / SUPER * Q4K_SUPER_BYTES,
            Self::Q6K => k / SUPER * Q6K_SUPER_BYTES,
            Self::F32 => k * GROUP * 4,
        }
    }

    /// Whether the matrix multiplies quantized activations (else f32 ones).
    pub fn is_quantized(self) -> bool {
        self != Self::F32
    }
}

/// The element type of a tensor as stored in a model file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceType {
    /// GGUF Q4_0.
    Q4_0,
    /// GGUF Q4_1.
    Q4_1,
    /// GGUF Q8_0.
    Q8_0,
    /// GGUF Q4_K.
    Q4K,
    /// GGUF Q6_K.
    Q6K,
    /// Little-endian f32.
    F32,
    /// Little-endian f16.
    F16,
    /// Little-endian bf16.
    BF16,
}

impl SourceType {
    /// Elements per block of the stored type.
    pub fn block_elems(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => BLOCK,
            Self::Q4K | Self::Q6K => SUPER,
            Self::F32 | Self::F16 | Self::BF16 => 1,
        }
    }

    /// Bytes per block of the stored type.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q6K => 210,
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    /// The kernels' format this type is repacked into.
    pub fn format(self) -> Format {
        match self {
            Self::Q4_0 => Format::Q4Sym,
            Self::Q4_1 => Format::Q4,
            Self::Q8_0 => Format::Q8,
            Self::Q4K => Format::Q4K,
            Self::Q6K => Format::Q6K,
            Self::F32 | Self::F16 | Self::BF16 => Format::F32,
        }
    }
}

/// Why a tensor cannot be repacked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    /// The byte count does not match the shape and type.
    #[error("{bytes} bytes do not hold {rows}x{k} {source_type:?} values ({expected} expected)")]
    Size {
        /// Bytes given.
        bytes: usize,
        /// Bytes the shape needs.
        expected: usize,
        /// Rows.
        rows: usize,
        /// Columns.
        k: usize,
        /// The type.
        source_type: SourceType,
    },
    /// The row length is not a whole number of blocks.
    #[error("a row of {k} {source_type:?} values is not a whole number of {block}-value blocks")]
    RowLength {
        /// Columns.
        k: usize,
        /// Elements per block.
        block: usize,
        /// The type.
        source_type: SourceType,
    },
}

/// A 64-byte aligned cache line, the unit of the weight buffer.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A weight matrix in one of the kernels' formats; see the module documentation.
pub struct PackedMatrix {
    format: Format,
    rows: usize,
    k: usize,
    groups: usize,
    group_bytes: usize,
    lines: Vec<Line>,
}

impl fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("format", &self.format)
            .field("rows", &self.rows)
            .field("k", &self.k)
            .finish_non_exhaustive()
    }
}

impl PackedMatrix {
    /// Repack `rows` x `k` values stored as `source_type` (row-major, GGUF
    /// block layout for the quantized types).
    pub fn pack(
        source_type: SourceType,
        bytes: &[u8],
        rows: usize,
        k: usize,
    ) -> Result<Self, PackError> {
        let block = source_type.block_elems();
        if k == 0 || !k.is_multiple_of(block) {
            return Err(PackError::RowLength {
                k,
                block,
                source_type,
            });
        }
        let row_bytes = k / block * source_type.block_bytes();
        let expected = rows * row_bytes;
        if bytes.len() != expected {
            return Err(PackError::Size {
                bytes: bytes.len(),
                expected,
                rows,
                k,
                source_type,
            });
        }
        let format = source_type.format();
        let group_bytes = format.group_bytes(k);
        let groups = rows.div_ceil(GROUP);
        let total = groups * group_bytes;
        let mut matrix = Self {
            format,
            rows,
            k,
            groups,
            group_bytes,
            lines: vec![Line([0; 64]); total.div_ceil(64)],
        };
        for (row, src) in bytes.chunks_exact(row_bytes).enumerate() {
            let (group, lane) = (row / GROUP, row % GROUP);
            let start = group * group_bytes;
            let dst = &mut matrix.bytes_mut()[start..start + group_bytes];
            match source_type {
                SourceType::Q4_0 | SourceType::Q4_1 => pack_q4_row(source_type, src, lane, dst),
                SourceType::Q8_0 => pack_q8_row(src, lane, dst),
                SourceType::Q4K => pack_q4k_row(src, lane, dst),
                SourceType::Q6K => pack_q6k_row(src, lane, dst),
                SourceType::F32 | SourceType::F16 | SourceType::BF16 => {
                    pack_dense_row(source_type, src, lane, dst);
                }
            }
        }
        Ok(matrix)
    }

    /// The matrix's format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Rows (outputs).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (inputs).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Groups of 16 rows (the last may be partly padding).
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// Bytes the packed weights take.
    pub fn size_bytes(&self) -> usize {
        self.groups * self.group_bytes
    }

    /// The packed bytes of group `group`.
    pub(crate) fn group(&self, group: usize) -> &[u8] {
        let start = group * self.group_bytes;
        &self.bytes()[start..start + self.group_bytes]
    }

    fn bytes(&self) -> &[u8] {
        let len = self.lines.len() * 64;
        // `Line` is 64 plain bytes with no padding (repr(C) around
        // [u8; 64]), so the vector's storage is `len` initialized bytes; the
        // borrow of `self.lines` keeps it alive and unchanged.
        // SAFETY: `len` initialized bytes of `self.lines`, borrowed shared.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<u8>(), len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.lines.len() * 64;
        // As in `bytes`, and the exclusive borrow of `self.lines`
        // makes this the only reference.
        // SAFETY: `len` initialized bytes of `self.lines`, borrowed exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<u8>(), len) }
    }

    /// Row `row` as f32 values, computed as the file's own format defines
    /// them (the embedding lookup; the tests' reference).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.rows && out.len() == self.k);
        let g = self.group(row / GROUP);
        let lane = row % GROUP;
        match self.format {
            Format::Q4 => {
                for (b, out) in out.chunks_exact_mut(BLOCK).enumerate() {
                    let blk = &g[b * Q4_BLOCK_BYTES..];
                    let d = f16_at(blk, 256 + 2 * lane);
                    let m = f16_at(blk, 288 + 2 * lane);
                    for (e, o) in out.iter_mut().enumerate() {
                        *o = f32::from(nibble(blk, lane, e)) * d + m;
                    }
                }
            }
            Format::Q4Sym => {
                for (b, out) in out.chunks_exact_mut(BLOCK).enumerate() {
                    let blk = &g[b * Q4SYM_BLOCK_BYTES..];
                    let d = f16_at(blk, 256 + 2 * lane);
                    for (e, o) in out.iter_mut().enumerate() {
                        *o = f32::from(i16::from(nibble(blk, lane, e)) - 8) * d;
                    }
                }
            }
            Format::Q8 => {
                for (b, out) in out.chunks_exact_mut(BLOCK).enumerate() {
                    let blk = &g[b * Q8_BLOCK_BYTES..];
                    let d = f16_at(blk, 512 + 2 * lane);
                    for (e, o) in out.iter_mut().enumerate() {
                        let q = (blk[(e / 4) * 64 + lane * 4 + e % 4] ^ 0x80) as i8;
                        *o = f32::from(q) * d;
                    }
                }
            }
            Format::Q4K => {
                for (sb, out) in out.chunks_exact_mut(SUPER).enumerate() {
                    let sup = &g[sb * Q4K_SUPER_BYTES..];
                    let d = f16_at(sup, Q4K_D + 2 * lane);
                    let dmin = f16_at(sup, Q4K_DMIN + 2 * lane);
                    for (s, out) in out.chunks_exact_mut(BLOCK).enumerate() {
                        let d1 = d * f32::from(sup[Q4K_SC + s * GROUP + lane]);
                        let m1 = dmin * f32::from(sup[Q4K_MIN + s * GROUP + lane]);
                        let blk = &sup[s * 256..];
                        for (e, o) in out.iter_mut().enumerate() {
                            *o = d1 * f32::from(nibble(blk, lane, e)) - m1;
                        }
                    }
                }
            }
            Format::Q6K => {
                for (sb, out) in out.chunks_exact_mut(SUPER).enumerate() {
                    let sup = &g[sb * Q6K_SUPER_BYTES..];
                    let d = f16_at(sup, Q6K_D + 2 * lane);
                    for (b, out) in out.chunks_exact_mut(BLOCK).enumerate() {
                        let blk = &sup[b * Q6K_BLOCK_BYTES..];
                        for (e, o) in out.iter_mut().enumerate() {
                            let sub = 2 * b + e / 16;
                            let sc = f32::from(sup[Q6K_SC + sub * GROUP + lane] as i8);
                            let q = i32::from(q6(blk, lane, e)) - 32;
                            *o = d * sc * q as f32;
                        }
                    }
                }
            }
            Format::F32 => {
                for (kk, o) in out.iter_mut().enumerate() {
                    *o = f32_at(g, (kk * GROUP + lane) * 4);
                }
            }
        }
    }
}

pub(crate) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

pub(crate) fn f32_at(bytes: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// The 4-bit value of weight `e` (0..32) of row `lane` in a Q4-layout block.
pub(crate) fn nibble(block: &[u8], lane: usize, e: usize) -> u8 {
    let t = e / 4;
    let byte = block[(t % 4) * 64 + lane * 4 + e % 4];
    if t < 4 {
        byte & 0x0F
    } else {
        byte >> 4
    }
}

/// The 6-bit value of weight `e` (0..32) of row `lane` in a Q6_K block.
pub(crate) fn q6(block: &[u8], lane: usize, e: usize) -> u8 {
    let t = e / 4;
    let high = block[256 + (t / 4) * 64 + lane * 4 + e % 4] >> (2 * (t % 4)) & 3;
    nibble(block, lane, e) | high << 4
}

/// Place the 32 4-bit values of one block (`q[e]` for weight `e`) of row
/// `lane` into a Q4-layout block.
fn put_nibbles(dst: &mut [u8], lane: usize, q: &[u8; 32]) {
    for c in 0..4 {
        for j in 0..4 {
            let e = 4 * c + j;
            dst[c * 64 + lane * 4 + j] = (q[e] & 0x0F) | (q[e + 16] & 0x0F) << 4;
        }
    }
}

fn put_f16(dst: &mut [u8], at: usize, bits: u16) {
    dst[at..at + 2].copy_from_slice(&bits.to_le_bytes());
}

fn pack_q4_row(source_type: SourceType, src: &[u8], lane: usize, dst: &mut [u8]) {
    let (size, block_bytes) = match source_type {
        SourceType::Q4_0 => (18, Q4SYM_BLOCK_BYTES),
        _ => (20, Q4_BLOCK_BYTES),
    };
    for (b, blk) in src.chunks_exact(size).enumerate() {
        let out = &mut dst[b * block_bytes..(b + 1) * block_bytes];
        put_f16(out, 256 + 2 * lane, u16::from_le_bytes([blk[0], blk[1]]));
        if size == 20 {
            put_f16(out, 288 + 2 * lane, u16::from_le_bytes([blk[2], blk[3]]));
        }
        // GGUF Q4 already pairs weight j (low nibble) with weight j + 16
        // (high nibble) in byte j, which is the layout's pairing too.
        let qs = &blk[size - 16..];
        for c in 0..4 {
            for j in 0..4 {
                out[c * 64 + lane * 4 + j] = qs[4 * c + j];
            }
        }
    }
}

fn pack_q8_row(src: &[u8], lane: usize, dst: &mut [u8]) {
    for (b, blk) in src.chunks_exact(34).enumerate() {
        let out = &mut dst[b * Q8_BLOCK_BYTES..(b + 1) * Q8_BLOCK_BYTES];
        for (e, &q) in blk[2..34].iter().enumerate() {
            out[(e / 4) * 64 + lane * 4 + e % 4] = q ^ 0x80;
        }
        put_f16(out, 512 + 2 * lane, u16::from_le_bytes([blk[0], blk[1]]));
    }
}

/// Scale and minimum of sub-block `j` of a Q4_K superblock's 12 scale bytes.
pub(crate) fn q4k_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn pack_q4k_row(src: &[u8], lane: usize, dst: &mut [u8]) {
    for (sb, blk) in src.chunks_exact(144).enumerate() {
        let out = &mut dst[sb * Q4K_SUPER_BYTES..(sb + 1) * Q4K_SUPER_BYTES];
        put_f16(out, Q4K_D + 2 * lane, u16::from_le_bytes([blk[0], blk[1]]));
        put_f16(
            out,
            Q4K_DMIN + 2 * lane,
            u16::from_le_bytes([blk[2], blk[3]]),
        );
        let scales = &blk[4..16];
        let qs = &blk[16..144];
        for s in 0..8 {
            let bytes = &qs[32 * (s / 2)..32 * (s / 2) + 32];
            let mut q = [0u8; 32];
            for (v, &byte) in q.iter_mut().zip(bytes) {
                *v = if s % 2 == 0 { byte & 0x0F } else { byte >> 4 };
            }
            put_nibbles(&mut out[s * 256..(s + 1) * 256], lane, &q);
            let (sc, m) = q4k_scale_min(s, scales);
            out[Q4K_SC + s * GROUP + lane] = sc;
            out[Q4K_MIN + s * GROUP + lane] = m;
        }
    }
}

fn pack_q6k_row(src: &[u8], lane: usize, dst: &mut [u8]) {
    for (sb, blk) in src.chunks_exact(210).enumerate() {
        let out = &mut dst[sb * Q6K_SUPER_BYTES..(sb + 1) * Q6K_SUPER_BYTES];
        let (ql, qh, scales) = (&blk[0..128], &blk[128..192], &blk[192..208]);
        let mut q = [0u8; 256];
        for (e, v) in q.iter_mut().enumerate() {
            let (half, rest) = (e / 128, e % 128);
            let (quarter, l) = (rest / 32, rest % 32);
            let low = ql[64 * half + l + (quarter & 1) * 32];
            let low = if quarter < 2 { low & 0x0F } else { low >> 4 };
            let high = (qh[32 * half + l] >> (2 * quarter)) & 3;
            *v = low | high << 4;
        }
        for b in 0..8 {
            let blk_out = &mut out[b * Q6K_BLOCK_BYTES..(b + 1) * Q6K_BLOCK_BYTES];
            let vals: &[u8; 32] = q[32 * b..32 * b + 32].try_into().expect("32 values");
            put_nibbles(&mut blk_out[..256], lane, vals);
            for (e, &v) in vals.iter().enumerate() {
                let t = e / 4;
                blk_out[256 + (t / 4) * 64 + lane * 4 + e % 4] |= (v >> 4) << (2 * (t % 4));
            }
        }
        put_f16(
            out,
            Q6K_D + 2 * lane,
            u16::from_le_bytes([blk[208], blk[209]]),
        );
        for (sub, &sc) in scales.iter().enumerate() {
            out[Q6K_SC + sub * GROUP + lane] = sc;
        }
    }
}

fn pack_dense_row(source_type: SourceType, src: &[u8], lane: usize, dst: &mut [u8]) {
    let size = source_type.block_bytes();
    for (kk, v) in src.chunks_exact(size).enumerate() {
        let value = match source_type {
            SourceType::F32 => f32::from_le_bytes([v[0], v[1], v[2], v[3]]),
            SourceType::F16 => f16::from_bits(u16::from_le_bytes([v[0], v[1]])).to_f32(),
            _ => bf16::from_bits(u16::from_le_bytes([v[0], v[1]])).to_f32(),
        };
        let at = (kk * GROUP + lane) * 4;
        dst[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }
}
