//! Helpers for the group B op tests: one-node models built with the writer, with runtime
//! inputs and initializers, loaded and run by the interpreter.
#![allow(dead_code)]

use cnnc_ir::{DType, Tensor, TensorData};
use cnnc_onnx::proto::AttributeProto;
use cnnc_onnx::{FrontendError, LoadOptions, ModelBuilder, load_model_bytes};

/// Deterministic test data, multiples of 1/4 in [-2, 2]: exact in f32, the same values
/// the expected results were computed from.
pub fn wave(shape: &[usize], k: usize) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::f32(shape.to_vec(), (0..n).map(|i| ((i * 37 + 11 + k) % 17) as f32 / 4.0 - 2.0).collect())
}

pub fn f32s(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::f32(shape.to_vec(), v.to_vec())
}

pub fn i64s(shape: &[usize], v: &[i64]) -> Tensor {
    Tensor::new(shape.to_vec(), TensorData::I64(v.to_vec()))
}

/// A model under construction plus the values of its runtime inputs.
pub struct Case {
    pub model: ModelBuilder,
    feeds: Vec<Tensor>,
}

impl Case {
    pub fn new(opset: i64) -> Case {
        Case { model: ModelBuilder::new("t", opset), feeds: Vec::new() }
    }

    /// A graph input fed with `value` when the model runs.
    pub fn input(mut self, name: &str, value: Tensor) -> Case {
        self.model.input(name, value.data.dtype(), &value.shape);
        self.feeds.push(value);
        self
    }

    /// An initializer (a compile-time constant).
    pub fn init(mut self, name: &str, value: Tensor) -> Case {
        self.model.initializer(name, &value);
        self
    }

    pub fn node(mut self, op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) -> Case {
        self.model.node(op, inputs, outputs, attrs);
        self
    }

    fn with_outputs(mut self, outputs: &[(&str, DType)]) -> (ModelBuilder, Vec<Tensor>) {
        for (name, dtype) in outputs {
            self.model.output_untyped(name, *dtype);
        }
        (self.model, self.feeds)
    }

    /// Loads and runs the model, returning the named outputs.
    pub fn run(self, outputs: &[(&str, DType)]) -> Vec<Tensor> {
        let (model, feeds) = self.with_outputs(outputs);
        let graph = load_model_bytes(&model.to_bytes(), &LoadOptions::default()).unwrap_or_else(|e| panic!("load failed: {e}"));
        cnnc_ir::interp::run(&graph, &feeds).unwrap_or_else(|e| panic!("interp failed: {e}"))
    }

    /// Loads and runs the model with a single f32 output `y`.
    pub fn run_y(self) -> Tensor {
        self.run(&[("y", DType::F32)]).remove(0)
    }

    /// The loading error, when the model must be refused.
    pub fn load_error(self, outputs: &[(&str, DType)]) -> FrontendError {
        let (model, _) = self.with_outputs(outputs);
        match load_model_bytes(&model.to_bytes(), &LoadOptions::default()) {
            Ok(g) => panic!("expected an error, loaded {} nodes", g.nodes.len()),
            Err(e) => e,
        }
    }
}

/// Asserts `got` equals `want` in shape and, elementwise, within 1e-5 + 1e-5·|want|
/// (integers exactly).
pub fn assert_close(got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape, want.shape, "shape");
    match (&got.data, &want.data) {
        (TensorData::F32(g), TensorData::F32(w)) => {
            for (i, (a, b)) in g.iter().zip(w).enumerate() {
                let ok = (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= 1e-5 + 1e-5 * b.abs();
                assert!(ok, "element {i}: got {a}, want {b}\n got {g:?}\nwant {w:?}");
            }
        }
        _ => assert_eq!(got, want),
    }
}

/// Asserts the error is an unsupported-node report whose reason contains `needle`.
pub fn assert_unsupported(e: &FrontendError, needle: &str) {
    match e {
        FrontendError::Unsupported(nodes) => {
            assert!(nodes.iter().any(|n| n.reason.contains(needle)), "no reason mentions '{needle}': {e}")
        }
        other => panic!("expected an unsupported-node error mentioning '{needle}', got {other}"),
    }
}

/// Asserts the error is an invalid-model error whose message contains `needle`.
pub fn assert_invalid(e: &FrontendError, needle: &str) {
    match e {
        FrontendError::Invalid(m) => assert!(m.contains(needle), "'{m}' does not mention '{needle}'"),
        other => panic!("expected an invalid-model error mentioning '{needle}', got {other}"),
    }
}
