//! Faults against a real PostgreSQL server, through the whole batcher: an outage, an outage
//! past the retention bound, a row the database refuses. The batcher's timers run on a mock
//! clock (advanced by the test, then `sync`), the database is real.

mod pg;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use metadata_batcher::postgres::{self as mbpg, PgOptions, PgPublisher, PgStore};
use metadata_batcher::{
    Batcher, FlushReason, Interrupt, Metadata, MetadataBatch, MockClock, Store, StoreError,
    StoreErrorKind, Written,
};
use pg::{micros, row, TestDb};
use uuid::Uuid;

const INTERVAL: Duration = Duration::from_secs(5);

fn agent(i: u64) -> Uuid {
    Uuid::from_u128(0xfa17_0000_0000_0000_0000_0000_0000_0000 | u128::from(i))
}

fn at(i: u64) -> SystemTime {
    micros(1_764_000_000_000_000 + i)
}

/// A store that counts the statements it passes on to the real one.
struct Counted {
    inner: PgStore,
    statements: Arc<AtomicU64>,
}

impl Store for Counted {
    fn batch_update(&mut self, batch: &MetadataBatch) -> Result<Written, StoreError> {
        self.statements.fetch_add(1, Ordering::Relaxed);
        self.inner.batch_update(batch)
    }

    fn interrupt_handle(&mut self) -> Option<Interrupt> {
        self.inner.interrupt_handle()
    }
}

struct Replica {
    batcher: Batcher,
    clock: MockClock,
    statements: Arc<AtomicU64>,
}

fn replica(db: &TestDb, batch_size: usize, max_pending: usize) -> Replica {
    let options = |name: &str| PgOptions::new().application_name(name);
    let statements = Arc::new(AtomicU64::new(0));
    let store = Counted {
        inner: PgStore::connect_with(&db.url, options("faults store")).unwrap(),
        statements: statements.clone(),
    };
    let publisher = PgPublisher::connect_with(&db.url, options("faults publisher")).unwrap();
    let clock = MockClock::new();
    let batcher = Batcher::builder(store, publisher)
        .clock(clock.clone())
        .interval(INTERVAL)
        .batch_size(batch_size)
        .max_pending(max_pending)
        .channel_capacity(10 * max_pending)
        .build()
        .unwrap();
    Replica {
        batcher,
        clock,
        statements,
    }
}

fn set_allow_connections(db: &TestDb, allow: bool) {
    db.admin()
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS {allow}",
            db.name
        ))
        .unwrap();
}

/// Stops the database from accepting the batcher's connections, as an outage does.
fn start_outage(db: &TestDb) {
    set_allow_connections(db, false);
    db.terminate("faults store");
    db.terminate("faults publisher");
}

#[test]
fn outage_loses_nothing_and_newest_values_land() {
    let db = TestDb::new();
    let ids: Vec<Uuid> = (0..200).map(agent).collect();
    let keys = ["cpu", "mem", "disk", "load", "net"];
    mbpg::register_agents(&mut db.client("faults check"), &ids, &keys).unwrap();
    let r = replica(&db, 500, 10_000);

    let add_round = |round: u64| {
        for (i, id) in ids.iter().enumerate() {
            let metadata = keys
                .iter()
                .map(|k| Metadata::new(*k, format!("{k}-{round}"), "", at(round * 1000 + i as u64)))
                .collect();
            assert_eq!(r.batcher.add(*id, metadata).unwrap().dropped, 0);
        }
    };
    add_round(0);
    r.batcher.sync();
    assert_eq!(
        r.batcher.stats().flushed,
        1000,
        "two capacity flushes before the outage"
    );

    start_outage(&db);
    for round in 1..=4 {
        add_round(round);
        r.clock.advance(INTERVAL);
        r.batcher.sync();
    }
    let during = r.batcher.stats();
    assert!(during.store_errors >= 2, "{during:?}");
    assert_eq!(during.batched, 1000, "the newest value per key is kept");
    assert!(r.batcher.health().consecutive_store_failures >= 2);

    set_allow_connections(&db, true);
    r.clock.advance(INTERVAL);
    r.batcher.sync();
    let after = r.batcher.stats();
    assert_eq!(after.batched, 0, "{after:?}");
    assert_eq!(after.dropped + after.retention_dropped + after.rejected, 0);
    assert_eq!(r.batcher.health().consecutive_store_failures, 0);

    let mut client = db.client("faults check");
    for (i, id) in ids.iter().enumerate() {
        for k in keys {
            assert_eq!(
                row(&mut client, *id, k),
                Some((format!("{k}-4"), String::new(), at(4000 + i as u64))),
                "agent {i} key {k}"
            );
        }
    }
    r.batcher.close();
}

