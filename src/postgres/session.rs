//! One statement on one session, reopened when it breaks: the part
//! [`PgStore`](super::PgStore) and [`PgPublisher`](super::PgPublisher) share.
//!
//! The session is a [`DeadlineClient`], so every call has a deadline. The statement is
//! sent in the [`StatementMode`] the options ask for; a prepared session that finds its
//! statement gone (SQLSTATE 26000: a transaction-mode pooler handed the call to another
//! server connection) switches to unnamed statements for good and runs the call again.
//!
//! No sleeps, and one retry only. The client learns that the server ended a session
//! (`pg_terminate_backend`, a restart, an idle-session timeout) only when it next uses it,
//! so when the first statement on a session that sat idle fails that way, a new session is
//! opened and the statement runs once more. Both statements tolerate that: the update is
//! idempotent under its `collected_at` guard, and a repeated NOTIFY only makes watchers
//! re-read. After any other failure that leaves the session unusable it is dropped, and the
//! next call opens a new one; pacing those calls is the batcher's job.
//!
//! Unnamed statements with per-transaction settings (the pooler path) send `BEGIN` and the
//! settings, the statement and `COMMIT` together, pipelined: one round trip, as a prepared
//! statement costs, instead of three.

use std::error::Error as StdError;
use std::sync::Arc;
use std::thread;

use postgres::types::{ToSql, Type};
use tokio_postgres::Client;
use tracing::{debug, warn};

use super::connector::Connector;
use super::deadline::{self, Abort, DeadlineClient, NoAnswer, SessionRuntime};
use super::error::{classify, describe, Class, ConnectError};
use super::statement_params::{typed, Encoded};
use super::{ConnectErrorKind, StatementMode};

/// The statement a session runs, with its parameter types.
pub(crate) struct StatementSpec {
    pub(crate) sql: String,
    pub(crate) types: Vec<Type>,
    /// Whether the session settings apply to it (the store's update; not a NOTIFY).
    pub(crate) with_settings: bool,
    /// Parameters with no rows: run once at connect in unnamed mode, where nothing is
    /// prepared, so that a missing table or column still shows at start-up.
    pub(crate) dry_run: Option<Vec<Encoded>>,
    /// "store" or "publisher", for log lines and messages.
    pub(crate) role: &'static str,
}

/// Why [`StatementSession::execute`] failed.
pub(crate) enum Failure {
    /// No session could be opened.
    Open(ConnectError),
    /// The statement failed on an open session.
    Statement(postgres::Error),
    /// The statement gave no answer; the session was dropped.
    NoAnswer(NoAnswer),
}

struct Open {
    client: DeadlineClient,
    prepared: Option<tokio_postgres::Statement>,
}

/// A session that runs one statement, prepared or unnamed as [`StatementMode`] says (and
/// unnamed for good once a pooler shows), reopened when it breaks.
pub(crate) struct StatementSession {
    connector: Arc<Connector>,
    statement: Arc<StatementSpec>,
    mode: StatementMode,
    session: Option<Open>,
    /// Drives the session; shared with its [`sibling`](Self::sibling)s, so that they can
    /// run their statements at once. Last, so the session's socket goes before it.
    runtime: Arc<SessionRuntime>,
}

impl StatementSession {
    /// Opens the first session at once, so a wrong URL, a refused login or a missing table
    /// shows at start-up.
    pub(crate) fn connect(
        connector: Connector,
        statement: StatementSpec,
    ) -> Result<StatementSession, ConnectError> {
        let mode = connector.options.statement_mode;
        let mut session = StatementSession {
            runtime: deadline::runtime()?,
            connector: Arc::new(connector),
            statement: Arc::new(statement),
            mode,
            session: None,
        };
        // Logged here, at start-up, for services that only log: later reconnects fail into
        // a flush, which the batcher logs once.
        if let Err(err) = session.open_at_start() {
            warn!(
                application_name = session.connector.application_name(),
                error = %err,
                "metadata {} cannot connect",
                session.statement.role
            );
            return Err(err);
        }
        Ok(session)
    }

