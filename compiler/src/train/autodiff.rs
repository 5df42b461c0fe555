//! Reverse-mode automatic differentiation as a graph transformation: the backward nodes are
//! appended to the forward graph, so the result is one graph that computes both.
//!
//! The gradient of every op is a rule (one function per op family in `rules_*`) that builds
//! the input gradients from the output gradient with ordinary IR ops; a value read by
//! several nodes receives the sum of their contributions.

use std::collections::HashMap;

use cnnc_ir::{BinaryFn, DType, Graph, Node, Op, ReduceKind, Scalar, Tensor, TensorData, TensorType, UnaryFn, ValueId};

use super::{rules_elementwise, rules_layout, rules_window};

/// Appends to `g` the nodes computing d(objective)/d(v) for every `v` in `wrt`, where the
/// objective is Σ over `seeds` (value, gradient of the objective with respect to that value).
/// A seed gradient must have its value's type. Returns one gradient value per `wrt` entry
/// (a zero constant where the objective does not depend on it).
pub fn backward(g: &mut Graph, seeds: &[(ValueId, ValueId)], wrt: &[ValueId]) -> Result<Vec<ValueId>, String> {
    for &(v, seed) in seeds {
        if g.ty(v) != g.ty(seed) {
            return Err(format!("seed gradient {seed} has type {} but {v} has type {}", g.ty(seed), g.ty(v)));
        }
    }
    for &v in wrt {
        if g.ty(v).dtype != DType::F32 {
            return Err(format!("cannot differentiate with respect to {v} of type {}", g.ty(v)));
        }
    }
    let requires = requires_grad(g, wrt);
    let forward: Vec<Node> = g.nodes.clone();
    let producers = g.producers();
    let mut b = Builder { g };
    let mut grads: HashMap<ValueId, ValueId> = HashMap::new();
    for &(v, seed) in seeds {
        accumulate(&mut b, &mut grads, v, seed)?;
    }
    for node in forward.iter().rev() {
        let needs: Vec<bool> = node.inputs.iter().map(|v| requires[v.index()]).collect();
        if !needs.iter().any(|&n| n) {
            continue;
        }
        let [out] = node.outputs[..] else { continue };
        let Some(&gy) = grads.get(&out) else { continue };
        if !node.epilogue.is_empty() {
            return Err(format!(
                "node '{}' has a fused epilogue; differentiate the graph before fusion passes",
                node.name
            ));
        }
        // Standardisation (BatchNorm and friends) as one rule: fewer passes over the
        // activations and no cancellation through the variance's square.
        if let Some(standardized) = rules_elementwise::match_standardize(&forward, &producers, node) {
            if requires[standardized.x.index()] {
                let dx = rules_elementwise::grad_standardize(&mut b, &standardized, gy)
                    .map_err(|e| format!("gradient of standardisation '{}': {e}", node.name))?;
                accumulate(&mut b, &mut grads, standardized.x, dx)?;
            }
            continue;
        }
        let input_grads = input_gradients(&mut b, node, gy, &needs)
            .map_err(|e| format!("gradient of node '{}' ({}): {e}", node.name, node.op.mnemonic()))?;
        for ((&input, grad), &need) in node.inputs.iter().zip(input_grads).zip(&needs) {
            if let (Some(grad), true) = (grad, need) {
                if b.g.ty(grad) != b.g.ty(input) {
                    return Err(format!(
                        "internal error: gradient rule of node '{}' ({}) made {} for an input of type {}",
                        node.name,
                        node.op.mnemonic(),
                        b.g.ty(grad),
                        b.g.ty(input)
                    ));
                }
                accumulate(&mut b, &mut grads, input, grad)?;
            }
        }
    }
    wrt.iter()
        .map(|&v| match grads.get(&v) {
            Some(&grad) => Ok(grad),
            None => {
                let shape = b.g.ty(v).shape.clone();
                b.zeros(&shape)
            }
        })
        .collect()
}

