//! [`Batcher`]: the handle callers share, and the life of an update.
//!
//! `add` validates a call, reserves room for its keys in the channel's budget and sends the
//! caller's vector to the worker in one message; it never waits. Everything after that
//! happens on the worker thread ([`crate::worker`]) and the flusher thread
//! ([`crate::flusher`]). `sync`, `flush` and `close` are control messages that carry
//! their own reply channel, so the handle holds no lock the worker could need.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{select, Receiver, Sender, TryRecvError, TrySendError};
use parking_lot::Mutex;
use uuid::Uuid;

use crate::announcer::Announcer;
use crate::builder::Builder;
use crate::flusher::Flusher;
use crate::panic::panic_message;
use crate::shared::Shared;
use crate::worker::{Control, Flushing, Update, Worker, WorkerConfig, WARNING_EVERY};
use crate::{
    CloseReport, FlushMode, FlushReport, Health, Interrupt, InvalidMetadata, Metadata, Publisher,
    Stats, Store,
};

/// Batches metadata updates and flushes them to a [`Store`], announcing changed agents on
/// a [`Publisher`].
///
/// Share it (`Arc<Batcher>` or `&Batcher`) between the threads that receive updates;
/// dropping the last one closes it.
///
/// ```
/// use std::time::SystemTime;
/// use metadata_batcher::{Batcher, MemoryPubsub, MemoryStore, Metadata, METADATA_BATCH_CHANNEL};
/// use uuid::Uuid;
///
/// let store = MemoryStore::new();
/// let pubsub = MemoryPubsub::new();
/// let announcements = pubsub.subscribe(METADATA_BATCH_CHANNEL);
/// let agent = Uuid::from_u128(7);
/// store.register(agent, ["cpu", "mem"]);
///
/// let batcher = Batcher::builder(store.clone(), pubsub).build().unwrap();
/// let now = SystemTime::now();
/// let report = batcher.add(agent, vec![
///     Metadata::new("cpu", "42%", "", now),
///     Metadata::new("mem", "1.2 GiB", "", now),
/// ]).unwrap();
/// assert_eq!(report.accepted, 2);
///
/// let flush = batcher.flush().expect("two entries were batched");
/// assert_eq!((flush.count, flush.agents, flush.chunks), (2, 1, 1));
/// assert_eq!(store.get(agent, "cpu").unwrap().value, "42%");
/// assert!(announcements.try_recv().is_ok());
/// batcher.close();
/// ```
pub struct Batcher {
    updates: Sender<Update>,
    /// Wakes a worker that is collecting updates on its own schedule; see `add`.
    doorbell: Sender<()>,
    control: Sender<Control>,
    /// Disconnected when the worker thread has ended.
    worker_ended: Receiver<()>,
    /// Disconnected when `close` returns: `sync` and `flush` never wait past it.
    closed: Receiver<()>,
    close_signal: Mutex<Option<Sender<()>>>,
    channel_capacity: usize,
    final_flush_timeout: Duration,
    shared: Arc<Shared>,
    worker: Mutex<Option<thread::JoinHandle<()>>>,
    /// What the first `close` did; later calls return it again.
    close_report: Mutex<CloseReport>,
}

/// What `add` did with a call's keys.
///
/// When the channel has room for only part of a call, the first `accepted` entries of the
/// call's vector are queued and the rest are dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AddReport {
    /// Keys queued for the batch: the call's first `accepted` entries.
    pub accepted: usize,
    /// Keys dropped because the channel was full: the call's last `dropped` entries;
    /// counted in `Stats::dropped`.
    pub dropped: usize,
}

/// Why `add` refused a call; nothing of a refused call is queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddError {
    /// The batcher is closed (or closing).
    Closed,
    /// An entry of the call is invalid.
    Invalid {
        /// Its position in the call's vector.
        index: usize,
        /// What is wrong with it.
        problem: InvalidMetadata,
    },
}

