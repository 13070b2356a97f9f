//! Writing a trained model as a Hugging Face folder (config.json with labels, model.safetensors,
//! tokenizer files) that `AutoModelForSequenceClassification.from_pretrained` loads.
//!
//! The folder is assembled under a temporary name beside the target and renamed into place, so
//! an interrupted export never leaves half a model under the final name.

use std::path::Path;

use anyhow::{Context, Result, bail};

use super::BertModel;
use super::files::ModelFiles;
use super::safetensors_io::save_safetensors;
use crate::data::tokenize::TextTokenizer;

/// Exports `model` to `out`, replacing an earlier export there. `extra` files (name, JSON) are
/// written alongside (e.g. training_metrics.json).
pub fn export_model(
    model: &BertModel,
    tokenizer: &TextTokenizer,
    source: &ModelFiles,
    out: &Path,
    extra: &[(&str, serde_json::Value)],
) -> Result<()> {
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("model");
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("{}: cannot create", parent.display()))?;
    if out.exists() && !out.is_dir() {
        bail!("{}: exists and is not a directory", out.display());
    }
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("{}: cannot remove", tmp.display()))?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let write = || -> Result<()> {
        let config = serde_json::to_string_pretty(&model.config.to_export_json())?;
        std::fs::write(tmp.join("config.json"), config + "\n")?;
        let tensors: Vec<(String, &[f32], Vec<usize>)> =
            model.named_tensors().map(|(n, s, v)| (n.to_string(), v, s.to_vec())).collect();
        save_safetensors(&tmp.join("model.safetensors"), &tensors, &Default::default())?;
        tokenizer.save(&tmp.join("tokenizer.json"))?;
        for (src, file) in [
            (&source.vocab_txt, "vocab.txt"),
            (&source.tokenizer_config, "tokenizer_config.json"),
            (&source.special_tokens_map, "special_tokens_map.json"),
        ] {
            if let Some(src) = src {
                std::fs::copy(src, tmp.join(file))
                    .with_context(|| format!("{}: cannot copy", src.display()))?;
            }
        }
        if source.tokenizer_config.is_none() {
            let tc = serde_json::json!({
                "tokenizer_class": "BertTokenizer",
                "do_lower_case": true,
                "model_max_length": model.config.max_position_embeddings,
            });
            std::fs::write(tmp.join("tokenizer_config.json"), serde_json::to_string_pretty(&tc)? + "\n")?;
        }
        for (file, value) in extra {
            std::fs::write(tmp.join(file), serde_json::to_string_pretty(value)? + "\n")?;
        }
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("{}: export failed", out.display())));
    }
    if out.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(out, &old)
            .with_context(|| format!("{}: cannot move the old export aside", out.display()))?;
        std::fs::rename(&tmp, out).with_context(|| format!("{}: cannot rename into place", out.display()))?;
        std::fs::remove_dir_all(&old).with_context(|| format!("{}: cannot remove", old.display()))?;
    } else {
        std::fs::rename(&tmp, out).with_context(|| format!("{}: cannot rename into place", out.display()))?;
    }
    Ok(())
}
