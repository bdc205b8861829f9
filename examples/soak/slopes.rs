//! The resource curves after the warm-up: their least-squares slopes, the RSS growth they
//! imply, and the RSS goal (this process's RSS, the fleet's; the proxies' process is
//! reported beside it, not judged).

use std::time::{Duration, Instant};

use super::resources::Sample;

/// RSS growth per replica over the measured window, at most.
pub const RSS_GROWTH_PER_REPLICA_MIB: f64 = 2.0;
/// A window shorter than this is reported, not judged.
pub const RSS_JUDGED_FROM: Duration = Duration::from_secs(10 * 60);

/// Slopes per hour over the window; `None` with fewer than two samples.
pub struct Slopes {
    pub rss: Option<f64>,
    pub rss_growth: Option<f64>,
    /// Of `rss`: anonymous memory (heap, stacks).
    pub anon: Option<f64>,
    pub proxies_rss: Option<f64>,
    pub threads: Option<f64>,
    pub fds: Option<f64>,
}

/// A slope for the report: signed, two decimals, or `n/a`.
pub fn show(slope: Option<f64>) -> String {
    slope.map_or("n/a".to_owned(), |s| format!("{s:+.2}"))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

impl Slopes {
    /// Prints the resources over `window` and their slopes; a violation when this
    /// process's RSS grew more than the goal over a window long enough to judge.
    pub fn report(
        samples: &[Sample],
        window: (Instant, Instant),
        baseline: Option<(u64, u64)>,
        replicas: usize,
        violations: &mut Vec<String>,
    ) -> Slopes {
        let window_hours = (window.1.saturating_duration_since(window.0)).as_secs_f64() / 3600.0;
        let rss = slope_per_hour(samples, window, |s| mib(s.rss_kib));
        let slopes = Slopes {
            rss,
            rss_growth: rss.map(|slope| slope * window_hours),
            anon: slope_per_hour(samples, window, |s| mib(s.anon_kib)),
            proxies_rss: slope_per_hour(samples, window, |s| mib(s.proxies_rss_kib)),
            threads: slope_per_hour(samples, window, |s| s.threads as f64),
            fds: slope_per_hour(samples, window, |s| s.fds as f64),
        };
        let sockets = slope_per_hour(samples, window, |s| s.sockets as f64);
        let (first, last) = (samples.first(), samples.last());
        let peak = |kib: fn(&Sample) -> u64| mib(samples.iter().map(kib).max().unwrap_or(0));
        println!(
            "resources          RSS {:.0} -> {:.0} MiB (peak {:.0} MiB); proxies' process RSS {:.0} -> {:.0} MiB (peak {:.0}); threads {} -> {}; fds {} -> {}; sockets {} -> {}; baseline threads/fds {}",
            first.map_or(0.0, |s| mib(s.rss_kib)),
            last.map_or(0.0, |s| mib(s.rss_kib)),
            peak(|s| s.rss_kib),
            first.map_or(0.0, |s| mib(s.proxies_rss_kib)),
            last.map_or(0.0, |s| mib(s.proxies_rss_kib)),
            peak(|s| s.proxies_rss_kib),
            first.map_or(0, |s| s.threads),
            last.map_or(0, |s| s.threads),
            first.map_or(0, |s| s.fds),
            last.map_or(0, |s| s.fds),
            first.map_or(0, |s| s.sockets),
            last.map_or(0, |s| s.sockets),
            baseline.map_or("n/a".into(), |(t, f)| format!("{t}/{f}")),
        );
        let limit = RSS_GROWTH_PER_REPLICA_MIB * replicas as f64;
        println!(
            "slopes per hour    over the last {:.0} s: RSS {} MiB (growth {} MiB, limit {limit:.1}; anonymous {} MiB), proxies' RSS {} MiB, threads {}, fds {}, sockets {}",
            window_hours * 3600.0,
            show(slopes.rss),
            show(slopes.rss_growth),
            show(slopes.anon),
            show(slopes.proxies_rss),
            show(slopes.threads),
            show(slopes.fds),
            show(sockets)
        );
        let judged = window_hours * 3600.0 >= RSS_JUDGED_FROM.as_secs_f64();
        if !judged {
            println!(
                "                   (RSS growth not judged: the window is shorter than {RSS_JUDGED_FROM:?}, and a short run's RSS is still warming up)"
            );
        }
        if let (Some(growth), true) = (slopes.rss_growth, judged) {
            if growth > limit {
                violations.push(format!(
                    "RSS grew {growth:.2} MiB over the last {:.0} s, more than {RSS_GROWTH_PER_REPLICA_MIB} MiB per replica",
                    window_hours * 3600.0
                ));
            }
        }
        slopes
    }
}

/// The least-squares slope of `value` over time, per hour, for the samples in
/// `[from, to]`; `None` with fewer than two.
pub fn slope_per_hour(
    samples: &[Sample],
    (from, to): (Instant, Instant),
    value: impl Fn(&Sample) -> f64,
) -> Option<f64> {
    let points: Vec<(f64, f64)> = samples
        .iter()
        .filter(|sample| sample.at >= from && sample.at <= to)
        .map(|sample| ((sample.at - from).as_secs_f64(), value(sample)))
        .collect();
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_v = points.iter().map(|p| p.1).sum::<f64>() / n;
    let covariance: f64 = points.iter().map(|p| (p.0 - mean_t) * (p.1 - mean_v)).sum();
    let variance: f64 = points.iter().map(|p| (p.0 - mean_t).powi(2)).sum();
    (variance > 0.0).then(|| covariance / variance * 3600.0)
}
