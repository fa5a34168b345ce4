//! Mixture-of-experts feed-forward blocks, as transformers 5 computes them: a router's softmax
//! picks each token's top-k experts, whose gated-MLP outputs are summed weighted by those
//! probabilities (renormalized over the k when the model says so).
//!
//! [`route`] is the routing, on the graph or off it; [`frozen_moe`] is a whole block of frozen
//! dense weights as one autograd node, whose backward returns dL/dx alone (through the experts
//! and through the router's probabilities), as [`crate::frozen_mlp`] does for a dense MLP.
//! [`LoadBalance`] is the routers' auxiliary load-balancing loss of a forward.

use crate::fused::{gated_grads, gated_value};
use crate::{frozen_matmul, with_grad, GatedActivation, Grads3};
use candle_core::{DType, Device, Result, Tensor, D};
use std::sync::{Arc, Mutex};

/// The tokens each expert serves.
pub struct ExpertRows {
    /// Rows of the flattened input (`u32`), ascending.
    pub rows: Tensor,
    /// For each row, where its weight for this expert sits in the flattened `[rows, top_k]`
    /// weights (`row · top_k + slot`, `u32`).
    pub slots: Tensor,
}

/// Each token's experts and their weights.
pub struct Routing {
    /// `[rows, top_k]` (`u32`): the experts chosen, most probable first.
    pub chosen: Tensor,
    /// `[rows, top_k]` (f32): their weights (renormalized to sum to 1 when asked, then scaled);
    /// on the graph when `scores` was.
    pub weights: Tensor,
    /// Per expert, the rows it serves; `None` for an expert no token chose.
    pub experts: Vec<Option<ExpertRows>>,
}

/// How a router's logits choose and weigh each token's experts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scoring {
    /// Mixtral, Qwen-MoE, OLMoE, gpt-oss: the softmax of the logits, and the `top_k` most
    /// probable.
    Softmax,
    /// GLM-4.5 (DeepSeek-V3's routing): the sigmoid of the logits (computed in f32); the
    /// choice by sigmoid plus a per-expert correction bias, among the experts of the
    /// `topk_group` best of `n_group` groups (a group scored by its two best); the weights
    /// the chosen sigmoids, times `scale` (`routed_scaling_factor`).
    Sigmoid {
        n_group: usize,
        topk_group: usize,
        scale: f64,
    },
    /// DeepSeek-V2: the softmax of the logits (computed in f32); the choice among the experts
    /// of the `topk_group` best of `n_group` groups (a group scored by its best); the weights
    /// the chosen probabilities, times `scale`.
    LimitedSoftmax {
        n_group: usize,
        topk_group: usize,
        scale: f64,
    },
}

/// A router's settings: its [`Scoring`], the experts per token, and whether their weights
/// are renormalized over the chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterKind {
    pub scoring: Scoring,
    pub top_k: usize,
    pub norm_topk_prob: bool,
}

impl RouterKind {
    /// The scores of the logits (`[rows, experts]`, f32): softmax or sigmoid, on the graph.
    pub fn scores(&self, logits: &Tensor) -> Result<Tensor> {
        match self.scoring {
            Scoring::Softmax | Scoring::LimitedSoftmax { .. } => crate::softmax_last_dim(logits),
            Scoring::Sigmoid { .. } => candle_nn::ops::sigmoid(logits),
        }
    }

    /// dL/dlogits from dL/dscores, `scores` being [`Self::scores`] of them.
    fn scores_backward(&self, scores: &Tensor, d_scores: &Tensor) -> Result<Tensor> {
        match self.scoring {
            Scoring::Softmax | Scoring::LimitedSoftmax { .. } => {
                let dot = (d_scores * scores)?.sum_keepdim(D::Minus1)?;
                d_scores.broadcast_sub(&dot)? * scores
            }
            Scoring::Sigmoid { .. } => d_scores * (scores * (1.0 - scores)?)?,
        }
    }

    /// The factor of the weights after their renormalization.
    fn scale(&self) -> f64 {
        match self.scoring {
            Scoring::Softmax => 1.0,
            Scoring::Sigmoid { scale, .. } | Scoring::LimitedSoftmax { scale, .. } => scale,
        }
    }

