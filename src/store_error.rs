//! [`StoreError`]: why a store could not write a batch, and what the batcher does about it.
//!
//! Shaped as `std::io::Error` and `postgres::Error` are: an opaque struct with a
//! [`kind`](StoreError::kind) to match on (a `#[non_exhaustive]` enum, so a kind can be
//! added without breaking anyone), the error that caused it as its
//! [`source`](std::error::Error::source), and the SQLSTATE when a database gave one.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

/// What kind of failure a [`StoreError`] is: it decides what the batcher does with the rows.
///
/// Classify with care: calling an outage "rejected" makes the batcher throw good rows away,
/// while calling bad data "unavailable" only costs retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The database could not be reached or failed for a reason unrelated to the rows
    /// (connection refused or lost, server shutting down, a deadline). The batcher keeps the
    /// rows and retries them with a backoff.
    Unavailable,
    /// The database refused the data itself (SQLSTATE classes 22 and 23: a value out of
    /// range, a violated constraint). The batcher splits the batch to find the refused rows,
    /// drops only those and writes the rest.
    Rejected,
    /// The statement was canceled: a statement timeout or a cancel request (SQLSTATE 57014),
    /// or a lock it waited for past `lock_timeout` (55P03). The batcher splits the batch so
    /// the rows that can be written are; a row still canceled on its own (locked elsewhere)
    /// is kept and retried with backoff, never dropped. After `close` has given up on the
    /// store, nothing is split.
    Canceled,
    /// The statement conflicted with another writer's transaction (a deadlock, 40P01, or a
    /// serialization failure, 40001) every time the store ran it again. The batcher treats
    /// it as [`Canceled`](Self::Canceled): smaller statements hold fewer locks and conflict
    /// less, so it splits the batch, and a row that still conflicts on its own is kept and
    /// retried with backoff, never dropped.
    ConflictsExhausted,
}

/// Why a [`Store`](crate::Store) could not write a batch.
///
/// Make one with the constructor of its [`kind`](Self::kind), and add what the database
/// said: [`with_source`](Self::with_source), [`with_sqlstate`](Self::with_sqlstate).
/// Clones share the source. Two errors are equal when their kind, message, SQLSTATE and
/// conflicts are; the source is not compared.
///
/// ```
/// use metadata_batcher::{StoreError, StoreErrorKind};
///
/// let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
/// let err = StoreError::unavailable("connecting to db.internal:5432").with_source(io);
/// assert_eq!(err.kind(), StoreErrorKind::Unavailable);
/// assert!(std::error::Error::source(&err).is_some());
/// assert!(err.to_string().contains("the rows are kept and retried"));
///
/// let refused = StoreError::rejected("value too long").with_sqlstate("22001");
/// assert_eq!(refused.sqlstate(), Some("22001"));
/// ```
#[derive(Clone)]
pub struct StoreError {
    kind: StoreErrorKind,
    message: String,
    sqlstate: Option<Box<str>>,
    conflicts: u64,
    source: Option<Arc<dyn StdError + Send + Sync>>,
}

impl StoreError {
    fn new(kind: StoreErrorKind, message: String) -> Self {
        StoreError {
            kind,
            message,
            sqlstate: None,
            conflicts: 0,
            source: None,
        }
    }

    /// The database cannot be reached or failed for a reason unrelated to the rows;
    /// `message` says what was tried and what happened.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StoreErrorKind::Unavailable, message.into())
    }

    /// The database refused the data; `message` says what it refused and why.
    pub fn rejected(message: impl Into<String>) -> Self {
        Self::new(StoreErrorKind::Rejected, message.into())
    }

    /// The statement was canceled: a statement or lock timeout, or a cancel request.
    pub fn canceled() -> Self {
        Self::new(StoreErrorKind::Canceled, String::new())
    }

    /// The statement conflicted with another writer's transaction every time the store ran
    /// it again. Say how many times it ran again with
    /// [`with_conflicts`](Self::with_conflicts).
    pub fn conflicts_exhausted() -> Self {
        Self::new(StoreErrorKind::ConflictsExhausted, String::new())
    }

    /// The error that caused this one, returned by [`source`](StdError::source).
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// The SQLSTATE the database answered with, such as `"23505"`.
    pub fn with_sqlstate(mut self, sqlstate: impl Into<String>) -> Self {
        self.sqlstate = Some(sqlstate.into().into_boxed_str());
        self
    }

    /// Statements the store ran again, because another writer's transaction conflicted with
    /// them, before the call failed; the batcher counts them in
    /// [`Stats::conflicts`](crate::Stats::conflicts), as it does
    /// [`Written::conflicts`](crate::Written::conflicts).
    pub fn with_conflicts(mut self, conflicts: u64) -> Self {
        self.conflicts = conflicts;
        self
    }

    /// What kind of failure it is.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// What went wrong, without the advice that `Display` adds; empty for a cancel that
    /// carries no detail.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The SQLSTATE the database answered with, if it answered.
    pub fn sqlstate(&self) -> Option<&str> {
        self.sqlstate.as_deref()
    }

    /// Statements run again after a conflict before the call failed.
    pub fn conflicts(&self) -> u64 {
        self.conflicts
    }

    /// Whether the batcher keeps the rows and waits for the database.
    pub(crate) fn is_unavailable(&self) -> bool {
        self.kind == StoreErrorKind::Unavailable
    }
}

impl PartialEq for StoreError {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind
            && self.message == other.message
            && self.sqlstate == other.sqlstate
            && self.conflicts == other.conflicts
    }
}

impl Eq for StoreError {}

impl fmt::Debug for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("StoreError");
        debug
            .field("kind", &self.kind)
            .field("message", &self.message);
        if let Some(sqlstate) = &self.sqlstate {
            debug.field("sqlstate", sqlstate);
        }
        if self.conflicts > 0 {
            debug.field("conflicts", &self.conflicts);
        }
        if let Some(source) = &self.source {
            debug.field("source", source);
        }
        debug.finish()
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let detail = |f: &mut fmt::Formatter<'_>| match self.message.is_empty() {
            true => Ok(()),
            false => write!(f, " ({})", self.message),
        };
        match self.kind {
            StoreErrorKind::Unavailable => write!(
                f,
                "metadata store unavailable: {}; the rows are kept and retried with backoff: \
                 check that the database is up and reachable",
                self.message
            ),
            StoreErrorKind::Rejected => write!(
                f,
                "metadata store rejected the data: {}; the refused rows are isolated and \
                 dropped: check the values agents send against the table's column types and \
                 constraints",
                self.message
            ),
            StoreErrorKind::Canceled => {
                f.write_str("metadata store statement canceled")?;
                detail(f)?;
                f.write_str(
                    "; the rows are split and retried: a statement timeout too short for the \
                     database's pace, or a lock held elsewhere, is the usual cause",
                )
            }
            StoreErrorKind::ConflictsExhausted => {
                write!(
                    f,
                    "metadata statement conflicted with another writer's transaction (deadlock \
                     or serialization failure) and was run again {} times",
                    self.conflicts
                )?;
                detail(f)?;
                f.write_str(
                    "; the rows are split and retried: find the writer that locks these rows \
                     in another order than (agent, key)",
                )
            }
        }
    }
}

impl StdError for StoreError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn StdError + 'static))
    }
}
