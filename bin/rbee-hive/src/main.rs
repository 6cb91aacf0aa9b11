//! `rbee-hive` entry point: flags, logging, then [`rbee_hive::App`].

fn main() -> std::process::ExitCode {
    rbee_http::main_entry("rbee-hive", |config: rbee_hive::Config| async move {
        rbee_hive::App::build(config).await?.run().await
    })
}
