//! How many rows one statement carries: enough that the round trip is a small share of it.
//!
//! A flush's statements cost `fixed + rows × per_row` each, where `fixed` is what a
//! statement costs whatever its size (the network's round trip, two behind a transaction
//! pooler, which adds its own hop; parsing) and
//! `per_row` is the server's work. At `batch_size` rows (500) a 0.1 ms loopback round trip
//! is nothing, but a 2.5 ms one halves the rows written per second and a 7 ms one cuts them
//! to a third, so a backlog drains at the distance's pace instead of the server's.
//!
//! So for a store that takes more than `batch_size` rows a call
//! ([`Capabilities::with_max_batch_rows`](crate::Capabilities::with_max_batch_rows)), [`StatementSize`] fits `fixed`
//! and `per_row` to the statements that succeeded (least squares, recent ones weighted
//! more) and sizes the next so that the fixed cost is at most a tenth of it:
//! `rows = 9 × fixed / per_row`, within `[batch_size, max_batch_rows]`. Measured on the
//! injected clock, like every other duration, so tests drive it deterministically.
//!
//! Statements of one size cannot tell the two costs apart, so while a backlog lasts and the
//! sizes seen do not spread enough, every fourth statement is a probe of three quarters of
//! the size. A flush of one statement's rows is never split to probe, so a batcher that
//! keeps up sends exactly what it sent before.
//!
//! It only groups rows into statements; what is written, and the lock order, do not
//! change. A canceled statement (a timeout, a lock) forgets the fit and starts again at
//! `batch_size`: a bigger statement holds its row locks longer and is costlier to split.

use std::time::Duration;

/// The fixed cost may be at most one part in `1 + ROWS_PER_FIXED` of a statement's time:
/// a tenth, so statements run at 90 % of the server's own pace or better.
const ROWS_PER_FIXED: f64 = 9.0;

/// Each new statement's weight against the ones before: about the last 20 count.
const DECAY: f64 = 0.95;

/// Statements of one size tell nothing of how time grows with rows: the sizes fitted must
/// spread by at least this share of their mean.
const MIN_SPREAD: f64 = 0.05;

/// While the sizes seen do not spread enough, every this many statements of a backlog is a
/// probe of three quarters of the size: enough spread to fit, for a few percent more round
/// trips. A flush of one statement's rows is never split to probe.
const PROBE_EVERY: u32 = 4;

/// The rows of the next statement, from the statements before it.
#[derive(Debug, Clone)]
pub(crate) struct StatementSize {
    min: usize,
    max: usize,
    rows: usize,
    /// Whether the last fit failed for want of spread: then statements probe.
    probing: bool,
    /// Statements sized since the last probe.
    since_probe: u32,
    /// Decayed sums over (rows, seconds) of the successful statements.
    weight: f64,
    sum_x: f64,
    sum_y: f64,
    sum_xx: f64,
    sum_xy: f64,
}

impl StatementSize {
    /// Statements of `batch_size` rows, growing up to `max_rows` when the store takes them.
    pub(crate) fn new(batch_size: usize, max_rows: Option<usize>) -> Self {
        let min = batch_size.max(1);
        StatementSize {
            min,
            max: max_rows.unwrap_or(min).max(min),
            rows: min,
            probing: true,
            since_probe: 0,
            weight: 0.0,
            sum_x: 0.0,
            sum_y: 0.0,
            sum_xx: 0.0,
            sum_xy: 0.0,
        }
    }

    /// How many rows the next statement carries, of `remaining` still to write.
    pub(crate) fn next_rows(&mut self, remaining: usize) -> usize {
        if remaining <= self.rows || self.max == self.min {
            return remaining.min(self.rows);
        }
        self.since_probe += 1;
        if self.probing && self.since_probe >= PROBE_EVERY {
            self.since_probe = 0;
            // At least one row: at `batch_size(1)` three quarters would be an empty statement.
            return (self.rows * 3 / 4).max(1);
        }
        self.rows
    }

