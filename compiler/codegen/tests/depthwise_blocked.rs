//! Blocked (NCHWc8) depthwise convolutions (`kernels::depthwise_blocked`, AVX2+FMA
//! machine code) and global average/sum pooling over blocked values
//! (`kernels::pool_blocked`) against the reference interpreter. Graphs run
//! input -> reorder -> blocked node -> reorder -> output, so they mean what their plain
//! form means: random channel counts (multiples of 8), extents (7, odd, wide rows),
//! 3x3 / 5x5 / other kernels, strides 1 and 2, paddings 0..2 (asymmetric), bias and
//! epilogues (ReLU6 in the machine code, SiLU per plane, a residual after the tasks);
//! on the host through the JIT, and through a `.so` with a two-thread session.

mod common;

use cnnc_codegen::{JitModel, TargetSpec};
use cnnc_ir::{
    BinaryFn, ConvGeometry, DType, EpilogueStep, Graph, Layout, Op, ReduceKind, Tensor, TensorType, UnaryFn,
    ValueId, interp,
};
use common::{Rng, cases, check_close, random_tensor};
use proptest::prelude::*;

const BLOCKED: Layout = Layout::Blocked { block: 8 };

fn host_has_avx2() -> bool {
    let host = TargetSpec::host();
    let f = host.cpu_features();
    f.contains(&"avx2") && f.contains(&"fma")
}

