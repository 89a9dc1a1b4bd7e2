//! Word loads and stores of packet header fields.
//!
//! network-types declares header fields as byte arrays (alignment 1), so
//! LLVM reads a 4-byte address as four byte loads, three shifts and three
//! ors, and writes it as four byte stores. The BPF target cannot be told
//! that unaligned packet access is fine without also being allowed
//! unaligned stack access, which the verifier refuses (LLVM's
//! `allows-misaligned-mem-access`, tried: docs/benchmarks.md). These
//! functions make one BPF load or store of the field's width. The verifier
//! refuses an unaligned access only under strict alignment (not on x86-64
//! or arm64), and even then a header field at its natural offset passes
//! (it assumes `NET_IP_ALIGN`); a refusal is a load error, never a wrong
//! access.
//!
//! Values are in memory order (`from_ne_bytes` of the field), exactly what
//! the byte-wise code produced: only the instructions change.
//!
//! Every pointer must come from a bounds-checked header (`parse::ptr_at`,
//! `parse::l4_hdr`) covering the whole field, or be a map value's field.
//! Never a stack address: unaligned stack access is always refused.

/// A load and a store of one width: `$load(p)` is `$t::from_ne_bytes` of
/// the field at `p`, `$store(p, v)` writes `v.to_ne_bytes()` there.
macro_rules! field_access {
    ($load:ident, $store:ident, $t:ty, $n:literal, $width:literal) => {
        /// The field at `p`, as `from_ne_bytes` reads it.
        ///
        /// # Safety
        /// `p` points into a bounds-checked packet header or a map value.
        #[inline(always)]
        pub unsafe fn $load(p: *const [u8; $n]) -> $t {
            #[cfg(target_arch = "bpf")]
            {
                let v: u64;
                // SAFETY: the caller's bounds check covers the field.
                unsafe {
                    core::arch::asm!(concat!("{v} = *(", $width, " *)({p} + 0)"), p = in(reg) p, v = lateout(reg) v, options(readonly, nostack, preserves_flags))
                };
                v as $t
            }
            #[cfg(not(target_arch = "bpf"))]
            // SAFETY: as above.
            unsafe {
                <$t>::from_ne_bytes(*p)
            }
        }

        /// Writes `v.to_ne_bytes()` to the field at `p`.
        ///
        /// # Safety
        /// As the load.
        #[inline(always)]
        pub unsafe fn $store(p: *mut [u8; $n], v: $t) {
            #[cfg(target_arch = "bpf")]
            // SAFETY: the caller's bounds check covers the field.
            unsafe {
                core::arch::asm!(concat!("*(", $width, " *)({p} + 0) = {v}"), p = in(reg) p, v = in(reg) v as u64, options(nostack, preserves_flags))
            };
            #[cfg(not(target_arch = "bpf"))]
            // SAFETY: as above.
            unsafe {
                *p = v.to_ne_bytes()
            };
        }
    };
}

field_access!(load_u32, store_u32, u32, 4, "u32");
field_access!(load_u16, store_u16, u16, 2, "u16");
