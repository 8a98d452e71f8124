//! Filesystems on attached devices: what a device holds (never format one with data), making one,
//! mounting and unmounting, growing it online, and its usage.
//!
//! "Blank" is strict: `blkid -p` (a low-level probe, no cache) finds no filesystem, RAID member or
//! partition table, *and* the first [`BLANK_PROBE_BYTES`] read as zeros. A new Basalt volume reads as
//! zeros, so it is blank; a device with any data blkid does not recognise is refused rather than
//! formatted, because formatting is the one step that cannot be undone.

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::attach::{on_path, run};
use super::{HostError, HostResult};

/// How much of a device's start must be zeros for it to count as blank: every filesystem and partition
/// table this host knows keeps its signature in the first MiB.
pub const BLANK_PROBE_BYTES: usize = 1 << 20;
/// How long an unmount is retried while the mount is busy (a container's last process exiting).
const UNMOUNT_BUSY_WAIT: Duration = Duration::from_secs(10);

/// The filesystems a volume may be given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filesystem {
    Ext4,
    Xfs,
}

/// The names [`Filesystem`] parses from, for messages.
pub const FILESYSTEMS: &str = "ext4, xfs";

impl Filesystem {
    pub fn as_str(self) -> &'static str {
        match self {
            Filesystem::Ext4 => "ext4",
            Filesystem::Xfs => "xfs",
        }
    }

    fn mkfs(self) -> &'static str {
        match self {
            Filesystem::Ext4 => "mkfs.ext4",
            Filesystem::Xfs => "mkfs.xfs",
        }
    }

    /// Whether this host can make it (its mkfs is installed).
    pub fn available(self) -> bool {
        on_path(self.mkfs())
    }

    /// The mkfs command line (no discard: a new volume is already all holes, and a discard of the whole
    /// device through the user-space path is slow).
    pub fn mkfs_args(self, device: &Path) -> Vec<String> {
        let dev = device.display().to_string();
        match self {
            Filesystem::Ext4 => vec!["-q".into(), "-E".into(), "nodiscard".into(), dev],
            Filesystem::Xfs => vec!["-q".into(), "-K".into(), dev],
        }
    }
}

impl FromStr for Filesystem {
    type Err = String;
    fn from_str(s: &str) -> Result<Filesystem, String> {
        match s {
            "ext4" => Ok(Filesystem::Ext4),
            "xfs" => Ok(Filesystem::Xfs),
            other => Err(format!(
                "filesystem {other:?} is not supported: use one of {FILESYSTEMS}"
            )),
        }
    }
}

impl fmt::Display for Filesystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a device holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// No signature and only zeros at its start: safe to format.
    Blank,
    /// A filesystem of this type (`blkid`'s TYPE).
    Filesystem(String),
    /// Something else that is data: a partition table, a RAID member, or bytes blkid does not know.
    Other(String),
}

/// `blkid -p -o export` output → what it found (`None`: nothing).
pub fn parse_blkid(out: &str) -> Option<Content> {
    let field = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .map(str::to_string)
    };
    let usage = field("USAGE");
    match (field("TYPE"), field("PTTYPE")) {
        (Some(t), _) if usage.as_deref().is_none_or(|u| u == "filesystem") => Some(Content::Filesystem(t)),
        (Some(t), _) => Some(Content::Other(format!(
            "a {t} signature ({})",
            usage.unwrap_or_default()
        ))),
        (None, Some(pt)) => Some(Content::Other(format!("a {pt} partition table"))),
        (None, None) if out.trim().is_empty() => None,
        (None, None) => Some(Content::Other(format!(
            "signatures blkid reports: {}",
            out.trim().replace('\n', " ")
        ))),
    }
}

