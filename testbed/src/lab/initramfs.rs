//! The guest's initramfs: busybox, the kernel modules and the boot scripts,
//! written as an uncompressed cpio "newc" archive (the kernel takes it as is;
//! skipping gzip saves decompression time under TCG and a dependency).
//!
//! `/init` loads the modules, reads its per-guest settings from the kernel
//! command line (`lab.wd=`, `lab.softdog=`), mounts the host's root read-only
//! over 9p with a tmpfs overlay, and switches root into it, where busybox
//! `init` (PID 1, reaps orphans) runs the control shell on ttyS1.

use super::kernel::{FileLock, Kernel};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Modules every guest loads (the watchdog drivers are loaded on request).
const BASE_ROOTS: &[&str] = &["virtio_pci", "virtio_net", "9pnet_virtio", "9p", "overlay"];
/// Watchdog drivers the guest can be asked to load (`lab.wd=`).
pub(crate) const WATCHDOG_MODULES: &[&str] = &["i6300esb", "softdog"];

const INIT: &str = r#"#!/bin/busybox sh
# leasedog lab guest: stage 1 (initramfs).
/bin/busybox mkdir -p /proc /sys /dev /host /rw /newroot /sbin /usr/bin /usr/sbin
/bin/busybox --install -s /bin
export PATH=/bin
log() { echo "lab-init: $*"; }
fail() { echo "lab-init: FATAL: $*"; sleep 1; poweroff -f; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/lab/base-modules); do
  insmod /lib/modules/$m.ko || fail "insmod $m"
done
# lab.wd=MOD,MOD: watchdog drivers in load order; lab.MOD=P=V,P=V: their
# module parameters.
WD=""
for a in $(cat /proc/cmdline); do
  case "$a" in
    lab.wd=*) WD="${a#lab.wd=}" ;;
  esac
done
for w in $(echo "$WD" | tr , ' '); do
  args=""
  for a in $(cat /proc/cmdline); do
    case "$a" in
      lab.$w=*) args=$(echo "${a#lab.$w=}" | tr , ' ') ;;
    esac
  done
  insmod /lib/modules/$w.ko $args || fail "insmod $w $args"
done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
[ -e /sys/class/net/eth0 ] || fail "no eth0"
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 host /host || fail "mount 9p host"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /newroot || fail "mount overlay"
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
mkdir -p /newroot/run/lab
cp /bin/busybox /etc/lab/ctl /newroot/run/lab/
cp /etc/lab/inittab /newroot/etc/inittab
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
log "root ready at $(cut -d' ' -f1 /newroot/proc/uptime)"
exec switch_root /newroot /run/lab/busybox init
"#;

const INITTAB: &str = "\
::sysinit:/run/lab/busybox hostname lab
ttyS1::respawn:/run/lab/busybox sh /run/lab/ctl
";

/// The control shell on ttyS1. A request is one line `ID TIMEOUT BASE64`,
/// the command script in base64; the reply one line
/// `<<LD-OUT ID RC UPTIME BASE64>>`, the exit status, the guest's
/// /proc/uptime just after the command and its output (stdout+stderr).
/// Raw mode: no echo, no line-length limit, no CR/LF translation.
const CTL: &str = r#"B=/run/lab/busybox
$B stty raw -echo
cd /
echo "<<LD-READY $($B cut -d' ' -f1 /proc/uptime)>>"
while IFS=' ' read -r id t b64; do
  [ -n "$id" ] || continue
  echo "$b64" | $B base64 -d > /run/lab/cmd
  $B timeout -s KILL "$t" $B sh /run/lab/cmd </dev/null >/run/lab/out 2>&1
  rc=$?
  up=$($B cut -d' ' -f1 /proc/uptime)
  echo "<<LD-OUT $id $rc $up $($B base64 -w0 /run/lab/out)>>"
done
"#;

/// Appends cpio newc entries.
struct Newc {
    buf: Vec<u8>,
    ino: u32,
}

impl Newc {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[], (0, 0));
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100000 | mode, data, (0, 0));
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.buf
    }
}

/// The archive's bytes.
pub fn build(kernel: &Kernel, busybox: &Path) -> Result<Vec<u8>, String> {
    let bb = fs::read(busybox).map_err(|e| {
        format!(
            "cannot read {} (install busybox-static): {e}",
            busybox.display()
        )
    })?;
    let mut roots: Vec<&str> = BASE_ROOTS.to_vec();
    // The watchdog drivers' own dependencies (the watchdog core) are base.
    let wd_order = kernel.load_order(WATCHDOG_MODULES)?;
    let base_extra: Vec<&str> = wd_order
        .iter()
        .map(String::as_str)
        .filter(|m| !WATCHDOG_MODULES.contains(m))
        .collect();
    roots.extend(base_extra);
    let base = kernel.load_order(&roots)?;

    let mut a = Newc {
        buf: Vec::with_capacity(bb.len() + (4 << 20)),
        ino: 0,
    };
    for d in ["bin", "dev", "etc", "etc/lab", "lib", "lib/modules"] {
        a.dir(d);
    }
    // Without /dev/console the kernel starts /init with no stdio.
    a.entry("dev/console", 0o020600, &[], (5, 1));
    a.file("bin/busybox", 0o755, &bb);
    a.file("init", 0o755, INIT.as_bytes());
    a.file("etc/lab/ctl", 0o755, CTL.as_bytes());
    a.file("etc/lab/inittab", 0o644, INITTAB.as_bytes());
    a.file(
        "etc/lab/base-modules",
        0o644,
        (base.join("\n") + "\n").as_bytes(),
    );
    let mut all = base.clone();
    all.extend(WATCHDOG_MODULES.iter().map(|s| s.to_string()));
    for m in all {
        let p = kernel.module_path(&m);
        let bytes = fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        a.file(&format!("lib/modules/{m}.ko"), 0o644, &bytes);
    }
    Ok(a.finish())
}

/// The archive for `kernel`, written once into the kernel's cache folder
/// (keyed by a hash of its bytes, written atomically) and reused.
pub fn get(kernel: &'static Kernel) -> Result<&'static Path, String> {
    static P: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    P.get_or_init(|| {
        let bytes = build(kernel, Path::new("/bin/busybox"))?;
        let name = format!("initramfs-{:016x}.cpio", fnv1a(&bytes));
        let path = kernel.dir.join(&name);
        let _lock = FileLock::acquire(&kernel.dir.join("initramfs.lock"))?;
        if !fs::metadata(&path).is_ok_and(|m| m.len() as usize == bytes.len()) {
            let tmp = kernel.dir.join(format!(".{name}.{}", std::process::id()));
            fs::write(&tmp, &bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
            fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(path)
    })
    .as_ref()
    .map(PathBuf::as_path)
    .map_err(|e| e.clone())
}

fn fnv1a(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &x in b {
        h ^= x as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_entries_are_aligned_and_terminated() {
        let mut a = Newc {
            buf: Vec::new(),
            ino: 0,
        };
        a.file("init", 0o755, b"abc");
        let b = a.finish();
        assert_eq!(&b[..6], b"070701");
        assert_eq!(b.len() % 4, 0);
        // 110-byte header + "init\0" padded to 116, then 3 data bytes + pad.
        assert_eq!(&b[110..115], b"init\0");
        assert_eq!(&b[116..119], b"abc");
        assert!(b.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
