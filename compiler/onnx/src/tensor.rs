//! TensorProto <-> `cnnc_ir::Tensor`, and `.pb` files holding one serialized TensorProto.

use std::path::{Path, PathBuf};

use cnnc_ir::{DType, Tensor, TensorData};
use prost::Message;

use crate::error::FrontendError;
use crate::proto::{DataLocation, TensorProto, data_type};

/// The cnnc dtype of an ONNX element type, or an "unsupported element type" error.
pub fn dtype_from_onnx(elem_type: i32) -> Result<DType, FrontendError> {
    match elem_type {
        data_type::FLOAT => Ok(DType::F32),
        data_type::INT64 => Ok(DType::I64),
        data_type::INT32 => Ok(DType::I32),
        data_type::BOOL => Ok(DType::Bool),
        other => Err(FrontendError::UnsupportedFeature(format!(
            "element type {} (cnnc supports float, int64, int32 and bool)",
            data_type::name(other)
        ))),
    }
}

pub fn dtype_to_onnx(dtype: DType) -> i32 {
    match dtype {
        DType::F32 => data_type::FLOAT,
        DType::I64 => data_type::INT64,
        DType::I32 => data_type::INT32,
        DType::Bool => data_type::BOOL,
    }
}

fn invalid(tensor: &TensorProto, msg: impl std::fmt::Display) -> FrontendError {
    FrontendError::Invalid(format!("tensor '{}': {msg}", tensor.name))
}

/// The tensor's shape, checked: no negative dims, no element count overflow.
fn shape_of(tensor: &TensorProto) -> Result<(Vec<usize>, usize), FrontendError> {
    let mut shape = Vec::with_capacity(tensor.dims.len());
    let mut count: usize = 1;
    for &d in &tensor.dims {
        let d = usize::try_from(d).map_err(|_| invalid(tensor, format!("negative dimension {d}")))?;
        count = count.checked_mul(d).ok_or_else(|| invalid(tensor, "element count overflows"))?;
        shape.push(d);
    }
    Ok((shape, count))
}

/// Converts a TensorProto. `base_dir` is where external data paths are relative to (the
/// model's directory); without it, external data is an error.
pub fn tensor_from_proto(tensor: &TensorProto, base_dir: Option<&Path>) -> Result<Tensor, FrontendError> {
    let dtype = dtype_from_onnx(tensor.data_type).map_err(|e| match e {
        FrontendError::UnsupportedFeature(m) => {
            FrontendError::UnsupportedFeature(format!("tensor '{}': {m}", tensor.name))
        }
        other => other,
    })?;
    if tensor.segment.is_some() {
        return Err(FrontendError::UnsupportedFeature(format!("tensor '{}': segmented tensors", tensor.name)));
    }
    let (shape, count) = shape_of(tensor)?;
    let external;
    let raw: Option<&[u8]> = if tensor.data_location == DataLocation::External as i32 {
        external = read_external(tensor, base_dir)?;
        Some(&external)
    } else if !tensor.raw_data.is_empty() {
        Some(&tensor.raw_data)
    } else {
        None
    };
    let data = match raw {
        Some(bytes) => {
            let expected = count.checked_mul(dtype.size()).ok_or_else(|| invalid(tensor, "byte size overflows"))?;
            if bytes.len() != expected {
                return Err(invalid(
                    tensor,
                    format!("raw data has {} bytes, shape {:?} of {} needs {expected}", bytes.len(), shape, dtype),
                ));
            }
            TensorData::from_le_bytes(dtype, bytes)
        }
        None => typed_data(tensor, dtype)?,
    };
    if data.len() != count {
        return Err(invalid(tensor, format!("has {} elements, shape {:?} needs {count}", data.len(), shape)));
    }
    Ok(Tensor::new(shape, data))
}

