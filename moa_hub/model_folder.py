"""A base model folder: where it is, its architecture and shape, and the files an export carries over."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelError
from .remote import remote_module

logger = logging.getLogger(__name__)

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Small files copied verbatim next to the weights (whichever exist).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
LICENSE_PATTERNS = ("LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY*")
EXTRA_DIRS = ("additional_chat_templates",)


@dataclass(frozen=True)
class MoaArchitecture:
    """How a supported base architecture maps to its MoA remote code."""

    base_architecture: str
    base_model_type: str
    config_class: str
    model_class: str

    @property
    def model_type(self) -> str:
        return f"moa_{self.base_model_type}"

    @property
    def modeling_file(self) -> str:
        return f"modeling_moa_{self.base_model_type}.py"

    def auto_map(self) -> dict[str, str]:
        return {
            "AutoConfig": f"configuration_moa.{self.config_class}",
            "AutoModelForCausalLM": f"{Path(self.modeling_file).stem}.{self.model_class}",
        }


SUPPORTED_ARCHITECTURES: dict[str, MoaArchitecture] = {
    arch.base_architecture: arch
    for arch in (
        MoaArchitecture("LlamaForCausalLM", "llama", "MoaLlamaConfig", "MoaLlamaForCausalLM"),
        MoaArchitecture("MistralForCausalLM", "mistral", "MoaMistralConfig", "MoaMistralForCausalLM"),
        MoaArchitecture("Qwen2ForCausalLM", "qwen2", "MoaQwen2Config", "MoaQwen2ForCausalLM"),
        MoaArchitecture("Qwen3ForCausalLM", "qwen3", "MoaQwen3Config", "MoaQwen3ForCausalLM"),
    )
}


@dataclass(frozen=True)
class ModelFolder:
    """A validated base model folder, ready to export."""

    path: Path
    config: dict[str, Any]
    architecture: MoaArchitecture
    num_layers: int
    num_kv_heads: int
    weight_files: tuple[Path, ...]  # safetensors shards (+ the index), linked
    extra_files: tuple[Path, ...]  # tokenizer, generation config, licences, copied


def resolve_model_dir(model: str | Path) -> Path:
    """Turn MODEL into a local folder. Hub ids are resolved by the resolve stage; here: folders only."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    raise ModelError(
        f"model {str(model)!r} is not a local folder: download it first "
        f"(`hf download {model} --local-dir ./base-model`) and pass the folder"
    )


def read_model_folder(model: str | Path) -> ModelFolder:
    """Read and validate a base model folder; raise ModelError naming what is wrong."""
    path = resolve_model_dir(model)
    config = read_config(path)
    architecture = architecture_of(config, path)
    num_layers, num_kv_heads = model_shape(config, path)
    return ModelFolder(
        path=path,
        config=config,
        architecture=architecture,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        weight_files=tuple(weight_files(path)),
        extra_files=tuple(extra_files(path)),
    )


def read_config(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{str(path)!r} has no config.json: pass a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelError(f"{str(config_path)!r} is not valid JSON ({err}): fix or re-download it") from err
    if not isinstance(config, dict):
        raise ModelError(f"{str(config_path)!r} must hold a JSON object")
    return config


def architecture_of(config: dict[str, Any], path: Path) -> MoaArchitecture:
    model_type = str(config.get("model_type", ""))
    if "moa" in config or model_type.startswith("moa_"):
        base = (config.get("moa") or {}).get("provenance") or {}
        raise ModelError(
            f"{str(path)!r} is already a MoA model (model_type {model_type!r}): export from the base model "
            f"instead{' (' + str(base.get('base_model')) + ')' if base.get('base_model') else ''}"
        )
    architectures = config.get("architectures") or []
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"architecture {architectures or 'missing'} in {str(path)!r} is not supported: "
            f"supported architectures are {supported}"
        )
    arch = SUPPORTED_ARCHITECTURES[architectures[0]]
    if model_type != arch.base_model_type:
        raise ModelError(
            f"config.json says architecture {arch.base_architecture} but model_type {model_type!r}; "
            f"expected {arch.base_model_type!r}: only stock {supported} checkpoints are supported"
        )
    if config.get("auto_map"):
        logger.warning("base config has its own auto_map %s; the export replaces it", config["auto_map"])
    configuration = remote_module("configuration_moa")
    window = configuration.sliding_window_in(config)
    if window is not None:
        raise ModelError(f"{str(path)!r}: {configuration.sliding_window_message(*window)}")
    return arch


def model_shape(config: dict[str, Any], path: Path) -> tuple[int, int]:
    """(num_hidden_layers, num_key_value_heads); kv heads default to the attention heads (MHA)."""
    num_layers = config.get("num_hidden_layers")
    num_kv_heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    if not isinstance(num_layers, int) or not isinstance(num_kv_heads, int) or num_layers <= 0 or num_kv_heads <= 0:
        raise ModelError(
            f"config.json in {str(path)!r} lacks a valid num_hidden_layers / num_key_value_heads "
            f"(got {num_layers!r} / {num_kv_heads!r}): fix the config"
        )
    return num_layers, num_kv_heads


def weight_files(path: Path) -> list[Path]:
    """The safetensors weights (the index and its shards, or model.safetensors)."""
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ModelError(
                f"{str(index)!r} has no readable weight_map ({err}): re-download or re-save the model"
            ) from err
        shards = sorted({path / name for name in weight_map.values()})
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise ModelError(
                f"shards {missing} listed in {SAFETENSORS_INDEX} are missing from {str(path)!r}: re-download them"
            )
        return [index, *shards]
    if (path / SAFETENSORS_FILE).is_file():
        return [path / SAFETENSORS_FILE]
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ModelError(
            f"{str(path)!r} holds only pickle weights ({', '.join(pickled[:3])}); moa-hub exports safetensors only: "
            f'convert them with `python -c "from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\"` and export that folder"
        )
    raise ModelError(
        f"no weights ({SAFETENSORS_FILE} or {SAFETENSORS_INDEX}) in {str(path)!r}: pass a complete model folder"
    )


def extra_files(path: Path) -> list[Path]:
    """Tokenizer, generation config and licence files that exist in the folder."""
    found = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
    for pattern in LICENSE_PATTERNS:
        found += sorted(p for p in path.glob(pattern) if p.is_file())
    for name in EXTRA_DIRS:
        if (path / name).is_dir():
            found += sorted(p for p in (path / name).rglob("*") if p.is_file())
    return found
