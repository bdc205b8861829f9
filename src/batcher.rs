//! [`Batcher`]: the handle callers share, and the life of an update.
//!
//! `add` validates a call, reserves room for its keys in the channel's budget and sends the
//! caller's vector to the worker in one message; it never waits. Everything after that
//! happens on the worker thread ([`crate::worker`]) and the flusher thread
//! ([`crate::flusher`]). `sync`, `flush` and `close` are control messages that carry
//! their own reply channel, so the handle holds no lock the worker could need. The threads
//! start in [`crate::start`]; the close protocol is [`crate::close`].

use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{never, select, Receiver, Sender, TrySendError};
use parking_lot::Mutex;
use uuid::Uuid;

use crate::builder::Builder;
use crate::shared::Shared;
use crate::worker::{Control, Update, WARNING_EVERY};
use crate::{
    AddError, AddReport, CloseReport, FlushReport, Health, Metadata, Publisher, Stats, Store,
};

/// Batches metadata updates and flushes them to a [`Store`], announcing changed agents on
/// a [`Publisher`].
///
/// Share it (`Arc<Batcher>` or `&Batcher`) between the threads that receive updates.
///
/// Dropping it never blocks the thread that drops it (a request handler, say): the drop
/// starts [`close`](Self::close) on a thread of its own (`{name}-close`), which makes the
/// final flush, bounded by the final flush timeout as `close` is, and returns at once. A
/// process that exits right after may exit before that flush: a service's `main` holds a
/// [`close_guard`](Self::close_guard), whose drop closes and waits, or calls `close`.
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
    /// What `add` uses, held here so the callers' path takes no extra indirection.
    updates: Sender<Update>,
    /// Wakes a worker that is collecting updates on its own schedule; see `add`.
    doorbell: Sender<()>,
    channel_capacity: usize,
    shared: Arc<Shared>,
    /// Shared with the thread that closes the batcher once this handle is dropped, and
    /// with every [`CloseGuard`](crate::CloseGuard).
    pub(crate) inner: Arc<Inner>,
}

/// What the handle holds for control and closing; outlives it while a close started by
/// its drop runs.
pub(crate) struct Inner {
    /// Clones of the handle's senders, which keep the worker's channels connected until
    /// the close has ended: a disconnected channel would end the worker without a close.
    pub(crate) updates: Sender<Update>,
    pub(crate) doorbell: Sender<()>,
    pub(crate) control: Sender<Control>,
    /// Disconnected when the worker thread has ended.
    pub(crate) worker_ended: Receiver<()>,
    /// Disconnected when `close` returns: `sync` and `flush` never wait past it.
    pub(crate) closed: Receiver<()>,
    pub(crate) close_signal: Mutex<Option<Sender<()>>>,
    pub(crate) final_flush_timeout: Duration,
    /// The instance name that prefixes every thread name ([`Builder::name`]).
    pub(crate) name: String,
    pub(crate) shared: Arc<Shared>,
    /// `None` once a close has begun.
    pub(crate) worker: Mutex<Option<thread::JoinHandle<()>>>,
    /// What the first `close` did; later calls return it again.
    pub(crate) close_report: Mutex<CloseReport>,
}

impl Batcher {
    /// Starts configuring a batcher that writes to `store` and announces on `publisher`.
    pub fn builder(store: impl Store, publisher: impl Publisher) -> Builder {
        Builder::new(store, publisher)
    }

