//! Quorum over the replicas of one task.
//!
//! Execution is deterministic, so honest replicas agree bitwise on their fingerprint
//! (status, trap, exit code, fuel, output hash). A task with redundancy `R` is decided once at
//! least `R` results are in and one fingerprint holds a strict majority of the results so
//! far. Without one, replicas are added, as few as could give a majority, up to
//! `max_replicas`; past that the task fails (dead letter, reason "replicas disagree").
//!
//! Results that are not deterministic (`deadline_exceeded`) are not votes: the caller treats
//! them as failed attempts and leases the replica again.

use stardust_proto::identity::NodeId;

/// Replication settings of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Replicas wanted (1..=9).
    pub redundancy: u8,
    /// Most replicas ever run for the task, extra ones on disagreement included.
    pub max_replicas: u8,
}

/// What the results so far decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<F> {
    /// A strict majority agrees on `value`.
    Accepted {
        /// The agreed fingerprint.
        value: F,
        /// Nodes in the majority.
        agree: Vec<NodeId>,
        /// Nodes that returned something else: the losers.
        disagree: Vec<NodeId>,
    },
    /// Run this many more replicas before deciding.
    NeedMore(u8),
    /// No majority, and no more replicas allowed.
    Failed,
}

/// Decides a task from its results `(node, fingerprint)`, one per replica.
pub fn decide<F: Eq + Clone>(policy: Policy, results: &[(NodeId, F)]) -> Decision<F> {
    let n = results.len();
    let r = usize::from(policy.redundancy.max(1));
    if n < r {
        return Decision::NeedMore((r - n) as u8);
    }
    // The most common fingerprint; ties go to the one seen first.
    let mut top: Option<(&F, usize)> = None;
    for (_, f) in results {
        let count = results.iter().filter(|(_, g)| g == f).count();
        if top.is_none_or(|(_, c)| count > c) {
            top = Some((f, count));
        }
    }
    let Some((value, count)) = top else {
        return Decision::NeedMore(r as u8);
    };
    if count > n / 2 {
        let (agree, disagree): (Vec<_>, Vec<_>) = results.iter().partition(|(_, f)| f == value);
        return Decision::Accepted {
            value: value.clone(),
            agree: agree.into_iter().map(|(id, _)| *id).collect(),
            disagree: disagree.into_iter().map(|(id, _)| *id).collect(),
        };
    }
    let max = usize::from(policy.max_replicas);
    if n >= max {
        return Decision::Failed;
    }
    // Fewest extra replicas k with count + k > (n + k) / 2, i.e. k = n - 2·count + 1.
    let k = (n + 1 - 2 * count).min(max - n);
    Decision::NeedMore(k as u8)
}

#[cfg(test)]
mod tests {
    use stardust_proto::identity::Identity;

    use super::*;

    fn id(i: u8) -> NodeId {
        Identity::from_secret_bytes(&[i; 32]).id()
    }

    const P2: Policy = Policy {
        redundancy: 2,
        max_replicas: 4,
    };

    #[test]
    fn waits_for_redundancy() {
        assert_eq!(decide::<u8>(P2, &[]), Decision::NeedMore(2));
        assert_eq!(decide(P2, &[(id(1), 7)]), Decision::NeedMore(1));
    }

    #[test]
    fn agreement_is_accepted() {
        assert_eq!(
            decide(P2, &[(id(1), 7), (id(2), 7)]),
            Decision::Accepted {
                value: 7,
                agree: vec![id(1), id(2)],
                disagree: vec![]
            }
        );
    }

    #[test]
    fn disagreement_adds_replicas_then_fails() {
        assert_eq!(decide(P2, &[(id(1), 7), (id(2), 8)]), Decision::NeedMore(1));
        assert_eq!(
            decide(P2, &[(id(1), 7), (id(2), 8), (id(3), 7)]),
            Decision::Accepted {
                value: 7,
                agree: vec![id(1), id(3)],
                disagree: vec![id(2)]
            }
        );
        assert_eq!(
            decide(P2, &[(id(1), 7), (id(2), 8), (id(3), 9)]),
            Decision::NeedMore(1)
        );
        assert_eq!(
            decide(P2, &[(id(1), 7), (id(2), 8), (id(3), 9), (id(4), 10)]),
            Decision::Failed
        );
    }

    #[test]
    fn one_liar_among_three_is_the_loser() {
        let p = Policy {
            redundancy: 3,
            max_replicas: 5,
        };
        assert_eq!(
            decide(p, &[(id(1), 1), (id(9), 666), (id(2), 1)]),
            Decision::Accepted {
                value: 1,
                agree: vec![id(1), id(2)],
                disagree: vec![id(9)]
            }
        );
    }

    proptest::proptest! {
        /// Whatever the votes, an accepted value holds a strict majority, nothing is decided
        /// before `redundancy` results, and more replicas are never asked past the cap.
        #[test]
        fn decisions_are_sound(votes in proptest::collection::vec(0u8..3, 0..8), r in 1u8..4, extra in 0u8..4) {
            let policy = Policy { redundancy: r, max_replicas: r + extra };
            let results: Vec<_> = votes.iter().enumerate().map(|(i, v)| (id(i as u8), *v)).collect();
            match decide(policy, &results) {
                Decision::Accepted { value, agree, disagree } => {
                    proptest::prop_assert!(results.len() >= usize::from(r));
                    proptest::prop_assert!(agree.len() * 2 > results.len());
                    proptest::prop_assert_eq!(agree.len() + disagree.len(), results.len());
                    proptest::prop_assert_eq!(votes.iter().filter(|v| **v == value).count(), agree.len());
                }
                Decision::NeedMore(k) => {
                    proptest::prop_assert!(k >= 1);
                    proptest::prop_assert!(results.len() + usize::from(k) <= usize::from(r.max(policy.max_replicas)));
                }
                Decision::Failed => proptest::prop_assert!(results.len() >= usize::from(policy.max_replicas)),
            }
        }
    }
}
