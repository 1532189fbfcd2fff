//! `wary-proxy init`: the pod's iptables rules for transparent mode, installed by the
//! injected init step before the app starts.
//!
//! ```text
//! nat PREROUTING ─▶ WARY_INBOUND:  skipped ports (admin 4191, inbound 4143, --skip-inbound-ports) RETURN
//!                                  any other TCP ─▶ REDIRECT :4143 (inbound, mTLS)
//! nat OUTPUT ─────▶ WARY_OUTBOUND: the proxy's own UID ─────▶ RETURN (never looped back)
//!                                  out via lo (the pod to itself) ─▶ RETURN
//!                                  skipped ports (--skip-outbound-ports) ─▶ RETURN
//!                                  any other TCP ─▶ REDIRECT :4140 (outbound)
//! ```
//!
//! The proxy reads where a redirected connection was going with `SO_ORIGINAL_DST`.
//! The rules are one `iptables-restore --noflush` transaction on chains of Wary's own,
//! after removing any jump a previous run left, so running init twice (a restarted
//! pod keeps its network namespace) leaves one set of rules. Shape after Linkerd's
//! proxy-init and Istio's istio-iptables.
//!
//! The same rules go into ip6tables when it is there. The proxy listens on IPv4 only
//! for now, so IPv6 TCP is redirected to ports where nothing listens: refused, never
//! carried past the proxy (an app listening on `[::]` cannot be reached around mTLS).

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

/// The chain PREROUTING jumps to.
pub const INBOUND_CHAIN: &str = "WARY_INBOUND";
/// The chain OUTPUT jumps to.
pub const OUTBOUND_CHAIN: &str = "WARY_OUTBOUND";
/// The UID the injected proxy runs as, exempt from the outbound redirect: 2102, as
/// Linkerd's proxy (Istio's is 1337).
pub const DEFAULT_PROXY_UID: u32 = 2102;

/// What `wary-proxy init` installs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// The proxy's UID: its connections are never redirected; default
    /// [`DEFAULT_PROXY_UID`].
    pub proxy_uid: u32,
    /// Where inbound TCP is redirected: the proxy's inbound (mTLS) port, default 4143.
    pub inbound_port: u16,
    /// Where outbound TCP is redirected: the proxy's outbound port, default 4140.
    pub outbound_port: u16,
    /// Inbound destination ports left alone: the admin port (4191, for probes and
    /// Prometheus) and any the pod excludes.
    pub skip_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone (e.g. a database the mesh should not see).
    pub skip_outbound_ports: Vec<u16>,
}

impl Rules {
    /// The rules as `iptables-restore` input (table `nat`). Ports are listed in the
    /// order given, without duplicates; the inbound port itself is always skipped
    /// inbound (peers dial it directly).
    pub fn restore_input(&self) -> String {
        let mut out = String::from("*nat\n");
        let _ = writeln!(out, ":{INBOUND_CHAIN} - [0:0]");
        let _ = writeln!(out, ":{OUTBOUND_CHAIN} - [0:0]");
        let _ = writeln!(out, "-A PREROUTING -p tcp -j {INBOUND_CHAIN}");
        let mut inbound_skips = self.skip_inbound_ports.clone();
        inbound_skips.push(self.inbound_port);
        for port in dedup(&inbound_skips) {
            let _ = writeln!(out, "-A {INBOUND_CHAIN} -p tcp --dport {port} -j RETURN");
        }
        let _ = writeln!(
            out,
            "-A {INBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}",
            self.inbound_port
        );
        let _ = writeln!(out, "-A OUTPUT -p tcp -j {OUTBOUND_CHAIN}");
        let _ = writeln!(
            out,
            "-A {OUTBOUND_CHAIN} -m owner --uid-owner {} -j RETURN",
            self.proxy_uid
        );
        let _ = writeln!(out, "-A {OUTBOUND_CHAIN} -o lo -j RETURN");
        for port in dedup(&self.skip_outbound_ports) {
            let _ = writeln!(out, "-A {OUTBOUND_CHAIN} -p tcp --dport {port} -j RETURN");
        }
        let _ = writeln!(
            out,
            "-A {OUTBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        );
        out.push_str("COMMIT\n");
        out
    }

    /// Installs the rules in this network namespace: removes the jumps a previous run
    /// left, then applies [`Rules::restore_input`] with `iptables-restore --noflush`
    /// (which empties and refills Wary's chains and touches no one else's).
    ///
    /// # Errors
    /// `iptables-restore` is missing or refuses the rules (without `NET_ADMIN` it
    /// says "Permission denied"); the message carries its output and what to do.
    pub fn apply(&self) -> anyhow::Result<()> {
        self.apply_with("iptables")?;
        // IPv6 fails closed where the kernel and tools have it.
        let has_ip6 = Command::new("ip6tables")
            .args(["-w", "-t", "nat", "-L", "-n"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if has_ip6 {
            self.apply_with("ip6tables")?;
        } else {
            eprintln!("wary-proxy init: no usable ip6tables: IPv6 rules not installed");
        }
        Ok(())
    }

    fn apply_with(&self, tool: &str) -> anyhow::Result<()> {
        let restore = format!("{tool}-restore");
        for (chain, ours) in [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTBOUND_CHAIN)] {
            // `-D` fails once no jump is left; a bound keeps a broken iptables from
            // looping.
            for _ in 0..16 {
                let removed = Command::new(tool)
                    .args(["-w", "-t", "nat", "-D", chain, "-p", "tcp", "-j", ours])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map_err(|e| anyhow::anyhow!("cannot run {tool}: {e}: install iptables in the init image"))?;
                if !removed.success() {
                    break;
                }
            }
        }
        let input = self.restore_input();
        let mut child = Command::new(&restore)
            .args(["-w", "--noflush"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot run {restore}: {e}: install iptables in the init image"))?;
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            anyhow::bail!(
                "{restore} refused the rules ({}): {}\nthe init step needs the NET_ADMIN and NET_RAW capabilities; the rules were:\n{input}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

fn dedup(ports: &[u16]) -> Vec<u16> {
    let mut seen = Vec::with_capacity(ports.len());
    for &p in ports {
        if !seen.contains(&p) {
            seen.push(p);
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            proxy_uid: 2102,
            inbound_port: 4143,
            outbound_port: 4140,
            skip_inbound_ports: vec![4191, 22, 4191],
            skip_outbound_ports: vec![5432],
        }
    }

    #[test]
    fn the_proxy_is_exempt_before_anything_is_redirected() {
        let input = rules().restore_input();
        let lines: Vec<&str> = input.lines().collect();
        let owner = lines
            .iter()
            .position(|l| l.contains("--uid-owner 2102 -j RETURN"))
            .unwrap();
        let redirect = lines.iter().position(|l| l.contains("--to-ports 4140")).unwrap();
        assert!(owner < redirect, "{input}");
        assert!(
            input.contains("-A WARY_OUTBOUND -p tcp --dport 5432 -j RETURN"),
            "{input}"
        );
        assert!(input.ends_with("COMMIT\n"));
    }

    #[test]
    fn skipped_inbound_ports_include_the_inbound_port_once_each() {
        let input = rules().restore_input();
        let skips: Vec<&str> = input
            .lines()
            .filter(|l| l.starts_with("-A WARY_INBOUND") && l.ends_with("RETURN"))
            .collect();
        assert_eq!(
            skips,
            [
                "-A WARY_INBOUND -p tcp --dport 4191 -j RETURN",
                "-A WARY_INBOUND -p tcp --dport 22 -j RETURN",
                "-A WARY_INBOUND -p tcp --dport 4143 -j RETURN",
            ]
        );
    }
}
