//! IR dumps after every pass for small models built in code, kept as insta
//! snapshots (re-bless with `INSTA_UPDATE=always cargo test --test ir_snapshots`).
//! The dumps do not depend on the machine: the pipeline runs for `TargetDesc::fixed_for_tests`.

use cnnc::passes::TargetDesc;
use cnnc_ir::print::{PrintOptions, print_with};
use cnnc_ir::{DType, Tensor};
use cnnc_onnx::{ModelBuilder, attr};

fn seq(n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) * scale).collect()
}

/// conv -> BatchNormalization -> Relu, a residual Add, global pooling, Gemm.
fn residual_block() -> Vec<u8> {
    let mut m = ModelBuilder::new("residual_block", 17);
    m.input("x", DType::F32, &[1, 4, 6, 6])
        .initializer("w", &Tensor::f32(vec![4, 4, 3, 3], seq(144, 0.05)))
        .initializer("gamma", &Tensor::f32(vec![4], vec![1.0, 0.5, 2.0, 1.5]))
        .initializer("beta", &Tensor::f32(vec![4], vec![0.1, -0.1, 0.0, 0.2]))
        .initializer("mean", &Tensor::f32(vec![4], vec![0.0, 0.1, -0.2, 0.3]))
        .initializer("var", &Tensor::f32(vec![4], vec![1.0, 2.0, 0.5, 1.0]))
        .initializer("fc.w", &Tensor::f32(vec![3, 4], seq(12, 0.1)))
        .initializer("fc.b", &Tensor::f32(vec![3], vec![0.0; 3]))
        .initializer("shape", &Tensor::new(vec![2], cnnc_ir::TensorData::I64(vec![1, -1])))
        .node("Conv", &["x", "w"], &["c"], vec![attr::ints("pads", &[1, 1, 1, 1])])
        .node("BatchNormalization", &["c", "gamma", "beta", "mean", "var"], &["bn"], vec![attr::float("epsilon", 1e-5)])
        .node("Relu", &["bn"], &["r"], vec![])
        .node("Add", &["r", "x"], &["sum"], vec![])
        .node("GlobalAveragePool", &["sum"], &["gap"], vec![])
        .node("Reshape", &["gap", "shape"], &["flat"], vec![])
        .node("Reshape", &["flat", "shape"], &["flat2"], vec![])
        .node("Gemm", &["flat2", "fc.w", "fc.b"], &["y"], vec![attr::int("transB", 1)])
        .output("y", DType::F32, &[1, 3]);
    m.to_bytes()
}

/// Shape arithmetic that must fold away entirely, and a node that must not fold
/// (it depends on the input).
fn shape_arithmetic() -> Vec<u8> {
    let mut m = ModelBuilder::new("shape_arithmetic", 17);
    m.input("x", DType::F32, &[2, 3, 4])
        .node("Shape", &["x"], &["s"], vec![])
        .initializer("idx", &Tensor::new(vec![1], cnnc_ir::TensorData::I64(vec![0])))
        .node("Gather", &["s", "idx"], &["n"], vec![attr::int("axis", 0)])
        .initializer("minus1", &Tensor::new(vec![1], cnnc_ir::TensorData::I64(vec![-1])))
        .node("Concat", &["n", "minus1"], &["target"], vec![attr::int("axis", 0)])
        .node("Reshape", &["x", "target"], &["y"], vec![])
        .output("y", DType::F32, &[2, 12]);
    m.to_bytes()
}

fn snapshot_pipeline(name: &str, bytes: &[u8]) {
    let mut g = cnnc_onnx::load_model_bytes(bytes, &Default::default()).expect("model loads");
    let opts = PrintOptions { elide_constant_data: true };
    insta::assert_snapshot!(format!("{name}__0_frontend"), print_with(&g, &opts));
    let mut step = 0;
    let mut dumps = Vec::new();
    cnnc::driver::optimize(&mut g, &TargetDesc::fixed_for_tests(), |pass, g| {
        step += 1;
        dumps.push((format!("{name}__{step}_{pass}"), print_with(g, &opts)));
    })
    .expect("pipeline runs");
    for (snap, text) in dumps {
        insta::assert_snapshot!(snap, text);
    }
}

#[test]
fn residual_block_after_each_pass() {
    snapshot_pipeline("residual_block", &residual_block());
}

#[test]
fn shape_arithmetic_after_each_pass() {
    snapshot_pipeline("shape_arithmetic", &shape_arithmetic());
}

#[test]
fn shape_arithmetic_folds_to_a_single_reshape() {
    let mut g = cnnc_onnx::load_model_bytes(&shape_arithmetic(), &Default::default()).unwrap();
    cnnc::driver::optimize(&mut g, &TargetDesc::fixed_for_tests(), |_, _| {}).unwrap();
    let compute: Vec<&str> = g.nodes.iter().filter(|n| !matches!(n.op, cnnc_ir::Op::Constant(_))).map(|n| n.op.mnemonic()).collect();
    assert_eq!(compute, ["reshape"]);
    assert!(g.constants.is_empty(), "no constant survives: {:?}", g.constants);
}
