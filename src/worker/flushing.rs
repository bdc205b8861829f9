//! The worker's side of the flusher: when a flush starts ([`Worker::dispatch`]), handing
//! the batch over ([`Worker::start`]) as a [`FlushJob`], and taking the [`FlushOutcome`]
//! back ([`Worker::complete`]), whether the flush ran inline or on the flusher thread,
//! whose completions arrive on the `completed` channel of [`Flushing::Thread`].

use std::sync::atomic::Ordering::Relaxed;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{never, Receiver, Sender};

use super::retention::TrimTo;
use super::Worker;
use crate::batch::Taken;
use crate::flusher::{FlushJob, FlushOutcome, Flusher};
use crate::notifier::Waiter;
use crate::FlushReason;

/// Where flushes run.
pub(crate) enum Flushing {
    /// On the worker thread: intake waits while the store works (the Go design).
    Inline(Flusher),
    /// On a flusher thread of its own.
    Thread {
        /// `None` once the worker has let the flusher thread end.
        jobs: Option<Sender<FlushJob>>,
        completed: Receiver<FlushOutcome>,
        thread: Option<JoinHandle<()>>,
    },
}

impl Worker {
    /// Starts the next flush if one is due and none is running; with nothing due, releases
    /// the `sync` callers.
    pub(super) fn dispatch(&mut self) {
        loop {
            if self.in_flight.is_some() {
                return;
            }
            let reason = if !self.manual_waiting.is_empty() {
                FlushReason::Manual
            } else if self.scheduled_due {
                FlushReason::Scheduled
            } else if self.batch.len() >= self.config.batch_size && self.consecutive_failures == 0 {
                FlushReason::Capacity
            } else {
                self.release_syncs(u64::MAX);
                return;
            };
            if self.batch.is_empty() {
                // Nothing to write: no store call, no publish, nothing recorded.
                for reply in self.manual_waiting.drain(..) {
                    let _ = reply.send(None);
                }
                if std::mem::take(&mut self.scheduled_due) {
                    self.timer = self.shared.clock.after(self.config.interval);
                }
                continue;
            }
            self.start(reason);
        }
    }

    /// Hands the whole batch to the flusher.
    pub(super) fn start(&mut self, reason: FlushReason) {
        self.last_started = self.shared.clock.now();
        self.trim(TrimTo::Bounds);
        let bytes = self.batch.bytes();
        let batch = self.batch.take();
        let seq = self.next_seq;
        self.next_seq += 1;
        self.scheduled_due = false;
        self.timer = never();
        if reason == FlushReason::Manual {
            self.manual_in_flight.append(&mut self.manual_waiting);
        }
        let since = self.batch_since.take();
        self.in_flight = Some((seq, reason, since));
        let (counters, in_hand) = (&self.shared.telemetry, self.in_hand);
        self.shared.cancellation.moving_rows(|| {
            counters.in_flight.store(batch.len(), Relaxed);
            counters.batched.store(in_hand, Relaxed);
        });
        self.shared.telemetry.in_flight_bytes.store(bytes, Relaxed);
        self.byte_budget = self.config.max_pending_bytes.saturating_sub(bytes);
        self.shared.telemetry.set_oldest_in_flight(since);
        self.shared.telemetry.set_oldest_batched(None);
        let job = FlushJob { seq, reason, batch };
        match &mut self.flushing {
            Flushing::Inline(flusher) => {
                let outcome = flusher.flush(job);
                self.complete(outcome);
            }
            Flushing::Thread { jobs, .. } => {
                let sent = match jobs {
                    Some(jobs) => jobs.send(job).map_err(|unsent| unsent.into_inner()),
                    None => Err(job),
                };
                if let Err(unsent) = sent {
                    // The flusher thread is gone (it catches the store's panics, so this
                    // is a bug); keep the rows rather than lose them silently.
                    tracing::error!("metadata flusher thread is gone; flushes cannot run");
                    self.complete(FlushOutcome::not_attempted(unsent));
                }
            }
        }
    }

