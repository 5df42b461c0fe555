//! Times the input gradient of strided convolutions as the training rules build it (the
//! phase form: stride-1 convolutions on the GEMM kernels, interleaved) against the
//! transposed convolution it replaced, both compiled for the host and run on one thread,
//! alternating so that machine noise hits both.
//!
//! cargo run --release -p cnnc --example strided_input_gradient_bench [-- ROUNDS [NAME_PART]]

use std::ffi::c_void;
use std::time::Instant;

use cnnc::train::backward;
use cnnc::train::optimize::optimize_for_target;
use cnnc_codegen::{JitModel, TargetSpec};
use cnnc_ir::{ConvGeometry, Graph, Op, TensorType};

struct Shape {
    name: &'static str,
    batch: usize,
    channels: usize,
    outputs: usize,
    size: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
}

const SHAPES: &[Shape] = &[
    Shape { name: "resnet18 layer2 3x3/2", batch: 16, channels: 64, outputs: 128, size: 56, kernel: 3, stride: 2, pad: 1 },
    Shape { name: "resnet18 layer3 3x3/2", batch: 16, channels: 128, outputs: 256, size: 28, kernel: 3, stride: 2, pad: 1 },
    Shape { name: "resnet18 layer4 3x3/2", batch: 16, channels: 256, outputs: 512, size: 14, kernel: 3, stride: 2, pad: 1 },
    Shape { name: "resnet18 layer2 1x1/2", batch: 16, channels: 64, outputs: 128, size: 56, kernel: 1, stride: 2, pad: 0 },
    Shape { name: "resnet18 layer4 1x1/2", batch: 16, channels: 256, outputs: 512, size: 14, kernel: 1, stride: 2, pad: 0 },
    Shape { name: "resnet_tiny 16->32 3x3/2", batch: 64, channels: 16, outputs: 32, size: 32, kernel: 3, stride: 2, pad: 1 },
    Shape { name: "resnet_tiny 32->64 3x3/2", batch: 64, channels: 32, outputs: 64, size: 16, kernel: 3, stride: 2, pad: 1 },
    Shape { name: "resnet_tiny 16->32 1x1/2", batch: 64, channels: 16, outputs: 32, size: 32, kernel: 1, stride: 2, pad: 0 },
    Shape { name: "resnet_tiny 32->64 1x1/2", batch: 64, channels: 32, outputs: 64, size: 16, kernel: 1, stride: 2, pad: 0 },
    Shape { name: "stem 7x7/2 (16 ch in)", batch: 16, channels: 16, outputs: 64, size: 112, kernel: 7, stride: 2, pad: 3 },
];

fn geometry(s: &Shape) -> ConvGeometry {
    ConvGeometry { strides: vec![s.stride; 2], dilations: vec![1; 2], pads_begin: vec![s.pad; 2], pads_end: vec![s.pad; 2], groups: 1 }
}

/// dx of a convolution as the rules build it: a graph of (x, w, dy).
fn rule_graph(s: &Shape) -> Result<Graph, String> {
    let mut g = Graph::new("rule");
    let x = g.add_input(TensorType::f32(vec![s.batch, s.channels, s.size, s.size]), "x");
    let w = g.add_input(TensorType::f32(vec![s.outputs, s.channels, s.kernel, s.kernel]), "w");
    let y = g.push1("conv", Op::Conv(geometry(s)), &[x, w])?;
    let dy = g.add_input(g.ty(y).clone(), "dy");
    g.outputs = backward(&mut g, &[(y, dy)], &[x])?;
    g.remove_dead();
    Ok(g)
}

/// dx as one transposed convolution: a graph of (dy, w).
fn transposed_graph(s: &Shape) -> Result<Graph, String> {
    let out = (s.size + 2 * s.pad - s.kernel) / s.stride + 1;
    let mut g = Graph::new("transposed");
    let dy = g.add_input(TensorType::f32(vec![s.batch, s.outputs, out, out]), "dy");
    let w = g.add_input(TensorType::f32(vec![s.outputs, s.channels, s.kernel, s.kernel]), "w");
    let x_ty = TensorType::f32(vec![s.batch, s.channels, s.size, s.size]);
    let dx = g.push_typed("dx", Op::ConvTranspose(geometry(s)), &[dy, w], x_ty)?;
    g.outputs = vec![dx];
    Ok(g)
}

