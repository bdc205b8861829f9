//! Several replicas, one table: each replica of a service runs its own batcher, with its own
//! store, publisher and subscriber, and they all update the same agents' rows at once.
//!
//! - Their statements lock rows in one shared order, so they never deadlock: zero deadlocks
//!   in `pg_stat_database`, zero conflicts and store errors, directly and through a busy
//!   transaction-mode pgbouncer; every row ends with the newest value any replica offered,
//!   and every replica's subscriber hears every agent.
//! - A writer that is not a batcher and locks rows in the opposite order does deadlock with
//!   one: the batcher's statement is the one PostgreSQL aborts, and it runs again at once,
//!   losing nothing, and is counted.

mod pg;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

use metadata_batcher::postgres::{
    register_keys_for_agents, PgOptions, PgPublisher, PgStore, PgSubscriber, StatementMode,
    SubscriberEvent,
};
use metadata_batcher::{Batcher, Metadata, METADATA_BATCH_CHANNEL};
use pg::{micros, row, PgBouncer, TestDb};
use uuid::Uuid;

const REPLICAS: usize = 4;
const AGENTS: u128 = 200;
const KEYS: usize = 10;
/// Rounds each replica makes over every agent: 4 × 12 × 2,000 updates in all.
const ROUNDS: usize = 12;

fn agent(i: u128) -> Uuid {
    Uuid::from_u128(0xfeed_0000_0000_0000_0000_0000_0000_0000 + i)
}

fn keys() -> Vec<String> {
    (0..KEYS).map(|k| format!("key-{k}")).collect()
}

/// The database's deadlock count, as the server's statistics have it now.
fn deadlocks(db: &TestDb) -> i64 {
    let mut admin = db.admin();
    admin
        .batch_execute("SELECT pg_stat_clear_snapshot()")
        .expect("clear the statistics snapshot");
    admin
        .query_one(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = $1",
            &[&db.name],
        )
        .expect("pg_stat_database")
        .get(0)
}

/// What one replica offered last for each (agent, key): its `collected_at` (µs) and value.
type Offered = HashMap<(Uuid, String), (u64, String)>;

