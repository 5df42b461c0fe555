//! Resize (opsets 10-19: scales or sizes, every coordinate mode, nearest rules, linear, axes
//! and keep_aspect_ratio_policy) and Upsample (7, 9). Expected values come from the ONNX
//! reference implementation on the same `wave` data, or, for the modes it does not
//! implement (opset 10 rules, tf_half_pixel_for_nn), from the ONNX formulas by hand.

mod group_b_support;

use cnnc_ir::{DType, Op, Tensor, TensorData};
use cnnc_onnx::attr;
use cnnc_onnx::proto::AttributeProto;
use group_b_support::*;

/// x = wave [1, 1, 3, 4]:
/// [ 0.75  1.5  -2   -1.25]
/// [-0.5   0.25  1    1.75]
/// [-1.75 -1    -0.25 0.5 ]
fn x() -> Tensor {
    wave(&[1, 1, 3, 4], 0)
}

fn with_scales(opset: i64, scales: &[f32], attrs: Vec<AttributeProto>) -> Tensor {
    let inputs: &[&str] = if opset < 11 { &["x", "scales"] } else { &["x", "", "scales"] };
    Case::new(opset)
        .input("x", x())
        .init("scales", f32s(&[scales.len()], scales))
        .node("Resize", inputs, &["y"], attrs)
        .run_y()
}

fn with_sizes(opset: i64, sizes: &[i64], attrs: Vec<AttributeProto>) -> Tensor {
    // Opset 11 needs a scales operand even when sizes are given: an empty tensor.
    Case::new(opset)
        .input("x", x())
        .init("roi", f32s(&[0], &[]))
        .init("scales", f32s(&[0], &[]))
        .init("sizes", i64s(&[sizes.len()], sizes))
        .node("Resize", &["x", "roi", "scales", "sizes"], &["y"], attrs)
        .run_y()
}

fn linear(mode: &str) -> Vec<AttributeProto> {
    vec![attr::string("mode", "linear"), attr::string("coordinate_transformation_mode", mode)]
}

#[test]
fn linear_with_each_coordinate_mode() {
    let half_pixel = [0.875, -0.25, -1.375, 0.25, 0.1875, 0.125, -0.5833333, 0.4166667, 1.416667, -1.416667, -0.4166667, 0.5833333];
    assert_close(&with_scales(13, &[1.0, 1.0, 1.5, 0.75], vec![attr::string("mode", "linear")]), &f32s(&[1, 1, 4, 3], &half_pixel));
    let align = [0.75, -0.25, -1.25, -0.08333334, 0.3333333, 0.75, -0.9166667, 0.2083333, 1.333333, -1.75, -0.625, 0.5];
    assert_close(&with_sizes(11, &[1, 1, 4, 3], linear("align_corners")), &f32s(&[1, 1, 4, 3], &align));
    let pytorch = [0.75, 1.275, -0.25, -1.775, -1.25];
    assert_close(&with_sizes(13, &[1, 1, 1, 5], linear("pytorch_half_pixel")), &f32s(&[1, 1, 1, 5], &pytorch));
    let asymmetric = [0.75, -2.0, 0.125, -0.5, -0.5, 1.0, -1.125, 0.375, -1.75, -0.25, -1.75, -0.25];
    assert_close(&with_scales(18, &[1.0, 1.0, 2.0, 0.5], linear("asymmetric")), &f32s(&[1, 1, 6, 2], &asymmetric));
    let symmetric = [1.25, -1.75, 0.7352941, -0.5147058, 0.0, 1.25, -0.735294, 0.5147059, -1.25, 0.0];
    assert_close(&with_scales(19, &[1.0, 1.0, 1.7, 0.6], linear("half_pixel_symmetric")), &f32s(&[1, 1, 5, 2], &symmetric));
}

