//! The [`fuser::Filesystem`] impl: each kernel request is decoded here and
//! handed to the inherent methods of the other modules; answers that take
//! more than one step are in [`super::reply`].

use std::{ffi::OsStr, io, path::Path, time::SystemTime};

use btfs_core::{FileRecord, Timestamp};
use btfs_store::Backend;
use fuser::{
    Errno, FileHandle, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use tracing::error;

use super::{
    BtfsFs, Shared,
    attrs::AttrChanges,
    reply::{fail, symlink_target},
};
use crate::error::FsError;

impl<B: Backend> fuser::Filesystem for BtfsFs<B> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        self.negotiate(config)
    }

    fn destroy(&mut self) {
        self.shared.stop_committers();
        if let Err(e) = self
            .shared
            .collect_garbage()
            .and_then(|_| Ok(self.shared.store.flush()?))
        {
            error!("could not flush the metadata store: {e}");
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, _nlookup: u64) {
        let _op = self.shared.time("forget");
        self.shared.forget(ino.0);
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _op = self.shared.time("lookup");
        match self.shared.lookup(parent.0, name) {
            Ok(attr) => reply.entry(&self.shared.cfg.ttl, &attr, Generation(0)),
            Err(e) => reply.error(fail("lookup", &e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _op = self.shared.time("getattr");
        match self.shared.getattr(ino.0) {
            Ok(attr) => reply.attr(&self.shared.cfg.ttl, &attr),
            Err(e) => reply.error(fail("getattr", &e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _op = self.shared.time("setattr");
        let changes = AttrChanges {
            caller_uid: req.uid(),
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            ctime,
        };
        match self.shared.setattr(ino.0, changes) {
            Ok(attr) => reply.attr(&self.shared.cfg.ttl, &attr),
            Err(e) => reply.error(fail("setattr", &e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _op = self.shared.time("readlink");
        match self.shared.entry_of(ino.0) {
            Ok((_, e)) => match &e.record.target {
                Some(t) => reply.data(t.as_bytes()),
                None => reply.error(Errno::EINVAL),
            },
            Err(e) => reply.error(fail("readlink", &e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let _op = self.shared.time("mknod");
        if mode & libc::S_IFMT != libc::S_IFREG && mode & libc::S_IFMT != 0 {
            let e = FsError::Unsupported("device nodes, FIFOs and sockets");
            return reply.error(fail("mknod", &e));
        }
        self.create_and_reply("mknod", parent, name, reply, |dir, node, now| {
            FileRecord::new_file(
                Shared::<B>::owner_in(req, dir, mode, umask, false),
                node,
                now,
            )
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _op = self.shared.time("mkdir");
        self.create_and_reply("mkdir", parent, name, reply, |dir, node, now| {
            FileRecord::new_dir(
                Shared::<B>::owner_in(req, dir, mode, umask, true),
                node,
                now,
            )
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _op = self.shared.time("unlink");
        match self.shared.remove_entry(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("unlink", &e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _op = self.shared.time("rmdir");
        match self.shared.remove_entry(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("rmdir", &e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _op = self.shared.time("symlink");
        match symlink_target(target) {
            Ok(t) => {
                self.create_and_reply("symlink", parent, link_name, reply, |dir, node, now| {
                    let mut owner = Shared::<B>::owner_in(req, dir, 0o777, 0, false);
                    owner.mode = 0o777;
                    FileRecord::new_symlink(t, owner, node, now)
                })
            }
            Err(e) => reply.error(fail("symlink", &e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _op = self.shared.time("rename");
        match self
            .shared
            .rename(parent.0, name, newparent.0, newname, flags)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("rename", &e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _op = self.shared.time("link");
        reply.error(fail("link", &FsError::Unsupported("hard links")));
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _op = self.shared.time("open");
        self.open_and_reply(req, ino, flags, reply);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _op = self.shared.time("create");
        let s = &self.shared;
        let created = s.create_entry(parent.0, name, |dir| {
            FileRecord::new_file(
                Shared::<B>::owner_in(req, dir, mode, umask, false),
                s.node(),
                Timestamp::now(),
            )
        });
        self.open_created_and_reply(created, flags, reply);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let op = self.shared.time("read");
        self.read_and_reply(fh, offset, size, reply, op);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _op = self.shared.time("write");
        match self.shared.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(fail("write", &e)),
        }
    }

    /// Nothing happens at close(2) that could fail: versions are committed at
    /// release, which the kernel does not report to the application. Answering
    /// ENOSYS once makes the kernel stop sending FLUSH, saving a round trip on
    /// every close.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _op = self.shared.time("flush");
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _op = self.shared.time("release");
        match self.shared.release(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("release", &e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _op = self.shared.time("fsync");
        match self.shared.fsync(Some(fh.0), datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("fsync", &e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _op = self.shared.time("opendir");
        match self.shared.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(fail("opendir", &e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        let _op = self.shared.time("readdir");
        self.readdir_reply(fh, offset, reply);
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        let _op = self.shared.time("readdirplus");
        self.readdirplus_reply(fh, offset, reply);
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _op = self.shared.time("releasedir");
        self.shared.handles.remove_dir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _op = self.shared.time("fsyncdir");
        match self.shared.fsync(None, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("fsyncdir", &e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _op = self.shared.time("statfs");
        match self.shared.statfs() {
            Ok(st) => reply.statfs(
                st.blocks(),
                st.blocks_free(),
                st.blocks_available(),
                st.files(),
                st.files_free(),
                st.block_size() as u32,
                btfs_core::MAX_NAME_LEN as u32,
                st.fragment_size() as u32,
            ),
            Err(e) => reply.error(fail("statfs", &e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _op = self.shared.time("fallocate");
        match self.shared.fallocate(fh.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("fallocate", &e)),
        }
    }
}

impl<B> Shared<B> {
    /// Times one FUSE operation for metrics (`FsConfig::metrics`), until
    /// the result is dropped.
    pub(super) fn time(&self, op: &'static str) -> Option<btfs_metrics::OpTimer> {
        self.cfg.metrics.as_ref().map(|m| m.time(op))
    }
}
