//! One statement on one session, reopened when it breaks: the part
//! [`PgStore`](super::PgStore) and [`PgPublisher`](super::PgPublisher) share.
//!
//! The session lives on a [`BoundedClient`], so every call has a deadline. The statement is
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

use std::error::Error as StdError;
use std::sync::Arc;

use postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use postgres::Client;
use tracing::{debug, warn};

use super::bounded::{Abort, BoundedClient, NoAnswer, SessionThreads};
use super::connector::Connector;
use super::error::{classify, describe, Class, ConnectError};
use super::StatementMode;

/// A parameter already encoded in PostgreSQL's binary format on the caller's thread, so the
/// session's thread can own it without copying the batch.
#[derive(Debug)]
pub(crate) struct Encoded(Vec<u8>);

impl Encoded {
    /// Encodes `value` as `ty`; fails when the value cannot be represented (the server
    /// would refuse it too, so callers treat it as refused data).
    pub(crate) fn new(
        value: &(dyn ToSql + Sync),
        ty: &Type,
    ) -> Result<Encoded, Box<dyn StdError + Sync + Send>> {
        let mut buf = bytes::BytesMut::new();
        match value.to_sql_checked(ty, &mut buf)? {
            IsNull::No => Ok(Encoded(buf.to_vec())),
            IsNull::Yes => Err("a NULL parameter".into()),
        }
    }
}

impl ToSql for Encoded {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }

    fn accepts(_ty: &Type) -> bool {
        // Encoded for the statement's own parameter types by `Encoded::new`.
        true
    }

    to_sql_checked!();
}

/// The statement a session runs, with its parameter types.
pub(crate) struct SessionStatement {
    pub(crate) sql: String,
    pub(crate) types: Vec<Type>,
    /// Whether the session settings apply to it (the store's update; not a NOTIFY).
    pub(crate) with_settings: bool,
    /// Parameters with no rows: run once at connect in unnamed mode, where nothing is
    /// prepared, so that a missing table or column still shows at start-up.
    pub(crate) dry_run: Option<Vec<Encoded>>,
    /// "store" or "publisher", for log lines and messages.
    pub(crate) role: &'static str,
    /// The session thread's name, within Linux's 15 bytes.
    pub(crate) thread_name: &'static str,
}

/// Why [`PreparedSession::execute`] failed.
pub(crate) enum Failure {
    /// No session could be opened.
    Open(ConnectError),
    /// The statement failed on an open session.
    Statement(postgres::Error),
    /// The statement gave no answer; the session was dropped.
    NoAnswer(NoAnswer),
}

struct Open {
    client: BoundedClient,
    prepared: Option<postgres::Statement>,
}

pub(crate) struct PreparedSession {
    connector: Arc<Connector>,
    statement: Arc<SessionStatement>,
    mode: StatementMode,
    session: Option<Open>,
    threads: SessionThreads,
}

