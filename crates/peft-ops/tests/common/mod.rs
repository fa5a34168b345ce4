//! Shared by the op tests that compare against an f32 reference.

use candle_core::{DType, Device, Tensor};

/// f32 values uniform in [-1, 1), the same for the same seed.
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Largest magnitude in `t` (f32).
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// RoPE tables `[t, d / 2]` (cos, sin) with HF's default base.
#[allow(dead_code)] // not every test binary rotates
pub fn rope_tables(t: usize, d: usize) -> (Tensor, Tensor) {
    let half = d / 2;
    let angles: Vec<f32> = (0..t)
        .flat_map(|p| (0..half).map(move |i| p as f32 / 10_000f32.powf(2.0 * i as f32 / d as f32)))
        .collect();
    let a = Tensor::from_vec(angles, (t, half), &Device::Cpu).unwrap();
    (a.cos().unwrap(), a.sin().unwrap())
}

/// Rows of `t` positions packing sequences of the given lengths (one list per row), then
/// padding.
#[allow(dead_code)] // for the attention tests
pub struct PackedRows {
    /// Segment ids `[b, t]` u32 (0: padding).
    pub ids: Tensor,
    /// 1 on sequence positions, 0 on padding, `[b, t, 1]` f32.
    pub real: Tensor,
    /// RoPE tables `[b, t, d / 2]` of each position: positions restart with each sequence and
    /// continue into the padding, as llama's mask_layout numbers them.
    pub cos: Tensor,
    pub sin: Tensor,
}

#[allow(dead_code)] // for the attention tests
pub fn packed_rows(t: usize, d: usize, lengths: &[&[usize]]) -> PackedRows {
    let b = lengths.len();
    let (mut ids, mut positions, mut real) = (Vec::new(), Vec::new(), Vec::new());
    for lens in lengths {
        for (s, &len) in lens.iter().enumerate() {
            ids.extend(std::iter::repeat_n(s as u32 + 1, len));
            positions.extend(0..len as u32);
            real.extend(std::iter::repeat_n(1f32, len));
        }
        let (used, last) = (lens.iter().sum::<usize>(), *lens.last().unwrap() as u32);
        ids.extend(std::iter::repeat_n(0u32, t - used));
        positions.extend(last..last + (t - used) as u32);
        real.extend(std::iter::repeat_n(0f32, t - used));
    }
    let (cos, sin) = tables_at(positions, (b, t), d);
    PackedRows {
        ids: Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap(),
        real: Tensor::from_vec(real, (b, t, 1), &Device::Cpu).unwrap(),
        cos,
        sin,
    }
}

/// RoPE tables `[b, t, d / 2]` (cos, sin) of the positions of each row (`b · t` of them).
fn tables_at(positions: Vec<u32>, (b, t): (usize, usize), d: usize) -> (Tensor, Tensor) {
    let end = *positions.iter().max().unwrap() as usize + 1;
    let (cos, sin) = rope_tables(end, d);
    let pos = Tensor::from_vec(positions, b * t, &Device::Cpu).unwrap();
    let rows = |x: &Tensor| {
        x.index_select(&pos, 0)
            .unwrap()
            .reshape((b, t, d / 2))
            .unwrap()
    };
    (rows(&cos), rows(&sin))
}

/// The output of causal self-attention over packed rows and the q, k, v gradients of
/// `sum(output · probe)`, computed in f32 on the CPU one sequence at a time (each attended
/// alone, positions from 0) and placed at its rows: `[o, dq, dk, dv]`, each `[b, t, n · d]`,
/// zero on padding rows. `q`, `k`, `v`: `[b, t, n · d]`, `probe` like `q`.
#[allow(dead_code)] // for the attention tests
pub fn packed_reference(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    probe: &Tensor,
    lengths: &[&[usize]],
    (heads, kv_heads, d): (usize, usize, usize),
    window: Option<usize>,
) -> [Tensor; 4] {
    let (b, t, _) = q.dims3().unwrap();
    let scale = 1.0 / (d as f64).sqrt();
    let widths = [heads, heads, kv_heads, kv_heads];
    let mut want: Vec<Vec<f32>> = widths.iter().map(|n| vec![0f32; b * t * n * d]).collect();
    for (bi, lens) in lengths.iter().enumerate() {
        let mut start = 0;
        for &len in lens.iter() {
            let part = |x: &Tensor| x.narrow(0, bi, 1).unwrap().narrow(1, start, len).unwrap();
            let vars: Vec<candle_core::Var> = [q, k, v]
                .iter()
                .map(|x| candle_core::Var::from_tensor(&part(x).contiguous().unwrap()).unwrap())
                .collect();
            let (c, s) = rope_tables(len, d);
            let o = peft_ops::causal_self_attention(
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
                &c,
                &s,
                heads,
                kv_heads,
                scale,
                None,
                window,
                None,
            )
            .unwrap();
            let grads = (&o * part(probe))
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let values = [
                o,
                grads.get(vars[0].as_tensor()).unwrap().clone(),
                grads.get(vars[1].as_tensor()).unwrap().clone(),
                grads.get(vars[2].as_tensor()).unwrap().clone(),
            ];
            for ((dst, x), n) in want.iter_mut().zip(values).zip(widths) {
                let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let at = (bi * t + start) * n * d;
                dst[at..at + x.len()].copy_from_slice(&x);
            }
            start += len;
        }
    }
    let mut tensors = want
        .into_iter()
        .zip(widths)
        .map(|(w, n)| Tensor::from_vec(w, (b, t, n * d), &Device::Cpu).unwrap());
    std::array::from_fn(|_| tensors.next().unwrap())
}

