//! A client whose every call has a deadline: one connection on a thread of its own.
//!
//! The blocking `postgres` client waits for as long as the server or the network is silent:
//! `statement_timeout` runs inside the server, so it cannot fire when the server (or the path
//! to it) is what went quiet, and the kernel notices a dead peer only after minutes. So each
//! session's `Client` lives on a thread of its own ([`BoundedClient`]), and the caller waits
//! for each call's answer with a deadline:
//!
//! | waits for | bounded by | on expiry |
//! |---|---|---|
//! | connect, TLS, authentication, settings, prepare | `connect_timeout` | the attempt is abandoned; `Unavailable` |
//! | a statement | `statement_timeout + deadline_margin` | a cancel request is sent, the session dropped; `Unavailable` |
//! | a statement, when `close()` gives up | the batcher's `final_flush_timeout` | cancel sent, session dropped; `Canceled` |
//!
//! An abandoned session's thread stays blocked until the server answers or the kernel gives
//! up (`tcp_user_timeout`, keepalives), then drops the client and ends; nothing waits for it.
//! The kernel never gives up on a peer that acknowledges everything and answers nothing (a
//! SIGSTOPped backend, a proxy or pooler that accepts and holds), so without a bound a fault
//! of hours would collect a thread and a socket per retry: [`SessionThreads`] allows at most
//! [`MAX_SESSION_THREADS`] alive at once per store or publisher, and refuses to open another
//! (as unavailable, at once) until one of them ends, but for one try per
//! [`RELIEF_CONNECT_TIMEOUTS`] connect timeouts.
//! Why a thread rather than socket timeouts: the `postgres` crate owns its socket inside a
//! private runtime and offers no per-call timeout, and a thread is the one way to stop
//! waiting for a call without touching it. It costs two thread wake-ups per statement: about
//! 3 % of a statement alone, more when the batcher's threads share 2 cores with the server
//! (docs/performance.md).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{after, bounded, never, select, Receiver, Sender};
use postgres::{CancelToken, Client};
use tracing::debug;

use super::connector::Connector;
use super::error::ConnectError;

type Job = Box<dyn FnOnce(&mut Client) + Send>;

/// Why a call gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoAnswer {
    /// The deadline passed; a cancel request was sent and the session must be dropped.
    TimedOut(Duration),
    /// [`Abort::fire`] stopped the wait; the session must be dropped.
    Aborted,
    /// The session's thread is gone (a panic in the client).
    Gone,
}

impl NoAnswer {
    /// What happened, for an error message.
    pub(crate) fn describe(self) -> String {
        match self {
            NoAnswer::TimedOut(deadline) => format!(
                "no answer from PostgreSQL within {deadline:?} (statement_timeout + \
                 deadline_margin): the server or the network went silent; a cancel request \
                 was sent and the session dropped"
            ),
            NoAnswer::Aborted => "the call was interrupted; the session was dropped".to_owned(),
            NoAnswer::Gone => "the PostgreSQL session's thread ended unexpectedly".to_owned(),
        }
    }
}

/// How many session threads one store or publisher may have alive at once: the one in use
/// and those given up on that still wait for an answer. Four, so that a few short faults in a
/// row (each abandons one session) never refuse a new session, while a long one costs four
/// threads, not one per retry.
pub(crate) const MAX_SESSION_THREADS: usize = 4;

/// Past the bound, one more session may still be tried once per this many connect timeouts.
/// The sessions held may be stuck on a path that stays silent while a new connection would
/// work (a frozen old primary after a failover moved the address): refusing for good would
/// trade a few threads for an outage. So a long silence costs four threads plus one per
/// `RELIEF_CONNECT_TIMEOUTS × connect_timeout` (50 s by default).
pub(crate) const RELIEF_CONNECT_TIMEOUTS: u32 = 10;

/// The session threads alive of one store or publisher; see [`MAX_SESSION_THREADS`].
#[derive(Debug, Default)]
pub(crate) struct SessionThreads {
    alive: Arc<AtomicUsize>,
    /// Since when new sessions are refused (or since the last one let through past the
    /// bound).
    refusing_since: Option<Instant>,
}

impl SessionThreads {
    /// A place for one more thread, or, when all are taken and no relief is due, the error
    /// that says why no session is opened.
    fn claim(&mut self, connect_timeout: Duration) -> Result<ThreadPlace, ConnectError> {
        let alive = self.alive.load(Ordering::Acquire);
        if alive >= MAX_SESSION_THREADS {
            let now = Instant::now();
            let since = *self.refusing_since.get_or_insert(now);
            let relief = connect_timeout * RELIEF_CONNECT_TIMEOUTS;
            if now.duration_since(since) < relief {
                return Err(ConnectError::new(
                    super::ConnectErrorKind::Unavailable,
                    format!(
                        "{alive} earlier sessions were given up on and still wait for an \
                         answer (the server or the network accepts and stays silent); no new \
                         session until one of them ends, or {relief:?} have passed"
                    ),
                ));
            }
            self.refusing_since = Some(now);
        } else {
            self.refusing_since = None;
        }
        self.alive.fetch_add(1, Ordering::AcqRel);
        Ok(ThreadPlace(self.alive.clone()))
    }
}

/// One session thread's place in its [`SessionThreads`], given back when the thread ends,
/// however it ends.
struct ThreadPlace(Arc<AtomicUsize>);

