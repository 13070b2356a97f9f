//! Checkpoint tensors to the model: torch `.bin` (zip and legacy) from transformers, names without
//! `bert.`, legacy LayerNorm `gamma`/`beta`, ignored pre-training heads, a created classifier,
//! and wrong shapes/dtypes.

mod common;

use hpo_gpu::config::BertConfig;
use hpo_gpu::model::BertModel;
use hpo_gpu::model::tensor::{DType, RawTensor};
use hpo_gpu::model::torch_bin::load_torch_state_dict;

fn config() -> BertConfig {
    BertConfig::from_json_str(
        r#"{"model_type": "bert", "vocab_size": 64, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 16}"#,
    )
    .unwrap()
}

fn f32_tensor(shape: &[usize], values: &[f32]) -> RawTensor {
    RawTensor { dtype: DType::F32, shape: shape.to_vec(), data: bytemuck::cast_slice(values).to_vec() }
}

#[test]
fn transformers_bin_checkpoints_load_in_both_formats() {
    let dir = common::repo().join("tests/fixtures/torch_bin");
    let zip = load_torch_state_dict(&dir.join("bert_zip.bin")).unwrap();
    let legacy = load_torch_state_dict(&dir.join("bert_legacy.bin")).unwrap();
    let (a, ra) = BertModel::from_tensors(&config(), zip, "bert_zip.bin", 0).unwrap();
    let (b, rb) = BertModel::from_tensors(&config(), legacy, "bert_legacy.bin", 0).unwrap();
    assert!(ra.initialised.is_empty() && rb.initialised.is_empty(), "{ra:?} {rb:?}");
    assert_eq!(a.params, b.params);
    // Values are the checkpoint's: compare one tensor with the JSON written beside the fixture.
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("bert.json")).unwrap()).unwrap();
    let t = &expected["tensors"][5];
    assert_eq!(t["name"], "bert.encoder.layer.0.attention.self.query.weight");
    let want: Vec<f32> = t["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let spec = a.layout.find("bert.encoder.layer.0.attention.self.query.weight").unwrap();
    assert_eq!(&a.params[spec.range.clone()], &want[..]);
}

#[test]
fn bare_names_legacy_layernorm_heads_and_missing_classifier() {
    let c = config();
    let reference = BertModel::random_init(&c, 5);
    let mut tensors = Vec::new();
    for (name, shape, values) in reference.named_tensors() {
        if name.starts_with("classifier.") {
            continue; // a pre-trained body has no classifier
        }
        let bare = name
            .strip_prefix("bert.")
            .unwrap()
            .replace("LayerNorm.weight", "LayerNorm.gamma")
            .replace("LayerNorm.bias", "LayerNorm.beta");
        tensors.push((bare, f32_tensor(shape, values)));
    }
    tensors.push(("cls.predictions.bias".into(), f32_tensor(&[64], &[0.5; 64])));
    tensors.push((
        "embeddings.position_ids".into(),
        RawTensor { dtype: DType::I64, shape: vec![1, 16], data: vec![0; 128] },
    ));
    let (m, report) = BertModel::from_tensors(&c, tensors, "body.safetensors", 11).unwrap();
    assert_eq!(report.initialised, vec!["classifier.weight", "classifier.bias"]);
    assert_eq!(report.ignored, vec!["cls.predictions.bias", "embeddings.position_ids"]);
    for spec in &m.layout.tensors {
        let (ours, theirs) = (&m.params[spec.range.clone()], &reference.params[spec.range.clone()]);
        if spec.name == "classifier.bias" {
            assert!(ours.iter().all(|v| *v == 0.0));
        } else if spec.name == "classifier.weight" {
            let std = (ours.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / ours.len() as f64).sqrt();
            assert!(std > 0.005 && std < 0.05, "N(0, 0.02) init, got std {std}");
        } else {
            assert_eq!(ours, theirs, "{}", spec.name);
        }
    }
}

#[test]
fn wrong_shapes_dtypes_and_missing_tensors_are_errors() {
    let c = config();
    let reference = BertModel::random_init(&c, 5);
    let all = || -> Vec<(String, RawTensor)> {
        reference.named_tensors().map(|(n, s, v)| (n.to_string(), f32_tensor(s, v))).collect()
    };
    let mut t = all();
    t[0].1 = f32_tensor(&[32, 8], &[0.0; 256]);
    let e = BertModel::from_tensors(&c, t, "m.safetensors", 0).unwrap_err().to_string();
    assert!(e.contains("m.safetensors") && e.contains("[32, 8]") && e.contains("[64, 8]"), "{e}");
    let mut t = all();
    t[3].1 = RawTensor { dtype: DType::I64, shape: vec![8], data: vec![0; 64] };
    let e = BertModel::from_tensors(&c, t, "m.safetensors", 0).unwrap_err().to_string();
    assert!(e.contains("bert.embeddings.LayerNorm.weight") && e.contains("floating-point"), "{e}");
    let mut t = all();
    t.retain(|(n, _)| n != "bert.encoder.layer.0.output.dense.weight");
    let e = BertModel::from_tensors(&c, t, "m.safetensors", 0).unwrap_err().to_string();
    assert!(e.contains("no tensor \"bert.encoder.layer.0.output.dense.weight\""), "{e}");
    let mut t = all();
    t[4].1 = f32_tensor(&[8], &[f32::NAN; 8]);
    let e = BertModel::from_tensors(&c, t, "m.safetensors", 0).unwrap_err().to_string();
    assert!(e.contains("non-finite"), "{e}");
}
