//! SQLite storage in exactly Optuna 5.0's RDB schema, so `optuna.load_study`, Optuna's plots and
//! optuna-dashboard read our studies unchanged and we continue studies Python started.
//!
//! What "exactly" means here, checked against a database written by Optuna 5.0.0:
//! - the same `CREATE` statements (SQLAlchemy's DDL text, so `sqlite3 .schema` matches), with
//!   `version_info` = (1, 12, "5.0.0") and `alembic_version` = `v3.2.0.a`, so Optuna runs no
//!   migration;
//! - enums stored by name (`COMPLETE`, `MAXIMIZE`, `FINITE`/`INF_POS`/`INF_NEG`/`NAN`);
//! - `distribution_json` byte-identical to `distribution_to_json`; categorical `param_value` is the
//!   index of the choice; attributes are `json.dumps` text;
//! - datetimes are naive UTC text `YYYY-MM-DD HH:MM:SS.ffffff`;
//! - a trial's `number` is the count of the study's trials with a smaller `trial_id`, computed in
//!   the transaction that inserts it.
//!
//! Concurrency: every write is one `BEGIN IMMEDIATE` transaction (the database write lock is taken
//! up front, so two processes never both read a count and then both insert), the journal is WAL
//! (with `synchronous=NORMAL`: durable across process crashes, and a power cut can only lose the
//! last commits), and a 30 s busy timeout plus a few retries let several worker processes share
//! one file.
//!
//! Heartbeats (`trial_heartbeats`) follow Optuna's RDBStorage: a RUNNING trial whose heartbeat is
//! older than the grace period is stale; [`Storage::fail_stale_trials`] marks it FAIL and, like
//! `RetryHeartbeatStaleTrialCallback`, re-queues its parameters as a WAITING trial carrying the
//! system attributes `failed_trial` and `retry_history`. RUNNING trials without any heartbeat
//! (from `ask`, or Python without heartbeats) are never considered stale, as in Optuna.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use rusqlite::{Connection, OptionalExtension, Params, Row, Transaction, TransactionBehavior, params};
use serde_json::Value;

use super::{FrozenTrial, StudyDirection, StudyRef, TrialParam, TrialState, UtcDateTime};
use crate::search::distributions::Distribution;
use crate::search::pyjson;

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

/// What a new trial starts with (Optuna's "template trial" of `create_new_trial`).
#[derive(Clone, Debug)]
pub struct NewTrial {
    pub state: TrialState,
    pub values: Option<Vec<f64>>,
    pub datetime_start: Option<UtcDateTime>,
    pub datetime_complete: Option<UtcDateTime>,
    /// (name, internal value, distribution)
    pub params: Vec<(String, f64, Distribution)>,
    /// (key, JSON text as `json.dumps` writes it)
    pub user_attrs: Vec<(String, String)>,
    pub system_attrs: Vec<(String, String)>,
    pub intermediate_values: Vec<(i64, f64)>,
}

impl NewTrial {
    /// An empty trial in `state`, started now unless it is WAITING.
    pub fn new(state: TrialState) -> Self {
        NewTrial {
            state,
            values: None,
            datetime_start: (state != TrialState::Waiting).then(UtcDateTime::now),
            datetime_complete: state.is_finished().then(UtcDateTime::now),
            params: Vec::new(),
            user_attrs: Vec::new(),
            system_attrs: Vec::new(),
            intermediate_values: Vec::new(),
        }
    }
}

/// Result of [`Storage::start_trial`].
#[derive(Clone, Debug)]
pub enum StartOutcome {
    /// A RUNNING trial: a popped WAITING trial (with its stored params) or a new one.
    Started(FrozenTrial),
    /// `finished + live running >= target`: nothing to start now.
    TargetReached { finished: u64, running: u64 },
}

/// Per-state trial counts of a study.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrialCounts {
    pub running: u64,
    pub waiting: u64,
    pub complete: u64,
    pub pruned: u64,
    pub fail: u64,
}

impl TrialCounts {
    pub fn finished_ok(&self) -> u64 {
        self.complete + self.pruned
    }
}

