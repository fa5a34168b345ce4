//! cuDNN's fused attention (the GPU default; `PEFT_CUDA_ATTENTION=flash` turns it off): the
//! causal attention forward and backward of our flash kernels, as cuDNN operation graphs
//! ([`graph`]) run by the engines cuDNN picks for them ([`backend`]). On the same rotated q
//! and k as the flash kernels, with the same log-sum-exp between the passes; plans are built
//! once per device and shape.

// Without the `cuda` feature only the tests use them (the graphs' meaning and their plans).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) mod backend;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) mod graph;

#[cfg(feature = "cuda")]
pub(crate) use device::{backward, fall_back, forward, has_plan, RUNS};

#[cfg(feature = "cuda")]
mod device {
    use super::backend::{self, Handle, Plan, Target};
    use super::graph::{self, Graph, Port, Problem};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaStream, CudaView, DevicePtr, DeviceRepr, SyncOnDrop,
    };
    use candle_core::cuda_backend::CudaDevice;
    use half::bf16;
    use std::collections::hash_map::{Entry, HashMap};
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    /// Plans with their graphs, by pass (forward or not) and problem ([`key`]).
    type Plans = HashMap<(bool, [u64; 6]), Arc<(Graph, Plan)>>;

    /// A device's cuDNN handle and the plans built on it.
    struct DeviceState {
        handle: Handle,
        plans: Plans,
        /// Passes and problems cuDNN built no plan for (the flash kernels serve them).
        refused: HashSet<(bool, [u64; 6])>,
        /// Whether a shape found the plans at [`MAX_SHAPES`] (said once).
        full: bool,
    }

    /// Per device ordinal. Plans run under this lock: a handle is not for concurrent use.
    static DEVICES: Mutex<Option<HashMap<usize, DeviceState>>> = Mutex::new(None);

    fn key(p: &Problem) -> [u64; 6] {
        let [b, h, kvh, t, d] = [p.b, p.heads, p.kv_heads, p.t, p.d].map(|x| x as u64);
        [b, h, kvh, t, d, p.scale.to_bits() as u64]
    }

    /// Shapes a device keeps plans for, a pass. Each plan compiles its kernels (about a second):
    /// batches padded to their longest row come in many lengths, and past this many the flash
    /// kernels serve the new ones.
    const MAX_SHAPES: usize = 32;

    /// Plans run so far (the tests' evidence that cuDNN served them).
    pub(crate) static RUNS: AtomicUsize = AtomicUsize::new(0);

    /// Whether `version`'s attention engines serve `p`'s pass correctly, as cudnn-frontend
    /// knows them: 9.10.0 and 9.10.1 have backward bugs; a causal pass over one query is
    /// refused (a backward always, a forward up to 9.9); up to 9.15, a backward over a key
    /// count off a multiple of 128 needs a padding mask these graphs do not have (the flash
    /// kernels serve).
    fn serves(version: usize, p: &Problem, forward: bool) -> Result<bool, String> {
        if version == 91000 || version == 91001 {
            return Err(format!(
                "cuDNN {version}'s attention backward has known bugs"
            ));
        }
        if forward {
            return Ok(p.t > 1 || version > 90900);
        }
        Ok(p.t > 1 && (version > 91500 || p.t.is_multiple_of(128)))
    }

    /// The device's state, its handle made on first use, under the lock; the device's context
    /// is bound to this thread first, as cuDNN builds and launches kernels in the current one.
    fn with_state<R>(
        dev: &CudaDevice,
        f: impl FnOnce(&mut DeviceState) -> Result<R, String>,
    ) -> Result<R, String> {
        let stream = dev.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| format!("cuDNN: {e:?}"))?;
        let mut devices = DEVICES
            .lock()
            .map_err(|_| "cuDNN: a plan failed on another thread".to_string())?;
        let devices = devices.get_or_insert_with(HashMap::new);
        let state = match devices.entry(stream.context().ordinal()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(DeviceState {
                handle: Handle::new()?,
                plans: HashMap::new(),
                refused: HashSet::new(),
                full: false,
            }),
        };
        f(state)
    }

    /// The plan of `p`'s forward (`forward`) or backward, built on first use; `None` where
    /// cuDNN is not to serve it ([`serves`]), built no plan for it (said once a shape), or it
    /// is a new shape past [`MAX_SHAPES`].
    fn plan_for(
        dev: &CudaDevice,
        p: &Problem,
        forward: bool,
    ) -> Result<Option<Arc<(Graph, Plan)>>, String> {
        let version = backend::version()?;
        if !serves(version, p, forward)? {
            return Ok(None);
        }
        let id = (forward, key(p));
        with_state(dev, |state| {
            if let Some(e) = state.plans.get(&id) {
                return Ok(Some(e.clone()));
            }
            if state.refused.contains(&id) {
                return Ok(None);
            }
            if state.plans.keys().filter(|k| k.0 == forward).count() >= MAX_SHAPES {
                if !state.full {
                    state.full = true;
                    eprintln!(
                        "peft: cuDNN attention plans built for {MAX_SHAPES} shapes; new shapes \
                         use the flash attention kernels (`peft train --pad-to-multiple-of 128` \
                         keeps batches to fewer shapes)"
                    );
                }
                return Ok(None);
            }
            let masked = graph::masked_score(version);
            let graph = if forward {
                graph::forward(p, masked)
            } else {
                graph::backward(p, masked)
            };
            match backend::plan(&graph, &Target::Handle(&state.handle)) {
                Ok(plan) => {
                    let e = Arc::new((graph, plan));
                    state.plans.insert(id, e.clone());
                    Ok(Some(e))
                }
                Err(why) => {
                    let pass = if forward { "forward" } else { "backward" };
                    eprintln!(
                        "peft: cuDNN built no plan for the attention {pass} of {p:?} ({why}); \
                         the flash attention kernels serve it"
                    );
                    state.refused.insert(id);
                    Ok(None)
                }
            }
        })
    }

    /// Whether cuDNN has a plan for `p`'s forward (`forward`) or backward (see [`plan_for`]).
    pub(crate) fn has_plan(dev: &CudaDevice, p: &Problem, forward: bool) -> Result<bool, String> {
        plan_for(dev, p, forward).map(|e| e.is_some())
    }

    /// Runs `entry`'s plan on `dev`'s stream with `buffers`.
    fn execute(
        dev: &CudaDevice,
        entry: &(Graph, Plan),
        buffers: &[(Port, u64)],
    ) -> Result<(), String> {
        let (graph, plan) = entry;
        let ids = buffers
            .iter()
            .map(|(port, ptr)| {
                graph
                    .port(*port)
                    .map(|t| (t.uid, *ptr))
                    .ok_or_else(|| format!("cuDNN: the attention graph has no {port:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let stream = dev.cuda_stream();
        // SAFETY: 256 bytes at least, as cuDNN aligns its workspace; written by the plan only.
        let workspace =
            unsafe { dev.alloc::<u8>(plan.workspace.max(256)) }.map_err(|e| e.to_string())?;
        let (ws, _ws_guard) = workspace.device_ptr(&stream);
        with_state(dev, |state| {
            // SAFETY: the callers pass live buffers of the graph's layouts on this device; the
            // workspace is the plan's size; the stream is the device's.
            unsafe { backend::execute(&state.handle, stream.cu_stream() as _, plan, &ids, ws) }
        })?;
        RUNS.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A device address for the plan (the guard orders the stream's uses of the buffer).
    fn address<'a, T: DeviceRepr>(
        x: &'a impl DevicePtr<T>,
        stream: &'a CudaStream,
        guards: &mut Vec<SyncOnDrop<'a>>,
    ) -> u64 {
        let (ptr, guard) = x.device_ptr(stream);
        guards.push(guard);
        ptr
    }

    /// The addresses of both passes' inputs: rotated q and k, and v.
    fn inputs<'a>(
        (q, k, v): (&'a CudaView<bf16>, &'a CudaView<bf16>, &'a CudaView<bf16>),
        stream: &'a CudaStream,
        guards: &mut Vec<SyncOnDrop<'a>>,
    ) -> Vec<(Port, u64)> {
        vec![
            (Port::Q, address(q, stream, guards)),
            (Port::K, address(k, stream, guards)),
            (Port::V, address(v, stream, guards)),
        ]
    }

    /// The attention forward: `o` (`[b, t, heads · d]`) and the log-sum-exp `stats`
    /// (`[b, heads, t]`) from rotated `q` and `k` and from `v`, as the flash forward writes them;
    /// `false` where the flash kernels are to (see [`plan_for`]).
    pub(crate) fn forward(
        dev: &CudaDevice,
        p: &Problem,
        (q, k, v): (&CudaView<bf16>, &CudaView<bf16>, &CudaView<bf16>),
        o: &CudaSlice<bf16>,
        stats: &CudaSlice<f32>,
    ) -> Result<bool, String> {
        let Some(entry) = plan_for(dev, p, true)? else {
            return Ok(false);
        };
        let stream = dev.cuda_stream();
        let mut g = Vec::new();
        let mut buffers = inputs((q, k, v), &stream, &mut g);
        buffers.push((Port::O, address(o, &stream, &mut g)));
        buffers.push((Port::Stats, address(stats, &stream, &mut g)));
        execute(dev, &entry, &buffers)?;
        Ok(true)
    }

    /// The attention backward: the gradients of rotated q and k, and of v, in their layouts
    /// (`dq` `[b, t, heads · d]`, `dk`, `dv` `[b, t, kv_heads · d]`, bf16); `false` where the
    /// flash kernels are to (see [`plan_for`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        dev: &CudaDevice,
        p: &Problem,
        (q, k, v): (&CudaView<bf16>, &CudaView<bf16>, &CudaView<bf16>),
        (o, dout, stats): (&CudaView<bf16>, &CudaView<bf16>, &CudaView<f32>),
        (dq, dk, dv): (&CudaSlice<bf16>, &CudaSlice<bf16>, &CudaSlice<bf16>),
    ) -> Result<bool, String> {
        let Some(entry) = plan_for(dev, p, false)? else {
            return Ok(false);
        };
        let rows = p.b * p.heads * p.t;
        // SAFETY: written by the plan before it is read (dO·O per row).
        let softmax_sum = unsafe { dev.alloc::<f32>(rows) }.map_err(|e| e.to_string())?;
        // cuDNN before 9.6 adds into it (cudnn-frontend zeroes it there, and only there).
        let dq_accum = if backend::version()? < 90600 {
            dev.alloc_zeros::<f32>(rows * p.d)
        } else {
            // SAFETY: initialised by the plan itself from cuDNN 9.6 on.
            unsafe { dev.alloc::<f32>(rows * p.d) }
        }
        .map_err(|e| e.to_string())?;
        let stream = dev.cuda_stream();
        let mut g = Vec::new();
        let mut buffers = inputs((q, k, v), &stream, &mut g);
        buffers.extend([
            (Port::O, address(o, &stream, &mut g)),
            (Port::DOut, address(dout, &stream, &mut g)),
            (Port::Stats, address(stats, &stream, &mut g)),
            (Port::DQ, address(dq, &stream, &mut g)),
            (Port::DK, address(dk, &stream, &mut g)),
            (Port::DV, address(dv, &stream, &mut g)),
            (Port::SoftmaxSum, address(&softmax_sum, &stream, &mut g)),
            (Port::DqAccum, address(&dq_accum, &stream, &mut g)),
        ]);
        execute(dev, &entry, &buffers)?;
        Ok(true)
    }

    /// Turns cuDNN's attention off for the rest of the run after `why` (the flash kernels
    /// take over), saying so once.
    pub(crate) fn fall_back(why: &str) {
        if crate::set_attention_cudnn(false) {
            eprintln!("peft: cuDNN attention off ({why}); the flash attention kernels run instead");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::backend::{plan, version, Target};
    use super::graph::{backward, forward, masked_score, Problem};

    /// An H200 as cuDNN describes a device (`CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION`), so
    /// that plans for it can be built on a machine without a GPU.
    const H200: &str = r#"{"cudaDeviceId": 0, "deviceName": "NVIDIA H200", "deviceVer": 900,
        "driverVer": 13000, "isTccDriver": 0, "l2CacheSize": 52428800, "maxCtasPerSM": 32,
        "maxRegistersPerSM": 65536, "maxSharedMemoryPerBlock": 49152,
        "maxSharedMemoryPerBlockOptin": 232448, "reservedSharedMemoryPerBlock": 1024,
        "oversizedSharedMemoryPerBlock": 0, "maxThreadsPerBlock": 1024, "maxThreadsPerSM": 2048,
        "memClockRateKHz": 3201000, "memoryBusWidth": 6144, "multiProcessorCount": 132,
        "pciDeviceId": 0, "regsPerBlock": 65536, "smClockRateKHz": 1980000, "smCountOrigin": 0,
        "supportCoopLaunch": 1, "totalGlobalMem": 150754820096, "warpSize": 32,
        "maxBlockSize": [1024, 1024, 64], "maxGridSize": [2147483647, 65535, 65535]}"#;

    /// cuDNN accepts the attention graphs and has engines for them on an H200, for the
    /// benchmark's shapes and sequence lengths off its tiles (runs where cuDNN 9 can be loaded,
    /// e.g. with the pip wheel's `nvidia/cudnn/lib` on `LD_LIBRARY_PATH`: see
    /// `scripts/gpu/cudnn_plans.sh`; elsewhere it says so and checks nothing).
    #[test]
    fn cudnn_builds_attention_plans_for_an_h200() {
        let v = match version() {
            // Plans for a described device (its properties as JSON) came with cuDNN 9.8.
            Ok(v) if v < 90800 => {
                eprintln!("skipped: cuDNN {v} builds plans for the device at hand only");
                return;
            }
            Ok(v) => v,
            Err(why) => {
                eprintln!("skipped: {why}");
                return;
            }
        };
        let target = Target::Described(H200);
        let mut failures = Vec::new();
        for (heads, kv_heads, d, sizes) in [
            (9, 3, 64, &[(8, 1024), (8, 1000), (3, 77)][..]),
            (32, 8, 64, &[(4, 1024)][..]),
            (32, 8, 128, &[(2, 2048), (1, 1500)][..]),
            (4, 4, 64, &[(1, 200)][..]),
        ] {
            for pass in ["forward", "backward"] {
                for &(b, t) in sizes {
                    let p = Problem {
                        b,
                        heads,
                        kv_heads,
                        t,
                        d,
                        scale: 1.0 / (d as f32).sqrt(),
                    };
                    let masked = masked_score(v);
                    let graph = if pass == "forward" {
                        forward(&p, masked)
                    } else {
                        backward(&p, masked)
                    };
                    let start = std::time::Instant::now();
                    match plan(&graph, &target) {
                        Ok(plan) => eprintln!(
                            "cuDNN {v}: {pass} {p:?}: workspace {} bytes, built in {:.2} s",
                            plan.workspace,
                            start.elapsed().as_secs_f64()
                        ),
                        Err(e) => failures.push(format!("cuDNN {v}, {pass} of {p:?}: {e}")),
                    }
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
