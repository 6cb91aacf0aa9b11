//! The hive registry on disk: one SQLite file (`--database`), opened once
//! and owned by its own thread ([`db_thread::DbThread`]), so a slow disk
//! never blocks the async runtime. Schema versions are migrated in order.

use std::path::Path;

use db_thread::{DbThread, DbThreadError};
use rusqlite::{params, Connection};

/// Schema steps; `MIGRATIONS[i]` moves version `i` to `i + 1`.
const MIGRATIONS: [&str; 1] = ["CREATE TABLE hives (
        node_name     TEXT PRIMARY KEY,
        url           TEXT NOT NULL,
        source        TEXT NOT NULL,
        registered_at TEXT NOT NULL
    )"];

/// A registry failure; the cause is logged, clients see `INTERNAL`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused.
    #[error("hive registry: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database thread failed or stopped.
    #[error("hive registry: {0}")]
    Thread(#[from] DbThreadError),
    /// The directory for the file could not be made.
    #[error("cannot create {dir}: {source}")]
    Dir {
        /// The directory.
        dir: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// One persisted hive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredHive {
    /// Unique name.
    pub node_name: String,
    /// Base URL.
    pub url: String,
    /// `config` (`--hive` or the settings file) or `registered`.
    pub source: String,
    /// RFC 3339.
    pub registered_at: String,
}

/// A handle to the registry file; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    db: DbThread,
}

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let mut conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    db_thread::migrate(&mut conn, &MIGRATIONS)?;
    Ok(conn)
}

impl Store {
    /// Open (or create, with its directory) the registry at `path`.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                dir: dir.display().to_string(),
                source,
            })?;
        }
        let db = DbThread::open(path, "hive-registry", open_connection).await?;
        Ok(Self { db })
    }

    /// Every hive, by name.
    pub async fn list(&self) -> Result<Vec<StoredHive>, StoreError> {
        self.db
            .call(|conn| {
                let mut stmt = conn.prepare(
                    "SELECT node_name, url, source, registered_at FROM hives ORDER BY node_name",
                )?;
                let rows = stmt.query_map([], |r| {
                    Ok(StoredHive {
                        node_name: r.get(0)?,
                        url: r.get(1)?,
                        source: r.get(2)?,
                        registered_at: r.get(3)?,
                    })
                })?;
                rows.collect::<Result<Vec<_>, _>>()
                    .map_err(StoreError::from)
            })
            .await
    }

    /// Insert or replace `hive`.
    pub async fn upsert(&self, hive: StoredHive) -> Result<(), StoreError> {
        self.db
            .call(move |conn| {
                conn.execute(
                    "INSERT INTO hives (node_name, url, source, registered_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(node_name) DO UPDATE SET url = excluded.url, source = excluded.source,
                     registered_at = excluded.registered_at",
                    params![hive.node_name, hive.url, hive.source, hive.registered_at],
                )?;
                Ok(())
            })
            .await
    }

    /// Delete `node_name`; true when it existed.
    pub async fn remove(&self, node_name: &str) -> Result<bool, StoreError> {
        let name = node_name.to_owned();
        self.db
            .call(move |conn| {
                Ok(conn.execute("DELETE FROM hives WHERE node_name = ?1", params![name])? > 0)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hive(name: &str, url: &str) -> StoredHive {
        StoredHive {
            node_name: name.to_owned(),
            url: url.to_owned(),
            source: "registered".to_owned(),
            registered_at: "2026-01-01T00:00:00Z".to_owned(),
        }
    }

    #[tokio::test]
    async fn hives_survive_a_reopen_and_an_upsert_replaces_the_url() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join("queen.sqlite3");
        let store = Store::open(&path).await.unwrap();
        store.upsert(hive("b", "http://b:9200")).await.unwrap();
        store.upsert(hive("a", "http://a:9200")).await.unwrap();
        store.upsert(hive("a", "http://a2:9200")).await.unwrap();
        drop(store);
        let store = Store::open(&path).await.unwrap();
        let all = store.list().await.unwrap();
        assert_eq!(
            all,
            vec![hive("a", "http://a2:9200"), hive("b", "http://b:9200")]
        );
        assert!(store.remove("a").await.unwrap());
        assert!(!store.remove("a").await.unwrap());
        assert_eq!(store.list().await.unwrap().len(), 1);
    }
}
