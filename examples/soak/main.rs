//! The soak: a fleet of batchers under a steady load for a long time, while a seeded
//! schedule of faults hits the real parts under it, one after another; then a report of
//! what each fault cost and whether the goals of issue 22 held.
//!
//! ```text
//! cargo run --release --example soak -- [flags]      (scripts/soak runs the long profile)
//!   --duration S      seconds of load (3600)
//!   --rate R          updates per second offered in all, shared by the replicas (50000)
//!   --replicas N      batchers, each with its own store, publisher and subscriber (2)
//!   --agents N        agents (10000); --keys N keys per agent (10)
//!   --every S         seconds from one fault's start to the next's (30)
//!   --faults LIST     comma-separated kinds, or all (all): crash-restart, fast-restart,
//!                     terminate, terminate-subscribers, failover, black-hole, latency,
//!                     lock, read-only, freeze, pooler-restart (with --pooler); faults.rs
//!                     says what each does
//!   --seed N          the schedule's seed (default: from the clock; printed)
//!   --warmup S        seconds of load before the first fault: the resource baseline (20)
//!   --quiet-end S     seconds without a fault at the end, so the last checks see every
//!                     agent announced again (20)
//!   --min-per-kind N  a kind injected fewer times is a violation (0)
//!   --retry-max S     the batchers' longest pause between retries (Builder::retry_backoff;
//!                     default the library's, 5 s): a fault that fails calls fast can cost
//!                     up to this much past its end
//!   --pooler          the fleet's stores and publishers through a pgbouncer in transaction
//!                     mode in front of each server (the subscribers straight to the servers)
//!   --checkpoint-every N
//!                     after every N faults, a quiet checkpoint: the load stops, the
//!                     batchers write all they accepted, every row is read back and must
//!                     hold its newest value, the load starts again (0: none; the default)
//!   --samples PATH    the resource samples (one a second) written to PATH as CSV, as
//!                     they are taken
//! ```
//!
//! It starts its own parts ([`parts`]): a throwaway primary with a synchronous streaming
//! standby, optionally a pgbouncer in front of each, and the proxies in front of them (the
//! network faults), in a process of their own ([`proxies`]); every session the fleet opens
//! goes through the proxies, on a URL that lists both servers with
//! `target_session_attrs=read-write`. Stopped when the soak ends, also on a panic.
//!
//! The load is loadgen's ([`load`]): each replica visits every agent in an order of its
//! own, paced to its share of the rate, with `collected_at` strictly increasing across the
//! replicas, so at the end every row must hold the newest update any replica's batcher
//! accepted. Per fault the report gives its kind, start, duration, the write outage it
//! caused, the peak backlog and what each subscriber did; per kind the count and outage
//! p50 / max; overall the rows/s, freshness outside and inside fault windows, store errors,
//! conflicts, panics, the resource curves' slopes after the warm-up, the verification, the
//! close reports, and a `RESULT key=value ...` line. [`report`] holds the goals.
//!
//! Exit status: 0 when every goal held, 1 on any violation (each printed as a `VIOLATION`
//! line) or when the run could not be set up, 2 on bad flags.
//!
//! Not part of the published crate (it runs on the test harness in `tests/pg`).

#[path = "../support/load.rs"]
mod load;
#[path = "../../tests/pg/mod.rs"]
mod pg;
#[path = "../support/reconnecting.rs"]
mod reconnecting;

mod config;
mod faults;
mod fleet;
mod parts;
mod proxies;
mod report;
mod resources;
mod schedule;
mod slopes;
mod workload;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use metadata_batcher::postgres::{PgOptions, PgPublisher, PgStore, PgSubscriber, StatementMode};
use metadata_batcher::{
    Batcher, Metadata, Observe, DEFAULT_RETRY_BACKOFF_INITIAL, METADATA_BATCH_CHANNEL,
};
use signal_hook::consts::{SIGINT, SIGTERM};

use config::Config;
use fleet::{lock, Listener, Observed, Watched};
use parts::Parts;
use reconnecting::Reconnecting;
use schedule::Schedule;
use workload::Workload;

