//! How a PostgreSQL error is classified and described, and [`ConnectError`].
//!
//! The classification decides what the batcher does with a batch, so it errs towards
//! [`StoreErrorKind::Unavailable`](crate::StoreErrorKind::Unavailable): calling an outage "rejected" would make the batcher throw good
//! rows away, while calling bad data "unavailable" only costs retries.

use std::error::Error as StdError;
use std::fmt;

use postgres::error::SqlState;

use crate::StoreError;

/// What a failed statement means for the rows it carried and for the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// The server refused the data (SQLSTATE classes 22 and 23); the session is fine.
    Rejected,
    /// The statement was canceled (57014: a statement timeout or a cancel request) or gave
    /// up waiting for a lock (55P03); the session is fine, and a smaller batch may succeed.
    Canceled,
    /// The server aborted the statement to resolve a conflict with another transaction: a
    /// deadlock (40P01) or a serialization failure (40001). The session is fine, and the
    /// same statement run again is the cure.
    Conflict,
    /// Anything else. The connection is dropped and the next call opens a fresh one: a new
    /// session is the one state known to be good, whether the old one died (57P01, IO) or
    /// only holds something stale (a prepared statement after the table changed).
    Unavailable,
}

pub(crate) fn classify(err: &postgres::Error) -> Class {
    match err.code() {
        Some(code)
            if *code == SqlState::QUERY_CANCELED || *code == SqlState::LOCK_NOT_AVAILABLE =>
        {
            Class::Canceled
        }
        Some(code)
            if *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::T_R_SERIALIZATION_FAILURE =>
        {
            Class::Conflict
        }
        Some(code) if code.code().starts_with("22") || code.code().starts_with("23") => {
            Class::Rejected
        }
        _ => Class::Unavailable,
    }
}

/// The error with the server's own words. `Display` of a `postgres::Error` says only
/// "db error" for every server error, which tells an operator nothing.
pub(crate) fn describe(err: &postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        let mut message = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            message.push_str("; detail: ");
            message.push_str(detail);
        }
        if let Some(hint) = db.hint() {
            message.push_str("; hint: ");
            message.push_str(hint);
        }
        return message;
    }
    // IO, TLS and connect errors keep their cause (e.g. "Connection refused", a certificate
    // problem) in the source chain.
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// The store error for a failed statement: its kind from `class`, the server's words, the
/// SQLSTATE and the error itself as the source.
pub(crate) fn store_error(class: Class, err: postgres::Error) -> StoreError {
    let error = match class {
        Class::Rejected => StoreError::rejected(describe(&err)),
        Class::Canceled => StoreError::canceled(),
        // Only once the store's own retries ran out (see `postgres::store`).
        Class::Conflict => StoreError::conflicts_exhausted(),
        Class::Unavailable => StoreError::unavailable(describe(&err)),
    };
    match err.code() {
        Some(code) => error.with_sqlstate(code.code()),
        None => error,
    }
    .with_source(err)
}

/// Why a store, publisher or subscriber could not connect.
///
/// [`kind`](Self::kind) tells a configuration problem, which no retry fixes (a bad URL, an
/// unknown `sslmode`, an unreadable certificate, a failed certificate or host-name check,
/// failed authentication, a missing table), from an outage, which a retry may fix. The
/// message says what was wrong in the server's or the TLS library's words, and never
/// contains the password.
///
/// ```no_run
/// use metadata_batcher::postgres::{ConnectErrorKind, PgOptions, PgStore};
///
/// match PgStore::open("postgres://app@db.internal/app?sslmode=verify-full", PgOptions::default()) {
///     Ok(store) => { /* hand it to a Batcher */ }
///     Err(err) if err.kind().is_config_problem() => panic!("fix the configuration: {err}"),
///     Err(err) => eprintln!("database not reachable yet, retrying: {err}"),
/// }
/// ```
#[derive(Debug)]
pub struct ConnectError {
    kind: ConnectErrorKind,
    message: String,
    source: Option<Box<dyn StdError + Send + Sync>>,
}

/// What kind of problem a [`ConnectError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectErrorKind {
    /// The connection string or options are wrong: bad URL, unknown `sslmode`, an
    /// unreadable certificate or key, a mode this build cannot do, a database that does
    /// not exist.
    Config,
    /// TLS failed: the server's certificate is not trusted, does not name the host, or the
    /// server refused TLS where it is required.
    Tls,
    /// The server refused the login (wrong password, no `pg_hba.conf` entry, a client
    /// certificate it does not accept).
    Authentication,
    /// The table or its columns are not what the statement needs (run
    /// [`migrate`](super::migrate), or set [`PgOptions::table`](super::PgOptions::table)), or
    /// the connection cannot do what it is for (`LISTEN` through a transaction pooler).
    Schema,
    /// The server could not be reached or did not answer in time; a retry may succeed.
    Unavailable,
}

