"""Hugging Face-style model folders, out and back in: ``config.json`` + ``model.safetensors``.

:func:`save_hf_folder` writes a token Mamba :class:`SSMModel` as ``transformers`` lays out a
``MambaForCausalLM`` (``model_type`` ``"mamba"``): transformers' config field names and
parameter names (``x_proj`` re-joined from the S6 core's dt/B/C row blocks, ``dt_proj`` from
``dt_up`` + ``dt_bias``, ``lm_head`` untied). transformers' config holds one ``state_size``
for every layer, so the per-layer widths of a compressed model are written under
``"state_sizes"`` (a list, one width per layer; ``state_size`` is then their maximum). A folder
whose layers share one width is an ordinary transformers folder: ``from_pretrained`` loads it
and computes the same logits. One whose widths differ loads with :func:`from_hf_folder` only.

:func:`from_hf_folder` reads such a folder, ours or one saved by ``save_pretrained`` as
safetensors, straight into an :class:`SSMModel`, without transformers; a folder holding only
a PyTorch ``.bin`` file or sharded weights goes through :func:`from_hf_mamba` (transformers).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from compressm_tune._io import why_unwritable
from compressm_tune.errors import CheckpointError, ConfigError, MissingDependencyError, OutputError
from compressm_tune.models.config import SSMConfig
from compressm_tune.models.hf import _config2, from_hf_mamba, from_hf_mamba2
from compressm_tune.models.network import SSMModel

__all__ = ["HF_MODEL_TYPES", "STATE_SIZES_KEY", "check_hf_output", "from_hf_folder",
           "is_hf_folder", "save_hf_folder"]

CONFIG, WEIGHTS = "config.json", "model.safetensors"
STATE_SIZES_KEY = "state_sizes"  # per-layer widths (transformers' configs hold one state_size)
HF_MODEL_TYPES = {"mamba": "mamba", "mamba2": "mamba2"}  # model_type -> SSMConfig.arch
_ARCHITECTURES = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM"}


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as exc:
        raise MissingDependencyError(f"Hugging Face folders are written as safetensors: pip "
                                     f"install 'compressm-tune[hf]' ({exc})") from None
    return safetensors.torch


def is_hf_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder with a ``config.json`` (a saved Hugging Face model)."""
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


# ----------------------------------------------------------------------------- writing


def _mamba_config(config: SSMConfig, model: SSMModel) -> dict[str, Any]:
    """transformers' ``MambaConfig`` fields for ``config`` (plus the per-layer widths)."""
    h = config.d_model
    dims = list(config.state_dims)
    return {
        "model_type": "mamba", "architectures": [_ARCHITECTURES["mamba"]],
        "vocab_size": config.vocab_size, "hidden_size": h,
        "intermediate_size": config.expand * h, "expand": config.expand,
        "state_size": max(dims), STATE_SIZES_KEY: dims, "num_hidden_layers": len(dims),
        "conv_kernel": config.d_conv, "time_step_rank": config.dt_rank or math.ceil(h / 16),
        "use_bias": config.proj_bias, "use_conv_bias": config.conv_bias, "hidden_act": "silu",
        "layer_norm_epsilon": config.norm_eps, "residual_in_fp32": True,
        "tie_word_embeddings": False, "dtype": "float32",
    }


def _backbone_tensors(model: SSMModel) -> dict[str, torch.Tensor]:
    """Embedding, block norms, final norm and head, as transformers names them."""
    out = {"backbone.embeddings.weight": model.encoder.weight,
           "backbone.norm_f.weight": model.norm_f.weight, "lm_head.weight": model.head.weight}
    if model.head.bias.any():  # transformers' lm_head has no bias; from_hf_folder reads it
        out["lm_head.bias"] = model.head.bias
    for i, block in enumerate(model.blocks):
        out[f"backbone.layers.{i}.norm.weight"] = block.norm.weight
    return out


