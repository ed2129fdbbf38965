"""FUSE mount of the cluster (pyfuse3 over libfuse3): `mount_main` / `umount_main` back `seekstack fs mount/umount`.

pyfuse3 is imported only when a mount is served, so this package imports without it.

>>> # mount_main(["/mnt/3fs", "--data", "/tmp/3fs"]); umount_main(["/mnt/3fs"])
"""


def mount_main(argv=None) -> int:
    """See `seekstack.fs.fuse.main.mount_main`."""
    from seekstack.fs.fuse.main import mount_main as _main

    return _main(argv)


def umount_main(argv=None) -> int:
    """See `seekstack.fs.fuse.main.umount_main`."""
    from seekstack.fs.fuse.main import umount_main as _main

    return _main(argv)


def is_mounted(mountpoint) -> bool:
    """See `seekstack.fs.fuse.main.is_mounted`."""
    from seekstack.fs.fuse.main import is_mounted as _is

    return _is(mountpoint)


__all__ = ["is_mounted", "mount_main", "umount_main"]