/// The longest a fault may take to inject (a failover with its rejoin included); no fault
/// starts later than this before the quiet end.
const LONGEST_FAULT: Duration = Duration::from_secs(15);
/// How often the wait for the next fault looks for an interrupt.
const INTERRUPT_POLL: Duration = Duration::from_millis(200);
/// Priming adds this many agents' keys between waits for the worker to take them in, so
/// the channel (5 × the batch size, in keys) never overflows.
const PRIME_AGENTS_PER_SYNC: usize = 200;
/// How long the verification's session keeps reconnecting.
const VERIFY_PATIENCE: Duration = Duration::from_secs(60);
/// The fleet's connection bound: the URL lists two servers, and a frozen one costs this
/// much before the other is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Options of replica `replica`'s session `role`, named so faults can pick them; through
/// a transaction pooler, statements unnamed (`StatementMode::Unnamed`).
fn options(replica: usize, role: &str, pooled: bool) -> PgOptions {
    PgOptions::new()
        .application_name(format!("{}{replica} {role}", faults::SESSION_PREFIX))
        .connect_timeout(CONNECT_TIMEOUT)
        .statement_mode(match pooled {
            true => StatementMode::Unnamed,
            false => StatementMode::Prepared,
        })
}

/// Brings each replica to its steady state before the warm-up measures it: one update of
/// every key at once and a flush, a backlog of many statements, so each store opens the
/// sessions it runs statements on at once (`PgOptions::parallel_statements`) now rather
/// than at the first fault. The generators overwrite every key later (with later
/// `collected_at`), so the check at the end is not affected.
fn prime(
    batchers: &[Arc<Batcher>],
    clock: &load::Clock,
    agents: usize,
    key_names: &[String],
) -> Result<(), String> {
    for (replica, batcher) in batchers.iter().enumerate() {
        for agent in 0..agents {
            let micros = clock.next_micros();
            let metadata = key_names
                .iter()
                .map(|key| {
                    Metadata::new(
                        key.clone(),
                        load::value_of(micros, replica),
                        "",
                        load::micros_to_time(micros),
                    )
                })
                .collect();
            batcher
                .add(load::agent(agent), metadata)
                .map_err(|err| format!("priming replica {replica}: {err}"))?;
            if agent % PRIME_AGENTS_PER_SYNC == PRIME_AGENTS_PER_SYNC - 1 {
                batcher.sync();
            }
        }
        batcher.flush();
    }
    Ok(())
}

