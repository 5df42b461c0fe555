//! The memory plan: where every value lives during one call of `cnnc_infer`.
//!
//! - Graph inputs stay in the caller's input buffers.
//! - A value that is a graph output is computed straight into the caller's output
//!   buffer, unless it is a graph input, a dense constant or an output already placed
//!   for an earlier output position: those are copied at the end of the call.
//! - Dense constants live in read-only data objects.
//! - Everything else (intermediates and splat constants, which are filled by a loop
//!   when their node runs) gets a 64-byte aligned workspace slot. A slot is busy from
//!   the node defining the value to the last node reading it, and is reused afterwards
//!   (greedy first-fit in definition order).
//! - A Concat whose pieces are contiguous blocks of its output (every axis before the
//!   concatenation axis has extent 1) and are each made by a node read only by the
//!   concat (a movement node -- slice, transpose, pad, broadcast -- or, at a 64-byte
//!   aligned block, any other kernel but a reshape or concat) gets its slot when the
//!   first piece is made; each piece is written straight into its block, and the concat
//!   runs no kernel (`MemoryPlan::is_alias`). Weight gradients stack their taps this
//!   way, and SqueezeNet's fire modules their two convolutions.
//! - A node may ask for scratch memory of its own (packing buffers of a convolution
//!   run as GEMM): a workspace slot busy only while that node runs.

use cnnc_ir::{ConstValue, Graph, Op, ValueId};

/// Alignment of every workspace slot and of the workspace itself.
pub const WORKSPACE_ALIGN: usize = 64;

/// Where a value's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// The caller's `inputs[i]`.
    Input(usize),
    /// The caller's `outputs[j]`.
    Output(usize),
    /// `workspace + offset`.
    Workspace(usize),
    /// The read-only data object of graph constant `index`.
    Constant(usize),
}

/// An output buffer filled by copying after every node has run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutputCopy {
    pub output: usize,
    pub from: Location,
    pub bytes: usize,
}

/// A busy interval of a workspace slot, in node indices, both ends inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interval {
    pub start: usize,
    pub end: usize,
    pub bytes: usize,
}

#[derive(Clone, Debug)]
pub struct MemoryPlan {
    /// Per value; `None` for values nothing defines (unused value slots).
    pub locations: Vec<Option<Location>>,
    /// Per value placed in the workspace, its busy interval (for tests and dumps).
    pub intervals: Vec<Option<Interval>>,
    pub output_copies: Vec<OutputCopy>,
    /// Per node, the workspace offset of its scratch memory (None: it asked for none).
    pub scratch: Vec<Option<usize>>,
    /// Bytes of workspace a call needs (a multiple of `WORKSPACE_ALIGN`).
    pub workspace_size: usize,
}

impl MemoryPlan {
    pub fn new(g: &Graph) -> Result<MemoryPlan, String> {
        MemoryPlan::with_scratch(g, &[])
    }

