//! Blocked max pooling (`kernels::pool_blocked`) with NaNs in the input: the window max
//! (one `maxps` per tap, NaN from pairwise unordered compares) is NaN exactly where a
//! window holds one, as the interpreter's; random windows, strides, paddings.

mod common;

use cnnc_ir::{DType, Graph, Layout, Op, PoolAttrs, PoolKind, TensorData, TensorType, ValueId};
use common::{Rng, check_graph, random_tensor};
use proptest::prelude::*;

const B8: Layout = Layout::Blocked { block: 8 };

fn reorder(g: &mut Graph, x: ValueId, from: Layout, to: Layout) -> ValueId {
    let y = g.push1("reorder", Op::Reorder, &[x]).unwrap();
    let node = g.nodes.last_mut().unwrap();
    node.schedule.layout_in = from;
    node.schedule.layout_out = to;
    y
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(64), ..ProptestConfig::default() })]

    #[test]
    fn blocked_max_pool_with_nans_matches_interpreter(
        blocks in 1usize..3,
        h in 3usize..14,
        w in 3usize..14,
        kernel in 1usize..4,
        stride in 1usize..3,
        pad in 0usize..2,
        nans in 0usize..6,
        seed in 1u64..u64::MAX,
    ) {
        let pad = pad.min(kernel - 1);
        let c = 8 * blocks;
        let (oh, ow) = ((h + 2 * pad - kernel) / stride + 1, (w + 2 * pad - kernel) / stride + 1);
        let mut g = Graph::new("max_pool");
        let x = g.add_input(TensorType::f32(vec![1, c, h, w]), "x");
        let xb = reorder(&mut g, x, Layout::Plain, B8);
        let attrs = PoolAttrs {
            kind: PoolKind::Max,
            kernel: vec![kernel; 2],
            strides: vec![stride; 2],
            dilations: vec![1, 1],
            pads_begin: vec![pad; 2],
            pads_end: vec![pad; 2],
        };
        let y = g.push_typed("pool", Op::Pool(attrs), &[xb], TensorType::f32(vec![1, c, oh, ow])).unwrap();
        let node = g.nodes.last_mut().unwrap();
        node.schedule.layout_in = B8;
        node.schedule.layout_out = B8;
        let out = reorder(&mut g, y, B8, Layout::Plain);
        g.outputs.push(out);
        let mut rng = Rng(seed);
        let mut input = random_tensor(&mut rng, DType::F32, &[1, c, h, w], -2.0, 2.0);
        if let TensorData::F32(v) = &mut input.data {
            let n = v.len();
            for i in 0..nans {
                v[(seed as usize).wrapping_mul(31).wrapping_add(i * 977) % n] = f32::NAN;
            }
        }
        check_graph(&g, &[input]).map_err(TestCaseError::fail)?;
    }
}
