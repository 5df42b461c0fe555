//! Writing trained state back as ONNX: the original model with its initializers replaced
//! by the parameters and BatchNorm running statistics of a training library's state buffer
//! (`cnnc compile --train`, trained through the C ABI or `cnnc_runtime::Session`), ready to
//! be compiled for inference (where BatchNorm is folded again).
//!
//! Everything else is kept as it is, except that nodes exported in training mode are
//! switched to inference: BatchNormalization normalises with the running statistics
//! (`training_mode` removed, its running-statistics outputs dropped) and Dropout is the
//! identity (its `training_mode` input dropped).

use std::path::Path;

use cnnc_ir::{Tensor, TensorData};
use cnnc_onnx::proto::{ModelProto, NodeProto};
use cnnc_onnx::{decode_model, tensor_from_proto, tensor_to_proto};
use cnnc_runtime::ModelInfo;
use prost::Message;

/// Suffixes of the state tensors that are not initializers: optimizer buffers and
/// gradients, each named after its parameter (`fused.rs`, `cnnc_codegen::StateLayout`).
const DERIVED_SUFFIXES: [&str; 4] = [".momentum", ".exp_avg", ".exp_avg_sq", ".grad"];

/// What `write_trained_onnx` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportReport {
    /// Initializers replaced by trained values, in the model's initializer order.
    pub replaced: Vec<String>,
    /// Nodes switched from training to inference mode.
    pub switched_to_inference: usize,
}

/// The state tensors that are parameters or running statistics (not optimizer buffers nor
/// gradients), read from `state`, a state buffer laid out as `info.state_tensors` says.
pub fn trained_tensors(state: &[u8], info: &ModelInfo) -> Result<Vec<(String, Tensor)>, String> {
    if !info.has_training() {
        return Err("the library was not compiled for training (cnnc compile --train)".into());
    }
    if state.len() != info.state_size {
        return Err(format!(
            "the state holds {} bytes, the training library's state is {} bytes (saved from another model, batch or optimizer?)",
            state.len(),
            info.state_size
        ));
    }
    let is_derived = |name: &str| {
        DERIVED_SUFFIXES.iter().any(|suffix| {
            name.strip_suffix(suffix).is_some_and(|base| info.state_tensors.iter().any(|t| t.name == base))
        })
    };
    let mut tensors = Vec::new();
    // Dropout's call counter is training bookkeeping, not part of the model.
    let is_counter = |name: &str| name == super::fused::DROPOUT_STEP;
    for spec in info.state_tensors.iter().filter(|t| !is_derived(&t.name) && !is_counter(&t.name)) {
        let dtype = crate::driver::ir_dtype(spec.dtype);
        let bytes = state
            .get(spec.offset..spec.offset + spec.byte_len())
            .ok_or_else(|| format!("state tensor '{}' lies outside the state buffer", spec.name))?;
        tensors.push((spec.name.clone(), Tensor::new(spec.shape.clone(), TensorData::from_le_bytes(dtype, bytes))));
    }
    Ok(tensors)
}

/// `original` (an ONNX model) with every initializer named in `trained` replaced by its
/// trained value, and training-mode nodes switched to inference. Every trained tensor must
/// be an initializer of the same shape and type.
pub fn replace_initializers(
    original: &ModelProto,
    base_dir: Option<&Path>,
    trained: &[(String, Tensor)],
) -> Result<(ModelProto, ExportReport), String> {
    let mut model = original.clone();
    let graph = model.graph.as_mut().ok_or("the model has no graph")?;
    let mut report = ExportReport::default();
    for (name, value) in trained {
        let init = graph.initializer.iter_mut().find(|t| &t.name == name).ok_or_else(|| {
            format!("the trained tensor '{name}' is not an initializer of the model (is it the model the training library was compiled from?)")
        })?;
        let before = tensor_from_proto(init, base_dir).map_err(|e| format!("initializer '{name}': {e}"))?;
        if before.ty() != value.ty() {
            return Err(format!(
                "initializer '{name}' is {} in the model, {} in the trained state",
                before.ty(),
                value.ty()
            ));
        }
        let doc_string = std::mem::take(&mut init.doc_string);
        *init = tensor_to_proto(name, value);
        init.doc_string = doc_string;
    }
    report.replaced = graph
        .initializer
        .iter()
        .filter(|t| trained.iter().any(|(n, _)| *n == t.name))
        .map(|t| t.name.clone())
        .collect();
    report.switched_to_inference = switch_to_inference(graph)?;
    Ok((model, report))
}

/// Switches BatchNormalization and Dropout nodes in training mode to inference; returns
/// how many were switched.
fn switch_to_inference(graph: &mut cnnc_onnx::proto::GraphProto) -> Result<usize, String> {
    let mut switched = 0;
    for k in 0..graph.node.len() {
        let node = &graph.node[k];
        let (extra_outputs_from, training) = match node.op_type.as_str() {
            "BatchNormalization" => (1, node.attribute.iter().any(|a| a.name == "training_mode" && a.i != 0)),
            "Dropout" => (1, node.input.get(2).is_some_and(|n| !n.is_empty())),
            _ => continue,
        };
        if !training {
            continue;
        }
        // Outputs only training mode defines (running statistics, the dropout mask) go,
        // so they must be unread.
        for output in node.output.iter().skip(extra_outputs_from).filter(|o| !o.is_empty()) {
            if is_read(graph, k, output) {
                return Err(format!(
                    "{} '{}': its training-mode output '{output}' is read by the model, so the node cannot be switched to inference",
                    node.op_type, node.name
                ));
            }
        }
        let node: &mut NodeProto = &mut graph.node[k];
        node.output.truncate(extra_outputs_from);
        if node.op_type == "BatchNormalization" {
            node.attribute.retain(|a| a.name != "training_mode");
        } else {
            node.input.truncate(2);
        }
        switched += 1;
    }
    Ok(switched)
}

