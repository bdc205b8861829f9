//! A small blocking HTTP service around the batcher: the shape of a non-async service that
//! receives agents' metadata, in one file to copy from.
//!
//! ```text
//! cargo run --release --example service                      # in memory, on 127.0.0.1:8080
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo run --release --example service -- --listen 127.0.0.1:9000
//! ```
//!
//! | route | what it does |
//! |---|---|
//! | `PUT /agents/{id}/keys` | registers an agent's metadata keys, a JSON list of names; rows are created when a workspace is built, and the batcher only updates them |
//! | `POST /agents/{id}/metadata` | a JSON list of `{"key", "value", "error", "collected_at"}` (RFC 3339), handed to `Batcher::add` on the request thread; answers `{"accepted": n, "dropped": m}` |
//! | `GET /metrics` | the batcher's Prometheus metrics (lag and health included) and the service's own |
//! | `GET /healthz` | readiness, from `Batcher::health()` and `--max-lag` |
//!
//! What a new user otherwise works out from the API docs, each in one place:
//!
//! - where the batcher lives: one per process, in [`State`], shared by the request threads;
//! - which `AddError` becomes which HTTP status: [`post_metadata`];
//! - how `/metrics` serves the batcher's metrics: [`install_metrics`] and [`render_metrics`]
//!   (the README shows a Prometheus scraping it with the rules in deploy/prometheus/);
//! - what a readiness probe reads from `health()`: [`readiness_problem`];
//! - how SIGTERM reaches `close()`, and what the exit code says: [`run`] and [`main`].
//!
//! Environment: `DATABASE_URL` (PostgreSQL; the in-memory store when unset),
//! `LISTEN_DATABASE_URL` (where the subscriber listens, when it must differ: `LISTEN` needs a
//! session of its own, which a transaction-mode pooler in front of the store cannot give),
//! `RUST_LOG` (default `info`).
//!
//! Exit codes: 0 after a clean close; 3 when `close()` left entries unwritten; 1 when the
//! service could not start; 2 on bad flags or environment.

#[path = "support/pg_url.rs"]
mod pg_url;

use std::io::{IsTerminal as _, Read as _};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use metadata_batcher::postgres::{self as pg, PgOptions, PgPublisher, PgStore, PgSubscriber};
use metadata_batcher::{
    agent_ids, AddError, Batcher, CloseReport, Health, InvalidMetadata, MemoryPubsub, MemoryStore,
    Metadata, MetadataField, DEFAULT_FINAL_FLUSH_TIMEOUT, DEFAULT_INTERVAL, MAX_KEY_CHARS,
    METADATA_BATCH_CHANNEL,
};
use metrics::{counter, describe_counter};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::json;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tiny_http::{Header, Method, Request, Response, Server};
use uuid::Uuid;

const USAGE: &str = "\
A blocking HTTP service around the metadata batcher.

USAGE: cargo run --release --example service -- [FLAGS]

FLAGS:
  --listen ADDR                address to listen on (default 127.0.0.1:8080; port 0 picks one,
                               and the `listening` log line says which)
  --threads N                  request threads (default 8)
  --final-flush-timeout SECS   how long close() may take at SIGTERM (default 15)
  --interval SECS              the batcher's flush interval (default 5)
  --max-lag SECS               /healthz answers 503 once the oldest update not yet written
                               is older than this (default 60)
  --help                       print this

ENVIRONMENT:
  DATABASE_URL          PostgreSQL for the store and the publisher (in memory when unset)
  LISTEN_DATABASE_URL   where the subscriber listens, if not DATABASE_URL
  RUST_LOG              log filter (default info)";

const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// Each request thread blocks on one request at a time, and a POST costs microseconds
/// (`add` never waits), so a few threads serve thousands of agents; more only help while
/// clients are slow to send their bodies.
const DEFAULT_THREADS: usize = 8;

/// The largest body read. An agent has a few dozen metadata keys, and the batcher keeps at
/// most 2 KiB of a value and of an error, so a real report is a few KiB at most; 1 MiB leaves
/// room for any honest agent and bounds what a broken one makes a thread hold.
const MAX_BODY_BYTES: u64 = 1 << 20;

