//! Causal attention as cuDNN's operation graphs describe it: the forward (scores, mask,
//! softmax with its log-sum-exp, values) and the backward (FlashAttention's recomputation), in
//! the ops its fused-attention engines recognise (the shapes and op order of cudnn-frontend's
//! `sdpa` and `sdpa_backward` nodes, causal, without dropout or bias). A pure description:
//! [`super::backend`] lowers it to cuDNN's descriptors; the tests evaluate it on the CPU
//! against our attention, so the graphs are known to compute attention before a GPU runs them.

/// Element types of the graphs' tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dtype {
    F32,
    Bf16,
    I32,
    Bool,
}

/// The buffers a graph reads or writes: the attention's inputs and outputs, and the backward's
/// two f32 scratch tensors (the rows' `dO·O` sums and dQ accumulated before its bf16 rounding).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Port {
    Q,
    K,
    V,
    O,
    Stats,
    DOut,
    DQ,
    DK,
    DV,
    SoftmaxSum,
    DqAccum,
}

/// Where a tensor's values live.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Storage {
    /// Inside the fused kernel only.
    Virtual,
    /// A device buffer.
    Buffer(Port),
    /// A scalar passed by value at execution.
    Value(f32),
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TensorSpec {
    pub uid: i64,
    pub dims: [i64; 4],
    pub strides: [i64; 4],
    pub dtype: Dtype,
    pub storage: Storage,
}

/// Pointwise modes (the index axis with [`Pointwise::GenIndex`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pointwise {
    Add,
    Sub,
    Mul,
    Div,
    Exp,
    Log,
    Identity,
    /// `x >= b`.
    CmpGe,
    /// Each element's index along an axis.
    GenIndex(i64),
    /// `t ? x : b` for inputs `(x, b, t)`.
    Select,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reduce {
    Max,
    Sum,
}

/// A tensor of a [`Graph`]: its index in `tensors`.
pub(crate) type Id = usize;

#[derive(Clone, Debug)]
pub(crate) enum Op {
    /// Batched `c = a · b` over the last two dims; a batch dim of `a` or `b` smaller than
    /// `c`'s is shared by consecutive groups (grouped-query heads).
    Matmul { a: Id, b: Id, c: Id },
    Pointwise {
        mode: Pointwise,
        inputs: Vec<Id>,
        y: Id,
        precision: Dtype,
    },
    /// Over the dims where `y` is smaller (size 1, or a group of consecutive heads).
    Reduce { mode: Reduce, x: Id, y: Id },
    /// The same memory seen with `y`'s dims and strides (here: a transposition).
    Reshape { x: Id, y: Id },
}

/// The attention an operation graph computes: `b` sequences of `t` positions, `heads` query
/// heads sharing `kv_heads` key/value heads, head size `d`, scores scaled by `scale`. The
/// tensors are laid out as our projections are: `[b, t, heads, d]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Problem {
    pub b: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub t: usize,
    pub d: usize,
    pub scale: f32,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Graph {
    pub tensors: Vec<TensorSpec>,
    pub ops: Vec<Op>,
}

/// `[b, n, t, d]` as stored `[b, t, n, d]`.
fn bshd(b: usize, n: usize, t: usize, d: usize) -> ([i64; 4], [i64; 4]) {
    let [b, n, t, d] = [b, n, t, d].map(|x| x as i64);
    ([b, n, t, d], [t * n * d, d, n * d, 1])
}

/// The last two dims swapped: the same memory seen transposed.
fn transposed((dims, strides): ([i64; 4], [i64; 4])) -> ([i64; 4], [i64; 4]) {
    (
        [dims[0], dims[1], dims[3], dims[2]],
        [strides[0], strides[1], strides[3], strides[2]],
    )
}

/// Row-major strides of `dims`.
fn packed(dims: [i64; 4]) -> ([i64; 4], [i64; 4]) {
    (
        dims,
        [dims[1] * dims[2] * dims[3], dims[2] * dims[3], dims[3], 1],
    )
}

impl Graph {
    fn add(&mut self, (dims, strides): ([i64; 4], [i64; 4]), dtype: Dtype, storage: Storage) -> Id {
        self.tensors.push(TensorSpec {
            uid: self.tensors.len() as i64 + 1,
            dims,
            strides,
            dtype,
            storage,
        });
        self.tensors.len() - 1
    }

