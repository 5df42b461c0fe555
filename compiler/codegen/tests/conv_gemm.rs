//! Convolutions run as GEMM on the microkernel (`kernels::conv_gemm`) against the
//! reference interpreter: random problems (`ConvProblem`) over channels, spatial
//! rank and extents, kernel sizes, strides, dilations, pads, groups, blocking and
//! fused epilogues; on the host's microkernel (AVX2 here) through the JIT, on the
//! portable kernel (x86-64-v2) and with a real thread pool through a linked `.so`.

mod common;


use cnnc_codegen::{JitModel, TargetSpec, link_shared};
use cnnc_ir::{
    BinaryFn, ConvGeometry, DType, EpilogueStep, Graph, Op, Tensor, TensorData, TensorType, UnaryFn, interp,
};
use common::{Rng, cases, check_close, random_tensor, run_loaded};
use proptest::prelude::*;

/// An epilogue step kind and, for binary steps, the shape of its operand.
#[derive(Clone, Copy, Debug)]
enum Step {
    Relu,
    Swish,
    Clip,
    LeakyRelu,
    /// Residual add: an operand of the output's shape.
    Residual,
    /// Per-channel scale [1, M, 1, ...].
    ChannelScale,
    /// Squeeze-and-excite: per image and channel [N, M, 1, ...].
    ImageChannelScale,
    /// Broadcast along the first spatial axis only [1, 1, H, 1, ...]: not addressable
    /// per tile, applied after the convolution.
    SpatialBroadcast,
}

#[derive(Clone, Debug)]
struct ConvProblem {
    batch: usize,
    groups: usize,
    in_per_group: usize,
    out_per_group: usize,
    input: Vec<usize>,
    kernel: Vec<usize>,
    strides: Vec<usize>,
    dilations: Vec<usize>,
    pads_begin: Vec<usize>,
    pads_end: Vec<usize>,
    bias: bool,
    steps: Vec<Step>,
    /// Schedule tiles (kc, nc); None leaves the code generator's defaults.
    blocking: Option<(usize, usize)>,
    /// The schedule's kernel family: "gemm" or "winograd".
    family: &'static str,
    /// Weights (and bias) passed as graph inputs, as in training graphs: packed at run
    /// time instead of compile time.
    runtime_weights: bool,
    seed: u64,
}

impl ConvProblem {
    fn output(&self) -> Vec<usize> {
        (0..self.input.len())
            .map(|a| {
                let span = self.input[a] + self.pads_begin[a] + self.pads_end[a];
                let window = (self.kernel[a] - 1) * self.dilations[a] + 1;
                (span - window) / self.strides[a] + 1
            })
            .collect()
    }

    fn out_shape(&self) -> Vec<usize> {
        let mut s = vec![self.batch, self.groups * self.out_per_group];
        s.extend(self.output());
        s
    }

    /// The graph (conv with the epilogue fused into the node) and its inputs.
    fn graph(&self) -> (Graph, Vec<Tensor>) {
        let mut rng = Rng(self.seed | 1);
        let mut g = Graph::new("conv_gemm");
        let mut x_shape = vec![self.batch, self.groups * self.in_per_group];
        x_shape.extend(&self.input);
        let x = g.add_input(TensorType::f32(x_shape.clone()), "x");
        let mut inputs = vec![random_tensor(&mut rng, DType::F32, &x_shape, -1.0, 1.0)];
        let mut w_shape = vec![self.groups * self.out_per_group, self.in_per_group];
        w_shape.extend(&self.kernel);
        let w_value = random_tensor(&mut rng, DType::F32, &w_shape, -0.5, 0.5);
        let w = if self.runtime_weights {
            inputs.push(w_value);
            g.add_input(TensorType::f32(w_shape.clone()), "w")
        } else {
            g.add_constant("w", w_value)
        };
        let m = self.groups * self.out_per_group;
        let mut conv_inputs = vec![x, w];
        if self.bias {
            let b_value = random_tensor(&mut rng, DType::F32, &[m], -0.5, 0.5);
            conv_inputs.push(if self.runtime_weights {
                inputs.push(b_value);
                g.add_input(TensorType::f32([m]), "b")
            } else {
                g.add_constant("b", b_value)
            });
        }
        let geometry = ConvGeometry {
            strides: self.strides.clone(),
            dilations: self.dilations.clone(),
            pads_begin: self.pads_begin.clone(),
            pads_end: self.pads_end.clone(),
            groups: self.groups,
        };
        let y = g.push1("conv", Op::Conv(geometry), &conv_inputs).unwrap();
        let out_shape = self.out_shape();
        let rank = out_shape.len();
        let mut epilogue = Vec::new();
        let mut operands = Vec::new();
        for (i, step) in self.steps.iter().enumerate() {
            let operand_shape = match step {
                Step::Relu => {
                    epilogue.push(EpilogueStep::Unary(UnaryFn::Relu));
                    continue;
                }
                Step::Swish => {
                    epilogue.push(EpilogueStep::Unary(UnaryFn::Swish { alpha: 1.0 }));
                    continue;
                }
                Step::Clip => {
                    epilogue.push(EpilogueStep::Unary(UnaryFn::Clip { min: -0.3, max: 0.6 }));
                    continue;
                }
                Step::LeakyRelu => {
                    epilogue.push(EpilogueStep::Unary(UnaryFn::LeakyRelu { alpha: 0.1 }));
                    continue;
                }
                Step::Residual => out_shape.clone(),
                Step::ChannelScale => {
                    let mut s = vec![1; rank];
                    s[1] = m;
                    s
                }
                Step::ImageChannelScale => {
                    let mut s = vec![1; rank];
                    s[0] = self.batch;
                    s[1] = m;
                    s
                }
                Step::SpatialBroadcast => {
                    let mut s = vec![1; rank];
                    s[2] = out_shape[2];
                    s
                }
            };
            let func = if matches!(step, Step::Residual | Step::SpatialBroadcast) {
                BinaryFn::Add
            } else {
                BinaryFn::Mul
            };
            let v = g.add_input(TensorType::f32(operand_shape.clone()), format!("operand{i}"));
            inputs.push(random_tensor(&mut rng, DType::F32, &operand_shape, -1.0, 1.0));
            operands.push(v);
            epilogue.push(EpilogueStep::Binary {
                func,
                operand: conv_inputs.len() + operands.len() - 1,
            });
        }
        let node = g.nodes.last_mut().unwrap();
        node.inputs.extend(&operands);
        node.epilogue = epilogue;
        node.schedule.kernel = self.family.into();
        if let Some((kc, nc)) = self.blocking {
            node.schedule.tiles = vec![("kc".into(), kc), ("nc".into(), nc)];
        }
        g.outputs.push(y);
        cnnc_ir::verify::verify(&g).unwrap();
        (g, inputs)
    }
}

