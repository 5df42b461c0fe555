//! Blocked (NCHWc) layouts: reorders and elementwise nodes over blocked values,
//! compiled and run against the interpreter (which ignores layouts, so a blocked
//! graph must compute exactly what its plain form does).

mod common;

use cnnc_ir::{BinaryFn, EpilogueStep, Graph, Layout, Op, TensorType, UnaryFn, ValueId};
use common::{Rng, check_graph, random_tensor};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: common::cases(32),
        ..ProptestConfig::default()
    }
}

fn blocked(block: u32) -> Layout {
    Layout::Blocked { block }
}

/// Appends `reorder(x)` from layout `from` to `to`.
fn reorder(g: &mut Graph, x: ValueId, from: Layout, to: Layout) -> ValueId {
    let y = g.push1("reorder", Op::Reorder, &[x]).unwrap();
    let node = g.nodes.last_mut().unwrap();
    node.schedule.layout_in = from;
    node.schedule.layout_out = to;
    y
}

fn set_layout(g: &mut Graph, layout: Layout) {
    let node = g.nodes.last_mut().unwrap();
    node.schedule.layout_in = layout;
    node.schedule.layout_out = layout;
}

fn shape_strategy() -> impl Strategy<Value = (usize, usize, usize, usize, u32)> {
    (1usize..3, 1usize..5, 1usize..10, 1usize..10, prop::sample::select(vec![4u32, 8, 16]))
}

fn verified(g: Graph) -> Result<Graph, TestCaseError> {
    cnnc_ir::verify(&g).map_err(|e| TestCaseError::fail(format!("verify: {e}\n{}", cnnc_ir::print(&g))))?;
    Ok(g)
}

proptest! {
    #![proptest_config(config())]

    /// input -> blocked -> plain -> output is the identity, for any block size.
    #[test]
    fn reorder_round_trip((n, cb, h, w, block) in shape_strategy(), seed in 1u64..u64::MAX) {
        let shape = vec![n, cb * block as usize, h, w];
        let mut g = Graph::new("round_trip");
        let x = g.add_input(TensorType::f32(shape.clone()), "x");
        let b = reorder(&mut g, x, Layout::Plain, blocked(block));
        let y = reorder(&mut g, b, blocked(block), Layout::Plain);
        g.outputs.push(y);
        let g = verified(g)?;
        let x = random_tensor(&mut Rng(seed), cnnc_ir::DType::F32, &shape, -4.0, 4.0);
        check_graph(&g, &[x]).map_err(TestCaseError::fail)?;
    }

    /// Unary, binary with a same-shape blocked operand, a per-channel plain broadcast
    /// ([1, C, 1, 1] and [N, C, 1, 1]), a spatial plain broadcast ([1, 1, H, W]) and an
    /// epilogue (bias, activation, residual add) on blocked values, between reorders.
    #[test]
    fn elementwise_on_blocked_values((n, cb, h, w, block) in shape_strategy(), seed in 1u64..u64::MAX) {
        let c = cb * block as usize;
        let shape = vec![n, c, h, w];
        let bl = blocked(block);
        let mut rng = Rng(seed);
        let mut g = Graph::new("elementwise");
        let x = g.add_input(TensorType::f32(shape.clone()), "x");
        let z = g.add_input(TensorType::f32(shape.clone()), "z");
        let per_channel = g.add_constant("scale", random_tensor(&mut rng, cnnc_ir::DType::F32, &[1, c, 1, 1], -2.0, 2.0));
        let per_image = g.add_input(TensorType::f32(vec![n, c, 1, 1]), "se");
        let spatial = g.add_constant("spatial", random_tensor(&mut rng, cnnc_ir::DType::F32, &[1, 1, h, w], -2.0, 2.0));
        let xb = reorder(&mut g, x, Layout::Plain, bl);
        let zb = reorder(&mut g, z, Layout::Plain, bl);
        let a = g.push1("relu", Op::Unary(UnaryFn::Relu), &[xb]).unwrap();
        set_layout(&mut g, bl);
        let s = g.push1("sum", Op::Binary(BinaryFn::Add), &[a, zb]).unwrap();
        set_layout(&mut g, bl);
        let m = g.push1("scale", Op::Binary(BinaryFn::Mul), &[s, per_channel]).unwrap();
        set_layout(&mut g, bl);
        let e = g.push1("se", Op::Binary(BinaryFn::Mul), &[per_image, m]).unwrap();
        set_layout(&mut g, bl);
        let p = g.push1("spatial", Op::Binary(BinaryFn::Sub), &[e, spatial]).unwrap();
        set_layout(&mut g, bl);
        // Epilogue: + per-channel, clip, + residual (blocked, the output's shape).
        let q = g.push1("fused", Op::Unary(UnaryFn::Neg), &[p]).unwrap();
        {
            let node = g.nodes.last_mut().unwrap();
            node.inputs.push(per_channel);
            node.inputs.push(zb);
            node.epilogue = vec![
                EpilogueStep::Binary { func: BinaryFn::Add, operand: 1 },
                EpilogueStep::Unary(UnaryFn::Clip { min: -1.5, max: 3.0 }),
                EpilogueStep::Binary { func: BinaryFn::Add, operand: 2 },
            ];
        }
        set_layout(&mut g, bl);
        let y = reorder(&mut g, q, bl, Layout::Plain);
        g.outputs.push(y);
        let g = verified(g)?;
        let inputs = [
            random_tensor(&mut rng, cnnc_ir::DType::F32, &shape, -4.0, 4.0),
            random_tensor(&mut rng, cnnc_ir::DType::F32, &shape, -4.0, 4.0),
            random_tensor(&mut rng, cnnc_ir::DType::F32, &[n, c, 1, 1], -2.0, 2.0),
        ];
        check_graph(&g, &inputs).map_err(TestCaseError::fail)?;
    }
}

