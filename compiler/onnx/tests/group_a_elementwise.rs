//! Group A elementwise ops, loaded from models built with the writer and run by the
//! interpreter, against values computed by hand (or by the formula in f64).

mod common;

use cnnc_ir::{DType, Op, Tensor, UnaryFn};
use cnnc_onnx::proto::data_type;
use cnnc_onnx::{FrontendError, ModelBuilder, attr};
use common::*;

const X: [f32; 6] = [-2.0, -0.5, 0.0, 0.5, 2.0, 3.0];

/// Runs `op_type` with `attrs` on X and compares with `f` applied in f64.
fn check_unary(op_type: &str, opset: i64, attrs: Vec<cnnc_onnx::proto::AttributeProto>, f: impl Fn(f64) -> f64) {
    let mut m = single_input("x", DType::F32, &[6], opset);
    m.node(op_type, &["x"], &["y"], attrs).output("y", DType::F32, &[6]);
    let want: Vec<f32> = X.iter().map(|&x| f(x as f64) as f32).collect();
    let got = eval(&m, &[f32s(&[6], &X)]);
    assert_close(&got[0], &f32s(&[6], &want));
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[test]
fn activations() {
    check_unary("Relu", 14, vec![], |x| x.max(0.0));
    check_unary("LeakyRelu", 16, vec![], |x| if x < 0.0 { 0.01 * x } else { x });
    check_unary("LeakyRelu", 6, vec![attr::float("alpha", 0.1)], |x| if x < 0.0 { 0.1 * x } else { x });
    check_unary("Sigmoid", 13, vec![], sigmoid);
    check_unary("HardSigmoid", 6, vec![], |x| (0.2 * x + 0.5).clamp(0.0, 1.0));
    check_unary("HardSigmoid", 22, vec![attr::float("alpha", 0.5), attr::float("beta", 0.25)], |x| {
        (0.5 * x + 0.25).clamp(0.0, 1.0)
    });
    check_unary("HardSwish", 14, vec![], |x| x * (x / 6.0 + 0.5).clamp(0.0, 1.0));
    check_unary("Swish", 24, vec![], |x| x * sigmoid(x));
    check_unary("Swish", 24, vec![attr::float("alpha", 2.0)], |x| x * sigmoid(2.0 * x));
    check_unary("Tanh", 13, vec![], f64::tanh);
    check_unary("Elu", 6, vec![], |x| if x < 0.0 { x.exp() - 1.0 } else { x });
    check_unary("Elu", 22, vec![attr::float("alpha", 0.5)], |x| if x < 0.0 { 0.5 * (x.exp() - 1.0) } else { x });
    let (alpha, gamma) = (1.673_263_242_354_377_3, 1.050_700_987_355_480_5);
    check_unary("Selu", 6, vec![], |x| gamma * if x <= 0.0 { alpha * (x.exp() - 1.0) } else { x });
    check_unary("Selu", 6, vec![attr::float("alpha", 2.0), attr::float("gamma", 3.0)], |x| {
        3.0 * if x <= 0.0 { 2.0 * (x.exp() - 1.0) } else { x }
    });
    check_unary("Celu", 12, vec![attr::float("alpha", 2.0)], |x| x.max(0.0) + (2.0 * ((x / 2.0).exp() - 1.0)).min(0.0));
    check_unary("Softplus", 6, vec![], |x| (1.0 + x.exp()).ln());
    check_unary("Softsign", 6, vec![], |x| x / (1.0 + x.abs()));
    check_unary("Mish", 18, vec![], |x| x * (1.0 + x.exp()).ln().tanh());
    // erf by its series, which converges fast for |x| <= 3.
    let erf = |x: f64| {
        let (mut term, mut sum) = (x, x);
        for n in 1..80 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    };
    check_unary("Erf", 13, vec![], erf);
    check_unary("Gelu", 20, vec![], |x| 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)));
    let k = (2.0 / std::f64::consts::PI).sqrt();
    check_unary("Gelu", 20, vec![attr::string("approximate", "tanh")], |x| {
        0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
    });
}

