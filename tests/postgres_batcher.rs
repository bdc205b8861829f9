//! The batcher over `PgStore` and `PgPublisher`, against a real PostgreSQL server.
//!
//! Flushes are driven with `Batcher::flush()` (the interval is an hour), so no test waits
//! for the batcher's timer. Waits on the server (a backend exiting, a statement reaching a
//! lock) poll it with a deadline, in `pg`.

mod pg;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use metadata_batcher::postgres::{
    self as mbpg, PgOptions, PgPublisher, PgStore, PgSubscriber, SubscriberEvent,
};
use metadata_batcher::{Batcher, Metadata, StoreErrorKind, METADATA_BATCH_CHANNEL};
use pg::{micros, row, TestDb};
use uuid::Uuid;

/// Longer than any test runs: only `flush()` and `close()` flush.
const NEVER: Duration = Duration::from_secs(3600);
/// Long enough for any loaded CI machine; a passing test never waits it out.
const WAIT: Duration = Duration::from_secs(10);

fn options(application_name: &str) -> PgOptions {
    PgOptions::new().application_name(application_name)
}

fn agents(replica: u128, n: u128) -> Vec<Uuid> {
    (0..n).map(|i| Uuid::from_u128(replica << 64 | i)).collect()
}

/// A batcher on its own store and publisher connections, as one service replica has.
fn replica(db: &TestDb, name: &str, store_options: PgOptions) -> Batcher {
    let store = PgStore::connect_with(&db.url, store_options).unwrap();
    let publisher =
        PgPublisher::connect_with(&db.url, options(&format!("{name} publisher"))).unwrap();
    Batcher::builder(store, publisher)
        .batch_size(10_000)
        .interval(NEVER)
        .build()
        .unwrap()
}

/// Receives until `expected` agents were announced; panics after `WAIT` without them.
fn receive_agents(subscriber: &mut PgSubscriber, expected: usize) -> HashSet<Uuid> {
    let mut seen = HashSet::new();
    let deadline = Instant::now() + WAIT;
    while seen.len() < expected {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match subscriber.next(remaining) {
            Ok(Some(SubscriberEvent::Agents(agents))) => seen.extend(agents),
            other => panic!(
                "expected agents ({} of {expected} so far), got {other:?}",
                seen.len()
            ),
        }
    }
    seen
}

#[test]
fn round_trip_batch_to_rows_to_subscriber() {
    let db = TestDb::new();
    let ids = agents(1, 1_000);
    let mut client = db.client("mb-test check");
    mbpg::register_agents(&mut client, &ids, &["cpu", "mem"]).unwrap();
    let mut subscriber = PgSubscriber::listen(&db.url, METADATA_BATCH_CHANNEL).unwrap();
    let batcher = replica(&db, "replica", options("replica store"));

    for (i, agent) in ids.iter().enumerate() {
        let at = micros(1_764_000_000_000_000 + i as u64);
        let metadata = vec![
            Metadata::new("cpu", format!("{i}%"), "", at),
            Metadata::new("mem", "", format!("error {i}"), at),
        ];
        assert_eq!(batcher.add(*agent, metadata).unwrap().accepted, 2);
    }
    let report = batcher.flush().expect("2,000 entries to flush");
    assert_eq!(
        (report.count, report.agents, report.chunks),
        (2_000, 1_000, 3)
    );
    assert_eq!(report.updated, 2_000);
    assert_eq!(report.error, None);

    for (i, agent) in ids.iter().enumerate() {
        let at = micros(1_764_000_000_000_000 + i as u64);
        assert_eq!(
            row(&mut client, *agent, "cpu"),
            Some((format!("{i}%"), String::new(), at))
        );
        assert_eq!(
            row(&mut client, *agent, "mem"),
            Some((String::new(), format!("error {i}"), at))
        );
    }
    assert_eq!(
        receive_agents(&mut subscriber, 1_000),
        ids.iter().copied().collect()
    );
    assert_eq!(subscriber.malformed(), 0);
    batcher.close();
    let stats = batcher.stats();
    assert_eq!(
        (stats.flushed, stats.store_errors, stats.publish_errors),
        (2_000, 0, 0)
    );
}

