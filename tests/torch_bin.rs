//! Tests for the `pytorch_model.bin` reader: fixtures written by torch
//! (`scripts/make_torch_bin_fixtures.py`) must load with exactly the values torch saved, in both
//! container formats; crafted and damaged files must give a clear error that names the file,
//! never a panic, never code execution.

use std::io::{Cursor, Read, Write};
use std::path::PathBuf;

use hpo_gpu::model::tensor::{DType, RawTensor};
use hpo_gpu::model::torch_bin::{load_torch_state_dict, load_torch_state_dict_bytes};
use serde::Deserialize;

fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/torch_bin")).join(name)
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture_path(name)).unwrap()
}

#[derive(Deserialize)]
struct Expected {
    tensors: Vec<ExpectedTensor>,
}

#[derive(Deserialize)]
struct ExpectedTensor {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    values: Vec<f64>,
}

/// Every element as f64 (exact for all dtypes the fixtures use).
fn as_f64(t: &RawTensor) -> Vec<f64> {
    let d = &t.data;
    match t.dtype {
        DType::F64 => d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
        DType::F32 => {
            d.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap()))).collect()
        }
        DType::F16 => d.chunks_exact(2).map(|c| f64::from(half::f16::from_le_bytes([c[0], c[1]]))).collect(),
        DType::BF16 => {
            d.chunks_exact(2).map(|c| f64::from(half::bf16::from_le_bytes([c[0], c[1]]))).collect()
        }
        DType::I64 => d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        DType::I32 => {
            d.chunks_exact(4).map(|c| f64::from(i32::from_le_bytes(c.try_into().unwrap()))).collect()
        }
        DType::I16 => d.chunks_exact(2).map(|c| f64::from(i16::from_le_bytes([c[0], c[1]]))).collect(),
        DType::I8 => d.iter().map(|&b| f64::from(b as i8)).collect(),
        DType::U8 | DType::Bool => d.iter().map(|&b| f64::from(b)).collect(),
    }
}

fn check_matches(loaded: &[(String, RawTensor)], json: &str) {
    let expected: Expected = serde_json::from_slice(&fixture(json)).unwrap();
    let names: Vec<&str> = loaded.iter().map(|(n, _)| n.as_str()).collect();
    let want: Vec<&str> = expected.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, want, "names in file order");
    for ((name, t), e) in loaded.iter().zip(&expected.tensors) {
        assert_eq!(format!("{:?}", t.dtype), e.dtype, "{name}: dtype");
        assert_eq!(t.shape, e.shape, "{name}: shape");
        assert_eq!(t.data.len(), t.numel() * t.dtype.size(), "{name}: byte length");
        // serde_json may parse a shortest-repr float 1 ulp off; rounding to f32 removes that for
        // the f32/f16/bf16 values, and the fixture's f64 and integer values parse exactly.
        let want: Vec<f64> = match t.dtype {
            DType::F32 | DType::F16 | DType::BF16 => e.values.iter().map(|&v| f64::from(v as f32)).collect(),
            _ => e.values.clone(),
        };
        assert_eq!(as_f64(t), want, "{name}: values");
    }
}

#[test]
fn tiny_zip_loads_exact_values() {
    let loaded = load_torch_state_dict(&fixture_path("tiny_zip.bin")).unwrap();
    check_matches(&loaded, "tiny.json");
    // Spot checks that do not depend on the JSON: the layouts the fixture was built to exercise.
    let get = |n: &str| &loaded.iter().find(|(k, _)| k == n).unwrap().1;
    assert_eq!(as_f64(get("embeddings.position_ids")), (0..8).map(f64::from).collect::<Vec<_>>());
    assert_eq!(get("embeddings.position_ids").shape, vec![1, 8]);
    assert_eq!(get("transposed").shape, vec![5, 3]);
    let full = as_f64(get("shared.full"));
    assert_eq!(as_f64(get("shared.view")), full[3..7].to_vec());
    assert_eq!(as_f64(get("shared.window")), vec![full[1], full[2], full[3], full[6], full[7], full[8]]);
    assert_eq!(get("scalar").shape, Vec::<usize>::new());
    assert_eq!(as_f64(get("scalar")), vec![3.5]);
    assert_eq!(get("empty").shape, vec![0, 3]);
}

