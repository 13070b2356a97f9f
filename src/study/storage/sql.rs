//! One way to run a statement on either database: SQLite (rusqlite) or PostgreSQL (postgres).
//!
//! Statements are written once, with SQLite's `?N` placeholders (turned into `$N` for
//! PostgreSQL). Values travel as [`SqlValue`]; on PostgreSQL a value is converted to the type the
//! server asks for, so text binds to Optuna's enum columns (`trialstate`, …) and to `TIMESTAMP`
//! columns (our naive-UTC datetime text), and those read back as text. Rows come back as
//! [`SqlRow`]s read by column index.

use anyhow::{Context, Result, anyhow, bail};
use bytes::{BufMut, BytesMut};
use postgres::types::{FromSql, IsNull, Kind, ToSql, Type, to_sql_checked};

use crate::trial::UtcDateTime;

/// A statement parameter or a column value.
#[derive(Clone, Debug, PartialEq)]
pub enum SqlValue {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

impl From<i64> for SqlValue {
    fn from(v: i64) -> Self {
        SqlValue::Int(v)
    }
}

impl From<f64> for SqlValue {
    fn from(v: f64) -> Self {
        SqlValue::Real(v)
    }
}

impl From<&str> for SqlValue {
    fn from(v: &str) -> Self {
        SqlValue::Text(v.to_string())
    }
}

impl From<String> for SqlValue {
    fn from(v: String) -> Self {
        SqlValue::Text(v)
    }
}

impl From<&String> for SqlValue {
    fn from(v: &String) -> Self {
        SqlValue::Text(v.clone())
    }
}

impl<T: Into<SqlValue>> From<Option<T>> for SqlValue {
    fn from(v: Option<T>) -> Self {
        v.map_or(SqlValue::Null, Into::into)
    }
}

/// `[SqlValue; N]` from expressions of any type with `Into<SqlValue>`.
macro_rules! sql_params {
    ($($x:expr),* $(,)?) => { [$($crate::study::storage::sql::SqlValue::from($x)),*] };
}
pub(crate) use sql_params;

/// A column value read as `Self`.
pub trait FromColumn: Sized {
    fn from_column(v: &SqlValue) -> Result<Self>;
}

impl FromColumn for i64 {
    fn from_column(v: &SqlValue) -> Result<Self> {
        match v {
            SqlValue::Int(i) => Ok(*i),
            other => bail!("expected an integer, found {other:?}"),
        }
    }
}

impl FromColumn for f64 {
    fn from_column(v: &SqlValue) -> Result<Self> {
        match v {
            SqlValue::Real(x) => Ok(*x),
            // SQLite stores a whole REAL as an integer in some columns; PostgreSQL never does.
            SqlValue::Int(i) => Ok(*i as f64),
            other => bail!("expected a number, found {other:?}"),
        }
    }
}

impl FromColumn for String {
    fn from_column(v: &SqlValue) -> Result<Self> {
        match v {
            SqlValue::Text(s) => Ok(s.clone()),
            other => bail!("expected text, found {other:?}"),
        }
    }
}

impl<T: FromColumn> FromColumn for Option<T> {
    fn from_column(v: &SqlValue) -> Result<Self> {
        match v {
            SqlValue::Null => Ok(None),
            v => T::from_column(v).map(Some),
        }
    }
}

/// One result row.
#[derive(Clone, Debug)]
pub struct SqlRow(Vec<SqlValue>);

impl SqlRow {
    pub fn get<T: FromColumn>(&self, i: usize) -> Result<T> {
        let v = self.0.get(i).ok_or_else(|| anyhow!("no column {i} in the result"))?;
        T::from_column(v).with_context(|| format!("column {i}"))
    }
}

/// Prepared PostgreSQL statements by SQL text, for one connection: a statement then costs one
/// round trip instead of two (SQLite has its own cache, `prepare_cached`).
pub type StatementCache = std::collections::HashMap<String, postgres::Statement>;

/// A transaction on either database.
pub enum Tx<'c> {
    Sqlite(rusqlite::Transaction<'c>),
    Postgres(postgres::Transaction<'c>, &'c mut StatementCache),
    /// No transaction: each statement commits on its own (and reads its own snapshot). For
    /// reads made of one statement, which then cost one round trip instead of three.
    PostgresAutocommit(&'c mut postgres::Client, &'c mut StatementCache),
}

impl Tx<'_> {
    pub fn is_postgres(&self) -> bool {
        !matches!(self, Tx::Sqlite(..))
    }

