//! The `cnnc` command line end to end on models built in code: compile to a shared
//! object, run it, compare with the reference interpreter; exit statuses and
//! messages on bad input. Self-contained (no ../shared).

mod common;

use cnnc_examples::lenet5::{lenet5_onnx, sample_image};
use cnnc_ir::{DType, Tensor};
use cnnc_onnx::{Dim, ModelBuilder, attr};

fn assert_clean_failure(out: &std::process::Output, status: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(status), "stderr: {stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "no panics: {stderr}");
    stderr
}

#[test]
fn compiled_lenet5_matches_the_interpreter() {
    let dir = common::scratch("lenet5");
    let model = dir.join("lenet5.onnx");
    let bytes = lenet5_onnx(1, 7);
    std::fs::write(&model, &bytes).unwrap();
    let so = dir.join("lenet5.so");
    let header = dir.join("lenet5.h");
    let out = common::run_cnnc(&["compile", model.to_str().unwrap(), "-o", so.to_str().unwrap(), "--header", header.to_str().unwrap()]);
    assert!(out.status.success(), "compile: {}", String::from_utf8_lossy(&out.stderr));

    let image = sample_image(1);
    let input = dir.join("input_0.pb");
    cnnc_onnx::write_tensor_pb(&input, "image", &image).unwrap();
    let result = dir.join("result");
    let out = common::run_cnnc(&["run", so.to_str().unwrap(), "--input", input.to_str().unwrap(), "--out", result.to_str().unwrap()]);
    assert!(out.status.success(), "run: {}", String::from_utf8_lossy(&out.stderr));
    let (name, got) = cnnc_onnx::read_tensor_pb(result.join("output_0.pb")).unwrap();
    assert_eq!(name, "logits");

    let graph = cnnc_onnx::load_model_bytes(&bytes, &Default::default()).unwrap();
    let want = cnnc_ir::interp::run(&graph, &[image]).unwrap();
    cnnc::compare::compare(&got, &want[0]).unwrap();

    // The header is valid C.
    if std::process::Command::new("cc").arg("--version").output().is_ok() {
        let c = dir.join("use_header.c");
        std::fs::write(&c, "#include \"lenet5.h\"\nint main(void){ return cnnc_model_info()->abi_version == CNNC_ABI_VERSION ? 0 : 1; }\n").unwrap();
        let st = std::process::Command::new("cc")
            .arg("-fsyntax-only")
            .arg("-I")
            .arg(&dir)
            .arg(&c)
            .status()
            .unwrap();
        assert!(st.success(), "the generated header must compile");
    }
}

