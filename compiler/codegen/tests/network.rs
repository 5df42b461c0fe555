//! A small CNN end to end: the compute kernels (conv, pool, matmul, reduce) with the
//! core's kernels, epilogues, constants and memory plan, against the interpreter.

mod common;

use cnnc_ir::{
    BinaryFn, ConvGeometry, DType, EpilogueStep, Graph, Op, PoolAttrs, PoolKind, ReduceKind, TensorType, UnaryFn,
};
use common::{Rng, check_graph, random_tensor};

fn constant(g: &mut Graph, rng: &mut Rng, name: &str, shape: &[usize]) -> cnnc_ir::ValueId {
    let t = random_tensor(rng, DType::F32, shape, -0.5, 0.5);
    g.add_constant(name, t)
}

#[test]
fn small_cnn_matches_interpreter() {
    let mut rng = Rng(2024);
    let mut g = Graph::new("tiny_cnn");
    let x = g.add_input(TensorType::f32([2, 3, 12, 12]), "x");
    let w1 = constant(&mut g, &mut rng, "w1", &[8, 3, 3, 3]);
    let b1 = constant(&mut g, &mut rng, "b1", &[8]);
    let geo = |pad: usize, groups: usize| ConvGeometry {
        strides: vec![1, 1],
        dilations: vec![1, 1],
        pads_begin: vec![pad, pad],
        pads_end: vec![pad, pad],
        groups,
    };
    let c1 = g.push1("conv1", Op::Conv(geo(1, 1)), &[x, w1, b1]).unwrap();
    g.nodes.last_mut().unwrap().epilogue = vec![EpilogueStep::Unary(UnaryFn::Relu)];
    let pool = PoolAttrs {
        kind: PoolKind::Max,
        kernel: vec![2, 2],
        strides: vec![2, 2],
        dilations: vec![1, 1],
        pads_begin: vec![0, 0],
        pads_end: vec![0, 0],
    };
    let p1 = g
        .push_typed("pool1", Op::Pool(pool), &[c1], TensorType::f32([2, 8, 6, 6]))
        .unwrap();
    let w2 = constant(&mut g, &mut rng, "w2", &[8, 1, 3, 3]);
    let c2 = g.push1("dw", Op::Conv(geo(1, 8)), &[p1, w2]).unwrap();
    g.nodes.last_mut().unwrap().epilogue = vec![EpilogueStep::Unary(UnaryFn::Clip { min: 0.0, max: 6.0 })];
    let res = g.push1("residual", Op::Binary(BinaryFn::Add), &[c2, p1]).unwrap();
    let flat = g
        .push_typed("flatten", Op::Reshape, &[res], TensorType::f32([2, 288]))
        .unwrap();
    let fc = constant(&mut g, &mut rng, "fc", &[288, 10]);
    let fc_b = constant(&mut g, &mut rng, "fc_b", &[10]);
    let logits = g.push1("fc", Op::MatMul, &[flat, fc]).unwrap();
    let logits = g.push1("fc_bias", Op::Binary(BinaryFn::Add), &[logits, fc_b]).unwrap();
    // Softmax from primitives.
    let m = g
        .push1(
            "max",
            Op::Reduce {
                kind: ReduceKind::Max,
                axes: vec![1],
            },
            &[logits],
        )
        .unwrap();
    let shifted = g.push1("shift", Op::Binary(BinaryFn::Sub), &[logits, m]).unwrap();
    let e = g.push1("exp", Op::Unary(UnaryFn::Exp), &[shifted]).unwrap();
    let s = g
        .push1(
            "sum",
            Op::Reduce {
                kind: ReduceKind::Sum,
                axes: vec![1],
            },
            &[e],
        )
        .unwrap();
    let probs = g.push1("softmax", Op::Binary(BinaryFn::Div), &[e, s]).unwrap();
    let arg = g
        .push1(
            "argmax",
            Op::ArgReduce {
                kind: cnnc_ir::ArgKind::Max,
                axis: 1,
                select_last_index: false,
            },
            &[probs],
        )
        .unwrap();
    g.outputs = vec![probs, arg, c1];
    let input = random_tensor(&mut rng, DType::F32, &[2, 3, 12, 12], -1.0, 1.0);
    check_graph(&g, &[input]).unwrap();
    let model = cnnc_codegen::JitModel::compile(&g).unwrap();
    assert_eq!(
        model.info().kernels,
        12,
        "one kernel per non-constant node but the reshape, whose output is its input's memory"
    );
}

/// A residual operand that only the epilogue reads (an input past the op's own) gives
/// the same result as the unfused Conv → Add → Relu.
#[test]
fn residual_epilogue_operand_matches_unfused_graph() {
    let mut rng = Rng(5);
    let geo = ConvGeometry {
        strides: vec![1, 1],
        dilations: vec![1, 1],
        pads_begin: vec![1, 1],
        pads_end: vec![1, 1],
        groups: 1,
    };
    let build = |fused: bool, rng: &mut Rng| {
        let mut g = Graph::new(if fused { "fused" } else { "unfused" });
        let x = g.add_input(TensorType::f32([1, 4, 7, 7]), "x");
        let skip = g.add_input(TensorType::f32([1, 6, 7, 7]), "skip");
        let w = constant(&mut g, rng, "w", &[6, 4, 3, 3]);
        let b = constant(&mut g, rng, "b", &[6]);
        let y = if fused {
            let y = g.push1("conv", Op::Conv(geo.clone()), &[x, w, b]).unwrap();
            let node = g.nodes.last_mut().unwrap();
            node.inputs.push(skip);
            node.epilogue = vec![
                EpilogueStep::Binary {
                    func: BinaryFn::Add,
                    operand: 3,
                },
                EpilogueStep::Unary(UnaryFn::Relu),
            ];
            y
        } else {
            let c = g.push1("conv", Op::Conv(geo.clone()), &[x, w, b]).unwrap();
            let s = g.push1("add", Op::Binary(BinaryFn::Add), &[c, skip]).unwrap();
            g.push1("relu", Op::Unary(UnaryFn::Relu), &[s]).unwrap()
        };
        g.outputs.push(y);
        g
    };
    let fused = build(true, &mut Rng(5));
    let unfused = build(false, &mut Rng(5));
    cnnc_ir::verify::verify(&fused).unwrap();
    let inputs = [
        random_tensor(&mut rng, DType::F32, &[1, 4, 7, 7], -1.0, 1.0),
        random_tensor(&mut rng, DType::F32, &[1, 6, 7, 7], -1.0, 1.0),
    ];
    let want = cnnc_ir::interp::run(&unfused, &inputs).unwrap();
    let got = cnnc_codegen::JitModel::compile(&fused).unwrap().run(&inputs).unwrap();
    common::check_close(&got[0], &want[0]).unwrap();
}

/// A node whose declared output disagrees with the typing rules is refused with a
/// message, never compiled into out-of-bounds writes.
#[test]
fn inconsistent_nodes_are_errors() {
    let mut g = Graph::new("bad");
    let x = g.add_input(TensorType::f32([2, 3]), "x");
    let y = g.add_node_typed(
        "t",
        Op::Transpose { perm: vec![1, 0] },
        vec![x],
        vec![TensorType::f32([4, 4])],
    )[0];
    g.outputs.push(y);
    let err = cnnc_codegen::JitModel::compile(&g)
        .err()
        .expect("must be refused")
        .to_string();
    assert!(err.contains("node 't'") && err.contains("inconsistent"), "{err}");
}
