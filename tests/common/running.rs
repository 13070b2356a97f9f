//! A running `hpo-gpu` child to signal (tests/interrupt.rs, tests/gpu_cli.rs): default signal
//! dispositions, stderr read on its own thread, bounded waits.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The signals a search handles back to their defaults in the child, as in a terminal: the test
/// may itself run with SIGINT or SIGHUP ignored (a background job of a script, `nohup`), and the
/// search rightly keeps signals it was started with ignored.
pub fn with_default_signals(cmd: &mut Command) -> &mut Command {
    // SAFETY: signal(2) is async-signal-safe, as pre_exec requires; it only resets dispositions.
    unsafe {
        cmd.pre_exec(|| {
            for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                if libc::signal(signal, libc::SIG_DFL) == libc::SIG_ERR {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        })
    }
}

/// A running `hpo-gpu search` whose stderr is read on a thread of its own, so that its epoch lines
/// never fill the pipe (a full pipe would block the signal thread's last line, and the exit).
pub struct Running {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: String,
}

impl Running {
    pub fn start(mut cmd: Command) -> Running {
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("start hpo-gpu");
        let stderr = BufReader::new(child.stderr.take().expect("piped stderr"));
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines, stderr: String::new() }
    }

    /// Returns once `n` trials have started (then training is under way in them).
    pub fn wait_for_started(&mut self, n: usize) {
        let mut seen = 0;
        while seen < n {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("no {n} trials started within 60 s:\n{}", self.stderr));
            seen += usize::from(line.starts_with("trial ") && line.contains(" started"));
            self.stderr.push_str(&line);
            self.stderr.push('\n');
        }
        // Inside training, not on the start's storage write.
        std::thread::sleep(Duration::from_millis(300));
    }

    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).expect("a pid fits in i32");
        // SAFETY: kill(2) on our own child process, which has not been waited for yet.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    pub fn still_running(&mut self) -> bool {
        self.child.try_wait().expect("poll hpo-gpu").is_none()
    }

    /// The exit code and all of stderr; a child still running 60 s after the signal is killed
    /// and the test fails, rather than hanging on a signal that did not stop it.
    pub fn finish(mut self) -> (Option<i32>, String) {
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("poll hpo-gpu") {
                break status;
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("hpo-gpu did not exit within 60 s of the signal:\n{}", self.stderr);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader ends at the pipe's end, which the exit closed.
        for line in self.lines.iter() {
            self.stderr.push_str(&line);
            self.stderr.push('\n');
        }
        // A crash shows as exit code None: say which signal ended it.
        if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&status) {
            self.stderr.push_str(&format!("(hpo-gpu was ended by signal {signal})\n"));
        }
        (status.code(), self.stderr)
    }
}

/// Starts `cmd`, waits until `started` trials have started, sends `signal`; the exit code and
/// stderr.
pub fn stop_after_start(cmd: Command, started: usize, signal: i32) -> (Option<i32>, String) {
    let mut running = Running::start(cmd);
    running.wait_for_started(started);
    running.signal(signal);
    running.finish()
}
