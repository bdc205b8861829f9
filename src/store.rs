//! Where a flush writes: the [`Store`] trait, what one write came to, and what a store can do.
//!
//! A store gets one [`MetadataBatch`] of at most `batch_size` rows per call (more if its
//! [`Capabilities`] say so) and writes it with one statement; a flush that carries more makes
//! several calls, or hands several batches to one call of [`Store::batch_update_many`] when
//! the store writes them at once. Each batch's result is a [`Written`] (rows updated, and
//! conflicts the store ran again) or a [`StoreError`], whose kind tells the batcher what to
//! do with the rows. `docs/design.md` ("The Store trait") says why the trait has this shape.

use std::fmt;

use crate::{MetadataBatch, StoreError};

/// Writes batches of metadata; [`PgStore`](crate::postgres::PgStore) is the PostgreSQL one,
/// [`MemoryStore`](crate::MemoryStore) the in-process one.
///
/// The batcher calls it from its flusher thread only, one call at a time. One method is
/// required; the others have defaults that suit a store writing one statement at a time.
///
/// A store that wraps another (to time or count its calls) should be an
/// [`Observe`](crate::Observe), which forwards every method: a wrapper written by hand that
/// forgets one silently loses interrupts, sizing or parallel statements.
///
/// ```
/// use metadata_batcher::{MetadataBatch, Store, StoreError, Written};
///
/// /// Counts rows instead of writing them.
/// struct Counting(u64);
///
/// impl Store for Counting {
///     fn batch_update(&mut self, batch: &MetadataBatch) -> Result<Written, StoreError> {
///         self.0 += batch.len() as u64;
///         Ok(Written::rows(batch.len() as u64))
///     }
/// }
/// ```
pub trait Store: Send + 'static {
    /// Writes one batch (at most the batcher's `batch_size` rows, or
    /// [`Capabilities::with_max_batch_rows`] when the store sets it) with one statement; returns
    /// how many stored rows it updated, and how many times it ran the statement again after
    /// a conflict with another writer. Failures are logged by the batcher, once each: a
    /// store need not log them.
    ///
    /// A row whose (agent, key) is not stored, or whose stored `collected_at` is newer, is
    /// not updated and not counted; the batcher counts the difference as unmatched.
    fn batch_update(&mut self, batch: &MetadataBatch) -> Result<Written, StoreError>;

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

    /// What the store can take; read once, when the batcher is built. The default,
    /// [`Capabilities::default`], is `batch_size` rows and one statement per call.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// Writes `batches`, each as [`batch_update`](Self::batch_update) would, and returns one
    /// [`BatchResult`] per batch, in order. The batcher hands over up to
    /// [`Capabilities::with_parallel_batches`] batches of distinct rows, each in the lock order,
    /// so they may be written at once and finish in any order; it then treats each result as
    /// the result of that batch's own call.
    ///
    /// A store may stop early: it answers [`BatchResult::NotTried`] for the batches it did
    /// not try, and the batcher keeps their rows for the retry. A list shorter than
    /// `batches` is read the same way, with a warning logged. One
    /// [`interrupt_handle`](Self::interrupt_handle), taken before the call, stops all of
    /// them.
    ///
    /// The default writes them one after another, and stops after the first unavailable
    /// one: the database is down, and trying the others would only wait for it again.
    fn batch_update_many(&mut self, batches: &[MetadataBatch]) -> Vec<BatchResult> {
        let mut unavailable = false;
        batches
            .iter()
            .map(|batch| {
                if unavailable {
                    return BatchResult::NotTried;
                }
                let result = BatchResult::from(self.batch_update(batch));
                unavailable = matches!(&result, BatchResult::Failed(e) if e.is_unavailable());
                result
            })
            .collect()
    }
}

/// A boxed store is a store: every method is forwarded, so `Box<dyn Store>` can be handed
/// wherever a store is wanted.
impl<S: Store + ?Sized> Store for Box<S> {
    fn batch_update(&mut self, batch: &MetadataBatch) -> Result<Written, StoreError> {
        (**self).batch_update(batch)
    }

    fn interrupt_handle(&mut self) -> Option<Interrupt> {
        (**self).interrupt_handle()
    }

    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }

    fn batch_update_many(&mut self, batches: &[MetadataBatch]) -> Vec<BatchResult> {
        (**self).batch_update_many(batches)
    }
}

