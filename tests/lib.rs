//! The end-to-end harness: real iSCSI targets driven by real initiators.
//!
//! Every end-to-end test (and the side-by-side benchmark in `benches/iscsi/`) follows one shape:
//!
//! ```text
//!   Lun::start(TargetKind, size)          the system under test: a target process on 127.0.0.1:<free port>
//!        |  IscsiUrl (portal, IQN, LUN)      serving one LUN backed by a sparse file in a temp dir
//!        v
//!   a real initiator                      iscsi-test-cu (libiscsi), qemu-img / qemu-storage-daemon, fio
//!        |
//!        v
//!   checks on what came back              CUnit report, byte-for-byte comparison, fsck, fio verify
//! ```
//!
//! [`TargetKind`] is the only place that knows how to start a particular target: Debian's `tgtd` (the reference
//! peer the harness was validated against) or `basalt serve-file`. A replicated volume (`basalt volume up`)
//! becomes one more variant and every test and benchmark runs against it unchanged.
//!
//! Processes are owned by [`Daemon`] guards that stop them (and their process group) on drop, so a failing
//! assertion never leaks a target, a FUSE export, a loop device or a mount. Missing tools are errors that name
//! the tool and say to run `./tests/setup.sh`: an end-to-end test never silently skips.

use std::ffi::OsStr;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

// The harness's parts live under harness/ so they are not mistaken for test targets (the files next to
// this one are the end-to-end tests themselves).
#[path = "harness/csi.rs"]
pub mod csi;
#[path = "harness/cunit.rs"]
pub mod cunit;
#[path = "harness/fault/mod.rs"]
pub mod fault;
#[path = "harness/fio.rs"]
pub mod fio;
#[path = "harness/helm.rs"]
pub mod helm;
#[path = "harness/host.rs"]
pub mod host;
#[path = "harness/netns.rs"]
pub mod netns;
#[path = "harness/volume.rs"]
pub mod volume;

/// Every error the harness reports. Messages say what failed, where, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(
        "required tool `{tool}` is not usable ({why}); run ./tests/setup.sh to install the end-to-end tools"
    )]
    ToolMissing { tool: String, why: String },
    #[error("could not {action}: {source}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}):\n{output}")]
    CommandFailed {
        command: String,
        status: ExitStatus,
        output: String,
    },
    #[error("{what} failed: {reason}\n--- log of {what} ({log_path}) ---\n{log}", log_path = log_path.display())]
    Daemon {
        what: String,
        reason: String,
        log_path: PathBuf,
        log: String,
    },
    #[error("could not build the `basalt` binary: {0}")]
    BasaltBuild(String),
    #[error("could not parse the output of {what}: {detail}")]
    Parse { what: String, detail: String },
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout { what: String, waited: Duration },
}

pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

/// Wraps an `io::Error` with the action that failed, e.g. `io("create /tmp/x")`.
pub fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let action = action.into();
    move |source| HarnessError::Io { action, source }
}

/// A size in bytes (LUN sizes, image sizes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(u64);

