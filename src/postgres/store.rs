//! [`PgStore`]: writes each batch with one `UPDATE ... FROM unnest(...)`.

use std::fmt;
use std::time::Duration;

use postgres::types::{ToSql, Type};
use postgres::Config;

use super::connector::{Connector, TlsConnector};
use super::error::{classify, store_error, Class, ConnectError};
use super::session::{Failure, StatementSession, StatementSpec};
use super::statement_params::Encoded;
use super::{NoAnswer, PgOptions, DEFAULT_TABLE};
use crate::{BatchResult, Capabilities, Interrupt, MetadataBatch, Store, StoreError, Written};

/// The one statement a flush runs, on the default table. The five arrays travel in binary
/// and are zipped back into rows by `unnest`, so a batch of any size is one round trip of
/// one statement. The `collected_at` guard makes a late or retried write (another replica, a
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

/// The parameter types of [`BATCH_UPDATE_SQL`], in order.
const PARAM_TYPES: [Type; 5] = [
    Type::UUID_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TIMESTAMPTZ_ARRAY,
];

/// [`BATCH_UPDATE_SQL`] for `table` (`name` or `schema.name`), each part quoted as an
/// identifier so that any name is taken literally.
pub(crate) fn batch_update_sql(table: &str) -> Result<String, ConnectError> {
    if table == DEFAULT_TABLE {
        return Ok(BATCH_UPDATE_SQL.to_owned());
    }
    Ok(BATCH_UPDATE_SQL.replace(
        "UPDATE workspace_agent_metadata wam",
        &format!("UPDATE {} wam", quote_table(table)?),
    ))
}

