//! The reference interpreter against hand-worked examples (numbers worked out by hand
//! or taken from the ONNX operator docs) and algebraic properties.

use cnnc_ir::interp::{self, apply_epilogue, erf, erfc, eval, run, run_all};
use cnnc_ir::*;
use proptest::prelude::*;

// ---------- helpers ----------

fn t(shape: &[usize], data: &[f32]) -> Tensor {
    Tensor::f32(shape.to_vec(), data.to_vec())
}

fn ti64(shape: &[usize], data: &[i64]) -> Tensor {
    Tensor::new(shape.to_vec(), TensorData::I64(data.to_vec()))
}

fn ti32(shape: &[usize], data: &[i32]) -> Tensor {
    Tensor::new(shape.to_vec(), TensorData::I32(data.to_vec()))
}

fn tbool(shape: &[usize], data: &[bool]) -> Tensor {
    Tensor::new(shape.to_vec(), TensorData::Bool(data.to_vec()))
}

/// Evaluates a single-output op whose output type follows from its inputs.
fn ev(op: Op, inputs: &[&Tensor]) -> Tensor {
    ev_result(op, inputs).unwrap_or_else(|e| panic!("eval failed: {e}"))
}

fn ev_result(op: Op, inputs: &[&Tensor]) -> Result<Tensor, String> {
    Ok(eval(&op, inputs, &[], &[])?.remove(0))
}

/// Evaluates a single-output op with a declared f32 output shape.
fn ev_typed(op: Op, inputs: &[&Tensor], shape: &[usize]) -> Tensor {
    let ty = TensorType::new(inputs[0].data.dtype(), shape.to_vec());
    eval(&op, inputs, &[ty], &[]).unwrap_or_else(|e| panic!("eval failed: {e}")).remove(0)
}

fn f32s(t: &Tensor) -> &[f32] {
    t.data.as_f32().expect("f32 tensor")
}

/// Element-wise closeness with NaN equal to NaN.
fn assert_close(actual: &Tensor, shape: &[usize], expected: &[f32]) {
    assert_eq!(actual.shape, shape, "shape");
    let got = f32s(actual);
    assert_eq!(got.len(), expected.len());
    for (i, (&g, &e)) in got.iter().zip(expected).enumerate() {
        let ok = (g.is_nan() && e.is_nan()) || g == e || (g - e).abs() <= 1e-6 * e.abs().max(1.0);
        assert!(ok, "element {i}: got {g}, expected {e}\n got all: {got:?}\n expected: {expected:?}");
    }
}

fn geometry(k: usize) -> ConvGeometry {
    ConvGeometry { strides: vec![1; k], dilations: vec![1; k], pads_begin: vec![0; k], pads_end: vec![0; k], groups: 1 }
}

fn conv(x: &Tensor, w: &Tensor, g: ConvGeometry) -> Tensor {
    ev(Op::Conv(g), &[x, w])
}

fn pool_attrs(kind: PoolKind, kernel: &[usize], strides: &[usize], pads: (&[usize], &[usize])) -> PoolAttrs {
    PoolAttrs {
        kind,
        kernel: kernel.to_vec(),
        strides: strides.to_vec(),
        dilations: vec![1; kernel.len()],
        pads_begin: pads.0.to_vec(),
        pads_end: pads.1.to_vec(),
    }
}

const AVG_EXCLUDE: PoolKind = PoolKind::Avg { count_include_pad: false };
const AVG_INCLUDE: PoolKind = PoolKind::Avg { count_include_pad: true };

// ---------- convolution ----------

#[test]
fn conv_valid() {
    // out[i,j] = x[i,j] + x[i+1,j+1]; out = in - k + 1.
    let x = t(&[1, 1, 3, 3], &[1., 2., 3., 4., 5., 6., 7., 8., 9.]);
    let w = t(&[1, 1, 2, 2], &[1., 0., 0., 1.]);
    assert_close(&conv(&x, &w, geometry(2)), &[1, 1, 2, 2], &[6., 8., 12., 14.]);
}

#[test]
fn conv_same() {
    // A 3x3 box filter with one pixel of zero padding: out = in.
    let x = t(&[1, 1, 3, 3], &[1., 2., 3., 4., 5., 6., 7., 8., 9.]);
    let w = t(&[1, 1, 3, 3], &[1.; 9]);
    let g = ConvGeometry { pads_begin: vec![1, 1], pads_end: vec![1, 1], ..geometry(2) };
    assert_close(&conv(&x, &w, g), &[1, 1, 3, 3], &[12., 21., 16., 27., 45., 33., 24., 39., 28.]);
}

#[test]
fn conv_full() {
    // Padding k-1 on both sides: out = in + k - 1.
    let x = t(&[1, 1, 3], &[1., 2., 3.]);
    let w = t(&[1, 1, 2], &[1., 10.]);
    let g = ConvGeometry { pads_begin: vec![1], pads_end: vec![1], ..geometry(1) };
    assert_close(&conv(&x, &w, g), &[1, 1, 4], &[10., 21., 32., 3.]);
}

#[test]
fn conv_strided() {
    let x = t(&[1, 1, 5], &[1., 2., 3., 4., 5.]);
    let w = t(&[1, 1, 2], &[1., 1.]);
    let g = ConvGeometry { strides: vec![2], ..geometry(1) };
    assert_close(&conv(&x, &w, g), &[1, 1, 2], &[3., 7.]);
    // 2-D, stride 2 with padding: windows start at -1 and 1.
    let x = t(&[1, 1, 3, 3], &[1., 2., 3., 4., 5., 6., 7., 8., 9.]);
    let w = t(&[1, 1, 2, 2], &[1.; 4]);
    let g = ConvGeometry { strides: vec![2, 2], pads_begin: vec![1, 1], pads_end: vec![0, 0], ..geometry(2) };
    assert_close(&conv(&x, &w, g), &[1, 1, 2, 2], &[1., 2. + 3., 4. + 7., 5. + 6. + 8. + 9.]);
}

#[test]
fn conv_dilated() {
    let x = t(&[1, 1, 5], &[1., 2., 3., 4., 5.]);
    let w = t(&[1, 1, 2], &[1., 1.]);
    let g = ConvGeometry { dilations: vec![2], ..geometry(1) };
    assert_close(&conv(&x, &w, g), &[1, 1, 3], &[4., 6., 8.]);
    // 2-D dilation 2 over 3x3 picks the four corners.
    let x = t(&[1, 1, 3, 3], &[1., 2., 3., 4., 5., 6., 7., 8., 9.]);
    let w = t(&[1, 1, 2, 2], &[1., 10., 100., 1000.]);
    let g = ConvGeometry { dilations: vec![2, 2], ..geometry(2) };
    assert_close(&conv(&x, &w, g), &[1, 1, 1, 1], &[1. + 30. + 700. + 9000.]);
}

#[test]
fn conv_grouped() {
    // Two groups of two channels: out0 = 1·x0 + 2·x1, out1 = 3·x2 + 4·x3.
    let x = t(&[1, 4, 1, 1], &[1., 2., 3., 4.]);
    let w = t(&[2, 2, 1, 1], &[1., 2., 3., 4.]);
    let g = ConvGeometry { groups: 2, ..geometry(2) };
    assert_close(&conv(&x, &w, g), &[1, 2, 1, 1], &[5., 25.]);
}

#[test]
fn conv_depthwise() {
    // Each output channel sees one input channel.
    let x = t(&[1, 2, 1, 3], &[1., 2., 3., 4., 5., 6.]);
    let w = t(&[2, 1, 1, 2], &[1., 1., 1., -1.]);
    let g = ConvGeometry { groups: 2, ..geometry(2) };
    assert_close(&conv(&x, &w, g), &[1, 2, 1, 2], &[3., 5., -1., -1.]);
    // Depth multiplier 2: channel c feeds outputs 2c and 2c+1.
    let w = t(&[4, 1, 1, 1], &[1., 2., 3., 4.]);
    assert_close(&conv(&x, &w, g_groups(2)), &[1, 4, 1, 3], &[1., 2., 3., 2., 4., 6., 12., 15., 18., 16., 20., 24.]);
}

fn g_groups(groups: usize) -> ConvGeometry {
    ConvGeometry { groups, ..geometry(2) }
}

#[test]
fn conv_asymmetric_pads_and_bias() {
    let x = t(&[1, 1, 3], &[1., 2., 3.]);
    let w = t(&[1, 1, 2], &[1., 1.]);
    let b = t(&[1], &[10.]);
    let g = ConvGeometry { pads_begin: vec![0], pads_end: vec![1], ..geometry(1) };
    assert_close(&ev(Op::Conv(g), &[&x, &w, &b]), &[1, 1, 3], &[13., 15., 13.]);
}

#[test]
fn conv_channels_and_batch() {
    // Two images, two input channels, two output channels, 1x1 kernels.
    let x = t(&[2, 2, 1, 2], &[1., 2., 3., 4., 5., 6., 7., 8.]);
    let w = t(&[2, 2, 1, 1], &[1., 1., 1., -1.]);
    let b = t(&[2], &[0., 100.]);
    let out = ev(Op::Conv(geometry(2)), &[&x, &w, &b]);
    assert_close(&out, &[2, 2, 1, 2], &[4., 6., 98., 98., 12., 14., 98., 98.]);
}

