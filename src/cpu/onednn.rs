//! The linear layers' matrix products through oneDNN's matmul — the library PyTorch uses for the
//! same work — in two forms:
//! - fp32 (`HPO_GPU_GEMM=onednn`, the default on AVX-512 CPUs: `super::blas`): oneDNN's f32
//!   kernels on the caller's f32 operands, read in place where they need no padding;
//! - `--precision bf16`, on CPUs that multiply bf16 in hardware (AMX tiles, or AVX512_BF16): only
//!   the two operands of a product are rounded to bf16 (nearest, ties to even), the products are
//!   accumulated and written in fp32, as PyTorch's CPU autocast does for `nn.Linear`. Weights,
//!   optimizer state, activations and every other op stay fp32.
//!
//! oneDNN is opened at run time (`libdnnl.so.2`, Debian's `libdnnl2`, oneDNN 2.x's C API), not
//! linked: the same binary runs where it is missing (fp32 then uses `matrixmultiply`). It
//! JIT-compiles one kernel per shape (milliseconds each), so a product is cut into output blocks
//! of a fixed size per operand type (`Operand::BLOCK`) whose shapes repeat from batch to batch
//! whatever the batch's token count: the last row block is padded to a multiple of 32 rows and
//! the inner dimension to [`padded_inner`]. The fixed blocks also make a row's result the same
//! wherever the row falls. Each block runs single-threaded (oneDNN's OpenMP threads are set to
//! one on every calling thread); rayon spreads the blocks over the cores.
//!
//! The attention products (per sequence and head, shapes as many as review lengths) are not
//! oneDNN's: the forward's run fused with their softmax in fp32 (`super::fused_attention`), the
//! backward's on `matrixmultiply`.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use anyhow::{Result, bail};
use rayon::prelude::*;

use super::real::{Mat, SendPtr};

/// Where oneDNN is looked up (a path or a name for `dlopen`); `libdnnl.so.2` when unset.
pub const LIBRARY_ENV: &str = "HPO_GPU_ONEDNN";

/// Rows and columns of the output blocks bf16 products are cut into.
pub const BLOCK: usize = 256;

/// The inner dimension after zero padding: weight-side sizes (multiples of 64) stay as they are,
/// token counts are rounded up so that their kernels repeat across batches.
pub fn padded_inner(k: usize) -> usize {
    if k > 1024 { k.next_multiple_of(256) } else { k.next_multiple_of(64) }
}

/// f32 → bf16, rounding to nearest with ties to even (NaN stays NaN), as PyTorch converts.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    if x.is_nan() { ((bits >> 16) as u16) | 0x40 } else { rounded }
}

/// The f32 value of bf16 bits.
pub fn bf16_value(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

type Status = c_int;
type Handle = *mut c_void;
const SUCCESS: Status = 0;
const ENGINE_CPU: c_int = 1;
const STREAM_DEFAULT_FLAGS: u32 = 1;
const DATA_BF16: c_int = 2;
const DATA_F32: c_int = 3;
const QUERY_IMPL_INFO_STR: c_int = 8;
const ARG_SRC: c_int = 1;
const ARG_DST: c_int = 17;
const ARG_WEIGHTS: c_int = 33;
const ARG_BIAS: c_int = 41;
const ARG_SCRATCHPAD: c_int = 80;
const SCRATCHPAD_MODE_USER: c_int = 1;
const QUERY_SCRATCHPAD_MD: c_int = 136;
/// `dnnl_query_src_md`, `dnnl_query_weights_md`, `dnnl_query_dst_md`: A, B and C (and the
/// weights' second, the bias).
const QUERY_OPERAND_MDS: [c_int; 3] = [129, 131, 133];
const QUERY_WEIGHTS_MD: c_int = 131;
/// `dnnl_cpu_isa_avx512_core_bf16` and `dnnl_cpu_isa_avx512_core_amx`: bit masks, each ISA's
/// value containing those of the ones below it.
const ISA_BF16: u32 = 0xe7;
const ISA_AMX: u32 = 0x3e7;

/// Room for a `dnnl_memory_desc_t` (696 bytes in oneDNN 2.x) or a `dnnl_matmul_desc_t` (2,800):
/// oneDNN fills them, we only pass their addresses.
#[repr(C, align(16))]
struct Desc([u8; 4096]);

impl Desc {
    fn boxed() -> Box<Desc> {
        Box::new(Desc([0; 4096]))
    }
    fn ptr(&mut self) -> *mut c_void {
        self.0.as_mut_ptr().cast()
    }
}

#[repr(C)]
struct ExecArg {
    arg: c_int,
    memory: Handle,
}

/// The C entry points used, looked up once.
struct Api {
    engine_create: unsafe extern "C" fn(*mut Handle, c_int, usize) -> Status,
    stream_create: unsafe extern "C" fn(*mut Handle, Handle, u32) -> Status,
    memory_desc_init_by_strides:
        unsafe extern "C" fn(*mut c_void, c_int, *const i64, c_int, *const i64) -> Status,
    matmul_desc_init: unsafe extern "C" fn(
        *mut c_void,
        *const c_void,
        *const c_void,
        *const c_void,
        *const c_void,
    ) -> Status,
    primitive_attr_create: unsafe extern "C" fn(*mut Handle) -> Status,
    primitive_attr_destroy: unsafe extern "C" fn(Handle) -> Status,
    post_ops_create: unsafe extern "C" fn(*mut Handle) -> Status,
    post_ops_destroy: unsafe extern "C" fn(Handle) -> Status,
    post_ops_append_sum: unsafe extern "C" fn(Handle, f32) -> Status,
    primitive_attr_set_post_ops: unsafe extern "C" fn(Handle, Handle) -> Status,
    primitive_desc_create: unsafe extern "C" fn(*mut Handle, *const c_void, Handle, Handle, Handle) -> Status,
    primitive_desc_query: unsafe extern "C" fn(Handle, c_int, c_int, *mut c_void) -> Status,
    primitive_desc_destroy: unsafe extern "C" fn(Handle) -> Status,
    primitive_desc_query_md: unsafe extern "C" fn(Handle, c_int, c_int) -> *const c_void,
    memory_desc_get_size: unsafe extern "C" fn(*const c_void) -> usize,
    primitive_attr_set_scratchpad_mode: unsafe extern "C" fn(Handle, c_int) -> Status,
    primitive_create: unsafe extern "C" fn(*mut Handle, Handle) -> Status,
    memory_create: unsafe extern "C" fn(*mut Handle, *const c_void, Handle, *mut c_void) -> Status,
    memory_destroy: unsafe extern "C" fn(Handle) -> Status,
    primitive_execute: unsafe extern "C" fn(Handle, Handle, c_int, *const ExecArg) -> Status,
    stream_wait: unsafe extern "C" fn(Handle) -> Status,
    effective_cpu_isa: unsafe extern "C" fn() -> u32,
    /// libgomp's, reached through oneDNN's own dependencies.
    omp_set_num_threads: Option<unsafe extern "C" fn(c_int)>,
}

/// The shape and layout of one block's product: the kernel oneDNN compiled for it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct BlockShape {
    /// The operands' oneDNN data type (bf16 or f32); C is always f32.
    operands: c_int,
    m: i64,
    k: i64,
    n: i64,
    a_strides: [i64; 2],
    b_strides: [i64; 2],
    c_row_stride: i64,
    accumulate: bool,
    /// Whether an f32 bias row is added to every row of C (in place of accumulating).
    bias: bool,
}

