//! `queen-rbee` entry point: flags, logging, then [`queen_rbee::build`].

// Every request allocates a little (headers, the body, the relayed
// batches); mimalloc's per-thread free lists cost about half of glibc's
// malloc here (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    rbee_http::main_entry("queen-rbee", |config: queen_rbee::Config| async move {
        queen_rbee::build(config).await?.run().await
    })
}