    /// Opens the session on a thread of its own: constructors may be called on an async
    /// runtime's thread, where tokio refuses the `block_on` that drives the session (the
    /// thread is blocked meanwhile, as any blocking call blocks it).
    fn open_at_start(&mut self) -> Result<(), ConnectError> {
        let runtime = self.runtime.clone();
        thread::scope(|scope| {
            let opening = thread::Builder::new()
                .name("mdbatch-connect".to_owned())
                .spawn_scoped(scope, || runtime.block_on(self.session()).map(drop))
                .map_err(|err| {
                    ConnectError::new(
                        ConnectErrorKind::Unavailable,
                        format!("cannot start a thread to connect: {err}"),
                    )
                })?;
            opening.join().unwrap_or_else(|_| {
                Err(ConnectError::new(
                    ConnectErrorKind::Unavailable,
                    "the PostgreSQL client panicked while connecting".to_owned(),
                ))
            })
        })
    }

    /// Another session for the same statement on the same runtime, not opened until its
    /// first call, which starts in the mode this one has come to (unnamed, once a pooler
    /// showed).
    pub(crate) fn sibling(&self) -> StatementSession {
        StatementSession {
            runtime: self.runtime.clone(),
            connector: self.connector.clone(),
            statement: self.statement.clone(),
            mode: self.mode,
            session: None,
        }
    }

    /// The runtime the session is driven on: [`execute_async`](Self::execute_async) runs
    /// inside its `block_on`.
    pub(crate) fn runtime(&self) -> &Arc<SessionRuntime> {
        &self.runtime
    }

    /// [`execute_async`](Self::execute_async), waited for on this thread.
    pub(crate) fn execute(&mut self, params: &[Encoded]) -> Result<u64, Failure> {
        let runtime = self.runtime.clone();
        runtime
            .block_on_caught(self.execute_async(params))
            .unwrap_or_else(|no_answer| {
                self.drop_session();
                Err(Failure::NoAnswer(no_answer))
            })
    }

    /// Drops the open session, if any: the next call opens a new one.
    pub(crate) fn drop_session(&mut self) {
        self.session = None;
    }

    /// Runs the statement, replacing a session the server ended while it sat idle.
    pub(crate) async fn execute_async(&mut self, params: &[Encoded]) -> Result<u64, Failure> {
        let reused = self.session.is_some();
        match self.execute_once(params).await {
            Err(Failure::Statement(err)) if reused && ended_by_server(&err) => {
                debug!(
                    application_name = self.connector.application_name(),
                    error = %describe(&err),
                    "metadata {} session was ended by the server; reconnecting once",
                    self.statement.role
                );
                self.session = None;
                self.execute_once(params).await
            }
            Err(Failure::Statement(err))
                if self.mode == StatementMode::Prepared
                    && err.code().map(|code| code.code()) == Some("26000") =>
            {
                self.switch_to_unnamed("its prepared statement is gone: SQLSTATE 26000");
                self.session = None;
                self.execute_once(params).await
            }
            result => result,
        }
    }

    /// Stops the statement running now, or the session's next one: see [`Abort`].
    pub(crate) fn abort_handle(&mut self) -> Option<Abort> {
        Some(self.session.as_mut()?.client.abort())
    }

    pub(crate) fn connector(&self) -> &Connector {
        &self.connector
    }

    async fn execute_once(&mut self, params: &[Encoded]) -> Result<u64, Failure> {
        let statement = self.statement.clone();
        let settings = (self.mode == StatementMode::Unnamed && statement.with_settings)
            .then(|| self.connector.options.session_settings("LOCAL", true));
        let deadline = self.connector.options.statement_deadline();
        let session = self.session().await.map_err(Failure::Open)?;
        let prepared = session.prepared.clone();
        let (client, driver) = session.client.split();
        let answer = driver
            .call(
                deadline,
                run(
                    client,
                    &statement,
                    prepared.as_ref(),
                    settings.as_deref(),
                    params,
                ),
            )
            .await;
        let result = match answer {
            Ok(result) => result,
            Err(no_answer) => {
                self.session = None;
                return Err(Failure::NoAnswer(no_answer));
            }
        };
        result.map_err(|err| {
            if classify(&err) == Class::Unavailable {
                self.session = None;
            }
            Failure::Statement(err)
        })
    }

    /// The open session, opening one first if there is none.
    async fn session(&mut self) -> Result<&mut Open, ConnectError> {
        if self.session.is_none() {
            let opened = self.open().await?;
            self.session = Some(opened);
        }
        Ok(self.session.as_mut().expect("just opened"))
    }

    async fn open(&mut self) -> Result<Open, ConnectError> {
        let statement = self.statement.clone();
        let mode = self.mode;
        let (client, set_up) = DeadlineClient::open(
            self.connector.clone(),
            async move |connector: &Connector, client: &Client| {
                set_up(connector, client, &statement, mode).await
            },
        )
        .await?;
        debug!(
            application_name = self.connector.application_name(),
            "metadata {} connected", self.statement.role
        );
        if set_up.pooled {
            self.switch_to_unnamed("its session settings did not stay on the session");
            return Ok(Open {
                client,
                prepared: None,
            });
        }
        Ok(Open {
            client,
            prepared: set_up.prepared,
        })
    }