/// `/healthz` says unready once this many flushes in a row have failed.
///
/// One or two failures are routine and heal by themselves: a server restart or failover, a
/// row locked for a moment. With the batcher's default backoff (250 ms doubling to 5 s) the
/// fifth failure in a row comes at least 3.75 s after the first, each after a full attempt
/// (up to `connect_timeout`, 5 s, for a server that does not answer): the database has then
/// been unwritable through several retries, not for a blip. Taking this replica out of the
/// load balancer sends agents to replicas whose store works, when the fault is this one's
/// (its network path, its pooler); when the fault is everyone's, the agents report again
/// once a replica is ready, and nothing is lost that matters, since only the newest value
/// per key counts. The readiness probe's own failure threshold (three periods of 10 s by
/// default in Kubernetes) adds its delay on top, so a blip never flips readiness.
///
/// This suits a service whose one job is writing metadata. In a larger service, where the
/// metadata is one feature of many, alert on `consecutive_store_failures` (see
/// docs/operations.md) rather than take the whole replica out.
const UNREADY_AFTER_STORE_FAILURES: u64 = 5;

/// `/healthz` says unready once the oldest update not yet written is older than this
/// (`--max-lag`).
///
/// Failures in a row catch a store that errors; this catches one that works too slowly to
/// keep up (each flush writes, but slower than updates arrive), which no failure counts,
/// and failures that come slowly (each statement waiting out a `lock_timeout` before it is
/// canceled) sooner than five of them would. Twelve default flush intervals: far above the
/// normal age (below one interval plus a flush) and above the stale-table alert's threshold
/// (two intervals for a minute, deploy/prometheus/), so the alert fires first. When every
/// replica shares the slow database, every replica turns unready and agents' reports are
/// refused for a while; that sheds the load the database could not carry, the backlog
/// drains, and readiness returns. Only the newest value per key matters, so the agents'
/// next reports lose nothing.
const DEFAULT_MAX_LAG: Duration = Duration::from_secs(60);

/// How often the exporter drains its histograms when nobody scrapes; without upkeep they
/// grow with every observation (see `PrometheusBuilder::install_recorder`).
const METRICS_UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// How long the announcement watcher waits in one call; it has nothing else to do, so the
/// value matters only for how soon it notices a lost session.
const WATCH_WAIT: Duration = Duration::from_secs(1);

/// The service's own metric names, beside the batcher's (`metadata_batcher::metrics::names`,
/// which include the lag and health gauges).
mod names {
    pub const REQUESTS_TOTAL: &str = "metadata_service_requests_total";
    pub const ACCEPTED_KEYS_TOTAL: &str = "metadata_service_accepted_keys_total";
    pub const UNMATCHED_TOTAL: &str = "metadata_service_unmatched_total";
    pub const ANNOUNCED_AGENTS_TOTAL: &str = "metadata_service_announced_agents_total";
    pub const SUBSCRIBER_RECONNECTS_TOTAL: &str = "metadata_service_subscriber_reconnects_total";
}

/// The exit code when `close()` could not write everything: distinct from a failed start, so
/// a supervisor can tell "lost the last updates" from "never ran".
const EXIT_UNWRITTEN: u8 = 3;

/// The service's settings, from the command line.
#[derive(Debug)]
struct Options {
    listen: String,
    threads: usize,
    final_flush_timeout: Duration,
    interval: Duration,
    max_lag: Duration,
}

/// Why the service did not run.
enum Failure {
    /// Bad flags or environment: exit 2.
    Usage(String),
    /// It could not start (listen, connect, build): exit 1.
    Start(String),
}

