//! The soak's monitor: a thread that samples this process's resources (RSS, threads, open
//! file descriptors, sockets, from `/proc/self`) and the proxies' process's RSS every
//! [`SAMPLE_EVERY`], and the fleet's backlog every [`BACKLOG_EVERY`], keeping the peak
//! since the last fault started.
//!
//! This process holds the fleet (batchers, stores, publishers, subscribers) and the
//! harness's records of it (fixed-size histograms, a sample a second, a few records per
//! fault); the proxies, whose threads, sockets and buffers come and go with every
//! connection, run in a process of their own, sampled apart.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use metadata_batcher::Batcher;

/// How often the resources are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// How often the backlog is read for its peak.
const BACKLOG_EVERY: Duration = Duration::from_millis(100);

/// One sample of the process's resources.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    pub rss_kib: u64,
    /// Of `rss_kib`: anonymous memory (heap, stacks); the rest is mapped files (the
    /// binary's pages, touched as new code runs) and shared memory.
    pub anon_kib: u64,
    /// The proxies' process's.
    pub proxies_rss_kib: u64,
    /// Rows queued, batched or in flight, all replicas.
    pub backlog: u64,
    pub threads: u64,
    pub fds: u64,
    pub sockets: u64,
}

/// A number field (e.g. `VmRSS:`) of `/proc/{process}/status`; 0 when unreadable.
fn status_field(process: &str, name: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{process}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

/// The CSV columns of [`Sample::csv_line`].
const CSV_HEADER: &str = "t_s,rss_kib,anon_kib,proxies_rss_kib,threads,fds,sockets,backlog";

impl Sample {
    /// The sample as a CSV line, its time in seconds since `since`.
    fn csv_line(&self, since: Instant) -> String {
        format!(
            "{:.1},{},{},{},{},{},{},{}",
            self.at.saturating_duration_since(since).as_secs_f64(),
            self.rss_kib,
            self.anon_kib,
            self.proxies_rss_kib,
            self.threads,
            self.fds,
            self.sockets,
            self.backlog
        )
    }

    fn take(proxies_pid: u32, backlog: u64) -> Sample {
        let (mut fds, mut sockets) = (0, 0);
        for fd in std::fs::read_dir("/proc/self/fd")
            .into_iter()
            .flatten()
            .flatten()
        {
            fds += 1;
            if std::fs::read_link(fd.path())
                .is_ok_and(|link| link.to_string_lossy().starts_with("socket:"))
            {
                sockets += 1;
            }
        }
        Sample {
            at: Instant::now(),
            rss_kib: status_field("self", "VmRSS:"),
            anon_kib: status_field("self", "RssAnon:"),
            backlog,
            proxies_rss_kib: status_field(&proxies_pid.to_string(), "VmRSS:"),
            threads: status_field("self", "Threads:"),
            fds,
            sockets,
        }
    }
}

/// The monitor thread; see the module docs.
pub struct Monitor {
    stop: Arc<AtomicBool>,
    backlog_peak: Arc<AtomicU64>,
    thread: JoinHandle<Vec<Sample>>,
}

impl Monitor {
    /// Starts sampling; with `csv`, each sample is also appended to that file as it is
    /// taken (so a run that fails still leaves its curves).
    pub fn start(
        batchers: Vec<Arc<Batcher>>,
        proxies_pid: u32,
        csv: Option<&str>,
    ) -> Result<Monitor, String> {
        let mut csv = csv
            .map(|path| {
                std::fs::File::create(path)
                    .and_then(|mut file| {
                        writeln!(file, "{CSV_HEADER}")?;
                        Ok(file)
                    })
                    .map_err(|err| format!("--samples {path}: {err}"))
            })
            .transpose()?;
        let since = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let backlog_peak = Arc::new(AtomicU64::new(0));
        let (thread_stop, peak) = (stop.clone(), backlog_peak.clone());
        let thread = thread::Builder::new()
            .name("soak-monitor".into())
            .spawn(move || {
                let mut samples = Vec::new();
                let mut next_sample = Instant::now();
                while !thread_stop.load(Relaxed) {
                    let backlog: u64 = batchers
                        .iter()
                        .map(|batcher| {
                            let stats = batcher.stats();
                            (stats.queued + stats.batched + stats.in_flight) as u64
                        })
                        .sum();
                    peak.fetch_max(backlog, Relaxed);
                    if Instant::now() >= next_sample {
                        let sample = Sample::take(proxies_pid, backlog);
                        if let Some(file) = &mut csv {
                            // The curves are a by-product: a failed write loses them only.
                            let _ = writeln!(file, "{}", sample.csv_line(since));
                        }
                        samples.push(sample);
                        next_sample += SAMPLE_EVERY;
                    }
                    // A sampler's period; nothing to wait on.
                    thread::sleep(BACKLOG_EVERY);
                }
                samples
            })
            .map_err(|err| format!("starting the monitor: {err}"))?;
        Ok(Monitor {
            stop,
            backlog_peak,
            thread,
        })
    }

    /// The peak backlog (rows queued, batched or in flight, all replicas) since the last
    /// call, which starts a new peak.
    pub fn take_backlog_peak(&self) -> u64 {
        self.backlog_peak.swap(0, Relaxed)
    }

    pub fn stop(self) -> Result<Vec<Sample>, String> {
        self.stop.store(true, Relaxed);
        self.thread
            .join()
            .map_err(|_| "the monitor thread panicked".to_owned())
    }
}
