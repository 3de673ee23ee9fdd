"""A Debian bookworm root file system booted with systemd-nspawn: a real systemd (PID 1) for unit tests.

Recipe: /work/shared/systemd/README.md. The rootfs (debootstrap minbase + systemd, python3, venv)
is built once and kept as a tarball in $EDGE_AGENT_ROOTFS_CACHE (default
/var/cache/edge-agent-test-rootfs); each test extracts a fresh copy, so no state leaks between runs.
The container shares the host's network (a broker on 127.0.0.1 is reachable from inside).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

SUITE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv")
CACHE_ENV = "EDGE_AGENT_ROOTFS_CACHE"
DEFAULT_CACHE = Path("/var/cache/edge-agent-test-rootfs")
NSPAWN_DIR = Path("/run/systemd/nspawn")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def tarball_path() -> Path:
    return cache_dir() / f"{SUITE}-minbase-{'-'.join(p.replace('systemd-', 'sd-') for p in PACKAGES)}.tar"


def unavailable_reason() -> str | None:
    """Why systemd-nspawn cannot run here (None: it can). Installs nothing."""
    if os.geteuid() != 0:
        return "systemd-nspawn needs root (run the systemd tests as root)"
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn is not installed (apt-get install systemd-container)"
    if shutil.which("debootstrap") is None and not tarball_path().exists():
        return (f"debootstrap is not installed (apt-get install debootstrap) and there is no cached rootfs "
                f"{tarball_path()}")
    if not NSPAWN_DIR.is_dir() or not os.path.ismount(NSPAWN_DIR):
        # systemd-nspawn keeps per-container state here; on hosts not booted with systemd it must be a
        # writable mount (see /work/shared/systemd/README.md).
        try:
            NSPAWN_DIR.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(NSPAWN_DIR)], check=True,
                           capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            return f"cannot mount a tmpfs on {NSPAWN_DIR} (needed by systemd-nspawn here): {detail}"
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_tarball(log: list[str] | None = None) -> Path:
    """The cached rootfs tarball, built with debootstrap when missing (about a minute here)."""
    tar = tarball_path()
    with _locked(tar.with_suffix(".lock")):
        if tar.exists():
            return tar
        work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=tar.parent))
        try:
            t0 = time.monotonic()
            proc = subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(work / "root")],
                check=False, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"debootstrap failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                   f"{proc.stderr[-3000:]}")
            t1 = time.monotonic()
            tmp = work / "rootfs.tar"
            subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", str(work / "root"), "-cf", str(tmp), "."],
                           check=True, capture_output=True, timeout=600)
            os.replace(tmp, tar)
            if log is not None:
                log.append(f"debootstrap {t1 - t0:.1f} s, tarball {time.monotonic() - t1:.1f} s "
                           f"({tar.stat().st_size / 1e6:.0f} MB at {tar})")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return tar


def extract(tar: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", str(dest), "-xf", str(tar)], check=True,
                   capture_output=True, timeout=600)
    return dest


def _base(rootfs: Path, binds_ro: dict[str, str] | None) -> list[str]:
    cmd = ["systemd-nspawn", "-q", "--keep-unit", "--register=no", "-D", str(rootfs)]
    for host, inside in (binds_ro or {}).items():
        cmd.append(f"--bind-ro={host}:{inside}")
    return cmd


def run_in(rootfs: Path, script: str, *, binds_ro: dict[str, str] | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a shell script inside the rootfs without booting it (installing things, preparing files)."""
    return subprocess.run([*_base(rootfs, binds_ro), "/bin/sh", "-c", script], check=False,
                          capture_output=True, text=True,
                          timeout=timeout)


def boot(rootfs: Path, *, timeout: float = 240, binds_ro: dict[str, str] | None = None) -> tuple[int | None, str]:
    """Boot the rootfs until it powers off (the test's checker unit does that); (exit code or None, console)."""
    proc = subprocess.Popen([*_base(rootfs, binds_ro), "-b", "--console=pipe"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        # Only this container's process group: systemd-nspawn and what it started.
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        return None, out


def write(rootfs: Path, path: str, text: str, mode: int = 0o644) -> Path:
    p = rootfs / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    p.chmod(mode)
    return p


def enable(rootfs: Path, unit: str, target: str = "multi-user.target") -> None:
    """`systemctl enable` done by hand (the WantedBy= symlink), no systemd needed."""
    link = rootfs / "etc/systemd/system" / f"{target}.wants" / unit
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(f"/etc/systemd/system/{unit}")
