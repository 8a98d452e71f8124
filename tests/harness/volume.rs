//! A replicated Basalt volume made of real processes: N `basalt replica` processes and one or more
//! `basalt controller` processes, each on free 127.0.0.1 ports, with data in a temp dir.
//!
//! Tests kill, stop and restart the pieces one by one (`kill_replica`, `start_controller`, ...), talk to the
//! volume through real initiators ([`qemu_io`], fio), and look inside with `basalt volume info --json` and
//! `basalt replica export`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use crate::{
    basalt_binary, basalt_command, free_local_addr, io, require_tool, run_checked, ByteSize, Daemon,
    IscsiUrl, Result, StopPolicy, TEST_VOLUME_SECRET,
};

/// Volume name every cluster serves (`iqn.2026-11.io.basalt:vol`).
pub const VOLUME_NAME: &str = "vol";

/// The secret of a clone's volume ([`Cluster::start_clone`]): not the source's
/// ([`TEST_VOLUME_SECRET`]), so that a clone replica that presented its own secret to its source, or
/// took the source's for its own, would fail.
pub const CLONE_VOLUME_SECRET: &str = "basalt-e2e-test-clone-volume-secret";

/// How long a replica or controller may take to come up on this shared 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Replica {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub daemon: Option<Daemon>,
}

/// A controller process and where it serves.
pub struct Controller {
    pub url: IscsiUrl,
    pub api: SocketAddr,
    pub daemon: Daemon,
}

pub struct Cluster {
    pub size: ByteSize,
    pub volume_id: String,
    pub replicas: Vec<Replica>,
    /// Extra arguments every replica of this cluster is started with (a clone's `--clone-from ...`).
    replica_args: Vec<String>,
    /// The volume's secret, given to its replicas and controllers through `BASALT_VOLUME_SECRET`.
    pub secret: String,
    /// A clone's SOURCE volume's secret, given to its replicas through `BASALT_CLONE_SOURCE_SECRET`.
    source_secret: Option<String>,
    controllers: usize,
    // Last: everything above is stopped before the directory goes.
    pub dir: TempDir,
}

impl Cluster {
    /// Starts `n` replicas of a new volume of `size` (no controller yet).
    pub fn start(n: usize, size: ByteSize) -> Result<Cluster> {
        Cluster::start_with(n, size, Vec::new(), TEST_VOLUME_SECRET.to_string(), None)
    }

    /// Starts `n` replicas of a new volume that is a clone of snapshot `snapshot` of `source`, each
    /// with `extra` arguments too. The clone is another volume with a secret of its own
    /// ([`CLONE_VOLUME_SECRET`]); its replicas get the source's secret to read the source with.
    pub fn start_clone(
        n: usize,
        size: ByteSize,
        source: &Cluster,
        snapshot: &str,
        extra: &[&str],
    ) -> Result<Cluster> {
        let mut args: Vec<String> = source
            .replica_addrs()
            .into_iter()
            .flat_map(|s| ["--clone-from".to_string(), s])
            .collect();
        args.extend(["--clone-snapshot".to_string(), snapshot.to_string()]);
        args.extend(extra.iter().map(|a| a.to_string()));
        Cluster::start_with(
            n,
            size,
            args,
            CLONE_VOLUME_SECRET.to_string(),
            Some(source.secret.clone()),
        )
    }

    fn start_with(
        n: usize,
        size: ByteSize,
        replica_args: Vec<String>,
        secret: String,
        source_secret: Option<String>,
    ) -> Result<Cluster> {
        basalt_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("basalt-e2e-volume-")
            .tempdir()
            .map_err(io("create a temp dir"))?;
        let volume_id = uuid_v4();
        let mut cluster = Cluster {
            size,
            volume_id,
            replicas: Vec::new(),
            replica_args,
            secret,
            source_secret,
            controllers: 0,
            dir,
        };
        for i in 0..n {
            let addr = free_local_addr()?;
            let rdir = cluster.dir.path().join(format!("r{}", i + 1));
            cluster.replicas.push(Replica {
                addr,
                dir: rdir,
                daemon: None,
            });
            cluster.start_replica(i)?;
        }
        Ok(cluster)
    }

    pub fn log_dir(&self) -> &Path {
        self.dir.path()
    }

    /// (Re)starts replica `i` on its address and directory.
    pub fn start_replica(&mut self, i: usize) -> Result<()> {
        let r = &self.replicas[i];
        let mut cmd = basalt_command()?;
        cmd.env("RUST_LOG", "info")
            .env("BASALT_VOLUME_SECRET", &self.secret)
            .arg("replica")
            .arg("--dir")
            .arg(&r.dir)
            .args(["--size", &self.size.bytes().to_string()])
            .args(["--listen", &r.addr.to_string()])
            .args(["--volume-id", &self.volume_id])
            .args(&self.replica_args);
        if let Some(source_secret) = &self.source_secret {
            cmd.env("BASALT_CLONE_SOURCE_SECRET", source_secret);
        }
        let what = format!("replica-r{}", i + 1);
        let mut daemon = Daemon::spawn(
            &what,
            cmd,
            self.dir.path(),
            StopPolicy::Terminate {
                grace: Duration::from_secs(20),
            },
        )?;
        daemon.wait_for_port(r.addr, START_TIMEOUT)?;
        self.replicas[i].daemon = Some(daemon);
        Ok(())
    }

