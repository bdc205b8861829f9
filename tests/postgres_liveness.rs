//! Liveness under real faults (issue 10): every database call bounded on the client side,
//! progress under a slow database or a locked row, publishing never holding back writes.
//!
//! The faults are real: a TCP proxy that black-holes connections, a server that accepts TCP
//! and never answers, a throwaway cluster of the test's own (restarted, stopped with
//! `-m immediate`, SIGSTOPped, out of connection slots), and, on the main test server in a
//! database of each test's own, a locked row, a locked table, a read-only database and a
//! slow trigger. The batcher's timers run on a `MockClock`; flushes are driven with
//! `flush()`, each on a background thread with a deadline, so that a call that hangs fails
//! its test instead of hanging it.
//!
//! Each test asserts that the newest accepted value of every key ends up stored (or is
//! counted where it was dropped), that every wait is bounded as the issue states, and that
//! `health()` shows the trouble while it lasts. Each prints (`--nocapture`) the time to
//! detect the fault and the time to recover once it heals.

mod pg;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use metadata_batcher::agent_ids::encode_chunks;
use metadata_batcher::postgres::{
    self as mbpg, PgOptions, PgPublisher, PgStore, PgSubscriber, SubscriberEvent,
};
use metadata_batcher::{
    Batcher, FlushReport, Metadata, MetadataBatch, MockClock, Publisher, Store, StoreErrorKind,
    Written, METADATA_BATCH_CHANNEL,
};
use pg::{background, micros, Cluster, ClusterOptions, Proxy, SilentServer, TestDb};
use postgres::Client;
use uuid::Uuid;

/// The session's statement timeout in every test: short, so that the bounds below are too.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(1);
/// The connect timeout in every test.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// What a client-side deadline may add to a timeout: cancel, close, scheduling on a loaded
/// two-core machine.
const MARGIN: Duration = Duration::from_secs(1);
/// The longest one flush may take under a fault: a statement hitting its deadline, then a
/// reconnect attempt hitting the connect timeout, plus the margin.
const FLUSH_BOUND: Duration = STATEMENT_TIMEOUT
    .saturating_add(CONNECT_TIMEOUT)
    .saturating_add(MARGIN);
/// How long a test keeps flushing for progress (or recovery) before it fails.
const PROGRESS_LIMIT: Duration = Duration::from_secs(10);
/// The batcher's interval; only the mock clock sees it.
const INTERVAL: Duration = Duration::from_secs(5);
const BATCH_SIZE: usize = 500;

fn agent(test: u128, i: usize) -> Uuid {
    Uuid::from_u128(0x11fe_0000_0000_0000_0000_0000_0000_0000 | test << 64 | i as u128)
}

fn at(round: u64, i: usize) -> SystemTime {
    micros(1_764_000_000_000_000 + round * 1_000_000 + i as u64)
}

/// The lock timeout in every test: well below the statement timeout, as the docs advise.
const LOCK_TIMEOUT: Duration = Duration::from_millis(200);
/// What the client-side deadline adds to the statement timeout in every test.
const DEADLINE_MARGIN: Duration = Duration::from_millis(300);

