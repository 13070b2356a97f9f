//! Opening the database: storage URLs (SQLite files and PostgreSQL servers), the database
//! directory check, `Storage::open` and its variants, Optuna's schema (created, or its version
//! checked) on either database, and the write / read transactions with their retries.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use rusqlite::{Connection, TransactionBehavior};

use super::Storage;
use super::sql::{StatementCache, Tx, sql_params};

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

/// Optuna's tables on PostgreSQL as SQLAlchemy creates them (`create_all`): its enum types, then
/// the tables with `SERIAL` keys, so `optuna.load_study` and optuna-dashboard find what they
/// expect; `IF NOT EXISTS` creates only what is missing.
const POSTGRES_ENUMS: &[(&str, &str)] = &[
    ("studydirection", "'NOT_SET', 'MINIMIZE', 'MAXIMIZE'"),
    ("trialstate", "'RUNNING', 'COMPLETE', 'PRUNED', 'FAIL', 'WAITING'"),
    ("trialvaluetype", "'FINITE', 'INF_POS', 'INF_NEG'"),
    ("trialintermediatevaluetype", "'FINITE', 'INF_POS', 'INF_NEG', 'NAN'"),
];
const POSTGRES_SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS studies (study_id SERIAL NOT NULL, study_name VARCHAR(512) NOT NULL, PRIMARY KEY (study_id))",
    "CREATE UNIQUE INDEX IF NOT EXISTS ix_studies_study_name ON studies (study_name)",
    "CREATE TABLE IF NOT EXISTS version_info (version_info_id INTEGER NOT NULL, schema_version INTEGER, library_version VARCHAR(256), PRIMARY KEY (version_info_id), CHECK (version_info_id=1))",
    "CREATE TABLE IF NOT EXISTS study_directions (study_direction_id SERIAL NOT NULL, direction studydirection NOT NULL, study_id INTEGER NOT NULL, objective INTEGER NOT NULL, PRIMARY KEY (study_direction_id), UNIQUE (study_id, objective), FOREIGN KEY(study_id) REFERENCES studies (study_id))",
    "CREATE TABLE IF NOT EXISTS study_user_attributes (study_user_attribute_id SERIAL NOT NULL, study_id INTEGER, key VARCHAR(512), value_json TEXT, PRIMARY KEY (study_user_attribute_id), UNIQUE (study_id, key), FOREIGN KEY(study_id) REFERENCES studies (study_id))",
    "CREATE TABLE IF NOT EXISTS study_system_attributes (study_system_attribute_id SERIAL NOT NULL, study_id INTEGER, key VARCHAR(512), value_json TEXT, PRIMARY KEY (study_system_attribute_id), UNIQUE (study_id, key), FOREIGN KEY(study_id) REFERENCES studies (study_id))",
    "CREATE TABLE IF NOT EXISTS trials (trial_id SERIAL NOT NULL, number INTEGER, study_id INTEGER, state trialstate NOT NULL, datetime_start TIMESTAMP WITHOUT TIME ZONE, datetime_complete TIMESTAMP WITHOUT TIME ZONE, PRIMARY KEY (trial_id), FOREIGN KEY(study_id) REFERENCES studies (study_id))",
    "CREATE INDEX IF NOT EXISTS ix_trials_study_id ON trials (study_id)",
    "CREATE TABLE IF NOT EXISTS trial_user_attributes (trial_user_attribute_id SERIAL NOT NULL, trial_id INTEGER, key VARCHAR(512), value_json TEXT, PRIMARY KEY (trial_user_attribute_id), UNIQUE (trial_id, key), FOREIGN KEY(trial_id) REFERENCES trials (trial_id))",
    "CREATE TABLE IF NOT EXISTS trial_system_attributes (trial_system_attribute_id SERIAL NOT NULL, trial_id INTEGER, key VARCHAR(512), value_json TEXT, PRIMARY KEY (trial_system_attribute_id), UNIQUE (trial_id, key), FOREIGN KEY(trial_id) REFERENCES trials (trial_id))",
    "CREATE TABLE IF NOT EXISTS trial_params (param_id SERIAL NOT NULL, trial_id INTEGER, param_name VARCHAR(512), param_value FLOAT, distribution_json TEXT, PRIMARY KEY (param_id), UNIQUE (trial_id, param_name), FOREIGN KEY(trial_id) REFERENCES trials (trial_id))",
    "CREATE TABLE IF NOT EXISTS trial_values (trial_value_id SERIAL NOT NULL, trial_id INTEGER NOT NULL, objective INTEGER NOT NULL, value FLOAT, value_type trialvaluetype NOT NULL, PRIMARY KEY (trial_value_id), UNIQUE (trial_id, objective), FOREIGN KEY(trial_id) REFERENCES trials (trial_id))",
    "CREATE TABLE IF NOT EXISTS trial_intermediate_values (trial_intermediate_value_id SERIAL NOT NULL, trial_id INTEGER NOT NULL, step INTEGER NOT NULL, intermediate_value FLOAT, intermediate_value_type trialintermediatevaluetype NOT NULL, PRIMARY KEY (trial_intermediate_value_id), UNIQUE (trial_id, step), FOREIGN KEY(trial_id) REFERENCES trials (trial_id))",
    "CREATE TABLE IF NOT EXISTS trial_heartbeats (trial_heartbeat_id SERIAL NOT NULL, trial_id INTEGER NOT NULL, heartbeat TIMESTAMP WITHOUT TIME ZONE NOT NULL, PRIMARY KEY (trial_heartbeat_id), UNIQUE (trial_id), FOREIGN KEY(trial_id) REFERENCES trials (trial_id))",
    "CREATE TABLE IF NOT EXISTS alembic_version (version_num VARCHAR(32) NOT NULL, CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))",
];

