//! Blocked (NCHWc8) direct KxK convolutions (`kernels::conv_direct_blocked`) against
//! the interpreter: random kernel sizes, strides, dilations, paddings (borders on every
//! side, rows and columns entirely at a border), channel counts (odd numbers of blocks
//! included), batches and epilogues (in registers and after), one and two threads.

mod common;

use cnnc_ir::{BinaryFn, ConvGeometry, DType, EpilogueStep, Graph, Layout, Op, TensorType, UnaryFn, ValueId};
use common::{Rng, check_graph, random_tensor};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: common::cases(48),
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
    ReluThenResidual,
    /// Sigmoid: not applied in registers, so the pass after the tiles runs it.
    Sigmoid,
    /// A per-channel multiply then ReLU: the whole epilogue after the tiles.
    ScaleThenRelu,
}

#[derive(Clone, Debug)]
struct Case {
    n: usize,
    k: usize,
    m: usize,
    h: usize,
    w: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    pads_begin: [usize; 2],
    pads_end: [usize; 2],
    bias: bool,
    epilogue: Epilogue,
}

impl Case {
    fn out(&self, axis: usize) -> Option<usize> {
        let size = [self.h, self.w][axis] + self.pads_begin[axis] + self.pads_end[axis];
        let extent = (self.kernel[axis] - 1) * self.dilation[axis] + 1;
        (size >= extent).then(|| (size - extent) / self.stride[axis] + 1)
    }
}