/// Appends a reorder of `v` from `from` to `to`.
fn reorder(g: &mut Graph, v: ValueId, from: Layout, to: Layout, name: &str) -> ValueId {
    let r = g.push1(name, Op::Reorder, &[v]).unwrap();
    let node = g.nodes.last_mut().unwrap();
    node.schedule.layout_in = from;
    node.schedule.layout_out = to;
    r
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Step {
    Relu6,
    Relu,
    Swish,
    Sigmoid,
    /// Tanh: no machine-code form, so the generic pass after the tasks.
    Tanh,
    /// An operand of the output's shape (blocked through its own reorder).
    Residual,
}

const STEPS: [Step; 6] = [Step::Relu6, Step::Relu, Step::Swish, Step::Sigmoid, Step::Tanh, Step::Residual];

#[derive(Clone, Debug)]
struct DwProblem {
    batch: usize,
    channels: usize,
    input: [usize; 2],
    kernel: [usize; 2],
    strides: [usize; 2],
    pads_begin: [usize; 2],
    pads_end: [usize; 2],
    dilations: [usize; 2],
    bias: bool,
    steps: Vec<Step>,
    seed: u64,
}

impl DwProblem {
    fn output(&self) -> [usize; 2] {
        std::array::from_fn(|a| {
            let span = self.input[a] + self.pads_begin[a] + self.pads_end[a];
            let window = (self.kernel[a] - 1) * self.dilations[a] + 1;
            (span - window) / self.strides[a] + 1
        })
    }

    fn graph(&self) -> (Graph, Vec<Tensor>) {
        let mut rng = Rng(self.seed | 1);
        let c = self.channels;
        let mut g = Graph::new("depthwise_blocked");
        let x_shape = vec![self.batch, c, self.input[0], self.input[1]];
        let x = g.add_input(TensorType::f32(x_shape.clone()), "x");
        let mut inputs = vec![random_tensor(&mut rng, DType::F32, &x_shape, -1.0, 1.0)];
        let xb = reorder(&mut g, x, Layout::Plain, BLOCKED, "to_blocked");
        let w_shape = [c, 1, self.kernel[0], self.kernel[1]];
        let w = g.add_constant("w", random_tensor(&mut rng, DType::F32, &w_shape, -0.5, 0.5));
        let mut conv_inputs = vec![xb, w];
        if self.bias {
            conv_inputs.push(g.add_constant("b", random_tensor(&mut rng, DType::F32, &[c], -0.5, 0.5)));
        }
        let [oh, ow] = self.output();
        let out_shape = vec![self.batch, c, oh, ow];
        let mut epilogue = Vec::new();
        let mut operands = Vec::new();
        for (i, step) in self.steps.iter().enumerate() {
            let f = match step {
                Step::Relu6 => UnaryFn::Clip { min: 0.0, max: 6.0 },
                Step::Relu => UnaryFn::Relu,
                Step::Swish => UnaryFn::Swish { alpha: 1.0 },
                Step::Sigmoid => UnaryFn::Sigmoid,
                Step::Tanh => UnaryFn::Tanh,
                Step::Residual => {
                    let v = g.add_input(TensorType::f32(out_shape.clone()), format!("residual{i}"));
                    inputs.push(random_tensor(&mut rng, DType::F32, &out_shape, -1.0, 1.0));
                    operands.push(reorder(&mut g, v, Layout::Plain, BLOCKED, &format!("residual{i}_blocked")));
                    epilogue.push(EpilogueStep::Binary {
                        func: BinaryFn::Add,
                        operand: conv_inputs.len() + operands.len() - 1,
                    });
                    continue;
                }
            };
            epilogue.push(EpilogueStep::Unary(f));
        }
        let geometry = ConvGeometry {
            strides: self.strides.to_vec(),
            dilations: self.dilations.to_vec(),
            pads_begin: self.pads_begin.to_vec(),
            pads_end: self.pads_end.to_vec(),
            groups: c,
        };
        let y = g.push1("dw", Op::Conv(geometry), &conv_inputs).unwrap();
        let node = g.nodes.last_mut().unwrap();
        node.inputs.extend(&operands);
        node.epilogue = epilogue;
        node.schedule.layout_in = BLOCKED;
        node.schedule.layout_out = BLOCKED;
        node.schedule.kernel = "depthwise".into();
        let out = reorder(&mut g, y, BLOCKED, Layout::Plain, "to_plain");
        g.outputs.push(out);
        cnnc_ir::verify::verify(&g).unwrap();
        (g, inputs)
    }
}

fn kernel() -> impl Strategy<Value = [usize; 2]> {
    prop_oneof![
        4 => Just([3, 3]),
        3 => Just([5, 5]),
        2 => (1usize..=7, 1usize..=7).prop_map(|(h, w)| [h, w]),
    ]
}

fn problem() -> impl Strategy<Value = DwProblem> {
    (
        (1usize..=2, 1usize..=5),
        (prop_oneof![1usize..=16, Just(7), Just(14)], prop_oneof![1usize..=16, Just(7), 28usize..=60]),
        kernel(),
        (1usize..=2, 1usize..=2),
        prop_oneof![6 => Just([1, 1]), 1 => Just([2, 1]), 1 => Just([1, 2])],
        proptest::collection::vec(0usize..=2, 4),
        any::<bool>(),
        proptest::collection::vec(0usize..STEPS.len(), 0..=2),
        any::<u64>(),
    )
        .prop_map(
            |((batch, blocks), (h, w), kernel, (sy, sx), dilations, pads, bias, steps, seed)| {
                let mut p = DwProblem {
                    batch,
                    channels: 8 * blocks,
                    input: [h, w],
                    kernel,
                    strides: [sy, sx],
                    pads_begin: [pads[0], pads[1]],
                    pads_end: [pads[2], pads[3]],
                    dilations,
                    bias,
                    steps: steps.iter().map(|&s| STEPS[s]).collect(),
                    seed,
                };
                for a in 0..2 {
                    let window = (p.kernel[a] - 1) * p.dilations[a] + 1;
                    let padded = p.input[a] + p.pads_begin[a] + p.pads_end[a];
                    if padded < window {
                        p.input[a] += window - padded;
                    }
                }
                p
            },
        )
}

fn check_all(got: &[Tensor], want: &[Tensor]) -> Result<(), String> {
    for (k, (a, b)) in got.iter().zip(want).enumerate() {
        check_close(a, b).map_err(|e| format!("output {k}: {e}"))?;
    }
    Ok(())
}

fn host_jit(g: &Graph, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
    let model = JitModel::compile(g).map_err(|e| e.to_string())?;
    model.run(inputs).map_err(|e| e.to_string())
}

/// The blocked kernel takes the node (the test is about it, not a fallback).
fn check_dispatch(g: &Graph) -> Result<(), String> {
    let node = g.nodes.iter().find(|n| matches!(n.op, Op::Conv(_))).unwrap();
    match cnnc_codegen::kernels::depthwise_blocked::plan(g, node, &TargetSpec::host()) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("not taken by the blocked kernel".into()),
        Err(e) => Err(e.to_string()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(128), ..ProptestConfig::default() })]

    #[test]
    fn host_matches_interpreter(p in problem()) {
        if !host_has_avx2() {
            return Ok(());
        }
        let (g, inputs) = p.graph();
        check_dispatch(&g).map_err(TestCaseError::fail)?;
        let want = interp::run(&g, &inputs).unwrap();
        let got = host_jit(&g, &inputs).map_err(TestCaseError::fail)?;
        check_all(&got, &want).map_err(TestCaseError::fail)?;
    }
}

