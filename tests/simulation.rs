//! Every interleaving, simulated: seeded cases of random operations (adds that collide,
//! clock moves, `sync`, `flush` from other threads, store and publisher faults of every
//! kind, clock panics, `close` at any point) against one to three batchers sharing a
//! simulated table, with invariants checked after every step (tests/sim/run.rs says which).
//!
//! A failing case is shrunk to the operations that still fail it and printed with its
//! seed. `MB_SIM_SEED=N` replays case N alone; `MB_SIM_CASES=N` sets how many cases run
//! (1,000 here; `scripts/soak --sim` runs the ignored long test, 100,000 by default), from
//! `MB_SIM_SEED_BASE` on.

mod common;
mod sim;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use sim::case::{Case, Op};
use sim::faults::seen;
use sim::run::Run;

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a whole number")),
    )
}

/// The simulated faults panic on purpose; their messages would drown the output.
fn quiet_simulated_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        if !(message.starts_with("sim:") || message.starts_with("clock failure")) {
            default(info);
        }
    }));
}

fn run_ops(case: &Case, ops: &[Op]) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| Run::new(case).run(ops))).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(format!("the driver panicked: {message}"))
    })
}

/// Removes runs of operations while the case still fails (any failure), halving the run
/// length down to single operations; bounded in tries.
fn shrink(case: &Case, mut failure: String) -> (Vec<Op>, String) {
    let mut ops = case.ops.clone();
    let mut tries = 0;
    let mut chunk = ops.len().div_ceil(2).max(1);
    while tries < 400 {
        let mut start = 0;
        let mut removed_any = false;
        while start < ops.len() && tries < 400 {
            let mut fewer = ops.clone();
            fewer.drain(start..(start + chunk).min(ops.len()));
            tries += 1;
            match run_ops(case, &fewer) {
                Err(why) => {
                    ops = fewer;
                    failure = why;
                    removed_any = true;
                }
                Ok(()) => start += chunk,
            }
        }
        if chunk == 1 && !removed_any {
            break;
        }
        chunk = (chunk / 2).max(1);
    }
    (ops, failure)
}

fn run_cases(base: u64, count: u64) {
    quiet_simulated_panics();
    let (base, count) = match env_u64("MB_SIM_SEED") {
        Some(seed) => (seed, 1),
        None => (
            env_u64("MB_SIM_SEED_BASE").unwrap_or(base),
            env_u64("MB_SIM_CASES").unwrap_or(count),
        ),
    };
    let started = Instant::now();
    let mut operations = 0;
    for seed in base..base + count {
        // A long run says how far it got, so one cut short still tells.
        if seed > base && (seed - base).is_multiple_of(10_000) {
            eprintln!(
                "simulation: {} cases passed in {:.1?}",
                seed - base,
                started.elapsed()
            );
        }
        let case = Case::generate(seed);
        operations += case.ops.len();
        if let Err(failure) = run_ops(&case, &case.ops) {
            let (ops, why) = shrink(&case, failure.clone());
            let listed: Vec<String> = ops.iter().map(|op| format!("    {op}")).collect();
            panic!(
                "simulation case {seed} failed: {failure}\n\
                 shrunk to {} of {} operations, which fail with: {why}\n{}\n\
                 settings: {:#?}\n\
                 replay: MB_SIM_SEED={seed} cargo test --test simulation",
                ops.len(),
                case.ops.len(),
                listed.join("\n"),
                case.config,
            );
        }
    }
    eprintln!(
        "simulation: {count} cases (seeds {base}..{}, {operations} operations) passed in {:.1?}",
        base + count,
        started.elapsed()
    );
    eprintln!("simulation: faults seen: {}", seen::report());
}

#[test]
fn simulated_cases() {
    run_cases(1, 1_000);
}

/// The long run (`scripts/soak --sim`): 100,000 cases from a fresh base unless told.
#[test]
#[ignore]
fn simulated_cases_long() {
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
        << 20;
    run_cases(base, 100_000);
    let missing = seen::missing();
    assert!(
        missing.is_empty(),
        "fault kinds no case reached: {missing:?}"
    );
}