impl ByteSize {
    pub const fn bytes_exact(n: u64) -> Self {
        ByteSize(n)
    }
    pub const fn kib(n: u64) -> Self {
        ByteSize(n << 10)
    }
    pub const fn mib(n: u64) -> Self {
        ByteSize(n << 20)
    }
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1 << 20) {
            write!(f, "{} MiB", self.0 >> 20)
        } else {
            write!(f, "{} bytes", self.0)
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------------------------

/// Finds `tool` on `PATH` (or takes it as a path), or says how to install it.
pub fn require_tool(tool: &str) -> Result<PathBuf> {
    let candidate = Path::new(tool);
    if candidate.components().count() > 1 {
        return if is_executable(candidate) {
            Ok(candidate.to_path_buf())
        } else {
            Err(HarnessError::ToolMissing {
                tool: tool.into(),
                why: "no such executable".into(),
            })
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| is_executable(p))
        .ok_or_else(|| HarnessError::ToolMissing {
            tool: tool.into(),
            why: "not found on PATH".into(),
        })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Where tests/setup.sh installs fio built with the libiscsi engine (Debian's fio has none).
pub const DEFAULT_FIO_LIBISCSI: &str = "/usr/local/bin/fio-libiscsi";

/// fio with the libiscsi engine: `$FIO_LIBISCSI`, else [`DEFAULT_FIO_LIBISCSI`]. Checked, not assumed.
pub fn fio_libiscsi() -> Result<PathBuf> {
    let fio = std::env::var("FIO_LIBISCSI").unwrap_or_else(|_| DEFAULT_FIO_LIBISCSI.into());
    let fio = require_tool(&fio)?;
    let probe = Command::new(&fio)
        .arg("--enghelp=libiscsi")
        .output()
        .map_err(io(format!("run {fio:?}")))?;
    if !probe.status.success() {
        return Err(HarnessError::ToolMissing {
            tool: fio.display().to_string(),
            why: "this fio has no libiscsi engine".into(),
        });
    }
    Ok(fio)
}

/// Runs a command to completion; a non-zero exit is an error carrying its stdout and stderr.
pub fn run_checked(cmd: &mut Command) -> Result<Output> {
    let command = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("start `{command}`")))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(HarnessError::CommandFailed {
            command,
            status: out.status,
            output: format!(
                "--- stdout ---\n{}\n--- stderr ---\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }
}

/// `program arg arg...` for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------------------------
// Ports and processes
// ---------------------------------------------------------------------------------------------------------------

/// A free TCP port on 127.0.0.1, chosen by the kernel, and never the same one twice in one test process:
/// the kernel may hand a just-released port out again, and the tests of one binary run side by side, each
/// binding its ports only later (a daemon started after the pick, a container's published port). Between
/// processes (other test binaries, other engineers' tests) a collision needs another process to bind the
/// same port in the instant between our probe and our daemon's bind.
pub fn free_port() -> Result<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io("bind 127.0.0.1:0"))?;
        let port = listener
            .local_addr()
            .map_err(io("read a listener's address"))?
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
}

/// A free 127.0.0.1 address.
/// `n` consecutive ports that are free now, below the kernel's ephemeral range (which outgoing
/// connections use), picked at random so that concurrent tests rarely meet.
pub fn free_port_range(n: u16) -> (u16, u16) {
    for _ in 0..1000 {
        let first = 20000 + rand::random::<u16>() % 10000;
        let all_free = (first..first + n)
            .all(|p| std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, p)).is_ok());
        if all_free {
            return (first, first + n - 1);
        }
    }
    panic!("no {n} consecutive free ports between 20000 and 30000");
}

pub fn free_local_addr() -> Result<SocketAddr> {
    Ok(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::LOCALHOST,
        free_port()?,
    )))
}

/// How a [`Daemon`] is stopped.
/// Makes the child that `cmd` starts get SIGKILL when the thread that starts it dies: a harness
/// killed outright, or failing out of a phase, leaves no load running against a target that is gone
/// (a forgotten fio ran at ~95 % of a core for an hour and skewed the next measurements).
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[derive(Clone, Copy, Debug)]
pub enum StopPolicy {
    /// SIGTERM, then SIGKILL if it is still running after `grace` (daemons that flush on exit).
    Terminate { grace: Duration },
    /// SIGKILL at once (tgtd ignores SIGTERM; its data is already in the backing file's page cache).
    Kill,
}

/// A long-running child process (target, FUSE export) that is stopped when the guard drops.
///
/// The child runs in its own process group, so stopping it also stops anything it forked, and with
/// `PR_SET_PDEATHSIG` so it dies with the test process even when the test process is killed outright.
pub struct Daemon {
    what: String,
    child: Child,
    log_path: PathBuf,
    stop: StopPolicy,
}

