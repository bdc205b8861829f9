//! One connection running one prepared statement, reopened when it breaks: the part
//! [`PgStore`](super::PgStore) and [`PgPublisher`](super::PgPublisher) share.
//!
//! No sleeps, and one retry only. The client learns that the server ended a session
//! (`pg_terminate_backend`, a restart, an idle-session timeout) only when it next uses it,
//! so when the first statement on a session that sat idle fails that way, a new session is
//! opened and the statement runs once more. Both statements tolerate that: the update is
//! idempotent under its `collected_at` guard, and a repeated NOTIFY only makes watchers
//! re-read. It costs nothing on a live session, unlike probing the socket before every
//! statement. After any other failure that leaves the session unusable it is dropped, and
//! the next call opens a new one; pacing those calls is the batcher's job.

use postgres::types::ToSql;
use postgres::{CancelToken, Client, Statement};
use tracing::{debug, warn};

use super::connect::Connector;
use super::error::{classify, describe, Class};
use super::PgOptions;

/// Why [`PreparedSession::execute`] failed.
pub(crate) enum Failure {
    /// No session could be opened; the message says why, in the server's words.
    Open(String),
    /// The statement failed on an open session.
    Statement(postgres::Error),
}

struct Open {
    client: Client,
    statement: Statement,
}

pub(crate) struct PreparedSession {
    connector: Connector,
    sql: &'static str,
    /// "store" or "publisher", for log lines and messages.
    role: &'static str,
    session: Option<Open>,
}

impl PreparedSession {
    /// Opens the first session at once, so a wrong URL or a missing table shows at start-up.
    pub(crate) fn connect(
        url: &str,
        options: &PgOptions,
        role: &'static str,
        sql: &'static str,
    ) -> Result<PreparedSession, String> {
        let mut prepared = PreparedSession {
            connector: Connector::new(url, options, role)?,
            sql,
            role,
            session: None,
        };
        match prepared.session() {
            Ok(_) => Ok(prepared),
            Err(Failure::Open(message)) => Err(message),
            Err(Failure::Statement(err)) => Err(describe(&err)),
        }
    }

    /// Runs the statement, replacing a session the server ended while it sat idle.
    pub(crate) fn execute(&mut self, params: &[&(dyn ToSql + Sync)]) -> Result<u64, Failure> {
        let reused = self.session.is_some();
        match self.execute_once(params)? {
            Err(err) if reused && ended_by_server(&err) => {
                debug!(
                    application_name = self.connector.application_name(),
                    error = %describe(&err),
                    "metadata {} session was ended by the server; reconnecting once",
                    self.role
                );
                self.execute_once(params)?.map_err(Failure::Statement)
            }
            result => result.map_err(Failure::Statement),
        }
    }

    /// A token that cancels the statement running on the current session, if any.
    pub(crate) fn cancel_token(&self) -> Option<CancelToken> {
        Some(self.session.as_ref()?.client.cancel_token())
    }

    /// The `application_name` sessions use, for log lines.
    pub(crate) fn application_name(&self) -> &str {
        self.connector.application_name()
    }

    fn execute_once(
        &mut self,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Result<u64, postgres::Error>, Failure> {
        let session = self.session()?;
        let result = session.client.execute(&session.statement, params);
        if let Err(err) = &result {
            if classify(err) == Class::Unavailable || session.client.is_closed() {
                self.session = None;
            }
        }
        Ok(result)
    }

    /// The open session, opening one first if there is none or the client saw it close.
    fn session(&mut self) -> Result<&mut Open, Failure> {
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

    fn open(&self) -> Result<Open, Failure> {
        let open = || -> Result<Open, postgres::Error> {
            let mut client = self.connector.open()?;
            let statement = client.prepare(self.sql)?;
            Ok(Open { client, statement })
        };
        let session = open().map_err(|err| {
            let message = format!(
                "opening a PostgreSQL session for the metadata {} (connect, set \
                 statement_timeout, prepare its statement): {}",
                self.role,
                describe(&err)
            );
            warn!(
                application_name = self.connector.application_name(),
                error = %message,
                "metadata {} cannot connect",
                self.role
            );
            Failure::Open(message)
        })?;
        debug!(
            application_name = self.connector.application_name(),
            "metadata {} connected", self.role
        );
        Ok(session)
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
        || std::error::Error::source(err).is_some_and(|source| source.is::<std::io::Error>())
}
