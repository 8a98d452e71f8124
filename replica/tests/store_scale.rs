//! Index memory follows what is written, not the volume size: a 64 TiB thin volume with 1 GiB written
//! in random 4 KiB blocks must open in under 1 s with under 64 MiB RSS (Longhorn's per-block map would
//! need 16 GiB for it). The open is measured in a fresh child process so the RSS is the store's own.
//!
//! Heavy (writes 1 GiB), so ignored by default:
//! `cargo test --release -p basalt-replica --test store_scale -- --ignored --nocapture`

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use basalt_proto::VolumeId;
use basalt_replica::store::Store;
use rand::{Rng, SeedableRng};

const CHILD_DIR: &str = "BASALT_STORE_SCALE_CHILD_DIR";
const TEST_NAME: &str = "a_64_tib_volume_with_1_gib_written_opens_fast_in_little_memory";

fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn child(dir: &Path) -> ! {
    let before = vm_rss_kib();
    let started = Instant::now();
    let store = Store::open(dir).unwrap();
    let open_ms = started.elapsed().as_secs_f64() * 1000.0;
    let after = vm_rss_kib();
    let mut block = vec![0u8; 4096];
    store.read(0, &mut block).unwrap();
    println!("@@ {open_ms:.1} {before} {after}");
    std::process::exit(0);
}

#[test]
#[ignore = "writes 1 GiB; run explicitly (see the module doc)"]
fn a_64_tib_volume_with_1_gib_written_opens_fast_in_little_memory() {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        child(Path::new(&dir));
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 64u64 << 40;
    let store = Store::create(dir.path(), VolumeId::random(), size).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(64);
    let mut block = vec![0u8; 4096];
    let started = Instant::now();
    for i in 0..(1u64 << 30) / 4096 {
        let lba = rng.random_range(0..size / 4096);
        block[..8].copy_from_slice(&i.to_le_bytes());
        store.write(lba * 4096, &block).unwrap();
    }
    store.flush().unwrap();
    eprintln!(
        "wrote 1 GiB in random 4 KiB blocks in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    drop(store);

    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            TEST_NAME,
            "--nocapture",
            "--ignored",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.find("@@ ").map(|at| &l[at + 3..]))
        .expect("no report from child");
    let figures: Vec<f64> = line.split(' ').map(|f| f.parse().unwrap()).collect();
    let (open_ms, rss_before, rss_after) = (figures[0], figures[1], figures[2]);
    eprintln!(
        "open: {open_ms:.1} ms; VmRSS {:.1} MiB before open, {:.1} MiB after",
        rss_before / 1024.0,
        rss_after / 1024.0
    );
    assert!(open_ms < 1000.0, "open took {open_ms} ms");
    assert!(rss_after < 64.0 * 1024.0, "RSS after open is {rss_after} KiB");
}
