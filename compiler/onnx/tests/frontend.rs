//! The frontend's infrastructure: inputs and initializers, shapes and batch, constant
//! folding, Constant/Shape/ConstantOfShape/Reshape/Dropout/Identity, graph outputs,
//! model-local functions, and the errors for unsupported or malformed models.

mod common;

use cnnc_ir::{DType, Op, Tensor, TensorData};
use cnnc_onnx::proto::{AttributeType, FunctionProto, OperatorSetIdProto, data_type};
use cnnc_onnx::{Dim, FrontendError, LoadOptions, ModelBuilder, attr, load_model_bytes, node};
use common::*;

#[test]
fn relu_and_broadcast_add_run() {
    let mut m = single_input("x", DType::F32, &[2, 3], 17);
    m.initializer("b", &f32s(&[3], &[10.0, 20.0, 30.0]))
        .node("Relu", &["x"], &["r"], vec![])
        .node("Add", &["r", "b"], &["y"], vec![])
        .output("y", DType::F32, &[2, 3]);
    let g = load(&m);
    assert_eq!(g.inputs.len(), 1);
    assert_eq!(g.value(g.inputs[0]).name, "x");
    assert_eq!(g.value(g.outputs[0]).name, "y");
    let y = run(&g, &[f32s(&[2, 3], &[-1.0, 2.0, -3.0, 4.0, -5.0, 6.0])]);
    assert_close(&y[0], &f32s(&[2, 3], &[10.0, 22.0, 30.0, 14.0, 20.0, 36.0]));
}

#[test]
fn an_input_with_an_initializer_is_a_constant() {
    let mut m = ModelBuilder::new("t", 13);
    m.input("x", DType::F32, &[2])
        .input("w", DType::F32, &[2])
        .initializer("w", &f32s(&[2], &[1.0, 2.0]))
        .node("Mul", &["x", "w"], &["y"], vec![])
        .output("y", DType::F32, &[2]);
    let g = load(&m);
    assert_eq!(g.inputs.len(), 1, "only x is an input");
    assert_close(&run(&g, &[f32s(&[2], &[3.0, 4.0])])[0], &f32s(&[2], &[3.0, 8.0]));
}

#[test]
fn splat_initializers_are_stored_as_splats() {
    let mut m = single_input("x", DType::F32, &[4], 13);
    m.initializer("k", &f32s(&[4], &[0.5; 4])).node("Mul", &["x", "k"], &["y"], vec![]).output("y", DType::F32, &[4]);
    let g = load(&m);
    assert!(g.constants.iter().all(|c| matches!(c.value, cnnc_ir::ConstValue::Splat(_))));
}

#[test]
fn symbolic_batch_takes_the_batch_option() {
    let mut m = ModelBuilder::new("t", 13);
    m.input_with_dims("x", data_type::FLOAT, &[Dim::Symbolic("N".into()), Dim::Fixed(3)])
        .node("Relu", &["x"], &["y"], vec![])
        .output_untyped("y", DType::F32);
    let g = load(&m);
    assert_eq!(g.ty(g.inputs[0]).shape, vec![1, 3]);
    let g = load_model_bytes(&m.to_bytes(), &LoadOptions { batch: Some(5), ..Default::default() }).unwrap();
    assert_eq!(g.ty(g.inputs[0]).shape, vec![5, 3]);
    assert_eq!(g.ty(g.outputs[0]).shape, vec![5, 3]);
}

#[test]
fn the_batch_option_overrides_a_fixed_leading_dim() {
    let mut m = single_input("x", DType::F32, &[1, 3], 13);
    m.node("Flatten", &["x"], &["y"], vec![]).output("y", DType::F32, &[1, 3]);
    let g = load_model_bytes(&m.to_bytes(), &LoadOptions { batch: Some(4), ..Default::default() }).unwrap();
    assert_eq!(g.ty(g.outputs[0]).shape, vec![4, 3]);
}

