//! What an op lowering works with: the graph being built (with constant folding) and
//! `NodeCtx`, one ONNX node's inputs, attributes and opset. See LOWERING.md.

use std::collections::HashMap;

use cnnc_ir::infer::output_types;
use cnnc_ir::{
    ConstId, ConstValue, Constant, DType, Graph, Node, Op, Scalar, Schedule, Tensor, TensorData, TensorType, ValueId,
};

use crate::fold;
use crate::proto::{AttributeProto, AttributeType, NodeProto};
use crate::tensor::tensor_from_proto;

/// Why one node could not be lowered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LowerError {
    /// A valid node using something cnnc lacks: collected, reported with every other one.
    Unsupported(String),
    /// The node violates ONNX (bad attribute, shape mismatch): loading stops.
    Invalid(String),
}

pub type LowerResult<T> = Result<T, LowerError>;

pub fn unsupported(reason: impl Into<String>) -> LowerError {
    LowerError::Unsupported(reason.into())
}

pub fn invalid(reason: impl Into<String>) -> LowerError {
    LowerError::Invalid(reason.into())
}

/// Typing errors from `cnnc_ir::infer` mean the model is inconsistent.
impl From<String> for LowerError {
    fn from(message: String) -> LowerError {
        LowerError::Invalid(message)
    }
}

/// The graph under construction plus which values are constants, so that nodes whose
/// inputs are all constant are evaluated at compile time instead of emitted.
#[derive(Default)]
pub struct GraphBuilder {
    pub graph: Graph,
    constants: HashMap<ValueId, ConstId>,
}

impl GraphBuilder {
    pub fn new(name: impl Into<String>) -> GraphBuilder {
        GraphBuilder { graph: Graph::new(name), constants: HashMap::new() }
    }

    pub fn constant(&mut self, name: impl Into<String>, tensor: Tensor) -> ValueId {
        let v = self.graph.add_constant(name, tensor);
        self.constants.insert(v, ConstId((self.graph.constants.len() - 1) as u32));
        v
    }

    /// A constant every element of which is `value`, without materializing it.
    pub fn splat_constant(&mut self, name: impl Into<String>, ty: TensorType, value: Scalar) -> ValueId {
        let name = name.into();
        // An empty constant has no element to repeat: stored dense, as `Constant::from_tensor` does.
        let value =
            if ty.numel() == 0 { ConstValue::Dense(TensorData::zeros(ty.dtype, 0)) } else { ConstValue::Splat(value) };
        self.graph.constants.push(Constant { name: name.clone(), ty: ty.clone(), value });
        let id = ConstId((self.graph.constants.len() - 1) as u32);
        let v = self.graph.add_value(ty, name.clone());
        self.graph.nodes.push(Node {
            name,
            op: Op::Constant(id),
            inputs: vec![],
            outputs: vec![v],
            epilogue: vec![],
            schedule: Schedule::default(),
        });
        self.constants.insert(v, id);
        v
    }

    pub fn is_constant(&self, v: ValueId) -> bool {
        self.constants.contains_key(&v)
    }

    fn splat_of(&self, v: ValueId) -> Option<Scalar> {
        match self.graph.constant(*self.constants.get(&v)?).value {
            ConstValue::Splat(s) => Some(s),
            ConstValue::Dense(_) => None,
        }
    }

    pub fn constant_tensor(&self, v: ValueId) -> Option<Tensor> {
        self.constants.get(&v).map(|&c| self.graph.constant(c).to_tensor())
    }

