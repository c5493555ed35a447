"""test_style.py — every C file is formatted with the repo's .clang-format."""

import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not shutil.which("clang-format"), reason="clang-format not installed")
def test_c_sources_are_clang_formatted():
    files = subprocess.run(["git", "ls-files", "*.c", "*.h"], cwd=REPO, stdout=subprocess.PIPE, text=True,
                           check=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    bad = []
    for f in files:
        r = subprocess.run(["clang-format", "--dry-run", "--Werror", f], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            bad.append(f)
    assert not bad, "run `make format`: %s" % " ".join(bad)
