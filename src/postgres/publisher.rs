//! [`PgPublisher`]: announces changed agents with `pg_notify`.

use std::fmt;

use postgres::types::Type;
use postgres::Config;

use super::connector::{Connector, TlsConnector};
use super::error::{describe, ConnectError};
use super::session::{Failure, StatementSession, StatementSpec};
use super::statement_params::Encoded;
use super::PgOptions;
use crate::{PublishError, Publisher};

/// PostgreSQL refuses a NOTIFY payload of this many bytes or more.
pub const MAX_NOTIFY_PAYLOAD: usize = 8000;

/// The PostgreSQL [`Publisher`]: `SELECT pg_notify($1, $2)` on its own connection.
///
/// Every replica listening on the channel (see [`PgSubscriber`](super::PgSubscriber))
/// receives the payload, this one included. Connects, reconnects and bounds every call like
/// [`PgStore`](super::PgStore): a publish with no answer within `statement_timeout +
/// deadline_margin` fails, and the next one opens a fresh session. Through a
/// transaction-mode pooler it works as is (see `docs/postgres.md`).
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
    session: StatementSession,
}

impl PgPublisher {
    /// Connects with [`PgOptions::default`]; fails when the URL is invalid or the server
    /// cannot be reached.
    pub fn connect(url: &str) -> Result<PgPublisher, PublishError> {
        Self::connect_with(url, PgOptions::default())
    }

    /// [`open`](Self::open), with the error flattened into a [`PublishError`].
    pub fn connect_with(url: &str, options: PgOptions) -> Result<PgPublisher, PublishError> {
        Self::open(url, options).map_err(|err| PublishError::new(err.to_string()))
    }

    /// Connects to a libpq connection string; see [`PgStore::open`](super::PgStore::open).
    pub fn open(url: &str, options: PgOptions) -> Result<PgPublisher, ConnectError> {
        Self::start(Connector::from_url(url, options, "publisher")?)
    }

    /// Connects with your own `postgres::Config` and TLS connector; see
    /// [`PgStore::open_config`](super::PgStore::open_config).
    pub fn open_config(
        config: Config,
        tls: impl TlsConnector,
        options: PgOptions,
    ) -> Result<PgPublisher, ConnectError> {
        Self::start(Connector::from_config(config, tls, options, "publisher"))
    }

    fn start(connector: Connector) -> Result<PgPublisher, ConnectError> {
        let statement = StatementSpec {
            sql: "SELECT pg_notify($1, $2)".to_owned(),
            types: vec![Type::TEXT, Type::TEXT],
            with_settings: false,
            dry_run: None,
            role: "publisher",
        };
        Ok(PgPublisher {
            session: StatementSession::connect(connector, statement)?,
        })
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
        let params = [channel, payload]
            .iter()
            .map(|text| Encoded::new(text, &Type::TEXT))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| PublishError::new(format!("encoding the notification: {err}")))?;
        // No log line here: the batcher logs each failed publish once.
        match self.session.execute(&params) {
            Ok(_) => Ok(()),
            Err(Failure::Open(err)) => Err(PublishError::new(err.to_string())),
            Err(Failure::Statement(err)) => Err(PublishError::new(describe(&err))),
            Err(Failure::NoAnswer(no_answer)) => Err(PublishError::new(no_answer.describe())),
        }
    }
}

impl fmt::Debug for PgPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgPublisher")
            .field("connection", self.session.connector())
            .finish()
    }
}
