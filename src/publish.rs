//! Where a flush announces its agents: the [`Publisher`] trait.
//!
//! After a batch is stored, the batcher publishes the IDs of the agents it changed on
//! [`METADATA_BATCH_CHANNEL`](crate::METADATA_BATCH_CHANNEL), in the payload format of
//! [`agent_ids`](crate::agent_ids). PostgreSQL's `NOTIFY` reaches every replica connected to
//! the database ([`PgPublisher`](crate::postgres::PgPublisher)); [`MemoryPubsub`](crate::MemoryPubsub)
//! reaches subscribers in the same process.

use std::fmt;

/// Sends a payload to every subscriber of a channel.
///
/// ```
/// use metadata_batcher::{PublishError, Publisher};
///
/// struct Discard;
///
/// impl Publisher for Discard {
///     fn publish(&mut self, _channel: &str, _payload: &[u8]) -> Result<(), PublishError> {
///         Ok(())
///     }
/// }
/// ```
pub trait Publisher: Send + 'static {
    /// Publishes one payload on `channel`.
    fn publish(&mut self, channel: &str, payload: &[u8]) -> Result<(), PublishError>;
}

/// A publish that failed; the batcher counts and logs it and sends the remaining payloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishError {
    message: String,
}

impl PublishError {
    /// A publish error with what went wrong.
    pub fn new(message: impl Into<String>) -> Self {
        PublishError {
            message: message.into(),
        }
    }

    /// What went wrong.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "publishing changed agents failed: {}", self.message)
    }
}

impl std::error::Error for PublishError {}
