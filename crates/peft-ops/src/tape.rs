//! Layer tapes: the decoder stack as one autograd node instead of one node per op.
//!
//! candle's backward accumulates every gradient into a zero tensor it allocates first (`zeros`
//! then `add`, even for a tensor with one consumer), so each op on the activation path costs a
//! memset and an add of its input's size: about fourteen per decoder layer, a tenth of a GPU
//! training step. While [`taped`] runs a block, every [`with_grad`](crate::with_grad) op (and
//! the residual [`add`]) also records its backward on a tape. When the block's output was made
//! by recorded ops only, the block becomes one node whose backward replays the tape: a gradient
//! with one consumer is handed on as it is, two are added once, and each op's saved tensors are
//! freed as soon as its backward ran. Parameter gradients go to a [`GradSink`] (the trainer
//! folds it into the step's gradients, as for checkpointing). Reshapes, casts and bias adds
//! have recorded forms here too ([`reshape`], [`cast`], [`add_bias`]). When any other candle op
//! touched the path (DoRA's composed ops, a bottleneck adapter), the block keeps candle's
//! graph, which it built all along: the tape never changes what is computed, only how the
//! backward is driven.

use crate::switches::Switch;
use crate::{with_grad3, GradSink, Grads3};
use candle_core::{DType, Result, Shape, Tensor, TensorId};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// The backward of a one-argument op: `(arg, value, dL/dvalue) -> dL/darg`.
pub(crate) type Backward1 = Arc<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;
/// The backward of a three-argument op: `(value, dL/dvalue) -> dL/dargs`.
pub(crate) type Backward3 = Arc<dyn Fn(&Tensor, &Tensor) -> Result<Grads3> + Send + Sync>;
/// The backward of a three-argument op that adds its first argument's gradient to the one the
/// tape has gathered for that argument so far (`None` outside a tape or when there is none
/// yet; see [`Accumulated`]): `(dL/dvalue, gathered) -> dL/dargs`. It does not read the op's
/// output, which the tape then does not keep (the linear layers' outputs, q and k among them,
/// are freed once their consumers have what they keep).
pub(crate) type BackwardAcc =
    Arc<dyn Fn(&Tensor, Option<Accumulated>) -> Result<Grads3> + Send + Sync>;

/// The gradient gathered so far for an op's first argument (a residual stream, an input that
/// several projections read), handed to the op's backward so that its own share is added
/// where it is computed (the RMSNorm backward kernel reads it; a matmul adds into it with
/// beta = 1) instead of by a separate add over the whole tensor.
///
/// The backward returns the sum as its first gradient, and that tensor must be held by no one
/// else: a new tensor, or `grad` itself updated in place, which only an `owned` gradient may
/// be (one the tape made and holds alone; a gradient an op handed on as it is, such as a
/// residual add's, may share its storage with another argument's). A backward without a
/// share of its own returns `None` (never `grad` as it is): the tape keeps `grad` as it was.
#[derive(Clone)]
pub(crate) struct Accumulated {
    pub grad: Tensor,
    /// Read by the ops that add in place: GPU ones only.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub owned: bool,
}

impl Accumulated {
    /// `grad + d`, in a new tensor (the fallback of ops that cannot add in place).
    pub fn plus(self, d: &Tensor) -> Result<Tensor> {
        crate::ops::add_same(&self.grad, d)
    }

    /// A backward's own share `d` added to the gradient gathered so far, if any (see
    /// [`Self::plus`]): the first gradient an accumulating backward returns.
    pub fn sum(gathered: Option<Self>, d: Tensor) -> Result<Tensor> {
        match gathered {
            Some(g) => g.plus(&d),
            None => Ok(d),
        }
    }
}

/// Turning layer tapes off (`PEFT_LAYER_TAPE=off`, or [`set_layer_tape`]) leaves candle's
/// graph in place: for comparisons and benchmarks.
pub const LAYER_TAPE_VAR: &str = "PEFT_LAYER_TAPE";

