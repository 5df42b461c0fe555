//! BatchNormalization (inference forms of opsets 6-15, per-activation parameters, training
//! mode), InstanceNormalization, LRN, Gemm and MatMul. Expected values come from the ONNX
//! reference implementation on the same `wave` data (LRN: the ONNX formula evaluated in
//! f64, the reference's own LRN being wrong for more than one channel).

mod group_b_support;

use cnnc_ir::{DType, Op, Tensor};
use cnnc_onnx::attr;
use group_b_support::*;

fn bn_params() -> [Tensor; 4] {
    [
        f32s(&[3], &[1.0, 0.5, -2.0]),
        f32s(&[3], &[0.0, 1.0, -0.5]),
        f32s(&[3], &[0.25, -0.5, 1.0]),
        f32s(&[3], &[1.0, 0.25, 4.0]),
    ]
}

const BN_INFERENCE: [f32; 24] = [
    0.4997502, 1.249375, -2.248876, -1.499251, 1.0, 1.748505, 2.497009, 3.245514, 2.249656, 1.49975, 0.7498438, -6.246567e-05,
    0.9995004, 1.749126, -1.749126, -0.9995004, 1.499003, 2.247508, 2.996012, -0.497009, 1.749719, 0.9998126, 0.2499063, -0.5,
];

fn bn_case(opset: i64, constant_params: bool, attrs: Vec<cnnc_onnx::proto::AttributeProto>) -> Case {
    let names = ["s", "b", "m", "v"];
    let mut case = Case::new(opset).input("x", wave(&[2, 3, 2, 2], 0));
    for (name, value) in names.iter().zip(bn_params()) {
        case = if constant_params { case.init(name, value) } else { case.input(name, value) };
    }
    case.node("BatchNormalization", &["x", "s", "b", "m", "v"], &["y"], attrs)
}

#[test]
fn batch_norm_inference_folds_to_scale_and_shift() {
    let case = bn_case(15, true, vec![attr::float("epsilon", 1e-3)]);
    let mut model = case.model;
    model.output_untyped("y", DType::F32);
    let g = cnnc_onnx::load_model_bytes(&model.to_bytes(), &Default::default()).unwrap();
    let ops: Vec<&str> = g.nodes.iter().filter(|n| !matches!(n.op, Op::Constant(_))).map(|n| n.op.mnemonic()).collect();
    assert_eq!(ops, ["binary", "binary"]);
    let y = bn_case(15, true, vec![attr::float("epsilon", 1e-3)]).run_y();
    assert_close(&y, &f32s(&[2, 3, 2, 2], &BN_INFERENCE));
}

#[test]
fn batch_norm_inference_forms_of_every_opset_agree() {
    let eps = attr::float("epsilon", 1e-3);
    let want = f32s(&[2, 3, 2, 2], &BN_INFERENCE);
    // Parameters computed at run time take the unfolded path.
    assert_close(&bn_case(9, false, vec![eps.clone()]).run_y(), &want);
    assert_close(&bn_case(6, true, vec![eps.clone(), attr::int("is_test", 1), attr::int("spatial", 1)]).run_y(), &want);
    // A model exported for training, compiled for inference with training_mode=0.
    assert_close(&bn_case(14, true, vec![eps.clone(), attr::int("training_mode", 0), attr::float("momentum", 0.9)]).run_y(), &want);
}

#[test]
fn batch_norm_per_activation_parameters_of_opset_7() {
    // spatial=0: one parameter per (c, h, w).
    let x = wave(&[2, 3, 2, 2], 0);
    let [s, b, m, v] = [wave(&[3, 2, 2], 1), wave(&[3, 2, 2], 2), wave(&[3, 2, 2], 3), wave(&[3, 2, 2], 4)];
    let v = Tensor::f32(vec![3, 2, 2], v.data.as_f32().unwrap().iter().map(|v| v.abs() + 0.5).collect());
    let y = Case::new(7)
        .input("x", x.clone())
        .init("s", s.clone())
        .init("b", b.clone())
        .init("m", m.clone())
        .init("v", v.clone())
        .node("BatchNormalization", &["x", "s", "b", "m", "v"], &["y"], vec![attr::int("spatial", 0)])
        .run_y();
    let f = |t: &Tensor| t.data.as_f32().unwrap().to_vec();
    let (xs, ss, bs, ms, vs) = (f(&x), f(&s), f(&b), f(&m), f(&v));
    let want: Vec<f32> = (0..24)
        .map(|i| {
            let p = i % 12;
            (ss[p] as f64 * (xs[i] as f64 - ms[p] as f64) / (vs[p] as f64 + 1e-5).sqrt() + bs[p] as f64) as f32
        })
        .collect();
    assert_close(&y, &f32s(&[2, 3, 2, 2], &want));
}

