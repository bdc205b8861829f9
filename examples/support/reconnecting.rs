//! [`Reconnecting`]: a blocking session of the examples' own (loadgen's admin and `--verify`
//! sessions, the demo's set-up and clean-up, the soak's checks) that opens a new connection
//! when its connection is lost, so a restart or a failover in the middle of a run does not
//! cost the summary, the verification or the clean-up.
//!
//! Each statement runs through [`Reconnecting::run`]: a statement that fails because the
//! connection is gone (closed, reset, terminated by an operator, or a server that turned
//! read-only under it) is tried again on a new connection, with a short pause between
//! attempts, for up to [`Reconnecting::new`]'s `patience`; any other error (bad SQL, a
//! constraint) is returned at once. Connections come from the crate's
//! [`connect_client`](metadata_batcher::postgres::connect_client), so a multi-host URL with
//! `target_session_attrs=read-write` finds the new primary after a failover.
//!
//! The statements given to `run` must be safe to run twice: one that failed with the
//! connection may or may not have committed.

#![allow(dead_code)] // each example uses a different part

use std::thread;
use std::time::{Duration, Instant};

use metadata_batcher::postgres::{self as pg, PgOptions};

/// The pause between attempts: long enough not to hammer a server that is restarting,
/// short next to a promotion.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// A session that reconnects; see the module docs.
pub struct Reconnecting {
    url: String,
    options: PgOptions,
    patience: Duration,
    client: Option<postgres::Client>,
}

impl Reconnecting {
    /// Connects to `url` with `options`, trying for up to `patience`; every later statement
    /// gets the same patience.
    pub fn new(url: &str, options: PgOptions, patience: Duration) -> Result<Reconnecting, String> {
        let mut session = Reconnecting {
            url: url.to_owned(),
            options,
            patience,
            client: None,
        };
        session.run("connecting", |_| Ok(()))?;
        Ok(session)
    }

    /// Runs `statement` on the session, on a new connection if the connection is lost;
    /// errors name `what`.
    pub fn run<T>(
        &mut self,
        what: &str,
        mut statement: impl FnMut(&mut postgres::Client) -> Result<T, postgres::Error>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + self.patience;
        loop {
            let failure = match self.client() {
                Ok(client) => match statement(client) {
                    Ok(value) => return Ok(value),
                    Err(err) if !connection_lost(client, &err) => {
                        return Err(format!("{what}: {}", describe(&err)));
                    }
                    Err(err) => {
                        self.client = None;
                        describe(&err)
                    }
                },
                Err(err) => err,
            };
            if Instant::now() + RETRY_PAUSE > deadline {
                return Err(format!(
                    "{what}: {failure} (still failing after {:?} of reconnecting)",
                    self.patience
                ));
            }
            // Waiting out a restart or a promotion: there is nothing to block on.
            thread::sleep(RETRY_PAUSE);
        }
    }

    fn client(&mut self) -> Result<&mut postgres::Client, String> {
        if self.client.is_none() {
            let client = pg::connect_client(&self.url, &self.options)
                .map_err(|err| format!("connecting: {err}"))?;
            self.client = Some(client);
        }
        self.client
            .as_mut()
            .ok_or_else(|| "no connection".to_owned())
    }
}

/// Whether `err` means the connection is gone (or on a server that no longer takes writes),
/// rather than a problem with the statement itself.
fn connection_lost(client: &postgres::Client, err: &postgres::Error) -> bool {
    if client.is_closed() {
        return true;
    }
    match err.as_db_error() {
        // No server error: an I/O error, a closed or timed-out connection.
        None => true,
        // 08: connection exception; 57: operator intervention (terminated, shutting down,
        // cannot connect now); 25006: read-only transaction (a demoted primary).
        Some(db) => {
            let code = db.code().code();
            code.starts_with("08") || code.starts_with("57") || code == "25006"
        }
    }
}

/// The server's message when there is one (`postgres::Error`'s `Display` says only "db
/// error").
fn describe(err: &postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => err.to_string(),
    }
}
