//! Bookkeeping shared by the rewriting passes. A pass scans the node list by index,
//! records structural edits here, and applies them once at the end, so indices (and
//! "defined before" comparisons) stay valid during the scan.

use cnnc_ir::{ConstId, Constant, Graph, Node, Op, Tensor, ValueId};

/// How many times each value is read: once per node input slot (a node reading a
/// value twice counts twice) plus once per appearance among the graph outputs.
pub fn use_counts(g: &Graph) -> Vec<usize> {
    let mut uses = vec![0; g.values.len()];
    for n in &g.nodes {
        for &v in &n.inputs {
            uses[v.index()] += 1;
        }
    }
    for &o in &g.outputs {
        uses[o.index()] += 1;
    }
    uses
}

/// For each value, the constant a `Constant` node makes it, if any.
pub fn constants_by_value(g: &Graph) -> Vec<Option<ConstId>> {
    let mut by_value = vec![None; g.values.len()];
    for n in &g.nodes {
        if let Op::Constant(c) = n.op {
            by_value[n.outputs[0].index()] = Some(c);
        }
    }
    by_value
}

/// Node removals, insertions and constant-node moves, applied together.
pub struct NodeEdits {
    removed: Vec<bool>,
    /// New nodes to place right before the node at that index.
    inserted_before: Vec<Vec<Node>>,
    /// Constant nodes to move before the node at that index (the earliest wins).
    moved_before: Vec<Option<usize>>,
}

impl NodeEdits {
    pub fn new(g: &Graph) -> NodeEdits {
        let n = g.nodes.len();
        NodeEdits { removed: vec![false; n], inserted_before: vec![Vec::new(); n], moved_before: vec![None; n] }
    }

    pub fn remove(&mut self, node: usize) {
        self.removed[node] = true;
    }

    pub fn is_removed(&self, node: usize) -> bool {
        self.removed[node]
    }

    /// Adds constant `t` to the graph and a `Constant` node for it, placed before node
    /// `before`; returns the new value.
    pub fn add_constant_before(&mut self, g: &mut Graph, before: usize, name: String, t: Tensor) -> (ValueId, ConstId) {
        let constant = Constant::from_tensor(name.clone(), t);
        let ty = constant.ty.clone();
        g.constants.push(constant);
        let id = ConstId((g.constants.len() - 1) as u32);
        let value = g.add_value(ty, name.clone());
        let node = Node {
            name,
            op: Op::Constant(id),
            inputs: vec![],
            outputs: vec![value],
            epilogue: vec![],
            schedule: Default::default(),
        };
        self.inserted_before[before].push(node);
        (value, id)
    }

    /// Places `node` right before node `before` (after any inserted there earlier).
    pub fn insert_before(&mut self, before: usize, node: Node) {
        self.inserted_before[before].push(node);
    }

    /// Moves the `Constant` node at `node` before node `before` (a constant depends on
    /// nothing, so it may be defined anywhere earlier).
    pub fn move_constant_before(&mut self, node: usize, before: usize) {
        if before < node {
            let target = self.moved_before[node].map_or(before, |b| b.min(before));
            self.moved_before[node] = Some(target);
        }
    }

    /// Rebuilds the node list, then drops what nobody reads any more: the values that
    /// rewrites left undefined (a fused node's old output), the nodes made dead, and
    /// their constants.
    pub fn apply(self, g: &mut Graph) {
        let NodeEdits { removed, mut inserted_before, moved_before } = self;
        let old = std::mem::take(&mut g.nodes);
        let mut moved: Vec<Vec<usize>> = vec![Vec::new(); old.len()];
        for (node, target) in moved_before.iter().enumerate() {
            if let Some(t) = *target {
                moved[t].push(node);
            }
        }
        let mut slots: Vec<Option<Node>> = old.into_iter().map(Some).collect();
        let mut nodes = Vec::with_capacity(slots.len());
        for i in 0..slots.len() {
            for &m in &moved[i] {
                if let Some(n) = slots[m].take() {
                    nodes.push(n);
                }
            }
            nodes.append(&mut inserted_before[i]);
            if removed[i] {
                slots[i] = None;
            } else if let Some(n) = slots[i].take() {
                nodes.push(n);
            }
        }
        g.nodes = nodes;
        g.remove_dead();
        number_in_definition_order(g);
    }
}

/// Renumbers values so that ids grow down the dump (inputs, then node outputs in node
/// order), as the frontend numbers them; values defined nowhere keep their relative
/// order at the end.
fn number_in_definition_order(g: &mut Graph) {
    let mut order: Vec<ValueId> = g.inputs.clone();
    order.extend(g.nodes.iter().flat_map(|n| n.outputs.iter().copied()));
    let mut new_id = vec![None; g.values.len()];
    let mut next = 0u32;
    for v in order {
        if new_id[v.index()].is_none() {
            new_id[v.index()] = Some(ValueId(next));
            next += 1;
        }
    }
    for slot in new_id.iter_mut().filter(|s| s.is_none()) {
        *slot = Some(ValueId(next));
        next += 1;
    }
    let new_id: Vec<ValueId> = new_id.into_iter().map(|v| v.unwrap_or(ValueId(u32::MAX))).collect();
    let mut values = vec![None; g.values.len()];
    for (old, value) in g.values.drain(..).enumerate() {
        values[new_id[old].index()] = Some(value);
    }
    g.values = values.into_iter().flatten().collect();
    let map = |v: &mut ValueId| *v = new_id[v.index()];
    g.inputs.iter_mut().for_each(map);
    g.outputs.iter_mut().for_each(map);
    for n in &mut g.nodes {
        n.inputs.iter_mut().for_each(map);
        n.outputs.iter_mut().for_each(map);
    }
}
