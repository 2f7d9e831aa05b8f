//! `correu-ingress`: the ingress service on its own (one container image each).

#[global_allocator]
static ALLOCATOR: correu_runtime::Allocator = correu_runtime::Allocator;

fn main() -> std::process::ExitCode {
    correu_runtime::cli::run_service(
        "correu-ingress",
        correu_runtime::config::Role::Ingress,
        correu_ingress::standalone,
    )
}
