import platform
import subprocess
import sys

import pytest

from fedrefine.runtime import heap


class FakeLibc:
    def __init__(self):
        self.calls = []

        def mallopt(parameter, value):
            self.calls.append((parameter, value))
            return 1

        self.mallopt = mallopt
        self.gnu_get_libc_version = lambda: b"2.36"


def test_the_heap_keeps_blocks_up_to_32_mib_and_trims_past_4_gib(monkeypatch):
    fake = FakeLibc()
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(heap.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda name: fake)
    assert heap.keep_large_blocks()
    assert fake.calls == [(-3, 32 * 2**20), (-1, 4 * 2**30)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


@pytest.mark.parametrize("variable, value", [("FEDREFINE_GLIBC_HEAP", "default"),
                                             ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1048576")])
def test_a_users_choice_leaves_glibcs_heap_alone(monkeypatch, variable, value):
    fake = FakeLibc()
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda name: fake)
    monkeypatch.setenv(variable, value)
    assert not heap.keep_large_blocks()
    assert fake.calls == []


def test_a_c_library_without_mallopt_is_left_alone(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda name: object())
    assert not heap.keep_large_blocks()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_accepts_the_settings():
    code = "from fedrefine.runtime.heap import keep_large_blocks; raise SystemExit(0 if keep_large_blocks() else 1)"
    env = {"PATH": "/usr/bin:/bin"}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0
