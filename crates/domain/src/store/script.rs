//! Write statements queued to run together: [`Script`].
//!
//! A transaction's writes whose results nobody reads (row counts included) are queued as
//! they are decided and run at its end, in order: the decisions read first, then write.

use super::StoreError;
use super::db::Tx;
use super::sql::{self, Query};

/// Writes queued for one transaction; run in order by [`Script::run`] or
/// [`Tx::commit_with`].
#[derive(Default)]
pub(crate) struct Script {
    queries: Vec<Query<'static>>,
}

/// A statement being bound: [`Bind::bind`] its values in placeholder order.
pub(crate) struct Bind<'a> {
    query: &'a mut Query<'static>,
}

impl Bind<'_> {
    /// Binds the next value.
    pub fn bind(self, value: impl sql::Bind) -> Self {
        self.query.add(value);
        self
    }
}

impl Script {
    /// Queues a statement; bind its values on what this returns.
    pub fn push(&mut self, statement: &str) -> Bind<'_> {
        self.queries.push(sql::query(statement.to_owned()));
        let Some(query) = self.queries.last_mut() else {
            unreachable!("pushed above")
        };
        Bind { query }
    }

    /// Queues a statement already bound.
    pub fn queue(&mut self, query: Query<'static>) {
        self.queries.push(query);
    }

    /// Appends `other`'s statements, in order, after this one's.
    pub fn append(&mut self, mut other: Script) {
        self.queries.append(&mut other.queries);
    }

    /// Runs the queued statements, in order, inside `tx`; the script is empty after.
    pub async fn run(&mut self, tx: &mut Tx) -> Result<(), StoreError> {
        for query in std::mem::take(&mut self.queries) {
            query.execute(tx).await?;
        }
        Ok(())
    }
}