    fn value(&mut self, v: f32) -> Id {
        self.add(packed([1; 4]), Dtype::F32, Storage::Value(v))
    }

    fn virt(&mut self, layout: ([i64; 4], [i64; 4]), dtype: Dtype) -> Id {
        self.add(layout, dtype, Storage::Virtual)
    }

    /// A pointwise op into a new virtual tensor of the inputs' broadcast shape (laid out as the
    /// first input of that shape).
    fn pointwise(&mut self, mode: Pointwise, inputs: &[Id], dtype: Dtype, precision: Dtype) -> Id {
        let mut dims = [1; 4];
        for &i in inputs {
            for (d, &n) in dims.iter_mut().zip(&self.tensors[i].dims) {
                *d = (*d).max(n);
            }
        }
        let layout = inputs
            .iter()
            .map(|&i| &self.tensors[i])
            .find(|t| t.dims == dims)
            .map_or_else(|| packed(dims), |t| (t.dims, t.strides));
        let y = self.virt(layout, dtype);
        self.pointwise_into(mode, inputs, y, precision);
        y
    }

    fn pointwise_into(&mut self, mode: Pointwise, inputs: &[Id], y: Id, precision: Dtype) {
        self.ops.push(Op::Pointwise {
            mode,
            inputs: inputs.to_vec(),
            y,
            precision,
        });
    }

    fn reduce(&mut self, mode: Reduce, x: Id, layout: ([i64; 4], [i64; 4])) -> Id {
        let y = self.virt(layout, Dtype::F32);
        self.ops.push(Op::Reduce { mode, x, y });
        y
    }

    fn matmul(&mut self, a: Id, b: Id, c: Id) {
        self.ops.push(Op::Matmul { a, b, c });
    }

    fn reshape(&mut self, x: Id, layout: ([i64; 4], [i64; 4]), dtype: Dtype) -> Id {
        let y = self.virt(layout, dtype);
        self.ops.push(Op::Reshape { x, y });
        y
    }

    /// The tensor bound to `port`, if the graph has one.
    pub(crate) fn port(&self, port: Port) -> Option<&TensorSpec> {
        self.tensors
            .iter()
            .find(|t| t.storage == Storage::Buffer(port))
    }

    /// The causal mask on `scores`: `row >= col` keeps a score, the rest become `masked`.
    fn causal(&mut self, scores: Id, masked: f32) -> Id {
        let row = self.pointwise(Pointwise::GenIndex(2), &[scores], Dtype::I32, Dtype::I32);
        let col = self.pointwise(Pointwise::GenIndex(3), &[scores], Dtype::I32, Dtype::I32);
        let keep = self.pointwise(Pointwise::CmpGe, &[row, col], Dtype::Bool, Dtype::Bool);
        let masked = self.value(masked);
        self.pointwise(
            Pointwise::Select,
            &[scores, masked, keep],
            Dtype::F32,
            Dtype::F32,
        )
    }
}

/// Layouts of the problem's tensors.
struct Layouts {
    q: ([i64; 4], [i64; 4]),
    kv: ([i64; 4], [i64; 4]),
    scores: ([i64; 4], [i64; 4]),
    rows: ([i64; 4], [i64; 4]),
}

impl Problem {
    fn layouts(&self) -> Layouts {
        let Problem {
            b,
            heads,
            kv_heads,
            t,
            d,
            ..
        } = *self;
        let [b_, h_, t_] = [b, heads, t].map(|x| x as i64);
        Layouts {
            q: bshd(b, heads, t, d),
            kv: bshd(b, kv_heads, t, d),
            scores: packed([b_, h_, t_, t_]),
            rows: packed([b_, h_, t_, 1]),
        }
    }
}

/// The value masked scores take: -inf, or the lowest f32 for cuDNN before 9.10 (as
/// cudnn-frontend gives them).
pub(crate) fn masked_score(cudnn_version: usize) -> f32 {
    if cudnn_version < 91000 {
        f32::MIN
    } else {
        f32::NEG_INFINITY
    }
}

