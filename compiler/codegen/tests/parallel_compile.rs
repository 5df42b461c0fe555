//! Kernels compiled on several threads give the same object file as compiled one by one
//! (every other codegen test already runs the parallel path: it is the default on a
//! machine with more than one CPU).

mod common;

use cnnc_codegen::parallel_compile::set_compile_threads;
use cnnc_codegen::{TargetSpec, compile_object};
use cnnc_ir::{BinaryFn, ConvGeometry, DType, Graph, Op, TensorType, UnaryFn};
use common::{Rng, random_tensor};

/// A few kernels of each kind the module defines: GEMM convolutions (task + kernel
/// functions, microkernel bytes, packed weights), Winograd, elementwise.
fn graph() -> Graph {
    let mut rng = Rng(5);
    let mut g = Graph::new("parallel_compile");
    let x = g.add_input(TensorType::f32([1, 8, 10, 10]), "x");
    let geometry = ConvGeometry {
        strides: vec![1, 1],
        dilations: vec![1, 1],
        pads_begin: vec![1, 1],
        pads_end: vec![1, 1],
        groups: 1,
    };
    let w1 = g.add_constant("w1", random_tensor(&mut rng, DType::F32, &[16, 8, 3, 3], -0.5, 0.5));
    let y1 = g.push1("conv1", Op::Conv(geometry.clone()), &[x, w1]).unwrap();
    let r1 = g.push1("relu1", Op::Unary(UnaryFn::Relu), &[y1]).unwrap();
    let w2 = g.add_constant("w2", random_tensor(&mut rng, DType::F32, &[32, 16, 3, 3], -0.5, 0.5));
    let y2 = g.push1("conv2", Op::Conv(geometry), &[r1, w2]).unwrap();
    let t = g.push1("tanh", Op::Unary(UnaryFn::Tanh), &[y2]).unwrap();
    let s = g.push1("square", Op::Binary(BinaryFn::Mul), &[t, t]).unwrap();
    g.outputs = vec![s, r1];
    g
}

#[test]
fn parallel_and_serial_compilation_give_the_same_object() {
    let g = graph();
    let target = TargetSpec::host();
    set_compile_threads(Some(1));
    let serial = compile_object(&g, &target).unwrap();
    for threads in [2, 3, 8] {
        set_compile_threads(Some(threads));
        let parallel = compile_object(&g, &target).unwrap();
        assert!(parallel == serial, "{threads} compile threads give another object file");
    }
    set_compile_threads(None);
}

#[test]
fn parallel_compilation_for_another_cpu_level_matches_too() {
    let g = graph();
    let Ok(target) = TargetSpec::parse(None, Some("x86-64-v2")) else { return };
    set_compile_threads(Some(1));
    let serial = compile_object(&g, &target).unwrap();
    set_compile_threads(Some(4));
    let parallel = compile_object(&g, &target).unwrap();
    set_compile_threads(None);
    assert!(parallel == serial);
}
