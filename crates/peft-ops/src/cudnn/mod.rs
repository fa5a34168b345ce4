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
pub(crate) use device::{backward, fall_back, forward, RUNS};

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
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    /// Plans with their graphs, by pass (forward or not) and problem ([`key`]).
    type Plans = HashMap<(bool, [u64; 6]), Arc<(Graph, Plan)>>;

    /// A device's cuDNN handle and the plans built on it.
    struct DeviceState {
        handle: Handle,
        plans: Plans,
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

    /// Whether `version`'s attention engines serve `p` correctly, as cudnn-frontend knows them:
    /// 9.10.0 and 9.10.1 have backward bugs; up to 9.15, a backward over a key count off a
    /// multiple of 128 needs a padding mask these graphs do not have (the flash kernels serve).
    fn serves(version: usize, p: &Problem) -> Result<bool, String> {
        if version == 91000 || version == 91001 {
            return Err(format!(
                "cuDNN {version}'s attention backward has known bugs"
            ));
        }
        Ok(version > 91500 || p.t.is_multiple_of(128))
    }

    /// Runs the forward (`forward`) or backward graph of `p` on `dev`'s stream with `buffers`;
    /// `false` when cuDNN is not to serve `p` ([`serves`]) or `p` is a new shape past
    /// [`MAX_SHAPES`] (nothing ran).
    fn run(
        dev: &CudaDevice,
        p: &Problem,
        forward: bool,
        buffers: &[(Port, u64)],
    ) -> Result<bool, String> {
        let version = backend::version()?;
        if !serves(version, p)? {
            return Ok(false);
        }
        let stream = dev.cuda_stream();
        let mut devices = DEVICES
            .lock()
            .map_err(|_| "cuDNN: a plan failed on another thread".to_string())?;
        let devices = devices.get_or_insert_with(HashMap::new);
        let ordinal = stream.context().ordinal();
        let state = match devices.entry(ordinal) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                // cuDNN binds a handle to the context current when it is made.
                stream
                    .context()
                    .bind_to_thread()
                    .map_err(|e| format!("cuDNN: {e:?}"))?;
                e.insert(DeviceState {
                    handle: Handle::new()?,
                    plans: HashMap::new(),
                    full: false,
                })
            }
        };
        let entry = match state.plans.get(&(forward, key(p))) {
            Some(e) => e.clone(),
            None if state.plans.keys().filter(|k| k.0 == forward).count() >= MAX_SHAPES => {
                if !state.full {
                    state.full = true;
                    eprintln!(
                        "peft: cuDNN attention plans built for {MAX_SHAPES} shapes; new shapes \
                         use the flash attention kernels (`peft train --pad-to-multiple-of 128` \
                         keeps batches to fewer shapes)"
                    );
                }
                return Ok(false);
            }
            None => {
                let masked = graph::masked_score(version);
                let graph = if forward {
                    graph::forward(p, masked)
                } else {
                    graph::backward(p, masked)
                };
                let plan = backend::plan(&graph, &Target::Handle(&state.handle))?;
                let e = Arc::new((graph, plan));
                state.plans.insert((forward, key(p)), e.clone());
                e
            }
        };
        let (graph, plan) = &*entry;
        let ids = buffers
            .iter()
            .map(|(port, ptr)| {
                graph
                    .port(*port)
                    .map(|t| (t.uid, *ptr))
                    .ok_or_else(|| format!("cuDNN: the attention graph has no {port:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // SAFETY: 256 bytes at least, as cuDNN aligns its workspace; written by the plan only.
        let workspace =
            unsafe { dev.alloc::<u8>(plan.workspace.max(256)) }.map_err(|e| e.to_string())?;
        let (ws, _ws_guard) = workspace.device_ptr(&stream);
        // SAFETY: the callers pass live buffers of the graph's layouts on this device; the
        // workspace is the plan's size; the stream is the device's.
        unsafe { backend::execute(&state.handle, stream.cu_stream() as _, plan, &ids, ws) }?;
        RUNS.fetch_add(1, Ordering::Relaxed);
        Ok(true)
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
        (q, k, v): (&'a CudaSlice<bf16>, &'a CudaSlice<bf16>, &'a CudaView<bf16>),
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
    /// `false` where the flash kernels are to (see [`run`]).
    pub(crate) fn forward(
        dev: &CudaDevice,
        p: &Problem,
        (q, k, v): (&CudaSlice<bf16>, &CudaSlice<bf16>, &CudaView<bf16>),
        o: &CudaSlice<bf16>,
        stats: &CudaSlice<f32>,
    ) -> Result<bool, String> {
        let stream = dev.cuda_stream();
        let mut g = Vec::new();
        let mut buffers = inputs((q, k, v), &stream, &mut g);
        buffers.push((Port::O, address(o, &stream, &mut g)));
        buffers.push((Port::Stats, address(stats, &stream, &mut g)));
        run(dev, p, true, &buffers)
    }

    /// The attention backward: the gradients of rotated q and k, and of v, in their layouts
    /// (`dq` `[b, t, heads · d]`, `dk`, `dv` `[b, t, kv_heads · d]`, bf16); `false` where the
    /// flash kernels are to (see [`run`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        dev: &CudaDevice,
        p: &Problem,
        (q, k, v): (&CudaSlice<bf16>, &CudaSlice<bf16>, &CudaView<bf16>),
        (o, dout, stats): (&CudaView<bf16>, &CudaView<bf16>, &CudaView<f32>),
        (dq, dk, dv): (&CudaSlice<bf16>, &CudaSlice<bf16>, &CudaSlice<bf16>),
    ) -> Result<bool, String> {
        let rows = p.b * p.heads * p.t;
        // SAFETY: written by the plan before it is read (dO·O per row).
        let softmax_sum = unsafe { dev.alloc::<f32>(rows) }.map_err(|e| e.to_string())?;
        // Zeroed: cuDNN before 9.6 adds into it.
        let dq_accum = dev
            .alloc_zeros::<f32>(rows * p.d)
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
        run(dev, p, false, &buffers)
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
