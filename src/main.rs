//! The `flagsmith-sse` daemon: parse the command line, load the configuration, build the
//! logger, bind, and hand over to [`flagsmith_sse::run`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flagsmith_sse::{Config, Control, Listeners, logging};
use slog::{crit, info, warn};
use tokio::net::{TcpListener, TcpSocket};

/// Real-time Flagsmith flag updates over Server-Sent Events.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file; repeat to layer several. Default:
    /// /etc/flagsmith-sse/config.toml when it exists.
    #[arg(long = "config", short = 'c', value_name = "FILE", global = true)]
    config: Vec<PathBuf>,
    /// Validate the configuration and exit: the `check-config` command, as a flag.
    #[arg(long)]
    check_config: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service (the default). Flagsmith's Helm chart starts the image with `serve`.
    Serve,
    /// Validate the configuration (files and environment) and exit.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("flagsmith-sse: configuration error: {err}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config || matches!(cli.command, Some(Command::CheckConfig)) {
        println!("configuration ok");
        return ExitCode::SUCCESS;
    }
    let (log, _flush_on_exit) = logging::build(&config.log);

    // Every subscriber is a socket: take all the file descriptors the hard limit allows.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => info!(log, "open files limit"; "soft" => limit),
        Err(err) => warn!(log, "cannot raise the open files limit"; "error" => %err),
    }

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            crit!(log, "cannot start the runtime"; "error" => %err);
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let public = bind(config.listen.0).await?;
        let publish = match config.publish_listen {
            Some(addr) => Some(bind(addr.0).await?),
            None => None,
        };
        let control = Control::from_signals(&log).map_err(flagsmith_sse::Error::Signals)?;
        flagsmith_sse::run(config, Listeners { public, publish }, control, log.clone()).await
    });
    // Connections still open after the shutdown timeout are dropped with the runtime.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            crit!(log, "fatal"; "error" => %err);
            ExitCode::FAILURE
        }
    }
}

/// Connections waiting to be accepted. std and tokio ask for 1024; a fleet of SDKs
/// reconnecting at once fills that, and each refused SYN costs its client a one-second
/// retransmission. The kernel caps it at `net.core.somaxconn` (4096 by default).
const LISTEN_BACKLOG: u32 = 4096;

async fn bind(addr: SocketAddr) -> flagsmith_sse::Result<TcpListener> {
    let bind = || {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    bind().map_err(|source| flagsmith_sse::Error::Bind { addr, source })
}
