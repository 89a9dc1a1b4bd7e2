//! Batched walks and deletes over hash maps (`BPF_MAP_LOOKUP_BATCH`,
//! `BPF_MAP_DELETE_BATCH`, kernel ≥ 5.6). aya 0.14 has no wrapper for them;
//! one syscall moves thousands of entries instead of two syscalls per entry.

use std::{
    io,
    mem::{self, MaybeUninit},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use aya::Pod;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The element-operation member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf_elem(cmd: libc::c_long, attr: &mut ElemAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid, initialised bpf_attr prefix of the size we pass.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut ElemAttr, mem::size_of::<ElemAttr>() as libc::c_uint) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// The value of `key` in a hash map, if there is one.
pub fn lookup<K: Pod, V: Pod>(fd: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    let mut v = MaybeUninit::<V>::uninit();
    let mut attr = ElemAttr { map_fd: fd.as_raw_fd() as u32, key: key as *const K as u64, value: v.as_mut_ptr() as u64, ..Default::default() };
    match bpf_elem(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        // SAFETY: the kernel wrote a whole V (Pod).
        Ok(()) => Ok(Some(unsafe { v.assume_init() })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Inserts or replaces `key` (BPF_ANY).
pub fn update<K: Pod, V: Pod>(fd: BorrowedFd<'_>, key: &K, value: &V) -> io::Result<()> {
    let mut attr = ElemAttr { map_fd: fd.as_raw_fd() as u32, key: key as *const K as u64, value: value as *const V as u64, ..Default::default() };
    bpf_elem(BPF_MAP_UPDATE_ELEM, &mut attr)
}

/// Writes many (key, value) pairs in batches (`BPF_MAP_UPDATE_BATCH`;
/// arrays and hashes). `keys` and `values` have the same length.
pub fn update_many<K: Pod, V: Pod>(fd: BorrowedFd<'_>, keys: &[K], values: &[V]) -> io::Result<()> {
    if keys.len() != values.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "keys and values differ in number"));
    }
    let mut done = 0;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: (keys.len() - done) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let res = bpf(BPF_MAP_UPDATE_BATCH, &mut attr);
        // The kernel says how many it wrote, also when it stops early.
        done += attr.count as usize;
        match res {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EAGAIN) => {}
            Err(e) => return Err(e),
        }
        if attr.count == 0 && done < keys.len() {
            return Err(io::Error::other("BPF_MAP_UPDATE_BATCH made no progress"));
        }
    }
    Ok(())
}

fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid, initialised bpf_attr prefix of the size we pass.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut BatchAttr, mem::size_of::<BatchAttr>() as libc::c_uint) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Calls `f` with every `(key, value)` of a hash map, `chunk` entries per
/// syscall. Entries added or removed during the walk may or may not be seen
/// (as with any hash map walk).
pub fn for_each<K: Pod, V: Pod>(fd: BorrowedFd<'_>, chunk: usize, mut f: impl FnMut(&K, &V)) -> io::Result<()> {
    let mut chunk = chunk.max(64);
    let mut keys: Vec<MaybeUninit<K>> = Vec::new();
    let mut values: Vec<MaybeUninit<V>> = Vec::new();
    // The hash map batch cursor is a bucket index (u32).
    let mut token_in: u32 = 0;
    let mut token_out: u32 = 0;
    let mut first = true;
    loop {
        keys.resize_with(chunk, MaybeUninit::uninit);
        values.resize_with(chunk, MaybeUninit::uninit);
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &mut token_in as *mut u32 as u64 },
            out_batch: &mut token_out as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let res = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = attr.count as usize;
        let done = match res {
            Ok(()) => false,
            // ENOENT: no more entries after these.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            // One bucket holds more entries than the buffer: grow and retry
            // the same position.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 => {
                chunk *= 2;
                continue;
            }
            Err(e) => return Err(e),
        };
        for i in 0..n {
            // SAFETY: the kernel initialised the first `n` keys and values;
            // both are Pod.
            unsafe { f(keys[i].assume_init_ref(), values[i].assume_init_ref()) };
        }
        if done {
            return Ok(());
        }
        first = false;
        token_in = token_out;
    }
}

/// Deletes `keys` from a hash map, in batches. Keys that are not there are
/// skipped (and returned) rather than failing the whole call. Returns how
/// many were deleted and the missing keys.
pub fn delete<K: Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<(usize, Vec<K>)> {
    let mut deleted = 0;
    let mut missing = Vec::new();
    let mut rest = keys;
    while !rest.is_empty() {
        let mut attr = BatchAttr { keys: rest.as_ptr() as u64, count: rest.len() as u32, map_fd: fd.as_raw_fd() as u32, ..Default::default() };
        let res = bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        let n = attr.count as usize;
        deleted += n;
        match res {
            Ok(()) => break,
            // Key n is not in this map: skip it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && n < rest.len() => {
                missing.push(rest[n]);
                rest = &rest[n + 1..];
            }
            Err(e) => return Err(e),
        }
    }
    Ok((deleted, missing))
}

/// Borrowed fd of a map, for the functions above.
pub fn fd_of(map: &aya::maps::MapData) -> BorrowedFd<'_> {
    map.fd().as_fd()
}

/// Borrowed fd of a map of any type.
pub fn fd_of_any(map: &aya::maps::Map) -> Option<BorrowedFd<'_>> {
    use aya::maps::Map;
    match map {
        Map::Array(d) | Map::HashMap(d) | Map::LruHashMap(d) | Map::PerCpuArray(d) | Map::PerCpuHashMap(d) | Map::DevMapHash(d) => Some(d.fd().as_fd()),
        _ => None,
    }
}