#[test]
fn math_functions() {
    check_unary("Neg", 13, vec![], |x| -x);
    check_unary("Abs", 13, vec![], f64::abs);
    check_unary("Floor", 13, vec![], f64::floor);
    check_unary("Ceil", 13, vec![], f64::ceil);
    check_unary("Exp", 13, vec![], f64::exp);
    let mut m = single_input("x", DType::F32, &[3], 13);
    m.node("Sqrt", &["x"], &["s"], vec![])
        .node("Log", &["x"], &["l"], vec![])
        .node("Reciprocal", &["x"], &["r"], vec![])
        .output("s", DType::F32, &[3])
        .output("l", DType::F32, &[3])
        .output("r", DType::F32, &[3]);
    let out = eval(&m, &[f32s(&[3], &[1.0, 4.0, 0.25])]);
    assert_close(&out[0], &f32s(&[3], &[1.0, 2.0, 0.5]));
    assert_close(&out[1], &f32s(&[3], &[0.0, 4f32.ln(), 0.25f32.ln()]));
    assert_close(&out[2], &f32s(&[3], &[1.0, 0.25, 4.0]));
}

#[test]
fn gelu_rejects_unknown_approximations() {
    let mut m = single_input("x", DType::F32, &[1], 20);
    m.node("Gelu", &["x"], &["y"], vec![attr::string("approximate", "fast")]).output("y", DType::F32, &[1]);
    assert!(load_err(&m).to_string().contains("'fast'"));
}

#[test]
fn clip_bounds_are_attributes_before_opset_11_and_inputs_after() {
    let x = f32s(&[4], &[-3.0, -1.0, 1.0, 3.0]);
    let mut m = single_input("x", DType::F32, &[4], 6);
    m.node("Clip", &["x"], &["y"], vec![attr::float("min", -2.0), attr::float("max", 2.0)]).output(
        "y",
        DType::F32,
        &[4],
    );
    assert_close(&eval(&m, &[x.clone()])[0], &f32s(&[4], &[-2.0, -1.0, 1.0, 2.0]));
    let mut m = single_input("x", DType::F32, &[4], 6);
    m.node("Clip", &["x"], &["y"], vec![attr::float("max", 0.0)]).output("y", DType::F32, &[4]);
    assert_close(&eval(&m, &[x.clone()])[0], &f32s(&[4], &[-3.0, -1.0, 0.0, 0.0]));

    let mut m = single_input("x", DType::F32, &[4], 13);
    m.initializer("lo", &f32s(&[], &[-2.0])).node("Clip", &["x", "lo"], &["y"], vec![]).output("y", DType::F32, &[4]);
    assert_close(&eval(&m, &[x.clone()])[0], &f32s(&[4], &[-2.0, -1.0, 1.0, 3.0]));
    let mut m = single_input("x", DType::F32, &[4], 11);
    m.initializer("hi", &f32s(&[], &[0.5])).node("Clip", &["x", "", "hi"], &["y"], vec![]).output(
        "y",
        DType::F32,
        &[4],
    );
    assert_close(&eval(&m, &[x.clone()])[0], &f32s(&[4], &[-3.0, -1.0, 0.5, 0.5]));
    let mut m = single_input("x", DType::F32, &[4], 13);
    m.node("Clip", &["x"], &["y"], vec![]).output("y", DType::F32, &[4]);
    assert_close(&eval(&m, &[x.clone()])[0], &x);
    // min > max: everything becomes max.
    let mut m = single_input("x", DType::F32, &[4], 13);
    m.initializer("lo", &f32s(&[], &[2.0])).initializer("hi", &f32s(&[], &[1.0]));
    m.node("Clip", &["x", "lo", "hi"], &["y"], vec![]).output("y", DType::F32, &[4]);
    assert_close(&eval(&m, &[x])[0], &f32s(&[4], &[1.0; 4]));
}

#[test]
fn integer_clip_is_exact() {
    let big = 1i64 << 40;
    let mut m = single_input("x", DType::I64, &[3], 13);
    m.initializer("lo", &i64s(&[], &[-big])).initializer("hi", &i64s(&[], &[big + 1]));
    m.node("Clip", &["x", "lo", "hi"], &["y"], vec![]).output("y", DType::I64, &[3]);
    let y = eval(&m, &[i64s(&[3], &[-big - 5, 7, big + 3])]);
    assert_eq!(y[0], i64s(&[3], &[-big, 7, big + 1]));
}

