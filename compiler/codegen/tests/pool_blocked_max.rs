//! Blocked max pooling (`kernels::pool_blocked`) with NaNs in the input: the window max
//! (one `maxps` per tap, NaN from pairwise unordered compares) is NaN exactly where a
//! window holds one, as the interpreter's; random windows, strides, dilations, paddings,
//! batches. On an AVX2 host the pools run the machine code (`define_max_pool`), checked
//! to be chosen; one and two threads.

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

struct Case {
    n: usize,
    blocks: usize,
    h: usize,
    w: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    pad: [usize; 2],
}

/// The graph (None when the window does not fit) and an input with `nans` NaNs.
fn build(c: &Case, nans: usize, seed: u64) -> Option<(Graph, cnnc_ir::Tensor)> {
    let ch = 8 * c.blocks;
    let out = |d: usize, size: usize| {
        let span = c.dilation[d] * (c.kernel[d] - 1) + 1;
        (size + 2 * c.pad[d]).checked_sub(span).map(|v| v / c.stride[d] + 1)
    };
    let (oh, ow) = (out(0, c.h)?, out(1, c.w)?);
    let mut g = Graph::new("max_pool");
    let x = g.add_input(TensorType::f32(vec![c.n, ch, c.h, c.w]), "x");
    let xb = reorder(&mut g, x, Layout::Plain, B8);
    let attrs = PoolAttrs {
        kind: PoolKind::Max,
        kernel: c.kernel.to_vec(),
        strides: c.stride.to_vec(),
        dilations: c.dilation.to_vec(),
        pads_begin: c.pad.to_vec(),
        pads_end: c.pad.to_vec(),
    };
    let y = g.push_typed("pool", Op::Pool(attrs), &[xb], TensorType::f32(vec![c.n, ch, oh, ow])).unwrap();
    let node = g.nodes.last_mut().unwrap();
    node.schedule.layout_in = B8;
    node.schedule.layout_out = B8;
    let out = reorder(&mut g, y, B8, Layout::Plain);
    g.outputs.push(out);
    let mut rng = Rng(seed);
    let mut input = random_tensor(&mut rng, DType::F32, &[c.n, ch, c.h, c.w], -2.0, 2.0);
    if let TensorData::F32(v) = &mut input.data {
        let n = v.len();
        for i in 0..nans {
            v[(seed as usize).wrapping_mul(31).wrapping_add(i * 977) % n] = f32::NAN;
        }
    }
    Some((g, input))
}

fn host_runs_machine_code(g: &Graph) -> bool {
    let node = g.nodes.iter().find(|n| matches!(n.op, Op::Pool(_))).unwrap();
    let target = cnnc_codegen::TargetSpec::host();
    let machine = matches!(
        cnnc_codegen::kernels::conv_blocked::plan(g, node, &target),
        Ok(Some(cnnc_codegen::kernels::conv_blocked::BlockedConvPlan::MaxPool(_)))
    );
    assert_eq!(machine, cnnc_codegen::kernels::conv_blocked::runs_on(&target), "the machine-code pool runs where AVX2 does");
    machine
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(64), ..ProptestConfig::default() })]

    #[test]
    fn blocked_max_pool_with_nans_matches_interpreter(
        n in 1usize..3,
        blocks in 1usize..3,
        h in 1usize..14,
        w in 1usize..31,
        kernel in (1usize..5, 1usize..5),
        stride in (1usize..3, 1usize..3),
        dilation in prop::sample::select(vec![(1usize, 1usize), (1, 1), (2, 1), (1, 2)]),
        pad in (0usize..3, 0usize..3),
        nans in 0usize..6,
        seed in 1u64..u64::MAX,
    ) {
        // ONNX: a pad smaller than the kernel.
        let pad = [pad.0.min(kernel.0 - 1), pad.1.min(kernel.1 - 1)];
        let case = Case {
            n,
            blocks,
            h,
            w,
            kernel: [kernel.0, kernel.1],
            stride: [stride.0, stride.1],
            dilation: [dilation.0, dilation.1],
            pad,
        };
        let Some((g, input)) = build(&case, nans, seed) else { return Ok(()) };
        host_runs_machine_code(&g);
        check_graph(&g, &[input]).map_err(TestCaseError::fail)?;
    }
}

/// SqueezeNet-1.1's pools (3x3, stride 2, no padding: 111 -> 55, 55 -> 27, 27 -> 13)
/// and ResNet's (3x3, stride 2, pad 1), through a one- and a two-thread session.
#[test]
fn model_pools_with_threads() {
    let target = cnnc_codegen::TargetSpec::host();
    for (blocks, hw, pad) in [(8, 111, 0), (16, 55, 0), (32, 27, 0), (8, 112, 1)] {
        let case = Case { n: 1, blocks, h: hw, w: hw, kernel: [3, 3], stride: [2, 2], dilation: [1, 1], pad: [pad, pad] };
        let (g, input) = build(&case, 3, 17).unwrap();
        host_runs_machine_code(&g);
        let want = cnnc_ir::interp::run(&g, std::slice::from_ref(&input)).unwrap();
        for threads in [1, 2] {
            let got = common::run_shared_library("pool_blocked_max", &g, &target, threads, std::slice::from_ref(&input)).unwrap();
            common::check_close(&got[0], &want[0]).unwrap_or_else(|e| panic!("{hw}x{hw} pad {pad}, {threads} threads: {e}"));
        }
    }
}
