//! The verifier: one graph per kind of problem that must be rejected with a message
//! naming the node and the problem, and graphs that must be accepted.

use cnnc_ir::verify::{Location, op_input_count};
use cnnc_ir::*;

/// x -> relu -> add(relu, x): a small valid graph to break in one place per test.
fn base() -> Graph {
    let mut g = Graph::new("base");
    let x = g.add_input(TensorType::f32([2, 3]), "x");
    let r = g.push1("relu", Op::Unary(UnaryFn::Relu), &[x]).unwrap();
    let s = g.push1("sum", Op::Binary(BinaryFn::Add), &[r, x]).unwrap();
    g.outputs.push(s);
    g
}

fn problems(g: &Graph) -> Vec<String> {
    match verify(g) {
        Ok(()) => panic!("the verifier accepted a broken graph:\n{}", print(g)),
        Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
    }
}

/// Exactly one problem, and it says `expected`.
fn assert_single_problem(g: &Graph, expected: &str) {
    let found = problems(g);
    assert_eq!(found, [expected], "for graph:\n{}", print(g));
}

#[test]
fn accepts_valid_graphs() {
    verify(&base()).unwrap();
    verify(&Graph::default()).unwrap();
}

#[test]
fn value_id_out_of_range() {
    let mut g = base();
    g.nodes[1].inputs[1] = ValueId(40);
    assert_single_problem(&g, "node 1 \"sum\": input 1: %40 is out of range (the graph has 3 values)");
}

#[test]
fn node_output_out_of_range() {
    let mut g = base();
    g.nodes[0].outputs.push(ValueId(7));
    let found = problems(&g);
    assert!(found.contains(&"node 0 \"relu\": output %7 is out of range (the graph has 3 values)".to_string()), "{found:?}");
}

#[test]
fn value_defined_twice() {
    let mut g = base();
    g.nodes[1].outputs[0] = ValueId(1);
    g.outputs[0] = ValueId(1);
    let found = problems(&g);
    assert!(found.contains(&"node 1 \"sum\": defines %1, already defined by node 0 \"relu\"".to_string()), "{found:?}");
}

#[test]
fn value_never_defined() {
    let mut g = base();
    g.add_value(TensorType::f32([1]), "dangling");
    assert_single_problem(&g, "graph: %3 is never defined (neither a graph input nor a node output)");
}

#[test]
fn input_never_defined() {
    let mut g = base();
    let dangling = g.add_value(TensorType::f32([2, 3]), "dangling");
    g.nodes[1].inputs[1] = dangling;
    assert_single_problem(&g, "node 1 \"sum\": input 1: uses %3, which is never defined");
}

#[test]
fn use_before_definition() {
    let mut g = base();
    g.nodes.swap(0, 1);
    assert_single_problem(
        &g,
        "node 0 \"sum\": input 0: uses %1 before its definition by node 1 \"relu\" (nodes must be in topological order)",
    );
}

#[test]
fn cycle_is_a_use_before_definition() {
    let mut g = base();
    // relu now reads sum, which reads relu.
    g.nodes[0].inputs[0] = ValueId(2);
    assert_single_problem(
        &g,
        "node 0 \"relu\": input 0: uses %2 before its definition by node 1 \"sum\" (nodes must be in topological order)",
    );
}

#[test]
fn node_reading_its_own_output() {
    let mut g = base();
    g.nodes[1].inputs[0] = ValueId(2);
    assert_single_problem(&g, "node 1 \"sum\": input 0: uses its own output %2");
}

#[test]
fn graph_output_undefined() {
    let mut g = base();
    let nowhere = g.add_value(TensorType::f32([2, 3]), "");
    g.outputs.push(nowhere);
    g.outputs.push(ValueId(99));
    assert_eq!(
        problems(&g),
        ["graph: graph output %3 is never defined", "graph: graph output %99 is out of range (the graph has 4 values)"]
    );
}

#[test]
fn graph_input_defined_by_a_node() {
    let mut g = base();
    g.nodes[0].outputs[0] = ValueId(0);
    g.nodes[1].inputs[0] = ValueId(0);
    let found = problems(&g);
    assert!(found.contains(&"node 0 \"relu\": defines %0, which is a graph input".to_string()), "{found:?}");
}

#[test]
fn duplicate_graph_inputs() {
    let mut g = base();
    g.inputs.push(ValueId(0));
    assert_single_problem(&g, "graph: %0 is listed as a graph input more than once");
}

#[test]
fn graph_input_out_of_range() {
    let mut g = base();
    g.inputs.push(ValueId(12));
    assert_single_problem(&g, "graph: graph input 1: %12 is out of range (the graph has 3 values)");
}

#[test]
fn constant_referenced_out_of_range() {
    let mut g = base();
    let c = g.add_constant("c", Tensor::f32([2], vec![1.0, 2.0]));
    g.outputs.push(c);
    g.nodes[2].op = Op::Constant(ConstId(5));
    assert_single_problem(&g, "node 2 \"c\": refers to constant @5, but the graph has 1 constants");
}

