//! The publisher thread: announces stored agents without holding back the next write.
//!
//! In [`FlushMode::Pipelined`](crate::FlushMode::Pipelined) a flush hands the agents it
//! stored to [`Notifier::announce`] and goes on to the next store write at once; the
//! `mdbatch-notify` thread publishes them. A NOTIFY connection that hangs therefore delays
//! announcements, never table writes. In [`FlushMode::Inline`](crate::FlushMode::Inline)
//! the flush publishes itself, as Go does, and only tells the notifier it is done.
//!
//! **Bounded while the publisher hangs.** Announcements that arrive while a publish runs
//! are merged into one set of agent IDs, so what waits is at most one ID per distinct agent
//! (16 bytes and a hash slot each), however long the publisher hangs.
//!
//! **`flush()` and `sync()` still wait for the publish.** The worker does not answer them
//! itself: it hands each answer to [`Notifier::when_published`] with the sequence number
//! of the flush it covers, and the answer goes out once that flush's agents are announced.
//! Only the callers wait; the flusher never does. A publisher bounds its own calls (the
//! PostgreSQL one has a publish deadline); the batcher cannot interrupt one. So that no
//! caller waits past `close`, [`Notifier::abandon`] (when `close` gives up) answers every
//! waiter at once, and so does the end of the thread: an answer is never left behind.
//!
//! **Every stored agent is announced, or counted as not.** Agents that reach the notifier
//! after `close` gave up on it, or after its thread ended, and agents still queued when
//! `close` gave up, are counted as failed payloads (`publish_errors`) and logged.

use std::collections::HashSet;
use std::mem;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::Relaxed;

use crossbeam_channel::Sender;
use parking_lot::{Condvar, Mutex};
use uuid::Uuid;

use crate::telemetry::Telemetry;
use crate::{agent_ids, FlushReport, Publisher, METADATA_BATCH_CHANNEL};

/// An answer that waits for a flush's announcement.
pub(crate) enum Waiter {
    Sync(Sender<()>),
    /// A manual flush's report; its `publish_errors` is filled in when known.
    Flush(Sender<Option<FlushReport>>, FlushReport),
}

impl Waiter {
    fn answer(self, publish_errors: usize) {
        match self {
            Waiter::Sync(reply) => {
                let _ = reply.send(());
            }
            Waiter::Flush(reply, mut report) => {
                report.publish_errors = publish_errors;
                let _ = reply.send(Some(report));
            }
        }
    }
}

#[derive(Default)]
struct State {
    /// Agents waiting to be announced, merged across flushes.
    agents: HashSet<Uuid, foldhash::fast::RandomState>,
    /// The last flush handed over, and the last one whose agents are announced. Flush
    /// sequence numbers start at 1, so 0 means none.
    announced: u64,
    published: u64,
    /// Failed payloads of the publish that completed `published`.
    failures: usize,
    waiters: Vec<(u64, Waiter)>,
    closed: bool,
    /// `close` gave up, or the thread ended: nothing more is published, and every answer
    /// goes out at once.
    done: bool,
    /// Agents of the publish in progress, if any.
    publishing: usize,
}

/// Hand-over point between flushes, the publisher thread and the callers that wait.
#[derive(Default)]
pub(crate) struct Notifier {
    state: Mutex<State>,
    wake: Condvar,
}

impl Notifier {
    /// Queues the agents flush `seq` stored (possibly none) for the publisher thread; once
    /// nothing more is published, counts them as not announced instead.
    pub(crate) fn announce(&self, seq: u64, agents: &[Uuid], telemetry: &Telemetry) {
        let mut state = self.state.lock();
        state.announced = seq;
        if state.done {
            Self::release(&mut state, seq, 0);
            drop(state);
            count_unannounced(telemetry, agents.len());
            return;
        }
        state.agents.extend(agents.iter().copied());
        self.wake.notify_one();
    }

    /// Records that flush `seq` was announced inline, with `failures` failed payloads.
    pub(crate) fn published_inline(&self, seq: u64, failures: usize) {
        let mut state = self.state.lock();
        state.announced = seq;
        Self::release(&mut state, seq, failures);
    }

    /// Answers `waiter` once flush `seq` is announced (at once if it is).
    pub(crate) fn when_published(&self, seq: u64, waiter: Waiter) {
        let mut state = self.state.lock();
        if seq <= state.published || state.done {
            // No later flush can have started (the worker calls this as it completes
            // `seq`), so the last publish is the one that carried `seq`.
            waiter.answer(state.failures);
        } else {
            state.waiters.push((seq, waiter));
        }
    }

    /// Lets the thread finish what is queued and end.
    pub(crate) fn close(&self) {
        self.state.lock().closed = true;
        self.wake.notify_one();
    }