    /// What the choice ranks (off the graph): the scores, plus the correction `bias` and less
    /// the experts outside the best groups where the scoring says so.
    fn choice(&self, scores: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let mut choice = scores.detach();
        if let Some(b) = bias {
            choice = choice.broadcast_add(&b.to_dtype(DType::F32)?)?;
        }
        // A group's score: the sum of its two best (GLM-4.5, DeepSeek-V3), or its best
        // (DeepSeek-V2).
        let (n_group, topk_group, best_of) = match self.scoring {
            Scoring::Softmax => return Ok(choice),
            Scoring::Sigmoid {
                n_group,
                topk_group,
                ..
            } => (n_group, topk_group, 2),
            Scoring::LimitedSoftmax {
                n_group,
                topk_group,
                ..
            } => (n_group, topk_group, 1),
        };
        if n_group <= 1 || topk_group >= n_group {
            return Ok(choice);
        }
        let (rows, experts) = choice.dims2()?;
        let per_group = experts / n_group;
        let grouped = choice.reshape((rows, n_group, per_group))?;
        let best = grouped
            .sort_last_dim(false)?
            .0
            .narrow(2, 0, best_of.min(per_group))?;
        let group_scores = best.sum(2)?;
        let kept = group_scores
            .arg_sort_last_dim(false)?
            .narrow(1, 0, topk_group)?
            .contiguous()?;
        let ones = Tensor::ones((rows, topk_group), DType::F32, choice.device())?;
        let mask = Tensor::zeros((rows, n_group), DType::F32, choice.device())?
            .scatter_add(&kept, &ones, 1)?
            .unsqueeze(2)?
            .broadcast_as((rows, n_group, per_group))?
            .reshape((rows, experts))?;
        // Experts outside the kept groups rank below every score.
        let floor = (choice.min_keepdim(1)? - 1.0)?;
        (&choice * &mask)? + (1.0 - &mask)?.broadcast_mul(&floor)?
    }
}

/// Routes over the router's scores `scores` (`[rows, experts]`, f32, [`RouterKind::scores`]):
/// each row's `top_k` experts by [`RouterKind`]'s choice, with `bias` GLM-4.5's or ERNIE 4.5's correction of
/// it (the choice reads the values off the graph; the weights stay on it).
pub fn route(scores: &Tensor, kind: &RouterKind, bias: Option<&Tensor>) -> Result<Routing> {
    let (rows, num_experts) = scores.dims2()?;
    let top_k = kind.top_k;
    let chosen = kind
        .choice(scores, bias)?
        .arg_sort_last_dim(false)?
        .narrow(1, 0, top_k)?
        .contiguous()?;
    let mut weights = scores.gather(&chosen, 1)?;
    if kind.norm_topk_prob {
        weights = weights.broadcast_div(&weights.sum_keepdim(1)?)?;
    }
    if kind.scale() != 1.0 {
        weights = (weights * kind.scale())?;
    }
    let ids: Vec<u32> = chosen.flatten_all()?.to_vec1()?;
    let mut by_expert = vec![(Vec::new(), Vec::new()); num_experts];
    for (slot, &e) in ids.iter().enumerate() {
        let (rows_of, slots_of) = &mut by_expert[e as usize];
        rows_of.push((slot / top_k) as u32);
        slots_of.push(slot as u32);
    }
    debug_assert_eq!(ids.len(), rows * top_k);
    let device = scores.device();
    let experts = by_expert
        .into_iter()
        .map(|(r, s)| {
            (!r.is_empty())
                .then(|| {
                    Ok(ExpertRows {
                        rows: Tensor::new(r, device)?,
                        slots: Tensor::new(s, device)?,
                    })
                })
                .transpose()
        })
        .collect::<Result<_>>()?;
    Ok(Routing {
        chosen,
        weights,
        experts,
    })
}

/// The routers' load-balancing loss of one forward, as transformers' `load_balancing_loss_func`
/// computes it (Switch Transformer's; TRL's SFTTrainer adds it to the loss weighted by the
/// config's `router_aux_loss_coef`): over the real tokens of every mixture-of-experts layer,
/// `E · Σ_e (C_e / N) · (S_e / N)`, where `C_e` counts the top-k choices of expert `e`, `S_e`
/// sums its router probabilities, and `N` counts the rows (tokens times layers).
///
/// Each layer [`records`](Self::record) its probabilities as the forward runs, and routes its
/// gradient through [`Self::inject`] (or [`Self::probs_grad`] in a fused backward). Once the
/// forward is over, [`Self::finish`] gives the loss and the weight of its gradient, which the
/// backward adds to each layer's router probabilities: `w · E · C_e / N²` on each real row (the
/// counts are constants: the top-k choice has no gradient). A forward recomputed after
/// `finish` (gradient checkpointing) records nothing again.
pub struct LoadBalance {
    num_experts: usize,
    top_k: usize,
    /// `[batch, seq]` of the tokens the batch holds, row-major: 1 for a real token, 0 for
    /// padding.
    token_mask: Vec<f32>,
    batch: usize,
    state: Mutex<BalanceState>,
}