#[test]
fn unknown_leading_dim_is_one_and_symbolic_inner_dims_are_refused() {
    let mut m = ModelBuilder::new("t", 13);
    m.input_with_dims("x", data_type::FLOAT, &[Dim::Unknown, Dim::Fixed(2)])
        .node("Relu", &["x"], &["y"], vec![])
        .output_untyped("y", DType::F32);
    assert_eq!(load(&m).ty(load(&m).inputs[0]).shape, vec![1, 2]);

    let mut m = ModelBuilder::new("t", 13);
    m.input_with_dims("image", data_type::FLOAT, &[Dim::Fixed(1), Dim::Fixed(3), Dim::Symbolic("H".into())])
        .node("Relu", &["image"], &["y"], vec![])
        .output_untyped("y", DType::F32);
    let e = load_err(&m);
    assert!(e.is_unsupported());
    let msg = e.to_string();
    assert!(msg.contains("'image'") && msg.contains("dim 2") && msg.contains("'H'"), "{msg}");
}

#[test]
fn opsets_outside_6_to_28_are_refused() {
    for opset in [5, 29] {
        let mut m = single_input("x", DType::F32, &[1], opset);
        m.node("Relu", &["x"], &["y"], vec![]).output("y", DType::F32, &[1]);
        let e = load_err(&m);
        assert!(e.is_unsupported() && e.to_string().contains(&format!("opset {opset}")), "{e}");
    }
    for opset in [6, 28] {
        let mut m = single_input("x", DType::F32, &[1], opset);
        m.node("Relu", &["x"], &["y"], vec![]).output("y", DType::F32, &[1]);
        load(&m);
    }
}

#[test]
fn every_unsupported_node_is_listed() {
    let mut m = single_input("x", DType::F32, &[1, 4], 17);
    m.node("Relu", &["x"], &["a"], vec![])
        .node("Hardmax", &["a"], &["b"], vec![])
        .node("Relu", &["b"], &["c"], vec![]) // downstream of an unsupported node: not listed
        .node("LpNormalization", &["c"], &["d"], vec![])
        .node("Det", &["x"], &["e"], vec![])
        .node("Add", &["d", "e"], &["y"], vec![])
        .output("y", DType::F32, &[1, 4]);
    let e = load_err(&m);
    let FrontendError::Unsupported(nodes) = &e else { panic!("{e}") };
    let listed: Vec<&str> = nodes.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(listed, ["Hardmax", "LpNormalization", "Det"]);
    assert!(nodes.iter().all(|n| n.opset == 17 && !n.reason.is_empty()));
    assert_eq!(e.to_string().lines().count(), 4, "a header and one line per node:\n{e}");
}

#[test]
fn custom_domains_and_unsupported_element_types_are_listed() {
    let mut m = ModelBuilder::new("t", 17);
    m.opset("com.example", 1)
        .input_with_dims("q", data_type::INT8, &[Dim::Fixed(2)])
        .input("x", DType::F32, &[2])
        .initializer("d", &f32s(&[2], &[1.0, 2.0]))
        .push_node(cnnc_onnx::proto::NodeProto {
            domain: "com.example".into(),
            ..node("custom", "Magic", &["x"], &["m"], vec![])
        })
        .node("Cast", &["x"], &["c"], vec![attr::int("to", data_type::DOUBLE as i64)])
        .output("m", DType::F32, &[2])
        .output("c", DType::F32, &[2]);
    let FrontendError::Unsupported(nodes) = load_err(&m) else { panic!() };
    let text: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
    assert_eq!(nodes.len(), 3, "{text:#?}");
    assert!(text[0].contains("'q'") && text[0].contains("int8"), "{}", text[0]);
    assert!(text[1].contains("Magic") && text[1].contains("com.example"), "{}", text[1]);
    assert!(text[2].contains("Cast") && text[2].contains("double"), "{}", text[2]);
}

#[test]
fn run_time_shape_operands_are_unsupported_with_the_reason() {
    let mut m = ModelBuilder::new("t", 17);
    m.input("x", DType::F32, &[2, 3])
        .input("shape", DType::I64, &[2])
        .node("Reshape", &["x", "shape"], &["y"], vec![])
        .output("y", DType::F32, &[3, 2]);
    let FrontendError::Unsupported(nodes) = load_err(&m) else { panic!() };
    assert!(
        nodes[0].reason.contains("'shape'") && nodes[0].reason.contains("compile-time constant"),
        "{}",
        nodes[0].reason
    );
}

