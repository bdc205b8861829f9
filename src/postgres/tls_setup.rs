//! Which TLS each connection attempt uses, and how a cancel request goes out over the same:
//! libpq's `sslmode` with its fallbacks (`prefer` tries TLS, then plaintext; `allow` the
//! other way round), or the caller's own `MakeTlsConnect`, used as given.

use std::future::Future;
use std::pin::Pin;

use postgres::config::SslMode as ClientSslMode;
use postgres::tls::{MakeTlsConnect, TlsConnect};
use postgres::{Client, Config, NoTls, Socket};
use tokio_postgres::CancelToken;

use super::conninfo::SslMode;
use super::error::ConnectError;

/// A TLS connector of your own for the `*_config` constructors: anything
/// `postgres::Config::connect` takes (`postgres::NoTls`, `postgres-openssl`'s or
/// `tokio-postgres-rustls`' connectors, ...) that can be cloned for each reconnect and cancel
/// request. Implemented for every such type; there is nothing to implement.
pub trait TlsConnector:
    MakeTlsConnect<Socket, Stream: Send, TlsConnect: Send + TlsConnect<Socket, Future: Send>>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T> TlsConnector for T where
    T: MakeTlsConnect<Socket, Stream: Send, TlsConnect: Send + TlsConnect<Socket, Future: Send>>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// A connection's half that does the I/O: driven by whoever waits on the session (see
/// [`deadline`](super::deadline)), dropped to close the socket.
pub(crate) type Connection = Pin<Box<dyn Future<Output = Result<(), postgres::Error>> + Send>>;

/// An async connection attempt's result: the client and its [`Connection`].
type Connecting<'a> = Pin<
    Box<
        dyn Future<Output = Result<(tokio_postgres::Client, Connection), ConnectError>> + Send + 'a,
    >,
>;

/// A cancel request on its way.
type Canceling<'a> = Pin<Box<dyn Future<Output = Result<(), postgres::Error>> + Send + 'a>>;

/// Opens connections and sends cancel requests with one TLS setup: blocking clients for
/// the subscriber and the admin client, `tokio-postgres` ones for the sessions the store and
/// the publisher drive themselves.
pub(super) trait Connect: Send + Sync {
    fn connect(&self, config: &Config) -> Result<Client, ConnectError>;
    fn connect_async<'a>(&'a self, config: &'a tokio_postgres::Config) -> Connecting<'a>;
    fn cancel<'a>(&'a self, token: &'a CancelToken) -> Canceling<'a>;
}

/// A failed connection attempt, as a [`ConnectError`].
fn connecting(err: postgres::Error) -> ConnectError {
    ConnectError::from_postgres("connecting", err)
}

/// Connects `config` over `tls`, the connection half boxed.
async fn connect_with<T: TlsConnector>(
    config: &tokio_postgres::Config,
    tls: T,
) -> Result<(tokio_postgres::Client, Connection), postgres::Error> {
    let (client, connection) = config.connect(tls).await?;
    Ok((client, Box::pin(connection)))
}

/// A caller's own `MakeTlsConnect`, used as the caller configured it.
pub(super) struct Custom<T>(pub(super) T);

impl<T: TlsConnector> Connect for Custom<T> {
    fn connect(&self, config: &Config) -> Result<Client, ConnectError> {
        config.connect(self.0.clone()).map_err(connecting)
    }

    fn connect_async<'a>(&'a self, config: &'a tokio_postgres::Config) -> Connecting<'a> {
        Box::pin(async move {
            connect_with(config, self.0.clone())
                .await
                .map_err(connecting)
        })
    }

    fn cancel<'a>(&'a self, token: &'a CancelToken) -> Canceling<'a> {
        Box::pin(token.cancel_query(self.0.clone()))
    }
}

/// libpq's `sslmode`, with its fallbacks.
pub(super) struct Libpq {
    pub(super) mode: SslMode,
    #[cfg(feature = "tls")]
    pub(super) tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

/// One connection attempt: what it is called in an error, and the client's TLS mode.
type Attempt = (&'static str, ClientSslMode);

impl Libpq {
    /// The attempts libpq makes: a second one, the other way, when the first fails (a
    /// server that takes only TLS, for `allow`; a TLS setup that does not work out, for
    /// `prefer`).
    fn attempts(&self) -> (Attempt, Option<Attempt>) {
        match self.mode {
            SslMode::Disable => (("plaintext", ClientSslMode::Disable), None),
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                (("TLS", ClientSslMode::Require), None)
            }
            SslMode::Allow => (
                ("plaintext", ClientSslMode::Disable),
                Some(("TLS", ClientSslMode::Require)),
            ),
            SslMode::Prefer => (
                ("TLS", ClientSslMode::Prefer),
                Some(("plaintext", ClientSslMode::Disable)),
            ),
        }
    }

    fn attempt(&self, config: &Config, mode: ClientSslMode) -> Result<Client, postgres::Error> {
        let mut config = config.clone();
        config.ssl_mode(mode);
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            return config.connect(tls.clone());
        }
        config.connect(NoTls)
    }

    async fn attempt_async(
        &self,
        config: &tokio_postgres::Config,
        mode: ClientSslMode,
    ) -> Result<(tokio_postgres::Client, Connection), postgres::Error> {
        let mut config = config.clone();
        config.ssl_mode(mode);
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            return connect_with(&config, tls.clone()).await;
        }
        connect_with(&config, NoTls).await
    }
}

/// Both attempts failed: one error naming both.
fn both_failed(
    first: (&'static str, postgres::Error),
    second: (&'static str, postgres::Error),
) -> ConnectError {
    ConnectError::from_attempts("connecting", first, second)
}

impl Connect for Libpq {
    fn connect(&self, config: &Config) -> Result<Client, ConnectError> {
        let (first, second) = self.attempts();
        let first_err = match self.attempt(config, first.1) {
            Ok(client) => return Ok(client),
            Err(err) => err,
        };
        let Some(second) = second else {
            return Err(connecting(first_err));
        };
        self.attempt(config, second.1)
            .map_err(|second_err| both_failed((first.0, first_err), (second.0, second_err)))
    }

    fn connect_async<'a>(&'a self, config: &'a tokio_postgres::Config) -> Connecting<'a> {
        Box::pin(async move {
            let (first, second) = self.attempts();
            let first_err = match self.attempt_async(config, first.1).await {
                Ok(connected) => return Ok(connected),
                Err(err) => err,
            };
            let Some(second) = second else {
                return Err(connecting(first_err));
            };
            self.attempt_async(config, second.1)
                .await
                .map_err(|second_err| both_failed((first.0, first_err), (second.0, second_err)))
        })
    }

    fn cancel<'a>(&'a self, token: &'a CancelToken) -> Canceling<'a> {
        // The token carries the mode of the attempt that connected.
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            return Box::pin(token.cancel_query(tls.clone()));
        }
        Box::pin(token.cancel_query(NoTls))
    }
}