/// A compiled kernel, with the scratch memory it needs: its own per execution (scratchpad mode
/// "user"), because oneDNN's shared library scratchpad makes blocks running on two threads at
/// once overwrite each other's packed operands (seen: bf16 steps that differed run to run).
#[derive(Clone, Copy)]
struct Primitive {
    handle: Handle,
    /// The primitive descriptor, kept alive: the memory descriptors below point into it.
    _pd: Handle,
    /// A's, B's and C's layouts, as `BlockShape` gave them, and the bias's (null without one).
    operand_mds: [*const c_void; 4],
    scratch_md: *const c_void,
    scratch_bytes: usize,
}
// SAFETY: a oneDNN primitive is immutable once created and may be executed from several threads
// at once, each with its own stream and scratch memory.
unsafe impl Send for Primitive {}
unsafe impl Sync for Primitive {}

/// oneDNN, loaded, with its CPU engine and the kernels compiled so far.
pub struct OneDnn {
    api: Api,
    engine: Handle,
    isa: u32,
    primitives: Mutex<HashMap<BlockShape, Primitive>>,
    /// oneDNN's name for the kernel of the first block compiled with bf16 and with f32 operands,
    /// e.g. "brg:avx512_core_amx_bf16".
    kernels: [OnceLock<String>; 2],
}
// SAFETY: the engine handle is only passed to oneDNN calls, which are thread-safe for it.
unsafe impl Send for OneDnn {}
unsafe impl Sync for OneDnn {}

static LOADED: OnceLock<std::result::Result<OneDnn, String>> = OnceLock::new();
static ACTIVE: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This thread's oneDNN stream (created on its first block; OpenMP set to one thread then).
    static STREAM: Cell<Handle> = const { Cell::new(std::ptr::null_mut()) };
    /// This thread's scratch memory for the kernels it runs.
    static SCRATCH: std::cell::RefCell<Vec<CacheLine>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// 64 bytes, 64-aligned: the unit of scratch memory.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct CacheLine([u8; 64]);

fn check(status: Status, what: &str) -> std::result::Result<(), String> {
    if status == SUCCESS { Ok(()) } else { Err(format!("oneDNN {what} failed (status {status})")) }
}

// Each transmute's target is the `Api` field it initializes, declared once there.
#[allow(clippy::missing_transmute_annotations)]
fn open() -> std::result::Result<OneDnn, String> {
    let name =
        std::env::var(LIBRARY_ENV).ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "libdnnl.so.2".into());
    let missing = || format!("oneDNN 2.x, but {name} cannot be loaded (apt-get install libdnnl2)");
    let c_name = std::ffi::CString::new(name.clone()).map_err(|_| missing())?;
    // SAFETY: dlopen/dlsym with NUL-terminated names; the handle is never closed, so the function
    // pointers stay valid for the life of the process. Each symbol is cast to the signature
    // oneDNN 2.x's dnnl.h declares for it.
    unsafe {
        let handle = libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if handle.is_null() {
            return Err(missing());
        }
        let sym = |symbol: &CStr| -> std::result::Result<*mut c_void, String> {
            let p = libc::dlsym(handle, symbol.as_ptr());
            if p.is_null() {
                Err(format!("oneDNN 2.x, but {name} has no {}", symbol.to_string_lossy()))
            } else {
                Ok(p)
            }
        };
        macro_rules! f {
            ($s:literal) => {
                std::mem::transmute::<*mut c_void, _>(sym($s)?)
            };
        }
        let omp = libc::dlsym(handle, c"omp_set_num_threads".as_ptr());
        let api = Api {
            engine_create: f!(c"dnnl_engine_create"),
            stream_create: f!(c"dnnl_stream_create"),
            memory_desc_init_by_strides: f!(c"dnnl_memory_desc_init_by_strides"),
            matmul_desc_init: f!(c"dnnl_matmul_desc_init"),
            primitive_attr_create: f!(c"dnnl_primitive_attr_create"),
            primitive_attr_destroy: f!(c"dnnl_primitive_attr_destroy"),
            post_ops_create: f!(c"dnnl_post_ops_create"),
            post_ops_destroy: f!(c"dnnl_post_ops_destroy"),
            post_ops_append_sum: f!(c"dnnl_post_ops_append_sum"),
            primitive_attr_set_post_ops: f!(c"dnnl_primitive_attr_set_post_ops"),
            primitive_desc_create: f!(c"dnnl_primitive_desc_create"),
            primitive_desc_query: f!(c"dnnl_primitive_desc_query"),
            primitive_desc_destroy: f!(c"dnnl_primitive_desc_destroy"),
            primitive_desc_query_md: f!(c"dnnl_primitive_desc_query_md"),
            memory_desc_get_size: f!(c"dnnl_memory_desc_get_size"),
            primitive_attr_set_scratchpad_mode: f!(c"dnnl_primitive_attr_set_scratchpad_mode"),
            primitive_create: f!(c"dnnl_primitive_create"),
            memory_create: f!(c"dnnl_memory_create"),
            memory_destroy: f!(c"dnnl_memory_destroy"),
            primitive_execute: f!(c"dnnl_primitive_execute"),
            stream_wait: f!(c"dnnl_stream_wait"),
            effective_cpu_isa: f!(c"dnnl_get_effective_cpu_isa"),
            omp_set_num_threads: (!omp.is_null())
                .then(|| std::mem::transmute::<*mut c_void, unsafe extern "C" fn(c_int)>(omp)),
        };
        let isa = (api.effective_cpu_isa)();
        let mut engine = std::ptr::null_mut();
        check((api.engine_create)(&mut engine, ENGINE_CPU, 0), "engine_create")?;
        Ok(OneDnn { api, engine, isa, primitives: Mutex::new(HashMap::new()), kernels: Default::default() })
    }
}

