//! What the handle, the worker thread, the flusher thread and the publisher thread share:
//! whether intake is open, the clock, the totals, the metric handles, the way `close` gives up
//! on a hung store, and the hand-over of announcements.

use std::sync::Arc;

use parking_lot::RwLock;

use crate::cancellation::Cancellation;
use crate::metrics::Metrics;
use crate::notifier::Notifier;
use crate::stats::Counters;
use crate::Clock;

pub(crate) struct Shared {
    /// `true` while `add` may queue updates. `add` holds a read guard while it sends, so
    /// once `close` (or a dying worker) has taken the write guard, no accepted key can miss
    /// the final drain.
    pub(crate) intake: RwLock<bool>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) counters: Counters,
    pub(crate) metrics: Metrics,
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
            counters: Counters::new(clock.now()),
            metrics: Metrics::register(metric_labels, interval),
            cancellation: Cancellation::default(),
            notifier: Notifier::default(),
            clock,
        })
    }
}
