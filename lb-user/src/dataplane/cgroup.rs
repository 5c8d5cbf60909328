//! cgroup v2 handling for `sock_ops`: find the cgroup2 mount (never hard-coded:
//! `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones),
//! resolve agentlb's cgroup, create and join a child, and undo all of it on exit.

use std::{
    fs,
    io::{self, BufRead},
    path::{Path, PathBuf},
};

use thiserror::Error;

/// cgroup errors.
#[derive(Debug, Error)]
pub enum CgroupError {
    /// No cgroup2 filesystem is mounted.
    #[error("no cgroup v2 filesystem is mounted (see /proc/self/mountinfo)")]
    NoCgroup2,
    /// This process is not in the cgroup v2 hierarchy.
    #[error("cannot find this process's cgroup v2 path in /proc/self/cgroup")]
    NoOwnCgroup,
    /// Refusing to attach programs to the root cgroup.
    #[error("refusing to attach to the root cgroup {0}; configure kernel.cgroup")]
    RootCgroup(PathBuf),
    /// An I/O step failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// Which step.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The mount point of the cgroup2 filesystem, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let f = fs::File::open("/proc/self/mountinfo")
        .map_err(io_err("reading", Path::new("/proc/self/mountinfo")))?;
    for line in io::BufReader::new(f).lines().map_while(Result::ok) {
        // id parent maj:min root mountpoint opts [optional...] - fstype source superopts
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2")
            && let Some(mp) = left.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(unescape_mount(mp)));
        }
    }
    Err(CgroupError::NoCgroup2)
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// This process's cgroup v2 path relative to the hierarchy root (`0::/path`).
pub fn own_cgroup() -> Result<PathBuf, CgroupError> {
    let text = fs::read_to_string("/proc/self/cgroup")
        .map_err(io_err("reading", Path::new("/proc/self/cgroup")))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| PathBuf::from(p.trim_start_matches('/')))
        .ok_or(CgroupError::NoOwnCgroup)
}

/// Resolves the configured cgroup (absolute under the mount, or relative to it;
/// `None` = `<own cgroup>/agentlb`) to an absolute path.
pub fn resolve(configured: Option<&Path>) -> Result<PathBuf, CgroupError> {
    let mount = cgroup2_mount()?;
    let path = match configured {
        Some(p) if p.starts_with(&mount) => p.to_owned(),
        Some(p) => mount.join(p.strip_prefix("/").unwrap_or(p)),
        None => mount.join(own_cgroup()?).join("agentlb"),
    };
    if path == mount {
        return Err(CgroupError::RootCgroup(path));
    }
    Ok(path)
}

/// A cgroup agentlb attaches to (and possibly created and joined). [`Self::release`]
/// undoes what was done.
#[derive(Debug)]
pub struct CgroupGuard {
    /// Absolute path of the cgroup.
    pub path: PathBuf,
    /// Whether agentlb created it (and so removes it).
    pub created: bool,
    /// The cgroup agentlb was in before joining, if it joined.
    pub joined_from: Option<PathBuf>,
    released: bool,
}

impl CgroupGuard {
    /// Creates `path` if needed and, with `join`, moves this process into it.
    pub fn setup(path: PathBuf, join: bool) -> Result<Self, CgroupError> {
        let mut created = false;
        if !path.exists() {
            fs::create_dir(&path).map_err(io_err("creating cgroup", &path))?;
            created = true;
        }
        let mut guard = Self {
            path,
            created,
            joined_from: None,
            released: false,
        };
        if join {
            let from = cgroup2_mount()?.join(own_cgroup()?);
            move_self(&guard.path)?;
            guard.joined_from = Some(from);
        }
        Ok(guard)
    }

    /// Moves back to the original cgroup and removes the one agentlb created.
    pub fn release(&mut self) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        if let Some(from) = self.joined_from.take()
            && let Err(e) = move_self(&from)
        {
            tracing::warn!(error = %e, "could not move back to the original cgroup");
        }
        if self.created {
            match fs::remove_dir(&self.path) {
                Ok(()) => tracing::info!(cgroup = %self.path.display(), "removed agentlb cgroup"),
                Err(e) => {
                    tracing::warn!(cgroup = %self.path.display(), error = %e, "could not remove agentlb cgroup")
                }
            }
        }
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        self.release();
    }
}

/// Moves the whole process (all threads) into `cgroup`.
fn move_self(cgroup: &Path) -> Result<(), CgroupError> {
    let procs = cgroup.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string()).map_err(io_err("joining cgroup", &procs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo() {
        assert_eq!(unescape_mount("/a\\040b"), "/a b");
    }

    #[test]
    fn finds_a_cgroup2_mount_on_linux() {
        // Every supported host has cgroup v2 (unified or hybrid).
        let m = cgroup2_mount().expect("cgroup2 mount");
        assert!(m.is_absolute());
        assert!(own_cgroup().is_ok());
    }
}