fn build(c: &Case, rng: &mut Rng) -> Option<(Graph, Vec<cnnc_ir::Tensor>)> {
    let (oh, ow) = (c.out(0)?, c.out(1)?);
    let mut g = Graph::new("direct");
    let x = g.add_input(TensorType::f32(vec![c.n, c.k, c.h, c.w]), "x");
    let z = g.add_input(TensorType::f32(vec![c.n, c.m, oh, ow]), "z");
    let w = g.add_constant("w", random_tensor(rng, DType::F32, &[c.m, c.k, c.kernel[0], c.kernel[1]], -1.0, 1.0));
    let bias = g.add_constant("b", random_tensor(rng, DType::F32, &[c.m], -1.0, 1.0));
    let scale = g.add_constant("scale", random_tensor(rng, DType::F32, &[1, c.m, 1, 1], -2.0, 2.0));
    let xb = reorder(&mut g, x, Layout::Plain, B8);
    let zb = reorder(&mut g, z, Layout::Plain, B8);
    let geometry = ConvGeometry {
        strides: c.stride.to_vec(),
        dilations: c.dilation.to_vec(),
        pads_begin: c.pads_begin.to_vec(),
        pads_end: c.pads_end.to_vec(),
        groups: 1,
    };
    let inputs: Vec<ValueId> = if c.bias { vec![xb, w, bias] } else { vec![xb, w] };
    let y = g.push1("conv", Op::Conv(geometry), &inputs).ok()?;
    set_layouts(&mut g, B8, B8);
    {
        let node = g.nodes.last_mut().unwrap();
        let extra = node.inputs.len();
        let relu = EpilogueStep::Unary(UnaryFn::Relu);
        match c.epilogue {
            Epilogue::None => {}
            Epilogue::Relu => node.epilogue = vec![relu],
            Epilogue::Relu6 => node.epilogue = vec![EpilogueStep::Unary(UnaryFn::Clip { min: 0.0, max: 6.0 })],
            Epilogue::Residual => {
                node.inputs.push(zb);
                node.epilogue = vec![EpilogueStep::Binary { func: BinaryFn::Add, operand: extra }];
            }
            Epilogue::ReluThenResidual => {
                node.inputs.push(zb);
                node.epilogue = vec![relu, EpilogueStep::Binary { func: BinaryFn::Add, operand: extra }];
            }
            Epilogue::Sigmoid => node.epilogue = vec![relu, EpilogueStep::Unary(UnaryFn::Sigmoid)],
            Epilogue::ScaleThenRelu => {
                node.inputs.push(scale);
                node.epilogue = vec![EpilogueStep::Binary { func: BinaryFn::Mul, operand: extra }, relu];
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
    Some((g, inputs))
}

fn epilogue_strategy() -> impl Strategy<Value = Epilogue> {
    prop::sample::select(vec![
        Epilogue::None,
        Epilogue::Relu,
        Epilogue::Relu6,
        Epilogue::Residual,
        Epilogue::ReluThenResidual,
        Epilogue::Sigmoid,
        Epilogue::ScaleThenRelu,
    ])
}

fn host_has_avx2() -> bool {
    cnnc_codegen::kernels::conv_blocked::runs_on(&cnnc_codegen::TargetSpec::host())
}

fn conv_node_is_direct(g: &Graph) -> bool {
    let node = g.nodes.iter().find(|n| matches!(n.op, Op::Conv(_))).unwrap();
    matches!(
        cnnc_codegen::kernels::conv_blocked::plan(g, node, &cnnc_codegen::TargetSpec::host()),
        Ok(Some(cnnc_codegen::kernels::conv_blocked::BlockedConvPlan::Direct(_)))
    )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn blocked_direct_matches_interpreter(
        n in 1usize..3,
        k_blocks in 1usize..4,
        m_blocks in 1usize..6,
        h in 1usize..16,
        w in 1usize..20,
        kernel in (1usize..6, 1usize..6),
        stride in (1usize..3, 1usize..3),
        dilation in prop::sample::select(vec![(1usize, 1usize), (1, 1), (2, 1), (1, 2)]),
        pads in (0usize..3, 0usize..3, 0usize..3, 0usize..3),
        bias in any::<bool>(),
        epilogue in epilogue_strategy(),
        seed in 1u64..u64::MAX,
    ) {
        if !host_has_avx2() {
            return Ok(());
        }
        let case = Case {
            n,
            k: 8 * k_blocks,
            m: 8 * m_blocks,
            h,
            w,
            kernel: [kernel.0, kernel.1],
            stride: [stride.0, stride.1],
            dilation: [dilation.0, dilation.1],
            pads_begin: [pads.0, pads.1],
            pads_end: [pads.2, pads.3],
            bias,
            epilogue,
        };
        let Some((g, inputs)) = build(&case, &mut Rng(seed)) else { return Ok(()) };
        // Shapes whose rows or columns lie entirely in the padding stay on other kernels.
        let node = g.nodes.iter().find(|n| matches!(n.op, Op::Conv(_))).unwrap();
        if !cnnc_codegen::kernels::conv_blocked::supports_node(&g, node) {
            return Ok(());
        }
        check_graph(&g, &inputs).map_err(|e| TestCaseError::fail(format!("{e}\n{case:?}")))?;
    }
}

/// SqueezeNet's, ResNet's and GoogLeNet's shapes through a two-thread session of a
/// linked library: the fire modules' 3x3 expands, a strided 3x3, a 5x5 and a 7x7 stem
/// over 8 channels.
#[test]
fn model_shapes_with_threads() {
    if !host_has_avx2() {
        return;
    }
    let target = cnnc_codegen::TargetSpec::host();
    let cases = [
        (16, 64, 55, 3, 1, 1, Epilogue::Relu),
        (48, 192, 13, 3, 1, 1, Epilogue::Relu),
        (64, 128, 28, 3, 2, 1, Epilogue::Relu6),
        (64, 64, 14, 3, 1, 1, Epilogue::ReluThenResidual),
        (16, 40, 14, 5, 1, 2, Epilogue::Relu),
        (8, 24, 30, 7, 2, 3, Epilogue::None),
    ];
    for (k, m, hw, kernel, stride, pad, epilogue) in cases {
        let case = Case {
            n: 1,
            k,
            m,
            h: hw,
            w: hw,
            kernel: [kernel; 2],
            stride: [stride; 2],
            dilation: [1, 1],
            pads_begin: [pad; 2],
            pads_end: [pad; 2],
            bias: true,
            epilogue,
        };
        let (g, inputs) = build(&case, &mut Rng(7)).unwrap();
        assert!(conv_node_is_direct(&g), "{case:?} runs on the direct kernel");
        let want = cnnc_ir::interp::run(&g, &inputs).unwrap();
        for threads in [1, 2] {
            let got = common::run_shared_library("conv_direct_blocked", &g, &target, threads, &inputs).unwrap();
            common::check_close(&got[0], &want[0]).unwrap_or_else(|e| panic!("{case:?}, {threads} threads: {e}"));
        }
    }
}

/// A stem: a plain input of at most 8 channels, a blocked output (no reorder between).
fn build_stem(c: &Case, rng: &mut Rng) -> Option<(Graph, Vec<cnnc_ir::Tensor>)> {
    let (oh, ow) = (c.out(0)?, c.out(1)?);
    let mut g = Graph::new("stem");
    let x = g.add_input(TensorType::f32(vec![c.n, c.k, c.h, c.w]), "x");
    let w = g.add_constant("w", random_tensor(rng, DType::F32, &[c.m, c.k, c.kernel[0], c.kernel[1]], -1.0, 1.0));
    let bias = g.add_constant("b", random_tensor(rng, DType::F32, &[c.m], -1.0, 1.0));
    let geometry = ConvGeometry {
        strides: c.stride.to_vec(),
        dilations: c.dilation.to_vec(),
        pads_begin: c.pads_begin.to_vec(),
        pads_end: c.pads_end.to_vec(),
        groups: 1,
    };
    let inputs: Vec<ValueId> = if c.bias { vec![x, w, bias] } else { vec![x, w] };
    let y = g.push1("stem", Op::Conv(geometry), &inputs).ok()?;
    set_layouts(&mut g, Layout::Plain, B8);
    g.nodes.last_mut().unwrap().epilogue = match c.epilogue {
        Epilogue::Relu => vec![EpilogueStep::Unary(UnaryFn::Relu)],
        Epilogue::Relu6 => vec![EpilogueStep::Unary(UnaryFn::Clip { min: 0.0, max: 6.0 })],
        _ => vec![],
    };
    let out = reorder(&mut g, y, B8, Layout::Plain);
    g.outputs.push(out);
    cnnc_ir::verify(&g).unwrap_or_else(|e| panic!("{e}\n{}", cnnc_ir::print(&g)));
    let inputs = vec![random_tensor(rng, DType::F32, &[c.n, c.k, c.h, c.w], -2.0, 2.0)];
    let _ = (oh, ow);
    Some((g, inputs))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn plain_input_stem_matches_interpreter(
        n in 1usize..3,
        k in 1usize..9,
        m_blocks in 1usize..6,
        h in 3usize..20,
        w in 3usize..24,
        kernel in (1usize..8, 1usize..8),
        stride in (1usize..3, 1usize..3),
        pads in (0usize..4, 0usize..4, 0usize..4, 0usize..4),
        bias in any::<bool>(),
        epilogue in prop::sample::select(vec![Epilogue::None, Epilogue::Relu, Epilogue::Relu6]),
        seed in 1u64..u64::MAX,
    ) {
        if !host_has_avx2() {
            return Ok(());
        }
        let case = Case {
            n,
            k,
            m: 8 * m_blocks,
            h,
            w,
            kernel: [kernel.0, kernel.1],
            stride: [stride.0, stride.1],
            dilation: [1, 1],
            pads_begin: [pads.0, pads.1],
            pads_end: [pads.2, pads.3],
            bias,
            epilogue,
        };
        let Some((g, inputs)) = build_stem(&case, &mut Rng(seed)) else { return Ok(()) };
        let node = g.nodes.iter().find(|n| matches!(n.op, Op::Conv(_))).unwrap();
        if !cnnc_codegen::kernels::conv_direct_blocked::supports_plain_input(&g, node) {
            return Ok(());
        }
        check_graph(&g, &inputs).map_err(|e| TestCaseError::fail(format!("{e}\n{case:?}")))?;
    }
}

/// SqueezeNet's and MobileNet's stems (3 channels, 3x3 stride 2) with two threads.
#[test]
fn stems_with_threads() {
    if !host_has_avx2() {
        return;
    }
    let target = cnnc_codegen::TargetSpec::host();
    for (m, hw, pad) in [(64, 224, 0), (32, 224, 1)] {
        let case = Case {
            n: 1,
            k: 3,
            m,
            h: hw,
            w: hw,
            kernel: [3, 3],
            stride: [2, 2],
            dilation: [1, 1],
            pads_begin: [pad; 2],
            pads_end: [pad; 2],
            bias: true,
            epilogue: Epilogue::Relu,
        };
        let (g, inputs) = build_stem(&case, &mut Rng(3)).unwrap();
        let want = cnnc_ir::interp::run(&g, &inputs).unwrap();
        for threads in [1, 2] {
            let got = common::run_shared_library("conv_direct_blocked", &g, &target, threads, &inputs).unwrap();
            common::check_close(&got[0], &want[0]).unwrap_or_else(|e| panic!("{case:?}, {threads} threads: {e}"));
        }
    }
}