/// Turns bf16 products on for the whole process (`--precision bf16`), or says in one line why it
/// cannot: oneDNN missing, or a CPU without bf16 instructions. Returns what will run them.
pub fn enable_bf16() -> Result<String> {
    let lib = loaded().map_err(|why| anyhow::anyhow!("--precision bf16 needs {why}"))?;
    if !lib.has_bf16() {
        bail!(
            "--precision bf16 needs a CPU with AMX or AVX512_BF16 instructions, and this one has neither \
             (use --precision fp32)"
        );
    }
    ACTIVE.store(true, Ordering::Relaxed);
    Ok(lib.describe(DATA_BF16))
}

/// oneDNN, opened on first use, or the reason it cannot be ("oneDNN 2.x, but ... cannot be loaded").
pub(crate) fn loaded() -> std::result::Result<&'static OneDnn, &'static str> {
    LOADED.get_or_init(open).as_ref().map_err(String::as_str)
}

/// Back to fp32 products (benchmarks compare both in one process).
pub fn disable_bf16() {
    ACTIVE.store(false, Ordering::Relaxed);
}

/// oneDNN when bf16 products are on.
pub(crate) fn active() -> Option<&'static OneDnn> {
    if !ACTIVE.load(Ordering::Relaxed) {
        return None;
    }
    LOADED.get().and_then(|r| r.as_ref().ok())
}

impl OneDnn {
    /// Whether the CPU multiplies bf16 in hardware (AMX or AVX512_BF16), as oneDNN sees it.
    pub fn has_bf16(&self) -> bool {
        self.isa & ISA_BF16 == ISA_BF16
    }

    /// For logs and benchmark records, e.g. "oneDNN bf16 (AMX, brg:avx512_core_amx_bf16)" or
    /// "oneDNN f32 (gemm:jit)": the products of `data` type, with the kernel of the first one
    /// compiled once there is one.
    pub(crate) fn describe(&self, data: c_int) -> String {
        let bf16 = data == DATA_BF16;
        let mut details = Vec::new();
        if bf16 {
            details.push(if self.isa & ISA_AMX == ISA_AMX { "AMX" } else { "AVX512_BF16" }.to_string());
        }
        details.extend(self.kernels[usize::from(!bf16)].get().cloned());
        let name = if bf16 { "oneDNN bf16" } else { "oneDNN f32" };
        if details.is_empty() { name.to_string() } else { format!("{name} ({})", details.join(", ")) }
    }

