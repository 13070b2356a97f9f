//! Dataset sources against real IMDB data (skipped when ../shared/data is absent) and against small
//! hand-made JSON Lines / JSON / CSV / TSV / Parquet files, good and broken.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use arrow_array::builder::StringDictionaryBuilder;
use arrow_array::types::Int32Type;
use arrow_array::{
    ArrayRef, Float64Array, Int32Array, Int64Array, LargeStringArray, RecordBatch, StringArray,
    StringViewArray,
};
use arrow_schema::{Field, Schema};
use hpo_gpu::data::numpy_rng::numpy_permutation;
use hpo_gpu::data::source::{ColumnSpec, Dataset, load_split, read_file, shuffled_subset};

const SHARED_DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data");

fn shared_data() -> Option<PathBuf> {
    let dir = PathBuf::from(SHARED_DATA);
    if dir.join("imdb_train.jsonl.gz").is_file() {
        Some(dir)
    } else {
        eprintln!("SKIP: {SHARED_DATA}/imdb_train.jsonl.gz is absent");
        None
    }
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn cols() -> ColumnSpec {
    ColumnSpec::default()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, bytes)?;
    Ok(path)
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes)?;
    Ok(encoder.finish()?)
}

/// The message of an error that must happen, with its whole context chain.
fn err_of<T: std::fmt::Debug>(result: Result<T>) -> String {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(err) => format!("{err:#}"),
    }
}

fn assert_contains(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "{message:?} should contain {part:?}");
    }
}

fn texts(ds: &Dataset) -> Vec<&str> {
    ds.examples.iter().map(|e| e.text.as_str()).collect()
}

fn labels(ds: &Dataset) -> Vec<usize> {
    ds.examples.iter().map(|e| e.label).collect()
}

// ------------------------------------------------------------------------------------------------
// Real IMDB data

#[test]
fn permutation_matches_the_hf_seed42_index_file() -> Result<()> {
    let path = Path::new(SHARED_DATA).join("imdb_hf_shuffle_seed42_perm.txt");
    if !path.is_file() {
        eprintln!("SKIP: {} is absent", path.display());
        return Ok(());
    }
    let expected: Vec<usize> =
        std::fs::read_to_string(&path)?.lines().map(|l| l.trim().parse()).collect::<Result<_, _>>()?;
    assert_eq!(expected.len(), 25_000);
    assert_eq!(numpy_permutation(42, 25_000), expected);
    Ok(())
}

#[test]
fn imdb_train_loads_and_its_seed42_subset_matches_hf() -> Result<()> {
    let Some(dir) = shared_data() else { return Ok(()) };
    let start = Instant::now();
    let train =
        load_split(dir.to_str().unwrap_or_default(), "train", &cols(), Some(&names(&["neg", "pos"])))?;
    eprintln!("imdb train: {} rows read in {:?}", train.len(), start.elapsed());
    assert_eq!(train.len(), 25_000);
    assert_eq!(train.label_names, names(&["neg", "pos"]));
    assert_eq!(train.label_counts(), vec![12_500, 12_500]);
    assert!(train.origin.ends_with("imdb_train.jsonl.gz"), "{}", train.origin);
    // Published HF anchors.
    assert!(train.examples[0].text.starts_with("I rented I AM CURIOUS-YELLOW"));
    assert_eq!(train.examples[0].text.chars().count(), 1640);
    assert_eq!(train.examples[0].label, 0);
    assert!(train.examples[12_500].text.starts_with("Zentropa has much in common with The Third Man"));
    assert!(train.examples[24_999].text.starts_with("The story centers around Barry McKenzie"));
    assert_eq!(train.examples[24_999].text.chars().count(), 319);
    let utf8_bytes: usize = train.examples.iter().map(|e| e.text.len()).sum();
    assert_eq!(utf8_bytes, 33_132_823, "sum of UTF-8 text bytes (the HF card's num_bytes minus 12/row)");

    let subset = shuffled_subset(&train, 42, 2500)?;
    assert_eq!(subset.len(), 2500);
    let first = &subset.examples[0];
    assert!(
        first.text.starts_with("There is no relation at all between Fortier and Profiler"),
        "{}",
        first.text
    );
    assert_eq!((first.label, first.text.chars().count()), (1, 758));
    assert!(subset.examples[1].text.starts_with("This movie is a great. The plot is very true to the book"));
    assert_eq!(subset.examples[1].label, 1);
    assert!(subset.examples[2].text.starts_with("George P. Cosmatos' \"Rambo: First Blood Part II\""));
    assert_eq!(subset.examples[2].label, 0);
    assert_eq!(subset.label_counts(), vec![1243, 1257]);
    assert_eq!(subset.examples[0], train.examples[19_923]);
    assert!(subset.origin.contains("shuffle(seed=42) first 2500"), "{}", subset.origin);
    Ok(())
}

