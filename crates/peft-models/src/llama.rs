//! The Llama family decoder (Llama 2/3, Mistral, Qwen2/3, SmolLM2, Gemma 3; mixture-of-experts
//! Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss) with
//! autograd-friendly ops.
//!
//! Every projection is a [`Linear`] addressed by its HF module path
//! (`model.layers.3.self_attn.q_proj`), so tuners attach adapters by path, and the tensors of
//! the model are named exactly as in the HF checkpoint.

use crate::config::{LayerNorms, LlamaConfig, Moe, QkNorm};
use crate::loader::StoredTensor;
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use peft_ops::{
    add, add_bias, cast, causal_attention, causal_self_attention, checkpoint, embedding,
    frozen_linear, frozen_mlp, frozen_moe, gated_act, linear, lora_linear, lora_linears,
    narrow_last, packed_self_attention, param, permute_last, prefixed_self_attention,
    quantized_linear, reshape, rms_norm, rope, route, scale, sigmoid_gated, soft_cap,
    softmax_with_sinks, taped, ExpertWeights, FrozenRouter, GradSink, LinearWeight, LoadBalance,
    LoraProjection, QuantizedWeight,
};
use peft_quant::FourBit;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Something that replaces a linear layer's forward: LoRA, DoRA, IA3, ...
pub trait LinearAdapter: Send + Sync {
    fn forward(&self, base: &Linear, x: &Tensor, train: bool) -> candle_core::Result<Tensor>;

    /// `(A, B, scale)` when this pass of the adapter is plain LoRA (`x·Wᵀ + scale·x·Aᵀ·Bᵀ`:
    /// no DoRA, no dropout drawn), so that layers reading one input can share their products
    /// over it ([`peft_ops::lora_linears`]); `None` otherwise.
    fn low_rank(&self, _train: bool) -> Option<(Tensor, Tensor, f64)> {
        None
    }
}

/// Whether QLoRA quantizes the linear layer at `module_path` of a decoder layer: the
/// projections (`self_attn.q_proj`, `mlp.down_proj`) and the experts' (Mixtral's
/// `experts.0.w1` too); not `lm_head`, as bitsandbytes' loaders leave it, nor a
/// mixture-of-experts router or Qwen2-MoE's one-output shared expert gate.
pub fn quantized_in_qlora(module_path: &str) -> bool {
    module_path.ends_with("_proj") || module_path.contains(".experts.")
}

#[derive(Clone)]
pub struct Linear {
    /// `[out_features, in_features]`. Frozen unless it is a dense `Var` (modules_to_save, full
    /// fine-tuning); 4-bit quantized for QLoRA.
    pub weight: LinearWeight,
    pub bias: Option<Tensor>,
    pub adapter: Option<Arc<dyn LinearAdapter>>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: LinearWeight::Dense(weight),
            bias,
            adapter: None,
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims().1
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims().0
    }

    /// The shape of this layer's output for input `x`.
    pub fn output_shape(&self, x: &Tensor) -> Vec<usize> {
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.out_features();
        }
        dims
    }

    /// The layer without its adapter. A frozen weight gets no gradient computed.
    pub fn base_forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // A trained weight or bias (modules_to_save, bias) stays f32 under a bf16 model: it
        // computes in the input's dtype (`to_dtype` is a no-op when they agree), and its
        // gradient flows back through the cast.
        let y = match &self.weight {
            LinearWeight::Dense(w) => linear(x, &cast(&param(w), x.dtype())?)?,
            LinearWeight::Quantized(q) => quantized_linear(x, q)?,
        };
        match &self.bias {
            Some(b) => add_bias(&y, &cast(&param(b), y.dtype())?),
            None => Ok(y),
        }
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match &self.adapter {
            Some(a) => a.forward(self, x, train),
            None => self.base_forward(x),
        }
    }
}

/// Projections that read the same input: separate linears (q, k, v; gate, up), or one fused
/// linear whose output holds them side by side (Phi-3's `qkv_proj` and `gate_up_proj`).
#[derive(Clone)]
pub enum Projections<const N: usize> {
    Separate([Linear; N]),
    Fused(Linear),
}

impl<const N: usize> Projections<N> {
    /// The linears: N when separate, one when fused.
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            Self::Separate(ls) => ls.iter_mut().collect(),
            Self::Fused(l) => vec![l],
        }
    }

    /// The N outputs over `x`, of widths `widths`: a fused output is cut into them.
    fn outputs(
        &self,
        x: &Tensor,
        widths: [usize; N],
        sink: &Arc<GradSink>,
        train: bool,
    ) -> candle_core::Result<[Tensor; N]> {
        let fused = match self {
            Self::Separate(ls) => return forward_sharing_input(ls.each_ref(), x, sink, train),
            Self::Fused(l) => l.forward(x, train)?,
        };
        let mut start = 0;
        let parts = widths.map(|w| {
            let part = narrow_last(&fused, start, w);
            start += w;
            part
        });
        let mut out = Vec::with_capacity(N);
        for p in parts {
            out.push(p?);
        }
        out.try_into()
            .map_err(|_| candle_core::Error::Msg("fused projection: a part missing".into()))
    }
}

#[derive(Clone)]
pub struct Attention {
    /// q, k and v; with latent attention, the query projection (`q_proj` or `q_b_proj`),
    /// `kv_a_proj_with_mqa` and `kv_b_proj`.
    pub qkv: Projections<3>,
    /// Latent attention's other parts (see [`crate::config::LatentAttention`]).
    pub latent: Option<LatentParts>,
    pub o_proj: Linear,
    /// RMSNorm scales of queries and keys, applied before RoPE: per head `[head_dim]` (Qwen3,
    /// Gemma 3) or over the whole projection (OLMo 2).
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    /// gpt-oss's sink logit per head `[heads]` (`self_attn.sinks`).
    pub sinks: Option<Tensor>,
}

/// Latent attention's low-rank query projection (`q_a_proj`) with its norm
/// (`q_a_layernorm`), where it has one, and the norm of the keys' and values' latent
/// (`kv_a_layernorm`).
#[derive(Clone)]
pub struct LatentParts {
    pub q_a: Option<(Linear, Tensor)>,
    pub kv_a_norm: Tensor,
}

#[derive(Clone)]
pub struct Mlp {
    /// gate and up.
    pub gate_up: Projections<2>,
    pub down_proj: Linear,
}

impl Mlp {
    /// gate, up (or the fused gate_up) and down.
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = self.gate_up.linears_mut();
        out.push(&mut self.down_proj);
        out
    }

    /// The gate, up and down weights when all three are plain frozen dense weights (no
    /// adapter, bias or gradient): the MLP then runs as one fused op.
    fn frozen_weights(&self) -> Option<(Tensor, Tensor, Tensor)> {
        let frozen = |l: &Linear| frozen_weight(l).filter(|_| l.bias.is_none());
        let down = frozen(&self.down_proj)?;
        match &self.gate_up {
            Projections::Separate([gate, up]) => Some((frozen(gate)?, frozen(up)?, down)),
            Projections::Fused(gate_up) => {
                let w = frozen(gate_up)?;
                let i = w.dim(0).ok()? / 2;
                Some((w.narrow(0, 0, i).ok()?, w.narrow(0, i, i).ok()?, down))
            }
        }
    }
}

/// A linear layer's weight when it is a plain frozen dense weight with no adapter (its bias
/// aside).
fn frozen_weight(l: &Linear) -> Option<Tensor> {
    match (&l.weight, &l.adapter) {
        (LinearWeight::Dense(w), None) if !param(w).track_op() => Some(w.clone()),
        _ => None,
    }
}

/// A decoder layer's feed-forward block: one gated MLP, or a mixture of experts.
#[derive(Clone)]
pub enum FeedForward {
    Dense(Mlp),
    Sparse(SparseMoe),
}

/// A mixture-of-experts block (see [`Moe`]). Its router and experts are parameters, not linear
/// layers, to transformers 5: LoRA reaches them as HF PEFT's does, as changes of those
/// parameters ([`MoeDeltas`]); the shared expert (and Qwen2-MoE's gate of it) are linear
/// layers.
#[derive(Clone)]
pub struct SparseMoe {
    /// `[experts, hidden]` (`mlp.gate`).
    pub router: Linear,
    /// GLM-4.5's correction of the router's choice (`mlp.gate.e_score_correction_bias`,
    /// `[experts]`, f32).
    pub choice_bias: Option<Tensor>,
    pub experts: Vec<Mlp>,
    /// The shared expert, with Qwen2-MoE's gate of it (`mlp.shared_expert`,
    /// `mlp.shared_expert_gate`; GLM-4.5's `mlp.shared_experts`, ungated).
    pub shared: Option<(Mlp, Option<Linear>)>,
    /// LoRA on the router's and experts' parameters (HF PEFT's `target_parameters`).
    pub deltas: MoeDeltas,
}

/// A trained change of a weight (LoRA on a parameter): `[experts, out, in]`, one `[out, in]`
/// per expert (the router's: one, `[experts, hidden]`), whole (merge, the router) or as one
/// expert's factors (the forward: never `W + ΔW`).
pub trait WeightDelta: Send + Sync {
    fn delta(&self) -> candle_core::Result<Tensor>;

    /// Expert `e`'s change as its low-rank factors, on the graph.
    fn factors(&self, e: usize) -> candle_core::Result<LowRank>;
}

/// A change `scale · B · A` of an `[out, in]` weight: `A` `[r, in]`, `B` `[out, r]`.
pub struct LowRank {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

/// The changes of a mixture-of-experts block's parameters, as transformers 5 holds them: the
/// router's weight, the experts' gate and up projections stacked (`gate_up_proj`, `[experts,
/// 2 · size, hidden]`, gate first) and their down projections (`down_proj`).
#[derive(Clone, Default)]
pub struct MoeDeltas {
    pub router: Option<Arc<dyn WeightDelta>>,
    pub gate_up: Option<Arc<dyn WeightDelta>>,
    pub down: Option<Arc<dyn WeightDelta>>,
}

/// The experts' [`MoeDeltas`], whole, as a merge folds them in.
struct Deltas {
    gate_up: Option<Tensor>,
    down: Option<Tensor>,
}

impl Deltas {
    /// Expert `e`'s gate, up and down weights with their changes (`gate_up` cut into the two).
    fn expert_weights(&self, expert: &Mlp, e: usize) -> candle_core::Result<[Tensor; 3]> {
        let Projections::Separate([gate, up]) = &expert.gate_up else {
            candle_core::bail!("an expert with fused projections");
        };
        let size = gate.out_features();
        let gate_up = |start: usize| -> candle_core::Result<Option<Tensor>> {
            self.gate_up
                .as_ref()
                .map(|d| d.get(e)?.narrow(0, start, size))
                .transpose()
        };
        let down = self.down.as_ref().map(|d| d.get(e)).transpose()?;
        Ok([
            changed(gate, gate_up(0)?)?,
            changed(up, gate_up(size)?)?,
            changed(&expert.down_proj, down)?,
        ])
    }
}

/// A linear layer's weight plus `delta`, in the weight's dtype.
fn changed(lin: &Linear, delta: Option<Tensor>) -> candle_core::Result<Tensor> {
    let w = lin.weight.dense()?;
    match delta {
        Some(d) => &w + d.to_dtype(w.dtype())?,
        None => Ok(w),
    }
}

impl MoeDeltas {
    pub fn is_empty(&self) -> bool {
        self.router.is_none() && self.gate_up.is_none() && self.down.is_none()
    }

