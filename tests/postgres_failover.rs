//! Failover to a promoted standby, with real parts only: a throwaway primary and its
//! synchronous streaming standby ([`pg::replication`]), a batcher with the PostgreSQL store
//! and publisher, and a subscriber, all on one URL that lists both hosts with
//! `target_session_attrs=read-write`.
//!
//! - a failover under load (the primary crashed, the standby promoted): nothing is lost,
//!   every row ends at its newest value, and the subscriber reports `Reconnected`, then
//!   hears the agents written after the failover; the old primary then rejoins as the new
//!   standby and the pair fails over again;
//! - the standby promoted while the old primary is frozen (SIGSTOP), not dead: the
//!   deadlines give up on every frozen session and the per-host `connect_timeout` moves
//!   each one to the new primary;
//! - a URL (or a `Config`) that lists the standby first: it is skipped, never written to.
//!
//! Updates come from a loader thread at a steady pace while the faults happen; the test
//! waits for its rounds, for `close`, and for the servers' own state, never for a timer.
//! Every test bounds its own time, and dropping the pair stops both servers, also on panic.

mod pg;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use metadata_batcher::postgres::{
    self as mbpg, PgOptions, PgPublisher, PgStore, PgSubscriber, SubscriberEvent,
};
use metadata_batcher::{Batcher, Metadata, METADATA_BATCH_CHANNEL};
use pg::replication::ReplicatedPair;
use pg::{micros, row, wait_until};
use uuid::Uuid;

const AGENTS: u64 = 200;
const KEYS: [&str; 5] = ["cpu", "mem", "disk", "load", "net"];
/// The loader's pace: one round (every agent, every key) per tick, 20,000 updates/s.
const TICK: Duration = Duration::from_millis(50);
/// How long any one wait of these tests may take before the test fails.
const BOUND: Duration = Duration::from_secs(30);

fn agent(i: u64) -> Uuid {
    Uuid::from_u128(0xfa11_0000_0000_0000_0000_0000_0000_0000 | u128::from(i))
}

fn agents() -> Vec<Uuid> {
    (0..AGENTS).map(agent).collect()
}

/// Round `round`'s value of agent `i`'s keys, and when it was collected (later each round).
fn value(round: u64) -> String {
    format!("round-{round}")
}

fn collected_at(round: u64, i: u64) -> SystemTime {
    micros(1_765_000_000_000_000 + round * 1_000 + i)
}

/// Short bounds, so a failover costs seconds: what the operations docs advise for a URL
/// with several hosts.
fn options(role: &str) -> PgOptions {
    PgOptions::new()
        .application_name(format!("failover {role}"))
        .connect_timeout(Duration::from_secs(1))
        .statement_timeout(Duration::from_secs(1))
        .deadline_margin(Duration::from_millis(300))
        .subscriber_heartbeat(Duration::from_secs(1))
}

fn batcher(url: &str) -> Arc<Batcher> {
    let store = PgStore::open(url, options("store")).expect("store");
    let publisher = PgPublisher::open(url, options("publisher")).expect("publisher");
    Arc::new(
        Batcher::builder(store, publisher)
            .interval(Duration::from_millis(100))
            .batch_size(500)
            .max_pending(100_000)
            .channel_capacity(100_000)
            .retry_backoff(Duration::from_millis(50), Duration::from_millis(500))
            .final_flush_timeout(BOUND)
            .build()
            .expect("batcher"),
    )
}

fn register(pair: &ReplicatedPair, dbname: &str) {
    let mut client = pair.primary().socket_client(dbname, "mb-test register");
    mbpg::register_agents(&mut client, &agents(), &KEYS).expect("register agents");
}

/// Adds a round of every agent's keys each [`TICK`] until stopped; reports each round it
/// finished.
struct Loader {
    stop: Arc<AtomicBool>,
    rounds: Receiver<u64>,
    last: u64,
    thread: Option<JoinHandle<()>>,
}