static LAYER_TAPES: Switch = Switch::new(LAYER_TAPE_VAR, &["off", "0"], true);

/// `PEFT_TAPE_GATHER=off` has a tape add each consumer's share of an input's gradient by a
/// separate add, instead of handing the gradient gathered so far to the next consumer's
/// backward (see [`Accumulated`]): for comparisons.
pub const TAPE_GATHER_VAR: &str = "PEFT_TAPE_GATHER";

static GATHER: Switch = Switch::new(TAPE_GATHER_VAR, &["off", "0"], true);

/// Whether tapes hand gathered gradients to the ops' backwards ([`TAPE_GATHER_VAR`]).
pub fn tape_gather_enabled() -> bool {
    GATHER.get()
}

/// Turns the handing on of gathered gradients on or off; returns the previous setting.
pub fn set_tape_gather(on: bool) -> bool {
    GATHER.set(on)
}

/// Whether [`taped`] records tapes (on this thread: see [`with_layer_tape`]).
pub fn layer_tape_enabled() -> bool {
    TAPE_ON_THIS_THREAD
        .get()
        .unwrap_or_else(|| LAYER_TAPES.get())
}

/// Turns layer tapes on or off for this process; returns the previous setting.
pub fn set_layer_tape(on: bool) -> bool {
    LAYER_TAPES.set(on)
}

/// `f()` with layer tapes on or off on this thread alone, whatever the process's setting: for
/// tests that compare both while others run beside them (a forward and its backward run on
/// the calling thread).
pub fn with_layer_tape<R>(on: bool, f: impl FnOnce() -> R) -> R {
    crate::switches::with_thread_setting(&TAPE_ON_THIS_THREAD, on, f)
}

thread_local! {
    static TAPE: RefCell<Option<Tape>> = const { RefCell::new(None) };
    /// [`with_layer_tape`]'s setting for this thread, over the process's.
    static TAPE_ON_THIS_THREAD: Cell<Option<bool>> = const { Cell::new(None) };
}

/// How a recorded op's argument takes its gradient.
#[derive(Clone, Copy)]
enum Arg {
    /// The block's input or a recorded op's output: accumulated on the tape.
    Inner(TensorId),
    /// A variable: its gradient goes to the sink.
    Param(TensorId),
    /// Needs no gradient.
    Constant,
}

enum Backward {
    One { arg: Tensor, backward: Backward1 },
    Three(Backward3),
    Accumulating(BackwardAcc),
}

struct Entry {
    args: [Arg; 3],
    /// The op's output as the graph knows it.
    output: TensorId,
    /// The op's output (detached: no reference to candle's graph), for backwards that read it
    /// (not an accumulating one's).
    value: Option<Tensor>,
    backward: Backward,
}

struct Tape {
    /// The block's input and every recorded output.
    inner: HashSet<TensorId>,
    /// The first variable an op read: the block's node hangs from it when its input needs no
    /// gradient (a frozen embedding's output).
    first_param: Option<Tensor>,
    entries: Vec<Entry>,
    /// Whether an op read a tensor of the graph that no recorded op made.
    broken: bool,
}

impl Tape {
    fn arg(&mut self, t: &Tensor) -> Arg {
        if self.inner.contains(&t.id()) {
            Arg::Inner(t.id())
        } else if t.is_variable() {
            if self.first_param.is_none() {
                self.first_param = Some(t.clone());
            }
            Arg::Param(t.id())
        } else if t.track_op() {
            self.broken = true;
            Arg::Constant
        } else {
            Arg::Constant
        }
    }

    fn push(&mut self, args: [Arg; 3], value: &Tensor, backward: Backward) {
        self.inner.insert(value.id());
        let kept = match backward {
            Backward::Accumulating(_) => None,
            _ => Some(value.detach()),
        };
        self.entries.push(Entry {
            args,
            output: value.id(),
            value: kept,
            backward,
        });
    }
}

