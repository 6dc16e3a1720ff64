//! The store's statements, on either backend: [`query`] builds one, binds its values and runs
//! it on a connection ([`Exec`]); rows come back as [`Row`].
//!
//! SQLite runs in this process, on the calling thread, through rusqlite: a prepared
//! statement (cached per connection) binds, steps and reads in about a microsecond. Behind
//! sqlx the same statement was a trip to sqlx's connection thread and back, two thread
//! wake-ups that cost 9–40 µs on this kind of VM, and a lease's round trip ran about 25 of
//! them. PostgreSQL is across a socket anyway and stays on sqlx's `Any` driver, unchanged.
//!
//! Placeholders are written `$1, $2, …` for both. SQLite reads `$N` as a parameter named
//! `$N`; [`Query`] binds value N to it (what sqlx did), so a value used twice is bound once.
//!
//! A bound `LIMIT` or `OFFSET` is written `LIMIT +$N`: SQLite (3.51) plans with a bare
//! parameter's value there, so every new value made the cached statement compile again
//! (`sqlite3Reprepare` at its first step: 18 µs instead of 5 for the tasks of a job). The
//! unary plus hides the value from the planner; PostgreSQL reads it as the number it is.
//! Tests count recompilations ([`reprepared`]) and expect none.

use std::borrow::Cow;
use std::sync::Arc;

use sqlx::any::AnyRow;
use sqlx::{Any, AnyConnection, Row as _};

use super::StoreError;

/// Statements SQLite compiled again since the process started (tests: a hot statement that
/// recompiles on new values costs several times its run).
#[cfg(test)]
static REPREPARED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// [`REPREPARED`]'s count.
#[cfg(test)]
pub(crate) fn reprepared() -> u64 {
    REPREPARED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Prepared statements each SQLite connection keeps (rusqlite's default is 16; the store has
/// about a hundred distinct statements, and a few built per batch size).
pub(crate) const STATEMENT_CACHE: usize = 512;

/// The type of a NULL, which PostgreSQL needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Int,
    Real,
    Bool,
    Text,
    Blob,
}

/// A value bound to a statement, or read from a SQLite row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null(Kind),
    Int(i64),
    Real(f64),
    Bool(bool),
    Text(String),
    Blob(Vec<u8>),
}

/// What can be bound to a placeholder.
pub(crate) trait Bind {
    /// The type of this type's NULL.
    const KIND: Kind;
    fn value(self) -> Value;
}

macro_rules! bind {
    ($kind:ident, $variant:ident, $($t:ty => $conv:expr),+ $(,)?) => {
        $(impl Bind for $t {
            const KIND: Kind = Kind::$kind;
            fn value(self) -> Value {
                Value::$variant($conv(self))
            }
        })+
    };
}

use std::convert::identity;
bind!(Int, Int, i64 => identity, i32 => i64::from, u32 => i64::from);
bind!(Real, Real, f64 => identity);
bind!(Bool, Bool, bool => identity);
bind!(Text, Text, String => identity, &str => str::to_owned, &String => String::clone);
bind!(Blob, Blob, Vec<u8> => identity, &[u8] => <[u8]>::to_vec, &Vec<u8> => Vec::clone);

/// A value already made (its NULL carries its own type).
impl Bind for Value {
    const KIND: Kind = Kind::Text;
    fn value(self) -> Value {
        self
    }
}

impl<T: Bind> Bind for Option<T> {
    const KIND: Kind = T::KIND;
    fn value(self) -> Value {
        match self {
            Some(v) => v.value(),
            None => Value::Null(T::KIND),
        }
    }
}

/// What a column can be read as: on PostgreSQL through sqlx's decoding, on SQLite from the
/// stored value (SQLite's own conversions between integers and reals; text for blobs).
pub(crate) trait Decode: Sized + for<'r> sqlx::Decode<'r, Any> + sqlx::Type<Any> {
    fn from_sqlite(v: &Value) -> Result<Self, String>;
}

fn mismatch<T>(want: &str, v: &Value) -> Result<T, String> {
    Err(match v {
        Value::Null(_) => format!("NULL where {want} was expected"),
        v => format!("{v:?} where {want} was expected"),
    })
}