/// `"schema"."name"` for `schema.name`; refuses what no table can be called.
pub(crate) fn quote_table(table: &str) -> Result<String, ConnectError> {
    let parts: Vec<&str> = table.split('.').collect();
    if parts.len() > 2
        || parts
            .iter()
            .any(|part| part.is_empty() || part.contains('\0'))
    {
        return Err(ConnectError::config(format!(
            "PgOptions::table {table:?} is not a table name: give `name` or `schema.name`"
        )));
    }
    Ok(parts
        .iter()
        .map(|part| format!("\"{}\"", part.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join("."))
}

/// The PostgreSQL [`Store`]: one statement per batch, every call bounded.
///
/// **Connecting.** [`open`](Self::open) takes a libpq connection string (URL or
/// `key=value`, with `sslmode`, `sslrootcert`, `sslcert` and `sslkey` as libpq means them);
/// [`open_config`](Self::open_config) takes your own `postgres::Config` and TLS connector.
/// Both fail with a [`ConnectError`] that tells a configuration problem from an outage.
/// [`connect`](Self::connect) and [`connect_with`](Self::connect_with) are the same with the
/// error flattened into an unavailable [`StoreError`].
///
/// **Every call is bounded** (see `docs/design.md`): connecting by `connect_timeout`, each
/// statement by `statement_timeout + deadline_margin`, past which a cancel request is sent,
/// the session closed and the call fails as unavailable. A lock held elsewhere fails the
/// statement after `lock_timeout` as [`StoreErrorKind::Canceled`](crate::StoreErrorKind::Canceled), and the batcher splits the
/// batch so the other rows are written.
///
/// **A backlog goes out in parallel statements**, one per session, up to
/// [`PgOptions::parallel_statements`] (default 2): the sessions past the first are opened
/// when a flush first carries more than one statement's rows. Behind a transaction pooler
/// (unnamed statements) each statement's `BEGIN` and settings, the statement and `COMMIT`
/// go out together, in one round trip.
///
/// **Reconnects.** No sleeps, and one retry only: when the first statement on a session that
/// sat idle finds that the server had ended it meanwhile (`pg_terminate_backend`, a restart,
/// an idle timeout), the store opens a new session and runs the update once more, which
/// cannot write anything twice (the update is idempotent under its `collected_at` guard).
/// After any other [`Unavailable`](crate::StoreErrorKind::Unavailable) error the session is dropped and
/// the *next* call reconnects. Pacing those retries is the batcher's job.
///
/// ```no_run
/// use std::time::{Duration, SystemTime};
/// use metadata_batcher::postgres::{PgOptions, PgStore};
/// use metadata_batcher::{Metadata, MetadataBatch, Store};
/// use uuid::Uuid;
///
/// let mut store = PgStore::open(
///     "postgres://postgres@db.internal:5432/postgres?sslmode=verify-full&sslrootcert=/etc/ssl/db-ca.pem",
///     PgOptions::new().statement_timeout(Duration::from_secs(2)),
/// )?;
/// let mut batch = MetadataBatch::default();
/// batch.push(Uuid::from_u128(1), Metadata::new("cpu", "42%", "", SystemTime::now()));
/// let updated = store.batch_update(&batch)?.updated();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct PgStore {
    /// The first writes every flush that fits one statement; the others join it, one
    /// statement each, for a backlog ([`PgOptions::parallel_statements`]).
    sessions: Vec<StatementSession>,
}

/// How many times a statement that conflicted with another writer's transaction (a
/// deadlock, a serialization failure) is run again, after a short pause, on the same
/// session, before its rows go back to the batcher as
/// [`StoreErrorKind::ConflictsExhausted`](crate::StoreErrorKind::ConflictsExhausted). The
/// batcher's own statements lock rows in one order and do not conflict with each other, so
/// a conflict comes from another writer: its transaction has moved on once the server has
/// aborted this one (a deadlock is found after `deadlock_timeout`, 1 s by default), and
/// one run more nearly always goes through. Three bound the time a writer that keeps conflicting
/// can take; after them, the batcher splits the rows into smaller statements.
const CONFLICT_RETRIES: u32 = 3;

/// The pause before the first run again, doubling for each further one (10, 20, 40 ms): long
/// enough for the other transaction to take the locks this one gave up, short against the
/// `deadlock_timeout` (1 s) the conflict has already cost.
const CONFLICT_PAUSE: Duration = Duration::from_millis(10);

impl PgStore {
    /// Connects with [`PgOptions::default`]; see [`connect_with`](Self::connect_with).
    pub fn connect(url: &str) -> Result<PgStore, StoreError> {
        Self::connect_with(url, PgOptions::default())
    }

    /// [`open`](Self::open), with the error flattened into an unavailable [`StoreError`] (its
    /// message says what was wrong), for callers that do not tell configuration problems
    /// from outages.
    pub fn connect_with(url: &str, options: PgOptions) -> Result<PgStore, StoreError> {
        Self::open(url, options)
            .map_err(|err| StoreError::unavailable(err.to_string()).with_source(err))
    }

    /// Connects to a libpq connection string (a `postgres://` URL or `key=value` pairs).
    ///
    /// Fails at once, not at the first flush, when the string or a certificate is wrong, the
    /// server cannot be reached or refuses the login, or the table is missing.
    pub fn open(url: &str, options: PgOptions) -> Result<PgStore, ConnectError> {
        Self::start(Connector::from_url(url, options, "store")?)
    }

    /// Connects with your own `postgres::Config` and TLS connector (anything
    /// `postgres::Config::connect` takes that can be cloned for each reconnect and cancel
    /// request): a password from a secret file, a Unix socket, a TLS setup the service
    /// already has. The options' timeouts and keepalives are applied to the config.
    ///
    /// ```no_run
    /// use metadata_batcher::postgres::{PgOptions, PgStore};
    ///
    /// let mut config = postgres::Config::new();
    /// config.host_path("/var/run/postgresql").user("coder").dbname("coder");
    /// let store = PgStore::open_config(config, postgres::NoTls, PgOptions::default())?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open_config(
        config: Config,
        tls: impl TlsConnector,
        options: PgOptions,
    ) -> Result<PgStore, ConnectError> {
        Self::start(Connector::from_config(config, tls, options, "store"))
    }

    fn start(connector: Connector) -> Result<PgStore, ConnectError> {
        let sql = batch_update_sql(&connector.options.table)?;
        let statement = StatementSpec {
            sql,
            types: PARAM_TYPES.to_vec(),
            with_settings: true,
            dry_run: Some(
                encode(&MetadataBatch::default())
                    .map_err(|err| ConnectError::config(format!("encoding a dry run: {err}")))?,
            ),
            role: "store",
        };
        if connector.options.parallel_statements == 0 {
            return Err(ConnectError::config(
                "PgOptions::parallel_statements is 0: give 1 for one statement at a time, or more"
                    .to_owned(),
            ));
        }
        Ok(PgStore {
            sessions: vec![StatementSession::connect(connector, statement)?],
        })
    }
}

/// The batch's five columns in binary, on the flusher's thread.
fn encode(batch: &MetadataBatch) -> Result<Vec<Encoded>, Box<dyn std::error::Error + Sync + Send>> {
    let columns: [&(dyn ToSql + Sync); 5] = [
        &batch.agent_ids,
        &batch.keys,
        &batch.values,
        &batch.errors,
        &batch.collected_at,
    ];
    columns
        .iter()
        .zip(&PARAM_TYPES)
        .map(|(column, ty)| Encoded::new(*column, ty))
        .collect()
}

/// Writes `batch` on `session`, running it again after a conflict with another writer; the
/// result says how many times it ran again. Runs inside the session's runtime.
async fn write(
    session: &mut StatementSession,
    batch: &MetadataBatch,
) -> Result<Written, StoreError> {
    let params = match encode(batch) {
        Ok(params) => params,
        Err(err) => {
            let message = format!("a value cannot be sent to PostgreSQL: {err}");
            return Err(StoreError::rejected(message));
        }
    };
    let mut retries = 0;
    // No log line here: the batcher logs each failed call once, with the rows it held, and
    // the conflicts the result carries.
    loop {
        match session.execute_async(&params).await {
            Err(Failure::Statement(err))
                if classify(&err) == Class::Conflict && retries < CONFLICT_RETRIES =>
            {
                // The transaction that won still has to take the lock this statement
                // released: run again at once, the statement could take it back first and
                // close the same cycle again, so it pauses.
                tokio::time::sleep(CONFLICT_PAUSE * (1 << retries)).await;
                retries += 1;
            }
            result => {
                let retries = u64::from(retries);
                return match result_to_store(result) {
                    Ok(written) => Ok(written.with_conflicts(retries)),
                    Err(err) => Err(err.with_conflicts(retries)),
                };
            }
        }
    }
}

