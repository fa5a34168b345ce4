//! LoRA layers that read one input (q, k and v of an attention layer) with their products over
//! that input shared: one `x·A_catᵀ` for all of them in the forward (their A side by side),
//! and in the backward one `(g·B)_catᵀ·x` for every A's gradient and one `(g·B)_cat·A_cat` for
//! their share of dL/dx, where each layer read `x` (or wrote a `[rows, in]` sum) three times.
//!
//! Each layer stays its own autograd op with its own output (the attention reads q, k and v
//! as they are); what they share is computed by whichever layer's backward runs last, once
//! all have handed in their `g·B`. That backward adds the low-rank term to its dL/dx and sends
//! every A's gradient to the model's [`GradSink`] (the ops' own gradient for A is none).

use crate::fused::{lora_output, low_rank_add, thin_outer, thin_project, InputDropout};
use crate::grad::with_grad3_acc;
use crate::ops::add_input_grad;
use crate::switches::Switch;
use crate::{lora_linear, GradSink, Grads3, LinearWeight};
#[cfg(feature = "cuda")]
use candle_core::DType;
use candle_core::{Result, Tensor, TensorId, D};
use std::cell::Cell;
use std::sync::{Arc, Mutex};

/// `PEFT_LORA_SHARED=off` runs each LoRA layer on its own, also where several read one input:
/// for comparisons and benchmarks.
pub const LORA_SHARED_VAR: &str = "PEFT_LORA_SHARED";

static SHARED: Switch = Switch::new(LORA_SHARED_VAR, &["off", "0"], true);

