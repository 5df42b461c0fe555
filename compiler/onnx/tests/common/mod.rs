//! Helpers shared by the frontend's integration tests.
#![allow(dead_code)]

use cnnc_ir::{DType, Graph, Op, Tensor, TensorData};
use cnnc_onnx::{FrontendError, LoadOptions, ModelBuilder, load_model_bytes};

/// Loads a model and checks the IR verifier accepts what the frontend produced.
pub fn load(m: &ModelBuilder) -> Graph {
    let g = load_model_bytes(&m.to_bytes(), &LoadOptions::default()).unwrap_or_else(|e| panic!("load failed: {e}"));
    if let Err(e) = cnnc_ir::verify::verify(&g) {
        panic!("the frontend produced IR the verifier rejects: {e}");
    }
    g
}

pub fn load_err(m: &ModelBuilder) -> FrontendError {
    match load_model_bytes(&m.to_bytes(), &LoadOptions::default()) {
        Ok(g) => panic!("expected an error, loaded {} nodes", g.nodes.len()),
        Err(e) => e,
    }
}

pub fn run(g: &Graph, inputs: &[Tensor]) -> Vec<Tensor> {
    cnnc_ir::interp::run(g, inputs).unwrap_or_else(|e| panic!("interp failed: {e}"))
}

/// Loads and runs a model, returning its outputs.
pub fn eval(m: &ModelBuilder, inputs: &[Tensor]) -> Vec<Tensor> {
    run(&load(m), inputs)
}

pub fn f32s(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::f32(shape.to_vec(), v.to_vec())
}

pub fn i64s(shape: &[usize], v: &[i64]) -> Tensor {
    Tensor::new(shape.to_vec(), TensorData::I64(v.to_vec()))
}

pub fn i32s(shape: &[usize], v: &[i32]) -> Tensor {
    Tensor::new(shape.to_vec(), TensorData::I32(v.to_vec()))
}

pub fn bools(shape: &[usize], v: &[bool]) -> Tensor {
    Tensor::new(shape.to_vec(), TensorData::Bool(v.to_vec()))
}

/// 0, 1, 2, ... as f32.
pub fn iota(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::f32(shape.to_vec(), (0..n).map(|i| i as f32).collect())
}

pub fn assert_close(got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape, want.shape, "shape");
    match (&got.data, &want.data) {
        (TensorData::F32(g), TensorData::F32(w)) => {
            for (i, (a, b)) in g.iter().zip(w).enumerate() {
                let ok = (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= 1e-5 + 1e-4 * b.abs();
                assert!(ok, "element {i}: got {a}, want {b}\n got {g:?}\nwant {w:?}");
            }
        }
        _ => assert_eq!(got, want),
    }
}

/// Op mnemonics of the graph's non-constant nodes, in order.
pub fn ops(g: &Graph) -> Vec<&'static str> {
    g.nodes.iter().filter(|n| !matches!(n.op, Op::Constant(_))).map(|n| n.op.mnemonic()).collect()
}

pub fn single_input(name: &str, dtype: DType, shape: &[usize], opset: i64) -> ModelBuilder {
    let mut m = ModelBuilder::new("t", opset);
    m.input(name, dtype, shape);
    m
}
