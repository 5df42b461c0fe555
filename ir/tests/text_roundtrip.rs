//! The text form: `parse(print(g)) == g` for random graphs, exact floats, clear
//! parse errors, and snapshots of elided dumps so the format is visible in review.

mod graph_gen;

use cnnc_ir::*;
use proptest::prelude::*;

fn elided(g: &Graph) -> String {
    print_with(g, &PrintOptions { elide_constant_data: true })
}

/// `parse(print(g)) == g`, bitwise.
fn roundtrip(g: &Graph) {
    let text = print(g);
    let back = match parse(&text) {
        Ok(back) => back,
        Err(e) => panic!("parse(print(g)) failed: {e}\ntext:\n{text}"),
    };
    assert!(bitwise_eq(&back, g), "parse(print(g)) differs from g\ntext:\n{text}\nparsed back:\n{}", print(&back));
}

/// `Graph`'s `==` compares constants bitwise, but `UnaryFn` and `Op::Resample` compare
/// their f32 attributes with `==`, so NaN attributes never compare equal (and a NaN
/// payload change would go unseen through them). This compares those floats by bits
/// and everything else with `==`.
fn bitwise_eq(a: &Graph, b: &Graph) -> bool {
    let (mut a, mut b) = (a.clone(), b.clone());
    let (bits_a, bits_b) = (take_attribute_floats(&mut a), take_attribute_floats(&mut b));
    bits_a == bits_b && a == b
}

/// Replaces every f32 attribute by 0 and returns their bit patterns in order.
fn take_attribute_floats(g: &mut Graph) -> Vec<u32> {
    fn unary_params(f: &mut UnaryFn) -> Vec<&mut f32> {
        use UnaryFn::*;
        match f {
            LeakyRelu { alpha } | Elu { alpha } | Celu { alpha } | Swish { alpha } => vec![alpha],
            Selu { alpha, gamma } => vec![alpha, gamma],
            HardSigmoid { alpha, beta } => vec![alpha, beta],
            Clip { min, max } => vec![min, max],
            Affine { scale, shift } => vec![scale, shift],
            PowConst { exponent } => vec![exponent],
            _ => vec![],
        }
    }
    let mut floats: Vec<&mut f32> = Vec::new();
    for node in &mut g.nodes {
        match &mut node.op {
            Op::Unary(f) => floats.extend(unary_params(f)),
            Op::Resample { weight_hi, .. } => floats.extend(weight_hi.iter_mut()),
            _ => {}
        }
        for step in &mut node.epilogue {
            if let EpilogueStep::Unary(f) = step {
                floats.extend(unary_params(f));
            }
        }
    }
    floats.into_iter().map(|x| std::mem::replace(x, 0.0).to_bits()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn random_graphs_roundtrip_and_verify(g in graph_gen::graph()) {
        if let Err(e) = verify(&g) {
            panic!("generated graph does not verify:\n{e}\n{}", elided(&g));
        }
        roundtrip(&g);
    }

    /// Damaged text never panics the parser (or the printer and verifier on what
    /// parses); whatever parses prints back to text that parses to the same graph.
    #[test]
    fn damaged_text_is_rejected_or_roundtrips(
        g in graph_gen::graph(),
        cut in any::<prop::sample::Index>(),
        len in 0usize..12,
        insert in prop::sample::select(vec!["", "%", "@1", "\"", "[", "]", "(", "=", ",", "\n", "#", "-", "0x", "%0", "NaN", "1e", "{", "}", "élan"]),
    ) {
        let text = print(&g);
        let chars: Vec<char> = text.chars().collect();
        let at = cut.index(chars.len() + 1);
        let end = (at + len).min(chars.len());
        let damaged: String = chars[..at].iter().chain(insert.chars().collect::<Vec<_>>().iter()).chain(&chars[end..]).collect();
        if let Ok(parsed) = parse(&damaged) {
            let _ = verify(&parsed);
            roundtrip(&parsed);
        }
    }

    #[test]
    fn arbitrary_text_never_panics_the_parser(text in any::<String>()) {
        let _ = parse(&text);
    }

    #[test]
    fn f32_attributes_and_data_roundtrip_bitwise(x in graph_gen::tricky_f32(), y in graph_gen::tricky_f32()) {
        let mut g = Graph::new("floats");
        let a = g.add_input(TensorType::f32([2]), "a");
        g.add_constant("c", Tensor::f32([2], vec![x, y]));
        let out = g.push1("", Op::Unary(UnaryFn::Clip { min: x, max: y }), &[a]).unwrap();
        g.outputs.push(out);
        roundtrip(&g);
    }

    #[test]
    fn arbitrary_names_roundtrip(name in graph_gen::odd_name()) {
        let mut g = Graph::new(name.clone());
        let a = g.add_input(TensorType::f32([1]), name.clone());
        let out = g.push1(name.clone(), Op::Unary(UnaryFn::Relu), &[a]).unwrap();
        g.values[out.index()].name = name.clone();
        g.nodes[0].schedule.kernel = name.clone();
        g.nodes[0].schedule.tiles.push((name, 4));
        g.outputs.push(out);
        roundtrip(&g);
    }
}

/// The generator must reach every op, or the property above proves little.
#[test]
fn generator_covers_every_op_and_decoration() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = graph_gen::graph();
    let mut seen = std::collections::BTreeSet::new();
    let (mut epilogues, mut extra_operands, mut schedules, mut nans, mut splats) = (0, 0, 0, 0, 0);
    for _ in 0..300 {
        let g = strategy.new_tree(&mut runner).unwrap().current();
        for n in &g.nodes {
            seen.insert(n.op.mnemonic());
            epilogues += !n.epilogue.is_empty() as usize;
            schedules += !n.schedule.is_default() as usize;
            extra_operands += (verify::op_input_count(n) < n.inputs.len()) as usize;
        }
        for c in &g.constants {
            match &c.value {
                ConstValue::Splat(_) => splats += 1,
                ConstValue::Dense(TensorData::F32(v)) => nans += v.iter().any(|x| x.is_nan()) as usize,
                ConstValue::Dense(_) => {}
            }
        }
    }
    let all = [
        "constant", "unary", "binary", "where", "cast", "matmul", "conv", "conv_transpose", "pool", "reduce",
        "arg_reduce", "reshape", "transpose", "slice", "pad", "concat", "broadcast", "gather", "gather_elements",
        "resample",
    ];
    let missing: Vec<_> = all.iter().filter(|m| !seen.contains(*m)).collect();
    assert!(missing.is_empty(), "the generator never produced {missing:?}");
    for (what, count) in [("epilogues", epilogues), ("extra epilogue operands", extra_operands), ("schedules", schedules), ("NaN data", nans), ("splats", splats)] {
        assert!(count >= 5, "the generator produced only {count} graphs/nodes with {what}");
    }
}

