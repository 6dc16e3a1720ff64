//! The Stardust credit ledger, as pure rules: no I/O. The domain persists the events; anyone
//! holding them and the domain's public key can re-derive every balance and check every
//! signature and link ([`verify`]).
//!
//! ```text
//!  Event (JSON) ──seal with the domain key, context stardust/v1/ledger──▶ signed Record
//!  Event (JSON) ──as is─────────────────────────────────────────────────▶ linked Record
//!  Record n carries blake3(Record n-1 bytes) as `prev`: a tamper-evident chain, so a
//!  signed record vouches for every record before it. A writer signs the last record of
//!  each batch it appends (one signature per batch, not per movement); a chain ends signed.
//! ```
//!
//! - Double entry: every event moves an amount from one [`Account`] to another; credits
//!   enter through the [`Account::Mint`] account and leave through [`Account::Burn`], which
//!   alone may go negative. So `Σ balances (excluding mint and burn) = minted − burned` holds
//!   by construction, and [`Ledger::check_invariants`] checks it anyway.
//! - Amounts are integer micro-credits ([`Amount`]); never floats.
//! - Every event has an id, so applying a copy twice is detected (groundwork for merging
//!   ledgers between domains).
//! - [`split`]: the settlement split of a verified task's price (80 % providers, 15 %
//!   treasury, 5 % module author), exact to the micro-credit.
//! - [`curve`]: the minted contribution bonus R(x) = 1 + 9·e^(−x/D) and the uptime reward.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod curve;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use stardust_proto::envelope::{self, Context};
use stardust_proto::identity::{Identity, NodeId};
use stardust_proto::task::JobId;

/// Micro-credits (1 credit = 1,000,000).
pub type Amount = u64;

/// Micro-credits in one credit.
pub const MICRO_PER_CREDIT: Amount = 1_000_000;

/// An account. Serialized as a tagged JSON object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum Account {
    /// Where minted credits come from (its balance is minus the total minted).
    Mint,
    /// Where burned credits go.
    Burn,
    /// The domain's treasury.
    Treasury,
    /// A provider node's operator.
    Operator(NodeId),
    /// A job submitter.
    Submitter(NodeId),
    /// A module author (the key that uploaded the module).
    Author(NodeId),
    /// The escrow of one job.
    Escrow(JobId),
    /// Stake a node holds to take tasks.
    Stake(NodeId),
}

impl Account {
    /// Whether the account may have a negative balance (only the mint).
    pub fn may_go_negative(self) -> bool {
        matches!(self, Account::Mint)
    }

    /// The account's full, unique name: `mint`, `burn`, `treasury`, `operator:<key hex>`,
    /// `submitter:<key hex>`, `author:<key hex>`, `escrow:<job>`, `stake:<key hex>`. It
    /// parses back with [`str::parse`].
    pub fn key(&self) -> String {
        match self {
            Account::Mint => "mint".into(),
            Account::Burn => "burn".into(),
            Account::Treasury => "treasury".into(),
            Account::Operator(id) => format!("operator:{id}"),
            Account::Submitter(id) => format!("submitter:{id}"),
            Account::Author(id) => format!("author:{id}"),
            Account::Escrow(job) => format!("escrow:{job}"),
            Account::Stake(id) => format!("stake:{id}"),
        }
    }
}

/// A string that names no account.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not an account name: {0:?} (expected mint, burn, treasury, escrow:<job> or operator|submitter|author|stake:<key>)"
)]
pub struct ParseAccountError(String);

impl std::str::FromStr for Account {
    type Err = ParseAccountError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseAccountError(s.chars().take(80).collect());
        let node = |v: &str| v.parse::<NodeId>().map_err(|_| bad());
        Ok(match s.split_once(':') {
            None => match s {
                "mint" => Account::Mint,
                "burn" => Account::Burn,
                "treasury" => Account::Treasury,
                _ => return Err(bad()),
            },
            Some(("operator", v)) => Account::Operator(node(v)?),
            Some(("submitter", v)) => Account::Submitter(node(v)?),
            Some(("author", v)) => Account::Author(node(v)?),
            Some(("stake", v)) => Account::Stake(node(v)?),
            Some(("escrow", v)) => Account::Escrow(v.parse().map_err(|_| bad())?),
            Some(_) => return Err(bad()),
        })
    }
}