    /// The plan with `scratch_bytes[node index]` bytes of scratch for each node (missing
    /// entries and 0 mean none).
    pub fn with_scratch(g: &Graph, scratch_bytes: &[usize]) -> Result<MemoryPlan, String> {
        let n_values = g.values.len();
        let mut locations: Vec<Option<Location>> = vec![None; n_values];
        for (i, &v) in g.inputs.iter().enumerate() {
            check_id(g, v)?;
            if locations[v.index()].is_none() {
                locations[v.index()] = Some(Location::Input(i));
            }
        }
        let producers = g.producers();
        for (ni, node) in g.nodes.iter().enumerate() {
            for &v in node.inputs.iter().chain(&node.outputs) {
                check_id(g, v)?;
            }
            for &v in &node.inputs {
                if locations[v.index()].is_none() && producers[v.index()].is_none_or(|p| p >= ni) {
                    return Err(format!("node '{}' reads {v} before it is defined", node.name));
                }
            }
            if let Op::Constant(c) = node.op {
                let constant = g
                    .constants
                    .get(c.index())
                    .ok_or_else(|| format!("node '{}' names missing constant {c}", node.name))?;
                if matches!(constant.value, ConstValue::Dense(_)) {
                    locations[node.outputs[0].index()] = Some(Location::Constant(c.index()));
                }
            }
        }

        let mut output_copies = Vec::new();
        for (j, &v) in g.outputs.iter().enumerate() {
            check_id(g, v)?;
            let bytes = g.ty(v).byte_size();
            match locations[v.index()] {
                Some(from) => output_copies.push(OutputCopy { output: j, from, bytes }),
                None if producers[v.index()].is_none() => {
                    return Err(format!("graph output {v} is neither an input nor defined by a node"));
                }
                None => locations[v.index()] = Some(Location::Output(j)),
            }
        }

        // Everything still unplaced is a node output that needs a workspace slot.
        let mut last_use: Vec<usize> = vec![0; n_values];
        for (ni, node) in g.nodes.iter().enumerate() {
            for &v in &node.inputs {
                last_use[v.index()] = ni;
            }
        }
        let members = concat_members(g, &locations, &producers);
        let mut order: Vec<(ValueId, Interval)> = Vec::new();
        let mut intervals: Vec<Option<Interval>> = vec![None; n_values];
        // Byte offset of a concat piece within its concat's output (0 for other values).
        let mut offset_in_root: Vec<usize> = vec![0; n_values];
        // In-place elementwise ops: the output takes over the slot of an input that dies
        // at this node (`in_place_input`); a reshape's output is its input's memory
        // (`reshaped_input`), the slot then lives until the last reader of either.
        // `shares[v]` is the value whose slot v uses.
        let mut shares: Vec<Option<ValueId>> = vec![None; n_values];
        let mut slot_of: Vec<Option<usize>> = vec![None; n_values];
        for (ni, node) in g.nodes.iter().enumerate() {
            for &v in &node.outputs {
                if locations[v.index()].is_some() {
                    continue;
                }
                let bytes = g.ty(v).byte_size();
                if bytes == 0 {
                    // Nothing is read or written; any address will do.
                    locations[v.index()] = Some(Location::Workspace(0));
                    continue;
                }
                let end = last_use[v.index()].max(ni);
                if slot_of[v.index()].is_some() {
                    // A concat whose slot its first piece opened.
                    intervals[v.index()] = Some(Interval { start: ni, end, bytes });
                    let k = slot_of[v.index()].expect("checked");
                    order[k].1.end = order[k].1.end.max(end);
                    continue;
                }
                if let Some(member) = members[v.index()] {
                    let whole = g.nodes[member.concat].outputs[0];
                    let k = match slot_of[whole.index()] {
                        Some(k) => k,
                        None => {
                            let whole_end = last_use[whole.index()].max(member.concat);
                            let bytes = g.ty(whole).byte_size();
                            slot_of[whole.index()] = Some(order.len());
                            order.push((
                                whole,
                                Interval {
                                    start: ni,
                                    end: whole_end,
                                    bytes,
                                },
                            ));
                            order.len() - 1
                        }
                    };
                    shares[v.index()] = Some(whole);
                    offset_in_root[v.index()] = member.offset;
                    slot_of[v.index()] = Some(k);
                    intervals[v.index()] = Some(Interval { start: ni, end, bytes });
                    continue;
                }
                let slot_ends = |v: ValueId| slot_of[v.index()].map(|k| order[k].1.end);
                let host = reshaped_input(node, &slot_of).or_else(|| in_place_input(g, node, ni, &slot_ends));
                if let Some(host) = host {
                    let root = shares[host.index()].unwrap_or(host);
                    shares[v.index()] = Some(root);
                    let k = slot_of[host.index()].expect("an in-place host has a slot");
                    order[k].1.end = order[k].1.end.max(end);
                    slot_of[v.index()] = Some(k);
                    intervals[v.index()] = Some(Interval { start: ni, end, bytes });
                    continue;
                }
                let iv = Interval { start: ni, end, bytes };
                intervals[v.index()] = Some(iv);
                slot_of[v.index()] = Some(order.len());
                order.push((v, iv));
            }
        }
        let mut ivs: Vec<Interval> = order.iter().map(|&(_, iv)| iv).collect();
        let scratch_nodes: Vec<usize> = (0..g.nodes.len())
            .filter(|&ni| scratch_bytes.get(ni).is_some_and(|&b| b > 0))
            .collect();
        ivs.extend(scratch_nodes.iter().map(|&ni| Interval {
            start: ni,
            end: ni,
            bytes: scratch_bytes[ni],
        }));
        let (offsets, workspace_size) = assign_offsets(&ivs);
        for (&(v, _), &off) in order.iter().zip(&offsets) {
            locations[v.index()] = Some(Location::Workspace(off));
        }
        for v in 0..n_values {
            if let Some(root) = shares[v] {
                locations[v] = match locations[root.index()] {
                    Some(Location::Workspace(at)) => Some(Location::Workspace(at + offset_in_root[v])),
                    other => other,
                };
            }
        }
        let mut scratch = vec![None; g.nodes.len()];
        for (&ni, &off) in scratch_nodes.iter().zip(&offsets[order.len()..]) {
            scratch[ni] = Some(off);
        }
        Ok(MemoryPlan {
            locations,
            intervals,
            output_copies,
            scratch,
            workspace_size,
        })
    }

