//! Random valid graphs for property tests, built only through the public builders
//! (`Graph::push`, `push_typed`, `add_constant`) so they are what passes see.
//!
//! A graph is described by a `GraphSeed`: a list of `StepSeed`s, each a bag of
//! random numbers that one builder step interprets. Proptest shrinks by dropping
//! steps, so a failure reduces to the few ops that cause it.

#![allow(dead_code)] // each test binary uses a different part

use cnnc_ir::*;
use proptest::prelude::*;

#[derive(Clone, Debug)]
pub struct StepSeed {
    kind: u8,
    picks: Vec<u32>,
    floats: Vec<f32>,
    name: String,
    value_name: Option<String>,
    epilogue: Vec<(u8, u32)>,
    schedule: Option<ScheduleSeed>,
}

/// Layout choices, vector width, tiles and kernel name.
type ScheduleSeed = (u8, u8, u32, Vec<(String, usize)>, String);

#[derive(Clone, Debug)]
pub struct GraphSeed {
    name: String,
    inputs: Vec<(u8, Vec<usize>, String)>,
    steps: Vec<StepSeed>,
    outputs: Vec<u32>,
}

/// Floats that a text form gets wrong first: NaN payloads and signs, -0.0, infinities,
/// subnormals, and values with long shortest representations.
pub fn tricky_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        3 => prop::num::f32::ANY,
        1 => -4.0f32..4.0,
        1 => prop::sample::select(vec![
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7fc0_0001),
            f32::from_bits(0x7f80_0001), // signalling NaN
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            0.0,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::MAX,
            f32::MIN,
            0.1,
            1.0 / 3.0,
        ]),
    ]
}

/// Names with quotes, backslashes, control characters, non-ASCII text and
/// text that looks like syntax.
pub fn odd_name() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => "[a-zA-Z0-9_./:]{0,10}",
        1 => prop::sample::select(vec![
            String::new(),
            "\"quoted\"".to_string(),
            "back\\slash".to_string(),
            "new\nline\ttab\r".to_string(),
            "%1 = conv @0".to_string(),
            "# not a comment".to_string(),
            "\u{0}\u{1b}\u{7f}\u{85}".to_string(),
            "héllo wörld ✓ 名前".to_string(),
            "{[(".to_string(),
        ]),
        1 => any::<String>(),
    ]
}

fn step_seed() -> impl Strategy<Value = StepSeed> {
    let schedule = (0u8..3, 0u8..3, 0u32..17, prop::collection::vec((odd_name(), 0usize..64), 0..3), odd_name());
    (
        0u8..24,
        prop::collection::vec(any::<u32>(), 16),
        prop::collection::vec(tricky_f32(), 1..6),
        odd_name(),
        prop::option::weighted(0.3, odd_name()),
        prop::collection::vec((any::<u8>(), any::<u32>()), 0..3),
        prop::option::weighted(0.2, schedule),
    )
        .prop_map(|(kind, picks, floats, name, value_name, epilogue, schedule)| StepSeed {
            kind,
            picks,
            floats,
            name,
            value_name,
            epilogue,
            schedule,
        })
}

pub fn graph_seed() -> impl Strategy<Value = GraphSeed> {
    let input = (0u8..8, prop::collection::vec(1usize..4, 0..5), odd_name());
    (
        odd_name(),
        prop::collection::vec(input, 0..3),
        prop::collection::vec(step_seed(), 0..24),
        prop::collection::vec(any::<u32>(), 1..3),
    )
        .prop_map(|(name, inputs, steps, outputs)| GraphSeed { name, inputs, steps, outputs })
}

pub fn graph() -> impl Strategy<Value = Graph> {
    graph_seed().prop_map(|s| build(&s))
}

/// Random choices for one step, drawn in turn from its seed (cycling).
struct Picks<'a> {
    seed: &'a StepSeed,
    next: usize,
    next_float: usize,
}

