//! A session whose every call has a deadline: a `tokio-postgres` connection driven on the
//! caller's own thread by a private runtime.
//!
//! The blocking `postgres` client waits for as long as the server or the network is silent:
//! `statement_timeout` runs inside the server, so it cannot fire when the server (or the path
//! to it) is what went quiet, and the kernel notices a dead peer only after minutes. So the
//! store's and the publisher's sessions are `tokio-postgres` connections that the waiting
//! thread drives itself, inside `block_on` of a current-thread runtime the session owns (what
//! `postgres::Client` does inside, with a timer added), and each wait has a deadline:
//!
//! | waits for | bounded by | on expiry |
//! |---|---|---|
//! | connect, TLS, authentication, settings, prepare | `connect_timeout` | the attempt is dropped; `Unavailable` |
//! | a statement | `statement_timeout + deadline_margin` | a cancel request is sent, the session dropped; `Unavailable` |
//! | a statement, when `close()` gives up | the batcher's `final_flush_timeout` | cancel sent, session dropped; `Canceled` |
//!
//! A session given up on is dropped, and with it its socket: nothing stays blocked on a
//! silent peer, however long the fault lasts. Only the cancel request runs on a thread of its
//! own (it opens a connection, which can hang as long as the fault that made us cancel).
//! No thread hand-off per statement either: the statement runs on the thread that waits for
//! it. And a call may send several messages before it waits for the first answer
//! (pipelining), which the blocking client cannot.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::thread;
use std::time::Duration;

use tokio::runtime::Runtime;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio_postgres::{CancelToken, Client};
use tracing::debug;

use super::connector::Connector;
use super::error::ConnectError;
use super::tls_setup::Connection;
use super::ConnectErrorKind;

/// Why a call gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoAnswer {
    /// The deadline passed; a cancel request was sent and the session must be dropped.
    TimedOut(Duration),
    /// [`Abort::fire`] stopped the wait; the session must be dropped.
    Aborted,
    /// The client panicked during the call; the session was dropped.
    Panicked,
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
            NoAnswer::Panicked => {
                "the PostgreSQL client panicked during the call; the session was dropped".to_owned()
            }
        }
    }
}

/// The private runtime sessions are driven on: current-thread, so a call runs on the thread
/// that makes it; shared by the sessions of one store, which run their statements at once.
pub(crate) struct SessionRuntime(Option<Runtime>);

impl SessionRuntime {
    /// Runs `future` to completion on this thread. Like `postgres::Client`, not on an async
    /// runtime's own threads (`spawn_blocking` is fine): tokio refuses a `block_on` there.
    pub(crate) fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.0
            .as_ref()
            .expect("taken only by drop")
            .block_on(future)
    }

    /// [`block_on`](Self::block_on), with a panic in the client (or the caller's TLS
    /// connector) caught: `Err(NoAnswer::Panicked)`, for the caller to drop the sessions the
    /// call used, as it drops a session that gave no answer. A panic must not lose the rows
    /// of a call that can be retried.
    pub(crate) fn block_on_caught<F: Future>(&self, future: F) -> Result<F::Output, NoAnswer> {
        catch_unwind(AssertUnwindSafe(|| self.block_on(future))).map_err(|_| NoAnswer::Panicked)
    }
}

impl Drop for SessionRuntime {
    /// Without waiting: a plain drop would panic when the store is dropped inside an async
    /// task, and nothing runs on the runtime between calls anyway.
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// A new [`SessionRuntime`].
pub(crate) fn runtime() -> Result<Arc<SessionRuntime>, ConnectError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map(|runtime| Arc::new(SessionRuntime(Some(runtime))))
        .map_err(|err| {
            ConnectError::new(
                ConnectErrorKind::Unavailable,
                format!("cannot start the runtime that drives PostgreSQL sessions: {err}"),
            )
            .with_source(err)
        })
}

/// One connection, driven by whoever waits on it.
pub(crate) struct DeadlineClient {
    client: Client,
    driver: Driver,
}

/// The half of a [`DeadlineClient`] a call waits with: the connection's I/O and the abort.
pub(crate) struct Driver {
    /// `None` once it ended (closed, or failed): dropped then, which fails the calls still
    /// waiting for an answer on it, and every later call.
    connection: Option<Connection>,
    abort: UnboundedReceiver<()>,
    abort_tx: UnboundedSender<()>,
    token: CancelToken,
    connector: Arc<Connector>,
}

