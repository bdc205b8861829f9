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

use std::any::Any;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use uuid::Uuid;

use crate::batch::Taken;
use crate::shared::Shared;
use crate::statement_size::StatementSize;
use crate::{
    agent_ids, notifier, FlushReason, FlushReport, Interrupt, MetadataBatch, Publisher, Store,
    StoreError,
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

/// Lets `close` stop a store call that outlives the final flush timeout.
#[derive(Debug)]
pub(crate) struct Cancellation {
    state: Mutex<CancelState>,
    /// Disconnected when `close` gives up, which wakes a worker waiting to retry at
    /// shutdown.
    given_up: crossbeam_channel::Receiver<()>,
}

#[derive(Debug, Default)]
struct CancelState {
    abandoned: bool,
    interrupt: Option<Interrupt>,
    given_up: Option<crossbeam_channel::Sender<()>>,
}

impl Default for Cancellation {
    fn default() -> Self {
        let (sender, given_up) = crossbeam_channel::bounded(0);
        Cancellation {
            state: Mutex::new(CancelState {
                given_up: Some(sender),
                ..CancelState::default()
            }),
            given_up,
        }
    }
}

impl Cancellation {
    /// Holds the interrupt of the call about to start; false when `close` has given up,
    /// in which case the call must not start.
    fn arm(&self, interrupt: Option<Interrupt>) -> bool {
        let mut state = self.state.lock();
        state.interrupt = interrupt;
        !state.abandoned
    }

    fn disarm(&self) {
        self.state.lock().interrupt = None;
    }

    /// Gives up on the store: refuses further calls, runs `count_unwritten` while no rows
    /// can move between the batch and the flush in flight (see
    /// [`moving_rows`](Self::moving_rows)), and returns the interrupt of the call in flight,
    /// for the caller to fire off its own thread (user code may block or panic).
    pub(crate) fn abandon(&self, count_unwritten: impl FnOnce()) -> Option<Interrupt> {
        let mut state = self.state.lock();
        count_unwritten();
        state.abandoned = true;
        state.given_up = None;
        state.interrupt.take()
    }

    /// Moves rows between the batch and the flush in flight in `counters`: under the lock
    /// [`abandon`](Self::abandon) counts under, so that count never sees the rows in
    /// neither place (zero unwritten while they are) or in both (twice). Once per flush.
    pub(crate) fn moving_rows(&self, update: impl FnOnce()) {
        let _state = self.state.lock();
        update();
    }

    /// Ready (disconnected) once `close` has given up.
    pub(crate) fn given_up(&self) -> &crossbeam_channel::Receiver<()> {
        &self.given_up
    }

    /// Runs `record` unless `close` has given up on the store; says whether it ran.
    /// Under the lock, so `close`'s own record of what is unwritten cannot be overwritten.
    pub(crate) fn unless_abandoned(&self, record: impl FnOnce()) -> bool {
        let state = self.state.lock();
        if state.abandoned {
            return false;
        }
        record();
        true
    }

    pub(crate) fn is_abandoned(&self) -> bool {
        self.state.lock().abandoned
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
    /// On the `mdbatch-notify` thread; joined when the flusher is dropped.
    Thread(Option<JoinHandle<()>>),
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
        let size = StatementSize::new(batch_size, store.max_batch_rows());
        let parallel = store.parallel_batches().max(1);
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
        let count = job.batch.len();
        let start = self.shared.clock.now();
        tracing::debug!(
            reason = job.reason.as_str(),
            count,
            "flushing metadata batch"
        );
        let mut written = Written {
            cancel_budget: cancel_budget(count),
            ..Written::default()
        };
        let (batch, emptied) = job.batch.into_columns();
        // As Go: before the store call, for every agent of the batch.
        self.shared
            .metrics
            .observe_utilization(&batch.agent_ids, &mut self.keys_per_agent);
        self.write(batch, &mut written);
        let agents = self.stored_agents(&written.agent_ids);
        let mut report = FlushReport {
            reason: job.reason,
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
        self.announce(job.seq, &agents, &mut report, start, failed);
        FlushOutcome {
            seq: job.seq,
            report,
            retained: written.retained,
            failed,
            emptied,
        }
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
                written.error = Some(StoreError::Canceled);
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
                self.shared
                    .counters
                    .lost_to_panics
                    .fetch_add(rows as u64, Relaxed);
                tracing::error!(
                    rows,
                    panic = %message,
                    "metadata store panicked; the rows of this call are lost"
                );
                written.stopped = true;
                written.panicked = true;
                written.error = Some(StoreError::Unavailable(format!(
                    "store panicked: {message}"
                )));
                return Vec::new();
            }
        };
        let tried = results.len();
        let mut canceled = Vec::new();
        let mut chunks = chunks.into_iter();
        // Results first: `zip` takes from its first iterator first, and a chunk taken past
        // the last result would be lost.
        for (result, chunk) in results.into_iter().zip(chunks.by_ref()) {
            written.statements += 1;
            canceled.extend(self.outcome(chunk, result, written));
        }
        // Chunks the store did not try: kept, and this flush writes nothing more.
        for mut chunk in chunks {
            if !written.stopped {
                tracing::error!(
                    tried,
                    "metadata store stopped before trying every batch of a call without \
                     saying why; the rest are kept and retried"
                );
                written.stopped = true;
                written.error = Some(StoreError::Unavailable(format!(
                    "the store tried {tried} of the batches handed to it"
                )));
            }
            written.retained.append(&mut chunk);
        }
        canceled
    }

    /// What one statement's result calls for; a canceled chunk comes back.
    fn outcome(
        &mut self,
        mut chunk: MetadataBatch,
        result: Result<u64, StoreError>,
        written: &mut Written,
    ) -> Option<MetadataBatch> {
        let rows = chunk.len();
        match result {
            Ok(updated) => {
                self.count_stored(&chunk, updated);
                written.updated += updated;
                written.agent_ids.append(&mut chunk.agent_ids);
            }
            Err(StoreError::Rejected(message)) => {
                self.count_store_error();
                if rows == 1 {
                    self.reject(&chunk, &message);
                    written.rejected += 1;
                    written.error = Some(StoreError::Rejected(message));
                } else {
                    tracing::debug!(
                        rows,
                        error = %message,
                        "the database refused a chunk; splitting it to find the refused rows"
                    );
                    let second_half = chunk.split_off(rows / 2);
                    self.write_chunk(chunk, written);
                    self.write_chunk(second_half, written);
                }
            }
            Err(StoreError::Canceled) => {
                self.count_store_error();
                written.error = Some(StoreError::Canceled);
                return Some(chunk);
            }
            Err(error) => {
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
    fn call_store(
        &mut self,
        chunks: &[MetadataBatch],
    ) -> Result<Vec<Result<u64, StoreError>>, StoreCall> {
        let store = &mut self.store;
        let counters = &self.shared.counters;
        let result = catch_unwind(AssertUnwindSafe(|| {
            let interrupt = store.interrupt_handle();
            if !self.shared.cancellation.arm(interrupt) {
                return None;
            }
            let conflicts_before = store.conflicts();
            let started = self.shared.clock.now();
            counters.set_store_call_started(Some(started));
            let results = match chunks {
                [chunk] => vec![store.batch_update(chunk)],
                _ => store.batch_update_many(chunks),
            };
            let took = self.shared.clock.now().saturating_duration_since(started);
            Some((
                results,
                store.conflicts().saturating_sub(conflicts_before),
                took,
            ))
        }));
        counters.set_store_call_started(None);
        self.shared.cancellation.disarm();
        match result {
            Ok(Some((results, conflicts, took))) => {
                let rows = chunks.iter().map(MetadataBatch::len).sum();
                self.count_conflicts(rows, conflicts, results.iter().all(Result::is_ok));
                // Statements in one call run at once: each took the call's time. A
                // retried statement's time includes the wait for the conflict.
                for (chunk, result) in chunks.iter().zip(&results) {
                    match result {
                        Ok(_) if conflicts == 0 => self.size.observe(chunk.len(), took),
                        Err(StoreError::Canceled) => self.size.reset(),
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
        c.flushed.fetch_add(rows as u64, Relaxed);
        c.unmatched
            .fetch_add((rows as u64).saturating_sub(updated), Relaxed);
        c.release_in_flight(rows, crate::batch::batch_bytes(chunk));
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
        self.shared.counters.rejected.fetch_add(1, Relaxed);
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
    fn announce(
        &mut self,
        seq: u64,
        agents: &[Uuid],
        report: &mut FlushReport,
        start: std::time::Instant,
        failed: bool,
    ) {
        let shared = &self.shared;
        if let Announcer::Inline(publisher) = &mut self.announcer {
            report.publish_errors = notifier::publish(&mut **publisher, shared, agents);
            shared.notifier.published_inline(seq, report.publish_errors);
        }
        report.elapsed = shared.clock.now().saturating_duration_since(start);
        self.record(seq, report, failed);
        if let Announcer::Thread(_) = self.announcer {
            self.shared.notifier.announce(seq, agents);
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
    /// Lets the publisher thread announce what is queued, and waits for it.
    fn drop(&mut self) {
        if let Announcer::Thread(thread) = &mut self.announcer {
            self.shared.notifier.close();
            if let Some(thread) = thread.take() {
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

pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}
