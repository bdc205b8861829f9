//! The metadata batcher under load: simulated agents on several blocking threads feed one
//! `Batcher`, a progress line is printed each second, and at the end the demo checks that
//! the store holds the newest value of every key and that every updated agent was announced.
//!
//! ```text
//! cargo run --release --example demo                       # in memory
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo run --release --example demo -- --duration 5   # against PostgreSQL
//! cargo run --release --example demo -- --metrics          # and the Prometheus text
//! cargo run --release --example demo -- --help
//!
//! # Through a transaction pooler (PgBouncer, pool_mode = transaction): the store and the
//! # publisher go through it, the subscriber needs a session of its own on the server.
//! DATABASE_URL=postgres://postgres@127.0.0.1:6432/postgres \
//! LISTEN_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo run --release --example demo -- --statement-mode unnamed
//! ```
//!
//! Every statement the demo sends itself is unnamed (`query_typed`, `execute_typed`), so it
//! works through a transaction pooler, where a statement prepared by name on one server
//! connection is missing on the next.
//!
//! Exits 0 when both checks pass, 1 when one fails or the set-up fails, 2 on bad flags.
//! Against PostgreSQL, the rows it registers are removed on every exit path (a guard's
//! `Drop`), also when the set-up fails half-way. The demo's own session (read-back, clean-up)
//! reconnects for up to a minute after losing its connection, so with a multi-host URL
//! (`...?target_session_attrs=read-write`) a failover mid-run costs neither.

#[path = "support/pg_url.rs"]
mod pg_url;
#[path = "support/reconnecting.rs"]
mod reconnecting;

use std::collections::{HashMap, HashSet};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use metadata_batcher::postgres::SubscriberEvent;
use metadata_batcher::postgres::{
    self as pg, PgOptions, PgPublisher, PgStore, PgSubscriber, StatementMode,
};
use metadata_batcher::{
    agent_ids, Batcher, MemoryPubsub, MemoryStore, Metadata, Publisher, Stats, Store,
    DEFAULT_BATCH_SIZE, DEFAULT_INTERVAL, METADATA_BATCH_CHANNEL,
};
use metrics_exporter_prometheus::PrometheusHandle;
use postgres::types::{ToSql, Type};
use uuid::Uuid;

use reconnecting::Reconnecting;

/// How long, after `close`, the demo waits for the last announcements to arrive: NOTIFY is
/// delivered asynchronously, after the final flush has returned.
/// How long the demo's own session keeps reconnecting after losing its connection (a
/// restart, a failover to the URL's next host), so the read-back and the clean-up still run.
const RECONNECT_PATIENCE: Duration = Duration::from_secs(60);
const ANNOUNCEMENT_GRACE: Duration = Duration::from_secs(5);
/// How often the announcement collector checks whether it should stop.
const COLLECTOR_POLL: Duration = Duration::from_millis(100);

const USAGE: &str = "\
Simulated agents feeding one metadata batcher; checks the result at the end.

USAGE: cargo run --release --example demo -- [FLAGS]

FLAGS:
  --agents N        simulated agents (default 2000)
  --keys N          metadata keys per agent, all reported on every call (default 10)
  --rate N          updates (keys) per second offered in total (default 50000)
  --duration SECS   how long to send, in seconds (default 10)
  --threads N       sending threads; each owns a share of the agents (default 4)
  --batch-size N    the batcher's batch size (default 500)
  --interval MS     the batcher's flush interval in milliseconds (default 5000)
  --max-pending N   an optional bound on the distinct entries held while flushes run
                    (default: none; the library's 64 MiB byte bound applies)
  --listen-url URL  where the subscriber connects (default: LISTEN_DATABASE_URL, else
                    DATABASE_URL); behind a transaction pooler, the server itself, since
                    LISTEN needs a session of its own
  --statement-mode M  prepared (default) | unnamed: how the store sends its statement;
                    unnamed behind a transaction pooler
  --metrics         print the batcher's Prometheus metrics at the end
  --help            print this

ENVIRONMENT:
  DATABASE_URL      run against this PostgreSQL server instead of the in-memory store
  LISTEN_DATABASE_URL  the subscriber's URL, as --listen-url";

/// The demo's settings, from the command line.
#[derive(Debug, Clone)]
struct Options {
    agents: usize,
    keys: usize,
    rate: u64,
    duration: Duration,
    threads: usize,
    batch_size: usize,
    interval: Duration,
    /// `None`: no entry bound, only the library's byte bound.
    max_pending: Option<usize>,
    /// Print the Prometheus text at the end; without it, one line says how to get it.
    metrics: bool,
    /// The subscriber's URL, when it is not DATABASE_URL (which may be a pooler).
    listen_url: Option<String>,
    statement_mode: StatementMode,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            agents: 2000,
            keys: 10,
            rate: 50_000,
            duration: Duration::from_secs(10),
            threads: 4,
            batch_size: DEFAULT_BATCH_SIZE,
            interval: DEFAULT_INTERVAL,
            max_pending: None,
            metrics: false,
            listen_url: None,
            statement_mode: StatementMode::Prepared,
        }
    }
}

