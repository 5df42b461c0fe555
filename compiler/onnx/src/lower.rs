//! ONNX graph -> cnnc IR: graph inputs and initializers, then every node in order (model-local
//! functions expanded inline), then the graph outputs.
//!
//! Unsupported nodes do not stop lowering: each is recorded, its outputs are marked missing,
//! and nodes downstream of it are skipped (they cannot be typed), so that one error lists
//! every node cnnc lacks.

use std::collections::{HashMap, HashSet};

use cnnc_ir::{Op, ValueId};

use crate::LoadOptions;
use crate::ctx::{GraphBuilder, LowerError, NodeCtx};
use crate::error::{FrontendError, UnsupportedNode};
use crate::ops;
use crate::proto::{DimensionValue, FunctionProto, GraphProto, NodeProto, OperatorSetIdProto, TypeValue};
use crate::tensor::{dtype_from_onnx, tensor_from_proto};

/// Function nesting beyond this is taken to be recursion, which ONNX forbids.
const MAX_FUNCTION_DEPTH: usize = 64;

/// What an ONNX value name stands for while lowering.
#[derive(Clone, Debug)]
enum Slot {
    Value(ValueId),
    /// An optional function input the caller left out: reads as an omitted input.
    Absent,
    /// Could not be produced. `Some(reason)`: the first node reading it is unsupported for
    /// that reason (an initializer of an unsupported element type); None: the producer
    /// was already reported.
    Missing(Option<String>),
}

type Scope = HashMap<String, Slot>;

/// Opset version per domain ("" is the default domain).
#[derive(Clone, Debug)]
pub(crate) struct Opsets(HashMap<String, i64>);

impl Opsets {
    pub(crate) fn from_imports(imports: &[OperatorSetIdProto]) -> Opsets {
        Opsets(imports.iter().map(|o| (canonical_domain(&o.domain).to_string(), o.version)).collect())
    }

    pub(crate) fn get(&self, domain: &str) -> Option<i64> {
        self.0.get(canonical_domain(domain)).copied()
    }

    /// `self` with `inner`'s entries taking precedence (a function's own imports).
    fn overlaid(&self, inner: &[OperatorSetIdProto]) -> Opsets {
        let mut merged = self.0.clone();
        merged.extend(Opsets::from_imports(inner).0);
        Opsets(merged)
    }
}

fn canonical_domain(domain: &str) -> &str {
    if domain == "ai.onnx" { "" } else { domain }
}

pub(crate) struct Lowerer<'m> {
    builder: GraphBuilder,
    functions: HashMap<(String, String), &'m FunctionProto>,
    unsupported: Vec<UnsupportedNode>,
    base_dir: Option<&'m std::path::Path>,
    inference: bool,
    random_dropout: bool,
}

