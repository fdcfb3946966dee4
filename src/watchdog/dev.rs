//! The Linux watchdog character-device API (linux/watchdog.h) over ioctls.
//!
//! Request numbers are computed with nix's `request_code_*` macros from the
//! header's declarations. Note the header's quirks, kept here on purpose:
//! WDIOC_SETOPTIONS and WDIOC_KEEPALIVE are declared `_IOR` although they pass
//! data in; declaring them `_IOW` would give numbers no driver answers to.

use super::flags::{BootStatus, WdFlags};
use nix::sys::ioctl::ioctl_num_type;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

const W: u8 = b'W';
const INT: usize = std::mem::size_of::<libc::c_int>();

/// `struct watchdog_info` of linux/watchdog.h (40 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct WatchdogInfoRaw {
    pub options: u32,
    pub firmware_version: u32,
    pub identity: [u8; 32],
}

pub const WDIOC_GETSUPPORT: ioctl_num_type =
    nix::request_code_read!(W, 0, std::mem::size_of::<WatchdogInfoRaw>()) as ioctl_num_type;
pub const WDIOC_GETSTATUS: ioctl_num_type = nix::request_code_read!(W, 1, INT) as ioctl_num_type;
pub const WDIOC_GETBOOTSTATUS: ioctl_num_type =
    nix::request_code_read!(W, 2, INT) as ioctl_num_type;
/// `_IOR` in the kernel header although it writes: keep it so.
pub const WDIOC_SETOPTIONS: ioctl_num_type = nix::request_code_read!(W, 4, INT) as ioctl_num_type;
/// `_IOR` in the kernel header although it takes no data: keep it so.
pub const WDIOC_KEEPALIVE: ioctl_num_type = nix::request_code_read!(W, 5, INT) as ioctl_num_type;
pub const WDIOC_SETTIMEOUT: ioctl_num_type =
    nix::request_code_readwrite!(W, 6, INT) as ioctl_num_type;
pub const WDIOC_GETTIMEOUT: ioctl_num_type = nix::request_code_read!(W, 7, INT) as ioctl_num_type;
pub const WDIOC_GETTIMELEFT: ioctl_num_type = nix::request_code_read!(W, 10, INT) as ioctl_num_type;

mod raw {
    use super::*;
    nix::ioctl_read_bad!(getsupport, WDIOC_GETSUPPORT, WatchdogInfoRaw);
    nix::ioctl_read_bad!(getstatus, WDIOC_GETSTATUS, libc::c_int);
    nix::ioctl_read_bad!(getbootstatus, WDIOC_GETBOOTSTATUS, libc::c_int);
    nix::ioctl_read_bad!(setoptions, WDIOC_SETOPTIONS, libc::c_int);
    nix::ioctl_read_bad!(keepalive, WDIOC_KEEPALIVE, libc::c_int);
    nix::ioctl_readwrite_bad!(settimeout, WDIOC_SETTIMEOUT, libc::c_int);
    nix::ioctl_read_bad!(gettimeout, WDIOC_GETTIMEOUT, libc::c_int);
    nix::ioctl_read_bad!(gettimeleft, WDIOC_GETTIMELEFT, libc::c_int);
}

/// What WDIOC_GETSUPPORT says about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Support {
    pub options: WdFlags,
    pub firmware_version: u32,
    pub identity: String,
}

/// An open watchdog device. Opening it started its timer.
///
/// Dropping it closes the descriptor WITHOUT the magic character, which leaves
/// the timer running: the node resets `W` after the last ping. Only
/// [`DeviceFile::magic_close`] stops it (and not even that with `nowayout`).
#[derive(Debug)]
pub struct DeviceFile {
    file: File,
}

fn int_ioctl(
    what: &'static str,
    f: unsafe fn(libc::c_int, *mut libc::c_int) -> nix::Result<libc::c_int>,
    fd: libc::c_int,
    arg: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut v = arg;
    // SAFETY: `v` is a valid c_int the kernel may read and write; fd is open.
    unsafe { f(fd, &mut v) }
        .map(|_| v)
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("{what}: {e}")))
}

impl DeviceFile {
    /// Opens `path` write-only, close-on-exec. This ARMS a real device.
    pub fn open(path: &Path) -> io::Result<DeviceFile> {
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        Ok(DeviceFile { file })
    }

    fn fd(&self) -> libc::c_int {
        self.file.as_raw_fd()
    }

    pub fn get_support(&self) -> io::Result<Support> {
        let mut info = WatchdogInfoRaw {
            options: 0,
            firmware_version: 0,
            identity: [0; 32],
        };
        // SAFETY: `info` is a writable watchdog_info; fd is open.
        unsafe { raw::getsupport(self.fd(), &mut info) }.map_err(|e| {
            io::Error::new(io::Error::from(e).kind(), format!("WDIOC_GETSUPPORT: {e}"))
        })?;
        let end = info.identity.iter().position(|&b| b == 0).unwrap_or(32);
        Ok(Support {
            options: WdFlags(info.options),
            firmware_version: info.firmware_version,
            identity: String::from_utf8_lossy(&info.identity[..end]).into_owned(),
        })
    }

