//! [`PgBouncer`]: a throwaway pgbouncer in transaction mode, in front of a given server.
//!
//! The binary comes from `PGBOUNCER` (scripts/test sets it from scripts/ensure-pgbouncer,
//! which installs the distribution's package as root on Debian), else `pgbouncer` on PATH
//! or /usr/sbin. The instance listens on a free port of 127.0.0.1 only (no Unix socket),
//! pools in transaction mode with a small pool (`default_pool_size`, 2 by default) and
//! trusts its clients (`auth_type = trust`: every user named in its auth file logs in
//! without a password; the server behind it authenticates pgbouncer as the URL says).
//! The pool is kept full (`min_pool_size`) and handed out round robin
//! (`server_round_robin = 1`), so one client's consecutive transactions land on different
//! server connections, as they do on a busy production pool: whatever depends on a session
//! shows at once instead of by chance.
//! Running as root, it runs as the `postgres` OS user, as pgbouncer refuses root.
//! [`PgBouncer::restart`] stops it and starts it again on the same port (the soak's
//! "pooler restart"). Dropping it kills the process and removes its files.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};

use super::scratch::{free_port, server_command, ScratchDir};

/// How long a start may take before it counts as failed.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const START_ATTEMPTS: usize = 3;
/// How long a restart waits for the safe shutdown before it kills the process.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A running pgbouncer; see the module docs.
pub struct PgBouncer {
    child: Child,
    port: u16,
    user: String,
    dir: ScratchDir,
}

impl PgBouncer {
    /// pgbouncer in transaction mode, pool size 2, in front of the server `url` names.
    pub fn start(url: &str) -> PgBouncer {
        PgBouncer::with_pool_size(url, 2)
    }

    /// The same with `default_pool_size = pool_size`.
    pub fn with_pool_size(url: &str, pool_size: u32) -> PgBouncer {
        PgBouncer::with_settings(url, pool_size, "")
    }

    /// The same, with `extra` (`key = value` lines) after the shared settings: pgbouncer
    /// takes the last value of a key, so these override them.
    pub fn with_settings(url: &str, pool_size: u32, extra: &str) -> PgBouncer {
        let config: postgres::Config = url.parse().expect("a valid server URL");
        let (host, port) = match (config.get_hosts().first(), config.get_ports().first()) {
            (Some(postgres::config::Host::Tcp(host)), port) => {
                (host.clone(), port.copied().unwrap_or(5432))
            }
            _ => panic!("PgBouncer needs a TCP server URL, got {url}"),
        };
        let user = config.get_user().unwrap_or("postgres").to_owned();
        let password = config
            .get_password()
            .map(|password| format!(" password={}", String::from_utf8_lossy(password)))
            .unwrap_or_default();
        let binary = binary();
        let mut dir = ScratchDir::new("pgbouncer");
        dir.write("userlist.txt", format!("\"{user}\" \"\"\n"), 0o600);
        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            let listen_port = free_port();
            let ini = super::pgbouncer_ini::pgbouncer_ini(
                (&host, port),
                &user,
                &password,
                listen_port,
                pool_size,
                dir.path(),
            ) + extra;
            let ini_path = dir.write("pgbouncer.ini", ini, 0o600);
            let child = spawn(&binary, &ini_path);
            let mut bouncer = PgBouncer {
                child,
                port: listen_port,
                user: user.clone(),
                dir,
            };
            match bouncer.wait_ready() {
                Ok(()) => return bouncer,
                Err(err) => {
                    last_failure = format!("{err}\n{}", bouncer.log());
                    let _ = bouncer.child.kill();
                    let _ = bouncer.child.wait();
                    // Take the directory back for the next attempt without removing it.
                    dir = std::mem::replace(&mut bouncer.dir, ScratchDir::new("pgbouncer"));
                }
            }
        }
        panic!("could not start pgbouncer: {last_failure}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `dbname` through this pooler.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://{}@127.0.0.1:{}/{dbname}", self.user, self.port)
    }

    /// A plain session through the pooler.
    pub fn client(&self, dbname: &str, application_name: &str) -> Client {
        super::connect(&self.url(dbname), application_name)
    }

    /// Its scratch directory (config, log, pid file).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// pgbouncer's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }

    /// Stops it as `systemctl restart` would (SIGINT, pgbouncer's safe shutdown: the
    /// transactions in flight finish, then every client is disconnected; SIGKILL if it
    /// has not exited within [`STOP_TIMEOUT`]), then starts it again with the same
    /// configuration on the same port, and returns once a query goes through it.
    pub fn restart(&mut self) -> Result<(), String> {
        let _ = super::scratch::signal(self.child.id(), "INT");
        let deadline = Instant::now() + STOP_TIMEOUT;
        while self
            .child
            .try_wait()
            .map_err(|err| err.to_string())?
            .is_none()
        {
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            // Polling a child's exit: std offers no wait with a timeout.
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child = spawn(&binary(), &self.dir.path().join("pgbouncer.ini"));
        self.wait_ready()
            .map_err(|err| format!("pgbouncer restart: {err}\n{}", self.log()))
    }

    /// Polls (the pooler offers nothing to block on) until a query goes through.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut config: postgres::Config = self.url("postgres").parse().expect("url");
        config.connect_timeout(Duration::from_secs(2));
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("pgbouncer exited at start: {status}"));
            }
            let last = match config.connect(NoTls) {
                Ok(mut client) => match client.simple_query("SELECT 1") {
                    Ok(_) => return Ok(()),
                    Err(err) => err.to_string(),
                },
                Err(err) => err.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(format!("pgbouncer not ready in {READY_TIMEOUT:?}: {last}"));
            }
            // Polling a starting pgbouncer with a login: it offers nothing to block on.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // `dir` removes the files when it is dropped, right after this.
    }
}

/// pgbouncer on `ini`, as the server's OS user when running as root.
fn spawn(binary: &std::path::Path, ini: &std::path::Path) -> Child {
    server_command(binary)
        .arg(ini)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|err| panic!("start {}: {err}", binary.display()))
}

/// The pgbouncer binary: `PGBOUNCER`, else on PATH, else /usr/sbin (Debian's place).
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PGBOUNCER") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("pgbouncer"));
    on_path
        .chain([
            "/usr/sbin/pgbouncer".into(),
            "/usr/local/sbin/pgbouncer".into(),
        ])
        .find(|path| path.exists())
        .unwrap_or_else(|| {
            panic!(
                "pgbouncer not found: run scripts/ensure-pgbouncer (it installs the \
                 distribution's package as root on Debian), or set PGBOUNCER=/path/to/pgbouncer"
            )
        })
}
