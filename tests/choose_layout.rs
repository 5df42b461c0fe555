//! The choose-layout pass (blocked NCHWc8 regions): IR snapshots before and after on
//! MobileNet-like blocks, the cases it must leave alone (channels not a multiple of 8,
//! a lone 1x1 convolution, a target without AVX2), and compiled blocked graphs
//! against the interpreter over random blocks (re-bless snapshots with
//! `INSTA_UPDATE=always cargo test --test choose_layout`).

use cnnc::passes::{PassContext, TargetDesc, choose_layout, run_pipeline};
use cnnc_ir::print::{PrintOptions, print_with};
use cnnc_ir::{BinaryFn, ConvGeometry, EpilogueStep, Graph, Layout, Op, ReduceKind, Tensor, TensorType, UnaryFn, ValueId};
use proptest::prelude::*;

fn ctx() -> PassContext {
    PassContext { target: TargetDesc::fixed_for_tests() }
}

fn seq(n: usize, scale: f32, salt: usize) -> Vec<f32> {
    (0..n).map(|i| (((i + salt) * 7 % 13) as f32 - 6.0) * scale).collect()
}

fn geometry(stride: usize, pad: usize, groups: usize) -> ConvGeometry {
    ConvGeometry {
        strides: vec![stride; 2],
        dilations: vec![1, 1],
        pads_begin: vec![pad; 2],
        pads_end: vec![pad; 2],
        groups,
    }
}

fn relu6() -> EpilogueStep {
    EpilogueStep::Unary(UnaryFn::Clip { min: 0.0, max: 6.0 })
}

/// conv k x k (groups) with bias and an epilogue.
fn conv(g: &mut Graph, name: &str, x: ValueId, out: usize, k: usize, stride: usize, groups: usize, epilogue: Vec<EpilogueStep>) -> ValueId {
    let c = g.ty(x).shape[1];
    let w = g.add_constant(format!("{name}.w"), Tensor::f32(vec![out, c / groups, k, k], seq(out * c / groups * k * k, 0.02, out)));
    let b = g.add_constant(format!("{name}.b"), Tensor::f32(vec![out], seq(out, 0.1, 3)));
    let y = g.push1(name, Op::Conv(geometry(stride, k / 2, groups)), &[x, w, b]).unwrap();
    g.nodes.last_mut().unwrap().epilogue = epilogue;
    y
}

/// MobileNet-v2's inverted residual: expand 1x1 + ReLU6, depthwise 3x3 + ReLU6,
/// project 1x1 (+ the input when the stride is 1 and the channels match).
fn inverted_residual(g: &mut Graph, name: &str, x: ValueId, expand: usize, out: usize, stride: usize) -> ValueId {
    let c = g.ty(x).shape[1];
    let e = conv(g, &format!("{name}.expand"), x, c * expand, 1, 1, 1, vec![relu6()]);
    let d = conv(g, &format!("{name}.dw"), e, c * expand, 3, stride, c * expand, vec![relu6()]);
    let p = conv(g, &format!("{name}.project"), d, out, 1, 1, 1, vec![]);
    if stride == 1 && c == out {
        let node = g.nodes.last_mut().unwrap();
        node.inputs.push(x);
        node.epilogue.push(EpilogueStep::Binary { func: BinaryFn::Add, operand: 3 });
    }
    p
}

/// A stem conv (3x3, plain), two inverted residuals, global average pooling, a
/// squeeze-excite style multiply and a plain consumer (flatten).
fn mobilenet_like(channels: usize, hw: usize, stride: usize) -> Graph {
    let mut g = Graph::new("mobilenet_like");
    let x = g.add_input(TensorType::f32(vec![1, 3, hw, hw]), "x");
    let stem = conv(&mut g, "stem", x, channels, 3, 1, 1, vec![relu6()]);
    let b1 = inverted_residual(&mut g, "block1", stem, 2, channels, 1);
    let b2 = inverted_residual(&mut g, "block2", b1, 3, channels + 8, stride);
    let gap = g.push1("gap", Op::Reduce { kind: ReduceKind::Mean, axes: vec![2, 3] }, &[b2]).unwrap();
    let gate = g.push1("gate", Op::Unary(UnaryFn::Sigmoid), &[gap]).unwrap();
    let scaled = g.push1("se", Op::Binary(BinaryFn::Mul), &[b2, gate]).unwrap();
    let shape = g.ty(scaled).shape.clone();
    let flat = g.push_typed("flatten", Op::Reshape, &[scaled], TensorType::f32(vec![1, shape[1..].iter().product()])).unwrap();
    g.outputs.push(flat);
    g.outputs.push(gap);
    cnnc_ir::verify(&g).unwrap();
    g
}

