//! Wary's container images (`scripts/images`) run for real under podman (with runc and
//! cgroupfs): a control plane, two proxies and two apps on one container network.
//!
//! Podman runs inside a network namespace of the test's own, so the bridge, the
//! firewall rules netavark writes and aardvark-dns's names never touch the host's
//! network; its storage, run state and network configuration live in the test's
//! directory.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use wary_tests::node::wait_for;
use wary_tests::workspace_root;

const VERSION: &str = env!("CARGO_PKG_VERSION");
const SUBNET: &str = "10.89.7";

/// The `docker load`-able archive of the images: `WARY_IMAGES` (set by scripts/test
/// after `scripts/images`), else built now with `scripts/images`.
fn archive() -> PathBuf {
    if let Some(path) = std::env::var_os("WARY_IMAGES") {
        return PathBuf::from(path);
    }
    let status = Command::new(workspace_root().join("scripts/images"))
        .status()
        .expect("run scripts/images");
    assert!(status.success(), "scripts/images failed");
    workspace_root().join("target/images/wary-images.tar")
}

/// Podman, confined to a network namespace and a directory of the test's own.
struct Podman {
    netns: String,
    /// The container network's name, unique to this test process: rootful podman
    /// keeps IP allocations and aardvark-dns's state in /run/containers/networks,
    /// shared by every podman on the machine.
    network: String,
    dir: tempfile::TempDir,
}

