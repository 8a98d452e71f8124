//! Hosts as network namespaces, for the tests that need several machines.
//!
//! ```text
//!   root namespace:  bridge bsbN (no address)
//!                      |            |            |
//!                    vNh0         vNh1         vNh2        veth pairs; the test cuts a host's link by
//!                      |            |            |          taking its root-side end down
//!   namespaces:      bsNh0        bsNh1        bsNh2
//!                    eth0         eth0         eth0
//!                    10.77.N.1    10.77.N.2    10.77.N.3    addresses only inside the namespaces
//! ```
//!
//! Frames between the hosts cross the root namespace's bridge, so the harness adds an iptables rule that
//! forwards within it (Docker's FORWARD policy is DROP) and removes it on drop.
//!
//! Each [`Network`] takes a subnet `10.77.N.0/24` of its own (claimed by creating the bridge `bsbN`,
//! which fails if another test holds N), so tests run concurrently. Each host has its own network
//! stack: its services listen on fixed ports of its own address, and 127.0.0.1 inside it is its own.
//! Dropping the network (at the end of the test or while a failed assertion unwinds) deletes the
//! namespaces and the bridge; processes started in them must be stopped first (declare their guards
//! after the network, so they drop before it).

use std::net::Ipv4Addr;
use std::process::Command;

use crate::{HarnessError, Result};

/// A set of hosts on one bridge.
pub struct Network {
    subnet: u8,
    hosts: Vec<Host>,
}

/// One host: a network namespace with one link to the bridge.
#[derive(Clone, Debug)]
pub struct Host {
    /// The namespace's name (`ip netns exec NAME ...`).
    pub namespace: String,
    /// The host's address.
    pub address: Ipv4Addr,
    /// The root-side end of its link (taken down to cut the host off).
    link: String,
}

/// Runs `ip ARGS` (in the root namespace).
fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().map_err(|e| HarnessError::ToolMissing {
        tool: format!("{:?}", cmd.get_program()),
        why: e.to_string(),
    })?;
    if out.status.success() {
        return Ok(());
    }
    Err(HarnessError::CommandFailed {
        command: format!("{cmd:?}"),
        status: out.status,
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    })
}

impl Network {
    /// `hosts` namespaces on a bridge of their own, each up with its address.
    pub fn new(hosts: usize) -> Result<Network> {
        assert!((1..=250).contains(&hosts), "1 to 250 hosts");
        let subnet = Network::claim_subnet()?;
        let mut network = Network {
            subnet,
            hosts: Vec::new(),
        };
        let bridge = network.bridge();
        // Docker sets the FORWARD policy to DROP, and with br_netfilter bridged frames pass through it:
        // let this bridge's hosts talk to each other (removed again on drop).
        for iptables in ["iptables", "iptables-legacy"] {
            let rule = network.forward_rule("-I");
            let result = run(Command::new(iptables).args(&rule));
            if iptables == "iptables" {
                result?;
            }
        }
        for i in 0..hosts {
            let host = Host {
                namespace: format!("bs{subnet}h{i}"),
                address: Ipv4Addr::new(10, 77, subnet, i as u8 + 1),
                link: format!("v{subnet}h{i}"),
            };
            // A namespace left by a test that was killed (SIGKILL skips the drop) holds the name.
            let _ = ip(&["netns", "del", &host.namespace]);
            ip(&["netns", "add", &host.namespace])?;
            network.hosts.push(host.clone());
            ip(&[
                "link",
                "add",
                &host.link,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &host.namespace,
            ])?;
            ip(&["link", "set", &host.link, "master", &bridge, "up"])?;
            let cidr = format!("{}/24", host.address);
            network.ip_in(i, &["addr", "add", &cidr, "dev", "eth0"])?;
            network.ip_in(i, &["link", "set", "eth0", "up"])?;
            network.ip_in(i, &["link", "set", "lo", "up"])?;
        }
        Ok(network)
    }

