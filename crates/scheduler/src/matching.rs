//! Matching: filter nodes by a task's requirements, then score the rest and take the best.

use std::collections::BTreeMap;
use std::fmt;

use stardust_proto::identity::NodeId;
use stardust_proto::task::{Hardware, Limits, Requirements, Tier};

/// Longest wall-clock limit a browser node is given: browser tasks must be short.
pub const BROWSER_MAX_WALL_MS: u64 = 30_000;

/// Whether a node takes work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Connected and taking work.
    Online,
    /// Finishing its leases, taking none.
    Draining,
    /// Its owner's policy pauses it (machine busy, CPU limit).
    Paused,
}

/// What the scheduler knows of one node at the moment of matching.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    /// The node's key.
    pub id: NodeId,
    /// Its probed hardware.
    pub hardware: Hardware,
    /// Its tier.
    pub tier: Tier,
    /// Its state.
    pub state: NodeState,
    /// Tasks it runs at once.
    pub slots: u32,
    /// Leases it holds now.
    pub running: u32,
    /// Reputation in `[0, 1]`.
    pub reputation: f64,
    /// Measured round-trip latency to the domain, milliseconds.
    pub latency_ms: u32,
    /// Consecutive agreeing results (see [`crate::reputation`]).
    pub streak: u64,
}

/// Why one node cannot take one task.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rejection {
    /// Draining.
    Draining,
    /// Paused by its owner's policy.
    Paused,
    /// Every slot busy.
    Busy,
    /// Already holds a replica of this task (replicas go to distinct keys).
    HasReplica,
    /// Too little memory.
    Memory {
        /// Bytes the task needs.
        need: u64,
    },
    /// Too few cores.
    Cores {
        /// Cores the task needs.
        need: u32,
    },
    /// No usable GPU.
    NoGpu,
    /// Tier below the task's minimum.
    Tier {
        /// The minimum.
        need: Tier,
    },
    /// A required label is missing.
    Label(String),
    /// A browser node, and the task's deadline is too long for a browser tab.
    TooLongForBrowser,
    /// A browser node without the streak to hold a task's only replica.
    UntrustedBrowser,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Draining => f.write_str("draining"),
            Rejection::Paused => f.write_str("paused by owner policy"),
            Rejection::Busy => f.write_str("busy"),
            Rejection::HasReplica => f.write_str("already run a replica"),
            Rejection::Memory { need } => write!(f, "lack {} memory", human_bytes(*need)),
            Rejection::Cores { need } => write!(f, "lack {need} cores"),
            Rejection::NoGpu => f.write_str("lack a usable GPU"),
            Rejection::Tier { need } => write!(f, "are below tier {need:?}"),
            Rejection::Label(l) => write!(f, "lack label {l:?}"),
            Rejection::UntrustedBrowser => write!(
                f,
                "are browsers without the record to run a task alone ({} agreeing results in a row)",
                crate::reputation::BROWSER_TRUST_STREAK
            ),
            Rejection::TooLongForBrowser => write!(
                f,
                "are browsers (tasks over {} s)",
                BROWSER_MAX_WALL_MS / 1000
            ),
        }
    }
}

fn human_bytes(b: u64) -> String {
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    if b >= GIB && b.is_multiple_of(GIB) {
        format!("{} GiB", b / GIB)
    } else if b >= GIB {
        format!("{:.1} GiB", b as f64 / GIB as f64)
    } else {
        format!("{} MiB", b.div_ceil(MIB))
    }
}

/// The task's needs, as matching sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need<'a> {
    /// Requirements.
    pub requirements: &'a Requirements,
    /// Limits (the memory cap counts as a memory requirement).
    pub limits: &'a Limits,
    /// Nodes that already hold a replica of the task.
    pub replicas_on: &'a [NodeId],
    /// The replica asked for would be the task's only one (its job wants one replica): only
    /// a node that [may stand alone](crate::reputation::may_stand_alone) can take it.
    pub sole: bool,
}

/// Why `node` cannot take the task, checked in a fixed order (availability first, then
/// hardware): the first reason found.
pub fn check(need: &Need<'_>, node: &NodeView) -> Result<(), Rejection> {
    match node.state {
        NodeState::Draining => return Err(Rejection::Draining),
        NodeState::Paused => return Err(Rejection::Paused),
        NodeState::Online => {}
    }
    if need.replicas_on.contains(&node.id) {
        return Err(Rejection::HasReplica);
    }
    let r = need.requirements;
    let memory = r.min_memory_bytes.max(need.limits.memory_bytes);
    if node.hardware.memory_bytes < memory {
        return Err(Rejection::Memory { need: memory });
    }
    if node.hardware.cores < r.min_cores {
        return Err(Rejection::Cores { need: r.min_cores });
    }
    if r.gpu && node.hardware.gpus.is_empty() {
        return Err(Rejection::NoGpu);
    }
    if let Some(min) = r.min_tier
        && node.tier < min
    {
        return Err(Rejection::Tier { need: min });
    }
    if let Some(l) = r.labels.iter().find(|l| !node.hardware.labels.contains(l)) {
        return Err(Rejection::Label(l.clone()));
    }
    if node.tier == Tier::Browser && need.limits.wall_ms > BROWSER_MAX_WALL_MS {
        return Err(Rejection::TooLongForBrowser);
    }
    if need.sole && !crate::reputation::may_stand_alone(node.tier, node.streak) {
        return Err(Rejection::UntrustedBrowser);
    }
    if node.running >= node.slots {
        return Err(Rejection::Busy);
    }
    Ok(())
}