/// Runs `REPLICAS` batchers on `db`'s table, the stores and publishers through `write_url`,
/// each visiting the agents in an order of its own; checks what the issue asks of them.
/// `pooler`, if any, is what `write_url` names; it is stopped once the replicas are closed.
fn replicas_write_one_table(
    db: &TestDb,
    write_url: &str,
    mode: StatementMode,
    pooler: Option<PgBouncer>,
) {
    let agents: Vec<Uuid> = (0..AGENTS).map(agent).collect();
    let all_keys = keys();
    let key_refs: Vec<&str> = all_keys.iter().map(String::as_str).collect();
    register_keys_for_agents(&mut db.client("mb-test register"), &agents, &key_refs)
        .expect("register the keys");
    let deadlocks_before = deadlocks(db);
    // One clock for every replica: each update's collected_at is later than every update
    // made before it, by any replica, so "the newest value offered" is well defined.
    let base = 1_700_000_000_000_000;
    let clock = AtomicU64::new(0);
    let subscribers: Vec<PgSubscriber> = (0..REPLICAS)
        .map(|_| PgSubscriber::listen(&db.url, METADATA_BATCH_CHANNEL).expect("listen"))
        .collect();
    let options = PgOptions::new().statement_mode(mode);
    let results: Vec<(
        Offered,
        metadata_batcher::Stats,
        metadata_batcher::CloseReport,
    )> = thread::scope(|scope| {
        let handles: Vec<_> = (0..REPLICAS)
            .map(|replica| {
                let (agents, clock, options) = (&agents, &clock, options.clone());
                scope.spawn(move || {
                    let store = PgStore::open(write_url, options.clone()).expect("store");
                    let publisher = PgPublisher::open(write_url, options).expect("publisher");
                    let batcher = Batcher::builder(store, publisher)
                        .batch_size(250)
                        .channel_capacity(4 * KEYS * AGENTS as usize)
                        .build()
                        .expect("build");
                    // Each replica walks the agents from its own starting point, half of
                    // them backwards: their statements share rows all the time.
                    let mut order: Vec<Uuid> = agents.clone();
                    order.rotate_left(replica * agents.len() / REPLICAS);
                    if replica % 2 == 1 {
                        order.reverse();
                    }
                    let mut offered = Offered::new();
                    for round in 0..ROUNDS {
                        for &agent_id in &order {
                            let metadata: Vec<Metadata> = keys()
                                .into_iter()
                                .map(|key| {
                                    let at = clock.fetch_add(1, Relaxed);
                                    let value = format!("r{replica} round {round}");
                                    offered.insert((agent_id, key.clone()), (at, value.clone()));
                                    Metadata::new(key, value, "", micros(base + at))
                                })
                                .collect();
                            let report = batcher.add(agent_id, metadata).expect("add");
                            assert_eq!(report.dropped, 0, "the channel holds a round");
                        }
                        batcher.sync();
                    }
                    let report = batcher.close();
                    (offered, batcher.stats(), report)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("replica"))
            .collect()
    });

    for (replica, (_, stats, report)) in results.iter().enumerate() {
        assert_eq!(
            (stats.conflicts, stats.store_errors, report.unwritten),
            (0, 0, 0),
            "replica {replica}: {stats:?}"
        );
        assert!(!report.deadline_hit);
    }
    // A backend reports its statistics as it exits (an idle one only every few seconds),
    // so the server's count is complete once the sessions that wrote are gone: the stores'
    // and publishers' own, or the pooler's server connections.
    drop(pooler);
    let mut admin = db.admin();
    pg::wait_until("the writing sessions end", || {
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
                 AND application_name NOT LIKE 'mb-test%' \
                 AND application_name <> 'metadata-batcher subscriber'",
                &[&db.name],
            )
            .map(|row| row.get::<_, i64>(0) == 0)
            .unwrap_or(false)
    });
    assert_eq!(deadlocks(db) - deadlocks_before, 0, "deadlocks");

    // Every row holds the newest value any replica offered.
    let mut newest: HashMap<(Uuid, String), (u64, String)> = HashMap::new();
    for (offered, _, _) in &results {
        for (key, (at, value)) in offered {
            let entry = newest.entry(key.clone()).or_insert((0, String::new()));
            if *at >= entry.0 {
                *entry = (*at, value.clone());
            }
        }
    }
    assert_eq!(newest.len(), AGENTS as usize * KEYS);
    let mut client = db.client("mb-test check");
    for ((agent_id, key), (at, value)) in &newest {
        let (stored, _, collected_at) = row(&mut client, *agent_id, key).expect("row");
        assert_eq!(
            (stored.as_str(), collected_at),
            (value.as_str(), micros(base + at)),
            "{agent_id} {key}"
        );
    }

    // Every replica heard every agent, whichever replica wrote it.
    for (replica, mut subscriber) in subscribers.into_iter().enumerate() {
        let mut heard = HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while heard.len() < agents.len() && Instant::now() < deadline {
            if let Some(SubscriberEvent::Agents(ids)) =
                subscriber.next(Duration::from_millis(200)).expect("next")
            {
                heard.extend(ids);
            }
        }
        assert_eq!(heard.len(), agents.len(), "replica {replica}'s subscriber");
    }
}

#[test]
fn replicas_on_one_table_never_deadlock_and_every_row_is_newest() {
    let db = TestDb::new();
    replicas_write_one_table(&db, &db.url, StatementMode::Prepared, None);
}

#[test]
fn replicas_through_a_busy_transaction_pooler_never_deadlock() {
    let db = TestDb::new();
    // Eight clients (a store and a publisher per replica) share two server connections.
    let pooler = PgBouncer::with_pool_size(&db.url, 2);
    let url = pooler.url(&db.name);
    replicas_write_one_table(&db, &url, StatementMode::Unnamed, Some(pooler));
}

/// How many tries the deadlock test gets to have PostgreSQL pick the batcher's statement as
/// the one to abort (see the test).
const DEADLOCK_TRIES: u64 = 5;

#[test]
fn a_deadlock_with_another_writer_is_retried_counted_and_loses_nothing() {
    let db = TestDb::new();
    let agents: Vec<Uuid> = (0..10).map(agent).collect();
    register_keys_for_agents(&mut db.client("mb-test register"), &agents, &["k"])
        .expect("register");
    let store = PgStore::open(&db.url, PgOptions::default()).expect("store");
    let publisher = PgPublisher::open(&db.url, PgOptions::default()).expect("publisher");
    let batcher = Batcher::builder(store, publisher).build().expect("build");
    let deadlocks_before = deadlocks(&db);
    let mut other = db.client("mb-test other writer");
    // PostgreSQL looks for a deadlock `deadlock_timeout` (1 s) after a backend starts to
    // wait, once, and aborts the backend that finds it. The batcher waits first, so it
    // finds the cycle if the other writer closes it within that second; a superuser can
    // also keep the other writer from looking first. A loaded machine can still miss the
    // second, so the test tries again, with new values, until the batcher is the victim.
    let _ = other.batch_execute("SET deadlock_timeout = '30s'");
    let (mut other_aborted, mut round) = (0u64, 0);
    while batcher.stats().conflicts == 0 {
        round += 1;
        assert!(
            round <= DEADLOCK_TRIES,
            "the batcher was never the one aborted"
        );
        // The other writer, in one transaction, takes the last row of the batcher's order
        // first and the first one after it: the opposite order.
        other
            .batch_execute(
                "BEGIN; \
                 UPDATE workspace_agent_metadata SET value = 'other' \
                 WHERE workspace_agent_id = 'feed0000-0000-0000-0000-000000000009'",
            )
            .expect("lock the last row");
        for &agent_id in &agents {
            let at = micros(1_700_000_000_000_000 + round);
            let metadata = vec![Metadata::new("k", format!("batcher {round}"), "", at)];
            batcher.add(agent_id, metadata).expect("add");
        }
        thread::scope(|scope| {
            let flush = scope.spawn(|| batcher.flush());
            // The batcher's statement holds rows 0..8 and waits for row 9; row 0 closes
            // the cycle.
            db.wait_for_lock_wait("metadata-batcher store");
            let closed = other.batch_execute(
                "UPDATE workspace_agent_metadata SET value = 'other' \
                 WHERE workspace_agent_id = 'feed0000-0000-0000-0000-000000000000'",
            );
            match closed {
                Ok(()) => other.batch_execute("COMMIT").expect("commit"),
                Err(err) => {
                    assert_eq!(err.code().map(|c| c.code()), Some("40P01"), "{err}");
                    other_aborted += 1;
                    other.batch_execute("ROLLBACK").expect("rollback");
                }
            }
            let report = flush.join().expect("flush").expect("a report");
            assert_eq!(report.stored + report.retained, 10, "{report:?}");
            assert_eq!(report.rejected, 0);
        });
    }
    let stats = batcher.stats();
    // Usually one; a run again that takes row 0 before the other writer wakes closes the
    // cycle again (the store pauses to prevent it, but a loaded machine can outwait the
    // pause), within the store's three.
    assert!((1..=3).contains(&stats.conflicts), "{stats:?}");
    assert_eq!(stats.store_errors, 0, "{stats:?}");
    // The retry went through: the round that conflicted wrote every row.
    let report = stats.last_flush.expect("a flush");
    assert_eq!((report.stored, report.retained), (10, 0), "{report:?}");
    let mut client = db.client("mb-test check");
    for &agent_id in &agents {
        let (value, _, _) = row(&mut client, agent_id, "k").expect("row");
        assert_eq!(value, format!("batcher {round}"), "{agent_id}");
    }
    drop(batcher);
    drop(client);
    drop(other);
    pg::wait_until("the sessions end", || {
        db.backends(&mut db.admin(), "metadata-batcher store") == 0
            && db.backends(&mut db.admin(), "mb-test other writer") == 0
    });
    assert_eq!(
        deadlocks(&db) - deadlocks_before,
        (stats.conflicts + other_aborted) as i64,
        "one deadlock per conflict the batcher ran again, and per round it did not lose"
    );
}
