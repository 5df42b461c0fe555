//! Stride-1 transposed convolutions (the input gradients of small convolutions in
//! training: LeNet's 16 -> 6, 5x5) against the interpreter: on the host through the JIT
//! (AVX2+FMA machine code in gather form, `microkernel::conv_transpose_x86`, when the
//! host has it) and through a `.so` for x86-64-v2 (the f32x4 scatter kernel). Random
//! channels, extents, kernels, pads (wider than the kernel too), declared outputs larger
//! or smaller than the input's reach, bias, weights as graph inputs (as in training).

mod common;

use cnnc_codegen::microkernel::conv_transpose_x86::TransposedSpec;
use cnnc_codegen::{JitModel, TargetSpec};
use cnnc_ir::{ConvGeometry, DType, Graph, Op, Tensor, TensorType, interp};
use common::{Rng, cases, check_close, random_tensor};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Problem {
    batch: usize,
    in_channels: usize,
    out_channels: usize,
    input: [usize; 2],
    kernel: [usize; 2],
    pads: [usize; 2],
    /// Output extent minus the input's reach `in + k − 1 − 2·pad` (ONNX's output padding
    /// when positive; a cropped output when negative), clamped to at least 1.
    extra: [isize; 2],
    bias: bool,
    seed: u64,
}

impl Problem {
    fn output(&self) -> [usize; 2] {
        std::array::from_fn(|a| {
            let reach = self.input[a] as isize + self.kernel[a] as isize - 1 - 2 * self.pads[a] as isize;
            (reach + self.extra[a]).max(1) as usize
        })
    }

    fn graph(&self) -> (Graph, Vec<Tensor>) {
        let mut rng = Rng(self.seed | 1);
        let mut g = Graph::new("conv_transpose");
        let x_shape = vec![self.batch, self.in_channels, self.input[0], self.input[1]];
        let w_shape = vec![self.in_channels, self.out_channels, self.kernel[0], self.kernel[1]];
        let x = g.add_input(TensorType::f32(x_shape.clone()), "x");
        let w = g.add_input(TensorType::f32(w_shape.clone()), "w");
        let mut inputs = vec![
            random_tensor(&mut rng, DType::F32, &x_shape, -1.0, 1.0),
            random_tensor(&mut rng, DType::F32, &w_shape, -0.5, 0.5),
        ];
        let mut op_inputs = vec![x, w];
        if self.bias {
            op_inputs.push(g.add_input(TensorType::f32(vec![self.out_channels]), "b"));
            inputs.push(random_tensor(&mut rng, DType::F32, &[self.out_channels], -0.5, 0.5));
        }
        let geometry = ConvGeometry {
            strides: vec![1, 1],
            dilations: vec![1, 1],
            pads_begin: self.pads.to_vec(),
            pads_end: self.pads.to_vec(),
            groups: 1,
        };
        let [oh, ow] = self.output();
        let ty = TensorType::f32(vec![self.batch, self.out_channels, oh, ow]);
        let y = g.push_typed("dx", Op::ConvTranspose(geometry), &op_inputs, ty).unwrap();
        g.outputs.push(y);
        (g, inputs)
    }
}

fn problem() -> impl Strategy<Value = Problem> {
    (
        (1usize..3, 1usize..20, 1usize..15),
        (1usize..12, 1usize..30),
        (1usize..6, 1usize..6),
        (0usize..6, 0usize..6),
        (-3isize..4, -3isize..4),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|((batch, in_channels, out_channels), (h, w), (kh, kw), (ph, pw), (eh, ew), bias, seed)| Problem {
            batch,
            in_channels,
            out_channels,
            input: [h, w],
            kernel: [kh, kw],
            pads: [ph, pw],
            extra: [eh, ew],
            bias,
            seed,
        })
}

fn check_host(p: &Problem) -> Result<(), String> {
    let (g, inputs) = p.graph();
    let want = interp::run(&g, &inputs).map_err(|e| format!("interpreter: {e}"))?;
    let model = JitModel::compile(&g).map_err(|e| format!("compile: {e}"))?;
    let got = model.run(&inputs).map_err(|e| format!("run: {e}"))?;
    check_close(&got[0], &want[0])
}

fn check_portable(p: &Problem) -> Result<(), String> {
    let (g, inputs) = p.graph();
    let want = interp::run(&g, &inputs).map_err(|e| format!("interpreter: {e}"))?;
    let target = TargetSpec::parse(None, Some("x86-64-v2")).map_err(|e| e.to_string())?;
    let got = common::run_shared_library("conv_transpose_gather", &g, &target, 1, &inputs)?;
    check_close(&got[0], &want[0])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), ..ProptestConfig::default() })]

    #[test]
    fn stride_one_transposed_convolution_matches_the_interpreter(p in problem()) {
        prop_assert!(check_host(&p).is_ok(), "{:?}: {}", p, check_host(&p).unwrap_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(8), ..ProptestConfig::default() })]

    #[test]
    fn portable_target_matches_the_interpreter(p in problem()) {
        prop_assert!(check_portable(&p).is_ok(), "{:?}: {}", p, check_portable(&p).unwrap_err());
    }
}

