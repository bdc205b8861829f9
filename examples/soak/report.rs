//! The soak's report: per fault, per kind and overall, each figure checked against the
//! goals of issue 22, and a `RESULT key=value ...` line for scripts. Every goal missed is
//! a line starting `VIOLATION`, and makes the soak exit 1.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::faults::Fault;
use super::fleet::{Heard, Timeline, GAP_MIN, SETTLE};
use super::resources::Sample;
use super::schedule::Kind;
use super::slopes::{show, Slopes};
use super::workload::Checkpoint;

/// A fault's write outage may exceed its own duration (for a failover: the promotion's) by
/// this much.
pub const OUTAGE_ALLOWANCE: Duration = Duration::from_secs(3);
/// Threads and file descriptors must be back at their baseline this long after a fault.
pub const RECOVERY: Duration = Duration::from_secs(5);
/// Freshness p99 outside fault windows, at most.
pub const FRESHNESS_P99_OUTSIDE: Duration = Duration::from_millis(100);
/// The window RSS growth is measured over: the last 50 minutes (of a 1 h run), or the run
/// after its warm-up when shorter.
pub const RSS_WINDOW: Duration = Duration::from_secs(50 * 60);
/// A gap that began this long before a fault started is still the fault's: the last
/// statement before it may have committed a little earlier.
const LEAD_IN: Duration = Duration::from_secs(1);

/// Everything the run produced, for the report.
pub struct Run {
    pub replicas: usize,
    pub rate: f64,
    pub every: Duration,
    pub seed: u64,
    pub min_per_kind: usize,
    pub kinds: Vec<Kind>,
    pub pooler: bool,
    pub retry_max: Duration,
    /// The goals that are timings (outage, freshness, resources back within 5 s) are
    /// printed as advisories, not violations: a short run on a loaded machine proves the
    /// harness and the correctness goals, and its timings are the machine's.
    pub timing_advisory: bool,
    pub started: Instant,
    /// When the first fault started: the warm-up before it sets the resource baseline.
    pub warmed_up: Instant,
    /// When the load ended (the generators returned).
    pub load_ended: Instant,
    pub faults: Vec<(Fault, u64)>,
    pub checkpoints: Vec<Checkpoint>,
    pub timelines: Vec<Timeline>,
    pub heard: Vec<Heard>,
    pub outside: Histogram<u64>,
    pub inside: Histogram<u64>,
    pub samples: Vec<Sample>,
    pub offered: u64,
    /// Updates the batchers accepted and dropped (a full channel), as `add` reported them.
    pub accepted: u64,
    pub dropped: u64,
    pub flushed: u64,
    pub store_errors: u64,
    pub conflicts: u64,
    pub panics: u64,
    pub unwritten: u64,
    pub deadline_hits: usize,
    pub verified: (u64, u64),
}

/// One fault's measured figures.
struct Measured {
    outage: Duration,
    limit: Duration,
    back_at_baseline: Option<bool>,
    /// The last sample before the fault: its baseline.
    before: Option<Sample>,
    at_recovery: Option<Sample>,
}

fn secs(at: Instant, since: Instant) -> f64 {
    at.saturating_duration_since(since).as_secs_f64()
}

fn ms(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1e3
}

fn max_ms(histogram: &Histogram<u64>) -> f64 {
    histogram.max() as f64 / 1e3
}

impl Run {
    /// The longest gap between a replica's successful statements that began with the
    /// fault: from [`LEAD_IN`] before it started until as long before the next one did.
    /// Each gap is one fault's.
    fn outage(&self, index: usize) -> Duration {
        let fault = &self.faults[index].0;
        let next_start = self.next_start(index);
        let from_at = if index == 0 {
            self.started
        } else {
            fault.start - LEAD_IN
        };
        self.timelines
            .iter()
            .flat_map(|timeline| timeline.gaps.iter())
            .filter(|(from, _)| *from >= from_at && *from < next_start - LEAD_IN)
            .filter(|(from, _)| {
                !self
                    .checkpoints
                    .iter()
                    .any(|c| *from >= c.paused && *from <= c.resumed)
            })
            .map(|(from, to)| *to - *from)
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// When the fault after fault `index` started (the load's end after the last).
    fn next_start(&self, index: usize) -> Instant {
        self.faults
            .get(index + 1)
            .map_or(self.load_ended, |(next, _)| next.start)
    }

    /// Threads and fds: the most seen during the warm-up.
    fn baseline(&self) -> Option<(u64, u64)> {
        let warm_up: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|sample| sample.at < self.warmed_up)
            .collect();
        let threads = warm_up.iter().map(|sample| sample.threads).max()?;
        let fds = warm_up.iter().map(|sample| sample.fds).max()?;
        Some((threads, fds))
    }