#[test]
fn malformed_models_are_errors_not_panics() {
    for bytes in [vec![0xff, 0xff, 0xff], vec![0x0a, 0x80], b"not a model".to_vec()] {
        assert!(load_model_bytes(&bytes, &LoadOptions::default()).is_err());
    }
    let mut m = single_input("x", DType::F32, &[2], 17);
    m.node("Relu", &["nope"], &["y"], vec![]).output("y", DType::F32, &[2]);
    let e = load_err(&m);
    assert!(matches!(e, FrontendError::Invalid(_)) && e.to_string().contains("'nope'"), "{e}");
    let mut m = single_input("x", DType::F32, &[2], 17);
    m.node("Relu", &["x"], &["y"], vec![]).output("z", DType::F32, &[2]);
    assert!(load_err(&m).to_string().contains("'z'"));
    let mut m = single_input("x", DType::F32, &[2, 3], 17);
    m.initializer("y", &f32s(&[2], &[1.0, 2.0])).node("Add", &["x", "y"], &["z"], vec![]).output(
        "z",
        DType::F32,
        &[2, 3],
    );
    let e = load_err(&m);
    assert!(matches!(e, FrontendError::Invalid(_)) && e.to_string().contains("broadcast"), "{e}");
    let mut m = single_input("x", DType::F32, &[2], 17);
    m.node("LeakyRelu", &["x"], &["y"], vec![attr::string("alpha", "big")]).output("y", DType::F32, &[2]);
    assert!(load_err(&m).to_string().contains("'alpha'"));
}

#[test]
fn shape_computations_fold_to_constants() {
    // y = Reshape(x, Concat(Gather(Shape(x), 0), [-1])): only the Reshape remains.
    let mut m = single_input("x", DType::F32, &[2, 3, 4], 17);
    m.node("Shape", &["x"], &["s"], vec![])
        .initializer("zero", &i64s(&[1], &[0]))
        .node("Gather", &["s", "zero"], &["n"], vec![attr::int("axis", 0)])
        .initializer("minus1", &i64s(&[1], &[-1]))
        .node("Concat", &["n", "minus1"], &["target"], vec![attr::int("axis", 0)])
        .node("Reshape", &["x", "target"], &["y"], vec![])
        .output("y", DType::F32, &[2, 12]);
    let g = load(&m);
    assert_eq!(ops(&g), ["reshape"]);
    assert_eq!(g.ty(g.outputs[0]).shape, vec![2, 12]);
    assert_eq!(g.constants.len(), 0, "folded intermediates are removed");
}

#[test]
fn shape_start_and_end() {
    let cases: [(Option<i64>, Option<i64>, &[i64]); 5] = [
        (None, None, &[2, 3, 4, 5]),
        (Some(1), None, &[3, 4, 5]),
        (None, Some(-1), &[2, 3, 4]),
        (Some(-10), Some(10), &[2, 3, 4, 5]),
        (Some(3), Some(1), &[]),
    ];
    for (start, end, want) in cases {
        let mut attrs = vec![];
        attrs.extend(start.map(|s| attr::int("start", s)));
        attrs.extend(end.map(|e| attr::int("end", e)));
        let mut m = single_input("x", DType::F32, &[2, 3, 4, 5], 21);
        m.node("Shape", &["x"], &["y"], attrs).output_untyped("y", DType::I64);
        let g = load(&m);
        assert_eq!(ops(&g), ["reshape"], "a constant output gets a copy node");
        assert_eq!(run(&g, &[iota(&[2, 3, 4, 5])])[0], i64s(&[want.len()], want));
    }
}

#[test]
fn size_and_constant_of_shape() {
    let mut m = single_input("x", DType::F32, &[2, 3], 17);
    m.node("Size", &["x"], &["n"], vec![])
        .initializer("dims", &i64s(&[2], &[2, 2]))
        .node("ConstantOfShape", &["dims"], &["z"], vec![])
        .node("ConstantOfShape", &["dims"], &["k"], vec![attr::tensor("value", &i32s(&[1], &[7]))])
        .output_untyped("n", DType::I64)
        .output_untyped("z", DType::F32)
        .output_untyped("k", DType::I32);
    let out = eval(&m, &[iota(&[2, 3])]);
    assert_eq!(out[0], i64s(&[], &[6]));
    assert_eq!(out[1], f32s(&[2, 2], &[0.0; 4]));
    assert_eq!(out[2], i32s(&[2, 2], &[7; 4]));
}

