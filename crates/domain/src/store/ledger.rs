//! The ledger as stored: hash-chained records, each transaction's last one signed
//! (`ledger`), balances kept in step (`balances`) and the chain's head (`ledger_head`, one
//! row).
//!
//! Every write goes through [`Chain`] inside the transaction of the state change it pays
//! for: a verified task and its settlement commit together or not at all. Event ids are
//! deterministic (`settle:<task>:<node>`, `refund:<job>`, …) and unique in the table, so a
//! retried transaction cannot pay twice. On PostgreSQL the head row is locked for the rest
//! of the transaction, always after any task or job row (the lock order everywhere is
//! task → job → ledger head), so concurrent writers queue instead of forking the chain.

use std::collections::{BTreeMap, HashMap, HashSet};

use stardust_ledger::{Account, Amount, ApplyError, Event, Reason};
use stardust_proto::identity::NodeId;

use super::script::Script;
use super::sql::query;
use super::{
    Backend, Result, Store, StoreError, as_json_rows, corrupt, id_i64, json, json_list, padded,
    present_ids, present_sql, to_json, values,
};

/// One movement to write.
#[derive(Debug, Clone)]
pub(crate) struct Post {
    pub id: String,
    pub from: Account,
    pub to: Account,
    pub amount: Amount,
    pub reason: Reason,
}

/// The head of the chain, locked for the current transaction, the events posted through it
/// and their balance changes: all written by [`Store::close_chain`] (linked records, the
/// last one signed, in multi-row inserts; balances once per account), so a batch of
/// settlements costs a few statements and one signature.
#[derive(Debug)]
pub(crate) struct Chain {
    seq: u64,
    head: String,
    deltas: BTreeMap<Account, i128>,
    /// Stored balances read through this chain (nothing else writes them while it holds the
    /// head: every ledger writer takes the head first).
    stored: BTreeMap<Account, i128>,
    /// Events posted through this chain, in order, their `prev` not yet filled in: written
    /// by [`Store::close_chain`], which links them and signs the last.
    events: Vec<Event>,
    /// Their ids, and those of the ledger's records [`Store::chain_with`] was asked about
    /// and found.
    ids: HashSet<String>,
    /// Ids [`Store::chain_with`] was asked about and did not find (nothing else writes the
    /// ledger while the chain holds its head).
    absent: HashSet<String>,
    /// µSCU of verified compute to date (the contribution curve's `x`).
    pub compute_micro_scu: u64,
}

impl Chain {
    /// A chain as read: the head row (`seq`, `head`, `compute_micro_scu`), the stored
    /// balances asked for, and which of the ids asked about the ledger holds (`posted`).
    fn read(
        row: &super::sql::Row,
        stored: BTreeMap<Account, i128>,
        ids: &[&str],
        posted: HashSet<String>,
    ) -> Result<Self> {
        Ok(Self {
            seq: row.try_get::<i64>("seq")? as u64,
            head: row.try_get("head")?,
            deltas: BTreeMap::new(),
            stored,
            events: Vec::new(),
            absent: ids
                .iter()
                .filter(|id| !posted.contains(**id))
                .map(|id| (*id).to_owned())
                .collect(),
            ids: posted,
            compute_micro_scu: row.try_get::<i64>("compute_micro_scu")? as u64,
        })
    }
}

type Tx = super::db::Tx;

/// Ledger records per INSERT statement (4 parameters each).
const RECORDS_PER_INSERT: usize = super::rows_per_statement(4);

/// Balance changes per upsert statement (2 parameters each).
const BALANCES_PER_UPSERT: usize = super::rows_per_statement(2);

/// Accounts and ids up to which [`Store::chain_with`] reads them one simple statement each
/// on SQLite (a single task's settlement reads a few; a batch's, many: one statement then).
const SIMPLE_CHAIN_READS: usize = 8;

/// A stored ledger record.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    /// Position.
    pub seq: u64,
    /// The event id as stored in its own column (to name a record that no longer parses).
    pub id: String,
    /// The sealed bytes.
    pub record: Vec<u8>,
}

impl Store {
    /// Locks the chain head for the rest of `tx`.
    pub(crate) async fn chain(&self, tx: &mut Tx) -> Result<Chain> {
        self.chain_with(tx, &[], &[]).await
    }