impl Picks<'_> {
    /// A number in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        let v = self.seed.picks[self.next % self.seed.picks.len()];
        self.next += 1;
        v as usize % n.max(1)
    }

    fn range(&mut self, lo: usize, hi_inclusive: usize) -> usize {
        lo + self.below(hi_inclusive - lo + 1)
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn float(&mut self) -> f32 {
        let f = self.seed.floats[self.next_float % self.seed.floats.len()];
        self.next_float += 1;
        // Mostly the tricky floats; sometimes a plain one so data is not all NaN.
        if self.chance(70) { f } else { self.below(2000) as f32 / 100.0 - 10.0 }
    }

    fn shape(&mut self, max_rank: usize) -> Vec<usize> {
        let rank = self.below(max_rank + 1);
        (0..rank).map(|_| self.range(1, 3)).collect()
    }

    fn dtype(&mut self) -> DType {
        // f32 carries most of the network.
        [DType::F32, DType::F32, DType::F32, DType::I64, DType::I32, DType::Bool][self.below(6)]
    }

    fn scalar(&mut self, dtype: DType) -> Scalar {
        match dtype {
            DType::F32 => Scalar::F32(self.float()),
            DType::I64 => Scalar::I64(self.below(u32::MAX as usize) as i64 - (1 << 31) * self.below(3) as i64),
            DType::I32 => Scalar::I32(self.below(u32::MAX as usize) as u32 as i32),
            DType::Bool => Scalar::Bool(self.chance(50)),
        }
    }

    fn data(&mut self, dtype: DType, n: usize) -> TensorData {
        let mut d = TensorData::zeros(dtype, n);
        for i in 0..n {
            d.set(i, self.scalar(dtype));
        }
        d
    }

    fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            p.swap(i, self.below(i + 1));
        }
        p
    }
}

pub fn build(seed: &GraphSeed) -> Graph {
    let mut g = Graph::new(seed.name.clone());
    for (dtype, shape, name) in &seed.inputs {
        let dtype = [DType::F32, DType::F32, DType::F32, DType::F32, DType::F32, DType::I64, DType::I32, DType::Bool]
            [*dtype as usize % 8];
        g.add_input(TensorType::new(dtype, shape.clone()), name.clone());
    }
    for step in &seed.steps {
        let nodes_before = g.nodes.len();
        let mut p = Picks { seed: step, next: 0, next_float: 0 };
        apply_step(&mut g, &mut p);
        if g.nodes.len() > nodes_before {
            decorate_last_node(&mut g, &mut p);
        }
    }
    if g.values.is_empty() {
        g.add_constant("empty-graph filler", Tensor::f32([], vec![1.5]));
    }
    for &o in &seed.outputs {
        g.outputs.push(ValueId(o % g.values.len() as u32));
    }
    g
}

fn constant(g: &mut Graph, p: &mut Picks, dtype: DType, shape: Vec<usize>) -> ValueId {
    let n = shape.iter().product();
    let data = if p.chance(25) { TensorData::splat(p.scalar(dtype), n) } else { p.data(dtype, n) };
    let name = p.seed.name.clone();
    g.add_constant(name, Tensor::new(shape, data))
}

/// A value whose type passes `ok`, searching from a random start; None if none does.
fn find(g: &Graph, p: &mut Picks, ok: impl Fn(&TensorType) -> bool) -> Option<ValueId> {
    let n = g.values.len();
    if n == 0 {
        return None;
    }
    let start = p.below(n);
    (0..n).map(|i| ValueId(((start + i) % n) as u32)).find(|&v| ok(g.ty(v)))
}

/// An f32 activation of rank 3..=5 for convolution-like ops, made if none exists.
fn activation(g: &mut Graph, p: &mut Picks) -> ValueId {
    if let Some(v) = find(g, p, |t| t.dtype == DType::F32 && (3..=5).contains(&t.rank()) && t.numel() > 0)
        && p.chance(70)
    {
        return v;
    }
    let spatial = p.range(1, 3);
    let mut shape = vec![p.range(1, 2), p.range(1, 4)];
    shape.extend((0..spatial).map(|_| p.range(2, 5)));
    constant(g, p, DType::F32, shape)
}

fn any_value(g: &mut Graph, p: &mut Picks) -> ValueId {
    if !g.values.is_empty() && p.chance(80) {
        return ValueId(p.below(g.values.len()) as u32);
    }
    let dtype = p.dtype();
    let shape = p.shape(4);
    constant(g, p, dtype, shape)
}