thread_local! {
    /// [`with_lora_shared`]'s setting for this thread, over the process's.
    static SHARED_ON_THIS_THREAD: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Whether LoRA layers that read one input share their products over it ([`LORA_SHARED_VAR`];
/// on this thread: see [`with_lora_shared`]).
pub fn lora_shared() -> bool {
    SHARED_ON_THIS_THREAD.get().unwrap_or_else(|| SHARED.get())
}

/// Turns the sharing on or off for this process; returns the previous setting.
pub fn set_lora_shared(on: bool) -> bool {
    SHARED.set(on)
}

/// `f()` with the sharing on or off on this thread alone (for tests that compare both).
pub fn with_lora_shared<R>(on: bool, f: impl FnOnce() -> R) -> R {
    crate::switches::with_thread_setting(&SHARED_ON_THIS_THREAD, on, f)
}

/// A LoRA layer over a frozen weight `[out, in]` (dense, or 4-bit for QLoRA), without bias or
/// dropout: `x·Wᵀ + scale·x·Aᵀ·Bᵀ` (A `[r, in]`, B `[out, r]`).
pub struct LoraProjection<'a> {
    pub weight: &'a LinearWeight,
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f64,
}

/// The outputs of LoRA layers that all read `x` (`[.., in]`), each as [`lora_linear`] computes
/// it, with their products over `x` shared (see the module documentation). The gradients of
/// their A go to `sink`, which the caller drains after the backward. Each layer runs on its own
/// where sharing does not apply: one layer, over three, trained and frozen adapters mixed, a
/// few rows without gradients (decoding), or a GPU without our low-rank kernels (candle's
/// composed ops there).
pub fn lora_linears(
    x: &Tensor,
    layers: &[LoraProjection],
    sink: &Arc<GradSink>,
) -> Result<Vec<Tensor>> {
    let in_f = x.dim(D::Minus1)?;
    let rows = x.elem_count() / in_f;
    let trains = |l: &LoraProjection| l.a.track_op() || l.b.track_op();
    let tracks = x.track_op() || layers.iter().any(trains);
    let route = Route::of(x, layers);
    let shapes_fit = |l: &LoraProjection| match (l.weight.dims(), l.a.dims2(), l.b.dims2()) {
        ((out, i), Ok((r, ia)), Ok((ob, rb))) => i == in_f && ia == in_f && (ob, rb) == (out, r),
        _ => false,
    };
    let frozen = |l: &LoraProjection| match l.weight {
        LinearWeight::Dense(w) => !w.track_op(),
        LinearWeight::Quantized(_) => true,
    };
    let shared = lora_shared()
        && (2..=3).contains(&layers.len())
        && layers.iter().all(|l| {
            frozen(l)
                && shapes_fit(l)
                && l.a.track_op() == l.b.track_op()
                && trains(l) == trains(&layers[0])
                // A trained A's gradient goes to the sink under its own id: a variable's.
                && (!l.a.track_op() || l.a.is_variable())
        })
        && (tracks || rows >= crate::fused::SMALL_ROWS)
        && route.is_some();
    let route = match route {
        Some(route) if shared => route,
        _ => {
            return layers
                .iter()
                .map(|l| lora_linear(x, l.weight, None, l.a, l.b, l.scale, None))
                .collect()
        }
    };
    let x2 = x.detach().reshape((rows, in_f))?.contiguous()?;
    let mut first = 0;
    let ranks: Vec<(usize, usize)> = layers
        .iter()
        .map(|l| {
            let r = l.a.dim(0)?;
            first += r;
            Ok((first - r, r))
        })
        .collect::<Result<_>>()?;
    let a_d: Vec<Tensor> = layers.iter().map(|l| l.a.detach()).collect();
    let b_d: Vec<Tensor> = layers.iter().map(|l| l.b.detach()).collect();
    let (a_cat, b_used, xa) = match route {
        Route::Composed => {
            let a_cat = Tensor::cat(&a_d, 0)?;
            let xa = thin_project(&x2, &InputDropout::Off, &a_cat, false, 1.0)?;
            (a_cat, b_d, xa)
        }
        #[cfg(feature = "cuda")]
        Route::Cublas => {
            let f32s = a_d
                .iter()
                .chain(&b_d)
                .map(|t| t.contiguous())
                .collect::<Result<Vec<_>>>()?;
            let (all, each) = crate::cuda::bf16_concat(&f32s.iter().collect::<Vec<_>>())?;
            let a_cat = all.narrow(0, 0, first * in_f)?.reshape((first, in_f))?;
            let xa = crate::cublas::matmul((&x2, false), (&a_cat, true), 1.0, DType::BF16)?;
            (a_cat, each[layers.len()..].to_vec(), xa)
        }
    };
    let shared = Arc::new(Shared {
        x: x2.clone(),
        a_cat,
        xa,
        ranks,
        a_ids: layers.iter().map(|l| l.a.id()).collect(),
        a_tracks: layers[0].a.track_op(),
        sink: sink.clone(),
        pending: Mutex::new(Pending::new(layers.len())),
    });
    layers
        .iter()
        .zip(b_used)
        .enumerate()
        .map(|(i, (l, b))| {
            let layer = Layer {
                index: i,
                weight: l.weight.clone(),
                b,
                scale: l.scale,
            };
            layer.output(x, (l.a, l.b), route, &shared)
        })
        .collect()
}

/// How the shared products are computed.
#[derive(Clone, Copy)]
enum Route {
    /// The thin products of [`lora_linear`] in f32: candle's ops and our kernels on the CPU,
    /// our low-rank kernels on a GPU (`PEFT_CUDA_LORA=kernels`, or f32 activations).
    Composed,
    /// cuBLAS, bf16 operands (bf16 activations on a GPU, cuBLAS's thin products).
    #[cfg(feature = "cuda")]
    Cublas,
}

impl Route {
    fn of(x: &Tensor, layers: &[LoraProjection]) -> Option<Self> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let f32_pairs = layers
                .iter()
                .all(|l| l.a.dtype() == DType::F32 && l.b.dtype() == DType::F32);
            if !(f32_pairs && crate::has_kernel(x, crate::Kernel::LowRank)) {
                return None;
            }
            return Some(match x.dtype() == DType::BF16 && crate::lora_cublas() {
                true => Self::Cublas,
                false => Self::Composed,
            });
        }
        let _ = layers;
        x.device().is_cpu().then_some(Self::Composed)
    }
}