#[test]
fn imdb_test_split_and_default_label_names() -> Result<()> {
    let Some(dir) = shared_data() else { return Ok(()) };
    let test = load_split(dir.to_str().unwrap_or_default(), "test", &cols(), None)?;
    assert_eq!(test.len(), 25_000);
    // Integer labels with no names given: names are the ids.
    assert_eq!(test.label_names, names(&["0", "1"]));
    assert!(test.examples[0].text.starts_with("I love sci-fi"));
    let shuffled = shuffled_subset(&test, 42, 2)?;
    // The review itself opens with markup, which the README's anchor leaves out.
    assert!(
        shuffled.examples[0].text.starts_with("<br /><br />When I unsuspectedly rented A Thousand Acres")
    );
    assert_eq!(shuffled.examples[0].label, 1);
    assert!(shuffled.examples[1].text.starts_with("This is the latest entry in the long series"));
    // A file path is used whatever the split.
    let by_file = read_file(&dir.join("imdb_test.jsonl.gz"), &cols(), None)?;
    assert_eq!(by_file.examples[..3], test.examples[..3]);
    Ok(())
}

#[test]
fn subset_larger_than_the_dataset_is_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let path =
        write(tmp.path(), "tiny.jsonl", b"{\"text\":\"a\",\"label\":0}\n{\"text\":\"b\",\"label\":1}\n")?;
    let ds = read_file(&path, &cols(), None)?;
    let message = err_of(shuffled_subset(&ds, 42, 3));
    assert_contains(&message, &["tiny.jsonl", "asked for 3 examples", "only 2"]);
    // n == len is the whole permutation, n == 0 is empty.
    assert_eq!(texts(&shuffled_subset(&ds, 0, 2)?).len(), 2);
    assert!(shuffled_subset(&ds, 0, 0)?.is_empty());
    let perm = numpy_permutation(42, 2);
    assert_eq!(texts(&shuffled_subset(&ds, 42, 2)?), perm.iter().map(|&i| ["a", "b"][i]).collect::<Vec<_>>());
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// JSON Lines and JSON