/// Records a one-argument op (`value = op(arg)`) on the running tape, if any.
pub(crate) fn record1(arg: &Tensor, value: &Tensor, backward: &Backward1) {
    TAPE.with(|tape| {
        if let Some(tape) = tape.borrow_mut().as_mut() {
            let args = [tape.arg(arg), Arg::Constant, Arg::Constant];
            let backward = Backward::One {
                arg: arg.detach(),
                backward: backward.clone(),
            };
            tape.push(args, value, backward);
        }
    })
}

/// Records a three-argument op on the running tape, if any. An argument given twice takes
/// its gradient once, from its first position (the convention of two-input ops).
pub(crate) fn record3(args: [&Tensor; 3], value: &Tensor, backward: &Backward3) {
    record(args, value, || Backward::Three(backward.clone()))
}

/// [`record3`] for an op whose backward accumulates its first argument's gradient (see
/// [`Accumulated`]).
pub(crate) fn record_accumulating(args: [&Tensor; 3], value: &Tensor, backward: &BackwardAcc) {
    record(args, value, || Backward::Accumulating(backward.clone()))
}

fn record(args: [&Tensor; 3], value: &Tensor, backward: impl FnOnce() -> Backward) {
    TAPE.with(|tape| {
        if let Some(tape) = tape.borrow_mut().as_mut() {
            let mut kinds = [Arg::Constant; 3];
            for (i, t) in args.iter().enumerate() {
                if !args[..i].iter().any(|p| p.id() == t.id()) {
                    kinds[i] = tape.arg(t);
                }
            }
            tape.push(kinds, value, backward());
        }
    })
}

/// `y`, which a candle op made from `args`, recorded on the running tape with `backward`;
/// not when candle handed back an argument itself (a reshape or cast that changes nothing).
fn recorded(
    args: [&Tensor; 3],
    y: Tensor,
    backward: impl Fn(&Tensor, &Tensor) -> Result<Grads3> + Send + Sync + 'static,
) -> Result<Tensor> {
    if y.track_op() && args.iter().all(|a| a.id() != y.id()) {
        let backward: Backward3 = Arc::new(backward);
        record3(args, &y, &backward);
    }
    Ok(y)
}

/// `a + b` (same shapes): a residual connection, recorded on the running tape.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.id() == b.id() {
        // An argument given twice takes its gradient once (see [`record3`]): both shares here.
        return recorded([a, a, a], (a + a)?, |_, grad| {
            Ok((Some((grad * 2.0)?), None, None))
        });
    }
    let backward = |_: &Tensor, grad: &Tensor| Ok((Some(grad.clone()), Some(grad.clone()), None));
    match crate::ops::add_value(a, b)? {
        Some(value) => with_grad3((a, b, b), value, backward),
        None => recorded([a, b, b], (a + b)?, backward),
    }
}

/// `x · s` for a constant `s` (its gradient scaled alike), recorded on the running tape:
/// Granite's residual multiplier.
pub fn scale(x: &Tensor, s: f64) -> Result<Tensor> {
    recorded([x, x, x], (x * s)?, move |_, grad| {
        Ok((Some((grad * s)?), None, None))
    })
}

/// `y + bias` for `y` `[.., n]` and `bias` `[n]` (the bias's gradient summed over the rows),
/// recorded on the running tape.
pub fn add_bias(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let n = bias.elem_count();
    let bias_shape = bias.shape().clone();
    recorded([y, bias, bias], y.broadcast_add(bias)?, move |_, grad| {
        let d_bias = grad.reshape(((), n))?.sum(0)?.reshape(&bias_shape)?;
        Ok((Some(grad.clone()), Some(d_bias), None))
    })
}

/// `x` reshaped (its gradient reshaped back), recorded on the running tape: Qwen3's and
/// Gemma 3's per-head norms.
pub fn reshape(x: &Tensor, shape: impl Into<Shape>) -> Result<Tensor> {
    let back = x.shape().clone();
    recorded([x, x, x], x.reshape(shape)?, move |_, grad| {
        Ok((Some(grad.reshape(&back)?), None, None))
    })
}