#[test]
fn tiny_legacy_loads_exact_values() {
    let loaded = load_torch_state_dict(&fixture_path("tiny_legacy.bin")).unwrap();
    check_matches(&loaded, "tiny.json");
}

#[test]
fn tiny_protocol_4_loads_exact_values() {
    let loaded = load_torch_state_dict(&fixture_path("tiny_zip_proto4.bin")).unwrap();
    check_matches(&loaded, "tiny.json");
}

#[test]
fn transformers_bert_state_dict_round_trips_both_formats() {
    let zip = load_torch_state_dict(&fixture_path("bert_zip.bin")).unwrap();
    check_matches(&zip, "bert.json");
    let legacy = load_torch_state_dict(&fixture_path("bert_legacy.bin")).unwrap();
    check_matches(&legacy, "bert.json");
    assert_eq!(zip, legacy);
    let get = |n: &str| &zip.iter().find(|(k, _)| k == n).unwrap().1;
    assert_eq!(get("bert.embeddings.word_embeddings.weight").shape, vec![64, 8]);
    assert_eq!(get("bert.encoder.layer.0.intermediate.dense.weight").shape, vec![16, 8]);
    assert_eq!(get("classifier.weight").shape, vec![2, 8]);
}

#[test]
fn formats_and_entry_points_agree() {
    let zip = load_torch_state_dict(&fixture_path("tiny_zip.bin")).unwrap();
    let legacy = load_torch_state_dict(&fixture_path("tiny_legacy.bin")).unwrap();
    assert_eq!(zip, legacy);
    let from_bytes = load_torch_state_dict_bytes(&fixture("tiny_legacy.bin"), "mem").unwrap();
    assert_eq!(from_bytes, legacy);
    let from_bytes = load_torch_state_dict_bytes(&fixture("tiny_zip.bin"), "mem").unwrap();
    assert_eq!(from_bytes, zip);
}

