//! Element types, named as safetensors names them.

use serde::Serialize;

/// An element type. Covers every dtype of the safetensors format plus the complex and float8
/// types tensorizer files carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[non_exhaustive]
pub enum DType {
    /// Boolean, one byte.
    Bool,
    /// 4-bit float (e2m1), packed two per byte.
    F4,
    /// 6-bit float e2m3, packed.
    F6E2M3,
    /// 6-bit float e3m2, packed.
    F6E3M2,
    /// Unsigned 8-bit.
    U8,
    /// Signed 8-bit.
    I8,
    /// float8 e5m2.
    F8E5M2,
    /// float8 e4m3 (fn).
    F8E4M3,
    /// float8 e8m0 (scale).
    F8E8M0,
    /// Signed 16-bit.
    I16,
    /// Unsigned 16-bit.
    U16,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit.
    I32,
    /// Unsigned 32-bit.
    U32,
    /// IEEE single.
    F32,
    /// Complex of two f32.
    C64,
    /// IEEE double.
    F64,
    /// Complex of two f64.
    C128,
    /// Signed 64-bit.
    I64,
    /// Unsigned 64-bit.
    U64,
}

impl DType {
    /// Every dtype.
    pub const ALL: [DType; 21] = [
        DType::Bool,
        DType::F4,
        DType::F6E2M3,
        DType::F6E3M2,
        DType::U8,
        DType::I8,
        DType::F8E5M2,
        DType::F8E4M3,
        DType::F8E8M0,
        DType::I16,
        DType::U16,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::U32,
        DType::F32,
        DType::C64,
        DType::F64,
        DType::C128,
        DType::I64,
        DType::U64,
    ];

    /// Size of one element in bits.
    pub fn bits(self) -> u64 {
        match self {
            DType::F4 => 4,
            DType::F6E2M3 | DType::F6E3M2 => 6,
            DType::Bool | DType::U8 | DType::I8 | DType::F8E5M2 | DType::F8E4M3 | DType::F8E8M0 => {
                8
            }
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 16,
            DType::I32 | DType::U32 | DType::F32 => 32,
            DType::C64 | DType::F64 | DType::I64 | DType::U64 => 64,
            DType::C128 => 128,
        }
    }

    /// The name in a safetensors header (`BF16`, `F8_E4M3`, …).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::F4 => "F4",
            DType::F6E2M3 => "F6_E2M3",
            DType::F6E3M2 => "F6_E3M2",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::F8E5M2 => "F8_E5M2",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E8M0 => "F8_E8M0",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::F32 => "F32",
            DType::C64 => "C64",
            DType::F64 => "F64",
            DType::C128 => "C128",
            DType::I64 => "I64",
            DType::U64 => "U64",
        }
    }

    /// Parses a safetensors header name.
    pub fn from_safetensors_name(s: &str) -> Option<DType> {
        DType::ALL
            .iter()
            .copied()
            .find(|d| d.safetensors_name() == s)
    }

    /// Lower-case name used in CLI/JSON output (`bf16`, `f32`, `f8_e4m3`, `c64`, `bool`).
    pub fn name(self) -> String {
        self.safetensors_name().to_ascii_lowercase()
    }

    /// Byte length of a tensor of `numel` elements, or `None` if it overflows or is not a whole
    /// number of bytes (sub-byte types).
    pub fn byte_len(self, numel: u64) -> Option<u64> {
        let bits = numel.checked_mul(self.bits())?;
        if bits % 8 != 0 {
            return None;
        }
        Some(bits / 8)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// Number of elements of `shape`, or `None` on overflow.
pub fn numel(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_safetensors_name(d.safetensors_name()), Some(d));
        }
        assert_eq!(DType::BF16.name(), "bf16");
        assert_eq!(DType::F8E4M3.name(), "f8_e4m3");
        assert_eq!(DType::from_safetensors_name("bf16"), None);
    }

    #[test]
    fn byte_lengths() {
        assert_eq!(DType::BF16.byte_len(3), Some(6));
        assert_eq!(DType::F4.byte_len(3), None);
        assert_eq!(DType::F4.byte_len(4), Some(2));
        assert_eq!(DType::C128.byte_len(2), Some(32));
        assert_eq!(DType::F64.byte_len(u64::MAX), None);
        assert_eq!(numel(&[]), Some(1));
        assert_eq!(numel(&[0, 5]), Some(0));
        assert_eq!(numel(&[u64::MAX, 2]), None);
    }
}