#[test]
fn batch_flag_sets_a_symbolic_leading_dimension() {
    let dir = common::scratch("batch");
    let mut m = ModelBuilder::new("scale", 17);
    m.input_with_dims("x", 1, &[Dim::Symbolic("N".into()), Dim::Fixed(3)])
        .initializer("k", &Tensor::f32(vec![3], vec![1.0, 2.0, 3.0]))
        .node("Mul", &["x", "k"], &["y"], vec![])
        .output("y", DType::F32, &[1, 3]);
    let model = dir.join("scale.onnx");
    m.write(&model).unwrap();
    let so = dir.join("scale.so");
    let out = common::run_cnnc(&["compile", model.to_str().unwrap(), "-o", so.to_str().unwrap(), "--batch", "4"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let x = Tensor::f32(vec![4, 3], (0..12).map(|i| i as f32).collect());
    let input = dir.join("x.pb");
    cnnc_onnx::write_tensor_pb(&input, "x", &x).unwrap();
    let out = common::run_cnnc(&["run", so.to_str().unwrap(), "--input", input.to_str().unwrap(), "--out", dir.join("r").to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, y) = cnnc_onnx::read_tensor_pb(dir.join("r/output_0.pb")).unwrap();
    let want: Vec<f32> = (0..12).map(|i| i as f32 * [1.0, 2.0, 3.0][i % 3]).collect();
    assert_eq!(y, Tensor::f32(vec![4, 3], want));

    // A wrongly shaped input is refused with a message naming the input.
    let bad = dir.join("bad.pb");
    cnnc_onnx::write_tensor_pb(&bad, "x", &Tensor::f32(vec![2, 3], vec![0.0; 6])).unwrap();
    let out = common::run_cnnc(&["run", so.to_str().unwrap(), "--input", bad.to_str().unwrap(), "--out", dir.join("r2").to_str().unwrap()]);
    let stderr = assert_clean_failure(&out, 2);
    assert!(stderr.contains("`x`"), "{stderr}");
}

#[test]
fn unsupported_nodes_are_all_listed_with_status_2() {
    let dir = common::scratch("unsupported");
    let mut m = ModelBuilder::new("odd", 17);
    m.input("x", DType::F32, &[1, 4])
        .node("Relu", &["x"], &["a"], vec![])
        .node("Hardmax", &["a"], &["b"], vec![])
        .node("Relu", &["b"], &["c"], vec![])
        .node("LpNormalization", &["c"], &["d"], vec![attr::int("p", 2)])
        .output("d", DType::F32, &[1, 4]);
    let model = dir.join("odd.onnx");
    m.write(&model).unwrap();
    let out = common::run_cnnc(&["compile", model.to_str().unwrap(), "-o", dir.join("odd.so").to_str().unwrap()]);
    let stderr = assert_clean_failure(&out, 2);
    assert!(stderr.contains("Hardmax") && stderr.contains("LpNormalization"), "both nodes listed: {stderr}");
    assert!(stderr.contains("opset 17"), "{stderr}");
}

#[test]
fn bad_usage_and_bad_files_exit_2_without_panicking() {
    assert_clean_failure(&common::run_cnnc(&[]), 2);
    assert_clean_failure(&common::run_cnnc(&["frobnicate"]), 2);
    assert_clean_failure(&common::run_cnnc(&["compile", "/nonexistent/model.onnx", "-o", "/tmp/x.so"]), 2);
    assert_clean_failure(&common::run_cnnc(&["compile", "model.onnx"]), 2);
    assert_clean_failure(&common::run_cnnc(&["bench", "m.onnx", "--threads", "zero"]), 2);
    let dir = common::scratch("garbage");
    let junk = dir.join("junk.onnx");
    std::fs::write(&junk, b"this is not protobuf \xff\xff\xff").unwrap();
    let stderr = assert_clean_failure(&common::run_cnnc(&["compile", junk.to_str().unwrap(), "-o", dir.join("j.so").to_str().unwrap()]), 2);
    assert!(stderr.contains("junk.onnx"), "{stderr}");
    let so = dir.join("fake.so");
    std::fs::write(&so, b"not an ELF file").unwrap();
    let input = dir.join("in.pb");
    cnnc_onnx::write_tensor_pb(&input, "x", &Tensor::f32(vec![1], vec![0.0])).unwrap();
    assert_clean_failure(&common::run_cnnc(&["run", so.to_str().unwrap(), "--input", input.to_str().unwrap(), "--out", dir.to_str().unwrap()]), 2);
}

#[test]
fn verify_reports_each_case_and_a_summary() {
    let dir = common::scratch("verify");
    let case = dir.join("lenet5_case");
    std::fs::create_dir_all(case.join("test_data_set_0")).unwrap();
    let bytes = lenet5_onnx(1, 3);
    std::fs::write(case.join("model.onnx"), &bytes).unwrap();
    let image = sample_image(1);
    let graph = cnnc_onnx::load_model_bytes(&bytes, &Default::default()).unwrap();
    let want = cnnc_ir::interp::run(&graph, std::slice::from_ref(&image)).unwrap();
    cnnc_onnx::write_tensor_pb(case.join("test_data_set_0/input_0.pb"), "image", &image).unwrap();
    cnnc_onnx::write_tensor_pb(case.join("test_data_set_0/output_0.pb"), "logits", &want[0]).unwrap();
    // A second case whose expected output is wrong must FAIL (exit 1).
    let wrong = dir.join("wrong_case");
    std::fs::create_dir_all(wrong.join("test_data_set_0")).unwrap();
    std::fs::write(wrong.join("model.onnx"), &bytes).unwrap();
    let mut off = want[0].clone();
    if let cnnc_ir::TensorData::F32(v) = &mut off.data {
        v[3] += 1.0;
    }
    cnnc_onnx::write_tensor_pb(wrong.join("test_data_set_0/input_0.pb"), "image", &image).unwrap();
    cnnc_onnx::write_tensor_pb(wrong.join("test_data_set_0/output_0.pb"), "logits", &off).unwrap();

    let out = common::run_cnnc(&["verify", dir.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("PASS lenet5_case"), "{stdout}");
    assert!(stdout.contains("FAIL wrong_case: "), "{stdout}");
    assert!(stdout.trim_end().ends_with("1 passed, 1 failed, 0 skipped"), "{stdout}");
}

#[test]
fn dump_lists_passes_and_prints_ir_after_each() {
    let dir = common::scratch("dump");
    let model = dir.join("lenet5.onnx");
    std::fs::write(&model, lenet5_onnx(1, 1)).unwrap();
    let out = common::run_cnnc(&["dump", "--list-passes"]);
    assert!(out.status.success());
    let passes = String::from_utf8_lossy(&out.stdout).into_owned();
    let names: Vec<&str> = passes.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(!names.is_empty());
    let out = common::run_cnnc(&["dump", model.to_str().unwrap(), "--all"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for n in &names {
        assert!(text.contains(&format!("# after {n}")), "dump --all shows pass {n}");
    }
    let out = common::run_cnnc(&["dump", model.to_str().unwrap(), "--after", "no-such-pass"]);
    assert_clean_failure(&out, 2);
}

/// `dump --train` prints the fused training step after the training pipeline: the forward
/// convolutions, their gradients and the update are all there, at the batch asked for.
#[test]
fn dump_train_prints_the_optimised_training_step() {
    let dir = common::scratch("dump-train");
    let model = dir.join("lenet5.onnx");
    std::fs::write(&model, lenet5_onnx(1, 1)).unwrap();
    let out = common::run_cnnc(&["dump", model.to_str().unwrap(), "--train", "--batch", "3", "--full"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let parsed = cnnc_ir::parse(&text).expect("the dump parses as IR");
    cnnc_ir::verify(&parsed).expect("the dumped training graph verifies");
    assert!(parsed.inputs.iter().any(|&v| parsed.ty(v).shape.first() == Some(&3)), "batch 3 data input");
    assert!(text.contains("hyper.lr"), "the learning rate is an input");
    let out = common::run_cnnc(&["dump", model.to_str().unwrap(), "--train", "--all"]);
    assert_clean_failure(&out, 2);
}

#[test]
fn bench_prints_a_median() {
    let dir = common::scratch("bench");
    let model = dir.join("lenet5.onnx");
    std::fs::write(&model, lenet5_onnx(1, 1)).unwrap();
    let out = common::run_cnnc(&["bench", model.to_str().unwrap(), "--threads", "1", "--runs", "5"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("");
    let ms: f64 = last.strip_prefix("median_ms=").expect("last line median_ms=X").parse().unwrap();
    assert!(ms > 0.0);
}

/// A model exported in training mode (BatchNormalization training_mode=1, Dropout
/// training_mode=true) compiled for inference normalises with the running statistics
/// and drops nothing.
#[test]
fn training_mode_export_compiles_with_inference_semantics() {
    let dir = common::scratch("trainmode");
    let mut m = ModelBuilder::new("trainmode", 15);
    m.input("x", DType::F32, &[2, 2, 1, 3])
        .initializer("s", &Tensor::f32(vec![2], vec![2.0, 0.5]))
        .initializer("b", &Tensor::f32(vec![2], vec![1.0, -1.0]))
        .initializer("mean", &Tensor::f32(vec![2], vec![0.5, -0.5]))
        .initializer("var", &Tensor::f32(vec![2], vec![4.0, 0.25]))
        .initializer("ratio", &Tensor::f32(vec![], vec![0.5]))
        .initializer("training", &Tensor::new(vec![], cnnc_ir::TensorData::Bool(vec![true])))
        .node("BatchNormalization", &["x", "s", "b", "mean", "var"], &["y", "rm", "rv"], vec![attr::int("training_mode", 1), attr::float("epsilon", 0.0)])
        .node("Dropout", &["y", "ratio", "training"], &["z"], vec![attr::int("seed", 1)])
        .output("z", DType::F32, &[2, 2, 1, 3]);
    let model = dir.join("trainmode.onnx");
    m.write(&model).unwrap();
    let so = dir.join("trainmode.so");
    let out = common::run_cnnc(&["compile", model.to_str().unwrap(), "-o", so.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let xs: Vec<f32> = (0..12).map(|i| i as f32 - 5.0).collect();
    let input = dir.join("x.pb");
    cnnc_onnx::write_tensor_pb(&input, "x", &Tensor::f32(vec![2, 2, 1, 3], xs.clone())).unwrap();
    let out = common::run_cnnc(&["run", so.to_str().unwrap(), "--input", input.to_str().unwrap(), "--out", dir.join("r").to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, z) = cnnc_onnx::read_tensor_pb(dir.join("r/output_0.pb")).unwrap();
    let (s, b, mean, var) = ([2.0f32, 0.5], [1.0f32, -1.0], [0.5f32, -0.5], [4.0f32, 0.25]);
    let want: Vec<f32> = xs.iter().enumerate().map(|(i, &x)| {
        let c = (i / 3) % 2;
        (x - mean[c]) / var[c].sqrt() * s[c] + b[c]
    }).collect();
    cnnc::compare::compare(&z, &Tensor::f32(vec![2, 2, 1, 3], want)).unwrap();
}
