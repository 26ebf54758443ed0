//! The `ocigc` binary; everything lives in the library.

fn main() -> std::process::ExitCode {
    ocigc::cli::main()
}
