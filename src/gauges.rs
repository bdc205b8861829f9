//! The health gauges: what [`Batcher::health`](crate::Batcher::health) answers, and the
//! backlog, as Prometheus gauges, so that how stale the table is and whether the store is
//! failing now can be read from `/metrics` alone, without code in the embedding service.
//!
//! A gauge shows the value last set, so something must set these while they change. The
//! worker sets them when a flush completes, the moment they jump ([`Gauges::update`]).
//! Between flushes the oldest entry's age grows on its own, and it goes on growing while a
//! store call hangs and holds the flusher (or, inline, the worker): so a thread of their
//! own, `mdbatch-gauges` (started by `crate::shared::spawn_gauges`), also sets them every
//! [`EVERY`] by the injected clock. It reads only the shared atomics, never waits on the
//! worker, and ends after the worker has.

use std::time::Duration;

use ::metrics::{gauge, Gauge, Label};
use parking_lot::Mutex;

use crate::metrics::names;
use crate::stats::Health;

/// How often the thread sets the gauges: short against any scrape interval (15 s is
/// common), so a scrape sees an age at most a second old; long against what a wake-up
/// costs.
pub(crate) const EVERY: Duration = Duration::from_secs(1);

/// The gauge handles, registered with the batcher's other metrics.
pub(crate) struct Gauges {
    /// Held from reading the totals to setting the last gauge, deliberately: two threads
    /// set these, and without it the one that read first could write last, putting back
    /// a value from before a flush. Taken once per flush and once per tick.
    setting: Mutex<()>,
    oldest_unflushed_age: Gauge,
    consecutive_store_failures: Gauge,
    store_call_age: Gauge,
    pending_entries: Gauge,
    worker_alive: Gauge,
}

impl Gauges {
    pub(crate) fn register(labels: &[Label]) -> Self {
        let plain = || labels.to_vec();
        Gauges {
            setting: Mutex::new(()),
            oldest_unflushed_age: gauge!(names::OLDEST_UNFLUSHED_AGE_SECONDS, plain()),
            consecutive_store_failures: gauge!(names::CONSECUTIVE_STORE_FAILURES, plain()),
            store_call_age: gauge!(names::STORE_CALL_AGE_SECONDS, plain()),
            pending_entries: gauge!(names::PENDING_ENTRIES, plain()),
            worker_alive: gauge!(names::WORKER_ALIVE, plain()),
        }
    }

    /// Sets every gauge from the health and the pending entries that `read` returns, read
    /// under the lock.
    pub(crate) fn update(&self, read: impl FnOnce() -> (Health, usize)) {
        let _setting = self.setting.lock();
        let (health, pending) = read();
        let seconds = |age: Option<Duration>| age.map_or(0.0, |age| age.as_secs_f64());
        self.oldest_unflushed_age
            .set(seconds(health.oldest_unflushed_age));
        self.consecutive_store_failures
            .set(health.consecutive_store_failures as f64);
        self.store_call_age.set(seconds(health.store_call_age));
        self.pending_entries.set(pending as f64);
        self.worker_alive
            .set(if health.worker_alive { 1.0 } else { 0.0 });
    }
}