    fn touch_experts(&self) -> bool {
        self.gate_up.is_some() || self.down.is_some()
    }

    /// The router's weight with its change (in `dtype`), where it has one.
    fn router_weight(&self, router: &Linear, dtype: DType) -> candle_core::Result<Option<Tensor>> {
        self.router
            .as_ref()
            .map(|d| changed(router, Some(cast(&d.delta()?, dtype)?.squeeze(0)?)))
            .transpose()
    }

    /// The experts' changes whole, in `dtype`.
    fn experts_whole(&self, dtype: DType) -> candle_core::Result<Deltas> {
        let of = |d: &Option<Arc<dyn WeightDelta>>| {
            d.as_ref().map(|d| cast(&d.delta()?, dtype)).transpose()
        };
        Ok(Deltas {
            gate_up: of(&self.gate_up)?,
            down: of(&self.down)?,
        })
    }
}

impl SparseMoe {
    /// Folds the [`MoeDeltas`] into the router's and experts' weights, and drops them.
    pub fn merge_deltas(&mut self) -> Result<()> {
        // In f32, cast to each weight's dtype as it is added.
        let all = std::mem::take(&mut self.deltas);
        if let Some(w) = all.router_weight(&self.router, DType::F32)? {
            self.router.weight = LinearWeight::Dense(w.detach());
        }
        if all.touch_experts() {
            let deltas = all.experts_whole(DType::F32)?;
            for (e, expert) in self.experts.iter_mut().enumerate() {
                let changed = deltas.expert_weights(expert, e)?;
                for (lin, w) in expert.linears_mut().into_iter().zip(changed) {
                    lin.weight = LinearWeight::Dense(w.detach());
                }
            }
        }
        Ok(())
    }

    /// The router's and every expert's weights when all are plain frozen dense weights: the
    /// block then runs as one fused op.
    fn frozen_weights(&self) -> Option<(Tensor, Vec<ExpertWeights>)> {
        if !self.deltas.is_empty() {
            return None;
        }
        let router = frozen_weight(&self.router)?;
        if self
            .router
            .bias
            .as_ref()
            .is_some_and(|b| param(b).track_op())
        {
            return None;
        }
        let experts = self
            .experts
            .iter()
            .map(|m| {
                let Projections::Separate([gate, up]) = &m.gate_up else {
                    return None;
                };
                let linears = [gate, up, &m.down_proj];
                // gpt-oss's experts have biases (all three), frozen as their weights.
                let biases = match linears.map(|l| l.bias.clone()) {
                    [None, None, None] => None,
                    [Some(g), Some(u), Some(d)] => Some([g, u, d]),
                    _ => return None,
                };
                if let Some(b) = &biases {
                    if b.iter().any(|t| param(t).track_op()) {
                        return None;
                    }
                }
                Some(ExpertWeights {
                    gate: frozen_weight(gate)?,
                    up: frozen_weight(up)?,
                    down: frozen_weight(&m.down_proj)?,
                    biases,
                })
            })
            .collect::<Option<_>>()?;
        Some((router, experts))
    }
}

#[derive(Clone)]
pub struct DecoderLayer {
    /// The norms the config's [`LayerNorms`] names (Llama: input and post-attention; Gemma's
    /// `post_attention_layernorm` norms the attention output, as OLMo 2's does).
    pub input_layernorm: Option<Tensor>,
    pub self_attn: Attention,
    pub post_attention_layernorm: Tensor,
    pub pre_feedforward_layernorm: Option<Tensor>,
    pub post_feedforward_layernorm: Option<Tensor>,
    pub mlp: FeedForward,
    /// Bottleneck adapters on the attention and MLP outputs, before each residual add.
    pub attn_adapter: Option<Arc<dyn BlockAdapter>>,
    pub mlp_adapter: Option<Arc<dyn BlockAdapter>>,
}

impl DecoderLayer {
    /// The linear layers in the order of [`LlamaConfig::layer_linears`].
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let a = &mut self.self_attn;
        let mut out = Vec::new();
        if let Some((q_a, _)) = a.latent.as_mut().and_then(|l| l.q_a.as_mut()) {
            out.push(q_a);
        }
        out.extend(a.qkv.linears_mut());
        out.push(&mut a.o_proj);
        match &mut self.mlp {
            FeedForward::Dense(m) => out.extend(m.linears_mut()),
            FeedForward::Sparse(s) => {
                if let Some((shared, gate)) = &mut s.shared {
                    out.extend(shared.linears_mut());
                    out.extend(gate);
                }
            }
        }
        out
    }
}

/// Something that transforms a sublayer's output before the residual add (bottleneck adapters).
pub trait BlockAdapter: Send + Sync {
    fn forward(&self, h: &Tensor, train: bool) -> candle_core::Result<Tensor>;
}

/// Keys and values seen so far, per layer: `[batch, kv_heads, seq, head_dim]`.
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
        }
    }

    /// Positions held (the RoPE offset of the next token).
    pub fn seq_len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dims()[2])
            .unwrap_or(0)
    }

    /// Pre-fills layer `i` (prefix tuning's virtual keys and values).
    pub fn set(&mut self, i: usize, k: Tensor, v: Tensor) {
        self.layers[i] = Some((k, v));
    }

    /// Keeps the first `len` positions (a conversation's shared beginning), dropping the rest.
    pub fn truncate(&mut self, len: usize) -> candle_core::Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            let keep = len.min(k.dim(2)?);
            *k = k.narrow(2, 0, keep)?;
            *v = v.narrow(2, 0, keep)?;
        }
        Ok(())
    }
}

/// NEFTune (transformers' `neftune_noise_alpha`): in training, the input embeddings of a
/// batch padded to `seq` tokens get noise uniform in ±alpha / sqrt(seq · hidden), drawn anew
/// for every micro-batch from a seed the trainer sets (so a resumed run draws the same).
#[derive(Clone, Debug)]
pub struct Neftune {
    pub alpha: f64,
    seed: Arc<AtomicU64>,
}

impl Neftune {
    /// Random stream of the noise (apart from other draws of the same seed).
    const STREAM: u64 = 0x4E45_4654;

    pub fn new(alpha: f64) -> Result<Self> {
        if !(alpha.is_finite() && alpha > 0.0) {
            bail!("neftune_noise_alpha must be a number above 0, got {alpha}");
        }
        Ok(Self {
            alpha,
            seed: Arc::default(),
        })
    }

    /// Seed of the next training forward's noise.
    pub fn set_seed(&self, seed: u64) {
        self.seed.store(seed, Ordering::Relaxed);
    }

    fn perturb(&self, embeds: &Tensor) -> Result<Tensor> {
        let (_, seq, hidden) = embeds.dims3()?;
        let magnitude = (self.alpha / ((seq * hidden) as f64).sqrt()) as f32;
        let noise = peft_ops::random_uniform(
            self.seed.load(Ordering::Relaxed),
            Self::STREAM,
            embeds.dims(),
            (-magnitude, magnitude),
            embeds.dtype(),
            embeds.device(),
        )?;
        Ok(embeds.add(&noise)?)
    }
}

#[derive(Clone)]
pub struct Llama {
    pub config: LlamaConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: Tensor,
    /// `None` when the output projection is tied to `embed_tokens`.
    pub lm_head: Option<Linear>,
    pub dtype: DType,
    pub device: Device,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations.
    pub gradient_checkpointing: bool,
    /// Parameter gradients of the recomputed layers (see [`peft_ops::checkpoint`]).
    pub grad_sink: Arc<GradSink>,
    /// The routers' load-balancing loss the forwards record into meanwhile (see
    /// [`Llama::balancing`]).
    load_balance: Arc<Mutex<Option<Arc<LoadBalance>>>>,
    /// Noisy input embeddings in training.
    pub neftune: Option<Neftune>,
    /// Embedding rows replaced by trained ones (HF PEFT's trainable tokens).
    pub token_rows: Option<TokenRows>,
    /// LoRA on the input embedding.
    pub embedding_lora: Option<EmbeddingLora>,
    /// The embedding is not the one on disk: it grew here ([`Llama::grow_vocab`]) or came
    /// from an adapter that grew it. An adapter saved from this model carries it.
    pub vocab_grown: bool,
    inv_freq: Tensor,
    /// RoPE of the sliding-window layers where it differs (Gemma 3).
    local_inv_freq: Option<Tensor>,
    /// LongRoPE's frequencies for sequences past the pretrained length (Phi-3 128k).
    long_inv_freq: Option<Tensor>,
    /// Partial rotary's order of head dims (Phi-4-mini).
    rotary_order: Option<Arc<RotaryOrder>>,
    /// An image-text checkpoint's tensors outside the language model (vision tower,
    /// projector), left on disk; a saved model copies them.
    pub other_tensors: Vec<StoredTensor>,
}

/// LoRA on the input embedding, as HF PEFT's `lora.Embedding`: each token's row gains
/// `scaling · B · A[:, token]` (`lora_embedding_A` `[r, vocab]`, `lora_embedding_B`
/// `[hidden, r]`), before Gemma's scaling of the embeddings, which so scales both, as HF PEFT
/// scales them. A tied head reads the embedding as it was (HF PEFT's reads the base weight).
#[derive(Clone)]
pub struct EmbeddingLora {
    pub a: Var,
    pub b: Var,
    pub scaling: f64,
}

impl EmbeddingLora {
    /// The change to the rows of token ids `[n]`: `[n, hidden]`, in f32.
    fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        let columns = self.a.as_tensor().t()?.contiguous()?.index_select(ids, 0)?;
        Ok((columns.matmul(&self.b.as_tensor().t()?)? * self.scaling)?)
    }

    /// The change to the embedding weight `[vocab, hidden]` that a merge adds:
    /// `scaling · (B·A)ᵀ`.
    pub fn delta(&self) -> Result<Tensor> {
        let product = self.b.as_tensor().matmul(self.a.as_tensor())?;
        Ok((product.t()? * self.scaling)?)
    }
}

/// Rows of the embedding that replace the model's own for some tokens, as HF PEFT's trainable
/// tokens (`trainable_token_indices`) do: in the input embedding and, where the head is tied
/// to it, in the head.
#[derive(Clone)]
pub struct TokenRows {
    /// The tokens, distinct, each below the vocabulary size.
    pub indices: Vec<u32>,
    /// `[indices.len(), hidden]`, a variable in training.
    pub rows: Tensor,
}

