//! `llm-worker-rbee` entry point: flags, logging, then [`llm_worker_rbee::build`].

fn main() -> std::process::ExitCode {
    rbee_http::main_entry(
        "llm-worker-rbee",
        |config: llm_worker_rbee::Config| async move {
            llm_worker_rbee::build(config).await?.run().await
        },
    )
}
