//! GEMM microkernels: results against a naive product for every kernel this machine
//! can run, the callee-saved-register contract, calls from Cranelift code, kernel
//! choice per target, AVX-512 encoding, and (ignored) the peak benchmark.

use cnnc_codegen::TargetSpec;
use cnnc_codegen::microkernel::{
    GemmKernel, GemmKernelKind, define_gemm_kernel, define_gemm_kernel_of_kind, gemm_kernel_signature, x86,
};
use cranelift_codegen::ir::{AbiParam, InstBuilder, UserFuncName, types};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{Linkage, Module};

#[path = "microkernel/emulator.rs"]
mod emulator;

type KernelFn = unsafe extern "sysv64" fn(i64, *const f32, *const f32, *mut f32, i64, i64);

/// k = 0 is outside the contract but every kernel handles it (C = 0, or C unchanged).
const DEPTHS: [usize; 8] = [0, 1, 2, 3, 5, 16, 100, 257];

/// A JIT module holding one kernel (freed on drop).
struct Jitted {
    module: Option<JITModule>,
    kernel: GemmKernel,
    call: KernelFn,
}

impl Drop for Jitted {
    fn drop(&mut self) {
        if let Some(m) = self.module.take() {
            // SAFETY: `call` dies with self.
            unsafe { m.free_memory() };
        }
    }
}

fn new_module(target: &TargetSpec) -> JITModule {
    let isa = target.isa(false).expect("isa");
    JITModule::new(JITBuilder::with_isa(isa, cranelift_module::default_libcall_names()))
}

fn jit(target: &TargetSpec, kind: Option<GemmKernelKind>) -> Jitted {
    let mut module = new_module(target);
    let kernel = match kind {
        Some(kind) => define_gemm_kernel_of_kind(&mut module, target, kind),
        None => define_gemm_kernel(&mut module, target),
    }
    .expect("define kernel");
    module.finalize_definitions().expect("finalize");
    let ptr = module.get_finalized_function(kernel.func);
    // SAFETY: the kernel has this signature (SystemV on x86-64).
    let call = unsafe { std::mem::transmute::<*const u8, KernelFn>(ptr) };
    Jitted {
        module: Some(module),
        kernel,
        call,
    }
}

/// xorshift64*: deterministic panels without a dependency.
struct Rng(u64);
impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
        bits as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn fill(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next_f32()).collect()
    }
}

/// f32 storage whose first element is 64-byte aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);
struct Aligned(Vec<Line>);
impl Aligned {
    fn from(values: &[f32]) -> Aligned {
        let mut lines = vec![Line([0.0; 16]); values.len().div_ceil(16).max(1)];
        for (i, &v) in values.iter().enumerate() {
            lines[i / 16].0[i % 16] = v;
        }
        Aligned(lines)
    }
    fn ptr(&self) -> *const f32 {
        self.0.as_ptr() as *const f32
    }
}

/// The tolerance of DESIGN.md: `|y - ref| <= 1e-3 |ref| + 1e-4 max|ref|`.
fn assert_close(got: &[f32], want: &[f64], what: &str) {
    let max_abs = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let bound = 1e-3 * w.abs() + 1e-4 * max_abs;
        assert!(
            (g as f64 - w).abs() <= bound,
            "{what}: element {i}: got {g}, want {w} (bound {bound})"
        );
    }
}

/// Floats in front of the C tile, so rows start off any vector boundary.
const C_LEAD: usize = 1;

