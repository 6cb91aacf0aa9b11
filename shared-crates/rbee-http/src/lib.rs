//! The HTTP plumbing every rbee daemon shares.
//!
//! A daemon builds its own [`axum::Router`], then hands it to
//! [`HttpStack::apply`], which adds, outermost first:
//!
//! 1. request ids ([`request_id`]): accept or mint `X-Request-Id`, echo it,
//!    open the request's tracing span, log one access line;
//! 2. HTTP metrics per matched route template ([`metrics::HttpMetrics`]);
//! 3. the contract's JSON error envelope for anything the framework would
//!    answer in plain text ([`errors`]): 404, 405, 413, 415;
//! 4. bearer auth ([`auth_min::AuthLayer`]);
//! 5. deadlines ([`deadline_propagation::DeadlineLayer`]);
//! 6. the body size limit (default 1 MiB).
//!
//! [`core_routes`] gives `/health`, `/health/live`, `/metrics` and
//! `POST /v1/admin/shutdown`; [`server`] binds, checks the bind policy,
//! waits for SIGTERM/SIGINT and drains with a bound; [`reload`] re-reads
//! settings on SIGHUP; [`telemetry`] sets up
//! logging; [`client`] forwards request id, `traceparent` and deadline on
//! outgoing calls.

pub mod audit;
pub mod client;
pub mod config_file;
pub mod conn;
pub mod errors;
pub mod metrics;
pub mod reload;
pub mod request_id;
pub mod route_table;
mod routes;
pub mod server;
pub mod stack;
pub mod task;
pub mod telemetry;
pub mod tls;

pub use client::RequestContext;
pub use conn::{ConnectionLimits, ConnectionMetrics};
pub use errors::ApiJson;
pub use metrics::{register_build_info, HttpMetrics};
pub use reload::{ReloadResult, Reloaded, Reloader, TokenChange};
pub use request_id::{RequestId, X_REQUEST_ID};
pub use route_table::{RouteEntry, Routes};
pub use routes::{core_routes, CoreState};
pub use server::{
    main_entry, Bootstrap, CommonArgs, Daemon, DaemonConfig, FatalHandle, Identity, StartupError,
};
pub use stack::{HttpStack, DEFAULT_BODY_LIMIT};
pub use telemetry::{init_tracing, LogFormat};
