//! Throughput of the core kernels, printed by an ignored test:
//! `cargo test --release -p cnnc-codegen --test throughput -- --ignored --nocapture`.

use std::ffi::c_void;
use std::time::Instant;

use cnnc_codegen::JitModel;
use cnnc_ir::{BinaryFn, Graph, Op, Tensor, TensorType, UnaryFn};

/// Best of 20 calls on prepared buffers, in seconds.
fn time_model(g: &Graph, inputs: &[Tensor]) -> f64 {
    let model = JitModel::compile(g).unwrap();
    let in_bytes: Vec<Vec<u8>> = inputs.iter().map(|t| t.data.to_le_bytes()).collect();
    let mut outs: Vec<Vec<u8>> = g.outputs.iter().map(|&v| vec![0u8; g.ty(v).byte_size()]).collect();
    let mut ws = vec![0u64; model.workspace_size() / 8 + 16];
    let ws_ptr = ((ws.as_mut_ptr() as usize + 63) & !63) as *mut c_void;
    let ins: Vec<*const c_void> = in_bytes.iter().map(|b| b.as_ptr() as *const c_void).collect();
    let out_ptrs: Vec<*mut c_void> = outs.iter_mut().map(|b| b.as_mut_ptr() as *mut c_void).collect();
    let mut best = f64::MAX;
    for _ in 0..20 {
        let t = Instant::now();
        // SAFETY: buffers sized from the graph's types, workspace aligned.
        assert_eq!(unsafe { model.infer_raw(&ins, &out_ptrs, ws_ptr) }, 0);
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

#[test]
#[ignore]
fn elementwise_throughput() {
    let n = 1 << 20;
    let x = Tensor::f32([64, n / 64], (0..n).map(|i| (i % 1000) as f32 * 0.01 - 5.0).collect());
    let b = Tensor::f32([64, 1], (0..64).map(|i| i as f32).collect());
    for (name, f) in [
        ("relu", UnaryFn::Relu),
        ("exp", UnaryFn::Exp),
        ("tanh", UnaryFn::Tanh),
        ("erf", UnaryFn::Erf),
        ("sigmoid", UnaryFn::Sigmoid),
        ("gelu", UnaryFn::GeluErf),
    ] {
        let mut g = Graph::new(name);
        let v = g.add_input(x.ty(), "x");
        let y = g.push1(name, Op::Unary(f), &[v]).unwrap();
        g.outputs.push(y);
        let s = time_model(&g, std::slice::from_ref(&x));
        println!("{name:>8}: {:.2} Gelem/s", n as f64 / s / 1e9);
    }
    let mut g = Graph::new("bias_add");
    let v = g.add_input(x.ty(), "x");
    let w = g.add_input(b.ty(), "b");
    let y = g.push1("add", Op::Binary(BinaryFn::Add), &[v, w]).unwrap();
    g.outputs.push(y);
    let s = time_model(&g, &[x.clone(), b]);
    println!("bias add: {:.2} Gelem/s", n as f64 / s / 1e9);
    let mut g = Graph::new("transpose");
    let v = g.add_input(TensorType::f32([64, n / 64]), "x");
    let y = g.push1("t", Op::Transpose { perm: vec![1, 0] }, &[v]).unwrap();
    g.outputs.push(y);
    let s = time_model(&g, std::slice::from_ref(&x));
    println!("transpose: {:.2} Gelem/s", n as f64 / s / 1e9);
}
