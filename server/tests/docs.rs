//! The documentation works as written: README.md and docs/*.md run their
//! runnable shell blocks, and name only files and sections that exist.
//!
//! A runnable block is a ```` ```sh ```` block right after the line
//! `<!-- runnable -->`, or `<!-- runnable: needs redis, node -->` when it
//! relies on something an earlier step started. Each block runs in `bash -e`
//! in a network (and PID) namespace of its own, so the ports written in the
//! docs are free, nothing reaches outside, and everything it started ends
//! with it. The only differences from a user's terminal:
//!
//! - `needs redis` starts `redis-server --port 6379 --bind 127.0.0.1` first
//!   (no persistence), `needs node` starts `chorus-server` with its defaults
//!   (127.0.0.1:8080, memory broker), each waited for;
//! - `cargo run [--release] -p chorus-server [-- flags]` runs the
//!   `chorus-server` this test was built with (same code, test profile: a
//!   release build per test run would take minutes);
//! - `curl` fails on an HTTP error status (`--fail-with-body`);
//! - after the block, every `--listen` address in it must answer `/readyz`
//!   with 200, and nothing it started in the background may have exited.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chorus_testkit::ChildGuard;

/// The longest one block may take (starting servers included).
const BLOCK_TIMEOUT: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// README.md and every Markdown file under docs/.
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![repo().join("README.md")];
    let mut more: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    more.sort();
    docs.extend(more);
    docs
}

struct Block {
    /// `file:line` of the block's first line.
    at: String,
    needs: Vec<String>,
    script: String,
}

fn runnable_blocks(path: &Path) -> Vec<Block> {
    let text = std::fs::read_to_string(path).unwrap();
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(marker) = line
            .trim()
            .strip_prefix("<!-- runnable")
            .and_then(|m| m.strip_suffix("-->"))
        else {
            continue;
        };
        let needs = marker
            .trim()
            .strip_prefix(':')
            .map(|m| {
                let m = m.trim();
                let list = m
                    .strip_prefix("needs ")
                    .unwrap_or_else(|| panic!("{name}:{}: expected `runnable: needs …`", i + 1));
                list.split(',').map(|n| n.trim().to_owned()).collect()
            })
            .unwrap_or_default();
        assert_eq!(
            lines.get(i + 1).map(|l| l.trim()),
            Some("```sh"),
            "{name}:{}: a runnable marker must be followed by a ```sh block",
            i + 1
        );
        let body: Vec<&str> = lines[i + 2..]
            .iter()
            .take_while(|l| l.trim() != "```")
            .copied()
            .collect();
        blocks.push(Block {
            at: format!("{name}:{}", i + 3),
            needs,
            script: body.join("\n"),
        });
    }
    blocks
}

/// Addresses after `--listen` in a block.
fn listen_addresses(script: &str) -> Vec<String> {
    let words: Vec<&str> = script.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "--listen")
        .map(|w| w[1].to_owned())
        .collect()
}

const PROLOGUE: &str = r#"
ip link set lo up
ready() {
    for _ in $(seq 400); do
        command curl -sf -o /dev/null "http://$1/readyz" && return 0
        sleep 0.05
    done
    echo "docs test: nothing ready on $1" >&2
    return 1
}
cargo() {
    if [ "$1" = run ]; then shift; fi
    if [ "${1-}" = --release ]; then shift; fi
    if [ "${1-} ${2-}" != "-p chorus-server" ]; then
        echo "docs test: only 'cargo run --release -p chorus-server' runs here, not: cargo $*" >&2
        return 1
    fi
    shift 2
    if [ "${1-}" = -- ]; then shift; fi
    "$CHORUS_SERVER" "$@"
}
curl() { command curl --fail-with-body -sS "$@"; }
"#;

const NEEDS_REDIS: &str = r#"
redis-server --port 6379 --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
for _ in $(seq 400); do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.05; done
redis-cli -p 6379 ping >/dev/null
"#;

const NEEDS_NODE: &str = r#"
"$CHORUS_SERVER" &
ready 127.0.0.1:8080
"#;

const EPILOGUE: &str = r#"
for pid in $(jobs -p); do
    kill -0 "$pid" 2>/dev/null || { echo "docs test: a command started in the background has exited" >&2; exit 1; }
done
"#;