    /// Asks for `secs`; returns what the driver says it set (it may round).
    /// Read the value in force with [`DeviceFile::get_timeout`] all the same.
    pub fn set_timeout(&self, secs: u32) -> io::Result<u32> {
        let arg = libc::c_int::try_from(secs)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "timeout too large"))?;
        int_ioctl("WDIOC_SETTIMEOUT", raw::settimeout, self.fd(), arg).map(|v| v as u32)
    }

    pub fn get_timeout(&self) -> io::Result<u32> {
        int_ioctl("WDIOC_GETTIMEOUT", raw::gettimeout, self.fd(), 0).map(|v| v as u32)
    }

    pub fn get_timeleft(&self) -> io::Result<u32> {
        int_ioctl("WDIOC_GETTIMELEFT", raw::gettimeleft, self.fd(), 0).map(|v| v as u32)
    }

    pub fn get_bootstatus(&self) -> io::Result<BootStatus> {
        int_ioctl("WDIOC_GETBOOTSTATUS", raw::getbootstatus, self.fd(), 0)
            .map(|v| BootStatus::from_raw(v as u32))
    }

    pub fn get_status(&self) -> io::Result<WdFlags> {
        int_ioctl("WDIOC_GETSTATUS", raw::getstatus, self.fd(), 0).map(|v| WdFlags(v as u32))
    }

    /// WDIOC_SETOPTIONS with WDIOS_ENABLECARD / WDIOS_DISABLECARD.
    pub fn set_options(&self, opts: libc::c_int) -> io::Result<()> {
        int_ioctl("WDIOC_SETOPTIONS", raw::setoptions, self.fd(), opts).map(|_| ())
    }

    /// WDIOC_KEEPALIVE: a ping by ioctl (the write in [`DeviceFile::ping`] is
    /// the one every driver accepts).
    pub fn keepalive(&self) -> io::Result<()> {
        int_ioctl("WDIOC_KEEPALIVE", raw::keepalive, self.fd(), 0).map(|_| ())
    }

    /// Pings by writing one byte. The byte is not 'V', and the kernel clears
    /// any earlier 'V' on every write, so a ping also cancels a pending magic
    /// close.
    pub fn ping(&mut self) -> io::Result<()> {
        match self.file.write(b"\0")? {
            1 => Ok(()),
            n => Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("ping wrote {n} bytes"),
            )),
        }
    }

    /// Writes the magic 'V' and closes: the driver stops the timer, unless
    /// `nowayout` is set (then nothing stops it). The close result is not
    /// checked: the kernel's release hook cannot report failure through it.
    /// The descriptor, e.g. to hand a duplicate to systemd's fd store.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    pub fn magic_close(mut self) -> io::Result<()> {
        let r = self.file.write_all(b"V");
        drop(self.file);
        r.map_err(|e| io::Error::new(e.kind(), format!("writing the magic 'V': {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `_IOC(dir, type, nr, size)` of asm-generic/ioctl.h, written out here
    /// independently of nix: dir << 30 | size << 16 | type << 8 | nr.
    fn ioc(dir: u64, ty: u8, nr: u64, size: u64) -> u64 {
        (dir << 30) | (size << 16) | ((ty as u64) << 8) | nr
    }
    const IOC_WRITE: u64 = 1;
    const IOC_READ: u64 = 2;

    #[test]
    // ioctl_num_type is c_ulong on glibc but c_int on musl: the cast is needed there.
    #[allow(clippy::unnecessary_cast)]
    fn request_numbers_match_the_kernel_header() {
        let r = |nr, size| ioc(IOC_READ, b'W', nr, size);
        let rw = |nr, size| ioc(IOC_READ | IOC_WRITE, b'W', nr, size);
        assert_eq!(std::mem::size_of::<WatchdogInfoRaw>(), 40);
        let ours = [
            (WDIOC_GETSUPPORT, r(0, 40), 0x8028_5700u64),
            (WDIOC_GETSTATUS, r(1, 4), 0x8004_5701),
            (WDIOC_GETBOOTSTATUS, r(2, 4), 0x8004_5702),
            (WDIOC_SETOPTIONS, r(4, 4), 0x8004_5704),
            (WDIOC_KEEPALIVE, r(5, 4), 0x8004_5705),
            (WDIOC_SETTIMEOUT, rw(6, 4), 0xc004_5706),
            (WDIOC_GETTIMEOUT, r(7, 4), 0x8004_5707),
            (WDIOC_GETTIMELEFT, r(10, 4), 0x8004_570a),
        ];
        for (i, (got, formula, literal)) in ours.into_iter().enumerate() {
            assert_eq!(
                got as u64, formula,
                "entry {i}: {got:#x} vs formula {formula:#x}"
            );
            assert_eq!(got as u64, literal, "entry {i}: {got:#x} vs {literal:#x}");
        }
    }

    /// A regular file is not a watchdog: every ioctl must fail cleanly with
    /// ENOTTY, naming the request.
    #[test]
    fn ioctls_on_a_regular_file_fail_with_enotty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("not-a-watchdog");
        std::fs::write(&p, b"").unwrap();
        let mut d = DeviceFile::open(&p).unwrap();
        let enotty = |e: io::Error, what: &str| {
            assert!(e.to_string().contains(what), "{e}");
            assert!(e.to_string().contains("ENOTTY"), "{e}");
        };
        enotty(d.get_support().unwrap_err(), "WDIOC_GETSUPPORT");
        enotty(d.set_timeout(3).unwrap_err(), "WDIOC_SETTIMEOUT");
        enotty(d.get_timeout().unwrap_err(), "WDIOC_GETTIMEOUT");
        enotty(d.get_timeleft().unwrap_err(), "WDIOC_GETTIMELEFT");
        enotty(d.get_bootstatus().unwrap_err(), "WDIOC_GETBOOTSTATUS");
        enotty(d.get_status().unwrap_err(), "WDIOC_GETSTATUS");
        enotty(
            d.set_options(crate::watchdog::flags::WDIOS_ENABLECARD)
                .unwrap_err(),
            "WDIOC_SETOPTIONS",
        );
        enotty(d.keepalive().unwrap_err(), "WDIOC_KEEPALIVE");
        d.ping().unwrap();
        d.magic_close().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"\0V");
    }
}
