//! `PgPublisher` and `PgSubscriber` against a real PostgreSQL server.

mod pg;

use std::time::Duration;

use metadata_batcher::postgres::{
    PgOptions, PgPublisher, PgSubscriber, SubscribeError, SubscriberEvent,
};
use metadata_batcher::{agent_ids, Publisher, METADATA_BATCH_CHANNEL};
use pg::TestDb;
use uuid::Uuid;

/// Long enough for any loaded CI machine; a passing test never waits it out.
const WAIT: Duration = Duration::from_secs(10);

fn options(application_name: &str) -> PgOptions {
    PgOptions::new().application_name(application_name)
}

fn agents(n: u128) -> Vec<Uuid> {
    (0..n).map(|i| Uuid::from_u128(0x5eed_0000 + i)).collect()
}

fn next_agents(subscriber: &mut PgSubscriber) -> Vec<Uuid> {
    match subscriber.next(WAIT) {
        Ok(Some(SubscriberEvent::Agents(agents))) => agents,
        other => panic!("expected agents, got {other:?}"),
    }
}

/// Publishes `n` agents on `channel` from a fresh publisher and checks that `subscriber`
/// receives exactly them: proof that its subscription works.
fn assert_receives(db: &TestDb, subscriber: &mut PgSubscriber, channel: &str, n: u128) {
    let ids = agents(n);
    PgPublisher::connect(&db.url)
        .unwrap()
        .publish(channel, &agent_ids::encode_chunks(&ids)[0])
        .unwrap();
    assert_eq!(next_agents(subscriber), ids);
}

#[test]
fn thousand_agents_arrive_as_three_payloads() {
    let db = TestDb::new();
    let mut subscriber = PgSubscriber::listen(&db.url, METADATA_BATCH_CHANNEL).unwrap();
    let mut publisher = PgPublisher::connect(&db.url).unwrap();

    let ids = agents(1_000);
    let chunks = agent_ids::encode_chunks(&ids);
    assert_eq!(chunks.len(), 3);
    for chunk in &chunks {
        publisher.publish(METADATA_BATCH_CHANNEL, chunk).unwrap();
    }

    let mut received = Vec::new();
    for _ in 0..3 {
        received.extend(next_agents(&mut subscriber));
    }
    assert_eq!(received, ids);
    assert_eq!(subscriber.next(Duration::from_millis(50)), Ok(None));
    assert_eq!(subscriber.malformed(), 0);
}

#[test]
fn malformed_payload_is_counted_and_skipped() {
    let db = TestDb::new();
    let mut subscriber = PgSubscriber::listen(&db.url, METADATA_BATCH_CHANNEL).unwrap();
    let mut raw = db.client("mb-test foreign publisher");
    for payload in [
        "not base64!",
        "*********************x",
        "AAAAAAAAAAAAAAAAAAAAA=",
    ] {
        raw.execute(
            "SELECT pg_notify($1, $2)",
            &[&METADATA_BATCH_CHANNEL, &payload],
        )
        .unwrap();
    }
    let mut publisher = PgPublisher::connect(&db.url).unwrap();
    let ids = agents(2);
    publisher
        .publish(METADATA_BATCH_CHANNEL, &agent_ids::encode_chunks(&ids)[0])
        .unwrap();

    assert_eq!(next_agents(&mut subscriber), ids);
    assert_eq!(subscriber.malformed(), 3);
}

#[test]
fn subscriber_survives_its_backend_being_terminated() {
    let db = TestDb::new();
    let mut subscriber = PgSubscriber::listen_with(
        &db.url,
        METADATA_BATCH_CHANNEL,
        options("mb-test subscriber"),
    )
    .unwrap();
    assert_eq!(db.terminate("mb-test subscriber"), 1);

    assert_eq!(
        subscriber.next(WAIT),
        Ok(Some(SubscriberEvent::Reconnected))
    );
    assert_receives(&db, &mut subscriber, METADATA_BATCH_CHANNEL, 5);
}

#[test]
fn subscriber_reports_an_outage_and_reconnects_after_it() {
    let db = TestDb::new();
    let mut subscriber = PgSubscriber::listen_with(
        &db.url,
        METADATA_BATCH_CHANNEL,
        options("mb-test subscriber"),
    )
    .unwrap();
    let mut admin = db.admin();
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS false",
            db.name
        ))
        .unwrap();
    db.terminate("mb-test subscriber");

    // The timeout is honoured while the database refuses connections.
    let started = std::time::Instant::now();
    let err = subscriber.next(Duration::from_millis(300)).unwrap_err();
    assert!(
        matches!(&err, SubscribeError::Unavailable(m) if m.contains("55000")),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            db.name
        ))
        .unwrap();
    assert_eq!(
        subscriber.next(WAIT),
        Ok(Some(SubscriberEvent::Reconnected))
    );
    assert_receives(&db, &mut subscriber, METADATA_BATCH_CHANNEL, 1);
}

