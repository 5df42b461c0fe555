//! Model::load against fake models: metadata round-trips, and every refusal is clear.

mod common;

use cnnc_runtime::{DType, LoadError, LoadErrorKind, Model, TensorSpec, abi, cpu};
use common::{FakeModel, TempDir, have_cc};

fn load_err(path: &std::path::Path) -> LoadError {
    match Model::load(path) {
        Ok(model) => panic!("{} loaded, but should have been refused: {:?}", path.display(), model.info()),
        Err(e) => e,
    }
}

#[test]
fn metadata_round_trips() {
    if !have_cc("metadata_round_trips") {
        return;
    }
    let dir = TempDir::new("meta");
    let path = FakeModel::default().build(&dir, "fake");
    let model = Model::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let info = model.info();
    assert_eq!(info.name, "fake_add");
    assert_eq!(info.target, common::host_target());
    let expected_features: Vec<String> = cpu::parse_feature_list(common::baseline_feature());
    assert_eq!(info.cpu_features, expected_features);
    assert_eq!(
        info.inputs,
        vec![
            TensorSpec { name: "a".into(), dtype: DType::F32, shape: vec![2, 3], offset: 0 },
            TensorSpec { name: "b".into(), dtype: DType::I64, shape: vec![1], offset: 0 },
        ]
    );
    assert_eq!(info.outputs, vec![TensorSpec { name: "sum".into(), dtype: DType::F32, shape: vec![2, 3], offset: 0 }]);
    assert_eq!(info.workspace_size, 64);
    assert_eq!(info.workspace_align, 64);
    assert_eq!(info.entry_flags, abi::ENTRY_INFER);
    assert!(info.has_inference());
    assert!(!info.has_training());
    assert_eq!(info.state_size, 32);
    assert_eq!(info.state_tensors, vec![TensorSpec { name: "w".into(), dtype: DType::F32, shape: vec![4], offset: 16 }]);
    assert_eq!(info.inputs[0].byte_len(), 24);
    assert_eq!(info.inputs[1].byte_len(), 8);
    assert_eq!(model.path(), path.as_path());
}

#[test]
fn relative_paths_mean_the_working_directory() {
    if !have_cc("relative_paths_mean_the_working_directory") {
        return;
    }
    let dir = TempDir::new("relative");
    let path = FakeModel::default().build(&dir, "relative_fake");
    // A bare file name must not send dlopen searching the system library path.
    let cwd = std::env::current_dir().expect("cwd");
    let relative = pathdiff(&path, &cwd);
    let model = Model::load(&relative).unwrap_or_else(|e| panic!("loading {}: {e}", relative.display()));
    assert_eq!(model.info().name, "fake_add");
}

/// `path` relative to `base` ("../../tmp/x.so"), both absolute.
fn pathdiff(path: &std::path::Path, base: &std::path::Path) -> std::path::PathBuf {
    let path: Vec<_> = path.components().collect();
    let base: Vec<_> = base.components().collect();
    let common = path.iter().zip(&base).take_while(|(a, b)| a == b).count();
    let mut out = std::path::PathBuf::new();
    for _ in common..base.len() {
        out.push("..");
    }
    for c in &path[common..] {
        out.push(c);
    }
    out
}

