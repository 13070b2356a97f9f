//! `hpo-gpu push DIR --repo-id OWNER/NAME`: the clap arguments and the runner (main.rs only
//! dispatches). The token is read from `HF_TOKEN` or huggingface_hub's token file, never from a
//! flag (it would end up in shell history) and never printed.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::push::{DEFAULT_ENDPOINT, PushOptions, PushReport, find_token, push_with};

/// Upload a trained model folder to the Hugging Face Hub with a generated model card.
#[derive(Args, Clone, Debug)]
pub struct PushArgs {
    /// The model folder (config.json, model.safetensors, tokenizer files, training_metrics.json).
    #[arg(default_value = "final_model")]
    pub dir: PathBuf,
    /// Repository to create or update, OWNER/NAME.
    #[arg(long)]
    pub repo_id: String,
    /// Create the repository as private (ignored when it exists).
    #[arg(long)]
    pub private: bool,
    /// List what would be uploaded (files, sizes, LFS or not) and print the model card; send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Hub URL.
    #[arg(long, default_value = DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// Branch to commit to.
    #[arg(long, default_value = "main")]
    pub revision: String,
    #[arg(long, default_value = "Upload model trained with hpo-gpu")]
    pub commit_message: String,
    /// License written in the model card.
    #[arg(long, default_value = "apache-2.0")]
    pub license: String,
}

pub fn run_push(args: &PushArgs, out: &mut dyn Write) -> Result<()> {
    let opts = PushOptions {
        dir: args.dir.clone(),
        repo_id: args.repo_id.clone(),
        endpoint: args.endpoint.clone(),
        private: args.private,
        dry_run: args.dry_run,
        revision: args.revision.clone(),
        commit_message: args.commit_message.clone(),
        license: args.license.clone(),
    };
    let token = if args.dry_run { None } else { find_token()? };
    let report = push_with(&opts, token.as_deref())?;
    print_report(&report, out)
}

fn human_size(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// Prints the file list (and in a dry run the model card).
pub fn print_report(r: &PushReport, out: &mut dyn Write) -> Result<()> {
    if r.dry_run {
        writeln!(out, "dry run: nothing sent. Would upload to {} ({} files):", r.repo_url, r.files.len())?;
    } else {
        let how = match r.created {
            Some(true) => "created",
            _ => "existing",
        };
        writeln!(out, "uploaded to {} ({how} repository, {} files):", r.repo_url, r.files.len())?;
    }
    let width = r.files.iter().map(|f| f.path.len()).max().unwrap_or(4);
    for f in &r.files {
        let mut notes = vec![if f.lfs { "LFS" } else { "regular" }.to_string()];
        if r.dry_run && f.lfs {
            notes[0] = "LFS (guessed; the Hub decides)".into();
        }
        if f.generated {
            notes.push("generated model card".into());
        }
        if f.already_uploaded {
            notes.push("already on the Hub, bytes not re-sent".into());
        }
        if f.ignored {
            notes.push("skipped: ignored by the repository's .gitignore".into());
        }
        writeln!(
            out,
            "  {:width$}  {:>10}  sha256 {}  {}",
            f.path,
            human_size(f.size),
            &f.sha256[..12],
            notes.join(", ")
        )?;
    }
    if let (Some(url), Some(oid)) = (&r.commit_url, &r.commit_oid) {
        writeln!(out, "commit {oid}: {url}")?;
    }
    if r.dry_run {
        writeln!(out, "\n--- README.md ---\n{}", r.model_card.trim_end())?;
    }
    Ok(())
}
