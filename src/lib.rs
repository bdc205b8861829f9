//! Batches agent metadata updates into one PostgreSQL statement per flush.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent_ids;
mod batch;
mod batcher;
mod builder;
mod clock;
mod flusher;
mod memory;
mod metadata;
mod metadata_batch;
pub mod metrics;
pub mod postgres;
mod publish;
mod stats;
mod store;
mod worker;

pub use batcher::{AddError, AddReport, Batcher};
pub use builder::{
    BuildError, Builder, FlushMode, DEFAULT_BATCH_SIZE, DEFAULT_CHANNEL_MULTIPLIER,
    DEFAULT_FINAL_FLUSH_TIMEOUT, DEFAULT_INTERVAL, DEFAULT_MAX_PENDING_MULTIPLIER,
    DEFAULT_RETRY_BACKOFF_INITIAL, DEFAULT_RETRY_BACKOFF_MAX,
};
pub use clock::{Clock, MockClock, SystemClock};
pub use memory::{MemoryPubsub, MemoryStore, StoredMetadata};
pub use metadata::{
    InvalidMetadata, Metadata, MetadataField, MAX_ERROR_BYTES, MAX_KEY_CHARS, MAX_VALUE_BYTES,
};
pub use metadata_batch::MetadataBatch;
pub use publish::{PublishError, Publisher};
pub use stats::{FlushCounts, FlushReason, FlushReport, Health, Stats};
pub use store::{Interrupt, Store, StoreError};

/// The channel every flush publishes its changed agents on, shared with Coder's Go batcher.
pub const METADATA_BATCH_CHANNEL: &str = "workspace_agent_metadata_batch";