#[test]
fn constant_data_length_mismatch() {
    let mut g = base();
    g.constants.push(Constant {
        name: "w".into(),
        ty: TensorType::f32([2, 3]),
        value: ConstValue::Dense(TensorData::F32(vec![1.0; 5])),
    });
    assert_single_problem(&g, "constant @0 \"w\": holds 5 elements but its type f32[2,3] has 6");
}

#[test]
fn constant_dtype_mismatch() {
    let mut g = base();
    g.constants.push(Constant { name: "s".into(), ty: TensorType::f32([4]), value: ConstValue::Splat(Scalar::I64(3)) });
    g.constants.push(Constant {
        name: "d".into(),
        ty: TensorType::new(DType::I32, [2]),
        value: ConstValue::Dense(TensorData::I64(vec![1, 2])),
    });
    assert_eq!(
        problems(&g),
        ["constant @0 \"s\": holds i64 data but its type is f32[4]", "constant @1 \"d\": holds i64 data but its type is i32[2]"]
    );
}

#[test]
fn constant_shape_overflow_is_reported_not_a_panic() {
    let mut g = base();
    g.constants.push(Constant {
        name: "huge".into(),
        ty: TensorType::f32([usize::MAX, 2]),
        value: ConstValue::Splat(Scalar::F32(0.0)),
    });
    let found = problems(&g);
    assert!(found[0].contains("more elements than fit in memory"), "{found:?}");
}

#[test]
fn output_type_differs_from_inferred() {
    let mut g = base();
    g.values[1].ty = TensorType::f32([3, 2]);
    // The add now sees f32[3,2] + f32[2,3] as well: both nodes are named.
    let found = problems(&g);
    assert_eq!(found[0], "node 0 \"relu\": declares output type(s) [f32[3,2]] but unary gives [f32[2,3]]");
    assert!(found[1].starts_with("node 1 \"sum\": type error: cannot broadcast"), "{found:?}");
}

#[test]
fn wrong_output_count() {
    let mut g = base();
    let extra = g.add_value(TensorType::f32([2, 3]), "");
    g.nodes[0].outputs.push(extra);
    assert_single_problem(&g, "node 0 \"relu\": declares output type(s) [f32[2,3], f32[2,3]] but unary gives [f32[2,3]]");
}

#[test]
fn declared_type_inconsistent_with_op() {
    let mut g = base();
    let r = g.push_typed("flatten", Op::Reshape, &[ValueId(2)], TensorType::f32([6])).unwrap();
    g.values[r.index()].ty = TensorType::f32([7]);
    assert_single_problem(&g, "node 2 \"flatten\": type error: reshape: f32[2,3] cannot become f32[7]");
}

#[test]
fn op_type_error_is_reported() {
    let mut g = base();
    g.nodes[0].op = Op::Unary(UnaryFn::Not);
    assert_single_problem(&g, "node 0 \"relu\": type error: unary Not is not defined on f32");
}

#[test]
fn epilogue_operand_index_out_of_range() {
    let mut g = base();
    g.nodes[0].epilogue.push(EpilogueStep::Binary { func: BinaryFn::Mul, operand: 3 });
    assert_single_problem(
        &g,
        "node 0 \"relu\": epilogue step 0 (mul(input=3)): operand index 3 is out of range (the node has 1 inputs)",
    );
}

#[test]
fn epilogue_operand_dtype_differs() {
    let mut g = base();
    let k = g.add_constant("k", Tensor::new([3], TensorData::I64(vec![1, 2, 3])));
    let sum = &mut g.nodes[1];
    sum.inputs.push(k);
    sum.epilogue.push(EpilogueStep::Binary { func: BinaryFn::Add, operand: 2 });
    // The constant is defined after the node that reads it, too.
    let found = problems(&g);
    assert!(found.contains(&"node 1 \"sum\": epilogue step 0 (add(input=2)): operand %3 is i64, output 0 is f32".to_string()), "{found:?}");
}

#[test]
fn epilogue_operand_does_not_broadcast_to_output() {
    let mut g = Graph::new("g");
    let x = g.add_input(TensorType::f32([2, 1]), "x");
    let big = g.add_input(TensorType::f32([2, 4]), "big");
    g.push1("relu", Op::Unary(UnaryFn::Relu), &[x]).unwrap();
    // [2,4] broadcasts with [2,1] but would grow the output: rejected.
    g.nodes[0].inputs.push(big);
    g.nodes[0].epilogue.push(EpilogueStep::Binary { func: BinaryFn::Add, operand: 1 });
    assert_single_problem(
        &g,
        "node 0 \"relu\": epilogue step 0 (add(input=1)): operand %1 f32[2,4] does not broadcast to output 0 f32[2,1]",
    );
}

