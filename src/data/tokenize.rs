//! Tokenization with the `tokenizers` crate: from `tokenizer.json`, or built as a BERT WordPiece
//! tokenizer from `vocab.txt` + `tokenizer_config.json` (lower-casing), truncating to
//! `max_length` with [CLS] … [SEP] kept, as transformers' `truncation=True` does.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::normalizers::precompiled::Precompiled;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::model::files::ModelFiles;

pub struct TextTokenizer {
    inner: Tokenizer,
    pub max_length: usize,
    /// Where it came from, for messages.
    pub origin: String,
}

impl TextTokenizer {
    /// The tokenizer of a model: `override_path` (a tokenizer.json, a WordPiece vocab.txt, or a
    /// directory holding either) if given, else the model's own files. A vocab.txt lower-cases as
    /// the `tokenizer_config.json` beside it says, else as the model's says, else (BERT uncased).
    pub fn load(files: &ModelFiles, override_path: Option<&Path>, max_length: usize) -> Result<Self> {
        if let Some(p) = override_path {
            let config_in = |dir: &Path| Some(dir.join("tokenizer_config.json")).filter(|f| f.is_file());
            if p.is_dir() {
                let dir_files = ModelFiles {
                    origin: p.display().to_string(),
                    tokenizer_json: Some(p.join("tokenizer.json")).filter(|f| f.is_file()),
                    vocab_txt: Some(p.join("vocab.txt")).filter(|f| f.is_file()),
                    tokenizer_config: config_in(p).or_else(|| files.tokenizer_config.clone()),
                    ..Default::default()
                };
                return Self::load(&dir_files, None, max_length);
            }
            let extension = p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
            return match extension.as_deref() {
                Some("json") => Self::from_tokenizer_json(p, max_length),
                Some("txt") => {
                    let beside = p.parent().and_then(config_in);
                    let lower = match beside.as_ref().or(files.tokenizer_config.as_ref()) {
                        Some(c) => read_do_lower_case(c)?,
                        None => true,
                    };
                    Self::from_vocab(p, lower, max_length)
                }
                _ if !p.exists() => bail!("--tokenizer {}: does not exist", p.display()),
                _ => bail!(
                    "--tokenizer {}: not a tokenizer file; give a tokenizer.json, a WordPiece vocab.txt, \
                     or a folder holding one",
                    p.display()
                ),
            };
        }
        if let Some(p) = &files.tokenizer_json {
            return Self::from_tokenizer_json(p, max_length);
        }
        if let Some(v) = &files.vocab_txt {
            let lower = match &files.tokenizer_config {
                Some(c) => read_do_lower_case(c)?,
                None => true,
            };
            return Self::from_vocab(v, lower, max_length);
        }
        bail!("{}: no tokenizer.json or vocab.txt (pass --tokenizer PATH)", files.origin)
    }

    pub fn from_tokenizer_json(path: &Path, max_length: usize) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        Self::from_tokenizer_json_bytes(&bytes, &path.display().to_string(), max_length)
    }

    /// Same, from the file's bytes; `origin` names the source in error messages.
    pub fn from_tokenizer_json_bytes(bytes: &[u8], origin: &str, max_length: usize) -> Result<Self> {
        // The tokenizers crate panics instead of failing on some bad files (a JSON syntax error
        // inside "decoder", an unreadable Precompiled normalizer, an inconsistent template), so
        // those are checked first.
        let json: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| anyhow!("{origin}: invalid JSON: {e}"))?;
        check_tokenizer_parts(&json).map_err(|e| anyhow!("{origin}: invalid tokenizer.json: {e}"))?;
        let inner =
            Tokenizer::from_bytes(bytes).map_err(|e| anyhow!("{origin}: invalid tokenizer.json: {e}"))?;
        Self::finish(inner, origin.to_string(), max_length)
    }

    /// BERT's WordPiece tokenizer from a vocab.txt (one token per line, id = line number).
    pub fn from_vocab(path: &Path, lowercase: bool, max_length: usize) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        Self::from_vocab_bytes(&bytes, &path.display().to_string(), lowercase, max_length)
    }

    /// Same, from the file's bytes; `origin` names the source in error messages.
    pub fn from_vocab_bytes(bytes: &[u8], origin: &str, lowercase: bool, max_length: usize) -> Result<Self> {
        let text = std::str::from_utf8(bytes).map_err(|e| anyhow!("{origin}: not UTF-8 ({e})"))?;
        // The ids are the ones WordPiece's own vocab.txt reader assigns (line number, last
        // occurrence of a repeated token wins), so the special-token ids below agree with it.
        let vocab = WordPiece::read_bytes(text.as_bytes()).map_err(|e| anyhow!("{origin}: {e}"))?;
        let id = |special: &str| {
            vocab
                .get(special)
                .copied()
                .ok_or_else(|| anyhow!("{origin}: vocabulary lacks the special token {special}"))
        };
        let (_, cls, sep) = (id("[UNK]")?, id("[CLS]")?, id("[SEP]")?);
        let wp = WordPiece::builder()
            .vocab(vocab)
            .unk_token("[UNK]".into())
            .build()
            .map_err(|e| anyhow!("{origin}: {e}"))?;
        let mut inner = Tokenizer::new(wp);
        let _ = inner.with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)));
        inner.with_pre_tokenizer(Some(BertPreTokenizer));
        inner.with_post_processor(Some(BertProcessing::new(("[SEP]".into(), sep), ("[CLS]".into(), cls))));
        inner.with_decoder(Some(WordPieceDecoder::default()));
        Self::finish(inner, origin.to_string(), max_length)
    }

    fn finish(mut inner: Tokenizer, origin: String, max_length: usize) -> Result<Self> {
        if max_length < 2 {
            bail!("--max-length must be at least 2 ([CLS] and [SEP])");
        }
        // A tokenizer.json may carry its own truncation/padding (all-MiniLM-L6-v2's pads to 128):
        // ours replaces it, and padding is never wanted since batches are packed.
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| anyhow!("{origin}: {e}"))?;
        inner.with_padding(None);
        Ok(TextTokenizer { inner, max_length, origin })
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Largest token id the tokenizer can produce, plus one.
    pub fn id_bound(&self) -> usize {
        self.inner.get_vocab(true).values().map(|v| *v as usize + 1).max().unwrap_or(0)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let e =
            self.inner.encode(text, true).map_err(|e| anyhow!("{}: cannot tokenize: {e}", self.origin))?;
        Ok(e.get_ids().to_vec())
    }

    /// Tokenizes many texts in parallel.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let enc = self
            .inner
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| anyhow!("{}: cannot tokenize: {e}", self.origin))?;
        Ok(enc.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Writes tokenizer.json without our truncation setting (a saved model should tokenize like
    /// its source tokenizer).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut t = self.inner.clone();
        t.with_truncation(None).map_err(|e| anyhow!("{e}"))?;
        t.save(path, false).map_err(|e| anyhow!("{}: cannot write tokenizer: {e}", path.display()))
    }
}

