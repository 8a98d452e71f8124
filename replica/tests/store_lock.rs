//! One store per directory: the host-directory backend holds an exclusive `flock` for the store's
//! whole life, so a second opener -- another process, or another `Store` in this one -- is refused
//! with a message that says what to do.

use basalt_proto::VolumeId;
use basalt_replica::store::{Store, StoreError};

const MIB: u64 = 1 << 20;

#[test]
fn a_second_open_of_a_directory_in_use_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), VolumeId::random(), 16 * MIB).unwrap();
    store.write(0, &[7u8; 4096]).unwrap();

    let second = Store::open(dir.path());
    let Err(error) = second else {
        panic!("a second open of a directory in use succeeded");
    };
    assert!(matches!(error, StoreError::InUse { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains(&dir.path().display().to_string()), "{message}");
    assert!(message.contains("in use by another process"), "{message}");
    assert!(message.contains("stop it first"), "{message}");

    assert!(matches!(
        Store::open_or_create(dir.path(), 16 * MIB, None),
        Err(StoreError::InUse { .. })
    ));
    assert!(
        matches!(
            Store::create(dir.path(), VolumeId::random(), 16 * MIB),
            Err(StoreError::InUse { .. })
        ),
        "create must not even look at a directory in use"
    );

    // The refused opens changed nothing; the first store goes on.
    store.write(4096, &[8u8; 4096]).unwrap();
    let mut buf = vec![0u8; 8192];
    store.read(0, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 7) && buf[4096..].iter().all(|&b| b == 8));
}

#[test]
fn the_directory_is_free_again_once_the_store_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), VolumeId::random(), 16 * MIB).unwrap();
    store.write(0, &[3u8; 4096]).unwrap();
    store.flush().unwrap();
    drop(store);
    let reopened = Store::open(dir.path()).unwrap();
    let mut buf = vec![0u8; 4096];
    reopened.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 3));
}

#[test]
fn a_directory_locked_by_another_process_is_refused() {
    // flock(1) from util-linux holds the lock in a child process, as a running replica would;
    // --no-fork so that killing the child really releases it.
    let dir = tempfile::tempdir().unwrap();
    drop(Store::create(dir.path(), VolumeId::random(), 16 * MIB).unwrap());
    let lock = dir.path().join("volume.lock");
    let mut holder = match std::process::Command::new("flock")
        .args(["--exclusive", "--no-fork"])
        .arg(&lock)
        .args(["sleep", "30"])
        .spawn()
    {
        Ok(child) => child,
        Err(e) => panic!("flock(1) (util-linux) is needed by this test: {e}"),
    };
    // Wait until the child holds it: our own attempts fail from then on.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let refused = loop {
        match Store::open(dir.path()) {
            Err(StoreError::InUse { .. }) => break true,
            Ok(store) => drop(store),
            Err(e) => panic!("unexpected error: {e}"),
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(refused, "the store opened while another process held the lock");
    Store::open(dir.path()).unwrap();
}
