//! Compute kernels (conv, conv_transpose, matmul, pool, reduce, arg_reduce) run
//! through a one-node JIT and compared against naive references.
//!
//! Throughput: `cargo test -p cnnc-codegen --release --test compute_kernels -- --ignored --nocapture`.

#[path = "compute_kernels/harness.rs"]
mod harness;
#[path = "compute_kernels/reference.rs"]
mod reference;

use cnnc_codegen::kernels::{conv, conv_transpose, matmul, pool, reduce};
use cnnc_ir::{
    ArgKind, ConvGeometry, DType, Op, PoolAttrs, PoolKind, ReduceKind, Tensor, TensorType,
};
use harness::{assert_close, random_f32, random_int};
use proptest::prelude::*;

/// `cases` per property unless PROPTEST_CASES asks for another number (soak runs).
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    }
}

/// Runs `op` through the kernel and checks it against both the naive reference of
/// this file and the IR interpreter.
fn check(
    op: Op,
    inputs: &[&Tensor],
    declared: Option<Vec<TensorType>>,
    emitter: harness::Emitter,
    naive: &Tensor,
    what: &str,
) {
    let got = harness::run(op.clone(), inputs, declared, emitter)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_close(&got[0], naive, &format!("{what} (naive reference)"));
    let types: Vec<TensorType> = got.iter().map(Tensor::ty).collect();
    let interp = cnnc_ir::interp::eval(&op, inputs, &types, &[])
        .unwrap_or_else(|e| panic!("{what}: interpreter: {e}"));
    assert_close(&got[0], &interp[0], &format!("{what} (interpreter)"));
}

// ---------------------------------------------------------------- conv

#[derive(Clone, Debug)]
struct ConvCase {
    batch: usize,
    groups: usize,
    in_per_group: usize,
    out_per_group: usize,
    input: Vec<usize>,
    kernel: Vec<usize>,
    strides: Vec<usize>,
    dilations: Vec<usize>,
    pads_begin: Vec<usize>,
    pads_end: Vec<usize>,
    bias: bool,
    seed: u64,
}

impl ConvCase {
    fn geometry(&self) -> ConvGeometry {
        ConvGeometry {
            strides: self.strides.clone(),
            dilations: self.dilations.clone(),
            pads_begin: self.pads_begin.clone(),
            pads_end: self.pads_end.clone(),
            groups: self.groups,
        }
    }

    fn x_shape(&self) -> Vec<usize> {
        let mut s = vec![self.batch, self.groups * self.in_per_group];
        s.extend(&self.input);
        s
    }

    /// Makes every axis's padded input at least one window long.
    fn fit_pads(mut self) -> Self {
        for d in 0..self.input.len() {
            let span = self.dilations[d] * (self.kernel[d] - 1) + 1;
            let padded = self.input[d] + self.pads_begin[d] + self.pads_end[d];
            if padded < span {
                self.pads_end[d] += span - padded;
            }
        }
        self
    }
}

/// (groups, in channels per group, out channels per group): dense, grouped, depthwise.
fn channel_layout() -> impl Strategy<Value = (usize, usize, usize)> {
    prop_oneof![
        (Just(1usize), 1usize..7, 1usize..10),
        (2usize..4, 1usize..4, 1usize..6),
        (1usize..9, Just(1usize), 1usize..3),
    ]
}

fn conv_case() -> impl Strategy<Value = ConvCase> {
    (1usize..4).prop_flat_map(|rank| {
        let max_in = [0, 14, 10, 6][rank];
        let max_k = [0, 5, 4, 3][rank];
        (
            1usize..3,
            channel_layout(),
            prop::collection::vec(1usize..max_in, rank),
            prop::collection::vec(1usize..max_k, rank),
            prop::collection::vec(1usize..4, rank),
            prop::collection::vec(1usize..3, rank),
            prop::collection::vec(0usize..4, rank),
            prop::collection::vec(0usize..4, rank),
            any::<bool>(),
            any::<u64>(),
        )
            .prop_map(
                |(
                    batch,
                    (groups, cg, mg),
                    input,
                    kernel,
                    strides,
                    dilations,
                    pb,
                    pe,
                    bias,
                    seed,
                )| {
                    ConvCase {
                        batch,
                        groups,
                        in_per_group: cg,
                        out_per_group: mg,
                        input,
                        kernel,
                        strides,
                        dilations,
                        pads_begin: pb,
                        pads_end: pe,
                        bias,
                        seed,
                    }
                    .fit_pads()
                },
            )
    })
}