impl<'m> Lowerer<'m> {
    pub(crate) fn new(
        name: &str,
        functions: &'m [FunctionProto],
        base_dir: Option<&'m std::path::Path>,
    ) -> Lowerer<'m> {
        Lowerer {
            builder: GraphBuilder::new(name),
            functions: functions
                .iter()
                .map(|f| ((canonical_domain(&f.domain).to_string(), f.name.clone()), f))
                .collect(),
            unsupported: Vec::new(),
            base_dir,
            inference: false,
            random_dropout: false,
        }
    }

    pub(crate) fn lower_graph(
        mut self,
        graph: &'m GraphProto,
        opsets: &Opsets,
        options: &LoadOptions,
    ) -> Result<cnnc_ir::Graph, FrontendError> {
        self.inference = options.inference;
        self.random_dropout = options.random_dropout;
        let default_opset = opsets.get("").unwrap_or(0);
        let mut scope = Scope::new();
        let initializer_names: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        for input in &graph.input {
            if initializer_names.contains(input.name.as_str()) {
                continue;
            }
            match input_type(input, options) {
                Ok(ty) => {
                    let v = self.builder.graph.add_input(ty, input.name.clone());
                    scope.insert(input.name.clone(), Slot::Value(v));
                }
                Err(InputTypeError::Unsupported(reason)) => {
                    self.unsupported.push(UnsupportedNode {
                        name: input.name.clone(),
                        op_type: "graph input".into(),
                        opset: default_opset,
                        reason,
                    });
                    scope.insert(input.name.clone(), Slot::Missing(None));
                }
                Err(InputTypeError::Other(e)) => return Err(e),
            }
        }
        for init in &graph.initializer {
            if init.name.is_empty() {
                return Err(FrontendError::Invalid("an initializer has no name".into()));
            }
            match tensor_from_proto(init, self.base_dir) {
                Ok(t) => {
                    let v = self.builder.constant(init.name.clone(), t);
                    scope.insert(init.name.clone(), Slot::Value(v));
                }
                Err(FrontendError::UnsupportedFeature(reason)) => {
                    scope.insert(init.name.clone(), Slot::Missing(Some(reason)));
                }
                Err(e) => return Err(e),
            }
        }
        self.lower_nodes(&graph.node, &mut scope, opsets, "", 0)?;

        let mut outputs: Vec<(String, ValueId)> = Vec::new();
        for out in &graph.output {
            match scope.get(&out.name) {
                Some(Slot::Value(v)) => outputs.push((out.name.clone(), *v)),
                Some(Slot::Missing(_)) => {}
                Some(Slot::Absent) | None => {
                    return Err(FrontendError::Invalid(format!(
                        "graph output '{}' is not produced by any node",
                        out.name
                    )));
                }
            }
        }
        if !self.unsupported.is_empty() {
            return Err(FrontendError::Unsupported(self.unsupported));
        }
        let mut graph = self.finish_outputs(outputs)?;
        graph.remove_dead();
        Ok(graph)
    }

    /// Makes every graph output the output of a node of its own, named after the ONNX output.
    fn finish_outputs(mut self, outputs: Vec<(String, ValueId)>) -> Result<cnnc_ir::Graph, FrontendError> {
        let mut used: HashSet<ValueId> = HashSet::new();
        for (name, v) in outputs {
            let needs_copy = self.builder.graph.inputs.contains(&v) || self.builder.is_constant(v) || used.contains(&v);
            let v = if needs_copy {
                let ty = self.builder.graph.ty(v).clone();
                // Added directly, not through the folding builder: a copy of a constant must stay a node.
                let copy = self.builder.graph.push_typed(name.clone(), Op::Reshape, &[v], ty);
                copy.map_err(|e| FrontendError::Invalid(format!("graph output '{name}': {e}")))?
            } else {
                v
            };
            used.insert(v);
            self.builder.graph.values[v.index()].name = name;
            self.builder.graph.outputs.push(v);
        }
        Ok(self.builder.graph)
    }

    fn lower_nodes(
        &mut self,
        nodes: &[NodeProto],
        scope: &mut Scope,
        opsets: &Opsets,
        name_prefix: &str,
        depth: usize,
    ) -> Result<(), FrontendError> {
        for node in nodes {
            self.lower_node(node, scope, opsets, name_prefix, depth)?;
        }
        Ok(())
    }

    fn lower_node(
        &mut self,
        node: &NodeProto,
        scope: &mut Scope,
        opsets: &Opsets,
        name_prefix: &str,
        depth: usize,
    ) -> Result<(), FrontendError> {
        let local_name = if !node.name.is_empty() {
            node.name.clone()
        } else {
            node.output.iter().find(|o| !o.is_empty()).cloned().unwrap_or_else(|| node.op_type.clone())
        };
        let name = format!("{name_prefix}{local_name}");
        let domain = canonical_domain(&node.domain);
        let opset = opsets.get(domain).unwrap_or(0);
        let report =
            |reason: String| UnsupportedNode { name: name.clone(), op_type: node.op_type.clone(), opset, reason };

        let mut inputs = Vec::with_capacity(node.input.len());
        let mut missing: Option<Option<String>> = None;
        for input_name in &node.input {
            if input_name.is_empty() {
                inputs.push(None);
                continue;
            }
            match scope.get(input_name) {
                Some(Slot::Value(v)) => inputs.push(Some(*v)),
                Some(Slot::Absent) => inputs.push(None),
                Some(Slot::Missing(reason)) => {
                    if missing.as_ref().is_none_or(|r| r.is_none()) {
                        missing = Some(reason.clone());
                    }
                    inputs.push(None);
                }
                None => {
                    return Err(FrontendError::Invalid(format!(
                        "node '{name}' ({}): input '{input_name}' is not a graph input, initializer or earlier node output",
                        node.op_type
                    )));
                }
            }
        }
        let function = self.functions.get(&(domain.to_string(), node.op_type.clone())).copied();
        let lowering = if domain.is_empty() { ops::lookup(&node.op_type) } else { None };
        if let Some(reason) = missing {
            match reason {
                Some(reason) => self.unsupported.push(report(reason)),
                // Downstream of a reported node: only say something if this node would fail anyway.
                None if function.is_none() && lowering.is_none() => {
                    self.unsupported.push(report(no_lowering_reason(domain, opsets)))
                }
                None => {}
            }
            mark_missing(node, scope);
            return Ok(());
        }
        if let Some(function) = function {
            return self.expand_function(node, function, inputs, scope, opsets, &name, depth);
        }
        let Some(lowering) = lowering else {
            self.unsupported.push(report(no_lowering_reason(domain, opsets)));
            mark_missing(node, scope);
            return Ok(());
        };
        let mut ctx = NodeCtx { builder: &mut self.builder, node, inputs, opset, name: name.clone(), inference: self.inference, random_dropout: self.random_dropout };
        match lowering(&mut ctx) {
            Ok(outputs) => {
                for (i, out_name) in node.output.iter().enumerate() {
                    if out_name.is_empty() {
                        continue;
                    }
                    match outputs.get(i) {
                        Some(&v) => {
                            let value = &mut self.builder.graph.values[v.index()];
                            if value.name.is_empty() {
                                value.name = out_name.clone();
                            }
                            scope.insert(out_name.clone(), Slot::Value(v));
                        }
                        None => {
                            self.unsupported.push(report(format!("output {i} ('{out_name}') is not supported")));
                            scope.insert(out_name.clone(), Slot::Missing(None));
                        }
                    }
                }
                Ok(())
            }
            Err(LowerError::Unsupported(reason)) => {
                self.unsupported.push(report(reason));
                mark_missing(node, scope);
                Ok(())
            }
            Err(LowerError::Invalid(message)) => {
                Err(FrontendError::Invalid(format!("node '{name}' ({} opset {opset}): {message}", node.op_type)))
            }
        }
    }

    /// Lowers a call of a model-local function by lowering its body in a scope of its own,
    /// with the caller's values bound to the formal inputs and attribute references resolved.
    #[allow(clippy::too_many_arguments)]
    fn expand_function(
        &mut self,
        call: &NodeProto,
        function: &'m FunctionProto,
        inputs: Vec<Option<ValueId>>,
        scope: &mut Scope,
        opsets: &Opsets,
        name: &str,
        depth: usize,
    ) -> Result<(), FrontendError> {
        if depth >= MAX_FUNCTION_DEPTH {
            return Err(FrontendError::Invalid(format!(
                "node '{name}': function '{}' nests more than {MAX_FUNCTION_DEPTH} deep (recursive functions are not allowed)",
                function.name
            )));
        }
        if inputs.len() > function.input.len() || call.output.len() > function.output.len() {
            return Err(FrontendError::Invalid(format!(
                "node '{name}': function '{}' takes {} input(s) and {} output(s), the call has {} and {}",
                function.name,
                function.input.len(),
                function.output.len(),
                inputs.len(),
                call.output.len()
            )));
        }
        let mut inner = Scope::new();
        for (i, formal) in function.input.iter().enumerate() {
            let slot = match inputs.get(i).copied().flatten() {
                Some(v) => Slot::Value(v),
                None => Slot::Absent,
            };
            inner.insert(formal.clone(), slot);
        }
        let mut attributes: HashMap<&str, &crate::proto::AttributeProto> =
            function.attribute_proto.iter().map(|a| (a.name.as_str(), a)).collect();
        for a in &call.attribute {
            attributes.insert(a.name.as_str(), a);
        }
        let body: Vec<NodeProto> = function
            .node
            .iter()
            .map(|n| {
                let mut n = n.clone();
                n.attribute = n
                    .attribute
                    .into_iter()
                    .filter_map(|a| {
                        if a.ref_attr_name.is_empty() {
                            return Some(a);
                        }
                        // A reference to an attribute the caller did not set (and that has no
                        // default) means "attribute absent".
                        attributes.get(a.ref_attr_name.as_str()).map(|value| {
                            let mut resolved = (*value).clone();
                            resolved.name = a.name.clone();
                            resolved
                        })
                    })
                    .collect();
                n
            })
            .collect();
        let inner_opsets = opsets.overlaid(&function.opset_import);
        let prefix = format!("{name}/");
        self.lower_nodes(&body, &mut inner, &inner_opsets, &prefix, depth + 1)?;
        for (i, out_name) in call.output.iter().enumerate() {
            if out_name.is_empty() {
                continue;
            }
            let formal = &function.output[i];
            match inner.get(formal) {
                Some(slot @ (Slot::Value(_) | Slot::Missing(_))) => {
                    scope.insert(out_name.clone(), slot.clone());
                }
                _ => {
                    return Err(FrontendError::Invalid(format!(
                        "node '{name}': function '{}' never computes its output '{formal}'",
                        function.name
                    )));
                }
            }
        }
        Ok(())
    }
}