/// Layers of MobileNetV2 and EfficientNet-B0 (split into several tasks per image),
/// through a `.so` run by one- and two-thread sessions.
#[test]
fn model_layers_match_interpreter_with_threads() {
    if !host_has_avx2() {
        return;
    }
    let layers = [
        (96, [112, 112], [3, 3], [2, 2], vec![Step::Relu6]),
        (144, [56, 56], [3, 3], [1, 1], vec![Step::Relu6]),
        (960, [7, 7], [3, 3], [1, 1], vec![Step::Relu6]),
        (240, [28, 28], [5, 5], [1, 1], vec![Step::Swish]),
        (672, [14, 14], [5, 5], [2, 2], vec![Step::Swish]),
        (64, [20, 20], [3, 3], [1, 1], vec![Step::Relu, Step::Residual]),
    ];
    let host = TargetSpec::host();
    for (i, (channels, input, kernel, strides, steps)) in layers.into_iter().enumerate() {
        let pad = kernel[0] / 2;
        let p = DwProblem {
            batch: if i % 2 == 0 { 1 } else { 2 },
            channels,
            input,
            kernel,
            strides,
            pads_begin: [pad, pad],
            pads_end: [pad, pad],
            dilations: [1, 1],
            bias: true,
            steps,
            seed: 11 + i as u64,
        };
        let (g, inputs) = p.graph();
        check_dispatch(&g).unwrap();
        let want = interp::run(&g, &inputs).unwrap();
        let got = host_jit(&g, &inputs).unwrap();
        check_all(&got, &want).unwrap_or_else(|e| panic!("layer {i} ({p:?}) on the host: {e}"));
        for threads in [1, 2] {
            let got = common::run_shared_library("depthwise_blocked", &g, &host, threads, &inputs).unwrap();
            check_all(&got, &want).unwrap_or_else(|e| panic!("layer {i} with {threads} threads: {e}"));
        }
    }
}

/// Without AVX2 there is no blocked depthwise kernel: compiling is an error that says
/// why, not a crash or a silent plain kernel over blocked bytes.
#[test]
fn portable_target_rejects_blocked_depthwise() {
    let p = DwProblem {
        batch: 1,
        channels: 16,
        input: [9, 9],
        kernel: [3, 3],
        strides: [1, 1],
        pads_begin: [1, 1],
        pads_end: [1, 1],
        dilations: [1, 1],
        bias: true,
        steps: vec![Step::Relu6],
        seed: 5,
    };
    let (g, _) = p.graph();
    let portable = TargetSpec::parse(None, Some("x86-64-v2")).unwrap();
    let node = g.nodes.iter().find(|n| matches!(n.op, Op::Conv(_))).unwrap();
    assert!(!cnnc_codegen::kernels::depthwise_blocked::supports(&g, node, &portable));
    let err = cnnc_codegen::compile_object(&g, &portable).unwrap_err().to_string();
    assert!(err.contains("AVX2"), "{err}");
}

#[derive(Clone, Debug)]
struct PoolProblem {
    batch: usize,
    channels: usize,
    input: [usize; 2],
    mean: bool,
    seed: u64,
}

