//! Naive reference implementations, written straight from the doc comments in
//! `ir/src/op.rs`, independent of the kernels' loop structure.

use cnnc_ir::{ArgKind, ConvGeometry, PoolAttrs, PoolKind, ReduceKind, Tensor, TensorData};

fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        idx[d] = flat % shape[d];
        flat /= shape[d];
    }
    idx
}

fn ravel(idx: &[usize], shape: &[usize]) -> usize {
    idx.iter().zip(shape).fold(0, |acc, (&i, &n)| acc * n + i)
}

fn f32s(t: &Tensor) -> &[f32] {
    t.data.as_f32().expect("f32 tensor")
}

/// Input coordinate of output/tap pair per axis, if inside `[0, extent)`.
fn window_input(
    o: &[usize],
    k: &[usize],
    stride: &[usize],
    dil: &[usize],
    pad: &[usize],
    extent: &[usize],
) -> Option<Vec<usize>> {
    (0..o.len())
        .map(|d| {
            let i = (o[d] * stride[d] + k[d] * dil[d]) as i64 - pad[d] as i64;
            (i >= 0 && i < extent[d] as i64).then_some(i as usize)
        })
        .collect()
}

pub fn conv(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    g: &ConvGeometry,
    out_shape: &[usize],
) -> Tensor {
    let (xs, ws) = (&x.shape, &w.shape);
    let (n, m) = (out_shape[0], out_shape[1]);
    let cg = ws[1];
    let mg = m / g.groups;
    let in_sp = &xs[2..];
    let k_sp = &ws[2..];
    let out_sp = &out_shape[2..];
    let out_plane: usize = out_sp.iter().product();
    let k_size: usize = k_sp.iter().product();
    let mut out = vec![0f32; n * m * out_plane];
    for b in 0..n {
        for oc in 0..m {
            let group = oc / mg;
            for op in 0..out_plane {
                let o = unravel(op, out_sp);
                let mut sum = bias.map_or(0.0, |t| f32s(t)[oc]);
                for c in 0..cg {
                    let ic = group * cg + c;
                    for kf in 0..k_size {
                        let kk = unravel(kf, k_sp);
                        if let Some(i) =
                            window_input(&o, &kk, &g.strides, &g.dilations, &g.pads_begin, in_sp)
                        {
                            let mut xi = vec![b, ic];
                            xi.extend(i);
                            let mut wi = vec![oc, c];
                            wi.extend(kk);
                            sum += f32s(x)[ravel(&xi, xs)] * f32s(w)[ravel(&wi, ws)];
                        }
                    }
                }
                out[(b * m + oc) * out_plane + op] = sum;
            }
        }
    }
    Tensor::f32(out_shape.to_vec(), out)
}

pub fn conv_transpose(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    g: &ConvGeometry,
    out_shape: &[usize],
) -> Tensor {
    let (xs, ws) = (&x.shape, &w.shape);
    let (n, c, m) = (xs[0], xs[1], out_shape[1]);
    let cg = c / g.groups;
    let mg = ws[1];
    let in_sp = &xs[2..];
    let k_sp = &ws[2..];
    let out_sp = &out_shape[2..];
    let in_plane: usize = in_sp.iter().product();
    let out_plane: usize = out_sp.iter().product();
    let k_size: usize = k_sp.iter().product();
    let mut out = vec![0f32; n * m * out_plane];
    for b in 0..n {
        for oc in 0..m {
            let v = bias.map_or(0.0, |t| f32s(t)[oc]);
            out[(b * m + oc) * out_plane..(b * m + oc + 1) * out_plane].fill(v);
        }
        for ic in 0..c {
            let group = ic / cg;
            for ip in 0..in_plane {
                let i = unravel(ip, in_sp);
                let xv = f32s(x)[(b * c + ic) * in_plane + ip];
                for j in 0..mg {
                    let oc = group * mg + j;
                    for kf in 0..k_size {
                        let kk = unravel(kf, k_sp);
                        let o: Option<Vec<usize>> = (0..i.len())
                            .map(|d| {
                                let o = (i[d] * g.strides[d] + kk[d] * g.dilations[d]) as i64
                                    - g.pads_begin[d] as i64;
                                (o >= 0 && o < out_sp[d] as i64).then_some(o as usize)
                            })
                            .collect();
                        if let Some(o) = o {
                            out[(b * m + oc) * out_plane + ravel(&o, out_sp)] +=
                                xv * f32s(w)[(ic * mg + j) * k_size + kf];
                        }
                    }
                }
            }
        }
    }
    Tensor::f32(out_shape.to_vec(), out)
}

