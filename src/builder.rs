//! [`Builder`]: the batcher's settings, checked before any thread starts.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::{Batcher, Clock, Publisher, Store, SystemClock};

/// Entries per flush before a capacity flush, as in Go: with agents reporting 5-15 keys,
/// one flush covers 30-100 agents.
pub const DEFAULT_BATCH_SIZE: usize = 500;
/// Time between scheduled flushes, as in Go: a balance between database load and how fresh
/// the dashboard is.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Channel capacity, in keys, per entry of batch size: Go's headroom for bursts.
pub const DEFAULT_CHANNEL_MULTIPLIER: usize = 5;
/// A bound on distinct entries, per entry of batch size, for [`Builder::max_pending`].
///
/// No longer a default: the backlog is bounded in bytes ([`DEFAULT_MAX_PENDING_BYTES`]),
/// and there is no bound on entries unless one is set. It was the default bound on
/// entries (20 × 500 = 10,000), which measured half the throughput the pipelined design
/// can reach under a slow database; kept as a reasonable entry bound for those who want
/// one: `.max_pending(batch_size * DEFAULT_MAX_PENDING_MULTIPLIER)`.
pub const DEFAULT_MAX_PENDING_MULTIPLIER: usize = 20;
/// The backlog's bound in bytes (64 MiB): the batch and the flush in flight, counted as
/// their keys', values' and errors' allocations plus 288 bytes per entry. With realistic
/// entries (a short key, a value of a few dozen bytes) that is about 200,000 distinct
/// entries: a fleet of 20,000 agents × 10 keys rides out an outage of any length.
pub const DEFAULT_MAX_PENDING_BYTES: usize = 64 << 20;
/// How long `close` may take, as in Go.
pub const DEFAULT_FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(15);
/// First retry delay after a failed flush; it doubles on each further failure.
pub const DEFAULT_RETRY_BACKOFF_INITIAL: Duration = Duration::from_millis(250);
/// The longest retry delay. At 2 s, the first try after an outage ends comes at most 2 s
/// later (`scripts/soak` measured 5 s putting every 5 s outage over its fault + 3 s
/// allowance), while a replica still makes only one store call per 2 s against a database
/// that is down.
pub const DEFAULT_RETRY_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// The instance name threads are named after when [`Builder::name`] is not set:
/// `mdbatch-worker`, `mdbatch-flush` and so on.
pub const DEFAULT_NAME: &str = "mdbatch";

/// The largest channel, in keys, [`Builder::build`] accepts (1,048,576; 2^20).
///
/// The channel is allocated whole at `build`: a slot per key of 48 bytes on 64-bit targets
/// (the update's agent ID and vector, and crossbeam's stamp), so this bound is 48 MiB up
/// front, beside the 64 MiB the backlog may hold by default ([`DEFAULT_MAX_PENDING_BYTES`]).
/// It is 400 times the default channel (2,500 keys), far more than any burst between two
/// collections of the worker (at most a millisecond apart). Past it, the memory is better
/// spent on the backlog: raise [`max_pending_bytes`](Builder::max_pending_bytes) instead.
pub const MAX_CHANNEL_CAPACITY: usize = 1 << 20;

/// The bytes one slot of the update channel takes on a 64-bit target; a unit test keeps
/// it true.
const CHANNEL_SLOT_BYTES: usize = 48;

/// Where flushes run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum FlushMode {
    /// On a flusher thread of their own: the worker keeps taking in and deduplicating
    /// updates while the database works, and the next flush carries everything that
    /// accrued meanwhile (up to the pending bound). The default.
    #[default]
    Pipelined,
    /// On the worker thread, as Coder's Go batcher does: intake waits while the store
    /// works, the channel fills, and a flush never carries more than `batch_size` entries.
    /// For comparison and for tests that need a full channel.
    Inline,
}

