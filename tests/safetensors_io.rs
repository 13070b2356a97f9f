//! Tests for `.safetensors` reading and writing: round trips with exact values, every dtype the
//! crate can write, and truncated or corrupted files that must fail with a message naming the file.

use std::collections::HashMap;
use std::path::Path;

use hpo_gpu::model::safetensors_io::{
    load_safetensors, load_safetensors_bytes, read_safetensors_metadata, save_safetensors,
};
use hpo_gpu::model::tensor::DType;
use safetensors::Dtype;
use safetensors::tensor::TensorView;

fn err(bytes: &[u8]) -> String {
    match load_safetensors_bytes(bytes, "bad.safetensors") {
        Ok(t) => panic!("expected an error, loaded {} tensors", t.len()),
        Err(e) => {
            let e = e.to_string();
            assert!(e.starts_with("bad.safetensors: "), "error does not name the file: {e}");
            e
        }
    }
}

/// A small file written by the crate itself: several dtypes, names chosen so that the crate's
/// layout order (by dtype alignment, then name) differs from alphabetical.
fn mixed_file() -> Vec<u8> {
    let f32s: Vec<u8> = [1.5f32, -2.0, 0.25, 8.0, 3.0, -0.5].iter().flat_map(|v| v.to_le_bytes()).collect();
    let i64s: Vec<u8> = [7i64, -9].iter().flat_map(|v| v.to_le_bytes()).collect();
    let f16s: Vec<u8> =
        [half::f16::from_f32(0.5), half::f16::from_f32(-3.0)].iter().flat_map(|v| v.to_le_bytes()).collect();
    let bf16s: Vec<u8> = [half::bf16::from_f32(1.25)].iter().flat_map(|v| v.to_le_bytes()).collect();
    let bools = vec![1u8, 0, 1];
    let views = vec![
        ("a.weight", TensorView::new(Dtype::F32, vec![2, 3], &f32s).unwrap()),
        ("b.position_ids", TensorView::new(Dtype::I64, vec![1, 2], &i64s).unwrap()),
        ("c.half", TensorView::new(Dtype::F16, vec![2], &f16s).unwrap()),
        ("d.bf16", TensorView::new(Dtype::BF16, vec![1], &bf16s).unwrap()),
        ("e.mask", TensorView::new(Dtype::BOOL, vec![3], &bools).unwrap()),
    ];
    safetensors::serialize(views, None).unwrap()
}

#[test]
fn loads_every_dtype_in_file_order() {
    let t = load_safetensors_bytes(&mixed_file(), "mixed").unwrap();
    let names: Vec<&str> = t.iter().map(|(n, _)| n.as_str()).collect();
    // The crate lays tensors out by descending dtype (its enum order: I64 > F32 > BF16 > F16 >
    // BOOL), then by name; the loader returns them in that data order, not alphabetically.
    assert_eq!(names, ["b.position_ids", "a.weight", "d.bf16", "c.half", "e.mask"]);
    let get = |n: &str| &t.iter().find(|(k, _)| k == n).unwrap().1;
    assert_eq!(get("a.weight").dtype, DType::F32);
    assert_eq!(get("a.weight").shape, vec![2, 3]);
    assert_eq!(get("a.weight").to_f32().unwrap(), vec![1.5, -2.0, 0.25, 8.0, 3.0, -0.5]);
    assert_eq!(get("b.position_ids").dtype, DType::I64);
    assert_eq!(
        get("b.position_ids").data,
        [7i64, -9].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>()
    );
    assert_eq!(get("c.half").to_f32().unwrap(), vec![0.5, -3.0]);
    assert_eq!(get("d.bf16").to_f32().unwrap(), vec![1.25]);
    assert_eq!(get("e.mask").dtype, DType::Bool);
    assert_eq!(get("e.mask").data, vec![1, 0, 1]);
}

#[test]
fn save_then_load_round_trips_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let w: Vec<f32> = (0..12).map(|i| i as f32 * 0.1 - 0.3).collect();
    let b = vec![f32::MIN_POSITIVE, -0.0, 1e30];
    let scalar = vec![42.0f32];
    let tensors = vec![
        ("encoder.weight".to_string(), w.as_slice(), vec![3, 4]),
        ("encoder.bias".to_string(), b.as_slice(), vec![3]),
        ("scale".to_string(), scalar.as_slice(), vec![]),
    ];
    let meta = HashMap::from([("producer".to_string(), "hpo-gpu".to_string())]);
    save_safetensors(&path, &tensors, &meta).unwrap();
    let loaded = load_safetensors(&path).unwrap();
    assert_eq!(loaded.len(), 3);
    for (name, values, shape) in &tensors {
        let t = &loaded.iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!(t.dtype, DType::F32);
        assert_eq!(&t.shape, shape);
        let got = t.to_f32().unwrap();
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            values.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
    let read_meta = read_safetensors_metadata(&path).unwrap();
    assert_eq!(read_meta.get("producer").map(String::as_str), Some("hpo-gpu"));
    assert_eq!(read_meta.get("format").map(String::as_str), Some("pt"), "transformers needs format=pt");
}

