//! How close the GEMM microkernel comes to the core's arithmetic peak.
//!
//! Both numbers come from the same process a few milliseconds apart, because clocks
//! on shared machines drift from run to run: (a) a register-only loop of independent
//! FMA chains of the kernel's vector width, (b) the microkernel on L1-resident panels
//! (k = 256), called back to back. Each is the best of several interleaved rounds.

use std::time::{Duration, Instant};

use cranelift_codegen::ir::{AbiParam, types};
use cranelift_codegen::isa::CallConv;
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{Linkage, Module};
use iced_x86::code_asm::*;

use super::{GemmKernelKind, define_gemm_kernel_of_kind};
use crate::kernels::CodegenError;
use crate::target::TargetSpec;

/// Depth of the benchmarked product: A and B panels take 22 KiB (AVX2) to 46 KiB
/// (AVX-512), inside L1.
const BENCH_K: usize = 256;
const ROUNDS: usize = 60;
const ROUND_TIME: Duration = Duration::from_millis(2);

/// Result of [`measure_gemm_vs_peak`].
#[derive(Clone, Debug)]
pub struct GemmBench {
    /// GFLOP/s of the register-only FMA loop (NaN where it cannot be emitted: non-x86 hosts).
    pub peak_gflops: f64,
    /// GFLOP/s of the microkernel.
    pub kernel_gflops: f64,
    /// The kernel's symbol, e.g. `cnnc_gemm_f32_avx2_6x16`.
    pub kernel: String,
    /// Vector width both loops use.
    pub vector_bits: usize,
}

impl GemmBench {
    /// `kernel_gflops / peak_gflops`.
    pub fn ratio(&self) -> f64 {
        self.kernel_gflops / self.peak_gflops
    }
}

impl std::fmt::Display for GemmBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fma_peak_{bits}bit={:.1} GFLOP/s  {}(k={BENCH_K})={:.1} GFLOP/s  ratio={:.3}",
            self.peak_gflops,
            self.kernel,
            self.kernel_gflops,
            self.ratio(),
            bits = self.vector_bits,
        )
    }
}

/// `(peak GFLOP/s, microkernel GFLOP/s)` on the host, measured in the same run; NaN
/// for a number that cannot be measured (see [`measure_gemm_vs_peak`] for the error).
pub fn bench_gemm_vs_peak() -> (f64, f64) {
    match measure_gemm_vs_peak() {
        Ok(bench) => (bench.peak_gflops, bench.kernel_gflops),
        Err(_) => (f64::NAN, f64::NAN),
    }
}

/// Measures the host's FMA peak and the host microkernel (the kind
/// [`super::define_gemm_kernel`] picks for `TargetSpec::host()`).
pub fn measure_gemm_vs_peak() -> Result<GemmBench, CodegenError> {
    measure_kind_vs_peak(GemmKernelKind::for_target(&TargetSpec::host()))
}

/// Measures one kernel kind on the host (e.g. the portable kernel on an AVX2
/// machine) against the FMA peak of its own vector width.
pub fn measure_kind_vs_peak(kind: GemmKernelKind) -> Result<GemmBench, CodegenError> {
    let target = TargetSpec::host();
    let features = target.cpu_features();
    let needed: &[&str] = match kind {
        GemmKernelKind::Avx512 => &["avx512f"],
        GemmKernelKind::Avx2Fma => &["avx2", "fma"],
        GemmKernelKind::Portable { fma: true } if cfg!(target_arch = "x86_64") => &["avx", "fma"],
        GemmKernelKind::Portable { .. } => &[],
    };
    if let Some(missing) = needed.iter().find(|f| !features.contains(f)) {
        return Err(CodegenError(format!(
            "cannot benchmark the {kind:?} GEMM kernel: this CPU lacks {missing}"
        )));
    }
    let isa = target.isa(false)?;
    let builder = JITBuilder::with_isa(isa, cranelift_module::default_libcall_names());
    let mut module = JITModule::new(builder);
    let result = measure_in(&mut module, &target, kind);
    // SAFETY: no pointer into the module outlives `measure_in`.
    unsafe { module.free_memory() };
    result
}

