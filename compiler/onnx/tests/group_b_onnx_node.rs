//! Runs every ONNX backend-test case that uses a group B op (conv, pools, normalization,
//! linear algebra, softmax, reductions, resize, losses, GatherElements) through the frontend
//! and `cnnc_ir::interp::run` (`backend_cases`), comparing with the expected outputs under
//! the DESIGN.md tolerance. Skipped (with a message) when ../shared is absent. Extra case
//! folders can be listed in CNNC_EXTRA_ONNX_CASES (':'-separated), e.g. cases generated from
//! the onnx Python package.

use std::path::PathBuf;

mod backend_cases;

/// A case runs when one of its nodes is one of these.
const OPS: &[&str] = &[
    "Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "BatchNormalization",
    "InstanceNormalization", "LayerNormalization", "GroupNormalization", "LRN", "Gemm", "MatMul", "Softmax", "LogSoftmax", "ReduceSum", "ReduceMean", "ReduceMax",
    "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp", "ArgMax",
    "ArgMin", "Resize", "Upsample", "NegativeLogLikelihoodLoss", "SoftmaxCrossEntropyLoss", "GatherElements",
];

/// Cases known to fail, with the reason.
const KNOWN_FAILURES: &[(&str, &str)] = &[];

#[test]
fn onnx_backend_cases_of_group_b_ops_match_under_the_interpreter() {
    let extra = std::env::var("CNNC_EXTRA_ONNX_CASES").unwrap_or_default();
    let shared = backend_cases::shared_suites();
    let mut suites: Vec<PathBuf> = extra.split(':').filter(|s| !s.is_empty()).map(PathBuf::from).collect();
    suites.extend(shared.iter().cloned());
    let uses_group_b = |ops: &[&str]| ops.iter().any(|op| OPS.contains(op));
    let summary = backend_cases::run_suites(&suites, uses_group_b, KNOWN_FAILURES);
    summary.report("group B backend cases");
    assert!(summary.failed.is_empty(), "{} case(s) failed:\n{}", summary.failed.len(), summary.failed.join("\n"));
    if !shared.is_empty() {
        assert!(summary.passed.len() > 300, "only {} cases passed", summary.passed.len());
    }
}
