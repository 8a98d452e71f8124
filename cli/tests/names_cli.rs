//! Every command that takes a volume name refuses a bad one before it
//! touches anything: no data directory, no process started, and a message
//! that says which characters are allowed and how long a name may be.

use std::process::{Command, Output};

/// Run `basalt` with a volume secret and an API token in its environment (as `volume up` gives them),
/// so that a refusal can only be the name's.
fn basalt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_basalt"))
        .env("BASALT_VOLUME_SECRET", "names-cli-test-secret")
        .env("BASALT_API_TOKEN", "names-cli-test-token")
        .args(args)
        .output()
        .expect("the basalt binary runs")
}

fn refused_with_the_rules(out: &Output, what: &str) {
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what} accepted a bad name: {said}");
    assert!(
        said.contains("a-z, 0-9, '-' and '.'") && said.contains("1 to 63 characters"),
        "{what}: the message says what a name may hold: {said}"
    );
}

#[test]
fn volume_up_refuses_a_bad_name_before_creating_anything() {
    let data = tempfile::tempdir().unwrap();
    let data_arg = data.path().to_str().unwrap();
    for bad in ["bad name!", "..", "Demo", "-x"] {
        let name = format!("--name={bad}");
        let out = basalt(&[
            "volume",
            "up",
            &name,
            "--size",
            "16M",
            "--replicas",
            "1",
            "--data",
            data_arg,
            "--iscsi",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
        ]);
        refused_with_the_rules(&out, &format!("volume up --name {bad:?}"));
    }
    let created: Vec<_> = std::fs::read_dir(data.path()).unwrap().collect();
    assert!(
        created.is_empty(),
        "nothing is created for a bad name: {created:?}"
    );
    assert!(
        !data.path().parent().unwrap().join("volume.json").exists(),
        "`..` did not escape the data directory"
    );
}

#[test]
fn controller_and_serve_file_refuse_a_bad_name() {
    let out = basalt(&[
        "controller",
        "--name",
        "bad name!",
        "--size",
        "16M",
        "--replica",
        "127.0.0.1:1",
        "--iscsi",
        "127.0.0.1:0",
        "--api",
        "127.0.0.1:0",
    ]);
    refused_with_the_rules(&out, "controller");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lun.img");
    let out = basalt(&[
        "serve-file",
        "--file",
        file.to_str().unwrap(),
        "--size",
        "16M",
        "--name",
        "a:b",
        "--iscsi",
        "127.0.0.1:0",
    ]);
    refused_with_the_rules(&out, "serve-file");
    assert!(!file.exists(), "serve-file created its file for a bad name");
}
