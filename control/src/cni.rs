//! `vxnat-cni`: vxnat as a CNI plugin (spec 1.0.0, 0.4.0 compatible). The runtime calls it
//! with `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS`, `CNI_PATH` in
//! the environment and the network configuration on stdin:
//!
//! ```json
//! {"cniVersion": "1.0.0", "name": "vxnat", "type": "vxnat-cni",
//!  "socket": "/run/vxnat/vxnat.sock",
//!  "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]]}}
//! ```
//!
//! ADD: a veth (the pod end named `CNI_IFNAME` in `CNI_NETNS`, the host end `vx` + a hash of
//! the container id), pod MTU = uplink MTU - 50 (what the running vxnat reports), IPAM
//! delegated to the plugin `ipam.type` found on `CNI_PATH`, the address as a /32 with a route
//! to the pod gateway and a default route through it (vxnat routes, like flannel's host-gw
//! view of a pod), the host end attached to the running vxnat (which remembers it across
//! restarts), and the Result on stdout. DEL is idempotent and releases the address. CHECK
//! verifies what ADD set up. Errors are the spec's JSON with its codes, on stdout, exit 1.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const SPEC_VERSION: &str = "1.0.0";
pub const SUPPORTED: [&str; 2] = ["0.4.0", "1.0.0"];

/// A CNI error: the spec's code, message and details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

/// The spec's well-known error codes.
pub const INCOMPATIBLE_VERSION: u32 = 1;
pub const UNSUPPORTED_FIELD: u32 = 2;
pub const UNKNOWN_CONTAINER: u32 = 3;
pub const INVALID_ENV: u32 = 4;
pub const IO_FAILURE: u32 = 5;
pub const DECODE_FAILURE: u32 = 6;
pub const INVALID_CONFIG: u32 = 7;
pub const TRY_AGAIN_LATER: u32 = 11;

fn err(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError { code, msg: msg.into(), details: details.into() }
}

impl CniError {
    pub fn to_json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

/// The parts of the network configuration vxnat reads.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub socket: PathBuf,
    pub ipam_type: String,
    pub dns: Option<Value>,
    pub prev_result: Option<Value>,
    /// The whole configuration, passed on to the IPAM plugin.
    pub raw: Value,
}

pub fn parse_conf(text: &str) -> Result<NetConf, CniError> {
    let raw: Value = serde_json::from_str(text)
        .map_err(|e| err(DECODE_FAILURE, "failed to decode the network configuration", e.to_string()))?;
    let s = |k: &str| raw.get(k).and_then(Value::as_str).map(str::to_string);
    let cni_version = s("cniVersion").ok_or(err(INVALID_CONFIG, "cniVersion: missing", ""))?;
    if !SUPPORTED.contains(&cni_version.as_str()) {
        return Err(err(
            INCOMPATIBLE_VERSION,
            format!("cniVersion {cni_version:?} is not supported"),
            format!("supported: {}", SUPPORTED.join(", ")),
        ));
    }
    let name = s("name").ok_or(err(INVALID_CONFIG, "name: missing", ""))?;
    let ipam_type = raw
        .get("ipam")
        .and_then(|i| i.get("type"))
        .and_then(Value::as_str)
        .ok_or(err(
            INVALID_CONFIG,
            "ipam.type: missing (vxnat delegates addresses to an IPAM plugin, e.g. host-local)",
            "",
        ))?
        .to_string();
    if ipam_type.contains('/') || ipam_type.is_empty() {
        return Err(err(INVALID_CONFIG, format!("ipam.type: {ipam_type:?} is not a plugin name"), ""));
    }
    let socket = PathBuf::from(s("socket").unwrap_or_else(|| "/run/vxnat/vxnat.sock".into()));
    Ok(NetConf {
        cni_version,
        name,
        socket,
        ipam_type,
        dns: raw.get("dns").cloned(),
        prev_result: raw.get("prevResult").cloned(),
        raw,
    })
}

/// The runtime's environment.
#[derive(Debug, Clone)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub path: Vec<PathBuf>,
    pub vars: BTreeMap<String, String>,
}

