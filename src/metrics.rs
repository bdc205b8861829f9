//! Prometheus metrics, through the `metrics` facade, under the Go batcher's names.
//!
//! Every handle is created when the batcher is built, so whatever recorder is current
//! there (the global one, or one installed with `metrics::with_local_recorder`) receives
//! the worker and flusher threads' measurements too. [`prometheus_builder`] returns an
//! exporter builder with the Go histogram buckets already set; nothing binds a port unless
//! the caller asks it to.
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

use ::metrics::{
    counter, describe_counter, describe_histogram, histogram, Counter, Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::FlushReason;

/// The metric names, exactly as Coder's Go batcher exports them (plus three of ours).
pub mod names {
    /// Histogram: keys per agent in each flushed batch.
    pub const BATCH_UTILIZATION: &str = "coderd_agentapi_metadata_batch_utilization";
    /// Histogram: entries in each flushed batch.
    pub const BATCH_SIZE: &str = "coderd_agentapi_metadata_batch_size";
    /// Histogram by `reason`: seconds a flush took, store and publish, by the injected clock.
    pub const FLUSH_DURATION_SECONDS: &str = "coderd_agentapi_metadata_flush_duration_seconds";
    /// Counter by `reason`: flushes whose store call succeeded.
    pub const BATCHES_TOTAL: &str = "coderd_agentapi_metadata_batches_total";
    /// Counter: keys dropped because the channel was full.
    pub const DROPPED_KEYS_TOTAL: &str = "coderd_agentapi_metadata_dropped_keys_total";
    /// Counter: entries written to the store.
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

/// A Prometheus exporter builder with the batcher's histogram buckets set.
///
/// Add your own settings, then `build_recorder()` (or `install_recorder()`); serve
/// `handle.render()` from your service's metrics endpoint.
pub fn prometheus_builder() -> PrometheusBuilder {
    [
        (names::BATCH_UTILIZATION, BATCH_UTILIZATION_BUCKETS),
        (names::BATCH_SIZE, BATCH_SIZE_BUCKETS),
        (names::FLUSH_DURATION_SECONDS, FLUSH_DURATION_BUCKETS),
    ]
    .into_iter()
    .fold(PrometheusBuilder::new(), |builder, (name, buckets)| {
        builder
            .set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)
            .expect("the bucket lists are constants and not empty")
    })
}

/// The batcher's metric handles, registered once at build time.
pub(crate) struct Metrics {
    pub(crate) batch_utilization: Histogram,
    pub(crate) batch_size: Histogram,
    flush_duration: [Histogram; FlushReason::ALL.len()],
    batches: [Counter; FlushReason::ALL.len()],
    pub(crate) dropped_keys: Counter,
    pub(crate) flushed: Counter,
    pub(crate) publish_errors: Counter,
    pub(crate) retention_dropped: Counter,
    pub(crate) rejected: Counter,
    pub(crate) store_errors: Counter,
}

impl Metrics {
    /// Registers every metric with the current recorder.
    pub(crate) fn register() -> Self {
        describe_histogram!(
            names::BATCH_UTILIZATION,
            "Number of metadata keys per agent in each flushed batch."
        );
        describe_histogram!(
            names::BATCH_SIZE,
            "Total number of metadata entries in each flushed batch."
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
        Metrics {
            batch_utilization: histogram!(names::BATCH_UTILIZATION),
            batch_size: histogram!(names::BATCH_SIZE),
            flush_duration: FlushReason::ALL.map(
                |reason| histogram!(names::FLUSH_DURATION_SECONDS, "reason" => reason.as_str()),
            ),
            batches: FlushReason::ALL
                .map(|reason| counter!(names::BATCHES_TOTAL, "reason" => reason.as_str())),
            dropped_keys: counter!(names::DROPPED_KEYS_TOTAL),
            flushed: counter!(names::FLUSHED_TOTAL),
            publish_errors: counter!(names::PUBLISH_ERRORS_TOTAL),
            retention_dropped: counter!(names::RETENTION_DROPPED_TOTAL),
            rejected: counter!(names::REJECTED_TOTAL),
            store_errors: counter!(names::STORE_ERRORS_TOTAL),
        }
    }

    pub(crate) fn flush_duration(&self, reason: FlushReason) -> &Histogram {
        &self.flush_duration[reason as usize]
    }

    pub(crate) fn batches(&self, reason: FlushReason) -> &Counter {
        &self.batches[reason as usize]
    }
}
