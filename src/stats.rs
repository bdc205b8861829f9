//! What the batcher reports: flush reports, running totals and health.
//!
//! The totals live in atomics shared by the caller-facing handle, the worker and the
//! flusher, so [`Batcher::stats`](crate::Batcher::stats) and
//! [`Batcher::health`](crate::Batcher::health) answer at once, even while a flush is stuck
//! in a hung database.

use std::time::Duration;

use crate::StoreError;

/// Why a flush happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FlushReason {
    /// The batch reached the batch size.
    Capacity,
    /// The flush interval passed (or, while the store is failing, the retry backoff).
    Scheduled,
    /// The batcher is closing.
    Shutdown,
    /// [`Batcher::flush`](crate::Batcher::flush) asked for it.
    Manual,
}

impl FlushReason {
    /// Every reason, in declaration order. A slice, not an array, so that a new reason
    /// changes its length without breaking code that iterates it.
    ///
    /// ```
    /// use metadata_batcher::FlushReason;
    ///
    /// let labels: Vec<&str> = FlushReason::ALL.iter().map(|r| r.as_str()).collect();
    /// assert_eq!(labels, ["capacity", "scheduled", "shutdown", "manual"]);
    /// ```
    pub const ALL: &'static [FlushReason] = &FlushReason::EACH;

    /// [`ALL`](Self::ALL) as an array, for the crate's per-reason tables.
    pub(crate) const EACH: [FlushReason; 4] = [
        FlushReason::Capacity,
        FlushReason::Scheduled,
        FlushReason::Shutdown,
        FlushReason::Manual,
    ];

    /// The `reason` label value: `"capacity"`, `"scheduled"`, `"shutdown"` or `"manual"`.
    pub fn as_str(self) -> &'static str {
        match self {
            FlushReason::Capacity => "capacity",
            FlushReason::Scheduled => "scheduled",
            FlushReason::Shutdown => "shutdown",
            FlushReason::Manual => "manual",
        }
    }
}

/// What one flush did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlushReport {
    /// Why it ran.
    pub reason: FlushReason,
    /// Distinct (agent, key) entries it carried.
    pub count: usize,
    /// Distinct agents among the entries it stored, each announced once.
    pub agents: usize,
    /// NOTIFY payloads its agents take (at most 363 IDs each). Announcements that queue
    /// behind a slow publish are merged, so fewer payloads may actually be sent.
    pub chunks: usize,
    /// Time from the first store call to the last publish, by the injected clock. In
    /// [`FlushMode::Pipelined`](crate::FlushMode::Pipelined) the publish runs on its own
    /// thread, so this ends with the last store call.
    pub elapsed: Duration,
    /// Entries the store accepted.
    pub stored: usize,
    /// Stored rows the store updated; `stored - updated` were unmatched (not registered, or
    /// older than the stored row).
    pub updated: u64,
    /// Entries the database refused, isolated and dropped.
    pub rejected: usize,
    /// Entries handed back to the batch to be retried: the store was unavailable, or their
    /// statement was canceled (a statement or lock timeout) and could not be split further
    /// in this flush.
    pub retained: usize,
    /// Store calls made: one per chunk (`batch_size` rows, or as sized for a store that
    /// takes more; see [`Capabilities::with_max_batch_rows`](crate::Capabilities::with_max_batch_rows)), plus the calls that
    /// split refused or canceled chunks.
    pub statements: usize,
    /// Payloads whose publish failed. When announcements were merged behind a slow
    /// publish, the failures of the merged publish.
    pub publish_errors: usize,
    /// The last store error, if any call failed.
    pub error: Option<StoreError>,
}

/// Flush counts by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlushCounts {
    /// Flushes because the batch was full.
    pub capacity: u64,
    /// Flushes on the timer.
    pub scheduled: u64,
    /// The final flush.
    pub shutdown: u64,
    /// Flushes asked for with [`Batcher::flush`](crate::Batcher::flush).
    pub manual: u64,
}