fn options(application_name: &str) -> PgOptions {
    PgOptions::new()
        .statement_timeout(STATEMENT_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .lock_timeout(LOCK_TIMEOUT)
        .deadline_margin(DEADLINE_MARGIN)
        .application_name(application_name)
}

/// One service replica: a batcher over a `PgStore` and a `PgPublisher`, on a mock clock.
struct Replica {
    batcher: Arc<Batcher>,
    clock: MockClock,
    ids: Vec<Uuid>,
    name: String,
}

impl Replica {
    /// Connects the store to `store_url` and the publisher to `publisher_url`, named
    /// `<name> store` and `<name> publisher` in `pg_stat_activity` and the proxy.
    fn new(name: &str, store_url: &str, publisher_url: &str, ids: Vec<Uuid>) -> Replica {
        let store = PgStore::connect_with(store_url, options(&format!("{name} store")))
            .expect("the store connects before the fault");
        let publisher =
            PgPublisher::connect_with(publisher_url, options(&format!("{name} publisher")))
                .expect("the publisher connects before the fault");
        let clock = MockClock::new();
        let batcher = Batcher::builder(store, publisher)
            .clock(clock.clone())
            .interval(INTERVAL)
            .batch_size(BATCH_SIZE)
            .max_pending(20_000)
            .channel_capacity(100_000)
            .build()
            .unwrap();
        Replica {
            batcher: Arc::new(batcher),
            clock,
            ids,
            name: name.to_owned(),
        }
    }

    /// Every agent's key `k` set to `v<round>`, collected in `round`.
    fn add_round(&self, round: u64) {
        for (i, id) in self.ids.iter().enumerate() {
            let metadata = vec![Metadata::new("k", format!("v{round}"), "", at(round, i))];
            assert_eq!(self.batcher.add(*id, metadata).unwrap().dropped, 0);
        }
    }

    /// A manual flush that must return within `limit`; its report and how long it took.
    fn flush_within(&self, limit: Duration, what: &str) -> (Option<FlushReport>, Duration) {
        let batcher = self.batcher.clone();
        let started = Instant::now();
        let flush = background("liveness flush", move || batcher.flush());
        match flush.wait(limit) {
            Some(report) => (report, started.elapsed()),
            None => panic!(
                "{}: {what}: flush still running after {limit:?} (stats {:?}, health {:?})",
                self.name,
                self.batcher.stats(),
                self.batcher.health()
            ),
        }
    }

    /// Flushes (each call within `FLUSH_BOUND`) until `done` holds, for at most
    /// `PROGRESS_LIMIT`; how long it took.
    fn flush_until(&self, what: &str, mut done: impl FnMut() -> bool) -> Duration {
        let started = Instant::now();
        loop {
            self.flush_within(FLUSH_BOUND, what);
            if done() {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < PROGRESS_LIMIT,
                "{}: {what}: not done after {:?} of flushing (stats {:?}, health {:?})",
                self.name,
                started.elapsed(),
                self.batcher.stats(),
                self.batcher.health()
            );
        }
    }

    /// The flush under a fault: it must return within `FLUSH_BOUND` having failed, and
    /// `health()` must say so. Returns how long detection took.
    fn expect_failed_flush(&self, what: &str) -> Duration {
        let (report, took) = self.flush_within(FLUSH_BOUND, what);
        let health = self.batcher.health();
        assert!(
            health.consecutive_store_failures > 0,
            "{}: {what}: health shows no failure after a flush under the fault: {health:?}, \
             report {report:?}",
            self.name
        );
        took
    }

    /// Nothing was lost: no drop of any kind was counted, and nothing is left pending.
    fn assert_nothing_lost(&self) {
        let stats = self.batcher.stats();
        assert_eq!(
            (
                stats.dropped,
                stats.retention_dropped,
                stats.rejected,
                stats.batched
            ),
            (0, 0, 0, 0),
            "{}: {stats:?}",
            self.name
        );
        assert_eq!(self.batcher.health().consecutive_store_failures, 0);
    }
}

/// Runs its closure when dropped: heals a fault before the batcher (declared earlier, so
/// dropped later) closes, so that a failing assertion never leaves `close` waiting on a
/// call stuck in the fault.
struct Heal<F: FnMut()>(F);

impl<F: FnMut()> Drop for Heal<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// How many rows hold `v<round>`.
fn stored(client: &mut Client, round: u64) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM workspace_agent_metadata WHERE value = $1",
            &[&format!("v{round}")],
        )
        .expect("count rows")
        .get(0)
}

fn report(test: &str, detected: Duration, recovered: Duration) {
    eprintln!("liveness {test}: detected in {detected:.2?}; recovered {recovered:.2?} after the fault healed");
}

/// Announces `agent` on the batch channel, as a replica's publisher does after a flush.
fn announce(publisher: &mut PgPublisher, agent: Uuid) {
    publisher
        .publish(METADATA_BATCH_CHANNEL, &encode_chunks(&[agent])[0])
        .unwrap();
}

/// A database on the main server with `n` agents registered (key `k`).
fn main_db(test: u128, n: usize) -> (TestDb, Vec<Uuid>, Client) {
    let db = TestDb::new();
    let ids: Vec<Uuid> = (0..n).map(|i| agent(test, i)).collect();
    let mut check = db.client("liveness check");
    mbpg::register_agents(&mut check, &ids, &["k"]).unwrap();
    (db, ids, check)
}

/// A throwaway cluster with a migrated database `live` and `n` agents registered.
fn cluster_db(test: u128, n: usize, options: ClusterOptions) -> (Cluster, String, Vec<Uuid>) {
    let cluster = Cluster::with_options(options);
    let url = cluster.create_migrated_db("live");
    let ids: Vec<Uuid> = (0..n).map(|i| agent(test, i)).collect();
    mbpg::register_agents(
        &mut cluster.socket_client("live", "liveness check"),
        &ids,
        &["k"],
    )
    .unwrap();
    (cluster, url, ids)
}