fn elided(g: &Graph) -> String {
    print_with(g, &PrintOptions { elide_constant_data: true })
}

fn run_pass(g: &mut Graph, ctx: &PassContext) {
    run_pipeline(g, &[choose_layout::PASS], ctx, |_, _| {}).unwrap();
}

fn blocked_nodes(g: &Graph) -> usize {
    g.nodes.iter().filter(|n| n.schedule.layout_out != Layout::Plain).count()
}

fn reorders(g: &Graph) -> usize {
    g.nodes.iter().filter(|n| n.op == Op::Reorder).count()
}

#[test]
fn mobilenet_blocks_become_one_region() {
    let mut g = mobilenet_like(16, 8, 2);
    insta::assert_snapshot!("mobilenet_like__before", elided(&g));
    run_pass(&mut g, &ctx());
    insta::assert_snapshot!("mobilenet_like__after", elided(&g));
    // No reorder in (the stem reads the plain input and writes blocked), one out: the
    // flatten reads the SE output plain.
    assert_eq!(reorders(&g), 1, "{}", elided(&g));
    let stem = g.nodes.iter().find(|n| n.name == "stem").unwrap();
    assert_eq!((stem.schedule.layout_in, stem.schedule.layout_out), (Layout::Plain, Layout::Blocked { block: 8 }));
    let convs_blocked = g.nodes.iter().filter(|n| matches!(n.op, Op::Conv(_)) && n.schedule.layout_in != Layout::Plain).count();
    assert_eq!(convs_blocked, 6, "{}", elided(&g));
}

#[test]
fn channels_not_a_multiple_of_8_stay_plain() {
    let mut g = mobilenet_like(12, 6, 1);
    // block1 expands 12 -> 24 (blockable), its depthwise too, but its input and output
    // (12 channels) are not: only the depthwise could be a region, and one depthwise
    // does not pay for two reorders.
    let before = g.clone();
    run_pass(&mut g, &ctx());
    insta::assert_snapshot!("odd_channels__after", elided(&g));
    for node in &g.nodes {
        if let Some(&out) = node.outputs.first()
            && node.schedule.layout_out != Layout::Plain
        {
            assert_eq!(g.ty(out).shape[1] % 8, 0, "{}", elided(&g));
        }
    }
    assert!(g.nodes.len() >= before.nodes.len());

    // A region that pays for its two reorders between 12-channel convolutions: the
    // 24-channel middle is blocked, the convolutions reading or writing 12 channels not.
    let mut g = Graph::new("odd_borders");
    let x = g.add_input(TensorType::f32(vec![1, 12, 6, 6]), "x");
    let e = conv(&mut g, "expand", x, 24, 1, 1, 1, vec![relu6()]);
    let d1 = conv(&mut g, "dw1", e, 24, 3, 1, 24, vec![relu6()]);
    let p = conv(&mut g, "mix", d1, 24, 1, 1, 1, vec![relu6()]);
    let d2 = conv(&mut g, "dw2", p, 24, 3, 1, 24, vec![relu6()]);
    let out = conv(&mut g, "project", d2, 12, 1, 1, 1, vec![]);
    g.outputs.push(out);
    run_pass(&mut g, &ctx());
    let blocked: Vec<&str> = g
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Conv(_)) && n.schedule.layout_out != Layout::Plain)
        .map(|n| n.name.as_str())
        .collect();
    assert_eq!(blocked, ["dw1", "mix", "dw2"], "{}", elided(&g));
    assert_eq!(reorders(&g), 2, "{}", elided(&g));
}

#[test]
fn a_lone_pointwise_conv_is_not_rewritten() {
    let mut g = Graph::new("lone");
    let x = g.add_input(TensorType::f32(vec![1, 16, 7, 7]), "x");
    let y = conv(&mut g, "pw", x, 32, 1, 1, 1, vec![EpilogueStep::Unary(UnaryFn::Relu)]);
    let z = g.push1("relu", Op::Unary(UnaryFn::Relu), &[y]).unwrap();
    g.outputs.push(z);
    let before = elided(&g);
    run_pass(&mut g, &ctx());
    assert_eq!(elided(&g), before);
}