/// The forward: `O = softmax(scale · Q·Kᵀ + causal) · V` and `Stats`, each row's log-sum-exp
/// of its scaled, masked scores (what our flash kernels keep for the backward too); masked
/// scores are `masked` ([`masked_score`]).
pub(crate) fn forward(p: &Problem, masked: f32) -> Graph {
    let l = p.layouts();
    let mut g = Graph::default();
    let q = g.add(l.q, Dtype::Bf16, Storage::Buffer(Port::Q));
    let kt = g.add(transposed(l.kv), Dtype::Bf16, Storage::Buffer(Port::K));
    let v = g.add(l.kv, Dtype::Bf16, Storage::Buffer(Port::V));
    let scores = g.virt(l.scores, Dtype::F32);
    g.matmul(q, kt, scores);
    let scale = g.value(p.scale);
    let scaled = g.pointwise(Pointwise::Mul, &[scores, scale], Dtype::F32, Dtype::F32);
    let masked = g.causal(scaled, masked);
    let max = g.reduce(Reduce::Max, masked, l.rows);
    let shifted = g.pointwise(Pointwise::Sub, &[masked, max], Dtype::F32, Dtype::F32);
    let exp = g.pointwise(Pointwise::Exp, &[shifted], Dtype::F32, Dtype::F32);
    let sum = g.reduce(Reduce::Sum, exp, l.rows);
    let log = g.pointwise(Pointwise::Log, &[sum], Dtype::F32, Dtype::F32);
    let stats = g.add(l.rows, Dtype::F32, Storage::Buffer(Port::Stats));
    g.pointwise_into(Pointwise::Add, &[max, log], stats, Dtype::F32);
    // The probabilities enter the second product in the inputs' type, as cuDNN requires.
    let probs = g.pointwise(Pointwise::Div, &[exp, sum], Dtype::Bf16, Dtype::F32);
    let o = g.add(l.q, Dtype::Bf16, Storage::Buffer(Port::O));
    g.matmul(probs, v, o);
    g
}

/// The backward: dQ, dK, dV from Q, K, V, O, dO and the forward's `Stats`, the probabilities
/// recomputed (`exp(scale · Q·Kᵀ − Stats)`), grouped heads' dK and dV summed per kv head.
pub(crate) fn backward(p: &Problem, masked: f32) -> Graph {
    let l = p.layouts();
    let (b, h, kvh, t, d) = (
        p.b as i64,
        p.heads as i64,
        p.kv_heads as i64,
        p.t as i64,
        p.d as i64,
    );
    let mut g = Graph::default();
    let q = g.add(l.q, Dtype::Bf16, Storage::Buffer(Port::Q));
    let kt = g.add(transposed(l.kv), Dtype::Bf16, Storage::Buffer(Port::K));
    let vt = g.add(transposed(l.kv), Dtype::Bf16, Storage::Buffer(Port::V));
    let o = g.add(l.q, Dtype::Bf16, Storage::Buffer(Port::O));
    let dout = g.add(l.q, Dtype::Bf16, Storage::Buffer(Port::DOut));
    let stats = g.add(l.rows, Dtype::F32, Storage::Buffer(Port::Stats));

    // The rows' sums of dO ∘ O (FlashAttention's delta).
    let prod = g.pointwise(Pointwise::Mul, &[dout, o], Dtype::F32, Dtype::F32);
    let delta = g.reduce(Reduce::Sum, prod, l.rows);
    let one = g.value(1.0);
    let softmax_sum = g.add(l.rows, Dtype::F32, Storage::Buffer(Port::SoftmaxSum));
    g.pointwise_into(Pointwise::Mul, &[delta, one], softmax_sum, Dtype::F32);

    // The probabilities, recomputed.
    let scores = g.virt(l.scores, Dtype::F32);
    g.matmul(q, kt, scores);
    let scale = g.value(p.scale);
    let scaled = g.pointwise(Pointwise::Mul, &[scores, scale], Dtype::F32, Dtype::F32);
    let shifted = g.pointwise(Pointwise::Sub, &[scaled, stats], Dtype::F32, Dtype::F32);
    let masked = g.causal(shifted, masked);
    let probs = g.pointwise(Pointwise::Exp, &[masked], Dtype::F32, Dtype::F32);

    // dV = Pᵀ · dO, summed over each kv head's query heads.
    let probs_t = g.reshape(probs, transposed(l.scores), Dtype::Bf16);
    let dv = g.add(l.kv, Dtype::Bf16, Storage::Buffer(Port::DV));
    g.grouped_product(probs_t, dout, dv, (h, kvh, t, d));

    // dS = P ∘ (dO·Vᵀ − delta) · scale.
    let dp = g.virt(l.scores, Dtype::F32);
    g.matmul(dout, vt, dp);
    let centred = g.pointwise(Pointwise::Sub, &[dp, softmax_sum], Dtype::F32, Dtype::F32);
    let ds = g.pointwise(Pointwise::Mul, &[centred, probs], Dtype::F32, Dtype::F32);
    let ds = g.pointwise(Pointwise::Mul, &[ds, scale], Dtype::F32, Dtype::F32);

    // dK = dSᵀ · Q, summed per kv head.
    let ds_t = g.reshape(ds, transposed(l.scores), Dtype::Bf16);
    let dk = g.add(l.kv, Dtype::Bf16, Storage::Buffer(Port::DK));
    g.grouped_product(ds_t, q, dk, (h, kvh, t, d));

    // dQ = dS · K, accumulated in f32, then rounded.
    let k = g.reshape(kt, l.kv, Dtype::Bf16);
    let dq_accum = g.add(
        packed([b, h, t, d]),
        Dtype::F32,
        Storage::Buffer(Port::DqAccum),
    );
    g.matmul(ds, k, dq_accum);
    let dq = g.add(l.q, Dtype::Bf16, Storage::Buffer(Port::DQ));
    g.pointwise_into(Pointwise::Identity, &[dq_accum], dq, Dtype::F32);
    g
}

