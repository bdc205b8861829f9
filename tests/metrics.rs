//! The Prometheus metrics as the seed's Go version has them (HELP texts, when utilization is
//! observed), where the crate deliberately differs (rows actually stored), constant labels
//! that keep two batchers in one process apart, the crate's own lag and health series, and
//! that the shipped dashboard and rules (deploy/prometheus/) name only series the exporter
//! writes.

mod common;
mod promql;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{agent, md, ScriptedStore};
use metadata_batcher::metrics::{names, prometheus_builder};
use metadata_batcher::{
    Batcher, BuildError, Builder, Clock, MemoryPubsub, Metadata, MockClock, StoreError,
};
use metrics_exporter_prometheus::PrometheusHandle;

/// Builds a batcher with a mock clock (nothing flushes unless the test says so) under a
/// recorder of its own; returns the batcher and the recorder's handle.
fn with_recorder(
    store: ScriptedStore,
    configure: impl FnOnce(Builder) -> Builder,
) -> (Batcher, PrometheusHandle) {
    let recorder = prometheus_builder().build_recorder();
    let handle = recorder.handle();
    let batcher = metrics::with_local_recorder(&recorder, || {
        configure(Batcher::builder(store, MemoryPubsub::new()).clock(MockClock::new()))
            .build()
            .unwrap()
    });
    (batcher, handle)
}

/// The value of the series line that starts with `series` (name and labels), or `None`
/// when the series was never written.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("bad value {v:?}")))
}

/// A store whose first `calls` calls fail with `Unavailable`; later ones succeed.
fn store_failing_first(calls: usize) -> ScriptedStore {
    let count = Arc::new(AtomicUsize::new(0));
    ScriptedStore::new(move |batch| {
        if count.fetch_add(1, Ordering::Relaxed) < calls {
            Err(StoreError::unavailable("connection refused"))
        } else {
            Ok(batch.len() as u64)
        }
    })
}

#[test]
fn help_texts_are_the_seeds() {
    let (batcher, handle) = with_recorder(ScriptedStore::accepting(), |b| b);
    batcher.add(agent(1), vec![md("k", "v", 1)]).unwrap();
    batcher.flush().unwrap();
    let text = handle.render();
    // Copied from the seed's metadata_batcher_metrics.go, not from src/metrics.rs.
    for (name, help) in [
        (
            "coderd_agentapi_metadata_batch_utilization",
            "Number of metadata keys per agent in each batch, updated before flushes.",
        ),
        (
            "coderd_agentapi_metadata_batch_size",
            "Total number of metadata entries in each batch, updated before flushes.",
        ),
        (
            "coderd_agentapi_metadata_flush_duration_seconds",
            "Time taken to flush metadata batch to database and pubsub.",
        ),
        (
            "coderd_agentapi_metadata_batches_total",
            "Total number of metadata batches flushed.",
        ),
        (
            "coderd_agentapi_metadata_dropped_keys_total",
            "Total number of metadata keys dropped due to capacity limits.",
        ),
        (
            "coderd_agentapi_metadata_flushed_total",
            "Total number of unique metadatas flushed.",
        ),
        (
            "coderd_agentapi_metadata_publish_errors_total",
            "Total number of metadata batch pubsub publish calls that have resulted in an error.",
        ),
    ] {
        let expected = format!("# HELP {name} {help}");
        assert!(
            text.lines().any(|line| line == expected),
            "missing {expected:?} in\n{text}"
        );
    }
}

#[test]
fn utilization_is_observed_for_every_agent_before_the_store_call() {
    // The store refuses the only call: nothing is stored, yet, as in Go, every agent of the
    // batch is observed, because utilization is recorded before the store is called.
    let (batcher, handle) = with_recorder(store_failing_first(1), |b| b);
    batcher
        .add(
            agent(1),
            vec![md("a", "v", 1), md("b", "v", 1), md("c", "v", 1)],
        )
        .unwrap();
    batcher.add(agent(2), vec![md("a", "v", 1)]).unwrap();
    let report = batcher.flush().unwrap();
    assert_eq!((report.count, report.stored), (4, 0));

    let text = handle.render();
    let utilization = "coderd_agentapi_metadata_batch_utilization";
    assert_eq!(value(&text, &format!("{utilization}_count")), Some(2.0));
    assert_eq!(value(&text, &format!("{utilization}_sum")), Some(4.0));
    assert_eq!(
        value(&text, &format!("{utilization}_bucket{{le=\"1\"}}")),
        Some(1.0)
    );
    assert_eq!(
        value(&text, &format!("{utilization}_bucket{{le=\"3\"}}")),
        Some(2.0)
    );
}

