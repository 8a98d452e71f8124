//! The iSCSI transport at the PDU level: a raw initiator drives a portal on
//! 127.0.0.1 and checks what comes back, including for malformed input.

mod iscsi_support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use basalt_target::iscsi::pdu::{Bhs, Itt, Lun, Opcode};
use basalt_target::iscsi::{
    login, target_iqn, AllowList, AuthPolicy, ChapCredentials, ChapSecret, PortalConfig, Target, TargetConfig,
};
use basalt_target::lu::ResetKind;
use iscsi_support::*;

fn name(n: &str) -> String {
    target_iqn(n)
}

#[tokio::test]
async fn write_then_read_round_trips_through_immediate_data() {
    let dir = tempfile::tempdir().unwrap();
    let tp = start_portal(
        PortalConfig::default(),
        vec![target_with("rw", file_lu(&dir, 1 << 20))],
    )
    .await;
    let mut ini = RawInitiator::connect(tp.addr).await;
    let r = ini
        .login(&name("rw"), &[("ImmediateData", "Yes"), ("InitialR2T", "No")])
        .await;
    ini.clear_unit_attention().await;
    assert_eq!(r.key("MaxRecvDataSegmentLength").as_deref(), Some("262144"));
    let data = pattern(4096, 1);
    let resp = ini.write10_immediate(8, &data).await;
    assert_eq!(resp.bhs.0[3], 0, "write status GOOD");
    let (read, status, _) = ini.read10(8, 8).await;
    assert_eq!(status, 0);
    assert_eq!(read, data);
}

#[tokio::test]
async fn data_in_is_split_by_the_initiators_segment_length_with_status_in_the_last_pdu() {
    let dir = tempfile::tempdir().unwrap();
    let tp = start_portal(
        PortalConfig::default(),
        vec![target_with("split", file_lu(&dir, 1 << 20))],
    )
    .await;
    let mut ini = RawInitiator::connect(tp.addr).await;
    ini.login(
        &name("split"),
        &[("MaxRecvDataSegmentLength", "8192"), ("MaxBurstLength", "16384")],
    )
    .await;
    ini.clear_unit_attention().await;
    let (data, status, pdus) = ini.read10(0, 64).await;
    assert_eq!((data.len(), status), (32768, 0));
    assert_eq!(pdus.len(), 4);
    for (i, p) in pdus.iter().enumerate() {
        assert_eq!(p.opcode(), 0x25);
        assert_eq!(p.data.len(), 8192);
        assert_eq!(p.bhs.u32_at(36), i as u32, "DataSN");
        let final_of_burst = i % 2 == 1;
        assert_eq!(
            p.bhs.0[1] & 0x80 != 0,
            final_of_burst,
            "F bit ends each 16 KiB burst"
        );
    }
    assert_eq!(pdus[3].bhs.0[1] & 0x01, 0x01, "S bit on the last Data-In");
}

#[tokio::test]
async fn large_write_is_pulled_with_r2ts_honouring_burst_and_outstanding_limits() {
    let dir = tempfile::tempdir().unwrap();
    let tp = start_portal(
        PortalConfig::default(),
        vec![target_with("r2t", file_lu(&dir, 4 << 20))],
    )
    .await;
    let mut ini = RawInitiator::connect(tp.addr).await;
    ini.login(
        &name("r2t"),
        &[
            ("ImmediateData", "No"),
            ("InitialR2T", "Yes"),
            ("MaxBurstLength", "65536"),
            ("MaxOutstandingR2T", "2"),
        ],
    )
    .await;
    ini.clear_unit_attention().await;
    let data = pattern(256 * 1024, 7);
    let itt = ini.itt();
    let bhs = ini.command(
        itt,
        &write10_cdb(0, data.len()),
        data.len() as u32,
        false,
        true,
        true,
    );
    ini.send(bhs, &[]).await;
    let mut answered = 0usize;
    let mut outstanding = Vec::new();
    loop {
        while outstanding.len() < 2 && answered + outstanding.len() * 65536 < data.len() {
            let r = ini.recv().await;
            assert_eq!(r.opcode(), 0x31, "expected an R2T");
            assert_eq!(r.bhs.u32_at(44), 65536, "R2T desired length = MaxBurstLength");
            outstanding.push(r);
        }
        if outstanding.is_empty() {
            break;
        }
        let r2t = outstanding.remove(0);
        let (ttt, offset, len) = (r2t.bhs.u32_at(20), r2t.bhs.u32_at(40), r2t.bhs.u32_at(44));
        // Answer each R2T with 8 KiB Data-Out PDUs.
        for (sn, chunk_start) in (offset..offset + len).step_by(8192).enumerate() {
            let mut d = Bhs::new(Opcode::DataOut);
            d.0[1] = if chunk_start + 8192 == offset + len {
                0x80
            } else {
                0
            };
            d.set_itt(Itt(itt));
            d.set_u32(20, ttt);
            d.set_u32(36, sn as u32);
            d.set_u32(40, chunk_start);
            ini.send(d, &data[chunk_start as usize..chunk_start as usize + 8192])
                .await;
        }
        answered += len as usize;
    }
    let resp = ini.recv().await;
    assert_eq!((resp.opcode(), resp.itt(), resp.bhs.0[3]), (0x21, itt, 0));
    let (read, _, _) = ini.read10(0, 512).await;
    assert!(read == data, "data written through R2Ts reads back");
}