impl Graph {
    /// `out = a · b` with `out` per kv head: directly when every query head has its own, else
    /// through a per-query-head product summed over each group.
    fn grouped_product(&mut self, a: Id, b: Id, out: Id, (h, kvh, t, d): (i64, i64, i64, i64)) {
        if h == kvh {
            self.matmul(a, b, out);
            return;
        }
        let batch = self.tensors[out].dims[0];
        let full = self.virt(packed([batch, h, t, d]), Dtype::Bf16);
        self.matmul(a, b, full);
        self.ops.push(Op::Reduce {
            mode: Reduce::Sum,
            x: full,
            y: out,
        });
    }
}

/// The graphs evaluated on the CPU, f32 with bf16 roundings where a tensor is bf16: what the
/// tests check the graphs' meaning with.
#[cfg(test)]
pub(crate) mod eval {
    use super::*;
    use std::collections::HashMap;

    /// Element offsets of every index of `dims`, in row-major index order.
    fn offsets(dims: [i64; 4], strides: [i64; 4]) -> impl Iterator<Item = ([i64; 4], usize)> {
        let n: i64 = dims.iter().product();
        (0..n).map(move |mut flat| {
            let mut idx = [0; 4];
            for k in (0..4).rev() {
                idx[k] = flat % dims[k];
                flat /= dims[k];
            }
            let off: i64 = idx.iter().zip(&strides).map(|(i, s)| i * s).sum();
            (idx, off as usize)
        })
    }

    fn span(t: &TensorSpec) -> usize {
        1 + t
            .dims
            .iter()
            .zip(&t.strides)
            .map(|(n, s)| (n - 1) * s)
            .sum::<i64>() as usize
    }

    /// `idx` of an output seen in an input of `dims`: size-1 dims broadcast, smaller dims
    /// (grouped heads) take `idx / group`.
    fn source(idx: [i64; 4], out: [i64; 4], dims: [i64; 4]) -> [i64; 4] {
        let mut s = idx;
        for k in 0..4 {
            s[k] = if dims[k] == 1 {
                0
            } else {
                idx[k] / (out[k] / dims[k])
            };
        }
        s
    }

    fn at(t: &TensorSpec, mem: &[f32], idx: [i64; 4]) -> f32 {
        let off: i64 = idx.iter().zip(&t.strides).map(|(i, s)| i * s).sum();
        mem[off as usize]
    }

    fn round(dtype: Dtype, v: f32) -> f32 {
        match dtype {
            Dtype::Bf16 => half::bf16::from_f32(v).to_f32(),
            _ => v,
        }
    }

