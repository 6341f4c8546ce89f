//! Download progress reporting: a small trait so the CLI decides how (or whether) to draw it.

use indicatif::{ProgressBar, ProgressStyle};

/// Receives byte counts while an image downloads.
pub trait Progress {
    /// A transfer of `total` bytes (when the server says) starts.
    fn begin(&self, label: &str, total: Option<u64>);
    fn advance(&self, bytes: u64);
    /// The transfer ended (successfully or not).
    fn finish(&self);
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _label: &str, _total: Option<u64>) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}

/// An indicatif bar with bytes, rate and ETA.
#[derive(Debug, Clone)]
pub struct BarProgress {
    bar: ProgressBar,
}

impl Default for BarProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl BarProgress {
    /// A bar drawn on stderr.
    pub fn new() -> Self {
        Self::with_bar(ProgressBar::no_length())
    }

    /// Uses a bar the caller made (e.g. one added to a `MultiProgress`).
    pub fn with_bar(bar: ProgressBar) -> Self {
        Self { bar }
    }
}

impl Progress for BarProgress {
    fn begin(&self, label: &str, total: Option<u64>) {
        let template = if total.is_some() {
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
        } else {
            "{spinner} {msg} {bytes} {bytes_per_sec}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            self.bar.set_style(style.progress_chars("=> "));
        }
        if let Some(total) = total {
            self.bar.set_length(total);
        }
        self.bar.set_position(0);
        self.bar.set_message(label.to_string());
    }

    fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