    /// Takes a free N by creating the bridge `bsbN`: creation fails if it exists.
    fn claim_subnet() -> Result<u8> {
        let start = rand::random::<u8>();
        let mut last = None;
        for k in 0..=255u16 {
            let n = start.wrapping_add(k as u8);
            if n == 0 || n == 255 {
                continue;
            }
            let bridge = format!("bsb{n}");
            match ip(&["link", "add", "name", &bridge, "type", "bridge"]) {
                Ok(()) => {
                    ip(&["link", "set", &bridge, "up"])?;
                    return Ok(n);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one subnet was tried"))
    }

    fn bridge(&self) -> String {
        format!("bsb{}", self.subnet)
    }

    /// The iptables arguments that insert (`-I`) or delete (`-D`) the rule forwarding within the bridge.
    fn forward_rule(&self, action: &str) -> Vec<String> {
        let bridge = self.bridge();
        [action, "FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT"]
            .map(String::from)
            .to_vec()
    }

    fn ip_in(&self, host: usize, args: &[&str]) -> Result<()> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.hosts[host].namespace, "ip"])
            .args(args))
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// A command that runs `program` inside host `i`'s namespace.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.hosts[i].namespace]).arg(program);
        cmd
    }

    /// Like [`Network::command`], but the program keeps this machine's mount namespace (`ip netns exec`
    /// gives each command a mount namespace of its own): what it mounts (a CSI node's staging and
    /// publication mounts, its FUSE exports) the test sees, checks and cleans up. Only the network is
    /// the host's own.
    pub fn command_sharing_mounts(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.hosts[i].namespace))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Cuts host `i` off the others, as a pulled cable: its packets go nowhere, nothing is refused.
    pub fn cut(&self, i: usize) -> Result<()> {
        ip(&["link", "set", &self.hosts[i].link, "down"])
    }

    /// Gives host `i` its link back.
    pub fn restore(&self, i: usize) -> Result<()> {
        ip(&["link", "set", &self.hosts[i].link, "up"])
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for host in &self.hosts {
            // Deleting the namespace deletes its end of the veth pair, and with it the root-side end.
            let _ = ip(&["netns", "del", &host.namespace]);
            let _ = ip(&["link", "del", &host.link]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
        for iptables in ["iptables", "iptables-legacy"] {
            let _ = run(Command::new(iptables).args(self.forward_rule("-D")));
        }
    }
}

/// An etcd cluster with one member per host, on each host's address (ports 2379 and 2380 of its own
/// stack), data under `dir`. Members are started with [`EtcdCluster::start`] and can be killed and
/// started again one by one.
pub struct EtcdCluster {
    members: Vec<Option<crate::Daemon>>,
    dir: std::path::PathBuf,
    initial_cluster: String,
    /// Clients reach the members over TLS and present a certificate signed by this CA.
    tls: Option<EtcdTls>,
}

/// PEM files for an etcd cluster that serves clients over TLS and checks their certificates
/// (`--client-cert-auth`), made with the `openssl` tool: a CA, the members' certificate (every host's
/// address as a subject alternative name) and a client certificate, all signed by the CA.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: std::path::PathBuf,
    pub server_cert: std::path::PathBuf,
    pub server_key: std::path::PathBuf,
    pub client_cert: std::path::PathBuf,
    pub client_key: std::path::PathBuf,
}