pub fn pool(x: &Tensor, p: &PoolAttrs, out_shape: &[usize]) -> Tensor {
    let xs = &x.shape;
    let in_sp = &xs[2..];
    let out_sp = &out_shape[2..];
    let planes = xs[0] * xs[1];
    let in_plane: usize = in_sp.iter().product();
    let out_plane: usize = out_sp.iter().product();
    let k_size: usize = p.kernel.iter().product();
    let mut out = vec![0f32; planes * out_plane];
    for plane in 0..planes {
        for op in 0..out_plane {
            let o = unravel(op, out_sp);
            let (mut max, mut sum, mut valid, mut padded) =
                (f32::NEG_INFINITY, 0f32, 0usize, 0usize);
            for kf in 0..k_size {
                let kk = unravel(kf, &p.kernel);
                let inside_padded = (0..o.len()).all(|d| {
                    let i = (o[d] * p.strides[d] + kk[d] * p.dilations[d]) as i64
                        - p.pads_begin[d] as i64;
                    i < (in_sp[d] + p.pads_end[d]) as i64
                });
                padded += inside_padded as usize;
                if let Some(i) =
                    window_input(&o, &kk, &p.strides, &p.dilations, &p.pads_begin, in_sp)
                {
                    let v = f32s(x)[plane * in_plane + ravel(&i, in_sp)];
                    max = if v.is_nan() || max.is_nan() {
                        f32::NAN
                    } else {
                        max.max(v)
                    };
                    sum += v;
                    valid += 1;
                }
            }
            out[plane * out_plane + op] = match p.kind {
                PoolKind::Max => max,
                PoolKind::Avg { count_include_pad } => {
                    sum / (if count_include_pad { padded } else { valid }) as f32
                }
            };
        }
    }
    Tensor::f32(out_shape.to_vec(), out)
}

/// Batch-broadcast matrix product on f64-exact integer or f32 data.
pub fn matmul(a: &Tensor, b: &Tensor) -> Tensor {
    let (ar, br) = (a.shape.len(), b.shape.len());
    let (m, k, n) = (a.shape[ar - 2], a.shape[ar - 1], b.shape[br - 1]);
    let batch =
        cnnc_ir::broadcast_shapes(&a.shape[..ar - 2], &b.shape[..br - 2]).expect("batch broadcast");
    let mut out_shape = batch.clone();
    out_shape.extend([m, n]);
    let batches: usize = batch.iter().product();
    let operand_batch = |shape: &[usize], bi: &[usize]| -> usize {
        let lead = bi.len() - (shape.len() - 2);
        let own = &shape[..shape.len() - 2];
        let idx: Vec<usize> = own
            .iter()
            .enumerate()
            .map(|(d, &e)| if e == 1 { 0 } else { bi[lead + d] })
            .collect();
        ravel(&idx, own)
    };
    let get = |t: &Tensor, i: usize| -> f64 { t.data.get(i).as_f64() };
    let mut out = vec![0f64; batches * m * n];
    for bt in 0..batches {
        let bi = unravel(bt, &batch);
        let (oa, ob) = (
            operand_batch(&a.shape, &bi) * m * k,
            operand_batch(&b.shape, &bi) * k * n,
        );
        for i in 0..m {
            for j in 0..n {
                out[(bt * m + i) * n + j] = (0..k)
                    .map(|p| get(a, oa + i * k + p) * get(b, ob + p * n + j))
                    .sum();
            }
        }
    }
    let data = match &a.data {
        TensorData::F32(_) => TensorData::F32(out.iter().map(|&v| v as f32).collect()),
        TensorData::I64(_) => TensorData::I64(out.iter().map(|&v| v as i64).collect()),
        TensorData::I32(_) => TensorData::I32(out.iter().map(|&v| v as i32).collect()),
        TensorData::Bool(_) => panic!("bool matmul"),
    };
    Tensor::new(out_shape, data)
}

