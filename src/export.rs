//! Writing a trained model as a Hugging Face folder (config.json with labels, model.safetensors,
//! tokenizer files) that `AutoModelForSequenceClassification.from_pretrained` loads.
//!
//! The folder is assembled under a temporary name beside the target and renamed into place, so
//! an interrupted export never leaves half a model under the final name.

use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::data::tokenize::TextTokenizer;
use crate::model::BertModel;
use crate::model::files::ModelFiles;
use crate::model::safetensors_io::save_safetensors;

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
    clean_leftovers(&parent, name, out)?;
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
    move_into_place(&tmp, out, &parent, name)
}

/// Puts the finished folder `tmp` under the name `out`. On Linux an existing export is swapped
/// with the new one in one atomic `renameat2(RENAME_EXCHANGE)`, so a crash at any moment leaves
/// one complete model under `out` (old or new). Elsewhere the old export is moved aside first;
/// a crash between the two renames is repaired by the next export (`clean_leftovers`).
fn move_into_place(tmp: &Path, out: &Path, parent: &Path, name: &str) -> Result<()> {
    if !out.exists() {
        return std::fs::rename(tmp, out)
            .with_context(|| format!("{}: cannot rename into place", out.display()));
    }
    #[cfg(target_os = "linux")]
    if exchange(tmp, out).is_ok() {
        // `tmp` now holds the previous export.
        return std::fs::remove_dir_all(tmp)
            .with_context(|| format!("{}: cannot remove the previous export", tmp.display()));
    }
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    std::fs::rename(out, &old)
        .with_context(|| format!("{}: cannot move the old export aside", out.display()))?;
    std::fs::rename(tmp, out).with_context(|| format!("{}: cannot rename into place", out.display()))?;
    std::fs::remove_dir_all(&old).with_context(|| format!("{}: cannot remove", old.display()))
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let a = CString::new(a.as_os_str().as_bytes())?;
    let b = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated paths; renameat2 reads them only during the call.
    let rc = unsafe {
        libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE)
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// What a killed export leaves beside `out`: `.NAME.tmp-PID` folders (incomplete, removed when
/// their process is gone) and, on the non-atomic path, `.NAME.old-PID` (the previous complete
/// export, put back when `out` is missing).
fn clean_leftovers(parent: &Path, name: &str, out: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(parent) else { return Ok(()) };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else { continue };
        let Some(rest) = file_name.strip_prefix(&format!(".{name}.")) else { continue };
        let (kind, pid) = match rest.split_once('-') {
            Some((kind @ ("tmp" | "old"), pid)) => match pid.parse::<u32>() {
                Ok(pid) => (kind, pid),
                Err(_) => continue,
            },
            _ => continue,
        };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let path = entry.path();
        if kind == "old" && !out.exists() {
            std::fs::rename(&path, out)
                .with_context(|| format!("{}: cannot restore the previous export", path.display()))?;
        } else {
            std::fs::remove_dir_all(&path).with_context(|| {
                format!("{}: cannot remove a leftover of a killed export", path.display())
            })?;
        }
    }
    Ok(())
}

fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        // Without /proc we cannot tell: keep the leftover.
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(path: &Path, content: &str) {
        std::fs::create_dir_all(path).unwrap();
        std::fs::write(path.join("model.safetensors"), content).unwrap();
    }

    fn content(path: &Path) -> String {
        std::fs::read_to_string(path.join("model.safetensors")).unwrap()
    }

    /// A pid that is certainly not running: a child that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn replacing_an_export_swaps_whole_folders() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("final_model");
        folder(&out, "old");
        let tmp = dir.path().join(".final_model.tmp-1");
        folder(&tmp, "new");
        move_into_place(&tmp, &out, dir.path(), "final_model").unwrap();
        assert_eq!(content(&out), "new");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["final_model"], "the previous export is removed, nothing else is left");
    }

    #[test]
    fn leftovers_of_a_killed_export_are_removed_or_restored() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m");
        let pid = dead_pid();
        let half = dir.path().join(format!(".m.tmp-{pid}"));
        folder(&half, "half");
        let previous = dir.path().join(format!(".m.old-{pid}"));
        folder(&previous, "previous");
        let alive = dir.path().join(format!(".m.tmp-{}", std::process::id()));
        folder(&alive, "mine");
        let other = dir.path().join(format!(".other.tmp-{pid}"));
        folder(&other, "not ours");
        clean_leftovers(dir.path(), "m", &out).unwrap();
        assert!(!half.exists(), "an incomplete folder of a dead export is removed");
        assert_eq!(content(&out), "previous", "the moved-aside complete export is put back");
        assert!(alive.exists(), "a live process's folder is left alone");
        assert!(other.exists(), "another model's folders are left alone");
    }

    #[test]
    fn an_old_export_is_not_restored_over_a_present_one() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m");
        folder(&out, "current");
        let previous = dir.path().join(format!(".m.old-{}", dead_pid()));
        folder(&previous, "previous");
        clean_leftovers(dir.path(), "m", &out).unwrap();
        assert_eq!(content(&out), "current");
        assert!(!previous.exists());
    }
}