fn main() -> ExitCode {
    init_logging();
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(problem) => {
            eprintln!("service: {problem}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(report) if report.unwritten == 0 => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(EXIT_UNWRITTEN),
        Err(Failure::Usage(problem)) => {
            tracing::error!("{problem}");
            ExitCode::from(2)
        }
        Err(Failure::Start(problem)) => {
            tracing::error!("could not start: {problem}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// `Ok(None)` for `--help`.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Options>, String> {
    let mut options = Options {
        listen: DEFAULT_LISTEN.to_owned(),
        threads: DEFAULT_THREADS,
        final_flush_timeout: DEFAULT_FINAL_FLUSH_TIMEOUT,
        interval: DEFAULT_INTERVAL,
        max_lag: DEFAULT_MAX_LAG,
    };
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            return Ok(None);
        }
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => options.listen = value()?,
            "--threads" => {
                let value = value()?;
                options.threads = match value.parse() {
                    Ok(threads) if threads > 0 => threads,
                    _ => return Err(format!("--threads wants a positive integer, got {value:?}")),
                };
            }
            "--final-flush-timeout" => options.final_flush_timeout = seconds(&flag, &value()?)?,
            "--interval" => options.interval = seconds(&flag, &value()?)?,
            "--max-lag" => options.max_lag = seconds(&flag, &value()?)?,
            _ => return Err(format!("unknown flag {flag:?}")),
        }
    }
    Ok(Some(options))
}

/// A positive number of seconds, for `flag`.
fn seconds(flag: &str, value: &str) -> Result<Duration, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|seconds| *seconds > 0.0)
        .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
        .ok_or_else(|| format!("{flag} wants a positive number of seconds, got {value:?}"))
}

/// What every request thread shares: the one batcher of the process, and what the routes
/// beside `add` need.
struct State {
    batcher: Batcher,
    registry: Registry,
    metrics: PrometheusHandle,
    /// `/healthz` answers 503 past this lag.
    max_lag: Duration,
    /// Set when a stop signal arrives, before `close()`: from then on POSTs and `/healthz`
    /// answer 503. `add` would refuse too once `close()` has begun; the flag also covers
    /// the moment before, and says why in the answer.
    closing: AtomicBool,
}

/// Where `PUT /agents/{id}/keys` creates rows.
enum Registry {
    Memory(MemoryStore),
    /// A connection per registration: it happens once per workspace build, so a pooled or
    /// long-lived connection (and its reconnect logic) would buy nothing.
    Postgres {
        url: String,
        options: PgOptions,
    },
}

/// Runs the service until SIGTERM or Ctrl-C; returns what `close()` did.
fn run(options: &Options) -> Result<CloseReport, Failure> {
    // Before the batcher is built: it registers its metrics with the recorder current then.
    let metrics = install_metrics()?;
    let (batcher, registry) = start_batcher(options)?;

    // Registered only now: a signal during start-up ends the process at once, which loses
    // nothing, since nothing has been accepted yet.
    let mut signals = Signals::new([SIGTERM, SIGINT])
        .map_err(|err| Failure::Start(format!("installing the signal handlers: {err}")))?;
    let server = Server::http(options.listen.as_str())
        .map_err(|err| Failure::Start(format!("listening on {}: {err}", options.listen)))?;
    let server = Arc::new(server);
    let state = Arc::new(State {
        batcher,
        registry,
        metrics,
        max_lag: options.max_lag,
        closing: AtomicBool::new(false),
    });
    for index in 0..options.threads {
        let (server, state) = (server.clone(), state.clone());
        thread::Builder::new()
            .name(format!("http-{index}"))
            .spawn(move || serve(&server, &state))
            .map_err(|err| Failure::Start(format!("starting a request thread: {err}")))?;
    }
    tracing::info!(addr = %server.server_addr(), threads = options.threads, "listening");

    let signal = signals.forever().next();
    let started = Instant::now();
    state.closing.store(true, Relaxed);
    tracing::info!(
        signal = signal_name(signal),
        final_flush_timeout = ?options.final_flush_timeout,
        "stopping: new updates get 503; closing the batcher"
    );
    // Bounded by the final flush timeout whatever the database does; keep it below the
    // orchestrator's grace period (Kubernetes: 30 s) so the exit code is ours, not a SIGKILL.
    let report = state.batcher.close();
    log_close_report(&state.batcher, &report, started.elapsed());
    // Each request thread takes one unblock and returns. They are not joined: one still
    // reading a slow client's body would hold the exit for as long as the client likes, and
    // whatever it answers now is a 503.
    for _ in 0..options.threads {
        server.unblock();
    }
    Ok(report)
}

/// The signal's name for the log.
fn signal_name(signal: Option<i32>) -> &'static str {
    match signal {
        Some(SIGTERM) => "SIGTERM",
        Some(SIGINT) => "SIGINT",
        _ => "unknown",
    }
}