#[derive(Default)]
struct BalanceState {
    /// The rows' mask as the routers see them (`[rows]`, f32; virtual tokens in front of each
    /// sequence, prompt tuning's, are real) and its sum, made at the first layer.
    rows_mask: Option<(Tensor, f64)>,
    /// `C` and `S` over the layers so far (`[experts]`, f32).
    counts: Option<Tensor>,
    probs: Option<Tensor>,
    /// `N`.
    rows: f64,
    /// Set by [`LoadBalance::finish`]: `w · E / N²` and `C`.
    sealed: Option<(f64, Tensor)>,
}

impl LoadBalance {
    /// A loss over a batch whose real tokens `token_mask` marks (`[batch][seq]`).
    pub fn new(num_experts: usize, top_k: usize, token_mask: &[Vec<bool>]) -> Arc<Self> {
        let mask = token_mask
            .iter()
            .flatten()
            .map(|&real| if real { 1.0 } else { 0.0 })
            .collect();
        Arc::new(Self {
            num_experts,
            top_k,
            token_mask: mask,
            batch: token_mask.len(),
            state: Mutex::new(BalanceState::default()),
        })
    }

    fn state(&self) -> Result<std::sync::MutexGuard<'_, BalanceState>> {
        self.state
            .lock()
            .map_err(|_| candle_core::Error::Msg("load balance: poisoned lock".into()))
    }

    /// The mask of `rows` router rows and its sum: `batch` sequences, each with its virtual
    /// tokens (all real) in front of the batch's tokens.
    fn rows_mask(&self, rows: usize, device: &Device) -> Result<(Tensor, f64)> {
        let seq = self.token_mask.len() / self.batch.max(1);
        let per_row = rows / self.batch.max(1);
        if per_row * self.batch != rows || per_row < seq {
            candle_core::bail!(
                "load balance: {rows} router rows for a batch of {} x {seq} tokens",
                self.batch
            );
        }
        let mut mask = Vec::with_capacity(rows);
        for row in self.token_mask.chunks(seq.max(1)).take(self.batch) {
            mask.extend(std::iter::repeat_n(1f32, per_row - seq));
            mask.extend_from_slice(row);
        }
        let real = mask.iter().map(|&m| m as f64).sum();
        Ok((Tensor::from_vec(mask, rows, device)?, real))
    }

    /// Adds a layer's router probabilities `probs` (`[rows, experts]`, f32) and their top-k
    /// (the most probable, as transformers counts them: without a correction of the choice):
    /// nothing once finished.
    pub fn record(&self, probs: &Tensor) -> Result<()> {
        let mut st = self.state()?;
        if st.sealed.is_some() {
            return Ok(());
        }
        let (rows, experts) = probs.dims2()?;
        if experts != self.num_experts {
            candle_core::bail!(
                "load balance: router output {rows}x{experts} for {} experts",
                self.num_experts
            );
        }
        let chosen = probs
            .detach()
            .arg_sort_last_dim(false)?
            .narrow(1, 0, self.top_k)?
            .contiguous()?;
        let (mask, real) = match &st.rows_mask {
            Some((m, real)) if m.dim(0)? == rows => (m.clone(), *real),
            _ => {
                let m = self.rows_mask(rows, probs.device())?;
                st.rows_mask = Some(m.clone());
                m
            }
        };
        let picks = mask.unsqueeze(1)?.broadcast_as((rows, self.top_k))?;
        let counts = Tensor::zeros(experts, DType::F32, probs.device())?.scatter_add(
            &chosen.flatten_all()?,
            &picks.flatten_all()?,
            0,
        )?;
        let sums = probs.detach().broadcast_mul(&mask.unsqueeze(1)?)?.sum(0)?;
        st.rows += real;
        st.counts = Some(match st.counts.take() {
            Some(c) => (c + counts)?,
            None => counts,
        });
        st.probs = Some(match st.probs.take() {
            Some(p) => (p + sums)?,
            None => sums,
        });
        Ok(())
    }

    /// The loss of the layers recorded (an f32 scalar off the graph; `None` when none was),
    /// whose gradient the backward then adds with weight `weight`.
    pub fn finish(&self, weight: f64) -> Result<Option<Tensor>> {
        let mut st = self.state()?;
        let (Some(counts), Some(probs)) = (st.counts.clone(), st.probs.clone()) else {
            return Ok(None);
        };
        let (n, e) = (st.rows.max(1.0), self.num_experts as f64);
        let loss = ((counts.clone() * probs)?.sum_all()? * (e / (n * n)))?;
        st.sealed = Some((weight * e / (n * n), counts));
        Ok(Some(loss))
    }

    /// The loss's gradient with respect to a layer's router probabilities (`[rows, experts]`,
    /// f32), once finished; `None` before.
    pub fn probs_grad(&self, rows: usize) -> Result<Option<Tensor>> {
        let st = self.state()?;
        let (Some((factor, counts)), Some((mask, _))) = (&st.sealed, &st.rows_mask) else {
            return Ok(None);
        };
        if mask.dim(0)? != rows {
            candle_core::bail!(
                "load balance: {rows} rows where the forward had {}",
                mask.dim(0)?
            );
        }
        let grad = mask.unsqueeze(1)?.broadcast_mul(&counts.unsqueeze(0)?)?;
        Ok(Some((grad * *factor)?))
    }

    /// `probs` as it is, whose backward adds the loss's gradient ([`Self::probs_grad`]).
    pub fn inject(self: &Arc<Self>, probs: &Tensor) -> Result<Tensor> {
        let balance = self.clone();
        with_grad(probs, probs.detach(), move |_, _, grad| {
            match balance.probs_grad(grad.dim(0)?)? {
                Some(g) => grad + g.to_dtype(grad.dtype())?,
                None => Ok(grad.clone()),
            }
        })
    }
}