/// The flags that take a value.
const FLAGS: [&str; 10] = [
    "--listen-url",
    "--statement-mode",
    "--agents",
    "--keys",
    "--rate",
    "--duration",
    "--threads",
    "--batch-size",
    "--interval",
    "--max-pending",
];

/// What the command line asked for.
enum Command {
    Run(Options),
    Help,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut options = Options::default();
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            return Ok(Command::Help);
        }
        if flag == "--metrics" {
            options.metrics = true;
            continue;
        }
        if !FLAGS.contains(&flag.as_str()) {
            return Err(format!("unknown flag {flag:?}"));
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--agents" => options.agents = positive(&flag, &value)?,
            "--keys" => options.keys = positive(&flag, &value)?,
            "--rate" => options.rate = positive(&flag, &value)?,
            "--threads" => options.threads = positive(&flag, &value)?,
            "--batch-size" => options.batch_size = positive(&flag, &value)?,
            "--interval" => options.interval = Duration::from_millis(positive(&flag, &value)?),
            "--max-pending" => options.max_pending = Some(positive(&flag, &value)?),
            "--listen-url" => options.listen_url = Some(value),
            "--statement-mode" => {
                options.statement_mode = match value.as_str() {
                    "prepared" => StatementMode::Prepared,
                    "unnamed" => StatementMode::Unnamed,
                    _ => return Err(format!("{flag} wants prepared or unnamed, got {value:?}")),
                }
            }
            "--duration" => {
                let seconds: f64 = value
                    .parse()
                    .map_err(|_| format!("{flag} wants seconds, got {value:?}"))?;
                if !(seconds > 0.0 && seconds.is_finite()) {
                    return Err(format!("{flag} must be a positive number of seconds"));
                }
                options.duration = Duration::from_secs_f64(seconds);
            }
            _ => unreachable!("every flag of FLAGS is handled"),
        }
    }
    if options.listen_url.is_none() {
        options.listen_url = std::env::var("LISTEN_DATABASE_URL")
            .ok()
            .filter(|url| !url.is_empty());
    }
    Ok(Command::Run(options))
}

/// Parses a flag's value as a positive integer.
fn positive<T: std::str::FromStr + PartialEq + Default>(
    flag: &str,
    value: &str,
) -> Result<T, String> {
    match value.parse::<T>() {
        Ok(number) if number != T::default() => Ok(number),
        _ => Err(format!("{flag} wants a positive integer, got {value:?}")),
    }
}

fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Run(options)) => options,
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(problem) => {
            eprintln!("demo: {problem}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("demo: FAILED: a check did not pass (see above)");
            ExitCode::FAILURE
        }
        Err(problem) => {
            eprintln!("demo: FAILED: {problem}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the whole demo; `Ok(true)` when every check passed.
fn run(options: &Options) -> Result<bool, String> {
    // Fresh agent IDs each run, so rows left by earlier runs in a shared database never
    // match, and the checks see this run's rows only.
    let agents: Vec<Uuid> = (0..options.agents).map(|_| Uuid::new_v4()).collect();
    let keys = key_names(options.keys);
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => run_postgres(options, &url, &agents, &keys),
        _ => run_memory(options, &agents, &keys),
    }
}

fn run_memory(options: &Options, agents: &[Uuid], keys: &[String]) -> Result<bool, String> {
    println!("backend: in-memory (MemoryStore + MemoryPubsub); set DATABASE_URL for PostgreSQL");
    let store = MemoryStore::new();
    for &agent_id in agents {
        store.register(agent_id, keys.iter().cloned());
    }
    let pubsub = MemoryPubsub::new();
    // Subscribed before the batcher starts, so no announcement can be missed.
    let payloads = pubsub.subscribe(METADATA_BATCH_CHANNEL);
    let announcements =
        Announcements::collect(move |timeout| match payloads.recv_timeout(timeout) {
            Ok(payload) => agent_ids::decode_chunk(&payload)
                .map(Some)
                .map_err(|err| format!("malformed announcement: {err}")),
            Err(_) => Ok(None),
        });

    let outcome = drive(options, agents, keys, store.clone(), pubsub)?;
    let stored: Stored = outcome
        .newest
        .keys()
        .filter_map(|(agent_id, key)| {
            let row = store.get(*agent_id, key)?;
            Some(((*agent_id, key.clone()), row.value))
        })
        .collect();
    Ok(outcome.finish(&stored, announcements))
}

fn run_postgres(
    options: &Options,
    url: &str,
    agents: &[Uuid],
    keys: &[String],
) -> Result<bool, String> {
    let listen_url = options.listen_url.as_deref().unwrap_or(url);
    println!("backend: PostgreSQL ({})", pg_url::redact(url));
    if listen_url != url {
        println!("subscriber: {}", pg_url::redact(listen_url));
    }
    // The crate's own client: the URL may say sslmode=verify-full, which the postgres
    // crate's parser refuses.
    let session = Reconnecting::new(url, PgOptions::default(), RECONNECT_PATIENCE)
        .map_err(|err| format!("DATABASE_URL: {err}"))?;
    // From here on, whichever way `run_postgres` ends, the guard removes this run's rows.
    let mut rows = RegisteredRows::new(session, agents);
    let mut set_up = pg::connect_client(url, &PgOptions::default())
        .map_err(|err| format!("connecting to DATABASE_URL: {err}"))?;
    pg::migrate(&mut set_up).map_err(|err| err.to_string())?;
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let created = pg::register_keys_for_agents(&mut set_up, agents, &key_refs)
        .map_err(|err| err.to_string())?;
    drop(set_up);
    println!(
        "registered {created} rows ({} agents x {} keys)",
        agents.len(),
        keys.len()
    );

    // Named for this run, so the TLS line below finds exactly these sessions.
    let named = |role: &str| {
        PgOptions::new()
            .application_name(format!("mb-demo-{} {role}", std::process::id()))
            .statement_mode(options.statement_mode)
    };
    let store =
        PgStore::open(url, named("store")).map_err(|err| format!("PgStore::open: {err}"))?;
    let publisher = PgPublisher::open(url, named("publisher"))
        .map_err(|err| format!("PgPublisher::open: {err}"))?;
    // Listening before the batcher starts, on a connection of its own, as a watching
    // replica would.
    let mut subscriber =
        PgSubscriber::open(listen_url, METADATA_BATCH_CHANNEL, named("subscriber")).map_err(
            |err| {
                format!(
                    "PgSubscriber::open: {err}{}",
                    if listen_url == url {
                        " (behind a transaction pooler, point --listen-url or \
                         LISTEN_DATABASE_URL at the server itself)"
                    } else {
                        ""
                    }
                )
            },
        )?;
    let tls = tls_summary(rows.session())?;
    let announcements = Announcements::collect(move |timeout| match subscriber.next(timeout) {
        Ok(Some(SubscriberEvent::Agents(agents))) => Ok(Some(agents)),
        Ok(Some(SubscriberEvent::Reconnected)) => {
            Err("the subscriber reconnected; notifications may have been missed".to_owned())
        }
        Ok(Some(other)) => Err(format!("an event this demo does not know: {other:?}")),
        Ok(None) => Ok(None),
        Err(err) => Err(format!("subscriber: {err}")),
    });

    let outcome = drive(options, agents, keys, store, publisher)?;
    println!("{tls}");
    let stored = read_back(rows.session(), agents)?;
    let removed = rows.remove()?;
    println!("removed this run's {removed} rows");
    Ok(outcome.finish(&stored, announcements))
}

/// Whether this run's store, publisher and subscriber sessions use TLS, as the server sees
/// them (`pg_stat_ssl`).
fn tls_summary(session: &mut Reconnecting) -> Result<String, String> {
    let pattern = format!("mb-demo-{} %", std::process::id());
    let rows = session.run("reading pg_stat_ssl", |client| {
        client.query_typed(
            "SELECT a.application_name, s.ssl, coalesce(s.version, '') \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name LIKE $1 ORDER BY 1",
            &[(&pattern as &(dyn ToSql + Sync), Type::TEXT)],
        )
    })?;
    let read = |err: postgres::Error| format!("reading pg_stat_ssl: {err}");
    let mut sessions = Vec::new();
    let mut all_tls = true;
    let mut unseen = vec!["publisher", "store", "subscriber"];
    for row in &rows {
        let name: String = row.try_get(0).map_err(read)?;
        let role = name.rsplit(' ').next().unwrap_or_default().to_owned();
        unseen.retain(|expected| *expected != role);
        let ssl: bool = row.try_get(1).map_err(read)?;
        all_tls &= ssl;
        sessions.push(match ssl {
            true => format!(
                "{role} TLS ({})",
                row.try_get::<_, String>(2).map_err(read)?
            ),
            false => format!("{role} plaintext"),
        });
    }
    // Behind a pooler the server sees the pooler's sessions, named after whichever client
    // used them last: a role it does not see under its name cannot be vouched for.
    for role in &unseen {
        sessions.push(format!("{role} not seen by the server (behind a pooler?)"));
    }
    Ok(format!(
        "sessions use TLS: {} ({})",
        match (all_tls, unseen.is_empty()) {
            (true, true) => "yes",
            (true, false) => "unknown",
            (false, _) => "no",
        },
        sessions.join(", ")
    ))
}

/// This run's rows in the database. The agent IDs are random, so the rows are this run's
/// own: dropping the guard deletes them, whether the run ends normally, with an error (a
/// build error, a lost connection) or with a panic, and the database is left as it was.
struct RegisteredRows<'a> {
    session: Reconnecting,
    agents: &'a [Uuid],
    removed: bool,
}

impl<'a> RegisteredRows<'a> {
    fn new(session: Reconnecting, agents: &'a [Uuid]) -> Self {
        RegisteredRows {
            session,
            agents,
            removed: false,
        }
    }

    /// The demo's own session (it reconnects), for its own statements.
    fn session(&mut self) -> &mut Reconnecting {
        &mut self.session
    }

    /// Deletes the rows now; returns how many there were. Safe to repeat after a lost
    /// connection: a second DELETE finds what the first left.
    fn remove(&mut self) -> Result<u64, String> {
        self.removed = true;
        let agents = self.agents;
        self.session.run("removing this run's rows", |client| {
            client.execute_typed(
                "DELETE FROM workspace_agent_metadata WHERE workspace_agent_id = ANY($1)",
                &[(&agents as &(dyn ToSql + Sync), Type::UUID_ARRAY)],
            )
        })
    }
}

impl Drop for RegisteredRows<'_> {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        // An early exit: the error that caused it is printed by `main`; this line says
        // the database was cleaned up (or why it could not be).
        match self.remove() {
            Ok(removed) => eprintln!("demo: removed this run's {removed} rows"),
            Err(problem) => eprintln!("demo: {problem}"),
        }
    }
}