#[test]
fn constant_node_forms() {
    let mut m = ModelBuilder::new("t", 13);
    m.node("Constant", &[], &["a"], vec![attr::tensor("value", &f32s(&[2], &[1.0, 2.0]))])
        .node("Constant", &[], &["b"], vec![attr::float("value_float", 1.5)])
        .node("Constant", &[], &["c"], vec![attr::floats("value_floats", &[1.0, -1.0])])
        .node("Constant", &[], &["d"], vec![attr::int("value_int", 3)])
        .node("Constant", &[], &["e"], vec![attr::ints("value_ints", &[4, 5, 6])]);
    for (name, dtype) in [("a", DType::F32), ("b", DType::F32), ("c", DType::F32), ("d", DType::I64), ("e", DType::I64)]
    {
        m.output_untyped(name, dtype);
    }
    let out = eval(&m, &[]);
    assert_eq!(out[0], f32s(&[2], &[1.0, 2.0]));
    assert_eq!(out[1], f32s(&[], &[1.5]));
    assert_eq!(out[2], f32s(&[2], &[1.0, -1.0]));
    assert_eq!(out[3], i64s(&[], &[3]));
    assert_eq!(out[4], i64s(&[3], &[4, 5, 6]));
    let mut m = ModelBuilder::new("t", 13);
    m.node("Constant", &[], &["a"], vec![attr::string("value_string", "hi")]).output_untyped("a", DType::F32);
    assert!(load_err(&m).is_unsupported());
}

#[test]
fn reshape_zero_minus_one_and_allowzero() {
    let cases: [(i64, &[i64], &[usize]); 3] =
        [(13, &[0, -1], &[2, 12]), (13, &[4, 0, -1], &[4, 3, 2]), (14, &[-1, 2], &[12, 2])];
    for (opset, target, want) in cases {
        let mut m = single_input("x", DType::F32, &[2, 3, 4], opset);
        m.initializer("s", &i64s(&[target.len()], target))
            .node("Reshape", &["x", "s"], &["y"], vec![])
            .output_untyped("y", DType::F32);
        let y = eval(&m, &[iota(&[2, 3, 4])]);
        assert_eq!(y[0].shape, want);
        assert_eq!(y[0].data, iota(&[2, 3, 4]).data);
    }
    // allowzero=1: a 0 is a real zero extent.
    let mut m = single_input("x", DType::F32, &[0, 3], 14);
    m.initializer("s", &i64s(&[2], &[3, 0]))
        .node("Reshape", &["x", "s"], &["y"], vec![attr::int("allowzero", 1)])
        .output_untyped("y", DType::F32);
    assert_eq!(eval(&m, &[f32s(&[0, 3], &[])])[0].shape, vec![3, 0]);
    // Without allowzero, 0 copies the input dim: [0, 3] -> [3, 0] is impossible.
    let mut m = single_input("x", DType::F32, &[2, 3], 14);
    m.initializer("s", &i64s(&[2], &[3, 0]))
        .node("Reshape", &["x", "s"], &["y"], vec![])
        .output_untyped("y", DType::F32);
    assert!(matches!(load_err(&m), FrontendError::Invalid(_)));
}

#[test]
fn dropout_is_the_identity_with_an_all_true_mask() {
    for opset in [7, 12, 13] {
        let mut m = single_input("x", DType::F32, &[2, 2], opset);
        m.node("Dropout", &["x"], &["y", "mask"], vec![])
            .output("y", DType::F32, &[2, 2])
            .output_untyped("mask", DType::Bool);
        let out = eval(&m, &[iota(&[2, 2])]);
        assert_eq!(out[0], iota(&[2, 2]));
        assert_eq!(out[1], bools(&[2, 2], &[true; 4]));
    }
    let mut m = single_input("x", DType::F32, &[2], 13);
    m.initializer("ratio", &f32s(&[], &[0.5]))
        .initializer("training", &bools(&[], &[true]))
        .node("Dropout", &["x", "ratio", "training"], &["y"], vec![])
        .output("y", DType::F32, &[2]);
    assert!(load_err(&m).is_unsupported());
}

