//! [`Telemetry`]: the running totals and the Prometheus metrics, updated together.
//!
//! Every event that both counts (in [`Stats`]) and measures (in `crate::metrics`) is one
//! call here, so the two cannot drift apart: a dropped key, a stored or refused row, a failed
//! store call, a conflict, a failed publish, a completed flush. The state that only counts
//! (what is queued, batched, in flight) stays in plain atomics the worker and the handle set.
//! The totals live in atomics, so [`Batcher::stats`](crate::Batcher::stats) and
//! [`Batcher::health`](crate::Batcher::health) answer at once, even while a flush is stuck
//! in a hung database.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime};

use ::metrics::Label;
use parking_lot::Mutex;
use uuid::Uuid;

use crate::cancellation::Cancellation;
use crate::gauges::Gauges;
use crate::metrics::{KeysPerAgent, Metrics};
use crate::stats::{FlushCounts, FlushReason, FlushReport, Health, Stats};
use crate::MetadataBatch;

/// Sentinel for "no instant" in the atomics below.
const NONE: u64 = u64::MAX;

/// The totals and the metric handles, shared by the handle, the worker, the flusher and the
/// notifier.
pub(crate) struct Telemetry {
    /// Instants are stored as nanoseconds since this one, the clock's time at build.
    epoch: Instant,
    pub(crate) queued: AtomicUsize,
    /// Keys the worker has taken in; with `queued`, what `add` accepted. Counted by the
    /// worker rather than in `add`, to keep one more shared atomic off the callers' path.
    pub(crate) taken_in: AtomicU64,
    pub(crate) batched: AtomicUsize,
    pub(crate) in_flight: AtomicUsize,
    /// Bytes of the flush in progress not yet written (see `batch::entry_bytes`); counts
    /// against the byte bound.
    pub(crate) in_flight_bytes: AtomicUsize,
    flushes: [AtomicU64; FlushReason::EACH.len()],
    pub(crate) flushed: AtomicU64,
    pub(crate) superseded: AtomicU64,
    dropped: AtomicU64,
    pub(crate) unmatched: AtomicU64,
    store_errors: AtomicU64,
    conflicts: AtomicU64,
    publish_errors: AtomicU64,
    retention_dropped: AtomicU64,
    rejected: AtomicU64,
    pub(crate) lost_to_panics: AtomicU64,
    pub(crate) panics: AtomicU64,
    pub(crate) unwritten_at_shutdown: AtomicU64,
    pub(crate) consecutive_failures: AtomicU64,
    pub(crate) worker_alive: AtomicBool,
    /// When the oldest entry of the batch arrived, and of the flush in progress.
    oldest_batched: AtomicU64,
    oldest_in_flight: AtomicU64,
    /// When the store call running now started.
    store_call_started: AtomicU64,
    /// When `add` last logged dropped keys at warn level.
    pub(crate) last_drop_warning: AtomicU64,
    /// The last flush that carried entries, with its sequence number, so the publisher
    /// thread can add its publish errors once they are known.
    last_flush: Mutex<Option<(u64, FlushReport)>>,
    metrics: Metrics,
    gauges: Gauges,
}

impl Telemetry {
    /// Registers the metrics, each carrying `labels`, with the recorder current on the
    /// calling thread; `interval` is the flush interval, which a gauge shows.
    pub(crate) fn new(epoch: Instant, labels: &[Label], interval: Duration) -> Self {
        Telemetry {
            epoch,
            queued: AtomicUsize::new(0),
            taken_in: AtomicU64::new(0),
            batched: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            in_flight_bytes: AtomicUsize::new(0),
            flushes: Default::default(),
            flushed: AtomicU64::new(0),
            superseded: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            unmatched: AtomicU64::new(0),
            store_errors: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            publish_errors: AtomicU64::new(0),
            retention_dropped: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            lost_to_panics: AtomicU64::new(0),
            panics: AtomicU64::new(0),
            unwritten_at_shutdown: AtomicU64::new(0),
            consecutive_failures: AtomicU64::new(0),
            worker_alive: AtomicBool::new(true),
            oldest_batched: AtomicU64::new(NONE),
            oldest_in_flight: AtomicU64::new(NONE),
            store_call_started: AtomicU64::new(NONE),
            last_drop_warning: AtomicU64::new(NONE),
            last_flush: Mutex::new(None),
            metrics: Metrics::register(labels, interval),
            gauges: Gauges::register(labels),
        }
    }

