//! Prometheus metrics, through the `metrics` facade, under the Go batcher's names.
//!
//! Every handle is created when the batcher is built, so whatever recorder is current
//! there (the global one, or one installed with `metrics::with_local_recorder`) receives
//! the worker and flusher threads' measurements too. [`prometheus_builder`] returns an
//! exporter builder with the Go histogram buckets already set; nothing binds a port unless
//! the caller asks it to.
//!
//! The seven upstream metrics carry the names, buckets and HELP texts of the seed's Go
//! version (`metadata_batcher_metrics.go`); `docs/metrics.md` says, per metric, where the
//! crate measures differently and why. The crate's own add what Go's cannot show: how far
//! the table lags (the write lag, the oldest entry not yet written) and whether the store is
//! failing now, so that an operator tells "behind" from "down" from "dropping" from
//! `/metrics` alone; `crate::gauges` keeps their gauges current. `crate::telemetry` records
//! each event here and in the totals with one call. Several batchers in one
//! process tell their series apart with constant labels
//! ([`Builder::metric_labels`](crate::Builder::metric_labels)); without them the series are
//! unlabelled, as Go's are.
//!
//! ```
//! use metadata_batcher::metrics::{self, names};
//!
//! let recorder = metrics::prometheus_builder().build_recorder();
//! let handle = recorder.handle();
//! ::metrics::with_local_recorder(&recorder, || {
//!     ::metrics::counter!(names::DROPPED_KEYS_TOTAL).increment(2);
//! });
//! assert!(handle.render().contains("coderd_agentapi_metadata_dropped_keys_total 2"));
//! ```

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use ::metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Histogram, Label, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use uuid::Uuid;

use crate::FlushReason;

/// The metric names, exactly as Coder's Go batcher exports them (plus ours, marked so).
pub mod names {
    /// Histogram: keys per agent in each batch, observed before the store call.
    pub const BATCH_UTILIZATION: &str = "coderd_agentapi_metadata_batch_utilization";
    /// Histogram: entries in each batch whose flush succeeded.
    pub const BATCH_SIZE: &str = "coderd_agentapi_metadata_batch_size";
    /// Histogram by `reason`: seconds a flush took, store and publish, by the injected clock.
    pub const FLUSH_DURATION_SECONDS: &str = "coderd_agentapi_metadata_flush_duration_seconds";
    /// Counter by `reason`: flushes whose store call succeeded.
    pub const BATCHES_TOTAL: &str = "coderd_agentapi_metadata_batches_total";
    /// Counter: keys dropped because the channel was full.
    pub const DROPPED_KEYS_TOTAL: &str = "coderd_agentapi_metadata_dropped_keys_total";
    /// Counter: entries written to the store (including those of a flush that failed later).
    pub const FLUSHED_TOTAL: &str = "coderd_agentapi_metadata_flushed_total";
    /// Counter: payloads whose publish failed.
    pub const PUBLISH_ERRORS_TOTAL: &str = "coderd_agentapi_metadata_publish_errors_total";
    /// Counter (ours): entries dropped because the batch reached its bound while the store
    /// was failing or slow; the oldest `collected_at` go first.
    pub const RETENTION_DROPPED_TOTAL: &str = "coderd_agentapi_metadata_retention_dropped_total";
    /// Counter (ours): entries the database refused, isolated by splitting the batch.
    pub const REJECTED_TOTAL: &str = "coderd_agentapi_metadata_rejected_total";
    /// Counter (ours): failed store calls, including panics of the store.
    pub const STORE_ERRORS_TOTAL: &str = "coderd_agentapi_metadata_store_errors_total";
    /// Counter (ours): statements run again because another writer's transaction
    /// conflicted with them (deadlock, serialization failure).
    pub const STORE_CONFLICTS_TOTAL: &str = "coderd_agentapi_metadata_store_conflicts_total";
    /// Histogram (ours): seconds from each written row's `collected_at` to the end of the
    /// statement that wrote it.
    pub const WRITE_LAG_SECONDS: &str = "coderd_agentapi_metadata_write_lag_seconds";
    /// Gauge (ours): seconds the oldest entry accepted but not yet written has waited
    /// ([`Health::oldest_unflushed_age`](crate::Health::oldest_unflushed_age)); 0 when none
    /// waits.
    pub const OLDEST_UNFLUSHED_AGE_SECONDS: &str =
        "coderd_agentapi_metadata_oldest_unflushed_age_seconds";
    /// Gauge (ours): flushes in a row that failed
    /// ([`Health::consecutive_store_failures`](crate::Health::consecutive_store_failures)).
    pub const CONSECUTIVE_STORE_FAILURES: &str =
        "coderd_agentapi_metadata_consecutive_store_failures";
    /// Gauge (ours): seconds the store call running now has run
    /// ([`Health::store_call_age`](crate::Health::store_call_age)); 0 when none runs.
    pub const STORE_CALL_AGE_SECONDS: &str = "coderd_agentapi_metadata_store_call_age_seconds";
    /// Gauge (ours): keys accepted and not yet written: queued, batched or in the flush in
    /// flight.
    pub const PENDING_ENTRIES: &str = "coderd_agentapi_metadata_pending_entries";
    /// Gauge (ours): 1 while the worker thread runs, 0 once it has ended.
    pub const WORKER_ALIVE: &str = "coderd_agentapi_metadata_worker_alive";
    /// Gauge (ours): the flush interval in seconds, as configured; what the shipped
    /// stale-table alert measures the oldest entry's age against.
    pub const FLUSH_INTERVAL_SECONDS: &str = "coderd_agentapi_metadata_flush_interval_seconds";
}

