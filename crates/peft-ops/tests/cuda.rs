//! Every op on the GPU against its CPU f32 reference: forward values and the gradients of
//! `sum(y · probe)`, in f32 (tolerance 1e-3 of the reference's scale) and bf16 (3e-2).
//! Built only with `--features cuda`; run on a machine with an NVIDIA GPU.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Result, Tensor, Var};
use peft_ops::*;
use std::sync::Arc;

mod common;
use common::{
    max_abs, packed_reference, packed_rows, prefixed_reference, prefixed_rows, randn, rope_tables,
};

fn gpu() -> Device {
    open_device("cuda").expect("a CUDA device")
}

/// A GPU result as a CPU f32 tensor.
fn host(x: &Tensor) -> Tensor {
    x.to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap()
}

/// What to do with an input on the device under test.
#[derive(Clone, Copy, PartialEq)]
enum Input {
    /// Cast to the dtype under test (activations, frozen weights).
    Cast,
    /// Stays f32 (LoRA weights are trained in f32 whatever the base dtype).
    F32,
}

/// What `f` computes from the inputs, with a grad sink for the gradients that do not come
/// through candle's graph.
type Computed<'a> = &'a dyn Fn(&[Tensor], &Arc<GradSink>) -> Result<Tensor>;

/// Output and input gradients of `f` on `device` in `dtype` (the sink's included), as CPU f32
/// tensors.
fn run(
    inputs: &[(Tensor, Input)],
    f: Computed,
    device: &Device,
    dtype: DType,
) -> (Tensor, Vec<Option<Tensor>>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|(t, kind)| {
            let dt = if *kind == Input::Cast {
                dtype
            } else {
                DType::F32
            };
            Var::from_tensor(&t.to_device(device).unwrap().to_dtype(dt).unwrap()).unwrap()
        })
        .collect();
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let sink = Arc::new(GradSink::default());
    let y = f(&xs, &sink).unwrap();
    let probe = randn(y.dims(), 77)
        .to_device(device)
        .unwrap()
        .to_dtype(y.dtype())
        .unwrap();
    let mut grads = (&y * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    sink.drain_into(&mut grads).unwrap();
    let gs = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).map(host))
        .collect();
    (host(&y), gs)
}

fn close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let scale = max_abs(want);
    let diff = max_abs(&(got - want).unwrap());
    assert!(
        diff <= tol * (1.0 + scale),
        "{what}: max abs diff {diff} (reference scale {scale}, tolerance {tol})"
    );
}

/// Compares `f` on the GPU (f32 and bf16) with the CPU f32 result.
fn check(name: &str, inputs: &[(Tensor, Input)], f: impl Fn(&[Tensor]) -> Result<Tensor>) {
    check_sinking(name, inputs, |x, _| f(x))
}

/// [`check`] for an `f` that sends gradients to a grad sink.
fn check_sinking(
    name: &str,
    inputs: &[(Tensor, Input)],
    f: impl Fn(&[Tensor], &Arc<GradSink>) -> Result<Tensor>,
) {
    let (y_ref, g_ref) = run(inputs, &f, &Device::Cpu, DType::F32);
    let dev = gpu();
    for (dtype, tol) in [(DType::F32, 1e-3), (DType::BF16, 3e-2)] {
        let (y, g) = run(inputs, &f, &dev, dtype);
        close(&format!("{name} {dtype:?} forward"), &y, &y_ref, tol);
        for (i, (got, want)) in g.iter().zip(&g_ref).enumerate() {
            match (got, want) {
                (Some(got), Some(want)) => {
                    close(&format!("{name} {dtype:?} grad {i}"), got, want, tol)
                }
                (None, None) => {}
                _ => panic!("{name} {dtype:?}: gradient {i} present on one device only"),
            }
        }
    }
}

#[test]
fn frozen_linear_matches_cpu() {
    let inputs = [
        (randn(&[2, 6, 16], 1), Input::Cast),
        (randn(&[24, 16], 2), Input::Cast),
    ];
    check("frozen_linear", &inputs, |x| {
        frozen_linear(&x[0], &x[1].detach())
    });
}

