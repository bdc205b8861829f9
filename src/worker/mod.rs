//! The worker thread: the select loop that owns the batch. Start reading at
//! [`Worker::serve`].
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
//! flusher writes it in statements of `batch_size` rows, or sized to the path). When the
//! worker keeps up, a capacity flush carries exactly `batch_size` entries.
//!
//! The files of this module, one concept each:
//!
//! | file           | what                                                             |
//! |----------------|------------------------------------------------------------------|
//! | `mod.rs`       | the worker's state and the select loop                           |
//! | `intake.rs`    | taking queued updates into the batch, and the polling pace       |
//! | `retention.rs` | holding the batch to its entry and byte bounds                   |
//! | `flushing.rs`  | the flusher interface: starting a flush, taking its outcome back |
//! | `waiters.rs`   | `sync` and `flush` callers, and when they are answered           |
//! | `shutdown.rs`  | the shutdown after `close`, and dying after a panic              |

mod flushing;
mod intake;
mod retention;
mod shutdown;
mod waiters;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{never, Receiver, RecvError, Select, Sender};
use uuid::Uuid;

pub(crate) use self::flushing::Flushing;
use self::intake::INTAKE_BURST;
use crate::batch::Batch;
use crate::flusher::FlushOutcome;
use crate::panic::panic_message;
use crate::shared::Shared;
use crate::{FlushReason, FlushReport, Metadata};

/// A warning that repeats (keys dropped at `add`, entries dropped at the batch's bound) is
/// logged at warn level at most this often, by the injected clock, and at debug level
/// otherwise, as in Go: a full channel drops on every call, a full batch on every insert.
pub(crate) const WARNING_EVERY: Duration = Duration::from_secs(10);

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

/// The worker thread's state: the batch, the flush in flight, the timer and the callers
/// waiting for flushes.
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
                    let keys = first + self.take_in_queued(INTAKE_BURST);
                    poll = Some(self.poll_wait(keys));
                }
                Event::IntakeDue => {
                    let keys = self.take_in_queued(INTAKE_BURST);
                    poll = (keys > 0).then(|| self.poll_wait(keys));
                }
                Event::Timer => {
                    self.timer = never();
                    self.scheduled_due = true;
                    // While polling, accepted updates may still sit in the channel: the
                    // scheduled flush carries every update accepted before its tick.
                    self.take_in_queued(self.updates.len());
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
}
