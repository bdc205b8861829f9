//! Test support for the PostgreSQL tests: every test gets a freshly created database of its
//! own, dropped when the test ends, so tests run in parallel and leave nothing behind.
//!
//! The server comes from `DATABASE_URL` (`scripts/ensure-postgres` prints one), else
//! `postgres://postgres@127.0.0.1:5432/postgres`. No server is a test failure, never a skip.
//!
//! Beside it, the harness of real parts the fault, TLS and pooler tests need, one per file:
//! [`cluster`] (a throwaway cluster of the test's own), [`certs`] (test certificates and a
//! TLS-only cluster), [`proxy`] (a TCP proxy that black-holes, and a server that never
//! answers), [`broken_tls`] (a front end whose TLS handshakes fail and whose plaintext is
//! forwarded), [`pgbouncer`] (a throwaway pooler), [`replication`] (a primary with a
//! synchronous standby, for failovers), and [`scratch`] (what they share).
#![allow(dead_code)] // each test file uses its own part of this module

pub mod broken_tls;
pub mod certs;
pub mod cluster;
pub mod pgbouncer;
#[path = "../../examples/support/pgbouncer_ini.rs"]
mod pgbouncer_ini;
pub mod proxy;
pub mod replication;
pub mod scratch;

// Re-exported for the test files that use them; the others do not.
#[allow(unused_imports)]
pub use broken_tls::{Breakage, BrokenTls};
#[allow(unused_imports)]
pub use certs::{Certs, TlsCluster, CERT_USER};
#[allow(unused_imports)]
pub use cluster::{Cluster, ClusterOptions};
#[allow(unused_imports)]
pub use pgbouncer::PgBouncer;
#[allow(unused_imports)]
pub use proxy::{ConnInfo, Proxy, SilentServer};

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use postgres::{Client, NoTls};
use uuid::Uuid;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The server's URL, as the tests were told.
pub fn server_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// `url` pointing at database `dbname` instead; works for URLs and `key=value` strings.
pub fn with_dbname(url: &str, dbname: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        // key=value: a later key overrides an earlier one.
        return format!("{url} dbname={dbname}");
    };
    let rest = &url[scheme_end + 3..];
    let query_at = rest.find('?').unwrap_or(rest.len());
    let path_at = rest[..query_at].find('/').unwrap_or(query_at);
    format!(
        "{}{}/{}{}",
        &url[..scheme_end + 3],
        &rest[..path_at],
        dbname,
        &rest[query_at..]
    )
}

/// `url` pointing at `host:port` instead; works for URLs and `key=value` strings.
pub fn with_host_port(url: &str, host: &str, port: u16) -> String {
    let Some(scheme_end) = url.find("://") else {
        // key=value: a later key overrides an earlier one.
        return format!("{url} host={host} port={port}");
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let host_at = rest[..authority_end].rfind('@').map_or(0, |at| at + 1);
    format!(
        "{}{}{host}:{port}{}",
        &url[..scheme_end + 3],
        &rest[..host_at],
        &rest[authority_end..]
    )
}

/// `url` with `key=value` added; a later parameter wins over an earlier one of the same key.
/// Works for URLs and `key=value` strings.
pub fn with_param(url: &str, key: &str, value: &str) -> String {
    match (url.contains("://"), url.contains('?')) {
        (false, _) => format!("{url} {key}={value}"),
        (true, true) => format!("{url}&{key}={value}"),
        (true, false) => format!("{url}?{key}={value}"),
    }
}

/// The TCP address of the first host and port `url` names (default port 5432).
pub fn server_addr(url: &str) -> SocketAddr {
    let config: postgres::Config = url.parse().expect("a valid server URL");
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(host)) => host.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    (host.as_str(), port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.find(SocketAddr::is_ipv4))
        .unwrap_or_else(|| panic!("cannot resolve {host}:{port} from {url}"))
}

/// Connects or fails the test with a message that says how to provide a server.
pub fn connect(url: &str, application_name: &str) -> Client {
    let mut config: postgres::Config = url.parse().expect("DATABASE_URL is not a valid URL");
    config.application_name(application_name);
    config.connect(NoTls).unwrap_or_else(|err| {
        panic!(
            "cannot connect to PostgreSQL at {url}: {err} ({:?}); run scripts/ensure-postgres \
             or set DATABASE_URL to a server where user may CREATE DATABASE",
            err.as_db_error().map(|db| db.message())
        )
    })
}

