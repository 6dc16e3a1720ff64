//! A SQLite VFS over the platform's own that hands each commit's write-ahead-log frames to
//! the OS in one write instead of two per page.
//!
//! SQLite writes a commit into the WAL as one `pwrite` for each frame's 24-byte header and one
//! for its page: a task's round trip commits two transactions of some 17 pages each, 70
//! system calls (most of the commit's time). This VFS gathers the appends to a WAL file in
//! memory and writes them with one call (per 128 KiB) when the commit syncs the log, before SQLite
//! publishes the new frames in the WAL index, so no other connection ever reads a frame
//! the file lacks.
//!
//! The store's connection runs with `synchronous = FULL` and `checkpoint_fullfsync = ON`, so
//! that SQLite tells the two kinds of sync apart by their flags:
//!
//! - a commit syncs the log with `SQLITE_SYNC_NORMAL`: the gathered frames are written and
//!   nothing is synced, which is what `synchronous = NORMAL` promises (a commit survives the
//!   process's crash, not the machine's power loss);
//! - a checkpoint (and the log header of a new WAL generation) syncs with `SQLITE_SYNC_FULL`:
//!   written and synced for real, as under `NORMAL`, so the database file never takes pages
//!   the log may lose.
//!
//! Reads, truncation, size queries and closing write what is gathered first; a write that is
//! not an append (SQLite rewriting a frame of the same transaction) writes it first too.
//! At most [`MAX_GATHERED`] bytes wait: a larger transaction is written in pieces.
//!
//! Every other file (the database, its shared-memory index) and every other method goes
//! straight to the VFS beneath.

#![allow(
    unsafe_code,
    reason = "a SQLite VFS is a table of C callbacks over raw pointers SQLite owns; each \
              callback only reaches the file SQLite passes and the VFS beneath"
)]
#![deny(missing_docs)]

use std::ffi::{CStr, c_int, c_void};
use std::ptr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::ffi;

/// The VFS's registered name.
pub const NAME: &str = "stardust-wal";

/// Gathered bytes at most before they are written (a large transaction spills in pieces).
pub const MAX_GATHERED: usize = 1 << 20;

/// Bytes in one write to the beneath VFS at most: SQLite's unix VFS writes at most
/// 128 KiB - 1 bytes per call (and reports a longer one as a full disk).
const MAX_WRITE: usize = 0x1ffff;

/// A file of this VFS. SQLite allocates `szOsFile` bytes for it: this struct, then the
/// beneath VFS's own file at [`inner_offset`].
#[repr(C)]
struct File {
    base: ffi::sqlite3_file,
    inner: *mut ffi::sqlite3_file,
    /// WAL files only (else null): appends not yet written.
    gathered: *mut Gathered,
}

struct Gathered {
    /// Where `bytes` go in the file.
    start: i64,
    bytes: Vec<u8>,
}

/// The beneath VFS's file's offset within ours (8-aligned).
const fn inner_offset() -> usize {
    std::mem::size_of::<File>().next_multiple_of(8)
}

/// What registering the VFS came to (SQLite's result code).
struct Registered(c_int);

