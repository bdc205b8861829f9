//! [`PgSubscriber`]: `LISTEN`s on a channel and decodes the agent IDs each flush announces.

use std::fmt;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use postgres::fallible_iterator::FallibleIterator as _;
use postgres::{Client, Config};
use tracing::{debug, warn};
use uuid::Uuid;

use super::connector::{Connector, TlsConnector};
use super::error::{describe, ConnectError};
use super::listen::{abandon, check_channel, connect_timed_out, spawn_open};
use super::PgOptions;
use crate::agent_ids;

/// The first wait before reconnecting a lost subscription; doubles per failed attempt.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest wait between reconnect attempts: a subscriber is a watcher's only news of
/// changes, so it retries often, and one connect attempt per second costs a server little.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What [`PgSubscriber::next`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriberEvent {
    /// The agents one payload announced: their metadata changed; re-read their rows.
    Agents(Vec<Uuid>),
    /// The connection was lost and is back, listening again. Notifications sent meanwhile
    /// are lost: re-read every row you watch.
    Reconnected,
}

/// Receives the agent IDs announced on a channel, on a connection of its own.
///
/// A lost connection is reopened (with a backoff of at most 1 s between attempts) and
/// reported once as [`SubscriberEvent::Reconnected`]. A malformed payload, such as one from
/// a foreign publisher, is logged, counted in [`malformed`](Self::malformed) and skipped. An
/// empty payload, which Go's decoder accepts as no agents, is skipped without being counted.
///
/// ```no_run
/// use std::time::Duration;
/// use metadata_batcher::postgres::{PgSubscriber, SubscriberEvent};
/// use metadata_batcher::METADATA_BATCH_CHANNEL;
///
/// let mut subscriber = PgSubscriber::listen("postgres://postgres@127.0.0.1/postgres", METADATA_BATCH_CHANNEL)?;
/// loop {
///     match subscriber.next(Duration::from_secs(5)) {
///         Ok(Some(SubscriberEvent::Agents(agents))) => println!("re-read {} agents", agents.len()),
///         Ok(Some(SubscriberEvent::Reconnected)) => println!("re-read everything"),
///         Ok(None) => {}                                   // quiet for 5 s
///         Err(err) => eprintln!("{err}"),                  // still down; the next call retries
///     }
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct PgSubscriber {
    connector: Arc<Connector>,
    channel: String,
    client: Option<Client>,
    /// A connect attempt still running on its own thread: kept across calls, so a `next`
    /// whose timeout ends mid-attempt neither waits for it nor starts another.
    pending: Option<Receiver<Result<Client, ConnectError>>>,
    malformed: u64,
    backoff: Duration,
    next_attempt: Instant,
    /// Why the last reconnect attempt failed, for the error of a `next` that waits out the
    /// backoff without an attempt of its own.
    last_failure: Option<SubscribeError>,
    /// When the session last answered or delivered anything: the heartbeat's clock.
    last_heard: Instant,
    /// How long heartbeat checks have waited in vain since the session last answered one. A
    /// check cut short by the caller's timeout is inconclusive; the session is given up once
    /// its checks have waited `connect_timeout` in all.
    unanswered_for: Duration,
}

impl PgSubscriber {
    /// Connects with [`PgOptions::default`] and `LISTEN`s on `channel`.
    pub fn listen(url: &str, channel: &str) -> Result<PgSubscriber, SubscribeError> {
        Self::listen_with(url, channel, PgOptions::default())
    }

    /// [`open`](Self::open), with the error flattened into a [`SubscribeError`].
    pub fn listen_with(
        url: &str,
        channel: &str,
        options: PgOptions,
    ) -> Result<PgSubscriber, SubscribeError> {
        check_channel(channel)
            .map_err(|err| SubscribeError::InvalidChannel(err.message().to_owned()))?;
        Self::open(url, channel, options).map_err(SubscribeError::from)
    }

    /// Connects to a libpq connection string and `LISTEN`s on `channel`, within
    /// `connect_timeout`. Fails with a [`ConnectError`] that tells a configuration problem
    /// (including a connection that cannot keep a `LISTEN`: a transaction-mode pooler) from
    /// an outage.
    pub fn open(
        url: &str,
        channel: &str,
        options: PgOptions,
    ) -> Result<PgSubscriber, ConnectError> {
        check_channel(channel)?;
        Self::start(Connector::from_url(url, options, "subscriber")?, channel)
    }

    /// Connects with your own `postgres::Config` and TLS connector; see
    /// [`PgStore::open_config`](super::PgStore::open_config).
    pub fn open_config(
        config: Config,
        tls: impl TlsConnector,
        channel: &str,
        options: PgOptions,
    ) -> Result<PgSubscriber, ConnectError> {
        check_channel(channel)?;
        Self::start(
            Connector::from_config(config, tls, options, "subscriber"),
            channel,
        )
    }

