//! Batches agent metadata updates into one PostgreSQL statement per flush.
//!
//! Many blocking callers (RPC handlers receiving agents' metadata) call [`Batcher::add`]. The
//! batcher keeps only the newest value per (agent, key), writes a batch with one statement
//! through a [`Store`], and announces the agents it changed through a [`Publisher`], so every
//! replica's watchers can refresh. It is the Rust counterpart of the metadata batcher in
//! Coder's control plane, with the same metric names and NOTIFY payload format, and no async
//! runtime: named OS threads (`mdbatch-worker`, `mdbatch-flush`, `mdbatch-notify`,
//! `mdbatch-gauges`; [`Builder::name`] replaces the `mdbatch`) and crossbeam channels.
//!
//! # A tour
//!
//! - [`Batcher`] and [`Builder`]: the handle callers share, and its settings.
//! - `worker` (private, `src/worker/mod.rs`): the select loop over updates, the flush timer,
//!   flusher completions and control messages. Start reading there.
//! - `flusher` (private, `src/flusher.rs`): one flush: write, announce, record. Its write
//!   path is `chunk_writer` (chunks, isolating refused rows, splitting canceled ones) and
//!   `progress` (every way a flush keeps rows and stops) and `store_call` (one call, panics
//!   caught); `announcer` and `notifier` own the `{name}-notify` thread; `telemetry` records
//!   each event in the totals and the metrics.
//! - `start` (src/start.rs) starts and names the threads; `close` (src/close.rs) is the close
//!   protocol, with `cancellation` for giving up on a hung store call.
//! - [`Clock`], [`SystemClock`], [`MockClock`]: every timer and duration comes from an
//!   injected clock, so tests are deterministic.
//! - [`Store`], [`Publisher`] and their in-process implementations [`MemoryStore`] and
//!   [`MemoryPubsub`]; [`postgres`] has the PostgreSQL ones.
//! - [`agent_ids`]: the payload format; [`metrics`]: the Prometheus metrics.
//!
//! # Example
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use metadata_batcher::{Batcher, MemoryPubsub, MemoryStore, Metadata, MockClock};
//! use uuid::Uuid;
//!
//! let store = MemoryStore::new();
//! let agent = Uuid::from_u128(42);
//! store.register(agent, ["cpu"]);
//!
//! // A mock clock makes the flush happen exactly when the test says so.
//! let clock = MockClock::new();
//! let batcher = Batcher::builder(store.clone(), MemoryPubsub::new())
//!     .interval(Duration::from_secs(5))
//!     .clock(clock.clone())
//!     .build()?;
//!
//! batcher.add(agent, vec![Metadata::new("cpu", "12%", "", SystemTime::now())])?;
//! clock.advance(Duration::from_secs(5));
//! batcher.sync(); // the scheduled flush has completed
//! assert_eq!(store.get(agent, "cpu").unwrap().value, "12%");
//! assert_eq!(batcher.stats().flushes.scheduled, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! See `docs/design.md` for how it works and why, and `docs/operations.md` for failure modes.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// docs.rs (`--cfg docsrs`, nightly) marks feature-gated items with their feature. Current
// nightlies derive the marks from the `cfg`s (`doc_auto_cfg` was merged into `doc_cfg`);
// the explicit `doc(cfg(...))` below keeps the mark on older ones. Stable builds never
// see either attribute.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod add_report;
pub mod agent_ids;
mod announcer;
mod batch;
mod batcher;
mod builder;
mod cancellation;
mod chunk_writer;
mod clock;
mod close;
mod flusher;
mod gauges;
mod memory;
mod metadata;
mod metadata_batch;
pub mod metrics;
mod notifier;
mod observe;
mod panic;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
mod progress;
mod publish;
mod shared;
mod start;
mod statement_size;
mod stats;
mod store;
mod store_call;
mod store_error;
mod telemetry;
mod worker;

pub use add_report::{AddError, AddReport};
pub use batcher::{Batcher, WaitError};
pub use builder::{
    BuildError, Builder, FlushMode, DEFAULT_BATCH_SIZE, DEFAULT_CHANNEL_MULTIPLIER,
    DEFAULT_FINAL_FLUSH_TIMEOUT, DEFAULT_INTERVAL, DEFAULT_MAX_PENDING_BYTES,
    DEFAULT_MAX_PENDING_MULTIPLIER, DEFAULT_NAME, DEFAULT_RETRY_BACKOFF_INITIAL,
    DEFAULT_RETRY_BACKOFF_MAX, MAX_CHANNEL_CAPACITY,
};
pub use clock::{Clock, MockClock, SystemClock};
pub use close::{CloseError, CloseGuard};
pub use memory::{MemoryPubsub, MemoryStore, StoredMetadata};
pub use metadata::{
    InvalidMetadata, Metadata, MetadataField, MAX_ERROR_BYTES, MAX_KEY_CHARS, MAX_VALUE_BYTES,
};
pub use metadata_batch::MetadataBatch;
pub use observe::{Observe, Observer, StoreCall};
pub use publish::{PublishError, Publisher};
pub use stats::{CloseReport, FlushCounts, FlushReason, FlushReport, Health, Stats};
pub use store::{BatchResult, Capabilities, Interrupt, Store, Written};
pub use store_error::{StoreError, StoreErrorKind};

/// Compiles and runs the README's examples with the doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The channel every flush publishes its changed agents on, shared with Coder's Go batcher.
pub const METADATA_BATCH_CHANNEL: &str = "workspace_agent_metadata_batch";
