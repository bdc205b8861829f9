//! Load generator: offers a steady rate of metadata updates to a batcher and reports what
//! became of them (targets 4, 5 and 6 of docs/performance.md).
//!
//! ```text
//! cargo run --release --example loadgen -- [flags]
//!   --agents N            agents (default 10000)
//!   --keys N              keys per agent; one `add` call carries all of an agent's keys (10)
//!   --rate R              offered updates per second (100000); agents are visited
//!                         round-robin, so at R = agents × keys every key is updated once a second
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
//!   --subscribe           postgres only: LISTEN and check every updated agent is announced
//!   --verify              postgres only: SELECT every row at the end and check its value
//!   --quiet               no progress line each second
//!   --find-ceiling        search the highest offered rate with zero drops instead:
//!     --lo R --hi R         search range (defaults 5000 and 200000)
//!     --steps N             bisection steps after the bounds (6)
//!     --trial S             seconds per trial (3)
//! ```
//!
//! Freshness is measured per committed row: every update carries `collected_at` = the
//! wall-clock instant just before its `add`, and the store wrapper, right after the store's
//! `batch_update` returned (for PostgreSQL: the statement committed), records
//! `now - collected_at` for each row it wrote. An update that a newer one replaced in the
//! batch is never written, so it has no sample of its own; its key's newer value has.
//! A summary ends with a line `RESULT key=value ...` for scripts.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;
use metadata_batcher::postgres::{self as pg, PgPublisher, PgStore, PgSubscriber, SubscriberEvent};
use metadata_batcher::{
    Batcher, FlushMode, Interrupt, Metadata, MetadataBatch, PublishError, Publisher, Store,
    StoreError, METADATA_BATCH_CHANNEL,
};
use uuid::Uuid;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// The simulated store's cost per row, as PostgreSQL's batched update costs here.
const SIM_PER_ROW: Duration = Duration::from_micros(5);
/// A trial passes only if the generator offered at least this share of the asked rate.
const OFFERED_SHARE_REQUIRED: f64 = 0.97;

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
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        let number = |text: String| -> Result<f64, String> {
            text.parse::<f64>()
                .map_err(|_| format!("{flag}: {text:?} is not a number"))
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
            "--help" | "-h" => return Err("see the flags at the top of examples/loadgen.rs".into()),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if (config.subscribe || config.verify) && !matches!(config.store, StoreKind::Postgres) {
        return Err("--subscribe and --verify need --store postgres".into());
    }
    Ok(config)
}

/// Agent `i` of the fleet, and back.
fn agent(i: usize) -> Uuid {
    Uuid::from_u128(0x6c67_0000_0000_0000_0000_0000_0000_0000 | (i as u128 + 1))
}
fn agent_index(id: Uuid) -> Option<usize> {
    let n = id.as_u128();
    (n >> 112 == 0x6c67).then(|| (n & 0xffff_ffff) as usize - 1)
}

/// What the store wrapper saw: one entry per successful store call.
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

/// Wraps the real store: times each call and, right after it returned, records each
/// written row's freshness (commit instant − `collected_at`, which is the add instant).
struct Timed<S> {
    inner: S,
    recorder: Arc<Mutex<Recorder>>,
}

impl<S: Store> Store for Timed<S> {
    fn batch_update(&mut self, batch: &MetadataBatch) -> Result<u64, StoreError> {
        let start = Instant::now();
        let result = self.inner.batch_update(batch);
        let committed = SystemTime::now();
        let elapsed = start.elapsed();
        if result.is_ok() {
            let mut r = self.recorder.lock().unwrap();
            for &collected_at in &batch.collected_at {
                let age = committed.duration_since(collected_at).unwrap_or_default();
                r.freshness_us
                    .saturating_record(age.as_micros().max(1) as u64);
            }
            r.calls += 1;
            r.rows += batch.len() as u64;
            r.max_rows = r.max_rows.max(batch.len());
            r.store_time += elapsed;
            r.max_store_time = r.max_store_time.max(elapsed);
        }
        result
    }