impl PreparedSession {
    /// Opens the first session at once, so a wrong URL, a refused login or a missing table
    /// shows at start-up.
    pub(crate) fn connect(
        connector: Connector,
        statement: SessionStatement,
    ) -> Result<PreparedSession, ConnectError> {
        let mode = connector.options.statement_mode;
        let mut session = PreparedSession {
            connector: Arc::new(connector),
            statement: Arc::new(statement),
            mode,
            session: None,
            threads: SessionThreads::default(),
        };
        // Logged here, at start-up, for services that only log: later reconnects fail into
        // a flush, which the batcher logs once.
        if let Err(err) = session.session() {
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

    /// Another session for the same statement, not opened until its first call, which
    /// starts in the mode this one has come to (unnamed, once a pooler showed).
    pub(crate) fn sibling(&self) -> PreparedSession {
        PreparedSession {
            connector: self.connector.clone(),
            statement: self.statement.clone(),
            mode: self.mode,
            session: None,
            threads: SessionThreads::default(),
        }
    }

    /// Runs the statement, replacing a session the server ended while it sat idle.
    pub(crate) fn execute(&mut self, params: &Arc<Vec<Encoded>>) -> Result<u64, Failure> {
        let reused = self.session.is_some();
        match self.execute_once(params) {
            Err(Failure::Statement(err)) if reused && ended_by_server(&err) => {
                debug!(
                    application_name = self.connector.application_name(),
                    error = %describe(&err),
                    "metadata {} session was ended by the server; reconnecting once",
                    self.statement.role
                );
                self.execute_once(params)
            }
            Err(Failure::Statement(err))
                if self.mode == StatementMode::Prepared
                    && err.code().map(|code| code.code()) == Some("26000") =>
            {
                self.switch_to_unnamed("its prepared statement is gone: SQLSTATE 26000");
                self.session = None;
                self.execute_once(params)
            }
            result => result,
        }
    }

    /// Stops the statement running now, if any: see [`Abort`].
    pub(crate) fn abort_handle(&self) -> Option<Abort> {
        Some(self.session.as_ref()?.client.abort())
    }

    pub(crate) fn connector(&self) -> &Connector {
        &self.connector
    }

    fn execute_once(&mut self, params: &Arc<Vec<Encoded>>) -> Result<u64, Failure> {
        let statement = self.statement.clone();
        let settings = (self.mode == StatementMode::Unnamed && statement.with_settings)
            .then(|| self.connector.options.session_settings("LOCAL", true));
        let deadline = self.connector.options.statement_deadline();
        let params = params.clone();
        let session = self.session().map_err(Failure::Open)?;
        let prepared = session.prepared.clone();
        let answer = session.client.call(deadline, move |client| {
            run(
                client,
                &statement,
                prepared.as_ref(),
                settings.as_deref(),
                &params,
            )
        });
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
    fn session(&mut self) -> Result<&mut Open, ConnectError> {
        if self.session.is_none() {
            let opened = self.open()?;
            self.session = Some(opened);
        }
        Ok(self.session.as_mut().expect("just opened"))
    }

    fn open(&mut self) -> Result<Open, ConnectError> {
        let statement = self.statement.clone();
        let mode = self.mode;
        let (client, set_up) = BoundedClient::open(
            self.connector.clone(),
            &mut self.threads,
            statement.thread_name,
            move |connector, client| set_up(connector, client, &statement, mode),
        )?;
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
    prepared: Option<postgres::Statement>,
    /// The session settings did not stay on the session: a transaction-mode pooler.
    pooled: bool,
}

/// A setting of the crate's own that the prepared path sets with the others and reads back
/// in a later statement: through a transaction-mode pooler the later statement may run on
/// another server connection, where it is not set.
const SESSION_MARKER: &str = "metadata_batcher.session";

/// On the session's thread, right after connecting: the session settings and the prepared
/// statement, or for unnamed statements a dry run with no rows, so that a missing table or
/// column shows at connect in either mode.
fn set_up(
    connector: &Connector,
    client: &mut Client,
    statement: &SessionStatement,
    mode: StatementMode,
) -> Result<SetUp, ConnectError> {
    if mode == StatementMode::Prepared {
        if let Some(settings) = connector.connect_settings(statement.with_settings) {
            client
                .batch_execute(&format!("{settings}; SET {SESSION_MARKER} = 'on'"))
                .map_err(|err| ConnectError::from_postgres("setting the session up", err))?;
        }
        let prepared = client
            .prepare_typed(&statement.sql, &statement.types)
            .map_err(|err| ConnectError::from_postgres("preparing the statement", err))?;
        let kept: Option<String> = client
            .query_typed_one(
                &format!("SELECT current_setting('{SESSION_MARKER}', true)"),
                &[],
            )
            .map_err(|err| ConnectError::from_postgres("checking the session", err))?
            .get(0);
        return Ok(SetUp {
            prepared: Some(prepared),
            pooled: kept.as_deref() != Some("on"),
        });
    }
    if let Some(no_rows) = &statement.dry_run {
        let typed: Vec<(&(dyn ToSql + Sync), Type)> = no_rows
            .iter()
            .zip(&statement.types)
            .map(|(param, ty)| (param as &(dyn ToSql + Sync), ty.clone()))
            .collect();
        client
            .execute_typed(&statement.sql, &typed)
            .map_err(|err| ConnectError::from_postgres("checking the statement", err))?;
    }
    Ok(SetUp {
        prepared: None,
        pooled: false,
    })
}

/// On the session's thread: one call of the statement.
fn run(
    client: &mut Client,
    statement: &SessionStatement,
    prepared: Option<&postgres::Statement>,
    settings: Option<&str>,
    params: &[Encoded],
) -> Result<u64, postgres::Error> {
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
    if let Some(prepared) = prepared {
        return client.execute(prepared, &refs);
    }
    let typed: Vec<(&(dyn ToSql + Sync), Type)> = refs
        .into_iter()
        .zip(&statement.types)
        .map(|(param, ty)| (param, ty.clone()))
        .collect();
    let Some(settings) = settings else {
        return client.execute_typed(&statement.sql, &typed);
    };
    // Through a transaction-mode pooler a session setting would land on one server
    // connection of many: apply them to this transaction only.
    client.batch_execute(&format!("BEGIN; {settings}"))?;
    match client.execute_typed(&statement.sql, &typed) {
        Ok(updated) => {
            client.batch_execute("COMMIT")?;
            Ok(updated)
        }
        Err(err) => {
            let _ = client.batch_execute("ROLLBACK");
            Err(err)
        }
    }
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
