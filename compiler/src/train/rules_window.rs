//! Gradient rules of windowed ops: convolution and pooling, expressed with convolutions.

use cnnc_ir::{
    BinaryFn, ConvGeometry, Node, Op, PadMode, PoolAttrs, PoolKind, Scalar, Tensor, TensorType, ValueId,
};

use super::autodiff::Builder;

type Grads = Result<Vec<Option<ValueId>>, String>;

/// Conv (x [N, C, *in], w [M, C/G, *k], bias [M]?) -> y [N, M, *out]:
/// - dx is the transposed convolution of dy with the same weights and geometry (the
///   weight layout [M, C/G, *k] is exactly ConvTranspose's [in, out/G, *k]);
/// - dw[m, c, k] = Σ_{n, o} dy[n, m, o]·x[n, c, o·s − p + k·d] is a convolution of x with
///   dy in which batch and channels trade places: x as [C/G, G·N, *in], dy as the weight
///   [M, N, *out] with G groups, stride and dilation swapped; it yields [C/G, M, *k'] with
///   k' >= k (taps past the last window are cut off);
/// - dbias sums dy over every axis but 1.
pub fn grad_conv(b: &mut Builder, geometry: &ConvGeometry, node: &Node, gy: ValueId, needs: &[bool]) -> Grads {
    let (x, w) = (node.inputs[0], node.inputs[1]);
    let (x_shape, w_shape, y_shape) = (b.shape(x), b.shape(w), b.shape(gy));
    let mut grads = vec![None; node.inputs.len()];
    if needs[0] {
        let fast = match unit_stride_input_gradient(b, geometry, gy, w, &w_shape)? {
            Some(dx) => Some(dx),
            None => strided_input_gradient(b, geometry, gy, w, &w_shape, &x_shape)?,
        };
        grads[0] = Some(match fast {
            Some(dx) => dx,
            None => {
                let ty = b.g.ty(x).clone();
                b.push_typed(Op::ConvTranspose(geometry.clone()), &[gy, w], ty)?
            }
        });
    }
    if needs[1] {
        let fast = match super::rules_pool::direct_weight_gradient(b, geometry, x, gy, &w_shape)? {
            Some(dw) => Some(dw),
            None => match pointwise_weight_gradient(b, geometry, x, gy, &x_shape, &w_shape, &y_shape)? {
                Some(dw) => Some(dw),
                None => match channels_last_weight_gradient(b, geometry, x, gy, &x_shape, &w_shape, &y_shape)? {
                    Some(dw) => Some(dw),
                    None => match few_channel_weight_gradient(b, geometry, x, gy, &x_shape, &w_shape, &y_shape)? {
                        Some(dw) => Some(dw),
                        None => tap_weight_gradient(b, geometry, x, gy, &x_shape, &w_shape, &y_shape)?,
                    },
                },
            },
        };
        grads[1] = Some(match fast {
            Some(dw) => dw,
            None => conv_weight_gradient(b, geometry, x, gy, &x_shape, &w_shape, &y_shape)?,
        });
    }
    if needs.get(2).copied().unwrap_or(false) {
        let axes: Vec<usize> = (0..y_shape.len()).filter(|&a| a != 1).collect();
        let summed = b.reduce_sum(gy, axes)?;
        grads[2] = Some(b.reshape(summed, &[y_shape[1]])?);
    }
    Ok(grads)
}

/// `unit_stride_input_gradient` takes ungrouped convolutions with at least this many input
/// channels (the output channels of the gradient convolution).
const MIN_GEMM_GRADIENT_CHANNELS: usize = 16;

