//! Tasks that keep the span they were started in: a task spawned while a
//! request is handled logs with that request's id, one spawned by a
//! daemon's background work with that work's span. The daemons spawn
//! through these instead of `tokio::spawn` and `spawn_blocking`.

use std::future::Future;

use tokio::task::JoinHandle;
use tracing::Instrument;

/// `tokio::spawn`, inside the current span.
pub fn spawn<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(future.in_current_span())
}

/// `tokio::task::spawn_blocking`, inside the current span.
pub fn spawn_blocking<F, R>(f: F) -> JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use std::sync::Arc;
    use tracing::Dispatch;

    /// The name of the span current on this thread, as `dispatch` sees it.
    fn current(dispatch: &Dispatch) -> Option<&'static str> {
        tracing::dispatcher::with_default(dispatch, || {
            tracing::Span::current().metadata().map(|m| m.name())
        })
    }

    #[tokio::test]
    async fn spawned_work_runs_inside_the_spawners_span() {
        let dispatch = Dispatch::new(tracing_subscriber::registry());
        let _default = tracing::dispatcher::set_default(&dispatch);
        let span = tracing::info_span!("request", id = "abc");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let entered = span.enter();
        let (a, b) = (Arc::clone(&seen), Arc::clone(&seen));
        let (da, db) = (dispatch.clone(), dispatch.clone());
        let task = spawn(async move { a.lock().push(current(&da)) });
        let blocking = spawn_blocking(move || b.lock().push(current(&db)));
        drop(entered);
        task.await.expect("task");
        blocking.await.expect("blocking task");
        assert_eq!(*seen.lock(), [Some("request"), Some("request")]);
        // Without the helper, the same work runs outside the span.
        let c = Arc::clone(&seen);
        let dc = dispatch.clone();
        let entered = span.enter();
        let plain = tokio::task::spawn_blocking(move || c.lock().push(current(&dc)));
        drop(entered);
        plain.await.expect("plain blocking task");
        assert_eq!(seen.lock().last(), Some(&None));
    }
}