/// The same graphs through a linked library built for x86-64-v2 (SSE only, no AVX).
#[test]
fn reorder_round_trip_on_x86_64_v2() {
    let target = cnnc_codegen::TargetSpec::parse(None, Some("x86-64-v2")).unwrap();
    for (shape, block) in [(vec![1, 16, 7, 7], 8), (vec![2, 8, 4, 4], 8), (vec![1, 32, 3, 5], 16)] {
        let mut g = Graph::new("round_trip");
        let x = g.add_input(TensorType::f32(shape.clone()), "x");
        let b = reorder(&mut g, x, Layout::Plain, blocked(block));
        let r = g.push1("relu", Op::Unary(UnaryFn::Relu), &[b]).unwrap();
        set_layout(&mut g, blocked(block));
        let y = reorder(&mut g, r, blocked(block), Layout::Plain);
        g.outputs.push(y);
        cnnc_ir::verify(&g).unwrap();
        let x = random_tensor(&mut Rng(7), cnnc_ir::DType::F32, &shape, -4.0, 4.0);
        let want = cnnc_ir::interp::run(&g, std::slice::from_ref(&x)).unwrap();
        let got = common::run_shared_library("blocked_layout", &g, &target, 1, &[x]).unwrap();
        common::check_close(&got[0], &want[0]).unwrap();
    }
}

/// A node with no blocked kernel must not compile silently: a codegen error naming
/// the node (a Max reduction; a grouped, not depthwise, 3x3 convolution).
#[test]
fn op_without_blocked_kernel_is_rejected() {
    let mut g = Graph::new("rejected");
    let x = g.add_input(TensorType::f32(vec![1, 8, 4, 4]), "x");
    let b = reorder(&mut g, x, Layout::Plain, blocked(8));
    let m = g.push1("max_over_space", Op::Reduce { kind: cnnc_ir::ReduceKind::Max, axes: vec![2, 3] }, &[b]).unwrap();
    set_layout(&mut g, blocked(8));
    g.outputs.push(m);
    cnnc_ir::verify(&g).unwrap();
    let e = cnnc_codegen::jit::JitModel::compile(&g).err().expect("a Max reduction has no blocked kernel");
    assert!(e.to_string().contains("max_over_space"), "{e}");

    let mut g = Graph::new("rejected_conv");
    let x = g.add_input(TensorType::f32(vec![1, 8, 4, 4]), "x");
    let w = g.add_constant("w", random_tensor(&mut Rng(1), cnnc_ir::DType::F32, &[8, 4, 3, 3], -1.0, 1.0));
    let b = reorder(&mut g, x, Layout::Plain, blocked(8));
    let geometry = cnnc_ir::ConvGeometry {
        strides: vec![1, 1],
        dilations: vec![1, 1],
        pads_begin: vec![1, 1],
        pads_end: vec![1, 1],
        groups: 2,
    };
    let c = g.push1("grouped3x3", Op::Conv(geometry), &[b, w]).unwrap();
    set_layout(&mut g, blocked(8));
    let y = reorder(&mut g, c, blocked(8), Layout::Plain);
    g.outputs.push(y);
    cnnc_ir::verify(&g).unwrap();
    let e = cnnc_codegen::jit::JitModel::compile(&g).err().expect("a grouped (not depthwise) convolution has no blocked kernel");
    assert!(e.to_string().contains("grouped3x3"), "{e}");
}

#[test]
fn reorder_of_layout_free_values_is_a_copy() {
    let mut g = Graph::new("layout_free");
    let x = g.add_input(TensorType::f32(vec![2, 16, 1, 1]), "x");
    let b = reorder(&mut g, x, Layout::Plain, blocked(8));
    let y = g.push1("relu", Op::Unary(UnaryFn::Relu), &[b]).unwrap();
    set_layout(&mut g, blocked(8));
    // A layout-free blocked value may be a graph output.
    g.outputs.push(y);
    cnnc_ir::verify(&g).unwrap();
    let x = random_tensor(&mut Rng(3), cnnc_ir::DType::F32, &[2, 16, 1, 1], -1.0, 1.0);
    check_graph(&g, &[x]).unwrap();
}