impl PoolProblem {
    fn graph(&self) -> (Graph, Vec<Tensor>) {
        let mut rng = Rng(self.seed | 1);
        let mut g = Graph::new("gap_blocked");
        let shape = vec![self.batch, self.channels, self.input[0], self.input[1]];
        let x = g.add_input(TensorType::f32(shape.clone()), "x");
        let xb = reorder(&mut g, x, Layout::Plain, BLOCKED, "to_blocked");
        let kind = if self.mean { ReduceKind::Mean } else { ReduceKind::Sum };
        let y = g.push1("gap", Op::Reduce { kind, axes: vec![2, 3] }, &[xb]).unwrap();
        let node = g.nodes.last_mut().unwrap();
        node.schedule.layout_in = BLOCKED;
        node.schedule.layout_out = BLOCKED;
        // [N, C, 1, 1] is layout-free: a graph output without a reorder.
        g.outputs.push(y);
        cnnc_ir::verify::verify(&g).unwrap();
        (g, vec![random_tensor(&mut rng, DType::F32, &shape, -1.0, 1.0)])
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), ..ProptestConfig::default() })]

    /// Global pooling is portable Cranelift code: the host and x86-64-v2.
    #[test]
    fn global_pooling_matches_interpreter(
        batch in 1usize..=3,
        blocks in 1usize..=6,
        h in prop_oneof![1usize..=9, Just(7), Just(56)],
        w in prop_oneof![1usize..=9, Just(7), Just(56)],
        mean in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let p = PoolProblem { batch, channels: 8 * blocks, input: [h, w], mean, seed };
        let (g, inputs) = p.graph();
        let node = g.nodes.iter().find(|n| matches!(n.op, Op::Reduce { .. })).unwrap();
        prop_assert!(cnnc_codegen::kernels::pool_blocked::supports_global_reduce(&g, node));
        let want = interp::run(&g, &inputs).unwrap();
        let got = host_jit(&g, &inputs).map_err(TestCaseError::fail)?;
        check_all(&got, &want).map_err(TestCaseError::fail)?;
        let portable = TargetSpec::parse(None, Some("x86-64-v2")).unwrap();
        let got = common::run_shared_library("gap_blocked", &g, &portable, 2, &inputs).map_err(TestCaseError::fail)?;
        check_all(&got, &want).map_err(TestCaseError::fail)?;
    }
}

