//! The service example (`examples/service.rs`) as a process a test drives: its binary,
//! built once per test run, started on a port the OS picks, talked to over HTTP, and
//! stopped with a signal or killed when the test ends first.
//!
//! How the binary is found: `CARGO_BIN_EXE_<name>` exists only for `[[bin]]` targets, and an
//! example found under `target/` may be missing or stale (`cargo test --test service`
//! builds no examples). So the test asks cargo, once per run: `$CARGO build --example
//! service --message-format=json` with this test's profile and features, and takes the
//! binary's path from cargo's own `compiler-artifact` message instead of guessing the
//! layout of the target directory. Cargo releases its build lock before it runs the tests,
//! so the nested build does not wait for the outer one; when the example is up to date it
//! costs one fingerprint check.
//!
//! Nothing here sleeps. The service logs `listening addr=...` once it accepts connections,
//! with the port the OS gave it: reading that line is both the readiness signal and the
//! port, so there is neither a readiness poll nor a race for a free port. Every wait (the
//! build, the start, each request, the exit) has a limit, and the process is killed if a
//! test fails before it exits.
#![allow(dead_code)] // each test binary uses its own part

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use crate::pg;

/// The nested `cargo build`: compiling the example from cold on a busy 2-core machine
/// takes a minute or two; waiting on another cargo's lock may add to it.
const BUILD_LIMIT: Duration = Duration::from_secs(600);
/// From spawn to the `listening` line: connecting to PostgreSQL and creating the table.
const START_LIMIT: Duration = Duration::from_secs(60);
/// From SIGTERM to the exit: `close()` is bounded by the final flush timeout (15 s).
pub const EXIT_LIMIT: Duration = Duration::from_secs(60);
/// One HTTP request, connect to last byte.
const REQUEST_LIMIT: Duration = Duration::from_secs(30);

/// The feature flags this test was built with, for the nested build: the same set (`default`
/// counts as a feature of its own) reuses the library already compiled for the test
/// instead of compiling another variant of it and of its dependencies.
const FEATURE_FLAGS: &[&str] = if cfg!(feature = "default") {
    &[]
} else if cfg!(feature = "tls") {
    &["--no-default-features", "--features", "postgres,tls"]
} else {
    &["--no-default-features", "--features", "postgres"]
};

pub fn client() -> ureq::Agent {
    ureq::Agent::config_builder()
        // A 4xx or 5xx is an answer to check, not an error.
        .http_status_as_error(false)
        .timeout_global(Some(REQUEST_LIMIT))
        .build()
        .into()
}

pub fn answer(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, String) {
    let mut response = result.expect("an HTTP answer");
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().expect("a text body");
    (status, body)
}

pub fn post(http: &ureq::Agent, url: &str, body: &str) -> (u16, String) {
    answer(
        http.post(url)
            .header("Content-Type", "application/json")
            .send(body),
    )
}

pub fn put(http: &ureq::Agent, url: &str, body: &str) -> (u16, String) {
    answer(
        http.put(url)
            .header("Content-Type", "application/json")
            .send(body),
    )
}

pub fn get(http: &ureq::Agent, url: &str) -> (u16, String) {
    answer(http.get(url).call())
}

/// `/metrics` as a map from series (name and labels, as printed) to value.
pub fn scrape(http: &ureq::Agent, service: &Service) -> HashMap<String, f64> {
    let (status, text) = get(http, &service.url("/metrics"));
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The example's binary, built once per test run.
fn service_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(build_service)
}

fn build_service() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    // What cargo set for this test process describes this package to it; passed on, build
    // scripts that watch these (ring's does) would be rerun and everything above them rebuilt,
    // by this build and again by the next `cargo test`.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
            ]
            .contains(&name.as_ref())
        {
            build.env_remove(name.as_ref());
        }
    }
    let build = build
        .args(["build", "--example", "service", "--message-format=json"])
        .args([
            "--manifest-path",
            concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
        ])
        .args(FEATURE_FLAGS)
        .args(["--profile", &profile()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cargo to build the service example");
    let pid = build.id();
    let (send, done) = mpsc::channel();
    thread::spawn(move || {
        let _ = send.send(build.wait_with_output());
    });
    let output = match done.recv_timeout(BUILD_LIMIT) {
        Ok(output) => output.expect("wait for cargo"),
        Err(_) => {
            let _ = pg::scratch::signal(pid, "KILL");
            panic!("cargo build --example service took more than {BUILD_LIMIT:?}");
        }
    };
    assert!(
        output.status.success(),
        "cargo build --example service failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| {
            message["reason"] == "compiler-artifact" && message["target"]["name"] == "service"
        })
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .expect("cargo named the service example's executable")
}

/// The cargo profile this test was built with, from the directory it runs from
/// (`target/<dir>/deps/`): `debug` is the `dev` profile, other profiles use their name.
fn profile() -> String {
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = exe
        .parent()
        .filter(|deps| deps.ends_with("deps"))
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .and_then(|name| name.to_str());
    match dir {
        Some("debug") | None => "dev".to_owned(),
        Some(name) => name.to_owned(),
    }
}

/// The service, running; killed on drop if a test ends before it exits.
pub struct Service {
    child: Child,
    addr: String,
    /// Its stderr, line by line, from a thread that reads it so the pipe never fills.
    lines: mpsc::Receiver<String>,
    /// Every line read so far: printed when a test fails.
    log: Vec<String>,
    exited: bool,
}

impl Service {
    /// Starts the service on 127.0.0.1 with a port the OS picks, with `env` beside a clean
    /// environment (no `DATABASE_URL` unless given: in memory), and waits until it listens.
    pub fn start(env: &[(&str, &str)], args: &[&str]) -> Service {
        let mut child = Command::new(service_binary())
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("LISTEN_DATABASE_URL")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the service");
        let stderr = child.stderr.take().expect("piped stderr");
        let (send, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let mut service = Service {
            child,
            addr: String::new(),
            lines,
            log: Vec::new(),
            exited: false,
        };
        let listening = service.wait_for_line("listening", START_LIMIT);
        service.addr = field(&listening, "addr").to_owned();
        service
    }

    /// Where it listens: `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn signal(&self, name: &str) {
        pg::scratch::signal(self.child.id(), name).expect("signal the service");
    }

    /// Reads the log until a line contains `needle`; returns that line.
    pub fn wait_for_line(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("the service logged no {needle:?} within {limit:?}")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("the service ended its log before {needle:?}")
                }
            }
        }
    }

    /// Waits until the service exits (its stderr closes); returns its status and the log.
    pub fn wait_for_exit(&mut self) -> (ExitStatus, Vec<String>) {
        let deadline = Instant::now() + EXIT_LIMIT;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => self.log.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("the service did not exit within {EXIT_LIMIT:?}")
                }
            }
        }
        // Its stderr is closed, so it has exited (it starts no processes that could hold it).
        let status = self.child.wait().expect("wait for the service");
        self.exited = true;
        (status, self.log.clone())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            self.log.extend(self.lines.try_iter());
            eprintln!("--- the service's log ---\n{}", self.log.join("\n"));
        }
    }
}

/// The `close report` line of the log.
pub fn close_report(log: &[String]) -> String {
    log.iter()
        .find(|line| line.contains("close report"))
        .cloned()
        .unwrap_or_else(|| panic!("no close report in the log:\n{}", log.join("\n")))
}

/// The value of `name=value` in a log line.
pub fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let start = line
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
        + name.len()
        + 2;
    line[start..].split(' ').next().unwrap_or_default()
}