impl TokenRows {
    /// The rows `rows` (`[n, hidden]`, embedding rows of the positions' tokens `ids` `[n]`) with
    /// those of the replaced tokens swapped for theirs.
    fn replace_in(&self, rows: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
        let slot: HashMap<u32, u32> = self
            .indices
            .iter()
            .zip(0u32..)
            .map(|(&t, i)| (t, i))
            .collect();
        let none = self.indices.len() as u32;
        let slots: Vec<u32> = ids
            .to_vec1::<u32>()?
            .iter()
            .map(|t| slot.get(t).copied().unwrap_or(none))
            .collect();
        if slots.iter().all(|&s| s == none) {
            return Ok(rows.clone());
        }
        let keep: Vec<f32> = slots.iter().map(|&s| f32::from(s == none)).collect();
        let n = slots.len();
        let keep = Tensor::from_vec(keep, (n, 1), rows.device())?.to_dtype(rows.dtype())?;
        let own = self.rows.to_dtype(rows.dtype())?;
        let padded = Tensor::cat(&[&own, &own.narrow(0, 0, 1)?.zeros_like()?], 0)?;
        let slots = Tensor::from_vec(slots, n, rows.device())?;
        rows.broadcast_mul(&keep)? + padded.index_select(&slots, 0)?
    }

    /// The replaced tokens `[n]` and how their rows differ from `weight`'s `[n, hidden]`.
    fn changes_from(&self, weight: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let ids = Tensor::new(self.indices.as_slice(), weight.device())?;
        let change = (self.rows.to_dtype(weight.dtype())? - weight.index_select(&ids, 0)?)?;
        Ok((ids, change))
    }

    /// `weight` `[vocab, hidden]` with the replaced rows.
    fn replace_rows_of(&self, weight: &Tensor) -> candle_core::Result<Tensor> {
        let (ids, change) = self.changes_from(weight)?;
        weight.index_add(&ids, &change, 0)
    }
}

struct WeightTaker<'a> {
    weights: &'a mut HashMap<String, Tensor>,
    quantized: HashMap<String, Arc<QuantizedWeight>>,
}

