//! The verifier's layout rules (NCHWc regions): what a blocked graph must satisfy,
//! each violation reported with the node and the operand, all of them at once; and the
//! text form and interpreter of `reorder`.

use cnnc_ir::*;

fn blocked8() -> Layout {
    Layout::Blocked { block: 8 }
}

fn set(g: &mut Graph, node: usize, layout_in: Layout, layout_out: Layout) {
    g.nodes[node].schedule.layout_in = layout_in;
    g.nodes[node].schedule.layout_out = layout_out;
}

/// x -> reorder(blocked) -> relu -> mul by a per-channel constant -> conv 1x1 ->
/// reorder(plain) -> output: a valid blocked region.
fn region() -> Graph {
    let mut g = Graph::new("region");
    let x = g.add_input(TensorType::f32([1, 16, 4, 4]), "x");
    let scale = g.add_constant("scale", Tensor::f32(vec![1, 16, 1, 1], vec![0.5; 16]));
    let w = g.add_constant("w", Tensor::f32(vec![8, 16, 1, 1], vec![0.25; 128]));
    let b = g.push1("to_blocked", Op::Reorder, &[x]).unwrap();
    let r = g.push1("relu", Op::Unary(UnaryFn::Relu), &[b]).unwrap();
    let m = g.push1("scale", Op::Binary(BinaryFn::Mul), &[r, scale]).unwrap();
    let geometry = ConvGeometry {
        strides: vec![1, 1],
        dilations: vec![1, 1],
        pads_begin: vec![0, 0],
        pads_end: vec![0, 0],
        groups: 1,
    };
    let c = g.push1("conv", Op::Conv(geometry), &[m, w]).unwrap();
    let y = g.push1("to_plain", Op::Reorder, &[c]).unwrap();
    g.outputs.push(y);
    // Constants may have nodes of their own: find the first reorder.
    let first = g.nodes.iter().position(|n| n.op == Op::Reorder).unwrap();
    set(&mut g, first, Layout::Plain, blocked8());
    for i in first + 1..first + 4 {
        set(&mut g, i, blocked8(), blocked8());
    }
    set(&mut g, first + 4, blocked8(), Layout::Plain);
    g
}

fn node_index(g: &Graph, name: &str) -> usize {
    g.nodes.iter().position(|n| n.name == name).unwrap()
}

fn problems(g: &Graph) -> Vec<String> {
    match verify(g) {
        Ok(()) => panic!("the verifier accepted a broken graph:\n{}", print(g)),
        Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
    }
}

#[test]
fn accepts_a_blocked_region() {
    verify(&region()).unwrap();
}

#[test]
fn data_operand_in_the_wrong_layout() {
    let mut g = region();
    let relu = node_index(&g, "relu");
    set(&mut g, relu, Layout::Plain, Layout::Plain);
    // relu now reads a blocked value as plain, and the mul reads relu's plain output
    // as blocked.
    let found = problems(&g);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found[0].contains("\"relu\"") && found[0].contains("data operand 0") && found[0].contains("is blocked(8) but the node reads it plain"), "{found:?}");
    assert!(found[1].contains("\"scale\"") && found[1].contains("is plain but the node reads it blocked(8)"), "{found:?}");
}

#[test]
fn weights_must_be_plain() {
    let mut g = region();
    let conv = node_index(&g, "conv");
    let blocked_value = g.nodes[node_index(&g, "to_blocked")].outputs[0];
    // An epilogue operand of another shape than the output's ([1, 16, 4, 4] added to
    // [1, 8, 4, 4] does not broadcast either, reported separately) is read plain.
    g.nodes[conv].inputs.push(blocked_value);
    g.nodes[conv].epilogue = vec![EpilogueStep::Binary { func: BinaryFn::Add, operand: 2 }];
    let found = problems(&g);
    assert!(found.iter().any(|p| p.contains("\"conv\"") && p.contains("operand 2") && p.contains("is blocked(8) but the node reads it plain")), "{found:?}");
}

#[test]
fn only_a_reorder_changes_the_layout() {
    let mut g = region();
    let relu = node_index(&g, "relu");
    set(&mut g, relu, blocked8(), Layout::Plain);
    let found = problems(&g);
    assert!(found.iter().any(|p| p.contains("\"relu\"") && p.contains("changes the layout from blocked(8) to plain (only a reorder may)")), "{found:?}");
    let mut g = region();
    let to_plain = node_index(&g, "to_plain");
    set(&mut g, to_plain, blocked8(), blocked8());
    let found = problems(&g);
    assert!(found.iter().any(|p| p.contains("reorder from blocked(8) to the same layout")), "{found:?}");
}

#[test]
fn blocked_needs_channels_a_multiple_of_the_block() {
    let mut g = Graph::new("odd_channels");
    let x = g.add_input(TensorType::f32([1, 12, 3, 3]), "x");
    let b = g.push1("to_blocked", Op::Reorder, &[x]).unwrap();
    let y = g.push1("to_plain", Op::Reorder, &[b]).unwrap();
    g.outputs.push(y);
    set(&mut g, 0, Layout::Plain, blocked8());
    set(&mut g, 1, blocked8(), Layout::Plain);
    let found = problems(&g);
    assert_eq!(
        found,
        ["node 0 \"to_blocked\": output %1 f32[1,12,3,3] cannot be blocked(8) (needs rank-4 f32 with channels a multiple of 8)"]
    );
}

#[test]
fn graph_outputs_must_be_plain_unless_layout_free() {
    let mut g = region();
    let to_plain = node_index(&g, "to_plain");
    g.outputs[0] = g.nodes[to_plain].inputs[0];
    g.nodes.remove(to_plain);
    g.values.pop();
    let found = problems(&g);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("graph: graph output") && found[0].contains("graph outputs must be plain"), "{found:?}");

    // [N, C, 1, 1] has the same bytes in both layouts.
    let mut g = Graph::new("layout_free");
    let x = g.add_input(TensorType::f32([2, 16, 1, 1]), "x");
    let b = g.push1("to_blocked", Op::Reorder, &[x]).unwrap();
    let r = g.push1("relu", Op::Unary(UnaryFn::Relu), &[b]).unwrap();
    g.outputs.push(r);
    set(&mut g, 0, Layout::Plain, blocked8());
    set(&mut g, 1, Layout::Plain, Layout::Plain); // reads a blocked layout-free value as plain
    verify(&g).unwrap();
}

#[test]
fn every_layout_problem_is_reported() {
    let mut g = region();
    for node in &mut g.nodes {
        node.schedule.layout_in = Layout::Plain;
        node.schedule.layout_out = Layout::Plain;
    }
    // Both reorders now go from plain to plain.
    let found = problems(&g);
    assert_eq!(found.iter().filter(|p| p.contains("to the same layout")).count(), 2, "{found:?}");
}

#[test]
fn reorder_text_form_and_interpreter() {
    let g = region();
    let text = print(&g);
    assert!(text.contains("= reorder %"), "{text}");
    let back = parse(&text).unwrap();
    assert_eq!(back, g);
    let x = Tensor::f32(vec![1, 16, 4, 4], (0..256).map(|i| i as f32 - 100.0).collect());
    let plain = {
        let mut p = g.clone();
        for node in &mut p.nodes {
            node.schedule = Schedule::default();
        }
        p
    };
    assert_eq!(interp::run(&g, std::slice::from_ref(&x)).unwrap(), interp::run(&plain, &[x]).unwrap());
}
