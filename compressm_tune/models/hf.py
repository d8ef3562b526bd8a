"""Import a Hugging Face ``transformers`` Mamba (Mamba-1) or Mamba-2 into an :class:`SSMModel`.

``MambaForCausalLM`` / ``MambaModel`` map one to one onto ``SSMConfig(arch="mamba")``: the
embedding becomes the encoder, each ``MambaBlock`` (RMSNorm -> ``MambaMixer`` -> residual) a
:class:`~compressm_tune.models.MambaBlock`, ``norm_f`` the final norm and ``lm_head`` the head
(copied, so tied weights stay equal but are no longer tied). ``x_proj`` (E -> dt_rank + 2N) is
split into its dt/B/C row blocks and ``dt_proj`` into weight and bias (see
:mod:`compressm_tune.models.mamba`). ``Mamba2ForCausalLM`` / ``Mamba2Model`` map the same way
onto ``SSMConfig(arch="mamba2")``, the mixer's ``in_proj`` and ``conv1d`` split into the
``z, x, dt`` rows and the ``B``/``C`` rows (see :mod:`compressm_tune.models.mamba2`). Only local
models: an instance, or a directory read with ``local_files_only=True``; nothing is ever
downloaded.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import torch

from compressm_tune.errors import CheckpointError, ConfigError, MissingDependencyError
from compressm_tune.models.config import SSMConfig
from compressm_tune.models.network import SSMModel

__all__ = ["from_hf_mamba", "from_hf_mamba2"]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(
            f"importing a Hugging Face Mamba needs transformers: pip install "
            f"'compressm-tune[hf]' ({exc})") from None
    return transformers


_KINDS = {"mamba": ("from_hf_mamba", "Mamba-1", "MambaForCausalLM", "MambaModel"),
          "mamba2": ("from_hf_mamba2", "Mamba-2", "Mamba2ForCausalLM", "Mamba2Model")}


def _load(model_or_path: Any, model_type: str) -> tuple[Any, Any, Any]:
    """``(model, backbone, lm_head or None)`` of a ``model_type`` model instance, or of the one
    saved in a local directory."""
    importer, _, causal, base = _KINDS[model_type]
    tf = _transformers()
    hf = model_or_path
    if isinstance(model_or_path, (str, Path)):
        hf = _load_folder(Path(model_or_path), model_type)
    if isinstance(hf, getattr(tf, causal)):
        return hf, hf.backbone, hf.lm_head
    if isinstance(hf, getattr(tf, base)):
        return hf, hf, None
    raise ConfigError(f"{importer} takes a {causal} or {base}, got {type(hf).__name__}")


def _load_folder(path: Path, model_type: str) -> Any:
    importer, name, causal, _ = _KINDS[model_type]
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} is not a saved Hugging Face model (no config.json); "
                          f"{importer} reads local directories only, never downloads")
    tf = _transformers()
    config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type != model_type:
        raise ConfigError(f"{path} holds a {config.model_type!r} model, not a {name} "
                          f"{model_type!r}")
    try:
        return getattr(tf, causal).from_pretrained(path, local_files_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, which would run the file's code
        raise CheckpointError(f"{path}: its PyTorch weights file holds objects other than "
                              "tensors, and loading it could run code: refused; use a copy "
                              "saved as safetensors from a source you trust") from None


def _config(hf: Any, d_output: int) -> SSMConfig:
    c = hf.config
    if c.hidden_act != "silu":
        raise ConfigError(f"only Mamba with hidden_act='silu' maps onto MambaLayer, got "
                          f"hidden_act={c.hidden_act!r}")
    if c.intermediate_size % c.hidden_size:
        raise ConfigError(f"intermediate_size must be a multiple of hidden_size, got "
                          f"{c.intermediate_size=} {c.hidden_size=}")
    return SSMConfig(
        arch="mamba", d_input=1, d_output=d_output, d_model=c.hidden_size,
        state_dims=[c.state_size] * c.num_hidden_layers, pooling="none", dropout=0.0,
        expand=c.intermediate_size // c.hidden_size, d_conv=c.conv_kernel,
        dt_rank=int(c.time_step_rank), proj_bias=bool(c.use_bias),
        conv_bias=bool(c.use_conv_bias), norm_eps=float(c.layer_norm_epsilon),
        vocab_size=c.vocab_size,
    )


@torch.no_grad()
def from_hf_mamba(model_or_path: Any) -> SSMModel:
    """An :class:`SSMModel` computing what a ``transformers`` Mamba-1 model computes.

    Parameters
    ----------
    model_or_path : MambaForCausalLM, MambaModel, str or Path
        A model instance (e.g. built from a ``MambaConfig`` with random weights), or a local
        directory saved with ``save_pretrained`` (read with ``local_files_only=True``).

    Returns
    -------
    SSMModel
        Float32, eval mode, ``arch="mamba"``, ``pooling="none"``, ``vocab_size`` set: token
        ids ``(batch, L)`` -> logits ``(batch, L, vocab_size)`` (a ``MambaModel``: the last
        hidden states ``(batch, L, hidden_size)``, through an identity head).

    Raises
    ------
    MissingDependencyError
        ``transformers`` is not installed (extra ``hf``).
    ConfigError
        Not a Mamba-1 model, or a variant ``MambaLayer`` does not express.

    Examples
    --------
    >>> from transformers import MambaConfig, MambaForCausalLM
    >>> hf = MambaForCausalLM(MambaConfig(vocab_size=20, hidden_size=8, state_size=4,
    ...                                   num_hidden_layers=2))
    >>> model = from_hf_mamba(hf)
    >>> model.state_dims, model(torch.tensor([[1, 2, 3]])).shape
    ([4, 4], torch.Size([1, 3, 20]))
    """
    hf, backbone, head = _load(model_or_path, "mamba")
    h = hf.config.hidden_size
    model = SSMModel(_config(hf, h if head is None else head.out_features))
    return _copy_model(model, backbone, head, _copy_mixer)


def _copy_model(model: SSMModel, backbone: Any, head: Any, copy_mixer: Any) -> SSMModel:
    """The weights of a ``transformers`` Mamba/Mamba-2 backbone and head into ``model``."""
    h = model.config.d_model
    model.encoder.weight.copy_(backbone.embeddings.weight)
    for ours, theirs in zip(model.blocks, backbone.layers, strict=True):
        ours.norm.weight.copy_(theirs.norm.weight)
        copy_mixer(ours.ssm, theirs.mixer)
    model.norm_f.weight.copy_(backbone.norm_f.weight)
    if head is None:
        model.head.weight.copy_(torch.eye(h))
    else:
        model.head.weight.copy_(head.weight)
    if head is not None and head.bias is not None:
        model.head.bias.copy_(head.bias)
    else:
        model.head.bias.zero_()
    return model.float().eval()


def _copy_mixer(layer: Any, mixer: Any) -> None:
    """MambaMixer's weights into a :class:`MambaLayer` (same shapes but x_proj, dt_proj)."""
    r, n = mixer.time_step_rank, mixer.ssm_state_size
    pairs = [(layer.in_proj, mixer.in_proj), (layer.conv1d, mixer.conv1d),
             (layer.out_proj, mixer.out_proj)]
    for ours, theirs in pairs:
        ours.weight.copy_(theirs.weight)
        if ours.bias is not None:
            ours.bias.copy_(theirs.bias)
    dt, b, c = mixer.x_proj.weight.split([r, n, n], dim=0)  # (R, E), (N, E), (N, E)
    s6 = layer.s6
    s6.dt_down.copy_(dt)
    s6.B_proj.copy_(b)
    s6.C_proj.copy_(c)
    s6.dt_up.copy_(mixer.dt_proj.weight)  # (E, R)
    s6.dt_bias.copy_(mixer.dt_proj.bias)  # (E,)
    s6.A_log.copy_(mixer.A_log)  # (E, N)
    s6.D.copy_(mixer.D)  # (E,)


