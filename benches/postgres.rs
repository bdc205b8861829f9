//! Target 3: flush efficiency against real PostgreSQL, rows/s at batch 500.
//!
//! - `library_store`: `PgStore::batch_update` (the library's store, called directly);
//! - `library_batcher`: the same through the batcher: 50 calls of 10 keys added, then
//!   `sync()` until the capacity flush of exactly 500 rows has completed (flusher thread,
//!   interrupt hook, publish to a no-op publisher);
//! - `library_batcher_sustained`: 20 flushes of exactly 500 rows back to back through the
//!   (pipelined) batcher, the caller adding each batch while the previous one is written:
//!   the library's rows/s when it is busy, reported per 500 rows;
//! - `direct`: `BATCH_UPDATE_SQL` prepared once and executed on a plain `postgres::Client`
//!   with the same five arrays;
//! - `single_row`: one prepared single-row `UPDATE` per key, 500 per iteration, each its
//!   own transaction (what a batcher saves).
//!
//! Every iteration writes 500 rows that exist, with a newer `collected_at`, so each
//! statement really updates 500 rows, and every path cycles through the same 2,000 agents.
//! The batches are built outside the clock. After criterion, a paired run compares the
//! paths in 20 rounds, each on fresh connections: 10 alternations of `library_store` and
//! `direct`, and then (in another 40 rounds) a sustained batcher run against 20 direct
//! statements. It prints the ratio of the medians and the median of the rounds' own
//! ratios: on a noisy machine (the server is shared) those are the steadier figures.
//!
//! Then the library's own variants, each paired in the same way against the prepared
//! plaintext `PgStore` on a logged table (`postgres/variant/...`): TLS (`sslmode=require`),
//! unnamed statements with per-transaction settings (the pooler path), an UNLOGGED copy of
//! the table (Coder's choice), and `synchronous_commit = off`. Every path but `tls` is
//! plaintext, as the direct client is. Last, `postgres/floor/unnamed_direct`: the statement
//! sent unnamed on a plain client, one round trip, with the plan settings on its session (as
//! no pooled session can have them), against the same statement prepared: the least any
//! unnamed path can cost here, since the server parses and plans every unnamed statement.
//!
//! Needs PostgreSQL: `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`).
//! Creates the database `mb_bench_<pid>` and drops it afterwards.
//!
//! `cargo bench --bench postgres -- --warm-up-time 1 --measurement-time 3`
//!
//! `MB_BENCH_SUSTAINED_STORE=plain` runs the sustained batcher on the direct client instead of
//! `PgStore` (the statement on the flusher thread, no session thread, no deadline): what the
//! batcher alone costs, against what `PgStore`'s session thread adds.
//!
//! `MB_BENCH_PAIRED=<text>` runs only the paired sections whose name contains the text; give
//! criterion a filter that matches none of its benchmarks to skip those too:
//! `MB_BENCH_PAIRED=unnamed cargo bench --bench postgres -- unnamed`.

mod common;

use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, Throughput};
use metadata_batcher::postgres::{self as pg, PgOptions, PgStore, StatementMode, BATCH_UPDATE_SQL};
use metadata_batcher::{
    Batcher, Metadata, MetadataBatch, Observe, Observer, Store, StoreCall, StoreError, Written,
};
use postgres::types::Type;
use postgres::{Client, NoTls};

use common::{agent, call, key_names, NoopPublisher};

const BATCH: usize = 500;
const KEYS: usize = 10;
const AGENTS_PER_BATCH: usize = BATCH / KEYS;
const AGENTS: usize = 2000;
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const SINGLE_ROW_SQL: &str = "UPDATE workspace_agent_metadata \
    SET value = $3, error = $4, collected_at = $5 \
    WHERE workspace_agent_id = $1 AND key = $2 AND collected_at <= $5";

/// The UNLOGGED copy of the table that the `unlogged` variant writes.
const UNLOGGED_TABLE: &str = "workspace_agent_metadata_unlogged";