/// What the layers' backwards share.
struct Shared {
    /// The input, `[rows, in]`.
    x: Tensor,
    /// Every A side by side, `[Σr, in]` (f32, or bf16 for cuBLAS).
    a_cat: Tensor,
    /// `x·A_catᵀ`, `[rows, Σr]`.
    xa: Tensor,
    /// Each layer's first column in `xa` (row in `a_cat`) and rank.
    ranks: Vec<(usize, usize)>,
    a_ids: Vec<TensorId>,
    a_tracks: bool,
    sink: Arc<GradSink>,
    pending: Mutex<Pending>,
}

/// The bottleneck gradients `scale·g·B` handed in so far in a backward.
struct Pending {
    /// Which layers handed theirs in.
    done: Vec<bool>,
    /// Each layer's (composed route).
    parts: Vec<Option<Tensor>>,
    /// `[rows, Σr]`, each layer's columns written where they lie (cuBLAS route).
    columns: Option<Tensor>,
}

impl Pending {
    fn new(layers: usize) -> Self {
        Self {
            done: vec![false; layers],
            parts: vec![None; layers],
            columns: None,
        }
    }
}

impl Shared {
    fn pending(&self) -> Result<std::sync::MutexGuard<'_, Pending>> {
        self.pending
            .lock()
            .map_err(|_| candle_core::Error::Msg("shared LoRA input: poisoned lock".into()))
    }

    /// Records that layer `i` handed in its `g·B` (`part`, or its columns of the shared
    /// buffer written); when it was the last, returns all of them side by side, `[rows, Σr]`,
    /// and starts over (for a second backward over the same graph).
    fn hand_in(&self, i: usize, part: Option<Tensor>) -> Result<Option<Tensor>> {
        let mut pending = self.pending()?;
        pending.done[i] = true;
        pending.parts[i] = part;
        if pending.done.contains(&false) {
            return Ok(None);
        }
        let done = std::mem::replace(&mut *pending, Pending::new(self.ranks.len()));
        match done.columns {
            Some(columns) => Ok(Some(columns)),
            None => {
                let parts: Vec<Tensor> = done.parts.into_iter().flatten().collect();
                Tensor::cat(&parts, 1).map(Some)
            }
        }
    }

    /// The gradients of every A, `gb_catᵀ·x` (f32), sent to the sink.
    fn send_a_grads(&self, d_a: Tensor) -> Result<()> {
        for (&(first, r), id) in self.ranks.iter().zip(&self.a_ids) {
            self.sink.add(*id, &d_a.narrow(0, first, r)?)?;
        }
        Ok(())
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // A backward that reached some of the layers but not all (a layer tape skips an op
        // whose output got no gradient) would lose every A's gradient and the others' low-rank
        // share of dL/dx: no model here leaves q, k, v, gate or up out of the loss.
        if let Ok(p) = self.pending.get_mut() {
            if p.done.contains(&true) {
                eprintln!(
                    "warning: LoRA layers that read one input: a backward ran for {} of {} \
                     of them, so their A got no gradient",
                    p.done.iter().filter(|&&d| d).count(),
                    p.done.len()
                );
            }
        }
    }
}

/// One layer of [`lora_linears`].
struct Layer {
    index: usize,
    /// Dequantized for each product where 4-bit (as [`lora_linear`] does).
    weight: LinearWeight,
    /// B as the route reads it (f32, or bf16 for cuBLAS).
    b: Tensor,
    scale: f64,
}