impl DeadlineClient {
    /// Connects and runs `setup` (session settings, preparing statements), all within
    /// `connect_timeout`. Run inside the session's runtime.
    pub(crate) async fn open<S>(
        connector: Arc<Connector>,
        setup: impl AsyncFnOnce(&Connector, &Client) -> Result<S, ConnectError>,
    ) -> Result<(DeadlineClient, S), ConnectError> {
        let timeout = connector.attempt_timeout();
        let opening = async {
            let (client, connection) = connector.open_async().await?;
            let (abort_tx, abort) = unbounded_channel();
            let mut driver = Driver {
                connection: Some(connection),
                abort,
                abort_tx,
                token: client.cancel_token(),
                connector: connector.clone(),
            };
            let state = driver.drive(setup(&connector, &client)).await?;
            Ok((DeadlineClient { client, driver }, state))
        };
        tokio::time::timeout(timeout, opening)
            .await
            .unwrap_or_else(|_| {
                Err(ConnectError::new(
                    ConnectErrorKind::Unavailable,
                    format!(
                        "no session within connect_timeout ({timeout:?}): the server did not \
                         complete the TCP connect, TLS handshake, authentication and session \
                         set-up in time"
                    ),
                ))
            })
    }

    /// The client and the driver, for a call that borrows the one while waiting with the
    /// other.
    pub(crate) fn split(&mut self) -> (&Client, &mut Driver) {
        (&self.client, &mut self.driver)
    }

    /// A handle that sends a cancel request for the running call, or the next one if none
    /// runs yet, and stops the wait for it. Aborts fired before this are stale: they were
    /// for calls that had answered already.
    pub(crate) fn abort(&mut self) -> Abort {
        while self.driver.abort.try_recv().is_ok() {}
        self.driver.abort()
    }
}

impl Driver {
    /// Waits for `call` at most `deadline` (`None`: no deadline), driving the connection
    /// meanwhile. After `Err` the session must be dropped.
    pub(crate) async fn call<R>(
        &mut self,
        deadline: Option<Duration>,
        call: impl Future<Output = R>,
    ) -> Result<R, NoAnswer> {
        // An abort fired before this call starts is for it (it was taken for the store
        // call this one belongs to, perhaps while its parameters were encoded): not
        // drained here, but when the next handle is taken.
        let Some(deadline) = deadline else {
            return self.abortable(call).await;
        };
        match tokio::time::timeout(deadline, self.abortable(call)).await {
            Ok(answer) => answer,
            Err(_) => {
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

    fn abort(&self) -> Abort {
        Abort {
            token: self.token.clone(),
            connector: self.connector.clone(),
            stop_wait: self.abort_tx.clone(),
        }
    }

    /// `call`, unless [`Abort::fire`] stops the wait first.
    async fn abortable<R>(&mut self, call: impl Future<Output = R>) -> Result<R, NoAnswer> {
        let Driver {
            connection, abort, ..
        } = self;
        let mut call = pin!(call);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(answer) = call.as_mut().poll(cx) {
                return Poll::Ready(Ok(answer));
            }
            if abort.poll_recv(cx).is_ready() {
                return Poll::Ready(Err(NoAnswer::Aborted));
            }
            drive_connection(connection, cx);
            // The connection may just have delivered the answer, or ended.
            match call.as_mut().poll(cx) {
                Poll::Ready(answer) => Poll::Ready(Ok(answer)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// `call` with the connection driven meanwhile, and no deadline of its own (the caller
    /// bounds it).
    async fn drive<R>(&mut self, call: impl Future<Output = R>) -> R {
        let connection = &mut self.connection;
        let mut call = pin!(call);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(answer) = call.as_mut().poll(cx) {
                return Poll::Ready(answer);
            }
            drive_connection(connection, cx);
            call.as_mut().poll(cx)
        })
        .await
    }
}

/// Polls the connection's I/O unless it has ended, and drops it when it ends. Its end
/// needs no handling here: the client's calls fail (a closed connection; the server's error
/// went to the call it answered).
fn drive_connection(connection: &mut Option<Connection>, cx: &mut std::task::Context<'_>) {
    if let Some(io) = connection {
        if io.as_mut().poll(cx).is_ready() {
            *connection = None;
        }
    }
}

/// Stops a call of a [`DeadlineClient`] from any thread; see [`DeadlineClient::abort`].
pub(crate) struct Abort {
    token: CancelToken,
    connector: Arc<Connector>,
    stop_wait: UnboundedSender<()>,
}

impl Abort {
    /// Sends the cancel request on a thread of its own (it opens a connection, which can
    /// hang as long as the fault that made us cancel), and releases the waiting caller now.
    pub(crate) fn fire(self) {
        let _ = self.stop_wait.send(());
        let Abort {
            token, connector, ..
        } = self;
        let spawned = thread::Builder::new()
            .name("mdbatch-cancel".to_owned())
            .spawn(move || {
                let sent = runtime()
                    .map_err(|err| err.to_string())
                    .and_then(|runtime| {
                        runtime
                            .block_on(connector.cancel(&token))
                            .map_err(|err| super::error::describe(&err))
                    });
                if let Err(error) = sent {
                    debug!(
                        application_name = connector.application_name(),
                        %error,
                        "PostgreSQL cancel request failed"
                    );
                }
            });
        if let Err(err) = spawned {
            debug!(error = %err, "cannot start a thread for a PostgreSQL cancel request");
        }
    }
}
