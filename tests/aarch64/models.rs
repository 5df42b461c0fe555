//! Models built in code for the AArch64 tests, each aimed at one family of kernels.

use cnnc_examples::lenet5::Rng;
use cnnc_ir::{DType, Tensor, TensorData};
use cnnc_onnx::{ModelBuilder, attr};

pub fn uniform(rng: &mut Rng, shape: &[usize], low: f32, high: f32) -> Tensor {
    let n = shape.iter().product();
    Tensor::f32(
        shape.to_vec(),
        (0..n).map(|_| low + (high - low) * rng.uniform()).collect(),
    )
}

fn ints(values: &[i64]) -> Tensor {
    Tensor::new(vec![values.len()], TensorData::I64(values.to_vec()))
}

fn floats(values: &[f32]) -> Tensor {
    Tensor::f32(vec![values.len()], values.to_vec())
}

/// MobileNet-style block: strided stem, depthwise 3x3 and strided 5x5, pointwise,
/// residual add, HardSwish/Sigmoid/Clip activations, global pooling, Gemm, Softmax.
/// Odd spatial sizes so that no row is a whole number of vectors.
pub fn mobile_block_onnx() -> Vec<u8> {
    let mut rng = Rng::new(21);
    let mut m = ModelBuilder::new("mobile_block", 17);
    m.input("x", DType::F32, &[1, 6, 13, 13]);
    for (name, shape, bound) in [
        ("stem.w", &[12, 6, 3, 3][..], 0.3),
        ("stem.b", &[12], 0.1),
        ("dw.w", &[12, 1, 3, 3], 0.5),
        ("dw.b", &[12], 0.1),
        ("pw.w", &[12, 12, 1, 1], 0.4),
        ("pw.b", &[12], 0.1),
        ("dw5.w", &[12, 1, 5, 5], 0.3),
        ("fc.w", &[7, 12], 0.5),
        ("fc.b", &[7], 0.1),
    ] {
        m.initializer(name, &uniform(&mut rng, shape, -bound, bound));
    }
    m.initializer("six", &Tensor::f32(vec![], vec![6.0]))
        .initializer("zero", &Tensor::f32(vec![], vec![0.0]));
    let conv = |stride: i64, pad: i64, group: i64| {
        vec![
            attr::ints("strides", &[stride, stride]),
            attr::ints("pads", &[pad; 4]),
            attr::int("group", group),
        ]
    };
    m.node("Conv", &["x", "stem.w", "stem.b"], &["stem"], conv(2, 1, 1))
        .node("HardSwish", &["stem"], &["h0"], vec![])
        .node("Conv", &["h0", "dw.w", "dw.b"], &["dw"], conv(1, 1, 12))
        .node("Sigmoid", &["dw"], &["s1"], vec![])
        .node("Conv", &["s1", "pw.w", "pw.b"], &["pw"], conv(1, 0, 1))
        .node("Add", &["pw", "h0"], &["residual"], vec![])
        .node("Clip", &["residual", "zero", "six"], &["relu6"], vec![])
        .node("Conv", &["relu6", "dw5.w", ""], &["dw5"], conv(2, 2, 12))
        .node(
            "HardSigmoid",
            &["dw5"],
            &["gate"],
            vec![attr::float("alpha", 0.25)],
        )
        .node("Mul", &["dw5", "gate"], &["gated"], vec![])
        .node("GlobalAveragePool", &["gated"], &["gap"], vec![])
        .node("Flatten", &["gap"], &["flat"], vec![])
        .node(
            "Gemm",
            &["flat", "fc.w", "fc.b"],
            &["logits"],
            vec![attr::int("transB", 1)],
        )
        .node(
            "Softmax",
            &["logits"],
            &["probs"],
            vec![attr::int("axis", -1)],
        )
        .output("probs", DType::F32, &[1, 7])
        .output("residual", DType::F32, &[1, 12, 7, 7]);
    m.to_bytes()
}

