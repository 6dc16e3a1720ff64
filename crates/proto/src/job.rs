//! Jobs as consumers submit them, and the deterministic expansion of a job into tasks.
//!
//! A job is a set of tasks over one module. The tasks are either an explicit list or a
//! **sweep**: a grid over named parameters, random search over named distributions, or both
//! (every grid point gets `samples` random draws). Each task's arguments come from the job's
//! `args` template, where `{name}` is replaced by the value of parameter `name`.
//!
//! Expansion is pure and deterministic: the same spec always gives the same tasks, seeds
//! included, so any party can recompute and check it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::content::ContentId;
use crate::rand::SplitMix64;
use crate::task::{Limits, LimitsError, Requirements};

/// Most tasks one job may expand to.
pub const MAX_TASKS: usize = 100_000;
/// Most replicas of one task.
pub const MAX_REDUNDANCY: u8 = 9;
/// Most arguments of one task, and most bytes of one argument.
pub const MAX_ARGS: usize = 256;
/// Most bytes of one argument after substitution.
pub const MAX_ARG_BYTES: usize = 4096;

/// How urgently a job should run; high priority doubles the price (see the pricing rules).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Runs when nothing else waits.
    Low,
    /// The default.
    #[default]
    Normal,
    /// Runs first.
    High,
}

/// A job, with module and inputs already uploaded and named by content id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// A human-readable name.
    #[serde(default)]
    pub name: String,
    /// The module as uploaded (the domain meters it).
    pub module: ContentId,
    /// Default stdin of every task.
    pub input: ContentId,
    /// Argument template: `{name}` is replaced by parameter `name`; `{{` and `}}` are literal
    /// braces.
    #[serde(default)]
    pub args: Vec<String>,
    /// An explicit task list (exclusive with `sweep`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<TaskTemplate>,
    /// A parameter sweep (exclusive with `tasks`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep: Option<Sweep>,
    /// Limits of each task.
    #[serde(default)]
    pub limits: Limits,
    /// What a node must offer.
    #[serde(default)]
    pub requirements: Requirements,
    /// Replicas per task (1..=9); results are accepted by majority.
    #[serde(default = "default_redundancy")]
    pub redundancy: u8,
    /// Seconds after submission when unfinished tasks are abandoned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_s: Option<u64>,
    /// Priority.
    #[serde(default)]
    pub priority: Priority,
    /// Base of the task seeds (a decimal string on the wire; small numbers are accepted).
    #[serde(default, with = "crate::task::u64_string")]
    pub seed: u64,
    /// Adaptive replication: a task whose first replica goes to a node with a long
    /// agreeing record may run as a single replica (re-checked at random). Default true;
    /// false keeps `redundancy` for every task.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub adaptive: bool,
    /// The most the submitter pays per SCU, in micro-credits: a submission quoted above it
    /// is refused. Default: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_limit: Option<u64>,
}

fn default_redundancy() -> u8 {
    1
}

fn yes() -> bool {
    true
}

fn is_true(v: &bool) -> bool {
    *v
}

/// One task of an explicit list: its own parameters and, optionally, its own input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskTemplate {
    /// Parameters substituted into the job's `args` template.
    #[serde(default)]
    pub params: BTreeMap<String, Value>,
    /// Stdin of this task instead of the job's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<ContentId>,
}

/// A parameter sweep.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sweep {
    /// Every combination of these values (keys in lexical order, the last varying fastest).
    #[serde(default)]
    pub grid: BTreeMap<String, Vec<Value>>,
    /// Random draws at every grid point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random: Option<RandomSearch>,
}

/// Random search: `samples` draws of every parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomSearch {
    /// Draws per grid point.
    pub samples: u32,
    /// Seed of the draws (SplitMix64; a decimal string on the wire, small numbers accepted).
    #[serde(default, with = "crate::task::u64_string")]
    pub seed: u64,
    /// The distributions, by parameter name.
    pub params: BTreeMap<String, Distribution>,
}