    /// The handle over a started batcher's parts.
    pub(crate) fn over(inner: Inner, channel_capacity: usize) -> Batcher {
        Batcher {
            updates: inner.updates.clone(),
            doorbell: inner.doorbell.clone(),
            channel_capacity,
            shared: inner.shared.clone(),
            inner: Arc::new(inner),
        }
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
                    self.inner
                        .shared
                        .telemetry
                        .queued
                        .fetch_sub(accepted, Relaxed);
                    accepted = 0;
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.inner
                        .shared
                        .telemetry
                        .queued
                        .fetch_sub(accepted, Relaxed);
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
        let shared = &self.shared;
        let counters = &shared.telemetry;
        counters.dropped_at_add(dropped as u64);
        let now = counters.encode(shared.clock.now());
        let last = counters.last_drop_warning.load(Relaxed);
        let due = last == u64::MAX || now.saturating_sub(last) >= WARNING_EVERY.as_nanos() as u64;
        if due
            && counters
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
    /// leaves the scheduled flush complete. Returns at once after `close`. To bound the
    /// wait, see [`sync_timeout`](Self::sync_timeout).
    pub fn sync(&self) {
        let _ = self.sync_until(&never());
    }

    /// [`sync`](Self::sync), waiting at most `timeout`, by the injected clock (as every
    /// timer of the batcher: with a [`MockClock`](crate::MockClock) it passes only when the
    /// clock is advanced). Says what happened: `Ok` when synced, else a [`WaitError`]. A
    /// request that timed out stays with the worker and is handled as usual; only this
    /// caller stopped waiting.
    ///
    /// ```
    /// use std::time::Duration;
    /// use metadata_batcher::{Batcher, MemoryPubsub, MemoryStore, WaitError};
    ///
    /// let batcher = Batcher::builder(MemoryStore::new(), MemoryPubsub::new()).build()?;
    /// assert_eq!(batcher.sync_timeout(Duration::from_secs(1)), Ok(()));
    /// batcher.close();
    /// assert_eq!(batcher.sync_timeout(Duration::from_secs(1)), Err(WaitError::Closed));
    /// # Ok::<(), metadata_batcher::BuildError>(())
    /// ```
    pub fn sync_timeout(&self, timeout: Duration) -> Result<(), WaitError> {
        self.sync_until(&self.shared.clock.after(timeout))
    }

    fn sync_until(&self, deadline: &Receiver<Instant>) -> Result<(), WaitError> {
        let (reply, done) = crossbeam_channel::bounded(1);
        self.inner
            .control
            .send(Control::Sync(reply))
            .map_err(|_| WaitError::Closed)?;
        self.answer(&done, deadline)
    }

    /// Waits for the worker's answer, but not past `close`'s return or `deadline`. An
    /// answer dropped unsent means the worker panicked while handling the request: what
    /// the caller waits for is settled once the dying worker has counted what it held and
    /// ended, and the batcher is then closed.
    fn answer<T>(
        &self,
        answer: &Receiver<T>,
        deadline: &Receiver<Instant>,
    ) -> Result<T, WaitError> {
        let inner = &*self.inner;
        select! {
            recv(answer) -> answered => answered.map_err(|_| {
                select! {
                    recv(inner.worker_ended) -> _ => WaitError::Closed,
                    recv(inner.closed) -> _ => WaitError::Closed,
                    recv(deadline) -> _ => WaitError::TimedOut,
                }
            }),
            // Both may be ready: `close` answers what it can before it returns, and an
            // answer that came in time counts.
            recv(inner.closed) -> _ => answer.try_recv().map_err(|_| WaitError::Closed),
            recv(deadline) -> _ => answer.try_recv().map_err(|_| WaitError::TimedOut),
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
    /// returns `None`, and so does `sync`. To bound it yourself, see
    /// [`flush_timeout`](Self::flush_timeout).
    pub fn flush(&self) -> Option<FlushReport> {
        self.flush_until(&never()).ok().flatten()
    }

    /// [`flush`](Self::flush), waiting at most `timeout`, by the injected clock (see
    /// [`sync_timeout`](Self::sync_timeout)). `Ok(None)`: there was nothing to flush. A
    /// flush that timed out still runs to its end on the batcher's threads; only this
    /// caller stopped waiting, and [`Stats::last_flush`] will show it.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use metadata_batcher::{Batcher, MemoryPubsub, MemoryStore, Metadata};
    /// use uuid::Uuid;
    ///
    /// let batcher = Batcher::builder(MemoryStore::new(), MemoryPubsub::new()).build()?;
    /// let agent = Uuid::from_u128(1);
    /// batcher.add(agent, vec![Metadata::new("cpu", "1%", "", SystemTime::now())]).unwrap();
    /// let report = batcher.flush_timeout(Duration::from_secs(5)).expect("flushed in time");
    /// assert_eq!(report.map(|flush| flush.count), Some(1));
    /// # Ok::<(), metadata_batcher::BuildError>(())
    /// ```
    pub fn flush_timeout(&self, timeout: Duration) -> Result<Option<FlushReport>, WaitError> {
        self.flush_until(&self.shared.clock.after(timeout))
    }

    fn flush_until(&self, deadline: &Receiver<Instant>) -> Result<Option<FlushReport>, WaitError> {
        let (reply, report) = crossbeam_channel::bounded(1);
        self.inner
            .control
            .send(Control::Flush(reply))
            .map_err(|_| WaitError::Closed)?;
        self.answer(&report, deadline)
    }

    /// Running totals; never waits on the worker.
    pub fn stats(&self) -> Stats {
        self.shared.telemetry.snapshot()
    }

    /// What a readiness probe needs; never waits on the worker.
    pub fn health(&self) -> Health {
        self.inner.shared.telemetry.health(self.shared.clock.now())
    }
}

/// Never blocks: starts the close on a thread of its own and returns (see [`Batcher`]).
impl Drop for Batcher {
    fn drop(&mut self) {
        self.inner.close_in_background();
    }
}

impl fmt::Debug for Batcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batcher")
            .field("name", &self.inner.name)
            .field("channel_capacity", &self.channel_capacity)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Why [`Batcher::sync_timeout`] or [`Batcher::flush_timeout`] returned without what it
/// waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WaitError {
    /// The timeout passed first, by the batcher's clock. The request stays with the
    /// worker and is carried out; only the caller stopped waiting.
    TimedOut,
    /// The batcher is closed (or its worker died), so nothing more will be flushed for
    /// this caller.
    Closed,
}

impl fmt::Display for WaitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitError::TimedOut => f.write_str(
                "the metadata batcher did not answer within the timeout; the request is still \
                 carried out, so wait longer or check Batcher::health for a slow store",
            ),
            WaitError::Closed => {
                f.write_str("the metadata batcher is closed; nothing more is flushed after close")
            }
        }
    }
}

impl std::error::Error for WaitError {}
