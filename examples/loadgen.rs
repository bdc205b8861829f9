//! Load generator: offers a steady rate of metadata updates to one batcher, or to several
//! replicas' batchers on one table, and reports what became of them (targets 4, 5 and 6 of
//! docs/performance.md; issues 15 and 16).
//!
//! ```text
//! cargo run --release --example loadgen -- [flags]
//!   --agents N            agents (default 10000)
//!   --keys N              keys per agent; one `add` call carries all of an agent's keys (10)
//!   --rate R              offered updates per second, per replica (100000); each replica
//!                         visits every agent once per round, so at R = agents × keys every
//!                         key is updated once a second by each replica
//!   --duration S          seconds of load (10)
//!   --store KIND          memory | sim:L_MS (costs L ms + 5 µs per row, a sleep) | postgres
//!                         (DATABASE_URL, default postgres://postgres@127.0.0.1:5432/postgres;
//!                         a database mb_loadgen_<pid> is created and dropped)
//!   --batch-size N        (500)
//!   --max-pending N       bound on distinct entries (library default: none)
//!   --max-pending-bytes N bound on the backlog's bytes (library default: 64 MiB)
//!   --channel-capacity N  (library default: 5 × batch size)
//!   --interval-ms N       flush interval (library default: 5000)
//!   --mode M              pipelined (default) | inline (the Go behaviour)
//!   --subscribe           postgres only: LISTEN (one subscriber per replica) and check that
//!                         every subscriber heard every updated agent
//!   --verify              postgres only: SELECT every row at the end and check that it holds
//!                         the newest update any replica accepted
//!   --quiet               no progress line each second
//!   --find-ceiling        search the highest offered rate with zero drops instead:
//!     --lo R --hi R         search range (defaults 5000 and 200000)
//!     --steps N             bisection steps after the bounds (6)
//!     --trial S             seconds per trial (3)
//!
//! PostgreSQL only:
//!   --replicas N          N batchers, each with its own PgStore, PgPublisher and (with
//!                         --subscribe) PgSubscriber, on one table, all updating the same
//!                         agents, each in an order of its own (1)
//!   --listen-url URL      where the subscribers and loadgen's own admin session connect,
//!                         when DATABASE_URL is a transaction pooler: the server itself
//!                         (default: $LISTEN_DATABASE_URL, else DATABASE_URL)
//!   --statement-mode M    prepared | unnamed: how the stores send their statement
//!                         (default prepared; unnamed with --pooler). Behind a transaction
//!                         pooler, unnamed
//!   --pooler              start a throwaway PgBouncer in transaction mode in front of
//!                         DATABASE_URL (which must then name the server) and send the
//!                         stores', publishers' and --verify's statements through it
//!     --pool-size N         its server connections per database (8)
//!   --max-statement-rows N  the stores' PgOptions::max_statement_rows (20000); the batch
//!                         size keeps every statement at batch_size rows, as before
//!                         statements were sized to the path
//!   --parallel-statements N  the stores' PgOptions::parallel_statements (2): statements
//!                         each store runs at once while a backlog lasts
//!   --server-limit N      instead of a batcher: N sessions on the data path, each sending
//!                         the crate's statement (BATCH_UPDATE_SQL, --batch-size rows in
//!                         (agent, key) order, prepared, or unnamed in unnamed mode) one after
//!                         the other for --duration; prints the rows/s the server took, the
//!                         ceiling a batcher on that path is measured against
//!   --rtt-ms X            put a TCP proxy on 127.0.0.1 in front of the data path's host and
//!                         port (the server, or the pooler) that delays every chunk about
//!                         X/2 ms each way (shortened once or twice until SELECT 1 through
//!                         it takes X ms); loadgen prints the round trip it measured
//! ```
//!
//! Where each session connects:
//!
//! | session | connects to |
//! |---|---|
//! | store and publisher of each replica, `--verify` | the data path: DATABASE_URL, or the `--pooler`; through the `--rtt-ms` proxy when given |
//! | subscriber of each replica | `--listen-url`, else `LISTEN_DATABASE_URL`, else DATABASE_URL (never through the proxy) |
//! | admin (CREATE/DROP DATABASE, `pg_stat_database`) and set-up (migrate, register, VACUUM) | the same as the subscribers |
//!
//! loadgen's own sessions (admin and `--verify`) reconnect for up to a minute after losing
//! their connection, so a restart or a failover mid-run (a multi-host URL with
//! `target_session_attrs=read-write`) still ends with the summary, the verification and the
//! database dropped.
//!
//! Every statement loadgen sends itself is unnamed (`query_typed`, or the simple query
//! protocol), so it works through a transaction pooler.
//!
//! Freshness is measured per committed row: every update carries `collected_at` = the
//! wall-clock instant just before its `add`, and the store wrapper, right after the store's
//! `batch_update` returned (for PostgreSQL: the statement committed), records
//! `now - collected_at` for each row it wrote. An update that a newer one replaced in the
//! batch is never written, so it has no sample of its own; its key's newer value has.
//! `collected_at` comes from one clock shared by the replicas, in whole microseconds (what
//! `timestamptz` keeps) and strictly increasing across all of them, so per key "the newest
//! update any replica accepted" is well defined: it is what `--verify` expects to find.
//!
//! With PostgreSQL, deadlocks are the database's `pg_stat_database.deadlocks`, read on the
//! admin session before the run and after it, once the run's sessions have ended (a backend
//! reports its counts when it exits at the latest). A summary ends with a line
//! `RESULT key=value ...` for scripts. The exit status is 1 when `--verify` found a row not at
//! its newest value or `--subscribe` an updated agent that a subscriber never heard, or when
//! the run could not be set up; 2 on bad flags.

#[path = "support/delay_proxy.rs"]
mod delay_proxy;
#[path = "support/load.rs"]
mod load;
#[path = "support/pg_url.rs"]
mod pg_url;
#[path = "support/pgbouncer.rs"]
mod pgbouncer;
#[path = "support/pgbouncer_ini.rs"]
mod pgbouncer_ini;
#[path = "support/reconnecting.rs"]
mod reconnecting;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;
use metadata_batcher::postgres::{
    self as pg, PgOptions, PgPublisher, PgStore, PgSubscriber, StatementMode, SubscriberEvent,
};
use metadata_batcher::{
    BatchResult, Batcher, Capabilities, CloseReport, FlushMode, Metadata, MetadataBatch, Observe,
    Observer, PublishError, Publisher, Stats, Store, StoreCall, StoreError, Written,
    METADATA_BATCH_CHANNEL,
};
use postgres::types::{ToSql, Type};
use uuid::Uuid;

