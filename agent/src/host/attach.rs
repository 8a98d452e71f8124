//! A volume's iSCSI LUN as a local block device, two ways behind one trait:
//!
//! * [`KernelIscsi`]: the kernel's initiator through `iscsiadm` (node record, login, the device under
//!   `/dev/disk/by-path/`), on hosts that have it: the production path, with the kernel's queueing.
//! * [`UserSpace`]: for hosts without an iSCSI, NBD or ublk initiator in the kernel (FUSE and loop
//!   suffice):
//!   ```text
//!   LUN ──iSCSI──► qemu-storage-daemon (qemu's iSCSI driver) ──FUSE export──► DATA_DIR/host/VOL/lun
//!       ──losetup──► /dev/loopN
//!   ```
//!   The daemon is not the agent's child in spirit: it runs on when the agent stops (a mounted
//!   filesystem keeps working while the agent restarts) and is found again by its recorded pid and
//!   start time.
//!
//! [`choose`] decides which from a [`HostProbe`] (a pure function); [`super::Host::open`] logs it.

use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::state::{AttachRecord, ProcessIdentity, StateDir, UserSpaceRecord};
use super::{mount, AttachRequest, HostError, HostResult};

/// How long a LUN may take to appear as a device: an iSCSI login, or qemu-storage-daemon's connect and
/// FUSE mount, on a busy host (two cores shared by builds).
const DEVICE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long qemu-storage-daemon may take to exit after SIGTERM: it flushes its node to the target
/// (SYNCHRONIZE CACHE) and unmounts its export first.
const DAEMON_STOP_GRACE: Duration = Duration::from_secs(20);

/// An iSCSI LUN: portal, target name, LUN number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IscsiTarget {
    pub portal: SocketAddr,
    pub iqn: String,
    pub lun: u16,
}

impl IscsiTarget {
    /// `iscsi://ADDR:PORT/IQN/LUN`, as `GET /v1/volumes/{name}` shows a volume's `iscsi_url`.
    pub fn parse_url(url: &str) -> Result<IscsiTarget, String> {
        let bad = |why: &str| format!("{url:?} is not an iSCSI URL (iscsi://ADDR:PORT/IQN/LUN): {why}");
        let rest = url
            .strip_prefix("iscsi://")
            .ok_or_else(|| bad("it does not start with iscsi://"))?;
        let mut parts = rest.splitn(3, '/');
        let portal = parts
            .next()
            .and_then(|p| p.parse::<SocketAddr>().ok())
            .ok_or_else(|| bad("the portal is not ADDR:PORT"))?;
        let iqn = parts
            .next()
            .filter(|i| is_iqn(i))
            .ok_or_else(|| bad("the target name is not an iqn"))?;
        let lun = parts
            .next()
            .and_then(|l| l.parse::<u16>().ok())
            .ok_or_else(|| bad("the LUN is not a number"))?;
        Ok(IscsiTarget {
            portal,
            iqn: iqn.to_string(),
            lun,
        })
    }

    pub fn url(&self) -> String {
        format!("iscsi://{}/{}/{}", self.portal, self.iqn, self.lun)
    }
}

/// Characters an iSCSI qualified name may hold (RFC 3720: lower case after stringprep); anything else
/// could not reach `iscsiadm` or qemu's option parser safely (a comma splits qemu options).
fn is_iqn(s: &str) -> bool {
    s.starts_with("iqn.")
        && s.len() <= 223
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.:".contains(&b))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachMethod {
    KernelIscsi,
    UserSpace,
}

impl AttachMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMethod::KernelIscsi => "the kernel iSCSI initiator (iscsiadm)",
            AttachMethod::UserSpace => "qemu-storage-daemon's FUSE export under a loop device (user space)",
        }
    }
}

impl fmt::Display for AttachMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What this host offers for attaching, as [`choose`] needs it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostProbe {
    /// `iscsiadm` is on the PATH.
    pub iscsiadm: bool,
    /// The kernel has iSCSI over TCP: `/sys/module/iscsi_tcp` exists, or `modprobe -n iscsi_tcp` finds it.
    pub iscsi_tcp: bool,
    pub qemu_storage_daemon: bool,
    /// `/dev/fuse` exists.
    pub fuse: bool,
    /// `/dev/loop-control` exists and `losetup` is on the PATH.
    pub loop_devices: bool,
}