/// Rows of `p` prefix positions (prefix tuning's virtual tokens) then `t` new positions
/// packing sequences of the given lengths, then padding: the attention mask `[b, p + t]` u32
/// (1 on the prefix, sequence ids after it), the new positions' RoPE tables `[b, t, d / 2]`
/// (every sequence's positions start after the prefix, as llama's mask_layout numbers them) and `real` (`[b, t, 1]`, 0 on padding).
#[allow(dead_code)] // for the attention tests
pub fn prefixed_rows(p: usize, t: usize, d: usize, lengths: &[&[usize]]) -> PackedRows {
    let rows = packed_rows(t, d, lengths);
    let b = lengths.len();
    let ids = Tensor::cat(
        &[
            &Tensor::ones((b, p), DType::U32, &Device::Cpu).unwrap(),
            &rows.ids,
        ],
        1,
    )
    .unwrap();
    let mut positions = Vec::new();
    for lens in lengths {
        let mut start = 0;
        for &len in lens.iter() {
            positions.extend((p..p + len).map(|x| x as u32));
            start += len;
        }
        let last = *positions.last().unwrap() + 1;
        positions.extend(last..last + (t - start) as u32);
    }
    let (cos, sin) = tables_at(positions, (b, t), d);
    PackedRows {
        ids,
        real: rows.real,
        cos,
        sin,
    }
}

/// Attention of new tokens over a prefix and their own keys, as transformers computes it over
/// a pre-filled cache, in f32 on the CPU with autograd: the output `[b, t, heads · d]` and the
/// gradients of `sum(output · probe)` with respect to q, k, v `[b, t, n · d]` and the prefix
/// keys and values `[b, kv_heads, p, d]`: `[o, dq, dk, dv, dpk, dpv]`. A query sees the keys
/// whose mask entry is not 0 among the prefix, the earlier keys of its own sequence, and (a
/// padding query) every earlier key.
#[allow(dead_code)] // for the attention tests
pub fn prefixed_reference(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    (pk, pv): (&Tensor, &Tensor),
    rows: &PackedRows,
    probe: &Tensor,
    (heads, kv_heads, d): (usize, usize, usize),
) -> [Tensor; 6] {
    let (b, t, _) = q.dims3().unwrap();
    let p = pk.dim(2).unwrap();
    let scale = 1.0 / (d as f64).sqrt();
    let vars: Vec<candle_core::Var> = [q, k, v, pk, pv]
        .iter()
        .map(|x| candle_core::Var::from_tensor(x).unwrap())
        .collect();
    let x = |i: usize| vars[i].as_tensor();
    let split = |x: &Tensor, n: usize| split_heads(x, n);
    let qh = peft_ops::rope(&split(x(0), heads), &rows.cos, &rows.sin).unwrap();
    let kh = peft_ops::rope(&split(x(1), kv_heads), &rows.cos, &rows.sin).unwrap();
    let kh = repeat_kv(&Tensor::cat(&[x(3), &kh], 2).unwrap(), heads);
    let vh = repeat_kv(
        &Tensor::cat(&[x(4), &split(x(2), kv_heads)], 2).unwrap(),
        heads,
    );
    let ids = rows.ids.to_vec2::<u32>().unwrap();
    let mut bias = vec![f32::NEG_INFINITY; b * t * (p + t)];
    for (bi, ids) in ids.iter().enumerate() {
        for qi in 0..t {
            let id = ids[p + qi];
            for (ki, &key) in ids.iter().enumerate().take(p + qi + 1) {
                if key != 0 && (ki < p || id == 0 || key == id) {
                    bias[(bi * t + qi) * (p + t) + ki] = 0.0;
                }
            }
        }
    }
    let bias = Tensor::from_vec(bias, (b, 1, t, p + t), &Device::Cpu).unwrap();
    let scores = (qh.matmul(&kh.t().unwrap()).unwrap() * scale)
        .unwrap()
        .broadcast_add(&bias)
        .unwrap();
    let top = scores.max_keepdim(3).unwrap().detach();
    let e = scores.broadcast_sub(&top).unwrap().exp().unwrap();
    let probs = e.broadcast_div(&e.sum_keepdim(3).unwrap()).unwrap();
    let o = probs
        .matmul(&vh)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, t, heads * d))
        .unwrap();
    let grads = (&o * probe).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = |i: usize| grads.get(x(i)).unwrap().clone();
    [o, grad(0), grad(1), grad(2), grad(3), grad(4)]
}

/// `[b, t, n · d]` projections as contiguous heads `[b, n, t, d]`.
#[allow(dead_code)] // for the attention tests
pub fn split_heads(x: &Tensor, n: usize) -> Tensor {
    let (b, t, nd) = x.dims3().unwrap();
    x.reshape((b, t, n, nd / n))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
}

/// Heads `[b, kv_heads, s, d]` repeated for the `heads` query heads they serve: `[b, heads, s,
/// d]`.
#[allow(dead_code)] // for the attention tests
pub fn repeat_kv(x: &Tensor, heads: usize) -> Tensor {
    let (b, kv_heads, s, d) = x.dims4().unwrap();
    x.unsqueeze(2)
        .unwrap()
        .broadcast_as((b, kv_heads, heads / kv_heads, s, d))
        .unwrap()
        .reshape((b, heads, s, d))
        .unwrap()
}