    /// Runs `g` on `buffers` (each port's memory), filling its output ports.
    pub(crate) fn run(g: &Graph, buffers: &mut HashMap<Port, Vec<f32>>) {
        let mut mem: Vec<Vec<f32>> = g
            .tensors
            .iter()
            .map(|t| match t.storage {
                Storage::Buffer(p) => buffers
                    .get(&p)
                    .cloned()
                    .unwrap_or_else(|| vec![0.0; span(t)]),
                Storage::Value(v) => vec![v],
                Storage::Virtual => vec![0.0; span(t)],
            })
            .collect();
        for op in &g.ops {
            match op {
                Op::Matmul { a, b, c } => {
                    let (ta, tb, tc) = (&g.tensors[*a], &g.tensors[*b], &g.tensors[*c]);
                    let k = ta.dims[3];
                    let mut out = mem[*c].clone();
                    for (idx, off) in offsets(tc.dims, tc.strides) {
                        let ia = source(idx, tc.dims, [ta.dims[0], ta.dims[1], 1, 1]);
                        let ib = source(idx, tc.dims, [tb.dims[0], tb.dims[1], 1, 1]);
                        let mut acc = 0.0;
                        for kk in 0..k {
                            acc += at(ta, &mem[*a], [ia[0], ia[1], idx[2], kk])
                                * at(tb, &mem[*b], [ib[0], ib[1], kk, idx[3]]);
                        }
                        out[off] = round(tc.dtype, acc);
                    }
                    mem[*c] = out;
                }
                Op::Pointwise {
                    mode, inputs, y, ..
                } => {
                    let ty = &g.tensors[*y];
                    let mut out = mem[*y].clone();
                    for (idx, off) in offsets(ty.dims, ty.strides) {
                        let arg = |n: usize| {
                            let t = &g.tensors[inputs[n]];
                            at(t, &mem[inputs[n]], source(idx, ty.dims, t.dims))
                        };
                        let v = match mode {
                            Pointwise::Add => arg(0) + arg(1),
                            Pointwise::Sub => arg(0) - arg(1),
                            Pointwise::Mul => arg(0) * arg(1),
                            Pointwise::Div => arg(0) / arg(1),
                            Pointwise::Exp => arg(0).exp(),
                            Pointwise::Log => arg(0).ln(),
                            Pointwise::Identity => arg(0),
                            Pointwise::CmpGe => f32::from(u8::from(arg(0) >= arg(1))),
                            Pointwise::GenIndex(axis) => idx[*axis as usize] as f32,
                            Pointwise::Select => {
                                if arg(2) != 0.0 {
                                    arg(0)
                                } else {
                                    arg(1)
                                }
                            }
                        };
                        out[off] = round(ty.dtype, v);
                    }
                    mem[*y] = out;
                }
                Op::Reduce { mode, x, y } => {
                    let (tx, ty) = (&g.tensors[*x], &g.tensors[*y]);
                    let init = match mode {
                        Reduce::Max => f32::NEG_INFINITY,
                        Reduce::Sum => 0.0,
                    };
                    let mut out = vec![init; span(ty)];
                    for (idx, off) in offsets(tx.dims, tx.strides) {
                        let mut target = idx;
                        for k in 0..4 {
                            target[k] = if ty.dims[k] == 1 {
                                0
                            } else {
                                idx[k] / (tx.dims[k] / ty.dims[k])
                            };
                        }
                        let o: i64 = target.iter().zip(&ty.strides).map(|(i, s)| i * s).sum();
                        let v = mem[*x][off];
                        let slot = &mut out[o as usize];
                        *slot = match mode {
                            Reduce::Max => slot.max(v),
                            Reduce::Sum => *slot + v,
                        };
                    }
                    for v in &mut out {
                        *v = round(ty.dtype, *v);
                    }
                    mem[*y] = out;
                }
                Op::Reshape { x, y } => {
                    let ty = &g.tensors[*y];
                    mem[*y] = mem[*x].iter().map(|&v| round(ty.dtype, v)).collect();
                }
            }
        }
        for (t, m) in g.tensors.iter().zip(mem) {
            if let Storage::Buffer(p) = t.storage {
                buffers.insert(p, m);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;

    /// bf16-representable values, so the graph's bf16 inputs and the f32 reference agree.
    fn draw(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| half::bf16::from_f32(rng.random_range(-1.0f32..1.0)).to_f32())
            .collect()
    }

    /// `[b, t, n·d]` memory as the `[b, n, t, d]` tensor of our CPU attention.
    fn heads(x: &[f32], (b, t, n, d): (usize, usize, usize, usize)) -> Tensor {
        Tensor::from_slice(x, (b, t, n, d), &Device::Cpu)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    }

    fn assert_close(name: &str, got: &[f32], want: &Tensor, tol: f32) {
        let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got.len(), want.len(), "{name}: sizes");
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= tol, "{name}: off by {worst} (tolerance {tol})");
    }