    /// SIGKILLs replica `i` (the process group), like a node crash.
    pub fn kill_replica(&mut self, i: usize) {
        if let Some(d) = &self.replicas[i].daemon {
            // SAFETY: plain kill(2) on our own child's process group.
            unsafe { libc::kill(-(d.pid() as libc::pid_t), libc::SIGKILL) };
        }
        if let Some(d) = self.replicas[i].daemon.take() {
            let _ = d.stop();
        }
    }

    /// Stops replica `i` cleanly (SIGTERM: it flushes and exits).
    pub fn stop_replica(&mut self, i: usize) -> Result<()> {
        if let Some(d) = self.replicas[i].daemon.take() {
            d.stop()?;
        }
        Ok(())
    }

    pub fn replica_addrs(&self) -> Vec<String> {
        self.replicas.iter().map(|r| r.addr.to_string()).collect()
    }

    /// Starts a controller over every replica, with `extra` arguments, and waits until it serves.
    pub fn start_controller(&mut self, extra: &[&str]) -> Result<Controller> {
        let replicas = self.replica_addrs();
        self.start_controller_via(&replicas, extra)
    }

    /// Starts a controller like [`Cluster::start_controller`] that reaches the replicas at `replicas`
    /// instead of their own addresses (the fault harness puts a TCP proxy in front of each one).
    pub fn start_controller_via(&mut self, replicas: &[String], extra: &[&str]) -> Result<Controller> {
        self.spawn_controller(replicas, extra, &[])
    }

    /// Starts a controller over every replica whose management API serves TLS with `tls`'s certificate
    /// and key, and waits until it serves (asking through TLS with `tls`'s CA).
    pub fn start_controller_with_api_tls(&mut self, tls: &ApiTlsFiles, extra: &[&str]) -> Result<Controller> {
        let replicas = self.replica_addrs();
        let cert = tls.cert.to_string_lossy();
        let key = tls.key.to_string_lossy();
        let mut args = vec!["--api-tls-cert", &cert, "--api-tls-key", &key];
        args.extend_from_slice(extra);
        let ca = tls.ca.to_string_lossy();
        self.spawn_controller(&replicas, &args, &["--api-ca", &ca])
    }

    /// Starts a controller with `extra` arguments and waits until `volume info` with `client` arguments
    /// answers through its API.
    fn spawn_controller(
        &mut self,
        replicas: &[String],
        extra: &[&str],
        client: &[&str],
    ) -> Result<Controller> {
        self.controllers += 1;
        let portal = free_local_addr()?;
        let api = free_local_addr()?;
        let mut cmd = basalt_command()?;
        cmd.env("RUST_LOG", "info")
            .env("BASALT_VOLUME_SECRET", &self.secret)
            .arg("controller")
            .args(["--name", VOLUME_NAME])
            .args(["--size", &self.size.bytes().to_string()])
            .args(["--iscsi", &portal.to_string()])
            .args(["--api", &api.to_string()])
            .args(["--volume-id", &self.volume_id])
            .args(["--replica-timeout", "3s"])
            .args(extra);
        for r in replicas {
            cmd.args(["--replica", r]);
        }
        let what = format!("controller-{}", self.controllers);
        let mut daemon = Daemon::spawn(
            &what,
            cmd,
            self.dir.path(),
            StopPolicy::Terminate {
                grace: Duration::from_secs(20),
            },
        )?;
        daemon.wait_until("to serve the volume API", START_TIMEOUT, || {
            volume_info_with(api, client).is_ok()
        })?;
        let url = IscsiUrl {
            portal,
            iqn: format!("{}:{VOLUME_NAME}", crate::IQN_PREFIX),
            lun: 0,
        };
        Ok(Controller { url, api, daemon })
    }

    /// Writes replica `i`'s whole volume image (as its store holds it) to a file, with
    /// `basalt replica export`. The replica must be stopped.
    pub fn export_replica(&self, i: usize) -> Result<PathBuf> {
        let out = self.dir.path().join(format!("r{}.img", i + 1));
        let mut cmd = basalt_command()?;
        cmd.args(["replica", "export", "--dir"])
            .arg(&self.replicas[i].dir)
            .arg("--out")
            .arg(&out);
        run_checked(&mut cmd)?;
        Ok(out)
    }
}