fn check_conv(case: &ConvCase) {
    let x = random_f32(&case.x_shape(), case.seed, false);
    let mut w_shape = vec![case.groups * case.out_per_group, case.in_per_group];
    w_shape.extend(&case.kernel);
    let w = random_f32(&w_shape, case.seed ^ 1, false);
    let bias = case
        .bias
        .then(|| random_f32(&[w_shape[0]], case.seed ^ 2, false));
    let mut inputs = vec![&x, &w];
    inputs.extend(bias.as_ref());
    let out =
        cnnc_ir::infer::output_types(&Op::Conv(case.geometry()), &[&x.ty(), &w.ty()], &[], None)
            .expect("conv types");
    let want = reference::conv(&x, &w, bias.as_ref(), &case.geometry(), &out[0].shape);
    check(
        Op::Conv(case.geometry()),
        &inputs,
        None,
        conv::emit,
        &want,
        &format!("{case:?}"),
    );
}

proptest! {
    #![proptest_config(config(96))]
    #[test]
    fn conv_matches_reference(case in conv_case()) {
        check_conv(&case);
    }
}

fn conv2d(
    c: usize,
    m: usize,
    hw: usize,
    k: usize,
    stride: usize,
    pad: (usize, usize),
    groups: usize,
) -> ConvCase {
    ConvCase {
        batch: 1,
        groups,
        in_per_group: c / groups,
        out_per_group: m / groups,
        input: vec![hw, hw + 3],
        kernel: vec![k, k],
        strides: vec![stride; 2],
        dilations: vec![1; 2],
        pads_begin: vec![pad.0; 2],
        pads_end: vec![pad.1; 2],
        bias: true,
        seed: 7,
    }
}

#[test]
fn conv_named_paddings() {
    // valid, same, full, asymmetric
    for pad in [(0, 0), (1, 1), (2, 2), (0, 2), (2, 1)] {
        check_conv(&conv2d(5, 9, 11, 3, 1, pad, 1));
        check_conv(&conv2d(5, 9, 11, 3, 2, pad, 1));
    }
}

#[test]
fn conv_pointwise_and_depthwise() {
    check_conv(&conv2d(16, 24, 7, 1, 1, (0, 0), 1));
    check_conv(&conv2d(16, 16, 9, 3, 1, (1, 1), 16));
    check_conv(&conv2d(16, 32, 9, 3, 2, (1, 1), 16));
    check_conv(&conv2d(12, 12, 17, 5, 1, (2, 2), 12));
}

#[test]
fn conv_without_bias_and_large_kernel() {
    let mut c = conv2d(3, 5, 20, 11, 4, (2, 2), 1);
    c.bias = false;
    check_conv(&c);
    let mut c = conv2d(3, 5, 6, 3, 1, (0, 0), 1);
    c.kernel = vec![1, 12];
    c.pads_end = vec![0, 4];
    check_conv(&c);
}

#[test]
fn conv_refuses_pathological_padding() {
    // Every output of a 600-tap kernel over 599 padding on both sides has its own tap
    // range: the kernel must refuse (an error, not minutes of compilation).
    let x = TensorType::f32(vec![1, 1, 600]);
    let w = TensorType::f32(vec![1, 1, 600]);
    let g = ConvGeometry {
        strides: vec![1],
        dilations: vec![1],
        pads_begin: vec![599],
        pads_end: vec![599],
        groups: 1,
    };
    let started = std::time::Instant::now();
    match harness::compile(Op::Conv(g), &[x, w], None, conv::emit) {
        Err(e) => assert!(e.contains("not supported"), "{e}"),
        Ok(_) => panic!("pathological conv compiled"),
    }
    assert!(
        started.elapsed().as_secs() < 20,
        "refusal took {:?}",
        started.elapsed()
    );
}

