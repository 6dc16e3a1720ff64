//! Prometheus metrics, `stardust_`-prefixed, in the text exposition format 0.0.4.
//!
//! A small registry of our own rather than a client library: a handful of counter
//! families and histograms, encoded exactly as Prometheus documents the format, with
//! bounded label sets (routes are the router's patterns, reasons and outcomes are fixed
//! strings). Gauges that mirror the database (tasks by state, ledger totals) are read at
//! scrape time by the handler and appended.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// A counter with labels.
#[derive(Debug, Default)]
pub(crate) struct CounterFamily {
    values: Mutex<BTreeMap<Vec<(&'static str, String)>, u64>>,
}

/// Most label combinations a family keeps (a bound against label explosions).
const MAX_SERIES: usize = 1_000;

impl CounterFamily {
    pub fn inc(&self, labels: &[(&'static str, &str)]) {
        self.add(labels, 1);
    }

    pub fn add(&self, labels: &[(&'static str, &str)], by: u64) {
        let key: Vec<(&'static str, String)> =
            labels.iter().map(|(k, v)| (*k, (*v).to_string())).collect();
        if let Ok(mut m) = self.values.lock() {
            if m.len() >= MAX_SERIES && !m.contains_key(&key) {
                return;
            }
            *m.entry(key).or_default() += by;
        }
    }

    fn encode(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        if let Ok(m) = self.values.lock() {
            for (labels, v) in m.iter() {
                let _ = writeln!(out, "{name}{} {v}", label_text(labels, None));
            }
        }
    }
}

/// A histogram of seconds with fixed buckets.
#[derive(Debug)]
pub(crate) struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

/// Buckets from 1 ms to about 2 min.
pub(crate) const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        let seconds = seconds.max(0.0);
        if let Some(i) = self.bounds.iter().position(|b| seconds <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn encode(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn label_text(labels: &[(&'static str, String)], extra: Option<(&str, &str)>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{}\"", escape(v)));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

/// Appends a gauge family: `values` are (labels, value).
pub(crate) fn gauge(
    out: &mut String,
    name: &str,
    help: &str,
    values: &[(Vec<(&'static str, String)>, f64)],
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (labels, v) in values {
        let _ = writeln!(out, "{name}{} {v}", label_text(labels, None));
    }
}

/// The domain's live metrics (the database-backed gauges are added at scrape time).
#[derive(Debug)]
pub(crate) struct Metrics {
    pub http_requests: CounterFamily,
    pub verification: CounterFamily,
    pub dispatch_latency: Histogram,
    pub end_to_end_latency: Histogram,
    pub heartbeat_latency: Histogram,
    /// Tasks verified since start (drives the dashboard's throughput chart).
    pub verified: AtomicU64,
    /// Times the dispatcher read pending tasks from the database (it keeps them between
    /// rounds, and adds new jobs' tasks without reading).
    pub pending_reads: AtomicU64,
    /// Jobs leased in their own transaction, at submission (nothing else waited for a
    /// node, and one had room).
    pub leased_at_submission: AtomicU64,
    /// Connection gateways' relay links open now.
    pub gateways: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            http_requests: CounterFamily::default(),
            verification: CounterFamily::default(),
            dispatch_latency: Histogram::new(LATENCY_BUCKETS),
            end_to_end_latency: Histogram::new(LATENCY_BUCKETS),
            heartbeat_latency: Histogram::new(LATENCY_BUCKETS),
            verified: AtomicU64::new(0),
            pending_reads: AtomicU64::new(0),
            leased_at_submission: AtomicU64::new(0),
            gateways: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// The in-memory families, encoded.
    pub fn encode(
        &self,
        out: &mut String,
        rejected: &std::collections::HashMap<&'static str, u64>,
    ) {
        self.http_requests.encode(
            out,
            "stardust_http_requests_total",
            "HTTP requests by route pattern and status.",
        );
        self.verification.encode(
            out,
            "stardust_verification_outcomes_total",
            "Verification outcomes per judged replica: agree, disagree, spot_check_passed, spot_check_failed.",
        );
        self.dispatch_latency.encode(
            out,
            "stardust_dispatch_latency_seconds",
            "From a job's submission to each replica's lease.",
        );
        self.end_to_end_latency.encode(
            out,
            "stardust_end_to_end_latency_seconds",
            "From a job's submission to each of its tasks being verified.",
        );
        self.heartbeat_latency.encode(
            out,
            "stardust_heartbeat_latency_seconds",
            "From a heartbeat frame read off a node's socket to its leases renewed and its node row updated.",
        );
        let _ = writeln!(
            out,
            "# HELP stardust_gateways_connected Connection gateways' relay links open now.\n# TYPE stardust_gateways_connected gauge\nstardust_gateways_connected {}",
            self.gateways.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP stardust_dispatch_pending_reads_total Times the dispatcher read pending tasks from the database.\n# TYPE stardust_dispatch_pending_reads_total counter\nstardust_dispatch_pending_reads_total {}",
            self.pending_reads.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP stardust_dispatch_at_submission_total Jobs whose first leases were made in the job's own transaction, at submission (nothing else waited, a node had room).\n# TYPE stardust_dispatch_at_submission_total counter\nstardust_dispatch_at_submission_total {}",
            self.leased_at_submission.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP stardust_rejected_messages_total Refused input by reason.\n# TYPE stardust_rejected_messages_total counter"
        );
        let mut reasons: Vec<_> = rejected.iter().collect();
        reasons.sort();
        for (reason, n) in reasons {
            let _ = writeln!(
                out,
                "stardust_rejected_messages_total{{reason=\"{}\"}} {n}",
                escape(reason)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_is_prometheus_0_0_4() {
        let m = Metrics::default();
        m.http_requests
            .inc(&[("route", "/v1/jobs"), ("status", "201")]);
        m.http_requests
            .inc(&[("route", "/v1/jobs"), ("status", "201")]);
        m.http_requests
            .inc(&[("route", "/v1/x\"y"), ("status", "404")]);
        m.dispatch_latency.observe(0.003);
        m.dispatch_latency.observe(200.0);
        let mut out = String::new();
        let mut rejected = std::collections::HashMap::new();
        rejected.insert("replayed_request", 3);
        m.encode(&mut out, &rejected);
        assert!(
            out.contains("stardust_http_requests_total{route=\"/v1/jobs\",status=\"201\"} 2\n")
        );
        assert!(out.contains("route=\"/v1/x\\\"y\""), "{out}");
        assert!(out.contains("stardust_dispatch_latency_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(out.contains("stardust_dispatch_latency_seconds_bucket{le=\"120\"} 1\n"));
        assert!(out.contains("stardust_dispatch_latency_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(out.contains("stardust_dispatch_latency_seconds_count 2\n"));
        assert!(out.contains("stardust_rejected_messages_total{reason=\"replayed_request\"} 3\n"));
    }

    #[test]
    fn label_sets_are_bounded() {
        let f = CounterFamily::default();
        for i in 0..2 * MAX_SERIES {
            f.inc(&[("route", &i.to_string())]);
        }
        assert_eq!(f.values.lock().map(|m| m.len()).unwrap_or(0), MAX_SERIES);
    }
}
