//! One flush: write the batch in chunks, isolate refused and locked rows, announce the agents.
//!
//! [`Flusher::flush`] runs on the `mdbatch-flush` thread (or inline on the worker thread,
//! in [`FlushMode::Inline`](crate::FlushMode::Inline)) and owns the user's store, so nothing
//! else ever waits on the database. Its steps, each small:
//!
//! 1. [`ChunkWriter::write`](crate::chunk_writer::ChunkWriter::write): the batch goes out
//!    in chunks, one statement each, refused rows isolated and dropped, canceled chunks
//!    split, the rest kept for a retry; see [`crate::chunk_writer`].
//! 2. `Flusher::announce`: the distinct agents of the stored rows go to the [`Announcer`]:
//!    to the `mdbatch-notify` thread ([`crate::notifier`]), so the next write never waits for a
//!    publish; inline, they are published here, as Go does.
//! 3. `Flusher::record`: totals, metrics and the report, all timed on the injected clock.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::announcer::Announcer;
use crate::batch::Taken;
use crate::chunk_writer::ChunkWriter;
use crate::panic::panic_message;
use crate::progress::{Progress, Stop};
use crate::shared::Shared;
use crate::{agent_ids, FlushReason, FlushReport, MetadataBatch, Store};

/// A batch handed to the flusher.
pub(crate) struct FlushJob {
    pub(crate) seq: u64,
    pub(crate) reason: FlushReason,
    pub(crate) batch: Taken,
}

/// What the worker needs back from a flush.
pub(crate) struct FlushOutcome {
    pub(crate) seq: u64,
    pub(crate) report: FlushReport,
    /// Rows kept for a retry (store unavailable, statement canceled); the worker merges
    /// them back.
    pub(crate) retained: MetadataBatch,
    /// Rows were kept back, or the store panicked: the worker backs off before the next
    /// try.
    pub(crate) failed: bool,
    /// The job's map, emptied, for the worker to reuse.
    pub(crate) emptied: Taken,
}

impl FlushOutcome {
    /// A flush that could not run at all: every row is kept for the next one.
    pub(crate) fn not_attempted(job: FlushJob) -> Self {
        let count = job.batch.len();
        let (batch, emptied) = job.batch.into_columns();
        FlushOutcome {
            seq: job.seq,
            report: FlushReport {
                reason: job.reason,
                count,
                agents: 0,
                chunks: 0,
                elapsed: Duration::ZERO,
                stored: 0,
                updated: 0,
                rejected: 0,
                retained: count,
                statements: 0,
                publish_errors: 0,
                error: None,
            },
            retained: batch,
            failed: true,
            emptied,
        }
    }
}

/// Runs flushes against the user's store, and announces what they stored.
pub(crate) struct Flusher {
    writer: ChunkWriter,
    announcer: Announcer,
    shared: Arc<Shared>,
    /// Keys per agent of the current flush; kept to reuse its allocation.
    keys_per_agent: HashMap<Uuid, u32, foldhash::fast::RandomState>,
}

impl Flusher {
    pub(crate) fn new(
        store: Box<dyn Store>,
        announcer: Announcer,
        shared: Arc<Shared>,
        batch_size: usize,
    ) -> Self {
        Flusher {
            writer: ChunkWriter::new(store, shared.clone(), batch_size),
            announcer,
            shared,
            keys_per_agent: HashMap::default(),
        }
    }

    /// The flusher thread: flush each job, report each outcome, until the worker hangs up.
    pub(crate) fn run(
        mut self,
        jobs: crossbeam_channel::Receiver<FlushJob>,
        done: crossbeam_channel::Sender<FlushOutcome>,
    ) {
        for job in jobs {
            if done.send(self.flush(job)).is_err() {
                return;
            }
        }
    }

