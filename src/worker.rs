//! The worker thread: the select loop that owns the batch.
//!
//! One dedicated OS thread selects over these channels ([`Worker::next_event`]):
//!
//! | channel     | carries                              | handled by            |
//! |-------------|--------------------------------------|-----------------------|
//! | `updates`   | one message per accepted `add` call  | [`Worker::take_in`]   |
//! | `doorbell`  | rung by the `add` that fills a quarter of the channel | collects `updates` |
//! | `timer`     | the scheduled (or retry) flush time  | sets `scheduled_due`  |
//! | `completed` | outcomes from the flusher thread     | [`Worker::complete`]  |
//! | `control`   | `sync`, `flush`, `close`             | [`Worker::sync`] ...  |
//!
//! While updates keep arriving the worker does not block on `updates` (every `add` would
//! then pay for waking it): it collects them at most every millisecond, or when the
//! doorbell rings. Once a collection finds nothing it blocks on `updates` again.
//!
//! After every message [`Worker::dispatch`] starts the next flush if one is due and none is
//! running. A flush runs on the flusher thread, so intake and dedup never wait on the
//! database: what accrues while a flush is in flight is carried by the next one, which
//! makes the batch grow with the database's latency instead of dropping updates (the
//! flusher writes it in statements of `batch_size` rows, or sized to the path). When the worker keeps
//! up, a capacity flush carries exactly `batch_size` entries.
//!
//! The worker answers `sync` and `flush` through the publisher thread
//! ([`crate::notifier`]): the answer goes out once the flush it covers is announced.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{never, select, Receiver, RecvError, Select, Sender};
use uuid::Uuid;

use crate::batch::{Batch, Taken};
use crate::batcher::WARNING_EVERY;
use crate::flusher::{FlushJob, FlushOutcome, Flusher};
use crate::notifier::Waiter;
use crate::panic::panic_message;
use crate::shared::Shared;
use crate::{FlushReason, FlushReport, Metadata};

/// One accepted `add` call: the caller's own vector, moved, never copied.
pub(crate) struct Update {
    pub(crate) agent_id: Uuid,
    pub(crate) metadata: Vec<Metadata>,
}

/// Requests from the handle; each carries the sender its answer goes back on.
pub(crate) enum Control {
    Sync(Sender<()>),
    Flush(Sender<Option<FlushReport>>),
    /// `close`: it waits for the thread to end, not for an answer.
    Shutdown,
}

/// The settings the loop runs by, checked by the builder.
#[derive(Debug, Clone)]
pub(crate) struct WorkerConfig {
    pub(crate) batch_size: usize,
    /// The channel's capacity in keys.
    pub(crate) channel_capacity: usize,
    pub(crate) interval: Duration,
    /// The bound on distinct entries; `usize::MAX` when none is set.
    pub(crate) max_pending: usize,
    /// The bound on the bytes of the batch and the flush in flight.
    pub(crate) max_pending_bytes: usize,
    pub(crate) retry_backoff_initial: Duration,
    pub(crate) retry_backoff_max: Duration,
}

/// Where flushes run.
pub(crate) enum Flushing {
    /// On the worker thread: intake waits while the store works (the Go design).
    Inline(Flusher),
    /// On a flusher thread of its own.
    Thread {
        /// `None` once the worker has let the flusher thread end.
        jobs: Option<Sender<FlushJob>>,
        completed: Receiver<FlushOutcome>,
        thread: Option<JoinHandle<()>>,
    },
}

/// How many more messages to take in after one arrives before looking at the other
/// channels again: amortizes the select over a burst without starving control messages.
const INTAKE_BURST: usize = 256;

/// While updates keep arriving, the longest they gather before the worker collects them:
/// short against any flush interval, long against a wake-up.
const INTAKE_POLL: Duration = Duration::from_millis(1);

/// The longest wait between two shutdown flushes: `close` has a deadline, and what the
/// backoff saves the database matters less than writing before it passes.
const SHUTDOWN_RETRY_MAX: Duration = Duration::from_secs(1);

