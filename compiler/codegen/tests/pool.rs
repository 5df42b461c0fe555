//! Max and average pooling kernels against the reference interpreter over random
//! geometries (padding, ceil mode, dilation, NaN inputs), through the JIT on the host
//! and through a two-thread shared library for x86-64-v2 (f32x4 only), plus shapes
//! large enough to be split into channel tasks.

mod common;

use cnnc_codegen::TargetSpec;
use cnnc_ir::{Graph, Op, PoolAttrs, PoolKind, Tensor, TensorData, TensorType, interp};
use common::{Rng, cases, check_close, check_graph, random_tensor};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct PoolProblem {
    shape: [usize; 4],
    attrs: PoolAttrs,
    ceil: bool,
    nans: usize,
    seed: u64,
}

impl PoolProblem {
    /// ONNX's output extent, ceil mode dropping a last window that would start in the
    /// end padding.
    fn out_shape(&self) -> [usize; 4] {
        let a = &self.attrs;
        let mut out = self.shape;
        for d in 0..2 {
            let input = self.shape[2 + d];
            let span = a.dilations[d] * (a.kernel[d] - 1) + 1;
            let room = input + a.pads_begin[d] + a.pads_end[d] - span;
            let mut n = if self.ceil { room.div_ceil(a.strides[d]) + 1 } else { room / a.strides[d] + 1 };
            if self.ceil && (n - 1) * a.strides[d] >= input + a.pads_begin[d] {
                n -= 1;
            }
            out[2 + d] = n;
        }
        out
    }

    fn graph(&self) -> (Graph, Vec<Tensor>) {
        let mut g = Graph::new("pool");
        let x = g.add_input(TensorType::f32(self.shape), "x");
        let y = g
            .push_typed("pool", Op::Pool(self.attrs.clone()), &[x], TensorType::f32(self.out_shape()))
            .unwrap();
        g.outputs.push(y);
        let mut rng = Rng(self.seed | 1);
        let mut input = random_tensor(&mut rng, cnnc_ir::DType::F32, &self.shape, -4.0, 4.0);
        if let TensorData::F32(v) = &mut input.data {
            for _ in 0..self.nans {
                let at = rng.below(v.len() as u64) as usize;
                v[at] = f32::NAN;
            }
        }
        (g, vec![input])
    }
}

fn kind() -> impl Strategy<Value = PoolKind> {
    prop_oneof![
        2 => Just(PoolKind::Max),
        1 => any::<bool>().prop_map(|count_include_pad| PoolKind::Avg { count_include_pad }),
    ]
}

/// 2-D windows of every geometry the separable and one-pass paths take.
fn problem(max_extent: usize, max_channels: usize) -> impl Strategy<Value = PoolProblem> {
    (
        (1usize..3, 1..=max_channels),
        prop::collection::vec((1..=max_extent, 1usize..6, 1usize..4, 1usize..3, 0usize..3, 0usize..3), 2),
        kind(),
        any::<bool>(),
        prop_oneof![3 => Just(0usize), 1 => 1usize..4],
        any::<u64>(),
    )
        .prop_map(|((n, c), axes, kind, ceil, nans, seed)| {
            let mut shape = [n, c, 0, 0];
            let mut attrs = PoolAttrs {
                kind,
                kernel: vec![],
                strides: vec![],
                dilations: vec![],
                pads_begin: vec![],
                pads_end: vec![],
            };
            for (d, &(input, k, s, dil, pb, pe)) in axes.iter().enumerate() {
                let span = dil * (k - 1) + 1;
                let pe = if input + pb + pe < span { span - input - pb } else { pe };
                shape[2 + d] = input;
                attrs.kernel.push(k);
                attrs.strides.push(s);
                attrs.dilations.push(dil);
                attrs.pads_begin.push(pb);
                attrs.pads_end.push(pe);
            }
            PoolProblem { shape, attrs, ceil, nans, seed }
        })
}

fn square(kind: PoolKind, shape: [usize; 4], k: usize, s: usize, pad: usize, ceil: bool) -> PoolProblem {
    PoolProblem {
        shape,
        attrs: PoolAttrs {
            kind,
            kernel: vec![k; 2],
            strides: vec![s; 2],
            dilations: vec![1; 2],
            pads_begin: vec![pad; 2],
            pads_end: vec![pad; 2],
        },
        ceil,
        nans: 3,
        seed: 11,
    }
}

fn run_on(cpu: &str, g: &Graph, inputs: &[Tensor], threads: usize) -> Result<(), String> {
    let want = interp::run(g, inputs).map_err(|e| format!("interpreter: {e}"))?;
    let target = TargetSpec::parse(None, Some(cpu)).map_err(|e| e.to_string())?;
    let got = common::run_shared_library("pool", g, &target, threads, inputs)?;
    check_close(&got[0], &want[0])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(160), ..ProptestConfig::default() })]

    #[test]
    fn pools_on_the_host_match_interpreter(p in problem(40, 3)) {
        let (g, inputs) = p.graph();
        check_graph(&g, &inputs).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(24), ..ProptestConfig::default() })]

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn pools_on_x86_64_v2_match_interpreter(p in problem(40, 3)) {
        let (g, inputs) = p.graph();
        run_on("x86-64-v2", &g, &inputs, 2).map_err(TestCaseError::fail)?;
    }
}

/// The zoo's pooling layers, large enough to run as channel tasks on two threads.
#[test]
fn model_pools_split_into_channel_tasks_match_interpreter() {
    let max = PoolKind::Max;
    let avg = PoolKind::Avg { count_include_pad: false };
    for p in [
        square(max, [1, 64, 111, 111], 3, 2, 0, true),
        square(max, [1, 64, 112, 112], 3, 2, 1, false),
        square(max, [1, 192, 56, 56], 3, 2, 0, true),
        square(max, [1, 96, 28, 28], 3, 1, 1, false),
        square(avg, [1, 128, 56, 56], 2, 2, 0, false),
        square(PoolKind::Avg { count_include_pad: true }, [1, 96, 30, 30], 3, 1, 1, false),
    ] {
        let (g, inputs) = p.graph();
        run_on("native", &g, &inputs, 2).unwrap_or_else(|e| panic!("{p:?}: {e}"));
    }
}