    /// Writes the job's batch, announces the agents it stored, and says what came of it.
    pub(crate) fn flush(&mut self, job: FlushJob) -> FlushOutcome {
        let FlushJob { seq, reason, batch } = job;
        let count = batch.len();
        let mut progress = Progress::new(count);
        let mut emptied = Taken::default();
        let mut start = None;
        // User code runs in here besides the store (the clock, the metrics recorder, a
        // tracing subscriber). A panic loses the rows the flush was handling, counted, but
        // never what it stored, kept or owes its waiters.
        let body = catch_unwind(AssertUnwindSafe(|| {
            start = Some(self.shared.clock.now());
            tracing::debug!(reason = reason.as_str(), count, "flushing metadata batch");
            let (batch, taken) = batch.into_columns();
            emptied = taken;
            // As Go: before the store call, for every agent of the batch.
            self.shared
                .telemetry
                .observe_utilization(&batch.agent_ids, &mut self.keys_per_agent);
            self.writer.write(batch, &mut progress);
        }));
        if let Err(panic) = body {
            self.flush_panicked(&panic_message(&*panic), &mut progress);
        }
        let agents = self.stored_agents(&progress.agent_ids);
        let mut report = FlushReport {
            reason,
            count,
            agents: agents.len(),
            chunks: agents.len().div_ceil(agent_ids::MAX_IDS_PER_CHUNK),
            elapsed: Duration::ZERO,
            stored: progress.agent_ids.len(),
            updated: progress.updated,
            rejected: progress.rejected,
            retained: progress.retained.len(),
            statements: progress.statements,
            publish_errors: 0,
            error: progress.error.clone(),
        };
        // Kept rows mean a retry on the backoff, even when other rows were stored: a
        // locked row must not be retried, at the cost of a split, by every capacity flush.
        let failed = progress.panicked || !progress.retained.is_empty();
        self.announce(seq, &agents, &mut report, start, failed);
        FlushOutcome {
            seq,
            report,
            retained: progress.retained,
            failed,
            emptied,
        }
    }

    /// A panic outside the store calls (they catch their own): the rows this flush had
    /// neither stored, refused, lost to a store panic nor kept were being handled, and are
    /// lost; the flush ends with what it has.
    fn flush_panicked(&self, message: &str, progress: &mut Progress) {
        let counters = &self.shared.telemetry;
        self.shared.cancellation.disarm();
        counters.set_store_call_started(None);
        let kept = progress.retained.len();
        let kept_bytes = crate::batch::batch_bytes(&progress.retained);
        let mut lost = 0;
        self.shared.cancellation.moving_rows(|| {
            lost = counters.in_flight.load(Relaxed).saturating_sub(kept);
            counters.release_in_flight(lost, 0);
            counters.in_flight_bytes.store(kept_bytes, Relaxed);
            counters.lost_to_panics.fetch_add(lost as u64, Relaxed);
        });
        counters.panics.fetch_add(1, Relaxed);
        tracing::error!(
            lost,
            kept,
            panic = %message,
            "a metadata flush panicked outside the store (in the clock, a metrics recorder or \
             a tracing subscriber); the rows it was handling are lost"
        );
        let reason = Stop::Panicked(format!("the flush panicked: {message}"));
        progress.stop(reason, &mut MetadataBatch::default());
    }

    /// The distinct agents of the stored rows (the map is reused for its allocation).
    fn stored_agents(&mut self, stored_agent_ids: &[Uuid]) -> Vec<Uuid> {
        self.keys_per_agent.clear();
        for &agent_id in stored_agent_ids {
            *self.keys_per_agent.entry(agent_id).or_insert(0) += 1;
        }
        self.keys_per_agent.keys().copied().collect()
    }

    /// Announces `agents` and records the flush. Inline, publishes here first, as Go does
    /// (the flush's time includes the publish). Otherwise records the flush first, so the
    /// publisher thread finds it to add its publish errors to, then hands the agents over.
    /// The hand-over is the batcher's own code and comes last, so no panic in the user
    /// code before it can leave a waiter unanswered.
    fn announce(
        &mut self,
        seq: u64,
        agents: &[Uuid],
        report: &mut FlushReport,
        start: Option<std::time::Instant>,
        failed: bool,
    ) {
        let shared = &self.shared;
        if let Some(failures) = self.announcer.publish_inline(seq, agents, shared) {
            report.publish_errors = failures;
        }
        let recorded = catch_unwind(AssertUnwindSafe(|| {
            if let Some(start) = start {
                report.elapsed = shared.clock.now().saturating_duration_since(start);
            }
            self.record(seq, report, failed);
        }));
        if let Err(panic) = recorded {
            shared.telemetry.panics.fetch_add(1, Relaxed);
            tracing::error!(
                panic = %panic_message(&*panic),
                "recording a metadata flush panicked (the clock or a metrics recorder); \
                 its totals may be incomplete"
            );
        }
        self.announcer.hand_over(seq, agents, shared);
    }

    fn record(&self, seq: u64, report: &FlushReport, failed: bool) {
        self.shared.telemetry.flush_completed(seq, report, failed);
        tracing::debug!(
            reason = report.reason.as_str(),
            count = report.count,
            stored = report.stored,
            retained = report.retained,
            rejected = report.rejected,
            statements = report.statements,
            elapsed = ?report.elapsed,
            "flush complete"
        );
    }
}
