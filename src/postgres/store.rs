//! [`PgStore`]: writes each batch with one prepared `UPDATE ... FROM unnest(...)`.

use postgres::{Client, NoTls, Statement};
use tracing::{debug, warn};

use super::connect::{ended_by_server, Connector};
use super::error::{classify, describe, store_error, Class};
use super::PgOptions;
use crate::{Interrupt, MetadataBatch, Store, StoreError};

/// The one statement a flush runs. The five arrays travel in binary and are zipped back
/// into rows by `unnest`, so a batch of any size is one round trip of one prepared
/// statement. The `collected_at` guard makes a late or retried write (another replica, a
/// retry after an outage) unable to overwrite a newer stored value.
pub const BATCH_UPDATE_SQL: &str = "\
WITH m AS (
    SELECT unnest($1::uuid[]) AS workspace_agent_id,
           unnest($2::text[]) AS key,
           unnest($3::text[]) AS value,
           unnest($4::text[]) AS error,
           unnest($5::timestamptz[]) AS collected_at
)
UPDATE workspace_agent_metadata wam
SET value = m.value, error = m.error, collected_at = m.collected_at
FROM m
WHERE wam.workspace_agent_id = m.workspace_agent_id
  AND wam.key = m.key
  AND wam.collected_at <= m.collected_at";

/// An open session with the statement prepared on it.
struct Session {
    client: Client,
    batch_update: Statement,
}

/// The PostgreSQL [`Store`]: one connection, one prepared statement.
///
/// No sleeps, and one retry only: when the first statement on a session that sat idle finds
/// that the server had ended it meanwhile (`pg_terminate_backend`, a restart, an idle
/// timeout), the store opens a new session and runs the statement once more. That cannot
/// write anything twice, because the update is idempotent (the `collected_at` guard), and
/// it costs nothing on a live session, unlike probing the socket before every statement.
/// Any other failure returns its classified error at once; after an
/// [`Unavailable`](StoreError::Unavailable) error (a lost connection, a server shutting
/// down, anything not about the data) the connection is dropped and the *next* call
/// reconnects, re-sets `statement_timeout` and re-prepares. Pacing those retries is the
/// batcher's job (its timer backoff, capped at 5 s); a manual flush calls straight through.
///
/// ```no_run
/// use std::time::{Duration, SystemTime};
/// use metadata_batcher::postgres::{PgOptions, PgStore};
/// use metadata_batcher::{Metadata, MetadataBatch, Store};
/// use uuid::Uuid;
///
/// let mut store = PgStore::connect_with(
///     "postgres://postgres@127.0.0.1:5432/postgres",
///     PgOptions { statement_timeout: Duration::from_secs(2), ..PgOptions::default() },
/// )?;
/// let mut batch = MetadataBatch::default();
/// batch.push(Uuid::from_u128(1), Metadata::new("cpu", "42%", "", SystemTime::now()));
/// let updated = store.batch_update(&batch)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct PgStore {
    connector: Connector,
    session: Option<Session>,
}

impl PgStore {
    /// Connects with [`PgOptions::default`] (statement timeout 10 s).
    ///
    /// Fails with [`StoreError::Unavailable`] when the URL is invalid or the server cannot
    /// be reached, so a service finds a wrong URL at start-up, not at the first flush.
    pub fn connect(url: &str) -> Result<PgStore, StoreError> {
        Self::connect_with(url, PgOptions::default())
    }

    /// Connects with the given options.
    pub fn connect_with(url: &str, options: PgOptions) -> Result<PgStore, StoreError> {
        let connector = Connector::new(url, &options, "store").map_err(StoreError::Unavailable)?;
        let mut store = PgStore {
            connector,
            session: None,
        };
        store.session()?;
        Ok(store)
    }

    /// The open session, opening one first if there is none or the client saw it close.
    fn session(&mut self) -> Result<&mut Session, StoreError> {
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

    /// Runs the update once; a failure that leaves the session unusable drops it.
    fn try_update(
        &mut self,
        batch: &MetadataBatch,
    ) -> Result<Result<u64, postgres::Error>, StoreError> {
        let session = self.session()?;
        let result = session.client.execute(
            &session.batch_update,
            &[
                &batch.agent_ids,
                &batch.keys,
                &batch.values,
                &batch.errors,
                &batch.collected_at,
            ],
        );
        if let Err(err) = &result {
            if classify(err) == Class::Unavailable || session.client.is_closed() {
                self.session = None;
            }
        }
        Ok(result)
    }

    fn open(&self) -> Result<Session, StoreError> {
        let open = || -> Result<Session, postgres::Error> {
            let mut client = self.connector.open()?;
            let batch_update = client.prepare(BATCH_UPDATE_SQL)?;
            Ok(Session {
                client,
                batch_update,
            })
        };
        let session = open().map_err(|err| {
            let message = format!(
                "opening a PostgreSQL session (connect, set statement_timeout, prepare the update): {}",
                describe(&err)
            );
            warn!(
                application_name = self.connector.application_name(),
                error = %message,
                "metadata store cannot connect"
            );
            StoreError::Unavailable(message)
        })?;
        debug!(
            application_name = self.connector.application_name(),
            "metadata store connected"
        );
        Ok(session)
    }
}

impl Store for PgStore {
    fn batch_update(&mut self, batch: &MetadataBatch) -> Result<u64, StoreError> {
        let reused = self.session.is_some();
        let mut result = self.try_update(batch)?;
        if let Err(err) = &result {
            if reused && ended_by_server(err) {
                debug!(
                    application_name = self.connector.application_name(),
                    error = %describe(err),
                    "metadata store session was ended by the server; reconnecting once"
                );
                result = self.try_update(batch)?;
            }
        }
        result.map_err(|err| {
            let class = classify(&err);
            let message = describe(&err);
            warn!(
                application_name = self.connector.application_name(),
                rows = batch.len(),
                class = ?class,
                error = %message,
                "metadata batch update failed"
            );
            store_error(class, message)
        })
    }

    /// Cancels the running statement with PostgreSQL's cancel request (as `pg_cancel_backend`
    /// would); the statement then fails with [`StoreError::Canceled`]. `None` while there is
    /// no open connection: the next call connects first, bounded by the connect timeout.
    fn interrupt_handle(&mut self) -> Option<Interrupt> {
        let token = self.session.as_ref()?.client.cancel_token();
        let application_name = self.connector.application_name().to_owned();
        Some(Interrupt::new(move || {
            if let Err(err) = token.cancel_query(NoTls) {
                warn!(
                    application_name,
                    error = %describe(&err),
                    "canceling the metadata batch update failed"
                );
            }
        }))
    }
}