#[test]
fn json_lines_variants() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // CRLF line ends, a blank line, extra fields, escapes, and a U+0085 (NEL) that is not a line break.
    let body = "{\"id\": 7, \"text\": \"good \\\"film\\\"\u{85}really\", \"label\": 1, \"meta\": {\"a\": [1,2]}}\r\n\
                \n\
                {\"label\": 0, \"text\": \"bad\\nfilm\"}\n";
    for (name, bytes) in [
        ("a.jsonl", body.as_bytes().to_vec()),
        ("a.jsonl.gz", gzip(body.as_bytes())?),
        ("a.ndjson", body.as_bytes().to_vec()),
    ] {
        let ds = read_file(&write(tmp.path(), name, &bytes)?, &cols(), Some(&names(&["neg", "pos"])))?;
        assert_eq!(texts(&ds), vec!["good \"film\"\u{85}really", "bad\nfilm"], "{name}");
        assert_eq!(labels(&ds), vec![1, 0]);
        assert_eq!(ds.label_names, names(&["neg", "pos"]));
    }
    // Custom column names and string labels mapped through the sorted distinct set.
    let path = write(tmp.path(), "b.json", b"{\"sentence\":\"x\",\"y\":\"pos\"}\n{\"sentence\":\"z\",\"y\":\"neg\"}\n{\"sentence\":\"w\",\"y\":\"pos\"}\n")?;
    let columns = ColumnSpec { text: "sentence".into(), label: Some("y".into()) };
    let ds = read_file(&path, &columns, None)?;
    assert_eq!(ds.label_names, names(&["neg", "pos"]));
    assert_eq!(labels(&ds), vec![1, 0, 1]);
    // Given names fix the order.
    let ds = read_file(&path, &columns, Some(&names(&["pos", "neg"])))?;
    assert_eq!(labels(&ds), vec![0, 1, 0]);
    // Integer labels without names: "0".."max".
    let path = write(tmp.path(), "c.jsonl", b"{\"text\":\"a\",\"label\":2}\n{\"text\":\"b\",\"label\":0}\n")?;
    assert_eq!(read_file(&path, &cols(), None)?.label_names, names(&["0", "1", "2"]));
    Ok(())
}

#[test]
fn json_array_files() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let path =
        write(tmp.path(), "d.json", b"  [{\"text\":\"a\",\"label\":1},\n {\"text\":\"b\",\"label\":0}]\n")?;
    let ds = read_file(&path, &cols(), None)?;
    assert_eq!((texts(&ds), labels(&ds)), (vec!["a", "b"], vec![1, 0]));
    let path = write(tmp.path(), "e.json", b"[{\"text\":\"a\",\"label\":1}, 5]")?;
    assert_contains(
        &err_of(read_file(&path, &cols(), None)),
        &["e.json: record 2: expected a JSON object, found a number"],
    );
    let path = write(tmp.path(), "f.json", b"[{\"text\":\"a\"}]")?;
    assert_contains(
        &err_of(read_file(&path, &cols(), None)),
        &["record 1: no label column \"label\"; the columns are [\"text\"]"],
    );
    Ok(())
}