use delay_proxy::DelayProxy;
use load::{agent, agent_index, micros_to_time, Clock, Generator, VisitOrder};
use pgbouncer::Pooler;
use reconnecting::Reconnecting;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// The simulated store's cost per row, as PostgreSQL's batched update costs here.
const SIM_PER_ROW: Duration = Duration::from_micros(5);
/// The most rows the simulated store takes in one call: a backlog's worth, as nothing
/// bounds it but the batcher's own sizing.
const SIM_MAX_ROWS: usize = 100_000;
/// A trial passes only if the generator offered at least this share of the asked rate.
const OFFERED_SHARE_REQUIRED: f64 = 0.97;
/// The `--pooler`'s server connections: one per store and publisher of four replicas, so
/// that waiting for a pooled connection is not what a run measures.
const DEFAULT_POOL_SIZE: u32 = 8;
/// `SELECT 1`s timed to report the data path's round trip; the median is printed.
const RTT_SAMPLES: usize = 20;
/// How many times `--rtt-ms` corrects the proxy's delay after measuring.
const RTT_CALIBRATIONS: usize = 2;
/// How long loadgen waits for its database's sessions to end after a run, before it reads
/// `pg_stat_database` (a backend reports its deadlocks when it exits, at the latest).
const SESSIONS_END_TIMEOUT: Duration = Duration::from_secs(5);
/// How long loadgen's own sessions (admin, `--verify`) keep reconnecting after losing their
/// connection: a restart or a failover (promotion, then the URL's next host) mid-run.
const RECONNECT_PATIENCE: Duration = Duration::from_secs(60);
/// How often that wait looks: PostgreSQL offers nothing to block on for another backend's
/// exit.
const SESSIONS_END_POLL: Duration = Duration::from_millis(20);
/// After the run, a subscriber stops once it heard nothing for this long (NOTIFY arrives
/// after the final flush's commit)...
const SUBSCRIBER_QUIET: Duration = Duration::from_secs(1);
/// ...and at the latest this long after the run, whatever it still hears.
const SUBSCRIBER_MAX_WAIT: Duration = Duration::from_secs(10);
/// How often the progress line is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// After the generators' end, how often the progress loop looks whether they have stopped.
const GENERATOR_END_POLL: Duration = Duration::from_millis(5);

#[derive(Clone, Debug)]
enum StoreKind {
    Memory,
    Sim(Duration),
    Postgres,
}

#[derive(Clone, Debug)]
struct Config {
    agents: usize,
    keys: usize,
    rate: f64,
    duration: Duration,
    store: StoreKind,
    batch_size: usize,
    max_pending: Option<usize>,
    max_pending_bytes: Option<usize>,
    channel_capacity: Option<usize>,
    interval: Option<Duration>,
    mode: FlushMode,
    subscribe: bool,
    verify: bool,
    quiet: bool,
    find_ceiling: bool,
    lo: f64,
    hi: f64,
    steps: u32,
    trial: Duration,
    replicas: usize,
    listen_url: Option<String>,
    statement_mode: Option<StatementMode>,
    pooler: bool,
    pool_size: u32,
    rtt_ms: Option<f64>,
    max_statement_rows: Option<usize>,
    parallel_statements: Option<usize>,
    server_limit: Option<usize>,
}