/// Reads every row of this run's agents with one SELECT.
fn read_back(session: &mut Reconnecting, agents: &[Uuid]) -> Result<Stored, String> {
    let rows = session.run("reading the table back", |client| {
        client.query_typed(
            "SELECT workspace_agent_id, key, value FROM workspace_agent_metadata \
             WHERE workspace_agent_id = ANY($1)",
            &[(&agents as &(dyn ToSql + Sync), Type::UUID_ARRAY)],
        )
    })?;
    let read = |err: postgres::Error| format!("reading the table back: {err}");
    rows.iter()
        .map(|row| {
            Ok((
                (row.try_get(0).map_err(read)?, row.try_get(1).map_err(read)?),
                row.try_get(2).map_err(read)?,
            ))
        })
        .collect()
}

/// The newest value the demo had accepted for each (agent, key).
type Newest = HashMap<(Uuid, String), String>;
/// The value the store holds for each (agent, key).
type Stored = HashMap<(Uuid, String), String>;

/// What a run left to check and print once the batcher is closed.
struct Outcome {
    newest: Newest,
    stats: Stats,
    /// `Some` with `--metrics`.
    metrics: Option<PrometheusHandle>,
}

impl Outcome {
    /// Waits for the last announcements, runs the checks, prints the metrics (or how to
    /// get them); returns whether the checks passed.
    fn finish(self, stored: &Stored, mut announcements: Announcements) -> bool {
        announcements.wait_for(self.newest.keys().map(|(agent_id, _)| *agent_id).collect());
        let passed = check(&self.newest, stored, &self.stats, &announcements);
        match &self.metrics {
            Some(handle) => println!("\n# Prometheus metrics of the batcher\n{}", handle.render()),
            None => println!("\nmetrics: add --metrics for the batcher's Prometheus text"),
        }
        passed
    }
}

