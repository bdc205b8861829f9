//! How every connection of this module is opened: the connection string or your own
//! `postgres::Config` and TLS connector, the options applied, the session settings, and the
//! cancel request that goes with a session.
//!
//! Two ways in, one way out:
//!
//! - **A libpq connection string** ([`Connector::from_url`]): `sslmode`, `sslrootcert`,
//!   `sslcert` and `sslkey` are read by [`conninfo`](super::conninfo) and served by
//!   [`tls`](super::tls), with libpq's fallbacks ([`tls_setup`](super::tls_setup)):
//!   `prefer` tries TLS and falls back to plaintext when the TLS attempt fails, `allow`
//!   tries plaintext and falls back to TLS.
//! - **Bring your own** ([`Connector::from_config`]): a `postgres::Config` plus any
//!   `MakeTlsConnect`, used as given (its `ssl_mode` included), as `r2d2_postgres` does.
//!
//! Either way the result is a [`Connector`] that opens `Client`s with the options' timeouts,
//! keepalives and `application_name`, and sends cancel requests over the same TLS setup.

use std::fmt;
use std::sync::Arc;

use postgres::config::LoadBalanceHosts;
use postgres::{Client, Config};
use tokio_postgres::CancelToken;

use super::conninfo;
#[cfg(not(feature = "tls"))]
use super::conninfo::SslMode;
use super::error::ConnectError;
pub(crate) use super::tls_setup::TlsConnector;
use super::tls_setup::{Connect, Connection, Custom, Libpq};
use super::{PgOptions, StatementMode};

/// A connection recipe: the config with the options applied, and the TLS setup.
pub(crate) struct Connector {
    config: Config,
    /// The same, for the sessions driven with `tokio-postgres`.
    async_config: tokio_postgres::Config,
    /// One recipe per host when the connection string lists several (and does not ask for
    /// `load_balance_hosts=random`), tried in order with `connect_timeout` each, as libpq
    /// does. `tokio-postgres` bounds only each host's TCP connect, so a host that accepts
    /// and never answers (a frozen primary) would hold the whole attempt and the next host
    /// would never be tried. Empty: one host, or random order, left to the client.
    hosts: Vec<(Config, tokio_postgres::Config)>,
    connect: Arc<dyn Connect>,
    pub(crate) options: PgOptions,
    /// libpq's name for the TLS mode, or "custom", for `Debug` and log lines.
    tls_mode: &'static str,
}

impl Connector {
    /// From a libpq connection string (URL or `key=value`). Errors never quote the string:
    /// it may hold a password.
    pub(crate) fn from_url(
        url: &str,
        options: PgOptions,
        role: &str,
    ) -> Result<Connector, ConnectError> {
        let split = conninfo::split(url)?;
        let config: Config = split.rest.parse().map_err(|err: postgres::Error| {
            ConnectError::config(format!(
                "invalid PostgreSQL connection string ({err}); expected e.g. \
                 postgres://user:password@host:5432/database?sslmode=verify-full"
            ))
        })?;
        let mode = split.tls.effective_mode();
        #[cfg(feature = "tls")]
        let libpq = Libpq {
            mode,
            tls: super::tls::connector(&split.tls)?,
        };
        #[cfg(not(feature = "tls"))]
        let libpq = match mode {
            SslMode::Disable | SslMode::Allow | SslMode::Prefer => Libpq {
                mode: SslMode::Disable,
            },
            other => {
                return Err(ConnectError::config(format!(
                    "sslmode={} needs TLS, and this build has the `tls` feature off: enable \
                     it, or pass your own connector to a *_config constructor",
                    other.as_str()
                )))
            }
        };
        Ok(Self::new(
            config,
            Arc::new(libpq),
            options,
            role,
            mode.as_str(),
        ))
    }

    /// From the caller's own config and TLS connector, used as given.
    pub(crate) fn from_config(
        config: Config,
        tls: impl TlsConnector,
        options: PgOptions,
        role: &str,
    ) -> Connector {
        Self::new(config, Arc::new(Custom(tls)), options, role, "custom")
    }

    fn new(
        mut config: Config,
        connect: Arc<dyn Connect>,
        options: PgOptions,
        role: &str,
        tls_mode: &'static str,
    ) -> Connector {
        match &options.application_name {
            Some(name) => {
                config.application_name(name);
            }
            None if config.get_application_name().is_none() => {
                config.application_name(&format!("metadata-batcher {role}"));
            }
            None => {}
        }
        config
            .connect_timeout(options.connect_timeout)
            .tcp_user_timeout(options.tcp_user_timeout)
            .keepalives(true)
            .keepalives_idle(options.keepalives_idle)
            .keepalives_interval(KEEPALIVES_INTERVAL)
            .keepalives_retries(KEEPALIVES_RETRIES);
        let host_count = config.get_hosts().len().max(config.get_hostaddrs().len());
        let hosts =
            if host_count > 1 && config.get_load_balance_hosts() == LoadBalanceHosts::Disable {
                (0..host_count)
                    .map(|host| {
                        let one = async_config(&config, Some(host));
                        (Config::from(one.clone()), one)
                    })
                    .collect()
            } else {
                Vec::new()
            };
        Connector {
            async_config: async_config(&config, None),
            hosts,
            config,
            connect,
            options,
            tls_mode,
        }
    }