/// Data movement: Concat of two inputs, constant Pad, linear and nearest Resize,
/// Transpose, reductions over inner and outer axes, ArgMax (an i64 output).
pub fn layout_mix_onnx() -> Vec<u8> {
    let mut m = ModelBuilder::new("layout_mix", 17);
    m.input("a", DType::F32, &[1, 3, 5, 7])
        .input("b", DType::F32, &[1, 2, 5, 7])
        .initializer("pads", &ints(&[0, 0, 1, 2, 0, 0, 2, 1]))
        .initializer("pad_value", &Tensor::f32(vec![], vec![0.5]))
        .initializer("scales", &floats(&[1.0, 1.0, 1.5, 2.0]))
        .initializer("nearest_scales", &floats(&[1.0, 1.0, 2.0, 3.0]))
        .node("Concat", &["a", "b"], &["cat"], vec![attr::int("axis", 1)])
        .node(
            "Pad",
            &["cat", "pads", "pad_value"],
            &["padded"],
            vec![attr::string("mode", "constant")],
        )
        .node(
            "Resize",
            &["padded", "", "scales"],
            &["linear"],
            vec![attr::string("mode", "linear")],
        )
        .node(
            "Transpose",
            &["linear"],
            &["nhwc"],
            vec![attr::ints("perm", &[0, 2, 3, 1])],
        )
        .node(
            "ReduceMean",
            &["nhwc"],
            &["mean_hw"],
            vec![attr::ints("axes", &[1, 2]), attr::int("keepdims", 0)],
        )
        .node(
            "ReduceMax",
            &["nhwc"],
            &["max_c"],
            vec![attr::ints("axes", &[3]), attr::int("keepdims", 1)],
        )
        .node(
            "Resize",
            &["cat", "", "nearest_scales"],
            &["nearest"],
            vec![attr::string("mode", "nearest")],
        )
        .node(
            "ReduceSum",
            &["nearest"],
            &["sum_w"],
            vec![attr::ints("axes", &[3]), attr::int("keepdims", 0)],
        )
        .node(
            "ArgMax",
            &["cat"],
            &["argmax_c"],
            vec![attr::int("axis", 1)],
        )
        .output("mean_hw", DType::F32, &[1, 5])
        .output("max_c", DType::F32, &[1, 12, 20, 1])
        .output("sum_w", DType::F32, &[1, 5, 10])
        .output("argmax_c", DType::I64, &[1, 1, 5, 7]);
    m.to_bytes()
}

/// The elementwise math library: each function its own output, on 2x37 values
/// (37: a vector tail on every row).
pub fn math_onnx() -> Vec<u8> {
    let mut m = ModelBuilder::new("math", 20);
    m.input("x", DType::F32, &[2, 37])
        .input("y", DType::F32, &[2, 37]);
    let unary: &[(&str, &str, Vec<cnnc_onnx::proto::AttributeProto>)] = &[
        ("Exp", "x", vec![]),
        ("Log", "y", vec![]),
        ("Sqrt", "y", vec![]),
        ("Tanh", "x", vec![]),
        ("Erf", "x", vec![]),
        ("Softplus", "x", vec![]),
        ("Mish", "x", vec![]),
        ("Gelu", "x", vec![]),
        ("Gelu", "x", vec![attr::string("approximate", "tanh")]),
        ("Elu", "x", vec![attr::float("alpha", 0.7)]),
        ("Selu", "x", vec![]),
        ("LeakyRelu", "x", vec![attr::float("alpha", 0.03)]),
        ("Reciprocal", "y", vec![]),
        ("Floor", "x", vec![]),
        ("Ceil", "x", vec![]),
        ("Abs", "x", vec![]),
    ];
    let mut outputs = Vec::new();
    for (k, (op, input, attrs)) in unary.iter().enumerate() {
        let out = format!("{}_{k}", op.to_lowercase());
        m.node(op, &[input], &[&out], attrs.clone());
        outputs.push(out);
    }
    m.node("Pow", &["y", "x"], &["pow"], vec![])
        .node("Div", &["x", "y"], &["div"], vec![])
        .node("Greater", &["x", "y"], &["greater"], vec![])
        .node("Where", &["greater", "x", "y"], &["where"], vec![])
        .node("Max", &["x", "y"], &["max"], vec![])
        .node("Min", &["x", "y"], &["min"], vec![]);
    outputs.extend(["pow", "div", "where", "max", "min"].map(String::from));
    for out in &outputs {
        m.output(out, DType::F32, &[2, 37]);
    }
    m.output("greater", DType::Bool, &[2, 37]);
    m.to_bytes()
}