#[tokio::test]
async fn unsolicited_data_out_then_r2t_for_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let tp = start_portal(
        PortalConfig::default(),
        vec![target_with("unsol", file_lu(&dir, 1 << 20))],
    )
    .await;
    let mut ini = RawInitiator::connect(tp.addr).await;
    ini.login(
        &name("unsol"),
        &[
            ("InitialR2T", "No"),
            ("FirstBurstLength", "16384"),
            ("MaxBurstLength", "65536"),
        ],
    )
    .await;
    ini.clear_unit_attention().await;
    let data = pattern(40960, 3);
    let itt = ini.itt();
    // 4 KiB immediate, F=0: 12 KiB unsolicited Data-Out follow.
    let bhs = ini.command(
        itt,
        &write10_cdb(16, data.len()),
        data.len() as u32,
        false,
        true,
        false,
    );
    ini.send(bhs, &data[..4096]).await;
    let mut d = Bhs::new(Opcode::DataOut);
    d.0[1] = 0x80;
    d.set_itt(Itt(itt));
    d.set_u32(20, 0xffff_ffff);
    d.set_u32(40, 4096);
    ini.send(d, &data[4096..16384]).await;
    let r2t = ini.recv().await;
    assert_eq!(r2t.opcode(), 0x31);
    assert_eq!(
        (r2t.bhs.u32_at(40), r2t.bhs.u32_at(44)),
        (16384, 24576),
        "R2T starts after the first burst"
    );
    let mut d = Bhs::new(Opcode::DataOut);
    d.0[1] = 0x80;
    d.set_itt(Itt(itt));
    d.set_u32(20, r2t.bhs.u32_at(20));
    d.set_u32(40, 16384);
    ini.send(d, &data[16384..]).await;
    let resp = ini.recv().await;
    assert_eq!((resp.opcode(), resp.bhs.0[3]), (0x21, 0));
    assert_eq!(ini.read10(16, 80).await.0, data);
}

#[tokio::test]
async fn commands_in_flight_execute_concurrently() {
    let lu = Arc::new(GatedLu::default());
    let tp = start_portal(PortalConfig::default(), vec![target_with("qd", lu.clone())]).await;
    let mut ini = RawInitiator::connect(tp.addr).await;
    ini.login(&name("qd"), &[]).await;
    let mut itts = Vec::new();
    for i in 0..32 {
        let itt = ini.itt();
        let mut cdb = [0u8; 10];
        cdb[0] = 0x28;
        cdb[5] = i;
        cdb[8] = 8;
        let bhs = ini.command(itt, &cdb, 4096, true, false, true);
        ini.send(bhs, &[]).await;
        itts.push(itt);
    }
    // All 32 are inside the LU at the same time before any is released.
    lu.wait_started(32).await;
    assert_eq!(lu.max_running.load(Ordering::SeqCst), 32);
    lu.release(32);
    let mut done = Vec::new();
    for _ in 0..32 {
        let r = ini.recv().await;
        assert_eq!(r.opcode(), 0x25);
        assert_eq!(r.bhs.0[1] & 0x81, 0x81, "single Data-In with F and S");
        done.push(r.itt());
    }
    done.sort();
    assert_eq!(done, itts);
}

