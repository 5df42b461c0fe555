//! Conv, ConvTranspose and the pools: padding rules (explicit, VALID, SAME_UPPER/LOWER),
//! output extents (ceil mode, dilations, output_shape), groups, and refusals. Expected
//! values come from the ONNX reference implementation (onnx.reference) on the same `wave`
//! data.

mod group_b_support;

use cnnc_ir::{DType, Op};
use cnnc_onnx::attr;
use group_b_support::*;

fn conv_same(auto_pad: &str) -> cnnc_ir::Tensor {
    // 6x6 input, 3x3 kernel, stride 2: total padding 1 is odd, so UPPER and LOWER differ.
    Case::new(17)
        .input("x", wave(&[1, 2, 6, 6], 0))
        .init("w", wave(&[4, 1, 3, 3], 5))
        .init("b", f32s(&[4], &[0.5, -0.5, 1.0, 0.0]))
        .node(
            "Conv",
            &["x", "w", "b"],
            &["y"],
            vec![attr::string("auto_pad", auto_pad), attr::ints("strides", &[2, 2]), attr::int("group", 2)],
        )
        .run_y()
}

#[test]
fn conv_same_padding_puts_the_odd_pixel_where_asked() {
    let lower = [
        1.1875, -3.6875, 2.5625, 0.75, 10.9375, -0.1875, -3.3125, 1.5625, -1.0625, 3.125, -4.125, 2.3125, -0.3125, -8.9375,
        3.0625, -4.3125, -0.6875, 4.9375, 1.125, 0.3125, -1.5625, 2.0625, 1.375, 3.5625, 1.3125, -0.375, 3.9375, -2.125, -1.0,
        0.5, -3.0625, -2.8125, 4.4375, -2.6875, -1.8125, 4.375,
    ];
    let upper = [
        -4.3125, 1.5625, -1.4375, -3.0625, 0.6875, -2.4375, 5.125, -0.375, 0.75, -5.25, -0.6875, 0.5, -4.4375, 1.1875, 0.625,
        -5.375, 1.0, -1.9375, 4.875, -0.375, 1.25, 3.125, -2.125, -2.8125, 0.625, 6.125, -4.25, -4.8125, -1.8125, 0.1875,
        -3.8125, -0.8125, -3.8125, -1.1875, -2.9375, 1.6875,
    ];
    assert_close(&conv_same("SAME_LOWER"), &f32s(&[1, 4, 3, 3], &lower));
    assert_close(&conv_same("SAME_UPPER"), &f32s(&[1, 4, 3, 3], &upper));
}

#[test]
fn conv_1d_with_pads_dilation_and_stride() {
    let y = Case::new(11)
        .input("x", wave(&[1, 1, 7], 0))
        .init("w", wave(&[2, 1, 2], 3))
        .node("Conv", &["x", "w"], &["y"], vec![attr::ints("pads", &[2, 1]), attr::ints("dilations", &[3]), attr::ints("strides", &[2])])
        .run_y();
    assert_close(&y, &f32s(&[1, 2, 4], &[-3.0, 3.625, -3.5, -0.75, -0.75, -0.3125, 2.375, 0.625]));
}

#[test]
fn conv_3d_valid_with_kernel_shape_attribute() {
    let y = Case::new(22)
        .input("x", wave(&[1, 1, 3, 3, 3], 0))
        .init("w", wave(&[1, 1, 2, 2, 2], 1))
        .node("Conv", &["x", "w"], &["y"], vec![attr::string("auto_pad", "VALID"), attr::ints("kernel_shape", &[2, 2, 2])])
        .run_y();
    assert_close(&y, &f32s(&[1, 1, 2, 2, 2], &[11.75, -1.5625, -5.875, -1.125, -7.125, 0.8125, 5.0, -5.125]));
}

#[test]
fn conv_refusals() {
    let mismatched_kernel = Case::new(17)
        .input("x", wave(&[1, 1, 4, 4], 0))
        .init("w", wave(&[1, 1, 3, 3], 1))
        .node("Conv", &["x", "w"], &["y"], vec![attr::ints("kernel_shape", &[2, 2])])
        .load_error(&[("y", DType::F32)]);
    assert_invalid(&mismatched_kernel, "kernel_shape [2, 2]");
    let bad_groups = Case::new(17)
        .input("x", wave(&[1, 3, 4, 4], 0))
        .init("w", wave(&[2, 1, 3, 3], 1))
        .node("Conv", &["x", "w"], &["y"], vec![attr::int("group", 2)])
        .load_error(&[("y", DType::F32)]);
    assert_invalid(&bad_groups, "group=2");
    let bad_auto_pad = Case::new(17)
        .input("x", wave(&[1, 1, 4, 4], 0))
        .init("w", wave(&[1, 1, 3, 3], 1))
        .node("Conv", &["x", "w"], &["y"], vec![attr::string("auto_pad", "SAME")])
        .load_error(&[("y", DType::F32)]);
    assert_invalid(&bad_auto_pad, "auto_pad");
}

