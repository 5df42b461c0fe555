//! LeNet-5 (LeCun et al. 1998, the lecture's first case study) built in code with
//! cnnc's ONNX writer, with seeded random weights.

use cnnc_ir::{DType, Tensor};
use cnnc_onnx::{ModelBuilder, attr};

/// A small deterministic generator (xorshift64*), so the example is reproducible
/// without a random-number crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [-bound, bound): PyTorch's default (Kaiming-uniform-like) init range.
    pub fn tensor(&mut self, shape: &[usize], bound: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::f32(shape.to_vec(), (0..n).map(|_| (self.uniform() * 2.0 - 1.0) * bound).collect())
    }
}

/// The LeNet-5 graph for 1x32x32 inputs and 10 classes, as ONNX bytes (opset 17).
pub fn lenet5_onnx(batch: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut m = ModelBuilder::new("lenet5", 17);
    m.input("image", DType::F32, &[batch, 1, 32, 32]);
    let mut param = |m: &mut ModelBuilder, name: &str, shape: &[usize], fan_in: usize| {
        let bound = 1.0 / (fan_in as f32).sqrt();
        m.initializer(name, &rng.tensor(shape, bound));
    };
    param(&mut m, "conv1.weight", &[6, 1, 5, 5], 25);
    param(&mut m, "conv1.bias", &[6], 25);
    param(&mut m, "conv2.weight", &[16, 6, 5, 5], 150);
    param(&mut m, "conv2.bias", &[16], 150);
    param(&mut m, "fc1.weight", &[120, 400], 400);
    param(&mut m, "fc1.bias", &[120], 400);
    param(&mut m, "fc2.weight", &[84, 120], 120);
    param(&mut m, "fc2.bias", &[84], 120);
    param(&mut m, "fc3.weight", &[10, 84], 84);
    param(&mut m, "fc3.bias", &[10], 84);
    let pool = || vec![attr::ints("kernel_shape", &[2, 2]), attr::ints("strides", &[2, 2])];
    let gemm = || vec![attr::int("transB", 1)];
    m.node("Conv", &["image", "conv1.weight", "conv1.bias"], &["c1"], vec![attr::ints("kernel_shape", &[5, 5])])
        .node("Relu", &["c1"], &["r1"], vec![])
        .node("MaxPool", &["r1"], &["p1"], pool())
        .node("Conv", &["p1", "conv2.weight", "conv2.bias"], &["c2"], vec![attr::ints("kernel_shape", &[5, 5])])
        .node("Relu", &["c2"], &["r2"], vec![])
        .node("MaxPool", &["r2"], &["p2"], pool())
        .node("Flatten", &["p2"], &["f"], vec![attr::int("axis", 1)])
        .node("Gemm", &["f", "fc1.weight", "fc1.bias"], &["g1"], gemm())
        .node("Relu", &["g1"], &["h1"], vec![])
        .node("Gemm", &["h1", "fc2.weight", "fc2.bias"], &["g2"], gemm())
        .node("Relu", &["g2"], &["h2"], vec![])
        .node("Gemm", &["h2", "fc3.weight", "fc3.bias"], &["logits"], gemm())
        .output("logits", DType::F32, &[batch, 10]);
    m.to_bytes()
}

/// A 32x32 image of a thick diagonal stroke with a bar: something digit-like to classify.
pub fn sample_image(batch: usize) -> Tensor {
    let mut v = vec![0f32; batch * 32 * 32];
    for b in 0..batch {
        for y in 4..28 {
            for x in 0..32usize {
                let on_stroke = (x as i32 - (22 - (y as i32 - 4) / 2)).abs() <= 1;
                let on_bar = y == 6 && (8..24).contains(&x);
                if on_stroke || on_bar {
                    v[b * 1024 + y * 32 + x] = 1.0;
                }
            }
        }
    }
    Tensor::f32(vec![batch, 1, 32, 32], v)
}