/// 64-byte aligned storage.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// A compiled graph with its input, output and workspace buffers allocated (and touched)
/// once, so that a run times the kernels only.
struct Prepared {
    model: JitModel,
    inputs: Vec<Vec<Line>>,
    outputs: Vec<Vec<Line>>,
    workspace: Vec<Line>,
}

fn lines(values: usize, fill: impl Fn(usize) -> f32) -> Vec<Line> {
    let mut buf = vec![Line([0.0; 16]); values.div_ceil(16).max(1)];
    for i in 0..values {
        buf[i / 16].0[i % 16] = fill(i);
    }
    buf
}

fn compiled(mut g: Graph) -> Result<Prepared, String> {
    optimize_for_target(&mut g, &TargetSpec::host())?;
    let numel = |v: cnnc_ir::ValueId| g.ty(v).shape.iter().product::<usize>();
    let inputs = g.inputs.iter().map(|&v| lines(numel(v), |i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)).collect();
    let outputs = g.outputs.iter().map(|&v| lines(numel(v), |_| 0.0)).collect();
    let model = JitModel::compile(&g).map_err(|e| e.to_string())?;
    let workspace = lines(model.workspace_size().div_ceil(4), |_| 0.0);
    Ok(Prepared { model, inputs, outputs, workspace })
}

fn time_once(p: &mut Prepared) -> Result<f64, String> {
    let inputs: Vec<*const c_void> = p.inputs.iter().map(|b| b.as_ptr() as *const c_void).collect();
    let outputs: Vec<*mut c_void> = p.outputs.iter_mut().map(|b| b.as_mut_ptr() as *mut c_void).collect();
    let start = Instant::now();
    // SAFETY: every buffer holds its value's type (f32, the graph's shapes), 64-byte
    // aligned, and the workspace has `workspace_size()` bytes.
    let status = unsafe { p.model.infer_raw(&inputs, &outputs, p.workspace.as_mut_ptr() as *mut c_void) };
    let elapsed = start.elapsed().as_secs_f64() * 1e3;
    if status != 0 {
        return Err(format!("the compiled graph returned status {status}"));
    }
    Ok(elapsed)
}

fn main() -> Result<(), String> {
    let rounds: usize = std::env::args().nth(1).map(|r| r.parse().map_err(|e| format!("rounds: {e}"))).transpose()?.unwrap_or(5);
    println!("{:<24} {:>12} {:>12} {:>7} {:>9}", "shape", "transposed", "phase form", "ratio", "GFLOP/s");
    let (mut total_old, mut total_new) = (0.0, 0.0);
    let only = std::env::args().nth(2).unwrap_or_default();
    for s in SHAPES.iter().filter(|s| s.name.contains(&only)) {
        let mut rule = compiled(rule_graph(s)?)?;
        let mut old = compiled(transposed_graph(s)?)?;
        let (mut best_old, mut best_new) = (f64::MAX, f64::MAX);
        for _ in 0..rounds {
            best_old = best_old.min(time_once(&mut old)?);
            best_new = best_new.min(time_once(&mut rule)?);
        }
        let out = (s.size + 2 * s.pad - s.kernel) / s.stride + 1;
        let flops = 2.0 * (s.batch * s.outputs * out * out * s.channels * s.kernel * s.kernel) as f64;
        println!(
            "{:<24} {:>9.2} ms {:>9.2} ms {:>6.2}x {:>9.1}",
            s.name,
            best_old,
            best_new,
            best_old / best_new,
            flops / best_new / 1e6
        );
        total_old += best_old;
        total_new += best_new;
    }
    println!("{:<24} {:>9.2} ms {:>9.2} ms {:>6.2}x", "total", total_old, total_new, total_old / total_new);
    Ok(())
}
