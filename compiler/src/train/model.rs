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

/// A training-mode BatchNormalization's running statistics, which PyTorch updates as
/// running = (1 − m)·running + m·batch with the batch's mean and its *unbiased* variance,
/// m = 1 − the ONNX `momentum` attribute.
#[derive(Clone, Debug)]
pub struct RunningStatistics {
    pub mean_name: String,
    pub var_name: String,
    /// The ONNX attribute (PyTorch's momentum is 1 − this).
    pub onnx_momentum: f32,
    pub initial_mean: Tensor,
    pub initial_var: Tensor,
    /// Graph outputs: the batch mean [C] and unbiased batch variance [C].
    pub batch_mean: ValueId,
    pub batch_var: ValueId,
}

/// Inputs: the model's own data inputs, the parameters and `labels` (in `graph.inputs`
/// order; use `assemble_inputs`). Outputs: the loss (f32, rank 0), then one gradient per
/// parameter in `params` order, then the batch mean and unbiased variance of every
/// training-mode BatchNormalization in `running` order.
#[derive(Clone, Debug)]
pub struct TrainingGraph {
    pub graph: Graph,
    pub data_inputs: Vec<ValueId>,
    pub labels: ValueId,
    pub params: Vec<Parameter>,
    pub running: Vec<RunningStatistics>,
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

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrainOptions {
    /// Name globs (`*` any run, `?` one character) of parameters kept fixed: they stay
    /// constants and get no gradient.
    pub freeze: Vec<String>,
}

/// Whether `name` matches `pattern` with `*` (any run of characters) and `?` (one).
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // match_from[i][j]: p[i..] matches n[j..]; filled backwards.
    let mut next = vec![false; n.len() + 1];
    next[n.len()] = true;
    for i in (0..p.len()).rev() {
        let mut current = vec![false; n.len() + 1];
        for j in (0..=n.len()).rev() {
            current[j] = match p[i] {
                '*' => next[j] || (j < n.len() && current[j + 1]),
                '?' => j < n.len() && next[j + 1],
                c => j < n.len() && n[j] == c && next[j + 1],
            };
        }
        next = current;
    }
    next[0]
}

/// `load_training_graph_with` and default options (every parameter trained).
pub fn load_training_graph(path: impl AsRef<Path>) -> Result<TrainingGraph, String> {
    load_training_graph_with(path, &TrainOptions::default())
}

/// Loads `path` for training: the trainable initializers become graph inputs, the single
/// graph output is taken as the logits [N, classes], and the loss and the gradients are
/// appended. BatchNormalization normalises with batch statistics as PyTorch's training
/// mode does: nodes exported in inference mode are switched to training mode (opset 14+).
pub fn load_training_graph_with(path: impl AsRef<Path>, options: &TrainOptions) -> Result<TrainingGraph, String> {
    load_training_graph_batched(path, options, None)
}

/// `load_training_graph_with` at batch size `batch` (the leading dim of every data input,
/// as `cnnc compile --batch`); `None` keeps the model's.
pub fn load_training_graph_batched(path: impl AsRef<Path>, options: &TrainOptions, batch: Option<usize>) -> Result<TrainingGraph, String> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut model = decode_model(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    switch_batch_norms_to_training(&mut model)?;
    if let Some(batch) = batch {
        set_data_batch(&mut model, batch)?;
    }
    let mut trainable = trainable_initializers(&model);
    trainable.retain(|name| !options.freeze.iter().any(|pattern| glob_matches(pattern, name)));
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
    let batch_norms = training_batch_norms(&model, base_dir)?;
    let options = LoadOptions { random_dropout: true, ..LoadOptions::default() };
    let mut graph = lower_model(&model, base_dir, &options).map_err(|e| e.to_string())?;

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
    let mut running = Vec::with_capacity(batch_norms.len());
    for bn in batch_norms {
        let x = graph
            .values
            .iter()
            .position(|v| v.name == bn.input_name)
            .map(|i| ValueId(i as u32))
            .ok_or_else(|| format!("the input '{}' of a BatchNormalization is not in the lowered graph", bn.input_name))?;
        let (batch_mean, batch_var) = batch_statistics(&mut graph, x)?;
        graph.outputs.extend([batch_mean, batch_var]);
        running.push(RunningStatistics {
            mean_name: bn.mean_name,
            var_name: bn.var_name,
            onnx_momentum: bn.momentum,
            initial_mean: bn.initial_mean,
            initial_var: bn.initial_var,
            batch_mean,
            batch_var,
        });
    }
    let params = trainable
        .into_iter()
        .zip(param_inputs)
        .zip(grads)
        .zip(initial)
        .map(|(((name, input), grad), initial)| Parameter { name, input, grad, initial })
        .collect();
    Ok(TrainingGraph { graph, data_inputs, labels, params, running, logits, loss: loss.loss })
}

