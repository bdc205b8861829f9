//! The shipped rules (deploy/prometheus/metadata-batcher.rules.yml) in a real Prometheus,
//! against a real outage: Prometheus, started here on a free port of 127.0.0.1 with a 1 s
//! scrape and evaluation interval, scrapes the service example (`examples/service.rs`,
//! flushing every 0.5 s) while it writes to a throwaway PostgreSQL cluster, and the test
//! reads the outcome through Prometheus' HTTP API:
//!
//! - every series the rules and the dashboard use exists, with the scrape's `job` and
//!   `instance` and only the labels the rules expect, and every rule evaluates without
//!   error;
//! - the stale-table alert fires within its `for:` (1 m) plus 5 s of the database stopping,
//!   and resolves once the database is back and the backlog is written.
//!
//! The binary comes from `PROMETHEUS` (scripts/test sets it from scripts/ensure-prometheus,
//! which installs Debian's package as root), else `prometheus` on PATH. Prometheus writes
//! its data and log into a scratch directory that is removed; it is stopped, and the
//! service and the cluster with it, on every path out of the test, a panic included (the
//! guards' `Drop`). Every wait has a limit; the whole test takes about a minute and a half.
//! Waits on Prometheus and on the database poll, with a short sleep: neither offers
//! anything to block on.

mod pg;
mod promql;
mod service_process;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

use pg::scratch::{free_port, ScratchDir};
use pg::Cluster;
use serde_json::Value;
use service_process::{answer, client, get, post, put, Service};
use uuid::Uuid;

/// The stale-table alert's `for:` in the shipped rules (checked against the rule below).
const STALE_FOR: Duration = Duration::from_secs(60);
/// The bound: fired within `for:` plus this after the database stops.
const FIRING_MARGIN: Duration = Duration::from_secs(5);
/// How long the test waits for the alert to fire before it fails.
const FIRING_LIMIT: Duration = Duration::from_secs(100);
/// From the database's restart to the alert resolved: a retry (backoff at most 5 s), the
/// backlog written, a scrape and an evaluation.
const RESOLVE_LIMIT: Duration = Duration::from_secs(30);
/// From Prometheus' start to its first scrapes of every series.
const SERIES_LIMIT: Duration = Duration::from_secs(30);
/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(100);
/// The service's flush interval: the stale threshold is two of them.
const INTERVAL_SECONDS: &str = "0.5";
const JOB: &str = "metadata-service";
const STALE_ALERT: &str = "MetadataBatcherTableStale";
const AGENTS: usize = 4;
const KEYS: [&str; 3] = ["cpu", "mem", "disk"];

