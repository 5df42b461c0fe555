//! A minimal JIT around one kernel emitter: builds a one-node graph, emits the node
//! into a function `fn(buffers: *const *mut u8)`, runs it on guarded buffers and
//! returns the outputs.

use cnnc_codegen::kernels::{CodegenError, KernelCtx};
use cnnc_ir::{DType, Graph, Op, Tensor, TensorData, TensorType};
use cranelift_codegen::ir::{AbiParam, InstBuilder, MemFlagsData, types::I64};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{Linkage, Module};

pub type Emitter = fn(&mut KernelCtx) -> Result<(), CodegenError>;

unsafe extern "C" {
    fn mmap(addr: *mut u8, len: usize, prot: i32, flags: i32, fd: i32, offset: i64) -> *mut u8;
    fn mprotect(addr: *mut u8, len: usize, prot: i32) -> i32;
    fn munmap(addr: *mut u8, len: usize) -> i32;
}

const PAGE: usize = 4096;
const PROT_NONE: i32 = 0;
const PROT_READ_WRITE: i32 = 3;
const MAP_PRIVATE_ANONYMOUS: i32 = 0x02 | 0x20;

/// A buffer next to an inaccessible page: its last byte just before one (`Guard::End`)
/// or its first byte just after one (`Guard::Start`), so a kernel that reads or writes
/// past either end faults instead of passing by luck. The rest of the mapping holds
/// a canary, checked afterwards.
pub struct GuardedBuffer {
    base: *mut u8,
    mapped: usize,
    data: *mut u8,
    len: usize,
    guard: Guard,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Guard {
    Start,
    End,
}

const CANARY: u8 = 0xA5;

impl GuardedBuffer {
    pub fn new(bytes: &[u8], guard: Guard) -> GuardedBuffer {
        let len = bytes.len();
        let pages = len.div_ceil(PAGE) + 1;
        let mapped = (pages + 1) * PAGE;
        // SAFETY: anonymous private mapping; one page at the guarded end is made
        // inaccessible and the data copied against it.
        unsafe {
            let base = mmap(
                std::ptr::null_mut(),
                mapped,
                PROT_READ_WRITE,
                MAP_PRIVATE_ANONYMOUS,
                -1,
                0,
            );
            assert!(!base.is_null() && base as isize != -1, "mmap failed");
            std::ptr::write_bytes(base, CANARY, mapped);
            let data = match guard {
                Guard::End => {
                    let fence = base.add(pages * PAGE);
                    assert_eq!(mprotect(fence, PAGE, PROT_NONE), 0, "mprotect failed");
                    fence.sub(len)
                }
                Guard::Start => {
                    assert_eq!(mprotect(base, PAGE, PROT_NONE), 0, "mprotect failed");
                    base.add(PAGE)
                }
            };
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), data, len);
            GuardedBuffer {
                base,
                mapped,
                data,
                len,
                guard,
            }
        }
    }

    pub fn ptr(&self) -> *mut u8 {
        self.data
    }

    pub fn bytes(&self) -> Vec<u8> {
        // SAFETY: `data..data+len` lies inside the readable part of the mapping.
        unsafe { std::slice::from_raw_parts(self.data, self.len).to_vec() }
    }

    /// Whether the readable bytes around the data still hold the canary.
    pub fn surroundings_intact(&self) -> bool {
        let start = self.base as usize;
        let (lo, hi) = (self.data as usize, self.data as usize + self.len);
        // Everything mapped but the protected page: before the data (End guard) or
        // after it (Start guard).
        let (from, to) = match self.guard {
            Guard::End => (start, hi),
            Guard::Start => (start + PAGE, start + self.mapped),
        };
        // SAFETY: `from..lo` and `hi..to` lie inside the readable part of the mapping.
        unsafe {
            let front = std::slice::from_raw_parts(from as *const u8, lo - from);
            let back = std::slice::from_raw_parts(hi as *const u8, to - hi);
            front.iter().chain(back).all(|&b| b == CANARY)
        }
    }
}

impl Drop for GuardedBuffer {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe {
            munmap(self.base, self.mapped);
        }
    }
}

