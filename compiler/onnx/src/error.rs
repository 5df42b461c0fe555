//! The frontend's error type. Every failure the user can cause is one of these, never a panic.

use std::fmt;
use std::path::PathBuf;

/// A node the frontend cannot lower, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsupportedNode {
    /// The ONNX node name, or its first output's name when the node is unnamed.
    pub name: String,
    pub op_type: String,
    /// Opset version of the node's domain (0 for a domain the model does not import).
    pub opset: i64,
    pub reason: String,
}

impl fmt::Display for UnsupportedNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node '{}' ({} opset {}): {}", self.name, self.op_type, self.opset, self.reason)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum FrontendError {
    /// A file could not be read or written.
    Io { path: PathBuf, message: String },
    /// The bytes are not a well-formed ONNX protobuf message.
    Decode(String),
    /// The model is well-formed protobuf but violates ONNX (bad attribute, shape mismatch,
    /// undefined input name...).
    Invalid(String),
    /// A tensor or model-level feature cnnc does not implement (element type, opset version...).
    UnsupportedFeature(String),
    /// Nodes cnnc cannot lower: all of them, one per entry.
    Unsupported(Vec<UnsupportedNode>),
}

impl FrontendError {
    /// True when the model is valid but uses something cnnc lacks (a test case to skip, not fail).
    pub fn is_unsupported(&self) -> bool {
        matches!(self, FrontendError::UnsupportedFeature(_) | FrontendError::Unsupported(_))
    }

    pub(crate) fn io(path: impl Into<PathBuf>, e: std::io::Error) -> FrontendError {
        FrontendError::Io { path: path.into(), message: e.to_string() }
    }
}

impl fmt::Display for FrontendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrontendError::Io { path, message } => write!(f, "{}: {message}", path.display()),
            FrontendError::Decode(m) => write!(f, "not a valid ONNX protobuf: {m}"),
            FrontendError::Invalid(m) => write!(f, "invalid model: {m}"),
            FrontendError::UnsupportedFeature(m) => write!(f, "unsupported: {m}"),
            FrontendError::Unsupported(nodes) => {
                write!(f, "{} unsupported node(s):", nodes.len())?;
                for n in nodes {
                    write!(f, "\n  {n}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for FrontendError {}
