//! [`connect_client`]: a plain `postgres::Client` opened the way the store's sessions are,
//! for migrations, registration and the caller's own queries.

use postgres::Client;

use super::connector::Connector;
use super::error::ConnectError;
use super::PgOptions;

/// A plain `postgres::Client` for a libpq connection string, with the same `sslmode`
/// handling (`verify-full`, `sslrootcert`, client certificates, `prefer`'s fallback) and
/// bounds as the store's sessions: for [`migrate`](super::migrate),
/// [`register`](super::register) and your own queries with the very URL the store uses.
/// The whole connection attempt is bounded by `options.connect_timeout`; statements on the
/// returned client are not (its `statement_timeout` is set, as on every session).
///
/// ```no_run
/// use metadata_batcher::postgres::{self, PgOptions};
///
/// let url = "postgres://app@db.internal/app?sslmode=verify-full&sslrootcert=/etc/ssl/db-ca.pem";
/// let mut client = postgres::connect_client(url, &PgOptions::default())?;
/// postgres::migrate(&mut client)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn connect_client(url: &str, options: &PgOptions) -> Result<Client, ConnectError> {
    let connector = Connector::from_url(url, options.clone(), "admin")?;
    let timeout = connector.attempt_timeout();
    let (opened_tx, opened) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("mdbatch-connect".to_owned())
        .spawn(move || {
            let settings = options_settings(&connector);
            let result = connector.open(Some(&settings));
            // A caller that gave up has dropped the receiver; the client is dropped here.
            let _ = opened_tx.send(result);
        })
        .map_err(|err| {
            ConnectError::new(
                super::ConnectErrorKind::Unavailable,
                format!("cannot start a thread to connect: {err}"),
            )
        })?;
    opened.recv_timeout(timeout).unwrap_or_else(|_| {
        Err(ConnectError::new(
            super::ConnectErrorKind::Unavailable,
            format!(
                "no session within connect_timeout ({timeout:?}, per host): the server did \
                 not complete the TCP connect, TLS handshake and authentication in time"
            ),
        ))
    })
}

/// The session settings of a plain client: the timeouts, whatever the statement mode.
fn options_settings(connector: &Connector) -> String {
    connector.options.session_settings("SESSION", false)
}
