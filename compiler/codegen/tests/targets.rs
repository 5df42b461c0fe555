//! Every kernel family compiled for each x86-64 level (run here through a linked
//! `.so`, so SSE2-only code paths such as libcall rounding run too) and for aarch64
//! (compiled only).

mod common;

use std::ffi::c_void;

use cnnc_codegen::{TargetSpec, compile_object, link_shared};
use cnnc_ir::{BinaryFn, DType, Graph, Op, PadMode, Scalar, Tensor, TensorData, TensorType, UnaryFn, interp};
use cnnc_runtime::abi;
use common::{Rng, check_close, random_tensor};

/// One graph touching every op family the core owns, with many outputs.
fn everything_graph() -> Graph {
    let mut g = Graph::new("everything");
    let x = g.add_input(TensorType::f32([3, 13]), "x");
    let y = g.add_input(TensorType::f32([13]), "y");
    let idx = g.add_input(TensorType::new(DType::I32, [4]), "idx");
    let mut outs = Vec::new();
    use UnaryFn::*;
    for f in [
        Neg,
        Abs,
        Sqrt,
        Exp,
        Log,
        Reciprocal,
        Floor,
        Ceil,
        Relu,
        Sigmoid,
        Tanh,
        Erf,
        Softplus,
        Softsign,
        Mish,
        HardSwish,
        GeluErf,
        GeluTanh,
        LeakyRelu { alpha: 0.1 },
        Elu { alpha: 1.0 },
        Celu { alpha: 0.7 },
        HardSigmoid { alpha: 0.2, beta: 0.5 },
        Swish { alpha: 1.0 },
        Clip { min: -1.0, max: 1.0 },
        PowConst { exponent: 1.7 },
    ] {
        outs.push(g.push1(format!("{f:?}"), Op::Unary(f), &[x]).unwrap());
    }
    for f in [
        BinaryFn::Add,
        BinaryFn::Div,
        BinaryFn::Pow,
        BinaryFn::Max,
        BinaryFn::PRelu,
        BinaryFn::Less,
    ] {
        outs.push(g.push1(format!("{f:?}"), Op::Binary(f), &[x, y]).unwrap());
    }
    let as_int = g.push1("cast_i64", Op::Cast { to: DType::I64 }, &[x]).unwrap();
    outs.push(as_int);
    outs.push(
        g.push1("int_div", Op::Binary(BinaryFn::Div), &[as_int, as_int])
            .unwrap(),
    );
    outs.push(g.push1("cast_back", Op::Cast { to: DType::F32 }, &[as_int]).unwrap());
    let t = g.push1("transpose", Op::Transpose { perm: vec![1, 0] }, &[x]).unwrap();
    outs.push(t);
    outs.push(
        g.push1(
            "pad",
            Op::Pad {
                begins: vec![1, 2],
                ends: vec![0, 3],
                mode: PadMode::Reflect,
            },
            &[x],
        )
        .unwrap(),
    );
    outs.push(
        g.push1(
            "pad_c",
            Op::Pad {
                begins: vec![0, -2],
                ends: vec![2, 1],
                mode: PadMode::Constant(Scalar::F32(0.5)),
            },
            &[x],
        )
        .unwrap(),
    );
    outs.push(g.push1("concat", Op::Concat { axis: 0 }, &[x, x]).unwrap());
    outs.push(g.push1("gather", Op::Gather { axis: 1 }, &[x, idx]).unwrap());
    outs.push(
        g.push1(
            "resample",
            Op::Resample {
                axis: 1,
                lo: vec![0, 3, 12],
                hi: vec![1, 4, 12],
                weight_hi: vec![0.25, 0.0, 1.0],
            },
            &[x],
        )
        .unwrap(),
    );
    g.outputs = outs;
    g
}

fn inputs() -> Vec<Tensor> {
    let mut rng = Rng(99);
    vec![
        random_tensor(&mut rng, DType::F32, &[3, 13], -4.0, 4.0),
        random_tensor(&mut rng, DType::F32, &[13], 0.5, 3.0),
        Tensor::new([4], TensorData::I32(vec![0, -1, 5, 12])),
    ]
}

/// Compiles for `target`, links, loads and runs the graph; returns its outputs.
fn run_shared(g: &Graph, target: &TargetSpec, inputs: &[Tensor]) -> Vec<Tensor> {
    let object = compile_object(g, target).unwrap();
    let dir = std::env::temp_dir().join(format!("cnnc-targets-{}-{}", target.cpu_name(), std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let so = dir.join("m.so");
    link_shared(&object, &so, target).unwrap();
    let lib = unsafe { libloading::Library::new(&so) }.unwrap();
    let info: libloading::Symbol<abi::ModelInfoFn> = unsafe { lib.get(abi::SYM_MODEL_INFO.as_bytes()) }.unwrap();
    let infer: libloading::Symbol<abi::InferFn> = unsafe { lib.get(abi::SYM_INFER.as_bytes()) }.unwrap();
    let ws_size = unsafe { (*info()).workspace_size } as usize;
    let in_bytes: Vec<Vec<u8>> = inputs.iter().map(|t| t.data.to_le_bytes()).collect();
    let types: Vec<TensorType> = g.outputs.iter().map(|&v| g.ty(v).clone()).collect();
    let mut out_bytes: Vec<Vec<u8>> = types.iter().map(|t| vec![0u8; t.byte_size().max(1)]).collect();
    let mut ws = vec![0u64; ws_size.div_ceil(8) + 8];
    let ws_ptr = ((ws.as_mut_ptr() as usize + 63) & !63) as *mut c_void;
    let in_ptrs: Vec<*const c_void> = in_bytes.iter().map(|b| b.as_ptr() as *const c_void).collect();
    let out_ptrs: Vec<*mut c_void> = out_bytes.iter_mut().map(|b| b.as_mut_ptr() as *mut c_void).collect();
    assert_eq!(
        unsafe { infer(std::ptr::null(), in_ptrs.as_ptr(), out_ptrs.as_ptr(), ws_ptr) },
        abi::STATUS_OK
    );
    drop(lib);
    let _ = std::fs::remove_dir_all(&dir);
    types
        .iter()
        .zip(&out_bytes)
        .map(|(t, b)| Tensor::new(t.shape.clone(), TensorData::from_le_bytes(t.dtype, &b[..t.byte_size()])))
        .collect()
}

#[cfg(target_arch = "x86_64")]
#[test]
fn every_x86_level_computes_the_same() {
    let g = everything_graph();
    let inputs = inputs();
    let want = interp::run(&g, &inputs).unwrap();
    let levels = [
        ("x86-64", true),
        ("x86-64-v2", std::is_x86_feature_detected!("sse4.2")),
        (
            "x86-64-v3",
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"),
        ),
        (
            "x86-64-v4",
            std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl"),
        ),
    ];
    for (cpu, runnable) in levels {
        let target = TargetSpec::parse(None, Some(cpu)).unwrap();
        if !runnable {
            compile_object(&g, &target).unwrap();
            continue;
        }
        let got = run_shared(&g, &target, &inputs);
        for (k, (a, b)) in got.iter().zip(&want).enumerate() {
            check_close(a, b).unwrap_or_else(|e| panic!("{cpu}, output {k} ({}): {e}", g.nodes[k].name));
        }
    }
}

#[test]
fn aarch64_compiles_every_family() {
    let target = TargetSpec::parse(Some("aarch64-unknown-linux-gnu"), None).unwrap();
    let object = compile_object(&everything_graph(), &target).unwrap();
    assert_eq!(
        u16::from_le_bytes([object[18], object[19]]),
        183,
        "an aarch64 ELF object"
    );
}