    fn start(connector: Connector, channel: &str) -> Result<PgSubscriber, ConnectError> {
        let connector = Arc::new(connector);
        let attempt = spawn_open(&connector, channel);
        let client = match attempt.recv_timeout(connector.attempt_timeout()) {
            Ok(result) => result?,
            Err(_) => return Err(connect_timed_out(&connector)),
        };
        Ok(PgSubscriber {
            connector,
            channel: channel.to_owned(),
            client: Some(client),
            pending: None,
            malformed: 0,
            backoff: RECONNECT_BACKOFF_MIN,
            next_attempt: Instant::now(),
            last_failure: None,
            last_heard: Instant::now(),
            unanswered_for: Duration::ZERO,
        })
    }

    /// Waits up to `timeout` for the next event. `Ok(None)`: nothing arrived in time.
    ///
    /// `Err` means the connection is lost and could not be reopened within `timeout`; the
    /// subscription is not over: call again and it keeps trying, then reports
    /// [`SubscriberEvent::Reconnected`].
    pub fn next(&mut self, timeout: Duration) -> Result<Option<SubscriberEvent>, SubscribeError> {
        let deadline = Instant::now() + timeout;
        let heartbeat = self.connector.options.subscriber_heartbeat;
        loop {
            if self.client.is_none() {
                return self.reconnect(deadline);
            }
            if !heartbeat.is_zero() && Instant::now() >= self.last_heard + heartbeat {
                match self.check(deadline) {
                    Check::Answered | Check::Skipped => {}
                    Check::Lost | Check::CutShort => continue,
                }
            }
            let Some(client) = self.client.as_mut() else {
                continue;
            };
            let now = Instant::now();
            let mut wait = deadline.saturating_duration_since(now);
            // Wake for the next check, unless one is due already (skipped: too little time).
            let check_at = self.last_heard + heartbeat;
            if !heartbeat.is_zero() && check_at > now {
                wait = wait.min(check_at - now);
            }
            let received = client.notifications().timeout_iter(wait).next();
            if matches!(received, Ok(Some(_))) {
                self.last_heard = Instant::now();
            }
            match received {
                // Go's decoder reads an empty payload as no agents: nothing to re-read, and
                // nothing wrong with the publisher, so it is neither returned nor counted.
                Ok(Some(notification)) if notification.payload().is_empty() => {
                    debug!(channel = %self.channel, "skipping empty metadata notification");
                }
                Ok(Some(notification)) => {
                    match agent_ids::decode_chunk(notification.payload().as_bytes()) {
                        Ok(agents) => return Ok(Some(SubscriberEvent::Agents(agents))),
                        Err(err) => {
                            self.malformed += 1;
                            warn!(
                                channel = %self.channel,
                                payload_bytes = notification.payload().len(),
                                error = %err,
                                "skipping malformed metadata notification"
                            );
                        }
                    }
                }
                // Timed out, or the server hung up: the client tells which. A wait cut short
                // by a heartbeat due goes round again.
                Ok(None) if !client.is_closed() => {
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                }
                Ok(None) => self.lost("the server closed the connection".to_owned()),
                Err(err) => self.lost(describe(&err)),
            }
        }
    }

