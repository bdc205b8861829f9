//! The PostgreSQL layer as production meets it, on the main test server: Coder's own table
//! (UNLOGGED, varchar columns, NOT NULL columns without defaults, a foreign key) written
//! without `migrate`; a configurable, schema-qualified table; errors that never show the
//! password and that tell configuration problems from outages; callers on an async runtime.

mod pg;

use std::time::{Duration, SystemTime};

use metadata_batcher::postgres::{
    ConnectErrorKind, PgOptions, PgPublisher, PgStore, PgSubscriber, StatementMode,
};
use metadata_batcher::{Batcher, Metadata, MockClock, Written};
use pg::{micros, TestDb};
use uuid::Uuid;

/// Coder's `workspace_agent_metadata` as its dump.sql has it, with a minimal
/// `workspace_agents` for the foreign key.
const CODER_SCHEMA: &str = "
CREATE TABLE workspace_agents (id uuid NOT NULL PRIMARY KEY, name varchar(64) NOT NULL);
CREATE UNLOGGED TABLE workspace_agent_metadata (
    workspace_agent_id uuid NOT NULL,
    display_name character varying(127) NOT NULL,
    key character varying(127) NOT NULL,
    script character varying(65535) NOT NULL,
    value character varying(65535) DEFAULT ''::character varying NOT NULL,
    error character varying(65535) DEFAULT ''::character varying NOT NULL,
    timeout bigint NOT NULL,
    \"interval\" bigint NOT NULL,
    collected_at timestamp with time zone DEFAULT '0001-01-01 00:00:00+00'::timestamp with time zone NOT NULL,
    display_order integer NOT NULL
);
ALTER TABLE ONLY workspace_agent_metadata
    ADD CONSTRAINT workspace_agent_metadata_pkey PRIMARY KEY (workspace_agent_id, key);
ALTER TABLE ONLY workspace_agent_metadata
    ADD CONSTRAINT workspace_agent_metadata_workspace_agent_id_fkey
    FOREIGN KEY (workspace_agent_id) REFERENCES workspace_agents(id) ON DELETE CASCADE;
";

/// The insert docs/postgres.md shows for Coder's schema: what registering a key means there.
const CODER_REGISTER: &str = "
INSERT INTO workspace_agent_metadata
    (workspace_agent_id, display_name, key, script, timeout, interval, display_order)
SELECT $1, k.key, k.key, '', 10, 60, k.n
FROM unnest($2::text[]) WITH ORDINALITY AS k(key, n)
ON CONFLICT DO NOTHING";

fn coder_db(agents: &[Uuid], keys: &[&str]) -> TestDb {
    let db = TestDb::empty();
    let mut client = db.client("mb-test coder schema");
    client.batch_execute(CODER_SCHEMA).expect("Coder's schema");
    for &agent in agents {
        client
            .execute(
                "INSERT INTO workspace_agents (id, name) VALUES ($1, 'main')",
                &[&agent],
            )
            .expect("agent");
        client
            .execute(CODER_REGISTER, &[&agent, &keys])
            .expect("register on Coder's schema");
    }
    db
}

fn agent(n: u128) -> Uuid {
    Uuid::from_u128(0xc0de_0000_0000_0000_0000_0000_0000_0000 | n)
}

