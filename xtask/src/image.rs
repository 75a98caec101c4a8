//! `cargo xtask image linux`: a Linux guest built from Debian's packages, for
//! hosts whose KVM can run stock Linux (hardware KVM; not PVM).
//!
//! - the kernel: `linux-image-cloud-amd64`'s bzImage (it has a PVH entry too);
//! - an initramfs (written here as a `newc` cpio archive) holding
//!   `busybox-static`, the virtio modules and the ACPI power button's
//!   (`button`, `evdev`), whose `/init` loads them in dependency order,
//!   starts busybox `acpid` (a power button press runs
//!   `/etc/acpi/PWRF/00000080`, which syncs, unmounts and powers off: this is
//!   how `neph-vmm`'s graceful shutdown reaches Linux), mounts the root disk
//!   and prints a ready marker;
//! - an ext4 root disk made by `mkfs.ext4 -d`.
//!
//! Packages are fetched with `apt-get download` and unpacked with `dpkg -x`,
//! never installed; the result is cached under
//! `target/images/linux/<kernel>-r<RECIPE>/`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{deps, exec, root};

/// Modules the guest needs, by name; their dependencies are added from each
/// module's own `depends=` field.
const WANTED_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio-rng",
    "evdev",
    "button",
];

/// Bumped whenever what goes into the image changes, so caches rebuild.
const RECIPE: u32 = 2;

/// What acpid runs on a power button press.
const POWER_BUTTON_SCRIPT: &str = "#!/bin/sh
echo \"NEPH-LINUX power button: powering off\"
sync
umount /mnt 2>/dev/null
poweroff -f
";

/// What `/init` prints once the guest is up; tests wait for it.
pub const LINUX_READY_MARKER: &str = "NEPH-LINUX READY";

/// The files of a built Linux guest.
#[derive(Debug)]
pub struct LinuxImage {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub rootfs: PathBuf,
}

impl LinuxImage {
    /// The folder holding the three files.
    pub fn dir(&self) -> &Path {
        self.kernel.parent().unwrap_or(Path::new("."))
    }
}

pub fn run(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("linux") => {
            let image = build_linux()?;
            println!("kernel    {}", image.kernel.display());
            println!("initramfs {}", image.initramfs.display());
            println!("rootfs    {}", image.rootfs.display());
            Ok(())
        }
        _ => Err("usage: cargo xtask image linux".into()),
    }
}

/// Builds (or finds in the cache) the Linux guest.
pub fn build_linux() -> Result<LinuxImage, String> {
    deps::ensure_commands(&[("mkfs.ext4", "e2fsprogs"), ("dpkg-deb", "dpkg")])?;
    let kernel_package = resolve_kernel_package()?;
    let cache = root()
        .join("target")
        .join("images")
        .join("linux")
        .join(format!("{kernel_package}-r{RECIPE}"));
    let image = LinuxImage {
        kernel: cache.join("vmlinuz"),
        initramfs: cache.join("initramfs.cpio"),
        rootfs: cache.join("rootfs.ext4"),
    };
    if image.kernel.is_file() && image.initramfs.is_file() && image.rootfs.is_file() {
        return Ok(image);
    }

    let work = cache.join("work");
    let _ = fs::remove_dir_all(&work);
    let debs = work.join("debs");
    let tree = work.join("tree");
    create_dir(&debs)?;
    create_dir(&tree)?;
    exec(Command::new("apt-get").current_dir(&debs).args([
        "download",
        &kernel_package,
        "busybox-static",
    ]))?;
    for entry in read_dir(&debs)? {
        exec(Command::new("dpkg").arg("-x").arg(&entry).arg(&tree))?;
    }

    let kernel_release = kernel_package
        .strip_prefix("linux-image-")
        .ok_or_else(|| format!("unexpected kernel package name {kernel_package}"))?;
    copy(
        &tree.join("boot").join(format!("vmlinuz-{kernel_release}")),
        &image.kernel,
    )?;

    let modules_dir = tree.join("lib").join("modules").join(kernel_release);
    let modules = module_load_order(&modules_dir, WANTED_MODULES)?;
    let mut cpio = Cpio::default();
    for dir in [
        "bin",
        "dev",
        "proc",
        "sys",
        "mnt",
        "lib",
        "lib/modules",
        "etc",
        "etc/acpi",
        "etc/acpi/PWRF",
        "var",
        "var/log",
        "var/run",
    ] {
        cpio.dir(dir);
    }
    cpio.file(
        "etc/acpi/PWRF/00000080",
        0o755,
        POWER_BUTTON_SCRIPT.as_bytes(),
    );
    cpio.file(
        "bin/busybox",
        0o755,
        &read(&tree.join("bin").join("busybox"))?,
    );
    let mut load = String::new();
    for (name, path) in &modules {
        cpio.file(&format!("lib/modules/{name}.ko"), 0o644, &read(path)?);
        load.push_str(&format!("insmod /lib/modules/{name}.ko\n"));
    }
    cpio.file("init", 0o755, init_script(&load).as_bytes());
    write(&image.initramfs, &cpio.finish())?;

    let rootfs_tree = work.join("rootfs");
    create_dir(&rootfs_tree.join("etc"))?;
    write(
        &rootfs_tree.join("etc").join("neph-release"),
        format!("nephele linux guest, kernel {kernel_release}\n").as_bytes(),
    )?;
    let _ = fs::remove_file(&image.rootfs);
    exec(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "nephroot", "-d"])
            .arg(&rootfs_tree)
            .arg(&image.rootfs)
            .arg("64M"),
    )?;
    let _ = fs::remove_dir_all(&work);
    Ok(image)
}

