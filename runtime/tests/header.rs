//! The C header of the ABI must compile as C (and C++) on its own.

mod common;

use cnnc_runtime::abi;
use common::{TempDir, have_cc};

#[test]
fn c_header_compiles() {
    if !have_cc("c_header_compiles") {
        return;
    }
    let dir = TempDir::new("header");
    if let Err(errors) = common::header_compiles(dir.path(), abi::C_HEADER) {
        panic!("abi::C_HEADER does not compile as C11 with -Wall -Wextra -Werror:\n{errors}");
    }
}

#[test]
fn c_header_compiles_as_cxx() {
    if !common::have_cxx() {
        eprintln!("SKIP c_header_compiles_as_cxx: no C++ compiler `c++` on PATH");
        return;
    }
    let dir = TempDir::new("header-cxx");
    if let Err(errors) = common::header_compiles_as_cxx(dir.path(), abi::C_HEADER) {
        panic!("abi::C_HEADER does not compile as C++17 with -Wall -Wextra -Werror:\n{errors}");
    }
}

#[test]
fn header_constants_match_the_rust_declarations() {
    let expect = [
        format!("#define CNNC_ABI_VERSION {}", abi::ABI_VERSION),
        format!("#define CNNC_ENTRY_INFER {}u", abi::ENTRY_INFER),
        format!("#define CNNC_ENTRY_TRAIN {}u", abi::ENTRY_TRAIN),
        format!("#define CNNC_DTYPE_F32 {}u", abi::DTYPE_F32),
        format!("#define CNNC_DTYPE_I32 {}u", abi::DTYPE_I32),
        format!("#define CNNC_DTYPE_I64 {}u", abi::DTYPE_I64),
        format!("#define CNNC_DTYPE_BOOL {}u", abi::DTYPE_BOOL),
        format!("#define CNNC_STATUS_OK {}", abi::STATUS_OK),
    ];
    for line in expect {
        assert!(abi::C_HEADER.contains(&line), "C_HEADER lacks `{line}`");
    }
}

/// The C structs have the same layout as the Rust ones: sizes and field offsets
/// printed by a C program compiled against the header.
#[test]
fn c_and_rust_layouts_agree() {
    if !have_cc("c_and_rust_layouts_agree") {
        return;
    }
    let dir = TempDir::new("layout");
    common::write_header(dir.path());
    let program = r#"
#include "cnnc_model.h"
#include <stddef.h>
#include <stdio.h>
int main(void) {
    printf("host %zu %zu %zu %zu\n", sizeof(cnnc_host), offsetof(cnnc_host, parallel_for), offsetof(cnnc_host, num_threads), offsetof(cnnc_host, reserved));
    printf("desc %zu %zu %zu %zu %zu\n", sizeof(cnnc_tensor_desc), offsetof(cnnc_tensor_desc, dtype), offsetof(cnnc_tensor_desc, rank), offsetof(cnnc_tensor_desc, shape), offsetof(cnnc_tensor_desc, offset));
    printf("hyper %zu %zu\n", sizeof(cnnc_hyper), offsetof(cnnc_hyper, step));
    printf("info %zu %zu %zu %zu %zu %zu %zu\n", sizeof(struct cnnc_model_desc), offsetof(struct cnnc_model_desc, inputs), offsetof(struct cnnc_model_desc, workspace_size), offsetof(struct cnnc_model_desc, target), offsetof(struct cnnc_model_desc, entry_flags), offsetof(struct cnnc_model_desc, state_size), offsetof(struct cnnc_model_desc, state_tensors));
    return 0;
}
"#;
    let source = dir.path().join("layout.c");
    let exe = dir.path().join("layout");
    std::fs::write(&source, program).expect("writing");
    let status = std::process::Command::new("cc")
        .args(["-std=c11", "-I"])
        .arg(dir.path())
        .arg(&source)
        .arg("-o")
        .arg(&exe)
        .status()
        .expect("running cc");
    assert!(status.success());
    let output = std::process::Command::new(&exe).output().expect("running the layout probe");
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();

    use std::mem::{offset_of, size_of};
    let expected = format!(
        "host {} {} {} {}\ndesc {} {} {} {} {}\nhyper {} {}\ninfo {} {} {} {} {} {} {}\n",
        size_of::<abi::Host>(),
        offset_of!(abi::Host, parallel_for),
        offset_of!(abi::Host, num_threads),
        offset_of!(abi::Host, reserved),
        size_of::<abi::TensorDesc>(),
        offset_of!(abi::TensorDesc, dtype),
        offset_of!(abi::TensorDesc, rank),
        offset_of!(abi::TensorDesc, shape),
        offset_of!(abi::TensorDesc, offset),
        size_of::<abi::Hyper>(),
        offset_of!(abi::Hyper, step),
        size_of::<abi::ModelInfo>(),
        offset_of!(abi::ModelInfo, inputs),
        offset_of!(abi::ModelInfo, workspace_size),
        offset_of!(abi::ModelInfo, target),
        offset_of!(abi::ModelInfo, entry_flags),
        offset_of!(abi::ModelInfo, state_size),
        offset_of!(abi::ModelInfo, state_tensors),
    );
    assert_eq!(printed, expected);
}
