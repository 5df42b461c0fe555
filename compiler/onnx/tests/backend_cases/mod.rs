//! The ONNX backend-test case runner shared by the interpreter conformance tests: loads a
//! case through the frontend, runs every `test_data_set_*` with `cnnc_ir::interp::run` and
//! compares with the expected outputs under the DESIGN.md tolerance (`cnnc_ir::compare`).
//!
//! Operands that ONNX tests pass as graph inputs but cnnc needs constant (Reshape's shape,
//! Resize's sizes, reduction axes...) are bound to their test values, the way a real model
//! has them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use cnnc_ir::Tensor;
use cnnc_ir::compare::compare;
use cnnc_onnx::{FrontendError, LoadOptions, decode_model, load_model_with_constant_inputs, read_tensor_pb};

/// The conformance suites under ../shared (CNNC_SHARED overrides its place); empty, with a
/// SKIP message, where ../shared is absent (a user's fresh clone).
pub fn shared_suites() -> Vec<PathBuf> {
    suites_named(&["onnx-node", "onnx-pytorch"])
}

/// The named folders of ../shared, or none (with a SKIP message) where it is absent.
pub fn suites_named(names: &[&str]) -> Vec<PathBuf> {
    let shared = match std::env::var_os("CNNC_SHARED") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared"),
    };
    if !shared.join("onnx-node").is_dir() {
        eprintln!("SKIP: ONNX backend cases not found at {} (set CNNC_SHARED)", shared.display());
        return Vec::new();
    }
    names.iter().map(|s| shared.join(s)).collect()
}

pub enum Outcome {
    Pass,
    Skip(String),
    Fail(String),
}

/// What a suite run found, case names with reasons.
#[derive(Default)]
pub struct Summary {
    pub passed: Vec<String>,
    pub skipped: Vec<String>,
    pub failed: Vec<String>,
}

impl Summary {
    /// Prints skips and failures (passes too with CNNC_LIST_CASES) and the counts.
    pub fn report(&self, what: &str) {
        if std::env::var_os("CNNC_LIST_CASES").is_some() {
            for p in &self.passed {
                eprintln!("PASS {p}");
            }
        }
        for s in &self.skipped {
            eprintln!("SKIP {s}");
        }
        for f in &self.failed {
            eprintln!("FAIL {f}");
        }
        eprintln!("{what}: {} passed, {} failed, {} skipped", self.passed.len(), self.failed.len(), self.skipped.len());
    }
}

/// Runs every case of `suites` whose node op types `select` accepts; `known_failures`
/// (name, reason) count as skips.
pub fn run_suites(suites: &[PathBuf], select: impl Fn(&[&str]) -> bool, known_failures: &[(&str, &str)]) -> Summary {
    let mut summary = Summary::default();
    for suite in suites {
        let Ok(entries) = std::fs::read_dir(suite) else { continue };
        let mut cases: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        cases.sort();
        for case in cases {
            let Ok(bytes) = std::fs::read(case.join("model.onnx")) else { continue };
            let Ok(model) = decode_model(&bytes) else { continue };
            let graph = model.graph.unwrap_or_default();
            let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
            if ops.is_empty() || !select(&ops) {
                continue;
            }
            let name = case.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            match run_case(&case) {
                Outcome::Pass => summary.passed.push(name),
                Outcome::Skip(why) => {
                    summary.skipped.push(format!("{name}: {}", why.lines().take(2).collect::<Vec<_>>().join(" ")))
                }
                Outcome::Fail(why) if known_failures.iter().any(|(k, _)| *k == name) => {
                    summary.skipped.push(format!("{name}: known failure: {why}"))
                }
                Outcome::Fail(why) => summary.failed.push(format!("{name}: {why}")),
            }
        }
    }
    summary
}

fn numbered(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    while dir.join(format!("{prefix}_{}.pb", files.len())).is_file() {
        files.push(dir.join(format!("{prefix}_{}.pb", files.len())));
    }
    files
}

fn data_sets(case: &Path) -> Vec<PathBuf> {
    let mut sets = Vec::new();
    while case.join(format!("test_data_set_{}", sets.len())).is_dir() {
        sets.push(case.join(format!("test_data_set_{}", sets.len())));
    }
    sets
}