#[test]
fn the_batcher_writes_coders_own_table_without_migrate() {
    let agents = [agent(1), agent(2)];
    let db = coder_db(&agents, &["cpu", "mem"]);
    let mut client = db.client("mb-test check");
    let persistence: String = client
        .query_one(
            "SELECT relpersistence::text FROM pg_class WHERE relname = 'workspace_agent_metadata'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(persistence, "u", "the table is UNLOGGED, as Coder's is");

    for mode in [StatementMode::Prepared, StatementMode::Unnamed] {
        let options = PgOptions::new().statement_mode(mode);
        let store = PgStore::open(&db.url, options.clone()).expect("store on Coder's table");
        let publisher = PgPublisher::open(&db.url, options).expect("publisher");
        let batcher = Batcher::builder(store, publisher)
            .clock(MockClock::new())
            .build()
            .unwrap();
        let at = micros(1_764_000_000_000_000 + mode as u64);
        for &a in &agents {
            batcher
                .add(
                    a,
                    vec![
                        Metadata::new("cpu", format!("{mode:?}"), "", at),
                        Metadata::new("mem", "1 GiB", "oom soon", at),
                    ],
                )
                .unwrap();
        }
        let report = batcher.flush().expect("a flush");
        assert_eq!((report.stored, report.updated), (4, 4), "{report:?}");
        batcher.close();
        let rows: Vec<(String, String, String)> = client
            .query(
                "SELECT key, value, error FROM workspace_agent_metadata \
                 WHERE workspace_agent_id = $1 ORDER BY key",
                &[&agents[1]],
            )
            .unwrap()
            .into_iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect();
        assert_eq!(
            rows,
            vec![
                ("cpu".to_owned(), format!("{mode:?}"), String::new()),
                ("mem".to_owned(), "1 GiB".to_owned(), "oom soon".to_owned()),
            ]
        );
    }
    // ON DELETE CASCADE: a deleted agent's rows go, and a later update of them matches
    // nothing instead of failing.
    client
        .execute("DELETE FROM workspace_agents WHERE id = $1", &[&agents[0]])
        .unwrap();
    let mut store = PgStore::open(&db.url, PgOptions::default()).unwrap();
    let mut batch = metadata_batcher::MetadataBatch::default();
    batch.push(
        agents[0],
        Metadata::new("cpu", "gone", "", SystemTime::now()),
    );
    use metadata_batcher::Store as _;
    assert_eq!(store.batch_update(&batch), Ok(Written::rows(0)));

    // The crate's own register cannot fill Coder's NOT NULL columns, and says so in the
    // server's words rather than the driver's bare "db error".
    let err = metadata_batcher::postgres::register_keys(&mut client, agents[1], &["disk"])
        .expect_err("Coder's NOT NULL columns have no defaults");
    assert_eq!(
        err.code(),
        Some(&postgres::error::SqlState::NOT_NULL_VIOLATION)
    );
    let message = err.to_string();
    assert!(
        message.contains("23502") && message.contains("display_name"),
        "{message}"
    );
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn a_schema_qualified_table_is_configurable() {
    let db = TestDb::empty();
    let mut client = db.client("mb-test custom table");
    client
        .batch_execute(
            "CREATE SCHEMA \"Coder\"; CREATE TABLE \"Coder\".agent_metadata (workspace_agent_id uuid, key text, \
             value text NOT NULL DEFAULT '', error text NOT NULL DEFAULT '', \
             collected_at timestamptz NOT NULL DEFAULT '0001-01-01', \
             PRIMARY KEY (workspace_agent_id, key)); \
             INSERT INTO \"Coder\".agent_metadata (workspace_agent_id, key) \
             VALUES ('00000000-0000-0000-0000-000000000007', 'cpu')",
        )
        .unwrap();
    let options = PgOptions::new().table("Coder.agent_metadata".to_owned());
    let mut store = PgStore::open(&db.url, options).expect("the qualified table");
    let mut batch = metadata_batcher::MetadataBatch::default();
    batch.push(
        Uuid::from_u128(7),
        Metadata::new("cpu", "9%", "", SystemTime::now()),
    );
    use metadata_batcher::Store as _;
    assert_eq!(store.batch_update(&batch), Ok(Written::rows(1)));

    // The default table does not exist here: a configuration problem, said at connect.
    let err = PgStore::open(&db.url, PgOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ConnectErrorKind::Schema, "{err}");
    assert!(
        err.to_string().contains("workspace_agent_metadata"),
        "{err}"
    );
    assert!(err.to_string().contains("PgOptions::table"), "{err}");
}

#[test]
fn errors_tell_configuration_from_outage_and_never_show_the_password() {
    let secret = "s3cr3t-Pa55";
    let url = format!("postgres://nobody:{secret}@127.0.0.1:5432/postgres?sslmode=disable");
    let err = PgStore::open(&url, PgOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ConnectErrorKind::Authentication, "{err}");
    assert!(err.kind().is_config_problem());

    let refused = PgStore::open(
        "postgres://postgres@127.0.0.1:1/postgres",
        PgOptions::default(),
    )
    .unwrap_err();
    assert_eq!(refused.kind(), ConnectErrorKind::Unavailable, "{refused}");
    assert!(refused.to_string().contains("refused"), "{refused}");
    assert!(std::error::Error::source(&refused).is_some());

    let bad_mode = PgStore::open(
        &format!("postgres://u:{secret}@localhost/db?sslmode=verify-all"),
        PgOptions::default(),
    )
    .unwrap_err();
    assert_eq!(bad_mode.kind(), ConnectErrorKind::Config);
    assert!(bad_mode.to_string().contains("verify-all"), "{bad_mode}");

    let bad_port = PgStore::open(
        &format!("postgres://u:{secret}@localhost:notaport/db"),
        PgOptions::default(),
    )
    .unwrap_err();
    assert_eq!(bad_port.kind(), ConnectErrorKind::Config, "{bad_port}");

    let mut config = postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(1)
        .user("nobody")
        .password(secret);
    let from_config =
        PgStore::open_config(config, postgres::NoTls, PgOptions::default()).unwrap_err();

    let db = TestDb::new();
    let with_password = format!(
        "{}{}password={secret}",
        db.url,
        if db.url.contains('?') { "&" } else { "?" }
    );
    let store = PgStore::open(&with_password, PgOptions::default()).expect("trust ignores it");
    let publisher = PgPublisher::open(&with_password, PgOptions::default()).unwrap();
    let subscriber = PgSubscriber::open(&with_password, "chan", PgOptions::default()).unwrap();
    for text in [
        err.to_string(),
        format!("{err:?}"),
        refused.to_string(),
        bad_mode.to_string(),
        format!("{bad_mode:?}"),
        bad_port.to_string(),
        format!("{bad_port:?}"),
        from_config.to_string(),
        format!("{from_config:?}"),
        format!("{store:?}"),
        format!("{publisher:?}"),
        format!("{subscriber:?}"),
    ] {
        assert!(!text.contains(secret), "the password leaked: {text}");
    }
    assert!(format!("{store:?}").contains("sslmode"), "{store:?}");
}

/// `PgStore` connects on a thread of its own and shuts its runtime down without waiting, so
/// its constructor and drop do not panic on an async runtime's thread; connecting and
/// closing do block that thread, which is why docs/postgres.md shows `spawn_blocking`.
/// `add` never blocks.
#[test]
fn async_callers_use_spawn_blocking_for_connect_and_close() {
    let db = TestDb::new();
    let mut client = db.client("mb-test async");
    metadata_batcher::postgres::register(&mut client, agent(9), &["cpu"]).unwrap();
    let runtime = async_runtime();
    let url = db.url.clone();
    let flushed = runtime.block_on(async move {
        let batcher = tokio::task::spawn_blocking(move || {
            let store = PgStore::connect(&url)?;
            let publisher = PgPublisher::connect(&url)
                .map_err(|err| metadata_batcher::StoreError::unavailable(err.to_string()))?;
            Ok::<_, metadata_batcher::StoreError>(
                Batcher::builder(store, publisher)
                    .interval(Duration::from_secs(3600))
                    .build()
                    .unwrap(),
            )
        })
        .await
        .unwrap()
        .unwrap();
        // `add` never blocks: fine on the runtime's own thread.
        batcher
            .add(
                agent(9),
                vec![Metadata::new("cpu", "async", "", SystemTime::now())],
            )
            .unwrap();
        let batcher = std::sync::Arc::new(batcher);
        let closing = batcher.clone();
        tokio::task::spawn_blocking(move || {
            closing.close();
            closing.stats().flushed
        })
        .await
        .unwrap()
    });
    assert_eq!(flushed, 1);
    assert_eq!(pg::row(&mut client, agent(9), "cpu").unwrap().0, "async");
}

/// An async application's runtime, with one worker thread.
fn async_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// Constructing and dropping a store or publisher on an async runtime's own thread blocks
/// it while connecting, but does not panic: their sessions' runtime is neither entered nor
/// waited for on that thread.
#[test]
fn a_store_and_publisher_made_and_dropped_on_an_async_thread_do_not_panic() {
    let db = TestDb::new();
    let runtime = async_runtime();
    let url = db.url.clone();
    let made = runtime.block_on(async move {
        let store = PgStore::connect(&url);
        let publisher = PgPublisher::connect(&url);
        (store.is_ok(), publisher.is_ok())
    });
    assert_eq!(made, (true, true));
}
