//! The invariants every pass must keep, checked all at once so that one run names
//! every problem (passes run the verifier after each rewrite).
//!
//! A graph is valid when:
//! - every id is in range; each value is defined exactly once, by a graph input or a
//!   node output; graph inputs are distinct and no node redefines one;
//! - nodes are in topological order (each input defined before its use, which also
//!   rules out cycles) and graph outputs are defined;
//! - constants hold data of their type's dtype and element count;
//! - each node's output types are what `infer::output_types` gives for its op
//!   inputs (see `op_input_count`);
//! - epilogue steps fit output 0: binary operands exist, have its dtype and broadcast
//!   to its shape, and every step is defined on (and keeps) that dtype;
//! - physical layouts agree (see `check_layouts`): a value's layout is the
//!   `schedule.layout_out` of the node defining it (graph inputs are Plain).

use std::fmt;

use crate::graph::{ConstId, ConstValue, Graph, Node, ValueId};
use crate::infer::{needs_declared_type, output_types};
use crate::op::{EpilogueStep, Op};
use crate::print::{binary_name, unary_text};
use crate::schedule::Layout;
use crate::types::{TensorType, broadcast_shapes};

/// Where a problem is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Graph,
    Constant { id: ConstId, name: String },
    Node { index: usize, name: String },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Graph => f.write_str("graph"),
            Location::Constant { id, name } => write!(f, "constant {id} {name:?}"),
            Location::Node { index, name } => write!(f, "node {index} {name:?}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub location: Location,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// Every problem found, in graph order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for VerifyError {
    /// One problem per line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for VerifyError {}

/// How many of `node.inputs` the op itself takes; the rest are operands that only
/// epilogue steps read (a residual added after a convolution). They are the longest
/// run of trailing inputs that binary epilogue steps refer to, cut short so the op
/// keeps at least its minimum number of inputs.
pub fn op_input_count(node: &Node) -> usize {
    let read_by_epilogue =
        |i: usize| node.epilogue.iter().any(|s| matches!(s, EpilogueStep::Binary { operand, .. } if *operand == i));
    let min = min_op_inputs(&node.op);
    let mut n = node.inputs.len();
    while n > min && read_by_epilogue(n - 1) {
        n -= 1;
    }
    n
}

fn min_op_inputs(op: &Op) -> usize {
    match op {
        Op::Constant(_) => 0,
        Op::Unary(_)
        | Op::Cast { .. }
        | Op::Pool(_)
        | Op::Reduce { .. }
        | Op::ArgReduce { .. }
        | Op::Reshape
        | Op::Transpose { .. }
        | Op::Slice { .. }
        | Op::Pad { .. }
        | Op::Concat { .. }
        | Op::Broadcast
        | Op::Reorder
        | Op::Resample { .. } => 1,
        Op::Binary(_)
        | Op::RandomUniform { .. }
        | Op::MatMul
        | Op::Conv(_)
        | Op::ConvTranspose(_)
        | Op::Gather { .. }
        | Op::GatherElements { .. }
        | Op::PoolGrad(_)
        | Op::ConvWeightGrad(_) => 2,
        Op::Where => 3,
    }
}

/// How a value came to be, as seen walking the nodes in order.
#[derive(Clone, Copy, PartialEq)]
enum Definition {
    None,
    Input,
    Node(usize),
}

struct Checker<'g> {
    g: &'g Graph,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn report(&mut self, location: Location, message: String) {
        self.problems.push(Problem { location, message });
    }

    fn node_location(&self, index: usize) -> Location {
        Location::Node { index, name: self.g.nodes[index].name.clone() }
    }

    fn in_range(&self, v: ValueId) -> bool {
        v.index() < self.g.values.len()
    }

    fn out_of_range(&self, v: ValueId) -> String {
        format!("{v} is out of range (the graph has {} values)", self.g.values.len())
    }
}

