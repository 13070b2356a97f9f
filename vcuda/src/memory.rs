//! Device memory of the virtual device: host mappings laid out so that a kernel writing outside
//! its buffer is caught.
//!
//! Each allocation is its own `mmap`: the buffer starts 256-byte aligned (as cuMemAlloc's do) after
//! a front guard zone, its size is rounded up to 256 bytes with the rounding filled by a guard
//! pattern, and an inaccessible page follows. A small overrun or underrun changes a guard byte
//! (found by [`check_guards`], which the driver runs after every launch and copy); a large one hits
//! the inaccessible page at once. New memory is filled with 0xFF bytes (NaN as fp32), as real
//! device memory holds garbage, so a kernel that reads what nobody wrote shows it.
//!
//! `VCUDA_MEMORY_BYTES` sets the device's memory size (default 8 GiB); an allocation past it fails
//! with CUDA_ERROR_OUT_OF_MEMORY, which is how the "out of memory shrinks the trial array" path is
//! tested (with `VCUDA_REPORTED_MEMORY_BYTES` above it, so the array is sized for more than fits).

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Alignment of every device address (cuMemAlloc guarantees 256 bytes).
pub const ALIGN: u64 = 256;
/// Bytes of guard pattern before every buffer.
const FRONT_GUARD: u64 = 4096;
const GUARD_BYTE: u8 = 0xA5;
const FRESH_BYTE: u8 = 0xFF;
const DEFAULT_MEMORY_BYTES: u64 = 8 << 30;

struct Allocation {
    /// The whole mapping (front guard, buffer, rounding, inaccessible page).
    map_base: usize,
    map_len: usize,
    /// What the caller asked for.
    size: u64,
}

impl Allocation {
    fn rounded(&self) -> u64 {
        self.size.div_ceil(ALIGN).max(1) * ALIGN
    }
}

#[derive(Default)]
struct Memory {
    /// Device address → allocation.
    live: BTreeMap<u64, Allocation>,
    allocated: u64,
}

static MEMORY: Mutex<Memory> = Mutex::new(Memory { live: BTreeMap::new(), allocated: 0 });

fn lock() -> std::sync::MutexGuard<'static, Memory> {
    // A panic while holding the lock leaves the map consistent (every update is one insert or
    // remove), so a poisoned lock is still usable.
    MEMORY.lock().unwrap_or_else(|p| p.into_inner())
}

