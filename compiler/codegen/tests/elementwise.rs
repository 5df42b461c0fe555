//! Unary, Binary, Where, Cast and epilogues: compiled code against the interpreter
//! over random shapes, broadcasting patterns, attributes and special values.

mod common;

use cnnc_ir::{BinaryFn, DType, EpilogueStep, Graph, Op, Tensor, TensorData, TensorType, UnaryFn};
use common::{Rng, check_close, check_graph, random_tensor};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: common::cases(48),
        ..ProptestConfig::default()
    }
}

/// Floats spanning many magnitudes, with zeros, infinities, NaN and denormals mixed in.
fn wild_f32(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| match rng.below(20) {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => f32::NEG_INFINITY,
            3 => 0.0,
            4 => -0.0,
            5 => 1e-40 * rng.f32_in(-1.0, 1.0),
            6 => rng.f32_in(-100.0, 100.0),
            7 => rng.f32_in(-1e-3, 1e-3),
            8 => rng.f32_in(-30.0, 30.0).round(),
            _ => rng.f32_in(-6.0, 6.0),
        })
        .collect()
}

fn shape_strategy(max_rank: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..7, 0..=max_rank)
}

/// A shape `other` broadcasts with: some axes set to 1, some leading axes dropped.
fn broadcast_partner(rng: &mut Rng, shape: &[usize]) -> Vec<usize> {
    let drop = rng.below(shape.len() as u64 + 1) as usize;
    shape[drop..]
        .iter()
        .map(|&d| if rng.below(3) == 0 { 1 } else { d })
        .collect()
}

fn all_unary(rng: &mut Rng) -> Vec<UnaryFn> {
    let mut a = || rng.f32_in(0.1, 2.0);
    use UnaryFn::*;
    vec![
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
        LeakyRelu { alpha: a() },
        Elu { alpha: a() },
        Selu {
            alpha: 1.673_263_2,
            gamma: 1.050_701,
        },
        Celu { alpha: a() },
        HardSigmoid { alpha: 0.2, beta: 0.5 },
        Swish { alpha: a() },
        Clip { min: -a(), max: a() },
        Clip {
            min: f32::NEG_INFINITY,
            max: 6.0,
        },
        Affine {
            scale: a(),
            shift: -a(),
        },
        PowConst { exponent: 2.0 },
        PowConst { exponent: 3.0 },
        PowConst { exponent: -2.0 },
        PowConst { exponent: 0.5 },
        PowConst { exponent: 0.0 },
        PowConst { exponent: 0.75 },
        PowConst { exponent: -1.5 },
    ]
}