#[test]
fn epilogue_unary_step_invalid_for_dtype() {
    let mut g = Graph::new("g");
    let x = g.add_input(TensorType::new(DType::I64, [3]), "x");
    g.push1("neg", Op::Unary(UnaryFn::Neg), &[x]).unwrap();
    g.nodes[0].epilogue = vec![EpilogueStep::Unary(UnaryFn::Relu), EpilogueStep::Unary(UnaryFn::LeakyRelu { alpha: 0.1 })];
    assert_single_problem(&g, "node 0 \"neg\": epilogue step 1 (leaky_relu(alpha=0.1)) is not defined on i64");
}

#[test]
fn epilogue_step_that_changes_dtype() {
    let mut g = base();
    g.nodes[1].epilogue.push(EpilogueStep::Binary { func: BinaryFn::Less, operand: 1 });
    assert_single_problem(&g, "node 1 \"sum\": epilogue step 0 (less(input=1)) would change output 0's dtype from f32 to bool");
}

#[test]
fn epilogue_logical_step_on_floats() {
    let mut g = base();
    g.nodes[1].epilogue.push(EpilogueStep::Binary { func: BinaryFn::And, operand: 1 });
    assert_single_problem(&g, "node 1 \"sum\": epilogue step 0 (and(input=1)): binary And is not defined on f32");
}

#[test]
fn epilogue_without_outputs() {
    let mut g = base();
    g.nodes[0].epilogue.push(EpilogueStep::Unary(UnaryFn::Relu));
    g.nodes[0].outputs.clear();
    let found = problems(&g);
    assert!(found.contains(&"node 0 \"relu\": has an epilogue but no outputs".to_string()), "{found:?}");
}

/// A residual add fused into a convolution: the trailing input read only by the
/// epilogue is not one of the convolution's inputs.
#[test]
fn fused_residual_operand_is_accepted() {
    let mut g = Graph::new("residual");
    let x = g.add_input(TensorType::f32([1, 2, 4, 4]), "x");
    let w = g.add_constant("w", Tensor::f32([2, 2, 1, 1], vec![1.0, 0.0, 0.0, 1.0]));
    let b = g.add_constant("b", Tensor::f32([2], vec![0.5, -0.5]));
    let geometry = ConvGeometry { strides: vec![1, 1], dilations: vec![1, 1], pads_begin: vec![0, 0], pads_end: vec![0, 0], groups: 1 };
    let y = g.push1("conv", Op::Conv(geometry), &[x, w, b]).unwrap();
    let conv = g.nodes.last_mut().unwrap();
    conv.inputs.push(x);
    conv.epilogue = vec![EpilogueStep::Binary { func: BinaryFn::Add, operand: 3 }, EpilogueStep::Unary(UnaryFn::Relu)];
    g.outputs.push(y);
    assert_eq!(op_input_count(&g.nodes[2]), 3);
    verify(&g).unwrap();
    // Without the bias, the residual at index 2 is still recognised as an extra.
    g.nodes[2].inputs.remove(2);
    g.nodes[2].epilogue[0] = EpilogueStep::Binary { func: BinaryFn::Add, operand: 2 };
    assert_eq!(op_input_count(&g.nodes[2]), 2);
    verify(&g).unwrap();
    // An epilogue may read one of the op's own inputs without it counting as an extra.
    let mut g = base();
    g.nodes[0].epilogue.push(EpilogueStep::Binary { func: BinaryFn::Mul, operand: 0 });
    assert_eq!(op_input_count(&g.nodes[0]), 1);
    verify(&g).unwrap();
}

#[test]
fn all_problems_are_reported_at_once() {
    let mut g = base();
    g.inputs.push(ValueId(0));
    g.nodes[0].inputs[0] = ValueId(50);
    g.nodes[1].epilogue.push(EpilogueStep::Unary(UnaryFn::Not));
    g.outputs.push(ValueId(60));
    g.constants.push(Constant { name: "c".into(), ty: TensorType::f32([2]), value: ConstValue::Dense(TensorData::F32(vec![])) });
    let err = verify(&g).unwrap_err();
    let text = err.to_string();
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [
            "constant @0 \"c\": holds 0 elements but its type f32[2] has 2",
            "graph: %0 is listed as a graph input more than once",
            "node 0 \"relu\": input 0: %50 is out of range (the graph has 3 values)",
            "node 1 \"sum\": epilogue step 0 (not) is not defined on f32",
            "graph: graph output %60 is out of range (the graph has 3 values)",
        ]
    );
    assert_eq!(err.problems[2].location, Location::Node { index: 0, name: "relu".into() });
    let as_error: &dyn std::error::Error = &err;
    assert_eq!(as_error.to_string(), text);
}

#[test]
fn names_with_quotes_are_escaped_in_messages() {
    let mut g = base();
    g.nodes[1].name = "a \"quoted\"\nname".into();
    g.nodes[1].inputs[1] = ValueId(9);
    assert_single_problem(&g, "node 1 \"a \\\"quoted\\\"\\nname\": input 1: %9 is out of range (the graph has 3 values)");
}