#[test]
fn conv_rejects_integer_input() {
    let x = Tensor::new(vec![1, 1, 3], cnnc_ir::TensorData::I64(vec![1, 2, 3]));
    let w = Tensor::new(vec![1, 1, 1], cnnc_ir::TensorData::I64(vec![1]));
    let g = ConvGeometry {
        strides: vec![1],
        dilations: vec![1],
        pads_begin: vec![0],
        pads_end: vec![0],
        groups: 1,
    };
    let err = harness::run(Op::Conv(g), &[&x, &w], None, conv::emit).unwrap_err();
    assert!(err.contains("i64"), "{err}");
}

// ---------------------------------------------------------------- matmul

fn check_matmul(a_shape: &[usize], b_shape: &[usize], dtype: DType, seed: u64) {
    let (a, b) = match dtype {
        DType::F32 => (
            random_f32(a_shape, seed, false),
            random_f32(b_shape, seed ^ 5, false),
        ),
        _ => (
            random_int(a_shape, seed, dtype),
            random_int(b_shape, seed ^ 5, dtype),
        ),
    };
    let want = reference::matmul(&a, &b);
    check(
        Op::MatMul,
        &[&a, &b],
        None,
        matmul::emit,
        &want,
        &format!("{a_shape:?} x {b_shape:?} {dtype}"),
    );
}

/// Operand shapes with batch axes that broadcast against each other.
fn matmul_shapes() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    (
        1usize..14,
        0usize..12,
        1usize..21,
        prop::collection::vec((1usize..4, 0usize..3), 0..3),
        0usize..3,
        0usize..3,
    )
        .prop_map(|(m, k, n, batch, drop_a, drop_b)| {
            // Each batch axis: extent e; operands see e or 1 (broadcast) by the flag.
            let mut a: Vec<usize> = batch
                .iter()
                .map(|&(e, f)| if f == 1 { 1 } else { e })
                .collect();
            let mut b: Vec<usize> = batch
                .iter()
                .map(|&(e, f)| if f == 2 { 1 } else { e })
                .collect();
            a.drain(..drop_a.min(a.len()));
            b.drain(..drop_b.min(b.len()));
            a.extend([m, k]);
            b.extend([k, n]);
            (a, b)
        })
}

proptest! {
    #![proptest_config(config(96))]
    #[test]
    fn matmul_f32_matches_reference((a, b) in matmul_shapes(), seed in any::<u64>()) {
        check_matmul(&a, &b, DType::F32, seed);
    }

    #[test]
    fn matmul_int_matches_reference((a, b) in matmul_shapes(), seed in any::<u64>(), wide in any::<bool>()) {
        check_matmul(&a, &b, if wide { DType::I64 } else { DType::I32 }, seed);
    }
}

#[test]
fn matmul_batch_folding_and_edges() {
    check_matmul(&[3, 5, 7], &[7, 9], DType::F32, 1);
    check_matmul(&[2, 3, 5, 7], &[1, 7, 9], DType::F32, 2);
    check_matmul(&[1, 4, 7], &[3, 7, 9], DType::F32, 3);
    check_matmul(&[33, 65], &[65, 17], DType::F32, 4);
    check_matmul(&[4, 0], &[0, 8], DType::F32, 5);
    check_matmul(&[0, 3], &[3, 8], DType::F32, 6);
    // Row remainders of every height, wide column tiles and their leftovers.
    for m in 1..=7 {
        check_matmul(&[m, 19], &[19, 61], DType::F32, 7 + m as u64);
    }
}

#[test]
fn matmul_rejects_bool() {
    let a = Tensor::new(vec![1, 1], cnnc_ir::TensorData::Bool(vec![true]));
    let types = [a.ty(), a.ty()];
    let declared = Some(vec![TensorType::new(DType::Bool, vec![1, 1])]);
    match harness::compile(Op::MatMul, &types, declared, matmul::emit) {
        Err(e) => assert!(e.contains("bool"), "{e}"),
        Ok(_) => panic!("bool matmul compiled"),
    }
}

// ---------------------------------------------------------------- conv_transpose

