//! The `vxnat` binary: the node daemon and its operator tools.

use clap::{Parser, Subcommand};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use vxnat_control::config::NodeFile;
use vxnat_control::ctl::{render_stats, request, Request};

#[derive(Debug, Parser)]
#[command(name = "vxnat", version, about = "Userspace VXLAN + NAT dataplane on AF_XDP")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run this node's dataplane in the foreground (SIGTERM/SIGINT stop it and clean up).
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Talk to a running vxnat.
    Ctl {
        #[arg(long, default_value = "/run/vxnat/vxnat.sock")]
        socket: PathBuf,
        /// Print the raw JSON answer.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        op: CtlOp,
    },
    /// List every drop reason with its help line (what `vxnat ctl stats` counts).
    Drops {
        /// Machine-readable output: a JSON array of {"name", "help"}.
        #[arg(long)]
        json: bool,
        /// Show only the reason with this name.
        name: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum CtlOp {
    /// Attach the host end of a pod's veth as a pod port.
    Attach {
        #[arg(long)]
        ifname: String,
        #[arg(long)]
        ip: Ipv4Addr,
        /// The pod's MAC; learned from the veth peer when omitted.
        #[arg(long)]
        mac: Option<String>,
    },
    /// Detach a pod port.
    Detach {
        #[arg(long)]
        ifname: String,
    },
    /// List the ports.
    Ports,
    /// Per-port counters and every non-zero drop reason with its help line.
    Stats,
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Drops { json, name } => {
            vxnat_control::drops::print(&mut std::io::stdout().lock(), json, name.as_deref())
        }
        Command::Run { config } => match NodeFile::load(&config).and_then(vxnat_control::daemon::run) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("vxnat: {e}");
                1
            }
        },
        Command::Ctl { socket, json, op } => {
            let (req, stats) = match op {
                CtlOp::Attach { ifname, ip, mac } => (Request::Attach { ifname, ip, mac }, false),
                CtlOp::Detach { ifname } => (Request::Detach { ifname }, false),
                CtlOp::Ports => (Request::Ports, false),
                CtlOp::Stats => (Request::Stats, true),
            };
            match request(&socket, &req) {
                Ok(v) if stats && !json => {
                    print!("{}", render_stats(&v));
                    0
                }
                Ok(v) => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    0
                }
                Err(e) => {
                    eprintln!("vxnat ctl: {e}");
                    1
                }
            }
        }
    };
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}
