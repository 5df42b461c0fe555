//! Blocked (NCHWc8) 1x1 convolutions (`kernels::conv_blocked`) against the
//! interpreter: random channel counts (multiples of 8, odd numbers of blocks
//! included), maps, strides, batches and epilogues (in registers and after).

mod common;

use cnnc_ir::{BinaryFn, ConvGeometry, DType, EpilogueStep, Graph, Layout, Op, TensorType, UnaryFn, ValueId};
use common::{Rng, check_graph, random_tensor};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: common::cases(40),
        ..ProptestConfig::default()
    }
}

const B8: Layout = Layout::Blocked { block: 8 };

fn set_layouts(g: &mut Graph, layout_in: Layout, layout_out: Layout) {
    let node = g.nodes.last_mut().unwrap();
    node.schedule.layout_in = layout_in;
    node.schedule.layout_out = layout_out;
}

fn reorder(g: &mut Graph, x: ValueId, from: Layout, to: Layout) -> ValueId {
    let y = g.push1("reorder", Op::Reorder, &[x]).unwrap();
    set_layouts(g, from, to);
    y
}

#[derive(Clone, Copy, Debug)]
enum Epilogue {
    None,
    Relu,
    Relu6,
    Residual,
    Relu6ThenResidual,
    /// Sigmoid: not applied in registers, so the pass after the tiles runs it.
    Sigmoid,
    /// SiLU (EfficientNet): per tile through the activation functions.
    Silu,
    /// A per-channel multiply then ReLU: the whole epilogue after the tiles.
    ScaleThenRelu,
}

struct Case {
    n: usize,
    k: usize,
    m: usize,
    h: usize,
    w: usize,
    stride: usize,
    bias: bool,
    epilogue: Epilogue,
}

fn build(c: &Case, rng: &mut Rng) -> (Graph, Vec<cnnc_ir::Tensor>) {
    let mut g = Graph::new("pointwise");
    let oh = (c.h - 1) / c.stride + 1;
    let ow = (c.w - 1) / c.stride + 1;
    let x = g.add_input(TensorType::f32(vec![c.n, c.k, c.h, c.w]), "x");
    let z = g.add_input(TensorType::f32(vec![c.n, c.m, oh, ow]), "z");
    let w = g.add_constant("w", random_tensor(rng, DType::F32, &[c.m, c.k, 1, 1], -1.0, 1.0));
    let bias = g.add_constant("b", random_tensor(rng, DType::F32, &[c.m], -1.0, 1.0));
    let scale = g.add_constant("scale", random_tensor(rng, DType::F32, &[1, c.m, 1, 1], -2.0, 2.0));
    let xb = reorder(&mut g, x, Layout::Plain, B8);
    let zb = reorder(&mut g, z, Layout::Plain, B8);
    let geometry = ConvGeometry {
        strides: vec![c.stride; 2],
        dilations: vec![1, 1],
        pads_begin: vec![0, 0],
        pads_end: vec![0, 0],
        groups: 1,
    };
    let inputs: Vec<ValueId> = if c.bias { vec![xb, w, bias] } else { vec![xb, w] };
    let y = g.push1("conv", Op::Conv(geometry), &inputs).unwrap();
    set_layouts(&mut g, B8, B8);
    let relu6 = EpilogueStep::Unary(UnaryFn::Clip { min: 0.0, max: 6.0 });
    {
        let node = g.nodes.last_mut().unwrap();
        let extra = node.inputs.len();
        match c.epilogue {
            Epilogue::None => {}
            Epilogue::Relu => node.epilogue = vec![EpilogueStep::Unary(UnaryFn::Relu)],
            Epilogue::Relu6 => node.epilogue = vec![relu6.clone()],
            Epilogue::Residual => {
                node.inputs.push(zb);
                node.epilogue = vec![EpilogueStep::Binary { func: BinaryFn::Add, operand: extra }];
            }
            Epilogue::Relu6ThenResidual => {
                node.inputs.push(zb);
                node.epilogue = vec![relu6.clone(), EpilogueStep::Binary { func: BinaryFn::Add, operand: extra }];
            }
            Epilogue::Sigmoid => node.epilogue = vec![EpilogueStep::Unary(UnaryFn::Relu), EpilogueStep::Unary(UnaryFn::Sigmoid)],
            Epilogue::Silu => node.epilogue = vec![EpilogueStep::Unary(UnaryFn::Swish { alpha: 1.0 })],
            Epilogue::ScaleThenRelu => {
                node.inputs.push(scale);
                node.epilogue = vec![
                    EpilogueStep::Binary { func: BinaryFn::Mul, operand: extra },
                    EpilogueStep::Unary(UnaryFn::Relu),
                ];
            }
        }
    }
    let out = reorder(&mut g, y, B8, Layout::Plain);
    g.outputs.push(out);
    cnnc_ir::verify(&g).unwrap_or_else(|e| panic!("{e}\n{}", cnnc_ir::print(&g)));
    let inputs = vec![
        random_tensor(rng, DType::F32, &[c.n, c.k, c.h, c.w], -2.0, 2.0),
        random_tensor(rng, DType::F32, &[c.n, c.m, oh, ow], -2.0, 2.0),
    ];
    (g, inputs)
}

