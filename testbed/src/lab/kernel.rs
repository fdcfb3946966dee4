//! Debian's own kernel and the few modules a lab guest needs, fetched with
//! `apt-get download` and kept in a cache folder across runs.
//!
//! Cache layout (`<cache>/kernel-<release>-v<LAYOUT>/`): `vmlinuz`,
//! `release` (uname -r), `package`, and `modules/<name>.ko` (decompressed)
//! with `modules/deps` (one line per module: `name dep1,dep2`). Only the
//! dependency closure of [`KEEP`] is kept (a few MB, not the package's 400).
//! Builds happen in a private temporary folder renamed into place, under an
//! exclusive `flock` on `<cache>/kernel.lock`, so concurrent test processes
//! neither collide nor download twice.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Bump when the cache layout or [`KEEP`] changes, so old caches are rebuilt.
const LAYOUT: u32 = 2;

/// Modules the guests may load; their dependencies are kept too.
pub const KEEP: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "9pnet_virtio",
    "9p",
    "overlay",
    "i6300esb",
    "softdog",
];

/// A cached kernel with its modules.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub dir: PathBuf,
    pub vmlinuz: PathBuf,
    /// What QEMU's `-kernel` gets: the uncompressed `vmlinux` (PVH boot) if
    /// it could be extracted, else `vmlinuz`.
    pub boot_image: PathBuf,
    /// `uname -r` of the kernel, e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// Module name -> dependencies (module names, `-` normalised to `_`).
    pub deps: BTreeMap<String, Vec<String>>,
    /// How long [`Kernel::get`] took the first time in this process, and
    /// whether it had to download (cold) or found the cache (warm).
    pub fetch_time: Duration,
    pub fetched_cold: bool,
}

impl Kernel {
    /// The cached kernel, fetched on first use. Once per process; the result
    /// (also an error) is shared by all tests of the process.
    pub fn get() -> Result<&'static Kernel, String> {
        static K: OnceLock<Result<Kernel, String>> = OnceLock::new();
        K.get_or_init(|| fetch(&cache_root()))
            .as_ref()
            .map_err(|e| e.clone())
    }

    pub fn module_path(&self, name: &str) -> PathBuf {
        self.dir.join("modules").join(format!("{name}.ko"))
    }

    /// `roots` and everything they depend on, dependencies first.
    pub fn load_order(&self, roots: &[&str]) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for r in roots {
            self.visit(r, &mut seen, &mut out, 0)?;
        }
        Ok(out)
    }

    fn visit(
        &self,
        m: &str,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<String>,
        depth: usize,
    ) -> Result<(), String> {
        if seen.contains(m) {
            return Ok(());
        }
        if depth > 64 {
            return Err(format!("module dependency loop at {m}"));
        }
        let deps = self.deps.get(m).ok_or_else(|| {
            format!(
                "module {m} is not in the lab kernel cache {} (add it to kernel::KEEP and bump LAYOUT)",
                self.dir.display()
            )
        })?;
        for d in deps {
            self.visit(d, seen, out, depth + 1)?;
        }
        seen.insert(m.to_string());
        out.push(m.to_string());
        Ok(())
    }
}

/// `$LEASEDOG_LAB_CACHE`, else `<workspace>/.lab-cache`.
pub fn cache_root() -> PathBuf {
    match std::env::var_os("LEASEDOG_LAB_CACHE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("testbed has a parent folder")
            .join(".lab-cache"),
    }
}

/// Holds an exclusive flock until dropped.
pub(crate) struct FileLock(fs::File);