fn run(config: &Config) -> Result<Vec<String>, String> {
    // SIGINT or SIGTERM ends the run early, through the same end as a full one: the load
    // stops, the fleet closes, the checks and the report run, and the parts are stopped.
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register(signal, interrupted.clone())
            .map_err(|err| format!("handling signal {signal}: {err}"))?;
    }
    let key_names: Vec<String> = (0..config.keys).map(|k| format!("key{k}")).collect();
    // Each replica: a store (up to its parallel statements), a publisher, a subscriber.
    let sessions = 10 * config.replicas as u32 + 10;
    let mut parts = Parts::start(sessions, config.agents, &key_names, config.pooler)?;
    let (url, direct_url) = (parts.url(), parts.direct_url());
    println!(
        "parts              primary {} and synchronous standby {}{}; fleet URL {url}; subscribers' URL {direct_url}; proxies in process {}",
        parts.pair.primary().port(),
        parts.pair.standby().port(),
        match &parts.poolers {
            Some([first, second]) => format!(
                "; pgbouncer (transaction mode, {} server connections) at {} and {}",
                parts::POOL_SIZE,
                first.port(),
                second.port()
            ),
            None => String::new(),
        },
        parts.proxies.pid()
    );

    let observed = Arc::new(Observed::new(config.replicas));
    let mut listeners = Vec::new();
    let mut batchers = Vec::new();
    for replica in 0..config.replicas {
        let subscriber = PgSubscriber::open(
            &direct_url,
            METADATA_BATCH_CHANNEL,
            options(replica, "subscriber", false),
        )
        .map_err(|err| format!("replica {replica}: PgSubscriber::open: {err}"))?;
        listeners.push(Listener::start(replica, subscriber, config.agents)?);
        let store = PgStore::open(&url, options(replica, "store", config.pooler))
            .map_err(|err| format!("replica {replica}: PgStore::open: {err}"))?;
        let publisher = PgPublisher::open(&url, options(replica, "publisher", config.pooler))
            .map_err(|err| format!("replica {replica}: PgPublisher::open: {err}"))?;
        let watched = Observe::new(
            store,
            Watched {
                replica,
                observed: observed.clone(),
            },
        );
        batchers.push(Arc::new(
            Batcher::builder(watched, publisher)
                .retry_backoff(
                    DEFAULT_RETRY_BACKOFF_INITIAL.min(config.retry_max),
                    config.retry_max,
                )
                .build()
                .map_err(|err| format!("replica {replica}: building the batcher: {err}"))?,
        ));
    }
    let clock = Arc::new(load::Clock::default());
    prime(&batchers, &clock, config.agents, &key_names)?;
    let primed: u64 = batchers.iter().map(|batcher| batcher.stats().flushed).sum();
    let monitor = resources::Monitor::start(
        batchers.clone(),
        parts.proxies.pid(),
        config.samples.as_deref(),
    )?;
    // The checkpoints' and the end's read-back, straight to the servers.
    let mut verifier = Reconnecting::new(&direct_url, options(0, "verify", false), VERIFY_PATIENCE)
        .map_err(|err| format!("verify: {err}"))?;

    let started = Instant::now();
    let mut workload = Workload::start(
        batchers.clone(),
        clock,
        config.agents,
        key_names.clone(),
        config.rate,
        config.duration,
    )?;

    // The faults, one every `every` from the warm-up's end, none in the quiet end.
    let last_start = config
        .duration
        .saturating_sub(config.quiet_end + LONGEST_FAULT);
    let mut schedule = Schedule::new(config.seed, config.kinds.clone());
    let mut faults = Vec::new();
    let mut checkpoints = Vec::new();
    let mut due = config.warmup;
    let warmed_up = started + config.warmup;
    // A fault that took longer than `every` delays the next; none starts past `last_start`.
    while due <= last_start && Instant::now() <= started + last_start {
        // The schedule's pace (the load runs on its own threads meanwhile), in short steps
        // so an interrupt is seen.
        while Instant::now() < started + due && !interrupted.load(Relaxed) {
            thread::sleep(INTERRUPT_POLL.min((started + due) - Instant::now()));
        }
        if interrupted.load(Relaxed) {
            println!("interrupted: ending the load and reporting the run so far");
            workload.stop();
            break;
        }
        let kind = schedule.next().ok_or("the schedule ran out")?;
        // The peak since the last fault started is that fault's.
        let peak = monitor.take_backlog_peak();
        if let Some((_, last_peak)) = faults.last_mut() {
            *last_peak = peak;
        }
        observed.fault_started();
        let fault = faults::inject(kind, &mut parts)?;
        observed.fault_ended();
        println!(
            "[{:7.1} s] {:<22} lasted {:.2} s{}",
            (fault.start - started).as_secs_f64(),
            kind,
            fault.duration().as_secs_f64(),
            match (fault.promotion, fault.rejoin) {
                (Some(promotion), Some(rejoin)) => format!(
                    " (promotion {:.2} s; old primary rejoined as standby in {:.2} s)",
                    promotion.as_secs_f64(),
                    rejoin.as_secs_f64()
                ),
                _ => String::new(),
            }
        );
        faults.push((fault, 0));
        due += config.every;
        if config.checkpoint_every > 0 && faults.len() % config.checkpoint_every == 0 {
            // Right after the fault: its backlog is part of what the drain writes.
            let checkpoint = workload.checkpoint(&mut verifier)?;
            println!(
                "[{:7.1} s] checkpoint             load paused {:.2} s: {} rows checked, {} not at their newest value",
                (checkpoint.paused - started).as_secs_f64(),
                (checkpoint.resumed - checkpoint.paused).as_secs_f64(),
                checkpoint.checked,
                checkpoint.wrong
            );
            checkpoints.push(checkpoint);
        }
    }
    let offered = workload.offered.clone();
    let offers = workload.finish()?;
    let load_ended = Instant::now();
    let peak = monitor.take_backlog_peak();
    if let Some((_, last_peak)) = faults.last_mut() {
        *last_peak = peak;
    }
    let closes: Vec<_> = thread::scope(|scope| {
        let closing: Vec<_> = batchers
            .iter()
            .map(|batcher| scope.spawn(move || batcher.close()))
            .collect();
        closing
            .into_iter()
            .map(|handle| handle.join().map_err(|_| "a close() panicked".to_owned()))
            .collect::<Result<Vec<_>, String>>()
    })?;
    let heard = listeners
        .into_iter()
        .map(Listener::join)
        .collect::<Result<Vec<_>, _>>()?;
    let newest = load::newest_by_key(&offers, config.agents * config.keys);
    let verified = load::verify(&mut verifier, &key_names, &newest)?;
    drop(verifier);
    let samples = monitor.stop()?;

    let stats: Vec<_> = batchers.iter().map(|batcher| batcher.stats()).collect();
    let (outside, inside) = {
        let freshness = lock(&observed.freshness);
        (freshness.outside.clone(), freshness.inside.clone())
    };
    let timelines = observed
        .timelines
        .iter()
        .map(|timeline| std::mem::take(&mut *lock(timeline)))
        .collect();
    let run = report::Run {
        replicas: config.replicas,
        rate: config.rate,
        every: config.every,
        seed: config.seed,
        min_per_kind: config.min_per_kind,
        timing_advisory: config.timing_advisory,
        kinds: config.kinds.clone(),
        pooler: config.pooler,
        retry_max: config.retry_max,
        started,
        warmed_up,
        load_ended,
        faults,
        checkpoints,
        timelines,
        heard,
        outside,
        inside,
        samples,
        offered: offered.load(Relaxed),
        accepted: offers.iter().map(|offer| offer.accepted).sum(),
        dropped: offers.iter().map(|offer| offer.dropped).sum(),
        flushed: stats.iter().map(|s| s.flushed).sum::<u64>() - primed,
        store_errors: stats.iter().map(|s| s.store_errors).sum(),
        conflicts: stats.iter().map(|s| s.conflicts).sum(),
        panics: stats.iter().map(|s| s.panics).sum(),
        unwritten: closes.iter().map(|close| close.unwritten).sum(),
        deadline_hits: closes.iter().filter(|close| close.deadline_hit).count(),
        verified,
    };
    Ok(run.report())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The same binary serves the proxies in a process of their own (proxies.rs).
    if args.first().map(String::as_str) == Some(proxies::CHILD_FLAG) {
        return proxies::serve(&args[1..]);
    }
    // The library's warnings (each store failure, each lost subscriber session) on stderr,
    // timestamped, so a fault's report line can be read beside what the fleet logged.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let config = match config::parse_args(args.into_iter()) {
        Ok(config) => config,
        Err(problem) => {
            eprintln!("soak: {problem}");
            return ExitCode::from(2);
        }
    };
    let kinds: Vec<_> = config.kinds.iter().map(|kind| kind.name()).collect();
    println!(
        "soak               {:?} at {:.0} updates/s over {} replicas, {} agents x {} keys; retries at most {:?} apart; {}; a fault every {:?} from {:?} (seed {}): {}{}",
        config.duration,
        config.rate,
        config.replicas,
        config.agents,
        config.keys,
        config.retry_max,
        match config.pooler {
            true => "through pgbouncer (transaction mode)",
            false => "no pooler",
        },
        config.every,
        config.warmup,
        config.seed,
        kinds.join(", "),
        match config.checkpoint_every {
            0 => String::new(),
            n => format!("; a quiet checkpoint every {n} faults"),
        }
    );
    match run(&config) {
        Ok(violations) if violations.is_empty() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(problem) => {
            eprintln!("soak: {problem}");
            ExitCode::from(1)
        }
    }
}