fn parse_args() -> Result<Config, String> {
    let mut config = Config {
        agents: 10_000,
        keys: 10,
        rate: 100_000.0,
        duration: Duration::from_secs(10),
        store: StoreKind::Memory,
        batch_size: 500,
        max_pending: None,
        max_pending_bytes: None,
        channel_capacity: None,
        interval: None,
        mode: FlushMode::Pipelined,
        subscribe: false,
        verify: false,
        quiet: false,
        find_ceiling: false,
        lo: 5_000.0,
        hi: 200_000.0,
        steps: 6,
        trial: Duration::from_secs(3),
        replicas: 1,
        listen_url: None,
        statement_mode: None,
        pooler: false,
        pool_size: DEFAULT_POOL_SIZE,
        rtt_ms: None,
        max_statement_rows: None,
        parallel_statements: None,
        server_limit: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        let number = |text: String| -> Result<f64, String> {
            match text.parse::<f64>() {
                Ok(n) if n.is_finite() && n >= 0.0 => Ok(n),
                _ => Err(format!("{flag}: {text:?} is not a non-negative number")),
            }
        };
        match flag.as_str() {
            "--agents" => config.agents = number(value()?)? as usize,
            "--keys" => config.keys = number(value()?)? as usize,
            "--rate" => config.rate = number(value()?)?,
            "--duration" => config.duration = Duration::from_secs_f64(number(value()?)?),
            "--store" => {
                let kind = value()?;
                config.store = match kind.as_str() {
                    "memory" => StoreKind::Memory,
                    "postgres" => StoreKind::Postgres,
                    sim if sim.starts_with("sim:") => {
                        StoreKind::Sim(Duration::from_secs_f64(number(sim[4..].to_owned())? / 1e3))
                    }
                    other => {
                        return Err(format!("--store {other:?}: memory | sim:L_MS | postgres"))
                    }
                }
            }
            "--batch-size" => config.batch_size = number(value()?)? as usize,
            "--max-pending" => config.max_pending = Some(number(value()?)? as usize),
            "--max-pending-bytes" => {
                config.max_pending_bytes = Some(number(value()?)? as usize);
            }
            "--channel-capacity" => config.channel_capacity = Some(number(value()?)? as usize),
            "--interval-ms" => {
                config.interval = Some(Duration::from_secs_f64(number(value()?)? / 1e3))
            }
            "--mode" => {
                config.mode = match value()?.as_str() {
                    "pipelined" => FlushMode::Pipelined,
                    "inline" => FlushMode::Inline,
                    other => return Err(format!("--mode {other:?}: pipelined | inline")),
                }
            }
            "--subscribe" => config.subscribe = true,
            "--verify" => config.verify = true,
            "--quiet" => config.quiet = true,
            "--find-ceiling" => config.find_ceiling = true,
            "--lo" => config.lo = number(value()?)?,
            "--hi" => config.hi = number(value()?)?,
            "--steps" => config.steps = number(value()?)? as u32,
            "--trial" => config.trial = Duration::from_secs_f64(number(value()?)?),
            "--replicas" => config.replicas = number(value()?)? as usize,
            "--listen-url" => config.listen_url = Some(value()?),
            "--statement-mode" => {
                config.statement_mode = Some(match value()?.as_str() {
                    "prepared" => StatementMode::Prepared,
                    "unnamed" => StatementMode::Unnamed,
                    other => return Err(format!("--statement-mode {other:?}: prepared | unnamed")),
                })
            }
            "--pooler" => config.pooler = true,
            "--pool-size" => config.pool_size = number(value()?)? as u32,
            "--rtt-ms" => config.rtt_ms = Some(number(value()?)?),
            "--server-limit" => config.server_limit = Some(number(value()?)? as usize),
            "--max-statement-rows" => config.max_statement_rows = Some(number(value()?)? as usize),
            "--parallel-statements" => {
                config.parallel_statements = Some(number(value()?)? as usize)
            }
            "--help" | "-h" => return Err("see the flags at the top of examples/loadgen.rs".into()),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if config.listen_url.is_none() {
        config.listen_url = std::env::var("LISTEN_DATABASE_URL")
            .ok()
            .filter(|url| !url.is_empty());
    }
    if config.agents == 0 || config.keys == 0 || config.replicas == 0 || config.pool_size == 0 {
        return Err("--agents, --keys, --replicas and --pool-size must be at least 1".into());
    }
    if config.rate <= 0.0 || config.batch_size == 0 {
        return Err("--rate and --batch-size must be positive".into());
    }
    let postgres_only = [
        (config.subscribe, "--subscribe"),
        (config.verify, "--verify"),
        (config.replicas > 1, "--replicas"),
        (config.pooler, "--pooler"),
        (config.rtt_ms.is_some(), "--rtt-ms"),
        (config.statement_mode.is_some(), "--statement-mode"),
        (config.max_statement_rows.is_some(), "--max-statement-rows"),
        (
            config.parallel_statements.is_some(),
            "--parallel-statements",
        ),
        (config.server_limit.is_some(), "--server-limit"),
    ];
    if !matches!(config.store, StoreKind::Postgres) {
        if let Some((_, flag)) = postgres_only.iter().find(|(set, _)| *set) {
            return Err(format!("{flag} needs --store postgres"));
        }
    }
    Ok(config)
}

/// A lock whose holder panicked still guards plain counters: keep using them.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A `postgres::Error` in the server's words: its `Display` alone says only "db error".
fn db_error(err: &postgres::Error) -> String {
    let Some(db) = err.as_db_error() else {
        return err.to_string();
    };
    let mut text = format!("{}: {} ({})", db.severity(), db.message(), db.code().code());
    if let Some(detail) = db.detail() {
        text.push_str(&format!("; detail: {detail}"));
    }
    if let Some(hint) = db.hint() {
        text.push_str(&format!("; hint: {hint}"));
    }
    text
}

/// Options for one of loadgen's sessions, named so `pg_stat_activity` tells them apart.
fn session_options(role: &str, statement_mode: StatementMode) -> PgOptions {
    PgOptions::new()
        .application_name(format!("mb-loadgen-{} {role}", std::process::id()))
        .statement_mode(statement_mode)
}

/// What the store wrappers saw: one entry per successful store call, all replicas together.
struct Recorder {
    freshness_us: Histogram<u64>,
    calls: u64,
    rows: u64,
    max_rows: usize,
    store_time: Duration,
    max_store_time: Duration,
}

impl Recorder {
    fn new() -> Self {
        Recorder {
            freshness_us: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            calls: 0,
            rows: 0,
            max_rows: 0,
            store_time: Duration::ZERO,
            max_store_time: Duration::ZERO,
        }
    }
}

/// Watches the real store through `Observe` (which forwards its interrupts, capabilities and
/// parallel statements): times each call and, right after it returned, records each written
/// row's freshness (commit instant − `collected_at`, which is the add instant).
struct Timing {
    recorder: Arc<Mutex<Recorder>>,
}

/// The store each replica's batcher writes through.
fn timed<S: Store>(inner: S, recorder: &Arc<Mutex<Recorder>>) -> Observe<S, Timing> {
    let recorder = recorder.clone();
    Observe::new(inner, Timing { recorder })
}

impl Observer for Timing {
    /// Records the statements of one call that succeeded; those of one call ran at once, so
    /// each took the call's time.
    fn after(&mut self, call: &StoreCall<'_>) {
        let committed = SystemTime::now();
        let elapsed = call.elapsed;
        // Shared by the replicas' flusher threads: a lock per call, not per row.
        let mut r = lock(&self.recorder);
        for (batch, result) in call.batches.iter().zip(call.results) {
            if !matches!(result, BatchResult::Written(_)) {
                continue;
            }
            load::record_freshness(&mut r.freshness_us, batch, committed);
            r.calls += 1;
            r.rows += batch.len() as u64;
            r.max_rows = r.max_rows.max(batch.len());
            r.store_time += elapsed;
            r.max_store_time = r.max_store_time.max(elapsed);
        }
    }
}

/// A store that costs `latency + 5 µs × rows` (a sleep) and writes nothing.
struct SimStore {
    latency: Duration,
}

impl Store for SimStore {
    fn batch_update(&mut self, batch: &MetadataBatch) -> Result<Written, StoreError> {
        thread::sleep(self.latency + SIM_PER_ROW * batch.len() as u32);
        Ok(Written::rows(batch.len() as u64))
    }

    /// As a database far away takes big statements (`PgStore` up to
    /// `PgOptions::max_statement_rows`): the batcher sizes them to the latency.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default().with_max_batch_rows(SIM_MAX_ROWS)
    }
}

/// Counts payloads instead of sending them (memory and simulated stores).
struct CountingPublisher(Arc<AtomicU64>);

impl Publisher for CountingPublisher {
    fn publish(&mut self, _channel: &str, _payload: &[u8]) -> Result<(), PublishError> {
        self.0.fetch_add(1, Relaxed);
        Ok(())
    }
}

/// Where a postgres run's sessions connect (the table at the top), and what keeps that path
/// up for as long as loadgen runs: the pooler and the proxy, if any.
struct Paths {
    /// The stores', publishers' and `--verify`'s URL (its database is replaced per run).
    data: String,
    /// The subscribers', the admin session's and the set-up's URL.
    direct: String,
    statement_mode: StatementMode,
    /// The `--rtt-ms` proxy's measured round trip: (through it, without it).
    round_trip: Option<(Duration, Duration)>,
    // Held, not read: dropping them stops the proxy's threads and the pooler's process.
    _proxy: Option<DelayProxy>,
    _pooler: Option<Pooler>,
}

impl Paths {
    fn set_up(config: &Config) -> Result<Paths, String> {
        let server = std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.into());
        let pooler = match config.pooler {
            true => Some(Pooler::start(&server, config.pool_size)?),
            false => None,
        };
        let data = match &pooler {
            Some(pooler) => pooler.url("postgres"),
            None => server.clone(),
        };
        let direct = config.listen_url.clone().unwrap_or_else(|| server.clone());
        let statement_mode = config.statement_mode.unwrap_or(match pooler {
            Some(_) => StatementMode::Unnamed,
            None => StatementMode::Prepared,
        });
        let mut described = match &pooler {
            Some(_) => format!(
                "{} (PgBouncer in transaction mode started by loadgen, pool {}, in front of {})",
                pg_url::redact(&data),
                config.pool_size,
                pg_url::redact(&server)
            ),
            None => pg_url::redact(&data),
        };
        let (data, proxy, round_trip) = match config.rtt_ms {
            Some(rtt_ms) => {
                let target = pg_url::socket_addr(&data)?;
                let one_way = Duration::from_secs_f64(rtt_ms / 2e3);
                let proxy = DelayProxy::start(target, one_way).map_err(|err| {
                    format!("starting the delay proxy in front of {target}: {err}")
                })?;
                let through = pg_url::with_host_port(&data, "127.0.0.1", proxy.port())?;
                let without = select1_round_trip(&data, statement_mode)?;
                let mut measured = select1_round_trip(&through, statement_mode)?;
                // Sleeps wake late, so the first round trip comes out long: shorten the
                // delay by half the excess (once or twice) until it is within 2 % of asked.
                for _ in 0..RTT_CALIBRATIONS {
                    let excess = measured.as_secs_f64() * 1e3 - rtt_ms;
                    if excess.abs() <= rtt_ms * 0.02 {
                        break;
                    }
                    let one_way_ms = (proxy.one_way().as_secs_f64() * 1e3 - excess / 2.0).max(0.0);
                    proxy.set_one_way(Duration::from_secs_f64(one_way_ms / 1e3));
                    measured = select1_round_trip(&through, statement_mode)?;
                }
                described = format!(
                    "{} (a delay proxy in front of {described}; asked round trip {rtt_ms:.2} ms, \
                     delay {:.3} ms each way after calibrating)",
                    pg_url::redact(&through),
                    proxy.one_way().as_secs_f64() * 1e3
                );
                let measured = (measured, without);
                (through, Some(proxy), Some(measured))
            }
            None => (data, None, None),
        };
        println!("data path          {described}");
        if let Some((through, without)) = round_trip {
            println!(
                "round trip         SELECT 1, median of {RTT_SAMPLES}: {:.2} ms through the proxy, {:.2} ms without",
                through.as_secs_f64() * 1e3,
                without.as_secs_f64() * 1e3
            );
        }
        println!(
            "direct             {} (subscribers, admin, set-up)",
            pg_url::redact(&direct)
        );
        println!(
            "statement mode     {}",
            match statement_mode {
                StatementMode::Unnamed => "unnamed",
                _ => "prepared",
            }
        );
        Ok(Paths {
            data,
            direct,
            statement_mode,
            round_trip,
            _proxy: proxy,
            _pooler: pooler,
        })
    }
}

