//! The SCSI command set, specified through `LogicalUnit::execute` with CDB
//! bytes: no network, a real sparse file underneath.

use std::sync::Arc;

use basalt_target::device::{BlockDevice, DeviceError, Geometry, Provisioning};
use basalt_target::file::{FileDevice, FileDeviceOptions};
use basalt_target::lu::{
    DataDirection, ItNexus, LogicalUnit, ResetKind, ScsiCommand, ScsiResult, ScsiStatus, TaskAttribute,
};
use basalt_target::scsi::table::COMMANDS;
use basalt_target::scsi::{LuConfig, ScsiLogicalUnit};
use bytes::Bytes;

const BS: usize = 512;
const BLOCKS: u64 = 2048;

struct Harness<D: BlockDevice> {
    lu: ScsiLogicalUnit<D>,
    _dir: Option<tempfile::TempDir>,
}

fn nexus(name: &str, isid_last: u8) -> Arc<ItNexus> {
    Arc::new(ItNexus {
        initiator_name: name.into(),
        isid: [0x80, 0, 0, 0, 0, isid_last],
        tpgt: 1,
    })
}

fn file_lu(config: LuConfig) -> Harness<FileDevice> {
    let dir = tempfile::tempdir().unwrap();
    let opts = FileDeviceOptions {
        size: Some(BLOCKS * BS as u64),
        logical_block_size: BS as u32,
    };
    let dev = FileDevice::open(dir.path().join("lun0.img"), opts).unwrap();
    Harness {
        lu: ScsiLogicalUnit::new(Arc::new(dev), config),
        _dir: Some(dir),
    }
}

fn lu() -> Harness<FileDevice> {
    file_lu(LuConfig::new("basalt-test-0001"))
}

impl<D: BlockDevice> Harness<D> {
    async fn exec(&self, who: &Arc<ItNexus>, cdb: &[u8], data_out: &[u8], edtl: u32) -> ScsiResult {
        self.exec_lun(who, 0, cdb, data_out, edtl).await
    }

    async fn exec_lun(
        &self,
        who: &Arc<ItNexus>,
        lun: u64,
        cdb: &[u8],
        data_out: &[u8],
        edtl: u32,
    ) -> ScsiResult {
        let direction = if data_out.is_empty() {
            DataDirection::Read
        } else {
            DataDirection::Write
        };
        self.lu
            .execute(ScsiCommand {
                nexus: Arc::clone(who),
                lun,
                cdb: Bytes::copy_from_slice(cdb),
                direction,
                attribute: TaskAttribute::Simple,
                expected_transfer_len: edtl,
                data_out: Bytes::copy_from_slice(data_out),
            })
            .await
    }

    /// Log a nexus in and consume its power-on unit attention.
    async fn login(&self, who: &Arc<ItNexus>) {
        self.lu.nexus_added(who);
        let r = self.exec(who, &[0; 6], &[], 0).await;
        assert_eq!(sense_of(&r), (0x6, 0x29, 0x00));
    }
}

fn sense_of(r: &ScsiResult) -> (u8, u8, u8) {
    assert_eq!(
        r.status,
        ScsiStatus::CheckCondition,
        "expected CHECK CONDITION, got {r:?}"
    );
    let s = r.sense.as_ref().expect("sense data with CHECK CONDITION");
    (s[2] & 0x0F, s[12], s[13])
}

fn good(r: &ScsiResult) {
    assert_eq!(r.status, ScsiStatus::Good, "expected GOOD, got {r:?}");
}

fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x28;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = read10(lba, blocks);
    c[0] = 0x2A;
    c
}

