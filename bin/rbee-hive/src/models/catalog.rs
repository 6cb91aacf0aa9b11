//! The model catalog: one SQLite file under the models directory, opened
//! once and owned by a dedicated thread, so no query ever runs on the async
//! runtime. Handles send closures to that thread and await the answer.

use std::path::{Path, PathBuf};

use db_thread::{DbThread, DbThreadError};
use rbee_api::models::ModelEntry;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

/// The catalog's file name inside the models directory.
pub const CATALOG_FILE: &str = "catalog.sqlite3";

const SCHEMA_VERSION: i64 = 1;

/// A catalog failure; the cause is logged, clients see `INTERNAL`.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// SQLite refused.
    #[error("model catalog: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored row could not be decoded.
    #[error("model catalog: corrupt row: {0}")]
    Corrupt(String),
    /// The catalog thread has stopped.
    #[error("model catalog: the catalog thread has stopped")]
    Closed,
    /// The file could not be opened.
    #[error("cannot open the model catalog {path}: {source}")]
    Open {
        /// The catalog file.
        path: PathBuf,
        /// The cause.
        source: rusqlite::Error,
    },
}

/// One file a catalog entry owns (or, for `file:` models, points at).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    /// Absolute path.
    pub path: PathBuf,
    /// Size when provisioned.
    pub size: u64,
}

/// A catalog row: what the API shows plus the files behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogRecord {
    /// The public part.
    pub entry: ModelEntry,
    /// Every file of the model.
    pub files: Vec<StoredFile>,
}

/// A handle to the catalog thread; cheap to clone.
#[derive(Debug, Clone)]
pub struct Catalog {
    db: DbThread,
}

impl From<DbThreadError> for CatalogError {
    fn from(e: DbThreadError) -> Self {
        match e {
            DbThreadError::Open { path, source } => Self::Open { path, source },
            DbThreadError::Spawn(e) => {
                Self::Corrupt(format!("cannot start the catalog thread: {e}"))
            }
            DbThreadError::Closed => Self::Closed,
        }
    }
}

impl Catalog {
    /// Open (or create) `dir/catalog.sqlite3` on a new thread that owns the
    /// connection until every handle is dropped.
    pub async fn open(dir: &Path) -> Result<Self, CatalogError> {
        let path = dir.join(CATALOG_FILE);
        let db = DbThread::open(&path, "model-catalog", open_connection).await?;
        Ok(Self { db })
    }

    /// Run `f` on the catalog thread and return its result.
    async fn call<T, F>(&self, f: F) -> Result<T, CatalogError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, CatalogError> + Send + 'static,
    {
        self.db.call(f).await
    }

    /// Every provisioned model, ordered by reference.
    pub async fn list(&self) -> Result<Vec<CatalogRecord>, CatalogError> {
        self.call(|conn| {
            let mut stmt = conn.prepare(&format!("{SELECT} ORDER BY model_ref"))?;
            let rows = stmt.query_map([], read_row)?;
            rows.map(|r| r.map_err(CatalogError::from).and_then(decode))
                .collect()
        })
        .await
    }

    /// One model by reference.
    pub async fn get(&self, model_ref: &str) -> Result<Option<CatalogRecord>, CatalogError> {
        let model_ref = model_ref.to_owned();
        self.call(move |conn| {
            conn.query_row(
                &format!("{SELECT} WHERE model_ref = ?1"),
                [model_ref],
                read_row,
            )
            .optional()?
            .map(decode)
            .transpose()
        })
        .await
    }