/// Columns `start..start + len` of `x`'s last dimension, contiguous (the gradient placed back
/// among zeros), recorded on the running tape: the q, k and v (gate and up) parts of a fused
/// projection's output.
pub fn narrow_last(x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let width = *dims.last().unwrap_or(&0);
    let value = x.narrow(candle_core::D::Minus1, start, len)?.contiguous()?;
    recorded([x, x, x], value, move |_, grad| {
        let zeros = |n: usize| {
            let mut shape = dims.clone();
            *shape.last_mut().expect("narrowed a dimension") = n;
            Tensor::zeros(shape, grad.dtype(), grad.device())
        };
        let (before, after) = (zeros(start)?, zeros(width - start - len)?);
        let full = Tensor::cat(&[&before, grad, &after], dims.len() - 1)?;
        Ok((Some(full), None, None))
    })
}

/// `x` with its last dimension reordered, `y[.., j] = x[.., order[j]]`, for a permutation
/// `order` (u32) whose inverse is `inverse` (the gradient reordered back), recorded on the
/// running tape: partial rotary's head dims moved to where RoPE pairs them.
pub fn permute_last(x: &Tensor, order: &Tensor, inverse: &Tensor) -> Result<Tensor> {
    let last = x.rank() - 1;
    let inverse = inverse.clone();
    let value = x.contiguous()?.index_select(order, last)?;
    recorded([x, x, x], value, move |_, grad| {
        Ok((
            Some(grad.contiguous()?.index_select(&inverse, last)?),
            None,
            None,
        ))
    })
}

/// `x` in `dtype` (its gradient cast back), recorded on the running tape: the f32 norms of a
/// k-bit model cast bf16 activations; trained f32 weights and biases of a bf16 model are cast
/// to it.
pub fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    let back = x.dtype();
    recorded([x, x, x], x.to_dtype(dtype)?, move |_, grad| {
        Ok((Some(grad.to_dtype(back)?), None, None))
    })
}

/// Ends the tape on every exit of [`taped`], also by an error.
struct Recording;

impl Drop for Recording {
    fn drop(&mut self) {
        TAPE.with(|t| t.borrow_mut().take());
    }
}

/// `f(x)`, as one autograd node whose backward replays the tape of `f`'s ops (see the module
/// documentation); parameter gradients go to `sink`. Runs `f` as it is when tapes are off,
/// gradients are off, or a tape is already recording (an enclosing block's).
pub fn taped(
    x: &Tensor,
    sink: &Arc<GradSink>,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let nested = TAPE.with(|t| t.borrow().is_some());
    if nested || !layer_tape_enabled() || !crate::grad_enabled() {
        return f(x);
    }
    let tape = Tape {
        inner: HashSet::from([x.id()]),
        first_param: None,
        entries: Vec::new(),
        broken: false,
    };
    let recording = Recording;
    TAPE.with(|t| *t.borrow_mut() = Some(tape));
    let y = f(x)?;
    let tape = TAPE
        .with(|t| t.borrow_mut().take())
        .ok_or_else(|| candle_core::Error::Msg("layer tape: the recording was lost".into()))?;
    drop(recording);
    let anchor = if x.track_op() {
        x.clone()
    } else {
        match &tape.first_param {
            Some(p) => p.clone(),
            None => return Ok(y),
        }
    };
    if tape.broken || !y.track_op() || y.id() == x.id() || !tape.inner.contains(&y.id()) {
        return Ok(y);
    }
    let (input, output) = (x.id(), y.id());
    let entries = Mutex::new(Some(tape.entries));
    let sink = sink.clone();
    let x_tracks = x.track_op();
    with_grad3(
        (x, &anchor, &anchor),
        y.detach(),
        move |_, grad| -> Result<Grads3> {
            let entries = entries
                .lock()
                .map_err(|_| candle_core::Error::Msg("layer tape: poisoned lock".into()))?
                .take()
                .ok_or_else(|| candle_core::Error::Msg("layer tape: replayed twice".into()))?;
            let d_x = replay(entries, input, output, grad, &sink)?;
            Ok((d_x.filter(|_| x_tracks), None, None))
        },
    )
}