/// Running totals since the batcher was built.
///
/// Every accepted key is in exactly one place. While no flush runs (after
/// [`Batcher::sync`](crate::Batcher::sync), say), and after a [`close`](crate::Batcher::close)
/// that met its deadline:
///
/// ```text
/// accepted = queued + batched + in_flight              (waiting)
///          + flushed + superseded                      (done)
///          + rejected + retention_dropped + lost_to_panics + unwritten_at_shutdown   (lost, counted)
/// ```
///
/// [`Stats::settled`] sums the second and third lines. Keys dropped at `add` were never
/// accepted: they are in `dropped` alone. After `close`,
/// `queued`, `batched` and `in_flight` are 0: what was left is `unwritten_at_shutdown`.
/// After a `close` that gave up on a hung store, a call it abandoned may still write rows
/// it counted as unwritten, so the right side may then exceed `accepted`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Keys `add` accepted (queued or taken in by the worker).
    pub accepted: u64,
    /// Keys in the channel, not yet taken in by the worker.
    pub queued: usize,
    /// Distinct entries in the batch, waiting for a flush.
    pub batched: usize,
    /// Entries of the flush in progress not yet written, if any.
    pub in_flight: usize,
    /// Flushes that reached the database, by reason: every store call succeeded, or some
    /// rows were stored before the others were retained.
    pub flushes: FlushCounts,
    /// Entries written.
    pub flushed: u64,
    /// Accepted keys that never needed writing: they met a batched entry of the same
    /// (agent, key) and either replaced it or lost to it (an older `collected_at`).
    pub superseded: u64,
    /// Keys dropped at `add` because the channel was full.
    pub dropped: u64,
    /// Written entries that updated no row (not registered, or older than the stored row).
    pub unmatched: u64,
    /// Failed store calls, panics included.
    pub store_errors: u64,
    /// Statements the store ran again because another writer's transaction conflicted
    /// with them (a deadlock or a serialization failure); see
    /// [`Written::with_conflicts`](crate::Written::with_conflicts). Not counted in `store_errors` unless
    /// the retries ran out.
    pub conflicts: u64,
    /// Failed publishes, panics included.
    pub publish_errors: u64,
    /// Entries dropped, oldest `collected_at` first, because the batch reached its bound.
    pub retention_dropped: u64,
    /// Entries the database refused, isolated and dropped.
    pub rejected: u64,
    /// Entries lost because the store panicked while writing them.
    pub lost_to_panics: u64,
    /// Panics caught in the store or publisher.
    pub panics: u64,
    /// Entries the final flush could not write before `close` returned.
    pub unwritten_at_shutdown: u64,
    /// The most recent flush that carried entries.
    pub last_flush: Option<FlushReport>,
}

impl Stats {
    /// Accepted keys whose fate is settled: written (`flushed`), `superseded`, or lost and
    /// counted (`rejected`, `retention_dropped`, `lost_to_panics`,
    /// `unwritten_at_shutdown`). At rest, `accepted - settled()` is what waits
    /// (`queued + batched + in_flight`); after a `close` that met its deadline, nothing.
    ///
    /// ```
    /// use metadata_batcher::{Batcher, MemoryPubsub, MemoryStore, Metadata};
    /// use uuid::Uuid;
    ///
    /// let batcher = Batcher::builder(MemoryStore::new(), MemoryPubsub::new()).build().unwrap();
    /// let now = std::time::SystemTime::now();
    /// let agent = Uuid::from_u128(1);
    /// batcher.add(agent, vec![Metadata::new("cpu", "1%", "", now)]).unwrap();
    /// batcher.add(agent, vec![Metadata::new("cpu", "2%", "", now)]).unwrap();
    /// batcher.sync();
    /// let stats = batcher.stats();
    /// assert_eq!((stats.accepted, stats.superseded, stats.batched), (2, 1, 1));
    /// assert_eq!(stats.accepted - stats.settled(), stats.batched as u64);
    /// ```
    pub fn settled(&self) -> u64 {
        self.flushed
            + self.superseded
            + self.rejected
            + self.retention_dropped
            + self.lost_to_panics
            + self.unwritten_at_shutdown
    }
}

/// What a readiness probe needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// The worker thread is running (false after `close`, or if it died).
    pub worker_alive: bool,
    /// Flushes in a row that failed: they kept rows back for a retry (the store was
    /// unavailable, or a statement was canceled and its rows could not all be written) or
    /// their store panicked. 0 after a flush that wrote (or saw refused) all it carried.
    /// A flush that wrote some rows but kept locked ones counts as failed, so the locked
    /// rows are retried on the backoff.
    pub consecutive_store_failures: u64,
    /// How long the oldest entry not yet written has waited, by the injected clock.
    pub oldest_unflushed_age: Option<Duration>,
    /// How long the store call running now has run, by the injected clock; `None` between
    /// calls. A hung call shows here before it fails.
    pub store_call_age: Option<Duration>,
}

/// What [`Batcher::close`](crate::Batcher::close) did.
///
/// ```
/// use metadata_batcher::{Batcher, MemoryPubsub, MemoryStore, Metadata};
/// use uuid::Uuid;
///
/// let store = MemoryStore::new();
/// let agent = Uuid::from_u128(1);
/// store.register(agent, ["cpu"]);
/// let batcher = Batcher::builder(store, MemoryPubsub::new()).build().unwrap();
/// batcher.add(agent, vec![Metadata::new("cpu", "1%", "", std::time::SystemTime::now())]).unwrap();
/// let report = batcher.close();
/// assert_eq!((report.written, report.unwritten, report.deadline_hit), (1, 0, false));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CloseReport {
    /// Entries stored while `close` ran: the flush that was in flight and the final flush.
    pub written: u64,
    /// Entries left unwritten; the same number as `Stats::unwritten_at_shutdown`.
    pub unwritten: u64,
    /// Stored agents left unannounced because the publisher had not returned by the final
    /// flush timeout (those it was publishing, and those queued behind it); counted as
    /// failed payloads in `Stats::publish_errors`.
    pub unannounced: u64,
    /// The final flush timeout passed before the batcher finished: the store call in
    /// flight, if any, was interrupted, nothing more was announced, and the threads were
    /// left to finish on their own. The log says what held it: a store call, a store that
    /// kept failing, or the publisher.
    pub deadline_hit: bool,
}
