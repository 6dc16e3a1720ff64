//! Which processor cores the domain's threads run on: [`Cores`].
//!
//! An embedded domain (SQLite) has one writer, and runs its statements on its own runtime's
//! threads. Those threads hand work to each other all the time (a session's task wakes the
//! lease round, a recorded result wakes the request waiting for it), and each hand-off wakes
//! a thread. A thread woken on another core costs an inter-processor interrupt, and on a
//! virtual machine, whose idle vCPUs halt, an exit to the hypervisor as well. On the 2-core
//! VM of docs/benchmarks.md, a pipe ping-pong between two threads takes 55–80 µs on two cores
//! and 5 µs on one (`benchmarks/machine/pingpong.c`). So by default an embedded domain keeps
//! its threads on one core and leaves the others to nodes and everything else. The one
//! connection serialises its work anyway, so a second core would not make the store faster.
//! A PostgreSQL domain spreads its work over the server's connections, so it runs on every
//! core.
//!
//! Threads inherit their creator's affinity. The domain's runtime starts on a thread pinned
//! to the core, and opens the store there, so SQLite's checkpointer thread is pinned too.

use std::fmt;
use std::str::FromStr;

/// Where the domain's threads run. Default [`Cores::Auto`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Cores {
    /// With SQLite, on one core: the last one this process may use, when it may use more
    /// than one. With PostgreSQL, on every core.
    #[default]
    Auto,
    /// Wherever the operating system puts them.
    All,
    /// On this core (numbered as the operating system numbers them, from 0).
    One(usize),
}

impl Cores {
    /// The core to pin the domain to, if any: `sqlite` says whether the store is SQLite,
    /// `allowed` lists the cores this process may run on (empty when unknown).
    pub(crate) fn pick(self, sqlite: bool, allowed: &[usize]) -> Result<Option<usize>, String> {
        match self {
            Self::All => Ok(None),
            Self::Auto => Ok(if sqlite && allowed.len() > 1 {
                allowed.last().copied()
            } else {
                None
            }),
            Self::One(core) if allowed.is_empty() || allowed.contains(&core) => Ok(Some(core)),
            Self::One(core) => Err(format!(
                "core {core} is not one this process may run on (it may use {})",
                list(allowed)
            )),
        }
    }
}

/// `0-3,6` style, as `taskset` and /proc write a set of cores.
fn list(cores: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cores.len() {
        let mut j = i;
        while j + 1 < cores.len() && cores[j + 1] == cores[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cores[i].to_string()
        } else {
            format!("{}-{}", cores[i], cores[j])
        });
        i = j + 1;
    }
    out.join(",")
}

impl FromStr for Cores {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "all" => Ok(Self::All),
            n => n.parse().map(Self::One).map_err(|_| {
                format!("cores must be auto, all or a core number (from 0), not {s:?}")
            }),
        }
    }
}

impl fmt::Display for Cores {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::All => f.write_str("all"),
            Self::One(core) => write!(f, "{core}"),
        }
    }
}

/// The cores this process may run on, ascending; empty where the system does not say.
pub(crate) fn allowed() -> Vec<usize> {
    #[cfg(target_os = "linux")]
    {
        use rustix::thread::{CpuSet, sched_getaffinity};
        if let Ok(set) = sched_getaffinity(None) {
            return (0..CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect();
        }
    }
    Vec::new()
}

/// Pins the calling thread, and the threads it starts from now on, to `core`.
pub(crate) fn pin(core: usize) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use rustix::thread::{CpuSet, sched_setaffinity};
        if core >= CpuSet::MAX_CPU {
            return Err(std::io::Error::other(format!(
                "core {core} is past the {} this system can name",
                CpuSet::MAX_CPU
            )));
        }
        let mut set = CpuSet::new();
        set.set(core);
        sched_setaffinity(None, &set).map_err(std::io::Error::from)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = core;
        Err(std::io::Error::other(
            "pinning threads to a core is supported on Linux only",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_pins_an_embedded_domain_to_the_last_core_it_may_use() {
        assert_eq!(Cores::Auto.pick(true, &[0, 1, 2, 3]), Ok(Some(3)));
        assert_eq!(Cores::Auto.pick(true, &[2, 5]), Ok(Some(5)));
        // One core: nothing to choose. Unknown: leave it to the system.
        assert_eq!(Cores::Auto.pick(true, &[4]), Ok(None));
        assert_eq!(Cores::Auto.pick(true, &[]), Ok(None));
        // PostgreSQL: every core.
        assert_eq!(Cores::Auto.pick(false, &[0, 1, 2, 3]), Ok(None));
        assert_eq!(Cores::All.pick(true, &[0, 1]), Ok(None));
    }

    #[test]
    fn a_named_core_must_be_one_the_process_may_use() {
        assert_eq!(Cores::One(1).pick(false, &[0, 1]), Ok(Some(1)));
        let err = Cores::One(7)
            .pick(true, &[0, 1, 2, 5])
            .expect_err("core 7 is not allowed");
        assert!(err.contains("core 7") && err.contains("0-2,5"), "{err}");
    }

    #[test]
    fn parses_and_prints() {
        for (text, cores) in [
            ("auto", Cores::Auto),
            ("all", Cores::All),
            ("3", Cores::One(3)),
        ] {
            assert_eq!(text.parse::<Cores>(), Ok(cores));
            assert_eq!(cores.to_string(), text);
        }
        let err = "first".parse::<Cores>().expect_err("not a core");
        assert!(err.contains("auto, all or a core number"), "{err}");
        assert!("-1".parse::<Cores>().is_err());
    }
}