    pub fn location(&self, v: ValueId) -> Option<Location> {
        self.locations.get(v.index()).copied().flatten()
    }

    /// Whether `node` is a Reshape whose output already is its input's memory, or a
    /// Concat whose pieces were all written into its output's blocks (no kernel needs to
    /// run).
    pub fn is_alias(&self, g: &Graph, node: &cnnc_ir::Node) -> bool {
        match node.op {
            Op::Reshape => {
                node.inputs.len() == 1
                    && node.outputs.len() == 1
                    && self.location(node.inputs[0]).is_some()
                    && self.location(node.inputs[0]) == self.location(node.outputs[0])
            }
            Op::Concat { .. } => {
                let ([whole], true) = (node.outputs.as_slice(), node.epilogue.is_empty()) else {
                    return false;
                };
                let Some(Location::Workspace(base)) = self.location(*whole) else {
                    return false;
                };
                let mut at = base;
                node.inputs.iter().all(|&v| {
                    let in_place = self.location(v) == Some(Location::Workspace(at));
                    at += g.ty(v).byte_size();
                    in_place
                })
            }
            _ => false,
        }
    }
}

/// A concat piece written in place: the concat node and the piece's byte offset in its
/// output.
#[derive(Clone, Copy, Debug)]
struct ConcatMember {
    concat: usize,
    offset: usize,
}

/// Per value, its place in a concat that runs no kernel (see the module doc): every piece
/// of such a concat qualifies, or none does.
fn concat_members(g: &Graph, locations: &[Option<Location>], producers: &[Option<usize>]) -> Vec<Option<ConcatMember>> {
    let users = g.users();
    let mut members: Vec<Option<ConcatMember>> = vec![None; g.values.len()];
    for (ni, node) in g.nodes.iter().enumerate() {
        let Op::Concat { axis } = node.op else { continue };
        let [whole] = node.outputs[..] else { continue };
        let shape = &g.ty(whole).shape;
        if !node.epilogue.is_empty()
            || locations[whole.index()].is_some()
            || g.ty(whole).byte_size() == 0
            || axis >= shape.len()
            || shape[..axis].iter().any(|&d| d != 1)
        {
            continue;
        }
        // Movement pieces go at any offset (their copies make no alignment assumption);
        // pieces computed by other kernels (the convolutions of SqueezeNet's fire and
        // GoogLeNet's inception modules) only at offsets that keep the workspace's slot
        // alignment, and never reshapes or concats (which share their inputs' memory).
        let mut offset = 0;
        let qualifies = |v: ValueId, offset: usize| {
            let made_by_kernel = producers[v.index()].is_some_and(|p| {
                p < ni
                    && g.nodes[p].outputs.len() == 1
                    && match g.nodes[p].op {
                        Op::Slice { .. } | Op::Transpose { .. } | Op::Pad { .. } | Op::Broadcast => true,
                        Op::Reshape | Op::Concat { .. } | Op::Constant(_) => false,
                        _ => offset % WORKSPACE_ALIGN == 0,
                    }
            });
            made_by_kernel
                && locations[v.index()].is_none()
                && users[v.index()] == [ni]
                && g.ty(v).byte_size() > 0
                && members[v.index()].is_none()
        };
        if !node.inputs.iter().all(|&v| {
            let ok = qualifies(v, offset);
            offset += g.ty(v).byte_size();
            ok
        }) {
            continue;
        }
        let mut offset = 0;
        for &v in &node.inputs {
            members[v.index()] = Some(ConcatMember { concat: ni, offset });
            offset += g.ty(v).byte_size();
        }
    }
    members
}

