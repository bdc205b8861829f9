//! The fleet under test and what it observed: each replica a `Batcher` over a `PgStore`
//! (wrapped in [`Watched`]) and a `PgPublisher`, and a subscriber on a thread of its own
//! ([`Listener`]), all on the soak's URL.
//!
//! [`Watched`] records, right after each statement committed:
//! - each written row's freshness (commit instant − `collected_at`, the add instant), in
//!   one of two histograms: inside a fault window (from a fault's start to [`SETTLE`] after
//!   its end) or outside;
//! - the replica's gaps between successful statements longer than [`GAP_MIN`]: under a
//!   steady load there is always a backlog, so a gap is a write outage. The report gives
//!   each fault the longest gap that overlaps it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use metadata_batcher::postgres::{PgSubscriber, SubscriberEvent};
use metadata_batcher::{BatchResult, MetadataBatch, Observer, StoreCall};

use super::load;

/// After a fault ends, its window lasts this much longer: the backlog it built is written
/// in that time, and those rows' freshness belongs to the fault.
pub const SETTLE: Duration = Duration::from_secs(5);
/// Gaps between successful statements shorter than this are not outages (at 50k rows/s a
/// replica commits a statement every 10-20 ms).
pub const GAP_MIN: Duration = Duration::from_millis(250);

/// A lock whose holder panicked still guards plain counters: keep using them.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_micros() as u64)
}

/// Freshness of written rows, in µs.
pub struct Freshness {
    pub outside: Histogram<u64>,
    pub inside: Histogram<u64>,
}

/// One replica's successful statements, as gaps.
#[derive(Default)]
pub struct Timeline {
    last_success: Option<Instant>,
    /// (last success before the gap, first success after it).
    pub gaps: Vec<(Instant, Instant)>,
}

/// What the replicas' stores observed; see the module docs.
pub struct Observed {
    /// The current or latest fault window, in µs since the epoch: its start, and its end
    /// plus [`SETTLE`] (`u64::MAX` while the fault lasts). No fault yet: (MAX, MAX).
    window_start: AtomicU64,
    window_end: AtomicU64,
    pub freshness: Mutex<Freshness>,
    pub timelines: Vec<Mutex<Timeline>>,
}

impl Observed {
    pub fn new(replicas: usize) -> Observed {
        let histogram =
            || Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds");
        Observed {
            window_start: AtomicU64::new(u64::MAX),
            window_end: AtomicU64::new(u64::MAX),
            freshness: Mutex::new(Freshness {
                outside: histogram(),
                inside: histogram(),
            }),
            timelines: (0..replicas).map(|_| Mutex::default()).collect(),
        }
    }

    pub fn fault_started(&self) {
        self.window_end.store(u64::MAX, Relaxed);
        self.window_start.store(now_micros(), Relaxed);
    }

    pub fn fault_ended(&self) {
        self.window_end
            .store(now_micros() + SETTLE.as_micros() as u64, Relaxed);
    }

    fn record(&self, replica: usize, batch: &MetadataBatch) {
        let committed = SystemTime::now();
        let committed_us = now_micros();
        let inside = committed_us >= self.window_start.load(Relaxed)
            && committed_us <= self.window_end.load(Relaxed);
        {
            // Shared by the replicas' flusher threads: a lock per statement, not per row.
            let mut freshness = lock(&self.freshness);
            let histogram = match inside {
                true => &mut freshness.inside,
                false => &mut freshness.outside,
            };
            load::record_freshness(histogram, batch, committed);
        }
        let now = Instant::now();
        let mut timeline = lock(&self.timelines[replica]);
        if let Some(last) = timeline.last_success {
            if now - last >= GAP_MIN {
                timeline.gaps.push((last, now));
            }
        }
        timeline.last_success = Some(now);
    }
}

/// Watches the real store through `Observe`, which forwards every optional method, so the
/// batcher sees the store's own interrupts, sizing and parallel statements; see the module
/// docs.
pub struct Watched {
    pub replica: usize,
    pub observed: Arc<Observed>,
}