impl Podman {
    fn new(tag: &str) -> Podman {
        let netns = format!("wary-ctr-{}-{tag}", std::process::id());
        let network = format!("wary-test-{}", std::process::id());
        let podman = Podman {
            netns,
            network,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        run_ok(Command::new("ip").args(["netns", "add", &podman.netns]));
        run_ok(Command::new("ip").args(["-n", &podman.netns, "link", "set", "lo", "up"]));
        podman
    }

    fn command(&self, args: &[&str]) -> Command {
        let d = self.dir.path();
        // nsenter, not `ip netns exec`, which remounts /sys and so hides the cgroup
        // hierarchy runc needs.
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("podman")
            .arg("--root")
            .arg(d.join("storage"))
            .arg("--runroot")
            .arg(d.join("run"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .arg("--network-config-dir")
            .arg(d.join("networks"))
            .args([
                "--storage-driver=vfs",
                "--cgroup-manager=cgroupfs",
                "--runtime=runc",
                "--network-backend=netavark",
                "--events-backend=file",
            ]);
        match args.split_first() {
            // Podman's default limits (nofile 1048576, nproc 4194304) are above what
            // sandboxes without CAP_SYS_RESOURCE (such as this test machine) let a
            // container's init set, and runc then starts nothing; these are below.
            Some((&"run", rest)) => cmd
                .args(["run", "--ulimit=nofile=16384:16384", "--ulimit=nproc=8192:8192"])
                .args(rest),
            _ => cmd.args(args),
        };
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run podman")
    }

    /// `podman ARGS`, which must succeed: its stdout, trimmed.
    fn ok(&self, args: &[&str]) -> String {
        run_ok(&mut self.command(args))
    }

    /// Runs `cmd` in container `name`'s network namespace, as root, with this
    /// machine's tools (the images have no shell): an app the images do not carry.
    fn in_netns_of(&self, name: &str, cmd: &[&str]) -> Output {
        let pid = self.ok(&["inspect", "--format", "{{.State.Pid}}", name]);
        Command::new("nsenter")
            .args(["-t", &pid, "-n"])
            .args(cmd)
            .output()
            .expect("nsenter")
    }

    fn ok_or_empty(&self, args: &[&str]) -> String {
        let out = self.run(args);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn logs(&self, name: &str) -> String {
        let out = self.run(&["logs", name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Podman {
    /// Removes every container and the network (which stops aardvark-dns), then ends
    /// by PID any container process still running, and deletes the netns.
    fn drop(&mut self) {
        let pids = self.ok_or_empty(&["ps", "--all", "--format", "{{.Pid}}"]);
        let _ = self.run(&["rm", "--all", "--force", "--time", "0"]);
        let _ = self.run(&["network", "rm", "--force", &self.network]);
        for pid in pids.split_whitespace().filter(|p| *p != "0") {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
        let _ = Command::new("ip").args(["netns", "delete", &self.netns]).status();
    }
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn mesh_yaml() -> String {
    format!(
        r#"apiVersion: local.wary.io/v1alpha1
kind: Service
metadata: {{name: backend}}
spec: {{selector: {{app: backend}}, ports: [{{port: 8080}}]}}
---
apiVersion: local.wary.io/v1alpha1
kind: Workload
metadata: {{name: backend, labels: {{app: backend}}}}
spec: {{serviceAccount: backend, address: {SUBNET}.12, ports: [{{port: 8080}}]}}
---
apiVersion: local.wary.io/v1alpha1
kind: Workload
metadata: {{name: client, labels: {{app: client}}}}
spec: {{serviceAccount: client, address: {SUBNET}.11}}
"#
    )
}

/// The control plane, two proxies (each with the init step's rules in its network
/// namespace) and two apps from the images: a plain request from the client's
/// namespace is redirected to its proxy, which finds the control plane by name, and
/// crosses to the backend's proxy over mTLS; the backend sees the caller's SPIFFE ID;
/// the proxies run as their non-root user on a read-only root.
#[test]
fn the_images_run_a_mesh_under_podman() {
    let archive = archive();
    let podman = Podman::new("mesh");
    let loaded = podman.ok(&["load", "--quiet", "--input", archive.to_str().unwrap()]);
    let image = |name: &str| format!("ghcr.io/wary-mesh/{name}:{VERSION}");
    for name in ["wary-proxy", "wary-control-plane", "wary"] {
        assert!(
            loaded.contains(&image(name)),
            "{archive:?} did not hold {}: {loaded}",
            image(name)
        );
    }
    podman.ok(&[
        "network",
        "create",
        "--subnet",
        &format!("{SUBNET}.0/24"),
        &podman.network,
    ]);

    // The mesh CA, made by the control plane's image as its own user (2103).
    let ca = podman.dir.path().join("ca");
    let config = podman.dir.path().join("config");
    std::fs::create_dir_all(&ca).unwrap();
    std::fs::create_dir_all(&config).unwrap();
    run_ok(Command::new("chown").args(["2103:2103", ca.to_str().unwrap()]));
    std::fs::write(config.join("mesh.yaml"), mesh_yaml()).unwrap();
    let ca_volume = format!("{}:/ca", ca.display());
    let cp = image("wary-control-plane");
    // The control plane's own subcommands, from its image, on the CA directory.
    let control_plane = |args: &[&str]| {
        let mut run = vec!["run", "--rm", "--read-only", "-v", &ca_volume, &cp];
        run.extend_from_slice(args);
        podman.ok(&run)
    };
    control_plane(&["ca", "init", "--ca-dir", "/ca"]);
    let anchors = control_plane(&["ca", "bundle", "--ca-dir", "/ca"]);
    let token = |workload: &str| control_plane(&["token", "--workload", workload, "--ca-dir", "/ca"]);

    let config_volume = format!("{}:/config:ro", config.display());
    podman.ok(&[
        "run",
        "--detach",
        "--name",
        "control-plane",
        "--network",
        &podman.network,
        "--ip",
        &format!("{SUBNET}.10"),
        "--read-only",
        "-v",
        &ca_volume,
        "-v",
        &config_volume,
        &cp,
        "--config-dir",
        "/config",
        "--ca-dir",
        "/ca",
        "--discovery-addr",
        "0.0.0.0:8086",
        "--admin-addr",
        "0.0.0.0:9990",
    ]);

    let proxy = image("wary-proxy");
    for (name, ip) in [("client", format!("{SUBNET}.11")), ("backend", format!("{SUBNET}.12"))] {
        let env = [
            // By name: aardvark-dns answers for the control plane's container.
            "WARY_CONTROL_PLANE=https://control-plane:8086".to_string(),
            format!("WARY_TRUST_ANCHORS_PEM={anchors}"),
            format!("WARY_JOIN_TOKEN={}", token(name)),
            format!("WARY_WORKLOAD={name}"),
            format!("WARY_INBOUND_ADDR={ip}:4143"),
            "WARY_OUTBOUND_ADDR=127.0.0.1:4140".into(),
            "WARY_ADMIN_ADDR=0.0.0.0:4191".into(),
        ];
        let mut args = vec![
            "run",
            "--detach",
            "--name",
            name,
            "--network",
            &podman.network,
            "--ip",
            &ip,
            "--read-only",
        ];
        for e in &env {
            args.extend(["--env", e]);
        }
        args.push(&proxy);
        podman.ok(&args);
        // The init step, from the proxy's image, in the proxy's network namespace: root
        // with NET_ADMIN and NET_RAW only, as the injector runs it.
        let netns = format!("container:{name}");
        let init = podman.run(&[
            "run",
            "--rm",
            "--network",
            &netns,
            "--user",
            "0",
            "--cap-drop",
            "ALL",
            "--cap-add",
            "NET_ADMIN,NET_RAW",
            "--read-only",
            &proxy,
            "init",
            "--proxy-uid",
            "2102",
        ]);
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&init.stdout),
            String::from_utf8_lossy(&init.stderr)
        );
        assert!(
            init.status.success() && said.contains("installed the iptables rules"),
            "{said}"
        );
    }
    // The backend app, from the CLI's image, in the backend's network namespace.
    podman.ok(&[
        "run",
        "--detach",
        "--name",
        "backend-app",
        "--network",
        "container:backend",
        "--read-only",
        &image("wary"),
        "demo-app",
        "backend",
        "--listen",
        "0.0.0.0:8080",
        "--name",
        "backend",
    ]);

    for ip in [11, 12] {
        let url = format!("http://{SUBNET}.{ip}:4191/ready");
        wait_for(&format!("the proxy at {url}"), Duration::from_secs(60), || {
            let out = Command::new("ip")
                .args(["netns", "exec", &podman.netns, "curl", "-sf", "--max-time", "2", &url])
                .output()
                .ok()?;
            out.status.success().then_some(())
        });
    }

    // The client app: curl as root in the client's namespace, knowing nothing of the
    // mesh; its connection is redirected to the proxy.
    let url = format!("http://{SUBNET}.12:8080/api/work");
    let answer = wait_for(
        "the backend app to answer through both proxies",
        Duration::from_secs(30),
        || {
            let out = podman.in_netns_of("client", &["curl", "-sS", "--fail-with-body", "--max-time", "5", &url]);
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        },
    );
    assert_eq!(
        answer.trim(),
        "work done by backend for spiffe://cluster.local/ns/default/sa/client",
        "the backend must see the client's SPIFFE ID\n{}\n{}",
        podman.logs("client"),
        podman.logs("backend")
    );

    // The proxies run as 2102 on a read-only root, without capabilities.
    for name in ["client", "backend"] {
        let user = podman.ok(&["inspect", "--format", "{{.Config.User}}", name]);
        assert_eq!(user, "2102:2102");
        let read_only = podman.ok(&["inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", name]);
        assert_eq!(read_only, "true");
        let pid = podman.ok(&["inspect", "--format", "{{.State.Pid}}", name]);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert_eq!(uid.split_whitespace().nth(1), Some("2102"), "{uid}");
        let eff = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
        assert!(eff.ends_with("0000000000000000"), "{eff}");
    }
    // No shell in any image.
    for name in ["wary-proxy", "wary-control-plane", "wary"] {
        let shell = podman.run(&["run", "--rm", "--entrypoint", "/bin/sh", &image(name), "-c", "true"]);
        assert!(!shell.status.success(), "{name}'s image has a shell");
    }
}