    /// Runs a statement; the number of rows it changed.
    pub fn exec(&mut self, sql: &str, params: &[SqlValue]) -> Result<u64> {
        match self {
            Tx::Sqlite(tx) => {
                let mut stmt = tx.prepare_cached(sql)?;
                Ok(stmt.execute(rusqlite::params_from_iter(params.iter()))? as u64)
            }
            Tx::Postgres(tx, cache) => {
                let stmt = prepared(tx, cache, sql)?;
                Ok(tx.execute(&stmt, &pg_params(params))?)
            }
            Tx::PostgresAutocommit(client, cache) => {
                let stmt = prepared(*client, cache, sql)?;
                Ok(client.execute(&stmt, &pg_params(params))?)
            }
        }
    }

    /// All rows of a query.
    pub fn rows(&mut self, sql: &str, params: &[SqlValue]) -> Result<Vec<SqlRow>> {
        match self {
            Tx::Sqlite(tx) => {
                let mut stmt = tx.prepare_cached(sql)?;
                let n = stmt.column_count();
                let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    out.push(SqlRow(
                        (0..n).map(|i| r.get_ref(i).map(from_sqlite)).collect::<rusqlite::Result<_>>()?,
                    ));
                }
                Ok(out)
            }
            Tx::Postgres(tx, cache) => {
                let stmt = prepared(tx, cache, sql)?;
                pg_rows(tx.query(&stmt, &pg_params(params))?)
            }
            Tx::PostgresAutocommit(client, cache) => {
                let stmt = prepared(*client, cache, sql)?;
                pg_rows(client.query(&stmt, &pg_params(params))?)
            }
        }
    }

    /// The first row of a query, if any.
    pub fn opt_row(&mut self, sql: &str, params: &[SqlValue]) -> Result<Option<SqlRow>> {
        Ok(self.rows(sql, params)?.into_iter().next())
    }

    /// The first row of a query that must return one.
    pub fn row(&mut self, sql: &str, params: &[SqlValue]) -> Result<SqlRow> {
        self.opt_row(sql, params)?.ok_or_else(|| anyhow!("the query returned no row"))
    }

    pub(super) fn commit(self) -> Result<()> {
        match self {
            Tx::Sqlite(tx) => tx.commit()?,
            Tx::Postgres(tx, _) => tx.commit()?,
            Tx::PostgresAutocommit(..) => {}
        }
        Ok(())
    }
}

/// The prepared statement for `sql` on this connection, prepared once.
fn pg_rows(rows: Vec<postgres::Row>) -> Result<Vec<SqlRow>> {
    rows.iter()
        .map(|r| Ok(SqlRow((0..r.len()).map(|i| r.try_get::<_, SqlValue>(i)).collect::<Result<_, _>>()?)))
        .collect()
}

fn prepared(
    tx: &mut impl postgres::GenericClient,
    cache: &mut StatementCache,
    sql: &str,
) -> Result<postgres::Statement> {
    if let Some(stmt) = cache.get(sql) {
        return Ok(stmt.clone());
    }
    let stmt = tx.prepare(&postgres_sql(sql))?;
    cache.insert(sql.to_string(), stmt.clone());
    Ok(stmt)
}

/// `?N` → `$N` (our statements have no `?` inside literals).
fn postgres_sql(sql: &str) -> String {
    sql.replace('?', "$")
}

fn pg_params(params: &[SqlValue]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

fn from_sqlite(v: rusqlite::types::ValueRef<'_>) -> SqlValue {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => SqlValue::Null,
        ValueRef::Integer(i) => SqlValue::Int(i),
        ValueRef::Real(x) => SqlValue::Real(x),
        ValueRef::Text(t) => SqlValue::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => SqlValue::Text(String::from_utf8_lossy(b).into_owned()),
    }
}

impl rusqlite::ToSql for SqlValue {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            SqlValue::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            SqlValue::Int(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            SqlValue::Real(x) => ToSqlOutput::Borrowed(ValueRef::Real(*x)),
            SqlValue::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        })
    }
}

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Text-like types a value binds to as its UTF-8 bytes (enums send their label).
fn is_text(ty: &Type) -> bool {
    matches!(*ty, Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN | Type::JSON)
        || matches!(ty.kind(), Kind::Enum(_))
}