impl Layer {
    /// The layer's output, an autograd op over `(x, A, B)` whose backward returns dL/dx and
    /// dL/dB (A's goes to the sink).
    fn output(
        self,
        x: &Tensor,
        (a, b): (&Tensor, &Tensor),
        route: Route,
        shared: &Arc<Shared>,
    ) -> Result<Tensor> {
        let (rows, _) = shared.x.dims2()?;
        let out_f = self.weight.dims().0;
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("x has dims") = out_f;
        let columns = shared.ranks[self.index];
        let value = match route {
            Route::Composed => {
                let xa = shared.xa.narrow(1, columns.0, columns.1)?.contiguous()?;
                lora_output(
                    &shared.x,
                    &self.weight.dense()?,
                    None,
                    &xa,
                    &self.b,
                    self.scale,
                    shape,
                )?
            }
            #[cfg(feature = "cuda")]
            Route::Cublas => crate::fused::lora_forward(
                (&shared.x, self.weight.dense()?),
                (shared.xa.clone(), self.b.clone()),
                self.scale as f32,
                shape.into(),
                crate::fused::LowRankBy::Cublas(Some(columns)),
            ),
        };
        let x_shape = x.shape().clone();
        let (x_tracks, b_tracks) = (x.track_op(), b.track_op());
        let shared = shared.clone();
        with_grad3_acc((x, a, b), value, move |grad, gathered| -> Result<Grads3> {
            let g = grad.reshape((rows, out_f))?.contiguous()?;
            // The layer's own share of dL/dx, `g·W`; the last layer adds the low-rank shares.
            let d_x = match x_tracks {
                true => Some(add_input_grad(
                    gathered,
                    &g,
                    &self.weight.dense()?,
                    &x_shape,
                )?),
                false => None,
            };
            let (d_x, d_b) = match route {
                Route::Composed => self.backward_composed(&shared, &g, d_x, b_tracks)?,
                #[cfg(feature = "cuda")]
                Route::Cublas => self.backward_cublas(&shared, &g, d_x, b_tracks)?,
            };
            Ok((d_x.map(|d| d.reshape(&x_shape)).transpose()?, None, d_b))
        })
    }

    /// dL/dB, and the low-rank share of dL/dx added to `d_x` where this layer's backward is
    /// the last, in f32 by candle's ops and our CPU kernels.
    fn backward_composed(
        &self,
        shared: &Shared,
        g: &Tensor,
        d_x: Option<Tensor>,
        b_tracks: bool,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (first, r) = shared.ranks[self.index];
        let off = InputDropout::Off;
        let d_b = match b_tracks {
            true => {
                let xa = shared.xa.narrow(1, first, r)?.contiguous()?;
                Some(thin_outer(g, &off, &xa, false, self.scale)?)
            }
            false => None,
        };
        let mut d_x = d_x;
        let gb = thin_project(g, &off, &self.b, true, self.scale)?;
        if let Some(gb_cat) = shared.hand_in(self.index, Some(gb))? {
            if shared.a_tracks {
                shared.send_a_grads(thin_outer(&shared.x, &off, &gb_cat, true, 1.0)?)?;
            }
            if let Some(d) = d_x {
                let d = d.reshape(shared.x.shape())?;
                d_x = Some(low_rank_add(&d, &gb_cat, &shared.a_cat, true, &off, 1.0)?);
            }
        }
        Ok((d_x, d_b))
    }

