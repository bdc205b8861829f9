//! The source tree's shape, checked so it cannot drift back: every file under `src/` opens
//! with a `//!` saying what it is for, stays short enough to read in one sitting, and the
//! modules' `use` graph has no circle (a circle means two files are one concept, or a shared
//! piece belongs in a leaf of its own). docs/design.md, "Where things are", says why.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Past this, a file holds more than one concept; split it by concept, not by size.
const MAX_LINES: usize = 500;

/// Every `.rs` file under `src/`, by module path (`crate`, `worker`, `postgres::store`).
fn modules() -> BTreeMap<String, (PathBuf, String)> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).expect("src/ is readable") {
            let path = entry.expect("src/ is readable").path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                found.push(path);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    files
        .into_iter()
        .map(|path| {
            let relative = path.strip_prefix(&src).unwrap().with_extension("");
            let mut parts: Vec<String> = relative
                .components()
                .map(|part| part.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                parts.pop();
            }
            let name = if parts.is_empty() {
                "crate".to_owned()
            } else {
                parts.join("::")
            };
            let text = fs::read_to_string(&path).expect("source files are UTF-8");
            (name, (path, text))
        })
        .collect()
}

/// The modules `text` (of module `name`) names through `crate::` or `super::`, outside
/// comments; a doc link is not a dependency.
fn dependencies(
    name: &str,
    text: &str,
    all: &BTreeMap<String, (PathBuf, String)>,
) -> BTreeSet<String> {
    let parent = name.rsplit_once("::").map_or("", |(parent, _)| parent);
    let mut found = BTreeSet::new();
    for line in text
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
    {
        for (prefix, base) in [("crate::", ""), ("super::", parent)] {
            for (at, _) in line.match_indices(prefix) {
                let rest = &line[at + prefix.len()..];
                let first: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                let target = if base.is_empty() {
                    first
                } else {
                    format!("{base}::{first}")
                };
                // A file may name its own children (`crate::postgres::x` in postgres/y.rs is
                // a sibling, not the parent).
                if all.contains_key(&target)
                    && target != name
                    && !name.starts_with(&format!("{target}::"))
                {
                    found.insert(target);
                }
            }
        }
    }
    found
}

#[test]
fn every_source_file_says_what_it_is_for_and_stays_short() {
    let mut problems = Vec::new();
    for (name, (path, text)) in modules() {
        if !text.trim_start().starts_with("//!") {
            problems.push(format!(
                "{}: does not open with a `//!` saying what {name} is for",
                path.display()
            ));
        }
        let lines = text.lines().count();
        if lines > MAX_LINES {
            problems.push(format!(
                "{}: {lines} lines, over {MAX_LINES}: split it by concept",
                path.display()
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_module_graph_has_no_circle() {
    let all = modules();
    let graph: BTreeMap<&str, BTreeSet<String>> = all
        .iter()
        .map(|(name, (_, text))| (name.as_str(), dependencies(name, text, &all)))
        .collect();
    // Depth-first search; a module met again while still on the path closes a circle.
    fn visit<'a>(
        module: &'a str,
        graph: &'a BTreeMap<&str, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
        circles: &mut Vec<String>,
    ) {
        if let Some(at) = path.iter().position(|m| *m == module) {
            let mut circle = path[at..].to_vec();
            circle.push(module);
            circles.push(circle.join(" -> "));
            return;
        }
        if !done.insert(module) {
            return;
        }
        path.push(module);
        for next in &graph[module] {
            visit(next, graph, path, done, circles);
        }
        path.pop();
    }
    let mut circles = Vec::new();
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        visit(module, &graph, &mut Vec::new(), &mut done, &mut circles);
    }
    assert!(
        circles.is_empty(),
        "modules that depend on each other:\n{}",
        circles.join("\n")
    );
}