    fn measure(&self, index: usize, baseline: Option<(u64, u64)>) -> Measured {
        let fault = &self.faults[index].0;
        let limit = fault.promotion.unwrap_or(fault.duration()) + OUTAGE_ALLOWANCE;
        let due = fault.end + RECOVERY;
        let next_start = self.next_start(index);
        let at_recovery = self
            .samples
            .iter()
            .find(|sample| sample.at >= due && sample.at < next_start)
            .copied();
        let before = self
            .samples
            .iter()
            .take_while(|sample| sample.at < fault.start)
            .last()
            .copied();
        // The level before the fault, or the warm-up's if that was higher: a fault that
        // follows another may start while a session of the fleet is still reopening.
        let back_at_baseline = match (before, at_recovery) {
            (Some(before), Some(after)) => {
                let (threads, fds) = baseline.unwrap_or((0, 0));
                Some(
                    after.threads <= before.threads.max(threads)
                        && after.fds <= before.fds.max(fds),
                )
            }
            _ => None,
        };
        Measured {
            outage: self.outage(index),
            limit,
            back_at_baseline,
            before,
            at_recovery,
        }
    }

    /// Prints the report; returns the goals violated (empty: all met).
    pub fn report(&self) -> Vec<String> {
        let mut violations = Vec::new();
        let mut timing = Vec::new();
        let baseline = self.baseline();
        let measured: Vec<Measured> = (0..self.faults.len())
            .map(|index| self.measure(index, baseline))
            .collect();

        println!("\n# Faults");
        println!(
            "{:>3} {:<22} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:<20} subscribers (R: reconnected, H: heard agents by 5 s after the fault or the next one, -: neither)",
            "#", "kind", "start s", "lasted s", "outage s", "limit s", "backlog", "promote s", "thr/fds before->+5s"
        );
        for (index, ((fault, backlog), m)) in self.faults.iter().zip(&measured).enumerate() {
            let next = self.next_start(index);
            let subscribers: String = self
                .heard
                .iter()
                .map(|heard| {
                    if heard.reconnected_in(fault.start, next) {
                        'R'
                    } else if heard.heard_in(fault.start, next.max(fault.end + SETTLE)) {
                        'H'
                    } else {
                        '-'
                    }
                })
                .collect();
            let resources = match (m.before, m.at_recovery) {
                (Some(before), Some(after)) => format!(
                    "{}/{}->{}/{}",
                    before.threads, before.fds, after.threads, after.fds
                ),
                _ => "n/a".into(),
            };
            println!(
                "{:>3} {:<22} {:>8.1} {:>8.2} {:>8.2} {:>8.2} {:>9} {:>9} {:<20} {}",
                index + 1,
                fault.kind,
                secs(fault.start, self.started),
                fault.duration().as_secs_f64(),
                m.outage.as_secs_f64(),
                m.limit.as_secs_f64(),
                backlog,
                fault
                    .promotion
                    .map_or("".into(), |p| format!("{:.2}", p.as_secs_f64())),
                resources,
                subscribers
            );
            if m.outage > m.limit {
                timing.push(format!(
                    "fault {} ({}): write outage {:.2} s > {:.2} s",
                    index + 1,
                    fault.kind,
                    m.outage.as_secs_f64(),
                    m.limit.as_secs_f64()
                ));
            }
            if m.back_at_baseline == Some(false) {
                timing.push(format!(
                    "fault {} ({}): threads/fds before it -> {RECOVERY:?} after its end: {resources} (warm-up {}/{})",
                    index + 1,
                    fault.kind,
                    baseline.map_or(0, |b| b.0),
                    baseline.map_or(0, |b| b.1),
                ));
            }
        }

        println!(
            "\n# Per kind (outage: the longest gap between successful statements, any replica)"
        );
        println!(
            "{:<22} {:>5} {:>10} {:>10} {:>10} {:>12}",
            "kind", "count", "lasted p50", "outage p50", "outage max", "worst excess"
        );
        let mut by_kind: BTreeMap<Kind, Vec<(&Fault, &Measured)>> = BTreeMap::new();
        for ((fault, _), m) in self.faults.iter().zip(&measured) {
            by_kind.entry(fault.kind).or_default().push((fault, m));
        }
        for kind in &self.kinds {
            let entries = by_kind.get(kind).map(Vec::as_slice).unwrap_or_default();
            let mut outages: Vec<f64> = entries
                .iter()
                .map(|(_, m)| m.outage.as_secs_f64())
                .collect();
            let mut lasted: Vec<f64> = entries
                .iter()
                .map(|(fault, _)| fault.duration().as_secs_f64())
                .collect();
            outages.sort_by(f64::total_cmp);
            lasted.sort_by(f64::total_cmp);
            let median = |values: &[f64]| values.get(values.len() / 2).copied().unwrap_or(0.0);
            let worst_excess = entries
                .iter()
                .map(|(_, m)| m.outage.as_secs_f64() - (m.limit - OUTAGE_ALLOWANCE).as_secs_f64())
                .fold(f64::NEG_INFINITY, f64::max);
            println!(
                "{:<22} {:>5} {:>10.2} {:>10.2} {:>10.2} {:>12}",
                kind,
                entries.len(),
                median(&lasted),
                median(&outages),
                outages.last().copied().unwrap_or(0.0),
                match entries.is_empty() {
                    true => "n/a".to_owned(),
                    false => format!("{worst_excess:+.2}"),
                }
            );
            if entries.len() < self.min_per_kind {
                violations.push(format!(
                    "{kind}: {} faults, fewer than the {} asked for",
                    entries.len(),
                    self.min_per_kind
                ));
            }
        }

        println!("\n# Overall");
        let load_seconds = secs(self.load_ended, self.started);
        let rows_per_s = self.flushed as f64 / load_seconds.max(1e-9);
        println!(
            "load               {:.0} s, {} replicas, offered {} updates ({:.0}/s; asked {:.0}/s), accepted {}, dropped {}, written {} ({rows_per_s:.0}/s; an update a newer one replaced before its flush is not written)",
            load_seconds,
            self.replicas,
            self.offered,
            self.offered as f64 / load_seconds.max(1e-9),
            self.rate,
            self.accepted,
            self.dropped,
            self.flushed
        );
        println!(
            "faults             {} (one every {:?}, seed {}); outages within their limits: {}",
            self.faults.len(),
            self.every,
            self.seed,
            measured.iter().filter(|m| m.outage <= m.limit).count()
        );
        println!(
            "freshness outside  p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  ({} rows)",
            ms(&self.outside, 0.5),
            ms(&self.outside, 0.99),
            max_ms(&self.outside),
            self.outside.len()
        );
        println!(
            "freshness inside   p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  ({} rows; a fault's window lasts until {SETTLE:?} after its end)",
            ms(&self.inside, 0.5),
            ms(&self.inside, 0.99),
            max_ms(&self.inside),
            self.inside.len()
        );
        if ms(&self.outside, 0.99) > FRESHNESS_P99_OUTSIDE.as_secs_f64() * 1e3 {
            timing.push(format!(
                "freshness p99 outside fault windows {:.1} ms > {FRESHNESS_P99_OUTSIDE:?}",
                ms(&self.outside, 0.99)
            ));
        }
        println!(
            "store              errors {}  conflicts {}  panics {}  unwritten at close {}  close deadlines hit {}",
            self.store_errors, self.conflicts, self.panics, self.unwritten, self.deadline_hits
        );
        if self.panics > 0 {
            violations.push(format!("{} panics", self.panics));
        }
        if self.unwritten > 0 || self.deadline_hits > 0 {
            violations.push(format!(
                "{} unwritten at close ({} close deadlines hit)",
                self.unwritten, self.deadline_hits
            ));
        }
        let (checked, wrong) = self.verified;
        println!("verify             {checked} rows checked, {wrong} not at their newest value");
        if wrong > 0 || checked == 0 {
            violations.push(format!(
                "{wrong} of {checked} rows not at their newest value"
            ));
        }
        let checkpoint_wrong: u64 = self.checkpoints.iter().map(|c| c.wrong).sum();
        if !self.checkpoints.is_empty() {
            let paused: Vec<f64> = self
                .checkpoints
                .iter()
                .map(|c| (c.resumed - c.paused).as_secs_f64())
                .collect();
            println!(
                "checkpoints        {} (load paused {:.1}-{:.1} s each), {} rows checked, {checkpoint_wrong} not at their newest value",
                self.checkpoints.len(),
                paused.iter().copied().fold(f64::INFINITY, f64::min),
                paused.iter().copied().fold(0.0, f64::max),
                self.checkpoints.iter().map(|c| c.checked).sum::<u64>()
            );
        }
        for (index, checkpoint) in self.checkpoints.iter().enumerate() {
            if checkpoint.wrong > 0 || checkpoint.checked == 0 {
                violations.push(format!(
                    "checkpoint {} at {:.0} s: {} of {} rows not at their newest value",
                    index + 1,
                    secs(checkpoint.paused, self.started),
                    checkpoint.wrong,
                    checkpoint.checked
                ));
            }
        }
        let mut unheard_total = 0;
        for (replica, heard) in self.heard.iter().enumerate() {
            let unheard = heard.unheard_since_reconnect();
            unheard_total += unheard;
            println!(
                "subscriber r{replica}      reconnected {} times; agents not heard since the last: {unheard}",
                heard.reconnects.len()
            );
            if unheard > 0 {
                violations.push(format!(
                    "subscriber r{replica}: {unheard} agents not heard since its last Reconnected"
                ));
            }
        }

        let window_start = self.warmed_up.max(
            self.load_ended
                .checked_sub(RSS_WINDOW)
                .unwrap_or(self.started),
        );
        // The load's samples only: after it the fleet closes, and its threads go.
        let slopes = Slopes::report(
            &self.samples,
            (window_start, self.load_ended),
            baseline,
            self.replicas,
            &mut violations,
        );
        let max_outage = measured.iter().map(|m| m.outage).max().unwrap_or_default();
        if self.timing_advisory {
            for missed in &timing {
                println!("ADVISORY {missed}");
            }
        } else {
            violations.append(&mut timing);
        }
        println!(
            "\nRESULT duration_s={load_seconds:.0} replicas={} rate={:.0} every_s={} seed={} faults={} rows_per_s={rows_per_s:.0} \
             dropped={} wrong={wrong} verified={checked} unwritten={} panics={} unheard={unheard_total} store_errors={} conflicts={} \
             fresh_out_p50_ms={:.1} fresh_out_p99_ms={:.1} fresh_out_max_ms={:.1} fresh_in_p50_ms={:.1} fresh_in_p99_ms={:.1} fresh_in_max_ms={:.1} \
             max_outage_s={:.2} checkpoints={} checkpoint_wrong={checkpoint_wrong} pooler={} retry_max_s={:.1} \
             rss_slope_mib_per_h={} rss_growth_mib={} anon_slope_mib_per_h={} proxies_rss_slope_mib_per_h={} threads_slope_per_h={} fds_slope_per_h={} gap_min_ms={} violations={}",
            self.replicas,
            self.rate,
            self.every.as_secs(),
            self.seed,
            self.faults.len(),
            self.dropped,
            self.unwritten,
            self.panics,
            self.store_errors,
            self.conflicts,
            ms(&self.outside, 0.5),
            ms(&self.outside, 0.99),
            max_ms(&self.outside),
            ms(&self.inside, 0.5),
            ms(&self.inside, 0.99),
            max_ms(&self.inside),
            max_outage.as_secs_f64(),
            self.checkpoints.len(),
            u8::from(self.pooler),
            self.retry_max.as_secs_f64(),
            show(slopes.rss),
            show(slopes.rss_growth),
            show(slopes.anon),
            show(slopes.proxies_rss),
            show(slopes.threads),
            show(slopes.fds),
            GAP_MIN.as_millis(),
            violations.len()
        );
        for violation in &violations {
            println!("VIOLATION {violation}");
        }
        violations
    }
}
