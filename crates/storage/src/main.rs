//! `correu-storage`: the storage service on its own (one container image each).

#[global_allocator]
static ALLOCATOR: correu_runtime::Allocator = correu_runtime::Allocator;

fn main() -> std::process::ExitCode {
    correu_runtime::cli::run_service(
        "correu-storage",
        correu_runtime::config::Role::Storage,
        correu_storage::standalone,
    )
}