/// One line with the `CloseReport`, and the batcher's losses over its life, so the last
/// line of a replica's log says whether it kept everything it accepted.
fn log_close_report(batcher: &Batcher, report: &CloseReport, took: Duration) {
    let stats = batcher.stats();
    // Two calls with the same fields: a `tracing` event's level is fixed where it is written.
    if report.unwritten == 0 {
        tracing::info!(
            written = report.written,
            unwritten = report.unwritten,
            deadline_hit = report.deadline_hit,
            ?took,
            dropped = stats.dropped,
            retention_dropped = stats.retention_dropped,
            rejected = stats.rejected,
            "close report: everything accepted was written"
        );
    } else {
        tracing::error!(
            written = report.written,
            unwritten = report.unwritten,
            deadline_hit = report.deadline_hit,
            ?took,
            dropped = stats.dropped,
            retention_dropped = stats.retention_dropped,
            rejected = stats.rejected,
            "close report: entries were left unwritten"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Start-up: the store, the publisher, the watcher and the batcher.
// ---------------------------------------------------------------------------------------

/// Builds the batcher over PostgreSQL (`DATABASE_URL`) or in memory, and starts the thread
/// that watches the announcements.
fn start_batcher(options: &Options) -> Result<(Batcher, Registry), Failure> {
    let var = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
    let (url, listen_url) = match (var("DATABASE_URL"), var("LISTEN_DATABASE_URL")) {
        (Some(url), listen_url) => {
            let listen_url = listen_url.unwrap_or_else(|| url.clone());
            (url, listen_url)
        }
        (None, Some(_)) => {
            return Err(Failure::Usage(
                "LISTEN_DATABASE_URL is set but DATABASE_URL is not; set both, or neither for \
                 the in-memory store"
                    .to_owned(),
            ))
        }
        (None, None) => {
            tracing::info!("backend: in memory (set DATABASE_URL for PostgreSQL)");
            let store = MemoryStore::new();
            let pubsub = MemoryPubsub::new();
            // Subscribed before the batcher starts, so no announcement is missed.
            let payloads = pubsub.subscribe(METADATA_BATCH_CHANNEL);
            spawn_watcher(move |wait| match payloads.recv_timeout(wait) {
                Ok(payload) => agent_ids::decode_chunk(&payload)
                    .map(|agents| Some(Watched::Agents(agents.len())))
                    .map_err(|err| format!("malformed announcement: {err}")),
                Err(_) => Ok(None),
            })?;
            let batcher = build(Batcher::builder(store.clone(), pubsub), options)?;
            return Ok((batcher, Registry::Memory(store)));
        }
    };

    tracing::info!(
        database = %pg_url::redact(&url),
        listen_database = %pg_url::redact(&listen_url),
        "backend: PostgreSQL"
    );
    // Named sessions, so an operator can tell them apart in pg_stat_activity.
    let named = |role: &str| PgOptions::new().application_name(format!("metadata-service {role}"));
    let start = |what: &str| {
        let what = what.to_owned();
        move |err: &dyn std::fmt::Display| Failure::Start(format!("{what}: {err}"))
    };
    // The example creates its table itself. A real service runs its own migrations;
    // `migrate` is idempotent and safe from several replicas at once.
    let mut client = pg::connect_client(&url, &named("setup"))
        .map_err(|err| start("connecting to DATABASE_URL")(&err))?;
    pg::migrate(&mut client).map_err(|err| start("creating the table")(&err))?;
    drop(client);

    let store =
        PgStore::open(&url, named("store")).map_err(|err| start("opening the store")(&err))?;
    let publisher = PgPublisher::open(&url, named("publisher"))
        .map_err(|err| start("opening the publisher")(&err))?;
    // Listening before the batcher starts, so its first announcement is heard.
    let mut subscriber = PgSubscriber::open(&listen_url, METADATA_BATCH_CHANNEL, named("listen"))
        .map_err(|err| start("opening the subscriber")(&err))?;
    spawn_watcher(move |wait| match subscriber.next(wait) {
        Ok(Some(pg::SubscriberEvent::Agents(agents))) => Ok(Some(Watched::Agents(agents.len()))),
        Ok(Some(pg::SubscriberEvent::Reconnected)) => Ok(Some(Watched::Reconnected)),
        // An event this version does not know: re-reading everything is always safe.
        Ok(Some(_)) => Ok(Some(Watched::Reconnected)),
        Ok(None) => Ok(None),
        Err(err) => Err(err.to_string()),
    })?;
    let batcher = build(Batcher::builder(store, publisher), options)?;
    Ok((
        batcher,
        Registry::Postgres {
            url,
            options: named("register"),
        },
    ))
}

fn build(builder: metadata_batcher::Builder, options: &Options) -> Result<Batcher, Failure> {
    builder
        .final_flush_timeout(options.final_flush_timeout)
        .interval(options.interval)
        .build()
        .map_err(|err| Failure::Start(format!("building the batcher: {err}")))
}

/// What the watcher heard.
enum Watched {
    /// An announcement of this many changed agents.
    Agents(usize),
    /// The subscriber lost its session and listens on a new one: announcements may have
    /// been missed.
    Reconnected,
}

/// Starts the thread that hears which agents changed, as every replica's watchers do. A real
/// service re-reads those agents' rows for the clients watching them; this one counts them.
///
/// It is never joined: it holds nothing that needs a clean end, and the process's exit ends it.
fn spawn_watcher(
    mut next: impl FnMut(Duration) -> Result<Option<Watched>, String> + Send + 'static,
) -> Result<(), Failure> {
    thread::Builder::new()
        .name("watch".into())
        .spawn(move || {
            // Logged when it starts failing and when it recovers, not on every call: while
            // the database is away, every call fails.
            let mut failing = false;
            loop {
                match next(WATCH_WAIT) {
                    Ok(heard) => {
                        if failing {
                            tracing::info!("the announcement watcher hears again");
                            failing = false;
                        }
                        match heard {
                            Some(Watched::Agents(agents)) => {
                                counter!(names::ANNOUNCED_AGENTS_TOTAL).increment(agents as u64)
                            }
                            Some(Watched::Reconnected) => {
                                // A real watcher re-reads everything it shows here.
                                tracing::warn!("the subscriber reconnected; announcements may have been missed");
                                counter!(names::SUBSCRIBER_RECONNECTS_TOTAL).increment(1);
                            }
                            None => {}
                        }
                    }
                    Err(problem) if !failing => {
                        tracing::warn!(%problem, "the announcement watcher cannot hear");
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
        })
        .map(drop)
        .map_err(|err| Failure::Start(format!("starting the watcher: {err}")))
}

// ---------------------------------------------------------------------------------------
// Metrics.
// ---------------------------------------------------------------------------------------

/// Installs the process's Prometheus recorder, with the batcher's buckets, and a thread
/// that keeps its histograms drained.
fn install_metrics() -> Result<PrometheusHandle, Failure> {
    let handle = metadata_batcher::metrics::prometheus_builder()
        .install_recorder()
        .map_err(|err| Failure::Start(format!("installing the metrics recorder: {err}")))?;
    let upkeep = handle.clone();
    thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            thread::sleep(METRICS_UPKEEP_EVERY);
            upkeep.run_upkeep();
        })
        .map_err(|err| Failure::Start(format!("starting the metrics upkeep: {err}")))?;
    describe_counter!(
        names::REQUESTS_TOTAL,
        "HTTP requests answered, by route and status code."
    );
    describe_counter!(
        names::ACCEPTED_KEYS_TOTAL,
        "Metadata keys the batcher accepted (Stats::accepted)."
    );
    describe_counter!(
        names::UNMATCHED_TOTAL,
        "Written entries that updated no row: the key was not registered, or the stored row was newer (Stats::unmatched)."
    );
    describe_counter!(
        names::ANNOUNCED_AGENTS_TOTAL,
        "Agent IDs heard in announcements on the metadata batch channel."
    );
    describe_counter!(
        names::SUBSCRIBER_RECONNECTS_TOTAL,
        "Times the subscriber lost its session and listened on a new one."
    );
    // Present from the start at 0, so a rate over them never misses the first increase.
    counter!(names::ANNOUNCED_AGENTS_TOTAL).absolute(0);
    counter!(names::SUBSCRIBER_RECONNECTS_TOTAL).absolute(0);
    Ok(handle)
}

/// The Prometheus text: the batcher's own metrics as recorded (the batcher keeps its lag
/// and health gauges current), plus two totals of `stats()` that have no series of their
/// own, read at scrape time (`stats()` answers at once, without the worker).
fn render_metrics(state: &State) -> Reply {
    let stats = state.batcher.stats();
    counter!(names::ACCEPTED_KEYS_TOTAL).absolute(stats.accepted);
    counter!(names::UNMATCHED_TOTAL).absolute(stats.unmatched);
    Reply {
        status: 200,
        content_type: "text/plain; version=0.0.4",
        body: state.metrics.render(),
        allow: None,
    }
}

// ---------------------------------------------------------------------------------------
// Requests.
// ---------------------------------------------------------------------------------------

/// An answer, before it is sent.
struct Reply {
    status: u16,
    content_type: &'static str,
    body: String,
    /// The methods a route takes, for a 405.
    allow: Option<&'static str>,
}

impl Reply {
    fn json(status: u16, body: serde_json::Value) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: body.to_string(),
            allow: None,
        }
    }

    fn error(status: u16, message: impl Into<String>) -> Reply {
        Reply::json(status, json!({ "error": message.into() }))
    }

    fn closing() -> Reply {
        Reply::error(
            503,
            "the service is shutting down and takes no more updates; send them to another replica",
        )
    }
}

/// A request thread: answers requests until `run` unblocks it.
fn serve(server: &Server, state: &State) {
    loop {
        let mut request = match server.recv() {
            Ok(request) => request,
            // An unblock from `run`, or a failed accept; only the first ends the thread.
            Err(_) if state.closing.load(Relaxed) => return,
            Err(err) => {
                tracing::warn!(%err, "accepting a request failed");
                continue;
            }
        };
        let (route, reply) = route(state, &mut request);
        counter!(
            names::REQUESTS_TOTAL,
            "route" => route,
            "code" => reply.status.to_string()
        )
        .increment(1);
        tracing::debug!(method = %request.method(), url = request.url(), status = reply.status);
        let mut response = Response::from_string(reply.body)
            .with_status_code(reply.status)
            .with_header(header("Content-Type", reply.content_type));
        if let Some(allow) = reply.allow {
            response = response.with_header(header("Allow", allow));
        }
        if let Err(err) = request.respond(response) {
            // The client went away; nothing to do about it.
            tracing::debug!(%err, "sending a response failed");
        }
    }
}

fn header(name: &str, value: &str) -> Header {
    // Both are constants of this file: valid header bytes by construction.
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("a constant header name and value")
}

/// Dispatches on the path; returns the route's template (a metric label of bounded
/// cardinality, unlike the path) and the answer.
fn route(state: &State, request: &mut Request) -> (&'static str, Reply) {
    let url = request.url().to_owned();
    let path = url.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = request.method().clone();
    let allow = |allowed: &'static str| Reply {
        allow: Some(allowed),
        ..Reply::error(405, format!("{path} takes {allowed} only"))
    };
    match segments.as_slice() {
        ["agents", id, "metadata"] => {
            let reply = match method {
                Method::Post => post_metadata(state, id, request).unwrap_or_else(|e| e),
                _ => allow("POST"),
            };
            ("/agents/{id}/metadata", reply)
        }
        ["agents", id, "keys"] => {
            let reply = match method {
                Method::Put => put_keys(state, id, request).unwrap_or_else(|e| e),
                _ => allow("PUT"),
            };
            ("/agents/{id}/keys", reply)
        }
        ["metrics"] => {
            let reply = match method {
                Method::Get => render_metrics(state),
                _ => allow("GET"),
            };
            ("/metrics", reply)
        }
        ["healthz"] => {
            let reply = match method {
                Method::Get => healthz(state),
                _ => allow("GET"),
            };
            ("/healthz", reply)
        }
        _ => ("other", Reply::error(404, format!("no route {path}"))),
    }
}

/// One metadata entry as agents send it; Coder's agent API has the same fields.
///
/// Unknown fields are refused rather than ignored: a misspelt `"vaule"` would otherwise
/// store an empty value and answer 200.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default)]
    error: String,
    /// RFC 3339, as Go's `time.Time` marshals it: `2024-05-01T12:00:00.123456789+02:00`.
    collected_at: String,
}

