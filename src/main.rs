//! The `klab` binary: parse, set up logging, run, map the outcome to an exit status
//! (0 ok, 1 something the user can fix, 2 klab failed).

use clap::Parser;

fn main() {
    let cli = klab::cli::Cli::parse();
    init_logging(cli.global.verbose);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(2);
        }
    };
    let result = rt.block_on(klab::commands::run(cli));
    // Give blocking backend calls no chance to outlive a failure message.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    if let Err(e) = result {
        match &e {
            klab::commands::CmdError::Invalid(d) => eprintln!("{d}"),
            other => {
                eprintln!("error: {other}");
                if let Some(h) = other.hint() {
                    eprintln!("  hint: {h}");
                }
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
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