#[test]
fn a_flush_that_writes_nothing_leaves_flushed_and_batches_unchanged() {
    let (batcher, handle) = with_recorder(store_failing_first(1), |b| b);
    batcher.add(agent(1), vec![md("a", "v", 1)]).unwrap();
    batcher.flush().unwrap();
    let text = handle.render();
    assert_eq!(
        value(&text, "coderd_agentapi_metadata_flushed_total"),
        Some(0.0)
    );
    for reason in ["capacity", "scheduled", "shutdown", "manual"] {
        let series = format!("coderd_agentapi_metadata_batches_total{{reason=\"{reason}\"}}");
        assert_eq!(value(&text, &series), Some(0.0), "{series}");
    }
    assert_eq!(
        value(&text, "coderd_agentapi_metadata_batch_size_count"),
        Some(0.0)
    );

    // The retry succeeds: now the entry and the flush count.
    batcher.flush().unwrap();
    let text = handle.render();
    assert_eq!(
        value(&text, "coderd_agentapi_metadata_flushed_total"),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            "coderd_agentapi_metadata_batches_total{reason=\"manual\"}"
        ),
        Some(1.0)
    );
}

#[test]
fn flushed_total_counts_the_rows_a_failed_flush_did_store() {
    // The first call is refused (a bad row), so the batch is split: the first half is
    // stored, then the store goes away for the second half. Go would count nothing of this
    // flush; the crate counts the two rows that are in the table, and the flush as a batch:
    // a flush that stored rows counts, even when others were kept for a retry (behind a
    // locked row every flush is such a flush, and they must show).
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let store = ScriptedStore::new(move |batch| match counted.fetch_add(1, Ordering::Relaxed) {
        0 => Err(StoreError::rejected("invalid input")),
        1 | 3.. => Ok(batch.len() as u64),
        _ => Err(StoreError::unavailable("connection reset")),
    });
    let (batcher, handle) = with_recorder(store, |b| b);
    batcher
        .add(
            agent(1),
            vec![
                md("a", "v", 1),
                md("b", "v", 1),
                md("c", "v", 1),
                md("d", "v", 1),
            ],
        )
        .unwrap();
    let report = batcher.flush().unwrap();
    assert_eq!((report.stored, report.retained), (2, 2));
    let text = handle.render();
    assert_eq!(
        value(&text, "coderd_agentapi_metadata_flushed_total"),
        Some(2.0)
    );
    assert_eq!(
        value(
            &text,
            "coderd_agentapi_metadata_batches_total{reason=\"manual\"}"
        ),
        Some(1.0)
    );
    // One flush, one observation, however many statements it took.
    assert_eq!(
        value(&text, "coderd_agentapi_metadata_batch_utilization_count"),
        Some(1.0)
    );
    assert_eq!(calls.load(Ordering::Relaxed), 3);
}