/// A connection to one Optuna-schema SQLite database.
pub struct Storage {
    conn: Connection,
    location: StorageLocation,
    url: String,
    /// Trials per study as last read. Finished trials never change (they cannot be updated),
    /// so a refresh only reads new trials and the ones that were unfinished (Optuna's RDB
    /// storage caches the same way).
    cache: HashMap<i64, Vec<FrozenTrial>>,
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
fn exec<P: Params>(tx: &Transaction, sql: &str, p: P) -> rusqlite::Result<usize> {
    tx.prepare_cached(sql)?.execute(p)
}

/// `query_row` through the statement cache.
fn row<T, P: Params, F: FnOnce(&Row<'_>) -> rusqlite::Result<T>>(
    tx: &Transaction,
    sql: &str,
    p: P,
    f: F,
) -> rusqlite::Result<T> {
    tx.prepare_cached(sql)?.query_row(p, f)
}

fn value_to_stored(v: f64) -> (Option<f64>, &'static str) {
    if v.is_nan() {
        (None, "NAN")
    } else if v == f64::INFINITY {
        (None, "INF_POS")
    } else if v == f64::NEG_INFINITY {
        (None, "INF_NEG")
    } else {
        (Some(v), "FINITE")
    }
}

fn stored_to_value(v: Option<f64>, kind: &str) -> Result<f64> {
    match (kind, v) {
        ("FINITE", Some(x)) => Ok(x),
        ("INF_POS", _) => Ok(f64::INFINITY),
        ("INF_NEG", _) => Ok(f64::NEG_INFINITY),
        ("NAN", _) => Ok(f64::NAN),
        ("FINITE", None) => bail!("a FINITE value is NULL"),
        (other, _) => bail!("unknown value type {other:?}"),
    }
}

fn parse_datetime(text: Option<String>) -> Result<Option<UtcDateTime>> {
    text.map(|t| UtcDateTime::parse(&t)).transpose()
}

/// Optuna's `check_distribution_compatibility`.
pub fn check_distribution_compatibility(name: &str, old: &Distribution, new: &Distribution) -> Result<()> {
    match (old, new) {
        (Distribution::Float(a), Distribution::Float(b)) if a.log != b.log => {}
        (Distribution::Int(a), Distribution::Int(b)) if a.log != b.log => {}
        (Distribution::Float(_), Distribution::Float(_)) | (Distribution::Int(_), Distribution::Int(_)) => {
            return Ok(());
        }
        (Distribution::Categorical(a), Distribution::Categorical(b)) => {
            if a.choices.len() == b.choices.len() && a.choices.iter().zip(&b.choices).all(|(x, y)| x.py_eq(y))
            {
                return Ok(());
            }
            bail!(
                "parameter {name:?}: the study already uses choices {} and cannot change them to {} \
                 (CategoricalDistribution does not support a dynamic value space)",
                old.to_json(),
                new.to_json()
            );
        }
        _ => bail!(
            "parameter {name:?}: the study already uses a {} and cannot switch to a {}",
            old.class_name(),
            new.class_name()
        ),
    }
    bail!("parameter {name:?}: the study already uses {} and cannot change its log setting", old.to_json())
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

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn location(&self) -> &StorageLocation {
        &self.location
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
    fn read<T>(&mut self, f: impl FnOnce(&Transaction) -> Result<T>) -> Result<T> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    // ----- studies -----

    /// Creates a study, or with `load_if_exists` loads it (refusing a different direction).
    pub fn create_study(
        &mut self,
        name: &str,
        direction: StudyDirection,
        load_if_exists: bool,
    ) -> Result<StudyRef> {
        if name.is_empty() || name.len() > 512 {
            bail!("study name must be 1 to 512 bytes, got {} bytes", name.len());
        }
        let created = self.write(|tx| {
            let existing: Option<i64> = tx
                .query_row("SELECT study_id FROM studies WHERE study_name = ?1", [name], |r| r.get(0))
                .optional()?;
            if existing.is_some() {
                return Ok(false);
            }
            exec(tx, "INSERT INTO studies (study_name) VALUES (?1)", [name])?;
            let study_id = tx.last_insert_rowid();
            exec(
                tx,
                "INSERT INTO study_directions (direction, study_id, objective) VALUES (?1, ?2, 0)",
                params![direction.as_str(), study_id],
            )?;
            Ok(true)
        })?;
        let study = self.load_study(name)?;
        if !created {
            if !load_if_exists {
                bail!(
                    "a study named {name:?} already exists in {} (load it instead of creating it)",
                    self.url
                );
            }
            if study.directions != [direction] {
                bail!(
                    "study {name:?} in {} has direction {}, not {direction}",
                    self.url,
                    study.directions.iter().map(|d| d.as_str()).collect::<Vec<_>>().join(", ")
                );
            }
        }
        Ok(study)
    }

    /// Loads a study by name; the error lists the studies that exist.
    pub fn load_study(&mut self, name: &str) -> Result<StudyRef> {
        let url = self.url.clone();
        self.read(|tx| {
            let id: Option<i64> = tx
                .query_row("SELECT study_id FROM studies WHERE study_name = ?1", [name], |r| r.get(0))
                .optional()?;
            let Some(study_id) = id else {
                let names: Vec<String> = tx
                    .prepare_cached("SELECT study_name FROM studies ORDER BY study_id")?
                    .query_map([], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                if names.is_empty() {
                    bail!("no study named {name:?} in {url} (the storage has no studies)");
                }
                bail!("no study named {name:?} in {url} (studies: {})", names.join(", "));
            };
            Ok(StudyRef { study_id, name: name.to_string(), directions: study_directions(tx, study_id)? })
        })
    }

    /// All studies, in creation order.
    pub fn studies(&mut self) -> Result<Vec<StudyRef>> {
        self.read(|tx| {
            let rows: Vec<(i64, String)> = tx
                .prepare_cached("SELECT study_id, study_name FROM studies ORDER BY study_id")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            rows.into_iter()
                .map(|(study_id, name)| {
                    Ok(StudyRef { study_id, name, directions: study_directions(tx, study_id)? })
                })
                .collect()
        })
    }

    /// Sets a study user attribute (`json.dumps(value)` text).
    pub fn set_study_user_attr(&mut self, study_id: i64, key: &str, value: &Value) -> Result<()> {
        let json = pyjson::dumps(value);
        self.write(|tx| {
            exec(
                tx,
                "INSERT INTO study_user_attributes (study_id, \"key\", value_json) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (study_id, \"key\") DO UPDATE SET value_json = excluded.value_json",
                params![study_id, key, json],
            )?;
            Ok(())
        })
    }

    pub fn study_user_attrs(&mut self, study_id: i64) -> Result<BTreeMap<String, Value>> {
        self.read(|tx| {
            attrs_of(
                tx,
                "SELECT \"key\", value_json FROM study_user_attributes WHERE study_id = ?1",
                study_id,
            )
        })
    }

    pub fn study_system_attrs(&mut self, study_id: i64) -> Result<BTreeMap<String, Value>> {
        self.read(|tx| {
            attrs_of(
                tx,
                "SELECT \"key\", value_json FROM study_system_attributes WHERE study_id = ?1",
                study_id,
            )
        })
    }

    // ----- trials: writes -----

    /// Creates a trial from a template in one transaction (Optuna's `create_new_trial`) and
    /// returns it as stored.
    pub fn create_trial(&mut self, study_id: i64, template: &NewTrial) -> Result<FrozenTrial> {
        let trial_id = self.write(|tx| insert_trial(tx, study_id, template))?;
        self.trial(trial_id)
    }

    /// Starts a trial for a worker, in one transaction:
    /// 1. with `target = Some(n)`: if COMPLETE + PRUNED + (RUNNING trials that have a heartbeat)
    ///    already reach `n`, starts nothing;
    /// 2. otherwise takes the oldest WAITING trial (re-queued or enqueued) and makes it RUNNING,
    ///    or creates a new RUNNING trial;
    /// 3. with `heartbeat`, records the first heartbeat in the same transaction, so a worker that
    ///    dies at any point leaves a trial that becomes stale.
    pub fn start_trial(
        &mut self,
        study_id: i64,
        target: Option<u64>,
        heartbeat: bool,
    ) -> Result<StartOutcome> {
        let started = self.write(|tx| {
            if let Some(target) = target {
                let (finished, running): (i64, i64) = row(tx,
                    "SELECT \
                       (SELECT COUNT(*) FROM trials WHERE study_id = ?1 AND state IN ('COMPLETE', 'PRUNED')), \
                       (SELECT COUNT(*) FROM trials t JOIN trial_heartbeats h ON h.trial_id = t.trial_id \
                        WHERE t.study_id = ?1 AND t.state = 'RUNNING')",
                    [study_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                let (finished, running) = (finished as u64, running as u64);
                if finished + running >= target {
                    return Ok(Err(StartOutcome::TargetReached { finished, running }));
                }
            }
            let now = UtcDateTime::now().format();
            let waiting: Option<i64> = tx
                .query_row(
                    "SELECT trial_id FROM trials WHERE study_id = ?1 AND state = 'WAITING' ORDER BY trial_id LIMIT 1",
                    [study_id],
                    |r| r.get(0),
                )
                .optional()?;
            let trial_id = match waiting {
                Some(id) => {
                    exec(tx,
                        "UPDATE trials SET state = 'RUNNING', datetime_start = ?2 WHERE trial_id = ?1",
                        params![id, now],
                    )?;
                    id
                }
                None => insert_trial(tx, study_id, &NewTrial::new(TrialState::Running))?,
            };
            if heartbeat {
                upsert_heartbeat(tx, trial_id)?;
            }
            Ok(Ok(trial_id))
        })?;
        match started {
            Ok(trial_id) => Ok(StartOutcome::Started(self.trial(trial_id)?)),
            Err(outcome) => Ok(outcome),
        }
    }

    /// Stores several parameters of a not-yet-finished trial in one transaction, checking each
    /// against the distribution the study already uses for that name.
    pub fn set_trial_params(&mut self, trial_id: i64, items: &[(String, f64, Distribution)]) -> Result<()> {
        self.write(|tx| {
            let (study_id, _) = check_updatable(tx, trial_id)?;
            for (name, internal, dist) in items {
                insert_param(tx, study_id, trial_id, name, *internal, dist)?;
            }
            Ok(())
        })
    }

    /// Records one intermediate value and user attributes (JSON text) in one transaction.
    pub fn report(
        &mut self,
        trial_id: i64,
        step: i64,
        value: f64,
        user_attrs: &[(String, String)],
    ) -> Result<()> {
        self.write(|tx| {
            check_updatable(tx, trial_id)?;
            upsert_intermediate(tx, trial_id, step, value)?;
            for (k, v) in user_attrs {
                upsert_attr(tx, "trial_user_attributes", trial_id, k, v)?;
            }
            Ok(())
        })
    }

    /// Sets a user attribute from `json.dumps`-style text.
    pub fn set_trial_user_attr(&mut self, trial_id: i64, key: &str, json: &str) -> Result<()> {
        self.write(|tx| {
            check_updatable(tx, trial_id)?;
            upsert_attr(tx, "trial_user_attributes", trial_id, key, json)
        })
    }

    /// Sets a system attribute from `json.dumps`-style text.
    pub fn set_trial_system_attr(&mut self, trial_id: i64, key: &str, json: &str) -> Result<()> {
        self.write(|tx| {
            check_updatable(tx, trial_id)?;
            upsert_attr(tx, "trial_system_attributes", trial_id, key, json)
        })
    }

    /// Finishes (or moves) a trial: Optuna's `set_trial_state_values`. `system_attrs` (JSON
    /// text) are written in the same transaction, e.g. `fail_reason`. A NaN objective value is
    /// refused: Optuna stores such a trial as FAIL without values.
    pub fn set_trial_state(
        &mut self,
        trial_id: i64,
        state: TrialState,
        values: Option<&[f64]>,
        system_attrs: &[(String, String)],
    ) -> Result<()> {
        if let Some(vs) = values
            && vs.iter().any(|v| v.is_nan())
        {
            bail!("objective value NaN cannot be stored; tell the trial FAIL instead");
        }
        self.write(|tx| {
            check_updatable(tx, trial_id)?;
            if let Some(vs) = values {
                for (objective, v) in vs.iter().enumerate() {
                    let (stored, kind) = value_to_stored(*v);
                    exec(tx,
                        "INSERT INTO trial_values (trial_id, objective, value, value_type) VALUES (?1, ?2, ?3, ?4) \
                         ON CONFLICT (trial_id, objective) DO UPDATE SET value = excluded.value, value_type = excluded.value_type",
                        params![trial_id, objective as i64, stored, kind],
                    )?;
                }
            }
            for (k, v) in system_attrs {
                upsert_attr(tx, "trial_system_attributes", trial_id, k, v)?;
            }
            let now = UtcDateTime::now().format();
            if state == TrialState::Running {
                exec(tx,
                    "UPDATE trials SET state = 'RUNNING', datetime_start = ?2 WHERE trial_id = ?1",
                    params![trial_id, now],
                )?;
            } else if state.is_finished() {
                exec(tx,
                    "UPDATE trials SET state = ?2, datetime_complete = ?3 WHERE trial_id = ?1",
                    params![trial_id, state.as_str(), now],
                )?;
            } else {
                exec(tx, "UPDATE trials SET state = ?2 WHERE trial_id = ?1", params![trial_id, state.as_str()])?;
            }
            Ok(())
        })
    }

    /// Records a heartbeat for a RUNNING trial (Optuna's `record_heartbeat`).
    /// Queues `trial`'s parameters again as a WAITING trial (with the `failed_trial` /
    /// `retry_history` attributes a stale-trial retry gets), for a trial that failed for reasons
    /// of its worker, not its parameters (e.g. evicted from a trial array that ran out of memory).
    pub fn requeue_trial(&mut self, study_id: i64, trial: &FrozenTrial) -> Result<()> {
        let Some(retry) = retry_template(trial, None) else { return Ok(()) };
        self.write(|tx| insert_trial(tx, study_id, &retry).map(|_| ()))
    }

    pub fn record_heartbeat(&mut self, trial_id: i64) -> Result<()> {
        self.write(|tx| upsert_heartbeat(tx, trial_id))
    }

    /// Fails the study's RUNNING trials whose last heartbeat is older than `grace` and, unless a
    /// trial was already retried `max_retry` times, re-queues its parameters as a WAITING trial,
    /// as `fail_stale_trials` with `RetryHeartbeatStaleTrialCallback(max_retry)` does. The failed
    /// trial gets a `fail_reason` system attribute. Returns the failed trials' numbers.
    pub fn fail_stale_trials(
        &mut self,
        study_id: i64,
        grace: Duration,
        max_retry: Option<u32>,
    ) -> Result<Vec<u64>> {
        let stale: Vec<(i64, String)> = self.read(|tx| {
            let rows = tx
                .prepare_cached(
                    "SELECT t.trial_id, h.heartbeat FROM trials t JOIN trial_heartbeats h ON h.trial_id = t.trial_id \
                     WHERE t.study_id = ?1 AND t.state = 'RUNNING' ORDER BY t.trial_id",
                )?
                .query_map([study_id], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<(i64, String)>>>()?;
            Ok(rows)
        })?;
        let now = UtcDateTime::now();
        let mut failed = Vec::new();
        for (trial_id, beat) in stale {
            let beat = UtcDateTime::parse(&beat)
                .with_context(|| format!("trial_heartbeats of trial_id {trial_id}"))?;
            if now.seconds_since(beat) <= grace.as_secs_f64() {
                continue;
            }
            let reason = format!(
                "stale heartbeat: last heartbeat at {} UTC, more than {} s before {} UTC",
                beat.format(),
                grace.as_secs(),
                now.format()
            );
            failed.extend(self.fail_and_requeue(study_id, trial_id, &reason, max_retry)?);
        }
        Ok(failed)
    }

    /// Fails this worker's own RUNNING trials (`trial_ids`) with `reason` and re-queues their
    /// parameters as [`Storage::fail_stale_trials`] does, without waiting for them to go stale:
    /// for a worker that is stopping (SIGINT, SIGTERM). Trials that finished meanwhile are left
    /// as they are. Returns the failed trials' numbers.
    pub fn fail_running_trials(
        &mut self,
        study_id: i64,
        trial_ids: &[i64],
        reason: &str,
        max_retry: Option<u32>,
    ) -> Result<Vec<u64>> {
        let mut failed = Vec::new();
        for &trial_id in trial_ids {
            failed.extend(self.fail_and_requeue(study_id, trial_id, reason, max_retry)?);
        }
        Ok(failed)
    }

    /// FAIL with `reason` and a WAITING retry (unless retried `max_retry` times), in one
    /// transaction, if the trial is still RUNNING; its number then.
    fn fail_and_requeue(
        &mut self,
        study_id: i64,
        trial_id: i64,
        reason: &str,
        max_retry: Option<u32>,
    ) -> Result<Option<u64>> {
        let trial = self.trial(trial_id)?;
        let done = self.write(|tx| {
            // Another worker may have failed it, or its own worker finished it, since we looked.
            let state: String =
                row(tx, "SELECT state FROM trials WHERE trial_id = ?1", [trial_id], |r| r.get(0))?;
            if state != "RUNNING" {
                return Ok(false);
            }
            upsert_attr(
                tx,
                "trial_system_attributes",
                trial_id,
                "fail_reason",
                &pyjson::string_literal(reason),
            )?;
            exec(
                tx,
                "UPDATE trials SET state = 'FAIL', datetime_complete = ?2 WHERE trial_id = ?1",
                params![trial_id, UtcDateTime::now().format()],
            )?;
            if let Some(retry) = retry_template(&trial, max_retry) {
                insert_trial(tx, study_id, &retry)?;
            }
            Ok(true)
        })?;
        Ok(done.then_some(trial.number))
    }

    // ----- trials: reads -----

    /// One trial by its database id.
    pub fn trial(&mut self, trial_id: i64) -> Result<FrozenTrial> {
        let mut trials = self.read(|tx| load_trials(tx, TrialFilter::Id(trial_id)))?;
        trials.pop().ok_or_else(|| anyhow!("no trial with trial_id {trial_id}"))
    }

    /// One trial by its number within a study.
    pub fn trial_by_number(&mut self, study: &StudyRef, number: u64) -> Result<FrozenTrial> {
        let id: Option<i64> = self.read(|tx| {
            Ok(tx
                .query_row(
                    "SELECT trial_id FROM trials WHERE study_id = ?1 AND number = ?2",
                    params![study.study_id, number as i64],
                    |r| r.get(0),
                )
                .optional()?)
        })?;
        match id {
            Some(id) => self.trial(id),
            None => bail!("study {:?} has no trial number {number}", study.name),
        }
    }

    /// All trials of a study ordered by `trial_id` (= by number), optionally only some states.
    pub fn trials(&mut self, study_id: i64, states: Option<&[TrialState]>) -> Result<Vec<FrozenTrial>> {
        let all = self.study_trials(study_id)?;
        Ok(match states {
            Some(states) => all.iter().filter(|t| states.contains(&t.state)).cloned().collect(),
            None => all.to_vec(),
        })
    }

    /// All trials of a study ordered by `trial_id`, borrowed from the cache after bringing it up
    /// to date: only trials added since the last read and those that were unfinished are read.
    pub fn study_trials(&mut self, study_id: i64) -> Result<&[FrozenTrial]> {
        let cached = self.cache.remove(&study_id).unwrap_or_default();
        let after = cached.iter().map(|t| t.trial_id).max().unwrap_or(0);
        let unfinished: Vec<i64> =
            cached.iter().filter(|t| !t.state.is_finished()).map(|t| t.trial_id).collect();
        let ids_json = format!("[{}]", unfinished.iter().map(i64::to_string).collect::<Vec<_>>().join(","));
        let (fresh, count) = self.read(|tx| {
            let fresh =
                load_trials(tx, TrialFilter::Refresh { study_id, after, ids_json: ids_json.clone() })?;
            let count: i64 =
                row(tx, "SELECT COUNT(*) FROM trials WHERE study_id = ?1", [study_id], |r| r.get(0))?;
            Ok((fresh, count))
        })?;
        let mut trials: Vec<FrozenTrial> = cached.into_iter().filter(|t| t.state.is_finished()).collect();
        trials.extend(fresh);
        trials.sort_unstable_by_key(|t| t.trial_id);
        if trials.len() as i64 != count {
            // Trials were deleted behind our back (e.g. `optuna delete-study`): read everything.
            trials = self.read(|tx| load_trials(tx, TrialFilter::Study(study_id)))?;
        }
        Ok(self.cache.entry(study_id).or_insert(trials))
    }

    pub fn trial_counts(&mut self, study_id: i64) -> Result<TrialCounts> {
        self.read(|tx| {
            let mut counts = TrialCounts::default();
            let mut stmt =
                tx.prepare_cached("SELECT state, COUNT(*) FROM trials WHERE study_id = ?1 GROUP BY state")?;
            let rows = stmt.query_map([study_id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (state, n) = row?;
                let n = n as u64;
                match TrialState::parse(&state)? {
                    TrialState::Running => counts.running = n,
                    TrialState::Waiting => counts.waiting = n,
                    TrialState::Complete => counts.complete = n,
                    TrialState::Pruned => counts.pruned = n,
                    TrialState::Fail => counts.fail = n,
                }
            }
            Ok(counts)
        })
    }

    /// The best COMPLETE trial (Optuna's `best_trial`: by value, infinities included; the first
    /// by trial_id among equals). `None` when no trial is complete.
    pub fn best_trial(&mut self, study: &StudyRef) -> Result<Option<FrozenTrial>> {
        let direction = study.direction()?;
        Ok(best_of(self.study_trials(study.study_id)?, direction).cloned())
    }
}

/// The best COMPLETE trial among `trials`.
pub fn best_of(trials: &[FrozenTrial], direction: StudyDirection) -> Option<&FrozenTrial> {
    let mut best: Option<(&FrozenTrial, f64)> = None;
    for t in trials.iter().filter(|t| t.state == TrialState::Complete) {
        let Some(v) = t.value() else { continue };
        if v.is_nan() {
            continue;
        }
        match best {
            Some((_, b)) if !direction.better(v, b) => {}
            _ => best = Some((t, v)),
        }
    }
    best.map(|(t, _)| t)
}

/// The WAITING copy `RetryHeartbeatStaleTrialCallback` adds for a stale trial, or None when
/// `max_retry` is exhausted.
fn retry_template(trial: &FrozenTrial, max_retry: Option<u32>) -> Option<NewTrial> {
    let mut system: BTreeMap<String, Value> = BTreeMap::new();
    system.insert("failed_trial".into(), Value::from(trial.number));
    system.insert("retry_history".into(), Value::Array(vec![]));
    for (k, v) in &trial.system_attrs {
        system.insert(k.clone(), v.clone());
    }
    system.remove("fail_reason");
    let history = match system.get_mut("retry_history") {
        Some(Value::Array(h)) => h,
        _ => {
            system.insert("retry_history".into(), Value::Array(vec![]));
            match system.get_mut("retry_history") {
                Some(Value::Array(h)) => h,
                _ => return None,
            }
        }
    };
    history.push(Value::from(trial.number));
    if let Some(max) = max_retry
        && (max as usize) < history.len()
    {
        return None;
    }
    // Optuna's order: failed_trial, retry_history, then the trial's own attributes.
    let mut system_attrs = vec![
        ("failed_trial".to_string(), pyjson::dumps(&system["failed_trial"])),
        ("retry_history".to_string(), pyjson::dumps(&system["retry_history"])),
    ];
    for (k, v) in &system {
        if k != "failed_trial" && k != "retry_history" {
            system_attrs.push((k.clone(), pyjson::dumps(v)));
        }
    }
    Some(NewTrial {
        state: TrialState::Waiting,
        values: None,
        datetime_start: None,
        datetime_complete: None,
        params: trial.params.iter().map(|p| (p.name.clone(), p.internal, p.distribution.clone())).collect(),
        user_attrs: trial.user_attrs.iter().map(|(k, v)| (k.clone(), pyjson::dumps(v))).collect(),
        system_attrs,
        intermediate_values: Vec::new(),
    })
}

fn study_directions(tx: &Transaction, study_id: i64) -> Result<Vec<StudyDirection>> {
    let rows: Vec<String> = tx
        .prepare_cached("SELECT direction FROM study_directions WHERE study_id = ?1 ORDER BY objective")?
        .query_map([study_id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    rows.iter().map(|d| StudyDirection::parse(d)).collect()
}

fn attrs_of(tx: &Transaction, sql: &str, id: i64) -> Result<BTreeMap<String, Value>> {
    let rows: Vec<(String, Option<String>)> = tx
        .prepare_cached(sql)?
        .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    rows.into_iter()
        .map(|(k, v)| {
            let value =
                pyjson::loads(v.as_deref().unwrap_or("null")).with_context(|| format!("attribute {k:?}"))?;
            Ok((k, value))
        })
        .collect()
}

/// (study_id, state) of a trial that may still be written to.
fn check_updatable(tx: &Transaction, trial_id: i64) -> Result<(i64, TrialState)> {
    let row: Option<(i64, i64, String)> = tx
        .query_row("SELECT study_id, number, state FROM trials WHERE trial_id = ?1", [trial_id], |r| {
            Ok((r.get(0)?, r.get::<_, Option<i64>>(1)?.unwrap_or(-1), r.get(2)?))
        })
        .optional()?;
    let Some((study_id, number, state)) = row else { bail!("no trial with trial_id {trial_id}") };
    let state = TrialState::parse(&state)?;
    if state.is_finished() {
        bail!("trial {number} is already finished with state {state} and cannot be updated");
    }
    Ok((study_id, state))
}

fn insert_trial(tx: &Transaction, study_id: i64, t: &NewTrial) -> Result<i64> {
    exec(
        tx,
        "INSERT INTO trials (number, study_id, state, datetime_start, datetime_complete) VALUES (NULL, ?1, ?2, ?3, ?4)",
        params![
            study_id,
            t.state.as_str(),
            t.datetime_start.map(UtcDateTime::format),
            t.datetime_complete.map(UtcDateTime::format)
        ],
    )?;
    let trial_id = tx.last_insert_rowid();
    if let Some(values) = &t.values {
        for (objective, v) in values.iter().enumerate() {
            let (stored, kind) = value_to_stored(*v);
            exec(
                tx,
                "INSERT INTO trial_values (trial_id, objective, value, value_type) VALUES (?1, ?2, ?3, ?4)",
                params![trial_id, objective as i64, stored, kind],
            )?;
        }
    }
    for (name, internal, dist) in &t.params {
        insert_param(tx, study_id, trial_id, name, *internal, dist)?;
    }
    for (k, v) in &t.user_attrs {
        upsert_attr(tx, "trial_user_attributes", trial_id, k, v)?;
    }
    for (k, v) in &t.system_attrs {
        upsert_attr(tx, "trial_system_attributes", trial_id, k, v)?;
    }
    for (step, v) in &t.intermediate_values {
        upsert_intermediate(tx, trial_id, *step, *v)?;
    }
    // Optuna's count_past_trials, inside the write transaction: unique and gap-free.
    let number: i64 = row(
        tx,
        "SELECT COUNT(trial_id) FROM trials WHERE study_id = ?1 AND trial_id < ?2",
        params![study_id, trial_id],
        |r| r.get(0),
    )?;
    exec(tx, "UPDATE trials SET number = ?2 WHERE trial_id = ?1", params![trial_id, number])?;
    Ok(trial_id)
}

fn insert_param(
    tx: &Transaction,
    study_id: i64,
    trial_id: i64,
    name: &str,
    internal: f64,
    dist: &Distribution,
) -> Result<()> {
    if !dist.contains(internal) {
        bail!("parameter {name:?}: value {internal} is outside {}", dist.to_json());
    }
    let previous: Option<String> = tx
        .query_row(
            "SELECT p.distribution_json FROM trial_params p JOIN trials t ON t.trial_id = p.trial_id \
             WHERE t.study_id = ?1 AND p.param_name = ?2 LIMIT 1",
            params![study_id, name],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(prev) = previous {
        let prev =
            Distribution::from_json(&prev).with_context(|| format!("stored distribution of {name:?}"))?;
        check_distribution_compatibility(name, &prev, dist)?;
    }
    exec(tx,
        "INSERT INTO trial_params (trial_id, param_name, param_value, distribution_json) VALUES (?1, ?2, ?3, ?4)",
        params![trial_id, name, internal, dist.to_json()],
    )
    .with_context(|| format!("storing parameter {name:?}"))?;
    Ok(())
}

fn upsert_attr(tx: &Transaction, table: &str, trial_id: i64, key: &str, json: &str) -> Result<()> {
    if key.len() > 512 {
        bail!("attribute key {key:?} is longer than 512 bytes");
    }
    let sql = format!(
        "INSERT INTO {table} (trial_id, \"key\", value_json) VALUES (?1, ?2, ?3) \
         ON CONFLICT (trial_id, \"key\") DO UPDATE SET value_json = excluded.value_json"
    );
    exec(tx, &sql, params![trial_id, key, json])?;
    Ok(())
}

fn upsert_intermediate(tx: &Transaction, trial_id: i64, step: i64, value: f64) -> Result<()> {
    let (stored, kind) = value_to_stored(value);
    exec(
        tx,
        "INSERT INTO trial_intermediate_values (trial_id, step, intermediate_value, intermediate_value_type) \
         VALUES (?1, ?2, ?3, ?4) ON CONFLICT (trial_id, step) DO UPDATE SET \
         intermediate_value = excluded.intermediate_value, intermediate_value_type = excluded.intermediate_value_type",
        params![trial_id, step, stored, kind],
    )?;
    Ok(())
}

fn upsert_heartbeat(tx: &Transaction, trial_id: i64) -> Result<()> {
    exec(
        tx,
        "INSERT INTO trial_heartbeats (trial_id, heartbeat) VALUES (?1, ?2) \
         ON CONFLICT (trial_id) DO UPDATE SET heartbeat = excluded.heartbeat",
        params![trial_id, UtcDateTime::now().format()],
    )?;
    Ok(())
}

enum TrialFilter {
    Id(i64),
    Study(i64),
    /// The study's trials with `trial_id > after`, plus those listed (JSON array of ids).
    Refresh {
        study_id: i64,
        after: i64,
        ids_json: String,
    },
}

/// Loads trials with one query per table (not one per trial), grouping rows by trial_id.
fn load_trials(tx: &Transaction, filter: TrialFilter) -> Result<Vec<FrozenTrial>> {
    let (cond, id, after, ids_json) = match filter {
        TrialFilter::Id(id) => ("t.trial_id = ?1", id, 0, String::new()),
        TrialFilter::Study(id) => ("t.study_id = ?1", id, 0, String::new()),
        TrialFilter::Refresh { study_id, after, ids_json } => (
            // `+` keeps SQLite off the study_id index: the rowid range and lookups touch only the
            // few rows that can have changed instead of scanning the whole study.
            // `(SELECT ?2)` rather than `?2`: with a bare parameter, SQLite (built with STAT4)
            // re-plans the statement every time a new value is bound.
            "+t.study_id = ?1 AND (t.trial_id > (SELECT ?2) OR t.trial_id IN (SELECT value FROM json_each(?3)))",
            study_id,
            after,
            ids_json,
        ),
    };
    let refresh = cond.contains("?2");
    let bind = |stmt: &mut rusqlite::CachedStatement<'_>| -> rusqlite::Result<()> {
        stmt.raw_bind_parameter(1, id)?;
        if refresh {
            stmt.raw_bind_parameter(2, after)?;
            stmt.raw_bind_parameter(3, ids_json.as_str())?;
        }
        Ok(())
    };
    let mut trials = Vec::new();
    let mut index: HashMap<i64, usize> = HashMap::new();
    {
        let sql = format!(
            "SELECT t.trial_id, t.number, t.state, t.datetime_start, t.datetime_complete FROM trials t \
             WHERE {cond} ORDER BY t.trial_id"
        );
        let mut stmt = tx.prepare_cached(&sql)?;
        bind(&mut stmt)?;
        let mut rows = stmt.raw_query();
        while let Some(r) = rows.next()? {
            let trial_id: i64 = r.get(0)?;
            let number: Option<i64> = r.get(1)?;
            let state: String = r.get(2)?;
            let ctx = || format!("trial_id {trial_id}");
            let trial = FrozenTrial {
                trial_id,
                number: number
                    .and_then(|n| u64::try_from(n).ok())
                    .ok_or_else(|| anyhow!("trial_id {trial_id} has no valid number"))?,
                state: TrialState::parse(&state).with_context(ctx)?,
                values: None,
                datetime_start: parse_datetime(r.get(3)?).with_context(ctx)?,
                datetime_complete: parse_datetime(r.get(4)?).with_context(ctx)?,
                params: Vec::new(),
                user_attrs: BTreeMap::new(),
                system_attrs: BTreeMap::new(),
                intermediate_values: BTreeMap::new(),
            };
            index.insert(trial_id, trials.len());
            trials.push(trial);
        }
    }
    if trials.is_empty() {
        return Ok(trials);
    }
    // `IN (subquery)` rather than a join: SQLite then looks rows up through the (trial_id, ...)
    // unique index for just the selected trials, where a join would scan the whole table.
    let join = |table: &str, cols: &str, order: &str| {
        format!(
            "SELECT x.trial_id, {cols} FROM {table} x \
             WHERE x.trial_id IN (SELECT t.trial_id FROM trials t WHERE {cond}) ORDER BY {order}"
        )
    };
    {
        let mut dist_cache: HashMap<String, Distribution> = HashMap::new();
        let mut stmt = tx.prepare_cached(&join(
            "trial_params",
            "x.param_name, x.param_value, x.distribution_json",
            "x.param_id",
        ))?;
        bind(&mut stmt)?;
        let mut rows = stmt.raw_query();
        while let Some(r) = rows.next()? {
            let trial_id: i64 = r.get(0)?;
            let name: String = r.get(1)?;
            let internal: f64 = r.get(2)?;
            let json: String = r.get(3)?;
            let dist = match dist_cache.get(&json) {
                Some(d) => d.clone(),
                None => {
                    let d = Distribution::from_json(&json)
                        .with_context(|| format!("trial_id {trial_id}: parameter {name:?}"))?;
                    dist_cache.insert(json, d.clone());
                    d
                }
            };
            let value = dist
                .to_external(internal)
                .with_context(|| format!("trial_id {trial_id}: parameter {name:?}"))?;
            if let Some(&i) = index.get(&trial_id) {
                trials[i].params.push(TrialParam { name, internal, value, distribution: dist });
            }
        }
    }
    {
        let mut stmt = tx.prepare_cached(&join(
            "trial_values",
            "x.objective, x.value, x.value_type",
            "x.trial_id, x.objective",
        ))?;
        bind(&mut stmt)?;
        let mut rows = stmt.raw_query();
        while let Some(r) = rows.next()? {
            let trial_id: i64 = r.get(0)?;
            let objective: i64 = r.get(1)?;
            let v = stored_to_value(r.get(2)?, &r.get::<_, String>(3)?)
                .with_context(|| format!("trial_values of trial_id {trial_id}"))?;
            if let Some(&i) = index.get(&trial_id) {
                let values = trials[i].values.get_or_insert_with(Vec::new);
                let objective =
                    usize::try_from(objective).map_err(|_| anyhow!("negative objective index"))?;
                if values.len() <= objective {
                    values.resize(objective + 1, 0.0);
                }
                values[objective] = v;
            }
        }
    }
    {
        let mut stmt = tx.prepare_cached(&join(
            "trial_intermediate_values",
            "x.step, x.intermediate_value, x.intermediate_value_type",
            "x.trial_intermediate_value_id",
        ))?;
        bind(&mut stmt)?;
        let mut rows = stmt.raw_query();
        while let Some(r) = rows.next()? {
            let trial_id: i64 = r.get(0)?;
            let step: i64 = r.get(1)?;
            let v = stored_to_value(r.get(2)?, &r.get::<_, String>(3)?)
                .with_context(|| format!("trial_intermediate_values of trial_id {trial_id}"))?;
            if let Some(&i) = index.get(&trial_id) {
                trials[i].intermediate_values.insert(step, v);
            }
        }
    }
    for (table, system) in [("trial_user_attributes", false), ("trial_system_attributes", true)] {
        let mut stmt = tx.prepare_cached(&join(table, "x.\"key\", x.value_json", "x.rowid"))?;
        bind(&mut stmt)?;
        let mut rows = stmt.raw_query();
        while let Some(r) = rows.next()? {
            let trial_id: i64 = r.get(0)?;
            let key: String = r.get(1)?;
            let json: Option<String> = r.get(2)?;
            let value = pyjson::loads(json.as_deref().unwrap_or("null"))
                .with_context(|| format!("{table} {key:?} of trial_id {trial_id}"))?;
            if let Some(&i) = index.get(&trial_id) {
                let map = if system { &mut trials[i].system_attrs } else { &mut trials[i].user_attrs };
                map.insert(key, value);
            }
        }
    }
    Ok(trials)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::distributions::{CategoricalDistribution, FloatDistribution, ParamValue};

    fn lr() -> Distribution {
        Distribution::Float(FloatDistribution::new(1e-6, 1e-4, true, None).unwrap())
    }

    fn batch() -> Distribution {
        Distribution::Categorical(
            CategoricalDistribution::new(vec![ParamValue::Int(16), ParamValue::Int(32), ParamValue::Int(64)])
                .unwrap(),
        )
    }

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

    #[test]
    fn corrupt_rows_name_the_trial_and_column() {
        let mut s = Storage::open("sqlite:///:memory:").unwrap();
        let study = s.create_study("s", StudyDirection::Maximize, false).unwrap();
        let mut t = NewTrial::new(TrialState::Complete);
        t.values = Some(vec![1.0]);
        t.params.push(("lr".into(), 2e-5, lr()));
        let trial = s.create_trial(study.study_id, &t).unwrap();
        s.conn.execute("UPDATE trial_params SET distribution_json = '{\"name\": \"Flo'", []).unwrap();
        let err = format!("{:#}", s.trials(study.study_id, None).unwrap_err());
        assert!(
            err.contains("trial_id 1") && err.contains("\"lr\"") && err.contains("invalid JSON"),
            "{err}"
        );
        s.conn.execute("UPDATE trial_params SET distribution_json = ?1", [lr().to_json()]).unwrap();
        s.conn.execute("UPDATE trials SET state = 'PAUSED'", []).unwrap();
        let err = format!("{:#}", s.trial(trial.trial_id).unwrap_err());
        assert!(err.contains("unknown trial state \"PAUSED\""), "{err}");
        s.conn.execute("UPDATE trials SET state = 'COMPLETE', datetime_start = 'noon'", []).unwrap();
        let err = format!("{:#}", s.trial(trial.trial_id).unwrap_err());
        assert!(err.contains("invalid datetime \"noon\""), "{err}");
        s.conn.execute("UPDATE trials SET datetime_start = NULL", []).unwrap();
        s.conn.execute("UPDATE trial_values SET value = NULL", []).unwrap();
        let err = format!("{:#}", s.trial(trial.trial_id).unwrap_err());
        assert!(err.contains("FINITE value is NULL"), "{err}");
    }

    #[test]
    fn study_create_load_and_directions() {
        let mut s = Storage::open("sqlite:///:memory:").unwrap();
        let a = s.create_study("a", StudyDirection::Maximize, false).unwrap();
        assert_eq!(a.directions, vec![StudyDirection::Maximize]);
        assert!(
            s.create_study("a", StudyDirection::Maximize, false)
                .unwrap_err()
                .to_string()
                .contains("already exists")
        );
        assert_eq!(s.create_study("a", StudyDirection::Maximize, true).unwrap(), a);
        assert!(
            s.create_study("a", StudyDirection::Minimize, true)
                .unwrap_err()
                .to_string()
                .contains("direction MAXIMIZE")
        );
        let err = s.load_study("b").unwrap_err().to_string();
        assert!(err.contains("no study named \"b\"") && err.contains("studies: a"), "{err}");
        s.set_study_user_attr(a.study_id, "k", &serde_json::json!([1, 2.5])).unwrap();
        assert_eq!(s.study_user_attrs(a.study_id).unwrap()["k"], serde_json::json!([1, 2.5]));
    }

    #[test]
    fn trial_lifecycle_and_encodings() {
        let mut s = Storage::open("sqlite:///:memory:").unwrap();
        let study = s.create_study("s", StudyDirection::Maximize, false).unwrap();
        let StartOutcome::Started(t) = s.start_trial(study.study_id, None, true).unwrap() else { panic!() };
        assert_eq!((t.number, t.state), (0, TrialState::Running));
        s.set_trial_params(t.trial_id, &[("learning_rate".into(), 3e-5, lr()), ("bs".into(), 1.0, batch())])
            .unwrap();
        s.report(t.trial_id, 1, 0.5, &[("epoch_1_eval_loss".into(), "NaN".into())]).unwrap();
        s.report(t.trial_id, 2, f64::NAN, &[]).unwrap();
        s.report(t.trial_id, 3, f64::NEG_INFINITY, &[]).unwrap();
        s.set_trial_state(t.trial_id, TrialState::Complete, Some(&[f64::INFINITY]), &[]).unwrap();
        let t = s.trial(t.trial_id).unwrap();
        assert_eq!(t.state, TrialState::Complete);
        assert_eq!(t.values, Some(vec![f64::INFINITY]));
        assert_eq!(t.param("bs").unwrap().value, ParamValue::Int(32));
        assert_eq!(t.intermediate_values[&1], 0.5);
        assert!(t.intermediate_values[&2].is_nan());
        assert_eq!(t.intermediate_values[&3], f64::NEG_INFINITY);
        assert_eq!(t.user_attrs["epoch_1_eval_loss"], Value::Null);
        assert!(t.datetime_complete.is_some());
        // Raw encodings as Optuna writes them.
        let kinds: Vec<String> = s
            .conn
            .prepare("SELECT intermediate_value_type FROM trial_intermediate_values ORDER BY step")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(kinds, ["FINITE", "NAN", "INF_NEG"]);
        let (pv, vt): (f64, String) = s
            .conn
            .query_row("SELECT p.param_value, v.value_type FROM trial_params p, trial_values v WHERE p.param_name='bs'", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((pv, vt.as_str()), (1.0, "INF_POS"));
        // Finished trials are immutable; NaN objectives are refused.
        let err = s.report(t.trial_id, 4, 1.0, &[]).unwrap_err().to_string();
        assert!(err.contains("trial 0 is already finished with state COMPLETE"), "{err}");
        let StartOutcome::Started(t2) = s.start_trial(study.study_id, None, false).unwrap() else { panic!() };
        assert_eq!(t2.number, 1);
        assert!(s.set_trial_state(t2.trial_id, TrialState::Complete, Some(&[f64::NAN]), &[]).is_err());
        // A parameter may not change distribution kind or categorical choices within a study.
        let err = s.set_trial_params(t2.trial_id, &[("bs".into(), 3e-5, lr())]).unwrap_err().to_string();
        assert!(err.contains("cannot switch to a FloatDistribution"), "{err}");
        let other =
            Distribution::Categorical(CategoricalDistribution::new(vec![ParamValue::Int(8)]).unwrap());
        let err = s.set_trial_params(t2.trial_id, &[("bs".into(), 0.0, other)]).unwrap_err().to_string();
        assert!(err.contains("dynamic value space"), "{err}");
        let err =
            s.set_trial_params(t2.trial_id, &[("learning_rate".into(), 0.5, lr())]).unwrap_err().to_string();
        assert!(err.contains("outside"), "{err}");
    }

    #[test]
    fn best_trial_and_target_cap() {
        let mut s = Storage::open("sqlite:///:memory:").unwrap();
        let study = s.create_study("s", StudyDirection::Minimize, false).unwrap();
        assert!(s.best_trial(&study).unwrap().is_none());
        for (i, v) in [3.0, 1.0, 2.0, 1.0].into_iter().enumerate() {
            let mut t = NewTrial::new(TrialState::Complete);
            t.values = Some(vec![v]);
            assert_eq!(s.create_trial(study.study_id, &t).unwrap().number, i as u64);
        }
        assert_eq!(s.best_trial(&study).unwrap().unwrap().number, 1);
        // 4 finished, target 5: one may start (with heartbeat), then the target counts it.
        assert!(matches!(s.start_trial(study.study_id, Some(5), true).unwrap(), StartOutcome::Started(_)));
        assert!(matches!(
            s.start_trial(study.study_id, Some(5), true).unwrap(),
            StartOutcome::TargetReached { finished: 4, running: 1 }
        ));
        let c = s.trial_counts(study.study_id).unwrap();
        assert_eq!((c.complete, c.running, c.finished_ok()), (4, 1, 4));
    }

    #[test]
    fn cached_reads_see_other_connections_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let mut a = Storage::open_path(&path).unwrap();
        let mut b = Storage::open_path(&path).unwrap();
        let study = a.create_study("s", StudyDirection::Minimize, false).unwrap();
        let mut done = NewTrial::new(TrialState::Complete);
        done.values = Some(vec![1.0]);
        a.create_trial(study.study_id, &done).unwrap();
        let StartOutcome::Started(run) = a.start_trial(study.study_id, None, false).unwrap() else {
            panic!()
        };
        assert_eq!(a.study_trials(study.study_id).unwrap().len(), 2);
        // B finishes A's running trial and adds one; A's next read has both changes.
        b.report(run.trial_id, 1, 0.5, &[]).unwrap();
        b.set_trial_state(run.trial_id, TrialState::Complete, Some(&[0.5]), &[]).unwrap();
        b.create_trial(study.study_id, &done).unwrap();
        let seen = a.study_trials(study.study_id).unwrap();
        assert_eq!(
            seen.iter().map(|t| (t.number, t.state)).collect::<Vec<_>>(),
            vec![(0, TrialState::Complete), (1, TrialState::Complete), (2, TrialState::Complete)]
        );
        assert_eq!(seen[1].intermediate_values[&1], 0.5);
        // A deletion elsewhere (as `optuna delete-study` does) is noticed too.
        b.conn.execute("DELETE FROM trial_values WHERE trial_id = 1", []).unwrap();
        b.conn.execute("DELETE FROM trials WHERE trial_id = 1", []).unwrap();
        let seen = a.study_trials(study.study_id).unwrap();
        assert_eq!(seen.iter().map(|t| t.trial_id).collect::<Vec<_>>(), vec![2, 3]);
    }

    #[test]
    fn stale_trials_fail_and_requeue_like_optuna() {
        let mut s = Storage::open("sqlite:///:memory:").unwrap();
        let study = s.create_study("s", StudyDirection::Maximize, false).unwrap();
        let StartOutcome::Started(t) = s.start_trial(study.study_id, None, true).unwrap() else { panic!() };
        s.set_trial_params(t.trial_id, &[("learning_rate".into(), 2e-5, lr())]).unwrap();
        s.set_trial_user_attr(t.trial_id, "u", "1").unwrap();
        // A trial without heartbeat is never stale.
        let StartOutcome::Started(no_beat) = s.start_trial(study.study_id, None, false).unwrap() else {
            panic!()
        };
        assert!(s.fail_stale_trials(study.study_id, Duration::from_secs(60), None).unwrap().is_empty());
        s.conn
            .execute(
                "UPDATE trial_heartbeats SET heartbeat = '2000-01-01 00:00:00' WHERE trial_id = ?1",
                [t.trial_id],
            )
            .unwrap();
        assert_eq!(s.fail_stale_trials(study.study_id, Duration::from_secs(60), None).unwrap(), vec![0]);
        let failed = s.trial(t.trial_id).unwrap();
        assert_eq!(failed.state, TrialState::Fail);
        assert!(failed.system_attrs["fail_reason"].as_str().unwrap().contains("stale heartbeat"));
        assert_eq!(s.trial(no_beat.trial_id).unwrap().state, TrialState::Running);
        let trials = s.trials(study.study_id, Some(&[TrialState::Waiting])).unwrap();
        assert_eq!(trials.len(), 1);
        let retry = &trials[0];
        assert_eq!(retry.number, 2);
        assert_eq!(retry.system_attrs["failed_trial"], serde_json::json!(0));
        assert_eq!(retry.system_attrs["retry_history"], serde_json::json!([0]));
        assert!(!retry.system_attrs.contains_key("fail_reason"));
        assert_eq!(retry.user_attrs["u"], serde_json::json!(1));
        assert_eq!(retry.params, failed.params);
        assert!(retry.datetime_start.is_none());
        // The re-queued trial is the next one started, and its retry stays traceable.
        let StartOutcome::Started(again) = s.start_trial(study.study_id, None, true).unwrap() else {
            panic!()
        };
        assert_eq!(again.number, 2);
        assert_eq!(again.state, TrialState::Running);
        s.conn
            .execute(
                "UPDATE trial_heartbeats SET heartbeat = '2000-01-01 00:00:00' WHERE trial_id = ?1",
                [again.trial_id],
            )
            .unwrap();
        // max_retry = 1: the second failure is not re-queued.
        assert_eq!(s.fail_stale_trials(study.study_id, Duration::from_secs(60), Some(1)).unwrap(), vec![2]);
        assert!(s.trials(study.study_id, Some(&[TrialState::Waiting])).unwrap().is_empty());
    }
}