#[test]
fn json_lines_errors_name_file_and_line() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ok = "{\"text\":\"fine\",\"label\":0}\n";
    // (file name, contents, label names, expected message parts)
    type Case<'a> = (&'a str, &'a [u8], Option<&'a [&'a str]>, &'a [&'a str]);
    let cases: &[Case] = &[
        (
            "invalid.jsonl",
            b"{\"text\":\"fine\",\"label\":0}\n{\"text\": \"x\", \"label\": 1\n",
            None,
            &["invalid.jsonl: line 2: invalid JSON"],
        ),
        ("trailing.jsonl", b"{\"text\":\"a\",\"label\":0} x\n", None, &["line 1: invalid JSON"]),
        (
            "notobj.jsonl",
            b"{\"text\":\"a\",\"label\":0}\n[1, 2]\n",
            None,
            &["line 2: invalid JSON", "expected a JSON object"],
        ),
        (
            "arrayfirst.jsonl",
            b"[1, 2]\n",
            None,
            &["arrayfirst.jsonl: record 1: expected a JSON object, found a number"],
        ),
        (
            "notext.jsonl",
            b"{\"review\":\"a\",\"label\":0,\"id\":1}\n",
            None,
            &["line 1: no text column \"text\"; the columns are [\"id\", \"label\", \"review\"]"],
        ),
        (
            "nolabel.jsonl",
            b"{\"text\":\"a\",\"stars\":3}\n",
            None,
            &["line 1: no label column \"label\"; the columns are [\"stars\", \"text\"]"],
        ),
        (
            "numtext.jsonl",
            b"{\"text\":42,\"label\":0}\n",
            None,
            &["line 1: text column \"text\" holds a number, not a string"],
        ),
        ("nulltext.jsonl", b"{\"text\":null,\"label\":0}\n", None, &["holds null, not a string"]),
        ("empty.jsonl", b"{\"text\":\"\",\"label\":0}\n", None, &["line 1: empty text"]),
        (
            "blank.jsonl",
            b"{\"text\":\"a\",\"label\":0}\n{\"text\":\" \\n\\t\",\"label\":0}\n",
            None,
            &["line 2: text is only whitespace"],
        ),
        (
            "badutf8.jsonl",
            b"{\"text\":\"a\",\"label\":0}\n{\"text\":\"caf\xe9\",\"label\":0}\n",
            None,
            &["badutf8.jsonl: line 2: invalid UTF-8 at byte 13"],
        ),
        ("negative.jsonl", b"{\"text\":\"a\",\"label\":-1}\n", None, &["line 1: negative label -1"]),
        (
            "float.jsonl",
            b"{\"text\":\"a\",\"label\":1.5}\n",
            None,
            &["line 1: label 1.5 is not an integer class id"],
        ),
        (
            "bool.jsonl",
            b"{\"text\":\"a\",\"label\":true}\n",
            None,
            &["label column \"label\" holds a boolean"],
        ),
        (
            "huge.jsonl",
            b"{\"text\":\"a\",\"label\":18446744073709551615}\n",
            None,
            &["label 18446744073709551615 is too large for a class id"],
        ),
        (
            "range.jsonl",
            b"{\"text\":\"a\",\"label\":0}\n{\"text\":\"b\",\"label\":2}\n",
            Some(&["neg", "pos"]),
            &["range.jsonl: line 2: label 2 is out of range for the 2 label names [\"neg\", \"pos\"]"],
        ),
        (
            "unknown.jsonl",
            b"{\"text\":\"a\",\"label\":\"pos\"}\n{\"text\":\"b\",\"label\":\"meh\"}\n",
            Some(&["neg", "pos"]),
            &["unknown.jsonl: line 2: label \"meh\" is not one of the label names [\"neg\", \"pos\"]"],
        ),
        (
            "mixed.jsonl",
            b"{\"text\":\"a\",\"label\":1}\n{\"text\":\"b\",\"label\":\"pos\"}\n",
            None,
            &["line 2: string label, but the label column started with integer labels (line 1)"],
        ),
        ("nothing.jsonl", b"\n\n", None, &["nothing.jsonl: the dataset has no examples"]),
        ("zero.jsonl", b"", None, &["zero.jsonl: the dataset has no examples"]),
        ("data.txt", ok.as_bytes(), None, &["data.txt: unsupported file type"]),
        ("noext", ok.as_bytes(), None, &["noext: unsupported file type"]),
    ];
    for (name, bytes, label_names, expected) in cases {
        let path = write(tmp.path(), name, bytes)?;
        let label_names = label_names.map(names);
        let message = err_of(read_file(&path, &cols(), label_names.as_deref()));
        assert_contains(&message, expected);
    }
    let message = err_of(read_file(&tmp.path().join("absent.jsonl"), &cols(), None));
    assert_contains(&message, &["absent.jsonl: cannot open"]);
    Ok(())
}

#[test]
fn bad_gzip_is_reported() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let body = "{\"text\":\"fine\",\"label\":0}\n".repeat(2000);
    let packed = gzip(body.as_bytes())?;
    let truncated = write(tmp.path(), "t.jsonl.gz", &packed[..packed.len() / 2])?;
    assert_contains(
        &err_of(read_file(&truncated, &cols(), None)),
        &["t.jsonl.gz: corrupt or truncated gzip data"],
    );
    let mut corrupt = packed.clone();
    for byte in &mut corrupt[20..60] {
        *byte ^= 0x5a;
    }
    let corrupt = write(tmp.path(), "c.jsonl.gz", &corrupt)?;
    assert_contains(
        &err_of(read_file(&corrupt, &cols(), None)),
        &["c.jsonl.gz: corrupt or truncated gzip data"],
    );
    let not_gzip = write(tmp.path(), "n.csv.gz", b"text,label\na,0\n")?;
    assert_contains(
        &err_of(read_file(&not_gzip, &cols(), None)),
        &["n.csv.gz", "corrupt or truncated gzip data"],
    );
    Ok(())
}