/// A trained embedding: rows of repeated ids and the weight's gradient (each token's rows
/// summed in f32 by our kernels) against the CPU.
#[test]
fn embedding_matches_cpu() {
    let ids: Vec<u32> = (0..300u32).map(|j| (j * 7) % 23 + (j % 2) * 3).collect();
    let inputs = [(randn(&[40, 16], 50), Input::Cast)];
    check("embedding", &inputs, |x| {
        embedding(&x[0], &Tensor::new(ids.as_slice(), x[0].device())?)
    });
}

#[test]
fn rms_norm_matches_cpu() {
    let inputs = [
        (randn(&[4, 3, 16], 3), Input::Cast),
        ((randn(&[16], 4) + 1.5).unwrap(), Input::Cast),
    ];
    check("rms_norm", &inputs, |x| {
        rms_norm(&x[0], &x[1].detach(), 1e-5)
    });
    // A trained scale (full fine-tuning): its gradient by the two dw kernels.
    check("rms_norm, trained scale", &inputs, |x| {
        rms_norm(&x[0], &x[1], 1e-5)
    });
}

#[test]
fn softmax_matches_cpu() {
    let inputs = [((randn(&[3, 5, 9], 5) * 3.0).unwrap(), Input::Cast)];
    check("softmax_last_dim", &inputs, |x| softmax_last_dim(&x[0]));
}

#[test]
fn rope_matches_cpu() {
    let inputs = [
        (randn(&[2, 3, 5, 8], 6), Input::Cast),
        (randn(&[5, 4], 7), Input::Cast),
        (randn(&[5, 4], 8), Input::Cast),
    ];
    check("rope", &inputs, |x| {
        rope(&x[0], &x[1].detach(), &x[2].detach())
    });
}

#[test]
fn causal_softmax_matches_cpu() {
    let inputs = [((randn(&[2, 3, 5, 7], 9) * 4.0).unwrap(), Input::Cast)];
    check("causal_softmax", &inputs, |x| {
        causal_softmax(&x[0], 0.5, None)
    });
}

#[test]
fn causal_attention_matches_cpu() {
    let inputs = [
        (randn(&[2, 4, 6, 8], 10), Input::Cast),
        (randn(&[2, 2, 6, 8], 11), Input::Cast),
        (randn(&[2, 2, 6, 8], 12), Input::Cast),
    ];
    check("causal_attention", &inputs, |x| {
        causal_attention(&x[0], &x[1], &x[2], 1.0 / 8f64.sqrt(), None, None, None)
    });
}

/// Gemma 2's soft cap of the scores: the flash kernels and cuDNN have none, so the GPU takes
/// the composed path, against the CPU's fused one.
#[test]
fn soft_capped_self_attention_matches_cpu() {
    let (b, t, heads, kv_heads, d) = (2, 40, 4, 2, 64);
    let (cos, sin) = rope_tables(t, d);
    let inputs = [
        (randn(&[b, t, heads * d], 70), Input::Cast),
        (randn(&[b, t, kv_heads * d], 71), Input::Cast),
        (randn(&[b, t, kv_heads * d], 72), Input::Cast),
        (cos, Input::F32),
        (sin, Input::F32),
    ];
    check("soft-capped causal_self_attention", &inputs, |x| {
        let (cos, sin) = (x[3].detach(), x[4].detach());
        let scale = 1.0 / (d as f64).sqrt();
        causal_self_attention(
            &x[0],
            &x[1],
            &x[2],
            &cos,
            &sin,
            heads,
            kv_heads,
            scale,
            Some(1.5),
            Some(16),
            None,
        )
    });
}

/// bf16 takes the flash attention kernels (cuDNN's attention turned off; head sizes 64 and
/// 128; the 128-row forward for 64, the 128-key backward for both), f32 the composed path;
/// both against the CPU's fused f32 path. Sequences span several 64-row tiles and end
/// mid-tile.
#[test]
fn causal_self_attention_matches_cpu() {
    let cudnn = set_attention_cudnn(false);
    let cases = [
        (2, 80, 4, 2, 64, false),
        (2, 150, 4, 2, 64, true),
        (1, 150, 2, 1, 128, false),
        (1, 150, 2, 1, 128, true),
    ];
    for (b, t, heads, kv_heads, d, wide) in cases {
        let before = (set_flash_wide(wide), set_flash_wide_backward(wide));
        let name = format!("causal_self_attention d{d} wide {wide}");
        check_self_attention(&name, (b, t, heads, kv_heads, d), 30);
        set_flash_wide(before.0);
        set_flash_wide_backward(before.1);
    }
    set_attention_cudnn(cudnn);
}