/// Why the select loop ended.
#[derive(PartialEq, Eq)]
enum Ending {
    /// `close` asked, and waits.
    Close,
    /// The handle is gone without a `close`: no deadline bounds retries.
    HandleGone,
}

/// One thing for the loop to handle.
#[allow(clippy::large_enum_variant)] // one lives at a time, on the stack: boxing would allocate
enum Event {
    Update(Result<Update, RecvError>),
    /// Polling: time to collect what arrived.
    IntakeDue,
    Timer,
    Completed(Result<FlushOutcome, RecvError>),
    Control(Result<Control, RecvError>),
}

pub(crate) struct Worker {
    config: WorkerConfig,
    shared: Arc<Shared>,
    updates: Receiver<Update>,
    doorbell: Receiver<()>,
    control: Receiver<Control>,
    timer: Receiver<Instant>,
    flushing: Flushing,
    /// Stands in for `completed` when flushes run inline.
    no_completions: Receiver<FlushOutcome>,
    batch: Batch,
    /// When the oldest entry of `batch` arrived.
    batch_since: Option<Instant>,
    /// The running flush: its sequence number, reason and when its oldest entry arrived.
    in_flight: Option<(u64, FlushReason, Option<Instant>)>,
    /// Flushes are numbered from 1; 0 means none yet.
    next_seq: u64,
    /// The last flush completed: `sync` answers once it is announced.
    last_completed: u64,
    /// The batch trims once its bytes pass this: the byte bound less what the flush in
    /// flight held when last looked at. Stale only downwards (the flush in flight only
    /// shrinks), so checking it costs one comparison per insert.
    byte_budget: usize,
    scheduled_due: bool,
    consecutive_failures: u32,
    manual_waiting: Vec<Sender<Option<FlushReport>>>,
    manual_in_flight: Vec<Sender<Option<FlushReport>>>,
    /// `sync` callers, each with the sequence number of the last flush it waits for.
    sync_waiting: Vec<(u64, Sender<()>)>,
    /// When intake last collected updates, by the real clock: it paces polling only.
    collected: Instant,
    /// When the last flush started, by the injected clock: paces retries at shutdown.
    last_started: Instant,
    /// When trimming last logged at warn level, by the injected clock.
    last_trim_warning: Option<Instant>,
    /// Keys of the update being taken in that are not in the batch yet, while a capacity
    /// flush it triggered starts (and, inline, runs): they count as batched, so that
    /// `close`, counting what is unwritten meanwhile, sees them.
    in_hand: usize,
}

impl Worker {
    pub(crate) fn new(
        config: WorkerConfig,
        shared: Arc<Shared>,
        updates: Receiver<Update>,
        doorbell: Receiver<()>,
        control: Receiver<Control>,
        timer: Receiver<Instant>,
        flushing: Flushing,
    ) -> Self {
        let byte_budget = config.max_pending_bytes;
        let shared_now = shared.clock.now();
        Worker {
            config,
            shared,
            updates,
            doorbell,
            control,
            timer,
            flushing,
            no_completions: never(),
            batch: Batch::default(),
            batch_since: None,
            in_flight: None,
            next_seq: 1,
            last_completed: 0,
            byte_budget,
            scheduled_due: false,
            consecutive_failures: 0,
            manual_waiting: Vec::new(),
            manual_in_flight: Vec::new(),
            sync_waiting: Vec::new(),
            collected: Instant::now(),
            last_started: shared_now,
            last_trim_warning: None,
            in_hand: 0,
        }
    }

    /// The thread's body: the select loop, then the shutdown. A panic in either (user code
    /// runs here: the clock, a metrics recorder, a tracing subscriber) ends the batcher
    /// with everything it held counted; see [`die`](Self::die).
    pub(crate) fn run(mut self) {
        let served = catch_unwind(AssertUnwindSafe(|| self.serve()));
        let ended = served.and_then(|ending| {
            catch_unwind(AssertUnwindSafe(|| self.shut_down(ending == Ending::Close)))
        });
        if let Err(panic) = ended {
            self.die(&panic_message(&*panic));
        }
    }