/// Which values depend on a value in `wrt` through float data.
fn requires_grad(g: &Graph, wrt: &[ValueId]) -> Vec<bool> {
    let mut requires = vec![false; g.values.len()];
    for &v in wrt {
        requires[v.index()] = true;
    }
    for node in &g.nodes {
        let differentiable = !matches!(node.op, Op::ArgReduce { .. } | Op::Constant(_));
        if differentiable && node.inputs.iter().any(|v| requires[v.index()]) {
            for &o in &node.outputs {
                requires[o.index()] = g.ty(o).dtype == DType::F32;
            }
        }
    }
    requires
}

fn accumulate(b: &mut Builder, grads: &mut HashMap<ValueId, ValueId>, v: ValueId, grad: ValueId) -> Result<(), String> {
    let sum = match grads.get(&v) {
        Some(&earlier) => {
            // A contribution a rule broadcast (a mean's or a sum's gradient) is added
            // unbroadcast -- Add broadcasts it in registers -- so the full-size copy is
            // never written (dead code removes the Broadcast).
            let (earlier, grad) = match (broadcast_source(b, earlier), broadcast_source(b, grad)) {
                (_, Some(small)) => (earlier, small),
                (Some(small), None) => (grad, small),
                (None, None) => (earlier, grad),
            };
            b.binary(BinaryFn::Add, earlier, grad)?
        }
        None => grad,
    };
    grads.insert(v, sum);
    Ok(())
}

/// The input of the Broadcast node that made `v`, if a Broadcast made it.
fn broadcast_source(b: &Builder, v: ValueId) -> Option<ValueId> {
    let node = b.g.nodes.iter().rev().find(|n| n.outputs.contains(&v))?;
    match (&node.op, node.inputs.as_slice(), node.epilogue.is_empty()) {
        (Op::Broadcast, [x], true) => Some(*x),
        _ => None,
    }
}

/// The gradient rule table: one entry per op.
fn input_gradients(b: &mut Builder, node: &Node, gy: ValueId, needs: &[bool]) -> Result<Vec<Option<ValueId>>, String> {
    match &node.op {
        Op::Unary(f) => rules_elementwise::grad_unary(b, *f, node, gy),
        Op::Binary(f) => rules_elementwise::grad_binary(b, *f, node, gy, needs),
        Op::Where => rules_elementwise::grad_where(b, node, gy),
        Op::Cast { to } => rules_elementwise::grad_cast(b, *to, node, gy),
        Op::MatMul => rules_elementwise::grad_matmul(b, node, gy, needs),
        Op::Reduce { kind, axes } => rules_elementwise::grad_reduce(b, *kind, axes, node, gy),
        Op::Conv(geometry) => rules_window::grad_conv(b, geometry, node, gy, needs),
        Op::ConvTranspose(geometry) => rules_window::grad_conv_transpose(b, geometry, node, gy, needs),
        Op::Pool(attrs) => rules_window::grad_pool(b, attrs, node, gy),
        Op::Reshape => rules_layout::grad_reshape(b, node, gy),
        Op::Transpose { perm } => rules_layout::grad_transpose(b, perm, gy),
        Op::Slice { starts, steps } => rules_layout::grad_slice(b, starts, steps, node, gy),
        Op::Pad { begins, ends, mode } => rules_layout::grad_pad(b, begins, ends, mode, gy),
        Op::Concat { axis } => rules_layout::grad_concat(b, *axis, node, gy, needs),
        Op::Broadcast => rules_layout::grad_broadcast(b, node, gy),
        // Constant, ArgReduce, Gather, GatherElements, Resample, and ops added later until
        // they get a rule.
        op => Err(format!("no gradient rule for {}", op.mnemonic())),
    }
}

/// Appends typed nodes for the gradient rules; every helper checks types via the IR's
/// typing rules, so a wrong rule is an error, not a miscomputation.
pub(crate) struct Builder<'g> {
    pub g: &'g mut Graph,
}