fn no_lowering_reason(domain: &str, opsets: &Opsets) -> String {
    if !domain.is_empty() {
        if opsets.get(domain).is_none() {
            return format!("operator domain '{domain}' is not imported by the model and has no local function");
        }
        return format!("operator domain '{domain}' is not supported");
    }
    "cnnc has no lowering for this operator".to_string()
}

fn mark_missing(node: &NodeProto, scope: &mut Scope) {
    for out in &node.output {
        if !out.is_empty() {
            scope.insert(out.clone(), Slot::Missing(None));
        }
    }
}

enum InputTypeError {
    Unsupported(String),
    Other(FrontendError),
}

/// The static type of a graph input: element type from the declaration; the leading dim
/// becomes `options.batch` when that is given, and 1 when it is symbolic or unknown; other
/// dims must be concrete.
fn input_type(
    input: &crate::proto::ValueInfoProto,
    options: &LoadOptions,
) -> Result<cnnc_ir::TensorType, InputTypeError> {
    let name = &input.name;
    let invalid = |m: String| InputTypeError::Other(FrontendError::Invalid(m));
    let tensor_type = match input.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(TypeValue::TensorType(t)) => t,
        Some(_) => return Err(InputTypeError::Unsupported(format!("input '{name}' is not a dense tensor"))),
        None => return Err(invalid(format!("graph input '{name}' has no type"))),
    };
    let dtype = dtype_from_onnx(tensor_type.elem_type).map_err(|e| match e {
        FrontendError::UnsupportedFeature(m) => InputTypeError::Unsupported(format!("input '{name}' has {m}")),
        other => InputTypeError::Other(other),
    })?;
    let Some(shape) = &tensor_type.shape else {
        return Err(InputTypeError::Other(FrontendError::UnsupportedFeature(format!(
            "graph input '{name}' has no shape (unknown rank); cnnc needs static shapes"
        ))));
    };
    let mut dims = Vec::with_capacity(shape.dim.len());
    for (i, d) in shape.dim.iter().enumerate() {
        let dim = match &d.value {
            _ if i == 0
                && let Some(batch) = options.batch =>
            {
                batch
            }
            Some(DimensionValue::DimValue(v)) if *v > 0 => *v as usize,
            Some(DimensionValue::DimValue(v)) if *v < 0 => {
                return Err(invalid(format!("graph input '{name}' dim {i} is negative ({v})")));
            }
            // A zero extent is a valid (empty) dim, kept unless the batch size is given.
            Some(DimensionValue::DimValue(_)) => 0,
            _ if i == 0 => 1,
            Some(DimensionValue::DimParam(p)) => {
                return Err(InputTypeError::Other(FrontendError::UnsupportedFeature(format!(
                    "graph input '{name}' dim {i} is symbolic ('{p}'); only the leading (batch) dim may be, \
                     and cnnc needs every other dim static"
                ))));
            }
            None => {
                return Err(InputTypeError::Other(FrontendError::UnsupportedFeature(format!(
                    "graph input '{name}' dim {i} is unknown; only the leading (batch) dim may be"
                ))));
            }
        };
        dims.push(dim);
    }
    let fits =
        dims.iter().try_fold(dtype.size(), |acc, &d| acc.checked_mul(d)).is_some_and(|b| b <= isize::MAX as usize);
    if !fits {
        return Err(invalid(format!("graph input '{name}' of shape {dims:?} is too large")));
    }
    Ok(cnnc_ir::TensorType::new(dtype, dims))
}
