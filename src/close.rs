//! Closing a [`Batcher`]: the protocol `close` runs, and the two ways it is started
//! without a call: a dropped handle (on a thread of its own, so the drop never blocks)
//! and a [`CloseGuard`] (which waits, for a service's `main`).
//!
//! `close` shuts intake, asks the worker to drain and make the final flush, and waits for
//! it until a deadline on the injected clock. Past the deadline it gives up: it counts
//! what is unwritten, refuses further store calls and fires the store call's interrupt
//! ([`crate::cancellation`]), and leaves the threads to finish on their own.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{select, TryRecvError};

use crate::batcher::Inner;
use crate::panic::panic_message;
use crate::start::thread_name;
use crate::worker::Control;
use crate::{Batcher, CloseReport, Interrupt};

impl Batcher {
    /// Stops intake, drains everything already accepted, makes the final flush and joins
    /// the threads; returns what it wrote and what it could not.
    ///
    /// Rows a failed final flush kept (a deadlock, a failover, a pooler restart) are flushed
    /// again, with a backoff of 250 ms doubling to at most 1 s (counted from the start of the
    /// flush that failed), until they are written or the final flush timeout passes: the
    /// report's `unwritten` is non-zero only when the deadline passed.
    ///
    /// Returns within the final flush timeout (by the injected clock) whatever the store
    /// does: then it counts what is unwritten in `Stats::unwritten_at_shutdown`, refuses
    /// further store calls, fires the store call's interrupt (see
    /// [`Store::interrupt_handle`](crate::Store::interrupt_handle)) on a thread of its own,
    /// so a slow or panicking interrupt cannot hold or unwind the caller, and leaves the
    /// threads to finish on their own. Never panics. Idempotent: later calls return the
    /// first call's report. [`close_timeout`](Self::close_timeout) takes a deadline of
    /// your own and says whether it passed.
    ///
    /// With a [`MockClock`](crate::MockClock) the timeout and the backoff pass only when the
    /// clock is advanced, so a test whose store never returns, or keeps failing, must
    /// advance it (the store itself may, as a failing or hung database's time passes);
    /// otherwise `close` waits for the store.
    ///
    /// ```
    /// use metadata_batcher::{Batcher, MemoryPubsub, MemoryStore};
    ///
    /// let batcher = Batcher::builder(MemoryStore::new(), MemoryPubsub::new()).build().unwrap();
    /// let report = batcher.close();
    /// assert!(!report.deadline_hit);
    /// batcher.close(); // a statement is fine too: the report need not be used
    /// ```
    pub fn close(&self) -> CloseReport {
        match self.inner.close_within(self.inner.final_flush_timeout) {
            Ok(report) | Err(CloseError::TimedOut(report) | CloseError::Closed(report)) => report,
        }
    }

    /// [`close`](Self::close) with `timeout` in place of the final flush timeout, on the
    /// same (injected) clock; says what happened. `Ok`: closed in time, everything
    /// written. [`CloseError::TimedOut`]: the timeout passed and `close` gave up on what
    /// was left, as its report says. [`CloseError::Closed`]: an earlier close had closed
    /// the batcher (or was closing it, and this call waited for it); its report.
    ///
    /// ```
    /// use std::time::Duration;
    /// use metadata_batcher::{Batcher, CloseError, MemoryPubsub, MemoryStore};
    ///
    /// let batcher = Batcher::builder(MemoryStore::new(), MemoryPubsub::new()).build()?;
    /// let report = batcher.close_timeout(Duration::from_secs(5)).expect("nothing to wait for");
    /// assert_eq!(report.unwritten, 0);
    /// assert!(matches!(batcher.close_timeout(Duration::from_secs(5)), Err(CloseError::Closed(_))));
    /// # Ok::<(), metadata_batcher::BuildError>(())
    /// ```
    pub fn close_timeout(&self, timeout: Duration) -> Result<CloseReport, CloseError> {
        self.inner.close_within(timeout)
    }