/// How good `node` is for the task, in `[0, 1]`, higher is better: reputation (40 %), free
/// capacity (30 %), fit, i.e. not wasting a large node on a small task (20 %), latency (10 %).
pub fn score(need: &Need<'_>, node: &NodeView) -> f64 {
    let reputation = node.reputation.clamp(0.0, 1.0);
    let free = if node.slots == 0 {
        0.0
    } else {
        1.0 - f64::from(node.running.min(node.slots)) / f64::from(node.slots)
    };
    let memory = need
        .requirements
        .min_memory_bytes
        .max(need.limits.memory_bytes) as f64;
    let fit = if node.hardware.memory_bytes == 0 {
        0.0
    } else {
        (memory / node.hardware.memory_bytes as f64).clamp(0.0, 1.0)
    };
    let latency = 1.0 / (1.0 + f64::from(node.latency_ms) / 10.0);
    0.4 * reputation + 0.3 * free + 0.2 * fit + 0.1 * latency
}

/// Why no node could take a task: how many nodes were considered, and how many were
/// rejected for each reason.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Why {
    /// Nodes considered.
    pub nodes: usize,
    /// Rejections by reason.
    pub reasons: BTreeMap<Rejection, usize>,
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nodes == 0 {
            return f.write_str("no nodes are connected");
        }
        let plural = if self.nodes == 1 { "" } else { "s" };
        write!(f, "{} node{plural}: ", self.nodes)?;
        let mut reasons: Vec<_> = self.reasons.iter().collect();
        // Most common reason first; ties in the fixed reason order.
        reasons.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
        f.write_str(&parts.join(", "))
    }
}

/// The best node for the task, or why there is none. Ties go to the smaller node id, so the
/// choice is deterministic.
pub fn pick<'n>(need: &Need<'_>, nodes: &'n [NodeView]) -> Result<&'n NodeView, Why> {
    let mut why = Why {
        nodes: nodes.len(),
        ..Why::default()
    };
    let mut best: Option<(&NodeView, f64)> = None;
    for node in nodes {
        match check(need, node) {
            Ok(()) => {
                let s = score(need, node);
                let better = match best {
                    None => true,
                    Some((b, bs)) => s > bs || (s == bs && node.id < b.id),
                };
                if better {
                    best = Some((node, s));
                }
            }
            Err(r) => *why.reasons.entry(r).or_default() += 1,
        }
    }
    best.map(|(n, _)| n).ok_or(why)
}

#[cfg(test)]
mod tests {
    use stardust_proto::identity::Identity;
    use stardust_proto::task::Gpu;

    use super::*;

    const GIB: u64 = 1 << 30;

    fn node(seed: u8, cores: u32, mem_gib: u64) -> NodeView {
        let hardware = Hardware {
            cores,
            memory_bytes: mem_gib * GIB,
            ..Hardware::default()
        };
        NodeView {
            id: Identity::from_secret_bytes(&[seed; 32]).id(),
            tier: hardware.tier(),
            hardware,
            state: NodeState::Online,
            slots: 2,
            running: 0,
            reputation: 0.5,
            latency_ms: 1,
            streak: 0,
        }
    }

    fn limits(mem: u64) -> Limits {
        Limits {
            memory_bytes: mem,
            ..Limits::default()
        }
    }

    #[test]
    fn why_explains_every_rejection() {
        let mut busy = node(3, 8, 16);
        busy.running = 2;
        let nodes = [node(1, 2, 2), node(2, 2, 2), busy];
        let req = Requirements::default();
        let l = limits(4 * GIB);
        let need = Need {
            requirements: &req,
            limits: &l,
            replicas_on: &[],
            sole: false,
        };
        let why = pick(&need, &nodes).expect_err("nobody fits");
        assert_eq!(why.to_string(), "3 nodes: 2 lack 4 GiB memory, 1 busy");
        assert_eq!(
            pick(&need, &[]).expect_err("empty").to_string(),
            "no nodes are connected"
        );
    }

