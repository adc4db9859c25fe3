"""Model resolution: ``builtin:NAME``, a local folder, or a Hugging Face id in the local cache.

Built-ins are generated on first use (this environment can download no weights) into a
cache folder, atomically and under a file lock so replicas starting together build once.
Whatever the source, callers get a plain folder for ``from_pretrained``, so the built-ins
exercise exactly the loading code a real checkpoint goes through.

CLI::

    python -m serve_app.models list
    python -m serve_app.models build tiny-qwen3-vl --out /tmp/tiny
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from serve_app import _builtin_models

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS: dict[str, str] = {
    BUILTIN_PREFIX + name: desc for name, (desc, _) in _builtin_models.BUILDERS.items()
}
# Marks a finished build; written last, so a folder without it is never returned.
_DONE_MARKER = ".serve_app_built"
_TOKENIZER_DIR = "_qwen-tokenizer"


class ModelNotFoundError(ValueError):
    """The model name resolves to nothing usable here (no downloads are possible)."""


def is_builtin(name: str) -> bool:
    """True for a known ``builtin:NAME``."""
    return name in BUILTIN_MODELS


def default_cache_dir() -> str:
    return os.environ.get("SERVE_APP_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "serve_app", "models")


def _builtin_list() -> str:
    return ", ".join(f"{name} ({desc})" for name, desc in BUILTIN_MODELS.items())


def _strip_prefix(name: str) -> str:
    return name[len(BUILTIN_PREFIX):] if name.startswith(BUILTIN_PREFIX) else name


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive fcntl lock on ``path`` (blocks until the holder is done)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_built(folder: Path, version: str) -> bool:
    marker = folder / _DONE_MARKER
    return marker.is_file() and marker.read_text().split("\n", 1)[0] == version


def _build_once(cache: Path, dirname: str, build: Callable[[Path], Any], version: str) -> Path:
    """Build ``cache/dirname`` with ``build(tmp_dir)`` unless built at ``version``; atomic, locked.

    The build goes to a temp folder in the same parent and is renamed into place, so a
    crash never leaves a half-written model under the final name. A folder built by an
    older builder version (other weights or files) is rebuilt and swapped in.
    """
    final = cache / dirname
    if _is_built(final, version):
        return final
    with _locked(cache / f".{dirname}.lock"):
        if _is_built(final, version):  # another process built it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{dirname}.tmp-", dir=cache))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the model from other users
            build(tmp)
            (tmp / _DONE_MARKER).write_text(f"{version}\nbuilt {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            if final.exists():  # stale version, or an interrupted pre-marker layout
                stale = Path(tempfile.mkdtemp(prefix=f".{dirname}.old-", dir=cache))
                os.rename(final, stale / dirname)
                os.rename(tmp, final)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def build_builtin(name: str, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                  log: Callable[[str], None] | None = None) -> str:
    """Write built-in ``name`` (with or without ``builtin:``) into ``out_dir``; no caching.

    ``tokenizer_dir``: a folder with an already converted tokenizer to copy (saves seconds).
    """
    short = _strip_prefix(name)
    if short not in _builtin_models.BUILDERS:
        raise ModelNotFoundError(f"unknown built-in model '{name}'. Built-in models: {_builtin_list()}")
    _, builder = _builtin_models.BUILDERS[short]
    builder(out_dir, tokenizer_dir=tokenizer_dir, log=log)
    return str(out_dir)


def _resolve_builtin(name: str, cache_dir: str | None) -> str:
    if not is_builtin(name):
        raise ModelNotFoundError(f"unknown built-in model '{name}'. Built-in models: {_builtin_list()}")
    cache = Path(cache_dir or default_cache_dir()).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    short = _strip_prefix(name)
    # The tokenizer is shared by both built-ins: convert it once per cache.
    version = _builtin_models.BUILD_VERSION
    tok_dir = _build_once(cache, _TOKENIZER_DIR, _builtin_models.write_tokenizer, version)
    return str(_build_once(cache, short, lambda tmp: build_builtin(name, tmp, tokenizer_dir=tok_dir), version))


def _from_hf_cache(repo_id: str) -> str | None:
    """The local snapshot folder of ``repo_id`` if the HF cache has it; never touches the network."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached, malformed id, hub lib missing: all mean "not here"
        return None
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def resolve_model(name_or_path: str, cache_dir: str | None = None) -> str:
    """A local folder holding the model, for ``from_pretrained``.

    ``builtin:NAME`` builds on first use into ``cache_dir`` (default ``$SERVE_APP_CACHE``
    or ``~/.cache/serve_app/models``); a folder with config.json is returned as is; any
    other name must already be in the Hugging Face cache. Raises ModelNotFoundError.
    """
    if name_or_path.startswith(BUILTIN_PREFIX):
        return _resolve_builtin(name_or_path, cache_dir)
    path = os.path.expanduser(name_or_path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return os.path.abspath(path)
    cached = _from_hf_cache(name_or_path)
    if cached is not None:
        return cached
    hint = (f" (did you mean '{BUILTIN_PREFIX}{name_or_path}'?)"
            if is_builtin(BUILTIN_PREFIX + name_or_path) else "")
    raise ModelNotFoundError(
        f"model '{name_or_path}' not found: not a built-in, not a local folder with config.json, "
        f"and not in the Hugging Face cache (no downloads in this environment){hint}. "
        f"Built-in models: {_builtin_list()}")


# --------------------------------------------------------------------------- loading helpers


def load_tokenizer(path: str) -> Any:
    """The fast tokenizer of a resolved model folder (chat template included)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_image_processor(path: str) -> Any:
    """The Qwen-VL image processor of a model folder.

    transformers' default (torchvision) backend where torchvision is installed, else the
    PIL backend - same resize/normalise maths, same ``pixel_values``/``image_grid_thw``.
    """
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        try:
            from transformers import AutoImageProcessor

            return AutoImageProcessor.from_pretrained(path)
        except ImportError:  # torchvision present but unusable (e.g. built for another torch)
            pass
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(path)


def load_model(path: str, dtype: Any = "auto", device: Any = "cpu") -> Any:
    """Qwen3VLForConditionalGeneration from a model folder, in eval mode on ``device``."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=dtype, device_map=str(device))
    return model.eval()


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.models", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the built-in models")
    b = sub.add_parser("build", help="write a built-in model folder")
    b.add_argument("name", help="built-in name, with or without 'builtin:'")
    b.add_argument("--out", help="folder to write (created); default: the model cache, as on first use")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        for name, desc in BUILTIN_MODELS.items():
            print(f"{name}\t{desc}")
        return 0
    name = args.name if args.name.startswith(BUILTIN_PREFIX) else BUILTIN_PREFIX + args.name
    if not is_builtin(name):
        print(f"error: unknown built-in model '{args.name}'. Built-in models: {_builtin_list()}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if args.out is None:  # same place and locking as a replica's first use
        print(f"{name} ready at {resolve_model(name)} ({time.perf_counter() - t0:.1f}s)")
        return 0
    build_builtin(name, args.out, log=lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True))
    print(f"built {name} into {args.out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