def _config2(hf: Any, d_output: int) -> SSMConfig:
    c = hf.config
    if c.hidden_act != "silu":
        raise ConfigError(f"only Mamba-2 with hidden_act='silu' maps onto Mamba2Layer, got "
                          f"hidden_act={c.hidden_act!r}")
    if int(c.expand) != c.expand or int(c.expand) * c.hidden_size != c.num_heads * c.head_dim or (
            c.num_heads % c.n_groups):
        raise ConfigError(f"Mamba2Layer needs an integer expand with expand * hidden_size = "
                          f"num_heads * head_dim, and n_groups dividing num_heads, got "
                          f"{c.expand=} {c.hidden_size=} {c.num_heads=} {c.head_dim=} "
                          f"{c.n_groups=}")
    low, high = (float(v) for v in c.time_step_limit)
    return SSMConfig(
        arch="mamba2", d_input=1, d_output=d_output, d_model=c.hidden_size,
        state_dims=[c.state_size] * c.num_hidden_layers, pooling="none", dropout=0.0,
        expand=int(c.expand), d_conv=c.conv_kernel, proj_bias=bool(c.use_bias),
        conv_bias=bool(c.use_conv_bias), norm_eps=float(c.layer_norm_epsilon),
        vocab_size=c.vocab_size, head_dim=c.head_dim, n_groups=c.n_groups,
        dt_limit=None if (low, high) == (0.0, math.inf) else [low, high],
    )


