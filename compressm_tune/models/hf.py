"""Import a Hugging Face ``transformers`` Mamba (Mamba-1) into an :class:`SSMModel`.

``MambaForCausalLM`` / ``MambaModel`` map one to one onto ``SSMConfig(arch="mamba")``: the
embedding becomes the encoder, each ``MambaBlock`` (RMSNorm -> ``MambaMixer`` -> residual) a
:class:`~compressm_tune.models.MambaBlock`, ``norm_f`` the final norm and ``lm_head`` the head
(copied, so tied weights stay equal but are no longer tied). ``x_proj`` (E -> dt_rank + 2N) is
split into its dt/B/C row blocks and ``dt_proj`` into weight and bias (see
:mod:`compressm_tune.models.mamba`). Only local models: an instance, or a directory read with
``local_files_only=True``; nothing is ever downloaded.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from compressm_tune.errors import CheckpointError, ConfigError, MissingDependencyError
from compressm_tune.models.config import SSMConfig
from compressm_tune.models.network import SSMModel

__all__ = ["from_hf_mamba"]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(
            f"importing a Hugging Face Mamba needs transformers: pip install "
            f"'compressm-tune[hf]' ({exc})") from None
    return transformers


def _load(model_or_path: Any) -> Any:
    """The model itself, or the one saved in a local directory."""
    if not isinstance(model_or_path, (str, Path)):
        return model_or_path
    path = Path(model_or_path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} is not a saved Hugging Face model (no config.json); "
                          "from_hf_mamba reads local directories only, never downloads")
    tf = _transformers()
    config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type != "mamba":
        raise ConfigError(f"{path} holds a {config.model_type!r} model, not a Mamba-1 'mamba'")
    try:
        return tf.MambaForCausalLM.from_pretrained(path, local_files_only=True)
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
    hf = _load(model_or_path)
    tf = _transformers()
    if isinstance(hf, tf.MambaForCausalLM):
        backbone, head = hf.backbone, hf.lm_head
    elif isinstance(hf, tf.MambaModel):
        backbone, head = hf, None
    else:
        raise ConfigError(f"from_hf_mamba takes a MambaForCausalLM or MambaModel, got "
                          f"{type(hf).__name__}")
    h = hf.config.hidden_size
    model = SSMModel(_config(hf, h if head is None else head.out_features))
    model.encoder.weight.copy_(backbone.embeddings.weight)
    for ours, theirs in zip(model.blocks, backbone.layers, strict=True):
        ours.norm.weight.copy_(theirs.norm.weight)
        _copy_mixer(ours.ssm, theirs.mixer)
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