// ---------------------------------------------------------------------------------------
// A TCP proxy in front of the main server.

#[test]
fn black_holed_store_connection_fails_fast_and_a_new_connection_takes_over() {
    let (db, ids, mut check) = main_db(1, 50);
    let proxy = Proxy::in_front_of(&db.url);
    let url = proxy.url(&db.url);
    let r = Replica::new("live-a", &url, &url, ids);
    let _heal = Heal(|| proxy.heal_all());
    r.add_round(0);
    r.flush_within(FLUSH_BOUND, "before the fault");
    assert_eq!(stored(&mut check, 0), 50);

    assert_eq!(proxy.black_hole_named("live-a store"), 1);
    let fault = Instant::now();
    r.add_round(1);
    r.expect_failed_flush("store connection black-holed");
    let detected = fault.elapsed();
    assert_eq!(stored(&mut check, 1), 0);

    // The old connection stays black-holed: the next flushes must use a new one.
    let healed = Instant::now();
    r.flush_until("writing on a new connection", || {
        stored(&mut check, 1) == 50
    });
    report("store connection black-holed", detected, healed.elapsed());
    r.assert_nothing_lost();
}

/// A session given up on is closed at once, socket and all: a proxy that accepts and holds
/// (or a stopped backend) never answers, and a long silence must not collect a session per
/// retry. Each call below gives one session up; none stays open, and once the path works
/// again (new connections go through, the old ones would stay frozen) the next call writes
/// at once.
#[test]
fn a_long_silence_holds_no_session_and_the_next_call_writes_once_the_path_works() {
    const NAME: &str = "live-silence store";
    let (db, ids, mut check) = main_db(15, 1);
    let proxy = Proxy::in_front_of(&db.url);
    let _heal = Heal(|| proxy.heal_all());
    let store = Arc::new(parking_lot::Mutex::new(
        PgStore::open(&proxy.url(&db.url), options(NAME)).expect("connects before the fault"),
    ));
    let write = |round: u64| {
        let store = store.clone();
        let mut batch = MetadataBatch::default();
        batch.push(
            ids[0],
            Metadata::new("k", format!("v{round}"), "", at(round, 0)),
        );
        let call = background("liveness store call", move || {
            store.lock().batch_update(&batch)
        });
        let result = call.expect_within(FLUSH_BOUND, "a store call");
        (result, call.elapsed())
    };
    assert_eq!(write(0).0, Ok(Written::rows(1)));
    // The count sees the session in use.
    assert_eq!(proxy.client_sockets(), 1);

    proxy.black_hole_all();
    let mut took = Vec::new();
    for round in 1..=6 {
        let (result, elapsed) = write(round);
        assert!(
            result
                .as_ref()
                .is_err_and(|e| e.kind() == StoreErrorKind::Unavailable),
            "round {round}: {result:?}"
        );
        took.push(elapsed);
    }
    // Six sessions were given up on (the one open when the hole opened, and one opened into
    // it per call), each closed by the store as it gave up: no socket of ours is left on
    // the proxy. (The cancel requests' connections are closed by now too: each gave up
    // within the connect timeout, before the next call ended.)
    assert_eq!(proxy.client_sockets(), 0, "{:?}", proxy.connections());

    // What is open now stays frozen; a new connection reaches the server.
    proxy.freeze_existing();
    let (result, elapsed) = write(7);
    assert_eq!(result, Ok(Written::rows(1)));
    assert!(elapsed < CONNECT_TIMEOUT, "{elapsed:?}");
    assert_eq!(stored(&mut check, 7), 1);
    eprintln!(
        "liveness long silence: 6 sessions given up on, none left open; calls took {:.2?} at \
         most; the next call wrote in {elapsed:.2?} once the path worked",
        took.iter().max().unwrap(),
    );
}

#[test]
fn everything_black_holed_fails_fast_and_recovers_after_the_heal() {
    let (db, ids, mut check) = main_db(2, 50);
    let proxy = Proxy::in_front_of(&db.url);
    let url = proxy.url(&db.url);
    let r = Replica::new("live-b", &url, &url, ids);
    let _heal = Heal(|| proxy.heal_all());
    r.add_round(0);
    r.flush_within(FLUSH_BOUND, "before the fault");

    proxy.black_hole_all();
    let fault = Instant::now();
    r.add_round(1);
    r.expect_failed_flush("everything black-holed, on the open session");
    let detected = fault.elapsed();
    // The next flush connects into the black hole: bounded by connect_timeout.
    r.expect_failed_flush("everything black-holed, reconnecting");
    assert!(r.batcher.health().consecutive_store_failures >= 2);

    proxy.heal_all();
    let healed = Instant::now();
    r.flush_until("after the heal", || stored(&mut check, 1) == 50);
    report("all connections black-holed", detected, healed.elapsed());
    r.assert_nothing_lost();
}