/// Why credits moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Reason {
    /// Operator grant (`stardust ledger grant`).
    Grant,
    /// Welcome grant to a new submitter key.
    Welcome,
    /// A job's maximum price held at submission.
    Escrow {
        /// The job.
        job: JobId,
    },
    /// Payment for one verified task.
    Settle {
        /// The task.
        task: u64,
    },
    /// Unused escrow returned when a job ends.
    Refund {
        /// The job.
        job: JobId,
    },
    /// Contribution bonus for one verified task (minted).
    Bonus {
        /// The task.
        task: u64,
    },
    /// Uptime reward (minted).
    Uptime,
    /// A node's stake deposit.
    Stake,
    /// Stake lost for a wrong result or a failed spot check.
    Slash {
        /// The task.
        task: u64,
    },
}

/// One movement of credits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Unique id (the domain assigns them; merging copies is idempotent by id).
    pub id: String,
    /// Position in the chain, from 0.
    pub seq: u64,
    /// BLAKE3 of the previous record's bytes, hex; all zeros for the first.
    pub prev: String,
    /// Unix time in milliseconds (informational; the caller supplies it).
    pub at_ms: u64,
    /// Debited account.
    pub from: Account,
    /// Credited account.
    pub to: Account,
    /// Amount, micro-credits, positive.
    pub amount: Amount,
    /// Why.
    pub reason: Reason,
}

/// The link value of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Why an event cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// Zero amount.
    #[error("event {id}: amount must be positive")]
    ZeroAmount {
        /// The event.
        id: String,
    },
    /// Would make a balance negative.
    #[error("event {id}: {account:?} has {balance} µcredits, cannot pay {amount}")]
    Insufficient {
        /// The event.
        id: String,
        /// The account.
        account: Account,
        /// Its balance.
        balance: Amount,
        /// What was asked.
        amount: Amount,
    },
    /// The same id twice.
    #[error("event {id} was already applied")]
    Duplicate {
        /// The event.
        id: String,
    },
    /// A transfer to itself.
    #[error("event {id}: from and to are the same account")]
    SelfTransfer {
        /// The event.
        id: String,
    },
    /// Credits only leave the mint and only enter the burn account.
    #[error("event {id}: credits cannot flow into the mint or out of the burn account")]
    WrongWay {
        /// The event.
        id: String,
    },
    /// A second settlement of one task to one account.
    #[error("event {id}: task {task} was already paid to this account")]
    PaidTwice {
        /// The event.
        id: String,
        /// The task.
        task: u64,
    },
    /// Arithmetic overflow (amounts past 2^63).
    #[error("event {id}: amount overflows")]
    Overflow {
        /// The event.
        id: String,
    },
}

/// The rules one movement must follow, given the debited account's balance `from_balance`:
/// a positive amount below 2^63, two different accounts, credits only out of the mint and
/// only into the burn account, and no balance but the mint's below zero. [`Ledger::apply`]
/// and a domain writing events against stored balances share these rules.
pub fn check(e: &Event, from_balance: i128) -> Result<(), ApplyError> {
    if e.amount == 0 {
        return Err(ApplyError::ZeroAmount { id: e.id.clone() });
    }
    if e.from == e.to {
        return Err(ApplyError::SelfTransfer { id: e.id.clone() });
    }
    if e.to == Account::Mint || e.from == Account::Burn {
        return Err(ApplyError::WrongWay { id: e.id.clone() });
    }
    if e.amount > i64::MAX as u64 {
        return Err(ApplyError::Overflow { id: e.id.clone() });
    }
    if !e.from.may_go_negative() && from_balance < i128::from(e.amount) {
        return Err(ApplyError::Insufficient {
            id: e.id.clone(),
            account: e.from,
            balance: from_balance.max(0) as u64,
            amount: e.amount,
        });
    }
    Ok(())
}

