//! cuDNN's backend graph API, loaded at run time (`libcudnn.so.9`): the [`super::graph`]
//! descriptions lowered to its descriptors, an execution plan chosen by its heuristics, and
//! the plan run on a stream. Loaded rather than linked (cudarc's bindings would link cuDNN
//! into every `cuda` build, which then would not start where cuDNN is missing); the
//! constants below are those of cuDNN 9's `cudnn_graph.h`.

use super::graph::{Dtype, Graph, Op, Pointwise, Reduce, Storage};
use std::ffi::{c_char, c_void};
use std::sync::OnceLock;

type Status = i32;
type Raw = *mut c_void;

// Descriptor types (cudnnBackendDescriptorType_t).
const POINTWISE_DESCRIPTOR: u32 = 0;
const ENGINECFG_DESCRIPTOR: u32 = 3;
const ENGINEHEUR_DESCRIPTOR: u32 = 4;
const EXECUTION_PLAN_DESCRIPTOR: u32 = 5;
const OPERATION_POINTWISE_DESCRIPTOR: u32 = 13;
const OPERATIONGRAPH_DESCRIPTOR: u32 = 15;
const TENSOR_DESCRIPTOR: u32 = 17;
const MATMUL_DESCRIPTOR: u32 = 18;
const OPERATION_MATMUL_DESCRIPTOR: u32 = 19;
const REDUCTION_DESCRIPTOR: u32 = 21;
const OPERATION_REDUCTION_DESCRIPTOR: u32 = 22;
const OPERATION_RESHAPE_DESCRIPTOR: u32 = 31;
const DEVICEPROP_DESCRIPTOR: u32 = 38;

// Attribute names (cudnnBackendAttributeName_t).
const ATTR_POINTWISE_MODE: u32 = 0;
const ATTR_POINTWISE_MATH_PREC: u32 = 1;
const ATTR_POINTWISE_AXIS: u32 = 9;
const ATTR_ENGINEHEUR_MODE: u32 = 200;
const ATTR_ENGINEHEUR_OPERATION_GRAPH: u32 = 201;
const ATTR_ENGINEHEUR_RESULTS: u32 = 202;
const ATTR_ENGINEHEUR_DEVICEPROP: u32 = 204;
const ATTR_EXECUTION_PLAN_HANDLE: u32 = 400;
const ATTR_EXECUTION_PLAN_ENGINE_CONFIG: u32 = 401;
const ATTR_EXECUTION_PLAN_WORKSPACE_SIZE: u32 = 402;
const ATTR_EXECUTION_PLAN_DEVICEPROP: u32 = 407;
const ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR: u32 = 750;
const ATTR_OPERATION_POINTWISE_XDESC: u32 = 751;
const ATTR_OPERATION_POINTWISE_BDESC: u32 = 752;
const ATTR_OPERATION_POINTWISE_YDESC: u32 = 753;
const ATTR_OPERATION_POINTWISE_ALPHA1: u32 = 754;
const ATTR_OPERATION_POINTWISE_ALPHA2: u32 = 755;
const ATTR_OPERATION_POINTWISE_TDESC: u32 = 758;
const ATTR_OPERATIONGRAPH_HANDLE: u32 = 800;
const ATTR_OPERATIONGRAPH_OPS: u32 = 801;
const ATTR_TENSOR_BYTE_ALIGNMENT: u32 = 900;
const ATTR_TENSOR_DATA_TYPE: u32 = 901;
const ATTR_TENSOR_DIMENSIONS: u32 = 902;
const ATTR_TENSOR_STRIDES: u32 = 903;
const ATTR_TENSOR_UNIQUE_ID: u32 = 906;
const ATTR_TENSOR_IS_VIRTUAL: u32 = 907;
const ATTR_TENSOR_IS_BY_VALUE: u32 = 908;
const ATTR_MATMUL_COMP_TYPE: u32 = 1500;
const ATTR_OPERATION_MATMUL_ADESC: u32 = 1520;
const ATTR_OPERATION_MATMUL_BDESC: u32 = 1521;
const ATTR_OPERATION_MATMUL_CDESC: u32 = 1522;
const ATTR_OPERATION_MATMUL_DESC: u32 = 1523;
const ATTR_REDUCTION_OPERATOR: u32 = 1600;
const ATTR_REDUCTION_COMP_TYPE: u32 = 1601;
const ATTR_OPERATION_REDUCTION_XDESC: u32 = 1610;
const ATTR_OPERATION_REDUCTION_YDESC: u32 = 1611;
const ATTR_OPERATION_REDUCTION_DESC: u32 = 1612;
const ATTR_OPERATION_RESHAPE_XDESC: u32 = 2200;
const ATTR_OPERATION_RESHAPE_YDESC: u32 = 2201;
const ATTR_DEVICEPROP_JSON_REPRESENTATION: u32 = 2702;