#[test]
fn conv_3d() {
    let x = t(&[1, 1, 2, 2, 2], &[1., 2., 3., 4., 5., 6., 7., 8.]);
    let w = t(&[1, 1, 2, 2, 2], &[1.; 8]);
    assert_close(&conv(&x, &w, geometry(3)), &[1, 1, 1, 1, 1], &[36.]);
    // Same-padded 3-D conv with a kernel that picks the +1 neighbour along depth.
    let mut kernel = [0.; 27];
    kernel[2 * 9 + 4] = 1.; // d = 2 (offset +1), h = 1, w = 1
    let w = t(&[1, 1, 3, 3, 3], &kernel);
    let g = ConvGeometry { pads_begin: vec![1; 3], pads_end: vec![1; 3], ..geometry(3) };
    assert_close(&conv(&x, &w, g), &[1, 1, 2, 2, 2], &[5., 6., 7., 8., 0., 0., 0., 0.]);
}

#[test]
fn conv_transpose_onnx_example() {
    // ONNX ConvTranspose doc example: 3x3 input, 2 output channels of 3x3 ones.
    let x = t(&[1, 1, 3, 3], &[0., 1., 2., 3., 4., 5., 6., 7., 8.]);
    let w = t(&[1, 2, 3, 3], &[1.; 18]);
    let plane = [
        0., 1., 3., 3., 2., 3., 8., 15., 12., 7., 9., 21., 36., 27., 15., 9., 20., 33., 24., 13., 6., 13., 21., 15., 8.,
    ];
    let expected: Vec<f32> = plane.iter().chain(&plane).copied().collect();
    let out = ev_typed(Op::ConvTranspose(geometry(2)), &[&x, &w], &[1, 2, 5, 5]);
    assert_close(&out, &[1, 2, 5, 5], &expected);
}

#[test]
fn conv_transpose_strided_padded_bias() {
    let x = t(&[1, 1, 2], &[1., 2.]);
    let w = t(&[1, 1, 3], &[1., 1., 1.]);
    // Stride 2: x0 covers 0..3, x1 covers 2..5.
    let g = ConvGeometry { strides: vec![2], ..geometry(1) };
    assert_close(&ev_typed(Op::ConvTranspose(g.clone()), &[&x, &w], &[1, 1, 5]), &[1, 1, 5], &[1., 1., 3., 2., 2.]);
    // pad_begin 1 shifts every position left by one (dropping position -1); an extra
    // output position (ONNX output_padding) that no input reaches holds just the bias.
    let b = t(&[1], &[0.5]);
    let g = ConvGeometry { pads_begin: vec![1], pads_end: vec![1], ..g };
    let out = ev_typed(Op::ConvTranspose(g), &[&x, &w, &b], &[1, 1, 5]);
    assert_close(&out, &[1, 1, 5], &[1.5, 3.5, 2.5, 2.5, 0.5]);
}

#[test]
fn conv_transpose_grouped_dilated() {
    // Two groups, one channel each; dilation 2 spreads the taps.
    let x = t(&[1, 2, 2], &[1., 2., 10., 20.]);
    let w = t(&[2, 1, 2], &[1., 1., 1., -1.]);
    let g = ConvGeometry { dilations: vec![2], groups: 2, ..geometry(1) };
    // out len = (2-1) + 2·(2-1) + 1 = 4; channel 0: x0 at 0,2; x1 at 1,3.
    let out = ev_typed(Op::ConvTranspose(g), &[&x, &w], &[1, 2, 4]);
    assert_close(&out, &[1, 2, 4], &[1., 2., 1., 2., 10., 20., -10., -20.]);
}

// ---------- pooling ----------

#[test]
fn max_pool_2x2() {
    let x = t(&[1, 1, 4, 4], &(1..=16).map(|v| v as f32).collect::<Vec<_>>());
    let p = pool_attrs(PoolKind::Max, &[2, 2], &[2, 2], (&[0, 0], &[0, 0]));
    assert_close(&ev_typed(Op::Pool(p), &[&x], &[1, 1, 2, 2]), &[1, 1, 2, 2], &[6., 8., 14., 16.]);
}

#[test]
fn max_pool_padding_never_wins() {
    let x = t(&[1, 1, 3], &[-1., -2., -3.]);
    let p = pool_attrs(PoolKind::Max, &[3], &[1], (&[1], &[1]));
    assert_close(&ev_typed(Op::Pool(p), &[&x], &[1, 1, 3]), &[1, 1, 3], &[-1., -1., -2.]);
}

#[test]
fn max_pool_dilated_and_nan() {
    let x = t(&[1, 1, 5], &[1., 5., 2., 4., 3.]);
    let mut p = pool_attrs(PoolKind::Max, &[2], &[1], (&[0], &[0]));
    p.dilations = vec![2];
    assert_close(&ev_typed(Op::Pool(p), &[&x], &[1, 1, 3]), &[1, 1, 3], &[2., 5., 3.]);
    let x = t(&[1, 1, 3], &[1., f32::NAN, 0.]);
    let p = pool_attrs(PoolKind::Max, &[2], &[1], (&[0], &[0]));
    assert_close(&ev_typed(Op::Pool(p), &[&x], &[1, 1, 2]), &[1, 1, 2], &[f32::NAN, f32::NAN]);
}

#[test]
fn avg_pool_plain() {
    let x = t(&[1, 1, 4], &[1., 2., 3., 4.]);
    let p = pool_attrs(AVG_EXCLUDE, &[2], &[2], (&[0], &[0]));
    assert_close(&ev_typed(Op::Pool(p), &[&x], &[1, 1, 2]), &[1, 1, 2], &[1.5, 3.5]);
    // Global average pooling over 2x3.
    let x = t(&[1, 1, 2, 3], &[1., 2., 3., 4., 5., 6.]);
    let p = pool_attrs(AVG_EXCLUDE, &[2, 3], &[1, 1], (&[0, 0], &[0, 0]));
    assert_close(&ev_typed(Op::Pool(p), &[&x], &[1, 1, 1, 1]), &[1, 1, 1, 1], &[3.5]);
}

#[test]
fn avg_pool_pads_count_include_pad() {
    let x = t(&[1, 1, 3], &[1., 2., 3.]);
    let exclude = pool_attrs(AVG_EXCLUDE, &[3], &[1], (&[1], &[1]));
    assert_close(&ev_typed(Op::Pool(exclude), &[&x], &[1, 1, 3]), &[1, 1, 3], &[1.5, 2., 2.5]);
    let include = pool_attrs(AVG_INCLUDE, &[3], &[1], (&[1], &[1]));
    assert_close(&ev_typed(Op::Pool(include), &[&x], &[1, 1, 3]), &[1, 1, 3], &[1., 2., 5. / 3.]);
    // 2-D corner: include counts 4 taps of the 2x2 window, exclude only the 1 inside.
    let x = t(&[1, 1, 2, 2], &[4., 8., 12., 16.]);
    let include = pool_attrs(AVG_INCLUDE, &[2, 2], &[2, 2], (&[1, 1], &[1, 1]));
    assert_close(&ev_typed(Op::Pool(include), &[&x], &[1, 1, 2, 2]), &[1, 1, 2, 2], &[1., 2., 3., 4.]);
    let exclude = pool_attrs(AVG_EXCLUDE, &[2, 2], &[2, 2], (&[1, 1], &[1, 1]));
    assert_close(&ev_typed(Op::Pool(exclude), &[&x], &[1, 1, 2, 2]), &[1, 1, 2, 2], &[4., 8., 12., 16.]);
}

#[test]
fn pool_ceil_mode() {
    // Ceil mode: the last window runs past the input; taps past the padded extent never
    // count in either divisor.
    let x = t(&[1, 1, 5], &[1., 2., 3., 4., 5.]);
    for kind in [AVG_EXCLUDE, AVG_INCLUDE] {
        let p = pool_attrs(kind, &[2], &[2], (&[0], &[0]));
        assert_close(&ev_typed(Op::Pool(p), &[&x], &[1, 1, 3]), &[1, 1, 3], &[1.5, 3.5, 5.]);
    }
    // With padding 1: padded extent [-1, 5); windows start at -1, 1, 3.
    let x = t(&[1, 1, 4], &[1., 2., 3., 4.]);
    let include = pool_attrs(AVG_INCLUDE, &[3], &[2], (&[1], &[1]));
    assert_close(&ev_typed(Op::Pool(include), &[&x], &[1, 1, 3]), &[1, 1, 3], &[1., 3., 2.]);
    let exclude = pool_attrs(AVG_EXCLUDE, &[3], &[2], (&[1], &[1]));
    assert_close(&ev_typed(Op::Pool(exclude), &[&x], &[1, 1, 3]), &[1, 1, 3], &[1.5, 3., 4.]);
    let max = pool_attrs(PoolKind::Max, &[3], &[2], (&[1], &[1]));
    assert_close(&ev_typed(Op::Pool(max), &[&x], &[1, 1, 3]), &[1, 1, 3], &[2., 4., 4.]);
}