impl Decode for i64 {
    fn from_sqlite(v: &Value) -> Result<Self, String> {
        match v {
            Value::Int(i) => Ok(*i),
            Value::Bool(b) => Ok(i64::from(*b)),
            Value::Real(r) if r.fract() == 0.0 => Ok(*r as i64),
            v => mismatch("an integer", v),
        }
    }
}

impl Decode for f64 {
    fn from_sqlite(v: &Value) -> Result<Self, String> {
        match v {
            Value::Real(r) => Ok(*r),
            Value::Int(i) => Ok(*i as f64),
            v => mismatch("a number", v),
        }
    }
}

impl Decode for bool {
    fn from_sqlite(v: &Value) -> Result<Self, String> {
        match v {
            Value::Bool(b) => Ok(*b),
            Value::Int(i) => Ok(*i != 0),
            v => mismatch("a boolean", v),
        }
    }
}

impl Decode for String {
    fn from_sqlite(v: &Value) -> Result<Self, String> {
        match v {
            Value::Text(s) => Ok(s.clone()),
            v => mismatch("text", v),
        }
    }
}

impl Decode for Vec<u8> {
    fn from_sqlite(v: &Value) -> Result<Self, String> {
        match v {
            Value::Blob(b) => Ok(b.clone()),
            Value::Text(s) => Ok(s.clone().into_bytes()),
            v => mismatch("a blob", v),
        }
    }
}

impl<T: Decode> Decode for Option<T> {
    fn from_sqlite(v: &Value) -> Result<Self, String> {
        match v {
            Value::Null(_) => Ok(None),
            v => T::from_sqlite(v).map(Some),
        }
    }
}

/// A row read.
pub(crate) enum Row {
    Sqlite {
        columns: Arc<[String]>,
        values: Vec<Value>,
    },
    Postgres(AnyRow),
}

impl Row {
    /// The value of a column, by name.
    pub fn try_get<T: Decode>(&self, column: &str) -> Result<T, StoreError> {
        match self {
            Self::Postgres(r) => Ok(r.try_get::<T, _>(column)?),
            Self::Sqlite { columns, values } => {
                let Some(i) = columns.iter().position(|c| c == column) else {
                    return Err(StoreError::Column {
                        column: column.to_owned(),
                        reason: "no such column in the row".to_owned(),
                    });
                };
                T::from_sqlite(&values[i]).map_err(|reason| StoreError::Column {
                    column: column.to_owned(),
                    reason,
                })
            }
        }
    }
}

/// What a statement that returns no rows did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Done {
    rows: u64,
}

impl Done {
    /// Rows inserted, updated or deleted.
    pub fn rows_affected(&self) -> u64 {
        self.rows
    }
}

/// A connection statements run on.
pub(crate) enum On<'c> {
    Sqlite(&'c mut rusqlite::Connection),
    Postgres(&'c mut AnyConnection),
}

/// Something holding a connection: a connection taken for one operation, or a transaction.
pub(crate) trait Exec {
    fn on(&mut self) -> On<'_>;
}

impl Exec for rusqlite::Connection {
    fn on(&mut self) -> On<'_> {
        On::Sqlite(self)
    }
}

impl Exec for AnyConnection {
    fn on(&mut self) -> On<'_> {
        On::Postgres(self)
    }
}

/// A statement with its values.
#[must_use = "a query does nothing until it runs"]
pub(crate) struct Query<'q> {
    sql: Cow<'q, str>,
    args: Vec<Value>,
}

/// A statement; bind its values with [`Query::bind`], in placeholder order.
pub(crate) fn query<'q>(sql: impl Into<Cow<'q, str>>) -> Query<'q> {
    Query {
        sql: sql.into(),
        args: Vec::new(),
    }
}

impl<'q> Query<'q> {
    /// Binds the next value (`$1` first).
    pub fn bind(mut self, value: impl Bind) -> Self {
        self.args.push(value.value());
        self
    }

    /// Binds the next value, in place.
    pub fn add(&mut self, value: impl Bind) {
        self.args.push(value.value());
    }

    /// Runs a statement whose rows (if any) are not wanted.
    pub async fn execute<E: Exec + ?Sized>(self, on: &mut E) -> Result<Done, StoreError> {
        match on.on() {
            On::Sqlite(c) => Ok(Done {
                rows: self.sqlite(c, |_| Ok(()))?.1,
            }),
            On::Postgres(c) => {
                let done = self.postgres()?.execute(c).await?;
                Ok(Done {
                    rows: done.rows_affected(),
                })
            }
        }
    }

