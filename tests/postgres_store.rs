//! `PgStore`, the schema and error classification against a real PostgreSQL server.

mod pg;

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use metadata_batcher::postgres::{self as mbpg, PgOptions, PgStore, StatementMode};
use metadata_batcher::{
    BatchResult, Metadata, MetadataBatch, Store, StoreError, StoreErrorKind, Written,
};
use pg::{micros, row, row_count, TestDb};
use postgres::tls::{MakeTlsConnect, NoTlsError, NoTlsStream};
use postgres::{NoTls, Socket};
use uuid::Uuid;

fn options(application_name: &str) -> PgOptions {
    PgOptions::new().application_name(application_name)
}

fn batch(rows: &[(Uuid, &str, &str, u64)]) -> MetadataBatch {
    let mut batch = MetadataBatch::default();
    for &(agent, key, value, at) in rows {
        batch.push(agent, Metadata::new(key, value, "", micros(at)));
    }
    batch
}

fn agent(n: u128) -> Uuid {
    Uuid::from_u128(0xa9e0_0000_0000_0000_0000_0000_0000_0000 | n)
}

#[test]
fn round_trip_exact_values_and_timestamps() {
    let db = TestDb::new();
    let mut client = db.client("mb-test check");
    mbpg::register_agents(&mut client, &[agent(1), agent(2)], &["cpu", "mem"]).unwrap();
    let mut store = PgStore::connect(&db.url).unwrap();

    let mut batch = MetadataBatch::default();
    let at = micros(1_764_000_000_123_456);
    batch.push(agent(1), Metadata::new("cpu", "42%", "", at));
    batch.push(agent(1), Metadata::new("mem", "", "exit status 1", at));
    batch.push(
        agent(2),
        Metadata::new("cpu", "ünïcødé ✓ 'quoted'", "", micros(1)),
    );
    // Before 1970 and before 2000 (PostgreSQL's epoch) must survive too.
    let early = std::time::SystemTime::UNIX_EPOCH - Duration::from_micros(86_400_000_001);
    batch.push(agent(2), Metadata::new("mem", "old", "", early));
    assert_eq!(store.batch_update(&batch).unwrap(), Written::rows(4));

    assert_eq!(
        row(&mut client, agent(1), "cpu"),
        Some(("42%".into(), "".into(), at))
    );
    assert_eq!(
        row(&mut client, agent(1), "mem"),
        Some(("".into(), "exit status 1".into(), at))
    );
    assert_eq!(
        row(&mut client, agent(2), "cpu"),
        Some(("ünïcødé ✓ 'quoted'".into(), "".into(), micros(1)))
    );
    assert_eq!(
        row(&mut client, agent(2), "mem"),
        Some(("old".into(), "".into(), early))
    );
}

#[test]
fn unknown_rows_are_neither_created_nor_counted() {
    let db = TestDb::new();
    let mut client = db.client("mb-test check");
    assert_eq!(mbpg::register(&mut client, agent(1), &["cpu"]).unwrap(), 1);
    let mut store = PgStore::connect(&db.url).unwrap();

    let updated = store
        .batch_update(&batch(&[
            (agent(1), "cpu", "1", 10),
            (agent(1), "invented", "2", 10),
            (agent(9), "cpu", "3", 10),
        ]))
        .unwrap();
    assert_eq!(updated, Written::rows(1));
    assert_eq!(row_count(&mut client), 1);
    assert_eq!(row(&mut client, agent(1), "invented"), None);
}

#[test]
fn older_collected_at_never_overwrites_newer() {
    let db = TestDb::new();
    let mut client = db.client("mb-test check");
    mbpg::register_agents(&mut client, &[agent(1)], &["a", "b"]).unwrap();
    let mut store = PgStore::connect(&db.url).unwrap();

    assert_eq!(
        store
            .batch_update(&batch(&[
                (agent(1), "a", "new", 2_000),
                (agent(1), "b", "new", 2_000)
            ]))
            .unwrap(),
        Written::rows(2)
    );
    // Older: ignored and not counted. Equal: a retried write of the same moment applies.
    let updated = store
        .batch_update(&batch(&[
            (agent(1), "a", "older", 1_999),
            (agent(1), "b", "same", 2_000),
        ]))
        .unwrap();
    assert_eq!(updated, Written::rows(1));
    assert_eq!(row(&mut client, agent(1), "a").unwrap().0, "new");
    assert_eq!(row(&mut client, agent(1), "b").unwrap().0, "same");
}

