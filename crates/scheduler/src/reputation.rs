//! Reputation of a node, and adaptive replication.
//!
//! # Reputation: a Beta posterior with forgetting
//!
//! Each verification outcome updates two weights, older evidence fading by a factor
//! [`FORGET`] per new outcome:
//!
//! ```text
//! good ← FORGET × good + g        bad ← FORGET × bad + b
//! agreed with the quorum: g = 1          lost a quorum: b = 1
//! passed a spot check:    g = 1          failed a spot check: b = 3
//! reputation = (good + 1) / (good + bad + 2)        (Beta(1, 1) prior: a new node is 0.5)
//! ```
//!
//! With `FORGET = 0.98` the weights saturate near 50, so a long-honest node recovers from
//! an old mistake, and a node's history from months ago does not vouch for it forever.
//!
//! # Adaptive replication (BOINC's scheme)
//!
//! `streak` counts a node's consecutive agreeing results; any loss or failed spot check
//! resets it. When a task's first replica goes to a node with a streak of at least
//! [`Adaptive::min_streak`], the task runs as a single replica, except with probability
//! `max(1 / streak, floor)`, when it keeps its full redundancy as a re-check. New nodes
//! always get redundancy.
//!
//! # Browser nodes
//!
//! A browser tab is cheap to open in thousands, so a browser node never holds a task's only
//! replica, and never pairs only with other untrusted browsers, until it has a streak of
//! [`BROWSER_TRUST_STREAK`] agreeing results ([`may_stand_alone`]).

use stardust_proto::task::Tier;

/// How much older evidence weighs after each new outcome.
pub const FORGET: f64 = 0.98;

/// A verification outcome for one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// In the agreeing quorum of a task.
    Agreed,
    /// In the losing minority of a task.
    Disagreed,
    /// Returned the known answer of a spot check.
    SpotPassed,
    /// Returned something else than the known answer of a spot check.
    SpotFailed,
}

/// A node's record.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Record {
    /// Decayed weight of good outcomes.
    pub good: f64,
    /// Decayed weight of bad outcomes.
    pub bad: f64,
    /// Consecutive good outcomes.
    pub streak: u64,
}

impl Record {
    /// The record after `outcome`.
    pub fn update(self, outcome: Outcome) -> Self {
        let (g, b) = match outcome {
            Outcome::Agreed | Outcome::SpotPassed => (1.0, 0.0),
            Outcome::Disagreed => (0.0, 1.0),
            Outcome::SpotFailed => (0.0, 3.0),
        };
        let streak = if b > 0.0 { 0 } else { self.streak + 1 };
        Self {
            good: FORGET * self.good + g,
            bad: FORGET * self.bad + b,
            streak,
        }
    }

    /// The reputation in (0, 1): the posterior mean.
    pub fn score(&self) -> f64 {
        (self.good + 1.0) / (self.good + self.bad + 2.0)
    }
}

/// Consecutive agreeing results a browser node needs before it may hold a task's only
/// replica: until then, every task it runs has a replica on another kind of node (or on a
/// browser that earned it).
pub const BROWSER_TRUST_STREAK: u64 = 10;

/// Whether a node of `tier` with `streak` consecutive agreeing results may be a task's sole
/// replica, or the only other replica beside an untrusted browser. Native nodes always may
/// (adaptive replication still decides how many replicas a task gets).
pub fn may_stand_alone(tier: Tier, streak: u64) -> bool {
    tier != Tier::Browser || streak >= BROWSER_TRUST_STREAK
}

/// Adaptive replication settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adaptive {
    /// Consecutive agreeing results before a node may run a task alone. Default 10; 0
    /// turns adaptive replication off (every task keeps its redundancy).
    pub min_streak: u64,
    /// Lowest re-check probability, however long the streak. Default 0.05.
    pub floor: f64,
}

impl Default for Adaptive {
    fn default() -> Self {
        Self {
            min_streak: 10,
            floor: 0.05,
        }
    }
}

impl Adaptive {
    /// Whether a task whose first replica goes to a node with `streak` runs as a single
    /// replica. `draw` is a uniform random number in [0, 1).
    pub fn single(&self, streak: u64, draw: f64) -> bool {
        if self.min_streak == 0 || streak < self.min_streak {
            return false;
        }
        let recheck = (1.0 / streak as f64).max(self.floor);
        draw >= recheck
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browsers_stand_alone_only_after_earning_a_streak() {
        assert!(may_stand_alone(Tier::Small, 0));
        assert!(may_stand_alone(Tier::Large, 0));
        assert!(!may_stand_alone(Tier::Browser, 0));
        assert!(!may_stand_alone(Tier::Browser, BROWSER_TRUST_STREAK - 1));
        assert!(may_stand_alone(Tier::Browser, BROWSER_TRUST_STREAK));
    }

    fn run(outcomes: &[Outcome]) -> Record {
        outcomes.iter().fold(Record::default(), |r, o| r.update(*o))
    }

    #[test]
    fn a_new_node_is_neutral_and_outcomes_move_it() {
        assert_eq!(Record::default().score(), 0.5);
        let honest = run(&[Outcome::Agreed; 20]);
        let liar = run(&[Outcome::Disagreed; 20]);
        assert!(honest.score() > 0.9, "{}", honest.score());
        assert!(liar.score() < 0.1, "{}", liar.score());
        assert_eq!(honest.streak, 20);
        assert_eq!(liar.streak, 0);
    }

    #[test]
    fn a_failed_spot_check_weighs_three_losses_and_resets_the_streak() {
        let base = run(&[Outcome::Agreed; 30]);
        let lost = base.update(Outcome::Disagreed);
        let caught = base.update(Outcome::SpotFailed);
        assert!(caught.score() < lost.score());
        assert_eq!(caught.streak, 0);
        assert_eq!(lost.streak, 0);
    }

    #[test]
    fn old_mistakes_fade() {
        let mut r = run(&[Outcome::Disagreed; 5]);
        let after_mistakes = r.score();
        for _ in 0..300 {
            r = r.update(Outcome::Agreed);
        }
        assert!(after_mistakes < 0.2);
        assert!(r.score() > 0.97, "{}", r.score());
        assert!(r.bad < 0.02, "{}", r.bad);
        // Weights stay bounded: 1 / (1 - FORGET) = 50.
        assert!(r.good < 50.0);
    }

    #[test]
    fn adaptive_replication_needs_a_streak_and_keeps_rechecking() {
        let a = Adaptive::default();
        assert!(!a.single(0, 0.99), "new nodes always get redundancy");
        assert!(!a.single(9, 0.99));
        assert!(a.single(10, 0.5));
        assert!(!a.single(10, 0.05), "re-check with probability 1/streak");
        assert!(!a.single(1_000_000, 0.04), "never below the floor");
        assert!(a.single(1_000_000, 0.06));
        let off = Adaptive { min_streak: 0, ..a };
        assert!(!off.single(1_000, 0.99));
        // The fraction of re-checks at a long streak is the floor.
        let n = 10_000;
        let rechecks = (0..n)
            .filter(|i| !a.single(500, f64::from(*i) / f64::from(n)))
            .count();
        assert_eq!(rechecks, 500);
    }
}
