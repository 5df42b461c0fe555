//! Gradients with ops of their own: max pooling's input gradient (`PoolGrad`, or a
//! composition of generic ops where its kernel does not apply) and the direct weight
//! gradient of convolutions with few input channels per group (`ConvWeightGrad`).

use cnnc_ir::{ArgKind, BinaryFn, ConvGeometry, DType, Op, PadMode, PoolAttrs, PoolKind, Scalar, Tensor, TensorType, ValueId};

use super::autodiff::Builder;

/// Max pooling's gradient goes to the first maximum of each window in row-major tap order
/// (PyTorch's choice on ties; a NaN counts as the maximum, as in PyTorch).
///
/// The windows are stacked as [N, C, T, *out] (tap t of every window along axis 2), an
/// ArgReduce over the taps finds each window's first maximum, and the gradient routed to
/// that tap is scattered back to the input positions. Windows that tile the input
/// exactly (stride = kernel, no padding or dilation) are a reshape and a transpose of x
/// and scatter back by the inverse transpose; other windows are strided slices of x
/// (padded with −inf, so a padding tap never wins over a number) and scatter back by a
/// depthwise transposed convolution whose kernel for channel c·T + t is one-hot at tap t.
/// (A window of nothing but −inf padding and −inf inputs may route its gradient to a
/// padding tap, where it is dropped.)
pub fn grad_max_pool(b: &mut Builder, attrs: &PoolAttrs, x: ValueId, gy: ValueId) -> Result<ValueId, String> {
    let (x_shape, y_shape) = (b.shape(x), b.shape(gy));
    let spatial = x_shape.len() - 2;
    // The direct kernel (one pass: find each window's first maximum, add its dy there)
    // covers one and two spatial axes of f32.
    if (1..=2).contains(&spatial) && b.g.ty(x).dtype == DType::F32 {
        let attrs = PoolAttrs { kind: PoolKind::Max, ..attrs.clone() };
        return b.push(Op::PoolGrad(attrs), &[x, gy]);
    }
    let (batch, channels) = (x_shape[0], x_shape[1]);
    let out_extent = y_shape[2..].to_vec();
    let taps: usize = attrs.kernel.iter().product();
    let tiles = (0..spatial).all(|a| {
        attrs.strides[a] == attrs.kernel[a]
            && attrs.dilations[a] == 1
            && attrs.pads_begin[a] == 0
            && attrs.pads_end[a] == 0
            && out_extent[a] * attrs.kernel[a] == x_shape[2 + a]
    });
    let mut stacked_shape = vec![batch, channels, taps];
    stacked_shape.extend(&out_extent);
    let windows = if tiles {
        tiled_windows(b, attrs, x, &out_extent, &stacked_shape)?
    } else {
        strided_windows(b, attrs, x, &out_extent, &stacked_shape)?
    };
    let first = b.push(
        Op::ArgReduce {
            kind: ArgKind::Max,
            axis: 2,
            select_last_index: false,
        },
        &[windows],
    )?;
    // Compared as f32 (tap indices are small integers, exact in f32): the T-times larger
    // comparison then runs four lanes at a time, only the cast of the indices is scalar.
    let first = b.push(Op::Cast { to: DType::F32 }, &[first])?;
    let mut tap_shape = vec![1, 1, taps];
    tap_shape.extend(std::iter::repeat_n(1, spatial));
    let tap_index = b.constant(Tensor::f32(tap_shape, (0..taps).map(|t| t as f32).collect()));
    let chosen = b.binary(BinaryFn::Equal, first, tap_index)?;
    let mut one_tap = vec![batch, channels, 1];
    one_tap.extend(&out_extent);
    let g = b.reshape(gy, &one_tap)?;
    let routed = b.mask(chosen, g)?;
    if tiles {
        untile(b, attrs, routed, &x_shape, &out_extent)
    } else {
        scatter_by_taps(b, attrs, routed, x)
    }
}

