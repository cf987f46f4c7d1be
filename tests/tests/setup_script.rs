//! scripts/setup.sh's checks, run with `--check` against fake root trees
//! (`VXNAT_SETUP_ROOT`): a tree with everything passes, a tree missing a header or a tool fails
//! and names the Debian package that provides it. apt is never run: `apt-get`, `apt`, `dpkg`
//! and `dpkg-query` come first on PATH as stubs that leave a mark, and the tests check for it.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

static SEQ: AtomicU32 = AtomicU32::new(0);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A temporary directory, unique to the process and the test, removed on drop.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "vxnat-setup-{}-{}-{nanos}-{tag}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One line of `setup.sh --list-checks`.
#[derive(Debug)]
struct Check {
    kind: String,
    what: String,
    package: String,
}

fn checks() -> Vec<Check> {
    let out =
        Command::new("bash").arg(repo().join("scripts/setup.sh")).arg("--list-checks").output().expect("running bash");
    assert!(out.status.success(), "--list-checks: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 3, "kind, what, package: {l:?}");
            Check { kind: f[0].to_string(), what: f[1].to_string(), package: f[2].to_string() }
        })
        .collect()
}

fn write_exec(path: &Path, body: &str) {
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    fs::write(path, body).expect("write");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// A fake root with every file and command setup.sh checks for (globs matched by a name with
/// `x` for `*`), and a directory of apt/dpkg stubs that leave a mark in `mark`.
#[derive(Debug)]
struct Fake {
    _dir: TempDir,
    root: PathBuf,
    stubs: PathBuf,
    mark: PathBuf,
}

impl Fake {
    fn complete(tag: &str) -> Fake {
        let dir = TempDir::new(tag);
        let root = dir.0.join("root");
        let stubs = dir.0.join("stubs");
        let mark = dir.0.join("apt-was-run");
        fs::create_dir_all(&root).expect("mkdir root");
        for c in checks() {
            match c.kind.as_str() {
                "file" => {
                    let p = root.join(c.what.trim_start_matches('/').replace('*', "x"));
                    fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
                    fs::write(&p, "").expect("write");
                }
                "cmd" | "rust" => write_exec(&root.join("usr/bin").join(&c.what), "#!/bin/sh\nexit 0\n"),
                k => panic!("unknown kind {k}"),
            }
        }
        for stub in ["apt-get", "apt", "dpkg", "dpkg-query"] {
            write_exec(&stubs.join(stub), &format!("#!/bin/sh\necho \"$0 $*\" >> '{}'\nexit 1\n", mark.display()));
        }
        Fake { _dir: dir, root, stubs, mark }
    }

    fn remove(&self, path: &str) {
        let p = self.root.join(path.trim_start_matches('/'));
        fs::remove_file(&p).unwrap_or_else(|e| panic!("removing {}: {e}", p.display()));
    }

    /// `bash scripts/setup.sh ARGS` with VXNAT_SETUP_ROOT and PATH=stubs:/usr/bin:/bin.
    fn setup(&self, args: &[&str]) -> (Output, String) {
        let path = format!("{}:/usr/bin:/bin", self.stubs.display());
        let out = Command::new("bash")
            .arg(repo().join("scripts/setup.sh"))
            .args(args)
            .env_clear()
            .env("PATH", path)
            .env("VXNAT_SETUP_ROOT", &self.root)
            .output()
            .expect("running bash");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(
            !self.mark.exists(),
            "setup.sh ran apt or dpkg: {}\n{text}",
            fs::read_to_string(&self.mark).unwrap_or_default()
        );
        (out, text)
    }
}

#[test]
fn a_complete_root_passes() {
    let f = Fake::complete("complete");
    let (out, text) = f.setup(&["--check"]);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("checks passed"), "{text}");
}

#[test]
fn a_missing_pcap_header_names_libpcap_dev() {
    let f = Fake::complete("no-pcap");
    f.remove("/usr/include/pcap/dlt.h");
    let (out, text) = f.setup(&["--check"]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("missing /usr/include/pcap/dlt.h: install the Debian package libpcap-dev"), "{text}");
    assert!(text.contains("apt-get install --no-install-recommends libpcap-dev\n"), "{text}");
    assert!(!text.contains("checks passed"), "{text}");
}

#[test]
fn missing_tools_name_their_packages() {
    let f = Fake::complete("no-tools");
    for tool in ["trafgen", "llc", "cc", "nsenter", "cargo-clippy"] {
        f.remove(&format!("/usr/bin/{tool}"));
    }
    f.remove("/usr/lib/cni/host-local");
    let (out, text) = f.setup(&["--check"]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for (what, package) in [
        ("command trafgen", "netsniff-ng"),
        ("command llc", "llvm"),
        ("command cc", "gcc"),
        ("command nsenter", "util-linux"),
        ("/usr/lib/cni/host-local", "containernetworking-plugins"),
    ] {
        assert!(text.contains(&format!("missing {what}: install the Debian package {package}")), "{what}: {text}");
    }
    assert!(text.contains("rustup component add clippy"), "{text}");
    assert!(text.contains("6 of "), "{text}");
    assert!(
        text.contains(
            "apt-get install --no-install-recommends containernetworking-plugins gcc llvm netsniff-ng util-linux\n"
        ),
        "{text}"
    );
}

#[test]
fn an_empty_root_fails_every_check() {
    let f = Fake::complete("empty");
    fs::remove_dir_all(&f.root).expect("rm");
    fs::create_dir(&f.root).expect("mkdir");
    let (out, text) = f.setup(&["--check"]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let n = checks().len();
    assert!(text.contains(&format!("{n} of {n} checks failed")), "{text}");
}

#[test]
fn a_fake_root_is_only_checked_never_installed_into() {
    let f = Fake::complete("install");
    let (out, text) = f.setup(&[]);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("only works with --check"), "{text}");
}

/// Every package the checks name is in scripts/debian-packages.txt (so setup.sh installs it),
/// and every package listed there is checked for.
#[test]
fn the_checks_and_the_package_list_agree() {
    let list = fs::read_to_string(repo().join("scripts/debian-packages.txt")).expect("debian-packages.txt");
    let listed: BTreeSet<&str> =
        list.lines().filter(|l| !l.trim_start().starts_with('#')).flat_map(str::split_whitespace).collect();
    let all = checks();
    let checked: BTreeSet<&str> = all.iter().filter(|c| c.kind != "rust").map(|c| c.package.as_str()).collect();
    let unlisted: Vec<_> = checked.difference(&listed).collect();
    assert!(unlisted.is_empty(), "checked but not in scripts/debian-packages.txt: {unlisted:?}");
    let unchecked: Vec<_> = listed.difference(&checked).collect();
    assert!(unchecked.is_empty(), "in scripts/debian-packages.txt but nothing in setup.sh checks them: {unchecked:?}");
    for (what, package) in [
        ("/usr/include/pcap/dlt.h", "libpcap-dev"),
        ("/usr/include/bpf/bpf_helpers.h", "libbpf-dev"),
        ("/usr/include/gelf.h", "libelf-dev"),
        ("/usr/include/zlib.h", "zlib1g-dev"),
        ("clang", "clang"),
        ("tshark", "tshark"),
        ("nginx", "nginx-light"),
        ("cargo", "cargo"),
        ("rustfmt", "rustfmt"),
    ] {
        assert!(all.iter().any(|c| c.what == what && c.package == package), "no check of {what} ({package})");
    }
}
