//! The Prometheus metrics as the seed's Go version has them (HELP texts, when utilization is
//! observed), where the crate deliberately differs (rows actually stored), and constant
//! labels that keep two batchers in one process apart.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{agent, md, ScriptedStore};
use metadata_batcher::metrics::prometheus_builder;
use metadata_batcher::{Batcher, BuildError, Builder, MemoryPubsub, MockClock, StoreError};
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
            Err(StoreError::Unavailable("connection refused".into()))
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
        0 => Err(StoreError::Rejected("invalid input".into())),
        1 | 3.. => Ok(batch.len() as u64),
        _ => Err(StoreError::Unavailable("connection reset".into())),
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
