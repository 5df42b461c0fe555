//! Object file → `.so` → dlopen: the C ABI as a C caller sees it.

mod common;

use std::ffi::{CStr, c_void};
use std::path::PathBuf;

use cnnc_codegen::{TargetSpec, compile_object, link_shared};
use cnnc_ir::{BinaryFn, DType, Graph, Op, Tensor, TensorData, TensorType, UnaryFn, interp};
use cnnc_runtime::abi;
use common::{Rng, check_close, random_tensor};

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cnnc-codegen-test-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn sample_graph() -> Graph {
    let mut g = Graph::new("sample_model");
    let x = g.add_input(TensorType::f32([2, 3, 4]), "images");
    let idx = g.add_input(TensorType::new(DType::I64, [5]), "picks");
    let w = g.add_constant("w", Tensor::f32([4], vec![0.5, -1.0, 2.0, 0.25]));
    let one = g.add_constant("one", Tensor::f32([2, 3, 4], vec![1.0; 24]));
    let a = g.push1("mul", Op::Binary(BinaryFn::Mul), &[x, w]).unwrap();
    let b = g.push1("add", Op::Binary(BinaryFn::Add), &[a, one]).unwrap();
    let c = g.push1("tanh", Op::Unary(UnaryFn::Tanh), &[b]).unwrap();
    let flat = g.push_typed("flat", Op::Reshape, &[c], TensorType::f32([24])).unwrap();
    let picked = g.push1("gather", Op::Gather { axis: 0 }, &[flat, idx]).unwrap();
    let zero = g.add_constant("zero", Tensor::f32([1], vec![0.0]));
    let positive = g.push1("pos", Op::Binary(BinaryFn::Greater), &[picked, zero]).unwrap();
    g.values[c.index()].name = "activations".into();
    g.values[picked.index()].name = "picked".into();
    g.values[positive.index()].name = "is_positive".into();
    g.outputs = vec![c, picked, positive];
    g
}

fn cstr(p: *const std::ffi::c_char) -> String {
    assert!(!p.is_null());
    unsafe { CStr::from_ptr(p) }.to_str().unwrap().to_string()
}

/// Runs the library's `cnnc_infer` on random inputs (null host, then a host without
/// parallel_for) and compares with the interpreter.
fn run_and_compare(g: &Graph, lib: &libloading::Library, workspace_size: usize) {
    let infer: libloading::Symbol<abi::InferFn> = unsafe { lib.get(abi::SYM_INFER.as_bytes()) }.unwrap();
    let mut rng = Rng(11);
    let x = random_tensor(&mut rng, DType::F32, &[2, 3, 4], -3.0, 3.0);
    let idx = Tensor::new([5], TensorData::I64(vec![0, 23, -1, 7, -24]));
    let want = interp::run(g, &[x.clone(), idx.clone()]).unwrap();
    let host = abi::Host {
        user: std::ptr::null_mut(),
        parallel_for: None,
        num_threads: 1,
        reserved: 0,
    };
    for host_ptr in [std::ptr::null(), &host as *const abi::Host] {
        let xb = x.data.to_le_bytes();
        let ib = idx.data.to_le_bytes();
        let mut o0 = vec![0u8; 96];
        let mut o1 = vec![0u8; 20];
        let mut o2 = vec![7u8; 5];
        let mut ws = vec![0u64; workspace_size.div_ceil(8) + 8];
        let ws_ptr = ((ws.as_mut_ptr() as usize + 63) & !63) as *mut c_void;
        let inputs = [xb.as_ptr() as *const c_void, ib.as_ptr() as *const c_void];
        let outputs = [
            o0.as_mut_ptr() as *mut c_void,
            o1.as_mut_ptr() as *mut c_void,
            o2.as_mut_ptr() as *mut c_void,
        ];
        let status = unsafe { infer(host_ptr, inputs.as_ptr(), outputs.as_ptr(), ws_ptr) };
        assert_eq!(status, abi::STATUS_OK);
        let got = [
            Tensor::new([2, 3, 4], TensorData::from_le_bytes(DType::F32, &o0)),
            Tensor::new([5], TensorData::from_le_bytes(DType::F32, &o1)),
            Tensor::new([5], TensorData::from_le_bytes(DType::Bool, &o2)),
        ];
        for (a, b) in got.iter().zip(&want) {
            check_close(a, b).unwrap();
        }
        assert!(o2.iter().all(|&b| b <= 1), "bools are stored as 0 or 1");
        assert!(
            o2.contains(&1) && o2.contains(&0),
            "the sample should pick both signs: {o2:?}"
        );
    }
}