impl fmt::Display for AddError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddError::Closed => {
                f.write_str("the metadata batcher is closed; updates can no longer be accepted")
            }
            AddError::Invalid { index, problem } => write!(
                f,
                "metadata entry {index} is invalid: {problem}; nothing from this call was queued"
            ),
        }
    }
}

impl std::error::Error for AddError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AddError::Invalid { problem, .. } => Some(problem),
            AddError::Closed => None,
        }
    }
}

impl Batcher {
    /// Starts configuring a batcher that writes to `store` and announces on `publisher`.
    pub fn builder(store: impl Store, publisher: impl Publisher) -> Builder {
        Builder::new(store, publisher)
    }

    pub(crate) fn start(builder: Builder) -> Result<Batcher, crate::BuildError> {
        let channel_capacity = builder
            .channel_capacity
            .unwrap_or(builder.batch_size * crate::builder::DEFAULT_CHANNEL_MULTIPLIER);
        let config = WorkerConfig {
            batch_size: builder.batch_size,
            channel_capacity,
            interval: builder.interval,
            max_pending: builder.max_pending.unwrap_or(usize::MAX),
            max_pending_bytes: builder.max_pending_bytes,
            retry_backoff_initial: builder.retry_backoff_initial,
            retry_backoff_max: builder.retry_backoff_max,
        };
        let shared = Shared::new(builder.clock, &builder.metric_labels, builder.interval);
        crate::shared::spawn_gauges(&shared).map_err(crate::BuildError::Spawn)?;
        // Every message carries at least one key, so a channel of `channel_capacity`
        // messages never refuses a send that the key budget admitted.
        let (updates, updates_rx) = crossbeam_channel::bounded(channel_capacity);
        let (control, control_rx) = crossbeam_channel::unbounded();
        let (doorbell, doorbell_rx) = crossbeam_channel::bounded(1);
        // Armed here, not on the worker thread, so a test's first `advance` cannot race it.
        let timer = shared.clock.after(config.interval);

        // Thread names stay within 15 bytes, all Linux keeps, so `top -H` tells them apart.
        let flushing = match builder.flush_mode {
            FlushMode::Inline => Flushing::Inline(Flusher::new(
                builder.store,
                Announcer::inline(builder.publisher),
                shared.clone(),
                builder.batch_size,
            )),
            FlushMode::Pipelined => {
                let announcer = Announcer::spawn(builder.publisher, shared.clone())
                    .map_err(crate::BuildError::Spawn)?;
                let flusher =
                    Flusher::new(builder.store, announcer, shared.clone(), builder.batch_size);
                let (jobs, jobs_rx) = crossbeam_channel::bounded(1);
                let (completed_tx, completed) = crossbeam_channel::bounded(1);
                let thread = thread::Builder::new()
                    .name("mdbatch-flush".into())
                    .spawn(move || flusher.run(jobs_rx, completed_tx))
                    .map_err(crate::BuildError::Spawn)?;
                Flushing::Thread {
                    jobs: Some(jobs),
                    completed,
                    thread: Some(thread),
                }
            }
        };
        let worker = Worker::new(
            config,
            shared.clone(),
            updates_rx,
            doorbell_rx,
            control_rx,
            timer,
            flushing,
        );
        let (worker_alive, worker_ended) = crossbeam_channel::bounded::<()>(0);
        let worker = thread::Builder::new()
            .name("mdbatch-worker".into())
            .spawn(move || {
                let _alive = worker_alive;
                worker.run()
            })
            .map_err(crate::BuildError::Spawn)?;
        let (close_signal, closed) = crossbeam_channel::bounded(0);
        Ok(Batcher {
            updates,
            doorbell,
            control,
            worker_ended,
            closed,
            close_signal: Mutex::new(Some(close_signal)),
            channel_capacity,
            final_flush_timeout: builder.final_flush_timeout,
            shared,
            worker: Mutex::new(Some(worker)),
            close_report: Mutex::new(CloseReport::default()),
        })
    }

