//! Gradient rules of elementwise ops, MatMul and reductions.

use cnnc_ir::{BinaryFn, DType, Node, Op, ReduceKind, UnaryFn, ValueId};

use std::collections::HashSet;

use super::autodiff::Builder;

type Grads = Result<Vec<Option<ValueId>>, String>;

/// d/dx of y = f(x). Kinks follow PyTorch: ReLU and Clip pass the gradient only strictly
/// inside their linear range.
///
/// ReLU's and Clip's masks test the output y, not x (y > 0 exactly when x > 0, y inside
/// (min, max) exactly when x is, NaN fails both): y is kept for the next layer anyway,
/// so x dies at the activation, which then fuses into its convolution's epilogue.
pub fn grad_unary(b: &mut Builder, f: UnaryFn, node: &Node, gy: ValueId) -> Grads {
    let (x, y) = (node.inputs[0], node.outputs[0]);
    let dx = match f {
        UnaryFn::Neg => b.scale(gy, -1.0)?,
        UnaryFn::Affine { scale, .. } => b.scale(gy, scale)?,
        UnaryFn::Relu => {
            let zero = b.scalar(0.0);
            let positive = b.binary(BinaryFn::Greater, y, zero)?;
            b.mask(positive, gy)?
        }
        UnaryFn::LeakyRelu { alpha } => {
            let zero = b.scalar(0.0);
            let positive = b.binary(BinaryFn::Greater, x, zero)?;
            let leaked = b.scale(gy, alpha)?;
            b.select(positive, gy, leaked)?
        }
        UnaryFn::Clip { min, max } => {
            let (lo, hi) = (b.scalar(min), b.scalar(max));
            let above = b.binary(BinaryFn::Greater, y, lo)?;
            let below = b.binary(BinaryFn::Less, y, hi)?;
            let inside = b.binary(BinaryFn::And, above, below)?;
            b.mask(inside, gy)?
        }
        UnaryFn::Sigmoid => {
            // y·(1 − y)
            let one_minus = b.unary(UnaryFn::Affine { scale: -1.0, shift: 1.0 }, y)?;
            let slope = b.binary(BinaryFn::Mul, y, one_minus)?;
            b.binary(BinaryFn::Mul, gy, slope)?
        }
        UnaryFn::Tanh => {
            // 1 − y²
            let square = b.binary(BinaryFn::Mul, y, y)?;
            let slope = b.unary(UnaryFn::Affine { scale: -1.0, shift: 1.0 }, square)?;
            b.binary(BinaryFn::Mul, gy, slope)?
        }
        UnaryFn::Sqrt => {
            let twice = b.scale(y, 2.0)?;
            b.binary(BinaryFn::Div, gy, twice)?
        }
        UnaryFn::Exp => b.binary(BinaryFn::Mul, gy, y)?,
        UnaryFn::Log => b.binary(BinaryFn::Div, gy, x)?,
        UnaryFn::Reciprocal => {
            let square = b.binary(BinaryFn::Mul, y, y)?;
            let scaled = b.binary(BinaryFn::Mul, gy, square)?;
            b.scale(scaled, -1.0)?
        }
        UnaryFn::PowConst { exponent } => {
            let lowered = b.unary(UnaryFn::PowConst { exponent: exponent - 1.0 }, x)?;
            let slope = b.scale(lowered, exponent)?;
            b.binary(BinaryFn::Mul, gy, slope)?
        }
        UnaryFn::HardSwish => {
            // y = x·relu6(x + 3)/6: slope 0 below −3, 1 above 3, (2x + 3)/6 between (PyTorch).
            let (minus3, plus3) = (b.scalar(-3.0), b.scalar(3.0));
            let low = b.binary(BinaryFn::Less, x, minus3)?;
            let high = b.binary(BinaryFn::Greater, x, plus3)?;
            let slope = b.unary(UnaryFn::Affine { scale: 1.0 / 3.0, shift: 0.5 }, x)?;
            let middle = b.binary(BinaryFn::Mul, gy, slope)?;
            let upper = b.select(high, gy, middle)?;
            let zero = b.scalar(0.0);
            b.select(low, zero, upper)?
        }
        UnaryFn::Swish { alpha } => {
            // y = x·s, s = sigmoid(αx): dy/dx = s + αx·s·(1 − s) = s·(1 + αx·(1 − s)).
            let scaled = b.scale(x, alpha)?;
            let s = b.unary(UnaryFn::Sigmoid, scaled)?;
            let one_minus = b.unary(UnaryFn::Affine { scale: -1.0, shift: 1.0 }, s)?;
            let inner = b.binary(BinaryFn::Mul, scaled, one_minus)?;
            let inner = b.unary(UnaryFn::Affine { scale: 1.0, shift: 1.0 }, inner)?;
            let slope = b.binary(BinaryFn::Mul, s, inner)?;
            b.binary(BinaryFn::Mul, gy, slope)?
        }
        UnaryFn::Softplus => {
            let slope = b.unary(UnaryFn::Sigmoid, x)?;
            b.binary(BinaryFn::Mul, gy, slope)?
        }
        UnaryFn::Elu { alpha } => {
            // x > 0: 1; else α·eˣ = y + α.
            let zero = b.scalar(0.0);
            let positive = b.binary(BinaryFn::Greater, x, zero)?;
            let shifted = b.unary(UnaryFn::Affine { scale: 1.0, shift: alpha }, y)?;
            let negative_part = b.binary(BinaryFn::Mul, gy, shifted)?;
            b.select(positive, gy, negative_part)?
        }
        other => return Err(format!("no gradient rule for unary {other:?}")),
    };
    Ok(vec![Some(dx)])
}