#[test]
fn prelu_broadcasts_the_slope_and_opset_6_slopes_are_per_channel() {
    let x = f32s(&[1, 2, 2], &[-1.0, 1.0, -2.0, 2.0]);
    let mut m = single_input("x", DType::F32, &[1, 2, 2], 16);
    m.initializer("s", &f32s(&[2, 1], &[0.5, 0.25])).node("PRelu", &["x", "s"], &["y"], vec![]).output(
        "y",
        DType::F32,
        &[1, 2, 2],
    );
    assert_close(&eval(&m, &[x.clone()])[0], &f32s(&[1, 2, 2], &[-0.5, 1.0, -0.5, 2.0]));
    let mut m = single_input("x", DType::F32, &[1, 2, 2], 6);
    m.initializer("s", &f32s(&[2], &[0.5, 0.25])).node("PRelu", &["x", "s"], &["y"], vec![]).output(
        "y",
        DType::F32,
        &[1, 2, 2],
    );
    assert_close(&eval(&m, &[x])[0], &f32s(&[1, 2, 2], &[-0.5, 1.0, -0.5, 2.0]));
    // A slope that would widen the output is not unidirectional.
    let mut m = single_input("x", DType::F32, &[2], 16);
    m.initializer("s", &f32s(&[3, 1], &[1.0; 3]))
        .node("PRelu", &["x", "s"], &["y"], vec![])
        .output_untyped("y", DType::F32);
    assert!(matches!(load_err(&m), FrontendError::Invalid(_)));
}

fn binary_model(
    op_type: &str,
    opset: i64,
    a: &Tensor,
    b: &Tensor,
    attrs: Vec<cnnc_onnx::proto::AttributeProto>,
) -> ModelBuilder {
    let mut m = ModelBuilder::new("t", opset);
    m.input("a", a.data.dtype(), &a.shape)
        .input("b", b.data.dtype(), &b.shape)
        .node(op_type, &["a", "b"], &["y"], attrs)
        .output_untyped("y", DType::F32);
    m
}

#[test]
fn arithmetic_broadcasts() {
    let a = iota(&[2, 3]);
    let b = f32s(&[3], &[1.0, 2.0, 4.0]);
    let cases: [(&str, [f32; 6]); 6] = [
        ("Add", [1.0, 3.0, 6.0, 4.0, 6.0, 9.0]),
        ("Sub", [-1.0, -1.0, -2.0, 2.0, 2.0, 1.0]),
        ("Mul", [0.0, 2.0, 8.0, 3.0, 8.0, 20.0]),
        ("Div", [0.0, 0.5, 0.5, 3.0, 2.0, 1.25]),
        ("Max", [1.0, 2.0, 4.0, 3.0, 4.0, 5.0]),
        ("Min", [0.0, 1.0, 2.0, 1.0, 2.0, 4.0]),
    ];
    for (op, want) in cases {
        let out = eval(&binary_model(op, 14, &a, &b, vec![]), &[a.clone(), b.clone()]);
        assert_close(&out[0], &f32s(&[2, 3], &want));
    }
}

#[test]
fn integer_division_truncates() {
    let a = i32s(&[4], &[7, -7, 7, -7]);
    let b = i32s(&[4], &[2, 2, -2, -2]);
    let out = eval(&binary_model("Div", 14, &a, &b, vec![]), &[a.clone(), b.clone()]);
    assert_eq!(out[0], i32s(&[4], &[3, -3, -3, 3]));
}

