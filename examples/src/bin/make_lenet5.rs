//! Writes the LeNet-5 example as an ONNX backend-test case:
//! `DIR/model.onnx`, `DIR/test_data_set_0/input_0.pb` and the expected
//! `output_0.pb` computed by cnnc's reference interpreter.

use std::path::PathBuf;
use std::process::ExitCode;

use cnnc_examples::lenet5::{lenet5_onnx, sample_image};

fn main() -> ExitCode {
    let Some(dir) = std::env::args().nth(1).map(PathBuf::from) else {
        eprintln!("usage: make-lenet5 OUT_DIR");
        return ExitCode::from(2);
    };
    match write_case(&dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("make-lenet5: {e}");
            ExitCode::from(1)
        }
    }
}

fn write_case(dir: &std::path::Path) -> Result<(), String> {
    let data = dir.join("test_data_set_0");
    std::fs::create_dir_all(&data).map_err(|e| format!("creating {}: {e}", data.display()))?;
    let bytes = lenet5_onnx(1, 5);
    let model = dir.join("model.onnx");
    std::fs::write(&model, &bytes).map_err(|e| format!("writing {}: {e}", model.display()))?;
    let image = sample_image(1);
    let graph = cnnc_onnx::load_model_bytes(&bytes, &cnnc_onnx::LoadOptions::default()).map_err(|e| e.to_string())?;
    let expected = cnnc_ir::interp::run(&graph, std::slice::from_ref(&image))?;
    cnnc_onnx::write_tensor_pb(data.join("input_0.pb"), "image", &image).map_err(|e| e.to_string())?;
    cnnc_onnx::write_tensor_pb(data.join("output_0.pb"), "logits", &expected[0]).map_err(|e| e.to_string())?;
    println!("wrote {} (LeNet-5, {} bytes) and a test data set with the interpreter's output", model.display(), bytes.len());
    Ok(())
}
