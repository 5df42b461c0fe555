//! The weight gradient of depthwise stride-2 convolutions (`kernels::depthwise_weight_grad`:
//! x split into even and odd columns) against the interpreter, over random channels,
//! extents (odd and even), kernels, pads (asymmetric too) and batches; and a fallback check.

#[path = "compute_kernels/harness.rs"]
#[allow(dead_code)]
mod harness;

use cnnc_codegen::kernels::depthwise_weight_grad;
use cnnc_codegen::math::FusedMultiplyAdd;
use cnnc_ir::{ConvGeometry, Graph, Op, TensorType};
use harness::{assert_close, random_f32};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Case {
    batch: usize,
    channels: usize,
    input: [usize; 2],
    kernel: [usize; 2],
    pads_begin: [usize; 2],
    pads_end: [usize; 2],
    seed: u64,
}

impl Case {
    fn output(&self) -> Option<[usize; 2]> {
        let out = |a: usize| {
            let span = self.input[a] + self.pads_begin[a] + self.pads_end[a];
            (span >= self.kernel[a]).then(|| (span - self.kernel[a]) / 2 + 1)
        };
        Some([out(0)?, out(1)?])
    }

    fn geometry(&self) -> ConvGeometry {
        ConvGeometry {
            strides: vec![2, 2],
            dilations: vec![1, 1],
            pads_begin: self.pads_begin.to_vec(),
            pads_end: self.pads_end.to_vec(),
            groups: self.channels,
        }
    }
}

fn check(case: &Case) {
    let Some([oh, ow]) = case.output() else { return };
    let x_shape = vec![case.batch, case.channels, case.input[0], case.input[1]];
    let dy_shape = vec![case.batch, case.channels, oh, ow];
    let w_shape = vec![case.channels, 1, case.kernel[0], case.kernel[1]];
    let x = random_f32(&x_shape, case.seed, false);
    let dy = random_f32(&dy_shape, case.seed ^ 0xd1, false);
    let op = Op::ConvWeightGrad(case.geometry());
    let declared = vec![TensorType::f32(w_shape.clone())];

    // The dispatcher sends the node here.
    let mut g = Graph::new("dw");
    let xv = g.add_input(TensorType::f32(x_shape), "x");
    let dyv = g.add_input(TensorType::f32(dy_shape), "dy");
    g.push_typed("dw", op.clone(), &[xv, dyv], TensorType::f32(w_shape)).unwrap();
    assert!(depthwise_weight_grad::handles(&g, &g.nodes[0]), "{case:?} not taken");

    let want = cnnc_ir::interp::eval(&op, &[&x, &dy], &declared, &[]).expect("interpreter");
    for fused in [false, true] {
        let _fma = FusedMultiplyAdd::enable(fused);
        let got = harness::run(op.clone(), &[&x, &dy], Some(declared.clone()), depthwise_weight_grad::emit)
            .unwrap_or_else(|e| panic!("{case:?}: {e}"));
        assert_close(&got[0], &want[0], &format!("{case:?} (fused={fused})"));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn strided_depthwise_weight_gradient_matches_the_interpreter(
        batch in 1usize..3,
        channels in 1usize..5,
        input in (1usize..30, 1usize..30),
        kernel in (1usize..6, 1usize..8),
        pads_begin in (0usize..4, 0usize..4),
        pads_end in (0usize..4, 0usize..4),
        seed in any::<u64>(),
    ) {
        check(&Case {
            batch,
            channels,
            input: [input.0, input.1],
            kernel: [kernel.0, kernel.1],
            pads_begin: [pads_begin.0, pads_begin.1],
            pads_end: [pads_end.0, pads_end.1],
            seed,
        });
    }
}

#[test]
fn mobile_network_shapes() {
    for (input, k, p) in [(112, 3, 1), (56, 3, 1), (57, 3, 1), (28, 5, 2), (15, 5, 2)] {
        check(&Case { batch: 2, channels: 3, input: [input, input], kernel: [k, k], pads_begin: [p, p], pads_end: [p, p], seed: input as u64 });
    }
}