impl ToSql for SqlValue {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let int = |x: f64| -> Result<i64, String> {
            if x.fract() == 0.0 && x.abs() < 9.0e15 {
                Ok(x as i64)
            } else {
                Err(format!("{x} is not an integer"))
            }
        };
        match (self, ty) {
            (SqlValue::Null, _) => return Ok(IsNull::Yes),
            (SqlValue::Int(i), &Type::INT8) => out.put_i64(*i),
            (SqlValue::Int(i), &Type::INT4) => out.put_i32(i32::try_from(*i)?),
            (SqlValue::Int(i), &Type::INT2) => out.put_i16(i16::try_from(*i)?),
            (SqlValue::Real(x), &Type::INT8) => out.put_i64(int(*x)?),
            (SqlValue::Real(x), &Type::INT4) => out.put_i32(i32::try_from(int(*x)?)?),
            (SqlValue::Int(i), &Type::FLOAT8) => out.put_f64(*i as f64),
            (SqlValue::Real(x), &Type::FLOAT8) => out.put_f64(*x),
            (SqlValue::Real(x), &Type::FLOAT4) => out.put_f32(*x as f32),
            (SqlValue::Text(s), &Type::TIMESTAMP) => {
                out.put_i64(UtcDateTime::parse(s)?.micros_since_epoch - POSTGRES_EPOCH_MICROS)
            }
            (SqlValue::Text(s), ty) if is_text(ty) => {
                if *ty == Type::JSONB {
                    out.put_u8(1);
                }
                out.put_slice(s.as_bytes())
            }
            (v, ty) => return Err(format!("cannot send {v:?} as PostgreSQL type {ty}").into()),
        }
        Ok(IsNull::No)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

impl<'a> FromSql<'a> for SqlValue {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(match *ty {
            Type::INT8 => SqlValue::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => SqlValue::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT2 => SqlValue::Int(i16::from_sql(ty, raw)?.into()),
            Type::FLOAT8 => SqlValue::Real(f64::from_sql(ty, raw)?),
            Type::FLOAT4 => SqlValue::Real(f32::from_sql(ty, raw)?.into()),
            Type::TIMESTAMP => {
                let micros = i64::from_sql(&Type::INT8, raw)? + POSTGRES_EPOCH_MICROS;
                SqlValue::Text(UtcDateTime { micros_since_epoch: micros }.format())
            }
            _ if is_text(ty) => SqlValue::Text(std::str::from_utf8(raw)?.to_string()),
            _ => return Err(format!("unexpected PostgreSQL column type {ty}").into()),
        })
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(SqlValue::Null)
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_values() {
        assert_eq!(postgres_sql("UPDATE t SET a = ?2 WHERE b = ?1"), "UPDATE t SET a = $2 WHERE b = $1");
        let row =
            SqlRow(vec![SqlValue::Int(3), SqlValue::Null, SqlValue::Text("x".into()), SqlValue::Int(2)]);
        assert_eq!(row.get::<i64>(0).unwrap(), 3);
        assert_eq!(row.get::<Option<f64>>(1).unwrap(), None);
        assert_eq!(row.get::<String>(2).unwrap(), "x");
        assert_eq!(row.get::<f64>(3).unwrap(), 2.0);
        assert!(row.get::<String>(0).is_err());
        assert!(row.get::<i64>(4).is_err());
        let p = sql_params![1i64, 0.5, "a", None::<String>];
        assert_eq!(p, [SqlValue::Int(1), SqlValue::Real(0.5), SqlValue::Text("a".into()), SqlValue::Null]);
    }

    #[test]
    fn timestamps_round_trip_through_postgres_encoding() {
        let text = "2026-12-07 07:15:01.123456";
        let mut buf = BytesMut::new();
        SqlValue::from(text).to_sql(&Type::TIMESTAMP, &mut buf).unwrap();
        assert_eq!(SqlValue::from_sql(&Type::TIMESTAMP, &buf).unwrap(), SqlValue::from(text));
        // 2000-01-01 00:00:00 is PostgreSQL's zero.
        let mut buf = BytesMut::new();
        SqlValue::from("2000-01-01 00:00:00.000000").to_sql(&Type::TIMESTAMP, &mut buf).unwrap();
        assert_eq!(&buf[..], &[0u8; 8]);
    }
}
