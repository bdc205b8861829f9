//! Where a flush writes: the [`Store`] trait and how a write can fail.
//!
//! A store gets one [`MetadataBatch`] of at most `batch_size` rows per call (more if it says
//! so: [`Store::max_batch_rows`]) and writes it with one statement; a flush that carries more
//! makes several calls, or hands several batches to one call of [`Store::batch_update_many`]
//! when the store writes them at once ([`Store::parallel_batches`]). Its error tells the batcher
//! what to do with the rows: keep them and retry ([`StoreError::Unavailable`]), split the
//! batch to write what can be written and keep the rest ([`StoreError::Canceled`]: a
//! timeout or a lock), or look for the rows the database refuses and drop only those
//! ([`StoreError::Rejected`]). Classify with care: calling an outage "rejected" makes the
//! batcher throw good rows away.

use std::fmt;

use crate::MetadataBatch;

/// Writes batches of metadata; [`PgStore`](crate::postgres::PgStore) is the PostgreSQL one,
/// [`MemoryStore`](crate::MemoryStore) the in-process one.
///
/// The batcher calls it from its flusher thread only, one call at a time.
///
/// A store that wraps another (to time or count its calls) forwards every method the inner
/// store implements, not only `batch_update`: without `interrupt_handle`, `close` cannot stop
/// a hung call; without `conflicts`, none are counted; without `max_batch_rows`, statements
/// stay at `batch_size`; without `parallel_batches` and `batch_update_many`, one statement
/// is in flight at a time.
///
/// ```
/// use metadata_batcher::{MetadataBatch, Store, StoreError};
///
/// /// Counts rows instead of writing them.
/// struct Counting(u64);
///
/// impl Store for Counting {
///     fn batch_update(&mut self, batch: &MetadataBatch) -> Result<u64, StoreError> {
///         self.0 += batch.len() as u64;
///         Ok(batch.len() as u64)
///     }
/// }
/// ```
pub trait Store: Send + 'static {
    /// Writes one batch (at most the batcher's `batch_size` rows, or
    /// [`max_batch_rows`](Self::max_batch_rows) when the store sets it); returns how many
    /// stored rows it updated. Failures are logged by the batcher, once each: a store need not
    /// log them.
    ///
    /// A row whose (agent, key) is not stored, or whose stored `collected_at` is newer, is
    /// not updated and not counted; the batcher counts the difference as unmatched.
    fn batch_update(&mut self, batch: &MetadataBatch) -> Result<u64, StoreError>;

    /// A way to stop a `batch_update` that is running on another thread, taken just before
    /// each call. The batcher fires it when [`close`](crate::Batcher::close) runs out of its
    /// final flush timeout, so a hung database cannot hold a service's shutdown.
    ///
    /// The interrupt runs on a thread of its own, after the batcher has counted what is
    /// unwritten; it may block or even panic without holding or unwinding `close`.
    ///
    /// The default, `None`, means a call cannot be interrupted: `close` then still returns in
    /// time, but leaves the call running on the flusher thread.
    fn interrupt_handle(&mut self) -> Option<Interrupt> {
        None
    }

    /// How many times, since it was made, this store ran a statement again because it
    /// conflicted with another writer's transaction: a deadlock or a serialization failure,
    /// which the database resolves by aborting one side, so that running the statement
    /// again is the cure. The batcher reads it around each call and counts the difference
    /// in [`Stats::conflicts`](crate::Stats::conflicts) and the conflicts metric, and logs
    /// it once per call.
    ///
    /// [`PgStore`](crate::postgres::PgStore) retries such a statement itself, on the same
    /// session, after a short pause and a bounded number of times, then reports
    /// [`StoreError::Canceled`] so the rows are kept. The default, 0, suits a store that never conflicts or does not retry.
    fn conflicts(&self) -> u64 {
        0
    }

    /// The most rows one call may carry, when that is more than the batcher's `batch_size`.
    ///
    /// A store one network round trip away (or two, behind a transaction pooler) spends a
    /// fixed cost per call whatever its size.
    /// When a flush carries more than `batch_size` rows, the batcher then sizes each call
    /// from the calls before it, so that the fixed cost is at most a tenth of a call's
    /// time, between `batch_size` and this bound: a backlog drains at the database's pace,
    /// not the network's. `batch_size` still triggers flushes.
    ///
    /// The default, `None`, keeps every call at `batch_size` rows or fewer.
    /// [`PgStore`](crate::postgres::PgStore) returns
    /// [`PgOptions::max_statement_rows`](crate::postgres::PgOptions::max_statement_rows).
    fn max_batch_rows(&self) -> Option<usize> {
        None
    }

    /// How many batches [`batch_update_many`](Self::batch_update_many) writes at once. When
    /// a flush carries several batches' worth of rows, the batcher hands up to this many to
    /// one call of `batch_update_many`; at 1 it calls `batch_update` for each.
    ///
    /// The default, 1, keeps one statement in flight.
    /// [`PgStore`](crate::postgres::PgStore) returns
    /// [`PgOptions::parallel_statements`](crate::postgres::PgOptions::parallel_statements).
    fn parallel_batches(&self) -> usize {
        1
    }

    /// Writes `batches`, each as [`batch_update`](Self::batch_update) would, and returns one
    /// result per batch tried, in order. The batcher hands over batches of distinct rows,
    /// each in the lock order, so they may be written at once and finish in any order; it
    /// then treats each result as the result of that batch's own call.
    ///
    /// A store may stop early: the batches past the last result were not tried, and the
    /// batcher keeps their rows for the retry. One [`interrupt_handle`](Self::interrupt_handle),
    /// taken before the call, stops all of them.
    ///
    /// The default writes them one after another, and stops after the first
    /// [`StoreError::Unavailable`]: the database is down, and trying the others would only
    /// wait for it again.
    fn batch_update_many(&mut self, batches: &[MetadataBatch]) -> Vec<Result<u64, StoreError>> {
        let mut results = Vec::with_capacity(batches.len());
        for batch in batches {
            let result = self.batch_update(batch);
            let unavailable = matches!(result, Err(StoreError::Unavailable(_)));
            results.push(result);
            if unavailable {
                break;
            }
        }
        results
    }
}