#[test]
fn training_mode_dropout_draws_an_inverted_mask_for_training_steps() {
    let n = 20_000;
    let mut m = single_input("x", DType::F32, &[n], 13);
    m.initializer("ratio", &f32s(&[], &[0.3]))
        .initializer("training", &bools(&[], &[true]))
        .node("Dropout", &["x", "ratio", "training"], &["y", "mask"], vec![])
        .output("y", DType::F32, &[n])
        .output_untyped("mask", DType::Bool);
    let options = LoadOptions { random_dropout: true, ..Default::default() };
    let g = load_model_bytes(&m.to_bytes(), &options).unwrap();
    cnnc_ir::verify::verify(&g).unwrap();
    assert!(g.nodes.iter().any(|node| matches!(node.op, Op::RandomUniform { .. })));
    let x = Tensor::f32(vec![n], (0..n).map(|i| 1.0 + i as f32 / n as f32).collect());
    let out = run(&g, std::slice::from_ref(&x));
    let (TensorData::F32(xs), TensorData::F32(ys), TensorData::Bool(mask)) = (&x.data, &out[0].data, &out[1].data) else {
        panic!("output types")
    };
    for ((&x, &y), &keep) in xs.iter().zip(ys).zip(mask) {
        let want = if keep { x / 0.7 } else { 0.0 };
        assert!((y - want).abs() <= 1e-6 * want.abs(), "x {x} keep {keep}: y {y}, want {want}");
    }
    let dropped = mask.iter().filter(|&&k| !k).count() as f64 / n as f64;
    assert!((dropped - 0.3).abs() < 0.02, "dropped {dropped} of the elements, ratio 0.3");
    // Without the option the random node stays unsupported; in inference it is the identity.
    assert!(load_err(&m).is_unsupported());
    let inference = load_model_bytes(&m.to_bytes(), &LoadOptions { inference: true, ..Default::default() }).unwrap();
    assert_eq!(run(&inference, std::slice::from_ref(&x))[0], x);
}

#[test]
fn outputs_that_are_inputs_constants_or_repeated_get_their_own_node() {
    let mut m = single_input("x", DType::F32, &[2], 13);
    m.initializer("k", &f32s(&[2], &[1.0, 2.0]))
        .node("Identity", &["x"], &["same_as_x"], vec![])
        .node("Identity", &["k"], &["same_as_k"], vec![])
        .node("Relu", &["x"], &["r"], vec![])
        .node("Identity", &["r"], &["r2"], vec![])
        .output("same_as_x", DType::F32, &[2])
        .output("same_as_k", DType::F32, &[2])
        .output("r", DType::F32, &[2])
        .output("r2", DType::F32, &[2]);
    let g = load(&m);
    let names: Vec<&str> = g.outputs.iter().map(|&v| g.value(v).name.as_str()).collect();
    assert_eq!(names, ["same_as_x", "same_as_k", "r", "r2"]);
    let producers = g.producers();
    let mut distinct = g.outputs.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "every output is a different value");
    for &o in &g.outputs {
        let p = producers[o.index()].expect("produced by a node");
        assert!(!matches!(g.nodes[p].op, Op::Constant(_)), "an output is not a bare constant");
    }
    let out = run(&g, &[f32s(&[2], &[-1.0, 3.0])]);
    assert_eq!(out[0], f32s(&[2], &[-1.0, 3.0]));
    assert_eq!(out[1], f32s(&[2], &[1.0, 2.0]));
    assert_eq!(out[2], f32s(&[2], &[0.0, 3.0]));
    assert_eq!(out[3], f32s(&[2], &[0.0, 3.0]));
}

fn scaled_relu_function() -> FunctionProto {
    // ScaledRelu(X) = Relu(X) * Constant(value_float = @scale); scale defaults to 2.
    FunctionProto {
        name: "ScaledRelu".into(),
        domain: "local".into(),
        input: vec!["X".into()],
        output: vec!["Y".into()],
        attribute_proto: vec![attr::float("scale", 2.0)],
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 17 }],
        node: vec![
            node("relu", "Relu", &["X"], &["r"], vec![]),
            node("k", "Constant", &[], &["s"], vec![attr::reference("value_float", "scale", AttributeType::Float)]),
            node("mul", "Mul", &["r", "s"], &["Y"], vec![]),
        ],
        ..Default::default()
    }
}

