//! Opening the database: storage URLs, the database directory check, `Storage::open` and its
//! variants, Optuna's schema (created, or its version checked), and the write / read transactions
//! with the statement-cache helpers and the retry on a database that stays locked.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use rusqlite::{Connection, OptionalExtension, Params, Row, Transaction, TransactionBehavior, params};

use super::Storage;

/// Optuna's `SCHEMA_VERSION` (frozen since alembic took over).
pub const SCHEMA_VERSION: i64 = 12;
/// The alembic head revision of Optuna 3.2 – 5.0.
pub const ALEMBIC_VERSION: &str = "v3.2.0.a";
/// The Optuna release whose schema this is, written to `version_info.library_version`.
pub const LIBRARY_VERSION: &str = "5.0.0";
/// How long one statement waits for another process's write lock.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// Extra attempts after a busy timeout expired.
const BUSY_RETRIES: u32 = 3;

/// SQLAlchemy's DDL for Optuna's models, in `create_all` order, byte for byte (SQLite keeps the
/// statement text, and drops the `IF NOT EXISTS` we add so that missing tables are created like
/// `create_all(checkfirst=True)` does).
const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS studies (\n\tstudy_id INTEGER NOT NULL, \n\tstudy_name VARCHAR(512) NOT NULL, \n\tPRIMARY KEY (study_id)\n)",
    "CREATE UNIQUE INDEX IF NOT EXISTS ix_studies_study_name ON studies (study_name)",
    "CREATE TABLE IF NOT EXISTS version_info (\n\tversion_info_id INTEGER NOT NULL, \n\tschema_version INTEGER, \n\tlibrary_version VARCHAR(256), \n\tPRIMARY KEY (version_info_id), \n\tCHECK (version_info_id=1)\n)",
    "CREATE TABLE IF NOT EXISTS study_directions (\n\tstudy_direction_id INTEGER NOT NULL, \n\tdirection VARCHAR(8) NOT NULL, \n\tstudy_id INTEGER NOT NULL, \n\tobjective INTEGER NOT NULL, \n\tPRIMARY KEY (study_direction_id), \n\tUNIQUE (study_id, objective), \n\tFOREIGN KEY(study_id) REFERENCES studies (study_id)\n)",
    "CREATE TABLE IF NOT EXISTS study_user_attributes (\n\tstudy_user_attribute_id INTEGER NOT NULL, \n\tstudy_id INTEGER, \n\t\"key\" VARCHAR(512), \n\tvalue_json TEXT, \n\tPRIMARY KEY (study_user_attribute_id), \n\tUNIQUE (study_id, \"key\"), \n\tFOREIGN KEY(study_id) REFERENCES studies (study_id)\n)",
    "CREATE TABLE IF NOT EXISTS study_system_attributes (\n\tstudy_system_attribute_id INTEGER NOT NULL, \n\tstudy_id INTEGER, \n\t\"key\" VARCHAR(512), \n\tvalue_json TEXT, \n\tPRIMARY KEY (study_system_attribute_id), \n\tUNIQUE (study_id, \"key\"), \n\tFOREIGN KEY(study_id) REFERENCES studies (study_id)\n)",
    "CREATE TABLE IF NOT EXISTS trials (\n\ttrial_id INTEGER NOT NULL, \n\tnumber INTEGER, \n\tstudy_id INTEGER, \n\tstate VARCHAR(8) NOT NULL, \n\tdatetime_start DATETIME, \n\tdatetime_complete DATETIME, \n\tPRIMARY KEY (trial_id), \n\tFOREIGN KEY(study_id) REFERENCES studies (study_id)\n)",
    "CREATE INDEX IF NOT EXISTS ix_trials_study_id ON trials (study_id)",
    "CREATE TABLE IF NOT EXISTS trial_user_attributes (\n\ttrial_user_attribute_id INTEGER NOT NULL, \n\ttrial_id INTEGER, \n\t\"key\" VARCHAR(512), \n\tvalue_json TEXT, \n\tPRIMARY KEY (trial_user_attribute_id), \n\tUNIQUE (trial_id, \"key\"), \n\tFOREIGN KEY(trial_id) REFERENCES trials (trial_id)\n)",
    "CREATE TABLE IF NOT EXISTS trial_system_attributes (\n\ttrial_system_attribute_id INTEGER NOT NULL, \n\ttrial_id INTEGER, \n\t\"key\" VARCHAR(512), \n\tvalue_json TEXT, \n\tPRIMARY KEY (trial_system_attribute_id), \n\tUNIQUE (trial_id, \"key\"), \n\tFOREIGN KEY(trial_id) REFERENCES trials (trial_id)\n)",
    "CREATE TABLE IF NOT EXISTS trial_params (\n\tparam_id INTEGER NOT NULL, \n\ttrial_id INTEGER, \n\tparam_name VARCHAR(512), \n\tparam_value FLOAT, \n\tdistribution_json TEXT, \n\tPRIMARY KEY (param_id), \n\tUNIQUE (trial_id, param_name), \n\tFOREIGN KEY(trial_id) REFERENCES trials (trial_id)\n)",
    "CREATE TABLE IF NOT EXISTS trial_values (\n\ttrial_value_id INTEGER NOT NULL, \n\ttrial_id INTEGER NOT NULL, \n\tobjective INTEGER NOT NULL, \n\tvalue FLOAT, \n\tvalue_type VARCHAR(7) NOT NULL, \n\tPRIMARY KEY (trial_value_id), \n\tUNIQUE (trial_id, objective), \n\tFOREIGN KEY(trial_id) REFERENCES trials (trial_id)\n)",
    "CREATE TABLE IF NOT EXISTS trial_intermediate_values (\n\ttrial_intermediate_value_id INTEGER NOT NULL, \n\ttrial_id INTEGER NOT NULL, \n\tstep INTEGER NOT NULL, \n\tintermediate_value FLOAT, \n\tintermediate_value_type VARCHAR(7) NOT NULL, \n\tPRIMARY KEY (trial_intermediate_value_id), \n\tUNIQUE (trial_id, step), \n\tFOREIGN KEY(trial_id) REFERENCES trials (trial_id)\n)",
    "CREATE TABLE IF NOT EXISTS trial_heartbeats (\n\ttrial_heartbeat_id INTEGER NOT NULL, \n\ttrial_id INTEGER NOT NULL, \n\theartbeat DATETIME NOT NULL, \n\tPRIMARY KEY (trial_heartbeat_id), \n\tUNIQUE (trial_id), \n\tFOREIGN KEY(trial_id) REFERENCES trials (trial_id)\n)",
    "CREATE TABLE IF NOT EXISTS alembic_version (\n\tversion_num VARCHAR(32) NOT NULL, \n\tCONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)\n)",
];