/// `url` with `sslmode` set (appended: a later parameter wins in libpq's strings).
fn with_sslmode(url: &str, mode: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}sslmode={mode}")
}

/// `url` with its database replaced by `database`.
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

/// The agents of batch `n`: 50 of them, cycling through the fleet, so every path writes
/// each row equally often (a row updated more often carries more dead versions).
fn batch_agents(n: usize) -> std::ops::Range<usize> {
    let first = (n * AGENTS_PER_BATCH) % AGENTS;
    first..first + AGENTS_PER_BATCH
}

/// The rows of batch `n`: its 50 agents × 10 keys.
fn batch(n: usize, keys: &[String]) -> MetadataBatch {
    let now = SystemTime::now();
    let mut batch = MetadataBatch::with_capacity(BATCH);
    for a in batch_agents(n) {
        for key in keys {
            batch.push(
                agent(a),
                Metadata::new(key.clone(), format!("{n} %"), "", now),
            );
        }
    }
    batch
}

/// Writes batch `n` with the library's store; returns how long the call took.
fn time_store(store: &mut PgStore, n: usize, keys: &[String]) -> Duration {
    let rows = batch(n, keys);
    let start = Instant::now();
    let updated = store.batch_update(&rows).expect("batch_update").updated();
    let elapsed = start.elapsed();
    assert_eq!(updated, BATCH as u64);
    elapsed
}

/// The plain client: `BATCH_UPDATE_SQL` prepared on its own connection.
struct Direct {
    client: Client,
    statement: postgres::Statement,
}

impl Direct {
    fn connect(url: &str) -> Direct {
        let mut client = Client::connect(url, NoTls).expect("client connects");
        let statement = client.prepare(BATCH_UPDATE_SQL).expect("prepare");
        Direct { client, statement }
    }

    fn execute(&mut self, batch: &MetadataBatch) -> u64 {
        self.client
            .execute(
                &self.statement,
                &[
                    &batch.agent_ids,
                    &batch.keys,
                    &batch.values,
                    &batch.errors,
                    &batch.collected_at,
                ],
            )
            .expect("direct execute")
    }

    /// Writes batch `n`; returns how long the statement took.
    fn time(&mut self, n: usize, keys: &[String]) -> Duration {
        let rows = batch(n, keys);
        let start = Instant::now();
        let updated = self.execute(&rows);
        let elapsed = start.elapsed();
        assert_eq!(updated, BATCH as u64);
        elapsed
    }
}

/// `library_batcher_sustained`: flushes of exactly 500 rows back to back through a batcher
/// in the default (pipelined) mode. The caller adds each batch while the previous one is
/// being written, and no sooner (it waits until that flush has started), so every flush is
/// exactly `BATCH` rows and starts as soon as its predecessor returns: the worker's intake,
/// dedup and hand-offs overlap with the statements, as they do under steady load.
struct Sustained {
    batcher: Batcher,
    started: crossbeam_channel::Receiver<()>,
}

impl Sustained {
    const FLUSHES: usize = 20;

    fn new(url: &str) -> Sustained {
        let store: Box<dyn Store> =
            if std::env::var("MB_BENCH_SUSTAINED_STORE").as_deref() == Ok("plain") {
                let mut direct = Direct::connect(url);
                // The settings PgStore's session has.
                direct
                    .client
                    .batch_execute("SET plan_cache_mode = force_generic_plan")
                    .expect("plan settings");
                Box::new(direct)
            } else {
                Box::new(PgStore::connect(url).expect("PgStore connects"))
            };
        let (started_tx, started) = crossbeam_channel::unbounded();
        let batcher = Batcher::builder(
            Observe::new(
                store,
                Announcing {
                    started: started_tx,
                },
            ),
            NoopPublisher,
        )
        .batch_size(BATCH)
        .channel_capacity(2 * BATCH)
        .interval(Duration::from_secs(3600))
        .build()
        .expect("valid settings");
        Sustained { batcher, started }
    }