/// Buckets of [`names::BATCH_UTILIZATION`], as in Go.
pub const BATCH_UTILIZATION_BUCKETS: &[f64] = &[
    1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 15.0, 20.0, 40.0, 80.0, 160.0,
];
/// Buckets of [`names::BATCH_SIZE`], as in Go.
pub const BATCH_SIZE_BUCKETS: &[f64] = &[
    10.0, 25.0, 50.0, 100.0, 150.0, 200.0, 250.0, 300.0, 350.0, 400.0, 450.0, 500.0,
];
/// Buckets of [`names::FLUSH_DURATION_SECONDS`], as in Go.
pub const FLUSH_DURATION_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
/// Buckets of [`names::WRITE_LAG_SECONDS`]: from a millisecond (an agent on the same host,
/// a capacity flush) through the flush interval (5 s by default) to the five minutes of an
/// outage worth paging for; beyond that, `+Inf` and the oldest-entry gauge tell the rest.
pub const WRITE_LAG_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// A Prometheus exporter builder with the batcher's histogram buckets set.
///
/// Add your own settings, then `build_recorder()` (or `install_recorder()`); serve
/// `handle.render()` from your service's metrics endpoint.
pub fn prometheus_builder() -> PrometheusBuilder {
    [
        (names::BATCH_UTILIZATION, BATCH_UTILIZATION_BUCKETS),
        (names::BATCH_SIZE, BATCH_SIZE_BUCKETS),
        (names::FLUSH_DURATION_SECONDS, FLUSH_DURATION_BUCKETS),
        (names::WRITE_LAG_SECONDS, WRITE_LAG_BUCKETS),
    ]
    .into_iter()
    .fold(PrometheusBuilder::new(), |builder, (name, buckets)| {
        builder
            .set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)
            .expect("the bucket lists are constants and not empty")
    })
}

/// Label names the batcher's own series use, or Prometheus reserves for histograms and
/// summaries: a constant label of the same name would make the exposition invalid.
const RESERVED_LABELS: [&str; 3] = ["reason", "le", "quantile"];

/// Why a constant label cannot be used, or `None` when `labels` are fine: each name must be
/// a Prometheus label name (`[a-zA-Z_][a-zA-Z0-9_]*`, not starting with `__`), not one the
/// batcher uses itself, and given once.
pub(crate) fn label_problem(labels: &[Label]) -> Option<(String, &'static str)> {
    for (index, label) in labels.iter().enumerate() {
        let name = label.key();
        let mut chars = name.chars();
        let valid = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        let problem = if !valid {
            "is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)"
        } else if name.starts_with("__") {
            "starts with __, which Prometheus reserves"
        } else if RESERVED_LABELS.contains(&name) {
            "is a label the batcher's own series use (reason, le, quantile)"
        } else if labels[..index].iter().any(|earlier| earlier.key() == name) {
            "is given twice"
        } else {
            continue;
        };
        return Some((name.to_owned(), problem));
    }
    None
}