    /// The select loop; returns when the batcher closes.
    fn serve(&mut self) -> Ending {
        // `None`: blocked on the update channel, so the next `add` wakes this thread.
        // `Some(wait)`: updates are arriving, so they are collected every `wait` instead,
        // and callers do not pay a wake-up (a futex call, microseconds) per `add`.
        let mut poll: Option<Duration> = None;
        loop {
            match self.next_event(poll) {
                Event::Update(Ok(update)) => {
                    let first = update.metadata.len();
                    self.take_in(update);
                    let keys = first + self.take_in_burst();
                    poll = Some(self.poll_wait(keys));
                }
                Event::IntakeDue => {
                    let keys = self.take_in_burst();
                    poll = (keys > 0).then(|| self.poll_wait(keys));
                }
                Event::Timer => {
                    self.timer = never();
                    self.scheduled_due = true;
                    // While polling, accepted updates may still sit in the channel: the
                    // scheduled flush carries every update accepted before its tick.
                    self.take_in_queued();
                }
                Event::Completed(Ok(outcome)) => self.complete(outcome),
                Event::Completed(Err(_)) => self.lose_flusher(),
                Event::Control(Ok(Control::Sync(reply))) => self.sync(reply),
                Event::Control(Ok(Control::Flush(reply))) => self.manual_flush(reply),
                Event::Control(Ok(Control::Shutdown)) => return Ending::Close,
                // The handle is gone without a close: nothing can reach us any more.
                Event::Control(Err(_)) | Event::Update(Err(_)) => return Ending::HandleGone,
            }
            self.dispatch();
        }
    }

    /// Waits for the next thing to handle: on the update channel too when `poll` is
    /// `None`, else at most `poll` for the others or for the doorbell that `add` rings when
    /// the channel fills up. The poll runs on real time, whatever the injected clock: it
    /// only decides when queued updates are collected, never what happens to them.
    fn next_event(&self, poll: Option<Duration>) -> Event {
        let completed = match &self.flushing {
            Flushing::Thread { completed, .. } => completed,
            Flushing::Inline(_) => &self.no_completions,
        };
        let mut select = Select::new();
        let timer = select.recv(&self.timer);
        let finished = select.recv(completed);
        let control = select.recv(&self.control);
        let operation = match poll {
            None => {
                select.recv(&self.updates);
                select.select()
            }
            Some(wait) => {
                let doorbell = select.recv(&self.doorbell);
                match select.select_timeout(wait) {
                    Ok(operation) if operation.index() == doorbell => {
                        let _ = operation.recv(&self.doorbell);
                        return Event::IntakeDue;
                    }
                    Ok(operation) => operation,
                    Err(_) => return Event::IntakeDue,
                }
            }
        };
        match operation.index() {
            i if i == timer => {
                let _ = operation.recv(&self.timer);
                Event::Timer
            }
            i if i == finished => Event::Completed(operation.recv(completed)),
            i if i == control => Event::Control(operation.recv(&self.control)),
            _ => Event::Update(operation.recv(&self.updates)),
        }
    }

    /// Takes in up to a burst of queued messages; returns how many keys they carried.
    fn take_in_burst(&mut self) -> usize {
        self.take_in_up_to(INTAKE_BURST)
    }

    /// Takes in up to `messages` queued messages; returns how many keys they carried.
    fn take_in_up_to(&mut self, messages: usize) -> usize {
        let mut keys = 0;
        for _ in 0..messages {
            // A finished flush is taken first, so the next one starts at `batch_size`
            // instead of growing behind a long drain (a `sync` after a burst, say): a map
            // that outgrows the cache makes every insert slower.
            self.take_completed();
            let Ok(update) = self.updates.try_recv() else {
                break;
            };
            keys += update.metadata.len();
            self.take_in(update);
        }
        keys
    }

