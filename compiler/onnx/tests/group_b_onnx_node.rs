//! Runs every ONNX backend-test case that uses a group B op (conv, pools, normalization,
//! linear algebra, softmax, reductions, resize, losses, GatherElements) through the frontend
//! and `cnnc_ir::interp::run`, comparing with the expected outputs under the DESIGN.md
//! tolerance. Skipped (with a message) when /work/shared is absent. Extra case folders can
//! be listed in CNNC_EXTRA_ONNX_CASES (':'-separated), e.g. cases generated from the onnx
//! Python package.
//!
//! Operands that ONNX tests pass as graph inputs but cnnc needs constant (Resize's sizes,
//! reduction axes...) are bound to their test values, the way a real model has them.

use std::path::{Path, PathBuf};

use cnnc_ir::Tensor;
use cnnc_onnx::{FrontendError, LoadOptions, decode_model, load_model_with_constant_inputs, read_tensor_pb};

const SUITES: &[&str] = &["/work/shared/onnx-node", "/work/shared/onnx-pytorch"];

/// A case runs when one of its nodes is one of these.
const OPS: &[&str] = &[
    "Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "BatchNormalization",
    "InstanceNormalization", "LayerNormalization", "GroupNormalization", "LRN", "Gemm", "MatMul", "Softmax", "LogSoftmax", "ReduceSum", "ReduceMean", "ReduceMax",
    "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp", "ArgMax",
    "ArgMin", "Resize", "Upsample", "NegativeLogLikelihoodLoss", "SoftmaxCrossEntropyLoss", "GatherElements",
];

/// Cases known to fail, with the reason.
const KNOWN_FAILURES: &[(&str, &str)] = &[];

enum Outcome {
    Pass,
    Skip(String),
    Fail(String),
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

use cnnc_ir::compare::compare;

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

fn run_case(case: &Path) -> Outcome {
    let model_path = case.join("model.onnx");
    let model = match std::fs::read(&model_path).map_err(|e| e.to_string()).and_then(|b| decode_model(&b).map_err(|e| e.to_string())) {
        Ok(m) => m,
        Err(e) => return Outcome::Fail(e),
    };
    let graph_proto = model.graph.clone().unwrap_or_default();
    let initializers: Vec<&str> = graph_proto.initializer.iter().map(|t| t.name.as_str()).collect();
    let input_names: Vec<String> =
        graph_proto.input.iter().filter(|i| !initializers.contains(&i.name.as_str())).map(|i| i.name.clone()).collect();
    let sets = data_sets(case);
    let Some(first_set) = sets.first() else { return Outcome::Fail("no test_data_set_0".into()) };
    let first_inputs = match read_all(&numbered(first_set, "input")) {
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
                return Outcome::Fail(format!("{}: output {k}: {e}", set.file_name().unwrap_or_default().to_string_lossy()));
            }
        }
    }
    Outcome::Pass
}

#[test]
fn onnx_backend_cases_of_group_b_ops_match_under_the_interpreter() {
    let extra = std::env::var("CNNC_EXTRA_ONNX_CASES").unwrap_or_default();
    let mut suites: Vec<&str> = extra.split(':').filter(|s| !s.is_empty()).collect();
    if Path::new("/work/shared").is_dir() {
        suites.extend(SUITES);
    } else {
        eprintln!("SKIP: /work/shared is absent");
    }
    let (mut passed, mut skipped, mut failed) = (Vec::new(), Vec::new(), Vec::new());
    for suite in &suites {
        let Ok(entries) = std::fs::read_dir(suite) else { continue };
        let mut cases: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        cases.sort();
        for case in cases {
            let Ok(bytes) = std::fs::read(case.join("model.onnx")) else { continue };
            let Ok(model) = decode_model(&bytes) else { continue };
            let graph = model.graph.unwrap_or_default();
            if !graph.node.iter().any(|n| OPS.contains(&n.op_type.as_str())) {
                continue;
            }
            let name = case.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            match run_case(&case) {
                Outcome::Pass => passed.push(name),
                Outcome::Skip(why) => skipped.push(format!("{name}: {}", why.lines().take(2).collect::<Vec<_>>().join(" "))),
                Outcome::Fail(why) if KNOWN_FAILURES.iter().any(|(k, _)| *k == name) => {
                    skipped.push(format!("{name}: known failure: {why}"))
                }
                Outcome::Fail(why) => failed.push(format!("{name}: {why}")),
            }
        }
    }
    if std::env::var_os("CNNC_LIST_CASES").is_some() {
        for p in &passed {
            eprintln!("PASS {p}");
        }
    }
    for s in &skipped {
        eprintln!("SKIP {s}");
    }
    for f in &failed {
        eprintln!("FAIL {f}");
    }
    eprintln!("group B backend cases: {} passed, {} failed, {} skipped", passed.len(), failed.len(), skipped.len());
    assert!(failed.is_empty(), "{} case(s) failed:\n{}", failed.len(), failed.join("\n"));
    if !suites.is_empty() && Path::new("/work/shared").is_dir() {
        assert!(passed.len() > 300, "only {} cases passed", passed.len());
    }
}