/// The median time of `SELECT 1` on a fresh session to `url` (simple query protocol: one
/// round trip, nothing prepared).
fn select1_round_trip(url: &str, statement_mode: StatementMode) -> Result<Duration, String> {
    let mut client =
        pg::connect_client(url, &session_options("rtt", statement_mode)).map_err(|err| {
            format!(
                "connecting to {} to time SELECT 1: {err}",
                pg_url::redact(url)
            )
        })?;
    let mut samples = Vec::with_capacity(RTT_SAMPLES);
    // Three unmeasured first: the session's first statements also warm caches.
    for i in 0..RTT_SAMPLES + 3 {
        let start = Instant::now();
        client
            .simple_query("SELECT 1")
            .map_err(|err| format!("timing SELECT 1: {}", db_error(&err)))?;
        if i >= 3 {
            samples.push(start.elapsed());
        }
    }
    samples.sort();
    Ok(samples[samples.len() / 2])
}

/// The database a postgres run works in, dropped at the end. Its admin session reconnects
/// (a restart or a failover mid-run), so the summary and the drop still run.
struct Database {
    admin: Reconnecting,
    name: String,
    /// The run's database on the data path and on the direct one.
    data_url: String,
    direct_url: String,
}

impl Database {
    fn create(paths: &Paths, agents: usize, keys: &[String]) -> Result<Database, String> {
        let mut admin = Reconnecting::new(
            &paths.direct,
            session_options("admin", paths.statement_mode),
            RECONNECT_PATIENCE,
        )
        .map_err(|err| {
            format!(
                "{} (set DATABASE_URL, and LISTEN_DATABASE_URL or --listen-url when \
                 DATABASE_URL is a pooler): {err}",
                pg_url::redact(&paths.direct)
            )
        })?;
        let name = format!("mb_loadgen_{}", std::process::id());
        for sql in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ] {
            admin.run(&sql, |client| client.batch_execute(&sql))?;
        }
        // From here on, dropping `database` drops the database, whatever fails next.
        let database = Database {
            admin,
            data_url: pg_url::with_database(&paths.data, &name)?,
            direct_url: pg_url::with_database(&paths.direct, &name)?,
            name,
        };
        let mut client = pg::connect_client(
            &database.direct_url,
            &session_options("set-up", paths.statement_mode),
        )
        .map_err(|err| format!("connecting to {}: {err}", database.name))?;
        pg::migrate(&mut client).map_err(|err| err.to_string())?;
        let ids: Vec<Uuid> = (0..agents).map(agent).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        pg::register_keys_for_agents(&mut client, &ids, &keys).map_err(|err| err.to_string())?;
        client
            .batch_execute("VACUUM ANALYZE workspace_agent_metadata")
            .map_err(|err| format!("VACUUM ANALYZE: {}", db_error(&err)))?;
        Ok(database)
    }

    /// `pg_stat_database.deadlocks` of this database, as far as backends have reported.
    fn deadlocks(&mut self) -> Result<i64, String> {
        let name = &self.name;
        let rows = self.admin.run("reading pg_stat_database", |client| {
            client.query_typed(
                "SELECT deadlocks FROM pg_stat_database WHERE datname = $1",
                &[(name as &(dyn ToSql + Sync), Type::TEXT)],
            )
        })?;
        match rows.first() {
            Some(row) => row
                .try_get::<_, i64>(0)
                .map_err(|err| format!("reading pg_stat_database: {err}")),
            None => Err(format!("pg_stat_database has no row for {}", self.name)),
        }
    }

    /// Ends every session still on this database (a pooler's server connections, a store
    /// session given up on) and waits until they are gone: an exiting backend reports its
    /// statistics, deadlocks included, so `deadlocks` is complete afterwards.
    fn end_sessions(&mut self) -> Result<(), String> {
        let name = &self.name;
        // Two statements: in one, PostgreSQL may call pg_terminate_backend before it checks
        // the database, and end the admin session itself.
        let pids: Vec<i32> = self
            .admin
            .run("ending the run's sessions", |client| {
                client.query_typed(
                    "SELECT pid FROM pg_stat_activity WHERE datname = $1",
                    &[(name as &(dyn ToSql + Sync), Type::TEXT)],
                )
            })?
            .iter()
            .filter_map(|row| row.try_get(0).ok())
            .collect();
        self.admin.run("ending the run's sessions", |client| {
            client.query_typed(
                "SELECT pg_terminate_backend(pid) FROM unnest($1::int4[]) AS pid",
                &[(&pids as &(dyn ToSql + Sync), Type::INT4_ARRAY)],
            )
        })?;
        let deadline = Instant::now() + SESSIONS_END_TIMEOUT;
        loop {
            // Only the terminated ones: a pooler with `min_pool_size` opens new sessions at
            // once, and those have nothing to report.
            let left: i64 = self
                .admin
                .run("waiting for the run's sessions", |client| {
                    client.query_typed(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
                        &[(&pids as &(dyn ToSql + Sync), Type::INT4_ARRAY)],
                    )
                })?
                .first()
                .and_then(|row| row.try_get(0).ok())
                .unwrap_or(0);
            if left == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{left} of the run's sessions had not ended {SESSIONS_END_TIMEOUT:?} after pg_terminate_backend"
                ));
            }
            thread::sleep(SESSIONS_END_POLL);
        }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(err) = self.admin.run(&sql, |client| client.batch_execute(&sql)) {
            eprintln!("loadgen: {err} (drop it by hand)");
        }
    }
}

/// Peak resident set size of this process, from `VmHWM` in /proc/self/status.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))
                .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// `Stats::conflicts`: statements run again after a deadlock (40P01) or a serialization
/// failure (40001). An `Option` so that a store that cannot tell could print `na`.
fn conflicts(stats: &Stats) -> Option<u64> {
    Some(stats.conflicts)
}

/// What one replica came to.
#[derive(Debug, Default)]
struct ReplicaSummary {
    accepted: u64,
    dropped: u64,
    flushed: u64,
    store_errors: u64,
    conflicts: Option<u64>,
    close: CloseReport,
    close_seconds: f64,
    /// Updated agents its subscriber never heard (with `--subscribe`).
    unheard: Option<u64>,
    subscriber_problems: u64,
}

