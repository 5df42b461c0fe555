//! Depthwise convolutions (`kernels::depthwise`) against the reference interpreter:
//! random channels, extents, kernels (3x3, 5x5 and other sizes), strides, dilations,
//! paddings (asymmetric, wider than half the kernel), bias and fused epilogues; rows
//! narrow enough for the padded-buffer path and wide enough for edge tiles; on the
//! host through the JIT and on the portable target (x86-64-v2) through a `.so` run by
//! a two-thread session (channel-split tasks included).

mod common;

use std::path::PathBuf;

use cnnc_codegen::{JitModel, TargetSpec, link_shared};
use cnnc_ir::{
    BinaryFn, ConvGeometry, DType, EpilogueStep, Graph, Op, Tensor, TensorData, TensorType, UnaryFn, interp,
};
use common::{Rng, cases, check_close, random_tensor};
use proptest::prelude::*;

#[derive(Clone, Copy, Debug)]
enum Step {
    Relu6,
    Swish,
    Relu,
    /// An operand of the output's shape.
    Residual,
    /// [1, C, 1, 1].
    ChannelScale,
    /// [N, C, 1, 1] (squeeze-and-excite).
    ImageChannelScale,
    /// [1, 1, H, 1]: not addressable per vector, applied after the convolution.
    RowBroadcast,
}

const STEPS: [Step; 7] = [
    Step::Relu6,
    Step::Swish,
    Step::Relu,
    Step::Residual,
    Step::ChannelScale,
    Step::ImageChannelScale,
    Step::RowBroadcast,
];

#[derive(Clone, Debug)]
struct DwProblem {
    batch: usize,
    channels: usize,
    input: [usize; 2],
    kernel: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    pads_begin: [usize; 2],
    pads_end: [usize; 2],
    bias: bool,
    steps: Vec<Step>,
    /// The schedule's kernel family: "depthwise" or "" (unscheduled).
    family: &'static str,
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
        let mut g = Graph::new("depthwise");
        let x_shape = vec![self.batch, c, self.input[0], self.input[1]];
        let x = g.add_input(TensorType::f32(x_shape.clone()), "x");
        let mut inputs = vec![random_tensor(&mut rng, DType::F32, &x_shape, -1.0, 1.0)];
        let w_shape = [c, 1, self.kernel[0], self.kernel[1]];
        let w = g.add_constant("w", random_tensor(&mut rng, DType::F32, &w_shape, -0.5, 0.5));
        let mut conv_inputs = vec![x, w];
        if self.bias {
            conv_inputs.push(g.add_constant("b", random_tensor(&mut rng, DType::F32, &[c], -0.5, 0.5)));
        }
        let geometry = ConvGeometry {
            strides: self.strides.to_vec(),
            dilations: self.dilations.to_vec(),
            pads_begin: self.pads_begin.to_vec(),
            pads_end: self.pads_end.to_vec(),
            groups: c,
        };
        let y = g.push1("dw", Op::Conv(geometry), &conv_inputs).unwrap();
        let [oh, ow] = self.output();
        let out_shape = vec![self.batch, c, oh, ow];
        let mut epilogue = Vec::new();
        let mut operands = Vec::new();
        for (i, step) in self.steps.iter().enumerate() {
            let (func, shape) = match step {
                Step::Relu6 => {
                    epilogue.push(EpilogueStep::Unary(UnaryFn::Clip { min: 0.0, max: 6.0 }));
                    continue;
                }
                Step::Swish => {
                    epilogue.push(EpilogueStep::Unary(UnaryFn::Swish { alpha: 1.0 }));
                    continue;
                }
                Step::Relu => {
                    epilogue.push(EpilogueStep::Unary(UnaryFn::Relu));
                    continue;
                }
                Step::Residual => (BinaryFn::Add, out_shape.clone()),
                Step::ChannelScale => (BinaryFn::Mul, vec![1, c, 1, 1]),
                Step::ImageChannelScale => (BinaryFn::Mul, vec![self.batch, c, 1, 1]),
                Step::RowBroadcast => (BinaryFn::Sub, vec![1, 1, oh, 1]),
            };
            let v = g.add_input(TensorType::f32(shape.clone()), format!("operand{i}"));
            inputs.push(random_tensor(&mut rng, DType::F32, &shape, -1.0, 1.0));
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
        g.outputs.push(y);
        cnnc_ir::verify::verify(&g).unwrap();
        (g, inputs)
    }
}

