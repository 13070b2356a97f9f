//! The virtual device's own rules, on the kernels of runtime/selftest.cu: correct kernels give
//! the right numbers, and every broken rule (divergent barrier, shuffle naming an exited lane,
//! deadlock, a write past an allocation, too much shared memory, a bad launch shape, a PTX entry
//! without a host twin and the reverse, a parameter size mismatch, out of memory) is reported
//! with CUDA's error code and a message naming the kernel.

use std::ffi::{CString, c_void};

use cuda::driver::*;
use cuda::memory;

/// (entry, parameter types) of every selftest kernel, as nvcc would declare them.
const SELFTEST: &[(&str, &[&str])] = &[
    ("selftest_block_sum", &[".u64", ".u64", ".u32"]),
    ("selftest_early_exit_barrier", &[".u64"]),
    ("selftest_reverse", &[".u64", ".u64"]),
    ("selftest_divergent_barrier", &[".u64"]),
    ("selftest_shuffle_exited_lane", &[".u64"]),
    ("selftest_deadlock", &[".u64"]),
    ("selftest_write_index", &[".u64"]),
    ("selftest_big_shared", &[".u64"]),
    ("selftest_uninitialised_shared", &[".u64"]),
];

fn ptx_of(entries: &[(&str, &[&str])], shared: &[(&str, u64)]) -> String {
    let mut s = String::from(".version 9.0\n.target sm_80\n.address_size 64\n\n");
    for (name, params) in entries {
        s += &format!(".visible .entry {name}(\n");
        let p: Vec<String> =
            params.iter().enumerate().map(|(i, t)| format!("\t.param {t} {name}_param_{i}")).collect();
        s += &p.join(",\n");
        s += "\n)\n{\n";
        for (kernel, bytes) in shared {
            if kernel == name {
                s += &format!("\t.shared .align 4 .b8 {name}_shared[{bytes}];\n");
            }
        }
        s += "\tret;\n}\n\n";
    }
    s
}

fn load(ptx: &str) -> Result<*mut c_void, CUresult> {
    let text = CString::new(ptx).unwrap();
    let mut module = std::ptr::null_mut();
    match unsafe { cuModuleLoadData(&mut module, text.as_ptr() as *const c_void) } {
        CUDA_SUCCESS => Ok(module),
        e => Err(e),
    }
}

fn selftest_module() -> *mut c_void {
    load(&ptx_of(SELFTEST, &[("selftest_big_shared", 13 * 1024 * 4)]))
        .expect_err("52 KB static shared is refused");
    let err = last_error().unwrap();
    assert!(err.contains("selftest_big_shared declares 53248 bytes of static shared memory"), "{err}");
    load(&ptx_of(SELFTEST, &[])).expect("the selftest module loads")
}

fn function(module: *mut c_void, name: &str) -> *mut c_void {
    let name = CString::new(name).unwrap();
    let mut f = std::ptr::null_mut();
    assert_eq!(unsafe { cuModuleGetFunction(&mut f, module, name.as_ptr()) }, CUDA_SUCCESS);
    f
}

struct Buffer {
    ptr: u64,
    len: usize,
}

impl Buffer {
    fn new(values: &[f32]) -> Buffer {
        let ptr = memory::alloc((values.len() * 4) as u64).unwrap();
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), ptr as *mut f32, values.len()) };
        Buffer { ptr, len: values.len() }
    }
    fn read(&self) -> Vec<f32> {
        unsafe { std::slice::from_raw_parts(self.ptr as *const f32, self.len) }.to_vec()
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        memory::free(self.ptr);
    }
}

