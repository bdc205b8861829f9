//! [`Cluster`]: a throwaway PostgreSQL cluster of one test's own, for the faults no test may
//! inflict on the shared server: restarts, `stop -m immediate`, SIGSTOP of the postmaster or
//! of a backend, exhausted connection slots, a TLS-only `pg_hba.conf`.
//!
//! `initdb --no-sync -A trust` into a scratch directory, then `pg_ctl start` on a free port of
//! 127.0.0.1, with fsync off and small buffers: about a second to a ready server. Dropping it
//! resumes anything stopped, stops it with `-m immediate`, kills what is left and removes the
//! directory, also when the test panicked.
//!
//! [`Cluster::standby_of`] and [`Cluster::rebuild_as_standby_of`] make streaming standbys
//! with `pg_basebackup -R`; [`super::replication`] pairs them into a primary and a
//! synchronous standby that can fail over again and again.
//!
//! The admin client ([`Cluster::admin`]) connects over the Unix socket in the scratch
//! directory, so it works whatever `pg_hba.conf` says about TCP (the TLS cluster refuses
//! plaintext TCP).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};

use super::scratch::{free_port, pg_bindir, server_command, signal, ScratchDir};

/// How long `pg_ctl` may wait for a start, stop or restart: a crash recovery on a loaded
/// machine (the soak's, at 50,000 rows/s on 2 shared cores) replayed WAL for over 30 s.
const PG_CTL_TIMEOUT_SECONDS: u32 = 120;
/// How many free ports to try before giving up (another process may take the one we picked).
const START_ATTEMPTS: usize = 3;

/// How to set up a [`Cluster`]; [`Cluster::start`] takes the defaults.
#[derive(Default, Clone)]
pub struct ClusterOptions {
    /// Lines appended to postgresql.conf, after the harness's own (so they win).
    pub conf: Vec<String>,
    /// The whole pg_hba.conf; `None`: trust for everyone on the Unix socket and 127.0.0.1.
    pub hba: Option<String>,
    /// `max_connections`, with no slot reserved for superusers, so that this many sessions
    /// of any user exhaust the server. `None`: 20.
    pub max_connections: Option<u32>,
    /// Files written into the data directory before the first start: (name, contents, mode).
    pub files: Vec<(String, Vec<u8>, u32)>,
}

/// A running throwaway cluster; see the module docs.
pub struct Cluster {
    dir: ScratchDir,
    data: PathBuf,
    port: u16,
    /// Backends stopped with SIGSTOP, resumed on drop.
    stopped_backends: Vec<u32>,
    postmaster_stopped: bool,
}

impl Cluster {
    /// A cluster with the default options, started and ready.
    pub fn start_new() -> Cluster {
        Cluster::with_options(ClusterOptions::default())
    }

