//! [`Cancellation`]: how `close` gives up on a store that outlives the final flush timeout.
//!
//! The flusher arms it with the interrupt of each store call before the call and disarms
//! it after; `close`, at its deadline, [`abandons`](Cancellation::abandon) the store: from
//! then on no store call starts, what is unwritten is counted once, and the interrupt of
//! the call in flight is handed to `close` to fire. Rows move between the batch and the
//! flush in flight under the same lock ([`moving_rows`](Cancellation::moving_rows)), so that
//! count never sees a row in neither place or in both.

use parking_lot::Mutex;

use crate::Interrupt;

/// Lets `close` stop a store call that outlives the final flush timeout.
#[derive(Debug)]
pub(crate) struct Cancellation {
    state: Mutex<CancelState>,
    /// Disconnected when `close` gives up, which wakes a worker waiting to retry at
    /// shutdown.
    given_up: crossbeam_channel::Receiver<()>,
}

#[derive(Debug, Default)]
struct CancelState {
    abandoned: bool,
    interrupt: Option<Interrupt>,
    given_up: Option<crossbeam_channel::Sender<()>>,
}

impl Default for Cancellation {
    fn default() -> Self {
        let (sender, given_up) = crossbeam_channel::bounded(0);
        Cancellation {
            state: Mutex::new(CancelState {
                given_up: Some(sender),
                ..CancelState::default()
            }),
            given_up,
        }
    }
}

impl Cancellation {
    /// Holds the interrupt of the call about to start; false when `close` has given up,
    /// in which case the call must not start.
    pub(crate) fn arm(&self, interrupt: Option<Interrupt>) -> bool {
        let mut state = self.state.lock();
        state.interrupt = interrupt;
        !state.abandoned
    }

    pub(crate) fn disarm(&self) {
        self.state.lock().interrupt = None;
    }

    /// Gives up on the store: refuses further calls, runs `count_unwritten` while no rows
    /// can move between the batch and the flush in flight (see
    /// [`moving_rows`](Self::moving_rows)), and returns the interrupt of the call in flight,
    /// for the caller to fire off its own thread (user code may block or panic).
    pub(crate) fn abandon(&self, count_unwritten: impl FnOnce()) -> Option<Interrupt> {
        let mut state = self.state.lock();
        count_unwritten();
        state.abandoned = true;
        state.given_up = None;
        state.interrupt.take()
    }

    /// Moves rows between the batch, the flush in flight and where they end (written,
    /// refused, lost) in `counters`: under the lock [`abandon`](Self::abandon) and a dying
    /// worker count under, so that a count never sees the rows in neither place or in
    /// both. Once per flush on the worker, once per statement on the flusher.
    pub(crate) fn moving_rows(&self, update: impl FnOnce()) {
        let _state = self.state.lock();
        update();
    }

    /// Ready (disconnected) once `close` has given up.
    pub(crate) fn given_up(&self) -> &crossbeam_channel::Receiver<()> {
        &self.given_up
    }

    /// Runs `record` unless `close` has given up on the store; says whether it ran.
    /// Under the lock, so `close`'s own record of what is unwritten cannot be overwritten.
    pub(crate) fn unless_abandoned(&self, record: impl FnOnce()) -> bool {
        let state = self.state.lock();
        if state.abandoned {
            return false;
        }
        record();
        true
    }

    pub(crate) fn is_abandoned(&self) -> bool {
        self.state.lock().abandoned
    }
}