/// Host ISA with the flags the production pipeline uses (speed, non-PIC JIT).
fn host_module() -> JITModule {
    let mut flags = settings::builder();
    flags.set("opt_level", "speed").expect("opt_level flag");
    flags.set("is_pic", "false").expect("is_pic flag");
    flags
        .set("use_colocated_libcalls", "false")
        .expect("libcall flag");
    let isa = cranelift_native::builder()
        .expect("host ISA")
        .finish(settings::Flags::new(flags))
        .expect("ISA flags");
    JITModule::new(JITBuilder::with_isa(
        isa,
        cranelift_module::default_libcall_names(),
    ))
}

/// A compiled one-node kernel, runnable many times.
pub struct Kernel {
    _module: JITModule,
    entry: extern "C" fn(*const *mut u8),
    pub output_types: Vec<TensorType>,
}

/// Compiles `op` on inputs of the given types; output types from the typing rules
/// (or `declared` for ops that need it).
pub fn compile(
    op: Op,
    inputs: &[TensorType],
    declared: Option<Vec<TensorType>>,
    emitter: Emitter,
) -> Result<Kernel, String> {
    let mut graph = Graph::new("kernel_test");
    let input_ids: Vec<_> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| graph.add_input(t.clone(), format!("in{i}")))
        .collect();
    let tys: Vec<&TensorType> = inputs.iter().collect();
    let output_types =
        cnnc_ir::infer::output_types(&op, &tys, &graph.constants, declared.as_deref())?;
    let outputs = graph.add_node_typed("node", op, input_ids, output_types.clone());
    graph.outputs = outputs;
    let node = graph.nodes[0].clone();

    let mut module = host_module();
    let frontend_config = module.isa().frontend_config();
    let mut ctx = module.make_context();
    ctx.func.signature.params.push(AbiParam::new(I64));
    let mut fctx = FunctionBuilderContext::new();
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        b.seal_block(entry);
        let table = b.block_params(entry)[0];
        let n = inputs.len() + output_types.len();
        let ptrs: Vec<_> = (0..n)
            .map(|i| {
                b.ins()
                    .load(I64, MemFlagsData::trusted(), table, (i * 8) as i32)
            })
            .collect();
        let mut k = KernelCtx {
            b: &mut b,
            graph: &graph,
            node: &node,
            inputs: ptrs[..inputs.len()].to_vec(),
            outputs: ptrs[inputs.len()..].to_vec(),
        };
        emitter(&mut k).map_err(|e| e.0)?;
        b.ins().return_(&[]);
        b.seal_all_blocks();
        b.finalize(frontend_config);
    }
    let id = module
        .declare_function("kernel", Linkage::Export, &ctx.func.signature)
        .map_err(|e| e.to_string())?;
    let disasm = std::env::var_os("CNNC_DISASM").is_some();
    ctx.set_disasm(disasm);
    module
        .define_function(id, &mut ctx)
        .map_err(|e| format!("{e:?}"))?;
    if let Some(code) = ctx
        .compiled_code()
        .and_then(|c| c.vcode.as_ref())
        .filter(|_| disasm)
    {
        eprintln!("{}\n{code}", ctx.func.display());
    }
    module.clear_context(&mut ctx);
    module.finalize_definitions().map_err(|e| e.to_string())?;
    let code = module.get_finalized_function(id);
    // SAFETY: the function was declared with exactly this signature.
    let entry = unsafe { std::mem::transmute::<*const u8, extern "C" fn(*const *mut u8)>(code) };
    Ok(Kernel {
        _module: module,
        entry,
        output_types,
    })
}

impl Kernel {
    /// Runs on fresh copies of `inputs` guarded at their ends, then at their starts;
    /// checks that inputs are unchanged, nothing was written around any buffer and
    /// both runs agree.
    pub fn run(&self, inputs: &[&Tensor]) -> Vec<Tensor> {
        let end = self.run_guarded(inputs, Guard::End);
        let start = self.run_guarded(inputs, Guard::Start);
        for (a, b) in end.iter().zip(&start) {
            assert_eq!(
                a.data.to_le_bytes(),
                b.data.to_le_bytes(),
                "results depend on buffer placement"
            );
        }
        end
    }

