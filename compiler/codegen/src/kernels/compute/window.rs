//! Per-axis bookkeeping for sliding windows. A window kernel visits, for output `o`
//! and tap `k` of one spatial axis, input `o·stride − pad_begin + k·dilation`. Which
//! taps land inside the input depends on `o`; consecutive outputs with the same
//! valid tap range form a segment, and each segment is emitted with its range fixed
//! at compile time, so the generated loops never test bounds.

/// Geometry of one spatial axis of a window op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AxisWindow {
    pub input: usize,
    pub output: usize,
    pub kernel: usize,
    pub stride: usize,
    pub dilation: usize,
    pub pad_begin: usize,
    pub pad_end: usize,
}

impl AxisWindow {
    /// The spatial axes of a pooling window over NC* maps of `input` and `output` shapes.
    pub fn pool_axes(attrs: &cnnc_ir::PoolAttrs, input: &[usize], output: &[usize]) -> Vec<AxisWindow> {
        (0..input.len().saturating_sub(2))
            .map(|d| AxisWindow {
                input: input[2 + d],
                output: output[2 + d],
                kernel: attrs.kernel[d],
                stride: attrs.strides[d],
                dilation: attrs.dilations[d],
                pad_begin: attrs.pads_begin[d],
                pad_end: attrs.pads_end[d],
            })
            .collect()
    }

    /// Spatial axis `a` of a convolution with `geometry` over NC* `input`, `weight` and
    /// `output` shapes.
    pub fn conv_axis(geometry: &cnnc_ir::ConvGeometry, input: &[usize], weight: &[usize], output: &[usize], a: usize) -> AxisWindow {
        AxisWindow {
            input: input[2 + a],
            output: output[2 + a],
            kernel: weight[2 + a],
            stride: geometry.strides[a],
            dilation: geometry.dilations[a],
            pad_begin: geometry.pads_begin[a],
            pad_end: geometry.pads_end[a],
        }
    }
}

/// Consecutive outputs `[start, start + count)` sharing their tap ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub start: usize,
    pub count: usize,
    /// Taps `[tap_begin, tap_end)` read inside the input (empty when equal).
    pub tap_begin: usize,
    pub tap_end: usize,
    /// Number of taps inside the padded extent `[-pad_begin, input + pad_end)`
    /// (always a prefix of the kernel): average pooling's `count_include_pad` divisor.
    pub padded_taps: usize,
}

impl Segment {
    pub fn taps(&self) -> usize {
        self.tap_end - self.tap_begin
    }
}

fn ceil_div(a: i64, b: i64) -> i64 {
    debug_assert!(b > 0);
    a.div_euclid(b) + i64::from(a.rem_euclid(b) != 0)
}

impl AxisWindow {
    /// Offset (in input elements, possibly negative) of the window origin of output `o`.
    pub fn origin(&self, o: usize) -> i64 {
        o as i64 * self.stride as i64 - self.pad_begin as i64
    }

    fn taps_of(&self, o: usize) -> (usize, usize, usize) {
        let base = self.origin(o);
        let (k, d) = (self.kernel as i64, self.dilation as i64);
        let below = |limit: i64| ceil_div(limit - base, d).clamp(0, k);
        let begin = below(0);
        let end = below(self.input as i64).max(begin);
        let padded = below(self.input as i64 + self.pad_end as i64);
        (begin as usize, end as usize, padded as usize)
    }

    /// The output axis split into maximal runs of identical tap ranges.
    pub fn segments(&self) -> Vec<Segment> {
        let mut out: Vec<Segment> = Vec::new();
        for o in 0..self.output {
            let (tap_begin, tap_end, padded_taps) = self.taps_of(o);
            match out.last_mut() {
                Some(s)
                    if (s.tap_begin, s.tap_end, s.padded_taps)
                        == (tap_begin, tap_end, padded_taps) =>
                {
                    s.count += 1
                }
                _ => out.push(Segment {
                    start: o,
                    count: 1,
                    tap_begin,
                    tap_end,
                    padded_taps,
                }),
            }
        }
        out
    }
}

/// For a transposed convolution axis: the inputs `[begin, end)` whose tap `k` lands
/// inside the output (`0 <= i·stride − pad_begin + k·dilation < output`).
pub fn transposed_input_range(
    input: usize,
    output: usize,
    stride: usize,
    dilation: usize,
    pad_begin: usize,
    k: usize,
) -> (usize, usize) {
    let shift = k as i64 * dilation as i64 - pad_begin as i64;
    let s = stride as i64;
    let begin = ceil_div(-shift, s).clamp(0, input as i64);
    let end = ceil_div(output as i64 - shift, s)
        .clamp(0, input as i64)
        .max(begin);
    (begin as usize, end as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(w: &AxisWindow, o: usize) -> (Vec<usize>, usize) {
        let valid = (0..w.kernel)
            .filter(|&k| {
                let i = w.origin(o) + (k * w.dilation) as i64;
                i >= 0 && i < w.input as i64
            })
            .collect();
        let padded = (0..w.kernel)
            .filter(|&k| w.origin(o) + ((k * w.dilation) as i64) < (w.input + w.pad_end) as i64)
            .count();
        (valid, padded)
    }

    #[test]
    fn segments_match_brute_force() {
        for input in 1..7 {
            for kernel in 1..5 {
                for stride in 1..4 {
                    for dilation in 1..3 {
                        for pad_begin in 0..4 {
                            for pad_end in 0..4 {
                                let w = AxisWindow {
                                    input,
                                    output: 9,
                                    kernel,
                                    stride,
                                    dilation,
                                    pad_begin,
                                    pad_end,
                                };
                                let segs = w.segments();
                                assert_eq!(segs.iter().map(|s| s.count).sum::<usize>(), 9);
                                for s in &segs {
                                    for o in s.start..s.start + s.count {
                                        let (valid, padded) = brute(&w, o);
                                        let got: Vec<usize> = (s.tap_begin..s.tap_end).collect();
                                        assert_eq!(got, valid, "{w:?} o={o}");
                                        assert_eq!(s.padded_taps, padded, "{w:?} o={o}");
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn transposed_range_matches_brute_force() {
        for input in 0..6 {
            for output in 0..12 {
                for stride in 1..4 {
                    for dilation in 1..3 {
                        for pad_begin in 0..4 {
                            for k in 0..4 {
                                let (b, e) = transposed_input_range(
                                    input, output, stride, dilation, pad_begin, k,
                                );
                                let want: Vec<usize> = (0..input)
                                    .filter(|&i| {
                                        let o =
                                            (i * stride + k * dilation) as i64 - pad_begin as i64;
                                        o >= 0 && o < output as i64
                                    })
                                    .collect();
                                assert_eq!((b..e).collect::<Vec<_>>(), want);
                            }
                        }
                    }
                }
            }
        }
    }
}
