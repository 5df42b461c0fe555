//! Ungrouped 2-D convolution weight gradients with few input channels through a
//! whole-graph JIT, where the module defines the AVX2+FMA image function of
//! `microkernel::conv_weight_grad_x86` (when the host has them), against the interpreter:
//! random batches, channels, maps (one- and two-vector panels, pad lanes), kernels,
//! strides and dilations; through a `.so` with 1 and 2 threads; and LeNet's two layers.

mod common;

use cnnc_codegen::microkernel::conv_weight_grad_x86::WeightGradSpec;
use cnnc_codegen::{JitModel, TargetSpec};
use cnnc_ir::{ConvGeometry, DType, Graph, Op, Tensor, TensorType, interp};
use common::{Rng, cases, check_close, random_tensor};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Problem {
    batch: usize,
    channels: usize,
    maps: usize,
    input: [usize; 2],
    kernel: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    seed: u64,
}

impl Problem {
    fn output(&self) -> [usize; 2] {
        [0, 1].map(|a| (self.input[a] - (self.kernel[a] - 1) * self.dilations[a] - 1) / self.strides[a] + 1)
    }

    fn graph(&self) -> (Graph, Vec<Tensor>) {
        let mut rng = Rng(self.seed | 1);
        let mut g = Graph::new("conv_weight_grad_x86");
        let out = self.output();
        let x_shape = vec![self.batch, self.channels, self.input[0], self.input[1]];
        let dy_shape = vec![self.batch, self.maps, out[0], out[1]];
        let dw_shape = vec![self.maps, self.channels, self.kernel[0], self.kernel[1]];
        let x = g.add_input(TensorType::f32(x_shape.clone()), "x");
        let dy = g.add_input(TensorType::f32(dy_shape.clone()), "dy");
        let geometry = ConvGeometry {
            strides: self.strides.to_vec(),
            dilations: self.dilations.to_vec(),
            pads_begin: vec![0, 0],
            pads_end: vec![0, 0],
            groups: 1,
        };
        let dw = g.push_typed("dw", Op::ConvWeightGrad(geometry), &[x, dy], TensorType::f32(dw_shape)).unwrap();
        g.outputs.push(dw);
        let inputs =
            vec![random_tensor(&mut rng, DType::F32, &x_shape, -1.0, 1.0), random_tensor(&mut rng, DType::F32, &dy_shape, -1.0, 1.0)];
        (g, inputs)
    }
}

fn problem() -> impl Strategy<Value = Problem> {
    (
        (1usize..4, 1usize..7, 1usize..34),
        ([1usize..6, 1usize..6], [1usize..4, 1usize..4], [1usize..3, 1usize..3]),
        ([0usize..12, 0usize..12], any::<u64>()),
    )
        .prop_map(|((batch, channels, maps), (kernel, strides, dilations), (extra, seed))| {
            // The input reaches at least one output position per axis.
            let input = [0, 1].map(|a| (kernel[a] - 1) * dilations[a] + 1 + extra[a]);
            Problem { batch, channels, maps, input, kernel, strides, dilations, seed }
        })
}

fn check_host(p: &Problem) -> Result<(), String> {
    let (g, inputs) = p.graph();
    if WeightGradSpec::of_node(&g, &g.nodes[0]).is_none() {
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
    let target = TargetSpec::host();
    let got = common::run_shared_library("conv_weight_grad_x86", &g, &target, threads, &inputs)?;
    check_close(&got[0], &want[0])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), ..ProptestConfig::default() })]

    #[test]
    fn weight_gradient_matches_the_interpreter(p in problem()) {
        // 1x1 stride-1 gradients over more than one channel pair belong to
        // `kernels::conv_weight_grad`'s pointwise path, not to this kernel.
        let pointwise = p.kernel == [1, 1] && p.strides == [1, 1] && p.channels * p.maps > 1;
        prop_assume!(!pointwise);
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

/// LeNet-5's c2 (6 -> 16, two-vector panels of 6 taps) and c1 (1 -> 6, one pad-laned
/// vector, 12-tap rows) at a batch of 3.
#[test]
fn lenet_layers() {
    let c2 = Problem { batch: 3, channels: 6, maps: 16, input: [14, 14], kernel: [5, 5], strides: [1, 1], dilations: [1, 1], seed: 5 };
    let c1 = Problem { batch: 3, channels: 1, maps: 6, input: [32, 32], kernel: [5, 5], strides: [1, 1], dilations: [1, 1], seed: 7 };
    for p in [c2, c1] {
        check_host(&p).unwrap();
    }
}
