//! How every connection of this module is opened: [`PgOptions`], the URL, the session settings.

use std::time::Duration;

use postgres::{Client, Config, NoTls};

/// Connection settings shared by [`PgStore`](super::PgStore),
/// [`PgPublisher`](super::PgPublisher) and [`PgSubscriber`](super::PgSubscriber).
///
/// ```
/// use std::time::Duration;
/// use metadata_batcher::postgres::PgOptions;
///
/// let options = PgOptions {
///     statement_timeout: Duration::from_secs(2),
///     application_name: Some("coderd metadata store".to_owned()),
///     ..PgOptions::default()
/// };
/// assert_eq!(options.connect_timeout, Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgOptions {
    /// The session's `statement_timeout`, set on every (re)connect. It keeps a hung server or
    /// a lock held elsewhere from stalling the batcher's flusher; a timed-out write fails
    /// with [`StoreError::Canceled`](crate::StoreError::Canceled). `Duration::ZERO` disables
    /// it. Default 10 s.
    pub statement_timeout: Duration,
    /// How long opening a connection may take before it fails as unavailable. Default 5 s.
    pub connect_timeout: Duration,
    /// The session's `application_name`, shown in `pg_stat_activity`, so an operator (or a
    /// test) can tell the batcher's connections apart. `None` keeps the URL's, or else uses
    /// `metadata-batcher store`, `... publisher` or `... subscriber`.
    pub application_name: Option<String>,
}

/// The statement timeout [`PgOptions::default`] uses.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The connect timeout [`PgOptions::default`] uses: long enough for a loaded server, short
/// enough that a blackholed address does not hold a flush for minutes.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            application_name: None,
        }
    }
}

/// A parsed URL plus the options, ready to open sessions again and again.
pub(crate) struct Connector {
    config: Config,
    statement_timeout: Duration,
}

/// Idle time before TCP keepalives start: a subscriber waits silently for hours, and without
/// keepalives a vanished server (not a closed socket) would never be noticed.
const KEEPALIVES_IDLE: Duration = Duration::from_secs(30);

impl Connector {
    /// Parses `url` (a `postgres://` URL or a `key=value` string); the error says what to fix.
    pub(crate) fn new(url: &str, options: &PgOptions, role: &str) -> Result<Connector, String> {
        let mut config: Config = url.parse().map_err(|err| {
            format!(
                "invalid PostgreSQL connection URL ({err}); expected e.g. \
                 postgres://user:password@host:5432/database"
            )
        })?;
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
            .keepalives(true)
            .keepalives_idle(KEEPALIVES_IDLE);
        Ok(Connector {
            config,
            statement_timeout: options.statement_timeout,
        })
    }

    /// Opens a session with `statement_timeout` set.
    pub(crate) fn open(&self) -> Result<Client, postgres::Error> {
        let mut client = self.config.connect(NoTls)?;
        // Rounded up so that a sub-millisecond timeout does not become 0, which disables it.
        let millis = self.statement_timeout.as_micros().div_ceil(1000);
        client.batch_execute(&format!("SET statement_timeout = {millis}"))?;
        Ok(client)
    }

    /// The `application_name` sessions use, for log lines.
    pub(crate) fn application_name(&self) -> &str {
        self.config.get_application_name().unwrap_or_default()
    }
}