impl PgStore {
    /// Writes `batches` at once, one per session, on the sessions' shared runtime: their
    /// statements go out together and this thread waits for all the answers.
    fn write_at_once(&mut self, batches: &[MetadataBatch]) -> Vec<BatchResult> {
        // Opened at the first backlog that needs them: a replica that keeps up holds one
        // connection.
        while self.sessions.len() < batches.len() {
            let sibling = self.sessions[0].sibling();
            self.sessions.push(sibling);
        }
        let runtime = self.sessions[0].runtime().clone();
        let writes = self
            .sessions
            .iter_mut()
            .zip(batches)
            .map(|(session, batch)| write(session, batch));
        match runtime.block_on_caught(futures_util::future::join_all(writes)) {
            Ok(outcomes) => outcomes.into_iter().map(BatchResult::from).collect(),
            Err(no_answer) => {
                self.sessions
                    .iter_mut()
                    .for_each(StatementSession::drop_session);
                let message = no_answer.describe();
                batches
                    .iter()
                    .map(|_| BatchResult::Failed(StoreError::unavailable(message.clone())))
                    .collect()
            }
        }
    }
}

impl Store for PgStore {
    fn batch_update(&mut self, batch: &MetadataBatch) -> Result<Written, StoreError> {
        match self.write_at_once(std::slice::from_ref(batch)).pop() {
            Some(BatchResult::Written(written)) => Ok(written),
            Some(BatchResult::Failed(err)) => Err(err),
            // `write_at_once` answers every batch it is given.
            _ => Err(StoreError::unavailable("the statement was not run")),
        }
    }

    /// Cancels the running statements with PostgreSQL's cancel request and stops waiting
    /// for them at once; the call fails as canceled and the sessions are
    /// replaced. Fired before the call's statements start (while their parameters are
    /// encoded, say), it stops them as they start; fired after the call returned, it
    /// stops the next call, unless a new handle is taken first (the batcher takes one
    /// before every call). It reaches the sessions open when it is taken: `None` while there is none,
    /// and a session the call itself opens (the first backlog's, or one replacing a session
    /// lost) runs on, bounded by the connect timeout and the statement deadline.
    fn interrupt_handle(&mut self) -> Option<Interrupt> {
        let aborts: Vec<_> = self
            .sessions
            .iter_mut()
            .filter_map(StatementSession::abort_handle)
            .collect();
        if aborts.is_empty() {
            return None;
        }
        Some(Interrupt::new(move || {
            aborts.into_iter().for_each(|abort| abort.fire())
        }))
    }

    /// [`PgOptions::max_statement_rows`] rows a statement, and
    /// [`PgOptions::parallel_statements`] statements at once.
    fn capabilities(&self) -> Capabilities {
        let options = &self.sessions[0].connector().options;
        Capabilities::default()
            .with_max_batch_rows(options.max_statement_rows)
            .with_parallel_batches(options.parallel_statements)
    }

    /// Each group of up to [`PgOptions::parallel_statements`] batches at once, one per
    /// session; after a group in which the database was unavailable, the rest are not
    /// tried.
    fn batch_update_many(&mut self, batches: &[MetadataBatch]) -> Vec<BatchResult> {
        let parallel = self.capabilities().parallel_batches();
        let mut results = Vec::with_capacity(batches.len());
        for group in batches.chunks(parallel) {
            let unavailable = results
                .iter()
                .any(|result| matches!(result, BatchResult::Failed(err) if err.is_unavailable()));
            if unavailable {
                results.extend(group.iter().map(|_| BatchResult::NotTried));
            } else {
                results.extend(self.write_at_once(group));
            }
        }
        results
    }
}

/// A session's answer as the batcher reads it.
fn result_to_store(result: Result<u64, Failure>) -> Result<Written, StoreError> {
    match result {
        Ok(updated) => Ok(Written::rows(updated)),
        Err(Failure::Open(err)) => Err(StoreError::unavailable(err.to_string()).with_source(err)),
        Err(Failure::Statement(err)) => Err(store_error(classify(&err), err)),
        Err(Failure::NoAnswer(NoAnswer::Aborted)) => Err(StoreError::canceled()),
        Err(Failure::NoAnswer(no_answer)) => Err(StoreError::unavailable(no_answer.describe())),
    }
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("connection", self.sessions[0].connector())
            .field("sessions", &self.sessions.len())
            .finish()
    }
}