#[test]
fn other_abi_version_is_refused() {
    if !have_cc("other_abi_version_is_refused") {
        return;
    }
    let dir = TempDir::new("abi");
    let path = FakeModel { abi_version: 99, ..FakeModel::default() }.build(&dir, "abi99");
    let err = load_err(&path);
    assert!(matches!(err.kind, LoadErrorKind::AbiVersion { found: 99, expected: 1 }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("ABI version 99") && message.contains("ABI version 1"), "{message}");
    assert!(message.contains("abi99.so"), "{message}");
}

#[test]
fn missing_cpu_feature_is_refused() {
    if !have_cc("missing_cpu_feature_is_refused") {
        return;
    }
    if std::env::consts::ARCH != "x86_64" {
        eprintln!("SKIP missing_cpu_feature_is_refused: the feature probe is x86-64 specific");
        return;
    }
    if cpu::has_feature("avx512fp16") == Some(true) {
        eprintln!("SKIP missing_cpu_feature_is_refused: this CPU has avx512fp16");
        return;
    }
    let dir = TempDir::new("feature");
    let features = "sse2,avx512fp16";
    let path = FakeModel { cpu_features: features.into(), ..FakeModel::default() }.build(&dir, "fp16");
    let err = load_err(&path);
    match &err.kind {
        LoadErrorKind::MissingCpuFeatures { missing, .. } => assert_eq!(missing, &vec!["avx512fp16".to_string()]),
        other => panic!("expected MissingCpuFeatures, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains("needs CPU features avx512fp16 which this CPU lacks"), "{message}");
    assert!(message.contains("--cpu host"), "{message}");
}

#[test]
fn unknown_cpu_feature_is_refused() {
    if !have_cc("unknown_cpu_feature_is_refused") {
        return;
    }
    let dir = TempDir::new("unknown-feature");
    let path = FakeModel { cpu_features: "made-up-feature".into(), ..FakeModel::default() }.build(&dir, "madeup");
    let err = load_err(&path);
    assert!(
        matches!(&err.kind, LoadErrorKind::UnknownCpuFeature { feature, .. } if feature == "made-up-feature"),
        "{err:?}"
    );
    assert!(err.to_string().contains("made-up-feature"), "{err}");
}

#[test]
fn other_architecture_is_refused() {
    if !have_cc("other_architecture_is_refused") {
        return;
    }
    let dir = TempDir::new("arch");
    let target = "riscv64gc-unknown-linux-gnu";
    let path = FakeModel { target: target.into(), cpu_features: String::new(), ..FakeModel::default() }.build(&dir, "riscv");
    let err = load_err(&path);
    assert!(matches!(&err.kind, LoadErrorKind::WrongArchitecture { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(target) && message.contains(std::env::consts::ARCH), "{message}");
}

#[test]
fn malformed_metadata_is_refused() {
    if !have_cc("malformed_metadata_is_refused") {
        return;
    }
    let dir = TempDir::new("malformed");
    let cases = [
        ("dtype", FakeModel { b_dtype: "99", ..FakeModel::default() }, "unknown dtype code 99"),
        ("null_name", FakeModel { a_name: "0", ..FakeModel::default() }, "inputs[0].name is a null pointer"),
        ("null_shape", FakeModel { a_shape: "0", ..FakeModel::default() }, "shape is a null pointer"),
        ("align", FakeModel { workspace_align: 48, ..FakeModel::default() }, "power of two"),
        ("state", FakeModel { state_offset: 24, ..FakeModel::default() }, "does not fit in the state buffer"),
    ];
    for (name, fake, expected) in cases {
        let err = load_err(&fake.build(&dir, name));
        assert!(matches!(err.kind, LoadErrorKind::BadMetadata(_)), "{name}: {err:?}");
        assert!(err.to_string().contains(expected), "{name}: {err}");
    }
}

#[test]
fn inference_flag_without_entry_point_is_refused() {
    if !have_cc("inference_flag_without_entry_point_is_refused") {
        return;
    }
    let dir = TempDir::new("no-infer");
    common::write_header(dir.path());
    let source = FakeModel::default().source().replace("int32_t cnnc_infer(", "int32_t renamed_infer(");
    let path = common::compile_shared(dir.path(), "noinfer", &source);
    let err = load_err(&path);
    assert!(matches!(err.kind, LoadErrorKind::MissingSymbol { symbol: "cnnc_infer", .. }), "{err:?}");
}

#[test]
fn training_only_model_loads_but_cannot_infer() {
    if !have_cc("training_only_model_loads_but_cannot_infer") {
        return;
    }
    let dir = TempDir::new("train-only");
    let path = FakeModel { entry_flags: "CNNC_ENTRY_TRAIN", ..FakeModel::default() }.build(&dir, "trainonly");
    let model = Model::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(!model.info().has_inference());
    let mut session = cnnc_runtime::Session::new(&model, 1).expect("session");
    assert_eq!(session.run_f32(&[]), Err(cnnc_runtime::RunError::NoInferenceEntry));
}

#[test]
fn shared_object_without_the_symbols_is_refused() {
    if !have_cc("shared_object_without_the_symbols_is_refused") {
        return;
    }
    let dir = TempDir::new("nosym");
    let path = common::compile_shared(dir.path(), "plain", "int answer(void) { return 42; }\n");
    let err = load_err(&path);
    assert!(matches!(err.kind, LoadErrorKind::MissingSymbol { symbol: "cnnc_model_info", .. }), "{err:?}");
    assert!(err.to_string().contains("does not export `cnnc_model_info`"), "{err}");
}

#[test]
fn non_shared_object_is_refused() {
    let dir = TempDir::new("text");
    let path = dir.path().join("model.so");
    std::fs::write(&path, "this is not an ELF file\n").expect("writing");
    let err = load_err(&path);
    assert!(matches!(err.kind, LoadErrorKind::Open(_)), "{err:?}");
    assert!(err.to_string().starts_with(&path.display().to_string()), "{err}");
}

#[test]
fn missing_file_and_directory_are_refused() {
    let dir = TempDir::new("missing");
    let err = load_err(&dir.path().join("absent.so"));
    assert!(matches!(err.kind, LoadErrorKind::Io(_)), "{err:?}");
    assert!(err.to_string().contains("absent.so"), "{err}");
    let err = load_err(dir.path());
    assert!(matches!(err.kind, LoadErrorKind::Io(_)), "{err:?}");
}