    /// The compiled kernel for `shape`, compiled now if it is new.
    fn primitive(&self, shape: BlockShape) -> std::result::Result<Primitive, String> {
        let mut primitives = self.primitives.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = primitives.get(&shape) {
            return Ok(*p);
        }
        let api = &self.api;
        let (mut a, mut b, mut c, mut op) = (Desc::boxed(), Desc::boxed(), Desc::boxed(), Desc::boxed());
        let mut bias = Desc::boxed();
        // SAFETY: oneDNN 2.x C calls on descriptors large enough for what they write; every
        // object created here is destroyed here, except the primitive and its descriptor, which
        // are kept for good.
        unsafe {
            let dims = |r: i64, c: i64| [r, c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            let (a_dims, a_strides) = (dims(shape.m, shape.k), dims(shape.a_strides[0], shape.a_strides[1]));
            let (b_dims, b_strides) = (dims(shape.k, shape.n), dims(shape.b_strides[0], shape.b_strides[1]));
            let (c_dims, c_strides) = (dims(shape.m, shape.n), dims(shape.c_row_stride, 1));
            let init = api.memory_desc_init_by_strides;
            let data = shape.operands;
            check(init(a.ptr(), 2, a_dims.as_ptr(), data, a_strides.as_ptr()), "memory_desc_init (A)")?;
            check(init(b.ptr(), 2, b_dims.as_ptr(), data, b_strides.as_ptr()), "memory_desc_init (B)")?;
            check(init(c.ptr(), 2, c_dims.as_ptr(), DATA_F32, c_strides.as_ptr()), "memory_desc_init (C)")?;
            let bias_md = if shape.bias {
                let (bias_dims, bias_strides) = (dims(1, shape.n), dims(shape.n, 1));
                let made = init(bias.ptr(), 2, bias_dims.as_ptr(), DATA_F32, bias_strides.as_ptr());
                check(made, "memory_desc_init (bias)")?;
                bias.ptr().cast_const()
            } else {
                std::ptr::null()
            };
            check((api.matmul_desc_init)(op.ptr(), a.ptr(), b.ptr(), bias_md, c.ptr()), "matmul_desc_init")?;
            let mut attr = std::ptr::null_mut();
            check((api.primitive_attr_create)(&mut attr), "primitive_attr_create")?;
            let user_scratch = (api.primitive_attr_set_scratchpad_mode)(attr, SCRATCHPAD_MODE_USER);
            if user_scratch != SUCCESS {
                (api.primitive_attr_destroy)(attr);
                check(user_scratch, "primitive_attr_set_scratchpad_mode")?;
            }
            if shape.accumulate {
                let mut post_ops = std::ptr::null_mut();
                check((api.post_ops_create)(&mut post_ops), "post_ops_create")?;
                let appended = (api.post_ops_append_sum)(post_ops, 1.0);
                let set = (api.primitive_attr_set_post_ops)(attr, post_ops);
                (api.post_ops_destroy)(post_ops);
                check(appended, "post_ops_append_sum")?;
                check(set, "primitive_attr_set_post_ops")?;
            }
            let mut pd = std::ptr::null_mut();
            let created =
                (api.primitive_desc_create)(&mut pd, op.ptr(), attr, self.engine, std::ptr::null_mut());
            (api.primitive_attr_destroy)(attr);
            check(created, "matmul primitive_desc_create")?;
            let mut name: *const c_char = std::ptr::null();
            if (api.primitive_desc_query)(
                pd,
                QUERY_IMPL_INFO_STR,
                0,
                (&mut name as *mut *const c_char).cast(),
            ) == SUCCESS
                && !name.is_null()
            {
                let name = CStr::from_ptr(name).to_string_lossy().into_owned();
                let _ = self.kernels[usize::from(shape.operands != DATA_BF16)].set(name);
            }
            let mut handle = std::ptr::null_mut();
            let made = (api.primitive_create)(&mut handle, pd);
            if made != SUCCESS {
                (api.primitive_desc_destroy)(pd);
                check(made, "matmul primitive_create")?;
            }
            let [a_md, b_md, c_md] = QUERY_OPERAND_MDS.map(|what| (api.primitive_desc_query_md)(pd, what, 0));
            let bias_md = if shape.bias {
                (api.primitive_desc_query_md)(pd, QUERY_WEIGHTS_MD, 1)
            } else {
                std::ptr::null()
            };
            let operand_mds = [a_md, b_md, c_md, bias_md];
            let scratch_md = (api.primitive_desc_query_md)(pd, QUERY_SCRATCHPAD_MD, 0);
            let scratch_bytes = if scratch_md.is_null() { 0 } else { (api.memory_desc_get_size)(scratch_md) };
            let primitive = Primitive { handle, _pd: pd, operand_mds, scratch_md, scratch_bytes };
            primitives.insert(shape, primitive);
            Ok(primitive)
        }
    }

    /// This thread's stream; the first call on a thread also sets oneDNN's OpenMP to one
    /// thread there (rayon already runs one block per core).
    fn stream(&self) -> std::result::Result<Handle, String> {
        let stream = STREAM.with(Cell::get);
        if !stream.is_null() {
            return Ok(stream);
        }
        let mut stream = std::ptr::null_mut();
        // SAFETY: plain oneDNN / OpenMP calls; the stream lives as long as the thread.
        unsafe {
            if let Some(set) = self.api.omp_set_num_threads {
                set(1);
            }
            check((self.api.stream_create)(&mut stream, self.engine, STREAM_DEFAULT_FLAGS), "stream_create")?;
        }
        STREAM.with(|s| s.set(stream));
        Ok(stream)
    }

    /// C (its row stride `shape.c_row_stride`) = A·B (+ C when `shape.accumulate`, + the bias
    /// row when `shape.bias`) for one block.
    ///
    /// # Safety
    /// `a`, `b`, `c` and `bias` must address every element `shape` and its strides describe.
    unsafe fn run_block(
        &self,
        shape: BlockShape,
        a: *const c_void,
        b: *const c_void,
        c: *mut f32,
        bias: *const f32,
    ) -> std::result::Result<(), String> {
        let primitive = self.primitive(shape)?;
        let stream = self.stream()?;
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let lines = primitive.scratch_bytes.div_ceil(64);
            if scratch.len() < lines {
                scratch.resize(lines, CacheLine([0; 64]));
            }
            // SAFETY: as below; the scratch memory is this thread's alone for the call.
            unsafe {
                self.execute(
                    primitive,
                    stream,
                    [a.cast_mut().cast(), b.cast_mut().cast(), c.cast(), bias.cast_mut().cast()],
                    scratch.as_mut_ptr().cast(),
                )
            }
        })
    }

    /// Runs `primitive` on its buffers (A, B, C and the bias where it has one, laid out as it was
    /// compiled for) and `scratch`.
    ///
    /// # Safety
    /// As [`Self::run_block`]; `scratch` holds `primitive.scratch_bytes`.
    unsafe fn execute(
        &self,
        primitive: Primitive,
        stream: Handle,
        buffers: [*mut c_void; 4],
        scratch: *mut c_void,
    ) -> std::result::Result<(), String> {
        let api = &self.api;
        let mut memories = [std::ptr::null_mut(); 5];
        // SAFETY: as `primitive`; the memories wrap the caller's buffers without copying and are
        // destroyed before returning, after the stream has finished with them.
        unsafe {
            let mut status = SUCCESS;
            let mut args = Vec::with_capacity(5);
            let operands = primitive.operand_mds.into_iter().zip(buffers).zip(&mut memories);
            for (arg, ((md, buffer), memory)) in
                [ARG_SRC, ARG_WEIGHTS, ARG_DST, ARG_BIAS].into_iter().zip(operands)
            {
                if status == SUCCESS && !md.is_null() {
                    status = (api.memory_create)(memory, md, self.engine, buffer);
                    args.push(ExecArg { arg, memory: *memory });
                }
            }
            if status == SUCCESS && primitive.scratch_bytes > 0 {
                status = (api.memory_create)(&mut memories[4], primitive.scratch_md, self.engine, scratch);
                args.push(ExecArg { arg: ARG_SCRATCHPAD, memory: memories[4] });
            }
            if status == SUCCESS {
                status =
                    (api.primitive_execute)(primitive.handle, stream, args.len() as c_int, args.as_ptr());
                if status == SUCCESS {
                    status = (api.stream_wait)(stream);
                }
            }
            for mem in memories.into_iter().filter(|m| !m.is_null()) {
                (api.memory_destroy)(mem);
            }
            check(status, "matmul execute")
        }
    }
}

/// f32 → bf16 for a slice, 16 at a time with AVX512_BF16's `vcvtneps2bf16` where the CPU has it
/// (the same rounding as [`bf16_bits`], except that it flushes denormals to zero).
pub fn to_bf16(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512bf16") {
        // SAFETY: the CPU has the instructions the function is compiled for.
        return unsafe { to_bf16_avx512(src, dst) };
    }
    dst.iter_mut().zip(src).for_each(|(o, x)| *o = bf16_bits(*x));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
fn to_bf16_avx512(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let (src16, dst16) = (src.chunks_exact(16), dst.chunks_exact_mut(16));
    let (src_tail, dst_tail) = (src16.remainder(), dst16.len() * 16);
    for (x, y) in src16.zip(dst16) {
        // SAFETY: 16 f32 read from and 16 u16 written to slices of exactly that length.
        unsafe {
            let v = _mm512_cvtneps_pbh(_mm512_loadu_ps(x.as_ptr()));
            _mm256_storeu_si256(y.as_mut_ptr().cast(), std::mem::transmute::<__m256bh, __m256i>(v));
        }
    }
    dst[dst_tail..].iter_mut().zip(src_tail).for_each(|(o, x)| *o = bf16_bits(*x));
}