#[test]
fn register_is_idempotent_and_bulk() {
    let db = TestDb::new();
    let mut client = db.client("mb-test check");
    let agents: Vec<Uuid> = (0..1_000).map(agent).collect();
    let keys = ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9"];
    assert_eq!(
        mbpg::register_agents(&mut client, &agents, &keys).unwrap(),
        10_000
    );
    assert_eq!(
        mbpg::register_agents(&mut client, &agents, &keys).unwrap(),
        0
    );
    assert_eq!(
        mbpg::register(&mut client, agent(5), &["k0", "new"]).unwrap(),
        1
    );
    assert_eq!(row_count(&mut client), 10_001);
    let (value, error, at) = row(&mut client, agent(5), "new").unwrap();
    assert_eq!((value.as_str(), error.as_str()), ("", ""));
    assert!(
        at < std::time::SystemTime::UNIX_EPOCH,
        "default collected_at is year 1"
    );
}

#[test]
fn migrate_is_idempotent_and_safe_in_parallel() {
    let db = TestDb::empty();
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let mut client = db.client(&format!("mb-test migrate {i}"));
            thread::spawn(move || mbpg::migrate(&mut client))
        })
        .collect();
    for thread in threads {
        thread.join().unwrap().unwrap();
    }
    let mut client = db.client("mb-test check");
    mbpg::migrate(&mut client).unwrap();
    let fillfactor: Option<Vec<String>> = client
        .query_one(
            "SELECT reloptions FROM pg_class WHERE relname = 'workspace_agent_metadata'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(fillfactor, Some(vec!["fillfactor=80".to_owned()]));
}

#[test]
fn check_violation_is_rejected_with_the_servers_message() {
    let db = TestDb::new();
    let mut client = db.client("mb-test check");
    mbpg::register_agents(&mut client, &[agent(1), agent(2)], &["a", "b"]).unwrap();
    client
        .batch_execute(
            "ALTER TABLE workspace_agent_metadata ADD CONSTRAINT no_poison CHECK (value <> 'poison')",
        )
        .unwrap();
    // Unnamed: the transaction's BEGIN, statement and COMMIT go out together, and the
    // refused statement must leave no transaction open behind it.
    for (mode, agent) in [
        (StatementMode::Prepared, agent(1)),
        (StatementMode::Unnamed, agent(2)),
    ] {
        let options = PgOptions::new().statement_mode(mode);
        let mut store = PgStore::connect_with(&db.url, options).unwrap();

        let err = store
            .batch_update(&batch(&[
                (agent, "a", "fine", 1),
                (agent, "b", "poison", 1),
            ]))
            .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Rejected, "{mode:?}: {err:?}");
        let message = err.message();
        assert!(message.contains("23514"), "{mode:?}: {message}");
        assert!(message.contains("no_poison"), "{mode:?}: {message}");
        // The statement is atomic: the good row was not written either.
        assert_eq!(row(&mut client, agent, "a").unwrap().0, "", "{mode:?}");
        // The session survives a rejection.
        assert_eq!(
            store
                .batch_update(&batch(&[(agent, "a", "fine", 1)]))
                .unwrap(),
            Written::rows(1),
            "{mode:?}"
        );
        assert_eq!(row(&mut client, agent, "a").unwrap().0, "fine", "{mode:?}");
    }
}

#[test]
fn timestamp_out_of_range_is_rejected() {
    let db = TestDb::new();
    let mut client = db.client("mb-test check");
    mbpg::register(&mut client, agent(1), &["a"]).unwrap();
    let mut store = PgStore::connect(&db.url).unwrap();
    // About 20,000 years before 1970: before 4713 BC, the earliest timestamptz.
    let prehistoric = std::time::SystemTime::UNIX_EPOCH - Duration::from_secs(700_000_000_000);
    let mut batch = MetadataBatch::default();
    batch.push(agent(1), Metadata::new("a", "v", "", prehistoric));
    let err = store.batch_update(&batch).unwrap_err();
    assert!(
        err.kind() == StoreErrorKind::Rejected && {
            let message = err.message();
            message.contains("22008")
        },
        "{err:?}"
    );
}