#[test]
fn pool_3d() {
    let x = t(&[1, 1, 2, 2, 2], &[1., 2., 3., 4., 5., 6., 7., 8.]);
    let max = pool_attrs(PoolKind::Max, &[2, 2, 2], &[1, 1, 1], (&[0; 3], &[0; 3]));
    assert_close(&ev_typed(Op::Pool(max), &[&x], &[1, 1, 1, 1, 1]), &[1, 1, 1, 1, 1], &[8.]);
    let avg = pool_attrs(AVG_EXCLUDE, &[1, 2, 2], &[1, 1, 1], (&[0; 3], &[0; 3]));
    assert_close(&ev_typed(Op::Pool(avg), &[&x], &[1, 1, 2, 1, 1]), &[1, 1, 2, 1, 1], &[2.5, 6.5]);
}

// ---------- matmul ----------

#[test]
fn matmul_plain_batched_and_int() {
    let a = t(&[2, 2], &[1., 2., 3., 4.]);
    let b = t(&[2, 2], &[5., 6., 7., 8.]);
    assert_close(&ev(Op::MatMul, &[&a, &b]), &[2, 2], &[19., 22., 43., 50.]);
    // Batch dims broadcast: [2,1,2] x [2,1] -> [2,1,1].
    let a = t(&[2, 1, 2], &[1., 2., 3., 4.]);
    let b = t(&[2, 1], &[1., 1.]);
    assert_close(&ev(Op::MatMul, &[&a, &b]), &[2, 1, 1], &[3., 7.]);
    // [1,2,3] x [3,1,3,1] -> [3,1,2,1] with both batch dims broadcasting.
    let a = t(&[1, 2, 3], &[1., 2., 3., 4., 5., 6.]);
    let b = t(&[3, 1, 3, 1], &[1., 0., 0., 0., 1., 0., 0., 0., 1.]);
    assert_close(&ev(Op::MatMul, &[&a, &b]), &[3, 1, 2, 1], &[1., 4., 2., 5., 3., 6.]);
    let a = ti64(&[1, 2], &[3, -4]);
    let b = ti64(&[2, 1], &[5, 6]);
    assert_eq!(ev(Op::MatMul, &[&a, &b]), ti64(&[1, 1], &[-9]));
}

// ---------- elementwise ----------

#[test]
fn binary_broadcast() {
    let a = t(&[2, 1], &[1., 2.]);
    let b = t(&[3], &[10., 20., 30.]);
    assert_close(&ev(Op::Binary(BinaryFn::Add), &[&a, &b]), &[2, 3], &[11., 21., 31., 12., 22., 32.]);
    assert_close(&ev(Op::Binary(BinaryFn::Sub), &[&b, &a]), &[2, 3], &[9., 19., 29., 8., 18., 28.]);
    let s = t(&[], &[2.]);
    assert_close(&ev(Op::Binary(BinaryFn::Mul), &[&s, &a]), &[2, 1], &[2., 4.]);
    assert_close(&ev(Op::Binary(BinaryFn::Div), &[&a, &s]), &[2, 1], &[0.5, 1.]);
    assert!(ev_result(Op::Binary(BinaryFn::Add), &[&t(&[2], &[1., 2.]), &b]).is_err());
}

#[test]
fn integer_division_truncates_and_zero_divisor_gives_zero() {
    let a = ti64(&[5], &[7, -7, 7, -7, 5]);
    let b = ti64(&[5], &[2, 2, -2, -2, 0]);
    assert_eq!(ev(Op::Binary(BinaryFn::Div), &[&a, &b]), ti64(&[5], &[3, -3, -3, 3, 0]));
    let a = ti32(&[3], &[i32::MIN, 9, -9]);
    let b = ti32(&[3], &[-1, 4, 4]);
    assert_eq!(ev(Op::Binary(BinaryFn::Div), &[&a, &b]), ti32(&[3], &[i32::MIN, 2, -2]));
    let a = ti64(&[4], &[2, 2, -1, 3]);
    let b = ti64(&[4], &[10, -1, -3, 0]);
    assert_eq!(ev(Op::Binary(BinaryFn::Pow), &[&a, &b]), ti64(&[4], &[1024, 0, -1, 1]));
}

#[test]
fn pow_follows_powf() {
    let a = t(&[5], &[2., -8., 0., f32::NAN, 1.]);
    let b = t(&[5], &[3., 1. / 3., 0., 0., f32::NAN]);
    assert_close(&ev(Op::Binary(BinaryFn::Pow), &[&a, &b]), &[5], &[8., f32::NAN, 1., 1., 1.]);
}

#[test]
fn max_min_propagate_nan() {
    let a = t(&[4], &[f32::NAN, 1., 3., -0.5]);
    let b = t(&[4], &[1., f32::NAN, 2., 0.5]);
    assert_close(&ev(Op::Binary(BinaryFn::Max), &[&a, &b]), &[4], &[f32::NAN, f32::NAN, 3., 0.5]);
    assert_close(&ev(Op::Binary(BinaryFn::Min), &[&a, &b]), &[4], &[f32::NAN, f32::NAN, 2., -0.5]);
    let a = ti32(&[2], &[1, -5]);
    let b = ti32(&[2], &[2, -6]);
    assert_eq!(ev(Op::Binary(BinaryFn::Max), &[&a, &b]), ti32(&[2], &[2, -5]));
}

#[test]
fn prelu_and_comparisons() {
    let x = t(&[2, 2], &[-2., 3., -4., 0.]);
    let slope = t(&[2, 1], &[0.5, 0.25]);
    assert_close(&ev(Op::Binary(BinaryFn::PRelu), &[&x, &slope]), &[2, 2], &[-1., 3., -1., 0.]);
    let a = t(&[4], &[1., 2., 3., f32::NAN]);
    let b = t(&[4], &[2., 2., 2., f32::NAN]);
    let cmp = |f| ev(Op::Binary(f), &[&a, &b]);
    assert_eq!(cmp(BinaryFn::Less), tbool(&[4], &[true, false, false, false]));
    assert_eq!(cmp(BinaryFn::LessOrEqual), tbool(&[4], &[true, true, false, false]));
    assert_eq!(cmp(BinaryFn::Greater), tbool(&[4], &[false, false, true, false]));
    assert_eq!(cmp(BinaryFn::GreaterOrEqual), tbool(&[4], &[false, true, true, false]));
    assert_eq!(cmp(BinaryFn::Equal), tbool(&[4], &[false, true, false, false]));
    let p = tbool(&[4], &[false, false, true, true]);
    let q = tbool(&[4], &[false, true, false, true]);
    assert_eq!(ev(Op::Binary(BinaryFn::And), &[&p, &q]), tbool(&[4], &[false, false, false, true]));
    assert_eq!(ev(Op::Binary(BinaryFn::Or), &[&p, &q]), tbool(&[4], &[false, true, true, true]));
    assert_eq!(ev(Op::Binary(BinaryFn::Xor), &[&p, &q]), tbool(&[4], &[false, true, true, false]));
    assert_eq!(ev(Op::Binary(BinaryFn::Equal), &[&p, &q]), tbool(&[4], &[true, false, false, true]));
    let i = ti64(&[2], &[1, 2]);
    assert_eq!(ev(Op::Binary(BinaryFn::Less), &[&i, &ti64(&[1], &[2])]), tbool(&[2], &[true, false]));
}

#[test]
fn where_broadcasts_three_ways() {
    let c = tbool(&[2], &[true, false]);
    let x = t(&[2, 1], &[1., 2.]);
    let y = t(&[], &[0.]);
    assert_close(&ev(Op::Where, &[&c, &x, &y]), &[2, 2], &[1., 0., 2., 0.]);
    let xi = ti64(&[1], &[7]);
    let yi = ti64(&[2], &[8, 9]);
    assert_eq!(ev(Op::Where, &[&c, &xi, &yi]), ti64(&[2], &[7, 9]));
}

#[test]
fn cast_truncates_saturates_and_maps_nan_to_zero() {
    // 3e10 is 30_000_001_024 in f32.
    let x = t(&[5], &[1.7, -1.7, f32::NAN, 3e10, 0.]);
    let cast = |to| ev(Op::Cast { to }, &[&x]);
    assert_eq!(cast(DType::I32), ti32(&[5], &[1, -1, 0, i32::MAX, 0]));
    assert_eq!(cast(DType::I64), ti64(&[5], &[1, -1, 0, 30_000_001_024, 0]));
    assert_eq!(cast(DType::Bool), tbool(&[5], &[true, true, true, true, false]));
    let b = tbool(&[2], &[true, false]);
    assert_close(&ev(Op::Cast { to: DType::F32 }, &[&b]), &[2], &[1., 0.]);
    assert_eq!(ev(Op::Cast { to: DType::I32 }, &[&ti64(&[1], &[1 << 33 | 5])]), ti32(&[1], &[5]));
}