    /// Locks the chain head for the rest of `tx` and reads, in the same statement, the
    /// stored balances of `accounts` and which of `ids` the ledger holds already: what the
    /// first posts through the chain would otherwise read one statement (one trip to the
    /// database) each. (On SQLite, where a statement is no trip, several simple ones for a
    /// few accounts and ids: [`Store::chain_with_simply`].)
    pub(crate) async fn chain_with(
        &self,
        tx: &mut Tx,
        accounts: &[Account],
        ids: &[&str],
    ) -> Result<Chain> {
        if self.backend == Backend::Sqlite && accounts.len() + ids.len() <= SIMPLE_CHAIN_READS {
            return self.chain_with_simply(tx, accounts, ids).await;
        }
        let lock = if self.backend == Backend::Postgres {
            " FOR UPDATE"
        } else {
            ""
        };
        let balances = as_json_rows(
            self.backend,
            &format!(
                "SELECT account, amount FROM balances WHERE account IN ({})",
                json_list(self.backend, 1, false)
            ),
            &["account", "amount"],
        );
        let posted = present_sql(self.backend, "ledger", 2);
        let keys: Vec<String> = accounts.iter().map(|a| a.key()).collect();
        let row = query(format!(
            "SELECT seq, head, compute_micro_scu, ({balances}) AS balances, ({posted}) AS posted
             FROM ledger_head WHERE one = 1{lock}"
        ))
        .bind(to_json(&keys))
        .bind(to_json(&ids))
        .fetch_one(tx)
        .await?;
        let found: HashMap<String, i64> =
            json::<Vec<(String, i64)>>("ledger balances", &row.try_get::<String>("balances")?)?
                .into_iter()
                .collect();
        // An account without a row holds nothing.
        let stored = accounts
            .iter()
            .zip(&keys)
            .map(|(a, k)| (*a, found.get(k).copied().map_or(0, i128::from)))
            .collect();
        let posted = present_ids("ledger ids", &row, "posted")?;
        Chain::read(&row, stored, ids, posted)
    }

    /// [`Store::chain_with`] on SQLite: a statement for the head, one for each account and
    /// one for each id, each a primary-key lookup of a microsecond or two in process, where
    /// the one statement that aggregates them as JSON (a single trip to a PostgreSQL
    /// server) cost SQLite 10-25 µs. The transaction holds SQLite's write lock already
    /// (`BEGIN IMMEDIATE`): nothing else moves the head meanwhile.
    async fn chain_with_simply(
        &self,
        tx: &mut Tx,
        accounts: &[Account],
        ids: &[&str],
    ) -> Result<Chain> {
        let row = query("SELECT seq, head, compute_micro_scu FROM ledger_head WHERE one = 1")
            .fetch_one(tx)
            .await?;
        let mut stored = BTreeMap::new();
        for a in accounts {
            stored.insert(*a, Self::balance_in(tx, *a).await?);
        }
        let mut posted = HashSet::new();
        for id in ids {
            let found = query("SELECT 1 AS one FROM ledger WHERE id = $1")
                .bind(*id)
                .fetch_optional(tx)
                .await?
                .is_some();
            if found {
                posted.insert((*id).to_owned());
            }
        }
        Chain::read(&row, stored, ids, posted)
    }

    /// A balance as of `tx`.
    pub(crate) async fn balance_in(tx: &mut Tx, account: Account) -> Result<i128> {
        let row = query("SELECT amount FROM balances WHERE account = $1")
            .bind(account.key())
            .fetch_optional(tx)
            .await?;
        Ok(row
            .map(|r| r.try_get::<i64>("amount"))
            .transpose()?
            .map_or(0, i128::from))
    }

    /// A balance as of `tx`, with the movements posted through `chain` so far.
    pub(crate) async fn balance_now(
        tx: &mut Tx,
        chain: &mut Chain,
        account: Account,
    ) -> Result<i128> {
        let stored = match chain.stored.get(&account) {
            Some(b) => *b,
            None => {
                let b = Self::balance_in(tx, account).await?;
                chain.stored.insert(account, b);
                b
            }
        };
        Ok(stored + chain.deltas.get(&account).copied().unwrap_or(0))
    }

    /// Whether an event id is already in the ledger (or sealed through `chain`).
    pub(crate) async fn posted(tx: &mut Tx, chain: &Chain, id: &str) -> Result<bool> {
        if chain.ids.contains(id) {
            return Ok(true);
        }
        if chain.absent.contains(id) {
            return Ok(false);
        }
        Ok(query("SELECT 1 AS one FROM ledger WHERE id = $1")
            .bind(id)
            .fetch_optional(tx)
            .await?
            .is_some())
    }