#[tokio::test]
async fn statsn_follows_transmission_order_and_max_cmdsn_opens_the_window() {
    let lu = Arc::new(GatedLu::default());
    let tp = start_portal(PortalConfig::default(), vec![target_with("sn", lu.clone())]).await;
    let mut ini = RawInitiator::connect(tp.addr).await;
    let login = ini.login(&name("sn"), &[]).await;
    let first_statsn = login.bhs.u32_at(24).wrapping_add(1);
    for _ in 0..4 {
        let itt = ini.itt();
        let bhs = ini.command(itt, &[0], 0, false, false, true);
        ini.send(bhs, &[]).await;
    }
    lu.release(4);
    for i in 0..4u32 {
        let r = ini.recv().await;
        assert_eq!(
            r.bhs.u32_at(24),
            first_statsn.wrapping_add(i),
            "StatSN increments per status"
        );
        assert_eq!(r.bhs.u32_at(28), ini.cmdsn, "ExpCmdSN acknowledges every command");
        assert!(
            r.bhs.u32_at(32).wrapping_sub(r.bhs.u32_at(28)) < 1 << 31,
            "MaxCmdSN >= ExpCmdSN"
        );
    }
}

#[tokio::test]
async fn abort_task_cancels_a_running_command_and_reports_missing_ones() {
    let lu = Arc::new(GatedLu::default());
    let tp = start_portal(PortalConfig::default(), vec![target_with("abort", lu.clone())]).await;
    let mut ini = RawInitiator::connect(tp.addr).await;
    ini.login(&name("abort"), &[]).await;
    let victim = ini.itt();
    let bhs = ini.command(victim, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], 512, true, false, true);
    ini.send(bhs, &[]).await;
    lu.wait_started(1).await;

    let tmf = |ini: &mut RawInitiator, function: u8, referenced: u32| {
        let mut bhs = Bhs::new(Opcode::TaskMgmtRequest);
        bhs.set_immediate(true);
        bhs.0[1] = 0x80 | function;
        bhs.set_lun(Lun::from_number(0));
        let itt = ini.itt();
        bhs.set_itt(Itt(itt));
        bhs.set_u32(20, referenced);
        bhs.set_u32(24, ini.cmdsn);
        bhs.set_u32(32, ini.cmdsn.wrapping_sub(1));
        (bhs, itt)
    };
    let (bhs, itt) = tmf(&mut ini, 1, victim);
    ini.send(bhs, &[]).await;
    let r = ini.recv().await;
    assert_eq!(
        (r.opcode(), r.itt(), r.bhs.0[2]),
        (0x22, itt, 0),
        "ABORT TASK: function complete"
    );
    // The aborted command never answers.
    let (bhs, itt) = tmf(&mut ini, 1, victim);
    ini.send(bhs, &[]).await;
    let r = ini.recv().await;
    assert_eq!(
        (r.opcode(), r.itt(), r.bhs.0[2]),
        (0x22, itt, 1),
        "already gone: task does not exist"
    );
    assert_eq!(
        lu.finished.load(Ordering::SeqCst),
        0,
        "the aborted command did not complete"
    );

    // LUN RESET aborts everything running and reaches the LU.
    for _ in 0..3 {
        let itt = ini.itt();
        let bhs = ini.command(itt, &[0], 0, false, false, true);
        ini.send(bhs, &[]).await;
    }
    lu.wait_started(4).await;
    let (bhs, itt) = tmf(&mut ini, 5, 0xffff_ffff);
    ini.send(bhs, &[]).await;
    let r = ini.recv().await;
    assert_eq!((r.opcode(), r.itt(), r.bhs.0[2]), (0x22, itt, 0));
    assert_eq!(*lu.resets.lock().unwrap(), vec![ResetKind::LogicalUnitReset]);
    lu.release(10);
    // Nothing but the NOP-In echo follows: the reset commands never answer.
    ini.nop_out(777, b"after").await;
    let r = ini.recv().await;
    assert_eq!((r.opcode(), r.itt(), &r.data[..]), (0x20, 777, &b"after"[..]));
}