#[test]
fn black_holed_notify_connection_does_not_hold_back_writes() {
    let (db, ids, mut check) = main_db(3, 50);
    let proxy = Proxy::in_front_of(&db.url);
    // Only the publisher goes through the proxy.
    let r = Replica::new("live-c", &db.url, &proxy.url(&db.url), ids);
    let _heal = Heal(|| proxy.heal_all());
    r.add_round(0);
    r.flush_within(FLUSH_BOUND, "before the fault");

    assert_eq!(proxy.black_hole_named("live-c publisher"), 1);
    let fault = Instant::now();
    r.add_round(1);
    r.flush_within(FLUSH_BOUND, "publisher black-holed, first write");
    assert_eq!(
        stored(&mut check, 1),
        50,
        "the write does not wait for NOTIFY"
    );
    r.add_round(2);
    r.flush_within(FLUSH_BOUND, "publisher black-holed, next write");
    assert_eq!(stored(&mut check, 2), 50, "nor does the next one");
    // `sync` returns once every flush is announced, the failed publish included, which the
    // publisher's deadline (on the wall clock, not the mock clock) ends.
    let batcher = r.batcher.clone();
    background("liveness sync", move || batcher.sync()).expect_within(FLUSH_BOUND, "sync");
    assert!(
        r.batcher.stats().publish_errors > 0,
        "a black-holed NOTIFY not counted in publish_errors: {:?}",
        r.batcher.stats()
    );
    let detected = fault.elapsed();

    proxy.heal_all();
    let healed = Instant::now();
    r.add_round(3);
    r.flush_until("after the heal", || stored(&mut check, 3) == 50);
    report("NOTIFY connection black-holed", detected, healed.elapsed());
    r.assert_nothing_lost();
}

#[test]
fn a_server_that_never_answers_fails_every_connect_within_connect_timeout() {
    let silent = SilentServer::start();
    let bound = CONNECT_TIMEOUT + MARGIN;
    let url = silent.url();
    let store = background("store connect", {
        let url = url.clone();
        move || PgStore::connect_with(&url, options("live-d store")).map(|_| ())
    });
    let publisher = background("publisher connect", {
        let url = url.clone();
        move || PgPublisher::connect_with(&url, options("live-d publisher")).map(|_| ())
    });
    let subscriber = background("subscriber listen", move || {
        PgSubscriber::listen_with(&url, METADATA_BATCH_CHANNEL, options("live-d subscriber"))
            .map(|_| ())
    });
    // All three run at once; each gets the bound from its own start.
    let mut failures = Vec::new();
    for (what, result) in [
        (
            "PgStore::connect_with",
            store.wait(bound).map(|r| r.is_err()),
        ),
        (
            "PgPublisher::connect_with",
            publisher
                .wait(bound.saturating_sub(publisher.elapsed()))
                .map(|r| r.is_err()),
        ),
        (
            "PgSubscriber::listen_with",
            subscriber
                .wait(bound.saturating_sub(subscriber.elapsed()))
                .map(|r| r.is_err()),
        ),
    ] {
        match result {
            Some(true) => eprintln!("liveness silent server: {what} failed within {bound:?}"),
            Some(false) => failures.push(format!("{what} succeeded against a silent server")),
            None => failures.push(format!("{what} still waiting after {bound:?}")),
        }
    }
    assert!(silent.accepted() >= 1);
    assert!(failures.is_empty(), "{failures:?}");
}