#[test]
fn unregistered_keys_are_unmatched_not_created() {
    let db = TestDb::new();
    let agent = agents(1, 1)[0];
    let mut client = db.client("mb-test check");
    mbpg::register(&mut client, agent, &["cpu"]).unwrap();
    let batcher = replica(&db, "replica", options("replica store"));
    let now = micros(1_764_000_000_000_000);
    batcher
        .add(
            agent,
            vec![
                Metadata::new("cpu", "1", "", now),
                Metadata::new("invented", "2", "", now),
            ],
        )
        .unwrap();
    let report = batcher.flush().unwrap();
    assert_eq!((report.count, report.updated), (2, 1));
    assert_eq!(batcher.stats().unmatched, 1);
    assert_eq!(pg::row_count(&mut client), 1);
    batcher.close();
}

#[test]
fn two_replicas_each_subscriber_sees_both() {
    let db = TestDb::new();
    let (a_agents, b_agents) = (agents(0xa, 400), agents(0xb, 400));
    let mut client = db.client("mb-test check");
    mbpg::register_agents(&mut client, &a_agents, &["cpu"]).unwrap();
    mbpg::register_agents(&mut client, &b_agents, &["cpu"]).unwrap();
    let mut a_subscriber =
        PgSubscriber::listen_with(&db.url, METADATA_BATCH_CHANNEL, options("a subscriber"))
            .unwrap();
    let mut b_subscriber =
        PgSubscriber::listen_with(&db.url, METADATA_BATCH_CHANNEL, options("b subscriber"))
            .unwrap();
    let a = replica(&db, "a", options("a store"));
    let b = replica(&db, "b", options("b store"));

    let at = micros(1_764_000_000_000_000);
    for agent in &a_agents {
        a.add(*agent, vec![Metadata::new("cpu", "a", "", at)])
            .unwrap();
    }
    for agent in &b_agents {
        b.add(*agent, vec![Metadata::new("cpu", "b", "", at)])
            .unwrap();
    }
    let a_report = a.flush().unwrap();
    let b_report = b.flush().unwrap();
    assert_eq!((a_report.updated, b_report.updated), (400, 400));

    let everyone: HashSet<Uuid> = a_agents.iter().chain(&b_agents).copied().collect();
    assert_eq!(receive_agents(&mut a_subscriber, 800), everyone);
    assert_eq!(receive_agents(&mut b_subscriber, 800), everyone);
    a.close();
    b.close();
}

#[test]
fn terminated_store_connection_is_reopened_by_the_next_flush() {
    let db = TestDb::new();
    let agent = agents(1, 1)[0];
    let mut client = db.client("mb-test check");
    mbpg::register(&mut client, agent, &["cpu"]).unwrap();
    let batcher = replica(&db, "replica", options("replica store"));

    batcher
        .add(agent, vec![Metadata::new("cpu", "1", "", micros(1))])
        .unwrap();
    assert_eq!(batcher.flush().unwrap().updated, 1);

    assert_eq!(db.terminate("replica store"), 1);

    batcher
        .add(agent, vec![Metadata::new("cpu", "2", "", micros(2))])
        .unwrap();
    let report = batcher.flush().unwrap();
    assert_eq!(
        (report.updated, report.error.clone()),
        (1, None),
        "{report:?}"
    );
    assert_eq!(row(&mut client, agent, "cpu").unwrap().0, "2");
    assert_eq!(batcher.stats().store_errors, 0);
    batcher.close();
}

