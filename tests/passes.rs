//! The optimisation passes one at a time: for each case, the IR before and after the
//! pass is kept as an insta snapshot (re-bless with `INSTA_UPDATE=always cargo test
//! --test passes`), the rewrite (or its absence, for the negative cases) is asserted,
//! and the reference interpreter must give the same outputs before and after. A
//! property test then runs the whole pipeline on random small convolution graphs.
//! Everything runs for `TargetDesc::fixed_for_tests`, so nothing depends on the host.

use cnnc::compare::compare;
use cnnc::passes::{PassContext, TargetDesc, inference_pipeline, run_pipeline};
use cnnc_ir::print::{PrintOptions, print_with};
use cnnc_ir::{
    BinaryFn, ConvGeometry, DType, EpilogueStep, Graph, Op, ReduceKind, Tensor, TensorData, TensorType, UnaryFn,
    ValueId,
};
use cnnc_onnx::{ModelBuilder, attr};
use proptest::prelude::*;

fn ctx() -> PassContext {
    PassContext { target: TargetDesc::fixed_for_tests() }
}

/// A deterministic xorshift generator for weights, inputs and random graphs.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [lo, hi].
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    /// Uniform in [-scale, scale).
    fn float(&mut self, scale: f32) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }

    fn floats(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.float(scale)).collect()
    }

    fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        Tensor::f32(shape.to_vec(), self.floats(shape.iter().product(), scale))
    }
}

fn random_inputs(g: &Graph, seed: u64) -> Vec<Tensor> {
    let mut rng = Rng::new(seed);
    g.inputs.iter().map(|&v| rng.tensor(&g.ty(v).shape, 1.0)).collect()
}

/// The same computation with every epilogue step as a node of its own, following the
/// IR's definition of epilogues (`op.rs`, `verify::op_input_count`).
///
/// A second oracle for fused graphs, independent of the interpreter's own epilogue
/// handling (which once handed epilogue operands to the op itself).
fn without_epilogues(g: &Graph) -> Graph {
    let mut out = g.clone();
    out.nodes.clear();
    for n in &g.nodes {
        if n.epilogue.is_empty() {
            out.nodes.push(n.clone());
            continue;
        }
        let ty = g.ty(n.outputs[0]).clone();
        let mut current = out.add_value(ty.clone(), "");
        let mut op_node = n.clone();
        op_node.inputs.truncate(cnnc_ir::verify::op_input_count(n));
        op_node.epilogue.clear();
        op_node.outputs[0] = current;
        out.nodes.push(op_node);
        for (k, step) in n.epilogue.iter().enumerate() {
            let result = if k + 1 == n.epilogue.len() { n.outputs[0] } else { out.add_value(ty.clone(), "") };
            let (op, inputs) = match *step {
                EpilogueStep::Unary(f) => (Op::Unary(f), vec![current]),
                EpilogueStep::Binary { func, operand } => (Op::Binary(func), vec![current, n.inputs[operand]]),
            };
            let name = format!("{}.step{k}", n.name);
            out.nodes.push(cnnc_ir::Node {
                name,
                op,
                inputs,
                outputs: vec![result],
                epilogue: vec![],
                schedule: Default::default(),
            });
            current = result;
        }
    }
    cnnc_ir::verify::verify(&out).unwrap_or_else(|e| panic!("unfused graph is invalid: {e}"));
    out
}

#[test]
fn unfusing_for_the_oracle_keeps_steps_in_order() {
    let mut g = Graph::new("fused");
    let x = g.add_input(TensorType::f32(vec![1, 2, 3, 3]), "x");
    let r = g.add_input(TensorType::f32(vec![1, 2, 1, 1]), "r");
    let w = g.add_constant("w", Tensor::f32(vec![2, 2, 1, 1], vec![1.0, -2.0, 0.5, 1.0]));
    let geometry = ConvGeometry {
        strides: vec![1, 1],
        dilations: vec![1, 1],
        pads_begin: vec![0, 0],
        pads_end: vec![0, 0],
        groups: 1,
    };
    let y = g.push1("conv", Op::Conv(geometry), &[x, w]).unwrap();
    g.outputs.push(y);
    let conv = g.nodes.len() - 1;
    g.nodes[conv].inputs.push(r);
    g.nodes[conv].epilogue =
        vec![EpilogueStep::Binary { func: BinaryFn::Sub, operand: 2 }, EpilogueStep::Unary(UnaryFn::Relu)];
    cnnc_ir::verify::verify(&g).unwrap();
    let plain = without_epilogues(&g);
    let names: Vec<&str> = plain.nodes.iter().map(|n| n.op.mnemonic()).collect();
    assert_eq!(names, ["constant", "conv", "binary", "unary"]);
    let inputs = random_inputs(&g, 5);
    let got = cnnc_ir::interp::run(&plain, &inputs).unwrap();
    let (xs, rs) = (inputs[0].data.as_f32().unwrap(), inputs[1].data.as_f32().unwrap());
    for (i, &y) in got[0].data.as_f32().unwrap().iter().enumerate() {
        let (oc, p) = (i / 9, i % 9);
        let conv = if oc == 0 { xs[p] - 2.0 * xs[9 + p] } else { 0.5 * xs[p] + xs[9 + p] };
        assert!((y - (conv - rs[oc]).max(0.0)).abs() < 1e-6);
    }
}

/// The interpreter must give the same outputs (DESIGN.md tolerance) for `before` and
/// `after`, running the rewritten graph both as it is (epilogues evaluated by the
/// interpreter) and with its epilogues spelled out as nodes (`without_epilogues`).
fn assert_same_outputs(before: &Graph, after: &Graph, what: &str) {
    let after_plain = without_epilogues(after);
    for seed in 1..=2 {
        let inputs = random_inputs(before, seed);
        let want = cnnc_ir::interp::run(before, &inputs).unwrap_or_else(|e| panic!("{what}: original graph: {e}"));
        for (form, graph) in [("rewritten graph", after), ("rewritten graph without epilogues", &after_plain)] {
            let got = cnnc_ir::interp::run(graph, &inputs).unwrap_or_else(|e| panic!("{what}: {form}: {e}"));
            assert_eq!(got.len(), want.len());
            for (k, (y, r)) in got.iter().zip(&want).enumerate() {
                if let Err(e) = compare(y, r) {
                    panic!(
                        "{what}: output {k} of the {form} differs: {e}\nbefore:\n{}\nafter:\n{}",
                        cnnc_ir::print(before),
                        cnnc_ir::print(after)
                    );
                }
            }
        }
    }
}

