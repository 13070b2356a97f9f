#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Errors are the expected answer to bad input; only panics, hangs and OOMs are findings.
    let _ = hpo_gpu::fuzzing::search_space(data);
});
