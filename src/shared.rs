//! What the handle, the worker thread, the flusher thread and the publisher thread share:
//! whether intake is open, the clock, the telemetry (totals and metrics), the way `close`
//! gives up on a hung store, and the hand-over of announcements; and the `mdbatch-gauges`
//! thread, which reads them.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};

use parking_lot::RwLock;

use crate::cancellation::Cancellation;
use crate::gauges::EVERY;
use crate::notifier::Notifier;
use crate::telemetry::Telemetry;
use crate::Clock;

pub(crate) struct Shared {
    /// `true` while `add` may queue updates. `add` holds a read guard while it sends, so
    /// once `close` (or a dying worker) has taken the write guard, no accepted key can miss
    /// the final drain.
    pub(crate) intake: RwLock<bool>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) telemetry: Telemetry,
    pub(crate) cancellation: Cancellation,
    pub(crate) notifier: Notifier,
}

impl Shared {
    /// Registers the metrics, each carrying `metric_labels`, with the recorder current on
    /// the calling thread; `interval` is the flush interval, which a gauge shows.
    pub(crate) fn new(
        clock: Arc<dyn Clock>,
        metric_labels: &[::metrics::Label],
        interval: std::time::Duration,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            intake: RwLock::new(true),
            telemetry: Telemetry::new(clock.now(), metric_labels, interval),
            cancellation: Cancellation::default(),
            notifier: Notifier::default(),
            clock,
        })
    }

    /// Sets the gauges now: after a flush completes, and on every tick.
    pub(crate) fn update_gauges(&self) {
        self.telemetry.update_gauges(self.clock.now());
    }
}

/// Sets the gauges, so they hold true values before the first tick, and starts
/// `{name}-gauges`. It holds the shared state weakly, so it keeps nothing alive; it sets
/// the gauges one last time once the worker has ended (`worker_alive` 0), and returns.
pub(crate) fn spawn_gauges(shared: &Arc<Shared>, thread_name: String) -> std::io::Result<()> {
    shared.update_gauges();
    let ticks = shared.clock.tick(EVERY);
    let shared: Weak<Shared> = Arc::downgrade(shared);
    std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            for _ in ticks {
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                shared.update_gauges();
                if !shared.telemetry.worker_alive.load(Relaxed) {
                    return;
                }
            }
        })
        .map(drop)
}