/// Checks every invariant in the module doc and reports all violations.
pub fn verify(g: &Graph) -> Result<(), VerifyError> {
    let mut c = Checker { g, problems: Vec::new() };
    check_constants(&mut c);
    let mut defined = vec![Definition::None; g.values.len()];
    check_inputs(&mut c, &mut defined);
    // The first node defining each value, to tell "used too early" from "never defined".
    let mut first_definer = vec![None; g.values.len()];
    for (i, node) in g.nodes.iter().enumerate() {
        for &o in &node.outputs {
            if let Some(d) = first_definer.get_mut(o.index()) {
                d.get_or_insert(i);
            }
        }
    }
    let mut reported_undefined = vec![false; g.values.len()];
    for index in 0..g.nodes.len() {
        check_node_order(&mut c, index, &mut defined, &first_definer, &mut reported_undefined);
        check_node_types(&mut c, index);
        check_epilogue(&mut c, index);
    }
    check_layouts(&mut c);
    for (i, d) in defined.iter().enumerate() {
        if *d == Definition::None && !reported_undefined[i] && !g.outputs.contains(&ValueId(i as u32)) {
            c.report(Location::Graph, format!("%{i} is never defined (neither a graph input nor a node output)"));
        }
    }
    for &o in &g.outputs {
        if !c.in_range(o) {
            let m = format!("graph output {}", c.out_of_range(o));
            c.report(Location::Graph, m);
        } else if defined[o.index()] == Definition::None {
            c.report(Location::Graph, format!("graph output {o} is never defined"));
        }
    }
    if c.problems.is_empty() { Ok(()) } else { Err(VerifyError { problems: c.problems }) }
}

fn check_constants(c: &mut Checker) {
    for (i, k) in c.g.constants.iter().enumerate() {
        let location = || Location::Constant { id: ConstId(i as u32), name: k.name.clone() };
        let (dtype, len) = match &k.value {
            ConstValue::Splat(s) => (s.dtype(), None),
            ConstValue::Dense(d) => (d.dtype(), Some(d.len())),
        };
        if dtype != k.ty.dtype {
            c.report(location(), format!("holds {dtype} data but its type is {}", k.ty));
        }
        let numel = k.ty.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        match (numel, len) {
            (None, _) => c.report(location(), format!("type {} has more elements than fit in memory", k.ty)),
            (Some(n), Some(len)) if n != len => {
                c.report(location(), format!("holds {len} elements but its type {} has {n}", k.ty))
            }
            _ => {}
        }
    }
}

fn check_inputs(c: &mut Checker, defined: &mut [Definition]) {
    for (position, &v) in c.g.inputs.iter().enumerate() {
        if !c.in_range(v) {
            let m = format!("graph input {position}: {}", c.out_of_range(v));
            c.report(Location::Graph, m);
        } else if defined[v.index()] == Definition::Input {
            c.report(Location::Graph, format!("{v} is listed as a graph input more than once"));
        } else {
            defined[v.index()] = Definition::Input;
        }
    }
}

fn check_node_order(
    c: &mut Checker,
    index: usize,
    defined: &mut [Definition],
    first_definer: &[Option<usize>],
    reported_undefined: &mut [bool],
) {
    let node = &c.g.nodes[index];
    let here = c.node_location(index);
    if let Op::Constant(k) = node.op
        && k.index() >= c.g.constants.len()
    {
        c.report(here.clone(), format!("refers to constant {k}, but the graph has {} constants", c.g.constants.len()));
    }
    for (position, &v) in node.inputs.iter().enumerate() {
        if !c.in_range(v) {
            let m = format!("input {position}: {}", c.out_of_range(v));
            c.report(here.clone(), m);
            continue;
        }
        if defined[v.index()] != Definition::None {
            continue;
        }
        let message = match first_definer[v.index()] {
            Some(d) if d == index => format!("input {position}: uses its own output {v}"),
            Some(d) => {
                format!("input {position}: uses {v} before its definition by node {d} {:?} (nodes must be in topological order)", c.g.nodes[d].name)
            }
            None => {
                reported_undefined[v.index()] = true;
                format!("input {position}: uses {v}, which is never defined")
            }
        };
        c.report(here.clone(), message);
    }
    for &v in &node.outputs {
        if !c.in_range(v) {
            let m = format!("output {}", c.out_of_range(v));
            c.report(here.clone(), m);
            continue;
        }
        match defined[v.index()] {
            Definition::None => defined[v.index()] = Definition::Node(index),
            Definition::Input => c.report(here.clone(), format!("defines {v}, which is a graph input")),
            Definition::Node(d) if d == index => c.report(here.clone(), format!("defines {v} twice")),
            Definition::Node(d) => {
                let m = format!("defines {v}, already defined by node {d} {:?}", c.g.nodes[d].name);
                c.report(here.clone(), m)
            }
        }
    }
}

