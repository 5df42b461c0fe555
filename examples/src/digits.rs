//! The handwritten-digits data set (1797 8x8 images, pixels 0..16, as in scikit-learn's
//! `load_digits`) and a LeNet-style convnet for it, built with cnnc's ONNX writer.
//! `bin/train_digits.rs` trains it with the compiled training step.

use std::io::Read;
use std::path::Path;

use cnnc_ir::{DType, Tensor};
use cnnc_onnx::{ModelBuilder, attr};

use crate::lenet5::Rng;

pub const SIDE: usize = 8;
pub const PIXELS: usize = SIDE * SIDE;
pub const CLASSES: usize = 10;
/// The CSV stores intensities 0..=16; images are scaled to 0..=1.
const MAX_INTENSITY: f32 = 16.0;

/// Images (row-major, `PIXELS` floats each, scaled to 0..=1) and their labels.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Dataset {
    pub images: Vec<f32>,
    pub labels: Vec<i64>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image(&self, index: usize) -> &[f32] {
        &self.images[index * PIXELS..(index + 1) * PIXELS]
    }

    fn push(&mut self, image: &[f32], label: i64) {
        self.images.extend_from_slice(image);
        self.labels.push(label);
    }

    /// Shuffles with `seed` and puts `test_fraction` of the rows in the second set.
    pub fn split(&self, test_fraction: f64, seed: u64) -> (Dataset, Dataset) {
        let mut order: Vec<usize> = (0..self.len()).collect();
        shuffle(&mut order, &mut Rng::new(seed));
        let test_count = (self.len() as f64 * test_fraction).round() as usize;
        let (mut train, mut test) = (Dataset::default(), Dataset::default());
        for (k, &i) in order.iter().enumerate() {
            let target = if k < test_count {
                &mut test
            } else {
                &mut train
            };
            target.push(self.image(i), self.labels[i]);
        }
        (train, test)
    }
}

/// Fisher-Yates with the example's seeded generator.
pub fn shuffle<T>(items: &mut [T], rng: &mut Rng) {
    for i in (1..items.len()).rev() {
        let j = ((rng.uniform() * (i + 1) as f32) as usize).min(i);
        items.swap(i, j);
    }
}

/// Parses rows of 64 pixel intensities (0..=16) followed by the label (0..=9).
pub fn parse_csv(text: &str) -> Result<Dataset, String> {
    let mut data = Dataset::default();
    let mut image = Vec::with_capacity(PIXELS);
    for (line_index, line) in text.lines().enumerate() {
        let line_number = line_index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != PIXELS + 1 {
            return Err(format!(
                "line {line_number}: {} fields, expected {} (64 pixels and a label)",
                fields.len(),
                PIXELS + 1
            ));
        }
        image.clear();
        for (column, field) in fields[..PIXELS].iter().enumerate() {
            let value: f32 = field.parse().map_err(|_| {
                format!(
                    "line {line_number}, column {}: `{field}` is not a number",
                    column + 1
                )
            })?;
            if !(0.0..=MAX_INTENSITY).contains(&value) {
                return Err(format!(
                    "line {line_number}, column {}: pixel {value} is outside 0..=16",
                    column + 1
                ));
            }
            image.push(value / MAX_INTENSITY);
        }
        let label: i64 = fields[PIXELS].parse().map_err(|_| {
            format!(
                "line {line_number}: label `{}` is not an integer",
                fields[PIXELS]
            )
        })?;
        if !(0..CLASSES as i64).contains(&label) {
            return Err(format!(
                "line {line_number}: label {label} is outside 0..=9"
            ));
        }
        data.push(&image, label);
    }
    if data.is_empty() {
        return Err("no rows".into());
    }
    Ok(data)
}

/// Reads a gzip-compressed (`.gz`) or plain CSV file.
pub fn load_csv(path: &Path) -> Result<Dataset, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut text = String::new();
    if bytes.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(bytes.as_slice())
            .read_to_string(&mut text)
            .map_err(|e| format!("{}: decompressing: {e}", path.display()))?;
    } else {
        text =
            String::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8 text", path.display()))?;
    }
    parse_csv(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// `image` moved by (`dx`, `dy`) pixels (positive: right, down); uncovered pixels are 0.
pub fn translate(image: &[f32], dx: i32, dy: i32) -> Vec<f32> {
    let mut out = vec![0f32; PIXELS];
    let side = SIDE as i32;
    for y in 0..side {
        for x in 0..side {
            let (sx, sy) = (x - dx, y - dy);
            if (0..side).contains(&sx) && (0..side).contains(&sy) {
                out[(y * side + x) as usize] = image[(sy * side + sx) as usize];
            }
        }
    }
    out
}

/// Appends `image` shifted by a random -1..=1 pixels on each axis (the augmentation).
pub fn push_augmented(batch: &mut Vec<f32>, image: &[f32], rng: &mut Rng) {
    let mut offset = || ((rng.uniform() * 3.0) as i32).min(2) - 1;
    let (dx, dy) = (offset(), offset());
    batch.extend(translate(image, dx, dy));
}

/// Parameter names and shapes of the model, in the order the graph uses them.
pub fn parameter_shapes() -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("conv1.weight", vec![16, 1, 3, 3]),
        ("conv1.bias", vec![16]),
        ("conv2.weight", vec![32, 16, 3, 3]),
        ("conv2.bias", vec![32]),
        ("fc1.weight", vec![64, 32 * 2 * 2]),
        ("fc1.bias", vec![64]),
        ("fc2.weight", vec![CLASSES, 64]),
        ("fc2.bias", vec![CLASSES]),
    ]
}