#[test]
fn batch_norm_training_mode_uses_batch_statistics() {
    let mut case = Case::new(15).input("x", wave(&[2, 3, 2, 2], 0));
    for (name, value) in ["s", "b", "m", "v"].iter().zip(bn_params()) {
        case = case.init(name, value);
    }
    let out = case
        .node(
            "BatchNormalization",
            &["x", "s", "b", "m", "v"],
            &["y", "running_mean", "running_var"],
            vec![attr::float("epsilon", 1e-3), attr::float("momentum", 0.8), attr::int("training_mode", 1)],
        )
        .run(&[("y", DType::F32), ("running_mean", DType::F32), ("running_var", DType::F32)]);
    let y = [
        0.5181973, 1.036395, -1.38186, -0.8636622, 0.627297, 0.9585885, 1.28988, 1.621172, 2.640807, 0.9276394, -0.7855279,
        -2.498695, 0.8636622, 1.38186, -1.036395, -0.5181973, 0.8481581, 1.17945, 1.510741, -0.03528607, 1.498695, -0.2144721,
        -1.927639, -3.640807,
    ];
    assert_close(&out[0], &f32s(&[2, 3, 2, 2], &y));
    assert_close(&out[1], &f32s(&[3], &[0.2, -0.33125, 0.725]));
    assert_close(&out[2], &f32s(&[3], &[1.21875, 0.4560547, 3.353125]));
}

#[test]
fn batch_norm_refuses_training_outputs_of_old_opsets() {
    let mut case = Case::new(9).input("x", wave(&[2, 3, 2, 2], 0));
    for (name, value) in ["s", "b", "m", "v"].iter().zip(bn_params()) {
        case = case.init(name, value);
    }
    let e = case
        .node("BatchNormalization", &["x", "s", "b", "m", "v"], &["y", "mean"], vec![])
        .load_error(&[("y", DType::F32), ("mean", DType::F32)]);
    assert_unsupported(&e, "training-only statistics");
}

#[test]
fn instance_normalization() {
    let [s, b, _, _] = bn_params();
    let y = Case::new(6)
        .input("x", wave(&[2, 3, 2, 2], 0))
        .init("s", s)
        .init("b", b)
        .node("InstanceNormalization", &["x", "s", "b"], &["y"], vec![attr::float("epsilon", 1e-2)])
        .run_y();
    let want = [
        0.6999257, 1.22487, -1.22487, -0.6999257, 0.3338996, 0.7779665, 1.222034, 1.6661, 2.164402, 0.3881339, -1.388134,
        -3.164402, 0.6999257, 1.22487, -1.22487, -0.6999257, 0.976097, 1.262932, 1.549767, 0.2112032, 2.164402, 0.3881339,
        -1.388134, -3.164402,
    ];
    assert_close(&y, &f32s(&[2, 3, 2, 2], &want));
}

#[test]
fn lrn_odd_and_even_window_sizes() {
    let lrn = |size: i64, alpha: f32, beta: f32, bias: f32| {
        Case::new(13)
            .input("x", wave(&[1, 5, 2, 1], 0))
            .node(
                "LRN",
                &["x"],
                &["y"],
                vec![attr::int("size", size), attr::float("alpha", alpha), attr::float("beta", beta), attr::float("bias", bias)],
            )
            .run_y()
    };
    let odd = [0.3502114, 0.7251942, -0.9234624, -0.6025432, -0.2264601, 0.1160807, 0.4723055, 0.8337324, -0.8361643, -0.4778082];
    let even = [0.4776119, 1.015873, -1.306122, -1.038961, -0.4324324, 0.1797753, 0.6632124, 1.160622, -1.265537, -0.8888889];
    assert_close(&lrn(3, 0.5, 0.75, 2.0), &f32s(&[1, 5, 2, 1], &odd));
    assert_close(&lrn(2, 0.25, 1.0, 1.0), &f32s(&[1, 5, 2, 1], &even));
}

#[test]
fn gemm_alpha_beta_and_broadcast_bias() {
    let y = Case::new(13)
        .input("a", wave(&[3, 4], 0))
        .init("b", wave(&[4, 2], 1))
        .init("c", f32s(&[2], &[0.5, -1.0]))
        .node("Gemm", &["a", "b", "c"], &["y"], vec![attr::float("alpha", 0.5), attr::float("beta", 2.0)])
        .run_y();
    let want = f32s(&[3, 2], &[-0.46875, -3.84375, 1.5, -0.5625, 1.34375, -2.59375]);
    assert_close(&y, &want);
    // Opset 6 spells the same broadcast with an attribute.
    let y6 = Case::new(6)
        .input("a", wave(&[3, 4], 0))
        .init("b", wave(&[4, 2], 1))
        .init("c", f32s(&[2], &[0.5, -1.0]))
        .node("Gemm", &["a", "b", "c"], &["y"], vec![attr::float("alpha", 0.5), attr::float("beta", 2.0), attr::int("broadcast", 1)])
        .run_y();
    assert_close(&y6, &want);
}

