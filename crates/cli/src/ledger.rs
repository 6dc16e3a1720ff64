//! `stardust ledger verify|balances|grant`: the domain's credit ledger, read straight from
//! its database (the domain may be running).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::{Value, json};
use stardust_domain::store::Store;
use stardust_ledger::{Account, Reason, VerifyError};
use stardust_proto::identity::NodeId;

use crate::units::credits;

/// Where the ledger is.
#[derive(Debug, clap::Args)]
pub struct Location {
    /// The domain's data directory (its key, and the SQLite database unless --database).
    #[arg(long, env = "STARDUST_DATA", default_value = ".stardust/domain")]
    data: PathBuf,
    /// PostgreSQL URL of the domain's database.
    #[arg(long, env = "STARDUST_DATABASE")]
    database: Option<String>,
    /// Print one JSON object as the last stdout line.
    #[arg(long)]
    json: bool,
}

impl Location {
    async fn open(&self) -> anyhow::Result<Store> {
        let store = match &self.database {
            Some(url) => Store::open(url).await?,
            None => {
                anyhow::ensure!(
                    self.data.join("stardust.db").exists(),
                    "no domain database in {} (pass --data DIR or --database URL)",
                    self.data.display()
                );
                Store::open_sqlite(&self.data).await?
            }
        };
        Ok(store)
    }

    fn key_path(&self) -> PathBuf {
        self.data.join("domain.key")
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Re-derive every balance from the signed log; check signatures, the hash chain,
    /// the invariants and the stored balances. Exits 0 only when all holds.
    Verify(Location),
    /// Every non-zero balance.
    Balances(Location),
    /// Mint credits to a key (an operator's grant), recorded as a signed event.
    Grant {
        /// The receiving key (hex, as `stardust keys show` prints it).
        key: NodeId,
        /// Credits, e.g. 100 or 0.5.
        #[arg(value_parser = crate::units::parse_credits)]
        amount: u64,
        /// Which of the key's accounts: submitter (to pay for jobs), operator, or stake
        /// (a node's stake).
        #[arg(long, value_enum, default_value_t = To::Submitter)]
        to: To,
        #[command(flatten)]
        at: Location,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum To {
    Submitter,
    Operator,
    Stake,
}

pub fn main(cmd: Command) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cmd {
            Command::Verify(at) => verify(&at).await,
            Command::Balances(at) => balances(&at).await,
            Command::Grant {
                key,
                amount,
                to,
                at,
            } => grant(&at, key, amount, to).await,
        }
    })
}

fn domain_id(at: &Location) -> anyhow::Result<NodeId> {
    let path = at.key_path();
    let key = stardust_keystore::read(&path).with_context(|| {
        format!(
            "the domain key {} is needed to check signatures",
            path.display()
        )
    })?;
    Ok(key.id())
}

/// The JSON of a verification error, naming the record by its stored id.
async fn named(
    store: &Store,
    e: &VerifyError,
    failed: &impl Fn(u64, Option<String>, String) -> Value,
) -> anyhow::Result<Value> {
    let index = match e {
        VerifyError::Record { index, .. }
        | VerifyError::WrongSigner { index, .. }
        | VerifyError::Chain { index, .. }
        | VerifyError::Apply { index, .. }
        | VerifyError::Invariant { index, .. }
        | VerifyError::Unsigned { index } => *index,
        _ => 0,
    };
    let id = store
        .ledger_records(index, 1)
        .await?
        .into_iter()
        .find(|r| r.seq == index)
        .map(|r| r.id);
    Ok(failed(index, id, e.to_string()))
}

/// What `verify` found, as JSON.
async fn check(at: &Location) -> anyhow::Result<Value> {
    let domain = domain_id(at)?;
    let store = at.open().await?;
    audit(&store, domain).await
}