/// The input gradient of a stride-1 convolution as a convolution (not a transposed one),
/// so that it runs on the same kernels as the forward pass (GEMM, depthwise): dy correlated
/// with the weights flipped along every spatial axis, input and output channels swapped
/// within each group ([M, C/G, *k] -> [C, M/G, *k]), and pads d·(k − 1) − p, which give
/// back x's extent. None where a pad exceeds d·(k − 1) (the transposed form then applies).
fn unit_stride_input_gradient(
    b: &mut Builder,
    geometry: &ConvGeometry,
    gy: ValueId,
    w: ValueId,
    w_shape: &[usize],
) -> Result<Option<ValueId>, String> {
    if geometry.strides.iter().any(|&s| s != 1) {
        return Ok(None);
    }
    // The convolution form pays off on the depthwise kernel and on GEMM with enough
    // output channels to fill register tiles; LeNet's 6-channel gradient (16 -> 6, 5x5)
    // measured ~1.4x slower on GEMM (im2col of a 400-deep reduction for 6 rows) than as a
    // transposed convolution.
    let depthwise = geometry.groups > 1 && w_shape[1] == 1 && w_shape[0] == geometry.groups;
    if !(depthwise || (geometry.groups == 1 && w_shape[1] >= MIN_GEMM_GRADIENT_CHANNELS)) {
        return Ok(None);
    }
    let spatial = w_shape.len() - 2;
    let reach: Vec<usize> = (0..spatial).map(|a| geometry.dilations[a] * (w_shape[2 + a] - 1)).collect();
    let flipped_pad = |pads: &[usize]| -> Option<Vec<usize>> { (0..spatial).map(|a| reach[a].checked_sub(pads[a])).collect() };
    let (Some(pads_begin), Some(pads_end)) = (flipped_pad(&geometry.pads_begin), flipped_pad(&geometry.pads_end)) else {
        return Ok(None);
    };
    let groups = geometry.groups;
    let (outputs, group_in) = (w_shape[0], w_shape[1]);
    if groups == 0 || outputs % groups != 0 {
        return Ok(None);
    }
    let group_out = outputs / groups;
    let tail = |from: usize| (from..from + spatial).collect::<Vec<usize>>();
    // [M, C/G, *k] -> [G, M/G, C/G, *k] -> [G, C/G, M/G, *k] -> [C, M/G, *k]
    let swapped = if group_in == 1 && group_out == 1 {
        w
    } else {
        let mut split = vec![groups, group_out, group_in];
        split.extend(&w_shape[2..]);
        let ws = b.reshape(w, &split)?;
        let mut perm = vec![0, 2, 1];
        perm.extend(tail(3));
        let ws = b.transpose(ws, perm)?;
        let mut merged = vec![groups * group_in, group_out];
        merged.extend(&w_shape[2..]);
        b.reshape(ws, &merged)?
    };
    let flipped = if w_shape[2..].iter().all(|&k| k == 1) {
        swapped
    } else {
        let mut starts = vec![0, 0];
        starts.extend(w_shape[2..].iter().map(|&k| k - 1));
        let mut steps = vec![1, 1];
        steps.extend(std::iter::repeat_n(-1, spatial));
        let ty = b.g.ty(swapped).clone();
        b.push_typed(Op::Slice { starts, steps }, &[swapped], ty)?
    };
    let transposed = ConvGeometry {
        strides: geometry.strides.clone(),
        dilations: geometry.dilations.clone(),
        pads_begin,
        pads_end,
        groups,
    };
    b.push(Op::Conv(transposed), &[gy, flipped]).map(Some)
}

/// One spatial axis of a strided convolution's input gradient split into phases: input
/// positions i = s·q + phase receive dy only through the taps k ≡ (phase + p) mod s.
struct PhaseAxis {
    stride: usize,
    /// ceil(x / s): every phase is computed over this many q, the last ones cut off after
    /// interleaving where s does not divide x.
    count: usize,
    /// Per phase: None where no tap reaches it (kernel smaller than the stride, or pads so
    /// large that the phase's taps only meet padding), else its stride-1 convolution.
    phases: Vec<Option<PhaseTaps>>,
}

#[derive(Clone, Copy)]
struct PhaseTaps {
    /// The sub-kernel's first tap and tap count.
    first: usize,
    taps: usize,
    /// dy's positions [crop_begin, out − crop_end) padded by these.
    crop_begin: usize,
    crop_end: usize,
    pad_begin: usize,
    pad_end: usize,
}

/// The phases of one axis (input extent `x`, gradient extent `out`, kernel `k`, stride `s`,
/// leading pad `p`, dilation 1).
///
/// With j = i + p = s·(q + c) + r (r = (phase + p) mod s, c = (phase + p) div s), the taps
/// k = r + s·t (t < T) meet dy at o = q + c − t, so the phase is
/// dx[q] = Σ_t dy[q + c − t]·w[r + s·t]: a stride-1 correlation of dy with the sub-kernel
/// read backwards from its last tap, leading pad T − 1 − c and trailing pad
/// count − out + c, which give `count` positions. A negative pad crops dy instead.
fn phase_axis(x: usize, out: usize, k: usize, s: usize, p: usize) -> PhaseAxis {
    let count = x.div_ceil(s);
    let phases = (0..s)
        .map(|phase| {
            let (r, c) = ((phase + p) % s, (phase + p) / s);
            if r >= k {
                return None;
            }
            let taps = (k - r).div_ceil(s);
            let lead = taps as i64 - 1 - c as i64;
            let trail = (count + c) as i64 - out as i64;
            let (crop_begin, crop_end) = ((-lead).max(0) as usize, (-trail).max(0) as usize);
            if crop_begin + crop_end >= out {
                return None;
            }
            Some(PhaseTaps { first: r, taps, crop_begin, crop_end, pad_begin: lead.max(0) as usize, pad_end: trail.max(0) as usize })
        })
        .collect();
    PhaseAxis { stride: s, count, phases }
}