    /// How long to let updates gather before collecting them again, given that this
    /// collection found `keys`: at the rate just seen, at most an eighth of the channel
    /// fills while this thread waits, so waiting never costs a drop; and never more than
    /// `INTAKE_POLL`.
    fn poll_wait(&mut self, keys: usize) -> Duration {
        let now = Instant::now();
        let since_last = now.saturating_duration_since(std::mem::replace(&mut self.collected, now));
        if !self.updates.is_empty() {
            return Duration::ZERO;
        }
        let room = (self.config.channel_capacity / 8) as f64;
        let seconds_per_key = since_last.as_secs_f64() / keys.max(1) as f64;
        Duration::from_secs_f64((room * seconds_per_key).min(INTAKE_POLL.as_secs_f64()))
    }

    /// Completes the flush in flight if the flusher has reported it.
    fn take_completed(&mut self) {
        if self.in_flight.is_none() {
            return;
        }
        if let Flushing::Thread { completed, .. } = &self.flushing {
            if let Ok(outcome) = completed.try_recv() {
                self.complete(outcome);
                self.dispatch();
            }
        }
    }

    /// Adds one call's entries to the batch, flushing at exactly `batch_size` when idle.
    fn take_in(&mut self, update: Update) {
        let keys = update.metadata.len();
        self.shared
            .telemetry
            .taken_in
            .fetch_add(keys as u64, Relaxed);
        self.shared.telemetry.queued.fetch_sub(keys, Relaxed);
        let agent_id = update.agent_id;
        for (taken, metadata) in update.metadata.into_iter().enumerate() {
            if self.batch_since.is_none() {
                self.batch_since = Some(self.shared.clock.now());
                self.shared.telemetry.set_oldest_batched(self.batch_since);
            }
            self.batch.insert(agent_id, metadata);
            let len = self.batch.len();
            if len >= self.config.batch_size && self.can_flush_for_capacity() {
                self.in_hand = keys - taken - 1;
                self.start(FlushReason::Capacity);
                self.in_hand = 0;
            } else if len
                >= self
                    .config
                    .max_pending
                    .saturating_add(self.config.batch_size)
            {
                // Trimming costs a pass over the batch, so it waits for a batch's worth of
                // excess; flushes trim exactly to the bound.
                self.trim();
            } else if self.batch.bytes() > self.byte_budget {
                self.trim_bytes();
            }
        }
        let counters = &self.shared.telemetry;
        counters.batched.store(self.batch.len(), Relaxed);
        counters.superseded.store(self.batch.superseded(), Relaxed);
    }

    fn can_flush_for_capacity(&self) -> bool {
        self.in_flight.is_none() && self.consecutive_failures == 0
    }

    /// Starts the next flush if one is due and none is running; with nothing due, releases
    /// the `sync` callers.
    fn dispatch(&mut self) {
        loop {
            if self.in_flight.is_some() {
                return;
            }
            let reason = if !self.manual_waiting.is_empty() {
                FlushReason::Manual
            } else if self.scheduled_due {
                FlushReason::Scheduled
            } else if self.batch.len() >= self.config.batch_size && self.consecutive_failures == 0 {
                FlushReason::Capacity
            } else {
                for (_, reply) in self.sync_waiting.drain(..) {
                    self.shared
                        .notifier
                        .when_published(self.last_completed, Waiter::Sync(reply));
                }
                return;
            };
            if self.batch.is_empty() {
                // Nothing to write: no store call, no publish, nothing recorded.
                for reply in self.manual_waiting.drain(..) {
                    let _ = reply.send(None);
                }
                if std::mem::take(&mut self.scheduled_due) {
                    self.timer = self.shared.clock.after(self.config.interval);
                }
                continue;
            }
            self.start(reason);
        }
    }