/// PyTorch's default initialisation (uniform in ±1/sqrt(fan_in) for weights and biases).
pub fn initial_parameters(seed: u64) -> Vec<(String, Tensor)> {
    let mut rng = Rng::new(seed);
    let shapes = parameter_shapes();
    let mut fan_in = 1;
    shapes
        .into_iter()
        .map(|(name, shape)| {
            // A bias shares the fan-in of the weight just before it.
            if shape.len() > 1 {
                fan_in = shape[1..].iter().product::<usize>();
            }
            let bound = 1.0 / (fan_in as f32).sqrt();
            (name.to_string(), rng.tensor(&shape, bound))
        })
        .collect()
}

/// conv 3x3 pad 1 -> relu -> maxpool 2 -> conv 3x3 pad 1 -> relu -> maxpool 2 -> flatten ->
/// gemm -> relu -> gemm (logits), for [batch, 1, 8, 8] images, as ONNX bytes (opset 17).
/// `parameters` must hold every name of `parameter_shapes` with that shape.
pub fn lenet_digits_onnx(batch: usize, parameters: &[(String, Tensor)]) -> Result<Vec<u8>, String> {
    let mut m = ModelBuilder::new("lenet_digits", 17);
    m.input("image", DType::F32, &[batch, 1, SIDE, SIDE]);
    for (name, shape) in parameter_shapes() {
        let (_, tensor) = parameters
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| format!("parameter `{name}` missing"))?;
        if tensor.shape != shape || tensor.data.dtype() != DType::F32 {
            return Err(format!(
                "parameter `{name}` must be f32{shape:?}, is {}",
                tensor.ty()
            ));
        }
        m.initializer(name, tensor);
    }
    let conv = || {
        vec![
            attr::ints("kernel_shape", &[3, 3]),
            attr::ints("pads", &[1, 1, 1, 1]),
        ]
    };
    let pool = || {
        vec![
            attr::ints("kernel_shape", &[2, 2]),
            attr::ints("strides", &[2, 2]),
        ]
    };
    let gemm = || vec![attr::int("transB", 1)];
    m.node(
        "Conv",
        &["image", "conv1.weight", "conv1.bias"],
        &["c1"],
        conv(),
    )
    .node("Relu", &["c1"], &["r1"], vec![])
    .node("MaxPool", &["r1"], &["p1"], pool())
    .node(
        "Conv",
        &["p1", "conv2.weight", "conv2.bias"],
        &["c2"],
        conv(),
    )
    .node("Relu", &["c2"], &["r2"], vec![])
    .node("MaxPool", &["r2"], &["p2"], pool())
    .node("Flatten", &["p2"], &["f"], vec![attr::int("axis", 1)])
    .node("Gemm", &["f", "fc1.weight", "fc1.bias"], &["g1"], gemm())
    .node("Relu", &["g1"], &["h1"], vec![])
    .node(
        "Gemm",
        &["h1", "fc2.weight", "fc2.bias"],
        &["logits"],
        gemm(),
    )
    .output("logits", DType::F32, &[batch, CLASSES]);
    Ok(m.to_bytes())
}

/// Index of the largest of each row of `CLASSES` logits.
pub fn predictions(logits: &[f32]) -> Vec<i64> {
    logits
        .chunks(CLASSES)
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (k, &v)| {
                    if v > best.1 { (k, v) } else { best }
                })
                .0 as i64
        })
        .collect()
}

/// A text progress bar: `[#####.....] 23/45`.
pub fn progress_bar(done: usize, total: usize, width: usize) -> String {
    let filled = (done * width)
        .checked_div(total)
        .unwrap_or(width)
        .min(width);
    format!(
        "[{}{}] {done}/{total}",
        "#".repeat(filled),
        ".".repeat(width - filled)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translate_moves_pixels_and_fills_with_zero() {
        let image: Vec<f32> = (0..PIXELS).map(|i| i as f32).collect();
        let right = translate(&image, 1, 0);
        assert_eq!(right[0], 0.0);
        assert_eq!(right[1], image[0]);
        let up = translate(&image, 0, -1);
        assert_eq!(up[0], image[SIDE]);
        assert!(up[PIXELS - SIDE..].iter().all(|&v| v == 0.0));
        assert_eq!(translate(&image, 0, 0), image);
    }

    #[test]
    fn csv_rows_are_checked() {
        let row = |label: &str| format!("{}{label}\n", "16,".repeat(PIXELS));
        let data = parse_csv(&(row("3") + &row("9"))).unwrap();
        assert_eq!(data.labels, vec![3, 9]);
        assert!(data.images.iter().all(|&v| v == 1.0));
        assert!(parse_csv(&row("10")).unwrap_err().contains("label 10"));
        assert!(parse_csv("1,2,3\n").unwrap_err().contains("3 fields"));
    }

    #[test]
    fn split_is_seeded_and_disjoint() {
        let data = Dataset {
            images: (0..100 * PIXELS).map(|i| (i / PIXELS) as f32).collect(),
            labels: (0..100).map(|i| i % 10).collect(),
        };
        let (train, test) = data.split(0.2, 7);
        assert_eq!((train.len(), test.len()), (80, 20));
        assert_eq!(data.split(0.2, 7), (train.clone(), test.clone()));
        let mut ids: Vec<i64> = train
            .images
            .iter()
            .chain(&test.images)
            .step_by(PIXELS)
            .map(|&v| v as i64)
            .collect();
        ids.sort();
        assert_eq!(ids, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn progress_bar_fills_in_proportion() {
        assert_eq!(progress_bar(5, 10, 10), "[#####.....] 5/10");
        assert_eq!(progress_bar(0, 0, 4), "[####] 0/0");
    }
}
