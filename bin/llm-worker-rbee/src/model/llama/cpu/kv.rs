//! The KV cache of the CPU model: allocated at load, written in place.
//!
//! A pool of blocks of [`KV_BLOCK`] positions. Per layer and key/value
//! head, each block holds its positions' keys in groups of 16 positions
//! transposed (`[group][head_dim][16]`), the layout the attention kernel
//! reads 16 scores at a time from, and their values by position
//! (`[position][head_dim]`). A block is one attention run, contiguous in
//! memory. All query heads sharing a key/value head read its rows once,
//! and nothing is ever repeated or copied per token.

use crate::kernels::math::{KvRows, KEY_BLOCK};
use crate::model::llama::KV_BLOCK;

/// The element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KvType {
    /// f32: the reference implementation's arithmetic; twice the memory
    /// and bytes read per token of f16.
    F32,
    /// f16, as llama.cpp's default: half the memory and the bytes read per
    /// token.
    #[default]
    F16,
}

impl KvType {
    /// Bytes of one cached element.
    pub fn element_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
        }
    }
}

#[derive(Debug)]
pub(super) enum KvStore {
    F32 {
        keys: Vec<Vec<f32>>,
        values: Vec<Vec<f32>>,
    },
    F16 {
        keys: Vec<Vec<u16>>,
        values: Vec<Vec<u16>>,
    },
}

/// Where each key and value element lives in a layer's head rows.
#[derive(Debug, Clone, Copy)]
pub(super) struct KvLayout {
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
    /// Blocks in the pool.
    pub(super) blocks: usize,
}

impl KvLayout {
    /// Elements of one block of one head.
    pub(super) fn region(&self) -> usize {
        KV_BLOCK * self.head_dim
    }

    /// Where element `e` of the key at offset `at` of `block` lies in its
    /// head's row.
    pub(super) fn key_index(&self, block: usize, at: usize, e: usize) -> usize {
        block * self.region()
            + (at / KEY_BLOCK) * self.head_dim * KEY_BLOCK
            + e * KEY_BLOCK
            + at % KEY_BLOCK
    }

    /// Where element `e` of the value at offset `at` of `block` lies in its
    /// head's row.
    pub(super) fn value_index(&self, block: usize, at: usize, e: usize) -> usize {
        block * self.region() + at * self.head_dim + e
    }
}

/// The cache; see the module documentation.
#[derive(Debug)]
pub struct KvCache {
    pub(super) store: KvStore,
    pub(super) layout: KvLayout,
}

impl KvCache {
    pub(super) fn new(
        kind: KvType,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        blocks: usize,
    ) -> Self {
        // Zeroed allocations: pages become resident only when written.
        let size = kv_heads * blocks * KV_BLOCK * head_dim;
        let store = match kind {
            KvType::F32 => KvStore::F32 {
                keys: (0..layers).map(|_| vec![0f32; size]).collect(),
                values: (0..layers).map(|_| vec![0f32; size]).collect(),
            },
            KvType::F16 => KvStore::F16 {
                keys: (0..layers).map(|_| vec![0u16; size]).collect(),
                values: (0..layers).map(|_| vec![0u16; size]).collect(),
            },
        };
        Self {
            store,
            layout: KvLayout {
                kv_heads,
                head_dim,
                blocks,
            },
        }
    }

    /// The keys and values of key/value head `head` in `block` of `layer`.
    pub(super) fn block(
        &self,
        layer: usize,
        head: usize,
        block: usize,
    ) -> (KvRows<'_>, KvRows<'_>) {
        let region = self.layout.region();
        let start = (head * self.layout.blocks + block) * region;
        let end = start + region;
        match &self.store {
            KvStore::F32 { keys, values } => (
                KvRows::F32(&keys[layer][start..end]),
                KvRows::F32(&values[layer][start..end]),
            ),
            KvStore::F16 { keys, values } => (
                KvRows::F16(&keys[layer][start..end]),
                KvRows::F16(&values[layer][start..end]),
            ),
        }
    }
}

impl KvCache {
    /// Copy the first `positions` positions of block `from` into block
    /// `to`, in every layer and head. Keys are copied in whole groups of
    /// 16; the positions past `positions` that come along are overwritten
    /// before anything reads them.
    pub(super) fn copy_block(&mut self, from: usize, to: usize, positions: usize) {
        let l = self.layout;
        let key_len = positions.div_ceil(KEY_BLOCK) * KEY_BLOCK * l.head_dim;
        let value_len = positions * l.head_dim;
        fn copy<T: Copy>(rows: &mut [Vec<T>], l: KvLayout, from: usize, to: usize, len: usize) {
            for row in rows {
                for h in 0..l.kv_heads {
                    let src = (h * l.blocks + from) * l.region();
                    let dst = (h * l.blocks + to) * l.region();
                    row.copy_within(src..src + len, dst);
                }
            }
        }
        match &mut self.store {
            KvStore::F32 { keys, values } => {
                copy(keys, l, from, to, key_len);
                copy(values, l, from, to, value_len);
            }
            KvStore::F16 { keys, values } => {
                copy(keys, l, from, to, key_len);
                copy(values, l, from, to, value_len);
            }
        }
    }
}