/// Normalisation, transposed convolution, average pooling with padding, MatMul,
/// LayerNormalization, LogSoftmax, Gather, Slice and Cast to an integer type.
pub fn misc_onnx() -> Vec<u8> {
    let mut rng = Rng::new(34);
    let mut m = ModelBuilder::new("misc", 17);
    m.input("x", DType::F32, &[1, 4, 9, 9]);
    m.initializer("bn.scale", &uniform(&mut rng, &[4], 0.5, 1.5))
        .initializer("bn.bias", &uniform(&mut rng, &[4], -0.5, 0.5))
        .initializer("bn.mean", &uniform(&mut rng, &[4], -0.3, 0.3))
        .initializer("bn.var", &uniform(&mut rng, &[4], 0.5, 2.0))
        .initializer("up.w", &uniform(&mut rng, &[4, 3, 3, 3], -0.4, 0.4))
        .initializer("up.b", &uniform(&mut rng, &[3], -0.1, 0.1))
        .initializer("ln.scale", &uniform(&mut rng, &[9], 0.5, 1.5))
        .initializer("ln.bias", &uniform(&mut rng, &[9], -0.2, 0.2))
        .initializer("rows", &ints(&[4, 81]))
        .initializer("proj", &uniform(&mut rng, &[81, 10], -0.2, 0.2))
        .initializer("pick", &Tensor::new(vec![2], TensorData::I64(vec![3, 1])))
        .initializer("starts", &ints(&[1, 2]))
        .initializer("ends", &ints(&[8, 9]))
        .initializer("axes", &ints(&[2, 3]))
        .initializer("steps", &ints(&[2, 3]))
        .initializer("ten", &Tensor::f32(vec![], vec![10.0]))
        .node(
            "BatchNormalization",
            &["x", "bn.scale", "bn.bias", "bn.mean", "bn.var"],
            &["bn"],
            vec![],
        )
        .node(
            "ConvTranspose",
            &["bn", "up.w", "up.b"],
            &["up"],
            vec![
                attr::ints("strides", &[2, 2]),
                attr::ints("pads", &[1, 1, 1, 1]),
                attr::ints("kernel_shape", &[3, 3]),
            ],
        )
        .node(
            "AveragePool",
            &["up"],
            &["avg"],
            vec![
                attr::ints("kernel_shape", &[3, 3]),
                attr::ints("strides", &[2, 2]),
                attr::ints("pads", &[1, 1, 1, 1]),
            ],
        )
        .node(
            "LayerNormalization",
            &["avg", "ln.scale", "ln.bias"],
            &["ln"],
            vec![attr::int("axis", -1)],
        )
        .node("Reshape", &["x", "rows"], &["x_rows"], vec![])
        .node("MatMul", &["x_rows", "proj"], &["projected"], vec![])
        .node(
            "LogSoftmax",
            &["projected"],
            &["log_probs"],
            vec![attr::int("axis", 1)],
        )
        .node(
            "Gather",
            &["bn", "pick"],
            &["picked"],
            vec![attr::int("axis", 1)],
        )
        .node(
            "Slice",
            &["picked", "starts", "ends", "axes", "steps"],
            &["sliced"],
            vec![],
        )
        .node("Mul", &["x", "ten"], &["x10"], vec![])
        .node("Floor", &["x10"], &["floored"], vec![])
        .node("Cast", &["floored"], &["as_int"], vec![attr::int("to", 7)])
        .output("ln", DType::F32, &[1, 3, 9, 9])
        .output("log_probs", DType::F32, &[4, 10])
        .output("sliced", DType::F32, &[1, 2, 4, 3])
        .output("as_int", DType::I64, &[1, 4, 9, 9]);
    m.to_bytes()
}
