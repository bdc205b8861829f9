//! One flush: write the batch in chunks, isolate refused and locked rows, announce the agents.
//!
//! [`Flusher::flush`] runs on the `mdbatch-flush` thread (or inline on the worker thread,
//! in [`FlushMode::Inline`](crate::FlushMode::Inline)) and owns the user's store, so nothing
//! else ever waits on the database. Its steps, each small:
//!
//! 1. `Flusher::write`: the batch goes out in chunks of `batch_size` rows (more for a
//!    store that takes them, sized by [`StatementSize`] so the round trip is a tenth of
//!    each), each sorted by (agent, key), the lock order every replica shares; so a backlog
//!    that accrued during a slow flush or an outage drains at the database's pace instead of
//!    timing out as one huge statement. Up to [`Store::parallel_batches`] chunks go to one
//!    `Store::batch_update_many` call, which may run their statements at once.
//! 2. `Flusher::try_chunks`: one statement per chunk, each result read as its own call's
//!    (a lone chunk is one `Store::batch_update`).
//!    - `Rejected`: the chunk is split in halves and each written again, until the refused
//!      rows stand alone; only they are dropped (about `2·log2(n)` extra statements per
//!      refused row).
//!    - `Canceled` (a statement or lock timeout): split the same way, so the rows that can
//!      be written are; a single row still canceled (a locked row) is kept for a retry,
//!      never dropped. Both halves are tried before either is split again, and when both
//!      are canceled too the table is locked as a whole: the flush stops there, three
//!      timeouts in, instead of one per level. A flush spends at most `⌈log2 n⌉ + 1`
//!      canceled statements (enough to isolate one locked row among `n`), then keeps the
//!      rest for the next flush. After `close` has given up on the store, nothing is split.
//!    - A statement that conflicted with another writer (a deadlock, a serialization
//!      failure) was retried by the store ([`Store::conflicts`]); it is counted and logged
//!      here, once per call.
//!    - `Unavailable`, or `close` gave up: this chunk and the rest are kept for a retry, as
//!      are the chunks of a call that the store did not try.
//! 3. `Flusher::announce`: the distinct agents of the stored rows go to the
//!    `mdbatch-notify` thread ([`crate::notifier`]), so the next write never waits for a
//!    publish; inline, they are published here, as Go does.
//! 4. `Flusher::record`: totals, metrics and the report, all timed on the injected clock.
//!
//! Every failed store call is logged on exactly one line, here: the stores do not log
//! their own failures.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::announcer::Announcer;
use crate::batch::Taken;
use crate::panic::panic_message;
use crate::progress::{OnCanceled, Progress, Stop};
use crate::shared::Shared;
use crate::statement_size::StatementSize;
use crate::store_call::{self, Answered, NoAnswer};
use crate::{
    agent_ids, BatchResult, FlushReason, FlushReport, MetadataBatch, Store, StoreErrorKind,
};

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
    store: Box<dyn Store>,
    announcer: Announcer,
    shared: Arc<Shared>,
    /// How many rows the next statement carries.
    size: StatementSize,
    /// How many statements one store call may carry, at least 1.
    parallel: usize,
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
        let capabilities = store.capabilities();
        Flusher {
            size: StatementSize::new(batch_size, capabilities.max_batch_rows()),
            parallel: capabilities.parallel_batches(),
            store,
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
                .metrics
                .observe_utilization(&batch.agent_ids, &mut self.keys_per_agent);
            self.write(batch, &mut progress);
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
        let counters = &self.shared.counters;
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

    /// Writes `batch` in chunks of `batch_size` rows, or as [`StatementSize`] grows them for
    /// a store that takes more, each in (agent, key) order; up to the store's
    /// parallel batches at once.
    fn write(&mut self, mut batch: MetadataBatch, progress: &mut Progress) {
        while !batch.is_empty() {
            let mut chunks = Vec::with_capacity(self.parallel);
            while chunks.len() < self.parallel && !batch.is_empty() {
                // From the end, so each split moves only the chunk's rows.
                let rows = self.size.next_rows(batch.len());
                let mut chunk = batch.split_off(batch.len() - rows);
                // One order for every statement of every replica: no two can deadlock,
                // however many run at once. Each chunk on its own, which keeps the sort in
                // cache (a whole 100,000-row flush sorted at once cost 4x as much), and
                // every half of a split chunk is in order.
                chunk.sort_by_agent_and_key();
                chunks.push(chunk);
            }
            for chunk in self.try_chunks(chunks, progress) {
                self.canceled(chunk, progress);
            }
        }
    }

    /// One statement for `chunk`; see [`try_chunks`](Self::try_chunks).
    fn try_chunk(
        &mut self,
        chunk: MetadataBatch,
        progress: &mut Progress,
    ) -> Option<MetadataBatch> {
        self.try_chunks(vec![chunk], progress).pop()
    }

    /// One statement per chunk, in one store call, and whatever each result calls for, but
    /// for a cancel: the canceled chunks come back, for the caller to decide how to split
    /// them.
    fn try_chunks(
        &mut self,
        mut chunks: Vec<MetadataBatch>,
        progress: &mut Progress,
    ) -> Vec<MetadataBatch> {
        if progress.stopped() {
            chunks
                .iter_mut()
                .for_each(|chunk| progress.retained.append(chunk));
            return Vec::new();
        }
        let answered = match store_call::call(&mut *self.store, &self.shared, &chunks) {
            Ok(answered) => answered,
            Err(NoAnswer::Abandoned) => {
                for chunk in &mut chunks {
                    progress.stop(Stop::Abandoned, chunk);
                }
                return Vec::new();
            }
            Err(NoAnswer::Panicked(message)) => {
                self.store_panicked(&chunks, &message, progress);
                return Vec::new();
            }
        };
        self.observe(&chunks, &answered);
        let handed = chunks.len();
        let tried = answered
            .results
            .iter()
            .filter(|result| !matches!(result, BatchResult::NotTried))
            .count();
        let mut canceled = Vec::new();
        for (result, mut chunk) in answered.results.into_iter().zip(chunks) {
            let error = match result {
                BatchResult::Written(written) => {
                    progress.statements += 1;
                    progress.updated += written.updated();
                    // Recorded before the metrics recorder (user code) runs: a stored row
                    // is announced even if that panics.
                    progress.agent_ids.extend_from_slice(&chunk.agent_ids);
                    self.count_stored(&chunk, written.updated());
                    continue;
                }
                BatchResult::NotTried => {
                    progress.stop(Stop::NotTried { tried, handed }, &mut chunk);
                    continue;
                }
                BatchResult::Failed(error) => error,
            };
            progress.statements += 1;
            self.count_store_error();
            match error.kind() {
                StoreErrorKind::Rejected if chunk.len() == 1 => {
                    self.reject(&chunk, error.message());
                    progress.rejected += 1;
                    progress.error = Some(error);
                }
                StoreErrorKind::Rejected => {
                    tracing::debug!(
                        rows = chunk.len(),
                        error = %error.message(),
                        "the database refused a chunk; splitting it to find the refused rows"
                    );
                    let second_half = chunk.split_off(chunk.len() / 2);
                    for half in [chunk, second_half] {
                        if let Some(canceled) = self.try_chunk(half, progress) {
                            self.canceled(canceled, progress);
                        }
                    }
                }
                StoreErrorKind::Canceled | StoreErrorKind::ConflictsExhausted => {
                    progress.error = Some(error);
                    canceled.push(chunk);
                }
                _ => progress.stop(Stop::Failed(error), &mut chunk),
            }
        }
        canceled
    }

    /// The store panicked: the rows of the call are lost, counted, and the flush stops.
    fn store_panicked(&self, chunks: &[MetadataBatch], message: &str, progress: &mut Progress) {
        let rows: usize = chunks.iter().map(MetadataBatch::len).sum();
        progress.statements += chunks.len();
        self.count_store_error();
        let counters = &self.shared.counters;
        counters.panics.fetch_add(1, Relaxed);
        let bytes = chunks.iter().map(crate::batch::batch_bytes).sum();
        self.shared.cancellation.moving_rows(|| {
            counters.lost_to_panics.fetch_add(rows as u64, Relaxed);
            counters.release_in_flight(rows, bytes);
        });
        tracing::error!(
            rows,
            panic = %message,
            "metadata store panicked; the rows of this call are lost"
        );
        let reason = Stop::Panicked(format!("store panicked: {message}"));
        progress.stop(reason, &mut MetadataBatch::default());
    }

    /// A canceled chunk (statement or lock timeout, or conflicts that ran out): split it so
    /// the writable rows are written, keep a lone canceled row for a retry, and stop once
    /// the budget is spent ([`Progress::on_canceled`]).
    ///
    /// Both halves are tried before either is split further. When both are canceled too,
    /// no single row is to blame: the table is locked as a whole (a migration's `ALTER
    /// TABLE`, a `LOCK TABLE`) or the server is too slow for any statement, and splitting
    /// on would cost a timeout per level. The flush stops after three timeouts and keeps
    /// the rest for the retry.
    fn canceled(&mut self, mut chunk: MetadataBatch, progress: &mut Progress) {
        if progress.stopped() {
            // Another chunk of the same call stopped the flush.
            progress.retained.append(&mut chunk);
            return;
        }
        let rows = chunk.len();
        match progress.on_canceled(rows, self.shared.cancellation.is_abandoned()) {
            OnCanceled::Stop(reason) => progress.stop(reason, &mut chunk),
            OnCanceled::KeepRow => progress.keep_row(&mut chunk),
            OnCanceled::Split => {
                tracing::debug!(
                    rows,
                    "metadata store call canceled; splitting the chunk to write what can be \
                     written"
                );
                let second_half = chunk.split_off(rows / 2);
                let first = self.try_chunk(chunk, progress);
                let second = self.try_chunk(second_half, progress);
                match (first, second) {
                    // Halves of one row each: two rows locked, each kept on its own.
                    (Some(mut first), Some(mut second)) if first.len() > 1 => {
                        progress.stop(Stop::TableLocked, &mut first);
                        progress.retained.append(&mut second);
                    }
                    (first, second) => {
                        for half in [first, second].into_iter().flatten() {
                            self.canceled(half, progress);
                        }
                    }
                }
            }
        }
    }

    /// What a call tells beyond its rows: conflicts are counted and logged once per call,
    /// and each statement's time sizes the next ones (those of one call ran at once, so each
    /// took the call's time; a retried statement's time includes the wait for the conflict,
    /// so it is not used). A cancel resets the size.
    fn observe(&mut self, chunks: &[MetadataBatch], answered: &Answered) {
        let conflicts = answered.conflicts;
        if conflicts > 0 {
            let rows: usize = chunks.iter().map(MetadataBatch::len).sum();
            let written = answered
                .results
                .iter()
                .all(|result| matches!(result, BatchResult::Written(_)));
            self.shared.counters.conflicts.fetch_add(conflicts, Relaxed);
            self.shared.metrics.conflicts.increment(conflicts);
            tracing::warn!(
                rows,
                conflicts,
                written,
                "a metadata statement conflicted with another writer's transaction (a \
                 deadlock or a serialization failure) and was retried; another writer is \
                 locking these rows in another order"
            );
        }
        for (chunk, result) in chunks.iter().zip(&answered.results) {
            match (result, answered.took) {
                (BatchResult::Written(_), Some(took)) if conflicts == 0 => {
                    self.size.observe(chunk.len(), took)
                }
                (BatchResult::Failed(error), _) if error.kind() == StoreErrorKind::Canceled => {
                    self.size.reset()
                }
                _ => {}
            }
        }
    }

    /// Counts a stored chunk at once, so `stats()` and `close` see a long flush progress.
    fn count_stored(&self, chunk: &MetadataBatch, updated: u64) {
        let c = &self.shared.counters;
        let rows = chunk.len();
        let bytes = crate::batch::batch_bytes(chunk);
        self.shared.cancellation.moving_rows(|| {
            c.flushed.fetch_add(rows as u64, Relaxed);
            c.release_in_flight(rows, bytes);
        });
        c.unmatched
            .fetch_add((rows as u64).saturating_sub(updated), Relaxed);
        self.shared.metrics.flushed.increment(rows as u64);
        self.shared
            .metrics
            .observe_write_lag(&chunk.collected_at, self.shared.clock.system_time());
    }

    fn count_store_error(&self) {
        self.shared.counters.store_errors.fetch_add(1, Relaxed);
        self.shared.metrics.store_errors.increment(1);
    }

    fn reject(&self, row: &MetadataBatch, message: &str) {
        let counters = &self.shared.counters;
        let bytes = crate::batch::batch_bytes(row);
        self.shared.cancellation.moving_rows(|| {
            counters.rejected.fetch_add(1, Relaxed);
            counters.release_in_flight(1, bytes);
        });
        self.shared.metrics.rejected.increment(1);
        tracing::warn!(
            agent_id = %row.agent_ids[0],
            key = %row.keys[0],
            error = %message,
            "the database refused a metadata row; it is dropped, the rest of the batch is written"
        );
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
            shared.counters.panics.fetch_add(1, Relaxed);
            tracing::error!(
                panic = %panic_message(&*panic),
                "recording a metadata flush panicked (the clock or a metrics recorder); \
                 its totals may be incomplete"
            );
        }
        self.announcer.hand_over(seq, agents, shared);
    }

    fn record(&self, seq: u64, report: &FlushReport, failed: bool) {
        let c = &self.shared.counters;
        // A flush that stored rows counts as one, even when others were kept for a retry:
        // with a locked row, every flush is such a flush, and they must show.
        if !failed || report.stored > 0 {
            c.count_flush(report.reason);
            self.shared.metrics.batch_size.record(report.count as f64);
            self.shared.metrics.batches(report.reason).increment(1);
            self.shared
                .metrics
                .flush_duration(report.reason)
                .record(report.elapsed.as_secs_f64());
        }
        c.set_last_flush(seq, report.clone());
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