/// Kernel sizes: 3x3 and 5x5 most of the time, else any size up to 7 per axis.
fn kernel() -> impl Strategy<Value = [usize; 2]> {
    prop_oneof![
        3 => Just([3, 3]),
        3 => Just([5, 5]),
        2 => (1usize..=7, 1usize..=7).prop_map(|(h, w)| [h, w]),
    ]
}

fn problem() -> impl Strategy<Value = DwProblem> {
    (
        (1usize..=2, 1usize..=12),
        (1usize..=12, prop_oneof![1usize..=20, 60usize..=90]),
        kernel(),
        (
            (1usize..=3, 1usize..=2),
            prop_oneof![4 => Just([1, 1]), 1 => Just([2, 2]), 1 => Just([1, 2])],
        ),
        proptest::collection::vec(0usize..=4, 4),
        any::<bool>(),
        proptest::collection::vec(0usize..STEPS.len(), 0..=3),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |((batch, channels), (h, w), kernel, ((sy, sx), dilations), pads, bias, steps, scheduled, seed)| {
                let mut p = DwProblem {
                    batch,
                    channels,
                    input: [h, w],
                    kernel,
                    strides: [sy, sx],
                    dilations,
                    pads_begin: [pads[0], pads[1]],
                    pads_end: [pads[2], pads[3]],
                    bias,
                    steps: steps.iter().map(|&s| STEPS[s]).collect(),
                    family: if scheduled { "depthwise" } else { "" },
                    seed,
                };
                // The padded input holds at least one dilated window.
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

/// The problem runs on the depthwise kernel (not the generic direct one).
fn check_dispatch(g: &Graph) -> Result<(), String> {
    let node = g.nodes.iter().find(|n| matches!(n.op, Op::Conv(_))).unwrap();
    if cnnc_codegen::kernels::depthwise::handles(g, node) {
        Ok(())
    } else {
        Err("the depthwise kernel does not take this node".into())
    }
}

fn host_jit(g: &Graph, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
    let model = JitModel::compile(g).map_err(|e| e.to_string())?;
    model.run(inputs).map_err(|e| e.to_string())
}

/// Compiles `g` for `target` into a `.so` and runs it with a session of `threads`.
fn run_shared(g: &Graph, target: &TargetSpec, threads: usize, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
    let (object, _) = cnnc_codegen::object::compile_object_with_info(g, target).map_err(|e| e.to_string())?;
    let path = common::temp_so("depthwise");
    link_shared(&object, &path, target).map_err(|e| e.to_string())?;
    let result = run_loaded(&path, g, threads, inputs);
    let _ = std::fs::remove_file(&path);
    result
}

/// Runs with every buffer 4 bytes past a 64-byte boundary: the kernel's vector
/// accesses must not assume alignment (SSE-only targets fault on folded aligned loads).
fn run_loaded(path: &PathBuf, g: &Graph, threads: usize, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
    let model = cnnc_runtime::Model::load(path).map_err(|e| e.to_string())?;
    let mut session = cnnc_runtime::Session::new(&model, threads).map_err(|e| e.to_string())?;
    let in_bytes: Vec<Vec<u8>> = inputs.iter().map(|t| t.data.to_le_bytes()).collect();
    let in_lines: Vec<Vec<Line>> = in_bytes.iter().map(|b| misaligned_copy(b)).collect();
    let in_refs: Vec<&[u8]> = in_lines
        .iter()
        .zip(&in_bytes)
        .map(|(lines, b)| &as_bytes(lines)[4..4 + b.len()])
        .collect();
    let out_types: Vec<TensorType> = g.outputs.iter().map(|&v| g.ty(v).clone()).collect();
    let mut out_lines: Vec<Vec<Line>> = out_types
        .iter()
        .map(|t| vec![Line([0; 64]); (t.byte_size() + 4).div_ceil(64).max(1)])
        .collect();
    let mut out_refs: Vec<&mut [u8]> = out_lines
        .iter_mut()
        .zip(&out_types)
        .map(|(lines, t)| &mut as_bytes_mut(lines)[4..4 + t.byte_size()])
        .collect();
    session.run(&in_refs, &mut out_refs).map_err(|e| e.to_string())?;
    Ok(out_types
        .iter()
        .zip(&out_refs)
        .map(|(t, bytes)| Tensor {
            shape: t.shape.clone(),
            data: TensorData::from_le_bytes(t.dtype, bytes),
        })
        .collect())
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

fn misaligned_copy(bytes: &[u8]) -> Vec<Line> {
    let mut lines = vec![Line([0; 64]); (bytes.len() + 4).div_ceil(64).max(1)];
    as_bytes_mut(&mut lines)[4..4 + bytes.len()].copy_from_slice(bytes);
    lines
}

fn as_bytes(lines: &[Line]) -> &[u8] {
    // SAFETY: Line is plain bytes without padding.
    unsafe { std::slice::from_raw_parts(lines.as_ptr().cast::<u8>(), lines.len() * 64) }
}

fn as_bytes_mut(lines: &mut [Line]) -> &mut [u8] {
    // SAFETY: Line is plain bytes without padding.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast::<u8>(), lines.len() * 64) }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(96), ..ProptestConfig::default() })]

    /// The host target through the JIT.
    #[test]
    fn host_matches_interpreter(p in problem()) {
        let (g, inputs) = p.graph();
        check_dispatch(&g).map_err(TestCaseError::fail)?;
        let want = interp::run(&g, &inputs).unwrap();
        let got = host_jit(&g, &inputs).map_err(TestCaseError::fail)?;
        check_all(&got, &want).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(24), ..ProptestConfig::default() })]

    /// The portable target (SSE4.2 only), through a `.so` with misaligned buffers and
    /// a two-thread session.
    #[test]
    fn portable_matches_interpreter(p in problem()) {
        let (g, inputs) = p.graph();
        let want = interp::run(&g, &inputs).unwrap();
        let target = TargetSpec::parse(None, Some("x86-64-v2")).unwrap();
        let got = run_shared(&g, &target, 2, &inputs).map_err(TestCaseError::fail)?;
        check_all(&got, &want).map_err(TestCaseError::fail)?;
    }
}

/// Layers of real models (MobileNetV2, EfficientNet-B0), large enough to be split into
/// per-channel-chunk tasks, with their epilogues (ReLU6; Swish with an SE scale; a
/// residual), on the host and the portable target with two threads.
#[test]
fn model_layers_split_into_tasks_match_interpreter() {
    let layers = [
        (96, [28, 28], [3, 3], [2, 2], [1, 1], vec![Step::Relu6]),
        (64, [40, 40], [3, 3], [1, 1], [1, 1], vec![Step::Relu6, Step::Residual]),
        (
            40,
            [30, 30],
            [5, 5],
            [1, 1],
            [2, 2],
            vec![Step::Swish, Step::ImageChannelScale],
        ),
        (
            24,
            [72, 72],
            [5, 5],
            [2, 2],
            [1, 2],
            vec![Step::Swish, Step::RowBroadcast],
        ),
    ];
    let host = TargetSpec::host();
    let portable = TargetSpec::parse(None, Some("x86-64-v2")).unwrap();
    for (i, (channels, input, kernel, strides, pads, steps)) in layers.into_iter().enumerate() {
        let p = DwProblem {
            batch: 2,
            channels,
            input,
            kernel,
            strides,
            dilations: [1, 1],
            pads_begin: pads,
            pads_end: pads,
            bias: true,
            steps,
            family: "depthwise",
            seed: 7 + i as u64,
        };
        let (g, inputs) = p.graph();
        check_dispatch(&g).unwrap();
        let (_, info) = cnnc_codegen::object::compile_object_with_info(&g, &host).unwrap();
        assert_eq!(info.split_nodes, 1, "layer {i} ({p:?}) is split into tasks");
        let want = interp::run(&g, &inputs).unwrap();
        let got = host_jit(&g, &inputs).unwrap();
        check_all(&got, &want).unwrap_or_else(|e| panic!("layer {i} on the host: {e}"));
        for target in [&host, &portable] {
            let got = run_shared(&g, target, 2, &inputs).unwrap();
            check_all(&got, &want).unwrap_or_else(|e| panic!("layer {i} on {target:?} with 2 threads: {e}"));
        }
    }
}