/// Re-derives the ledger of `store` from its records, signed by `domain`: a JSON summary
/// with `ok` and, when it fails, `error` {`seq`, `id`, `message`}; `balances` maps each
/// account to its re-derived balance.
pub async fn audit(store: &Store, domain: NodeId) -> anyhow::Result<Value> {
    // A page at a time: memory for the balances, not for the whole log.
    let (events, _) = store.ledger_head().await?;
    let failed = |seq: u64, id: Option<String>, message: String| {
        json!({
            "ok": false,
            "events": events,
            "error": { "seq": seq, "id": id, "message": message },
        })
    };
    let mut replay = stardust_ledger::Replay::new(domain);
    let mut tasks_paid = std::collections::BTreeSet::new();
    let mut slashes = 0u64;
    let mut head = None;
    let mut from = 0u64;
    loop {
        let page = store.ledger_records(from, 10_000).await?;
        let Some(last) = page.last() else { break };
        from = last.seq + 1;
        head = Some(stardust_ledger::link(&last.record));
        for r in &page {
            // Rows out of sequence (a deleted or inserted row) break the chain too.
            let expected = replay.len();
            if r.seq != expected {
                return Ok(failed(
                    expected,
                    Some(r.id.clone()),
                    format!(
                        "event {} is stored at position {}, expected {expected}",
                        r.id, r.seq
                    ),
                ));
            }
            if let Err(e) = replay.push(&r.record) {
                return named(store, &e, &failed).await;
            }
            if let Ok((e, _)) = stardust_ledger::open(&r.record) {
                match e.reason {
                    Reason::Settle { task } => {
                        tasks_paid.insert(task);
                    }
                    Reason::Slash { .. } => slashes += 1,
                    _ => {}
                }
            }
        }
    }
    let ledger = match replay.finish() {
        Ok(l) => l,
        Err(e) => return named(store, &e, &failed).await,
    };
    // The stored balances must match the log.
    let stored = store.balances().await?;
    for (account, balance) in &stored {
        if ledger.balance(*account) != *balance {
            return Ok(json!({
                "ok": false,
                "events": events,
                "error": { "seq": null, "id": null, "message": format!(
                    "stored balance of {} is {}, the log gives {}",
                    account.key(), balance, ledger.balance(*account)
                )},
            }));
        }
    }
    let derived = ledger.balances().count();
    let stored_nonzero = stored.iter().filter(|(_, b)| *b != 0).count();
    if derived != stored_nonzero {
        return Ok(json!({
            "ok": false,
            "events": events,
            "error": { "seq": null, "id": null, "message": "stored balances are missing accounts the log has" },
        }));
    }
    let balances: serde_json::Map<String, Value> = ledger
        .balances()
        .map(|(a, b)| (a.key(), json!(b)))
        .collect();
    let sum = |f: &dyn Fn(&Account) -> bool| -> i128 {
        ledger
            .balances()
            .filter(|(a, _)| f(a))
            .map(|(_, b)| b)
            .sum()
    };
    Ok(json!({
        "ok": true,
        "events": events,
        "head": head,
        "minted": ledger.minted() as i128,
        "accounts": derived,
        "escrow_held": sum(&|a| matches!(a, Account::Escrow(_))),
        "treasury": ledger.balance(Account::Treasury),
        "operators": sum(&|a| matches!(a, Account::Operator(_))),
        "stake": sum(&|a| matches!(a, Account::Stake(_))),
        "tasks_paid": tasks_paid.len(),
        "slashes": slashes,
        "balances": balances,
    }))
}

async fn verify(at: &Location) -> anyhow::Result<ExitCode> {
    let v = check(at).await?;
    if at.json {
        println!("{v}");
    } else if v["ok"] == true {
        println!(
            "ledger OK: {} events, every signature and link checked; {} credits minted, {} tasks paid, {} slashes; treasury {}, in escrow {}",
            v["events"],
            credits(v["minted"].as_i64().unwrap_or(0).into()),
            v["tasks_paid"],
            v["slashes"],
            credits(v["treasury"].as_i64().unwrap_or(0).into()),
            credits(v["escrow_held"].as_i64().unwrap_or(0).into()),
        );
    } else {
        let e = &v["error"];
        let what = match (e["seq"].as_u64(), e["id"].as_str()) {
            (Some(seq), Some(id)) => format!("event #{seq} ({id}): "),
            (Some(seq), None) => format!("event #{seq}: "),
            _ => String::new(),
        };
        eprintln!(
            "ledger verification FAILED: {what}{}",
            e["message"].as_str().unwrap_or("")
        );
    }
    Ok(if v["ok"] == true {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn balances(at: &Location) -> anyhow::Result<ExitCode> {
    let store = at.open().await?;
    let list: Vec<(Account, i128)> = store
        .balances()
        .await?
        .into_iter()
        .filter(|(_, b)| *b != 0)
        .collect();
    if at.json {
        let map: serde_json::Map<String, Value> =
            list.iter().map(|(a, b)| (a.key(), json!(b))).collect();
        println!("{}", json!({ "balances": map }));
    } else {
        for (a, b) in &list {
            println!("{:<28} {:>18}", a.to_string(), credits(*b));
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn grant(at: &Location, key: NodeId, amount: u64, to: To) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(amount > 0, "the amount must be positive");
    let path = at.key_path();
    let domain = stardust_keystore::read(&path)
        .with_context(|| format!("granting needs the domain key {}", path.display()))?;
    let store = at.open().await?.with_ledger(domain, Default::default());
    let account = match to {
        To::Submitter => Account::Submitter(key),
        To::Operator => Account::Operator(key),
        To::Stake => Account::Stake(key),
    };
    let seq = store
        .grant(account, amount, stardust_domain::now_ms())
        .await?;
    let balance = store.balance(account).await?;
    if at.json {
        println!(
            "{}",
            json!({ "event": seq, "account": account.key(), "amount": amount, "balance": balance })
        );
    } else {
        println!(
            "granted {} credits to {} (event #{seq}); balance {}",
            credits(amount.into()),
            account.key(),
            credits(balance)
        );
    }
    Ok(ExitCode::SUCCESS)
}