def _mamba_tensors(model: SSMModel) -> dict[str, torch.Tensor]:
    """transformers' ``MambaForCausalLM`` state dict of ``model``."""
    out = _backbone_tensors(model)
    for i, block in enumerate(model.blocks):
        p, layer = f"backbone.layers.{i}.", block.ssm
        s6 = layer.s6
        for name in ("in_proj", "conv1d", "out_proj"):
            module = getattr(layer, name)
            out[f"{p}mixer.{name}.weight"] = module.weight
            if module.bias is not None:
                out[f"{p}mixer.{name}.bias"] = module.bias
        out[p + "mixer.x_proj.weight"] = torch.cat((s6.dt_down, s6.B_proj, s6.C_proj), 0)
        out[p + "mixer.dt_proj.weight"] = s6.dt_up
        out[p + "mixer.dt_proj.bias"] = s6.dt_bias
        out[p + "mixer.A_log"] = s6.A_log
        out[p + "mixer.D"] = s6.D
    return out


def _mamba2_config(config: SSMConfig, model: SSMModel) -> dict[str, Any]:
    """transformers' ``Mamba2Config`` fields for ``config`` (plus the per-layer widths)."""
    layer = model.blocks[0].ssm
    dims = list(config.state_dims)
    return {
        "model_type": "mamba2", "architectures": [_ARCHITECTURES["mamba2"]],
        "vocab_size": config.vocab_size, "hidden_size": config.d_model,
        "expand": config.expand, "num_heads": layer.n_heads, "head_dim": layer.head_dim,
        "n_groups": layer.n_groups, "state_size": max(dims), STATE_SIZES_KEY: dims,
        "num_hidden_layers": len(dims), "conv_kernel": config.d_conv,
        "use_bias": config.proj_bias, "use_conv_bias": config.conv_bias, "hidden_act": "silu",
        "layer_norm_epsilon": config.norm_eps, "residual_in_fp32": True,
        "tie_word_embeddings": False, "dtype": "float32",
    } | ({} if config.dt_limit is None else {"time_step_limit": list(config.dt_limit)})


def _mamba2_tensors(model: SSMModel) -> dict[str, torch.Tensor]:
    """transformers' ``Mamba2ForCausalLM`` state dict of ``model``: ``in_proj`` rows
    ``[z, x, B, C, dt]`` and ``conv1d`` channels ``[x, B, C]`` re-joined."""
    out = _backbone_tensors(model)

    def rows(layer: nn.Module, t: torch.Tensor, bc: torch.Tensor) -> torch.Tensor:
        z, x, dt = t.split([layer.d_inner, layer.d_inner, layer.n_heads])
        return torch.cat((z, x, bc.reshape(-1, *t.shape[1:]), dt))

    for i, block in enumerate(model.blocks):
        p, layer = f"backbone.layers.{i}.mixer.", block.ssm
        out[p + "in_proj.weight"] = rows(layer, layer.in_proj.weight, layer.bc_proj)
        out[p + "conv1d.weight"] = torch.cat((layer.conv1d.weight,
                                              layer.bc_conv.reshape(-1, 1, layer.d_conv)))
        if layer.in_proj.bias is not None:
            out[p + "in_proj.bias"] = rows(layer, layer.in_proj.bias, layer.bc_bias)
            out[p + "out_proj.bias"] = layer.out_proj.bias
        if layer.conv1d.bias is not None:
            out[p + "conv1d.bias"] = torch.cat((layer.conv1d.bias, layer.bc_conv_bias.reshape(-1)))
        out[p + "out_proj.weight"] = layer.out_proj.weight
        out[p + "norm.weight"] = layer.norm_weight
        for name in ("dt_bias", "A_log", "D"):
            out[p + name] = getattr(layer, name)
    return out


_WRITERS = {"mamba": (_mamba_config, _mamba_tensors), "mamba2": (_mamba2_config, _mamba2_tensors)}


def _check_writable(model: SSMModel) -> None:
    config = model.config
    if config.arch not in _WRITERS:  # a Mamba-1 or Mamba-2 block and final norm
        raise ConfigError(f"only {sorted(_WRITERS)} models are written as Hugging Face folders, "
                          f"not arch={config.arch!r}")
    if config.vocab_size is None or config.pooling != "none" or \
            config.d_output != config.vocab_size:
        raise ConfigError("a Hugging Face causal LM folder holds a token model: vocab_size set, "
                          "pooling 'none' and one logit per token id (d_output == vocab_size)")