#[derive(Clone, Debug)]
struct TransposeCase {
    conv: ConvCase,
    output_padding: Vec<usize>,
}

impl TransposeCase {
    fn out_shape(&self) -> Option<Vec<usize>> {
        let c = &self.conv;
        let mut s = vec![c.batch, c.groups * c.out_per_group];
        for d in 0..c.input.len() {
            let full = (c.input[d] - 1) * c.strides[d]
                + c.dilations[d] * (c.kernel[d] - 1)
                + 1
                + self.output_padding[d];
            let out = full
                .checked_sub(c.pads_begin[d] + c.pads_end[d])
                .filter(|&o| o > 0)?;
            s.push(out);
        }
        Some(s)
    }
}

fn transpose_case() -> impl Strategy<Value = TransposeCase> {
    (conv_case(), prop::collection::vec(0usize..3, 3)).prop_map(|(mut conv, pad)| {
        let rank = conv.input.len();
        let output_padding: Vec<usize> = (0..rank)
            .map(|d| pad[d] % conv.strides[d].max(conv.dilations[d]))
            .collect();
        let mut case = TransposeCase {
            conv: conv.clone(),
            output_padding,
        };
        if case.out_shape().is_none() {
            conv.pads_begin = vec![0; rank];
            conv.pads_end = vec![0; rank];
            case.conv = conv;
        }
        case
    })
}

fn check_conv_transpose(case: &TransposeCase) {
    let c = &case.conv;
    let x = random_f32(&c.x_shape(), c.seed, false);
    let mut w_shape = vec![c.groups * c.in_per_group, c.out_per_group];
    w_shape.extend(&c.kernel);
    let w = random_f32(&w_shape, c.seed ^ 1, false);
    let bias = c
        .bias
        .then(|| random_f32(&[c.groups * c.out_per_group], c.seed ^ 2, false));
    let mut inputs = vec![&x, &w];
    inputs.extend(bias.as_ref());
    let out = case.out_shape().expect("positive output extent");
    let want = reference::conv_transpose(&x, &w, bias.as_ref(), &c.geometry(), &out);
    let op = Op::ConvTranspose(c.geometry());
    check(
        op,
        &inputs,
        Some(vec![TensorType::f32(out)]),
        conv_transpose::emit,
        &want,
        &format!("{case:?}"),
    );
}

proptest! {
    #![proptest_config(config(64))]
    #[test]
    fn conv_transpose_matches_reference(case in transpose_case()) {
        check_conv_transpose(&case);
    }
}

#[test]
fn conv_transpose_upsampling() {
    let mut conv = conv2d(8, 6, 7, 4, 2, (1, 1), 1);
    conv.in_per_group = 8;
    conv.out_per_group = 6;
    check_conv_transpose(&TransposeCase {
        conv: conv.clone(),
        output_padding: vec![0, 1],
    });
    conv.groups = 2;
    conv.in_per_group = 4;
    conv.out_per_group = 3;
    conv.kernel = vec![3, 3];
    conv.strides = vec![3, 1];
    check_conv_transpose(&TransposeCase {
        conv,
        output_padding: vec![2, 0],
    });
}

// ---------------------------------------------------------------- pool

#[derive(Clone, Debug)]
struct PoolCase {
    shape: Vec<usize>,
    attrs: PoolAttrs,
    ceil: bool,
    seed: u64,
}

impl PoolCase {
    fn out_shape(&self) -> Vec<usize> {
        let a = &self.attrs;
        let mut s = self.shape[..2].to_vec();
        for d in 0..a.kernel.len() {
            let input = self.shape[2 + d];
            let span = a.dilations[d] * (a.kernel[d] - 1) + 1;
            let room = input + a.pads_begin[d] + a.pads_end[d] - span;
            let mut out = if self.ceil {
                room.div_ceil(a.strides[d]) + 1
            } else {
                room / a.strides[d] + 1
            };
            // Ceil mode: the last window must start inside the input or the begin padding.
            if self.ceil && (out - 1) * a.strides[d] >= input + a.pads_begin[d] {
                out -= 1;
            }
            s.push(out);
        }
        s
    }
}