    /// Writes batches `first .. first + FLUSHES`; returns the time per batch.
    fn run(&self, first: usize, keys: &[String]) -> Duration {
        let now = SystemTime::now();
        let batches: Vec<Vec<_>> = (first..first + Self::FLUSHES)
            .map(|n| {
                batch_agents(n)
                    .map(|a| (agent(a), call(keys, n as u64, now)))
                    .collect()
            })
            .collect();
        let start = Instant::now();
        for (f, calls) in batches.into_iter().enumerate() {
            if f > 0 {
                // Batch f gathers while flush f - 1 runs, never beside it.
                self.started.recv().expect("the flush started");
            }
            for (who, metadata) in calls {
                self.batcher.add(who, metadata).expect("add");
            }
        }
        self.batcher.sync();
        let elapsed = start.elapsed();
        self.started.recv().expect("the last flush started");
        elapsed / Self::FLUSHES as u32
    }

    fn report(self) {
        let stats = self.batcher.stats();
        println!(
            "postgres/library_batcher_sustained: flushes capacity {} (others {}), flushed {}, unmatched {}, dropped {}, rows per flush {:.1}",
            stats.flushes.capacity,
            stats.flushes.scheduled + stats.flushes.manual,
            stats.flushed,
            stats.unmatched,
            stats.dropped,
            stats.flushed as f64 / stats.flushes.capacity.max(1) as f64
        );
    }
}

/// Says when each statement of the library's `PgStore` starts; through `Observe`, which
/// forwards its interrupts, capabilities and parallel statements.
struct Announcing {
    started: crossbeam_channel::Sender<()>,
}

impl Store for Direct {
    fn batch_update(&mut self, batch: &MetadataBatch) -> Result<Written, StoreError> {
        Ok(Written::rows(self.execute(batch)))
    }
}

impl Observer for Announcing {
    fn before(&mut self, _batches: &[MetadataBatch]) {
        let _ = self.started.send(());
    }

    fn after(&mut self, _call: &StoreCall<'_>) {}
}

struct Fixture {
    admin: Client,
    database: String,
    url: String,
}

impl Fixture {
    fn create() -> Fixture {
        let admin_url = std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.into());
        let mut admin = Client::connect(&admin_url, NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to {admin_url} (set DATABASE_URL): {e}"));
        let database = format!("mb_bench_{}", std::process::id());
        // Two statements: DROP/CREATE DATABASE cannot share a (multi-statement) transaction.
        for sql in [
            format!("DROP DATABASE IF EXISTS {database}"),
            format!("CREATE DATABASE {database}"),
        ] {
            admin
                .batch_execute(&sql)
                .expect("create the bench database");
        }
        let url = with_database(&admin_url, &database);
        // Owned from here on, so that its Drop removes the database even if the set-up
        // below panics.
        let fixture = Fixture {
            admin,
            database,
            // Plaintext, as the direct client is; the `tls` variant asks for TLS itself.
            url: with_sslmode(&url, "disable"),
        };
        let mut client = Client::connect(&url, NoTls).expect("connect to the bench database");
        pg::migrate(&mut client).expect("migrate");
        let agents: Vec<_> = (0..AGENTS).map(agent).collect();
        let keys = key_names(KEYS);
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        pg::register_agents(&mut client, &agents, &keys).expect("register");
        // One statement each: VACUUM cannot run in a multi-statement (implicit) transaction.
        for sql in [
            format!(
                "CREATE UNLOGGED TABLE {UNLOGGED_TABLE} (LIKE workspace_agent_metadata \
                 INCLUDING ALL) WITH (fillfactor = 80)"
            ),
            format!("INSERT INTO {UNLOGGED_TABLE} SELECT * FROM workspace_agent_metadata"),
            "VACUUM ANALYZE workspace_agent_metadata".to_owned(),
            format!("VACUUM ANALYZE {UNLOGGED_TABLE}"),
        ] {
            client.batch_execute(&sql).expect("set up the bench tables");
        }
        fixture
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.admin.batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.database
        ));
    }
}

