//! A router that remembers what it serves.
//!
//! axum's `Router` cannot list its routes, so every daemon adds its routes
//! through [`Routes`], which records each method and path as it adds it.
//! The table is what `--routes` prints, and what the tests walk to check
//! that every protected route refuses a request without the token: the
//! list cannot drift from the router because it is the router.

use axum::handler::Handler;
use axum::routing::{delete, get, post};
use axum::Router;
use serde::Serialize;

/// One route: method, path (with `{param}` placeholders), and whether it
/// needs the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteEntry {
    /// `GET`, `POST` or `DELETE`.
    pub method: &'static str,
    /// The path as registered, e.g. `/v1/inference/{job_id}`.
    pub path: &'static str,
    /// False for the probes and `/metrics` ([`auth_min::PUBLIC_PATHS`]).
    pub auth: bool,
}

/// A [`Router`] and the table of its routes.
#[derive(Debug)]
pub struct Routes<S> {
    router: Router<S>,
    table: Vec<RouteEntry>,
}

impl<S> Default for Routes<S>
where
    S: Clone + Send + Sync + 'static,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Routes<S>
where
    S: Clone + Send + Sync + 'static,
{
    /// No routes yet.
    pub fn new() -> Self {
        Self {
            router: Router::new(),
            table: Vec::new(),
        }
    }

    fn record(&mut self, method: &'static str, path: &'static str) {
        self.table.push(RouteEntry {
            method,
            path,
            auth: !auth_min::PUBLIC_PATHS.contains(&path),
        });
    }

    /// `GET path`.
    pub fn get<H, T>(mut self, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
    {
        self.record("GET", path);
        self.router = self.router.route(path, get(handler));
        self
    }

    /// `POST path`.
    pub fn post<H, T>(mut self, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
    {
        self.record("POST", path);
        self.router = self.router.route(path, post(handler));
        self
    }

    /// `DELETE path`.
    pub fn delete<H, T>(mut self, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
    {
        self.record("DELETE", path);
        self.router = self.router.route(path, delete(handler));
        self
    }

    /// Both sets of routes.
    pub fn merge(mut self, other: Self) -> Self {
        self.router = self.router.merge(other.router);
        self.table.extend(other.table);
        self
    }

    /// The routes added so far, in order.
    pub fn table(&self) -> &[RouteEntry] {
        &self.table
    }

    /// The router, for [`Bootstrap::bind`](crate::Bootstrap::bind) or a test.
    pub fn into_router(self) -> Router<S> {
        self.router
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn ok() -> &'static str {
        "ok"
    }

    #[test]
    fn every_route_added_is_listed_with_its_method_and_auth() {
        let routes: Routes<()> = Routes::new()
            .get("/health/live", ok)
            .post("/v1/thing/{id}", ok)
            .merge(Routes::new().delete("/v1/thing/{id}", ok));
        assert_eq!(
            routes.table(),
            [
                RouteEntry {
                    method: "GET",
                    path: "/health/live",
                    auth: false
                },
                RouteEntry {
                    method: "POST",
                    path: "/v1/thing/{id}",
                    auth: true
                },
                RouteEntry {
                    method: "DELETE",
                    path: "/v1/thing/{id}",
                    auth: true
                },
            ]
        );
        // Two methods on one path coexist in the router.
        let _router: Router = routes.into_router();
    }
}