#[test]
fn save_replaces_atomically_and_leaves_no_temporaries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.safetensors");
    std::fs::write(&path, b"old contents").unwrap();
    let v = vec![1.0f32, 2.0];
    save_safetensors(&path, &[("x".to_string(), v.as_slice(), vec![2])], &HashMap::new()).unwrap();
    assert_eq!(load_safetensors(&path).unwrap()[0].1.to_f32().unwrap(), vec![1.0, 2.0]);
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("out.safetensors")]);
}

#[test]
fn save_refuses_inconsistent_input() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    let v = vec![1.0f32, 2.0, 3.0];
    let e = save_safetensors(&path, &[("w".to_string(), v.as_slice(), vec![2, 2])], &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("x.safetensors: tensor 'w' has 3 values but shape [2, 2]"), "{e}");
    let e = save_safetensors(
        &path,
        &[("w".to_string(), v.as_slice(), vec![3]), ("w".to_string(), v.as_slice(), vec![3])],
        &HashMap::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("tensor 'w' appears twice"), "{e}");
    assert!(!path.exists(), "nothing is written on error");
    let missing_dir = dir.path().join("no/such/dir/x.safetensors");
    let e = save_safetensors(&missing_dir, &[("w".to_string(), v.as_slice(), vec![3])], &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot write safetensors"), "{e}");
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = mixed_file();
    for cut in 0..bytes.len() {
        let e = err(&bytes[..cut]);
        assert!(
            e.contains("truncated") || e.contains("does not match") || e.contains("header"),
            "cut {cut}: {e}"
        );
    }
    assert!(err(&bytes[..4]).contains("too short for the 8-byte header length"));
    assert!(err(&bytes[..20]).contains("truncated, or not a safetensors file"));
    assert!(err(&bytes[..bytes.len() - 1]).contains("does not match the file's"));
}

/// A file with a hand-written header and `data_len` zero bytes of data.
fn with_header(header: &str, data_len: usize) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend(std::iter::repeat_n(0u8, data_len));
    out
}

#[test]
fn corrupt_headers_are_explained() {
    assert!(err(b"").contains("too short"));
    let e = err(&with_header("{not json", 0));
    assert!(e.contains("invalid safetensors header: invalid JSON in header"), "{e}");
    let mut huge = (1u64 << 60).to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    assert!(err(&huge).contains("over the 100 MB limit"));
    // Shape and data length disagree: 2x3 F32 is 24 bytes, the offsets say 16.
    let e = err(&with_header(r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,16]}}"#, 16));
    assert!(e.contains("shape and dtype do not match"), "{e}");
    // Overlapping offsets.
    let e = err(&with_header(
        r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
        6,
    ));
    assert!(e.contains("data_offsets overlap"), "{e}");
    // A shape whose product overflows.
    let e = err(&with_header(
        r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}}"#,
        4,
    ));
    assert!(e.contains("overflows"), "{e}");
    // Extra bytes after the data.
    assert!(
        err(&with_header(r#"{"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#, 3))
            .contains("extra bytes")
    );
    // Bad UTF-8 in the header.
    assert!(err(&with_header("{\"\u{0}\"", 0)).contains("invalid safetensors header"));
    let mut bad_utf8 = 2u64.to_le_bytes().to_vec();
    bad_utf8.extend_from_slice(&[0xff, 0xfe]);
    assert!(err(&bad_utf8).contains("UTF-8"));
}

#[test]
fn unsupported_dtypes_are_named() {
    let data = [0u8; 4];
    let views = vec![("u", TensorView::new(Dtype::U16, vec![2], &data).unwrap())];
    let bytes = safetensors::serialize(views, None).unwrap();
    let e = err(&bytes);
    assert!(e.contains("tensor 'u' has dtype U16, which is not supported"), "{e}");
}

#[test]
fn missing_files_are_named() {
    let e = format!("{:#}", load_safetensors(Path::new("/nonexistent/model.safetensors")).unwrap_err());
    assert!(e.starts_with("/nonexistent/model.safetensors: cannot read"), "{e}");
}

/// The real all-MiniLM-L6-v2 checkpoint, when the shared data is present.
#[test]
fn loads_minilm_checkpoint() {
    let path =
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/all-MiniLM-L6-v2/model.safetensors"));
    if !path.exists() {
        eprintln!("skipping: {} is absent", path.display());
        return;
    }
    let t = load_safetensors(path).unwrap();
    let get = |n: &str| t.iter().find(|(k, _)| k.ends_with(n)).map(|(_, v)| v);
    let emb = get("embeddings.word_embeddings.weight").unwrap();
    assert_eq!(emb.shape, vec![30522, 384]);
    assert_eq!(emb.dtype, DType::F32);
    assert!(get("encoder.layer.5.output.LayerNorm.bias").is_some());
}