/// SqueezeNet's fire module: squeeze and expand 1x1 would be a region, but its value
/// feeds the plain 3x3 expand and the concat reads the 1x1 expand plain: three
/// reorders for two 1x1 convolutions do not pay.
#[test]
fn a_fire_module_is_not_worth_its_reorders() {
    let mut g = Graph::new("fire");
    let x = g.add_input(TensorType::f32(vec![1, 32, 8, 8]), "x");
    let squeeze = conv(&mut g, "squeeze", x, 16, 1, 1, 1, vec![EpilogueStep::Unary(UnaryFn::Relu)]);
    let e1 = conv(&mut g, "expand1x1", squeeze, 32, 1, 1, 1, vec![EpilogueStep::Unary(UnaryFn::Relu)]);
    let e3 = conv(&mut g, "expand3x3", squeeze, 32, 3, 1, 1, vec![EpilogueStep::Unary(UnaryFn::Relu)]);
    let cat = g.push1("concat", Op::Concat { axis: 1 }, &[e1, e3]).unwrap();
    g.outputs.push(cat);
    let before = elided(&g);
    run_pass(&mut g, &ctx());
    assert_eq!(elided(&g), before);
}

#[test]
fn targets_without_avx2_stay_plain() {
    let mut g = mobilenet_like(16, 8, 1);
    let before = elided(&g);
    let mut narrow = ctx();
    narrow.target.vector_width = 4;
    run_pass(&mut g, &narrow);
    assert_eq!(elided(&g), before);
}

#[test]
fn the_option_removes_the_pass() {
    let names = |nchwc| {
        cnnc::passes::inference_pipeline_with(&cnnc::passes::PipelineOptions { nchwc })
            .iter()
            .map(|p| p.name)
            .collect::<Vec<_>>()
    };
    assert!(names(true).contains(&"choose-layout"));
    assert!(!names(false).contains(&"choose-layout"));
}

fn host_runs_blocked() -> bool {
    cnnc_codegen::kernels::conv_blocked::runs_on(&cnnc_codegen::TargetSpec::host())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24), ..ProptestConfig::default() })]

    /// The whole pipeline (layout regions included) compiled for the host against the
    /// interpreter on the unoptimised graph.
    #[test]
    fn compiled_regions_match_the_interpreter(
        channels in prop::sample::select(vec![8usize, 12, 16, 24, 32]),
        hw in 3usize..12,
        stride in 1usize..3,
        seed in 1u64..u64::MAX,
    ) {
        if !host_runs_blocked() {
            return Ok(());
        }
        let g = mobilenet_like(channels, hw, stride);
        let mut rng = seed;
        let input: Vec<f32> = (0..3 * hw * hw)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (rng >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
            })
            .collect();
        let x = Tensor::f32(vec![1, 3, hw, hw], input);
        let want = cnnc_ir::interp::run(&g, std::slice::from_ref(&x)).unwrap();
        let mut optimised = g.clone();
        let target = TargetDesc::from_target(&cnnc_codegen::TargetSpec::host());
        cnnc::driver::optimize(&mut optimised, &target, |_, _| {}).unwrap();
        prop_assert!(reorders(&optimised) > 0 || channels % 8 != 0, "{}", elided(&optimised));
        prop_assert!(blocked_nodes(&optimised) > 0 || channels % 8 != 0);
        let model = cnnc_codegen::JitModel::compile(&optimised).map_err(|e| TestCaseError::fail(format!("{e}\n{}", elided(&optimised))))?;
        let got = model.run(&[x]).unwrap();
        for (a, b) in got.iter().zip(&want) {
            cnnc::compare::compare(a, b).map_err(|e| TestCaseError::fail(format!("{e}\n{}", elided(&optimised))))?;
        }
    }
}

/// SqueezeNet's fire module: squeeze 1x1, expand 1x1 and 3x3 (padding 1), concat.
fn fire(g: &mut Graph, name: &str, x: ValueId, squeeze: usize, expand: usize) -> ValueId {
    let relu = || vec![EpilogueStep::Unary(UnaryFn::Relu)];
    let s = conv(g, &format!("{name}.squeeze"), x, squeeze, 1, 1, 1, relu());
    let e1 = conv(g, &format!("{name}.expand1x1"), s, expand, 1, 1, 1, relu());
    let e3 = conv(g, &format!("{name}.expand3x3"), s, expand, 3, 1, 1, relu());
    g.push1(&format!("{name}.concat"), Op::Concat { axis: 1 }, &[e1, e3]).unwrap()
}