/// Runs a kernel through `run(k, a, b, c, ldc, accumulate)` (with `c` starting
/// [`C_LEAD`] floats before the tile) for every depth, with and without accumulation
/// and `ldc > nr`, and checks the tile and every float around it.
fn check_against_reference(
    (mr, nr): (usize, usize),
    what: &str,
    mut run: impl FnMut(usize, &[f32], &[f32], &mut [f32], usize, i64),
) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (mr * 131 + nr) as u64);
    for &k in &DEPTHS {
        for accumulate in [0i64, 7] {
            let a = rng.fill(mr * k);
            let b = rng.fill(nr * k);
            let ldc = nr + 5;
            let mut c = rng.fill(C_LEAD + mr * ldc + 9);
            let before = c.clone();
            run(k, &a, &b, &mut c, ldc, accumulate);
            let mut got = Vec::new();
            let mut want = Vec::new();
            for i in 0..mr {
                for jj in 0..nr {
                    let mut sum: f64 = (0..k).map(|kk| a[kk * mr + i] as f64 * b[kk * nr + jj] as f64).sum();
                    let at = C_LEAD + i * ldc + jj;
                    if accumulate != 0 {
                        sum += before[at] as f64;
                    }
                    got.push(c[at]);
                    want.push(sum);
                }
            }
            let case = format!("{what} k={k} accumulate={accumulate}");
            assert_close(&got, &want, &case);
            for (at, (&now, &was)) in c.iter().zip(&before).enumerate() {
                let inside = at >= C_LEAD && (at - C_LEAD) / ldc < mr && (at - C_LEAD) % ldc < nr;
                assert!(
                    inside || now.to_bits() == was.to_bits(),
                    "{case}: wrote outside the tile at float {at}"
                );
            }
        }
    }
}

/// Calls the JIT-compiled kernel natively.
fn run_native(j: &Jitted) -> impl FnMut(usize, &[f32], &[f32], &mut [f32], usize, i64) + '_ {
    move |k, a, b, c, ldc, accumulate| {
        let b_panel = Aligned::from(b);
        // SAFETY: panels have k*mr and k*nr floats, B is aligned, C covers mr rows of ldc.
        unsafe {
            (j.call)(
                k as i64,
                a.as_ptr(),
                b_panel.ptr(),
                c.as_mut_ptr().add(C_LEAD),
                ldc as i64,
                accumulate,
            )
        };
    }
}

/// Runs machine code in the emulator; also checks that rbx, rbp, r12-r15 and rsp
/// come back unchanged.
fn run_emulated(code: &[u8]) -> impl FnMut(usize, &[f32], &[f32], &mut [f32], usize, i64) + '_ {
    use iced_x86::Register;
    move |k, a, b, c, ldc, accumulate| {
        let (a_base, b_base, c_base) = (0x1_0000_0000u64, 0x2_0000_0000u64, 0x3_0000_0000u64);
        let region = |name, base, data: &[f32], writable| emulator::Region {
            name,
            base,
            data: data.to_vec(),
            writable,
        };
        let mut machine = emulator::Machine::new(vec![
            region("A", a_base, a, false),
            region("B", b_base, b, false),
            region("C", c_base, c, true),
        ]);
        for (reg, value) in [
            (Register::RDI, k as u64),
            (Register::RSI, a_base),
            (Register::RDX, b_base),
            (Register::RCX, c_base + 4 * C_LEAD as u64),
            (Register::R8, ldc as u64),
            (Register::R9, accumulate as u64),
        ] {
            machine.set_gpr(reg, value);
        }
        let preserved = [
            Register::RBX,
            Register::RBP,
            Register::RSP,
            Register::R12,
            Register::R13,
            Register::R14,
            Register::R15,
        ];
        let before: Vec<u64> = preserved.iter().map(|&r| machine.gpr(r)).collect();
        machine.run(code).unwrap_or_else(|e| panic!("k={k}: {e}"));
        for (&reg, &was) in preserved.iter().zip(&before) {
            assert_eq!(machine.gpr(reg), was, "k={k}: {reg:?} not preserved");
        }
        c.copy_from_slice(&machine.regions[2].data);
    }
}

fn host_has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

#[test]
fn host_kernel_matches_reference() {
    let target = TargetSpec::host();
    let j = jit(&target, None);
    let what = format!("{:?}", GemmKernelKind::for_target(&target));
    check_against_reference((j.kernel.mr, j.kernel.nr), &what, run_native(&j));
}