/// Where a random parameter is drawn from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Distribution {
    /// Uniform on `[low, high)`.
    Uniform {
        /// Lower bound.
        low: f64,
        /// Upper bound.
        high: f64,
    },
    /// `exp` of a uniform draw on `[ln low, ln high)`; both bounds positive.
    LogUniform {
        /// Lower bound.
        low: f64,
        /// Upper bound.
        high: f64,
    },
    /// An integer uniform on `[low, high]`.
    Int {
        /// Lower bound.
        low: i64,
        /// Upper bound (inclusive).
        high: i64,
    },
    /// One of `values`, uniformly.
    Choice {
        /// The values.
        values: Vec<Value>,
    },
}

/// A parameter value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    /// An integer.
    Int(i64),
    /// A float (printed in the shortest form that reads back exactly).
    Float(f64),
    /// A string.
    Str(String),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Str(s) => f.write_str(s),
        }
    }
}

/// A job spec that cannot be run, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum JobSpecError {
    /// Both an explicit task list and a sweep.
    #[error("a job has either `tasks` or `sweep`, not both")]
    TasksAndSweep,
    /// Redundancy out of range.
    #[error("redundancy {0} is out of range (1..={MAX_REDUNDANCY})")]
    Redundancy(u8),
    /// Limits out of range.
    #[error(transparent)]
    Limits(#[from] LimitsError),
    /// More tasks than a job may have.
    #[error("the job expands to {0} tasks; at most {MAX_TASKS} are allowed")]
    TooManyTasks(u128),
    /// A sweep dimension with no values.
    #[error("sweep parameter {0:?} has no values")]
    EmptyDimension(String),
    /// A parameter defined twice (grid and random, say).
    #[error("parameter {0:?} is defined twice")]
    DuplicateParam(String),
    /// A bad distribution.
    #[error("parameter {name:?}: {reason}")]
    BadDistribution {
        /// The parameter.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// `{name}` in the args template with no such parameter.
    #[error("args use {{{0}}} but no parameter {0:?} is defined")]
    UnknownPlaceholder(String),
    /// A defined parameter that no argument uses (almost always a typo).
    #[error("parameter {0:?} is not used in args")]
    UnusedParam(String),
    /// A malformed template.
    #[error("bad args template {0:?}: unbalanced braces")]
    BadTemplate(String),
    /// Too many or too long arguments.
    #[error("task arguments exceed {MAX_ARGS} arguments or {MAX_ARG_BYTES} bytes each")]
    ArgsTooLarge,
}

/// One task of an expanded job.
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    /// Its position in the job, from 0.
    pub index: u32,
    /// The parameter values.
    pub params: BTreeMap<String, Value>,
    /// The arguments, template applied.
    pub args: Vec<String>,
    /// Its stdin.
    pub input: ContentId,
    /// Its seed.
    pub seed: u64,
}

/// The seed of task `index` of a job with base seed `job_seed`.
pub fn task_seed(job_seed: u64, index: u32) -> u64 {
    SplitMix64::new(job_seed ^ u64::from(index).rotate_left(32)).next_u64()
}

impl JobSpec {
    /// Checks the spec and expands it into its tasks.
    pub fn expand(&self) -> Result<Vec<Trial>, JobSpecError> {
        if !self.tasks.is_empty() && self.sweep.is_some() {
            return Err(JobSpecError::TasksAndSweep);
        }
        if self.redundancy == 0 || self.redundancy > MAX_REDUNDANCY {
            return Err(JobSpecError::Redundancy(self.redundancy));
        }
        self.limits.validate()?;
        let points: Vec<(BTreeMap<String, Value>, Option<ContentId>)> =
            match (&self.sweep, self.tasks.is_empty()) {
                (Some(sweep), _) => sweep.points()?.into_iter().map(|p| (p, None)).collect(),
                (None, false) => {
                    if self.tasks.len() > MAX_TASKS {
                        return Err(JobSpecError::TooManyTasks(self.tasks.len() as u128));
                    }
                    self.tasks
                        .iter()
                        .map(|t| (t.params.clone(), t.input))
                        .collect()
                }
                (None, true) => vec![(BTreeMap::new(), None)],
            };
        let mut used = std::collections::BTreeSet::new();
        let mut trials = Vec::with_capacity(points.len());
        for (index, (params, input)) in points.into_iter().enumerate() {
            let args = self
                .args
                .iter()
                .map(|t| substitute(t, &params, &mut used))
                .collect::<Result<Vec<_>, _>>()?;
            if args.len() > MAX_ARGS || args.iter().any(|a| a.len() > MAX_ARG_BYTES) {
                return Err(JobSpecError::ArgsTooLarge);
            }
            let index = index as u32;
            trials.push(Trial {
                index,
                params,
                args,
                input: input.unwrap_or(self.input),
                seed: task_seed(self.seed, index),
            });
        }
        if let Some(unused) = trials
            .iter()
            .flat_map(|t| t.params.keys())
            .find(|k| !used.contains(*k))
        {
            return Err(JobSpecError::UnusedParam(unused.clone()));
        }
        Ok(trials)
    }
}

