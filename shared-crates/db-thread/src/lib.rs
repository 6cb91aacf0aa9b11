//! One SQLite connection, opened once and owned by a dedicated thread, so no
//! query ever runs on the async runtime. Async code sends closures to that
//! thread with [`DbThread::call`] and awaits their answer.
//!
//! Schemas are versioned with `PRAGMA user_version`: [`migrate`] applies the
//! steps a file has not seen yet, each in its own transaction, and refuses a
//! file written by a newer version.

use std::path::{Path, PathBuf};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

/// Why the thread could not be started or a call could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum DbThreadError {
    /// The file could not be opened or prepared.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// The cause.
        source: rusqlite::Error,
    },
    /// The OS refused a new thread.
    #[error("cannot start the database thread: {0}")]
    Spawn(std::io::Error),
    /// The thread has stopped.
    #[error("the database thread has stopped")]
    Closed,
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// A handle to the thread; cheap to clone. The thread ends when every
/// handle is dropped.
#[derive(Debug, Clone)]
pub struct DbThread {
    jobs: mpsc::Sender<Job>,
}

impl DbThread {
    /// Start a thread named `name` and open `path` on it with `open`
    /// (which also sets pragmas and migrates).
    pub async fn open<F>(path: &Path, name: &str, open: F) -> Result<Self, DbThreadError>
    where
        F: FnOnce(&Path) -> rusqlite::Result<Connection> + Send + 'static,
    {
        let (jobs, mut queue) = mpsc::channel::<Job>(64);
        let (opened_tx, opened) = oneshot::channel();
        let thread_path = path.to_path_buf();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let mut conn = match open(&thread_path) {
                    Ok(conn) => {
                        let _ = opened_tx.send(Ok(()));
                        conn
                    }
                    Err(source) => {
                        let _ = opened_tx.send(Err(source));
                        return;
                    }
                };
                while let Some(job) = queue.blocking_recv() {
                    job(&mut conn);
                }
            })
            .map_err(DbThreadError::Spawn)?;
        match opened.await {
            Ok(Ok(())) => Ok(Self { jobs }),
            Ok(Err(source)) => Err(DbThreadError::Open {
                path: path.to_path_buf(),
                source,
            }),
            Err(_) => Err(DbThreadError::Closed),
        }
    }

    /// Run `f` on the thread and return its result. `E` must say how a
    /// stopped thread is reported.
    pub async fn call<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbThreadError> + Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, E> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = tx.send(f(conn));
        });
        self.jobs
            .send(job)
            .await
            .map_err(|_| E::from(DbThreadError::Closed))?;
        rx.await.map_err(|_| E::from(DbThreadError::Closed))?
    }
}

/// Bring `conn` to `steps.len()` by running the steps it has not seen
/// (`steps[i]` moves version `i` to `i + 1`), each with its version bump in
/// one transaction. A file newer than `steps.len()` is refused rather than
/// used with a schema this binary does not know.
pub fn migrate(conn: &mut Connection, steps: &[&str]) -> rusqlite::Result<()> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let target = i64::try_from(steps.len()).unwrap_or(i64::MAX);
    if current > target {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "the database has schema version {current}, newer than this binary's {target}"
        )));
    }
    for (version, step) in steps.iter().enumerate().skip(current.max(0) as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", version as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct E(String);
    impl From<DbThreadError> for E {
        fn from(e: DbThreadError) -> Self {
            Self(e.to_string())
        }
    }
    impl From<rusqlite::Error> for E {
        fn from(e: rusqlite::Error) -> Self {
            Self(e.to_string())
        }
    }

    const STEPS: [&str; 2] = [
        "CREATE TABLE t (k TEXT PRIMARY KEY)",
        "ALTER TABLE t ADD COLUMN v INTEGER NOT NULL DEFAULT 0",
    ];

    fn open(path: &Path) -> rusqlite::Result<Connection> {
        let mut conn = Connection::open(path)?;
        migrate(&mut conn, &STEPS)?;
        Ok(conn)
    }

    #[tokio::test]
    async fn calls_run_on_the_thread_and_data_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sqlite3");
        let db = DbThread::open(&path, "test-db", open).await.unwrap();
        let name: String = db
            .call(|_| Ok::<_, E>(std::thread::current().name().unwrap_or("").to_owned()))
            .await
            .unwrap();
        assert_eq!(name, "test-db");
        db.call(|c| {
            c.execute("INSERT INTO t (k, v) VALUES ('a', 7)", [])
                .map_err(E::from)
        })
        .await
        .unwrap();
        drop(db);
        let db = DbThread::open(&path, "test-db", open).await.unwrap();
        let v: i64 = db
            .call(|c| {
                c.query_row("SELECT v FROM t WHERE k = 'a'", [], |r| r.get(0))
                    .map_err(E::from)
            })
            .await
            .unwrap();
        assert_eq!(v, 7);
    }

    #[test]
    fn migrations_apply_once_in_order_and_a_newer_file_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, &STEPS[..1]).unwrap();
        migrate(&mut conn, &STEPS).unwrap();
        migrate(&mut conn, &STEPS).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 2);
        let err = migrate(&mut conn, &STEPS[..1]).unwrap_err();
        assert!(err.to_string().contains("newer"), "{err}");
    }

    #[tokio::test]
    async fn an_unopenable_file_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("t.sqlite3");
        let err = DbThread::open(&path, "test-db", open).await.unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