impl Loader {
    /// Rounds after `after` (collected later than any earlier round's).
    fn start(batcher: Arc<Batcher>, after: u64) -> Loader {
        let stop = Arc::new(AtomicBool::new(false));
        let (round_tx, rounds) = channel();
        let thread_stop = stop.clone();
        let thread = thread::Builder::new()
            .name("failover loader".into())
            .spawn(move || {
                let ids = agents();
                let mut round = after;
                while !thread_stop.load(Ordering::SeqCst) {
                    round += 1;
                    for (i, id) in ids.iter().enumerate() {
                        let metadata = KEYS
                            .iter()
                            .map(|key| {
                                Metadata::new(*key, value(round), "", collected_at(round, i as u64))
                            })
                            .collect();
                        let report = batcher.add(*id, metadata).expect("add");
                        assert_eq!(report.dropped, 0, "an update was dropped");
                    }
                    if round_tx.send(round).is_err() {
                        return;
                    }
                    // The load's pace, not a wait for the batcher.
                    thread::sleep(TICK);
                }
            })
            .expect("spawn the loader");
        Loader {
            stop,
            rounds,
            last: after,
            thread: Some(thread),
        }
    }

    /// Waits until `more` rounds beyond the last one seen are added.
    fn wait_rounds(&mut self, more: u64) {
        let target = self.last + more;
        while self.last < target {
            self.last = self
                .rounds
                .recv_timeout(BOUND)
                .expect("the loader stopped adding");
        }
    }

    /// Stops the loader; returns the last round it added.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the loader panicked");
        }
        while let Ok(round) = self.rounds.try_recv() {
            self.last = round;
        }
        self.last
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// What a subscriber heard, in order.
#[derive(Debug, Clone, PartialEq)]
enum Heard {
    Agents(Vec<Uuid>),
    Reconnected,
}

/// A subscriber on a thread of its own, recording what it hears until stopped.
struct Listener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Heard>>>,
}