fn unary_for(p: &mut Picks, dtype: DType) -> UnaryFn {
    use UnaryFn::*;
    match dtype {
        DType::Bool => Not,
        DType::I64 | DType::I32 => [Neg, Abs, Relu, Clip { min: -3.0, max: 7.0 }][p.below(4)],
        DType::F32 => {
            let (a, b) = (p.float(), p.float());
            let all = [
                Neg, Abs, Sqrt, Exp, Log, Reciprocal, Floor, Ceil, Relu, Sigmoid, Tanh, Erf, Softplus, Softsign, Mish,
                HardSwish, GeluErf, GeluTanh,
                LeakyRelu { alpha: a },
                Elu { alpha: a },
                Selu { alpha: a, gamma: b },
                Celu { alpha: a },
                HardSigmoid { alpha: a, beta: b },
                Swish { alpha: a },
                Clip { min: a, max: b },
                Affine { scale: a, shift: b },
                PowConst { exponent: a },
            ];
            all[p.below(all.len())]
        }
    }
}

fn binary_for(p: &mut Picks, dtype: DType, keep_dtype: bool) -> BinaryFn {
    use BinaryFn::*;
    let list: &[BinaryFn] = match (dtype, keep_dtype) {
        (DType::Bool, _) => &[And, Or, Xor, Equal],
        (_, true) => &[Add, Sub, Mul, Div, Pow, Max, Min, PRelu],
        (_, false) => &[Add, Sub, Mul, Div, Pow, Max, Min, PRelu, Less, LessOrEqual, Greater, GreaterOrEqual, Equal],
    };
    list[p.below(list.len())]
}

fn broadcasts_to(from: &[usize], to: &[usize]) -> bool {
    broadcast_shapes(from, to).as_deref() == Some(to)
}

