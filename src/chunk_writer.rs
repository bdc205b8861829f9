//! [`ChunkWriter`]: one flush's batch written in chunks, refused rows isolated, canceled
//! chunks split, the rest kept for a retry. The write path of [`crate::flusher`].
//!
//! 1. [`ChunkWriter::write`]: the batch goes out in chunks of `batch_size` rows (more for a
//!    store that takes them, sized by [`StatementSize`] so the round trip is a tenth of
//!    each), each sorted by (agent, key), the lock order every replica shares; so a backlog
//!    that accrued during a slow flush or an outage drains at the database's pace instead of
//!    timing out as one huge statement. Up to the store's parallel batches go to one
//!    `Store::batch_update_many` call, which may run their statements at once.
//! 2. `try_chunks`: one statement per chunk, each result read as its own call's (a lone
//!    chunk is one `Store::batch_update`).
//!    - Rejected: the chunk is split in halves and each written again, until the refused
//!      rows stand alone; only they are dropped (about `2·log2(n)` extra statements per
//!      refused row).
//!    - Canceled (a statement or lock timeout) or conflicts exhausted: split the same way,
//!      so the rows that can be written are; a single row still canceled (a locked row) is
//!      kept for a retry, never dropped. Both halves are tried before either is split
//!      again, and when both are canceled too the table is locked as a whole: the flush
//!      stops there, three timeouts in, instead of one per level. A flush spends at most
//!      `⌈log2 n⌉ + 1` canceled statements (enough to isolate one locked row among `n`),
//!      then keeps the rest for the next flush. After `close` has given up on the store,
//!      nothing is split. [`Progress`] decides, and names why a flush stops.
//!    - Statements the store ran again after a conflict with another writer (a deadlock, a
//!      serialization failure) come back in its results; they are counted and logged here,
//!      once per call.
//!    - Unavailable, or `close` gave up: this chunk and the rest are kept for a retry, as
//!      are the chunks of a call that the store did not try.
//!
//! Every failed store call is logged on exactly one line, here or in [`Progress::stop`]:
//! the stores do not log their own failures.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use crate::progress::{OnCanceled, Progress, Stop};
use crate::shared::Shared;
use crate::statement_size::StatementSize;
use crate::store_call::{self, Answered, NoAnswer};
use crate::{BatchResult, MetadataBatch, Store, StoreError, StoreErrorKind};

/// Writes batches through the user's store, one statement per chunk.
pub(crate) struct ChunkWriter {
    store: Box<dyn Store>,
    shared: Arc<Shared>,
    /// How many rows the next statement carries.
    size: StatementSize,
    /// How many statements one store call may carry, at least 1.
    parallel: usize,
}

impl ChunkWriter {
    /// Reads the store's capabilities, once.
    pub(crate) fn new(store: Box<dyn Store>, shared: Arc<Shared>, batch_size: usize) -> Self {
        let capabilities = store.capabilities();
        ChunkWriter {
            size: StatementSize::new(batch_size, capabilities.max_batch_rows()),
            parallel: capabilities.parallel_batches(),
            store,
            shared,
        }
    }

    /// Writes `batch` in chunks of `batch_size` rows, or as [`StatementSize`] grows them for
    /// a store that takes more, each in (agent, key) order; up to the store's
    /// parallel batches at once.
    pub(crate) fn write(&mut self, mut batch: MetadataBatch, progress: &mut Progress) {
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
                    let committed = self.shared.clock.system_time();
                    let cancellation = &self.shared.cancellation;
                    let telemetry = &self.shared.telemetry;
                    telemetry.stored(&chunk, written.updated(), committed, cancellation);
                    continue;
                }
                BatchResult::NotTried => {
                    progress.stop(Stop::NotTried { tried, handed }, &mut chunk);
                    continue;
                }
                BatchResult::Failed(error) => error,
            };
            progress.statements += 1;
            self.shared.telemetry.store_error();
            match error.kind() {
                StoreErrorKind::Rejected if chunk.len() == 1 => {
                    self.reject(&chunk, &error);
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
        let counters = &self.shared.telemetry;
        counters.store_error();
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
    /// so it is not used). A cancel, or conflicts that ran out, resets the size.
    fn observe(&mut self, chunks: &[MetadataBatch], answered: &Answered) {
        let conflicts = answered.conflicts;
        if conflicts > 0 {
            let rows: usize = chunks.iter().map(MetadataBatch::len).sum();
            let written = answered
                .results
                .iter()
                .all(|result| matches!(result, BatchResult::Written(_)));
            self.shared.telemetry.conflicts(conflicts);
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
                // Smaller statements time out less, and hold fewer locks to conflict on.
                (BatchResult::Failed(error), _)
                    if matches!(
                        error.kind(),
                        StoreErrorKind::Canceled | StoreErrorKind::ConflictsExhausted
                    ) =>
                {
                    self.size.reset()
                }
                _ => {}
            }
        }
    }

    /// The database refused `row`: counted and logged, and dropped.
    fn reject(&self, row: &MetadataBatch, error: &StoreError) {
        self.shared
            .telemetry
            .rejected(row, &self.shared.cancellation);
        tracing::warn!(
            agent_id = %row.agent_ids[0],
            key = %row.keys[0],
            error = %error.message(),
            "the database refused a metadata row; it is dropped, the rest of the batch is written"
        );
    }
}