/// Registers the VFS once (not as the default); the error code if SQLite refused.
pub fn register() -> Result<(), c_int> {
    static DONE: OnceLock<Registered> = OnceLock::new();
    let done = DONE.get_or_init(|| {
        // SAFETY: sqlite3_vfs_find(NULL) gives the default VFS, valid for the process's life
        // (SQLite never frees a registered VFS); the new one is leaked, so it lives as long.
        unsafe {
            let beneath = ffi::sqlite3_vfs_find(ptr::null());
            if beneath.is_null() {
                return Registered(ffi::SQLITE_ERROR);
            }
            let name: &'static CStr = c"stardust-wal";
            let vfs = Box::leak(Box::new(ffi::sqlite3_vfs {
                iVersion: (*beneath).iVersion,
                szOsFile: c_int::try_from(inner_offset()).unwrap_or(c_int::MAX)
                    + (*beneath).szOsFile,
                mxPathname: (*beneath).mxPathname,
                pNext: ptr::null_mut(),
                zName: name.as_ptr(),
                pAppData: beneath.cast(),
                xOpen: Some(open),
                // The rest are the beneath VFS's, which read nothing of the VFS they are
                // handed but what this copy repeats (mxPathname).
                xDelete: (*beneath).xDelete,
                xAccess: (*beneath).xAccess,
                xFullPathname: (*beneath).xFullPathname,
                xDlOpen: (*beneath).xDlOpen,
                xDlError: (*beneath).xDlError,
                xDlSym: (*beneath).xDlSym,
                xDlClose: (*beneath).xDlClose,
                xRandomness: (*beneath).xRandomness,
                xSleep: (*beneath).xSleep,
                xCurrentTime: (*beneath).xCurrentTime,
                xGetLastError: (*beneath).xGetLastError,
                xCurrentTimeInt64: (*beneath).xCurrentTimeInt64,
                xSetSystemCall: (*beneath).xSetSystemCall,
                xGetSystemCall: (*beneath).xGetSystemCall,
                xNextSystemCall: (*beneath).xNextSystemCall,
            }));
            Registered(ffi::sqlite3_vfs_register(vfs, 0))
        }
    });
    match done.0 {
        ffi::SQLITE_OK => Ok(()),
        rc => Err(rc),
    }
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: Some(shm_map),
    xShmLock: Some(shm_lock),
    xShmBarrier: Some(shm_barrier),
    xShmUnmap: Some(shm_unmap),
    xFetch: Some(fetch),
    xUnfetch: Some(unfetch),
};

/// Gathered writes handed to the beneath VFS (one call each per 128 KiB), for tests and
/// diagnostics.
pub static WAL_WRITES: AtomicU64 = AtomicU64::new(0);

/// Syncs of a WAL file handed to the beneath VFS (checkpoints, new log headers: never a
/// commit), for tests and diagnostics.
pub static WAL_SYNCS: AtomicU64 = AtomicU64::new(0);

/// # Safety
/// `file` is a file this VFS opened.
unsafe fn parts<'a>(file: *mut ffi::sqlite3_file) -> (&'a mut File, *mut ffi::sqlite3_file) {
    // SAFETY: SQLite hands back the pointer it gave `open`, which set `inner`.
    unsafe {
        let f = &mut *file.cast::<File>();
        let inner = f.inner;
        (f, inner)
    }
}

/// The beneath file's methods (set by its successful open).
///
/// # Safety
/// `inner` is an open file of the beneath VFS.
unsafe fn methods<'a>(inner: *mut ffi::sqlite3_file) -> &'a ffi::sqlite3_io_methods {
    // SAFETY: an open file's pMethods stays valid until its xClose.
    unsafe { &*(*inner).pMethods }
}

/// Writes what `f` gathered, if anything; forgets it either way (a failed write fails the
/// transaction, whose frames SQLite then never publishes).
///
/// # Safety
/// `f` is an open file of this VFS.
unsafe fn flush(f: &mut File) -> c_int {
    // SAFETY: `gathered` is null or the Box this VFS made at open.
    let Some(g) = (unsafe { f.gathered.as_mut() }) else {
        return ffi::SQLITE_OK;
    };
    if g.bytes.is_empty() {
        return ffi::SQLITE_OK;
    }
    WAL_WRITES.fetch_add(1, Ordering::Relaxed);
    // SAFETY: `inner` is open.
    let Some(write) = (unsafe { methods(f.inner) }).xWrite else {
        g.bytes.clear();
        return ffi::SQLITE_IOERR_WRITE;
    };
    let mut rc = ffi::SQLITE_OK;
    let mut at = g.start;
    for piece in g.bytes.chunks(MAX_WRITE) {
        let len = c_int::try_from(piece.len()).unwrap_or(c_int::MAX);
        // SAFETY: `inner` is open; `piece` is valid for `len` bytes.
        rc = unsafe { write(f.inner, piece.as_ptr().cast(), len, at) };
        if rc != ffi::SQLITE_OK {
            break;
        }
        at += i64::from(len);
    }
    g.bytes.clear();
    rc
}

/// The file's parts once what it gathered is written: what reads, resizes, syncs or measures
/// the file must see every byte given to it. The error code if the write failed.
///
/// # Safety
/// `file` is a file this VFS opened.
unsafe fn written<'a>(
    file: *mut ffi::sqlite3_file,
) -> Result<(&'a mut File, *mut ffi::sqlite3_file), c_int> {
    // SAFETY: as `parts` and `flush` require.
    unsafe {
        let (f, inner) = parts(file);
        match flush(f) {
            ffi::SQLITE_OK => Ok((f, inner)),
            rc => Err(rc),
        }
    }
}

unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: SQLite gives `szOsFile` bytes at `file`, enough for `File` and the beneath
    // file after it; `pAppData` is the beneath VFS (set at registration).
    unsafe {
        let beneath: *mut ffi::sqlite3_vfs = (*vfs).pAppData.cast();
        let inner: *mut ffi::sqlite3_file = file.cast::<u8>().add(inner_offset()).cast();
        ptr::write(
            file.cast::<File>(),
            File {
                base: ffi::sqlite3_file {
                    pMethods: ptr::null(),
                },
                inner,
                gathered: ptr::null_mut(),
            },
        );
        (*inner).pMethods = ptr::null();
        let Some(open_beneath) = (*beneath).xOpen else {
            return ffi::SQLITE_CANTOPEN;
        };
        let rc = open_beneath(beneath, name, inner, flags, out_flags);
        if rc != ffi::SQLITE_OK {
            if !(*inner).pMethods.is_null()
                && let Some(close) = methods(inner).xClose
            {
                close(inner);
            }
            return rc;
        }
        if methods(inner).iVersion < 3 {
            // Without shared memory WAL would need exclusive locking; not ours to support.
            if let Some(close) = methods(inner).xClose {
                close(inner);
            }
            return ffi::SQLITE_CANTOPEN;
        }
        if flags & ffi::SQLITE_OPEN_WAL != 0 {
            (*file.cast::<File>()).gathered = Box::into_raw(Box::new(Gathered {
                start: 0,
                bytes: Vec::new(),
            }));
        }
        (*file).pMethods = &METHODS;
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: an open file of this VFS; `gathered` is freed once, here.
    unsafe {
        let (f, inner) = parts(file);
        let flushed = flush(f);
        if !f.gathered.is_null() {
            drop(Box::from_raw(f.gathered));
            f.gathered = ptr::null_mut();
        }
        let closed = methods(inner).xClose.map_or(ffi::SQLITE_OK, |c| c(inner));
        if flushed != ffi::SQLITE_OK {
            flushed
        } else {
            closed
        }
    }
}

unsafe extern "C" fn read(
    file: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: an open file of this VFS.
    unsafe {
        let (_, inner) = match written(file) {
            Ok(parts) => parts,
            Err(rc) => return rc,
        };
        methods(inner)
            .xRead
            .map_or(ffi::SQLITE_IOERR_READ, |r| r(inner, buf, amount, offset))
    }
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: an open file of this VFS; `buf` holds `amount` bytes.
    unsafe {
        let (f, inner) = parts(file);
        if let Some(g) = f.gathered.as_mut()
            && let Ok(n) = usize::try_from(amount)
        {
            let end = g.start + g.bytes.len() as i64;
            if !g.bytes.is_empty() && offset != end {
                let rc = flush(f);
                if rc != ffi::SQLITE_OK {
                    return rc;
                }
            }
            let g = &mut *f.gathered;
            if g.bytes.is_empty() {
                g.start = offset;
            }
            g.bytes
                .extend_from_slice(std::slice::from_raw_parts(buf.cast::<u8>(), n));
            if g.bytes.len() >= MAX_GATHERED {
                return flush(f);
            }
            return ffi::SQLITE_OK;
        }
        methods(inner)
            .xWrite
            .map_or(ffi::SQLITE_IOERR_WRITE, |w| w(inner, buf, amount, offset))
    }
}

unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    // SAFETY: an open file of this VFS.
    unsafe {
        let (_, inner) = match written(file) {
            Ok(parts) => parts,
            Err(rc) => return rc,
        };
        methods(inner)
            .xTruncate
            .map_or(ffi::SQLITE_IOERR_TRUNCATE, |t| t(inner, size))
    }
}

unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    // SAFETY: an open file of this VFS.
    unsafe {
        let (f, inner) = match written(file) {
            Ok(parts) => parts,
            Err(rc) => return rc,
        };
        // A commit's sync of the log (see the module's documentation): written, not synced.
        if !f.gathered.is_null() {
            if flags & 0x0f == ffi::SQLITE_SYNC_NORMAL {
                return ffi::SQLITE_OK;
            }
            WAL_SYNCS.fetch_add(1, Ordering::Relaxed);
        }
        methods(inner)
            .xSync
            .map_or(ffi::SQLITE_IOERR_FSYNC, |s| s(inner, flags))
    }
}