/// A sliding window and gpt-oss's sinks on the flash kernels (bf16; cuDNN, which has neither,
/// on or off: ours run either way) against the CPU's fused f32 path: windows shorter and longer
/// than a tile, both backwards.
#[test]
fn windowed_self_attention_with_sinks_matches_cpu() {
    let (b, t, heads, kv_heads, d) = (2, 150, 4, 2, 64);
    let (cos, sin) = rope_tables(t, d);
    let sinks = Tensor::new(&[2.5f32, -1.0, 0.5, 4.0], &Device::Cpu).unwrap();
    for (window, sinks, wide) in [
        (40, None, false),
        (100, Some(&sinks), true),
        (t, Some(&sinks), false),
    ] {
        let before = set_flash_wide_backward(wide);
        let inputs = [
            (randn(&[b, t, heads * d], 80), Input::Cast),
            (randn(&[b, t, kv_heads * d], 81), Input::Cast),
            (randn(&[b, t, kv_heads * d], 82), Input::Cast),
            (cos.clone(), Input::F32),
            (sin.clone(), Input::F32),
        ];
        let name = format!(
            "causal_self_attention window {window} sinks {}",
            sinks.is_some()
        );
        check(&name, &inputs, |x| {
            let (cos, sin) = (x[3].detach(), x[4].detach());
            let sinks = sinks.map(|s| s.to_device(x[0].device())).transpose()?;
            let scale = 1.0 / (d as f64).sqrt();
            causal_self_attention(
                &x[0],
                &x[1],
                &x[2],
                &cos,
                &sin,
                heads,
                kv_heads,
                scale,
                None,
                Some(window),
                sinks.as_ref(),
            )
        });
        set_flash_wide_backward(before);
    }
}

/// [`check`] of `causal_self_attention` on random projections (seeds from `seed`) and RoPE
/// tables of these sizes.
fn check_self_attention(name: &str, (b, t, heads, kv_heads, d): Sizes5, seed: u64) {
    let (cos, sin) = rope_tables(t, d);
    let inputs = [
        (randn(&[b, t, heads * d], seed), Input::Cast),
        (randn(&[b, t, kv_heads * d], seed + 1), Input::Cast),
        (randn(&[b, t, kv_heads * d], seed + 2), Input::Cast),
        (cos, Input::F32),
        (sin, Input::F32),
    ];
    check(name, &inputs, |x| {
        let scale = 1.0 / (d as f64).sqrt();
        let (cos, sin) = (x[3].detach(), x[4].detach());
        causal_self_attention(
            &x[0], &x[1], &x[2], &cos, &sin, heads, kv_heads, scale, None, None, None,
        )
    });
}

/// Batch, sequence, heads, kv heads, head size.
type Sizes5 = (usize, usize, usize, usize, usize);

/// cuDNN's fused attention (the default) in place of the flash kernels (head
/// sizes 64 and 128, grouped-query heads) against the CPU's fused f32 path; cuDNN must have run
/// both passes of each case (up to cuDNN 9.15 only key counts that are multiples of 128 are
/// its: the 150 case then goes to the flash kernels).
#[test]
fn causal_self_attention_by_cudnn_matches_cpu() {
    let before = set_attention_cudnn(true);
    let version = cudnn_version().expect("cuDNN 9 on the library path (scripts/gpu/env.sh)");
    for (b, t, heads, kv_heads, d) in [(2, 128, 4, 2, 64), (2, 256, 6, 2, 64), (1, 150, 2, 1, 128)]
    {
        let runs = cudnn_attention_runs();
        let name = format!("cuDNN {version} causal_self_attention t{t} d{d}");
        check_self_attention(&name, (b, t, heads, kv_heads, d), 40);
        let served = cudnn_attention_runs() - runs;
        if t.is_multiple_of(128) || version > 91500 {
            assert!(
                attention_cudnn() && served >= 2,
                "cuDNN {version} did not serve b {b} t {t} heads {heads}/{kv_heads} d {d} \
                 ({served} plans ran; see stderr)"
            );
        }
    }
    set_attention_cudnn(before);
}

