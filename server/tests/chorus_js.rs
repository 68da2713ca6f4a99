//! Runs the bundled browser client's tests (`tests/js/*.test.mjs`) under
//! Node's test runner: the client is served to browsers as it is, so it is
//! tested as it is.

#[test]
fn the_browser_client_passes_its_tests() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/js");
    let out = std::process::Command::new("node")
        .arg("--test")
        .arg(format!("{dir}/chorus.test.mjs"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run node (Node.js 20 or later is needed): {e}"));
    assert!(
        out.status.success(),
        "chorus.js tests failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
