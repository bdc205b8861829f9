//! What the tests' throwaway servers share: a scratch directory removed on drop, the OS user
//! a server runs as, a free port on 127.0.0.1, and where PostgreSQL's programs are.
//!
//! `initdb`, `postgres` and `pgbouncer` refuse to run as root. When the tests run as root
//! (a container, CI), the servers run as the `postgres` OS user instead, through
//! `Command::uid`/`gid` (no `runuser` or `su` in between, so the child we hold is the
//! server itself and killing it leaves no orphan). Otherwise they run as the current user.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use uuid::Uuid;

/// A directory under the system's temp dir, removed on drop: the server's (owned by the
/// server user, mode 0700) or the client's (the test process's own user: libpq refuses a
/// client key that is not the current user's or that others can read).
pub struct ScratchDir {
    path: PathBuf,
    for_server: bool,
}

impl ScratchDir {
    /// A new, empty directory named `mb-<what>-<random>`, for a server.
    pub fn new(what: &str) -> ScratchDir {
        ScratchDir::create(what, true)
    }

    /// The same, for client-side files.
    pub fn for_client(what: &str) -> ScratchDir {
        ScratchDir::create(what, false)
    }

    fn create(what: &str, for_server: bool) -> ScratchDir {
        let path = std::env::temp_dir().join(format!("mb-{what}-{}", Uuid::new_v4().simple()));
        std::fs::create_dir(&path).unwrap_or_else(|err| panic!("mkdir {}: {err}", path.display()));
        set_mode(&path, if for_server { 0o700 } else { 0o755 });
        if for_server {
            give_to_server_user(&path);
        }
        ScratchDir { path, for_server }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `name` in this directory with `mode`, owned by the directory's
    /// user.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>, mode: u32) -> PathBuf {
        write_file(
            &self.path.join(name),
            contents.as_ref(),
            mode,
            self.for_server,
        )
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_dir_all(&self.path) {
            eprintln!("could not remove {}: {err}", self.path.display());
        }
    }
}

fn write_file(path: &Path, contents: &[u8], mode: u32, for_server: bool) -> PathBuf {
    std::fs::write(path, contents).unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
    set_mode(path, mode);
    if for_server {
        give_to_server_user(path);
    }
    path.to_owned()
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|err| panic!("chmod {}: {err}", path.display()));
}

/// Chowns `path` to the server user when the tests run as root; nothing otherwise.
pub fn give_to_server_user(path: &Path) {
    if let Some((uid, gid)) = server_user() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|err| panic!("chown {}: {err}", path.display()));
    }
}

/// The `postgres` OS user's uid and gid when the tests run as root; `None` otherwise (the
/// servers then run as the current user).
pub fn server_user() -> Option<(u32, u32)> {
    static USER: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *USER.get_or_init(|| {
        if id(&["-u"]) != "0" {
            return None;
        }
        let uid = id(&["-u", "postgres"]);
        let gid = id(&["-g", "postgres"]);
        match (uid.parse(), gid.parse()) {
            (Ok(uid), Ok(gid)) => Some((uid, gid)),
            _ => panic!(
                "the tests run as root, and initdb, postgres and pgbouncer refuse to: they run \
                 as the `postgres` OS user, which does not exist here (`id postgres`: {uid:?}); \
                 install PostgreSQL (scripts/ensure-postgres) or run the tests as another user"
            ),
        }
    })
}

fn id(args: &[&str]) -> String {
    let output = Command::new("id").args(args).output().expect("run `id`");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// A command that runs as the server user (see the module docs), in `/`, which every user
/// can enter (the crate's directory may not be readable by the server user).
pub fn server_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    command.current_dir("/");
    if let Some((uid, gid)) = server_user() {
        command.uid(uid).gid(gid);
    }
    command
}

/// A port on 127.0.0.1 that was free a moment ago. Another process may take it before the
/// server binds it: callers retry their start with a new port when the bind fails.
pub fn free_port() -> u16 {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .and_then(|listener| listener.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The directory holding `initdb` and `pg_ctl`: `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/*/bin` (Debian puts only pg_config's wrapper on PATH).
pub fn pg_bindir() -> PathBuf {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR
        .get_or_init(|| {
            let from_pg_config = Command::new("pg_config")
                .arg("--bindir")
                .output()
                .ok()
                .filter(|output| output.status.success())
                .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
                .filter(|dir| dir.join("initdb").exists());
            if let Some(dir) = from_pg_config {
                return dir;
            }
            let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
                .into_iter()
                .flatten()
                .flatten()
                .map(|entry| entry.path().join("bin"))
                .filter(|dir| dir.join("initdb").exists())
                .collect();
            candidates.sort_by_key(|dir| {
                dir.parent()
                    .and_then(|version| version.file_name())
                    .and_then(|name| name.to_str())
                    .and_then(|name| name.parse::<u32>().ok())
                    .unwrap_or(0)
            });
            candidates.pop().unwrap_or_else(|| {
                panic!(
                    "initdb not found (neither `pg_config --bindir` nor /usr/lib/postgresql/*/bin); \
                     install the PostgreSQL server (scripts/ensure-postgres does on Debian)"
                )
            })
        })
        .clone()
}

/// Sends `signal` (e.g. "STOP", "CONT", "KILL") to `pid` with kill(1); errors are returned,
/// not panicked, so cleanup code can ignore a process that is already gone.
pub fn signal(pid: u32, signal: &str) -> Result<(), String> {
    let output = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .output()
        .map_err(|err| format!("run kill: {err}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}
