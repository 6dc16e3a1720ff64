//! Tasks: what a node is asked to run ([`TaskSpec`], [`Limits`]) and what it reports back
//! ([`Status`], [`RunReport`]).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::content::ContentId;

/// Largest integer every JSON implementation (JavaScript included) represents exactly.
/// Integer fields of v1 messages stay at or below it.
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Resource limits for one run. Every limit is enforced by the sandbox and produces its own
/// [`Status`] when exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Metered fuel (see [`crate::scu`]); exceeding it gives [`Status::OutOfFuel`].
    pub fuel: u64,
    /// Linear memory cap in bytes (rounded down to 64 KiB pages); [`Status::OutOfMemory`].
    pub memory_bytes: u64,
    /// Wall-clock deadline in milliseconds; [`Status::DeadlineExceeded`].
    pub wall_ms: u64,
    /// Cap on the bytes written to stdout; [`Status::OutputTooLarge`].
    pub output_bytes: u64,
}

impl Limits {
    /// Upper bound on `memory_bytes`: the 4 GiB of a 32-bit linear memory.
    pub const MAX_MEMORY_BYTES: u64 = 4 << 30;
    /// Upper bound on `output_bytes`: 64 MiB.
    pub const MAX_OUTPUT_BYTES: u64 = 64 << 20;
    /// Upper bound on `wall_ms`: 24 hours.
    pub const MAX_WALL_MS: u64 = 24 * 3600 * 1000;

    /// Checks every limit is positive and within protocol bounds.
    pub fn validate(&self) -> Result<(), LimitsError> {
        let check = |name: &'static str, value: u64, max: u64| {
            if value == 0 || value > max {
                Err(LimitsError { name, value, max })
            } else {
                Ok(())
            }
        };
        check("fuel", self.fuel, MAX_SAFE_INTEGER)?;
        check("memory_bytes", self.memory_bytes, Self::MAX_MEMORY_BYTES)?;
        check("wall_ms", self.wall_ms, Self::MAX_WALL_MS)?;
        check("output_bytes", self.output_bytes, Self::MAX_OUTPUT_BYTES)?;
        if self.memory_bytes < crate::task::WASM_PAGE {
            return Err(LimitsError {
                name: "memory_bytes",
                value: self.memory_bytes,
                max: Self::MAX_MEMORY_BYTES,
            });
        }
        Ok(())
    }

    /// The memory cap in 64 KiB pages.
    pub fn memory_pages(&self) -> u32 {
        u32::try_from(self.memory_bytes / WASM_PAGE).unwrap_or(u32::MAX)
    }
}

impl Default for Limits {
    /// 10 SCU of fuel, 256 MiB of memory, 60 s, 16 MiB of output.
    fn default() -> Self {
        Self {
            fuel: 10 * crate::scu::FUEL_PER_SCU,
            memory_bytes: 256 << 20,
            wall_ms: 60_000,
            output_bytes: 16 << 20,
        }
    }
}

/// Bytes in one WebAssembly page.
pub const WASM_PAGE: u64 = 65_536;

/// A limit outside its bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("limit {name} = {value} is out of range (1..={max}; memory at least one 64 KiB page)")]
pub struct LimitsError {
    /// Which limit.
    pub name: &'static str,
    /// Its value.
    pub value: u64,
    /// Its maximum.
    pub max: u64,
}

/// How a run ended. The names (`snake_case`) are part of the protocol and of
/// `stardust run --json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Status {
    /// `_start` returned, or the guest called `proc_exit(0)`.
    Ok,
    /// The guest called `proc_exit` with a non-zero code.
    ExitNonzero,
    /// The metered fuel ran out.
    OutOfFuel,
    /// The guest asked for more linear memory than its cap.
    OutOfMemory,
    /// The wall-clock deadline passed.
    DeadlineExceeded,
    /// A WebAssembly trap; [`RunReport::trap`] says which.
    Trap,
    /// The guest wrote more than its output cap to stdout.
    OutputTooLarge,
    /// The module could not be run at all (bad bytes, unsupported feature or import, no
    /// `_start`); [`RunReport::detail`] says why.
    InvalidModule,
}

impl Status {
    /// Every status.
    pub const ALL: [Status; 8] = [
        Status::Ok,
        Status::ExitNonzero,
        Status::OutOfFuel,
        Status::OutOfMemory,
        Status::DeadlineExceeded,
        Status::Trap,
        Status::OutputTooLarge,
        Status::InvalidModule,
    ];

