//! Epilogues applied in registers by elementwise and concat kernels (the operands appended
//! after the op's own inputs, as the fuse-epilogue pass leaves them), against the
//! interpreter over random shapes and broadcast patterns.

mod common;

use cnnc_ir::{BinaryFn, DType, EpilogueStep, Graph, Op, TensorType, UnaryFn};
use common::{Rng, check_graph, random_tensor};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig { cases: common::cases(40), ..ProptestConfig::default() }
}

/// Per-channel [1, C, 1, 1], [C, 1, 1], or the full shape: what BatchNorm scales, biases and
/// residuals look like.
fn operand_shape(rng: &mut Rng, shape: &[usize]) -> Vec<usize> {
    match rng.below(3) {
        0 => vec![1, shape[1], 1, 1],
        1 => vec![shape[1], 1, 1],
        _ => shape.to_vec(),
    }
}

/// Appends an epilogue mul(scale), add(shift), activation to `g`'s last node, with the
/// scale and shift as new graph inputs of the shapes given.
fn add_batchnorm_relu_epilogue(g: &mut Graph, scale: Vec<usize>, shift: Vec<usize>, act: UnaryFn) {
    let s = g.add_input(TensorType::f32(scale), "scale");
    let t = g.add_input(TensorType::f32(shift), "shift");
    let node = g.nodes.last_mut().expect("a node");
    node.inputs.push(s);
    node.inputs.push(t);
    let n = node.inputs.len();
    node.epilogue = vec![
        EpilogueStep::Binary { func: BinaryFn::Mul, operand: n - 2 },
        EpilogueStep::Binary { func: BinaryFn::Add, operand: n - 1 },
        EpilogueStep::Unary(act),
    ];
}

/// Uniform in [-range, range) for every graph input.
fn random_inputs(g: &Graph, rng: &mut Rng, range: f32) -> Vec<cnnc_ir::Tensor> {
    g.inputs.iter().map(|&v| random_tensor(rng, DType::F32, &g.ty(v).shape, -range, range)).collect()
}

fn activation(rng: &mut Rng) -> UnaryFn {
    [UnaryFn::Relu, UnaryFn::Sigmoid, UnaryFn::Swish { alpha: 1.0 }, UnaryFn::Clip { min: 0.0, max: 6.0 }]
        [rng.below(4) as usize]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn concat_then_batchnorm_relu_in_one_pass(
        batch in 1usize..3,
        parts in prop::collection::vec(1usize..6, 1..4),
        h in 1usize..6,
        w in 1usize..7,
        seed in 1u64..u64::MAX,
    ) {
        // batch 1 takes the in-register path (each input one block of the output); batch 2
        // the copy followed by an epilogue pass.
        let mut rng = Rng(seed);
        let mut g = Graph::new("concat_bn_relu");
        let xs: Vec<_> = parts
            .iter()
            .enumerate()
            .map(|(i, &c)| g.add_input(TensorType::f32(vec![batch, c, h, w]), format!("x{i}")))
            .collect();
        let y = g.push1("concat", Op::Concat { axis: 1 }, &xs).unwrap();
        let shape = g.ty(y).shape.clone();
        let (scale, shift) = (operand_shape(&mut rng, &shape), operand_shape(&mut rng, &shape));
        add_batchnorm_relu_epilogue(&mut g, scale, shift, activation(&mut rng));
        g.outputs.push(y);
        check_graph(&g, &random_inputs(&g, &mut rng, 2.0)).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn elementwise_anchor_with_appended_operands(
        shape in prop::collection::vec(1usize..6, 4..=4),
        seed in 1u64..u64::MAX,
    ) {
        let mut rng = Rng(seed);
        let mut g = Graph::new("chain");
        let x = g.add_input(TensorType::f32(shape.clone()), "x");
        let y = if rng.below(2) == 0 {
            g.push1("abs", Op::Unary(UnaryFn::Abs), &[x]).unwrap()
        } else {
            let k = g.add_input(TensorType::f32(operand_shape(&mut rng, &shape)), "k");
            g.push1("sub", Op::Binary(BinaryFn::Sub), &[k, x]).unwrap()
        };
        let (scale, shift) = (operand_shape(&mut rng, &shape), operand_shape(&mut rng, &shape));
        add_batchnorm_relu_epilogue(&mut g, scale, shift, activation(&mut rng));
        g.outputs.push(y);
        check_graph(&g, &random_inputs(&g, &mut rng, 3.0)).map_err(TestCaseError::fail)?;
    }
}