fn measure_in(module: &mut JITModule, target: &TargetSpec, kind: GemmKernelKind) -> Result<GemmBench, CodegenError> {
    let kernel = define_gemm_kernel_of_kind(module, target, kind)?;
    let peak_loop = peak_loop_for(kind);
    let peak_func = match &peak_loop {
        Some(peak) => {
            let mut sig = module.make_signature();
            sig.call_conv = CallConv::SystemV;
            sig.params.push(AbiParam::new(types::I64));
            let id = module
                .declare_function("cnnc_fma_peak_loop", Linkage::Local, &sig)
                .map_err(|e| CodegenError(format!("declaring the FMA peak loop: {e}")))?;
            module
                .define_function_bytes(id, 64, &peak.code, &[])
                .map_err(|e| CodegenError(format!("defining the FMA peak loop: {e}")))?;
            Some(id)
        }
        None => None,
    };
    module
        .finalize_definitions()
        .map_err(|e| CodegenError(format!("JIT finalization failed: {e}")))?;

    let kernel_ptr = module.get_finalized_function(kernel.func);
    // SAFETY: defined above with the six-i64 kernel signature (SystemV on x86-64).
    let kernel_fn = unsafe { std::mem::transmute::<*const u8, KernelFn>(kernel_ptr) };
    let peak_fn = peak_func.map(|id| {
        let ptr = module.get_finalized_function(id);
        // SAFETY: the peak loop takes one i64 (SystemV) and touches only vector registers and rdi.
        unsafe { std::mem::transmute::<*const u8, PeakFn>(ptr) }
    });

    let (mr, nr) = (kernel.mr, kernel.nr);
    let a = AlignedF32::filled(mr * BENCH_K, 0.5);
    let b = AlignedF32::filled(nr * BENCH_K, 0.25);
    let mut c = AlignedF32::filled(mr * nr, 0.0);
    let kernel_flops = 2.0 * (mr * nr * BENCH_K) as f64;
    let mut call_kernel = |calls: u64| {
        for _ in 0..calls {
            // SAFETY: panels hold k * mr and k * nr floats, B is 64-byte aligned, C
            // holds mr rows of nr floats with ldc = nr.
            unsafe { kernel_fn(BENCH_K as i64, a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), nr as i64, 1) };
        }
    };
    let peak_flops_per_trip = peak_loop.as_ref().map_or(0.0, |p| p.flops_per_trip);
    let mut run_peak = |trips: u64| {
        if let Some(f) = peak_fn {
            // SAFETY: the loop runs `trips` iterations on registers only.
            unsafe { f(trips as i64) };
        }
    };

    let kernel_calls = calibrate(&mut call_kernel);
    let peak_trips = calibrate(&mut run_peak);
    let mut best_kernel: f64 = 0.0;
    let mut best_peak: f64 = 0.0;
    for _ in 0..ROUNDS {
        if peak_fn.is_some() {
            let seconds = time(|| run_peak(peak_trips));
            best_peak = best_peak.max(peak_flops_per_trip * peak_trips as f64 / seconds / 1e9);
        }
        let seconds = time(|| call_kernel(kernel_calls));
        best_kernel = best_kernel.max(kernel_flops * kernel_calls as f64 / seconds / 1e9);
    }
    Ok(GemmBench {
        peak_gflops: if peak_fn.is_some() { best_peak } else { f64::NAN },
        kernel_gflops: best_kernel,
        kernel: kind.symbol(target),
        vector_bits: peak_loop.map_or(128, |p| p.vector_bits),
    })
}

#[cfg(target_arch = "x86_64")]
type KernelFn = unsafe extern "sysv64" fn(i64, *const f32, *const f32, *mut f32, i64, i64);
#[cfg(not(target_arch = "x86_64"))]
type KernelFn = unsafe extern "C" fn(i64, *const f32, *const f32, *mut f32, i64, i64);
#[cfg(target_arch = "x86_64")]
type PeakFn = unsafe extern "sysv64" fn(i64);
#[cfg(not(target_arch = "x86_64"))]
type PeakFn = unsafe extern "C" fn(i64);

fn time(mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64().max(1e-9)
}

/// How many repetitions of `f(n)` take about [`ROUND_TIME`].
fn calibrate(f: &mut impl FnMut(u64)) -> u64 {
    let mut n = 1u64;
    loop {
        let seconds = time(|| f(n));
        if seconds >= ROUND_TIME.as_secs_f64() / 8.0 || n >= 1 << 40 {
            let per_call = seconds / n as f64;
            return ((ROUND_TIME.as_secs_f64() / per_call) as u64).max(1);
        }
        n *= 2;
    }
}