#[test]
fn subscriber_next_stays_bounded_while_reconnecting_into_a_black_hole() {
    let db = TestDb::new();
    let proxy = Proxy::in_front_of(&db.url);
    let _heal = Heal(|| proxy.heal_all());
    let mut subscriber = PgSubscriber::listen_with(
        &proxy.url(&db.url),
        METADATA_BATCH_CHANNEL,
        options("live-d subscriber"),
    )
    .unwrap();
    let id = proxy.wait_for_connection("live-d subscriber");
    // Everything new goes into the hole; the open session is cut, so the subscriber must
    // reconnect, into the hole.
    proxy.black_hole_all();
    proxy.close(id);
    let fault = Instant::now();
    let wait = Duration::from_secs(2);
    let bound = wait + Duration::from_millis(500);
    let mut subscriber = {
        let next = background("subscriber next", move || {
            let result = subscriber.next(wait);
            (result, subscriber)
        });
        let (result, subscriber) = next.wait(bound).unwrap_or_else(|| {
            panic!("PgSubscriber::next({wait:?}) still blocked after {bound:?}, reconnecting into a black hole")
        });
        assert!(
            !matches!(result, Ok(Some(SubscriberEvent::Reconnected))),
            "reconnected through a black hole? {result:?}"
        );
        subscriber
    };
    let detected = fault.elapsed();

    proxy.heal_all();
    let healed = Instant::now();
    loop {
        let started = Instant::now();
        let event = subscriber.next(wait);
        assert!(
            started.elapsed() < bound,
            "next({wait:?}) took {:?}",
            started.elapsed()
        );
        if matches!(event, Ok(Some(SubscriberEvent::Reconnected))) {
            break;
        }
        assert!(
            healed.elapsed() < PROGRESS_LIMIT,
            "not reconnected {:?} after the heal: {event:?}",
            healed.elapsed()
        );
    }
    report(
        "subscriber reconnecting into a black hole",
        detected,
        healed.elapsed(),
    );
}

/// A `LISTEN` session that goes silent (the proxy holds it: no error, no close, and the
/// kernel's keepalives answered) is found by the heartbeat and replaced, and the watcher is
/// told to re-read. The calls are shorter than `connect_timeout`, so the check that finds it
/// spans several of them.
#[test]
fn a_silent_subscriber_session_is_found_by_the_heartbeat_and_replaced() {
    const NAME: &str = "live-e subscriber";
    let db = TestDb::new();
    let proxy = Proxy::in_front_of(&db.url);
    let _heal = Heal(|| proxy.heal_all());
    let heartbeat = Duration::from_secs(1);
    let mut subscriber = PgSubscriber::listen_with(
        &proxy.url(&db.url),
        METADATA_BATCH_CHANNEL,
        options(NAME).subscriber_heartbeat(heartbeat),
    )
    .unwrap();
    let mut publisher = PgPublisher::connect(&db.url).unwrap();
    announce(&mut publisher, agent(16, 0));
    let wait = Duration::from_millis(300);
    assert_eq!(
        subscriber.next(Duration::from_secs(2)).unwrap(),
        Some(SubscriberEvent::Agents(vec![agent(16, 0)]))
    );

    assert_eq!(proxy.black_hole_named(NAME), 1);
    let fault = Instant::now();
    // Sent into the hole: lost with the session, which is what `Reconnected` says.
    announce(&mut publisher, agent(16, 1));
    let bound = heartbeat + CONNECT_TIMEOUT + MARGIN + wait;
    let mut subscriber = loop {
        let next = background("subscriber next", move || {
            let result = subscriber.next(wait);
            (result, subscriber)
        });
        let result;
        (result, subscriber) = next.expect_within(wait + MARGIN, "subscriber next");
        match result {
            Ok(Some(SubscriberEvent::Reconnected)) => break subscriber,
            Ok(None) => {}
            other => panic!("while the session is silent: {other:?}"),
        }
        assert!(
            fault.elapsed() < bound,
            "the silent session was not replaced within {bound:?}"
        );
    };
    let detected = fault.elapsed();
    // The new session listens.
    announce(&mut publisher, agent(16, 2));
    assert_eq!(
        subscriber.next(Duration::from_secs(2)).unwrap(),
        Some(SubscriberEvent::Agents(vec![agent(16, 2)]))
    );
    assert_eq!(
        proxy.open_connections(NAME).len(),
        2,
        "the silent one, still held, and the new one"
    );
    eprintln!(
        "liveness subscriber session silent: replaced {detected:.2?} into the fault (heartbeat \
         {heartbeat:?} + connect_timeout {CONNECT_TIMEOUT:?})"
    );
}

/// A caller that polls with zero timeouts (an event loop's tick) leaves the heartbeat no
/// time to hear an answer over a real network (here 10 ms a round trip, through the proxy):
/// the check must wait for a longer call, never count the polls against a live session and
/// replace it.
#[test]
fn zero_timeout_polls_never_mistake_a_live_subscriber_session_for_a_silent_one() {
    let db = TestDb::new();
    let proxy = Proxy::in_front_of(&db.url);
    proxy.set_latency(Duration::from_millis(5));
    let heartbeat = Duration::from_millis(200);
    let mut subscriber = PgSubscriber::listen_with(
        &proxy.url(&db.url),
        METADATA_BATCH_CHANNEL,
        options("live-f subscriber").subscriber_heartbeat(heartbeat),
    )
    .unwrap();
    // Past several heartbeats and connect timeouts of polling.
    let polling = heartbeat + 2 * CONNECT_TIMEOUT;
    let started = Instant::now();
    while started.elapsed() < polling {
        assert_eq!(subscriber.next(Duration::ZERO).unwrap(), None);
        // The caller's own tick, not a wait for the library.
        std::thread::sleep(Duration::from_millis(5));
    }
    announce(&mut PgPublisher::connect(&db.url).unwrap(), agent(17, 0));
    // A longer call runs the check, which the live session answers, and then delivers.
    assert_eq!(
        subscriber.next(Duration::from_secs(2)).unwrap(),
        Some(SubscriberEvent::Agents(vec![agent(17, 0)]))
    );
}