#[test]
fn statement_timeout_cancels_a_slow_statement() {
    let db = TestDb::new();
    let mut client = db.client("mb-test check");
    mbpg::register(&mut client, agent(1), &["a"]).unwrap();
    // A trigger that sleeps makes the store's own statement slow, as a struggling server would.
    client
        .batch_execute(
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS \
               $$ BEGIN PERFORM pg_sleep(5); RETURN NEW; END $$; \
             CREATE TRIGGER slow BEFORE UPDATE ON workspace_agent_metadata \
               FOR EACH ROW EXECUTE FUNCTION slow();",
        )
        .unwrap();
    let mut store = PgStore::connect_with(
        &db.url,
        options("mb-test store").statement_timeout(Duration::from_millis(200)),
    )
    .unwrap();

    let started = Instant::now();
    let err = store
        .batch_update(&batch(&[(agent(1), "a", "v", 1)]))
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Canceled, "{err:?}");
    assert_eq!(err.sqlstate(), Some("57014"), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );

    client
        .batch_execute("DROP TRIGGER slow ON workspace_agent_metadata")
        .unwrap();
    assert_eq!(
        store
            .batch_update(&batch(&[(agent(1), "a", "v", 1)]))
            .unwrap(),
        Written::rows(1)
    );
}

#[test]
fn terminated_connection_is_reopened_by_a_later_call() {
    let db = TestDb::new();
    let mut client = db.client("mb-test check");
    mbpg::register(&mut client, agent(1), &["a"]).unwrap();
    let mut store = PgStore::connect_with(&db.url, options("mb-test store")).unwrap();
    assert_eq!(
        store
            .batch_update(&batch(&[(agent(1), "a", "1", 1)]))
            .unwrap(),
        Written::rows(1)
    );

    assert_eq!(db.terminate("mb-test store"), 1);

    // The server's termination notice is already on the socket: the store sees it before
    // running the statement and reconnects, so not even this call fails.
    assert_eq!(
        store
            .batch_update(&batch(&[(agent(1), "a", "2", 2)]))
            .unwrap(),
        Written::rows(1)
    );
    assert_eq!(
        store
            .batch_update(&batch(&[(agent(1), "a", "3", 3)]))
            .unwrap(),
        Written::rows(1)
    );
    assert_eq!(row(&mut client, agent(1), "a").unwrap().0, "3");
}

#[test]
fn database_refusing_connections_is_unavailable_until_restored() {
    let db = TestDb::new();
    let mut client = db.client("mb-test check");
    mbpg::register(&mut client, agent(1), &["a"]).unwrap();
    drop(client);
    let mut store = PgStore::connect_with(&db.url, options("mb-test store")).unwrap();
    assert_eq!(
        store
            .batch_update(&batch(&[(agent(1), "a", "1", 1)]))
            .unwrap(),
        Written::rows(1)
    );

    let mut admin = db.admin();
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS false",
            db.name
        ))
        .unwrap();
    db.terminate("mb-test store");

    // The first call may fail on the dead session; the one after must fail reconnecting.
    for _ in 0..2 {
        let err = store
            .batch_update(&batch(&[(agent(1), "a", "2", 2)]))
            .unwrap_err();
        assert!(err.kind() == StoreErrorKind::Unavailable, "{err:?}");
    }
    let err = store
        .batch_update(&batch(&[(agent(1), "a", "2", 2)]))
        .unwrap_err();
    assert!(
        err.kind() == StoreErrorKind::Unavailable && {
            let m = err.message();
            m.contains("55000") && m.contains("not currently accepting connections")
        },
        "{err:?}"
    );
    assert!(
        store.interrupt_handle().is_none(),
        "no session, nothing to cancel"
    );

    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            db.name
        ))
        .unwrap();
    assert_eq!(
        store
            .batch_update(&batch(&[(agent(1), "a", "2", 2)]))
            .unwrap(),
        Written::rows(1)
    );
    assert_eq!(
        row(&mut db.client("mb-test check"), agent(1), "a")
            .unwrap()
            .0,
        "2"
    );
}