fn all_unary_fns() -> Vec<UnaryFn> {
    use UnaryFn::*;
    vec![
        Neg, Abs, Sqrt, Exp, Log, Reciprocal, Floor, Ceil, Relu, Sigmoid, Tanh, Erf, Softplus, Softsign, Mish,
        HardSwish, GeluErf, GeluTanh, Not,
        LeakyRelu { alpha: 0.01 },
        Elu { alpha: 1.0 },
        Selu { alpha: 1.6732632, gamma: 1.050701 },
        Celu { alpha: -0.0 },
        HardSigmoid { alpha: 0.2, beta: 0.5 },
        Swish { alpha: f32::from_bits(0x7fc0_0001) },
        Clip { min: f32::NEG_INFINITY, max: 6.0 },
        Affine { scale: 1e-30, shift: f32::from_bits(1) },
        PowConst { exponent: f32::NAN },
    ]
}

/// Every enum variant the text form names, in ops and in epilogues, parses back.
#[test]
fn every_variant_roundtrips() {
    let mut g = Graph::new("variants");
    let x = g.add_input(TensorType::f32([1, 2, 4, 4]), "x");
    let flags = g.add_input(TensorType::new(DType::Bool, [3]), "flags");
    let mut nodes: Vec<(Op, Vec<ValueId>)> = Vec::new();
    for f in all_unary_fns() {
        let input = if f == UnaryFn::Not { flags } else { x };
        nodes.push((Op::Unary(f), vec![input]));
    }
    for f in [BinaryFn::Add, BinaryFn::Sub, BinaryFn::Mul, BinaryFn::Div, BinaryFn::Pow, BinaryFn::Max, BinaryFn::Min, BinaryFn::PRelu, BinaryFn::Less, BinaryFn::LessOrEqual, BinaryFn::Greater, BinaryFn::GreaterOrEqual, BinaryFn::Equal] {
        nodes.push((Op::Binary(f), vec![x, x]));
    }
    for f in [BinaryFn::And, BinaryFn::Or, BinaryFn::Xor] {
        nodes.push((Op::Binary(f), vec![flags, flags]));
    }
    for kind in [ReduceKind::Sum, ReduceKind::Mean, ReduceKind::Max, ReduceKind::Min, ReduceKind::Prod] {
        nodes.push((Op::Reduce { kind, axes: vec![1, 3] }, vec![x]));
    }
    for (kind, select_last_index) in [(ArgKind::Max, true), (ArgKind::Min, false)] {
        nodes.push((Op::ArgReduce { kind, axis: 2, select_last_index }, vec![x]));
    }
    for to in DType::ALL {
        nodes.push((Op::Cast { to }, vec![x]));
    }
    for mode in [PadMode::Constant(Scalar::F32(-0.0)), PadMode::Reflect, PadMode::Edge, PadMode::Wrap] {
        nodes.push((Op::Pad { begins: vec![0, 0, 1, -1], ends: vec![0, 0, -1, 2], mode }, vec![x]));
    }
    nodes.push((Op::Pad { begins: vec![1], ends: vec![0], mode: PadMode::Constant(Scalar::Bool(true)) }, vec![flags]));
    for (op, inputs) in nodes {
        g.push("", op, &inputs).unwrap();
    }
    for kind in [PoolKind::Max, PoolKind::Avg { count_include_pad: true }, PoolKind::Avg { count_include_pad: false }] {
        let attrs = PoolAttrs { kind, kernel: vec![2, 2], strides: vec![2, 2], dilations: vec![1, 1], pads_begin: vec![0, 0], pads_end: vec![0, 0] };
        g.push_typed("pool", Op::Pool(attrs), &[x], TensorType::f32([1, 2, 2, 2])).unwrap();
    }
    // Every epilogue step kind, and every schedule field.
    let last = g.nodes.len() - 1;
    g.nodes[last].epilogue = all_unary_fns()
        .into_iter()
        .filter(|&f| f != UnaryFn::Not)
        .map(EpilogueStep::Unary)
        .chain([BinaryFn::Add, BinaryFn::PRelu, BinaryFn::Max].map(|func| EpilogueStep::Binary { func, operand: 0 }))
        .collect();
    g.nodes[last].schedule = Schedule {
        layout_in: Layout::Blocked { block: 16 },
        layout_out: Layout::Plain,
        vector_width: 4,
        tiles: vec![("oc".into(), 16), ("ow".into(), 6)],
        kernel: "direct_nchwc".into(),
    };
    g.nodes[0].schedule = Schedule { layout_out: Layout::Blocked { block: 8 }, ..Schedule::default() };
    g.outputs.push(g.nodes[last].outputs[0]);
    roundtrip(&g);
}