/// The device's memory size: `VCUDA_MEMORY_BYTES`, or 8 GiB.
pub fn total_bytes() -> u64 {
    std::env::var("VCUDA_MEMORY_BYTES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_MEMORY_BYTES)
}

/// (free, total) bytes, as cuMemGetInfo reports them. `VCUDA_REPORTED_MEMORY_BYTES`, when set,
/// is the total reported instead of the real cap: a device that claims more than it can give, as
/// a GPU shared with another process does when that process allocates after the query.
pub fn info() -> (u64, u64) {
    let total = std::env::var("VCUDA_REPORTED_MEMORY_BYTES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(total_bytes);
    (total.saturating_sub(lock().allocated), total)
}

fn page() -> usize {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as usize
}

/// Why an allocation failed.
#[derive(Debug, PartialEq, Eq)]
pub enum AllocError {
    /// Past `VCUDA_MEMORY_BYTES` (CUDA_ERROR_OUT_OF_MEMORY).
    OutOfMemory,
    /// Zero bytes (CUDA_ERROR_INVALID_VALUE, as cuMemAlloc answers).
    Empty,
}

/// Allocates `bytes` of device memory and returns its device address.
pub fn alloc(bytes: u64) -> Result<u64, AllocError> {
    if bytes == 0 {
        return Err(AllocError::Empty);
    }
    let mut mem = lock();
    if mem.allocated.saturating_add(bytes) > total_bytes() {
        return Err(AllocError::OutOfMemory);
    }
    let page = page();
    let rounded = bytes.div_ceil(ALIGN) * ALIGN;
    let body = (FRONT_GUARD + rounded) as usize;
    let body_pages = body.div_ceil(page) * page;
    let map_len = body_pages + page;
    // SAFETY: a fresh anonymous mapping; nothing else refers to it.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(AllocError::OutOfMemory);
    }
    let base = base as usize;
    // The buffer ends (after rounding) exactly where the inaccessible page starts.
    let device = (base + body_pages) as u64 - rounded;
    // SAFETY: all inside the mapping just made; the last page becomes inaccessible.
    unsafe {
        libc::memset(base as *mut libc::c_void, GUARD_BYTE as i32, device as usize - base);
        libc::memset(device as *mut libc::c_void, FRESH_BYTE as i32, bytes as usize);
        libc::memset((device + bytes) as *mut libc::c_void, GUARD_BYTE as i32, (rounded - bytes) as usize);
        libc::mprotect((base + body_pages) as *mut libc::c_void, page, libc::PROT_NONE);
    }
    mem.allocated += bytes;
    mem.live.insert(device, Allocation { map_base: base, map_len, size: bytes });
    Ok(device)
}

/// Frees the allocation that starts at `device`; false when no allocation starts there.
pub fn free(device: u64) -> bool {
    let mut mem = lock();
    let Some(a) = mem.live.remove(&device) else { return false };
    mem.allocated -= a.size;
    // SAFETY: the mapping was made by `alloc` and is no longer referenced by the table.
    unsafe { libc::munmap(a.map_base as *mut libc::c_void, a.map_len) };
    true
}

/// Ok when `[ptr, ptr + bytes)` lies inside one live allocation; else says where it falls.
pub fn check_range(ptr: u64, bytes: u64) -> Result<(), String> {
    let mem = lock();
    let Some((&start, a)) = mem.live.range(..=ptr).next_back() else {
        return Err(format!("address {ptr:#x} is not device memory (no allocation at or below it)"));
    };
    let end = start + a.size;
    if ptr >= end {
        return Err(format!(
            "address {ptr:#x} is {} bytes past the end of the {}-byte allocation at {start:#x}",
            ptr - end,
            a.size
        ));
    }
    if ptr + bytes > end {
        return Err(format!(
            "{bytes} bytes from {ptr:#x} run {} bytes past the end of the {}-byte allocation at {start:#x}",
            ptr + bytes - end,
            a.size
        ));
    }
    Ok(())
}

/// The allocation containing `ptr`, as (start, size).
pub fn allocation_of(ptr: u64) -> Option<(u64, u64)> {
    let mem = lock();
    let (&start, a) = mem.live.range(..=ptr).next_back()?;
    (ptr < start + a.size).then_some((start, a.size))
}

/// Whether `ptr` falls into an allocation's guard zone or inaccessible page: used by the fault
/// handler to name a stray access.
pub fn guard_hit(ptr: u64) -> Option<String> {
    let mem = lock();
    for (&start, a) in mem.live.range(..) {
        let (lo, hi) = (a.map_base as u64, (a.map_base + a.map_len) as u64);
        if (lo..hi).contains(&ptr) {
            return Some(if ptr < start {
                format!("{} bytes before the {}-byte allocation at {start:#x}", start - ptr, a.size)
            } else {
                format!(
                    "{} bytes past the end of the {}-byte allocation at {start:#x}",
                    ptr - (start + a.size),
                    a.size
                )
            });
        }
    }
    None
}

/// Checks every live allocation's guard bytes; on damage, says which allocation and where, and
/// restores the guard so one overrun is reported once.
pub fn check_guards() -> Result<(), String> {
    let mem = lock();
    let mut damage = Vec::new();
    for (&start, a) in &mem.live {
        // SAFETY: the guard zones are inside the mapping and stay readable/writable.
        let front = unsafe {
            std::slice::from_raw_parts_mut(a.map_base as *mut u8, (start - a.map_base as u64) as usize)
        };
        let back = unsafe {
            std::slice::from_raw_parts_mut((start + a.size) as *mut u8, (a.rounded() - a.size) as usize)
        };
        if let Some(i) = front.iter().position(|&b| b != GUARD_BYTE) {
            damage.push(format!(
                "{} bytes before the {}-byte allocation at {start:#x} were written",
                front.len() - i,
                a.size
            ));
            front.fill(GUARD_BYTE);
        }
        if let Some(i) = back.iter().rposition(|&b| b != GUARD_BYTE) {
            damage.push(format!(
                "{} bytes past the end of the {}-byte allocation at {start:#x} were written",
                i + 1,
                a.size
            ));
            back.fill(GUARD_BYTE);
        }
    }
    if damage.is_empty() { Ok(()) } else { Err(damage.join("; ")) }
}

/// Live allocations and their total bytes (for tests and leak reports).
pub fn usage() -> (usize, u64) {
    let mem = lock();
    (mem.live.len(), mem.allocated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_is_aligned_filled_and_bounded() {
        let p = alloc(1000).unwrap();
        assert_eq!(p % ALIGN, 0);
        let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, 1000) };
        assert!(bytes.iter().all(|&b| b == FRESH_BYTE));
        assert!(check_range(p, 1000).is_ok());
        assert!(check_range(p + 500, 500).is_ok());
        assert!(check_range(p + 500, 501).unwrap_err().contains("1 bytes past the end"));
        assert!(free(p));
        assert!(!free(p));
    }

    #[test]
    fn overrun_and_underrun_are_reported_once() {
        let p = alloc(100).unwrap();
        unsafe { *((p + 101) as *mut u8) = 1 };
        let e = check_guards().unwrap_err();
        assert!(e.contains("2 bytes past the end of the 100-byte allocation"), "{e}");
        unsafe { *((p - 3) as *mut u8) = 1 };
        let e = check_guards().unwrap_err();
        assert!(e.contains("3 bytes before the 100-byte allocation"), "{e}");
        assert!(check_guards().is_ok());
        free(p);
    }

    #[test]
    fn zero_bytes_is_refused() {
        assert_eq!(alloc(0), Err(AllocError::Empty));
    }
}
