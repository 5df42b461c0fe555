//! MatMul (`kernels::matmul`, B a graph input) with a B large enough that the reduction
//! runs in blocks accumulating in C (the weight gradients over stacked taps of training
//! graphs: many rows of depth, few columns), against the reference interpreter: row
//! counts on and off the 4-row tile, columns on and off the vector widths, depths that
//! leave a partial last block, batched A folded into the rows.

mod common;

use cnnc_codegen::JitModel;
use cnnc_ir::{DType, Graph, Op, TensorType, interp};
use common::{Rng, cases, check_close, random_tensor};
use proptest::prelude::*;

fn check(batches: usize, m: usize, k: usize, n: usize, seed: u64) -> Result<(), String> {
    let mut rng = Rng(seed | 1);
    let mut g = Graph::new("matmul_k_blocks");
    let a_shape = if batches > 1 { vec![batches, m, k] } else { vec![m, k] };
    let a = g.add_input(TensorType::f32(a_shape.clone()), "a");
    let b = g.add_input(TensorType::f32([k, n]), "b");
    let c = g.push1("matmul", Op::MatMul, &[a, b]).map_err(|e| e.to_string())?;
    g.outputs.push(c);
    let inputs = vec![
        random_tensor(&mut rng, DType::F32, &a_shape, -1.0, 1.0),
        random_tensor(&mut rng, DType::F32, &[k, n], -1.0, 1.0),
    ];
    let want = interp::run(&g, &inputs).map_err(|e| e.to_string())?;
    let model = JitModel::compile(&g).map_err(|e| e.to_string())?;
    let got = model.run(&inputs).map_err(|e| e.to_string())?;
    check_close(&got[0], &want[0])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(24), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn blocked_reductions_match_interpreter(
        batches in 1usize..=2,
        m in 5usize..=13,
        n in prop_oneof![Just(16usize), Just(10), 1usize..=24],
        extra in 0usize..=3000,
        seed in any::<u64>(),
    ) {
        // B over 256 KiB: k·n·4 > 262144.
        let k = 65536 / n + 1 + extra;
        check(batches, m, k, n, seed).map_err(TestCaseError::fail)?;
    }
}

#[test]
fn resnet_tiny_stem_weight_gradient_shape() {
    check(1, 27, 65536, 16, 7).unwrap();
}