/// Settings of a [`Batcher`]; made by [`Batcher::builder`].
///
/// ```
/// use std::time::Duration;
/// use metadata_batcher::{Batcher, MemoryPubsub, MemoryStore};
///
/// let batcher = Batcher::builder(MemoryStore::new(), MemoryPubsub::new())
///     .batch_size(1000)
///     .interval(Duration::from_secs(2))
///     .build()
///     .unwrap();
/// batcher.close();
/// ```
pub struct Builder {
    pub(crate) store: Box<dyn Store>,
    pub(crate) publisher: Box<dyn Publisher>,
    pub(crate) batch_size: usize,
    pub(crate) interval: Duration,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) channel_capacity: Option<usize>,
    pub(crate) max_pending: Option<usize>,
    pub(crate) max_pending_bytes: usize,
    pub(crate) final_flush_timeout: Duration,
    pub(crate) retry_backoff_initial: Duration,
    pub(crate) retry_backoff_max: Duration,
    pub(crate) flush_mode: FlushMode,
    pub(crate) metric_labels: Vec<::metrics::Label>,
    pub(crate) name: String,
}

impl Builder {
    pub(crate) fn new(store: impl Store, publisher: impl Publisher) -> Self {
        Builder {
            store: Box::new(store),
            publisher: Box::new(publisher),
            batch_size: DEFAULT_BATCH_SIZE,
            interval: DEFAULT_INTERVAL,
            clock: Arc::new(SystemClock),
            channel_capacity: None,
            max_pending: None,
            max_pending_bytes: DEFAULT_MAX_PENDING_BYTES,
            final_flush_timeout: DEFAULT_FINAL_FLUSH_TIMEOUT,
            retry_backoff_initial: DEFAULT_RETRY_BACKOFF_INITIAL,
            retry_backoff_max: DEFAULT_RETRY_BACKOFF_MAX,
            flush_mode: FlushMode::default(),
            metric_labels: Vec::new(),
            name: DEFAULT_NAME.to_owned(),
        }
    }

    /// The channel's capacity in keys: as set, or `DEFAULT_CHANNEL_MULTIPLIER` batches.
    pub(crate) fn effective_channel_capacity(&self) -> usize {
        self.channel_capacity
            .unwrap_or(self.batch_size.saturating_mul(DEFAULT_CHANNEL_MULTIPLIER))
    }

    /// Distinct entries that trigger a capacity flush (default 500).
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// Time from the end of one flush to the next scheduled one (default 5 s).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// The clock for every timer and duration (default [`SystemClock`]).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Keys the channel holds before `add` drops (default 5 × batch size; at most
    /// [`MAX_CHANNEL_CAPACITY`], as the channel is allocated whole at `build`).
    pub fn channel_capacity(mut self, keys: usize) -> Self {
        self.channel_capacity = Some(keys);
        self
    }

    /// A bound on the distinct entries the batch may hold while a flush is running or the
    /// store is failing (default: none, only [`max_pending_bytes`](Builder::max_pending_bytes);
    /// at least the batch size). Beyond it the entries with the oldest `collected_at` are
    /// dropped and counted as `retention_dropped`. The batch may exceed it by one batch
    /// size between flushes, which trim exactly to it.
    pub fn max_pending(mut self, entries: usize) -> Self {
        self.max_pending = Some(entries);
        self
    }

    /// The bound on the backlog's bytes (default [`DEFAULT_MAX_PENDING_BYTES`], 64 MiB):
    /// the batch plus what the flush in flight has not yet written, each entry counted as
    /// its key's, value's and error's allocations plus 288 bytes (map slot and allocator
    /// overhead). Past it the entries with the oldest `collected_at` are dropped, an
    /// eighth of the bound at a time, and counted as `retention_dropped`.
    ///
    /// ```
    /// use metadata_batcher::{Batcher, MemoryPubsub, MemoryStore};
    ///
    /// let batcher = Batcher::builder(MemoryStore::new(), MemoryPubsub::new())
    ///     .max_pending_bytes(16 << 20)
    ///     .build()
    ///     .unwrap();
    /// batcher.close();
    /// ```
    pub fn max_pending_bytes(mut self, bytes: usize) -> Self {
        self.max_pending_bytes = bytes;
        self
    }

    /// The longest `close` may take (default 15 s): past it the store call in flight is
    /// interrupted and what is unwritten is counted in `unwritten_at_shutdown`.
    pub fn final_flush_timeout(mut self, timeout: Duration) -> Self {
        self.final_flush_timeout = timeout;
        self
    }

