//! Pinned maps: the bpffs directory, the ABI check before adopting existing pins,
//! and removal (`agentlb unpin`).
//!
//! aya adopts a pin of the same name without checking its shape, so before loading
//! we open every existing pin ourselves, compare its key/value sizes and capacity
//! with `lb-common`, and read the ABI version from `ALB_META`. Pins of another ABI
//! are refused, never silently reused.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::maps::{Array, Map, MapData, MapInfo};
use lb_common::{ABI_MAGIC, ABI_VERSION, AbiMeta, MAP_LAYOUT, MAP_META, PINNED_MAPS};
use thiserror::Error;

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Pin problems.
#[derive(Debug, Error)]
pub enum PinError {
    /// The pin directory is not on a bpffs mount.
    #[error("{0} is not on a bpf filesystem (mount bpffs at /sys/fs/bpf)")]
    NotBpffs(PathBuf),
    /// Pins exist but were written by another ABI.
    #[error(
        "pinned maps in {dir} have ABI {found} (this agentlb uses {ABI_VERSION}); refusing to adopt them. Remove them with `agentlb unpin --pin-dir {dir}` after draining the old version"
    )]
    AbiMismatch {
        /// Pin directory.
        dir: String,
        /// What the pins say.
        found: String,
    },
    /// A pinned map's shape differs from this build's.
    #[error(
        "pinned map {path} has key/value/max {found:?}, expected {expected:?}; refusing to adopt it (`agentlb unpin`)"
    )]
    Layout {
        /// The pin.
        path: PathBuf,
        /// Found sizes.
        found: (u32, u32, u32),
        /// Expected sizes.
        expected: (u32, u32, u32),
    },
    /// I/O or bpf syscall failure.
    #[error("{what} {path}: {message}")]
    Io {
        /// Step.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Error text.
        message: String,
    },
}

/// The conventional bpffs mount point.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Ensures `dir` exists on a bpffs mount. When `dir` is under `/sys/fs/bpf` and
/// nothing is mounted there (hosts without systemd), mounts bpffs first if
/// `mount_bpffs` allows it — as systemd does at boot.
pub fn prepare_dir(dir: &Path, mount_bpffs: bool) -> Result<(), PinError> {
    let parent = dir.parent().unwrap_or(dir);
    let root = Path::new(BPFFS_ROOT);
    if parent.exists() && !is_bpffs(parent)? {
        if mount_bpffs && parent.starts_with(root) && !is_bpffs(root)? {
            mount_bpffs_at(root)?;
            tracing::info!(path = BPFFS_ROOT, "mounted bpffs");
        }
        if !is_bpffs(parent)? {
            return Err(PinError::NotBpffs(parent.to_owned()));
        }
    }
    fs::create_dir_all(dir).map_err(|e| PinError::Io {
        what: "creating pin directory",
        path: dir.to_owned(),
        message: e.to_string(),
    })
}

fn mount_bpffs_at(root: &Path) -> Result<(), PinError> {
    let err = |message: String| PinError::Io {
        what: "mounting bpffs at",
        path: root.to_owned(),
        message,
    };
    fs::create_dir_all(root).map_err(|e| err(e.to_string()))?;
    let target = std::ffi::CString::new(BPFFS_ROOT).map_err(|e| err(e.to_string()))?;
    // SAFETY: all pointers are valid NUL-terminated strings for the call's duration.
    let rc = unsafe {
        libc::mount(
            c"bpffs".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error().to_string()));
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> Result<bool, PinError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| PinError::Io {
        what: "statfs",
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-param.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(PinError::Io {
            what: "statfs",
            path: path.to_owned(),
            message: io::Error::last_os_error().to_string(),
        });
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Checks existing pins in `dir`. Returns `true` if pins exist (and were checked),
/// `false` if the directory holds none of our pins.
pub fn check_existing(dir: &Path) -> Result<bool, PinError> {
    let mut any = false;
    for name in PINNED_MAPS {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        any = true;
        let info = MapInfo::from_pin(&path).map_err(|e| PinError::Io {
            what: "opening pinned map",
            path: path.clone(),
            message: e.to_string(),
        })?;
        let found = (info.key_size(), info.value_size(), info.max_entries());
        if let Some(&(_, k, v, m)) = MAP_LAYOUT.iter().find(|(n, ..)| *n == name)
            && found != (k, v, m)
        {
            return Err(PinError::Layout {
                path,
                found,
                expected: (k, v, m),
            });
        }
    }
    if !any {
        return Ok(false);
    }
    let meta_path = dir.join(MAP_META);
    let meta = read_meta(&meta_path)?;
    match meta {
        Some(m) if m.magic == ABI_MAGIC && m.abi_version == ABI_VERSION => Ok(true),
        Some(m) if m.magic == ABI_MAGIC => Err(PinError::AbiMismatch {
            dir: dir.display().to_string(),
            found: m.abi_version.to_string(),
        }),
        Some(_) => Err(PinError::AbiMismatch {
            dir: dir.display().to_string(),
            found: "unknown (no agentlb magic)".into(),
        }),
        None => Err(PinError::AbiMismatch {
            dir: dir.display().to_string(),
            found: "missing (no ALB_META pin)".into(),
        }),
    }
}

/// Reads `ALB_META[0]` from a pin, `None` if the pin does not exist.
fn read_meta(path: &Path) -> Result<Option<AbiMeta>, PinError> {
    if !path.exists() {
        return Ok(None);
    }
    let err = |e: String| PinError::Io {
        what: "reading",
        path: path.to_owned(),
        message: e,
    };
    let data = MapData::from_pin(path).map_err(|e| err(e.to_string()))?;
    let arr: Array<MapData, AbiMeta> =
        Array::try_from(Map::Array(data)).map_err(|e| err(e.to_string()))?;
    arr.get(&0, 0).map(Some).map_err(|e| err(e.to_string()))
}

/// Removes agentlb's pins from `dir` (and `dir` itself if it is then empty).
/// Returns the removed paths.
pub fn unpin(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for name in PINNED_MAPS {
        let p = dir.join(name);
        match fs::remove_file(&p) {
            Ok(()) => removed.push(p),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if dir.exists() && fs::read_dir(dir)?.next().is_none() {
        fs::remove_dir(dir)?;
    }
    Ok(removed)
}