fn unary(f: UnaryFn, xs: &[f32]) -> Vec<f32> {
    f32s(&ev(Op::Unary(f), &[&t(&[xs.len()], xs)])).to_vec()
}

fn assert_unary(f: UnaryFn, xs: &[f32], expected: &[f64]) {
    let got = unary(f, xs);
    for ((&x, &g), &e) in xs.iter().zip(&got).zip(expected) {
        let e = e as f32;
        let ok = (g.is_nan() && e.is_nan()) || g == e || (g - e).abs() <= 2e-7 * e.abs().max(1e-30);
        assert!(ok, "{f:?}({x}) = {g}, expected {e}");
    }
}

#[test]
fn unary_basic() {
    use UnaryFn::*;
    let nan = f64::NAN;
    assert_unary(Neg, &[1.5, -0.], &[-1.5, 0.]);
    assert_unary(Abs, &[-2., 3.], &[2., 3.]);
    assert_unary(Sqrt, &[4., -1.], &[2., nan]);
    assert_unary(Exp, &[0., 1.], &[1., std::f64::consts::E]);
    assert_unary(Log, &[1., 0., -1.], &[0., f64::NEG_INFINITY, nan]);
    assert_unary(Reciprocal, &[4., 0.], &[0.25, f64::INFINITY]);
    assert_unary(Floor, &[-1.5, 1.5], &[-2., 1.]);
    assert_unary(Ceil, &[-1.5, 1.5], &[-1., 2.]);
    assert_unary(Relu, &[-1., 2., f32::NAN], &[0., 2., nan]);
    assert_unary(Sigmoid, &[0., 1., -200.], &[0.5, 0.7310585786300049, 0.]);
    assert_unary(Tanh, &[1., -30.], &[0.7615941559557649, -1.]);
    assert_unary(Softsign, &[1., -3.], &[0.5, -0.75]);
    assert_unary(Clip { min: 0., max: 6. }, &[-1., 3., 7., f32::NAN], &[0., 3., 6., nan]);
    assert_unary(Clip { min: f32::NEG_INFINITY, max: 1. }, &[-1e30, 2.], &[-1e30, 1.]);
    assert_unary(Affine { scale: 2., shift: 1. }, &[3.], &[7.]);
    assert_unary(PowConst { exponent: 2. }, &[-3.], &[9.]);
    assert_unary(PowConst { exponent: 0.5 }, &[4.], &[2.]);
    assert_unary(PowConst { exponent: 0. }, &[f32::NAN], &[1.]);
    assert_unary(LeakyRelu { alpha: 0.1 }, &[-2., 2.], &[-0.2, 2.]);
}

#[test]
fn unary_activations() {
    use UnaryFn::*;
    let e1 = (-1f64).exp() - 1.; // e^-1 - 1
    assert_unary(Elu { alpha: 1. }, &[-1., 2.], &[e1, 2.]);
    assert_unary(Elu { alpha: 2. }, &[-1.], &[2. * e1]);
    let (alpha, gamma) = (1.673_263_2_f32, 1.050_701_f32);
    let selu_neg = gamma as f64 * alpha as f64 * e1;
    assert_unary(Selu { alpha, gamma }, &[-1., 1., 0.], &[selu_neg, gamma as f64, 0.]);
    assert_unary(Celu { alpha: 1. }, &[-1., 2.], &[e1, 2.]);
    assert_unary(Celu { alpha: 2. }, &[-2.], &[2. * e1]);
    assert_unary(
        Softplus,
        &[0., 100., -100., 1.],
        &[std::f64::consts::LN_2, 100., (-100f64).exp(), 1.3132616875182228],
    );
    assert_unary(Mish, &[1., -100.], &[0.8650983882673103, -100. * (-100f64).exp()]);
    assert_unary(HardSwish, &[1., -3., 3., -1., 4.], &[2. / 3., 0., 3., -1. / 3., 4.]);
    assert_unary(HardSigmoid { alpha: 0.2, beta: 0.5 }, &[1., 3., -3.], &[0.7, 1., 0.]);
    assert_unary(Swish { alpha: 1. }, &[1.], &[0.7310585786300049]);
    assert_unary(Swish { alpha: 2. }, &[0.5], &[0.5 * 0.7310585786300049]);
    assert_unary(GeluErf, &[1., -1., 0.], &[0.8413447460685429, -0.15865525393145707, 0.]);
    assert_unary(GeluTanh, &[1., 0.], &[0.8411919906082768, 0.]);
    assert_unary(Erf, &[0.5, -2., 0.], &[0.5204998778130465, -0.9953222650189527, 0.]);
    // NaN maps to NaN through every activation.
    for f in [Sigmoid, Tanh, Softplus, Mish, HardSwish, GeluErf, GeluTanh, Elu { alpha: 1. }, Celu { alpha: 1. }] {
        assert!(unary(f, &[f32::NAN])[0].is_nan(), "{f:?}(NaN)");
    }
}

#[test]
fn unary_integer_and_bool() {
    let x = ti32(&[4], &[i32::MIN, -3, 0, 5]);
    assert_eq!(ev(Op::Unary(UnaryFn::Neg), &[&x]), ti32(&[4], &[i32::MIN, 3, 0, -5]));
    assert_eq!(ev(Op::Unary(UnaryFn::Abs), &[&x]), ti32(&[4], &[i32::MIN, 3, 0, 5]));
    assert_eq!(ev(Op::Unary(UnaryFn::Relu), &[&x]), ti32(&[4], &[0, 0, 0, 5]));
    let clip = UnaryFn::Clip { min: -2.5, max: 4. };
    assert_eq!(ev(Op::Unary(clip), &[&x]), ti32(&[4], &[-2, -2, 0, 4]));
    let b = tbool(&[2], &[true, false]);
    assert_eq!(ev(Op::Unary(UnaryFn::Not), &[&b]), tbool(&[2], &[false, true]));
    assert!(ev_result(Op::Unary(UnaryFn::Exp), &[&x]).is_err());
    assert!(ev_result(Op::Unary(UnaryFn::Not), &[&t(&[1], &[1.])]).is_err());
}

#[test]
fn erf_matches_reference_values() {
    // Values from a correctly rounded libm (Python's math.erf / math.erfc).
    let cases = [
        (0.1, 0.1124629160182849, 0.8875370839817152),
        (0.5, 0.5204998778130465, 0.4795001221869535),
        (1.0, 0.8427007929497149, 0.15729920705028513),
        (2.4, 0.999311486103355, 0.0006885138966450789),
        (2.6, 0.9997639655834707, 0.00023603441652934908),
        (3.5, 0.9999992569016276, 7.430983723414128e-07),
    ];
    for (x, e, c) in cases {
        assert!((erf(x) - e).abs() < 1e-15, "erf({x}) = {}", erf(x));
        assert!((erf(-x) + e).abs() < 1e-15, "erf(-{x})");
        assert!(((erfc(x) - c) / c).abs() < 1e-13, "erfc({x}) = {}", erfc(x));
        assert!((erfc(-x) - (2. - c)).abs() < 1e-15, "erfc(-{x})");
    }
    for (x, c) in [(3.0, 2.2090496998585438e-05), (5.0, 1.5374597944280351e-12), (10.0, 2.088487583762545e-45)] {
        assert!(((erfc(x) - c) / c).abs() < 1e-13, "erfc({x}) = {}", erfc(x));
    }
    assert_eq!(erf(0.0), 0.0);
    assert_eq!(erf(40.0), 1.0);
    assert!(erf(f64::NAN).is_nan());
    // Monotone and odd on a fine grid across the series/continued-fraction seam.
    let mut previous = -1.0;
    for i in -600..=600 {
        let x = i as f64 * 0.01;
        let v = erf(x);
        assert!(v >= previous, "erf not monotone at {x}");
        assert_eq!(v, -erf(-x));
        previous = v;
    }
}

// ---------- reductions ----------

