//! Folds per-output-channel affine arithmetic that follows a convolution into the
//! convolution's weights and bias. The ONNX frontend lowers an inference
//! BatchNormalization to `mul` by a [C,1,1] scale and `add` of a [C,1,1] shift; after
//! a convolution both are free:
//!
//!   conv(x, W, b) * s + t  ==  conv(x, W * s[oc], b * s + t)
//!
//! so two full passes over the activation disappear. A following per-channel `add`
//! (or `sub`) alone becomes the bias; `mul` (or `div`) alone scales each output
//! channel's filter.
//!
//! The rewrite fires only when it cannot change what anyone else sees:
//! - the convolution (Conv or ConvTranspose) has constant f32 weights (and bias, if
//!   any), no epilogue, and its output is read by this one node and is not a graph
//!   output;
//! - the other operand is a constant that varies at most along the channel axis
//!   ([C,1,1], [1,C,1,1], [1], a splat of any broadcasting shape) with finite values
//!   (and no zero for `div`), and the result keeps the convolution's output shape;
//! - for `sub` and `div` the convolution is the left operand.

use cnnc_ir::{BinaryFn, ConstId, ConstValue, Constant, Graph, Op, Tensor, TensorData, ValueId};

use super::edit::{NodeEdits, constants_by_value, use_counts};
use super::{Pass, PassContext};

pub const PASS: Pass =
    Pass { name: "fold-batchnorm", summary: "fold per-channel mul/add after a conv into its weights and bias", run };

/// How the per-channel constant combines with the convolution's output.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fold {
    /// Multiply filter `oc` and bias `oc` by the factor.
    Scale,
    /// Add the term to bias `oc`.
    Shift,
}

/// One matched `conv -> binary` pair.
struct Match {
    conv: usize,
    fold: Fold,
    /// Per output channel, already turned into a factor (`div`: 1/c) or a term (`sub`: -c).
    per_channel: Vec<f32>,
}

/// The weight and bias constants a convolution received from this pass, so that a
/// second fold into the same convolution updates them instead of copying again.
#[derive(Clone, Copy)]
struct Owned {
    weight: ConstId,
    bias: Option<ConstId>,
}

fn run(g: &mut Graph, _: &PassContext) -> Result<(), String> {
    let uses = use_counts(g);
    let mut producer = g.producers();
    let mut constant_of = constants_by_value(g);
    let mut owned: Vec<Option<Owned>> = vec![None; g.nodes.len()];
    let mut edits = NodeEdits::new(g);
    let mut changed = false;
    for i in 0..g.nodes.len() {
        let Some(m) = match_fold(g, i, &uses, &producer, &constant_of) else { continue };
        let own = take_ownership(g, m.conv, &mut owned, &mut edits, &mut constant_of, m.fold == Fold::Shift)?;
        match m.fold {
            Fold::Scale => {
                scale_weight(g, m.conv, own.weight, &m.per_channel)?;
                if let Some(b) = own.bias {
                    update_constant(g, b, |data| data.iter_mut().zip(&m.per_channel).for_each(|(x, s)| *x *= s))?;
                }
            }
            Fold::Shift => {
                let b = own.bias.ok_or("internal: a shift fold has no bias to add to")?;
                update_constant(g, b, |data| data.iter_mut().zip(&m.per_channel).for_each(|(x, t)| *x += t))?;
            }
        }
        // The binary node's output is now the convolution's; its old output is orphaned
        // and dropped by `apply`.
        let result = g.nodes[i].outputs[0];
        g.nodes[m.conv].outputs[0] = result;
        producer[result.index()] = Some(m.conv);
        edits.remove(i);
        changed = true;
    }
    if changed {
        edits.apply(g);
    }
    Ok(())
}