fn conv_transpose(attrs: Vec<cnnc_onnx::proto::AttributeProto>, with_bias: bool) -> cnnc_ir::Tensor {
    let inputs: &[&str] = if with_bias { &["x", "w", "b"] } else { &["x", "w"] };
    Case::new(17)
        .input("x", wave(&[1, 2, 3, 3], 0))
        .init("w", wave(&[2, 3, 3, 3], 2))
        .init("b", f32s(&[3], &[1.0, 2.0, 3.0]))
        .node("ConvTranspose", inputs, &["y"], attrs)
        .run_y()
}

#[test]
fn conv_transpose_output_shape_computes_the_spec_pads() {
    // Full extent 2·(3−1) + 3 = 7; asking for 6 leaves a total padding of 1, which the spec
    // puts at the beginning unless auto_pad is SAME_UPPER.
    let by_shape = conv_transpose(vec![attr::ints("strides", &[2, 2]), attr::ints("output_shape", &[6, 6])], true);
    let by_pads = conv_transpose(vec![attr::ints("strides", &[2, 2]), attr::ints("pads", &[1, 1, 0, 0])], true);
    assert_close(&by_shape, &by_pads);
    let reference_prefix = [2.0, 1.125, 1.25, 2.8125, 0.5, -0.625, -3.0, 4.125, -1.3125, 0.0625, 4.625, 1.5];
    assert_eq!(by_pads.shape, vec![1, 3, 6, 6]);
    assert_close(&f32s(&[12], &by_pads.data.as_f32().unwrap()[..12]), &f32s(&[12], &reference_prefix));
    // A larger output_shape than the full extent: the extra positions hold just the bias.
    let larger = conv_transpose(vec![attr::ints("strides", &[2, 2]), attr::ints("output_shape", &[8, 8])], true);
    let full = conv_transpose(vec![attr::ints("strides", &[2, 2])], true);
    assert_eq!(larger.shape, vec![1, 3, 8, 8]);
    let (larger, full) = (larger.data.as_f32().unwrap().to_vec(), full.data.as_f32().unwrap().to_vec());
    for c in 0..3 {
        for i in 0..8 {
            for j in 0..8 {
                let got = larger[(c * 8 + i) * 8 + j];
                let want = if i < 7 && j < 7 { full[(c * 7 + i) * 7 + j] } else { (c + 1) as f32 };
                assert!((got - want).abs() < 1e-5, "channel {c} ({i}, {j}): {got} vs {want}");
            }
        }
    }
}

#[test]
fn conv_transpose_same_auto_pad() {
    let upper = conv_transpose(vec![attr::ints("strides", &[2, 2]), attr::string("auto_pad", "SAME_UPPER")], false);
    let lower = conv_transpose(vec![attr::ints("strides", &[2, 2]), attr::string("auto_pad", "SAME_LOWER")], false);
    assert_eq!(upper.shape, vec![1, 3, 6, 6]);
    let upper_prefix = [0.6875, 0.5, -1.0625, 2.75, -5.0625, -3.5, 1.1875, 1.0];
    let lower_prefix = [1.0, 0.125, 0.25, 1.8125, -0.5, -1.625, -4.0, 3.125];
    assert_close(&f32s(&[8], &upper.data.as_f32().unwrap()[..8]), &f32s(&[8], &upper_prefix));
    assert_close(&f32s(&[8], &lower.data.as_f32().unwrap()[..8]), &f32s(&[8], &lower_prefix));
}