    fn run_guarded(&self, inputs: &[&Tensor], guard: Guard) -> Vec<Tensor> {
        let in_bufs: Vec<GuardedBuffer> = inputs
            .iter()
            .map(|t| GuardedBuffer::new(&t.data.to_le_bytes(), guard))
            .collect();
        // Outputs start as NaN (or a pattern for integers) so unwritten elements show.
        let out_bufs: Vec<GuardedBuffer> = self
            .output_types
            .iter()
            .map(|t| GuardedBuffer::new(&vec![0xFFu8; t.byte_size()], guard))
            .collect();
        let table: Vec<*mut u8> = in_bufs
            .iter()
            .chain(&out_bufs)
            .map(GuardedBuffer::ptr)
            .collect();
        (self.entry)(table.as_ptr());
        for (buf, t) in in_bufs.iter().zip(inputs) {
            assert!(
                buf.surroundings_intact(),
                "kernel wrote around an input buffer"
            );
            assert_eq!(
                buf.bytes(),
                t.data.to_le_bytes(),
                "kernel modified an input"
            );
        }
        out_bufs
            .iter()
            .zip(&self.output_types)
            .map(|(buf, t)| {
                assert!(
                    buf.surroundings_intact(),
                    "kernel wrote around an output buffer"
                );
                Tensor::new(
                    t.shape.clone(),
                    TensorData::from_le_bytes(t.dtype, &buf.bytes()),
                )
            })
            .collect()
    }

    /// Raw entry for benchmarks: buffers are reused across calls.
    pub fn call(&self, table: &[*mut u8]) {
        (self.entry)(table.as_ptr());
    }
}

/// Compiles and runs in one go.
pub fn run(
    op: Op,
    inputs: &[&Tensor],
    declared: Option<Vec<TensorType>>,
    emitter: Emitter,
) -> Result<Vec<Tensor>, String> {
    let types: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
    let kernel = compile(op, &types, declared, emitter)?;
    Ok(kernel.run(inputs))
}

/// Checks `got` against `want` with the project tolerance
/// `|y - ref| <= 1e-3·|ref| + 1e-4·max|ref|`; integers exactly; NaN where NaN.
pub fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    assert_eq!(got.data.dtype(), want.data.dtype(), "{what}: dtype");
    match (&got.data, &want.data) {
        (TensorData::F32(g), TensorData::F32(w)) => {
            let max_ref = w
                .iter()
                .filter(|v| v.is_finite())
                .fold(0f32, |m, v| m.max(v.abs()));
            for (i, (&y, &r)) in g.iter().zip(w).enumerate() {
                if r.is_nan() {
                    assert!(y.is_nan(), "{what}: element {i}: got {y}, want NaN");
                    continue;
                }
                if r.is_infinite() {
                    assert_eq!(y, r, "{what}: element {i}");
                    continue;
                }
                let tol = 1e-3 * r.abs() + 1e-4 * max_ref;
                assert!(
                    (y - r).abs() <= tol,
                    "{what}: element {i}: got {y}, want {r} (tolerance {tol})"
                );
            }
        }
        (g, w) => assert_eq!(g, w, "{what}: integer elements differ"),
    }
}

/// Deterministic pseudo-random f32 data in [-1, 1) (or small integers when `ties`,
/// to exercise equal elements).
pub fn random_f32(shape: &[usize], seed: u64, ties: bool) -> Tensor {
    let n: usize = shape.iter().product();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    let data = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 40) as f32 / (1u64 << 24) as f32;
            if ties {
                (u * 4.0).floor() - 2.0
            } else {
                u * 2.0 - 1.0
            }
        })
        .collect();
    Tensor::f32(shape.to_vec(), data)
}

/// The same values converted to an integer dtype (scaled to small integers).
pub fn random_int(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let f = random_f32(shape, seed, false);
    let v: Vec<i64> = f
        .data
        .as_f32()
        .unwrap()
        .iter()
        .map(|x| (x * 5.0).round() as i64)
        .collect();
    let data = match dtype {
        DType::I64 => TensorData::I64(v),
        DType::I32 => TensorData::I32(v.iter().map(|&x| x as i32).collect()),
        other => panic!("random_int: {other}"),
    };
    Tensor::new(shape.to_vec(), data)
}