fn load(bytes: &[u8]) -> Graph {
    cnnc_onnx::load_model_bytes(bytes, &Default::default()).expect("model loads")
}

/// Runs the pipeline up to (not including) `pass`, then `pass` alone; returns the
/// graphs before and after it. The verifier runs after every pass.
fn around_pass(g: Graph, pass: &str) -> (Graph, Graph) {
    // Without blocked layout regions, which have their own tests (choose_layout.rs).
    let mut passes = cnnc::passes::inference_pipeline_with(&cnnc::passes::PipelineOptions { nchwc: false });
    let at = passes.iter().position(|p| p.name == pass).unwrap_or_else(|| panic!("no pass {pass}"));
    let rest = passes.split_off(at);
    let mut before = g;
    run_pipeline(&mut before, &passes, &ctx(), |_, _| {}).expect("earlier passes run");
    let mut after = before.clone();
    run_pipeline(&mut after, &rest[..1], &ctx(), |_, _| {}).expect("the pass runs and keeps the graph valid");
    (before, after)
}

/// Snapshots the IR before and after `pass` and checks that the outputs agree.
fn check_pass(case: &str, pass: &str, bytes: &[u8]) -> Graph {
    let (before, after) = around_pass(load(bytes), pass);
    let opts = PrintOptions { elide_constant_data: true };
    let text =
        format!("# before {pass}\n{}\n# after {pass}\n{}", print_with(&before, &opts), print_with(&after, &opts));
    insta::assert_snapshot!(format!("{pass}__{case}"), text);
    assert_same_outputs(&before, &after, case);
    after
}

/// A negative case: the pass must leave the graph exactly as it was.
fn check_unchanged(case: &str, pass: &str, bytes: &[u8]) {
    let (before, after) = around_pass(load(bytes), pass);
    let opts = PrintOptions { elide_constant_data: true };
    assert_eq!(print_with(&after, &opts), print_with(&before, &opts), "{pass} must not rewrite {case}");
    insta::assert_snapshot!(format!("{pass}__{case}"), print_with(&after, &opts));
}

fn mnemonics(g: &Graph) -> Vec<&'static str> {
    g.nodes.iter().filter(|n| !matches!(n.op, Op::Constant(_))).map(|n| n.op.mnemonic()).collect()
}

fn node_of<'g>(g: &'g Graph, mnemonic: &str) -> &'g cnnc_ir::Node {
    g.nodes.iter().find(|n| n.op.mnemonic() == mnemonic).unwrap_or_else(|| panic!("no {mnemonic} node"))
}

// ---------------------------------------------------------------------------------
// Models built with the ONNX writer.

const C: usize = 4;

fn bn_params(m: &mut ModelBuilder, prefix: &str, channels: usize) {
    let mut rng = Rng::new(prefix.bytes().fold(channels as u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))));
    let gamma: Vec<f32> = (0..channels).map(|_| 0.5 + rng.float(0.4).abs()).collect();
    let var: Vec<f32> = (0..channels).map(|_| 0.5 + rng.float(0.4).abs()).collect();
    m.initializer(&format!("{prefix}.gamma"), &Tensor::f32(vec![channels], gamma))
        .initializer(&format!("{prefix}.beta"), &rng.tensor(&[channels], 0.3))
        .initializer(&format!("{prefix}.mean"), &rng.tensor(&[channels], 0.3))
        .initializer(&format!("{prefix}.var"), &Tensor::f32(vec![channels], var));
}

fn bn_inputs(prefix: &str, x: &str) -> Vec<String> {
    vec![
        x.to_string(),
        format!("{prefix}.gamma"),
        format!("{prefix}.beta"),
        format!("{prefix}.mean"),
        format!("{prefix}.var"),
    ]
}

fn node_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

/// x [1,C,6,6] -> Conv 3x3 (bias when `bias`) -> BatchNormalization -> y.
fn conv_bn(bias: bool) -> Vec<u8> {
    let mut rng = Rng::new(7);
    let mut m = ModelBuilder::new("conv_bn", 17);
    m.input("x", DType::F32, &[1, C, 6, 6]).initializer("w", &rng.tensor(&[C, C, 3, 3], 0.3));
    bn_params(&mut m, "bn", C);
    let mut conv_in = vec!["x", "w"];
    if bias {
        m.initializer("b", &rng.tensor(&[C], 0.3));
        conv_in.push("b");
    }
    m.node("Conv", &conv_in, &["c"], vec![attr::ints("pads", &[1, 1, 1, 1])])
        .node("BatchNormalization", &node_refs(&bn_inputs("bn", "c")), &["y"], vec![])
        .output("y", DType::F32, &[1, C, 6, 6]);
    m.to_bytes()
}

/// x -> Conv -> `op`(c, k) or `op`(k, c) with initializer k of `k_shape`.
fn conv_then(name: &str, op: &str, k_shape: &[usize], conv_on_left: bool) -> Vec<u8> {
    let mut rng = Rng::new(11);
    let mut m = ModelBuilder::new(name, 17);
    let k = Tensor::f32(k_shape.to_vec(), (0..k_shape.iter().product()).map(|_| 0.5 + rng.float(0.4).abs()).collect());
    m.input("x", DType::F32, &[1, C, 5, 5])
        .initializer("w", &rng.tensor(&[C, C, 1, 1], 0.5))
        .initializer("k", &k)
        .node("Conv", &["x", "w"], &["c"], vec![]);
    let operands = if conv_on_left { ["c", "k"] } else { ["k", "c"] };
    m.node(op, &operands, &["y"], vec![]).output("y", DType::F32, &[1, C, 5, 5]);
    m.to_bytes()
}