#[test]
fn two_labelled_batchers_in_one_recorder_render_apart() {
    let recorder = prometheus_builder().build_recorder();
    let handle = recorder.handle();
    let build = |replica: &str| {
        metrics::with_local_recorder(&recorder, || {
            Batcher::builder(ScriptedStore::accepting(), MemoryPubsub::new())
                .clock(MockClock::new())
                .metric_labels([("batcher", replica.to_owned())])
                .build()
                .unwrap()
        })
    };
    let (a, b) = (build("replica-a"), build("replica-b"));
    a.add(agent(1), vec![md("k", "v", 1)]).unwrap();
    b.add(
        agent(2),
        vec![md("k", "v", 1), md("l", "v", 1), md("m", "v", 1)],
    )
    .unwrap();
    a.flush().unwrap();
    b.flush().unwrap();
    let text = handle.render();
    for (series, expected) in [
        (
            "coderd_agentapi_metadata_flushed_total{batcher=\"replica-a\"}",
            1.0,
        ),
        (
            "coderd_agentapi_metadata_flushed_total{batcher=\"replica-b\"}",
            3.0,
        ),
        (
            "coderd_agentapi_metadata_batches_total{batcher=\"replica-a\",reason=\"manual\"}",
            1.0,
        ),
        (
            "coderd_agentapi_metadata_batch_size_sum{batcher=\"replica-b\"}",
            3.0,
        ),
        (
            "coderd_agentapi_metadata_flush_duration_seconds_count{batcher=\"replica-a\",reason=\"manual\"}",
            1.0,
        ),
        (
            "coderd_agentapi_metadata_dropped_keys_total{batcher=\"replica-b\"}",
            0.0,
        ),
        (
            "coderd_agentapi_metadata_store_errors_total{batcher=\"replica-a\"}",
            0.0,
        ),
    ] {
        assert_eq!(value(&text, series), Some(expected), "{series} in\n{text}");
    }
    // No unlabelled series: every series of both batchers carries its label.
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        assert!(line.contains("batcher=\"replica-"), "unlabelled: {line}");
    }
}

#[test]
fn unusable_metric_labels_are_refused_at_build() {
    for (name, problem) in [
        ("reason", "the batcher's own"),
        ("le", "the batcher's own"),
        ("__name", "reserves"),
        ("a-b", "not a Prometheus label name"),
    ] {
        let err = Batcher::builder(ScriptedStore::accepting(), MemoryPubsub::new())
            .metric_labels([(name, "x")])
            .build()
            .unwrap_err();
        assert!(
            matches!(&err, BuildError::MetricLabel { name: n, .. } if n == name),
            "{err:?}"
        );
        assert!(err.to_string().contains(problem), "{err}");
    }
    let err = Batcher::builder(ScriptedStore::accepting(), MemoryPubsub::new())
        .metric_labels([("batcher", "a"), ("batcher", "b")])
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("given twice"), "{err}");
}

/// Like [`with_recorder`], and returns the mock clock too.
fn with_clock(
    store: ScriptedStore,
    configure: impl FnOnce(Builder) -> Builder,
) -> (Batcher, PrometheusHandle, MockClock) {
    let clock = MockClock::new();
    let recorder = prometheus_builder().build_recorder();
    let handle = recorder.handle();
    let batcher = metrics::with_local_recorder(&recorder, || {
        configure(Batcher::builder(store, MemoryPubsub::new()).clock(clock.clone()))
            .build()
            .unwrap()
    });
    (batcher, handle, clock)
}

/// Renders until `series` has `expected`, for what the `mdbatch-gauges` thread sets after a
/// tick; fails after a few seconds of real time.
fn wait_for_value(handle: &PrometheusHandle, series: &str, expected: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = handle.render();
        if value(&text, series) == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never became {expected}:\n{text}"
        );
        // Another thread's work, with nothing to block on: yield rather than spin hot.
        std::thread::yield_now();
    }
}

