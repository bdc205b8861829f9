//! [`PgSubscriber`]: `LISTEN`s on a channel and decodes the agent IDs each flush announces.

use std::fmt;
use std::thread;
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator as _;
use postgres::Client;
use tracing::{debug, warn};
use uuid::Uuid;

use super::connect::Connector;
use super::error::describe;
use super::PgOptions;
use crate::agent_ids;

/// The first wait before reconnecting a lost subscription; doubles per failed attempt.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest wait between reconnect attempts: a subscriber is a watcher's only news of
/// changes, so it retries often, and one connect attempt per second costs a server little.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// PostgreSQL truncates identifiers to 63 bytes: a longer channel would `LISTEN` on a
/// different name than the one `pg_notify` (which refuses it) is called with.
const MAX_CHANNEL_BYTES: usize = 63;

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
    connector: Connector,
    channel: String,
    client: Option<Client>,
    malformed: u64,
    backoff: Duration,
    next_attempt: Instant,
    /// Why the last reconnect attempt failed, for the error of a `next` that waits out the
    /// backoff without an attempt of its own.
    last_failure: Option<SubscribeError>,
}

impl PgSubscriber {
    /// Connects with [`PgOptions::default`] and `LISTEN`s on `channel`.
    pub fn listen(url: &str, channel: &str) -> Result<PgSubscriber, SubscribeError> {
        Self::listen_with(url, channel, PgOptions::default())
    }

    /// Connects with the given options and `LISTEN`s on `channel`.
    pub fn listen_with(
        url: &str,
        channel: &str,
        options: PgOptions,
    ) -> Result<PgSubscriber, SubscribeError> {
        if channel.is_empty() || channel.len() > MAX_CHANNEL_BYTES || channel.contains('\0') {
            return Err(SubscribeError::InvalidChannel(format!(
                "channel {channel:?} must be 1 to {MAX_CHANNEL_BYTES} bytes without NUL"
            )));
        }
        let connector =
            Connector::new(url, &options, "subscriber").map_err(SubscribeError::InvalidUrl)?;
        let client = open(&connector, channel)?;
        Ok(PgSubscriber {
            connector,
            channel: channel.to_owned(),
            client: Some(client),
            malformed: 0,
            backoff: RECONNECT_BACKOFF_MIN,
            next_attempt: Instant::now(),
            last_failure: None,
        })
    }

    /// Waits up to `timeout` for the next event. `Ok(None)`: nothing arrived in time.
    ///
    /// `Err` means the connection is lost and could not be reopened within `timeout`; the
    /// subscription is not over: call again and it keeps trying, then reports
    /// [`SubscriberEvent::Reconnected`].
    pub fn next(&mut self, timeout: Duration) -> Result<Option<SubscriberEvent>, SubscribeError> {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(client) = self.client.as_mut() else {
                return self.reconnect(deadline);
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            let received = client.notifications().timeout_iter(remaining).next();
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
                // Timed out, or the server hung up: the client tells which.
                Ok(None) if !client.is_closed() => return Ok(None),
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
        self.client = None;
        self.backoff = RECONNECT_BACKOFF_MIN;
        self.next_attempt = Instant::now();
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
            match open(&self.connector, &self.channel) {
                Ok(client) => {
                    debug!(channel = %self.channel, "metadata subscriber reconnected");
                    self.client = Some(client);
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

/// Connects and `LISTEN`s.
fn open(connector: &Connector, channel: &str) -> Result<Client, SubscribeError> {
    let listen = || -> Result<Client, postgres::Error> {
        let mut client = connector.open()?;
        client.batch_execute(&format!("LISTEN {}", quote_identifier(channel)))?;
        Ok(client)
    };
    listen().map_err(|err| {
        SubscribeError::Unavailable(format!(
            "cannot LISTEN on {channel:?}: {}; check that the server is reachable",
            describe(&err)
        ))
    })
}

/// `"name"`, with inner quotes doubled, so any channel name is one identifier.
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
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

#[cfg(test)]
mod tests {
    use super::quote_identifier;

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_identifier("plain"), "\"plain\"");
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }
}
