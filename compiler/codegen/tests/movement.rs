//! Reshape, Transpose, Slice, Pad, Concat, Broadcast, Gather, GatherElements and
//! Resample against the interpreter, over every dtype and random geometry.

mod common;

use cnnc_ir::{DType, Graph, Op, PadMode, Scalar, Tensor, TensorData, TensorType};
use common::{Rng, check_graph, random_tensor};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: common::cases(64),
        ..ProptestConfig::default()
    }
}

fn dtype_strategy() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.to_vec())
}

fn shape_strategy(min_rank: usize, max_rank: usize, max_dim: usize) -> impl Strategy<Value = Vec<usize>> {
    // Mostly non-empty tensors; now and then one axis of extent 0.
    (
        prop::collection::vec(1usize..=max_dim, min_rank..=max_rank),
        prop::bool::weighted(0.08),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(mut s, empty, at)| {
            if empty && !s.is_empty() {
                let i = at.index(s.len());
                s[i] = 0;
            }
            s
        })
}

fn single(op: Op, x: &Tensor, declared: Option<TensorType>) -> Result<Graph, String> {
    let mut g = Graph::new("movement");
    let v = g.add_input(x.ty(), "x");
    let y = match declared {
        Some(t) => g.push_typed("op", op, &[v], t)?,
        None => g.push1("op", op, &[v])?,
    };
    g.outputs.push(y);
    Ok(g)
}

