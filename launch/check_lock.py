"""Check that a lock file installs on a target machine, without downloading a wheel.

    python -m launch.check_lock requirements-cuda.lock          # Linux x86_64, CPython 3.11 (the default)
    python -m launch.check_lock requirements.lock --index https://download.pytorch.org/whl/cpu

For every ``name==version`` pin it asks the package index (PEP 691 JSON) for a wheel of that version whose
tags the target accepts (CPython 3.11, manylinux x86_64), then reads that wheel's own requirements (its
PEP 658 ``.metadata`` file, or the METADATA inside the wheel through HTTP range requests: a few kilobytes,
never the wheel) and checks each one the target needs is met by another pin of the same lock. A lock installed
with ``pip install --no-deps`` gets no such check from pip: a wrong or missing pin shows only at import time,
on the GPU machine. Exits 1 and names each pin that has no wheel and each requirement that no pin meets.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import Specifier
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

PYPI = "https://pypi.org/simple"
JSON = "application/vnd.pypi.simple.v1+json"
# a CUDA training node: CPython 3.11, x86_64, glibc 2.35 (Ubuntu 22.04, the base of the CUDA 13 images)
TARGET = {"python": (3, 11), "glibc": (2, 35), "machine": "x86_64"}


def target_tags(python: tuple[int, int] = TARGET["python"], glibc: tuple[int, int] = TARGET["glibc"],
                machine: str = TARGET["machine"]) -> set[Tag]:
    """The wheel tags pip on the target accepts (newest glibc it has first, down to manylinux1)."""
    platforms = [f"manylinux_{glibc[0]}_{m}_{machine}" for m in range(glibc[1], 4, -1)]
    platforms += [f"manylinux2014_{machine}", f"manylinux2010_{machine}", f"manylinux1_{machine}", f"linux_{machine}"]
    return set(cpython_tags(python, platforms=platforms)) | set(compatible_tags(python, platforms=platforms))


def target_environment(python: tuple[int, int] = TARGET["python"], machine: str = TARGET["machine"]) -> dict:
    """PEP 508 marker values of the target, for which of a wheel's requirements apply there."""
    v = f"{python[0]}.{python[1]}"
    return {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix", "platform_machine": machine,
            "python_version": v, "python_full_version": f"{v}.0", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "extra": ""}


def read_lock(path: Path) -> dict[str, tuple[str, str, list[str]]]:
    """``{canonical name: (name as written, version, [extras])}`` of every ``name==version`` line."""
    pins = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        if len(spec) != 1 or spec[0].operator != "==" or "*" in spec[0].version:
            raise ValueError(f"{path}:{n}: {line!r} is not an exact name==version pin")
        pins[canonicalize_name(req.name)] = (req.name, spec[0].version, sorted(req.extras))
    return pins


SKIP = "# check-lock skip-requirements:"


def skipped_in(path: Path) -> set[str]:
    """The pins whose own requirements the lock leaves out on purpose, from its ``# check-lock
    skip-requirements: a b`` line (packages that only carry data, or whose requirement another pin provides)."""
    names = set()
    for line in path.read_text().splitlines():
        if line.startswith(SKIP):
            names |= {canonicalize_name(n) for n in line[len(SKIP):].split()}
    return names


def http(url: str, headers: dict | None = None) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=120) as r:
        return r.read()


def pick_wheel(files: list[dict], version: str, tags: set[Tag]) -> dict | None:
    """The first non-yanked wheel of ``version`` that the target accepts (as pip's ``==``: ``2.13.0`` also
    matches a local ``2.13.0+cu130``)."""
    for f in files:
        name = f["filename"]
        if not name.endswith(".whl") or f.get("yanked"):
            continue
        try:
            _, v, _, wheel_tags = parse_wheel_filename(name)
        except InvalidWheelFilename:  # an old upload, before the names were standard
            continue
        if Specifier(f"=={version}").contains(v, prereleases=True) and wheel_tags & tags:
            return f
    return None


def remote_metadata(url: str) -> str:
    """The wheel's METADATA: its PEP 658 file if the index serves one, else the member read out of the remote
    zip with two or three HTTP range requests (the central directory sits at the end of the file)."""
    try:
        return http(url + ".metadata").decode()
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise
    tail = http(url, {"Range": "bytes=-65536"})
    eocd = tail.rfind(b"PK\x05\x06")
    if eocd < 0:
        raise ValueError(f"{url}: no zip directory in the last 64 KiB")
    size, offset = struct.unpack("<II", tail[eocd + 12:eocd + 20])
    directory = http(url, {"Range": f"bytes={offset}-{offset + size - 1}"})
    # a zip of just the directory entries and the one member we need, rebuilt in memory
    for name, local, length in _entries(directory):
        if name.endswith(".dist-info/METADATA") and name.count("/") == 1:
            blob = http(url, {"Range": f"bytes={local}-{local + 30 + len(name) + 1024 + length}"})
            return _inflate(blob, name, length)
    raise ValueError(f"{url}: the wheel has no .dist-info/METADATA")


