"""The deterministic random model and items that every stage of ``bench_profile_multi.py`` builds.

Each parameter is drawn from its own seed, made from its name, directly on the device it lives on, so every stage
(one process, each data-parallel rank, the device_map shards) holds the same weights; ``checksums`` lets the stages
compare them. Imported by ``bench_profile_multi.py``, which puts ``benchmarks/`` and the repository on ``sys.path``.
"""

from __future__ import annotations

import hashlib

import torch
from bench_profile import LLAMA3_8B, TINY

from moa_hub.profile import CalibrationItem

INIT_STD = 0.02  # transformers' initializer_range for Llama


def model_shape(tiny: bool) -> dict:
    return {**TINY, "num_hidden_layers": 4} if tiny else dict(LLAMA3_8B)


def param_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def init_value(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int):
    """Deterministic value of one parameter: a function of (seed, name, device type) only.

    Matrices: N(0, 0.02) from a generator on ``device`` seeded from the name (the same on any GPU of one
    type; CPU and CUDA generators differ). Vectors: ones for norms, zeros for anything else (biases)."""
    if len(shape) == 1:
        return (torch.ones if "norm" in name else torch.zeros)(shape, dtype=dtype, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(param_seed(seed, name))
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, INIT_STD, generator=gen)


def empty_model(shape: dict, dtype: torch.dtype):
    """The model with its parameters on the meta device (buffers, e.g. rotary inv_freq, on the CPU)."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, attn_implementation="sdpa")  # as bench_profile.py
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model


def _device_of(name: str, device_map: dict, default) -> torch.device:
    best, where = -1, default
    for prefix, device in device_map.items():
        if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, where = len(prefix), device
    return torch.device(where) if not isinstance(where, int) else torch.device("cuda", where)


def materialise(model, device_map: dict, default, seed: int) -> None:
    """Give every parameter its deterministic value on its device; move buffers to their module's device."""
    for name, param in list(model.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        value = init_value(name, tuple(param.shape), param.dtype, _device_of(name, device_map, default), seed)
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=param.requires_grad)
    for name, buf in list(model.named_buffers()):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._buffers[attr] = buf.to(_device_of(name, device_map, default))
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise RuntimeError(f"parameters left on the meta device (tied?): {meta[:5]}")


def build_model(shape: dict, dtype: torch.dtype, device: torch.device, seed: int):
    model = empty_model(shape, dtype)
    materialise(model, {"": device}, device, seed)
    return model.eval()


def auto_device_map(model, cpu: bool) -> tuple[dict, str]:
    """transformers' device_map="auto" computation (get_balanced_memory + infer_auto_device_map) on the meta
    model. On the CPU test two fake GPUs of 60% of the model each make it split, and every shard is put on the CPU."""
    num_layers = model.config.num_hidden_layers
    try:
        from transformers.integrations.accelerate import _get_device_map

        if cpu:
            size = sum(p.numel() * p.element_size() for p in model.parameters())
            device_map = _get_device_map(model, "auto", {0: int(size * 0.6), 1: int(size * 0.6), "cpu": 0}, None)
        else:
            device_map = _get_device_map(model, "auto", None, None)
        device_map = dict(device_map)
        if len(set(device_map.values())) < 2:
            raise RuntimeError(f"device_map='auto' did not split the model: {device_map}")
        source = "transformers _get_device_map('auto')"
    except Exception as err:  # keep the stage useful: the two halves by hand
        print(f"auto device map failed ({err!r}); splitting the layers in halves by hand", flush=True)
        half = num_layers // 2
        device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0}
        device_map.update({f"model.layers.{i}": 0 if i < half else 1 for i in range(num_layers)})
        device_map.update({"model.norm": 1, "lm_head": 1})
        source = "by hand (halves)"
    counts: dict[str, int] = {}
    for device in device_map.values():
        counts[str(device)] = counts.get(str(device), 0) + 1
    source += f", modules per device {counts}"
    if cpu:
        return {k: "cpu" for k in device_map}, source + ", then every shard put on the CPU"
    return device_map, source


def build_sharded_model(shape: dict, dtype: torch.dtype, seed: int, cpu: bool):
    """Weights materialised straight onto the devices of an 'auto' device map, then accelerate's dispatch_model
    (what from_pretrained(device_map="auto") calls for a map of several devices); hf_device_map is set."""
    from accelerate import dispatch_model

    model = empty_model(shape, dtype)
    device_map, source = auto_device_map(model, cpu)
    default = next(iter(device_map.values()))
    materialise(model, device_map, default, seed)
    skip = getattr(model, "_skip_keys_device_placement", None)
    # force_hooks: on the CPU test every shard is on one device, and the hooks must still run
    model = dispatch_model(model, device_map=device_map, skip_keys=skip, force_hooks=True)
    model.hf_device_map = dict(device_map)
    return model.eval(), device_map, source


def checksums(model) -> dict[str, list[float]]:
    """Per parameter: float64 sum, float64 sum of |x|, and its first 4 values."""
    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            head = flat[:4].double().cpu().tolist()
            stats = torch.stack([flat.sum(dtype=torch.float64), flat.abs().sum(dtype=torch.float64)]).cpu().tolist()
            out[name] = stats + head
    return out


def make_items(length: int, count: int, answer: int, vocab: int, seed: int) -> list[CalibrationItem]:
    """Random tokens; one CPU generator per length, so a stage that skips a length sees the same items."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + length)
    answer = min(answer, length // 2)
    return [
        CalibrationItem(torch.randint(0, vocab, (length,), generator=gen).tolist(), answer_start=length - answer)
        for _ in range(count)
    ]