fn typed_data(tensor: &TensorProto, dtype: DType) -> Result<TensorData, FrontendError> {
    Ok(match dtype {
        DType::F32 => TensorData::F32(tensor.float_data.clone()),
        DType::I64 => TensorData::I64(tensor.int64_data.clone()),
        DType::I32 => TensorData::I32(tensor.int32_data.clone()),
        DType::Bool => {
            if let Some(v) = tensor.int32_data.iter().find(|&&v| v != 0 && v != 1) {
                return Err(invalid(tensor, format!("bool element {v} is neither 0 nor 1")));
            }
            TensorData::Bool(tensor.int32_data.iter().map(|&v| v != 0).collect())
        }
    })
}

fn read_external(tensor: &TensorProto, base_dir: Option<&Path>) -> Result<Vec<u8>, FrontendError> {
    let mut location = None;
    let mut offset: u64 = 0;
    let mut length: Option<u64> = None;
    for entry in &tensor.external_data {
        let number = || {
            entry.value.parse::<u64>().map_err(|_| {
                invalid(tensor, format!("external data {} '{}' is not a non-negative integer", entry.key, entry.value))
            })
        };
        match entry.key.as_str() {
            "location" => location = Some(entry.value.as_str()),
            "offset" => offset = number()?,
            "length" => length = Some(number()?),
            _ => {}
        }
    }
    let location = location.ok_or_else(|| invalid(tensor, "external data has no location"))?;
    let relative = Path::new(location);
    if relative.is_absolute() || relative.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(invalid(
            tensor,
            format!("external data location '{location}' must stay inside the model's directory"),
        ));
    }
    let base = base_dir.ok_or_else(|| {
        FrontendError::UnsupportedFeature(format!(
            "tensor '{}': external data without a model directory (load the model from a file)",
            tensor.name
        ))
    })?;
    let path: PathBuf = base.join(relative);
    let bytes = std::fs::read(&path).map_err(|e| FrontendError::io(&path, e))?;
    let start = usize::try_from(offset).ok().filter(|&s| s <= bytes.len()).ok_or_else(|| {
        invalid(
            tensor,
            format!("external data offset {offset} is past the end of {} ({} bytes)", path.display(), bytes.len()),
        )
    })?;
    let end = match length {
        Some(len) => {
            usize::try_from(len).ok().and_then(|l| start.checked_add(l)).filter(|&e| e <= bytes.len()).ok_or_else(
                || invalid(tensor, format!("external data [{offset}, +{len}) is past the end of {}", path.display())),
            )?
        }
        None => bytes.len(),
    };
    Ok(bytes[start..end].to_vec())
}

/// A TensorProto holding `tensor` as raw little-endian data (as ONNX's numpy_helper writes it).
pub fn tensor_to_proto(name: &str, tensor: &Tensor) -> TensorProto {
    TensorProto {
        dims: tensor.shape.iter().map(|&d| d as i64).collect(),
        data_type: dtype_to_onnx(tensor.data.dtype()),
        name: name.to_string(),
        raw_data: tensor.data.to_le_bytes(),
        ..Default::default()
    }
}

/// Reads a `.pb` file holding one serialized TensorProto; returns its name and value.
/// External data is resolved relative to the file's directory.
pub fn read_tensor_pb(path: impl AsRef<Path>) -> Result<(String, Tensor), FrontendError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| FrontendError::io(path, e))?;
    let proto =
        TensorProto::decode(bytes.as_slice()).map_err(|e| FrontendError::Decode(format!("{}: {e}", path.display())))?;
    let tensor = tensor_from_proto(&proto, path.parent())?;
    Ok((proto.name, tensor))
}