/// The input of `node` (the `ni`-th) whose workspace slot its output may reuse: the node
/// is an elementwise map (each output element is computed from the elements at the same
/// index, read before the write), the input has exactly the output's type (no
/// broadcasting, so no element is read after its index was written) and this node is its
/// last reader. Graph inputs, constants and outputs never qualify (they have no slot).
fn in_place_input(
    g: &Graph,
    node: &cnnc_ir::Node,
    ni: usize,
    slot_end: &dyn Fn(ValueId) -> Option<usize>,
) -> Option<ValueId> {
    if !matches!(node.op, Op::Unary(_) | Op::Binary(_) | Op::Where) || node.outputs.len() != 1 {
        return None;
    }
    let out_ty = g.ty(node.outputs[0]);
    // The slot's end, not the value's last use: a reshape sharing the slot may still be read.
    node.inputs
        .iter()
        .copied()
        .find(|&v| slot_end(v) == Some(ni) && g.ty(v) == out_ty)
}

/// The input of a Reshape in the workspace: the output is the same bytes, so it reuses
/// them (the module then emits no copy; see `MemoryPlan::is_alias`).
fn reshaped_input(node: &cnnc_ir::Node, slot_of: &[Option<usize>]) -> Option<ValueId> {
    let (Op::Reshape, [x], [_]) = (&node.op, node.inputs.as_slice(), node.outputs.as_slice()) else {
        return None;
    };
    slot_of[x.index()].is_some().then_some(*x)
}

fn check_id(g: &Graph, v: ValueId) -> Result<(), String> {
    if v.index() >= g.values.len() {
        return Err(format!(
            "value {v} does not exist (graph has {} values)",
            g.values.len()
        ));
    }
    Ok(())
}

fn align_up(x: usize) -> usize {
    x.div_ceil(WORKSPACE_ALIGN) * WORKSPACE_ALIGN
}

