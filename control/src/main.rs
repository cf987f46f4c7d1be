//! The `vxnat` binary: the node daemon and its operator tools.
//!
//! Today: `vxnat drops`, the reference for every drop reason the packet path can report.
//! `vxnat run` and `vxnat ctl` arrive with the AF_XDP node datapath.

use clap::{Parser, Subcommand};
use std::io::Write;

#[derive(Debug, Parser)]
#[command(name = "vxnat", version, about = "Userspace VXLAN + NAT dataplane on AF_XDP")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List every drop reason with its help line (what `vxnat ctl stats` counts).
    Drops {
        /// Machine-readable output: a JSON array of {"name", "help"}.
        #[arg(long)]
        json: bool,
        /// Show only the reason with this name.
        name: Option<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Drops { json, name } => {
            vxnat_control::drops::print(&mut std::io::stdout().lock(), json, name.as_deref())
        }
    };
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}