def check_hf_output(path: str | Path, extra_names: Iterable[str] = ()) -> None:
    """Refuse (:class:`OutputError`) an output folder :func:`save_hf_folder` may not replace:
    a file, or a folder holding anything but ``config.json``, ``model.safetensors`` and
    ``extra_names`` (a user's other files are never deleted). Callers check before long work."""
    target = Path(path)
    if not target.exists():
        return
    if not target.is_dir():
        raise OutputError(f"cannot write {target}: it exists and is not a folder")
    ours = {CONFIG, WEIGHTS, *extra_names}
    others = sorted(p.name for p in target.iterdir() if p.name not in ours)
    if others:
        raise OutputError(f"{target} exists and holds other files ({', '.join(others[:3])}"
                          f"{', ...' if len(others) > 3 else ''}); choose another folder")


def _replace_folder(staged: Path, target: Path, ours: set[str]) -> None:
    """Move the finished folder ``staged`` onto ``target`` (see :func:`check_hf_output`)."""
    if target.exists():
        check_hf_output(target, ours)
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(staged, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, target)


@torch.no_grad()
def save_hf_folder(model: SSMModel, path: str | Path,
                   extra_files: dict[str, str] | None = None) -> Path:
    """Write ``model`` as a Hugging Face-style folder: ``config.json`` + ``model.safetensors``.

    Parameters
    ----------
    model : SSMModel
        A token Mamba (``arch="mamba"``, ``vocab_size`` set, ``pooling="none"``), e.g. from
        :func:`from_hf_mamba` or :func:`from_hf_folder`, compressed or not.
    path : str or Path
        The folder. Written whole into a temporary folder beside it and renamed into place, so
        an interrupt leaves the old folder or the new one, never half of one; an existing
        folder is replaced only if it holds nothing but files this function writes.
    extra_files : dict, optional
        More text files to put in the folder, name -> content (e.g. a summary).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ConfigError
        ``model`` is not a token Mamba.
    OutputError
        The folder cannot be written, or exists holding other files.

    Examples
    --------
    >>> import tempfile
    >>> model = SSMModel(SSMConfig(arch="mamba", d_output=20, d_model=8, state_dims=[4, 2],
    ...                            pooling="none", vocab_size=20))
    >>> folder = save_hf_folder(model, Path(tempfile.mkdtemp()) / "tiny")
    >>> from_hf_folder(folder).state_dims
    [4, 2]
    """
    _check_writable(model)
    st = _safetensors()
    make_config, make_tensors = _WRITERS[model.config.arch]
    config = make_config(model.config, model)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone()
               for k, v in make_tensors(model).items()}
    files = {CONFIG: json.dumps(config, indent=2) + "\n", **(extra_files or {})}
    target = Path(path)
    staged = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp",
                                       dir=target.parent))
        st.save_file(tensors, str(staged / WEIGHTS), metadata={"format": "pt"})
        for name, text in files.items():
            (staged / name).write_text(text)
        os.chmod(staged, 0o755)
        _replace_folder(staged, target, {WEIGHTS, *files})
        staged = None
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        reason = why_unwritable(exc, target.parent)
        raise OutputError(f"cannot write {target}: {reason or exc}") from None
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- reading


def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder (a Hugging Face model folder holds "
                          "config.json and model.safetensors)")
    if not (folder / CONFIG).is_file():
        raise ConfigError(f"{folder} is not a saved Hugging Face model (no config.json)")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {folder / CONFIG}: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{folder / CONFIG} is not a JSON object")
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ConfigError(f"{folder} holds a {model_type!r} model; supported: "
                          f"{', '.join(sorted(HF_MODEL_TYPES))}")
    return config


def _state_sizes(config: dict[str, Any]) -> list[int]:
    layers = int(config["num_hidden_layers"])
    dims = config.get(STATE_SIZES_KEY) or [config["state_size"]] * layers
    if not isinstance(dims, list) or len(dims) != layers:
        raise ConfigError(f"config.json: {STATE_SIZES_KEY} must list one width per layer "
                          f"({layers}), got {dims!r}")
    return dims