/// Builds the batcher, runs the simulated agents with a progress line each second, closes
/// the batcher and prints the summary.
fn drive(
    options: &Options,
    agents: &[Uuid],
    keys: &[String],
    store: impl Store,
    publisher: impl Publisher,
) -> Result<Outcome, String> {
    println!(
        "{} agents x {} keys, {} updates/s offered on {} threads for {:.1} s; \
         batch size {}, interval {} ms, max pending {}",
        options.agents,
        options.keys,
        options.rate,
        options.threads,
        options.duration.as_secs_f64(),
        options.batch_size,
        options.interval.as_millis(),
        options
            .max_pending
            .map_or_else(|| "none (byte bound only)".to_owned(), |n| n.to_string()),
    );
    // A recorder of our own rather than a global one: the batcher registers its metrics
    // when built, so building it inside `with_local_recorder` is enough for its threads.
    let recorder = metadata_batcher::metrics::prometheus_builder().build_recorder();
    let metrics = recorder.handle();
    let batcher = metrics::with_local_recorder(&recorder, || {
        let builder = Batcher::builder(store, publisher)
            .batch_size(options.batch_size)
            .interval(options.interval);
        match options.max_pending {
            Some(entries) => builder.max_pending(entries),
            None => builder,
        }
        .build()
    })
    .map_err(|err| format!("building the batcher: {err}"))?;

    let accepted = AtomicU64::new(0);
    let started = Instant::now();
    let newest = thread::scope(|scope| {
        let senders: Vec<_> = shares(agents, options.threads)
            .map(|share| {
                let share = SimulatedAgents {
                    batcher: &batcher,
                    agents: share,
                    keys,
                    // Each thread offers its part of the rate.
                    calls_per_second: options.rate as f64
                        / options.threads as f64
                        / options.keys as f64,
                    accepted: &accepted,
                };
                scope.spawn(move || share.run(started, options.duration))
            })
            .collect();
        print_progress(&batcher, &accepted, started, options.duration);
        let mut newest = Newest::new();
        for sender in senders {
            newest.extend(sender.join().expect("a sender thread panicked"));
        }
        newest
    });
    let sent_for = started.elapsed();

    batcher.close();
    let elapsed = started.elapsed();
    let stats = batcher.stats();
    print_summary(options, &stats, accepted.load(Relaxed), sent_for, elapsed);
    Ok(Outcome {
        newest,
        stats,
        metrics: options.metrics.then_some(metrics),
    })
}

/// Splits the agents into `threads` nearly equal shares (some empty when there are fewer
/// agents than threads).
fn shares(agents: &[Uuid], threads: usize) -> impl Iterator<Item = &[Uuid]> {
    let per_thread = agents.len().div_ceil(threads).max(1);
    agents.chunks(per_thread)
}

/// One blocking thread's worth of simulated agents.
struct SimulatedAgents<'a> {
    batcher: &'a Batcher,
    agents: &'a [Uuid],
    keys: &'a [String],
    calls_per_second: f64,
    accepted: &'a AtomicU64,
}

