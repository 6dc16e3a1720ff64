//! Write statements queued to run together: [`Script`].
//!
//! Every statement sent to SQLite is a trip to sqlx's worker thread and back (~13 µs inside
//! a transaction, most of it waking threads), while SQLite runs a small write in 1–2 µs. A
//! transaction's writes whose results nobody reads (row counts included) can go in one
//! trip: sqlx's SQLite driver runs a query text of several statements in order, binding
//! anonymous `?` parameters from one argument list with a running offset. So on SQLite a
//! script joins its statements into one text, each statement's `$N` placeholders rewritten
//! to `?` in order. PostgreSQL binds parameters to one statement per query: there a script
//! runs its statements one by one, as written.
//!
//! A statement whose placeholders are not `$1, $2, …` each once in text order (a value used
//! twice, say) cannot be rewritten that way; it runs as a query of its own, in its place.

use sqlx::any::AnyArguments;
use sqlx::{Any, Arguments as _, Encode, Type};

use super::Backend;
use super::db::Tx;

/// Statements joined into one SQLite query at most (a bound on the query's text).
const STATEMENTS_PER_QUERY: usize = 64;

/// Writes queued for one transaction; run in order by [`Script::run`] or
/// [`Tx::commit_with`].
pub(crate) struct Script {
    joined: bool,
    queries: Vec<Query>,
}

/// One query: one statement, or (SQLite) several joined.
struct Query {
    sql: String,
    args: AnyArguments,
    /// Statements in it.
    statements: usize,
    /// Whether more statements may join it (its placeholders are `?`).
    open: bool,
    /// Values its placeholders take, summed over its statements.
    params: usize,
    /// The first value that failed to encode.
    error: Option<sqlx::error::BoxDynError>,
}

/// A statement being bound: [`Bind::bind`] its values in placeholder order.
pub(crate) struct Bind<'a> {
    query: &'a mut Query,
}

impl Bind<'_> {
    /// Binds the next value.
    pub fn bind<'t, T: Encode<'t, Any> + Type<Any>>(self, value: T) -> Self {
        if let Err(e) = self.query.args.add(value)
            && self.query.error.is_none()
        {
            self.query.error = Some(e);
        }
        self
    }
}

impl Script {
    pub fn new(backend: Backend) -> Self {
        Self {
            joined: backend == Backend::Sqlite,
            queries: Vec::new(),
        }
    }

    /// Queues a statement; bind its values on what this returns.
    pub fn push(&mut self, sql: &str) -> Bind<'_> {
        let anonymous = if self.joined { anonymous(sql) } else { None };
        let params = placeholders(sql);
        let joins = anonymous.is_some()
            && self
                .queries
                .last()
                .is_some_and(|q| q.open && q.statements < STATEMENTS_PER_QUERY);
        if joins {
            let Some(query) = self.queries.last_mut() else {
                unreachable!("checked above")
            };
            query.sql.push_str(";\n");
            query.sql.push_str(anonymous.as_deref().unwrap_or(sql));
            query.statements += 1;
            query.params += params;
        } else {
            self.queries.push(Query {
                open: anonymous.is_some(),
                sql: anonymous.unwrap_or_else(|| sql.to_owned()),
                args: AnyArguments::default(),
                statements: 1,
                params,
                error: None,
            });
        }
        let Some(query) = self.queries.last_mut() else {
            unreachable!("pushed above")
        };
        Bind { query }
    }

    /// Runs the queued statements, in order, inside `tx`; the script is empty after.
    pub async fn run(&mut self, tx: &mut Tx) -> Result<(), sqlx::Error> {
        for query in std::mem::take(&mut self.queries) {
            query.run(tx).await?;
        }
        Ok(())
    }

    /// Appends `COMMIT` to the last joined query (SQLite), so the transaction ends in the
    /// same trip as its last writes; returns whether it did.
    pub(super) fn append_commit(&mut self) -> bool {
        match self.queries.last_mut() {
            Some(q) if self.joined && q.open => {
                q.sql.push_str(";\nCOMMIT");
                q.statements += 1;
                true
            }
            _ => false,
        }
    }
}