pub fn read_env(vars: &BTreeMap<String, String>) -> Result<Env, CniError> {
    let get = |k: &str| vars.get(k).cloned().unwrap_or_default();
    let command = get("CNI_COMMAND");
    if command.is_empty() {
        return Err(err(INVALID_ENV, "CNI_COMMAND: missing", ""));
    }
    let e = Env {
        container_id: get("CNI_CONTAINERID"),
        netns: get("CNI_NETNS"),
        ifname: get("CNI_IFNAME"),
        path: std::env::split_paths(&get("CNI_PATH")).collect(),
        command,
        vars: vars.clone(),
    };
    if e.command != "VERSION" {
        if e.container_id.is_empty() {
            return Err(err(INVALID_ENV, "CNI_CONTAINERID: missing", ""));
        }
        if e.ifname.is_empty() {
            return Err(err(INVALID_ENV, "CNI_IFNAME: missing", ""));
        }
        if e.command == "ADD" && e.netns.is_empty() {
            return Err(err(INVALID_ENV, "CNI_NETNS: missing", ""));
        }
    }
    Ok(e)
}

/// The host end's name: `vx` and 11 hex digits of a hash of the container id and interface
/// (deterministic, so DEL finds it; 13 bytes, under the 15-byte limit).
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("vx{:011x}", h >> 20)
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn ip(args: &[&str]) -> Result<String, String> {
    run(Command::new("ip").args(args))
}

fn ip_in(netns: &str, args: &[&str]) -> Result<String, String> {
    run(Command::new("nsenter").arg(format!("--net={netns}")).arg("ip").args(args))
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Runs the IPAM plugin `ipam.type` from `CNI_PATH` with `command`, the same environment and
/// the configuration on stdin; returns its Result.
fn ipam(conf: &NetConf, env: &Env, command: &str) -> Result<Value, CniError> {
    let plugin = env.path.iter().map(|d| d.join(&conf.ipam_type)).find(|p| p.is_file()).ok_or(err(
        INVALID_CONFIG,
        format!("ipam.type: no plugin {:?} on CNI_PATH", conf.ipam_type),
        format!("{:?}", env.path),
    ))?;
    let mut child = Command::new(&plugin)
        .env_clear()
        .envs(&env.vars)
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(IO_FAILURE, format!("running {}", plugin.display()), e.to_string()))?;
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(conf.raw.to_string().as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| err(IO_FAILURE, format!("running {}", plugin.display()), e.to_string()))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        // The IPAM plugin's own error, passed on.
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        return Err(err(
            v["code"].as_u64().unwrap_or(u64::from(IO_FAILURE)) as u32,
            format!("ipam {}: {}", conf.ipam_type, v["msg"].as_str().unwrap_or(text.trim())),
            v["details"].as_str().unwrap_or(&String::from_utf8_lossy(&out.stderr)).to_string(),
        ));
    }
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&text)
        .map_err(|e| err(DECODE_FAILURE, format!("ipam {}: bad result", conf.ipam_type), e.to_string()))
}

/// What the running vxnat says about this node (`ctl ports`).
fn node_info(socket: &Path) -> Result<crate::ctl::PortsReply, CniError> {
    crate::ctl::request_as(socket, &crate::ctl::Request::Ports)
        .map_err(|e| err(TRY_AGAIN_LATER, "vxnat is not running on this node (its ctl socket does not answer)", e))
}

/// The error for a node that holds `max_pods` pods already: the spec's "try again later" (a
/// slot frees when a pod goes), with a message that says why.
fn node_full(details: impl Into<String>) -> CniError {
    err(TRY_AGAIN_LATER, "node full: vxnat attaches at most max_pods pods on this node", details)
}