/// What `device` holds (see the module docs).
pub fn probe(device: &Path) -> HostResult<Content> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(device)
        .output()
        .map_err(HostError::io("running blkid -p (util-linux)"))?;
    // blkid exits 2 when it finds nothing.
    match out.status.code() {
        Some(0) => {
            if let Some(found) = parse_blkid(&String::from_utf8_lossy(&out.stdout)) {
                return Ok(found);
            }
        }
        Some(2) => {}
        _ => {
            return Err(HostError::Command {
                what: format!("probing {} for a filesystem", device.display()),
                command: format!("blkid -p -o export {}", device.display()),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }
    let mut start = vec![0u8; BLANK_PROBE_BYTES];
    let mut f =
        std::fs::File::open(device).map_err(HostError::io(format!("opening {}", device.display())))?;
    let mut read = 0;
    while read < start.len() {
        match f.read(&mut start[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) => return Err(HostError::io(format!("reading {}", device.display()))(e)),
        }
    }
    Ok(if start[..read].iter().all(|&b| b == 0) {
        Content::Blank
    } else {
        Content::Other("data blkid does not recognise (non-zero bytes in its first MiB)".into())
    })
}

/// Makes `fs` on `device` if, and only if, it is blank. A device with `fs` already is left alone; one
/// with anything else is refused, naming what it holds.
pub fn make_filesystem_if_blank(device: &Path, fs: Filesystem) -> HostResult<()> {
    match probe(device)? {
        Content::Blank => {
            if !fs.available() {
                return Err(HostError::Refused(format!(
                    "{} is not installed on this host: install it (Debian: {}) or ask for another filesystem \
                     ({FILESYSTEMS})",
                    fs.mkfs(),
                    match fs {
                        Filesystem::Ext4 => "e2fsprogs",
                        Filesystem::Xfs => "xfsprogs",
                    }
                )));
            }
            tracing::info!(device = %device.display(), fs = fs.as_str(), "the volume is blank: making a filesystem");
            run(
                &format!("making {} on {}", fs, device.display()),
                Command::new(fs.mkfs()).args(fs.mkfs_args(device)),
            )?;
            Ok(())
        }
        Content::Filesystem(found) if found == fs.as_str() => Ok(()),
        Content::Filesystem(found) => Err(HostError::Refused(format!(
            "the volume holds a {found} filesystem, not {fs}: mount it as {found} (nothing was formatted)"
        ))),
        Content::Other(what) => Err(HostError::Refused(format!(
            "the volume is not blank and holds no filesystem to mount ({what}); it was not formatted, to keep \
             that data: wipe it yourself if it is not needed"
        ))),
    }
}

/// `/proc/self/mountinfo` field 5 (the mount point), unescaped.
fn mount_points() -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .collect()
}

/// The kernel writes space, tab, newline and backslash in mount paths as `\040` etc.
pub fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `path` is a mount point now. The kernel shows mount points resolved, so the path is too (a
/// CO's paths may run through a symlink, `/var/lib/kubelet` often does); a path that cannot be resolved
/// (a dead FUSE mount answers ENOTCONN) is compared as given.
pub fn is_mounted(path: &Path) -> bool {
    let resolved = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let want = resolved.to_string_lossy();
    mount_points().iter().any(|m| *m == want)
}

/// An option list `mount -o` takes: each option non-empty, without commas or whitespace (a comma would
/// smuggle in another option).
pub fn check_options(options: &[String]) -> HostResult<()> {
    for o in options {
        if o.is_empty() || o.contains(',') || o.chars().any(char::is_whitespace) {
            return Err(HostError::Refused(format!(
                "mount option {o:?} is not valid: give one option per entry, without commas or spaces"
            )));
        }
    }
    Ok(())
}

/// The `-o` list for mounting `fs`: the caller's options, `ro` when asked, and for XFS `nouuid`. A clone
/// or a restored snapshot carries its source's filesystem UUID, and XFS refuses to mount a second
/// filesystem with a UUID that is already mounted on the host: without `nouuid` a clone could never be
/// used on the node where its source is mounted. (ext4 does not check UUIDs.)
pub fn mount_options(fs: Filesystem, options: &[String], read_only: bool) -> Vec<String> {
    let mut opts: Vec<String> = options.to_vec();
    if read_only && !opts.iter().any(|o| o == "ro") {
        opts.push("ro".into());
    }
    if fs == Filesystem::Xfs && !opts.iter().any(|o| o == "nouuid") {
        opts.push("nouuid".into());
    }
    opts
}

/// Mounts `device` (holding `fs`) at `target`, created if absent. Already mounted there: nothing to do.
pub fn mount(
    device: &Path,
    target: &Path,
    fs: Filesystem,
    options: &[String],
    read_only: bool,
) -> HostResult<()> {
    check_options(options)?;
    std::fs::create_dir_all(target).map_err(HostError::io(format!(
        "creating the mount point {}",
        target.display()
    )))?;
    if is_mounted(target) {
        return Ok(());
    }
    let opts = mount_options(fs, options, read_only);
    let mut cmd = Command::new("mount");
    cmd.arg("-t").arg(fs.as_str());
    if !opts.is_empty() {
        cmd.arg("-o").arg(opts.join(","));
    }
    cmd.arg(device).arg(target);
    run(&format!("mounting the volume at {}", target.display()), &mut cmd)?;
    Ok(())
}

/// Bind-mounts `source` (a mounted directory, or a block device) at `target`, which must exist (a
/// directory for a directory, a file for a device); read-only when asked (util-linux remounts the
/// bind read-only itself). Already mounted there: nothing to do.
pub fn bind_mount(source: &Path, target: &Path, read_only: bool) -> HostResult<()> {
    if is_mounted(target) {
        return Ok(());
    }
    let mut cmd = Command::new("mount");
    cmd.arg("-o").arg(if read_only { "bind,ro" } else { "bind" });
    cmd.arg(source).arg(target);
    run(
        &format!("bind-mounting {} at {}", source.display(), target.display()),
        &mut cmd,
    )?;
    Ok(())
}

/// Unmounts `target` (not mounted: nothing to do), retrying for [`UNMOUNT_BUSY_WAIT`] while it is busy.
/// A mount still busy after that is an error, never a lazy unmount: the data on it is still in use.
pub fn unmount(target: &Path) -> HostResult<()> {
    let start = Instant::now();
    loop {
        if !is_mounted(target) {
            return Ok(());
        }
        match run(
            &format!("unmounting {}", target.display()),
            Command::new("umount").arg(target),
        ) {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() > UNMOUNT_BUSY_WAIT => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Detaches a mount whose device is gone (a dead FUSE export, a broken attachment) at once.
pub fn unmount_lazy(target: &Path) -> HostResult<()> {
    run(
        &format!("lazily unmounting {}", target.display()),
        Command::new("umount").arg("-l").arg(target),
    )
    .map(|_| ())
}

/// The capability the kernel's online ext4 resize (`EXT4_IOC_RESIZE_FS`) requires.
const CAP_SYS_RESOURCE: u32 = 24;

/// Whether `/proc/PID/status` text shows `bit` in the effective capability set. Pure, tested.
pub fn status_has_capability(status: &str, bit: u32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|mask| (mask >> bit) & 1 == 1)
}

/// Whether this process may grow a mounted ext4 filesystem. Containers often run without
/// CAP_SYS_RESOURCE (this project's CI machine does), even as root.
pub fn may_grow_ext4_online() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| status_has_capability(&s, CAP_SYS_RESOURCE))
}

/// Grows the filesystem mounted at `target` from `device` to the device's size, online. `xfs_growfs`
/// needs CAP_SYS_ADMIN, which mounting needs anyway; ext4 needs CAP_SYS_RESOURCE too, and without it
/// the growth is refused with that reason: the filesystem then grows at its next mount
/// ([`grow_unmounted`], which needs no capability).
pub fn grow_filesystem(device: &Path, target: &Path, fs: Filesystem) -> HostResult<()> {
    let what = format!("growing the filesystem at {}", target.display());
    match fs {
        Filesystem::Ext4 if !may_grow_ext4_online() => {
            return Err(HostError::Refused(format!(
                "the ext4 filesystem at {} cannot grow while mounted: the kernel's online ext4 resize needs \
                 CAP_SYS_RESOURCE, which this agent does not have (give it that capability, e.g. `docker run \
                 --cap-add SYS_RESOURCE` or the pod's securityContext); the volume did grow, and its filesystem \
                 grows when it is next mounted",
                target.display()
            )))
        }
        Filesystem::Ext4 => run(&what, Command::new("resize2fs").arg(device))?,
        Filesystem::Xfs => run(&what, Command::new("xfs_growfs").arg(target))?,
    };
    Ok(())
}

/// An ext4 filesystem's size and the size of one of its block groups, from `dumpe2fs -h`. Pure, tested.
pub fn parse_dumpe2fs_size(out: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let block = field("Block size:")?;
    Some((
        field("Block count:")?.checked_mul(block)?,
        field("Blocks per group:")?.checked_mul(block)?,
    ))
}

/// Before a first read-write mount: an ext4 filesystem smaller than its device (the volume grew while
/// unmounted, or while mounted by an agent that could not grow it online) is checked (`e2fsck -f -p`,
/// which resize2fs demands first) and grown offline. xfs only grows mounted: see [`grow_after_mount`].
/// Whether it grew.
pub fn grow_unmounted(device: &Path, fs: Filesystem) -> HostResult<bool> {
    if fs != Filesystem::Ext4 {
        return Ok(false);
    }
    let header = run(
        &format!("reading the ext4 superblock of {}", device.display()),
        Command::new("dumpe2fs").arg("-h").arg(device),
    )?;
    let device_bytes = super::attach::device_size(device)
        .map_err(HostError::io(format!("measuring {}", device.display())))?;
    let Some((fs_bytes, group_bytes)) = parse_dumpe2fs_size(&header) else {
        return Err(HostError::Refused(format!(
            "dumpe2fs -h {} printed no block count, block size and blocks per group; is it ext4?",
            device.display()
        )));
    };
    // mke2fs and resize2fs leave off a last block group too small to be worth its metadata: a
    // filesystem less than a group short of its device is as large as it gets.
    if fs_bytes.saturating_add(group_bytes) > device_bytes {
        return Ok(false);
    }
    let check = format!(
        "checking the ext4 filesystem on {} before growing it",
        device.display()
    );
    let status = Command::new("e2fsck")
        .args(["-f", "-p"])
        .arg(device)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(HostError::io(check.clone()))?;
    // e2fsck: 0 clean, 1 errors corrected; anything else needs a person.
    if !matches!(status.status.code(), Some(0 | 1)) {
        return Err(HostError::Command {
            what: check,
            command: format!("e2fsck -f -p {}", device.display()),
            status: status.status.to_string(),
            stderr: String::from_utf8_lossy(&status.stderr).trim().to_string(),
        });
    }
    run(
        &format!("growing the ext4 filesystem on {}", device.display()),
        Command::new("resize2fs").arg(device),
    )?;
    tracing::info!(device = %device.display(), from = fs_bytes, to = device_bytes, "ext4 filesystem grown to its device before mounting");
    Ok(true)
}

/// After a first read-write mount: an xfs filesystem grows to its device (a no-op when it fills it).
pub fn grow_after_mount(target: &Path, fs: Filesystem) -> HostResult<()> {
    if fs == Filesystem::Xfs {
        run(
            &format!("growing the xfs filesystem at {}", target.display()),
            Command::new("xfs_growfs").arg(target),
        )?;
    }
    Ok(())
}

/// A mounted filesystem's usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsStats {
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// Free for an unprivileged user (what `df` shows as available).
    pub available_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
}

/// `statvfs(path)`.
pub fn stats(path: &Path) -> std::io::Result<FsStats> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path holds a NUL byte"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid C string and `st` is written by statvfs before it is read.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    let frsize = st.f_frsize;
    Ok(FsStats {
        total_bytes: st.f_blocks.saturating_mul(frsize),
        free_bytes: st.f_bfree.saturating_mul(frsize),
        available_bytes: st.f_bavail.saturating_mul(frsize),
        total_inodes: st.f_files,
        free_inodes: st.f_ffree,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_read_from_the_effective_set() {
        let without = "Name:\tx\nCapPrm:\t000001ffffffffff\nCapEff:\t000001fffeffffff\n";
        let with = "CapEff:\t000001ffffffffff\n";
        assert!(!status_has_capability(without, CAP_SYS_RESOURCE));
        assert!(status_has_capability(with, CAP_SYS_RESOURCE));
        assert!(status_has_capability(without, 21), "CAP_SYS_ADMIN is there");
        assert!(!status_has_capability("no such line", 0));
        assert!(!status_has_capability("CapEff:\tnot-hex", 0));
    }

    #[test]
    fn dumpe2fs_gives_the_filesystem_size() {
        let out = "Filesystem volume name:   <none>\nBlock count:              65536\nReserved block count:     3276\nBlock size:               1024\nBlocks per group:         8192\n";
        assert_eq!(parse_dumpe2fs_size(out), Some((64 << 20, 8 << 20)));
        assert_eq!(parse_dumpe2fs_size("Block count: 10\nBlock size: 4096\n"), None);
        assert_eq!(
            parse_dumpe2fs_size("Block count: x\nBlock size: 4096\nBlocks per group: 1\n"),
            None
        );
        assert_eq!(
            parse_dumpe2fs_size("Block count: 18446744073709551615\nBlock size: 4096\nBlocks per group: 1\n"),
            None
        );
    }

    #[test]
    fn blkid_output_tells_filesystems_from_other_data() {
        assert_eq!(
            parse_blkid("DEVNAME=/dev/loop0\nUUID=x\nVERSION=1.0\nTYPE=ext4\nUSAGE=filesystem\n"),
            Some(Content::Filesystem("ext4".into()))
        );
        assert!(
            matches!(parse_blkid("PTUUID=x\nPTTYPE=gpt\n"), Some(Content::Other(s)) if s.contains("gpt"))
        );
        assert!(
            matches!(parse_blkid("TYPE=linux_raid_member\nUSAGE=raid\n"), Some(Content::Other(s)) if s.contains("raid"))
        );
        assert_eq!(parse_blkid(""), None);
    }

    #[test]
    fn filesystems_parse_and_others_are_refused_naming_the_choices() {
        assert_eq!("ext4".parse(), Ok(Filesystem::Ext4));
        assert_eq!("xfs".parse(), Ok(Filesystem::Xfs));
        let e = "btrfs".parse::<Filesystem>().unwrap_err();
        assert!(e.contains("ext4, xfs"), "{e}");
        assert_eq!(
            Filesystem::Ext4.mkfs_args(Path::new("/dev/loop1")),
            ["-q", "-E", "nodiscard", "/dev/loop1"]
        );
    }

    #[test]
    fn xfs_mounts_ignore_duplicate_uuids_so_a_clone_mounts_beside_its_source() {
        let given = vec!["noatime".to_string()];
        assert_eq!(
            mount_options(Filesystem::Xfs, &given, true),
            ["noatime", "ro", "nouuid"]
        );
        assert_eq!(mount_options(Filesystem::Ext4, &given, false), ["noatime"]);
        let already = vec!["nouuid".to_string(), "ro".to_string()];
        assert_eq!(mount_options(Filesystem::Xfs, &already, true), ["nouuid", "ro"]);
    }

    #[test]
    fn mount_options_cannot_smuggle_in_others() {
        assert!(check_options(&["noatime".into(), "discard".into()]).is_ok());
        for bad in ["", "noatime,suid", "a b"] {
            assert!(check_options(&[bad.into()]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/a\040b\011c\134"), "/a b\tc\\");
        assert_eq!(unescape_mount_path(r"/plain"), "/plain");
    }

    #[test]
    fn a_zeroed_file_is_blank_then_holds_ext4_once_made_and_is_never_formatted_again() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
        assert_eq!(probe(&img).unwrap(), Content::Blank);
        make_filesystem_if_blank(&img, Filesystem::Ext4).unwrap();
        assert_eq!(probe(&img).unwrap(), Content::Filesystem("ext4".into()));
        // A second call keeps it (same UUID: not formatted again).
        let uuid = |p: &Path| {
            String::from_utf8(
                Command::new("blkid")
                    .args(["-p", "-s", "UUID", "-o", "value"])
                    .arg(p)
                    .output()
                    .unwrap()
                    .stdout,
            )
            .unwrap()
        };
        let before = uuid(&img);
        make_filesystem_if_blank(&img, Filesystem::Ext4).unwrap();
        assert_eq!(uuid(&img), before);
        let e = make_filesystem_if_blank(&img, Filesystem::Xfs)
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds a ext4 filesystem"), "{e}");
    }

    #[test]
    fn a_device_with_unknown_data_is_refused_not_formatted() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        let mut data = vec![0u8; 8 << 20];
        data[4096..4100].copy_from_slice(b"data");
        std::fs::write(&img, &data).unwrap();
        assert!(matches!(probe(&img).unwrap(), Content::Other(_)));
        let e = make_filesystem_if_blank(&img, Filesystem::Ext4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not blank"), "{e}");
        assert_eq!(std::fs::read(&img).unwrap(), data, "nothing was written");
    }

    #[test]
    fn stats_of_a_directory_are_those_of_its_filesystem() {
        let s = stats(Path::new("/")).unwrap();
        assert!(s.total_bytes > 0 && s.available_bytes <= s.free_bytes && s.free_bytes <= s.total_bytes);
        assert!(stats(Path::new("/no/such/dir")).is_err());
    }
}