/// The element type a product's operands are handed to oneDNN in: bf16 bits (`u16`) or f32.
pub(crate) trait Operand: Copy + Default + Send + Sync + 'static {
    /// oneDNN's name for the type.
    const DATA_TYPE: c_int;
    /// Rows and columns of the output blocks a product is cut into: the fastest on the
    /// all-MiniLM-L6-v2 shapes measured (benchmarks/README.md).
    const BLOCK: (usize, usize);
    /// `src` in this type.
    fn convert(src: &[f32], dst: &mut [Self]);
    /// Whether f32 operands can be read where they are (no conversion).
    const IN_PLACE: bool;
    /// Buffers kept between products: every element is written each time, so reusing them
    /// saves allocating and zero-filling megabytes per product.
    fn pool() -> &'static Mutex<Vec<Vec<Self>>>;
}

impl Operand for u16 {
    const DATA_TYPE: c_int = DATA_BF16;
    const BLOCK: (usize, usize) = (BLOCK, BLOCK);
    const IN_PLACE: bool = false;
    fn convert(src: &[f32], dst: &mut [u16]) {
        to_bf16(src, dst)
    }
    fn pool() -> &'static Mutex<Vec<Vec<u16>>> {
        static POOL: Mutex<Vec<Vec<u16>>> = Mutex::new(Vec::new());
        &POOL
    }
}

impl Operand for f32 {
    const DATA_TYPE: c_int = DATA_F32;
    const BLOCK: (usize, usize) = (128, 512);
    const IN_PLACE: bool = true;
    fn convert(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    fn pool() -> &'static Mutex<Vec<Vec<f32>>> {
        static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
        &POOL
    }
}

/// One operand copied in the orientation it came in (converted to `T`), padded with zeros; its
/// buffer goes back to `T::pool()` when dropped.
struct PaddedOperand<T: Operand> {
    data: Vec<T>,
    /// Strides (row, column) of the logical matrix in `data`.
    strides: [usize; 2],
}

impl<T: Operand> Drop for PaddedOperand<T> {
    fn drop(&mut self) {
        let mut buffers = T::pool().lock().unwrap_or_else(|e| e.into_inner());
        if buffers.len() < 8 {
            buffers.push(std::mem::take(&mut self.data));
        }
    }
}

/// Copies `mat` (converted to `T`) as a `rows_padded × cols_padded` matrix (the extra rows and
/// columns zero), keeping its orientation. `None` when its layout is neither row- nor
/// column-contiguous.
fn convert<T: Operand>(mat: Mat<f32>, rows_padded: usize, cols_padded: usize) -> Option<PaddedOperand<T>> {
    // Contiguous along columns: store rows of `cols_padded`; along rows: columns of `rows_padded`.
    let (lines, line_len, valid_lines, valid_len, line_stride, strides) = if mat.cs == 1 {
        (rows_padded, cols_padded, mat.rows, mat.cols, mat.rs, [cols_padded, 1])
    } else if mat.rs == 1 {
        (cols_padded, rows_padded, mat.cols, mat.rows, mat.cs, [1, rows_padded])
    } else {
        return None;
    };
    // The pool's longest buffer, grown where too short but never shrunk: after the first few
    // products every buffer fits, and none is zero-filled again before being overwritten.
    let mut data = {
        let mut pool = T::pool().lock().unwrap_or_else(|e| e.into_inner());
        let longest = (0..pool.len()).max_by_key(|&i| pool[i].len());
        longest.map(|i| pool.swap_remove(i)).unwrap_or_default()
    };
    let len = lines * line_len;
    if data.len() < len {
        data.resize(len, T::default());
    }
    let src = mat.data;
    data[..len].par_chunks_mut(line_len * 16).enumerate().for_each(|(chunk, out)| {
        for (i, line) in out.chunks_mut(line_len).enumerate() {
            let l = chunk * 16 + i;
            let (values, padding) = line.split_at_mut(if l < valid_lines { valid_len } else { 0 });
            if !values.is_empty() {
                T::convert(&src[l * line_stride..l * line_stride + valid_len], values);
            }
            padding.fill(T::default());
        }
    });
    Some(PaddedOperand { data, strides })
}

/// C (m×n, row stride `ldc`) = A·B (+ C when `accumulate`) with A and B rounded to bf16 and the
/// sums in fp32. `false` when nothing was done (bf16 off, or a layout this path does not take),
/// so the caller multiplies in fp32.
pub(crate) fn gemm_bf16(a: Mat<f32>, b: Mat<f32>, accumulate: bool, c: &mut [f32], ldc: usize) -> bool {
    active().is_some_and(|lib| lib.gemm::<u16>(a, b, accumulate, c, ldc))
}

/// C (m×n, row stride `ldc`) = A·B (+ C when `accumulate`) in fp32 by oneDNN's f32 matmul
/// (`HPO_GPU_GEMM=onednn`). `false` when nothing was done (oneDNN not loaded, or a layout this
/// path leaves to `matrixmultiply`).
///
/// A read transposed (the weight gradients, dyᵀ·x, whose inner dimension is the token count) is
/// left to `matrixmultiply`: oneDNN was 0.95× its speed there, 1.35–1.5× on the forward
/// products (benchmarks/README.md).
pub(crate) fn gemm_f32(a: Mat<f32>, b: Mat<f32>, accumulate: bool, c: &mut [f32], ldc: usize) -> bool {
    a.cs == 1 && loaded().is_ok_and(|lib| lib.gemm::<f32>(a, b, accumulate, c, ldc))
}

/// C (m×n, row stride `ldc`, its elements possibly uninitialized) = A·B + bias (one row, added
/// to every row) in one oneDNN product per block — a linear layer's forward with no separate
/// pass writing the bias first — in bf16 when `--precision bf16` is on, else in fp32 where
/// `HPO_GPU_GEMM` chose oneDNN. `false` when nothing was done (C untouched).
pub(crate) fn linear_with_bias(
    a: Mat<f32>,
    b: Mat<f32>,
    bias: &[f32],
    c: &mut [std::mem::MaybeUninit<f32>],
    ldc: usize,
) -> bool {
    assert!(bias.len() >= b.cols, "linear: bias shorter than the output row");
    let (out, len) = (c.as_mut_ptr().cast::<f32>(), c.len());
    if let Some(lib) = active() {
        return lib.gemm_into::<u16>(a, b, Some(bias), false, out, len, ldc);
    }
    a.cs == 1
        && super::blas::onednn_chosen()
        && loaded().is_ok_and(|lib| lib.gemm_into::<f32>(a, b, Some(bias), false, out, len, ldc))
}