/// What one run came to.
#[derive(Debug, Default)]
struct Summary {
    rate: f64,
    seconds: f64,
    /// From the first `add` until the last replica's `close()` returned.
    written_seconds: f64,
    offered: u64,
    accepted: u64,
    dropped: u64,
    retention_dropped: u64,
    flushed: u64,
    unmatched: u64,
    store_errors: u64,
    conflicts: Option<u64>,
    deadlocks: Option<i64>,
    unwritten: u64,
    flushes: [u64; 4],
    store_calls: u64,
    mean_rows: f64,
    max_rows: usize,
    mean_store_ms: f64,
    max_store_ms: f64,
    fresh_p50_ms: f64,
    fresh_p99_ms: f64,
    fresh_max_ms: f64,
    add_p50_ns: u64,
    add_p99_ns: u64,
    add_max_ns: u64,
    peak_rss_kib: u64,
    verified_rows: Option<(u64, u64)>,
    /// Updated agents, and (agent, subscriber) pairs where the subscriber never heard it.
    announced: Option<(u64, u64)>,
    replicas: Vec<ReplicaSummary>,
    round_trip_ms: Option<f64>,
}

impl Summary {
    fn zero_drops(&self) -> bool {
        self.dropped == 0 && self.retention_dropped == 0
    }

    fn offered_rate(&self) -> f64 {
        self.offered as f64 / self.seconds
    }

    fn written_rate(&self) -> f64 {
        self.flushed as f64 / self.written_seconds
    }

    /// The checks that decide the exit status, each with what failed.
    fn failed_checks(&self) -> Vec<String> {
        let mut failed = Vec::new();
        if let Some((checked, wrong)) = self.verified_rows.filter(|&(_, wrong)| wrong > 0) {
            failed.push(format!(
                "{wrong} of {checked} rows not at their newest value"
            ));
        }
        if let Some((updated, unheard)) = self.announced.filter(|&(_, unheard)| unheard > 0) {
            failed.push(format!(
                "{unheard} (agent, subscriber) pairs never heard, of {updated} updated agents × {} subscribers",
                self.replicas.len()
            ));
        }
        failed
    }
}

/// What one subscriber heard.
struct Heard {
    announced: Vec<bool>,
    problems: u64,
}