    /// A cluster set up by `options`, started and ready.
    pub fn with_options(options: ClusterOptions) -> Cluster {
        let dir = ScratchDir::new("cluster");
        let data = dir.path().join("data");
        run(server_command(pg_bindir().join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"]));
        let max_connections = options.max_connections.unwrap_or(20);
        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_owned(),
            format!("unix_socket_directories = '{}'", dir.path().display()),
            format!("max_connections = {max_connections}"),
            "superuser_reserved_connections = 0".to_owned(),
            "fsync = off".to_owned(),
            "synchronous_commit = off".to_owned(),
            "full_page_writes = off".to_owned(),
            "shared_buffers = 16MB".to_owned(),
            "autovacuum = off".to_owned(),
            "max_wal_senders = 0".to_owned(),
            "wal_level = minimal".to_owned(),
            "log_min_messages = warning".to_owned(),
        ];
        conf.extend(options.conf.iter().cloned());
        append(&data.join("postgresql.conf"), &conf.join("\n"));
        let hba = options
            .hba
            .clone()
            .unwrap_or_else(|| "local all all trust\nhost all all 127.0.0.1/32 trust\n".to_owned());
        std::fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        for (name, contents, mode) in &options.files {
            write_server_file(&dir, &format!("data/{name}"), contents, *mode);
        }
        Cluster::start_on_a_free_port(dir, data, "a throwaway cluster", |cluster| {
            append(
                &cluster.data.join("postgresql.conf"),
                &format!("port = {}", cluster.port),
            )
        })
    }

    /// Starts the cluster in `data`, on a free port of 127.0.0.1, after `prepare` (which
    /// sees the port) has set it up; tries again on another port when the start fails.
    fn start_on_a_free_port(
        dir: ScratchDir,
        data: PathBuf,
        what: &str,
        prepare: impl Fn(&Cluster),
    ) -> Cluster {
        let mut cluster = Cluster {
            dir,
            data,
            port: 0,
            stopped_backends: Vec::new(),
            postmaster_stopped: false,
        };
        let mut last_failure = String::new();
        for _ in 0..START_ATTEMPTS {
            cluster.port = free_port();
            prepare(&cluster);
            let output = cluster.pg_ctl(&["start"]);
            if output.status.success() {
                return cluster;
            }
            last_failure = format!("{}\n{}", describe(&output), cluster.log());
        }
        panic!("could not start {what}: {last_failure}");
    }

    /// A streaming standby of `primary` (`pg_basebackup -R`), started and ready: its own
    /// scratch directory and port, the primary's settings. See [`super::replication`].
    pub fn standby_of(primary: &Cluster) -> Cluster {
        let dir = ScratchDir::new("cluster");
        let data = dir.path().join("data");
        Cluster::start_on_a_free_port(dir, data, "a standby", |cluster| {
            cluster.base_backup_from(primary)
        })
    }

    /// Stops this cluster at once, replaces its data with a base backup of `primary` and
    /// starts it again as `primary`'s streaming standby, on the same port: the old primary
    /// of a failover rejoining as the new standby, so a URL that lists both stays valid.
    pub fn rebuild_as_standby_of(&mut self, primary: &Cluster) {
        self.resume_all();
        // It may already be down (a crash) or frozen and resumed above: either way, down.
        let _ = self.pg_ctl(&["-m", "immediate", "stop"]);
        self.base_backup_from(primary);
        self.must(&["start"]);
    }

    /// `pg_ctl promote`, waiting until the standby accepts writes.
    pub fn promote(&self) {
        self.must(&["promote"]);
    }

    /// Whether the server is a standby (`pg_is_in_recovery()`).
    pub fn is_in_recovery(&self) -> bool {
        self.admin()
            .query_one("SELECT pg_is_in_recovery()", &[])
            .expect("pg_is_in_recovery")
            .get(0)
    }

    /// Replaces the data directory with `pg_basebackup -R` of `primary` (over TCP, so the
    /// standby's `primary_conninfo` names the primary's port), on this cluster's port and
    /// socket directory.
    fn base_backup_from(&self, primary: &Cluster) {
        if self.data.exists() {
            std::fs::remove_dir_all(&self.data)
                .unwrap_or_else(|err| panic!("remove {}: {err}", self.data.display()));
        }
        run(server_command(pg_bindir().join("pg_basebackup"))
            .arg("-D")
            .arg(&self.data)
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"])
            .arg("-d")
            .arg(format!(
                "host=127.0.0.1 port={} user=postgres application_name=mb-standby",
                primary.port
            )));
        // The copied postgresql.conf names the primary's port and socket: later lines win.
        append(
            &self.data.join("postgresql.conf"),
            &format!(
                "port = {}\nunix_socket_directories = '{}'",
                self.port,
                self.dir.path().display()
            ),
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`, over TCP.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The same, for database `dbname`.
    pub fn url_for(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    /// The scratch directory (also the Unix socket's directory).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// A superuser session over the Unix socket, named `mb-test admin`.
    pub fn admin(&self) -> Client {
        self.socket_client("postgres", "mb-test admin")
    }

    /// A session of `user` on `dbname` over the Unix socket.
    pub fn socket_client(&self, dbname: &str, application_name: &str) -> Client {
        let mut config = postgres::Config::new();
        config
            .host_path(self.dir.path())
            .port(self.port)
            .user("postgres")
            .dbname(dbname)
            .application_name(application_name)
            .connect_timeout(Duration::from_secs(5));
        config
            .connect(NoTls)
            .unwrap_or_else(|err| panic!("admin connection to the throwaway cluster: {err:?}"))
    }

    /// Creates database `name` and applies the crate's migration in it.
    pub fn create_migrated_db(&self, name: &str) -> String {
        self.admin()
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("CREATE DATABASE");
        let mut client = self.socket_client(name, "mb-test migrate");
        metadata_batcher::postgres::migrate(&mut client).expect("migrate");
        self.url_for(name)
    }

    /// `pg_ctl restart -m fast`: sessions end, the server is back and ready on return.
    pub fn restart(&mut self) {
        self.resume_all();
        self.must(&["-m", "fast", "restart"]);
    }

    /// `pg_ctl stop -m immediate`: every process exits at once, as in a crash.
    pub fn stop_immediate(&mut self) {
        self.resume_all();
        self.must(&["-m", "immediate", "stop"]);
    }

    /// `pg_ctl start` after a stop; ready on return (crash recovery included).
    pub fn start(&mut self) {
        self.must(&["start"]);
    }

    /// The postmaster's pid, from postmaster.pid.
    pub fn postmaster_pid(&self) -> u32 {
        let pid_file = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .expect("read postmaster.pid: is the cluster running?");
        pid_file
            .lines()
            .next()
            .and_then(|line| line.trim().parse().ok())
            .expect("a pid on postmaster.pid's first line")
    }

    /// SIGSTOPs the postmaster: running sessions go on, new connections are accepted by the
    /// kernel but never answered.
    pub fn sigstop_postmaster(&mut self) {
        signal(self.postmaster_pid(), "STOP").expect("SIGSTOP the postmaster");
        self.postmaster_stopped = true;
    }

    pub fn sigcont_postmaster(&mut self) {
        signal(self.postmaster_pid(), "CONT").expect("SIGCONT the postmaster");
        self.postmaster_stopped = false;
    }

    /// SIGSTOPs the whole server, postmaster and every child (backends, walsenders,
    /// checkpointer ...): a machine that froze, not one that died. Sessions stay open and
    /// never answer; new connections are accepted by the kernel and never answered.
    /// Resumed on drop, or by [`thaw`](Self::thaw).
    pub fn freeze(&mut self) {
        let postmaster = self.postmaster_pid();
        self.sigstop_postmaster();
        for pid in children(postmaster) {
            if signal(pid, "STOP").is_ok() {
                self.stopped_backends.push(pid);
            }
        }
    }

    /// Resumes a [`freeze`](Self::freeze).
    pub fn thaw(&mut self) {
        self.resume_all();
    }

    /// The pids of the backends named `application_name`.
    pub fn backend_pids(&self, application_name: &str) -> Vec<u32> {
        self.admin()
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                &[&application_name],
            )
            .expect("pg_stat_activity")
            .iter()
            .map(|row| row.get::<_, i32>(0) as u32)
            .collect()
    }

    /// SIGSTOPs every backend named `application_name` (there must be one): its session
    /// stays open but never answers. Returns the pids.
    pub fn sigstop_backend(&mut self, application_name: &str) -> Vec<u32> {
        let pids = self.backend_pids(application_name);
        assert!(!pids.is_empty(), "no backend named {application_name:?}");
        for &pid in &pids {
            signal(pid, "STOP").expect("SIGSTOP a backend");
            self.stopped_backends.push(pid);
        }
        pids
    }

    /// Resumes every backend stopped with [`sigstop_backend`](Self::sigstop_backend).
    pub fn sigcont_backends(&mut self) {
        for pid in self.stopped_backends.drain(..) {
            // The backend may have exited meanwhile (a terminated session): nothing to do.
            let _ = signal(pid, "CONT");
        }
    }

    /// The server's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn resume_all(&mut self) {
        self.sigcont_backends();
        if self.postmaster_stopped {
            let _ = signal(self.postmaster_pid(), "CONT");
            self.postmaster_stopped = false;
        }
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        server_command(pg_bindir().join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(["-w", "-t", &PG_CTL_TIMEOUT_SECONDS.to_string()])
            .args(args)
            .output()
            .expect("run pg_ctl")
    }

    fn must(&self, args: &[&str]) {
        let output = self.pg_ctl(args);
        assert!(
            output.status.success(),
            "pg_ctl {args:?}: {}\n{}",
            describe(&output),
            self.log()
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.resume_all();
        let stopped = self.pg_ctl(&["-m", "immediate", "stop"]);
        if !stopped.status.success() && self.data.join("postmaster.pid").exists() {
            // pg_ctl could not stop it (it should always can): kill the postmaster, whose
            // children exit when it is gone.
            let _ = signal(self.postmaster_pid(), "KILL");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Command::new("kill")
                .args(["-0", &self.postmaster_pid().to_string()])
                .output()
                .is_ok_and(|output| output.status.success())
                && Instant::now() < deadline
            {
                // Polling the kernel for the process's exit; there is nothing to block on.
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // `dir` (a ScratchDir) removes the files when it is dropped, right after this.
    }
}

/// The pids of `parent`'s children, from /proc.
fn children(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split
            // after its closing parenthesis.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let after = &stat[stat.rfind(')')? + 1..];
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

fn run(command: &mut Command) {
    let output = command.output().expect("run a PostgreSQL program");
    assert!(
        output.status.success(),
        "{command:?}: {}",
        describe(&output)
    );
}

fn describe(output: &Output) -> String {
    format!(
        "{}; stdout: {}; stderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout).trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    )
}

fn append(path: &Path, lines: &str) {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|err| panic!("open {}: {err}", path.display()));
    writeln!(file, "\n{lines}").expect("append to postgresql.conf");
}

fn write_server_file(dir: &ScratchDir, name: &str, contents: &[u8], mode: u32) {
    dir.write(name, contents, mode);
}