#[test]
fn write_lag_is_observed_per_written_row_from_its_collected_at() {
    let (batcher, handle, clock) = with_clock(store_failing_first(1), |b| b);
    let now = clock.system_time();
    batcher
        .add(
            agent(1),
            vec![
                Metadata::new("seven", "v", "", now - Duration::from_secs(7)),
                Metadata::new("milli", "v", "", now - Duration::from_micros(500)),
                // An agent whose clock runs ahead of the server's: written at once.
                Metadata::new("ahead", "v", "", now + Duration::from_secs(60)),
            ],
        )
        .unwrap();
    // The first call fails: nothing is written, nothing observed. (`sync` returns once the
    // worker has armed the retry: `flush` may answer before.)
    batcher.flush().unwrap();
    batcher.sync();
    let lag = names::WRITE_LAG_SECONDS;
    assert_eq!(value(&handle.render(), &format!("{lag}_count")), Some(0.0));

    // The retry writes them 20 s later: each row's lag counts from its own collected_at.
    clock.advance(Duration::from_secs(20));
    batcher.sync();
    assert_eq!(batcher.stats().flushed, 3);
    let text = handle.render();
    assert_eq!(value(&text, &format!("{lag}_count")), Some(3.0));
    let sum = value(&text, &format!("{lag}_sum")).unwrap();
    assert!((sum - (27.0 + 20.0005)).abs() < 1e-6, "{sum}");
    // 27 s, 20.0005 s, and 0 for the row from the future: an agent whose clock runs ahead
    // of the server's counts as written at once.
    for (le, rows) in [("0.001", 1.0), ("10", 1.0), ("30", 3.0), ("60", 3.0)] {
        let series = format!("{lag}_bucket{{le=\"{le}\"}}");
        assert_eq!(value(&text, &series), Some(rows), "{series} in\n{text}");
    }
    // Two rows with one collected_at (observed as one run), written at once: lag 0 each.
    let ahead = clock.system_time() + Duration::from_secs(60);
    batcher
        .add(
            agent(1),
            vec![
                Metadata::new("ahead", "w", "", ahead),
                Metadata::new("milli", "w", "", ahead),
            ],
        )
        .unwrap();
    batcher.flush().unwrap();
    let text = handle.render();
    assert_eq!(value(&text, &format!("{lag}_count")), Some(5.0));
    assert_eq!(
        value(&text, &format!("{lag}_bucket{{le=\"0.001\"}}")),
        Some(3.0)
    );
}

#[test]
fn health_gauges_follow_an_outage_on_every_flush() {
    // Only the test's flushes run: the timer and the retries wait an hour.
    let hour = Duration::from_secs(3600);
    let (batcher, handle, clock) = with_clock(store_failing_first(2), |b| {
        b.interval(hour).retry_backoff(hour, hour)
    });
    let gauge = |name: &str| value(&handle.render(), name);
    assert_eq!(gauge(names::FLUSH_INTERVAL_SECONDS), Some(3600.0));
    assert_eq!(gauge(names::WORKER_ALIVE), Some(1.0), "true from the start");

    batcher
        .add(agent(1), vec![md("a", "v", 1), md("b", "v", 1)])
        .unwrap();
    batcher.sync(); // taken in now: the age counts from here
    clock.advance(Duration::from_secs(3));
    batcher.flush().unwrap(); // fails
    assert_eq!(gauge(names::OLDEST_UNFLUSHED_AGE_SECONDS), Some(3.0));
    assert_eq!(gauge(names::CONSECUTIVE_STORE_FAILURES), Some(1.0));
    assert_eq!(gauge(names::PENDING_ENTRIES), Some(2.0));
    assert_eq!(gauge(names::STORE_CALL_AGE_SECONDS), Some(0.0));
    assert_eq!(gauge(names::WORKER_ALIVE), Some(1.0));

    clock.advance(Duration::from_secs(4));
    batcher.flush().unwrap(); // fails again
    assert_eq!(gauge(names::OLDEST_UNFLUSHED_AGE_SECONDS), Some(7.0));
    assert_eq!(gauge(names::CONSECUTIVE_STORE_FAILURES), Some(2.0));

    batcher.flush().unwrap(); // writes
    assert_eq!(gauge(names::OLDEST_UNFLUSHED_AGE_SECONDS), Some(0.0));
    assert_eq!(gauge(names::CONSECUTIVE_STORE_FAILURES), Some(0.0));
    assert_eq!(gauge(names::PENDING_ENTRIES), Some(0.0));

    // Once the worker has ended, the gauge thread's next tick says so.
    batcher.close();
    clock.advance(Duration::from_secs(1));
    wait_for_value(&handle, names::WORKER_ALIVE, 0.0);
}