    /// An instant as stored in the atomics.
    pub(crate) fn encode(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(NONE - 1)
    }

    fn decode(&self, stored: u64) -> Option<Instant> {
        (stored != NONE).then(|| self.epoch + Duration::from_nanos(stored))
    }

    pub(crate) fn set_oldest_batched(&self, at: Option<Instant>) {
        self.oldest_batched
            .store(at.map_or(NONE, |at| self.encode(at)), Relaxed);
    }

    pub(crate) fn set_oldest_in_flight(&self, at: Option<Instant>) {
        self.oldest_in_flight
            .store(at.map_or(NONE, |at| self.encode(at)), Relaxed);
    }

    fn count_flush(&self, reason: FlushReason) {
        self.flushes[reason as usize].fetch_add(1, Relaxed);
    }

    /// The flusher wrote `rows` entries of `bytes` of the flush in progress.
    pub(crate) fn release_in_flight(&self, rows: usize, bytes: usize) {
        let _ = self
            .in_flight
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(rows)));
        let _ = self
            .in_flight_bytes
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(bytes)));
    }

    pub(crate) fn set_store_call_started(&self, at: Option<Instant>) {
        self.store_call_started
            .store(at.map_or(NONE, |at| self.encode(at)), Relaxed);
    }

    fn set_last_flush(&self, seq: u64, report: FlushReport) {
        // A lock, deliberately: a report is several words and is written once per flush.
        *self.last_flush.lock() = Some((seq, report));
    }

    /// Records the publish errors of the flushes after `after` up to `through`, once the
    /// publisher thread has announced them.
    pub(crate) fn set_last_publish_errors(&self, after: u64, through: u64, errors: usize) {
        if let Some((seq, report)) = self.last_flush.lock().as_mut() {
            if *seq > after && *seq <= through {
                report.publish_errors = errors;
            }
        }
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let flushes = |reason: FlushReason| self.flushes[reason as usize].load(Relaxed);
        // Taken in first: the worker counts a message as taken in before it releases its
        // place in the queue, so this order never counts a key twice.
        let taken_in = self.taken_in.load(Relaxed);
        let queued = self.queued.load(Relaxed);
        Stats {
            accepted: taken_in + queued as u64,
            queued,
            batched: self.batched.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            flushes: FlushCounts {
                capacity: flushes(FlushReason::Capacity),
                scheduled: flushes(FlushReason::Scheduled),
                shutdown: flushes(FlushReason::Shutdown),
                manual: flushes(FlushReason::Manual),
            },
            flushed: self.flushed.load(Relaxed),
            superseded: self.superseded.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            unmatched: self.unmatched.load(Relaxed),
            store_errors: self.store_errors.load(Relaxed),
            conflicts: self.conflicts.load(Relaxed),
            publish_errors: self.publish_errors.load(Relaxed),
            retention_dropped: self.retention_dropped.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            lost_to_panics: self.lost_to_panics.load(Relaxed),
            panics: self.panics.load(Relaxed),
            unwritten_at_shutdown: self.unwritten_at_shutdown.load(Relaxed),
            last_flush: self.last_flush.lock().as_ref().map(|(_, r)| r.clone()),
        }
    }

    /// Keys accepted and not yet written: queued, batched, or in the flush in flight.
    pub(crate) fn pending(&self) -> usize {
        self.queued.load(Relaxed) + self.batched.load(Relaxed) + self.in_flight.load(Relaxed)
    }

    pub(crate) fn health(&self, now: Instant) -> Health {
        let oldest = [
            self.decode(self.oldest_batched.load(Relaxed)),
            self.decode(self.oldest_in_flight.load(Relaxed)),
        ]
        .into_iter()
        .flatten()
        .min();
        Health {
            worker_alive: self.worker_alive.load(Relaxed),
            consecutive_store_failures: self.consecutive_failures.load(Relaxed),
            oldest_unflushed_age: oldest.map(|at| now.saturating_duration_since(at)),
            store_call_age: self
                .decode(self.store_call_started.load(Relaxed))
                .map(|at| now.saturating_duration_since(at)),
        }
    }
}

