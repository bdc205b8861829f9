//! Injecting one fault of each [`Kind`] into the running [`Parts`], and what it took.
//!
//! | kind | what happens | lasts |
//! |---|---|---|
//! | crash-restart | the primary stopped with `-m immediate` (every process at once, as in a crash), then started again (crash recovery) | until it is ready |
//! | fast-restart | `pg_ctl restart -m fast`: sessions ended, the server back | until it is ready |
//! | terminate | `pg_terminate_backend` of every session of the batchers and subscribers | an instant |
//! | terminate-subscribers | the same, of the subscribers' sessions alone | an instant |
//! | failover | the primary stopped with `-m immediate`, the standby promoted; then the old primary rebuilt as the new standby (`pg_basebackup`), off the clock | until the promotion is done |
//! | black-hole | every proxy stops forwarding, sockets left open, new connections held | [`HELD`] |
//! | latency | every proxy holds every chunk [`LATENCY_ONE_WAY`] each way: a round trip 50 ms longer | [`LATENCY_FOR`] |
//! | lock | a session holds `LOCK TABLE ... IN EXCLUSIVE MODE` on the table (reads go on, writes wait) | [`HELD`] |
//! | read-only | `default_transaction_read_only = on` for every session (`ALTER SYSTEM`, reload) | [`HELD`] |
//! | freeze | SIGSTOP of the primary's every process: a machine that froze, not one that died | [`HELD`] |
//! | pooler-restart | the pgbouncer in front of the primary stopped (SIGINT: transactions in flight finish, every client is disconnected) and started again on its port | until it takes queries |
//!
//! Sleeping is the point here: a fault lasts a given time, while the batchers run.

use std::thread;
use std::time::{Duration, Instant};

use super::parts::{Parts, DBNAME};
use super::schedule::Kind;

/// How long the held faults last.
pub const HELD: Duration = Duration::from_secs(5);
/// The latency spike: 25 ms each way, a round trip 50 ms longer...
pub const LATENCY_ONE_WAY: Duration = Duration::from_millis(25);
/// ...for this long.
pub const LATENCY_FOR: Duration = Duration::from_secs(10);
/// The `application_name`s of the batchers' and subscribers' sessions start with this.
pub const SESSION_PREFIX: &str = "soak-r";

/// One fault as it happened.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: Kind,
    pub start: Instant,
    /// When the fault was over: the server ready, the proxy healed, the lock released.
    pub end: Instant,
    /// For a failover: how long `pg_ctl promote` took, and then the old primary's rebuild
    /// as the new standby.
    pub promotion: Option<Duration>,
    pub rejoin: Option<Duration>,
}

impl Fault {
    pub fn duration(&self) -> Duration {
        self.end - self.start
    }
}

/// Injects a fault of `kind` and returns once it is over.
pub fn inject(kind: Kind, parts: &mut Parts) -> Result<Fault, String> {
    let start = Instant::now();
    let (mut promotion, mut rejoin) = (None, None);
    match kind {
        Kind::CrashRestart => {
            let primary = parts.pair.primary_mut();
            primary.stop_immediate();
            primary.start();
        }
        Kind::FastRestart => parts.pair.primary_mut().restart(),
        Kind::Terminate => terminate(parts, &format!("{SESSION_PREFIX}%"))?,
        Kind::TerminateSubscribers => terminate(parts, &format!("{SESSION_PREFIX}% subscriber"))?,
        Kind::Failover => {
            parts.pair.primary_mut().stop_immediate();
            promotion = Some(parts.pair.promote());
        }
        Kind::BlackHole => {
            parts.proxies.black_hole()?;
            thread::sleep(HELD);
            parts.proxies.heal()?;
        }
        Kind::Latency => {
            parts.proxies.set_latency(LATENCY_ONE_WAY)?;
            thread::sleep(LATENCY_FOR);
            parts.proxies.set_latency(Duration::ZERO)?;
        }
        Kind::Lock => {
            let mut client = parts.pair.primary().socket_client(DBNAME, "soak fault");
            let mut transaction = client
                .transaction()
                .map_err(|err| format!("lock: BEGIN: {err}"))?;
            transaction
                .batch_execute("LOCK TABLE workspace_agent_metadata IN EXCLUSIVE MODE")
                .map_err(|err| format!("lock: LOCK TABLE: {err}"))?;
            thread::sleep(HELD);
            transaction
                .rollback()
                .map_err(|err| format!("lock: ROLLBACK: {err}"))?;
        }
        Kind::ReadOnly => {
            set_read_only(parts, true)?;
            thread::sleep(HELD);
            set_read_only(parts, false)?;
        }
        Kind::Freeze => {
            parts.pair.primary_mut().freeze();
            thread::sleep(HELD);
            parts.pair.primary_mut().thaw();
        }
        Kind::PoolerRestart => parts.restart_pooler()?,
    }
    let end = Instant::now();
    if kind == Kind::Failover {
        let rebuilding = Instant::now();
        parts.pair.rejoin();
        rejoin = Some(rebuilding.elapsed());
    }
    Ok(Fault {
        kind,
        start,
        end,
        promotion,
        rejoin,
    })
}

/// Terminates the primary's sessions whose `application_name` is `LIKE pattern`.
fn terminate(parts: &Parts, pattern: &str) -> Result<(), String> {
    parts
        .pair
        .primary()
        .admin()
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE $1",
            &[&pattern],
        )
        .map(|_| ())
        .map_err(|err| format!("pg_terminate_backend: {err}"))
}

/// `default_transaction_read_only` on the primary, for every session (existing sessions
/// take it at their next statement after the reload).
fn set_read_only(parts: &Parts, read_only: bool) -> Result<(), String> {
    let mut admin = parts.pair.primary().admin();
    let set = match read_only {
        true => "ALTER SYSTEM SET default_transaction_read_only = on",
        false => "ALTER SYSTEM RESET default_transaction_read_only",
    };
    // Separate statements: ALTER SYSTEM refuses to run in a batch's implicit transaction.
    // The SET first: a session opened while the server is read-only starts read-only.
    for sql in [
        "SET default_transaction_read_only = off",
        set,
        "SELECT pg_reload_conf()",
    ] {
        admin
            .batch_execute(sql)
            .map_err(|err| format!("read-only: {sql}: {err}"))?;
    }
    Ok(())
}