#[test]
fn model_local_functions_expand_inline() {
    let mut m = single_input("x", DType::F32, &[3], 17);
    m.opset("local", 1)
        .function(scaled_relu_function())
        .push_node(cnnc_onnx::proto::NodeProto {
            domain: "local".into(),
            ..node("a", "ScaledRelu", &["x"], &["y1"], vec![])
        })
        .push_node(cnnc_onnx::proto::NodeProto {
            domain: "local".into(),
            ..node("b", "ScaledRelu", &["y1"], &["y2"], vec![attr::float("scale", -1.0)])
        })
        .output("y2", DType::F32, &[3]);
    let g = load(&m);
    assert!(g.nodes.iter().any(|n| n.name.starts_with("a/")), "body nodes are named after the call");
    let y = run(&g, &[f32s(&[3], &[-1.0, 0.5, 2.0])]);
    // a: relu*2 = [0, 1, 4]; b: relu*-1 = [0, -1, -4]
    assert_close(&y[0], &f32s(&[3], &[0.0, -1.0, -4.0]));
}

#[test]
fn recursive_functions_are_refused() {
    let mut f = scaled_relu_function();
    f.node[0] =
        cnnc_onnx::proto::NodeProto { domain: "local".into(), ..node("again", "ScaledRelu", &["X"], &["r"], vec![]) };
    let mut m = single_input("x", DType::F32, &[3], 17);
    m.opset("local", 1)
        .function(f)
        .push_node(cnnc_onnx::proto::NodeProto {
            domain: "local".into(),
            ..node("a", "ScaledRelu", &["x"], &["y"], vec![])
        })
        .output("y", DType::F32, &[3]);
    assert!(load_err(&m).to_string().contains("recursive"));
}

#[test]
fn identity_of_a_computed_value_keeps_the_output_name() {
    let mut m = single_input("x", DType::F32, &[2], 13);
    m.node("Relu", &["x"], &["r"], vec![]).node("Identity", &["r"], &["out"], vec![]).output("out", DType::F32, &[2]);
    let g = load(&m);
    assert_eq!(g.value(g.outputs[0]).name, "out");
    assert_eq!(ops(&g), ["unary"]);
}

#[test]
fn tensor_pb_round_trip_through_the_writer_types() {
    let t = Tensor::new(vec![2], cnnc_ir::TensorData::Bool(vec![true, false]));
    let proto = cnnc_onnx::tensor_to_proto("b", &t);
    assert_eq!(proto.data_type, data_type::BOOL);
    assert_eq!(cnnc_onnx::tensor_from_proto(&proto, None).unwrap(), t);
}

mod robustness {
    use super::*;
    use proptest::prelude::*;

    fn sample_model() -> Vec<u8> {
        let mut m = ModelBuilder::new("sample", 17);
        m.input("x", DType::F32, &[1, 2, 4, 4])
            .initializer("shape", &i64s(&[2], &[1, -1]))
            .initializer("pads", &i64s(&[8], &[0, 0, 1, 1, 0, 0, 1, 1]))
            .initializer("w", &f32s(&[2], &[0.5, -0.5]))
            .node("Pad", &["x", "pads"], &["p"], vec![attr::string("mode", "reflect")])
            .node("Transpose", &["p"], &["t"], vec![attr::ints("perm", &[0, 2, 3, 1])])
            .node("Mul", &["t", "w"], &["m"], vec![])
            .node("Reshape", &["m", "shape"], &["r"], vec![])
            .node("Split", &["r"], &["a", "b"], vec![attr::int("axis", 1)])
            .node("Concat", &["b", "a"], &["y"], vec![attr::int("axis", 1)])
            .output("y", DType::F32, &[1, 72]);
        m.to_bytes()
    }

    #[test]
    fn the_sample_model_loads() {
        load_model_bytes(&sample_model(), &LoadOptions::default()).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        /// Corrupted models are errors (or, by luck, still models), never panics.
        #[test]
        fn corrupted_models_do_not_panic(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
            let mut bytes = sample_model();
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            let _ = load_model_bytes(&bytes, &LoadOptions::default());
        }

        #[test]
        fn truncated_models_do_not_panic(len in 0usize..400) {
            let bytes = sample_model();
            let _ = load_model_bytes(&bytes[..len.min(bytes.len())], &LoadOptions::default());
        }
    }
}
