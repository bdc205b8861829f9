//! A subscriber's connection: opened and `LISTEN`ing on a thread of its own, so that the
//! caller's deadline bounds the wait, and dropped on a thread of its own when it may be
//! silent, so that nothing waits on it.

use std::sync::Arc;
use std::thread;

use crossbeam_channel::{bounded, Receiver};
use postgres::Client;
use tracing::warn;

use super::connector::Connector;
use super::error::{ConnectError, ConnectErrorKind};

/// PostgreSQL truncates identifiers to 63 bytes: a longer channel would `LISTEN` on a
/// different name than the one `pg_notify` (which refuses it) is called with.
const MAX_CHANNEL_BYTES: usize = 63;

/// Drops a client whose connection may be silent on a thread of its own: the drop waits for
/// replies still pending, which a silent session never sends.
pub(super) fn abandon(client: Client) {
    let doomed = Doomed(Some(client));
    let spawned = thread::Builder::new()
        .name("mdbatch-pgdrop".to_owned())
        .spawn(move || {
            let mut doomed = doomed;
            drop(doomed.0.take());
        });
    if let Err(err) = spawned {
        warn!(
            error = %err,
            "cannot start a thread to drop a lost subscriber session; leaking its connection \
             rather than waiting on it"
        );
    }
}

/// A client on its way to [`abandon`]'s thread. Dropped anywhere else (the thread could not
/// be started), it leaks the client rather than wait on a connection that may never answer.
struct Doomed(Option<Client>);

impl Drop for Doomed {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            std::mem::forget(client);
        }
    }
}

pub(super) fn check_channel(channel: &str) -> Result<(), ConnectError> {
    if channel.is_empty() || channel.len() > MAX_CHANNEL_BYTES || channel.contains('\0') {
        return Err(ConnectError::config(format!(
            "invalid channel {channel:?}: a channel is 1 to {MAX_CHANNEL_BYTES} bytes without NUL"
        )));
    }
    Ok(())
}

pub(super) fn connect_timed_out(connector: &Connector) -> ConnectError {
    ConnectError::new(
        ConnectErrorKind::Unavailable,
        format!(
            "no session within {:?} (connect_timeout for each host): the server did \
             not complete the TCP connect, TLS handshake, authentication and LISTEN in time",
            connector.attempt_timeout()
        ),
    )
}

/// Connects and `LISTEN`s on a thread of its own; the answer arrives on the receiver.
/// Nothing waits for the thread: a caller whose deadline passes drops the receiver, and the
/// thread ends (dropping its client) whenever its attempt ends.
pub(super) fn spawn_open(
    connector: &Arc<Connector>,
    channel: &str,
) -> Receiver<Result<Client, ConnectError>> {
    let (tx, rx) = bounded(1);
    let connector = connector.clone();
    let channel = channel.to_owned();
    let spawned = thread::Builder::new()
        .name("mdbatch-pgsub".to_owned())
        .spawn(move || {
            let _ = tx.send(open(&connector, &channel));
        });
    if let Err(err) = spawned {
        let (tx, rx) = bounded(1);
        let _ = tx.send(Err(ConnectError::new(
            ConnectErrorKind::Unavailable,
            format!("cannot start a thread to connect the subscriber: {err}"),
        )));
        return rx;
    }
    rx
}

/// How many separate statements check that the `LISTEN` stuck to the session: through a
/// transaction-mode pooler each may run on another server connection.
const LISTEN_CHECKS: usize = 3;

/// Connects, `LISTEN`s, and checks that the connection keeps its session.
fn open(connector: &Connector, channel: &str) -> Result<Client, ConnectError> {
    let mut client = connector.open(connector.connect_settings(false).as_deref())?;
    client
        .batch_execute(&format!("LISTEN {}", quote_identifier(channel)))
        .map_err(|err| ConnectError::from_postgres(&format!("LISTEN on {channel:?}"), err))?;
    for _ in 0..LISTEN_CHECKS {
        let listening: bool = client
            .query_typed_one(
                "SELECT $1 = ANY(ARRAY(SELECT pg_listening_channels()))",
                &[(&channel, postgres::types::Type::TEXT)],
            )
            .map_err(|err| ConnectError::from_postgres("checking the LISTEN", err))?
            .get(0);
        if !listening {
            return Err(ConnectError::new(
                ConnectErrorKind::Schema,
                format!(
                    "LISTEN on {channel:?} did not stay on the session: the connection goes \
                     through a transaction-mode pooler (such as PgBouncer with \
                     pool_mode=transaction). LISTEN needs a session of its own: connect the \
                     subscriber to the server directly or through a session-mode pool"
                ),
            ));
        }
    }
    Ok(client)
}

/// `"name"`, with inner quotes doubled, so any channel name is one identifier.
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::quote_identifier;

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_identifier("plain"), "\"plain\"");
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }
}
