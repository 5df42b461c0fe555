//! Softmax/LogSoftmax (the 2-D coercion before opset 13, one axis after), reductions (axes
//! as attribute or input by opset, keepdims, noop_with_empty_axes, bool max), ArgMax/ArgMin.
//! Expected values were computed with numpy (f64) on the same `wave` data.

mod group_b_support;

use cnnc_ir::{DType, Tensor, TensorData};
use cnnc_onnx::attr;
use cnnc_onnx::proto::AttributeProto;
use group_b_support::*;

fn softmax(op: &str, opset: i64, attrs: Vec<AttributeProto>) -> Tensor {
    Case::new(opset).input("x", wave(&[2, 2, 3], 0)).node(op, &["x"], &["y"], attrs).run_y()
}

#[test]
fn softmax_before_13_normalises_the_flattened_tail() {
    let coerced = [0.2375693, 0.5029342, 0.0151873, 0.03215151, 0.06806473, 0.1440931];
    let coerced: Vec<f32> = coerced.iter().chain(&coerced).copied().collect();
    assert_close(&softmax("Softmax", 11, vec![attr::int("axis", 1)]), &f32s(&[2, 2, 3], &coerced));
    let one_axis = [0.8807971, 0.8807971, 0.09534947, 0.1192029, 0.1192029, 0.9046505];
    let one_axis: Vec<f32> = one_axis.iter().chain(&one_axis).copied().collect();
    assert_close(&softmax("Softmax", 13, vec![attr::int("axis", 1)]), &f32s(&[2, 2, 3], &one_axis));
    let whole = [
        0.1040134, 0.2201964, 0.006649355, 0.01407668, 0.02980034, 0.06308732, 0.1335559, 0.2827378, 0.008537941, 0.01807482,
        0.03826439, 0.08100572,
    ];
    assert_close(&softmax("Softmax", 11, vec![attr::int("axis", 0)]), &f32s(&[2, 2, 3], &whole));
}

#[test]
fn log_softmax_default_axis_depends_on_opset() {
    let before = [-1.437296, -0.687296, -4.187296, -3.437296, -2.687296, -1.937296];
    let before: Vec<f32> = before.iter().chain(&before).copied().collect();
    assert_close(&softmax("LogSoftmax", 11, vec![]), &f32s(&[2, 2, 3], &before));
    let after = [-1.157173, -0.4071729, -3.907173, -2.027976, -1.277976, -0.5279757];
    let after: Vec<f32> = after.iter().chain(&after).copied().collect();
    assert_close(&softmax("LogSoftmax", 13, vec![]), &f32s(&[2, 2, 3], &after));
}

#[test]
fn log_softmax_is_stable_for_large_inputs() {
    let y = Case::new(13)
        .input("x", f32s(&[1, 3], &[1000.0, 1001.0, 1002.0]))
        .node("LogSoftmax", &["x"], &["y"], vec![])
        .run_y();
    assert_close(&y, &f32s(&[1, 3], &[-2.407_606, -1.407_606, -0.407_606]));
}

/// Runs `op` on wave [2, 3, 4] with axes given as attribute (`axes_attr`) or constant input.
fn reduce(op: &str, opset: i64, axes: Option<&[i64]>, as_input: bool, mut attrs: Vec<AttributeProto>) -> Tensor {
    let mut case = Case::new(opset).input("x", wave(&[2, 3, 4], 0));
    let mut inputs = vec!["x"];
    if let Some(axes) = axes {
        if as_input {
            case = case.init("axes", i64s(&[axes.len()], axes));
            inputs.push("axes");
        } else {
            attrs.push(attr::ints("axes", axes));
        }
    }
    case.node(op, &inputs, &["y"], attrs).run_y()
}

#[test]
fn reduce_sum_axes_move_from_attribute_to_input_at_13() {
    let want = f32s(&[3], &[0.0, 2.75, -3.0]);
    assert_close(&reduce("ReduceSum", 11, Some(&[0, 2]), false, vec![attr::int("keepdims", 0)]), &want);
    assert_close(&reduce("ReduceSum", 13, Some(&[0, -1]), true, vec![attr::int("keepdims", 0)]), &want);
}

#[test]
fn reduce_mean_axes_move_from_attribute_to_input_at_18() {
    let want = f32s(&[1, 3, 1], &[0.0, 0.34375, -0.375]);
    assert_close(&reduce("ReduceMean", 13, Some(&[0, 2]), false, vec![]), &want);
    assert_close(&reduce("ReduceMean", 18, Some(&[2, 0]), true, vec![]), &want);
}

#[test]
fn norm_and_log_reductions() {
    assert_close(&reduce("ReduceL1", 13, Some(&[1]), false, vec![]), &f32s(&[2, 1, 4], &[3.0, 2.75, 3.25, 3.5, 2.5, 3.25, 3.25, 3.75]));
    assert_close(
        &reduce("ReduceL2", 18, Some(&[-1]), true, vec![attr::int("keepdims", 0)]),
        &f32s(&[2, 3], &[2.893959, 2.09165, 2.09165, 2.893959, 2.610077, 1.695583]),
    );
    assert_close(&reduce("ReduceSumSquare", 13, None, false, vec![]), &f32s(&[1, 1, 1], &[35.1875]));
    assert_close(
        &reduce("ReduceLogSumExp", 13, Some(&[1]), false, vec![attr::int("keepdims", 0)]),
        &f32s(&[2, 4], &[1.063781, 1.813781, 1.289899, 2.039899, 1.563781, 2.313781, 1.789899, 1.201765]),
    );
    assert_close(
        &reduce("ReduceProd", 13, Some(&[1]), false, vec![attr::int("keepdims", 0)]),
        &f32s(&[2, 4], &[0.65625, -0.375, 0.5, -1.09375, -0.0, -0.75, -0.5625, 1.5]),
    );
    assert_close(&reduce("ReduceMin", 18, Some(&[1, 2]), true, vec![]), &f32s(&[2, 1, 1], &[-2.0, -2.0]));
    let log_sum = Case::new(13)
        .input("x", f32s(&[2, 2], &[1.0, 2.0, 3.0, 4.0]))
        .node("ReduceLogSum", &["x"], &["y"], vec![attr::ints("axes", &[1])])
        .run_y();
    assert_close(&log_sum, &f32s(&[2, 1], &[3f32.ln(), 7f32.ln()]));
}