impl WeightTaker<'_> {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .weights
            .remove(name)
            .with_context(|| format!("model weights lack {name}"))?;
        if t.dims() != shape {
            bail!("{name} has shape {:?}, expected {shape:?}", t.dims());
        }
        Ok(t)
    }

    fn linear(&mut self, path: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let name = format!("{path}.weight");
        let weight = match self.quantized.remove(&name) {
            Some(q) => {
                let dims = (q.out_features, q.in_features);
                if dims != (out, inp) {
                    bail!("{name} has shape {dims:?}, expected {:?}", (out, inp));
                }
                LinearWeight::Quantized(q)
            }
            None => LinearWeight::Dense(self.take(&name, &[out, inp])?),
        };
        let bias = if bias {
            Some(self.take(&format!("{path}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            adapter: None,
        })
    }

    /// The router and experts of layer `layer_path`'s mixture-of-experts block.
    fn sparse_moe(
        &mut self,
        layer_path: &str,
        moe: &Moe,
        hidden: usize,
        shared: Option<(Mlp, Option<Linear>)>,
    ) -> Result<SparseMoe> {
        let router_path = format!("{layer_path}.{}", moe.router_path());
        let bias = moe.biases;
        let router = self.linear(&router_path, moe.num_experts, hidden, bias)?;
        let choice_bias = moe
            .choice_bias
            .map(|cb| {
                // As on disk, or as a vector (a GGUF file's).
                let name = format!("{layer_path}.{}", cb.path());
                let e = moe.num_experts;
                let t = match self.weights.get(&name).map(|t| t.dims().to_vec()) {
                    Some(dims) if dims == [e] => self.take(&name, &[e])?,
                    _ => self.take(&name, &cb.shape(e))?,
                };
                t.reshape(e)?
                    .to_dtype(DType::F32)
                    .map_err(anyhow::Error::from)
            })
            .transpose()?;
        let size = moe.expert_size;
        let experts = (0..moe.num_experts)
            .map(|e| {
                let [gate, up, down] = moe.expert_paths(e).map(|n| format!("{layer_path}.{n}"));
                Ok(Mlp {
                    gate_up: Projections::Separate([
                        self.linear(&gate, size, hidden, bias)?,
                        self.linear(&up, size, hidden, bias)?,
                    ]),
                    down_proj: self.linear(&down, hidden, size, bias)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(SparseMoe {
            router,
            choice_bias,
            experts,
            shared,
            deltas: MoeDeltas::default(),
        })
    }
}

impl Llama {
    pub fn from_weights(
        config: LlamaConfig,
        weights: HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::from_loaded(config, weights, HashMap::new(), device, dtype)
    }

    /// A model of dense `weights` and of linear weights `quantized` as they were loaded
    /// ([`crate::loader::QuantizeOnLoad`]); norms of a quantized model are made f32 as
    /// [`Llama::quantize`] makes them.
    pub fn from_loaded(
        config: LlamaConfig,
        mut weights: HashMap<String, Tensor>,
        quantized: HashMap<String, Arc<QuantizedWeight>>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let was_quantized = !quantized.is_empty();
        let c = &config;
        let h = c.hidden_size;
        let mut w = WeightTaker {
            weights: &mut weights,
            quantized,
        };
        let decoder = c.decoder_path();
        let embed_tokens = w.take(
            &format!("{decoder}.embed_tokens.weight"),
            &[c.vocab_size, h],
        )?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("{decoder}.layers.{l}");
            let linears = c.layer_linears(l);
            // The layer's linears in the order of `layer_linears`, which is the struct's.
            let mut taken = Vec::with_capacity(linears.len());
            for lin in &linears {
                taken.push(w.linear(&format!("{p}.{}", lin.name), lin.out, lin.inp, lin.bias)?);
            }
            let mut taken = taken.into_iter();
            let mut next = || taken.next().context("a decoder layer lacks a linear layer");
            let q_a = match c.latent_attention.and_then(|m| m.q_lora_rank) {
                Some(r) => {
                    let norm = w.take(&format!("{p}.self_attn.q_a_layernorm.weight"), &[r])?;
                    Some((next()?, norm))
                }
                None => None,
            };
            let (qkv, o_proj) = match c.fused_projections {
                true => (Projections::Fused(next()?), next()?),
                false => (Projections::Separate([next()?, next()?, next()?]), next()?),
            };
            let latent = match c.latent_attention {
                Some(m) => Some(LatentParts {
                    q_a,
                    kv_a_norm: w.take(
                        &format!("{p}.self_attn.kv_a_layernorm.weight"),
                        &[m.kv_lora_rank],
                    )?,
                }),
                None => None,
            };
            let mut mlp = || -> Result<Mlp> {
                let gate_up = match c.fused_projections {
                    true => Projections::Fused(next()?),
                    false => Projections::Separate([next()?, next()?]),
                };
                let down_proj = next()?;
                Ok(Mlp { gate_up, down_proj })
            };
            let mlp = match c.sparse_moe(l) {
                None => FeedForward::Dense(mlp()?),
                Some(moe) => {
                    let gated = moe.shared_expert_paths().1.is_some();
                    let shared = match moe.shared_expert_size {
                        Some(_) => Some((mlp()?, gated.then(&mut next).transpose()?)),
                        None => None,
                    };
                    FeedForward::Sparse(w.sparse_moe(&p, moe, h, shared)?)
                }
            };
            let (q_norm, k_norm) = match c.qk_norm_sizes() {
                Some([q, k]) => (
                    Some(w.take(&format!("{p}.self_attn.q_norm.weight"), &[q])?),
                    Some(w.take(&format!("{p}.self_attn.k_norm.weight"), &[k])?),
                ),
                None => (None, None),
            };
            let sinks = c
                .attention_sinks
                .then(|| w.take(&format!("{p}.self_attn.sinks"), &[c.num_attention_heads]))
                .transpose()?;
            let mut layer_norm = |name: &str| -> Result<Option<Tensor>> {
                c.norms
                    .names()
                    .contains(&name)
                    .then(|| w.take(&format!("{p}.{name}.weight"), &[h]))
                    .transpose()
            };
            let input_layernorm = layer_norm("input_layernorm")?;
            let pre_feedforward_layernorm = layer_norm("pre_feedforward_layernorm")?;
            let post_feedforward_layernorm = layer_norm("post_feedforward_layernorm")?;
            layers.push(DecoderLayer {
                input_layernorm,
                self_attn: Attention {
                    qkv,
                    latent,
                    o_proj,
                    q_norm,
                    k_norm,
                    sinks,
                },
                post_attention_layernorm: w
                    .take(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                pre_feedforward_layernorm,
                post_feedforward_layernorm,
                mlp,
                attn_adapter: None,
                mlp_adapter: None,
            });
        }
        let norm = w.take(&format!("{decoder}.norm.weight"), &[h])?;
        // Some tied checkpoints still store lm_head.weight (PyTorch's files keep both): as
        // transformers 5 loads them, the head is tied where it equals the embedding and its
        // own where it differs (the config then is wrong about the checkpoint).
        let stored_head = match c.tie_word_embeddings {
            true => w.weights.remove("lm_head.weight"),
            false => None,
        };
        let untied_by_checkpoint = match &stored_head {
            Some(head) if head.dims() == embed_tokens.dims() => {
                let differ = head.ne(&embed_tokens)?.to_dtype(DType::F32)?.max_all()?;
                differ.to_scalar::<f32>()? > 0.0
            }
            _ => false,
        };
        let lm_head = match (c.tie_word_embeddings, stored_head) {
            (true, Some(head)) if untied_by_checkpoint => Some(Linear::new(head, None)),
            (true, _) => None,
            (false, _) => Some(w.linear("lm_head", c.vocab_size, h, false)?),
        };
        let inv_freq = Tensor::new(c.rope_inv_freq(), device)?;
        let long_inv_freq = c
            .long_rope_inv_freq()
            .map(|f| Tensor::new(f, device))
            .transpose()?;
        let local_inv_freq = c
            .local_rope_inv_freq()
            .map(|f| Tensor::new(f, device))
            .transpose()?;
        let heads = c.num_attention_heads;
        let rotary_order = match (c.rope_interleaved, c.rotary_dim < c.head_dim) {
            (true, _) => Some(Arc::new(RotaryOrder::interleaved(
                heads, c.head_dim, device,
            )?)),
            (false, true) => {
                let order = RotaryOrder::new(heads, c.head_dim, c.rotary_dim, device)?;
                Some(Arc::new(order))
            }
            (false, false) => None,
        };
        let mut model = Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            dtype,
            device: device.clone(),
            gradient_checkpointing: false,
            grad_sink: Arc::new(GradSink::default()),
            load_balance: Arc::default(),
            neftune: None,
            token_rows: None,
            embedding_lora: None,
            vocab_grown: false,
            inv_freq,
            local_inv_freq,
            long_inv_freq,
            rotary_order,
            other_tensors: Vec::new(),
        };
        if untied_by_checkpoint {
            model.mark_untied();
        }
        if was_quantized {
            model.norms_in_f32()?;
        }
        Ok(model)
    }

    /// Every linear layer with its HF module path, in checkpoint order: what adapters target
    /// (mixture-of-experts routers and experts are in [`Llama::expert_linears_mut`]).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let decoder = self.config.decoder_path();
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let linears = self.config.layer_linears(l);
            let paths = linears
                .iter()
                .map(|lin| format!("{decoder}.layers.{l}.{}", lin.name));
            let layer_linears = layer.linears_mut();
            debug_assert_eq!(
                layer_linears.len(),
                linears.len(),
                "layer_linears and the layer"
            );
            out.extend(paths.zip(layer_linears));
        }
        if let Some(head) = &mut self.lm_head {
            out.push(("lm_head".to_string(), head));
        }
        out
    }

    /// The routers and experts of the mixture-of-experts blocks with their module paths
    /// in the checkpoint (`model.layers.0.mlp.gate`, `model.layers.0.mlp.experts.3.down_proj`):
    /// no linear layers to transformers 5, which module targets select; LoRA reaches them as
    /// parameters ([`MoeDeltas`]).
    pub fn expert_linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let decoder = self.config.decoder_path();
        let mut out = Vec::new();
        let Some(moe) = &self.config.moe else {
            return out;
        };
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let FeedForward::Sparse(s) = &mut layer.mlp else {
                continue;
            };
            let p = format!("{decoder}.layers.{l}");
            out.push((format!("{p}.{}", moe.router_path()), &mut s.router));
            for (e, expert) in s.experts.iter_mut().enumerate() {
                let paths = moe.expert_paths(e).map(|n| format!("{p}.{n}"));
                out.extend(paths.into_iter().zip(expert.linears_mut()));
            }
        }
        out
    }

    /// Every RMSNorm scale with its checkpoint name: per layer the input and post-attention
    /// norms (Gemma 3's pre- and post-feedforward norms, Qwen3's and Gemma 3's query and key
    /// norms), then the final norm.
    pub fn norms_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let decoder = self.config.decoder_path();
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("{decoder}.layers.{l}");
            if let Some(w) = &mut layer.input_layernorm {
                out.push((format!("{p}.input_layernorm.weight"), w));
            }
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                &mut layer.post_attention_layernorm,
            ));
            if let Some(w) = &mut layer.pre_feedforward_layernorm {
                out.push((format!("{p}.pre_feedforward_layernorm.weight"), w));
            }
            if let Some(w) = &mut layer.post_feedforward_layernorm {
                out.push((format!("{p}.post_feedforward_layernorm.weight"), w));
            }
            let a = &mut layer.self_attn;
            if let Some(latent) = &mut a.latent {
                if let Some((_, q_a_norm)) = &mut latent.q_a {
                    out.push((format!("{p}.self_attn.q_a_layernorm.weight"), q_a_norm));
                }
                let kv_a_norm = &mut latent.kv_a_norm;
                out.push((format!("{p}.self_attn.kv_a_layernorm.weight"), kv_a_norm));
            }
            if let Some(q) = &mut a.q_norm {
                out.push((format!("{p}.self_attn.q_norm.weight"), q));
            }
            if let Some(k) = &mut a.k_norm {
                out.push((format!("{p}.self_attn.k_norm.weight"), k));
            }
        }
        out.push((format!("{decoder}.norm.weight"), &mut self.norm));
        out
    }

    /// The base model's tensors under their checkpoint names (adapters excluded); quantized
    /// weights are dequantized.
    pub fn named_tensors(&mut self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(self.embedding_name(), self.embed_tokens.clone())];
        for (name, norm) in self.norms_mut() {
            out.push((name, norm.clone()));
        }
        for (path, lin) in self.linears_mut() {
            out.push((format!("{path}.weight"), lin.weight.dense()?));
            if let Some(b) = &lin.bias {
                out.push((format!("{path}.bias"), b.clone()));
            }
        }
        for (path, lin) in self.expert_linears_mut() {
            out.push((format!("{path}.weight"), lin.weight.dense()?));
            if let Some(b) = &lin.bias {
                out.push((format!("{path}.bias"), b.clone()));
            }
        }
        out.extend(self.attention_sinks());
        out.extend(self.choice_biases()?);
        Ok(out)
    }

    /// GLM-4.5's and ERNIE 4.5's corrections of their routers' choices with their checkpoint
    /// names and shapes (`model.layers.1.mlp.gate.e_score_correction_bias`).
    pub fn choice_biases(&self) -> Result<Vec<(String, Tensor)>> {
        let decoder = self.config.decoder_path();
        let Some(cb) = self.config.moe.as_ref().and_then(|m| m.choice_bias) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let FeedForward::Sparse(s) = &layer.mlp else {
                continue;
            };
            if let Some(b) = &s.choice_bias {
                let name = format!("{decoder}.layers.{l}.{}", cb.path());
                out.push((name, b.reshape(cb.shape(b.elem_count()))?));
            }
        }
        Ok(out)
    }

    /// gpt-oss's attention sinks with their checkpoint names (`model.layers.0.self_attn.sinks`).
    pub fn attention_sinks(&self) -> Vec<(String, Tensor)> {
        let decoder = self.config.decoder_path();
        let layers = self.layers.iter().enumerate();
        layers
            .filter_map(|(l, layer)| {
                let sinks = layer.self_attn.sinks.clone()?;
                Some((format!("{decoder}.layers.{l}.self_attn.sinks"), sinks))
            })
            .collect()
    }

    /// Module paths of the weights outside the language model of an image-text checkpoint
    /// (`model.vision_tower.encoder.layers.0.self_attn.q_proj`, ...): what HF PEFT's
    /// `target_modules` may also name there.
    pub fn other_module_paths(&self) -> Vec<String> {
        self.other_tensors
            .iter()
            .filter_map(|t| t.name.strip_suffix(".weight"))
            .map(crate::loader::other_part_name)
            .collect()
    }

    /// The parts of an image-text model beside its language model (`vision_tower`,
    /// `multi_modal_projector`, ...), sorted; none for a causal LM.
    pub fn other_parts(&self) -> Vec<String> {
        let mut parts: Vec<String> = self
            .other_module_paths()
            .iter()
            .filter_map(|p| p.split('.').nth(1).map(str::to_string))
            .collect();
        parts.sort();
        parts.dedup();
        parts
    }

    /// Parameters of an image-text model's parts left on disk (its vision tower); 0 for a
    /// causal LM.
    pub fn other_parameter_count(&self) -> usize {
        self.other_tensors.iter().map(|t| t.elements).sum()
    }

    /// Checkpoint name of the input embedding's weight.
    pub fn embedding_name(&self) -> String {
        format!("{}.embed_tokens.weight", self.config.decoder_path())
    }

    /// Parameters of the base model (a quantized weight counts its unquantized size; an
    /// image-text model's vision tower counts too, as HF PEFT counts it).
    pub fn parameter_count(&mut self) -> usize {
        let norms: usize = self.norms_mut().iter().map(|(_, t)| t.elem_count()).sum();
        let mut n = self.embed_tokens.elem_count() + norms + self.other_parameter_count();
        for (_, lin) in self.linears_mut() {
            let (o, i) = lin.weight.dims();
            n += o * i + lin.bias.as_ref().map_or(0, |b| b.elem_count());
        }
        for (_, lin) in self.expert_linears_mut() {
            let (o, i) = lin.weight.dims();
            n += o * i + lin.bias.as_ref().map_or(0, |b| b.elem_count());
        }
        let sinks: usize = self
            .attention_sinks()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum();
        n + sinks
    }

    /// Full fine-tuning: every tensor of the model (embeddings, norms, linear weights and
    /// biases) becomes a trainable variable. Returns them under their checkpoint names, sorted;
    /// a tied output head is the embedding and appears once.
    pub fn make_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        let quantized =
            |ls: Vec<(String, &mut Linear)>| ls.iter().any(|(_, l)| l.weight.is_quantized());
        if quantized(self.linears_mut()) || quantized(self.expert_linears_mut()) {
            bail!("full fine-tuning needs dense weights; this model is quantized");
        }
        if self.config.attention_sinks || self.config.moe.as_ref().is_some_and(|m| m.biases) {
            bail!(
                "full fine-tuning of {} (its attention sinks and experts' biases) is not supported; train an adapter (LoRA, with target_parameters for the experts)",
                self.config.model_type
            );
        }
        let mut vars = Vec::new();
        let mut var = |name: String, t: &mut Tensor| -> Result<()> {
            let v = Var::from_tensor(t)?;
            *t = v.as_tensor().clone();
            vars.push((name, v));
            Ok(())
        };
        var(self.embedding_name(), &mut self.embed_tokens)?;
        for (name, norm) in self.norms_mut() {
            var(name, norm)?;
        }
        for (path, lin) in self.linears_mut() {
            if let LinearWeight::Dense(w) = &mut lin.weight {
                var(format!("{path}.weight"), w)?;
            }
            if let Some(b) = &mut lin.bias {
                var(format!("{path}.bias"), b)?;
            }
        }
        for (path, lin) in self.expert_linears_mut() {
            if let LinearWeight::Dense(w) = &mut lin.weight {
                var(format!("{path}.weight"), w)?;
            }
        }
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(vars)
    }

    /// Replaces the weight of every decoder linear that [`quantized_in_qlora`] names (not a
    /// trained one: `modules_to_save`) with its 4-bit quantization; matmuls then run in
    /// `compute_dtype`. The norm weights become f32 (`norms_in_f32`).
    pub fn quantize(
        &mut self,
        kind: FourBit,
        double_quant: bool,
        compute_dtype: DType,
    ) -> Result<()> {
        let quantize = |linears: Vec<(String, &mut Linear)>| -> Result<()> {
            for (path, lin) in linears {
                if let LinearWeight::Dense(w) = &lin.weight {
                    if w.is_variable() || !quantized_in_qlora(&path) {
                        continue;
                    }
                    let q = QuantizedWeight::quantize(w, kind, double_quant, compute_dtype)?;
                    lin.weight = LinearWeight::Quantized(Arc::new(q));
                }
            }
            Ok(())
        };
        quantize(self.linears_mut())?;
        quantize(self.expert_linears_mut())?;
        self.norms_in_f32()
    }

    /// The norm weights of a quantized model in f32, as `prepare_model_for_kbit_training`
    /// casts them (RMSNorm then computes in f32 whatever the activations' dtype).
    fn norms_in_f32(&mut self) -> Result<()> {
        for (_, norm) in self.norms_mut() {
            *norm = norm.to_dtype(DType::F32)?;
        }
        Ok(())
    }

    /// Gives a tied model an output head of its own, a copy of the embedding (what HF PEFT's
    /// `modules_to_save` wrapper does to a tied head or embedding): either can then train
    /// without the other, and a saved model says it is no longer tied.
    pub fn untie_head(&mut self) -> Result<()> {
        if self.lm_head.is_none() {
            self.lm_head = Some(Linear::new(self.embed_tokens.detach().copy()?, None));
            self.mark_untied();
        }
        Ok(())
    }

    /// Records in the config (and the config files a saved model writes) that the head is
    /// not tied to the embedding.
    fn mark_untied(&mut self) {
        self.config.tie_word_embeddings = false;
        for file in self.config.files_mut() {
            file.insert("tie_word_embeddings".into(), false.into());
        }
    }

    /// Grows the vocabulary to `size` tokens for tokens added to the tokenizer, as transformers'
    /// `resize_token_embeddings` (with TRL's multiple of 64): the new rows of the embedding and
    /// of an untied head start as the mean of the old ones (transformers draws them around it).
    pub fn grow_vocab(&mut self, size: usize) -> Result<()> {
        let vocab = self.config.vocab_size;
        if size <= vocab {
            return Ok(());
        }
        let grown = |w: &Tensor| -> Result<Tensor> {
            let mean = w.to_dtype(DType::F32)?.mean_keepdim(0)?;
            let rows = mean
                .broadcast_as((size - vocab, w.dim(1)?))?
                .to_dtype(w.dtype())?;
            Ok(Tensor::cat(&[w, &rows], 0)?)
        };
        let embed = grown(&self.embed_tokens)?;
        let head = match &self.lm_head {
            Some(lin) => Some(grown(&lin.weight.dense()?)?),
            None => None,
        };
        self.replace_embeddings(&embed, head.as_ref())?;
        self.vocab_grown = true;
        Ok(())
    }

    /// Takes the embedding (and an untied head) that a fine-tuned model saved, at its vocabulary
    /// size, which may have grown (transformers' `resize_token_embeddings`: tokens added for a
    /// chat template). A tied head reads the new embedding; `head` is then the same tensor.
    pub fn replace_embeddings(&mut self, embed: &Tensor, head: Option<&Tensor>) -> Result<()> {
        let (vocab, hidden) = embed.dims2()?;
        if hidden != self.config.hidden_size {
            bail!(
                "an embedding of width {hidden} for a model of hidden size {}",
                self.config.hidden_size
            );
        }
        let like = |t: &Tensor, of: &Tensor| -> Result<Tensor> {
            Ok(t.to_device(of.device())?.to_dtype(of.dtype())?)
        };
        if let Some(lin) = &mut self.lm_head {
            match head {
                Some(h) if h.dims() == [vocab, hidden] => {
                    lin.weight = LinearWeight::Dense(like(h, &lin.weight.dense()?)?);
                }
                Some(h) => bail!(
                    "an output head of shape {:?} for an embedding of {:?}",
                    h.dims(),
                    embed.dims()
                ),
                None if vocab != self.config.vocab_size => bail!(
                    "the embedding has {vocab} tokens, but no output head of that size came with it"
                ),
                None => {}
            }
        }
        self.embed_tokens = like(embed, &self.embed_tokens)?;
        self.config.vocab_size = vocab;
        if let Some(raw) = self.config.raw.as_object_mut() {
            raw.insert("vocab_size".into(), vocab.into());
        }
        Ok(())
    }

    /// Writes the replaced token rows into the embedding (a tied head reads them from there)
    /// and forgets them: the merge of trainable tokens.
    pub fn merge_token_rows(&mut self) -> Result<()> {
        if let Some(t) = self.token_rows.take() {
            let embed = self.embed_tokens.detach();
            self.embed_tokens = t.replace_rows_of(&embed)?.detach();
        }
        Ok(())
    }

    /// Output projection weight `[vocab, hidden]` (the embedding when tied, with its replaced
    /// token rows; never quantized).
    pub fn lm_head_weight(&self) -> candle_core::Result<Tensor> {
        match (&self.lm_head, &self.token_rows) {
            (Some(l), _) => Ok(param(&l.weight.dense()?)),
            (None, None) => Ok(param(&self.embed_tokens)),
            (None, Some(t)) => t.replace_rows_of(&param(&self.embed_tokens)),
        }
    }

    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let flat = input_ids.flatten_all()?.to_dtype(DType::U32)?;
        let rows = self.embedding_rows(&flat)?;
        Ok(rows.reshape((b, t, self.config.hidden_size))?)
    }

    /// Whether feeding `new` positions after `past` cached ones crosses LongRoPE's original
    /// context, where its factors change: keys cached before were rotated by the others.
    pub fn rope_switches(&self, past: usize, new: usize) -> bool {
        self.config.longrope.as_ref().is_some_and(|l| {
            let original = l.original_max_position_embeddings;
            past <= original && past + new > original
        })
    }

    /// The embeddings of `input_ids` that the decoder reads: in training with NEFTune, plus
    /// its noise.
    pub fn input_embeds(&self, input_ids: &Tensor, train: bool) -> Result<Tensor> {
        let embeds = self.embed(input_ids)?;
        match &self.neftune {
            Some(neftune) if train => neftune.perturb(&embeds),
            _ => Ok(embeds),
        }
    }

    /// The embeddings of token ids `[n]` as the model's embedding layer gives them `[n,
    /// hidden]`: Gemma's scaled by `sqrt(hidden_size)`, rounded to the embedding's dtype as
    /// transformers rounds it.
    pub fn embedding_rows(&self, ids: &Tensor) -> Result<Tensor> {
        // A trained embedding (modules_to_save) is f32 under a bf16 model.
        let mut rows = embedding(&param(&self.embed_tokens), ids)?;
        if let Some(t) = &self.token_rows {
            rows = t.replace_in(&rows, ids)?;
        }
        if let Some(lora) = &self.embedding_lora {
            rows = (rows.to_dtype(DType::F32)? + lora.rows(ids)?)?;
        }
        if self.config.scale_embeddings {
            let scale = (self.config.hidden_size as f64).sqrt() as f32;
            let scale = Tensor::new(scale, rows.device())?.to_dtype(rows.dtype())?;
            rows = rows.broadcast_mul(&scale)?;
        }
        Ok(rows.to_dtype(self.dtype)?)
    }

    /// cos/sin tables `[positions.., head_dim / 2]` for the given positions: the values of the
    /// model's dtype (as transformers rounds them), held in f32, which the flash attention
    /// kernels read as they are, once for all layers. `scale` multiplies cos and sin (LongRoPE's
    /// and YaRN's attention factor).
    fn rope_tables(
        &self,
        positions: &Tensor,
        inv_freq: &Tensor,
        scale: f64,
    ) -> Result<(Tensor, Tensor)> {
        let shape = positions.dims().to_vec();
        let pos = positions.flatten_all()?.to_dtype(DType::F32)?;
        let theta = pos.unsqueeze(1)?.broadcast_mul(&inv_freq.unsqueeze(0)?)?;
        let mut out_shape = shape;
        out_shape.push(inv_freq.dim(0)?);
        // The scale applies (in f32, before the rounding) to the rotated pairs; the others
        // (partial rotary) keep cos 1, sin 0.
        let columns = match scale == 1.0 {
            true => None,
            false => {
                let rotated = self.config.rotary_dim / 2;
                let columns: Vec<f32> = (0..inv_freq.dim(0)?)
                    .map(|i| if i < rotated { scale as f32 } else { 1.0 })
                    .collect();
                Some(Tensor::new(columns, inv_freq.device())?)
            }
        };
        let table = |t: Tensor, shape: Vec<usize>| -> Result<Tensor> {
            let t = match &columns {
                Some(columns) => t.broadcast_mul(columns)?,
                None => t,
            };
            Ok(t.reshape(shape)?
                .to_dtype(self.dtype)?
                .to_dtype(DType::F32)?)
        };
        Ok((
            table(theta.cos()?, out_shape.clone())?,
            table(theta.sin()?, out_shape)?,
        ))
    }

    /// Positions (`[seq]`, or `[batch, seq]` for packed rows), the largest position plus one,
    /// and the additive attention bias `[batch, 1, seq, past + seq]`, built when first asked
    /// for (`None` without a mask: the fused causal softmax applies causality itself).
    ///
    /// `attention_mask` entries are segment ids over cached and new positions: 0 hides a key
    /// (padding); positive ids number the sequences packed into a row (a 0/1 mask is one
    /// sequence per row). A new token sees the cached keys and the earlier new keys of its own
    /// sequence (a padding token sees every earlier real key, or itself where there is none, so
    /// its row stays finite), and positions restart after the cache where a later packed
    /// sequence begins, so each packed sequence is computed as if it were alone.
    fn mask_layout(
        &self,
        batch: usize,
        seq: usize,
        past: usize,
        attention_mask: Option<&Tensor>,
    ) -> Result<(Tensor, usize, Option<LazyBias>)> {
        let total = past + seq;
        let plain = Tensor::arange(past as u32, total as u32, &self.device)?;
        let Some(m) = attention_mask else {
            return Ok((plain, total, None));
        };
        if m.dims() != [batch, total] {
            bail!(
                "attention_mask has shape {:?}, expected [{batch}, {total}]",
                m.dims()
            );
        }
        let ids = m.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let mut positions = Vec::with_capacity(batch * seq);
        let mut packed = false;
        for ids in &ids {
            let mut start = 0;
            for q in 0..seq {
                let id = ids[past + q];
                if q > 0 && id != 0 && ids[past + q - 1] != 0 && id != ids[past + q - 1] {
                    start = q;
                    packed = true;
                }
                positions.push((past + q - start) as u32);
            }
        }
        let (positions, span) = if packed {
            let span = positions.iter().max().map_or(0, |&p| p as usize + 1);
            let positions = Tensor::from_vec(positions, (batch, seq), &self.device)?;
            (positions, span)
        } else {
            (plain, total)
        };
        let bias = LazyBias {
            ids,
            seq,
            past,
            window: None,
            dtype: self.dtype,
            device: self.device.clone(),
            built: Mutex::new(None),
        };
        Ok((positions, span, Some(bias)))
    }

    /// What the layers of each kind read: RoPE tables and mask of the global layers, of
    /// the sliding-window layers where the model has them (their own RoPE base, and a bias
    /// that also hides keys beyond the window, when some are), and of the layers without RoPE
    /// where it has them (tables that rotate by nothing).
    fn layer_inputs(
        &self,
        batch: usize,
        seq: usize,
        past: usize,
        attention_mask: Option<&Tensor>,
    ) -> Result<LayerKinds> {
        let (positions, span, bias) = self.mask_layout(batch, seq, past, attention_mask)?;
        let bias = bias.map(Arc::new);
        // The flash attention kernels (GPUs) read the mask's segment ids instead of the bias.
        let segments = attention_mask.map(|m| m.to_dtype(DType::U32)).transpose()?;
        // LongRoPE switches to its long factors once a position reaches past the pretrained
        // length (transformers decides by the largest position: packed rows by their longest
        // sequence).
        let inv_freq = match (&self.long_inv_freq, &self.config.longrope) {
            (Some(long), Some(l)) if span > l.original_max_position_embeddings => long,
            _ => &self.inv_freq,
        };
        let (cos, sin) =
            self.rope_tables(&positions, inv_freq, self.config.rope_attention_factor())?;
        let rotary_order = self.rotary_order.clone();
        let query_scale = match self.config.query_scaling {
            Some(s) if span > s.original_max_position_embeddings => {
                let factors: Vec<f32> = positions
                    .flatten_all()?
                    .to_vec1::<u32>()?
                    .into_iter()
                    .map(|p| s.factor(p as usize) as f32)
                    .collect();
                let rows = match positions.rank() {
                    2 => positions.dim(0)?,
                    _ => 1,
                };
                let n = factors.len() / rows;
                Some(Tensor::from_vec(factors, (rows, n, 1), &self.device)?)
            }
            _ => None,
        };
        let balance = self.recording_balance()?;
        let window = self.config.layer_windows.iter().flatten().copied().max();
        let local = match window {
            None => None,
            Some(window) => {
                let (cos, sin) = match &self.local_inv_freq {
                    Some(f) => self.rope_tables(&positions, f, 1.0)?,
                    None => (cos.clone(), sin.clone()),
                };
                // Without a mask the causal attention paths apply the window themselves, as do
                // the flash kernels over packed rows (their segments; the bias elsewhere).
                let mask = match &bias {
                    Some(b) if past + seq > window => Mask {
                        bias: Some(Arc::new(b.windowed(window))),
                        segments: segments.clone(),
                    },
                    _ => Mask {
                        bias: bias.clone(),
                        segments: segments.clone(),
                    },
                };
                Some(LayerInputs {
                    cos,
                    sin,
                    mask,
                    window: Some(window),
                    sink: self.grad_sink.clone(),
                    balance: balance.clone(),
                    rotary_order: rotary_order.clone(),
                    query_scale: query_scale.clone(),
                })
            }
        };
        let global = LayerInputs {
            cos,
            sin,
            mask: Mask { bias, segments },
            window: None,
            sink: self.grad_sink.clone(),
            balance,
            rotary_order,
            query_scale,
        };
        let unrotated = match self.config.layer_rope.contains(&false) {
            true => Some(LayerInputs {
                cos: global.cos.ones_like()?,
                sin: global.sin.zeros_like()?,
                ..global.clone()
            }),
            false => None,
        };
        Ok(LayerKinds {
            global,
            local,
            unrotated,
        })
    }

    /// Runs the decoder on input embeddings `[batch, seq, hidden]` and returns the final
    /// (normed) hidden states. With a cache, new keys/values are appended and positions
    /// continue from its length. `attention_mask` covers cached and new positions.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t, _) = embeds.dims3()?;
        let past = cache.as_ref().map(|c| c.seq_len()).unwrap_or(0);
        let kinds = self.layer_inputs(b, t, past, attention_mask)?;
        let inputs_of = |l: usize| kinds.of(&self.config, l);
        let mut x = match self.config.embedding_multiplier {
            Some(m) => (embeds * m)?,
            None => embeds.clone(),
        };
        if train && self.gradient_checkpointing {
            // The recomputation needs a backward to reach every layer, also when nothing before
            // the first layer is trainable: tie its input to a (zero) variable.
            let anchor = Var::zeros((), x.dtype(), x.device())?;
            x = x.broadcast_add(anchor.as_tensor())?;
            let stack = |x: &Tensor| -> candle_core::Result<Tensor> {
                let mut x = x.clone();
                for (l, layer) in self.layers.iter().enumerate() {
                    let (cfg, layer, inputs) =
                        (self.config.clone(), layer.clone(), inputs_of(l).clone());
                    // A pre-filled cache (prefix tuning) is read, not extended, in training:
                    // each layer's recomputation attends over its prefix, whose gradients
                    // reach the prefix's variables through the grad sink.
                    let prefix = cache.as_ref().and_then(|c| c.layers[l].clone());
                    let sink = self.grad_sink.clone();
                    x = checkpoint(&x, &self.grad_sink, move |x| {
                        let mut slot = prefix.as_ref().map(|(k, v)| (param(k), param(v)));
                        let slot = prefix.is_some().then_some(&mut slot);
                        taped(x, &sink, |x| {
                            decoder_layer(&cfg, &layer, x, &inputs, slot, true)
                        })
                    })?;
                }
                norm(&self.config, &x, &self.norm)
            };
            return Ok(taped(&x, &self.grad_sink, stack)?);
        }
        let mut stack = |x: &Tensor| -> candle_core::Result<Tensor> {
            let mut x = x.clone();
            for (l, layer) in self.layers.iter().enumerate() {
                let slot = cache.as_deref_mut().map(|c| &mut c.layers[l]);
                x = decoder_layer(&self.config, layer, &x, inputs_of(l), slot, train)?;
            }
            norm(&self.config, &x, &self.norm)
        };
        if train {
            return Ok(taped(&x, &self.grad_sink, stack)?);
        }
        Ok(stack(&x)?)
    }

    /// A load-balancing loss of this model's routers over a batch whose real tokens
    /// `token_mask` marks (`[batch][seq]`), for [`Llama::balancing`]; `None` for a model
    /// without experts.
    pub fn load_balance(&self, token_mask: &[Vec<bool>]) -> Option<Arc<LoadBalance>> {
        let moe = self.config.moe.as_ref()?;
        Some(LoadBalance::new(moe.num_experts, moe.top_k, token_mask))
    }

    /// Runs `f` (a forward over the batch `balance` was made for) with each router recording
    /// into `balance`; its layers' backward adds the loss's gradient once `balance` is
    /// finished, also when gradient checkpointing recomputes them later.
    pub fn balancing<T>(&self, balance: &Arc<LoadBalance>, f: impl FnOnce() -> T) -> Result<T> {
        *self.balance_slot()? = Some(balance.clone());
        let out = f();
        *self.balance_slot()? = None;
        Ok(out)
    }

    fn balance_slot(&self) -> Result<std::sync::MutexGuard<'_, Option<Arc<LoadBalance>>>> {
        self.load_balance
            .lock()
            .map_err(|_| anyhow::anyhow!("load balance: poisoned lock"))
    }

    fn recording_balance(&self) -> Result<Option<Arc<LoadBalance>>> {
        Ok(self.balance_slot()?.clone())
    }

    /// The gradients of `loss`, a loss computed by this model in training: candle's backward
    /// and what layer tapes and gradient checkpointing hand to the model's grad sink (the
    /// gradients of parameters used inside them). Use this, not `loss.backward()`.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        self.grad_sink.drain_into(&mut grads)?;
        Ok(grads)
    }

    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        train: bool,
    ) -> Result<Tensor> {
        self.forward_embeds(
            &self.input_embeds(input_ids, train)?,
            attention_mask,
            cache,
            train,
        )
    }

    /// What the output head reads of final hidden states: Granite divides its logits by
    /// `logits_scaling`, the same as dividing the hidden states.
    pub fn head_input(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(match self.config.logits_scaling {
            Some(s) => (hidden / s)?,
            None => hidden.clone(),
        })
    }

    /// Logits `[.., vocab]` of final hidden states (materialises them: for inference), scaled
    /// and capped where the model does (Granite, Gemma 2).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let hidden = self.head_input(hidden)?;
        let logits = match (&self.lm_head, &self.token_rows) {
            (Some(head), _) => head.forward(&hidden, false)?,
            (None, None) => frozen_linear(&hidden, &self.embed_tokens)?,
            // The replaced tokens' logits from their rows, the others as they were.
            (None, Some(t)) => {
                let logits = frozen_linear(&hidden, &self.embed_tokens)?;
                let (ids, change) = t.changes_from(&self.embed_tokens)?;
                let change = frozen_linear(&hidden, &change.detach())?.to_dtype(logits.dtype())?;
                logits.index_add(&ids, &change, candle_core::D::Minus1)?
            }
        };
        Ok(match self.config.final_softcap {
            Some(cap) => soft_cap(&logits, cap)?,
            None => logits,
        })
    }
}