// ---------------------------------------------------------------------------------------
// A throwaway cluster.

#[test]
fn cluster_restart_costs_no_failed_flush() {
    let (mut cluster, url, ids) = cluster_db(4, 50, ClusterOptions::default());
    let r = Replica::new("live-e", &url, &url, ids);
    r.add_round(0);
    r.flush_within(FLUSH_BOUND, "before the restart");

    cluster.restart();
    let restarted = Instant::now();
    r.add_round(1);
    let mut check = cluster.socket_client("live", "liveness check");
    r.flush_until("after the restart", || stored(&mut check, 1) == 50);
    eprintln!(
        "liveness restart: no failed flush; written {:.2?} after the restart",
        restarted.elapsed()
    );
    r.assert_nothing_lost();
    r.batcher.close();
}

#[test]
fn cluster_stopped_immediately_fails_fast_and_recovers_after_start() {
    let (mut cluster, url, ids) = cluster_db(5, 50, ClusterOptions::default());
    let r = Replica::new("live-f", &url, &url, ids);
    r.add_round(0);
    r.flush_within(FLUSH_BOUND, "before the stop");

    cluster.stop_immediate();
    let fault = Instant::now();
    r.add_round(1);
    r.expect_failed_flush("cluster stopped");
    let detected = fault.elapsed();
    r.expect_failed_flush("cluster still stopped");

    cluster.start();
    let healed = Instant::now();
    let mut check = cluster.socket_client("live", "liveness check");
    r.flush_until("after the start", || stored(&mut check, 1) == 50);
    report("stop -m immediate, then start", detected, healed.elapsed());
    r.assert_nothing_lost();
    r.batcher.close();
}

#[test]
fn sigstopped_store_backend_fails_fast_and_a_new_session_takes_over() {
    let (cluster, url, ids) = cluster_db(6, 50, ClusterOptions::default());
    let cluster = std::sync::Mutex::new(cluster);
    let r = Replica::new("live-g", &url, &url, ids);
    let _heal = Heal(|| cluster.lock().unwrap().sigcont_backends());
    r.add_round(0);
    r.flush_within(FLUSH_BOUND, "before the fault");

    cluster.lock().unwrap().sigstop_backend("live-g store");
    let fault = Instant::now();
    r.add_round(1);
    r.expect_failed_flush("store backend stopped");
    let detected = fault.elapsed();

    // The stopped backend stays stopped: the next flushes must use a new session.
    let healed = Instant::now();
    let mut check = cluster
        .lock()
        .unwrap()
        .socket_client("live", "liveness check");
    r.flush_until("on a new session", || stored(&mut check, 1) == 50);
    report("store backend SIGSTOPped", detected, healed.elapsed());
    r.assert_nothing_lost();
}

#[test]
fn sigstopped_postmaster_bounds_the_reconnect_and_recovers_after_sigcont() {
    let (cluster, url, ids) = cluster_db(7, 50, ClusterOptions::default());
    let cluster = std::sync::Mutex::new(cluster);
    let r = Replica::new("live-h", &url, &url, ids);
    let _heal = Heal(|| {
        let mut cluster = cluster.lock().unwrap();
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            cluster.sigcont_postmaster()
        }))
        .is_err()
        {
            eprintln!("could not SIGCONT the postmaster");
        }
    });
    r.add_round(0);
    r.flush_within(FLUSH_BOUND, "before the fault");

    // Opened before the stop: no new session can start while the postmaster is stopped.
    let mut admin = cluster.lock().unwrap().admin();
    cluster.lock().unwrap().sigstop_postmaster();
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&"live-h store"],
        )
        .unwrap();
    let fault = Instant::now();
    r.add_round(1);
    // The session is gone and a new one cannot start: the reconnect hangs in the startup
    // handshake unless connect_timeout bounds all of it.
    r.expect_failed_flush("postmaster stopped, reconnecting");
    let detected = fault.elapsed();

    cluster.lock().unwrap().sigcont_postmaster();
    let healed = Instant::now();
    let mut check = cluster
        .lock()
        .unwrap()
        .socket_client("live", "liveness check");
    r.flush_until("after SIGCONT", || stored(&mut check, 1) == 50);
    report("postmaster SIGSTOPped", detected, healed.elapsed());
    r.assert_nothing_lost();
}