#[test]
fn bad_arguments_are_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let path = write(tmp.path(), "a.jsonl", b"{\"text\":\"a\",\"label\":0}\n")?;
    let same = ColumnSpec { text: "x".into(), label: Some("x".into()) };
    assert_contains(&err_of(read_file(&path, &same, None)), &["the text and label columns must differ"]);
    assert_contains(&err_of(read_file(&path, &cols(), Some(&[]))), &["the list of label names is empty"]);
    assert_contains(
        &err_of(read_file(&path, &cols(), Some(&names(&["a", "a"])))),
        &["label name \"a\" appears twice"],
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// CSV and TSV

#[test]
fn csv_and_tsv_files() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // A UTF-8 BOM, a quoted field holding a comma, quotes and a newline, and integer labels in text form.
    let csv = "\u{feff}id,text,label\n1,\"Great, \"\"really\"\"\ngreat\",1\n2,Awful,0\n";
    for (name, bytes) in [("r.csv", csv.as_bytes().to_vec()), ("r.csv.gz", gzip(csv.as_bytes())?)] {
        let ds = read_file(&write(tmp.path(), name, &bytes)?, &cols(), None)?;
        assert_eq!(texts(&ds), vec!["Great, \"really\"\ngreat", "Awful"], "{name}");
        assert_eq!(labels(&ds), vec![1, 0]);
        assert_eq!(ds.label_names, names(&["0", "1"]));
    }
    let tsv = "sentence\tlabel\nnice one\tpositive\nmeh, dull\tnegative\n";
    let columns = ColumnSpec { text: "sentence".into(), label: Some("label".into()) };
    for (name, bytes) in [("r.tsv", tsv.as_bytes().to_vec()), ("r.tsv.gz", gzip(tsv.as_bytes())?)] {
        let ds = read_file(&write(tmp.path(), name, &bytes)?, &columns, None)?;
        assert_eq!(texts(&ds), vec!["nice one", "meh, dull"]);
        assert_eq!(ds.label_names, names(&["negative", "positive"]));
        assert_eq!(labels(&ds), vec![1, 0]);
    }
    Ok(())
}

#[test]
fn csv_errors_name_file_and_line() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let cases: &[(&str, &[u8], &[&str])] = &[
        (
            "missing.csv",
            b"review,label\na,0\n",
            &["missing.csv: line 1: no text column \"text\"; the columns are [\"review\", \"label\"]"],
        ),
        // The record of line 3 starts after a two-line quoted field.
        (
            "badutf8.csv",
            b"text,label\n\"a\nb\",0\ncaf\xe9,1\n",
            &["badutf8.csv: line 4: invalid UTF-8 in the text column at byte 4"],
        ),
        (
            "ragged.csv",
            b"text,label\na,0\nb,1,extra\n",
            &["ragged.csv: line 3:", "found record with 3 fields"],
        ),
        ("neg.csv", b"text,label\na,-2\n", &["neg.csv: line 2: negative label -2"]),
        ("float.csv", b"text,label\na,0.5\n", &["line 2: label 0.5 is not an integer class id"]),
        ("emptylabel.csv", b"text,label\na,\n", &["line 2: empty label"]),
        ("emptytext.csv", b"text,label\na,0\n\"\",1\n", &["emptytext.csv: line 3: empty text"]),
        ("headeronly.csv", b"text,label\n", &["headeronly.csv: the dataset has no examples"]),
        ("empty.tsv", b"", &["empty.tsv", "no header line"]),
    ];
    for (name, bytes, expected) in cases {
        let path = write(tmp.path(), name, bytes)?;
        assert_contains(&err_of(read_file(&path, &cols(), None)), expected);
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Parquet

fn write_parquet(
    path: &Path,
    columns: Vec<(&str, ArrayRef)>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let fields: Vec<Field> =
        columns.iter().map(|(name, array)| Field::new(*name, array.data_type().clone(), true)).collect();
    let schema = Arc::new(Schema::new_with_metadata(fields, metadata));
    let batch = RecordBatch::try_new(schema.clone(), columns.into_iter().map(|(_, a)| a).collect())?;
    let mut writer = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path)?, schema, None)?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(())
}

