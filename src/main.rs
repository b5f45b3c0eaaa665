#![forbid(unsafe_code)]
//! The `vncd` binary; everything lives in the library.

fn main() -> std::process::ExitCode {
    vncd::cli::main()
}