/// Per-layer time of the plain (NCHW) and blocked (NCHWc8) depthwise kernels on the
/// depthwise layers of MobileNetV2 (3x3, ReLU6) and EfficientNet-B0 (3x3/5x5, SiLU),
/// batch 1, one thread (`BENCH_THREADS`), one node per library (the blocked one reads and writes blocked
/// bytes directly: no reorders are timed). Alternates the two, keeps each one's
/// minimum. `cargo test --release -p cnnc-codegen --test depthwise_blocked -- --ignored
/// --nocapture`
#[test]
#[ignore]
fn bench_model_layers_plain_vs_blocked() {
    if !host_has_avx2() {
        return;
    }
    let relu6 = UnaryFn::Clip { min: 0.0, max: 6.0 };
    let silu = UnaryFn::Swish { alpha: 1.0 };
    // (model, channels, input extent, kernel, stride, activation)
    let layers = [
        ("mobilenet_v2", 32, 112, 3, 1, relu6),
        ("mobilenet_v2", 96, 112, 3, 2, relu6),
        ("mobilenet_v2", 144, 56, 3, 1, relu6),
        ("mobilenet_v2", 144, 56, 3, 2, relu6),
        ("mobilenet_v2", 192, 28, 3, 1, relu6),
        ("mobilenet_v2", 192, 28, 3, 2, relu6),
        ("mobilenet_v2", 384, 14, 3, 1, relu6),
        ("mobilenet_v2", 576, 14, 3, 1, relu6),
        ("mobilenet_v2", 576, 14, 3, 2, relu6),
        ("mobilenet_v2", 960, 7, 3, 1, relu6),
        ("efficientnet_b0", 32, 112, 3, 1, silu),
        ("efficientnet_b0", 96, 112, 3, 2, silu),
        ("efficientnet_b0", 144, 56, 3, 1, silu),
        ("efficientnet_b0", 144, 56, 5, 2, silu),
        ("efficientnet_b0", 240, 28, 5, 1, silu),
        ("efficientnet_b0", 240, 28, 3, 2, silu),
        ("efficientnet_b0", 480, 14, 3, 1, silu),
        ("efficientnet_b0", 480, 14, 5, 1, silu),
        ("efficientnet_b0", 672, 14, 5, 1, silu),
        ("efficientnet_b0", 672, 14, 5, 2, silu),
        ("efficientnet_b0", 1152, 7, 5, 1, silu),
        ("efficientnet_b0", 1152, 7, 3, 1, silu),
    ];
    let host = TargetSpec::host();
    let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let threads: usize = std::env::var("BENCH_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    println!("model            C   HxW  k s   plain us  blocked us  plain/blocked");
    let (mut total_plain, mut total_blocked) = (0.0, 0.0);
    for (model, c, hw, k, s, act) in layers {
        let build = |layout: Layout| {
            let mut rng = Rng(3);
            let mut g = Graph::new("layer");
            let x = g.add_input(TensorType::f32([1, c, hw, hw]), "x");
            let w = g.add_constant("w", random_tensor(&mut rng, DType::F32, &[c, 1, k, k], -0.5, 0.5));
            let b = g.add_constant("b", random_tensor(&mut rng, DType::F32, &[c], -0.5, 0.5));
            let geometry = ConvGeometry {
                strides: vec![s, s],
                dilations: vec![1, 1],
                pads_begin: vec![k / 2, k / 2],
                pads_end: vec![k / 2, k / 2],
                groups: c,
            };
            let y = g.push1("dw", Op::Conv(geometry), &[x, w, b]).unwrap();
            let node = g.nodes.last_mut().unwrap();
            node.epilogue = vec![EpilogueStep::Unary(act)];
            node.schedule.layout_in = layout;
            node.schedule.layout_out = layout;
            node.schedule.kernel = "depthwise".into();
            g.outputs.push(y);
            g
        };
        let sessions: Vec<_> = [Layout::Plain, BLOCKED]
            .into_iter()
            .map(|layout| {
                let g = build(layout);
                let object = cnnc_codegen::compile_object(&g, &host).unwrap();
                let path = common::temp_so("dw_bench");
                cnnc_codegen::link_shared(&object, &path, &host).unwrap();
                let model = cnnc_runtime::Model::load(&path).unwrap();
                let _ = std::fs::remove_file(&path);
                let x = vec![0.5f32; c * hw * hw];
                let oh = (hw + 2 * (k / 2) - k) / s + 1;
                (model, x, vec![0f32; c * oh * oh])
            })
            .collect();
        let mut sessions: Vec<_> = sessions
            .iter()
            .map(|(model, x, y)| (cnnc_runtime::Session::new(model, threads).unwrap(), x, y.clone()))
            .collect();
        let mut best = [f64::MAX; 2];
        for _ in 0..runs {
            for (i, (session, x, y)) in sessions.iter_mut().enumerate() {
                let xb: &[u8] = bytemuck_f32(x);
                let yb = bytemuck_f32_mut(y);
                let t = std::time::Instant::now();
                session.run(&[xb], &mut [yb]).unwrap();
                best[i] = best[i].min(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        total_plain += best[0];
        total_blocked += best[1];
        println!(
            "{model:<15} {c:>4} {hw:>4} {k} {s} {:>10.1} {:>11.1} {:>14.2}",
            best[0],
            best[1],
            best[0] / best[1]
        );
    }
    println!("total {total_plain:.1} us plain, {total_blocked:.1} us blocked: {:.2}x", total_plain / total_blocked);
}

fn bytemuck_f32(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn bytemuck_f32_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above; the slice is borrowed mutably for its lifetime.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

#[derive(Clone, Debug)]
struct WindowPoolProblem {
    batch: usize,
    channels: usize,
    input: [usize; 2],
    kernel: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    pads_begin: [usize; 2],
    pads_end: [usize; 2],
    kind: cnnc_ir::PoolKind,
    relu: bool,
    seed: u64,
}

impl WindowPoolProblem {
    fn graph(&self) -> (Graph, Vec<Tensor>) {
        let mut rng = Rng(self.seed | 1);
        let mut g = Graph::new("pool_blocked");
        let shape = vec![self.batch, self.channels, self.input[0], self.input[1]];
        let x = g.add_input(TensorType::f32(shape.clone()), "x");
        let xb = reorder(&mut g, x, Layout::Plain, BLOCKED, "to_blocked");
        let out: [usize; 2] = std::array::from_fn(|a| {
            let window = (self.kernel[a] - 1) * self.dilations[a] + 1;
            (self.input[a] + self.pads_begin[a] + self.pads_end[a] - window) / self.strides[a] + 1
        });
        let attrs = cnnc_ir::PoolAttrs {
            kind: self.kind,
            kernel: self.kernel.to_vec(),
            strides: self.strides.to_vec(),
            dilations: self.dilations.to_vec(),
            pads_begin: self.pads_begin.to_vec(),
            pads_end: self.pads_end.to_vec(),
        };
        let out_ty = TensorType::f32([self.batch, self.channels, out[0], out[1]]);
        let y = g.push_typed("pool", Op::Pool(attrs), &[xb], out_ty).unwrap();
        let node = g.nodes.last_mut().unwrap();
        node.schedule.layout_in = BLOCKED;
        node.schedule.layout_out = BLOCKED;
        if self.relu {
            node.epilogue = vec![EpilogueStep::Unary(UnaryFn::Relu)];
        }
        let y = reorder(&mut g, y, BLOCKED, Layout::Plain, "to_plain");
        g.outputs.push(y);
        cnnc_ir::verify::verify(&g).unwrap();
        (g, vec![random_tensor(&mut rng, DType::F32, &shape, -1.0, 1.0)])
    }
}

fn window_pool_problem() -> impl Strategy<Value = WindowPoolProblem> {
    (
        (1usize..=2, 1usize..=4),
        (1usize..=15, 1usize..=15),
        (1usize..=4, 1usize..=4),
        (1usize..=3, 1usize..=3),
        prop_oneof![5 => Just([1, 1]), 1 => Just([2, 1])],
        proptest::collection::vec(0usize..=2, 4),
        0usize..3,
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|((batch, blocks), (h, w), (kh, kw), (sy, sx), dilations, pads, kind, relu, seed)| {
            let kind = match kind {
                0 => cnnc_ir::PoolKind::Max,
                1 => cnnc_ir::PoolKind::Avg { count_include_pad: false },
                _ => cnnc_ir::PoolKind::Avg { count_include_pad: true },
            };
            let mut p = WindowPoolProblem {
                batch,
                channels: 8 * blocks,
                input: [h, w],
                kernel: [kh, kw],
                strides: [sy, sx],
                dilations,
                pads_begin: [pads[0], pads[1]],
                pads_end: [pads[2], pads[3]],
                kind,
                relu,
                seed,
            };
            for a in 0..2 {
                let window = (p.kernel[a] - 1) * p.dilations[a] + 1;
                let padded = p.input[a] + p.pads_begin[a] + p.pads_end[a];
                if padded < window {
                    p.input[a] += window - padded;
                }
            }
            p
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), ..ProptestConfig::default() })]

    /// Windowed pooling over blocked values (portable code): the host and x86-64-v2.
    #[test]
    fn window_pooling_matches_interpreter(p in window_pool_problem()) {
        let (g, inputs) = p.graph();
        let node = g.nodes.iter().find(|n| matches!(n.op, Op::Pool(_))).unwrap();
        prop_assert!(cnnc_codegen::kernels::pool_blocked::supports_pool(&g, node));
        let want = interp::run(&g, &inputs).unwrap();
        let got = host_jit(&g, &inputs).map_err(TestCaseError::fail)?;
        check_all(&got, &want).map_err(TestCaseError::fail)?;
        let portable = TargetSpec::parse(None, Some("x86-64-v2")).unwrap();
        let got = common::run_shared_library("pool_blocked", &g, &portable, 2, &inputs).map_err(TestCaseError::fail)?;
        check_all(&got, &want).map_err(TestCaseError::fail)?;
    }
}