/// Whether the paired section `name` runs: see `MB_BENCH_PAIRED` in the module docs.
fn paired_section(name: &str) -> bool {
    std::env::var("MB_BENCH_PAIRED").map_or(true, |only| name.contains(&only))
}

/// Writes batch `n` as an unnamed statement (parsed and planned by the server on every
/// call, as every statement through a transaction-mode pooler is) in one round trip;
/// returns how long it took.
fn time_unnamed(client: &mut Client, n: usize, keys: &[String]) -> Duration {
    let rows = batch(n, keys);
    let start = Instant::now();
    let updated = client
        .execute_typed(
            BATCH_UPDATE_SQL,
            &[
                (&rows.agent_ids, Type::UUID_ARRAY),
                (&rows.keys, Type::TEXT_ARRAY),
                (&rows.values, Type::TEXT_ARRAY),
                (&rows.errors, Type::TEXT_ARRAY),
                (&rows.collected_at, Type::TIMESTAMPTZ_ARRAY),
            ],
        )
        .expect("unnamed execute");
    let elapsed = start.elapsed();
    assert_eq!(updated, BATCH as u64);
    elapsed
}

/// One paired round on fresh connections: `WARM_UP` calls of each path (past a new session's
/// first executions, planned afresh each time), then 10 alternations, in which every other
/// call swaps which path goes first and which of two neighbouring batches each writes (a
/// path that always went second, or always wrote the same half of the fleet, would see
/// different pages and caches). Returns the median of each path.
fn paired_round(
    round: usize,
    n: &mut usize,
    mut a: impl FnMut(usize) -> Duration,
    mut b: impl FnMut(usize) -> Duration,
) -> (Duration, Duration) {
    for _ in 0..WARM_UP {
        *n += 1;
        a(*n);
        b(*n);
    }
    let (mut a_times, mut b_times) = (Vec::new(), Vec::new());
    for i in 0..10 {
        let flip = (round + i) % 2;
        let (mine, theirs) = (*n + 1 + flip, *n + 2 - flip);
        *n += 2;
        if flip == 0 {
            a_times.push(a(mine));
            b_times.push(b(theirs));
        } else {
            b_times.push(b(theirs));
            a_times.push(a(mine));
        }
    }
    (median(a_times), median(b_times))
}

/// Calls of each path per paired round before the timed ones.
const WARM_UP: usize = 10;

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

/// One line of the paired comparison: medians per 500 rows, and the median of the rounds'
/// own ratios (each round's two runs are neighbours in time, so a server that slows down
/// for a while slows both).
fn print_paired(name: &str, library: Vec<Duration>, direct: Vec<Duration>) {
    print_pair(
        &format!("paired/{name}"),
        ("library", library),
        ("direct", direct),
    );
}

/// Medians per 500 rows of two paths measured in alternation, and how fast `a` is against
/// `b`: the ratio of the medians and the median of the rounds' own ratios.
fn print_pair(name: &str, (a_name, a): (&str, Vec<Duration>), (b_name, b): (&str, Vec<Duration>)) {
    let (library, direct) = (a, b);
    let rounds = library.len();
    let mut ratios: Vec<f64> = library
        .iter()
        .zip(&direct)
        .map(|(l, d)| d.as_secs_f64() / l.as_secs_f64())
        .collect();
    ratios.sort_by(f64::total_cmp);
    let (library, direct) = (median(library), median(direct));
    println!(
        "postgres/{name}: {rounds} rounds, {a_name} median {:.3} ms ({:.0} rows/s), {b_name} median {:.3} ms ({:.0} rows/s), ratio of medians {:.3}, median of round ratios {:.3}",
        library.as_secs_f64() * 1e3,
        BATCH as f64 / library.as_secs_f64(),
        direct.as_secs_f64() * 1e3,
        BATCH as f64 / direct.as_secs_f64(),
        direct.as_secs_f64() / library.as_secs_f64(),
        ratios[rounds / 2]
    );
}