impl Drop for ThreadPlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One connection on its own thread.
pub(crate) struct BoundedClient {
    jobs: Sender<Job>,
    abort: Receiver<()>,
    abort_tx: Sender<()>,
    token: CancelToken,
    connector: Arc<Connector>,
}

impl BoundedClient {
    /// Connects on a new thread named `thread_name` and runs `setup` there (session
    /// settings, preparing statements), all within `connect_timeout`. Fails at once when
    /// `threads` has no place left.
    pub(crate) fn open<S: Send + 'static>(
        connector: Arc<Connector>,
        threads: &mut SessionThreads,
        thread_name: &str,
        setup: impl FnOnce(&Connector, &mut Client) -> Result<S, ConnectError> + Send + 'static,
    ) -> Result<(BoundedClient, S), ConnectError> {
        let timeout = connector.options.connect_timeout;
        let (opened_tx, opened) = bounded(1);
        let (jobs, jobs_rx) = crossbeam_channel::unbounded::<Job>();
        let on_thread = connector.clone();
        let place = threads.claim(timeout)?;
        thread::Builder::new()
            .name(thread_name.to_owned())
            .spawn(move || {
                let _place = place;
                let result = catch_unwind(AssertUnwindSafe(|| {
                    let mut client = on_thread.open(None)?;
                    let state = setup(&on_thread, &mut client)?;
                    Ok((client, state))
                }))
                .unwrap_or_else(|_| {
                    Err(ConnectError::new(
                        super::ConnectErrorKind::Unavailable,
                        "the PostgreSQL client panicked while connecting".to_owned(),
                    ))
                });
                let (mut client, state) = match result {
                    Ok(opened) => opened,
                    Err(err) => {
                        let _ = opened_tx.send(Err(err));
                        return;
                    }
                };
                let token = client.cancel_token();
                if opened_tx.send(Ok((token, state))).is_err() {
                    // The caller gave up waiting; the session was never used.
                    return;
                }
                for job in jobs_rx {
                    if catch_unwind(AssertUnwindSafe(|| job(&mut client))).is_err() {
                        return;
                    }
                }
            })
            .map_err(|err| {
                ConnectError::new(
                    super::ConnectErrorKind::Unavailable,
                    format!("cannot start a thread for the PostgreSQL session: {err}"),
                )
                .with_source(err)
            })?;
        let (token, state) = match opened.recv_timeout(timeout) {
            Ok(result) => result?,
            Err(_) => {
                return Err(ConnectError::new(
                    super::ConnectErrorKind::Unavailable,
                    format!(
                        "no session within connect_timeout ({timeout:?}): the server did not \
                         complete the TCP connect, TLS handshake, authentication and session \
                         set-up in time"
                    ),
                ))
            }
        };
        let (abort_tx, abort) = bounded(1);
        Ok((
            BoundedClient {
                jobs,
                abort,
                abort_tx,
                token,
                connector,
            },
            state,
        ))
    }

    /// Runs `call` on the session's thread and waits for its answer at most `deadline`
    /// (`None`: no deadline). After `Err` the session must be dropped.
    pub(crate) fn call<R: Send + 'static>(
        &self,
        deadline: Option<Duration>,
        call: impl FnOnce(&mut Client) -> R + Send + 'static,
    ) -> Result<R, NoAnswer> {
        // An abort fired after the previous call had already answered is stale.
        while self.abort.try_recv().is_ok() {}
        let (reply_tx, reply) = bounded(1);
        self.jobs
            .send(Box::new(move |client| {
                let _ = reply_tx.send(call(client));
            }))
            .map_err(|_| NoAnswer::Gone)?;
        let timer = deadline.map_or_else(never, after);
        select! {
            recv(reply) -> answer => answer.map_err(|_| NoAnswer::Gone),
            recv(self.abort) -> _ => Err(NoAnswer::Aborted),
            recv(timer) -> _ => {
                let deadline = deadline.unwrap_or_default();
                debug!(
                    application_name = self.connector.application_name(),
                    ?deadline,
                    "no answer from PostgreSQL by the deadline; canceling and dropping the session"
                );
                self.abort().fire();
                Err(NoAnswer::TimedOut(deadline))
            }
        }
    }

    /// A handle that sends a cancel request for the running call and stops the wait for it.
    pub(crate) fn abort(&self) -> Abort {
        Abort {
            token: self.token.clone(),
            connector: self.connector.clone(),
            stop_wait: self.abort_tx.clone(),
        }
    }
}

/// Stops a call of a [`BoundedClient`] from any thread; see [`BoundedClient::abort`].
pub(crate) struct Abort {
    token: CancelToken,
    connector: Arc<Connector>,
    stop_wait: Sender<()>,
}

impl Abort {
    /// Sends the cancel request on a thread of its own (it opens a connection, which can
    /// hang as long as the fault that made us cancel), and releases the waiting caller now.
    pub(crate) fn fire(self) {
        let _ = self.stop_wait.try_send(());
        let Abort {
            token, connector, ..
        } = self;
        let spawned = thread::Builder::new()
            .name("mdbatch-cancel".to_owned())
            .spawn(move || {
                if let Err(err) = connector.cancel(&token) {
                    debug!(
                        application_name = connector.application_name(),
                        error = %super::error::describe(&err),
                        "PostgreSQL cancel request failed"
                    );
                }
            });
        if let Err(err) = spawned {
            debug!(error = %err, "cannot start a thread for a PostgreSQL cancel request");
        }
    }
}