#[test]
fn shared_library_reports_and_runs() {
    let g = sample_graph();
    let target = TargetSpec::host();
    let (object, info) = cnnc_codegen::object::compile_object_with_info(&g, &target).unwrap();
    let dir = temp_dir("so");
    let so = dir.join("model.so");
    link_shared(&object, &so, &target).unwrap();

    let lib = unsafe { libloading::Library::new(&so) }.unwrap();
    let model_info: libloading::Symbol<abi::ModelInfoFn> = unsafe { lib.get(abi::SYM_MODEL_INFO.as_bytes()) }.unwrap();
    let mi = unsafe { &*model_info() };

    assert_eq!(mi.abi_version, abi::ABI_VERSION);
    assert_eq!((mi.num_inputs, mi.num_outputs, mi.num_state_tensors), (2, 3, 0));
    assert_eq!(mi.workspace_size, info.workspace_size as u64);
    assert!(mi.workspace_size > 0);
    assert_eq!(mi.workspace_align, 64);
    assert_eq!(cstr(mi.target), target.triple.to_string());
    assert_eq!(cstr(mi.cpu_features), target.cpu_features().join(","));
    assert_eq!(cstr(mi.model_name), "sample_model");
    assert_eq!(mi.entry_flags, abi::ENTRY_INFER);
    assert_eq!(mi.state_size, 0);
    assert!(mi.state_tensors.is_null());
    let descs = |p: *const abi::TensorDesc, n: u32| unsafe { std::slice::from_raw_parts(p, n as usize) };
    let expect = |d: &abi::TensorDesc, name: &str, dtype: u32, shape: &[u64]| {
        assert_eq!(cstr(d.name), name);
        assert_eq!(d.dtype, dtype, "{name}");
        assert_eq!(d.rank as usize, shape.len(), "{name}");
        assert_eq!(
            unsafe { std::slice::from_raw_parts(d.shape, d.rank as usize) },
            shape,
            "{name}"
        );
        assert_eq!(d.offset, 0);
    };
    let ins = descs(mi.inputs, mi.num_inputs);
    expect(&ins[0], "images", abi::DTYPE_F32, &[2, 3, 4]);
    expect(&ins[1], "picks", abi::DTYPE_I64, &[5]);
    let outs = descs(mi.outputs, mi.num_outputs);
    expect(&outs[0], "activations", abi::DTYPE_F32, &[2, 3, 4]);
    expect(&outs[1], "picked", abi::DTYPE_F32, &[5]);
    expect(&outs[2], "is_positive", abi::DTYPE_BOOL, &[5]);

    run_and_compare(&g, &lib, mi.workspace_size as usize);
    drop(lib);
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn named_cpu_levels_link_and_run() {
    let g = sample_graph();
    for cpu in ["x86-64", "x86-64-v2", "x86-64-v3"] {
        let target = TargetSpec::parse(None, Some(cpu)).unwrap();
        if cpu == "x86-64-v3" && !std::is_x86_feature_detected!("avx2") {
            continue;
        }
        let object = compile_object(&g, &target).unwrap();
        let dir = temp_dir(cpu);
        let so = dir.join("model.so");
        link_shared(&object, &so, &target).unwrap();
        let lib = unsafe { libloading::Library::new(&so) }.unwrap();
        let model_info: libloading::Symbol<abi::ModelInfoFn> =
            unsafe { lib.get(abi::SYM_MODEL_INFO.as_bytes()) }.unwrap();
        let mi = unsafe { &*model_info() };
        assert_eq!(cstr(mi.cpu_features), target.cpu_features().join(","), "{cpu}");
        run_and_compare(&g, &lib, mi.workspace_size as usize);
        drop(lib);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn cross_compiling_makes_an_object_and_linking_explains_a_missing_toolchain() {
    let g = sample_graph();
    let target = TargetSpec::parse(Some("aarch64-unknown-linux-gnu"), Some("generic")).unwrap();
    let object = compile_object(&g, &target).unwrap();
    assert_eq!(&object[..4], b"\x7fELF");
    // e_machine = EM_AARCH64 (183).
    assert_eq!(u16::from_le_bytes([object[18], object[19]]), 183);
    let linker = cnnc_codegen::link::linker_for(&target);
    let found = std::process::Command::new(&linker).arg("--version").output().is_ok();
    let dir = temp_dir("aarch64");
    let result = link_shared(&object, &dir.join("model.so"), &target);
    if !found {
        let err = result.unwrap_err().to_string();
        assert!(err.contains(&linker) && err.contains("not installed"), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn link_errors_show_the_compiler_output() {
    let target = TargetSpec::host();
    let dir = temp_dir("bad");
    let err = link_shared(b"not an object file", &dir.join("x.so"), &target)
        .unwrap_err()
        .to_string();
    assert!(err.contains("failed"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