/// The input gradient of a strided, ungrouped, undilated convolution as s₁·s₂·… stride-1
/// convolutions (the sub-pixel decomposition), so that it runs on the GEMM kernels: the
/// inputs at positions s·q + phase (per axis) only see the taps congruent to phase + pad
/// modulo s, so each phase is dy correlated with that sub-kernel, flipped, with input and
/// output channels swapped, and no products with the zeros a transposed convolution
/// inserts. Phases no tap reaches (a kernel smaller than its stride, as 1x1 stride 2) are
/// zero. The phases are interleaved by concatenating along unit axes ([N, C, q₁, s₁, q₂,
/// s₂, …] read as [N, C, q₁·s₁, q₂·s₂, …]; leading and trailing zero phases as one Pad)
/// and cut to x's extent. None where the
/// transposed form applies: grouped or dilated convolutions, fewer than
/// `MIN_GEMM_GRADIENT_CHANNELS` input channels.
fn strided_input_gradient(
    b: &mut Builder,
    geometry: &ConvGeometry,
    gy: ValueId,
    w: ValueId,
    w_shape: &[usize],
    x_shape: &[usize],
) -> Result<Option<ValueId>, String> {
    if geometry.groups != 1
        || geometry.dilations.iter().any(|&d| d != 1)
        || geometry.strides.iter().all(|&s| s == 1)
        || w_shape[1] < MIN_GEMM_GRADIENT_CHANNELS
    {
        return Ok(None);
    }
    phase_decomposed_input_gradient(b, geometry, gy, w, w_shape, x_shape)
}

/// `strided_input_gradient` without the profitability checks (groups must be 1 and
/// dilations 1; always Some).
fn phase_decomposed_input_gradient(
    b: &mut Builder,
    geometry: &ConvGeometry,
    gy: ValueId,
    w: ValueId,
    w_shape: &[usize],
    x_shape: &[usize],
) -> Result<Option<ValueId>, String> {
    let y_shape = b.shape(gy);
    let spatial = x_shape.len() - 2;
    let mut axes = Vec::with_capacity(spatial);
    for a in 0..spatial {
        let (x, out, k) = (x_shape[2 + a], y_shape[2 + a], w_shape[2 + a]);
        axes.push(phase_axis(x, out, k, geometry.strides[a], geometry.pads_begin[a]));
    }
    let (batch, channels) = (x_shape[0], x_shape[1]);
    let dtype = b.g.ty(gy).dtype;
    // [M, C, *k] -> [C, M, *k]: the gradient's output channels are the convolution's inputs.
    let mut perm = vec![1, 0];
    perm.extend(2..2 + spatial);
    let swapped = b.transpose(w, perm)?;
    // Only the phases in `kept` (per axis, first to last phase some tap reaches) are
    // computed; the zero phases around them are padding, those inside (a run of taps
    // that wraps around modulo s) zero pieces.
    let kept: Vec<std::ops::Range<usize>> = axes
        .iter()
        .map(|axis| {
            let first = axis.phases.iter().position(Option::is_some).unwrap_or(0);
            let last = axis.phases.iter().rposition(Option::is_some).map_or(first, |l| l + 1);
            first..last
        })
        .collect();
    if kept.iter().any(|r| r.is_empty()) {
        return b.zeros(x_shape).map(Some);
    }
    // Each phase as [N, C, q₁, 1, q₂, 1, …], in row-major phase order.
    let mut unit_shape = vec![batch, channels];
    for axis in &axes {
        unit_shape.extend([axis.count, 1]);
    }
    let kept_counts: Vec<usize> = kept.iter().map(|r| r.len()).collect();
    let kept_strides = cnnc_ir::strides(&kept_counts);
    let total: usize = kept_counts.iter().product();
    let mut pieces = Vec::with_capacity(total);
    for flat in 0..total {
        let taps: Option<Vec<PhaseTaps>> =
            (0..spatial).map(|a| axes[a].phases[kept[a].start + (flat / kept_strides[a]) % kept_counts[a]]).collect();
        let piece = match taps {
            None => b.zeros(&unit_shape)?,
            Some(taps) => {
                let phase = phase_convolution(b, swapped, gy, &taps, &axes)?;
                b.reshape(phase, &unit_shape)?
            }
        };
        pieces.push(piece);
    }
    // Interleave from the last axis outwards: concatenating each run of consecutive pieces
    // that differ in that axis's phase along its unit axis leaves one piece per phase of
    // the axes before it.
    for a in (0..spatial).rev() {
        if kept_counts[a] == 1 {
            continue;
        }
        let unit_axis = 2 + 2 * a + 1;
        let mut merged = Vec::with_capacity(pieces.len() / kept_counts[a]);
        for group in pieces.chunks(kept_counts[a]) {
            merged.push(b.push(Op::Concat { axis: unit_axis }, group)?);
        }
        pieces = merged;
    }
    let [mut interleaved] = pieces[..] else {
        return Err(format!("{} pieces left after interleaving the phases", pieces.len()));
    };
    let mut begins = vec![0i64; unit_shape.len()];
    let mut ends = vec![0i64; unit_shape.len()];
    let mut padded_shape = unit_shape.clone();
    for (a, axis) in axes.iter().enumerate() {
        begins[2 + 2 * a + 1] = kept[a].start as i64;
        ends[2 + 2 * a + 1] = (axis.stride - kept[a].end) as i64;
        padded_shape[2 + 2 * a + 1] = axis.stride;
    }
    if begins.iter().chain(&ends).any(|&p| p != 0) {
        let op = Op::Pad { begins, ends, mode: PadMode::Constant(Scalar::F32(0.0)) };
        interleaved = b.push_typed(op, &[interleaved], TensorType::new(dtype, padded_shape))?;
    }
    let mut extent = vec![batch, channels];
    extent.extend(axes.iter().map(|axis| axis.count * axis.stride));
    let interleaved = b.reshape(interleaved, &extent)?;
    if extent == x_shape {
        return Ok(Some(interleaved));
    }
    let op = Op::Slice { starts: vec![0; x_shape.len()], steps: vec![1; x_shape.len()] };
    b.push_typed(op, &[interleaved], TensorType::new(dtype, x_shape.to_vec())).map(Some)
}