/// A graph that breaks invariants prints and parses back unchanged: dumps of broken
/// graphs are what one reads when debugging a pass.
#[test]
fn invalid_graphs_roundtrip_too() {
    let mut g = Graph::new("broken");
    let x = g.add_input(TensorType::f32([2]), "x");
    g.inputs.push(x); // duplicate input
    let orphan = g.add_value(TensorType::new(DType::I64, [0]), "orphan");
    g.add_node_typed("uses orphan", Op::Binary(BinaryFn::Add), vec![orphan, x, x], vec![TensorType::f32([7])]);
    g.add_node_typed("no outputs", Op::MatMul, vec![], vec![]);
    g.nodes.push(Node {
        name: "bad constant".into(),
        op: Op::Constant(ConstId(9)),
        inputs: vec![x],
        outputs: vec![x],
        epilogue: vec![EpilogueStep::Binary { func: BinaryFn::Less, operand: 42 }],
        schedule: Schedule::default(),
    });
    g.constants.push(Constant { name: "wrong".into(), ty: TensorType::f32([3]), value: ConstValue::Dense(TensorData::I32(vec![1])) });
    g.constants.push(Constant { name: String::new(), ty: TensorType::f32([3]), value: ConstValue::Splat(Scalar::Bool(false)) });
    g.outputs.extend([orphan, orphan]);
    assert!(verify(&g).is_err());
    roundtrip(&g);
}

