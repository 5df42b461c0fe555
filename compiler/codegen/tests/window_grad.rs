//! The training kernels of window ops -- max pooling's input gradient (`PoolGrad`) and
//! the direct convolution weight gradient (`ConvWeightGrad`) -- through a one-node JIT,
//! against the IR interpreter over random geometries.

#[path = "compute_kernels/harness.rs"]
#[allow(dead_code)]
mod harness;

use cnnc_codegen::kernels::{conv_weight_grad, pool_grad};
use cnnc_codegen::math::FusedMultiplyAdd;
use cnnc_ir::{ConvGeometry, Op, PoolAttrs, PoolKind, Tensor, TensorType};
use harness::{assert_close, random_f32};
use proptest::prelude::*;

fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(cases);
    ProptestConfig { cases, max_shrink_iters: 200, ..ProptestConfig::default() }
}

fn host_has_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        true
    }
}

/// Runs the kernel (unfused, then with fused multiply-adds where the host has them)
/// and compares each result with the interpreter.
fn check(op: Op, inputs: &[&Tensor], declared: Option<Vec<TensorType>>, emitter: harness::Emitter, what: &str) {
    let types: Vec<TensorType> = declared.clone().unwrap_or_default();
    let want = cnnc_ir::interp::eval(&op, inputs, &types, &[]).unwrap_or_else(|e| panic!("{what}: interpreter: {e}"));
    for fused in [false, true] {
        if fused && !host_has_fma() {
            continue;
        }
        let _fma = FusedMultiplyAdd::enable(fused);
        let got = harness::run(op.clone(), inputs, declared.clone(), emitter).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_close(&got[0], &want[0], &format!("{what} (fused={fused})"));
    }
}

// ---------------------------------------------------------------- pool_grad

#[derive(Clone, Debug)]
struct PoolGradCase {
    shape: Vec<usize>,
    out: Vec<usize>,
    attrs: PoolAttrs,
    ties: bool,
    nans: bool,
    seed: u64,
}

fn pool_grad_case() -> impl Strategy<Value = PoolGradCase> {
    (1usize..3).prop_flat_map(|rank| {
        (
            (1usize..3, 1usize..4),
            prop::collection::vec((1usize..14, 1usize..4, 1usize..4, 1usize..3, 0usize..3, 0usize..3, any::<bool>()), rank),
            any::<bool>(),
            any::<bool>(),
            any::<u64>(),
        )
            .prop_map(|((n, c), axes, ties, nans, seed)| {
                let mut shape = vec![n, c];
                let mut out = vec![n, c];
                let mut attrs = PoolAttrs {
                    kind: PoolKind::Max,
                    kernel: vec![],
                    strides: vec![],
                    dilations: vec![],
                    pads_begin: vec![],
                    pads_end: vec![],
                };
                for (input, k, s, d, pb, pe, ceil) in axes {
                    let span = d * (k - 1) + 1;
                    // Padding smaller than the window, as ONNX requires.
                    let (pb, pe) = (pb.min(span - 1), pe.min(span - 1));
                    let pe = if input + pb + pe < span { span - input - pb } else { pe };
                    let room = input + pb + pe - span;
                    let mut extent = if ceil { room.div_ceil(s) + 1 } else { room / s + 1 };
                    if ceil && (extent - 1) * s >= input + pb {
                        extent -= 1;
                    }
                    shape.push(input);
                    out.push(extent);
                    attrs.kernel.push(k);
                    attrs.strides.push(s);
                    attrs.dilations.push(d);
                    attrs.pads_begin.push(pb);
                    attrs.pads_end.push(pe);
                }
                PoolGradCase { shape, out, attrs, ties, nans, seed }
            })
    })
}

fn check_pool_grad(case: &PoolGradCase) {
    let mut x = random_f32(&case.shape, case.seed, case.ties);
    if case.nans {
        if let cnnc_ir::TensorData::F32(v) = &mut x.data {
            let len = v.len();
            v[case.seed as usize % len] = f32::NAN;
            v[(case.seed as usize / 7) % len] = f32::NAN;
        }
    }
    let dy = random_f32(&case.out, case.seed ^ 0x5eed, false);
    check(Op::PoolGrad(case.attrs.clone()), &[&x, &dy], None, pool_grad::emit, &format!("{case:?}"));
}