#[test]
fn avx2_kernel_matches_reference() {
    if !host_has_avx2_fma() {
        eprintln!("skipped: host has no AVX2+FMA");
        return;
    }
    let j = jit(&TargetSpec::host(), Some(GemmKernelKind::Avx2Fma));
    assert_eq!((j.kernel.mr, j.kernel.nr), (6, 16));
    check_against_reference((6, 16), "avx2", run_native(&j));
}

#[test]
fn portable_kernel_matches_reference_on_x86_64_v2() {
    let target = TargetSpec::parse(None, Some("x86-64-v2")).unwrap();
    assert_eq!(
        GemmKernelKind::for_target(&target),
        GemmKernelKind::Portable { fma: false }
    );
    let j = jit(&target, None);
    assert_eq!((j.kernel.mr, j.kernel.nr), (4, 8));
    check_against_reference((4, 8), "portable x86-64-v2", run_native(&j));
}

#[test]
fn portable_fma_kernel_matches_reference() {
    if !host_has_avx2_fma() {
        eprintln!("skipped: host has no AVX+FMA");
        return;
    }
    let j = jit(&TargetSpec::host(), Some(GemmKernelKind::Portable { fma: true }));
    check_against_reference((j.kernel.mr, j.kernel.nr), "portable fma", run_native(&j));
}

/// A trampoline that loads patterns into rbx, rbp and r12-r15, calls the kernel with
/// arguments from an array, and returns the OR of (register XOR pattern): non-zero
/// when the kernel clobbered any of them.
fn callee_saved_checker() -> Vec<u8> {
    use iced_x86::code_asm::*;
    let mut asm = CodeAssembler::new(64).unwrap();
    let saved = [rbx, rbp, r12, r13, r14, r15];
    let pattern = |i: usize| 0x5A5A_0000_0000_1111u64.wrapping_mul(i as u64 + 3) as i64;
    for &r in &saved {
        asm.push(r).unwrap();
    }
    // Six pushes after the return address leave rsp 8 bytes off the 16 a call needs.
    asm.sub(rsp, 8).unwrap();
    for (i, &r) in saved.iter().enumerate() {
        asm.mov(r, pattern(i)).unwrap();
    }
    asm.mov(rax, rdi).unwrap();
    asm.mov(r11, qword_ptr(rax)).unwrap();
    for (i, &arg) in [rdi, rsi, rdx, rcx, r8, r9].iter().enumerate() {
        asm.mov(arg, qword_ptr(rax + 8 * (i as i32 + 1))).unwrap();
    }
    asm.call(r11).unwrap();
    asm.xor(eax, eax).unwrap();
    for (i, &r) in saved.iter().enumerate() {
        asm.mov(r10, pattern(i)).unwrap();
        asm.xor(r10, r).unwrap();
        asm.or(rax, r10).unwrap();
    }
    asm.add(rsp, 8).unwrap();
    for &r in saved.iter().rev() {
        asm.pop(r).unwrap();
    }
    asm.ret().unwrap();
    asm.assemble(0).unwrap()
}

