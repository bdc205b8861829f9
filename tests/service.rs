//! The service example (`examples/service.rs`) run as a user would: the built binary on a
//! port the OS picks, against a throwaway database, driven over HTTP by several client
//! threads with a real HTTP client, and stopped with SIGTERM.
//!
//! How the binary is found: `CARGO_BIN_EXE_<name>` exists only for `[[bin]]` targets, and an
//! example found under `target/` may be missing or stale (`cargo test --test service`
//! builds no examples). So the test asks cargo, once per run: `$CARGO build --example
//! service --message-format=json` with this test's profile and features, and takes the
//! binary's path from cargo's own `compiler-artifact` message instead of guessing the
//! layout of the target directory. Cargo releases its build lock before it runs the tests,
//! so the nested build does not wait for the outer one; when the example is up to date it
//! costs one fingerprint check.
//!
//! Nothing here sleeps. The service logs `listening addr=...` once it accepts connections,
//! with the port the OS gave it: reading that line is both the readiness signal and the
//! port, so there is neither a readiness poll nor a race for a free port. Every wait (the
//! build, the start, each request, the exit) has a limit, and the process is killed if a
//! test fails before it exits.

mod pg;

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use pg::TestDb;
use uuid::Uuid;

/// The nested `cargo build`: compiling the example from cold on a busy 2-core machine
/// takes a minute or two; waiting on another cargo's lock may add to it.
const BUILD_LIMIT: Duration = Duration::from_secs(600);
/// From spawn to the `listening` line: connecting to PostgreSQL and creating the table.
const START_LIMIT: Duration = Duration::from_secs(60);
/// From SIGTERM to the exit: `close()` is bounded by the final flush timeout (15 s).
const EXIT_LIMIT: Duration = Duration::from_secs(60);
/// One HTTP request, connect to last byte.
const REQUEST_LIMIT: Duration = Duration::from_secs(30);

/// The feature flags this test was built with, for the nested build: the same set (`default`
/// counts as a feature of its own) reuses the library already compiled for the test
/// instead of compiling another variant of it and of its dependencies.
const FEATURE_FLAGS: &[&str] = if cfg!(feature = "default") {
    &[]
} else if cfg!(feature = "tls") {
    &["--no-default-features", "--features", "postgres,tls"]
} else {
    &["--no-default-features", "--features", "postgres"]
};

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
    let db = TestDb::new();
    let mut service = Service::start(
        &[("DATABASE_URL", db.url.as_str())],
        &["--final-flush-timeout", "3"],
    );
    let http = client();
    let agent = Uuid::new_v4();
    let (status, _) = put(
        &http,
        &service.url(&format!("/agents/{agent}/keys")),
        r#"["cpu"]"#,
    );
    assert_eq!(status, 200);

    // Held until the service has exited: every flush, the final one included, waits
    // `lock_timeout` (2 s) and is canceled, so the entry stays unwritten, and `close()`
    // takes at least that long, which keeps the service answering meanwhile.
    let mut locker = db.client("mb-test locker");
    let mut lock = locker.transaction().unwrap();
    lock.batch_execute("LOCK TABLE workspace_agent_metadata IN ACCESS EXCLUSIVE MODE")
        .unwrap();

    let metadata = service.url(&format!("/agents/{agent}/metadata"));
    let entry =
        r#"[{"key": "cpu", "value": "42%", "error": "", "collected_at": "2024-05-01T12:00:00Z"}]"#;
    let (status, body) = post(&http, &metadata, entry);
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"accepted":1,"dropped":0}"#)
    );

    service.signal("TERM");
    // The service sets its closing flag before it logs this line.
    service.wait_for_line("stopping", EXIT_LIMIT);
    let (status, body) = post(&http, &metadata, entry);
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
    let db = TestDb::new();
    let mut service = Service::start(
        &[("DATABASE_URL", db.url.as_str())],
        &["--max-lag", "1", "--interval", "0.2"],
    );
    let http = client();
    let agent = Uuid::new_v4();
    let (status, _) = put(
        &http,
        &service.url(&format!("/agents/{agent}/keys")),
        r#"["cpu"]"#,
    );
    assert_eq!(status, 200);

    // A lock holds the row back: every statement waits `lock_timeout` (2 s) and is
    // canceled, three per flush, so fewer than five flushes fail in the first seconds and
    // only the lag can make the service unready.
    let mut locker = db.client("mb-test locker");
    let mut lock = locker.transaction().unwrap();
    lock.batch_execute("LOCK TABLE workspace_agent_metadata IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let metadata = service.url(&format!("/agents/{agent}/metadata"));
    let entry =
        r#"[{"key": "cpu", "value": "42%", "error": "", "collected_at": "2024-05-01T12:00:00Z"}]"#;
    assert_eq!(post(&http, &metadata, entry).0, 200);
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

fn client() -> ureq::Agent {
    ureq::Agent::config_builder()
        // A 4xx or 5xx is an answer to check, not an error.
        .http_status_as_error(false)
        .timeout_global(Some(REQUEST_LIMIT))
        .build()
        .into()
}

fn answer(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, String) {
    let mut response = result.expect("an HTTP answer");
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().expect("a text body");
    (status, body)
}

fn post(http: &ureq::Agent, url: &str, body: &str) -> (u16, String) {
    answer(
        http.post(url)
            .header("Content-Type", "application/json")
            .send(body),
    )
}

fn put(http: &ureq::Agent, url: &str, body: &str) -> (u16, String) {
    answer(
        http.put(url)
            .header("Content-Type", "application/json")
            .send(body),
    )
}

fn get(http: &ureq::Agent, url: &str) -> (u16, String) {
    answer(http.get(url).call())
}

/// `/metrics` as a map from series (name and labels, as printed) to value.
fn scrape(http: &ureq::Agent, service: &Service) -> HashMap<String, f64> {
    let (status, text) = get(http, &service.url("/metrics"));
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The service process.
// ---------------------------------------------------------------------------------------

/// The example's binary, built once per test run.
fn service_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(build_service)
}

fn build_service() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    // What cargo set for this test process describes this package to it; passed on, build
    // scripts that watch these (ring's does) would be rerun and everything above them rebuilt,
    // by this build and again by the next `cargo test`.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
            ]
            .contains(&name.as_ref())
        {
            build.env_remove(name.as_ref());
        }
    }
    let build = build
        .args(["build", "--example", "service", "--message-format=json"])
        .args([
            "--manifest-path",
            concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
        ])
        .args(FEATURE_FLAGS)
        .args(["--profile", &profile()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cargo to build the service example");
    let pid = build.id();
    let (send, done) = mpsc::channel();
    thread::spawn(move || {
        let _ = send.send(build.wait_with_output());
    });
    let output = match done.recv_timeout(BUILD_LIMIT) {
        Ok(output) => output.expect("wait for cargo"),
        Err(_) => {
            let _ = pg::scratch::signal(pid, "KILL");
            panic!("cargo build --example service took more than {BUILD_LIMIT:?}");
        }
    };
    assert!(
        output.status.success(),
        "cargo build --example service failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| {
            message["reason"] == "compiler-artifact" && message["target"]["name"] == "service"
        })
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .expect("cargo named the service example's executable")
}

