//! The service example (`examples/service.rs`) run as a user would: the built binary on a
//! port the OS picks, against a throwaway database, driven over HTTP by several client
//! threads with a real HTTP client, and stopped with SIGTERM. The process and the HTTP
//! calls are [`service_process`]'s.
//!
//! Only one wait polls: readiness past `--max-lag`, the state of a real process that
//! offers nothing to block on.

mod pg;
mod service_process;

use std::collections::HashMap;
use std::thread;
use std::time::SystemTime;

use pg::TestDb;
use service_process::{client, close_report, field, get, post, put, scrape, Service, EXIT_LIMIT};
use uuid::Uuid;

/// The service's exit code when `close()` left entries unwritten.
const EXIT_UNWRITTEN: i32 = 3;

// ---------------------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------------------

const AGENTS: usize = 8;
const CLIENTS: usize = 4;
const REPORTS_PER_AGENT: u32 = 25;
const KEYS: [&str; 5] = ["cpu", "mem", "disk", "load", "uptime"];

#[test]
fn reports_from_many_clients_are_written_newest_and_sigterm_closes_cleanly() {
    let db = TestDb::new();
    let mut service = Service::start(
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("LISTEN_DATABASE_URL", db.url.as_str()),
        ],
        &[],
    );
    let http = client();
    let agents: Vec<Uuid> = (0..AGENTS).map(|_| Uuid::new_v4()).collect();
    for agent in &agents {
        let keys = serde_json::to_string(&KEYS).unwrap();
        let (status, body) = put(&http, &service.url(&format!("/agents/{agent}/keys")), &keys);
        assert_eq!((status, body.as_str()), (200, r#"{"created":5}"#));
    }

    // Each client owns its agents, so the newest value it sent for them is the newest at all.
    let base = service.url("");
    let sent: Vec<Sent> = thread::scope(|scope| {
        let clients: Vec<_> = agents
            .chunks(AGENTS / CLIENTS)
            .map(|share| scope.spawn(|| report(&base, share)))
            .collect();
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let accepted: u64 = sent.iter().map(|s| s.accepted).sum();
    let dropped: u64 = sent.iter().map(|s| s.dropped).sum();
    let posts: u64 = sent.iter().map(|s| s.posts).sum();
    let mut newest = HashMap::new();
    for s in sent {
        newest.extend(s.newest);
    }
    assert_eq!(posts, (AGENTS as u64) * (REPORTS_PER_AGENT as u64 + 1));
    assert_eq!(accepted + dropped, posts * KEYS.len() as u64);

    // `add` counts synchronously, so these are exact once the answers are in; what has been
    // flushed by now is not (the timer decides), so the writes are checked in the table.
    let metrics = scrape(&http, &service);
    assert_eq!(
        metrics["metadata_service_accepted_keys_total"],
        accepted as f64
    );
    assert_eq!(
        metrics["coderd_agentapi_metadata_dropped_keys_total"],
        dropped as f64
    );
    assert_eq!(
        metrics[r#"metadata_service_requests_total{route="/agents/{id}/metadata",code="200"}"#],
        posts as f64
    );
    assert_eq!(
        metrics[r#"metadata_service_requests_total{route="/agents/{id}/keys",code="200"}"#],
        AGENTS as f64
    );
    for zero in [
        "coderd_agentapi_metadata_store_errors_total",
        "coderd_agentapi_metadata_rejected_total",
        "coderd_agentapi_metadata_retention_dropped_total",
        "coderd_agentapi_metadata_publish_errors_total",
    ] {
        assert_eq!(metrics[zero], 0.0, "{zero}");
    }
    assert_eq!(metrics["coderd_agentapi_metadata_worker_alive"], 1.0);
    // Announcements arrive after their flush, when the timer says: only the series is sure.
    assert!(metrics.contains_key("metadata_service_announced_agents_total"));
    let (status, body) = get(&http, &service.url("/healthz"));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""ready":true"#), "{body}");

    service.signal("TERM");
    let (status, log) = service.wait_for_exit();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let report = close_report(&log);
    assert_eq!(field(&report, "unwritten"), "0", "{report}");
    assert_eq!(field(&report, "deadline_hit"), "false", "{report}");
    assert!(field(&report, "written").parse::<u64>().is_ok(), "{report}");

    let mut client = db.client("mb-test check");
    let rows = client
        .query(
            "SELECT workspace_agent_id, key, value, collected_at FROM workspace_agent_metadata \
             WHERE workspace_agent_id = ANY($1)",
            &[&agents],
        )
        .unwrap();
    assert_eq!(rows.len(), AGENTS * KEYS.len(), "no row invented or lost");
    let stored: HashMap<(Uuid, String), (String, SystemTime)> = rows
        .iter()
        .map(|row| ((row.get(0), row.get(1)), (row.get(2), row.get(3))))
        .collect();
    let wrong: Vec<_> = newest
        .iter()
        .filter(|(slot, expected)| stored.get(*slot) != Some(*expected))
        .map(|(slot, expected)| (slot, expected, stored.get(slot)))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} keys do not hold the newest value accepted, e.g. {:?}",
        wrong.len(),
        newest.len(),
        wrong.first()
    );
    assert_eq!(newest.len(), AGENTS * KEYS.len(), "every key got a value");
}

#[test]
fn bad_input_gets_a_4xx_with_the_reason_and_queues_nothing() {
    let mut service = Service::start(&[], &[]); // in memory
    let http = client();
    let agent = Uuid::new_v4();
    let (status, body) = put(
        &http,
        &service.url(&format!("/agents/{agent}/keys")),
        r#"["cpu"]"#,
    );
    assert_eq!((status, body.as_str()), (200, r#"{"created":1}"#));

    let metadata = format!("/agents/{agent}/metadata");
    let entry = |key: &str, value: &str, collected_at: &str| {
        serde_json::json!([{"key": key, "value": value, "error": "", "collected_at": collected_at}])
            .to_string()
    };
    let now = "2024-05-01T12:00:00Z";
    let long_key = "k".repeat(128);
    let too_big = "x".repeat(2 << 20);
    let cases: Vec<(&str, String, String, u16, &str)> = vec![
        (
            "POST",
            "/agents/not-a-uuid/metadata".into(),
            entry("cpu", "1", now),
            400,
            "malformed agent id \\\"not-a-uuid\\\"",
        ),
        (
            "POST",
            metadata.clone(),
            "{\"key\": \"cpu\"}".into(),
            400,
            "must be a JSON list",
        ),
        (
            "POST",
            metadata.clone(),
            "[{".into(),
            400,
            "EOF while parsing",
        ),
        (
            "POST",
            metadata.clone(),
            r#"[{"key": "cpu", "vaule": "1", "collected_at": "2024-05-01T12:00:00Z"}]"#.into(),
            400,
            "unknown field `vaule`",
        ),
        (
            "POST",
            metadata.clone(),
            entry("cpu", "1", "yesterday"),
            400,
            "collected_at \\\"yesterday\\\" is not an RFC 3339 time",
        ),
        (
            "POST",
            metadata.clone(),
            entry("", "1", now),
            422,
            "metadata entry 0 is invalid: the key is empty",
        ),
        (
            "POST",
            metadata.clone(),
            entry(&long_key, "1", now),
            422,
            "the key has 128 characters, more than the 127",
        ),
        (
            "POST",
            metadata.clone(),
            entry("cpu", "a\0b", now),
            422,
            "the value contains a NUL byte",
        ),
        (
            "POST",
            metadata.clone(),
            too_big,
            413,
            "larger than 1048576 bytes",
        ),
        (
            "PUT",
            format!("/agents/{agent}/keys"),
            serde_json::json!([long_key]).to_string(),
            422,
            "key 0 is invalid: the key has 128 characters",
        ),
        (
            "GET",
            metadata.clone(),
            String::new(),
            405,
            "takes POST only",
        ),
        (
            "GET",
            "/nowhere".into(),
            String::new(),
            404,
            "no route /nowhere",
        ),
    ];
    let mut by_status: HashMap<u16, u64> = HashMap::new();
    for (method, path, body, expected, message) in &cases {
        let url = service.url(path);
        let (status, answer) = match *method {
            "POST" => post(&http, &url, body),
            "PUT" => put(&http, &url, body),
            _ => get(&http, &url),
        };
        assert_eq!(status, *expected, "{method} {path}: {answer}");
        assert!(
            answer.contains(message),
            "{method} {path}: {answer:?} should say {message:?}"
        );
        if path.ends_with("/metadata") {
            *by_status.entry(status).or_default() += 1;
        }
    }

    // A good call still goes through, and it is all the batcher ever accepted.
    let (status, body) = post(&http, &service.url(&metadata), &entry("cpu", "42%", now));
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"accepted":1,"dropped":0}"#)
    );
    let metrics = scrape(&http, &service);
    assert_eq!(metrics["metadata_service_accepted_keys_total"], 1.0);
    for (status, count) in by_status {
        let series = format!(
            r#"metadata_service_requests_total{{route="/agents/{{id}}/metadata",code="{status}"}}"#
        );
        assert_eq!(metrics[&series], count as f64, "{series}");
    }

    service.signal("TERM");
    let (status, log) = service.wait_for_exit();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let report = close_report(&log);
    assert_eq!(field(&report, "written"), "1", "{report}");
}

#[test]
fn once_closing_it_answers_503_and_exits_non_zero_with_entries_unwritten() {
    let (db, mut service, http, agent) = with_one_key(&["--final-flush-timeout", "3"]);

    // Held until the service has exited: every flush, the final one included, waits
    // `lock_timeout` (2 s) and is canceled, so the entry stays unwritten, and `close()`
    // takes at least that long, which keeps the service answering meanwhile.
    let mut locker = db.client("mb-test locker");
    let lock = lock_table(&mut locker);

    let metadata = service.url(&format!("/agents/{agent}/metadata"));
    let (status, body) = post(&http, &metadata, CPU_42);
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"accepted":1,"dropped":0}"#)
    );

    service.signal("TERM");
    // The service sets its closing flag before it logs this line.
    service.wait_for_line("stopping", EXIT_LIMIT);
    let (status, body) = post(&http, &metadata, CPU_42);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("shutting down"), "{body}");
    let (status, body) = get(&http, &service.url("/healthz"));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(r#""problem":"shutting down""#), "{body}");

    let (status, log) = service.wait_for_exit();
    // `close()` retries the canceled final flush until its deadline, then gives up on the
    // statement still waiting for the lock: its cancel request runs on a thread of its own
    // that the exiting process need not wait for, and a backend waiting for a lock does not
    // notice its client is gone. Released, the lock would let that orphan write the row,
    // so end it first, as an operator would.
    db.terminate("metadata-service store");
    lock.rollback().unwrap();
    assert_eq!(status.code(), Some(EXIT_UNWRITTEN), "exit status {status}");
    let report = close_report(&log);
    assert_eq!(field(&report, "unwritten"), "1", "{report}");
    let (value, _, _) = pg::row(&mut locker, agent, "cpu").unwrap();
    assert_eq!(value, "", "the locked row was not written");
}

#[test]
fn healthz_is_unready_past_max_lag_and_ready_again_once_written() {
    let (db, mut service, http, agent) = with_one_key(&["--max-lag", "1", "--interval", "0.2"]);

    // A lock holds the row back: every statement waits `lock_timeout` (2 s) and is
    // canceled, three per flush, so fewer than five flushes fail in the first seconds and
    // only the lag can make the service unready.
    let mut locker = db.client("mb-test locker");
    let lock = lock_table(&mut locker);
    let metadata = service.url(&format!("/agents/{agent}/metadata"));
    assert_eq!(post(&http, &metadata, CPU_42).0, 200);
    let healthz = service.url("/healthz");
    // The service's readiness is a real process's state: polled.
    pg::wait_until("/healthz answers 503 for the lag", || {
        let (status, body) = get(&http, &healthz);
        status == 503 && body.contains("more than --max-lag 1 s")
    });
    let (_, body) = get(&http, &healthz);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        health["consecutive_store_failures"].as_u64().unwrap() < 5,
        "{body}"
    );
    // The gauge shows the lag too; it is set every second, so it may trail `health()`.
    let metrics = scrape(&http, &service);
    assert!(metrics["coderd_agentapi_metadata_oldest_unflushed_age_seconds"] > 0.0);

    lock.rollback().unwrap();
    pg::wait_until("/healthz answers 200 once the row is written", || {
        get(&http, &healthz).0 == 200
    });
    let (value, _, _) = pg::row(&mut locker, agent, "cpu").unwrap();
    assert_eq!(value, "42%");
    service.signal("TERM");
    let (status, _) = service.wait_for_exit();
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

/// One entry for key `cpu`.
const CPU_42: &str =
    r#"[{"key": "cpu", "value": "42%", "error": "", "collected_at": "2024-05-01T12:00:00Z"}]"#;

/// The service with `args` over a database of its own, and an agent whose key `cpu` is
/// registered.
fn with_one_key(args: &[&str]) -> (TestDb, Service, ureq::Agent, Uuid) {
    let db = TestDb::new();
    let service = Service::start(&[("DATABASE_URL", db.url.as_str())], args);
    let http = client();
    let agent = Uuid::new_v4();
    let (status, _) = put(
        &http,
        &service.url(&format!("/agents/{agent}/keys")),
        r#"["cpu"]"#,
    );
    assert_eq!(status, 200);
    (db, service, http, agent)
}

/// Locks the metadata table until the transaction ends.
fn lock_table(client: &mut postgres::Client) -> postgres::Transaction<'_> {
    let mut lock = client.transaction().unwrap();
    lock.batch_execute("LOCK TABLE workspace_agent_metadata IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    lock
}

// ---------------------------------------------------------------------------------------
// The clients.
// ---------------------------------------------------------------------------------------

/// What one client thread sent and the service accepted.
struct Sent {
    posts: u64,
    accepted: u64,
    dropped: u64,
    /// Per (agent, key): the newest value accepted, and its `collected_at`.
    newest: HashMap<(Uuid, String), (String, SystemTime)>,
}

/// Posts `REPORTS_PER_AGENT` reports for each agent of `agents`, round robin, each newer
/// than the last, then one stale report per agent that must not win.
fn report(base: &str, agents: &[Uuid]) -> Sent {
    let http = client();
    let mut sent = Sent {
        posts: 0,
        accepted: 0,
        dropped: 0,
        newest: HashMap::new(),
    };
    let mut post_report = |agent: Uuid, sequence: u32, value_of: &dyn Fn(&str) -> String| {
        let (collected_at, at) = timestamp(sequence);
        let entries: Vec<_> = KEYS
            .iter()
            .map(|key| {
                serde_json::json!({
                    "key": key, "value": value_of(key), "error": "", "collected_at": collected_at
                })
            })
            .collect();
        let url = format!("{base}/agents/{agent}/metadata");
        let (status, body) = post(&http, &url, &serde_json::to_string(&entries).unwrap());
        assert_eq!(status, 200, "{body}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        let accepted = answer["accepted"].as_u64().unwrap();
        sent.posts += 1;
        sent.accepted += accepted;
        sent.dropped += answer["dropped"].as_u64().unwrap();
        // `add` keeps a call's first `accepted` entries and drops the rest.
        for key in KEYS.iter().take(accepted as usize) {
            let slot = sent.newest.entry((agent, key.to_string()));
            let candidate = (value_of(key), at);
            slot.and_modify(|newest| {
                if candidate.1 > newest.1 {
                    *newest = candidate.clone();
                }
            })
            .or_insert(candidate);
        }
    };
    for sequence in 1..=REPORTS_PER_AGENT {
        for &agent in agents {
            post_report(agent, sequence, &|key| format!("{key} #{sequence}"));
        }
    }
    for &agent in agents {
        post_report(agent, 0, &|_| "stale".to_owned());
    }
    sent
}

/// Report `sequence`'s `collected_at` as RFC 3339, and as an instant: `sequence` seconds
/// after 2024-05-01T12:00:00.123456Z, written in UTC for even sequences and at +02:00 for
/// odd ones, so that the service must honour the offset to keep the newest.
fn timestamp(sequence: u32) -> (String, SystemTime) {
    const BASE_UNIX_MICROS: u64 = 1_714_564_800_123_456; // 2024-05-01T12:00:00.123456Z
    let (minutes, seconds) = (sequence / 60, sequence % 60);
    let text = if sequence.is_multiple_of(2) {
        format!("2024-05-01T12:{minutes:02}:{seconds:02}.123456Z")
    } else {
        format!("2024-05-01T14:{minutes:02}:{seconds:02}.123456+02:00")
    };
    let at = pg::micros(BASE_UNIX_MICROS + u64::from(sequence) * 1_000_000);
    (text, at)
}