    /// `close` gave up: the agents still queued or being published are counted as not
    /// announced, every waiter is answered now, and the thread ends once the publish it may
    /// be stuck in returns. Returns how many agents that counted.
    pub(crate) fn abandon(&self, telemetry: &Telemetry) -> usize {
        let mut state = self.state.lock();
        state.closed = true;
        // A publish that has not returned by now may never return: its agents count too
        // (twice, should it fail after all).
        let unannounced = state.agents.len() + state.publishing;
        state.agents.clear();
        let failures = payloads(unannounced);
        Self::finish(&mut state, failures);
        drop(state);
        self.wake.notify_one();
        count_unannounced(telemetry, unannounced);
        unannounced
    }

    /// Nothing more will be published: answers every waiter, with `failures` as the
    /// publish errors of the flushes not yet announced.
    fn finish(state: &mut State, failures: usize) {
        state.done = true;
        let through = state.announced.max(state.published);
        Self::release(state, through, failures);
        for (_, waiter) in mem::take(&mut state.waiters) {
            waiter.answer(failures);
        }
    }

    fn release(state: &mut State, through: u64, failures: usize) {
        state.published = state.published.max(through);
        state.failures = failures;
        let published = state.published;
        let (done, waiting): (Vec<_>, Vec<_>) = mem::take(&mut state.waiters)
            .into_iter()
            .partition(|(seq, _)| *seq <= published);
        state.waiters = waiting;
        for (_, waiter) in done {
            waiter.answer(failures);
        }
    }

    /// The `mdbatch-notify` thread: publishes what is queued until closed.
    pub(crate) fn run(&self, mut publisher: Box<dyn Publisher>, telemetry: &Telemetry) {
        // However the thread ends (a panic in a tracing subscriber or metrics recorder
        // included), no caller is left waiting for an answer.
        let _finish = FinishOnExit(self);
        let mut agents: Vec<Uuid> = Vec::new();
        loop {
            let (after, through) = {
                let mut state = self.state.lock();
                while state.agents.is_empty() {
                    // Flushes that stored nothing have nothing to announce.
                    let announced = state.announced;
                    if announced > state.published {
                        Self::release(&mut state, announced, 0);
                    }
                    if state.closed {
                        return;
                    }
                    self.wake.wait(&mut state);
                }
                agents.clear();
                agents.extend(state.agents.drain());
                state.publishing = agents.len();
                (state.published, state.announced)
            };
            let failures = publish(&mut *publisher, telemetry, &agents);
            telemetry.set_last_publish_errors(after, through, failures);
            let mut state = self.state.lock();
            state.publishing = 0;
            Self::release(&mut state, through, failures);
        }
    }
}

/// Ends the notifier when its thread ends, however it ends.
struct FinishOnExit<'a>(&'a Notifier);

impl Drop for FinishOnExit<'_> {
    fn drop(&mut self) {
        Notifier::finish(&mut self.0.state.lock(), 0);
    }
}

/// Payloads that `agents` agents take.
fn payloads(agents: usize) -> usize {
    agents.div_ceil(agent_ids::MAX_IDS_PER_CHUNK)
}

/// Agents that were stored but will not be announced: counted as failed payloads, as a
/// publish that failed would be, and logged, so a watcher's missed refresh is visible.
fn count_unannounced(telemetry: &Telemetry, agents: usize) {
    if agents == 0 {
        return;
    }
    let failures = payloads(agents);
    telemetry.publish_errors(failures);
    tracing::error!(
        agents,
        payloads = failures,
        "metadata batcher closed before announcing these stored agents; their watchers \
         refresh on their next change"
    );
}

/// Publishes `agents` in payloads of at most 363 IDs; returns how many failed. Each
/// failure (an error, a panic, a publish deadline in the publisher) is counted and logged
/// on one line; the remaining payloads are still sent.
pub(crate) fn publish(
    publisher: &mut dyn Publisher,
    telemetry: &Telemetry,
    agents: &[Uuid],
) -> usize {
    let mut failures = 0;
    for payload in agent_ids::encode_chunks(agents) {
        let result = catch_unwind(AssertUnwindSafe(|| {
            publisher.publish(METADATA_BATCH_CHANNEL, &payload)
        }));
        let error = match result {
            Ok(Ok(())) => continue,
            Ok(Err(error)) => error.to_string(),
            Err(panic) => {
                telemetry.panics.fetch_add(1, Relaxed);
                format!(
                    "publisher panicked: {}",
                    crate::panic::panic_message(&*panic)
                )
            }
        };
        failures += 1;
        telemetry.publish_errors(1);
        tracing::error!(
            error = %error,
            chunk_size = payload.len() / agent_ids::UUID_BASE64_LEN,
            payload_size = payload.len(),
            "failed to publish workspace agent metadata batch"
        );
    }
    failures
}