fn add(conf: &NetConf, env: &Env) -> Result<Value, CniError> {
    let info = node_info(&conf.socket)?;
    // Refused before an address is allocated or an interface made.
    if info.pods >= info.max_pods as usize {
        return Err(node_full(format!("{} pods attached, max_pods = {}", info.pods, info.max_pods)));
    }
    let gateway = info.gateway.to_string();
    let mtu = info.pod_mtu.to_string();
    if !Path::new(&env.netns).exists() {
        return Err(err(UNKNOWN_CONTAINER, format!("CNI_NETNS: {} does not exist", env.netns), ""));
    }
    let host = host_ifname(&env.container_id, &env.ifname);
    if link_exists(&host) {
        return Err(err(
            INVALID_CONFIG,
            format!("{host} already exists: ADD called twice for this container and interface"),
            "",
        ));
    }
    let r = ipam(conf, env, "ADD")?;
    let cleanup = |why: CniError| {
        let _ = ip(&["link", "del", &host]);
        let _ = ipam(conf, env, "DEL");
        why
    };
    let addr = r["ips"][0]["address"]
        .as_str()
        .ok_or_else(|| cleanup(err(INVALID_CONFIG, "ipam: no address in its result", r.to_string())))?
        .to_string();
    let pod_ip = addr.split('/').next().unwrap_or_default().to_string();
    let tmp = format!("{host}p");
    let io = |e: String| err(IO_FAILURE, "setting up the pod's interface", e);
    let setup = || -> Result<(), CniError> {
        ip(&["link", "add", &host, "mtu", &mtu, "type", "veth", "peer", "name", &tmp, "mtu", &mtu]).map_err(io)?;
        ip(&["link", "set", &tmp, "netns", &env.netns]).map_err(io)?;
        ip_in(&env.netns, &["link", "set", &tmp, "name", &env.ifname]).map_err(io)?;
        ip_in(&env.netns, &["addr", "add", &format!("{pod_ip}/32"), "dev", &env.ifname]).map_err(io)?;
        ip_in(&env.netns, &["link", "set", &env.ifname, "up"]).map_err(io)?;
        ip_in(&env.netns, &["route", "add", &gateway, "dev", &env.ifname, "scope", "link"]).map_err(io)?;
        ip_in(&env.netns, &["route", "add", "default", "via", &gateway, "dev", &env.ifname]).map_err(io)?;
        ip(&["link", "set", &host, "up"]).map_err(io)?;
        let req = crate::ctl::Request::Attach {
            ifname: host.clone(),
            ip: pod_ip.parse().map_err(|_| err(INVALID_CONFIG, "ipam: bad address", addr.clone()))?,
            mac: None,
        };
        crate::ctl::request(&conf.socket, &req).map_err(|e| {
            if e.starts_with(crate::node::NODE_FULL) {
                node_full(e)
            } else {
                err(TRY_AGAIN_LATER, "vxnat did not attach the pod", e)
            }
        })?;
        Ok(())
    };
    setup().map_err(cleanup)?;
    let mac_of =
        |n: &str| std::fs::read_to_string(format!("/sys/class/net/{n}/address")).unwrap_or_default().trim().to_string();
    let pod_mac = ip_in(&env.netns, &["-j", "link", "show", &env.ifname])
        .ok()
        .and_then(|j| serde_json::from_str::<Value>(&j).ok())
        .and_then(|v| v[0]["address"].as_str().map(str::to_string))
        .unwrap_or_default();
    // Chaining: what came before stays in the result; ours is appended.
    let mut result = conf.prev_result.clone().unwrap_or_else(|| json!({}));
    let base = result["interfaces"].as_array().map_or(0, Vec::len);
    let mut interfaces = result["interfaces"].as_array().cloned().unwrap_or_default();
    interfaces.push(json!({"name": host, "mac": mac_of(&host)}));
    interfaces.push(json!({"name": env.ifname, "mac": pod_mac, "sandbox": env.netns}));
    let mut ips = result["ips"].as_array().cloned().unwrap_or_default();
    ips.push(json!({"address": addr, "gateway": gateway, "interface": base + 1}));
    let mut routes = result["routes"].as_array().cloned().unwrap_or_default();
    routes.push(json!({"dst": "0.0.0.0/0", "gw": gateway}));
    result["cniVersion"] = json!(conf.cni_version);
    result["interfaces"] = json!(interfaces);
    result["ips"] = json!(ips);
    result["routes"] = json!(routes);
    result["dns"] = conf.dns.clone().or_else(|| r.get("dns").cloned()).unwrap_or_else(|| json!({}));
    Ok(result)
}

fn del(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    let host = host_ifname(&env.container_id, &env.ifname);
    // vxnat may be down or the port gone: both fine; the veth goes with its host end.
    let _ = crate::ctl::request(&conf.socket, &crate::ctl::Request::Detach { ifname: host.clone() });
    if link_exists(&host) {
        ip(&["link", "del", &host]).map_err(|e| err(IO_FAILURE, format!("deleting {host}"), e))?;
    }
    ipam(conf, env, "DEL")?;
    Ok(())
}

fn check(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    let host = host_ifname(&env.container_id, &env.ifname);
    if !link_exists(&host) {
        return Err(err(IO_FAILURE, format!("{host}, the pod's host end, does not exist"), ""));
    }
    let info = node_info(&conf.socket)?;
    let attached = info.ports.iter().any(|p| p.ifname == host);
    if !attached {
        return Err(err(IO_FAILURE, format!("{host} is not attached to vxnat"), ""));
    }
    let prev =
        conf.prev_result.as_ref().ok_or(err(INVALID_CONFIG, "prevResult: missing (CHECK needs the ADD result)", ""))?;
    let want =
        prev["ips"].as_array().into_iter().flatten().filter_map(|i| i["address"].as_str()).next().unwrap_or_default();
    let want_ip = want.split('/').next().unwrap_or_default();
    let addrs = ip_in(&env.netns, &["-j", "addr", "show", "dev", &env.ifname])
        .map_err(|e| err(IO_FAILURE, format!("{} in {}: {e}", env.ifname, env.netns), ""))?;
    if !addrs.contains(&format!("\"{want_ip}\"")) {
        return Err(err(IO_FAILURE, format!("{} does not have {want_ip}", env.ifname), addrs));
    }
    ipam(conf, env, "CHECK")?;
    Ok(())
}

