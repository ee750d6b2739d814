"""Loading the reference projects' checkpoints (MODELS.md §9)."""
from __future__ import annotations

import os
from typing import Mapping, NamedTuple

import torch
from torch import nn

_PREFIXES = ("module.", "model.", "_orig_mod.")
_CONTAINER_KEYS = ("state_dict", "net_param", "model_state_dict", "model")


class CheckpointError(ValueError):
    """The checkpoint does not fit the model (missing, unexpected or mis-shaped entries)."""


class LoadReport(NamedTuple):
    loaded: list
    missing: list
    unexpected: list
    mismatched: list  # (key, checkpoint shape, model shape)
    stripped_prefixes: list

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} entries"]
        if self.stripped_prefixes:
            lines.append(f"stripped key prefixes: {self.stripped_prefixes}")
        if self.missing:
            lines.append(f"missing in the checkpoint ({len(self.missing)}): {_short(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected in the checkpoint ({len(self.unexpected)}): {_short(self.unexpected)}")
        if self.mismatched:
            lines.append("shape mismatches: " + "; ".join(f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}"
                                                          for k, a, b in self.mismatched[:10]))
        return "\n".join(lines)


def _short(keys, n=12):
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def extract_state_dict(obj) -> dict:
    """The tensor dict inside a checkpoint: a raw state_dict, {'state_dict': ...} (Lightning),
    {'net_param': ...} (thuml), or {'model_state_dict'/'model': ...}."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(f"a checkpoint must be a path, a state_dict or a dict holding one, got {type(obj).__name__}")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    for key in _CONTAINER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    raise CheckpointError(f"no state_dict found in the checkpoint: expected tensors at the top level or under one "
                          f"of {_CONTAINER_KEYS}; its keys are {_short(map(str, obj.keys()))}")


def _strip(sd: dict, model_keys: set) -> tuple[dict, list]:
    stripped = []
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            hits = [k for k in sd if k.startswith(p)]
            if not hits:
                continue
            # strip when it makes more keys match the model (Lightning may also store non-model modules)
            before = sum(k in model_keys for k in sd)
            cand = {(k[len(p):] if k.startswith(p) else k): v for k, v in sd.items()}
            if sum(k in model_keys for k in cand) > before:
                sd = cand
                stripped.append(p)
                changed = True
    return sd, stripped


def load_checkpoint(model: nn.Module, path_or_dict, strict: bool = True, map_location="cpu",
                    weights_only: bool = True) -> LoadReport:
    """Load a reference checkpoint into a vpfast model (or any module).

    path_or_dict: a file path, or an already loaded object: a raw state_dict, a Lightning checkpoint
      {'state_dict': {'model.xxx': ...}}, a DDP state_dict ('module.xxx'), thuml's {'net_param': ...}.
      `model.` / `module.` / `_orig_mod.` prefixes are removed when that makes the keys match.
    strict: raise `CheckpointError` naming every missing, unexpected and mis-shaped entry (default); with
      strict=False load what fits and return the report.
    weights_only: passed to torch.load for paths; set False for trusted files that pickle other objects.
    Returns a LoadReport(loaded, missing, unexpected, mismatched, stripped_prefixes).
    """
    if isinstance(path_or_dict, (str, os.PathLike)):
        try:
            obj = torch.load(path_or_dict, map_location=map_location, weights_only=weights_only)
        except Exception as e:
            if isinstance(e, OSError):  # missing file, no permission: the OS's message names the path already
                raise
            msg = str(e)
            # weights_only's unpickler reports a pickled class as an "Unsupported global": a real checkpoint that
            # holds more than tensors. Any other failure (its "Unsupported operand" on bytes that are no pickle,
            # IndexError: pop from empty list, EOFError, a zip reader's error) names neither the file nor the
            # problem: a truncated, corrupt or foreign file.
            if weights_only and "Unsupported global" in msg:
                raise CheckpointError(f"{path_or_dict}: torch.load(weights_only=True) refused this file (it "
                                      f"pickles more than tensors). If you trust it, pass weights_only=False. "
                                      f"({msg.splitlines()[0]})") from e
            detail = next((line.strip() for line in msg.splitlines() if "Unsupported operand" in line),
                          msg.splitlines()[0] if msg else "")
            raise CheckpointError(f"{path_or_dict}: not a readable PyTorch checkpoint (truncated, corrupt or "
                                  f"another format): {type(e).__name__}: {detail}") from e
    else:
        obj = path_or_dict
    sd = extract_state_dict(obj)
    own = model.state_dict()
    sd, stripped = _strip(sd, set(own))
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own
                  if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    report = LoadReport([k for k in own if k in sd and k not in {m[0] for m in mismatched}], missing, unexpected,
                        mismatched, stripped)
    if strict and (missing or unexpected or mismatched):
        hint = ""
        if mismatched:
            hint = (" (shape mismatches usually mean a different configuration, e.g. in_shape channels, "
                    "num_hidden, hid_S/hid_T or patch_size; build the model with the checkpoint's config)")
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}{hint}:\n{report}")
    ok = {k: sd[k] for k in report.loaded}
    model.load_state_dict(ok, strict=False)
    return report