#[test]
fn outage_past_the_bound_drops_exactly_the_oldest() {
    let db = TestDb::new();
    let ids: Vec<Uuid> = (0..500).map(agent).collect();
    mbpg::register_agents(&mut db.client("faults check"), &ids, &["k"]).unwrap();
    let r = replica(&db, 100, 300);
    // Make sure both connections exist before the outage, so it is the outage that fails.
    r.batcher
        .add(ids[0], vec![Metadata::new("k", "warm-up", "", at(0))])
        .unwrap();
    assert_eq!(r.batcher.flush().unwrap().updated, 1);

    start_outage(&db);
    // Agent i's value is collected at i: the oldest 200 must go.
    for (i, id) in ids.iter().enumerate() {
        let collected_at = at(1 + i as u64);
        r.batcher
            .add(
                *id,
                vec![Metadata::new("k", format!("v{i}"), "", collected_at)],
            )
            .unwrap();
    }
    r.clock.advance(INTERVAL);
    r.batcher.sync();
    set_allow_connections(&db, true);
    let report = r.batcher.flush().unwrap();
    assert_eq!(
        (report.reason, report.stored, report.updated),
        (FlushReason::Manual, 300, 300)
    );
    let stats = r.batcher.stats();
    assert_eq!((stats.retention_dropped, stats.dropped), (200, 0));

    let mut client = db.client("faults check");
    for (i, id) in ids.iter().enumerate() {
        let (value, _, _) = row(&mut client, *id, "k").unwrap();
        let expected = match i {
            0 => "warm-up".to_owned(),
            1..200 => String::new(),
            _ => format!("v{i}"),
        };
        assert_eq!(value, expected, "agent {i}");
    }
    r.batcher.close();
}

#[test]
fn a_refused_row_costs_only_itself_in_the_same_flush() {
    let db = TestDb::new();
    let ids: Vec<Uuid> = (0..500).map(agent).collect();
    let mut client = db.client("faults check");
    mbpg::register_agents(&mut client, &ids, &["k"]).unwrap();
    client
        .batch_execute(
            "ALTER TABLE workspace_agent_metadata \
             ADD CONSTRAINT no_poison CHECK (value <> 'poison')",
        )
        .unwrap();
    let r = replica(&db, 500, 10_000);
    for (i, id) in ids.iter().enumerate() {
        let value = if i == 321 {
            "poison".to_owned()
        } else {
            format!("v{i}")
        };
        r.batcher
            .add(*id, vec![Metadata::new("k", value, "", at(i as u64))])
            .unwrap();
    }
    r.batcher.sync(); // the 500th entry triggers the capacity flush; bisection runs inside it
    let report = r.batcher.stats().last_flush.unwrap();
    assert_eq!(report.reason, FlushReason::Capacity);
    assert_eq!(
        (report.stored, report.updated, report.rejected),
        (499, 499, 1)
    );
    assert!(
        matches!(&report.error, Some(e) if e.kind() == StoreErrorKind::Rejected && e.message().contains("no_poison")),
        "{report:?}"
    );
    // One statement for the batch, then two per halving down to the refused row:
    // 1 + 2·⌈log2 500⌉ = 19.
    let statements = r.statements.load(Ordering::Relaxed);
    assert_eq!(report.statements as u64, statements);
    assert!(statements <= 19, "{statements} statements");
    assert_eq!(r.batcher.stats().rejected, 1);

    for (i, id) in ids.iter().enumerate() {
        let (value, _, _) = row(&mut client, *id, "k").unwrap();
        let expected = if i == 321 {
            String::new()
        } else {
            format!("v{i}")
        };
        assert_eq!(value, expected, "agent {i}");
    }
    r.batcher.close();
}