    /// All rows.
    pub async fn fetch_all<E: Exec + ?Sized>(self, on: &mut E) -> Result<Vec<Row>, StoreError> {
        match on.on() {
            On::Sqlite(c) => {
                let mut rows = Vec::new();
                self.sqlite(c, |r| {
                    rows.push(r);
                    Ok(())
                })?;
                Ok(rows)
            }
            On::Postgres(c) => Ok(self
                .postgres()?
                .fetch_all(c)
                .await?
                .into_iter()
                .map(Row::Postgres)
                .collect()),
        }
    }

    /// The first row, if any.
    pub async fn fetch_optional<E: Exec + ?Sized>(
        self,
        on: &mut E,
    ) -> Result<Option<Row>, StoreError> {
        self.first(on).await
    }

    async fn first<E: Exec + ?Sized>(&self, on: &mut E) -> Result<Option<Row>, StoreError> {
        match on.on() {
            On::Sqlite(c) => {
                let mut first = None;
                self.sqlite(c, |r| {
                    if first.is_none() {
                        first = Some(r);
                    }
                    Ok(())
                })?;
                Ok(first)
            }
            On::Postgres(c) => Ok(self.postgres()?.fetch_optional(c).await?.map(Row::Postgres)),
        }
    }

    /// The first row; an error if there is none.
    pub async fn fetch_one<E: Exec + ?Sized>(self, on: &mut E) -> Result<Row, StoreError> {
        // The statement's text is copied into the error only when there is one.
        self.first(on)
            .await?
            .ok_or_else(|| StoreError::NoRow(self.sql.chars().take(80).collect()))
    }

    /// The statement for sqlx, once its placeholders are known to have values (the server
    /// would refuse it too, with a less helpful message).
    fn postgres(&self) -> Result<sqlx::query::Query<'_, Any, sqlx::any::AnyArguments>, StoreError> {
        let highest = self
            .sql
            .match_indices('$')
            .filter_map(|(i, _)| {
                let digits = &self.sql[i + 1..];
                let end = digits
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(digits.len());
                digits[..end].parse::<usize>().ok()
            })
            .max()
            .unwrap_or(0);
        if highest > self.args.len() {
            return Err(unbound(highest, self.args.len()));
        }
        let mut q = sqlx::query(sqlx::AssertSqlSafe(&*self.sql));
        for v in &self.args {
            q = match v {
                Value::Null(Kind::Int) => q.bind(None::<i64>),
                Value::Null(Kind::Real) => q.bind(None::<f64>),
                Value::Null(Kind::Bool) => q.bind(None::<bool>),
                Value::Null(Kind::Text) => q.bind(None::<String>),
                Value::Null(Kind::Blob) => q.bind(None::<Vec<u8>>),
                Value::Int(i) => q.bind(*i),
                Value::Real(r) => q.bind(*r),
                Value::Bool(b) => q.bind(*b),
                Value::Text(s) => q.bind(s.as_str()),
                Value::Blob(b) => q.bind(b.as_slice()),
            };
        }
        Ok(q)
    }

    /// Runs on SQLite, handing each row to `row`; returns the rows read and the rows the
    /// statement changed.
    fn sqlite(
        &self,
        c: &rusqlite::Connection,
        mut row: impl FnMut(Row) -> Result<(), StoreError>,
    ) -> Result<(u64, u64), StoreError> {
        let mut stmt = c.prepare_cached(&self.sql)?;
        let params = stmt.parameter_count();
        let mut next = 0;
        for i in 1..=params {
            // `$N` (or `?N`) takes value N; an anonymous `?` the next one.
            let n = match stmt.parameter_name(i) {
                Some(name) => name
                    .strip_prefix(['$', '?'])
                    .and_then(|d| d.parse::<usize>().ok())
                    .ok_or_else(|| StoreError::Bind(format!("unsupported placeholder {name}")))?,
                None => {
                    next += 1;
                    next
                }
            };
            let Some(v) = n.checked_sub(1).and_then(|k| self.args.get(k)) else {
                return Err(unbound(n, self.args.len()));
            };
            match v {
                Value::Null(_) => stmt.raw_bind_parameter(i, rusqlite::types::Null)?,
                Value::Int(x) => stmt.raw_bind_parameter(i, x)?,
                Value::Real(x) => stmt.raw_bind_parameter(i, x)?,
                Value::Bool(x) => stmt.raw_bind_parameter(i, i64::from(*x))?,
                Value::Text(x) => stmt.raw_bind_parameter(i, x.as_str())?,
                Value::Blob(x) => stmt.raw_bind_parameter(i, x.as_slice())?,
            }
        }
        let width = stmt.column_count();
        let columns: Option<Arc<[String]>> =
            (width > 0).then(|| stmt.column_names().into_iter().map(str::to_owned).collect());
        let mut rows = stmt.raw_query();
        let mut read = 0;
        while let Some(r) = rows.next()? {
            read += 1;
            let mut values = Vec::with_capacity(width);
            for i in 0..width {
                use rusqlite::types::ValueRef;
                values.push(match r.get_ref(i)? {
                    ValueRef::Null => Value::Null(Kind::Int),
                    ValueRef::Integer(x) => Value::Int(x),
                    ValueRef::Real(x) => Value::Real(x),
                    ValueRef::Text(t) => Value::Text(
                        std::str::from_utf8(t)
                            .map_err(|e| StoreError::Column {
                                column: r.as_ref().column_name(i).unwrap_or("?").to_owned(),
                                reason: e.to_string(),
                            })?
                            .to_owned(),
                    ),
                    ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                });
            }
            row(Row::Sqlite {
                columns: columns.clone().unwrap_or_else(|| Arc::new([])),
                values,
            })?;
        }
        drop(rows);
        #[cfg(test)]
        REPREPARED.fetch_add(
            stmt.reset_status(rusqlite::StatementStatus::RePrepare) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok((read, c.changes()))
    }
}