    /// Seals and appends one movement, checked against the stored balance with the
    /// ledger's own rules. A refused movement changes nothing and is returned as `Err`.
    /// `fresh`: the caller knows the id is new (a task's settlement, decided once under the
    /// task's lock), so only this chain's own records are checked, not the table (whose
    /// unique index still refuses a duplicate).
    pub(crate) async fn post(
        &self,
        tx: &mut Tx,
        chain: &mut Chain,
        post: Post,
        now: i64,
        fresh: bool,
    ) -> Result<std::result::Result<(), ApplyError>> {
        if self.signer.is_none() {
            return Err(StoreError::NoSigner);
        }
        let known = if fresh {
            chain.ids.contains(&post.id)
        } else {
            Self::posted(tx, chain, &post.id).await?
        };
        if known {
            return Ok(Err(ApplyError::Duplicate { id: post.id }));
        }
        let event = Event {
            id: post.id,
            seq: chain.seq,
            // Filled in when the chain is closed.
            prev: String::new(),
            at_ms: now.max(0) as u64,
            from: post.from,
            to: post.to,
            amount: post.amount,
            reason: post.reason,
        };
        let from_balance = Self::balance_now(tx, chain, event.from).await?;
        if let Err(e) = stardust_ledger::check(&event, from_balance) {
            return Ok(Err(e));
        }
        let amount = i128::from(event.amount);
        *chain.deltas.entry(event.from).or_default() -= amount;
        *chain.deltas.entry(event.to).or_default() += amount;
        chain.seq += 1;
        chain.ids.insert(event.id.clone());
        chain.events.push(event);
        Ok(Ok(()))
    }

    /// Posts a movement that the caller has already made valid (amounts clamped to
    /// balances); a refusal here is a bug, reported as corrupt state, and a duplicate id is
    /// skipped. Zero amounts are skipped. `fresh` as for [`Store::post`].
    pub(crate) async fn post_valid(
        &self,
        tx: &mut Tx,
        chain: &mut Chain,
        post: Post,
        now: i64,
        fresh: bool,
    ) -> Result<()> {
        if post.amount == 0 {
            return Ok(());
        }
        match self.post(tx, chain, post, now, fresh).await? {
            Ok(()) | Err(ApplyError::Duplicate { .. }) => Ok(()),
            Err(e) => Err(corrupt("ledger movement", e)),
        }
    }

    /// Links the posted events into records, the last one signed (it vouches for the
    /// others: one signature per transaction, not per movement), and writes them
    /// (multi-row inserts), the balance changes (one upsert per account touched) and the head
    /// back; call once before committing `tx`.
    pub(crate) async fn close_chain(&self, tx: &mut Tx, chain: Chain) -> Result<()> {
        let mut script = Script::default();
        self.write_chain(&mut script, chain)?;
        script.run(tx).await?;
        Ok(())
    }

    /// [`Store::close_chain`]'s writes, queued on `script`: nothing may read the ledger, the
    /// balances or the head in the transaction before the script runs.
    pub(crate) fn write_chain(&self, script: &mut Script, mut chain: Chain) -> Result<()> {
        let signer = self.signer.as_ref().ok_or(StoreError::NoSigner)?;
        let last = chain.events.len().saturating_sub(1);
        let mut records = Vec::with_capacity(chain.events.len());
        for (i, event) in chain.events.iter_mut().enumerate() {
            event.prev = std::mem::take(&mut chain.head);
            let record = if i == last {
                stardust_ledger::seal(signer, event)
            } else {
                stardust_ledger::linked(event)
            };
            chain.head = stardust_ledger::link(&record);
            records.push(record);
        }
        for (events, records) in chain
            .events
            .chunks(RECORDS_PER_INSERT)
            .zip(records.chunks(RECORDS_PER_INSERT))
        {
            // Padded with rows of NULLs, left out by the `WHERE` (see `padded`).
            let n = padded(events.len(), RECORDS_PER_INSERT);
            let mut q = script.push(&format!(
                "WITH v (seq, id, record, at_ms) AS (VALUES {})
                 INSERT INTO ledger (seq, id, record, at_ms)
                 SELECT seq, id, record, at_ms FROM v WHERE id IS NOT NULL",
                values(n, 4)
            ));
            for (event, record) in events.iter().zip(records) {
                q = q
                    .bind(Some(id_i64(event.seq)))
                    .bind(Some(event.id.as_str()))
                    .bind(Some(record.as_slice()))
                    .bind(Some(event.at_ms as i64));
            }
            for _ in events.len()..n {
                q = q
                    .bind(None::<i64>)
                    .bind(None::<&str>)
                    .bind(None::<&[u8]>)
                    .bind(None::<i64>);
            }
        }
        // Each account once, in account order (PostgreSQL locks the rows in that order).
        let mut changes = Vec::with_capacity(chain.deltas.len());
        for (account, delta) in &chain.deltas {
            if *delta != 0 {
                let delta = i64::try_from(*delta).map_err(|_| corrupt("balance change", delta))?;
                changes.push((account.key(), delta));
            }
        }
        for rows in changes.chunks(BALANCES_PER_UPSERT) {
            let mut q = script.push(&format!(
                "INSERT INTO balances (account, amount) VALUES {}
                 ON CONFLICT (account) DO UPDATE SET amount = balances.amount + excluded.amount",
                values(rows.len(), 2)
            ));
            for (account, delta) in rows {
                q = q.bind(account.as_str()).bind(*delta);
            }
        }
        script
            .push(
                "UPDATE ledger_head SET seq = $1, head = $2, compute_micro_scu = $3 WHERE one = 1",
            )
            .bind(id_i64(chain.seq))
            .bind(chain.head.as_str())
            .bind(id_i64(chain.compute_micro_scu));
        Ok(())
    }

