//! How a PostgreSQL error is classified and described, shared by the store and the publisher.
//!
//! The classification decides what the batcher does with a batch, so it errs towards
//! [`StoreError::Unavailable`]: calling an outage "rejected" would make the batcher throw good
//! rows away, while calling bad data "unavailable" only costs retries.

use postgres::error::SqlState;

use crate::StoreError;

/// What a failed statement means for the rows it carried and for the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// The server refused the data (SQLSTATE classes 22 and 23); the session is fine.
    Rejected,
    /// The statement was canceled (57014); the session is fine.
    Canceled,
    /// Anything else. The connection is dropped and the next call opens a fresh one: a new
    /// session is the one state known to be good, whether the old one died (57P01, IO) or
    /// only holds something stale (a prepared statement after the table changed).
    Unavailable,
}

pub(crate) fn classify(err: &postgres::Error) -> Class {
    match err.code() {
        Some(code) if *code == SqlState::QUERY_CANCELED => Class::Canceled,
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
    // IO and connect errors keep their cause (e.g. "Connection refused") in the source.
    match std::error::Error::source(err) {
        Some(source) => format!("{err}: {source}"),
        None => err.to_string(),
    }
}

pub(crate) fn store_error(class: Class, message: String) -> StoreError {
    match class {
        Class::Rejected => StoreError::Rejected(message),
        Class::Canceled => StoreError::Canceled,
        Class::Unavailable => StoreError::Unavailable(message),
    }
}