/// One phase of `phase_decomposed_input_gradient`: dy (cropped where a pad would be
/// negative) correlated with the phase's taps of `swapped` ([C, M, *k]), read backwards.
fn phase_convolution(b: &mut Builder, swapped: ValueId, gy: ValueId, taps: &[PhaseTaps], axes: &[PhaseAxis]) -> Result<ValueId, String> {
    let (w_shape, y_shape) = (b.shape(swapped), b.shape(gy));
    let dtype = b.g.ty(gy).dtype;
    let spatial = taps.len();
    let mut starts = vec![0, 0];
    let mut steps = vec![1i64, 1];
    let mut kernel_shape = w_shape[..2].to_vec();
    for (t, axis) in taps.iter().zip(axes) {
        starts.push(t.first + axis.stride * (t.taps - 1));
        steps.push(-(axis.stride as i64));
        kernel_shape.push(t.taps);
    }
    let sub_kernel = if kernel_shape == w_shape && kernel_shape[2..].iter().all(|&k| k == 1) {
        swapped
    } else {
        b.push_typed(Op::Slice { starts, steps }, &[swapped], TensorType::new(dtype, kernel_shape))?
    };
    let dy = if taps.iter().any(|t| t.crop_begin + t.crop_end > 0) {
        let mut starts = vec![0, 0];
        let mut shape = y_shape[..2].to_vec();
        for (a, t) in taps.iter().enumerate() {
            starts.push(t.crop_begin);
            shape.push(y_shape[2 + a] - t.crop_begin - t.crop_end);
        }
        let op = Op::Slice { starts, steps: vec![1; y_shape.len()] };
        b.push_typed(op, &[gy], TensorType::new(dtype, shape))?
    } else {
        gy
    };
    let unit = ConvGeometry {
        strides: vec![1; spatial],
        dilations: vec![1; spatial],
        pads_begin: taps.iter().map(|t| t.pad_begin).collect(),
        pads_end: taps.iter().map(|t| t.pad_end).collect(),
        groups: 1,
    };
    b.push(Op::Conv(unit), &[dy, sub_kernel])
}

/// The weight gradient of an ungrouped 1x1 convolution without padding as one matrix
/// product over the batch and positions, dW[M, C] = Σ_{n,p} dy[n, m, p]·x[n, c, p] (a
/// stride reads every s-th position of x). The operand with fewer channels is transposed
/// element by element to [N·P, channels]; the other only moves whole planes ([N, ch, P]
/// -> [ch, N·P]). None for other geometries (`conv_weight_gradient` applies).
fn pointwise_weight_gradient(
    b: &mut Builder,
    geometry: &ConvGeometry,
    x: ValueId,
    gy: ValueId,
    x_shape: &[usize],
    w_shape: &[usize],
    y_shape: &[usize],
) -> Result<Option<ValueId>, String> {
    let pointwise = geometry.groups == 1
        && w_shape[2..].iter().all(|&k| k == 1)
        && geometry.pads_begin.iter().chain(&geometry.pads_end).all(|&p| p == 0);
    if !pointwise {
        return Ok(None);
    }
    let rank = x_shape.len();
    let (batch, channels, outputs) = (x_shape[0], x_shape[1], y_shape[1]);
    let positions: usize = y_shape[2..].iter().product();
    // The positions of x under the 1x1 windows: every s-th along each axis.
    let x = if geometry.strides.iter().all(|&s| s == 1) {
        x
    } else {
        let mut steps = vec![1i64, 1];
        steps.extend(geometry.strides.iter().map(|&s| s as i64));
        let mut shape = vec![batch, channels];
        shape.extend(&y_shape[2..]);
        let dtype = b.g.ty(x).dtype;
        b.push_typed(Op::Slice { starts: vec![0; rank], steps }, &[x], TensorType::new(dtype, shape))?
    };
    // [N, ch, *out] -> [ch, N, *out], read as [ch, N·P]
    let rows = |b: &mut Builder, v: ValueId| b.transpose(v, channels_first(rank));
    // [N, ch, *out] -> [N, *out, ch], read as [N·P, ch]
    let columns = |b: &mut Builder, v: ValueId| b.transpose(v, channels_last(rank));
    let reduction = batch * positions;
    let dw = if channels <= outputs {
        let (a, bt) = (rows(b, gy)?, columns(b, x)?);
        matrix_product(b, a, bt, outputs, reduction, channels)?
    } else {
        let (a, bt) = (rows(b, x)?, columns(b, gy)?);
        let product = matrix_product(b, a, bt, channels, reduction, outputs)?;
        b.transpose(product, vec![1, 0])?
    };
    b.reshape(dw, w_shape).map(Some)
}

