//! [`Pooler`]: a throwaway PgBouncer in transaction mode in front of a server, for running
//! the examples through a transaction pooler without setting one up by hand.
//!
//! Configured as the tests' (`tests/pg/pgbouncer.rs`): it listens on a free port of
//! 127.0.0.1 only (no Unix socket), pools in transaction mode, keeps its pool full and hands
//! it out round robin (`min_pool_size`, `server_round_robin = 1`), so consecutive
//! transactions of one client land on different server connections as on a busy production
//! pool, and it trusts its clients (`auth_type = trust`; the server behind it authenticates
//! PgBouncer as the URL says). The binary comes from `scripts/ensure-pgbouncer` (which
//! honours `PGBOUNCER`, and as root on Debian installs the distribution's package). As root
//! it runs as the `postgres` OS user, since PgBouncer refuses root. Dropping it kills the
//! process and removes its directory.

#![allow(dead_code)] // each example uses a different part

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a start may take before it counts as failed.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// A free port can be taken by someone else before PgBouncer binds it: try again.
const START_ATTEMPTS: usize = 3;
/// How often a start is polled: PgBouncer offers nothing to block on until it answers.
const READY_POLL: Duration = Duration::from_millis(50);
const ENSURE_PGBOUNCER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ensure-pgbouncer");

/// A running PgBouncer; see the module docs.
pub struct Pooler {
    child: Child,
    port: u16,
    user: String,
    dir: PathBuf,
}

impl Pooler {
    /// PgBouncer in transaction mode with `pool_size` server connections per database,
    /// in front of the server `server_url` names (a URL with one TCP host).
    pub fn start(server_url: &str, pool_size: u32) -> Result<Pooler, String> {
        let (host, port) = super::pg_url::host_port(server_url)?;
        let (user, password) = credentials(server_url)?;
        let binary = binary()?;
        let server_user = server_user()?;
        let dir =
            std::env::temp_dir().join(format!("mb-examples-pgbouncer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(|err| format!("mkdir {}: {err}", dir.display()))?;
        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            let listen_port = free_port()?;
            let password = password
                .as_deref()
                .map_or(String::new(), |password| format!(" password={password}"));
            let ini = super::pgbouncer_ini::pgbouncer_ini(
                (&host, port),
                &user,
                &password,
                listen_port,
                pool_size,
                &dir,
            );
            write(
                &dir.join("userlist.txt"),
                &format!("\"{user}\" \"\"\n"),
                server_user,
            )?;
            let ini_path = dir.join("pgbouncer.ini");
            write(&ini_path, &ini, server_user)?;
            chown(&dir, server_user)?;
            let mut command = Command::new(&binary);
            // `/`, which every user can enter; the crate's directory may not be.
            command.current_dir("/").arg(&ini_path);
            if let Some((uid, gid)) = server_user {
                command.uid(uid).gid(gid);
            }
            let child = command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|err| format!("starting {}: {err}", binary.display()))?;
            let mut pooler = Pooler {
                child,
                port: listen_port,
                user: user.clone(),
                dir: dir.clone(),
            };
            match pooler.wait_ready() {
                Ok(()) => return Ok(pooler),
                Err(err) => {
                    last_failure = format!("{err}\n{}", pooler.log());
                    let _ = pooler.child.kill();
                    let _ = pooler.child.wait();
                    // Keep the directory for the next attempt: forget this one's drop.
                    std::mem::forget(pooler);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        Err(format!("could not start pgbouncer: {last_failure}"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `database` through this pooler.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/{database}",
            self.user, self.port
        )
    }

    /// PgBouncer's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }

    /// Polls with a login and a query until one goes through.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut config: postgres::Config = self
            .url("postgres")
            .parse()
            .map_err(|err| format!("the pooler's URL: {err}"))?;
        config.connect_timeout(Duration::from_secs(2));
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("pgbouncer exited at start: {status}"));
            }
            let last = match config.connect(postgres::NoTls) {
                Ok(mut client) => match client.simple_query("SELECT 1") {
                    Ok(_) => return Ok(()),
                    Err(err) => server_words(&err),
                },
                Err(err) => server_words(&err),
            };
            if Instant::now() >= deadline {
                return Err(format!("pgbouncer not ready in {READY_TIMEOUT:?}: {last}"));
            }
            std::thread::sleep(READY_POLL);
        }
    }
}

impl Drop for Pooler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The server's (or PgBouncer's) message: a `postgres::Error` alone displays "db error".
fn server_words(err: &postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => err.to_string(),
    }
}

/// The user (default `postgres`) and password the URL logs in with, as written in it.
fn credentials(url: &str) -> Result<(String, Option<String>), String> {
    let rest = url
        .split_once("://")
        .map(|(_, rest)| rest)
        .ok_or("expected a URL (postgres://user@host:port/database)")?;
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let Some((userinfo, _)) = authority.rsplit_once('@') else {
        return Ok(("postgres".into(), None));
    };
    Ok(match userinfo.split_once(':') {
        Some((user, password)) => (user.to_owned(), Some(password.to_owned())),
        None => (userinfo.to_owned(), None),
    })
}

/// `PGBOUNCER`, else the binary scripts/ensure-pgbouncer names (it installs one where it
/// may), else `pgbouncer` where the distributions put it (a packaged crate has no scripts).
fn binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("PGBOUNCER").filter(|path| !path.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    if !Path::new(ENSURE_PGBOUNCER).exists() {
        return [
            "/usr/sbin/pgbouncer",
            "/usr/local/sbin/pgbouncer",
            "/usr/local/bin/pgbouncer",
        ]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .ok_or_else(|| {
            "pgbouncer not found; install it or set PGBOUNCER=/path/to/pgbouncer".into()
        });
    }
    let output = Command::new(ENSURE_PGBOUNCER)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|err| format!("running {ENSURE_PGBOUNCER}: {err}"))?;
    let path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if !output.status.success() || path.is_empty() {
        return Err(format!(
            "{ENSURE_PGBOUNCER} found no pgbouncer (see its message above); set PGBOUNCER=/path/to/pgbouncer"
        ));
    }
    Ok(PathBuf::from(path))
}

/// The `postgres` OS user's uid and gid when we run as root (PgBouncer refuses root);
/// `None` otherwise.
fn server_user() -> Result<Option<(u32, u32)>, String> {
    let id = |args: &[&str]| -> String {
        Command::new("id")
            .args(args)
            .output()
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    if id(&["-u"]) != "0" {
        return Ok(None);
    }
    match (
        id(&["-u", "postgres"]).parse(),
        id(&["-g", "postgres"]).parse(),
    ) {
        (Ok(uid), Ok(gid)) => Ok(Some((uid, gid))),
        _ => Err(
            "running as root, and pgbouncer refuses root: it would run as the `postgres` \
                  OS user, which does not exist here"
                .into(),
        ),
    }
}

fn write(path: &Path, contents: &str, owner: Option<(u32, u32)>) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, contents).map_err(|err| format!("write {}: {err}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|err| format!("chmod {}: {err}", path.display()))?;
    chown(path, owner)
}

fn chown(path: &Path, owner: Option<(u32, u32)>) -> Result<(), String> {
    match owner {
        Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(|err| format!("chown {}: {err}", path.display())),
        None => Ok(()),
    }
}

/// A port on 127.0.0.1 that was free a moment ago; the caller retries when it was taken.
fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|err| format!("bind 127.0.0.1:0: {err}"))
}
