//! The matmul-as-conv pass (`compiler/src/passes/matmul_as_conv.rs`): insta snapshots
//! of the IR before and after for the products it rewrites and those it must leave
//! (re-bless with `INSTA_UPDATE=always cargo test --test matmul_as_conv`), and property
//! tests that compile rewritten products over random shapes (rows or columns not a
//! multiple of the tile, K = 1, batched A, constant operands, epilogues) and compare
//! them with the reference interpreter on the original MatMul: in-process on the host's
//! microkernel, and through a linked `.so` on the portable kernel (x86-64-v2) with
//! threads.


use cnnc::compare::compare;
use cnnc::passes::matmul_as_conv::{THRESHOLDS, Thresholds, rewrite_matmuls};
use cnnc::passes::{PassContext, TargetDesc, choose_schedule};
use cnnc_codegen::{JitModel, TargetSpec};
use cnnc_ir::print::{PrintOptions, print_with};
use cnnc_ir::{BinaryFn, DType, EpilogueStep, Graph, Op, Tensor, TensorType, UnaryFn};
use proptest::prelude::*;

// The codegen tests' runner of compiled shared libraries (temp path, link, session, remove).
#[path = "../compiler/codegen/tests/common/mod.rs"]
mod codegen_common;

/// Every size rewritten: the property tests reach the edge cases with small products.
const ALWAYS: Thresholds =
    Thresholds { min_macs: 0, min_rows: 1, min_columns: 1, narrow_columns: 0, max_narrow_a_elements: usize::MAX };

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn tensor(&mut self, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        let data = (0..n).map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0).collect();
        Tensor::f32(shape.to_vec(), data)
    }
}

/// How one operand enters the graph.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Source {
    Input,
    Constant,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Epilogue {
    None,
    /// `+ bias[N]`, then ReLU.
    BiasRelu,
    /// `+ residual`, a tensor of the output's shape.
    Residual,
}

#[derive(Clone, Debug)]
struct Product {
    a_batch: Vec<usize>,
    rows: usize,
    depth: usize,
    columns: usize,
    /// B's leading axes, all 1 (B has no batches of its own).
    b_ones: usize,
    a: Source,
    b: Source,
    epilogue: Epilogue,
    seed: u64,
}

impl Product {
    fn graph(&self) -> Graph {
        let mut rng = Rng::new(self.seed);
        let mut g = Graph::new("product");
        let mut a_shape = self.a_batch.clone();
        a_shape.extend([self.rows, self.depth]);
        let mut b_shape = vec![1; self.b_ones];
        b_shape.extend([self.depth, self.columns]);
        let mut operand = |g: &mut Graph, source: Source, shape: &[usize], name: &str| match source {
            Source::Input => g.add_input(TensorType::f32(shape.to_vec()), name),
            Source::Constant => g.add_constant(name, rng.tensor(shape)),
        };
        let a = operand(&mut g, self.a, &a_shape, "a");
        let b = operand(&mut g, self.b, &b_shape, "b");
        let c = g.push1("matmul", Op::MatMul, &[a, b]).expect("the product types");
        let c_shape = g.ty(c).shape.clone();
        let extra = match self.epilogue {
            Epilogue::None => vec![],
            Epilogue::BiasRelu => vec![g.add_input(TensorType::f32(vec![self.columns]), "bias")],
            Epilogue::Residual => vec![g.add_input(TensorType::f32(c_shape), "residual")],
        };
        let node = g.nodes.last_mut().expect("the matmul node");
        node.inputs.extend(&extra);
        node.epilogue = match self.epilogue {
            Epilogue::None => vec![],
            Epilogue::BiasRelu => {
                vec![EpilogueStep::Binary { func: BinaryFn::Add, operand: 2 }, EpilogueStep::Unary(UnaryFn::Relu)]
            }
            Epilogue::Residual => vec![EpilogueStep::Binary { func: BinaryFn::Add, operand: 2 }],
        };
        g.outputs.push(c);
        cnnc_ir::verify::verify(&g).unwrap_or_else(|e| panic!("test graph {self:?}: {e}"));
        g
    }

    fn inputs(&self, g: &Graph) -> Vec<Tensor> {
        let mut rng = Rng::new(self.seed ^ 0x5555);
        g.inputs.iter().map(|&v| rng.tensor(&g.ty(v).shape)).collect()
    }