#[test]
fn kernels_preserve_callee_saved_registers() {
    let target = TargetSpec::host();
    let mut kinds = vec![GemmKernelKind::for_target(&target)];
    if host_has_avx2_fma() {
        kinds.push(GemmKernelKind::Avx2Fma);
    }
    for kind in kinds {
        let mut module = new_module(&target);
        let kernel = define_gemm_kernel_of_kind(&mut module, &target, kind).unwrap();
        let mut sig = module.make_signature();
        sig.params.push(AbiParam::new(types::I64));
        sig.returns.push(AbiParam::new(types::I64));
        let checker = module.declare_function("checker", Linkage::Local, &sig).unwrap();
        module
            .define_function_bytes(checker, 16, &callee_saved_checker(), &[])
            .unwrap();
        module.finalize_definitions().unwrap();
        let kernel_ptr = module.get_finalized_function(kernel.func);
        // SAFETY: the checker takes a pointer to 7 i64 and returns an i64.
        let check = unsafe {
            std::mem::transmute::<*const u8, extern "sysv64" fn(*const i64) -> i64>(
                module.get_finalized_function(checker),
            )
        };
        let (mr, nr) = (kernel.mr, kernel.nr);
        for (k, accumulate) in [(1usize, 0i64), (4, 1), (257, 1), (16, 0)] {
            let a = vec![1.0f32; mr * k];
            let b = Aligned::from(&vec![2.0f32; nr * k]);
            let mut c = vec![1.0f32; mr * nr];
            let args = [
                kernel_ptr as i64,
                k as i64,
                a.as_ptr() as i64,
                b.ptr() as i64,
                c.as_mut_ptr() as i64,
                nr as i64,
                accumulate,
            ];
            assert_eq!(
                check(args.as_ptr()),
                0,
                "{kind:?} clobbered a callee-saved register (k={k})"
            );
            let want = 2.0 * k as f32 + if accumulate != 0 { 1.0 } else { 0.0 };
            assert!(c.iter().all(|&v| v == want), "{kind:?} k={k}: {:?} != {want}", &c[..4]);
        }
        // SAFETY: no pointer survives this iteration.
        unsafe { module.free_memory() };
    }
}

/// How compiled code uses the kernel: a Cranelift function splits k in two calls
/// (overwrite, then accumulate) and returns a value that was live across both.
#[test]
fn kernel_called_from_cranelift_code() {
    let target = TargetSpec::host();
    let mut module = new_module(&target);
    let kernel = define_gemm_kernel(&mut module, &target).unwrap();
    let (mr, nr) = (kernel.mr, kernel.nr);
    let mut sig = module.make_signature();
    for _ in 0..6 {
        sig.params.push(AbiParam::new(types::I64));
    }
    sig.returns.push(AbiParam::new(types::I64));
    let driver = module.declare_function("driver", Linkage::Local, &sig).unwrap();
    let mut ctx = module.make_context();
    ctx.func.signature = sig;
    ctx.func.name = UserFuncName::user(0, driver.as_u32());
    let mut fb = FunctionBuilderContext::new();
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fb);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let &[k1, k2, a, bp, c, ldc] = b.block_params(entry) else {
            unreachable!()
        };
        let callee = module.declare_func_in_func(kernel.func, b.func);
        let live = b.ins().iadd(a, c);
        let zero = b.ins().iconst(types::I64, 0);
        let one = b.ins().iconst(types::I64, 1);
        b.ins().call(callee, &[k1, a, bp, c, ldc, zero]);
        let a_bytes = b.ins().imul_imm_s(k1, (mr * 4) as i64);
        let b_bytes = b.ins().imul_imm_s(k1, (nr * 4) as i64);
        let a2 = b.ins().iadd(a, a_bytes);
        let b2 = b.ins().iadd(bp, b_bytes);
        b.ins().call(callee, &[k2, a2, b2, c, ldc, one]);
        let result = b.ins().iadd(live, k2);
        b.ins().return_(&[result]);
        b.seal_all_blocks();
        b.finalize(module.target_config());
    }
    module.define_function(driver, &mut ctx).unwrap();
    module.finalize_definitions().unwrap();
    // SAFETY: the driver's signature is six i64 -> i64 in the host convention.
    let run = unsafe {
        std::mem::transmute::<*const u8, extern "C" fn(i64, i64, *const f32, *const f32, *mut f32, i64) -> i64>(
            module.get_finalized_function(driver),
        )
    };
    let (k1, k2) = (37usize, 20usize);
    let k = k1 + k2;
    let mut rng = Rng(42);
    let a = rng.fill(mr * k);
    let b = rng.fill(nr * k);
    let b_panel = Aligned::from(&b);
    let mut c = vec![f32::NAN; mr * nr];
    let back = run(
        k1 as i64,
        k2 as i64,
        a.as_ptr(),
        b_panel.ptr(),
        c.as_mut_ptr(),
        nr as i64,
    );
    assert_eq!(back, a.as_ptr() as i64 + c.as_ptr() as i64 + k2 as i64);
    let want: Vec<f64> = (0..mr * nr)
        .map(|at| {
            let (i, jj) = (at / nr, at % nr);
            (0..k).map(|kk| a[kk * mr + i] as f64 * b[kk * nr + jj] as f64).sum()
        })
        .collect();
    assert_close(&c, &want, "split-k from Cranelift");
    // SAFETY: `run` is not used after this.
    unsafe { module.free_memory() };
}