fn match_fold(
    g: &Graph,
    i: usize,
    uses: &[usize],
    producer: &[Option<usize>],
    constant_of: &[Option<ConstId>],
) -> Option<Match> {
    let node = &g.nodes[i];
    let Op::Binary(func) = node.op else { return None };
    if !node.epilogue.is_empty() || node.inputs.len() != 2 {
        return None;
    }
    let conv_sides: &[usize] = match func {
        BinaryFn::Mul | BinaryFn::Add => &[0, 1],
        BinaryFn::Sub | BinaryFn::Div => &[0],
        _ => return None,
    };
    for &side in conv_sides {
        let (conv_out, other) = (node.inputs[side], node.inputs[1 - side]);
        let Some(conv) = producer[conv_out.index()] else { continue };
        if !foldable_conv(g, conv, conv_out, uses, constant_of) || g.ty(node.outputs[0]) != g.ty(conv_out) {
            continue;
        }
        let Some(c) = constant_of[other.index()] else { continue };
        let out_shape = &g.ty(conv_out).shape;
        let Some(values) = per_channel_values(g.constant(c), out_shape) else { continue };
        if values.iter().any(|v| !v.is_finite()) {
            continue;
        }
        let (fold, per_channel) = match func {
            BinaryFn::Mul => (Fold::Scale, values),
            BinaryFn::Div if values.iter().all(|&v| v != 0.0) => {
                (Fold::Scale, values.iter().map(|v| 1.0 / v).collect())
            }
            BinaryFn::Add => (Fold::Shift, values),
            BinaryFn::Sub => (Fold::Shift, values.iter().map(|v| -v).collect()),
            _ => continue,
        };
        return Some(Match { conv, fold, per_channel });
    }
    None
}

/// A convolution whose output `out` only feeds the node being folded, with constant
/// f32 parameters and nothing fused yet.
fn foldable_conv(g: &Graph, conv: usize, out: ValueId, uses: &[usize], constant_of: &[Option<ConstId>]) -> bool {
    let node = &g.nodes[conv];
    if !matches!(node.op, Op::Conv(_) | Op::ConvTranspose(_)) {
        return false;
    }
    let params_constant = node.inputs[1..].iter().all(|v| constant_of[v.index()].is_some());
    node.outputs.len() == 1
        && node.epilogue.is_empty()
        && uses[out.index()] == 1
        && !g.outputs.contains(&out)
        && node.inputs.len() <= 3
        && params_constant
        && node.inputs.iter().chain(&node.outputs).all(|&v| g.ty(v).dtype == cnnc_ir::DType::F32)
}

/// The constant's value per output channel (axis 1 of `out_shape`), or None when it
/// varies along another axis or would broadcast the output to a larger shape.
fn per_channel_values(c: &Constant, out_shape: &[usize]) -> Option<Vec<f32>> {
    let channels = *out_shape.get(1)?;
    let shape = &c.ty.shape;
    let offset = out_shape.len().checked_sub(shape.len())?;
    let is_splat = matches!(c.value, ConstValue::Splat(_));
    for (k, &d) in shape.iter().enumerate() {
        let axis = k + offset;
        let fits = d == 1 || (d == out_shape[axis] && (axis == 1 || is_splat));
        if !fits {
            return None;
        }
    }
    let data = match &c.value {
        ConstValue::Splat(s) => {
            return Some(vec![s.as_f64() as f32; channels]).filter(|_| s.dtype() == cnnc_ir::DType::F32);
        }
        ConstValue::Dense(TensorData::F32(d)) => d,
        ConstValue::Dense(_) => return None,
    };
    match data.len() {
        1 => Some(vec![data[0]; channels]),
        n if n == channels => Some(data.clone()),
        _ => None,
    }
}

