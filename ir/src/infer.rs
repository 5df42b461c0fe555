//! Typing rules: the output types of each op from its input types.
//!
//! Ops whose output shape is not a function of input types alone (`Reshape`,
//! `Broadcast`, `Slice`, `Pool`, `ConvTranspose`, `ConvWeightGrad`) take a declared output type and
//! this module checks that it is consistent.

use crate::graph::{Constant, Graph, ValueId};
use crate::op::{BinaryFn, Op, PadMode, UnaryFn};
use crate::types::{DType, TensorType, broadcast_shapes};

/// Whether `op`'s output type must be declared by whoever creates the node.
pub fn needs_declared_type(op: &Op) -> bool {
    matches!(
        op,
        Op::Reshape | Op::Broadcast | Op::Slice { .. } | Op::Pool(_) | Op::ConvTranspose(_) | Op::ConvWeightGrad(_)
    )
}

fn err<T>(msg: impl Into<String>) -> Result<T, String> {
    Err(msg.into())
}

fn arity(op: &Op, inputs: &[&TensorType], min: usize, max: usize) -> Result<(), String> {
    if inputs.len() < min || inputs.len() > max {
        return err(format!("{} takes {min}..={max} inputs, got {}", op.mnemonic(), inputs.len()));
    }
    Ok(())
}

fn same_dtype(a: &TensorType, b: &TensorType, what: &str) -> Result<(), String> {
    if a.dtype != b.dtype {
        return err(format!("{what}: dtype mismatch {} vs {}", a.dtype, b.dtype));
    }
    Ok(())
}

fn conv_out_dim(input: usize, k: usize, s: usize, d: usize, pb: usize, pe: usize) -> Result<usize, String> {
    // Checked: attributes come from files and must not overflow into a panic.
    let span = d.checked_mul(k - 1).and_then(|x| x.checked_add(1)).ok_or("window extent overflows")?;
    let padded = input.checked_add(pb).and_then(|x| x.checked_add(pe)).ok_or("padded extent overflows")?;
    if padded < span {
        return err(format!("window of extent {span} does not fit padded input {padded}"));
    }
    Ok((padded - span) / s + 1)
}