#[tokio::test]
async fn logout_waits_for_commands_in_flight_then_answers() {
    let lu = Arc::new(GatedLu::default());
    let target = target_with("logout", lu.clone());
    let tp = start_portal(PortalConfig::default(), vec![target.clone()]).await;
    let mut ini = RawInitiator::connect(tp.addr).await;
    ini.login(&name("logout"), &[]).await;
    assert_eq!(target.session_count(), 1);
    assert_eq!(tp.portal.session_count(), 1);
    let itt = ini.itt();
    let bhs = ini.command(itt, &[0], 0, false, false, true);
    ini.send(bhs, &[]).await;
    lu.wait_started(1).await;
    let mut bhs = Bhs::new(Opcode::LogoutRequest);
    bhs.set_immediate(true);
    bhs.0[1] = 0x80;
    bhs.set_itt(Itt(99));
    bhs.set_u32(24, ini.cmdsn);
    ini.send(bhs, &[]).await;
    assert!(
        ini.quiet_for(Duration::from_millis(200)).await,
        "nothing is answered while the command is held, the logout included"
    );
    lu.release(1);
    let first = ini.recv().await;
    assert_eq!(
        (first.opcode(), first.itt()),
        (0x21, itt),
        "the command's status comes before the logout"
    );
    let second = ini.recv().await;
    assert_eq!((second.opcode(), second.bhs.0[2]), (0x26, 0));
    assert!(ini.recv_opt().await.is_none(), "connection closed after logout");
    wait_for_sessions("after the logout", || target.session_count(), 0).await;
}

#[tokio::test]
async fn nop_out_is_echoed_and_silent_initiators_are_dropped() {
    let lu = Arc::new(GatedLu::default());
    let config = PortalConfig {
        nop_in_interval: Duration::from_millis(100),
        nop_in_timeout: Duration::from_millis(200),
        ..PortalConfig::default()
    };
    let target = target_with("nop", lu);
    let tp = start_portal(config, vec![target.clone()]).await;
    let mut ini = RawInitiator::connect(tp.addr).await;
    ini.login(&name("nop"), &[]).await;
    ini.nop_out(5, b"ping-data").await;
    let r = ini.recv().await;
    assert_eq!((r.opcode(), r.itt(), &r.data[..]), (0x20, 5, &b"ping-data"[..]));
    assert_eq!(r.bhs.u32_at(20), 0xffff_ffff);
    // Idle: the target pings with a NOP-In carrying a TTT.
    let ping = ini.recv().await;
    assert_eq!((ping.opcode(), ping.itt()), (0x20, 0xffff_ffff));
    let ttt = ping.bhs.u32_at(20);
    assert_ne!(ttt, 0xffff_ffff);
    // Answering keeps the connection.
    let mut bhs = Bhs::new(Opcode::NopOut);
    bhs.set_immediate(true);
    bhs.0[1] = 0x80;
    bhs.set_itt(Itt::RESERVED);
    bhs.set_u32(20, ttt);
    bhs.set_u32(24, ini.cmdsn);
    ini.send(bhs, &[]).await;
    let again = ini.recv().await;
    assert_eq!(again.opcode(), 0x20, "pinged again after the next idle interval");
    // Not answering drops it, and the session with it.
    assert!(
        ini.closed_within(Duration::from_secs(3)).await,
        "silent initiator was not dropped"
    );
    wait_for_sessions(
        "after the silent initiator was dropped",
        || target.session_count(),
        0,
    )
    .await;
}

