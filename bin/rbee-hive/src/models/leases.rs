//! Which models are in use: a worker holds a [`Lease`] on its model for as
//! long as it runs, and eviction refuses (409 `MODEL_IN_USE`) while any
//! lease is held. Eviction marks the model first, so a spawn racing it sees
//! the model as gone instead of starting on files about to be deleted.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use super::error::ModelError;

#[derive(Debug)]
enum Use {
    Workers(usize),
    Evicting,
}

/// The leases of one hive.
#[derive(Debug, Default, Clone)]
pub struct Leases {
    inner: Arc<Mutex<HashMap<String, Use>>>,
}

/// Held while a worker uses a model; released on drop.
#[derive(Debug)]
pub struct Lease {
    leases: Leases,
    model_ref: String,
}

/// Held while a model is being evicted; released on drop.
#[derive(Debug)]
pub struct EvictGuard {
    leases: Leases,
    model_ref: String,
}

impl Leases {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Use>> {
        self.inner.lock()
    }

    /// Take a lease on `model_ref`; refused while it is being evicted.
    pub fn acquire(&self, model_ref: &str) -> Result<Lease, ModelError> {
        let mut map = self.lock();
        match map.get_mut(model_ref) {
            Some(Use::Evicting) => {
                return Err(ModelError::Evicting {
                    model_ref: model_ref.to_owned(),
                })
            }
            Some(Use::Workers(n)) => *n += 1,
            None => {
                map.insert(model_ref.to_owned(), Use::Workers(1));
            }
        }
        Ok(Lease {
            leases: self.clone(),
            model_ref: model_ref.to_owned(),
        })
    }

    /// How many leases `model_ref` has.
    pub fn count(&self, model_ref: &str) -> usize {
        match self.lock().get(model_ref) {
            Some(Use::Workers(n)) => *n,
            _ => 0,
        }
    }

    /// Mark `model_ref` as being evicted; 409 `MODEL_IN_USE` while leased.
    pub fn begin_evict(&self, model_ref: &str) -> Result<EvictGuard, ModelError> {
        let mut map = self.lock();
        match map.get(model_ref) {
            Some(Use::Workers(n)) => Err(ModelError::InUse {
                model_ref: model_ref.to_owned(),
                workers: *n,
            }),
            Some(Use::Evicting) => Err(ModelError::AlreadyEvicting {
                model_ref: model_ref.to_owned(),
            }),
            None => {
                map.insert(model_ref.to_owned(), Use::Evicting);
                Ok(EvictGuard {
                    leases: self.clone(),
                    model_ref: model_ref.to_owned(),
                })
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut map = self.leases.lock();
        if let Some(Use::Workers(n)) = map.get_mut(&self.model_ref) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.model_ref);
            }
        }
    }
}

impl Drop for EvictGuard {
    fn drop(&mut self) {
        let mut map = self.leases.lock();
        if matches!(map.get(&self.model_ref), Some(Use::Evicting)) {
            map.remove(&self.model_ref);
        }
    }
}

#[cfg(test)]
mod tests {
    use rbee_api::{Coded, ErrorCode};

    use super::*;

    #[test]
    fn a_leased_model_cannot_be_evicted_until_every_lease_is_dropped() {
        let leases = Leases::default();
        let a = leases.acquire("hf:o/r").unwrap();
        let b = leases.acquire("hf:o/r").unwrap();
        assert_eq!(leases.count("hf:o/r"), 2);
        let err = leases.begin_evict("hf:o/r").unwrap_err();
        assert_eq!(err.code(), ErrorCode::ModelInUse);
        assert_eq!(err.code().status(), http_status_conflict());
        drop(a);
        assert!(leases.begin_evict("hf:o/r").is_err());
        drop(b);
        let guard = leases.begin_evict("hf:o/r").unwrap();
        assert_eq!(
            leases.acquire("hf:o/r").unwrap_err().code(),
            ErrorCode::ModelNotFound
        );
        drop(guard);
        assert!(leases.acquire("hf:o/r").is_ok());
    }

    fn http_status_conflict() -> axum::http::StatusCode {
        axum::http::StatusCode::CONFLICT
    }
}