/// Gives convolution `conv` weight and bias constants of its own (copies made before
/// the first fold), creating a zero bias when `need_bias` and it has none.
fn take_ownership(
    g: &mut Graph,
    conv: usize,
    owned: &mut [Option<Owned>],
    edits: &mut NodeEdits,
    constant_of: &mut Vec<Option<ConstId>>,
    need_bias: bool,
) -> Result<Owned, String> {
    let name = g.nodes[conv].name.clone();
    let mut own = match owned[conv] {
        Some(o) => o,
        None => {
            let w = g.nodes[conv].inputs[1];
            let weight = g.constant(constant_id(constant_of, w)?).to_tensor();
            let (value, id) = edits.add_constant_before(g, conv, format!("{name}.folded_weight"), weight);
            record(constant_of, value, id);
            g.nodes[conv].inputs[1] = value;
            let bias = match g.nodes[conv].inputs.get(2).copied() {
                Some(b) => {
                    let bias = g.constant(constant_id(constant_of, b)?).to_tensor();
                    let (value, id) = edits.add_constant_before(g, conv, format!("{name}.folded_bias"), bias);
                    record(constant_of, value, id);
                    g.nodes[conv].inputs[2] = value;
                    Some(id)
                }
                None => None,
            };
            Owned { weight: id, bias }
        }
    };
    if need_bias && own.bias.is_none() {
        let channels = g.ty(g.nodes[conv].outputs[0]).shape[1];
        let zeros = Tensor::f32(vec![channels], vec![0.0; channels]);
        let (value, id) = edits.add_constant_before(g, conv, format!("{name}.folded_bias"), zeros);
        record(constant_of, value, id);
        g.nodes[conv].inputs.push(value);
        own.bias = Some(id);
    }
    owned[conv] = Some(own);
    Ok(own)
}

fn constant_id(constant_of: &[Option<ConstId>], v: ValueId) -> Result<ConstId, String> {
    constant_of[v.index()].ok_or_else(|| format!("internal: {v} was matched as a constant but is not one"))
}

fn record(constant_of: &mut Vec<Option<ConstId>>, value: ValueId, id: ConstId) {
    if constant_of.len() <= value.index() {
        constant_of.resize(value.index() + 1, None);
    }
    constant_of[value.index()] = Some(id);
}

/// Multiplies every weight feeding output channel `oc` by `scale[oc]`.
fn scale_weight(g: &mut Graph, conv: usize, weight: ConstId, scale: &[f32]) -> Result<(), String> {
    let shape = g.constant(weight).ty.shape.clone();
    let per_filter: usize = shape[2..].iter().product();
    let channel_of: Box<dyn Fn(usize) -> usize> = match &g.nodes[conv].op {
        // Conv weight [M, C/groups, *k]: filter `oc` is one contiguous run.
        Op::Conv(_) => Box::new(move |i| i / (shape[1] * per_filter)),
        // ConvTranspose weight [C, M/groups, *k]: input channel `ic` of group
        // `ic / (C/groups)` feeds output channels `group * M/groups + j`.
        Op::ConvTranspose(geometry) => {
            let in_per_group = shape[0] / geometry.groups;
            let out_per_group = shape[1];
            Box::new(move |i| {
                let filter = i / per_filter;
                let (ic, j) = (filter / out_per_group, filter % out_per_group);
                (ic / in_per_group) * out_per_group + j
            })
        }
        other => return Err(format!("internal: scale_weight on a {} node", other.mnemonic())),
    };
    update_constant(g, weight, |data| {
        for (i, x) in data.iter_mut().enumerate() {
            *x *= scale[channel_of(i)];
        }
    })
}

/// Rewrites an f32 constant's elements (expanding a splat first).
fn update_constant(g: &mut Graph, id: ConstId, f: impl FnOnce(&mut [f32])) -> Result<(), String> {
    let c = &g.constants[id.index()];
    let mut t = c.to_tensor();
    let TensorData::F32(data) = &mut t.data else {
        return Err(format!("internal: constant {id} {:?} is {}, not f32", c.name, c.ty.dtype));
    };
    f(data);
    g.constants[id.index()] = Constant::from_tensor(c.name.clone(), t);
    Ok(())
}