#[tokio::test]
async fn send_targets_lists_targets_at_the_portal_address_the_initiator_used() {
    let lu = Arc::new(GatedLu::default());
    let hidden = Target::new(TargetConfig {
        allow: AllowList::Only(vec!["iqn.someone-else".into()]),
        ..TargetConfig::new(name("hidden"), lu.clone())
    })
    .unwrap();
    let tp = start_portal(
        PortalConfig::default(),
        vec![target_with("a", lu.clone()), target_with("b", lu), hidden],
    )
    .await;
    let mut ini = RawInitiator::connect(tp.addr).await;
    let r = ini
        .login_pdu(
            0,
            Some(3),
            &[
                ("InitiatorName", INITIATOR),
                ("SessionType", "Discovery"),
                ("AuthMethod", "None"),
            ],
        )
        .await;
    assert_eq!(r.login_status(), (0, 0));
    let mut bhs = Bhs::new(Opcode::TextRequest);
    bhs.set_immediate(true);
    bhs.0[1] = 0x80;
    bhs.set_itt(Itt(3));
    bhs.set_u32(20, 0xffff_ffff);
    bhs.set_u32(24, ini.cmdsn);
    ini.send(
        bhs,
        &basalt_target::iscsi::text::encode(&[("SendTargets", "All")]),
    )
    .await;
    let r = ini.recv().await;
    assert_eq!(r.opcode(), 0x24);
    let address = format!("{},1", tp.addr);
    assert_eq!(
        r.keys(),
        vec![
            ("TargetName".to_string(), name("a")),
            ("TargetAddress".to_string(), address.clone()),
            ("TargetName".to_string(), name("b")),
            ("TargetAddress".to_string(), address),
        ],
        "targets the initiator may not use are not listed"
    );
    // SCSI commands have no place on a discovery session.
    let bhs = ini.command(9, &[0], 0, false, false, true);
    ini.send(bhs, &[]).await;
    let r = ini.recv().await;
    assert_eq!(r.opcode(), 0x3f, "Reject");
    assert_eq!(ini.logout().await.bhs.0[2], 0);
}

fn chap_target(lu: Arc<GatedLu>, mutual: bool) -> Arc<Target> {
    let initiator = ChapCredentials::new("alice", ChapSecret::new("alice-secret-123")).unwrap();
    let target =
        mutual.then(|| ChapCredentials::new("basalt", ChapSecret::new("target-secret-456")).unwrap());
    Target::new(TargetConfig {
        auth: AuthPolicy::chap(initiator, target).unwrap(),
        ..TargetConfig::new(name("chap"), lu)
    })
    .unwrap()
}

/// Run CHAP up to the response; returns the target's reply.
async fn chap_exchange(ini: &mut RawInitiator, secret: &str, mutual: Option<&[u8]>) -> Received {
    let r = ini
        .login_pdu(
            0,
            None,
            &[
                ("InitiatorName", INITIATOR),
                ("TargetName", &name("chap")),
                ("AuthMethod", "CHAP,None"),
            ],
        )
        .await;
    assert_eq!(r.key("AuthMethod").as_deref(), Some("CHAP"));
    let r = ini.login_pdu(0, None, &[("CHAP_A", "5")]).await;
    let id: u8 = r.key("CHAP_I").unwrap().parse().unwrap();
    let challenge = login::decode_binary(&r.key("CHAP_C").unwrap()).unwrap();
    let response = format!(
        "0x{}",
        login::hex_encode(&login::chap_response(id, secret.as_bytes(), &challenge))
    );
    let mut keys = vec![("CHAP_N", "alice".to_string()), ("CHAP_R", response)];
    if let Some(c) = mutual {
        keys.push(("CHAP_I", "42".to_string()));
        keys.push(("CHAP_C", format!("0x{}", login::hex_encode(c))));
    }
    let keys: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (*k, v.as_str())).collect();
    ini.login_pdu(0, Some(1), &keys).await
}

#[tokio::test]
async fn chap_with_the_right_secret_logs_in_and_a_wrong_one_is_refused() {
    let tp = start_portal(
        PortalConfig::default(),
        vec![chap_target(Arc::new(GatedLu::default()), false)],
    )
    .await;
    let mut good = RawInitiator::connect(tp.addr).await;
    let r = chap_exchange(&mut good, "alice-secret-123", None).await;
    assert_eq!(r.login_status(), (0, 0));
    assert!(r.bhs.0[1] & 0x80 != 0, "moves on to operational negotiation");

    let mut bad = RawInitiator::connect(tp.addr).await;
    let r = chap_exchange(&mut bad, "guessed-secret", None).await;
    assert_eq!(r.login_status(), (2, 1), "authentication failure");
    assert!(
        bad.recv_opt().await.is_none(),
        "connection closed after a failed login"
    );

    // Skipping security on a CHAP target is refused too.
    let mut sneaky = RawInitiator::connect(tp.addr).await;
    let r = sneaky
        .login_pdu(
            1,
            Some(3),
            &[("InitiatorName", INITIATOR), ("TargetName", &name("chap"))],
        )
        .await;
    assert_eq!(r.login_status(), (2, 1));
}