/// How long connecting to a PostgreSQL server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a worker keeps reconnecting to a PostgreSQL server that went away (a restart).
const RECONNECT_FOR: Duration = Duration::from_secs(120);

/// Where a storage URL points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageLocation {
    File(PathBuf),
    /// `sqlite:///:memory:` — private to one connection (tests, benchmarks).
    Memory,
    /// A PostgreSQL database: the URL as the postgres crate reads it (`postgresql://…`), and the
    /// password from `PGPASSWORD` or `~/.pgpass` when the URL has none.
    Postgres {
        url: String,
        password: Option<String>,
    },
}

const FORMS: &str = "expected sqlite:///RELATIVE/PATH.db, sqlite:////ABSOLUTE/PATH.db or \
                     postgresql://USER:PASSWORD@HOST:PORT/DATABASE";

/// Parses a storage URL as SQLAlchemy spells it: `sqlite:///relative/path.db`,
/// `sqlite:////absolute/path.db`, `sqlite:///:memory:`, or a PostgreSQL URL (`postgresql://`,
/// `postgres://`, `postgresql+psycopg2://`, …). Anything else is refused with a message saying
/// what is accepted.
pub fn parse_storage_url(url: &str) -> Result<StorageLocation> {
    if let Some((scheme, rest)) = url.split_once("://")
        && (scheme == "postgres" || scheme == "postgresql" || scheme.starts_with("postgresql+"))
    {
        return parse_postgres_url(url, rest);
    }
    let Some(rest) = url.strip_prefix("sqlite:///") else {
        if url.starts_with("sqlite:") {
            bail!("--storage {url:?}: malformed SQLite URL ({FORMS})");
        }
        if let Some((scheme, _)) = url.split_once("://") {
            bail!(
                "--storage {url:?}: unsupported database {scheme:?}; hpo-gpu stores studies in SQLite or PostgreSQL ({FORMS})"
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

/// The URL with its password replaced by `***`, for messages.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((user, host)) if user.contains(':') => {
                let name = user.split_once(':').map_or(user, |(n, _)| n);
                format!("{scheme}://{name}:***@{host}")
            }
            _ => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// The `postgresql://` URL for the postgres crate, and a password from `PGPASSWORD` or
/// `~/.pgpass` when the URL names none (libpq's rules, which Optuna's psycopg2 follows).
fn parse_postgres_url(url: &str, rest: &str) -> Result<StorageLocation> {
    let shown = redact_url(url);
    let normalized = format!("postgresql://{rest}");
    let config = postgres::Config::from_str(&normalized)
        .map_err(|e| anyhow!("--storage {shown:?}: malformed PostgreSQL URL: {e} ({FORMS})"))?;
    if config.get_dbname().is_none() {
        bail!("--storage {shown:?}: the URL names no database ({FORMS})");
    }
    if config.get_hosts().is_empty() {
        bail!("--storage {shown:?}: the URL names no host ({FORMS})");
    }
    let password = match config.get_password() {
        Some(_) => None,
        None => {
            std::env::var("PGPASSWORD").ok().filter(|p| !p.is_empty()).or_else(|| pgpass_password(&config))
        }
    };
    Ok(StorageLocation::Postgres { url: normalized, password })
}

/// The password `~/.pgpass` (or `PGPASSFILE`) gives for the URL's host, port, database and user:
/// the first line `host:port:database:user:password` whose fields match (`*` matches anything).
fn pgpass_password(config: &postgres::Config) -> Option<String> {
    let path = std::env::var_os("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pgpass")))?;
    let text = std::fs::read_to_string(path).ok()?;
    let host = match config.get_hosts().first()? {
        postgres::config::Host::Tcp(h) => h.clone(),
        postgres::config::Host::Unix(p) => p.display().to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432).to_string();
    let db = config.get_dbname()?.to_string();
    let user = config.get_user()?.to_string();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let fields = split_pgpass(line);
        if let [h, p, d, u, password] = fields.as_slice()
            && [(h, &host), (p, &port), (d, &db), (u, &user)].iter().all(|(f, v)| *f == "*" || f == v)
        {
            return Some(password.clone());
        }
    }
    None
}