#[test]
fn fold_batchnorm_into_a_conv_without_bias() {
    let after = check_pass("conv_bn_no_bias", "fold-batchnorm", &conv_bn(false));
    assert_eq!(mnemonics(&after), ["conv"]);
    assert_eq!(node_of(&after, "conv").inputs.len(), 3, "a bias was created");
}

#[test]
fn fold_batchnorm_into_a_conv_with_bias() {
    let after = check_pass("conv_bn_bias", "fold-batchnorm", &conv_bn(true));
    assert_eq!(mnemonics(&after), ["conv"]);
}

#[test]
fn fold_a_channel_scale_of_rank_four_and_a_splat_shift() {
    let after = check_pass("scale_1c11", "fold-batchnorm", &conv_then("scale_1c11", "Mul", &[1, C, 1, 1], false));
    assert_eq!(mnemonics(&after), ["conv"]);
    assert_eq!(node_of(&after, "conv").inputs.len(), 2, "a scale alone needs no bias");
    let after = check_pass("splat_shift", "fold-batchnorm", &conv_then("splat_shift", "Sub", &[1], true));
    assert_eq!(mnemonics(&after), ["conv"]);
}

#[test]
fn fold_a_channel_division() {
    let after = check_pass("divide_c11", "fold-batchnorm", &conv_then("divide_c11", "Div", &[C, 1, 1], true));
    assert_eq!(mnemonics(&after), ["conv"]);
}

#[test]
fn fold_batchnorm_into_a_grouped_conv_transpose() {
    let mut rng = Rng::new(3);
    let mut m = ModelBuilder::new("deconv_bn", 17);
    // Weight [C_in, M/groups, kh, kw] with 2 groups: M = 2·3 = 6.
    m.input("x", DType::F32, &[1, C, 3, 3])
        .initializer("w", &rng.tensor(&[C, 3, 2, 2], 0.4))
        .initializer("b", &rng.tensor(&[6], 0.2));
    bn_params(&mut m, "bn", 6);
    m.node("ConvTranspose", &["x", "w", "b"], &["c"], vec![attr::ints("strides", &[2, 2]), attr::int("group", 2)])
        .node("BatchNormalization", &node_refs(&bn_inputs("bn", "c")), &["y"], vec![])
        .output("y", DType::F32, &[1, 6, 6, 6]);
    let after = check_pass("conv_transpose_bn", "fold-batchnorm", &m.to_bytes());
    assert_eq!(mnemonics(&after), ["conv_transpose"]);
}

#[test]
fn fold_batchnorm_leaves_a_scale_from_an_input() {
    let mut rng = Rng::new(5);
    let mut m = ModelBuilder::new("scale_input", 17);
    m.input("x", DType::F32, &[1, C, 5, 5])
        .input("s", DType::F32, &[C, 1, 1])
        .initializer("w", &rng.tensor(&[C, C, 1, 1], 0.5))
        .node("Conv", &["x", "w"], &["c"], vec![])
        .node("Mul", &["c", "s"], &["y"], vec![])
        .output("y", DType::F32, &[1, C, 5, 5]);
    check_unchanged("scale_from_input", "fold-batchnorm", &m.to_bytes());
}

#[test]
fn fold_batchnorm_leaves_a_scale_varying_along_width() {
    check_unchanged("scale_along_width", "fold-batchnorm", &conv_then("scale_along_width", "Mul", &[1, 1, 1, 5], true));
    check_unchanged("shift_along_height", "fold-batchnorm", &conv_then("shift_along_height", "Add", &[5, 1], true));
}

#[test]
fn fold_batchnorm_leaves_a_conv_on_the_right_of_sub() {
    check_unchanged(
        "constant_minus_conv",
        "fold-batchnorm",
        &conv_then("constant_minus_conv", "Sub", &[C, 1, 1], false),
    );
}

#[test]
fn fold_batchnorm_leaves_a_conv_whose_output_is_used_twice() {
    let mut rng = Rng::new(9);
    let mut m = ModelBuilder::new("conv_used_twice", 17);
    m.input("x", DType::F32, &[1, C, 5, 5]).initializer("w", &rng.tensor(&[C, C, 1, 1], 0.5));
    bn_params(&mut m, "bn", C);
    m.node("Conv", &["x", "w"], &["c"], vec![])
        .node("BatchNormalization", &node_refs(&bn_inputs("bn", "c")), &["y"], vec![])
        .node("Relu", &["c"], &["r"], vec![])
        .output("y", DType::F32, &[1, C, 5, 5])
        .output("r", DType::F32, &[1, C, 5, 5]);
    check_unchanged("conv_used_twice", "fold-batchnorm", &m.to_bytes());
    // The same when the second reader is the graph output itself.
    let mut m = ModelBuilder::new("conv_is_output", 17);
    m.input("x", DType::F32, &[1, C, 5, 5]).initializer("w", &rng.tensor(&[C, C, 1, 1], 0.5));
    bn_params(&mut m, "bn", C);
    m.node("Conv", &["x", "w"], &["c"], vec![])
        .node("BatchNormalization", &node_refs(&bn_inputs("bn", "c")), &["y"], vec![])
        .output("y", DType::F32, &[1, C, 5, 5])
        .output("c", DType::F32, &[1, C, 5, 5]);
    check_unchanged("conv_is_output", "fold-batchnorm", &m.to_bytes());
}

/// x -> Conv(+bias) -> `activation nodes` -> y; each activation is (op, attrs).
fn conv_activation(name: &str, activation: Vec<(&str, Vec<cnnc_onnx::proto::AttributeProto>)>) -> Vec<u8> {
    let mut rng = Rng::new(13);
    let mut m = ModelBuilder::new(name, 17);
    m.input("x", DType::F32, &[1, C, 5, 5])
        .initializer("w", &rng.tensor(&[C, C, 3, 3], 0.4))
        .initializer("b", &rng.tensor(&[C], 0.2))
        .node("Conv", &["x", "w", "b"], &["t0"], vec![attr::ints("pads", &[1, 1, 1, 1])]);
    let n = activation.len();
    for (i, (op, attrs)) in activation.into_iter().enumerate() {
        let (src, dst) = (format!("t{i}"), if i + 1 == n { "y".to_string() } else { format!("t{}", i + 1) });
        m.node(op, &[src.as_str()], &[dst.as_str()], attrs);
    }
    m.output("y", DType::F32, &[1, C, 5, 5]);
    m.to_bytes()
}

