//! Images without a container runtime: `--image PREFIX=HOST[:IMAGEPATH]` maps an image to
//! a host binary that is mounted at IMAGEPATH (its ENTRYPOINT, run when the container sets
//! no `command`); `--available-image PREFIX` lists images that "pull" but whose `command`
//! runs host programs (`python3`, `sh`...). Every other image fails to pull.

use std::path::PathBuf;

/// The images the stand-in "has" unless told otherwise.
pub const DEFAULT_AVAILABLE: &[&str] = &[
    "python:",
    "docker.io/library/python:",
    "busybox",
    "docker.io/library/busybox",
    "alpine",
    "docker.io/library/alpine",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageMap {
    pub prefix: String,
    pub host: PathBuf,
    pub image_path: String,
}

/// Parses `PREFIX=HOST[:IMAGEPATH]`; IMAGEPATH defaults to `/<file name of HOST>`.
pub fn parse_image_map(s: &str) -> Result<ImageMap, String> {
    let (prefix, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected PREFIX=HOST[:IMAGEPATH]"))?;
    if prefix.is_empty() || rest.is_empty() {
        return Err(format!("{s:?}: expected PREFIX=HOST[:IMAGEPATH]"));
    }
    let (host, image_path) = match rest.rsplit_once(':') {
        Some((host, path)) if path.starts_with('/') && !host.is_empty() => {
            (PathBuf::from(host), path.to_string())
        }
        _ => {
            let host = PathBuf::from(rest);
            let name = host
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| format!("{s:?}: HOST must name a file"))?;
            (host, format!("/{name}"))
        }
    };
    if !host.is_absolute() {
        return Err(format!("{s:?}: HOST must be an absolute path"));
    }
    Ok(ImageMap {
        prefix: prefix.into(),
        host,
        image_path,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    Entrypoint { host: PathBuf, image_path: String },
    Present,
    Unavailable,
}

#[derive(Debug, Clone, Default)]
pub struct Images {
    pub maps: Vec<ImageMap>,
    pub available: Vec<String>,
}

/// `image` is `prefix` or continues it at a tag, digest or path boundary (a prefix that
/// ends in `:` or `/` matches anything after it).
fn matches(image: &str, prefix: &str) -> bool {
    match image.strip_prefix(prefix) {
        Some("") => true,
        Some(rest) => prefix.ends_with([':', '/', '@']) || rest.starts_with([':', '@', '/']),
        None => false,
    }
}

impl Images {
    pub fn resolve(&self, image: &str) -> Resolved {
        let best_map = self
            .maps
            .iter()
            .filter(|m| matches(image, &m.prefix))
            .max_by_key(|m| m.prefix.len());
        if let Some(m) = best_map {
            return Resolved::Entrypoint {
                host: m.host.clone(),
                image_path: m.image_path.clone(),
            };
        }
        if self.available.iter().any(|p| matches(image, p)) {
            Resolved::Present
        } else {
            Resolved::Unavailable
        }
    }
}

/// The CMD of the real images behind the default available ones (they have no
/// ENTRYPOINT): what runs when a container sets neither `command` nor `args`.
pub fn default_cmd(image: &str) -> Option<Vec<String>> {
    let name = image.strip_prefix("docker.io/library/").unwrap_or(image);
    let cmd = if matches(name, "python") {
        "python3"
    } else if matches(name, "busybox") {
        "sh"
    } else if matches(name, "alpine") {
        "/bin/sh"
    } else {
        return None;
    };
    Some(vec![cmd.to_string()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_maps_parse() {
        assert_eq!(
            parse_image_map("ghcr.io/zeroscale/zeroscale=/src/target/debug/zeroscale:/zeroscale")
                .unwrap(),
            ImageMap {
                prefix: "ghcr.io/zeroscale/zeroscale".into(),
                host: "/src/target/debug/zeroscale".into(),
                image_path: "/zeroscale".into()
            }
        );
        assert_eq!(
            parse_image_map("zeroscale=/bin/zeroscale")
                .unwrap()
                .image_path,
            "/zeroscale"
        );
        assert!(parse_image_map("nohost").is_err());
        assert!(parse_image_map("x=relative/bin").is_err());
    }

    #[test]
    fn resolution_by_prefix_at_boundaries() {
        let images = Images {
            maps: vec![
                parse_image_map("ghcr.io/zeroscale/zeroscale=/b/zeroscale:/zeroscale").unwrap(),
            ],
            available: DEFAULT_AVAILABLE.iter().map(|s| s.to_string()).collect(),
        };
        assert!(matches!(
            images.resolve("ghcr.io/zeroscale/zeroscale:v1"),
            Resolved::Entrypoint { .. }
        ));
        assert!(matches!(
            images.resolve("ghcr.io/zeroscale/zeroscale"),
            Resolved::Entrypoint { .. }
        ));
        assert_eq!(
            images.resolve("ghcr.io/zeroscale/zeroscale-other:v1"),
            Resolved::Unavailable
        );
        assert_eq!(images.resolve("python:3.12-alpine"), Resolved::Present);
        assert_eq!(
            images.resolve("docker.io/library/python:3.12"),
            Resolved::Present
        );
        assert_eq!(images.resolve("busybox"), Resolved::Present);
        assert_eq!(images.resolve("busybox:1.36"), Resolved::Present);
        assert_eq!(images.resolve("busyboxx"), Resolved::Unavailable);
        assert_eq!(images.resolve("nginx:1.27"), Resolved::Unavailable);
    }
}
