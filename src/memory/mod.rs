//! In-process implementations of the store and publisher, for the demo, tests and services
//! that want the batcher without a database.
//!
//! [`MemoryStore`] keeps the PostgreSQL store's semantics exactly: rows exist only once
//! registered, a write updates a row only when its `collected_at` is not older than the
//! stored one, and a statement that refuses one row refuses them all. [`MemoryPubsub`]
//! delivers each payload to every subscriber of its channel.

mod pubsub;
mod store;

pub use pubsub::MemoryPubsub;
pub use store::{MemoryStore, StoredMetadata};