proptest! {
    #![proptest_config(config(96))]
    #[test]
    fn pool_grad_matches_interpreter(case in pool_grad_case()) {
        check_pool_grad(&case);
    }
}

fn pool_grad_2d(input: [usize; 2], k: usize, s: usize, pad: usize, ties: bool) -> PoolGradCase {
    let out = input.map(|i| (i + 2 * pad - k) / s + 1);
    PoolGradCase {
        shape: vec![2, 3, input[0], input[1]],
        out: vec![2, 3, out[0], out[1]],
        attrs: PoolAttrs {
            kind: PoolKind::Max,
            kernel: vec![k; 2],
            strides: vec![s; 2],
            dilations: vec![1; 2],
            pads_begin: vec![pad; 2],
            pads_end: vec![pad; 2],
        },
        ties,
        nans: false,
        seed: 11,
    }
}

#[test]
fn pool_grad_common_shapes() {
    for ties in [false, true] {
        check_pool_grad(&pool_grad_2d([16, 16], 3, 1, 1, ties)); // mobile_tiny
        check_pool_grad(&pool_grad_2d([28, 28], 2, 2, 0, ties)); // lenet5
        check_pool_grad(&pool_grad_2d([112, 112], 3, 2, 1, ties)); // resnet18
        check_pool_grad(&pool_grad_2d([7, 9], 3, 1, 0, ties));
    }
}

/// All-equal windows: every window's gradient goes to its first tap inside x.
#[test]
fn pool_grad_routes_ties_to_the_first_tap() {
    let case = pool_grad_2d([5, 6], 3, 1, 1, false);
    let x = Tensor::f32(case.shape.clone(), vec![1.0; case.shape.iter().product()]);
    let dy = Tensor::f32(case.out.clone(), vec![1.0; case.out.iter().product()]);
    let got = harness::run(Op::PoolGrad(case.attrs.clone()), &[&x, &dy], None, pool_grad::emit).unwrap();
    let want = cnnc_ir::interp::eval(&Op::PoolGrad(case.attrs), &[&x, &dy], &[], &[]).unwrap();
    assert_eq!(got[0], want[0]);
    let cnnc_ir::TensorData::F32(v) = &got[0].data else { unreachable!() };
    // Window (0, 0) and its right and lower neighbours all start at x[0, 0].
    assert_eq!(v[0], 4.0);
}

// ---------------------------------------------------------------- conv_weight_grad

#[derive(Clone, Debug)]
struct WeightGradCase {
    x_shape: Vec<usize>,
    dy_shape: Vec<usize>,
    w_shape: Vec<usize>,
    geometry: ConvGeometry,
    seed: u64,
}

fn weight_grad_case() -> impl Strategy<Value = WeightGradCase> {
    (1usize..3).prop_flat_map(|rank| {
        (
            (1usize..4, 1usize..4, 1usize..3, 1usize..4),
            prop::collection::vec((1usize..40, 1usize..6, 1usize..4, 1usize..3, 0usize..3, 0usize..3), rank),
            any::<u64>(),
        )
            .prop_map(|((batch, groups, group_in, group_out), axes, seed)| {
                let mut x_shape = vec![batch, groups * group_in];
                let mut dy_shape = vec![batch, groups * group_out];
                let mut w_shape = vec![groups * group_out, group_in];
                let mut geometry =
                    ConvGeometry { strides: vec![], dilations: vec![], pads_begin: vec![], pads_end: vec![], groups };
                for (input, k, s, d, pb, pe) in axes {
                    let span = d * (k - 1) + 1;
                    let pe = if input + pb + pe < span { span - input - pb } else { pe };
                    x_shape.push(input);
                    dy_shape.push((input + pb + pe - span) / s + 1);
                    w_shape.push(k);
                    geometry.strides.push(s);
                    geometry.dilations.push(d);
                    geometry.pads_begin.push(pb);
                    geometry.pads_end.push(pe);
                }
                WeightGradCase { x_shape, dy_shape, w_shape, geometry, seed }
            })
    })
}

