//! The training graph of an ONNX model: forward pass, softmax cross-entropy loss and the
//! gradient of every trainable parameter, with the parameters as graph inputs.
//!
//! The frontend folds constant expressions (a Gemm's transposed weight becomes a new
//! constant), so trainable initializers are moved into the graph's inputs before lowering:
//! every computation on a parameter then stays in the graph and is differentiated.

use std::collections::HashSet;
use std::path::Path;

use cnnc_ir::{DType, Graph, Tensor, TensorType, ValueId};
use cnnc_onnx::proto::{
    Dimension, DimensionValue, ModelProto, TensorShapeProto, TypeProto, TypeProtoTensor, TypeValue, ValueInfoProto,
};
use cnnc_onnx::{LoadOptions, decode_model, lower_model, tensor_from_proto};

use super::autodiff::backward;
use super::loss::softmax_cross_entropy;

/// ONNX's FLOAT element type.
const ONNX_FLOAT: i32 = 1;

/// Operators whose float initializer operands (at these input positions) are trained.
const TRAINABLE_OPERANDS: &[(&str, &[usize])] = &[
    ("Conv", &[1, 2]),
    ("ConvTranspose", &[1, 2]),
    ("Gemm", &[0, 1, 2]),
    ("MatMul", &[0, 1]),
    ("BatchNormalization", &[1, 2]),
    ("PRelu", &[1]),
];

#[derive(Clone, Debug)]
pub struct Parameter {
    /// The initializer's name (PyTorch's state_dict key for exported models).
    pub name: String,
    /// The graph input that carries the parameter.
    pub input: ValueId,
    /// The value holding d(loss)/d(parameter); also a graph output.
    pub grad: ValueId,
    /// The initializer's value in the model file.
    pub initial: Tensor,
}

/// Inputs: the model's own data inputs, the parameters and `labels` (in `graph.inputs`
/// order; use `assemble_inputs`). Outputs: the loss (f32, rank 0), then one gradient per
/// parameter in `params` order.
#[derive(Clone, Debug)]
pub struct TrainingGraph {
    pub graph: Graph,
    pub data_inputs: Vec<ValueId>,
    pub labels: ValueId,
    pub params: Vec<Parameter>,
    pub logits: ValueId,
    pub loss: ValueId,
}

impl TrainingGraph {
    /// The interpreter's input list from the data inputs (model order), the parameter
    /// values (`params` order) and the labels.
    pub fn assemble_inputs(&self, data: &[Tensor], params: &[Tensor], labels: &Tensor) -> Result<Vec<Tensor>, String> {
        if data.len() != self.data_inputs.len() || params.len() != self.params.len() {
            return Err(format!(
                "expected {} data input(s) and {} parameter(s), got {} and {}",
                self.data_inputs.len(),
                self.params.len(),
                data.len(),
                params.len()
            ));
        }
        let mut bound: Vec<(ValueId, &Tensor)> = self.data_inputs.iter().copied().zip(data).collect();
        bound.extend(self.params.iter().map(|p| p.input).zip(params));
        bound.push((self.labels, labels));
        self.graph
            .inputs
            .iter()
            .map(|v| {
                bound.iter().find(|(id, _)| id == v).map(|(_, t)| (*t).clone()).ok_or_else(|| format!("graph input {v} is not bound"))
            })
            .collect()
    }
}

/// Names of the float initializers that feed a trainable operand, in initializer order.
pub fn trainable_initializers(model: &ModelProto) -> Vec<String> {
    let Some(graph) = model.graph.as_ref() else { return Vec::new() };
    let float_inits: HashSet<&str> =
        graph.initializer.iter().filter(|t| t.data_type == ONNX_FLOAT).map(|t| t.name.as_str()).collect();
    let mut fed: HashSet<&str> = HashSet::new();
    for node in &graph.node {
        let Some((_, positions)) = TRAINABLE_OPERANDS.iter().find(|(op, _)| *op == node.op_type) else { continue };
        for &i in *positions {
            if let Some(name) = node.input.get(i).filter(|n| float_inits.contains(n.as_str())) {
                fed.insert(name);
            }
        }
    }
    graph.initializer.iter().map(|t| t.name.clone()).filter(|n| fed.contains(n.as_str())).collect()
}

fn tensor_value_info(name: &str, elem_type: i32, dims: &[i64]) -> ValueInfoProto {
    let dim = dims.iter().map(|&d| Dimension { value: Some(DimensionValue::DimValue(d)), denotation: String::new() }).collect();
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            value: Some(TypeValue::TensorType(TypeProtoTensor { elem_type, shape: Some(TensorShapeProto { dim }) })),
            denotation: String::new(),
        }),
        ..Default::default()
    }
}

/// Loads `path` for training: the trainable initializers become graph inputs, the single
/// graph output is taken as the logits [N, classes], and the loss and the gradients are
/// appended. BatchNormalization nodes exported in training mode normalise with batch
/// statistics (the ONNX operator's semantics, `LoadOptions::default()`).
pub fn load_training_graph(path: impl AsRef<Path>) -> Result<TrainingGraph, String> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut model = decode_model(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let trainable = trainable_initializers(&model);
    let base_dir = path.parent();
    let graph_proto = model.graph.as_mut().ok_or("the model has no graph")?;
    let mut initial = Vec::with_capacity(trainable.len());
    for name in &trainable {
        let position = graph_proto
            .initializer
            .iter()
            .position(|t| &t.name == name)
            .ok_or_else(|| format!("initializer '{name}' vanished"))?;
        let proto = graph_proto.initializer.remove(position);
        initial.push(tensor_from_proto(&proto, base_dir).map_err(|e| format!("initializer '{name}': {e}"))?);
        if !graph_proto.input.iter().any(|i| &i.name == name) {
            graph_proto.input.push(tensor_value_info(name, proto.data_type, &proto.dims));
        }
    }
    let mut graph = lower_model(&model, base_dir, &LoadOptions::default()).map_err(|e| e.to_string())?;

    let find_input = |graph: &Graph, name: &str| graph.inputs.iter().copied().find(|&v| graph.value(v).name == name);
    let mut param_inputs = Vec::with_capacity(trainable.len());
    for name in &trainable {
        param_inputs.push(find_input(&graph, name).ok_or_else(|| format!("parameter '{name}' is not a graph input after lowering"))?);
    }
    let data_inputs: Vec<ValueId> = graph.inputs.iter().copied().filter(|v| !param_inputs.contains(v)).collect();
    let [logits] = graph.outputs[..] else {
        return Err(format!("training needs a model with one output (the logits), this one has {}", graph.outputs.len()));
    };
    let batch = graph.ty(logits).shape.first().copied().unwrap_or(0);
    let labels = graph.add_input(TensorType::new(DType::I64, vec![batch]), "labels");
    let loss = softmax_cross_entropy(&mut graph, logits, labels)?;
    let grads = backward(&mut graph, &[(logits, loss.dlogits)], &param_inputs)?;
    graph.outputs = std::iter::once(loss.loss).chain(grads.iter().copied()).collect();
    let params = trainable
        .into_iter()
        .zip(param_inputs)
        .zip(grads)
        .zip(initial)
        .map(|(((name, input), grad), initial)| Parameter { name, input, grad, initial })
        .collect();
    Ok(TrainingGraph { graph, data_inputs, labels, params, logits, loss: loss.loss })
}