fn problem() -> impl Strategy<Value = ConvProblem> {
    let axis = (1usize..=9, 1usize..=5, 1usize..=3, 1usize..=2, 0usize..=2, 0usize..=2);
    (
        1usize..=3,
        (1usize..=2, 1usize..=3, 1usize..=8, 1usize..=20),
        proptest::collection::vec(axis, 3),
        any::<bool>(),
        proptest::collection::vec(0usize..8, 0..=3),
        proptest::option::of((1usize..=64, 1usize..=96)),
        any::<u64>(),
    )
        .prop_map(
            |(rank, (batch, groups, in_per_group, out_per_group), axes, bias, steps, blocking, seed)| {
                let axes = &axes[..rank];
                // Higher ranks get smaller extents so a case stays quick.
                let cap = [12, 9, 6][rank - 1];
                let mut p = ConvProblem {
                    batch,
                    groups,
                    in_per_group,
                    out_per_group,
                    input: vec![],
                    kernel: axes.iter().map(|a| a.1).collect(),
                    strides: axes.iter().map(|a| a.2).collect(),
                    dilations: axes.iter().map(|a| a.3).collect(),
                    pads_begin: axes.iter().map(|a| a.4).collect(),
                    pads_end: axes.iter().map(|a| a.5).collect(),
                    bias,
                    steps: steps
                        .iter()
                        .map(|&s| {
                            [
                                Step::Relu,
                                Step::Swish,
                                Step::Clip,
                                Step::Residual,
                                Step::ChannelScale,
                                Step::ImageChannelScale,
                                Step::SpatialBroadcast,
                                Step::LeakyRelu,
                            ][s]
                        })
                        .collect(),
                    blocking,
                    family: "gemm",
                    runtime_weights: false,
                    seed,
                };
                // The input is at least as large as the dilated window (minus padding).
                p.input = (0..rank)
                    .map(|a| {
                        let window = (p.kernel[a] - 1) * p.dilations[a] + 1;
                        let needed = window.saturating_sub(p.pads_begin[a] + p.pads_end[a]).max(1);
                        axes[a].0.min(cap).max(needed)
                    })
                    .collect();
                p
            },
        )
}