fn check_node_types(c: &mut Checker, index: usize) {
    let g = c.g;
    let node = &g.nodes[index];
    let all_in_range = node.inputs.iter().chain(&node.outputs).all(|&v| c.in_range(v));
    let constant_ok = !matches!(node.op, Op::Constant(k) if k.index() >= g.constants.len());
    if !all_in_range || !constant_ok {
        return; // already reported; the types cannot be looked up
    }
    let op_inputs: Vec<&TensorType> = node.inputs[..op_input_count(node)].iter().map(|&v| g.ty(v)).collect();
    let declared: Vec<TensorType> = node.outputs.iter().map(|&v| g.ty(v).clone()).collect();
    let needs_declared = needs_declared_type(&node.op);
    let given = needs_declared.then_some(declared.as_slice());
    match output_types(&node.op, &op_inputs, &g.constants, given) {
        Err(e) => c.report(c.node_location(index), format!("type error: {e}")),
        Ok(inferred) if !needs_declared && inferred != declared => {
            let m = format!("declares output type(s) [{}] but {} gives [{}]", list(&declared), node.op.mnemonic(), list(&inferred));
            c.report(c.node_location(index), m);
        }
        Ok(_) => {}
    }
}

fn list(types: &[TensorType]) -> String {
    types.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
}

fn check_epilogue(c: &mut Checker, index: usize) {
    let g = c.g;
    let node = &g.nodes[index];
    if node.epilogue.is_empty() {
        return;
    }
    let Some(&out) = node.outputs.first() else {
        c.report(c.node_location(index), "has an epilogue but no outputs".into());
        return;
    };
    if !c.in_range(out) {
        return; // already reported
    }
    let out_ty = g.ty(out);
    for (k, step) in node.epilogue.iter().enumerate() {
        let problem = match step {
            EpilogueStep::Unary(f) => {
                let step_text = unary_text(*f);
                match output_types(&Op::Unary(*f), &[out_ty], &g.constants, None) {
                    Ok(_) => None,
                    Err(_) => Some(format!("epilogue step {k} ({step_text}) is not defined on {}", out_ty.dtype)),
                }
            }
            EpilogueStep::Binary { func, operand } => {
                let step_text = format!("{}(input={operand})", binary_name(*func));
                match node.inputs.get(*operand) {
                    None => Some(format!(
                        "epilogue step {k} ({step_text}): operand index {operand} is out of range (the node has {} inputs)",
                        node.inputs.len()
                    )),
                    Some(&v) if !c.in_range(v) => None, // already reported
                    Some(&v) => {
                        let operand_ty = g.ty(v);
                        if operand_ty.dtype != out_ty.dtype {
                            Some(format!(
                                "epilogue step {k} ({step_text}): operand {v} is {}, output 0 is {}",
                                operand_ty.dtype, out_ty.dtype
                            ))
                        } else if broadcast_shapes(&out_ty.shape, &operand_ty.shape).as_ref() != Some(&out_ty.shape) {
                            Some(format!(
                                "epilogue step {k} ({step_text}): operand {v} {operand_ty} does not broadcast to output 0 {out_ty}"
                            ))
                        } else {
                            match output_types(&Op::Binary(*func), &[out_ty, operand_ty], &g.constants, None) {
                                Err(e) => Some(format!("epilogue step {k} ({step_text}): {e}")),
                                Ok(t) if t[0].dtype != out_ty.dtype => Some(format!(
                                    "epilogue step {k} ({step_text}) would change output 0's dtype from {} to {}",
                                    out_ty.dtype, t[0].dtype
                                )),
                                Ok(_) => None,
                            }
                        }
                    }
                }
            }
        };
        if let Some(m) = problem {
            c.report(c.node_location(index), m);
        }
    }
}

/// Whether a value of `ty` has the same bytes in every layout: rank 4 with all spatial
/// extents 1 ([N, C, 1, 1]: global-pooling outputs, squeeze-excite vectors).
pub fn is_layout_free(ty: &TensorType) -> bool {
    ty.rank() == 4 && ty.shape[2..].iter().all(|&d| d == 1)
}