/// What one statement wrote: rows updated, and how many times the store ran it again
/// because another writer's transaction conflicted with it.
///
/// ```
/// use metadata_batcher::Written;
///
/// let written = Written::rows(3).with_conflicts(1);
/// assert_eq!((written.updated(), written.conflicts()), (3, 1));
/// assert_eq!(Written::from(3), Written::rows(3));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Written {
    updated: u64,
    conflicts: u64,
}

impl Written {
    /// A statement that updated `updated` stored rows.
    pub fn rows(updated: u64) -> Self {
        Written {
            updated,
            conflicts: 0,
        }
    }

    /// The statement was run again `conflicts` times after conflicting with another
    /// writer's transaction (a deadlock, a serialization failure) before it went through.
    /// The batcher counts them in [`Stats::conflicts`](crate::Stats::conflicts) and logs
    /// them once per call.
    pub fn with_conflicts(mut self, conflicts: u64) -> Self {
        self.conflicts = conflicts;
        self
    }

    /// Stored rows the statement updated.
    pub fn updated(&self) -> u64 {
        self.updated
    }

    /// Times the statement was run again after a conflict.
    pub fn conflicts(&self) -> u64 {
        self.conflicts
    }
}

impl From<u64> for Written {
    fn from(updated: u64) -> Self {
        Written::rows(updated)
    }
}

/// One batch's result in [`Store::batch_update_many`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BatchResult {
    /// Written, as [`Store::batch_update`]'s `Ok`.
    Written(Written),
    /// Failed, as [`Store::batch_update`]'s `Err`.
    Failed(StoreError),
    /// Not tried (the store stopped early); the batcher keeps the rows for the retry.
    NotTried,
}

impl From<Result<Written, StoreError>> for BatchResult {
    fn from(result: Result<Written, StoreError>) -> Self {
        match result {
            Ok(written) => BatchResult::Written(written),
            Err(error) => BatchResult::Failed(error),
        }
    }
}

/// What a store can take, returned by [`Store::capabilities`].
///
/// ```
/// use metadata_batcher::Capabilities;
///
/// let capabilities = Capabilities::default()
///     .with_max_batch_rows(10_000)
///     .with_parallel_batches(2);
/// assert_eq!(capabilities.max_batch_rows(), Some(10_000));
/// assert_eq!(capabilities.parallel_batches(), 2);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    max_batch_rows: Option<usize>,
    parallel_batches: usize,
}

impl Default for Capabilities {
    /// `batch_size` rows per statement, one statement per call.
    fn default() -> Self {
        Capabilities {
            max_batch_rows: None,
            parallel_batches: 1,
        }
    }
}

impl Capabilities {
    /// The most rows one statement may carry, when that is more than the batcher's
    /// `batch_size`.
    ///
    /// A store one network round trip away (or two, behind a transaction pooler) spends a
    /// fixed cost per call whatever its size. When a flush carries more than `batch_size`
    /// rows, the batcher then sizes each statement from the ones before it, so that the
    /// fixed cost is at most a tenth of its time, between `batch_size` and this bound: a
    /// backlog drains at the database's pace, not the network's. `batch_size` still
    /// triggers flushes. [`PgStore`](crate::postgres::PgStore) sets
    /// [`PgOptions::max_statement_rows`](crate::postgres::PgOptions::max_statement_rows).
    pub fn with_max_batch_rows(mut self, rows: usize) -> Self {
        self.max_batch_rows = Some(rows);
        self
    }

    /// How many batches [`Store::batch_update_many`] writes at once (0 is read as 1). When
    /// a flush carries several batches' worth of rows, the batcher hands up to this many to
    /// one call of `batch_update_many`; at 1 it calls `batch_update` for each.
    /// [`PgStore`](crate::postgres::PgStore) sets
    /// [`PgOptions::parallel_statements`](crate::postgres::PgOptions::parallel_statements).
    pub fn with_parallel_batches(mut self, batches: usize) -> Self {
        self.parallel_batches = batches.max(1);
        self
    }

    /// The most rows one statement may carry; `None` keeps them at `batch_size`.
    pub fn max_batch_rows(&self) -> Option<usize> {
        self.max_batch_rows
    }

    /// How many batches one call writes at once, at least 1.
    pub fn parallel_batches(&self) -> usize {
        self.parallel_batches
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
