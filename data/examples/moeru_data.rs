//! Stand-alone `moeru data …` until the `moeru` binary wires the subcommands in:
//! `cargo run -p moeru-data --example moeru_data -- prepare --tokenizer T --input I --output O`

use clap::Parser;
use moeru_data::cli::{run_data_command, DataCommand};

#[derive(Parser)]
#[command(name = "moeru-data", about = "moeru data pipeline commands")]
struct Cli {
    #[command(subcommand)]
    cmd: DataCommand,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run_data_command(cli.cmd) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