    /// The forward and backward graphs compute causal attention, its log-sum-exp and its
    /// gradients, with grouped-query heads (as cuDNN evaluates them, up to its rounding), masked
    /// scores at -inf (cuDNN 9.10 on) or the lowest f32 (before).
    #[test]
    fn attention_graphs_compute_causal_attention() {
        let problem = |b, heads, kv_heads, t, d, scale| Problem {
            b,
            heads,
            kv_heads,
            t,
            d,
            scale,
        };
        for version in [91000, 90000] {
            graphs_compute_attention(problem(2, 4, 2, 7, 8, 0.35), masked_score(version));
        }
        graphs_compute_attention(problem(1, 6, 3, 33, 16, 0.25), masked_score(91000));
        graphs_compute_attention(problem(1, 2, 2, 5, 8, 0.5), masked_score(91000));
    }

    fn graphs_compute_attention(p: Problem, masked: f32) {
        let (b, h, kvh, t, d) = (p.b, p.heads, p.kv_heads, p.t, p.d);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (q, k, v) = (
            draw(&mut rng, b * t * h * d),
            draw(&mut rng, b * t * kvh * d),
            draw(&mut rng, b * t * kvh * d),
        );
        let dout = draw(&mut rng, b * t * h * d);

        let mut buffers = HashMap::from([
            (Port::Q, q.clone()),
            (Port::K, k.clone()),
            (Port::V, v.clone()),
        ]);
        eval::run(&forward(&p, masked), &mut buffers);

        let qv = Var::from_tensor(&heads(&q, (b, t, h, d))).unwrap();
        let kv = Var::from_tensor(&heads(&k, (b, t, kvh, d))).unwrap();
        let vv = Var::from_tensor(&heads(&v, (b, t, kvh, d))).unwrap();
        let out = crate::causal_attention(
            qv.as_tensor(),
            kv.as_tensor(),
            vv.as_tensor(),
            p.scale as f64,
            None,
            None,
            None,
        )
        .unwrap();
        let o = &buffers[&Port::O];
        assert_close(
            "O",
            o,
            &out.transpose(1, 2).unwrap().contiguous().unwrap(),
            1e-2,
        );

        // The log-sum-exp of each row's scaled scores over its keys 0..=row.
        let scores = qv
            .as_tensor()
            .matmul(&kv.as_tensor().repeat_interleave_heads(h / kvh).t().unwrap())
            .unwrap();
        let scores: Vec<f32> = (scores * p.scale as f64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let lse: Vec<f32> = scores
            .chunks(t)
            .enumerate()
            .map(|(i, row)| {
                let seen = &row[..=i % t];
                let m = seen.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                m + seen.iter().map(|s| (s - m).exp()).sum::<f32>().ln()
            })
            .collect();
        let lse = Tensor::from_vec(lse, (b, h, t), &Device::Cpu).unwrap();
        assert_close("Stats", &buffers[&Port::Stats], &lse, 1e-4);

        // The backward from this forward's O and Stats.
        buffers.insert(Port::DOut, dout.clone());
        eval::run(&backward(&p, masked), &mut buffers);
        let g = heads(&dout, (b, t, h, d));
        let grads = (out * g).unwrap().sum_all().unwrap().backward().unwrap();
        for (port, var, n) in [
            (Port::DQ, &qv, h),
            (Port::DK, &kv, kvh),
            (Port::DV, &vv, kvh),
        ] {
            let want = grads
                .get(var)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap();
            assert_eq!(want.dims(), [b, t, n, d]);
            assert_close(&format!("{port:?}"), &buffers[&port], &want, 2e-2);
        }
    }

    trait RepeatHeads {
        fn repeat_interleave_heads(&self, n: usize) -> Tensor;
    }

    impl RepeatHeads for Tensor {
        /// `[b, kv, t, d]` to `[b, kv·n, t, d]`, each kv head serving `n` consecutive heads.
        fn repeat_interleave_heads(&self, n: usize) -> Tensor {
            let (b, kv, t, d) = self.dims4().unwrap();
            self.unsqueeze(2)
                .unwrap()
                .broadcast_as((b, kv, n, t, d))
                .unwrap()
                .reshape((b, kv * n, t, d))
                .unwrap()
        }
    }
}