/// 3x3 stride-1 convolutions for Winograd F(2x2, 3x3): odd and even extents (partial
/// 2x2 tiles), pads 0..2 on each side, tile blocks from 16 tiles up; rows of up to 21
/// columns (whole octets and a tail of the deinterleaving window copy).
fn winograd_problem() -> impl Strategy<Value = ConvProblem> {
    (
        (1usize..=2, 1usize..=20, 1usize..=24),
        (1usize..=13, 1usize..=21),
        proptest::collection::vec(0usize..=2, 4),
        any::<bool>(),
        proptest::collection::vec(0usize..7, 0..=3),
        proptest::option::of(1usize..=48),
        any::<u64>(),
    )
        .prop_map(|((batch, c, m), (h, w), pads, bias, steps, block, seed)| {
            let steps = steps
                .iter()
                .map(|&s| {
                    [
                        Step::Relu,
                        Step::Swish,
                        Step::Clip,
                        Step::Residual,
                        Step::ChannelScale,
                        Step::ImageChannelScale,
                        Step::SpatialBroadcast,
                    ][s]
                })
                .collect();
            // The padded input must hold the 3x3 window.
            let h = h.max(3usize.saturating_sub(pads[0] + pads[2]).max(1));
            let w = w.max(3usize.saturating_sub(pads[1] + pads[3]).max(1));
            ConvProblem {
                batch,
                groups: 1,
                in_per_group: c,
                out_per_group: m,
                input: vec![h, w],
                kernel: vec![3, 3],
                strides: vec![1, 1],
                dilations: vec![1, 1],
                pads_begin: vec![pads[0], pads[1]],
                pads_end: vec![pads[2], pads[3]],
                bias,
                steps,
                blocking: block.map(|tiles| (1, tiles)),
                family: "winograd",
                runtime_weights: false,
                seed,
            }
        })
}

/// The reference: the interpreter on the same graph.
fn reference(g: &Graph, inputs: &[Tensor]) -> Vec<Tensor> {
    interp::run(g, inputs).unwrap()
}

fn check_all(got: &[Tensor], want: &[Tensor]) -> Result<(), String> {
    for (k, (a, b)) in got.iter().zip(want).enumerate() {
        check_close(a, b).map_err(|e| format!("output {k}: {e}"))?;
    }
    Ok(())
}

/// Compiles `g` for `target` into a `.so`, runs it with a session of `threads`.
fn run_shared(g: &Graph, target: &TargetSpec, threads: usize, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
    let (object, info) = cnnc_codegen::object::compile_object_with_info(g, target).map_err(|e| e.to_string())?;
    if info.gemm_convs == 0 {
        return Err("the convolution did not run as GEMM".into());
    }
    let path = common::temp_so("conv-gemm");
    link_shared(&object, &path, target).map_err(|e| e.to_string())?;
    let result = run_loaded(&path, g, threads, inputs);
    let _ = std::fs::remove_file(&path);
    result
}

fn host_jit(g: &Graph, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
    let model = JitModel::compile(g).map_err(|e| e.to_string())?;
    if model.info().gemm_convs != 1 {
        return Err(format!(
            "{} convolutions ran as GEMM, expected 1",
            model.info().gemm_convs
        ));
    }
    let wants_winograd = g.nodes.iter().any(|n| n.schedule.kernel == "winograd");
    if (model.info().winograd_convs == 1) != wants_winograd {
        return Err(format!(
            "winograd convolutions: {}, expected {}",
            model.info().winograd_convs,
            wants_winograd as u8
        ));
    }
    model.run(inputs).map_err(|e| e.to_string())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), ..ProptestConfig::default() })]

    /// The host's microkernel (AVX2+FMA 6x16 on this machine), one thread.
    #[test]
    fn host_kernel_matches_interpreter(p in problem()) {
        let (g, inputs) = p.graph();
        let want = reference(&g, &inputs);
        let got = host_jit(&g, &inputs).map_err(TestCaseError::fail)?;
        check_all(&got, &want).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(16), ..ProptestConfig::default() })]

    /// The portable f32x4 kernel (x86-64-v2: 4x8 tiles), through a `.so` run by a
    /// two-thread session.
    #[test]
    fn portable_kernel_with_threads_matches_interpreter(p in problem()) {
        // The whole-output epilogue's map engine marks vector loads aligned at offsets
        // that are not (a known problem of map.rs), which faults on SSE-only targets.
        prop_assume!(!p.steps.iter().any(|s| matches!(s, Step::SpatialBroadcast)));
        let (g, inputs) = p.graph();
        let want = reference(&g, &inputs);
        let target = TargetSpec::parse(None, Some("x86-64-v2")).unwrap();
        let got = run_shared(&g, &target, 2, &inputs).map_err(TestCaseError::fail)?;
        check_all(&got, &want).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(48), ..ProptestConfig::default() })]

    /// Winograd F(2x2, 3x3) on the host's microkernel.
    #[test]
    fn winograd_matches_interpreter(p in winograd_problem()) {
        let (g, inputs) = p.graph();
        let want = reference(&g, &inputs);
        let got = host_jit(&g, &inputs).map_err(TestCaseError::fail)?;
        check_all(&got, &want).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(12), ..ProptestConfig::default() })]

    /// Winograd on the portable kernel with two threads.
    #[test]
    fn winograd_portable_with_threads_matches_interpreter(p in winograd_problem()) {
        prop_assume!(!p.steps.iter().any(|s| matches!(s, Step::SpatialBroadcast)));
        let (g, inputs) = p.graph();
        let want = reference(&g, &inputs);
        let target = TargetSpec::parse(None, Some("x86-64-v2")).unwrap();
        let got = run_shared(&g, &target, 2, &inputs).map_err(TestCaseError::fail)?;
        check_all(&got, &want).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(32), ..ProptestConfig::default() })]

    /// Winograd with weights known only at run time (training graphs): the node
    /// transforms them before its tasks; on the host's microkernel, and on the portable
    /// kernel with two threads.
    #[test]
    fn winograd_runtime_weights_match_interpreter(mut p in winograd_problem(), portable in any::<bool>()) {
        p.runtime_weights = true;
        let (g, inputs) = p.graph();
        let want = reference(&g, &inputs);
        let got = if portable {
            prop_assume!(!p.steps.iter().any(|s| matches!(s, Step::SpatialBroadcast)));
            let target = TargetSpec::parse(None, Some("x86-64-v2")).unwrap();
            run_shared(&g, &target, 2, &inputs)
        } else {
            host_jit(&g, &inputs)
        };
        check_all(&got.map_err(TestCaseError::fail)?, &want).map_err(TestCaseError::fail)?;
    }
}