fn run_single(op: Op, x: Tensor, declared: Option<TensorType>) -> Result<(), TestCaseError> {
    let g = single(op.clone(), &x, declared).map_err(TestCaseError::reject)?;
    check_graph(&g, &[x]).map_err(|e| TestCaseError::fail(format!("{op:?}: {e}")))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn reshape_copies(shape in shape_strategy(0, 4, 6), dtype in dtype_strategy(), seed in 1u64..u64::MAX) {
        let mut rng = Rng(seed);
        let x = random_tensor(&mut rng, dtype, &shape, -9.0, 9.0);
        let n: usize = shape.iter().product();
        let target = TensorType::new(dtype, if n == 0 { vec![0, 3] } else { vec![n] });
        run_single(Op::Reshape, x, Some(target))?;
    }

    #[test]
    fn transpose_any_permutation(shape in shape_strategy(1, 5, 5), dtype in dtype_strategy(), seed in 1u64..u64::MAX) {
        let mut rng = Rng(seed);
        let x = random_tensor(&mut rng, dtype, &shape, -9.0, 9.0);
        let mut perm: Vec<usize> = (0..shape.len()).collect();
        for i in (1..perm.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            perm.swap(i, j);
        }
        run_single(Op::Transpose { perm }, x, None)?;
    }

    #[test]
    fn slice_with_steps(shape in shape_strategy(1, 4, 9), dtype in dtype_strategy(), seed in 1u64..u64::MAX) {
        let mut rng = Rng(seed);
        let x = random_tensor(&mut rng, dtype, &shape, -9.0, 9.0);
        let mut starts = Vec::new();
        let mut steps = Vec::new();
        let mut out = Vec::new();
        for &d in &shape {
            if d == 0 {
                starts.push(0);
                steps.push(1);
                out.push(0);
                continue;
            }
            let start = rng.below(d as u64) as usize;
            let step = match rng.below(5) { 0 => -1i64, 1 => -2, 2 => 2, 3 => 3, _ => 1 };
            let room = if step > 0 { (d - 1 - start) as i64 / step } else { start as i64 / -step };
            starts.push(start);
            steps.push(step);
            out.push(rng.below(room as u64 + 1) as usize + 1);
        }
        run_single(Op::Slice { starts, steps }, x, Some(TensorType::new(dtype, out)))?;
    }

    /// Transposes whose source-dense axis is long enough to be split into cache-line
    /// blocks and moved inwards (extents divisible by 16, 8, 4 or none of them), as the
    /// weight gradients' [T, C, M] -> [M, C, T].
    #[test]
    fn transpose_blocks_the_dense_source_axis(
        taps in 1usize..12,
        middle in 1usize..20,
        dense in prop::sample::select(vec![16usize, 24, 32, 36, 44, 64, 17]),
        perm_pick in 0usize..3,
        seed in 1u64..u64::MAX,
    ) {
        let mut rng = Rng(seed);
        let x = random_tensor(&mut rng, DType::F32, &[taps, middle, dense], -9.0, 9.0);
        let perm = [vec![2, 1, 0], vec![2, 0, 1], vec![1, 2, 0]][perm_pick].clone();
        run_single(Op::Transpose { perm }, x, None)?;
    }

    /// Channels-last copies [N, C, H, W] -> [N, H, W, C] (4x4 register transposes when
    /// C and H·W are multiples of 4, element copies otherwise), and the reverse.
    #[test]
    fn transpose_channels_last_in_quads(
        batch in 1usize..3,
        channels in prop::sample::select(vec![4usize, 8, 12, 16, 20, 5, 3]),
        h in 1usize..7,
        w in prop::sample::select(vec![4usize, 8, 3, 6]),
        back in any::<bool>(),
        seed in 1u64..u64::MAX,
    ) {
        let mut rng = Rng(seed);
        let x = random_tensor(&mut rng, DType::F32, &[batch, channels, h, w], -9.0, 9.0);
        let perm = if back { vec![0, 3, 1, 2] } else { vec![0, 2, 3, 1] };
        run_single(Op::Transpose { perm }, x, None)?;
    }

    /// Step-2 slices with rows long enough for the vector path (groups of 8, a group of
    /// 4 and single elements after them), from every start parity.
    #[test]
    fn slice_every_second_long_rows(rows in 1usize..4, width in 16usize..80, start in 0usize..2, seed in 1u64..u64::MAX, dtype in dtype_strategy()) {
        let mut rng = Rng(seed);
        let x = random_tensor(&mut rng, dtype, &[rows, 3, width], -9.0, 9.0);
        let out_width = (width - start).div_ceil(2);
        let declared = TensorType::new(dtype, vec![rows, 2, out_width]);
        run_single(Op::Slice { starts: vec![0, 1, start], steps: vec![1, 1, 2] }, x, Some(declared))?;
    }

    #[test]
    fn pad_every_mode(shape in shape_strategy(1, 4, 5), dtype in dtype_strategy(), mode_pick in 0usize..4, seed in 1u64..u64::MAX) {
        let mut rng = Rng(seed);
        let x = random_tensor(&mut rng, dtype, &shape, -9.0, 9.0);
        let mode = match mode_pick {
            0 => PadMode::Constant(Scalar::F32(1.5).cast(dtype)),
            1 => PadMode::Reflect,
            2 => PadMode::Edge,
            _ => PadMode::Wrap,
        };
        let mut begins = Vec::new();
        let mut ends = Vec::new();
        for &d in &shape {
            // Crops at most the extent between them; pads up to 2·extent + 2 (reflect and
            // wrap repeat).
            let crop_room = d as i64;
            let b = rng.below(2 * d as u64 + 3) as i64 - (crop_room / 2).min(rng.below(3) as i64);
            let e = rng.below(2 * d as u64 + 3) as i64 - (crop_room / 2).min(rng.below(3) as i64);
            let empty_axis = d == 0 || (d as i64 + b.min(0) + e.min(0)) <= 0;
            if empty_axis && mode_pick != 0 {
                begins.push(0);
                ends.push(0);
            } else {
                begins.push(b);
                ends.push(e);
            }
        }
        run_single(Op::Pad { begins, ends, mode }, x, None)?;
    }

    #[test]
    fn concat_many(shape in shape_strategy(1, 4, 4), dtype in dtype_strategy(), parts in 1usize..6, seed in 1u64..u64::MAX) {
        let mut rng = Rng(seed);
        let axis = rng.below(shape.len() as u64) as usize;
        let mut g = Graph::new("concat");
        let mut inputs = Vec::new();
        let mut vals = Vec::new();
        for i in 0..parts {
            let mut s = shape.clone();
            s[axis] = rng.below(4) as usize;
            let t = random_tensor(&mut rng, dtype, &s, -9.0, 9.0);
            vals.push(g.add_input(t.ty(), format!("x{i}")));
            inputs.push(t);
        }
        let y = g.push1("concat", Op::Concat { axis }, &vals).unwrap();
        g.outputs.push(y);
        check_graph(&g, &inputs).map_err(TestCaseError::fail)?;
    }

    /// Two f32 pieces with one element each along the innermost axis: the interleaving
    /// fast path (strided convolutions' input-gradient phases), vector body and scalar tail.
    #[test]
    fn concat_interleaves_pairs(outer in prop::collection::vec(1usize..=9, 1..=4), seed in 1u64..u64::MAX) {
        let mut rng = Rng(seed);
        let mut shape = outer.clone();
        shape.push(1);
        let mut g = Graph::new("interleave");
        let mut inputs = Vec::new();
        let mut vals = Vec::new();
        for i in 0..2 {
            let t = random_tensor(&mut rng, DType::F32, &shape, -9.0, 9.0);
            vals.push(g.add_input(t.ty(), format!("x{i}")));
            inputs.push(t);
        }
        let y = g.push1("concat", Op::Concat { axis: shape.len() - 1 }, &vals).unwrap();
        g.outputs.push(y);
        check_graph(&g, &inputs).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn broadcast_to_bigger(shape in shape_strategy(0, 4, 4), dtype in dtype_strategy(), lead in 0usize..3, seed in 1u64..u64::MAX) {
        let mut rng = Rng(seed);
        let x_shape: Vec<usize> = shape.iter().map(|&d| if rng.below(2) == 0 { 1 } else { d }).collect();
        let x = random_tensor(&mut rng, dtype, &x_shape, -9.0, 9.0);
        let mut out: Vec<usize> = (0..lead).map(|_| rng.below(3) as usize + 1).collect();
        out.extend(&shape);
        run_single(Op::Broadcast, x, Some(TensorType::new(dtype, out)))?;
    }

    #[test]
    fn gather_with_negative_indices(shape in shape_strategy(1, 4, 5), dtype in dtype_strategy(), idx_shape in shape_strategy(0, 2, 4), wide in any::<bool>(), seed in 1u64..u64::MAX) {
        let mut rng = Rng(seed);
        let axis = rng.below(shape.len() as u64) as usize;
        let extent = shape[axis];
        prop_assume!(extent > 0 || idx_shape.iter().product::<usize>() == 0);
        let data = random_tensor(&mut rng, dtype, &shape, -9.0, 9.0);
        let n: usize = idx_shape.iter().product();
        let raw: Vec<i64> = (0..n).map(|_| rng.below(2 * extent as u64) as i64 - extent as i64).collect();
        let indices = if wide {
            Tensor::new(idx_shape.clone(), TensorData::I64(raw))
        } else {
            Tensor::new(idx_shape.clone(), TensorData::I32(raw.iter().map(|&i| i as i32).collect()))
        };
        let mut g = Graph::new("gather");
        let d = g.add_input(data.ty(), "data");
        let i = g.add_input(indices.ty(), "indices");
        let y = g.push1("gather", Op::Gather { axis }, &[d, i]).unwrap();
        g.outputs.push(y);
        check_graph(&g, &[data, indices]).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn gather_elements_any_axis(shape in shape_strategy(1, 4, 5), dtype in dtype_strategy(), wide in any::<bool>(), seed in 1u64..u64::MAX) {
        let mut rng = Rng(seed);
        let axis = rng.below(shape.len() as u64) as usize;
        let extent = shape[axis];
        // Indices may be smaller than the data off the axis, and any length on it.
        let idx_shape: Vec<usize> = shape
            .iter()
            .enumerate()
            .map(|(d, &s)| if d == axis { rng.below(5) as usize } else { rng.below(s as u64 + 1) as usize })
            .collect();
        let n: usize = idx_shape.iter().product();
        prop_assume!(extent > 0 || n == 0);
        let data = random_tensor(&mut rng, dtype, &shape, -9.0, 9.0);
        let raw: Vec<i64> = (0..n).map(|_| rng.below(2 * extent as u64) as i64 - extent as i64).collect();
        let indices = if wide {
            Tensor::new(idx_shape.clone(), TensorData::I64(raw))
        } else {
            Tensor::new(idx_shape.clone(), TensorData::I32(raw.iter().map(|&i| i as i32).collect()))
        };
        let mut g = Graph::new("gather_elements");
        let d = g.add_input(data.ty(), "data");
        let i = g.add_input(indices.ty(), "indices");
        let y = g.push1("ge", Op::GatherElements { axis }, &[d, i]).unwrap();
        g.outputs.push(y);
        check_graph(&g, &[data, indices]).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn resample_tables(shape in shape_strategy(1, 4, 7), out_extent in 1usize..12, seed in 1u64..u64::MAX) {
        let mut rng = Rng(seed);
        let axis = rng.below(shape.len() as u64) as usize;
        prop_assume!(shape[axis] > 0);
        let extent = shape[axis] as u64;
        let mut lo = Vec::new();
        let mut hi = Vec::new();
        let mut w = Vec::new();
        for _ in 0..out_extent {
            let l = rng.below(extent) as usize;
            lo.push(l);
            hi.push(rng.below(extent) as usize);
            w.push(match rng.below(4) { 0 => 0.0, 1 => 1.0, _ => rng.f32_in(0.0, 1.0) });
        }
        let mut x = random_tensor(&mut rng, DType::F32, &shape, -9.0, 9.0);
        if let TensorData::F32(v) = &mut x.data {
            // An infinity in a tap with weight 0 must not leak into the result.
            if let Some(first) = v.first_mut() { *first = f32::INFINITY; }
        }
        run_single(Op::Resample { axis, lo, hi, weight_hi: w }, x, None)?;
    }
}

/// Out-of-range indices neither crash nor touch memory outside the data: the
/// elements they select become zero (documented in `kernels/gather.rs`).
#[test]
fn out_of_range_indices_give_zeros() {
    let data = Tensor::f32([2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let indices = Tensor::new([3], TensorData::I64(vec![2, 99, -100]));
    let mut g = Graph::new("oob");
    let d = g.add_input(data.ty(), "data");
    let i = g.add_input(indices.ty(), "indices");
    let y = g.push1("gather", Op::Gather { axis: 1 }, &[d, i]).unwrap();
    g.outputs = vec![y];
    let model = cnnc_codegen::JitModel::compile(&g).unwrap();
    let out = model.run(&[data.clone(), indices]).unwrap();
    assert_eq!(out[0].data, TensorData::F32(vec![3.0, 0.0, 0.0, 6.0, 0.0, 0.0]));

    let idx2 = Tensor::new([2, 2], TensorData::I32(vec![0, 7, -1, -9]));
    let mut g = Graph::new("oob2");
    let d = g.add_input(data.ty(), "data");
    let i = g.add_input(idx2.ty(), "indices");
    let y = g.push1("ge", Op::GatherElements { axis: 1 }, &[d, i]).unwrap();
    g.outputs = vec![y];
    let out = cnnc_codegen::JitModel::compile(&g).unwrap().run(&[data, idx2]).unwrap();
    assert_eq!(out[0].data, TensorData::F32(vec![1.0, 0.0, 6.0, 0.0]));
}

/// Splat constants are filled, dense constants are data; outputs that are inputs,
/// constants or repeated outputs are copies.
#[test]
fn constants_and_output_copies() {
    let mut g = Graph::new("consts");
    let x = g.add_input(TensorType::f32([3, 5]), "x");
    let splat = g.add_constant("splat", Tensor::f32([3, 5], vec![0.25; 15]));
    let dense = g.add_constant("dense", Tensor::f32([5], (0..5).map(|i| i as f32).collect()));
    let ints = g.add_constant("ints", Tensor::new([7], TensorData::I64(vec![-3; 7])));
    let bools = g.add_constant("bools", Tensor::new([17], TensorData::Bool(vec![true; 17])));
    let a = g.push1("add", Op::Binary(cnnc_ir::BinaryFn::Add), &[x, splat]).unwrap();
    let b = g.push1("mul", Op::Binary(cnnc_ir::BinaryFn::Mul), &[a, dense]).unwrap();
    g.outputs = vec![b, x, dense, b, splat, ints, bools];
    let input = Tensor::f32([3, 5], (0..15).map(|i| i as f32 * 0.5 - 3.0).collect());
    check_graph(&g, &[input]).unwrap();
}
