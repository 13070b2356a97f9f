//! Bad PostgreSQL storages and the exact line `hpo-gpu trials --storage URL --study-name s` prints
//! for each. tests/study_postgres.rs runs them against the test server; tests/cli_bad_input.rs
//! renders them into docs/cli-errors.md (that table runs without a server).
//!
//! Placeholders: `<user>`, `<password>`, `<host>` (host:port) of the test server, `<db>` a database
//! of the test's own.

pub struct PostgresCase {
    pub id: &'static str,
    /// What is wrong, in words.
    pub input: &'static str,
    pub storage: &'static str,
    /// The whole of stderr; the exit code is 1.
    pub stderr: &'static str,
}

pub static POSTGRES_CASES: &[PostgresCase] = &[
    PostgresCase {
        id: "storage-postgres-wrong-password",
        input: "a wrong password",
        storage: "postgresql://<user>:wrong@<host>/<db>",
        stderr: "error: --storage \"postgresql://<user>:***@<host>/<db>\": cannot connect to PostgreSQL: \
                 password authentication failed for user \"<user>\"",
    },
    PostgresCase {
        id: "storage-postgres-missing-database",
        input: "a database that does not exist",
        storage: "postgresql://<user>:<password>@<host>/no_such_db",
        stderr: "error: --storage \"postgresql://<user>:***@<host>/no_such_db\": cannot connect to PostgreSQL: \
                 database \"no_such_db\" does not exist",
    },
    PostgresCase {
        id: "storage-postgres-old-schema",
        input: "a database Optuna 3.0 left (schema revision v3.0.0.d)",
        storage: "postgresql://<user>:<password>@<host>/<db>",
        stderr: "error: --storage \"postgresql://<user>:***@<host>/<db>\": the database is at Optuna schema \
                 revision [\"v3.0.0.d\"], hpo-gpu reads v3.2.0.a; run `optuna storage upgrade --storage URL` \
                 with Optuna >= 3.2 first",
    },
];

/// The command line of a case.
pub fn postgres_case_args(case: &PostgresCase) -> [&'static str; 5] {
    ["trials", "--storage", case.storage, "--study-name", "s"]
}