/// Checks what the tokenizers crate trusts without checking, anywhere in the file: every
/// `{"type": "Precompiled", ...}` must deserialize as one (the crate `expect`s it), and every
/// `TemplateProcessing` post-processor must be consistent (deserializing skips the builder's
/// validation, and encoding then panics on a missing special token).
fn check_tokenizer_parts(value: &serde_json::Value) -> Result<()> {
    match value {
        serde_json::Value::Object(map) => {
            if map.get("type").and_then(|t| t.as_str()) == Some("Precompiled") {
                // From text, as the crate does: Precompiled borrows its strings from the input.
                serde_json::from_str::<Precompiled>(&value.to_string())
                    .map_err(|e| anyhow!("unreadable Precompiled normalizer: {e}"))?;
            }
            // By shape, not by "type": post-processors deserialize untagged, so a template with a
            // misspelled type is still taken as one.
            if map.contains_key("single") || map.contains_key("pair") {
                check_template(map)?;
            }
            map.values().try_for_each(check_tokenizer_parts)
        }
        serde_json::Value::Array(items) => items.iter().try_for_each(check_tokenizer_parts),
        _ => Ok(()),
    }
}

fn check_template(map: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let specials = map.get("special_tokens").and_then(|s| s.as_object());
    for (name, special) in specials.into_iter().flatten() {
        let len = |field: &str| special.get(field).and_then(|v| v.as_array()).map(Vec::len);
        if len("ids") != len("tokens") {
            bail!("TemplateProcessing special token {name:?} has different numbers of ids and tokens");
        }
    }
    for template in ["single", "pair"] {
        let pieces = map.get(template).and_then(|t| t.as_array()).into_iter().flatten();
        for piece in pieces {
            if let Some(id) = piece.pointer("/SpecialToken/id").and_then(|id| id.as_str())
                && !specials.is_some_and(|s| s.contains_key(id))
            {
                bail!(
                    "TemplateProcessing {template} template uses special token {id:?}, which it does not define"
                );
            }
            if template == "single" && piece.pointer("/Sequence/id").and_then(|id| id.as_str()) == Some("B") {
                bail!("TemplateProcessing single template uses sequence B");
            }
        }
    }
    Ok(())
}

fn read_do_lower_case(path: &Path) -> Result<bool> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow!("{}: invalid JSON: {e}", path.display()))?;
    Ok(v.get("do_lower_case").and_then(|b| b.as_bool()).unwrap_or(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--tokenizer path/to/vocab.txt`: a WordPiece tokenizer, lower-casing as the
    /// tokenizer_config.json beside it says (else as BERT uncased); an unknown file type is one line.
    #[test]
    fn a_vocab_txt_given_directly_is_a_wordpiece_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        let vocab = dir.path().join("vocab.txt");
        std::fs::write(&vocab, "[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\nworld\n##s\n").unwrap();
        let none = ModelFiles::default();
        let t = TextTokenizer::load(&none, Some(&vocab), 16).unwrap();
        assert_eq!(t.encode_batch(&["Hello worlds"]).unwrap(), [vec![2, 4, 5, 6, 3]]);
        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"do_lower_case": false}"#).unwrap();
        let cased = TextTokenizer::load(&none, Some(&vocab), 16).unwrap();
        assert_eq!(cased.encode_batch(&["Hello worlds"]).unwrap(), [vec![2, 1, 5, 6, 3]]);
        let other = dir.path().join("tokenizer.model");
        std::fs::write(&other, "x").unwrap();
        let e = TextTokenizer::load(&none, Some(&other), 16).err().unwrap().to_string();
        assert!(e.ends_with("tokenizer.model: not a tokenizer file; give a tokenizer.json, a WordPiece vocab.txt, or a folder holding one"), "{e}");
    }
}