impl Entry {
    fn into_metadata(self, index: usize) -> Result<Metadata, Reply> {
        // `time`'s parser takes any offset and up to nanoseconds, as Go writes them.
        let collected_at = OffsetDateTime::parse(&self.collected_at, &Rfc3339).map_err(|err| {
            Reply::error(
                400,
                format!(
                    "entry {index}: collected_at {:?} is not an RFC 3339 time such as \
                     2024-05-01T12:00:00.5Z: {err}",
                    self.collected_at
                ),
            )
        })?;
        Ok(Metadata::new(
            self.key,
            self.value,
            self.error,
            SystemTime::from(collected_at),
        ))
    }
}

/// `POST /agents/{id}/metadata`: parse, then `add` on this thread. `add` never blocks, so a
/// request thread is never held by the database.
///
/// | outcome | status |
/// |---|---|
/// | accepted, whole or in part (`dropped` keys found the channel full; the agent's next report carries them again) | 200 |
/// | malformed agent id, body not a JSON list of entries, `collected_at` not RFC 3339 | 400 |
/// | `AddError::Invalid`: a key or field the crate refuses (empty or over-long key, NUL byte); nothing of the call was queued | 422 |
/// | body over 1 MiB | 413 |
/// | closing (`AddError::Closed`, or the stop signal has arrived) | 503 |
fn post_metadata(state: &State, id: &str, request: &mut Request) -> Result<Reply, Reply> {
    if state.closing.load(Relaxed) {
        return Err(Reply::closing());
    }
    let agent_id = parse_agent_id(id)?;
    let body = read_body(request)?;
    let entries: Vec<Entry> = serde_json::from_slice(&body).map_err(|err| {
        Reply::error(
            400,
            format!(
                "the body must be a JSON list of {{\"key\", \"value\", \"error\", \
                 \"collected_at\"}}: {err}"
            ),
        )
    })?;
    let metadata = entries
        .into_iter()
        .enumerate()
        .map(|(index, entry)| entry.into_metadata(index))
        .collect::<Result<Vec<_>, _>>()?;
    match state.batcher.add(agent_id, metadata) {
        Ok(report) => Ok(Reply::json(
            200,
            json!({ "accepted": report.accepted, "dropped": report.dropped }),
        )),
        Err(AddError::Closed) => Err(Reply::closing()),
        Err(err @ AddError::Invalid { index, .. }) => Err(Reply::json(
            422,
            json!({ "error": err.to_string(), "index": index }),
        )),
        Err(err) => Err(Reply::error(500, err.to_string())),
    }
}

