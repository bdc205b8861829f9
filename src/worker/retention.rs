//! Retention: holding the batch to its bounds (`max_pending` entries, `max_pending_bytes`
//! bytes less what the flush in flight holds) by dropping the entries with the oldest
//! `collected_at`, counted and logged.

use std::sync::atomic::Ordering::Relaxed;

use super::{Worker, WARNING_EVERY};

/// How far a trim takes the batch.
#[derive(Clone, Copy)]
pub(super) enum TrimTo {
    /// To the entry bound and the byte budget exactly: before a flush, after one.
    Bounds,
    /// The batch passed its byte budget while taking in. Trimming sorts the batch, so it
    /// goes an eighth below the budget: the next trim is an eighth of the bound away.
    BelowByteBound,
}

impl Worker {
    /// Holds the batch to its bounds, oldest `collected_at` first: the entry bound, and the
    /// byte bound less what the flush in flight still holds (the flusher releases each chunk
    /// as it is written, so the budget is refreshed here).
    pub(super) fn trim(&mut self, to: TrimTo) {
        let in_flight = self.shared.telemetry.in_flight_bytes.load(Relaxed);
        let budget = self.config.max_pending_bytes.saturating_sub(in_flight);
        self.byte_budget = budget;
        let max_entries = self.config.max_pending;
        let max_bytes = match to {
            TrimTo::Bounds => budget,
            TrimTo::BelowByteBound if self.batch.bytes() > budget => budget - budget / 8,
            // The flush in flight released enough: the batch is within its budget.
            TrimTo::BelowByteBound => return,
        };
        let dropped = self.batch.trim(max_entries, max_bytes);
        if dropped == 0 {
            return;
        }
        if self.batch.is_empty() {
            // Nothing waits: `health()` must not report the age of what was dropped.
            self.batch_since = None;
            self.shared.telemetry.set_oldest_batched(None);
        }
        self.shared.telemetry.retention_dropped(dropped as u64);
        let max_entries = (max_entries != usize::MAX).then_some(max_entries);
        // While a flush in flight holds nearly all of the byte bound, every insert trims.
        let now = self.shared.clock.now();
        let due = self
            .last_trim_warning
            .is_none_or(|last| now.saturating_duration_since(last) >= WARNING_EVERY);
        if due {
            self.last_trim_warning = Some(now);
            tracing::warn!(
                dropped,
                ?max_entries,
                max_bytes,
                "metadata batch at its bound; dropped the entries with the oldest collected_at"
            );
        } else {
            tracing::debug!(
                dropped,
                ?max_entries,
                max_bytes,
                "metadata batch at its bound; dropped the entries with the oldest collected_at"
            );
        }
    }
}