/// The output an entry kept for its backward.
fn kept_value(entry: &Entry) -> Result<&Tensor> {
    entry
        .value
        .as_ref()
        .ok_or_else(|| candle_core::Error::Msg("layer tape: an op's output was not kept".into()))
}

/// The tape's backward: dL/d(block input) from dL/d(output), parameter gradients to `sink`.
fn replay(
    mut entries: Vec<Entry>,
    input: TensorId,
    output: TensorId,
    grad: &Tensor,
    sink: &GradSink,
) -> Result<Option<Tensor>> {
    // Each gradient gathered so far, and whether no one else holds it (see [`Accumulated`]).
    let mut grads: HashMap<TensorId, Accumulated> = HashMap::from([(
        output,
        Accumulated {
            grad: grad.clone(),
            owned: false,
        },
    )]);
    let gather = tape_gather_enabled();
    while let Some(entry) = entries.pop() {
        let Some(Accumulated { grad: g, .. }) = grads.remove(&entry.output) else {
            continue;
        };
        let arg_grads = match (&entry.backward, entry.args[0]) {
            (Backward::One { arg, backward }, _) => {
                (Some(backward(arg, kept_value(&entry)?, &g)?), None, None)
            }
            (Backward::Three(backward), _) => backward(kept_value(&entry)?, &g)?,
            (Backward::Accumulating(backward), Arg::Inner(id)) if gather => {
                let acc = grads.remove(&id);
                let kept = acc.clone();
                let (sum, d1, d2) = backward(&g, acc)?;
                // The sum is held by no one else: it may take later shares in place. An op
                // without a share of its own leaves the gathered gradient as it was.
                let gathered = match sum {
                    Some(grad) => Some(Accumulated { grad, owned: true }),
                    None => kept,
                };
                if let Some(gathered) = gathered {
                    grads.insert(id, gathered);
                }
                (None, d1, d2)
            }
            (Backward::Accumulating(backward), _) => backward(&g, None)?,
        };
        // The entry (its saved tensors) is freed here, before the earlier ops run.
        drop(g);
        let Entry { args, .. } = entry;
        for (arg, d) in args
            .into_iter()
            .zip([arg_grads.0, arg_grads.1, arg_grads.2])
        {
            let Some(d) = d else { continue };
            match arg {
                Arg::Inner(id) => {
                    let gathered = match grads.remove(&id) {
                        Some(prev) => Accumulated {
                            grad: crate::ops::add_same(&prev.grad, &d)?,
                            owned: true,
                        },
                        None => Accumulated {
                            grad: d,
                            owned: false,
                        },
                    };
                    grads.insert(id, gathered);
                }
                Arg::Param(id) => sink.add(id, &d)?,
                Arg::Constant => {}
            }
        }
    }
    Ok(grads.remove(&input).map(|a| a.grad))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{linear, rms_norm};
    use candle_core::{Device, Var};

    fn randn(seed: u64, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 + 1) * (seed * 2 + 1) * 2654435761 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// A residual block `y = x + linear(norm(x))` (`· 2` inside when `unrecorded`: an op the
    /// tape does not know), then `linear(y) + bias` through casts of the weight, taped or not:
    /// the gradients of x, the weight, the norm's scale and the bias (through the sink where
    /// the tape served), and the number of nodes candle's backward walks.
    fn block_grads(x_trains: bool, unrecorded: bool, tape: bool) -> (Vec<Vec<f32>>, usize) {
        let x = Var::from_tensor(&randn(1, &[6, 8])).unwrap();
        let (w, norm, bias) = (
            Var::from_tensor(&randn(2, &[8, 8])).unwrap(),
            Var::from_tensor(&(randn(3, &[8]) + 1.5).unwrap()).unwrap(),
            Var::from_tensor(&randn(5, &[8])).unwrap(),
        );
        let input = if x_trains {
            x.as_tensor().clone()
        } else {
            x.as_tensor().detach()
        };
        let sink = Arc::new(GradSink::default());
        let block = |x: &Tensor| -> Result<Tensor> {
            // Through bf16 and back: the cast is recorded too.
            let x = &cast(&cast(x, DType::BF16)?, DType::F32)?;
            let mut h = linear(&rms_norm(x, norm.as_tensor(), 1e-5)?, w.as_tensor())?;
            if unrecorded {
                h = (h * 2.0)?;
            }
            let y = add(x, &h)?;
            // A trained weight through casts (a bf16 model's f32 weight) and a trained bias.
            let w16 = cast(&cast(w.as_tensor(), DType::BF16)?, DType::F32)?;
            add_bias(&linear(&y, &w16)?, bias.as_tensor())
        };
        let y = if tape {
            taped(&input, &sink, block).unwrap()
        } else {
            block(&input).unwrap()
        };
        let loss = (y * randn(4, &[6, 8])).unwrap().sum_all().unwrap();
        let nodes = loss.sorted_nodes().len();
        let mut grads = loss.backward().unwrap();
        sink.drain_into(&mut grads).unwrap();
        let mut vars = vec![&w, &norm, &bias];
        if x_trains {
            vars.push(&x);
        }
        let values = vars
            .iter()
            .map(|v| {
                let g = grads
                    .get(v.as_tensor())
                    .expect("a gradient for every variable");
                g.flatten_all().unwrap().to_vec1().unwrap()
            })
            .collect();
        (values, nodes)
    }

    fn assert_close(a: &[Vec<f32>], b: &[Vec<f32>]) {
        assert_eq!(a.len(), b.len());
        for (a, b) in a.iter().zip(b) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn a_taped_block_has_the_gradients_of_the_graph() {
        set_layer_tape(true);
        for x_trains in [true, false] {
            let (graph, graph_nodes) = block_grads(x_trains, false, false);
            let (taped, taped_nodes) = block_grads(x_trains, false, true);
            assert_close(&graph, &taped);
            // loss, its product, the block and the variables it hangs from.
            assert!(taped_nodes < graph_nodes, "{taped_nodes} vs {graph_nodes}");
            assert!(taped_nodes <= 5, "{taped_nodes} nodes");
        }
    }

    /// `s1 += 2 · s2` (contiguous f32): the in-place share of [`doubled`]'s backward.
    struct AddTwice;

    impl candle_core::InplaceOp2 for AddTwice {
        fn name(&self) -> &'static str {
            "add-twice"
        }

        fn cpu_fwd(
            &self,
            s1: &mut candle_core::CpuStorage,
            _: &candle_core::Layout,
            s2: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> Result<()> {
            match (s1, s2) {
                (candle_core::CpuStorage::F32(a), candle_core::CpuStorage::F32(b)) => {
                    a.iter_mut().zip(b).for_each(|(a, b)| *a += 2.0 * b);
                    Ok(())
                }
                _ => candle_core::bail!("add-twice: f32 only"),
            }
        }
    }

    /// `2 · x`, whose backward adds its share into an owned gathered gradient in place (as the
    /// GPU's linear layers do), counting how often it did.
    fn doubled(x: &Tensor, in_place: &Arc<Mutex<usize>>) -> Result<Tensor> {
        let in_place = in_place.clone();
        crate::grad::with_grad3_acc((x, x, x), (x.detach() * 2.0)?, move |g, gathered| {
            let sum = match gathered {
                Some(acc) if acc.owned => {
                    acc.grad.inplace_op2(g, &AddTwice)?;
                    *in_place.lock().unwrap() += 1;
                    acc.grad
                }
                Some(acc) => acc.plus(&(g * 2.0)?)?,
                None => (g * 2.0)?,
            };
            Ok((Some(sum), None, None))
        })
    }

    /// dL/dx of `sum(block(x) ∘ weight)`, with `block` on a tape (its gradients to `sink`) or not.
    fn input_grad(
        x: &Var,
        weight: &Tensor,
        sink: Option<&Arc<GradSink>>,
        block: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Vec<f32> {
        let y = match sink {
            Some(sink) => taped(x.as_tensor(), sink, block).unwrap(),
            None => block(x.as_tensor()).unwrap(),
        };
        let loss = (y * weight).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap();
        g.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Fan-out (three projections of one input), residual adds whose two arguments share one
    /// gradient tensor, and an op reading the residual sum it feeds: the tape's gradient of x
    /// is the graph's, the shares after the first were added in place, and none was added into
    /// a gradient another argument shares (candle refuses an in-place op on aliased storage).
    #[test]
    fn gathered_gradients_take_shares_in_place_only_when_owned() {
        set_layer_tape(true);
        let x = Var::from_tensor(&randn(7, &[4, 6])).unwrap();
        let weight = randn(8, &[4, 6]);
        let run = |tape: bool| -> (Vec<f32>, usize) {
            let in_place = Arc::new(Mutex::new(0));
            let sink = Arc::new(GradSink::default());
            let block = |x: &Tensor| -> Result<Tensor> {
                let (q, k, v) = (
                    doubled(x, &in_place)?,
                    doubled(x, &in_place)?,
                    doubled(x, &in_place)?,
                );
                let y = add(x, &add(&q, &add(&k, &v)?)?)?;
                // y's gradient is shared by the add's two arguments.
                let z = doubled(&y, &in_place)?;
                add(&y, &z)
            };
            let g = input_grad(&x, &weight, tape.then_some(&sink), block);
            let count = *in_place.lock().unwrap();
            (g, count)
        };
        let (graph, graph_in_place) = run(false);
        let (taped, taped_in_place) = run(true);
        assert_close(std::slice::from_ref(&graph), &[taped]);
        assert_eq!(graph_in_place, 0);
        // k's and q's shares went into v's (owned) gradient; z's and the residual's did not.
        assert_eq!(taped_in_place, 2);
        // Without handing gradients on, the tape adds every share itself.
        let before = set_tape_gather(false);
        let (summed, summed_in_place) = run(true);
        set_tape_gather(before);
        assert_close(&[graph], &[summed]);
        assert_eq!(summed_in_place, 0);
    }

    /// with_layer_tape's setting holds on its thread alone, and is undone after a panic too.
    #[test]
    fn a_thread_sets_tapes_for_itself() {
        let global = layer_tape_enabled();
        with_layer_tape(!global, || {
            assert_eq!(layer_tape_enabled(), !global);
            let other = std::thread::spawn(layer_tape_enabled).join().unwrap();
            assert_eq!(other, global);
        });
        assert_eq!(layer_tape_enabled(), global);
        let panicked = std::panic::catch_unwind(|| with_layer_tape(!global, || panic!("inside")));
        assert!(panicked.is_err());
        assert_eq!(layer_tape_enabled(), global);
    }

    /// `x + x` on a tape: both shares of the gradient, as candle's graph gives them.
    #[test]
    fn a_tensor_added_to_itself_has_both_shares() {
        set_layer_tape(true);
        let x = Var::from_tensor(&randn(9, &[3, 5])).unwrap();
        let weight = randn(10, &[3, 5]);
        let grad = |tape: bool| -> Vec<f32> {
            let sink = Arc::new(GradSink::default());
            input_grad(&x, &weight, tape.then_some(&sink), |x| add(x, x))
        };
        let want: Vec<f32> = (&weight * 2.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_close(&[grad(false)], std::slice::from_ref(&want));
        assert_close(&[grad(true)], &[want]);
    }

    #[test]
    fn an_op_the_tape_does_not_know_keeps_the_graph() {
        set_layer_tape(true);
        let (graph, graph_nodes) = block_grads(true, true, false);
        let (taped, taped_nodes) = block_grads(true, true, true);
        assert_close(&graph, &taped);
        assert_eq!(taped_nodes, graph_nodes);
    }
}
