//! Pointwise (1x1) convolution weight gradients through a whole-graph JIT, where the
//! module defines the AVX2+FMA tiles of `microkernel::pointwise_weight_grad_x86` (when the
//! host has them), against the interpreter: random batches, groups, maps and channels
//! (every tile shape and remainder), planes shorter than a vector, with scalar tails, and
//! longer than a chunk; and through a `.so` for x86-64-v2 (the f32x4 loop).

mod common;

use cnnc_codegen::microkernel::pointwise_weight_grad_x86::{TileSpec, block_sizes, pointwise_of_node, tiles_of};
use cnnc_codegen::{JitModel, TargetSpec};
use cnnc_ir::{ConvGeometry, DType, Graph, Op, Tensor, TensorType, interp};
use common::{Rng, cases, check_close, random_tensor};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Problem {
    batch: usize,
    groups: usize,
    channels: usize,
    maps: usize,
    spatial: Vec<usize>,
    seed: u64,
}

impl Problem {
    fn graph(&self) -> (Graph, Vec<Tensor>) {
        let mut rng = Rng(self.seed | 1);
        let mut g = Graph::new("pointwise_weight_grad");
        let x_shape = [vec![self.batch, self.groups * self.channels], self.spatial.clone()].concat();
        let dy_shape = [vec![self.batch, self.groups * self.maps], self.spatial.clone()].concat();
        let dw_shape = [vec![self.groups * self.maps, self.channels], vec![1; self.spatial.len()]].concat();
        let x = g.add_input(TensorType::f32(x_shape.clone()), "x");
        let dy = g.add_input(TensorType::f32(dy_shape.clone()), "dy");
        let n = self.spatial.len();
        let geometry =
            ConvGeometry { strides: vec![1; n], dilations: vec![1; n], pads_begin: vec![0; n], pads_end: vec![0; n], groups: self.groups };
        let dw = g.push_typed("dw", Op::ConvWeightGrad(geometry), &[x, dy], TensorType::f32(dw_shape)).unwrap();
        g.outputs.push(dw);
        let inputs =
            vec![random_tensor(&mut rng, DType::F32, &x_shape, -1.0, 1.0), random_tensor(&mut rng, DType::F32, &dy_shape, -1.0, 1.0)];
        (g, inputs)
    }
}

fn problem() -> impl Strategy<Value = Problem> {
    (
        (1usize..4, 1usize..3, 1usize..20, 1usize..20),
        prop::collection::vec(1usize..24, 1..3),
        any::<u64>(),
    )
        .prop_filter("a product of several sums", |((_, _, c, m), _, _)| c * m > 1)
        .prop_map(|((batch, groups, channels, maps), spatial, seed)| Problem { batch, groups, channels, maps, spatial, seed })
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
    let got = common::run_shared_library("pointwise_weight_grad_x86", &g, &target, 1, &inputs)?;
    check_close(&got[0], &want[0])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), ..ProptestConfig::default() })]

    #[test]
    fn pointwise_weight_gradient_matches_the_interpreter(p in problem()) {
        prop_assert!(check_host(&p).is_ok(), "{:?}: {}", p, check_host(&p).unwrap_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(6), ..ProptestConfig::default() })]

    #[test]
    fn portable_target_matches_the_interpreter(p in problem()) {
        prop_assert!(check_portable(&p).is_ok(), "{:?}: {}", p, check_portable(&p).unwrap_err());
    }
}

/// MobileNet-v2's 16 -> 96 expansion at a small batch, on a plane of 3249 positions (a
/// chunk boundary inside it: 3072 positions per chunk for 16 channels), 3 x 4 tiles.
#[test]
fn mobilenet_expansion_shape() {
    let p = Problem { batch: 2, groups: 1, channels: 16, maps: 96, spatial: vec![57, 57], seed: 3 };
    let (g, _) = p.graph();
    let (_, _, cpg, mpg, positions) = pointwise_of_node(&g, &g.nodes[0]).expect("a pointwise weight gradient");
    assert_eq!(block_sizes(mpg, cpg), (3, 4));
    assert!(tiles_of(mpg, cpg, positions).iter().all(|t| TileSpec::fits(t.maps, t.channels)));
    check_host(&p).unwrap();
}