impl Listener {
    fn start(url: &str) -> Listener {
        let mut subscriber = PgSubscriber::open(url, METADATA_BATCH_CHANNEL, options("subscriber"))
            .expect("subscriber");
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = thread::Builder::new()
            .name("failover listener".into())
            .spawn(move || {
                let mut heard = Vec::new();
                while !thread_stop.load(Ordering::SeqCst) {
                    match subscriber.next(Duration::from_millis(200)) {
                        Ok(Some(SubscriberEvent::Agents(agents))) => {
                            heard.push(Heard::Agents(agents))
                        }
                        Ok(Some(SubscriberEvent::Reconnected)) => heard.push(Heard::Reconnected),
                        Ok(Some(other)) => panic!("an event this test does not know: {other:?}"),
                        // A quiet spell, or still reconnecting: it keeps trying.
                        Ok(None) | Err(_) => {}
                    }
                }
                heard
            })
            .expect("spawn the listener");
        Listener {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Vec<Heard> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .map(|thread| thread.join().expect("the listener panicked"))
            .unwrap_or_default()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Every agent announced among `heard`.
fn agents_in(heard: &[Heard]) -> HashSet<Uuid> {
    heard
        .iter()
        .filter_map(|event| match event {
            Heard::Agents(agents) => Some(agents.iter().copied()),
            Heard::Reconnected => None,
        })
        .flatten()
        .collect()
}

/// The subscriber reported `Reconnected`, then heard every agent.
fn assert_reconnected_then_heard_everyone(heard: &[Heard]) {
    let reconnected = heard
        .iter()
        .position(|event| *event == Heard::Reconnected)
        .unwrap_or_else(|| panic!("no Reconnected among {} events", heard.len()));
    let after = agents_in(&heard[reconnected..]);
    let missing = agents().iter().filter(|id| !after.contains(id)).count();
    assert_eq!(missing, 0, "agents not heard after Reconnected");
}

/// Every row of the database holds round `round`'s value, on the server of `client`.
fn assert_newest(client: &mut postgres::Client, round: u64) {
    for (i, id) in agents().iter().enumerate() {
        for key in KEYS {
            let stored = row(client, *id, key).expect("a registered row");
            assert_eq!(
                (stored.0.as_str(), stored.2),
                (value(round).as_str(), collected_at(round, i as u64)),
                "agent {i} key {key}"
            );
        }
    }
}

/// Closes the batcher: everything written, within the bound.
fn close_all_written(batcher: &Batcher) {
    let report = batcher.close();
    assert_eq!(report.unwritten, 0, "{report:?}");
    assert!(!report.deadline_hit, "{report:?}");
    let stats = batcher.stats();
    assert_eq!(
        stats.dropped + stats.retention_dropped + stats.rejected,
        0,
        "{stats:?}"
    );
}

/// How many sessions named `failover {role}` the server of `client` has.
fn sessions(client: &mut postgres::Client, role: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&format!("failover {role}")],
        )
        .expect("pg_stat_activity")
        .get(0)
}

/// A pair with database `dbname`, a subscriber, a batcher and its loader 10 rounds in.
fn under_load(dbname: &str) -> (ReplicatedPair, String, Listener, Arc<Batcher>, Loader) {
    let pair = ReplicatedPair::start(None);
    let url = pair.create_migrated_db(dbname);
    register(&pair, dbname);
    let listener = Listener::start(&url);
    let batcher = batcher(&url);
    let mut loader = Loader::start(batcher.clone(), 0);
    loader.wait_rounds(10);
    (pair, url, listener, batcher, loader)
}

#[test]
fn a_failover_under_load_loses_nothing_and_the_subscriber_hears_the_new_primary() {
    let (mut pair, url, listener, batcher, mut loader) = under_load("failover");
    pair.primary_mut().stop_immediate();
    let promotion = pair.promote();
    eprintln!("promotion took {promotion:?}");
    // Rounds added after the promotion: written to, and announced by, the new primary.
    loader.wait_rounds(20);
    let last = loader.stop();
    close_all_written(&batcher);
    let stats = batcher.stats();
    assert!(
        stats.store_errors > 0,
        "the crash cost no store call? {stats:?}"
    );
    assert_newest(
        &mut pair.primary().socket_client("failover", "mb-test check"),
        last,
    );
    // The subscriber hears a flush within a round trip or so; the listener's own waits
    // are 200 ms, so one more round (written, announced) before stopping it is plenty.
    assert_reconnected_then_heard_everyone(&listener.stop());

    // The old primary rejoins as the standby, with every row; then the pair fails over
    // again, and a fresh batcher on the same URL writes to the third primary.
    pair.rejoin();
    let mut replica = pair.standby().socket_client("failover", "mb-test check");
    assert_newest(&mut replica, last);
    pair.fail_over();
    let batcher = self::batcher(&url);
    let mut loader = Loader::start(batcher.clone(), last);
    loader.wait_rounds(3);
    let last = loader.stop();
    close_all_written(&batcher);
    assert_newest(
        &mut pair.primary().socket_client("failover", "mb-test check"),
        last,
    );
}

#[test]
fn a_standby_promoted_while_the_primary_is_frozen_gets_every_session_by_the_deadlines() {
    let (mut pair, _, listener, batcher, mut loader) = under_load("frozen");
    let frozen_at = Instant::now();
    pair.primary_mut().freeze();
    let promotion = pair.promote();
    // The frozen sessions are given up at their deadlines (statement 1 s + margin 0.3 s, or
    // the subscriber's heartbeat 1 s + connect_timeout 1 s); each reconnect waits
    // connect_timeout (1 s) on the frozen host, then reaches the new one. Only the server
    // knows when a session arrives: poll it.
    let mut admin = pair.primary().admin();
    let deadline = Instant::now() + BOUND;
    while ["store", "publisher", "subscriber"]
        .iter()
        .any(|role| sessions(&mut admin, role) == 0)
    {
        assert!(
            Instant::now() < deadline,
            "not every session reached the new primary within {BOUND:?}"
        );
        // The server's own state; there is nothing to block on.
        thread::sleep(Duration::from_millis(20));
    }
    let moved = frozen_at.elapsed();
    eprintln!(
        "promotion took {promotion:?}; every session on the new primary {moved:?} after the freeze"
    );
    assert!(
        moved < promotion + Duration::from_secs(8),
        "sessions took {moved:?} to move"
    );
    loader.wait_rounds(20);
    let last = loader.stop();
    close_all_written(&batcher);
    assert_newest(
        &mut pair.primary().socket_client("frozen", "mb-test check"),
        last,
    );
    assert_reconnected_then_heard_everyone(&listener.stop());
}

#[test]
fn a_standby_listed_first_is_skipped_and_never_written_to() {
    let pair = ReplicatedPair::start(None);
    pair.create_migrated_db("skipped");
    register(&pair, "skipped");
    let (primary, standby) = (pair.primary().port(), pair.standby().port());
    assert!(pair.standby().is_in_recovery());
    let url = format!(
        "postgres://postgres@127.0.0.1:{standby},127.0.0.1:{primary}/skipped\
         ?target_session_attrs=read-write"
    );
    let mut config = postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(standby)
        .host("127.0.0.1")
        .port(primary)
        .user("postgres")
        .dbname("skipped")
        .target_session_attrs(postgres::config::TargetSessionAttrs::ReadWrite);

    // One batcher and subscriber from the URL, one from the Config: each round goes
    // through one of them.
    let from_url = (batcher(&url), Listener::start(&url));
    let from_config = {
        let store = PgStore::open_config(config.clone(), postgres::NoTls, options("store"))
            .expect("store from a Config");
        let publisher =
            PgPublisher::open_config(config.clone(), postgres::NoTls, options("publisher"))
                .expect("publisher from a Config");
        let subscriber = PgSubscriber::open_config(
            config,
            postgres::NoTls,
            METADATA_BATCH_CHANNEL,
            options("subscriber"),
        )
        .expect("subscriber from a Config");
        let batcher = Batcher::builder(store, publisher)
            .build()
            .expect("batcher from a Config");
        (batcher, subscriber)
    };
    let ids = agents();
    for (round, batcher) in [(1, &*from_url.0), (2, &from_config.0)] {
        for (i, id) in ids.iter().enumerate() {
            let metadata = KEYS
                .iter()
                .map(|key| Metadata::new(*key, value(round), "", collected_at(round, i as u64)))
                .collect();
            batcher.add(*id, metadata).expect("add");
        }
        batcher.flush().expect("a flush");
        let stats = batcher.stats();
        assert_eq!(stats.flushed, (ids.len() * KEYS.len()) as u64, "{stats:?}");
        assert_eq!(
            (stats.store_errors, stats.publish_errors),
            (0, 0),
            "{stats:?}"
        );
    }
    let mut subscriber = from_config.1;
    let mut heard = HashSet::new();
    let deadline = Instant::now() + BOUND;
    while heard.len() < ids.len() {
        assert!(
            Instant::now() < deadline,
            "the Config's subscriber heard {} agents",
            heard.len()
        );
        if let Ok(Some(SubscriberEvent::Agents(agents))) =
            subscriber.next(Duration::from_millis(200))
        {
            heard.extend(agents);
        }
    }
    close_all_written(&from_url.0);
    close_all_written(&from_config.0);
    let url_heard = from_url.1.stop();
    let url_agents = agents_in(&url_heard);
    assert_eq!(
        url_agents.len(),
        ids.len(),
        "the URL's subscriber heard everyone"
    );

    assert_newest(
        &mut pair.primary().socket_client("skipped", "mb-test check"),
        2,
    );
    // The standby never held one of the crate's sessions past the read-write check (each
    // rejected attempt closes at once), and it has every row by replication only.
    let mut on_standby = pair.standby().admin();
    for role in ["store", "publisher", "subscriber"] {
        assert_eq!(sessions(&mut on_standby, role), 0, "{role} on the standby");
    }
    wait_until("the standby replays the last round", || {
        row(
            &mut pair.standby().socket_client("skipped", "mb-test check"),
            agent(AGENTS - 1),
            "net",
        )
        .is_some_and(|stored| stored.0 == value(2))
    });
    assert!(pair.standby().is_in_recovery());
}