#[test]
fn the_age_goes_on_growing_while_a_store_call_hangs() {
    // The store holds its call until released: no flush completes meanwhile, so only the
    // gauge thread's ticks can move the gauges.
    let (entered_tx, entered) = crossbeam_channel::unbounded();
    let (release, release_rx) = crossbeam_channel::unbounded::<()>();
    let store = ScriptedStore::new(move |batch| {
        let _ = entered_tx.send(());
        let _ = release_rx.recv();
        Ok(batch.len() as u64)
    });
    let (batcher, handle, clock) = with_clock(store, |b| b);
    batcher.add(agent(1), vec![md("a", "v", 1)]).unwrap();
    std::thread::scope(|scope| {
        let flushing = scope.spawn(|| batcher.flush());
        entered.recv().unwrap();
        clock.advance(Duration::from_secs(42));
        wait_for_value(&handle, names::OLDEST_UNFLUSHED_AGE_SECONDS, 42.0);
        wait_for_value(&handle, names::STORE_CALL_AGE_SECONDS, 42.0);
        release.send(()).unwrap();
        assert_eq!(flushing.join().unwrap().unwrap().stored, 1);
    });
    let text = handle.render();
    assert_eq!(value(&text, names::OLDEST_UNFLUSHED_AGE_SECONDS), Some(0.0));
    assert_eq!(value(&text, names::STORE_CALL_AGE_SECONDS), Some(0.0));
}

#[test]
fn the_crates_own_series_have_help_texts_and_carry_the_labels() {
    let (batcher, handle, _clock) = with_clock(ScriptedStore::accepting(), |b| {
        b.metric_labels([("batcher", "a")])
    });
    batcher.add(agent(1), vec![md("k", "v", 1)]).unwrap();
    batcher.flush().unwrap();
    let text = handle.render();
    for name in [
        names::WRITE_LAG_SECONDS,
        names::OLDEST_UNFLUSHED_AGE_SECONDS,
        names::CONSECUTIVE_STORE_FAILURES,
        names::STORE_CALL_AGE_SECONDS,
        names::PENDING_ENTRIES,
        names::WORKER_ALIVE,
        names::FLUSH_INTERVAL_SECONDS,
    ] {
        assert!(
            text.lines()
                .any(|line| line.starts_with(&format!("# HELP {name} "))),
            "no HELP for {name} in\n{text}"
        );
        assert!(
            text.lines()
                .any(|line| line.starts_with(name) && line.contains("batcher=\"a\"")),
            "no {name} series labelled batcher=\"a\" in\n{text}"
        );
    }
}

/// What the exporter writes, as the series names a query can use (a histogram's
/// `_bucket`, `_sum` and `_count`), after a flush, a failed flush, a drop and a publish.
fn exported_names() -> BTreeSet<String> {
    let (batcher, handle, _clock) = with_clock(store_failing_first(1), |b| b.channel_capacity(1));
    batcher
        .add(agent(1), vec![md("a", "v", 1), md("b", "v", 1)])
        .unwrap();
    batcher.flush().unwrap();
    batcher.flush().unwrap();
    promql::exported_series_names(&handle.render())
}

#[test]
fn the_dashboard_queries_only_series_the_exporter_writes() {
    let exported = exported_names();
    let dashboard = promql::dashboard_queries();
    assert!(dashboard.len() >= 6, "{dashboard:?}");
    for query in &dashboard {
        let used = promql::metric_names(query);
        assert!(!used.is_empty(), "no metric in {query:?}");
        for name in used {
            assert!(
                exported.contains(&name),
                "the dashboard queries {name}, which the exporter does not write \
                 (query {query:?}; exported: {exported:?})"
            );
        }
    }
}

#[test]
fn the_rules_use_only_series_the_exporter_or_prometheus_writes() {
    let exported = exported_names();
    let recorded = promql::recorded_names();
    for (rule, query) in promql::rule_queries() {
        for name in promql::metric_names(&query) {
            assert!(
                exported.contains(&name)
                    || recorded.contains(&name)
                    || promql::PROMETHEUS_SERIES.contains(&name.as_str()),
                "rule {rule} uses {name}, which nothing writes (exported: {exported:?})"
            );
        }
    }
}