/// A database created for one test; dropped (with its connections) when this is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl TestDb {
    /// A fresh database with the crate's migration applied.
    pub fn new() -> TestDb {
        let db = TestDb::empty();
        let mut client = db.client("mb-test migrate");
        metadata_batcher::postgres::migrate(&mut client).expect("migrate");
        db
    }

    /// A fresh database without any table.
    pub fn empty() -> TestDb {
        let admin_url = server_url();
        let name = format!("mb_test_{}", Uuid::new_v4().simple());
        connect(&admin_url, "mb-test admin")
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("CREATE DATABASE");
        TestDb {
            url: with_dbname(&admin_url, &name),
            name,
            admin_url,
        }
    }

    /// A connection to this database, named so `pg_stat_activity` can find it.
    pub fn client(&self, application_name: &str) -> Client {
        connect(&self.url, application_name)
    }

    /// A connection to the server's maintenance database, for statements about this one.
    pub fn admin(&self) -> Client {
        connect(&self.admin_url, "mb-test admin")
    }

    /// Terminates this database's backends named `application_name` and waits until they
    /// are gone; returns how many there were.
    pub fn terminate(&self, application_name: &str) -> usize {
        let mut admin = self.admin();
        let rows = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND application_name = $2",
                &[&self.name, &application_name],
            )
            .expect("pg_terminate_backend");
        // pg_terminate_backend only signals the backend; polling the server (not the code
        // under test) with a deadline is the only way to know it has exited.
        wait_until("backend exits", || {
            self.backends(&mut admin, application_name) == 0
        });
        rows.len()
    }

    /// How many backends named `application_name` are connected to this database.
    pub fn backends(&self, admin: &mut Client, application_name: &str) -> i64 {
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
                &[&self.name, &application_name],
            )
            .expect("pg_stat_activity")
            .get(0)
    }

    /// Waits until a backend named `application_name` is blocked on a lock.
    pub fn wait_for_lock_wait(&self, application_name: &str) {
        let mut admin = self.admin();
        // The statement under test runs on another thread; only the server knows when it
        // reaches the lock, so poll pg_stat_activity with a deadline.
        wait_until("statement waits on the lock", || {
            lock_waiters(&mut admin, &self.name, application_name) > 0
        });
    }
}

/// How many backends of `database` named `application_name` wait on a lock, on the server
/// `admin` is connected to (tests running at once reuse names in databases of their own).
pub fn lock_waiters(admin: &mut Client, database: &str, application_name: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
             AND application_name = $2 AND wait_event_type = 'Lock'",
            &[&database, &application_name],
        )
        .expect("pg_stat_activity")
        .get(0)
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let dropped = postgres::Client::connect(&self.admin_url, NoTls).and_then(|mut admin| {
            admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
        });
        if let Err(err) = dropped {
            eprintln!("could not drop test database {}: {err:?}", self.name);
        }
    }
}

/// Polls `condition` every 10 ms for up to 10 s; panics naming `what` on timeout.
///
/// Only for the server's own state (a terminated backend gone from `pg_stat_activity`, a
/// statement waiting on a lock): the server offers nothing to block on for those. Waiting
/// for the batcher always goes through `sync`, `flush` or `close` instead.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        // Polling the server's own state, which offers nothing to block on (see above).
        thread::sleep(Duration::from_millis(10));
    }
}

/// A timestamp PostgreSQL stores exactly: whole microseconds.
pub fn micros(unix_micros: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_micros(unix_micros)
}

/// The stored row of (agent, key): value, error, collected_at.
pub fn row(client: &mut Client, agent_id: Uuid, key: &str) -> Option<(String, String, SystemTime)> {
    client
        .query_opt(
            "SELECT value, error, collected_at FROM workspace_agent_metadata \
             WHERE workspace_agent_id = $1 AND key = $2",
            &[&agent_id, &key],
        )
        .expect("select row")
        .map(|row| (row.get(0), row.get(1), row.get(2)))
}

/// How many rows the table holds.
pub fn row_count(client: &mut Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM workspace_agent_metadata", &[])
        .expect("count rows")
        .get(0)
}

/// A call running on a thread of its own, so that a test can bound how long it waits for a
/// call that may hang (a query into a black hole) and still collect it later.
pub struct Background<T> {
    result: std::sync::mpsc::Receiver<T>,
    started: Instant,
}

/// Runs `call` on a new thread named `name`. The thread is never joined: a call stuck in a
/// fault finishes (or fails) when the fault heals or its socket closes.
pub fn background<T: Send + 'static>(
    name: &str,
    call: impl FnOnce() -> T + Send + 'static,
) -> Background<T> {
    let (send, result) = std::sync::mpsc::channel();
    // Before the spawn: the call may start (and time out) before `spawn` returns.
    let started = Instant::now();
    thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _ = send.send(call());
        })
        .expect("spawn a background call");
    Background { result, started }
}

impl<T> Background<T> {
    /// The call's result if it returns within `limit`; `None` if it is still running.
    pub fn wait(&self, limit: Duration) -> Option<T> {
        self.result.recv_timeout(limit).ok()
    }

    /// The call's result, failing the test if it takes longer than `limit` from now.
    pub fn expect_within(&self, limit: Duration, what: &str) -> T {
        self.wait(limit)
            .unwrap_or_else(|| panic!("{what} did not return within {limit:?}"))
    }

    /// Time since the call started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}