    /// Retry delays after failed flushes: `initial`, doubling per failure, at most `max`
    /// (defaults 250 ms and 2 s). Capacity flushes pause while the store is failing, so an
    /// outage costs one store call per delay, not one per update.
    pub fn retry_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.retry_backoff_initial = initial;
        self.retry_backoff_max = max;
        self
    }

    /// Where flushes run (default [`FlushMode::Pipelined`]).
    pub fn flush_mode(mut self, mode: FlushMode) -> Self {
        self.flush_mode = mode;
        self
    }

    /// Constant labels on every metric of this batcher (default none: unlabelled, as Go's
    /// names are), so several batchers in one process report apart. The per-reason metrics
    /// carry them beside `reason`. Names must be Prometheus label names other than
    /// `reason`, `le` and `quantile`, each given once; [`build`](Self::build) refuses others.
    ///
    /// ```
    /// use metadata_batcher::{Batcher, MemoryPubsub, MemoryStore};
    ///
    /// let batcher = Batcher::builder(MemoryStore::new(), MemoryPubsub::new())
    ///     .metric_labels([("batcher", "replica-a")])
    ///     .build()?;
    /// batcher.close();
    /// # Ok::<(), metadata_batcher::BuildError>(())
    /// ```
    pub fn metric_labels<K, V>(mut self, labels: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        self.metric_labels = labels
            .into_iter()
            .map(|(name, value)| ::metrics::Label::new(name.into(), value.into()))
            .collect();
        self
    }

    /// The instance name (default [`DEFAULT_NAME`], `mdbatch`) every thread of this batcher
    /// is named after, as `{name}-{role}`: `{name}-worker`, `{name}-flush`,
    /// `{name}-notify`, `{name}-gauges`, and, while closing, `{name}-close` and
    /// `{name}-cancel`. Two batchers in one process then tell apart in a thread dump,
    /// `top -H` and panic messages.
    ///
    /// Linux shows only the first 15 bytes of a thread's name: a name of up to 8 bytes
    /// keeps the whole `{name}-{role}`; a longer one keeps its first bytes and loses the
    /// end of the role, so put what tells your instances apart first (`a-coderd`, not
    /// `coderd-a`). [`build`](Self::build) refuses an empty name and one with a NUL byte.
    ///
    /// ```
    /// use metadata_batcher::{Batcher, MemoryPubsub, MemoryStore};
    ///
    /// // Threads `replica2-worker`, `replica2-flush`, ...
    /// let batcher = Batcher::builder(MemoryStore::new(), MemoryPubsub::new())
    ///     .name("replica2")
    ///     .build()?;
    /// batcher.close();
    /// # Ok::<(), metadata_batcher::BuildError>(())
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Checks the settings and starts the threads: the worker, and, when pipelined, the
    /// flusher and the publisher's; and the one that keeps the health gauges current (see
    /// [`name`](Self::name) for their names). Metric handles are registered here, with the
    /// recorder current on the calling thread.
    pub fn build(self) -> Result<Batcher, BuildError> {
        for (setting, zero) in [
            ("batch_size", self.batch_size == 0),
            ("interval", self.interval.is_zero()),
            ("channel_capacity", self.channel_capacity == Some(0)),
            ("max_pending_bytes", self.max_pending_bytes == 0),
            ("final_flush_timeout", self.final_flush_timeout.is_zero()),
            ("retry_backoff", self.retry_backoff_initial.is_zero()),
        ] {
            if zero {
                return Err(BuildError::Zero { setting });
            }
        }
        let channel_capacity = self.effective_channel_capacity();
        if channel_capacity > MAX_CHANNEL_CAPACITY {
            return Err(BuildError::ChannelTooLarge {
                keys: channel_capacity,
                set_by: if self.channel_capacity.is_some() {
                    "channel_capacity"
                } else {
                    "batch_size"
                },
            });
        }
        if self.name.is_empty() || self.name.contains('\0') {
            return Err(BuildError::Name { name: self.name });
        }
        if let Some((name, problem)) = crate::metrics::label_problem(&self.metric_labels) {
            return Err(BuildError::MetricLabel { name, problem });
        }
        if self.retry_backoff_max < self.retry_backoff_initial {
            return Err(BuildError::BackoffMaxBelowInitial {
                initial: self.retry_backoff_initial,
                max: self.retry_backoff_max,
            });
        }
        if let Some(max_pending) = self.max_pending {
            if max_pending < self.batch_size {
                return Err(BuildError::MaxPendingBelowBatchSize {
                    max_pending,
                    batch_size: self.batch_size,
                });
            }
        }
        Batcher::start(self)
    }
}