/// What a decoder layer reads besides its input: the RoPE tables, the mask, the sliding
/// window of its keys (`None`: global attention), and the model's grad sink (for the
/// gradients that LoRA layers sharing an input send there).
#[derive(Clone)]
struct LayerInputs {
    cos: Tensor,
    sin: Tensor,
    mask: Mask,
    window: Option<usize>,
    sink: Arc<GradSink>,
    /// The routers' load-balancing loss being recorded, if any.
    balance: Option<Arc<LoadBalance>>,
    /// With partial rotary, the order of the query heads' dims that RoPE's tables expect.
    rotary_order: Option<Arc<RotaryOrder>>,
    /// The queries' factors by position (`[batch or 1, seq, 1]`), where Ministral 3's query
    /// scaling makes any differ from 1.
    query_scale: Option<Tensor>,
}

/// Partial rotary as full rotary: RoPE pairs dim `j` of a head with dim `j + d/2`, where
/// partial rotary pairs `j` with `j + r/2` among the first `r` dims and leaves the rest. The
/// queries' and keys' dims are reordered (the same way, so that `q·k` is unchanged) to put the
/// rotated halves at `0..r/2` and `d/2..d/2 + r/2` and the others between, whose pairs RoPE's
/// tables rotate by nothing (frequency 0). Indices over `[heads · d]`; keys take the first
/// `kv_heads · d`.
struct RotaryOrder {
    order: Tensor,
    inverse: Tensor,
}

