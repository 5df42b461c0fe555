//! NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss (reductions, weights, ignore_index,
//! N-D inputs, the log_prob output) and GatherElements. Expected values come from the ONNX
//! reference implementation on the same `wave` data.

mod group_b_support;

use cnnc_ir::{DType, Tensor};
use cnnc_onnx::attr;
use cnnc_onnx::proto::AttributeProto;
use group_b_support::*;

/// Scores [3, 4, 2] (N=3, C=4, one extra axis of 2) and labels [3, 2], one of them ignored (-1).
fn labels() -> Tensor {
    i64s(&[3, 2], &[0, 3, 2, -1, 1, 1])
}

fn weights() -> Tensor {
    f32s(&[4], &[1.0, 0.5, 2.0, 0.25])
}

fn loss(op: &str, target: Tensor, weighted: bool, attrs: Vec<AttributeProto>, outputs: &[&str]) -> Vec<Tensor> {
    let inputs: &[&str] = if weighted { &["x", "t", "w"] } else { &["x", "t"] };
    let outputs_typed: Vec<(&str, DType)> = outputs.iter().map(|&o| (o, DType::F32)).collect();
    Case::new(13)
        .input("x", wave(&[3, 4, 2], 0))
        .input("t", target)
        .init("w", weights())
        .node(op, inputs, outputs, attrs)
        .run(&outputs_typed)
}

fn ignore_minus_one(reduction: &str) -> Vec<AttributeProto> {
    vec![attr::int("ignore_index", -1), attr::string("reduction", reduction)]
}

#[test]
fn nll_loss_without_reduction_zeroes_ignored_labels() {
    let y = loss("NegativeLogLikelihoodLoss", labels(), false, ignore_minus_one("none"), &["y"]);
    assert_close(&y[0], &f32s(&[3, 2], &[-0.75, -1.75, -1.25, 0.0, -1.5, 2.0]));
}

#[test]
fn nll_loss_mean_divides_by_the_applied_weights() {
    let y = loss("NegativeLogLikelihoodLoss", labels(), true, ignore_minus_one("mean"), &["y"]);
    assert_close(&y[0], &f32s(&[], &[-0.8088235]));
}

#[test]
fn nll_loss_sum_and_plain_mean() {
    let all_valid = i64s(&[3, 2], &[0, 3, 2, 1, 1, 1]);
    let sum = loss("NegativeLogLikelihoodLoss", all_valid.clone(), true, vec![attr::string("reduction", "sum")], &["y"]);
    assert_close(&sum[0], &f32s(&[], &[-3.6875]));
    let mean = loss("NegativeLogLikelihoodLoss", all_valid, false, vec![], &["y"]);
    assert_close(&mean[0], &f32s(&[], &[-0.625]));
}

#[test]
fn softmax_cross_entropy_with_log_prob_output() {
    let out = loss("SoftmaxCrossEntropyLoss", labels(), true, ignore_minus_one("mean"), &["y", "log_prob"]);
    assert_close(&out[0], &f32s(&[], &[0.8976427]));
    let log_prob = [
        -0.9686774, -0.9686774, -3.718678, -3.718678, -2.218678, -2.218678, -0.7186773, -0.7186773, -3.290313, -3.290313,
        -1.790313, -1.790313, -0.2903125, -0.2903125, -3.040312, -3.040312, -1.953342, -0.9686774, -0.4533423, -3.718678,
        -3.203342, -2.218678, -1.703342, -0.7186773,
    ];
    assert_close(&out[1], &f32s(&[3, 4, 2], &log_prob));
}

#[test]
fn softmax_cross_entropy_on_plain_class_scores() {
    let y = Case::new(12)
        .input("x", wave(&[2, 3], 0))
        .input("t", i64s(&[2], &[2, 0]))
        .node("SoftmaxCrossEntropyLoss", &["x", "t"], &["y"], vec![attr::string("reduction", "none")])
        .run_y();
    assert_close(&y, &f32s(&[2], &[3.907173, 2.027976]));
}

#[test]
fn loss_refusals() {
    let wrong_labels = Case::new(13)
        .input("x", wave(&[3, 4], 0))
        .input("t", i64s(&[4], &[0, 1, 2, 3]))
        .node("NegativeLogLikelihoodLoss", &["x", "t"], &["y"], vec![])
        .load_error(&[("y", DType::F32)]);
    assert_invalid(&wrong_labels, "target has shape [4]");
    let bad_reduction = Case::new(13)
        .input("x", wave(&[3, 4], 0))
        .input("t", i64s(&[3], &[0, 1, 2]))
        .node("SoftmaxCrossEntropyLoss", &["x", "t"], &["y"], vec![attr::string("reduction", "max")])
        .load_error(&[("y", DType::F32)]);
    assert_invalid(&bad_reduction, "reduction must be");
}

#[test]
fn gather_elements_with_negative_indices() {
    let data = f32s(&[3, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
    let y = Case::new(13)
        .input("x", data.clone())
        .input("i", i64s(&[2, 3], &[-1, -2, 0, 2, 0, 0]))
        .node("GatherElements", &["x", "i"], &["y"], vec![])
        .run_y();
    assert_close(&y, &f32s(&[2, 3], &[7.0, 5.0, 3.0, 7.0, 2.0, 3.0]));
    let y = Case::new(11)
        .input("x", data)
        .init("i", i64s(&[3, 1], &[2, 0, 1]))
        .node("GatherElements", &["x", "i"], &["y"], vec![attr::int("axis", -1)])
        .run_y();
    assert_close(&y, &f32s(&[3, 1], &[3.0, 4.0, 8.0]));
}

#[test]
fn gather_elements_refuses_constant_indices_out_of_range() {
    let e = Case::new(13)
        .input("x", wave(&[2, 2], 0))
        .init("i", i64s(&[1, 2], &[0, 2]))
        .node("GatherElements", &["x", "i"], &["y"], vec![attr::int("axis", 1)])
        .load_error(&[("y", DType::F32)]);
    assert_invalid(&e, "index 2 is out of range");
}