#[test]
fn the_stale_table_alert_fires_in_a_real_prometheus_during_an_outage_and_resolves_after() {
    let mut cluster = Cluster::start_new();
    let mut service = Service::start(
        &[("DATABASE_URL", cluster.url().as_str())],
        &["--interval", INTERVAL_SECONDS],
    );
    let prometheus = Prometheus::start(service.addr());
    let http = client();
    let agents: Vec<Uuid> = (0..AGENTS).map(|_| Uuid::new_v4()).collect();
    for agent in &agents {
        let keys = serde_json::to_string(&KEYS).unwrap();
        let (status, body) = put(&http, &service.url(&format!("/agents/{agent}/keys")), &keys);
        assert_eq!(status, 200, "{body}");
    }
    let rule = prometheus.rule(STALE_ALERT);
    assert_eq!(
        rule["duration"].as_f64(),
        Some(STALE_FOR.as_secs_f64()),
        "{rule}"
    );

    // Agents report all along, through the outage too: `add` never waits on the database.
    let reporting = AtomicBool::new(true);
    let sent = AtomicU64::new(0);
    thread::scope(|scope| {
        let base = service.url("");
        let (agents, reporting, sent) = (&agents, &reporting, &sent);
        let reporter = scope.spawn(move || report(&base, agents, reporting, sent));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for_every_series(&prometheus, service.addr());
            assert!(
                prometheus.alerts(STALE_ALERT).is_empty(),
                "stale while healthy"
            );

            let stopped = Instant::now();
            cluster.stop_immediate();
            let fired = prometheus.wait_for_alert(STALE_ALERT, "firing", FIRING_LIMIT, stopped);
            println!(
                "{STALE_ALERT} fired {:.1} s after the database stopped (for: {} s)",
                fired.as_secs_f64(),
                STALE_FOR.as_secs()
            );
            print_outage_metrics(&http, &service);
            assert!(
                fired <= STALE_FOR + FIRING_MARGIN,
                "fired {fired:?} after the stop, later than for: + {FIRING_MARGIN:?}"
            );

            let restarted = Instant::now();
            cluster.start();
            let resolved = prometheus.wait_for_no_alert(STALE_ALERT, RESOLVE_LIMIT, restarted);
            println!(
                "{STALE_ALERT} resolved {:.1} s after the database started again",
                resolved.as_secs_f64()
            );
        }));
        reporting.store(false, Relaxed);
        let last = reporter.join().expect("the reporter thread");
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
        // The backlog is written: every key holds the last value sent, outage or not.
        let mut db = cluster.socket_client("postgres", "mb-test check");
        pg::wait_until("every key holds the last value sent", || {
            agents.iter().all(|&agent| {
                KEYS.iter().all(|key| {
                    pg::row(&mut db, agent, key).is_some_and(|(value, _, _)| value == last)
                })
            })
        });
    });
    assert!(sent.load(Relaxed) > 0);
    service.signal("TERM");
    let (status, _) = service.wait_for_exit();
    assert_eq!(status.code(), Some(0), "exit status {status}");
}

/// Posts a report for every agent every 100 ms until `reporting` is cleared; returns the
/// value of the last one. Each report carries a newer value for every key.
fn report(base: &str, agents: &[Uuid], reporting: &AtomicBool, sent: &AtomicU64) -> String {
    let http = client();
    let mut last = String::new();
    let mut sequence = 0u64;
    while reporting.load(Relaxed) {
        sequence += 1;
        last = format!("#{sequence}");
        let collected_at = rfc3339_now();
        let entries: Vec<Value> = KEYS
            .iter()
            .map(|key| serde_json::json!({"key": key, "value": last, "collected_at": collected_at}))
            .collect();
        let body = serde_json::to_string(&entries).unwrap();
        for agent in agents {
            let (status, answer) = post(&http, &format!("{base}/agents/{agent}/metadata"), &body);
            assert_eq!(status, 200, "{answer}");
            assert!(answer.contains("\"dropped\":0"), "{answer}");
        }
        sent.fetch_add(1, Relaxed);
        // The agents' own pace: a report every 100 ms.
        thread::sleep(POLL);
    }
    last
}

