//! The store, the publisher, `migrate` and `register` through a real PgBouncer in
//! transaction mode, with a small pool that other clients keep busy, as other replicas of
//! a service would; the subscriber connected directly, and refused with a clear error when
//! pointed at the pooler.

mod pg;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use metadata_batcher::postgres::{
    self as mbpg, ConnectErrorKind, PgOptions, PgPublisher, PgStore, PgSubscriber, StatementMode,
    SubscriberEvent,
};
use metadata_batcher::{
    Batcher, Metadata, MetadataBatch, MockClock, Store, StoreErrorKind, Written,
    METADATA_BATCH_CHANNEL,
};
use pg::{PgBouncer, TestDb};
use uuid::Uuid;

/// Clients keeping the pool busy with short transactions until dropped.
struct BusyClients {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl BusyClients {
    fn start(bouncer: &PgBouncer, dbname: &str, count: usize) -> BusyClients {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..count)
            .map(|i| {
                let mut client = bouncer.client(dbname, &format!("mb-test busy {i}"));
                let stop = stop.clone();
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        client
                            .batch_execute("SELECT pg_sleep(0.002)")
                            .expect("a busy client's query");
                    }
                })
            })
            .collect();
        BusyClients { stop, threads }
    }
}

impl Drop for BusyClients {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn agent(n: u128) -> Uuid {
    Uuid::from_u128(0xb0b0_0000_0000_0000_0000_0000_0000_0000 | n)
}

fn options(name: &str, mode: StatementMode, statement_timeout: Duration) -> PgOptions {
    PgOptions::new()
        .application_name(name)
        .statement_mode(mode)
        .statement_timeout(statement_timeout)
}

#[test]
fn the_round_trip_works_through_a_transaction_pooler() {
    let db = TestDb::empty();
    let bouncer = PgBouncer::start(&pg::server_url());
    let pooled = bouncer.url(&db.name);
    let _busy = BusyClients::start(&bouncer, &db.name, 3);

    // migrate and register through the pooler, as a new user's service would.
    let admin_options = options(
        "pooled admin",
        StatementMode::Unnamed,
        Duration::from_secs(10),
    );
    let mut admin = mbpg::connect_client(&pooled, &admin_options).expect("admin via pooler");
    mbpg::migrate(&mut admin).expect("migrate through the pooler");
    let agents: Vec<Uuid> = (0..20).map(agent).collect();
    mbpg::register_agents(&mut admin, &agents, &["cpu", "mem"]).expect("register through it");
    mbpg::register(&mut admin, agent(99), &["cpu"]).expect("register one");

    let mut subscriber = PgSubscriber::open(&db.url, METADATA_BATCH_CHANNEL, PgOptions::default())
        .expect("the subscriber connects directly");
    // Prepared (the default, which switches by itself) and unnamed from the start.
    for mode in [StatementMode::Prepared, StatementMode::Unnamed] {
        let timeout = Duration::from_secs(10);
        let store = PgStore::open(&pooled, options("pooled store", mode, timeout))
            .expect("store via pooler");
        let publisher = PgPublisher::open(&pooled, options("pooled publisher", mode, timeout))
            .expect("publisher via pooler");
        let batcher = Batcher::builder(store, publisher)
            .clock(MockClock::new())
            .build()
            .unwrap();
        for round in 0..5u64 {
            let at = pg::micros(1_764_000_000_000_000 + round + 10 * mode as u64);
            for &a in &agents {
                batcher
                    .add(
                        a,
                        vec![
                            Metadata::new("cpu", format!("{mode:?} {round}"), "", at),
                            Metadata::new("mem", "1", "", at),
                        ],
                    )
                    .unwrap();
            }
            let report = batcher.flush().expect("a flush");
            assert_eq!(
                (report.updated, report.error.clone()),
                (40, None),
                "{mode:?} round {round}: {report:?}"
            );
            let mut announced = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            while announced.len() < agents.len() && Instant::now() < deadline {
                if let Ok(Some(SubscriberEvent::Agents(some))) =
                    subscriber.next(Duration::from_secs(1))
                {
                    announced.extend(some);
                }
            }
            announced.sort();
            let mut expected = agents.clone();
            expected.sort();
            assert_eq!(announced, expected, "{mode:?} round {round}");
        }
        batcher.close();
        let mut check = db.client("mb-test check");
        assert_eq!(
            pg::row(&mut check, agents[7], "cpu").unwrap().0,
            format!("{mode:?} 4")
        );
    }
}

#[test]
fn statement_timeout_is_in_force_on_every_pooled_statement() {
    let db = TestDb::new();
    let mut setup = db.client("mb-test setup");
    setup
        .batch_execute(
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.value = 'slow' THEN PERFORM pg_sleep(5); END IF; RETURN NEW; END $$; \
             CREATE TRIGGER slow BEFORE UPDATE ON workspace_agent_metadata \
             FOR EACH ROW EXECUTE FUNCTION slow()",
        )
        .unwrap();
    mbpg::register(&mut setup, agent(1), &["cpu"]).unwrap();
    let bouncer = PgBouncer::start(&pg::server_url());
    let pooled = bouncer.url(&db.name);
    let _busy = BusyClients::start(&bouncer, &db.name, 3);
    let statement_timeout = Duration::from_millis(300);
    // The mode for poolers. A prepared session notices the pooler only when a later
    // statement lands on another server connection (it then switches to this mode), and
    // until then its settings may be on one server connection of many: docs/postgres.md.
    {
        let mode = StatementMode::Unnamed;
        let mut store = PgStore::open(&pooled, options("timed store", mode, statement_timeout))
            .expect("store via pooler");
        for i in 0..6u64 {
            let mut batch = MetadataBatch::default();
            batch.push(
                agent(1),
                Metadata::new("cpu", "slow", "", SystemTime::now()),
            );
            let started = Instant::now();
            let result = store.batch_update(&batch);
            let elapsed = started.elapsed();
            // The server's own timeout: Canceled well before the client-side deadline
            // (statement_timeout + 2 s), which would report Unavailable.
            let kind = result.as_ref().map_err(|err| (err.kind(), err.sqlstate()));
            assert_eq!(
                kind.err(),
                Some((StoreErrorKind::Canceled, Some("57014"))),
                "{mode:?} #{i}"
            );
            assert!(
                elapsed < Duration::from_millis(1500),
                "{mode:?} #{i}: {elapsed:?}"
            );
            // And a normal statement on the same store still works.
            let mut fine = MetadataBatch::default();
            fine.push(agent(1), Metadata::new("cpu", "ok", "", SystemTime::now()));
            assert_eq!(
                store.batch_update(&fine),
                Ok(Written::rows(1)),
                "{mode:?} #{i}"
            );
        }
    }
}

#[test]
fn a_subscriber_pointed_at_a_transaction_pooler_says_so() {
    let db = TestDb::new();
    let bouncer = PgBouncer::start(&pg::server_url());
    // Two transactions open at once: the pool holds two server connections from now on,
    // which pgbouncer hands out in turn (round robin), as a busy pool would.
    let mut holders: Vec<_> = (0..2)
        .map(|i| bouncer.client(&db.name, &format!("mb-test holder {i}")))
        .collect();
    for holder in &mut holders {
        holder.batch_execute("BEGIN; SELECT 1").unwrap();
    }
    for holder in &mut holders {
        holder.batch_execute("COMMIT").unwrap();
    }
    let err = PgSubscriber::open(
        &bouncer.url(&db.name),
        METADATA_BATCH_CHANNEL,
        PgOptions::default(),
    )
    .expect_err("LISTEN cannot stay on a transaction-pooled connection");
    assert_eq!(err.kind(), ConnectErrorKind::Schema, "{err}");
    assert!(err.to_string().contains("transaction-mode pooler"), "{err}");
    assert!(err.to_string().contains("directly"), "{err}");
}
