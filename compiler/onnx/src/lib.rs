//! ONNX frontend: protobuf messages (`proto`), tensors and `.pb` files (`tensor`), loading and
//! lowering to cnnc IR (`load`, `lower`, `ops`), and a writer for building models in code
//! (`writer`).
//!
//! How to add an op lowering: see `LOWERING.md` next to this crate's `Cargo.toml`.

pub mod ctx;
pub mod error;
mod fold;
pub mod load;
mod lower;
pub mod ops;
pub mod proto;
pub mod tensor;
pub mod writer;

pub use error::{FrontendError, UnsupportedNode};
pub use load::{
    LoadOptions, SUPPORTED_OPSETS, decode_model, load_model, load_model_bytes, load_model_with_constant_inputs,
    lower_model,
};
pub use tensor::{read_tensor_pb, tensor_from_proto, tensor_to_proto, write_tensor_pb};
pub use writer::{Dim, ModelBuilder, attr, node};