    /// How many malformed payloads were skipped so far.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// The channel this subscriber listens on.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    fn lost(&mut self, reason: String) {
        warn!(channel = %self.channel, reason, "metadata subscriber lost its connection; reconnecting");
        if let Some(client) = self.client.take() {
            abandon(client);
        }
        self.unanswered_for = Duration::ZERO;
        self.backoff = RECONNECT_BACKOFF_MIN;
        self.next_attempt = Instant::now();
    }

    /// The heartbeat: an empty query on the session, answered within `connect_timeout` of
    /// waiting in all, spread over as many calls as the caller's timeouts make it take.
    fn check(&mut self, deadline: Instant) -> Check {
        let Some(client) = self.client.as_mut() else {
            return Check::Lost;
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining < CHECK_MIN_WAIT {
            return Check::Skipped;
        }
        let bound = self.connector.options.connect_timeout;
        let wait = bound.saturating_sub(self.unanswered_for).min(remaining);
        let started = Instant::now();
        match client.is_valid(wait) {
            Ok(()) => {
                self.last_heard = Instant::now();
                self.unanswered_for = Duration::ZERO;
                Check::Answered
            }
            Err(err) if client.is_closed() => {
                self.lost(describe(&err));
                Check::Lost
            }
            Err(_) => {
                self.unanswered_for += started.elapsed();
                if self.unanswered_for < bound {
                    return Check::CutShort;
                }
                self.lost(format!(
                    "the session went silent: nothing heard for {:?}, and empty queries waited \
                     connect_timeout ({bound:?}) for an answer",
                    self.connector.options.subscriber_heartbeat
                ));
                Check::Lost
            }
        }
    }

    /// Tries to reopen the subscription until `deadline`, sleeping out the backoff between
    /// attempts (but never past the deadline). Sleeping is the point here: a watcher blocks
    /// in `next` and expects it to recover by itself, and hammering a server that is down
    /// with connection attempts helps nobody.
    fn reconnect(&mut self, deadline: Instant) -> Result<Option<SubscriberEvent>, SubscribeError> {
        loop {
            let now = Instant::now();
            if now < self.next_attempt {
                if self.next_attempt > deadline {
                    thread::sleep(deadline.saturating_duration_since(now));
                    return Err(self.last_failure.clone().unwrap_or_else(|| {
                        SubscribeError::Unavailable(format!(
                            "reconnecting to LISTEN on {:?}",
                            self.channel
                        ))
                    }));
                }
                thread::sleep(self.next_attempt - now);
            }
            let attempt = self
                .pending
                .take()
                .unwrap_or_else(|| spawn_open(&self.connector, &self.channel));
            let wait = deadline.saturating_duration_since(Instant::now());
            let result = match attempt.recv_timeout(wait) {
                Ok(result) => result.map_err(SubscribeError::from),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    // Still connecting: the next call picks the attempt up where it is.
                    self.pending = Some(attempt);
                    return Err(self.last_failure.clone().unwrap_or_else(|| {
                        SubscribeError::Unavailable(format!(
                            "reconnecting to LISTEN on {:?}: no session yet",
                            self.channel
                        ))
                    }));
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    Err(SubscribeError::Unavailable(
                        "the connect attempt's thread ended without an answer".to_owned(),
                    ))
                }
            };
            match result {
                Ok(client) => {
                    debug!(channel = %self.channel, "metadata subscriber reconnected");
                    self.client = Some(client);
                    self.last_heard = Instant::now();
                    self.backoff = RECONNECT_BACKOFF_MIN;
                    self.last_failure = None;
                    return Ok(Some(SubscriberEvent::Reconnected));
                }
                Err(err) => {
                    self.next_attempt = Instant::now() + self.backoff;
                    self.backoff = (self.backoff * 2).min(RECONNECT_BACKOFF_MAX);
                    self.last_failure = Some(err.clone());
                    if Instant::now() >= deadline {
                        return Err(err);
                    }
                }
            }
        }
    }
}

/// The shortest wait a heartbeat check is worth. A check that cannot hear its answer would
/// count against a live session, so a call with less time left (a zero-timeout poll) reads
/// notifications instead and leaves the check to a longer call.
const CHECK_MIN_WAIT: Duration = Duration::from_millis(100);

/// What a heartbeat check found.
enum Check {
    Answered,
    /// The session is gone or silent, and was dropped.
    Lost,
    /// The caller's timeout ended the check before it had waited `connect_timeout` in all.
    CutShort,
    /// Too little time left to check; see [`CHECK_MIN_WAIT`].
    Skipped,
}

impl Drop for PgSubscriber {
    fn drop(&mut self) {
        // A check still unanswered leaves a reply pending, and dropping a `postgres::Client`
        // waits for its connection to finish: on a silent session, forever.
        if !self.unanswered_for.is_zero() {
            if let Some(client) = self.client.take() {
                abandon(client);
            }
        }
    }
}

/// Why a [`PgSubscriber`] could not listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscribeError {
    /// The connection URL could not be parsed.
    InvalidUrl(String),
    /// The channel name cannot be listened on.
    InvalidChannel(String),
    /// The server could not be reached or refused the `LISTEN`. From
    /// [`PgSubscriber::next`] this is transient: the next call keeps reconnecting.
    Unavailable(String),
}

impl fmt::Display for SubscribeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubscribeError::InvalidUrl(message) => write!(f, "metadata subscriber: {message}"),
            SubscribeError::InvalidChannel(message) => {
                write!(f, "metadata subscriber: invalid channel: {message}")
            }
            SubscribeError::Unavailable(message) => {
                write!(f, "metadata subscriber unavailable: {message}")
            }
        }
    }
}

impl std::error::Error for SubscribeError {}

impl From<ConnectError> for SubscribeError {
    fn from(err: ConnectError) -> Self {
        if err.kind().is_config_problem() {
            SubscribeError::InvalidUrl(err.to_string())
        } else {
            SubscribeError::Unavailable(err.to_string())
        }
    }
}

impl fmt::Debug for PgSubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgSubscriber")
            .field("connection", &*self.connector)
            .field("channel", &self.channel)
            .field("connected", &self.client.is_some())
            .field("malformed", &self.malformed)
            .finish()
    }
}
