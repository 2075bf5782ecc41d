//! Builds the root slog logger: JSON for machines, human-readable for terminals.

use std::io::IsTerminal;

use slog::{Drain, Logger, o};

use crate::config::{LogConfig, LogFormat};

/// The logger and the guard that flushes it when dropped; keep the guard until exit.
pub fn build(config: &LogConfig) -> (Logger, slog_async::AsyncGuard) {
    let terminal = match config.format {
        LogFormat::Auto => std::io::stderr().is_terminal(),
        LogFormat::Json => false,
        LogFormat::Terminal => true,
    };
    let drain: Box<dyn Drain<Ok = (), Err = slog::Never> + Send> = if terminal {
        let decorator = slog_term::TermDecorator::new().stderr().build();
        Box::new(slog_term::FullFormat::new(decorator).build().fuse())
    } else {
        Box::new(
            slog_json::Json::new(std::io::stderr())
                .add_default_keys()
                .build()
                .fuse(),
        )
    };
    // Logging must never block a request: a full buffer drops messages and reports the count.
    let (drain, guard) = slog_async::Async::new(drain)
        .chan_size(4096)
        .thread_name("log".into())
        .build_with_guard();
    // Filtered before the queue: a record below the level costs a comparison, not a copy of
    // its values for the logging thread.
    let drain = slog::LevelFilter::new(drain, config.level.into()).fuse();
    (
        Logger::root(drain, o!("version" => env!("CARGO_PKG_VERSION"))),
        guard,
    )
}
