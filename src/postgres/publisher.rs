//! [`PgPublisher`]: announces changed agents with `pg_notify`.

use postgres::{Client, Statement};
use tracing::{debug, warn};

use super::connect::{ended_by_server, Connector};
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
        if self
            .session
            .as_ref()
            .is_some_and(|session| session.client.is_closed())
        {
            self.session = None;
        }
        let session = match self.session.take() {
            Some(session) => session,
            None => self.open()?,
        };
        Ok(self.session.insert(session))
    }

    /// Sends the notification once; a failure that leaves the session unusable drops it.
    fn try_notify(
        &mut self,
        channel: &str,
        payload: &str,
    ) -> Result<Result<(), postgres::Error>, PublishError> {
        let session = self.session()?;
        let result = session
            .client
            .execute(&session.notify, &[&channel, &payload])
            .map(drop);
        if let Err(err) = &result {
            if classify(err) == Class::Unavailable || session.client.is_closed() {
                self.session = None;
            }
        }
        Ok(result)
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
        // As in `PgStore`: a session the server ended while idle is replaced once. A
        // notification sent twice (had the first gone through) only makes watchers re-read.
        let reused = self.session.is_some();
        let mut result = self.try_notify(channel, payload)?;
        if let Err(err) = &result {
            if reused && ended_by_server(err) {
                debug!(
                    application_name = self.connector.application_name(),
                    error = %describe(err),
                    "metadata publisher session was ended by the server; reconnecting once"
                );
                result = self.try_notify(channel, payload)?;
            }
        }
        result.map_err(|err| {
            let message = describe(&err);
            warn!(
                application_name = self.connector.application_name(),
                channel,
                payload_bytes = payload.len(),
                error = %message,
                "metadata publish failed"
            );
            PublishError::new(message)
        })
    }
}
