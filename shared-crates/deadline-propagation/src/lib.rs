//! Request deadlines that every hop honours.
//!
//! A client sends `X-Deadline: <unix epoch ms>` (absolute) or
//! `X-Timeout-Ms: <ms>` (relative). The first daemon turns either into a
//! [`Deadline`]; every hop forwards the same absolute `X-Deadline`
//! ([`Deadline::header_value`]) and bounds its own downstream work by
//! [`Deadline::remaining`] ([`Deadline::timeout`]).
//!
//! Bad values are never ignored: they are 400 `INVALID_DEADLINE`. A request
//! whose deadline has already passed is answered 504 `DEADLINE_EXCEEDED` by
//! [`DeadlineLayer`] before any handler runs.
//!
//! Remaining time is measured on tokio's clock, so tests can pause it.

mod deadline;
mod layer;

pub use deadline::{
    Deadline, DeadlineError, DeadlineExceeded, MAX_TIMEOUT_MS, X_DEADLINE, X_TIMEOUT_MS,
};
pub use layer::{
    DeadlineLayer, DeadlineService, DefaultDeadline, MaxDeadline, OnExpired, SharedDuration,
};