fn unbound(placeholder: usize, bound: usize) -> StoreError {
    StoreError::Bind(format!("no value for ${placeholder} ({bound} bound)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> rusqlite::Connection {
        let c = rusqlite::Connection::open_in_memory().expect("open");
        c.execute_batch("CREATE TABLE t (a INTEGER, b TEXT, c BLOB)")
            .expect("create");
        c
    }

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn numbered_placeholders_take_their_value_even_out_of_order_or_twice() {
        let mut c = conn();
        run(async {
            let done = query("INSERT INTO t (a, b, c) VALUES ($2, $1, $3), ($2, $1, NULL)")
                .bind("x")
                .bind(7_i64)
                .bind(&b"blob"[..])
                .execute(&mut c)
                .await
                .expect("insert");
            assert_eq!(done.rows_affected(), 2);
            let rows = query("SELECT a, b, c FROM t WHERE a = $1 AND b = $2 ORDER BY c IS NULL")
                .bind(7_i64)
                .bind("x")
                .fetch_all(&mut c)
                .await
                .expect("select");
            assert_eq!(rows.len(), 2);
            assert_eq!(rows[0].try_get::<i64>("a").expect("a"), 7);
            assert_eq!(rows[0].try_get::<String>("b").expect("b"), "x");
            assert_eq!(rows[0].try_get::<Vec<u8>>("c").expect("c"), b"blob");
            assert_eq!(rows[1].try_get::<Option<Vec<u8>>>("c").expect("c"), None);
        });
    }

    #[test]
    fn bad_binds_and_reads_are_errors_not_panics() {
        let mut c = conn();
        run(async {
            let e = query("INSERT INTO t (a, b) VALUES ($1, $2)")
                .bind(1_i64)
                .execute(&mut c)
                .await
                .expect_err("one value for two placeholders");
            assert!(e.to_string().contains("no value for $2 (1 bound)"), "{e}");
            query("INSERT INTO t (a, b) VALUES (NULL, 'x')")
                .execute(&mut c)
                .await
                .expect("insert");
            let row = query("SELECT a, b FROM t")
                .fetch_one(&mut c)
                .await
                .expect("row");
            let e = row.try_get::<i64>("a").expect_err("NULL is no integer");
            assert!(e.to_string().contains("NULL"), "{e}");
            assert!(row.try_get::<i64>("b").is_err());
            assert!(row.try_get::<String>("nope").is_err());
            let none = query("SELECT a FROM t WHERE b = $1")
                .bind("absent")
                .fetch_one(&mut c)
                .await;
            assert!(matches!(none, Err(StoreError::NoRow(_))));
        });
    }
}