    /// [`Self::backward_composed`] by cuBLAS: `scale·g·B` into this layer's columns of a
    /// buffer the layers share, the low-rank share added into `d_x` in place.
    #[cfg(feature = "cuda")]
    fn backward_cublas(
        &self,
        shared: &Shared,
        g: &Tensor,
        d_x: Option<Tensor>,
        b_tracks: bool,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        use crate::cublas::{add_product_into, matmul, matmul_into_columns, Mat};
        let scale = self.scale as f32;
        let (first, r) = shared.ranks[self.index];
        let d_b = match b_tracks {
            true => {
                let xa = Mat::columns(&shared.xa, false, (first, r));
                Some(matmul((g, true), xa, scale, DType::F32)?)
            }
            false => None,
        };
        let columns = {
            let mut pending = shared.pending()?;
            match &pending.columns {
                Some(c) => c.clone(),
                None => {
                    // Each layer writes its columns before the last reads them all.
                    let c = crate::cuda::unset_bf16(g, shared.xa.dims2()?)?;
                    pending.columns = Some(c.clone());
                    c
                }
            }
        };
        matmul_into_columns(&columns, first, (g, false), (&self.b, false), scale)?;
        drop(columns);
        if let Some(gb_cat) = shared.hand_in(self.index, None)? {
            if shared.a_tracks {
                shared.send_a_grads(matmul(
                    (&gb_cat, true),
                    (&shared.x, false),
                    1.0,
                    DType::F32,
                )?)?;
            }
            if let Some(d) = &d_x {
                add_product_into(d, (&gb_cat, false), (&shared.a_cat, false), 1.0)?;
            }
        }
        Ok((d_x, d_b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{random_normal, taped, with_layer_tape};
    use candle_core::{DType, Device, Var};

    fn randn(stream: u64, shape: &[usize], std: f32) -> Tensor {
        random_normal(5, stream, shape, std, DType::F32, &Device::Cpu).unwrap()
    }

    /// The loss of q, k and v (width 4, ranks 3, 2, 3, over x `[2, 5, 8]`) weighted and summed
    /// (on a layer tape when `tape`), the gradients of x and of each A and B (the sink drained
    /// into candle's), and whether any A had a gradient in candle's graph before that.
    fn run(shared: bool, tape: bool) -> (f32, Vec<Vec<f32>>, bool) {
        let x = Var::from_tensor(&randn(1, &[2, 5, 8], 1.0)).unwrap();
        let weights: Vec<LinearWeight> = (0..3)
            .map(|i| LinearWeight::Dense(randn(10 + i, &[4, 8], 0.3)))
            .collect();
        let params: Vec<Var> = [3, 2, 3]
            .iter()
            .zip(0u64..)
            .flat_map(|(&r, i)| [randn(20 + i, &[r, 8], 0.5), randn(30 + i, &[4, r], 0.5)])
            .map(|t| Var::from_tensor(&t).unwrap())
            .collect();
        let sink = Arc::new(GradSink::default());
        let loss = with_lora_shared(shared, || {
            with_layer_tape(tape, || {
                let y = taped(x.as_tensor(), &sink, |x| {
                    let layers: Vec<LoraProjection> = (0..3)
                        .map(|i| LoraProjection {
                            weight: &weights[i],
                            a: params[2 * i].as_tensor(),
                            b: params[2 * i + 1].as_tensor(),
                            scale: 0.5 + i as f64,
                        })
                        .collect();
                    let ys = lora_linears(x, &layers, &sink)?;
                    let qk = crate::add(&(&ys[0] * 1.5)?, &ys[1])?;
                    crate::add(&qk, &ys[2].sqr()?)
                })
                .unwrap();
                y.sum_all().unwrap()
            })
        });
        let mut grads = loss.backward().unwrap();
        let a_in_graph = [0, 2, 4]
            .iter()
            .any(|&a| grads.get(params[a].as_tensor()).is_some());
        sink.drain_into(&mut grads).unwrap();
        let flat = std::iter::once(&x)
            .chain(&params)
            .map(|v| {
                let g = grads
                    .get(v.as_tensor())
                    .expect("every variable has a gradient");
                g.flatten_all().unwrap().to_vec1().unwrap()
            })
            .collect();
        (loss.to_scalar().unwrap(), flat, a_in_graph)
    }

    /// Shared products give the loss and every gradient of the layers on their own, through
    /// candle's graph and through a layer tape; A's gradients come from the sink (none through
    /// candle's graph: the sharing ran).
    #[test]
    fn shared_input_gives_the_gradients_of_separate_layers() {
        for tape in [false, true] {
            let (want_loss, want, _) = run(false, tape);
            let (loss, got, a_in_graph) = run(true, tape);
            let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * (1.0 + b.abs());
            assert!(
                close(loss, want_loss),
                "tape {tape}: loss {loss} vs {want_loss}"
            );
            for (i, (got, want)) in got.iter().zip(&want).enumerate() {
                assert_eq!(got.len(), want.len());
                for (&a, &b) in got.iter().zip(want) {
                    assert!(close(a, b), "tape {tape} variable {i}: {a} vs {b}");
                }
            }
            assert!(
                !a_in_graph,
                "tape {tape}: an A's gradient came through the graph"
            );
        }
    }
}