/// A convolution large enough to split into k-blocks, p-blocks and oc-panel groups:
/// every thread count gives bitwise the same result (each output element sums its
/// reduction blocks in the same order whoever computes it), close to the reference;
/// with constant weights and with weights packed at run time.
#[test]
fn thread_counts_agree_bitwise() {
    for runtime_weights in [false, true] {
        thread_counts_agree_bitwise_with(runtime_weights);
    }
}

fn thread_counts_agree_bitwise_with(runtime_weights: bool) {
    let p = ConvProblem {
        batch: 1,
        groups: 1,
        in_per_group: 64,
        out_per_group: 40,
        input: vec![30, 30],
        kernel: vec![3, 3],
        strides: vec![1, 1],
        dilations: vec![1, 1],
        pads_begin: vec![1, 1],
        pads_end: vec![1, 1],
        bias: true,
        steps: vec![Step::Residual, Step::Relu],
        blocking: None,
        family: "gemm",
        runtime_weights,
        seed: 7,
    };
    let (g, inputs) = p.graph();
    let want = reference(&g, &inputs);
    let target = TargetSpec::host();
    let (object, info) = cnnc_codegen::object::compile_object_with_info(&g, &target).unwrap();
    assert_eq!(info.gemm_convs, 1);
    let path = common::temp_so("conv-gemm");
    link_shared(&object, &path, &target).unwrap();
    let runs: Vec<Vec<Tensor>> = [1, 2, 3]
        .iter()
        .map(|&t| run_loaded(&path, &g, t, &inputs).unwrap())
        .collect();
    let _ = std::fs::remove_file(&path);
    check_all(&runs[0], &want).unwrap();
    for (t, run) in runs.iter().enumerate().skip(1) {
        assert!(
            run[0].data == runs[0][0].data,
            "{} threads differ from one thread",
            t + 1
        );
    }
}

/// Grouped convolutions split per group; the portable kernel's 4x8 tile and the
/// host's tile give results within tolerance on the same problem.
#[test]
fn grouped_and_strided_on_both_kernels() {
    let p = ConvProblem {
        batch: 2,
        groups: 2,
        in_per_group: 5,
        out_per_group: 13,
        input: vec![11, 9],
        kernel: vec![3, 2],
        strides: vec![2, 1],
        dilations: vec![1, 2],
        pads_begin: vec![1, 0],
        pads_end: vec![2, 1],
        bias: true,
        steps: vec![Step::ImageChannelScale, Step::Swish],
        blocking: Some((7, 16)),
        family: "gemm",
        runtime_weights: false,
        seed: 11,
    };
    let (g, inputs) = p.graph();
    let want = reference(&g, &inputs);
    check_all(&host_jit(&g, &inputs).unwrap(), &want).unwrap();
    let portable = TargetSpec::parse(None, Some("x86-64-v2")).unwrap();
    check_all(&run_shared(&g, &portable, 1, &inputs).unwrap(), &want).unwrap();
}

/// Weights that are a graph input are packed at run time and run as GEMM; a depthwise
/// convolution stays on the direct kernel.
#[test]
fn graph_input_weights_run_as_gemm_and_depthwise_stays_direct() {
    let mut g = Graph::new("direct");
    let x = g.add_input(TensorType::f32([1, 4, 6, 6]), "x");
    let w = g.add_input(TensorType::f32([8, 4, 3, 3]), "w");
    let geometry = |groups| ConvGeometry {
        strides: vec![1, 1],
        dilations: vec![1, 1],
        pads_begin: vec![1, 1],
        pads_end: vec![1, 1],
        groups,
    };
    let y = g.push1("conv", Op::Conv(geometry(1)), &[x, w]).unwrap();
    let mut rng = Rng(3);
    let dw = g.add_constant("dw", random_tensor(&mut rng, DType::F32, &[8, 1, 3, 3], -1.0, 1.0));
    let z = g.push1("depthwise", Op::Conv(geometry(8)), &[y, dw]).unwrap();
    g.outputs.push(z);
    let model = JitModel::compile(&g).unwrap();
    assert_eq!(model.info().gemm_convs, 1);
    let inputs = [
        random_tensor(&mut rng, DType::F32, &[1, 4, 6, 6], -1.0, 1.0),
        random_tensor(&mut rng, DType::F32, &[8, 4, 3, 3], -1.0, 1.0),
    ];
    check_all(&model.run(&inputs).unwrap(), &reference(&g, &inputs)).unwrap();
}