/// `PUT /agents/{id}/keys`: creates the agent's rows, as a workspace build does in Coder.
/// Keys already registered are left as they are; answers how many rows were created.
fn put_keys(state: &State, id: &str, request: &mut Request) -> Result<Reply, Reply> {
    let agent_id = parse_agent_id(id)?;
    let body = read_body(request)?;
    let keys: Vec<String> = serde_json::from_slice(&body).map_err(|err| {
        Reply::error(
            400,
            format!("the body must be a JSON list of key names: {err}"),
        )
    })?;
    // The rules `add` applies to a key, checked before anything is created.
    for (index, key) in keys.iter().enumerate() {
        if let Some(problem) = key_problem(key) {
            return Err(Reply::json(
                422,
                json!({ "error": format!("key {index} is invalid: {problem}"), "index": index }),
            ));
        }
    }
    let created = match &state.registry {
        Registry::Memory(store) => {
            // Counted before, not in, `register`: two PUTs at once may both count a key,
            // which matters to no one.
            let new: Vec<&String> = keys
                .iter()
                .filter(|key| store.get(agent_id, key).is_none())
                .collect();
            let created = new.len() as u64;
            store.register(agent_id, new);
            created
        }
        Registry::Postgres { url, options } => {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            let mut client = pg::connect_client(url, options)
                .map_err(|err| Reply::error(503, format!("cannot reach the database: {err}")))?;
            pg::register_keys(&mut client, agent_id, &keys)
                .map_err(|err| Reply::error(503, format!("registering the keys failed: {err}")))?
        }
    };
    Ok(Reply::json(200, json!({ "created": created })))
}