impl RotaryOrder {
    fn new(heads: usize, d: usize, r: usize, device: &Device) -> Result<Self> {
        let (half, rotated_half) = (d / 2, r / 2);
        let within: Vec<usize> = (0..d)
            .map(|j| match j {
                j if j < rotated_half => j,
                j if j < half => r + (j - rotated_half),
                j if j < half + rotated_half => rotated_half + (j - half),
                j => r + (half - rotated_half) + (j - half - rotated_half),
            })
            .collect();
        Self::of(heads, d, &within, device)
    }

    /// Interleaved RoPE (ERNIE 4.5's pairs `2i`, `2i + 1`) as RoPE's pairs `i`, `i + d/2`: the
    /// even dims of each head first, then the odd ones.
    fn interleaved(heads: usize, d: usize, device: &Device) -> Result<Self> {
        let within: Vec<usize> = (0..d)
            .map(|j| match j < d / 2 {
                true => 2 * j,
                false => 2 * (j - d / 2) + 1,
            })
            .collect();
        Self::of(heads, d, &within, device)
    }

    /// Each head's dim `j` read from its dim `within[j]`.
    fn of(heads: usize, d: usize, within: &[usize], device: &Device) -> Result<Self> {
        let mut order = vec![0u32; heads * d];
        let mut inverse = vec![0u32; heads * d];
        for h in 0..heads {
            for (j, &from) in within.iter().enumerate() {
                order[h * d + j] = (h * d + from) as u32;
                inverse[h * d + from] = (h * d + j) as u32;
            }
        }
        Ok(Self {
            order: Tensor::new(order, device)?,
            inverse: Tensor::new(inverse, device)?,
        })
    }

    /// `x` `[.., n · d]` (n heads) in this order.
    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let n = x.dim(candle_core::D::Minus1)?;
        permute_last(
            x,
            &self.order.narrow(0, 0, n)?,
            &self.inverse.narrow(0, 0, n)?,
        )
    }
}

/// The [`LayerInputs`] of each kind of layer in a forward pass (see [`Llama::layer_inputs`]).
struct LayerKinds {
    global: LayerInputs,
    local: Option<LayerInputs>,
    unrotated: Option<LayerInputs>,
}