/// IMDB-like rows: markup, quotes and a non-ASCII character as in the real reviews.
const IMDB_LIKE: [(&str, i64); 4] = [
    ("I rented I AM CURIOUS-YELLOW from my video store.<br /><br />It was \"controversial\".", 0),
    ("Zentropa has much in common with The Third Man, a Welles film — superb.", 1),
    ("Worst movie ever. 1/10", 0),
    ("A gem.", 1),
];

#[test]
fn parquet_files() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let text: ArrayRef = Arc::new(StringArray::from(IMDB_LIKE.iter().map(|r| r.0).collect::<Vec<_>>()));
    let label: ArrayRef = Arc::new(Int64Array::from(IMDB_LIKE.iter().map(|r| r.1).collect::<Vec<_>>()));
    let extra: ArrayRef = Arc::new(Int32Array::from(vec![10, 11, 12, 13]));
    let plain = tmp.path().join("imdb.parquet");
    write_parquet(
        &plain,
        vec![("text", text.clone()), ("label", label.clone()), ("id", extra)],
        HashMap::new(),
    )?;
    let ds = read_file(&plain, &cols(), None)?;
    assert_eq!(texts(&ds), IMDB_LIKE.iter().map(|r| r.0).collect::<Vec<_>>());
    assert_eq!(labels(&ds), vec![0, 1, 0, 1]);
    assert_eq!(ds.label_names, names(&["0", "1"]));
    let ds = read_file(&plain, &cols(), Some(&names(&["neg", "pos"])))?;
    assert_eq!(ds.label_names, names(&["neg", "pos"]));

    // .parquet.gz
    let gz = write(tmp.path(), "imdb.parquet.gz", &gzip(&std::fs::read(&plain)?)?)?;
    assert_eq!(read_file(&gz, &cols(), None)?.examples, read_file(&plain, &cols(), None)?.examples);

    // HF `datasets` writes ClassLabel names into the schema metadata.
    let hf_meta = r#"{"info": {"features": {"text": {"dtype": "string", "_type": "Value"}, "label": {"names": ["neg", "pos"], "_type": "ClassLabel"}}}}"#;
    let with_meta = tmp.path().join("meta.parquet");
    write_parquet(
        &with_meta,
        vec![("text", text.clone()), ("label", label.clone())],
        HashMap::from([("huggingface".to_string(), hf_meta.to_string())]),
    )?;
    let ds = read_file(&with_meta, &cols(), None)?;
    assert_eq!((ds.label_names.clone(), labels(&ds)), (names(&["neg", "pos"]), vec![0, 1, 0, 1]));

    // LargeUtf8 text with Int32 labels; Utf8View text with dictionary-encoded string labels.
    let large: ArrayRef = Arc::new(LargeStringArray::from(vec!["one", "two"]));
    let small_ints: ArrayRef = Arc::new(Int32Array::from(vec![1, 0]));
    let path = tmp.path().join("large.parquet");
    write_parquet(&path, vec![("text", large), ("label", small_ints)], HashMap::new())?;
    let ds = read_file(&path, &cols(), None)?;
    assert_eq!((texts(&ds), labels(&ds)), (vec!["one", "two"], vec![1, 0]));

    let view: ArrayRef = Arc::new(StringViewArray::from(vec!["x", "y", "z"]));
    let mut dict = StringDictionaryBuilder::<Int32Type>::new();
    for value in ["pos", "neg", "pos"] {
        dict.append_value(value);
    }
    let dict: ArrayRef = Arc::new(dict.finish());
    let path = tmp.path().join("dict.parquet");
    write_parquet(&path, vec![("sentence", view), ("sentiment", dict)], HashMap::new())?;
    let columns = ColumnSpec { text: "sentence".into(), label: Some("sentiment".into()) };
    let ds = read_file(&path, &columns, None)?;
    assert_eq!(
        (texts(&ds), ds.label_names.clone(), labels(&ds)),
        (vec!["x", "y", "z"], names(&["neg", "pos"]), vec![1, 0, 1])
    );
    Ok(())
}