    /// Appends `op`, or, when every input is a constant and the op can be evaluated, the
    /// constants it computes. `declared` is the output type for ops that need one.
    pub fn push(
        &mut self,
        name: &str,
        op: Op,
        inputs: &[ValueId],
        declared: Option<TensorType>,
    ) -> Result<Vec<ValueId>, String> {
        let types: Vec<&TensorType> = inputs.iter().map(|&v| self.graph.ty(v)).collect();
        let declared = declared.map(|t| vec![t]);
        let out_types = output_types(&op, &types, &self.graph.constants, declared.as_deref())?;
        for ty in &out_types {
            check_size(ty)?;
        }
        if let Some(value) = self.moved_splat(&op, inputs) {
            let ty = out_types[0].clone();
            return Ok(vec![self.splat_constant(name, ty, value)]);
        }
        let folded_size: usize = out_types.iter().map(TensorType::numel).sum();
        if !inputs.is_empty() && folded_size <= MAX_FOLDED_ELEMENTS && inputs.iter().all(|v| self.is_constant(*v)) {
            let tensors: Vec<Tensor> = inputs.iter().filter_map(|&v| self.constant_tensor(v)).collect();
            let refs: Vec<&Tensor> = tensors.iter().collect();
            // A fold that fails leaves the node in place: the error then surfaces where the
            // node is compiled or run, with the node's name on it.
            if let Some(Ok(values)) = fold::evaluate(&op, &refs, &out_types, &self.graph.constants)
                && values.len() == out_types.len()
                && values.iter().zip(&out_types).all(|(t, ty)| t.ty() == *ty)
            {
                return Ok(values.into_iter().map(|t| self.constant(name, t)).collect());
            }
        }
        Ok(self.graph.add_node_typed(name, op, inputs.to_vec(), out_types))
    }
}

impl GraphBuilder {
    /// The value of a data-movement op applied to one splat constant: the same splat, in
    /// the output's type, without materializing either.
    fn moved_splat(&self, op: &Op, inputs: &[ValueId]) -> Option<Scalar> {
        let moves_data = matches!(op, Op::Reshape | Op::Broadcast | Op::Transpose { .. } | Op::Slice { .. });
        match (op, inputs) {
            (Op::Cast { to }, [x]) => Some(self.splat_of(*x)?.cast(*to)),
            (_, [x]) if moves_data => self.splat_of(*x),
            _ => None,
        }
    }
}

/// Folding evaluates in memory; a larger result stays a node (and is computed at run time).
const MAX_FOLDED_ELEMENTS: usize = 1 << 24;

/// Refuses a type whose byte size does not fit in memory (a malformed or hostile model).
fn check_size(ty: &TensorType) -> Result<(), String> {
    let bytes = ty.shape.iter().try_fold(ty.dtype.size(), |acc, &d| acc.checked_mul(d));
    match bytes {
        Some(b) if b <= isize::MAX as usize => Ok(()),
        _ => Err(format!("a tensor of shape {:?} is too large", ty.shape)),
    }
}

/// One ONNX node being lowered.
pub struct NodeCtx<'a> {
    pub builder: &'a mut GraphBuilder,
    pub node: &'a NodeProto,
    /// Resolved inputs, by position; None for an empty (omitted) input name.
    pub inputs: Vec<Option<ValueId>>,
    /// Opset version of the node's domain.
    pub opset: i64,
    /// The name given to the IR nodes and constants this node becomes.
    pub name: String,
    /// `LoadOptions::inference`: training-mode nodes take inference semantics.
    pub inference: bool,
    /// `LoadOptions::random_dropout`.
    pub random_dropout: bool,
}

impl<'a> NodeCtx<'a> {
    // ---- inputs ----

    pub fn num_inputs(&self) -> usize {
        self.inputs.len()
    }

    /// A required input.
    pub fn input(&self, i: usize) -> LowerResult<ValueId> {
        self.opt_input(i).ok_or_else(|| invalid(format!("input {i} is required")))
    }

    /// An optional input: None when absent or given as "".
    pub fn opt_input(&self, i: usize) -> Option<ValueId> {
        self.inputs.get(i).copied().flatten()
    }

    /// Every input, all required (variadic ops).
    pub fn all_inputs(&self) -> LowerResult<Vec<ValueId>> {
        (0..self.inputs.len()).map(|i| self.input(i)).collect()
    }

    /// Whether the node asks for output `i` (present and not "").
    pub fn wants_output(&self, i: usize) -> bool {
        self.node.output.get(i).is_some_and(|o| !o.is_empty())
    }

    fn input_name(&self, i: usize) -> &str {
        self.node.input.get(i).map(String::as_str).unwrap_or("")
    }

    /// The value of input `i` when it is a compile-time constant; None when absent;
    /// unsupported when it is computed at run time (cnnc needs static shapes).
    pub fn const_input(&self, i: usize) -> LowerResult<Option<Tensor>> {
        let Some(v) = self.opt_input(i) else { return Ok(None) };
        match self.builder.constant_tensor(v) {
            Some(t) => Ok(Some(t)),
            None => Err(unsupported(format!(
                "input {i} ('{}') must be a compile-time constant, but is computed at run time",
                self.input_name(i)
            ))),
        }
    }