fn rw16(opcode: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = opcode;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn pr_out(sa: u8, ty: u8, key: u64, sa_key: u64) -> ([u8; 10], [u8; 24]) {
    let mut c = [0u8; 10];
    c[0] = 0x5F;
    c[1] = sa;
    c[2] = ty;
    c[8] = 24;
    let mut p = [0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    (c, p)
}

#[tokio::test]
async fn write_then_read_returns_the_same_blocks() {
    let h = lu();
    let a = nexus("iqn.a", 1);
    h.login(&a).await;
    let data: Vec<u8> = (0..2 * BS).map(|i| (i % 251) as u8).collect();
    let w = h.exec(&a, &write10(7, 2), &data, data.len() as u32).await;
    good(&w);
    assert_eq!(w.data_out_len, 2 * BS as u32);
    let r = h.exec(&a, &read10(7, 2), &[], 2 * BS as u32).await;
    good(&r);
    assert_eq!(&r.data_in[..], &data[..]);
}

#[tokio::test]
async fn read16_and_write16_at_the_last_block_work_and_one_past_is_out_of_range() {
    let h = lu();
    let a = nexus("iqn.a", 1);
    h.login(&a).await;
    good(
        &h.exec(&a, &rw16(0x8A, BLOCKS - 1, 1), &[0xAB; BS], BS as u32)
            .await,
    );
    let r = h.exec(&a, &rw16(0x88, BLOCKS - 1, 1), &[], BS as u32).await;
    good(&r);
    assert!(r.data_in.iter().all(|b| *b == 0xAB));
    assert_eq!(
        sense_of(&h.exec(&a, &rw16(0x88, BLOCKS - 1, 2), &[], 2 * BS as u32).await),
        (0x5, 0x21, 0x00)
    );
    assert_eq!(
        sense_of(&h.exec(&a, &rw16(0x88, u64::MAX, 1), &[], BS as u32).await),
        (0x5, 0x21, 0x00)
    );
}

#[tokio::test]
async fn write_with_fewer_whole_blocks_than_the_cdb_asks_for_writes_only_those() {
    let h = lu();
    let a = nexus("iqn.a", 1);
    h.login(&a).await;
    good(&h.exec(&a, &write10(0, 2), &[b'a'; 2 * BS], 2 * BS as u32).await);
    let r = h.exec(&a, &write10(0, 2), &[b'b'; BS], BS as u32).await;
    good(&r);
    assert_eq!(
        r.data_out_len,
        2 * BS as u32,
        "the transport reports the overflow from this"
    );
    let back = h.exec(&a, &read10(0, 2), &[], 2 * BS as u32).await;
    assert!(back.data_in[..BS].iter().all(|b| *b == b'b'));
    assert!(back.data_in[BS..].iter().all(|b| *b == b'a'));
}

#[tokio::test]
async fn write_with_a_partial_block_of_data_out_is_refused_and_changes_nothing() {
    let h = lu();
    let a = nexus("iqn.a", 1);
    h.login(&a).await;
    good(&h.exec(&a, &write10(0, 1), &[b'a'; BS], BS as u32).await);
    let r = h.exec(&a, &write10(0, 1), &[b'b'; 200], 200).await;
    assert_eq!(sense_of(&r), (0x5, 0x0E, 0x03));
    assert_eq!(r.data_out_len, BS as u32);
    let back = h.exec(&a, &read10(0, 1), &[], BS as u32).await;
    assert!(back.data_in.iter().all(|b| *b == b'a'));
}

#[tokio::test]
async fn a_new_nexus_sees_the_power_on_attention_once_but_inquiry_does_not_consume_it() {
    let h = lu();
    let a = nexus("iqn.a", 1);
    h.lu.nexus_added(&a);
    good(&h.exec(&a, &[0x12, 0, 0, 0, 96, 0], &[], 96).await);
    assert_eq!(sense_of(&h.exec(&a, &[0; 6], &[], 0).await), (0x6, 0x29, 0x00));
    good(&h.exec(&a, &[0; 6], &[], 0).await);
}

#[tokio::test]
async fn inquiry_to_a_missing_lun_reports_peripheral_qualifier_011b_and_other_commands_fail() {
    let h = lu();
    let a = nexus("iqn.a", 1);
    h.login(&a).await;
    let r = h.exec_lun(&a, 5, &[0x12, 0, 0, 0, 96, 0], &[], 96).await;
    good(&r);
    assert_eq!(r.data_in[0], 0x7F);
    assert_eq!(
        sense_of(&h.exec_lun(&a, 5, &[0; 6], &[], 0).await),
        (0x5, 0x25, 0x00)
    );
    let luns = h
        .exec_lun(&a, 5, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0], &[], 64)
        .await;
    good(&luns);
    assert_eq!(&luns.data_in[..4], &8u32.to_be_bytes());
}

#[tokio::test]
async fn unknown_opcodes_and_service_actions_are_refused_with_pointers() {
    let h = lu();
    let a = nexus("iqn.a", 1);
    h.login(&a).await;
    let r = h.exec(&a, &[0xC7, 0, 0, 0, 0, 0], &[], 0).await;
    assert_eq!(sense_of(&r), (0x5, 0x20, 0x00));
    let mut bad_sa = [0u8; 16];
    bad_sa[0] = 0x9E;
    bad_sa[1] = 0x1F;
    let r = h.exec(&a, &bad_sa, &[], 32).await;
    assert_eq!(sense_of(&r), (0x5, 0x24, 0x00));
    let s = r.sense.unwrap();
    assert_eq!(s[15] & 0xC0, 0xC0, "SKSV and C/D set");
    assert_eq!(&s[16..18], &[0, 1]);
}

#[tokio::test]
async fn vpd_pages_are_listed_sorted_and_each_can_be_read() {
    let h = lu();
    let a = nexus("iqn.a", 1);
    h.login(&a).await;
    let r = h.exec(&a, &[0x12, 1, 0x00, 0, 255, 0], &[], 255).await;
    good(&r);
    let pages = &r.data_in[4..];
    assert!(pages.windows(2).all(|w| w[0] < w[1]));
    for page in pages {
        let r = h.exec(&a, &[0x12, 1, *page, 0x10, 0, 0], &[], 4096).await;
        good(&r);
        assert_eq!(r.data_in[1], *page);
        let len = u16::from_be_bytes([r.data_in[2], r.data_in[3]]) as usize;
        assert_eq!(r.data_in.len(), len + 4, "page {page:#x} length field");
    }
    let bl = h.exec(&a, &[0x12, 1, 0xB0, 0, 255, 0], &[], 255).await;
    assert_eq!(bl.data_in.len(), 64, "block limits page is 0x3C long");
}

#[tokio::test]
async fn thin_file_reports_lbpme_and_lbprz_in_read_capacity16() {
    let h = lu();
    let a = nexus("iqn.a", 1);
    h.login(&a).await;
    let mut c = [0u8; 16];
    c[0] = 0x9E;
    c[1] = 0x10;
    c[13] = 32;
    let r = h.exec(&a, &c, &[], 32).await;
    good(&r);
    assert_eq!(
        u64::from_be_bytes(r.data_in[0..8].try_into().unwrap()),
        BLOCKS - 1
    );
    assert_eq!(
        u32::from_be_bytes(r.data_in[8..12].try_into().unwrap()),
        BS as u32
    );
    assert_eq!(r.data_in[14] & 0xC0, 0xC0);
}

#[tokio::test]
async fn unmap_deallocates_blocks_that_then_read_as_zeros() {
    let h = lu();
    let a = nexus("iqn.a", 1);
    h.login(&a).await;
    // 256 blocks of data = 128 KiB: many filesystem blocks.
    let data = vec![0x5A; 256 * BS];
    good(&h.exec(&a, &rw16(0x8A, 0, 256), &data, data.len() as u32).await);
    let status = |lba: u64| {
        let mut c = [0u8; 16];
        c[0] = 0x9E;
        c[1] = 0x12;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[13] = 24;
        c
    };
    let r = h.exec(&a, &status(0), &[], 24).await;
    good(&r);
    assert_eq!(r.data_in[8 + 12], 0, "written blocks are mapped");
    let mut params = vec![0u8; 24];
    params[0..2].copy_from_slice(&22u16.to_be_bytes());
    params[2..4].copy_from_slice(&16u16.to_be_bytes());
    params[8..16].copy_from_slice(&64u64.to_be_bytes());
    params[16..20].copy_from_slice(&128u32.to_be_bytes());
    let unmap = [0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0];
    let r = h.exec(&a, &unmap, &params, 24).await;
    good(&r);
    assert_eq!(r.data_out_len, 24);
    let r = h.exec(&a, &status(64), &[], 24).await;
    good(&r);
    assert_eq!(r.data_in[8 + 12], 1, "unmapped blocks are deallocated");
    assert_eq!(u32::from_be_bytes(r.data_in[16..20].try_into().unwrap()), 128);
    let back = h.exec(&a, &rw16(0x88, 60, 8), &[], 8 * BS as u32).await;
    assert!(back.data_in[..4 * BS].iter().all(|b| *b == 0x5A));
    assert!(back.data_in[4 * BS..].iter().all(|b| *b == 0));
}

#[tokio::test]
async fn write_same_writes_the_pattern_to_every_block_and_unmap_bit_deallocates_zeros() {
    let h = lu();
    let a = nexus("iqn.a", 1);
    h.login(&a).await;
    let pattern: Vec<u8> = (0..BS).map(|i| i as u8).collect();
    let mut ws = rw16(0x93, 10, 1000);
    good(&h.exec(&a, &ws, &pattern, BS as u32).await);
    let r = h.exec(&a, &rw16(0x88, 10, 1000), &[], 1000 * BS as u32).await;
    assert!(r.data_in.chunks(BS).all(|b| b == &pattern[..]));
    ws[1] = 0x08 | 0x01; // UNMAP + NDOB
    let r = h.exec(&a, &ws, &[], 0).await;
    good(&r);
    assert_eq!(r.data_out_len, 0);
    let r = h.exec(&a, &rw16(0x88, 10, 1000), &[], 1000 * BS as u32).await;
    assert!(r.data_in.iter().all(|b| *b == 0));
}

#[tokio::test]
async fn compare_and_write_reports_the_offset_of_the_first_difference() {
    let h = lu();
    let a = nexus("iqn.a", 1);
    h.login(&a).await;
    good(&h.exec(&a, &write10(3, 1), &[b'A'; BS], BS as u32).await);
    let mut caw = [0u8; 16];
    caw[0] = 0x89;
    caw[2..10].copy_from_slice(&3u64.to_be_bytes());
    caw[13] = 1;
    let mut buf = vec![b'A'; BS];
    buf[100] = b'Z';
    buf.extend_from_slice(&[b'B'; BS]);
    let r = h.exec(&a, &caw, &buf, 2 * BS as u32).await;
    assert_eq!(sense_of(&r), (0xE, 0x1D, 0x00));
    let s = r.sense.unwrap();
    assert_eq!(s[0] & 0x80, 0x80, "INFORMATION valid");
    assert_eq!(u32::from_be_bytes(s[3..7].try_into().unwrap()), 100);
    buf[100] = b'A';
    good(&h.exec(&a, &caw, &buf, 2 * BS as u32).await);
    let back = h.exec(&a, &read10(3, 1), &[], BS as u32).await;
    assert!(back.data_in.iter().all(|b| *b == b'B'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compare_and_write_increments_from_many_tasks_never_lose_an_update() {
    let h = Arc::new(lu());
    let a = nexus("iqn.a", 1);
    h.login(&a).await;
    good(&h.exec(&a, &write10(0, 1), &[0u8; BS], BS as u32).await);
    const TASKS: u64 = 4;
    const EACH: u64 = 25;
    let mut joins = Vec::new();
    for _ in 0..TASKS {
        let (h, a) = (Arc::clone(&h), Arc::clone(&a));
        joins.push(tokio::spawn(async move {
            let mut done = 0;
            while done < EACH {
                let cur = h.exec(&a, &read10(0, 1), &[], BS as u32).await.data_in;
                let n = u64::from_be_bytes(cur[..8].try_into().unwrap());
                let mut buf = cur.to_vec();
                let mut next = vec![0u8; BS];
                next[..8].copy_from_slice(&(n + 1).to_be_bytes());
                buf.extend_from_slice(&next);
                let mut caw = [0u8; 16];
                caw[0] = 0x89;
                caw[13] = 1;
                if h.exec(&a, &caw, &buf, 2 * BS as u32).await.status == ScsiStatus::Good {
                    done += 1;
                }
            }
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    let cur = h.exec(&a, &read10(0, 1), &[], BS as u32).await.data_in;
    assert_eq!(u64::from_be_bytes(cur[..8].try_into().unwrap()), TASKS * EACH);
}

#[tokio::test]
async fn turning_the_write_cache_off_tells_other_nexuses_that_mode_parameters_changed() {
    let h = lu();
    let (a, b) = (nexus("iqn.a", 1), nexus("iqn.b", 2));
    h.login(&a).await;
    h.login(&b).await;
    let r = h.exec(&a, &[0x1A, 0x08, 0x08, 0, 255, 0], &[], 255).await;
    good(&r);
    let caching = &r.data_in[4..];
    assert_eq!(caching[0], 0x08);
    assert_eq!(caching[2] & 0x04, 0x04, "WCE on by default");
    let mut params = vec![0u8, 0, 0, 0];
    let mut page = caching.to_vec();
    page[2] &= !0x04;
    params.extend(page);
    let select = [0x15, 0x10, 0, 0, params.len() as u8, 0];
    good(&h.exec(&a, &select, &params, params.len() as u32).await);
    assert_eq!(sense_of(&h.exec(&b, &[0; 6], &[], 0).await), (0x6, 0x2A, 0x01));
    good(&h.exec(&a, &[0; 6], &[], 0).await);
    let r = h.exec(&a, &[0x1A, 0x08, 0x08, 0, 255, 0], &[], 255).await;
    assert_eq!(r.data_in[4 + 2] & 0x04, 0);
}

#[tokio::test]
async fn exclusive_access_reservation_blocks_other_nexuses_and_survives_the_holders_logout() {
    let h = lu();
    let (a, b) = (nexus("iqn.a", 1), nexus("iqn.b", 2));
    h.login(&a).await;
    h.login(&b).await;
    let (c, p) = pr_out(0x00, 0, 0, 0xA);
    good(&h.exec(&a, &c, &p, 24).await);
    let (c, p) = pr_out(0x01, 0x03, 0xA, 0);
    good(&h.exec(&a, &c, &p, 24).await);
    assert_eq!(
        h.exec(&b, &read10(0, 1), &[], BS as u32).await.status,
        ScsiStatus::ReservationConflict
    );
    good(&h.exec(&a, &read10(0, 1), &[], BS as u32).await);
    good(&h.exec(&b, &[0x12, 0, 0, 0, 36, 0], &[], 36).await);

    h.lu.nexus_removed(&a);
    h.login(&a).await;
    let keys = h.exec(&b, &[0x5E, 0x00, 0, 0, 0, 0, 0, 0, 64, 0], &[], 64).await;
    good(&keys);
    assert_eq!(&keys.data_in[4..8], &8u32.to_be_bytes());
    assert_eq!(&keys.data_in[8..16], &0xAu64.to_be_bytes());
    assert_eq!(
        h.exec(&b, &read10(0, 1), &[], BS as u32).await.status,
        ScsiStatus::ReservationConflict
    );
}

#[tokio::test]
async fn preempt_removes_the_holder_and_queues_registrations_preempted_for_it() {
    let h = lu();
    let (a, b) = (nexus("iqn.a", 1), nexus("iqn.b", 2));
    h.login(&a).await;
    h.login(&b).await;
    for (who, key) in [(&a, 0xAu64), (&b, 0xB)] {
        let (c, p) = pr_out(0x06, 0, 0, key);
        good(&h.exec(who, &c, &p, 24).await);
    }
    let (c, p) = pr_out(0x01, 0x01, 0xA, 0);
    good(&h.exec(&a, &c, &p, 24).await);
    assert_eq!(
        h.exec(&b, &write10(0, 1), &[0; BS], BS as u32).await.status,
        ScsiStatus::ReservationConflict
    );
    let (c, p) = pr_out(0x04, 0x01, 0xB, 0xA);
    good(&h.exec(&b, &c, &p, 24).await);
    good(&h.exec(&b, &write10(0, 1), &[0; BS], BS as u32).await);
    assert_eq!(sense_of(&h.exec(&a, &[0; 6], &[], 0).await), (0x6, 0x2A, 0x05));
    assert_eq!(
        h.exec(&a, &write10(0, 1), &[0; BS], BS as u32).await.status,
        ScsiStatus::ReservationConflict
    );
}

#[tokio::test]
async fn aptpl_is_refused_because_registrations_do_not_survive_a_restart() {
    let h = lu();
    let a = nexus("iqn.a", 1);
    h.login(&a).await;
    let (c, mut p) = pr_out(0x00, 0, 0, 0xA);
    p[20] = 0x01;
    assert_eq!(sense_of(&h.exec(&a, &c, &p, 24).await), (0x5, 0x26, 0x00));
    let caps = h.exec(&a, &[0x5E, 0x02, 0, 0, 0, 0, 0, 0, 8, 0], &[], 8).await;
    good(&caps);
    assert_eq!(caps.data_in[2] & 0x01, 0, "PTPL_C clear");
}

#[tokio::test]
async fn reserve6_conflicts_for_others_until_the_holder_logs_out() {
    let h = lu();
    let (a, b) = (nexus("iqn.a", 1), nexus("iqn.b", 2));
    h.login(&a).await;
    h.login(&b).await;
    good(&h.exec(&a, &[0x16, 0, 0, 0, 0, 0], &[], 0).await);
    assert_eq!(
        h.exec(&b, &[0x16, 0, 0, 0, 0, 0], &[], 0).await.status,
        ScsiStatus::ReservationConflict
    );
    assert_eq!(
        h.exec(&b, &read10(0, 1), &[], BS as u32).await.status,
        ScsiStatus::ReservationConflict
    );
    good(&h.exec(&b, &[0x12, 0, 0, 0, 36, 0], &[], 36).await);
    h.lu.nexus_removed(&a);
    good(&h.exec(&b, &read10(0, 1), &[], BS as u32).await);
}

#[tokio::test]
async fn lun_reset_releases_reserve6_and_tells_the_other_nexuses() {
    let h = lu();
    let (a, b) = (nexus("iqn.a", 1), nexus("iqn.b", 2));
    h.login(&a).await;
    h.login(&b).await;
    good(&h.exec(&a, &[0x16, 0, 0, 0, 0, 0], &[], 0).await);
    h.lu.reset(ResetKind::LogicalUnitReset, &b);
    assert_eq!(sense_of(&h.exec(&a, &[0; 6], &[], 0).await), (0x6, 0x29, 0x03));
    good(&h.exec(&b, &read10(0, 1), &[], BS as u32).await);
}

#[tokio::test]
async fn report_supported_opcodes_lists_every_row_of_the_command_table() {
    let h = lu();
    let a = nexus("iqn.a", 1);
    h.login(&a).await;
    let c = [0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0];
    let r = h.exec(&a, &c, &[], 4096).await;
    good(&r);
    let len = u32::from_be_bytes(r.data_in[..4].try_into().unwrap()) as usize;
    assert_eq!(len, COMMANDS.len() * 8);
    for (spec, desc) in COMMANDS.iter().zip(r.data_in[4..].chunks(8)) {
        assert_eq!(desc[0], spec.opcode, "{}", spec.name);
        assert_eq!(
            u16::from_be_bytes([desc[6], desc[7]]) as usize,
            spec.cdb_len(),
            "{}",
            spec.name
        );
    }
    // One command, with the timeouts descriptor.
    let one = [0xA3, 0x0C, 0x81, 0x28, 0, 0, 0, 0, 0x10, 0, 0, 0];
    let r = h.exec(&a, &one, &[], 4096).await;
    good(&r);
    assert_eq!(r.data_in[1], 0x83);
    assert_eq!(r.data_in[4], 0x28);
    assert_eq!(r.data_in.len(), 4 + 10 + 12);
}

#[tokio::test]
async fn read_only_unit_refuses_writes_with_write_protected() {
    let mut config = LuConfig::new("ro");
    config.read_only = true;
    let h = file_lu(config);
    let a = nexus("iqn.a", 1);
    h.login(&a).await;
    assert_eq!(
        sense_of(&h.exec(&a, &write10(0, 1), &[0; BS], BS as u32).await),
        (0x7, 0x27, 0x00)
    );
    good(&h.exec(&a, &read10(0, 1), &[], BS as u32).await);
    let ms = h.exec(&a, &[0x1A, 0x08, 0x3F, 0, 255, 0], &[], 255).await;
    assert_eq!(ms.data_in[2] & 0x80, 0x80, "WP in the mode parameter header");
}

/// A device whose every read fails, to specify MEDIUM ERROR reporting.
struct UnreadableDevice;

impl BlockDevice for UnreadableDevice {
    fn geometry(&self) -> Geometry {
        Geometry {
            size_bytes: BLOCKS * BS as u64,
            logical_block_size: BS as u32,
            physical_block_exponent: 0,
            thin: false,
        }
    }
    async fn read(&self, offset: u64, _len: u32) -> Result<Bytes, DeviceError> {
        Err(DeviceError::Medium {
            offset: offset + 3 * BS as u64,
            reason: "bad sector".into(),
        })
    }
    async fn write(&self, _: u64, _: Bytes, _: bool) -> Result<(), DeviceError> {
        Ok(())
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    async fn unmap(&self, _: u64, _: u64) -> Result<(), DeviceError> {
        Ok(())
    }
    async fn write_same(&self, _: u64, _: u64, _: Bytes) -> Result<(), DeviceError> {
        Ok(())
    }
    async fn compare_and_write(&self, _: u64, _: Bytes, _: Bytes) -> Result<(), DeviceError> {
        Ok(())
    }
    async fn provisioning(&self, _: u64, max_len: u64) -> Result<(Provisioning, u64), DeviceError> {
        Ok((Provisioning::Mapped, max_len))
    }
}

#[tokio::test]
async fn unrecoverable_read_is_a_medium_error_naming_the_failing_lba() {
    let h = Harness {
        lu: ScsiLogicalUnit::new(Arc::new(UnreadableDevice), LuConfig::new("bad")),
        _dir: None,
    };
    let a = nexus("iqn.a", 1);
    h.login(&a).await;
    let r = h.exec(&a, &read10(10, 8), &[], 8 * BS as u32).await;
    assert_eq!(sense_of(&r), (0x3, 0x11, 0x00));
    let s = r.sense.unwrap();
    assert_eq!(u32::from_be_bytes(s[3..7].try_into().unwrap()), 13);
    // A thick device does not offer UNMAP.
    assert_eq!(
        sense_of(
            &h.exec(&a, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &[0; 24], 24)
                .await
        ),
        (0x5, 0x20, 0x00)
    );
}

/// A file-backed device whose capacity grows when the test says so (as a
/// replicated volume's does after an online expansion).
struct GrowingDevice {
    inner: FileDevice,
    size_bytes: std::sync::atomic::AtomicU64,
}

impl BlockDevice for GrowingDevice {
    fn geometry(&self) -> Geometry {
        Geometry {
            size_bytes: self.size_bytes.load(std::sync::atomic::Ordering::Acquire),
            ..self.inner.geometry()
        }
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, DeviceError> {
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        self.inner.flush().await
    }
    async fn unmap(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.inner.unmap(offset, len).await
    }
    async fn write_same(&self, offset: u64, len: u64, pattern: Bytes) -> Result<(), DeviceError> {
        self.inner.write_same(offset, len, pattern).await
    }
    async fn compare_and_write(&self, offset: u64, compare: Bytes, data: Bytes) -> Result<(), DeviceError> {
        self.inner.compare_and_write(offset, compare, data).await
    }
    async fn provisioning(&self, offset: u64, max_len: u64) -> Result<(Provisioning, u64), DeviceError> {
        self.inner.provisioning(offset, max_len).await
    }
}

fn read_capacity16() -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x9E;
    c[1] = 0x10;
    c[13] = 32;
    c
}

fn last_lba16(r: &ScsiResult) -> u64 {
    good(r);
    u64::from_be_bytes(r.data_in[0..8].try_into().unwrap())
}

#[tokio::test]
async fn a_grown_capacity_is_reported_after_one_capacity_data_has_changed_attention_per_nexus() {
    let dir = tempfile::tempdir().unwrap();
    let opts = FileDeviceOptions {
        size: Some(2 * BLOCKS * BS as u64),
        logical_block_size: BS as u32,
    };
    let device = Arc::new(GrowingDevice {
        inner: FileDevice::open(dir.path().join("lun0.img"), opts).unwrap(),
        size_bytes: (BLOCKS * BS as u64).into(),
    });
    let h = Harness {
        lu: ScsiLogicalUnit::new(device.clone(), LuConfig::new("grow")),
        _dir: Some(dir),
    };
    let (a, b) = (nexus("iqn.a", 1), nexus("iqn.b", 2));
    h.login(&a).await;
    h.login(&b).await;
    assert_eq!(
        last_lba16(&h.exec(&a, &read_capacity16(), &[], 32).await),
        BLOCKS - 1
    );
    // Past the end: refused before the device grows.
    let past = write10(BLOCKS as u32, 1);
    assert_eq!(
        sense_of(&h.exec(&a, &past, &[7; BS], BS as u32).await),
        (0x5, 0x21, 0x00)
    );

    device
        .size_bytes
        .store(2 * BLOCKS * BS as u64, std::sync::atomic::Ordering::Release);
    // Each nexus learns of it once, on its next command (INQUIRY does not consume it).
    good(&h.exec(&a, &[0x12, 0, 0, 0, 36, 0], &[], 36).await);
    for who in [&a, &b] {
        let r = h.exec(who, &read_capacity16(), &[], 32).await;
        assert_eq!(sense_of(&r), (0x6, 0x2A, 0x09), "CAPACITY DATA HAS CHANGED");
        assert_eq!(
            last_lba16(&h.exec(who, &read_capacity16(), &[], 32).await),
            2 * BLOCKS - 1
        );
    }
    // READ CAPACITY(10) too, and the new blocks take I/O.
    let r = h.exec(&b, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8).await;
    good(&r);
    assert_eq!(
        u32::from_be_bytes(r.data_in[0..4].try_into().unwrap()),
        (2 * BLOCKS - 1) as u32
    );
    good(&h.exec(&a, &past, &[7; BS], BS as u32).await);
    let r = h.exec(&b, &read10(BLOCKS as u32, 1), &[], BS as u32).await;
    good(&r);
    assert_eq!(&r.data_in[..], &[7; BS][..]);
    // A nexus that logs in later gets its power-on attention only.
    let c = nexus("iqn.c", 3);
    h.login(&c).await;
    good(&h.exec(&c, &read_capacity16(), &[], 32).await);
}