#[tokio::test]
async fn mutual_chap_proves_the_target_to_the_initiator() {
    let tp = start_portal(
        PortalConfig::default(),
        vec![chap_target(Arc::new(GatedLu::default()), true)],
    )
    .await;
    let mut ini = RawInitiator::connect(tp.addr).await;
    let r = chap_exchange(
        &mut ini,
        "alice-secret-123",
        Some(b"a challenge from the initiator"),
    )
    .await;
    assert_eq!(r.login_status(), (0, 0));
    assert_eq!(r.key("CHAP_N").as_deref(), Some("basalt"));
    let expected = login::chap_response(42, b"target-secret-456", b"a challenge from the initiator");
    assert_eq!(login::decode_binary(&r.key("CHAP_R").unwrap()).unwrap(), expected);
}

#[tokio::test]
async fn unknown_targets_and_unlisted_initiators_are_refused() {
    let lu = Arc::new(GatedLu::default());
    let private = Target::new(TargetConfig {
        allow: AllowList::Only(vec!["iqn.2026-11.org.example:other".into()]),
        ..TargetConfig::new(name("private"), lu)
    })
    .unwrap();
    let tp = start_portal(PortalConfig::default(), vec![private]).await;
    let mut ini = RawInitiator::connect(tp.addr).await;
    let r = ini
        .login_pdu(
            0,
            Some(1),
            &[("InitiatorName", INITIATOR), ("TargetName", &name("nope"))],
        )
        .await;
    assert_eq!(r.login_status(), (2, 3), "not found");
    let mut ini = RawInitiator::connect(tp.addr).await;
    let r = ini
        .login_pdu(
            0,
            Some(1),
            &[("InitiatorName", INITIATOR), ("TargetName", &name("private"))],
        )
        .await;
    assert_eq!(r.login_status(), (2, 2), "authorization failure");
}

#[tokio::test]
async fn crc32c_digests_protect_header_and_data_when_negotiated() {
    let dir = tempfile::tempdir().unwrap();
    let tp = start_portal(
        PortalConfig::default(),
        vec![target_with("dig", file_lu(&dir, 1 << 20))],
    )
    .await;
    let mut ini = RawInitiator::connect(tp.addr).await;
    let r = ini
        .login(
            &name("dig"),
            &[("HeaderDigest", "CRC32C,None"), ("DataDigest", "CRC32C,None")],
        )
        .await;
    ini.clear_unit_attention().await;
    assert!(
        ini.header_digest && ini.data_digest,
        "digests negotiated: {:?}",
        r.keys()
    );
    let data = pattern(1536, 9);
    assert_eq!(ini.write10_immediate(3, &data).await.bhs.0[3], 0);
    assert_eq!(ini.read10(3, 3).await.0, data);

    // A corrupted data digest: Reject, and the connection goes on.
    let itt = ini.itt();
    let bhs = ini.command(itt, &write10_cdb(0, 512), 512, false, true, true);
    ini.data_digest = false;
    let mut payload = pattern(512, 1);
    payload.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    // Send with a header digest but a wrong data digest appended by hand.
    let mut raw = Vec::new();
    let mut bhs = bhs;
    bhs.set_data_segment_len(512);
    bhs.set_u32(28, ini.exp_statsn);
    raw.extend_from_slice(&bhs.0);
    raw.extend_from_slice(&basalt_target::iscsi::digest::to_wire(
        basalt_target::iscsi::digest::crc32c(&[&bhs.0]),
    ));
    raw.extend_from_slice(&payload);
    ini.send_raw(&raw).await;
    ini.data_digest = true;
    let r = ini.recv().await;
    assert_eq!(
        (r.opcode(), r.bhs.0[2]),
        (0x3f, 0x02),
        "Reject: data digest error"
    );
    ini.nop_out(31, b"still here").await;
    assert_eq!(ini.recv().await.itt(), 31);

    // A corrupted header digest: the stream cannot be trusted; closed.
    let mut bhs = Bhs::new(Opcode::NopOut);
    bhs.set_itt(Itt(32));
    let mut raw = bhs.0.to_vec();
    raw.extend_from_slice(&[1, 2, 3, 4]);
    ini.send_raw(&raw).await;
    assert!(ini.closed_within(Duration::from_secs(3)).await);
}