/// Balances derived from events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    balances: BTreeMap<Account, i128>,
    applied: BTreeSet<String>,
    /// (task, credited account) of every settlement: a second payment is refused.
    paid: BTreeSet<(u64, Account)>,
    minted: u128,
    burned: u128,
    seq: u64,
    head: String,
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self {
            head: GENESIS.to_string(),
            ..Self::default()
        }
    }

    /// The balance of `account` (negative only for the mint).
    pub fn balance(&self, account: Account) -> i128 {
        self.balances.get(&account).copied().unwrap_or(0)
    }

    /// Every non-zero balance.
    pub fn balances(&self) -> impl Iterator<Item = (Account, i128)> + '_ {
        self.balances
            .iter()
            .filter(|(_, b)| **b != 0)
            .map(|(a, b)| (*a, *b))
    }

    /// Total minted so far.
    pub fn minted(&self) -> u128 {
        self.minted
    }

    /// Events applied.
    pub fn len(&self) -> u64 {
        self.seq
    }

    /// True before the first event.
    pub fn is_empty(&self) -> bool {
        self.seq == 0
    }

    /// Applies one event's movement (chain fields are checked by [`verify`]).
    pub fn apply(&mut self, e: &Event) -> Result<(), ApplyError> {
        if self.applied.contains(&e.id) {
            return Err(ApplyError::Duplicate { id: e.id.clone() });
        }
        check(e, self.balance(e.from))?;
        let amount = i128::from(e.amount);
        if let Reason::Settle { task } = e.reason
            && !self.paid.insert((task, e.to))
        {
            return Err(ApplyError::PaidTwice {
                id: e.id.clone(),
                task,
            });
        }
        *self.balances.entry(e.from).or_default() -= amount;
        *self.balances.entry(e.to).or_default() += amount;
        if e.from == Account::Mint {
            self.minted += u128::from(e.amount);
        }
        if e.to == Account::Burn {
            self.burned += u128::from(e.amount);
        }
        self.applied.insert(e.id.clone());
        self.seq += 1;
        Ok(())
    }

    /// Checks: no negative balance but the mint's; balances (mint and burn excluded) sum to
    /// minted − burned. Returns a description of the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut sum: i128 = 0;
        for (account, balance) in &self.balances {
            if *balance < 0 && !account.may_go_negative() {
                return Err(format!("{account:?} is negative: {balance}"));
            }
            if !matches!(account, Account::Mint | Account::Burn) {
                sum += balance;
            }
        }
        let expected = self.minted as i128 - self.burned as i128;
        if sum != expected {
            return Err(format!(
                "balances sum to {sum}, minted − burned is {expected}"
            ));
        }
        if self.balance(Account::Mint) != -(self.minted as i128) {
            return Err("the mint's balance is not minus the minted total".into());
        }
        Ok(())
    }
}

/// Seals `event` as a record signed by the domain: it vouches for itself and, through the
/// chain of `prev` links, for every record before it.
pub fn seal(domain: &Identity, event: &Event) -> Vec<u8> {
    envelope::seal(domain, Context::Ledger, &body(event))
}

/// Links `event` as a record that carries no signature of its own: the event's JSON bytes.
/// The next signed record vouches for it (its `prev` commits to these bytes), so a writer
/// signs only the last record of each batch it appends, and a chain must end in a signed
/// record ([`verify`]).
pub fn linked(event: &Event) -> Vec<u8> {
    body(event)
}

fn body(event: &Event) -> Vec<u8> {
    // Plain data: serialization cannot fail.
    serde_json::to_vec(event).unwrap_or_default()
}

/// Opens one record, signed ([`seal`]) or linked ([`linked`]): its event, and the key that
/// signed it (`None` for a linked record). Checks the signature, not the chain.
pub fn open(record: &[u8]) -> Result<(Event, Option<NodeId>), String> {
    let (body, signer) = if record.starts_with(&envelope::MAGIC) {
        let opened = envelope::open(record, Context::Ledger, envelope::DEFAULT_MAX_LEN)
            .map_err(|e| e.to_string())?;
        (opened.body, Some(opened.signer))
    } else if record.len() > envelope::DEFAULT_MAX_LEN {
        return Err(format!(
            "record of {} bytes exceeds the limit of {} bytes",
            record.len(),
            envelope::DEFAULT_MAX_LEN
        ));
    } else {
        (record, None)
    };
    let event = serde_json::from_slice(body).map_err(|e| format!("malformed event: {e}"))?;
    Ok((event, signer))
}

/// The link to a record: BLAKE3 of its bytes, hex.
pub fn link(record: &[u8]) -> String {
    blake3::hash(record).to_hex().to_string()
}

