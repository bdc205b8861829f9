//! [`PgPublisher`]: announces changed agents with `pg_notify`.

use postgres::{Client, Statement};
use tracing::{debug, warn};

use super::connect::{is_open, Connector};
use super::error::{classify, describe, Class};
use super::PgOptions;
use crate::{PublishError, Publisher};

/// PostgreSQL refuses a NOTIFY payload of this many bytes or more.
pub const MAX_NOTIFY_PAYLOAD: usize = 8000;

struct Session {
    client: Client,
    notify: Statement,
}

/// The PostgreSQL [`Publisher`]: `SELECT pg_notify($1, $2)` on its own connection.
///
/// Every replica listening on the channel (see [`PgSubscriber`](super::PgSubscriber))
/// receives the payload, this one included. Reconnects like [`PgStore`](super::PgStore):
/// after a failure that is not about the payload the connection is dropped and the next
/// call opens a fresh one, without sleeping.
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
    connector: Connector,
    session: Option<Session>,
}

impl PgPublisher {
    /// Connects with [`PgOptions::default`]; fails when the URL is invalid or the server
    /// cannot be reached.
    pub fn connect(url: &str) -> Result<PgPublisher, PublishError> {
        Self::connect_with(url, PgOptions::default())
    }

    /// Connects with the given options.
    pub fn connect_with(url: &str, options: PgOptions) -> Result<PgPublisher, PublishError> {
        let connector = Connector::new(url, &options, "publisher").map_err(PublishError::new)?;
        let mut publisher = PgPublisher {
            connector,
            session: None,
        };
        publisher.session()?;
        Ok(publisher)
    }

    fn session(&mut self) -> Result<&mut Session, PublishError> {
        let still_open = self
            .session
            .take()
            .and_then(|mut session| is_open(&mut session.client).then_some(session));
        let session = match still_open {
            Some(session) => session,
            None => self.open()?,
        };
        Ok(self.session.insert(session))
    }

    fn open(&self) -> Result<Session, PublishError> {
        let open = || -> Result<Session, postgres::Error> {
            let mut client = self.connector.open()?;
            let notify = client.prepare("SELECT pg_notify($1, $2)")?;
            Ok(Session { client, notify })
        };
        let session = open().map_err(|err| {
            let message = format!("connecting to PostgreSQL: {}", describe(&err));
            warn!(
                application_name = self.connector.application_name(),
                error = %message,
                "metadata publisher cannot connect"
            );
            PublishError::new(message)
        })?;
        debug!(
            application_name = self.connector.application_name(),
            "metadata publisher connected"
        );
        Ok(session)
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
        let session = self.session()?;
        let err = match session
            .client
            .execute(&session.notify, &[&channel, &payload])
        {
            Ok(_) => return Ok(()),
            Err(err) => err,
        };
        let class = classify(&err);
        if class == Class::Unavailable || session.client.is_closed() {
            self.session = None;
        }
        let message = describe(&err);
        warn!(
            application_name = self.connector.application_name(),
            channel,
            payload_bytes = payload.len(),
            error = %message,
            "metadata publish failed"
        );
        Err(PublishError::new(message))
    }
}
