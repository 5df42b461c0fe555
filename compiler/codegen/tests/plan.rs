//! The memory plan: slots are reused, simultaneously live values never overlap, and
//! random graphs computed with the plan agree with the interpreter.

mod common;

use cnnc_codegen::plan::{Interval, Location, MemoryPlan, WORKSPACE_ALIGN, assign_offsets};
use cnnc_ir::{BinaryFn, Graph, Op, TensorType, UnaryFn, ValueId};
use common::{Rng, check_graph, random_tensor};
use proptest::prelude::*;

/// A random DAG of 1-D f32 values: unary maps, adds of equal-length values, concats and
/// slices (so sizes vary), with random outputs (inputs and repeats included).
fn random_graph(rng: &mut Rng, nodes: usize) -> Graph {
    let mut g = Graph::new("random");
    let mut values: Vec<ValueId> = Vec::new();
    for i in 0..2 {
        values.push(g.add_input(TensorType::f32([rng.below(40) as usize + 1]), format!("in{i}")));
    }
    let len = |g: &Graph, v: ValueId| g.ty(v).shape[0];
    for n in 0..nodes {
        let pick = |rng: &mut Rng, values: &[ValueId]| values[rng.below(values.len() as u64) as usize];
        let a = pick(rng, &values);
        let v = match rng.below(5) {
            0 => g
                .push1(
                    format!("n{n}"),
                    Op::Unary(UnaryFn::Affine { scale: 0.5, shift: 1.0 }),
                    &[a],
                )
                .unwrap(),
            1 => {
                let same: Vec<ValueId> = values.iter().copied().filter(|&v| len(&g, v) == len(&g, a)).collect();
                let b = pick(rng, &same);
                g.push1(format!("n{n}"), Op::Binary(BinaryFn::Add), &[a, b]).unwrap()
            }
            2 if len(&g, a) < 200 => {
                let b = pick(rng, &values);
                g.push1(format!("n{n}"), Op::Concat { axis: 0 }, &[a, b]).unwrap()
            }
            // A reshape shares its input's bytes in the plan.
            3 => g
                .push_typed(format!("n{n}"), Op::Reshape, &[a], g.ty(a).clone())
                .unwrap(),
            _ => {
                let keep = rng.below(len(&g, a) as u64) as usize + 1;
                g.push_typed(
                    format!("n{n}"),
                    Op::Slice {
                        starts: vec![0],
                        steps: vec![1],
                    },
                    &[a],
                    TensorType::f32([keep]),
                )
                .unwrap()
            }
        };
        values.push(v);
    }
    let outputs = rng.below(3) as usize + 1;
    for _ in 0..outputs {
        g.outputs.push(values[rng.below(values.len() as u64) as usize]);
    }
    g.outputs.push(*values.last().unwrap());
    g
}

/// Independent check of the plan's invariants.
fn check_plan(g: &Graph, plan: &MemoryPlan) -> Result<(), String> {
    let users = g.users();
    let producers = g.producers();
    let mut slots: Vec<(ValueId, Interval, usize)> = Vec::new();
    for v in 0..g.values.len() {
        let id = ValueId(v as u32);
        let loc = plan.location(id).ok_or(format!("{id} has no location"))?;
        if let Location::Workspace(off) = loc {
            let bytes = g.ty(id).byte_size();
            if bytes == 0 {
                continue;
            }
            let aligned = off % WORKSPACE_ALIGN == 0 || concat_block(g, plan, id).is_some();
            if !aligned || off + bytes > plan.workspace_size {
                return Err(format!(
                    "{id} at {off}+{bytes} outside the {} byte workspace or misaligned",
                    plan.workspace_size
                ));
            }
            let iv = plan.intervals[v].ok_or(format!("{id} in the workspace without an interval"))?;
            let def = producers[v].ok_or(format!("{id} in the workspace but not defined by a node"))?;
            if iv.start != def || users[v].iter().any(|&u| u > iv.end) {
                return Err(format!(
                    "{id}: interval {iv:?} misses its definition {def} or a use {:?}",
                    users[v]
                ));
            }
            slots.push((id, iv, off));
        }
    }
    for (i, &(a, ia, oa)) in slots.iter().enumerate() {
        for &(b, ib, ob) in &slots[i + 1..] {
            let live_together = ia.start <= ib.end && ib.start <= ia.end;
            let overlap = oa < ob + ib.bytes && ob < oa + ia.bytes;
            let written_in_place = concat_block(g, plan, a) == Some(b) || concat_block(g, plan, b) == Some(a);
            if live_together && overlap && !written_in_place && !in_place(g, plan, (a, ia, oa), (b, ib, ob)) {
                return Err(format!(
                    "{a} {ia:?}@{oa} and {b} {ib:?}@{ob} share memory while both live"
                ));
            }
        }
    }
    Ok(())
}

