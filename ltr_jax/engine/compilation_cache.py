"""JAX's persistent compilation cache: where compiled engine and ranker shapes are kept between runs."""

from __future__ import annotations

from pathlib import Path

from ltr_jax.models.default_model import cache_dir


class CompilationCacheError(RuntimeError):
    """The cache directory cannot be used; the message names the setting and the fix."""


def enable_compilation_cache(setting: str | None, key: str = "engine.compilation_cache_dir",
                             off: str = "null") -> Path | None:
    """Point JAX's persistent compilation cache at ``setting`` ('default' = <user cache>/jax_cache; None: off).

    ``key`` and ``off`` name the setting and its disabling value in the error a failure raises."""
    if setting is None:
        return None
    import jax

    path = cache_dir() / "jax_cache" if setting == "default" else Path(setting).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CompilationCacheError(f"{key} = {setting!r}: cannot create {path} ({err}); "
                                    f"give a writable directory or {off} to disable the cache") from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