    fn interrupt_handle(&mut self) -> Option<Interrupt> {
        self.inner.interrupt_handle()
    }
}

/// A store that costs `latency + 5 µs × rows` (a sleep) and writes nothing.
struct SimStore {
    latency: Duration,
}

impl Store for SimStore {
    fn batch_update(&mut self, batch: &MetadataBatch) -> Result<u64, StoreError> {
        thread::sleep(self.latency + SIM_PER_ROW * batch.len() as u32);
        Ok(batch.len() as u64)
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

/// The database a postgres run works in, dropped at the end.
struct Database {
    admin: postgres::Client,
    name: String,
    url: String,
}

impl Database {
    fn create(agents: usize, keys: &[String]) -> Result<Database, String> {
        let admin_url = std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.into());
        let mut admin = postgres::Client::connect(&admin_url, postgres::NoTls)
            .map_err(|e| format!("cannot connect to {admin_url} (set DATABASE_URL): {e}"))?;
        let name = format!("mb_loadgen_{}", std::process::id());
        for sql in [
            format!("DROP DATABASE IF EXISTS {name}"),
            format!("CREATE DATABASE {name}"),
        ] {
            admin.batch_execute(&sql).map_err(|e| e.to_string())?;
        }
        let url = with_database(&admin_url, &name);
        let mut client =
            postgres::Client::connect(&url, postgres::NoTls).map_err(|e| e.to_string())?;
        pg::migrate(&mut client).map_err(|e| e.to_string())?;
        let ids: Vec<Uuid> = (0..agents).map(agent).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        pg::register_keys_for_agents(&mut client, &ids, &keys).map_err(|e| e.to_string())?;
        client
            .batch_execute("VACUUM ANALYZE workspace_agent_metadata")
            .map_err(|e| e.to_string())?;
        Ok(Database { admin, name, url })
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let _ = self.admin.batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    format!("{}/{database}{query}", &base[..host_end])
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

/// What one run came to.
#[derive(Debug, Default)]
struct Summary {
    rate: f64,
    seconds: f64,
    offered: u64,
    accepted: u64,
    dropped: u64,
    retention_dropped: u64,
    flushed: u64,
    unmatched: u64,
    store_errors: u64,
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
    announced: Option<(u64, u64)>,
}

impl Summary {
    fn zero_drops(&self) -> bool {
        self.dropped == 0 && self.retention_dropped == 0
    }

    fn offered_rate(&self) -> f64 {
        self.offered as f64 / self.seconds
    }
}

fn run(config: &Config, rate: f64, duration: Duration, progress: bool) -> Result<Summary, String> {
    let key_names: Vec<String> = (0..config.keys).map(|k| format!("key{k}")).collect();
    let recorder = Arc::new(Mutex::new(Recorder::new()));
    let published = Arc::new(AtomicU64::new(0));
    let database = match config.store {
        StoreKind::Postgres => Some(Database::create(config.agents, &key_names)?),
        _ => None,
    };
    let mut builder = match (&config.store, &database) {
        (StoreKind::Memory, _) => {
            let store = metadata_batcher::MemoryStore::new();
            for a in 0..config.agents {
                store.register(agent(a), key_names.iter().cloned());
            }
            Batcher::builder(
                Timed {
                    inner: store,
                    recorder: recorder.clone(),
                },
                CountingPublisher(published.clone()),
            )
        }
        (StoreKind::Sim(latency), _) => Batcher::builder(
            Timed {
                inner: SimStore { latency: *latency },
                recorder: recorder.clone(),
            },
            CountingPublisher(published.clone()),
        ),
        (StoreKind::Postgres, Some(db)) => Batcher::builder(
            Timed {
                inner: PgStore::connect(&db.url).map_err(|e| e.to_string())?,
                recorder: recorder.clone(),
            },
            PgPublisher::connect(&db.url).map_err(|e| e.to_string())?,
        ),
        (StoreKind::Postgres, None) => unreachable!("created above"),
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
    let batcher = Arc::new(builder.build().map_err(|e| e.to_string())?);

    // The LISTEN side: which agents were announced.
    let stop_listening = Arc::new(AtomicBool::new(false));
    let subscriber = match (&database, config.subscribe) {
        (Some(db), true) => {
            let mut subscriber =
                PgSubscriber::listen(&db.url, METADATA_BATCH_CHANNEL).map_err(|e| e.to_string())?;
            let stop = stop_listening.clone();
            let agents = config.agents;
            Some(thread::spawn(move || {
                let mut announced = vec![false; agents];
                let mut quiet_since = None;
                loop {
                    match subscriber.next(Duration::from_millis(100)) {
                        Ok(Some(SubscriberEvent::Agents(ids))) => {
                            quiet_since = None;
                            for id in ids {
                                if let Some(i) = agent_index(id).filter(|&i| i < agents) {
                                    announced[i] = true;
                                }
                            }
                        }
                        Ok(Some(SubscriberEvent::Reconnected)) => {
                            eprintln!("subscriber reconnected: announcements may be missing")
                        }
                        Ok(None) | Err(_) => {
                            // After the run, stop once nothing arrived for a second.
                            if stop.load(Relaxed) {
                                let since = *quiet_since.get_or_insert_with(Instant::now);
                                if since.elapsed() > Duration::from_secs(1) {
                                    return announced;
                                }
                            }
                        }
                    }
                }
            }))
        }
        _ => None,
    };

    // The generator: one thread, round-robin over the agents, paced to `rate`.
    let offered = Arc::new(AtomicU64::new(0));
    let generator = {
        let batcher = batcher.clone();
        let offered = offered.clone();
        let (agents, keys) = (config.agents, config.keys);
        let key_names = key_names.clone();
        thread::spawn(move || {
            // Per agent, the round its accepted keys last carried (u32::MAX: never).
            let mut last_round = vec![u32::MAX; agents * keys];
            let (mut accepted, mut dropped) = (0u64, 0u64);
            // How long each `add` call takes, waking the worker included (two clock reads
            // of ~20 ns each are in it too).
            let mut add_ns =
                Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).expect("valid bounds");
            let calls_per_second = rate / keys as f64;
            let start = Instant::now();
            let mut issued = 0u64;
            loop {
                let elapsed = start.elapsed();
                if elapsed >= duration {
                    break;
                }
                let due = (elapsed.as_secs_f64() * calls_per_second) as u64;
                while issued < due {
                    let a = (issued % agents as u64) as usize;
                    let round = (issued / agents as u64) as u32;
                    let value = round.to_string();
                    let now = SystemTime::now();
                    let metadata: Vec<Metadata> = key_names
                        .iter()
                        .map(|key| Metadata {
                            key: key.clone(),
                            value: value.clone(),
                            error: String::new(),
                            collected_at: now,
                        })
                        .collect();
                    let called = Instant::now();
                    let added = batcher.add(agent(a), metadata);
                    add_ns.saturating_record(called.elapsed().as_nanos() as u64);
                    match added {
                        Ok(report) => {
                            accepted += report.accepted as u64;
                            dropped += report.dropped as u64;
                            // The call's first `accepted` entries are the kept ones.
                            for slot in &mut last_round[a * keys..a * keys + report.accepted] {
                                *slot = round;
                            }
                        }
                        Err(error) => panic!("add failed: {error}"),
                    }
                    issued += 1;
                    offered.fetch_add(keys as u64, Relaxed);
                }
                thread::sleep(Duration::from_micros(500));
            }
            (accepted, dropped, last_round, start.elapsed(), add_ns)
        })
    };

    if progress {
        let start = Instant::now();
        let mut last = (0u64, 0u64);
        while !generator.is_finished() {
            thread::sleep(Duration::from_secs(1).min(duration));
            let s = batcher.stats();
            let o = offered.load(Relaxed);
            println!(
                "{:5.1} s  offered {:>9} ({:>7}/s)  accepted {:>9}  dropped {:>7}  retention_dropped {:>7}  flushed {:>9} ({:>7}/s)  flushes cap {} sched {}  batched {:>6}  in_flight {:>6}",
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
                s.in_flight
            );
            last = (o, s.flushed);
        }
    }
    let (accepted, dropped, last_round, elapsed, add_ns) = generator.join().expect("generator");
    batcher.close();
    let stats = batcher.stats();

    let mut summary = Summary {
        rate,
        seconds: elapsed.as_secs_f64(),
        offered: offered.load(Relaxed),
        accepted,
        dropped,
        retention_dropped: stats.retention_dropped,
        flushed: stats.flushed,
        unmatched: stats.unmatched,
        store_errors: stats.store_errors,
        flushes: [
            stats.flushes.capacity,
            stats.flushes.scheduled,
            stats.flushes.manual,
            stats.flushes.shutdown,
        ],
        add_p50_ns: add_ns.value_at_quantile(0.50),
        add_p99_ns: add_ns.value_at_quantile(0.99),
        add_max_ns: add_ns.max(),
        ..Summary::default()
    };
    {
        let r = recorder.lock().unwrap();
        summary.store_calls = r.calls;
        summary.mean_rows = r.rows as f64 / r.calls.max(1) as f64;
        summary.max_rows = r.max_rows;
        summary.mean_store_ms = r.store_time.as_secs_f64() * 1e3 / r.calls.max(1) as f64;
        summary.max_store_ms = r.max_store_time.as_secs_f64() * 1e3;
        summary.fresh_p50_ms = r.freshness_us.value_at_quantile(0.50) as f64 / 1e3;
        summary.fresh_p99_ms = r.freshness_us.value_at_quantile(0.99) as f64 / 1e3;
        summary.fresh_max_ms = r.freshness_us.max() as f64 / 1e3;
    }

    if let Some(subscriber) = subscriber {
        stop_listening.store(true, Relaxed);
        let announced = subscriber.join().expect("subscriber");
        let updated: Vec<bool> = (0..config.agents)
            .map(|a| {
                last_round[a * config.keys..(a + 1) * config.keys]
                    .iter()
                    .any(|&r| r != u32::MAX)
            })
            .collect();
        let missing = (0..config.agents)
            .filter(|&a| updated[a] && !announced[a])
            .count();
        summary.announced = Some((
            updated.iter().filter(|&&u| u).count() as u64,
            missing as u64,
        ));
    }
    if let (Some(db), true) = (&database, config.verify) {
        let mut client =
            postgres::Client::connect(&db.url, postgres::NoTls).map_err(|e| e.to_string())?;
        let key_index: HashMap<&str, usize> = key_names
            .iter()
            .enumerate()
            .map(|(i, k)| (k.as_str(), i))
            .collect();
        let (mut checked, mut wrong) = (0u64, 0u64);
        for row in client
            .query(
                "SELECT workspace_agent_id, key, value FROM workspace_agent_metadata",
                &[],
            )
            .map_err(|e| e.to_string())?
        {
            let (id, key, value): (Uuid, String, String) = (row.get(0), row.get(1), row.get(2));
            let (Some(a), Some(&k)) = (agent_index(id), key_index.get(key.as_str())) else {
                continue;
            };
            let expected = last_round[a * config.keys + k];
            let expected = if expected == u32::MAX {
                String::new()
            } else {
                expected.to_string()
            };
            checked += 1;
            if value != expected {
                wrong += 1;
            }
        }
        summary.verified_rows = Some((checked, wrong));
    }
    drop(batcher);
    drop(database);
    summary.peak_rss_kib = peak_rss_kib();
    Ok(summary)
}

fn mode_name(mode: FlushMode) -> &'static str {
    match mode {
        FlushMode::Pipelined => "pipelined",
        FlushMode::Inline => "inline",
    }
}

fn store_name(store: &StoreKind) -> String {
    match store {
        StoreKind::Memory => "memory".into(),
        StoreKind::Sim(l) => format!("sim:{}", l.as_secs_f64() * 1e3),
        StoreKind::Postgres => "postgres".into(),
    }
}

fn print_summary(config: &Config, s: &Summary) {
    println!(
        "--- summary ({} s, store {}, mode {}, batch {}, max_pending {}, agents {} × keys {})",
        s.seconds.round(),
        store_name(&config.store),
        mode_name(config.mode),
        config.batch_size,
        config
            .max_pending
            .map_or("default".into(), |m| m.to_string()),
        config.agents,
        config.keys
    );
    println!(
        "offered            {} ({:.0}/s; asked {:.0}/s)",
        s.offered,
        s.offered_rate(),
        s.rate
    );
    println!("accepted           {}", s.accepted);
    println!("dropped            {} (channel full at add)", s.dropped);
    println!(
        "retention_dropped  {} (backlog at max_pending or max_pending_bytes)",
        s.retention_dropped
    );
    println!(
        "flushed            {} (unmatched {}, store errors {})",
        s.flushed, s.unmatched, s.store_errors
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
    if let Some((checked, wrong)) = s.verified_rows {
        println!("verified rows      {checked} checked, {wrong} not at their newest value");
    }
    if let Some((updated, missing)) = s.announced {
        println!("announced agents   {updated} updated, {missing} never announced");
    }
    println!(
        "peak RSS           {:.1} MiB (VmHWM)",
        s.peak_rss_kib as f64 / 1024.0
    );
    println!(
        "RESULT store={} mode={} rate={:.0} offered_rate={:.0} offered={} accepted={} dropped={} retention_dropped={} flushed={} capacity={} scheduled={} shutdown={} mean_rows={:.0} max_rows={} mean_store_ms={:.2} p50_ms={:.1} p99_ms={:.1} max_ms={:.1} rss_mib={:.1}{}{}",
        store_name(&config.store), mode_name(config.mode), s.rate, s.offered_rate(), s.offered, s.accepted,
        s.dropped, s.retention_dropped, s.flushed, s.flushes[0], s.flushes[1], s.flushes[3],
        s.mean_rows, s.max_rows, s.mean_store_ms, s.fresh_p50_ms, s.fresh_p99_ms, s.fresh_max_ms,
        s.peak_rss_kib as f64 / 1024.0,
        s.verified_rows.map_or(String::new(), |(c, w)| format!(" verified={c} wrong={w}")),
        s.announced.map_or(String::new(), |(u, m)| format!(" announced_agents={u} unannounced={m}")),
    );
}

/// Bisects (geometrically) for the highest rate whose trial has zero drops of either kind
/// and at which the generator offered what was asked.
fn find_ceiling(config: &Config) -> Result<(), String> {
    let trial = |rate: f64| -> Result<(bool, Summary), String> {
        let s = run(config, rate, config.trial, false)?;
        let pass = s.zero_drops() && s.offered_rate() >= OFFERED_SHARE_REQUIRED * rate;
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

fn main() -> ExitCode {
    let config = match parse_args() {
        Ok(config) => config,
        Err(message) => {
            eprintln!("loadgen: {message}");
            return ExitCode::from(2);
        }
    };
    let result = if config.find_ceiling {
        find_ceiling(&config)
    } else {
        run(&config, config.rate, config.duration, !config.quiet)
            .map(|s| print_summary(&config, &s))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("loadgen: {message}");
            ExitCode::FAILURE
        }
    }
}