#[test]
fn publisher_reconnects_after_its_backend_is_terminated() {
    let db = TestDb::new();
    let mut subscriber = PgSubscriber::listen(&db.url, METADATA_BATCH_CHANNEL).unwrap();
    let mut publisher = PgPublisher::connect_with(&db.url, options("mb-test publisher")).unwrap();
    let ids = agents(3);
    let payload = &agent_ids::encode_chunks(&ids)[0];
    publisher.publish(METADATA_BATCH_CHANNEL, payload).unwrap();
    assert_eq!(next_agents(&mut subscriber), ids);

    db.terminate("mb-test publisher");
    // The ended session is noticed before the statement: this very publish reconnects.
    publisher.publish(METADATA_BATCH_CHANNEL, payload).unwrap();
    assert_eq!(next_agents(&mut subscriber), ids);
}

#[test]
fn oversized_payload_is_refused_before_the_server() {
    let db = TestDb::new();
    let mut publisher = PgPublisher::connect_with(&db.url, options("mb-test publisher")).unwrap();
    let err = publisher
        .publish(METADATA_BATCH_CHANNEL, &[b'A'; 8000])
        .unwrap_err();
    assert!(err.message().contains("8000"), "{err}");
    // 7,999 bytes is PostgreSQL's largest payload; it goes through.
    publisher
        .publish(METADATA_BATCH_CHANNEL, &[b'A'; 7999])
        .unwrap();
    let err = publisher
        .publish(METADATA_BATCH_CHANNEL, &[0xff, 0xfe])
        .unwrap_err();
    assert!(err.message().contains("UTF-8"), "{err}");
}

#[test]
fn channel_names_are_quoted_and_checked() {
    let db = TestDb::new();
    let channel = "Mixed Case \"quoted\" channel";
    let mut subscriber = PgSubscriber::listen(&db.url, channel).unwrap();
    assert_eq!(subscriber.channel(), channel);
    assert_receives(&db, &mut subscriber, channel, 1);

    for bad in ["", &"c".repeat(64)] {
        let err = PgSubscriber::listen(&db.url, bad).expect_err("invalid channel");
        assert!(matches!(err, SubscribeError::InvalidChannel(_)), "{err:?}");
    }
    let err = PgSubscriber::listen("::not a url::", "c").expect_err("invalid URL");
    assert!(matches!(err, SubscribeError::InvalidUrl(_)), "{err:?}");
    let err = PgPublisher::connect("postgres://postgres@127.0.0.1:1/postgres")
        .expect_err("nothing listens on port 1");
    assert!(err.message().contains("refused"), "{err}");
}

#[test]
fn arbitrary_payloads_never_end_the_subscription() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let db = TestDb::new();
    // The runner takes a `Fn`; the connections are reused by every case.
    let connections = std::cell::RefCell::new((
        PgSubscriber::listen(&db.url, METADATA_BATCH_CHANNEL).unwrap(),
        db.client("mb-test foreign publisher"),
    ));
    let sentinel = agents(1);
    let sentinel_payload =
        String::from_utf8(agent_ids::encode_chunks(&sentinel).remove(0)).expect("base64 is ASCII");
    // Any text PostgreSQL accepts as a payload: no NUL, and base64-looking strings often,
    // so that near-valid payloads are tried as well as garbage.
    let payload = prop_oneof![
        "[^\u{0}]{0,300}",
        "[A-Za-z0-9+/]{0,100}",
        "([A-Za-z0-9+/]{21}[AQgw]){1,5}",
    ];
    let mut runner = TestRunner::new(Config {
        cases: 64,
        ..Config::default()
    });
    runner
        .run(&proptest::collection::vec(payload, 1..4), |payloads| {
            let (subscriber, raw) = &mut *connections.borrow_mut();
            let malformed_before = subscriber.malformed();
            let mut valid = 0;
            for payload in &payloads {
                raw.execute(
                    "SELECT pg_notify($1, $2)",
                    &[&METADATA_BATCH_CHANNEL, payload],
                )
                .unwrap();
                valid += usize::from(agent_ids::decode_chunk(payload.as_bytes()).is_ok());
            }
            raw.execute(
                "SELECT pg_notify($1, $2)",
                &[&METADATA_BATCH_CHANNEL, &sentinel_payload],
            )
            .unwrap();
            // Every payload is handed out as agents, counted as malformed, or empty (no
            // agents, as Go decodes it: skipped); then the sentinel.
            let empty = payloads.iter().filter(|payload| payload.is_empty()).count();
            for _ in 0..valid {
                assert!(matches!(
                    subscriber.next(WAIT),
                    Ok(Some(SubscriberEvent::Agents(_)))
                ));
            }
            assert_eq!(next_agents(subscriber), sentinel);
            let malformed = subscriber.malformed() - malformed_before;
            prop_assert_eq!(malformed as usize, payloads.len() - valid - empty);
            Ok(())
        })
        .unwrap();
}

#[test]
fn empty_payload_is_no_agents_and_not_malformed() {
    let db = TestDb::new();
    let mut subscriber = PgSubscriber::listen(&db.url, METADATA_BATCH_CHANNEL).unwrap();
    // An empty NOTIFY, as a foreign publisher may send; Go's decoder reads it as no agents.
    db.client("mb-test foreign publisher")
        .execute("SELECT pg_notify($1, '')", &[&METADATA_BATCH_CHANNEL])
        .unwrap();
    // The next event is the real payload after it: the empty one was skipped, uncounted.
    assert_receives(&db, &mut subscriber, METADATA_BATCH_CHANNEL, 2);
    assert_eq!(subscriber.malformed(), 0);
}