/// 64-byte aligned f32 storage.
struct AlignedF32 {
    lines: Vec<Line>,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

impl AlignedF32 {
    fn filled(len: usize, value: f32) -> AlignedF32 {
        AlignedF32 {
            lines: vec![Line([value; 16]); len.div_ceil(16).max(1)],
        }
    }
    fn as_ptr(&self) -> *const f32 {
        self.lines.as_ptr() as *const f32
    }
    fn as_mut_ptr(&mut self) -> *mut f32 {
        self.lines.as_mut_ptr() as *mut f32
    }
}

/// A register-only loop `fn(trips: i64)`.
pub struct PeakLoop {
    pub code: Vec<u8>,
    pub flops_per_trip: f64,
    pub vector_bits: usize,
}

/// Independent accumulator chains: with 2 pipes and 4-cycle latency 8 suffice; 12
/// leaves margin for cores with longer latency.
const CHAINS: usize = 12;
/// Copies of the 12 instructions per loop trip, so the loop branch costs nothing.
const REPEATS: usize = 4;

/// The peak loop matching a kernel kind's vector width (None on non-x86 targets,
/// which iced cannot assemble for).
pub fn peak_loop_for(kind: GemmKernelKind) -> Option<PeakLoop> {
    if !cfg!(target_arch = "x86_64") {
        return None;
    }
    assemble_peak_loop(kind).ok()
}

/// Assembles the peak loop for `kind`: `vfmadd231ps` chains of the kind's width, or,
/// for the non-FMA portable kernel, alternating `mulps` / `addps` chains.
pub fn assemble_peak_loop(kind: GemmKernelKind) -> Result<PeakLoop, IcedError> {
    let mut asm = CodeAssembler::new(64)?;
    let xmms = [
        xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13,
    ];
    let ymms = [
        ymm0, ymm1, ymm2, ymm3, ymm4, ymm5, ymm6, ymm7, ymm8, ymm9, ymm10, ymm11, ymm12, ymm13,
    ];
    let zmms = [
        zmm0, zmm1, zmm2, zmm3, zmm4, zmm5, zmm6, zmm7, zmm8, zmm9, zmm10, zmm11, zmm12, zmm13,
    ];
    // Zeroed inputs: 0 * 0 + 0 stays 0, so no chain ever meets a denormal. A VEX
    // `vxorps ymm` clears the register up to its full (zmm) width.
    let uses_avx = !matches!(kind, GemmKernelKind::Portable { fma: false });
    for i in 0..xmms.len() {
        if uses_avx {
            asm.vxorps(ymms[i], ymms[i], ymms[i])?;
        } else {
            asm.xorps(xmms[i], xmms[i])?;
        }
    }
    let mut top = asm.create_label();
    asm.set_label(&mut top)?;
    for _ in 0..REPEATS {
        for chain in 0..CHAINS {
            match kind {
                GemmKernelKind::Avx512 => asm.vfmadd231ps(zmms[chain], zmms[12], zmms[13])?,
                GemmKernelKind::Avx2Fma => asm.vfmadd231ps(ymms[chain], ymms[12], ymms[13])?,
                GemmKernelKind::Portable { fma: true } => asm.vfmadd231ps(xmms[chain], xmms[12], xmms[13])?,
                GemmKernelKind::Portable { fma: false } if chain % 2 == 0 => asm.mulps(xmms[chain], xmms[12])?,
                GemmKernelKind::Portable { fma: false } => asm.addps(xmms[chain], xmms[13])?,
            }
        }
    }
    asm.dec(rdi)?;
    asm.jnz(top)?;
    if uses_avx {
        asm.vzeroupper()?;
    }
    asm.ret()?;
    let (lanes, flops_per_instruction) = match kind {
        GemmKernelKind::Avx512 => (16, 2),
        GemmKernelKind::Avx2Fma => (8, 2),
        GemmKernelKind::Portable { fma: true } => (4, 2),
        GemmKernelKind::Portable { fma: false } => (4, 1),
    };
    Ok(PeakLoop {
        code: asm.assemble(0)?,
        flops_per_trip: (REPEATS * CHAINS * lanes * flops_per_instruction) as f64,
        vector_bits: lanes * 32,
    })
}