/// What `add` would refuse in a key, so a registration cannot create a row no update can reach.
fn key_problem(key: &str) -> Option<InvalidMetadata> {
    let chars = key.chars().count();
    if key.is_empty() {
        Some(InvalidMetadata::EmptyKey)
    } else if chars > MAX_KEY_CHARS {
        Some(InvalidMetadata::KeyTooLong { chars })
    } else if key.contains('\0') {
        Some(InvalidMetadata::NulByte {
            field: MetadataField::Key,
        })
    } else {
        None
    }
}

fn parse_agent_id(id: &str) -> Result<Uuid, Reply> {
    Uuid::parse_str(id).map_err(|err| {
        Reply::error(
            400,
            format!("malformed agent id {id:?}: {err}; an agent id is a UUID"),
        )
    })
}

/// The body, at most [`MAX_BODY_BYTES`].
fn read_body(request: &mut Request) -> Result<Vec<u8>, Reply> {
    let too_large = || {
        Reply::error(
            413,
            format!("the body is larger than {MAX_BODY_BYTES} bytes"),
        )
    };
    if request
        .body_length()
        .is_some_and(|length| length as u64 > MAX_BODY_BYTES)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    request
        .as_reader()
        .take(MAX_BODY_BYTES + 1)
        .read_to_end(&mut body)
        .map_err(|err| Reply::error(400, format!("reading the body: {err}")))?;
    if body.len() as u64 > MAX_BODY_BYTES {
        return Err(too_large());
    }
    Ok(body)
}