#[test]
fn parquet_footer_that_stalls_the_parquet_crate_is_an_error_in_seconds() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let path = write(tmp.path(), "stall.parquet", &common::parquet_with_stalling_footer(2))?;
    let started = std::time::Instant::now();
    assert_contains(
        &err_of(read_file(&path, &cols(), None)),
        &["stall.parquet: corrupt parquet metadata: the parquet reader made no progress for 5 s"],
    );
    // The 5 s stall limit, plus slack for a loaded machine; the crate alone takes far longer.
    assert!(started.elapsed() < std::time::Duration::from_secs(15), "took {:?}", started.elapsed());
    Ok(())
}

#[test]
fn parquet_errors() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let text: ArrayRef = Arc::new(StringArray::from(vec!["a", "b", "c"]));
    let good = tmp.path().join("good.parquet");
    write_parquet(
        &good,
        vec![("text", text.clone()), ("label", Arc::new(Int64Array::from(vec![0, 1, 0])))],
        HashMap::new(),
    )?;

    let bytes = std::fs::read(&good)?;
    let truncated = write(tmp.path(), "truncated.parquet", &bytes[..bytes.len() - 10])?;
    assert_contains(
        &err_of(read_file(&truncated, &cols(), None)),
        &["truncated.parquet: not a readable parquet file"],
    );
    let cut_head = write(tmp.path(), "cut.parquet", &bytes[..bytes.len() / 2])?;
    assert_contains(
        &err_of(read_file(&cut_head, &cols(), None)),
        &["cut.parquet: not a readable parquet file"],
    );
    let garbage = write(tmp.path(), "garbage.parquet", b"PAR1 not really parquet at all PAR1")?;
    assert_contains(
        &err_of(read_file(&garbage, &cols(), None)),
        &["garbage.parquet: not a readable parquet file"],
    );

    let columns = ColumnSpec { text: "review".into(), label: Some("label".into()) };
    assert_contains(
        &err_of(read_file(&good, &columns, None)),
        &["good.parquet: no text column \"review\"; the columns are [\"text\", \"label\"]"],
    );

    let path = tmp.path().join("float.parquet");
    write_parquet(
        &path,
        vec![("text", text.clone()), ("label", Arc::new(Float64Array::from(vec![0.0, 1.0, 0.5])))],
        HashMap::new(),
    )?;
    assert_contains(
        &err_of(read_file(&path, &cols(), None)),
        &["float.parquet: label column \"label\" has type Float64; expected an integer or string type"],
    );

    let path = tmp.path().join("inttext.parquet");
    write_parquet(
        &path,
        vec![
            ("text", Arc::new(Int32Array::from(vec![1, 2, 3]))),
            ("label", Arc::new(Int64Array::from(vec![0, 1, 0]))),
        ],
        HashMap::new(),
    )?;
    assert_contains(
        &err_of(read_file(&path, &cols(), None)),
        &["inttext.parquet: text column \"text\" has type Int32; expected a string type"],
    );

    let path = tmp.path().join("nulllabel.parquet");
    write_parquet(
        &path,
        vec![("text", text.clone()), ("label", Arc::new(Int64Array::from(vec![Some(0), None, Some(1)])))],
        HashMap::new(),
    )?;
    assert_contains(
        &err_of(read_file(&path, &cols(), None)),
        &["nulllabel.parquet: row index 1: label is null"],
    );

    let path = tmp.path().join("neg.parquet");
    write_parquet(
        &path,
        vec![("text", text.clone()), ("label", Arc::new(Int64Array::from(vec![0, 1, -1])))],
        HashMap::new(),
    )?;
    assert_contains(
        &err_of(read_file(&path, &cols(), None)),
        &["neg.parquet: row index 2: negative label -1"],
    );

    let path = tmp.path().join("emptytext.parquet");
    write_parquet(
        &path,
        vec![
            ("text", Arc::new(StringArray::from(vec!["a", "  "]))),
            ("label", Arc::new(Int64Array::from(vec![0, 1]))),
        ],
        HashMap::new(),
    )?;
    assert_contains(
        &err_of(read_file(&path, &cols(), None)),
        &["emptytext.parquet: row index 1: text is only whitespace"],
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Directories

#[test]
fn local_directories_pick_the_split_file() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    write(dir, "imdb_train.jsonl.gz", &gzip(b"{\"text\":\"tr\",\"label\":1}\n")?)?;
    write(dir, "imdb_test.jsonl", b"{\"text\":\"te\",\"label\":0}\n")?;
    write(dir, "README.md", b"not data")?;
    let path = dir.to_str().unwrap_or_default();
    assert_eq!(texts(&load_split(path, "train", &cols(), None)?), vec!["tr"]);
    assert_eq!(texts(&load_split(path, "test", &cols(), None)?), vec!["te"]);
    assert_contains(
        &err_of(load_split(path, "validation", &cols(), None)),
        &["no data file for split \"validation\"", "imdb_test.jsonl", "imdb_train.jsonl.gz"],
    );
    write(dir, "train.csv", b"text,label\nx,0\n")?;
    assert_contains(
        &err_of(load_split(path, "train", &cols(), None)),
        &["several files could be split \"train\"", "train.csv"],
    );

    // HF-style shards are read in order into one dataset with one label mapping.
    let shards = tmp.path().join("shards");
    std::fs::create_dir(&shards)?;
    write(&shards, "train-00001-of-00002.jsonl", b"{\"text\":\"second\",\"label\":\"b\"}\n")?;
    write(
        &shards,
        "train-00000-of-00002.jsonl",
        b"{\"text\":\"first\",\"label\":\"c\"}\n{\"text\":\"more\",\"label\":\"a\"}\n",
    )?;
    let ds = load_split(shards.to_str().unwrap_or_default(), "train", &cols(), None)?;
    assert_eq!(texts(&ds), vec!["first", "more", "second"]);
    assert_eq!(ds.label_names, names(&["a", "b", "c"]));
    assert_eq!(labels(&ds), vec![2, 0, 1]);
    assert!(ds.origin.contains("2 shards"), "{}", ds.origin);

    // A single file is used for any split.
    let file = dir.join("imdb_test.jsonl");
    assert_eq!(texts(&load_split(file.to_str().unwrap_or_default(), "train", &cols(), None)?), vec!["te"]);
    assert_contains(
        &err_of(load_split("./no/such/dir", "train", &cols(), None)),
        &["--dataset ./no/such/dir: no such file or directory"],
    );
    assert_contains(
        &err_of(load_split("nothere.jsonl", "train", &cols(), None)),
        &["--dataset nothere.jsonl: no such file or directory"],
    );
    Ok(())
}