    /// A statement of `rows` rows succeeded in `took`.
    pub(crate) fn observe(&mut self, rows: usize, took: Duration) {
        if self.max == self.min {
            return;
        }
        let (x, y) = (rows as f64, took.as_secs_f64());
        self.weight = self.weight * DECAY + 1.0;
        self.sum_x = self.sum_x * DECAY + x;
        self.sum_y = self.sum_y * DECAY + y;
        self.sum_xx = self.sum_xx * DECAY + x * x;
        self.sum_xy = self.sum_xy * DECAY + x * y;
        let fitted = self.fitted();
        self.probing = fitted.is_none();
        if let Some(rows) = fitted {
            self.rows = rows;
        }
    }

    /// A statement was canceled: back to `batch_size`, and learn again.
    pub(crate) fn reset(&mut self) {
        *self = StatementSize::new(self.min, Some(self.max));
    }

    /// The size the fit asks for, or `None` while the statements seen cannot tell the fixed
    /// cost from the cost per row (too few, or all of one size).
    fn fitted(&self) -> Option<usize> {
        let n = self.weight;
        let mean_x = self.sum_x / n;
        let variance = self.sum_xx / n - mean_x * mean_x;
        if n < 3.0 || variance <= (MIN_SPREAD * mean_x).powi(2) {
            return None;
        }
        let per_row = (self.sum_xy / n - mean_x * self.sum_y / n) / variance;
        let fixed = self.sum_y / n - per_row * mean_x;
        let rows = if fixed <= 0.0 {
            // Time grows with rows alone: bigger statements buy nothing.
            self.min as f64
        } else if per_row <= 0.0 {
            self.max as f64
        } else {
            ROWS_PER_FIXED * fixed / per_row
        };
        Some((rows as usize).clamp(self.min, self.max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds statements costing `fixed + rows × per_row` of the sizes the sizer asks for,
    /// from a backlog that never runs out.
    fn settle(size: &mut StatementSize, fixed: Duration, per_row: Duration) -> usize {
        for _ in 0..200 {
            let rows = size.next_rows(usize::MAX);
            size.observe(rows, fixed + per_row * rows as u32);
        }
        size.rows
    }

    #[test]
    fn a_round_trip_grows_statements_until_it_is_a_tenth_of_each() {
        let per_row = Duration::from_micros(6);
        let mut size = StatementSize::new(500, Some(50_000));
        assert_eq!(size.rows, 500);
        // 7 ms fixed: 9 × 7 ms / 6 µs = 10,500 rows.
        let rows = settle(&mut size, Duration::from_millis(7), per_row);
        assert!((10_000..=11_000).contains(&rows), "{rows}");
        // On loopback (0.2 ms) the fit asks for 300: batch_size stays the floor.
        let mut size = StatementSize::new(500, Some(50_000));
        assert_eq!(settle(&mut size, Duration::from_micros(200), per_row), 500);
        // A slow store with a fixed cost and no cost per row: as big as it takes.
        let mut size = StatementSize::new(500, Some(50_000));
        assert_eq!(
            settle(&mut size, Duration::from_millis(50), Duration::ZERO),
            50_000
        );
    }

    #[test]
    fn a_probe_at_batch_size_one_still_carries_a_row() {
        let mut size = StatementSize::new(1, Some(1_000));
        for _ in 0..50 {
            let rows = size.next_rows(100);
            assert!(rows >= 1, "an empty statement");
            // Every statement costs the same: no fit, so the sizer keeps probing.
            size.observe(rows, Duration::from_millis(1));
        }
    }

    #[test]
    fn one_size_only_or_no_room_keeps_batch_size_and_a_cancel_starts_over() {
        let mut size = StatementSize::new(500, Some(50_000));
        for _ in 0..50 {
            // Flushes of exactly one statement: never split to probe, nothing to fit.
            assert_eq!(size.next_rows(500), 500);
            size.observe(500, Duration::from_millis(10));
        }
        assert_eq!(size.rows, 500, "all of one size: nothing to fit");
        let mut size = StatementSize::new(500, None);
        assert_eq!(
            settle(
                &mut size,
                Duration::from_millis(7),
                Duration::from_micros(6)
            ),
            500
        );
        let mut size = StatementSize::new(500, Some(50_000));
        settle(
            &mut size,
            Duration::from_millis(7),
            Duration::from_micros(6),
        );
        size.reset();
        assert_eq!(size.rows, 500);
    }
}