impl Sweep {
    /// Every parameter assignment of the sweep, in expansion order.
    fn points(&self) -> Result<Vec<BTreeMap<String, Value>>, JobSpecError> {
        let mut count: u128 = 1;
        for (name, values) in &self.grid {
            if values.is_empty() {
                return Err(JobSpecError::EmptyDimension(name.clone()));
            }
            count *= values.len() as u128;
            if count > MAX_TASKS as u128 {
                return Err(JobSpecError::TooManyTasks(count));
            }
        }
        if let Some(random) = &self.random {
            count *= u128::from(random.samples);
            if count > MAX_TASKS as u128 {
                return Err(JobSpecError::TooManyTasks(count));
            }
            for (name, dist) in &random.params {
                if self.grid.contains_key(name) {
                    return Err(JobSpecError::DuplicateParam(name.clone()));
                }
                dist.check(name)?;
            }
        }
        // Grid point k, in mixed radix over the dimensions, the last one varying fastest.
        let dims: Vec<(&String, &Vec<Value>)> = self.grid.iter().collect();
        let grid_count: usize = dims.iter().map(|(_, v)| v.len()).product();
        let grid_points: Vec<BTreeMap<String, Value>> = (0..grid_count)
            .map(|mut k| {
                let mut point = BTreeMap::new();
                for (name, values) in dims.iter().rev() {
                    point.insert((*name).clone(), values[k % values.len()].clone());
                    k /= values.len();
                }
                point
            })
            .collect();
        let Some(random) = &self.random else {
            return Ok(grid_points);
        };
        let mut rng = SplitMix64::new(random.seed);
        let mut out = Vec::with_capacity(grid_points.len() * random.samples as usize);
        for point in grid_points {
            for _ in 0..random.samples {
                let mut p = point.clone();
                for (name, dist) in &random.params {
                    p.insert(name.clone(), dist.draw(&mut rng));
                }
                out.push(p);
            }
        }
        Ok(out)
    }
}

impl Distribution {
    fn check(&self, name: &str) -> Result<(), JobSpecError> {
        let bad = |reason: &str| {
            Err(JobSpecError::BadDistribution {
                name: name.to_string(),
                reason: reason.to_string(),
            })
        };
        match self {
            Distribution::Uniform { low, high }
                if !(low.is_finite() && high.is_finite() && low < high) =>
            {
                bad("uniform needs finite low < high")
            }
            Distribution::LogUniform { low, high }
                if !(low.is_finite() && high.is_finite() && *low > 0.0 && low < high) =>
            {
                bad("log_uniform needs 0 < low < high")
            }
            Distribution::Int { low, high } if low > high => bad("int needs low <= high"),
            Distribution::Choice { values } if values.is_empty() => {
                bad("choice needs at least one value")
            }
            _ => Ok(()),
        }
    }