/// Greedy first-fit: intervals in order of their start; each takes the lowest
/// aligned offset that overlaps no slot still busy at its start. Returns the offsets
/// and the total size.
pub fn assign_offsets(intervals: &[Interval]) -> (Vec<usize>, usize) {
    let mut order: Vec<usize> = (0..intervals.len()).collect();
    order.sort_by_key(|&i| (intervals[i].start, i));
    let mut offsets = vec![0; intervals.len()];
    // Busy slots as (offset, size, end), kept sorted by offset.
    let mut busy: Vec<(usize, usize, usize)> = Vec::new();
    let mut total = 0;
    for i in order {
        let iv = intervals[i];
        busy.retain(|&(_, _, end)| end >= iv.start);
        let size = align_up(iv.bytes);
        let mut candidate = 0;
        for &(off, sz, _) in &busy {
            if candidate + size <= off {
                break;
            }
            candidate = candidate.max(off + sz);
        }
        offsets[i] = candidate;
        let at = busy.partition_point(|&(off, _, _)| off < candidate);
        busy.insert(at, (candidate, size, iv.end));
        total = total.max(candidate + size);
    }
    (offsets, total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnnc_ir::{BinaryFn, Op, Tensor, TensorType, UnaryFn};

    #[test]
    fn chain_reuses_slots() {
        let mut g = Graph::new("chain");
        let x = g.add_input(TensorType::f32([256]), "x");
        let mut v = x;
        for i in 0..6 {
            v = g.push1(format!("n{i}"), Op::Unary(UnaryFn::Relu), &[v]).unwrap();
        }
        g.outputs.push(v);
        let p = MemoryPlan::new(&g).unwrap();
        // Five intermediates of 1 KiB, each computed in place over the one before.
        assert_eq!(p.workspace_size, 1024);
        assert_eq!(p.location(v), Some(Location::Output(0)));
        assert_eq!(p.location(x), Some(Location::Input(0)));
    }

    #[test]
    fn outputs_that_need_copies() {
        let mut g = Graph::new("copies");
        let x = g.add_input(TensorType::f32([4]), "x");
        let c = g.add_constant("c", Tensor::f32([4], vec![1.0, 2.0, 3.0, 4.0]));
        let s = g.add_constant("s", Tensor::f32([4], vec![7.0; 4]));
        let y = g.push1("add", Op::Binary(BinaryFn::Add), &[x, c]).unwrap();
        g.outputs = vec![x, c, y, y, s];
        let p = MemoryPlan::new(&g).unwrap();
        let from: Vec<(usize, Location)> = p.output_copies.iter().map(|c| (c.output, c.from)).collect();
        assert_eq!(
            from,
            vec![
                (0, Location::Input(0)),
                (1, Location::Constant(0)),
                (3, Location::Output(2))
            ]
        );
        assert_eq!(p.location(y), Some(Location::Output(2)));
        assert_eq!(
            p.location(s),
            Some(Location::Output(4)),
            "a splat output is filled in place"
        );
    }

    #[test]
    fn bad_graphs_are_errors() {
        let mut g = Graph::new("bad");
        let x = g.add_input(TensorType::f32([4]), "x");
        g.outputs.push(ValueId(9));
        assert!(MemoryPlan::new(&g).unwrap_err().contains("does not exist"));
        g.outputs = vec![x];
        let y = g.add_value(TensorType::f32([4]), "y");
        g.nodes.push(cnnc_ir::Node {
            name: "early".into(),
            op: Op::Unary(UnaryFn::Relu),
            inputs: vec![y],
            outputs: vec![y],
            epilogue: vec![],
            schedule: Default::default(),
        });
        assert!(MemoryPlan::new(&g).unwrap_err().contains("before it is defined"));
    }

    #[test]
    fn scratch_is_busy_only_during_its_node() {
        let mut g = Graph::new("scratch");
        let x = g.add_input(TensorType::f32([256]), "x");
        let a = g.push1("a", Op::Unary(UnaryFn::Relu), &[x]).unwrap();
        let b = g.push1("b", Op::Unary(UnaryFn::Relu), &[a]).unwrap();
        let c = g.push1("c", Op::Unary(UnaryFn::Relu), &[b]).unwrap();
        g.outputs.push(c);
        let p = MemoryPlan::with_scratch(&g, &[0, 4096, 0]).unwrap();
        assert_eq!(
            p.scratch,
            vec![None, Some(1024), None],
            "after a, which b overwrites in place"
        );
        assert_eq!(p.workspace_size, 1024 + 4096);
        let q = MemoryPlan::with_scratch(&g, &[0, 0, 512]).unwrap();
        assert_eq!(q.scratch[2], Some(1024), "b's slot is busy at node 2");
    }

    #[test]
    fn elementwise_ops_run_in_place_only_over_inputs_that_die_unbroadcast() {
        let mut g = Graph::new("in_place");
        let x = g.add_input(TensorType::f32([4, 64]), "x");
        let row = g.add_input(TensorType::f32([64]), "row");
        let a = g.push1("a", Op::Unary(UnaryFn::Relu), &[x]).unwrap();
        // a is read again later: b needs a slot of its own.
        let b = g.push1("b", Op::Unary(UnaryFn::Abs), &[a]).unwrap();
        // b dies here with the output's type: c reuses it.
        let c = g.push1("c", Op::Binary(BinaryFn::Add), &[b, a]).unwrap();
        // A broadcast operand never hosts the output.
        let r = g.push1("r", Op::Unary(UnaryFn::Relu), &[row]).unwrap();
        let d = g.push1("d", Op::Binary(BinaryFn::Mul), &[r, c]).unwrap();
        let e = g.push1("e", Op::Unary(UnaryFn::Neg), &[d]).unwrap();
        g.outputs.push(e);
        let p = MemoryPlan::new(&g).unwrap();
        let at = |v| p.location(v).unwrap();
        assert_ne!(at(a), at(b), "a is still read by c");
        assert_eq!(at(c), at(b), "b dies at c");
        assert_ne!(at(d), at(r), "r broadcasts against c");
        assert_eq!(at(d), at(c), "c dies at d with d's type");
        assert_eq!(at(e), Location::Output(0), "graph outputs stay in the caller's buffer");
    }

    #[test]
    fn first_fit_fills_gaps() {
        let iv = |start, end, bytes| Interval { start, end, bytes };
        let (off, total) = assign_offsets(&[iv(0, 1, 64), iv(0, 3, 64), iv(2, 3, 64)]);
        assert_eq!(off, vec![0, 64, 0]);
        assert_eq!(total, 128);
    }
}