impl FileLock {
    pub(crate) fn acquire(path: &Path) -> Result<FileLock, String> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| format!("cannot open lock file {}: {e}", path.display()))?;
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!(
                "flock {}: {}",
                path.display(),
                io::Error::last_os_error()
            ));
        }
        Ok(FileLock(f))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: plain syscall on an fd we own.
        unsafe {
            libc::flock(self.0.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{what}: cannot run {:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The versioned package `linux-image-amd64` depends on, from the local apt
/// lists (no network).
fn resolve_package() -> Result<String, String> {
    let out = run(
        Command::new("apt-cache").args(["depends", "linux-image-amd64"]),
        "apt-cache depends linux-image-amd64",
    )?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .map(str::to_string)
        .ok_or_else(|| format!("linux-image-amd64 has no linux-image-*-amd64 dependency: {out}"))
}

fn cached_dirs(root: &Path) -> Vec<PathBuf> {
    let suffix = format!("-v{LAYOUT}");
    let mut v: Vec<PathBuf> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with("kernel-") && n.ends_with(&suffix) && p.join("complete").exists()
        })
        .collect();
    v.sort();
    v
}

fn fetch(root: &Path) -> Result<Kernel, String> {
    let started = Instant::now();
    fs::create_dir_all(root)
        .map_err(|e| format!("cannot create lab cache {}: {e}", root.display()))?;
    let _lock = FileLock::acquire(&root.join("kernel.lock"))?;
    // Builds only run under the lock: any build folder seen now is left over
    // from a killed process.
    for p in fs::read_dir(root).into_iter().flatten().flatten() {
        if p.file_name().to_string_lossy().starts_with(".build-") {
            let _ = fs::remove_dir_all(p.path());
        }
    }

    let (dir, cold) = match resolve_package() {
        Ok(pkg) => {
            let release = pkg.trim_start_matches("linux-image-").to_string();
            let dir = root.join(format!("kernel-{release}-v{LAYOUT}"));
            if dir.join("complete").exists() {
                (dir, false)
            } else {
                match build(root, &pkg, &dir) {
                    Ok(()) => (dir, true),
                    // Offline with a newer package listed: use the cache.
                    Err(e) => match cached_dirs(root).pop() {
                        Some(d) => {
                            eprintln!("lab: {e}; using the cached {}", d.display());
                            (d, false)
                        }
                        None => return Err(e),
                    },
                }
            }
        }
        // apt lists unusable: fall back on whatever is cached.
        Err(e) => match cached_dirs(root).pop() {
            Some(d) => (d, false),
            None => return Err(format!("no cached lab kernel and {e}")),
        },
    };
    load(&dir, started.elapsed(), cold)
}

fn load(dir: &Path, fetch_time: Duration, fetched_cold: bool) -> Result<Kernel, String> {
    let read = |n: &str| {
        fs::read_to_string(dir.join(n))
            .map_err(|e| format!("lab kernel cache {}: {n}: {e}", dir.display()))
    };
    let release = read("release")?.trim().to_string();
    let mut deps = BTreeMap::new();
    for line in read("modules/deps")?.lines() {
        let mut it = line.split_whitespace();
        if let Some(name) = it.next() {
            let d = it
                .next()
                .map(|s| {
                    s.split(',')
                        .filter(|x| !x.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            deps.insert(name.to_string(), d);
        }
    }
    Ok(Kernel {
        dir: dir.to_path_buf(),
        vmlinuz: dir.join("vmlinuz"),
        boot_image: if dir.join("vmlinux").exists() {
            dir.join("vmlinux")
        } else {
            dir.join("vmlinuz")
        },
        release,
        deps,
        fetch_time,
        fetched_cold,
    })
}

/// Downloads `pkg`, unpacks it, and writes the trimmed cache into `dest`.
fn build(root: &Path, pkg: &str, dest: &Path) -> Result<(), String> {
    let tmp = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(root)
        .map_err(|e| format!("cannot create a temp folder in {}: {e}", root.display()))?;
    let dl = tmp.path().join("dl");
    fs::create_dir(&dl).map_err(|e| e.to_string())?;
    run(
        Command::new("apt-get")
            .args(["download", "-q", pkg])
            .current_dir(&dl),
        &format!("apt-get download {pkg}"),
    )?;
    let deb = fs::read_dir(&dl)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| format!("apt-get download {pkg} left no .deb in {}", dl.display()))?;
    let x = tmp.path().join("x");
    run(
        Command::new("dpkg").arg("-x").arg(&deb).arg(&x),
        &format!("dpkg -x {}", deb.display()),
    )?;

    let out = tmp.path().join("out");
    let mods_out = out.join("modules");
    fs::create_dir_all(&mods_out).map_err(|e| e.to_string())?;
    let vmlinuz = fs::read_dir(x.join("boot"))
        .map_err(|e| format!("{pkg} has no /boot: {e}"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vmlinuz-")
        })
        .ok_or_else(|| format!("{pkg} has no boot/vmlinuz-*"))?;
    let release = vmlinuz.file_name().unwrap().to_string_lossy()["vmlinuz-".len()..].to_string();
    fs::copy(&vmlinuz, out.join("vmlinuz")).map_err(|e| e.to_string())?;
    // Optional: an uncompressed ELF boots by PVH, skipping the in-guest
    // decompression that costs ~6 s under TCG.
    if let Err(e) = extract_vmlinux(&vmlinuz, &out.join("vmlinux")) {
        eprintln!("lab: booting the compressed kernel: {e}");
        let _ = fs::remove_file(out.join("vmlinux"));
    }

    // Index every module file by name; read dependencies on demand.
    let mod_root = x.join("lib/modules").join(&release).join("kernel");
    let mut index = BTreeMap::new();
    index_modules(&mod_root, &mut index)
        .map_err(|e| format!("cannot walk {}: {e}", mod_root.display()))?;
    let mut deps_lines = String::new();
    let mut todo: Vec<String> = KEEP.iter().map(|s| s.to_string()).collect();
    let mut done = BTreeSet::new();
    while let Some(m) = todo.pop() {
        if !done.insert(m.clone()) {
            continue;
        }
        let src = index
            .get(&m)
            .ok_or_else(|| format!("module {m} not found in {pkg}"))?;
        let bytes = read_module(src)?;
        let deps = modinfo_depends(&bytes);
        fs::write(mods_out.join(format!("{m}.ko")), &bytes).map_err(|e| e.to_string())?;
        deps_lines.push_str(&format!("{m} {}\n", deps.join(",")));
        todo.extend(deps);
    }
    fs::write(mods_out.join("deps"), deps_lines).map_err(|e| e.to_string())?;
    fs::write(out.join("release"), format!("{release}\n")).map_err(|e| e.to_string())?;
    fs::write(out.join("package"), format!("{pkg}\n")).map_err(|e| e.to_string())?;
    fs::write(out.join("complete"), "").map_err(|e| e.to_string())?;
    fs::rename(&out, dest)
        .map_err(|e| format!("cannot move {} to {}: {e}", out.display(), dest.display()))?;
    Ok(())
}

/// Finds the compressed payload inside a bzImage and decompresses it.
fn extract_vmlinux(bzimage: &Path, dest: &Path) -> Result<(), String> {
    let img = fs::read(bzimage).map_err(|e| e.to_string())?;
    let formats: &[(&[u8], &str, &[&str])] = &[
        (b"\xfd7zXZ\x00", "xz", &["-dc", "--single-stream"]),
        (b"\x28\xb5\x2f\xfd", "zstd", &["-dc"]),
        (b"\x1f\x8b\x08", "gzip", &["-dc"]),
    ];
    for (magic, tool, args) in formats {
        let Some(i) = img.windows(magic.len()).position(|w| w == *magic) else {
            continue;
        };
        let mut child = Command::new(tool)
            .args(*args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run {tool}: {e}"))?;
        let mut stdin = child.stdin.take().unwrap();
        let payload = img[i..].to_vec();
        // Trailing bytes after the stream make gzip/zstd complain: ignore
        // the exit status, check the result instead.
        let feeder = std::thread::spawn(move || {
            let _ = io::Write::write_all(&mut stdin, &payload);
        });
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        let _ = feeder.join();
        if out.stdout.starts_with(b"\x7fELF") {
            return fs::write(dest, &out.stdout).map_err(|e| e.to_string());
        }
    }
    Err(format!("no ELF kernel found inside {}", bzimage.display()))
}

fn index_modules(dir: &Path, index: &mut BTreeMap<String, PathBuf>) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let p = e.path();
        if e.file_type()?.is_dir() {
            index_modules(&p, index)?;
            continue;
        }
        let n = e.file_name().to_string_lossy().into_owned();
        if let Some(i) = n.find(".ko") {
            index.insert(n[..i].replace('-', "_"), p);
        }
    }
    Ok(())
}

/// A module's bytes, decompressed if the distribution compresses modules
/// (busybox insmod cannot read `.ko.xz`/`.ko.zst`).
fn read_module(p: &Path) -> Result<Vec<u8>, String> {
    let n = p.to_string_lossy();
    let tool = if n.ends_with(".ko") {
        return fs::read(p).map_err(|e| format!("{n}: {e}"));
    } else if n.ends_with(".ko.xz") {
        "xz"
    } else if n.ends_with(".ko.zst") {
        "zstd"
    } else if n.ends_with(".ko.gz") {
        "gzip"
    } else {
        return Err(format!("unknown module compression: {n}"));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(p)
        .output()
        .map_err(|e| format!("cannot run {tool} to decompress {n}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{tool} -dc {n} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out.stdout)
}

/// The `depends=` entry of a module's `.modinfo` section (NUL-separated
/// `key=value` strings), as normalised module names.
pub(crate) fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(i) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[i + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_parsed_from_modinfo() {
        let ko = b"junk\0license=GPL\0depends=virtio,virtio_ring\0name=x\0";
        assert_eq!(modinfo_depends(ko), vec!["virtio", "virtio_ring"]);
        let none = b"\0depends=\0name=y\0";
        assert!(modinfo_depends(none).is_empty());
    }
}