/// A `.pgpass` line split at unescaped colons (`\:` and `\\` are escapes).
fn split_pgpass(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => fields.last_mut().unwrap_or(&mut String::new()).extend(chars.next()),
            ':' => fields.push(String::new()),
            c => fields.last_mut().unwrap_or(&mut String::new()).push(c),
        }
    }
    fields
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

/// SQLite: the database stayed locked. PostgreSQL: a serialization failure or deadlock, which the
/// server resolves by aborting one transaction to be run again.
fn is_busy(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        if let Some(rusqlite::Error::SqliteFailure(e, _)) = cause.downcast_ref::<rusqlite::Error>() {
            return matches!(e.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked);
        }
        cause.downcast_ref::<postgres::Error>().and_then(|e| e.code()).is_some_and(|c| {
            *c == postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
                || *c == postgres::error::SqlState::T_R_DEADLOCK_DETECTED
        })
    })
}

/// The connection to the server was lost (a restart, a network cut).
fn is_disconnect(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause.downcast_ref::<postgres::Error>().is_some_and(|e| {
            e.is_closed()
                || e.code().is_some_and(|c| {
                    *c == postgres::error::SqlState::ADMIN_SHUTDOWN
                        || *c == postgres::error::SqlState::CRASH_SHUTDOWN
                        || *c == postgres::error::SqlState::CANNOT_CONNECT_NOW
                })
                || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
        })
    })
}

/// How [`Storage::transaction`] opens its transaction.
#[derive(Clone, Copy)]
enum Access {
    Write,
    Read,
    OneStatement,
}

/// An open connection to either database.
pub(super) enum Connected {
    Sqlite(Connection),
    Postgres(Box<postgres::Client>, StatementCache),
}

/// Connects to a PostgreSQL server, with one line naming the server and the reason on failure.
fn connect_postgres(url: &str, password: Option<&str>, shown: &str) -> Result<postgres::Client> {
    let mut config = postgres::Config::from_str(url).map_err(|e| anyhow!("--storage {shown:?}: {e}"))?;
    if let Some(p) = password {
        config.password(p);
    }
    config.connect_timeout(CONNECT_TIMEOUT);
    if config.get_application_name().is_none() {
        config.application_name("hpo-gpu");
    }
    config.connect(postgres::NoTls).map_err(|e| {
        let why = match e.as_db_error() {
            Some(db) => db.message().to_string(),
            None => {
                let mut text = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    text = s.to_string();
                    source = s.source();
                }
                text
            }
        };
        anyhow!("--storage {shown:?}: cannot connect to PostgreSQL: {why}")
    })
}

impl Storage {
    /// Opens (creating if needed) the database a storage URL points to; on PostgreSQL the
    /// database must exist and the schema is created in it if it has none.
    pub fn open(url: &str) -> Result<Self> {
        Self::open_location(parse_storage_url(url)?, url)
    }