impl Builder<'_> {
    pub fn shape(&self, v: ValueId) -> Vec<usize> {
        self.g.ty(v).shape.clone()
    }

    pub fn push(&mut self, op: Op, inputs: &[ValueId]) -> Result<ValueId, String> {
        let name = format!("grad.{}", op.mnemonic());
        self.g.push1(name, op, inputs)
    }

    pub fn push_typed(&mut self, op: Op, inputs: &[ValueId], ty: TensorType) -> Result<ValueId, String> {
        let name = format!("grad.{}", op.mnemonic());
        self.g.push_typed(name, op, inputs, ty)
    }

    pub fn unary(&mut self, f: UnaryFn, x: ValueId) -> Result<ValueId, String> {
        self.push(Op::Unary(f), &[x])
    }

    pub fn binary(&mut self, f: BinaryFn, a: ValueId, b: ValueId) -> Result<ValueId, String> {
        self.push(Op::Binary(f), &[a, b])
    }

    pub fn scale(&mut self, x: ValueId, factor: f32) -> Result<ValueId, String> {
        self.unary(UnaryFn::Affine { scale: factor, shift: 0.0 }, x)
    }

    pub fn select(&mut self, cond: ValueId, x: ValueId, y: ValueId) -> Result<ValueId, String> {
        self.push(Op::Where, &[cond, x, y])
    }

    pub fn constant(&mut self, tensor: Tensor) -> ValueId {
        self.g.add_constant("grad.const", tensor)
    }

    /// A rank-0 f32 constant (broadcasts against anything).
    pub fn scalar(&mut self, value: f32) -> ValueId {
        self.constant(Tensor::f32(Vec::<usize>::new(), vec![value]))
    }

    pub fn zeros(&mut self, shape: &[usize]) -> Result<ValueId, String> {
        let count = shape.iter().product();
        Ok(self.constant(Tensor::new(shape.to_vec(), TensorData::splat(Scalar::F32(0.0), count))))
    }

    /// `cond ? g : 0`.
    pub fn mask(&mut self, cond: ValueId, g: ValueId) -> Result<ValueId, String> {
        let zero = self.scalar(0.0);
        self.select(cond, g, zero)
    }

    pub fn reshape(&mut self, x: ValueId, shape: &[usize]) -> Result<ValueId, String> {
        if self.shape(x) == shape {
            return Ok(x);
        }
        let dtype = self.g.ty(x).dtype;
        self.push_typed(Op::Reshape, &[x], TensorType::new(dtype, shape.to_vec()))
    }

    pub fn transpose(&mut self, x: ValueId, perm: Vec<usize>) -> Result<ValueId, String> {
        if perm.iter().enumerate().all(|(i, &p)| i == p) {
            return Ok(x);
        }
        self.push(Op::Transpose { perm }, &[x])
    }

    pub fn broadcast_to(&mut self, x: ValueId, shape: &[usize]) -> Result<ValueId, String> {
        if self.shape(x) == shape {
            return Ok(x);
        }
        let dtype = self.g.ty(x).dtype;
        self.push_typed(Op::Broadcast, &[x], TensorType::new(dtype, shape.to_vec()))
    }

    pub fn reduce_sum(&mut self, x: ValueId, axes: Vec<usize>) -> Result<ValueId, String> {
        if axes.is_empty() {
            return Ok(x);
        }
        self.push(Op::Reduce { kind: ReduceKind::Sum, axes }, &[x])
    }

    /// The adjoint of numpy broadcasting: sums `x` over the axes along which `target` was
    /// broadcast to `x`'s shape.
    pub fn sum_to_shape(&mut self, x: ValueId, target: &[usize]) -> Result<ValueId, String> {
        let shape = self.shape(x);
        if shape == target {
            return Ok(x);
        }
        let lead = shape
            .len()
            .checked_sub(target.len())
            .ok_or_else(|| format!("cannot sum {shape:?} down to the longer shape {target:?}"))?;
        let axes: Vec<usize> =
            (0..shape.len()).filter(|&i| i < lead || (target[i - lead] == 1 && shape[i] != 1)).collect();
        let summed = self.reduce_sum(x, axes)?;
        self.reshape(summed, target)
    }
}