/// Gradients of broadcasting binary ops, summed back to each operand's shape.
pub fn grad_binary(b: &mut Builder, f: BinaryFn, node: &Node, gy: ValueId, needs: &[bool]) -> Grads {
    let (x, w, y) = (node.inputs[0], node.inputs[1], node.outputs[0]);
    let (da, db) = match f {
        BinaryFn::Add => (Some(gy), Some(gy)),
        BinaryFn::Sub => (Some(gy), if needs[1] { Some(b.scale(gy, -1.0)?) } else { None }),
        BinaryFn::Mul => (
            if needs[0] { Some(b.binary(BinaryFn::Mul, gy, w)?) } else { None },
            if needs[1] { Some(b.binary(BinaryFn::Mul, gy, x)?) } else { None },
        ),
        BinaryFn::Div => {
            let da = b.binary(BinaryFn::Div, gy, w)?;
            // d(x/w)/dw = −y/w, so db = −da·y.
            let db = if needs[1] {
                let prod = b.binary(BinaryFn::Mul, da, y)?;
                Some(b.scale(prod, -1.0)?)
            } else {
                None
            };
            (Some(da), db)
        }
        BinaryFn::Max | BinaryFn::Min => {
            // Ties go to the first operand.
            let cmp = if f == BinaryFn::Max { BinaryFn::GreaterOrEqual } else { BinaryFn::LessOrEqual };
            let first = b.binary(cmp, x, w)?;
            let zero = b.scalar(0.0);
            (Some(b.select(first, gy, zero)?), Some(b.select(first, zero, gy)?))
        }
        BinaryFn::PRelu => {
            let zero = b.scalar(0.0);
            let negative = b.binary(BinaryFn::Less, x, zero)?;
            let da = if needs[0] {
                let leaked = b.binary(BinaryFn::Mul, gy, w)?;
                Some(b.select(negative, leaked, gy)?)
            } else {
                None
            };
            let db = if needs[1] {
                let prod = b.binary(BinaryFn::Mul, gy, x)?;
                Some(b.mask(negative, prod)?)
            } else {
                None
            };
            (da, db)
        }
        other => return Err(format!("no gradient rule for binary {other:?}")),
    };
    let out_shape = b.shape(y);
    let mut grads = Vec::new();
    for (operand, grad, need) in [(x, da, needs[0]), (w, db, needs[1])] {
        grads.push(match (grad, need) {
            (Some(grad), true) => {
                let target = b.shape(operand);
                let full = b.broadcast_to(grad, &out_shape)?;
                Some(b.sum_to_shape(full, &target)?)
            }
            _ => None,
        });
    }
    Ok(grads)
}

pub fn grad_where(b: &mut Builder, node: &Node, gy: ValueId) -> Grads {
    let (cond, x, y) = (node.inputs[0], node.inputs[1], node.inputs[2]);
    let out_shape = b.shape(node.outputs[0]);
    let zero = b.scalar(0.0);
    let to_x = b.select(cond, gy, zero)?;
    let to_y = b.select(cond, zero, gy)?;
    let mut grads = vec![None];
    for (operand, grad) in [(x, to_x), (y, to_y)] {
        let target = b.shape(operand);
        let full = b.broadcast_to(grad, &out_shape)?;
        grads.push(Some(b.sum_to_shape(full, &target)?));
    }
    Ok(grads)
}

pub fn grad_cast(b: &mut Builder, to: DType, node: &Node, gy: ValueId) -> Grads {
    let from = b.g.ty(node.inputs[0]).dtype;
    if from == DType::F32 && to == DType::F32 {
        return Ok(vec![Some(gy)]);
    }
    Ok(vec![None])
}