impl OneDnn {
    /// C = A·B (+ C when `accumulate`) with operands in `T`, whatever the process's settings.
    fn gemm<T: Operand>(
        &self,
        a: Mat<f32>,
        b: Mat<f32>,
        accumulate: bool,
        c: &mut [f32],
        ldc: usize,
    ) -> bool {
        self.gemm_into::<T>(a, b, None, accumulate, c.as_mut_ptr(), c.len(), ldc)
    }

    /// [`Self::gemm`] into `c_len` values at `c`, plus the `bias` row where given (then
    /// `accumulate` is false and C's old values, possibly uninitialized, are never read).
    #[allow(clippy::too_many_arguments)]
    fn gemm_into<T: Operand>(
        &self,
        a: Mat<f32>,
        b: Mat<f32>,
        bias: Option<&[f32]>,
        accumulate: bool,
        c: *mut f32,
        c_len: usize,
        ldc: usize,
    ) -> bool {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        if m == 0 || n == 0 || k == 0 || k != b.rows {
            return false;
        }
        assert!(c_len >= (m - 1) * ldc + n, "gemm: output too small");
        assert!(!(accumulate && bias.is_some()), "gemm: a bias or accumulating, not both");
        assert!(bias.is_none_or(|b| b.len() >= n), "gemm: bias shorter than the output row");
        let bias = bias.map(|b| SendPtr(b.as_ptr().cast_mut()));
        let (mp, kp) = (m.next_multiple_of(32), padded_inner(k));
        // A in place (f32, unpadded inner dimension) has no rows past `m`: its last row block
        // is padded on its own below. A copy is padded to `mp` rows.
        let a_rows = if T::IN_PLACE && kp == k { m } else { mp };
        let (Some(a_src), Some(b_src)) = (Source::<T>::new(a, a_rows, kp), Source::<T>::new(b, kp, n)) else {
            return false;
        };
        let (bm, bn) = T::BLOCK;
        // Rows past `m` exist only in a padded copy: an in-place A's last row block is copied
        // once here, padded, for all its column blocks.
        let tail_start = (m - 1) / bm * bm;
        let tail_rows = m - tail_start;
        let tail = match &a_src {
            Source::InPlace(a) if tail_rows % 32 != 0 => {
                let rows_a = Mat { data: &a.data[tail_start * a.rs..], rows: tail_rows, ..*a };
                let copy = convert::<T>(rows_a, tail_rows.next_multiple_of(32), kp);
                Some((tail_start, copy.expect("in place only when contiguous")))
            }
            _ => None,
        };
        let blocks: Vec<(usize, usize)> =
            (0..m.div_ceil(bm)).flat_map(|r| (0..n.div_ceil(bn)).map(move |c| (r * bm, c * bn))).collect();
        let out = SendPtr(c);
        let failed =
            blocks.into_par_iter().try_for_each_init(Vec::new, |scratch: &mut Vec<f32>, (r0, c0)| {
                let (rows, cols) = ((m - r0).min(bm), (n - c0).min(bn));
                let rows_padded = rows.next_multiple_of(32);
                let (a_block, a_strides) = match &tail {
                    Some((start, copy)) if *start == r0 => (copy.data.as_ptr().cast(), copy.strides),
                    _ => (a_src.at(r0, 0), a_src.strides()),
                };
                let shape = |c_row_stride: usize| BlockShape {
                    operands: T::DATA_TYPE,
                    m: rows_padded as i64,
                    k: kp as i64,
                    n: cols as i64,
                    a_strides: a_strides.map(|s| s as i64),
                    b_strides: b_src.strides().map(|s| s as i64),
                    c_row_stride: c_row_stride as i64,
                    accumulate,
                    bias: bias.is_some(),
                };
                // SAFETY: the block's elements of A and B lie inside them (rows padded to `mp`,
                // inner dimension to `kp`, where padded), and its C elements belong to this block
                // alone.
                unsafe {
                    let b_block = b_src.at(0, c0);
                    let c_block = out.get().add(r0 * ldc + c0);
                    let bias_block = bias.map_or(std::ptr::null(), |b| b.get().add(c0).cast_const());
                    if rows_padded == rows {
                        return self.run_block(shape(ldc), a_block, b_block, c_block, bias_block);
                    }
                    // The padded rows have nowhere to go in C: compute the block into scratch.
                    // Only grown: the product overwrites it (beta 0) or its rows are copied in
                    // (accumulate); the padded rows' values are never read back.
                    if scratch.len() < rows_padded * cols {
                        scratch.resize(rows_padded * cols, 0.0);
                    }
                    if accumulate {
                        for i in 0..rows {
                            std::ptr::copy_nonoverlapping(
                                c_block.add(i * ldc),
                                scratch.as_mut_ptr().add(i * cols),
                                cols,
                            );
                        }
                    }
                    self.run_block(shape(cols), a_block, b_block, scratch.as_mut_ptr(), bias_block)?;
                    for i in 0..rows {
                        std::ptr::copy_nonoverlapping(
                            scratch.as_ptr().add(i * cols),
                            c_block.add(i * ldc),
                            cols,
                        );
                    }
                    Ok(())
                }
            });
        if let Err(why) = failed {
            // A failure after the checks at start-up is a broken installation, not bad input.
            panic!("{why}");
        }
        true
    }
}

/// An operand as oneDNN reads it: the caller's f32 where it needs no converting and its inner
/// dimension no padding, else a padded copy.
enum Source<'a, T: Operand> {
    InPlace(Mat<'a, f32>),
    Copied(PaddedOperand<T>),
}