/// x [N, C, o0·k0, o1·k1, …] as [N, C, T, o0, o1, …]: a reshape to [N, C, o0, k0, o1, k1, …]
/// and one transpose.
fn tiled_windows(
    b: &mut Builder,
    attrs: &PoolAttrs,
    x: ValueId,
    out_extent: &[usize],
    stacked_shape: &[usize],
) -> Result<ValueId, String> {
    let spatial = out_extent.len();
    let x_shape = b.shape(x);
    let mut split = x_shape[..2].to_vec();
    for a in 0..spatial {
        split.extend([out_extent[a], attrs.kernel[a]]);
    }
    let split = b.reshape(x, &split)?;
    let mut perm = vec![0, 1];
    perm.extend((0..spatial).map(|a| 3 + 2 * a));
    perm.extend((0..spatial).map(|a| 2 + 2 * a));
    let moved = b.transpose(split, perm)?;
    b.reshape(moved, stacked_shape)
}

/// The inverse of `tiled_windows` on the routed gradient [N, C, T, *out].
fn untile(
    b: &mut Builder,
    attrs: &PoolAttrs,
    routed: ValueId,
    x_shape: &[usize],
    out_extent: &[usize],
) -> Result<ValueId, String> {
    let spatial = out_extent.len();
    let mut split = x_shape[..2].to_vec();
    split.extend(&attrs.kernel);
    split.extend(out_extent);
    let split = b.reshape(routed, &split)?;
    let mut perm = vec![0, 1];
    for a in 0..spatial {
        perm.extend([2 + spatial + a, 2 + a]);
    }
    let moved = b.transpose(split, perm)?;
    b.reshape(moved, x_shape)
}

/// Tap t of every window as a strided slice of x padded with −inf (no Pad when the
/// windows stay inside x), the T slices concatenated along axis 2.
fn strided_windows(
    b: &mut Builder,
    attrs: &PoolAttrs,
    x: ValueId,
    out_extent: &[usize],
    stacked_shape: &[usize],
) -> Result<ValueId, String> {
    let x_shape = b.shape(x);
    let spatial = out_extent.len();
    let mut begins = vec![0i64; 2];
    let mut ends = vec![0i64; 2];
    for a in 0..spatial {
        let reach =
            (out_extent[a].saturating_sub(1)) * attrs.strides[a] + (attrs.kernel[a] - 1) * attrs.dilations[a] + 1;
        begins.push(attrs.pads_begin[a] as i64);
        ends.push((reach as i64 - attrs.pads_begin[a] as i64 - x_shape[2 + a] as i64).max(0));
    }
    let padded = if begins.iter().chain(&ends).all(|&p| p == 0) {
        x
    } else {
        b.push(
            Op::Pad {
                begins,
                ends,
                mode: PadMode::Constant(Scalar::F32(f32::NEG_INFINITY)),
            },
            &[x],
        )?
    };
    let taps: usize = attrs.kernel.iter().product();
    let tap_strides = cnnc_ir::strides(&attrs.kernel);
    let mut slice_shape = x_shape[..2].to_vec();
    slice_shape.extend(out_extent);
    let mut one_tap = x_shape[..2].to_vec();
    one_tap.push(1);
    one_tap.extend(out_extent);
    let dtype = b.g.ty(x).dtype;
    let mut pieces = Vec::with_capacity(taps);
    for t in 0..taps {
        let mut starts = vec![0, 0];
        let mut steps = vec![1i64, 1];
        for (a, &tap_stride) in tap_strides.iter().enumerate() {
            starts.push(((t / tap_stride) % attrs.kernel[a]) * attrs.dilations[a]);
            steps.push(attrs.strides[a] as i64);
        }
        let ty = cnnc_ir::TensorType::new(dtype, slice_shape.clone());
        let under = b.push_typed(Op::Slice { starts, steps }, &[padded], ty)?;
        pieces.push(b.reshape(under, &one_tap)?);
    }
    if pieces.len() == 1 {
        return b.reshape(pieces[0], stacked_shape);
    }
    b.push(Op::Concat { axis: 2 }, &pieces)
}

