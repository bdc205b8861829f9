//! [`PgStore`]: writes each batch with one prepared `UPDATE ... FROM unnest(...)`.

use postgres::NoTls;
use tracing::warn;

use super::error::{classify, describe, store_error};
use super::session::{Failure, PreparedSession};
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

/// The PostgreSQL [`Store`]: one connection, one prepared statement.
///
/// No sleeps, and one retry only: when the first statement on a session that sat idle finds
/// that the server had ended it meanwhile (`pg_terminate_backend`, a restart, an idle
/// timeout), the store opens a new session and runs the update once more, which cannot
/// write anything twice (the update is idempotent under its `collected_at` guard). Any
/// other failure returns its classified error at once; after an
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
    session: PreparedSession,
}

impl PgStore {
    /// Connects with [`PgOptions::default`] (statement timeout 10 s).
    ///
    /// Fails with [`StoreError::Unavailable`] when the URL is invalid, the server cannot be
    /// reached or the table is missing, so a service finds out at start-up, not at the
    /// first flush.
    pub fn connect(url: &str) -> Result<PgStore, StoreError> {
        Self::connect_with(url, PgOptions::default())
    }

    /// Connects with the given options.
    pub fn connect_with(url: &str, options: PgOptions) -> Result<PgStore, StoreError> {
        let session = PreparedSession::connect(url, &options, "store", BATCH_UPDATE_SQL)
            .map_err(StoreError::Unavailable)?;
        Ok(PgStore { session })
    }
}

impl Store for PgStore {
    fn batch_update(&mut self, batch: &MetadataBatch) -> Result<u64, StoreError> {
        let err = match self.session.execute(&[
            &batch.agent_ids,
            &batch.keys,
            &batch.values,
            &batch.errors,
            &batch.collected_at,
        ]) {
            Ok(updated) => return Ok(updated),
            Err(Failure::Open(message)) => return Err(StoreError::Unavailable(message)),
            Err(Failure::Statement(err)) => err,
        };
        let class = classify(&err);
        let message = describe(&err);
        warn!(
            application_name = self.session.application_name(),
            rows = batch.len(),
            class = ?class,
            error = %message,
            "metadata batch update failed"
        );
        Err(store_error(class, message))
    }

    /// Cancels the running statement with PostgreSQL's cancel request (as `pg_cancel_backend`
    /// would); the statement then fails with [`StoreError::Canceled`]. `None` while there is
    /// no open connection: the next call connects first, bounded by the connect timeout.
    fn interrupt_handle(&mut self) -> Option<Interrupt> {
        let token = self.session.cancel_token()?;
        let application_name = self.session.application_name().to_owned();
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