    /// Mints `amount` to `to` (an operator's grant, `stardust ledger grant`). Each grant
    /// gets the next free id `grant:<n>`.
    pub async fn grant(&self, to: Account, amount: Amount, now: i64) -> Result<u64> {
        if amount == 0 || amount > i64::MAX as u64 {
            return Err(corrupt("grant", "amount must be in 1..2^63 micro-credits"));
        }
        let mut tx = self.db.begin().await?;
        let mut chain = self.chain(&mut tx).await?;
        let seq = chain.seq;
        let reason = if matches!(to, Account::Stake(_)) {
            Reason::Stake
        } else {
            Reason::Grant
        };
        let post = Post {
            id: format!("grant:{seq}"),
            from: Account::Mint,
            to,
            amount,
            reason,
        };
        self.post_valid(&mut tx, &mut chain, post, now, false)
            .await?;
        self.close_chain(&mut tx, chain).await?;
        tx.commit().await?;
        Ok(seq)
    }

    /// Every ledger record, in chain order, from `from_seq`, at most `limit`.
    pub async fn ledger_records(&self, from_seq: u64, limit: u32) -> Result<Vec<StoredRecord>> {
        let rows =
            query("SELECT seq, id, record FROM ledger WHERE seq >= $1 ORDER BY seq LIMIT +$2")
                .bind(id_i64(from_seq))
                .bind(i64::from(limit))
                .fetch_all(&mut self.db.acquire().await?)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredRecord {
                    seq: r.try_get::<i64>("seq")? as u64,
                    id: r.try_get("id")?,
                    record: r.try_get("record")?,
                })
            })
            .collect()
    }

    /// One balance.
    pub async fn balance(&self, account: Account) -> Result<i128> {
        let mut tx = self.db.begin().await?;
        let b = Self::balance_in(&mut tx, account).await?;
        tx.commit().await?;
        Ok(b)
    }

    /// Every stored balance, by account name.
    pub async fn balances(&self) -> Result<Vec<(Account, i128)>> {
        let rows = query("SELECT account, amount FROM balances ORDER BY account")
            .fetch_all(&mut self.db.acquire().await?)
            .await?;
        rows.iter()
            .map(|r| {
                let name: String = r.try_get("account")?;
                let account = name.parse().map_err(|e| corrupt("balance account", e))?;
                Ok((account, i128::from(r.try_get::<i64>("amount")?)))
            })
            .collect()
    }

    /// The stake balances of `nodes`.
    /// One statement, however many nodes (the dispatcher asks for every connected node's
    /// before a round; one transaction per node cost as many writer turns).
    pub async fn stakes(&self, nodes: &[NodeId]) -> Result<Vec<(NodeId, i128)>> {
        let keys: Vec<String> = nodes.iter().map(|n| Account::Stake(*n).key()).collect();
        let rows = query(format!(
            "SELECT account, amount FROM balances WHERE account IN ({})",
            json_list(self.backend, 1, false)
        ))
        .bind(to_json(&keys))
        .fetch_all(&mut self.db.acquire().await?)
        .await?;
        let mut held: HashMap<String, i128> = HashMap::with_capacity(rows.len());
        for r in &rows {
            held.insert(
                r.try_get("account")?,
                i128::from(r.try_get::<i64>("amount")?),
            );
        }
        Ok(nodes
            .iter()
            .zip(&keys)
            .map(|(n, k)| (*n, held.get(k).copied().unwrap_or(0)))
            .collect())
    }

    /// Events in the ledger and verified compute to date (µSCU).
    pub async fn ledger_head(&self) -> Result<(u64, u64)> {
        let mut tx = self.db.begin().await?;
        let chain = self.chain(&mut tx).await?;
        tx.rollback().await?;
        Ok((chain.seq, chain.compute_micro_scu))
    }
}