impl<'a, T: Operand> Source<'a, T> {
    /// `mat` as a `rows_padded × cols_padded` operand: in place when that is its size;
    /// `None` when its layout is neither row- nor column-contiguous.
    fn new(mat: Mat<'a, f32>, rows_padded: usize, cols_padded: usize) -> Option<Self> {
        let contiguous = mat.cs == 1 || mat.rs == 1;
        if T::IN_PLACE && contiguous && (rows_padded, cols_padded) == (mat.rows, mat.cols) {
            Some(Source::InPlace(mat))
        } else {
            convert(mat, rows_padded, cols_padded).map(Source::Copied)
        }
    }

    fn strides(&self) -> [usize; 2] {
        match self {
            Source::InPlace(mat) => [mat.rs, mat.cs],
            Source::Copied(copy) => copy.strides,
        }
    }

    /// The address of element (row, col).
    fn at(&self, row: usize, col: usize) -> *const c_void {
        let [rs, cs] = self.strides();
        match self {
            Source::InPlace(mat) => mat.data.as_ptr().wrapping_add(row * rs + col * cs).cast(),
            Source::Copied(copy) => copy.data.as_ptr().wrapping_add(row * rs + col * cs).cast(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): rounds up.
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16_bits(1.0 + 1.5 / 256.0), 0x3f81);
        assert_eq!(bf16_bits(-2.5), 0xc020);
        assert!(bf16_value(bf16_bits(f32::NAN)).is_nan());
        assert_eq!(bf16_value(bf16_bits(f32::INFINITY)), f32::INFINITY);
        assert_eq!(bf16_value(bf16_bits(f32::MAX)), f32::INFINITY);
        for x in [0.1f32, -3.7, 1e-30, 12345.678] {
            let r = bf16_value(bf16_bits(x));
            assert!(((r - x) / x).abs() <= 1.0 / 256.0, "{x} -> {r}");
            assert_eq!(half::bf16::from_f32(x).to_bits(), bf16_bits(x), "{x}");
        }
    }