/// Output types of `op` applied to `inputs`. `declared` must be given for ops where
/// `needs_declared_type` holds, and when given for other ops it must match.
pub fn output_types(
    op: &Op,
    inputs: &[&TensorType],
    constants: &[Constant],
    declared: Option<&[TensorType]>,
) -> Result<Vec<TensorType>, String> {
    let decl = |n: usize| -> Result<&TensorType, String> {
        match declared {
            Some(d) if d.len() == n => Ok(&d[0]),
            Some(d) => err(format!("{} has {n} output(s), {} declared", op.mnemonic(), d.len())),
            None => err(format!("{} needs a declared output type", op.mnemonic())),
        }
    };
    let inferred: Vec<TensorType> = match op {
        Op::Constant(c) => {
            arity(op, inputs, 0, 0)?;
            match constants.get(c.index()) {
                Some(k) => vec![k.ty.clone()],
                None => return err(format!("constant {c} does not exist")),
            }
        }
        Op::Unary(f) => {
            arity(op, inputs, 1, 1)?;
            let x = inputs[0];
            let ok = match f {
                UnaryFn::Not => x.dtype == DType::Bool,
                UnaryFn::Neg | UnaryFn::Abs | UnaryFn::Relu | UnaryFn::Clip { .. } => x.dtype != DType::Bool,
                _ => x.dtype == DType::F32,
            };
            if !ok {
                return err(format!("unary {f:?} is not defined on {}", x.dtype));
            }
            vec![x.clone()]
        }
        Op::Binary(f) => {
            arity(op, inputs, 2, 2)?;
            let (a, b) = (inputs[0], inputs[1]);
            same_dtype(a, b, "binary")?;
            if f.is_logical() != (a.dtype == DType::Bool) && !(f.is_comparison() && *f == BinaryFn::Equal) {
                return err(format!("binary {f:?} is not defined on {}", a.dtype));
            }
            let shape = broadcast_shapes(&a.shape, &b.shape)
                .ok_or_else(|| format!("cannot broadcast {a} with {b}"))?;
            let dtype = if f.is_comparison() { DType::Bool } else { a.dtype };
            vec![TensorType::new(dtype, shape)]
        }
        Op::Where => {
            arity(op, inputs, 3, 3)?;
            if inputs[0].dtype != DType::Bool {
                return err("where: condition must be bool");
            }
            same_dtype(inputs[1], inputs[2], "where")?;
            let s = broadcast_shapes(&inputs[0].shape, &inputs[1].shape)
                .and_then(|s| broadcast_shapes(&s, &inputs[2].shape))
                .ok_or("where: operands do not broadcast")?;
            vec![TensorType::new(inputs[1].dtype, s)]
        }
        Op::Cast { to } => {
            arity(op, inputs, 1, 1)?;
            vec![TensorType::new(*to, inputs[0].shape.clone())]
        }
        Op::MatMul => {
            arity(op, inputs, 2, 2)?;
            let (a, b) = (inputs[0], inputs[1]);
            same_dtype(a, b, "matmul")?;
            if a.rank() < 2 || b.rank() < 2 {
                return err("matmul operands must have rank >= 2");
            }
            let (m, k) = (a.shape[a.rank() - 2], a.shape[a.rank() - 1]);
            let (k2, n) = (b.shape[b.rank() - 2], b.shape[b.rank() - 1]);
            if k != k2 {
                return err(format!("matmul: inner dimensions differ ({a} x {b})"));
            }
            let mut s = broadcast_shapes(&a.shape[..a.rank() - 2], &b.shape[..b.rank() - 2])
                .ok_or_else(|| format!("matmul: batch dims of {a} and {b} do not broadcast"))?;
            s.push(m);
            s.push(n);
            vec![TensorType::new(a.dtype, s)]
        }
        Op::Conv(g) => {
            arity(op, inputs, 2, 3)?;
            let (x, w) = (inputs[0], inputs[1]);
            let r = x.rank();
            check_geometry(g, r, w)?;
            if x.shape[1] != w.shape[1] * g.groups || w.shape[0] % g.groups != 0 {
                return err(format!("conv: input {x} and weight {w} disagree for groups={}", g.groups));
            }
            if let Some(b) = inputs.get(2) {
                if b.shape != [w.shape[0]] {
                    return err(format!("conv: bias {b} must be [{}]", w.shape[0]));
                }
            }
            let mut s = vec![x.shape[0], w.shape[0]];
            for i in 0..r - 2 {
                s.push(conv_out_dim(x.shape[2 + i], w.shape[2 + i], g.strides[i], g.dilations[i], g.pads_begin[i], g.pads_end[i])?);
            }
            vec![TensorType::new(x.dtype, s)]
        }
        Op::ConvTranspose(g) => {
            arity(op, inputs, 2, 3)?;
            let (x, w) = (inputs[0], inputs[1]);
            check_geometry(g, x.rank(), w)?;
            let out = decl(1)?;
            let m = w.shape[1] * g.groups;
            if x.shape[1] != w.shape[0] || w.shape[0] % g.groups != 0 || out.rank() != x.rank() || out.shape[0] != x.shape[0] || out.shape[1] != m {
                return err(format!("conv_transpose: input {x}, weight {w}, output {out} disagree"));
            }
            vec![out.clone()]
        }
        Op::Pool(p) => {
            arity(op, inputs, 1, 1)?;
            let x = inputs[0];
            let k = x.rank().checked_sub(2).ok_or("pool input must have rank >= 3")?;
            if [p.kernel.len(), p.strides.len(), p.dilations.len(), p.pads_begin.len(), p.pads_end.len()] != [k; 5] {
                return err(format!("pool attributes must each have {k} entries"));
            }
            let out = decl(1)?;
            if out.rank() != x.rank() || out.shape[..2] != x.shape[..2] || out.dtype != x.dtype {
                return err(format!("pool: output {out} does not fit input {x}"));
            }
            vec![out.clone()]
        }
        Op::PoolGrad(p) => {
            arity(op, inputs, 2, 2)?;
            let (x, dy) = (inputs[0], inputs[1]);
            if p.kind != crate::op::PoolKind::Max {
                return err("pool_grad: only max pooling has a pool_grad (average pooling's gradient is a conv_transpose)");
            }
            let k = x.rank().checked_sub(2).ok_or("pool_grad input must have rank >= 3")?;
            if [p.kernel.len(), p.strides.len(), p.dilations.len(), p.pads_begin.len(), p.pads_end.len()] != [k; 5] {
                return err(format!("pool_grad attributes must each have {k} entries"));
            }
            if p.kernel.contains(&0) || p.strides.contains(&0) || p.dilations.contains(&0) {
                return err("pool_grad: zero kernel size, stride or dilation");
            }
            same_dtype(x, dy, "pool_grad")?;
            if x.dtype != DType::F32 || dy.rank() != x.rank() || dy.shape[..2] != x.shape[..2] {
                return err(format!("pool_grad: gradient {dy} does not fit f32 input {x}"));
            }
            vec![x.clone()]
        }
        Op::ConvWeightGrad(g) => {
            arity(op, inputs, 2, 2)?;
            let (x, dy) = (inputs[0], inputs[1]);
            let dw = decl(1)?;
            check_geometry(g, x.rank(), dw)?;
            same_dtype(x, dy, "conv_weight_grad")?;
            if dw.dtype != x.dtype || dy.rank() != x.rank() || dy.shape[0] != x.shape[0] {
                return err(format!("conv_weight_grad: input {x}, gradient {dy}, weight {dw} disagree"));
            }
            if x.shape[1] != dw.shape[1] * g.groups || dw.shape[0] != dy.shape[1] || dw.shape[0] % g.groups != 0 {
                return err(format!(
                    "conv_weight_grad: input {x}, gradient {dy} and weight {dw} disagree for groups={}",
                    g.groups
                ));
            }
            for i in 0..x.rank() - 2 {
                let want = conv_out_dim(x.shape[2 + i], dw.shape[2 + i], g.strides[i], g.dilations[i], g.pads_begin[i], g.pads_end[i])?;
                if want != dy.shape[2 + i] {
                    return err(format!("conv_weight_grad: gradient {dy} does not fit the convolution of {x} by {dw}"));
                }
            }
            vec![dw.clone()]
        }
        Op::Reduce { axes, .. } => {
            arity(op, inputs, 1, 1)?;
            let x = inputs[0];
            check_axes(axes, x.rank())?;
            let mut s = x.shape.clone();
            for &a in axes {
                s[a] = 1;
            }
            vec![TensorType::new(x.dtype, s)]
        }
        Op::ArgReduce { axis, .. } => {
            arity(op, inputs, 1, 1)?;
            let x = inputs[0];
            if *axis >= x.rank() || x.shape[*axis] == 0 {
                return err(format!("arg_reduce: axis {axis} invalid for {x}"));
            }
            let mut s = x.shape.clone();
            s[*axis] = 1;
            vec![TensorType::new(DType::I64, s)]
        }
        Op::Reshape => {
            arity(op, inputs, 1, 1)?;
            let out = decl(1)?;
            if out.numel() != inputs[0].numel() || out.dtype != inputs[0].dtype {
                return err(format!("reshape: {} cannot become {out}", inputs[0]));
            }
            vec![out.clone()]
        }
        Op::Transpose { perm } => {
            arity(op, inputs, 1, 1)?;
            let x = inputs[0];
            let mut seen = vec![false; x.rank()];
            if perm.len() != x.rank() || perm.iter().any(|&p| p >= x.rank() || std::mem::replace(&mut seen[p], true)) {
                return err(format!("transpose: {perm:?} is not a permutation of {} axes", x.rank()));
            }
            vec![TensorType::new(x.dtype, perm.iter().map(|&p| x.shape[p]).collect::<Vec<_>>())]
        }
        Op::Slice { starts, steps } => {
            arity(op, inputs, 1, 1)?;
            let x = inputs[0];
            let out = decl(1)?;
            if starts.len() != x.rank() || steps.len() != x.rank() || out.rank() != x.rank() || out.dtype != x.dtype {
                return err(format!("slice: attributes do not fit {x} -> {out}"));
            }
            for i in 0..x.rank() {
                if out.shape[i] == 0 {
                    continue;
                }
                let last = starts[i] as i128 + (out.shape[i] as i128 - 1) * steps[i] as i128;
                if steps[i] == 0 || starts[i] >= x.shape[i] || last < 0 || last >= x.shape[i] as i128 {
                    return err(format!("slice: axis {i} reads outside {x}"));
                }
            }
            vec![out.clone()]
        }
        Op::Pad { begins, ends, mode } => {
            arity(op, inputs, 1, 1)?;
            let x = inputs[0];
            if begins.len() != x.rank() || ends.len() != x.rank() {
                return err("pad: one begin and end per axis");
            }
            if let PadMode::Constant(v) = mode {
                if v.dtype() != x.dtype {
                    return err("pad: constant value dtype differs from input");
                }
            }
            let mut s = Vec::new();
            for i in 0..x.rank() {
                let n = x.shape[i] as i128 + begins[i] as i128 + ends[i] as i128;
                if n < 0 || n > isize::MAX as i128 {
                    return err(format!("pad: axis {i} would have negative extent"));
                }
                if !matches!(mode, PadMode::Constant(_)) && x.shape[i] == 0 && n > 0 {
                    return err(format!("pad: cannot {mode:?}-pad an empty axis"));
                }
                s.push(n as usize);
            }
            vec![TensorType::new(x.dtype, s)]
        }
        Op::Concat { axis } => {
            if inputs.is_empty() {
                return err("concat needs at least one input");
            }
            let x = inputs[0];
            if *axis >= x.rank() {
                return err("concat: axis out of range");
            }
            let mut s = x.shape.clone();
            s[*axis] = 0;
            for t in inputs {
                same_dtype(x, t, "concat")?;
                if t.rank() != x.rank() || (0..x.rank()).any(|i| i != *axis && t.shape[i] != x.shape[i]) {
                    return err(format!("concat: {t} does not match {x} off axis {axis}"));
                }
                s[*axis] += t.shape[*axis];
            }
            vec![TensorType::new(x.dtype, s)]
        }
        Op::Broadcast => {
            arity(op, inputs, 1, 1)?;
            let out = decl(1)?;
            if broadcast_shapes(&inputs[0].shape, &out.shape).as_ref() != Some(&out.shape) || out.dtype != inputs[0].dtype {
                return err(format!("broadcast: {} cannot broadcast to {out}", inputs[0]));
            }
            vec![out.clone()]
        }
        Op::Gather { axis } => {
            arity(op, inputs, 2, 2)?;
            let (d, i) = (inputs[0], inputs[1]);
            if *axis >= d.rank() || !i.dtype.is_int() {
                return err(format!("gather: bad axis {axis} or index dtype {}", i.dtype));
            }
            let mut s = d.shape[..*axis].to_vec();
            s.extend_from_slice(&i.shape);
            s.extend_from_slice(&d.shape[axis + 1..]);
            vec![TensorType::new(d.dtype, s)]
        }
        Op::GatherElements { axis } => {
            arity(op, inputs, 2, 2)?;
            let (d, i) = (inputs[0], inputs[1]);
            if *axis >= d.rank() || i.rank() != d.rank() || !i.dtype.is_int() {
                return err("gather_elements: bad axis, rank or index dtype");
            }
            vec![TensorType::new(d.dtype, i.shape.clone())]
        }
        Op::RandomUniform { .. } => {
            arity(op, inputs, 2, 2)?;
            let (x, step) = (inputs[0], inputs[1]);
            if step.dtype != DType::F32 || step.numel() != 1 {
                return err(format!("random_uniform: the step must be one f32, got {step}"));
            }
            vec![TensorType::new(DType::F32, x.shape.clone())]
        }
        Op::Reorder => {
            arity(op, inputs, 1, 1)?;
            vec![inputs[0].clone()]
        }
        Op::Resample { axis, lo, hi, weight_hi } => {
            arity(op, inputs, 1, 1)?;
            let x = inputs[0];
            if *axis >= x.rank() || lo.len() != hi.len() || lo.len() != weight_hi.len() || x.dtype != DType::F32 {
                return err("resample: bad axis, tables or dtype");
            }
            if lo.iter().chain(hi).any(|&i| i >= x.shape[*axis]) {
                return err("resample: table index out of range");
            }
            let mut s = x.shape.clone();
            s[*axis] = lo.len();
            vec![TensorType::new(x.dtype, s)]
        }
    };
    if let Some(d) = declared {
        if d != inferred.as_slice() {
            return err(format!(
                "{}: declared output type(s) {} differ from inferred {}",
                op.mnemonic(),
                list(d),
                list(&inferred)
            ));
        }
    }
    Ok(inferred)
}

