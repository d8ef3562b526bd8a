"""Tensor names of the exported graphs and the streaming state's layouts.

Feature models keep the bundle's own names (``x`` -> ``y``; ``x_t``, ``state_k`` ->
``y_t``, ``next_state_k``), one state tensor per block in :meth:`SSMModel.allocate_state`'s
layout. Token models follow ``transformers``: ``input_ids`` -> ``logits`` and the cache as
``past_*`` in, ``present_*`` out, a Mamba block's conv window and SSM state apart, shaped as
``transformers``' cache holds them; :func:`split_cache` / :func:`join_cache` convert between
the two layouts.
"""

from __future__ import annotations

import numpy as np

from compressm_tune.exporter._weights import Mamba2BlockWeights, MambaBlockWeights, ModelWeights

__all__ = ["join_cache", "sequence_io_names", "split_cache", "step_io_names", "step_states"]


def sequence_io_names(w: ModelWeights) -> tuple[str, str]:
    """Input and output name of the sequence graph: ``input_ids`` -> ``logits`` for a token
    model (the names ``transformers`` and its ONNX exports use), else ``x`` -> ``y``."""
    return ("input_ids", "logits") if w.tokens else ("x", "y")


def step_states(w: ModelWeights) -> list[tuple[str, str, list]]:
    """``(input name, output name, shape)`` of each state tensor of the streaming graph.

    Feature models: one tensor ``state_k`` per block in :meth:`SSMModel.allocate_state`'s
    layout (``next_state_k`` out). Token models follow ``transformers``' cache: a Mamba block
    holds ``past_conv_state.{k}`` ``(batch, E, K)`` (the last K conv inputs) and
    ``past_ssm_state.{k}`` ``(batch, E, N)``, any other block ``past_ssm_state.{k}`` in its
    own layout; ``present_...`` out (Mamba-2: conv ``(batch, E + 2GN, K)``, SSM ``(batch, nh,
    P, N)``). Mean pooling adds the running sum and token count.

    Examples
    --------
    >>> from compressm_tune.models import SSMConfig, SSMModel
    >>> from compressm_tune.exporter._weights import extract_weights
    >>> w = extract_weights(SSMModel(SSMConfig(arch="mamba", d_model=4, state_dims=[3],
    ...                                        vocab_size=5, d_output=5, pooling="none")))
    >>> for state in step_states(w):
    ...     print(*state)
    past_conv_state.0 present_conv_state.0 ['batch', 8, 4]
    past_ssm_state.0 present_ssm_state.0 ['batch', 8, 3]
    """
    out: list[tuple[str, str, list]] = []
    for k, (bw, shape) in enumerate(zip(w.blocks, w.state_shapes, strict=True)):
        if not w.tokens:
            out.append((f"state_{k}", f"next_state_{k}", ["batch", *shape]))
        elif isinstance(bw, (MambaBlockWeights, Mamba2BlockWeights)):
            channels, kernel = bw.conv.shape
            ssm = ([bw.n_heads, bw.head_dim] if isinstance(bw, Mamba2BlockWeights)
                   else [channels])
            out.append((f"past_conv_state.{k}", f"present_conv_state.{k}",
                        ["batch", channels, kernel]))
            out.append((f"past_ssm_state.{k}", f"present_ssm_state.{k}",
                        ["batch", *ssm, bw.state_dim]))
        else:
            out.append((f"past_ssm_state.{k}", f"present_ssm_state.{k}", ["batch", *shape]))
    if w.pooling == "mean":
        past, present = ("past_", "present_") if w.tokens else ("", "next_")
        out += [(f"{past}pool_sum", f"{present}pool_sum", ["batch", w.d_model]),
                (f"{past}pool_count", f"{present}pool_count", [1])]
    return out


def step_io_names(w: ModelWeights) -> tuple[list[str], list[str]]:
    """Input and output names of the streaming graph, in order (see :func:`step_states`)."""
    x, y = ("input_ids", "logits") if w.tokens else ("x_t", "y_t")
    states = step_states(w)
    return [x, *[s[0] for s in states]], [y, *[s[1] for s in states]]


def split_cache(w: ModelWeights, state: list) -> list:
    """States in :meth:`SSMModel.allocate_state`'s layout (numpy) -> the streaming graph's
    state inputs. A token model's Mamba state ``(B, E, K - 1 + N)`` becomes the conv window
    ``(B, E, K)`` (its oldest input, which no later output reads, as zeros) and the S6 state."""
    if not w.tokens:
        return list(state)
    out = []
    for bw, s in zip(w.blocks, state, strict=False):
        if isinstance(bw, Mamba2BlockWeights):  # flat (B, C (K - 1) + E N)
            channels, keep = bw.conv.shape[0], bw.d_conv - 1
            window = s[:, :channels * keep].reshape(len(s), channels, keep)
            oldest = np.zeros((len(s), channels, 1), s.dtype)
            out += [np.concatenate([oldest, window], 2),
                    s[:, channels * keep:].reshape(len(s), bw.n_heads, bw.head_dim, -1)]
        elif isinstance(bw, MambaBlockWeights):
            keep = bw.d_conv - 1
            oldest = np.zeros((*s.shape[:2], 1), s.dtype)
            out += [np.concatenate([oldest, s[:, :, :keep]], 2), s[:, :, keep:]]
        else:
            out.append(s)
    return out + list(state[len(w.blocks):])


def join_cache(w: ModelWeights, states: list) -> list:
    """The inverse of :func:`split_cache`: graph states -> ``allocate_state``'s layout."""
    if not w.tokens:
        return list(states)
    out, i = [], 0
    for bw in w.blocks:
        if isinstance(bw, (MambaBlockWeights, Mamba2BlockWeights)):
            conv, ssm = states[i], states[i + 1]
            if isinstance(bw, Mamba2BlockWeights):
                out.append(np.concatenate([conv[:, :, 1:].reshape(len(conv), -1),
                                           ssm.reshape(len(ssm), -1)], 1))
            else:
                out.append(np.concatenate([conv[:, :, 1:], ssm], 2))
            i += 2
        else:
            out.append(states[i])
            i += 1
    return out + list(states[i:])
