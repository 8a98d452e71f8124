//! Membership survives a controller restart: `basalt replica rm` and `replica add` are recorded on the
//! replicas, and a controller started again with the old `--replica` list follows what was recorded.

use std::net::SocketAddr;
use std::time::Duration;

use basalt_tests::volume::{qemu_io, replica_mode, volume_info, Cluster, Controller, Replica};
use basalt_tests::{basalt_command, free_local_addr, read_file, run_checked, wait_for, ByteSize, Result};

/// `basalt replica add|rm --api API ADDR`, checked; its stdout.
fn replica_cli(verb: &str, api: SocketAddr, addr: SocketAddr) -> Result<String> {
    let mut cmd = basalt_command()?;
    cmd.args(["replica", verb, "--api", &api.to_string(), &addr.to_string()]);
    let out = run_checked(&mut cmd)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The replica addresses the controller lists.
fn listed(api: SocketAddr) -> Result<Vec<String>> {
    let info = volume_info(api)?;
    Ok(info["replicas"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .filter_map(|r| r["address"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

fn wait_rw(controller: &Controller, addr: SocketAddr) -> Result<()> {
    wait_for(
        &format!("replica {addr} to be RW"),
        Duration::from_secs(60),
        || {
            volume_info(controller.api)
                .map(|i| replica_mode(&i, addr).as_deref() == Some("RW"))
                .unwrap_or(false)
        },
    )
}

#[test]
fn a_removed_replica_is_not_re_added_by_a_controller_started_with_the_old_list() -> Result<()> {
    let mut cluster = Cluster::start(3, ByteSize::mib(32))?;
    let old_list = cluster.replica_addrs();
    let removed = cluster.replicas[2].addr;
    let controller = cluster.start_controller(&[])?;
    let (ok, out) = qemu_io(&controller.url, &["write -P 0x3c 0 2M", "flush"])?;
    assert!(ok, "{out}");
    let said = replica_cli("rm", controller.api, removed)?;
    assert!(said.contains("removed"), "{said}");
    controller.daemon.stop()?;

    // The old flags still name the removed replica, which is up and answering.
    let controller = cluster.start_controller_via(&old_list, &[])?;
    for r in &cluster.replicas[..2] {
        wait_rw(&controller, r.addr)?;
    }
    let replicas = listed(controller.api)?;
    assert!(
        !replicas.contains(&removed.to_string()),
        "the removed replica is not part of the volume again: {replicas:?}"
    );
    assert_eq!(replicas.len(), 2, "{replicas:?}");
    assert!(
        controller
            .daemon
            .plain_log()
            .contains("not a member of the volume"),
        "the log says why the listed replica is not used"
    );
    let (ok, out) = qemu_io(&controller.url, &["read -P 0x3c 0 2M"])?;
    assert!(ok, "the volume serves its data from the two members: {out}");
    controller.daemon.stop()?;
    Ok(())
}

#[test]
fn an_added_replica_stays_a_member_and_serves_after_a_restart_with_the_old_list() -> Result<()> {
    let mut cluster = Cluster::start(2, ByteSize::mib(32))?;
    let old_list = cluster.replica_addrs();
    let controller = cluster.start_controller(&[])?;
    let (ok, out) = qemu_io(&controller.url, &["write -P 0x5a 0 2M", "flush"])?;
    assert!(ok, "{out}");

    let added = free_local_addr()?;
    cluster.replicas.push(Replica {
        addr: added,
        dir: cluster.dir.path().join("r3"),
        daemon: None,
    });
    cluster.start_replica(2)?;
    let said = replica_cli("add", controller.api, added)?;
    assert!(said.contains("rebuilding"), "{said}");
    wait_rw(&controller, added)?;
    controller.daemon.stop()?;

    // Restarted with the list of before the add: the added replica is still a member.
    let controller = cluster.start_controller_via(&old_list, &[])?;
    wait_rw(&controller, added)?;
    let replicas = listed(controller.api)?;
    assert_eq!(replicas.len(), 3, "{replicas:?}");
    // It serves: it takes the writes made after the restart, like the others.
    let (ok, out) = qemu_io(&controller.url, &["write -P 0xa5 1M 1M", "flush"])?;
    assert!(ok, "{out}");
    controller.daemon.stop()?;
    for i in 0..3 {
        cluster.stop_replica(i)?;
    }
    let first = read_file(&cluster.export_replica(0)?)?;
    let third = read_file(&cluster.export_replica(2)?)?;
    assert!(
        first == third,
        "the added replica holds what the others hold, writes after the restart included"
    );
    assert!(third[1 << 20..2 << 20].iter().all(|&b| b == 0xa5));
    Ok(())
}