/// A subscriber's thread: collects the announced agents until `stop` is set and then
/// nothing arrived for `SUBSCRIBER_QUIET` (at most `SUBSCRIBER_MAX_WAIT` after `stop`).
fn listen(
    replica: usize,
    mut subscriber: PgSubscriber,
    agents: usize,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<Heard>, String> {
    thread::Builder::new()
        .name(format!("loadgen-listen-r{replica}"))
        .spawn(move || {
            let mut heard = Heard {
                announced: vec![false; agents],
                problems: 0,
            };
            let mut stopped_at = None;
            let mut quiet_since = None;
            loop {
                match subscriber.next(Duration::from_millis(100)) {
                    Ok(Some(SubscriberEvent::Agents(ids))) => {
                        quiet_since = None;
                        for id in ids {
                            if let Some(i) = agent_index(id).filter(|&i| i < agents) {
                                heard.announced[i] = true;
                            }
                        }
                    }
                    Ok(Some(SubscriberEvent::Reconnected)) => {
                        heard.problems += 1;
                        eprintln!("replica {replica}: subscriber reconnected: announcements may be missing");
                    }
                    Ok(Some(other)) => {
                        heard.problems += 1;
                        eprintln!("replica {replica}: subscriber: an unknown event {other:?}");
                    }
                    Ok(None) => {}
                    Err(err) => {
                        heard.problems += 1;
                        eprintln!("replica {replica}: subscriber: {err}");
                    }
                }
                if stop.load(Relaxed) {
                    let stopped = *stopped_at.get_or_insert_with(Instant::now);
                    let quiet = *quiet_since.get_or_insert_with(Instant::now);
                    if quiet.elapsed() >= SUBSCRIBER_QUIET
                        || stopped.elapsed() >= SUBSCRIBER_MAX_WAIT
                    {
                        return heard;
                    }
                }
            }
        })
        .map_err(|err| format!("starting replica {replica}'s subscriber thread: {err}"))
}

/// One replica's batcher over the configured store.
fn build_batcher(
    config: &Config,
    replica: usize,
    database: Option<&Database>,
    statement_mode: StatementMode,
    key_names: &[String],
    recorder: &Arc<Mutex<Recorder>>,
    published: &Arc<AtomicU64>,
) -> Result<Batcher, String> {
    let role = |what: &str| format!("r{replica} {what}");
    let mut builder = match (&config.store, database) {
        (StoreKind::Memory, _) => {
            let store = metadata_batcher::MemoryStore::new();
            for a in 0..config.agents {
                store.register(agent(a), key_names.iter().cloned());
            }
            Batcher::builder(timed(store, recorder), CountingPublisher(published.clone()))
        }
        (StoreKind::Sim(latency), _) => Batcher::builder(
            timed(SimStore { latency: *latency }, recorder),
            CountingPublisher(published.clone()),
        ),
        (StoreKind::Postgres, Some(db)) => Batcher::builder(
            timed(
                PgStore::open(
                    &db.data_url,
                    session_options(&role("store"), statement_mode)
                        .max_statement_rows(
                            config
                                .max_statement_rows
                                .unwrap_or(pg::DEFAULT_MAX_STATEMENT_ROWS),
                        )
                        .parallel_statements(
                            config
                                .parallel_statements
                                .unwrap_or(pg::DEFAULT_PARALLEL_STATEMENTS),
                        ),
                )
                .map_err(|err| format!("replica {replica}: PgStore::open: {err}"))?,
                recorder,
            ),
            PgPublisher::open(
                &db.data_url,
                session_options(&role("publisher"), statement_mode),
            )
            .map_err(|err| format!("replica {replica}: PgPublisher::open: {err}"))?,
        ),
        (StoreKind::Postgres, None) => return Err("postgres needs a database".into()),
    };
    builder = builder
        .batch_size(config.batch_size)
        .flush_mode(config.mode);
    if let Some(max_pending) = config.max_pending {
        builder = builder.max_pending(max_pending);
    }
    if let Some(bytes) = config.max_pending_bytes {
        builder = builder.max_pending_bytes(bytes);
    }
    if let Some(capacity) = config.channel_capacity {
        builder = builder.channel_capacity(capacity);
    }
    if let Some(interval) = config.interval {
        builder = builder.interval(interval);
    }
    builder
        .build()
        .map_err(|err| format!("replica {replica}: building the batcher: {err}"))
}

fn run(
    config: &Config,
    paths: Option<&Paths>,
    rate: f64,
    duration: Duration,
    progress: bool,
) -> Result<Summary, String> {
    let key_names: Vec<String> = (0..config.keys).map(|k| format!("key{k}")).collect();
    let recorder = Arc::new(Mutex::new(Recorder::new()));
    let published = Arc::new(AtomicU64::new(0));
    let (mut database, statement_mode) = match (&config.store, paths) {
        (StoreKind::Postgres, Some(paths)) => (
            Some(Database::create(paths, config.agents, &key_names)?),
            paths.statement_mode,
        ),
        (StoreKind::Postgres, None) => return Err("postgres needs its paths set up".into()),
        _ => (None, StatementMode::Prepared),
    };
    let deadlocks_before = match &mut database {
        Some(db) => Some(db.deadlocks()?),
        None => None,
    };

    // The LISTEN side first, so no announcement is missed: one subscriber per replica.
    let stop_listening = Arc::new(AtomicBool::new(false));
    let mut subscribers = Vec::new();
    if let (Some(db), true) = (&database, config.subscribe) {
        for replica in 0..config.replicas {
            let subscriber = PgSubscriber::open(
                &db.direct_url,
                METADATA_BATCH_CHANNEL,
                session_options(&format!("r{replica} subscriber"), statement_mode),
            )
            .map_err(|err| {
                format!(
                    "replica {replica}: PgSubscriber::open: {err} (behind a transaction pooler, \
                     point --listen-url or LISTEN_DATABASE_URL at the server itself)"
                )
            })?;
            subscribers.push(listen(
                replica,
                subscriber,
                config.agents,
                stop_listening.clone(),
            )?);
        }
    }
    let mut batchers = Vec::new();
    for replica in 0..config.replicas {
        batchers.push(Arc::new(build_batcher(
            config,
            replica,
            database.as_ref(),
            statement_mode,
            &key_names,
            &recorder,
            &published,
        )?));
    }

    // The generators: one thread per replica, each in its own order, each paced to `rate`.
    let offered = Arc::new(AtomicU64::new(0));
    let clock = Arc::new(Clock::default());
    let started = Instant::now();
    let mut generators = Vec::new();
    for (replica, batcher) in batchers.iter().enumerate() {
        let generator = Generator {
            replica,
            batcher: batcher.clone(),
            clock: clock.clone(),
            order: VisitOrder::of(replica, config.replicas, config.agents),
            agents: config.agents,
            key_names: key_names.clone(),
            rate,
            duration,
            offered: offered.clone(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        generators.push(
            thread::Builder::new()
                .name(format!("loadgen-r{replica}"))
                .spawn(move || generator.run())
                .map_err(|err| format!("starting replica {replica}'s generator: {err}"))?,
        );
    }

    if progress {
        let start = Instant::now();
        let mut last = (0u64, 0u64);
        let mut next_line = start + PROGRESS_EVERY;
        while !generators.iter().all(|g| g.is_finished()) {
            // Wake for the next line, or soon after the generators are due to stop: a
            // whole second's sleep past their end would delay the closes, and the written
            // rate with them.
            let wake = next_line.min(started + duration);
            match wake.checked_duration_since(Instant::now()) {
                Some(wait) => thread::sleep(wait),
                None => thread::sleep(GENERATOR_END_POLL),
            }
            if Instant::now() < next_line {
                continue;
            }
            next_line += PROGRESS_EVERY;
            let s = total_stats(&batchers);
            let o = offered.load(Relaxed);
            println!(
                "{:5.1} s  offered {:>9} ({:>7}/s)  accepted {:>9}  dropped {:>7}  retention_dropped {:>7}  flushed {:>9} ({:>7}/s)  flushes cap {} sched {}  batched {:>6}  in_flight {:>6}  store errors {}",
                start.elapsed().as_secs_f64(),
                o,
                o - last.0,
                s.accepted,
                s.dropped,
                s.retention_dropped,
                s.flushed,
                s.flushed - last.1,
                s.flushes.capacity,
                s.flushes.scheduled,
                s.batched,
                s.in_flight,
                s.store_errors
            );
            last = (o, s.flushed);
        }
    }
    let offers = load::join_generators(generators)?;
    // Closed together, as replicas shut down independently; each close is timed.
    let closes: Vec<(CloseReport, Duration)> = thread::scope(|scope| -> Result<_, String> {
        let closing: Vec<_> = batchers
            .iter()
            .map(|batcher| {
                scope.spawn(move || {
                    let start = Instant::now();
                    (batcher.close(), start.elapsed())
                })
            })
            .collect();
        closing
            .into_iter()
            .enumerate()
            .map(|(replica, handle)| {
                handle
                    .join()
                    .map_err(|_| format!("replica {replica}'s close() panicked"))
            })
            .collect()
    })?;
    let written_seconds = started.elapsed().as_secs_f64();

    let mut summary = Summary {
        rate,
        seconds: offers
            .iter()
            .map(|o| o.elapsed.as_secs_f64())
            .fold(0.0, f64::max),
        written_seconds,
        offered: offered.load(Relaxed),
        round_trip_ms: paths
            .and_then(|p| p.round_trip)
            .map(|(through, _)| through.as_secs_f64() * 1e3),
        ..Summary::default()
    };
    let mut add_ns = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).expect("valid bounds");
    for ((batcher, offer), (close, close_time)) in batchers.iter().zip(&offers).zip(&closes) {
        let stats = batcher.stats();
        summary.accepted += offer.accepted;
        summary.dropped += offer.dropped;
        summary.retention_dropped += stats.retention_dropped;
        summary.flushed += stats.flushed;
        summary.unmatched += stats.unmatched;
        summary.store_errors += stats.store_errors;
        summary.unwritten += close.unwritten;
        for (total, count) in summary.flushes.iter_mut().zip([
            stats.flushes.capacity,
            stats.flushes.scheduled,
            stats.flushes.manual,
            stats.flushes.shutdown,
        ]) {
            *total += count;
        }
        let _ = add_ns.add(&offer.add_ns);
        summary.replicas.push(ReplicaSummary {
            accepted: offer.accepted,
            dropped: offer.dropped,
            flushed: stats.flushed,
            store_errors: stats.store_errors,
            conflicts: conflicts(&stats),
            close: *close,
            close_seconds: close_time.as_secs_f64(),
            ..ReplicaSummary::default()
        });
    }
    summary.conflicts = summary.replicas.iter().map(|r| r.conflicts).sum();
    summary.add_p50_ns = add_ns.value_at_quantile(0.50);
    summary.add_p99_ns = add_ns.value_at_quantile(0.99);
    summary.add_max_ns = add_ns.max();
    {
        let r = lock(&recorder);
        summary.store_calls = r.calls;
        summary.mean_rows = r.rows as f64 / r.calls.max(1) as f64;
        summary.max_rows = r.max_rows;
        summary.mean_store_ms = r.store_time.as_secs_f64() * 1e3 / r.calls.max(1) as f64;
        summary.max_store_ms = r.max_store_time.as_secs_f64() * 1e3;
        summary.fresh_p50_ms = r.freshness_us.value_at_quantile(0.50) as f64 / 1e3;
        summary.fresh_p99_ms = r.freshness_us.value_at_quantile(0.99) as f64 / 1e3;
        summary.fresh_max_ms = r.freshness_us.max() as f64 / 1e3;
    }

    let keys = config.keys;
    let newest = load::newest_by_key(&offers, config.agents * keys);
    let updated: Vec<bool> = newest
        .chunks(keys)
        .map(|agent_keys| agent_keys.iter().any(|&(micros, _)| micros > 0))
        .collect();

    if !subscribers.is_empty() {
        stop_listening.store(true, Relaxed);
        let mut unheard_total = 0;
        for (replica, subscriber) in subscribers.into_iter().enumerate() {
            let heard = subscriber
                .join()
                .map_err(|_| format!("replica {replica}'s subscriber thread panicked"))?;
            let unheard = (0..config.agents)
                .filter(|&a| updated[a] && !heard.announced[a])
                .count() as u64;
            unheard_total += unheard;
            summary.replicas[replica].unheard = Some(unheard);
            summary.replicas[replica].subscriber_problems = heard.problems;
        }
        summary.announced = Some((updated.iter().filter(|&&u| u).count() as u64, unheard_total));
    }
    if let (Some(db), true) = (&database, config.verify) {
        let mut session = Reconnecting::new(
            &db.data_url,
            session_options("verify", statement_mode),
            RECONNECT_PATIENCE,
        )
        .map_err(|err| format!("--verify: {err}"))?;
        summary.verified_rows = Some(load::verify(&mut session, &key_names, &newest)?);
    }
    drop(batchers);
    if let Some(db) = &mut database {
        db.end_sessions()?;
        if let Some(before) = deadlocks_before {
            summary.deadlocks = Some(db.deadlocks()? - before);
        }
    }
    drop(database);
    summary.peak_rss_kib = peak_rss_kib();
    Ok(summary)
}

/// Stats summed over the replicas, for the progress line.
fn total_stats(batchers: &[Arc<Batcher>]) -> Stats {
    let mut total = Stats::default();
    for stats in batchers.iter().map(|batcher| batcher.stats()) {
        total.accepted += stats.accepted;
        total.dropped += stats.dropped;
        total.retention_dropped += stats.retention_dropped;
        total.flushed += stats.flushed;
        total.flushes.capacity += stats.flushes.capacity;
        total.flushes.scheduled += stats.flushes.scheduled;
        total.batched += stats.batched;
        total.in_flight += stats.in_flight;
        total.store_errors += stats.store_errors;
    }
    total
}

fn mode_name(mode: FlushMode) -> &'static str {
    match mode {
        FlushMode::Pipelined => "pipelined",
        FlushMode::Inline => "inline",
        _ => "another mode",
    }
}

fn store_name(store: &StoreKind) -> String {
    match store {
        StoreKind::Memory => "memory".into(),
        StoreKind::Sim(l) => format!("sim:{}", l.as_secs_f64() * 1e3),
        StoreKind::Postgres => "postgres".into(),
    }
}

fn or_na<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "na".to_owned(), |v| v.to_string())
}

