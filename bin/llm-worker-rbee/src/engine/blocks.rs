//! The KV cache's blocks: who holds them, and which prompt prefixes they
//! still hold for the next request.
//!
//! The model's cache is a pool of blocks of [`KV_BLOCK`] positions. A
//! sequence holds a table of blocks, allocated as it grows. At admission a
//! sequence reserves every block it can come to need (its prompt plus
//! `max_tokens`, capped at the context), so a running sequence never finds
//! the pool empty: a request that cannot reserve waits, and no sequence is
//! ever cut short for memory.
//!
//! Prefix reuse. A full block is immutable once written, and is indexed
//! under a key chained from its parent's key and its own tokens (the key of
//! the whole prefix up to its end). A new prompt walks the index block by
//! block and shares every full block it finds: their prefill is skipped.
//! Where the prompt leaves the shared chain inside a block, the cached
//! block (full, or the last partial block of a finished sequence) with the
//! longest common run of tokens is copied into a fresh block of the new
//! sequence's own, so a conversation's next turn skips all but its new
//! tokens. The last prompt token is always computed: its logits give the
//! first generated token. Blocks nobody holds keep their content until the
//! pool needs them (least recently released first, the end of a prefix
//! before its start).

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::model::llama::KV_BLOCK;

/// The chain key before the first block.
const ROOT: u64 = 0x9e37_79b9_7f4a_7c15;

/// The key of a block holding `tokens` after the prefix keyed `parent`.
fn chain(parent: u64, tokens: &[u32]) -> u64 {
    // SipHash with fixed keys: the same key in every run.
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[derive(Debug)]
struct Content {
    /// Key of the prefix before this block.
    parent: u64,
    /// Key of the prefix up to this block's end, when it is full and indexed.
    key: Option<u64>,
    /// The tokens whose K/V the block holds, from its first position.
    tokens: Vec<u32>,
}

/// What the cache holds of a prompt, found by [`BlockPool::lookup`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Prefix {
    /// Full blocks to share, in order.
    pub shared: Vec<u32>,
    /// Key of the prefix the shared blocks hold.
    pub key: u64,
    /// A block to copy the first positions of, and how many.
    pub copy: Option<(u32, usize)>,
}

/// A sequence's blocks, reservation and registered prefix.
#[derive(Debug, Default)]
pub struct SeqBlocks {
    /// The block table.
    pub table: Vec<u32>,
    /// Blocks reserved for this sequence and not yet allocated.
    reserved: usize,
    /// Leading blocks indexed as full (shared or registered).
    registered: usize,
    /// Key of the prefix those blocks hold.
    key: u64,
}

/// The block pool; see the module documentation.
#[derive(Debug)]
pub struct BlockPool {
    refs: Vec<u32>,
    content: Vec<Option<Content>>,
    /// Blocks holding nothing.
    empty: Vec<u32>,
    /// Blocks nobody holds that keep their content, by release order.
    idle: BTreeMap<u64, u32>,
    /// Each idle block's place in `idle`.
    idle_at: Vec<Option<u64>>,
    tick: u64,
    /// Full blocks by prefix key.
    index: HashMap<u64, u32>,
    /// Blocks with content, by the key of the prefix before them.
    children: HashMap<u64, Vec<u32>>,
    /// Blocks reserved by sequences and not yet allocated.
    reserved: usize,
}