impl SimulatedAgents<'_> {
    /// Reports all keys of one agent per call, round robin over its agents, paced to its
    /// rate, until `duration` has passed. Returns the newest accepted value per (agent, key).
    fn run(self, started: Instant, duration: Duration) -> Newest {
        // Per (agent index, key index): this thread's agents are its own, so no other
        // thread can send a newer value for them.
        let mut newest: Vec<Vec<Option<String>>> =
            vec![vec![None; self.keys.len()]; self.agents.len()];
        let call_interval = Duration::from_secs_f64(1.0 / self.calls_per_second);
        let mut previous = SystemTime::UNIX_EPOCH;
        let mut sequence: u64 = 0;
        while !self.agents.is_empty() {
            // Pacing: call n is due at start + n x interval; a thread that fell behind
            // catches up without sleeping.
            let due = started + call_interval.mul_f64(sequence as f64);
            if due >= started + duration {
                break;
            }
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            let agent = sequence as usize % self.agents.len();
            // Strictly increasing per thread, even if the wall clock steps back, so the
            // newest value the demo sent is also the newest by `collected_at`.
            let collected_at = SystemTime::now().max(previous + Duration::from_micros(1));
            previous = collected_at;
            let metadata: Vec<Metadata> = self
                .keys
                .iter()
                .map(|key| Metadata::new(key, sample_value(key, sequence), "", collected_at))
                .collect();
            let values: Vec<String> = metadata.iter().map(|entry| entry.value.clone()).collect();
            match self.batcher.add(self.agents[agent], metadata) {
                Ok(report) => {
                    self.accepted.fetch_add(report.accepted as u64, Relaxed);
                    // `add` keeps the first `accepted` entries of a call and drops the rest.
                    for (slot, value) in newest[agent].iter_mut().zip(values).take(report.accepted)
                    {
                        *slot = Some(value);
                    }
                }
                Err(err) => panic!("add refused a valid call: {err}"),
            }
            sequence += 1;
        }
        self.newest_by_key(newest)
    }

    fn newest_by_key(&self, newest: Vec<Vec<Option<String>>>) -> Newest {
        let mut by_key = Newest::new();
        for (agent_id, values) in self.agents.iter().zip(newest) {
            for (key, value) in self.keys.iter().zip(values) {
                if let Some(value) = value {
                    by_key.insert((*agent_id, key.clone()), value);
                }
            }
        }
        by_key
    }
}

/// Key names like an agent's metadata scripts would report.
fn key_names(count: usize) -> Vec<String> {
    const NAMES: [&str; 10] = [
        "cpu", "mem", "disk", "load", "net_rx", "net_tx", "procs", "swap", "temp", "uptime",
    ];
    (0..count)
        .map(|i| match NAMES.get(i) {
            Some(name) => (*name).to_owned(),
            None => format!("metric_{i}"),
        })
        .collect()
}

/// A value like "cpu=42% #1234": the sequence number makes every call's value distinct, so
/// the final check can tell the newest value from an older one.
fn sample_value(key: &str, sequence: u64) -> String {
    let percent = sequence.wrapping_mul(2_654_435_761) % 101;
    format!("{key}={percent}% #{sequence}")
}

/// Prints a line each second, like pgbench's `-P 1`, until `duration` has passed.
fn print_progress(batcher: &Batcher, accepted: &AtomicU64, started: Instant, duration: Duration) {
    let mut next = started + Duration::from_secs(1);
    let mut last_accepted = 0;
    while next <= started + duration {
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let stats = batcher.stats();
        let accepted = accepted.load(Relaxed);
        println!(
            "progress: {:5.1} s, accepted {accepted} ({}/s), dropped {}, flushed {}, \
             flushes capacity {} scheduled {} manual {} shutdown {}, queued {}, batched {}, \
             store errors {}",
            started.elapsed().as_secs_f64(),
            accepted - last_accepted,
            stats.dropped,
            stats.flushed,
            stats.flushes.capacity,
            stats.flushes.scheduled,
            stats.flushes.manual,
            stats.flushes.shutdown,
            stats.queued,
            stats.batched,
            stats.store_errors,
        );
        last_accepted = accepted;
        next += Duration::from_secs(1);
    }
}

fn print_summary(
    options: &Options,
    stats: &Stats,
    accepted: u64,
    sent_for: Duration,
    elapsed: Duration,
) {
    let offered = accepted + stats.dropped;
    println!("\n# Summary");
    println!(
        "offered:        {offered} updates in {:.2} s ({:.0}/s; asked for {}/s)",
        sent_for.as_secs_f64(),
        offered as f64 / sent_for.as_secs_f64(),
        options.rate
    );
    println!("accepted:       {accepted}");
    println!("dropped:        {} (channel full)", stats.dropped);
    println!(
        "flushed:        {} distinct entries written ({} unmatched)",
        stats.flushed, stats.unmatched
    );
    println!(
        "flushes:        capacity {}, scheduled {}, manual {}, shutdown {}",
        stats.flushes.capacity,
        stats.flushes.scheduled,
        stats.flushes.manual,
        stats.flushes.shutdown
    );
    println!(
        "errors:         store {}, publish {}, rejected {}, retention dropped {}, unwritten at shutdown {}",
        stats.store_errors, stats.publish_errors, stats.rejected, stats.retention_dropped, stats.unwritten_at_shutdown
    );
    match &stats.last_flush {
        Some(flush) => println!(
            "last flush:     {} of {} entries, {} agents, {} NOTIFY payloads, {:.2} ms",
            flush.reason.as_str(),
            flush.count,
            flush.agents,
            flush.chunks,
            flush.elapsed.as_secs_f64() * 1000.0
        ),
        None => println!("last flush:     none"),
    }
    println!(
        "elapsed:        {:.2} s (sending and close)",
        elapsed.as_secs_f64()
    );
}