#[test]
fn unsupported_dtype_is_named() {
    let e = load_torch_state_dict(&fixture_path("uint16_zip.bin")).unwrap_err().to_string();
    assert!(
        e.contains("uint16_zip.bin: ") && e.contains("tensor dtype torch.uint16 is not supported"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Damaged files

fn err(bytes: &[u8]) -> String {
    match load_torch_state_dict_bytes(bytes, "crafted.bin") {
        Ok(t) => panic!("expected an error, loaded {} tensors", t.len()),
        Err(e) => {
            let e = e.to_string();
            assert!(e.starts_with("crafted.bin: "), "error does not name the file: {e}");
            e
        }
    }
}

#[test]
fn every_truncation_is_an_error() {
    for name in ["tiny_legacy.bin", "tiny_zip.bin"] {
        let bytes = fixture(name);
        for cut in 0..bytes.len() {
            err(&bytes[..cut]);
        }
    }
}

#[test]
fn corrupted_bytes_never_panic() {
    // Flip each byte in turn; the result may load (a changed value) or fail, but never panic.
    for name in ["tiny_legacy.bin", "tiny_zip.bin"] {
        let bytes = fixture(name);
        let mut failures = 0;
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0xff;
            failures += usize::from(load_torch_state_dict_bytes(&b, "flip").is_err());
        }
        assert!(failures > 100, "{name}: only {failures} corruptions were detected");
    }
}

#[test]
fn empty_garbage_and_missing_files() {
    assert_eq!(err(b""), "crafted.bin: the file is empty");
    let e = err(b"hello, this is not a checkpoint");
    assert!(e.contains("not a PyTorch checkpoint: it starts with bytes [68 65 6c 6c"), "{e}");
    let e = err(b"PK\x03\x04 but nothing after it");
    assert!(e.contains("not a valid zip archive"), "{e}");
    let e = err(b"\x80\x02}q\x00.");
    assert!(e.contains("a pickle but not a PyTorch checkpoint"), "{e}");
    let missing = fixture_path("does_not_exist.bin");
    let e = format!("{:#}", load_torch_state_dict(&missing).unwrap_err());
    assert!(e.contains("does_not_exist.bin: cannot open"), "{e}");
}

#[test]
fn errors_from_files_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pytorch_model.bin");
    let bytes = fixture("tiny_zip.bin");
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let e = load_torch_state_dict(&path).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}: ", path.display())), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Crafted checkpoints

/// Entries of a zip archive, in order.
fn unzip(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
    (0..archive.len())
        .map(|i| {
            let mut f = archive.by_index(i).unwrap();
            let mut data = Vec::new();
            f.read_to_end(&mut data).unwrap();
            (f.name().unwrap().to_string(), data)
        })
        .collect()
}

fn zip_of(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in entries {
        w.start_file(name.as_str(), opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// The tiny zip fixture with entries changed: `edit` returns `None` to drop an entry.
fn edited_zip(edit: impl Fn(&str, Vec<u8>) -> Option<Vec<u8>>) -> Vec<u8> {
    let entries: Vec<(String, Vec<u8>)> = unzip(&fixture("tiny_zip.bin"))
        .into_iter()
        .filter_map(|(n, d)| edit(&n, d).map(|d| (n, d)))
        .collect();
    zip_of(&entries)
}

/// A minimal protocol-2 pickle writer for crafted state dicts.
struct Pickle(Vec<u8>);

impl Pickle {
    fn new() -> Self {
        Pickle(vec![0x80, 2])
    }
    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.op(s.as_bytes())
    }
    fn int(&mut self, v: i64) -> &mut Self {
        self.0.extend_from_slice(&[0x8a, 8]);
        self.op(&v.to_le_bytes())
    }
    fn ints(&mut self, vs: &[i64]) -> &mut Self {
        self.op(b"(");
        for &v in vs {
            self.int(v);
        }
        self.op(b"t")
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(format!("c{module}\n{name}\n").as_bytes())
    }
    /// `name: _rebuild_tensor_v2(storage(class, key, numel, view), offset, shape, stride, False, OrderedDict())`
    #[allow(clippy::too_many_arguments)]
    fn tensor(
        &mut self,
        name: &str,
        class: &str,
        key: &str,
        numel: i64,
        legacy_view: Option<(&str, i64, i64)>,
        offset: i64,
        shape: &[i64],
        stride: &[i64],
    ) -> &mut Self {
        self.str(name).global("torch._utils", "_rebuild_tensor_v2").op(b"((");
        self.str("storage").global("torch", class).str(key).str("cpu").int(numel);
        if let Some((view_key, off, len)) = legacy_view {
            self.op(b"(").str(view_key).int(off).int(len).op(b"t");
        }
        self.op(b"tQ").int(offset).ints(shape).ints(stride);
        self.op(b"\x89").global("collections", "OrderedDict").op(b")R").op(b"tR")
    }
    fn state_dict(tensors: impl FnOnce(&mut Pickle)) -> Vec<u8> {
        let mut p = Pickle::new();
        p.global("collections", "OrderedDict").op(b")R(");
        tensors(&mut p);
        p.op(b"u.");
        p.0
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn zip_checkpoint(pkl: Vec<u8>, storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut entries =
        vec![("archive/data.pkl".to_string(), pkl), ("archive/byteorder".into(), b"little".to_vec())];
    for (key, data) in storages {
        entries.push((format!("archive/data/{key}"), data.clone()));
    }
    zip_of(&entries)
}

const LEGACY_HEAD: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19\x2e\x80\x02M\xe9\x03.";

fn sys_info(little_endian: bool) -> Vec<u8> {
    let mut p = Pickle::new();
    p.op(b"}(").str("protocol_version").int(1001).str("little_endian").op(if little_endian {
        b"\x88"
    } else {
        b"\x89"
    });
    p.op(b"u.");
    p.0
}

fn legacy_checkpoint(pkl: Vec<u8>, storages: &[(&str, u64, Vec<u8>)]) -> Vec<u8> {
    let mut out = LEGACY_HEAD.to_vec();
    out.extend(sys_info(true));
    out.extend(pkl);
    let mut keys = Pickle::new();
    keys.op(b"](");
    for (key, _, _) in storages {
        keys.str(key);
    }
    keys.op(b"e.");
    out.extend(keys.0);
    for (_, count, data) in storages {
        out.extend(count.to_le_bytes());
        out.extend(data);
    }
    out
}

#[test]
fn crafted_checkpoints_load() {
    // Sanity-check the crafting helpers: a valid 2x3 tensor and its transpose sharing a storage.
    let pkl = Pickle::state_dict(|p| {
        p.tensor("w", "FloatStorage", "0", 6, None, 0, &[2, 3], &[3, 1]);
        p.tensor("wt", "FloatStorage", "0", 6, None, 0, &[3, 2], &[1, 3]);
    });
    let data = f32_bytes(&[0., 1., 2., 3., 4., 5.]);
    let zip = load_torch_state_dict_bytes(&zip_checkpoint(pkl.clone(), &[("0", data.clone())]), "z").unwrap();
    let legacy = load_torch_state_dict_bytes(&legacy_checkpoint(pkl, &[("0", 6, data)]), "l").unwrap();
    assert_eq!(zip, legacy);
    assert_eq!(zip[1].1.to_f32().unwrap(), vec![0., 3., 1., 4., 2., 5.]);
}

#[test]
fn legacy_storage_views_are_honoured() {
    // Pre-1.0 torch could save a storage that is a view of a root storage: (view_key, offset, numel).
    let pkl = Pickle::state_dict(|p| {
        p.tensor("v", "FloatStorage", "root", 8, Some(("view", 2, 4)), 1, &[3], &[1]);
    });
    let data = f32_bytes(&[0., 1., 2., 3., 4., 5., 6., 7.]);
    let t = load_torch_state_dict_bytes(&legacy_checkpoint(pkl, &[("root", 8, data.clone())]), "l").unwrap();
    assert_eq!(t[0].1.to_f32().unwrap(), vec![3., 4., 5.]);
    // A view that reads past its own window (but not past the root) is refused.
    let pkl = Pickle::state_dict(|p| {
        p.tensor("v", "FloatStorage", "root", 8, Some(("view", 2, 4)), 2, &[3], &[1]);
    });
    let e = err(&legacy_checkpoint(pkl, &[("root", 8, data.clone())]));
    assert!(e.contains("tensor 'v'") && e.contains("reaches element 4"), "{e}");
    let pkl = Pickle::state_dict(|p| {
        p.tensor("v", "FloatStorage", "root", 8, Some(("view", 6, 4)), 0, &[1], &[1]);
    });
    let e = err(&legacy_checkpoint(pkl, &[("root", 8, data)]));
    assert!(e.contains("lies outside storage 'root'"), "{e}");
}

#[test]
fn rebuild_tensor_v3_with_an_untyped_storage() {
    let mut p = Pickle::new();
    p.op(b"}(").str("x").global("torch._utils", "_rebuild_tensor_v3").op(b"((");
    p.str("storage").global("torch.storage", "UntypedStorage").str("0").str("cpu").int(12).op(b"tQ");
    p.int(1).ints(&[2]).ints(&[1]).op(b"\x89").global("collections", "OrderedDict").op(b")R");
    p.global("torch", "float32").op(b"tRu.");
    let t =
        load_torch_state_dict_bytes(&zip_checkpoint(p.0, &[("0", f32_bytes(&[1., 2., 3.]))]), "z").unwrap();
    assert_eq!(t[0].1.dtype, DType::F32);
    assert_eq!(t[0].1.to_f32().unwrap(), vec![2., 3.]);
}

fn malicious_pickles() -> Vec<(Vec<u8>, &'static str)> {
    vec![
        (b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.".to_vec(), "os.system"),
        (b"\x80\x02c__builtin__\nexec\nX\x01\x00\x00\x001\x85R.".to_vec(), "__builtin__.exec"),
        (b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93X\x01\x00\x00\x001\x85R.".to_vec(), "builtins.eval"),
        // Hidden inside an otherwise valid state dict, as a tensor's rebuild function.
        (
            {
                let mut p = Pickle::new();
                p.op(b"}(").str("w").global("subprocess", "Popen").op(b"(X\x02\x00\x00\x00lstRu.");
                p.0
            },
            "subprocess.Popen",
        ),
    ]
}

#[test]
fn malicious_globals_are_refused_in_zip_checkpoints() {
    for (pkl, global) in malicious_pickles() {
        let bytes =
            edited_zip(|name, data| Some(if name.ends_with("/data.pkl") { pkl.clone() } else { data }));
        assert_eq!(
            err(&bytes),
            format!(
                "crafted.bin: refusing to load: the pickle asks for global '{global}', which is not on the \
                 allow-list of tensor types"
            )
        );
    }
}

#[test]
fn malicious_globals_are_refused_in_legacy_checkpoints() {
    for (pkl, global) in malicious_pickles() {
        let mut bytes = LEGACY_HEAD.to_vec();
        bytes.extend(sys_info(true));
        bytes.extend(&pkl);
        assert_eq!(
            err(&bytes),
            format!(
                "crafted.bin: refusing to load: the pickle asks for global '{global}', which is not on the \
                 allow-list of tensor types"
            )
        );
    }
    // Also in the storage-key pickle that follows the state dict.
    let mut bytes = LEGACY_HEAD.to_vec();
    bytes.extend(sys_info(true));
    bytes.extend(Pickle::state_dict(|_| {}));
    bytes.extend(&malicious_pickles()[0].0);
    assert!(err(&bytes).contains("global 'os.system'"));
}

#[test]
fn zip_without_data_pkl() {
    let bytes = edited_zip(|name, data| (!name.ends_with("/data.pkl")).then_some(data));
    let e = err(&bytes);
    assert!(e.contains("has no '<prefix>/data.pkl' entry") && e.contains("tiny_zip/byteorder"), "{e}");
}

#[test]
fn zip_missing_a_storage() {
    let bytes = edited_zip(|name, data| (name != "tiny_zip/data/0").then_some(data));
    assert_eq!(
        err(&bytes),
        "crafted.bin: storage '0' is missing: the archive has no entry 'tiny_zip/data/0'"
    );
}

#[test]
fn zip_storage_shorter_than_declared() {
    let bytes = edited_zip(|name, mut data| {
        if name == "tiny_zip/data/0" {
            data.truncate(data.len() - 4);
        }
        Some(data)
    });
    let e = err(&bytes);
    assert!(
        e.contains("zip entry 'tiny_zip/data/0' holds 92 bytes, but the pickle declares storage '0' as 24"),
        "{e}"
    );
}

#[test]
fn corrupted_tensor_bytes_fail_the_checksum() {
    let mut bytes = fixture("tiny_zip.bin");
    let storage = unzip(&bytes).into_iter().find(|(n, _)| n == "tiny_zip/data/0").unwrap().1;
    let at = bytes.windows(storage.len()).position(|w| w == storage.as_slice()).unwrap();
    bytes[at + 5] ^= 0x01;
    let e = err(&bytes);
    assert!(e.contains("cannot read zip entry 'tiny_zip/data/0'") && e.contains("checksum"), "{e}");
}

#[test]
fn big_endian_checkpoints_are_refused() {
    let bytes =
        edited_zip(|name, data| Some(if name.ends_with("/byteorder") { b"big".to_vec() } else { data }));
    assert!(err(&bytes).contains("refusing to load: the checkpoint was written on a big-endian machine"));
    let mut legacy = LEGACY_HEAD.to_vec();
    legacy.extend(sys_info(false));
    legacy.extend(Pickle::state_dict(|_| {}));
    assert!(err(&legacy).contains("big-endian"));
}

#[test]
fn tensors_outside_their_storage_are_refused() {
    // Shape too large for the storage.
    let pkl = Pickle::state_dict(|p| {
        p.tensor("w", "FloatStorage", "0", 6, None, 0, &[3, 3], &[3, 1]);
    });
    let data = f32_bytes(&[0.; 6]);
    let e = err(&zip_checkpoint(pkl.clone(), &[("0", data.clone())]));
    assert!(
        e.contains("tensor 'w' (F32, shape [3, 3], stride [3, 1], offset 0): it reaches element 8"),
        "{e}"
    );
    assert!(e.contains("storage '0' holds only 24 bytes (6 elements)"), "{e}");
    let e = err(&legacy_checkpoint(pkl, &[("0", 6, data.clone())]));
    assert!(e.contains("reaches element 8"), "{e}");
    // Stride walks off the end.
    let pkl = Pickle::state_dict(|p| {
        p.tensor("w", "FloatStorage", "0", 6, None, 0, &[2, 3], &[4, 1]);
    });
    assert!(err(&zip_checkpoint(pkl, &[("0", data.clone())])).contains("reaches element 6"));
    // Offset past the end.
    let pkl = Pickle::state_dict(|p| {
        p.tensor("w", "FloatStorage", "0", 6, None, 6, &[1], &[1]);
    });
    assert!(err(&zip_checkpoint(pkl, &[("0", data.clone())])).contains("reaches element 6"));
    // Negative sizes.
    let pkl = Pickle::state_dict(|p| {
        p.tensor("w", "FloatStorage", "0", 6, None, 0, &[-1], &[1]);
    });
    assert!(err(&zip_checkpoint(pkl, &[("0", data)])).contains("size is negative (-1)"));
}

#[test]
fn bogus_huge_sizes_are_refused_before_allocating() {
    let data = f32_bytes(&[0.; 6]);
    // A storage claiming 2^60 elements.
    let pkl = Pickle::state_dict(|p| {
        p.tensor("w", "FloatStorage", "0", 1 << 60, None, 0, &[6], &[1]);
    });
    let e = err(&zip_checkpoint(pkl.clone(), &[("0", data.clone())]));
    assert!(
        e.contains("holds 24 bytes, but the pickle declares storage '0' as 1152921504606846976 elements"),
        "{e}"
    );
    let e = err(&legacy_checkpoint(pkl.clone(), &[("0", 1 << 60, data.clone())]));
    assert!(e.contains("truncated file: storage '0' needs 4611686018427387904 bytes"), "{e}");
    let e = err(&legacy_checkpoint(pkl, &[("0", 6, data.clone())]));
    assert!(e.contains("holds 6 elements, but the pickle declares 1152921504606846976"), "{e}");
    // A storage whose byte size overflows u64.
    let pkl = Pickle::state_dict(|p| {
        p.tensor("w", "DoubleStorage", "0", i64::MAX, None, 0, &[1], &[1]);
    });
    assert!(err(&zip_checkpoint(pkl, &[("0", data.clone())])).contains("overflows"));
    // A shape whose element count overflows.
    let pkl = Pickle::state_dict(|p| {
        p.tensor("w", "FloatStorage", "0", 6, None, 0, &[1 << 32, 1 << 32, 1 << 32], &[0, 0, 0]);
    });
    assert!(err(&zip_checkpoint(pkl, &[("0", data.clone())])).contains("element count overflows"));
    // An expanded tensor of 2^40 elements from a 6-element storage.
    let pkl = Pickle::state_dict(|p| {
        p.tensor("w", "FloatStorage", "0", 6, None, 0, &[1 << 20, 1 << 20], &[0, 0]);
    });
    assert!(err(&zip_checkpoint(pkl, &[("0", data.clone())])).contains("overlapping elements"));
    // Many views of one storage adding up to far more than the file holds.
    let pkl = Pickle::state_dict(|p| {
        for i in 0..40 {
            p.tensor(&format!("w{i}"), "FloatStorage", "0", 1 << 20, None, 0, &[1 << 20], &[1]);
        }
    });
    let big = vec![0u8; 4 << 20];
    let e = err(&zip_checkpoint(pkl, &[("0", big)]));
    assert!(e.contains("more than 4x the storage"), "{e}");
    // A pickle string longer than the file.
    let e = err(&zip_checkpoint(b"\x80\x02X\xff\xff\xff\x7f".to_vec(), &[]));
    assert!(e.contains("archive/data.pkl: byte 2: BINUNICODE") && e.contains("truncated pickle"), "{e}");
}

#[test]
fn non_state_dicts_are_refused() {
    let e = err(&zip_checkpoint(b"\x80\x02]q\x00.".to_vec(), &[]));
    assert!(e.contains("the checkpoint holds a list, not a state dict"), "{e}");
    let mut p = Pickle::new();
    p.op(b"}(").str("step").int(3).op(b"u.");
    let e = err(&zip_checkpoint(p.0, &[]));
    assert!(e.contains("state dict entry 'step' is an int, not a tensor"), "{e}");
    let e = err(&zip_checkpoint(b"\x80\x02}q\x00.extra".to_vec(), &[]));
    assert!(e.contains("5 bytes of trailing data"), "{e}");
    let e = err(&zip_checkpoint(b"\x80\x02N\x97.".to_vec(), &[]));
    assert!(e.contains("archive/data.pkl: byte 3: unsupported pickle opcode NEXT_BUFFER (0x97)"), "{e}");
}