/// `linux-image-cloud-amd64` is a metapackage; the kernel is its dependency.
fn resolve_kernel_package() -> Result<String, String> {
    let depends = |update: bool| -> Result<Option<String>, String> {
        if update {
            exec(Command::new("apt-get").args(["update", "-qq"]))?;
        }
        let out = Command::new("apt-cache")
            .args(["depends", "linux-image-cloud-amd64"])
            .output()
            .map_err(|e| format!("could not run apt-cache: {e}"))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with("linux-image-"))
            .map(str::to_string))
    };
    match depends(false)? {
        Some(p) => Ok(p),
        None => depends(true)?.ok_or_else(|| {
            "apt-cache knows no linux-image-cloud-amd64: is this Debian with its main archive?"
                .to_string()
        }),
    }
}

/// Orders `wanted` and everything they depend on so that each module comes
/// after its dependencies, reading `depends=` from each `.ko`'s modinfo.
fn module_load_order(dir: &Path, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>, String> {
    let mut index = BTreeMap::new();
    index_modules(dir, &mut index)?;
    let mut order = Vec::new();
    let mut stack: Vec<(String, bool)> = wanted
        .iter()
        .rev()
        .map(|m| (m.to_string(), false))
        .collect();
    while let Some((name, deps_done)) = stack.pop() {
        if order.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let path: &PathBuf = index
            .get(&name.replace('-', "_"))
            .ok_or_else(|| format!("module {name} is not in {}", dir.display()))?;
        if deps_done {
            order.push((name, path.clone()));
            continue;
        }
        let deps = modinfo_depends(&read(path)?);
        stack.push((name, true));
        for dep in deps.into_iter().rev() {
            if !order.iter().any(|(n, _)| *n == dep) {
                if stack.len() > 256 {
                    return Err(format!("module dependencies of {dep} do not resolve"));
                }
                stack.push((dep, false));
            }
        }
    }
    Ok(order)
}

fn index_modules(dir: &Path, index: &mut BTreeMap<String, PathBuf>) -> Result<(), String> {
    for path in read_dir(dir)? {
        if path.is_dir() {
            index_modules(&path, index)?;
        } else if let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ko"))
        {
            index.insert(stem.replace('-', "_"), path);
        }
    }
    Ok(())
}

/// The comma-separated `depends=` value in a module's `.modinfo` strings.
fn modinfo_depends(module: &[u8]) -> Vec<String> {
    let key = b"depends=";
    module
        .split(|b| *b == 0)
        .find_map(|s| s.strip_prefix(key.as_slice()))
        .map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .filter(|d| !d.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn init_script(load_modules: &str) -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
{load_modules}acpid
root=none
if [ -b /dev/vda ] && mount -t ext4 /dev/vda /mnt; then root=$(cat /mnt/etc/neph-release); fi
echo "{LINUX_READY_MARKER} cpus=$(nproc) mem_kib=$(awk '/MemTotal/ {{print $2}}' /proc/meminfo) root=\"$root\""
exec setsid cttyhack sh
"#
    )
}

/// A `newc` cpio archive, the format the kernel unpacks as an initramfs.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[]);
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | mode, data);
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.inode += 1;
        let name_size = name.len() + 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.inode,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len(),
            0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
            name_size,
            0, // check
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

fn create_dir(path: &Path) -> Result<(), String> {
    fs::create_dir_all(path).map_err(|e| format!("could not create {}: {e}", path.display()))
}

fn read_dir(path: &Path) -> Result<Vec<PathBuf>, String> {
    let entries =
        fs::read_dir(path).map_err(|e| format!("could not list {}: {e}", path.display()))?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    Ok(paths)
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    fs::read(path).map_err(|e| format!("could not read {}: {e}", path.display()))
}

fn write(path: &Path, data: &[u8]) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        create_dir(parent)?;
    }
    fs::write(path, data).map_err(|e| format!("could not write {}: {e}", path.display()))
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    if let Some(parent) = to.parent() {
        create_dir(parent)?;
    }
    fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("could not copy {} to {}: {e}", from.display(), to.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_depends_reads_the_field() {
        let module = b"\0license=GPL\0depends=virtio_ring,virtio\0vermagic=6.1\0";
        assert_eq!(modinfo_depends(module), vec!["virtio_ring", "virtio"]);
        assert!(modinfo_depends(b"\0depends=\0").is_empty());
        assert!(modinfo_depends(b"no modinfo here").is_empty());
    }

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut cpio = Cpio::default();
        cpio.file("init", 0o755, b"abc");
        let out = cpio.finish();
        assert!(out.starts_with(b"070701"));
        assert!(out.len().is_multiple_of(4));
        let trailer = out.windows(10).position(|w| w == b"TRAILER!!!");
        assert!(trailer.is_some());
        // The file's data follows its 110-byte header and padded name.
        // 110 header bytes and "init\0" are 115, padded to 116.
        let data_at = 116;
        assert_eq!(&out[data_at..data_at + 3], b"abc");
    }

    #[test]
    fn load_order_puts_dependencies_first() {
        let dir = tempdir();
        fs::write(dir.join("a.ko"), b"\0depends=b,c\0").unwrap();
        fs::write(dir.join("b.ko"), b"\0depends=c\0").unwrap();
        fs::write(dir.join("c.ko"), b"\0depends=\0").unwrap();
        let order = module_load_order(&dir, &["a"]).unwrap();
        let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["c", "b", "a"]);
        assert!(module_load_order(&dir, &["missing"]).is_err());
        fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-image-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }
}
