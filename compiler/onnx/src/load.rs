//! Reading an ONNX model file and checking what it imports before lowering it.

use std::path::Path;

use cnnc_ir::{Graph, Tensor};
use prost::Message;

use crate::error::FrontendError;
use crate::lower::{Lowerer, Opsets};
use crate::proto::ModelProto;
use crate::tensor::tensor_to_proto;

/// Default-domain opset versions cnnc lowers.
pub const SUPPORTED_OPSETS: std::ops::RangeInclusive<i64> = 6..=28;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// The leading (batch) dim of every graph input. Without it, a symbolic or unknown
    /// leading dim is 1 and a concrete one (even 0: an empty tensor) is kept.
    pub batch: Option<usize>,
    /// Compile for inference: nodes that a training-mode export leaves in training mode
    /// (BatchNormalization with training_mode=1, Dropout with training_mode=true) take
    /// their inference semantics (running statistics; identity). Off, every node keeps
    /// the ONNX operator's own semantics, as the backend tests check them.
    pub inference: bool,
    /// Training-mode Dropout (ratio > 0) draws its mask with `Op::RandomUniform` (inverted
    /// dropout: kept values scaled by 1/(1 − ratio)), seeded by the node's `seed` or its
    /// name, with a step input that is a 0 placeholder until a training step wires its
    /// step counter in (`cnnc::train::fused`). Off, such a Dropout is refused as
    /// unsupported: its random output cannot match another implementation's.
    pub random_dropout: bool,
}

/// Loads and lowers an ONNX model file; external tensor data is read relative to its directory.
pub fn load_model(path: impl AsRef<Path>, options: &LoadOptions) -> Result<Graph, FrontendError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| FrontendError::io(path, e))?;
    let model = decode_model(&bytes)?;
    lower_model(&model, path.parent(), options)
}

/// Loads and lowers a serialized ModelProto (external tensor data is refused).
pub fn load_model_bytes(bytes: &[u8], options: &LoadOptions) -> Result<Graph, FrontendError> {
    lower_model(&decode_model(bytes)?, None, options)
}

/// Like `load_model`, with the named graph inputs fixed to the given values (as if they were
/// initializers), so that shape-like inputs (Reshape's shape, Pad's pads...) become constants.
/// Test cases pass such operands as inputs; a compiled model would need them constant anyway.
pub fn load_model_with_constant_inputs(
    path: impl AsRef<Path>,
    options: &LoadOptions,
    constant_inputs: &[(String, Tensor)],
) -> Result<Graph, FrontendError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| FrontendError::io(path, e))?;
    let mut model = decode_model(&bytes)?;
    if let Some(graph) = model.graph.as_mut() {
        for (name, value) in constant_inputs {
            if !graph.input.iter().any(|i| &i.name == name) {
                return Err(FrontendError::Invalid(format!("the model has no graph input named '{name}'")));
            }
            graph.initializer.retain(|t| &t.name != name);
            graph.initializer.push(tensor_to_proto(name, value));
        }
    }
    lower_model(&model, path.parent(), options)
}

pub fn decode_model(bytes: &[u8]) -> Result<ModelProto, FrontendError> {
    ModelProto::decode(bytes).map_err(|e| FrontendError::Decode(e.to_string()))
}

/// Lowers a decoded model. `base_dir` is where external tensor data lives.
pub fn lower_model(model: &ModelProto, base_dir: Option<&Path>, options: &LoadOptions) -> Result<Graph, FrontendError> {
    let opsets = Opsets::from_imports(&model.opset_import);
    let version = opsets
        .get("")
        .ok_or_else(|| FrontendError::Invalid("the model imports no default-domain (ai.onnx) opset".into()))?;
    if !SUPPORTED_OPSETS.contains(&version) {
        return Err(FrontendError::UnsupportedFeature(format!(
            "default-domain opset {version} (cnnc supports {} to {})",
            SUPPORTED_OPSETS.start(),
            SUPPORTED_OPSETS.end()
        )));
    }
    let graph = model.graph.as_ref().ok_or_else(|| FrontendError::Invalid("the model has no graph".into()))?;
    Lowerer::new(&graph.name, &model.functions, base_dir).lower_graph(graph, &opsets, options)
}
