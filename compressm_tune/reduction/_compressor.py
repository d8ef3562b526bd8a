"""In-training state reduction for any PyTorch training loop.

:class:`Compressor` brings the trainer's in-training reduction to a loop the user wrote: it
finds the reducible layers inside any ``nn.Module`` and, at attempt points inside the reduction
window, drives the same :class:`~compressm_tune.reduction.Reducer` as the trainer (same rank
policies, same safety net, same surgery), implementing the reducer's
:class:`~compressm_tune.reduction.ReductionHost` interface itself:

* rollback is in memory: the cut layers' parameter objects and the optimizer's groups and
  state are kept before a cut and put back if validation drops by more than ``max_drop``;
* the user's optimizer is rewritten in place (its ``param_groups`` point at the new
  parameters; the LR scheduler and any other reference to it stay valid), so every parameter
  the cut did not touch keeps its optimizer state, the very tensors.

Reducible layers: :class:`~compressm_tune.models.LRULayer`,
:class:`~compressm_tune.models.SelectiveLayer`, any layer offering ``keep_states`` and
``state_axes`` the same way, and any module implementing the LTI protocol (``system()`` and
``load_system_parameters(lam, B, C, D)``, see :mod:`compressm_tune.reduction._surgery`).

Several GPUs (``torchrun``, ``DistributedDataParallel``): a cut gives the cut layers new,
narrower parameters, which the DDP wrapper built around the old ones does not know. Hand the
Compressor the unwrapped model and the optimizer, and pass ``on_cut``: it is called after a
:meth:`Compressor.step` that changed any width (the optimizer already rewritten), and there
the loop wraps the model in a new ``DistributedDataParallel`` (whose construction broadcasts
rank 0's weights) and trains through that from then on. Every rank must make the same cut at
the same step: call ``step`` on every rank with the same ``calibration`` and a ``validate``
that returns the whole validation set's numbers on every rank (evaluate a shard per rank and
all-reduce or all-gather); ranks then hold identical weights (DDP averages the gradients) and
make the same decisions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from compressm_tune.errors import ConfigError
from compressm_tune.reduction._policies import ReductionPolicy
from compressm_tune.reduction._reduce_config import CALIBRATION, ReduceConfig
from compressm_tune.reduction._reducer import Reducer
from compressm_tune.reduction._surgery import find_reducible, is_selective, layer_width

__all__ = ["Compressor"]

log = logging.getLogger("compressm_tune.compressor")

_ATTEMPTS_IN_WINDOW = 3  # default attempt points in the window, as the trainer's fallback


class Compressor:
    """Shrink the state of a model's SSM layers while a plain PyTorch loop trains it.

    Parameters
    ----------
    model : nn.Module
        Any module holding at least one reducible layer (module docstring).
    optimizer : torch.optim.Optimizer
        The loop's optimizer over (some of) ``model``'s parameters; rewritten in place after a
        cut. Parameters it does not hold stay out of it; new parameters of a cut layer join the
        group of the parameters they replace.
    reduce : str or ReductionPolicy
        The rank policy, e.g. ``"tau=0.04"`` (discard 4% of the Hankel singular value sum),
        ``"fraction=0.5"``, ``"rank=8"`` (syntax of :meth:`ReductionPolicy.parse`).
    total_steps : int
        Optimizer steps the loop will take (the window is a fraction of them).
    window : float
        Cuts are attempted only within the first ``window * total_steps`` steps.
    every : int, optional
        Steps between attempts inside the window; default a third of the window.
    validate : callable, optional
        ``validate() -> {"accuracy": ...}`` (higher is better) or ``{"loss": ...}`` on held-out
        data; with it every cut is checked and rolled back (and its layer frozen at its width)
        if accuracy drops by more than ``max_drop`` points or the loss rises by more than
        ``max_drop`` relatively. Without it cuts are not checked. The model is put back in
        the training mode it had after each call.
    calibration : tensor, tuple or dict, optional
        A fixed batch of model inputs (``model(x)``, ``model(*x)`` or ``model(**x)``) whose
        layer inputs score the states: required for selective layers and for
        ``weighting=input``; a tensor is cut to its first ``calibration_size`` rows.
        ``validate`` may also return per-sample values on the same samples every time,
        ``"sample_loss"`` and (classification) ``"sample_accuracy"`` (arrays of shape (n,)):
        then cuts are judged by the paired test of
        :func:`~compressm_tune.reduction.paired_verdict` and the ``adaptive`` schedule
        measures its readiness band from them.
    max_drop, moments, round_to, fits, calibration_size, schedule
        As :class:`~compressm_tune.reduction.ReduceConfig` (``calibration``);
        ``schedule="settle"`` cuts each layer toward its settled target width
        (:class:`~compressm_tune.reduction.SettleConfig`) at checks it spreads over the
        window (unless ``every``); ``schedule="adaptive"`` waits for readiness
        (``warmup_steps`` over and, with per-sample validation, the metric out of its band at
        the first :meth:`step` call), then cuts to widths from the spectrum, retrying between
        rejected and kept widths.
    warmup_steps : int
        The loop's LR warm-up: the adaptive schedule does not cut before it ends.
    on_cut : callable, optional
        ``on_cut()`` after a :meth:`step` that changed any layer's width (a cut or a budget
        cut; not a rolled-back one), once the optimizer holds the new parameters: where a
        loop under ``DistributedDataParallel`` re-wraps the model (module docstring).

    Attributes
    ----------
    events : list of dict
        One record per cut, rollback or budget cut: ``step``, ``layer`` (qualified module
        name), ``action``, ``n_before``, ``n_after`` and, when checked, ``val_before`` and
        ``val_after``. Each is also logged on the ``compressm_tune.compressor`` logger (INFO).

    Examples
    --------
    >>> from compressm_tune.models import SSMConfig, SSMModel
    >>> model = SSMModel(SSMConfig(d_input=1, d_output=2, d_model=4, state_dims=[8]))
    >>> opt = torch.optim.Adam(model.parameters())
    >>> c = Compressor(model, opt, reduce="rank=3", total_steps=10, window=0.5)
    >>> for step in range(1, 11):
    ...     events = c.step(step)
    >>> c.widths, c.events[0]["action"]
    ({'blocks.0.ssm': 3}, 'cut')
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 reduce: str | ReductionPolicy = "tau=0.04", *, total_steps: int,
                 window: float = 0.1, every: int | None = None,
                 validate: Callable[[], dict[str, float]] | None = None,
                 calibration: Any = None, max_drop: float = 0.02, moments: str = "reset",
                 round_to: Callable[[int, int], int] | None = None,
                 fits: Callable[[list[int]], bool] | None = None,
                 calibration_size: int = CALIBRATION, schedule: str = "window",
                 warmup_steps: int = 0, on_cut: Callable[[], None] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ConfigError(f"total_steps must be an integer >= 1, got {total_steps=}")
        if isinstance(reduce, str):
            policy = ReductionPolicy.parse(reduce)
        elif isinstance(reduce, ReductionPolicy):
            policy = reduce
        else:
            raise ConfigError(f"reduce must be a policy string such as 'tau=0.04' or a "
                              f"ReductionPolicy, got {type(reduce).__name__}")
        found = find_reducible(model)
        if not found:
            raise ConfigError(
                f"{type(model).__name__} holds no reducible layer: use LRULayer, "
                "SelectiveLayer, MambaLayer or Mamba2Layer, or give your layer system() -> "
                "(lam, B, C, D) and load_system_parameters(lam, B, C, D) (see the README, "
                "'Compress your own training loop')")
        self.layer_names = [name for name, _ in found]
        needs_data = [n for n, layer in found if is_selective(layer)]
        if calibration is None and (needs_data or policy.weighting == "input"):
            why = (f"selective layer(s) {needs_data}" if needs_data
                   else "weighting=input")
            raise ConfigError(f"{why} score states on data: pass calibration= (a batch of "
                              "model inputs)")
        config = ReduceConfig(  # checks the settings before they are used
            policy=policy, window=window, every=every,
            max_drop=max_drop if validate is not None else math.inf, moments=moments,
            round_to=round_to, fits=fits, calibration=calibration_size, schedule=schedule)
        if every is None and schedule == "window":  # the others spread their own checks
            config = replace(config, every=max(1, int(window * total_steps)
                                               // _ATTEMPTS_IN_WINDOW))
        self.model, self.optimizer = model, optimizer
        self.total_steps = total_steps
        self._validate, self._calibration = validate, calibration
        self.reducer = Reducer(config)
        self._step = 0
        self.warmup_steps = warmup_steps
        self.on_cut = on_cut
        self._params = dict(model.named_parameters())  # names of what the optimizer holds
        self.events: list[dict[str, Any]] = []

    @property
    def widths(self) -> dict[str, int]:
        """Current state width of every reducible layer, by qualified module name."""
        return {name: layer_width(layer)
                for name, layer in zip(self.layer_names, self.reducible_layers(), strict=True)}

    def step(self, step: int) -> list[dict[str, Any]]:
        """Call after each ``optimizer.step()`` with the number of steps taken so far (1, 2,
        ...); attempts a reduction when ``step`` is an attempt point in the window, and cuts
        to the ``fits`` budget once after it. Returns this step's new :attr:`events`."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"step must be an integer >= 0 (steps taken), got {step=}")
        if self._step == 0 and self._validate is not None:
            self.reducer.begin(self)  # the adaptive schedule's starting band
        self._step = step
        new: list[dict[str, Any]] = []
        widths = list(self.widths.values())
        if self.reducer.due(step, self.total_steps):
            before = list(self.widths.values())
            records, _ = self.reducer.attempt(self, None)
            after = list(self.widths.values())
            for record in records:
                if record.get("action") in ("cut", "rollback"):
                    k = record["layer"]
                    event = {"step": step, "layer": self.layer_names[k],
                             "action": record["action"], "n_before": before[k],
                             "n_after": after[k]}
                    event.update({key: record[key] for key in ("val_before", "val_after")
                                  if key in record})
                    new.append(event)
        elif not self.reducer.active(step, self.total_steps) and not self.reducer.closed:
            before = list(self.widths.values())
            ranks = self.reducer.close_window(self)
            if ranks is not None:
                new += [{"step": step, "layer": name, "action": "budget_cut", "n_before": n,
                         "n_after": r} for name, n, r in
                        zip(self.layer_names, before, ranks, strict=True) if r < n]
        for event in new:
            log.info("step %d: %s %s %d -> %d states", event["step"], event["action"],
                     event["layer"], event["n_before"], event["n_after"])
        self.events += new
        if self.on_cut is not None and list(self.widths.values()) != widths:
            self.on_cut()
        return new

    # -- the ReductionHost interface (compressm_tune.reduction) -------------------------------
    @property
    def steps_done(self) -> int:
        return self._step

    def reducible_layers(self) -> list[nn.Module]:
        return [self.model.get_submodule(name) for name in self.layer_names]

    def calibration_inputs(self, n: int) -> Any:
        x = self._calibration
        return x[:n] if isinstance(x, torch.Tensor) else x

    def validate(self) -> dict[str, float]:
        return self.validate_samples()[0]

    def validate_samples(self) -> tuple[dict[str, float], dict[str, np.ndarray] | None]:
        """The user's validation, and its per-sample values when it returns them."""
        if self._validate is None:
            raise ConfigError("this Compressor has no validate= function")
        was_training = self.model.training
        try:
            result = self._validate()
        finally:
            self.model.train(was_training)
        if not isinstance(result, dict) or not ({"accuracy", "loss"} & set(result)):
            raise ConfigError("validate() must return a dict with 'accuracy' (higher is "
                              f"better) or 'loss', got {result!r}")
        out = {key: float(result[key]) for key in ("accuracy", "loss") if key in result}
        if not all(math.isfinite(v) for v in out.values()):
            raise ConfigError(f"validate() returned a non-finite value: {out}")
        if "sample_loss" not in result:
            return out, None
        samples = {"loss": np.asarray(result["sample_loss"], dtype=np.float64).ravel()}
        if "sample_accuracy" in result:
            samples["accuracy"] = np.asarray(result["sample_accuracy"],
                                             dtype=np.float64).ravel()
        return out, samples

    def snapshot(self) -> Any:
        """In memory: every reducible module's attributes (its parameter objects and their
        data) and the optimizer's groups and state; nothing is copied but references."""
        modules = []
        for layer in self.reducible_layers():
            for module in layer.modules():
                saved = dict(module.__dict__)
                for key in ("_parameters", "_buffers", "_modules"):
                    saved[key] = type(saved[key])(saved[key])
                data = [(p, p.data) for p in module._parameters.values() if p is not None]
                modules.append((module, saved, data))
        groups = [list(group["params"]) for group in self.optimizer.param_groups]
        return modules, groups, dict(self.optimizer.state), dict(self._params)

    def restore(self, snapshot: Any) -> None:
        modules, groups, state, params = snapshot
        for module, saved, data in modules:
            module.__dict__.clear()
            module.__dict__.update(saved)
            for p, value in data:  # a layer that assigned .data in place
                if p.shape != value.shape or p.data_ptr() != value.data_ptr():
                    p.data = value
        for group, held in zip(self.optimizer.param_groups, groups, strict=True):
            group["params"] = list(held)
        self.optimizer.state.clear()
        self.optimizer.state.update(state)
        self._params = params

    def rebuild_optimizer(self) -> None:
        """Rewrite the optimizer's groups in place: each replaced parameter of the model is
        swapped for its successor of the same name in the same group; a parameter with a new
        name joins the group of its module's other parameters; parameters outside the model
        are left alone. State of parameters no longer held is dropped."""
        current = dict(self.model.named_parameters())
        old_names = {id(p): name for name, p in self._params.items()}
        owner_group: dict[str, int] = {}
        placed: set[int] = set()
        for g, group in enumerate(self.optimizer.param_groups):
            held = []
            for p in group["params"]:
                name = old_names.get(id(p))
                new = p if name is None else current.get(name)
                if name is not None:
                    owner_group.setdefault(name.rpartition(".")[0], g)
                if new is not None and id(new) not in placed:
                    held.append(new)
                    placed.add(id(new))
            group["params"] = held
        for name, p in current.items():
            g = owner_group.get(name.rpartition(".")[0])
            if name not in self._params and g is not None and id(p) not in placed:
                self.optimizer.param_groups[g]["params"].append(p)
                placed.add(id(p))
        for p in [p for p in self.optimizer.state if id(p) not in placed]:
            del self.optimizer.state[p]
        self._params = current

    def widths_changed(self) -> None:
        """Nothing to do: the user's loop keeps its own notion of "best"."""