/// A healthy session that must keep working while others misbehave.
async fn healthy(addr: std::net::SocketAddr) -> RawInitiator {
    let mut ini = RawInitiator::connect(addr).await;
    ini.isid = [0x80, 0, 0, 0, 0x99, 0x99];
    ini.login(&name("bad"), &[]).await;
    ini
}

async fn still_healthy(ini: &mut RawInitiator, itt: u32) {
    ini.nop_out(itt, b"ok").await;
    let r = ini.recv().await;
    assert_eq!(
        (r.opcode(), r.itt()),
        (0x20, itt),
        "the healthy session stopped answering"
    );
}

#[tokio::test]
async fn malformed_input_closes_or_rejects_only_the_offending_connection() {
    let lu = Arc::new(GatedLu::default());
    let tp = start_portal(PortalConfig::default(), vec![target_with("bad", lu)]).await;
    let mut ok = healthy(tp.addr).await;

    // Junk bytes before login: closed.
    let mut junk = RawInitiator::connect(tp.addr).await;
    junk.send_raw(&[0xffu8; 200]).await;
    assert!(
        junk.closed_within(Duration::from_secs(3)).await,
        "junk before login"
    );
    still_healthy(&mut ok, 100).await;

    // A SCSI command before login: login reject, closed.
    let mut early = RawInitiator::connect(tp.addr).await;
    let bhs = early.command(1, &[0x12, 0, 0, 0, 36, 0], 36, true, false, true);
    early.send(bhs, &[]).await;
    let r = early.recv().await;
    assert_eq!((r.opcode(), r.login_status()), (0x23, (2, 0)));
    assert!(early.closed_within(Duration::from_secs(3)).await);
    still_healthy(&mut ok, 101).await;

    // In full feature phase: unknown opcode -> Reject (command not supported).
    let mut rogue = RawInitiator::connect(tp.addr).await;
    rogue.login(&name("bad"), &[]).await;
    let mut bhs = Bhs::default();
    bhs.0[0] = 0x1c;
    rogue.send(bhs, &[]).await;
    let r = rogue.recv().await;
    assert_eq!((r.opcode(), r.bhs.0[2]), (0x3f, 0x05));
    assert_eq!(
        &r.data[..28],
        &bhs.0[..28],
        "the Reject carries the rejected header"
    );
    // A target opcode from an initiator -> Reject (protocol error).
    let bhs = Bhs::new(Opcode::ScsiResponse);
    rogue.send(bhs, &[]).await;
    assert_eq!(rogue.recv().await.bhs.0[2], 0x04);
    // SNACK at ErrorRecoveryLevel 0 -> Reject.
    let bhs = Bhs::new(Opcode::SnackRequest);
    rogue.send(bhs, &[]).await;
    assert_eq!(rogue.recv().await.opcode(), 0x3f);
    // An out-of-window CmdSN is dropped silently; the next good one works.
    let saved = rogue.cmdsn;
    rogue.cmdsn = saved.wrapping_add(100_000);
    let bhs = rogue.command(50, &[0], 0, false, false, true);
    rogue.send(bhs, &[]).await;
    rogue.cmdsn = saved;
    rogue.nop_out(51, b"x").await;
    let r = rogue.recv().await;
    assert_eq!(r.itt(), 51, "the out-of-window command got no answer");
    // Immediate data on a read: Reject.
    let bhs = rogue.command(52, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], 512, true, false, true);
    rogue.send(bhs, &[1, 2, 3, 4]).await;
    assert_eq!(rogue.recv().await.opcode(), 0x3f);
    // A data segment beyond our MaxRecvDataSegmentLength: closed.
    let mut bhs = Bhs::new(Opcode::NopOut);
    bhs.set_data_segment_len(1 << 20);
    rogue.send_raw(&bhs.0).await;
    assert!(
        rogue.closed_within(Duration::from_secs(3)).await,
        "oversized segment"
    );
    still_healthy(&mut ok, 102).await;

    // Login with an unknown CSG and with garbage text: refused.
    let mut odd = RawInitiator::connect(tp.addr).await;
    let mut bhs = Bhs::new(Opcode::LoginRequest);
    bhs.0[1] = 0x08 | 0x80 | 0x03; // CSG=2 (reserved)
    odd.send(bhs, &[]).await;
    assert!(odd.closed_within(Duration::from_secs(3)).await);
    let mut odd = RawInitiator::connect(tp.addr).await;
    let mut bhs = Bhs::new(Opcode::LoginRequest);
    bhs.0[1] = 0x81;
    odd.send(bhs, b"no equals sign\0\xff\xfe").await;
    let r = odd.recv().await;
    assert_eq!(r.login_status(), (2, 0));
    still_healthy(&mut ok, 103).await;
}

