//! The callers that wait on the worker: `sync` (until the flushes it covers are announced)
//! and `flush` (until its own flush is). Answers go out through the publisher thread
//! ([`crate::notifier`]), once the flush they cover is announced.

use crossbeam_channel::{never, Sender};

use super::Worker;
use crate::notifier::Waiter;
use crate::FlushReport;

impl Worker {
    /// `sync`: waits for the flush in flight, and for the one due after it, if any.
    pub(super) fn sync(&mut self, reply: Sender<()>) {
        self.take_in_queued(self.updates.len());
        if self.timer.try_recv().is_ok() {
            self.timer = never();
            self.scheduled_due = true;
        }
        self.dispatch();
        let last = match self.in_flight {
            // Nothing runs, so nothing is due either (`dispatch` would have started it).
            None => self.last_completed,
            Some((seq, _, _)) => {
                // A flush that is due now starts when this one completes; wait for it too.
                let another_due = !self.manual_waiting.is_empty()
                    || self.scheduled_due
                    || self.batch.len() >= self.config.batch_size;
                seq + u64::from(another_due)
            }
        };
        self.sync_waiting.push((last, reply));
        self.release_syncs(self.last_completed);
    }

    /// `flush`: the next [`dispatch`](Self::dispatch) starts a manual flush.
    pub(super) fn manual_flush(&mut self, reply: Sender<Option<FlushReport>>) {
        self.take_in_queued(self.updates.len());
        self.manual_waiting.push(reply);
    }

    /// The one place `sync` callers are released: those that wait for flush `through` or
    /// an earlier one are answered once the last completed flush is announced. `u64::MAX`
    /// releases every one, when nothing is in flight or due.
    pub(super) fn release_syncs(&mut self, through: u64) {
        if self.sync_waiting.is_empty() {
            return;
        }
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.sync_waiting)
            .into_iter()
            .partition(|(last, _)| *last <= through);
        self.sync_waiting = waiting;
        for (_, reply) in done {
            self.shared
                .notifier
                .when_published(self.last_completed, Waiter::Sync(reply));
        }
    }

    /// Answers every `sync` and `flush` caller that waits on this worker at once, without
    /// an announcement: a dying worker will flush nothing more.
    pub(super) fn answer_waiters_now(&mut self) {
        for reply in self
            .manual_waiting
            .drain(..)
            .chain(self.manual_in_flight.drain(..))
        {
            let _ = reply.send(None);
        }
        for (_, reply) in self.sync_waiting.drain(..) {
            let _ = reply.send(());
        }
    }
}