    /// oneDNN for a test, without turning bf16 on for the other tests of this process; `None`
    /// (after saying why) where it cannot run, which `HPO_GPU_REQUIRE_BF16=1` makes a failure.
    fn onednn_for_test() -> Option<&'static OneDnn> {
        let usable = loaded().map_err(str::to_string).and_then(|lib| {
            if lib.has_bf16() { Ok(lib) } else { Err("the CPU has no bf16 instructions".to_string()) }
        });
        match usable {
            Ok(lib) => Some(lib),
            Err(why) if std::env::var("HPO_GPU_REQUIRE_BF16").as_deref() == Ok("1") => {
                panic!("HPO_GPU_REQUIRE_BF16=1 but {why}")
            }
            Err(why) => {
                eprintln!("SKIPPED: {why}");
                None
            }
        }
    }

    fn random(len: usize, seed: u64) -> Vec<f32> {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect()
    }

    /// oneDNN's f32 products for a test, or `None` (after saying why) where it is missing, which
    /// `HPO_GPU_REQUIRE_ONEDNN=1` (or `HPO_GPU_REQUIRE_BF16=1`) makes a failure.
    fn onednn_f32_for_test() -> Option<&'static OneDnn> {
        let required = ["HPO_GPU_REQUIRE_ONEDNN", "HPO_GPU_REQUIRE_BF16"]
            .iter()
            .any(|var| std::env::var(var).as_deref() == Ok("1"));
        match loaded() {
            Ok(lib) => Some(lib),
            Err(why) if required => panic!("oneDNN is required here but {why}"),
            Err(why) => {
                eprintln!("SKIPPED: {why}");
                None
            }
        }
    }

    /// Checks `T`'s products against sums in f64 of the operands as `round` sees them, on every
    /// layout the linear layers use (B = Wᵀ forward, B = W for dx, A = dyᵀ for dw), with padded
    /// row tails, several row and column blocks, padded token counts, accumulation and a wide C.
    fn products_equal_exact_sums<T: Operand>(lib: &OneDnn, round: impl Fn(f32) -> f64) {
        // (m, k, n, A transposed, B transposed, accumulate, extra C columns)
        let cases = [
            (300, 128, 600, false, true, false, 0),
            (70, 384, 128, false, false, true, 3),
            (96, 1000, 200, true, false, true, 0),
            (1, 64, 1, false, true, false, 0),
            (513, 1536, 40, false, true, true, 1),
        ];
        for (case, &(m, k, n, a_t, b_t, accumulate, extra)) in cases.iter().enumerate() {
            let (a, b) = (random(m * k, 2 * case as u64), random(k * n, 2 * case as u64 + 1));
            let a_view = if a_t { Mat::rm_t(&a, k, m) } else { Mat::rm(&a, m, k) };
            let b_view = if b_t { Mat::rm_t(&b, n, k) } else { Mat::rm(&b, k, n) };
            let ldc = n + extra;
            let c0 = random(m * ldc, 99);
            let mut c = c0.clone();
            assert!(lib.gemm::<T>(a_view, b_view, accumulate, &mut c, ldc), "case {case}: layout refused");
            for i in 0..m {
                for j in 0..ldc {
                    let got = f64::from(c[i * ldc + j]);
                    if j >= n {
                        assert_eq!(
                            got,
                            f64::from(c0[i * ldc + j]),
                            "case {case}: C's padding at ({i}, {j}) written"
                        );
                        continue;
                    }
                    let (mut sum, mut size) = (0.0f64, 0.0f64);
                    for p in 0..k {
                        let x = a_view.data[i * a_view.rs + p * a_view.cs];
                        let y = b_view.data[p * b_view.rs + j * b_view.cs];
                        sum += round(x) * round(y);
                        size += (round(x) * round(y)).abs();
                    }
                    if accumulate {
                        sum += f64::from(c0[i * ldc + j]);
                        size += f64::from(c0[i * ldc + j]).abs();
                    }
                    // Only the fp32 products (exact for bf16 operands) and sums round.
                    let tolerance = (k as f64 + 2.0) * f64::from(f32::EPSILON) * size;
                    assert!(
                        (got - sum).abs() <= tolerance,
                        "case {case} ({i}, {j}): {got} vs {sum} ± {tolerance}"
                    );
                }
            }
        }
    }

    #[test]
    fn bf16_products_equal_exact_sums_of_the_rounded_operands() {
        let Some(lib) = onednn_for_test() else { return };
        products_equal_exact_sums::<u16>(lib, |x| f64::from(bf16_value(bf16_bits(x))));
        // The operands really are rounded: 1 + 2⁻¹⁰ is 1 in bf16, so 64 such products sum to 64.
        let (a, b) = (vec![1.0 + 1.0 / 1024.0; 64], vec![1.0f32; 64]);
        let mut c = vec![0.0f32; 1];
        assert!(lib.gemm::<u16>(Mat::rm(&a, 1, 64), Mat::rm(&b, 64, 1), false, &mut c, 1));
        assert_eq!(c[0], 64.0);
        assert!(lib.describe(DATA_BF16).starts_with("oneDNN bf16 ("), "{}", lib.describe(DATA_BF16));
    }

    #[test]
    fn f32_products_equal_exact_sums() {
        let Some(lib) = onednn_f32_for_test() else { return };
        products_equal_exact_sums::<f32>(lib, f64::from);
        // Not rounded to bf16: 64 · (1 + 2⁻¹⁰) keeps its fraction.
        let (a, b) = (vec![1.0 + 1.0 / 1024.0; 64], vec![1.0f32; 64]);
        let mut c = vec![0.0f32; 1];
        assert!(lib.gemm::<f32>(Mat::rm(&a, 1, 64), Mat::rm(&b, 64, 1), false, &mut c, 1));
        assert_eq!(c[0], 64.0 + 64.0 / 1024.0);
        assert!(lib.describe(DATA_F32).starts_with("oneDNN f32"), "{}", lib.describe(DATA_F32));
        // The weight gradients' layout (A transposed) is left to matrixmultiply.
        let x = random(64 * 32, 5);
        assert!(!gemm_f32(Mat::rm_t(&x, 64, 32), Mat::rm(&x, 64, 32), false, &mut vec![0.0; 32 * 32], 32));
    }

    /// What keeps a trial in a trial array bit-identical to the same trial alone, and a review's
    /// prediction independent of the batch it is in: a row's product is the same bits wherever
    /// the row falls in A (another block, another place in a block, the padded last block).
    #[test]
    fn a_bias_added_in_the_product_gives_the_bias_first_results() {
        fn check<T: Operand>(lib: &OneDnn, what: &str, exact: bool) {
            for (m, k, n) in [(300, 384, 1152), (45, 128, 128), (64, 1536, 384)] {
                let (a, w, bias) = (random(m * k, k as u64), random(n * k, n as u64), random(n, 7));
                let (a_view, w_view) = (Mat::rm(&a, m, k), Mat::rm_t(&w, n, k));
                // Rows start as the bias, the product accumulated onto them.
                let mut want: Vec<f32> = (0..m).flat_map(|_| bias.iter().copied()).collect();
                assert!(lib.gemm::<T>(a_view, w_view, true, &mut want, n));
                let mut got = vec![std::mem::MaybeUninit::new(f32::NAN); m * n];
                let (out, len) = (got.as_mut_ptr().cast::<f32>(), got.len());
                assert!(lib.gemm_into::<T>(a_view, w_view, Some(&bias), false, out, len, n));
                let got: Vec<f32> = got.iter().map(|x| unsafe { x.assume_init() }).collect();
                if exact {
                    assert!(
                        got == want,
                        "{what} {m}x{k}x{n}: the bias in the product differs from bias first"
                    );
                }
                // bf16's AMX kernels add the bias at another point of their fp32 sums: rounding
                // differs by the sums' order (bounded by the terms' magnitudes), nothing more —
                // a bias rounded to bf16 would be off by |bias|/512.
                for (e, (g, w)) in got.iter().zip(&want).enumerate() {
                    let (i, j) = (e / n, e % n);
                    let magnitude: f32 = (0..k).map(|p| (a[i * k + p] * w_view.data[j * k + p]).abs()).sum();
                    let tolerance = 1e-6 * (magnitude + bias[j].abs()) + 1e-7;
                    assert!((g - w).abs() <= tolerance, "{what} {m}x{k}x{n}: {g} vs {w}");
                }
            }
        }
        if let Some(lib) = onednn_f32_for_test() {
            check::<f32>(lib, "f32", true);
        }
        if let Some(lib) = onednn_for_test() {
            check::<u16>(lib, "bf16", false);
        }
    }

    #[test]
    fn f32_products_of_a_row_do_not_depend_on_where_it_falls() {
        let Some(lib) = onednn_f32_for_test() else { return };
        for (k, n, b_t) in [(384, 1152, true), (128, 128, true), (1536, 384, true), (384, 1536, false)] {
            let (m, shift) = (300, 37);
            let (a, b) = (random(m * k, k as u64), random(k * n, n as u64));
            let b_view = if b_t { Mat::rm_t(&b, n, k) } else { Mat::rm(&b, k, n) };
            let mut whole = vec![0.0f32; m * n];
            assert!(lib.gemm::<f32>(Mat::rm(&a, m, k), b_view, false, &mut whole, n));
            // The same rows moved up by `shift`, and a single row alone.
            let mut shifted = vec![0.0f32; (m - shift) * n];
            assert!(lib.gemm::<f32>(Mat::rm(&a[shift * k..], m - shift, k), b_view, false, &mut shifted, n));
            let mut single = vec![0.0f32; n];
            assert!(lib.gemm::<f32>(Mat::rm(&a[200 * k..], 1, k), b_view, false, &mut single, n));
            for i in shift..m {
                assert!(
                    whole[i * n..(i + 1) * n] == shifted[(i - shift) * n..(i - shift + 1) * n],
                    "k {k} n {n}: row {i} differs once moved to row {}",
                    i - shift
                );
            }
            assert!(whole[200 * n..201 * n] == single[..], "k {k} n {n}: row 200 differs alone");
        }
    }

    #[test]
    fn slices_convert_as_single_values_do() {
        let mut x = random(1000, 7);
        x.extend([0.0, -0.0, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, f32::INFINITY, 3.0e38, 1e-30]);
        let mut y = vec![0u16; x.len()];
        to_bf16(&x, &mut y);
        for (x, y) in x.iter().zip(&y) {
            assert_eq!(*y, bf16_bits(*x), "{x}");
        }
    }

    #[test]
    fn inner_padding_keeps_weight_sizes_and_rounds_token_counts() {
        assert_eq!([128, 384, 1536].map(padded_inner), [128, 384, 1536]);
        assert_eq!([1, 100, 1000, 1025, 4000].map(padded_inner), [64, 128, 1024, 1280, 4096]);
    }
}