fn main() {
    let fixture = Fixture::create();
    let keys = key_names(KEYS);
    let mut store = PgStore::connect(&fixture.url).expect("PgStore connects");
    let mut direct = Direct::connect(&fixture.url);
    let single = direct.client.prepare(SINGLE_ROW_SQL).expect("prepare");
    let sustained = Sustained::new(&fixture.url);
    let mut n = 0usize;

    let mut c = Criterion::default().configure_from_args();
    {
        let mut group = c.benchmark_group("postgres");
        group.throughput(Throughput::Elements(BATCH as u64));
        group.sample_size(20);
        group.bench_function("library_store", |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        n += 1;
                        time_store(&mut store, n, &keys)
                    })
                    .sum()
            })
        });
        group.bench_function("direct", |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        n += 1;
                        direct.time(n, &keys)
                    })
                    .sum()
            })
        });
        {
            let batcher = Batcher::builder(
                PgStore::connect(&fixture.url).expect("PgStore connects"),
                NoopPublisher,
            )
            .batch_size(BATCH)
            .interval(Duration::from_secs(3600))
            .build()
            .expect("valid settings");
            group.bench_function("library_batcher", |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        n += 1;
                        let now = SystemTime::now();
                        let calls: Vec<_> = batch_agents(n)
                            .map(|a| (agent(a), call(&keys, n as u64, now)))
                            .collect();
                        let start = Instant::now();
                        for (who, metadata) in calls {
                            batcher.add(who, metadata).expect("add");
                        }
                        batcher.sync();
                        total += start.elapsed();
                    }
                    total
                })
            });
            let stats = batcher.stats();
            println!(
                "postgres/library_batcher: flushes capacity {} (others {}), flushed {}, unmatched {}, dropped {}, store errors {}",
                stats.flushes.capacity,
                stats.flushes.scheduled + stats.flushes.manual,
                stats.flushed,
                stats.unmatched,
                stats.dropped,
                stats.store_errors
            );
            batcher.close();
        }
        group.bench_function("library_batcher_sustained", |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        n += Sustained::FLUSHES;
                        sustained.run(n + 1 - Sustained::FLUSHES, &keys)
                    })
                    .sum()
            })
        });
        group.sample_size(10);
        group.bench_function("single_row", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    n += 1;
                    let rows = batch(n, &keys);
                    let start = Instant::now();
                    let mut updated = 0;
                    for i in 0..rows.len() {
                        updated += direct
                            .client
                            .execute(
                                &single,
                                &[
                                    &rows.agent_ids[i],
                                    &rows.keys[i],
                                    &rows.values[i],
                                    &rows.errors[i],
                                    &rows.collected_at[i],
                                ],
                            )
                            .expect("single-row update");
                    }
                    total += start.elapsed();
                    assert_eq!(updated, BATCH as u64);
                }
                total
            })
        });
        group.finish();
    }
    c.final_summary();

    // Paired: library and direct alternate, so both see the same server and machine state.
    // Each round opens fresh connections for both: two connections running the very same
    // statement differ by up to 15 % here for as long as they live (measured with two plain
    // clients), so a comparison of one pair of connections measures the pair (`paired_round`).
    // `cargo test` runs this binary without `--bench` (an unoptimised build, where timing
    // means nothing): two rounds keep the code exercised.
    let rounds = if std::env::args().any(|arg| arg == "--bench") {
        20
    } else {
        2
    };
    let (mut library, mut plain) = (Vec::new(), Vec::new());
    for round in (0..rounds).filter(|_| paired_section("paired/library_store")) {
        let mut store = PgStore::connect(&fixture.url).expect("PgStore connects");
        let mut direct = Direct::connect(&fixture.url);
        let (l, d) = paired_round(
            round,
            &mut n,
            |m| time_store(&mut store, m, &keys),
            |m| direct.time(m, &keys),
        );
        library.push(l);
        plain.push(d);
    }
    if !library.is_empty() {
        print_paired("library_store", library, plain);
    }
    // The same for the batcher: per round a fresh batcher (and connection) and a fresh
    // client; a sustained run of 20 flushes, and 20 direct statements.
    let (mut library, mut plain) = (Vec::new(), Vec::new());
    for round in (0..2 * rounds).filter(|_| paired_section("paired/library_batcher_sustained")) {
        let sustained = Sustained::new(&fixture.url);
        let mut direct = Direct::connect(&fixture.url);
        let flushes = Sustained::FLUSHES;
        sustained.run(n + 1, &keys);
        (n + 1..n + 1 + WARM_UP).for_each(|m| {
            direct.time(m, &keys);
        });
        n += flushes;
        let flip = round % 2;
        let (mine, theirs) = (n + 1 + flip * flushes, n + 1 + (1 - flip) * flushes);
        n += 2 * flushes;
        let mut time_direct_run = || {
            (theirs..theirs + flushes)
                .map(|m| direct.time(m, &keys))
                .sum::<Duration>()
                / flushes as u32
        };
        let (l, d) = if flip == 0 {
            (sustained.run(mine, &keys), time_direct_run())
        } else {
            let d = time_direct_run();
            (sustained.run(mine, &keys), d)
        };
        library.push(l);
        plain.push(d);
    }
    if !library.is_empty() {
        print_paired("library_batcher_sustained", library, plain);
        sustained.report();
    }

    // The library's variants against its default: prepared, plaintext, logged table.
    let plaintext = PgOptions::default();
    let variants: [(&str, String, PgOptions); 4] = [
        (
            "tls",
            with_sslmode(&fixture.url, "require"),
            plaintext.clone(),
        ),
        (
            "unnamed",
            fixture.url.clone(),
            plaintext.clone().statement_mode(StatementMode::Unnamed),
        ),
        (
            "unlogged",
            fixture.url.clone(),
            plaintext.clone().table(UNLOGGED_TABLE.to_owned()),
        ),
        (
            "synchronous_commit_off",
            fixture.url.clone(),
            plaintext.clone().synchronous_commit(false),
        ),
    ];
    for (name, url, options) in variants {
        if !paired_section(&format!("variant/{name}")) {
            continue;
        }
        let (mut variant, mut baseline) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let mut other = PgStore::open(&url, options.clone()).expect("variant connects");
            let mut store = PgStore::connect(&fixture.url).expect("PgStore connects");
            let (v, b) = paired_round(
                round,
                &mut n,
                |m| time_store(&mut other, m, &keys),
                |m| time_store(&mut store, m, &keys),
            );
            variant.push(v);
            baseline.push(b);
        }
        print_pair(
            &format!("variant/{name}"),
            (name, variant),
            ("prepared_plaintext_logged", baseline),
        );
    }
    if paired_section("floor/unnamed_direct") {
        let (mut unnamed, mut prepared) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            // Each with the plan settings the store gives it (docs/postgres.md, "Plan"), so
            // that both run the same plan and differ only in parsing and planning.
            let mut direct = Direct::connect(&fixture.url);
            direct
                .client
                .batch_execute("SET plan_cache_mode = force_generic_plan")
                .expect("plan settings");
            let mut plain = Client::connect(&fixture.url, NoTls).expect("client connects");
            plain
                .batch_execute("SET enable_hashjoin = off; SET enable_mergejoin = off")
                .expect("plan settings");
            let (u, p) = paired_round(
                round,
                &mut n,
                |m| time_unnamed(&mut plain, m, &keys),
                |m| direct.time(m, &keys),
            );
            unnamed.push(u);
            prepared.push(p);
        }
        print_pair(
            "floor/unnamed_direct",
            ("unnamed", unnamed),
            ("prepared", prepared),
        );
    }
    drop(store);
    drop(direct);
    drop(fixture);
}