    /// Queues an agent's updates; never blocks.
    ///
    /// The whole call is checked first: an invalid entry refuses the call with
    /// [`AddError::Invalid`] and queues nothing. Over-long values and errors are cut (see
    /// [`MAX_VALUE_BYTES`](crate::MAX_VALUE_BYTES)). Keys that do not fit in the channel are
    /// dropped and counted; the report says how many.
    pub fn add(&self, agent_id: Uuid, mut metadata: Vec<Metadata>) -> Result<AddReport, AddError> {
        // One pass: validity decides the whole call, and whether any entry needs cutting
        // spares the common call a second pass.
        let mut within_size_limits = true;
        for (index, entry) in metadata.iter().enumerate() {
            entry
                .validate()
                .map_err(|problem| AddError::Invalid { index, problem })?;
            within_size_limits &= entry.within_size_limits();
        }
        // `try_read` fails only while `close` holds or waits for the write guard.
        let intake = self.shared.intake.try_read().ok_or(AddError::Closed)?;
        if !*intake {
            return Err(AddError::Closed);
        }
        let total = metadata.len();
        let (mut accepted, queued_before) = self.reserve(total);
        if accepted > 0 {
            metadata.truncate(accepted);
            if !within_size_limits {
                metadata.iter_mut().for_each(Metadata::enforce_size_limits);
            }
            match self.updates.try_send(Update { agent_id, metadata }) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    // Cannot happen: every message holds at least one key of the budget, so
                    // the channel has a slot for each. Were it to, the keys are dropped and
                    // counted, not the caller's thread panicked.
                    debug_assert!(false, "the key budget admitted more messages than fit");
                    tracing::error!("metadata channel full despite the key budget; keys dropped");
                    self.shared.telemetry.queued.fetch_sub(accepted, Relaxed);
                    accepted = 0;
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.shared.telemetry.queued.fetch_sub(accepted, Relaxed);
                    return Err(AddError::Closed);
                }
            }
            // The worker collects updates on its own schedule while they keep coming (no
            // wake-up per call); the call that fills a quarter of the channel wakes it.
            let alarm = self.channel_capacity / 4;
            if queued_before < alarm && queued_before + accepted >= alarm {
                let _ = self.doorbell.try_send(());
            }
        }
        drop(intake);
        let dropped = total - accepted;
        if dropped > 0 {
            self.count_dropped(agent_id, dropped);
        }
        Ok(AddReport { accepted, dropped })
    }

    /// Reserves room for up to `wanted` keys in the channel's budget; returns how many fit.
    /// Also returns how many keys were queued before.
    fn reserve(&self, wanted: usize) -> (usize, usize) {
        let queued = &self.shared.telemetry.queued;
        let mut current = queued.load(Relaxed);
        loop {
            let fits = wanted.min(self.channel_capacity.saturating_sub(current));
            if fits == 0 {
                return (0, current);
            }
            match queued.compare_exchange_weak(current, current + fits, Relaxed, Relaxed) {
                Ok(_) => return (fits, current),
                Err(actual) => current = actual,
            }
        }
    }

    fn count_dropped(&self, agent_id: Uuid, dropped: usize) {
        self.shared.telemetry.dropped_at_add(dropped as u64);
        let now = self.shared.telemetry.encode(self.shared.clock.now());
        let last = self.shared.telemetry.last_drop_warning.load(Relaxed);
        let due = last == u64::MAX || now.saturating_sub(last) >= WARNING_EVERY.as_nanos() as u64;
        if due
            && self
                .shared
                .telemetry
                .last_drop_warning
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            tracing::warn!(
                %agent_id,
                channel_size = self.channel_capacity,
                dropped_count = dropped,
                "metadata channel at capacity, dropped updates"
            );
        } else {
            tracing::debug!(
                %agent_id,
                channel_size = self.channel_capacity,
                dropped_count = dropped,
                "metadata channel at capacity, dropped updates"
            );
        }
    }

    /// Returns once the worker has taken in every update accepted before the call, has
    /// handled every timer that had fired before the call, and every flush those triggered
    /// has completed and been announced.
    ///
    /// With a [`MockClock`](crate::MockClock), `clock.advance(interval); batcher.sync();`
    /// leaves the scheduled flush complete. Returns at once after `close`.
    pub fn sync(&self) {
        let (reply, done) = crossbeam_channel::bounded(1);
        if self.control.send(Control::Sync(reply)).is_ok() {
            self.answer(&done);
        }
    }

    /// Waits for the worker's answer, but not past `close`'s return. An answer dropped
    /// unsent means the worker panicked while handling the request: what the caller waits
    /// for is settled once the dying worker has counted what it held and ended.
    fn answer<T>(&self, answer: &Receiver<T>) -> Option<T> {
        select! {
            recv(answer) -> answered => answered.ok().or_else(|| {
                select! {
                    recv(self.worker_ended) -> _ => {}
                    recv(self.closed) -> _ => {}
                }
                None
            }),
            // Both may be ready: `close` answers what it can before it returns.
            recv(self.closed) -> _ => answer.try_recv().ok(),
        }
    }

    /// Flushes now (reason `manual`) everything accepted before the call, including
    /// entries kept from failed flushes, without waiting out a retry backoff. Blocks until
    /// the flush is done and its agents announced (the next flush does not wait for that
    /// announcement; only this caller does); `None` when there was nothing to flush or the
    /// batcher is closed.
    ///
    /// The wait is bounded by the store's and the publisher's own deadlines (the batcher
    /// cannot interrupt a publisher; [`PgPublisher`](crate::postgres::PgPublisher) has a
    /// publish deadline), and by `close`: once `close` returns, a `flush` still waiting
    /// returns `None`, and so does `sync`.
    pub fn flush(&self) -> Option<FlushReport> {
        let (reply, report) = crossbeam_channel::bounded(1);
        self.control.send(Control::Flush(reply)).ok()?;
        self.answer(&report).flatten()
    }

    /// Running totals; never waits on the worker.
    pub fn stats(&self) -> Stats {
        self.shared.telemetry.snapshot()
    }

    /// What a readiness probe needs; never waits on the worker.
    pub fn health(&self) -> Health {
        self.shared.telemetry.health(self.shared.clock.now())
    }

    /// Stops intake, drains everything already accepted, makes the final flush and joins
    /// the threads; returns what it wrote and what it could not.
    ///
    /// Rows a failed final flush kept (a deadlock, a failover, a pooler restart) are flushed
    /// again, with a backoff of 250 ms doubling to at most 1 s (counted from the start of the
    /// flush that failed), until they are written or the final flush timeout passes: the
    /// report's `unwritten` is non-zero only when the deadline passed.
    ///
    /// Returns within the final flush timeout (by the injected clock) whatever the store
    /// does: then it counts what is unwritten in `Stats::unwritten_at_shutdown`, refuses
    /// further store calls, fires the store call's interrupt (see
    /// [`Store::interrupt_handle`](crate::Store::interrupt_handle)) on a thread of its own,
    /// so a slow or panicking interrupt cannot hold or unwind the caller, and leaves the
    /// threads to finish on their own. Never panics. Idempotent: later calls return the
    /// first call's report. Dropping the batcher calls it.
    ///
    /// With a [`MockClock`](crate::MockClock) the timeout and the backoff pass only when the
    /// clock is advanced, so a test whose store never returns, or keeps failing, must
    /// advance it (the store itself may, as a failing or hung database's time passes);
    /// otherwise `close` waits for the store.
    ///
    /// ```
    /// use metadata_batcher::{Batcher, MemoryPubsub, MemoryStore};
    ///
    /// let batcher = Batcher::builder(MemoryStore::new(), MemoryPubsub::new()).build().unwrap();
    /// let report = batcher.close();
    /// assert!(!report.deadline_hit);
    /// batcher.close(); // a statement is fine too: the report need not be used
    /// ```
    pub fn close(&self) -> CloseReport {
        let mut worker = self.worker.lock();
        let Some(handle) = worker.take() else {
            return *self.close_report.lock();
        };
        *self.shared.intake.write() = false;
        let flushed_before = self.shared.telemetry.flushed.load(Relaxed);
        let deadline = self.shared.clock.after(self.final_flush_timeout);
        // A worker that died of a panic has ended already, and counted what it held.
        let _ = self.control.send(Control::Shutdown);
        let ended = &self.worker_ended;
        let mut unannounced = 0;
        let deadline_hit = select! {
            recv(ended) -> _ => false,
            // Both may be ready: a worker that finished in time has finished.
            recv(deadline) -> _ => !matches!(ended.try_recv(), Err(TryRecvError::Disconnected)),
        };
        if deadline_hit {
            unannounced = self.give_up();
        } else {
            let _ = handle.join();
        }
        let report = CloseReport {
            written: self
                .shared
                .telemetry
                .flushed
                .load(Relaxed)
                .saturating_sub(flushed_before),
            unwritten: self.shared.telemetry.unwritten_at_shutdown.load(Relaxed),
            unannounced: unannounced as u64,
            deadline_hit,
        };
        *self.close_report.lock() = report;
        // From here no `sync` or `flush` waits on the threads left behind.
        self.close_signal.lock().take();
        report
    }

    /// The final flush timed out: record what is unwritten, stop announcing, then interrupt
    /// the store call; returns how many stored agents go unannounced.
    fn give_up(&self) -> usize {
        // Count and refuse further calls under one lock: the worker records no more after
        // this, its rows are in the batch or in flight (never neither, never both) while
        // they are counted, and the interrupt (user code) runs only once the count is safe.
        let counters = &self.shared.telemetry;
        let mut unwritten = 0;
        let store_call = self.health().store_call_age;
        let interrupt = self.shared.cancellation.abandon(|| {
            // Everything accepted and not settled, rather than `queued + batched +
            // in_flight`: the keys of an update the worker is taking in (or was, when it
            // panicked) are in none of those. A key superseded a moment ago may be counted
            // too: the worker publishes that count once per update, not under this lock.
            let stats = counters.snapshot();
            unwritten = stats.accepted.saturating_sub(stats.settled());
            // Added, not stored: a worker that died has counted what it held already.
            counters.unwritten_at_shutdown.fetch_add(unwritten, Relaxed);
        });
        let unannounced = self.shared.notifier.abandon(&self.shared.telemetry);
        let timeout = self.final_flush_timeout;
        // Say what held `close`: a store call, retries of failed flushes, or the publisher.
        if let Some(running) = store_call {
            tracing::error!(
                unwritten,
                ?timeout,
                store_call_age = ?running,
                "metadata batcher final flush timed out in a store call; interrupting it"
            );
        } else if unwritten > 0 {
            tracing::error!(
                unwritten,
                ?timeout,
                "metadata batcher final flush timed out while the store kept failing"
            );
        } else {
            tracing::error!(
                unannounced,
                ?timeout,
                "metadata batcher closed with every row written, but the publisher had not \
                 returned by the final flush timeout; the unannounced agents are counted \
                 as publish errors"
            );
        }
        if let Some(interrupt) = interrupt {
            self.interrupt_off_thread(interrupt);
        }
        unannounced
    }

    /// Fires the store's interrupt on a thread of its own: it is user code, and may block
    /// (a cancel request into a dead network) or panic; neither may reach `close`.
    fn interrupt_off_thread(&self, interrupt: Interrupt) {
        let shared = self.shared.clone();
        let spawned = thread::Builder::new()
            .name("mdbatch-cancel".into())
            .spawn(move || {
                if let Err(panic) = catch_unwind(AssertUnwindSafe(|| interrupt.fire())) {
                    shared.telemetry.panics.fetch_add(1, Relaxed);
                    tracing::error!(
                        panic = %panic_message(&*panic),
                        "the store's interrupt panicked; the store call is left running"
                    );
                }
            });
        if let Err(error) = spawned {
            tracing::error!(
                %error,
                "could not start a thread to interrupt the store call; it is left running"
            );
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl fmt::Debug for Batcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batcher")
            .field("channel_capacity", &self.channel_capacity)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}
