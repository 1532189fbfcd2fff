//! `wary up examples/quickstart`, as the README runs it: the whole mesh comes up, the
//! balancer moves traffic off the slow replica and the breaker ejects the failing one
//! (in `/metrics` and in the live view), the front door answers, and Ctrl-C leaves no
//! process behind.
//!
//! The quickstart's fixed addresses (127.0.1.1, .11–.13, .21) are used by no other test.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use wary_tests::{binary, curl, wait_until};

const FRONTEND_ADMIN: &str = "http://127.0.1.1:4191/metrics";
const SLOW: &str = "127.0.1.12:9090";
const FLAKY: &str = "127.0.1.13:9090";

/// `wary_proxy_endpoint_requests_total` by endpoint, from the frontend's proxy.
async fn requests_by_endpoint() -> HashMap<String, f64> {
    let page = curl(FRONTEND_ADMIN).await;
    page.lines()
        .filter(|l| l.starts_with("wary_proxy_endpoint_requests_total{service=\"backend.default\""))
        .filter_map(|l| {
            let endpoint = l.split("endpoint=\"").nth(1)?.split('"').next()?.to_string();
            Some((endpoint, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// Every process descended from `root`, from /proc.
fn descendants(root: u32) -> HashSet<u32> {
    let mut parent: HashMap<u32, u32> = HashMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: the command may hold spaces, so split after ')'.
        if let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        {
            parent.insert(pid, ppid.parse().unwrap_or(0));
        }
    }
    parent
        .keys()
        .copied()
        .filter(|&pid| {
            let mut p = pid;
            while let Some(&pp) = parent.get(&p) {
                if pp == root {
                    return true;
                }
                p = pp;
            }
            false
        })
        .collect()
}

/// Stops `wary up` however the test ends, so a failed assertion does not leave the
/// quickstart's processes (and its fixed addresses) to the next run: SIGINT, then
/// SIGKILL to every process group still around after 10 s.
struct StopGuard(u32);

impl Drop for StopGuard {
    fn drop(&mut self) {
        let groups = descendants(self.0);
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.0.to_string()])
            .status();
        for _ in 0..100 {
            if !alive(self.0) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for pid in groups.into_iter().filter(|&p| alive(p)) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &format!("-{pid}")])
                .status();
        }
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_shows_balancing_and_ejection_and_stops_clean() {
    let mut up = Command::new(binary("wary"))
        .args(["up", "examples/quickstart", "--view", "plain"])
        .current_dir(env!("CARGO_MANIFEST_DIR").trim_end_matches("/tests"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start wary up");
    let pid = up.id().unwrap();
    let _guard = StopGuard(pid);
    let output = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(90), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(url) = line.strip_prefix("mesh ready: ") {
                return url.to_string();
            }
            output.lock().unwrap().push(line);
        }
        panic!("wary up ended before the mesh was ready: {:?}", output.lock().unwrap());
    })
    .await
    .expect("mesh ready within 90 s");
    let started: Vec<String> = output.lock().unwrap().clone();
    assert_eq!(
        started.iter().filter(|l| l.starts_with("proxy ")).count(),
        5,
        "{started:?}"
    );
    tokio::spawn({
        let output = output.clone();
        async move {
            while let Ok(Some(line)) = lines.next_line().await {
                output.lock().unwrap().push(line);
            }
        }
    });

    // Within 30 s of `mesh ready`: the slow replica gets under 10 % of the requests
    // (over a 3 s window) and the flaky one has been ejected.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut shed = false;
    let mut ejected = false;
    while tokio::time::Instant::now() < deadline && !(shed && ejected) {
        let before = requests_by_endpoint().await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = requests_by_endpoint().await;
        let delta = |e: &str| after.get(e).copied().unwrap_or(0.0) - before.get(e).copied().unwrap_or(0.0);
        let total: f64 = after.keys().map(|e| delta(e)).sum();
        shed |= total > 30.0 && delta(SLOW) < total * 0.1;
        let page = curl(FRONTEND_ADMIN).await;
        ejected |= page.lines().any(|l| {
            l.starts_with("wary_proxy_endpoint_ejections_total{")
                && l.contains(FLAKY)
                && l.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(|v| v >= 1.0)
        });
    }
    assert!(shed, "the slow replica kept 10 % or more of the traffic for 30 s");
    assert!(ejected, "the flaky replica was never ejected within 30 s");
    // The live view says so too: the flaky row's EJECTIONS column (the tenth).
    wait_until("the live view to show the ejection", || async {
        let output = output.lock().unwrap();
        let row = output
            .iter()
            .rev()
            .find(|l| l.contains("backend.default") && l.contains(FLAKY))?;
        let ejections: f64 = row.split_whitespace().nth(9)?.parse().ok()?;
        (ejections >= 1.0).then_some(())
    })
    .await;
    let front = curl(&ready).await;
    assert!(front.contains("called the backend: work done by backend-"), "{front}");

    // Ctrl-C: everything it started goes.
    let children = descendants(pid);
    assert!(children.len() >= 11, "control plane, 5 proxies, 5 apps: {children:?}");
    let sent = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .await
        .unwrap();
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(30), up.wait())
        .await
        .expect("wary up stops within 30 s")
        .unwrap();
    assert!(status.success(), "{status:?}");
    let left: Vec<u32> = children.into_iter().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "still running after wary up stopped: {left:?}");
}