#[tokio::test]
async fn data_out_with_a_wrong_offset_fails_only_that_command() {
    let lu = Arc::new(GatedLu::default());
    let tp = start_portal(PortalConfig::default(), vec![target_with("dout", lu.clone())]).await;
    let mut ini = RawInitiator::connect(tp.addr).await;
    ini.login(&name("dout"), &[("ImmediateData", "No"), ("InitialR2T", "Yes")])
        .await;
    let itt = ini.itt();
    let bhs = ini.command(itt, &write10_cdb(0, 1024), 1024, false, true, true);
    ini.send(bhs, &[]).await;
    let r2t = ini.recv().await;
    assert_eq!(r2t.opcode(), 0x31);
    let mut d = Bhs::new(Opcode::DataOut);
    d.0[1] = 0x80;
    d.set_itt(Itt(itt));
    d.set_u32(20, r2t.bhs.u32_at(20));
    d.set_u32(40, 512); // should be 0
    ini.send(d, &[0u8; 512]).await;
    assert_eq!(ini.recv().await.opcode(), 0x3f, "Reject");
    let r = ini.recv().await;
    assert_eq!(
        (r.opcode(), r.itt(), r.bhs.0[2]),
        (0x21, itt, 0x01),
        "target failure for that command"
    );
    still_healthy(&mut ini, 77).await;
    assert_eq!(lu.started.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn shutdown_closes_sessions_and_serve_returns() {
    let lu = Arc::new(GatedLu::default());
    let target = target_with("stop", lu);
    let mut tp = start_portal(PortalConfig::default(), vec![target.clone()]).await;
    let mut a = RawInitiator::connect(tp.addr).await;
    a.login(&name("stop"), &[]).await;
    let mut b = RawInitiator::connect(tp.addr).await;
    b.isid[5] = 9;
    b.login(&name("stop"), &[]).await;
    assert_eq!(target.session_count(), 2);
    tp.shutdown.cancel();
    let served = tokio::time::timeout(Duration::from_secs(5), &mut tp.served).await;
    assert!(matches!(served, Ok(Ok(Ok(())))), "serve returned cleanly");
    assert!(a.closed_within(Duration::from_secs(1)).await && b.closed_within(Duration::from_secs(1)).await);
    assert_eq!(target.session_count(), 0);
}

#[tokio::test]
async fn session_reinstatement_replaces_the_old_session_of_the_same_isid() {
    let lu = Arc::new(GatedLu::default());
    let target = target_with("reinstate", lu);
    let tp = start_portal(PortalConfig::default(), vec![target.clone()]).await;
    let mut old = RawInitiator::connect(tp.addr).await;
    old.login(&name("reinstate"), &[]).await;
    let mut new = RawInitiator::connect(tp.addr).await;
    new.login(&name("reinstate"), &[]).await;
    assert!(
        old.closed_within(Duration::from_secs(3)).await,
        "the old session was closed"
    );
    wait_for_sessions("after the reinstatement", || target.session_count(), 1).await;
    still_healthy(&mut new, 5).await;
}