/// Where a storage URL points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageLocation {
    File(PathBuf),
    /// `sqlite:///:memory:` — private to one connection (tests, benchmarks).
    Memory,
}

/// Parses a SQLAlchemy SQLite URL: `sqlite:///relative/path.db`, `sqlite:////absolute/path.db`,
/// or `sqlite:///:memory:`. Anything else is refused with a message saying what is accepted.
pub fn parse_storage_url(url: &str) -> Result<StorageLocation> {
    const FORMS: &str = "expected sqlite:///RELATIVE/PATH.db or sqlite:////ABSOLUTE/PATH.db";
    let Some(rest) = url.strip_prefix("sqlite:///") else {
        if url.starts_with("sqlite:") {
            bail!("--storage {url:?}: malformed SQLite URL ({FORMS})");
        }
        if let Some((scheme, _)) = url.split_once("://") {
            bail!(
                "--storage {url:?}: unsupported database {scheme:?}; hpo-gpu stores studies in SQLite ({FORMS})"
            );
        }
        bail!("--storage {url:?}: not a storage URL ({FORMS}, e.g. sqlite:///{url})");
    };
    if rest.contains('?') {
        bail!("--storage {url:?}: URL query parameters are not supported ({FORMS})");
    }
    if rest.is_empty() {
        bail!("--storage {url:?}: the database path is empty ({FORMS})");
    }
    if rest == ":memory:" {
        return Ok(StorageLocation::Memory);
    }
    // `sqlite:////abs` leaves "/abs" here; `sqlite:///rel` leaves "rel".
    Ok(StorageLocation::File(PathBuf::from(rest)))
}

/// Checks that the directory a database file goes in exists (SQLite would only say "unable to
/// open database file").
pub fn check_database_directory(url: &str, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        if dir.exists() {
            bail!("--storage {url:?}: {} is not a directory", dir.display());
        }
        bail!("--storage {url:?}: directory {} does not exist", dir.display());
    }
    Ok(())
}

