//! The CPU's peak f32 throughput, the yardstick `la-cli bench` measures its GFLOP/s against:
//! cores x clock x f32 lanes per FMA x FMA units x 2 FLOP. The clock and the vector width
//! come from what the CPU and the kernel report; how many FMA units a core has, no register
//! says, so it comes from the processor's family and is printed as an assumption.

/// What the peak is made of.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuPeak {
    pub cores: usize,
    pub ghz: f64,
    /// f32 lanes of the widest FMA instruction (16 for AVX-512, 8 for AVX2, 4 for NEON).
    pub lanes: usize,
    /// FMA instructions of that width a core starts each cycle.
    pub fma_units: usize,
    /// Why that many units.
    pub units_reason: &'static str,
}

/// The vector unit of a core, as detected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vector {
    Avx512,
    Avx2Fma,
    // Detected only on aarch64.
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    Neon,
    Other,
}

impl CpuPeak {
    pub fn gflops(&self) -> f64 {
        self.cores as f64 * self.ghz * (self.lanes * self.fma_units * 2) as f64
    }

    /// `cores` cores of this machine, or `None` where the clock cannot be read.
    pub fn of_this_machine(cores: usize) -> Option<Self> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        let max_khz =
            std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
                .ok()
                .and_then(|s| s.trim().parse::<f64>().ok());
        let ghz = match max_khz {
            Some(khz) => khz / 1e6,
            None => cpuinfo_field(&cpuinfo, "cpu MHz")?.parse::<f64>().ok()? / 1e3,
        };
        Some(Self::from_parts(cores, ghz, detect_vector(), &cpuinfo))
    }

    /// The peak of `cores` cores at `ghz` with `vector`, the FMA units chosen from the
    /// vendor and family in `cpuinfo` (the text of /proc/cpuinfo).
    pub fn from_parts(cores: usize, ghz: f64, vector: Vector, cpuinfo: &str) -> Self {
        let amd = cpuinfo_field(cpuinfo, "vendor_id") == Some("AuthenticAMD");
        let family = cpuinfo_field(cpuinfo, "cpu family").and_then(|f| f.parse::<u32>().ok());
        let (lanes, fma_units, units_reason) = match vector {
            // Zen 4 (family 25) runs a 512-bit FMA as two halves on its two 256-bit units.
            Vector::Avx512 if amd && family == Some(25) => {
                (16, 1, "Zen 4: 512-bit FMAs on two 256-bit units")
            }
            Vector::Avx512 => (
                16,
                2,
                "two 512-bit FMA units per core assumed (Xeon SP, Zen 5)",
            ),
            Vector::Avx2Fma => (8, 2, "two 256-bit FMA units per core assumed"),
            Vector::Neon => (4, 2, "two 128-bit FMA units per core assumed"),
            Vector::Other => (4, 1, "no FMA instructions detected"),
        };
        Self {
            cores,
            ghz,
            lanes,
            fma_units,
            units_reason,
        }
    }

    /// "333 GFLOP/s = 2 cores x 2.60 GHz x 16 lanes x 2 FMA units x 2 (why)".
    pub fn describe(&self) -> String {
        format!(
            "{:.0} GFLOP/s = {} cores x {:.2} GHz x {} f32 lanes x {} FMA units x 2 ({})",
            self.gflops(),
            self.cores,
            self.ghz,
            self.lanes,
            self.fma_units,
            self.units_reason
        )
    }
}

/// The value of the first `name : value` line of /proc/cpuinfo's text.
fn cpuinfo_field<'a>(cpuinfo: &'a str, name: &str) -> Option<&'a str> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == name).then(|| value.trim())
    })
}

fn detect_vector() -> Vector {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Vector::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Vector::Avx2Fma;
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            return Vector::Neon;
        }
    }
    Vector::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZEN4: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\ncpu MHz\t\t: 2596.142\n";
    const XEON: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\ncpu MHz\t\t: 2600.000\n";

    #[test]
    fn the_peak_is_cores_clock_lanes_units_and_two_flop() {
        // The Xeon: 2 cores x 2 AVX-512 FMA units x 16 lanes x 2 FLOP x 2.6 GHz.
        let xeon = CpuPeak::from_parts(2, 2.6, Vector::Avx512, XEON);
        assert_eq!((xeon.lanes, xeon.fma_units), (16, 2));
        assert!((xeon.gflops() - 332.8).abs() < 1e-9, "{}", xeon.gflops());
        // Zen 4 splits a 512-bit FMA over its 256-bit units: half the Xeon's per cycle.
        let zen4 = CpuPeak::from_parts(2, 2.596142, Vector::Avx512, ZEN4);
        assert_eq!((zen4.lanes, zen4.fma_units), (16, 1));
        assert!((zen4.gflops() - 166.153).abs() < 1e-3, "{}", zen4.gflops());
        assert!(zen4
            .describe()
            .starts_with("166 GFLOP/s = 2 cores x 2.60 GHz x 16 f32 lanes x 1 FMA units"));
        let avx2 = CpuPeak::from_parts(4, 3.0, Vector::Avx2Fma, XEON);
        assert_eq!(avx2.gflops(), 4.0 * 3.0 * 32.0);
    }

    #[test]
    fn fields_are_read_from_cpuinfo_text() {
        assert_eq!(cpuinfo_field(ZEN4, "cpu MHz"), Some("2596.142"));
        assert_eq!(cpuinfo_field(ZEN4, "cpu family"), Some("25"));
        assert_eq!(cpuinfo_field(ZEN4, "vendor_id"), Some("AuthenticAMD"));
        assert_eq!(cpuinfo_field(ZEN4, "flags"), None);
    }
}