    /// Add or replace a model and drop its pending-download mark, in one
    /// transaction.
    pub async fn insert(&self, record: CatalogRecord) -> Result<(), CatalogError> {
        self.call(move |conn| {
            let files = serde_json::to_string(&record.files)
                .map_err(|e| CatalogError::Corrupt(e.to_string()))?;
            let e = &record.entry;
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT OR REPLACE INTO models (model_ref, provider, local_path, format, size_bytes, \
                 sha256, revision, files, downloaded_at, last_used) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    e.model_ref,
                    e.provider,
                    e.local_path,
                    e.format,
                    i64::try_from(e.size_bytes).unwrap_or(i64::MAX),
                    e.sha256,
                    e.revision,
                    files,
                    e.downloaded_at,
                    e.last_used
                ],
            )?;
            tx.execute("DELETE FROM pending WHERE model_ref = ?1", [&e.model_ref])?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Remove a model; returns the removed row.
    pub async fn remove(&self, model_ref: &str) -> Result<Option<CatalogRecord>, CatalogError> {
        let model_ref = model_ref.to_owned();
        self.call(move |conn| {
            let tx = conn.transaction()?;
            let row = tx
                .query_row(
                    &format!("{SELECT} WHERE model_ref = ?1"),
                    [&model_ref],
                    read_row,
                )
                .optional()?
                .map(decode)
                .transpose()?;
            tx.execute("DELETE FROM models WHERE model_ref = ?1", [&model_ref])?;
            tx.commit()?;
            Ok(row)
        })
        .await
    }

    /// Record that a worker used `model_ref` at `when` (RFC 3339); false
    /// when the model is not in the catalog.
    pub async fn mark_used(&self, model_ref: &str, when: String) -> Result<bool, CatalogError> {
        let model_ref = model_ref.to_owned();
        self.call(move |conn| {
            Ok(conn.execute(
                "UPDATE models SET last_used = ?1 WHERE model_ref = ?2",
                params![when, model_ref],
            )? == 1)
        })
        .await
    }

    /// Mark a download as started, so a restart resumes it.
    pub async fn add_pending(
        &self,
        model_ref: &str,
        started_at: String,
    ) -> Result<(), CatalogError> {
        let model_ref = model_ref.to_owned();
        self.call(move |conn| {
            conn.execute(
                "INSERT OR REPLACE INTO pending (model_ref, started_at) VALUES (?1, ?2)",
                params![model_ref, started_at],
            )?;
            Ok(())
        })
        .await
    }

    /// Forget a download that will not be resumed.
    pub async fn remove_pending(&self, model_ref: &str) -> Result<(), CatalogError> {
        let model_ref = model_ref.to_owned();
        self.call(move |conn| {
            conn.execute("DELETE FROM pending WHERE model_ref = ?1", [model_ref])?;
            Ok(())
        })
        .await
    }

    /// Downloads that were running when the hive last stopped.
    pub async fn pending(&self) -> Result<Vec<String>, CatalogError> {
        self.call(|conn| {
            let mut stmt = conn.prepare("SELECT model_ref FROM pending ORDER BY started_at")?;
            let rows = stmt.query_map([], |row| row.get::<_, String>(0))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Drop every model whose files are gone or changed size on disk (a
    /// file deleted by hand); returns the references dropped. Runs on the
    /// catalog thread, file checks included.
    pub async fn reconcile(&self) -> Result<Vec<String>, CatalogError> {
        self.call(|conn| {
            let records = {
                let mut stmt = conn.prepare(SELECT)?;
                let rows = stmt.query_map([], read_row)?;
                rows.map(|r| r.map_err(CatalogError::from).and_then(decode))
                    .collect::<Result<Vec<_>, _>>()?
            };
            let mut dropped = Vec::new();
            for record in records {
                let missing = record.files.iter().any(|f| {
                    std::fs::metadata(&f.path)
                        .map(|m| !m.is_file() || m.len() != f.size)
                        .unwrap_or(true)
                });
                if missing {
                    conn.execute(
                        "DELETE FROM models WHERE model_ref = ?1",
                        [&record.entry.model_ref],
                    )?;
                    dropped.push(record.entry.model_ref);
                }
            }
            Ok(dropped)
        })
        .await
    }
}

const SELECT: &str = "SELECT model_ref, provider, local_path, format, size_bytes, sha256, \
                      revision, files, downloaded_at, last_used FROM models";

type RawRow = (ModelEntry, String);

fn read_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok((
        ModelEntry {
            model_ref: row.get(0)?,
            provider: row.get(1)?,
            local_path: row.get(2)?,
            format: row.get(3)?,
            size_bytes: u64::try_from(row.get::<_, i64>(4)?).unwrap_or(0),
            sha256: row.get(5)?,
            revision: row.get(6)?,
            downloaded_at: row.get(8)?,
            last_used: row.get(9)?,
        },
        row.get(7)?,
    ))
}

fn decode((entry, files): RawRow) -> Result<CatalogRecord, CatalogError> {
    let files = serde_json::from_str(&files)
        .map_err(|e| CatalogError::Corrupt(format!("{}: files: {e}", entry.model_ref)))?;
    Ok(CatalogRecord { entry, files })
}

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "schema version {version} is newer than this rbee-hive understands ({SCHEMA_VERSION})"
        )));
    }
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS models (
            model_ref TEXT PRIMARY KEY NOT NULL,
            provider TEXT NOT NULL,
            local_path TEXT NOT NULL,
            format TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            revision TEXT,
            files TEXT NOT NULL,
            downloaded_at TEXT NOT NULL,
            last_used TEXT
         );
         CREATE TABLE IF NOT EXISTS pending (
            model_ref TEXT PRIMARY KEY NOT NULL,
            started_at TEXT NOT NULL
         );",
    )?;
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(model_ref: &str, path: &Path, size: u64) -> CatalogRecord {
        CatalogRecord {
            entry: ModelEntry {
                model_ref: model_ref.to_owned(),
                provider: "file".to_owned(),
                local_path: path.display().to_string(),
                format: "gguf".to_owned(),
                size_bytes: size,
                sha256: "ab".repeat(32),
                revision: None,
                downloaded_at: "2026-01-01T00:00:00Z".to_owned(),
                last_used: None,
            },
            files: vec![StoredFile {
                path: path.to_path_buf(),
                size,
            }],
        }
    }

    #[tokio::test]
    async fn rows_survive_reopening_and_pending_marks_clear_on_insert() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.gguf");
        std::fs::write(&file, b"GGUFxxxx").unwrap();
        {
            let catalog = Catalog::open(dir.path()).await.unwrap();
            catalog
                .add_pending("file:/m.gguf", "2026-01-01T00:00:00Z".into())
                .await
                .unwrap();
            assert_eq!(catalog.pending().await.unwrap(), vec!["file:/m.gguf"]);
            catalog
                .insert(record("file:/m.gguf", &file, 8))
                .await
                .unwrap();
            assert!(catalog.pending().await.unwrap().is_empty());
            assert!(catalog
                .mark_used("file:/m.gguf", "2026-02-02T00:00:00Z".into())
                .await
                .unwrap());
            assert!(!catalog
                .mark_used("file:/other", "2026-02-02T00:00:00Z".into())
                .await
                .unwrap());
        }
        let catalog = Catalog::open(dir.path()).await.unwrap();
        let got = catalog.get("file:/m.gguf").await.unwrap().unwrap();
        assert_eq!(got.files[0].size, 8);
        assert_eq!(got.entry.last_used.as_deref(), Some("2026-02-02T00:00:00Z"));
    }

    #[tokio::test]
    async fn reconcile_drops_rows_whose_files_are_gone_or_changed() {
        let dir = tempfile::tempdir().unwrap();
        let kept = dir.path().join("kept.gguf");
        let gone = dir.path().join("gone.gguf");
        let changed = dir.path().join("changed.gguf");
        for p in [&kept, &gone, &changed] {
            std::fs::write(p, b"GGUFxxxx").unwrap();
        }
        let catalog = Catalog::open(dir.path()).await.unwrap();
        for (r, p) in [
            ("file:/kept", &kept),
            ("file:/gone", &gone),
            ("file:/changed", &changed),
        ] {
            catalog.insert(record(r, p, 8)).await.unwrap();
        }
        std::fs::remove_file(&gone).unwrap();
        std::fs::write(&changed, b"GGUF").unwrap();
        let mut dropped = catalog.reconcile().await.unwrap();
        dropped.sort();
        assert_eq!(dropped, vec!["file:/changed", "file:/gone"]);
        let left: Vec<_> = catalog
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.entry.model_ref)
            .collect();
        assert_eq!(left, vec!["file:/kept"]);
    }

    #[tokio::test]
    async fn an_unopenable_catalog_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CATALOG_FILE), vec![0x42; 4096]).unwrap();
        let err = Catalog::open(dir.path()).await.unwrap_err();
        assert!(err.to_string().contains(CATALOG_FILE), "{err}");
    }
}
