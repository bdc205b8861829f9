//! [`PgPublisher`]: announces changed agents with `pg_notify`.

use tracing::warn;

use super::error::describe;
use super::session::{Failure, PreparedSession};
use super::PgOptions;
use crate::{PublishError, Publisher};

/// PostgreSQL refuses a NOTIFY payload of this many bytes or more.
pub const MAX_NOTIFY_PAYLOAD: usize = 8000;

/// The PostgreSQL [`Publisher`]: `SELECT pg_notify($1, $2)` on its own connection.
///
/// Every replica listening on the channel (see [`PgSubscriber`](super::PgSubscriber))
/// receives the payload, this one included. Reconnects like [`PgStore`](super::PgStore):
/// a session the server ended while idle is replaced and the notification sent once more;
/// after any other failure that is not about the payload the connection is dropped and the
/// next call opens a fresh one, without sleeping.
///
/// ```no_run
/// use metadata_batcher::postgres::PgPublisher;
/// use metadata_batcher::{agent_ids, Publisher, METADATA_BATCH_CHANNEL};
/// use uuid::Uuid;
///
/// let mut publisher = PgPublisher::connect("postgres://postgres@127.0.0.1:5432/postgres")?;
/// for payload in agent_ids::encode_chunks(&[Uuid::from_u128(1)]) {
///     publisher.publish(METADATA_BATCH_CHANNEL, &payload)?;
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct PgPublisher {
    session: PreparedSession,
}

impl PgPublisher {
    /// Connects with [`PgOptions::default`]; fails when the URL is invalid or the server
    /// cannot be reached.
    pub fn connect(url: &str) -> Result<PgPublisher, PublishError> {
        Self::connect_with(url, PgOptions::default())
    }

    /// Connects with the given options.
    pub fn connect_with(url: &str, options: PgOptions) -> Result<PgPublisher, PublishError> {
        let session =
            PreparedSession::connect(url, &options, "publisher", "SELECT pg_notify($1, $2)")
                .map_err(PublishError::new)?;
        Ok(PgPublisher { session })
    }
}

impl Publisher for PgPublisher {
    fn publish(&mut self, channel: &str, payload: &[u8]) -> Result<(), PublishError> {
        // Checked here so an oversized payload costs no round trip and does not look like a
        // database problem.
        if payload.len() >= MAX_NOTIFY_PAYLOAD {
            return Err(PublishError::new(format!(
                "payload of {} bytes on channel {channel:?} is too large: PostgreSQL NOTIFY \
                 takes less than {MAX_NOTIFY_PAYLOAD} bytes; split it (agent_ids::encode_chunks does)",
                payload.len()
            )));
        }
        let Ok(payload) = std::str::from_utf8(payload) else {
            return Err(PublishError::new(format!(
                "payload on channel {channel:?} is not UTF-8: a NOTIFY payload is text; \
                 encode it (the agent ID format is ASCII base64)"
            )));
        };
        let err = match self.session.execute(&[&channel, &payload]) {
            Ok(_) => return Ok(()),
            Err(Failure::Open(message)) => return Err(PublishError::new(message)),
            Err(Failure::Statement(err)) => err,
        };
        let message = describe(&err);
        warn!(
            application_name = self.session.application_name(),
            channel,
            payload_bytes = payload.len(),
            error = %message,
            "metadata publish failed"
        );
        Err(PublishError::new(message))
    }
}
