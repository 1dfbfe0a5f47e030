//! Answers to the kernel that take more than one step: capabilities at
//! init, opens that wait for a fetch, creates that open, reads served by the
//! content source, directory listings, and the errno (logged) of a failure.
//! The [`fuser::Filesystem`] impl in [`super::ops`] calls these.

use std::{ffi::OsStr, io, path::Path, sync::atomic::Ordering};

use btfs_core::{FileRecord, NodeId, Timestamp};
use btfs_store::{Backend, Entry};
use fuser::{
    Errno, FileHandle, Generation, INodeNo, InitFlags, KernelConfig, OpenFlags, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEntry, ReplyOpen, Request,
};
use tracing::{debug, error, info, warn};

use super::{BtfsFs, attrs::build_attr, handles::ReadFrom};
use crate::error::{FsError, Result, errno};

/// Logs a failed operation at a level that fits its errno.
pub(super) fn fail(op: &str, e: &FsError) -> Errno {
    let code = errno(e);
    match e {
        FsError::Io(_) | FsError::Store(_) | FsError::Stale | FsError::ContentUnavailable => {
            error!("{op}: {e}")
        }
        FsError::Unsupported(_) | FsError::NotSupported(_) => info!("{op}: {e}"),
        _ => debug!("{op}: {e}"),
    }
    code
}

/// The target of a new symlink, as a record holds it.
pub(super) fn symlink_target(target: &Path) -> Result<String> {
    match target.to_str() {
        None => Err(FsError::BadName(btfs_core::PathError::NotUtf8)),
        Some(t) if t.len() > btfs_core::MAX_PATH_LEN => {
            Err(FsError::BadName(btfs_core::PathError::PathTooLong))
        }
        Some(t) => Ok(t.to_owned()),
    }
}

