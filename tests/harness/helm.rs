//! Offline Helm: `charts/helm_check.py` (the Helm SDK from PyPI, helm-python-sdk, installed by
//! tests/setup.sh) lints, validates and renders a chart with no `helm` binary and no cluster, and answers
//! JSON. A missing Python module fails the test with what to run, never skips it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// The repository's root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// One request to the checker; its JSON answer. Panics (fails the test) if the checker cannot run.
pub fn helm(request: Value) -> Value {
    let python = std::env::var("BASALT_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = workspace().join("charts/helm_check.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {python} (set BASALT_PYTHON, run ./tests/setup.sh): {e}"));
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(request.to_string().as_bytes())
        .expect("writing the request to helm_check.py");
    let out = child.wait_with_output().expect("waiting for helm_check.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let answer: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "helm_check.py answered no JSON ({e}); status {}\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    if let Some(setup) = answer.get("setup_error") {
        panic!("the Helm checker cannot run: {setup}");
    }
    answer
}

/// The strings of a JSON array (empty for anything else).
pub fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
        .unwrap_or_default()
}

/// Lint `chart` with `values` (strict, as `helm lint --strict`); fails the test on any error or warning
/// (severity 2 and up; 1, information such as "icon is recommended", is allowed).
pub fn assert_lints_clean(chart: &str, values: &Value, namespace: &str) {
    let answer =
        helm(serde_json::json!({"op": "lint", "chart": chart, "values": values, "namespace": namespace}));
    assert_eq!(answer["ok"], true, "{answer}");
    let lint = &answer["lint"];
    assert_eq!(lint["total_charts_linted"], 1, "{lint}");
    assert!(
        lint["errors"].as_array().is_none_or(|e| e.is_empty()),
        "lint errors: {lint}"
    );
    let serious: Vec<_> = lint["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["severity"].as_i64() >= Some(2))
        .collect();
    assert!(serious.is_empty(), "lint findings: {serious:?}");
}