    /// A constant integer input (shapes, axes, pads...), widened to i64.
    pub fn const_ints(&self, i: usize) -> LowerResult<Option<Vec<i64>>> {
        let Some(t) = self.const_input(i)? else { return Ok(None) };
        t.data.to_i64_vec().map(Some).ok_or_else(|| {
            invalid(format!("input {i} ('{}') must be int64 or int32, got {}", self.input_name(i), t.data.dtype()))
        })
    }

    pub fn is_constant(&self, v: ValueId) -> bool {
        self.builder.is_constant(v)
    }

    pub fn constant_value(&self, v: ValueId) -> Option<Tensor> {
        self.builder.constant_tensor(v)
    }

    pub fn ty(&self, v: ValueId) -> TensorType {
        self.builder.graph.ty(v).clone()
    }

    pub fn shape(&self, v: ValueId) -> Vec<usize> {
        self.builder.graph.ty(v).shape.clone()
    }

    pub fn dtype(&self, v: ValueId) -> DType {
        self.builder.graph.ty(v).dtype
    }

    // ---- building ----

    /// Appends an op whose output type is inferred (folded when its inputs are constant).
    pub fn push(&mut self, op: Op, inputs: &[ValueId]) -> LowerResult<ValueId> {
        Ok(self.builder.push(&self.name, op, inputs, None)?[0])
    }

    /// Appends an op with several outputs.
    pub fn push_multi(&mut self, op: Op, inputs: &[ValueId]) -> LowerResult<Vec<ValueId>> {
        Ok(self.builder.push(&self.name, op, inputs, None)?)
    }

    /// Appends an op whose output type must be declared (Reshape, Broadcast, Slice...).
    pub fn push_typed(&mut self, op: Op, inputs: &[ValueId], ty: TensorType) -> LowerResult<ValueId> {
        Ok(self.builder.push(&self.name, op, inputs, Some(ty))?[0])
    }

    pub fn constant(&mut self, tensor: Tensor) -> ValueId {
        self.builder.constant(self.name.clone(), tensor)
    }

    /// A constant filled with `value`, stored as a splat.
    pub fn splat(&mut self, shape: Vec<usize>, value: Scalar) -> LowerResult<ValueId> {
        let ty = TensorType::new(value.dtype(), shape);
        check_size(&ty)?;
        Ok(self.builder.splat_constant(self.name.clone(), ty, value))
    }

    /// `x` with a new shape of the same element count; `x` itself when the shape is unchanged.
    pub fn reshape(&mut self, x: ValueId, shape: Vec<usize>) -> LowerResult<ValueId> {
        let ty = self.ty(x);
        if ty.shape == shape {
            return Ok(x);
        }
        self.push_typed(Op::Reshape, &[x], TensorType::new(ty.dtype, shape))
    }

    /// `x` converted to `dtype`; `x` itself when it already has that dtype.
    pub fn cast(&mut self, x: ValueId, dtype: DType) -> LowerResult<ValueId> {
        if self.dtype(x) == dtype {
            return Ok(x);
        }
        self.push(Op::Cast { to: dtype }, &[x])
    }

    // ---- attributes ----

