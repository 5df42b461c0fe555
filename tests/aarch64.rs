//! Cross-compilation to AArch64, checked by running the code: models are compiled with
//! `cnnc compile --target aarch64-unknown-linux-gnu`, linked by Debian's cross gcc, and
//! run under qemu-user by a small C harness (tests/aarch64/harness.c) that drives the
//! model through its C ABI only. Outputs are compared with the reference interpreter
//! (or, for the shared zoo, with the outputs shipped beside the model) under the
//! tolerance of DESIGN.md.
//!
//! Needs `aarch64-linux-gnu-gcc` (gcc-aarch64-linux-gnu, libc6-dev-arm64-cross) and
//! `qemu-aarch64` (qemu-user). Without them the tests skip with a message -- unless
//! CI=true, where .ci/run installs them and their absence is a failure.

mod common;
#[path = "aarch64/models.rs"]
mod models;
#[path = "aarch64/qemu.rs"]
mod qemu;
#[path = "aarch64/sweep.rs"]
mod sweep;

use cnnc_examples::lenet5::{Rng, lenet5_onnx, sample_image};
use cnnc_ir::Tensor;

use models::uniform;
use qemu::{compile_and_run, harness};

/// Compiles and runs a model built in code, with both a NULL host and a two-thread
/// host, and checks every output against the interpreter.
fn check_against_interpreter(tag: &str, model: &[u8], inputs: &[Tensor]) {
    let Some(harness) = harness() else { return };
    let graph =
        cnnc_onnx::load_model_bytes(model, &Default::default()).expect("the test model loads");
    let want = cnnc_ir::interp::run(&graph, inputs).expect("the interpreter runs the test model");
    for threads in [0, 2] {
        let dir = common::scratch(&format!("aarch64-{tag}-t{threads}"));
        let onnx = dir.join("model.onnx");
        std::fs::write(&onnx, model).expect("write the model");
        let run = compile_and_run(harness, &dir, &onnx, inputs, threads);
        assert_eq!(run.outputs.len(), want.len(), "{tag}: number of outputs");
        let failures: Vec<String> = run
            .outputs
            .iter()
            .zip(&want)
            .filter_map(|((name, got), want)| {
                cnnc::compare::compare(got, want)
                    .err()
                    .map(|e| format!("  output `{name}`: {e}"))
            })
            .collect();
        assert!(
            failures.is_empty(),
            "{tag} on AArch64 (threads {threads}) differs from the interpreter:\n{}",
            failures.join("\n")
        );
        eprintln!(
            "aarch64 {tag} (threads {threads}): {} outputs match; {}",
            want.len(),
            run.summary()
        );
    }
}

#[test]
fn lenet5_conv_pool_gemm() {
    check_against_interpreter("lenet5", &lenet5_onnx(2, 11), &[sample_image(2)]);
}

#[test]
fn depthwise_strided_residual_activations_softmax() {
    let x = uniform(&mut Rng::new(5), &[1, 6, 13, 13], -2.0, 2.0);
    check_against_interpreter("mobile_block", &models::mobile_block_onnx(), &[x]);
}

#[test]
fn concat_pad_transpose_resize_reduce() {
    let mut rng = Rng::new(8);
    let a = uniform(&mut rng, &[1, 3, 5, 7], -1.0, 1.0);
    let b = uniform(&mut rng, &[1, 2, 5, 7], -1.0, 1.0);
    check_against_interpreter("layout_mix", &models::layout_mix_onnx(), &[a, b]);
}

#[test]
fn elementwise_math_functions() {
    let mut rng = Rng::new(13);
    let x = uniform(&mut rng, &[2, 37], -4.0, 4.0);
    let y = uniform(&mut rng, &[2, 37], 0.05, 3.0);
    check_against_interpreter("math", &models::math_onnx(), &[x, y]);
}

#[test]
fn batchnorm_convtranspose_pooling_matmul_gather() {
    let x = uniform(&mut Rng::new(55), &[1, 4, 9, 9], -1.5, 1.5);
    check_against_interpreter("misc", &models::misc_onnx(), &[x]);
}

/// A zoo model from ../shared: compiled for AArch64, run on its shipped input, compared
/// with its shipped output.
fn check_zoo_model(name: &str, threads: u32) {
    let Some(shared) = common::shared_dir() else {
        return;
    };
    let Some(harness) = harness() else { return };
    let case = shared.join("zoo/models").join(name);
    assert!(
        case.join("model.onnx").is_file(),
        "{} is missing from the zoo",
        case.display()
    );
    let data = case.join("test_data_set_0");
    let numbered = |prefix: &str| -> Vec<Tensor> {
        (0..)
            .map(|k| data.join(format!("{prefix}_{k}.pb")))
            .take_while(|p| p.is_file())
            .map(|p| {
                cnnc_onnx::read_tensor_pb(&p)
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                    .1
            })
            .collect()
    };
    let (inputs, expected) = (numbered("input"), numbered("output"));
    let dir = common::scratch(&format!("aarch64-zoo-{name}"));
    let run = compile_and_run(harness, &dir, &case.join("model.onnx"), &inputs, threads);
    assert_eq!(
        run.outputs.len(),
        expected.len(),
        "zoo {name}: number of outputs"
    );
    for ((output, got), want) in run.outputs.iter().zip(&expected) {
        if let Err(e) = cnnc::compare::compare(got, want) {
            panic!("zoo {name} on AArch64: output `{output}`: {e}");
        }
    }
    eprintln!(
        "aarch64 zoo {name} (threads {threads}): {} outputs match; {}",
        run.outputs.len(),
        run.summary()
    );
}

#[test]
fn zoo_lenet5() {
    check_zoo_model("lenet5", 0);
}

#[test]
fn zoo_mobilenet_v2() {
    check_zoo_model("mobilenet_v2", 2);
}

/// On demand, some minutes: every backend-test case of ../shared (onnx-node,
/// onnx-pytorch, onnx-light) and every zoo model, compiled for AArch64 and run under
/// qemu, with `cnnc verify`-style per-case lines and summary. Inputs that the frontend
/// wants as constants (Reshape's shape, Slice's bounds...) are bound per data set, as
/// `cnnc verify` does. CNNC_AARCH64_CASES=SUBSTRING narrows the sweep;
/// CNNC_AARCH64_THREADS=T sets the harness's host threads (default 2, 0: NULL host).
///
///   cargo test --release -p cnnc --test aarch64 -- --ignored --nocapture
#[test]
#[ignore = "sweeps ../shared's conformance suites under qemu (minutes); run with --ignored"]
fn conformance_suites_under_qemu() {
    let Some(shared) = common::shared_dir() else {
        return;
    };
    let Some(harness) = harness() else { return };
    let (_, failed, _) = sweep::run_all(&shared, harness);
    assert_eq!(failed, 0, "cases failed on AArch64 (FAIL lines above)");
}