    /// Opens a parsed location; `url` is how the user wrote it (shown with its password hidden).
    fn open_location(location: StorageLocation, url: &str) -> Result<Self> {
        let shown = redact_url(url);
        let conn = match &location {
            StorageLocation::Memory => {
                Connected::Sqlite(Connection::open_in_memory().context("opening an in-memory database")?)
            }
            StorageLocation::File(path) => {
                check_database_directory(url, path)?;
                if path.is_dir() {
                    bail!("--storage {url:?}: {} is a directory, not a database file", path.display());
                }
                Connected::Sqlite(
                    Connection::open(path)
                        .with_context(|| format!("--storage {url:?}: cannot open {}", path.display()))?,
                )
            }
            StorageLocation::Postgres { url: pg, password } => Connected::Postgres(
                Box::new(connect_postgres(pg, password.as_deref(), &shown)?),
                StatementCache::new(),
            ),
        };
        let mut storage = Storage {
            conn,
            location,
            url: shown.clone(),
            cache: HashMap::new(),
            verified_distributions: HashMap::new(),
        };
        if let Err(e) = storage.configure() {
            // SQLite only looks at the file on the first statement, so this is where a file that
            // is not a database (a CSV, a JSON journal passed by mistake) shows up.
            if let (Some(rusqlite::ErrorCode::NotADatabase), StorageLocation::File(path)) =
                (e.downcast_ref::<rusqlite::Error>().and_then(|e| e.sqlite_error_code()), &storage.location)
            {
                bail!("--storage {url:?}: {} is not an SQLite database", path.display());
            }
            return Err(e.context(format!("--storage {shown:?}")));
        }
        storage.init_schema().with_context(|| format!("--storage {shown:?}"))?;
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

    /// A second connection to the same database (e.g. for a heartbeat thread).
    pub fn reopen(&self) -> Result<Self> {
        match &self.location {
            StorageLocation::Memory => bail!("an in-memory storage cannot be opened twice"),
            StorageLocation::File(path) => Self::open_path(path),
            StorageLocation::Postgres { .. } => Self::open_location(self.location.clone(), &self.url),
        }
    }

    fn configure(&mut self) -> Result<()> {
        let Connected::Sqlite(conn) = &mut self.conn else { return Ok(()) };
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.set_prepared_statement_cache_capacity(64);
        if let StorageLocation::File(_) = self.location {
            // journal_mode returns the mode as a row; WAL persists in the file.
            let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                bail!("cannot switch the database to WAL mode (got journal_mode={mode})");
            }
            // In WAL mode NORMAL never corrupts the database; a power cut (not a process crash)
            // may lose the last commits. It saves an fsync per write, most of an `ask`.
            conn.pragma_update(None, "synchronous", "NORMAL")?;
        }
        Ok(())
    }