    #[test]
    fn requirements_filter() {
        let mut gpu = node(4, 4, 8);
        gpu.hardware.gpus.push(Gpu {
            name: "H100".into(),
            memory_bytes: 80 * GIB,
        });
        gpu.hardware.labels.push("eu".into());
        gpu.tier = gpu.hardware.tier();
        let plain = node(5, 4, 8);
        let l = limits(GIB);
        let req = Requirements {
            gpu: true,
            labels: vec!["eu".into()],
            ..Requirements::default()
        };
        let need = Need {
            requirements: &req,
            limits: &l,
            replicas_on: &[],
            sole: false,
        };
        assert_eq!(check(&need, &plain), Err(Rejection::NoGpu));
        assert_eq!(check(&need, &gpu), Ok(()));
        let req = Requirements {
            min_cores: 16,
            ..Requirements::default()
        };
        let need = Need {
            requirements: &req,
            limits: &l,
            replicas_on: &[],
            sole: false,
        };
        assert_eq!(check(&need, &plain), Err(Rejection::Cores { need: 16 }));
        let req = Requirements {
            min_tier: Some(Tier::Large),
            ..Requirements::default()
        };
        let need = Need {
            requirements: &req,
            limits: &l,
            replicas_on: &[],
            sole: false,
        };
        assert_eq!(
            check(&need, &plain),
            Err(Rejection::Tier { need: Tier::Large })
        );
        assert_eq!(check(&need, &gpu), Ok(()));
    }

    #[test]
    fn replicas_go_to_distinct_nodes() {
        let a = node(1, 4, 8);
        let b = node(2, 4, 8);
        let req = Requirements::default();
        let l = limits(GIB);
        let taken = [a.id];
        let need = Need {
            requirements: &req,
            limits: &l,
            replicas_on: &taken,
            sole: false,
        };
        let nodes = [a.clone(), b.clone()];
        assert_eq!(pick(&need, &nodes).expect("b fits").id, b.id);
        let taken = [a.id, b.id];
        let need = Need {
            requirements: &req,
            limits: &l,
            replicas_on: &taken,
            sole: false,
        };
        assert_eq!(
            pick(&need, &nodes).expect_err("none").to_string(),
            "2 nodes: 2 already run a replica"
        );
    }

    #[test]
    fn browsers_get_short_tasks_only_and_states_are_respected() {
        let mut browser = node(6, 4, 8);
        browser.tier = Tier::Browser;
        let req = Requirements::default();
        let long = Limits {
            wall_ms: 60_000,
            memory_bytes: GIB,
            ..Limits::default()
        };
        let short = Limits {
            wall_ms: 10_000,
            memory_bytes: GIB,
            ..Limits::default()
        };
        assert_eq!(
            check(
                &Need {
                    requirements: &req,
                    limits: &long,
                    replicas_on: &[],
                    sole: false,
                },
                &browser
            ),
            Err(Rejection::TooLongForBrowser)
        );
        assert_eq!(
            check(
                &Need {
                    requirements: &req,
                    limits: &short,
                    replicas_on: &[],
                    sole: false,
                },
                &browser
            ),
            Ok(())
        );
        // A task's only replica: not for a new browser, for one with a streak, for any
        // native node.
        let sole = Need {
            requirements: &req,
            limits: &short,
            replicas_on: &[],
            sole: true,
        };
        assert_eq!(check(&sole, &browser), Err(Rejection::UntrustedBrowser));
        let mut trusted = browser.clone();
        trusted.streak = crate::reputation::BROWSER_TRUST_STREAK;
        assert_eq!(check(&sole, &trusted), Ok(()));
        assert_eq!(check(&sole, &node(8, 4, 8)), Ok(()));
        let mut paused = node(7, 4, 8);
        paused.state = NodeState::Paused;
        assert_eq!(
            check(
                &Need {
                    requirements: &req,
                    limits: &short,
                    replicas_on: &[],
                    sole: false,
                },
                &paused
            ),
            Err(Rejection::Paused)
        );
    }

    #[test]
    fn score_prefers_reputation_then_free_capacity_and_is_deterministic() {
        let req = Requirements::default();
        let l = limits(GIB);
        let need = Need {
            requirements: &req,
            limits: &l,
            replicas_on: &[],
            sole: false,
        };
        let mut good = node(1, 4, 8);
        good.reputation = 0.9;
        let mut loaded = node(2, 4, 8);
        loaded.reputation = 0.9;
        loaded.running = 1;
        let bad = node(3, 4, 8);
        let nodes = [bad.clone(), loaded.clone(), good.clone()];
        assert_eq!(pick(&need, &nodes).expect("fits").id, good.id);
        // Identical nodes: the smaller id wins, whatever the order.
        let twin_a = node(8, 4, 8);
        let twin_b = node(9, 4, 8);
        let first = pick(&need, &[twin_a.clone(), twin_b.clone()])
            .expect("fits")
            .id;
        let second = pick(&need, &[twin_b, twin_a]).expect("fits").id;
        assert_eq!(first, second);
        // A small task prefers the node it fits best.
        let small = node(10, 4, 2);
        let big = node(11, 4, 64);
        assert_eq!(
            pick(&need, &[big, small.clone()]).expect("fits").id,
            small.id
        );
    }
}