impl EtcdTls {
    /// Makes the files in `dir` for the hosts of `network`.
    pub fn generate(network: &Network, dir: &std::path::Path) -> Result<EtcdTls> {
        let file = |name: &str| dir.join(name);
        let tls = EtcdTls {
            ca: file("etcd-ca.pem"),
            server_cert: file("etcd-server.pem"),
            server_key: file("etcd-server-key.pem"),
            client_cert: file("etcd-client.pem"),
            client_key: file("etcd-client-key.pem"),
        };
        let ca_key = file("etcd-ca-key.pem");
        let openssl = |args: &[&std::ffi::OsStr]| run(Command::new("openssl").args(args));
        let os = |s: &str| std::ffi::OsString::from(s);
        openssl(&[
            &os("req"),
            &os("-x509"),
            &os("-newkey"),
            &os("ec"),
            &os("-pkeyopt"),
            &os("ec_paramgen_curve:prime256v1"),
            &os("-nodes"),
            &os("-days"),
            &os("2"),
            &os("-subj"),
            &os("/CN=basalt-test-etcd-ca"),
            &os("-keyout"),
            ca_key.as_os_str(),
            &os("-out"),
            tls.ca.as_os_str(),
        ])?;
        let sans = network
            .hosts()
            .iter()
            .map(|h| format!("IP:{}", h.address))
            .collect::<Vec<_>>()
            .join(",");
        for (cert, key, name, extensions) in [
            (
                &tls.server_cert,
                &tls.server_key,
                "etcd",
                format!("subjectAltName={sans}\nextendedKeyUsage=serverAuth\n"),
            ),
            (
                &tls.client_cert,
                &tls.client_key,
                "basalt-agent",
                "extendedKeyUsage=clientAuth\n".to_string(),
            ),
        ] {
            let csr = dir.join(format!("{name}.csr"));
            let ext = dir.join(format!("{name}.ext"));
            std::fs::write(&ext, extensions).map_err(|source| HarnessError::Io {
                action: format!("write {}", ext.display()),
                source,
            })?;
            openssl(&[
                &os("req"),
                &os("-newkey"),
                &os("ec"),
                &os("-pkeyopt"),
                &os("ec_paramgen_curve:prime256v1"),
                &os("-nodes"),
                &os("-subj"),
                &os(&format!("/CN={name}")),
                &os("-keyout"),
                key.as_os_str(),
                &os("-out"),
                csr.as_os_str(),
            ])?;
            openssl(&[
                &os("x509"),
                &os("-req"),
                &os("-in"),
                csr.as_os_str(),
                &os("-CA"),
                tls.ca.as_os_str(),
                &os("-CAkey"),
                ca_key.as_os_str(),
                &os("-CAcreateserial"),
                &os("-days"),
                &os("2"),
                &os("-extfile"),
                ext.as_os_str(),
                &os("-out"),
                cert.as_os_str(),
            ])?;
        }
        Ok(tls)
    }
}

/// etcd's client port on every host.
pub const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;

impl EtcdCluster {
    /// Starts a member on every host of `network`.
    pub fn start(network: &Network, dir: &std::path::Path) -> Result<EtcdCluster> {
        EtcdCluster::start_with(network, dir, None)
    }

    /// The same, serving clients over TLS and checking their certificates when `tls` is given.
    pub fn start_with(network: &Network, dir: &std::path::Path, tls: Option<EtcdTls>) -> Result<EtcdCluster> {
        let initial_cluster = network
            .hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| format!("m{i}=http://{}:{ETCD_PEER_PORT}", h.address))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members: network.hosts().iter().map(|_| None).collect(),
            dir: dir.to_path_buf(),
            initial_cluster,
            tls,
        };
        for i in 0..network.hosts().len() {
            cluster.start_member(network, i)?;
        }
        Ok(cluster)
    }

    /// The client URLs of every member (what an agent's `cluster.etcd.endpoints` lists).
    pub fn endpoints(network: &Network) -> Vec<String> {
        EtcdCluster::endpoints_with(network, "http")
    }

    /// The same with `scheme` (`https` for a cluster started with TLS).
    pub fn endpoints_with(network: &Network, scheme: &str) -> Vec<String> {
        network
            .hosts()
            .iter()
            .map(|h| format!("{scheme}://{}:{ETCD_CLIENT_PORT}", h.address))
            .collect()
    }

    /// Starts (again) the member of host `i`, on its data directory.
    pub fn start_member(&mut self, network: &Network, i: usize) -> Result<()> {
        let host = network.host(i);
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://{}:{ETCD_CLIENT_PORT}", host.address);
        let peer = format!("http://{}:{ETCD_PEER_PORT}", host.address);
        let mut cmd = network.command(i, "etcd");
        cmd.arg("--name")
            .arg(format!("m{i}"))
            .arg("--data-dir")
            .arg(self.dir.join(format!("etcd-m{i}")))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &self.initial_cluster])
            .args([
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "basalt-test",
            ]);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let member = crate::Daemon::spawn(&format!("etcd-m{i}"), cmd, &self.dir, crate::StopPolicy::Kill)?;
        self.members[i] = Some(member);
        Ok(())
    }

    /// SIGKILL the member of host `i`.
    pub fn kill_member(&mut self, i: usize) {
        // Dropping the guard kills its process group.
        self.members[i] = None;
    }
}
