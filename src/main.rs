//! The `hpo-gpu` command line: parse, call the library, print. Errors become one line on stderr
//! and a non-zero exit code; nothing panics across this boundary.

use hpo_gpu::cli::{parse_args, run};

fn main() {
    let cli = parse_args(std::env::args_os().collect()).unwrap_or_else(|e| e.exit());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli)));
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            eprintln!("error: {}", format_chain(&e));
            std::process::exit(1);
        }
        Err(_) => {
            eprintln!("error: internal error (a bug in hpo-gpu; please report it with the command you ran)");
            std::process::exit(101);
        }
    }
}

/// "outer: inner: innermost" on one line. A message from a library that spans several lines
/// (a parser's snippet with a caret) is folded into that line rather than breaking the rule.
fn format_chain(e: &anyhow::Error) -> String {
    let fold =
        |msg: String| msg.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
    e.chain().map(|c| fold(c.to_string())).collect::<Vec<_>>().join(": ")
}