/// The routed gradient [N, C, T, *out] back onto x's positions: a depthwise transposed
/// convolution over C·T channels with a one-hot kernel per tap (overlapping windows add).
fn scatter_by_taps(b: &mut Builder, attrs: &PoolAttrs, routed: ValueId, x: ValueId) -> Result<ValueId, String> {
    let x_shape = b.shape(x);
    let routed_shape = b.shape(routed);
    let (batch, channels, taps) = (routed_shape[0], routed_shape[1], routed_shape[2]);
    let mut merged = vec![batch, channels * taps];
    merged.extend(&routed_shape[3..]);
    let stacked = b.reshape(routed, &merged)?;
    let mut w_shape = vec![channels * taps, 1];
    w_shape.extend(&attrs.kernel);
    let mut one_hot = vec![0f32; channels * taps * taps];
    for c in 0..channels {
        for t in 0..taps {
            one_hot[(c * taps + t) * taps + t] = 1.0;
        }
    }
    let kernel = b.constant(Tensor::f32(w_shape, one_hot));
    let geometry = ConvGeometry {
        strides: attrs.strides.clone(),
        dilations: attrs.dilations.clone(),
        pads_begin: attrs.pads_begin.clone(),
        pads_end: attrs.pads_end.clone(),
        groups: channels,
    };
    let ty = b.g.ty(x).clone();
    debug_assert_eq!(ty.shape, x_shape);
    b.push_typed(Op::ConvTranspose(geometry), &[stacked, kernel], ty)
}

/// Convolutions with at most this many input channels per group get their weight
/// gradient from `ConvWeightGrad` (depthwise layers, a first layer over one image
/// channel): the GEMM form would stack the taps of x, transpose x and dy and run a
/// product with that few columns per group.
pub const MAX_DIRECT_WEIGHT_GRADIENT_CHANNELS: usize = 1;

/// Pointwise convolutions (1x1, stride 1, unpadded) with fewer maps or input channels per
/// group than this, over planes of at least `MIN_NARROW_POINTWISE_POSITIONS`, get their
/// weight gradient from `ConvWeightGrad` too: its pointwise path multiplies dy and x along
/// their contiguous planes in 3x3 register blocks, where the matrix form transposes both to
/// [channels, N·P] / [N·P, channels] and runs a product with that few columns
/// (MobileNet-v2's 16-32 channel bottlenecks at 56x56 and 112x112). Measured
/// (`window_grad.rs`'s ignored throughput test, kernels alone): 96 maps x 16 channels over
/// 16 x 112x112, 46 ms against 73 ms for the product; 144 x 24 over 16 x 56x56 even (the
/// transposes saved besides); 64 x 16 over 64 x 16x16 the product 1.4x faster, so small
/// planes stay on it.
pub const MAX_NARROW_POINTWISE_CHANNELS: usize = 32;
pub const MIN_NARROW_POINTWISE_POSITIONS: usize = 1024;

fn narrow_pointwise(geometry: &ConvGeometry, w_shape: &[usize], positions: usize) -> bool {
    let pointwise = w_shape[2..].iter().all(|&k| k == 1)
        && geometry.strides.iter().all(|&s| s == 1)
        && geometry.pads_begin.iter().chain(&geometry.pads_end).all(|&p| p == 0);
    let maps_per_group = w_shape[0] / geometry.groups.max(1);
    pointwise
        && w_shape[1].min(maps_per_group) < MAX_NARROW_POINTWISE_CHANNELS
        && positions >= MIN_NARROW_POINTWISE_POSITIONS
}

/// The weight gradient dw [M, C/G, *k] of Conv(x, w) as one `ConvWeightGrad` node, when
/// its kernel applies (f32, one or two spatial axes, few input channels per group);
/// None otherwise.
pub fn direct_weight_gradient(
    b: &mut Builder,
    geometry: &ConvGeometry,
    x: ValueId,
    gy: ValueId,
    w_shape: &[usize],
) -> Result<Option<ValueId>, String> {
    let ty = b.g.ty(x).clone();
    let spatial = ty.rank().saturating_sub(2);
    let taps: usize = w_shape[2..].iter().product();
    let positions: usize = b.shape(gy)[2..].iter().product();
    let few_channels =
        w_shape[1] <= MAX_DIRECT_WEIGHT_GRADIENT_CHANNELS || narrow_pointwise(geometry, w_shape, positions);
    if ty.dtype != DType::F32 || !(1..=2).contains(&spatial) || !few_channels || taps > 121 {
        return Ok(None);
    }
    let dw = TensorType::new(DType::F32, w_shape.to_vec());
    b.push_typed(Op::ConvWeightGrad(geometry.clone()), &[x, gy], dw).map(Some)
}