/// The cargo profile this test was built with, from the directory it runs from
/// (`target/<dir>/deps/`): `debug` is the `dev` profile, other profiles use their name.
fn profile() -> String {
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = exe
        .parent()
        .filter(|deps| deps.ends_with("deps"))
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .and_then(|name| name.to_str());
    match dir {
        Some("debug") | None => "dev".to_owned(),
        Some(name) => name.to_owned(),
    }
}

/// The service, running; killed on drop if a test ends before it exits.
struct Service {
    child: Child,
    addr: String,
    /// Its stderr, line by line, from a thread that reads it so the pipe never fills.
    lines: mpsc::Receiver<String>,
    /// Every line read so far: printed when a test fails.
    log: Vec<String>,
    exited: bool,
}

impl Service {
    /// Starts the service on 127.0.0.1 with a port the OS picks, with `env` beside a clean
    /// environment (no `DATABASE_URL` unless given: in memory), and waits until it listens.
    fn start(env: &[(&str, &str)], args: &[&str]) -> Service {
        let mut child = Command::new(service_binary())
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("LISTEN_DATABASE_URL")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the service");
        let stderr = child.stderr.take().expect("piped stderr");
        let (send, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let mut service = Service {
            child,
            addr: String::new(),
            lines,
            log: Vec::new(),
            exited: false,
        };
        let listening = service.wait_for_line("listening", START_LIMIT);
        service.addr = field(&listening, "addr").to_owned();
        service
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn signal(&self, name: &str) {
        pg::scratch::signal(self.child.id(), name).expect("signal the service");
    }

    /// Reads the log until a line contains `needle`; returns that line.
    fn wait_for_line(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("the service logged no {needle:?} within {limit:?}")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("the service ended its log before {needle:?}")
                }
            }
        }
    }

    /// Waits until the service exits (its stderr closes); returns its status and the log.
    fn wait_for_exit(&mut self) -> (ExitStatus, Vec<String>) {
        let deadline = Instant::now() + EXIT_LIMIT;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => self.log.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("the service did not exit within {EXIT_LIMIT:?}")
                }
            }
        }
        // Its stderr is closed, so it has exited (it starts no processes that could hold it).
        let status = self.child.wait().expect("wait for the service");
        self.exited = true;
        (status, self.log.clone())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            self.log.extend(self.lines.try_iter());
            eprintln!("--- the service's log ---\n{}", self.log.join("\n"));
        }
    }
}

/// The `close report` line of the log.
fn close_report(log: &[String]) -> String {
    log.iter()
        .find(|line| line.contains("close report"))
        .cloned()
        .unwrap_or_else(|| panic!("no close report in the log:\n{}", log.join("\n")))
}

/// The value of `name=value` in a log line.
fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let start = line
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
        + name.len()
        + 2;
    line[start..].split(' ').next().unwrap_or_default()
}