impl Daemon {
    /// Spawns `cmd` with stdout and stderr appended to `<log_dir>/<what>.log`.
    pub fn spawn(what: &str, mut cmd: Command, log_dir: &Path, stop: StopPolicy) -> Result<Daemon> {
        let log_path = log_dir.join(format!("{what}.log"));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("open {}", log_path.display())))?;
        let log2 = log.try_clone().map_err(io("duplicate a log file descriptor"))?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2).process_group(0);
        die_with_parent(&mut cmd);
        let command = describe(&cmd);
        let child = cmd.spawn().map_err(io(format!("start {what}: `{command}`")))?;
        Ok(Daemon {
            what: what.into(),
            child,
            log_path,
            stop,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the daemon has printed so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// [`Daemon::log`] without its colour codes, for finding `key=value` fields in it.
    pub fn plain_log(&self) -> String {
        let mut plain = String::new();
        let mut in_escape = false;
        for c in self.log().chars() {
            match (in_escape, c) {
                (false, '\u{1b}') => in_escape = true,
                (true, 'm') => in_escape = false,
                (true, _) => {}
                (false, c) => plain.push(c),
            }
        }
        plain
    }

    fn failure(&self, reason: String) -> HarnessError {
        HarnessError::Daemon {
            what: self.what.clone(),
            reason,
            log_path: self.log_path.clone(),
            log: self.log(),
        }
    }

    /// An error if the daemon has exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait().map_err(io(format!("poll {}", self.what)))? {
            None => Ok(()),
            Some(status) => Err(self.failure(format!("exited unexpectedly ({status})"))),
        }
    }

    /// Waits until `addr` accepts TCP connections, failing early if the daemon exits. Polls every 5 ms:
    /// a refused connect on loopback costs microseconds, and benchmarks time a daemon's start with it.
    pub fn wait_for_port(&mut self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        let what = format!("to accept connections on {addr}");
        self.wait_until_every(&what, timeout, Duration::from_millis(5), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
    }

    /// Polls `ready` every 50 ms until it holds, failing early if the daemon exits.
    pub fn wait_until(&mut self, what: &str, timeout: Duration, ready: impl FnMut() -> bool) -> Result<()> {
        self.wait_until_every(what, timeout, Duration::from_millis(50), ready)
    }

    fn wait_until_every(
        &mut self,
        what: &str,
        timeout: Duration,
        interval: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<()> {
        let start = Instant::now();
        loop {
            if ready() {
                return Ok(());
            }
            self.check_running()?;
            if start.elapsed() > timeout {
                return Err(self.failure(format!("did not get ready {what} within {timeout:?}")));
            }
            thread::sleep(interval);
        }
    }

    /// Waits up to `timeout` for the process to exit by itself; `None` if it is still running.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().map_err(io(format!("poll {}", self.what)))? {
                return Ok(Some(status));
            }
            if start.elapsed() > timeout {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the daemon now (see [`StopPolicy`]) and returns how it ended.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.stop_now()
    }

    fn stop_now(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait().map_err(io(format!("poll {}", self.what)))? {
            return Ok(status);
        }
        let pgid = -(self.child.id() as libc::pid_t);
        if let StopPolicy::Terminate { grace } = self.stop {
            // SAFETY: plain syscall on our own child's process group.
            unsafe { libc::kill(pgid, libc::SIGTERM) };
            let start = Instant::now();
            while start.elapsed() < grace {
                if let Some(status) = self.child.try_wait().map_err(io(format!("poll {}", self.what)))? {
                    return Ok(status);
                }
                thread::sleep(Duration::from_millis(20));
            }
            // Worth knowing: a daemon that ignores SIGTERM loses the chance to flush, and costs the grace time.
            eprintln!(
                "harness: {} did not exit within {grace:?} of SIGTERM; killing it",
                self.what
            );
        }
        // SAFETY: as above.
        unsafe { libc::kill(pgid, libc::SIGKILL) };
        self.child.wait().map_err(io(format!("wait for {}", self.what)))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(e) = self.stop_now() {
            eprintln!("harness: stopping {}: {e}", self.what);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The basalt binary
// ---------------------------------------------------------------------------------------------------------------

/// The `basalt` binary, built once per test process with the same cargo profile as the running test.
///
/// `CARGO_BIN_EXE_basalt` exists only inside the `basalt` (cli) crate, so we ask cargo to build it into the same
/// target directory (`build/<profile>/basalt`); cargo releases its build lock before it runs tests. Set
/// `BASALT_BIN` to use a binary built elsewhere.
pub fn basalt_binary() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| build_basalt().map_err(|e| e.to_string()))
        .clone()
        .map_err(HarnessError::BasaltBuild)
}

/// The volume secret every volume the harness starts shares (replicas, controllers, probes), given
/// through the environment as `basalt volume up` does. A fixed value: each test's volume has its own UUID,
/// and the secret only has to be the same on both sides.
pub const TEST_VOLUME_SECRET: &str = "basalt-e2e-test-volume-secret";
/// The management API token of every controller the harness starts.
pub const TEST_API_TOKEN: &str = "basalt-e2e-test-api-token";

/// Attaches the harness's API token to a gRPC call (the controller refuses calls without it): the
/// interceptor of every management API client a test or benchmark opens itself.
pub type AddApiToken = fn(tonic::Request<()>) -> std::result::Result<tonic::Request<()>, tonic::Status>;

/// The [`AddApiToken`] interceptor: `authorization: Bearer TEST_API_TOKEN`.
pub fn add_api_token(
    mut request: tonic::Request<()>,
) -> std::result::Result<tonic::Request<()>, tonic::Status> {
    let value = format!("Bearer {TEST_API_TOKEN}")
        .parse()
        .map_err(|_| tonic::Status::internal("the test API token is not a header value"))?;
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

/// A `basalt` command with the harness's volume secret and API token in its environment
/// (`BASALT_VOLUME_SECRET`, `BASALT_API_TOKEN`): what every role and every CLI call needs.
pub fn basalt_command() -> Result<Command> {
    let mut cmd = Command::new(basalt_binary()?);
    cmd.env("BASALT_VOLUME_SECRET", TEST_VOLUME_SECRET)
        .env("BASALT_API_TOKEN", TEST_API_TOKEN);
    Ok(cmd)
}

fn build_basalt() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("BASALT_BIN") {
        return require_tool(&bin.to_string_lossy());
    }
    let exe = std::env::current_exe().map_err(io("find the running test's executable"))?;
    // Test binaries live in <target-dir>/<profile>/deps, binaries in <target-dir>/<profile>.
    let mut profile_dir = exe.parent().unwrap_or(Path::new(".")).to_path_buf();
    if profile_dir.file_name() == Some(OsStr::new("deps")) {
        profile_dir.pop();
    }
    let profile = match profile_dir.file_name().and_then(OsStr::to_str) {
        Some("debug") => "dev".to_string(),
        Some(name) => name.to_string(),
        None => {
            return Err(HarnessError::BasaltBuild(format!(
                "no profile directory above {}",
                exe.display()
            )))
        }
    };
    let target_dir = profile_dir.parent().unwrap_or(Path::new(".")).to_path_buf();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args([
            "build",
            "--quiet",
            "-p",
            "basalt",
            "--bin",
            "basalt",
            "--profile",
            &profile,
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    run_checked(&mut cmd)?;
    let bin = profile_dir.join("basalt");
    require_tool(&bin.to_string_lossy())
}

// ---------------------------------------------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------------------------------------------

/// The IQN prefix Basalt uses; tgt fixtures use it too so URLs differ only in port and LUN.
pub const IQN_PREFIX: &str = "iqn.2026-11.io.basalt";

/// How long a target may take to accept connections. Generous: two cores are shared by parallel builds.
const TARGET_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a LUN is: `iscsi://<portal>/<iqn>/<lun>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IscsiUrl {
    pub portal: SocketAddr,
    pub iqn: String,
    pub lun: u16,
}

impl IscsiUrl {
    /// `iscsi://ADDR:PORT/IQN/LUN`, as `volume inspect` shows it; panics (fails the test) on anything else.
    pub fn parse(text: &str) -> IscsiUrl {
        let rest = text
            .strip_prefix("iscsi://")
            .unwrap_or_else(|| panic!("{text:?} is not an iSCSI URL"));
        let mut parts = rest.splitn(3, '/');
        let mut next = || {
            parts
                .next()
                .unwrap_or_else(|| panic!("{text:?} is not iscsi://PORTAL/IQN/LUN"))
        };
        IscsiUrl {
            portal: next()
                .parse()
                .unwrap_or_else(|e| panic!("{text:?}: bad portal: {e}")),
            iqn: next().to_string(),
            lun: next()
                .parse()
                .unwrap_or_else(|e| panic!("{text:?}: bad LUN: {e}")),
        }
    }

    /// The form fio's libiscsi engine wants: colons escaped, since fio splits `--filename` on ':'.
    pub fn fio_filename(&self) -> String {
        self.to_string().replace(':', "\\:")
    }

    /// qemu `--blockdev` options for this LUN through qemu's iSCSI driver.
    pub fn qemu_blockdev(&self, node_name: &str) -> String {
        format!(
            "driver=iscsi,transport=tcp,portal={},target={},lun={},node-name={node_name},cache.direct=on",
            self.portal, self.iqn, self.lun
        )
    }
}

impl fmt::Display for IscsiUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "iscsi://{}/{}/{}", self.portal, self.iqn, self.lun)
    }
}