fn script_for(block: &Block) -> String {
    let mut script = String::from(PROLOGUE);
    let mut after = Vec::new();
    for need in &block.needs {
        match need.as_str() {
            "redis" => script.push_str(NEEDS_REDIS),
            "node" => script.push_str(NEEDS_NODE),
            other => panic!("{}: unknown need `{other}` (redis, node)", block.at),
        }
    }
    script.push_str("\n# ---- the block ----\n");
    script.push_str(&block.script);
    script.push_str("\n# ---- checks ----\n");
    for addr in listen_addresses(&block.script) {
        after.push(format!("ready {addr}"));
    }
    script.push_str(&after.join("\n"));
    script.push_str(EPILOGUE);
    script
}

fn run(block: &Block) {
    let dir = std::env::temp_dir().join(format!(
        "chorus-docs-{}-{}",
        std::process::id(),
        block.at.replace([':', '.'], "-")
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let out_path = dir.join("output");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut child = ChildGuard(
        Command::new("unshare")
            .args([
                "--user",
                "--map-root-user",
                "--net",
                "--pid",
                "--fork",
                "--kill-child",
            ])
            .args(["bash", "-e", "-o", "pipefail", "-c", &script_for(block)])
            .current_dir(&dir)
            .env("CHORUS_SERVER", env!("CARGO_BIN_EXE_chorus-server"))
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("cannot run unshare (util-linux)"),
    );
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > BLOCK_TIMEOUT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    match status {
        Some(s) if s.success() => {}
        Some(s) => panic!(
            "{}: the block failed ({s}):\n{}\n---- output ----\n{output}",
            block.at, block.script
        ),
        None => panic!(
            "{}: the block did not finish within {BLOCK_TIMEOUT:?}:\n{}\n---- output ----\n{output}",
            block.at, block.script
        ),
    }
}

#[test]
fn every_runnable_block_runs_as_written() {
    let blocks: Vec<Block> = documents()
        .iter()
        .flat_map(|d| runnable_blocks(d))
        .collect();
    assert!(
        blocks.len() >= 4,
        "README.md marks its quickstart, API, several-nodes and durable blocks runnable"
    );
    for block in &blocks {
        run(block);
    }
}

/// A heading's anchor as GitHub makes it.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The lines outside fenced code blocks.
fn prose(text: &str) -> Vec<&str> {
    let mut in_code = false;
    text.lines()
        .filter(|line| {
            if line.trim_start().starts_with("```") {
                in_code = !in_code;
                return false;
            }
            !in_code
        })
        .collect()
}

fn anchors(text: &str) -> Vec<String> {
    prose(text)
        .into_iter()
        .filter(|line| line.starts_with('#'))
        .map(|line| anchor(line.trim_start_matches('#')))
        .collect()
}

#[test]
fn docs_name_only_files_and_sections_that_exist() {
    let mut broken = Vec::new();
    for doc in documents()
        .into_iter()
        .chain([repo().join("BENCHMARKS.md")])
    {
        let whole = std::fs::read_to_string(&doc).unwrap();
        let text = prose(&whole).join("\n");
        let dir = doc.parent().unwrap();
        let name = doc.file_name().unwrap().to_string_lossy().into_owned();
        // Markdown links to files and sections here.
        for (i, _) in text.match_indices("](") {
            let Some(target) = text[i + 2..].split(')').next() else {
                continue;
            };
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, section) = target.split_once('#').unwrap_or((target, ""));
            let file_path = if file.is_empty() {
                doc.clone()
            } else {
                dir.join(file)
            };
            if !file_path.exists() {
                broken.push(format!("{name}: link to missing {target}"));
                continue;
            }
            if !section.is_empty() && file_path.extension().is_some_and(|e| e == "md") {
                let linked = std::fs::read_to_string(&file_path).unwrap();
                if !anchors(&linked).iter().any(|a| a == section) {
                    broken.push(format!("{name}: link to missing section {target}"));
                }
            }
        }
        // Markdown files named in `code`, as in "see `PROTOCOL.md`".
        for (i, quoted) in text.split('`').enumerate() {
            let is_md_name = quoted.ends_with(".md")
                && !quoted.contains(' ')
                && quoted
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c));
            if i % 2 == 1
                && is_md_name
                && !dir.join(quoted).exists()
                && !repo().join(quoted).exists()
            {
                broken.push(format!("{name}: names missing file {quoted}"));
            }
        }
    }
    assert!(broken.is_empty(), "{broken:#?}");
}

#[test]
fn the_license_file_is_the_license_cargo_toml_names() {
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains("license = \"Apache-2.0\""),
        "Cargo.toml names another license"
    );
    let license = std::fs::read_to_string(repo().join("LICENSE")).expect("a LICENSE file");
    assert!(
        license.contains("Apache License\n                           Version 2.0, January 2004")
    );
    assert!(
        license.contains("END OF TERMS AND CONDITIONS"),
        "the full text, not a notice"
    );
}