impl Query {
    async fn run(self, tx: &mut Tx) -> Result<(), sqlx::Error> {
        if let Some(e) = self.error {
            return Err(sqlx::Error::Encode(e));
        }
        if self.args.len() != self.params {
            return Err(sqlx::Error::Protocol(format!(
                "a script bound {} values to {} placeholders",
                self.args.len(),
                self.params
            )));
        }
        sqlx::query_with(sqlx::AssertSqlSafe(self.sql), self.args)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// The numbers of a statement's `$N` placeholders, in text order.
fn numbers(sql: &str) -> impl Iterator<Item = Option<usize>> + '_ {
    sql.match_indices('$').map(move |(i, _)| {
        let digits = &sql[i + 1..];
        let end = digits
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(digits.len());
        digits[..end].parse().ok()
    })
}

/// How many values a statement takes (its highest `$N`).
fn placeholders(sql: &str) -> usize {
    numbers(sql).map(|n| n.unwrap_or(0)).max().unwrap_or(0)
}

/// The statement with its placeholders written `?`, when they are `$1, $2, …` in text
/// order, each once (and it has no `?` of its own).
fn anonymous(sql: &str) -> Option<String> {
    if sql.contains('?') {
        return None;
    }
    for (i, n) in numbers(sql).enumerate() {
        if n != Some(i + 1) {
            return None;
        }
    }
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        out.push('?');
        rest = rest[i + 1..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_in_order_become_anonymous() {
        assert_eq!(
            anonymous("UPDATE t SET a = $1, b = $2 WHERE id = $3").as_deref(),
            Some("UPDATE t SET a = ?, b = ? WHERE id = ?")
        );
        assert_eq!(
            anonymous("INSERT INTO t VALUES ($1, $2), ($3, $4)").as_deref(),
            Some("INSERT INTO t VALUES (?, ?), (?, ?)")
        );
        assert_eq!(anonymous("COMMIT").as_deref(), Some("COMMIT"));
        assert_eq!(placeholders("INSERT INTO t VALUES ($1, $2), ($3, $4)"), 4);
        assert_eq!(placeholders("COMMIT"), 0);
    }

    #[test]
    fn other_placeholders_stay_as_written() {
        // Out of order, used twice, skipped, or already anonymous.
        for sql in [
            "UPDATE t SET a = $2 WHERE id = $1",
            "UPDATE t SET a = $1 WHERE b = $1",
            "UPDATE t SET a = $1 WHERE b = $3",
            "UPDATE t SET a = ? WHERE b = $1",
        ] {
            assert_eq!(anonymous(sql), None, "{sql}");
        }
        assert_eq!(placeholders("UPDATE t SET a = $1 WHERE b = $3"), 3);
    }

    #[test]
    fn sqlite_joins_what_it_can_postgres_nothing() {
        let mut s = Script::new(Backend::Sqlite);
        s.push("UPDATE a SET x = $1 WHERE id = $2")
            .bind(1_i64)
            .bind(2_i64);
        s.push("UPDATE b SET y = $1").bind("z");
        s.push("UPDATE c SET y = $1 WHERE z = $1").bind(3_i64);
        s.push("DELETE FROM d WHERE id = $1").bind(4_i64);
        let shape: Vec<(usize, usize, bool)> = s
            .queries
            .iter()
            .map(|q| (q.statements, q.params, q.open))
            .collect();
        assert_eq!(shape, [(2, 3, true), (1, 1, false), (1, 1, true)]);
        assert_eq!(
            s.queries[0].sql,
            "UPDATE a SET x = ? WHERE id = ?;\nUPDATE b SET y = ?"
        );
        assert!(s.append_commit());
        assert!(s.queries[2].sql.ends_with(";\nCOMMIT"));

        let mut s = Script::new(Backend::Postgres);
        s.push("UPDATE a SET x = $1 WHERE id = $2")
            .bind(1_i64)
            .bind(2_i64);
        s.push("UPDATE b SET y = $1").bind("z");
        assert_eq!(s.queries.len(), 2);
        assert_eq!(s.queries[1].sql, "UPDATE b SET y = $1");
        assert!(!s.append_commit());
    }
}
