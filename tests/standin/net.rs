//! Pod networking with iproute2, the way a simple bridge CNI plugin does it: one Linux
//! bridge whose address is the gateway (and the node IP), and per pod a network namespace
//! (`ip netns`) holding one end of a veth pair as `eth0` with the pod IP and a default
//! route via the gateway. Names carry a short tag derived from the bridge name so a run
//! can find and remove what an earlier run left.

use std::net::Ipv4Addr;
use std::process::Stdio;

use ipnet::Ipv4Net;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
#[error("ip {args}: {message}")]
pub struct NetError {
    args: String,
    message: String,
}

/// Runs `ip ARGS`, feeding `batch` on stdin when given (`ip -batch -`).
pub async fn ip(args: &[&str], batch: Option<&str>) -> Result<String, NetError> {
    let fail = |message: String| NetError {
        args: args.join(" "),
        message,
    };
    let mut cmd = Command::new("ip");
    cmd.args(args)
        .stdin(if batch.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| fail(e.to_string()))?;
    if let (Some(text), Some(mut stdin)) = (batch, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .await
            .map_err(|e| fail(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| fail(e.to_string()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// The names of one pod's network pieces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetNames {
    pub netns: String,
    pub veth: String,
}

impl PodNetNames {
    pub fn netns_path(&self) -> std::path::PathBuf {
        std::path::Path::new("/run/netns").join(&self.netns)
    }
}

#[derive(Debug, Clone)]
pub struct Network {
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub prefix_len: u8,
    tag: String,
}

/// Three hex digits of an FNV-1a hash: a short, stable tag for a bridge name.
fn tag(bridge: &str) -> String {
    format!("{:03x}", fnv(bridge) & 0xfff)
}

/// FNV-1a of a name.
fn fnv(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The bridge's fixed MAC: locally administered, unicast, stable for a bridge name.
fn bridge_mac(bridge: &str) -> String {
    let hash = fnv(bridge);
    let [a, b, c, d] = hash.to_be_bytes();
    format!("02:7a:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

impl Network {
    pub fn new(bridge: &str, cidr: Ipv4Net, gateway: Ipv4Addr) -> Self {
        Self {
            bridge: bridge.into(),
            gateway,
            prefix_len: cidr.prefix_len(),
            tag: tag(bridge),
        }
    }

    fn netns_prefix(&self) -> String {
        format!("zs{}-", self.tag)
    }

    fn veth_prefix(&self) -> String {
        format!("zs{}", self.tag)
    }

    /// Names for the pod with this uid; veth names fit Linux's 15 characters.
    pub fn names(&self, uid: &str) -> PodNetNames {
        let id: String = uid.chars().filter(char::is_ascii_alphanumeric).collect();
        PodNetNames {
            netns: format!("{}{}", self.netns_prefix(), &id[..id.len().min(12)]),
            veth: format!("{}{}", self.veth_prefix(), &id[..id.len().min(8)]),
        }
    }

    /// Creates the bridge (or takes over the one an earlier run left) with the gateway,
    /// on a fixed MAC address.
    ///
    /// Left to itself, a Linux bridge takes the lowest MAC of its ports, so a new pod's
    /// veth can change the gateway's MAC. The pods keep the old one in their neighbour
    /// tables for up to half a minute, and a frame to it (now only a port's address, not
    /// the bridge's) is dropped by the host: the pods lose their way to the node, the
    /// Service proxy and the API server, while the node can still reach it. Seen as
    /// connections that stalled 10 to 30 s right after a pod started. A MAC set by hand
    /// never changes, which is what container runtimes' bridges do too.
    pub async fn ensure_bridge(&self) -> Result<(), NetError> {
        if let Err(e) = ip(&["link", "add", &self.bridge, "type", "bridge"], None).await
            && !e.message.contains("File exists")
        {
            return Err(e);
        }
        ip(
            &[
                "link",
                "set",
                &self.bridge,
                "address",
                &bridge_mac(&self.bridge),
            ],
            None,
        )
        .await?;
        let gw = format!("{}/{}", self.gateway, self.prefix_len);
        ip(&["addr", "replace", &gw, "dev", &self.bridge], None).await?;
        ip(&["link", "set", &self.bridge, "up"], None).await?;
        Ok(())
    }

    pub async fn delete_bridge(&self) -> Result<(), NetError> {
        ip(&["link", "del", &self.bridge], None).await.map(drop)
    }

    /// The pod's namespace and veth pair, `eth0` at `pod_ip`.
    pub async fn create(&self, names: &PodNetNames, pod_ip: Ipv4Addr) -> Result<(), NetError> {
        let host = format!(
            "netns add {ns}\nlink add {veth} type veth peer name eth0 netns {ns}\nlink set {veth} master {br} up\n",
            ns = names.netns,
            veth = names.veth,
            br = self.bridge
        );
        ip(&["-batch", "-"], Some(&host)).await?;
        let inside = format!(
            "addr add {pod_ip}/{len} dev eth0\nlink set eth0 up\nlink set lo up\nroute add default via {gw}\n",
            len = self.prefix_len,
            gw = self.gateway
        );
        ip(&["-n", &names.netns, "-batch", "-"], Some(&inside)).await?;
        Ok(())
    }

    /// Removes the pod's namespace and veth (best effort: either may be gone already).
    pub async fn delete(&self, names: &PodNetNames) {
        let _ = ip(&["link", "del", &names.veth], None).await;
        let _ = ip(&["netns", "delete", &names.netns], None).await;
    }

    /// Removes the namespaces and veths of this tag that an earlier run left.
    pub async fn cleanup_leftovers(&self) -> Result<usize, NetError> {
        let mut removed = 0;
        let netns = ip(&["netns", "list"], None).await?;
        for name in leftovers_netns(&netns, &self.netns_prefix()) {
            if ip(&["netns", "delete", name], None).await.is_ok() {
                removed += 1;
            }
        }
        let links = ip(&["-o", "link", "show"], None).await?;
        for name in leftover_veths(&links, &self.veth_prefix()) {
            if ip(&["link", "del", name], None).await.is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

fn leftovers_netns<'a>(list: &'a str, prefix: &str) -> Vec<&'a str> {
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

fn leftover_veths<'a>(links: &'a str, prefix: &str) -> Vec<&'a str> {
    links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n))
        .filter(|n| n.starts_with(prefix) && n.len() == prefix.len() + 8)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_are_stable() {
        let net = Network::new(
            "zs-br0",
            "10.244.0.0/16".parse().unwrap(),
            "10.244.0.1".parse().unwrap(),
        );
        let n = net.names("3f2c9c1e-77aa-4bcd-9e0f-0123456789ab");
        assert!(n.veth.len() <= 15, "{}", n.veth);
        assert_eq!(n.veth, format!("zs{}3f2c9c1e", tag("zs-br0")));
        assert_eq!(n.netns, format!("zs{}-3f2c9c1e77aa", tag("zs-br0")));
        assert_eq!(net.names("3f2c9c1e-77aa-4bcd-9e0f-0123456789ab"), n);
        assert_ne!(tag("zs-br0"), tag("zs-br1"));
    }

    #[test]
    fn the_bridge_mac_is_fixed_unicast_and_local() {
        let mac = bridge_mac("zs-br24");
        assert_eq!(mac, bridge_mac("zs-br24"));
        assert_ne!(mac, bridge_mac("zs-br36"));
        let first = u8::from_str_radix(&mac[..2], 16).unwrap();
        assert_eq!(first & 0b11, 0b10, "locally administered unicast: {mac}");
        assert_eq!(mac.split(':').count(), 6);
    }

    #[test]
    fn leftovers_are_recognised_by_prefix() {
        let netns = "zsabc-111122223333 (id: 3)\nother\nzsabc-444455556666\n";
        assert_eq!(
            leftovers_netns(netns, "zsabc-"),
            ["zsabc-111122223333", "zsabc-444455556666"]
        );
        let links = "1: lo: <LOOPBACK,UP> mtu 65536\n\
                     7: zsabc11112222@if2: <BROADCAST> mtu 1500 master zs-br0\n\
                     8: zs-br0: <BROADCAST> mtu 1500\n\
                     9: zsabcsvc: <BROADCAST> mtu 1500\n";
        assert_eq!(leftover_veths(links, "zsabc"), ["zsabc11112222"]);
    }
}