    fn init_schema(&mut self) -> Result<()> {
        self.write(|tx| {
            if tx.is_postgres() {
                // Workers starting together on an empty database create the schema once.
                tx.exec("SELECT pg_advisory_xact_lock(4242424242)", &[])?;
                for (name, labels) in POSTGRES_ENUMS {
                    if tx.opt_row("SELECT 1 FROM pg_type WHERE typname = ?1", &sql_params![*name])?.is_none() {
                        tx.exec(&format!("CREATE TYPE {name} AS ENUM ({labels})"), &[])?;
                    }
                }
                for stmt in POSTGRES_SCHEMA {
                    tx.exec(stmt, &[])?;
                }
            } else {
                for stmt in SCHEMA {
                    tx.exec(stmt, &[])?;
                }
            }
            let version = tx.opt_row("SELECT schema_version, library_version FROM version_info", &[])?;
            match version.map(|r| Ok::<_, anyhow::Error>((r.get::<Option<i64>>(0)?, r.get::<Option<String>>(1)?))) {
                None => {
                    tx.exec(
                        "INSERT INTO version_info (version_info_id, schema_version, library_version) VALUES (1, ?1, ?2)",
                        &sql_params![SCHEMA_VERSION, LIBRARY_VERSION],
                    )?;
                }
                Some(Err(e)) => return Err(e),
                Some(Ok((Some(SCHEMA_VERSION), _))) => {}
                Some(Ok((v, lib))) => bail!(
                    "the database has Optuna schema version {} (written by Optuna {}); hpo-gpu reads version {SCHEMA_VERSION}",
                    v.map(|v| v.to_string()).unwrap_or_else(|| "NULL".into()),
                    lib.unwrap_or_else(|| "?".into())
                ),
            }
            let revisions: Vec<String> = tx
                .rows("SELECT version_num FROM alembic_version", &[])?
                .iter()
                .map(|r| r.get(0))
                .collect::<Result<_>>()?;
            match revisions.as_slice() {
                [] => {
                    tx.exec("INSERT INTO alembic_version (version_num) VALUES (?1)", &sql_params![ALEMBIC_VERSION])?;
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

    /// Runs `f` in one write transaction, retrying when it loses a race: SQLite's `BEGIN
    /// IMMEDIATE` (the write lock up front) with retries when the database stays locked past
    /// the busy timeout; PostgreSQL's READ COMMITTED (statements lock the rows they decide on)
    /// with retries on serialization failures and deadlocks, and a reconnect when the server went
    /// away.
    pub fn write<T>(&mut self, mut f: impl FnMut(&mut Tx) -> Result<T>) -> Result<T> {
        self.transaction(Access::Write, &mut f)
    }

    /// Runs `f` in one read transaction, so that several queries see one snapshot.
    pub(super) fn read<T>(&mut self, mut f: impl FnMut(&mut Tx) -> Result<T>) -> Result<T> {
        self.transaction(Access::Read, &mut f)
    }

    /// Runs `f`, which makes exactly one read statement: on PostgreSQL without BEGIN/COMMIT
    /// (a statement is its own snapshot), so it costs one round trip.
    pub(super) fn read_statement<T>(&mut self, mut f: impl FnMut(&mut Tx) -> Result<T>) -> Result<T> {
        self.transaction(Access::OneStatement, &mut f)
    }

    fn transaction<T>(&mut self, access: Access, f: &mut dyn FnMut(&mut Tx) -> Result<T>) -> Result<T> {
        let mut attempt = 0;
        loop {
            let result = (|| {
                let mut tx = match &mut self.conn {
                    Connected::Sqlite(conn) => Tx::Sqlite(conn.transaction_with_behavior(match access {
                        Access::Write => TransactionBehavior::Immediate,
                        Access::Read | Access::OneStatement => TransactionBehavior::Deferred,
                    })?),
                    Connected::Postgres(client, cache) => match access {
                        Access::Write => Tx::Postgres(client.transaction()?, cache),
                        Access::Read => Tx::Postgres(
                            client
                                .build_transaction()
                                .read_only(true)
                                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                                .start()?,
                            cache,
                        ),
                        Access::OneStatement => Tx::PostgresAutocommit(client, cache),
                    },
                };
                let out = f(&mut tx)?;
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
                Err(e) if is_disconnect(&e) => self.reconnect(&e)?,
                other => return other,
            }
        }
    }

    /// After losing the PostgreSQL server: reconnects with backoff for up to [`RECONNECT_FOR`],
    /// saying so in one line, so a restarted server costs a worker nothing but the wait. The
    /// interrupted transaction is then run again (it was rolled back with the connection).
    fn reconnect(&mut self, lost: &anyhow::Error) -> Result<()> {
        let StorageLocation::Postgres { url, password } = self.location.clone() else {
            unreachable!("only PostgreSQL disconnects")
        };
        let why = lost.chain().last().map(|c| c.to_string()).unwrap_or_default();
        eprintln!("note: lost the connection to PostgreSQL at {} ({why}); reconnecting", self.url);
        let started = std::time::Instant::now();
        let mut wait = Duration::from_millis(200);
        loop {
            std::thread::sleep(wait);
            match connect_postgres(&url, password.as_deref(), &self.url) {
                Ok(client) => {
                    self.conn = Connected::Postgres(Box::new(client), StatementCache::new());
                    eprintln!(
                        "note: reconnected to PostgreSQL after {:.1} s",
                        started.elapsed().as_secs_f64()
                    );
                    return Ok(());
                }
                Err(e) if started.elapsed() >= RECONNECT_FOR => {
                    return Err(e.context(format!(
                        "the PostgreSQL server stayed unreachable for {} s",
                        RECONNECT_FOR.as_secs()
                    )));
                }
                Err(_) => wait = (wait * 2).min(Duration::from_secs(5)),
            }
        }
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
        for (url, want) in [
            ("postgresql://u:p@h:5433/db", "postgresql://u:p@h:5433/db"),
            ("postgresql+psycopg2://u:p@h/db", "postgresql://u:p@h/db"),
            ("postgres://u:p@h/db", "postgresql://u:p@h/db"),
        ] {
            let location = StorageLocation::Postgres { url: want.into(), password: None };
            assert_eq!(parse_storage_url(url).unwrap(), location, "{url}");
        }
        assert_eq!(redact_url("postgresql://u:secret@h/db"), "postgresql://u:***@h/db");
        for (bad, want) in [
            ("mysql://u@h/db", "unsupported database \"mysql\""),
            ("postgresql://u@h", "names no database"),
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
    fn pgpass_lines_match_host_port_database_and_user() {
        assert_eq!(split_pgpass(r"h:5432:db:u:p\:w\\d"), ["h", "5432", "db", "u", r"p:w\d"]);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pgpass");
        std::fs::write(&file, "# comment\nother:*:*:*:no\n127.0.0.1:5433:*:hpo:yes\n*:*:*:*:fallback\n")
            .unwrap();
        // SAFETY (env): this test alone reads PGPASSFILE.
        unsafe { std::env::set_var("PGPASSFILE", &file) };
        let config = |url: &str| postgres::Config::from_str(url).unwrap();
        assert_eq!(pgpass_password(&config("postgresql://hpo@127.0.0.1:5433/x")).as_deref(), Some("yes"));
        assert_eq!(pgpass_password(&config("postgresql://hpo@127.0.0.1/x")).as_deref(), Some("fallback"));
        unsafe { std::env::remove_var("PGPASSFILE") };
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
