//! `touchledger` binary: sets up logging and maps [`touchledger_cli::run`] to the exit code.
//!
//! The global allocator is mimalloc: on a grown store (a million customers, ten million events)
//! glibc's malloc spent a third of `rebuild` and of the customer 360's time in `_int_malloc`,
//! `malloc_consolidate` and `unlink_chunk` (perf profiles in BENCHMARKS.md, issue #10).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOUCHLEDGER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let code = touchledger_cli::run(
        std::env::args_os(),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    );
    std::process::exit(code);
}