#[test]
fn gemm_transposes_and_column_bias() {
    let a = wave(&[3, 4], 0);
    let b = wave(&[4, 2], 1);
    let transpose = |t: &Tensor| {
        let (r, c) = (t.shape[0], t.shape[1]);
        let v = t.data.as_f32().unwrap();
        Tensor::f32(vec![c, r], (0..r * c).map(|i| v[(i % r) * c + i / r]).collect())
    };
    let case = Case::new(11)
        .input("a", transpose(&a))
        .init("b", transpose(&b))
        .init("c", f32s(&[3, 1], &[1.0, 2.0, 3.0]))
        .node("Gemm", &["a", "b", "c"], &["y"], vec![attr::int("transA", 1), attr::int("transB", 1)]);
    let y = case.run_y();
    assert_close(&y, &f32s(&[3, 2], &[-1.9375, -2.6875, 3.0, 4.875, 3.6875, 1.8125]));
}

#[test]
fn gemm_without_bias_folds_the_constant_transpose() {
    let mut case = Case::new(13)
        .input("a", wave(&[3, 4], 0))
        .init("b", wave(&[2, 4], 1))
        .node("Gemm", &["a", "b"], &["y"], vec![attr::int("transB", 1)]);
    case.model.output_untyped("y", DType::F32);
    let g = cnnc_onnx::load_model_bytes(&case.model.to_bytes(), &Default::default()).unwrap();
    let ops: Vec<&str> = g.nodes.iter().filter(|n| !matches!(n.op, Op::Constant(_))).map(|n| n.op.mnemonic()).collect();
    assert_eq!(ops, ["matmul"]);
}

fn matmul(a: Tensor, b: Tensor) -> Tensor {
    Case::new(13).input("a", a).input("b", b).node("MatMul", &["a", "b"], &["y"], vec![]).run_y()
}

#[test]
fn matmul_batch_broadcast_and_vectors() {
    let want = [
        -1.3125, -1.125, -0.8125, -1.9375, -1.25, -4.25, -1.1875, 3.0, -1.1875, -4.1875, -1.5625, 2.625, -1.375, -0.625, -0.875,
        -1.4375, -1.125, -4.625, -1.0625, 2.625, -0.875, -4.375, -1.25, 2.4375,
    ];
    assert_close(&matmul(wave(&[2, 1, 2, 3], 0), wave(&[3, 3, 2], 2)), &f32s(&[2, 3, 2, 2], &want));
    let vector = wave(&[3], 1);
    assert_close(
        &matmul(vector.clone(), wave(&[2, 3, 4], 3)),
        &f32s(&[2, 4], &[3.6875, 0.1875, 0.9375, -5.75, 4.1875, 0.6875, -6.0, -5.25]),
    );
    assert_close(
        &matmul(wave(&[2, 4, 3], 4), vector.clone()),
        &f32s(&[2, 4], &[0.4375, -1.5625, 0.6875, -1.3125, -3.3125, -1.0625, -3.0625, -0.8125]),
    );
    assert_close(&matmul(vector, wave(&[3], 5)), &f32s(&[], &[0.6875]));
}

#[test]
fn matmul_and_gemm_refusals() {
    let e = Case::new(13)
        .input("a", wave(&[2, 3], 0))
        .input("b", wave(&[4, 2], 0))
        .node("MatMul", &["a", "b"], &["y"], vec![])
        .load_error(&[("y", DType::F32)]);
    assert_invalid(&e, "inner dimensions");
    let e = Case::new(13)
        .input("a", wave(&[2, 3, 1], 0))
        .input("b", wave(&[3, 2], 0))
        .node("Gemm", &["a", "b"], &["y"], vec![])
        .load_error(&[("y", DType::F32)]);
    assert_invalid(&e, "A must be a matrix");
}