#[test]
fn nearest_rules() {
    let nearest = |rule: &str| vec![attr::string("mode", "nearest"), attr::string("nearest_mode", rule)];
    let ceil = [
        0.75, 1.5, 1.5, -2.0, -1.25, -1.25, -1.25, -0.5, 0.25, 0.25, 1.0, 1.75, 1.75, 1.75, -0.5, 0.25, 0.25, 1.0, 1.75, 1.75,
        1.75, -1.75, -1.0, -1.0, -0.25, 0.5, 0.5, 0.5, -1.75, -1.0, -1.0, -0.25, 0.5, 0.5, 0.5,
    ];
    assert_close(&with_sizes(13, &[1, 1, 5, 7], nearest("ceil")), &f32s(&[1, 1, 5, 7], &ceil));
    let floor = [
        0.75, 0.75, 0.75, 1.5, -2.0, -2.0, -1.25, 0.75, 0.75, 0.75, 1.5, -2.0, -2.0, -1.25, -0.5, -0.5, -0.5, 0.25, 1.0, 1.0,
        1.75, -0.5, -0.5, -0.5, 0.25, 1.0, 1.0, 1.75, -1.75, -1.75, -1.75, -1.0, -0.25, -0.25, 0.5,
    ];
    assert_close(&with_sizes(13, &[1, 1, 5, 7], nearest("floor")), &f32s(&[1, 1, 5, 7], &floor));
    let mut prefer_ceil = nearest("round_prefer_ceil");
    prefer_ceil.push(attr::string("coordinate_transformation_mode", "asymmetric"));
    let want = [
        0.75, 1.5, 1.5, -2.0, -1.25, -1.25, -0.5, 0.25, 0.25, 1.0, 1.75, 1.75, -0.5, 0.25, 0.25, 1.0, 1.75, 1.75, -1.75, -1.0,
        -1.0, -0.25, 0.5, 0.5, -1.75, -1.0, -1.0, -0.25, 0.5, 0.5, -1.75, -1.0, -1.0, -0.25, 0.5, 0.5,
    ];
    assert_close(&with_scales(19, &[1.0, 1.0, 2.0, 1.5], prefer_ceil), &f32s(&[1, 1, 6, 6], &want));
    let default = [
        0.75, 0.75, 1.5, -2.0, -2.0, -1.25, 0.75, 0.75, 1.5, -2.0, -2.0, -1.25, -0.5, -0.5, 0.25, 1.0, 1.0, 1.75, -0.5, -0.5,
        0.25, 1.0, 1.0, 1.75, -1.75, -1.75, -1.0, -0.25, -0.25, 0.5, -1.75, -1.75, -1.0, -0.25, -0.25, 0.5,
    ];
    assert_close(&with_scales(19, &[1.0, 1.0, 2.0, 1.5], vec![]), &f32s(&[1, 1, 6, 6], &default));
}

#[test]
fn nearest_tf_half_pixel_for_nn() {
    // x = (y + 0.5) / scale: rows 0.71, 2.14 -> 1, 2; columns 0.33, 1, 1.67, 2.33, 3, 3.67
    // -> 0, 1, 2, 2, 3, 3 (the last clamped).
    let attrs = vec![attr::string("coordinate_transformation_mode", "tf_half_pixel_for_nn")];
    let want = [-0.5, 0.25, 1.0, 1.0, 1.75, 1.75, -1.75, -1.0, -0.25, -0.25, 0.5, 0.5];
    assert_close(&with_scales(13, &[1.0, 1.0, 0.7, 1.5], attrs), &f32s(&[1, 1, 2, 6], &want));
}

