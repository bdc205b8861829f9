//! How the worker ends: the shutdown after the select loop (drain, final flush, retries
//! until `close`'s deadline), and dying after a panic in user code, with everything it held
//! counted.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crossbeam_channel::{never, select};

use super::{Control, Flushing, Worker};
use crate::FlushReason;

/// The longest wait between two shutdown flushes: `close` has a deadline, and what the
/// backoff saves the database matters less than writing before it passes.
const SHUTDOWN_RETRY_MAX: Duration = Duration::from_secs(1);

impl Worker {
    /// Drains what was accepted, waits for the running flush, and makes the final flush;
    /// while rows are left that a failed flush kept, flushes again, with a short backoff,
    /// until they are written or `close` gives up on the store at its deadline.
    pub(super) fn shut_down(&mut self, close_waits: bool) {
        for update in self.updates.try_iter().collect::<Vec<_>>() {
            self.take_in(update);
        }
        self.wait_for_flush();
        let mut attempts = 0;
        while !self.batch.is_empty() && self.wait_to_retry_at_shutdown(attempts, close_waits) {
            attempts += 1;
            self.start(FlushReason::Shutdown);
            self.wait_for_flush();
        }
        let unwritten = self.batch.len();
        // After `close` has given up, it has recorded what was unwritten when it did, and
        // its report says the same: the worker does not change it afterwards.
        let recorded = self.shared.cancellation.unless_abandoned(|| {
            let counters = &self.shared.telemetry;
            counters
                .unwritten_at_shutdown
                .store(unwritten as u64, Relaxed);
            counters.batched.store(0, Relaxed);
            counters.set_oldest_batched(None);
        });
        if recorded && unwritten > 0 {
            tracing::error!(
                unwritten,
                "metadata batcher closed with entries it could not write"
            );
        }
        self.shared.telemetry.worker_alive.store(false, Relaxed);
        self.end_flushing();
    }

    /// Lets the flusher thread end (its publisher thread with it), and waits for it unless
    /// `close` has given up on the store: then it may be stuck in a store call.
    fn end_flushing(&mut self) {
        if let Flushing::Thread { jobs, thread, .. } = &mut self.flushing {
            jobs.take();
            if let Some(thread) = thread.take() {
                if !self.shared.cancellation.is_abandoned() {
                    let _ = thread.join();
                }
            }
        }
    }

    /// The select loop or the shutdown panicked, in user code (the clock, a metrics
    /// recorder, a tracing subscriber), possibly halfway through taking in an update.
    /// Nothing the worker holds can be trusted to be written, so the batcher stops: intake
    /// closes (`add` returns [`AddError::Closed`](crate::AddError::Closed)), every waiting
    /// caller is answered, the flush in flight is waited for (until `close` gives up), and
    /// every accepted key not yet accounted for is counted in `unwritten_at_shutdown`,
    /// which is what `close` then reports. Runs no user code but logging.
    pub(super) fn die(&mut self, message: &str) {
        let shared = self.shared.clone();
        let counters = &shared.telemetry;
        counters.panics.fetch_add(1, Relaxed);
        // First, so that no caller answered below sees the worker alive.
        counters.worker_alive.store(false, Relaxed);
        *shared.intake.write() = false;
        // No `add` can send any more: what is queued is all there will be. Keys still
        // counted as queued after the drain were in messages the panic dropped (the
        // shutdown drains the channel before it takes the messages in): taken in, and
        // lost with the rest.
        self.updates.try_iter().for_each(drop);
        let stranded = counters.queued.swap(0, Relaxed);
        counters.taken_in.fetch_add(stranded as u64, Relaxed);
        counters.superseded.store(self.batch.superseded(), Relaxed);
        // What this worker held, the batch and whatever the panic dropped halfway, is
        // everything accepted that is neither accounted for nor in the flush in flight:
        // counted now, under the lock the flusher counts rows under, so that a `close`
        // that gives up while that flush is awaited counts only the flush.
        let mut lost = 0;
        shared.cancellation.unless_abandoned(|| {
            let stats = counters.snapshot();
            let settled = stats.settled() + stats.in_flight as u64;
            lost = stats.accepted.saturating_sub(settled);
            counters.unwritten_at_shutdown.fetch_add(lost, Relaxed);
            counters.batched.store(0, Relaxed);
            counters.set_oldest_batched(None);
        });
        if self.in_flight.take().is_some() {
            self.wait_for_flusher_while_dying();
        }
        // What the flush in flight did not write, refuse or lose: its kept rows.
        shared.cancellation.unless_abandoned(|| {
            let kept = counters.in_flight.swap(0, Relaxed);
            lost += kept as u64;
            counters
                .unwritten_at_shutdown
                .fetch_add(kept as u64, Relaxed);
            counters.in_flight_bytes.store(0, Relaxed);
            counters.set_oldest_in_flight(None);
        });
        self.answer_waiters_now();
        tracing::error!(
            panic = %message,
            lost,
            "the metadata worker thread panicked (in the clock, a metrics recorder or a \
             tracing subscriber); the batcher is closed, add refuses updates, and the \
             entries it held are counted as unwritten"
        );
        self.end_flushing();
    }

    /// While dying: the flush in flight holds rows the flusher counts as it writes them,
    /// so the count waits for its outcome (whose kept rows are lost), or for `close` to
    /// give up. Callers that ask meanwhile are answered once the count is done (by
    /// [`answer_waiters_now`](Self::answer_waiters_now), or by the end of the thread).
    fn wait_for_flusher_while_dying(&mut self) {
        let Flushing::Thread { completed, .. } = &self.flushing else {
            return;
        };
        let given_up = self.shared.cancellation.given_up().clone();
        let mut control = self.control.clone();
        loop {
            select! {
                recv(completed) -> _ => return,
                recv(given_up) -> _ => return,
                recv(control) -> message => match message {
                    Ok(Control::Sync(reply)) => self.sync_waiting.push((0, reply)),
                    Ok(Control::Flush(reply)) => self.manual_waiting.push(reply),
                    // `close` waits for this thread to end.
                    Ok(Control::Shutdown) => {}
                    Err(_) => control = never(),
                },
            }
        }
    }

    /// Before shutdown flush number `attempts` (0 for the final flush): waits out the
    /// backoff after a failed one, measured from when that flush started, so a flush that
    /// failed slowly (a deadlock found after a second) is retried at once. False once
    /// `close` has given up on the store, and for retries when `close` is not waiting (the
    /// handle is gone without it): then no deadline would bound them.
    fn wait_to_retry_at_shutdown(&mut self, attempts: u32, close_waits: bool) -> bool {
        let cancellation = &self.shared.cancellation;
        if attempts == 0 {
            return !cancellation.is_abandoned();
        }
        if self.consecutive_failures == 0 || !close_waits {
            return false;
        }
        let backoff = self.next_delay().min(SHUTDOWN_RETRY_MAX);
        let waited = self
            .shared
            .clock
            .now()
            .saturating_duration_since(self.last_started);
        if attempts == 1 {
            tracing::warn!(
                rows = self.batch.len(),
                "the final flush could not write everything; retrying until it does or the \
                 final flush timeout passes"
            );
        }
        let retry = self.shared.clock.after(backoff.saturating_sub(waited));
        select! {
            recv(retry) -> _ => !cancellation.is_abandoned(),
            recv(cancellation.given_up()) -> _ => false,
        }
    }
}
