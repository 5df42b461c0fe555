//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `cnnc` binary under test.
pub fn cnnc() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cnnc"))
}

pub fn run_cnnc(args: &[&str]) -> Output {
    cnnc().args(args).output().expect("cnnc binary runs")
}

/// ../shared relative to the workspace root (or $CNNC_SHARED). None when absent, in
/// which case the caller skips -- unless CI=true, where its absence is a failure.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("CNNC_SHARED") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"),
    };
    if dir.join("README.md").is_file() {
        return Some(dir);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "../shared (conformance suite and model zoo) is missing at {} and CI=true",
            dir.display()
        );
    }
    eprintln!(
        "SKIP: ../shared not found at {} (set CNNC_SHARED); conformance tests skipped",
        dir.display()
    );
    None
}

/// A fresh scratch directory for one test.
pub fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cnnc-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}