fn print_summary(config: &Config, s: &Summary) {
    println!(
        "--- summary ({} s, store {}, mode {}, batch {}, max_pending {}, agents {} × keys {}, replicas {})",
        s.seconds.round(),
        store_name(&config.store),
        mode_name(config.mode),
        config.batch_size,
        config
            .max_pending
            .map_or("default".into(), |m| m.to_string()),
        config.agents,
        config.keys,
        config.replicas
    );
    println!(
        "offered            {} ({:.0}/s; asked {:.0}/s{})",
        s.offered,
        s.offered_rate(),
        s.rate * config.replicas as f64,
        if config.replicas > 1 {
            format!(" = {} replicas × {:.0}/s", config.replicas, s.rate)
        } else {
            String::new()
        }
    );
    println!("accepted           {}", s.accepted);
    println!("dropped            {} (channel full at add)", s.dropped);
    println!(
        "retention_dropped  {} (backlog at max_pending or max_pending_bytes)",
        s.retention_dropped
    );
    println!(
        "flushed            {} (unmatched {}, store errors {}, conflicts {})",
        s.flushed,
        s.unmatched,
        s.store_errors,
        or_na(s.conflicts)
    );
    println!(
        "written            {:.0} rows/s ({} rows from the first add until the last close returned, {:.2} s)",
        s.written_rate(),
        s.flushed,
        s.written_seconds
    );
    println!(
        "flushes            capacity {} scheduled {} manual {} shutdown {}",
        s.flushes[0], s.flushes[1], s.flushes[2], s.flushes[3]
    );
    println!("rows per flush     mean {:.0} max {} (store calls {}, store time mean {:.2} ms max {:.2} ms)",
        s.mean_rows, s.max_rows, s.store_calls, s.mean_store_ms, s.max_store_ms);
    println!("freshness          p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms (add -> store call returned, per written row)",
        s.fresh_p50_ms, s.fresh_p99_ms, s.fresh_max_ms);
    println!(
        "add call           p50 {:.2} µs  p99 {:.2} µs  max {:.1} µs (one call of {} keys, waking the worker included)",
        s.add_p50_ns as f64 / 1e3,
        s.add_p99_ns as f64 / 1e3,
        s.add_max_ns as f64 / 1e3,
        config.keys
    );
    if let Some(deadlocks) = s.deadlocks {
        println!("deadlocks          {deadlocks} (pg_stat_database, this run's database)");
    }
    println!(
        "unwritten at close {} ({})",
        s.unwritten,
        s.replicas
            .iter()
            .map(|r| format!(
                "{} in {:.2} s{}",
                r.close.unwritten,
                r.close_seconds,
                if r.close.deadline_hit {
                    ", deadline hit"
                } else {
                    ""
                }
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    if config.replicas > 1 {
        for (i, r) in s.replicas.iter().enumerate() {
            println!(
                "replica {i}          accepted {} dropped {} flushed {} store errors {} conflicts {} unwritten {}{}",
                r.accepted,
                r.dropped,
                r.flushed,
                r.store_errors,
                or_na(r.conflicts),
                r.close.unwritten,
                r.unheard.map_or(String::new(), |unheard| format!(
                    " never heard {unheard} (subscriber problems {})",
                    r.subscriber_problems
                ))
            );
        }
    }
    if let Some((checked, wrong)) = s.verified_rows {
        println!("verified rows      {checked} checked, {wrong} not at the newest value any replica offered");
    }
    if let Some((updated, unheard)) = s.announced {
        println!(
            "announced agents   {updated} updated, {unheard} never heard ({} subscribers; summed)",
            s.replicas.len()
        );
    }
    println!(
        "peak RSS           {:.1} MiB (VmHWM)",
        s.peak_rss_kib as f64 / 1024.0
    );
    println!(
        "RESULT store={} mode={} rate={:.0} offered_rate={:.0} offered={} accepted={} dropped={} retention_dropped={} flushed={} capacity={} scheduled={} shutdown={} mean_rows={:.0} max_rows={} mean_store_ms={:.2} p50_ms={:.1} p99_ms={:.1} max_ms={:.1} rss_mib={:.1}{}{} replicas={} rows_per_s={:.0} store_errors={} conflicts={} deadlocks={} unwritten={}{}",
        store_name(&config.store), mode_name(config.mode), s.rate, s.offered_rate(), s.offered, s.accepted,
        s.dropped, s.retention_dropped, s.flushed, s.flushes[0], s.flushes[1], s.flushes[3],
        s.mean_rows, s.max_rows, s.mean_store_ms, s.fresh_p50_ms, s.fresh_p99_ms, s.fresh_max_ms,
        s.peak_rss_kib as f64 / 1024.0,
        s.verified_rows.map_or(String::new(), |(c, w)| format!(" verified={c} wrong={w}")),
        s.announced.map_or(String::new(), |(u, m)| format!(" announced_agents={u} unannounced={m}")),
        config.replicas, s.written_rate(), s.store_errors, or_na(s.conflicts), or_na(s.deadlocks), s.unwritten,
        s.round_trip_ms.map_or(String::new(), |ms| format!(" rtt_ms={ms:.2}")),
    );
}

/// Bisects (geometrically) for the highest rate whose trial has zero drops of either kind
/// and at which the generator offered what was asked.
fn find_ceiling(config: &Config, paths: Option<&Paths>) -> Result<(), String> {
    let trial = |rate: f64| -> Result<(bool, Summary), String> {
        let s = run(config, paths, rate, config.trial, false)?;
        let asked = rate * config.replicas as f64;
        let pass = s.zero_drops() && s.offered_rate() >= OFFERED_SHARE_REQUIRED * asked;
        println!(
            "trial rate {:>8.0}/s: offered {:>8.0}/s dropped {:>7} retention_dropped {:>7} mean rows/flush {:>6.0} max {:>6} p99 {:>7.1} ms -> {}",
            rate, s.offered_rate(), s.dropped, s.retention_dropped, s.mean_rows, s.max_rows,
            s.fresh_p99_ms, if pass { "zero drops" } else { "drops" }
        );
        Ok((pass, s))
    };
    let (mut good, mut bad) = (config.lo, config.hi);
    let (hi_pass, _) = trial(config.hi)?;
    let ceiling = if hi_pass {
        format!(">={:.0}", config.hi)
    } else {
        let (lo_pass, _) = trial(config.lo)?;
        if !lo_pass {
            format!("<{:.0}", config.lo)
        } else {
            for _ in 0..config.steps {
                let mid = (good * bad).sqrt();
                if trial(mid)?.0 {
                    good = mid;
                } else {
                    bad = mid;
                }
            }
            format!("{good:.0}")
        }
    };
    println!(
        "CEILING store={} mode={} batch={} max_pending={} ceiling={} first_failing={} peak_rss_mib={:.1}",
        store_name(&config.store),
        mode_name(config.mode),
        config.batch_size,
        config.max_pending.map_or("default".into(), |m| m.to_string()),
        ceiling,
        if hi_pass {
            "none".to_owned()
        } else {
            format!("{bad:.0}")
        },
        peak_rss_kib() as f64 / 1024.0
    );
    Ok(())
}

/// `--server-limit`: what the server takes on this path from `sessions` sessions sending
/// the crate's own statement back to back, with no batcher in between.
fn server_limit(config: &Config, paths: &Paths, sessions: usize) -> Result<(), String> {
    let key_names: Vec<String> = (0..config.keys).map(|k| format!("key{k}")).collect();
    let database = Database::create(paths, config.agents, &key_names)?;
    let clock = Clock::default();
    let started = Instant::now();
    let results: Vec<Result<(u64, u64), String>> = thread::scope(|scope| {
        let workers: Vec<_> = (0..sessions)
            .map(|session| {
                let (data_url, clock, key_names) = (&database.data_url, &clock, &key_names);
                scope.spawn(move || {
                    let options =
                        session_options(&format!("limit {session}"), paths.statement_mode);
                    let mut client = pg::connect_client(data_url, &options)
                        .map_err(|err| format!("session {session}: {err}"))?;
                    let prepared = match paths.statement_mode {
                        StatementMode::Unnamed => None,
                        _ => Some(
                            client
                                .prepare_typed(pg::BATCH_UPDATE_SQL, &BATCH_UPDATE_TYPES)
                                .map_err(|err| format!("preparing: {}", db_error(&err)))?,
                        ),
                    };
                    let (mut rows, mut statements) = (0u64, 0u64);
                    // Each session its own stretch of the fleet, so the sessions measure
                    // the server's pace, not waits for each other's row locks.
                    let mut next = session * config.agents / sessions;
                    while started.elapsed() < config.duration {
                        let mut batch = MetadataBatch::with_capacity(config.batch_size);
                        while batch.len() < config.batch_size {
                            let (agent_index, key) = (next / config.keys, next % config.keys);
                            next = (next + 1) % (config.agents * config.keys);
                            let at = micros_to_time(clock.next_micros());
                            let metadata = Metadata::new(key_names[key].clone(), "v", "", at);
                            batch.push(agent(agent_index % config.agents), metadata);
                        }
                        let params: [&(dyn ToSql + Sync); 5] = [
                            &batch.agent_ids,
                            &batch.keys,
                            &batch.values,
                            &batch.errors,
                            &batch.collected_at,
                        ];
                        let updated = match &prepared {
                            Some(statement) => client.execute(statement, &params),
                            None => {
                                let typed: Vec<(&(dyn ToSql + Sync), Type)> = params
                                    .iter()
                                    .zip(BATCH_UPDATE_TYPES.iter())
                                    .map(|(param, ty)| (*param, ty.clone()))
                                    .collect();
                                client.execute_typed(pg::BATCH_UPDATE_SQL, &typed)
                            }
                        }
                        .map_err(|err| format!("session {session}: {}", db_error(&err)))?;
                        rows += updated;
                        statements += 1;
                    }
                    Ok((rows, statements))
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| {
                worker
                    .join()
                    .unwrap_or_else(|_| Err("a session panicked".into()))
            })
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let (mut rows, mut statements) = (0, 0);
    for result in results {
        let (r, s) = result?;
        rows += r;
        statements += s;
    }
    let statement_ms = elapsed * 1e3 * sessions as f64 / statements.max(1) as f64;
    println!(
        "SERVER_LIMIT sessions={sessions} batch={} rows_per_s={:.0} statement_ms={statement_ms:.2} rtt_ms={}",
        config.batch_size,
        rows as f64 / elapsed,
        or_na(paths.round_trip.map(|(through, _)| format!("{:.2}", through.as_secs_f64() * 1e3)))
    );
    Ok(())
}

/// The parameter types of `BATCH_UPDATE_SQL`, in order.
const BATCH_UPDATE_TYPES: [Type; 5] = [
    Type::UUID_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::TIMESTAMPTZ_ARRAY,
];

fn main() -> ExitCode {
    let config = match parse_args() {
        Ok(config) => config,
        Err(message) => {
            eprintln!("loadgen: {message}");
            return ExitCode::from(2);
        }
    };
    let paths = match config.store {
        StoreKind::Postgres => match Paths::set_up(&config) {
            Ok(paths) => Some(paths),
            Err(message) => {
                eprintln!("loadgen: {message}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let result = if let (Some(sessions), Some(paths)) = (config.server_limit, paths.as_ref()) {
        server_limit(&config, paths, sessions).map(|()| Vec::new())
    } else if config.find_ceiling {
        find_ceiling(&config, paths.as_ref()).map(|()| Vec::new())
    } else {
        run(
            &config,
            paths.as_ref(),
            config.rate,
            config.duration,
            !config.quiet,
        )
        .map(|s| {
            print_summary(&config, &s);
            s.failed_checks()
        })
    };
    match result {
        Ok(failed) if failed.is_empty() => ExitCode::SUCCESS,
        Ok(failed) => {
            eprintln!("loadgen: FAILED: {}", failed.join("; "));
            ExitCode::FAILURE
        }
        Err(message) => {
            eprintln!("loadgen: {message}");
            ExitCode::FAILURE
        }
    }
}