def _mamba_ssm_config(c: dict[str, Any]) -> SSMConfig:
    """The :class:`SSMConfig` of a ``MambaConfig`` dict (transformers' defaults filled in)."""
    try:
        h = int(c["hidden_size"])
        if c.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"only Mamba with hidden_act='silu' maps onto MambaLayer, got "
                              f"{c['hidden_act']!r}")
        inner = int(c.get("intermediate_size") or c.get("expand", 2) * h)
        if inner % h:
            raise ConfigError(f"intermediate_size must be a multiple of hidden_size, got "
                              f"{inner} and {h}")
        rank = c.get("time_step_rank", "auto")
        vocab = int(c["vocab_size"])
        return SSMConfig(
            arch="mamba", d_input=1, d_output=vocab, d_model=h, state_dims=_state_sizes(c),
            pooling="none", dropout=0.0, expand=inner // h, d_conv=int(c.get("conv_kernel", 4)),
            dt_rank=math.ceil(h / 16) if rank == "auto" else int(rank),
            proj_bias=bool(c.get("use_bias", False)),
            conv_bias=bool(c.get("use_conv_bias", True)),
            norm_eps=float(c.get("layer_norm_epsilon", 1e-5)), vocab_size=vocab)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"config.json does not describe a Mamba model: {exc!r}") from None


def _number(v: Any) -> Any:
    """A JSON number; transformers writes infinity as ``{"__float__": "Infinity"}``."""
    return float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else v


def _mamba2_ssm_config(c: dict[str, Any]) -> SSMConfig:
    """The :class:`SSMConfig` of a ``Mamba2Config`` dict (per-layer widths read)."""
    if "time_step_limit" in c:
        c = {**c, "time_step_limit": [_number(v) for v in c["time_step_limit"]]}
    try:
        return replace(_config2(SimpleNamespace(config=SimpleNamespace(**{
            "hidden_act": "silu", "expand": 2, "n_groups": 1, "conv_kernel": 4,
            "use_bias": False, "use_conv_bias": True, "layer_norm_epsilon": 1e-5,
            "time_step_limit": (0.0, math.inf), **c})), int(c["vocab_size"])),
            state_dims=_state_sizes(c))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"config.json does not describe a Mamba-2 model: {exc!r}") from None


class _Tensors:
    """The folder's tensors, handed out by name with their shapes checked; remembers which
    were used (a tensor left over means the folder holds another model)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors, self.used = tensors, set()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise CheckpointError(f"model.safetensors lacks {name!r}")
        self.used.add(name)
        return self.tensors[name]

    def put(self, target: torch.Tensor, name: str, value: torch.Tensor | None = None) -> None:
        value = self.take(name) if value is None else value
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"model.safetensors: {name} has shape {tuple(value.shape)}, "
                                  f"config.json says {tuple(target.shape)}")
        target.copy_(value)

    def split(self, name: str, sizes: list[int]) -> tuple[torch.Tensor, ...]:
        """``name`` cut along its first axis into ``sizes`` (the sizes config.json implies)."""
        value = self.take(name)
        if value.shape[0] != sum(sizes):
            raise CheckpointError(f"model.safetensors: {name} has {value.shape[0]} rows, "
                                  f"config.json says {sum(sizes)}")
        return value.split(sizes)


def _load_backbone(model: SSMModel, t: _Tensors, tied: bool) -> None:
    t.put(model.encoder.weight, "backbone.embeddings.weight")
    t.put(model.norm_f.weight, "backbone.norm_f.weight")
    t.put(model.head.weight, "backbone.embeddings.weight" if tied and "lm_head.weight" not in t
          else "lm_head.weight")
    if "lm_head.bias" in t:
        t.put(model.head.bias, "lm_head.bias")
    else:
        model.head.bias.zero_()
    for i, block in enumerate(model.blocks):
        t.put(block.norm.weight, f"backbone.layers.{i}.norm.weight")


def _mamba_load(layer: nn.Module, t: _Tensors, p: str) -> None:
    """transformers' ``MambaMixer`` tensors (prefix ``p``) into a :class:`MambaLayer`."""
    s6 = layer.s6
    for name in ("in_proj", "conv1d", "out_proj"):
        module = getattr(layer, name)
        t.put(module.weight, f"{p}{name}.weight")
        if module.bias is not None:
            t.put(module.bias, f"{p}{name}.bias")
    r, n = s6.dt_down.shape[0], s6.state_dim
    for target, value in zip((s6.dt_down, s6.B_proj, s6.C_proj),
                             t.split(p + "x_proj.weight", [r, n, n]), strict=True):
        t.put(target, p + "x_proj.weight", value)
    t.put(s6.dt_up, p + "dt_proj.weight")
    t.put(s6.dt_bias, p + "dt_proj.bias")
    t.put(s6.A_log, p + "A_log")
    t.put(s6.D, p + "D")