fn pool_case() -> impl Strategy<Value = PoolCase> {
    (1usize..4).prop_flat_map(|rank| {
        let max_in = [0, 20, 12, 7][rank];
        (
            (1usize..3, 1usize..4),
            prop::collection::vec(
                (
                    1usize..max_in,
                    1usize..5,
                    1usize..4,
                    1usize..3,
                    0usize..3,
                    0usize..3,
                ),
                rank,
            ),
            prop_oneof![
                Just(PoolKind::Max),
                any::<bool>().prop_map(|c| PoolKind::Avg {
                    count_include_pad: c
                })
            ],
            any::<bool>(),
            any::<u64>(),
        )
            .prop_map(|((n, c), axes, kind, ceil, seed)| {
                let mut shape = vec![n, c];
                let mut attrs = PoolAttrs {
                    kind,
                    kernel: vec![],
                    strides: vec![],
                    dilations: vec![],
                    pads_begin: vec![],
                    pads_end: vec![],
                };
                for (input, k, s, d, pb, pe) in axes {
                    let span = d * (k - 1) + 1;
                    let pe = if input + pb + pe < span {
                        span - input - pb
                    } else {
                        pe
                    };
                    shape.push(input);
                    attrs.kernel.push(k);
                    attrs.strides.push(s);
                    attrs.dilations.push(d);
                    attrs.pads_begin.push(pb);
                    attrs.pads_end.push(pe);
                }
                PoolCase {
                    shape,
                    attrs,
                    ceil,
                    seed,
                }
            })
    })
}

fn check_pool(case: &PoolCase) {
    let x = random_f32(&case.shape, case.seed, false);
    let out = case.out_shape();
    let want = reference::pool(&x, &case.attrs, &out);
    check(
        Op::Pool(case.attrs.clone()),
        &[&x],
        Some(vec![TensorType::f32(out)]),
        pool::emit,
        &want,
        &format!("{case:?}"),
    );
}

proptest! {
    #![proptest_config(config(96))]
    #[test]
    fn pool_matches_reference(case in pool_case()) {
        check_pool(&case);
    }
}

fn pool2d(
    kind: PoolKind,
    hw: usize,
    k: usize,
    s: usize,
    pad: (usize, usize),
    ceil: bool,
) -> PoolCase {
    PoolCase {
        shape: vec![1, 3, hw, hw + 5],
        attrs: PoolAttrs {
            kind,
            kernel: vec![k; 2],
            strides: vec![s; 2],
            dilations: vec![1; 2],
            pads_begin: vec![pad.0; 2],
            pads_end: vec![pad.1; 2],
        },
        ceil,
        seed: 3,
    }
}

#[test]
fn pool_common_shapes() {
    for kind in [
        PoolKind::Max,
        PoolKind::Avg {
            count_include_pad: false,
        },
        PoolKind::Avg {
            count_include_pad: true,
        },
    ] {
        check_pool(&pool2d(kind, 112, 3, 2, (1, 1), false));
        check_pool(&pool2d(kind, 13, 3, 2, (0, 0), true));
        check_pool(&pool2d(kind, 14, 2, 2, (0, 0), false));
        check_pool(&pool2d(kind, 7, 7, 1, (0, 0), false));
        check_pool(&pool2d(kind, 9, 3, 1, (1, 1), false));
        check_pool(&pool2d(kind, 10, 3, 2, (0, 1), true));
    }
}

#[test]
fn max_pool_propagates_nan() {
    let mut x = random_f32(&[1, 1, 6, 9], 4, false);
    if let cnnc_ir::TensorData::F32(v) = &mut x.data {
        v[10] = f32::NAN;
        v[40] = f32::NAN;
    }
    let case = pool2d(PoolKind::Max, 6, 3, 1, (1, 1), false);
    let mut case = case;
    case.shape = vec![1, 1, 6, 9];
    let out = case.out_shape();
    let want = reference::pool(&x, &case.attrs, &out);
    check(
        Op::Pool(case.attrs.clone()),
        &[&x],
        Some(vec![TensorType::f32(out)]),
        pool::emit,
        &want,
        "nan pool",
    );
}