#[test]
fn interrupt_cancels_a_statement_blocked_on_a_row_lock() {
    let db = TestDb::new();
    let mut locker = db.client("mb-test locker");
    mbpg::register(&mut locker, agent(1), &["a"]).unwrap();
    let mut store = PgStore::connect_with(&db.url, options("mb-test store")).unwrap();

    let mut transaction = locker.transaction().unwrap();
    transaction
        .execute("SELECT 1 FROM workspace_agent_metadata FOR UPDATE", &[])
        .unwrap();

    let interrupt = store
        .interrupt_handle()
        .expect("an open session can be interrupted");
    let started = Instant::now();
    let writer = thread::spawn(move || {
        let result = store.batch_update(&batch(&[(agent(1), "a", "v", 1)]));
        (store, result)
    });
    db.wait_for_lock_wait("mb-test store");
    interrupt.fire();
    let (mut store, result) = writer.join().unwrap();
    assert_eq!(result, Err(StoreError::canceled()));
    // Well below the 10 s statement timeout: the cancel request ended it.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    transaction.rollback().unwrap();
    assert_eq!(
        store
            .batch_update(&batch(&[(agent(1), "a", "v", 1)]))
            .unwrap(),
        Written::rows(1)
    );
}

/// Issue 21's suspected case, confirmed: an interrupt fired after the batcher took it but
/// before the statement started (while its parameters were encoded) was drained as
/// stale, so the statement ran on to its deadline. The store goes through a proxy that
/// black-holes new connections, so the cancel request never arrives: only the stop the
/// interrupt left for the session can end the statement.
#[test]
fn an_interrupt_fired_before_the_statement_starts_stops_it() {
    let db = TestDb::new();
    let mut locker = db.client("mb-test early locker");
    mbpg::register(&mut locker, agent(1), &["a"]).unwrap();
    let proxy = pg::proxy::Proxy::in_front_of(&db.url);
    let mut store =
        PgStore::connect_with(&proxy.url(&db.url), options("mb-test early store")).unwrap();
    let mut transaction = locker.transaction().unwrap();
    transaction
        .execute("SELECT 1 FROM workspace_agent_metadata FOR UPDATE", &[])
        .unwrap();

    proxy.black_hole_new();
    let interrupt = store
        .interrupt_handle()
        .expect("an open session can be interrupted");
    interrupt.fire();
    let started = Instant::now();
    let result = store.batch_update(&batch(&[(agent(1), "a", "v", 1)]));
    assert_eq!(result, Err(StoreError::canceled()));
    // Well below the 2 s lock timeout it would otherwise wait for.
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    proxy.heal_all();
    transaction.rollback().unwrap();
    // A handle taken now is fresh: the next call runs.
    drop(store.interrupt_handle());
    assert_eq!(
        store
            .batch_update(&batch(&[(agent(1), "a", "v", 1)]))
            .unwrap(),
        Written::rows(1)
    );
}

#[test]
fn connect_failures_are_unavailable_and_say_why() {
    let err = PgStore::connect("not a url at all").expect_err("invalid URL");
    assert!(
        err.kind() == StoreErrorKind::Unavailable && {
            let m = err.message();
            m.contains("invalid PostgreSQL configuration") && m.contains("connection string")
        },
        "{err:?}"
    );
    // Port 1 is never PostgreSQL: the connection is refused at once.
    let err = PgStore::connect("postgres://postgres@127.0.0.1:1/postgres")
        .expect_err("nothing listens on port 1");
    assert!(
        err.kind() == StoreErrorKind::Unavailable && {
            let m = err.message();
            m.contains("refused")
        },
        "{err:?}"
    );

    // Without the migration the statement cannot be prepared: say so at connect.
    let db = TestDb::empty();
    let err = PgStore::connect(&db.url).expect_err("no table");
    assert!(
        err.kind() == StoreErrorKind::Unavailable && {
            let m = err.message();
            m.contains("workspace_agent_metadata")
        },
        "{err:?}"
    );
}