def _mamba2_load(layer: nn.Module, t: _Tensors, p: str) -> None:
    """transformers' ``Mamba2Mixer`` tensors (prefix ``p``) into a :class:`Mamba2Layer`:
    ``in_proj`` rows ``[z, x, B, C, dt]``, ``conv1d`` channels ``[x, B, C]``."""
    e, nh, gn = layer.d_inner, layer.n_heads, 2 * layer.n_groups * layer.state_dim

    def in_rows(name: str, target: torch.Tensor, bc: torch.Tensor) -> None:
        z, x, b_c, dt = t.split(name, [e, e, gn, nh])
        t.put(target, name, torch.cat((z, x, dt)))
        t.put(bc, name, b_c.reshape(bc.shape))

    in_rows(p + "in_proj.weight", layer.in_proj.weight, layer.bc_proj)
    x, bc = t.split(p + "conv1d.weight", [e, gn])
    t.put(layer.conv1d.weight, p + "conv1d.weight", x)
    t.put(layer.bc_conv, p + "conv1d.weight", bc.reshape(layer.bc_conv.shape))
    if layer.in_proj.bias is not None:
        in_rows(p + "in_proj.bias", layer.in_proj.bias, layer.bc_bias)
        t.put(layer.out_proj.bias, p + "out_proj.bias")
    if layer.conv1d.bias is not None:
        x, bc = t.split(p + "conv1d.bias", [e, gn])
        t.put(layer.conv1d.bias, p + "conv1d.bias", x)
        t.put(layer.bc_conv_bias, p + "conv1d.bias", bc.reshape(layer.bc_conv_bias.shape))
    t.put(layer.out_proj.weight, p + "out_proj.weight")
    t.put(layer.norm_weight, p + "norm.weight")
    for name in ("dt_bias", "A_log", "D"):
        t.put(getattr(layer, name), p + name)


_READERS = {"mamba": (_mamba_ssm_config, _mamba_load),
            "mamba2": (_mamba2_ssm_config, _mamba2_load)}


@torch.no_grad()
def from_hf_folder(path: str | Path) -> SSMModel:
    """The :class:`SSMModel` saved in a local Hugging Face-style folder (per-layer widths too).

    Reads ``config.json`` (``model_type`` ``"mamba"``; the per-layer widths from
    ``"state_sizes"`` when present, else ``state_size`` for every layer) and
    ``model.safetensors`` with transformers' parameter names, as :func:`save_hf_folder` and
    transformers' ``save_pretrained`` write them; without ``model.safetensors`` (a PyTorch
    ``.bin`` file, sharded weights) the folder is read by transformers via
    :func:`from_hf_mamba`. Nothing is downloaded.

    Returns
    -------
    SSMModel
        Float32, eval mode: token ids ``(batch, L)`` -> logits ``(batch, L, vocab_size)``.

    Raises
    ------
    ConfigError
        Not a folder, no ``config.json``, or not a supported model type or variant.
    CheckpointError
        ``model.safetensors`` unreadable, or its tensors do not match ``config.json``.
    """
    folder = Path(path)
    config = _read_config(folder)
    arch = HF_MODEL_TYPES[config["model_type"]]
    make_config, load = _READERS[arch]
    ssm_config = make_config(config)
    if not (folder / WEIGHTS).is_file():
        if STATE_SIZES_KEY in config and len(set(ssm_config.state_dims)) > 1:
            raise CheckpointError(f"{folder} has per-layer state sizes but no {WEIGHTS}")
        return (from_hf_mamba if arch == "mamba" else from_hf_mamba2)(folder)
    st = _safetensors()
    try:
        tensors = st.load_file(str(folder / WEIGHTS))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot read {folder / WEIGHTS}: {reason}") from None
    tensors = {k: v.float() for k, v in tensors.items()}
    model = SSMModel(ssm_config)
    source = _Tensors(tensors)
    _load_backbone(model, source, bool(config.get("tie_word_embeddings", True)))
    for i, block in enumerate(model.blocks):
        load(block.ssm, source, f"backbone.layers.{i}.mixer.")
    left = sorted(set(tensors) - source.used)
    if left:
        raise CheckpointError(f"{folder / WEIGHTS} holds tensors this model does not use "
                              f"({', '.join(left[:3])}{', ...' if len(left) > 3 else ''})")
    return model.float().eval()
