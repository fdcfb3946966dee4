//! The `WDIOF_*` bits of linux/watchdog.h, decoded to names.
//!
//! One set of bits serves two purposes: WDIOC_GETSUPPORT reports the options a
//! driver supports, WDIOC_GETBOOTSTATUS (and sysfs `bootstatus`) reports why the
//! last boot happened, with the same bit values.

use serde::{Serialize, Serializer};
use std::fmt;

pub const WDIOF_OVERHEAT: u32 = 0x0001;
pub const WDIOF_FANFAULT: u32 = 0x0002;
pub const WDIOF_EXTERN1: u32 = 0x0004;
pub const WDIOF_EXTERN2: u32 = 0x0008;
pub const WDIOF_POWERUNDER: u32 = 0x0010;
pub const WDIOF_CARDRESET: u32 = 0x0020;
pub const WDIOF_POWEROVER: u32 = 0x0040;
pub const WDIOF_SETTIMEOUT: u32 = 0x0080;
pub const WDIOF_MAGICCLOSE: u32 = 0x0100;
pub const WDIOF_PRETIMEOUT: u32 = 0x0200;
pub const WDIOF_ALARMONLY: u32 = 0x0400;
pub const WDIOF_KEEPALIVEPING: u32 = 0x8000;

/// Arguments of WDIOC_SETOPTIONS.
pub const WDIOS_DISABLECARD: i32 = 0x0001;
pub const WDIOS_ENABLECARD: i32 = 0x0002;
pub const WDIOS_TEMPPANIC: i32 = 0x0004;

const NAMES: &[(u32, &str)] = &[
    (WDIOF_OVERHEAT, "OVERHEAT"),
    (WDIOF_FANFAULT, "FANFAULT"),
    (WDIOF_EXTERN1, "EXTERN1"),
    (WDIOF_EXTERN2, "EXTERN2"),
    (WDIOF_POWERUNDER, "POWERUNDER"),
    (WDIOF_CARDRESET, "CARDRESET"),
    (WDIOF_POWEROVER, "POWEROVER"),
    (WDIOF_SETTIMEOUT, "SETTIMEOUT"),
    (WDIOF_MAGICCLOSE, "MAGICCLOSE"),
    (WDIOF_PRETIMEOUT, "PRETIMEOUT"),
    (WDIOF_ALARMONLY, "ALARMONLY"),
    (WDIOF_KEEPALIVEPING, "KEEPALIVEPING"),
];

/// A set of `WDIOF_*` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WdFlags(pub u32);

impl WdFlags {
    pub fn contains(self, bit: u32) -> bool {
        self.0 & bit == bit
    }

    /// Names of the known bits that are set, then `0x...` for unknown ones.
    pub fn names(self) -> Vec<String> {
        let mut out: Vec<String> = NAMES
            .iter()
            .filter(|(bit, _)| self.0 & bit != 0)
            .map(|(_, n)| n.to_string())
            .collect();
        let known = NAMES.iter().fold(0, |acc, (bit, _)| acc | bit);
        if self.0 & !known != 0 {
            out.push(format!("{:#x}", self.0 & !known));
        }
        out
    }
}

impl fmt::Display for WdFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("none");
        }
        f.write_str(&self.names().join(","))
    }
}

impl Serialize for WdFlags {
    /// As `{"raw": 32896, "names": ["SETTIMEOUT", ...]}`.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("WdFlags", 2)?;
        st.serialize_field("raw", &self.0)?;
        st.serialize_field("names", &self.names())?;
        st.end()
    }
}

/// Why the previous boot happened, as the driver saw it (WDIOC_GETBOOTSTATUS or
/// sysfs `bootstatus`). Only some drivers fill it in; 0 means "nothing to
/// report", not "certainly not a watchdog reset".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct BootStatus(pub WdFlags);

impl BootStatus {
    pub fn from_raw(raw: u32) -> Self {
        BootStatus(WdFlags(raw))
    }

    /// The card reset the machine last time (WDIOF_CARDRESET).
    pub fn was_watchdog_reset(self) -> bool {
        self.0.contains(WDIOF_CARDRESET)
    }

    /// A bit other than CARDRESET names an external cause (overheat, fan, power).
    pub fn other_causes(self) -> Vec<String> {
        WdFlags(self.0 .0 & !WDIOF_CARDRESET).names()
    }
}

impl fmt::Display for BootStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 .0 == 0 {
            f.write_str("normal")
        } else {
            self.0.fmt(f)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_decode_to_names() {
        // i6300esb reports SETTIMEOUT | KEEPALIVEPING | MAGICCLOSE.
        let f = WdFlags(WDIOF_SETTIMEOUT | WDIOF_KEEPALIVEPING | WDIOF_MAGICCLOSE);
        assert_eq!(f.names(), ["SETTIMEOUT", "MAGICCLOSE", "KEEPALIVEPING"]);
        assert_eq!(f.to_string(), "SETTIMEOUT,MAGICCLOSE,KEEPALIVEPING");
        assert!(f.contains(WDIOF_SETTIMEOUT));
        assert!(!f.contains(WDIOF_ALARMONLY));
        assert_eq!(WdFlags(0).to_string(), "none");
        assert_eq!(
            WdFlags(0x1_0000 | WDIOF_ALARMONLY).names(),
            ["ALARMONLY", "0x10000"]
        );
    }

    #[test]
    fn bootstatus_cardreset_means_watchdog_reset() {
        assert!(BootStatus::from_raw(0x20).was_watchdog_reset());
        assert!(BootStatus::from_raw(0x21).was_watchdog_reset());
        assert_eq!(BootStatus::from_raw(0x21).other_causes(), ["OVERHEAT"]);
        assert!(!BootStatus::from_raw(0x1).was_watchdog_reset());
        assert!(!BootStatus::from_raw(0).was_watchdog_reset());
        assert_eq!(BootStatus::from_raw(0).to_string(), "normal");
        assert_eq!(BootStatus::from_raw(0x20).to_string(), "CARDRESET");
    }

    #[test]
    fn flags_serialize_with_names() {
        let j = serde_json::to_string(&WdFlags(WDIOF_CARDRESET)).unwrap();
        assert_eq!(j, r#"{"raw":32,"names":["CARDRESET"]}"#);
    }
}