fn epilogue_strategy() -> impl Strategy<Value = Epilogue> {
    prop::sample::select(vec![
        Epilogue::None,
        Epilogue::Relu,
        Epilogue::Relu6,
        Epilogue::Residual,
        Epilogue::Relu6ThenResidual,
        Epilogue::Sigmoid,
        Epilogue::Silu,
        Epilogue::ScaleThenRelu,
    ])
}

fn host_has_avx2() -> bool {
    cnnc_codegen::kernels::conv_blocked::runs_on(&cnnc_codegen::TargetSpec::host())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn blocked_pointwise_matches_interpreter(
        n in 1usize..3,
        k_blocks in 1usize..9,
        m_blocks in 1usize..8,
        h in 1usize..12,
        w in 1usize..12,
        stride in 1usize..3,
        bias in any::<bool>(),
        epilogue in epilogue_strategy(),
        seed in 1u64..u64::MAX,
    ) {
        if !host_has_avx2() {
            return Ok(());
        }
        let case = Case { n, k: 8 * k_blocks, m: 8 * m_blocks, h, w, stride, bias, epilogue };
        let (g, inputs) = build(&case, &mut Rng(seed));
        check_graph(&g, &inputs).map_err(|e| TestCaseError::fail(format!("{e}\n{}", cnnc_ir::print_with(&g, &cnnc_ir::PrintOptions { elide_constant_data: true }))))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(16), ..ProptestConfig::default() })]

    /// More output channels than positions and over 256 input channels: the weights are
    /// walked in slices of the reduction (partial sums stored in the output between
    /// them), unless a residual add forbids it; balanced tiles of a few positions.
    #[test]
    fn blocked_pointwise_sliced_reduction_matches_interpreter(
        n in 1usize..3,
        k_blocks in 33usize..70,
        m_blocks in 1usize..6,
        h in 1usize..5,
        w in 1usize..8,
        stride in 1usize..3,
        bias in any::<bool>(),
        epilogue in epilogue_strategy(),
        seed in 1u64..u64::MAX,
    ) {
        if !host_has_avx2() {
            return Ok(());
        }
        let case = Case { n, k: 8 * k_blocks, m: 8 * m_blocks, h, w, stride, bias, epilogue };
        let (g, inputs) = build(&case, &mut Rng(seed));
        check_graph(&g, &inputs).map_err(|e| TestCaseError::fail(format!("{e}\n{}", cnnc_ir::print_with(&g, &cnnc_ir::PrintOptions { elide_constant_data: true }))))?;
    }
}

/// SqueezeNet-1.1's classifier: 512 -> 1000 channels over 13 x 13 positions (two slices
/// of the reduction, 24 tiles of 6 positions and 5 of 5), through one and two threads.
#[test]
fn squeezenet_classifier_with_threads() {
    if !host_has_avx2() {
        return;
    }
    let target = cnnc_codegen::TargetSpec::host();
    let case = Case { n: 1, k: 512, m: 1000, h: 13, w: 13, stride: 1, bias: true, epilogue: Epilogue::Relu };
    let (g, inputs) = build(&case, &mut Rng(3));
    let want = cnnc_ir::interp::run(&g, &inputs).unwrap();
    for threads in [1, 2] {
        let got = common::run_shared_library("conv_blocked", &g, &target, threads, &inputs).unwrap();
        common::check_close(&got[0], &want[0]).unwrap_or_else(|e| panic!("{threads} threads: {e}"));
    }
}