#[test]
fn fuse_a_chain_of_activations_in_order() {
    let bytes = conv_activation(
        "conv_activations",
        vec![("Relu", vec![]), ("LeakyRelu", vec![attr::float("alpha", 0.1)]), ("Tanh", vec![])],
    );
    let after = check_pass("conv_activations", "fuse-epilogue", &bytes);
    assert_eq!(mnemonics(&after), ["conv"]);
    let steps = &node_of(&after, "conv").epilogue;
    assert_eq!(
        steps,
        &[
            EpilogueStep::Unary(UnaryFn::Relu),
            EpilogueStep::Unary(UnaryFn::LeakyRelu { alpha: 0.1 }),
            EpilogueStep::Unary(UnaryFn::Tanh)
        ]
    );
}

#[test]
fn fuse_silu_written_as_x_times_sigmoid_x() {
    let mut rng = Rng::new(17);
    let mut m = ModelBuilder::new("conv_silu", 17);
    m.input("x", DType::F32, &[1, C, 5, 5])
        .initializer("w", &rng.tensor(&[C, C, 1, 1], 0.5))
        .node("Conv", &["x", "w"], &["c"], vec![])
        .node("Sigmoid", &["c"], &["s"], vec![])
        .node("Mul", &["s", "c"], &["y"], vec![])
        .output("y", DType::F32, &[1, C, 5, 5]);
    let after = check_pass("conv_silu", "fuse-epilogue", &m.to_bytes());
    assert_eq!(mnemonics(&after), ["conv"]);
    assert_eq!(node_of(&after, "conv").epilogue, [EpilogueStep::Unary(UnaryFn::Swish { alpha: 1.0 })]);
}

#[test]
fn fuse_hard_swish_written_as_x_times_hard_sigmoid_x() {
    let mut rng = Rng::new(19);
    let mut m = ModelBuilder::new("conv_hard_swish", 17);
    m.input("x", DType::F32, &[1, C, 5, 5])
        .initializer("w", &rng.tensor(&[C, C, 1, 1], 3.0))
        .node("Conv", &["x", "w"], &["c"], vec![])
        .node("HardSigmoid", &["c"], &["s"], vec![attr::float("alpha", 1.0 / 6.0), attr::float("beta", 0.5)])
        .node("Mul", &["c", "s"], &["y"], vec![])
        .output("y", DType::F32, &[1, C, 5, 5]);
    let after = check_pass("conv_hard_swish", "fuse-epilogue", &m.to_bytes());
    assert_eq!(node_of(&after, "conv").epilogue, [EpilogueStep::Unary(UnaryFn::HardSwish)]);
}

#[test]
fn fuse_a_residual_add_then_relu() {
    let mut rng = Rng::new(23);
    let mut m = ModelBuilder::new("residual", 17);
    m.input("x", DType::F32, &[1, C, 5, 5]);
    bn_params(&mut m, "bn", C);
    m.initializer("w", &rng.tensor(&[C, C, 3, 3], 0.3))
        .node("Conv", &["x", "w"], &["c"], vec![attr::ints("pads", &[1, 1, 1, 1])])
        .node("BatchNormalization", &node_refs(&bn_inputs("bn", "c")), &["bn"], vec![])
        .node("Add", &["x", "bn"], &["sum"], vec![])
        .node("Relu", &["sum"], &["y"], vec![])
        .output("y", DType::F32, &[1, C, 5, 5]);
    let after = check_pass("residual", "fuse-epilogue", &m.to_bytes());
    assert_eq!(mnemonics(&after), ["conv"]);
    let conv = node_of(&after, "conv");
    assert_eq!(
        conv.epilogue,
        [EpilogueStep::Binary { func: BinaryFn::Add, operand: 3 }, EpilogueStep::Unary(UnaryFn::Relu)]
    );
    assert_eq!(conv.inputs[3], after.inputs[0], "the residual operand is x");
}

#[test]
fn fuse_the_sum_of_two_convolutions_into_the_later_one() {
    let mut rng = Rng::new(29);
    let mut m = ModelBuilder::new("two_branches", 17);
    m.input("x", DType::F32, &[1, C, 6, 6])
        .initializer("w1", &rng.tensor(&[C, C, 3, 3], 0.3))
        .initializer("w2", &rng.tensor(&[C, C, 1, 1], 0.3))
        .node("Conv", &["x", "w1"], &["a"], vec![attr::ints("pads", &[1, 1, 1, 1]), attr::ints("strides", &[2, 2])])
        .node("Conv", &["x", "w2"], &["b"], vec![attr::ints("strides", &[2, 2])])
        .node("Add", &["a", "b"], &["y"], vec![])
        .output("y", DType::F32, &[1, C, 3, 3]);
    let after = check_pass("two_branches", "fuse-epilogue", &m.to_bytes());
    assert_eq!(mnemonics(&after), ["conv", "conv"]);
    let convs: Vec<_> = after.nodes.iter().filter(|n| n.op.mnemonic() == "conv").collect();
    assert!(convs[0].epilogue.is_empty());
    assert_eq!(convs[1].epilogue, [EpilogueStep::Binary { func: BinaryFn::Add, operand: 2 }]);
}

