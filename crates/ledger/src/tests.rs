use proptest::prelude::*;

use super::*;

fn domain() -> Identity {
    Identity::from_secret_bytes(&[42; 32])
}

fn node(i: u8) -> NodeId {
    Identity::from_secret_bytes(&[i; 32]).id()
}

/// Writes events the way the domain does: chain fields filled in, linked, appended; the
/// last record of each "transaction" signed ([`Writer::seal_last`]).
struct Writer {
    ledger: Ledger,
    records: Vec<Vec<u8>>,
    events: Vec<Event>,
    key: Identity,
}

impl Writer {
    fn new() -> Self {
        Self {
            ledger: Ledger::new(),
            records: Vec::new(),
            events: Vec::new(),
            key: domain(),
        }
    }

    fn post(
        &mut self,
        from: Account,
        to: Account,
        amount: Amount,
        reason: Reason,
    ) -> Result<(), ApplyError> {
        let (prev, seq) = self.ledger.next();
        let event = Event {
            id: format!("e{seq}"),
            seq,
            prev,
            at_ms: 1_000 + seq,
            from,
            to,
            amount,
            reason,
        };
        let record = linked(&event);
        self.ledger.append(&event, &record)?;
        self.records.push(record);
        self.events.push(event);
        Ok(())
    }

    /// Signs the last record (nothing links to it yet), as a writer does when it commits.
    fn seal_last(&mut self) {
        if let (Some(event), Some(record)) = (self.events.last(), self.records.last_mut()) {
            *record = seal(&self.key, event);
            self.ledger.head = link(record);
        }
    }

    fn truncate(&mut self, len: usize) {
        self.records.truncate(len);
        self.events.truncate(len);
    }
}

fn sample() -> Writer {
    let mut w = Writer::new();
    let alice = Account::Submitter(node(1));
    w.post(Account::Mint, alice, 10 * MICRO_PER_CREDIT, Reason::Welcome)
        .expect("mint");
    w.post(
        alice,
        Account::Escrow(7),
        4 * MICRO_PER_CREDIT,
        Reason::Escrow { job: 7 },
    )
    .expect("escrow");
    w.seal_last();
    let s = split(1_000_000, 2);
    w.post(
        Account::Escrow(7),
        Account::Operator(node(2)),
        s.providers[0],
        Reason::Settle { task: 1 },
    )
    .expect("pay");
    w.post(
        Account::Escrow(7),
        Account::Operator(node(3)),
        s.providers[1],
        Reason::Settle { task: 1 },
    )
    .expect("pay");
    w.post(
        Account::Escrow(7),
        Account::Treasury,
        s.treasury,
        Reason::Settle { task: 1 },
    )
    .expect("pay");
    w.post(
        Account::Escrow(7),
        Account::Author(node(4)),
        s.author,
        Reason::Settle { task: 1 },
    )
    .expect("pay");
    w.seal_last();
    w.post(
        Account::Escrow(7),
        alice,
        3 * MICRO_PER_CREDIT,
        Reason::Refund { job: 7 },
    )
    .expect("refund");
    w.seal_last();
    w
}

#[test]
fn verify_rederives_balances() {
    let w = sample();
    let ledger = verify(domain().id(), w.records.iter().map(Vec::as_slice)).expect("valid chain");
    assert_eq!(ledger, w.ledger);
    assert_eq!(ledger.balance(Account::Submitter(node(1))), 9_000_000);
    assert_eq!(ledger.balance(Account::Operator(node(2))), 400_000);
    assert_eq!(ledger.balance(Account::Treasury), 150_000);
    assert_eq!(ledger.balance(Account::Author(node(4))), 50_000);
    assert_eq!(ledger.balance(Account::Escrow(7)), 0);
    assert_eq!(ledger.check_invariants(), Ok(()));
}

#[test]
fn changing_any_byte_of_a_record_is_caught_and_named() {
    let w = sample();
    for index in 0..w.records.len() {
        for pos in [
            0,
            10,
            w.records[index].len() / 2,
            w.records[index].len() - 1,
        ] {
            let mut records = w.records.clone();
            records[index][pos] ^= 0x01;
            let err =
                verify(domain().id(), records.iter().map(Vec::as_slice)).expect_err("tampered");
            let named = match &err {
                VerifyError::Record { index: i, .. }
                | VerifyError::WrongSigner { index: i, .. }
                | VerifyError::Chain { index: i, .. }
                | VerifyError::Apply { index: i, .. }
                | VerifyError::Invariant { index: i, .. }
                | VerifyError::Unsigned { index: i } => *i,
            };
            // A signed record is caught by its signature; a changed linked record, by the
            // next signature, which vouches for its old bytes.
            assert_eq!(named, index as u64, "byte {pos} of record {index}: {err}");
        }
    }
}