/// One builder step; a step whose random choices do not type-check adds nothing
/// but the constants it made (which are valid on their own).
fn apply_step(g: &mut Graph, p: &mut Picks) {
    let name = p.seed.name.clone();
    let _ = match p.seed.kind {
        0 | 1 => {
            let dtype = p.dtype();
            let shape = p.shape(4);
            constant(g, p, dtype, shape);
            Ok(())
        }
        2 | 3 => {
            let x = any_value(g, p);
            let f = unary_for(p, g.ty(x).dtype);
            g.push(name, Op::Unary(f), &[x]).map(drop)
        }
        4 | 5 => {
            let a = any_value(g, p);
            let ta = g.ty(a).clone();
            let b = find(g, p, |t| t.dtype == ta.dtype && broadcast_shapes(&t.shape, &ta.shape).is_some()).unwrap_or(a);
            let f = binary_for(p, ta.dtype, false);
            g.push(name, Op::Binary(f), &[a, b]).map(drop)
        }
        6 => {
            let x = any_value(g, p);
            let cond = g.push1(format!("{name}.cond"), Op::Binary(BinaryFn::Equal), &[x, x]);
            cond.and_then(|c| g.push(name, Op::Where, &[c, x, x]).map(drop))
        }
        7 => {
            let x = any_value(g, p);
            let to = p.dtype();
            g.push(name, Op::Cast { to }, &[x]).map(drop)
        }
        8 => {
            let a = find(g, p, |t| t.rank() >= 2 && t.dtype != DType::Bool);
            let a = a.unwrap_or_else(|| {
                let shape = vec![p.range(1, 3), p.range(1, 3)];
                constant(g, p, DType::F32, shape)
            });
            let ta = g.ty(a).clone();
            let shape = vec![ta.shape[ta.rank() - 1], p.range(1, 3)];
            let b = constant(g, p, ta.dtype, shape);
            g.push(name, Op::MatMul, &[a, b]).map(drop)
        }
        9 | 10 => conv(g, p, name),
        11 => conv_transpose(g, p, name),
        12 | 13 => pool(g, p, name),
        14 => {
            let x = any_value(g, p);
            let rank = g.ty(x).rank();
            let axes: Vec<usize> = (0..rank).filter(|_| p.chance(50)).collect();
            let kind = [ReduceKind::Sum, ReduceKind::Mean, ReduceKind::Max, ReduceKind::Min, ReduceKind::Prod][p.below(5)];
            g.push(name, Op::Reduce { kind, axes }, &[x]).map(drop)
        }
        15 => {
            let x = find(g, p, |t| t.rank() >= 1 && t.shape.iter().all(|&d| d > 0));
            let x = x.unwrap_or_else(|| {
                let shape = vec![p.range(1, 4)];
                constant(g, p, DType::F32, shape)
            });
            let axis = p.below(g.ty(x).rank());
            let kind = if p.chance(50) { ArgKind::Max } else { ArgKind::Min };
            let select_last_index = p.chance(50);
            g.push(name, Op::ArgReduce { kind, axis, select_last_index }, &[x]).map(drop)
        }
        16 => {
            let x = any_value(g, p);
            let t = g.ty(x).clone();
            let shape = match p.below(3) {
                0 => vec![t.numel()],
                1 => vec![1, t.numel()],
                _ => {
                    let mut s = t.shape.clone();
                    s.insert(p.below(s.len() + 1), 1);
                    s
                }
            };
            g.push_typed(name, Op::Reshape, &[x], TensorType::new(t.dtype, shape)).map(drop)
        }
        17 => {
            let x = any_value(g, p);
            let perm = p.permutation(g.ty(x).rank());
            g.push(name, Op::Transpose { perm }, &[x]).map(drop)
        }
        18 => slice(g, p, name),
        19 => {
            let x = any_value(g, p);
            let t = g.ty(x).clone();
            let begins: Vec<i64> = (0..t.rank()).map(|_| p.below(4) as i64 - 1).collect();
            let ends: Vec<i64> = (0..t.rank()).map(|_| p.below(4) as i64 - 1).collect();
            let mode = match p.below(4) {
                0 => PadMode::Constant(p.scalar(t.dtype)),
                1 => PadMode::Reflect,
                2 => PadMode::Edge,
                _ => PadMode::Wrap,
            };
            g.push(name, Op::Pad { begins, ends, mode }, &[x]).map(drop)
        }
        20 => {
            let x = find(g, p, |t| t.rank() >= 1).unwrap_or_else(|| constant(g, p, DType::F32, vec![2, 2]));
            let t = g.ty(x).clone();
            let axis = p.below(t.rank());
            let fits = |u: &TensorType| {
                u.dtype == t.dtype && u.rank() == t.rank() && (0..t.rank()).all(|i| i == axis || u.shape[i] == t.shape[i])
            };
            let y = find(g, p, fits).unwrap_or(x);
            let z = find(g, p, fits).unwrap_or(x);
            g.push(name, Op::Concat { axis }, &[x, y, z][..p.range(1, 3)]).map(drop)
        }
        21 => {
            let x = any_value(g, p);
            let t = g.ty(x).clone();
            let mut shape: Vec<usize> = t.shape.iter().map(|&d| if d == 1 { p.range(1, 3) } else { d }).collect();
            if p.chance(50) {
                shape.insert(0, p.range(1, 2));
            }
            g.push_typed(name, Op::Broadcast, &[x], TensorType::new(t.dtype, shape)).map(drop)
        }
        22 => gather(g, p, name),
        _ => {
            let x = find(g, p, |t| t.dtype == DType::F32 && t.rank() >= 1 && t.shape.iter().all(|&d| d > 0));
            let x = x.unwrap_or_else(|| {
                let shape = vec![p.range(1, 4)];
                constant(g, p, DType::F32, shape)
            });
            let t = g.ty(x).clone();
            let axis = p.below(t.rank());
            let len = p.range(1, 5);
            let lo: Vec<usize> = (0..len).map(|_| p.below(t.shape[axis])).collect();
            let hi: Vec<usize> = (0..len).map(|_| p.below(t.shape[axis])).collect();
            let weight_hi: Vec<f32> = (0..len).map(|_| p.float()).collect();
            g.push(name, Op::Resample { axis, lo, hi, weight_hi }, &[x]).map(drop)
        }
    };
}