/// The agent IDs announced on `METADATA_BATCH_CHANNEL`, gathered by a thread of their own
/// while the demo runs, so a subscriber's buffer never fills.
struct Announcements {
    seen: Arc<Mutex<HashSet<Uuid>>>,
    problems: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Announcements {
    /// Starts a thread that calls `next(timeout)` until stopped: `Ok(Some(ids))` is an
    /// announcement, `Ok(None)` a quiet timeout, `Err` a problem worth reporting.
    fn collect(
        mut next: impl FnMut(Duration) -> Result<Option<Vec<Uuid>>, String> + Send + 'static,
    ) -> Self {
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let problems = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, problems, stop) = (seen.clone(), problems.clone(), stop.clone());
            thread::Builder::new()
                .name("demo-announcements".into())
                .spawn(move || {
                    while !stop.load(Relaxed) {
                        match next(COLLECTOR_POLL) {
                            Ok(Some(agents)) => seen.lock().unwrap().extend(agents),
                            Ok(None) => {}
                            Err(problem) => problems.lock().unwrap().push(problem),
                        }
                    }
                })
                .expect("starting the announcement collector")
        };
        Announcements {
            seen,
            problems,
            stop,
            thread: Some(thread),
        }
    }

    /// Waits until every agent of `expected` was announced or the grace period has passed,
    /// then stops the collector.
    fn wait_for(&mut self, expected: HashSet<Uuid>) {
        let deadline = Instant::now() + ANNOUNCEMENT_GRACE;
        while Instant::now() < deadline && !expected.is_subset(&self.seen.lock().unwrap()) {
            thread::sleep(COLLECTOR_POLL / 2);
        }
        self.stop.store(true, Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the announcement collector panicked");
        }
    }
}

/// Checks and prints: every accepted key holds its newest value, every updated agent was
/// announced. Returns whether both hold.
fn check(newest: &Newest, stored: &Stored, stats: &Stats, announcements: &Announcements) -> bool {
    println!("\n# Checks");
    let wrong: Vec<_> = newest
        .iter()
        .filter(|(slot, value)| stored.get(*slot) != Some(*value))
        .collect();
    let values_ok = wrong.is_empty();
    println!(
        "{} newest value stored for {} of {} keys",
        verdict(values_ok),
        newest.len() - wrong.len(),
        newest.len()
    );
    for ((agent_id, key), value) in wrong.iter().take(5) {
        println!(
            "       {agent_id} {key}: sent {value:?}, stored {:?}",
            stored.get(&(*agent_id, key.clone()))
        );
    }
    if !values_ok {
        // The batcher counts what it had to give up; say whether that explains the misses.
        println!(
            "       counted losses: retention dropped {}, rejected {}, lost to panics {}, \
             unwritten at shutdown {}",
            stats.retention_dropped,
            stats.rejected,
            stats.lost_to_panics,
            stats.unwritten_at_shutdown
        );
    }

    let updated: HashSet<Uuid> = newest.keys().map(|(agent_id, _)| *agent_id).collect();
    let seen = announcements.seen.lock().unwrap();
    let missing: Vec<_> = updated
        .iter()
        .filter(|agent_id| !seen.contains(agent_id))
        .collect();
    let announced_ok = missing.is_empty();
    println!(
        "{} {} of {} updated agents announced on {METADATA_BATCH_CHANNEL}",
        verdict(announced_ok),
        updated.len() - missing.len(),
        updated.len()
    );
    for agent_id in missing.iter().take(5) {
        println!("       never announced: {agent_id}");
    }
    for problem in announcements.problems.lock().unwrap().iter() {
        println!("       subscriber: {problem}");
    }
    values_ok && announced_ok
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "[ OK ]"
    } else {
        "[FAIL]"
    }
}