#[test]
fn fuse_a_squeeze_excite_scale_computed_before_the_conv() {
    let mut rng = Rng::new(31);
    let mut m = ModelBuilder::new("squeeze_excite", 17);
    m.input("x", DType::F32, &[1, C, 5, 5])
        .initializer("w_se", &rng.tensor(&[C, C, 1, 1], 0.5))
        .initializer("b_se", &rng.tensor(&[C], 0.5))
        .initializer("w", &rng.tensor(&[C, C, 3, 3], 0.3))
        .node("GlobalAveragePool", &["x"], &["gap"], vec![])
        .node("Conv", &["gap", "w_se", "b_se"], &["se"], vec![])
        .node("Sigmoid", &["se"], &["gate"], vec![])
        .node("Conv", &["x", "w"], &["c"], vec![attr::ints("pads", &[1, 1, 1, 1])])
        .node("Mul", &["gate", "c"], &["y"], vec![])
        .output("y", DType::F32, &[1, C, 5, 5]);
    let after = check_pass("squeeze_excite", "fuse-epilogue", &m.to_bytes());
    let convs: Vec<_> = after.nodes.iter().filter(|n| n.op.mnemonic() == "conv").collect();
    assert_eq!(convs[0].epilogue, [EpilogueStep::Unary(UnaryFn::Sigmoid)]);
    assert_eq!(convs[1].epilogue, [EpilogueStep::Binary { func: BinaryFn::Mul, operand: 2 }]);
    assert_eq!(mnemonics(&after), ["reduce", "conv", "conv"]);
}

#[test]
fn fuse_a_gemm_bias_and_activation_into_the_matmul() {
    let mut rng = Rng::new(37);
    let mut m = ModelBuilder::new("gemm_relu", 17);
    m.input("x", DType::F32, &[2, 8])
        .initializer("w", &rng.tensor(&[3, 8], 0.5))
        .initializer("b", &rng.tensor(&[3], 0.5))
        .node("Gemm", &["x", "w", "b"], &["g"], vec![attr::int("transB", 1)])
        .node("Relu", &["g"], &["y"], vec![])
        .output("y", DType::F32, &[2, 3]);
    let after = check_pass("gemm_relu", "fuse-epilogue", &m.to_bytes());
    assert_eq!(mnemonics(&after), ["matmul"]);
    assert_eq!(
        node_of(&after, "matmul").epilogue,
        [EpilogueStep::Binary { func: BinaryFn::Add, operand: 2 }, EpilogueStep::Unary(UnaryFn::Relu)]
    );
}

#[test]
fn fuse_a_densenet_batchnorm_relu_into_the_concat() {
    // DenseNet's pre-activation: concat -> BatchNormalization (lowered to mul, add) -> relu.
    let mut rng = Rng::new(47);
    let mut m = ModelBuilder::new("concat_bn_relu", 17);
    m.input("a", DType::F32, &[1, 2, 4, 4])
        .input("b", DType::F32, &[1, 3, 4, 4])
        .initializer("scale", &rng.tensor(&[5], 1.0))
        .initializer("bias", &rng.tensor(&[5], 1.0))
        .initializer("mean", &rng.tensor(&[5], 1.0))
        .initializer("var", &Tensor::f32([5], vec![0.5, 1.0, 1.5, 2.0, 2.5]))
        .node("Concat", &["a", "b"], &["c"], vec![attr::int("axis", 1)])
        .node("BatchNormalization", &["c", "scale", "bias", "mean", "var"], &["n"], vec![])
        .node("Relu", &["n"], &["y"], vec![])
        .output("y", DType::F32, &[1, 5, 4, 4]);
    let after = check_pass("concat_bn_relu", "fuse-epilogue", &m.to_bytes());
    assert_eq!(mnemonics(&after), ["concat"]);
    assert_eq!(
        node_of(&after, "concat").epilogue,
        [
            EpilogueStep::Binary { func: BinaryFn::Mul, operand: 2 },
            EpilogueStep::Binary { func: BinaryFn::Add, operand: 3 },
            EpilogueStep::Unary(UnaryFn::Relu)
        ]
    );
}

#[test]
fn fuse_epilogue_leaves_a_conv_whose_output_is_read_twice() {
    let mut rng = Rng::new(41);
    let mut m = ModelBuilder::new("read_twice", 17);
    m.input("x", DType::F32, &[1, C, 5, 5])
        .initializer("w", &rng.tensor(&[C, C, 1, 1], 0.5))
        .node("Conv", &["x", "w"], &["c"], vec![])
        .node("Relu", &["c"], &["r"], vec![])
        .node("Add", &["c", "x"], &["y"], vec![])
        .output("r", DType::F32, &[1, C, 5, 5])
        .output("y", DType::F32, &[1, C, 5, 5]);
    check_unchanged("read_twice", "fuse-epilogue", &m.to_bytes());
}

#[test]
fn fuse_epilogue_leaves_an_operand_defined_after_the_conv() {
    let mut rng = Rng::new(43);
    let mut m = ModelBuilder::new("operand_after", 17);
    m.input("x", DType::F32, &[1, C, 5, 5])
        .initializer("w", &rng.tensor(&[C, C, 3, 3], 0.3))
        .node("Conv", &["x", "w"], &["c"], vec![attr::ints("pads", &[1, 1, 1, 1])])
        .node("MaxPool", &["x"], &["p"], vec![attr::ints("kernel_shape", &[3, 3]), attr::ints("pads", &[1, 1, 1, 1])])
        .node("Add", &["c", "p"], &["y"], vec![])
        .output("y", DType::F32, &[1, C, 5, 5]);
    check_unchanged("operand_after", "fuse-epilogue", &m.to_bytes());
}

#[test]
fn fuse_epilogue_leaves_steps_that_would_change_the_shape_or_dtype_or_operand_order() {
    let mut rng = Rng::new(47);
    // [1,C,1,1] conv output + [1,C,5,5] input: the sum is larger than the conv output.
    let mut m = ModelBuilder::new("broadcast_up", 17);
    m.input("x", DType::F32, &[1, C, 5, 5])
        .input("v", DType::F32, &[1, C, 1, 1])
        .initializer("w", &rng.tensor(&[C, C, 1, 1], 0.5))
        .node("Conv", &["v", "w"], &["c"], vec![])
        .node("Add", &["c", "x"], &["y"], vec![])
        .output("y", DType::F32, &[1, C, 5, 5]);
    check_unchanged("broadcast_up", "fuse-epilogue", &m.to_bytes());
    // x - conv(x): the step would compute conv(x) - x.
    let mut m = ModelBuilder::new("conv_on_the_right", 17);
    m.input("x", DType::F32, &[1, C, 5, 5])
        .initializer("w", &rng.tensor(&[C, C, 1, 1], 0.5))
        .node("Conv", &["x", "w"], &["c"], vec![])
        .node("Sub", &["x", "c"], &["y"], vec![])
        .output("y", DType::F32, &[1, C, 5, 5]);
    check_unchanged("conv_on_the_right", "fuse-epilogue", &m.to_bytes());
    // A comparison produces bool.
    let mut m = ModelBuilder::new("comparison", 17);
    m.input("x", DType::F32, &[1, C, 5, 5])
        .initializer("w", &rng.tensor(&[C, C, 1, 1], 0.5))
        .node("Conv", &["x", "w"], &["c"], vec![])
        .node("Greater", &["c", "x"], &["y"], vec![])
        .output("y", DType::Bool, &[1, C, 5, 5]);
    check_unchanged("comparison", "fuse-epilogue", &m.to_bytes());
}

