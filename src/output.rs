//! Everything the user sees goes through [`Printer`]: human lines on stderr/stdout, JSON on stdout
//! for scripts, and one progress line per node on long work (plain lines when not on a terminal,
//! so CI logs stay readable).

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::cli::OutputFormat;

#[derive(Clone)]
pub struct Printer {
    format: OutputFormat,
    multi: Arc<MultiProgress>,
    tty: bool,
}

impl Printer {
    pub fn new(format: OutputFormat) -> Self {
        let tty = std::io::stderr().is_terminal() && format == OutputFormat::Text;
        let multi = MultiProgress::with_draw_target(if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        Self {
            format,
            multi: Arc::new(multi),
            tty,
        }
    }

    pub fn is_json(&self) -> bool {
        self.format == OutputFormat::Json
    }

    /// A result line: stdout in text mode; in JSON mode it goes to stderr so stdout stays JSON.
    pub fn line(&self, s: impl AsRef<str>) {
        let s = s.as_ref();
        if self.is_json() {
            eprintln!("{s}");
        } else if self.tty {
            let _ = self.multi.println(s);
        } else {
            stdout(&format!("{s}\n"));
        }
    }

    /// A note about progress or a warning: always stderr.
    pub fn note(&self, s: impl AsRef<str>) {
        if self.tty {
            let _ = self.multi.println(s.as_ref());
        } else {
            eprintln!("{}", s.as_ref());
        }
    }

    pub fn json<T: Serialize>(&self, value: &T) {
        match serde_json::to_string_pretty(value) {
            Ok(s) => stdout(&format!("{s}\n")),
            Err(e) => eprintln!("error: cannot encode JSON output: {e}"),
        }
    }

    /// One line for one node's progress (`cp1  booting  12s`).
    pub fn node(&self, node: &str, width: usize) -> NodeProgress {
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix} {msg} {elapsed:>4}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_prefix(format!("{node:<width$}"));
        if self.tty {
            bar.enable_steady_tick(Duration::from_millis(120));
        }
        NodeProgress {
            node: node.to_string(),
            bar,
            tty: self.tty,
            quiet: self.is_json(),
            started: Instant::now(),
        }
    }

    /// A spinner for one long task (image build, download).
    pub fn spinner(&self, msg: &str) -> NodeProgress {
        self.node(msg, 0)
    }
}

pub struct NodeProgress {
    node: String,
    bar: ProgressBar,
    tty: bool,
    quiet: bool,
    started: Instant,
}

impl NodeProgress {
    pub fn step(&self, step: &str) {
        if self.tty {
            self.bar.set_message(step.to_string());
        } else if !self.quiet {
            eprintln!(
                "[{:>5.1}s] {}: {step}",
                self.started.elapsed().as_secs_f32(),
                self.node
            );
        }
    }

    pub fn done(&self, msg: &str) {
        if self.tty {
            self.bar.finish_with_message(msg.to_string());
        } else if !self.quiet {
            eprintln!(
                "[{:>5.1}s] {}: {msg}",
                self.started.elapsed().as_secs_f32(),
                self.node
            );
        }
    }

    pub fn fail(&self, msg: &str) {
        self.done(&format!("FAILED: {msg}"));
    }
}

/// Write to stdout; a closed pipe (`klab … | head`) ends the program quietly instead of panicking.
pub fn stdout(s: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(2);
    }
}