unsafe extern "C" fn file_size(
    file: *mut ffi::sqlite3_file,
    size: *mut ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: an open file of this VFS.
    unsafe {
        let (_, inner) = match written(file) {
            Ok(parts) => parts,
            Err(rc) => return rc,
        };
        methods(inner)
            .xFileSize
            .map_or(ffi::SQLITE_IOERR_FSTAT, |s| s(inner, size))
    }
}

// The rest only pass through to the beneath file.

unsafe extern "C" fn lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: an open file of this VFS.
    unsafe {
        let (_, inner) = parts(file);
        methods(inner)
            .xLock
            .map_or(ffi::SQLITE_IOERR_LOCK, |l| l(inner, level))
    }
}

unsafe extern "C" fn unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: an open file of this VFS.
    unsafe {
        let (_, inner) = parts(file);
        methods(inner)
            .xUnlock
            .map_or(ffi::SQLITE_IOERR_UNLOCK, |u| u(inner, level))
    }
}

unsafe extern "C" fn check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    // SAFETY: an open file of this VFS.
    unsafe {
        let (_, inner) = parts(file);
        methods(inner)
            .xCheckReservedLock
            .map_or(ffi::SQLITE_IOERR_CHECKRESERVEDLOCK, |c| c(inner, out))
    }
}

unsafe extern "C" fn file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: an open file of this VFS.
    unsafe {
        let (_, inner) = parts(file);
        methods(inner)
            .xFileControl
            .map_or(ffi::SQLITE_NOTFOUND, |c| c(inner, op, arg))
    }
}

unsafe extern "C" fn sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: an open file of this VFS.
    unsafe {
        let (_, inner) = parts(file);
        methods(inner).xSectorSize.map_or(4096, |s| s(inner))
    }
}

unsafe extern "C" fn device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: an open file of this VFS.
    unsafe {
        let (_, inner) = parts(file);
        methods(inner)
            .xDeviceCharacteristics
            .map_or(0, |d| d(inner))
    }
}

unsafe extern "C" fn shm_map(
    file: *mut ffi::sqlite3_file,
    page: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: an open file of this VFS.
    unsafe {
        let (_, inner) = parts(file);
        methods(inner)
            .xShmMap
            .map_or(ffi::SQLITE_IOERR_SHMMAP, |m| {
                m(inner, page, size, extend, out)
            })
    }
}

unsafe extern "C" fn shm_lock(
    file: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    // SAFETY: an open file of this VFS.
    unsafe {
        let (_, inner) = parts(file);
        methods(inner)
            .xShmLock
            .map_or(ffi::SQLITE_IOERR_SHMLOCK, |l| l(inner, offset, n, flags))
    }
}

unsafe extern "C" fn shm_barrier(file: *mut ffi::sqlite3_file) {
    // SAFETY: an open file of this VFS.
    unsafe {
        let (_, inner) = parts(file);
        if let Some(b) = methods(inner).xShmBarrier {
            b(inner);
        }
    }
}

unsafe extern "C" fn shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    // SAFETY: an open file of this VFS.
    unsafe {
        let (_, inner) = parts(file);
        methods(inner)
            .xShmUnmap
            .map_or(ffi::SQLITE_OK, |u| u(inner, delete))
    }
}

unsafe extern "C" fn fetch(
    file: *mut ffi::sqlite3_file,
    offset: ffi::sqlite3_int64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: an open file of this VFS.
    unsafe {
        let (_, inner) = match written(file) {
            Ok(parts) => parts,
            Err(rc) => return rc,
        };
        match methods(inner).xFetch {
            Some(x) => x(inner, offset, amount, out),
            None => {
                *out = ptr::null_mut();
                ffi::SQLITE_OK
            }
        }
    }
}

unsafe extern "C" fn unfetch(
    file: *mut ffi::sqlite3_file,
    offset: ffi::sqlite3_int64,
    p: *mut c_void,
) -> c_int {
    // SAFETY: an open file of this VFS.
    unsafe {
        let (_, inner) = parts(file);
        methods(inner)
            .xUnfetch
            .map_or(ffi::SQLITE_OK, |u| u(inner, offset, p))
    }
}