fn is_busy(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<rusqlite::Error>(),
            Some(rusqlite::Error::SqliteFailure(e, _))
                if matches!(e.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        )
    })
}

/// `execute` through the statement cache (an `ask` runs the same few statements every time).
pub(super) fn exec<P: Params>(tx: &Transaction, sql: &str, p: P) -> rusqlite::Result<usize> {
    tx.prepare_cached(sql)?.execute(p)
}

/// `query_row` through the statement cache.
pub(super) fn row<T, P: Params, F: FnOnce(&Row<'_>) -> rusqlite::Result<T>>(
    tx: &Transaction,
    sql: &str,
    p: P,
    f: F,
) -> rusqlite::Result<T> {
    tx.prepare_cached(sql)?.query_row(p, f)
}

impl Storage {
    /// Opens (creating if needed) the database a storage URL points to.
    pub fn open(url: &str) -> Result<Self> {
        let location = parse_storage_url(url)?;
        let conn = match &location {
            StorageLocation::Memory => {
                Connection::open_in_memory().context("opening an in-memory database")?
            }
            StorageLocation::File(path) => {
                check_database_directory(url, path)?;
                if path.is_dir() {
                    bail!("--storage {url:?}: {} is a directory, not a database file", path.display());
                }
                Connection::open(path)
                    .with_context(|| format!("--storage {url:?}: cannot open {}", path.display()))?
            }
        };
        let mut storage = Storage { conn, location, url: url.to_string(), cache: HashMap::new() };
        if let Err(e) = storage.configure() {
            // SQLite only looks at the file on the first statement, so this is where a file that
            // is not a database (a CSV, a JSON journal passed by mistake) shows up.
            if let (Some(rusqlite::ErrorCode::NotADatabase), StorageLocation::File(path)) =
                (e.downcast_ref::<rusqlite::Error>().and_then(|e| e.sqlite_error_code()), &storage.location)
            {
                bail!("--storage {url:?}: {} is not an SQLite database", path.display());
            }
            return Err(e.context(format!("--storage {url:?}")));
        }
        storage.init_schema().with_context(|| format!("--storage {url:?}"))?;
        Ok(storage)
    }

    /// Opens the database a storage URL points to only if it exists: the commands that read a
    /// study (`trials`, `best`, `tell`, `plot`, …) must not leave an empty database behind when
    /// the path is mistyped.
    pub fn open_existing(url: &str) -> Result<Self> {
        if let StorageLocation::File(path) = parse_storage_url(url)?
            && !path.exists()
        {
            bail!("--storage {url:?}: {} does not exist", path.display());
        }
        Self::open(url)
    }

    /// Opens the database file at `path` (a convenience for `sqlite:///{path}`).
    pub fn open_path(path: &Path) -> Result<Self> {
        let text = path.to_str().ok_or_else(|| anyhow!("database path {} is not UTF-8", path.display()))?;
        Self::open(&format!("sqlite:///{text}"))
    }

    /// A second connection to the same file (e.g. for a heartbeat thread).
    pub fn reopen(&self) -> Result<Self> {
        match self.location {
            StorageLocation::Memory => bail!("an in-memory storage cannot be opened twice"),
            StorageLocation::File(_) => Self::open(&self.url),
        }
    }

