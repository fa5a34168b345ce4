//! The code tables of bitsandbytes (`functional.py`: `get_4bit_type`, `create_dynamic_map`).

/// NF4: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (index 7).
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// FP4 (1 sign, 2 exponent, 1 mantissa bit) by code index, divided by its largest value 12.
/// Indices 8..16 are the negatives of 0..8 (the sign bit).
pub fn fp4_code() -> [f32; 16] {
    let raw = [0.0f32, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0];
    let mut code = [0f32; 16];
    for (i, v) in raw.iter().enumerate() {
        code[i] = v / 12.0;
        code[i + 8] = -(v / 12.0);
    }
    code
}

/// `torch.linspace(a, b, n)` in f32 as PyTorch's CPU kernel computes it (each value rounded
/// once from `a + step·i`, counting from the nearer end).
fn linspace(a: f32, b: f32, n: usize) -> Vec<f32> {
    let step = (b - a) / (n - 1) as f32;
    (0..n)
        .map(|i| {
            if i < n / 2 {
                (a as f64 + step as f64 * i as f64) as f32
            } else {
                (b as f64 - step as f64 * (n - i - 1) as f64) as f32
            }
        })
        .collect()
}

/// The 8-bit dynamic map (`create_dynamic_map(signed, 7, 8)`), ascending: for each decimal
/// exponent 10^-6..10^0, evenly spaced fractions in [0.1, 1], (both signs when `signed`), plus 0
/// and 1. Reproduces bitsandbytes' table bit for bit.
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7 {
        let items = if signed {
            (1 << i) + 1
        } else {
            (1 << (i + 1)) + 1
        };
        let bounds = linspace(0.1, 1.0, items);
        let scale = 10f64.powi(i - 6) as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            if signed {
                data.push(-scale * mean);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}