    /// Sends unnamed statements with per-transaction settings from now on: the session goes
    /// through a transaction-mode pooler.
    fn switch_to_unnamed(&mut self, why: &str) {
        warn!(
            application_name = self.connector.application_name(),
            "the metadata {}'s connection goes through a transaction-mode pooler ({why}); \
             sending unnamed statements with per-transaction settings from now on (set \
             PgOptions::statement_mode to Unnamed to start that way)",
            self.statement.role
        );
        self.mode = StatementMode::Unnamed;
    }
}

/// What [`set_up`] leaves on a new session.
struct SetUp {
    prepared: Option<tokio_postgres::Statement>,
    /// The session settings did not stay on the session: a transaction-mode pooler.
    pooled: bool,
}

/// A setting of the crate's own that the prepared path sets with the others and reads back
/// in a later statement: through a transaction-mode pooler the later statement may run on
/// another server connection, where it is not set.
const SESSION_MARKER: &str = "metadata_batcher.session";

/// Right after connecting: the session settings and the prepared statement, or for unnamed
/// statements a dry run with no rows, so that a missing table or column shows at connect in
/// either mode.
async fn set_up(
    connector: &Connector,
    client: &Client,
    statement: &StatementSpec,
    mode: StatementMode,
) -> Result<SetUp, ConnectError> {
    if mode == StatementMode::Prepared {
        if let Some(settings) = connector.connect_settings(statement.with_settings) {
            client
                .batch_execute(&format!("{settings}; SET {SESSION_MARKER} = 'on'"))
                .await
                .map_err(|err| ConnectError::from_postgres("setting the session up", err))?;
        }
        let prepared = client
            .prepare_typed(&statement.sql, &statement.types)
            .await
            .map_err(|err| ConnectError::from_postgres("preparing the statement", err))?;
        let kept: Option<String> = client
            .query_typed_one(
                &format!("SELECT current_setting('{SESSION_MARKER}', true)"),
                &[],
            )
            .await
            .map_err(|err| ConnectError::from_postgres("checking the session", err))?
            .get(0);
        return Ok(SetUp {
            prepared: Some(prepared),
            pooled: kept.as_deref() != Some("on"),
        });
    }
    if let Some(no_rows) = &statement.dry_run {
        client
            .execute_typed(&statement.sql, &typed(no_rows, &statement.types))
            .await
            .map_err(|err| ConnectError::from_postgres("checking the statement", err))?;
    }
    Ok(SetUp {
        prepared: None,
        pooled: false,
    })
}

/// One call of the statement.
async fn run(
    client: &Client,
    statement: &StatementSpec,
    prepared: Option<&tokio_postgres::Statement>,
    settings: Option<&str>,
    params: &[Encoded],
) -> Result<u64, postgres::Error> {
    if let Some(prepared) = prepared {
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        return client.execute(prepared, &refs).await;
    }
    let typed = typed(params, &statement.types);
    let Some(settings) = settings else {
        return client.execute_typed(&statement.sql, &typed).await;
    };
    // Through a transaction-mode pooler a session setting would land on one server
    // connection of many: apply them to this transaction only. The three go out before the
    // first answer is read (each call sends on its first poll, in this order): one round
    // trip. When the settings or the statement fail, the server aborts the transaction and
    // answers the COMMIT with a rollback, so no ROLLBACK need follow.
    let begin = format!("BEGIN; {settings}");
    let (began, updated, committed) = futures_util::future::join3(
        client.batch_execute(&begin),
        client.execute_typed(&statement.sql, &typed),
        client.batch_execute("COMMIT"),
    )
    .await;
    began?;
    let updated = updated?;
    committed?;
    Ok(updated)
}

/// Whether `err` shows that the server had ended the session or the connection is gone: an
/// admin command (`pg_terminate_backend`, 57P01), a crash or restart (57P02, 57P03), an idle
/// session timeout (57P05), a closed or broken socket.
fn ended_by_server(err: &postgres::Error) -> bool {
    err.is_closed()
        || matches!(
            err.code().map(|code| code.code()),
            Some("57P01" | "57P02" | "57P03" | "57P05")
        )
        || StdError::source(err).is_some_and(|source| source.is::<std::io::Error>())
}