    pub fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.node.attribute.iter().find(|a| a.name == name)
    }

    pub fn has_attr(&self, name: &str) -> bool {
        self.attr(name).is_some()
    }

    fn typed_attr(&self, name: &str, want: AttributeType) -> LowerResult<Option<&AttributeProto>> {
        let Some(a) = self.attr(name) else { return Ok(None) };
        let kind = attribute_kind(a);
        if kind != want {
            return Err(invalid(format!("attribute '{name}' must be of type {want:?}, got {kind:?}")));
        }
        Ok(Some(a))
    }

    pub fn attr_int_opt(&self, name: &str) -> LowerResult<Option<i64>> {
        Ok(self.typed_attr(name, AttributeType::Int)?.map(|a| a.i))
    }

    pub fn attr_int(&self, name: &str, default: i64) -> LowerResult<i64> {
        Ok(self.attr_int_opt(name)?.unwrap_or(default))
    }

    pub fn attr_float_opt(&self, name: &str) -> LowerResult<Option<f32>> {
        Ok(self.typed_attr(name, AttributeType::Float)?.map(|a| a.f))
    }

    pub fn attr_float(&self, name: &str, default: f32) -> LowerResult<f32> {
        Ok(self.attr_float_opt(name)?.unwrap_or(default))
    }

    pub fn attr_ints(&self, name: &str) -> LowerResult<Option<Vec<i64>>> {
        Ok(self.typed_attr(name, AttributeType::Ints)?.map(|a| a.ints.clone()))
    }

    pub fn attr_floats(&self, name: &str) -> LowerResult<Option<Vec<f32>>> {
        Ok(self.typed_attr(name, AttributeType::Floats)?.map(|a| a.floats.clone()))
    }

    pub fn attr_string_opt(&self, name: &str) -> LowerResult<Option<String>> {
        match self.typed_attr(name, AttributeType::String)? {
            None => Ok(None),
            Some(a) => String::from_utf8(a.s.clone())
                .map(Some)
                .map_err(|_| invalid(format!("attribute '{name}' is not valid UTF-8"))),
        }
    }

    pub fn attr_string(&self, name: &str, default: &str) -> LowerResult<String> {
        Ok(self.attr_string_opt(name)?.unwrap_or_else(|| default.to_string()))
    }

    pub fn attr_tensor(&self, name: &str) -> LowerResult<Option<Tensor>> {
        let Some(a) = self.typed_attr(name, AttributeType::Tensor)? else { return Ok(None) };
        let proto = a.t.as_ref().ok_or_else(|| invalid(format!("attribute '{name}' holds no tensor")))?;
        tensor_from_proto(proto, None).map(Some).map_err(|e| {
            if e.is_unsupported() {
                unsupported(format!("attribute '{name}': {e}"))
            } else {
                invalid(format!("attribute '{name}': {e}"))
            }
        })
    }

    /// A required attribute, from one of the `attr_*_opt`-style accessors.
    pub fn required<T>(&self, name: &str, value: Option<T>) -> LowerResult<T> {
        value.ok_or_else(|| invalid(format!("attribute '{name}' is required")))
    }
}

/// The attribute's declared type, or for old writers that leave `type` unset, the one its
/// populated field implies.
pub fn attribute_kind(a: &AttributeProto) -> AttributeType {
    if let Ok(t) = AttributeType::try_from(a.r#type)
        && t != AttributeType::Undefined
    {
        return t;
    }
    if a.t.is_some() {
        AttributeType::Tensor
    } else if a.g.is_some() {
        AttributeType::Graph
    } else if !a.floats.is_empty() {
        AttributeType::Floats
    } else if !a.ints.is_empty() {
        AttributeType::Ints
    } else if !a.strings.is_empty() {
        AttributeType::Strings
    } else if !a.s.is_empty() {
        AttributeType::String
    } else if a.f != 0.0 {
        AttributeType::Float
    } else {
        AttributeType::Int
    }
}

/// `axis` (negative counts from the end) as an index into `rank` axes.
pub fn normalize_axis(axis: i64, rank: usize) -> LowerResult<usize> {
    let r = rank as i64;
    if axis < -r || axis >= r {
        return Err(invalid(format!("axis {axis} is out of range for rank {rank}")));
    }
    Ok(if axis < 0 { (axis + r) as usize } else { axis as usize })
}

/// Normalized, checked, unique axes.
pub fn normalize_axes(axes: &[i64], rank: usize) -> LowerResult<Vec<usize>> {
    let mut out = Vec::with_capacity(axes.len());
    for &a in axes {
        let n = normalize_axis(a, rank)?;
        if out.contains(&n) {
            return Err(invalid(format!("axis {a} is repeated in {axes:?}")));
        }
        out.push(n);
    }
    Ok(out)
}

/// Non-negative ints from an attribute or input, as sizes.
pub fn to_sizes(values: &[i64], what: &str) -> LowerResult<Vec<usize>> {
    values
        .iter()
        .map(|&v| usize::try_from(v).map_err(|_| invalid(format!("{what} must be non-negative, got {v}"))))
        .collect()
}
