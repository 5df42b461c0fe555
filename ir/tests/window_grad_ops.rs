//! `pool_grad` and `conv_weight_grad`: text round trip, typing rules and the
//! interpreter on hand-computed cases.

use cnnc_ir::{ConvGeometry, Graph, Op, PoolAttrs, PoolKind, Tensor, TensorType, interp, parse, print, verify};

fn max_pool_3x3() -> PoolAttrs {
    PoolAttrs {
        kind: PoolKind::Max,
        kernel: vec![3, 3],
        strides: vec![1, 1],
        dilations: vec![1, 1],
        pads_begin: vec![1, 1],
        pads_end: vec![1, 1],
    }
}

fn depthwise_geometry() -> ConvGeometry {
    ConvGeometry { strides: vec![2, 1], dilations: vec![1, 2], pads_begin: vec![1, 0], pads_end: vec![1, 2], groups: 4 }
}

#[test]
fn text_round_trip_and_verify() {
    let mut g = Graph::new("grads");
    let x = g.add_input(TensorType::f32([2, 4, 6, 6]), "x");
    let dy = g.add_input(TensorType::f32([2, 4, 6, 6]), "dy");
    let dx = g.push1("dx", Op::PoolGrad(max_pool_3x3()), &[x, dy]).unwrap();
    let gy = g.add_input(TensorType::f32([2, 4, 3, 6]), "gy");
    let dw = g
        .push_typed("dw", Op::ConvWeightGrad(depthwise_geometry()), &[x, gy], TensorType::f32([4, 1, 3, 2]))
        .unwrap();
    g.outputs = vec![dx, dw];
    verify(&g).unwrap();
    let text = print(&g);
    assert!(text.contains("pool_grad max"), "{text}");
    assert!(text.contains("conv_weight_grad"), "{text}");
    assert_eq!(parse(&text).unwrap(), g);
}

#[test]
fn typing_rejects_inconsistent_nodes() {
    let mut g = Graph::new("bad");
    let x = g.add_input(TensorType::f32([2, 4, 6, 6]), "x");
    let dy = g.add_input(TensorType::f32([2, 3, 6, 6]), "dy");
    let err = g.push1("dx", Op::PoolGrad(max_pool_3x3()), &[x, dy]).unwrap_err();
    assert!(err.contains("does not fit"), "{err}");
    let avg = PoolAttrs { kind: PoolKind::Avg { count_include_pad: true }, ..max_pool_3x3() };
    let err = g.push1("dx", Op::PoolGrad(avg), &[x, x]).unwrap_err();
    assert!(err.contains("only max pooling"), "{err}");
    // dy's extent is not the convolution's output extent.
    let gy = g.add_input(TensorType::f32([2, 4, 4, 6]), "gy");
    let err = g
        .push_typed("dw", Op::ConvWeightGrad(depthwise_geometry()), &[x, gy], TensorType::f32([4, 1, 3, 2]))
        .unwrap_err();
    assert!(err.contains("does not fit"), "{err}");
}

#[test]
fn pool_grad_routes_to_first_maximum_and_skips_nan_losers() {
    // One row, windows of 2 with stride 1: [3, 3, 1, NaN, 5].
    let attrs = PoolAttrs {
        kind: PoolKind::Max,
        kernel: vec![2],
        strides: vec![1],
        dilations: vec![1],
        pads_begin: vec![0],
        pads_end: vec![0],
    };
    let x = Tensor::f32([1, 1, 5], vec![3.0, 3.0, 1.0, f32::NAN, 5.0]);
    let dy = Tensor::f32([1, 1, 4], vec![1.0, 10.0, 100.0, 1000.0]);
    let got = interp::eval(&Op::PoolGrad(attrs), &[&x, &dy], &[], &[]).unwrap();
    // Window 0 ties -> x[0]; window 1 -> x[1]; windows 2 and 3 -> the NaN at x[3].
    assert_eq!(got[0], Tensor::f32([1, 1, 5], vec![1.0, 10.0, 0.0, 1100.0, 0.0]));
}

#[test]
fn conv_weight_grad_is_the_correlation_of_x_and_dy() {
    // One channel, kernel 2, stride 1, no padding: dw[k] = Σ_o dy[o]·x[o + k].
    let geometry = ConvGeometry { strides: vec![1], dilations: vec![1], pads_begin: vec![0], pads_end: vec![0], groups: 1 };
    let x = Tensor::f32([1, 1, 4], vec![1.0, 2.0, 3.0, 4.0]);
    let dy = Tensor::f32([1, 1, 3], vec![1.0, 10.0, 100.0]);
    let got = interp::eval(&Op::ConvWeightGrad(geometry), &[&x, &dy], &[TensorType::f32([1, 1, 2])], &[]).unwrap();
    assert_eq!(got[0], Tensor::f32([1, 1, 2], vec![321.0, 432.0]));
}