#[test]
fn removed_or_reordered_records_break_the_chain() {
    let w = sample();
    let mut removed = w.records.clone();
    removed.remove(2);
    assert!(matches!(
        verify(domain().id(), removed.iter().map(Vec::as_slice)),
        Err(VerifyError::Chain { index: 2, .. })
    ));
    let mut swapped = w.records.clone();
    swapped.swap(3, 4);
    assert!(matches!(
        verify(domain().id(), swapped.iter().map(Vec::as_slice)),
        Err(VerifyError::Chain { index: 3, .. })
    ));
    let other = Identity::from_secret_bytes(&[43; 32]).id();
    assert!(matches!(
        verify(other, w.records.iter().map(Vec::as_slice)),
        Err(VerifyError::WrongSigner { index: 1, .. })
    ));
}

#[test]
fn a_chain_must_end_in_a_signed_record() {
    let mut w = sample();
    let signed = w
        .records
        .iter()
        .filter(|r| r.starts_with(&envelope::MAGIC))
        .count();
    assert_eq!(
        signed, 3,
        "the sample signs the last record of each of its three batches"
    );
    w.post(Account::Mint, Account::Treasury, 5, Reason::Grant)
        .expect("grant");
    assert!(matches!(
        verify(domain().id(), w.records.iter().map(Vec::as_slice)),
        Err(VerifyError::Unsigned { index: 7 })
    ));
    // Cut after a linked record: what remains vouches for nothing after the last signature.
    assert!(matches!(
        verify(domain().id(), w.records[..3].iter().map(Vec::as_slice)),
        Err(VerifyError::Unsigned { index: 2 })
    ));
    // A linked record rewritten with every later link fixed up still fails at the next
    // signed record, whose signature covers the old link.
    let mut forged = w.records[..6].to_vec();
    let mut e: Event = serde_json::from_slice(&forged[2]).expect("linked record is JSON");
    e.amount -= 1;
    forged[2] = linked(&e);
    for i in 3..6 {
        let (mut next, signer) = open(&forged[i]).expect("opens");
        next.prev = link(&forged[i - 1]);
        forged[i] = match signer {
            Some(_) => seal(&Identity::from_secret_bytes(&[43; 32]), &next),
            None => linked(&next),
        };
    }
    assert!(matches!(
        verify(domain().id(), forged.iter().map(Vec::as_slice)),
        Err(VerifyError::WrongSigner { index: 5, .. })
    ));
    w.seal_last();
    let ledger = verify(domain().id(), w.records.iter().map(Vec::as_slice)).expect("sealed");
    assert_eq!(ledger.balance(Account::Treasury), 150_005);
}

#[test]
fn bad_movements_are_refused_and_change_nothing() {
    let mut w = sample();
    let before = w.ledger.clone();
    let bob = Account::Submitter(node(9));
    assert!(matches!(
        w.post(bob, Account::Treasury, 1, Reason::Grant),
        Err(ApplyError::Insufficient { .. })
    ));
    assert!(matches!(
        w.post(Account::Treasury, Account::Treasury, 1, Reason::Grant),
        Err(ApplyError::SelfTransfer { .. })
    ));
    assert!(matches!(
        w.post(Account::Mint, bob, 0, Reason::Grant),
        Err(ApplyError::ZeroAmount { .. })
    ));
    assert_eq!(w.ledger, before);
    let mut dup = w.ledger.clone();
    let (prev, seq) = dup.next();
    let e = Event {
        id: "e0".into(),
        seq,
        prev,
        at_ms: 0,
        from: Account::Mint,
        to: bob,
        amount: 1,
        reason: Reason::Grant,
    };
    assert!(matches!(dup.apply(&e), Err(ApplyError::Duplicate { .. })));
}

proptest! {
    #[test]
    fn split_is_exact(price in 0u64..1_000_000_000_000, providers in 1usize..10) {
        let s = split(price, providers);
        let total: u64 = s.providers.iter().sum::<u64>() + s.treasury + s.author;
        prop_assert_eq!(total, price);
        prop_assert_eq!(s.author, price / 20);
        // Providers get 80 % minus at most one micro-credit each of rounding.
        let pool = price * 8 / 10;
        let paid: u64 = s.providers.iter().sum();
        prop_assert!(paid <= pool && pool - paid < providers as u64 + 1);
        prop_assert!(s.providers.iter().all(|p| *p == s.providers[0]));
    }

    /// Random sequences of movements, valid or not: refused ones change nothing, and the
    /// invariants hold after every accepted one; the chain verifies at the end.
    #[test]
    fn invariants_hold_over_random_sequences(ops in proptest::collection::vec((0usize..6, 0usize..6, 0u64..5_000), 1..40)) {
        let accounts = [
            Account::Mint,
            Account::Treasury,
            Account::Submitter(node(1)),
            Account::Operator(node(2)),
            Account::Escrow(1),
            Account::Burn,
        ];
        let mut w = Writer::new();
        for (from, to, amount) in ops {
            let before = w.ledger.clone();
            match w.post(accounts[from], accounts[to], amount, Reason::Grant) {
                Ok(()) => prop_assert_eq!(w.ledger.check_invariants(), Ok(())),
                Err(_) => prop_assert_eq!(&w.ledger, &before),
            }
        }
        w.seal_last();
        let verified = verify(domain().id(), w.records.iter().map(Vec::as_slice)).expect("chain verifies");
        prop_assert_eq!(verified, w.ledger);
    }
}