/// Which iSCSI target serves a [`Lun`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TargetKind {
    /// Debian's tgt (`tgtd`), rdwr backing store on a sparse file: the reference peer.
    Tgt,
    /// `basalt serve-file`: Basalt's iSCSI target over a sparse file (thin: UNMAP punches holes).
    BasaltServeFile,
    /// A replicated Basalt volume with one replica: `basalt replica` + `basalt controller` processes
    /// ([`volume::Cluster`]), the replica on its own sparse directory. Shows what replication costs over
    /// loopback TCP before there is anything to replicate to.
    BasaltVolume1,
    /// A replicated Basalt volume with three replicas (majority two), each on its own directory.
    BasaltVolume3,
}

impl TargetKind {
    pub const ALL: [TargetKind; 4] = [
        TargetKind::Tgt,
        TargetKind::BasaltServeFile,
        TargetKind::BasaltVolume1,
        TargetKind::BasaltVolume3,
    ];

    /// Short name used on command lines and in reports.
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Tgt => "tgt",
            TargetKind::BasaltServeFile => "basalt",
            TargetKind::BasaltVolume1 => "basalt-r1",
            TargetKind::BasaltVolume3 => "basalt-r3",
        }
    }

    /// How many replicas a replicated-volume target has; `None` for targets over one plain file.
    pub fn replicas(self) -> Option<usize> {
        match self {
            TargetKind::Tgt | TargetKind::BasaltServeFile => None,
            TargetKind::BasaltVolume1 => Some(1),
            TargetKind::BasaltVolume3 => Some(3),
        }
    }

    pub fn from_name(name: &str) -> Option<TargetKind> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Checks that everything this target needs is installed or buildable (done before creating files).
    pub fn require(self) -> Result<()> {
        match self {
            TargetKind::Tgt => {
                require_tool("tgtd")?;
                require_tool("tgtadm")?;
            }
            TargetKind::BasaltServeFile | TargetKind::BasaltVolume1 | TargetKind::BasaltVolume3 => {
                basalt_binary()?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for TargetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One LUN served by a running target over a sparse backing file in its own temp dir. Dropping it stops the
/// target and removes the files.
///
/// For a replicated volume ([`TargetKind::replicas`]) the "server" is the controller and the replicas are a
/// [`volume::Cluster`] that outlives controller restarts: [`Lun::restart`] restarts only the controller, as an
/// upgrade or a controller failover would.
pub struct Lun {
    kind: TargetKind,
    size: ByteSize,
    backing: PathBuf,
    url: IscsiUrl,
    /// The controller's management API (replicated volumes only).
    api: Option<SocketAddr>,
    // Field order is drop order: the server (controller) stops before the replicas, and everything before
    // its directory disappears.
    server: Option<Daemon>,
    cluster: Option<volume::Cluster>,
    dir: TempDir,
}

impl Lun {
    /// The target name every fixture serves (`iqn.2026-11.io.basalt:e2e`).
    pub const NAME: &'static str = "e2e";

    /// Creates a sparse backing file of `size` and starts `kind` serving it on a free 127.0.0.1 port.
    pub fn start(kind: TargetKind, size: ByteSize) -> Result<Lun> {
        kind.require()?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("basalt-e2e-{kind}-"))
            .tempdir()
            .map_err(io("create a temp dir for a LUN"))?;
        let backing = dir.path().join("lun.img");
        let file = File::create(&backing).map_err(io(format!("create {}", backing.display())))?;
        file.set_len(size.bytes())
            .map_err(io(format!("size {}", backing.display())))?;
        let placeholder = IscsiUrl {
            portal: free_local_addr()?,
            iqn: String::new(),
            lun: 0,
        };
        let mut lun = Lun {
            kind,
            size,
            backing,
            url: placeholder,
            api: None,
            server: None,
            cluster: None,
            dir,
        };
        lun.launch()?;
        Ok(lun)
    }

    pub fn kind(&self) -> TargetKind {
        self.kind
    }

    pub fn size(&self) -> ByteSize {
        self.size
    }

    pub fn url(&self) -> &IscsiUrl {
        &self.url
    }

    /// The file the target serves. A replicated volume has no single file: this is the first replica's
    /// directory.
    pub fn backing_file(&self) -> &Path {
        &self.backing
    }

    /// The process id of the target (the controller, for a replicated volume), e.g. to sample its memory.
    pub fn server_pid(&self) -> Option<u32> {
        self.server.as_ref().map(Daemon::pid)
    }

    /// The controller's management API address (`basalt volume info --api`); `None` for plain-file targets.
    pub fn volume_api(&self) -> Option<SocketAddr> {
        self.api
    }

    /// A scratch directory that lives as long as the LUN (images, exports, mount points).
    pub fn scratch_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The target's log, for failure messages.
    pub fn server_log(&self) -> String {
        self.server.as_ref().map(Daemon::log).unwrap_or_default()
    }

    /// Stops the target and starts it again on the same backing file (on a new port: the old one may linger
    /// in TIME_WAIT). Whatever was acknowledged before the stop must be readable after.
    pub fn restart(&mut self) -> Result<()> {
        if let Some(server) = self.server.take() {
            server.stop()?;
        }
        self.launch()
    }

    /// Errors if the target process has died (e.g. crashed under a test).
    pub fn check_running(&mut self) -> Result<()> {
        match self.server.as_mut() {
            Some(server) => server.check_running(),
            None => Err(HarnessError::Daemon {
                what: self.kind.to_string(),
                reason: "is not running".into(),
                log_path: self.dir.path().into(),
                log: String::new(),
            }),
        }
    }

    fn launch(&mut self) -> Result<()> {
        let portal = free_local_addr()?;
        let log_dir = self.dir.path().to_path_buf();
        let iqn = format!("{IQN_PREFIX}:{}", Lun::NAME);
        match self.kind {
            TargetKind::Tgt => {
                // One tgtd per fixture, each with its own control socket. tgtd takes control "ports" below
                // 32768 only; our portals come from the ephemeral range (32768 and up), so the low 15 bits
                // are unique among live fixtures. A clash would fail loudly ("another tgtd is using ...").
                let control = (portal.port() & 0x7fff).to_string();
                let mut cmd = Command::new("tgtd");
                cmd.args(["-f", "-C", &control, "--iscsi", &format!("portal={portal}")]);
                let mut server = Daemon::spawn("tgtd", cmd, &log_dir, StopPolicy::Kill)?;
                server.wait_for_port(portal, TARGET_START_TIMEOUT)?;
                let tgtadm = |args: &[&str]| {
                    let mut cmd = Command::new("tgtadm");
                    cmd.args(["-C", &control, "--lld", "iscsi"]).args(args);
                    run_checked(&mut cmd)
                };
                let backing = self.backing.to_string_lossy().into_owned();
                tgtadm(&["--op", "new", "--mode", "target", "--tid", "1", "-T", &iqn])?;
                // tgt reserves LUN 0 for its controller device; the disk is LUN 1.
                tgtadm(&[
                    "--op",
                    "new",
                    "--mode",
                    "logicalunit",
                    "--tid",
                    "1",
                    "--lun",
                    "1",
                    "--bstype",
                    "rdwr",
                    "-b",
                    &backing,
                ])?;
                tgtadm(&["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"])?;
                self.url = IscsiUrl { portal, iqn, lun: 1 };
                self.server = Some(server);
            }
            TargetKind::BasaltServeFile => {
                let mut cmd = basalt_command()?;
                cmd.arg("serve-file")
                    .arg("--file")
                    .arg(&self.backing)
                    .args(["--iscsi", &portal.to_string(), "--name", Lun::NAME])
                    .args(["--size", &self.size.bytes().to_string()]);
                let mut server = Daemon::spawn(
                    "basalt-serve-file",
                    cmd,
                    &log_dir,
                    StopPolicy::Terminate {
                        grace: Duration::from_secs(10),
                    },
                )?;
                server.wait_for_port(portal, TARGET_START_TIMEOUT)?;
                self.url = IscsiUrl { portal, iqn, lun: 0 };
                self.server = Some(server);
            }
            TargetKind::BasaltVolume1 | TargetKind::BasaltVolume3 => {
                // The replicas start once and survive controller restarts; only the controller is (re)launched.
                let cluster = match &mut self.cluster {
                    Some(cluster) => cluster,
                    None => {
                        let n = self.kind.replicas().unwrap_or(1);
                        let cluster = volume::Cluster::start(n, self.size)?;
                        self.backing = cluster.replicas[0].dir.clone();
                        self.cluster.insert(cluster)
                    }
                };
                let controller = cluster.start_controller(&[])?;
                let mut server = controller.daemon;
                server.wait_for_port(controller.url.portal, TARGET_START_TIMEOUT)?;
                self.url = controller.url;
                self.api = Some(controller.api);
                self.server = Some(server);
            }
        }
        Ok(())
    }
}

/// Random bytes (for images and file contents).
pub fn random_bytes(len: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut buf = vec![0u8; len];
    rand::rng().fill_bytes(&mut buf);
    buf
}

/// Reads a whole file, with the path in the error.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut buf))
        .map_err(io(format!("read {}", path.display())))?;
    Ok(buf)
}

/// Waits for `what` with a deadline (for conditions that are not tied to one daemon).
pub fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !ready() {
        if start.elapsed() > timeout {
            return Err(HarnessError::Timeout {
                what: what.into(),
                waited: timeout,
            });
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The container image `images/build.sh` builds from the test's own `basalt` binary, tagged by the binary's
/// content (`basalt:agent-e2e-CRC`) so that concurrent builds never clash; built once, reused after.
pub fn agent_image() -> Result<String> {
    let bin = basalt_binary()?;
    let tag = format!("basalt:agent-e2e-{:08x}", crc32fast::hash(&read_file(&bin)?));
    let have = Command::new("docker")
        .args(["image", "inspect", &tag])
        .output()
        .map_err(io("run docker image inspect"))?;
    if !have.status.success() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/build.sh");
        run_checked(Command::new(script).env("BASALT_BIN", &bin).args(["--tag", &tag]))?;
    }
    Ok(tag)
}