/// GEMM tasks run with denormals flushed (a denormal input reads as zero) and leave
/// the caller's MXCSR as they found it.
#[cfg(target_arch = "x86_64")]
#[test]
#[allow(deprecated)]
fn denormals_are_flushed_in_gemm_tasks_and_mxcsr_restored() {
    use std::arch::x86_64::_mm_getcsr;
    let mut g = Graph::new("denormal");
    let x = g.add_input(TensorType::f32([1, 1, 4, 4]), "x");
    let w = g.add_constant("w", Tensor::f32([1, 1, 1, 1], vec![1.0]));
    let y = g
        .push1(
            "conv",
            Op::Conv(ConvGeometry {
                strides: vec![1, 1],
                dilations: vec![1, 1],
                pads_begin: vec![0, 0],
                pads_end: vec![0, 0],
                groups: 1,
            }),
            &[x, w],
        )
        .unwrap();
    g.outputs.push(y);
    let model = JitModel::compile(&g).unwrap();
    assert_eq!(model.info().gemm_convs, 1);
    let denormal = f32::from_bits(0x0000_1000);
    assert!(denormal != 0.0 && !denormal.is_normal());
    // SAFETY: reading MXCSR has no side effects.
    let before = unsafe { _mm_getcsr() };
    let out = model.run(&[Tensor::f32([1, 1, 4, 4], vec![denormal; 16])]).unwrap();
    let after = unsafe { _mm_getcsr() };
    assert_eq!(before, after, "MXCSR restored");
    assert_eq!(before & 0x8040, 0, "the test thread runs without FTZ/DAZ");
    assert_eq!(
        out[0].data,
        TensorData::F32(vec![0.0; 16]),
        "denormal inputs read as zero inside the call"
    );
}

/// Large depthwise convolutions and pools are split into channel chunks run as tasks;
/// the chunks (a smaller last one included) and their epilogue operands (cut per
/// channel and image, or shared) give the interpreter's result on one and more threads.
#[test]
fn channel_split_nodes_match_interpreter() {
    use cnnc_ir::{PoolAttrs, PoolKind};
    let mut rng = Rng(17);
    let (n, c, hw) = (2, 70, 40);
    let mut g = Graph::new("split");
    let x = g.add_input(TensorType::f32([n, c, hw, hw]), "x");
    let residual = g.add_input(TensorType::f32([n, c, hw, hw]), "residual");
    let scale = g.add_input(TensorType::f32([1, c, 1, 1]), "scale");
    let rows = g.add_input(TensorType::f32([1, 1, hw, 1]), "rows");
    let w = g.add_constant("w", random_tensor(&mut rng, DType::F32, &[c, 1, 3, 3], -0.5, 0.5));
    let bias = g.add_constant("b", random_tensor(&mut rng, DType::F32, &[c], -0.5, 0.5));
    let geometry = ConvGeometry {
        strides: vec![1, 1],
        dilations: vec![1, 1],
        pads_begin: vec![1, 1],
        pads_end: vec![1, 1],
        groups: c,
    };
    let y = g.push1("depthwise", Op::Conv(geometry), &[x, w, bias]).unwrap();
    let node = g.nodes.last_mut().unwrap();
    node.inputs.extend([residual, scale, rows]);
    node.epilogue = vec![
        EpilogueStep::Binary {
            func: BinaryFn::Add,
            operand: 3,
        },
        EpilogueStep::Binary {
            func: BinaryFn::Mul,
            operand: 4,
        },
        EpilogueStep::Binary {
            func: BinaryFn::Sub,
            operand: 5,
        },
        EpilogueStep::Unary(UnaryFn::Relu),
    ];
    let pool = PoolAttrs {
        kind: PoolKind::Max,
        kernel: vec![3, 3],
        strides: vec![2, 2],
        dilations: vec![1, 1],
        pads_begin: vec![1, 1],
        pads_end: vec![1, 1],
    };
    let p = g
        .push_typed("pool", Op::Pool(pool), &[y], TensorType::f32([n, c, hw / 2, hw / 2]))
        .unwrap();
    g.outputs.extend([y, p]);
    cnnc_ir::verify::verify(&g).unwrap();
    let inputs = vec![
        random_tensor(&mut rng, DType::F32, &[n, c, hw, hw], -1.0, 1.0),
        random_tensor(&mut rng, DType::F32, &[n, c, hw, hw], -1.0, 1.0),
        random_tensor(&mut rng, DType::F32, &[1, c, 1, 1], -1.0, 1.0),
        random_tensor(&mut rng, DType::F32, &[1, 1, hw, 1], -1.0, 1.0),
    ];
    let want = reference(&g, &inputs);
    let model = JitModel::compile(&g).unwrap();
    assert_eq!(model.info().split_nodes, 2, "both nodes split");
    check_all(&model.run(&inputs).unwrap(), &want).unwrap();

    let target = TargetSpec::host();
    let object = cnnc_codegen::compile_object(&g, &target).unwrap();
    let path = common::temp_so("conv-gemm");
    link_shared(&object, &path, &target).unwrap();
    for threads in [1, 2, 3] {
        let got = run_loaded(&path, &g, threads, &inputs).unwrap();
        check_all(&got, &want).unwrap_or_else(|e| panic!("{threads} threads: {e}"));
    }
    let _ = std::fs::remove_file(&path);
}