// ---------------------------------------------------------------- reduce

fn reduce_kind() -> impl Strategy<Value = ReduceKind> {
    prop_oneof![
        Just(ReduceKind::Sum),
        Just(ReduceKind::Mean),
        Just(ReduceKind::Max),
        Just(ReduceKind::Min),
        Just(ReduceKind::Prod)
    ]
}

fn data(shape: &[usize], dtype: DType, seed: u64, ties: bool) -> Tensor {
    match dtype {
        DType::F32 => random_f32(shape, seed, ties),
        _ => random_int(shape, seed, dtype),
    }
}

fn check_reduce(shape: &[usize], axes: &[usize], kind: ReduceKind, dtype: DType, seed: u64) {
    let x = data(shape, dtype, seed, false);
    let want = reference::reduce(&x, kind, axes);
    let op = Op::Reduce {
        kind,
        axes: axes.to_vec(),
    };
    check(
        op,
        &[&x],
        None,
        reduce::emit_reduce,
        &want,
        &format!("{kind:?} {dtype} {shape:?} over {axes:?}"),
    );
}

proptest! {
    #![proptest_config(config(128))]
    #[test]
    fn reduce_matches_reference(
        shape in prop::collection::vec(0usize..7, 1..5),
        mask in any::<u8>(),
        kind in reduce_kind(),
        dtype in prop_oneof![Just(DType::F32), Just(DType::F32), Just(DType::I32), Just(DType::I64)],
        seed in any::<u64>(),
    ) {
        let axes: Vec<usize> = (0..shape.len()).filter(|d| mask >> d & 1 == 1).collect();
        check_reduce(&shape, &axes, kind, dtype, seed);
    }
}

proptest! {
    #![proptest_config(config(64))]
    /// Long contiguous reduced runs (global pools): the wide accumulators, their tails
    /// and NaN anywhere in the run.
    #[test]
    fn reduce_long_runs_match_reference(
        outer in 1usize..4,
        run in 1usize..200,
        kind in reduce_kind(),
        nan_at in prop::option::of(any::<prop::sample::Index>()),
        seed in any::<u64>(),
    ) {
        let mut x = random_f32(&[outer, run], seed, false);
        if let (ReduceKind::Prod, cnnc_ir::TensorData::F32(v)) = (kind, &mut x.data) {
            // Products of up to 200 values of magnitude < 1 underflow into denormals, where
            // a different multiplication order legitimately loses most bits: keep them near 1.
            v.iter_mut().for_each(|e| *e = 1.0 + *e / 64.0);
        }
        if let (Some(at), cnnc_ir::TensorData::F32(v)) = (nan_at, &mut x.data) {
            let i = at.index(v.len());
            v[i] = f32::NAN;
        }
        let want = reference::reduce(&x, kind, &[1]);
        let op = Op::Reduce { kind, axes: vec![1] };
        check(op, &[&x], None, reduce::emit_reduce, &want, &format!("{kind:?} [{outer}, {run}] nan {nan_at:?}"));
    }
}

#[test]
fn reduce_common_shapes() {
    for kind in [
        ReduceKind::Sum,
        ReduceKind::Mean,
        ReduceKind::Max,
        ReduceKind::Min,
    ] {
        check_reduce(&[2, 64, 7, 7], &[2, 3], kind, DType::F32, 1);
        check_reduce(&[3, 10, 37], &[2], kind, DType::F32, 2);
        check_reduce(&[3, 10, 37], &[1], kind, DType::F32, 3);
        check_reduce(&[3, 10, 37], &[0, 2], kind, DType::F32, 4);
        check_reduce(&[3, 10, 37], &[], kind, DType::F32, 5);
        check_reduce(&[4, 0, 5], &[1], kind, DType::F32, 6);
        check_reduce(&[4, 0, 5], &[1], kind, DType::I64, 6);
        check_reduce(&[1, 1, 1], &[0, 2], kind, DType::I32, 7);
        // Runs of 8192+ elements read as four quarters side by side, with a tail.
        check_reduce(&[2, 3, 91, 91], &[0, 2, 3], kind, DType::F32, 8);
        check_reduce(&[2, 8192 + 16 * 5 + 7], &[1], kind, DType::F32, 9);
        check_reduce(&[2, 3, 8192], &[2], kind, DType::I32, 10);
    }
}

