//! Ungrouped, unpadded 2-D convolutions with few input channels on the direct kernel,
//! through a whole-graph JIT where the module defines the AVX2+FMA row function of
//! `microkernel::conv_rows_x86` (when the host has it), against the interpreter: random
//! batches, channels, maps (map blocks of one- and two-vector tiles), row widths (masked
//! tails), kernels, row strides, dilations, with and without bias and a ReLU epilogue; through a `.so` with 1
//! and 2 threads; and LeNet's two layers.

mod common;

use cnnc_codegen::microkernel::conv_rows_x86::RowConvSpec;
use cnnc_codegen::{JitModel, TargetSpec};
use cnnc_ir::{ConvGeometry, DType, EpilogueStep, Graph, Op, Tensor, TensorType, UnaryFn, interp};
use common::{Rng, cases, check_close, random_tensor};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Problem {
    batch: usize,
    channels: usize,
    maps: usize,
    input: [usize; 2],
    kernel: [usize; 2],
    stride_h: usize,
    dilations: [usize; 2],
    bias: bool,
    /// A ReLU epilogue, applied by the machine code in registers.
    relu: bool,
    seed: u64,
}

impl Problem {
    fn output(&self) -> [usize; 2] {
        let strides = [self.stride_h, 1];
        [0, 1].map(|a| (self.input[a] - (self.kernel[a] - 1) * self.dilations[a] - 1) / strides[a] + 1)
    }

    fn graph(&self) -> (Graph, Vec<Tensor>) {
        let mut rng = Rng(self.seed | 1);
        let mut g = Graph::new("conv_rows_x86");
        let out = self.output();
        let x_shape = vec![self.batch, self.channels, self.input[0], self.input[1]];
        let w_shape = vec![self.maps, self.channels, self.kernel[0], self.kernel[1]];
        let y_shape = vec![self.batch, self.maps, out[0], out[1]];
        let x = g.add_input(TensorType::f32(x_shape.clone()), "x");
        let w = g.add_input(TensorType::f32(w_shape.clone()), "w");
        let mut operands = vec![x, w];
        let mut inputs =
            vec![random_tensor(&mut rng, DType::F32, &x_shape, -1.0, 1.0), random_tensor(&mut rng, DType::F32, &w_shape, -1.0, 1.0)];
        if self.bias {
            operands.push(g.add_input(TensorType::f32(vec![self.maps]), "bias"));
            inputs.push(random_tensor(&mut rng, DType::F32, &[self.maps], -1.0, 1.0));
        }
        let geometry = ConvGeometry {
            strides: vec![self.stride_h, 1],
            dilations: self.dilations.to_vec(),
            pads_begin: vec![0, 0],
            pads_end: vec![0, 0],
            groups: 1,
        };
        let y = g.push_typed("y", Op::Conv(geometry), &operands, TensorType::f32(y_shape)).unwrap();
        g.nodes[0].schedule.kernel = "direct".to_string();
        if self.relu {
            g.nodes[0].epilogue = vec![EpilogueStep::Unary(UnaryFn::Relu)];
        }
        g.outputs.push(y);
        (g, inputs)
    }
}

fn problem() -> impl Strategy<Value = Problem> {
    (
        (1usize..4, 1usize..9, 1usize..34, any::<bool>(), any::<bool>()),
        ([1usize..6, 1usize..6], 1usize..4, [1usize..3, 1usize..3]),
        ([0usize..12, 0usize..40], any::<u64>()),
    )
        .prop_map(|((batch, channels, maps, bias, relu), (kernel, stride_h, dilations), (extra, seed))| {
            // 1x1 kernels are left to the f32x4 kernel.
            let kernel = if kernel == [1, 1] { [1, 2] } else { kernel };
            let input = [0, 1].map(|a| (kernel[a] - 1) * dilations[a] + 1 + extra[a]);
            Problem { batch, channels, maps, input, kernel, stride_h, dilations, bias, relu, seed }
        })
}

fn check_host(p: &Problem) -> Result<(), String> {
    let (g, inputs) = p.graph();
    if RowConvSpec::of_node(&g, &g.nodes[0]).is_none() {
        return Err("the machine-code kernel does not take this problem".into());
    }
    let want = interp::run(&g, &inputs).map_err(|e| format!("interpreter: {e}"))?;
    let model = JitModel::compile(&g).map_err(|e| format!("compile: {e}"))?;
    let got = model.run(&inputs).map_err(|e| format!("run: {e}"))?;
    check_close(&got[0], &want[0])
}

fn check_shared_library(p: &Problem, threads: usize) -> Result<(), String> {
    let (g, inputs) = p.graph();
    let want = interp::run(&g, &inputs).map_err(|e| format!("interpreter: {e}"))?;
    let got = common::run_shared_library("conv_rows_x86", &g, &TargetSpec::host(), threads, &inputs)?;
    check_close(&got[0], &want[0])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), ..ProptestConfig::default() })]

    #[test]
    fn row_convolution_matches_the_interpreter(p in problem()) {
        prop_assert!(check_host(&p).is_ok(), "{:?}: {}", p, check_host(&p).unwrap_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(6), ..ProptestConfig::default() })]

    #[test]
    fn shared_library_with_one_and_two_threads_matches_the_interpreter(p in problem()) {
        for threads in [1, 2] {
            prop_assert!(check_shared_library(&p, threads).is_ok(), "{:?} ({threads} threads): {}", p, check_shared_library(&p, threads).unwrap_err());
        }
    }
}

/// LeNet-5's c1 (1 -> 6, 28 columns: a 16-column tile and a 12-column one with a masked
/// tail) and c2 (6 -> 16, 10 columns: maps in blocks of 6, 5, 5), with bias, with and
/// without ReLU.
#[test]
fn lenet_layers() {
    let c1 = Problem { batch: 2, channels: 1, maps: 6, input: [32, 32], kernel: [5, 5], stride_h: 1, dilations: [1, 1], bias: true, relu: true, seed: 3 };
    let c2 = Problem { batch: 2, channels: 6, maps: 16, input: [14, 14], kernel: [5, 5], stride_h: 1, dilations: [1, 1], bias: true, relu: false, seed: 4 };
    for p in [c1, c2] {
        check_host(&p).unwrap();
    }
}