/// What [`verify`] found wrong, naming the record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The record is not a valid ledger envelope (bad signature, wrong context, …).
    #[error("record {index}: {reason}")]
    Record {
        /// Position of the record.
        index: u64,
        /// What is wrong.
        reason: String,
    },
    /// Signed by a key other than the domain's.
    #[error("record {index}: signed by {signer}, not by the domain")]
    WrongSigner {
        /// Position.
        index: u64,
        /// Who signed it.
        signer: NodeId,
    },
    /// `seq` or `prev` do not continue the chain.
    #[error("record {index} (event {id}): breaks the hash chain")]
    Chain {
        /// Position.
        index: u64,
        /// The event id.
        id: String,
    },
    /// The movement is not allowed.
    #[error("record {index}: {source}")]
    Apply {
        /// Position.
        index: u64,
        /// Why.
        source: ApplyError,
    },
    /// A global invariant failed after this record.
    #[error("record {index}: invariant violated: {reason}")]
    Invariant {
        /// Position.
        index: u64,
        /// What.
        reason: String,
    },
    /// The chain ends in a linked record: no signature vouches for the records after the
    /// last signed one.
    #[error("record {index}: the chain ends in a record no signature vouches for")]
    Unsigned {
        /// Position of the last record.
        index: u64,
    },
}

/// Verifies a chain of records written by `domain` from the first, re-deriving every
/// balance: each signed record must be signed by `domain`, each record must continue the
/// chain (`seq`, `prev`), and the last must be signed (it vouches for the linked records
/// before it). A broken link is blamed on the record whose bytes the next signature does not
/// vouch for, so a changed linked record is named, not its successor. [`Replay`] does the
/// same a record at a time.
pub fn verify<'a>(
    domain: NodeId,
    records: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Ledger, VerifyError> {
    let mut replay = Replay::new(domain);
    for record in records {
        replay.push(record)?;
    }
    replay.finish()
}

/// [`verify`], a record at a time: memory for the balances and, after a broken link, the
/// records up to the next signature (to tell which one changed), not for the whole chain.
#[derive(Debug)]
pub struct Replay {
    domain: NodeId,
    ledger: Ledger,
    /// Records pushed.
    pushed: u64,
    /// The last record and whether it was signed.
    last: Option<(Vec<u8>, bool)>,
    /// A link broke: the records from the one before the break, until a signature.
    broken: Option<Broken>,
    /// The error found; every later push answers it.
    failed: Option<VerifyError>,
}

#[derive(Debug)]
struct Broken {
    /// Index of `records[0]` (the record before the break).
    first: u64,
    /// Index of the record that did not link.
    at: u64,
    /// Its event id.
    id: String,
    records: Vec<Vec<u8>>,
}

impl Replay {
    /// An empty chain of `domain`'s.
    pub fn new(domain: NodeId) -> Self {
        Self {
            domain,
            ledger: Ledger::new(),
            pushed: 0,
            last: None,
            broken: None,
            failed: None,
        }
    }

    /// Records pushed so far.
    pub fn len(&self) -> u64 {
        self.pushed
    }

    /// True before the first record.
    pub fn is_empty(&self) -> bool {
        self.pushed == 0
    }

    /// The next record. `Err` once the chain is known to be wrong (a broken link is known
    /// at the next signed record, or at [`Replay::finish`]).
    pub fn push(&mut self, record: &[u8]) -> Result<(), VerifyError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let index = self.pushed;
        self.pushed += 1;
        let result = self.step(index, record);
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    fn step(&mut self, index: u64, record: &[u8]) -> Result<(), VerifyError> {
        if let Some(broken) = &mut self.broken {
            broken.records.push(record.to_vec());
            return match open(record) {
                Ok((_, Some(s))) if s == self.domain => Err(self.blame()),
                _ => Ok(()),
            };
        }
        let (event, signer) =
            open(record).map_err(|reason| VerifyError::Record { index, reason })?;
        if let Some(signer) = signer
            && signer != self.domain
        {
            return Err(VerifyError::WrongSigner { index, signer });
        }
        if event.seq != self.ledger.seq {
            return Err(VerifyError::Chain {
                index,
                id: event.id,
            });
        }
        if event.prev != self.ledger.head {
            let before = self.last.take().map(|(r, _)| r);
            self.broken = Some(Broken {
                first: index.saturating_sub(1),
                at: index,
                id: event.id,
                records: before.into_iter().chain([record.to_vec()]).collect(),
            });
            return match signer {
                Some(_) => Err(self.blame()),
                None => Ok(()),
            };
        }
        self.ledger
            .apply(&event)
            .map_err(|source| VerifyError::Apply { index, source })?;
        // The movement rules keep every invariant; checked on the accounts it touched (the
        // whole ledger is checked at the end).
        for account in [event.from, event.to] {
            let balance = self.ledger.balance(account);
            if balance < 0 && !account.may_go_negative() {
                return Err(VerifyError::Invariant {
                    index,
                    reason: format!("{account:?} is negative: {balance}"),
                });
            }
        }
        self.ledger.head = link(record);
        self.last = Some((record.to_vec(), signer.is_some()));
        Ok(())
    }