/// Stops one store call in flight; see [`Store::interrupt_handle`].
///
/// ```
/// use metadata_batcher::Interrupt;
///
/// let interrupt = Interrupt::new(|| println!("canceling the query"));
/// interrupt.fire();
/// ```
pub struct Interrupt(Box<dyn FnOnce() + Send>);

impl Interrupt {
    /// Wraps the code that interrupts the call, such as sending PostgreSQL a cancel request.
    pub fn new(interrupt: impl FnOnce() + Send + 'static) -> Self {
        Interrupt(Box::new(interrupt))
    }

    /// Interrupts the call. It may block briefly (a PostgreSQL cancel request opens a
    /// connection of its own).
    pub fn fire(self) {
        (self.0)()
    }
}

impl fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Interrupt")
    }
}

/// Why a [`Store`] could not write a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The database could not be reached or failed for a reason unrelated to the rows
    /// (connection refused or lost, server shutting down, timeout). The batcher keeps the
    /// rows and retries them with a backoff.
    Unavailable(String),
    /// The database refused the data itself (SQLSTATE classes 22 and 23: a value out of
    /// range, a violated constraint). The batcher splits the batch to find the refused rows,
    /// drops only those and writes the rest.
    Rejected(String),
    /// The statement was canceled: a statement timeout or a cancel request (SQLSTATE 57014),
    /// or a lock it waited for past `lock_timeout` (55P03). The batcher splits the batch, as
    /// for [`StoreError::Rejected`], so the rows that can be written are; a row still
    /// canceled on its own (locked elsewhere) is kept and retried with backoff, never
    /// dropped. During shutdown, after the final flush timeout, nothing is split.
    Canceled,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Unavailable(message) => {
                write!(f, "metadata store unavailable: {message}")
            }
            StoreError::Rejected(message) => write!(
                f,
                "metadata store rejected the data: {message}; the refused rows are isolated and dropped"
            ),
            StoreError::Canceled => f.write_str(
                "metadata store statement canceled (statement timeout or cancel request); \
                 a slow database or a lock held elsewhere is the usual cause",
            ),
        }
    }
}

impl std::error::Error for StoreError {}