#[test]
fn fuse_epilogue_leaves_a_sigmoid_gate_read_elsewhere() {
    let mut rng = Rng::new(53);
    let mut m = ModelBuilder::new("gate_read_twice", 17);
    m.input("x", DType::F32, &[1, C, 5, 5])
        .initializer("w", &rng.tensor(&[C, C, 1, 1], 0.5))
        .node("Conv", &["x", "w"], &["c"], vec![])
        .node("Sigmoid", &["c"], &["s"], vec![])
        .node("Mul", &["c", "s"], &["y"], vec![])
        .output("y", DType::F32, &[1, C, 5, 5])
        .output("s", DType::F32, &[1, C, 5, 5]);
    check_unchanged("gate_read_twice", "fuse-epilogue", &m.to_bytes());
}

#[test]
fn choose_schedule_for_each_kernel_family() {
    let mut rng = Rng::new(59);
    let mut m = ModelBuilder::new("families", 17);
    m.input("x", DType::F32, &[1, 8, 10, 10])
        .initializer("w_pw", &rng.tensor(&[40, 8, 1, 1], 0.3))
        .initializer("w_dw", &rng.tensor(&[40, 1, 3, 3], 0.3))
        .initializer("w_gr", &rng.tensor(&[8, 10, 3, 3], 0.3))
        .initializer("w_big", &rng.tensor(&[8, 8, 3, 3], 0.3))
        .node("Conv", &["x", "w_pw"], &["pw"], vec![])
        .node("Conv", &["pw", "w_dw"], &["dw"], vec![attr::ints("pads", &[1, 1, 1, 1]), attr::int("group", 40)])
        .node("Conv", &["dw", "w_gr"], &["gr"], vec![attr::int("group", 4)])
        .node("Conv", &["gr", "w_big"], &["y"], vec![attr::ints("pads", &[1, 1, 1, 1])])
        .output("y", DType::F32, &[1, 8, 8, 8]);
    let after = check_pass("families", "choose-schedule", &m.to_bytes());
    let kernels: Vec<&str> =
        after.nodes.iter().filter(|n| n.op.mnemonic() == "conv").map(|n| n.schedule.kernel.as_str()).collect();
    assert_eq!(kernels, ["gemm", "depthwise", "direct", "gemm"]);
    let tiles = &after.nodes.iter().rfind(|n| n.op.mnemonic() == "conv").unwrap().schedule.tiles;
    // k = 8·3·3 = 72 caps kc; p = 64 positions round up to 64 (nr = 16).
    let expect: Vec<(String, usize)> =
        [("mr", 6), ("nr", 16), ("kc", 72), ("nc", 64)].iter().map(|(n, v)| (n.to_string(), *v)).collect();
    assert_eq!(tiles, &expect);
}

#[test]
fn the_whole_pipeline_on_a_bottleneck_block() {
    // conv-bn-relu6, depthwise conv-bn-relu6, conv-bn, residual add, global pooling, Gemm.
    let mut rng = Rng::new(61);
    let mut m = ModelBuilder::new("bottleneck", 17);
    m.input("x", DType::F32, &[1, C, 6, 6])
        .initializer("w1", &rng.tensor(&[12, C, 1, 1], 0.4))
        .initializer("w2", &rng.tensor(&[12, 1, 3, 3], 0.4))
        .initializer("w3", &rng.tensor(&[C, 12, 1, 1], 0.4))
        .initializer("fc.w", &rng.tensor(&[3, C], 0.4))
        .initializer("fc.b", &rng.tensor(&[3], 0.4))
        .initializer("lo", &Tensor::f32(vec![], vec![0.0]))
        .initializer("hi", &Tensor::f32(vec![], vec![6.0]));
    bn_params(&mut m, "bn1", 12);
    bn_params(&mut m, "bn2", 12);
    bn_params(&mut m, "bn3", C);
    m.node("Conv", &["x", "w1"], &["c1"], vec![])
        .node("BatchNormalization", &node_refs(&bn_inputs("bn1", "c1")), &["b1"], vec![])
        .node("Clip", &["b1", "lo", "hi"], &["r1"], vec![])
        .node("Conv", &["r1", "w2"], &["c2"], vec![attr::ints("pads", &[1, 1, 1, 1]), attr::int("group", 12)])
        .node("BatchNormalization", &node_refs(&bn_inputs("bn2", "c2")), &["b2"], vec![])
        .node("Clip", &["b2", "lo", "hi"], &["r2"], vec![])
        .node("Conv", &["r2", "w3"], &["c3"], vec![])
        .node("BatchNormalization", &node_refs(&bn_inputs("bn3", "c3")), &["b3"], vec![])
        .node("Add", &["x", "b3"], &["sum"], vec![])
        .node("GlobalAveragePool", &["sum"], &["gap"], vec![])
        .node("Flatten", &["gap"], &["flat"], vec![])
        .node("Gemm", &["flat", "fc.w", "fc.b"], &["y"], vec![attr::int("transB", 1)])
        .output("y", DType::F32, &[1, 3]);
    let original = load(&m.to_bytes());
    let mut g = original.clone();
    cnnc::driver::optimize(&mut g, &TargetDesc::fixed_for_tests(), |_, _| {}).expect("pipeline runs");
    insta::assert_snapshot!("pipeline__bottleneck", print_with(&g, &PrintOptions { elide_constant_data: true }));
    assert_eq!(mnemonics(&g), ["conv", "conv", "conv", "reduce", "reshape", "matmul"]);
    assert_same_outputs(&original, &g, "bottleneck");
}