#[test]
fn conv_transpose_pads_output_padding_and_dilations() {
    let y = Case::new(17)
        .input("x", wave(&[1, 2, 3, 3], 0))
        .init("w", wave(&[2, 1, 2, 2], 4))
        .node(
            "ConvTranspose",
            &["x", "w"],
            &["y"],
            vec![
                attr::ints("strides", &[2, 3]),
                attr::ints("pads", &[1, 0, 0, 1]),
                attr::ints("output_padding", &[1, 2]),
                attr::ints("dilations", &[1, 2]),
            ],
        )
        .run_y();
    let want = [
        -2.75, 0.0, 1.3125, -2.0, 0.0, 0.0, 3.0, 0.0, -0.25, 0.0, -1.5625, 0.0, 3.75, 0.125, 0.0, 3.375, -0.3125, 0.0, -2.3125,
        0.0, 3.75, 0.0, -1.5625, 4.5, 0.0, -2.875, -3.25, 0.0, 2.1875, 0.0, 1.375, 0.0, -2.6875, 3.0625, 0.0, -3.0625, -2.6875,
        0.0, 4.0, 0.0, -2.5, 0.0, 0.875, -1.75, 0.0, -0.4375, 3.25, 0.0, -0.6875, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        0.0, 0.0,
    ];
    assert_close(&y, &f32s(&[1, 1, 6, 10], &want));
}

#[test]
fn conv_transpose_groups_act_per_channel_group() {
    // group=2 on 2 input channels equals two single-channel transposed convolutions.
    let x = wave(&[1, 2, 3, 3], 0);
    let w = wave(&[2, 2, 2, 2], 4);
    let grouped = Case::new(17)
        .input("x", x.clone())
        .init("w", w.clone())
        .node("ConvTranspose", &["x", "w"], &["y"], vec![attr::int("group", 2), attr::ints("strides", &[2, 1])])
        .run_y();
    assert_eq!(grouped.shape, vec![1, 4, 6, 4]);
    let xs = x.data.as_f32().unwrap();
    let ws = w.data.as_f32().unwrap();
    for g in 0..2 {
        let part = Case::new(17)
            .input("x", f32s(&[1, 1, 3, 3], &xs[g * 9..(g + 1) * 9]))
            .init("w", f32s(&[1, 2, 2, 2], &ws[g * 8..(g + 1) * 8]))
            .node("ConvTranspose", &["x", "w"], &["y"], vec![attr::ints("strides", &[2, 1])])
            .run_y();
        let plane = 2 * 6 * 4;
        let got = &grouped.data.as_f32().unwrap()[g * plane..(g + 1) * plane];
        assert_close(&f32s(&[plane], got), &f32s(&[plane], part.data.as_f32().unwrap()));
    }
}

#[test]
fn max_pool_ceil_mode_pads_and_dilations() {
    let y = Case::new(12)
        .input("x", wave(&[1, 1, 5, 6], 0))
        .node(
            "MaxPool",
            &["x"],
            &["y"],
            vec![
                attr::ints("kernel_shape", &[2, 2]),
                attr::ints("strides", &[2, 2]),
                attr::ints("pads", &[1, 0, 0, 1]),
                attr::ints("dilations", &[1, 2]),
                attr::int("ceil_mode", 1),
            ],
        )
        .run_y();
    assert_close(&y, &f32s(&[1, 1, 3, 3], &[0.75, -0.5, -0.5, 1.25, 0.0, 0.0, 1.75, 0.5, 0.5]));
}

#[test]
fn max_pool_1d_valid() {
    let y = Case::new(8)
        .input("x", wave(&[1, 2, 7], 0))
        .node("MaxPool", &["x"], &["y"], vec![attr::ints("kernel_shape", &[3]), attr::ints("strides", &[2]), attr::string("auto_pad", "VALID")])
        .run_y();
    assert_close(&y, &f32s(&[1, 2, 3], &[1.5, -0.5, 1.0, 1.75, 0.5, 2.0]));
}

fn average_pool(opset: i64, attrs: Vec<cnnc_onnx::proto::AttributeProto>) -> cnnc_ir::Tensor {
    Case::new(opset).input("x", wave(&[1, 1, 5, 6], 0)).node("AveragePool", &["x"], &["y"], attrs).run_y()
}

#[test]
fn average_pool_divisors_with_and_without_padding() {
    let attrs = |include: i64| {
        vec![
            attr::ints("kernel_shape", &[3, 2]),
            attr::ints("strides", &[2, 2]),
            attr::ints("pads", &[1, 1, 1, 1]),
            attr::int("ceil_mode", 1),
            attr::int("count_include_pad", include),
        ]
    };
    let included = [0.2916667, -0.08333334, -0.5, 0.125, 0.625, -0.4583333, -0.375, 0.375, 0.5416667, -1.0, 0.0, 0.375];
    let excluded = [0.875, -0.125, -0.75, 0.375, 1.25, -0.4583333, -0.375, 0.75, 1.625, -1.5, 0.0, 1.125];
    assert_close(&average_pool(11, attrs(1)), &f32s(&[1, 1, 3, 4], &included));
    assert_close(&average_pool(11, attrs(0)), &f32s(&[1, 1, 3, 4], &excluded));
}