/// The product [rows, depth] x [depth, columns] of `a` and `bt` (any shapes holding those
/// elements in that order), on MatMul. (A 1x1 convolution on the GEMM microkernel measured
/// no faster here: its run-time packing of `a`, up to tens of MB for stacked taps, costs
/// about what the bigger register tile saves.)
fn matrix_product(b: &mut Builder, a: ValueId, bt: ValueId, rows: usize, depth: usize, columns: usize) -> Result<ValueId, String> {
    let a = b.reshape(a, &[rows, depth])?;
    let bt = b.reshape(bt, &[depth, columns])?;
    b.push(Op::MatMul, &[a, bt])
}

/// [N, C, *s] -> [C, N, *s]
fn channels_first(rank: usize) -> Vec<usize> {
    let mut perm = vec![1, 0];
    perm.extend(2..rank);
    perm
}

/// [N, C, *s] -> [N, *s, C]
fn channels_last(rank: usize) -> Vec<usize> {
    let mut perm = vec![0];
    perm.extend(2..rank);
    perm.push(1);
    perm
}

/// `channels_last_weight_gradient` takes convolutions with at least this many input
/// channels (the innermost output axis of its convolution: whole f32x4 quads).
const MIN_CHANNELS_LAST_GRADIENT_CHANNELS: usize = 16;

/// The weight gradient of an ungrouped convolution as one convolution on the GEMM
/// kernels whose output is the kernel itself: x channels-last, read as one image
/// [1, N, *in, C] with N channels, correlated with dy as the weight [M, N, *out, 1]
/// (stride and dilation swapped, C an extra spatial axis with a one-tap kernel), gives
/// [1, M, *k', C] with dw[m, c, k] = Σ_{n, o} dy[n, m, o]·x[n, c, o·s − p + k·d].
///
/// Against the other forms: every (kernel tap, input channel) pair is an output
/// position of one product (not a batch of products with a few positions each, as in
/// `conv_weight_gradient`), and the im2col the GEMM driver packs on the fly reads x in
/// place -- runs of consecutive channels, whole vectors -- where `tap_weight_gradient`
/// materialises the stacked taps (the kernel's taps times x, written and read again).
/// Costs one channels-last copy of x, a plane-moving transpose of dy and a small
/// transpose of the result. None for grouped convolutions and few input channels.
fn channels_last_weight_gradient(
    b: &mut Builder,
    geometry: &ConvGeometry,
    x: ValueId,
    gy: ValueId,
    x_shape: &[usize],
    w_shape: &[usize],
    y_shape: &[usize],
) -> Result<Option<ValueId>, String> {
    let rank = x_shape.len();
    let spatial = rank - 2;
    let (batch, channels, outputs) = (x_shape[0], x_shape[1], y_shape[1]);
    if geometry.groups != 1 || channels < MIN_CHANNELS_LAST_GRADIENT_CHANNELS || spatial == 0 {
        return Ok(None);
    }
    // x [N, C, *in] -> [N, *in, C], read as [1, N, *in, C]
    let x_last = b.transpose(x, channels_last(rank))?;
    let mut image_shape = vec![1, batch];
    image_shape.extend(&x_shape[2..]);
    image_shape.push(channels);
    let image = b.reshape(x_last, &image_shape)?;
    // dy [N, M, *out] -> [M, N, *out], read as [M, N, *out, 1]
    let dy = b.transpose(gy, channels_first(rank))?;
    let mut filter_shape = vec![outputs, batch];
    filter_shape.extend(&y_shape[2..]);
    filter_shape.push(1);
    let filters = b.reshape(dy, &filter_shape)?;
    let extend = |v: &[usize], last: usize| -> Vec<usize> { v.iter().copied().chain([last]).collect() };
    // Trailing padding only as far as the last tap's windows reach: a strided forward
    // pass often leaves its trailing pad unread, and padding past it would compute
    // whole extra taps (4x4 instead of 3x3) only to cut them off.
    let pads_end: Vec<usize> = (0..spatial)
        .map(|a| {
            let (input, out, k) = (x_shape[2 + a] as i64, y_shape[2 + a] as i64, w_shape[2 + a] as i64);
            let (s, d) = (geometry.strides[a] as i64, geometry.dilations[a] as i64);
            let needed = (k - 1) * d + 1 + s * (out - 1) - input - geometry.pads_begin[a] as i64;
            needed.clamp(0, geometry.pads_end[a] as i64) as usize
        })
        .collect();
    let correlation = ConvGeometry {
        strides: extend(&geometry.dilations, 1),
        dilations: extend(&geometry.strides, 1),
        pads_begin: extend(&geometry.pads_begin, 0),
        pads_end: extend(&pads_end, 0),
        groups: 1,
    };
    let full = b.push(Op::Conv(correlation), &[image, filters])?;
    // [1, M, *k', C]: windows past the kernel's last tap (input the forward pass never
    // read with it) are cut off.
    let full_shape = b.shape(full);
    let mut cut_shape = vec![1, outputs];
    cut_shape.extend(&w_shape[2..]);
    cut_shape.push(channels);
    let cut = if full_shape == cut_shape {
        full
    } else {
        let dtype = b.g.ty(full).dtype;
        let op = Op::Slice { starts: vec![0; full_shape.len()], steps: vec![1; full_shape.len()] };
        b.push_typed(op, &[full], TensorType::new(dtype, cut_shape))?
    };
    // [1, M, *k, C] -> [M, T, C] -> [M, C, T] -> [M, C, *k]
    let taps: usize = w_shape[2..].iter().product();
    let rows = b.reshape(cut, &[outputs, taps, channels])?;
    let dw = b.transpose(rows, vec![0, 2, 1])?;
    b.reshape(dw, w_shape).map(Some)
}

