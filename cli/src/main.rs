//! `wary`: the mesh on this machine.
//!
//! * `wary up [DIR]` ([`up`]): the control plane, a proxy per workload, the apps the
//!   workloads name, and a live view ([`view`]); Ctrl-C stops it all.
//! * `wary inject FILE` ([`inject`]): add the sidecar to a manifest's pods offline.
//! * `wary demo-app`, `wary demo-load` ([`demo`]): the quickstart's apps (hidden).

#![forbid(unsafe_code)]

mod demo;
mod inject;
mod up;
mod view;

use clap::{Parser, Subcommand};

/// Wary, a service mesh: run a whole mesh on this machine.
#[derive(Parser, Debug)]
#[command(name = "wary", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a whole mesh from a directory of YAML: the control plane, one proxy per
    /// Workload, the apps Workloads name in `command`, and a live view. Ctrl-C stops
    /// everything it started.
    Up(up::UpArgs),
    /// Add the sidecar to every pod of a Kubernetes manifest (what the admission
    /// webhook does), and print the result.
    Inject(inject::InjectArgs),
    /// A demo app (the quickstart's frontend and backends).
    #[command(hide = true)]
    DemoApp(demo::AppArgs),
    /// A demo traffic generator.
    #[command(hide = true)]
    DemoLoad(demo::LoadArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Up(args) => up::run(args).await,
        Command::Inject(args) => inject::run(args),
        Command::DemoApp(args) => demo::app(args).await,
        Command::DemoLoad(args) => demo::load(args).await,
    }
}