/// The events, each recorded in the totals and the metrics at once.
impl Telemetry {
    /// `add` dropped `keys` keys because the channel was full.
    pub(crate) fn dropped_at_add(&self, keys: u64) {
        self.dropped.fetch_add(keys, Relaxed);
        self.metrics.dropped_keys.increment(keys);
    }

    /// The batch reached its bound and dropped `entries`, oldest first.
    pub(crate) fn retention_dropped(&self, entries: u64) {
        self.retention_dropped.fetch_add(entries, Relaxed);
        self.metrics.retention_dropped.increment(entries);
    }

    /// A statement stored `chunk`, updating `updated` rows, at `committed`: counted at
    /// once, so `stats()` and `close` see a long flush progress. The rows leave the flush in
    /// flight under `cancellation`'s lock (see `Cancellation::moving_rows`); the metrics
    /// (user code, a recorder) are recorded after it.
    pub(crate) fn stored(
        &self,
        chunk: &MetadataBatch,
        updated: u64,
        committed: SystemTime,
        cancellation: &Cancellation,
    ) {
        let rows = chunk.len();
        let bytes = crate::batch::batch_bytes(chunk);
        cancellation.moving_rows(|| {
            self.flushed.fetch_add(rows as u64, Relaxed);
            self.release_in_flight(rows, bytes);
        });
        self.unmatched
            .fetch_add((rows as u64).saturating_sub(updated), Relaxed);
        self.metrics.flushed.increment(rows as u64);
        self.metrics
            .observe_write_lag(&chunk.collected_at, committed);
    }

    /// The database refused `row`, which is dropped.
    pub(crate) fn rejected(&self, row: &MetadataBatch, cancellation: &Cancellation) {
        let bytes = crate::batch::batch_bytes(row);
        cancellation.moving_rows(|| {
            self.rejected.fetch_add(1, Relaxed);
            self.release_in_flight(1, bytes);
        });
        self.metrics.rejected.increment(1);
    }

    /// A store call failed, or a statement of one did.
    pub(crate) fn store_error(&self) {
        self.store_errors.fetch_add(1, Relaxed);
        self.metrics.store_errors.increment(1);
    }

    /// The store ran `conflicts` statements again after a conflict with another writer.
    pub(crate) fn conflicts(&self, conflicts: u64) {
        self.conflicts.fetch_add(conflicts, Relaxed);
        self.metrics.conflicts.increment(conflicts);
    }

    /// `payloads` payloads were not published (failed, or never sent).
    pub(crate) fn publish_errors(&self, payloads: usize) {
        self.publish_errors.fetch_add(payloads as u64, Relaxed);
        self.metrics.publish_errors.increment(payloads as u64);
    }

    /// Keys per agent of a batch about to be stored, as Go observes them before its store
    /// call.
    pub(crate) fn observe_utilization(
        &self,
        agent_ids: &[Uuid],
        keys_per_agent: &mut KeysPerAgent,
    ) {
        self.metrics.observe_utilization(agent_ids, keys_per_agent);
    }

    /// Flush `seq` completed with `report`. A flush that stored rows counts as one, even
    /// when others were kept for a retry (`failed`): with a locked row, every flush is such
    /// a flush, and they must show.
    pub(crate) fn flush_completed(&self, seq: u64, report: &FlushReport, failed: bool) {
        if !failed || report.stored > 0 {
            self.count_flush(report.reason);
            self.metrics.batch_size.record(report.count as f64);
            self.metrics.batches(report.reason).increment(1);
            self.metrics
                .flush_duration(report.reason)
                .record(report.elapsed.as_secs_f64());
        }
        self.set_last_flush(seq, report.clone());
    }

    /// Sets every gauge from the totals as they are at `now`.
    pub(crate) fn update_gauges(&self, now: Instant) {
        self.gauges.update(|| (self.health(now), self.pending()));
    }
}
