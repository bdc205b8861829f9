//! Batches agent metadata updates into one PostgreSQL statement per flush.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent_ids;
mod clock;
mod memory;
mod metadata;
mod metadata_batch;
pub mod postgres;
mod publish;
mod store;

pub use clock::{Clock, MockClock, SystemClock};
pub use memory::{MemoryPubsub, MemoryStore, StoredMetadata};
pub use metadata::{
    InvalidMetadata, Metadata, MetadataField, MAX_ERROR_BYTES, MAX_KEY_CHARS, MAX_VALUE_BYTES,
};
pub use metadata_batch::MetadataBatch;
pub use publish::{PublishError, Publisher};
pub use store::{Interrupt, Store, StoreError};

/// The channel every flush publishes its changed agents on, shared with Coder's Go batcher.
pub const METADATA_BATCH_CHANNEL: &str = "workspace_agent_metadata_batch";