/// Y = A·B over the last two axes: dA = dY·Bᵀ, dB = Aᵀ·dY, each summed over broadcast
/// batch axes.
pub fn grad_matmul(b: &mut Builder, node: &Node, gy: ValueId, needs: &[bool]) -> Grads {
    let (a, w) = (node.inputs[0], node.inputs[1]);
    let swap_last = |rank: usize| -> Vec<usize> {
        let mut perm: Vec<usize> = (0..rank).collect();
        perm.swap(rank - 2, rank - 1);
        perm
    };
    let da = if needs[0] {
        let wt = b.transpose(w, swap_last(b.shape(w).len()))?;
        let full = b.push(Op::MatMul, &[gy, wt])?;
        let target = b.shape(a);
        Some(b.sum_to_shape(full, &target)?)
    } else {
        None
    };
    let dw = if needs[1] {
        let at = b.transpose(a, swap_last(b.shape(a).len()))?;
        let full = b.push(Op::MatMul, &[at, gy])?;
        let target = b.shape(w);
        Some(b.sum_to_shape(full, &target)?)
    } else {
        None
    };
    Ok(vec![da, dw])
}

/// Sum and Mean spread the gradient over the reduced axes; Max and Min give it to every
/// element equal to the result (ties share the full gradient each -- PyTorch's
/// amax/amin divide it instead; global max pooling with ties is the only visible case).
pub fn grad_reduce(b: &mut Builder, kind: ReduceKind, axes: &[usize], node: &Node, gy: ValueId) -> Grads {
    let (x, y) = (node.inputs[0], node.outputs[0]);
    let shape = b.shape(x);
    let dx = match kind {
        ReduceKind::Sum => b.broadcast_to(gy, &shape)?,
        ReduceKind::Mean => {
            let count: usize = axes.iter().map(|&a| shape[a]).product();
            let scaled = b.scale(gy, 1.0 / count.max(1) as f32)?;
            b.broadcast_to(scaled, &shape)?
        }
        ReduceKind::Max | ReduceKind::Min => {
            let hit = b.binary(BinaryFn::Equal, x, y)?;
            let spread = b.broadcast_to(gy, &shape)?;
            b.mask(hit, spread)?
        }
        ReduceKind::Prod => return Err("no gradient rule for a product reduction".into()),
    };
    Ok(vec![Some(dx)])
}

/// x̂ = (x − mean(x)) / sqrt(mean((x − mean(x))²) + ε) over `axes`, as the frontend lowers
/// BatchNormalization (training), InstanceNormalization and LayerNormalization.
pub struct Standardize {
    pub x: ValueId,
    pub axes: Vec<usize>,
    /// x̂ (the Div node's output) and the standard deviation it divides by.
    pub normalized: ValueId,
    pub std: ValueId,
}

/// `node` (a Div) as the last step of a standardisation of some x, with every intermediate
/// node in the frontend's form: Reduce mean → Sub → Mul (square) → Reduce mean (same axes)
/// → Affine(+ε) → Sqrt → Div.
pub fn match_standardize(forward: &[Node], producers: &[Option<usize>], node: &Node) -> Option<Standardize> {
    let made_by = |v: ValueId| producers.get(v.index()).copied().flatten().map(|i| &forward[i]).filter(|n| n.epilogue.is_empty());
    if node.op != Op::Binary(BinaryFn::Div) || !node.epilogue.is_empty() || node.inputs.len() != 2 {
        return None;
    }
    let (centered, std) = (node.inputs[0], node.inputs[1]);
    let sub = made_by(centered).filter(|n| n.op == Op::Binary(BinaryFn::Sub) && n.inputs.len() == 2)?;
    let (x, mean) = (sub.inputs[0], sub.inputs[1]);
    let mean_node = made_by(mean)?;
    let Op::Reduce { kind: ReduceKind::Mean, axes } = &mean_node.op else { return None };
    if mean_node.inputs[..] != [x] {
        return None;
    }
    let sqrt = made_by(std).filter(|n| n.op == Op::Unary(UnaryFn::Sqrt))?;
    let shifted = made_by(sqrt.inputs[0])?;
    let Op::Unary(UnaryFn::Affine { scale, shift }) = shifted.op else { return None };
    if scale != 1.0 || shift < 0.0 {
        return None;
    }
    let var_node = made_by(shifted.inputs[0])?;
    if var_node.op != (Op::Reduce { kind: ReduceKind::Mean, axes: axes.clone() }) {
        return None;
    }
    let square = made_by(var_node.inputs[0])?;
    if square.op != Op::Binary(BinaryFn::Mul) || square.inputs[..] != [centered, centered] {
        return None;
    }
    let distinct: HashSet<usize> = axes.iter().copied().collect();
    if distinct.len() != axes.len() {
        return None;
    }
    Some(Standardize { x, axes: axes.clone(), normalized: node.outputs[0], std })
}

