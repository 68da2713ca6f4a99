//! Every workspace package builds its dependencies with the workspace's
//! feature set, so `cargo build --release`, `cargo run --release -p X` and
//! `cargo test --workspace` reuse one build (cargo resolves features per
//! selection of packages; this crate makes every selection the same).
//!
//! When this fails (a new dependency or feature), regenerate the file:
//! `CHORUS_UPDATE_HACK=1 cargo test -p chorus-workspace-hack`.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

const PACKAGES: [&str; 6] = [
    "chorus-server",
    "chorus-operator",
    "chorus-crds",
    "chorus-bench",
    "chorus-testkit",
    "chorus-tests",
];

/// `name version` → features, as `cargo tree` resolves them for `selection`.
/// `target`: the crates compiled for the target (no proc-macros and build
/// scripts); otherwise the host-side ones only.
fn resolved(selection: &[&str], target: bool) -> BTreeMap<(String, String), BTreeSet<String>> {
    let all = tree(selection, "normal,build,dev");
    let on_target = tree(selection, "normal,dev,no-proc-macro");
    let chosen: BTreeSet<&String> = if target {
        on_target.iter().collect()
    } else {
        all.difference(&on_target).collect()
    };
    chosen
        .into_iter()
        .filter_map(|line| {
            let (pkg, features) = line.split_once(" [")?;
            let (name, version) = pkg.split_once(' ')?;
            if name.starts_with("chorus-") {
                return None;
            }
            let features = features
                .trim_end_matches(']')
                .split(',')
                .filter(|f| !f.is_empty())
                .map(str::to_owned)
                .collect();
            Some(((name.to_owned(), version.to_owned()), features))
        })
        .collect()
}

fn tree(selection: &[&str], edges: &str) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .args([
            "tree",
            "--locked",
            "--offline",
            "--prefix",
            "none",
            "-e",
            edges,
        ])
        .args(["-f", "{p} [{f}]"])
        .args(selection)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            l.replace(" (*)", "")
                .replace(" (proc-macro)", "")
                .split(" (/")
                .next()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// The crates whose features differ between the workspace and some single
/// package, with the workspace's features, as TOML dependency lines.
fn missing(target: bool) -> Vec<(String, String)> {
    let workspace = resolved(&["--workspace"], target);
    let mut differ = BTreeSet::new();
    for package in PACKAGES {
        for (krate, features) in resolved(&["-p", package], target) {
            if workspace.get(&krate) != Some(&features) {
                differ.insert(krate);
            }
        }
    }
    let versions = |name: &str| workspace.keys().filter(|(n, _)| n == name).count();
    differ
        .into_iter()
        .filter_map(|krate| {
            let features = workspace.get(&krate)?;
            let (name, version) = &krate;
            let version = version.trim_start_matches('v');
            let major = if version.starts_with("0.") {
                version.split('.').take(2).collect::<Vec<_>>().join(".")
            } else {
                version.split('.').next().unwrap().to_owned()
            };
            // Two versions of one crate need two names.
            let key = if versions(name) > 1 {
                format!("{name}-{}", major.replace('.', "_"))
            } else {
                name.clone()
            };
            let default = features.contains("default");
            let list: Vec<String> = features
                .iter()
                .filter(|f| *f != "default")
                .map(|f| format!("{f:?}"))
                .collect();
            let line = format!(
                "{key} = {{ package = {name:?}, version = \"{major}\", default-features = {default}, features = [{}] }}",
                list.join(", ")
            );
            Some((key, line))
        })
        .collect()
}

/// `section`'s lines of the manifest with `lines` put in (same key: replaced).
fn update(manifest: &str, section: &str, lines: &[(String, String)]) -> String {
    let header = format!("[{section}]\n");
    let start = manifest.find(&header).map(|i| i + header.len());
    let Some(start) = start else {
        let body: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
        return format!("{manifest}\n{header}{}\n", body.join("\n"));
    };
    let end = manifest[start..]
        .find("\n[")
        .map_or(manifest.len(), |i| start + i + 1);
    let mut entries: BTreeMap<String, String> = manifest[start..end]
        .lines()
        .filter_map(|l| Some((l.split_once(" = ")?.0.to_owned(), l.to_owned())))
        .collect();
    for (key, line) in lines {
        entries.insert(key.clone(), line.clone());
    }
    let body: Vec<&str> = entries.values().map(String::as_str).collect();
    format!(
        "{}{}\n{}",
        &manifest[..start],
        body.join("\n"),
        &manifest[end..]
    )
}

#[test]
fn every_package_builds_its_dependencies_with_the_workspace_features() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let target = missing(true);
    let host = missing(false);
    if target.is_empty() && host.is_empty() {
        return;
    }
    if std::env::var_os("CHORUS_UPDATE_HACK").is_some() {
        let manifest = std::fs::read_to_string(&path).unwrap();
        let manifest = update(&manifest, "dependencies", &target);
        let manifest = update(&manifest, "build-dependencies", &host);
        std::fs::write(&path, manifest).unwrap();
        return;
    }
    let show = |lines: &[(String, String)]| -> String {
        lines.iter().map(|(_, l)| format!("{l}\n")).collect()
    };
    panic!(
        "some packages build dependencies with other features than the workspace does; \
         run `CHORUS_UPDATE_HACK=1 cargo test -p chorus-workspace-hack` (twice, until it \
         passes) or add to workspace-hack/Cargo.toml\n[dependencies]\n{}[build-dependencies]\n{}",
        show(&target),
        show(&host)
    );
}