/// Keys per agent in one batch: the flusher keeps one map to reuse its allocation.
pub(crate) type KeysPerAgent = HashMap<Uuid, u32, foldhash::fast::RandomState>;

/// The batcher's metric handles, registered once at build time.
pub(crate) struct Metrics {
    batch_utilization: Histogram,
    pub(crate) batch_size: Histogram,
    flush_duration: [Histogram; FlushReason::EACH.len()],
    batches: [Counter; FlushReason::EACH.len()],
    pub(crate) dropped_keys: Counter,
    pub(crate) flushed: Counter,
    pub(crate) publish_errors: Counter,
    pub(crate) retention_dropped: Counter,
    pub(crate) rejected: Counter,
    pub(crate) store_errors: Counter,
    pub(crate) conflicts: Counter,
    write_lag: Histogram,
}

impl Metrics {
    /// Registers every metric with the current recorder, each series carrying `labels`
    /// (the per-reason ones `labels` plus `reason`); the interval gauge is set at once.
    pub(crate) fn register(labels: &[Label], interval: Duration) -> Self {
        describe();
        let plain = || labels.to_vec();
        let by_reason = |reason: FlushReason| {
            let mut all = labels.to_vec();
            all.push(Label::new("reason", reason.as_str()));
            all
        };
        // No handle kept: the value never changes.
        gauge!(names::FLUSH_INTERVAL_SECONDS, plain()).set(interval.as_secs_f64());
        Metrics {
            batch_utilization: histogram!(names::BATCH_UTILIZATION, plain()),
            batch_size: histogram!(names::BATCH_SIZE, plain()),
            flush_duration: FlushReason::EACH
                .map(|reason| histogram!(names::FLUSH_DURATION_SECONDS, by_reason(reason))),
            batches: FlushReason::EACH
                .map(|reason| counter!(names::BATCHES_TOTAL, by_reason(reason))),
            dropped_keys: counter!(names::DROPPED_KEYS_TOTAL, plain()),
            flushed: counter!(names::FLUSHED_TOTAL, plain()),
            publish_errors: counter!(names::PUBLISH_ERRORS_TOTAL, plain()),
            retention_dropped: counter!(names::RETENTION_DROPPED_TOTAL, plain()),
            rejected: counter!(names::REJECTED_TOTAL, plain()),
            store_errors: counter!(names::STORE_ERRORS_TOTAL, plain()),
            conflicts: counter!(names::STORE_CONFLICTS_TOTAL, plain()),
            write_lag: histogram!(names::WRITE_LAG_SECONDS, plain()),
        }
    }

    /// Observes the write lag of each row of a statement that ended at `committed`, from
    /// its `collected_at`: the agent's own clock, so a row stamped ahead of the server's
    /// (clock skew) counts as written at once rather than not at all.
    ///
    /// One observation per row, after its statement, on the thread that flushes (the
    /// flusher's; the worker's only in `FlushMode::Inline`), never on the callers' path.
    /// A statement's rows are sorted by agent, and an agent's keys usually share one
    /// `collected_at`: the lag is computed once per run of equal timestamps and recorded
    /// for the run's rows at once (1.7 ns a row instead of 9.5 without a recorder, for 10
    /// keys an agent).
    pub(crate) fn observe_write_lag(&self, collected_at: &[SystemTime], committed: SystemTime) {
        let mut rows = collected_at.iter().peekable();
        while let Some(&at) = rows.next() {
            let mut run = 1;
            while rows.next_if(|&&next| next == at).is_some() {
                run += 1;
            }
            let lag = committed.duration_since(at).unwrap_or_default();
            self.write_lag.record_many(lag.as_secs_f64(), run);
        }
    }

    /// Observes keys per agent for every agent of the batch about to be stored, as Go does
    /// before its store call: a flush that then fails is still seen, and only once, however
    /// many statements isolating refused rows take.
    pub(crate) fn observe_utilization(
        &self,
        agent_ids: &[Uuid],
        keys_per_agent: &mut KeysPerAgent,
    ) {
        keys_per_agent.clear();
        for &agent_id in agent_ids {
            *keys_per_agent.entry(agent_id).or_insert(0) += 1;
        }
        for &keys in keys_per_agent.values() {
            self.batch_utilization.record(keys);
        }
    }