/// `problem()` with its weights and bias as graph inputs; ungrouped convolutions are
/// left unscheduled half the time (they must take the GEMM path on their own).
fn runtime_weight_problem() -> impl Strategy<Value = ConvProblem> {
    problem().prop_map(|mut p| {
        p.runtime_weights = true;
        if p.groups == 1 && p.seed % 2 == 0 {
            p.family = "";
        }
        p
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(48), ..ProptestConfig::default() })]

    /// Weights known only at run time, packed by the node before its tasks, on the
    /// host's microkernel.
    #[test]
    fn runtime_weights_match_interpreter(p in runtime_weight_problem()) {
        let (g, inputs) = p.graph();
        let want = reference(&g, &inputs);
        let got = host_jit(&g, &inputs).map_err(TestCaseError::fail)?;
        check_all(&got, &want).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(8), ..ProptestConfig::default() })]

    /// Run-time weights on the portable kernel with two threads.
    #[test]
    fn runtime_weights_portable_with_threads_match_interpreter(p in runtime_weight_problem()) {
        prop_assume!(!p.steps.iter().any(|s| matches!(s, Step::SpatialBroadcast)));
        let (g, inputs) = p.graph();
        let want = reference(&g, &inputs);
        let target = TargetSpec::parse(None, Some("x86-64-v2")).unwrap();
        let got = run_shared(&g, &target, 2, &inputs).map_err(TestCaseError::fail)?;
        check_all(&got, &want).map_err(TestCaseError::fail)?;
    }
}

/// 1x1 convolutions without stride or padding (one flat axis of positions, packed
/// row by row straight from the input): position counts on and off the panel width,
/// blocks from one panel up, constant or run-time weights.
fn pointwise_problem() -> impl Strategy<Value = ConvProblem> {
    (
        problem(),
        (1usize..=40, 1usize..=40, 1usize..=40, 1usize..=3),
        any::<bool>(),
    )
        .prop_map(|(mut p, (c, m, h, w), runtime_weights)| {
            // Groups (1 or 2, from `problem`) move each group's rows read in place.
            p.in_per_group = c;
            p.out_per_group = m;
            p.input = vec![h, w];
            p.kernel = vec![1, 1];
            p.strides = vec![1, 1];
            p.dilations = vec![1, 1];
            p.pads_begin = vec![0, 0];
            p.pads_end = vec![0, 0];
            p.runtime_weights = runtime_weights;
            p
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(48), ..ProptestConfig::default() })]

    /// Pointwise convolutions on the host's microkernel.
    #[test]
    fn pointwise_matches_interpreter(p in pointwise_problem()) {
        let (g, inputs) = p.graph();
        let want = reference(&g, &inputs);
        let got = host_jit(&g, &inputs).map_err(TestCaseError::fail)?;
        check_all(&got, &want).map_err(TestCaseError::fail)?;
    }
}

/// 1x1 convolutions with enough channels x depth that the input is packed rather than
/// read in place (`IN_PLACE_B_MAX_MACS_PER_POSITION`) on the AVX2 kernel with the
/// epilogue in its store, few positions to stay quick.
fn wide_pointwise_problem() -> impl Strategy<Value = ConvProblem> {
    (pointwise_problem(), (128usize..=160, 384usize..=420, 2usize..=6)).prop_map(|(mut p, (c, m, h))| {
        p.groups = 1;
        p.in_per_group = c;
        p.out_per_group = m;
        // 16 to 48 positions, whole and ragged panels: channels stay the tile's rows.
        p.input = vec![h, 8];
        p
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(12), ..ProptestConfig::default() })]

    /// Packed pointwise convolutions on the host's microkernel.
    #[test]
    fn wide_pointwise_matches_interpreter(p in wide_pointwise_problem()) {
        let (g, inputs) = p.graph();
        let want = reference(&g, &inputs);
        let got = host_jit(&g, &inputs).map_err(TestCaseError::fail)?;
        check_all(&got, &want).map_err(TestCaseError::fail)?;
    }
}