fn conv(g: &mut Graph, p: &mut Picks, name: String) -> Result<(), String> {
    let x = activation(g, p);
    let t = g.ty(x).clone();
    let channels = t.shape[1];
    let divisors: Vec<usize> = (1..=channels).filter(|&d| channels.is_multiple_of(d)).collect();
    let groups = divisors[p.below(divisors.len())];
    let m = groups * p.range(1, 2);
    let k = t.rank() - 2;
    let kernel: Vec<usize> = (0..k).map(|i| p.range(1, t.shape[2 + i].min(3))).collect();
    let mut wshape = vec![m, channels / groups];
    wshape.extend(&kernel);
    let w = constant(g, p, DType::F32, wshape);
    let geometry = ConvGeometry {
        strides: (0..k).map(|_| p.range(1, 2)).collect(),
        dilations: (0..k).map(|_| if p.chance(80) { 1 } else { 2 }).collect(),
        pads_begin: (0..k).map(|_| p.below(2)).collect(),
        pads_end: (0..k).map(|_| p.below(2)).collect(),
        groups,
    };
    let mut inputs = vec![x, w];
    if p.chance(50) {
        inputs.push(constant(g, p, DType::F32, vec![m]));
    }
    g.push(name, Op::Conv(geometry), &inputs).map(drop)
}

fn conv_transpose(g: &mut Graph, p: &mut Picks, name: String) -> Result<(), String> {
    let x = activation(g, p);
    let t = g.ty(x).clone();
    let channels = t.shape[1];
    let divisors: Vec<usize> = (1..=channels).filter(|&d| channels.is_multiple_of(d)).collect();
    let groups = divisors[p.below(divisors.len())];
    let m = groups * p.range(1, 2);
    let k = t.rank() - 2;
    let kernel: Vec<usize> = (0..k).map(|_| p.range(1, 3)).collect();
    let mut wshape = vec![channels, m / groups];
    wshape.extend(&kernel);
    let w = constant(g, p, DType::F32, wshape);
    let geometry = ConvGeometry {
        strides: (0..k).map(|_| p.range(1, 2)).collect(),
        dilations: (0..k).map(|_| p.range(1, 2)).collect(),
        pads_begin: vec![0; k],
        pads_end: vec![0; k],
        groups,
    };
    let mut out = vec![t.shape[0], m];
    out.extend((0..k).map(|i| (t.shape[2 + i] - 1) * geometry.strides[i] + geometry.dilations[i] * (kernel[i] - 1) + 1));
    let mut inputs = vec![x, w];
    if p.chance(50) {
        inputs.push(constant(g, p, DType::F32, vec![m]));
    }
    g.push_typed(name, Op::ConvTranspose(geometry), &inputs, TensorType::f32(out)).map(drop)
}

fn pool(g: &mut Graph, p: &mut Picks, name: String) -> Result<(), String> {
    let x = activation(g, p);
    let t = g.ty(x).clone();
    let k = t.rank() - 2;
    let kernel: Vec<usize> = (0..k).map(|i| p.range(1, t.shape[2 + i].min(3))).collect();
    let strides: Vec<usize> = (0..k).map(|_| p.range(1, 2)).collect();
    let pads_begin: Vec<usize> = (0..k).map(|i| p.below(kernel[i])).collect();
    let pads_end: Vec<usize> = (0..k).map(|i| p.below(kernel[i])).collect();
    let mut out = t.shape[..2].to_vec();
    for i in 0..k {
        out.push((t.shape[2 + i] + pads_begin[i] + pads_end[i] - kernel[i]) / strides[i] + 1);
    }
    let kind = if p.chance(50) { PoolKind::Max } else { PoolKind::Avg { count_include_pad: p.chance(50) } };
    let attrs = PoolAttrs { kind, kernel, strides, dilations: vec![1; k], pads_begin, pads_end };
    g.push_typed(name, Op::Pool(attrs), &[x], TensorType::f32(out)).map(drop)
}

fn slice(g: &mut Graph, p: &mut Picks, name: String) -> Result<(), String> {
    let x = find(g, p, |t| t.shape.iter().all(|&d| d > 0)).unwrap_or_else(|| constant(g, p, DType::F32, vec![3, 2]));
    let t = g.ty(x).clone();
    let (mut starts, mut steps, mut out) = (vec![], vec![], vec![]);
    for &dim in &t.shape {
        let start = p.below(dim);
        let step = [1i64, 2, -1, -2][p.below(4)];
        let max_count = if step > 0 {
            (dim - start).div_ceil(step as usize)
        } else {
            start / step.unsigned_abs() as usize + 1
        };
        starts.push(start);
        steps.push(step);
        out.push(p.range(1, max_count));
    }
    g.push_typed(name, Op::Slice { starts, steps }, &[x], TensorType::new(t.dtype, out)).map(drop)
}

