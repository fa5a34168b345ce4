//! Gradient checkpointing: run a block without keeping its activations, recompute them in the
//! backward pass.
//!
//! candle's backward cannot hand gradients of parameters used inside a custom op back to the
//! outer graph, so the recomputation's parameter gradients go to a [`GradSink`] that the
//! trainer folds into the step's gradients after `backward()`.

use crate::with_grad;
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId, Var};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether ops should record the autograd graph on this thread.
pub fn grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Runs `f` with graph recording off: [`param`] hands out detached tensors meanwhile.
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    let _off = NoGrad::new();
    f()
}

/// Gradients off until this guard drops (the scoped form of [`no_grad`]).
pub struct NoGrad {
    before: bool,
}

impl NoGrad {
    pub fn new() -> Self {
        Self {
            before: GRAD_ENABLED.with(|g| g.replace(false)),
        }
    }
}

impl Default for NoGrad {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NoGrad {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.before));
    }
}

/// A trainable tensor as a layer should use it: detached while gradients are off.
pub fn param(t: &Tensor) -> Tensor {
    if grad_enabled() {
        t.clone()
    } else {
        t.detach()
    }
}

/// Parameter gradients produced while recomputing checkpointed blocks.
#[derive(Default)]
pub struct GradSink(Mutex<HashMap<TensorId, Tensor>>);

impl GradSink {
    pub(crate) fn add(&self, id: TensorId, grad: &Tensor) -> Result<()> {
        let mut map = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned grad sink".into()))?;
        let sum = match map.remove(&id) {
            Some(prev) => (prev + grad)?,
            None => grad.clone(),
        };
        map.insert(id, sum);
        Ok(())
    }

    /// Drops whatever was collected (a backward that failed midway leaves some behind).
    pub fn clear(&self) -> Result<()> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned grad sink".into()))?
            .clear();
        Ok(())
    }

    /// Adds the collected gradients to `store` and empties the sink.
    pub fn drain_into(&self, store: &mut GradStore) -> Result<()> {
        let mut map = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned grad sink".into()))?;
        for (id, g) in map.drain() {
            let sum = match store.get_id(id) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            store.insert_id(id, sum);
        }
        Ok(())
    }
}

/// Adds `grad` to the gradient `store` holds for tensor `id` (or stores it if there is none).
pub fn add_grad(store: &mut GradStore, id: TensorId, grad: Tensor) -> Result<()> {
    let sum = match store.get_id(id) {
        Some(prev) => (prev + grad)?,
        None => grad,
    };
    store.insert_id(id, sum);
    Ok(())
}

/// `f(x)` whose activations are recomputed in the backward pass instead of kept. `x` must be
/// part of the graph (make the first block's input depend on a variable), otherwise no
/// backward reaches the block and its parameters get no gradient.
pub fn checkpoint(
    x: &Tensor,
    sink: &Arc<GradSink>,
    f: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let y = no_grad(|| f(&x.detach()))?;
    let sink = sink.clone();
    with_grad(x, y, move |x, _, grad| {
        let input = Var::from_tensor(&x.detach())?;
        let y = f(input.as_tensor())?;
        let grads = (y * grad.detach())?.sum_all()?.backward()?;
        // Gradients computed by candle can still reference the recomputed graph; detach them
        // so that each block's activations are freed as soon as its backward is done.
        for id in grads.get_ids() {
            if *id != input.id() {
                sink.add(*id, &grads.get_id(*id).expect("listed id").detach())?;
            }
        }
        grads
            .get(input.as_tensor())
            .map(Tensor::detach)
            .ok_or_else(|| candle_core::Error::Msg("checkpointed block ignores its input".into()))
    })
}