    /// The error of a broken link, once the records up to a signature (or the end) are in:
    /// walking back from the signature, each vouched-for `prev` must be the link of the
    /// record before; the first record that is not what its successor vouches for is the one
    /// changed. Without a signature, the record that did not link is named.
    fn blame(&self) -> VerifyError {
        let Some(b) = &self.broken else {
            return VerifyError::Invariant {
                index: self.pushed,
                reason: "no broken link to blame".into(),
            };
        };
        let named = |k: usize| VerifyError::Chain {
            index: b.first + k as u64,
            id: open(&b.records[k]).map_or_else(|_| String::new(), |(e, _)| e.id),
        };
        let at = VerifyError::Chain {
            index: b.at,
            id: b.id.clone(),
        };
        let Some(signed) = b.records.len().checked_sub(1) else {
            return at;
        };
        let Ok((mut vouched, Some(_))) = open(&b.records[signed]).map(|(e, s)| (e.prev, s)) else {
            return at;
        };
        // The walk starts at the record before the break (absent when the break is the
        // first record).
        let lowest = usize::from(b.first == b.at);
        for k in (lowest..signed).rev() {
            if link(&b.records[k]) != vouched {
                return if b.first + k as u64 == b.at {
                    at
                } else {
                    named(k)
                };
            }
            match open(&b.records[k]) {
                Ok((e, _)) => vouched = e.prev,
                Err(_) => return named(k),
            }
        }
        at
    }

    /// The re-derived ledger, or what is wrong: a broken link no signature followed, a chain
    /// that ends in a linked record, or an invariant.
    pub fn finish(self) -> Result<Ledger, VerifyError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if let Some(b) = &self.broken {
            return Err(VerifyError::Chain {
                index: b.at,
                id: b.id.clone(),
            });
        }
        if let Some((_, false)) = self.last {
            return Err(VerifyError::Unsigned {
                index: self.pushed - 1,
            });
        }
        self.ledger
            .check_invariants()
            .map_err(|reason| VerifyError::Invariant {
                index: self.pushed.saturating_sub(1),
                reason,
            })?;
        Ok(self.ledger)
    }
}

impl Ledger {
    /// The link the next event must carry as `prev`, and its `seq`.
    pub fn next(&self) -> (String, u64) {
        (self.head.clone(), self.seq)
    }

    /// Applies an event that was just sealed as `record` (the writer's path: keeps the head
    /// in step with [`verify`]).
    pub fn append(&mut self, event: &Event, record: &[u8]) -> Result<(), ApplyError> {
        self.apply(event)?;
        self.head = link(record);
        Ok(())
    }
}

/// How a verified task's price is divided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Each provider's share, in the order given.
    pub providers: Vec<Amount>,
    /// The treasury's share (15 %, plus rounding remainders).
    pub treasury: Amount,
    /// The module author's share (5 %).
    pub author: Amount,
}

/// Splits `price` among `providers` providers (80 %, equally), the treasury (15 %) and the
/// author (5 %). Integer arithmetic, rounding down; every remainder goes to the treasury, so
/// the parts always add up to `price` exactly.
pub fn split(price: Amount, providers: usize) -> Split {
    let author = price / 20;
    let pool = price / 10 * 8 + (price % 10) * 8 / 10;
    let each = if providers == 0 {
        0
    } else {
        pool / providers as u64
    };
    let paid = each * providers as u64;
    Split {
        providers: vec![each; providers],
        treasury: price - author - paid,
        author,
    }
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Account::Mint => f.write_str("mint"),
            Account::Burn => f.write_str("burn"),
            Account::Treasury => f.write_str("treasury"),
            Account::Operator(id) => write!(f, "operator:{}", id.short()),
            Account::Submitter(id) => write!(f, "submitter:{}", id.short()),
            Account::Author(id) => write!(f, "author:{}", id.short()),
            Account::Escrow(job) => write!(f, "escrow:{job}"),
            Account::Stake(id) => write!(f, "stake:{}", id.short()),
        }
    }
}

#[cfg(test)]
mod tests;