/// `GET /healthz`: 200 when ready, 503 with the reason when not; the body carries
/// `health()` either way, for whoever looks.
fn healthz(state: &State) -> Reply {
    let health = state.batcher.health();
    let problem = readiness_problem(&health, state.max_lag, state.closing.load(Relaxed));
    let seconds = |age: Option<Duration>| age.map(|age| age.as_secs_f64());
    Reply::json(
        if problem.is_none() { 200 } else { 503 },
        json!({
            "ready": problem.is_none(),
            "problem": problem,
            "worker_alive": health.worker_alive,
            "consecutive_store_failures": health.consecutive_store_failures,
            "oldest_unflushed_age_seconds": seconds(health.oldest_unflushed_age),
            "store_call_age_seconds": seconds(health.store_call_age),
        }),
    )
}

/// Why this replica should get no traffic, or `None` when it should.
///
/// - Closing: it takes no more updates.
/// - The worker is dead: nothing it accepts will ever be written, and it does not recover;
///   restart the process (a liveness probe may use the same check).
/// - The store has failed [`UNREADY_AFTER_STORE_FAILURES`] flushes in a row (see there for
///   why that many). The batcher keeps what it holds and retries; readiness returns with
///   the first flush that writes.
/// - The oldest update not yet written is older than `max_lag` ([`DEFAULT_MAX_LAG`] says
///   why): the store works, but too slowly, or its failures come slowly. Readiness
///   returns once the backlog is written.
///
/// `store_call_age` is reported but does not decide: a hung call ends at its deadline and
/// counts as a failure then.
fn readiness_problem(health: &Health, max_lag: Duration, closing: bool) -> Option<String> {
    if closing {
        Some("shutting down".to_owned())
    } else if !health.worker_alive {
        Some("the batcher's worker thread is not running; restart the process".to_owned())
    } else if health.consecutive_store_failures >= UNREADY_AFTER_STORE_FAILURES {
        Some(format!(
            "the last {} flushes failed (unready from {UNREADY_AFTER_STORE_FAILURES}); the \
             batcher keeps the entries and retries",
            health.consecutive_store_failures
        ))
    } else {
        let age = health.oldest_unflushed_age.filter(|age| *age > max_lag)?;
        Some(format!(
            "the oldest update not yet written has waited {:.1} s, more than --max-lag {} s; \
             the store is too slow or failing slowly",
            age.as_secs_f64(),
            max_lag.as_secs_f64()
        ))
    }
}