    /// Takes a finished flush back: unwritten rows rejoin the batch, the timer re-arms.
    pub(super) fn complete(&mut self, outcome: FlushOutcome) {
        let since = self.in_flight.take().and_then(|(_, _, since)| since);
        self.last_completed = outcome.seq;
        self.shared.telemetry.in_flight_bytes.store(0, Relaxed);
        self.byte_budget = self.config.max_pending_bytes;
        self.shared.telemetry.set_oldest_in_flight(None);
        self.count_outcome(outcome.failed);
        self.batch.recycle(outcome.emptied);
        if !outcome.retained.is_empty() {
            self.batch.restore(outcome.retained);
            self.batch_since = match (since, self.batch_since) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            self.shared.telemetry.set_oldest_batched(self.batch_since);
            self.trim(TrimTo::Bounds);
        }
        let (counters, batched) = (&self.shared.telemetry, self.batch.len() + self.in_hand);
        let superseded = self.batch.superseded();
        self.shared.cancellation.moving_rows(|| {
            counters.in_flight.store(0, Relaxed);
            counters.batched.store(batched, Relaxed);
            counters.superseded.store(superseded, Relaxed);
        });
        // Before anyone waiting on this flush is answered, so they see the gauges after it,
        // and a test that moves a mock clock once `flush()` returns reaches the retry.
        self.shared.update_gauges();
        self.timer = self.shared.clock.after(self.next_delay());
        let notifier = &self.shared.notifier;
        for reply in self.manual_in_flight.drain(..) {
            notifier.when_published(outcome.seq, Waiter::Flush(reply, outcome.report.clone()));
        }
        self.release_syncs(outcome.seq);
    }

    /// Completes the flush in flight if the flusher has reported it.
    pub(super) fn take_completed(&mut self) {
        if self.in_flight.is_none() {
            return;
        }
        if let Flushing::Thread { completed, .. } = &self.flushing {
            if let Ok(outcome) = completed.try_recv() {
                self.complete(outcome);
                self.dispatch();
            }
        }
    }

    /// Waits for the flush in flight, if any, and completes it.
    pub(super) fn wait_for_flush(&mut self) {
        if self.in_flight.is_none() {
            return;
        }
        if let Flushing::Thread { completed, .. } = &self.flushing {
            match completed.recv() {
                Ok(outcome) => self.complete(outcome),
                Err(_) => self.lose_flusher(),
            }
        }
    }

    /// The flusher thread ended without reporting its flush. It catches every panic of a
    /// flush, so this is a bug; the loop must not spin on the closed channel, the rows of
    /// the flush are counted as lost, its waiters are answered, and later flushes fail
    /// (their rows are kept, within the bound) instead of hanging.
    pub(super) fn lose_flusher(&mut self) {
        let counters = &self.shared.telemetry;
        let lost = counters.in_flight.swap(0, Relaxed);
        counters.lost_to_panics.fetch_add(lost as u64, Relaxed);
        counters.panics.fetch_add(1, Relaxed);
        tracing::error!(
            lost,
            "metadata flusher thread ended unexpectedly; the rows of its flush in flight are lost"
        );
        if let Flushing::Thread { completed, .. } = &mut self.flushing {
            *completed = never();
        }
        if let Some((seq, reason, _)) = self.in_flight {
            self.complete(FlushOutcome::not_attempted(FlushJob {
                seq,
                reason,
                batch: Taken::default(),
            }));
        }
    }

    /// Counts flushes that failed in a row: they pace the retries and pause capacity
    /// flushes, and `health()` reports them.
    fn count_outcome(&mut self, failed: bool) {
        self.consecutive_failures = if failed {
            self.consecutive_failures.saturating_add(1)
        } else {
            0
        };
        self.shared
            .telemetry
            .consecutive_failures
            .store(self.consecutive_failures.into(), Relaxed);
    }

    /// The interval, or while the store keeps failing, a doubling backoff.
    pub(super) fn next_delay(&self) -> Duration {
        if self.consecutive_failures == 0 {
            return self.config.interval;
        }
        let doublings = (self.consecutive_failures - 1).min(30);
        self.config
            .retry_backoff_initial
            .saturating_mul(1 << doublings)
            .min(self.config.retry_backoff_max)
    }
}