/// MobileNet-v2 shapes: 49 positions (balanced tiles: 4 of 6 and 5 of 5), 160 -> 960
/// and 960 -> 160 channels, through a two-thread session of a linked library.
#[test]
fn mobilenet_shapes_with_threads() {
    if !host_has_avx2() {
        return;
    }
    let target = cnnc_codegen::TargetSpec::host();
    for (k, m, hw, epilogue) in [(160, 960, 7, Epilogue::Relu6), (960, 160, 7, Epilogue::Residual), (24, 144, 56, Epilogue::Relu6), (40, 240, 28, Epilogue::Silu), (16, 96, 13, Epilogue::ScaleThenRelu)] {
        let case = Case { n: 1, k, m, h: hw, w: hw, stride: 1, bias: true, epilogue };
        let (g, inputs) = build(&case, &mut Rng(11));
        let want = cnnc_ir::interp::run(&g, &inputs).unwrap();
        for threads in [1, 2] {
            let got = common::run_shared_library("conv_blocked", &g, &target, threads, &inputs).unwrap();
            common::check_close(&got[0], &want[0]).unwrap_or_else(|e| panic!("{k}->{m} {hw}x{hw}, {threads} threads: {e}"));
        }
    }
}

/// Without AVX2 the kernel does not exist: compiling a blocked convolution for
/// x86-64-v2 is an error that says so (the layout pass keeps such targets plain).
#[test]
fn x86_64_v2_is_refused_with_a_reason() {
    let case = Case { n: 1, k: 16, m: 16, h: 4, w: 4, stride: 1, bias: true, epilogue: Epilogue::Relu };
    let (g, _) = build(&case, &mut Rng(5));
    let target = cnnc_codegen::TargetSpec::parse(None, Some("x86-64-v2")).unwrap();
    let err = cnnc_codegen::compile_object(&g, &target).err().expect("no blocked 1x1 kernel without AVX2");
    assert!(err.to_string().contains("AVX2"), "{err}");
}

/// Blocked convolution tasks (1x1 and depthwise) run with denormals flushed, as the
/// GEMM tasks do (a denormal input reads as zero), and leave the caller's MXCSR as
/// they found it.
#[cfg(target_arch = "x86_64")]
#[test]
#[allow(deprecated)]
fn denormals_are_flushed_in_blocked_conv_tasks_and_mxcsr_restored() {
    use cnnc_codegen::JitModel;
    use cnnc_ir::{Tensor, TensorData};
    use std::arch::x86_64::_mm_getcsr;
    if !host_has_avx2() {
        return;
    }
    let c = 8;
    let pointwise: Vec<f32> = (0..c * c).map(|i| if i / c == i % c { 1.0 } else { 0.0 }).collect();
    let centre_tap: Vec<f32> = (0..c * 9).map(|i| if i % 9 == 4 { 1.0 } else { 0.0 }).collect();
    for (groups, kernel, weights) in [(1, 1, pointwise), (c, 3, centre_tap)] {
        let mut g = Graph::new("denormal");
        let x = g.add_input(TensorType::f32(vec![1, c, 4, 4]), "x");
        let w = g.add_constant("w", Tensor::f32([c, c / groups, kernel, kernel], weights));
        let xb = reorder(&mut g, x, Layout::Plain, B8);
        let pad = kernel / 2;
        let geometry = ConvGeometry {
            strides: vec![1, 1],
            dilations: vec![1, 1],
            pads_begin: vec![pad; 2],
            pads_end: vec![pad; 2],
            groups,
        };
        let y = g.push1("conv", Op::Conv(geometry), &[xb, w]).unwrap();
        set_layouts(&mut g, B8, B8);
        let y = reorder(&mut g, y, B8, Layout::Plain);
        g.outputs.push(y);
        let model = JitModel::compile(&g).unwrap();
        let denormal = f32::from_bits(0x0000_1000);
        assert!(denormal != 0.0 && !denormal.is_normal());
        // SAFETY: reading MXCSR has no side effects.
        let before = unsafe { _mm_getcsr() };
        let out = model.run(&[Tensor::f32([1, c, 4, 4], vec![denormal; c * 16])]).unwrap();
        let after = unsafe { _mm_getcsr() };
        assert_eq!(before, after, "MXCSR restored (groups {groups})");
        assert_eq!(before & 0x8040, 0, "the test thread runs without FTZ/DAZ");
        assert_eq!(out[0].data, TensorData::F32(vec![0.0; c * 16]), "denormal inputs read as zero (groups {groups})");
    }
}