def _entries(directory: bytes):
    """(name, local header offset, compressed size) of each central-directory entry."""
    i = 0
    while directory[i:i + 4] == b"PK\x01\x02":
        comp, = struct.unpack("<I", directory[i + 20:i + 24])
        n, extra, comment = struct.unpack("<HHH", directory[i + 28:i + 34])
        local, = struct.unpack("<I", directory[i + 42:i + 46])
        yield directory[i + 46:i + 46 + n].decode(), local, comp
        i += 46 + n + extra + comment


def _inflate(blob: bytes, name: str, length: int) -> str:
    method, = struct.unpack("<H", blob[8:10])
    n, extra = struct.unpack("<HH", blob[26:30])
    data = blob[30 + n + extra:30 + n + extra + length]
    if method == 0:
        return data.decode()
    import zlib

    return zlib.decompress(data, -15).decode()


@dataclass
class Problem:
    pin: str
    what: str

    def __str__(self) -> str:
        return f"{self.pin}: {self.what}"


def check_pin(name: str, version: str, indexes: list[str], tags: set[Tag]) -> tuple[dict | None, list[Problem]]:
    """The wheel of one pin on the first index that has it, or the problem."""
    pin = f"{name}=={version}"
    seen = []
    for index in indexes:
        try:
            files = json.loads(http(f"{index.rstrip('/')}/{canonicalize_name(name)}/", {"Accept": JSON}))["files"]
        except urllib.error.HTTPError as e:
            if e.code == 404:
                continue
            raise
        seen.append(index)
        wheel = pick_wheel(files, version, tags)
        if wheel is not None:
            return wheel, []
    where = ", ".join(seen) if seen else "no index lists the package"
    return None, [Problem(pin, f"no wheel for the target (CPython {TARGET['python'][0]}.{TARGET['python'][1]}, "
                               f"manylinux x86_64 up to this glibc; {where})")]


def unmet(metadata: str, pin: str, extras: list[str], pins: dict, env: dict) -> list[Problem]:
    """The requirements of one wheel (with the extras it is pinned with) that apply on the target and that no
    pin of the lock meets."""
    problems = []
    for line in Parser().parsestr(metadata).get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in [""] + extras):
            continue
        have = pins.get(canonicalize_name(req.name))
        if have is None:
            problems.append(Problem(pin, f"needs {line.split(';')[0].strip()}, which the lock does not pin"))
        elif not req.specifier.contains(have[1], prereleases=True):
            problems.append(Problem(pin, f"needs {line.split(';')[0].strip()}, the lock pins {have[0]}=={have[1]}"))
        elif not set(req.extras) <= set(have[2]):
            problems.append(Problem(pin, f"needs {req.name}[{','.join(sorted(req.extras))}], the lock pins "
                                         f"{have[0]} with extras {have[2]}"))
    return problems


def check(lock: Path, indexes: list[str], skip_requirements: set[str] = frozenset(),
          glibc: tuple[int, int] = TARGET["glibc"], jobs: int = 16) -> list[Problem]:
    pins = read_lock(lock)
    tags, env = target_tags(glibc=glibc), target_environment()

    def one(item):
        key, (name, version, extras) = item
        wheel, problems = check_pin(name, version, indexes, tags)
        if wheel is not None and key not in skip_requirements:
            problems += unmet(remote_metadata(wheel["url"]), f"{name}=={version}", extras, pins, env)
        return problems

    with ThreadPoolExecutor(jobs) as pool:
        return [p for ps in pool.map(one, sorted(pins.items())) for p in ps]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lock", type=Path, help="a lock file of name==version lines")
    p.add_argument("--index", action="append", default=None,
                   help=f"a PEP 691 simple index, tried in order (default {PYPI}); repeat for several")
    p.add_argument("--glibc", default=".".join(map(str, TARGET["glibc"])),
                   help="the target's glibc (manylinux) version, e.g. 2.28 for RHEL 8 (default: %(default)s)")
    p.add_argument("--skip-requirements", nargs="*", default=[],
                   help=f"pins whose own requirements are left out on purpose, besides those of the lock's "
                        f"'{SKIP}' line: their wheel is still checked")
    args = p.parse_args()
    skip = skipped_in(args.lock) | {canonicalize_name(n) for n in args.skip_requirements}
    glibc = tuple(int(x) for x in args.glibc.split("."))
    problems = check(args.lock, args.index or [PYPI], skip, glibc)
    n = len(read_lock(args.lock))
    for problem in problems:
        print(problem)
    print(f"{args.lock}: {n} pins, {len(problems)} problem(s) for CPython {'.'.join(map(str, TARGET['python']))} "
          f"manylinux_{glibc[0]}_{glibc[1]}_{TARGET['machine']}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
