//! Runs the ONNX backend-test cases of the group A and infrastructure ops through the
//! frontend and `cnnc_ir::interp::run` (`backend_cases`), comparing with the expected
//! outputs under the DESIGN.md tolerance. Skipped (with a message) when ../shared is absent.

mod backend_cases;

/// The ops this test covers: a case runs when all its nodes are among them.
const OPS: &[&str] = &[
    "Identity",
    "Dropout",
    "Constant",
    "Shape",
    "Size",
    "ConstantOfShape",
    "Cast",
    "CastLike",
    "Relu",
    "Sigmoid",
    "Tanh",
    "Erf",
    "Softplus",
    "Softsign",
    "Mish",
    "HardSwish",
    "Sqrt",
    "Exp",
    "Log",
    "Neg",
    "Abs",
    "Reciprocal",
    "Floor",
    "Ceil",
    "Not",
    "LeakyRelu",
    "Elu",
    "Selu",
    "Celu",
    "HardSigmoid",
    "Swish",
    "Gelu",
    "Clip",
    "PRelu",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Less",
    "LessOrEqual",
    "Greater",
    "GreaterOrEqual",
    "Equal",
    "And",
    "Or",
    "Xor",
    "Sum",
    "Mean",
    "Max",
    "Min",
    "Where",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
    "Expand",
    "Tile",
    "DepthToSpace",
    "SpaceToDepth",
    "Concat",
    "Split",
    "Slice",
    "Pad",
    "Gather",
];

/// Cases known to fail, with the reason (none at the moment).
const KNOWN_FAILURES: &[(&str, &str)] = &[];

#[test]
fn onnx_backend_cases_of_group_a_ops_match_under_the_interpreter() {
    let suites = backend_cases::shared_suites();
    if suites.is_empty() {
        return;
    }
    let only_group_a = |ops: &[&str]| ops.iter().all(|op| OPS.contains(op));
    let summary = backend_cases::run_suites(&suites, only_group_a, KNOWN_FAILURES);
    summary.report("group A backend cases");
    assert!(summary.failed.is_empty(), "{} case(s) failed:\n{}", summary.failed.len(), summary.failed.join("\n"));
    assert!(summary.passed.len() > 100, "only {} cases passed", summary.passed.len());
}