    /// Hands the whole batch to the flusher.
    fn start(&mut self, reason: FlushReason) {
        self.last_started = self.shared.clock.now();
        self.trim();
        let bytes = self.batch.bytes();
        let batch = self.batch.take();
        let seq = self.next_seq;
        self.next_seq += 1;
        self.scheduled_due = false;
        self.timer = never();
        if reason == FlushReason::Manual {
            self.manual_in_flight.append(&mut self.manual_waiting);
        }
        let since = self.batch_since.take();
        self.in_flight = Some((seq, reason, since));
        let (counters, in_hand) = (&self.shared.telemetry, self.in_hand);
        self.shared.cancellation.moving_rows(|| {
            counters.in_flight.store(batch.len(), Relaxed);
            counters.batched.store(in_hand, Relaxed);
        });
        self.shared.telemetry.in_flight_bytes.store(bytes, Relaxed);
        self.byte_budget = self.config.max_pending_bytes.saturating_sub(bytes);
        self.shared.telemetry.set_oldest_in_flight(since);
        self.shared.telemetry.set_oldest_batched(None);
        let job = FlushJob { seq, reason, batch };
        match &mut self.flushing {
            Flushing::Inline(flusher) => {
                let outcome = flusher.flush(job);
                self.complete(outcome);
            }
            Flushing::Thread { jobs, .. } => {
                let sent = match jobs {
                    Some(jobs) => jobs.send(job).map_err(|unsent| unsent.into_inner()),
                    None => Err(job),
                };
                if let Err(unsent) = sent {
                    // The flusher thread is gone (it catches the store's panics, so this
                    // is a bug); keep the rows rather than lose them silently.
                    tracing::error!("metadata flusher thread is gone; flushes cannot run");
                    self.complete(FlushOutcome::not_attempted(unsent));
                }
            }
        }
    }