pub fn reduce(x: &Tensor, kind: ReduceKind, axes: &[usize]) -> Tensor {
    let mut out_shape = x.shape.clone();
    for &a in axes {
        out_shape[a] = 1;
    }
    let out_n: usize = out_shape.iter().product();
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); out_n];
    for i in 0..x.numel() {
        let mut idx = unravel(i, &x.shape);
        for &a in axes {
            idx[a] = 0;
        }
        groups[ravel(&idx, &out_shape)].push(i);
    }
    let data = match &x.data {
        TensorData::F32(v) => TensorData::F32(
            groups
                .iter()
                .map(|g| {
                    let it = g.iter().map(|&i| v[i]);
                    match kind {
                        ReduceKind::Sum => it.sum(),
                        ReduceKind::Mean => it.sum::<f32>() / g.len() as f32,
                        ReduceKind::Max => it.fold(f32::NEG_INFINITY, |a, b| {
                            if a.is_nan() || b.is_nan() {
                                f32::NAN
                            } else {
                                a.max(b)
                            }
                        }),
                        ReduceKind::Min => it.fold(f32::INFINITY, |a, b| {
                            if a.is_nan() || b.is_nan() {
                                f32::NAN
                            } else {
                                a.min(b)
                            }
                        }),
                        ReduceKind::Prod => it.product(),
                    }
                })
                .collect(),
        ),
        TensorData::I64(v) => TensorData::I64(
            groups
                .iter()
                .map(|g| reduce_int(g.iter().map(|&i| v[i]), kind, g.len(), (i64::MIN, i64::MAX)))
                .collect(),
        ),
        TensorData::I32(v) => TensorData::I32(
            groups
                .iter()
                .map(|g| {
                    reduce_int(
                        g.iter().map(|&i| v[i] as i64),
                        kind,
                        g.len(),
                        (i32::MIN as i64, i32::MAX as i64),
                    ) as i32
                })
                .collect(),
        ),
        TensorData::Bool(_) => panic!("bool reduce"),
    };
    Tensor::new(out_shape, data)
}

fn reduce_int(
    it: impl Iterator<Item = i64>,
    kind: ReduceKind,
    n: usize,
    (lowest, highest): (i64, i64),
) -> i64 {
    match kind {
        ReduceKind::Sum => it.fold(0i64, i64::wrapping_add),
        ReduceKind::Mean if n == 0 => 0,
        ReduceKind::Mean => it.fold(0i64, i64::wrapping_add) / n as i64,
        ReduceKind::Max => it.max().unwrap_or(lowest),
        ReduceKind::Min => it.min().unwrap_or(highest),
        ReduceKind::Prod => it.fold(1i64, i64::wrapping_mul),
    }
}

pub fn arg_reduce(x: &Tensor, kind: ArgKind, axis: usize, select_last_index: bool) -> Tensor {
    let mut out_shape = x.shape.clone();
    out_shape[axis] = 1;
    let outer: usize = x.shape[..axis].iter().product();
    let inner: usize = x.shape[axis + 1..].iter().product();
    let len = x.shape[axis];
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let value = |j: usize| x.data.get((o * len + j) * inner + i).as_f64();
            let mut best = 0;
            for j in 1..len {
                let (v, bv) = (value(j), value(best));
                // NaN beats every number, and an earlier NaN only with select_last_index.
                let better = if v.is_nan() || bv.is_nan() {
                    v.is_nan() && (!bv.is_nan() || select_last_index)
                } else {
                    match kind {
                        ArgKind::Max => v > bv || (select_last_index && v == bv),
                        ArgKind::Min => v < bv || (select_last_index && v == bv),
                    }
                };
                if better {
                    best = j;
                }
            }
            out.push(best as i64);
        }
    }
    Tensor::new(out_shape, TensorData::I64(out))
}