    /// A guard that closes this batcher when dropped and waits for the close (bounded by
    /// the final flush timeout), like tracing-appender's `WorkerGuard`: hold it in `main`,
    /// so that returning from `main` cannot end the process before the final flush, while
    /// the handle itself never blocks the thread that drops it.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use metadata_batcher::{Batcher, MemoryPubsub, MemoryStore};
    ///
    /// let store = MemoryStore::new();
    /// let batcher = Arc::new(Batcher::builder(store.clone(), MemoryPubsub::new()).build()?);
    /// let _guard = batcher.close_guard(); // dropped last: waits for the final flush
    /// // ... hand `batcher` to the request handlers, run the service ...
    /// # Ok::<(), metadata_batcher::BuildError>(())
    /// ```
    pub fn close_guard(&self) -> CloseGuard {
        CloseGuard {
            inner: self.inner.clone(),
        }
    }
}

/// Closes its [`Batcher`] when dropped, waiting for the final flush; made by
/// [`Batcher::close_guard`]. Dropping the batcher itself never waits: it starts the same
/// close on a thread of its own.
#[must_use = "dropping the guard closes the batcher at once"]
pub struct CloseGuard {
    inner: Arc<Inner>,
}

impl Drop for CloseGuard {
    fn drop(&mut self) {
        let _ = self.inner.close_within(self.inner.final_flush_timeout);
    }
}

impl fmt::Debug for CloseGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloseGuard")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

/// Why [`Batcher::close_timeout`] did not close the batcher in time; each carries the
/// report of what was written and what was not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseError {
    /// The timeout passed first: `close` gave up on what was left (see
    /// [`CloseReport::deadline_hit`]).
    TimedOut(CloseReport),
    /// An earlier close had closed the batcher; its report.
    Closed(CloseReport),
}

impl CloseError {
    /// The report of the close, whichever way it ended.
    pub fn report(&self) -> CloseReport {
        match *self {
            CloseError::TimedOut(report) | CloseError::Closed(report) => report,
        }
    }
}

impl fmt::Display for CloseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseError::TimedOut(report) => write!(
                f,
                "the metadata batcher's close timed out with {} entries unwritten and {} \
                 agents unannounced; give close more time, or see Batcher::health for a slow \
                 store",
                report.unwritten, report.unannounced
            ),
            CloseError::Closed(_) => f.write_str("the metadata batcher was already closed"),
        }
    }
}

impl std::error::Error for CloseError {}

impl Inner {
    /// The close protocol, with `timeout` as its deadline.
    pub(crate) fn close_within(&self, timeout: Duration) -> Result<CloseReport, CloseError> {
        let mut worker = self.worker.lock();
        let Some(handle) = worker.take() else {
            return Err(CloseError::Closed(*self.close_report.lock()));
        };
        *self.shared.intake.write() = false;
        let flushed_before = self.shared.telemetry.flushed.load(Relaxed);
        let deadline = self.shared.clock.after(timeout);
        // A worker that died of a panic has ended already, and counted what it held.
        let _ = self.control.send(Control::Shutdown);
        let ended = &self.worker_ended;
        let mut unannounced = 0;
        let deadline_hit = select! {
            recv(ended) -> _ => false,
            // Both may be ready: a worker that finished in time has finished.
            recv(deadline) -> _ => !matches!(ended.try_recv(), Err(TryRecvError::Disconnected)),
        };
        if deadline_hit {
            unannounced = self.give_up(timeout);
        } else {
            let _ = handle.join();
        }
        let report = CloseReport {
            written: self
                .shared
                .telemetry
                .flushed
                .load(Relaxed)
                .saturating_sub(flushed_before),
            unwritten: self.shared.telemetry.unwritten_at_shutdown.load(Relaxed),
            unannounced: unannounced as u64,
            deadline_hit,
        };
        *self.close_report.lock() = report;
        // From here no `sync` or `flush` waits on the threads left behind.
        self.close_signal.lock().take();
        if deadline_hit {
            Err(CloseError::TimedOut(report))
        } else {
            Ok(report)
        }
    }