impl LayerKinds {
    /// What layer `l` reads.
    fn of(&self, c: &LlamaConfig, l: usize) -> &LayerInputs {
        match (&c.layer_windows[l], &self.local, &self.unrotated) {
            (Some(_), Some(local), _) => local,
            (_, _, Some(unrotated)) if !c.layer_rope[l] => unrotated,
            _ => &self.global,
        }
    }
}

/// The attention mask of a batch with `attention_mask`: the additive bias (`[b, 1, t, past +
/// t]`) and the segment ids it is built from (`[b, past + t]`, u32).
#[derive(Clone, Default)]
struct Mask {
    bias: Option<Arc<LazyBias>>,
    segments: Option<Tensor>,
}

/// The additive attention bias of a batch's segment ids, built on first use: where the flash
/// attention kernels read the segment ids (GPUs), no `[b, t, t]` mask is built on the host
/// and copied over at every step.
struct LazyBias {
    /// Segment ids `[batch][past + seq]`.
    ids: Vec<Vec<u32>>,
    seq: usize,
    past: usize,
    /// Sliding window: a query also does not see keys `window` or more positions back.
    window: Option<usize>,
    dtype: DType,
    device: Device,
    built: Mutex<Option<Tensor>>,
}

impl LazyBias {
    /// The same mask limited to a sliding window of keys.
    fn windowed(&self, window: usize) -> Self {
        Self {
            ids: self.ids.clone(),
            window: Some(window),
            built: Mutex::new(None),
            device: self.device.clone(),
            ..*self
        }
    }

    /// `[batch, 1, seq, past + seq]`: 0 where a query sees a key (see [`Llama::mask_layout`]),
    /// -inf elsewhere.
    fn get(&self) -> candle_core::Result<Tensor> {
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bias) = built.as_ref() {
            return Ok(bias.clone());
        }
        let (seq, past) = (self.seq, self.past);
        let total = past + seq;
        let mut bias = vec![f32::NEG_INFINITY; self.ids.len() * seq * total];
        for (row, ids) in self.ids.iter().enumerate() {
            for q in 0..seq {
                let id = ids[past + q];
                let out = &mut bias[(row * seq + q) * total..][..total];
                let mut sees_a_key = false;
                let first = self.window.map_or(0, |w| (past + q + 1).saturating_sub(w));
                for (k, slot) in out.iter_mut().enumerate().take(past + q + 1).skip(first) {
                    let key = ids[k];
                    if key != 0 && (k < past || id == 0 || key == id) {
                        *slot = 0.0;
                        sees_a_key = true;
                    }
                }
                // A padding query before any real token (left padding) would see nothing and
                // its softmax would be NaN, which reaches every row through 0 · NaN in the
                // value product: it sees itself, a finite row that no other query reads.
                if !sees_a_key {
                    out[past + q] = 0.0;
                }
            }
        }
        let bias = Tensor::from_vec(bias, (self.ids.len(), 1, seq, total), &self.device)?
            .to_dtype(self.dtype)?;
        *built = Some(bias.clone());
        Ok(bias)
    }
}

/// The model's RMSNorm with scale `w` (Gemma's scales by `1 + w`, computed in f32).
fn norm(c: &LlamaConfig, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if c.norm_adds_one {
        return rms_norm(x, &(w.to_dtype(DType::F32)? + 1.0)?, c.rms_norm_eps);
    }
    rms_norm(x, w, c.rms_norm_eps)
}

fn decoder_layer(
    c: &LlamaConfig,
    layer: &DecoderLayer,
    x: &Tensor,
    inputs: &LayerInputs,
    cache: Option<&mut Option<(Tensor, Tensor)>>,
    train: bool,
) -> candle_core::Result<Tensor> {
    let normed = |x: &Tensor, w: Option<&Tensor>| match w {
        Some(w) => norm(c, x, w),
        None => Ok(x.clone()),
    };
    let h = normed(x, layer.input_layernorm.as_ref())?;
    let mut attn = attention(c, &layer.self_attn, &h, inputs, cache, train)?;
    // Gemma and OLMo 2 norm the sublayer outputs before the residual add.
    let (mlp_norm, out_norm) = match c.norms {
        LayerNorms::Pre => (Some(&layer.post_attention_layernorm), None),
        LayerNorms::Sandwich | LayerNorms::Post => {
            attn = norm(c, &attn, &layer.post_attention_layernorm)?;
            let post = layer.post_feedforward_layernorm.as_ref();
            (layer.pre_feedforward_layernorm.as_ref(), post)
        }
    };
    if let Some(a) = &layer.attn_adapter {
        attn = a.forward(&attn, train)?;
    }
    let x = add(x, &residual(c, &attn)?)?;
    let h = normed(&x, mlp_norm)?;
    let mut out = match (&layer.mlp, &c.moe) {
        (FeedForward::Dense(m), _) => mlp(c, m, &h, &inputs.sink, train)?,
        (FeedForward::Sparse(s), Some(moe)) => sparse_moe(c, moe, s, &h, inputs, train)?,
        (FeedForward::Sparse(_), None) => {
            candle_core::bail!("a mixture-of-experts layer in a model without experts")
        }
    };
    if let Some(w) = out_norm {
        out = norm(c, &out, w)?;
    }
    if let Some(a) = &layer.mlp_adapter {
        out = a.forward(&out, train)?;
    }
    add(&x, &residual(c, &out)?)
}

/// A gated MLP over `x`.
fn mlp(
    c: &LlamaConfig,
    m: &Mlp,
    x: &Tensor,
    sink: &Arc<GradSink>,
    train: bool,
) -> candle_core::Result<Tensor> {
    let act = c.activation;
    if let Some((gate, up, down)) = m.frozen_weights() {
        return frozen_mlp(x, &gate, &up, &down, act);
    }
    let i = m.down_proj.in_features();
    let [gate, up] = m.gate_up.outputs(x, [i, i], sink, train)?;
    m.down_proj.forward(&gated_act(&gate, &up, act)?, train)
}

/// A mixture-of-experts block over `x` `[batch, seq, hidden]`: one fused op when the router
/// and experts are frozen and dense; otherwise composed of candle's ops (4-bit experts under
/// QLoRA, trained ones under full fine-tuning, LoRA on their parameters), each expert over
/// the rows routed to it.
fn sparse_moe(
    c: &LlamaConfig,
    moe: &Moe,
    s: &SparseMoe,
    x: &Tensor,
    inputs: &LayerInputs,
    train: bool,
) -> candle_core::Result<Tensor> {
    let kind = moe.router_kind();
    let (sink, balance) = (&inputs.sink, inputs.balance.as_ref());
    let choice_bias = s.choice_bias.as_ref();
    let mut out = match s.frozen_weights() {
        Some((router, experts)) => {
            let router = FrozenRouter {
                weight: &router,
                bias: s.router.bias.as_ref(),
                choice_bias,
                kind,
                in_f32: moe.router_in_f32(),
            };
            frozen_moe(x, router, &experts, c.activation, balance)?
        }
        None => {
            let hidden = x.dim(D::Minus1)?;
            let rows = x.elem_count() / hidden;
            let x2 = reshape(x, (rows, hidden))?;
            let deltas = &s.deltas;
            // GLM-4.5's, ERNIE 4.5's and DeepSeek's routers compute in f32, as transformers'.
            let in_f32 = moe.router_in_f32();
            let dtype = if in_f32 { DType::F32 } else { x.dtype() };
            let bias = s.router.bias.clone();
            let logits = match deltas.router_weight(&s.router, dtype)? {
                Some(w) => Linear::new(w, bias).base_forward(&cast(&x2, dtype)?)?,
                None if in_f32 && s.router.adapter.is_none() => {
                    let w = s.router.weight.dense()?.to_dtype(dtype)?;
                    Linear::new(w, bias).base_forward(&cast(&x2, dtype)?)?
                }
                None => s.router.forward(&x2, train)?,
            };
            let mut probs = kind.scores(&cast(&logits, DType::F32)?)?;
            if let Some(b) = balance {
                probs = b.inject(&probs)?;
            }
            let routing = route(&probs, &kind, choice_bias)?;
            if let Some(b) = balance {
                b.record(&probs)?;
            }
            let weights = routing.weights.flatten_all()?;
            let mut out = x2.zeros_like()?;
            for (e, (expert, served)) in s.experts.iter().zip(&routing.experts).enumerate() {
                let Some(served) = served else { continue };
                let xe = x2.index_select(&served.rows, 0)?.unsqueeze(0)?;
                let ye = match deltas.touch_experts() {
                    false => mlp(c, expert, &xe, sink, train)?,
                    true => adapted_expert(c, expert, e, deltas, &xe, train)?,
                }
                .squeeze(0)?;
                let we = weights.index_select(&served.slots, 0)?;
                let we = we.to_dtype(x.dtype())?.unsqueeze(1)?;
                out = out.index_add(&served.rows, &ye.broadcast_mul(&we)?, 0)?;
            }
            out.reshape(x.shape())?
        }
    };
    if let Some((shared, gate)) = &s.shared {
        let y = mlp(c, shared, x, sink, train)?;
        let y = match gate {
            Some(gate) => sigmoid_gated(&gate.forward(x, train)?, &y)?,
            None => y,
        };
        out = add(&out, &y)?;
    }
    Ok(out)
}

/// Expert `e` over `x` with the changes `deltas` of its weights (LoRA on the experts'
/// parameters: HF PEFT computes the expert with its weights plus their changes, as here).
fn adapted_expert(
    c: &LlamaConfig,
    expert: &Mlp,
    e: usize,
    deltas: &MoeDeltas,
    x: &Tensor,
    train: bool,
) -> candle_core::Result<Tensor> {
    let Projections::Separate([gate, up]) = &expert.gate_up else {
        candle_core::bail!("an expert with fused projections");
    };
    // A projection over x: its frozen weight plus LoRA's low-rank path where it has a change.
    let project = |x: &Tensor, lin: &Linear, change: Option<LowRank>| match change {
        Some(lr) => lora_linear(
            x,
            &lin.weight,
            lin.bias.as_ref(),
            &lr.a,
            &lr.b,
            lr.scale,
            None,
        ),
        None => lin.forward(x, train),
    };
    // gate_up's change: gate's rows, then up's, sharing A.
    let (gate_change, up_change) = match &deltas.gate_up {
        Some(d) => {
            let LowRank { a, b, scale } = d.factors(e)?;
            let size = gate.out_features();
            let rows = |start| -> candle_core::Result<LowRank> {
                let b = b.narrow(0, start, size)?;
                Ok(LowRank {
                    a: a.clone(),
                    b,
                    scale,
                })
            };
            (Some(rows(0)?), Some(rows(size)?))
        }
        None => (None, None),
    };
    let down_change = deltas.down.as_ref().map(|d| d.factors(e)).transpose()?;
    let gated = gated_act(
        &project(x, gate, gate_change)?,
        &project(x, up, up_change)?,
        c.activation,
    )?;
    project(&gated, &expert.down_proj, down_change)
}

