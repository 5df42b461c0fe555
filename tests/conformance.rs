//! The ONNX conformance suite and the model zoo through `cnnc verify` (../shared).
//! Bars (issue 2): every zoo model passes; at least 95% of the cases whose inputs and
//! outputs are all float32 pass; every other case passes or is skipped with a reason;
//! no case crashes.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

/// Per-case verdicts from `cnnc verify` output lines.
fn verify(dirs: &[&Path]) -> BTreeMap<String, (String, String)> {
    let mut args = vec!["verify".to_string()];
    args.extend(dirs.iter().map(|d| d.display().to_string()));
    let out = common::cnnc().args(&args).output().expect("cnnc verify runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(0) | Some(1)),
        "cnnc verify must exit 0 or 1, got {:?}\nstderr: {stderr}",
        out.status
    );
    let summary = stdout.lines().last().unwrap_or("");
    assert!(summary.contains("passed,") && summary.contains("failed,") && summary.contains("skipped"), "summary line: {summary}");
    let mut verdicts = BTreeMap::new();
    for line in stdout.lines() {
        let Some((tag, rest)) = line.split_once(' ') else { continue };
        if !["PASS", "FAIL", "SKIP"].contains(&tag) {
            continue;
        }
        let (name, reason) = rest.split_once(": ").unwrap_or((rest, ""));
        verdicts.insert(name.to_string(), (tag.to_string(), reason.to_string()));
    }
    verdicts
}

/// TensorProto.data_type (field 2) of a serialized tensor, read without a protobuf library.
fn pb_data_type(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let mut i = 0;
    let varint = |i: &mut usize| -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *bytes.get(*i)?;
            *i += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    };
    while i < bytes.len() {
        let key = varint(&mut i)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let v = varint(&mut i)?;
                if field == 2 {
                    return Some(v);
                }
            }
            1 => i += 8,
            2 => {
                let n = varint(&mut i)? as usize;
                i += n;
            }
            5 => i += 4,
            _ => return None,
        }
    }
    None
}

/// Whether every input and output of the case's first data set is float32.
fn all_float32(case: &Path) -> bool {
    let ds = case.join("test_data_set_0");
    let Ok(rd) = std::fs::read_dir(&ds) else { return false };
    let files: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "pb")).collect();
    !files.is_empty() && files.iter().all(|p| pb_data_type(p) == Some(1))
}

fn report(title: &str, verdicts: &BTreeMap<String, (String, String)>) {
    let count = |t: &str| verdicts.values().filter(|(tag, _)| tag == t).count();
    eprintln!("{title}: {} passed, {} failed, {} skipped", count("PASS"), count("FAIL"), count("SKIP"));
    for (name, (tag, reason)) in verdicts {
        if tag != "PASS" {
            eprintln!("  {tag} {name}: {reason}");
        }
    }
}

#[test]
fn operator_suites_pass() {
    let Some(shared) = common::shared_dir() else { return };
    let suites = [shared.join("onnx-node"), shared.join("onnx-pytorch")];
    let verdicts = verify(&[&suites[0], &suites[1]]);
    report("onnx-node + onnx-pytorch", &verdicts);
    let mut f32_total = 0;
    let mut f32_passed = 0;
    let mut problems = Vec::new();
    for suite in &suites {
        for entry in std::fs::read_dir(suite).expect("suite dir") {
            let case = entry.expect("entry").path();
            if !case.join("model.onnx").is_file() {
                continue;
            }
            let name = case.file_name().unwrap().to_string_lossy().into_owned();
            let Some((tag, reason)) = verdicts.get(&name) else {
                problems.push(format!("{name}: no verdict"));
                continue;
            };
            if reason.contains("crashed") || reason.contains("panic") {
                problems.push(format!("{name} crashed: {reason}"));
            }
            if all_float32(&case) {
                f32_total += 1;
                f32_passed += (tag == "PASS") as usize;
            } else if tag == "FAIL" {
                problems.push(format!("{name} (not all float32) must pass or be skipped: {reason}"));
            }
        }
    }
    let rate = f32_passed as f64 / f32_total.max(1) as f64;
    eprintln!("float32 cases: {f32_passed}/{f32_total} passed ({:.1}%)", rate * 100.0);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(rate >= 0.95, "only {f32_passed} of {f32_total} float32 cases pass ({:.1}% < 95%)", rate * 100.0);
}

#[test]
fn zoo_models_pass() {
    let Some(shared) = common::shared_dir() else { return };
    let verdicts = verify(&[&shared.join("zoo/models")]);
    report("zoo/models", &verdicts);
    assert!(verdicts.len() >= 6, "expected the six zoo models, got {verdicts:?}");
    for (name, (tag, reason)) in &verdicts {
        assert_eq!(tag, "PASS", "zoo model {name}: {reason}");
    }
}

/// The ONNX model zoo's classic architectures (VGG-19 alone has 144M weights):
/// minutes of work, so outside CI: `cargo test --release -- --ignored onnx_light`.
#[test]
#[ignore]
fn onnx_light_models_pass() {
    let Some(shared) = common::shared_dir() else { return };
    let verdicts = verify(&[&shared.join("onnx-light")]);
    report("onnx-light", &verdicts);
    for (name, (tag, reason)) in &verdicts {
        assert_eq!(tag, "PASS", "{name}: {reason}");
    }
}