/// The concat output `v` is written into as a piece, when the plan put it at exactly its
/// block of that output and the concat runs no kernel.
fn concat_block(g: &Graph, plan: &MemoryPlan, v: ValueId) -> Option<ValueId> {
    let users = g.users();
    let [reader] = users[v.index()][..] else { return None };
    let node = &g.nodes[reader];
    if !matches!(node.op, Op::Concat { .. }) || !plan.is_alias(g, node) {
        return None;
    }
    let Some(Location::Workspace(base)) = plan.location(node.outputs[0]) else {
        return None;
    };
    let mut at = base;
    for &piece in &node.inputs {
        if piece == v {
            return (plan.location(v) == Some(Location::Workspace(at))).then_some(node.outputs[0]);
        }
        at += g.ty(piece).byte_size();
    }
    None
}

/// Both values are one buffer on purpose: at the same offset, linked by reshapes (the
/// output is the input's bytes) and in-place elementwise nodes (the input dies there).
fn in_place(g: &Graph, plan: &MemoryPlan, a: (ValueId, Interval, usize), b: (ValueId, Interval, usize)) -> bool {
    let producers = g.producers();
    // Walks back from v over the nodes that may share their input's memory.
    let origin = |mut v: ValueId| loop {
        let Some(p) = producers[v.index()] else { return v };
        let node = &g.nodes[p];
        let shared = match node.op {
            Op::Reshape => Some(node.inputs[0]),
            // The input it overwrote: same type, same place, and nothing else living in
            // that place is read after this node.
            Op::Unary(_) | Op::Binary(_) | Op::Where => node.inputs.iter().copied().find(|&x| {
                g.ty(x) == g.ty(v)
                    && plan.location(x) == plan.location(v)
                    && (0..g.values.len()).all(|w| {
                        w == v.index()
                            || plan.locations[w] != plan.location(x)
                            || plan.intervals[w].is_none_or(|iv| iv.start >= p || iv.end <= p)
                    })
            }),
            _ => None,
        };
        match shared {
            Some(x) => v = x,
            None => return v,
        }
    };
    a.2 == b.2 && origin(a.0) == origin(b.0)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(64), ..ProptestConfig::default() })]

    #[test]
    fn live_values_never_overlap(nodes in 1usize..40, seed in 1u64..u64::MAX) {
        let mut rng = Rng(seed);
        let g = random_graph(&mut rng, nodes);
        let plan = MemoryPlan::new(&g).map_err(TestCaseError::fail)?;
        check_plan(&g, &plan).map_err(TestCaseError::fail)?;
        let inputs: Vec<_> = g.inputs.iter().map(|&v| random_tensor(&mut rng, cnnc_ir::DType::F32, &g.ty(v).shape, -2.0, 2.0)).collect();
        check_graph(&g, &inputs).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn first_fit_intervals_are_disjoint(spec in prop::collection::vec((0usize..30, 0usize..10, 1usize..500), 1..60)) {
        let ivs: Vec<Interval> = spec.iter().map(|&(s, len, bytes)| Interval { start: s, end: s + len, bytes }).collect();
        let (offsets, total) = assign_offsets(&ivs);
        let peak: usize = (0..40)
            .map(|t| ivs.iter().filter(|iv| iv.start <= t && t <= iv.end).map(|iv| iv.bytes.div_ceil(64) * 64).sum::<usize>())
            .max()
            .unwrap_or(0);
        prop_assert!(total >= peak, "total {total} below the peak live size {peak}");
        for i in 0..ivs.len() {
            prop_assert!(offsets[i] % 64 == 0 && offsets[i] + ivs[i].bytes <= total);
            for j in i + 1..ivs.len() {
                let (a, b) = (ivs[i], ivs[j]);
                let live = a.start <= b.end && b.start <= a.end;
                let overlap = offsets[i] < offsets[j] + b.bytes && offsets[j] < offsets[i] + a.bytes;
                prop_assert!(!(live && overlap), "{a:?}@{} and {b:?}@{} overlap", offsets[i], offsets[j]);
            }
        }
    }
}