/// The frozen weights of one expert: gate and up `[inter, hidden]`, down `[hidden, inter]`,
/// and their biases where it has them (gpt-oss).
#[derive(Clone)]
pub struct ExpertWeights {
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
    pub biases: Option<[Tensor; 3]>,
}

/// `x · wᵀ (+ b)`, off the graph.
fn affine(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = frozen_matmul(x, w, true)?;
    match b {
        Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
        None => Ok(y),
    }
}

/// What the backward of one expert keeps.
struct ExpertSaved {
    rows: Tensor,
    slots: Tensor,
    /// The expert's weight of each of its rows, in the input's dtype, `[n, 1]`.
    weight: Tensor,
    gate_out: Tensor,
    up_out: Tensor,
    /// The expert's output before its weight, `[n, hidden]`.
    out: Tensor,
    kernel: bool,
}

/// A frozen router: its weight `[experts, hidden]`, gpt-oss's bias, GLM-4.5's and ERNIE
/// 4.5's correction bias of the choice, its kind, and whether its logits are computed in f32
/// (as transformers keeps those two routers).
pub struct FrozenRouter<'a> {
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub choice_bias: Option<&'a Tensor>,
    pub kind: RouterKind,
    pub in_f32: bool,
}

/// A mixture-of-experts block of frozen dense weights over `x` (`[..., hidden]`): `router`,
/// one [`ExpertWeights`] per expert. One autograd node; its backward returns dL/dx, the
/// experts' share and the router's (through the chosen scores, and through all of them for
/// `balance`'s loss).
pub fn frozen_moe(
    x: &Tensor,
    router: FrozenRouter,
    experts: &[ExpertWeights],
    act: GatedActivation,
    balance: Option<&Arc<LoadBalance>>,
) -> Result<Tensor> {
    let hidden = router.weight.dim(1)?;
    let rows = x.elem_count() / hidden;
    let dtype = x.dtype();
    let x2 = x.detach().reshape((rows, hidden))?;
    let kind = router.kind;
    let router_weight = match router.in_f32 {
        true => router.weight.to_dtype(DType::F32)?,
        false => router.weight.clone(),
    };
    let logits = affine(
        &x2.to_dtype(router_weight.dtype())?,
        &router_weight,
        router.bias,
    )?
    .to_dtype(DType::F32)?;
    let probs = kind.scores(&logits)?;
    let routing = route(&probs, &kind, router.choice_bias)?;
    if let Some(b) = balance {
        b.record(&probs)?;
    }
    let balance = balance.cloned();
    let flat_weights = routing.weights.flatten_all()?;
    let mut out = x2.zeros_like()?;
    let mut saved = Vec::new();
    for (e, served) in routing.experts.iter().enumerate() {
        let Some(served) = served else { continue };
        let w = &experts[e];
        let xe = x2.index_select(&served.rows, 0)?;
        let bias = |i: usize| w.biases.as_ref().map(|b| &b[i]);
        let gate_out = affine(&xe, &w.gate, bias(0))?;
        let up_out = affine(&xe, &w.up, bias(1))?;
        let (gated, kernel) = gated_value(&gate_out, &up_out, act)?;
        let ye = affine(&gated, &w.down, bias(2))?;
        let weight = flat_weights
            .index_select(&served.slots, 0)?
            .to_dtype(dtype)?
            .unsqueeze(1)?;
        out = out.index_add(&served.rows, &ye.broadcast_mul(&weight)?, 0)?;
        saved.push((
            e,
            ExpertSaved {
                rows: served.rows.clone(),
                slots: served.slots.clone(),
                weight,
                gate_out,
                up_out,
                out: ye,
                kernel,
            },
        ));
    }
    let out = out.reshape(x.shape())?;
    let experts = experts.to_vec();
    let Routing {
        chosen, weights, ..
    } = routing;
    with_grad(x, out, move |x, _, grad| {
        let d_out = grad.reshape((rows, hidden))?;
        let mut d_x = d_out.zeros_like()?;
        // dL/d(weight) of every (row, slot), flattened as the weights are.
        let mut d_weights = Tensor::zeros(rows * kind.top_k, DType::F32, grad.device())?;
        for (e, s) in &saved {
            let w = &experts[*e];
            let d_ye = d_out.index_select(&s.rows, 0)?;
            let d_weight = (d_ye.to_dtype(DType::F32)? * s.out.to_dtype(DType::F32)?)?.sum(1)?;
            d_weights = d_weights.index_add(&s.slots, &d_weight, 0)?;
            let d_gated = frozen_matmul(&d_ye.broadcast_mul(&s.weight)?, &w.down, false)?;
            let (d_g, d_u) = gated_grads(&s.gate_out, &s.up_out, &d_gated, act, s.kernel)?;
            let d_xe = (frozen_matmul(&d_g, &w.gate, false)? + frozen_matmul(&d_u, &w.up, false)?)?;
            d_x = d_x.index_add(&s.rows, &d_xe.to_dtype(d_x.dtype())?, 0)?;
        }
        // The weights are `scale · t / Σt` (or `scale · t`) of the chosen scores `t`.
        let scale = kind.scale();
        let mut d_top = (d_weights.reshape((rows, kind.top_k))? * scale)?;
        if kind.norm_topk_prob {
            // w = t / Σt: dL/dt = (dL/dw − Σ dL/dw · w) / Σt.
            let top = probs.gather(&chosen, 1)?;
            let dot = (&d_top * (&weights / scale)?)?.sum_keepdim(1)?;
            d_top = d_top
                .broadcast_sub(&dot)?
                .broadcast_div(&top.sum_keepdim(1)?)?;
        }
        let mut d_probs = probs.zeros_like()?.scatter_add(&chosen, &d_top, 1)?;
        if let Some(g) = balance
            .as_ref()
            .map(|b| b.probs_grad(rows))
            .transpose()?
            .flatten()
        {
            d_probs = (d_probs + g)?;
        }
        let d_logits = kind.scores_backward(&probs, &d_probs)?;
        let d_router_in = frozen_matmul(
            &d_logits.to_dtype(router_weight.dtype())?,
            &router_weight,
            false,
        )?;
        (d_x + d_router_in.to_dtype(dtype)?)?.reshape(x.shape())
    })
}

/// `sigmoid(gate) · x` (Qwen2-MoE's gated shared expert: `gate` `[..., 1]`, `x` `[..., hidden]`).
pub fn sigmoid_gated(gate: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (g, v) = (gate.detach(), x.detach());
    let s = candle_nn::ops::sigmoid(&g)?;
    let y = s.broadcast_mul(&v)?;
    let (g_tracks, x_tracks) = (gate.track_op(), x.track_op());
    // Third argument repeated: with_grad3 serves two inputs as well.
    crate::with_grad3((gate, x, x), y, move |_, grad| -> Result<Grads3> {
        let d_s = (grad * &v)?.sum_keepdim(D::Minus1)?;
        let d_g = (d_s * (&s * (1.0 - &s)?)?)?;
        let d_x = grad.broadcast_mul(&s)?;
        Ok((g_tracks.then_some(d_g), x_tracks.then_some(d_x), None))
    })
}