fn check_weight_grad(case: &WeightGradCase) {
    let x = random_f32(&case.x_shape, case.seed, false);
    let dy = random_f32(&case.dy_shape, case.seed ^ 0xd1, false);
    check(
        Op::ConvWeightGrad(case.geometry.clone()),
        &[&x, &dy],
        Some(vec![TensorType::f32(case.w_shape.clone())]),
        conv_weight_grad::emit,
        &format!("{case:?}"),
    );
}

proptest! {
    #![proptest_config(config(96))]
    #[test]
    fn conv_weight_grad_matches_interpreter(case in weight_grad_case()) {
        check_weight_grad(&case);
    }
}

fn depthwise(channels: usize, input: usize, k: usize, s: usize, pad: usize) -> WeightGradCase {
    let out = (input + 2 * pad - k) / s + 1;
    WeightGradCase {
        x_shape: vec![2, channels, input, input],
        dy_shape: vec![2, channels, out, out],
        w_shape: vec![channels, 1, k, k],
        geometry: ConvGeometry {
            strides: vec![s; 2],
            dilations: vec![1; 2],
            pads_begin: vec![pad; 2],
            pads_end: vec![pad; 2],
            groups: channels,
        },
        seed: 5,
    }
}

#[test]
fn conv_weight_grad_common_shapes() {
    check_weight_grad(&depthwise(8, 16, 3, 1, 1)); // mobile_tiny
    check_weight_grad(&depthwise(3, 112, 3, 2, 1)); // mobilenet_v2, long rows
    check_weight_grad(&depthwise(4, 57, 3, 1, 1));
    check_weight_grad(&depthwise(2, 15, 5, 2, 2));
    // Rows wider than the taps that share their loads of dy: one loop per tap.
    check_weight_grad(&depthwise(2, 20, 9, 1, 4));
    check_weight_grad(&depthwise(2, 23, 9, 2, 3));
    // Pointwise (per-channel dot products, BatchNorm's sums): each plane read as one row,
    // four accumulators; planes of whole blocks, a tail of vectors and scalars, short ones.
    check_weight_grad(&depthwise(3, 16, 1, 1, 0));
    check_weight_grad(&depthwise(2, 14, 1, 1, 0));
    check_weight_grad(&depthwise(2, 7, 1, 1, 0));
    check_weight_grad(&depthwise(2, 3, 1, 1, 0));
    check_weight_grad(&depthwise(1, 112, 1, 1, 0));
    check_weight_grad(&WeightGradCase {
        x_shape: vec![3, 5, 61],
        dy_shape: vec![3, 5, 61],
        w_shape: vec![5, 1, 1],
        geometry: ConvGeometry { strides: vec![1], dilations: vec![1], pads_begin: vec![0], pads_end: vec![0], groups: 5 },
        seed: 11,
    });
    // Pointwise with several maps and channels (pointwise_weight_grad.rs): register blocks
    // of 3x3 and their remainders, planes longer than a chunk, a group axis.
    for (batch, groups, channels, maps, side) in [(2, 1, 16, 7, 16), (1, 1, 5, 4, 41), (2, 2, 2, 3, 7), (3, 1, 1, 8, 3), (1, 1, 4, 1, 5)] {
        check_weight_grad(&WeightGradCase {
            x_shape: vec![batch, groups * channels, side, side],
            dy_shape: vec![batch, groups * maps, side, side],
            w_shape: vec![groups * maps, channels, 1, 1],
            geometry: ConvGeometry { strides: vec![1; 2], dilations: vec![1; 2], pads_begin: vec![0; 2], pads_end: vec![0; 2], groups },
            seed: side as u64,
        });
    }
    // lenet5's first layer: one image channel, six maps, 5x5.
    check_weight_grad(&WeightGradCase {
        x_shape: vec![3, 1, 32, 32],
        dy_shape: vec![3, 6, 28, 28],
        w_shape: vec![6, 1, 5, 5],
        geometry: ConvGeometry {
            strides: vec![1; 2],
            dilations: vec![1; 2],
            pads_begin: vec![0; 2],
            pads_end: vec![0; 2],
            groups: 1,
        },
        seed: 9,
    });
}

