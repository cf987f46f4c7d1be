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
    /// Run this node's dataplane in the foreground. SIGTERM/SIGINT stop it and leave the
    /// datapath and the flows in place for the next `vxnat run` (a restart loses no flow).
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Remove what a stopped vxnat left in place (XDP programs, host port, nftables table,
    /// socket, flow file): for an uninstall. Refused while vxnat runs.
    Cleanup {
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
    /// The flow table (original and reply tuples, NAT, TCP state, time left, packets, bytes)
    /// and the SNAT tuples held after close.
    Flows {
        /// tcpdump-style: host, net, port, proto, src/dst, and/or/not.
        #[arg(long, default_value = "")]
        filter: String,
    },
    /// Follow matching packets through the pipeline: each step and the verdict.
    Trace {
        #[arg(long, default_value = "")]
        filter: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Write matching frames to a pcap file (tshark, Wireshark).
    Capture {
        /// PORT[:rx|:tx] (interface name, uplink, host or number), pre-encap, post-decap;
        /// repeatable.
        #[arg(long, required = true)]
        at: Vec<String>,
        #[arg(long, default_value = "")]
        filter: String,
        #[arg(long, default_value_t = 10)]
        count: usize,
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        /// The pcap file to write.
        #[arg(short = 'w', long = "write")]
        write: PathBuf,
    },
    /// Test-only: inject a fault (builds with the feature `fault-injection` only).
    #[cfg(feature = "fault-injection")]
    #[command(hide = true)]
    Fault {
        what: vxnat_control::fault::Fault,
        /// How long, for worker-stall and worker-wait.
        #[arg(long, default_value_t = 0)]
        ms: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum View {
    Json,
    Stats,
    Flows,
    Trace,
    Capture,
}

/// Writes the captured frames of a `capture` answer as a pcap file; returns how many.
fn write_capture(v: &serde_json::Value, path: Option<&std::path::Path>) -> Result<usize, String> {
    let path = path.ok_or("-w: no file given")?;
    let mut packets = Vec::new();
    for p in v["packets"].as_array().into_iter().flatten() {
        let data = vxnat_control::observe::unhex(p["data"].as_str().unwrap_or(""))?;
        packets.push((p["wall_ns"].as_u64().unwrap_or(0), data));
    }
    std::fs::write(path, vxnat_control::observe::pcap(&packets)).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(packets.len())
}

/// Logs of `vxnat run` go to stderr through tracing; `VXNAT_LOG` filters them (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VXNAT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Drops { json, name } => {
            vxnat_control::drops::print(&mut std::io::stdout().lock(), json, name.as_deref())
        }
        Command::Run { config } => match NodeFile::load(&config).map_err(Into::into).and_then(|f| {
            init_logging();
            vxnat_control::run::run(f)
        }) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("vxnat: {e}");
                1
            }
        },
        Command::Cleanup { config } => {
            match NodeFile::load(&config).map_err(Into::into).and_then(|f| vxnat_control::run::cleanup(&f)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("vxnat cleanup: {e}");
                    1
                }
            }
        }
        Command::Ctl { socket, json, op } => {
            let mut pcap_path = None;
            let (req, view) = match op {
                CtlOp::Attach { ifname, ip, mac } => (Request::Attach { ifname, ip, mac }, View::Json),
                CtlOp::Detach { ifname } => (Request::Detach { ifname }, View::Json),
                CtlOp::Ports => (Request::Ports, View::Json),
                CtlOp::Stats => (Request::Stats, View::Stats),
                CtlOp::Flows { filter } => (Request::Flows { filter }, View::Flows),
                CtlOp::Trace { filter, count, timeout } => {
                    (Request::Trace { filter, count, timeout_ms: timeout * 1000 }, View::Trace)
                }
                CtlOp::Capture { at, filter, count, timeout, write } => {
                    pcap_path = Some(write);
                    (Request::Capture { at, filter, count, timeout_ms: timeout * 1000 }, View::Capture)
                }
                #[cfg(feature = "fault-injection")]
                CtlOp::Fault { what, ms } => (Request::Fault { what, ms }, View::Json),
            };
            match request(&socket, &req) {
                Ok(v) if view == View::Capture => match write_capture(&v, pcap_path.as_deref()) {
                    Ok(n) => {
                        println!(
                            "{n} packets written to {}",
                            pcap_path.as_deref().map(|p| p.display().to_string()).unwrap_or_default()
                        );
                        0
                    }
                    Err(e) => {
                        eprintln!("vxnat ctl capture: {e}");
                        1
                    }
                },
                Ok(v) if json => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    0
                }
                Ok(v) if view == View::Stats => match serde_json::from_value::<vxnat_control::ctl::StatsReply>(v) {
                    Ok(r) => {
                        print!("{}", render_stats(&r));
                        0
                    }
                    Err(e) => {
                        eprintln!("vxnat ctl stats: bad answer: {e}");
                        1
                    }
                },
                Ok(v) if view == View::Flows => {
                    match serde_json::from_value::<vxnat_control::observe::FlowsReport>(v) {
                        Ok(r) => print!("{}", vxnat_control::observe::render_flows(&r)),
                        Err(e) => eprintln!("vxnat ctl flows: bad answer: {e}"),
                    }
                    0
                }
                Ok(v) if view == View::Trace => {
                    match serde_json::from_value::<Vec<vxnat_control::observe::TraceReport>>(v["traces"].clone()) {
                        Ok(t) => print!("{}", vxnat_control::observe::render_traces(&t)),
                        Err(e) => eprintln!("vxnat ctl trace: bad answer: {e}"),
                    }
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