// ---------------------------------------------------------------------------------
// Random graphs through the whole pipeline.

fn conv_node(g: &mut Graph, rng: &mut Rng, x: ValueId, depthwise_ok: bool) -> ValueId {
    let shape = g.ty(x).shape.clone();
    let c_in = shape[1];
    let divisors: Vec<usize> = (1..=c_in).filter(|&d| c_in.is_multiple_of(d)).collect();
    let groups = if depthwise_ok && rng.chance(25) { c_in } else { divisors[rng.range(0, divisors.len() - 1)] };
    let c_out = if groups == c_in && rng.chance(60) { c_in } else { groups * rng.range(1, 3) };
    for _attempt in 0..4 {
        let kernel: Vec<usize> = (0..2).map(|_| rng.range(1, 3)).collect();
        let geometry = ConvGeometry {
            strides: (0..2).map(|_| rng.range(1, 2)).collect(),
            dilations: (0..2).map(|_| if rng.chance(20) { 2 } else { 1 }).collect(),
            pads_begin: (0..2).map(|_| rng.range(0, 1)).collect(),
            pads_end: (0..2).map(|_| rng.range(0, 1)).collect(),
            groups,
        };
        let w_shape = [c_out, c_in / groups, kernel[0], kernel[1]];
        let mut inputs = vec![x];
        let types: Vec<TensorType> = vec![g.ty(x).clone(), TensorType::f32(w_shape.to_vec())];
        let refs: Vec<&TensorType> = types.iter().collect();
        if cnnc_ir::infer::output_types(&Op::Conv(geometry.clone()), &refs, &g.constants, None).is_err() {
            continue;
        }
        inputs.push(g.add_constant("w", rng.tensor(&w_shape, 0.5)));
        if rng.chance(40) {
            inputs.push(g.add_constant("b", rng.tensor(&[c_out], 0.3)));
        }
        return g.push1("conv", Op::Conv(geometry), &inputs).expect("checked geometry");
    }
    let inputs = [x, g.add_constant("w", rng.tensor(&[c_out, c_in / groups, 1, 1], 0.5))];
    let geometry = ConvGeometry {
        strides: vec![1, 1],
        dilations: vec![1, 1],
        pads_begin: vec![0, 0],
        pads_end: vec![0, 0],
        groups,
    };
    g.push1("conv", Op::Conv(geometry), &inputs).expect("1x1 conv")
}

fn conv_transpose_node(g: &mut Graph, rng: &mut Rng, x: ValueId) -> ValueId {
    let shape = g.ty(x).shape.clone();
    let c_in = shape[1];
    let groups = if c_in.is_multiple_of(2) && rng.chance(50) { 2 } else { 1 };
    let per_group_out = rng.range(1, 3);
    let (k, s) = (rng.range(1, 3), rng.range(1, 2));
    let w = g.add_constant("wt", rng.tensor(&[c_in, per_group_out, k, k], 0.5));
    let out: Vec<usize> = vec![shape[0], per_group_out * groups, (shape[2] - 1) * s + k, (shape[3] - 1) * s + k];
    let geometry = ConvGeometry {
        strides: vec![s, s],
        dilations: vec![1, 1],
        pads_begin: vec![0, 0],
        pads_end: vec![0, 0],
        groups,
    };
    g.push_typed("deconv", Op::ConvTranspose(geometry), &[x, w], TensorType::f32(out)).expect("conv transpose")
}

/// A constant that broadcasts to `shape`: per channel in several spellings, a splat,
/// or varying along width (which must not fold into the weights).
fn channel_constant(g: &mut Graph, rng: &mut Rng, shape: &[usize], positive: bool) -> ValueId {
    let c = shape[1];
    let const_shape: Vec<usize> = match rng.range(0, 4) {
        0 => vec![c, 1, 1],
        1 => vec![1, c, 1, 1],
        2 => vec![1],
        3 => vec![shape[3]],
        _ => vec![],
    };
    let n: usize = const_shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| if positive { 0.5 + rng.float(0.5).abs() } else { rng.float(0.5) }).collect();
    let t = if rng.chance(20) {
        Tensor::new(const_shape, TensorData::F32(vec![data[0]; n]))
    } else {
        Tensor::f32(const_shape, data)
    };
    g.add_constant("k", t)
}

fn activation(rng: &mut Rng) -> UnaryFn {
    const CHOICES: [UnaryFn; 12] = [
        UnaryFn::Relu,
        UnaryFn::Clip { min: 0.0, max: 6.0 },
        UnaryFn::Sigmoid,
        UnaryFn::Tanh,
        UnaryFn::HardSwish,
        UnaryFn::HardSigmoid { alpha: 0.2, beta: 0.5 },
        UnaryFn::LeakyRelu { alpha: 0.1 },
        UnaryFn::GeluErf,
        UnaryFn::GeluTanh,
        UnaryFn::Elu { alpha: 1.0 },
        UnaryFn::Affine { scale: 0.5, shift: 0.25 },
        UnaryFn::Swish { alpha: 1.0 },
    ];
    CHOICES[rng.range(0, CHOICES.len() - 1)]
}