/// Writes `tensor` as a serialized TensorProto named `name`.
pub fn write_tensor_pb(path: impl AsRef<Path>, name: &str, tensor: &Tensor) -> Result<(), FrontendError> {
    let path = path.as_ref();
    std::fs::write(path, tensor_to_proto(name, tensor).encode_to_vec()).map_err(|e| FrontendError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_dtype() {
        let cases = [
            Tensor::f32([2, 2], vec![1.0, -0.0, f32::NAN, f32::INFINITY]),
            Tensor::new([3], TensorData::I64(vec![i64::MIN, 0, i64::MAX])),
            Tensor::new([1, 2], TensorData::I32(vec![-7, 7])),
            Tensor::new([2], TensorData::Bool(vec![true, false])),
            Tensor::new([0, 3], TensorData::F32(vec![])),
            Tensor::new([], TensorData::F32(vec![2.5])),
        ];
        for t in cases {
            let back = tensor_from_proto(&tensor_to_proto("x", &t), None).unwrap();
            assert_eq!(back, t);
        }
    }

    #[test]
    fn reads_typed_fields() {
        let p = TensorProto {
            dims: vec![2],
            data_type: data_type::FLOAT,
            float_data: vec![1.0, 2.0],
            ..Default::default()
        };
        assert_eq!(tensor_from_proto(&p, None).unwrap(), Tensor::f32([2], vec![1.0, 2.0]));
        let p =
            TensorProto { dims: vec![3], data_type: data_type::BOOL, int32_data: vec![1, 0, 1], ..Default::default() };
        assert_eq!(tensor_from_proto(&p, None).unwrap().data, TensorData::Bool(vec![true, false, true]));
    }

    #[test]
    fn refuses_unsupported_and_malformed_tensors() {
        let p = TensorProto {
            name: "w".into(),
            dims: vec![1],
            data_type: data_type::DOUBLE,
            double_data: vec![1.0],
            ..Default::default()
        };
        let e = tensor_from_proto(&p, None).unwrap_err();
        assert!(e.is_unsupported(), "{e}");
        assert!(e.to_string().contains("double"), "{e}");
        let p = TensorProto { dims: vec![3], data_type: data_type::FLOAT, float_data: vec![1.0], ..Default::default() };
        assert!(matches!(tensor_from_proto(&p, None), Err(FrontendError::Invalid(_))));
        let p = TensorProto { dims: vec![-1], data_type: data_type::FLOAT, ..Default::default() };
        assert!(matches!(tensor_from_proto(&p, None), Err(FrontendError::Invalid(_))));
        let p = TensorProto { dims: vec![2], data_type: data_type::INT64, raw_data: vec![0; 15], ..Default::default() };
        assert!(matches!(tensor_from_proto(&p, None), Err(FrontendError::Invalid(_))));
    }

    #[test]
    fn reads_external_data_relative_to_the_model() {
        let dir = std::env::temp_dir().join(format!("cnnc-onnx-ext-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut payload = vec![0xAAu8; 3];
        payload.extend(Tensor::f32([2], vec![1.5, -2.0]).data.to_le_bytes());
        std::fs::write(dir.join("weights.bin"), &payload).unwrap();
        let entry = |k: &str, v: &str| crate::proto::StringStringEntryProto { key: k.into(), value: v.into() };
        let p = TensorProto {
            name: "w".into(),
            dims: vec![2],
            data_type: data_type::FLOAT,
            data_location: DataLocation::External as i32,
            external_data: vec![entry("location", "weights.bin"), entry("offset", "3"), entry("length", "8")],
            ..Default::default()
        };
        assert_eq!(tensor_from_proto(&p, Some(&dir)).unwrap(), Tensor::f32([2], vec![1.5, -2.0]));
        let mut past_end = p.clone();
        past_end.external_data[1] = entry("offset", "8");
        assert!(matches!(tensor_from_proto(&past_end, Some(&dir)), Err(FrontendError::Invalid(_))));
        let mut escaping = p.clone();
        escaping.external_data[0] = entry("location", "../weights.bin");
        assert!(matches!(tensor_from_proto(&escaping, Some(&dir)), Err(FrontendError::Invalid(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pb_files_round_trip() {
        let path = std::env::temp_dir().join(format!("cnnc-onnx-pb-{}.pb", std::process::id()));
        let t = Tensor::new([2, 1], TensorData::I64(vec![4, -4]));
        write_tensor_pb(&path, "output_0", &t).unwrap();
        assert_eq!(read_tensor_pb(&path).unwrap(), ("output_0".to_string(), t));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(read_tensor_pb(&path), Err(FrontendError::Io { .. })));
    }
}
