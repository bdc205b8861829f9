//! What the shipped Prometheus rules and Grafana dashboard (deploy/prometheus/) query: their
//! PromQL expressions, the metric names in them, and the series names an exporter's text
//! offers, so a test can check one against the other.
//!
//! The metric names come from a small PromQL lexer, not a parser: it drops strings, label
//! matchers (`{...}`), ranges (`[...]`), numbers and durations, the label lists after `by`,
//! `without`, `on`, `ignoring`, `group_left` and `group_right`, keywords, aggregations and
//! anything called like a function; what is left are metric names. That is all PromQL
//! needs for the expressions these files hold, and a name it missed would be a query it
//! could not run, which the real-Prometheus test (tests/prometheus.rs) would catch.
#![allow(dead_code)] // each test binary uses its own part

use std::collections::BTreeSet;
use std::path::PathBuf;

/// Series Prometheus writes itself, which rules may use beside the exporter's.
pub const PROMETHEUS_SERIES: &[&str] = &["up"];

/// The shipped files.
pub fn deploy_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/prometheus")
        .join(name)
}

pub const RULES_FILE: &str = "metadata-batcher.rules.yml";
pub const DASHBOARD_FILE: &str = "metadata-batcher.dashboard.json";

/// Every `expr` of the dashboard, wherever it sits in the JSON (panel targets, rows), and
/// the series of its variables' `label_values(series, label)` queries.
pub fn dashboard_queries() -> Vec<String> {
    let path = deploy_file(DASHBOARD_FILE);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("read {}: {err}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|err| panic!("{} is not JSON: {err}", path.display()));
    let mut queries = Vec::new();
    collect_exprs(&json, &mut queries);
    queries
}

fn collect_exprs(value: &serde_json::Value, into: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(expr)) => into.push(expr.clone()),
                    ("query", serde_json::Value::String(query)) => {
                        if let Some(args) = query.strip_prefix("label_values(") {
                            // The series, before the label's name.
                            let series = args.rsplit_once(',').map_or(args, |(s, _)| s);
                            into.push(series.trim().to_owned());
                        }
                    }
                    _ => collect_exprs(value, into),
                }
            }
        }
        serde_json::Value::Array(values) => values.iter().for_each(|v| collect_exprs(v, into)),
        _ => {}
    }
}

/// Every rule of the rules file as (its alert or record name, its expression). The file is
/// ours, so a line reader suffices: each rule opens with `- alert:` or `- record:`, and its
/// `expr:` is either on the line or a block (`expr: |`) of the lines indented below it.
pub fn rule_queries() -> Vec<(String, String)> {
    let path = deploy_file(RULES_FILE);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("read {}: {err}", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    let mut rules = Vec::new();
    let mut name = None;
    let mut index = 0;
    while index < lines.len() {
        let line = lines[index];
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed
            .strip_prefix("- alert:")
            .or_else(|| trimmed.strip_prefix("- record:"))
        {
            name = Some(rest.trim().to_owned());
        } else if let Some(rest) = trimmed.strip_prefix("expr:") {
            let rule = name.take().unwrap_or_else(|| {
                panic!("{}:{}: an expr outside a rule", path.display(), index + 1)
            });
            let rest = rest.trim();
            let expr = if rest == "|" || rest == ">" || rest == "|-" || rest == ">-" {
                let indent = line.len() - trimmed.len();
                let mut block = Vec::new();
                while let Some(next) = lines.get(index + 1) {
                    let next_indent = next.len() - next.trim_start().len();
                    if !next.trim().is_empty() && next_indent <= indent {
                        break;
                    }
                    block.push(next.trim());
                    index += 1;
                }
                block.join("\n")
            } else {
                rest.to_owned()
            };
            rules.push((rule, expr));
        }
        index += 1;
    }
    let declared = text
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            t.starts_with("- alert:") || t.starts_with("- record:")
        })
        .count();
    assert_eq!(rules.len(), declared, "a rule without an expr in {text}");
    rules
}

/// The names the rules file records, which its alerts and the dashboard may query too.
pub fn recorded_names() -> BTreeSet<String> {
    let path = deploy_file(RULES_FILE);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("read {}: {err}", path.display()))
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- record:"))
        .map(|name| name.trim().to_owned())
        .collect()
}

/// The series names a query may use from an exporter's text: every counter and gauge, and
/// a histogram's `_bucket`, `_sum` and `_count`.
pub fn exported_series_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        match kind {
            "histogram" | "summary" => {
                let parts: &[&str] = if kind == "histogram" {
                    &["_bucket", "_sum", "_count"]
                } else {
                    &["", "_sum", "_count"]
                };
                names.extend(parts.iter().map(|suffix| format!("{name}{suffix}")));
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

/// PromQL's aggregation operators: followed by `by (...)`, `(`, or `without (...)`.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];
/// Keywords followed by a list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "inf", "nan", "atan2",
];

/// The metric names `query` selects.
pub fn metric_names(query: &str) -> BTreeSet<String> {
    let chars: Vec<char> = query.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i);
        } else if c == '{' {
            i = skip_until(&chars, i, '}');
        } else if c == '[' {
            i = skip_until(&chars, i, ']');
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c.is_ascii_digit() || c == '.' || c == '$' {
            // A number, a duration (5m), or a dashboard variable.
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "._".contains(chars[i])) {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let called = chars.get(next) == Some(&'(');
            if LABEL_LISTS.contains(&word.as_str()) {
                if called {
                    i = skip_until(&chars, next, ')');
                }
            } else if !called
                && !AGGREGATIONS.contains(&word.as_str())
                && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str())
            {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The index after the string that opens at `start`.
fn skip_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if quote != '`' => i += 2,
            c if c == quote => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// The index after the `close` that ends what opens at `start`, strings inside skipped.
fn skip_until(chars: &[char], start: usize, close: char) -> usize {
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => i = skip_string(chars, i),
            c if c == close => return i + 1,
            _ => i += 1,
        }
    }
    i
}

#[test]
fn the_lexer_finds_the_metric_names() {
    let names = |q: &str| metric_names(q).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{job=~"x}"}[$__rate_interval])))"#
        ),
        ["a_bucket"]
    );
    assert_eq!(
        names("increase(a_total[5m]) + ignoring (x) increase(b_total[5m] offset 1h) > 0"),
        ["a_total", "b_total"]
    );
    assert_eq!(
        names("(up == 0 and on (job, instance) max_over_time(g[1h])) or w == bool 0"),
        ["g", "up", "w"]
    );
    assert_eq!(names("sum(x) without (reason) / 1e3"), ["x"]);
    assert_eq!(names("job:x:rate5m > 2 * y"), ["job:x:rate5m", "y"]);
}