fn launch(f: *mut c_void, grid: u32, block: u32, shared: u32, params: &mut [*mut c_void]) -> CUresult {
    unsafe {
        cuLaunchKernel(
            f,
            grid,
            1,
            1,
            block,
            1,
            1,
            shared,
            std::ptr::null_mut(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
}

fn arg<T>(v: &mut T) -> *mut c_void {
    v as *mut T as *mut c_void
}

#[test]
fn correct_kernels_compute_the_right_numbers() {
    let m = selftest_module();
    // A two-block reduction over 200 values with a partial last block.
    let input: Vec<f32> = (0..200).map(|i| i as f32).collect();
    let (inp, out) = (Buffer::new(&input), Buffer::new(&[f32::NAN; 2]));
    let (mut po, mut pi, mut n) = (out.ptr, inp.ptr, 200i32);
    let sum = function(m, "selftest_block_sum");
    assert_eq!(launch(sum, 2, 128, 0, &mut [arg(&mut po), arg(&mut pi), arg(&mut n)]), CUDA_SUCCESS);
    assert_eq!(out.read(), vec![(0..128).sum::<i32>() as f32, (128..200).sum::<i32>() as f32]);

    // Threads that exit early leave the barrier.
    let out = Buffer::new(&[0.0; 64]);
    let mut po = out.ptr;
    assert_eq!(
        launch(function(m, "selftest_early_exit_barrier"), 1, 64, 0, &mut [arg(&mut po)]),
        CUDA_SUCCESS
    );
    let ints: Vec<i32> = out.read().iter().map(|f| f.to_bits() as i32).collect();
    assert_eq!(&ints[..16], &(1..=16).collect::<Vec<_>>()[..]);

    // Dynamic shared memory.
    let input: Vec<f32> = (0..96).map(|i| i as f32).collect();
    let (inp, out) = (Buffer::new(&input), Buffer::new(&[0.0; 96]));
    let (mut po, mut pi) = (out.ptr, inp.ptr);
    let reverse = function(m, "selftest_reverse");
    assert_eq!(launch(reverse, 1, 96, 96 * 4, &mut [arg(&mut po), arg(&mut pi)]), CUDA_SUCCESS);
    assert_eq!(out.read(), input.iter().rev().copied().collect::<Vec<_>>());
    // …and without the bytes it needs, the launch fails and names the kernel.
    assert_eq!(launch(reverse, 1, 96, 0, &mut [arg(&mut po), arg(&mut pi)]), CUDA_ERROR_LAUNCH_FAILED);
    assert!(last_error().unwrap().contains("selftest_reverse"));

    // Shared memory nobody wrote reads as NaN.
    let out = Buffer::new(&[0.0; 32]);
    let mut po = out.ptr;
    assert_eq!(
        launch(function(m, "selftest_uninitialised_shared"), 1, 32, 0, &mut [arg(&mut po)]),
        CUDA_SUCCESS
    );
    assert!(out.read().iter().all(|x| x.is_nan()));
}

#[test]
fn broken_synchronisation_is_a_launch_error_naming_the_kernel() {
    let m = selftest_module();
    let out = Buffer::new(&[0.0; 64]);
    let mut po = out.ptr;
    for (kernel, expect) in [
        ("selftest_divergent_barrier", "divergent barrier"),
        ("selftest_shuffle_exited_lane", "exited"),
        ("selftest_deadlock", "deadlock"),
    ] {
        let code = launch(function(m, kernel), 1, 32, 0, &mut [arg(&mut po)]);
        assert_eq!(code, CUDA_ERROR_LAUNCH_FAILED, "{kernel}");
        let err = last_error().unwrap();
        assert!(err.contains(kernel) && err.contains(expect), "{kernel}: {err}");
    }
}

#[test]
fn writes_outside_an_allocation_are_caught() {
    let m = selftest_module();
    let f = function(m, "selftest_write_index");
    let out = Buffer::new(&[0.0; 100]);
    let mut po = out.ptr;
    assert_eq!(launch(f, 1, 100, 0, &mut [arg(&mut po)]), CUDA_SUCCESS);
    // One element past the end: in the rounding, found by the guard check after the launch.
    assert_eq!(launch(f, 1, 101, 0, &mut [arg(&mut po)]), CUDA_ERROR_ILLEGAL_ADDRESS);
    let err = last_error().unwrap();
    assert!(
        err.contains("selftest_write_index") && err.contains("past the end of the 400-byte allocation"),
        "{err}"
    );
    // Far past the end: the inaccessible page faults at once.
    let out = Buffer::new(&[0.0; 64]);
    let mut po = out.ptr;
    assert_eq!(launch(f, 8, 1024, 0, &mut [arg(&mut po)]), CUDA_ERROR_ILLEGAL_ADDRESS);
    let err = last_error().unwrap();
    assert!(err.contains("selftest_write_index") && err.contains("illegal access"), "{err}");
    // A pointer parameter that is not device memory.
    let mut host = 12345u64;
    assert_eq!(launch(f, 1, 1, 0, &mut [arg(&mut host)]), CUDA_ERROR_INVALID_VALUE);
    assert!(last_error().unwrap().contains("pointer parameter 0 = 0x3039 is not device memory"));
}

#[test]
fn launch_limits_use_cudas_error_codes() {
    let m = selftest_module();
    let f = function(m, "selftest_write_index");
    let out = Buffer::new(&[0.0; 4096]);
    let mut po = out.ptr;
    assert_eq!(launch(f, 1, 1025, 0, &mut [arg(&mut po)]), CUDA_ERROR_INVALID_VALUE);
    assert!(last_error().unwrap().contains("1025 threads"));
    let code = unsafe {
        cuLaunchKernel(
            f,
            1,
            65536,
            1,
            1,
            1,
            1,
            0,
            std::ptr::null_mut(),
            [arg(&mut po)].as_mut_ptr(),
            std::ptr::null_mut(),
        )
    };
    assert_eq!(code, CUDA_ERROR_INVALID_VALUE);
    // Dynamic shared memory above 48 KB needs cuFuncSetAttribute first.
    let reverse = function(m, "selftest_reverse");
    let mut pi = out.ptr;
    assert_eq!(
        launch(reverse, 1, 32, 64 * 1024, &mut [arg(&mut po), arg(&mut pi)]),
        CUDA_ERROR_INVALID_VALUE
    );
    assert!(last_error().unwrap().contains("cuFuncSetAttribute"));
    assert_eq!(unsafe { cuFuncSetAttribute(reverse, 8, 64 * 1024) }, CUDA_SUCCESS);
    assert_eq!(launch(reverse, 1, 32, 64 * 1024, &mut [arg(&mut po), arg(&mut pi)]), CUDA_SUCCESS);
}

#[test]
fn ptx_and_host_kernels_must_match() {
    // An entry without a host twin.
    let mut entries = SELFTEST.to_vec();
    entries.push(("no_such_kernel", &[".u64"]));
    assert_eq!(load(&ptx_of(&entries, &[])), Err(CUDA_ERROR_INVALID_PTX));
    assert!(last_error().unwrap().contains("PTX entry no_such_kernel has no host-compiled twin"));
    // A host kernel of the same file without a PTX entry.
    assert_eq!(load(&ptx_of(&SELFTEST[1..], &[])), Err(CUDA_ERROR_INVALID_PTX));
    assert!(
        last_error()
            .unwrap()
            .contains("defines kernel selftest_block_sum on the host, but the PTX has no such entry")
    );
    // Parameter sizes that differ from the C++ signature (an int where the kernel takes a pointer).
    let mut entries = SELFTEST.to_vec();
    entries[1] = ("selftest_early_exit_barrier", &[".u32"]);
    assert_eq!(load(&ptx_of(&entries, &[])), Err(CUDA_ERROR_INVALID_PTX));
    assert!(last_error().unwrap().contains("parameter sizes [4] but its C++ signature [8]"));
}

#[test]
fn the_memory_cap_gives_out_of_memory() {
    // SAFETY: this test binary reads the variable nowhere else concurrently that would matter: the
    // cap is read at each allocation, and the other tests allocate far less than the cap left.
    unsafe { std::env::set_var("VCUDA_MEMORY_BYTES", (1u64 << 30).to_string()) };
    let mut p = 0u64;
    assert_eq!(unsafe { cuMemAlloc_v2(&mut p, 2 << 30) }, CUDA_ERROR_OUT_OF_MEMORY);
    assert!(last_error().unwrap().contains("out of memory"));
    assert_eq!(unsafe { cuMemAlloc_v2(&mut p, 1 << 20) }, CUDA_SUCCESS);
    let (mut free, mut total) = (0usize, 0usize);
    assert_eq!(unsafe { cuMemGetInfo_v2(&mut free, &mut total) }, CUDA_SUCCESS);
    assert_eq!(total, 1 << 30);
    assert!(free <= (1 << 30) - (1 << 20));
    assert_eq!(unsafe { cuMemFree_v2(p) }, CUDA_SUCCESS);
    unsafe { std::env::remove_var("VCUDA_MEMORY_BYTES") };
}

/// Arguments as one packed buffer (`extra`, as hpo-gpu's launchers pass them): laid out at each
/// parameter's alignment, and refused when its size is not exactly the kernel's.
#[test]
fn packed_arguments_must_have_the_kernels_size() {
    let m = selftest_module();
    let sum = function(m, "selftest_block_sum");
    let input: Vec<f32> = (0..64).map(|i| i as f32).collect();
    let (inp, out) = (Buffer::new(&input), Buffer::new(&[f32::NAN]));
    let launch_packed = |buffer: &mut Vec<u8>| {
        let mut size = buffer.len();
        let mut extra: [*mut c_void; 5] = [
            std::ptr::without_provenance_mut(1),
            buffer.as_mut_ptr() as *mut c_void,
            std::ptr::without_provenance_mut(2),
            &mut size as *mut usize as *mut c_void,
            std::ptr::null_mut(),
        ];
        unsafe {
            cuLaunchKernel(
                sum,
                1,
                1,
                1,
                64,
                1,
                1,
                0,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                extra.as_mut_ptr(),
            )
        }
    };
    // (u64 out, u64 in, int n): 20 bytes.
    let mut buffer = [out.ptr.to_ne_bytes(), inp.ptr.to_ne_bytes()].concat();
    buffer.extend_from_slice(&64i32.to_ne_bytes());
    assert_eq!(launch_packed(&mut buffer.clone()), CUDA_SUCCESS);
    assert_eq!(out.read(), vec![(0..64).sum::<i32>() as f32]);
    // n passed as a u64: 24 bytes.
    let mut wide = [out.ptr.to_ne_bytes(), inp.ptr.to_ne_bytes(), 64u64.to_ne_bytes()].concat();
    assert_eq!(launch_packed(&mut wide), CUDA_ERROR_INVALID_VALUE);
    let err = last_error().unwrap();
    assert!(err.contains("selftest_block_sum: the launcher passed 24 bytes of arguments, but the kernel's parameters [8, 8, 4] take 20"), "{err}");
    // One argument too few.
    let mut short = buffer[..16].to_vec();
    assert_eq!(launch_packed(&mut short), CUDA_ERROR_INVALID_VALUE);
}

/// A process may end while a kernel runs on another thread, as a worker stopped by Ctrl-C does
/// (`std::process::exit` from its signal thread): on a GPU the driver simply goes away. The virtual
/// device's launch state must outlive exit's destructors, or the launching thread runs on freed
/// memory and the process dies of a signal instead of exiting with its code. The child (this test
/// run again with VCUDA_TEST_EXIT_DURING_LAUNCH set) holds exit up for a while after the library's
/// destructors would have run, with freed memory overwritten (MALLOC_PERTURB_), so a launch on
/// destroyed state fails every time rather than now and then.
#[test]
fn the_process_may_exit_while_a_kernel_runs() {
    const CHILD: &str = "VCUDA_TEST_EXIT_DURING_LAUNCH";
    extern "C" fn slow_exit() {
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    if std::env::var_os(CHILD).is_some() {
        // Exit handlers run last-registered first: this one runs after any the first launch
        // registers.
        assert_eq!(unsafe { libc::atexit(slow_exit) }, 0);
        let m = selftest_module() as usize;
        let (started, launching) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let sum = function(m as *mut c_void, "selftest_block_sum");
            let n = 1 << 16;
            let input = vec![1.0f32; n];
            let (inp, out) = (Buffer::new(&input), Buffer::new(&vec![0.0; n / 1024]));
            let (mut po, mut pi, mut n) = (out.ptr, inp.ptr, n as i32);
            loop {
                if launch(sum, 64, 1024, 0, &mut [arg(&mut po), arg(&mut pi), arg(&mut n)]) != CUDA_SUCCESS {
                    // At once, before exit ends the process with its code.
                    eprintln!("a launch failed during exit: {:?}", last_error());
                    std::process::abort();
                }
                let _ = started.send(());
            }
        });
        launching.recv().unwrap();
        std::process::exit(7);
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "the_process_may_exit_while_a_kernel_runs", "--nocapture"])
        .env(CHILD, "1")
        .env("MALLOC_PERTURB_", "165")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{out:?}");
}