/// LeNet-5's input gradient of its second convolution at batch 4, the case the gather
/// kernel was written for, and the spec it gets.
#[test]
fn lenet_gradient_takes_the_gather_kernel() {
    let p = Problem {
        batch: 4,
        in_channels: 16,
        out_channels: 6,
        input: [10, 10],
        kernel: [5, 5],
        pads: [0, 0],
        extra: [0, 0],
        bias: false,
        seed: 7,
    };
    let (g, _) = p.graph();
    let spec = TransposedSpec::of_node(&g, &g.nodes[0]).expect("a stride-1 2-D transposed convolution has a spec");
    assert_eq!((spec.out_h, spec.out_w, spec.padded_width()), (14, 14, 20));
    check_host(&p).unwrap();
}

/// A depthwise stride-2 transposed convolution (`kernels::conv_transpose_depthwise`: the
/// input gradient of a strided depthwise layer): any kernel and pad, outputs of either
/// parity and beyond the input's reach, bias.
#[derive(Clone, Debug)]
struct Depthwise {
    batch: usize,
    channels: usize,
    input: [usize; 2],
    kernel: [usize; 2],
    pads: [usize; 2],
    output: [usize; 2],
    bias: bool,
    seed: u64,
}

impl Depthwise {
    fn graph(&self) -> (Graph, Vec<Tensor>) {
        let mut rng = Rng(self.seed | 1);
        let mut g = Graph::new("depthwise_transposed");
        let c = self.channels;
        let x_shape = vec![self.batch, c, self.input[0], self.input[1]];
        let w_shape = vec![c, 1, self.kernel[0], self.kernel[1]];
        let x = g.add_input(TensorType::f32(x_shape.clone()), "x");
        let w = g.add_input(TensorType::f32(w_shape.clone()), "w");
        let mut inputs = vec![
            random_tensor(&mut rng, DType::F32, &x_shape, -1.0, 1.0),
            random_tensor(&mut rng, DType::F32, &w_shape, -0.5, 0.5),
        ];
        let mut op_inputs = vec![x, w];
        if self.bias {
            op_inputs.push(g.add_input(TensorType::f32(vec![c]), "b"));
            inputs.push(random_tensor(&mut rng, DType::F32, &[c], -0.5, 0.5));
        }
        let geometry = ConvGeometry {
            strides: vec![2, 2],
            dilations: vec![1, 1],
            pads_begin: self.pads.to_vec(),
            pads_end: self.pads.to_vec(),
            groups: c,
        };
        let ty = TensorType::f32(vec![self.batch, c, self.output[0], self.output[1]]);
        let y = g.push_typed("dx", Op::ConvTranspose(geometry), &op_inputs, ty).unwrap();
        g.outputs.push(y);
        (g, inputs)
    }
}

fn depthwise() -> impl Strategy<Value = Depthwise> {
    (
        (1usize..3, 1usize..5),
        (1usize..13, 1usize..30),
        (1usize..6, 1usize..6),
        (0usize..4, 0usize..4),
        (-2isize..3, -2isize..3),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|((batch, channels), (h, w), (kh, kw), (ph, pw), (eh, ew), bias, seed)| {
            let out = |i: usize, k: usize, p: usize, e: isize| ((2 * i as isize - 2 + k as isize - 2 * p as isize) + e).max(1) as usize;
            Depthwise {
                batch,
                channels,
                input: [h, w],
                kernel: [kh, kw],
                pads: [ph, pw],
                output: [out(h, kh, ph, eh), out(w, kw, pw, ew)],
                bias,
                seed,
            }
        })
}

fn check_depthwise(p: &Depthwise, target: Option<&str>) -> Result<(), String> {
    let (g, inputs) = p.graph();
    let want = interp::run(&g, &inputs).map_err(|e| format!("interpreter: {e}"))?;
    let got = match target {
        None => {
            let model = JitModel::compile(&g).map_err(|e| format!("compile: {e}"))?;
            model.run(&inputs).map_err(|e| format!("run: {e}"))?
        }
        Some(cpu) => {
            let target = TargetSpec::parse(None, Some(cpu)).map_err(|e| e.to_string())?;
            common::run_shared_library("conv_transpose_depthwise", &g, &target, 1, &inputs)?
        }
    };
    check_close(&got[0], &want[0])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), ..ProptestConfig::default() })]

    #[test]
    fn strided_depthwise_transposed_convolution_matches_the_interpreter(p in depthwise()) {
        prop_assert!(check_depthwise(&p, None).is_ok(), "{:?}: {}", p, check_depthwise(&p, None).unwrap_err());
    }
}

/// MobileNet-v2's strided 3x3 (pad 1) and EfficientNet's 5x5 (pad 2) input gradients,
/// on the host and on x86-64-v2.
#[test]
fn mobile_network_strided_depthwise_gradients() {
    for (input, k, p, target) in [(28, 3, 1, None), (7, 5, 2, None), (14, 3, 1, Some("x86-64-v2")), (9, 5, 2, Some("x86-64-v2"))] {
        let case = Depthwise {
            batch: 2,
            channels: 3,
            input: [input, input],
            kernel: [k, k],
            pads: [p, p],
            output: [2 * input, 2 * input],
            bias: false,
            seed: input as u64,
        };
        check_depthwise(&case, target).unwrap_or_else(|e| panic!("{case:?} on {target:?}: {e}"));
    }
}