impl Observer for Watched {
    fn after(&mut self, call: &StoreCall<'_>) {
        for (batch, result) in call.batches.iter().zip(call.results) {
            if let BatchResult::Written(_) = result {
                self.observed.record(self.replica, batch);
            }
        }
    }
}

/// What one subscriber heard.
pub struct Heard {
    /// When it reported `Reconnected`.
    pub reconnects: Vec<Instant>,
    /// Per agent: when it was last announced to this subscriber.
    pub last_heard: Vec<Option<Instant>>,
    /// Instants of every announcement, coarsely: one per second that had any.
    pub heard_seconds: Vec<Instant>,
}

impl Heard {
    /// Agents not heard since the last `Reconnected` (all of them were updated after it:
    /// the soak ends with a quiet spell of whole rounds).
    pub fn unheard_since_reconnect(&self) -> usize {
        let since = self.reconnects.last().copied();
        self.last_heard
            .iter()
            .filter(|heard| match (heard, since) {
                (None, _) => true,
                (Some(at), Some(since)) => *at < since,
                (Some(_), None) => false,
            })
            .count()
    }

    /// Whether it reported `Reconnected` in `[from, to)`.
    pub fn reconnected_in(&self, from: Instant, to: Instant) -> bool {
        self.reconnects.iter().any(|at| *at >= from && *at < to)
    }

    /// Whether it heard an announcement in `[from, to)`.
    pub fn heard_in(&self, from: Instant, to: Instant) -> bool {
        self.heard_seconds.iter().any(|at| *at >= from && *at < to)
    }
}

/// A subscriber on its own thread, until stopped and then quiet for a second.
pub struct Listener {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Heard>,
}

/// After the stop, the listener ends once nothing arrived for this long...
const QUIET: Duration = Duration::from_secs(1);
/// ...or this long after the stop, whatever it still hears.
const MAX_WAIT: Duration = Duration::from_secs(10);

impl Listener {
    pub fn start(
        replica: usize,
        mut subscriber: PgSubscriber,
        agents: usize,
    ) -> Result<Listener, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = thread::Builder::new()
            .name(format!("soak-listen-r{replica}"))
            .spawn(move || {
                let mut heard = Heard {
                    reconnects: Vec::new(),
                    last_heard: vec![None; agents],
                    heard_seconds: Vec::new(),
                };
                let (mut stopped_at, mut quiet_since) = (None, None);
                loop {
                    match subscriber.next(Duration::from_millis(100)) {
                        Ok(Some(SubscriberEvent::Agents(ids))) => {
                            let now = Instant::now();
                            quiet_since = None;
                            for id in ids {
                                if let Some(slot) =
                                    load::agent_index(id).and_then(|i| heard.last_heard.get_mut(i))
                                {
                                    *slot = Some(now);
                                }
                            }
                            if heard
                                .heard_seconds
                                .last()
                                .is_none_or(|last| now - *last >= Duration::from_secs(1))
                            {
                                heard.heard_seconds.push(now);
                            }
                        }
                        Ok(Some(SubscriberEvent::Reconnected)) => {
                            heard.reconnects.push(Instant::now())
                        }
                        // Quiet, still reconnecting (`next` keeps trying on every call),
                        // or an event this soak does not track.
                        Ok(None) | Ok(Some(_)) | Err(_) => {}
                    }
                    if thread_stop.load(Relaxed) {
                        let stopped = *stopped_at.get_or_insert_with(Instant::now);
                        let quiet = *quiet_since.get_or_insert_with(Instant::now);
                        if quiet.elapsed() >= QUIET || stopped.elapsed() >= MAX_WAIT {
                            return heard;
                        }
                    }
                }
            })
            .map_err(|err| format!("starting replica {replica}'s listener: {err}"))?;
        Ok(Listener { stop, thread })
    }

    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
    }

    pub fn join(self) -> Result<Heard, String> {
        self.stop();
        self.thread
            .join()
            .map_err(|_| "a listener thread panicked".to_owned())
    }
}
