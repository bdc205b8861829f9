//! The network in front of the servers: one TCP proxy (`tests/pg/proxy.rs`) per target, all
//! in a child process of their own, so that the soak's process holds the fleet and little
//! else and its RSS is the fleet's (the proxies run two threads and two sockets per
//! connection, thousands of connections an hour; their memory is sampled apart).
//!
//! The child is this same binary run as `soak --proxies ADDR...`. It prints the ports it
//! listens on, one line, then takes one command a line on stdin and answers `ok` once it is
//! in force: `black-hole` (every connection, open and new), `heal`, `latency MS` (one way,
//! each chunk). It ends when its stdin closes, so it never outlives the soak.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM};

use super::pg::Proxy;

/// The flag that makes the soak's binary the proxies' process.
pub const CHILD_FLAG: &str = "--proxies";

/// The proxies' process, seen from the soak.
pub struct Proxies {
    child: Child,
    commands: BufWriter<ChildStdin>,
    answers: BufReader<ChildStdout>,
    ports: Vec<u16>,
}

impl Proxies {
    /// A proxy in front of each of `targets`, in that order, in a process of their own.
    pub fn start(targets: &[SocketAddr]) -> Result<Proxies, String> {
        let binary = std::env::current_exe().map_err(|err| format!("the soak's binary: {err}"))?;
        let mut child = Command::new(binary)
            .arg(CHILD_FLAG)
            .args(targets.iter().map(SocketAddr::to_string))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|err| format!("starting the proxies' process: {err}"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("the proxies' process has no pipes".into());
        };
        let mut proxies = Proxies {
            child,
            commands: BufWriter::new(stdin),
            answers: BufReader::new(stdout),
            ports: Vec::new(),
        };
        let line = proxies.answer()?;
        proxies.ports = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|err| format!("the proxies' ports {line:?}: {err}"))?;
        if proxies.ports.len() != targets.len() {
            return Err(format!("the proxies' process listens on {line:?}"));
        }
        Ok(proxies)
    }

    /// The port of the proxy in front of `targets[index]`.
    pub fn port(&self, index: usize) -> u16 {
        self.ports[index]
    }

    /// The process id, for its resources.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every connection stops forwarding, sockets left open; new ones are held.
    pub fn black_hole(&mut self) -> Result<(), String> {
        self.command("black-hole")
    }

    pub fn heal(&mut self) -> Result<(), String> {
        self.command("heal")
    }

    /// Every chunk held `one_way` before it is forwarded, either way.
    pub fn set_latency(&mut self, one_way: Duration) -> Result<(), String> {
        self.command(&format!("latency {}", one_way.as_millis()))
    }

    fn command(&mut self, command: &str) -> Result<(), String> {
        writeln!(self.commands, "{command}")
            .and_then(|()| self.commands.flush())
            .map_err(|err| format!("proxies: sending {command:?}: {err}"))?;
        match self.answer()?.as_str() {
            "ok" => Ok(()),
            other => Err(format!("proxies: {command:?} answered {other:?}")),
        }
    }

    fn answer(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.answers.read_line(&mut line) {
            Ok(0) => Err("the proxies' process ended".into()),
            Ok(_) => Ok(line.trim().to_owned()),
            Err(err) => Err(format!("reading from the proxies' process: {err}")),
        }
    }
}

impl Drop for Proxies {
    fn drop(&mut self) {
        // Its stdin closing ends it; the kill is for a child that does not read it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child's side: serves the proxies until stdin closes.
pub fn serve(targets: &[String]) -> ExitCode {
    // A Ctrl-C reaches the whole process group: the soak ends its run on it, and still
    // needs the proxies for its last checks, so they ignore it (the flag is never read).
    for signal in [SIGINT, SIGTERM] {
        if let Err(err) = signal_hook::flag::register(signal, Arc::new(AtomicBool::new(false))) {
            eprintln!("soak {CHILD_FLAG}: handling signal {signal}: {err}");
        }
    }
    let proxies: Vec<Proxy> = match targets
        .iter()
        .map(|target| target.parse::<SocketAddr>().map(Proxy::start))
        .collect()
    {
        Ok(proxies) => proxies,
        Err(err) => {
            eprintln!("soak {CHILD_FLAG}: a target is not an address: {err}");
            return ExitCode::from(2);
        }
    };
    let ports: Vec<String> = proxies.iter().map(|p| p.port().to_string()).collect();
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{}", ports.join(" ")).is_err() {
        return ExitCode::FAILURE;
    }
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let mut words = line.split_whitespace();
        match (words.next(), words.next().map(str::parse::<u64>)) {
            (Some("black-hole"), None) => proxies.iter().for_each(Proxy::black_hole_all),
            (Some("heal"), None) => proxies.iter().for_each(Proxy::heal_all),
            (Some("latency"), Some(Ok(ms))) => proxies
                .iter()
                .for_each(|proxy| proxy.set_latency(Duration::from_millis(ms))),
            _ => {
                let _ = writeln!(out, "unknown command {line:?}");
                continue;
            }
        }
        if writeln!(out, "ok").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    ExitCode::SUCCESS
}