#[test]
fn exhausted_connection_slots_fail_fast_and_recover_when_one_frees() {
    let max_connections = 6;
    let (cluster, url, ids) = cluster_db(
        8,
        50,
        ClusterOptions {
            max_connections: Some(max_connections),
            ..ClusterOptions::default()
        },
    );
    let r = Replica::new("live-i", &url, &url, ids);
    r.add_round(0);
    r.flush_within(FLUSH_BOUND, "before the fault");

    // Holds a slot through the fault, to watch the server.
    let mut admin = cluster.admin();
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&"live-i store"],
        )
        .unwrap();
    let sessions = |admin: &mut Client| -> i64 {
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'",
                &[],
            )
            .unwrap()
            .get(0)
    };
    pg::wait_until("the store's backend exits", || {
        sessions(&mut admin) < i64::from(max_connections)
    });
    let mut fillers = Vec::new();
    while sessions(&mut admin) < i64::from(max_connections) {
        fillers.push(cluster.socket_client("live", "liveness filler"));
    }
    let fault = Instant::now();
    r.add_round(1);
    r.expect_failed_flush("no connection slot left");
    let detected = fault.elapsed();

    drop(fillers.pop());
    // The slot frees when the filler's backend has exited: the server's state, polled.
    pg::wait_until("a slot frees", || {
        sessions(&mut admin) < i64::from(max_connections)
    });
    let healed = Instant::now();
    drop(admin);
    let check_url = url.clone();
    r.flush_until("after a slot freed", || {
        stored(&mut pg::connect(&check_url, "liveness check"), 1) == 50
    });
    report("connection slots exhausted", detected, healed.elapsed());
    r.assert_nothing_lost();
}

// ---------------------------------------------------------------------------------------
// The main server, each test in a database of its own.

#[test]
fn a_locked_row_holds_back_only_itself() {
    let n = 100;
    let locked = 7;
    let (db, ids, mut check) = main_db(9, n);
    let r = Replica::new("live-j", &db.url, &db.url, ids.clone());
    r.add_round(0);
    r.flush_within(FLUSH_BOUND, "before the lock");

    let mut locker = db.client("liveness locker");
    let mut lock = locker.transaction().unwrap();
    lock.execute(
        "SELECT 1 FROM workspace_agent_metadata WHERE workspace_agent_id = $1 FOR UPDATE",
        &[&ids[locked]],
    )
    .unwrap();
    let fault = Instant::now();
    r.add_round(1);
    let progress = r.flush_until("the unlocked rows", || {
        stored(&mut check, 1) == (n - 1) as i64
    });
    let locked_row = pg::row(&mut check, ids[locked], "k").unwrap();
    assert_eq!(
        locked_row.0, "v0",
        "the locked row cannot have been written"
    );
    let stats = r.batcher.stats();
    assert_eq!(
        stats.rejected, 0,
        "a locked row is retained, not rejected: {stats:?}"
    );
    assert_eq!(stats.batched, 1, "the locked row is retained: {stats:?}");
    let health = r.batcher.health();
    assert!(
        health.consecutive_store_failures > 0 || health.oldest_unflushed_age.is_some(),
        "health shows the held-back row: {health:?}"
    );
    eprintln!(
        "liveness row lock: {} of {n} rows written {progress:.2?} into the fault ({:.2?} since it began)",
        n - 1,
        fault.elapsed()
    );

    lock.commit().unwrap();
    let healed = Instant::now();
    r.flush_until("after the lock is released", || {
        stored(&mut check, 1) == n as i64
    });
    report("one row locked", progress, healed.elapsed());
    r.assert_nothing_lost();
}

