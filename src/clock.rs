//! Time, injected: [`SystemClock`] in production, [`MockClock`] in tests.
//!
//! The batcher reads the time and arms its timers only through a [`Clock`]. Every duration
//! it reports (flush elapsed, the flush-duration histogram, log fields) comes from the same
//! clock as the timers, so a test that moves a [`MockClock`] sees exact, repeatable numbers.
//! (Coder's Go batcher timed its flush with the wall clock in one place and the injected
//! clock in another; with a mock clock it reported a flush of 19,166 hours.) The one
//! measurement against the wall clock, the write lag from an entry's `collected_at`, reads
//! it from the same clock too ([`Clock::system_time`]).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::Mutex;

/// A source of time and timers.
pub trait Clock: Send + Sync + 'static {
    /// The current instant.
    fn now(&self) -> Instant;
    /// A receiver that gets one instant once `d` has passed.
    fn after(&self, d: Duration) -> Receiver<Instant>;
    /// A receiver that gets an instant every `d`; a reader that falls behind misses ticks
    /// rather than receiving a backlog.
    fn tick(&self, d: Duration) -> Receiver<Instant>;
    /// The current wall-clock time, to compare with an entry's `collected_at`. The default
    /// is [`SystemTime::now`]; a mock clock moves it with [`now`](Clock::now).
    fn system_time(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// The real clock: [`Instant::now`] and crossbeam's timer channels (no thread per timer).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn after(&self, d: Duration) -> Receiver<Instant> {
        crossbeam_channel::after(d)
    }

    fn tick(&self, d: Duration) -> Receiver<Instant> {
        crossbeam_channel::tick(d)
    }
}

/// A clock that moves only when told to, for deterministic tests.
///
/// Its wall-clock time ([`Clock::system_time`]) starts at the real time when it is created
/// and moves with [`advance`](MockClock::advance) only.
///
/// [`advance`](MockClock::advance) moves time and, before it returns, delivers every timer
/// and tick that became due. It only delivers to the channels and never waits for anyone
/// to handle them, so it may be called from any thread, including from inside a
/// [`Store`](crate::Store) that simulates a slow database.
///
/// ```
/// use std::time::Duration;
/// use metadata_batcher::{Clock, MockClock};
///
/// let clock = MockClock::new();
/// let start = clock.now();
/// let timer = clock.after(Duration::from_secs(5));
/// clock.advance(Duration::from_secs(4));
/// assert!(timer.try_recv().is_err());
/// clock.advance(Duration::from_secs(1));
/// assert_eq!(timer.try_recv().unwrap(), start + Duration::from_secs(5));
/// assert_eq!(clock.now() - start, Duration::from_secs(5));
/// ```
#[derive(Debug, Clone)]
pub struct MockClock {
    inner: Arc<Mutex<MockState>>,
}

#[derive(Debug)]
struct MockState {
    now: Instant,
    /// `now` and the wall-clock time when the clock was created.
    created: (Instant, SystemTime),
    timers: Vec<MockTimer>,
}

#[derive(Debug)]
struct MockTimer {
    deadline: Instant,
    /// `Some` for a ticker: the deadline moves on by this much after each delivery.
    period: Option<Duration>,
    sender: Sender<Instant>,
}

impl MockClock {
    /// A clock standing at an arbitrary instant, with no timers.
    pub fn new() -> Self {
        let now = Instant::now();
        MockClock {
            inner: Arc::new(Mutex::new(MockState {
                now,
                created: (now, SystemTime::now()),
                timers: Vec::new(),
            })),
        }
    }

    /// Moves time forward by `d` and delivers, in deadline order, every timer and tick now
    /// due. Timers whose receiver was dropped are forgotten when they come due.
    pub fn advance(&self, d: Duration) {
        let mut state = self.inner.lock();
        state.now += d;
        let now = state.now;
        state.timers.sort_by_key(|t| t.deadline);
        state.timers.retain_mut(|timer| {
            if timer.deadline > now {
                return true;
            }
            // Every timer channel has capacity one, so this never blocks: a full ticker
            // channel is a slow reader missing a tick.
            let delivered = timer.sender.try_send(timer.deadline);
            if matches!(delivered, Err(TrySendError::Disconnected(_))) {
                return false;
            }
            match timer.period {
                Some(period) => {
                    while timer.deadline <= now {
                        timer.deadline += period;
                    }
                    true
                }
                None => false,
            }
        });
    }

    fn register(&self, d: Duration, period: Option<Duration>) -> Receiver<Instant> {
        let (sender, receiver) = crossbeam_channel::bounded(1);
        let mut state = self.inner.lock();
        let deadline = state.now + d;
        if d.is_zero() && period.is_none() {
            let _ = sender.try_send(deadline);
        } else {
            state.timers.push(MockTimer {
                deadline,
                period,
                sender,
            });
        }
        receiver
    }
}

impl Default for MockClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MockClock {
    fn now(&self) -> Instant {
        self.inner.lock().now
    }

    fn after(&self, d: Duration) -> Receiver<Instant> {
        self.register(d, None)
    }

    fn tick(&self, d: Duration) -> Receiver<Instant> {
        self.register(d, Some(d.max(Duration::from_nanos(1))))
    }

    fn system_time(&self) -> SystemTime {
        let state = self.inner.lock();
        let (created, wall) = state.created;
        wall + (state.now - created)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn after_fires_once_at_its_deadline_and_zero_fires_at_once() {
        let clock = MockClock::new();
        let start = clock.now();
        assert_eq!(clock.after(Duration::ZERO).try_recv(), Ok(start));
        let timer = clock.after(2 * SECOND);
        clock.advance(SECOND);
        assert!(timer.try_recv().is_err());
        clock.advance(5 * SECOND);
        assert_eq!(timer.try_recv(), Ok(start + 2 * SECOND));
        clock.advance(5 * SECOND);
        assert!(timer.try_recv().is_err(), "a timer fires once");
    }

    #[test]
    fn tick_fires_every_period_and_a_slow_reader_misses_ticks() {
        let clock = MockClock::new();
        let start = clock.now();
        let ticks = clock.tick(SECOND);
        clock.advance(SECOND);
        assert_eq!(ticks.try_recv(), Ok(start + SECOND));
        // Three periods pass unread: one tick waits, the others are missed.
        clock.advance(SECOND);
        clock.advance(SECOND);
        clock.advance(SECOND);
        assert_eq!(ticks.try_recv(), Ok(start + 2 * SECOND));
        assert!(ticks.try_recv().is_err());
        clock.advance(SECOND);
        assert_eq!(ticks.try_recv(), Ok(start + 5 * SECOND));
    }

    #[test]
    fn system_time_moves_with_advance_only() {
        let clock = MockClock::new();
        let wall = clock.system_time();
        assert_eq!(clock.system_time(), wall);
        clock.advance(3 * SECOND);
        assert_eq!(clock.system_time(), wall + 3 * SECOND);
    }

    #[test]
    fn timers_whose_receiver_is_gone_are_forgotten() {
        let clock = MockClock::new();
        drop(clock.after(SECOND));
        drop(clock.tick(SECOND));
        clock.advance(SECOND);
        assert!(clock.inner.lock().timers.is_empty());
    }
}