/// A certificate and key for a controller's management API, and the CA that signed them.
pub struct ApiTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// A CA (`DIR/ca.pem`) and a certificate it signed for 127.0.0.1 and `localhost` (`DIR/server.pem`,
/// key `DIR/server.key`), in `dir`, with the `openssl` command (the controller's and the agent's API TLS tests).
pub fn make_ca_and_server_cert(dir: &Path) -> Result<ApiTlsFiles> {
    let openssl = require_tool("openssl")?;
    std::fs::create_dir_all(dir).map_err(io("create the certificates' directory"))?;
    let files = ApiTlsFiles {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        ca: dir.join("ca.pem"),
    };
    let ca_key = dir.join("ca.key");
    let csr = dir.join("server.csr");
    let ext = dir.join("san.ext");
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        .map_err(io("write the SAN extension"))?;
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    run_checked(
        std::process::Command::new(&openssl)
            .args(["req", "-x509"])
            .args(ec)
            .arg("-keyout")
            .arg(&ca_key)
            .arg("-out")
            .arg(&files.ca)
            .args(["-days", "2", "-subj", "/CN=basalt-test-ca"]),
    )?;
    run_checked(
        std::process::Command::new(&openssl)
            .arg("req")
            .args(ec)
            .arg("-keyout")
            .arg(&files.key)
            .arg("-out")
            .arg(&csr)
            .args(["-subj", "/CN=basalt-controller"]),
    )?;
    run_checked(
        std::process::Command::new(&openssl)
            .args(["x509", "-req", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(&files.ca)
            .arg("-CAkey")
            .arg(&ca_key)
            .args(["-CAcreateserial", "-days", "2", "-out"])
            .arg(&files.cert)
            .arg("-extfile")
            .arg(&ext),
    )?;
    Ok(files)
}

/// `basalt volume info --api ADDR --json`, parsed.
pub fn volume_info(api: SocketAddr) -> Result<Value> {
    volume_info_with(api, &[])
}

/// `basalt volume info --api ADDR --json` with `extra` arguments (e.g. `--api-ca FILE`), parsed.
pub fn volume_info_with(api: SocketAddr, extra: &[&str]) -> Result<Value> {
    let mut cmd = basalt_command()?;
    cmd.args(["volume", "info", "--json", "--api", &api.to_string()])
        .args(extra);
    let out = run_checked(&mut cmd)?;
    serde_json::from_slice(&out.stdout).map_err(|e| crate::HarnessError::Parse {
        what: "basalt volume info --json".into(),
        detail: e.to_string(),
    })
}

/// `basalt snapshot ARGS... --api API`: whether it succeeded, and its stdout + stderr.
pub fn snapshot_cli(api: SocketAddr, args: &[&str]) -> Result<(bool, String)> {
    let out = basalt_command()?
        .arg("snapshot")
        .args(args)
        .args(["--api", &api.to_string()])
        .output()
        .map_err(io("run basalt snapshot"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// The mode ("RW", "WO", "ERR") of the replica at `addr`, from `volume info`.
pub fn replica_mode(info: &Value, addr: SocketAddr) -> Option<String> {
    info["replicas"]
        .as_array()?
        .iter()
        .find(|r| r["address"] == addr.to_string())
        .and_then(|r| r["mode"].as_str())
        .map(str::to_string)
}

/// Runs `qemu-io` commands (e.g. `write -P 0xaa 0 64k`) against the LUN through qemu's iSCSI driver.
/// Returns whether every command succeeded, and qemu-io's output.
pub fn qemu_io(url: &IscsiUrl, commands: &[&str]) -> Result<(bool, String)> {
    run_qemu_io(&["-f", "raw", "--cache", "none"], commands, &url.to_string())
}

/// [`qemu_io`] logging in as initiator `initiator` (libiscsi's `initiator-name`), as a given node does.
pub fn qemu_io_as(url: &IscsiUrl, initiator: &str, commands: &[&str]) -> Result<(bool, String)> {
    let image = format!(
        "driver=iscsi,transport=tcp,portal={},target={},lun={},initiator-name={initiator},cache.direct=on",
        url.portal, url.iqn, url.lun
    );
    run_qemu_io(&["--image-opts"], commands, &image)
}

fn run_qemu_io(options: &[&str], commands: &[&str], image: &str) -> Result<(bool, String)> {
    let qemu_io = crate::require_tool("qemu-io")?;
    let mut cmd = Command::new(qemu_io);
    cmd.args(options);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.arg(image);
    finish_qemu_io(cmd)
}

/// [`qemu_io`] run by `cmd` (qemu-io itself, or a command that runs it elsewhere, such as inside a network
/// namespace) at `url`.
pub fn qemu_io_with(mut cmd: Command, url: &str, commands: &[&str]) -> Result<(bool, String)> {
    cmd.args(["-f", "raw", "--cache", "none"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.arg(url);
    finish_qemu_io(cmd)
}

fn finish_qemu_io(mut cmd: Command) -> Result<(bool, String)> {
    let out = cmd.output().map_err(io("run qemu-io"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // qemu-io exits 0 even when a command fails; it says so in words.
    let failed = !out.status.success()
        || text.contains("failed")
        || text.contains("error")
        || text.contains("Pattern verification");
    Ok((!failed, text))
}

fn uuid_v4() -> String {
    let b = crate::random_bytes(16);
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]) & 0x0fff,
        (u16::from_be_bytes([b[8], b[9]]) & 0x3fff) | 0x8000,
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]]),
    )
}