/// Packed rows on the GPU (bf16 flash kernels with segment ids and per-position RoPE tables)
/// against each sequence attended alone on the CPU in f32: outputs and q, k, v gradients of the
/// real rows (padding rows get a zero output gradient).
#[test]
fn packed_self_attention_matches_cpu() {
    let (t, heads, kv_heads, d) = (200usize, 4usize, 2usize, 64usize);
    let lengths: [&[usize]; 2] = [&[64, 70, 66], &[130, 60]];
    let b = lengths.len();
    let scale = 1.0 / (d as f64).sqrt();
    let rows = packed_rows(t, d, &lengths);
    let q = randn(&[b, t, heads * d], 40);
    let k = randn(&[b, t, kv_heads * d], 41);
    let v = randn(&[b, t, kv_heads * d], 42);
    let probe = randn(&[b, t, heads * d], 43)
        .broadcast_mul(&rows.real)
        .unwrap();
    let want = packed_reference((&q, &k, &v), &probe, &lengths, (heads, kv_heads, d), None);

    let dev = gpu();
    let on_gpu = |x: &Tensor| {
        Var::from_tensor(&x.to_device(&dev).unwrap().to_dtype(DType::BF16).unwrap()).unwrap()
    };
    let (qv, kv, vv) = (on_gpu(&q), on_gpu(&k), on_gpu(&v));
    let o = packed_self_attention(
        qv.as_tensor(),
        kv.as_tensor(),
        vv.as_tensor(),
        &rows.cos.to_device(&dev).unwrap(),
        &rows.sin.to_device(&dev).unwrap(),
        &rows.ids.to_device(&dev).unwrap(),
        None,
        None,
        heads,
        kv_heads,
        scale,
    )
    .unwrap()
    .expect("the flash kernels serve bf16 packed rows");
    let probe_gpu = probe
        .to_device(&dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let grads = (&o * probe_gpu)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let got = [
        host(&o).broadcast_mul(&rows.real).unwrap(),
        host(grads.get(qv.as_tensor()).unwrap()),
        host(grads.get(kv.as_tensor()).unwrap()),
        host(grads.get(vv.as_tensor()).unwrap()),
    ];
    for ((what, got), want) in ["output", "dq", "dk", "dv"].iter().zip(&got).zip(&want) {
        close(&format!("packed attention {what}"), got, want, 3e-2);
    }
}

/// Prefix tuning's attention: new tokens over unrotated virtual keys and values (seen by
/// every packed sequence) and their own keys, by the flash kernels; the output and the
/// gradients of q, k, v and of the prefix against transformers' attention over a cache.
#[test]
fn prefixed_self_attention_matches_cpu() {
    let (p, t, heads, kv_heads, d) = (20usize, 200usize, 4usize, 2usize, 64usize);
    let lengths: [&[usize]; 2] = [&[64, 70, 50], &[200]];
    let b = lengths.len();
    let scale = 1.0 / (d as f64).sqrt();
    let rows = prefixed_rows(p, t, d, &lengths);
    let q = randn(&[b, t, heads * d], 50);
    let k = randn(&[b, t, kv_heads * d], 51);
    let v = randn(&[b, t, kv_heads * d], 52);
    let pk = randn(&[b, kv_heads, p, d], 53);
    let pv = randn(&[b, kv_heads, p, d], 54);
    let probe = randn(&[b, t, heads * d], 55);
    let want = prefixed_reference(
        (&q, &k, &v),
        (&pk, &pv),
        &rows,
        &probe,
        (heads, kv_heads, d),
    );

    let dev = gpu();
    let bf16 = |x: &Tensor| x.to_device(&dev).unwrap().to_dtype(DType::BF16).unwrap();
    let vars: Vec<Var> = [&q, &k, &v, &pk, &pv]
        .iter()
        .map(|x| Var::from_tensor(&bf16(x)).unwrap())
        .collect();
    let x = |i: usize| vars[i].as_tensor();
    let o = prefixed_self_attention(
        (x(0), x(1), x(2)),
        (x(3), x(4)),
        &rows.cos.to_device(&dev).unwrap(),
        &rows.sin.to_device(&dev).unwrap(),
        Some(&rows.ids.to_device(&dev).unwrap()),
        heads,
        kv_heads,
        scale,
    )
    .unwrap()
    .expect("the flash kernels serve bf16 attention over a prefix");
    let grads = (&o * bf16(&probe))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut got = vec![host(&o)];
    got.extend((0..5).map(|i| host(grads.get(x(i)).unwrap())));
    let names = ["output", "dq", "dk", "dv", "prefix dk", "prefix dv"];
    for ((what, got), want) in names.iter().zip(&got).zip(&want) {
        close(&format!("prefixed attention {what}"), got, want, 3e-2);
    }
}
/// Gemma 3's local layers: a window shorter than the sequence takes the composed path (the
/// flash kernels have no window), in f32 and bf16.
#[test]
fn sliding_window_self_attention_matches_cpu() {
    let (b, t, heads, kv_heads, d, window) = (2, 40, 4, 2, 64, 16);
    let (cos, sin) = rope_tables(t, d);
    let inputs = [
        (randn(&[b, t, heads * d], 33), Input::Cast),
        (randn(&[b, t, kv_heads * d], 34), Input::Cast),
        (randn(&[b, t, kv_heads * d], 35), Input::Cast),
        (cos, Input::F32),
        (sin, Input::F32),
    ];
    check("sliding window self-attention", &inputs, |x| {
        let scale = 1.0 / (d as f64).sqrt();
        let (cos, sin) = (x[3].detach(), x[4].detach());
        let (q, k, v) = (&x[0], &x[1], &x[2]);
        causal_self_attention(
            q,
            k,
            v,
            &cos,
            &sin,
            heads,
            kv_heads,
            scale,
            None,
            Some(window),
            None,
        )
    });
}

#[test]
fn gated_activations_match_cpu() {
    let inputs = [
        ((randn(&[3, 4, 10], 13) * 3.0).unwrap(), Input::Cast),
        (randn(&[3, 4, 10], 14), Input::Cast),
    ];
    for act in [GatedActivation::Silu, GatedActivation::GeluTanh] {
        check(&format!("{act:?}"), &inputs, |x| {
            gated_act(&x[0], &x[1], act)
        });
    }
}

/// The residual add by our kernel (105 elements: a partial last pack of eight) and its
/// gradients (on a layer tape: `taped_block_gathers_input_gradients_as_the_cpu`).
#[test]
fn residual_add_matches_cpu() {
    let inputs = [
        (randn(&[3, 5, 7], 15), Input::Cast),
        (randn(&[3, 5, 7], 16), Input::Cast),
    ];
    check("add", &inputs, |x| peft_ops::add(&x[0], &x[1]));
}

/// A small case, and one with two rank groups of the thin kernels (r = 20) and rows split
/// over several blocks.
/// A decoder-like block run on a layer tape: q, k and v read one normed input (their shares
/// of its gradient added in place by cuBLAS on the GPU, with the LoRA terms', one with
/// dropout), a linear whose output gradient is the one gathered for its input, residual adds
/// whose gradient the RMSNorm backward kernel adds, a frozen MLP whose gate and up shares go
/// into one sum. dL/dx against the CPU (parameter gradients go to the tape's sink, unchecked
/// here).
#[test]
fn taped_block_gathers_input_gradients_as_the_cpu() {
    set_layer_tape(true);
    let before = set_lora_cublas(true);
    let inputs = [
        (randn(&[2, 6, 16], 40), Input::Cast),
        ((randn(&[16], 41) + 1.5).unwrap(), Input::Cast),
        ((randn(&[16, 16], 42) * 0.3).unwrap(), Input::Cast),
        ((randn(&[16, 16], 43) * 0.3).unwrap(), Input::Cast),
        ((randn(&[16, 16], 44) * 0.3).unwrap(), Input::Cast),
        (randn(&[4, 16], 45), Input::F32),
        (randn(&[16, 4], 46), Input::F32),
        ((randn(&[24, 16], 47) * 0.3).unwrap(), Input::Cast),
        ((randn(&[24, 16], 48) * 0.3).unwrap(), Input::Cast),
        ((randn(&[16, 24], 49) * 0.3).unwrap(), Input::Cast),
    ];
    for gather in [true, false] {
        let before_gather = set_tape_gather(gather);
        check_taped_block(&format!("taped block, gather {gather}"), &inputs);
        set_tape_gather(before_gather);
    }
    set_lora_cublas(before);
}

fn check_taped_block(name: &str, inputs: &[(Tensor, Input)]) {
    check(name, inputs, |t| {
        let sink = Arc::new(GradSink::default());
        let w = |i: usize| t[i].detach();
        taped(&t[0], &sink, |x| {
            let h = rms_norm(x, &w(1), 1e-5)?;
            let q = lora_linear(
                &h,
                &LinearWeight::Dense(w(2)),
                None,
                &t[5],
                &t[6],
                2.0,
                None,
            )?;
            // k with LoRA dropout: its masked low-rank term goes into the gathered sum too.
            let dropout = Some(Dropout { p: 0.25, seed: 7 });
            let k = lora_linear(
                &h,
                &LinearWeight::Dense(w(3)),
                None,
                &t[5],
                &t[6],
                2.0,
                dropout,
            )?;
            let v = frozen_linear(&h, &w(4))?;
            let y = add(x, &add(&q, &add(&k, &v)?)?)?;
            // y's gradient reaches this linear's backward as the very tensor the add handed
            // to both its arguments (not owned): it must not take g·W in place.
            let y = add(&y, &frozen_linear(&y, &w(4))?)?;
            let m = frozen_mlp(
                &rms_norm(&y, &w(1), 1e-5)?,
                &w(7),
                &w(8),
                &w(9),
                GatedActivation::Silu,
            )?;
            add(&y, &m)
        })
    });
}

#[test]
fn lora_linear_matches_cpu() {
    let before = set_lora_cublas(false);
    check_lora_linear("lora_linear", &[None, Some(Dropout { p: 0.25, seed: 5 })]);
    set_lora_cublas(before);
}

/// LoRA's thin products by cuBLAS (the default; bf16 activations, f32 takes our kernels),
/// with and without dropout, against the CPU f32 reference.
#[test]
fn lora_linear_by_cublas_matches_cpu() {
    let before = set_lora_cublas(true);
    check_lora_linear(
        "lora_linear by cublas",
        &[None, Some(Dropout { p: 0.25, seed: 5 })],
    );
    set_lora_cublas(before);
}

/// q, k and v sharing their products over their input against the CPU's sharing in f32,
/// every gradient (A's through the sink): by cuBLAS in bf16 (each layer's columns of
/// `x·A_catᵀ` read where they lie, its `g·B` written into its columns of a shared buffer), and
/// by our low-rank kernels (f32, and bf16 with `PEFT_CUDA_LORA=kernels`). On the GPU in bf16 no
/// A gets a gradient through candle's graph: the sharing ran there.
#[test]
fn lora_layers_sharing_an_input_match_cpu() {
    for cublas in [true, false] {
        let before = set_lora_cublas(cublas);
        check_shared_lora_layers(&format!("lora_linears, cublas {cublas}"));
        set_lora_cublas(before);
    }
}

fn check_shared_lora_layers(name: &str) {
    let (in_f, outs, ranks) = (32, [32, 16, 16], [8, 4, 8]);
    let mut inputs = vec![(randn(&[3, 40, in_f], 60), Input::Cast)];
    for (i, out) in outs.iter().enumerate() {
        inputs.push((
            (randn(&[*out, in_f], 61 + i as u64) * 0.3).unwrap(),
            Input::Cast,
        ));
    }
    for (i, (out, r)) in outs.iter().zip(ranks).enumerate() {
        inputs.push((randn(&[r, in_f], 64 + i as u64), Input::F32));
        inputs.push((randn(&[*out, r], 67 + i as u64), Input::F32));
    }
    let f = |t: &[Tensor], sink: &Arc<GradSink>| {
        let weights: Vec<LinearWeight> = t[1..4]
            .iter()
            .map(|w| LinearWeight::Dense(w.detach()))
            .collect();
        let layers: Vec<LoraProjection> = (0..3)
            .map(|i| LoraProjection {
                weight: &weights[i],
                a: &t[4 + 2 * i],
                b: &t[5 + 2 * i],
                scale: 1.0 + i as f64,
            })
            .collect();
        Tensor::cat(&lora_linears(&t[0], &layers, sink)?, 2)
    };
    check_sinking(name, &inputs, f);
    let dev = gpu();
    let vars: Vec<Var> = inputs
        .iter()
        .map(|(t, kind)| {
            let dt = match kind {
                Input::Cast => DType::BF16,
                Input::F32 => DType::F32,
            };
            Var::from_tensor(&t.to_device(&dev).unwrap().to_dtype(dt).unwrap()).unwrap()
        })
        .collect();
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let sink = Arc::new(GradSink::default());
    let y = f(&xs, &sink).unwrap();
    let grads = y
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for a in [4, 6, 8] {
        let through_graph = grads.get(vars[a].as_tensor()).is_some();
        assert!(!through_graph, "{name}: A {a} through the graph");
    }
}

fn check_lora_linear(name: &str, dropouts: &[Option<Dropout>]) {
    let shapes = [([2, 5, 16], 12, 4), ([3, 300, 40], 50, 20)];
    for ([b, t, in_f], out_f, r) in shapes {
        for &dropout in dropouts {
            let inputs = [
                (randn(&[b, t, in_f], 15), Input::Cast),
                ((randn(&[out_f, in_f], 16) * 0.5).unwrap(), Input::Cast),
                (randn(&[r, in_f], 17), Input::F32),
                (randn(&[out_f, r], 18), Input::F32),
            ];
            check(name, &inputs, |x| {
                lora_linear(
                    &x[0],
                    &LinearWeight::Dense(x[1].detach()),
                    None,
                    &x[2],
                    &x[3],
                    2.0,
                    dropout,
                )
            });
        }
    }
}

#[test]
fn cross_entropy_matches_cpu() {
    let labels: Vec<i64> = vec![3, -100, 0, 31, 7, 7, -100, 12, 1, 30];
    let inputs = [
        (randn(&[10, 16], 19), Input::Cast),
        (randn(&[32, 16], 20), Input::Cast),
    ];
    check("cross_entropy_chunked", &inputs, |x| {
        let lab = Tensor::new(labels.as_slice(), x[0].device())?;
        Ok(cross_entropy_chunked(&x[0], &x[1].detach(), &lab, 3)?.0)
    });
    // A trainable head (full fine-tuning): its gradient summed over the four chunks of rows
    // (in place by cuBLAS on the GPU).
    check("cross_entropy_chunked, trained head", &inputs, |x| {
        let lab = Tensor::new(labels.as_slice(), x[0].device())?;
        Ok(cross_entropy_chunked(&x[0], &x[1], &lab, 3)?.0)
    });
    // Gemma 2's soft cap of the logits (the GPU caps them before its loss kernel).
    check("cross_entropy_sum, soft-capped", &inputs, |x| {
        let lab = Tensor::new(labels.as_slice(), x[0].device())?;
        cross_entropy_sum(&x[0], &x[1], &lab, 8, 3, Some(2.0))
    });
    // What TRL logs beside the loss, from the GPU's loss kernel (f32: the same top-1 picks),
    // with every other label the CPU's argmax, so that some rows hit.
    let (h, w) = (&inputs[0].0, &inputs[1].0);
    let argmax: Vec<u32> = h
        .matmul(&w.t().unwrap())
        .unwrap()
        .argmax(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let labels: Vec<i64> = labels
        .iter()
        .zip(&argmax)
        .enumerate()
        .map(|(i, (&l, &a))| if i % 2 == 0 && l >= 0 { a as i64 } else { l })
        .collect();
    let stats = |device: &Device, cap: Option<f64>| -> (f32, f32) {
        let (h, w) = (h.to_device(device).unwrap(), w.to_device(device).unwrap());
        let lab = Tensor::new(labels.as_slice(), device).unwrap();
        let (_, s) = cross_entropy_sum_stats(&h, &w, &lab, 8, 3, cap).unwrap();
        let read = |t: &Tensor| host(t).to_scalar::<f32>().unwrap();
        (read(&s.entropy_sum), read(&s.top1))
    };
    for cap in [None, Some(2.0)] {
        let (entropy, top1) = stats(&gpu(), cap);
        let (entropy_ref, top1_ref) = stats(&Device::Cpu, cap);
        assert!(
            (entropy - entropy_ref).abs() <= 1e-3 * (1.0 + entropy_ref.abs()),
            "{cap:?}: entropy {entropy} vs {entropy_ref}"
        );
        assert_eq!(top1, top1_ref, "{cap:?}: top-1 hits");
        assert!(top1_ref > 0.0 && entropy_ref > 0.0);
    }
}

/// Partial rotary's reordering of head dims (an index select each way) on the GPU.
#[test]
fn permute_last_matches_cpu() {
    let order: [u32; 8] = [2, 0, 3, 1, 6, 4, 7, 5];
    let mut inverse = [0u32; 8];
    for (j, &from) in order.iter().enumerate() {
        inverse[from as usize] = j as u32;
    }
    let inputs = [(randn(&[3, 5, 8], 80), Input::Cast)];
    check("permute_last", &inputs, |x| {
        let dev = x[0].device();
        let (order, inverse) = (Tensor::new(&order, dev)?, Tensor::new(&inverse, dev)?);
        permute_last(&x[0], &order, &inverse)
    });
}

#[test]
fn checkpoint_matches_cpu() {
    let inputs = [
        (randn(&[2, 4, 8], 21), Input::Cast),
        (randn(&[16, 8], 22), Input::Cast),
    ];
    check("checkpoint", &inputs, |x| {
        let w = x[1].detach();
        let sink = Arc::new(GradSink::default());
        checkpoint(&x[0], &sink, move |h| {
            let up = frozen_linear(h, &w)?;
            gated_act(
                &up.narrow(2, 0, 8)?,
                &up.narrow(2, 8, 8)?,
                GatedActivation::Silu,
            )
        })
    });
}

/// A 4-bit weight quantized from GPU memory lives there and is dequantized by our kernel: the
/// same values as the CPU path, bit for bit in f32 and after rounding to bf16; and a QLoRA
/// matmul through it matches the CPU.
#[test]
fn quantized_weight_dequantizes_on_the_gpu() {
    use peft_quant::FourBit;
    let w = (randn(&[48, 64 * 5 + 16], 40) * 0.05).unwrap();
    let dev = gpu();
    for kind in [FourBit::Nf4, FourBit::Fp4] {
        for double_quant in [false, true] {
            for dtype in [DType::F32, DType::BF16] {
                let cpu = QuantizedWeight::quantize(&w, kind, double_quant, dtype).unwrap();
                let on_gpu = QuantizedWeight::quantize(
                    &w.to_device(&dev).unwrap(),
                    kind,
                    double_quant,
                    dtype,
                )
                .unwrap();
                let want = cpu.dequantize().unwrap().to_dtype(DType::F32).unwrap();
                let got = host(&on_gpu.dequantize().unwrap());
                let diff = max_abs(&(got - &want).unwrap());
                assert_eq!(
                    diff, 0.0,
                    "{kind:?} double {double_quant} {dtype:?}: {diff}"
                );
            }
        }
    }
    let inputs = [(randn(&[2, 3, 64 * 5 + 16], 41), Input::Cast)];
    check("quantized_linear", &inputs, |x| {
        let q = QuantizedWeight::quantize(
            &w.to_device(x[0].device())?,
            FourBit::Nf4,
            true,
            x[0].dtype(),
        )?;
        quantized_linear(&x[0], &Arc::new(q))
    });
}

/// The dropout mask drawn on the GPU is the CPU's, bit for bit.
#[test]
fn dropout_mask_on_the_gpu_is_the_cpus() {
    let n = 3 * 16384 + 5;
    let cpu = dropout_mask(99, 0.05, &[n], &Device::Cpu).unwrap();
    let gpu_mask = host(&dropout_mask(99, 0.05, &[n], &gpu()).unwrap());
    let diff = max_abs(&(gpu_mask - cpu).unwrap());
    assert_eq!(diff, 0.0, "masks differ by {diff}");
}