/// Sets the leading dim of every data input (a graph input that is not an initializer) to
/// `batch`. Not `LoadOptions::batch`, which would also resize the parameters once they are
/// graph inputs.
fn set_data_batch(model: &mut ModelProto, batch: usize) -> Result<(), String> {
    if batch == 0 {
        return Err("--batch must be at least 1".into());
    }
    let Some(graph) = model.graph.as_mut() else { return Ok(()) };
    let initializers: HashSet<String> = graph.initializer.iter().map(|t| t.name.clone()).collect();
    for input in graph.input.iter_mut().filter(|i| !initializers.contains(&i.name)) {
        let Some(TypeValue::TensorType(t)) = input.r#type.as_mut().and_then(|t| t.value.as_mut()) else { continue };
        if let Some(first) = t.shape.as_mut().and_then(|s| s.dim.first_mut()) {
            first.value = Some(DimensionValue::DimValue(batch as i64));
        }
    }
    Ok(())
}

struct BatchNormNode {
    input_name: String,
    mean_name: String,
    var_name: String,
    momentum: f32,
    initial_mean: Tensor,
    initial_var: Tensor,
}

/// BatchNormalization nodes in training mode (opset 14+, training_mode=1) whose running
/// statistics are initializers.
fn training_batch_norms(model: &ModelProto, base_dir: Option<&Path>) -> Result<Vec<BatchNormNode>, String> {
    let Some(graph) = model.graph.as_ref() else { return Ok(Vec::new()) };
    let initializer = |name: &str| -> Result<Option<Tensor>, String> {
        match graph.initializer.iter().find(|t| t.name == name) {
            Some(t) => tensor_from_proto(t, base_dir).map(Some).map_err(|e| format!("initializer '{name}': {e}")),
            None => Ok(None),
        }
    };
    let mut found = Vec::new();
    for node in graph.node.iter().filter(|n| n.op_type == "BatchNormalization") {
        let attr = |name: &str| node.attribute.iter().find(|a| a.name == name);
        if attr("training_mode").is_none_or(|a| a.i == 0) {
            continue;
        }
        let [input, _, _, mean, var] = &node.input[..] else {
            return Err(format!("BatchNormalization '{}' needs 5 inputs, has {}", node.name, node.input.len()));
        };
        let (Some(initial_mean), Some(initial_var)) = (initializer(mean)?, initializer(var)?) else {
            return Err(format!("BatchNormalization '{}': running statistics '{mean}', '{var}' must be initializers", node.name));
        };
        found.push(BatchNormNode {
            input_name: input.clone(),
            mean_name: mean.clone(),
            var_name: var.clone(),
            momentum: attr("momentum").map_or(0.9, |a| a.f),
            initial_mean,
            initial_var,
        });
    }
    Ok(found)
}

/// Per-channel mean and unbiased variance of x [N, C, ...] as [C] values.
fn batch_statistics(graph: &mut Graph, x: ValueId) -> Result<(ValueId, ValueId), String> {
    use cnnc_ir::{BinaryFn, Op, ReduceKind, UnaryFn};
    let shape = graph.ty(x).shape.clone();
    if shape.len() < 2 {
        return Err(format!("BatchNormalization input must be [N, C, ...], got {shape:?}"));
    }
    let axes: Vec<usize> = (0..shape.len()).filter(|&a| a != 1).collect();
    let count: usize = axes.iter().map(|&a| shape[a]).product();
    let mean = graph.push1("bn_stats.mean", Op::Reduce { kind: ReduceKind::Mean, axes: axes.clone() }, &[x])?;
    let centered = graph.push1("bn_stats.centered", Op::Binary(BinaryFn::Sub), &[x, mean])?;
    let squared = graph.push1("bn_stats.squared", Op::Binary(BinaryFn::Mul), &[centered, centered])?;
    // The same nodes as the frontend's normalisation (mean, centred, squared, biased
    // variance), which common-subexpression elimination then shares with the forward pass.
    let biased = graph.push1("bn_stats.biased_var", Op::Reduce { kind: ReduceKind::Mean, axes }, &[squared])?;
    let bessel = (count as f64 / count.saturating_sub(1).max(1) as f64) as f32;
    let var = graph.push1("bn_stats.var", Op::Unary(UnaryFn::Affine { scale: bessel, shift: 0.0 }), &[biased])?;
    let channels = TensorType::f32(vec![shape[1]]);
    let mean = graph.push_typed("bn_stats.mean_c", Op::Reshape, &[mean], channels.clone())?;
    let var = graph.push_typed("bn_stats.var_c", Op::Reshape, &[var], channels)?;
    Ok((mean, var))
}

/// Sets training_mode=1 on every BatchNormalization (ONNX semantics: batch statistics,
/// running statistics as outputs 1 and 2).
fn switch_batch_norms_to_training(model: &mut ModelProto) -> Result<(), String> {
    let opset = model.opset_import.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map(|o| o.version);
    let Some(graph) = model.graph.as_mut() else { return Ok(()) };
    for node in graph.node.iter_mut().filter(|n| n.op_type == "BatchNormalization") {
        if node.attribute.iter().any(|a| a.name == "training_mode" && a.i != 0) {
            continue;
        }
        if opset.is_none_or(|v| v < 14) {
            return Err(format!(
                "BatchNormalization '{}': training with batch statistics needs a model of opset 14 or later (this one imports {opset:?})",
                node.name
            ));
        }
        node.attribute.retain(|a| a.name != "training_mode");
        node.attribute.push(cnnc_onnx::attr::int("training_mode", 1));
    }
    Ok(())
}