#[test]
fn reduce_kinds() {
    let x = t(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
    let r = |kind, axes: &[usize]| ev(Op::Reduce { kind, axes: axes.to_vec() }, &[&x]);
    assert_close(&r(ReduceKind::Sum, &[1]), &[2, 1], &[6., 15.]);
    assert_close(&r(ReduceKind::Sum, &[0]), &[1, 3], &[5., 7., 9.]);
    assert_close(&r(ReduceKind::Mean, &[0, 1]), &[1, 1], &[3.5]);
    assert_close(&r(ReduceKind::Max, &[1]), &[2, 1], &[3., 6.]);
    assert_close(&r(ReduceKind::Min, &[0]), &[1, 3], &[1., 2., 3.]);
    assert_close(&r(ReduceKind::Prod, &[1]), &[2, 1], &[6., 120.]);
    assert_close(&r(ReduceKind::Sum, &[]), &[2, 3], &[1., 2., 3., 4., 5., 6.]);
    let n = t(&[3], &[1., f32::NAN, 2.]);
    let max = ev(Op::Reduce { kind: ReduceKind::Max, axes: vec![0] }, &[&n]);
    assert!(f32s(&max)[0].is_nan());
    let i = ti64(&[2, 2], &[1, 2, 3, 5]);
    assert_eq!(ev(Op::Reduce { kind: ReduceKind::Mean, axes: vec![1] }, &[&i]), ti64(&[2, 1], &[1, 4]));
    assert_eq!(ev(Op::Reduce { kind: ReduceKind::Max, axes: vec![0, 1] }, &[&i]), ti64(&[1, 1], &[5]));
}

#[test]
fn reduce_empty_gives_identity() {
    let x = t(&[2, 0], &[]);
    let r = |kind| f32s(&ev(Op::Reduce { kind, axes: vec![1] }, &[&x])).to_vec();
    assert_eq!(r(ReduceKind::Sum), [0., 0.]);
    assert_eq!(r(ReduceKind::Prod), [1., 1.]);
    assert_eq!(r(ReduceKind::Max), [f32::NEG_INFINITY; 2]);
    assert_eq!(r(ReduceKind::Min), [f32::INFINITY; 2]);
    assert!(r(ReduceKind::Mean).iter().all(|v| v.is_nan()));
}

#[test]
fn arg_reduce_ties_and_nan() {
    let x = t(&[2, 3], &[2., 1., 2., 0., 3., 3.]);
    let arg = |kind, axis, last| ev(Op::ArgReduce { kind, axis, select_last_index: last }, &[&x]);
    assert_eq!(arg(ArgKind::Max, 1, false), ti64(&[2, 1], &[0, 1]));
    assert_eq!(arg(ArgKind::Max, 1, true), ti64(&[2, 1], &[2, 2]));
    assert_eq!(arg(ArgKind::Min, 0, false), ti64(&[1, 3], &[1, 0, 0]));
    assert_eq!(arg(ArgKind::Min, 1, false), ti64(&[2, 1], &[1, 0]));
    // ONNX ArgMax example.
    let x = t(&[2, 2], &[2., 1., 3., 10.]);
    assert_eq!(
        ev(Op::ArgReduce { kind: ArgKind::Max, axis: 1, select_last_index: false }, &[&x]),
        ti64(&[2, 1], &[0, 1])
    );
    let x = t(&[4], &[1., f32::NAN, 5., f32::NAN]);
    let first = ev(Op::ArgReduce { kind: ArgKind::Max, axis: 0, select_last_index: false }, &[&x]);
    assert_eq!(first, ti64(&[1], &[1]));
    let last = ev(Op::ArgReduce { kind: ArgKind::Min, axis: 0, select_last_index: true }, &[&x]);
    assert_eq!(last, ti64(&[1], &[3]));
}

// ---------- data movement ----------

#[test]
fn reshape_and_broadcast() {
    let x = t(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
    assert_close(&ev_typed(Op::Reshape, &[&x], &[3, 2]), &[3, 2], &[1., 2., 3., 4., 5., 6.]);
    let b = t(&[3], &[1., 2., 3.]);
    assert_close(&ev_typed(Op::Broadcast, &[&b], &[2, 3]), &[2, 3], &[1., 2., 3., 1., 2., 3.]);
    let c = t(&[2, 1], &[1., 2.]);
    assert_close(&ev_typed(Op::Broadcast, &[&c], &[1, 2, 2]), &[1, 2, 2], &[1., 1., 2., 2.]);
}

#[test]
fn transpose_examples() {
    let x = t(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
    assert_close(&ev(Op::Transpose { perm: vec![1, 0] }, &[&x]), &[3, 2], &[1., 4., 2., 5., 3., 6.]);
    // Output axis d is input axis perm[d]: out[a, b, c] = x[b, c, a].
    let x = t(&[2, 3, 4], &(0..24).map(|v| v as f32).collect::<Vec<_>>());
    let out = ev(Op::Transpose { perm: vec![2, 0, 1] }, &[&x]);
    assert_eq!(out.shape, [4, 2, 3]);
    let o = f32s(&out);
    for a in 0..4 {
        for b in 0..2 {
            for c in 0..3 {
                assert_eq!(o[(a * 2 + b) * 3 + c], ((b * 3 + c) * 4 + a) as f32);
            }
        }
    }
}

#[test]
fn slice_with_negative_steps() {
    let x = t(&[5], &[0., 1., 2., 3., 4.]);
    let s = ev_typed(Op::Slice { starts: vec![4], steps: vec![-2] }, &[&x], &[3]);
    assert_close(&s, &[3], &[4., 2., 0.]);
    let x = t(&[3, 4], &(0..12).map(|v| v as f32).collect::<Vec<_>>());
    let s = ev_typed(Op::Slice { starts: vec![1, 3], steps: vec![1, -1] }, &[&x], &[2, 3]);
    assert_close(&s, &[2, 3], &[7., 6., 5., 11., 10., 9.]);
    let empty = ev_typed(Op::Slice { starts: vec![0, 0], steps: vec![1, 1] }, &[&x], &[0, 4]);
    assert_eq!(empty.shape, [0, 4]);
}

fn pad(x: &Tensor, begins: &[i64], ends: &[i64], mode: PadMode) -> Tensor {
    ev(Op::Pad { begins: begins.to_vec(), ends: ends.to_vec(), mode }, &[x])
}

#[test]
fn pad_modes() {
    let x = t(&[3], &[1., 2., 3.]);
    assert_close(&pad(&x, &[1], &[2], PadMode::Constant(Scalar::F32(0.))), &[6], &[0., 1., 2., 3., 0., 0.]);
    assert_close(&pad(&x, &[2], &[2], PadMode::Reflect), &[7], &[3., 2., 1., 2., 3., 2., 1.]);
    assert_close(&pad(&x, &[2], &[2], PadMode::Edge), &[7], &[1., 1., 1., 2., 3., 3., 3.]);
    assert_close(&pad(&x, &[2], &[2], PadMode::Wrap), &[7], &[2., 3., 1., 2., 3., 1., 2.]);
    // numpy 'reflect' keeps bouncing when the pad exceeds the extent.
    assert_close(&pad(&x, &[5], &[0], PadMode::Reflect), &[8], &[2., 1., 2., 3., 2., 1., 2., 3.]);
    // ONNX Pad doc examples (reflect and edge on axis 1).
    let d = t(&[3, 2], &[1.0, 1.2, 2.3, 3.4, 4.5, 5.7]);
    let r = pad(&d, &[0, 2], &[0, 0], PadMode::Reflect);
    assert_close(&r, &[3, 4], &[1.0, 1.2, 1.0, 1.2, 2.3, 3.4, 2.3, 3.4, 4.5, 5.7, 4.5, 5.7]);
    let e = pad(&d, &[0, 2], &[0, 0], PadMode::Edge);
    assert_close(&e, &[3, 4], &[1.0, 1.0, 1.0, 1.2, 2.3, 2.3, 2.3, 3.4, 4.5, 4.5, 4.5, 5.7]);
    let i = ti64(&[2], &[5, 6]);
    let p = pad(&i, &[1], &[0], PadMode::Constant(Scalar::I64(-1)));
    assert_eq!(p, ti64(&[3], &[-1, 5, 6]));
}

#[test]
fn pad_negative_crops_first() {
    let x = t(&[4], &[1., 2., 3., 4.]);
    assert_close(&pad(&x, &[-1], &[1], PadMode::Constant(Scalar::F32(9.))), &[4], &[2., 3., 4., 9.]);
    assert_close(&pad(&x, &[-1], &[-2], PadMode::Edge), &[1], &[2.]);
    // Wrap and reflect read the cropped data [2, 3, 4].
    assert_close(&pad(&x, &[-1], &[1], PadMode::Wrap), &[4], &[2., 3., 4., 2.]);
    assert_close(&pad(&x, &[-1], &[2], PadMode::Reflect), &[5], &[2., 3., 4., 3., 2.]);
    assert!(ev_result(Op::Pad { begins: vec![-3], ends: vec![-2], mode: PadMode::Edge }, &[&x]).is_err());
}

#[test]
fn concat_axes() {
    let a = t(&[2, 1], &[1., 2.]);
    let b = t(&[2, 2], &[3., 4., 5., 6.]);
    assert_close(&ev(Op::Concat { axis: 1 }, &[&a, &b]), &[2, 3], &[1., 3., 4., 2., 5., 6.]);
    let c = t(&[1, 2], &[7., 8.]);
    assert_close(&ev(Op::Concat { axis: 0 }, &[&b, &c]), &[3, 2], &[3., 4., 5., 6., 7., 8.]);
    let i = ev(Op::Concat { axis: 0 }, &[&ti64(&[1], &[1]), &ti64(&[2], &[2, 3])]);
    assert_eq!(i, ti64(&[3], &[1, 2, 3]));
}

#[test]
fn gather_examples() {
    // ONNX Gather doc, axis 0.
    let data = t(&[3, 2], &[1.0, 1.2, 2.3, 3.4, 4.5, 5.7]);
    let idx = ti64(&[2, 2], &[0, 1, 1, 2]);
    let out = ev(Op::Gather { axis: 0 }, &[&data, &idx]);
    assert_close(&out, &[2, 2, 2], &[1.0, 1.2, 2.3, 3.4, 2.3, 3.4, 4.5, 5.7]);
    // ONNX Gather doc, axis 1.
    let data = t(&[3, 3], &[1.0, 1.2, 1.9, 2.3, 3.4, 3.9, 4.5, 5.7, 5.9]);
    let idx = ti32(&[1, 2], &[0, 2]);
    let out = ev(Op::Gather { axis: 1 }, &[&data, &idx]);
    assert_close(&out, &[3, 1, 2], &[1.0, 1.9, 2.3, 3.9, 4.5, 5.9]);
    // Negative indices count from the end; a scalar index drops the axis.
    let out = ev(Op::Gather { axis: 1 }, &[&data, &ti64(&[], &[-1])]);
    assert_close(&out, &[3], &[1.9, 3.9, 5.9]);
    let err = ev_result(Op::Gather { axis: 0 }, &[&data, &ti64(&[1], &[3])]).unwrap_err();
    assert!(err.contains("out of range"), "{err}");
    assert!(ev_result(Op::Gather { axis: 0 }, &[&data, &ti64(&[1], &[-4])]).is_err());
}

#[test]
fn gather_elements_examples() {
    // ONNX GatherElements doc examples.
    let data = t(&[2, 2], &[1., 2., 3., 4.]);
    let idx = ti64(&[2, 2], &[0, 0, 1, 0]);
    assert_close(&ev(Op::GatherElements { axis: 1 }, &[&data, &idx]), &[2, 2], &[1., 1., 4., 3.]);
    let data = t(&[3, 3], &[1., 2., 3., 4., 5., 6., 7., 8., 9.]);
    let idx = ti32(&[2, 3], &[1, 2, 0, 2, 0, 0]);
    assert_close(&ev(Op::GatherElements { axis: 0 }, &[&data, &idx]), &[2, 3], &[4., 8., 3., 7., 2., 3.]);
    let idx = ti64(&[2, 3], &[-1, -2, 0, -3, 0, 0]);
    assert_close(&ev(Op::GatherElements { axis: 0 }, &[&data, &idx]), &[2, 3], &[7., 5., 3., 1., 2., 3.]);
    assert!(ev_result(Op::GatherElements { axis: 0 }, &[&data, &ti64(&[1, 1], &[3])]).is_err());
}

#[test]
fn resample_nearest_and_linear() {
    let x = t(&[2, 2], &[1., 2., 10., f32::INFINITY]);
    let nearest = Op::Resample { axis: 1, lo: vec![0, 0, 1, 1], hi: vec![0, 0, 1, 1], weight_hi: vec![0.; 4] };
    assert_close(&ev(nearest, &[&x]), &[2, 4], &[1., 1., 2., 2., 10., 10., f32::INFINITY, f32::INFINITY]);
    let x = t(&[1, 3], &[1., 2., 4.]);
    let linear = Op::Resample { axis: 1, lo: vec![0, 1, 1], hi: vec![1, 2, 2], weight_hi: vec![0.25, 0.5, 1.] };
    assert_close(&ev(linear, &[&x]), &[1, 3], &[1.25, 3., 4.]);
    let rows = Op::Resample { axis: 0, lo: vec![0, 0], hi: vec![0, 0], weight_hi: vec![0., 0.] };
    assert_close(&ev(rows, &[&x]), &[2, 3], &[1., 2., 4., 1., 2., 4.]);
}

// ---------- epilogue, graphs, errors ----------

#[test]
fn epilogue_residual_add_then_relu() {
    let x = t(&[1, 1, 1, 3], &[1., -2., 3.]);
    let w = t(&[1, 1, 1, 1], &[2.]);
    let residual = t(&[1, 1, 1, 3], &[1., 1., -10.]);
    let shift = t(&[1, 1, 1, 1], &[0.5]);
    let inputs = [&x, &w, &residual, &shift];
    let mut out = eval(&Op::Conv(geometry(2)), &inputs[..2], &[], &[]).unwrap().remove(0);
    let steps = [
        EpilogueStep::Binary { func: BinaryFn::Add, operand: 2 },
        EpilogueStep::Binary { func: BinaryFn::Sub, operand: 3 },
        EpilogueStep::Unary(UnaryFn::Relu),
    ];
    apply_epilogue(&mut out, &steps, &inputs).unwrap();
    assert_close(&out, &[1, 1, 1, 3], &[2.5, 0., 0.]);
    let bad = [EpilogueStep::Binary { func: BinaryFn::Add, operand: 7 }];
    assert!(apply_epilogue(&mut out, &bad, &inputs).is_err());
    // An operand that would grow the output is rejected.
    let big = t(&[2, 1, 1, 3], &[0.; 6]);
    let grow = [EpilogueStep::Binary { func: BinaryFn::Add, operand: 0 }];
    assert!(apply_epilogue(&mut out, &grow, &[&big]).is_err());
}

/// x -> conv(x, w) + bias epilogue relu -> y; and z = x * 2 reading x again late.
fn small_graph() -> (Graph, ValueId, ValueId) {
    let mut g = Graph::new("small");
    let x = g.add_input(TensorType::f32([1, 1, 1, 3]), "x");
    let w = g.add_constant("w", t(&[1, 1, 1, 1], &[-1.]));
    let y = g.push1("conv", Op::Conv(geometry(2)), &[x, w]).unwrap();
    g.nodes.last_mut().unwrap().epilogue.push(EpilogueStep::Unary(UnaryFn::Relu));
    let two = g.add_constant("two", t(&[], &[2.]));
    let z = g.push1("double", Op::Binary(BinaryFn::Mul), &[x, two]).unwrap();
    let sum = g.push1("sum", Op::Binary(BinaryFn::Add), &[y, z]).unwrap();
    g.outputs = vec![sum, y, sum];
    (g, y, z)
}

#[test]
fn run_graph_and_all_values() {
    let (g, y, z) = small_graph();
    let x = t(&[1, 1, 1, 3], &[1., -2., 3.]);
    let outs = run(&g, std::slice::from_ref(&x)).unwrap();
    assert_eq!(outs.len(), 3);
    assert_close(&outs[1], &[1, 1, 1, 3], &[0., 2., 0.]);
    assert_close(&outs[0], &[1, 1, 1, 3], &[2., -2., 6.]);
    assert_eq!(outs[0], outs[2]);
    let all = run_all(&g, &[x]).unwrap();
    assert_eq!(all.len(), g.values.len());
    assert!(all.iter().all(Option::is_some));
    assert_close(all[z.index()].as_ref().unwrap(), &[1, 1, 1, 3], &[2., -4., 6.]);
    assert_close(all[y.index()].as_ref().unwrap(), &[1, 1, 1, 3], &[0., 2., 0.]);
}

#[test]
fn run_rejects_wrong_inputs_with_clear_messages() {
    let (g, _, _) = small_graph();
    let err = run(&g, &[]).unwrap_err();
    assert!(err.contains("takes 1 inputs, got 0"), "{err}");
    let err = run(&g, &[t(&[1, 1, 3, 1], &[1., 2., 3.])]).unwrap_err();
    assert!(err.contains("'x'") && err.contains("f32[1,1,1,3]") && err.contains("f32[1,1,3,1]"), "{err}");
    let err = run(&g, &[ti64(&[1, 1, 1, 3], &[1, 2, 3])]).unwrap_err();
    assert!(err.contains("i64[1,1,1,3]"), "{err}");
}

#[test]
fn run_reports_the_failing_node() {
    let mut g = Graph::new("gather");
    let data = g.add_input(TensorType::f32([3]), "data");
    let idx = g.add_constant("idx", ti64(&[1], &[5]));
    let out = g.push1("pick", Op::Gather { axis: 0 }, &[data, idx]).unwrap();
    g.outputs = vec![out];
    let err = run(&g, &[t(&[3], &[1., 2., 3.])]).unwrap_err();
    assert!(err.contains("'pick'") && err.contains("index 5"), "{err}");
}

#[test]
fn eval_rejects_malformed_calls() {
    let x = t(&[2], &[1., 2.]);
    // Wrong arity, inconsistent tensor, missing declared type, mismatched declared type.
    assert!(eval(&Op::Binary(BinaryFn::Add), &[&x], &[], &[]).is_err());
    let broken = Tensor { shape: vec![3], data: TensorData::F32(vec![1.]) };
    assert!(eval(&Op::Unary(UnaryFn::Neg), &[&broken], &[], &[]).is_err());
    assert!(eval(&Op::Reshape, &[&x], &[], &[]).is_err());
    assert!(eval(&Op::Unary(UnaryFn::Neg), &[&x], &[TensorType::f32([3])], &[]).is_err());
    assert!(eval(&Op::Constant(ConstId(0)), &[], &[], &[]).is_err());
    let c = Constant::from_tensor("c", t(&[2], &[4., 4.]));
    let out = eval(&Op::Constant(ConstId(0)), &[], &[], std::slice::from_ref(&c)).unwrap();
    assert_eq!(out[0], t(&[2], &[4., 4.]));
}

// ---------- properties ----------

/// A direct, per-output-element convolution: the formula of `Op::Conv` written
/// with no cleverness, to check the interpreter's tap-plan implementation.
fn naive_conv(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, g: &ConvGeometry) -> Tensor {
    let k = x.shape.len() - 2;
    let out_spatial: Vec<usize> = (0..k)
        .map(|d| {
            let span = g.dilations[d] * (w.shape[2 + d] - 1) + 1;
            (x.shape[2 + d] + g.pads_begin[d] + g.pads_end[d] - span) / g.strides[d] + 1
        })
        .collect();
    let (n, m, cg) = (x.shape[0], w.shape[0], w.shape[1]);
    let mut shape = vec![n, m];
    shape.extend(&out_spatial);
    let (xs, ws) = (f32s(x), f32s(w));
    let xstr = strides(&x.shape);
    let wstr = strides(&w.shape);
    let ker = &w.shape[2..];
    let mut out = Vec::new();
    for o in multi_indices(&shape) {
        let group = o[1] / (m / g.groups);
        let mut acc = 0f32;
        for ci in 0..cg {
            let c = group * cg + ci;
            for t in multi_indices(ker) {
                let mut xi = o[0] * xstr[0] + c * xstr[1];
                let mut inside = true;
                for d in 0..k {
                    let p = (o[2 + d] * g.strides[d] + t[d] * g.dilations[d]) as isize - g.pads_begin[d] as isize;
                    inside &= p >= 0 && p < x.shape[2 + d] as isize;
                    xi = xi.wrapping_add((p as usize).wrapping_mul(xstr[2 + d]));
                }
                if inside {
                    let wi = o[1] * wstr[0] + ci * wstr[1] + (0..k).map(|d| t[d] * wstr[2 + d]).sum::<usize>();
                    acc += xs[xi] * ws[wi];
                }
            }
        }
        out.push(acc + bias.map_or(0., |b| f32s(b)[o[1]]));
    }
    Tensor::f32(shape, out)
}

/// A direct scatter formulation of `Op::ConvTranspose`.
fn naive_conv_transpose(x: &Tensor, w: &Tensor, g: &ConvGeometry, out_shape: &[usize]) -> Tensor {
    let k = x.shape.len() - 2;
    let (c, mg) = (x.shape[1], w.shape[1]);
    let cg = c / g.groups;
    let ostr = strides(out_shape);
    let mut out = vec![0f32; out_shape.iter().product()];
    let (xs, ws) = (f32s(x), f32s(w));
    let xstr = strides(&x.shape);
    let wstr = strides(&w.shape);
    for i in multi_indices(&x.shape) {
        let group = i[1] / cg;
        for mo in 0..mg {
            for t in multi_indices(&w.shape[2..]) {
                let mut oi = i[0] * ostr[0] + (group * mg + mo) * ostr[1];
                let mut inside = true;
                for d in 0..k {
                    let p = (i[2 + d] * g.strides[d] + t[d] * g.dilations[d]) as isize - g.pads_begin[d] as isize;
                    inside &= p >= 0 && p < out_shape[2 + d] as isize;
                    oi = oi.wrapping_add((p as usize).wrapping_mul(ostr[2 + d]));
                }
                if inside {
                    let xi: usize = (0..k + 2).map(|d| i[d] * xstr[d]).sum();
                    let wi = i[1] * wstr[0] + mo * wstr[1] + (0..k).map(|d| t[d] * wstr[2 + d]).sum::<usize>();
                    out[oi] += xs[xi] * ws[wi];
                }
            }
        }
    }
    Tensor::f32(out_shape.to_vec(), out)
}

fn multi_indices(shape: &[usize]) -> Vec<Vec<usize>> {
    let mut all = vec![vec![]];
    for &extent in shape {
        all = all.into_iter().flat_map(|p| (0..extent).map(move |i| [p.clone(), vec![i]].concat())).collect();
    }
    all
}

fn close_tensors(a: &Tensor, b: &Tensor) -> Result<(), TestCaseError> {
    prop_assert_eq!(&a.shape, &b.shape);
    for (i, (&x, &y)) in f32s(a).iter().zip(f32s(b)).enumerate() {
        let same = x == y || (x.is_nan() && y.is_nan()) || (x - y).abs() <= 1e-4 * (1. + y.abs());
        prop_assert!(same, "element {}: {} vs {}", i, x, y);
    }
    Ok(())
}

fn small_values(n: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-4i32..=4, n).prop_map(|v| v.into_iter().map(|i| i as f32 * 0.5).collect())
}

#[derive(Debug, Clone)]
struct ConvProblem {
    x: Tensor,
    w: Tensor,
    bias: Option<Tensor>,
    g: ConvGeometry,
}

fn conv_problem() -> impl Strategy<Value = ConvProblem> {
    (1usize..=3, 1usize..=3, 1usize..=2, 1usize..=2, 1usize..=2, any::<bool>())
        .prop_flat_map(|(k, groups, cg, mg, batch, with_bias)| {
            let axis = (1usize..=3, 1usize..=2, 1usize..=2, 0usize..=2, 0usize..=2, 0usize..=3);
            (Just((k, groups, cg, mg, batch, with_bias)), prop::collection::vec(axis, k))
        })
        .prop_flat_map(|((_, groups, cg, mg, batch, with_bias), axes)| {
            let kernel: Vec<usize> = axes.iter().map(|a| a.0).collect();
            // Input extent = window span + extra, so at least one output exists.
            let input: Vec<usize> = axes.iter().map(|a| a.2 * (a.0 - 1) + 1 + a.5).collect();
            let g = ConvGeometry {
                strides: axes.iter().map(|a| a.1).collect(),
                dilations: axes.iter().map(|a| a.2).collect(),
                pads_begin: axes.iter().map(|a| a.3).collect(),
                pads_end: axes.iter().map(|a| a.4).collect(),
                groups,
            };
            let mut x_shape = vec![batch, groups * cg];
            x_shape.extend(&input);
            let mut w_shape = vec![groups * mg, cg];
            w_shape.extend(&kernel);
            let (xn, wn) = (x_shape.iter().product(), w_shape.iter().product());
            (small_values(xn), small_values(wn), small_values(groups * mg)).prop_map(move |(xv, wv, bv)| ConvProblem {
                x: Tensor::f32(x_shape.clone(), xv),
                w: Tensor::f32(w_shape.clone(), wv),
                bias: with_bias.then(|| Tensor::f32(vec![bv.len()], bv)),
                g: g.clone(),
            })
        })
}

fn shape_strategy(max_rank: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..=4, 1..=max_rank)
}

fn tensor_of(shape: Vec<usize>) -> impl Strategy<Value = Tensor> {
    let n = shape.iter().product();
    small_values(n).prop_map(move |v| Tensor::f32(shape.clone(), v))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn conv_matches_direct_formula(p in conv_problem()) {
        let mut inputs = vec![&p.x, &p.w];
        if let Some(b) = &p.bias { inputs.push(b); }
        let got = ev(Op::Conv(p.g.clone()), &inputs);
        close_tensors(&got, &naive_conv(&p.x, &p.w, p.bias.as_ref(), &p.g))?;
    }

    #[test]
    fn conv_transpose_matches_direct_scatter(p in conv_problem(), extra in 0usize..=2) {
        // Reuse the problem's geometry with the weight read as [C, M/groups, *k].
        let groups = p.g.groups;
        let c = p.x.shape[1];
        let mg = p.w.shape[0] / groups;
        let mut w_shape = vec![c, mg];
        w_shape.extend(&p.w.shape[2..]);
        let w_values: Vec<f32> = (0..w_shape.iter().product::<usize>()).map(|i| f32s(&p.w)[i % p.w.numel()]).collect();
        let w = Tensor::f32(w_shape, w_values);
        let mut out_shape = vec![p.x.shape[0], mg * groups];
        for d in 0..p.x.shape.len() - 2 {
            let full = (p.x.shape[2 + d] - 1) * p.g.strides[d] + p.g.dilations[d] * (w.shape[2 + d] - 1) + 1 + extra;
            out_shape.push(full.saturating_sub(p.g.pads_begin[d] + p.g.pads_end[d]).max(1));
        }
        let got = ev_typed(Op::ConvTranspose(p.g.clone()), &[&p.x, &w], &out_shape);
        close_tensors(&got, &naive_conv_transpose(&p.x, &w, &p.g, &out_shape))?;
    }

    #[test]
    fn conv_with_identity_kernel_is_identity(
        (n, c, h, w) in (1usize..=2, 1usize..=4, 1usize..=5, 1usize..=5),
        seed in any::<u32>(),
    ) {
        let values: Vec<f32> = (0..n * c * h * w).map(|i| ((i as u32).wrapping_mul(2654435761) ^ seed) as f32 * 1e-6).collect();
        let x = Tensor::f32(vec![n, c, h, w], values);
        let identity: Vec<f32> = (0..c * c).map(|i| if i / c == i % c { 1. } else { 0. }).collect();
        let kernel = Tensor::f32(vec![c, c, 1, 1], identity);
        prop_assert_eq!(conv(&x, &kernel, geometry(2)), x);
    }

    #[test]
    fn grouped_conv_is_concat_of_group_convs(p in conv_problem()) {
        let groups = p.g.groups;
        let whole = ev(Op::Conv(p.g.clone()), &[&p.x, &p.w]);
        let (cg, mg) = (p.x.shape[1] / groups, p.w.shape[0] / groups);
        let single = ConvGeometry { groups: 1, ..p.g.clone() };
        let parts: Vec<Tensor> = (0..groups).map(|gi| {
            let xs = channel_slice(&p.x, gi * cg, cg);
            let ws = channel_slice_axis0(&p.w, gi * mg, mg);
            ev(Op::Conv(single.clone()), &[&xs, &ws])
        }).collect();
        let refs: Vec<&Tensor> = parts.iter().collect();
        prop_assert_eq!(ev(Op::Concat { axis: 1 }, &refs), whole);
    }

    #[test]
    fn pool_matches_direct_formula(
        x in (1usize..=2, 1usize..=6, 1usize..=6).prop_flat_map(|(c, h, w)| tensor_of(vec![1, c, h, w])),
        kernel in (1usize..=3, 1usize..=3),
        strides in (1usize..=2, 1usize..=2),
        pads in (0usize..=1, 0usize..=1, 0usize..=1, 0usize..=1),
        ceil in any::<bool>(),
        kind in prop_oneof![Just(PoolKind::Max), Just(AVG_EXCLUDE), Just(AVG_INCLUDE)],
    ) {
        let kernel = [kernel.0, kernel.1];
        let strides = [strides.0, strides.1];
        let pads_begin = [pads.0, pads.1];
        let pads_end = [pads.2, pads.3];
        let mut out_shape = vec![x.shape[0], x.shape[1]];
        for d in 0..2 {
            let padded = x.shape[2 + d] + pads_begin[d] + pads_end[d];
            prop_assume!(padded >= kernel[d] && pads_begin[d] < kernel[d] && pads_end[d] < kernel[d]);
            let span = padded - kernel[d];
            out_shape.push(if ceil { span.div_ceil(strides[d]) + 1 } else { span / strides[d] + 1 });
        }
        let p = pool_attrs(kind, &kernel, &strides, (&pads_begin, &pads_end));
        let got = ev_typed(Op::Pool(p), &[&x], &out_shape);
        let xs = f32s(&x);
        let (hh, ww) = (x.shape[2] as isize, x.shape[3] as isize);
        let mut expected = Vec::new();
        for o in multi_indices(&out_shape) {
            let mut acc = if kind == PoolKind::Max { f32::NEG_INFINITY } else { 0. };
            let (mut inside, mut padded) = (0, 0);
            for i in 0..kernel[0] {
                for j in 0..kernel[1] {
                    let r = (o[2] * strides[0] + i) as isize - pads_begin[0] as isize;
                    let c = (o[3] * strides[1] + j) as isize - pads_begin[1] as isize;
                    if r < hh + pads_end[0] as isize && c < ww + pads_end[1] as isize {
                        padded += 1;
                    }
                    if r >= 0 && r < hh && c >= 0 && c < ww {
                        inside += 1;
                        let v = xs[((o[1] * x.shape[2]) + r as usize) * x.shape[3] + c as usize];
                        acc = if kind == PoolKind::Max { acc.max(v) } else { acc + v };
                    }
                }
            }
            expected.push(match kind {
                PoolKind::Max => acc,
                PoolKind::Avg { count_include_pad: true } => acc / padded as f32,
                PoolKind::Avg { count_include_pad: false } => acc / inside as f32,
            });
        }
        close_tensors(&got, &Tensor::f32(out_shape, expected))?;
    }

    #[test]
    fn transpose_then_inverse_is_identity(
        (x, perm) in shape_strategy(4).prop_flat_map(|s| {
            let rank = s.len();
            (tensor_of(s), Just((0..rank).collect::<Vec<_>>()).prop_shuffle())
        })
    ) {
        let mut inverse = vec![0; perm.len()];
        for (d, &p) in perm.iter().enumerate() { inverse[p] = d; }
        let y = ev(Op::Transpose { perm: perm.clone() }, &[&x]);
        let expected_shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
        prop_assert_eq!(&y.shape, &expected_shape);
        prop_assert_eq!(ev(Op::Transpose { perm: inverse }, &[&y]), x);
    }

    #[test]
    fn slices_concat_back(
        (x, axis, cut) in shape_strategy(4).prop_flat_map(|s| {
            let rank = s.len();
            (Just(s.clone()), 0..rank).prop_flat_map(|(s, axis)| (tensor_of(s.clone()), Just(axis), 0..=s[axis]))
        })
    ) {
        let rank = x.shape.len();
        let part = |start: usize, len: usize| {
            let mut starts = vec![0; rank];
            starts[axis] = start;
            let mut shape = x.shape.clone();
            shape[axis] = len;
            ev_typed(Op::Slice { starts, steps: vec![1; rank] }, &[&x], &shape)
        };
        let extent = x.shape[axis];
        let (a, b) = (part(0, cut), part(cut.min(extent - 1), extent - cut));
        prop_assert_eq!(ev(Op::Concat { axis }, &[&a, &b]), x.clone());
        // Reversing twice with step -1 is the identity too.
        let mut starts = vec![0; rank];
        starts[axis] = extent - 1;
        let mut steps = vec![1; rank];
        steps[axis] = -1;
        let reversed = ev_typed(Op::Slice { starts: starts.clone(), steps: steps.clone() }, &[&x], &x.shape);
        prop_assert_eq!(ev_typed(Op::Slice { starts, steps }, &[&reversed], &x.shape), x);
    }

    #[test]
    fn pad_then_negative_pad_is_identity(
        (x, pads) in shape_strategy(3).prop_flat_map(|s| {
            let rank = s.len();
            (tensor_of(s), prop::collection::vec((0i64..=5, 0i64..=5), rank))
        }),
        mode in prop_oneof![
            Just(PadMode::Constant(Scalar::F32(7.))), Just(PadMode::Reflect), Just(PadMode::Edge), Just(PadMode::Wrap)
        ],
    ) {
        let begins: Vec<i64> = pads.iter().map(|p| p.0).collect();
        let ends: Vec<i64> = pads.iter().map(|p| p.1).collect();
        let padded = pad(&x, &begins, &ends, mode);
        let negate = |v: &[i64]| v.iter().map(|p| -p).collect::<Vec<_>>();
        prop_assert_eq!(pad(&padded, &negate(&begins), &negate(&ends), mode), x);
    }

    #[test]
    fn reduce_sum_over_all_axes_is_the_total(x in shape_strategy(4).prop_flat_map(tensor_of)) {
        let axes: Vec<usize> = (0..x.shape.len()).collect();
        let sum = ev(Op::Reduce { kind: ReduceKind::Sum, axes }, &[&x]);
        prop_assert!(sum.shape.iter().all(|&d| d == 1));
        // Halves of small integers add exactly in f32, so any order gives the same total.
        let total: f32 = f32s(&x).iter().sum();
        prop_assert_eq!(f32s(&sum), &[total][..]);
        let as_int = ev(Op::Cast { to: DType::I64 }, &[&ev(Op::Unary(UnaryFn::Affine { scale: 2., shift: 0. }), &[&x])]);
        let int_axes: Vec<usize> = (0..x.shape.len()).collect();
        let int_sum = ev(Op::Reduce { kind: ReduceKind::Sum, axes: int_axes }, &[&as_int]);
        prop_assert_eq!(int_sum.data.to_i64_vec().unwrap(), vec![(total * 2.) as i64]);
    }

    #[test]
    fn gather_with_arange_is_identity(
        (x, axis) in shape_strategy(4).prop_flat_map(|s| { let rank = s.len(); (tensor_of(s), 0..rank) }),
        negative in any::<bool>(),
    ) {
        let extent = x.shape[axis] as i64;
        let indices: Vec<i64> = (0..extent).map(|i| if negative { i - extent } else { i }).collect();
        let idx = ti64(&[extent as usize], &indices);
        prop_assert_eq!(ev(Op::Gather { axis }, &[&x, &idx]), x);
    }
}

fn channel_slice(x: &Tensor, start: usize, len: usize) -> Tensor {
    let rank = x.shape.len();
    let mut starts = vec![0; rank];
    starts[1] = start;
    let mut shape = x.shape.clone();
    shape[1] = len;
    ev_typed(Op::Slice { starts, steps: vec![1; rank] }, &[x], &shape)
}

fn channel_slice_axis0(w: &Tensor, start: usize, len: usize) -> Tensor {
    let rank = w.shape.len();
    let mut starts = vec![0; rank];
    starts[0] = start;
    let mut shape = w.shape.clone();
    shape[0] = len;
    ev_typed(Op::Slice { starts, steps: vec![1; rank] }, &[w], &shape)
}

#[test]
fn interp_module_is_reachable() {
    // The public path others code against.
    let _: fn(&Graph, &[Tensor]) -> Result<Vec<Tensor>, String> = interp::run;
}