#[test]
fn a_long_chain_runs_in_one_slot() {
    let mut g = Graph::new("chain");
    let x = g.add_input(TensorType::f32([1000]), "x");
    let mut v = x;
    for i in 0..50 {
        v = g.push1(format!("n{i}"), Op::Unary(UnaryFn::Tanh), &[v]).unwrap();
    }
    g.outputs.push(v);
    let plan = MemoryPlan::new(&g).unwrap();
    assert_eq!(
        plan.workspace_size, 4032,
        "49 intermediates of 4000 bytes, each computed in place over the one before, in one 64-aligned slot"
    );
    let model = cnnc_codegen::JitModel::compile(&g).unwrap();
    assert_eq!(model.model_info().workspace_size, 4032);
}

/// Slices and transposes stacked by a concat (a weight gradient's taps) are written into
/// the concat's output; a piece read elsewhere keeps the concat a copy. Both agree with
/// the interpreter.
#[test]
fn concat_pieces_are_written_in_place() {
    use cnnc_ir::Tensor;
    for shared_piece in [false, true] {
        let mut g = Graph::new("stacked");
        let x = g.add_input(TensorType::f32([3, 5, 7]), "x");
        let mut pieces = Vec::new();
        for start in 0..3 {
            let ty = TensorType::f32([1, 5, 5]);
            let op = Op::Slice {
                starts: vec![start, 0, start.min(2)],
                steps: vec![1, 1, 1],
            };
            pieces.push(g.push_typed(format!("tap{start}"), op, &[x], ty).unwrap());
        }
        pieces.push(
            g.push1("t", Op::Transpose { perm: vec![0, 2, 1] }, &[pieces[0]])
                .unwrap(),
        );
        pieces.remove(0);
        let stacked = g.push1("stack", Op::Concat { axis: 0 }, &pieces).unwrap();
        let merged = g
            .push_typed("flat", Op::Reshape, &[stacked], TensorType::f32([75]))
            .unwrap();
        let y = g.push1("relu", Op::Unary(UnaryFn::Relu), &[merged]).unwrap();
        g.outputs.push(y);
        if shared_piece {
            g.outputs.push(pieces[1]);
        }
        let plan = MemoryPlan::new(&g).unwrap();
        let concat = g.nodes.iter().find(|n| matches!(n.op, Op::Concat { .. })).unwrap();
        assert_eq!(plan.is_alias(&g, concat), !shared_piece);
        check_plan(&g, &plan).unwrap();
        let data: Vec<f32> = (0..105).map(|i| (i as f32 * 0.37).sin()).collect();
        check_graph(&g, &[Tensor::f32([3, 5, 7], data)]).unwrap();
    }
}

/// Pieces computed by kernels (two convolutions of one input, as SqueezeNet's fire
/// modules) are written into the concat's output when their blocks keep the slot
/// alignment; a piece at a misaligned block keeps the concat a copy. Both agree with
/// the interpreter.
#[test]
fn kernel_pieces_are_written_in_place_at_aligned_blocks() {
    use cnnc_ir::{ConvGeometry, Tensor};
    for (first_channels, in_place) in [(16, true), (3, false)] {
        let mut g = Graph::new("fire");
        let x = g.add_input(TensorType::f32([1, 4, 6, 6]), "x");
        let mut rng = Rng(7);
        let mut conv = |g: &mut Graph, name: &str, out: usize, k: usize| {
            let w = g.add_constant(
                format!("{name}.w"),
                random_tensor(&mut rng, cnnc_ir::DType::F32, &[out, 4, k, k], -1.0, 1.0),
            );
            let pad = k / 2;
            let geometry = ConvGeometry {
                strides: vec![1, 1],
                dilations: vec![1, 1],
                pads_begin: vec![pad; 2],
                pads_end: vec![pad; 2],
                groups: 1,
            };
            g.push1(name, Op::Conv(geometry), &[x, w]).unwrap()
        };
        let a = conv(&mut g, "expand1x1", first_channels, 1);
        let b = conv(&mut g, "expand3x3", 8, 3);
        let a = g.push1("relu_a", Op::Unary(UnaryFn::Relu), &[a]).unwrap();
        let joined = g.push1("concat", Op::Concat { axis: 1 }, &[a, b]).unwrap();
        let y = g.push1("relu", Op::Unary(UnaryFn::Relu), &[joined]).unwrap();
        g.outputs.push(y);
        let plan = MemoryPlan::new(&g).unwrap();
        let concat = g.nodes.iter().find(|n| matches!(n.op, Op::Concat { .. })).unwrap();
        assert_eq!(plan.is_alias(&g, concat), in_place, "{first_channels} channels first");
        check_plan(&g, &plan).unwrap();
        let data: Vec<f32> = (0..144).map(|i| (i as f32 * 0.61).cos()).collect();
        check_graph(&g, &[Tensor::f32([1, 4, 6, 6], data)]).unwrap();
    }
}