/// A SqueezeNet-like body: max pool, three fire modules, a 1x1 classifier, global
/// average pooling.
fn squeezenet_like(channels: usize, hw: usize, squeeze: usize, expand: usize, classes: usize) -> Graph {
    let mut g = Graph::new("squeezenet_like");
    let x = g.add_input(TensorType::f32(vec![1, channels, hw, hw]), "x");
    let pooled_hw = (hw - 3) / 2 + 1;
    let attrs = cnnc_ir::PoolAttrs {
        kind: cnnc_ir::PoolKind::Max,
        kernel: vec![3, 3],
        strides: vec![2, 2],
        dilations: vec![1, 1],
        pads_begin: vec![0, 0],
        pads_end: vec![0, 0],
    };
    let pooled = g
        .push_typed("pool", Op::Pool(attrs), &[x], TensorType::f32(vec![1, channels, pooled_hw, pooled_hw]))
        .unwrap();
    let mut y = pooled;
    for i in 0..3 {
        y = fire(&mut g, &format!("fire{i}"), y, squeeze, expand);
    }
    let logits = conv(&mut g, "classifier", y, classes, 1, 1, 1, vec![EpilogueStep::Unary(UnaryFn::Relu)]);
    let gap = g.push1("gap", Op::Reduce { kind: ReduceKind::Mean, axes: vec![2, 3] }, &[logits]).unwrap();
    g.outputs.push(gap);
    cnnc_ir::verify(&g).unwrap();
    g
}

#[test]
fn squeezenet_fire_modules_become_one_region() {
    let mut g = squeezenet_like(32, 15, 16, 32, 16);
    run_pass(&mut g, &ctx());
    insta::assert_snapshot!("squeezenet_like__after", elided(&g));
    // One reorder in (the pool reads the plain input and stays plain), the GAP's
    // [1, C, 1, 1] output is the same bytes in both layouts.
    assert_eq!(reorders(&g), 1, "{}", elided(&g));
    let concats_blocked = g.nodes.iter().filter(|n| matches!(n.op, Op::Concat { .. }) && n.schedule.layout_in != Layout::Plain).count();
    assert_eq!(concats_blocked, 3, "{}", elided(&g));
    let pool = g.nodes.iter().find(|n| matches!(n.op, Op::Pool(_))).unwrap();
    assert_eq!(pool.schedule.layout_in, Layout::Plain);
}

/// 3x3 convolutions over many channels run as Winograd on the plain path, which beats
/// the direct kernel (ResNet-18): a ResNet-like stack stays plain.
#[test]
fn wide_winograd_convolutions_stay_plain() {
    let mut g = Graph::new("resnet_like");
    let x = g.add_input(TensorType::f32(vec![1, 128, 14, 14]), "x");
    let relu = || vec![EpilogueStep::Unary(UnaryFn::Relu)];
    let a = conv(&mut g, "conv1", x, 128, 3, 1, 1, relu());
    let b = conv(&mut g, "conv2", a, 128, 3, 1, 1, relu());
    let c = conv(&mut g, "project", b, 64, 1, 1, 1, relu());
    let gap = g.push1("gap", Op::Reduce { kind: ReduceKind::Mean, axes: vec![2, 3] }, &[c]).unwrap();
    g.outputs.push(gap);
    let before = elided(&g);
    run_pass(&mut g, &ctx());
    assert_eq!(elided(&g), before);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(16), ..ProptestConfig::default() })]

    /// SqueezeNet-like bodies through the whole pipeline (direct 3x3 convolutions and
    /// channel concats in the blocked region) against the interpreter.
    #[test]
    fn compiled_fire_modules_match_the_interpreter(
        channels in prop::sample::select(vec![8usize, 16, 24]),
        hw in 5usize..20,
        squeeze in prop::sample::select(vec![8usize, 16]),
        expand in prop::sample::select(vec![8usize, 16, 24, 32]),
        seed in 1u64..u64::MAX,
    ) {
        if !host_runs_blocked() {
            return Ok(());
        }
        let g = squeezenet_like(channels, hw, squeeze, expand, 16);
        let mut rng = seed;
        let input: Vec<f32> = (0..channels * hw * hw)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (rng >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
            })
            .collect();
        let x = Tensor::f32(vec![1, channels, hw, hw], input);
        let want = cnnc_ir::interp::run(&g, std::slice::from_ref(&x)).unwrap();
        let mut optimised = g.clone();
        let target = TargetDesc::from_target(&cnnc_codegen::TargetSpec::host());
        cnnc::driver::optimize(&mut optimised, &target, |_, _| {}).unwrap();
        prop_assert!(blocked_nodes(&optimised) > 0, "{}", elided(&optimised));
        let model = cnnc_codegen::JitModel::compile(&optimised).map_err(|e| TestCaseError::fail(format!("{e}\n{}", elided(&optimised))))?;
        let got = model.run(&[x]).unwrap();
        for (a, b) in got.iter().zip(&want) {
            cnnc::compare::compare(a, b).map_err(|e| TestCaseError::fail(format!("{e}\n{}", elided(&optimised))))?;
        }
    }
}
