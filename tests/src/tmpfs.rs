//! Small filesystems a test fills: a tmpfs of a given size mounted on a directory the test owns,
//! unmounted when dropped, and a filler file that takes every byte left on it.
//!
//! Needs root (CAP_SYS_ADMIN) and the `mount` command; [`Tmpfs::mount`] says why it cannot run
//! otherwise, and the tests skip with that message. The mount is made on a directory inside the
//! test's own temp dir (never on a shared path) and is detached (`umount -l`) on drop, so a
//! process still holding files there (an agent being killed) cannot keep it mounted.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on a directory of the test's.
#[derive(Debug)]
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` bytes on `dir` (created if missing; it should be empty). An
    /// error says why it cannot be done here (not root, no `mount`, no permission).
    pub fn mount(dir: &Path, bytes: u64) -> Result<Tmpfs, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("not root: mounting a tmpfs needs CAP_SYS_ADMIN".into());
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={bytes},mode=0755"))
            .arg("tmpfs")
            .arg(dir)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs on {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }

    /// Where it is mounted.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes free on it.
    pub fn free(&self) -> u64 {
        let s = rustix::fs::statvfs(&self.dir).expect("statvfs");
        s.f_bavail * s.f_frsize
    }

    /// Fills it: writes `name` (in its root) until the filesystem refuses for lack of room,
    /// leaving at most `leave` bytes free (0: full). Panics on any other error.
    pub fn fill(&self, name: &str, leave: u64) -> Filler {
        let path = self.dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("filler file");
        let chunk = vec![0x5au8; 64 << 10];
        loop {
            let free = self.free();
            if free <= leave {
                break;
            }
            let n = (free - leave).min(chunk.len() as u64) as usize;
            match f.write(&chunk[..n]) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        let _ = f.sync_all();
        Filler { path }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
    }
}

/// The file that fills a [`Tmpfs`]; [`Filler::free`] gives the room back.
#[derive(Debug)]
pub struct Filler {
    path: PathBuf,
}

impl Filler {
    /// Removes the filler: the room it took is free again.
    pub fn free(self) {
        std::fs::remove_file(&self.path).expect("remove filler");
    }
}
