"""The guards of the public contract: `buf breaking` against the released baseline catches what breaks clients."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUF = ROOT / ".cache" / "npm" / "node_modules" / ".bin" / "buf"
BASELINE = ROOT / "protos" / "baseline" / "scholarembed-v1.binpb"
EMBEDDING = "protos/scholarembed/v1/embedding.proto"
SEARCH = "protos/scholarembed/v1/search.proto"

pytestmark = pytest.mark.skipif(not BUF.exists(), reason="buf is installed by `make check-protos`")


def breaking(tmp_path: Path, file: str = EMBEDDING, old: str = "", new: str = "") -> subprocess.CompletedProcess[str]:
    """`buf breaking` as `make check-protos` runs it, on a copy of the contract with one edit."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    edited = tmp_path / file
    text = edited.read_text()
    assert text.count(old) == 1, f"{old!r} must occur once in {file}"
    edited.write_text(text.replace(old, new))
    return subprocess.run(
        [str(BUF), "breaking", "--against", str(BASELINE)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("file", "old", "new", "complaint"),
    [
        (EMBEDDING, "uint32 token_count = 2;", "uint32 token_count = 7;", 'field "2" with name "token_count"'),
        (SEARCH, "uint32 top_k = 3;", "uint32 max_hits = 3;", 'changed name from "top_k" to "max_hits"'),
        (EMBEDDING, "uint32 dimensions = 4;", "uint64 dimensions = 4;", 'changed type from "uint32" to "uint64"'),
        (SEARCH, "  rpc GetPassages(GetPassagesRequest) returns (GetPassagesResponse);\n", "", 'RPC "GetPassages"'),
        (SEARCH, "  INDEX_KIND_IVF = 3;\n", "", 'enum value "3"'),
        ("protos/google/rpc/status.proto", "int32 code = 1;", "int64 code = 1;", 'on message "Status" changed type'),
    ],
    ids=["renumbered-field", "renamed-field", "changed-type", "removed-rpc", "removed-enum-value", "vendored-status"],
)
def test_a_breaking_change_fails_the_check(tmp_path: Path, file: str, old: str, new: str, complaint: str) -> None:
    result = breaking(tmp_path, file, old, new)
    assert result.returncode != 0
    assert complaint in result.stdout, result.stdout + result.stderr


def test_the_current_contract_and_additions_pass(tmp_path: Path) -> None:
    addition = "  // Added later: old clients ignore it.\n  uint64 cached_tokens = 2;\n"
    result = breaking(tmp_path, EMBEDDING, "  uint64 total_tokens = 1;\n", "  uint64 total_tokens = 1;\n" + addition)
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run(
        [str(BUF), "breaking", "--against", str(BASELINE)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