fn is_read(graph: &cnnc_onnx::proto::GraphProto, producer: usize, value: &str) -> bool {
    graph.output.iter().any(|o| o.name == value)
        || graph.node.iter().enumerate().any(|(k, n)| k != producer && n.input.iter().any(|i| i == value))
}

/// Reads the ONNX model `original`, replaces its initializers by the trained parameters
/// and running statistics in `state` (laid out as `info`, the training library's metadata,
/// says), switches training-mode nodes to inference and writes the model to `out`.
pub fn write_trained_onnx(original: &Path, state: &[u8], info: &ModelInfo, out: &Path) -> Result<ExportReport, String> {
    let bytes = std::fs::read(original).map_err(|e| format!("{}: {e}", original.display()))?;
    let model = decode_model(&bytes).map_err(|e| format!("{}: {e}", original.display()))?;
    let trained = trained_tensors(state, info)?;
    let (model, report) = replace_initializers(&model, original.parent(), &trained)
        .map_err(|e| format!("{}: {e}", original.display()))?;
    std::fs::write(out, model.encode_to_vec()).map_err(|e| format!("writing {}: {e}", out.display()))?;
    Ok(report)
}

/// `write_trained_onnx` for a training library on disk and a state buffer saved as raw
/// bytes (what `cnnc export-trained` runs).
pub fn export_trained_files(
    original: &Path,
    train_so: &Path,
    state_file: &Path,
    out: &Path,
) -> Result<ExportReport, String> {
    let library = cnnc_runtime::Model::load(train_so).map_err(|e| e.to_string())?;
    let state = std::fs::read(state_file).map_err(|e| format!("{}: {e}", state_file.display()))?;
    let info = library.info();
    if state.len() != info.state_size {
        return Err(format!(
            "{}: {} bytes, but the state of {} is {} bytes (the raw state buffer, saved after training with this library)",
            state_file.display(),
            state.len(),
            train_so.display(),
            info.state_size
        ));
    }
    write_trained_onnx(original, &state, info, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnnc_ir::DType;
    use cnnc_onnx::{ModelBuilder, attr};

    fn bn_model() -> ModelProto {
        let mut m = ModelBuilder::new("bn", 17);
        m.input("x", DType::F32, &[2, 3])
            .initializer("w", &Tensor::f32([3, 2], vec![1.0; 6]))
            .initializer("bn.weight", &Tensor::f32([2], vec![1.0, 1.0]))
            .initializer("bn.bias", &Tensor::f32([2], vec![0.0, 0.0]))
            .initializer("bn.running_mean", &Tensor::f32([2], vec![0.0, 0.0]))
            .initializer("bn.running_var", &Tensor::f32([2], vec![1.0, 1.0]))
            .node("MatMul", &["x", "w"], &["h"], vec![])
            .node(
                "BatchNormalization",
                &["h", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"],
                &["y", "rm", "rv"],
                vec![attr::int("training_mode", 1)],
            )
            .output("y", DType::F32, &[2, 2]);
        m.proto().clone()
    }

    #[test]
    fn initializers_are_replaced_and_batchnorm_switched_to_inference() {
        let trained = vec![
            ("w".to_string(), Tensor::f32([3, 2], vec![0.5, -0.5, 0.25, 1.0, 2.0, 3.0])),
            ("bn.running_mean".to_string(), Tensor::f32([2], vec![0.1, 0.2])),
        ];
        let (model, report) = replace_initializers(&bn_model(), None, &trained).unwrap();
        assert_eq!(report.replaced, ["w", "bn.running_mean"]);
        assert_eq!(report.switched_to_inference, 1);
        let graph = model.graph.as_ref().unwrap();
        let value =
            |name: &str| tensor_from_proto(graph.initializer.iter().find(|t| t.name == name).unwrap(), None).unwrap();
        assert_eq!(value("w"), trained[0].1);
        assert_eq!(value("bn.running_mean"), trained[1].1);
        assert_eq!(value("bn.running_var"), Tensor::f32([2], vec![1.0, 1.0]));
        let bn = graph.node.iter().find(|n| n.op_type == "BatchNormalization").unwrap();
        assert_eq!(bn.output, ["y"]);
        assert!(bn.attribute.iter().all(|a| a.name != "training_mode"));
    }

    #[test]
    fn mismatched_state_is_refused_with_the_reason() {
        let wrong_shape = vec![("w".to_string(), Tensor::f32([2, 3], vec![0.0; 6]))];
        let err = replace_initializers(&bn_model(), None, &wrong_shape).unwrap_err();
        assert!(err.contains("initializer 'w' is f32[3,2] in the model, f32[2,3] in the trained state"), "{err}");
        let unknown = vec![("fc.weight".to_string(), Tensor::f32([1], vec![0.0]))];
        let err = replace_initializers(&bn_model(), None, &unknown).unwrap_err();
        assert!(err.contains("'fc.weight' is not an initializer"), "{err}");
    }

    #[test]
    fn a_read_training_output_cannot_be_switched() {
        let mut model = bn_model();
        let graph = model.graph.as_mut().unwrap();
        graph.output.push(graph.output[0].clone());
        graph.output[1].name = "rm".into();
        let err = replace_initializers(&model, None, &[]).unwrap_err();
        assert!(err.contains("'rm' is read"), "{err}");
    }
}