impl BlockPool {
    /// A pool of `blocks` empty blocks.
    pub fn new(blocks: usize) -> Self {
        Self {
            refs: vec![0; blocks],
            content: (0..blocks).map(|_| None).collect(),
            empty: (0..blocks as u32).rev().collect(),
            idle: BTreeMap::new(),
            idle_at: vec![None; blocks],
            tick: 0,
            index: HashMap::new(),
            children: HashMap::new(),
            reserved: 0,
        }
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Blocks held by sequences.
    pub fn used(&self) -> usize {
        self.total() - self.empty.len() - self.idle.len()
    }

    /// Blocks nobody holds that keep a reusable prefix.
    pub fn cached(&self) -> usize {
        self.idle.len()
    }

    /// Blocks a new sequence may still reserve.
    pub fn available(&self) -> usize {
        (self.empty.len() + self.idle.len()).saturating_sub(self.reserved)
    }

    /// The longest prefix of `tokens[..limit]` the cache holds.
    pub fn lookup(&self, tokens: &[u32], limit: usize) -> Prefix {
        let limit = limit.min(tokens.len());
        let mut p = Prefix {
            key: ROOT,
            ..Prefix::default()
        };
        let mut at = 0;
        while at + KV_BLOCK <= limit {
            let block_tokens = &tokens[at..at + KV_BLOCK];
            let key = chain(p.key, block_tokens);
            match self.index.get(&key) {
                Some(&b)
                    if self.content[b as usize]
                        .as_ref()
                        .is_some_and(|c| c.parent == p.key && c.tokens == block_tokens) =>
                {
                    p.shared.push(b);
                    p.key = key;
                    at += KV_BLOCK;
                }
                _ => break,
            }
        }
        let rest = &tokens[at..limit];
        if !rest.is_empty() {
            let best = self
                .children
                .get(&p.key)
                .into_iter()
                .flatten()
                .filter_map(|&b| {
                    let c = self.content[b as usize].as_ref()?;
                    let n = c
                        .tokens
                        .iter()
                        .zip(rest)
                        .take_while(|(a, b)| a == b)
                        .count();
                    (n > 0).then_some((n, b))
                })
                .max_by_key(|&(n, b)| (n, std::cmp::Reverse(b)));
            p.copy = best.map(|(n, b)| (b, n));
        }
        p
    }

    /// Admit a sequence that needs `blocks` in all and starts from
    /// `prefix` (from [`lookup`](Self::lookup) just before): take its
    /// shared blocks and reserve the rest. `None`, changing nothing, when
    /// the pool cannot promise them.
    pub fn admit(&mut self, prefix: &Prefix, blocks: usize) -> Option<SeqBlocks> {
        let fresh = blocks.saturating_sub(prefix.shared.len());
        let idle_shared = prefix
            .shared
            .iter()
            .filter(|&&b| self.refs[b as usize] == 0)
            .count();
        if self.available() < fresh + idle_shared {
            return None;
        }
        for &b in &prefix.shared {
            self.hold(b);
        }
        self.reserved += fresh;
        Some(SeqBlocks {
            table: prefix.shared.clone(),
            reserved: fresh,
            registered: prefix.shared.len(),
            key: prefix.key,
        })
    }

    fn hold(&mut self, b: u32) {
        if let Some(t) = self.idle_at[b as usize].take() {
            self.idle.remove(&t);
        }
        self.refs[b as usize] += 1;
    }

    /// A block for `seq` from its reservation. `keep` is not evicted for
    /// it (the block about to be copied from).
    pub fn allocate(&mut self, seq: &mut SeqBlocks, keep: Option<u32>) -> Option<u32> {
        if seq.reserved == 0 {
            return None;
        }
        let b = match self.empty.pop() {
            Some(b) => b,
            None => {
                let (&t, &b) = self.idle.iter().find(|&(_, &b)| Some(b) != keep)?;
                self.idle.remove(&t);
                self.idle_at[b as usize] = None;
                self.forget(b);
                b
            }
        };
        seq.reserved -= 1;
        self.reserved -= 1;
        self.refs[b as usize] = 1;
        seq.table.push(b);
        Some(b)
    }

    /// Drop what `b` held from the index.
    fn forget(&mut self, b: u32) {
        let Some(c) = self.content[b as usize].take() else {
            return;
        };
        if let Some(key) = c.key {
            if self.index.get(&key) == Some(&b) {
                self.index.remove(&key);
            }
        }
        if let Some(list) = self.children.get_mut(&c.parent) {
            list.retain(|&x| x != b);
            if list.is_empty() {
                self.children.remove(&c.parent);
            }
        }
    }

    /// Index the blocks of `seq` that `fed` positions of `tokens` have
    /// filled since the last call.
    pub fn register_full(&mut self, seq: &mut SeqBlocks, tokens: &[u32], fed: usize) {
        while (seq.registered + 1) * KV_BLOCK <= fed.min(tokens.len()) {
            let i = seq.registered;
            let block_tokens = &tokens[i * KV_BLOCK..(i + 1) * KV_BLOCK];
            let key = chain(seq.key, block_tokens);
            let b = seq.table[i];
            if !self.index.contains_key(&key) && self.content[b as usize].is_none() {
                self.index.insert(key, b);
                self.children.entry(seq.key).or_default().push(b);
                self.content[b as usize] = Some(Content {
                    parent: seq.key,
                    key: Some(key),
                    tokens: block_tokens.to_vec(),
                });
            }
            seq.key = key;
            seq.registered += 1;
        }
    }

    /// Give back a finished sequence's blocks and reservation. With
    /// `fed` (the positions of `tokens` whose K/V were written), a last
    /// partial block keeps its tokens for a later prompt to copy from;
    /// without (the pass failed), it is emptied.
    pub fn release(&mut self, seq: SeqBlocks, tokens: &[u32], fed: Option<usize>) {
        self.reserved -= seq.reserved;
        let last = seq.registered;
        if let (Some(fed), Some(&b)) = (fed, seq.table.get(last)) {
            let end = fed.min(tokens.len());
            let start = last * KV_BLOCK;
            if end > start && self.refs[b as usize] == 1 && self.content[b as usize].is_none() {
                self.children.entry(seq.key).or_default().push(b);
                self.content[b as usize] = Some(Content {
                    parent: seq.key,
                    key: None,
                    tokens: tokens[start..end.min(start + KV_BLOCK)].to_vec(),
                });
            }
        }
        // The end of the prefix becomes the first to go.
        for &b in seq.table.iter().rev() {
            let r = &mut self.refs[b as usize];
            *r -= 1;
            if *r > 0 {
                continue;
            }
            if fed.is_none()
                && self.content[b as usize]
                    .as_ref()
                    .is_none_or(|c| c.key.is_none())
            {
                self.forget(b);
            }
            if self.content[b as usize].is_some() {
                self.tick += 1;
                self.idle.insert(self.tick, b);
                self.idle_at[b as usize] = Some(self.tick);
            } else {
                self.empty.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prompt positions whose K/V the cache provides.
    fn positions(prefix: &Prefix) -> usize {
        prefix.shared.len() * KV_BLOCK + prefix.copy.map_or(0, |(_, n)| n)
    }

    fn prompt(len: usize, salt: u32) -> Vec<u32> {
        (0..len as u32).map(|i| i * 7 + salt).collect()
    }

    /// Run a sequence over `tokens` to `fed` positions and finish it.
    fn run(pool: &mut BlockPool, tokens: &[u32], fed: usize, need: usize) -> Prefix {
        let prefix = pool.lookup(tokens, tokens.len() - 1);
        let mut seq = pool.admit(&prefix, need).expect("admitted");
        if let Some((from, _)) = prefix.copy {
            pool.allocate(&mut seq, Some(from)).expect("copy target");
        }
        while seq.table.len() * KV_BLOCK < fed {
            pool.allocate(&mut seq, None).expect("reserved");
        }
        pool.register_full(&mut seq, tokens, fed);
        pool.release(seq, tokens, Some(fed));
        prefix
    }

    #[test]
    fn a_repeated_prompt_shares_its_full_blocks_and_copies_the_rest() {
        let mut pool = BlockPool::new(16);
        let system = prompt(400, 3);
        assert_eq!(positions(&run(&mut pool, &system, 400, 5)), 0);
        assert_eq!(pool.used(), 0);
        assert_eq!(pool.cached(), 4, "three full blocks and the partial one");
        // The same prompt again: three blocks shared, 15 of the last 16
        // positions copied; the last token is computed.
        let again = pool.lookup(&system, 399);
        assert_eq!(again.shared.len(), 3);
        assert_eq!(again.copy.map(|(_, n)| n), Some(399 - 384));
        assert_eq!(positions(&again), 399);
        // A longer prompt with the same start: the same 399 + 1 positions.
        let mut longer = system.clone();
        longer.extend(prompt(50, 11));
        assert_eq!(positions(&pool.lookup(&longer, longer.len() - 1)), 400);
        // A different start shares nothing.
        assert_eq!(positions(&pool.lookup(&prompt(400, 4), 399)), 0);
    }

    #[test]
    fn reservations_bound_admission_and_idle_blocks_are_evicted_last_first() {
        let mut pool = BlockPool::new(8);
        let a = prompt(300, 1);
        let pa = pool.lookup(&a, 299);
        let mut sa = pool.admit(&pa, 5).expect("a fits");
        assert_eq!(pool.available(), 3);
        assert!(pool.admit(&Prefix::default(), 4).is_none(), "4 > 3 left");
        for _ in 0..3 {
            pool.allocate(&mut sa, None).expect("reserved");
        }
        pool.register_full(&mut sa, &a, 300);
        assert_eq!(pool.used(), 3);
        pool.release(sa, &a, Some(300));
        assert_eq!((pool.used(), pool.cached(), pool.available()), (0, 3, 8));
        // Another sequence takes all 8 blocks: the idle ones are evicted,
        // the partial end of `a` first, and `a` is no longer found.
        let b = prompt(1000, 2);
        let mut sb = pool.admit(&pool.lookup(&b, 999), 8).expect("b fits");
        for _ in 0..5 {
            pool.allocate(&mut sb, None).expect("empty block");
        }
        assert_eq!(positions(&pool.lookup(&a, 299)), 299, "nothing evicted yet");
        pool.allocate(&mut sb, None).expect("evicts");
        assert_eq!(pool.lookup(&a, 299).shared.len(), 2, "the end went first");
        assert_eq!(pool.lookup(&a, 299).copy, None);
        for _ in 0..2 {
            pool.allocate(&mut sb, None).expect("evicts");
        }
        assert!(pool.allocate(&mut sb, None).is_none(), "reservation spent");
        assert_eq!(positions(&pool.lookup(&a, 299)), 0);
        assert_eq!(pool.available(), 0);
        pool.release(sb, &b, None);
        assert_eq!(pool.available(), 8);
    }

    #[test]
    fn shared_blocks_are_held_until_every_holder_is_done() {
        let mut pool = BlockPool::new(6);
        let a = prompt(260, 5);
        run(&mut pool, &a, 260, 3);
        let p = pool.lookup(&a, 259);
        assert_eq!(p.shared.len(), 2);
        let mut s1 = pool.admit(&p, 3).expect("fits");
        let mut s2 = pool.admit(&p, 3).expect("fits");
        assert_eq!(pool.used(), 2, "two holders of the same two blocks");
        pool.allocate(&mut s1, None).expect("own block");
        pool.allocate(&mut s2, None).expect("own block");
        pool.release(s1, &a, Some(260));
        assert_eq!(pool.used(), 3);
        // The shared blocks cannot be evicted while s2 holds them.
        let mut s3 = pool.admit(&Prefix::default(), 3).expect("3 left");
        for _ in 0..3 {
            pool.allocate(&mut s3, None).expect("reserved");
        }
        assert!(s3.table.iter().all(|b| !s2.table.contains(b)));
        pool.release(s2, &a, Some(260));
        pool.release(s3, &a, None);
        assert_eq!(pool.used(), 0);
    }

    #[test]
    fn a_failed_sequence_leaves_no_partial_content() {
        let mut pool = BlockPool::new(4);
        let a = prompt(200, 9);
        let p = pool.lookup(&a, 199);
        let mut s = pool.admit(&p, 2).expect("fits");
        pool.allocate(&mut s, None).expect("reserved");
        pool.allocate(&mut s, None).expect("reserved");
        pool.register_full(&mut s, &a, 128);
        pool.release(s, &a, None);
        let again = pool.lookup(&a, 199);
        assert_eq!((again.shared.len(), again.copy), (1, None));
    }
}
