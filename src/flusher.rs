//! One flush: write the batch in chunks, isolate refused and locked rows, announce the agents.
//!
//! [`Flusher::flush`] runs on the `mdbatch-flush` thread (or inline on the worker thread,
//! in [`FlushMode::Inline`](crate::FlushMode::Inline)) and owns the user's store, so nothing
//! else ever waits on the database. Its steps, each small:
//!
//! 1. [`Flusher::write`]: the batch goes out in chunks of `batch_size` rows (more for a
//!    store that takes them, sized by [`StatementSize`] so the round trip is a tenth of
//!    each), each sorted by (agent, key), the lock order every replica shares; so a backlog
//!    that accrued during a slow flush or an outage drains at the database's pace instead of
//!    timing out as one huge statement. Up to [`Store::parallel_batches`] chunks go to one
//!    `Store::batch_update_many` call, which may run their statements at once.
//! 2. [`Flusher::try_chunks`]: one statement per chunk, each result read as its own call's
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
//! 3. [`Flusher::announce`]: the distinct agents of the stored rows go to the
//!    `mdbatch-notify` thread ([`crate::notifier`]), so the next write never waits for a
//!    publish; inline, they are published here, as Go does.
//! 4. [`Flusher::record`]: totals, metrics and the report, all timed on the injected clock.
//!
//! Every failed store call is logged on exactly one line, here: the stores do not log
//! their own failures.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use uuid::Uuid;