/// Whether `node.inputs[i]` is one of the node's data operands, the ones read in the
/// node's `layout_in`: operand 0 of a convolution, pooling, reduction or reorder; an
/// elementwise op's operands of the output's shape; epilogue operands of the output's
/// shape. Every other operand (weights, biases, broadcasts) is read Plain.
pub fn is_data_operand(g: &Graph, node: &Node, i: usize) -> bool {
    let Some(&out) = node.outputs.first() else { return false };
    let same_shape_as_output = || node.inputs.get(i).is_some_and(|&v| g.ty(v).shape == g.ty(out).shape);
    let by_op = match node.op {
        Op::Conv(_) | Op::Pool(_) | Op::Reduce { .. } | Op::Reorder => i == 0,
        // Its pieces: a blocked channel concat is per image the blocks of each piece in turn.
        Op::Concat { .. } => i < op_input_count(node),
        Op::Unary(_) | Op::Binary(_) | Op::Where | Op::Cast { .. } => i < op_input_count(node) && same_shape_as_output(),
        _ => false,
    };
    let by_epilogue = node
        .epilogue
        .iter()
        .any(|s| matches!(s, EpilogueStep::Binary { operand, .. } if *operand == i));
    by_op || (by_epilogue && same_shape_as_output())
}

fn layout_text(l: Layout) -> String {
    match l {
        Layout::Plain => "plain".into(),
        Layout::Blocked { block } => format!("blocked({block})"),
    }
}

/// Layout rules: Blocked{b} only on rank-4 f32 values whose channel count is a
/// multiple of b > 0; data operands (`is_data_operand`) are in the node's `layout_in`,
/// every other operand Plain, unless the value is layout-free; only a Reorder changes
/// the layout (its `layout_in` and `layout_out` differ), and a convolution from Plain to
/// Blocked (a stem, without binary epilogue operands); graph outputs are not Blocked
/// unless layout-free. Skips what the other checks already reported (ids out of range).
fn check_layouts(c: &mut Checker) {
    let g = c.g;
    let mut layout_of = vec![Layout::Plain; g.values.len()];
    for (index, node) in g.nodes.iter().enumerate() {
        if node.inputs.iter().chain(&node.outputs).any(|&v| !c.in_range(v)) {
            continue;
        }
        let s = &node.schedule;
        let here = || Location::Node { index, name: node.name.clone() };
        for (i, &v) in node.inputs.iter().enumerate() {
            let ty = g.ty(v);
            let have = layout_of[v.index()];
            let (want, role) = if is_data_operand(g, node, i) {
                (s.layout_in, "data operand")
            } else {
                (Layout::Plain, "operand")
            };
            if have != want && !is_layout_free(ty) {
                c.report(
                    here(),
                    format!(
                        "{role} {i} ({v} {ty}) is {} but the node reads it {}",
                        layout_text(have),
                        layout_text(want)
                    ),
                );
            }
        }
        if matches!(node.op, Op::Reorder) {
            if s.layout_in == s.layout_out {
                c.report(here(), format!("reorder from {} to the same layout", layout_text(s.layout_in)));
            }
        } else if matches!(node.op, Op::Conv(_)) && s.layout_in == Layout::Plain && matches!(s.layout_out, Layout::Blocked { .. }) {
            // A stem convolution reads its few input channels plain and writes blocked
            // (a direct kernel's output tiles are blocks whatever it reads).
            if node.epilogue.iter().any(|e| matches!(e, EpilogueStep::Binary { .. })) {
                c.report(here(), "a convolution from plain to blocked takes no binary epilogue operands".to_string());
            }
        } else if s.layout_in != s.layout_out {
            c.report(
                here(),
                format!(
                    "changes the layout from {} to {} (only a reorder may)",
                    layout_text(s.layout_in),
                    layout_text(s.layout_out)
                ),
            );
        }
        for &o in &node.outputs {
            let ty = g.ty(o);
            if let Layout::Blocked { block } = s.layout_out {
                let fits = block > 0
                    && ty.rank() == 4
                    && ty.dtype == crate::types::DType::F32
                    && ty.shape[1] % block as usize == 0;
                if !fits {
                    c.report(
                        here(),
                        format!("output {o} {ty} cannot be blocked({block}) (needs rank-4 f32 with channels a multiple of {block})"),
                    );
                }
            }
            layout_of[o.index()] = s.layout_out;
        }
    }
    for &o in &g.outputs {
        if c.in_range(o) && layout_of[o.index()] != Layout::Plain && !is_layout_free(g.ty(o)) {
            c.report(Location::Graph, format!("graph output {o} {} is {}; graph outputs must be plain", g.ty(o), layout_text(layout_of[o.index()])));
        }
    }
}