/// An exported function that forwards its six arguments to the kernel: what a
/// shared library built with the kernel inside looks like from C.
fn define_forwarder<M: Module>(module: &mut M, kernel: &GemmKernel, name: &str) -> cranelift_module::FuncId {
    let mut sig = module.make_signature();
    for _ in 0..6 {
        sig.params.push(AbiParam::new(types::I64));
    }
    let id = module.declare_function(name, Linkage::Export, &sig).unwrap();
    let mut ctx = module.make_context();
    ctx.func.signature = sig;
    ctx.func.name = UserFuncName::user(0, id.as_u32());
    let mut fb = FunctionBuilderContext::new();
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fb);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let params = b.block_params(entry).to_vec();
        let callee = module.declare_func_in_func(kernel.func, b.func);
        b.ins().call(callee, &params);
        b.ins().return_(&[]);
        b.seal_all_blocks();
        b.finalize(module.target_config());
    }
    module.define_function(id, &mut ctx).unwrap();
    id
}

/// The kernel in a PIC object, linked into a `.so` by the system C compiler, loaded
/// and called through an exported forwarder.
#[test]
fn kernel_in_a_shared_library() {
    let target = TargetSpec::host();
    let isa = target.isa(true).unwrap();
    let builder = cranelift_object::ObjectBuilder::new(isa, "gemm", cranelift_module::default_libcall_names()).unwrap();
    let mut module = cranelift_object::ObjectModule::new(builder);
    let kernel = define_gemm_kernel(&mut module, &target).unwrap();
    define_forwarder(&mut module, &kernel, "cnnc_test_gemm");
    let object = module.finish().emit().unwrap();
    let dir = std::env::temp_dir().join(format!("cnnc-microkernel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let so = dir.join("gemm.so");
    cnnc_codegen::link_shared(&object, &so, &target).unwrap();
    // SAFETY: the library was just built from the object above.
    let lib = unsafe { libloading::Library::new(&so) }.unwrap();
    let forwarder: libloading::Symbol<unsafe extern "C" fn(i64, *const f32, *const f32, *mut f32, i64, i64)> =
        unsafe { lib.get(b"cnnc_test_gemm") }.unwrap();
    check_against_reference(
        (kernel.mr, kernel.nr),
        "shared library",
        |k, a, b, c, ldc, accumulate| {
            let b_panel = Aligned::from(b);
            // SAFETY: as in `run_native`.
            unsafe {
                forwarder(
                    k as i64,
                    a.as_ptr(),
                    b_panel.ptr(),
                    c.as_mut_ptr().add(C_LEAD),
                    ldc as i64,
                    accumulate,
                )
            };
        },
    );
    drop(lib);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn kernel_kind_follows_target_features() {
    let x86 = |cpu: &str| TargetSpec::parse(Some("x86_64-unknown-linux-gnu"), Some(cpu)).unwrap();
    assert_eq!(GemmKernelKind::for_target(&x86("x86-64-v4")), GemmKernelKind::Avx512);
    assert_eq!(GemmKernelKind::for_target(&x86("x86-64-v3")), GemmKernelKind::Avx2Fma);
    assert_eq!(
        GemmKernelKind::for_target(&x86("x86-64-v2")),
        GemmKernelKind::Portable { fma: false }
    );
    assert_eq!(
        GemmKernelKind::for_target(&x86("x86-64")),
        GemmKernelKind::Portable { fma: false }
    );
    let arm = TargetSpec::parse(Some("aarch64-unknown-linux-gnu"), None).unwrap();
    assert_eq!(GemmKernelKind::for_target(&arm), GemmKernelKind::Portable { fma: true });
    assert_eq!(
        GemmKernelKind::Avx2Fma.symbol(&x86("x86-64-v3")),
        "cnnc_gemm_f32_avx2_6x16"
    );
}

/// Every kind defines into an object module for its target (cross targets included).
#[test]
fn kernels_define_into_objects_for_every_target() {
    let cases = [
        ("x86_64-unknown-linux-gnu", "x86-64-v4", (14, 32)),
        ("x86_64-unknown-linux-gnu", "x86-64-v3", (6, 16)),
        ("x86_64-unknown-linux-gnu", "x86-64-v2", (4, 8)),
        ("x86_64-pc-windows-msvc", "x86-64-v3", (6, 16)),
        ("aarch64-unknown-linux-gnu", "generic", (8, 8)),
    ];
    for (triple, cpu, tile) in cases {
        let target = TargetSpec::parse(Some(triple), Some(cpu)).unwrap();
        let isa = target.isa(true).unwrap();
        let builder =
            cranelift_object::ObjectBuilder::new(isa, "gemm", cranelift_module::default_libcall_names()).unwrap();
        let mut module = cranelift_object::ObjectModule::new(builder);
        let kernel = define_gemm_kernel(&mut module, &target).unwrap_or_else(|e| panic!("{triple} {cpu}: {e}"));
        assert_eq!((kernel.mr, kernel.nr), tile, "{triple} {cpu}");
        let sig = gemm_kernel_signature(&module, &target);
        assert_eq!(sig.params.len(), 6);
        assert!(sig.returns.is_empty());
        let bytes = module.finish().emit().unwrap();
        assert!(!bytes.is_empty());
    }
}

#[test]
fn machine_code_kernels_are_refused_for_aarch64() {
    let arm = TargetSpec::parse(Some("aarch64-unknown-linux-gnu"), None).unwrap();
    let isa = arm.isa(true).unwrap();
    let builder = cranelift_object::ObjectBuilder::new(isa, "gemm", cranelift_module::default_libcall_names()).unwrap();
    let mut module = cranelift_object::ObjectModule::new(builder);
    let e = define_gemm_kernel_of_kind(&mut module, &arm, GemmKernelKind::Avx2Fma).unwrap_err();
    assert!(e.0.contains("x86-64 machine code"), "{e}");
}

#[test]
fn defining_twice_in_one_module_is_an_error() {
    let target = TargetSpec::host();
    let mut module = new_module(&target);
    define_gemm_kernel(&mut module, &target).unwrap();
    let e = define_gemm_kernel(&mut module, &target).unwrap_err();
    assert!(e.0.contains("once per module"), "{e}");
    unsafe { module.free_memory() };
}

/// Encoding checks that hold for both machine-code kernels. With
/// `CNNC_DUMP_KERNELS=DIR` the code is also written to `DIR/<name>.bin`, for
/// `objdump -D -b binary -m i386:x86-64 -M intel`.
fn check_encoding(kernel: &x86::AssembledKernel, name: &str) {
    let code = &kernel.code;
    if let Some(dir) = std::env::var_os("CNNC_DUMP_KERNELS") {
        std::fs::write(std::path::Path::new(&dir).join(format!("{name}.bin")), code).unwrap();
    }
    assert!(code.len() > 100);
    assert_eq!(
        &code[code.len() - 4..],
        &[0xC5, 0xF8, 0x77, 0xC3],
        "must end in vzeroupper; ret"
    );
    assert_eq!(kernel.main_loop_offset % x86::LOOP_ALIGN, 0);
    // Both store paths end the same way.
    let tails = code.windows(4).filter(|w| *w == [0xC5, 0xF8, 0x77, 0xC3]).count();
    assert_eq!(tails, 2);
}

#[test]
fn avx2_kernel_encoding() {
    let kernel = x86::assemble_avx2_gemm().unwrap();
    assert_eq!((kernel.mr, kernel.nr), (6, 16));
    check_encoding(&kernel, "avx2");
}

#[test]
fn avx512_kernel_encoding() {
    let kernel = x86::assemble_avx512_gemm().unwrap();
    assert_eq!((kernel.mr, kernel.nr), (14, 32));
    check_encoding(&kernel, "avx512");
    // 5 copies of the k step (4 unrolled + the remainder loop), each with 14
    // `vbroadcastss zmm, m32` (EVEX map 0F38, opcode 18) and 28 register-only
    // `vfmadd231ps zmm` (opcode B8, mod = 11).
    let evex = |w: &[u8], opcode: u8| w[0] == 0x62 && w[1] & 0x03 == 0x02 && w[4] == opcode;
    let broadcasts = kernel
        .code
        .windows(6)
        .filter(|w| evex(w, 0x18) && w[5] >> 6 != 3)
        .count();
    let fmas = kernel
        .code
        .windows(6)
        .filter(|w| evex(w, 0xB8) && w[5] >> 6 == 3)
        .count();
    assert_eq!((broadcasts, fmas), (14 * 5, 28 * 5));
}

/// The AVX-512 kernel cannot run here: its decoded bytes run in the emulator.
#[test]
fn avx512_kernel_matches_reference_in_emulator() {
    let kernel = x86::assemble_avx512_gemm().unwrap();
    check_against_reference((kernel.mr, kernel.nr), "avx512 (emulated)", run_emulated(&kernel.code));
}

#[test]
fn avx2_kernel_matches_reference_in_emulator() {
    let kernel = x86::assemble_avx2_gemm().unwrap();
    check_against_reference((kernel.mr, kernel.nr), "avx2 (emulated)", run_emulated(&kernel.code));
}

/// Trust in the emulator: it must reproduce the hardware bit for bit on AVX2.
#[test]
fn emulator_agrees_bitwise_with_native_avx2() {
    if !host_has_avx2_fma() {
        eprintln!("skipped: host has no AVX2+FMA");
        return;
    }
    let kernel = x86::assemble_avx2_gemm().unwrap();
    let j = jit(&TargetSpec::host(), Some(GemmKernelKind::Avx2Fma));
    let mut native = run_native(&j);
    let mut emulated = run_emulated(&kernel.code);
    let mut rng = Rng(7);
    for &k in &DEPTHS {
        for accumulate in [0, 1] {
            let a = rng.fill(6 * k);
            let b = rng.fill(16 * k);
            let c = rng.fill(C_LEAD + 6 * 20);
            let (mut on_cpu, mut in_emulator) = (c.clone(), c);
            native(k, &a, &b, &mut on_cpu, 20, accumulate);
            emulated(k, &a, &b, &mut in_emulator, 20, accumulate);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&on_cpu), bits(&in_emulator), "k={k} accumulate={accumulate}");
        }
    }
}

#[test]
#[ignore = "benchmark: cargo test -p cnnc-codegen --release --test microkernel -- --ignored --nocapture"]
fn bench_microkernel_against_fma_peak() {
    let bench = cnnc_codegen::microkernel::measure_gemm_vs_peak().unwrap();
    println!("{bench}");
    let (peak, kernel) = cnnc_codegen::microkernel::bench_gemm_vs_peak();
    println!(
        "second run: peak={peak:.1} kernel={kernel:.1} ratio={:.3}",
        kernel / peak
    );
    for kind in [
        GemmKernelKind::Avx512,
        GemmKernelKind::Avx2Fma,
        GemmKernelKind::Portable { fma: true },
        GemmKernelKind::Portable { fma: false },
    ] {
        match cnnc_codegen::microkernel::measure_kind_vs_peak(kind) {
            Ok(bench) => println!("{bench}"),
            Err(e) => println!("{e}"),
        }
    }
}