#[test]
fn reduce_max_propagates_nan() {
    let mut x = random_f32(&[3, 13], 4, false);
    if let cnnc_ir::TensorData::F32(v) = &mut x.data {
        v[5] = f32::NAN;
        v[13 + 12] = f32::NAN;
    }
    for axes in [vec![1], vec![0]] {
        for kind in [ReduceKind::Max, ReduceKind::Min] {
            let want = reference::reduce(&x, kind, &axes);
            check(
                Op::Reduce {
                    kind,
                    axes: axes.clone(),
                },
                &[&x],
                None,
                reduce::emit_reduce,
                &want,
                "nan reduce",
            );
        }
    }
}

fn check_arg(x: &Tensor, axis: usize, kind: ArgKind, last: bool) {
    let want = reference::arg_reduce(x, kind, axis, last);
    let op = Op::ArgReduce {
        kind,
        axis,
        select_last_index: last,
    };
    check(
        op,
        &[x],
        None,
        reduce::emit_arg_reduce,
        &want,
        &format!("{kind:?} last={last} {:?} axis {axis}", x.shape),
    );
}

proptest! {
    #![proptest_config(config(128))]
    #[test]
    fn arg_reduce_matches_reference(
        shape in prop::collection::vec(1usize..7, 1..5),
        axis_pick in any::<usize>(),
        max in any::<bool>(),
        last in any::<bool>(),
        ties in any::<bool>(),
        dtype in prop_oneof![Just(DType::F32), Just(DType::F32), Just(DType::I32), Just(DType::I64)],
        seed in any::<u64>(),
    ) {
        let axis = axis_pick % shape.len();
        let x = if dtype == DType::F32 { random_f32(&shape, seed, ties) } else { data(&shape, dtype, seed, ties) };
        check_arg(&x, axis, if max { ArgKind::Max } else { ArgKind::Min }, last);
    }
}

#[test]
fn arg_reduce_nan_and_ties() {
    let mut x = random_f32(&[5, 9], 8, true);
    if let cnnc_ir::TensorData::F32(v) = &mut x.data {
        v[9 + 2] = f32::NAN;
        v[27 + 2] = f32::NAN;
        v[4] = f32::NAN;
    }
    for kind in [ArgKind::Max, ArgKind::Min] {
        for last in [false, true] {
            check_arg(&x, 0, kind, last);
            check_arg(&x, 1, kind, last);
        }
    }
}

// ---------------------------------------------------------------- throughput

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}

unsafe extern "C" {
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
}

/// CPU time of this thread: the machine is shared, and wall time would count the
/// slices other processes get.
fn thread_seconds() -> f64 {
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.sec as f64 + ts.nsec as f64 * 1e-9
}

fn time_best(kernel: &harness::Kernel, table: &[*mut u8], reps: usize) -> f64 {
    kernel.call(table);
    (0..reps)
        .map(|_| {
            let t = thread_seconds();
            kernel.call(table);
            thread_seconds() - t
        })
        .fold(f64::INFINITY, f64::min)
}

fn buffers(types: &[TensorType]) -> Vec<Vec<u8>> {
    types
        .iter()
        .map(|t| random_f32(&t.shape, 9, false).data.to_le_bytes())
        .collect()
}

/// Compiles `op`, runs it on random buffers and prints the best time and rate.
fn bench(
    name: &str,
    op: Op,
    inputs: &[TensorType],
    declared: Option<Vec<TensorType>>,
    emitter: harness::Emitter,
    flops: f64,
) {
    let started = std::time::Instant::now();
    let kernel = harness::compile(op, inputs, declared, emitter).unwrap();
    let compile_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut types = inputs.to_vec();
    types.extend(kernel.output_types.clone());
    let mut bufs = buffers(&types);
    let table: Vec<*mut u8> = bufs.iter_mut().map(|v| v.as_mut_ptr()).collect();
    let secs = time_best(&kernel, &table, 20);
    println!(
        "{name}: {:.3} ms, {:.1} GFLOP/s (compiled in {compile_ms:.1} ms)",
        secs * 1e3,
        flops / secs / 1e9
    );
}