/// Why [`Builder::build`] refused.
#[derive(Debug)]
#[non_exhaustive]
pub enum BuildError {
    /// A size or duration that must be positive is zero.
    Zero {
        /// The builder method that set it.
        setting: &'static str,
    },
    /// The pending bound cannot hold one batch.
    MaxPendingBelowBatchSize {
        /// The bound asked for.
        max_pending: usize,
        /// The batch size.
        batch_size: usize,
    },
    /// The longest retry delay is shorter than the first.
    BackoffMaxBelowInitial {
        /// The first delay.
        initial: Duration,
        /// The longest delay.
        max: Duration,
    },
    /// A constant metric label cannot be used.
    MetricLabel {
        /// The label's name.
        name: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The channel would allocate more than [`MAX_CHANNEL_CAPACITY`] keys' slots up front.
    ChannelTooLarge {
        /// The capacity asked for, in keys.
        keys: usize,
        /// The setting it came from: `channel_capacity`, or `batch_size` (the channel's
        /// default is `DEFAULT_CHANNEL_MULTIPLIER` batches).
        set_by: &'static str,
    },
    /// The instance name ([`Builder::name`]) is empty or holds a NUL byte, which a thread
    /// name cannot.
    Name {
        /// The name asked for.
        name: String,
    },
    /// The operating system refused to start a thread.
    Spawn(std::io::Error),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Zero { setting } => {
                write!(
                    f,
                    "{setting} is zero; give it a positive value or leave the default"
                )
            }
            BuildError::MaxPendingBelowBatchSize {
                max_pending,
                batch_size,
            } => write!(
                f,
                "max_pending ({max_pending}) is below batch_size ({batch_size}); \
                 the batch must be able to hold at least one full flush"
            ),
            BuildError::BackoffMaxBelowInitial { initial, max } => write!(
                f,
                "retry_backoff max ({max:?}) is shorter than its initial delay ({initial:?})"
            ),
            BuildError::MetricLabel { name, problem } => {
                write!(f, "metric label {name:?} {problem}")
            }
            BuildError::ChannelTooLarge { keys, set_by } => write!(
                f,
                "a channel of {keys} keys (from {set_by}) would allocate about {} MiB up \
                 front; the most is {MAX_CHANNEL_CAPACITY} keys: set channel_capacity lower \
                 (a burst needs little), and raise max_pending_bytes to ride out a slow \
                 database",
                keys.saturating_mul(CHANNEL_SLOT_BYTES) >> 20
            ),
            BuildError::Name { name } => write!(
                f,
                "the batcher name {name:?} cannot name a thread: give a non-empty name \
                 without NUL bytes"
            ),
            BuildError::Spawn(error) => {
                write!(f, "could not start the metadata batcher's thread: {error}")
            }
        }
    }
}

impl std::error::Error for BuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BuildError::Spawn(error) => Some(error),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::Update;

    /// The channel's slot: the message and crossbeam's stamp (an `AtomicUsize`), the figure
    /// [`MAX_CHANNEL_CAPACITY`]'s bound is derived from.
    #[test]
    fn a_channel_slot_is_as_large_as_the_bound_assumes() {
        let slot = std::mem::size_of::<Update>() + std::mem::size_of::<usize>();
        assert!(slot <= CHANNEL_SLOT_BYTES, "{slot} bytes");
        if cfg!(target_pointer_width = "64") {
            assert_eq!(slot, CHANNEL_SLOT_BYTES);
        }
    }
}
