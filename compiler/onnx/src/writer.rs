//! Building ONNX models in code: tests, examples and bundled models are made with this.
//!
//! ```
//! use cnnc_ir::DType;
//! use cnnc_onnx::{ModelBuilder, attr};
//! let bytes = ModelBuilder::new("tiny", 17)
//!     .input("x", DType::F32, &[1, 4])
//!     .node("LeakyRelu", &["x"], &["y"], vec![attr::float("alpha", 0.1)])
//!     .output("y", DType::F32, &[1, 4])
//!     .to_bytes();
//! assert!(!bytes.is_empty());
//! ```

use std::path::Path;

use cnnc_ir::{DType, Tensor};
use prost::Message;

use crate::proto::{
    AttributeProto, Dimension, DimensionValue, FunctionProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    TensorShapeProto, TypeProto, TypeProtoTensor, TypeValue, ValueInfoProto,
};
use crate::tensor::{dtype_to_onnx, tensor_to_proto};

/// ONNX IR version written (that of ONNX 1.16+, which readers of opset <= 21 accept).
const IR_VERSION: i64 = 10;

/// One dimension of a declared input/output shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dim {
    Fixed(usize),
    /// A named symbolic dimension, such as a dynamic batch.
    Symbolic(String),
    /// A dimension with neither value nor name.
    Unknown,
}

impl From<usize> for Dim {
    fn from(d: usize) -> Dim {
        Dim::Fixed(d)
    }
}

pub struct ModelBuilder {
    model: ModelProto,
    node_count: usize,
}

impl ModelBuilder {
    /// A model named `name` importing default-domain opset `opset`.
    pub fn new(name: &str, opset: i64) -> ModelBuilder {
        ModelBuilder {
            model: ModelProto {
                ir_version: IR_VERSION,
                producer_name: "cnnc".into(),
                opset_import: vec![OperatorSetIdProto { domain: String::new(), version: opset }],
                graph: Some(GraphProto { name: name.into(), ..Default::default() }),
                ..Default::default()
            },
            node_count: 0,
        }
    }

    fn graph(&mut self) -> &mut GraphProto {
        self.model.graph.get_or_insert_with(GraphProto::default)
    }

    /// Imports another opset (a custom domain, or a second default-domain entry in tests).
    pub fn opset(&mut self, domain: &str, version: i64) -> &mut Self {
        self.model.opset_import.push(OperatorSetIdProto { domain: domain.into(), version });
        self
    }

    pub fn input(&mut self, name: &str, dtype: DType, shape: &[usize]) -> &mut Self {
        let dims: Vec<Dim> = shape.iter().map(|&d| Dim::Fixed(d)).collect();
        self.input_with_dims(name, dtype_to_onnx(dtype), &dims)
    }

    /// An input of any ONNX element type (`proto::data_type`), with symbolic dims allowed.
    pub fn input_with_dims(&mut self, name: &str, elem_type: i32, dims: &[Dim]) -> &mut Self {
        let info = value_info(name, elem_type, Some(dims));
        self.graph().input.push(info);
        self
    }

    pub fn initializer(&mut self, name: &str, tensor: &Tensor) -> &mut Self {
        let proto = tensor_to_proto(name, tensor);
        self.graph().initializer.push(proto);
        self
    }

    /// Appends a node named `n<index>_<op_type>`; "" in `inputs` is an omitted optional input.
    pub fn node(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        outputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) -> &mut Self {
        let name = format!("n{}_{op_type}", self.node_count);
        self.node_count += 1;
        self.push_node(node(&name, op_type, inputs, outputs, attributes))
    }

    /// Appends a node built by hand (custom domain, chosen name...).
    pub fn push_node(&mut self, node: NodeProto) -> &mut Self {
        self.graph().node.push(node);
        self
    }

    pub fn output(&mut self, name: &str, dtype: DType, shape: &[usize]) -> &mut Self {
        let dims: Vec<Dim> = shape.iter().map(|&d| Dim::Fixed(d)).collect();
        let info = value_info(name, dtype_to_onnx(dtype), Some(&dims));
        self.graph().output.push(info);
        self
    }

    /// An output declared by name and element type only (shape left to inference).
    pub fn output_untyped(&mut self, name: &str, dtype: DType) -> &mut Self {
        let info = value_info(name, dtype_to_onnx(dtype), None);
        self.graph().output.push(info);
        self
    }

    /// Adds a model-local function (call it with a node of its domain and name).
    pub fn function(&mut self, function: FunctionProto) -> &mut Self {
        self.model.functions.push(function);
        self
    }

    pub fn proto(&self) -> &ModelProto {
        &self.model
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.model.encode_to_vec()
    }

    pub fn write(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        std::fs::write(path, self.to_bytes())
    }
}

/// A NodeProto; "" in `inputs` is an omitted optional input.
pub fn node(
    name: &str,
    op_type: &str,
    inputs: &[&str],
    outputs: &[&str],
    attributes: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        name: name.into(),
        op_type: op_type.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attributes,
        ..Default::default()
    }
}

fn value_info(name: &str, elem_type: i32, dims: Option<&[Dim]>) -> ValueInfoProto {
    let shape = dims.map(|dims| TensorShapeProto {
        dim: dims
            .iter()
            .map(|d| Dimension {
                value: match d {
                    Dim::Fixed(v) => Some(DimensionValue::DimValue(*v as i64)),
                    Dim::Symbolic(p) => Some(DimensionValue::DimParam(p.clone())),
                    Dim::Unknown => None,
                },
                denotation: String::new(),
            })
            .collect(),
    });
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(TypeValue::TensorType(TypeProtoTensor { elem_type, shape })),
            denotation: String::new(),
        }),
        ..Default::default()
    }
}

/// Attribute constructors for `ModelBuilder::node`.
pub mod attr {
    use cnnc_ir::Tensor;

    use crate::proto::{AttributeProto, AttributeType};
    use crate::tensor::tensor_to_proto;

    fn named(name: &str, kind: AttributeType) -> AttributeProto {
        AttributeProto { name: name.into(), r#type: kind as i32, ..Default::default() }
    }

    pub fn int(name: &str, value: i64) -> AttributeProto {
        AttributeProto { i: value, ..named(name, AttributeType::Int) }
    }

    pub fn ints(name: &str, values: &[i64]) -> AttributeProto {
        AttributeProto { ints: values.to_vec(), ..named(name, AttributeType::Ints) }
    }

    pub fn float(name: &str, value: f32) -> AttributeProto {
        AttributeProto { f: value, ..named(name, AttributeType::Float) }
    }

    pub fn floats(name: &str, values: &[f32]) -> AttributeProto {
        AttributeProto { floats: values.to_vec(), ..named(name, AttributeType::Floats) }
    }

    pub fn string(name: &str, value: &str) -> AttributeProto {
        AttributeProto { s: value.as_bytes().to_vec(), ..named(name, AttributeType::String) }
    }

    pub fn tensor(name: &str, value: &Tensor) -> AttributeProto {
        AttributeProto { t: Some(tensor_to_proto("", value)), ..named(name, AttributeType::Tensor) }
    }

    /// Inside a function body: attribute `name` takes the value of the caller's `referenced`.
    pub fn reference(name: &str, referenced: &str, kind: AttributeType) -> AttributeProto {
        AttributeProto { ref_attr_name: referenced.into(), ..named(name, kind) }
    }
}