/// Shallow 2-D convolutions (a network's first layer: few channels, depth <= 160, up to
/// a 7x7 stem over 3 channels) with rows wide enough for whole panels inside the input,
/// which take the unrolled interior packing; edge panels, blocks that split the
/// reduction (`blocking`) and panels across rows take the general one.
fn shallow_problem() -> impl Strategy<Value = ConvProblem> {
    (
        problem(),
        (1usize..=6, 1usize..=7, 1usize..=7, 1usize..=2, 1usize..=2, 0usize..=3),
        (3usize..=12, 16usize..=48),
    )
        .prop_map(|(mut p, (c, kh, kw, stride, dilation, pad), (h, w))| {
            p.groups = 1;
            p.in_per_group = c;
            p.kernel = vec![kh, kw];
            p.strides = vec![stride, stride];
            p.dilations = vec![dilation, dilation];
            p.pads_begin = vec![pad, pad];
            p.pads_end = vec![pad, pad];
            p.input = vec![h.max((kh - 1) * dilation + 1), w];
            p
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(48), ..ProptestConfig::default() })]

    /// Shallow convolutions on the host's microkernel.
    #[test]
    fn shallow_convs_match_interpreter(p in shallow_problem()) {
        let (g, inputs) = p.graph();
        let want = reference(&g, &inputs);
        let got = host_jit(&g, &inputs).map_err(TestCaseError::fail)?;
        check_all(&got, &want).map_err(TestCaseError::fail)?;
    }

    /// Shallow convolutions on the portable kernel (panels of 8 positions), with threads.
    #[test]
    fn shallow_convs_portable_with_threads_match_interpreter(p in shallow_problem()) {
        // See `portable_kernel_with_threads_matches_interpreter`.
        prop_assume!(!p.steps.iter().any(|s| matches!(s, Step::SpatialBroadcast)));
        let (g, inputs) = p.graph();
        let want = reference(&g, &inputs);
        let target = TargetSpec::parse(None, Some("x86-64-v2")).unwrap();
        let got = run_shared(&g, &target, 2, &inputs).map_err(TestCaseError::fail)?;
        check_all(&got, &want).map_err(TestCaseError::fail)?;
    }
}

/// Weight-gradient convolutions as training graphs make them: the activations as run-time
/// weights, a kernel nearly as large as the input (hundreds of taps), a few output
/// positions (the original kernel's taps), batch and channel counts on and off the
/// panel widths.
fn weight_gradient_problem() -> impl Strategy<Value = ConvProblem> {
    (
        (1usize..=4, 1usize..=9, 1usize..=40),
        (4usize..=14, 4usize..=14),
        (1usize..=3, 0usize..=1),
        any::<u64>(),
    )
        .prop_map(
            |((batch, in_per_group, out_per_group), (h, w), (k, pad), seed)| ConvProblem {
                batch,
                groups: 1,
                in_per_group,
                out_per_group,
                input: vec![h, w],
                kernel: vec![h + 2 * pad - k + 1, w + 2 * pad - k + 1],
                strides: vec![1, 1],
                dilations: vec![1, 1],
                pads_begin: vec![pad, pad],
                pads_end: vec![pad, pad],
                bias: false,
                steps: vec![],
                blocking: None,
                family: "gemm",
                runtime_weights: true,
                seed,
            },
        )
}

