//! The `klab` binary: parse, set up logging, run, map the outcome to an exit status
//! (0 ok, 1 something the user can fix, 2 klab failed).

use clap::Parser;
use klab::config::escape_keep_lines;
use klab::output::stderr;

fn main() {
    let cli = klab::cli::Cli::parse();
    init_logging(cli.global.verbose);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            stderr(&format!("error: cannot start the async runtime: {e}\n"));
            std::process::exit(2);
        }
    };
    let result = rt.block_on(klab::commands::run(cli));
    // Give blocking backend calls no chance to outlive a failure message.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    if let Err(e) = result {
        match &e {
            // Diagnostics escape what they quote themselves.
            klab::commands::CmdError::Invalid(d) => stderr(&format!("{d}\n")),
            other => {
                // Messages quote user values (paths, node names, libvirt's text): no control
                // character reaches the terminal raw; the message's own line breaks stay.
                let mut s = format!("error: {}\n", escape_keep_lines(&other.to_string()));
                if let Some(h) = other.hint() {
                    s.push_str(&format!("  hint: {}\n", escape_keep_lines(h)));
                }
                stderr(&s);
            }
        }
        std::process::exit(e.exit_code());
    }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "klab=info",
        2 => "klab=debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Log lines go above the progress bars; a failed write to stderr is dropped, never
    // reported with a panicking `eprintln!`.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(klab::output::log_writer)
        .with_target(false)
        .log_internal_errors(false)
        .init();
}
