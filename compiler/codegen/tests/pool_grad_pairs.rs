//! Max pooling's input gradient for 2x2 windows of stride 2 that tile the input exactly
//! (`kernels::pool_grad`'s `Pairs` path: each dx element written once) against the
//! interpreter: ties (the first maximum in row-major order wins), NaNs (a NaN wins and
//! stays), -0 and +0, rows of whole vectors of windows and of scalar remainders.

#[path = "compute_kernels/harness.rs"]
#[allow(dead_code)]
mod harness;

use cnnc_codegen::kernels::pool_grad;
use cnnc_ir::{Op, PoolAttrs, PoolKind, Tensor, TensorData};
use harness::random_f32;
use proptest::prelude::*;

fn attrs() -> PoolAttrs {
    PoolAttrs {
        kind: PoolKind::Max,
        kernel: vec![2, 2],
        strides: vec![2, 2],
        dilations: vec![1, 1],
        pads_begin: vec![0, 0],
        pads_end: vec![0, 0],
    }
}

/// Bitwise equal, except that NaNs only need to be NaN.
fn assert_same(got: &Tensor, want: &Tensor, what: &str) {
    let (TensorData::F32(g), TensorData::F32(w)) = (&got.data, &want.data) else { panic!("{what}: not f32") };
    assert_eq!(got.shape, want.shape, "{what}");
    for (i, (a, b)) in g.iter().zip(w).enumerate() {
        assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{what}: element {i}: got {a}, reference {b}");
    }
}

fn check(batch: usize, channels: usize, out: [usize; 2], seed: u64, ties: bool, specials: usize) {
    let shape = vec![batch, channels, 2 * out[0], 2 * out[1]];
    let mut x = random_f32(&shape, seed, ties);
    if let TensorData::F32(v) = &mut x.data {
        let len = v.len();
        for s in 0..specials {
            let at = (seed as usize).wrapping_mul(31).wrapping_add(s * 17) % len;
            v[at] = [f32::NAN, -0.0, 0.0, f32::INFINITY][s % 4];
        }
    }
    let dy_shape = vec![batch, channels, out[0], out[1]];
    let dy = random_f32(&dy_shape, seed ^ 0x5eed, false);
    let op = Op::PoolGrad(attrs());
    let want = cnnc_ir::interp::eval(&op, &[&x, &dy], &[], &[]).expect("interpreter");
    let got = harness::run(op, &[&x, &dy], None, pool_grad::emit).expect("compiles and runs");
    assert_same(&got[0], &want[0], &format!("{shape:?} seed {seed} ties {ties} specials {specials}"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn pairs_match_the_interpreter(
        batch in 1usize..3,
        channels in 1usize..4,
        out in (1usize..8, 1usize..14),
        seed in any::<u64>(),
        ties in any::<bool>(),
        specials in 0usize..6,
    ) {
        check(batch, channels, [out.0, out.1], seed, ties, specials);
    }
}

#[test]
fn lenet_pooling() {
    check(2, 6, [14, 14], 3, false, 0);
    check(2, 6, [14, 14], 4, true, 5);
}