/// The weight gradient of an ungrouped, unpadded 2-D convolution with fewer input channels
/// than `channels_last_weight_gradient` takes, as one `ConvWeightGrad` node, where the
/// AVX2 kernel of `microkernel::conv_weight_grad_x86` takes its shape: x is read in place
/// at every tap (a compile-time displacement), dy transposed channels-last one image at a
/// time on the stack. LeNet-5's 6 -> 16 5x5 layer: its matrix form (25 slices of a
/// transposed x, a concat, a [150, 6400] x [6400, 16] product) took ~25% of the step.
/// Padded convolutions (ResNet and MobileNet stems) keep the matrix form.
fn few_channel_weight_gradient(
    b: &mut Builder,
    geometry: &ConvGeometry,
    x: ValueId,
    gy: ValueId,
    x_shape: &[usize],
    w_shape: &[usize],
    y_shape: &[usize],
) -> Result<Option<ValueId>, String> {
    use cnnc_codegen::microkernel::conv_weight_grad_x86::WeightGradSpec;
    let f32_operands = b.g.ty(x).dtype == cnnc_ir::DType::F32 && b.g.ty(gy).dtype == cnnc_ir::DType::F32;
    let padded = geometry.pads_end.iter().any(|&p| p != 0);
    if !f32_operands || padded || x_shape[1] >= MIN_CHANNELS_LAST_GRADIENT_CHANNELS {
        return Ok(None);
    }
    if WeightGradSpec::from_shapes(geometry, x_shape, y_shape, w_shape).is_none() {
        return Ok(None);
    }
    let dw = TensorType::new(cnnc_ir::DType::F32, w_shape.to_vec());
    b.push_typed(Op::ConvWeightGrad(geometry.clone()), &[x, gy], dw).map(Some)
}

/// Above this many bytes of tap-stacked input (kernel taps x the input read at each),
/// `tap_weight_gradient` leaves the weight gradient to the convolution form.
const TAP_STACK_BUDGET: usize = 64 << 20;

/// The weight gradient of an ungrouped convolution as one matrix product over the batch
/// and output positions: with x_t the input under kernel tap t at every output position
/// ([N, C, *out], a strided slice of the zero-padded input),
/// dWᵀ[(t, c), m] = Σ_{n,p} x_t[n, c, p]·dy[n, m, p] = rows [T·C, N·P] x dy as [N·P, M].
/// The rows come from one transpose of the padded input to [C, N, *] and a slice per tap
/// (whole planes move); dy is transposed once to channels-last. None for grouped
/// convolutions or when the stacked taps exceed `TAP_STACK_BUDGET`.
fn tap_weight_gradient(
    b: &mut Builder,
    geometry: &ConvGeometry,
    x: ValueId,
    gy: ValueId,
    x_shape: &[usize],
    w_shape: &[usize],
    y_shape: &[usize],
) -> Result<Option<ValueId>, String> {
    let rank = x_shape.len();
    let spatial = rank - 2;
    let (batch, channels, outputs) = (x_shape[0], x_shape[1], y_shape[1]);
    let out_extent = &y_shape[2..];
    let kernel = &w_shape[2..];
    let positions: usize = out_extent.iter().product();
    let taps: usize = kernel.iter().product();
    if geometry.groups != 1 || taps * channels * batch * positions * 4 > TAP_STACK_BUDGET || positions == 0 {
        return Ok(None);
    }
    // Pad (or crop) x to exactly the extent the windows reach.
    let mut begins = vec![0i64; 2];
    let mut ends = vec![0i64; 2];
    let mut reach_shape = vec![batch, channels];
    for a in 0..spatial {
        let reach = (out_extent[a] - 1) * geometry.strides[a] + (kernel[a] - 1) * geometry.dilations[a] + 1;
        begins.push(geometry.pads_begin[a] as i64);
        ends.push(reach as i64 - geometry.pads_begin[a] as i64 - x_shape[2 + a] as i64);
        reach_shape.push(reach);
    }
    let padded = if begins.iter().chain(&ends).all(|&p| p == 0) {
        x
    } else {
        let dtype = b.g.ty(x).dtype;
        let op = Op::Pad { begins, ends, mode: PadMode::Constant(Scalar::F32(0.0)) };
        b.push_typed(op, &[x], TensorType::new(dtype, reach_shape))?
    };
    let planes = b.transpose(padded, channels_first(rank))?;
    let tap_strides = cnnc_ir::strides(kernel);
    let mut tap_shape = vec![channels, batch];
    tap_shape.extend(out_extent);
    let mut pieces = Vec::with_capacity(taps);
    for t in 0..taps {
        let mut starts = vec![0, 0];
        let mut steps = vec![1i64, 1];
        for a in 0..spatial {
            starts.push(((t / tap_strides[a]) % kernel[a]) * geometry.dilations[a]);
            steps.push(geometry.strides[a] as i64);
        }
        let identity = starts.iter().all(|&s| s == 0) && steps.iter().all(|&s| s == 1) && b.shape(planes) == tap_shape;
        pieces.push(if identity {
            planes
        } else {
            let ty = TensorType::new(b.g.ty(planes).dtype, tap_shape.clone());
            b.push_typed(Op::Slice { starts, steps }, &[planes], ty)?
        });
    }
    let stacked = if pieces.len() == 1 { pieces[0] } else { b.push(Op::Concat { axis: 0 }, &pieces)? };
    let dy = b.transpose(gy, channels_last(rank))?;
    let product = matrix_product(b, stacked, dy, taps * channels, batch * positions, outputs)?;
    // [T·C, M] -> [T, C, M] -> [M, C, T] -> [M, C, *k]
    let product = b.reshape(product, &[taps, channels, outputs])?;
    let product = b.transpose(product, vec![2, 1, 0])?;
    b.reshape(product, w_shape).map(Some)
}