/// A random network of 1-3 convolution stages with BN-like arithmetic, activations,
/// residual adds, gates and extra readers, ending (sometimes) in a classifier head.
fn random_graph(seed: u64) -> Graph {
    let mut rng = Rng::new(seed);
    let mut g = Graph::new(format!("random{seed}"));
    let (n, c, h, w) = (rng.range(1, 2), rng.range(1, 6), rng.range(3, 8), rng.range(3, 8));
    let x = g.add_input(TensorType::f32(vec![n, c, h, w]), "x");
    let mut cur = x;
    let mut earlier = vec![x];
    for _stage in 0..rng.range(1, 3) {
        let mut y = if rng.chance(15) {
            conv_transpose_node(&mut g, &mut rng, cur)
        } else {
            conv_node(&mut g, &mut rng, cur, true)
        };
        let shape = g.ty(y).shape.clone();
        for _step in 0..rng.range(0, 4) {
            y = match rng.range(0, 8) {
                0 | 1 => {
                    // BatchNormalization as the frontend lowers it.
                    let s = channel_constant(&mut g, &mut rng, &shape, true);
                    let t = channel_constant(&mut g, &mut rng, &shape, false);
                    let scaled = if rng.chance(50) {
                        g.push1("bn", Op::Binary(BinaryFn::Mul), &[y, s])
                    } else {
                        g.push1("bn", Op::Binary(BinaryFn::Mul), &[s, y])
                    };
                    g.push1("bn", Op::Binary(BinaryFn::Add), &[scaled.unwrap(), t]).unwrap()
                }
                2 => g.push1("act", Op::Unary(activation(&mut rng)), &[y]).unwrap(),
                3 => {
                    let sig = g.push1("sig", Op::Unary(UnaryFn::Sigmoid), &[y]).unwrap();
                    let ins = if rng.chance(50) { [y, sig] } else { [sig, y] };
                    g.push1("silu", Op::Binary(BinaryFn::Mul), &ins).unwrap()
                }
                4 => {
                    // Residual add with any earlier value of the same shape, either order.
                    match earlier.iter().copied().find(|&v| g.ty(v).shape == shape) {
                        Some(r) if rng.chance(50) => g.push1("res", Op::Binary(BinaryFn::Add), &[r, y]).unwrap(),
                        Some(r) => g.push1("res", Op::Binary(BinaryFn::Add), &[y, r]).unwrap(),
                        None => {
                            let k = channel_constant(&mut g, &mut rng, &shape, false);
                            g.push1(
                                "sub",
                                Op::Binary(if rng.chance(50) { BinaryFn::Sub } else { BinaryFn::Max }),
                                &[k, y],
                            )
                            .unwrap()
                        }
                    }
                }
                5 => {
                    // Squeeze-and-excite gate, from a graph input or from the value itself.
                    let gate = if rng.chance(50) {
                        g.add_input(TensorType::f32(vec![shape[0], shape[1], 1, 1]), "gate")
                    } else {
                        let m = g.push1("gap", Op::Reduce { kind: ReduceKind::Mean, axes: vec![2, 3] }, &[y]).unwrap();
                        g.push1("gate", Op::Unary(UnaryFn::Sigmoid), &[m]).unwrap()
                    };
                    g.push1("se", Op::Binary(BinaryFn::Mul), &[gate, y]).unwrap()
                }
                6 => {
                    // Another reader or a graph output: blocks folding into what came before.
                    if rng.chance(50) {
                        g.outputs.push(y);
                    } else {
                        let other = g.push1("other", Op::Unary(UnaryFn::Abs), &[y]).unwrap();
                        g.outputs.push(other);
                    }
                    y
                }
                7 => {
                    let k = channel_constant(&mut g, &mut rng, &shape, true);
                    let f = [BinaryFn::Div, BinaryFn::Sub, BinaryFn::Mul, BinaryFn::Add][rng.range(0, 3)];
                    g.push1("arith", Op::Binary(f), &[y, k]).unwrap()
                }
                _ => {
                    let p = g.add_input(TensorType::f32(vec![shape[0], shape[1], 1, 1]), "p");
                    g.push1("prelu", Op::Binary(BinaryFn::PRelu), &[y, p]).unwrap()
                }
            };
        }
        earlier.push(y);
        cur = y;
    }
    if rng.chance(50) {
        let shape = g.ty(cur).shape.clone();
        let features: usize = shape[1..].iter().product();
        let flat = g.push_typed("flat", Op::Reshape, &[cur], TensorType::f32(vec![shape[0], features])).unwrap();
        let wt = g.add_constant("fc.w", rng.tensor(&[features, 3], 0.3));
        let mm = g.push1("fc", Op::MatMul, &[flat, wt]).unwrap();
        let b = g.add_constant("fc.b", rng.tensor(&[3], 0.3));
        let biased = g.push1("fc.bias", Op::Binary(BinaryFn::Add), &[mm, b]).unwrap();
        cur = g.push1("fc.act", Op::Unary(activation(&mut rng)), &[biased]).unwrap();
    }
    g.outputs.push(cur);
    g
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn the_pipeline_keeps_random_conv_graphs_equivalent(seed in any::<u64>()) {
        let original = random_graph(seed);
        cnnc_ir::verify::verify(&original).map_err(|e| TestCaseError::fail(format!("generator made an invalid graph: {e}")))?;
        let mut optimised = original.clone();
        run_pipeline(&mut optimised, &inference_pipeline(), &ctx(), |_, _| {}).map_err(|e| TestCaseError::fail(e.to_string()))?;
        assert_same_outputs(&original, &optimised, &format!("seed {seed}"));
    }
}

#[test]
fn random_graphs_exercise_every_rewrite() {
    // Guards the property test against a generator that stops producing fusable shapes.
    let (mut folded, mut fused_unary, mut fused_binary, mut swish) = (0, 0, 0, 0);
    for seed in 0..200 {
        let original = random_graph(seed);
        let mut g = original.clone();
        run_pipeline(&mut g, &inference_pipeline(), &ctx(), |_, _| {}).unwrap();
        let binaries = |g: &Graph| g.nodes.iter().filter(|n| matches!(n.op, Op::Binary(_))).count();
        folded += usize::from(binaries(&g) < binaries(&original));
        for n in &g.nodes {
            fused_unary += n.epilogue.iter().filter(|s| matches!(s, EpilogueStep::Unary(_))).count();
            fused_binary += n.epilogue.iter().filter(|s| matches!(s, EpilogueStep::Binary { .. })).count();
            swish += n.epilogue.iter().filter(|s| **s == EpilogueStep::Unary(UnaryFn::Swish { alpha: 1.0 })).count();
        }
    }
    assert!(
        folded > 20 && fused_unary > 20 && fused_binary > 20 && swish > 5,
        "{folded} {fused_unary} {fused_binary} {swish}"
    );
}
