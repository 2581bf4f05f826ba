//! `la-cli`: VGG networks with spatial attention, from the command line.

mod commands;
mod model_args;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "la-cli",
    version,
    about = "VGG with spatial attention: inspect, train and run models",
    after_help = "Examples:\n  la-cli summary --arch vgg16 --attention softmax --size 224\n  la-cli summary --weights weights/vgg16-softmax-imagenet.safetensors --size 32"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print every layer's output shape, parameters and multiply-accumulates.
    Summary(commands::summary::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Summary(args) => commands::summary::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
