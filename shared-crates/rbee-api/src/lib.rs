//! Wire types shared by `queen-rbee`, `rbee-hive` and `llm-worker-rbee`.
//!
//! This crate is the one place where serde meets the wire: every body that
//! crosses a process boundary is defined here once, so a field cannot drift
//! between the daemon that sends it and the daemon that receives it. The
//! shapes follow the project's HTTP contract.

pub mod error;
pub mod fleet;
pub mod health;
pub mod hive;
pub mod inference;
pub mod model_ref;
pub mod models;
pub mod openai;
pub mod outcome;
pub mod sse;
pub mod worker;

pub use error::{ApiError, Coded, ErrorBody, ErrorCode, ErrorDetail, FieldError};
pub use model_ref::{HfRef, ModelRef, ModelRefError};
pub use outcome::Outcome;