#[test]
fn parallel_statements_run_on_sessions_of_their_own_and_one_interrupt_stops_them_all() {
    const NAME: &str = "mb-test parallel store";
    let db = TestDb::new();
    let mut locker = db.client("mb-test locker");
    let agents: Vec<Uuid> = (1..=4).map(agent).collect();
    mbpg::register_agents(&mut locker, &agents, &["a"]).unwrap();
    let mut store = PgStore::connect_with(
        &db.url,
        options(NAME)
            .parallel_statements(2)
            // Only the interrupt ends a wait for a lock here.
            .lock_timeout(Duration::ZERO),
    )
    .unwrap();
    assert_eq!(store.capabilities().parallel_batches(), 2);
    let sessions = |admin: &mut postgres::Client| -> i64 {
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
                &[&db.name, &NAME],
            )
            .unwrap()
            .get(0)
    };
    let mut admin = db.admin();
    // One session until a call carries two statements.
    assert_eq!(sessions(&mut admin), 1);
    let results = store.batch_update_many(&[
        batch(&[(agent(1), "a", "v1", 1), (agent(2), "a", "v1", 1)]),
        batch(&[(agent(3), "a", "v1", 1), (agent(4), "a", "v1", 1)]),
    ]);
    assert_eq!(
        results,
        [
            BatchResult::Written(Written::rows(2)),
            BatchResult::Written(Written::rows(2))
        ]
    );
    assert_eq!(sessions(&mut admin), 2);

    // Each statement waits on a row another session holds, at the same time.
    let mut transaction = locker.transaction().unwrap();
    transaction
        .execute(
            "SELECT 1 FROM workspace_agent_metadata WHERE workspace_agent_id = ANY($1) FOR UPDATE",
            &[&vec![agent(1), agent(4)]],
        )
        .unwrap();
    let interrupt = store
        .interrupt_handle()
        .expect("open sessions can be interrupted");
    let started = Instant::now();
    let writer = thread::spawn(move || {
        let results = store.batch_update_many(&[
            batch(&[(agent(1), "a", "v2", 2)]),
            batch(&[(agent(4), "a", "v2", 2)]),
        ]);
        (store, results)
    });
    pg::wait_until("both statements wait on their locks", || {
        pg::lock_waiters(&mut admin, &db.name, NAME) == 2
    });
    interrupt.fire();
    let (mut store, results) = writer.join().unwrap();
    assert_eq!(
        results,
        [
            BatchResult::Failed(StoreError::canceled()),
            BatchResult::Failed(StoreError::canceled())
        ]
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // The interrupted sessions were replaced; the next call writes through new ones.
    transaction.rollback().unwrap();
    let results = store.batch_update_many(&[
        batch(&[(agent(1), "a", "v3", 3)]),
        batch(&[(agent(4), "a", "v3", 3)]),
    ]);
    assert_eq!(
        results,
        [
            BatchResult::Written(Written::rows(1)),
            BatchResult::Written(Written::rows(1))
        ]
    );
    assert_eq!(row(&mut locker, agent(4), "a").unwrap().0, "v3");
}

/// A TLS connector of the caller's own (plaintext underneath) that panics while the flag
/// is set: a bug in the client or a connector, met while reconnecting.
#[derive(Clone)]
struct PanickyConnector(Arc<AtomicBool>);

impl MakeTlsConnect<Socket> for PanickyConnector {
    type Stream = NoTlsStream;
    type TlsConnect = NoTls;
    type Error = NoTlsError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<NoTls, NoTlsError> {
        assert!(!self.0.load(SeqCst), "injected connector panic");
        MakeTlsConnect::<Socket>::make_tls_connect(&mut NoTls, domain)
    }
}

#[test]
fn a_panic_in_the_client_fails_the_call_as_unavailable_and_the_next_call_reconnects() {
    const NAME: &str = "mb-test panicky store";
    let db = TestDb::new();
    let mut client = db.client("mb-test check");
    mbpg::register(&mut client, agent(1), &["a"]).unwrap();
    let panicking = Arc::new(AtomicBool::new(false));
    let config: postgres::Config = db.url.parse().unwrap();
    let mut store =
        PgStore::open_config(config, PanickyConnector(panicking.clone()), options(NAME)).unwrap();
    assert_eq!(
        store.batch_update(&batch(&[(agent(1), "a", "1", 1)])),
        Ok(Written::rows(1))
    );

    // The session ends; the next call reconnects, and the connector panics.
    assert_eq!(db.terminate(NAME), 1);
    panicking.store(true, SeqCst);
    let result = store.batch_update(&batch(&[(agent(1), "a", "2", 2)]));
    let Err(error) = &result else {
        panic!("{result:?}");
    };
    assert_eq!(error.kind(), StoreErrorKind::Unavailable, "{error:?}");
    let message = error.message();
    assert!(message.contains("panicked"), "{message}");

    panicking.store(false, SeqCst);
    assert_eq!(
        store.batch_update(&batch(&[(agent(1), "a", "3", 3)])),
        Ok(Written::rows(1))
    );
    assert_eq!(row(&mut client, agent(1), "a").unwrap().0, "3");
}
