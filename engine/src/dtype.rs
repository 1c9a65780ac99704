//! Element types, named as safetensors names them.

use serde::Serialize;

/// An element type. Covers every dtype of the safetensors format ([`DType::SAFETENSORS`]) plus
/// `C128`, which tensorizer files can carry.
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
    /// Signed 64-bit.
    I64,
    /// Unsigned 64-bit.
    U64,
    /// Complex of two f64 (tensorizer only: not a safetensors dtype).
    C128,
}

impl DType {
    /// Every dtype: the safetensors ones, then [`DType::C128`].
    pub const ALL: [DType; 21] = {
        let mut all = [DType::C128; 21];
        let mut i = 0;
        while i < DType::SAFETENSORS.len() {
            all[i] = DType::SAFETENSORS[i];
            i += 1;
        }
        all
    };

    /// The dtypes of the safetensors format, exactly the variants of the reference crate's
    /// `safetensors::Dtype` (0.6/0.7), in its order. [`DType::C128`] is not among them.
    pub const SAFETENSORS: [DType; 20] = [
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

    /// The upper-case name, as a safetensors header spells it (`BF16`, `F8_E4M3`, …). `C128` is
    /// not a safetensors dtype (see [`DType::is_safetensors`]); its name is `"C128"`.
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

    /// Whether the safetensors format has this dtype.
    pub fn is_safetensors(self) -> bool {
        DType::SAFETENSORS.contains(&self)
    }

    /// Parses a safetensors header name; `None` for names the format does not define.
    pub fn from_safetensors_name(s: &str) -> Option<DType> {
        DType::SAFETENSORS
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

    /// The reference crate's `Dtype` variants (safetensors 0.6/0.7), in order.
    const REFERENCE: [&str; 20] = [
        "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16",
        "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
    ];

    #[test]
    fn safetensors_dtypes_match_the_reference_crate() {
        let ours: Vec<&str> = DType::SAFETENSORS
            .iter()
            .map(|d| d.safetensors_name())
            .collect();
        assert_eq!(ours, REFERENCE);
        for name in REFERENCE {
            assert!(DType::from_safetensors_name(name).is_some(), "{name}");
        }
        // C128 is a tensorizer dtype only: a safetensors header naming it is not valid.
        assert_eq!(DType::from_safetensors_name("C128"), None);
        assert!(!DType::C128.is_safetensors());
        // Bit widths of the reference crate's `Dtype::bitsize`.
        let bits: Vec<u64> = DType::SAFETENSORS.iter().map(|d| d.bits()).collect();
        assert_eq!(
            bits,
            [8, 4, 6, 6, 8, 8, 8, 8, 8, 16, 16, 16, 16, 32, 32, 32, 64, 64, 64, 64]
        );
    }

    #[test]
    fn names_round_trip() {
        for d in DType::SAFETENSORS {
            assert_eq!(DType::from_safetensors_name(d.safetensors_name()), Some(d));
        }
        for d in DType::ALL {
            assert!(d == DType::C128 || d.is_safetensors(), "{d:?}");
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
