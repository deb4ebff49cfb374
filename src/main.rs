//! The `tcplock` binary: parse, resolve the config, run. Exit codes: 0 after a
//! shutdown, 1 when tcplock cannot start, 2 for a usage error.

use std::process::ExitCode;

use tcplock::{cli, config, shell};

fn main() -> ExitCode {
    let raw = match cli::parse_env() {
        Ok(cli::Command::Run(raw)) => raw,
        Ok(cli::Command::Help) => {
            print!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(cli::Command::Version) => {
            println!("{}", cli::VERSION);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("tcplock: {e}");
            return ExitCode::from(2);
        }
    };
    let config = match config::load(&raw) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("tcplock: {e}");
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1));
        }
    };
    match shell::run(raw, config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcplock: {e}");
            ExitCode::from(1)
        }
    }
}
