//! The POSIX suite pjdfstest (Rust rewrite, `cargo install pjdfstest --locked`)
//! against a real mount. Cases that fail by design are listed, each with its
//! reason, in integration/pjdfstest-expected-failures.txt; any other failure,
//! and any listed case that passes, fails this test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{collections::BTreeSet, process::Command};

use common::Node;

fn expected_failures() -> BTreeSet<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/integration/pjdfstest-expected-failures.txt"
    );
    std::fs::read_to_string(path)
        .expect("expected-failures list")
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn pjdfstest_passes_except_documented_cases() {
    let node = Node::start();
    let bin = std::env::var("PJDFSTEST").unwrap_or_else(|_| "pjdfstest".into());
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/integration/pjdfstest.toml");
    let workdir = node.path("pjdfstest");
    std::fs::create_dir(&workdir).unwrap();
    let out = Command::new(&bin)
        .args(["-c", config, "-p"])
        .arg(&workdir)
        .current_dir(&workdir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}. Install it with `cargo install pjdfstest --locked` (.ci/run does)"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut failed = BTreeSet::new();
    let mut passed = BTreeSet::new();
    for line in stdout.lines() {
        let mut words = line.split_whitespace();
        let (Some(name), Some(result)) = (words.next(), words.next_back()) else {
            continue;
        };
        if !name.contains("::") {
            continue;
        }
        match result {
            "FAILED" => {
                failed.insert(name.to_owned());
            }
            "ok" => {
                passed.insert(name.to_owned());
            }
            _ => {}
        }
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No user found") && !stderr.contains("No group found"),
        "pjdfstest needs the users and groups named in integration/pjdfstest.toml \
         (.ci/run creates them: `useradd -M -U tests`, and `nobody`/`nogroup`): {stderr}"
    );
    assert!(
        passed.len() > 150,
        "pjdfstest ran too few cases ({} passed):\n{stdout}\n{stderr}",
        passed.len()
    );
    let expected = expected_failures();
    let unexpected: Vec<_> = failed.difference(&expected).collect();
    let fixed: Vec<_> = expected.intersection(&passed).collect();
    let detail = |name: &str| {
        stdout
            .lines()
            .skip_while(|l| !l.starts_with(name))
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        unexpected.is_empty(),
        "pjdfstest cases failed that are not in the expected list:\n{}",
        unexpected
            .iter()
            .map(|n| detail(n))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        fixed.is_empty(),
        "listed cases now pass; remove them from the list: {fixed:?}"
    );
    eprintln!(
        "pjdfstest: {} passed, {} failed as documented",
        passed.len(),
        failed.len()
    );
}
