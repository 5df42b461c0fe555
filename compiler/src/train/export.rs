//! Writing trained state back as ONNX.
