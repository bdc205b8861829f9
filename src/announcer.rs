//! [`Announcer`]: where a flush's stored agents go, and the `mdbatch-notify` thread's life.
//!
//! Inline ([`FlushMode::Inline`](crate::FlushMode::Inline)) the flushing thread publishes
//! them itself, as Go does. Pipelined, the announcer starts the `mdbatch-notify` thread,
//! which runs [`Notifier::run`](crate::notifier::Notifier::run), hands it each flush's
//! agents, and owns its shutdown.
//!
//! **Shutdown is bounded.** Dropping the announcer (when the flusher thread ends, after the
//! worker's final flush) closes the notifier and waits for the thread to publish what is
//! queued. The wait ends when the thread ends, or when `close` gives up at its final flush
//! timeout, whichever comes first: a publisher that never returns then holds its own thread,
//! not the flusher's, and the agents it held are counted as not announced
//! ([`Notifier::abandon`](crate::notifier::Notifier::abandon)).

use std::sync::Arc;
use std::thread::JoinHandle;

use uuid::Uuid;

use crate::shared::Shared;
use crate::{notifier, Publisher};

/// Where a flush's agents are announced.
pub(crate) enum Announcer {
    /// On the flushing thread.
    Inline(Box<dyn Publisher>),
    /// On the `mdbatch-notify` thread.
    Thread {
        shared: Arc<Shared>,
        thread: Option<JoinHandle<()>>,
        /// Disconnected when the thread ends.
        ended: crossbeam_channel::Receiver<()>,
    },
}

impl Announcer {
    /// Publishes on the flushing thread.
    pub(crate) fn inline(publisher: Box<dyn Publisher>) -> Self {
        Announcer::Inline(publisher)
    }

    /// Starts the thread `thread_name` (`mdbatch-notify` by default), which publishes with
    /// `publisher`.
    pub(crate) fn spawn(
        publisher: Box<dyn Publisher>,
        shared: Arc<Shared>,
        thread_name: String,
    ) -> std::io::Result<Self> {
        let notify_shared = shared.clone();
        let (alive, ended) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                let _alive = alive;
                notify_shared
                    .notifier
                    .run(publisher, &notify_shared.telemetry)
            })?;
        Ok(Announcer::Thread {
            shared,
            thread: Some(thread),
            ended,
        })
    }

    /// Inline, publishes `agents` now and returns the failed payloads; pipelined, `None`
    /// (the thread publishes them once [`hand_over`](Self::hand_over) has run).
    pub(crate) fn publish_inline(
        &mut self,
        seq: u64,
        agents: &[Uuid],
        shared: &Shared,
    ) -> Option<usize> {
        let Announcer::Inline(publisher) = self else {
            return None;
        };
        let failures = notifier::publish(&mut **publisher, &shared.telemetry, agents);
        shared.notifier.published_inline(seq, failures);
        Some(failures)
    }

    /// Pipelined, hands flush `seq`'s agents (possibly none) to the thread; it must be the
    /// last step of a flush, so that no user code after it can leave a waiter unanswered.
    pub(crate) fn hand_over(&self, seq: u64, agents: &[Uuid], shared: &Shared) {
        if let Announcer::Thread { .. } = self {
            shared.notifier.announce(seq, agents, &shared.telemetry);
        }
    }
}

impl Drop for Announcer {
    /// Lets the thread announce what is queued, and waits for it, until `close` gives up.
    fn drop(&mut self) {
        let Announcer::Thread {
            shared,
            thread,
            ended,
        } = self
        else {
            return;
        };
        shared.notifier.close();
        crossbeam_channel::select! {
            recv(ended) -> _ => {}
            recv(shared.cancellation.given_up()) -> _ => {}
        }
        let has_ended = matches!(
            ended.try_recv(),
            Err(crossbeam_channel::TryRecvError::Disconnected)
        );
        if let Some(thread) = thread.take().filter(|_| has_ended) {
            let _ = thread.join();
        }
    }
}