fn list(ts: &[TensorType]) -> String {
    ts.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
}

fn check_axes(axes: &[usize], rank: usize) -> Result<(), String> {
    if axes.windows(2).any(|w| w[0] >= w[1]) || axes.iter().any(|&a| a >= rank) {
        return err(format!("axes {axes:?} must be sorted, unique and < {rank}"));
    }
    Ok(())
}

fn check_geometry(g: &crate::op::ConvGeometry, rank: usize, w: &TensorType) -> Result<(), String> {
    let k = rank.checked_sub(2).filter(|&k| k >= 1).ok_or("convolution input must have rank >= 3")?;
    if w.rank() != rank {
        return err(format!("convolution weight {w} must have rank {rank}"));
    }
    if [g.strides.len(), g.dilations.len(), g.pads_begin.len(), g.pads_end.len()] != [k; 4] {
        return err(format!("convolution attributes must each have {k} entries"));
    }
    if g.groups == 0 || g.strides.contains(&0) || g.dilations.contains(&0) || w.shape[2..].contains(&0) {
        return err("convolution: zero group count, stride, dilation or kernel size");
    }
    Ok(())
}

impl Graph {
    /// Appends a node, inferring its output types; fails with the typing error.
    pub fn push(&mut self, name: impl Into<String>, op: Op, inputs: &[ValueId]) -> Result<Vec<ValueId>, String> {
        let tys: Vec<&TensorType> = inputs.iter().map(|&v| self.ty(v)).collect();
        let out = output_types(&op, &tys, &self.constants, None)?;
        Ok(self.add_node_typed(name, op, inputs.to_vec(), out))
    }

    /// Appends a single-output node, inferring its type.
    pub fn push1(&mut self, name: impl Into<String>, op: Op, inputs: &[ValueId]) -> Result<ValueId, String> {
        Ok(self.push(name, op, inputs)?[0])
    }

    /// Appends a single-output node whose output type is declared (and checked).
    pub fn push_typed(&mut self, name: impl Into<String>, op: Op, inputs: &[ValueId], ty: TensorType) -> Result<ValueId, String> {
        let tys: Vec<&TensorType> = inputs.iter().map(|&v| self.ty(v)).collect();
        let out = output_types(&op, &tys, &self.constants, Some(std::slice::from_ref(&ty)))?;
        Ok(self.add_node_typed(name, op, inputs.to_vec(), out)[0])
    }
}