    /// Opens a session; `settings` says whether to apply the session settings now (not
    /// through a transaction pooler, where they would land on one server connection of
    /// many). Blocks: callers bound it (see [`bounded`](super::bounded)).
    pub(crate) fn open(&self, settings: Option<&str>) -> Result<Client, ConnectError> {
        let mut client = self.connect_hosts()?;
        if let Some(settings) = settings {
            client
                .batch_execute(settings)
                .map_err(|err| ConnectError::from_postgres("setting the session up", err))?;
        }
        Ok(client)
    }

    /// Opens a `tokio-postgres` session, for the caller to drive; unbounded (the caller
    /// bounds it with the connect timeout, set-up included).
    pub(crate) async fn open_async(
        &self,
    ) -> Result<(tokio_postgres::Client, Connection), ConnectError> {
        if self.hosts.is_empty() {
            return self.connect.connect_async(&self.async_config).await;
        }
        let timeout = self.options.connect_timeout;
        let mut last_failure = None;
        for (host, (_, config)) in self.hosts.iter().enumerate() {
            match tokio::time::timeout(timeout, self.connect.connect_async(config)).await {
                Ok(Ok(connected)) => return Ok(connected),
                Ok(Err(err)) => last_failure = Some(err),
                Err(_) => last_failure = Some(self.host_timed_out(host)),
            }
        }
        Err(last_failure.unwrap_or_else(|| self.host_timed_out(0)))
    }

    /// A blocking connection: through the client alone for one host; for several, each
    /// attempt on a thread of its own, given up after `connect_timeout` (the thread ends,
    /// dropping its client, whenever its attempt does) so the next host is tried.
    fn connect_hosts(&self) -> Result<Client, ConnectError> {
        if self.hosts.is_empty() {
            return self.connect.connect(&self.config);
        }
        let mut last_failure = None;
        for (host, (config, _)) in self.hosts.iter().enumerate() {
            let (connected_tx, connected) = crossbeam_channel::bounded(1);
            let (connect, config) = (self.connect.clone(), config.clone());
            let spawned = std::thread::Builder::new()
                .name("mdbatch-connect".to_owned())
                .spawn(move || {
                    // A caller that moved on has dropped the receiver; the client is dropped here.
                    let _ = connected_tx.send(connect.connect(&config));
                });
            if let Err(err) = spawned {
                return Err(ConnectError::new(
                    super::ConnectErrorKind::Unavailable,
                    format!("cannot start a thread to connect: {err}"),
                ));
            }
            match connected.recv_timeout(self.options.connect_timeout) {
                Ok(Ok(client)) => return Ok(client),
                Ok(Err(err)) => last_failure = Some(err),
                Err(_) => last_failure = Some(self.host_timed_out(host)),
            }
        }
        Err(last_failure.unwrap_or_else(|| self.host_timed_out(0)))
    }

    /// The bound of a whole connection attempt: `connect_timeout` for each host tried.
    pub(crate) fn attempt_timeout(&self) -> std::time::Duration {
        self.options.connect_timeout * self.hosts.len().max(1) as u32
    }

    fn host_timed_out(&self, host: usize) -> ConnectError {
        ConnectError::new(
            super::ConnectErrorKind::Unavailable,
            format!(
                "host {} of {} did not complete the TCP connect, TLS handshake and \
                 authentication within connect_timeout ({:?})",
                host + 1,
                self.hosts.len(),
                self.options.connect_timeout
            ),
        )
    }

    /// Sends a cancel request for the session `token` belongs to, over the TLS setup that
    /// session was opened with.
    pub(crate) async fn cancel(&self, token: &CancelToken) -> Result<(), postgres::Error> {
        self.connect.cancel(token).await
    }

    /// The session settings to apply at connect, or `None` when they go per transaction.
    pub(crate) fn connect_settings(&self, store: bool) -> Option<String> {
        (self.options.statement_mode == StatementMode::Prepared)
            .then(|| self.options.session_settings("SESSION", store))
    }

    /// The `application_name` sessions use, for log lines.
    pub(crate) fn application_name(&self) -> &str {
        self.config.get_application_name().unwrap_or_default()
    }
}