#[test]
fn statement_timeout_is_counted_and_a_later_flush_works() {
    let db = TestDb::new();
    let agent = agents(1, 1)[0];
    let mut client = db.client("mb-test check");
    mbpg::register(&mut client, agent, &["cpu"]).unwrap();
    client
        .batch_execute(
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS \
               $$ BEGIN PERFORM pg_sleep(5); RETURN NEW; END $$; \
             CREATE TRIGGER slow BEFORE UPDATE ON workspace_agent_metadata \
               FOR EACH ROW EXECUTE FUNCTION slow();",
        )
        .unwrap();
    let batcher = replica(
        &db,
        "replica",
        options("replica store").statement_timeout(Duration::from_millis(200)),
    );

    batcher
        .add(agent, vec![Metadata::new("cpu", "slow", "", micros(1))])
        .unwrap();
    let report = batcher.flush().unwrap();
    let error = report.error.as_ref().expect("the statement timed out");
    assert_eq!(error.kind(), StoreErrorKind::Canceled, "{report:?}");
    assert_eq!(error.sqlstate(), Some("57014"), "{report:?}");
    assert_eq!(batcher.stats().store_errors, 1);

    client
        .batch_execute("DROP TRIGGER slow ON workspace_agent_metadata")
        .unwrap();
    // The canceled entry was kept and is written by the next flush.
    let report = batcher.flush().expect("the kept entry");
    assert_eq!(
        (report.updated, report.error.clone()),
        (1, None),
        "{report:?}"
    );
    assert_eq!(row(&mut client, agent, "cpu").unwrap().0, "slow");
    batcher.close();
}

/// Closes a batcher whose final flush hits a table locked by another session, and checks
/// that `close` returns within `final_flush_timeout` plus a margin and cancels the statement.
fn close_returns_in_time_against_a_locked_table(final_flush_timeout: Duration) {
    let db = TestDb::new();
    let agent = agents(1, 1)[0];
    let mut locker = db.client("mb-test locker");
    mbpg::register(&mut locker, agent, &["cpu"]).unwrap();
    // A statement timeout beyond the final flush timeout and no lock timeout: only close's
    // cancel can end it.
    let store_options = options("replica store")
        .statement_timeout(final_flush_timeout + Duration::from_secs(60))
        .lock_timeout(Duration::ZERO);
    let store = PgStore::connect_with(&db.url, store_options).unwrap();
    let publisher = PgPublisher::connect_with(&db.url, options("replica publisher")).unwrap();
    let batcher = Batcher::builder(store, publisher)
        .interval(NEVER)
        .final_flush_timeout(final_flush_timeout)
        .build()
        .unwrap();

    let mut transaction = locker.transaction().unwrap();
    transaction
        .batch_execute("LOCK TABLE workspace_agent_metadata IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    batcher
        .add(agent, vec![Metadata::new("cpu", "late", "", micros(1))])
        .unwrap();

    let started = Instant::now();
    let report = batcher.close();
    let elapsed = started.elapsed();
    assert!(report.deadline_hit, "{report:?}");
    assert_eq!((report.written, report.unwritten), (0, 1), "{report:?}");
    assert!(
        elapsed >= final_flush_timeout,
        "close returned after {elapsed:?}"
    );
    assert!(
        elapsed < final_flush_timeout + Duration::from_secs(2),
        "close took {elapsed:?}"
    );
    assert_eq!(batcher.stats().unwritten_at_shutdown, 1);

    // The cancel request ended the blocked statement: nothing waits on the lock any more.
    let mut admin = db.admin();
    pg::wait_until("the canceled update leaves the lock queue", || {
        pg::lock_waiters(&mut admin, &db.name, "replica store") == 0
    });
    transaction.rollback().unwrap();
    assert_eq!(
        row(&mut db.client("mb-test check"), agent, "cpu")
            .unwrap()
            .0,
        ""
    );
}

#[test]
fn close_returns_within_the_default_final_flush_timeout_against_a_locked_table() {
    close_returns_in_time_against_a_locked_table(Duration::from_secs(15));
}

#[test]
fn close_returns_within_a_short_final_flush_timeout_against_a_locked_table() {
    close_returns_in_time_against_a_locked_table(Duration::from_secs(2));
}