/// Σ over the batch of `x` correlated with `gy` at every kernel tap, as a kernel-shaped
/// [gy channels, x channels / G, *k] tensor: the weight gradient of Conv (x: the input,
/// gy: the output gradient) and, with the roles swapped, of ConvTranspose (x: the output
/// gradient, gy: the input), whose weight layout is the transpose of Conv's.
fn conv_weight_gradient(
    b: &mut Builder,
    geometry: &ConvGeometry,
    x: ValueId,
    gy: ValueId,
    x_shape: &[usize],
    w_shape: &[usize],
    y_shape: &[usize],
) -> Result<ValueId, String> {
    let groups = geometry.groups;
    let (batch, channels, outputs) = (x_shape[0], x_shape[1], y_shape[1]);
    if channels % groups != 0 || outputs % groups != 0 {
        return Err(format!("{channels} and {outputs} channels do not split into {groups} groups"));
    }
    let (group_in, group_out) = (channels / groups, outputs / groups);
    let spatial = x_shape.len() - 2;
    let tail = |from: usize| (from..from + spatial).collect::<Vec<usize>>();

    // x [N, C, *in] -> [N, G, C/G, *in] -> [C/G, G, N, *in] -> [C/G, G·N, *in]
    let mut split = vec![batch, groups, group_in];
    split.extend(&x_shape[2..]);
    let xs = b.reshape(x, &split)?;
    let mut perm = vec![2, 1, 0];
    perm.extend(tail(3));
    let xs = b.transpose(xs, perm)?;
    let mut merged = vec![group_in, groups * batch];
    merged.extend(&x_shape[2..]);
    let xs = b.reshape(xs, &merged)?;

    // dy [N, M, *out] -> [N, G, M/G, *out] -> [G, M/G, N, *out] -> [M, N, *out]
    let mut split = vec![batch, groups, group_out];
    split.extend(&y_shape[2..]);
    let gs = b.reshape(gy, &split)?;
    let mut perm = vec![1, 2, 0];
    perm.extend(tail(3));
    let gs = b.transpose(gs, perm)?;
    let mut merged = vec![outputs, batch];
    merged.extend(&y_shape[2..]);
    let gs = b.reshape(gs, &merged)?;

    let swapped = ConvGeometry {
        strides: geometry.dilations.clone(),
        dilations: geometry.strides.clone(),
        pads_begin: geometry.pads_begin.clone(),
        pads_end: geometry.pads_end.clone(),
        groups,
    };
    let full = b.push(Op::Conv(swapped), &[xs, gs])?;
    let full_shape = b.shape(full);
    let mut cut_shape = vec![group_in, outputs];
    cut_shape.extend(&w_shape[2..]);
    let cut = if full_shape == cut_shape {
        full
    } else {
        let dtype = b.g.ty(full).dtype;
        let op = Op::Slice { starts: vec![0; full_shape.len()], steps: vec![1; full_shape.len()] };
        b.push_typed(op, &[full], TensorType::new(dtype, cut_shape))?
    };
    let mut perm = vec![1, 0];
    perm.extend(tail(2));
    b.transpose(cut, perm)
}