/// Throughput of the pointwise path on MobileNet-style shapes (multiply-adds per second);
/// a benchmark: `cargo test --release -p cnnc-codegen --test window_grad -- --ignored --nocapture`.
#[test]
#[ignore]
fn pointwise_weight_grad_throughput() {
    let _fma = FusedMultiplyAdd::enable(host_has_fma());
    for (batch, channels, maps, side) in [(64, 64, 16, 16), (64, 16, 64, 16), (16, 16, 96, 112), (16, 24, 144, 56)] {
        let x_ty = TensorType::f32(vec![batch, channels, side, side]);
        let dy_ty = TensorType::f32(vec![batch, maps, side, side]);
        let w_ty = TensorType::f32(vec![maps, channels, 1, 1]);
        let geometry = ConvGeometry { strides: vec![1; 2], dilations: vec![1; 2], pads_begin: vec![0; 2], pads_end: vec![0; 2], groups: 1 };
        let kernel = harness::compile(Op::ConvWeightGrad(geometry), &[x_ty.clone(), dy_ty.clone()], Some(vec![w_ty.clone()]), conv_weight_grad::emit)
            .expect("compiles");
        let mut buffers: Vec<Vec<f32>> = [x_ty.numel(), dy_ty.numel(), w_ty.numel()].iter().map(|&n| vec![0.5f32; n]).collect();
        let table: Vec<*mut u8> = buffers.iter_mut().map(|b| b.as_mut_ptr() as *mut u8).collect();
        kernel.call(&table);
        let runs = 10;
        let start = thread_cpu_seconds();
        for _ in 0..runs {
            kernel.call(&table);
        }
        let seconds = (thread_cpu_seconds() - start) / runs as f64;
        let macs = (batch * channels * maps * side * side) as f64;
        eprintln!("x {x_ty} dy {dy_ty}: {:.3} ms, {:.1} GMAC/s", seconds * 1e3, macs / seconds / 1e9);
        // The matrix form it replaces: [maps, N·P] x [N·P, channels] on kernels/matmul.rs
        // (its operands' transposes not counted).
        let (rows, depth) = (maps, batch * side * side);
        let a_ty = TensorType::f32(vec![rows, depth]);
        let b_ty = TensorType::f32(vec![depth, channels]);
        let matmul = harness::compile(Op::MatMul, &[a_ty.clone(), b_ty.clone()], None, cnnc_codegen::kernels::matmul::emit).expect("compiles");
        let mut buffers: Vec<Vec<f32>> = [a_ty.numel(), b_ty.numel(), rows * channels].iter().map(|&n| vec![0.5f32; n]).collect();
        let table: Vec<*mut u8> = buffers.iter_mut().map(|b| b.as_mut_ptr() as *mut u8).collect();
        matmul.call(&table);
        let start = thread_cpu_seconds();
        for _ in 0..runs {
            matmul.call(&table);
        }
        let seconds = (thread_cpu_seconds() - start) / runs as f64;
        eprintln!("  matmul {a_ty} x {b_ty}: {:.3} ms, {:.1} GMAC/s", seconds * 1e3, macs / seconds / 1e9);
    }
}

/// CPU time of the calling thread (other jobs on the machine do not count).
#[cfg(target_os = "linux")]
fn thread_cpu_seconds() -> f64 {
    #[repr(C)]
    struct Timespec {
        seconds: i64,
        nanoseconds: i64,
    }
    unsafe extern "C" {
        fn clock_gettime(clock: i32, time: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut t = Timespec { seconds: 0, nanoseconds: 0 };
    // SAFETY: clock_gettime writes one timespec, which `t` is.
    unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.seconds as f64 + t.nanoseconds as f64 * 1e-9
}

#[cfg(not(target_os = "linux"))]
fn thread_cpu_seconds() -> f64 {
    std::time::UNIX_EPOCH.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0)
}