#[test]
fn layer_normalization_with_statistics_outputs() {
    let out = Case::new(17)
        .input("x", wave(&[2, 3, 4], 0))
        .init("s", wave(&[3, 4], 1))
        .init("b", wave(&[3, 4], 2))
        .node("LayerNormalization", &["x", "s", "b"], &["y", "mean", "inv_std"], vec![attr::int("axis", 1), attr::float("epsilon", 1e-3)])
        .run(&[("y", DType::F32), ("mean", DType::F32), ("inv_std", DType::F32)]);
    let y = [
        1.949038, 4.3243, 1.313626, 0.2286525, 0.08737969, 0.8898075, 2.635936, 1.075765, 0.8471124, 0.07670593, 0.25, 1.366995,
        2.218846, 4.766312, 0.7308965, -0.08710504, 0.01274798, 1.030456, 2.966018, -5.365467, 0.3562455, -0.1558045, 0.25,
        1.573659,
    ];
    assert_close(&out[0], &f32s(&[2, 3, 4], &y));
    assert_close(&out[1], &f32s(&[2, 1, 1], &[-0.08333334, 0.0625]));
    assert_close(&out[2], &f32s(&[2, 1, 1], &[0.838845, 0.8158707]));
}

fn group_norm(opset: i64, scale: Tensor, bias: Tensor) -> Tensor {
    Case::new(opset)
        .input("x", wave(&[2, 4, 3], 0))
        .init("s", scale)
        .init("b", bias)
        .node("GroupNormalization", &["x", "s", "b"], &["y"], vec![attr::int("num_groups", 2), attr::float("epsilon", 1e-2)])
        .run_y()
}

#[test]
fn group_normalization_per_channel_and_per_group_parameters() {
    let per_channel = group_norm(21, f32s(&[4], &[1.0, 2.0, 3.0, 4.0]), f32s(&[4], &[0.0, 0.5, -0.5, 1.0]));
    let want = [
        0.8057735, 1.436379, -1.506446, -1.251682, 0.009529167, 1.27074, 1.91732, 3.809137, -5.019339, -2.503363, 0.01905833,
        2.54148, 0.8057735, 1.436379, -1.506446, -1.251682, 0.009529167, 1.27074, 3.578331, -4.986164, -3.150915, -0.08755498,
        2.359444, 4.806442,
    ];
    assert_close(&per_channel, &f32s(&[2, 4, 3], &want));
    // Opset 18: one scale and bias per group.
    let per_group = group_norm(18, f32s(&[2], &[2.0, -1.0]), f32s(&[2], &[0.25, 0.75]));
    let want = [
        1.861547, 3.122758, -2.762892, -1.501682, -0.2404708, 1.02074, -0.05577351, -0.6863789, 2.256446, 1.625841, 0.9952354,
        0.3646301, 1.861547, 3.122758, -2.762892, -1.501682, -0.2404708, 1.02074, -0.6094437, 2.245388, 1.633638, 1.021889,
        0.4101391, -0.2016106,
    ];
    assert_close(&per_group, &f32s(&[2, 4, 3], &want));
    let e = Case::new(21)
        .input("x", wave(&[2, 4, 3], 0))
        .init("s", f32s(&[4], &[1.0; 4]))
        .init("b", f32s(&[4], &[0.0; 4]))
        .node("GroupNormalization", &["x", "s", "b"], &["y"], vec![attr::int("num_groups", 3)])
        .load_error(&[("y", DType::F32)]);
    assert_invalid(&e, "num_groups 3");
}

#[test]
fn batch_norm_training_mode_can_be_lowered_with_running_statistics() {
    use cnnc_onnx::ctx::{GraphBuilder, NodeCtx};
    use cnnc_onnx::ops::norm::{BatchStatistics, batch_normalization_with};
    let mut builder = GraphBuilder::new("t");
    let x = builder.graph.add_input(cnnc_ir::TensorType::f32(vec![2, 3, 2, 2]), "x");
    let params: Vec<_> = bn_params().into_iter().map(|t| Some(builder.constant("p", t))).collect();
    let node = cnnc_onnx::node(
        "bn",
        "BatchNormalization",
        &["x", "s", "b", "m", "v"],
        &["y", "running_mean", "running_var"],
        vec![attr::float("epsilon", 1e-3), attr::int("training_mode", 1)],
    );
    let mut inputs = vec![Some(x)];
    inputs.extend(params.iter().copied());
    let mut ctx = NodeCtx { builder: &mut builder, node: &node, inputs, opset: 15, name: "bn".into(), inference: false, random_dropout: false };
    let outputs = batch_normalization_with(&mut ctx, BatchStatistics::Running).unwrap();
    assert_eq!(outputs.len(), 3);
    assert_eq!(&outputs[1..], &[params[2].unwrap(), params[3].unwrap()]);
    let mut graph = builder.graph;
    graph.outputs.push(outputs[0]);
    let y = cnnc_ir::interp::run(&graph, &[wave(&[2, 3, 2, 2], 0)]).unwrap();
    assert_close(&y[0], &f32s(&[2, 3, 2, 2], &BN_INFERENCE));
}