fn conv_bench(name: &str, c: usize, m: usize, hw: usize, k: usize, stride: usize, groups: usize) {
    let pad = k / 2;
    let case = conv2d(c, m, hw, k, stride, (pad, pad), groups);
    let x = TensorType::f32(vec![1, c, hw, hw]);
    let w = TensorType::f32(vec![m, c / groups, k, k]);
    let b = TensorType::f32(vec![m]);
    let out = (hw + 2 * pad - k) / stride + 1;
    let flops = 2.0 * (m * (c / groups) * k * k * out * out) as f64;
    bench(
        name,
        Op::Conv(case.geometry()),
        &[x, w, b],
        None,
        conv::emit,
        flops,
    );
}

#[test]
#[ignore]
fn throughput() {
    conv_bench("conv 3x3 64->64 56x56", 64, 64, 56, 3, 1, 1);
    let a = TensorType::f32(vec![256, 256]);
    bench(
        "matmul 256x256x256",
        Op::MatMul,
        &[a.clone(), a],
        None,
        matmul::emit,
        2.0 * 256f64.powi(3),
    );
    let (x, w) = (
        TensorType::f32(vec![1, 512]),
        TensorType::f32(vec![512, 1000]),
    );
    bench(
        "matmul 1x512x1000 (classifier)",
        Op::MatMul,
        &[x, w],
        None,
        matmul::emit,
        2.0 * 512.0 * 1000.0,
    );
    conv_bench("conv 1x1 64->256 56x56", 64, 256, 56, 1, 1, 1);
    conv_bench("conv 3x3 256->256 14x14", 256, 256, 14, 3, 1, 1);
    conv_bench("conv 3x3 512->512 7x7", 512, 512, 7, 3, 1, 1);
    conv_bench("conv 7x7/2 3->64 224x224", 3, 64, 224, 7, 2, 1);
    conv_bench("conv 3x3/2 128->128 28x28", 128, 128, 28, 3, 2, 1);
    conv_bench("depthwise 3x3 144 56x56", 144, 144, 56, 3, 1, 144);
    conv_bench("depthwise 3x3/2 144 56x56", 144, 144, 56, 3, 2, 144);
    let g = ConvGeometry {
        strides: vec![2, 2],
        dilations: vec![1, 1],
        pads_begin: vec![1, 1],
        pads_end: vec![1, 1],
        groups: 1,
    };
    let (x, w) = (
        TensorType::f32(vec![1, 64, 28, 28]),
        TensorType::f32(vec![64, 32, 4, 4]),
    );
    let y = TensorType::f32(vec![1, 32, 56, 56]);
    let flops = 2.0 * 64.0 * 32.0 * 16.0 * 28.0 * 28.0;
    bench(
        "conv_transpose 4x4/2 64->32 28x28",
        Op::ConvTranspose(g),
        &[x, w],
        Some(vec![y]),
        conv_transpose::emit,
        flops,
    );
    let pool = PoolAttrs {
        kind: PoolKind::Max,
        kernel: vec![3, 3],
        strides: vec![2, 2],
        dilations: vec![1, 1],
        pads_begin: vec![1, 1],
        pads_end: vec![1, 1],
    };
    let x = TensorType::f32(vec![1, 64, 112, 112]);
    let y = TensorType::f32(vec![1, 64, 56, 56]);
    bench(
        "maxpool 3x3/2 64x112x112",
        Op::Pool(pool),
        &[x],
        Some(vec![y]),
        pool::emit,
        9.0 * 64.0 * 56.0 * 56.0,
    );
    let x = TensorType::f32(vec![1, 512, 7, 7]);
    let op = Op::Reduce {
        kind: ReduceKind::Mean,
        axes: vec![2, 3],
    };
    bench(
        "global average 512x7x7",
        op,
        &[x],
        None,
        reduce::emit_reduce,
        512.0 * 49.0,
    );
}