    fn draw(&self, rng: &mut SplitMix64) -> Value {
        match self {
            Distribution::Uniform { low, high } => {
                Value::Float(low + (high - low) * rng.next_f64())
            }
            Distribution::LogUniform { low, high } => {
                Value::Float((low.ln() + (high.ln() - low.ln()) * rng.next_f64()).exp())
            }
            Distribution::Int { low, high } => {
                let span = (*high as i128 - *low as i128 + 1) as u128;
                Value::Int((*low as i128 + (u128::from(rng.next_u64()) % span) as i128) as i64)
            }
            Distribution::Choice { values } => {
                values[(rng.next_u64() % values.len() as u64) as usize].clone()
            }
        }
    }
}

/// Applies one argument template.
fn substitute(
    template: &str,
    params: &BTreeMap<String, Value>,
    used: &mut std::collections::BTreeSet<String>,
) -> Result<String, JobSpecError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("{{") {
            out.push('{');
            rest = after;
        } else if let Some(after) = tail.strip_prefix("}}") {
            out.push('}');
            rest = after;
        } else if tail.starts_with('{') {
            let end = tail
                .find('}')
                .ok_or_else(|| JobSpecError::BadTemplate(template.to_string()))?;
            let name = &tail[1..end];
            let (key, value) = params
                .get_key_value(name)
                .ok_or_else(|| JobSpecError::UnknownPlaceholder(name.to_string()))?;
            if !used.contains(key) {
                used.insert(key.clone());
            }
            out.push_str(&value.to_string());
            rest = &tail[end + 1..];
        } else {
            return Err(JobSpecError::BadTemplate(template.to_string()));
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> JobSpec {
        let mut base = serde_json::json!({
            "module": ContentId::of(b"m").to_string(),
            "input": ContentId::of(b"").to_string(),
        });
        if let (Some(b), Some(extra)) = (base.as_object_mut(), json.as_object()) {
            b.extend(extra.clone());
        }
        serde_json::from_value(base).expect("valid spec json")
    }

    #[test]
    fn no_sweep_is_one_task() {
        let trials = spec(serde_json::json!({"args": ["x"]}))
            .expand()
            .expect("expands");
        assert_eq!(trials.len(), 1);
        assert_eq!(trials[0].args, ["x"]);
    }

    #[test]
    fn grid_is_a_cartesian_product_in_order() {
        let s = spec(serde_json::json!({
            "args": ["--lr={lr}", "--hidden={hidden}", "{{literal}}"],
            "sweep": {"grid": {"lr": [0.1, 0.01], "hidden": [16, 32, 64]}},
        }));
        let trials = s.expand().expect("expands");
        assert_eq!(trials.len(), 6);
        // Keys in lexical order (hidden, lr), the last (lr) varying fastest.
        assert_eq!(trials[0].args, ["--lr=0.1", "--hidden=16", "{literal}"]);
        assert_eq!(trials[1].args, ["--lr=0.01", "--hidden=16", "{literal}"]);
        assert_eq!(trials[5].args, ["--lr=0.01", "--hidden=64", "{literal}"]);
        let seeds: std::collections::BTreeSet<_> = trials.iter().map(|t| t.seed).collect();
        assert_eq!(seeds.len(), 6, "distinct seeds");
        assert_eq!(s.expand().expect("again"), trials, "deterministic");
    }

    #[test]
    fn random_search_is_seeded_and_in_range() {
        let s = spec(serde_json::json!({
            "args": ["{lr}", "{epochs}", "{act}", "{l2}"],
            "sweep": {
                "grid": {"act": ["relu", "tanh"]},
                "random": {"samples": 25, "seed": 42, "params": {
                    "lr": {"type": "log_uniform", "low": 0.0001, "high": 0.1},
                    "epochs": {"type": "int", "low": 1, "high": 3},
                    "l2": {"type": "uniform", "low": 0.0, "high": 0.5},
                }},
            },
        }));
        let trials = s.expand().expect("expands");
        assert_eq!(trials.len(), 50);
        for t in &trials {
            let Value::Float(lr) = t.params["lr"] else {
                panic!("lr is a float")
            };
            assert!((0.0001..0.1).contains(&lr));
            let Value::Int(e) = t.params["epochs"] else {
                panic!("epochs is an int")
            };
            assert!((1..=3).contains(&e));
        }
        assert_eq!(trials[0].params["act"], Value::Str("relu".into()));
        assert_eq!(trials[25].params["act"], Value::Str("tanh".into()));
        assert_eq!(s.expand().expect("again"), trials);
        let mut other = s.clone();
        if let Some(r) = other.sweep.as_mut().and_then(|s| s.random.as_mut()) {
            r.seed = 43;
        }
        assert_ne!(
            other.expand().expect("expands")[0].params["lr"],
            trials[0].params["lr"]
        );
    }

    #[test]
    fn bad_specs_get_typed_errors() {
        let cases = [
            (serde_json::json!({"redundancy": 0}), "redundancy"),
            (serde_json::json!({"args": ["{nope}"]}), "nope"),
            (serde_json::json!({"args": ["{x"]}), "unbalanced"),
            (
                serde_json::json!({"args": [], "sweep": {"grid": {"x": [1]}}}),
                "not used",
            ),
            (
                serde_json::json!({"args": ["{x}"], "sweep": {"grid": {"x": []}}}),
                "no values",
            ),
            (
                serde_json::json!({"args": ["{a}{b}"], "sweep": {"grid": {"a": (0..1000).collect::<Vec<_>>(), "b": (0..1000).collect::<Vec<_>>()}}}),
                "at most",
            ),
            (
                serde_json::json!({"args": ["{x}"], "sweep": {"random": {"samples": 1, "params": {"x": {"type": "log_uniform", "low": 0.0, "high": 1.0}}}}}),
                "0 < low",
            ),
            (
                serde_json::json!({"args": ["{x}"], "tasks": [{"params": {"x": 1}}], "sweep": {"grid": {"x": [1]}}}),
                "not both",
            ),
            (
                serde_json::json!({"limits": {"fuel": 0, "memory_bytes": 65536, "wall_ms": 1, "output_bytes": 1}}),
                "fuel",
            ),
        ];
        for (json, needle) in cases {
            let err = spec(json.clone())
                .expand()
                .expect_err("must fail")
                .to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }

    #[test]
    fn explicit_tasks_with_their_own_inputs() {
        let other = ContentId::of(b"other input");
        let s = spec(serde_json::json!({
            "args": ["{n}"],
            "tasks": [{"params": {"n": 1}}, {"params": {"n": 2}, "input": other.to_string()}],
        }));
        let trials = s.expand().expect("expands");
        assert_eq!(
            trials
                .iter()
                .map(|t| t.args[0].as_str())
                .collect::<Vec<_>>(),
            ["1", "2"]
        );
        assert_eq!(trials[0].input, ContentId::of(b""));
        assert_eq!(trials[1].input, other);
    }

    proptest::proptest! {
        #[test]
        fn grid_specs_roundtrip_and_expand_to_the_product(
            dims in proptest::collection::btree_map("[a-z]{1,6}", proptest::collection::vec(-1000i64..1000, 1..4), 0..4),
            redundancy in 1u8..=MAX_REDUNDANCY,
            seed in proptest::prelude::any::<u64>(),
        ) {
            let args: Vec<String> = dims.keys().map(|k| format!("{{{k}}}")).collect();
            let grid = dims.iter().map(|(k, v)| (k.clone(), v.iter().map(|i| Value::Int(*i)).collect())).collect();
            let spec = JobSpec {
                name: "p".into(),
                module: ContentId::of(b"m"),
                input: ContentId::of(b"i"),
                args,
                tasks: vec![],
                sweep: Some(Sweep { grid, random: None }),
                limits: Limits::default(),
                requirements: Requirements::default(),
                redundancy,
                deadline_s: Some(60),
                priority: Priority::High,
                seed,
                adaptive: seed % 2 == 0,
                price_limit: (seed % 3 == 0).then_some(seed / 7),
            };
            let json = serde_json::to_string(&spec).expect("serialize");
            let back: JobSpec = serde_json::from_str(&json).expect("deserialize");
            proptest::prop_assert_eq!(&back, &spec);
            let expected: usize = dims.values().map(Vec::len).product();
            proptest::prop_assert_eq!(spec.expand().expect("expands").len(), expected);
        }
    }
}