    /// The protocol name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::ExitNonzero => "exit_nonzero",
            Status::OutOfFuel => "out_of_fuel",
            Status::OutOfMemory => "out_of_memory",
            Status::DeadlineExceeded => "deadline_exceeded",
            Status::Trap => "trap",
            Status::OutputTooLarge => "output_too_large",
            Status::InvalidModule => "invalid_module",
        }
    }

    /// True when the run's result depends only on module, input, args, seed and limits, so
    /// replicas must agree on it bitwise. Only a wall-clock deadline is not deterministic.
    pub const fn is_deterministic(self) -> bool {
        !matches!(self, Status::DeadlineExceeded)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which WebAssembly trap ended a run with [`Status::Trap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TrapKind {
    /// Call stack exhausted (deep recursion).
    StackOverflow,
    /// Out-of-bounds linear memory access.
    MemoryOutOfBounds,
    /// Out-of-bounds table access.
    TableOutOfBounds,
    /// Indirect call to a null table entry.
    IndirectCallToNull,
    /// Indirect call with the wrong signature.
    BadSignature,
    /// Integer overflow (e.g. `i32.div_s` of MIN by -1).
    IntegerOverflow,
    /// Integer division by zero.
    IntegerDivisionByZero,
    /// Float to integer conversion out of range.
    BadConversionToInteger,
    /// An `unreachable` instruction (C's `abort()`, `__builtin_trap()`).
    Unreachable,
    /// Any other trap.
    Other,
}

/// What one run produced. The output bytes travel separately, named by `output`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunReport {
    /// How the run ended.
    pub status: Status,
    /// The trap, when `status` is `trap`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trap: Option<TrapKind>,
    /// The exit code: 0 for `ok`, the `proc_exit` code for `exit_nonzero`, absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Metered fuel consumed (equal to the limit when out of fuel).
    pub fuel_used: u64,
    /// Content id of the stdout bytes (of what was written before the end, in every status).
    pub output: ContentId,
    /// Length of the stdout bytes.
    pub output_len: u64,
    /// Wall-clock milliseconds (informational; not compared between replicas).
    pub wall_ms: u64,
    /// Human-readable detail for `invalid_module` and host failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl RunReport {
    /// The part of the report replicas must agree on bitwise: status, trap, exit code,
    /// fuel and output hash.
    pub fn fingerprint(&self) -> (Status, Option<TrapKind>, Option<i32>, u64, ContentId) {
        (
            self.status,
            self.trap,
            self.exit_code,
            self.fuel_used,
            self.output,
        )
    }
}

/// Identifies a job within a domain.
pub type JobId = u64;
/// Identifies a task within a domain.
pub type TaskId = u64;
/// Identifies one lease (one replica's attempt at a task) within a domain.
pub type LeaseId = u64;

/// Everything a node needs to run one replica of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// The task.
    pub task: TaskId,
    /// Its job.
    pub job: JobId,
    /// The metered module (see `docs/protocol.md`, "Metering").
    pub module: ContentId,
    /// The stdin bytes.
    pub input: ContentId,
    /// Arguments after `argv[0]`.
    pub args: Vec<String>,
    /// Resource limits.
    pub limits: Limits,
    /// Seeds the guest's deterministic random source (a decimal string on the wire).
    #[serde(with = "u64_string")]
    pub seed: u64,
}

/// What a task asks of the node that runs it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Requirements {
    /// Minimum total memory of the node, bytes.
    pub min_memory_bytes: u64,
    /// Minimum CPU cores.
    pub min_cores: u32,
    /// Needs a usable GPU.
    pub gpu: bool,
    /// Minimum tier.
    pub min_tier: Option<Tier>,
    /// Labels the node must carry.
    pub labels: Vec<String>,
}

/// A node's class, derived from its hardware report (see `docs/protocol.md`, "Tiers").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// A browser tab: short tasks only.
    Browser,
    /// Fewer than 4 cores or under 4 GiB of memory.
    Small,
    /// A typical desktop or laptop.
    Standard,
    /// 16+ cores and 32+ GiB, or a usable GPU.
    Large,
}

/// A node's hardware, as probed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Hardware {
    /// Logical CPU cores.
    pub cores: u32,
    /// Total memory, bytes.
    pub memory_bytes: u64,
    /// CPU model name.
    pub cpu_model: String,
    /// Operating system and architecture, e.g. `linux-x86_64`.
    pub os: String,
    /// Usable GPUs.
    pub gpus: Vec<Gpu>,
    /// Why a present GPU is unusable, when one is.
    pub gpu_unusable_reason: Option<String>,
    /// Measured speed on the reference kernel, in micro-SCU per second.
    pub micro_scu_per_s: u64,
    /// Free-form labels set by the owner.
    pub labels: Vec<String>,
}

/// One GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    /// Device name.
    pub name: String,
    /// Device memory, bytes.
    pub memory_bytes: u64,
}

impl Hardware {
    /// The tier this hardware belongs to (browser nodes declare their own tier).
    pub fn tier(&self) -> Tier {
        const GIB: u64 = 1 << 30;
        if !self.gpus.is_empty() || (self.cores >= 16 && self.memory_bytes >= 32 * GIB) {
            Tier::Large
        } else if self.cores < 4 || self.memory_bytes < 4 * GIB {
            Tier::Small
        } else {
            Tier::Standard
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_are_the_protocol_names() {
        for s in Status::ALL {
            assert_eq!(
                serde_json::to_string(&s).expect("ser"),
                format!("\"{}\"", s.as_str())
            );
        }
    }

    #[test]
    fn limits_validation() {
        assert_eq!(Limits::default().validate(), Ok(()));
        let bad = |l: Limits| l.validate().map_err(|e| e.name);
        assert_eq!(
            bad(Limits {
                fuel: 0,
                ..Limits::default()
            }),
            Err("fuel")
        );
        assert_eq!(
            bad(Limits {
                memory_bytes: 1000,
                ..Limits::default()
            }),
            Err("memory_bytes")
        );
        assert_eq!(
            bad(Limits {
                memory_bytes: Limits::MAX_MEMORY_BYTES + 1,
                ..Limits::default()
            }),
            Err("memory_bytes")
        );
        assert_eq!(
            bad(Limits {
                wall_ms: 0,
                ..Limits::default()
            }),
            Err("wall_ms")
        );
        assert_eq!(
            bad(Limits {
                output_bytes: Limits::MAX_OUTPUT_BYTES + 1,
                ..Limits::default()
            }),
            Err("output_bytes")
        );
        assert_eq!(
            Limits {
                memory_bytes: 3 * WASM_PAGE + 5,
                ..Limits::default()
            }
            .memory_pages(),
            3
        );
    }

    #[test]
    fn seeds_travel_as_strings() {
        let spec = TaskSpec {
            task: 1,
            job: 2,
            module: ContentId::of(b"m"),
            input: ContentId::of(b"i"),
            args: vec![],
            limits: Limits::default(),
            seed: u64::MAX,
        };
        let json = serde_json::to_value(&spec).expect("ser");
        assert_eq!(json["seed"], "18446744073709551615");
        let back: TaskSpec = serde_json::from_value(json.clone()).expect("de");
        assert_eq!(back.seed, u64::MAX);
        let mut small = json.clone();
        small["seed"] = serde_json::json!(42);
        assert_eq!(
            serde_json::from_value::<TaskSpec>(small).expect("de").seed,
            42
        );
        let mut big = json;
        big["seed"] = serde_json::json!(1u64 << 60);
        assert!(
            serde_json::from_value::<TaskSpec>(big).is_err(),
            "unsafe number refused"
        );
    }

    #[test]
    fn tiers() {
        let gib = 1u64 << 30;
        let hw = |cores, mem| Hardware {
            cores,
            memory_bytes: mem * gib,
            ..Hardware::default()
        };
        assert_eq!(hw(2, 24).tier(), Tier::Small);
        assert_eq!(hw(8, 2).tier(), Tier::Small);
        assert_eq!(hw(8, 16).tier(), Tier::Standard);
        assert_eq!(hw(32, 64).tier(), Tier::Large);
        let mut g = hw(4, 8);
        g.gpus.push(Gpu {
            name: "H100".into(),
            memory_bytes: 80 * gib,
        });
        assert_eq!(g.tier(), Tier::Large);
    }
}

/// Serde for full-range `u64` values (seeds) as decimal strings, since JSON numbers are only
/// exact up to 2^53 − 1 in most implementations. Numbers up to that bound are accepted on
/// input too.
pub mod u64_string {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the decimal string.
    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    /// Reads a decimal string, or a number no larger than 2^53 − 1.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr<'a> {
            Num(u64),
            Str(std::borrow::Cow<'a, str>),
        }
        match Repr::deserialize(d)? {
            Repr::Num(n) if n <= super::MAX_SAFE_INTEGER => Ok(n),
            Repr::Num(_) => Err(serde::de::Error::custom(
                "seeds above 2^53 - 1 must be written as strings",
            )),
            Repr::Str(s) => s
                .parse()
                .map_err(|_| serde::de::Error::custom("seed: expected a decimal u64")),
        }
    }
}
