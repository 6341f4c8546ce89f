//! Everything the user sees goes through [`Printer`]: results on stdout, progress and notes on
//! stderr — always, also when stderr is a terminal — JSON on stdout for scripts, and one progress
//! line per node on long work (plain lines when stderr is not a terminal, so CI logs stay readable).
//!
//! Writing to stderr never fails the program: a closed or full stderr (`2>&-`, `2>/dev/full`, a
//! reader that went away) loses the message, not the exit status.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::cli::OutputFormat;

/// The bars on the terminal, once a [`Printer`] draws them: log lines ([`log_writer`]) are written
/// above them instead of through them.
static BARS: OnceLock<Arc<MultiProgress>> = OnceLock::new();

#[derive(Clone)]
pub struct Printer {
    format: OutputFormat,
    multi: Arc<MultiProgress>,
    /// Progress bars are drawn (stderr is a terminal and the output is text).
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
        let multi = Arc::new(multi);
        if tty {
            // One printer per run; a second one (tests) keeps the first one's bars.
            let _ = BARS.set(multi.clone());
        }
        Self { format, multi, tty }
    }

    pub fn is_json(&self) -> bool {
        self.format == OutputFormat::Json
    }

    /// A result line: stdout in text mode (in JSON mode stderr, so stdout stays one JSON document).
    /// The bars are cleared while it is written and drawn again below it, so a terminal that
    /// shows both streams gets the line above the bars and a redirected stdout gets it whole.
    pub fn line(&self, s: impl AsRef<str>) {
        let s = s.as_ref();
        if self.is_json() {
            stderr(&format!("{s}\n"));
        } else if self.tty {
            self.multi.suspend(|| stdout(&format!("{s}\n")));
        } else {
            stdout(&format!("{s}\n"));
        }
    }

    /// A note about progress or a warning: always stderr (above the bars when they are drawn).
    pub fn note(&self, s: impl AsRef<str>) {
        let s = s.as_ref();
        if self.tty {
            self.multi.suspend(|| stderr(&format!("{s}\n")));
        } else {
            stderr(&format!("{s}\n"));
        }
    }

    pub fn json<T: Serialize>(&self, value: &T) {
        match serde_json::to_string_pretty(value) {
            Ok(s) => stdout(&format!("{s}\n")),
            Err(e) => stderr(&format!("error: cannot encode JSON output: {e}\n")),
        }
    }

    /// One line for one node's progress (`cp1  booting  12s`).
    pub fn node(&self, node: &str, width: usize) -> NodeProgress {
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix} {msg} {elapsed:>4}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        let prefix = format!("{node:<width$}");
        bar.set_prefix(prefix.clone());
        if self.tty {
            bar.enable_steady_tick(Duration::from_millis(120));
        }
        NodeProgress {
            node: node.to_string(),
            prefix,
            bar,
            multi: self.multi.clone(),
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
    /// The node name padded like the other bars' prefixes.
    prefix: String,
    bar: ProgressBar,
    multi: Arc<MultiProgress>,
    tty: bool,
    quiet: bool,
    started: Instant,
}

impl NodeProgress {
    pub fn step(&self, step: &str) {
        if self.tty {
            self.bar.set_message(step.to_string());
        } else if !self.quiet {
            self.plain(step);
        }
    }

    /// A detail shown on the terminal's bar only (plain logs get [`NodeProgress::step`] lines).
    pub fn detail(&self, msg: &str) {
        if self.tty {
            self.bar.set_message(msg.to_string());
        }
    }

    /// The last word on this node. On a terminal the bar becomes a plain line above the bars still
    /// running, so finished nodes and the result lines after them read in the order they happened.
    pub fn done(&self, msg: &str) {
        if self.tty {
            self.bar.finish_and_clear();
            self.multi.remove(&self.bar);
            let line = format!(
                "  {} {msg} {}s\n",
                self.prefix,
                self.started.elapsed().as_secs()
            );
            self.multi.suspend(|| stderr(&line));
        } else if !self.quiet {
            self.plain(msg);
        }
    }

    pub fn fail(&self, msg: &str) {
        self.done(&format!("FAILED: {msg}"));
    }

    fn plain(&self, msg: &str) {
        stderr(&format!(
            "[{:>5.1}s] {}: {msg}\n",
            self.started.elapsed().as_secs_f32(),
            self.node
        ));
    }
}

/// Writer for `tracing`: stderr, above the progress bars when they are drawn, errors ignored.
pub fn log_writer() -> LogWriter {
    LogWriter
}

pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let write = || {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(buf).and_then(|()| err.flush());
        };
        match BARS.get() {
            Some(bars) => bars.suspend(write),
            None => write(),
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Write to stdout; a closed pipe (`klab … | head`) ends the program quietly instead of panicking.
pub fn stdout(s: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        stderr(&format!("error: cannot write to stdout: {e}\n"));
        std::process::exit(2);
    }
}

/// Write to stderr and ignore failure: there is nowhere left to report it, and a lost note must
/// not turn into a panic (exit 101) or a different exit status.
pub fn stderr(s: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(s.as_bytes()).and_then(|()| err.flush());
}
