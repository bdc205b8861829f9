//! The fault kinds and the seeded schedule that orders them.
//!
//! The schedule deals the kinds in rounds, each a fresh shuffle of every kind asked for (a
//! "bag", as Tetris deals its pieces): over `n` faults each kind comes `n / kinds` times at
//! least, in an order that differs from round to round, so a fault follows every other kind
//! in the course of a long run. The shuffle is driven by SplitMix64 from `--seed`: the same
//! seed and kinds give the same schedule, so a failing run can be replayed.

use std::fmt;

/// One kind of fault the soak injects; see `faults.rs` for what each does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    CrashRestart,
    FastRestart,
    Terminate,
    TerminateSubscribers,
    Failover,
    BlackHole,
    Latency,
    Lock,
    ReadOnly,
    Freeze,
    PoolerRestart,
}

impl Kind {
    /// Every kind, in the order the report lists them.
    pub const ALL: [Kind; 11] = [
        Kind::CrashRestart,
        Kind::FastRestart,
        Kind::Terminate,
        Kind::TerminateSubscribers,
        Kind::Failover,
        Kind::BlackHole,
        Kind::Latency,
        Kind::Lock,
        Kind::ReadOnly,
        Kind::Freeze,
        Kind::PoolerRestart,
    ];

    /// The name `--faults` takes and the report prints.
    pub fn name(self) -> &'static str {
        match self {
            Kind::CrashRestart => "crash-restart",
            Kind::FastRestart => "fast-restart",
            Kind::Terminate => "terminate",
            Kind::TerminateSubscribers => "terminate-subscribers",
            Kind::Failover => "failover",
            Kind::BlackHole => "black-hole",
            Kind::Latency => "latency",
            Kind::Lock => "lock",
            Kind::ReadOnly => "read-only",
            Kind::Freeze => "freeze",
            Kind::PoolerRestart => "pooler-restart",
        }
    }

    /// The kinds a `--faults` list names (`all` for every kind).
    pub fn parse_list(list: &str) -> Result<Vec<Kind>, String> {
        if list == "all" {
            return Ok(Kind::ALL.to_vec());
        }
        let mut kinds = Vec::new();
        for name in list
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
        {
            let kind = Kind::ALL
                .into_iter()
                .find(|kind| kind.name() == name)
                .ok_or_else(|| {
                    let names: Vec<_> = Kind::ALL.iter().map(|kind| kind.name()).collect();
                    format!("unknown fault {name:?}; the kinds are {}", names.join(", "))
                })?;
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        if kinds.is_empty() {
            return Err("--faults names no fault".into());
        }
        Ok(kinds)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// The seeded order of the faults; see the module docs.
pub struct Schedule {
    kinds: Vec<Kind>,
    state: u64,
    bag: Vec<Kind>,
}

impl Schedule {
    pub fn new(seed: u64, kinds: Vec<Kind>) -> Schedule {
        Schedule {
            kinds,
            state: seed,
            bag: Vec::new(),
        }
    }

    /// SplitMix64: small, and good enough to shuffle a handful of kinds.
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl Iterator for Schedule {
    type Item = Kind;

    fn next(&mut self) -> Option<Kind> {
        if self.bag.is_empty() {
            self.bag = self.kinds.clone();
            // Fisher-Yates; the bag is dealt from its end.
            for i in (1..self.bag.len()).rev() {
                let j = (self.next_u64() % (i as u64 + 1)) as usize;
                self.bag.swap(i, j);
            }
        }
        self.bag.pop()
    }
}