#[test]
fn opset_6_broadcast_aligns_b_at_axis() {
    let a = iota(&[2, 3, 2]);
    let b = f32s(&[3], &[100.0, 200.0, 300.0]);
    let out = eval(
        &binary_model("Add", 6, &a, &b, vec![attr::int("broadcast", 1), attr::int("axis", 1)]),
        &[a.clone(), b.clone()],
    );
    assert_close(
        &out[0],
        &f32s(&[2, 3, 2], &[100.0, 101.0, 202.0, 203.0, 304.0, 305.0, 106.0, 107.0, 208.0, 209.0, 310.0, 311.0]),
    );
    // Without axis, B lines up with A's trailing dims.
    let b = f32s(&[2], &[10.0, 20.0]);
    let out = eval(&binary_model("Mul", 6, &a, &b, vec![attr::int("broadcast", 1)]), &[a.clone(), b.clone()]);
    assert_close(
        &out[0],
        &f32s(&[2, 3, 2], &[0.0, 20.0, 20.0, 60.0, 40.0, 100.0, 60.0, 140.0, 80.0, 180.0, 100.0, 220.0]),
    );
    // Opset 7 has no broadcast attribute: numpy rules apply.
    let b = f32s(&[2], &[10.0, 20.0]);
    let out = eval(&binary_model("Sub", 7, &a, &b, vec![]), &[a.clone(), b.clone()]);
    assert_close(
        &out[0],
        &f32s(&[2, 3, 2], &[-10.0, -19.0, -8.0, -17.0, -6.0, -15.0, -4.0, -13.0, -2.0, -11.0, 0.0, -9.0]),
    );
}

#[test]
fn pow_with_mixed_types() {
    let a = f32s(&[3], &[2.0, 3.0, 4.0]);
    let b = f32s(&[3], &[3.0, 0.5, -1.0]);
    assert_close(
        &eval(&binary_model("Pow", 15, &a, &b, vec![]), &[a.clone(), b])[0],
        &f32s(&[3], &[8.0, 3f32.sqrt(), 0.25]),
    );
    // f32 base, int exponent: the exponent is converted.
    let e = i64s(&[3], &[2, 3, 0]);
    assert_close(&eval(&binary_model("Pow", 15, &a, &e, vec![]), &[a.clone(), e])[0], &f32s(&[3], &[4.0, 27.0, 1.0]));
    // int base, float exponent: computed in f32, truncated back to the base's type.
    let base = i64s(&[3], &[2, 3, 10]);
    let e = f32s(&[3], &[0.5, 2.0, 0.5]);
    assert_eq!(eval(&binary_model("Pow", 15, &base, &e, vec![]), &[base.clone(), e])[0], i64s(&[3], &[1, 9, 3]));
    // int ^ int
    let e = i32s(&[3], &[3, 2, 1]);
    let base32 = i32s(&[3], &[2, 3, 10]);
    assert_eq!(eval(&binary_model("Pow", 15, &base32, &e, vec![]), &[base32.clone(), e])[0], i32s(&[3], &[8, 9, 10]));
}

#[test]
fn pow_by_a_constant_is_a_unary_node() {
    let mut m = single_input("x", DType::F32, &[3], 13);
    m.initializer("two", &f32s(&[], &[2.0])).node("Pow", &["x", "two"], &["y"], vec![]).output("y", DType::F32, &[3]);
    let g = load(&m);
    assert!(g.nodes.iter().any(|n| n.op == Op::Unary(UnaryFn::PowConst { exponent: 2.0 })));
    assert_close(&run(&g, &[f32s(&[3], &[-3.0, 0.5, 2.0])])[0], &f32s(&[3], &[9.0, 0.25, 4.0]));
}

#[test]
fn comparisons_logic_and_where() {
    let a = f32s(&[4], &[1.0, 2.0, 3.0, f32::NAN]);
    let b = f32s(&[], &[2.0]);
    let cases: [(&str, [bool; 4]); 5] = [
        ("Less", [true, false, false, false]),
        ("LessOrEqual", [true, true, false, false]),
        ("Greater", [false, false, true, false]),
        ("GreaterOrEqual", [false, true, true, false]),
        ("Equal", [false, true, false, false]),
    ];
    for (op, want) in cases {
        let out = eval(&binary_model(op, 16, &a, &b, vec![]), &[a.clone(), b.clone()]);
        assert_eq!(out[0], bools(&[4], &want), "{op}");
    }
    let p = bools(&[4], &[true, true, false, false]);
    let q = bools(&[4], &[true, false, true, false]);
    for (op, want) in
        [("And", [true, false, false, false]), ("Or", [true, true, true, false]), ("Xor", [false, true, true, false])]
    {
        assert_eq!(eval(&binary_model(op, 7, &p, &q, vec![]), &[p.clone(), q.clone()])[0], bools(&[4], &want), "{op}");
    }
    let mut m = single_input("p", DType::Bool, &[4], 13);
    m.node("Not", &["p"], &["y"], vec![]).output("y", DType::Bool, &[4]);
    assert_eq!(eval(&m, &[p.clone()])[0], bools(&[4], &[false, false, true, true]));
    let mut m = single_input("c", DType::Bool, &[2, 1], 16);
    m.input("x", DType::F32, &[2])
        .input("y", DType::F32, &[2, 2])
        .node("Where", &["c", "x", "y"], &["z"], vec![])
        .output("z", DType::F32, &[2, 2]);
    let out =
        eval(&m, &[bools(&[2, 1], &[true, false]), f32s(&[2], &[1.0, 2.0]), f32s(&[2, 2], &[5.0, 6.0, 7.0, 8.0])]);
    assert_close(&out[0], &f32s(&[2, 2], &[1.0, 2.0, 7.0, 8.0]));
}

