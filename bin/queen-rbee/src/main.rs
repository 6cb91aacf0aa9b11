//! `queen-rbee` entry point: flags, logging, then [`queen_rbee::build`].

fn main() -> std::process::ExitCode {
    rbee_http::main_entry("queen-rbee", |config: queen_rbee::Config| async move {
        queen_rbee::build(config).await?.run().await
    })
}