#[test]
fn empty_graph_roundtrips() {
    roundtrip(&Graph::default());
    assert_eq!(print(&Graph::default()), "graph \"\"\n");
}

#[test]
fn hand_written_text_parses() {
    let text = r#"
# comments and blank lines are allowed
graph "hand"

inputs:
  %0 "x": f32[2,3]   # trailing comment
constants:
  @0: f32[3] = dense [1.0, -2.5,
                      0x7fc00001]
  @1 "zero": i64[] = splat 0
nodes:
  %1: f32[3] = constant @0
  %2 "y": f32[2,3] = binary add %0, %1 epilogue=[clip(max=6.0, min=0.0), mul(input=0)] schedule={kernel="k", vector_width=4} "add #1"
  %3: i64[] = constant @1
outputs: %2, %3
"#;
    let g = parse(text).unwrap();
    assert_eq!(g.name, "hand");
    assert_eq!(g.values.len(), 4);
    assert_eq!(g.nodes[1].name, "add #1");
    assert_eq!(g.nodes[1].epilogue[0], EpilogueStep::Unary(UnaryFn::Clip { min: 0.0, max: 6.0 }));
    assert_eq!(g.nodes[1].schedule.vector_width, 4);
    let ConstValue::Dense(TensorData::F32(data)) = &g.constants[0].value else { panic!("expected dense f32") };
    assert_eq!(data[2].to_bits(), 0x7fc0_0001);
    verify(&g).unwrap();
    roundtrip(&g);
}

fn parse_error(text: &str) -> ParseError {
    match parse(text) {
        Ok(g) => panic!("expected a parse error, got a graph:\n{}", print(&g)),
        Err(e) => e,
    }
}

#[test]
fn parse_errors_say_where_and_what() {
    let cases: &[(&str, usize, usize, &str)] = &[
        ("graph \"g\"\nnodes:\n  %0: f32[2] = frobnicate\n", 3, 16, "unknown op `frobnicate`"),
        ("graph \"g\"\ninputs:\n  %0: f33[2]\n", 3, 7, "unknown dtype `f33`"),
        ("graph \"g\"\ninputs:\n  %0: f32[2]\nnodes:\n  %1: f32[2] = unary relu %0 axis=1\n", 5, 30, "`unary` does not take attribute `axis`"),
        ("graph \"g\"\ninputs:\n  %0: f32[2]\nnodes:\n  %1: f32[2] = transpose %0\n", 5, 16, "`transpose` needs attribute `perm`"),
        ("graph \"g\"\ninputs:\n  %0: f32[2]\nnodes:\n  %1: f32[2] = unary leaky_relu %0\n", 5, 22, "`leaky_relu` needs parameter `alpha`"),
        ("graph \"g\"\ninputs:\n  %0: f32[2]\nnodes:\n  %1: f32[2] = unary relu(alpha=1.0) %0\n", 5, 27, "`relu` takes no parameters, not `alpha`"),
        ("graph \"g\"\nnodes:\n  %0: f32[2] = unary relu %5\n", 3, 27, "%5 is used but never declared"),
        ("graph \"g\"\ninputs:\n  %0: f32[2]\n  %0: f32[3]\n", 4, 3, "%0 is declared again with a different type or name (first declared on line 3)"),
        ("graph \"g\"\ninputs:\n  %1: f32[2]\n", 3, 3, "value ids must be dense, but %0 is never declared"),
        ("graph \"g\"\nconstants:\n  @1: f32[2] = splat 0.0\n", 3, 3, "constants must be numbered in order: expected @0, found @1"),
        ("graph \"g\"\nconstants:\n  @0: f32[2] = splat zero\n", 3, 22, "expected a float, found `zero`"),
        ("graph \"g\"\ninputs:\n  %0 \"unterminated: f32[2]\n", 3, 6, "unterminated string"),
        ("graph \"g\"\ninputs:\n  %0 \"bad \\q\": f32[2]\n", 3, 11, "unknown escape `\\q` in string"),
        ("graph \"g\"\nwidgets:\n", 2, 1, "expected a section"),
        ("graph \"g\"\noutputs:\noutputs:\n", 3, 1, "section `outputs` appears twice"),
        ("graph \"g\"\ninputs:\n  %0: f32[2] extra\n", 3, 14, "expected end of line, found `extra`"),
        ("graph \"g\"\ninputs:\n  %99999999999: f32[2]\n", 3, 3, "id `%99999999999` is too large"),
        ("graph \"g\"\ninputs:\n  %0: f32[-1]\n", 3, 11, "expected a non-negative integer, found `-1`"),
        ("graph \"g\"\ninputs:\n  %0: f32[2]\nnodes:\n  %1: f32[2] = unary relu %0 schedule={colour=red}\n", 5, 40, "unknown schedule field `colour`"),
        ("graph \"g\"\ninputs:\n  %0: f32[2]\nnodes:\n  %1: f32[2] = pad %0 begins=[0] ends=[0] mode=mirror\n", 5, 48, "unknown pad mode `mirror`"),
        ("graph \"g\"\ninputs:\n  %0: f32[2]\nnodes:\n  %1: f32[2] = reduce sum %0 axes=[0] axes=[0]\n", 5, 39, "attribute `axes` is given twice"),
    ];
    for &(text, line, column, message) in cases {
        let e = parse_error(text);
        assert!(e.message.starts_with(message), "for {text:?}: expected message starting {message:?}, got {:?}", e.message);
        assert_eq!((e.line, e.column), (line, column), "position for {text:?} ({})", e.message);
    }
}

