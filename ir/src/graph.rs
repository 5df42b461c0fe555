//! The tensor graph: values, nodes in topological order, constants held apart.

use std::fmt;

use crate::op::{EpilogueStep, Op};
use crate::schedule::Schedule;
use crate::types::{Scalar, Tensor, TensorData, TensorType};

/// Index of a value in `Graph::values`; printed `%N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

/// Index of a constant in `Graph::constants`; printed `@N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConstId(pub u32);

impl ValueId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl ConstId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

impl fmt::Display for ConstId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "@{}", self.0)
    }
}

/// A value's static type and, for graph inputs/outputs and debugging, its source name.
#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    pub ty: TensorType,
    /// The ONNX tensor name where there is one; may be empty.
    pub name: String,
}

/// Constant payload: a splat is one value, never stored element by element.
#[derive(Clone, Debug, PartialEq)]
pub enum ConstValue {
    Splat(Scalar),
    Dense(TensorData),
}

/// A weight or folded constant, kept out of the node list so passes and dumps
/// see structure, not megabytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Constant {
    pub name: String,
    pub ty: TensorType,
    pub value: ConstValue,
}

impl Constant {
    /// Builds a constant, storing a repeated value as a splat.
    pub fn from_tensor(name: impl Into<String>, t: Tensor) -> Constant {
        let ty = t.ty();
        let value = match t.data.as_splat() {
            Some(s) => ConstValue::Splat(s),
            None => ConstValue::Dense(t.data),
        };
        Constant { name: name.into(), ty, value }
    }

    pub fn to_tensor(&self) -> Tensor {
        let data = match &self.value {
            ConstValue::Splat(s) => TensorData::splat(*s, self.ty.numel()),
            ConstValue::Dense(d) => d.clone(),
        };
        Tensor::new(self.ty.shape.clone(), data)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// Source node name (ONNX) or a pass-made name; for messages and dumps.
    pub name: String,
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
    /// Fused elementwise steps applied to output 0 before it is stored.
    pub epilogue: Vec<EpilogueStep>,
    pub schedule: Schedule,
}

/// A graph in static single assignment form: every value is defined once, by a graph
/// input or a node output, and nodes are in topological order.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Graph {
    pub name: String,
    pub values: Vec<Value>,
    pub constants: Vec<Constant>,
    pub nodes: Vec<Node>,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph { name: name.into(), ..Default::default() }
    }

    pub fn value(&self, v: ValueId) -> &Value {
        &self.values[v.index()]
    }

    pub fn ty(&self, v: ValueId) -> &TensorType {
        &self.values[v.index()].ty
    }

    pub fn constant(&self, c: ConstId) -> &Constant {
        &self.constants[c.index()]
    }

    pub fn add_value(&mut self, ty: TensorType, name: impl Into<String>) -> ValueId {
        self.values.push(Value { ty, name: name.into() });
        ValueId((self.values.len() - 1) as u32)
    }

    pub fn add_input(&mut self, ty: TensorType, name: impl Into<String>) -> ValueId {
        let v = self.add_value(ty, name);
        self.inputs.push(v);
        v
    }

    /// Adds a constant and the `Constant` node that makes it a value.
    pub fn add_constant(&mut self, name: impl Into<String>, t: Tensor) -> ValueId {
        let name = name.into();
        let c = Constant::from_tensor(name.clone(), t);
        let ty = c.ty.clone();
        self.constants.push(c);
        let id = ConstId((self.constants.len() - 1) as u32);
        let out = self.add_value(ty, name.clone());
        self.nodes.push(Node {
            name,
            op: Op::Constant(id),
            inputs: vec![],
            outputs: vec![out],
            epilogue: vec![],
            schedule: Schedule::default(),
        });
        out
    }

    /// Appends a node whose output types are given; see `crate::infer` for the
    /// checked, type-inferring way (`Graph::push`).
    pub fn add_node_typed(
        &mut self,
        name: impl Into<String>,
        op: Op,
        inputs: Vec<ValueId>,
        output_types: Vec<TensorType>,
    ) -> Vec<ValueId> {
        let name = name.into();
        let outputs: Vec<ValueId> =
            output_types.into_iter().map(|t| self.add_value(t, String::new())).collect();
        self.nodes.push(Node {
            name,
            op,
            inputs,
            outputs: outputs.clone(),
            epilogue: vec![],
            schedule: Schedule::default(),
        });
        outputs
    }

    /// For each value, the index of the node defining it (None for graph inputs).
    pub fn producers(&self) -> Vec<Option<usize>> {
        let mut p = vec![None; self.values.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for &o in &n.outputs {
                p[o.index()] = Some(i);
            }
        }
        p
    }

    /// For each value, the indices of the nodes reading it (a node reading twice appears twice).
    pub fn users(&self) -> Vec<Vec<usize>> {
        let mut u = vec![Vec::new(); self.values.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for &v in &n.inputs {
                u[v.index()].push(i);
            }
        }
        u
    }

    /// The constant behind a value, if a `Constant` node defines it.
    pub fn constant_of(&self, v: ValueId) -> Option<&Constant> {
        self.nodes.iter().find_map(|n| match n.op {
            Op::Constant(c) if n.outputs[0] == v => Some(self.constant(c)),
            _ => None,
        })
    }

    /// Drops nodes whose outputs nobody needs, then unreferenced constants and values,
    /// renumbering ids densely (in order, so dumps stay stable).
    pub fn remove_dead(&mut self) {
        let mut live = vec![false; self.values.len()];
        for &o in &self.outputs {
            live[o.index()] = true;
        }
        let mut keep = vec![false; self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate().rev() {
            if n.outputs.iter().any(|o| live[o.index()]) {
                keep[i] = true;
                for &v in &n.inputs {
                    live[v.index()] = true;
                }
            }
        }
        for &v in &self.inputs {
            live[v.index()] = true;
        }
        let mut i = 0;
        self.nodes.retain(|_| {
            i += 1;
            keep[i - 1]
        });
        for n in &self.nodes {
            for &o in &n.outputs {
                live[o.index()] = true;
            }
        }
        // Renumber values.
        let mut map = vec![u32::MAX; self.values.len()];
        let mut values = Vec::new();
        for (old, v) in self.values.drain(..).enumerate() {
            if live[old] {
                map[old] = values.len() as u32;
                values.push(v);
            }
        }
        self.values = values;
        let remap = |v: &mut ValueId| v.0 = map[v.index()];
        self.inputs.iter_mut().for_each(remap);
        self.outputs.iter_mut().for_each(remap);
        for n in &mut self.nodes {
            n.inputs.iter_mut().for_each(remap);
            n.outputs.iter_mut().for_each(remap);
        }
        // Renumber constants.
        let mut used = vec![false; self.constants.len()];
        for n in &self.nodes {
            if let Op::Constant(c) = n.op {
                used[c.index()] = true;
            }
        }
        let mut cmap = vec![u32::MAX; self.constants.len()];
        let mut constants = Vec::new();
        for (old, c) in self.constants.drain(..).enumerate() {
            if used[old] {
                cmap[old] = constants.len() as u32;
                constants.push(c);
            }
        }
        self.constants = constants;
        for n in &mut self.nodes {
            if let Op::Constant(c) = &mut n.op {
                c.0 = cmap[c.index()];
            }
        }
    }
}