    /// An operand that varies along rows cannot move to the convolution when A is
    /// batched, nor one of more axes than the convolution's output; a constant B with
    /// few rows is `kernels/gemv.rs`'s.
    fn rewritable(&self) -> bool {
        let batches = self.a_batch.iter().product::<usize>();
        let gemv = self.b == Source::Constant && batches * self.rows <= cnnc_codegen::kernels::gemv::MAX_ROWS;
        let c_rank = (self.a_batch.len() + 2).max(self.b_ones + 2);
        let residual_fits = batches == 1 && c_rank <= 3;
        (self.epilogue != Epilogue::Residual || residual_fits) && !gemv
    }
}

fn product() -> impl Strategy<Value = Product> {
    let batch = prop_oneof![Just(vec![]), Just(vec![1]), (2usize..4).prop_map(|b| vec![b]), Just(vec![2, 3])];
    let source = prop_oneof![Just(Source::Input), Just(Source::Constant)];
    let epilogue = prop_oneof![Just(Epilogue::None), Just(Epilogue::BiasRelu), Just(Epilogue::Residual)];
    (
        batch,
        1usize..40,
        prop_oneof![Just(1usize), 1usize..300],
        1usize..40,
        0usize..3,
        source.clone(),
        source,
        epilogue,
        any::<u64>(),
    )
        .prop_map(|(a_batch, rows, depth, columns, b_ones, a, b, epilogue, seed)| Product {
            a_batch,
            rows,
            depth,
            columns,
            b_ones,
            a,
            b,
            epilogue,
            seed,
        })
}

/// The interpreter on the original graph, and the rewritten graph (asserting it was
/// rewritten and that the interpreter agrees on it too).
fn rewritten(p: &Product) -> Result<(Graph, Vec<Tensor>, Vec<Tensor>), TestCaseError> {
    let original = p.graph();
    let inputs = p.inputs(&original);
    let want =
        cnnc_ir::interp::run(&original, &inputs).map_err(|e| TestCaseError::fail(format!("interpreter: {e}")))?;
    let mut g = original.clone();
    let count = rewrite_matmuls(&mut g, &ALWAYS);
    cnnc_ir::verify::verify(&g).map_err(|e| TestCaseError::fail(format!("rewritten graph: {e}")))?;
    prop_assert_eq!(count, usize::from(p.rewritable()), "rewrites of {:?}", p);
    let interpreted =
        cnnc_ir::interp::run(&g, &inputs).map_err(|e| TestCaseError::fail(format!("interpreter: {e}")))?;
    same(&interpreted, &want, "the interpreter on the rewritten graph")?;
    Ok((g, inputs, want))
}

fn same(got: &[Tensor], want: &[Tensor], what: &str) -> Result<(), TestCaseError> {
    for (y, r) in got.iter().zip(want) {
        compare(y, r).map_err(|e| TestCaseError::fail(format!("{what}: {e}")))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn host_microkernel_matches_the_interpreter(p in product()) {
        let (g, inputs, want) = rewritten(&p)?;
        let model = JitModel::compile(&g).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(model.info().gemm_convs, usize::from(p.rewritable()), "convolutions on the GEMM path");
        let got = model.run(&inputs).map_err(|e| TestCaseError::fail(e.to_string()))?;
        same(&got, &want, "host")?;
    }

    #[test]
    fn portable_kernel_with_threads_matches_the_interpreter(p in product()) {
        let (g, inputs, want) = rewritten(&p)?;
        let target = TargetSpec::parse(None, Some("x86-64-v2")).unwrap();
        let got = codegen_common::run_shared_library("matmul-as-conv", &g, &target, 2, &inputs).map_err(TestCaseError::fail)?;
        same(&got, &want, "x86-64-v2, 2 threads")?;
    }
}

/// The scheduled form (choose-schedule's kc/nc blocking) at a weight-gradient shape
/// large enough for several K blocks, row panels and threads.
#[test]
fn a_weight_gradient_shaped_product_runs_scheduled() {
    let p = Product {
        a_batch: vec![],
        rows: 147,
        depth: 1000,
        columns: 35,
        b_ones: 0,
        a: Source::Input,
        b: Source::Input,
        epilogue: Epilogue::None,
        seed: 7,
    };
    let original = p.graph();
    let inputs = p.inputs(&original);
    let want = cnnc_ir::interp::run(&original, &inputs).unwrap();
    let mut g = original.clone();
    assert_eq!(rewrite_matmuls(&mut g, &THRESHOLDS), 1);
    let ctx = PassContext { target: TargetDesc::fixed_for_tests() };
    (choose_schedule::PASS.run)(&mut g, &ctx).unwrap();
    let conv = g.nodes.iter().find(|n| matches!(n.op, Op::Conv(_))).expect("a conv");
    assert_eq!(conv.schedule.kernel, "gemm");
    let model = JitModel::compile(&g).unwrap();
    assert_eq!(model.info().gemm_convs, 1);
    same(&model.run(&inputs).unwrap(), &want, "host").unwrap();
    let target = TargetSpec::parse(None, Some("x86-64-v2")).unwrap();
    same(&codegen_common::run_shared_library("matmul-as-conv", &g, &target, 2, &inputs).unwrap(), &want, "x86-64-v2").unwrap();
}

// ---- snapshots: what is rewritten, and what is left ----

fn snapshot(case: &str, g: Graph) -> Graph {
    let opts = PrintOptions { elide_constant_data: true };
    let before = print_with(&g, &opts);
    let mut after = g;
    rewrite_matmuls(&mut after, &THRESHOLDS);
    cnnc_ir::verify::verify(&after).unwrap();
    insta::assert_snapshot!(case, format!("before:\n{before}\nafter:\n{}", print_with(&after, &opts)));
    after
}

fn ops(g: &Graph) -> Vec<&'static str> {
    g.nodes.iter().map(|n| n.op.mnemonic()).collect()
}

