//! The stock sluice worker binary (built-in processors only).

fn main() -> std::process::ExitCode {
    sluice_worker::run(None)
}