#[test]
fn log_sum_exp_of_infinities_and_empty_sets() {
    let y = Case::new(18)
        .input("x", f32s(&[3, 2], &[f32::NEG_INFINITY, f32::NEG_INFINITY, f32::INFINITY, 0.0, 1000.0, 1000.0]))
        .init("axes", i64s(&[1], &[1]))
        .node("ReduceLogSumExp", &["x", "axes"], &["y"], vec![attr::int("keepdims", 0)])
        .run_y();
    assert_close(&y, &f32s(&[3], &[f32::NEG_INFINITY, f32::INFINITY, 1000.0 + 2f32.ln()]));
    let empty = Case::new(18)
        .input("x", f32s(&[2, 0], &[]))
        .init("axes", i64s(&[1], &[1]))
        .node("ReduceLogSumExp", &["x", "axes"], &["y"], vec![])
        .run_y();
    assert_close(&empty, &f32s(&[2, 1], &[f32::NEG_INFINITY, f32::NEG_INFINITY]));
}

#[test]
fn noop_with_empty_axes_keeps_every_axis_but_still_squares() {
    let x = wave(&[2, 3, 4], 0);
    let empty_axes = || i64s(&[0], &[]);
    let same = Case::new(13)
        .input("x", x.clone())
        .init("axes", empty_axes())
        .node("ReduceSum", &["x", "axes"], &["y"], vec![attr::int("noop_with_empty_axes", 1)])
        .run_y();
    assert_close(&same, &x);
    let squared = Case::new(18)
        .input("x", x.clone())
        .init("axes", empty_axes())
        .node("ReduceSumSquare", &["x", "axes"], &["y"], vec![attr::int("noop_with_empty_axes", 1)])
        .run_y();
    let want: Vec<f32> = x.data.as_f32().unwrap().iter().map(|v| v * v).collect();
    assert_close(&squared, &f32s(&[2, 3, 4], &want));
    // Without the flag, empty axes reduce everything.
    let all = Case::new(13)
        .input("x", x)
        .init("axes", empty_axes())
        .node("ReduceSum", &["x", "axes"], &["y"], vec![attr::int("keepdims", 0)])
        .run_y();
    assert_close(&all, &f32s(&[], &[-0.25]));
}

#[test]
fn reduce_max_of_booleans_is_any() {
    let out = Case::new(20)
        .input("x", Tensor::new(vec![3, 2], TensorData::Bool(vec![true, false, false, false, true, true])))
        .init("axes", i64s(&[1], &[1]))
        .node("ReduceMax", &["x", "axes"], &["any"], vec![attr::int("keepdims", 0)])
        .node("ReduceMin", &["x", "axes"], &["all"], vec![attr::int("keepdims", 0)])
        .run(&[("any", DType::Bool), ("all", DType::Bool)]);
    assert_eq!(out[0], Tensor::new(vec![3], TensorData::Bool(vec![true, false, true])));
    assert_eq!(out[1], Tensor::new(vec![3], TensorData::Bool(vec![false, false, true])));
}

#[test]
fn reduction_axes_computed_at_run_time_are_refused() {
    let e = Case::new(18)
        .input("x", wave(&[2, 3], 0))
        .input("axes", i64s(&[1], &[1]))
        .node("ReduceMean", &["x", "axes"], &["y"], vec![])
        .load_error(&[("y", DType::F32)]);
    assert_unsupported(&e, "must be a compile-time constant");
    let e = Case::new(13)
        .input("x", wave(&[2, 3], 0))
        .node("ReduceMean", &["x"], &["y"], vec![attr::ints("axes", &[2])])
        .load_error(&[("y", DType::F32)]);
    assert_invalid(&e, "axis 2 is out of range");
}

#[test]
fn arg_max_and_arg_min() {
    let x = f32s(&[2, 3], &[1.0, 3.0, 3.0, 2.0, 2.0, 0.0]);
    let out = Case::new(13)
        .input("x", x)
        .node("ArgMax", &["x"], &["first"], vec![attr::int("axis", 1), attr::int("keepdims", 0)])
        .node("ArgMax", &["x"], &["last"], vec![attr::int("axis", -1), attr::int("keepdims", 0), attr::int("select_last_index", 1)])
        .node("ArgMin", &["x"], &["min"], vec![])
        .run(&[("first", DType::I64), ("last", DType::I64), ("min", DType::I64)]);
    assert_eq!(out[0], i64s(&[2], &[1, 0]));
    assert_eq!(out[1], i64s(&[2], &[2, 1]));
    assert_eq!(out[2], i64s(&[1, 3], &[0, 1, 1]));
}