#[test]
fn opset_10_uses_asymmetric_coordinates_and_the_legacy_nearest_rule() {
    // Rows enlarge by 2 (floor of y/2); columns shrink by 0.6 to 2 (ceil of y/0.6: 0, 2).
    let nearest = with_scales(10, &[1.0, 1.0, 2.0, 0.6], vec![]);
    let want = [0.75, -2.0, 0.75, -2.0, -0.5, 1.0, -0.5, 1.0, -1.75, -0.25, -1.75, -0.25];
    assert_close(&nearest, &f32s(&[1, 1, 6, 2], &want));
    // Linear: column coordinates y/1.5 = 0, 0.67, 1.33, 2, 2.67, 3.33 (clamped to 3).
    let linear = Case::new(10)
        .input("x", f32s(&[1, 4], &[0.0, 3.0, 6.0, 9.0]))
        .init("scales", f32s(&[2], &[1.0, 1.5]))
        .node("Resize", &["x", "scales"], &["y"], vec![attr::string("mode", "linear")])
        .run_y();
    assert_close(&linear, &f32s(&[1, 6], &[0.0, 2.0, 4.0, 6.0, 8.0, 9.0]));
}

#[test]
fn axes_and_keep_aspect_ratio_policy() {
    let resize = |policy: &str| {
        Case::new(18)
            .input("x", x())
            .init("sizes", i64s(&[2], &[7, 6]))
            .node(
                "Resize",
                &["x", "", "", "sizes"],
                &["y"],
                vec![attr::ints("axes", &[3, 2]), attr::string("keep_aspect_ratio_policy", policy)],
            )
            .run_y()
    };
    let not_larger = [
        0.75, 0.75, 1.5, 1.5, -2.0, -1.25, -1.25, 0.75, 0.75, 1.5, 1.5, -2.0, -1.25, -1.25, -0.5, -0.5, 0.25, 0.25, 1.0, 1.75,
        1.75, -0.5, -0.5, 0.25, 0.25, 1.0, 1.75, 1.75, -1.75, -1.75, -1.0, -1.0, -0.25, 0.5, 0.5,
    ];
    assert_close(&resize("not_larger"), &f32s(&[1, 1, 5, 7], &not_larger));
    let not_smaller = [
        0.75, 0.75, 1.5, 1.5, -2.0, -2.0, -1.25, -1.25, 0.75, 0.75, 1.5, 1.5, -2.0, -2.0, -1.25, -1.25, -0.5, -0.5, 0.25, 0.25,
        1.0, 1.0, 1.75, 1.75, -0.5, -0.5, 0.25, 0.25, 1.0, 1.0, 1.75, 1.75, -1.75, -1.75, -1.0, -1.0, -0.25, -0.25, 0.5, 0.5,
        -1.75, -1.75, -1.0, -1.0, -0.25, -0.25, 0.5, 0.5,
    ];
    assert_close(&resize("not_smaller"), &f32s(&[1, 1, 6, 8], &not_smaller));
}

#[test]
fn one_resample_per_resized_axis() {
    let mut case = Case::new(13)
        .input("x", x())
        .init("scales", f32s(&[4], &[1.0, 1.0, 2.0, 1.0]))
        .node("Resize", &["x", "", "scales"], &["y"], vec![attr::string("mode", "linear")]);
    case.model.output_untyped("y", DType::F32);
    let g = cnnc_onnx::load_model_bytes(&case.model.to_bytes(), &Default::default()).unwrap();
    let resamples: Vec<usize> = g
        .nodes
        .iter()
        .filter_map(|n| match &n.op {
            Op::Resample { axis, .. } => Some(*axis),
            _ => None,
        })
        .collect();
    assert_eq!(resamples, [2]);
}

#[test]
fn nearest_resize_of_integers_gathers() {
    let y = Case::new(19)
        .input("x", i64s(&[1, 1, 2, 2], &[1, 2, 3, 4]))
        .init("scales", f32s(&[4], &[1.0, 1.0, 2.0, 2.0]))
        .node("Resize", &["x", "", "scales"], &["y"], vec![])
        .run(&[("y", DType::I64)])
        .remove(0);
    assert_eq!(y, i64s(&[1, 1, 4, 4], &[1, 1, 2, 2, 1, 1, 2, 2, 3, 3, 4, 4, 3, 3, 4, 4]));
}