/// Runs one command as the spec says; returns the exit code (stdout has the result or error).
pub fn run_plugin(vars: &BTreeMap<String, String>, stdin: &str, out: &mut impl Write) -> i32 {
    let version = serde_json::from_str::<Value>(stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
        .unwrap_or_else(|| SPEC_VERSION.to_string());
    let result = (|| -> Result<Option<Value>, CniError> {
        let env = read_env(vars)?;
        if env.command == "VERSION" {
            return Ok(Some(json!({"cniVersion": SPEC_VERSION, "supportedVersions": SUPPORTED})));
        }
        let conf = parse_conf(stdin)?;
        match env.command.as_str() {
            "ADD" => add(&conf, &env).map(Some),
            "DEL" => del(&conf, &env).map(|_| None),
            "CHECK" => check(&conf, &env).map(|_| None),
            "GC" | "STATUS" => Ok(None),
            other => Err(err(INVALID_ENV, format!("CNI_COMMAND: {other:?} is not ADD, DEL, CHECK or VERSION"), "")),
        }
    })();
    match result {
        Ok(Some(v)) => {
            let _ = writeln!(out, "{v}");
            0
        }
        Ok(None) => 0,
        Err(e) => {
            let _ = writeln!(out, "{}", e.to_json(&version));
            1
        }
    }
}

/// The `vxnat-cni` binary.
pub fn main() -> i32 {
    let vars: BTreeMap<String, String> = std::env::vars().collect();
    let mut stdin = String::new();
    if vars.get("CNI_COMMAND").map(String::as_str) != Some("VERSION") {
        let _ = std::io::stdin().read_to_string(&mut stdin);
    }
    run_plugin(&vars, &stdin, &mut std::io::stdout().lock())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_have_the_spec_codes_and_name_the_field() {
        assert_eq!(parse_conf("{not json").unwrap_err().code, DECODE_FAILURE);
        let e = parse_conf(r#"{"cniVersion":"1.0.0","name":"n","type":"vxnat-cni"}"#).unwrap_err();
        assert_eq!((e.code, e.msg.starts_with("ipam.type")), (INVALID_CONFIG, true), "{e:?}");
        let e = parse_conf(r#"{"cniVersion":"0.2.0","name":"n","ipam":{"type":"host-local"}}"#).unwrap_err();
        assert_eq!(e.code, INCOMPATIBLE_VERSION);
        let e = parse_conf(r#"{"cniVersion":"1.0.0","ipam":{"type":"host-local"}}"#).unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (INVALID_CONFIG, "name: missing"));
        assert!(parse_conf(r#"{"cniVersion":"0.4.0","name":"n","ipam":{"type":"host-local"}}"#).is_ok());
    }

    #[test]
    fn version_and_environment_errors() {
        let mut vars = BTreeMap::from([("CNI_COMMAND".to_string(), "VERSION".to_string())]);
        let mut out = Vec::new();
        assert_eq!(run_plugin(&vars, "", &mut out), 0);
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["supportedVersions"], json!(["0.4.0", "1.0.0"]));
        vars.insert("CNI_COMMAND".into(), "ADD".into());
        let mut out = Vec::new();
        assert_eq!(run_plugin(&vars, r#"{"cniVersion":"1.0.0"}"#, &mut out), 1);
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(
            (v["code"].as_u64(), v["msg"].as_str()),
            (Some(u64::from(INVALID_ENV)), Some("CNI_CONTAINERID: missing"))
        );
        assert_eq!(v["cniVersion"], "1.0.0");
    }

    #[test]
    fn host_names_are_deterministic_and_short() {
        let a = host_ifname("0123456789abcdef0123456789abcdef", "eth0");
        assert_eq!(a, host_ifname("0123456789abcdef0123456789abcdef", "eth0"));
        assert_ne!(a, host_ifname("0123456789abcdef0123456789abcdef", "eth1"));
        assert!(a.len() <= 15 && a.starts_with("vx"), "{a}");
    }
}
