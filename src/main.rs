//! The `tcplock` binary, a thin user of the library: parse the command line,
//! load the config, run the lock. Exit codes: 0 after a shutdown, 1 when
//! tcplock cannot start, 2 for a usage error. `tcplock ctl` talks to a
//! running one's control socket (0 ok, 1 error reply, 2 usage, 3 no
//! connection).

use std::process::ExitCode;

use tcplock::Builder;
use tcplock::internals::{check, cli, ctl, load, socket_activated};

fn main() -> ExitCode {
    let args = match cli::parse_env() {
        Ok(cli::Command::Run(mut args)) => {
            // The passed socket stands in for `-l`.
            if socket_activated() {
                args.allow_missing_listen();
            }
            args
        }
        Ok(cli::Command::Check(args)) => {
            return match check(&args) {
                Ok(settings) => {
                    print!("{settings}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tcplock: {e}");
                    ExitCode::from(e.exit_code())
                }
            };
        }
        Ok(cli::Command::Help) => {
            print!("{}", cli::usage());
            return ExitCode::SUCCESS;
        }
        Ok(cli::Command::Ctl(args)) => {
            return ExitCode::from(ctl::run(&args, &mut std::io::stdout().lock()));
        }
        Ok(cli::Command::CtlHelp) => {
            print!("{}", cli::CTL_USAGE);
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
    let result = load(&args)
        .map_err(tcplock::Error::from)
        .and_then(|config| {
            Builder::from_config(config)
                .handle_signals(true)
                .service_manager(true)
                .reload_from(args)
                .build()
        })
        .and_then(|lock| lock.run());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcplock: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
