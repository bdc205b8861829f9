//! Intake: taking the updates that `add` queued into the batch, and pacing how often the
//! worker collects them while they keep arriving.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::retention::TrimTo;
use super::{Update, Worker};
use crate::FlushReason;

/// How many more messages to take in after one arrives before looking at the other
/// channels again: amortizes the select over a burst without starving control messages.
pub(super) const INTAKE_BURST: usize = 256;

/// While updates keep arriving, the longest they gather before the worker collects them:
/// short against any flush interval, long against a wake-up.
const INTAKE_POLL: Duration = Duration::from_millis(1);

impl Worker {
    /// Takes in up to `messages` queued messages (a burst, or `self.updates.len()` for
    /// exactly those queued now); returns how many keys they carried.
    pub(super) fn take_in_queued(&mut self, messages: usize) -> usize {
        let mut keys = 0;
        for _ in 0..messages {
            // A finished flush is taken first, so the next one starts at `batch_size`
            // instead of growing behind a long drain (a `sync` after a burst, say): a map
            // that outgrows the cache makes every insert slower.
            self.take_completed();
            let Ok(update) = self.updates.try_recv() else {
                break;
            };
            keys += update.metadata.len();
            self.take_in(update);
        }
        keys
    }

    /// How long to let updates gather before collecting them again, given that this
    /// collection found `keys`: at the rate just seen, at most an eighth of the channel
    /// fills while this thread waits, so waiting never costs a drop; and never more than
    /// `INTAKE_POLL`.
    pub(super) fn poll_wait(&mut self, keys: usize) -> Duration {
        let now = Instant::now();
        let since_last = now.saturating_duration_since(std::mem::replace(&mut self.collected, now));
        if !self.updates.is_empty() {
            return Duration::ZERO;
        }
        let room = (self.config.channel_capacity / 8) as f64;
        let seconds_per_key = since_last.as_secs_f64() / keys.max(1) as f64;
        Duration::from_secs_f64((room * seconds_per_key).min(INTAKE_POLL.as_secs_f64()))
    }

    /// Adds one call's entries to the batch, flushing at exactly `batch_size` when idle.
    pub(super) fn take_in(&mut self, update: Update) {
        let keys = update.metadata.len();
        self.shared
            .telemetry
            .taken_in
            .fetch_add(keys as u64, Relaxed);
        self.shared.telemetry.queued.fetch_sub(keys, Relaxed);
        let agent_id = update.agent_id;
        for (taken, metadata) in update.metadata.into_iter().enumerate() {
            if self.batch_since.is_none() {
                self.batch_since = Some(self.shared.clock.now());
                self.shared.telemetry.set_oldest_batched(self.batch_since);
            }
            self.batch.insert(agent_id, metadata);
            let len = self.batch.len();
            if len >= self.config.batch_size && self.can_flush_for_capacity() {
                self.in_hand = keys - taken - 1;
                self.start(FlushReason::Capacity);
                self.in_hand = 0;
            } else if len
                >= self
                    .config
                    .max_pending
                    .saturating_add(self.config.batch_size)
            {
                // Trimming costs a pass over the batch, so it waits for a batch's worth of
                // excess; flushes trim exactly to the bound.
                self.trim(TrimTo::Bounds);
            } else if self.batch.bytes() > self.byte_budget {
                self.trim(TrimTo::BelowByteBound);
            }
        }
        let counters = &self.shared.telemetry;
        counters.batched.store(self.batch.len(), Relaxed);
        counters.superseded.store(self.batch.superseded(), Relaxed);
    }

    fn can_flush_for_capacity(&self) -> bool {
        self.in_flight.is_none() && self.consecutive_failures == 0
    }
}