#[test]
fn account_names_round_trip_and_bad_ones_are_refused() {
    for a in [
        Account::Mint,
        Account::Burn,
        Account::Treasury,
        Account::Operator(node(1)),
        Account::Submitter(node(2)),
        Account::Author(node(3)),
        Account::Escrow(77),
        Account::Stake(node(4)),
    ] {
        assert_eq!(a.key().parse::<Account>(), Ok(a));
    }
    for bad in [
        "",
        "mints",
        "escrow:x",
        "operator:abc",
        "vault:1",
        "operator",
    ] {
        assert!(bad.parse::<Account>().is_err(), "{bad}");
    }
}

#[test]
fn a_task_cannot_be_paid_twice_even_under_another_event_id() {
    let mut w = sample();
    let before = w.ledger.clone();
    assert!(matches!(
        w.post(
            Account::Submitter(node(1)),
            Account::Operator(node(2)),
            1,
            Reason::Settle { task: 1 },
        ),
        Err(ApplyError::PaidTwice { task: 1, .. })
    ));
    assert_eq!(w.ledger, before);
    // Another task to the same account is fine.
    w.post(
        Account::Submitter(node(1)),
        Account::Operator(node(2)),
        1,
        Reason::Settle { task: 2 },
    )
    .expect("another task");
}

proptest! {
    /// A writer that crashes at random points between the events of a settlement (losing
    /// the uncommitted ones, like a rolled-back transaction) and retries each task until
    /// it is settled: every task ends paid exactly once and the chain verifies.
    #[test]
    fn settlements_survive_crashes_and_retries(crashes in proptest::collection::vec(0usize..5, 1..30)) {
        let mut w = Writer::new();
        let alice = Account::Submitter(node(1));
        w.post(Account::Mint, alice, 1_000 * MICRO_PER_CREDIT, Reason::Grant).expect("grant");
        w.post(alice, Account::Escrow(1), 1_000 * MICRO_PER_CREDIT, Reason::Escrow { job: 1 }).expect("escrow");
        w.seal_last();
        for (task, crash_at) in crashes.iter().enumerate() {
            let task = task as u64;
            let s = split(1_000_003, 2);
            let batch = [
                (Account::Operator(node(2)), s.providers[0]),
                (Account::Operator(node(3)), s.providers[1]),
                (Account::Treasury, s.treasury),
                (Account::Author(node(4)), s.author),
            ];
            // Attempt 1: crash after `crash_at` events (a transaction that never committed).
            let committed = w.ledger.clone();
            let records = w.records.len();
            for (to, amount) in batch.iter().take(*crash_at) {
                w.post(Account::Escrow(1), *to, *amount, Reason::Settle { task }).expect("pay");
            }
            if *crash_at < batch.len() {
                w.ledger = committed;
                w.truncate(records);
                // Attempt 2 after the restart: all of it.
                for (to, amount) in batch {
                    w.post(Account::Escrow(1), to, amount, Reason::Settle { task }).expect("retry pays");
                }
            }
            w.seal_last();
            // A third, duplicate delivery is refused.
            let dup = w.post(Account::Escrow(1), Account::Treasury, 1, Reason::Settle { task });
            prop_assert!(
                matches!(dup, Err(ApplyError::PaidTwice { .. })),
                "duplicate settlement accepted"
            );
        }
        let verified = verify(domain().id(), w.records.iter().map(Vec::as_slice)).expect("chain verifies");
        let paid = verified.balance(Account::Operator(node(2)));
        prop_assert_eq!(paid, i128::from(split(1_000_003, 2).providers[0]) * crashes.len() as i128);
    }
}

#[test]
fn replay_a_record_at_a_time_is_verify_and_knows_a_break_at_the_next_signature() {
    let w = sample();
    let mut replay = Replay::new(domain().id());
    for r in &w.records {
        replay.push(r).expect("valid record");
    }
    assert_eq!(replay.len(), w.records.len() as u64);
    assert_eq!(replay.finish().expect("valid chain"), w.ledger);

    // Record 2 (linked) changed: its own push and the next linked one's pass (nothing tells
    // yet which changed), the signed record 5 names record 2, and so does every later call.
    let mut records = w.records.clone();
    let mut e: Event = serde_json::from_slice(&records[2]).expect("linked record is JSON");
    e.amount -= 1;
    records[2] = linked(&e);
    let mut replay = Replay::new(domain().id());
    for r in &records[..5] {
        replay.push(r).expect("not known yet");
    }
    let err = replay
        .push(&records[5])
        .expect_err("known at the signature");
    assert!(matches!(err, VerifyError::Chain { index: 2, .. }), "{err}");
    assert_eq!(replay.push(&records[6]).expect_err("stays failed"), err);
    assert_eq!(replay.finish().expect_err("failed"), err);

    // A break that no signature follows names the record that did not link.
    let mut replay = Replay::new(domain().id());
    for r in &records[..4] {
        replay.push(r).expect("not known yet");
    }
    assert!(matches!(
        replay.finish(),
        Err(VerifyError::Chain { index: 3, .. })
    ));
}
