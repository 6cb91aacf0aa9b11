//! Which worker served each recent conversation.

use std::collections::{HashMap, VecDeque};

/// Most conversations whose worker the scheduler remembers.
const AFFINITY_ENTRIES: usize = 65_536;

/// Which worker served each recent conversation (a key made from the start
/// of its prompt), so its next turn goes where its earlier turns' KV cache
/// is and the worker's prefix reuse survives routing. Oldest forgotten
/// first.
#[derive(Debug, Default)]
pub(super) struct Affinity {
    worker: HashMap<u64, String>,
    order: VecDeque<u64>,
}

impl Affinity {
    pub(super) fn get(&self, key: u64) -> Option<&String> {
        self.worker.get(&key)
    }

    pub(super) fn set(&mut self, key: u64, worker: &str) {
        if self.worker.insert(key, worker.to_owned()).is_none() {
            self.order.push_back(key);
            while self.order.len() > AFFINITY_ENTRIES {
                if let Some(old) = self.order.pop_front() {
                    self.worker.remove(&old);
                }
            }
        }
    }
}
