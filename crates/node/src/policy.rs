//! Owner policy: how much of the machine Stardust may use.
//!
//! - **CPU limit** as a duty cycle: with limit `f` (0 < f ≤ 1), a slot that ran a task for
//!   `t` rests for `t × (1 − f) / f` before taking the next one, so over time each slot is
//!   busy a fraction `f` of the wall clock.
//! - **When idle**: new work is taken only while the machine's load from *other* processes
//!   stays at or below a threshold (BOINC's default is 25 %). The load is measured from
//!   `/proc/stat` (all CPU time) minus `/proc/self/stat` (this process's CPU time).

use std::time::Duration;

/// How long a slot rests after running for `ran`, under CPU limit `limit`.
pub fn rest_after(ran: Duration, limit: f64) -> Duration {
    if !(limit > 0.0 && limit < 1.0) {
        return Duration::ZERO;
    }
    ran.mul_f64((1.0 - limit) / limit)
}

/// How long queued (not yet started) work waits out a pause before the node lets its leases
/// lapse, so the domain gives the tasks to another node (the browser node does the same).
pub const RELEASE_QUEUED_AFTER: Duration = Duration::from_secs(30);

/// Whether a node paused for `paused_for` (None: not paused) should release its queued work.
pub fn release_queued(paused_for: Option<Duration>) -> bool {
    paused_for.is_some_and(|d| d > RELEASE_QUEUED_AFTER)
}

/// CPU time counters at one instant, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuSample {
    /// Busy time of all CPUs (everything but idle and iowait).
    pub busy: u64,
    /// Total time of all CPUs.
    pub total: u64,
    /// This process's user + system time.
    pub own: u64,
}

/// Load from other processes between two samples, in `[0, 1]`.
pub fn foreign_load(before: CpuSample, after: CpuSample) -> f64 {
    let total = after.total.saturating_sub(before.total);
    if total == 0 {
        return 0.0;
    }
    let busy = after.busy.saturating_sub(before.busy);
    let own = after.own.saturating_sub(before.own);
    (busy.saturating_sub(own) as f64 / total as f64).clamp(0.0, 1.0)
}

/// Reads the counters (Linux); `None` elsewhere.
pub fn sample() -> Option<CpuSample> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = cpu
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    if fields.len() < 5 {
        return None;
    }
    let total: u64 = fields.iter().sum();
    let idle = fields[3] + fields[4];
    let own_stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = own_stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    let own = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(CpuSample {
        busy: total - idle,
        total,
        own,
    })
}

/// The idle gate: pauses when foreign load goes above the threshold, resumes at or below it.
#[derive(Debug, Clone)]
pub struct IdleGate {
    threshold: f64,
    last: Option<CpuSample>,
    paused: bool,
}

impl IdleGate {
    /// A gate with a threshold in `[0, 1]` (0.25 is BOINC's default).
    pub fn new(threshold: f64) -> Self {
        Self {
            threshold,
            last: None,
            paused: false,
        }
    }

    /// Feeds a sample; returns whether work should be paused now.
    pub fn update(&mut self, now: CpuSample) -> bool {
        if let Some(before) = self.last {
            self.paused = foreign_load(before, now) > self.threshold;
        }
        self.last = Some(now);
        self.paused
    }

    /// Whether work is paused.
    pub fn paused(&self) -> bool {
        self.paused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duty_cycle() {
        assert_eq!(rest_after(Duration::from_secs(3), 1.0), Duration::ZERO);
        assert!(!release_queued(None));
        assert!(!release_queued(Some(Duration::from_secs(5))));
        assert!(release_queued(Some(
            RELEASE_QUEUED_AFTER + Duration::from_secs(1)
        )));
        assert_eq!(
            rest_after(Duration::from_secs(3), 0.5),
            Duration::from_secs(3)
        );
        assert_eq!(
            rest_after(Duration::from_secs(1), 0.25),
            Duration::from_secs(3)
        );
        assert_eq!(
            rest_after(Duration::from_secs(1), 0.0),
            Duration::ZERO,
            "0 means no limit set"
        );
    }

    #[test]
    fn foreign_load_excludes_our_own_cpu_time() {
        let a = CpuSample {
            busy: 100,
            total: 1000,
            own: 50,
        };
        // 400 ticks passed, 300 busy, 200 of them ours: foreign load 100/400.
        let b = CpuSample {
            busy: 400,
            total: 1400,
            own: 250,
        };
        assert!((foreign_load(a, b) - 0.25).abs() < 1e-9);
        assert_eq!(foreign_load(a, a), 0.0);
    }

    #[test]
    fn idle_gate_pauses_above_the_threshold_and_resumes_below() {
        let mut g = IdleGate::new(0.25);
        let mut t = CpuSample::default();
        assert!(!g.update(t), "no decision from one sample");
        // Someone else uses 50 % of the machine.
        t = CpuSample {
            busy: t.busy + 50,
            total: t.total + 100,
            own: t.own,
        };
        assert!(g.update(t));
        // We use 80 %, others 10 %: not our own load that pauses us.
        t = CpuSample {
            busy: t.busy + 90,
            total: t.total + 100,
            own: t.own + 80,
        };
        assert!(!g.update(t));
        assert!(!g.paused());
    }

    #[test]
    fn real_counters_are_readable_here() {
        let s = sample().expect("/proc/stat and /proc/self/stat on Linux");
        assert!(s.total >= s.busy);
    }
}