    /// Takes a finished flush back: unwritten rows rejoin the batch, the timer re-arms.
    fn complete(&mut self, outcome: FlushOutcome) {
        let since = self.in_flight.take().and_then(|(_, _, since)| since);
        self.last_completed = outcome.seq;
        self.shared.telemetry.in_flight_bytes.store(0, Relaxed);
        self.byte_budget = self.config.max_pending_bytes;
        self.shared.telemetry.set_oldest_in_flight(None);
        self.count_outcome(outcome.failed);
        self.batch.recycle(outcome.emptied);
        if !outcome.retained.is_empty() {
            self.batch.restore(outcome.retained);
            self.batch_since = match (since, self.batch_since) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            self.shared.telemetry.set_oldest_batched(self.batch_since);
            self.trim();
        }
        let (counters, batched) = (&self.shared.telemetry, self.batch.len() + self.in_hand);
        let superseded = self.batch.superseded();
        self.shared.cancellation.moving_rows(|| {
            counters.in_flight.store(0, Relaxed);
            counters.batched.store(batched, Relaxed);
            counters.superseded.store(superseded, Relaxed);
        });
        // Before anyone waiting on this flush is answered, so they see the gauges after it,
        // and a test that moves a mock clock once `flush()` returns reaches the retry.
        self.shared.update_gauges();
        self.timer = self.shared.clock.after(self.next_delay());
        let notifier = &self.shared.notifier;
        for reply in self.manual_in_flight.drain(..) {
            notifier.when_published(outcome.seq, Waiter::Flush(reply, outcome.report.clone()));
        }
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.sync_waiting)
            .into_iter()
            .partition(|(target, _)| *target <= outcome.seq);
        self.sync_waiting = waiting;
        for (_, reply) in done {
            notifier.when_published(outcome.seq, Waiter::Sync(reply));
        }
    }

    /// The flusher thread ended without reporting its flush. It catches every panic of a
    /// flush, so this is a bug; the loop must not spin on the closed channel, the rows of
    /// the flush are counted as lost, its waiters are answered, and later flushes fail
    /// (their rows are kept, within the bound) instead of hanging.
    fn lose_flusher(&mut self) {
        let counters = &self.shared.telemetry;
        let lost = counters.in_flight.swap(0, Relaxed);
        counters.lost_to_panics.fetch_add(lost as u64, Relaxed);
        counters.panics.fetch_add(1, Relaxed);
        tracing::error!(
            lost,
            "metadata flusher thread ended unexpectedly; the rows of its flush in flight are lost"
        );
        if let Flushing::Thread { completed, .. } = &mut self.flushing {
            *completed = never();
        }
        if let Some((seq, reason, _)) = self.in_flight {
            self.complete(FlushOutcome::not_attempted(FlushJob {
                seq,
                reason,
                batch: Taken::default(),
            }));
        }
    }

    /// Counts flushes that failed in a row: they pace the retries and pause capacity
    /// flushes, and `health()` reports them.
    fn count_outcome(&mut self, failed: bool) {
        self.consecutive_failures = if failed {
            self.consecutive_failures.saturating_add(1)
        } else {
            0
        };
        self.shared
            .telemetry
            .consecutive_failures
            .store(self.consecutive_failures.into(), Relaxed);
    }

    /// The interval, or while the store keeps failing, a doubling backoff.
    fn next_delay(&self) -> Duration {
        if self.consecutive_failures == 0 {
            return self.config.interval;
        }
        let doublings = (self.consecutive_failures - 1).min(30);
        self.config
            .retry_backoff_initial
            .saturating_mul(1 << doublings)
            .min(self.config.retry_backoff_max)
    }

    /// Holds the batch to its bounds, oldest `collected_at` first: the entry bound, and
    /// the byte bound less what the flush in flight still holds.
    fn trim(&mut self) {
        let budget = self.refresh_byte_budget();
        self.trim_to(self.config.max_pending, budget);
    }

    /// The batch passed its byte budget while taking in. Trimming sorts the batch, so it
    /// goes an eighth below the budget: the next trim is an eighth of the bound away.
    fn trim_bytes(&mut self) {
        let budget = self.refresh_byte_budget();
        if self.batch.bytes() > budget {
            self.trim_to(self.config.max_pending, budget - budget / 8);
        }
    }

    /// The byte bound less what the flush in flight still holds (the flusher releases
    /// each chunk as it is written).
    fn refresh_byte_budget(&mut self) -> usize {
        let in_flight = self.shared.telemetry.in_flight_bytes.load(Relaxed);
        self.byte_budget = self.config.max_pending_bytes.saturating_sub(in_flight);
        self.byte_budget
    }

    fn trim_to(&mut self, max_entries: usize, max_bytes: usize) {
        let dropped = self.batch.trim(max_entries, max_bytes);
        if dropped == 0 {
            return;
        }
        if self.batch.is_empty() {
            // Nothing waits: `health()` must not report the age of what was dropped.
            self.batch_since = None;
            self.shared.telemetry.set_oldest_batched(None);
        }
        self.shared.telemetry.retention_dropped(dropped as u64);
        let max_entries = (max_entries != usize::MAX).then_some(max_entries);
        // While a flush in flight holds nearly all of the byte bound, every insert trims.
        let now = self.shared.clock.now();
        let due = self
            .last_trim_warning
            .is_none_or(|last| now.saturating_duration_since(last) >= WARNING_EVERY);
        if due {
            self.last_trim_warning = Some(now);
            tracing::warn!(
                dropped,
                ?max_entries,
                max_bytes,
                "metadata batch at its bound; dropped the entries with the oldest collected_at"
            );
        } else {
            tracing::debug!(
                dropped,
                ?max_entries,
                max_bytes,
                "metadata batch at its bound; dropped the entries with the oldest collected_at"
            );
        }
    }

    /// Takes in every message that was queued when this was called.
    fn take_in_queued(&mut self) {
        self.take_in_up_to(self.updates.len());
    }

    fn sync(&mut self, reply: Sender<()>) {
        self.take_in_queued();
        if self.timer.try_recv().is_ok() {
            self.timer = never();
            self.scheduled_due = true;
        }
        self.dispatch();
        match self.in_flight {
            None => {
                self.shared
                    .notifier
                    .when_published(self.last_completed, Waiter::Sync(reply));
            }
            Some((seq, _, _)) => {
                // A flush that is due now starts when this one completes; wait for it too.
                let another_due = !self.manual_waiting.is_empty()
                    || self.scheduled_due
                    || self.batch.len() >= self.config.batch_size;
                self.sync_waiting
                    .push((seq + u64::from(another_due), reply));
            }
        }
    }

    fn manual_flush(&mut self, reply: Sender<Option<FlushReport>>) {
        self.take_in_queued();
        self.manual_waiting.push(reply);
    }

    /// Drains what was accepted, waits for the running flush, and makes the final flush;
    /// while rows are left that a failed flush kept, flushes again, with a short backoff,
    /// until they are written or `close` gives up on the store at its deadline.
    fn shut_down(&mut self, close_waits: bool) {
        for update in self.updates.try_iter().collect::<Vec<_>>() {
            self.take_in(update);
        }
        self.wait_for_flush();
        let mut attempts = 0;
        while !self.batch.is_empty() && self.wait_to_retry_at_shutdown(attempts, close_waits) {
            attempts += 1;
            self.start(FlushReason::Shutdown);
            self.wait_for_flush();
        }
        let unwritten = self.batch.len();
        // After `close` has given up, it has recorded what was unwritten when it did, and
        // its report says the same: the worker does not change it afterwards.
        let recorded = self.shared.cancellation.unless_abandoned(|| {
            let counters = &self.shared.telemetry;
            counters
                .unwritten_at_shutdown
                .store(unwritten as u64, Relaxed);
            counters.batched.store(0, Relaxed);
            counters.set_oldest_batched(None);
        });
        if recorded && unwritten > 0 {
            tracing::error!(
                unwritten,
                "metadata batcher closed with entries it could not write"
            );
        }
        self.shared.telemetry.worker_alive.store(false, Relaxed);
        self.end_flushing();
    }

    /// Lets the flusher thread end (its publisher thread with it), and waits for it unless
    /// `close` has given up on the store: then it may be stuck in a store call.
    fn end_flushing(&mut self) {
        if let Flushing::Thread { jobs, thread, .. } = &mut self.flushing {
            jobs.take();
            if let Some(thread) = thread.take() {
                if !self.shared.cancellation.is_abandoned() {
                    let _ = thread.join();
                }
            }
        }
    }

    /// The select loop or the shutdown panicked, in user code (the clock, a metrics
    /// recorder, a tracing subscriber), possibly halfway through taking in an update.
    /// Nothing the worker holds can be trusted to be written, so the batcher stops: intake
    /// closes (`add` returns [`AddError::Closed`](crate::AddError::Closed)), every waiting
    /// caller is answered, the flush in flight is waited for (until `close` gives up), and
    /// every accepted key not yet accounted for is counted in `unwritten_at_shutdown`,
    /// which is what `close` then reports. Runs no user code but logging.
    fn die(&mut self, message: &str) {
        let shared = self.shared.clone();
        let counters = &shared.telemetry;
        counters.panics.fetch_add(1, Relaxed);
        // First, so that no caller answered below sees the worker alive.
        counters.worker_alive.store(false, Relaxed);
        *shared.intake.write() = false;
        // No `add` can send any more: what is queued is all there will be. Keys still
        // counted as queued after the drain were in messages the panic dropped (the
        // shutdown drains the channel before it takes the messages in): taken in, and
        // lost with the rest.
        self.updates.try_iter().for_each(drop);
        let stranded = counters.queued.swap(0, Relaxed);
        counters.taken_in.fetch_add(stranded as u64, Relaxed);
        counters.superseded.store(self.batch.superseded(), Relaxed);
        // What this worker held, the batch and whatever the panic dropped halfway, is
        // everything accepted that is neither accounted for nor in the flush in flight:
        // counted now, under the lock the flusher counts rows under, so that a `close`
        // that gives up while that flush is awaited counts only the flush.
        let mut lost = 0;
        shared.cancellation.unless_abandoned(|| {
            let stats = counters.snapshot();
            let settled = stats.settled() + stats.in_flight as u64;
            lost = stats.accepted.saturating_sub(settled);
            counters.unwritten_at_shutdown.fetch_add(lost, Relaxed);
            counters.batched.store(0, Relaxed);
            counters.set_oldest_batched(None);
        });
        if self.in_flight.take().is_some() {
            self.wait_for_flusher_while_dying();
        }
        // What the flush in flight did not write, refuse or lose: its kept rows.
        shared.cancellation.unless_abandoned(|| {
            let kept = counters.in_flight.swap(0, Relaxed);
            lost += kept as u64;
            counters
                .unwritten_at_shutdown
                .fetch_add(kept as u64, Relaxed);
            counters.in_flight_bytes.store(0, Relaxed);
            counters.set_oldest_in_flight(None);
        });
        self.answer_waiters_now();
        tracing::error!(
            panic = %message,
            lost,
            "the metadata worker thread panicked (in the clock, a metrics recorder or a \
             tracing subscriber); the batcher is closed, add refuses updates, and the \
             entries it held are counted as unwritten"
        );
        self.end_flushing();
    }

    /// Answers every `sync` and `flush` caller that waits on this worker: a dying worker
    /// will flush nothing more.
    fn answer_waiters_now(&mut self) {
        for reply in self
            .manual_waiting
            .drain(..)
            .chain(self.manual_in_flight.drain(..))
        {
            let _ = reply.send(None);
        }
        for (_, reply) in self.sync_waiting.drain(..) {
            let _ = reply.send(());
        }
    }

    /// While dying: the flush in flight holds rows the flusher counts as it writes them,
    /// so the count waits for its outcome (whose kept rows are lost), or for `close` to
    /// give up. Callers that ask meanwhile are answered once the count is done (by
    /// [`answer_waiters_now`](Self::answer_waiters_now), or by the end of the thread).
    fn wait_for_flusher_while_dying(&mut self) {
        let Flushing::Thread { completed, .. } = &self.flushing else {
            return;
        };
        let given_up = self.shared.cancellation.given_up().clone();
        let mut control = self.control.clone();
        loop {
            select! {
                recv(completed) -> _ => return,
                recv(given_up) -> _ => return,
                recv(control) -> message => match message {
                    Ok(Control::Sync(reply)) => self.sync_waiting.push((0, reply)),
                    Ok(Control::Flush(reply)) => self.manual_waiting.push(reply),
                    // `close` waits for this thread to end.
                    Ok(Control::Shutdown) => {}
                    Err(_) => control = never(),
                },
            }
        }
    }

    /// Before shutdown flush number `attempts` (0 for the final flush): waits out the
    /// backoff after a failed one, measured from when that flush started, so a flush that
    /// failed slowly (a deadlock found after a second) is retried at once. False once
    /// `close` has given up on the store, and for retries when `close` is not waiting (the
    /// handle is gone without it): then no deadline would bound them.
    fn wait_to_retry_at_shutdown(&mut self, attempts: u32, close_waits: bool) -> bool {
        let cancellation = &self.shared.cancellation;
        if attempts == 0 {
            return !cancellation.is_abandoned();
        }
        if self.consecutive_failures == 0 || !close_waits {
            return false;
        }
        let backoff = self.next_delay().min(SHUTDOWN_RETRY_MAX);
        let waited = self
            .shared
            .clock
            .now()
            .saturating_duration_since(self.last_started);
        if attempts == 1 {
            tracing::warn!(
                rows = self.batch.len(),
                "the final flush could not write everything; retrying until it does or the \
                 final flush timeout passes"
            );
        }
        let retry = self.shared.clock.after(backoff.saturating_sub(waited));
        select! {
            recv(retry) -> _ => !cancellation.is_abandoned(),
            recv(cancellation.given_up()) -> _ => false,
        }
    }

    fn wait_for_flush(&mut self) {
        if self.in_flight.is_none() {
            return;
        }
        if let Flushing::Thread { completed, .. } = &self.flushing {
            match completed.recv() {
                Ok(outcome) => self.complete(outcome),
                Err(_) => self.lose_flusher(),
            }
        }
    }
}