fn gather(g: &mut Graph, p: &mut Picks, name: String) -> Result<(), String> {
    let data = find(g, p, |t| t.rank() >= 1 && t.shape.iter().all(|&d| d > 0));
    let data = data.unwrap_or_else(|| constant(g, p, DType::F32, vec![3, 2]));
    let t = g.ty(data).clone();
    let axis = p.below(t.rank());
    let dim = t.shape[axis] as i64;
    let index_dtype = if p.chance(50) { DType::I64 } else { DType::I32 };
    let elements = p.chance(50);
    let shape: Vec<usize> = if elements {
        t.shape.iter().map(|&d| p.range(1, d)).collect()
    } else {
        p.shape(2)
    };
    let n: usize = shape.iter().product();
    let lowest = if elements { 0 } else { -dim };
    let mut indices = TensorData::zeros(index_dtype, n);
    for i in 0..n {
        let v = lowest + p.below((dim - lowest) as usize) as i64;
        indices.set(i, Scalar::I64(v).cast(index_dtype));
    }
    let idx = g.add_constant(format!("{name}.indices"), Tensor::new(shape, indices));
    let op = if elements { Op::GatherElements { axis } } else { Op::Gather { axis } };
    g.push(name, op, &[data, idx]).map(drop)
}

/// Gives the node just added an output name, an epilogue and a schedule, as the
/// seed says.
fn decorate_last_node(g: &mut Graph, p: &mut Picks) {
    let index = g.nodes.len() - 1;
    if let Some(name) = &p.seed.value_name {
        let out = g.nodes[index].outputs[0];
        g.values[out.index()].name = name.clone();
    }
    if let Some((layout_in, layout_out, vector_width, tiles, kernel)) = &p.seed.schedule {
        // Blocked layouts must agree with the operands' and fit the value (the verifier's
        // layout rules), which random graphs do not arrange: only a layout-free value
        // ([N, C, 1, 1] with C a multiple of the block) gets one, in and out alike.
        let out_ty = g.ty(g.nodes[index].outputs[0]);
        let blockable = cnnc_ir::verify::is_layout_free(out_ty)
            && out_ty.dtype == DType::F32
            && out_ty.shape[1] % 8 == 0
            && g.nodes[index].inputs.iter().all(|&v| cnnc_ir::verify::is_layout_free(g.ty(v)));
        let layout = |l: u8| if l == 0 || !blockable { Layout::Plain } else { Layout::Blocked { block: 8 } };
        let _ = layout_out;
        g.nodes[index].schedule = Schedule {
            layout_in: layout(*layout_in),
            layout_out: layout(*layout_in),
            vector_width: *vector_width,
            tiles: tiles.clone(),
            kernel: kernel.clone(),
        };
    }
    if matches!(g.nodes[index].op, Op::Constant(_)) {
        return;
    }
    let out_ty = g.ty(g.nodes[index].outputs[0]).clone();
    let min_inputs = g.nodes[index].inputs.len().min(match g.nodes[index].op {
        Op::Where => 3,
        Op::Binary(_) | Op::MatMul | Op::Conv(_) | Op::ConvTranspose(_) | Op::Gather { .. } | Op::GatherElements { .. } => 2,
        _ => 1,
    });
    let first_out = g.nodes[index].outputs[0];
    for &(kind, pick) in &p.seed.epilogue.clone() {
        let step = if kind % 2 == 0 {
            EpilogueStep::Unary(unary_for(p, out_ty.dtype))
        } else {
            // A binary step reads one of the op's required inputs or an extra, earlier value.
            let fits = |t: &TensorType| t.dtype == out_ty.dtype && broadcasts_to(&t.shape, &out_ty.shape);
            let own = (0..min_inputs).find(|&i| fits(g.ty(g.nodes[index].inputs[i])));
            let operand = match own {
                Some(i) if pick % 2 == 0 => i,
                _ => {
                    let earlier = (0..first_out.0).map(ValueId).filter(|&v| fits(g.ty(v))).collect::<Vec<_>>();
                    if earlier.is_empty() {
                        continue;
                    }
                    g.nodes[index].inputs.push(earlier[pick as usize % earlier.len()]);
                    g.nodes[index].inputs.len() - 1
                }
            };
            EpilogueStep::Binary { func: binary_for(p, out_ty.dtype, true), operand }
        };
        g.nodes[index].epilogue.push(step);
    }
}