fn big(a: Source, b: Source) -> Product {
    Product { a_batch: vec![], rows: 96, depth: 512, columns: 64, b_ones: 0, a, b, epilogue: Epilogue::None, seed: 1 }
}

#[test]
fn rewrites_a_product_of_two_computed_operands() {
    let g = snapshot("two_inputs", big(Source::Input, Source::Input).graph());
    assert_eq!(ops(&g), ["reshape", "reshape", "conv", "reshape"]);
}

#[test]
fn constant_filters_stay_constants() {
    let g = snapshot("constant_a", big(Source::Constant, Source::Input).graph());
    assert_eq!(ops(&g), ["reshape", "constant", "conv", "reshape"]);
}

#[test]
fn batched_a_folds_into_rows_with_its_bias() {
    let p =
        Product { a_batch: vec![4], rows: 24, epilogue: Epilogue::BiasRelu, ..big(Source::Input, Source::Constant) };
    let g = snapshot("batched_a_bias_relu", p.graph());
    assert_eq!(ops(&g), ["constant", "reshape", "conv", "reshape"]);
    let conv = &g.nodes[2];
    assert_eq!(g.ty(conv.outputs[0]).shape, [1, 96, 64]);
    assert_eq!(conv.epilogue.len(), 2);
}

#[test]
fn leaves_small_products() {
    let p = Product { rows: 8, depth: 64, columns: 64, ..big(Source::Input, Source::Input) };
    let g = snapshot("small", p.graph());
    assert_eq!(ops(&g), ["matmul"]);
}

#[test]
fn leaves_a_constant_b_with_few_rows_to_gemv() {
    let p = Product { rows: 16, depth: 512, columns: 1000, ..big(Source::Input, Source::Constant) };
    let g = snapshot("gemv_classifier", p.graph());
    assert_eq!(ops(&g), ["constant", "matmul"]);
}

#[test]
fn leaves_few_columns_of_a_wide_a() {
    let p = Product { rows: 144, depth: 8192, columns: 16, ..big(Source::Input, Source::Input) };
    let g = snapshot("few_columns_wide_a", p.graph());
    assert_eq!(ops(&g), ["matmul"]);
    let p = Product { rows: 64, depth: 4096, columns: 8, ..big(Source::Input, Source::Input) };
    assert_eq!(ops(&snapshot("eight_columns", p.graph())), ["matmul"]);
}

#[test]
fn leaves_batched_b() {
    let mut g = Graph::new("batched_b");
    let a = g.add_input(TensorType::f32(vec![2, 96, 512]), "a");
    let b = g.add_input(TensorType::f32(vec![2, 512, 64]), "b");
    let c = g.push1("matmul", Op::MatMul, &[a, b]).unwrap();
    g.outputs.push(c);
    let g = snapshot("batched_b", g);
    assert_eq!(ops(&g), ["matmul"]);
}

#[test]
fn leaves_integer_products() {
    let mut g = Graph::new("integers");
    let a = g.add_input(TensorType::new(DType::I32, vec![96, 512]), "a");
    let b = g.add_input(TensorType::new(DType::I32, vec![512, 64]), "b");
    let c = g.push1("matmul", Op::MatMul, &[a, b]).unwrap();
    g.outputs.push(c);
    let g = snapshot("integers", g);
    assert_eq!(ops(&g), ["matmul"]);
}

#[test]
fn leaves_batched_a_whose_epilogue_varies_along_rows() {
    let p = Product { a_batch: vec![4], rows: 24, epilogue: Epilogue::Residual, ..big(Source::Input, Source::Input) };
    let g = snapshot("batched_a_residual", p.graph());
    assert_eq!(ops(&g), ["matmul"]);
}

// ---- running a linked library ----

