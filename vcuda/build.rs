//! Compiles every `kernels/*.cu` for the host (g++ through the `cc` crate, with
//! `runtime/cuda_host.h` standing in for the CUDA built-ins) together with the fiber scheduler, and
//! a table of every `extern "C" __global__` kernel with its C++ signature (runtime/registry.h).
//!
//! The kernel folder is `../kernels`, or `$VCUDA_KERNELS` — how CI builds deliberately broken
//! copies of the kernels (scripts/vcuda-broken.sh) to show that the virtual device reports them.
use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The name scan preprocesses each kernel file with `__global__` defined as this marker.
const MARKER: &str = "VCUDA_GLOBAL_KERNEL_MARKER";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let runtime = manifest.join("runtime");
    let kernels = match env::var_os("VCUDA_KERNELS") {
        Some(dir) => PathBuf::from(dir),
        None => manifest.join("..").join("kernels"),
    };
    let kernels =
        kernels.canonicalize().unwrap_or_else(|e| panic!("kernel folder {}: {e}", kernels.display()));
    println!("cargo:rerun-if-env-changed=VCUDA_KERNELS");
    println!("cargo:rerun-if-changed={}", kernels.display());
    println!("cargo:rerun-if-changed={}", runtime.display());

    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kernels)
        .unwrap_or_else(|e| panic!("{}: {e}", kernels.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    // The virtual device's own test kernels (they break CUDA's rules on purpose).
    sources.push(runtime.join("selftest.cu"));
    for p in std::fs::read_dir(&kernels).into_iter().flatten().flatten() {
        println!("cargo:rerun-if-changed={}", p.path().display());
    }

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .pic(true)
        // Host arithmetic must round like the GPU's separate operations: no contraction into FMAs.
        .flag("-ffp-contract=off")
        .flag("-fno-strict-aliasing")
        .flag("-Wno-unknown-pragmas")
        .include(runtime.join("include"))
        .include(&runtime)
        .define("VCUDA_HOST", None);
    let compiler = build.get_compiler();

    let mut index = String::from("#include \"registry.h\"\n#include <stddef.h>\n");
    let mut tables = String::new();
    let mut total = 0usize;
    for src in &sources {
        let stem = src.file_stem().and_then(|s| s.to_str()).expect("kernel file names are UTF-8").to_string();
        let names = kernel_names(&compiler, &runtime, src);
        assert!(!names.is_empty(), "{}: no extern \"C\" __global__ kernel found", src.display());
        let mut unit = format!(
            "#include \"cuda_host.h\"\n#include {:?}\n#include \"registry.h\"\n",
            src.display().to_string()
        );
        writeln!(unit, "static const vcuda_kernel_info table[] = {{").unwrap();
        for n in &names {
            writeln!(unit, "    VCUDA_KERNEL({stem:?}, {n}),").unwrap();
        }
        writeln!(unit, "}};").unwrap();
        writeln!(
            unit,
            "extern \"C\" const vcuda_kernel_info* vcuda_kernels_{stem}(size_t* n) {{ *n = {}; return table; }}",
            names.len()
        )
        .unwrap();
        let path = out.join(format!("kernel_{stem}.cpp"));
        std::fs::write(&path, unit).expect("write a kernel unit");
        build.file(&path);
        writeln!(index, "extern \"C\" const vcuda_kernel_info* vcuda_kernels_{stem}(size_t*);").unwrap();
        writeln!(tables, "    vcuda_kernels_{stem},").unwrap();
        total += names.len();
    }
    write!(
        index,
        r#"typedef const vcuda_kernel_info* (*table_fn)(size_t*);
static const table_fn tables[] = {{
{tables}    nullptr}};
// Every host-compiled kernel, in file order.
extern "C" size_t vcuda_kernel_count(void) {{ return {total}; }}
extern "C" const vcuda_kernel_info* vcuda_kernel_at(size_t i) {{
    for (const table_fn* t = tables; *t; ++t) {{
        size_t n = 0;
        const vcuda_kernel_info* k = (*t)(&n);
        if (i < n) return &k[i];
        i -= n;
    }}
    return nullptr;
}}
"#
    )
    .unwrap();
    let index_path = out.join("kernel_index.cpp");
    std::fs::write(&index_path, index).expect("write the kernel index");
    build.file(&index_path);
    build.file(runtime.join("scheduler.cpp"));
    build.compile("vcuda_host");
}

/// The `extern "C" __global__` kernels that `src` defines, after the preprocessor (kernels made
/// by macros included).
fn kernel_names(compiler: &cc::Tool, runtime: &Path, src: &Path) -> Vec<String> {
    let mut cmd = compiler.to_command();
    cmd.args(["-E", "-P", "-x", "c++", "-std=c++17", "-DVCUDA_HOST"])
        .arg(format!("-D__global__={MARKER}"))
        .arg("-I")
        .arg(runtime.join("include"))
        .arg("-I")
        .arg(runtime)
        .arg("-include")
        .arg("cuda_host.h")
        .arg(src);
    let output = cmd.output().unwrap_or_else(|e| panic!("cannot run the preprocessor: {e}"));
    if !output.status.success() {
        panic!("{}: preprocessing failed:\n{}", src.display(), String::from_utf8_lossy(&output.stderr));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let mut names = Vec::new();
    for (at, _) in text.match_indices(MARKER) {
        let before: String = text[..at].split_whitespace().rev().take(2).collect::<Vec<_>>().join(" ");
        let rest = &text[at + MARKER.len()..];
        let mut words = rest.split(|c: char| c.is_whitespace() || c == '(').filter(|w| !w.is_empty());
        let (ret, name) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        assert!(
            before == "\"C\" extern" && ret == "void",
            "{}: a __global__ function that is not `extern \"C\" __global__ void NAME(...)` ({before} … {ret} {name}): \
             the driver finds kernels by their PTX names",
            src.display()
        );
        names.push(name.to_string());
    }
    names
}
