//! Where a role computes: `cpu` (the reference backend, always built) or `cuda[:N]` (the
//! cargo feature `cuda`).

use std::fmt;
use std::str::FromStr;

use crate::error::ModelError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Device {
    #[default]
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl FromStr for Device {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, ModelError> {
        match s.trim() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    ModelError::Device(format!("{other:?} is not a device (cpu, cuda or cuda:N)"))
                }),
        }
    }
}

impl TryFrom<String> for Device {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self, ModelError> {
        s.parse()
    }
}

impl From<Device> for String {
    fn from(d: Device) -> String {
        d.to_string()
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Device {
    /// Checks that this build can compute on the device, with a clear error when it cannot:
    /// a build without the `cuda` feature, a machine without the CUDA driver or without that
    /// device.
    pub fn check(self) -> Result<(), ModelError> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(n) => crate::cuda::probe(n)
                .map(|_| ())
                .map_err(|e| ModelError::Device(e.to_string())),
        }
    }
}

/// How products with the bf16 weights compute (`--gemm`): `f32` widens the weights and
/// multiplies in f32 (the `transformers` reference's numbers, up to the order of the sums);
/// `bf16` rounds the activations to bf16, as llama.cpp does (faster, off by that rounding).
/// A CUDA device then runs on the tensor cores; the CPU backend takes it for the dense
/// `[out, in]` products (attention, dense and shared MLPs, routers, output head) with
/// `VDPBF16PS` where the CPU has AVX512-BF16 and its exact emulation elsewhere
/// (`kernels::dot_bf16_multi`), while the routed experts stay in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GemmPrecision {
    #[default]
    F32,
    Bf16,
}

impl FromStr for GemmPrecision {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        match s.trim() {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(ModelError::Device(format!(
                "{other:?} is not a GEMM precision (f32, bf16)"
            ))),
        }
    }
}

impl fmt::Display for GemmPrecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for (text, device) in [
            ("cpu", Device::Cpu),
            ("cuda", Device::Cuda(0)),
            ("cuda:3", Device::Cuda(3)),
        ] {
            assert_eq!(text.parse::<Device>().unwrap(), device);
        }
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
        for p in [GemmPrecision::F32, GemmPrecision::Bf16] {
            assert_eq!(p.to_string().parse::<GemmPrecision>().unwrap(), p);
        }
        assert!("fp8".parse::<GemmPrecision>().is_err());
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            assert!(bad.parse::<Device>().is_err(), "{bad}");
        }
        assert!(Device::Cpu.check().is_ok());
        #[cfg(not(feature = "cuda"))]
        assert!(Device::Cuda(0).check().is_err());
    }
}
