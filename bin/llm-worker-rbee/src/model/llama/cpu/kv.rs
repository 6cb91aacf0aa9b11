//! The KV cache of the CPU model: allocated at load, written in place.
//!
//! Per layer and key/value head, each sequence has a region of `context`
//! positions (rounded up to whole blocks of 16). Keys are stored in blocks
//! of 16 positions transposed (`[block][head_dim][16]`), the layout the
//! attention kernel reads 16 scores at a time from; values by position
//! (`[position][head_dim]`). All query heads sharing a key/value head read
//! its rows once, and nothing is ever repeated or copied per token.

use crate::kernels::math::{KvRows, KEY_BLOCK};

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
    pub(super) sequences: usize,
    /// Positions per region, rounded up to whole key blocks.
    pub(super) padded: usize,
}

impl KvLayout {
    /// Elements of one sequence's region of one head.
    pub(super) fn region(&self) -> usize {
        self.padded * self.head_dim
    }

    /// Where element `e` of the key at (`seq`, `pos`) lies in its head's row.
    pub(super) fn key_index(&self, seq: usize, pos: usize, e: usize) -> usize {
        seq * self.region()
            + (pos / KEY_BLOCK) * self.head_dim * KEY_BLOCK
            + e * KEY_BLOCK
            + pos % KEY_BLOCK
    }

    /// Where element `e` of the value at (`seq`, `pos`) lies in its head's row.
    pub(super) fn value_index(&self, seq: usize, pos: usize, e: usize) -> usize {
        seq * self.region() + pos * self.head_dim + e
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
        sequences: usize,
        context: usize,
    ) -> Self {
        let padded = context.div_ceil(KEY_BLOCK) * KEY_BLOCK;
        // Zeroed allocations: pages become resident only when written.
        let size = kv_heads * sequences * padded * head_dim;
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
                sequences,
                padded,
            },
        }
    }

    /// The keys and values of key/value head `head` of sequence `seq` in `layer`.
    pub(super) fn head(&self, layer: usize, head: usize, seq: usize) -> (KvRows<'_>, KvRows<'_>) {
        let region = self.layout.region();
        let start = (head * self.layout.sequences + seq) * region;
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