/// Names quoted in "input K ('NAME') must be a compile-time constant" reasons.
fn names_needed_constant(e: &FrontendError) -> Vec<String> {
    let FrontendError::Unsupported(nodes) = e else { return Vec::new() };
    nodes
        .iter()
        .filter_map(|n| {
            let (_, rest) = n.reason.split_once("('")?;
            let (name, tail) = rest.split_once("')")?;
            tail.contains("must be a compile-time constant").then(|| name.to_string())
        })
        .collect()
}

fn read_all(files: &[PathBuf]) -> Result<Vec<Tensor>, String> {
    files.iter().map(|f| read_tensor_pb(f).map(|(_, t)| t).map_err(|e| e.to_string())).collect()
}

/// One case: every data set through the interpreter.
pub fn run_case(case: &Path) -> Outcome {
    let model_path = case.join("model.onnx");
    let model = match std::fs::read(&model_path)
        .map_err(|e| e.to_string())
        .and_then(|b| decode_model(&b).map_err(|e| e.to_string()))
    {
        Ok(m) => m,
        Err(e) => return Outcome::Fail(e),
    };
    let graph_proto = model.graph.clone().unwrap_or_default();
    let initializers: Vec<&str> = graph_proto.initializer.iter().map(|t| t.name.as_str()).collect();
    let input_names: Vec<String> =
        graph_proto.input.iter().filter(|i| !initializers.contains(&i.name.as_str())).map(|i| i.name.clone()).collect();
    let sets = data_sets(case);
    // Without data the case can still be refused as unsupported while loading.
    let first_inputs = match sets.first().map(|set| read_all(&numbered(set, "input"))).unwrap_or(Ok(Vec::new())) {
        Ok(t) => t,
        Err(e) => return Outcome::Skip(format!("input data: {e}")),
    };
    let mut bound: Vec<(String, Tensor)> = Vec::new();
    let graph = loop {
        match load_model_with_constant_inputs(&model_path, &LoadOptions::default(), &bound) {
            Ok(g) => break g,
            Err(e) => {
                let needed: Vec<String> = names_needed_constant(&e)
                    .into_iter()
                    .filter(|n| input_names.contains(n) && !bound.iter().any(|(b, _)| b == n))
                    .collect();
                if needed.is_empty() {
                    return if e.is_unsupported() { Outcome::Skip(e.to_string()) } else { Outcome::Fail(e.to_string()) };
                }
                for name in needed {
                    let Some(value) = input_names.iter().position(|n| *n == name).and_then(|i| first_inputs.get(i)) else {
                        return Outcome::Fail(format!("no input data for '{name}'"));
                    };
                    bound.push((name, value.clone()));
                }
            }
        }
    };
    if let Err(e) = cnnc_ir::verify::verify(&graph) {
        return Outcome::Fail(format!("verifier: {e}"));
    }
    if sets.is_empty() {
        return Outcome::Fail("no test_data_set_0".into());
    }
    for set in &sets {
        let inputs = match read_all(&numbered(set, "input")) {
            Ok(t) => t,
            Err(e) => return Outcome::Skip(format!("input data: {e}")),
        };
        if inputs.len() != input_names.len() {
            return Outcome::Fail(format!("{} input files for {} graph inputs", inputs.len(), input_names.len()));
        }
        let run_inputs: Vec<Tensor> = input_names
            .iter()
            .zip(&inputs)
            .filter(|(n, _)| !bound.iter().any(|(b, _)| b == *n))
            .map(|(_, t)| t.clone())
            .collect();
        let outputs = match cnnc_ir::interp::run(&graph, &run_inputs) {
            Ok(o) => o,
            Err(e) => return Outcome::Fail(format!("interp: {e}")),
        };
        let expected = match read_all(&numbered(set, "output")) {
            Ok(t) => t,
            Err(e) => return Outcome::Fail(format!("output data: {e}")),
        };
        if outputs.len() != expected.len() {
            return Outcome::Fail(format!("{} outputs, expected {}", outputs.len(), expected.len()));
        }
        for (k, (got, want)) in outputs.iter().zip(&expected).enumerate() {
            if let Err(e) = compare(got, want) {
                let set_name = set.file_name().unwrap_or_default().to_string_lossy();
                return Outcome::Fail(format!("{set_name}: output {k}: {e}"));
            }
        }
    }
    Outcome::Pass
}