impl HostProbe {
    pub fn this_host() -> HostProbe {
        let iscsi_tcp = Path::new("/sys/module/iscsi_tcp").exists()
            || Command::new("modprobe")
                .args(["-n", "iscsi_tcp"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        HostProbe {
            iscsiadm: on_path("iscsiadm"),
            iscsi_tcp,
            qemu_storage_daemon: on_path("qemu-storage-daemon"),
            fuse: Path::new("/dev/fuse").exists(),
            loop_devices: Path::new("/dev/loop-control").exists() && on_path("losetup"),
        }
    }
}

/// Whether `tool` is an executable file in a directory of `$PATH` (or the system directories).
pub fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .any(|dir| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(dir.join(tool))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The attach method for a host: the kernel initiator when it is complete (tool and kernel support),
/// else the user-space path when FUSE, loop devices and qemu-storage-daemon are there; else an error
/// that says what to install.
pub fn choose(probe: &HostProbe) -> Result<AttachMethod, String> {
    if probe.iscsiadm && probe.iscsi_tcp {
        return Ok(AttachMethod::KernelIscsi);
    }
    if probe.qemu_storage_daemon && probe.fuse && probe.loop_devices {
        return Ok(AttachMethod::UserSpace);
    }
    let mut missing = Vec::new();
    if !probe.qemu_storage_daemon {
        missing.push("qemu-storage-daemon (Debian: qemu-utils and qemu-block-extra)");
    }
    if !probe.fuse {
        missing.push("/dev/fuse (the fuse kernel module; fuse3)");
    }
    if !probe.loop_devices {
        missing.push("loop devices (/dev/loop-control, losetup from util-linux)");
    }
    Err(format!(
        "this host cannot attach volumes: it has no kernel iSCSI initiator (iscsiadm {}, iscsi_tcp {}; install \
         open-iscsi) and the user-space path lacks {}",
        if probe.iscsiadm { "present" } else { "missing" },
        if probe.iscsi_tcp { "present" } else { "missing" },
        missing.join(", ")
    ))
}

/// Why [`choose`] picked `method`, for the log.
pub fn why(probe: &HostProbe, method: AttachMethod) -> &'static str {
    match method {
        AttachMethod::KernelIscsi => "iscsiadm and the iscsi_tcp kernel module are present",
        AttachMethod::UserSpace if probe.iscsiadm => "iscsiadm is present but the kernel has no iscsi_tcp",
        AttachMethod::UserSpace => "the host has no kernel iSCSI initiator (no iscsiadm)",
    }
}

/// Attaches and detaches LUNs. Implementations record every step in the [`StateDir`] as they take it.
pub trait Attacher: Send + Sync {
    fn method(&self) -> AttachMethod;
    /// Make the LUN a block device; the returned record (saved) names it.
    fn attach(&self, req: &AttachRequest, state: &StateDir) -> HostResult<AttachRecord>;
    /// Flush and undo everything the record names that still exists (idempotent, best effort in order:
    /// a piece already gone is no error).
    fn detach(&self, record: &AttachRecord) -> HostResult<()>;
    /// Whether the attachment still works (its device exists, its daemon runs).
    fn is_healthy(&self, record: &AttachRecord) -> bool;
    /// Make the device show the LUN's new size (online expansion).
    fn refresh_size(&self, record: &AttachRecord, size_bytes: u64) -> HostResult<()>;
}

/// Runs `cmd`; its stderr in the error.
pub fn run(what: &str, cmd: &mut Command) -> HostResult<String> {
    let shown = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(HostError::io(format!("{what}: running `{shown}`")))?;
    if !out.status.success() {
        return Err(HostError::Command {
            what: what.to_string(),
            command: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Polls `ready` every 100 ms until it holds, `failed` says why it never will, or `timeout`.
fn wait_until(
    what: &str,
    timeout: Duration,
    mut failed: impl FnMut() -> Option<String>,
    mut ready: impl FnMut() -> bool,
) -> HostResult<()> {
    let start = Instant::now();
    loop {
        if ready() {
            return Ok(());
        }
        if let Some(why) = failed() {
            return Err(HostError::Refused(format!("{what}: {why}")));
        }
        if start.elapsed() > timeout {
            return Err(HostError::Timeout {
                what: what.to_string(),
                waited: timeout,
                hint: "is the volume's controller running and reachable?".into(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---- the kernel initiator ------------------------------------------------------------------------------------

/// The kernel's iSCSI initiator through `iscsiadm` (open-iscsi's iscsid must run).
pub struct KernelIscsi;

/// Where open-iscsi keeps the name the kernel initiator logs in as (`InitiatorName=iqn...`).
pub const KERNEL_INITIATOR_NAME_FILE: &str = "/etc/iscsi/initiatorname.iscsi";

/// The initiator name in the text of [`KERNEL_INITIATOR_NAME_FILE`]: the value of its
/// `InitiatorName=` line (comments and blank lines skipped). Every iSCSI name is an `iqn.`, `eui.` or
/// `naa.` name (RFC 3720 3.2.6.3); anything else, or no such line, is an error saying what to write.
pub fn parse_initiator_name(text: &str) -> Result<String, String> {
    let value = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix("InitiatorName="))
        .map(str::trim)
        .ok_or_else(|| "it has no InitiatorName= line".to_string())?;
    let lower = value.to_ascii_lowercase();
    let well_formed = ["iqn.", "eui.", "naa."].iter().any(|p| lower.starts_with(p))
        && value.len() <= 223
        && !value.contains([',', '='])
        && !value.chars().any(char::is_whitespace);
    if !well_formed {
        return Err(format!(
            "its InitiatorName {value:?} is not an iSCSI name (iqn.YYYY-MM.reversed.domain:unique, at most 223 characters, no commas or spaces)"
        ));
    }
    Ok(value.to_string())
}

/// The kernel initiator's name, read from [`KERNEL_INITIATOR_NAME_FILE`]. Targets that let in only the
/// node a volume is published to check this name, so a host without one cannot attach.
pub fn kernel_initiator_name() -> Result<String, String> {
    let text = std::fs::read_to_string(KERNEL_INITIATOR_NAME_FILE)
        .map_err(|e| format!("cannot read {KERNEL_INITIATOR_NAME_FILE}: {e}"))?;
    parse_initiator_name(&text).map_err(|why| {
        format!(
            "{KERNEL_INITIATOR_NAME_FILE}: {why}; open-iscsi's package writes one (or write `InitiatorName=iqn.2004-10.com.example:HOST` there and restart iscsid)"
        )
    })
}

/// The arguments of `iscsiadm` for each step, as pure functions (tested without an initiator).
pub mod iscsiadm {
    use super::IscsiTarget;

    fn node(t: &IscsiTarget) -> Vec<String> {
        vec![
            "-m".into(),
            "node".into(),
            "-T".into(),
            t.iqn.clone(),
            "-p".into(),
            t.portal.to_string(),
        ]
    }
    /// Create the node record (no discovery: the agent knows the target).
    pub fn new_node(t: &IscsiTarget) -> Vec<String> {
        let mut a = node(t);
        a.extend(["-o".into(), "new".into()]);
        a
    }
    pub fn login(t: &IscsiTarget) -> Vec<String> {
        let mut a = node(t);
        a.push("--login".into());
        a
    }
    pub fn logout(t: &IscsiTarget) -> Vec<String> {
        let mut a = node(t);
        a.push("--logout".into());
        a
    }
    pub fn delete_node(t: &IscsiTarget) -> Vec<String> {
        let mut a = node(t);
        a.extend(["-o".into(), "delete".into()]);
        a
    }
    /// Rescan the session's LUNs (a grown LUN shows its new size).
    pub fn rescan(t: &IscsiTarget) -> Vec<String> {
        let mut a = node(t);
        a.push("--rescan".into());
        a
    }
    /// The udev link of the LUN's disk: `/dev/disk/by-path/ip-ADDR:PORT-iscsi-IQN-lun-N`.
    pub fn by_path(t: &IscsiTarget) -> std::path::PathBuf {
        format!("/dev/disk/by-path/ip-{}-iscsi-{}-lun-{}", t.portal, t.iqn, t.lun).into()
    }
}

impl KernelIscsi {
    fn iscsiadm(what: &str, args: Vec<String>) -> HostResult<String> {
        run(what, Command::new("iscsiadm").args(args))
    }
}

impl Attacher for KernelIscsi {
    fn method(&self) -> AttachMethod {
        AttachMethod::KernelIscsi
    }

    fn attach(&self, req: &AttachRequest, state: &StateDir) -> HostResult<AttachRecord> {
        let t = &req.target;
        let mut record = AttachRecord {
            volume: req.volume.clone(),
            holder: req.holder.clone(),
            target: t.clone(),
            size_bytes: req.size_bytes,
            method: AttachMethod::KernelIscsi,
            device: None,
            user_space: None,
            mounts: Vec::new(),
        };
        // Recorded before the login, so that a crash after it still logs out.
        state.save(&record)?;
        Self::iscsiadm("creating the iSCSI node record", iscsiadm::new_node(t))?;
        let login = Self::iscsiadm("logging in to the volume's target", iscsiadm::login(t));
        // Already logged in (an earlier agent): iscsiadm exits 15 (ISCSI_ERR_SESS_EXISTS); that is fine.
        if let Err(e) = login {
            if !matches!(&e, HostError::Command { status, .. } if status.contains("15")) {
                return Err(e);
            }
        }
        let link = iscsiadm::by_path(t);
        wait_until(
            "the LUN's disk to appear",
            DEVICE_TIMEOUT,
            || None,
            || link.exists(),
        )?;
        let device =
            std::fs::canonicalize(&link).map_err(HostError::io(format!("resolving {}", link.display())))?;
        record.device = Some(device);
        state.save(&record)?;
        Ok(record)
    }

    fn detach(&self, record: &AttachRecord) -> HostResult<()> {
        if let Some(device) = record.device.as_ref().filter(|d| d.exists()) {
            flush_device(device)?;
        }
        let t = &record.target;
        // Not logged in (error 21, ISCSI_ERR_NO_OBJS_FOUND) or no node record: nothing to undo.
        let _ = Self::iscsiadm("logging out of the volume's target", iscsiadm::logout(t));
        let _ = Self::iscsiadm("deleting the iSCSI node record", iscsiadm::delete_node(t));
        let link = iscsiadm::by_path(t);
        if link.exists() {
            return Err(HostError::Refused(format!(
                "{} still exists after logging out of {}; check `iscsiadm -m session`",
                link.display(),
                t.url()
            )));
        }
        Ok(())
    }

    fn is_healthy(&self, record: &AttachRecord) -> bool {
        record.device.is_some() && iscsiadm::by_path(&record.target).exists()
    }

    fn refresh_size(&self, record: &AttachRecord, size_bytes: u64) -> HostResult<()> {
        Self::iscsiadm("rescanning the volume's LUN", iscsiadm::rescan(&record.target))?;
        let device = record.device.clone().unwrap_or_default();
        wait_until(
            "the disk to show its new size",
            DEVICE_TIMEOUT,
            || None,
            || device_size(&device).is_ok_and(|s| s >= size_bytes),
        )
    }
}

// ---- the user-space path --------------------------------------------------------------------------------------

/// qemu-storage-daemon's FUSE export of the LUN under a loop device (see the module docs).
pub struct UserSpace {
    /// `DATA_DIR/host`: each volume's export file, QMP socket and daemon log live in `VOLUME/` here.
    dir: PathBuf,
    /// The iSCSI initiator name the daemon logs in as (the node's: a target that lets in only the
    /// node a volume is published to checks it); `None`: libiscsi's default.
    initiator: Option<String>,
}

/// The arguments of qemu-storage-daemon exporting `target` at `fuse_file`, with its monitor on
/// `qmp_socket` (for online resizes), logging in as `initiator` when given. A pure function, tested.
pub fn daemon_args(
    target: &IscsiTarget,
    fuse_file: &Path,
    qmp_socket: &Path,
    initiator: Option<&str>,
) -> Vec<String> {
    let initiator = initiator.map_or_else(String::new, |i| format!(",initiator-name={i}"));
    vec![
        "--blockdev".into(),
        format!(
            "driver=iscsi,transport=tcp,portal={},target={},lun={}{initiator},node-name=lun,cache.direct=on",
            target.portal, target.iqn, target.lun
        ),
        "--export".into(),
        format!(
            "type=fuse,id=export0,node-name=lun,mountpoint={},writable=on",
            fuse_file.display()
        ),
        "--chardev".into(),
        format!("socket,id=qmp,path={},server=on,wait=off", qmp_socket.display()),
        "--monitor".into(),
        "chardev=qmp".into(),
    ]
}

impl UserSpace {
    pub fn new(host_dir: PathBuf, initiator: Option<String>) -> UserSpace {
        UserSpace {
            dir: host_dir,
            initiator,
        }
    }

    fn volume_dir(&self, req: &AttachRequest) -> PathBuf {
        self.dir.join("volumes").join(req.volume.as_str())
    }
}

/// A path qemu's option parser takes whole: no comma (it splits options), and valid UTF-8.
fn qemu_safe(path: &Path) -> HostResult<()> {
    match path.to_str() {
        Some(s) if !s.contains(',') => Ok(()),
        _ => Err(HostError::Refused(format!(
            "{} holds a comma or is not UTF-8: qemu-storage-daemon cannot take it; give the agent a data_dir \
             without commas",
            path.display()
        ))),
    }
}

impl Attacher for UserSpace {
    fn method(&self) -> AttachMethod {
        AttachMethod::UserSpace
    }

    fn attach(&self, req: &AttachRequest, state: &StateDir) -> HostResult<AttachRecord> {
        let dir = self.volume_dir(req);
        std::fs::create_dir_all(&dir).map_err(HostError::io(format!("creating {}", dir.display())))?;
        let fuse_file = dir.join("lun");
        let qmp_socket = dir.join("qmp.sock");
        qemu_safe(&fuse_file)?;
        // Left by an attach that crashed before its first record: undo it.
        undo_user_space(None, &fuse_file)?;
        std::fs::write(&fuse_file, b"")
            .map_err(HostError::io(format!("creating {}", fuse_file.display())))?;
        let _ = std::fs::remove_file(&qmp_socket);
        let log_path = dir.join("qemu-storage-daemon.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(HostError::io(format!("opening {}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(HostError::io("duplicating a log descriptor"))?;
        let mut child = Command::new("qemu-storage-daemon")
            .args(daemon_args(
                &req.target,
                &fuse_file,
                &qmp_socket,
                self.initiator.as_deref(),
            ))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(HostError::io(
                "starting qemu-storage-daemon (is it installed? Debian: qemu-utils)",
            ))?;
        let pid = child.id();
        let daemon = ProcessIdentity {
            pid,
            start_time: crate::runtime::process::process_start_time(pid).unwrap_or(0),
        };
        let mut record = AttachRecord {
            volume: req.volume.clone(),
            holder: req.holder.clone(),
            target: req.target.clone(),
            size_bytes: req.size_bytes,
            method: AttachMethod::UserSpace,
            device: None,
            user_space: Some(UserSpaceRecord {
                daemon,
                fuse_file: fuse_file.clone(),
                qmp_socket,
                loop_device: None,
            }),
            mounts: Vec::new(),
        };
        state.save(&record)?;
        // Reaped by a thread of its own while this agent lives (a dead daemon must not stay a zombie
        // that looks alive); an agent that stops leaves it running, to be found by its record.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        let exported = wait_until(
            "qemu-storage-daemon to export the LUN",
            DEVICE_TIMEOUT,
            || (!daemon.alive()).then(|| format!("qemu-storage-daemon exited: {}", log_tail(&log_path))),
            || mount::is_mounted(&fuse_file) && file_size(&fuse_file) == Some(req.size_bytes),
        );
        if let Err(e) = exported {
            let _ = self.detach(&record);
            return Err(e);
        }
        let device = match run(
            "attaching a loop device to the exported LUN",
            Command::new("losetup")
                .arg("--find")
                .arg("--show")
                .arg(&fuse_file),
        ) {
            Ok(out) => PathBuf::from(out.trim()),
            Err(e) => {
                let _ = self.detach(&record);
                return Err(e);
            }
        };
        record.device = Some(device.clone());
        if let Some(us) = record.user_space.as_mut() {
            us.loop_device = Some(device);
        }
        state.save(&record)?;
        Ok(record)
    }

    fn detach(&self, record: &AttachRecord) -> HostResult<()> {
        let Some(us) = &record.user_space else {
            return Ok(());
        };
        undo_user_space(Some(us.daemon), &us.fuse_file)
    }

    fn is_healthy(&self, record: &AttachRecord) -> bool {
        let Some(us) = &record.user_space else {
            return false;
        };
        let Some(device) = &us.loop_device else {
            return false;
        };
        us.daemon.alive()
            && mount::is_mounted(&us.fuse_file)
            && loop_backing_files(device).contains(&us.fuse_file)
    }

    fn refresh_size(&self, record: &AttachRecord, size_bytes: u64) -> HostResult<()> {
        let us = record.user_space.as_ref().ok_or_else(|| {
            HostError::Refused(format!("volume {} has no user-space attachment", record.volume))
        })?;
        qmp_block_resize(&us.qmp_socket, size_bytes)?;
        wait_until(
            "the exported file to show the new size",
            DEVICE_TIMEOUT,
            || None,
            || file_size(&us.fuse_file) == Some(size_bytes),
        )?;
        let device = us.loop_device.clone().unwrap_or_default();
        run(
            "telling the loop device its file grew",
            Command::new("losetup").arg("--set-capacity").arg(&device),
        )?;
        Ok(())
    }
}

/// Undo a user-space attachment, each piece only if it is still there: flush and detach every loop
/// device over `fuse_file`, stop the daemon (SIGTERM: it flushes to the target and unmounts its export;
/// SIGKILL after [`DAEMON_STOP_GRACE`]), and lazily unmount an export its daemon left behind.
fn undo_user_space(daemon: Option<ProcessIdentity>, fuse_file: &Path) -> HostResult<()> {
    if mount::is_mounted(fuse_file) {
        for device in loops_over(fuse_file)? {
            if let Err(e) = flush_device(&device) {
                tracing::warn!(device = %device.display(), error = %e, "flushing before detach failed");
            }
            run(
                "detaching the loop device",
                Command::new("losetup").arg("--detach").arg(&device),
            )?;
        }
    }
    if let Some(daemon) = daemon.filter(ProcessIdentity::alive) {
        signal(daemon.pid, libc::SIGTERM);
        let deadline = Instant::now() + DAEMON_STOP_GRACE;
        while daemon.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if daemon.alive() {
            tracing::warn!(
                pid = daemon.pid,
                "qemu-storage-daemon did not exit after SIGTERM: killing it"
            );
            signal(daemon.pid, libc::SIGKILL);
            while daemon.alive() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    if mount::is_mounted(fuse_file) {
        mount::unmount_lazy(fuse_file)?;
    }
    Ok(())
}

fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: a plain syscall on a pid whose start time was just checked to be the daemon's.
    unsafe { libc::kill(pid, sig) };
}

/// A read-only loop device over `device`: a read-only view of an attached volume (a bind mount's `ro`
/// does not stop writes to a device node, the device's own read-only flag does).
pub fn read_only_loop(device: &Path) -> HostResult<PathBuf> {
    let out = run(
        &format!("making a read-only loop device over {}", device.display()),
        Command::new("losetup")
            .arg("--find")
            .arg("--show")
            .arg("--read-only")
            .arg(device),
    )?;
    Ok(PathBuf::from(out.trim()))
}

/// Detaches the loop device `device` (already gone: no error).
pub fn detach_loop(device: &Path) -> HostResult<()> {
    if !device.exists() {
        return Ok(());
    }
    match run(
        "detaching a loop device",
        Command::new("losetup").arg("--detach").arg(device),
    ) {
        Err(_) if !loop_in_use(device) => Ok(()),
        other => other.map(drop),
    }
}

/// Whether a loop device has a backing file (`/sys/block/loopN/loop/backing_file` exists).
fn loop_in_use(device: &Path) -> bool {
    device
        .file_name()
        .is_some_and(|n| Path::new("/sys/block").join(n).join("loop/backing_file").exists())
}

/// Whether `view` is still a read-only loop device over a block device, as [`read_only_loop`] made it.
/// A recorded path can outlive its device (loop numbers are reused after a reboot, when the user-space
/// path makes loop devices over its exports): such a path must be neither reused nor detached.
pub fn is_read_only_view(view: &Path) -> bool {
    let Some(name) = view.file_name() else {
        return false;
    };
    let sys = Path::new("/sys/block").join(name);
    let read_only = std::fs::read_to_string(sys.join("ro")).is_ok_and(|v| v.trim() == "1");
    let over_a_device =
        std::fs::read_to_string(sys.join("loop/backing_file")).is_ok_and(|b| b.trim().starts_with("/dev/"));
    read_only && over_a_device
}

/// Loop devices whose backing file is `file` (`losetup -j`).
pub fn loops_over(file: &Path) -> HostResult<Vec<PathBuf>> {
    let out = run(
        "listing loop devices",
        Command::new("losetup").arg("-j").arg(file),
    )?;
    Ok(parse_losetup_j(&out))
}

/// `/dev/loop3: [0045]:123 (/path/file)` lines → the devices.
pub fn parse_losetup_j(out: &str) -> Vec<PathBuf> {
    out.lines()
        .filter_map(|l| l.split_once(':').map(|(dev, _)| PathBuf::from(dev.trim())))
        .filter(|d| d.starts_with("/dev/"))
        .collect()
}

/// The backing file of a loop device, from sysfs.
fn loop_backing_files(device: &Path) -> Vec<PathBuf> {
    let Some(name) = device.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        .map(|s| vec![PathBuf::from(s.trim())])
        .unwrap_or_default()
}

/// Writes the device's dirty buffers to what lies under it (fsync on the block device).
pub fn flush_device(device: &Path) -> HostResult<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .open(device)
        .and_then(|f| f.sync_all())
        .map_err(HostError::io(format!("flushing {}", device.display())))
}

fn file_size(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.len())
}

/// A block device's size in bytes (seeking to its end needs no ioctl).
pub fn device_size(device: &Path) -> std::io::Result<u64> {
    use std::io::Seek;
    std::fs::File::open(device)?.seek(std::io::SeekFrom::End(0))
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    let tail: Vec<&str> = lines.into_iter().rev().collect();
    format!("{} (log: {})", tail.join(" / "), path.display())
}

/// `block_resize` of the daemon's node through its QMP socket: the iSCSI driver reads the LUN's
/// capacity again and the FUSE export shows the new size.
fn qmp_block_resize(socket: &Path, size_bytes: u64) -> HostResult<()> {
    let what = format!("resizing the export through QMP ({})", socket.display());
    let stream = UnixStream::connect(socket).map_err(HostError::io(what.clone()))?;
    stream
        .set_read_timeout(Some(DEVICE_TIMEOUT))
        .map_err(HostError::io(what.clone()))?;
    let mut writer = stream.try_clone().map_err(HostError::io(what.clone()))?;
    let mut reader = BufReader::new(stream);
    let mut exchange = |request: Option<serde_json::Value>| -> HostResult<serde_json::Value> {
        if let Some(r) = request {
            writeln!(writer, "{r}").map_err(HostError::io(what.clone()))?;
        }
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).map_err(HostError::io(what.clone()))? == 0 {
                return Err(HostError::Refused(format!(
                    "{what}: the daemon closed its monitor"
                )));
            }
            let v: serde_json::Value = serde_json::from_str(&line)
                .map_err(|e| HostError::Refused(format!("{what}: not QMP: {e}")))?;
            // Events interleave with answers: skip them.
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    };
    exchange(None)?; // the greeting
    exchange(Some(serde_json::json!({"execute": "qmp_capabilities"})))?;
    let answer = exchange(Some(
        serde_json::json!({"execute": "block_resize", "arguments": {"node-name": "lun", "size": size_bytes}}),
    ))?;
    if let Some(e) = answer.get("error") {
        return Err(HostError::Refused(format!("{what}: {e}")));
    }
    Ok(())
}

impl FromStr for AttachMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<AttachMethod, String> {
        match s {
            "kernel" | "kernel_iscsi" => Ok(AttachMethod::KernelIscsi),
            "user_space" | "userspace" => Ok(AttachMethod::UserSpace),
            other => Err(format!("attach method {other:?}: use kernel or user_space")),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kernel_initiators_name_is_read_from_open_iscsis_file() {
        let debian = "## DO NOT EDIT OR REMOVE THIS FILE!\n## If you remove this file, the iSCSI daemon will not start.\n\
                      InitiatorName=iqn.1993-08.org.debian:01:5eedc0ffee\n";
        assert_eq!(
            super::parse_initiator_name(debian).unwrap(),
            "iqn.1993-08.org.debian:01:5eedc0ffee"
        );
        assert_eq!(
            super::parse_initiator_name("  InitiatorName= eui.02004567A425678D \n").unwrap(),
            "eui.02004567A425678D"
        );
        // Commented out, absent, or not an iSCSI name: an error naming what is wrong.
        for (text, says) in [
            (
                "#InitiatorName=iqn.2004-10.com.example:a\n",
                "no InitiatorName= line",
            ),
            ("", "no InitiatorName= line"),
            ("InitiatorName=host-a\n", "not an iSCSI name"),
            ("InitiatorName=iqn.2004-10.com.example:a b\n", "not an iSCSI name"),
            ("InitiatorName=iqn.2004-10.com.example:a,b\n", "not an iSCSI name"),
        ] {
            let err = super::parse_initiator_name(text).unwrap_err();
            assert!(err.contains(says), "{text:?}: {err}");
        }
    }

    use super::*;
    use proptest::prelude::*;

    fn target() -> IscsiTarget {
        IscsiTarget::parse_url("iscsi://127.0.0.1:7101/iqn.2026-11.io.basalt:v1/0").unwrap()
    }

    #[test]
    fn an_iscsi_url_parses_back_and_bad_ones_say_why() {
        let t = target();
        assert_eq!(t.portal, "127.0.0.1:7101".parse().unwrap());
        assert_eq!(t.iqn, "iqn.2026-11.io.basalt:v1");
        assert_eq!(t.lun, 0);
        assert_eq!(IscsiTarget::parse_url(&t.url()).unwrap(), t);
        for (bad, why) in [
            ("http://1.2.3.4:1/iqn.x/0", "iscsi://"),
            ("iscsi://host/iqn.x/0", "portal"),
            ("iscsi://1.2.3.4:1/iqn.x,driver=file/0", "target name"),
            ("iscsi://1.2.3.4:1/IQN.X/0", "target name"),
            ("iscsi://1.2.3.4:1/iqn.x/zero", "LUN"),
            ("iscsi://1.2.3.4:1/iqn.x", "LUN"),
        ] {
            let e = IscsiTarget::parse_url(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn the_kernel_initiator_wins_only_when_tool_and_kernel_are_both_there() {
        let full = HostProbe {
            iscsiadm: true,
            iscsi_tcp: true,
            qemu_storage_daemon: true,
            fuse: true,
            loop_devices: true,
        };
        assert_eq!(choose(&full), Ok(AttachMethod::KernelIscsi));
        let no_kernel = HostProbe {
            iscsi_tcp: false,
            ..full
        };
        assert_eq!(choose(&no_kernel), Ok(AttachMethod::UserSpace));
        assert!(why(&no_kernel, AttachMethod::UserSpace).contains("iscsi_tcp"));
        let this_machine = HostProbe {
            iscsiadm: false,
            iscsi_tcp: false,
            ..full
        };
        assert_eq!(choose(&this_machine), Ok(AttachMethod::UserSpace));
        let nothing = HostProbe::default();
        let e = choose(&nothing).unwrap_err();
        assert!(
            e.contains("open-iscsi") && e.contains("qemu-storage-daemon") && e.contains("/dev/fuse"),
            "{e}"
        );
    }

    proptest! {
        #[test]
        fn a_method_is_chosen_exactly_when_one_path_is_complete(
            a in any::<bool>(), k in any::<bool>(), q in any::<bool>(), f in any::<bool>(), l in any::<bool>()
        ) {
            let probe = HostProbe { iscsiadm: a, iscsi_tcp: k, qemu_storage_daemon: q, fuse: f, loop_devices: l };
            match choose(&probe) {
                Ok(AttachMethod::KernelIscsi) => prop_assert!(a && k),
                Ok(AttachMethod::UserSpace) => prop_assert!(!(a && k) && q && f && l),
                Err(_) => prop_assert!(!(a && k || q && f && l)),
            }
        }
    }

    #[test]
    fn iscsiadm_commands_name_the_node_by_target_and_portal() {
        let t = target();
        let node = [
            "-m",
            "node",
            "-T",
            "iqn.2026-11.io.basalt:v1",
            "-p",
            "127.0.0.1:7101",
        ];
        let with =
            |extra: &[&str]| -> Vec<String> { node.iter().chain(extra).map(|s| s.to_string()).collect() };
        assert_eq!(iscsiadm::new_node(&t), with(&["-o", "new"]));
        assert_eq!(iscsiadm::login(&t), with(&["--login"]));
        assert_eq!(iscsiadm::logout(&t), with(&["--logout"]));
        assert_eq!(iscsiadm::delete_node(&t), with(&["-o", "delete"]));
        assert_eq!(iscsiadm::rescan(&t), with(&["--rescan"]));
        assert_eq!(
            iscsiadm::by_path(&t),
            PathBuf::from("/dev/disk/by-path/ip-127.0.0.1:7101-iscsi-iqn.2026-11.io.basalt:v1-lun-0")
        );
    }

    #[test]
    fn the_daemon_exports_the_lun_writable_with_a_monitor() {
        let args = daemon_args(&target(), Path::new("/d/lun"), Path::new("/d/qmp.sock"), None);
        assert_eq!(
            args[1],
            "driver=iscsi,transport=tcp,portal=127.0.0.1:7101,target=iqn.2026-11.io.basalt:v1,lun=0,node-name=lun,\
             cache.direct=on"
        );
        let named = daemon_args(
            &target(),
            Path::new("/d/lun"),
            Path::new("/d/qmp.sock"),
            Some("iqn.2026-11.io.basalt.node:n1"),
        );
        assert_eq!(
            named[1],
            "driver=iscsi,transport=tcp,portal=127.0.0.1:7101,target=iqn.2026-11.io.basalt:v1,lun=0,\
             initiator-name=iqn.2026-11.io.basalt.node:n1,node-name=lun,cache.direct=on"
        );
        assert_eq!(
            args[3],
            "type=fuse,id=export0,node-name=lun,mountpoint=/d/lun,writable=on"
        );
        assert_eq!(args[5], "socket,id=qmp,path=/d/qmp.sock,server=on,wait=off");
        assert!(qemu_safe(Path::new("/a,b/lun")).is_err());
        assert!(qemu_safe(Path::new("/a/b/lun")).is_ok());
    }

    #[test]
    fn losetup_j_lists_the_devices() {
        let out = "/dev/loop3: [0045]:123 (/d/lun)\n/dev/loop12: [0045]:123 (/d/lun)\n";
        assert_eq!(
            parse_losetup_j(out),
            vec![PathBuf::from("/dev/loop3"), PathBuf::from("/dev/loop12")]
        );
        assert!(parse_losetup_j("").is_empty());
    }
}
