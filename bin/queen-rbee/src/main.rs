//! `queen-rbee` entry point: flags, logging, then [`queen_rbee::App`].

fn main() -> std::process::ExitCode {
    rbee_http::main_entry("queen-rbee", |config: queen_rbee::Config| async move {
        queen_rbee::App::build(config).await?.run().await
    })
}