    fn configure(&mut self) -> Result<()> {
        self.conn.busy_timeout(BUSY_TIMEOUT)?;
        self.conn.set_prepared_statement_cache_capacity(64);
        if let StorageLocation::File(_) = self.location {
            // journal_mode returns the mode as a row; WAL persists in the file.
            let mode: String = self.conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                bail!("cannot switch the database to WAL mode (got journal_mode={mode})");
            }
            // In WAL mode NORMAL never corrupts the database; a power cut (not a process crash)
            // may lose the last commits. It saves an fsync per write, most of an `ask`.
            self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        }
        Ok(())
    }

    fn init_schema(&mut self) -> Result<()> {
        self.write(|tx| {
            for stmt in SCHEMA {
                exec(tx, stmt, [])?;
            }
            let version: Option<(Option<i64>, Option<String>)> = tx
                .query_row("SELECT schema_version, library_version FROM version_info", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()?;
            match version {
                None => {
                    exec(tx,
                        "INSERT INTO version_info (version_info_id, schema_version, library_version) VALUES (1, ?1, ?2)",
                        params![SCHEMA_VERSION, LIBRARY_VERSION],
                    )?;
                }
                Some((Some(SCHEMA_VERSION), _)) => {}
                Some((v, lib)) => bail!(
                    "the database has Optuna schema version {} (written by Optuna {}); hpo-gpu reads version {SCHEMA_VERSION}",
                    v.map(|v| v.to_string()).unwrap_or_else(|| "NULL".into()),
                    lib.unwrap_or_else(|| "?".into())
                ),
            }
            let revisions: Vec<String> = tx
                .prepare_cached("SELECT version_num FROM alembic_version")?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            match revisions.as_slice() {
                [] => {
                    exec(tx, "INSERT INTO alembic_version (version_num) VALUES (?1)", [ALEMBIC_VERSION])?;
                }
                [r] if r == ALEMBIC_VERSION => {}
                other => bail!(
                    "the database is at Optuna schema revision {other:?}, hpo-gpu reads {ALEMBIC_VERSION}; \
                     run `optuna storage upgrade --storage URL` with Optuna >= 3.2 first"
                ),
            }
            Ok(())
        })
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction, retrying when the database stays locked
    /// past the busy timeout.
    pub fn write<T>(&mut self, mut f: impl FnMut(&Transaction) -> Result<T>) -> Result<T> {
        let mut attempt = 0;
        loop {
            let result = (|| {
                let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let out = f(&tx)?;
                tx.commit()?;
                Ok(out)
            })();
            match result {
                Err(e) if is_busy(&e) && attempt < BUSY_RETRIES => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(50 * u64::from(attempt)));
                }
                Err(e) if is_busy(&e) => {
                    return Err(e.context(format!(
                        "the database stayed locked by another process for over {} s",
                        BUSY_TIMEOUT.as_secs() * u64::from(BUSY_RETRIES + 1)
                    )));
                }
                other => return other,
            }
        }
    }

    /// Runs `f` in one read transaction, so that several queries see one snapshot.
    pub(super) fn read<T>(&mut self, f: impl FnOnce(&Transaction) -> Result<T>) -> Result<T> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_urls() {
        assert_eq!(
            parse_storage_url("sqlite:///optuna_trials.db").unwrap(),
            StorageLocation::File("optuna_trials.db".into())
        );
        assert_eq!(
            parse_storage_url("sqlite:////tmp/x/a.db").unwrap(),
            StorageLocation::File("/tmp/x/a.db".into())
        );
        assert_eq!(parse_storage_url("sqlite:///:memory:").unwrap(), StorageLocation::Memory);
        for (bad, want) in [
            ("postgresql://u@h/db", "unsupported database \"postgresql\""),
            ("optuna.db", "not a storage URL"),
            ("sqlite://", "malformed SQLite URL"),
            ("sqlite:/a.db", "malformed SQLite URL"),
            ("sqlite:///", "path is empty"),
            ("sqlite:///a.db?timeout=3", "query parameters"),
        ] {
            let err = parse_storage_url(bad).unwrap_err().to_string();
            assert!(err.contains(want), "{bad}: {err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:///{}/missing/a.db", dir.path().display());
        assert!(Storage::open(&url).err().unwrap().to_string().contains("does not exist"));
    }

    #[test]
    fn bad_databases_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, vec![0x42u8; 8192]).unwrap();
        let err = format!("{:#}", Storage::open_path(&garbage).err().unwrap());
        assert!(err.contains("garbage.db") && err.contains("is not an SQLite database"), "{err}");

        let old = dir.path().join("old.db");
        drop(Storage::open_path(&old).unwrap());
        let conn = Connection::open(&old).unwrap();
        conn.execute("UPDATE alembic_version SET version_num = 'v3.0.0.d'", []).unwrap();
        let err = format!("{:#}", Storage::open_path(&old).err().unwrap());
        assert!(err.contains("v3.0.0.d") && err.contains("optuna storage upgrade"), "{err}");
        conn.execute("UPDATE version_info SET schema_version = 11", []).unwrap();
        let err = format!("{:#}", Storage::open_path(&old).err().unwrap());
        assert!(err.contains("schema version 11"), "{err}");
    }
}