#[test]
fn variadic_sum_mean_max_min() {
    let mut m = ModelBuilder::new("t", 13);
    m.input("a", DType::F32, &[2, 2]).input("b", DType::F32, &[2]).input("c", DType::F32, &[]);
    for op in ["Sum", "Mean", "Max", "Min"] {
        m.node(op, &["a", "b", "c"], &[op], vec![]).output_untyped(op, DType::F32);
    }
    m.node("Sum", &["a"], &["one"], vec![]).output_untyped("one", DType::F32);
    let (a, b, c) = (f32s(&[2, 2], &[1.0, 5.0, -3.0, 0.0]), f32s(&[2], &[2.0, -2.0]), f32s(&[], &[0.5]));
    let out = eval(&m, &[a.clone(), b, c]);
    assert_close(&out[0], &f32s(&[2, 2], &[3.5, 3.5, -0.5, -1.5]));
    assert_close(&out[1], &f32s(&[2, 2], &[3.5 / 3.0, 3.5 / 3.0, -0.5 / 3.0, -0.5]));
    assert_close(&out[2], &f32s(&[2, 2], &[2.0, 5.0, 2.0, 0.5]));
    assert_close(&out[3], &f32s(&[2, 2], &[0.5, -2.0, -3.0, -2.0]));
    assert_close(&out[4], &a);
}

#[test]
fn cast_and_cast_like() {
    let x = f32s(&[4], &[-1.7, 0.0, 2.9, 0.4]);
    let mut m = single_input("x", DType::F32, &[4], 13);
    m.initializer("like", &i32s(&[1], &[0]))
        .node("Cast", &["x"], &["i"], vec![attr::int("to", data_type::INT64 as i64)])
        .node("Cast", &["x"], &["b"], vec![attr::int("to", data_type::BOOL as i64)])
        .node("CastLike", &["x", "like"], &["l"], vec![])
        .node("Cast", &["b"], &["f"], vec![attr::int("to", data_type::FLOAT as i64)])
        .output_untyped("i", DType::I64)
        .output_untyped("b", DType::Bool)
        .output_untyped("l", DType::I32)
        .output_untyped("f", DType::F32);
    let out = eval(&m, &[x]);
    assert_eq!(out[0], i64s(&[4], &[-1, 0, 2, 0]));
    assert_eq!(out[1], bools(&[4], &[true, false, true, true]));
    assert_eq!(out[2], i32s(&[4], &[-1, 0, 2, 0]));
    assert_eq!(out[3], f32s(&[4], &[1.0, 0.0, 1.0, 1.0]));
    let mut m = single_input("x", DType::F32, &[4], 13);
    m.node("Cast", &["x"], &["h"], vec![attr::int("to", data_type::FLOAT16 as i64)]).output_untyped("h", DType::F32);
    let e = load_err(&m);
    assert!(e.is_unsupported() && e.to_string().contains("float16"), "{e}");
}

#[test]
fn unsupported_integer_widths_are_refused_with_the_reason() {
    for (elem, name) in [(data_type::INT8, "int8"), (data_type::UINT16, "uint16"), (data_type::DOUBLE, "double")] {
        let mut m = ModelBuilder::new("t", 14);
        m.input_with_dims("x", elem, &[2usize.into()]).input_with_dims("y", elem, &[2usize.into()]);
        m.node("Add", &["x", "y"], &["z"], vec![]).output_untyped("z", DType::F32);
        let e = load_err(&m);
        assert!(e.is_unsupported() && e.to_string().contains(name), "{e}");
    }
}
