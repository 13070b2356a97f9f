//! Replays the committed fuzz corpora (fuzz/corpus/<target>/) and every crashing input the fuzzer
//! found (fuzz/regressions/<target>/) through the same `hpo_gpu::fuzzing` entry points that the
//! cargo-fuzz targets call, so every `cargo test` re-checks them without cargo-fuzz or nightly.
//! Also: headers that claim a 2^60-byte tensor are refused quickly, before allocating.

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hpo_gpu::fuzzing;

type Target = fn(&[u8]) -> anyhow::Result<()>;

const TARGETS: [(&str, Target); 8] = [
    ("safetensors", fuzzing::safetensors),
    ("torch_bin", fuzzing::torch_bin),
    ("config_json", fuzzing::config_json),
    ("tokenizer", fuzzing::tokenizer),
    ("dataset_jsonl", fuzzing::dataset_jsonl),
    ("dataset_csv", fuzzing::dataset_csv),
    ("dataset_parquet", fuzzing::dataset_parquet),
    ("search_space", fuzzing::search_space),
];

/// What a regression input must give now.
enum Expect {
    /// An error containing this text.
    Error(&'static str),
    /// A valid input that used to crash: it must load (and survive what the target does next).
    Loads,
}

/// Every crashing input found by fuzzing or review, with what it must give now.
const REGRESSIONS: &[(&str, &str, Expect)] = &[
    // Found by review before the first fuzz run (docs/fuzzing.md): an int range wider than i64
    // overflowed `high - low` (a panic in debug builds, a wrong `high` in release). Valid for
    // `ask --search-space`, which takes any range.
    ("search_space", "int_range_wider_than_i64.json", Expect::Loads),
    // Found by review: label names, layers and parameters were allocated for whatever the file claimed.
    (
        "config_json",
        "num_labels_1e12.json",
        Expect::Error("num_labels = 1000000000000 is more than the 65536 classes supported"),
    ),
    (
        "config_json",
        "layers_16e6.json",
        Expect::Error("num_hidden_layers = 16000000 is more than the 1024 supported"),
    ),
    (
        "config_json",
        "parameters_2_pow_48.json",
        Expect::Error("the model would have 12800016176000194 parameters (47683776 GiB as f32)"),
    ),
    // Found by the tokenizer target in its first minute: tokenizers 0.23.2 `expect`s that the
    // "decoder" value parses, so a JSON syntax error inside it panicked.
    (
        "tokenizer",
        "decoder_with_control_character",
        Expect::Error(
            "tokenizer.json: invalid JSON: control character (\\u0000-\\u001F) found while parsing a string at line 1 column 1496",
        ),
    ),
    // Found by reading the crate after that: it also `expect`s a Precompiled normalizer to parse.
    (
        "tokenizer",
        "precompiled_bad_charsmap",
        Expect::Error("unreadable Precompiled normalizer: Cannot parse precompiled_charsmap"),
    ),
    // Found by the dataset_parquet target after 13 s: a column chunk with a negative size made the
    // parquet crate panic (`byte_range`); chunks are now checked against the file first.
    (
        "dataset_parquet",
        "negative_column_chunk_offset",
        Expect::Error(
            "fuzz.parquet: corrupt parquet metadata: row group 0, column 1: the chunk at offset 57 of -1472 \
             bytes is not inside the file's 1082 bytes",
        ),
    ),
    // Found by the second tokenizer run after 3 s: a TemplateProcessing post-processor naming a
    // special token it does not define (deserializing skips the crate's validation, encoding panics).
    (
        "tokenizer",
        "template_special_token_undefined",
        Expect::Error(
            "TemplateProcessing single template uses special token \"[UNK][SEP]\", which it does not define",
        ),
    ),
    // Found by the second dataset_parquet run after 28 s: corrupt page data makes the parquet
    // crate itself panic (arrow-buffer's bit_chunk_iterator); the reader turns that into an error.
    (
        "dataset_parquet",
        "definition_levels_out_of_bounds",
        Expect::Error(
            "fuzz.parquet: corrupt parquet data after row index 0: the parquet reader failed: offset + len out of bounds",
        ),
    ),
    // Found by the third dataset_parquet run after 300 s: a 1.3 KB file on which the parquet
    // crate's page-header parser loops long enough to take 12.6 s under the fuzzer's coverage
    // instrumentation (well under a second in a normal build, ending in this error). Decoding now
    // runs on its own thread, and a batch that stalls longer than 5 s is taken for a corrupt file,
    // so a larger crafted file cannot hang a search either.
    (
        "dataset_parquet",
        "page_header_stall",
        Expect::Error(
            "fuzz.parquet: corrupt parquet data after row index 0: Parquet argument error: External: failed to fill whole buffer",
        ),
    ),
    // Found by the third tokenizer run after 13 s: the same, with the type misspelled
    // ("TemplateProcescing"); post-processors deserialize untagged, so it is still a template.
    (
        "tokenizer",
        "template_with_misspelled_type",
        Expect::Error(
            "TemplateProcessing single template uses special token \"[CLS]fals\", which it does not define",
        ),
    ),
];

fn fuzz_dir(kind: &str, target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(kind).join(target)
}

/// The files of one directory, sorted; an empty list when the directory does not exist.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> =
        entries.map(|e| e.expect("readable directory entry").path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

/// Runs one input, turning a panic into a message that names the file.
fn replay(target: &str, run: Target, path: &Path) -> Result<anyhow::Result<()>, String> {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: cannot read: {e}", path.display()));
    let started = Instant::now();
    let outcome = std::panic::catch_unwind(|| run(&data))
        .map_err(|_| format!("{target}: {} panics", path.display()))?;
    // The fuzzer runs with -timeout=10; a corpus input must stay far below that.
    let took = started.elapsed();
    if took > Duration::from_secs(5) {
        return Err(format!("{target}: {} took {took:?}", path.display()));
    }
    Ok(outcome)
}

#[test]
fn every_corpus_input_runs_without_panicking_and_some_load() {
    let mut failures = Vec::new();
    for (target, run) in TARGETS {
        let files = files_in(&fuzz_dir("corpus", target));
        assert!(files.len() >= 2, "{target}: the committed corpus has only {} inputs", files.len());
        let mut loaded = 0;
        for path in &files {
            match replay(target, run, path) {
                Ok(Ok(())) => loaded += 1,
                Ok(Err(_)) => {}
                Err(failure) => failures.push(failure),
            }
        }
        // A corpus the loader rejects whole would mean the target never reaches the code past the
        // header checks (e.g. a wrong file name making every input an "unsupported file type").
        assert!(loaded > 0, "{target}: none of the {} corpus inputs loads", files.len());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_regression_input_gives_its_error() {
    let mut listed = Vec::new();
    for (target, file, expect) in REGRESSIONS {
        let (_, run) = TARGETS.iter().find(|(t, _)| t == target).expect("a known target");
        let path = fuzz_dir("regressions", target).join(file);
        let outcome = replay(target, *run, &path).unwrap_or_else(|failure| panic!("{failure}"));
        match (outcome, expect) {
            (Ok(()), Expect::Loads) => {}
            (Err(e), Expect::Loads) => panic!("{}: should load, but: {e:#}", path.display()),
            (Ok(()), Expect::Error(_)) => panic!("{}: loads, but it should be refused", path.display()),
            (Err(e), Expect::Error(expected)) => {
                let error = format!("{e:#}");
                assert!(
                    error.contains(expected),
                    "{}: error {error:?} does not contain {expected:?}",
                    path.display()
                );
            }
        }
        listed.push(path);
    }
    // Every committed regression file must be in the table above, so none goes unchecked.
    for (target, _) in TARGETS {
        for path in files_in(&fuzz_dir("regressions", target)) {
            assert!(listed.contains(&path), "{}: not listed in REGRESSIONS", path.display());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Headers claiming a 2^60-byte tensor

const TWO_POW_60: u64 = 1 << 60;

/// Runs `run` and returns its error, checking it comes fast (no attempt to allocate or fill the
/// claimed size).
fn quick_error(run: impl FnOnce() -> anyhow::Result<()>) -> String {
    let started = Instant::now();
    let result = run();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "took {took:?} to refuse");
    match result {
        Ok(()) => panic!("a 2^60-byte tensor was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

fn safetensors_file(header: &str, data_len: usize) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend(std::iter::repeat_n(0u8, data_len));
    out
}

#[test]
fn safetensors_header_claiming_2_pow_60_bytes_is_refused() {
    let elements = TWO_POW_60 / 4;
    // Offsets that claim the 2^60 bytes, in a file holding 16.
    let header = format!(r#"{{"w":{{"dtype":"F32","shape":[{elements}],"data_offsets":[0,{TWO_POW_60}]}}}}"#);
    let file = safetensors_file(&header, 16);
    let e = quick_error(|| fuzzing::safetensors(&file));
    assert_eq!(
        e,
        format!(
            "fuzz.safetensors: the tensor data in the header does not match the file's {} bytes: \
             truncated, or extra bytes",
            file.len()
        )
    );
    // Honest offsets, but a shape of 2^58 F32 values.
    let header = format!(r#"{{"w":{{"dtype":"F32","shape":[{elements}],"data_offsets":[0,16]}}}}"#);
    let e = quick_error(|| fuzzing::safetensors(&safetensors_file(&header, 16)));
    assert_eq!(e, "fuzz.safetensors: a tensor's shape and dtype do not match the length of its data_offsets");
}

/// A protocol-2 pickle of `{"w": _rebuild_tensor_v2(storage(FloatStorage, "0", numel), 0, (n,), (1,))}`.
fn state_dict_pickle(storage_numel: u64, shape: u64) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    let mut op = |bytes: &[u8]| p.extend_from_slice(bytes);
    let str_op = |s: &str| [&[b'X'][..], &(s.len() as u32).to_le_bytes(), s.as_bytes()].concat();
    let int_op = |v: u64| [&[0x8a, 8][..], &v.to_le_bytes()].concat();
    op(b"ccollections\nOrderedDict\n)R(");
    op(&str_op("w"));
    op(b"ctorch._utils\n_rebuild_tensor_v2\n((");
    op(&str_op("storage"));
    op(b"ctorch\nFloatStorage\n");
    op(&[str_op("0"), str_op("cpu"), int_op(storage_numel)].concat());
    op(b"tQ");
    op(&int_op(0));
    op(&[&b"("[..], &int_op(shape), b"t(", &int_op(1), b"t"].concat());
    op(b"\x89ccollections\nOrderedDict\n)RtRu.");
    p
}

fn zip_checkpoint(pkl: Vec<u8>, storage: &[u8]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in [("archive/data.pkl", &pkl[..]), ("archive/data/0", storage)] {
        w.start_file(name, opts).expect("zip entry");
        w.write_all(data).expect("zip write");
    }
    w.finish().expect("zip finish").into_inner()
}

/// The legacy (pre-1.6) format: magic, protocol 1001, sys info, the state dict, the storage keys,
/// then each storage as a u64 element count and its bytes.
fn legacy_checkpoint(pkl: Vec<u8>, declared_numel: u64, storage: &[u8]) -> Vec<u8> {
    let mut out = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19\x2e\x80\x02M\xe9\x03.".to_vec();
    out.extend_from_slice(b"\x80\x02}(X\x0d\x00\x00\x00little_endian\x88u.");
    out.extend(pkl);
    out.extend_from_slice(b"\x80\x02](X\x01\x00\x00\x000e.");
    out.extend(declared_numel.to_le_bytes());
    out.extend_from_slice(storage);
    out
}

#[test]
fn torch_storage_claiming_2_pow_60_bytes_is_refused() {
    let data = [0u8; 24];
    let numel = TWO_POW_60 / 4;
    // The pickle declares a 2^60-byte storage; the zip entry holds 24 bytes.
    let e = quick_error(|| fuzzing::torch_bin(&zip_checkpoint(state_dict_pickle(numel, 6), &data)));
    assert!(
        e.contains("zip entry 'archive/data/0' holds 24 bytes, but the pickle declares storage '0' as 288230376151711744 elements (1152921504606846976 bytes)"),
        "{e}"
    );
    // Legacy: the storage's own length prefix claims 2^58 elements too.
    let e = quick_error(|| fuzzing::torch_bin(&legacy_checkpoint(state_dict_pickle(numel, 6), numel, &data)));
    assert!(
        e.starts_with("fuzz.bin: ")
            && e.contains("truncated file: storage '0' needs 1152921504606846976 bytes"),
        "{e}"
    );
    // A 24-byte storage viewed as a tensor of 2^58 elements.
    let e = quick_error(|| fuzzing::torch_bin(&zip_checkpoint(state_dict_pickle(6, numel), &data)));
    assert!(
        e.contains(
            "fuzz.bin: tensor 'w' (F32, shape [288230376151711744], stride [1], offset 0): it \
                    reaches element 288230376151711743 but its storage '0' holds only 24 bytes"
        ),
        "{e}"
    );
    // The same storage and view, honest: the helpers build a loadable checkpoint.
    fuzzing::torch_bin(&zip_checkpoint(state_dict_pickle(6, 6), &data)).expect("an honest checkpoint loads");
    fuzzing::torch_bin(&legacy_checkpoint(state_dict_pickle(6, 6), 6, &data))
        .expect("an honest legacy checkpoint loads");
}