#[test]
fn elided_data_does_not_parse_back() {
    let mut g = Graph::new("big");
    let w = g.add_constant("w", Tensor::f32([4, 5], (0..20).map(|i| i as f32).collect()));
    g.outputs.push(w);
    let text = elided(&g);
    assert!(text.contains("dense elided(20 x f32, fp=0x"), "{text}");
    let e = parse_error(&text);
    assert_eq!(e.line, 3);
    assert!(e.message.contains("elided"), "{}", e.message);
    // Small constants and splats are printed in full even when eliding.
    let mut small = Graph::new("small");
    let a = small.add_constant("a", Tensor::new([3], TensorData::I64(vec![1, -2, 3])));
    let b = small.add_constant("b", Tensor::f32([1000], vec![0.25; 1000]));
    small.outputs.extend([a, b]);
    assert_eq!(parse(&elided(&small)).unwrap(), small);
}

#[test]
fn fingerprints_tell_different_data_apart() {
    let dump = |data: Vec<f32>| {
        let mut g = Graph::new("g");
        g.add_constant("w", Tensor::f32([20], data));
        elided(&g)
    };
    let a = dump((0..20).map(|i| i as f32).collect());
    let b = dump((0..20).map(|i| if i == 7 { -0.0 } else { i as f32 }).collect());
    let a_again = dump((0..20).map(|i| i as f32).collect());
    assert_ne!(a, b);
    assert_eq!(a, a_again);
}

#[test]
fn large_dense_data_wraps_and_roundtrips() {
    let mut g = Graph::new("wide");
    let w = g.add_constant("w", Tensor::f32([100], (0..100).map(|i| (i as f32).sin()).collect()));
    g.outputs.push(w);
    let text = print(&g);
    assert!(text.lines().count() > 100 / 16, "dense data should wrap:\n{text}");
    roundtrip(&g);
}