#[test]
fn upsample_opsets_7_and_9() {
    let nearest = Case::new(7)
        .input("x", f32s(&[1, 1, 2, 2], &[1.0, 2.0, 3.0, 4.0]))
        .node("Upsample", &["x"], &["y"], vec![attr::floats("scales", &[1.0, 1.0, 2.0, 3.0])])
        .run_y();
    let want = [
        1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 4.0, 4.0, 4.0, 3.0, 3.0, 3.0, 4.0, 4.0, 4.0,
    ];
    assert_close(&nearest, &f32s(&[1, 1, 4, 6], &want));
    let linear = Case::new(9)
        .input("x", f32s(&[1, 1, 1, 3], &[0.0, 4.0, 8.0]))
        .init("scales", f32s(&[4], &[1.0, 1.0, 1.0, 2.0]))
        .node("Upsample", &["x", "scales"], &["y"], vec![attr::string("mode", "linear")])
        .run_y();
    assert_close(&linear, &f32s(&[1, 1, 1, 6], &[0.0, 2.0, 4.0, 6.0, 8.0, 8.0]));
}

#[test]
fn resize_refusals() {
    let outputs = [("y", DType::F32)];
    let cubic = Case::new(19)
        .input("x", x())
        .init("scales", f32s(&[4], &[1.0, 1.0, 2.0, 2.0]))
        .node("Resize", &["x", "", "scales"], &["y"], vec![attr::string("mode", "cubic")])
        .load_error(&outputs);
    assert_unsupported(&cubic, "cubic");
    let antialias = Case::new(19)
        .input("x", x())
        .init("scales", f32s(&[4], &[1.0, 1.0, 0.5, 0.5]))
        .node("Resize", &["x", "", "scales"], &["y"], vec![attr::string("mode", "linear"), attr::int("antialias", 1)])
        .load_error(&outputs);
    assert_unsupported(&antialias, "antialias");
    let crop = Case::new(13)
        .input("x", x())
        .init("roi", f32s(&[8], &[0.0, 0.0, 0.2, 0.2, 1.0, 1.0, 0.8, 0.8]))
        .init("scales", f32s(&[4], &[1.0, 1.0, 2.0, 2.0]))
        .node("Resize", &["x", "roi", "scales"], &["y"], vec![attr::string("coordinate_transformation_mode", "tf_crop_and_resize")])
        .load_error(&outputs);
    assert_unsupported(&crop, "tf_crop_and_resize");
    let runtime_scales = Case::new(13)
        .input("x", x())
        .input("scales", f32s(&[4], &[1.0, 1.0, 2.0, 2.0]))
        .node("Resize", &["x", "", "scales"], &["y"], vec![])
        .load_error(&outputs);
    assert_unsupported(&runtime_scales, "must be a compile-time constant");
    let both = Case::new(13)
        .input("x", x())
        .init("scales", f32s(&[4], &[1.0, 1.0, 2.0, 2.0]))
        .init("sizes", i64s(&[4], &[1, 1, 6, 8]))
        .node("Resize", &["x", "", "scales", "sizes"], &["y"], vec![])
        .load_error(&outputs);
    assert_invalid(&both, "only one of scales and sizes");
    let huge = Case::new(13)
        .input("x", x())
        .init("scales", f32s(&[4], &[1.0, 1.0, 1e30, 1.0]))
        .node("Resize", &["x", "", "scales"], &["y"], vec![])
        .load_error(&outputs);
    assert_unsupported(&huge, "output extent");
    let linear_ints = Case::new(13)
        .input("x", Tensor::new(vec![1, 4], TensorData::I64(vec![1, 2, 3, 4])))
        .init("scales", f32s(&[2], &[1.0, 2.0]))
        .node("Resize", &["x", "", "scales"], &["y"], vec![attr::string("mode", "linear")])
        .load_error(&[("y", DType::I64)]);
    assert_unsupported(&linear_ints, "linear resizing of i64");
}