// Attribute value types (cudnnBackendAttributeType_t).
const TYPE_HANDLE: u32 = 0;
const TYPE_DATA_TYPE: u32 = 1;
const TYPE_BOOLEAN: u32 = 2;
const TYPE_INT64: u32 = 3;
const TYPE_FLOAT: u32 = 4;
const TYPE_HEUR_MODE: u32 = 8;
const TYPE_POINTWISE_MODE: u32 = 14;
const TYPE_BACKEND_DESCRIPTOR: u32 = 15;
const TYPE_REDUCTION_OPERATOR_TYPE: u32 = 18;
const TYPE_CHAR: u32 = 24;

// Heuristic modes (cudnnBackendHeurMode_t).
const HEUR_MODE_FALLBACK: u32 = 2;
const HEUR_MODE_A: u32 = 3;

fn data_type(d: Dtype) -> u32 {
    match d {
        Dtype::F32 => 0,
        Dtype::I32 => 4,
        Dtype::Bf16 => 9,
        Dtype::Bool => 11,
    }
}

fn pointwise_mode(m: Pointwise) -> u32 {
    match m {
        Pointwise::Add => 0,
        Pointwise::Mul => 1,
        Pointwise::Div => 6,
        Pointwise::Sub => 9,
        Pointwise::Exp => 13,
        Pointwise::Log => 15,
        Pointwise::Identity => 21,
        Pointwise::CmpGe => 303,
        Pointwise::GenIndex(_) => 501,
        Pointwise::Select => 601,
    }
}

fn reduction_operator(r: Reduce) -> u32 {
    match r {
        Reduce::Sum => 0,
        Reduce::Max => 3,
    }
}

/// The entry points used, from the loaded library.
struct Api {
    _lib: libloading::Library,
    version: unsafe extern "C" fn() -> usize,
    last_error: unsafe extern "C" fn(*mut c_char, usize),
    create_handle: unsafe extern "C" fn(*mut Raw) -> Status,
    set_stream: unsafe extern "C" fn(Raw, Raw) -> Status,
    create: unsafe extern "C" fn(u32, *mut Raw) -> Status,
    destroy: unsafe extern "C" fn(Raw) -> Status,
    set: unsafe extern "C" fn(Raw, u32, u32, i64, *const c_void) -> Status,
    get: unsafe extern "C" fn(Raw, u32, u32, i64, *mut i64, *mut c_void) -> Status,
    finalize: unsafe extern "C" fn(Raw) -> Status,
    execute: unsafe extern "C" fn(Raw, Raw, Raw) -> Status,
}

/// Names the library is looked up by (the pip wheels ship only the versioned one).
const LIBRARY_NAMES: [&str; 2] = ["libcudnn.so.9", "libcudnn.so"];

fn load() -> Result<Api, String> {
    // SAFETY: loading cuDNN runs its initialisers, which have no preconditions; each symbol
    // is read with the signature cudnn_graph.h declares for it.
    unsafe {
        let lib = LIBRARY_NAMES
            .iter()
            .find_map(|name| libloading::Library::new(*name).ok())
            .ok_or_else(|| format!("cuDNN not found ({})", LIBRARY_NAMES.join(", ")))?;
        macro_rules! sym {
            ($name:literal) => {
                *lib.get($name)
                    .map_err(|e| format!("cuDNN lacks {}: {e}", String::from_utf8_lossy($name)))?
            };
        }
        let api = Api {
            version: sym!(b"cudnnGetVersion"),
            last_error: sym!(b"cudnnGetLastErrorString"),
            create_handle: sym!(b"cudnnCreate"),
            set_stream: sym!(b"cudnnSetStream"),
            create: sym!(b"cudnnBackendCreateDescriptor"),
            destroy: sym!(b"cudnnBackendDestroyDescriptor"),
            set: sym!(b"cudnnBackendSetAttribute"),
            get: sym!(b"cudnnBackendGetAttribute"),
            finalize: sym!(b"cudnnBackendFinalize"),
            execute: sym!(b"cudnnBackendExecute"),
            _lib: lib,
        };
        // The fused attention engines these graphs need came with cuDNN 9.
        let version = (api.version)();
        if version < 90000 {
            return Err(format!("cuDNN {version} is older than 9.0"));
        }
        Ok(api)
    }
}

fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// The loaded cuDNN's version (e.g. 92801 for 9.28.1), or why it could not be loaded.
pub(crate) fn version() -> Result<usize, String> {
    // SAFETY: cudnnGetVersion takes no arguments.
    api().map(|a| unsafe { (a.version)() })
}

/// `what` failed with `status`: an error with cuDNN's own message for it.
fn failure(what: &str, status: Status) -> String {
    let mut buf = [0 as c_char; 512];
    if let Ok(a) = api() {
        // SAFETY: the buffer holds more than the size passed, whose last byte stays 0.
        unsafe { (a.last_error)(buf.as_mut_ptr(), buf.len() - 1) };
    }
    // SAFETY: nul-terminated: the last byte is never written.
    let message = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
    format!(
        "cuDNN: {what} failed (status {status}){}{message}",
        if message.is_empty() { "" } else { ": " }
    )
}

fn check(what: &str, status: Status) -> Result<(), String> {
    if status == 0 {
        Ok(())
    } else {
        Err(failure(what, status))
    }
}

/// A backend descriptor, destroyed when dropped.
pub(crate) struct Desc(Raw);

// SAFETY: a descriptor is a heap object cuDNN does not tie to a thread; the plans that hold
// them are used under a lock (see `super`).
unsafe impl Send for Desc {}
unsafe impl Sync for Desc {}

impl Drop for Desc {
    fn drop(&mut self) {
        if let Ok(a) = api() {
            // SAFETY: created by cudnnBackendCreateDescriptor, destroyed once.
            unsafe { (a.destroy)(self.0) };
        }
    }
}

impl Desc {
    fn new(kind: u32) -> Result<Self, String> {
        let a = api()?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: writes the new descriptor's address into `raw`.
        check("creating a descriptor", unsafe {
            (a.create)(kind, &mut raw)
        })?;
        Ok(Self(raw))
    }

    /// Sets `attr` to `values` of cuDNN type `ty` (the slice's elements must be that type).
    fn set<T>(&self, attr: u32, ty: u32, values: &[T]) -> Result<(), String> {
        let a = api()?;
        // SAFETY: `values` holds `len` elements of the C type `ty` names (the callers pass
        // i64 for INT64, f32 for FLOAT, u32 for the enum types, bool for BOOLEAN, raw
        // pointers for descriptors, handles and buffers).
        let status = unsafe {
            (a.set)(
                self.0,
                attr,
                ty,
                values.len() as i64,
                values.as_ptr() as *const c_void,
            )
        };
        check(&format!("setting attribute {attr}"), status)
    }

    fn set_descs(&self, attr: u32, descs: &[&Desc]) -> Result<(), String> {
        let raws: Vec<Raw> = descs.iter().map(|d| d.0).collect();
        self.set(attr, TYPE_BACKEND_DESCRIPTOR, &raws)
    }

    fn finalize(self, what: &str) -> Result<Self, String> {
        let a = api()?;
        // SAFETY: a live descriptor.
        check(&format!("finalizing {what}"), unsafe {
            (a.finalize)(self.0)
        })?;
        Ok(self)
    }

    fn get_i64(&self, attr: u32) -> Result<i64, String> {
        let a = api()?;
        let (mut n, mut v) = (0i64, 0i64);
        // SAFETY: room for the one INT64 requested.
        let status = unsafe {
            (a.get)(
                self.0,
                attr,
                TYPE_INT64,
                1,
                &mut n,
                &mut v as *mut i64 as *mut c_void,
            )
        };
        check(&format!("reading attribute {attr}"), status)?;
        Ok(v)
    }
}

