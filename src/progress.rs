//! [`Progress`]: what the store calls of one flush came to, and the one place that decides
//! to keep a chunk's rows for the retry and stop the flush ([`Stop`], each reason named).
//!
//! A flush stops calling the store for one of the [`Stop`] reasons; from then on every
//! chunk it still holds is kept, untried, for the next flush. A canceled chunk is split,
//! kept alone, or stops the flush: [`Progress::on_canceled`] says which, within the
//! flush's budget of canceled statements.

use uuid::Uuid;

use crate::{MetadataBatch, StoreError};

/// Why a flush stopped calling the store.
pub(crate) enum Stop {
    /// The store is unavailable (or failed in a way that says nothing of the rows).
    Failed(StoreError),
    /// `close` gave up on the store before the call started.
    Abandoned,
    /// A canceled chunk after `close` gave up: nothing more is split.
    CanceledAtShutdown,
    /// The canceled statements spent the flush's budget.
    CancelBudgetSpent,
    /// A canceled chunk's halves were canceled too: the table is locked as a whole, or the
    /// server is too slow for any statement, not one row.
    TableLocked,
    /// The store did not try these batches of a call.
    NotTried { tried: usize, handed: usize },
    /// The store, or the flush itself, panicked; the rows it was handling are lost.
    Panicked(String),
}

/// What a canceled chunk calls for.
pub(crate) enum OnCanceled {
    /// Split it in halves and try both.
    Split,
    /// A lone row, locked elsewhere: keep it for the retry, never drop it.
    KeepRow,
    /// Keep it and stop the flush.
    Stop(Stop),
}

/// What the store calls of one flush came to.
#[derive(Default)]
pub(crate) struct Progress {
    /// Agent IDs of the stored rows, one per row.
    pub(crate) agent_ids: Vec<Uuid>,
    pub(crate) updated: u64,
    pub(crate) rejected: usize,
    pub(crate) retained: MetadataBatch,
    pub(crate) statements: usize,
    pub(crate) error: Option<StoreError>,
    /// No more store calls this flush; later chunks are kept.
    stopped: bool,
    pub(crate) panicked: bool,
    /// Canceled statements this flush still handles (by splitting or keeping one row)
    /// before it stops.
    cancel_budget: u32,
}

impl Progress {
    /// A flush of `rows` rows, none handled yet.
    pub(crate) fn new(rows: usize) -> Self {
        Progress {
            cancel_budget: cancel_budget(rows),
            ..Progress::default()
        }
    }

    pub(crate) fn stopped(&self) -> bool {
        self.stopped
    }

    /// Keeps `chunk` for the retry (it may be empty) and stops the flush for `reason`: the
    /// first reason is logged and becomes the flush's error.
    pub(crate) fn stop(&mut self, reason: Stop, chunk: &mut MetadataBatch) {
        let rows = chunk.len();
        self.retained.append(chunk);
        if self.stopped {
            return;
        }
        self.stopped = true;
        self.error = Some(match reason {
            Stop::Failed(error) => {
                tracing::error!(
                    rows,
                    error = %error,
                    "metadata store call failed; the rows are kept and retried"
                );
                error
            }
            Stop::Abandoned => StoreError::canceled(),
            Stop::CanceledAtShutdown => {
                tracing::error!(
                    rows,
                    "metadata store call canceled at shutdown; the rows are not written"
                );
                self.error.take().unwrap_or_else(StoreError::canceled)
            }
            Stop::CancelBudgetSpent => {
                tracing::warn!(
                    rows,
                    "metadata store call canceled (statement or lock timeout) again; this \
                     flush stops splitting and keeps the rest for the retry"
                );
                self.error.take().unwrap_or_else(StoreError::canceled)
            }
            Stop::TableLocked => {
                tracing::warn!(
                    rows,
                    "metadata store call canceled, and both its halves too: the table is \
                     locked as a whole or the server is too slow, not one row; this flush \
                     stops splitting and keeps the rest for the retry"
                );
                self.error.take().unwrap_or_else(StoreError::canceled)
            }
            Stop::NotTried { tried, handed } => StoreError::unavailable(format!(
                "the store tried {tried} of the {handed} batches handed to it"
            )),
            Stop::Panicked(message) => {
                self.panicked = true;
                StoreError::unavailable(message)
            }
        });
    }

    /// Keeps a lone canceled row for the retry; the flush goes on.
    pub(crate) fn keep_row(&mut self, row: &mut MetadataBatch) {
        tracing::warn!(
            agent_id = %row.agent_ids[0],
            key = %row.keys[0],
            "metadata row canceled on its own (a lock held elsewhere, or a statement \
             timeout); it is kept and retried with backoff"
        );
        self.retained.append(row);
    }

    /// What a canceled chunk of `rows` rows calls for; `abandoned` when `close` has given
    /// up on the store. Splitting and keeping a row spend the budget.
    pub(crate) fn on_canceled(&mut self, rows: usize, abandoned: bool) -> OnCanceled {
        if abandoned {
            return OnCanceled::Stop(Stop::CanceledAtShutdown);
        }
        if self.cancel_budget == 0 {
            return OnCanceled::Stop(Stop::CancelBudgetSpent);
        }
        self.cancel_budget -= 1;
        if rows == 1 {
            OnCanceled::KeepRow
        } else {
            OnCanceled::Split
        }
    }
}

/// Canceled statements one flush of `rows` handles before it stops: `⌈log2 rows⌉ + 1`,
/// what isolating one locked row takes (the whole chunk, then one half per level down to
/// the row). The next canceled statement stops the flush.
fn cancel_budget(rows: usize) -> u32 {
    rows.max(1).next_power_of_two().trailing_zeros() + 1
}