#[test]
fn a_table_locked_as_a_whole_costs_three_lock_timeouts_per_flush() {
    let (db, ids, mut check) = main_db(10, 20);
    let r = Replica::new("live-k", &db.url, &db.url, ids);
    r.add_round(0);
    r.flush_within(FLUSH_BOUND, "before the lock");

    let mut locker = db.client("liveness locker");
    let mut lock = locker.transaction().unwrap();
    lock.batch_execute("LOCK TABLE workspace_agent_metadata IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let fault = Instant::now();
    r.add_round(1);
    let (flush, took) = r.flush_within(FLUSH_BOUND, "table locked");
    let flush = flush.expect("a report");
    // The chunk, then both halves; splitting on would cost a lock timeout per level.
    assert_eq!(
        (flush.statements, flush.stored, flush.retained),
        (3, 0, 20),
        "{flush:?}"
    );
    eprintln!(
        "liveness table lock: a flush gave up after {took:.2?} (lock_timeout {LOCK_TIMEOUT:?})"
    );
    let detected = fault.elapsed();
    r.expect_failed_flush("table still locked");
    let stats = r.batcher.stats();
    assert_eq!((stats.rejected, stats.batched), (0, 20), "{stats:?}");

    lock.commit().unwrap();
    let healed = Instant::now();
    r.flush_until("after the lock is released", || stored(&mut check, 1) == 20);
    report("table locked", detected, healed.elapsed());
    r.assert_nothing_lost();
}

#[test]
fn a_read_only_database_is_an_outage_not_bad_data() {
    let (db, ids, mut check) = main_db(11, 20);
    let r = Replica::new("live-l", &db.url, &db.url, ids);
    r.add_round(0);
    r.flush_within(FLUSH_BOUND, "before read-only");

    // As a primary turned read-only (a failover, a full disk guard) is seen by new sessions.
    db.admin()
        .batch_execute(&format!(
            "ALTER DATABASE {} SET default_transaction_read_only = on",
            db.name
        ))
        .unwrap();
    db.terminate("live-l store");
    let fault = Instant::now();
    r.add_round(1);
    r.expect_failed_flush("read-only database");
    let detected = fault.elapsed();
    let stats = r.batcher.stats();
    assert_eq!(
        (stats.rejected, stats.batched),
        (0, 20),
        "read-only is no fault of the rows: retained, not rejected: {stats:?}"
    );

    db.admin()
        .batch_execute(&format!(
            "ALTER DATABASE {} RESET default_transaction_read_only",
            db.name
        ))
        .unwrap();
    // No session is terminated: the store must leave a read-only session by itself, as it
    // must after a failover, where the old session stays read-only for good.
    let healed = Instant::now();
    r.flush_until("after read-write again", || stored(&mut check, 1) == 20);
    report("read-only database", detected, healed.elapsed());
    r.assert_nothing_lost();
}

#[test]
fn a_backlog_drains_at_a_slow_databases_pace() {
    let n = 3_000;
    let (db, ids, mut check) = main_db(12, n);
    let r = Replica::new("live-m", &db.url, &db.url, ids);
    r.add_round(0);
    r.flush_within(FLUSH_BOUND * 10, "before the slowdown");
    assert_eq!(stored(&mut check, 0), n as i64);

    // About 1 ms per row: a database that writes about 1,000 rows/s. pg_sleep rounds up
    // to the timer's granularity: 500 calls of pg_sleep(0.001) took 1.05 s here, of
    // pg_sleep(0.0005) 0.56 s.
    check
        .batch_execute(
            "CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_sleep(0.0005); RETURN NEW; END $$; \
             CREATE TRIGGER slow_row BEFORE UPDATE ON workspace_agent_metadata \
             FOR EACH ROW EXECUTE FUNCTION slow_row()",
        )
        .unwrap();
    // A backlog of 3,000 entries, as an outage leaves it: the flushes fail while the
    // database refuses connections, and everything is retained.
    db.admin()
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS false",
            db.name
        ))
        .unwrap();
    db.terminate("live-m store");
    r.add_round(1);
    r.clock.advance(INTERVAL);
    r.batcher.sync();
    assert_eq!(r.batcher.stats().batched, n, "{:?}", r.batcher.stats());
    db.admin()
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            db.name
        ))
        .unwrap();

    // Every statement stays under statement_timeout (batch_size rows ≈ 0.5 s); the whole
    // backlog must drain well under 20 s.
    let limit = Duration::from_secs(12);
    let started = Instant::now();
    while stored(&mut check, 1) < n as i64 {
        let remaining = limit.saturating_sub(started.elapsed());
        assert!(
            !remaining.is_zero(),
            "{} of {n} written in {limit:?} (stats {:?})",
            stored(&mut check, 1),
            r.batcher.stats()
        );
        r.flush_within(
            remaining.max(Duration::from_millis(1)),
            "draining the backlog",
        );
    }
    let drained = started.elapsed();
    eprintln!("liveness slow database: a {n}-entry backlog drained in {drained:.2?}");
    r.assert_nothing_lost();
}