/// dx of x̂ = standardize(x) for the output gradient g, with m = the count over the axes:
/// dx = (g − mean(g) − x̂·mean(g·x̂)) / σ — the mean and variance paths in closed form
/// (3 passes over g instead of the ~12 the chain rule takes op by op, and no cancellation
/// between the separately rounded mean and variance contributions).
///
/// x̂·mean(g·x̂) is made before g − mean(g), so epilogue fusion turns (g − mean(g)) − it,
/// then / σ, into one pass. (Folding the product into that pass too rounds differently,
/// which pushes one of mobile_tiny's ill-conditioned updates past PyTorch's tolerance.)
pub fn grad_standardize(b: &mut Builder, s: &Standardize, gy: ValueId) -> Result<ValueId, String> {
    if let Some(dx) = grad_scaled_standardize(b, s, gy)? {
        return Ok(dx);
    }
    let mean_g = b.push(Op::Reduce { kind: ReduceKind::Mean, axes: s.axes.clone() }, &[gy])?;
    let weighted = b.binary(BinaryFn::Mul, gy, s.normalized)?;
    let mean_gx = b.push(Op::Reduce { kind: ReduceKind::Mean, axes: s.axes.clone() }, &[weighted])?;
    let projected = b.binary(BinaryFn::Mul, s.normalized, mean_gx)?;
    let centered = b.binary(BinaryFn::Sub, gy, mean_g)?;
    let residual = b.binary(BinaryFn::Sub, centered, projected)?;
    b.binary(BinaryFn::Div, residual, s.std)
}

/// `grad_standardize` when the output gradient is g·γ with γ constant along the axes
/// (BatchNorm's scale: γ·x̂ + β): mean(g·γ) = γ·Σg/m and mean(g·γ·x̂) = γ·Σ(g·x̂)/m, and
/// Σg and Σ(g·x̂) are the sums the scale's and the shift's gradients take already (the
/// same nodes, merged by share-common-subexpressions). With γ factored out,
/// dx = ((x̂·(−Σ(g·x̂)/m) − Σg/m) + g)·(γ/σ): one chain that epilogue fusion makes a single
/// pass over x̂ and g (its per-channel operands are made before its first node), where the
/// general form takes five, and gy = g·γ is never stored. None for other gradients.
fn grad_scaled_standardize(b: &mut Builder, s: &Standardize, gy: ValueId) -> Result<Option<ValueId>, String> {
    let Some(product) = b.g.nodes.iter().rev().find(|n| n.outputs.contains(&gy)) else {
        return Ok(None);
    };
    if product.op != Op::Binary(BinaryFn::Mul) || product.inputs.len() != 2 || !product.epilogue.is_empty() {
        return Ok(None);
    }
    let (g, gamma) = (product.inputs[0], product.inputs[1]);
    let (gy_shape, g_shape, gamma_shape) = (b.shape(gy), b.shape(g), b.shape(gamma));
    if g_shape != gy_shape || gamma_shape.len() > gy_shape.len() || b.g.ty(gamma).dtype != DType::F32 {
        return Ok(None);
    }
    let lead = gy_shape.len() - gamma_shape.len();
    let constant_along_axes = s.axes.iter().all(|&a| a < lead || gamma_shape[a - lead] == 1);
    if !constant_along_axes {
        return Ok(None);
    }
    let count: usize = s.axes.iter().map(|&a| gy_shape[a]).product();
    if count == 0 {
        return Ok(None);
    }
    let sum_g = b.push(Op::Reduce { kind: ReduceKind::Sum, axes: s.axes.clone() }, &[g])?;
    let weighted = b.binary(BinaryFn::Mul, g, s.normalized)?;
    let sum_gx = b.push(Op::Reduce { kind: ReduceKind::Sum, axes: s.axes.clone() }, &[weighted])?;
    let minus_mean_g = b.scale(sum_g, -1.0 / count as f32)?;
    let minus_mean_gx = b.scale(sum_gx, -1.0 / count as f32)?;
    let gain = b.binary(BinaryFn::Div, gamma, s.std)?;
    let projected = b.binary(BinaryFn::Mul, s.normalized, minus_mean_gx)?;
    let centered = b.binary(BinaryFn::Add, projected, minus_mean_g)?;
    let residual = b.binary(BinaryFn::Add, centered, g)?;
    b.binary(BinaryFn::Mul, residual, gain).map(Some)
}