/// A LeNet-like classifier: conv, pool, fused activation, reshape, matmul.
fn lenet() -> Graph {
    let mut g = Graph::new("lenet");
    let x = g.add_input(TensorType::f32([1, 1, 28, 28]), "input");
    let w1 = g.add_constant("conv1.weight", Tensor::f32([6, 1, 5, 5], (0..150).map(|i| (i as f32 * 0.37).sin()).collect()));
    let b1 = g.add_constant("conv1.bias", Tensor::f32([6], vec![0.0; 6]));
    let geometry = ConvGeometry { strides: vec![1, 1], dilations: vec![1, 1], pads_begin: vec![0, 0], pads_end: vec![0, 0], groups: 1 };
    let c1 = g.push1("Conv_0", Op::Conv(geometry), &[x, w1, b1]).unwrap();
    g.nodes.last_mut().unwrap().epilogue.push(EpilogueStep::Unary(UnaryFn::Relu));
    let pool = PoolAttrs { kind: PoolKind::Max, kernel: vec![2, 2], strides: vec![2, 2], dilations: vec![1, 1], pads_begin: vec![0, 0], pads_end: vec![0, 0] };
    let p1 = g.push_typed("MaxPool_1", Op::Pool(pool), &[c1], TensorType::f32([1, 6, 12, 12])).unwrap();
    // Six channels cannot be blocked (the verifier's layout rules).
    g.nodes.last_mut().unwrap().schedule = Schedule {
        layout_in: Layout::Plain,
        layout_out: Layout::Plain,
        vector_width: 4,
        tiles: vec![("ow".into(), 6)],
        kernel: String::new(),
    };
    let flat = g.push_typed("Flatten_2", Op::Reshape, &[p1], TensorType::f32([1, 864])).unwrap();
    let fc_w = g.add_constant("fc.weight", Tensor::f32([864, 10], (0..8640).map(|i| i as f32 / 8640.0).collect()));
    let logits = g.push1("Gemm_3", Op::MatMul, &[flat, fc_w]).unwrap();
    let fc_b = g.add_constant("fc.bias", Tensor::f32([1, 10], vec![0.5, -0.5, 0.25, 0.0, 1.0, 2.0, -1.0, 0.125, 3.0, 0.1]));
    let out = g.push1("Gemm_3.bias", Op::Binary(BinaryFn::Add), &[logits, fc_b]).unwrap();
    g.values[out.index()].name = "logits".into();
    g.outputs.push(out);
    g
}

#[test]
fn snapshot_lenet() {
    let g = lenet();
    verify(&g).unwrap();
    roundtrip(&g);
    insta::assert_snapshot!(elided(&g));
}

/// Ops with attributes that print differently: pad modes, slices with negative
/// steps, gathers, a residual add fused as an extra operand, odd names.
#[test]
fn snapshot_attributes_and_fusion() {
    let mut g = Graph::new("misc \"quoted\"\n");
    let x = g.add_input(TensorType::f32([1, 4, 3, 3]), "x");
    let pad = Op::Pad { begins: vec![0, 0, 1, 1], ends: vec![0, 0, 1, 1], mode: PadMode::Reflect };
    let padded = g.push1("pad", pad, &[x]).unwrap();
    let w = g.add_constant("dw", Tensor::f32([4, 1, 3, 3], vec![1.0 / 9.0; 36]));
    let geometry = ConvGeometry { strides: vec![1, 1], dilations: vec![1, 1], pads_begin: vec![0, 0], pads_end: vec![0, 0], groups: 4 };
    let conv = g.push1("depthwise", Op::Conv(geometry), &[padded, w]).unwrap();
    let fused = g.nodes.last_mut().unwrap();
    fused.inputs.push(x);
    fused.epilogue = vec![EpilogueStep::Binary { func: BinaryFn::Add, operand: 2 }, EpilogueStep::Unary(UnaryFn::Clip { min: 0.0, max: 6.0 })];
    let sliced = g.push_typed("flip", Op::Slice { starts: vec![0, 3, 2, 0], steps: vec![1, -1, -2, 1] }, &[conv], TensorType::f32([1, 4, 2, 3])).unwrap();
    let idx = g.add_constant("idx", Tensor::new([2], TensorData::I64(vec![-1, 0])));
    let gathered = g.push1("gather", Op::Gather { axis: 1 }, &[sliced, idx]).unwrap();
    let nan_fill = Op::Pad { begins: vec![0, 0, 0, 0], ends: vec![0, 0, 0, 1], mode: PadMode::Constant(Scalar::F32(f32::NAN)) };
    let out = g.push1("", nan_fill, &[gathered]).unwrap();
    let am = g.push1("argmax\ttab", Op::ArgReduce { kind: ArgKind::Max, axis: 1, select_last_index: true }, &[out]).unwrap();
    g.outputs.extend([out, am]);
    verify(&g).unwrap();
    roundtrip(&g);
    insta::assert_snapshot!(elided(&g));
}