/// Waits until Prometheus has scraped every series the rules and the dashboard use, then
/// checks each one's labels, and that every rule evaluates without error.
fn wait_for_every_series(prometheus: &Prometheus, instance: &str) {
    let recorded = promql::recorded_names();
    let mut names: BTreeSet<String> = promql::rule_queries()
        .iter()
        .flat_map(|(_, query)| promql::metric_names(query))
        .chain(
            promql::dashboard_queries()
                .iter()
                .flat_map(|query| promql::metric_names(query)),
        )
        .filter(|name| !recorded.contains(name))
        .collect();
    assert!(names.len() > 10, "{names:?}");
    // The write lag has buckets once rows are written.
    names.insert("coderd_agentapi_metadata_write_lag_seconds_bucket".to_owned());
    let deadline = Instant::now() + SERIES_LIMIT;
    let mut missing = names.clone();
    while !missing.is_empty() {
        assert!(
            Instant::now() < deadline,
            "no series for {missing:?} within {SERIES_LIMIT:?}"
        );
        missing.retain(|name| prometheus.series(name).is_empty());
        // Polling Prometheus, which offers nothing to block on.
        thread::sleep(POLL);
    }
    for name in &names {
        let per_reason = name.starts_with("coderd_agentapi_metadata_flush_duration_seconds")
            || name == "coderd_agentapi_metadata_batches_total";
        let mut expected: BTreeSet<&str> = ["__name__", "job", "instance"].into();
        if per_reason {
            expected.insert("reason");
        }
        if name.ends_with("_bucket") {
            expected.insert("le");
        }
        for series in prometheus.series(name) {
            assert_eq!(
                series.get("job").map(String::as_str),
                Some(JOB),
                "{series:?}"
            );
            assert_eq!(
                series.get("instance").map(String::as_str),
                Some(instance),
                "{series:?}"
            );
            let labels: BTreeSet<&str> = series.keys().map(String::as_str).collect();
            assert_eq!(labels, expected, "labels of {series:?}");
        }
    }
    // Every rule, alerting and recording, has been evaluated without error.
    let rules = prometheus.rules();
    assert_eq!(rules.len(), promql::rule_queries().len(), "{rules:?}");
    for rule in rules {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
}

/// What an operator reads on `/metrics` during the outage: the lag, the health gauges and
/// the totals that say whether anything is lost.
fn print_outage_metrics(http: &ureq::Agent, service: &Service) {
    let (_, text) = get(http, &service.url("/metrics"));
    let wanted = [
        "coderd_agentapi_metadata_oldest_unflushed_age_seconds",
        "coderd_agentapi_metadata_consecutive_store_failures",
        "coderd_agentapi_metadata_store_call_age_seconds",
        "coderd_agentapi_metadata_pending_entries",
        "coderd_agentapi_metadata_worker_alive",
        "coderd_agentapi_metadata_flush_interval_seconds",
        "coderd_agentapi_metadata_store_errors_total",
        "coderd_agentapi_metadata_flushed_total",
        "coderd_agentapi_metadata_dropped_keys_total",
        "coderd_agentapi_metadata_retention_dropped_total",
        "coderd_agentapi_metadata_write_lag_seconds_count",
    ];
    println!("--- /metrics during the outage ---");
    for line in text.lines() {
        if wanted
            .iter()
            .any(|name| line.starts_with(&format!("{name} ")))
        {
            println!("{line}");
        }
    }
    let (status, body) = get(http, &service.url("/healthz"));
    println!("--- /healthz: {status} {body}");
}

/// A throwaway Prometheus scraping one target with the shipped rules; stopped and its files
/// removed on drop.
struct Prometheus {
    base: String,
    http: ureq::Agent,
    /// Declared before `dir`, so the process is gone before its files are removed.
    _process: Stopped,
    /// Its config, data and log.
    dir: ScratchDir,
}

/// A child process, stopped on drop: SIGTERM, then SIGKILL if it has not exited in time.
struct Stopped(Child);

/// How many free ports to try: another process may take the one picked.
const START_ATTEMPTS: usize = 3;
/// From spawn to `/-/ready`.
const READY_LIMIT: Duration = Duration::from_secs(30);
/// From SIGTERM to the exit, before a SIGKILL.
const STOP_LIMIT: Duration = Duration::from_secs(10);

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = ScratchDir::for_client("prometheus");
        let rules = promql::deploy_file(promql::RULES_FILE);
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{target}']\n",
            rules = rules.display()
        );
        let config = dir.write("prometheus.yml", config, 0o644);
        let log_path = dir.path().join("prometheus.log");
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let log = std::fs::File::create(&log_path).expect("create the log file");
            let child = Command::new(binary())
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("the log file"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|err| panic!("start {}: {err}", binary().display()));
            let mut process = Stopped(child);
            let base = format!("http://127.0.0.1:{port}");
            match wait_until_ready(&mut process.0, &base) {
                Ok(()) => {
                    return Prometheus {
                        base,
                        http: client(),
                        _process: process,
                        dir,
                    }
                }
                Err(failure) => {
                    drop(process);
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    failures.push(format!("{failure}\n{log}"));
                }
            }
        }
        panic!("could not start Prometheus:\n{}", failures.join("\n---\n"));
    }

    /// `GET /api/v1/{path}` with `params`; the `data` of a successful answer.
    fn api(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let mut request = self.http.get(format!("{}/api/v1/{path}", self.base));
        for (key, value) in params {
            request = request.query(*key, *value);
        }
        let (status, body) = answer(request.call());
        assert_eq!(status, 200, "{path} {params:?}: {body}");
        let json: Value = serde_json::from_str(&body).expect("a JSON answer");
        assert_eq!(json["status"], "success", "{body}");
        json["data"].clone()
    }

    /// The label sets of the series named `name` seen in the last minute.
    fn series(&self, name: &str) -> Vec<BTreeMap<String, String>> {
        let start = format!("{}", unix_now() - 60.0);
        let data = self.api("series", &[("match[]", name), ("start", &start)]);
        serde_json::from_value(data).expect("label sets")
    }

    /// Every rule Prometheus has loaded, as it reports them.
    fn rules(&self) -> Vec<Value> {
        let data = self.api("rules", &[]);
        data["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    fn rule(&self, name: &str) -> Value {
        self.rules()
            .into_iter()
            .find(|rule| rule["name"] == name)
            .unwrap_or_else(|| panic!("Prometheus has no rule {name}"))
    }

    /// The active (pending or firing) alerts named `name`.
    fn alerts(&self, name: &str) -> Vec<Value> {
        let data = self.api("alerts", &[]);
        data["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .filter(|alert| alert["labels"]["alertname"] == name)
            .cloned()
            .collect()
    }

    /// Waits until alert `name` is in `state`; returns the time since `since`.
    fn wait_for_alert(&self, name: &str, state: &str, limit: Duration, since: Instant) -> Duration {
        loop {
            let alerts = self.alerts(name);
            if alerts.iter().any(|alert| alert["state"] == state) {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < limit,
                "{name} not {state} within {limit:?}: {alerts:?}"
            );
            // Polling Prometheus, which offers nothing to block on.
            thread::sleep(POLL);
        }
    }

    /// Waits until alert `name` is neither pending nor firing; returns the time since
    /// `since`.
    fn wait_for_no_alert(&self, name: &str, limit: Duration, since: Instant) -> Duration {
        loop {
            let alerts = self.alerts(name);
            if alerts.is_empty() {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < limit,
                "{name} still active {limit:?} after: {alerts:?}"
            );
            // Polling Prometheus, which offers nothing to block on.
            thread::sleep(POLL);
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("prometheus.log"));
            eprintln!("--- Prometheus' log ---\n{}", log.unwrap_or_default());
        }
        // `_process` stops it, then `dir` removes its files.
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = pg::scratch::signal(self.0.id(), "TERM");
        let deadline = Instant::now() + STOP_LIMIT;
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            // Polling for the process's exit: there is nothing to block on with a limit.
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `/-/ready` until it answers 200; fails when the process exits first (its port was
/// taken) or after [`READY_LIMIT`].
fn wait_until_ready(child: &mut Child, base: &str) -> Result<(), String> {
    let http = client();
    let deadline = Instant::now() + READY_LIMIT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("Prometheus exited at start: {status}"));
        }
        if let Ok(mut response) = http.get(format!("{base}/-/ready")).call() {
            if response.status() == 200 {
                let _ = response.body_mut().read_to_string();
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("Prometheus not ready within {READY_LIMIT:?}"));
        }
        // Polling Prometheus, which offers nothing to block on.
        thread::sleep(POLL);
    }
}

/// The prometheus binary: `PROMETHEUS`, else on PATH, else /usr/bin (Debian's place).
fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PROMETHEUS") {
        return PathBuf::from(path);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("prometheus"))
        .chain([
            "/usr/bin/prometheus".into(),
            "/usr/local/bin/prometheus".into(),
        ])
        .find(|path| path.exists())
        .unwrap_or_else(|| {
            panic!(
                "prometheus not found: run scripts/ensure-prometheus (it installs Debian's \
                 package as root), or set PROMETHEUS=/path/to/prometheus"
            )
        })
}

/// Now in UTC as RFC 3339, as an agent stamps `collected_at` (the `time` crate here has no
/// formatting): the civil date from the days since 1970, by Howard Hinnant's algorithm.
fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970");
    let (days, seconds) = ((now.as_secs() / 86_400) as i64, now.as_secs() % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        seconds / 3_600,
        seconds / 60 % 60,
        seconds % 60,
        now.subsec_micros()
    )
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}
