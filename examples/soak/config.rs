//! The soak's settings and the flags that set them (the list is in `main.rs`'s docs).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metadata_batcher::DEFAULT_RETRY_BACKOFF_MAX;

use super::schedule::Kind;

/// The soak's settings; see `main.rs` for the flags.
pub struct Config {
    pub duration: Duration,
    pub rate: f64,
    pub replicas: usize,
    pub agents: usize,
    pub keys: usize,
    pub every: Duration,
    pub kinds: Vec<Kind>,
    pub seed: u64,
    pub warmup: Duration,
    pub quiet_end: Duration,
    pub min_per_kind: usize,
    pub retry_max: Duration,
    pub pooler: bool,
    /// `--timing-advisory`: timing goals missed are printed, not failed (the short profile).
    pub timing_advisory: bool,
    /// A quiet checkpoint after every this many faults; 0 for none.
    pub checkpoint_every: usize,
    /// Where to write the resource samples as CSV, if anywhere.
    pub samples: Option<String>,
}

/// Every flag that takes a value.
const FLAGS: [&str; 14] = [
    "--duration",
    "--rate",
    "--replicas",
    "--agents",
    "--keys",
    "--every",
    "--faults",
    "--seed",
    "--warmup",
    "--quiet-end",
    "--min-per-kind",
    "--retry-max",
    "--checkpoint-every",
    "--samples",
];

pub fn parse_args(args: impl Iterator<Item = String>) -> Result<Config, String> {
    let mut config = Config {
        duration: Duration::from_secs(3600),
        rate: 50_000.0,
        replicas: 2,
        agents: 10_000,
        keys: 10,
        every: Duration::from_secs(30),
        kinds: Kind::ALL.to_vec(),
        seed: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |since| since.as_nanos() as u64),
        warmup: Duration::from_secs(20),
        quiet_end: Duration::from_secs(20),
        min_per_kind: 0,
        retry_max: DEFAULT_RETRY_BACKOFF_MAX,
        pooler: false,
        timing_advisory: false,
        checkpoint_every: 0,
        samples: None,
    };
    let mut faults_named = false;
    let mut args = args.peekable();
    while let Some(flag) = args.next() {
        if flag == "--timing-advisory" {
            config.timing_advisory = true;
            continue;
        }
        if flag == "--pooler" {
            config.pooler = true;
            continue;
        }
        if !FLAGS.contains(&flag.as_str()) {
            return Err(format!("unknown flag {flag}; see examples/soak/main.rs"));
        }
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let number = || -> Result<f64, String> {
            match value.parse::<f64>() {
                Ok(n) if n.is_finite() && n >= 0.0 => Ok(n),
                _ => Err(format!("{flag}: {value:?} is not a non-negative number")),
            }
        };
        let seconds = || number().map(Duration::from_secs_f64);
        match flag.as_str() {
            "--duration" => config.duration = seconds()?,
            "--rate" => config.rate = number()?,
            "--replicas" => config.replicas = (number()? as usize).max(1),
            "--agents" => config.agents = (number()? as usize).max(1),
            "--keys" => config.keys = (number()? as usize).max(1),
            "--every" => config.every = seconds()?.max(Duration::from_secs(1)),
            "--faults" => {
                config.kinds = Kind::parse_list(&value)?;
                faults_named = value != "all";
            }
            "--seed" => {
                config.seed = value
                    .parse()
                    .map_err(|_| format!("--seed: {value:?} is not a whole number"))?
            }
            "--warmup" => config.warmup = seconds()?,
            "--quiet-end" => config.quiet_end = seconds()?,
            "--min-per-kind" => config.min_per_kind = number()? as usize,
            "--retry-max" => config.retry_max = seconds()?,
            "--checkpoint-every" => config.checkpoint_every = number()? as usize,
            "--samples" => config.samples = Some(value),
            other => unreachable!("{other} is in FLAGS but not handled"),
        }
    }
    // A pooler restart needs a pooler: `all` means every kind the parts can take.
    if !config.pooler && config.kinds.contains(&Kind::PoolerRestart) {
        if faults_named {
            return Err("--faults pooler-restart needs --pooler".into());
        }
        config.kinds.retain(|kind| *kind != Kind::PoolerRestart);
    }
    Ok(config)
}