    /// What dropping the handle does: starts the close on a thread of its own, so the
    /// thread that drops the handle (a request handler, say) never waits for the final
    /// flush. Nothing to do when a close has begun.
    pub(crate) fn close_in_background(self: &Arc<Self>) {
        // `try_lock`: a close that holds the lock is under way.
        if !self
            .worker
            .try_lock()
            .is_some_and(|worker| worker.is_some())
        {
            return;
        }
        let inner = self.clone();
        let spawned = thread::Builder::new()
            .name(thread_name(&self.name, "close"))
            .spawn(move || {
                let _ = inner.close_within(inner.final_flush_timeout);
            });
        if let Err(error) = spawned {
            tracing::error!(
                %error,
                "could not start a thread to close the metadata batcher; closing on the \
                 thread that dropped it"
            );
            let _ = self.close_within(self.final_flush_timeout);
        }
    }

    /// The final flush timed out: record what is unwritten, stop announcing, then interrupt
    /// the store call; returns how many stored agents go unannounced.
    fn give_up(&self, timeout: Duration) -> usize {
        // Count and refuse further calls under one lock: the worker records no more after
        // this, its rows are in the batch or in flight (never neither, never both) while
        // they are counted, and the interrupt (user code) runs only once the count is safe.
        let counters = &self.shared.telemetry;
        let mut unwritten = 0;
        let store_call = self
            .shared
            .telemetry
            .health(self.shared.clock.now())
            .store_call_age;
        let interrupt = self.shared.cancellation.abandon(|| {
            // Everything accepted and not settled, rather than `queued + batched +
            // in_flight`: the keys of an update the worker is taking in (or was, when it
            // panicked) are in none of those. A key superseded a moment ago may be counted
            // too: the worker publishes that count once per update, not under this lock.
            let stats = counters.snapshot();
            unwritten = stats.accepted.saturating_sub(stats.settled());
            // Added, not stored: a worker that died has counted what it held already.
            counters.unwritten_at_shutdown.fetch_add(unwritten, Relaxed);
        });
        let unannounced = self.shared.notifier.abandon(&self.shared.telemetry);
        // Say what held `close`: a store call, retries of failed flushes, or the publisher.
        if let Some(running) = store_call {
            tracing::error!(
                unwritten,
                ?timeout,
                store_call_age = ?running,
                "metadata batcher final flush timed out in a store call; interrupting it"
            );
        } else if unwritten > 0 {
            tracing::error!(
                unwritten,
                ?timeout,
                "metadata batcher final flush timed out while the store kept failing"
            );
        } else {
            tracing::error!(
                unannounced,
                ?timeout,
                "metadata batcher closed with every row written, but the publisher had not \
                 returned by the final flush timeout; the unannounced agents are counted \
                 as publish errors"
            );
        }
        if let Some(interrupt) = interrupt {
            self.interrupt_off_thread(interrupt);
        }
        unannounced
    }

    /// Fires the store's interrupt on a thread of its own: it is user code, and may block
    /// (a cancel request into a dead network) or panic; neither may reach `close`.
    fn interrupt_off_thread(&self, interrupt: Interrupt) {
        let shared = self.shared.clone();
        let spawned = thread::Builder::new()
            .name(thread_name(&self.name, "cancel"))
            .spawn(move || {
                if let Err(panic) = catch_unwind(AssertUnwindSafe(|| interrupt.fire())) {
                    shared.telemetry.panics.fetch_add(1, Relaxed);
                    tracing::error!(
                        panic = %panic_message(&*panic),
                        "the store's interrupt panicked; the store call is left running"
                    );
                }
            });
        if let Err(error) = spawned {
            tracing::error!(
                %error,
                "could not start a thread to interrupt the store call; it is left running"
            );
        }
    }
}