impl<B: Backend> BtfsFs<B> {
    /// Asks the kernel for the capabilities btfs uses (passthrough if
    /// configured).
    pub(super) fn negotiate(&self, config: &mut KernelConfig) -> io::Result<()> {
        let wanted = InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_AUTO_INVAL_DATA
            | InitFlags::FUSE_EXPORT_SUPPORT
            | InitFlags::FUSE_HANDLE_KILLPRIV;
        if let Err(missing) = config.add_capabilities(wanted) {
            debug!(?missing, "kernel lacks some optional capabilities");
        }
        // Asked alone: `add_capabilities` adds nothing of a set the kernel
        // lacks a part of. Without it (kernels before 6.6) a shared mmap of a
        // file still being fetched fails with ENODEV; private ones work.
        if config
            .add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP)
            .is_err()
        {
            debug!("kernel cannot mmap direct-IO files shared");
        }
        let s = &self.shared;
        if s.cfg.passthrough {
            let granted = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            s.passthrough.store(granted, Ordering::Relaxed);
            if !granted {
                warn!("kernel refused FUSE passthrough; file data will be served by the daemon");
            }
        }
        info!(
            passthrough = s.passthrough.load(Ordering::Relaxed),
            "filesystem initialised"
        );
        Ok(())
    }

    /// Creates the entry that `make` builds in `parent` and answers the
    /// kernel with its attributes (mkdir, mknod, symlink).
    pub(super) fn create_and_reply(
        &self,
        op: &str,
        parent: INodeNo,
        name: &OsStr,
        reply: ReplyEntry,
        make: impl FnOnce(&Entry, NodeId, Timestamp) -> FileRecord,
    ) {
        let s = &self.shared;
        let result = s
            .create_entry(parent.0, name, |dir| make(dir, s.node(), Timestamp::now()))
            .and_then(|e| build_attr(&e, false, None));
        match result {
            Ok(attr) => reply.entry(&s.cfg.ttl, &attr, Generation(0)),
            Err(e) => reply.error(fail(op, &e)),
        }
    }

    /// Opens `ino`; a writer of content held elsewhere is answered once the
    /// content source has fetched it.
    pub(super) fn open_and_reply(
        &self,
        req: &Request,
        ino: INodeNo,
        flags: OpenFlags,
        reply: ReplyOpen,
    ) {
        let s = &self.shared;
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY
            && req.uid() != 0
            && let Err(e) = s.kill_setid_for_writer(ino.0, req.uid())
        {
            return reply.error(fail("open", &e));
        }
        let result = s.open_handle(ino.0, flags.0, &|f| reply.open_backing(f));
        match result {
            Err(FsError::Fetch(fetch)) => {
                // A writer of content held elsewhere: open once it is here.
                let (source, wanted) = *fetch;
                let s = s.clone();
                let path = wanted.path.clone();
                source.fetch(
                    wanted,
                    Box::new(move |fetched| {
                        let opened = fetched.map_err(FsError::Io).and_then(|()| {
                            s.open_handle(ino.0, flags.0, &|f| reply.open_backing(f))
                        });
                        match opened {
                            Ok((fh, fopen, Some(b))) => {
                                reply.opened_passthrough(FileHandle(fh), fopen, &b)
                            }
                            Ok((fh, fopen, None)) => reply.opened(FileHandle(fh), fopen),
                            Err(e) => {
                                warn!(%path, "open for writing after fetching failed: {e}");
                                reply.error(fail("open", &e))
                            }
                        }
                    }),
                );
            }
            Ok((fh, fopen, Some(backing))) => {
                reply.opened_passthrough(FileHandle(fh), fopen, &backing)
            }
            Ok((fh, fopen, None)) => reply.opened(FileHandle(fh), fopen),
            Err(e) => reply.error(fail("open", &e)),
        }
    }

    /// Opens a file just created (`created`, or why it was not) for the
    /// caller of `create`.
    pub(super) fn open_created_and_reply(
        &self,
        created: Result<Entry>,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let s = &self.shared;
        let result = created.and_then(|entry| {
            // A new file is empty: truncating skips copying the empty object.
            let opened =
                s.open_handle(entry.ino, flags | libc::O_TRUNC, &|f| reply.open_backing(f))?;
            Ok((build_attr(&entry, false, None)?, opened))
        });
        let ttl = s.cfg.ttl;
        match result {
            Ok((attr, (fh, fopen, Some(b)))) => {
                reply.created_passthrough(&ttl, &attr, Generation(0), FileHandle(fh), fopen, &b)
            }
            Ok((attr, (fh, fopen, None))) => {
                reply.created(&ttl, &attr, Generation(0), FileHandle(fh), fopen)
            }
            Err(e) => reply.error(fail("create", &e)),
        }
    }

    /// Reads here, or hands the reply to the content source.
    /// `op` times it (metrics) until the answer, also when the content
    /// source answers later.
    pub(super) fn read_and_reply(
        &self,
        fh: FileHandle,
        offset: u64,
        size: u32,
        reply: ReplyData,
        op: Option<btfs_metrics::OpTimer>,
    ) {
        match self.shared.read(fh.0, offset, size) {
            Ok(ReadFrom::Here(data)) => reply.data(&data),
            Ok(ReadFrom::Remote(source, wanted)) => source.read(
                wanted,
                offset,
                size,
                Box::new(move |r| {
                    match r {
                        Ok(data) => reply.data(&data),
                        Err(e) => reply.error(errno(&FsError::Io(e))),
                    }
                    drop(op);
                }),
            ),
            Err(e) => reply.error(fail("read", &e)),
        }
    }

    /// Lists a directory handle from `offset` on.
    pub(super) fn readdir_reply(&self, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        match self.shared.handles.dir_items(fh.0) {
            Ok(items) => {
                for (i, item) in items.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(item.ino), (i + 1) as u64, item.kind, &item.name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(fail("readdir", &e)),
        }
    }

    /// Lists a directory handle from `offset` on, with attributes.
    pub(super) fn readdirplus_reply(
        &self,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let s = &self.shared;
        let items = match s.handles.dir_items(fh.0) {
            Ok(items) => items,
            Err(e) => return reply.error(fail("readdirplus", &e)),
        };
        for (i, item) in items.iter().enumerate().skip(offset as usize) {
            // Entries that vanished since opendir are skipped, not failed.
            let Ok(attr) = s.getattr(item.ino) else {
                continue;
            };
            if reply.add(
                INodeNo(item.ino),
                (i + 1) as u64,
                &item.name,
                &s.cfg.ttl,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }
}