    pub(crate) fn flush_duration(&self, reason: FlushReason) -> &Histogram {
        &self.flush_duration[reason as usize]
    }

    pub(crate) fn batches(&self, reason: FlushReason) -> &Counter {
        &self.batches[reason as usize]
    }
}

/// The HELP texts. The first seven are the seed's, word for word (`tests/metrics.rs`
/// compares them with the seed's strings); the rest are ours, in the seed's style.
fn describe() {
    describe_histogram!(
        names::BATCH_UTILIZATION,
        "Number of metadata keys per agent in each batch, updated before flushes."
    );
    describe_histogram!(
        names::BATCH_SIZE,
        "Total number of metadata entries in each batch, updated before flushes."
    );
    describe_histogram!(
        names::FLUSH_DURATION_SECONDS,
        Unit::Seconds,
        "Time taken to flush metadata batch to database and pubsub."
    );
    describe_counter!(
        names::BATCHES_TOTAL,
        "Total number of metadata batches flushed."
    );
    describe_counter!(
        names::DROPPED_KEYS_TOTAL,
        "Total number of metadata keys dropped due to capacity limits."
    );
    describe_counter!(
        names::FLUSHED_TOTAL,
        "Total number of unique metadatas flushed."
    );
    describe_counter!(
        names::PUBLISH_ERRORS_TOTAL,
        "Total number of metadata batch pubsub publish calls that have resulted in an error."
    );
    describe_counter!(
        names::RETENTION_DROPPED_TOTAL,
        "Metadata entries dropped, oldest first, because the batch reached its bound while the store was failing or slow."
    );
    describe_counter!(
        names::REJECTED_TOTAL,
        "Metadata entries the database refused, isolated and dropped."
    );
    describe_counter!(
        names::STORE_ERRORS_TOTAL,
        "Metadata store calls that failed."
    );
    describe_counter!(
        names::STORE_CONFLICTS_TOTAL,
        "Metadata statements run again because another writer's transaction conflicted with them (deadlock or serialization failure)."
    );
    describe_histogram!(
        names::WRITE_LAG_SECONDS,
        Unit::Seconds,
        "Time from each metadata entry's collected_at to the write that stored it."
    );
    describe_gauge!(
        names::OLDEST_UNFLUSHED_AGE_SECONDS,
        Unit::Seconds,
        "Age of the oldest metadata entry accepted but not yet written, 0 if none is waiting."
    );
    describe_gauge!(
        names::CONSECUTIVE_STORE_FAILURES,
        "Number of metadata flushes in a row that failed to write their entries."
    );
    describe_gauge!(
        names::STORE_CALL_AGE_SECONDS,
        Unit::Seconds,
        "Time the metadata store call in progress has been running, 0 if none is."
    );
    describe_gauge!(
        names::PENDING_ENTRIES,
        "Number of metadata keys accepted but not yet written."
    );
    describe_gauge!(
        names::WORKER_ALIVE,
        "Whether the metadata batcher's worker thread is running (1) or has ended (0)."
    );
    describe_gauge!(
        names::FLUSH_INTERVAL_SECONDS,
        Unit::Seconds,
        "Configured interval between scheduled metadata flushes."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_names_are_checked() {
        let problem = |pairs: &[(&'static str, &'static str)]| {
            let labels: Vec<Label> = pairs.iter().map(|&(k, v)| Label::new(k, v)).collect();
            label_problem(&labels).map(|(name, _)| name)
        };
        assert_eq!(problem(&[]), None);
        assert_eq!(problem(&[("batcher", "a"), ("_zone2", "b")]), None);
        for bad in ["", "2x", "a-b", "__x", "reason", "le", "quantile"] {
            assert_eq!(problem(&[(bad, "v")]), Some(bad.to_owned()), "{bad:?}");
        }
        assert_eq!(
            problem(&[("batcher", "a"), ("batcher", "b")]),
            Some("batcher".to_owned())
        );
    }
}
