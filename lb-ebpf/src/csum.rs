//! Completing a partial L4 checksum in XDP: what the NIC or the kernel
//! (`skb_checksum_help`) would have done for a frame sent with TX checksum
//! offload, needed once the frame leaves by XDP_TX or XDP_REDIRECT (the
//! skb that said "partial" is gone then; see `lb_common::maps::CSUM_*`).

use aya_ebpf::{bindings::xdp_md, helpers::bpf_csum_diff, programs::XdpContext};
use lb_common::{csum, maps::PROTO_UDP};

use crate::parse::{Packet, ptr_at_upto};

/// Longest segment summed here: a native-mode frame without XDP frags
/// fits in a page (about 3.5 KiB).
pub const MAX_SEGMENT: usize = 4096;
/// Largest offset a summed chunk may start at (a mask: 512 + 20 +
/// `MAX_SEGMENT` is below it).
const MAX_OFF: usize = 0x1fff;
/// `bpf_csum_diff` sums at most 512 bytes per call.
const CHUNK: usize = 512;
/// Largest offset of a segment summed here (behind up to 512 bytes of
/// headers and a DSR outer header).
const MAX_SEGMENT_OFF: usize = 512 + 20;

/// Whether [`complete`] can sum the segment of `pkt` at `pkt.l4_off +
/// shift`: for a caller that decides before it writes anything.
#[inline(always)]
pub fn summable(pkt: &Packet, shift: usize) -> bool {
    pkt.l4_len as usize <= MAX_SEGMENT && pkt.l4_off + shift <= MAX_SEGMENT_OFF
}

/// Writes the full checksum of the frame's L4 segment, now at
/// `pkt.l4_off + shift` (DSR moves it behind an outer header), into its
/// checksum field, which holds a valid seed for the segment's current
/// addresses. False when the segment is too long to sum here (nothing is
/// written).
#[inline(always)]
pub fn complete(ctx: &XdpContext, pkt: &Packet, shift: usize) -> bool {
    let off = pkt.l4_off + shift;
    let len = pkt.l4_len as usize;
    let sum = xlb_segment_sum(ctx.ctx, off as u64, len as u64);
    if sum > u32::MAX as u64 {
        return false;
    }
    let udp = pkt.key.proto == PROTO_UDP;
    let field = off + if udp { 6 } else { 16 };
    let Some(p) = ptr_at_upto::<[u8; 2], MAX_OFF>(ctx, field) else { return false };
    // SAFETY: bounds-checked just above.
    unsafe { *p = csum::complete(sum as u32, udp).to_ne_bytes() };
    true
}

/// One's complement sum (32 bits, unfolded) of `len` bytes at `off`, in
/// constant-size `bpf_csum_diff` chunks (the verifier needs constant
/// sizes); more than 32 bits when the range cannot be summed.
///
/// A global BPF function (exported by the linker, see build.rs): the
/// verifier checks it once, for any arguments, instead of once per
/// caller path and per loop exit (which exceeded its 1M-instruction budget).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn xlb_segment_sum(ctx: *mut xdp_md, off: u64, len: u64) -> u64 {
    let ctx = &XdpContext::new(ctx);
    if len > MAX_SEGMENT as u64 || off > MAX_SEGMENT_OFF as u64 {
        return u64::MAX;
    }
    let mut sum: u64 = 0;
    let mut off = widen(off as usize, 0x3ff);
    let mut rem = widen(len as usize, 0x1fff);
    for _ in 0..MAX_SEGMENT / CHUNK {
        if rem < CHUNK {
            break;
        }
        let Some(s) = chunk::<CHUNK>(ctx, off) else { return u64::MAX };
        sum += s;
        off += CHUNK;
        rem -= CHUNK;
    }
    // Each loop exit leaves precise, different offsets: widened, the
    // states that follow are one for the verifier (checked once, not once
    // per exit).
    let (off, rem) = (widen(off, MAX_OFF), widen(rem, CHUNK - 1));
    let Some(off) = tail_chunks(ctx, off, rem, &mut sum) else { return u64::MAX };
    let (mut off, rem) = (widen(off, MAX_OFF), widen(rem, 3));
    if rem & 2 != 0 {
        let Some(p) = ptr_at_upto::<[u8; 2], MAX_OFF>(ctx, off) else { return u64::MAX };
        // SAFETY: bounds-checked just above.
        sum += u16::from_ne_bytes(unsafe { *p }) as u64;
        off += 2;
    }
    if rem & 1 != 0 && off > 0 {
        // The odd last byte, padded with a zero (RFC 1071; it sits at an
        // even offset from the segment start). Read with the byte before
        // it: the verifier learns no range from a one-byte check at an
        // unknown offset.
        let Some(p) = ptr_at_upto::<[u8; 2], MAX_OFF>(ctx, off - 1) else { return u64::MAX };
        // SAFETY: bounds-checked just above.
        sum += u16::from_ne_bytes([unsafe { (*p)[1] }, 0]) as u64;
    }
    // Folded to 32 bits. A chunk's sum is at most 32 bits (this kernel
    // folds it to 16; older ones on x86 do not), so the total is below
    // 2^37: one fold leaves at most 2^32 + 31, which the caller would read
    // as "cannot sum"; the second fits.
    let once = (sum & 0xffff_ffff) + (sum >> 32);
    (once & 0xffff_ffff) + (once >> 32)
}

/// `x & mask`, read back so the compiler cannot drop the mask: the
/// verifier then knows only the range, not the value (`x` must already
/// fit the mask).
#[inline(always)]
fn widen(x: usize, mask: usize) -> usize {
    // SAFETY: a plain read of a local.
    unsafe { core::ptr::read_volatile(&x) & mask }
}

/// The rest of a segment, `rem` (below 512) bytes at `off`, added to
/// `sum`: one chunk per set bit of `rem` down to 4 (seven branches for the
/// verifier, where a word loop was 128 iterations of it). The offset after
/// them, or `None` when one cannot be read.
#[inline(always)]
fn tail_chunks(ctx: &XdpContext, off: usize, rem: usize, sum: &mut u64) -> Option<usize> {
    let off = tail_chunk::<256>(ctx, off, rem, sum)?;
    let off = tail_chunk::<128>(ctx, off, rem, sum)?;
    let off = tail_chunk::<64>(ctx, off, rem, sum)?;
    let off = tail_chunk::<32>(ctx, off, rem, sum)?;
    let off = tail_chunk::<16>(ctx, off, rem, sum)?;
    let off = tail_chunk::<8>(ctx, off, rem, sum)?;
    tail_chunk::<4>(ctx, off, rem, sum)
}

/// The chunk of `N` bytes at `off`, added to `sum`, when `rem` has bit `N`
/// set: the offset after it, widened (one verifier state whichever way).
#[inline(always)]
fn tail_chunk<const N: usize>(ctx: &XdpContext, off: usize, rem: usize, sum: &mut u64) -> Option<usize> {
    if rem & N == 0 {
        return Some(off);
    }
    *sum += chunk::<N>(ctx, off)?;
    Some(widen(off + N, MAX_OFF))
}

/// The 32-bit sum of `N` bytes at `off` (`N` a multiple of 4, at most 512).
#[inline(always)]
fn chunk<const N: usize>(ctx: &XdpContext, off: usize) -> Option<u64> {
    let p = ptr_at_upto::<[u8; N], MAX_OFF>(ctx, off)?;
    // SAFETY: `p` is N readable packet bytes (bounds-checked above); no
    // "from" buffer.
    let r = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p as *mut u32, N as u32, 0) };
    if r < 0 {
        return None;
    }
    Some(r as u32 as u64)
}