impl ConnectErrorKind {
    /// Whether this is a configuration problem that retrying will not fix.
    pub fn is_config_problem(self) -> bool {
        !matches!(self, ConnectErrorKind::Unavailable)
    }
}

impl ConnectError {
    /// What kind of problem it is.
    pub fn kind(&self) -> ConnectErrorKind {
        self.kind
    }

    /// What went wrong, without the context that `Display` adds.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn new(kind: ConnectErrorKind, message: String) -> Self {
        ConnectError {
            kind,
            message,
            source: None,
        }
    }

    pub(crate) fn config(message: String) -> Self {
        Self::new(ConnectErrorKind::Config, message)
    }

    pub(crate) fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Classifies a failed connect (or its first statements) by what the server or the TLS
    /// library said; `context` says what was being done.
    pub(crate) fn from_postgres(context: &str, err: postgres::Error) -> Self {
        let kind = connect_kind(&err);
        let advice = kind.advice();
        ConnectError::new(kind, format!("{context}: {}{advice}", describe(&err))).with_source(err)
    }

    /// Both of libpq's attempts failed (`sslmode=prefer`: TLS, then plaintext; `allow`: the
    /// other way round). The message gives each attempt's error, as libpq does, so that a
    /// broken TLS set-up cannot hide what the server said to the plaintext attempt. The kind
    /// (and the source) is that of the attempt the server answered, a refused login or a
    /// missing database saying more than a failed handshake; else the first attempt's.
    pub(crate) fn from_attempts(
        context: &str,
        (first_name, first): (&str, postgres::Error),
        (second_name, second): (&str, postgres::Error),
    ) -> Self {
        let message = format!(
            "{context}: the {first_name} attempt failed: {}; the {second_name} attempt failed \
             too: {}",
            describe(&first),
            describe(&second)
        );
        let decisive = if second.code().is_some() {
            second
        } else {
            first
        };
        let kind = connect_kind(&decisive);
        ConnectError::new(kind, format!("{message}{}", kind.advice())).with_source(decisive)
    }
}

impl ConnectErrorKind {
    /// What to check, appended to a connect error's message.
    fn advice(self) -> &'static str {
        match self {
            ConnectErrorKind::Tls => {
                "; check sslmode, sslrootcert and the host name the certificate names, and that \
                 the address is PostgreSQL's own rather than a proxy that does not speak TLS"
            }
            ConnectErrorKind::Authentication => "; check the user, password and pg_hba.conf",
            ConnectErrorKind::Schema => {
                "; run metadata_batcher::postgres::migrate, or set PgOptions::table to the \
                 table's name"
            }
            ConnectErrorKind::Config => "",
            ConnectErrorKind::Unavailable => "; check that the server is up and reachable",
        }
    }
}

fn connect_kind(err: &postgres::Error) -> ConnectErrorKind {
    if let Some(code) = err.code() {
        return match code.code() {
            "28P01" | "28000" => ConnectErrorKind::Authentication,
            "42P01" | "42703" | "42883" | "42804" => ConnectErrorKind::Schema,
            "3D000" | "42704" | "22023" => ConnectErrorKind::Config,
            _ => ConnectErrorKind::Unavailable,
        };
    }
    let mut source = err.source();
    while let Some(cause) = source {
        #[cfg(feature = "tls")]
        if cause.is::<rustls::Error>() {
            return ConnectErrorKind::Tls;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            #[cfg(feature = "tls")]
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
            {
                return ConnectErrorKind::Tls;
            }
            let _ = io;
        }
        source = cause.source();
    }
    let text = err.to_string();
    if text.contains("TLS") || text.contains("SSL") {
        ConnectErrorKind::Tls
    } else if text.contains("password missing") || text.contains("authentication") {
        ConnectErrorKind::Authentication
    } else if text.contains("invalid") || text.contains("unknown option") {
        ConnectErrorKind::Config
    } else {
        ConnectErrorKind::Unavailable
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            ConnectErrorKind::Config => "invalid PostgreSQL configuration",
            ConnectErrorKind::Tls => "PostgreSQL TLS failed",
            ConnectErrorKind::Authentication => "PostgreSQL refused the login",
            ConnectErrorKind::Schema => "PostgreSQL schema problem",
            ConnectErrorKind::Unavailable => "PostgreSQL unavailable",
        };
        write!(f, "{what}: {}", self.message)
    }
}

impl StdError for ConnectError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn StdError + 'static))
    }
}
