//! `rbee-hive` entry point: flags, logging, then [`rbee_hive::build`].

fn main() -> std::process::ExitCode {
    rbee_http::main_entry("rbee-hive", |config: rbee_hive::Config| async move {
        rbee_hive::build(config).await?.run().await
    })
}