/// A sublayer's output as the residual stream takes it: Granite's scaled by its multiplier.
fn residual(c: &LlamaConfig, out: &Tensor) -> candle_core::Result<Tensor> {
    match c.residual_multiplier {
        Some(m) => scale(out, m),
        None => Ok(out.clone()),
    }
}

fn attention(
    c: &LlamaConfig,
    a: &Attention,
    x: &Tensor,
    inputs: &LayerInputs,
    cache: Option<&mut Option<(Tensor, Tensor)>>,
    train: bool,
) -> candle_core::Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    let (nh, kvh, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let (scale, softcap) = (c.attention_scale, c.attn_softcap);
    let LayerInputs {
        cos,
        sin,
        mask,
        window,
        sink,
        rotary_order,
        query_scale,
        ..
    } = inputs;
    let window = *window;
    let [mut q, mut k, v] = match (&a.latent, c.latent_attention) {
        (Some(parts), Some(m)) => latent_qkv(c, &m, a, parts, x, train)?,
        _ => a
            .qkv
            .outputs(x, [nh * hd, kvh * hd, kvh * hd], sink, train)?,
    };
    // A factor per position commutes with RoPE's rotation: scaling before it is scaling after.
    if let Some(factors) = query_scale {
        q = q.broadcast_mul(&factors.to_dtype(q.dtype())?)?;
    }
    // Qwen3 and Gemma 3 normalise each head over head_dim, OLMo 2 the whole projection; the
    // attention paths below take the heads still side by side in the last dimension.
    let head_norm = |y: &Tensor, w: &Tensor, n: usize| -> candle_core::Result<Tensor> {
        match c.qk_norm {
            QkNorm::Projection => norm(c, y, w),
            _ => reshape(&norm(c, &reshape(y, (b, t, n, hd))?, w)?, (b, t, n * hd)),
        }
    };
    if let Some(w) = &a.q_norm {
        q = head_norm(&q, w, nh)?;
    }
    if let Some(w) = &a.k_norm {
        k = head_norm(&k, w, kvh)?;
    }
    if let Some(order) = rotary_order {
        q = order.apply(&q)?;
        k = order.apply(&k)?;
    }
    let sinks = a.sinks.as_ref();
    if mask.bias.is_none() && cache.is_none() {
        let out =
            causal_self_attention(&q, &k, &v, cos, sin, nh, kvh, scale, softcap, window, sinks)?;
        return a.o_proj.forward(&latent_values(c, &out)?, train);
    }
    // The flash kernels do not cap scores: capped ones (Gemma 2) take the paths below, as do
    // sinks (gpt-oss) over a prefix.
    let uncapped = softcap.is_none();
    if let (Some(segments), None, true) = (&mask.segments, &cache, uncapped) {
        let packed = packed_self_attention(
            &q, &k, &v, cos, sin, segments, sinks, window, nh, kvh, scale,
        )?;
        if let Some(out) = packed {
            return a.o_proj.forward(&latent_values(c, &out)?, train);
        }
    }
    // Training over a pre-filled cache (prefix tuning's virtual tokens): the flash kernels
    // attend over it in place of the concatenation and the bias below. Nothing reads the
    // cache after a training forward, so it is not extended.
    if let (Some(Some(prefix)), true, true) = (cache.as_deref(), train, uncapped && sinks.is_none())
    {
        let prefix = (&prefix.0, &prefix.1);
        let segments = mask.segments.as_ref();
        let qkv = (&q, &k, &v);
        if let Some(out) = prefixed_self_attention(qkv, prefix, cos, sin, segments, nh, kvh, scale)?
        {
            return a.o_proj.forward(&latent_values(c, &out)?, train);
        }
    }
    let heads = |y: Tensor, n: usize| y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous();
    let q = rope(&heads(q, nh)?, cos, sin)?;
    let mut k = rope(&heads(k, kvh)?, cos, sin)?;
    let mut v = heads(v, kvh)?;
    if let Some(slot) = cache {
        if let Some((pk, pv)) = slot.as_ref() {
            k = Tensor::cat(&[pk, &k], 2)?;
            v = Tensor::cat(&[pv, &v], 2)?;
        }
        *slot = Some((k.clone(), v.clone()));
    }
    let bias = mask.bias.as_ref().map(|b| b.get()).transpose()?;
    let out = match &bias {
        Some(m) => {
            let (k, v) = (repeat_kv(&k, nh / kvh)?, repeat_kv(&v, nh / kvh)?);
            let mut scores = (q.matmul(&k.t()?)? * scale)?;
            if let Some(cap) = softcap {
                scores = soft_cap(&scores, cap)?;
            }
            softmax_with_sinks(&scores.broadcast_add(m)?, sinks)?.matmul(&v)?
        }
        None => causal_attention(&q, &k, &v, scale, softcap, window, sinks)?,
    };
    let out = out.transpose(1, 2)?.reshape((b, t, nh * hd))?;
    a.o_proj.forward(&latent_values(c, &out)?, train)
}

/// The epsilon of latent attention's norms (`q_a_layernorm`, `kv_a_layernorm`).
const LATENT_NORM_EPS: f64 = 1e-6;

/// Latent attention's q, k and v (`[batch, seq, heads · head_dim]` each), as the attention
/// paths take them: each query and key head's rotated dims first (de-interleaved where RoPE
/// pairs adjacent dims, as DeepSeek's releases do), then its unrotated ones, the one rotated
/// key head shared by all; values zero-padded to `head_dim`.
fn latent_qkv(
    c: &LlamaConfig,
    m: &crate::config::LatentAttention,
    a: &Attention,
    parts: &LatentParts,
    x: &Tensor,
    train: bool,
) -> candle_core::Result<[Tensor; 3]> {
    let Projections::Separate([q_proj, kv_a, kv_b]) = &a.qkv else {
        candle_core::bail!("latent attention with fused projections");
    };
    let (b, t, _) = x.dims3()?;
    let (nh, hd) = (c.num_attention_heads, c.head_dim);
    let (nope, rot, vd, rank) = (
        m.qk_nope_head_dim,
        m.qk_rope_head_dim,
        m.v_head_dim,
        m.kv_lora_rank,
    );
    // transformers builds these two norms with their class's epsilon, not the config's.
    let rms = |y: &Tensor, w: &Tensor| rms_norm(y, w, LATENT_NORM_EPS);
    let q_in = match &parts.q_a {
        Some((q_a, norm)) => rms(&q_a.forward(x, train)?, norm)?,
        None => x.clone(),
    };
    let q = q_proj.forward(&q_in, train)?.reshape((b, t, nh, hd))?;
    let latent = kv_a.forward(x, train)?;
    let kv = kv_b.forward(&rms(&latent.narrow(2, 0, rank)?, &parts.kv_a_norm)?, train)?;
    let kv = kv.reshape((b, t, nh, nope + vd))?;
    // Adjacent pairs (x0, x1), (x2, x3), ... as rotate-half's halves: evens, then odds.
    let halves = |y: Tensor| -> candle_core::Result<Tensor> {
        if !m.rope_interleave {
            return Ok(y);
        }
        let dims = y.dims().to_vec();
        let lead: Vec<usize> = dims[..dims.len() - 1].to_vec();
        let mut pairs = lead.clone();
        pairs.extend([rot / 2, 2]);
        let y = y.reshape(pairs)?;
        let last = y.rank() - 1;
        y.transpose(last - 1, last)?.contiguous()?.reshape(dims)
    };
    let q_rot = halves(q.narrow(3, nope, rot)?)?;
    let q = Tensor::cat(&[&q_rot, &q.narrow(3, 0, nope)?], 3)?;
    let k_rot = halves(latent.narrow(2, rank, rot)?.reshape((b, t, 1, rot))?)?;
    let k_rot = k_rot.broadcast_as((b, t, nh, rot))?.contiguous()?;
    let k = Tensor::cat(&[&k_rot, &kv.narrow(3, 0, nope)?], 3)?;
    let mut v = kv.narrow(3, nope, vd)?;
    if vd < hd {
        v = v.pad_with_zeros(3, 0, hd - vd)?;
    }
    let flat = |y: Tensor| y.contiguous()?.reshape((b, t, nh * hd));
    Ok([flat(q)?, flat(k)?, flat(v)?])
}

/// The attention's output `[batch, seq, heads · head_dim]` as `o_proj` reads it: with latent
/// attention, each head's first `v_head_dim` values (the rest, of the zero padding, dropped).
fn latent_values(c: &LlamaConfig, out: &Tensor) -> candle_core::Result<Tensor> {
    let Some(m) = c.latent_attention.filter(|m| m.v_head_dim < c.head_dim) else {
        return Ok(out.clone());
    };
    let (b, t, _) = out.dims3()?;
    let nh = c.num_attention_heads;
    out.reshape((b, t, nh, c.head_dim))?
        .narrow(3, 0, m.v_head_dim)?
        .contiguous()?
        .reshape((b, t, nh * m.v_head_dim))
}

/// The outputs of `linears`, which all read `x` (q, k and v; gate and up): those that are
/// plain LoRA layers (see [`LinearAdapter::low_rank`]) over frozen weights (dense or 4-bit)
/// without bias, when there are two or more, by [`lora_linears`] (their products over `x`
/// shared; LoRA on q and v alone, PEFT's default for Llama, shares too), the others by their
/// own forward.
fn forward_sharing_input<const N: usize>(
    linears: [&Linear; N],
    x: &Tensor,
    sink: &Arc<GradSink>,
    train: bool,
) -> candle_core::Result<[Tensor; N]> {
    let plain = linears.map(|l| {
        let weight = match &l.weight {
            LinearWeight::Dense(w) if !param(w).track_op() => LinearWeight::Dense(param(w)),
            LinearWeight::Quantized(q) => LinearWeight::Quantized(q.clone()),
            LinearWeight::Dense(_) => return None,
        };
        match (&l.bias, &l.adapter) {
            (None, Some(adapter)) => adapter.low_rank(train).map(|lr| (weight, lr)),
            _ => None,
        }
    });
    let layers: Vec<LoraProjection> = plain
        .iter()
        .flatten()
        .map(|(weight, (a, b, scale))| LoraProjection {
            weight,
            a,
            b,
            scale: *scale,
        })
        .collect();
    let sharing = layers.len() > 1;
    let mut shared = match sharing {
        true => lora_linears(x, &layers, sink)?,
        false => Vec::new(),
    }
    .into_iter();
    let mut outputs = Vec::with_capacity(N);
    for (l, p) in linears.iter().zip(&plain) {
        let y = match (p, sharing) {
            (Some(_), true) => shared.next().ok_or_else(|| {
                candle_core::Error::Msg("shared LoRA input: fewer outputs than layers".into())
            })?,
            _ => l.forward(x, train)?,
        };
        outputs.push(y);
    }
    outputs
        .try_into()
        .map_err(|_| candle_core::Error::Msg("shared LoRA input: an output missing".into()))
}

/// `[b, kv_heads, s, d]` -> `[b, kv_heads * n_rep, s, d]`, each kv head serving n_rep query heads.
fn repeat_kv(x: &Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kvh, s, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kvh, n_rep, s, d))?
        .reshape((b, kvh * n_rep, s, d))
}