use crate::batch::Taken;
use crate::panic::panic_message;
use crate::shared::Shared;
use crate::statement_size::StatementSize;
use crate::{
    agent_ids, notifier, BatchResult, FlushReason, FlushReport, MetadataBatch, Publisher, Store,
    StoreError, StoreErrorKind,
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

/// What the store calls of one flush came to.
#[derive(Default)]
struct Written {
    /// Agent IDs of the stored rows, one per row.
    agent_ids: Vec<Uuid>,
    updated: u64,
    rejected: usize,
    retained: MetadataBatch,
    statements: usize,
    error: Option<StoreError>,
    /// No more store calls this flush: the store is unavailable or panicked, `close` gave
    /// up, or the canceled statements spent their budget. Later chunks are kept.
    stopped: bool,
    panicked: bool,
    /// Canceled statements this flush still handles (by splitting or keeping one row)
    /// before it stops.
    cancel_budget: u32,
}

/// Where a flush's agents are announced.
pub(crate) enum Announcer {
    /// On the flushing thread, as Go does ([`FlushMode::Inline`](crate::FlushMode::Inline)).
    Inline(Box<dyn Publisher>),
    /// On the `mdbatch-notify` thread, waited for when the flusher is dropped.
    Thread {
        thread: Option<JoinHandle<()>>,
        /// Disconnected when the thread ends.
        ended: crossbeam_channel::Receiver<()>,
    },
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
        let size = StatementSize::new(batch_size, capabilities.max_batch_rows());
        let parallel = capabilities.parallel_batches();
        Flusher {
            store,
            announcer,
            shared,
            size,
            parallel,
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

    pub(crate) fn flush(&mut self, job: FlushJob) -> FlushOutcome {
        let FlushJob { seq, reason, batch } = job;
        let count = batch.len();
        let mut written = Written {
            cancel_budget: cancel_budget(count),
            ..Written::default()
        };
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
            self.write(batch, &mut written);
        }));
        if let Err(panic) = body {
            self.flush_panicked(&panic_message(&*panic), &mut written);
        }
        let agents = self.stored_agents(&written.agent_ids);
        let mut report = FlushReport {
            reason,
            count,
            agents: agents.len(),
            chunks: agents.len().div_ceil(agent_ids::MAX_IDS_PER_CHUNK),
            elapsed: Duration::ZERO,
            stored: written.agent_ids.len(),
            updated: written.updated,
            rejected: written.rejected,
            retained: written.retained.len(),
            statements: written.statements,
            publish_errors: 0,
            error: written.error.clone(),
        };
        // Kept rows mean a retry on the backoff, even when other rows were stored: a
        // locked row must not be retried, at the cost of a split, by every capacity flush.
        let failed = written.panicked || !written.retained.is_empty();
        self.announce(seq, &agents, &mut report, start, failed);
        FlushOutcome {
            seq,
            report,
            retained: written.retained,
            failed,
            emptied,
        }
    }

    /// A panic outside the store calls (they catch their own): the rows this flush had
    /// neither stored, refused, lost to a store panic nor kept were being handled, and are
    /// lost; the flush ends with what it has.
    fn flush_panicked(&self, message: &str, written: &mut Written) {
        let counters = &self.shared.counters;
        self.shared.cancellation.disarm();
        counters.set_store_call_started(None);
        let kept = written.retained.len();
        let kept_bytes = crate::batch::batch_bytes(&written.retained);
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
        written.stopped = true;
        written.panicked = true;
        written.error = Some(StoreError::unavailable(format!(
            "the flush panicked: {message}"
        )));
    }

    /// Writes `batch` in chunks of `batch_size` rows, or as [`StatementSize`] grows them for
    /// a store that takes more, each in (agent, key) order; up to
    /// [`Store::parallel_batches`] chunks at once.
    fn write(&mut self, mut batch: MetadataBatch, written: &mut Written) {
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
            let canceled = self.try_chunks(chunks, written);
            for chunk in canceled {
                self.canceled(chunk, written);
            }
        }
    }

    /// Writes one chunk, splitting it while the database refuses its data or cancels it.
    fn write_chunk(&mut self, chunk: MetadataBatch, written: &mut Written) {
        if let Some(canceled) = self.try_chunk(chunk, written) {
            self.canceled(canceled, written);
        }
    }

    /// One statement for `chunk`; see [`try_chunks`](Self::try_chunks).
    fn try_chunk(&mut self, chunk: MetadataBatch, written: &mut Written) -> Option<MetadataBatch> {
        self.try_chunks(vec![chunk], written).pop()
    }

    /// One statement per chunk, in one store call, and whatever each outcome calls for, but
    /// for a cancel: the canceled chunks come back, for the caller to decide how to split
    /// them.
    fn try_chunks(
        &mut self,
        mut chunks: Vec<MetadataBatch>,
        written: &mut Written,
    ) -> Vec<MetadataBatch> {
        if written.stopped {
            for chunk in &mut chunks {
                written.retained.append(chunk);
            }
            return Vec::new();
        }
        let results = match self.call_store(&chunks) {
            Ok(results) => results,
            Err(StoreCall::Abandoned) => {
                written.stopped = true;
                written.error = Some(StoreError::canceled());
                for chunk in &mut chunks {
                    written.retained.append(chunk);
                }
                return Vec::new();
            }
            Err(StoreCall::Panicked(message)) => {
                let rows: usize = chunks.iter().map(MetadataBatch::len).sum();
                written.statements += chunks.len();
                self.count_store_error();
                self.shared.counters.panics.fetch_add(1, Relaxed);
                let bytes = chunks.iter().map(crate::batch::batch_bytes).sum();
                let counters = &self.shared.counters;
                self.shared.cancellation.moving_rows(|| {
                    counters.lost_to_panics.fetch_add(rows as u64, Relaxed);
                    counters.release_in_flight(rows, bytes);
                });
                tracing::error!(
                    rows,
                    panic = %message,
                    "metadata store panicked; the rows of this call are lost"
                );
                written.stopped = true;
                written.panicked = true;
                written.error = Some(StoreError::unavailable(format!(
                    "store panicked: {message}"
                )));
                return Vec::new();
            }
        };
        let handed = results.len();
        let tried = results
            .iter()
            .filter(|result| !matches!(result, BatchResult::NotTried))
            .count();
        let mut canceled = Vec::new();
        for (result, mut chunk) in results.into_iter().zip(chunks) {
            if let BatchResult::NotTried = result {
                // Kept, and this flush writes nothing more.
                if !written.stopped {
                    written.stopped = true;
                    written.error = Some(StoreError::unavailable(format!(
                        "the store tried {tried} of the {handed} batches handed to it"
                    )));
                }
                written.retained.append(&mut chunk);
                continue;
            }
            written.statements += 1;
            canceled.extend(self.outcome(chunk, result, written));
        }
        canceled
    }

    /// What one statement's result calls for; a canceled chunk comes back.
    fn outcome(
        &mut self,
        mut chunk: MetadataBatch,
        result: BatchResult,
        written: &mut Written,
    ) -> Option<MetadataBatch> {
        let rows = chunk.len();
        let error = match result {
            BatchResult::Written(done) => {
                let updated = done.updated();
                written.updated += updated;
                // Recorded before the metrics recorder (user code) runs: a stored row is
                // announced even if that panics.
                written.agent_ids.extend_from_slice(&chunk.agent_ids);
                self.count_stored(&chunk, updated);
                return None;
            }
            BatchResult::Failed(error) => error,
            BatchResult::NotTried => unreachable!("handled by the caller"),
        };
        match error.kind() {
            StoreErrorKind::Rejected => {
                self.count_store_error();
                if rows == 1 {
                    self.reject(&chunk, error.message());
                    written.rejected += 1;
                    written.error = Some(error);
                } else {
                    tracing::debug!(
                        rows,
                        error = %error.message(),
                        "the database refused a chunk; splitting it to find the refused rows"
                    );
                    let second_half = chunk.split_off(rows / 2);
                    self.write_chunk(chunk, written);
                    self.write_chunk(second_half, written);
                }
            }
            StoreErrorKind::Canceled | StoreErrorKind::ConflictsExhausted => {
                self.count_store_error();
                written.error = Some(error);
                return Some(chunk);
            }
            _ => {
                self.count_store_error();
                tracing::error!(
                    rows,
                    error = %error,
                    "metadata store call failed; the rows are kept and retried"
                );
                written.stopped = true;
                written.error = Some(error);
                written.retained.append(&mut chunk);
            }
        }
        None
    }

    /// A canceled chunk (statement or lock timeout): split it so the writable rows are
    /// written, keep a lone canceled row for a retry, and stop once the budget is spent.
    ///
    /// Both halves are tried before either is split further. When both are canceled too,
    /// no single row is to blame: the table is locked as a whole (a migration's `ALTER
    /// TABLE`, a `LOCK TABLE`) or the server is too slow for any statement, and splitting
    /// on would cost a timeout per level. The flush stops after three timeouts and keeps
    /// the rest for the retry.
    fn canceled(&mut self, mut chunk: MetadataBatch, written: &mut Written) {
        let rows = chunk.len();
        if written.stopped {
            // Another chunk of the same call stopped the flush.
            written.retained.append(&mut chunk);
        } else if self.shared.cancellation.is_abandoned() {
            // `close` gave up on the store: no more statements, the rows are counted as
            // unwritten.
            tracing::error!(
                rows,
                "metadata store call canceled at shutdown; the rows are not written"
            );
            written.stopped = true;
            written.retained.append(&mut chunk);
        } else if written.cancel_budget == 0 {
            tracing::warn!(
                rows,
                "metadata store call canceled (statement or lock timeout) again; this flush \
                 stops splitting and keeps the rest for the retry"
            );
            written.stopped = true;
            written.retained.append(&mut chunk);
        } else if rows == 1 {
            written.cancel_budget -= 1;
            tracing::warn!(
                agent_id = %chunk.agent_ids[0],
                key = %chunk.keys[0],
                "metadata row canceled on its own (a lock held elsewhere, or a statement \
                 timeout); it is kept and retried with backoff"
            );
            written.retained.append(&mut chunk);
        } else {
            written.cancel_budget -= 1;
            tracing::debug!(
                rows,
                "metadata store call canceled; splitting the chunk to write what can be written"
            );
            let second_half = chunk.split_off(rows / 2);
            let first = self.try_chunk(chunk, written);
            let second = self.try_chunk(second_half, written);
            match (first, second) {
                // Halves of one row each: two rows locked, each kept on its own.
                (Some(mut first), Some(mut second)) if first.len() > 1 => {
                    tracing::warn!(
                        rows,
                        "metadata store call canceled, and both its halves too: the table \
                         is locked as a whole or the server is too slow, not one row; this \
                         flush stops splitting and keeps the rest for the retry"
                    );
                    written.stopped = true;
                    written.retained.append(&mut first);
                    written.retained.append(&mut second);
                }
                (first, second) => {
                    for half in [first, second].into_iter().flatten() {
                        self.canceled(half, written);
                    }
                }
            }
        }
    }

    /// One store call for `chunks`: `batch_update` for one, `batch_update_many` for more.
    /// Returns a result per chunk the store tried.
    fn call_store(&mut self, chunks: &[MetadataBatch]) -> Result<Vec<BatchResult>, StoreCall> {
        let store = &mut self.store;
        let counters = &self.shared.counters;
        // Read before the call: a clock that panics here has cost no write.
        let started = self.shared.clock.now();
        let result = catch_unwind(AssertUnwindSafe(|| {
            let interrupt = store.interrupt_handle();
            if !self.shared.cancellation.arm(interrupt) {
                return None;
            }
            counters.set_store_call_started(Some(started));
            let mut results = match chunks {
                [chunk] => vec![BatchResult::from(store.batch_update(chunk))],
                _ => store.batch_update_many(chunks),
            };
            if results.len() < chunks.len() {
                tracing::warn!(
                    batches = chunks.len(),
                    results = results.len(),
                    "the metadata store answered fewer results than batches; the batches \
                     without one are read as not tried and kept (answer \
                     BatchResult::NotTried for them)"
                );
            }
            results.resize(chunks.len(), BatchResult::NotTried);
            Some(results)
        }));
        counters.set_store_call_started(None);
        self.shared.cancellation.disarm();
        match result {
            Ok(Some(results)) => {
                let conflicts = results.iter().map(conflicts_of).sum();
                // What the store answered stands whatever the clock does after it: rows it
                // wrote are counted and announced.
                let took = catch_unwind(AssertUnwindSafe(|| self.shared.clock.now()));
                let took = match took {
                    Ok(now) => Some(now.saturating_duration_since(started)),
                    Err(panic) => {
                        counters.panics.fetch_add(1, Relaxed);
                        tracing::error!(
                            panic = %panic_message(&*panic),
                            "the clock panicked after a store call; its results are kept"
                        );
                        None
                    }
                };
                let rows = chunks.iter().map(MetadataBatch::len).sum();
                let all_written = results
                    .iter()
                    .all(|result| matches!(result, BatchResult::Written(_)));
                self.count_conflicts(rows, conflicts, all_written);
                // Statements in one call run at once: each took the call's time. A
                // retried statement's time includes the wait for the conflict.
                for (chunk, result) in chunks.iter().zip(&results) {
                    match (result, took) {
                        (BatchResult::Written(_), Some(took)) if conflicts == 0 => {
                            self.size.observe(chunk.len(), took)
                        }
                        (BatchResult::Failed(error), _)
                            if error.kind() == StoreErrorKind::Canceled =>
                        {
                            self.size.reset()
                        }
                        _ => {}
                    }
                }
                Ok(results)
            }
            Ok(None) => Err(StoreCall::Abandoned),
            Err(panic) => Err(StoreCall::Panicked(panic_message(&*panic))),
        }
    }

    /// Statements the store ran again because another writer's transaction conflicted with
    /// them: counted, and logged once per call.
    fn count_conflicts(&self, rows: usize, conflicts: u64, written: bool) {
        if conflicts == 0 {
            return;
        }
        self.shared.counters.conflicts.fetch_add(conflicts, Relaxed);
        self.shared.metrics.conflicts.increment(conflicts);
        tracing::warn!(
            rows,
            conflicts,
            written,
            "a metadata statement conflicted with another writer's transaction (a deadlock \
             or a serialization failure) and was retried; another writer is locking these \
             rows in another order"
        );
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
        if let Announcer::Inline(publisher) = &mut self.announcer {
            report.publish_errors = notifier::publish(&mut **publisher, shared, agents);
            shared.notifier.published_inline(seq, report.publish_errors);
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
        if let Announcer::Thread { .. } = self.announcer {
            shared.notifier.announce(seq, agents, shared);
        }
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

impl Drop for Flusher {
    /// Lets the publisher thread announce what is queued, and waits for it; but only until
    /// `close` gives up: a publisher that never returns holds its own thread, not `close`.
    fn drop(&mut self) {
        if let Announcer::Thread { thread, ended } = &mut self.announcer {
            self.shared.notifier.close();
            let given_up = self.shared.cancellation.given_up();
            crossbeam_channel::select! {
                recv(ended) -> _ => {}
                recv(given_up) -> _ => {}
            }
            let has_ended = matches!(
                ended.try_recv(),
                Err(crossbeam_channel::TryRecvError::Disconnected)
            );
            if let Some(thread) = thread.take().filter(|_| has_ended) {
                let _ = thread.join();
            }
        }
    }
}

/// Canceled statements one flush of `rows` handles before it stops: `⌈log2 rows⌉ + 1`,
/// what isolating one locked row takes (the whole chunk, then one half per level down to
/// the row). The next canceled statement stops the flush.
fn cancel_budget(rows: usize) -> u32 {
    rows.max(1).next_power_of_two().trailing_zeros() + 1
}

/// Why a store call gave no results.
enum StoreCall {
    /// `close` gave up before the call started.
    Abandoned,
    Panicked(String),
}

/// Statements a result says the store ran again after a conflict.
fn conflicts_of(result: &BatchResult) -> u64 {
    match result {
        BatchResult::Written(written) => written.conflicts(),
        BatchResult::Failed(error) => error.conflicts(),
        _ => 0,
    }
}