@torch.no_grad()
def from_hf_mamba2(model_or_path: Any) -> SSMModel:
    """An :class:`SSMModel` computing what a ``transformers`` Mamba-2 model computes.

    Parameters
    ----------
    model_or_path : Mamba2ForCausalLM, Mamba2Model, str or Path
        A model instance (e.g. built from a ``Mamba2Config`` with random weights), or a local
        directory saved with ``save_pretrained`` (read with ``local_files_only=True``).

    Returns
    -------
    SSMModel
        Float32, eval mode, ``arch="mamba2"``, ``pooling="none"``, ``vocab_size`` set: token
        ids ``(batch, L)`` -> logits ``(batch, L, vocab_size)`` (a ``Mamba2Model``: the last
        hidden states ``(batch, L, hidden_size)``, through an identity head). A tied
        ``lm_head`` is copied (equal, no longer tied).

    Raises
    ------
    MissingDependencyError
        ``transformers`` is not installed (extra ``hf``).
    ConfigError
        Not a Mamba-2 model, or a variant :class:`Mamba2Layer` does not express.

    Examples
    --------
    >>> from transformers import Mamba2Config, Mamba2ForCausalLM
    >>> hf = Mamba2ForCausalLM(Mamba2Config(vocab_size=20, hidden_size=8, state_size=4,
    ...     num_hidden_layers=2, num_heads=4, head_dim=4, n_groups=2))
    >>> model = from_hf_mamba2(hf)
    >>> model.state_dims, model(torch.tensor([[1, 2, 3]])).shape
    ([4, 4], torch.Size([1, 3, 20]))
    """
    hf, backbone, head = _load(model_or_path, "mamba2")
    h = hf.config.hidden_size
    model = SSMModel(_config2(hf, h if head is None else head.out_features))
    return _copy_model(model, backbone, head, _copy_mixer2)


def _copy_mixer2(layer: Any, mixer: Any) -> None:
    """Mamba2Mixer's weights into a :class:`Mamba2Layer`: ``in_proj`` rows ``[z, x, B, C, dt]``
    and ``conv1d`` channels ``[x, B, C]`` split into the ``z, x, dt`` and ``B, C`` parts."""
    e, gn, g = layer.d_inner, layer.n_groups * layer.state_dim, layer.n_groups
    shape = (2, g, layer.state_dim)

    def parts(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # rows of in_proj
        z, x, bc, dt = t.split([e, e, 2 * gn, layer.n_heads])
        return torch.cat((z, x, dt)), bc

    zxdt, bc = parts(mixer.in_proj.weight)
    layer.in_proj.weight.copy_(zxdt)
    layer.bc_proj.copy_(bc.reshape(*shape, -1))
    if mixer.in_proj.bias is not None:
        zxdt, bc = parts(mixer.in_proj.bias)
        layer.in_proj.bias.copy_(zxdt)
        layer.bc_bias.copy_(bc.reshape(shape))
        layer.out_proj.bias.copy_(mixer.out_proj.bias)
    x, bc = mixer.conv1d.weight[:, 0].split([e, 2 * gn])  # (E, K), (2GN, K)
    layer.conv1d.weight.copy_(x[:, None])
    layer.bc_conv.copy_(bc.reshape(*shape, -1))
    if mixer.conv1d.bias is not None:
        x, bc = mixer.conv1d.bias.split([e, 2 * gn])
        layer.conv1d.bias.copy_(x)
        layer.bc_conv_bias.copy_(bc.reshape(shape))
    layer.out_proj.weight.copy_(mixer.out_proj.weight)
    layer.norm_weight.copy_(mixer.norm.weight)
    for name in ("dt_bias", "A_log", "D"):  # (nh,) each
        getattr(layer, name).copy_(getattr(mixer, name))