/// `config` as a `tokio_postgres::Config`: every setting `postgres::Config` has, but its
/// notice callback (the driven sessions log notices through the `log` facade, as
/// `tokio-postgres` does).
/// With `host` given, only that host of the list (with its `hostaddr` and port).
fn async_config(config: &Config, host: Option<usize>) -> tokio_postgres::Config {
    let mut out = tokio_postgres::Config::new();
    if let Some(user) = config.get_user() {
        out.user(user);
    }
    if let Some(password) = config.get_password() {
        out.password(password);
    }
    if let Some(dbname) = config.get_dbname() {
        out.dbname(dbname);
    }
    if let Some(options) = config.get_options() {
        out.options(options);
    }
    if let Some(name) = config.get_application_name() {
        out.application_name(name);
    }
    let pick = |index: usize| host.is_none_or(|host| host == index);
    for (_, name) in config
        .get_hosts()
        .iter()
        .enumerate()
        .filter(|(i, _)| pick(*i))
    {
        match name {
            postgres::config::Host::Tcp(name) => out.host(name),
            #[cfg(unix)]
            postgres::config::Host::Unix(path) => out.host_path(path),
        };
    }
    for (_, hostaddr) in config
        .get_hostaddrs()
        .iter()
        .enumerate()
        .filter(|(i, _)| pick(*i))
    {
        out.hostaddr(*hostaddr);
    }
    let ports = config.get_ports();
    match host {
        // One port for every host, or one per host, as libpq reads them.
        Some(host) => {
            if let Some(port) = ports.get(host).or(ports.first()) {
                out.port(*port);
            }
        }
        None => {
            for port in ports {
                out.port(*port);
            }
        }
    }
    if let Some(timeout) = config.get_connect_timeout() {
        out.connect_timeout(*timeout);
    }
    if let Some(timeout) = config.get_tcp_user_timeout() {
        out.tcp_user_timeout(*timeout);
    }
    if let Some(retries) = config.get_keepalives_retries() {
        out.keepalives_retries(retries);
    }
    out.ssl_mode(config.get_ssl_mode())
        .ssl_negotiation(config.get_ssl_negotiation())
        .keepalives(config.get_keepalives())
        .keepalives_idle(config.get_keepalives_idle())
        .target_session_attrs(config.get_target_session_attrs())
        .channel_binding(config.get_channel_binding())
        .load_balance_hosts(config.get_load_balance_hosts());
    if let Some(interval) = config.get_keepalives_interval() {
        out.keepalives_interval(interval);
    }
    out
}

/// Keepalive probes after the idle time: one every 5 s, 3 unanswered ones close the
/// connection, so a vanished peer is noticed 15 s after `keepalives_idle`.
const KEEPALIVES_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
const KEEPALIVES_RETRIES: u32 = 3;

/// Where and how a connector connects, never its password: `postgres::Config`'s own
/// `Debug` redacts it, and only the fields an operator needs are shown.
impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .map(|host| match host {
                postgres::config::Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        f.debug_struct("Connector")
            .field("hosts", &hosts)
            .field("ports", &self.config.get_ports())
            .field("user", &self.config.get_user())
            .field("dbname", &self.config.get_dbname())
            .field("application_name", &self.config.get_application_name())
            .field("sslmode", &self.tls_mode)
            .field("statement_mode", &self.options.statement_mode)
            .field("table", &self.options.table)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use postgres::config::Host;

    use super::{Connector, PgOptions};

    fn hosts(url: &str) -> Vec<(String, u16)> {
        let connector = Connector::from_url(url, PgOptions::default(), "test").unwrap();
        connector
            .hosts
            .iter()
            .map(
                |(config, _)| match (config.get_hosts(), config.get_ports()) {
                    ([Host::Tcp(host)], [port]) => (host.clone(), *port),
                    other => panic!("one host and one port each, not {other:?}"),
                },
            )
            .collect()
    }

    #[test]
    fn several_hosts_are_tried_one_by_one_with_their_own_ports() {
        assert_eq!(
            hosts("postgres://u@a:1,b:2/db?target_session_attrs=read-write"),
            [("a".to_owned(), 1), ("b".to_owned(), 2)]
        );
        // One port for every host, as libpq reads it.
        assert_eq!(
            hosts("host=a,b port=7 dbname=db"),
            [("a".to_owned(), 7), ("b".to_owned(), 7)]
        );
        // One host: the client's own attempt, bounded once.
        assert!(hosts("postgres://u@a:1/db").is_empty());
        // Random order is the client's to apply.
        assert!(hosts("postgres://u@a:1,b:2/db?load_balance_hosts=random").is_empty());
    }

    #[test]
    fn the_whole_attempt_is_bounded_by_connect_timeout_per_host() {
        let options = PgOptions {
            connect_timeout: Duration::from_secs(2),
            ..PgOptions::default()
        };
        let bound = |url: &str| {
            Connector::from_url(url, options.clone(), "test")
                .unwrap()
                .attempt_timeout()
        };
        assert_eq!(bound("postgres://u@a,b,c/db"), Duration::from_secs(6));
        assert_eq!(bound("postgres://u@a/db"), Duration::from_secs(2));
    }
}