#[test]
fn average_pool_same_lower_and_opset_19_dilations() {
    let same = average_pool(
        7,
        vec![attr::ints("kernel_shape", &[2, 3]), attr::ints("strides", &[2, 2]), attr::string("auto_pad", "SAME_LOWER")],
    );
    let want = [1.125, -0.5833333, -0.5, 1.5, -0.2083333, -0.125, -0.125, -1.125, 0.375];
    assert_close(&same, &f32s(&[1, 1, 3, 3], &want));
    let dilated = average_pool(19, vec![attr::ints("kernel_shape", &[2, 2]), attr::ints("dilations", &[2, 2])]);
    let want = [-0.375, 0.375, -1.0, -0.25, -0.125, -0.4375, -0.75, 0.0, 0.125, -0.1875, -0.5, 0.25];
    assert_close(&dilated, &f32s(&[1, 1, 3, 4], &want));
}

#[test]
fn global_pools_reduce_spatial_axes() {
    let x = f32s(&[1, 2, 2, 2], &[1.0, 2.0, 3.0, 6.0, -1.0, -2.0, -3.0, -4.0]);
    let out = Case::new(13)
        .input("x", x)
        .node("GlobalAveragePool", &["x"], &["avg"], vec![])
        .node("GlobalMaxPool", &["x"], &["max"], vec![])
        .run(&[("avg", DType::F32), ("max", DType::F32)]);
    assert_close(&out[0], &f32s(&[1, 2, 1, 1], &[3.0, -2.5]));
    assert_close(&out[1], &f32s(&[1, 2, 1, 1], &[6.0, -1.0]));
}

#[test]
fn pool_refusals() {
    let indices = Case::new(12)
        .input("x", wave(&[1, 1, 4, 4], 0))
        .node("MaxPool", &["x"], &["y", "i"], vec![attr::ints("kernel_shape", &[2, 2])])
        .load_error(&[("y", DType::F32), ("i", DType::I64)]);
    assert_unsupported(&indices, "Indices output of MaxPool");
    let no_kernel = Case::new(12)
        .input("x", wave(&[1, 1, 4, 4], 0))
        .node("AveragePool", &["x"], &["y"], vec![])
        .load_error(&[("y", DType::F32)]);
    assert_invalid(&no_kernel, "kernel_shape");
    let too_big = Case::new(12)
        .input("x", wave(&[1, 1, 2, 2], 0))
        .node("MaxPool", &["x"], &["y"], vec![attr::ints("kernel_shape", &[3, 3])])
        .load_error(&[("y", DType::F32)]);
    assert_invalid(&too_big, "does not fit");
}

#[test]
fn conv_lowers_to_one_conv_node_with_bias_operand() {
    let m = Case::new(17)
        .input("x", wave(&[1, 2, 4, 4], 0))
        .init("w", wave(&[3, 2, 3, 3], 1))
        .init("b", f32s(&[3], &[1.0, 2.0, 3.0]))
        .node("Conv", &["x", "w", "b"], &["y"], vec![attr::ints("pads", &[1, 1, 1, 1])]);
    let mut model = m.model;
    model.output_untyped("y", DType::F32);
    let g = cnnc_onnx::load_model_bytes(&model.to_bytes(), &Default::default()).unwrap();
    let convs: Vec<_> = g.nodes.iter().filter(|n| matches!(n.op, Op::Conv(_))).collect();
    assert_eq!(convs.len(), 1);
    assert_eq!(convs[0].inputs.len(), 3);
    assert_eq!(g.ty(g.outputs[0]).shape, vec![1, 3, 4, 4]);
}

#[test]
fn empty_spatial_axes_are_refused_not_panicked_on() {
    for op in ["Conv", "ConvTranspose"] {
        let e = Case::new(17)
            .input("x", wave(&[1, 1, 0, 3], 0))
            .init("w", wave(&[1, 1, 2, 2], 1))
            .node(op, &["x", "w"], &["y"], vec![])
            .load_error(&[("y", DType::F32)]);
        assert_invalid(&e, "non-empty spatial axes");
    }
    let e = Case::new(17)
        .input("x", wave(&[1, 1, 3, 3], 0))
        .init("w", f32s(&[1, 1, 0, 2], &[]))
        .node("Conv", &["x", "w"], &["y"], vec![])
        .load_error(&[("y", DType::F32)]);
    assert_invalid(&e, "non-empty spatial axes");
}