/// ConvTranspose (x [N, C, *in], w [C, M/G, *k], bias [M]?) -> y [N, M, *out]:
/// - dx is the convolution of dy with the same weights and geometry (cut to x's extent
///   where the declared output was larger than the windows reach);
/// - dw is `conv_weight_gradient` with dy as the data and x as the correlated signal;
/// - dbias sums dy over every axis but 1.
pub fn grad_conv_transpose(b: &mut Builder, geometry: &ConvGeometry, node: &Node, gy: ValueId, needs: &[bool]) -> Grads {
    let (x, w) = (node.inputs[0], node.inputs[1]);
    let (x_shape, w_shape, y_shape) = (b.shape(x), b.shape(w), b.shape(gy));
    let mut grads = vec![None; node.inputs.len()];
    if needs[0] {
        let full = b.push(Op::Conv(geometry.clone()), &[gy, w])?;
        let full_shape = b.shape(full);
        grads[0] = Some(if full_shape == x_shape {
            full
        } else {
            let op = Op::Slice { starts: vec![0; x_shape.len()], steps: vec![1; x_shape.len()] };
            let ty = b.g.ty(x).clone();
            b.push_typed(op, &[full], ty)?
        });
    }
    if needs[1] {
        grads[1] = Some(conv_weight_gradient(b, geometry, gy, x, &y_shape, &w_shape, &x_shape)?);
    }
    if needs.get(2).copied().unwrap_or(false) {
        let axes: Vec<usize> = (0..y_shape.len()).filter(|&a| a != 1).collect();
        let summed = b.reduce_sum(gy, axes)?;
        grads[2] = Some(b.reshape(summed, &[y_shape[1]])?);
    }
    Ok(grads)
}

pub fn grad_pool(b: &mut Builder, attrs: &PoolAttrs, node: &Node, gy: ValueId) -> Grads {
    let dx = match attrs.kind {
        PoolKind::Avg { count_include_pad } => grad_avg_pool(b, attrs, count_include_pad, node, gy)?,
        PoolKind::Max => super::rules_pool::grad_max_pool(b, attrs, node.inputs[0], gy)?,
    };
    Ok(vec![Some(dx)])
}

fn window_geometry(attrs: &PoolAttrs, groups: usize) -> ConvGeometry {
    ConvGeometry {
        strides: attrs.strides.clone(),
        dilations: attrs.dilations.clone(),
        pads_begin: attrs.pads_begin.clone(),
        pads_end: attrs.pads_end.clone(),
        groups,
    }
}

/// How many taps of each output position's window a pool's divisor counts along one axis.
fn taps_counted(input: usize, output: usize, attrs: &PoolAttrs, axis: usize, count_include_pad: bool) -> Vec<f32> {
    let (k, s, d) = (attrs.kernel[axis], attrs.strides[axis], attrs.dilations[axis]);
    let (pb, pe) = (attrs.pads_begin[axis] as i64, attrs.pads_end[axis] as i64);
    let (lo, hi) = if count_include_pad { (-pb, input as i64 + pe) } else { (0, input as i64) };
    (0..output)
        .map(|o| {
            (0..k)
                .map(|t| (o * s + t * d) as i64 - pb)
                .filter(|&p| p >= lo && p < hi)
                .count() as f32
        })
        .collect()
}

/// Average pooling's gradient: dy divided by each window's divisor, spread back over the
/// window by a depthwise transposed convolution with an all-ones kernel.
fn grad_avg_pool(b: &mut Builder, attrs: &PoolAttrs, count_include_pad: bool, node: &Node, gy: ValueId) -> Result<ValueId, String> {
    let x = node.inputs[0];
    let (x_shape, y_shape) = (b.shape(x), b.shape(gy));
    let spatial = x_shape.len() - 2;
    let channels = x_shape[1];
    // The divisor is a product of per-axis counts.
    let per_axis: Vec<Vec<f32>> =
        (0..spatial).map(|a| taps_counted(x_shape[2 + a], y_shape[2 + a], attrs, a, count_include_pad)).collect();
    let out_extent = &y_shape[2..];
    let positions: usize = out_extent.iter().product();
    let strides = cnnc_ir::strides(out_extent);
    let inverse: Vec<f32> = (0..positions)
        .map(|flat| {
            let count: f32 = (0..spatial).map(|a| per_axis[a][(flat / strides[a]) % out_extent[a]]).product();
            if count > 0.0 { 1.0 / count } else { 0.0 }
        })
        .collect();
    let mut inv_shape = vec![1, 1];
    inv_shape.extend(out_extent);
    let inverse = b.constant(Tensor::f32(inv_shape, inverse));
    let scaled = b.binary(BinaryFn::Mul, gy, inverse)?;
    let mut w_shape = vec![channels, 1];
    w_shape.extend(&attrs.kernel);
    let ones = b.constant(Tensor::f32(w_shape.clone(), vec![1.0; w_shape.iter().product()]));
    let ty = b.g.ty(x).clone();
    b.push_typed(Op::ConvTranspose(window_geometry(attrs, channels)), &[scaled, ones], ty)
}