fn unary_graph(f: UnaryFn, ty: TensorType) -> Graph {
    let mut g = Graph::new("unary");
    let x = g.add_input(ty, "x");
    let y = g.push1("f", Op::Unary(f), &[x]).unwrap();
    g.outputs.push(y);
    g
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn unary_f32_matches_interpreter(shape in shape_strategy(3), seed in 1u64..u64::MAX) {
        let mut rng = Rng(seed);
        let n: usize = shape.iter().product();
        let x = Tensor::f32(shape.clone(), wild_f32(&mut rng, n));
        for f in all_unary(&mut rng) {
            let g = unary_graph(f, TensorType::f32(shape.clone()));
            check_graph(&g, std::slice::from_ref(&x)).map_err(|e| TestCaseError::fail(format!("{f:?}: {e}\ninput {x:?}")))?;
        }
    }

    #[test]
    fn unary_int_and_bool(shape in shape_strategy(3), seed in 1u64..u64::MAX) {
        let mut rng = Rng(seed);
        for dtype in [DType::I64, DType::I32] {
            let x = random_tensor(&mut rng, dtype, &shape, 0.0, 0.0);
            for f in [UnaryFn::Neg, UnaryFn::Abs, UnaryFn::Relu, UnaryFn::Clip { min: -3.5, max: 7.2 }, UnaryFn::Clip { min: f32::NEG_INFINITY, max: f32::INFINITY }] {
                let g = unary_graph(f, TensorType::new(dtype, shape.clone()));
                check_graph(&g, std::slice::from_ref(&x)).map_err(|e| TestCaseError::fail(format!("{dtype} {f:?}: {e}")))?;
            }
        }
        let b = random_tensor(&mut rng, DType::Bool, &shape, 0.0, 0.0);
        let g = unary_graph(UnaryFn::Not, TensorType::new(DType::Bool, shape.clone()));
        check_graph(&g, &[b]).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn binary_broadcasts(shape in shape_strategy(4), seed in 1u64..u64::MAX, swap in any::<bool>()) {
        let mut rng = Rng(seed);
        let other = broadcast_partner(&mut rng, &shape);
        let (sa, sb) = if swap { (other.clone(), shape.clone()) } else { (shape.clone(), other.clone()) };
        use BinaryFn::*;
        for dtype in [DType::F32, DType::I64, DType::I32, DType::Bool] {
            let fns: Vec<BinaryFn> = match dtype {
                DType::Bool => vec![And, Or, Xor, Equal],
                _ => vec![Add, Sub, Mul, Div, Pow, Max, Min, PRelu, Less, LessOrEqual, Greater, GreaterOrEqual, Equal],
            };
            let (a, b) = if dtype == DType::F32 {
                let na: usize = sa.iter().product();
                let nb: usize = sb.iter().product();
                (Tensor::f32(sa.clone(), wild_f32(&mut rng, na)), Tensor::f32(sb.clone(), wild_f32(&mut rng, nb)))
            } else {
                (random_tensor(&mut rng, dtype, &sa, 0.0, 0.0), random_tensor(&mut rng, dtype, &sb, 0.0, 0.0))
            };
            for f in fns {
                let mut g = Graph::new("binary");
                let x = g.add_input(a.ty(), "a");
                let y = g.add_input(b.ty(), "b");
                let z = g.push1("f", Op::Binary(f), &[x, y]).unwrap();
                g.outputs.push(z);
                check_graph(&g, &[a.clone(), b.clone()]).map_err(|e| TestCaseError::fail(format!("{dtype} {f:?} {sa:?} x {sb:?}: {e}")))?;
            }
        }
    }

    #[test]
    fn where_broadcasts(shape in shape_strategy(4), seed in 1u64..u64::MAX) {
        let mut rng = Rng(seed);
        let sc = broadcast_partner(&mut rng, &shape);
        let sx = broadcast_partner(&mut rng, &shape);
        for dtype in [DType::F32, DType::I64, DType::I32, DType::Bool] {
            let c = random_tensor(&mut rng, DType::Bool, &sc, 0.0, 0.0);
            let x = random_tensor(&mut rng, dtype, &sx, -5.0, 5.0);
            let y = random_tensor(&mut rng, dtype, &shape, -5.0, 5.0);
            let mut g = Graph::new("where");
            let vc = g.add_input(c.ty(), "c");
            let vx = g.add_input(x.ty(), "x");
            let vy = g.add_input(y.ty(), "y");
            let z = g.push1("w", Op::Where, &[vc, vx, vy]).unwrap();
            g.outputs.push(z);
            check_graph(&g, &[c, x, y]).map_err(|e| TestCaseError::fail(format!("{dtype}: {e}")))?;
        }
    }

    #[test]
    fn cast_all_pairs(shape in shape_strategy(3), seed in 1u64..u64::MAX) {
        let mut rng = Rng(seed);
        for from in DType::ALL {
            let x = if from == DType::F32 {
                let n: usize = shape.iter().product();
                let mut v = wild_f32(&mut rng, n);
                // Out of i32/i64 range too (saturation).
                if let Some(first) = v.first_mut() { *first = 3e10; }
                Tensor::f32(shape.clone(), v)
            } else {
                random_tensor(&mut rng, from, &shape, 0.0, 0.0)
            };
            for to in DType::ALL {
                let mut g = Graph::new("cast");
                let v = g.add_input(x.ty(), "x");
                let y = g.push1("c", Op::Cast { to }, &[v]).unwrap();
                g.outputs.push(y);
                check_graph(&g, std::slice::from_ref(&x)).map_err(|e| TestCaseError::fail(format!("{from} -> {to}: {e}")))?;
            }
        }
    }

    #[test]
    fn epilogue_steps_apply_in_place(shape in prop::collection::vec(1usize..6, 2..=4), seed in 1u64..u64::MAX) {
        let mut rng = Rng(seed);
        let mut g = Graph::new("epilogue");
        let x = g.add_input(TensorType::f32(shape.clone()), "x");
        let bias_shape = broadcast_partner(&mut rng, &shape);
        let bias = g.add_input(TensorType::f32(bias_shape.clone()), "bias");
        let residual = g.add_input(TensorType::f32(shape.clone()), "residual");
        // Epilogue operands are node inputs; the interpreter checks op arity, so the
        // steps reuse the op's own operands.
        let sum = g.push1("add", Op::Binary(BinaryFn::Add), &[x, bias]).unwrap();
        let y = g.push1("sub", Op::Binary(BinaryFn::Sub), &[sum, residual]).unwrap();
        let node = g.nodes.last_mut().unwrap();
        node.epilogue = vec![
            EpilogueStep::Binary { func: BinaryFn::Mul, operand: 1 },
            EpilogueStep::Unary(UnaryFn::Relu),
            EpilogueStep::Binary { func: BinaryFn::Add, operand: 0 },
            EpilogueStep::Unary(UnaryFn::Sigmoid),
        ];
        g.outputs.push(y);
        let inputs = [
            random_tensor(&mut rng, DType::F32, &shape, -2.0, 2.0),
            random_tensor(&mut rng, DType::F32, &bias_shape, -2.0, 2.0),
            random_tensor(&mut rng, DType::F32, &shape, -2.0, 2.0),
        ];
        check_graph(&g, &inputs).map_err(TestCaseError::fail)?;
    }
}

/// Dense sweeps of the transcendental functions: accurate over many magnitudes, not
/// just on the few values a property test draws.
#[test]
fn math_functions_sweep() {
    let mut v = Vec::new();
    let mut x = -110.0f32;
    while x < 110.0 {
        v.push(x);
        x += 0.0173;
    }
    for e in -45..=38 {
        let m = 10f32.powi(e);
        v.extend([m, -m, 1.7 * m, -3.1 * m]);
    }
    v.extend([
        f32::MIN_POSITIVE,
        1e-45,
        -1e-45,
        f32::MAX,
        f32::MIN,
        88.72,
        88.73,
        -87.3,
        -103.9,
        -104.5,
    ]);
    let n = v.len();
    let input = Tensor::f32([n], v);
    let mut rng = Rng(3);
    for f in all_unary(&mut rng) {
        let g = unary_graph(f, TensorType::f32([n]));
        // Each element alone, so max|ref| does not hide relative errors.
        let want = cnnc_ir::interp::run(&g, std::slice::from_ref(&input)).unwrap();
        let got = cnnc_codegen::JitModel::compile(&g)
            .unwrap()
            .run(std::slice::from_ref(&input))
            .unwrap();
        let (TensorData::F32(a), TensorData::F32(b)) = (&got[0].data, &want[0].data) else {
            panic!()
        };
        for i in 0..n {
            // Exp and Log must be right down to one unit of the denormals. Functions
            // built on them are held to 1e-3 relative plus 1e-6 absolute: the
            // interpreter itself cancels for tiny results (Selu as α·eˣ − α, GeluTanh
            // as 1 + tanh u), and under the tensor-wide tolerance such values never
            // matter.
            let slack = match f {
                UnaryFn::Exp | UnaryFn::Log => 3e-45,
                _ => 1e-6,
            };
            let (y, r) = (a[i], b[i]);
            let ok = if r.is_nan() {
                y.is_nan()
            } else if r.is_infinite() {
                y == r
            } else {
                (y - r).abs() <= 1e-3 * r.abs() + slack
            };
            assert!(
                ok,
                "{f:?}({:e}): got {y:e}, reference {r:e}",
                input.data.get(i).as_f64()
            );
        }
    }
}

/// Powers over signs, zeros, infinities and integer/non-integer exponents, checked
/// element by element against C pow semantics.
#[test]
fn pow_special_cases() {
    let bases = [
        0.0f32,
        -0.0,
        1.0,
        -1.0,
        2.0,
        -2.0,
        0.5,
        -0.5,
        10.0,
        -3.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1e-30,
        1e30,
    ];
    let exps = [
        0.0f32,
        -0.0,
        1.0,
        -1.0,
        2.0,
        3.0,
        -3.0,
        0.5,
        -0.5,
        2.5,
        40.0,
        -40.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ];
    let mut a = Vec::new();
    let mut b = Vec::new();
    for &x in &bases {
        for &y in &exps {
            a.push(x);
            b.push(y);
        }
    }
    let n = a.len();
    let mut g = Graph::new("pow");
    let x = g.add_input(TensorType::f32([n]), "x");
    let y = g.add_input(TensorType::f32([n]), "y");
    let z = g.push1("pow", Op::Binary(BinaryFn::Pow), &[x, y]).unwrap();
    g.outputs.push(z);
    let inputs = [Tensor::f32([n], a.clone()), Tensor::f32([n], b.clone())];
    let got = cnnc_codegen::JitModel::compile(&g).unwrap().run(&inputs).unwrap();
    let TensorData::F32(r) = &got[0].data else { panic!() };
    for i in 0..n {
        let want = (a[i] as f64).powf(b[i] as f64) as f32;
        let one = |x: f32| Tensor::f32([1], vec![x]);
        if let Err(e) = check_close(&one(r[i]), &one(want)) {
            panic!("pow({}, {}): {e}", a[i], b[i]);
        }
    }
}

#[test]
fn integer_division_never_traps() {
    let a = vec![7i64, -7, 7, -7, i64::MIN, i64::MIN, 5, 0];
    let b = vec![2i64, 2, -2, -2, -1, 1, 0, 0];
    let mut g = Graph::new("div");
    let x = g.add_input(TensorType::new(DType::I64, [8]), "a");
    let y = g.add_input(TensorType::new(DType::I64, [8]), "b");
    let z = g.push1("div", Op::Binary(BinaryFn::Div), &[x, y]).unwrap();
    g.outputs.push(z);
    let inputs = [
        Tensor::new([8], TensorData::I64(a)),
        Tensor::new([8], TensorData::I64(b)),
    ];
    let got = cnnc_codegen::JitModel::compile(&g).unwrap().run(&inputs).unwrap();
    assert_eq!(
        got[0].data,
        TensorData::I64(vec![3, -3, -3, 3, i64::MIN, i64::MIN, 0, 0])
    );
    check_graph(&g, &inputs).unwrap();
}