/// What a plan is built for: a live GPU (its cuDNN handle), or a description of one
/// (cuDNN's device-properties JSON), which lets plans be built, not run, on a machine
/// without a GPU.
pub(crate) enum Target<'a> {
    Handle(&'a Handle),
    // Built by the tests (a GPU runs the plans it builds from its handle).
    #[cfg_attr(not(test), allow(dead_code))]
    Described(&'a str),
}

/// A cuDNN handle, bound to the CUDA context that was current when it was made.
pub(crate) struct Handle(Raw);

// SAFETY: the handle is used under the lock of `super`'s `DEVICES`, one thread at a time.
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

impl Handle {
    /// A handle for the CUDA context current on this thread.
    pub(crate) fn new() -> Result<Self, String> {
        let a = api()?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: writes the new handle into `raw`.
        check("creating a handle", unsafe { (a.create_handle)(&mut raw) })?;
        Ok(Self(raw))
    }
}

/// An execution plan and what it needs at run time.
pub(crate) struct Plan {
    plan: Desc,
    /// The graph's descriptors, kept while the plan lives.
    _parts: Vec<Desc>,
    pub workspace: usize,
    /// The scalars passed by value, with their tensors' ids (cuDNN reads them from the host).
    values: Vec<(i64, Box<f32>)>,
}

fn device_props(json: &str) -> Result<Desc, String> {
    let props = Desc::new(DEVICEPROP_DESCRIPTOR)?;
    props.set(
        ATTR_DEVICEPROP_JSON_REPRESENTATION,
        TYPE_CHAR,
        json.as_bytes(),
    )?;
    props.finalize("the device properties")
}

/// `graph` lowered to finalized tensor and operation descriptors.
fn lower(graph: &Graph) -> Result<(Vec<Desc>, Vec<Desc>), String> {
    let mut tensors = Vec::with_capacity(graph.tensors.len());
    for t in &graph.tensors {
        let d = Desc::new(TENSOR_DESCRIPTOR)?;
        d.set(ATTR_TENSOR_DATA_TYPE, TYPE_DATA_TYPE, &[data_type(t.dtype)])?;
        d.set(ATTR_TENSOR_DIMENSIONS, TYPE_INT64, &t.dims)?;
        d.set(ATTR_TENSOR_STRIDES, TYPE_INT64, &t.strides)?;
        d.set(ATTR_TENSOR_UNIQUE_ID, TYPE_INT64, &[t.uid])?;
        d.set(ATTR_TENSOR_BYTE_ALIGNMENT, TYPE_INT64, &[16i64])?;
        match t.storage {
            Storage::Virtual => d.set(ATTR_TENSOR_IS_VIRTUAL, TYPE_BOOLEAN, &[true])?,
            Storage::Value(_) => d.set(ATTR_TENSOR_IS_BY_VALUE, TYPE_BOOLEAN, &[true])?,
            Storage::Buffer(_) => {}
        }
        tensors.push(d.finalize(&format!("tensor {}", t.uid))?);
    }
    let mut ops = Vec::with_capacity(graph.ops.len());
    // Operation descriptors own nothing of their settings' descriptors: those are kept here.
    let mut settings = Vec::new();
    for (i, op) in graph.ops.iter().enumerate() {
        let what = format!("operation {i} ({op:?})");
        let d = match op {
            Op::Matmul { a, b, c } => {
                let m = Desc::new(MATMUL_DESCRIPTOR)?;
                m.set(
                    ATTR_MATMUL_COMP_TYPE,
                    TYPE_DATA_TYPE,
                    &[data_type(Dtype::F32)],
                )?;
                let m = m.finalize("a matmul")?;
                let d = Desc::new(OPERATION_MATMUL_DESCRIPTOR)?;
                d.set_descs(ATTR_OPERATION_MATMUL_ADESC, &[&tensors[*a]])?;
                d.set_descs(ATTR_OPERATION_MATMUL_BDESC, &[&tensors[*b]])?;
                d.set_descs(ATTR_OPERATION_MATMUL_CDESC, &[&tensors[*c]])?;
                d.set_descs(ATTR_OPERATION_MATMUL_DESC, &[&m])?;
                settings.push(m);
                d
            }
            Op::Pointwise {
                mode,
                inputs,
                y,
                precision,
            } => {
                let p = Desc::new(POINTWISE_DESCRIPTOR)?;
                p.set(
                    ATTR_POINTWISE_MODE,
                    TYPE_POINTWISE_MODE,
                    &[pointwise_mode(*mode)],
                )?;
                p.set(
                    ATTR_POINTWISE_MATH_PREC,
                    TYPE_DATA_TYPE,
                    &[data_type(*precision)],
                )?;
                if let Pointwise::GenIndex(axis) = mode {
                    p.set(ATTR_POINTWISE_AXIS, TYPE_INT64, &[*axis])?;
                }
                let p = p.finalize("a pointwise mode")?;
                let d = Desc::new(OPERATION_POINTWISE_DESCRIPTOR)?;
                d.set_descs(ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, &[&p])?;
                let ports = [
                    ATTR_OPERATION_POINTWISE_XDESC,
                    ATTR_OPERATION_POINTWISE_BDESC,
                    ATTR_OPERATION_POINTWISE_TDESC,
                ];
                for (port, input) in ports.iter().zip(inputs) {
                    d.set_descs(*port, &[&tensors[*input]])?;
                }
                d.set_descs(ATTR_OPERATION_POINTWISE_YDESC, &[&tensors[*y]])?;
                d.set(ATTR_OPERATION_POINTWISE_ALPHA1, TYPE_FLOAT, &[1.0f32])?;
                d.set(ATTR_OPERATION_POINTWISE_ALPHA2, TYPE_FLOAT, &[1.0f32])?;
                settings.push(p);
                d
            }
            Op::Reduce { mode, x, y } => {
                let r = Desc::new(REDUCTION_DESCRIPTOR)?;
                r.set(
                    ATTR_REDUCTION_OPERATOR,
                    TYPE_REDUCTION_OPERATOR_TYPE,
                    &[reduction_operator(*mode)],
                )?;
                r.set(
                    ATTR_REDUCTION_COMP_TYPE,
                    TYPE_DATA_TYPE,
                    &[data_type(Dtype::F32)],
                )?;
                let r = r.finalize("a reduction")?;
                let d = Desc::new(OPERATION_REDUCTION_DESCRIPTOR)?;
                d.set_descs(ATTR_OPERATION_REDUCTION_XDESC, &[&tensors[*x]])?;
                d.set_descs(ATTR_OPERATION_REDUCTION_YDESC, &[&tensors[*y]])?;
                d.set_descs(ATTR_OPERATION_REDUCTION_DESC, &[&r])?;
                settings.push(r);
                d
            }
            Op::Reshape { x, y } => {
                let d = Desc::new(OPERATION_RESHAPE_DESCRIPTOR)?;
                d.set_descs(ATTR_OPERATION_RESHAPE_XDESC, &[&tensors[*x]])?;
                d.set_descs(ATTR_OPERATION_RESHAPE_YDESC, &[&tensors[*y]])?;
                d
            }
        };
        ops.push(d.finalize(&what)?);
    }
    tensors.extend(settings);
    Ok((tensors, ops))
}

/// Builds `graph`'s execution plan for `target`: the first engine configuration cuDNN's
/// heuristics (mode A, then its fallback list) offer that finalizes.
pub(crate) fn plan(graph: &Graph, target: &Target) -> Result<Plan, String> {
    let (mut parts, ops) = lower(graph)?;
    let props = match target {
        Target::Described(json) => Some(device_props(json)?),
        Target::Handle(_) => None,
    };
    let op_graph = Desc::new(OPERATIONGRAPH_DESCRIPTOR)?;
    op_graph.set_descs(ATTR_OPERATIONGRAPH_OPS, &ops.iter().collect::<Vec<_>>())?;
    if let Target::Handle(h) = target {
        op_graph.set(ATTR_OPERATIONGRAPH_HANDLE, TYPE_HANDLE, &[h.0])?;
    }
    let op_graph = op_graph.finalize("the operation graph")?;
    let mut refusals = Vec::new();
    for mode in [HEUR_MODE_A, HEUR_MODE_FALLBACK] {
        let configs = match engine_configs(&op_graph, mode, props.as_ref()) {
            Ok(c) => c,
            Err(e) => {
                refusals.push(e);
                continue;
            }
        };
        for config in configs {
            let plan = Desc::new(EXECUTION_PLAN_DESCRIPTOR)?;
            match target {
                Target::Handle(h) => plan.set(ATTR_EXECUTION_PLAN_HANDLE, TYPE_HANDLE, &[h.0])?,
                Target::Described(_) => plan.set_descs(
                    ATTR_EXECUTION_PLAN_DEVICEPROP,
                    &[props.as_ref().expect("described targets have properties")],
                )?,
            }
            plan.set_descs(ATTR_EXECUTION_PLAN_ENGINE_CONFIG, &[&config])?;
            match plan.finalize("an execution plan") {
                Ok(plan) => {
                    let workspace = plan.get_i64(ATTR_EXECUTION_PLAN_WORKSPACE_SIZE)?;
                    parts.extend(ops);
                    parts.push(op_graph);
                    parts.push(config);
                    parts.extend(props);
                    let values = graph
                        .tensors
                        .iter()
                        .filter_map(|t| match t.storage {
                            Storage::Value(v) => Some((t.uid, Box::new(v))),
                            _ => None,
                        })
                        .collect();
                    return Ok(Plan {
                        plan,
                        _parts: parts,
                        workspace: workspace.max(0) as usize,
                        values,
                    });
                }
                Err(e) => refusals.push(e),
            }
        }
    }
    Err(match refusals.last() {
        Some(last) => format!(
            "cuDNN has no engine for this attention graph ({} configurations refused; last: {last})",
            refusals.len()
        ),
        None => "cuDNN's heuristics offer no engine for this attention graph".into(),
    })
}

/// The engine configurations cuDNN's heuristics `mode` offers for `op_graph`, best first.
fn engine_configs(op_graph: &Desc, mode: u32, props: Option<&Desc>) -> Result<Vec<Desc>, String> {
    let a = api()?;
    let heur = Desc::new(ENGINEHEUR_DESCRIPTOR)?;
    heur.set_descs(ATTR_ENGINEHEUR_OPERATION_GRAPH, &[op_graph])?;
    heur.set(ATTR_ENGINEHEUR_MODE, TYPE_HEUR_MODE, &[mode])?;
    if let Some(p) = props {
        heur.set_descs(ATTR_ENGINEHEUR_DEVICEPROP, &[p])?;
    }
    let heur = heur.finalize("the heuristics")?;
    let mut count = 0i64;
    // SAFETY: a count query: no elements are written.
    let status = unsafe {
        (a.get)(
            heur.0,
            ATTR_ENGINEHEUR_RESULTS,
            TYPE_BACKEND_DESCRIPTOR,
            0,
            &mut count,
            std::ptr::null_mut(),
        )
    };
    check("counting the heuristics' results", status)?;
    let configs = (0..count)
        .map(|_| Desc::new(ENGINECFG_DESCRIPTOR))
        .collect::<Result<Vec<_>, _>>()?;
    let mut raws: Vec<Raw> = configs.iter().map(|c| c.0).collect();
    let mut written = 0i64;
    // SAFETY: `raws` holds `count` created engine-config descriptors for cuDNN to fill.
    let status = unsafe {
        (a.get)(
            heur.0,
            ATTR_ENGINEHEUR_RESULTS,
            TYPE_BACKEND_DESCRIPTOR,
            count,
            &mut written,
            raws.as_mut_ptr() as *mut c_void,
        )
    };
    check("reading the heuristics' results", status)?;
    Ok(configs.into_iter().take(written.max(0) as usize).collect())
}

/// Runs `plan` on `stream` with `buffers` (tensor id and device address) and `workspace`.
///
/// # Safety
/// The addresses must be live device buffers of the sizes and layouts the plan's graph
/// gives their tensors, `workspace` at least `plan.workspace` bytes, all on `handle`'s device,
/// and `stream` a stream of that device's context.
pub(crate) unsafe fn execute(
    handle: &Handle,
    stream: Raw,
    plan: &Plan,
    buffers: &[(i64, u64)],
    workspace: u64,
) -> Result<(), String> {
    const VARIANT_PACK_DESCRIPTOR: u32 = 16;
    const ATTR_VARIANT_PACK_UNIQUE_IDS: u32 = 1000;
    const ATTR_VARIANT_PACK_DATA_POINTERS: u32 = 1001;
    const ATTR_VARIANT_PACK_WORKSPACE: u32 = 1003;
    const TYPE_VOID_PTR: u32 = 6;
    let a = api()?;
    check("setting the stream", (a.set_stream)(handle.0, stream))?;
    let mut ids: Vec<i64> = buffers.iter().map(|b| b.0).collect();
    let mut pointers: Vec<*mut c_void> = buffers.iter().map(|b| b.1 as *mut c_void).collect();
    for (uid, value) in &plan.values {
        ids.push(*uid);
        pointers.push(&**value as *const f32 as *mut c_void);
    }
    let pack = Desc::new(VARIANT_PACK_DESCRIPTOR)?;
    pack.set(ATTR_VARIANT_PACK_UNIQUE_IDS, TYPE_INT64, &ids)?;
    pack.set(ATTR_VARIANT_PACK_DATA_POINTERS, TYPE_VOID_PTR, &pointers)?;
    pack.set(
        ATTR_VARIANT_PACK_WORKSPACE,
        TYPE_VOID_PTR,
        &[workspace as *mut c_void],
    )?;
    let pack = pack.finalize("the variant pack")?;
    check(
        "running the attention plan",
        (a.execute)(handle.0, plan.plan.0, pack.0),
    )
}