/// The channels-last weight-gradient correlations of training graphs
/// (`train/rules_window.rs`): x `[1, N, H, W, C]`, dy as the weight `[M, N, OH, OW, 1]`
/// (dilated by the forward stride), output `[1, M, k, k, C]` with the input channels
/// carried through as positions (`gemm::pack_carried` when C is a multiple of the panel
/// width and the block holds every position); C on and off the panel widths (8 and 16),
/// kc from a part of one tap's images to several taps.
fn carried_weight_gradient_problem() -> impl Strategy<Value = ConvProblem> {
    (
        (1usize..=5, 1usize..=14, prop_oneof![Just(8usize), Just(16), Just(32), 1usize..=20]),
        (3usize..=9, 3usize..=9),
        (1usize..=3, 0usize..=1, 1usize..=2),
        (1usize..=40, any::<bool>()),
        any::<u64>(),
    )
        .prop_map(|((images, m, c), (h, w), (k, pad, stride), (kc, whole_block), seed)| {
            // dy of a forward convolution of x by a k x k filter at `stride`.
            let out = |extent: usize| (extent + 2 * pad).saturating_sub(k) / stride + 1;
            let (oh, ow) = (out(h), out(w));
            let positions = k * k * c;
            ConvProblem {
                batch: 1,
                groups: 1,
                in_per_group: images,
                out_per_group: m,
                input: vec![h, w, c],
                kernel: vec![oh, ow, 1],
                strides: vec![1, 1, 1],
                dilations: vec![stride, stride, 1],
                pads_begin: vec![pad, pad, 0],
                pads_end: vec![pad, pad, 0],
                bias: false,
                steps: vec![],
                blocking: Some((kc, if whole_block { positions } else { 16 })),
                family: "gemm",
                runtime_weights: true,
                seed,
            }
        })
        .prop_filter("the dilated dy must fit the padded input", |p| {
            p.input.iter().zip(&p.kernel).zip(&p.dilations).zip(&p.pads_begin).all(|(((&i, &k), &d), &pad)| {
                (k - 1) * d + 1 <= i + 2 * pad
            })
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(48), ..ProptestConfig::default() })]

    /// Channels-last weight gradients on the host's microkernel, and on the portable
    /// kernel with two threads.
    #[test]
    fn carried_weight_gradients_match_interpreter(p in carried_weight_gradient_problem(), portable in any::<bool>()) {
        let (g, inputs) = p.graph();
        let want = reference(&g, &inputs);
        let got = if portable {
            let target = TargetSpec::parse(None, Some("x86-64-v2")).unwrap();
            run_shared(&g, &target, 2, &inputs)
        } else {
            host_jit(&g, &inputs)
        };
        check_all(&got.map_err(TestCaseError::fail)?, &want).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(32), ..ProptestConfig::default() })]

    /// Weight-gradient shapes on the host's microkernel.
    #[test]
    fn weight_gradient_shapes_match_interpreter(p in weight_gradient_problem()) {
        let (g, inputs) = p.graph();
        let want = reference(&g, &inputs);
        let got = host_jit(&g, &inputs).map_err(TestCaseError::fail)?;
        check_all(&got, &want).map_err(TestCaseError::fail)?;
    }

    /// Weight-gradient shapes on the portable kernel (4x8 tiles) with two threads.
    #[test]
    fn weight_gradient_shapes_portable_match_interpreter(p in weight_gradient_problem()) {
        let (g, inputs) = p.graph();
        let want = reference(&g, &inputs);
        let target = TargetSpec::parse(None, Some("x86-64-v2")).unwrap();
        let got = run_shared(&g, &target, 2, &inputs).map_err(TestCaseError::fail)?;
        check_all(&got, &want).map_err(TestCaseError::fail)?;
    }
}

/// Channels-last weight gradients of stride-1 convolutions on the no-im2col path
/// (`gemm::weight_grad_rows`, forced by the schedule): C a multiple of 16, dy's channels
/// on and off the 6-row panels, dy widths on and off multiples of 4, pads before and
/// after, filters 1x1 to 4x4.
fn weight_grad_rows_problem() -> impl Strategy<Value = ConvProblem> {
    (
        (1usize..=5, 1usize..=20, prop_oneof![Just(16usize), Just(32), Just(48)]),
        (1usize..=11, 1usize..=11),
        (1usize..=4, 1usize..=4, 0usize..=2, 0usize..=2, 0usize..=2, 0usize..=2),
        any::<u64>(),
    )
        .prop_filter_map("dy must have at least one pixel", |((images, m, c), (h, w), (fh, fw, pt, pb, pl, pr), seed)| {
            let dy_h = (h + pt + pb).checked_sub(fh)? + 1;
            let dy_w = (w + pl + pr).checked_sub(fw)? + 1;
            Some(ConvProblem {
                batch: 1,
                groups: 1,
                in_per_group: images,
                out_per_group: m,
                input: vec![h, w, c],
                kernel: vec![dy_h, dy_w, 1],
                strides: vec![1, 1, 1],
                dilations: vec![1, 1, 1],
                pads_begin: vec![pt, pl, 0],
                pads_end: vec![pb, pr, 0],
                bias: false,
                steps: vec![],
                blocking: None,
                family: "weight_grad_rows",
                runtime_weights: true,
                seed,
            })
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(48), ..ProptestConfig::default() })]

    /// On the host's microkernel, one thread (JIT) or through a `.so` with 1-3 threads
    /// (tasks take shares of the images; the node sums their accumulators).
    #[test]
    fn weight_grad_rows_match_interpreter(p in weight_grad_rows_problem(), threads in 0usize..=3) {
        let (g, inputs) = p.graph();
        let node = g.nodes.iter().find(|n| matches!(n.op, Op::Conv(_))).unwrap();
        let plan = cnnc_codegen::kernels::conv_gemm::plan(&g, node, (6, 16)).unwrap();
        prop_assert!(plan.weight_grad_rows.is_some(), "the schedule forces the path: {:?}", p);
        let want = reference(&g, &inputs);
        let got = if threads == 0 {
            host_jit(&g, &inputs)
        } else {
            run_shared(&g, &TargetSpec::host(), threads, &inputs)
        };
        check_all(&got.map_err(TestCaseError::fail)?, &want).map_err(TestCaseError::fail)?;
    }
}
