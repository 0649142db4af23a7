"""The candidate-scoring policy interface shared by every family, and its checkpoint format.

A :class:`CandidatePolicy` maps observation tokens to a :class:`CandidateSet`: ``G`` candidate trajectories
per world (ego frame, waypoints every 0.5 s, the format the shared tracker executes), a validity mask and one
logit per candidate. The policy is the categorical distribution ``softmax(logits)`` over the valid candidates;
evaluation drives the top-1 candidate, fine-tuning samples from it. Only
:meth:`CandidatePolicy.trainable_parameters` (the family's candidate-scoring part) changes in fine-tuning.

Checkpoints are one ``torch.save`` file written atomically (temp name, then rename) holding::

    {"format": "craft-policy", "format_version": 1, "family": "vocab" | "hier" | "vla",
     "config": dict of the family's config dataclass, "state_dict": the module's weights and buffers
     (vocabulary, normalisation statistics), "meta": free-form (data, training run, ...)}

:func:`load_policy` checks each of these and fails with one line naming the problem. Files are read with
``torch.load(weights_only=True)`` (:func:`craft.files.load_torch`): a crafted file cannot run code. Weights that
are not finite (NaN / inf) are refused on load and never saved.

The family registry ``_FAMILIES`` is filled by the family modules themselves (:func:`register_family`); the
package ``craft.policies`` imports the light ones and names the heavy ``vla`` module with
:func:`register_family_module` (imported on first use), so this module never imports a family (no cycle).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from craft.errors import CraftError
from craft.files import load_torch, save_torch
from craft.world.observe import Observation

FORMAT = "craft-policy"
FORMAT_VERSION = 1
WAYPOINT_DT = 0.5
"""Time between candidate waypoints, s (the tracker's plan format)."""

_FAMILIES: dict[str, type["CandidatePolicy"]] = {}
_FAMILY_MODULES: dict[str, str] = {}
"""Families whose module is imported on first use (family name -> module), registered by the package."""


@dataclass
class CandidateSet:
    """Candidates of ``B`` worlds.

    trajectories: (B, G, T, 3) ego frame (x forward, y left, yaw), waypoint ``t`` at ``(t + 1) * 0.5`` s;
    valid: (B, G) bool (at least one valid per world); logits: (B, G), ``-inf``-free (invalid ones are masked
    by :meth:`log_probs`).
    """

    trajectories: Tensor
    valid: Tensor
    logits: Tensor

    @property
    def num_candidates(self) -> int:
        return int(self.logits.shape[1])

    def log_probs(self) -> Tensor:
        """(B, G) log pi over the valid candidates (invalid: a large negative number, probability 0)."""
        masked = self.logits.masked_fill(~self.valid, -1e9)
        return torch.log_softmax(masked, dim=-1)

    def top1(self) -> Tensor:
        """(B,) index of the highest-scoring valid candidate."""
        return self.logits.masked_fill(~self.valid, float("-inf")).argmax(-1)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """(B,) candidate indices drawn from pi (explicit generator for determinism)."""
        p = self.log_probs().exp()
        if generator is not None and generator.device != p.device:  # a CPU generator drives CUDA policies too
            return torch.multinomial(p.cpu(), 1, generator=generator).squeeze(1).to(p.device)
        return torch.multinomial(p, 1, generator=generator).squeeze(1)

    def select(self, idx: Tensor) -> Tensor:
        """(B, T, 3) trajectories of the candidates ``idx (B,)``."""
        b = torch.arange(self.trajectories.shape[0], device=idx.device)
        return self.trajectories[b, idx]


class CandidatePolicy(nn.Module):
    """Base class: ``forward(obs) -> CandidateSet``; families register with :func:`register_family`.

    Subclasses set ``family`` and ``Config`` (a dataclass; the constructor takes one instance) and implement
    :meth:`forward`, :meth:`trainable_parameters` and :meth:`imitation_loss`.
    """

    family: ClassVar[str] = ""
    Config: ClassVar[type] = object

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def forward(self, obs: Observation) -> CandidateSet:  # pragma: no cover - abstract
        raise NotImplementedError

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The fine-tuned subset, by parameter name (everything else stays frozen in fine-tuning)."""
        raise NotImplementedError

    def imitation_loss(self, obs: Observation, expert: Tensor) -> dict[str, Tensor]:
        """Open-loop losses against expert trajectories ``expert (B, T, 3)``; keys ``loss_*`` are summed,
        other keys are diagnostics (e.g. ``acc``)."""
        raise NotImplementedError

    def features(self, obs: Observation) -> Tensor:
        """(B, D) scene summary (the shared encoder's ego token); critics of RL baselines read it."""
        return self.encoder(obs)[2]

    def freeze_for_finetuning(self) -> list[nn.Parameter]:
        """Set ``requires_grad`` on the fine-tuned subset only; returns those parameters."""
        keep = self.trainable_parameters()
        ids = {id(p) for p in keep.values()}
        for p in self.parameters():
            p.requires_grad_(id(p) in ids)
        return list(keep.values())

    # -------------------------------------------------------------- checkpoints
    def checkpoint(self, meta: dict | None = None) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "family": self.family,
                "config": dataclasses.asdict(self.cfg), "state_dict": self.state_dict(), "meta": dict(meta or {})}

    def save(self, path: str | os.PathLike, meta: dict | None = None) -> None:
        """Write a checkpoint atomically (temp file in the same folder, then rename); non-finite weights are
        refused (CraftError) and nothing is written."""
        ck = self.checkpoint(meta)
        check_finite_weights(ck["state_dict"], f"refusing to save '{path}'")
        atomic_save(ck, path)


def register_family(cls: type[CandidatePolicy]) -> type[CandidatePolicy]:
    _FAMILIES[cls.family] = cls
    return cls


def register_family_module(family: str, module: str) -> None:
    """Declare that importing ``module`` registers ``family`` (imported when the family is first needed)."""
    _FAMILY_MODULES.setdefault(family, module)


def _family_class(family: str) -> type[CandidatePolicy] | None:
    """The registered class of ``family`` (importing its module if it is registered lazily), or None."""
    if family not in _FAMILIES and isinstance(family, str) and family in _FAMILY_MODULES:
        import importlib

        try:
            importlib.import_module(_FAMILY_MODULES[family])
        except ImportError:  # e.g. transformers / peft / tokenizers missing: the vla family is unavailable
            return None
    return _FAMILIES.get(family) if isinstance(family, str) else None


def families() -> list[str]:
    """The families this build can use (lazily registered ones are imported to find out)."""
    return sorted(f for f in set(_FAMILIES) | set(_FAMILY_MODULES) if _family_class(f) is not None)


def check_finite_weights(state_dict: dict, where: str) -> None:
    """CraftError naming the first floating-point tensor of ``state_dict`` with a NaN or inf."""
    for k, v in state_dict.items():
        if isinstance(v, Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CraftError(f"{where}: weight '{k}' holds non-finite values (NaN or inf); the policy is "
                             "unusable (a diverged run? lower the learning rate)")


def build_policy(family: str, cfg: Any = None) -> CandidatePolicy:
    """A freshly initialised policy of ``family`` (config defaults unless ``cfg`` is given)."""
    cls = _family_class(family)
    if cls is None:
        raise CraftError(f"unknown policy family '{family}' (one of {', '.join(families())})")
    return cls(cfg if cfg is not None else cls.Config())


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file beside ``path``, then rename over it (never half-written; the usual file
    mode; see :func:`craft.files.atomic_write`)."""
    save_torch(obj, path)


PACKAGE_ROOT = Path(__file__).resolve().parents[2]
"""The folder holding the ``craft`` package: in a checkout, the repository (``checkpoints/`` lies there)."""


def committed_checkpoint(family: str) -> Path:
    """The committed pre-trained checkpoint of ``family`` (``checkpoints/<family>.pt`` of the repository),
    found relative to the package, wherever the command runs."""
    return PACKAGE_ROOT / "checkpoints" / f"{family}.pt"


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint file ``path`` names: the file, or a folder's ``policy.pt``. A relative path that does not
    exist here but does under the repository (``checkpoints/vocab.pt`` run from another folder) is taken from
    there. One CraftError line if there is none."""
    path = Path(path)
    if not path.exists() and not path.is_absolute() and (PACKAGE_ROOT / path).exists():
        path = PACKAGE_ROOT / path
    if not path.exists():
        raise CraftError(f"policy checkpoint '{path}' does not exist")
    if path.is_dir():
        path = path / "policy.pt"
        if not path.exists():
            raise CraftError(f"'{path.parent}' is a folder without policy.pt: not a CRAFT policy checkpoint")
    return path


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load and check a policy checkpoint file (format, version, family); one-line CraftError otherwise."""
    path = checkpoint_file(path)
    ck = load_torch(path, "CRAFT policy checkpoint")  # weights_only: a crafted file cannot run code
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CraftError(f"'{path}' is not a CRAFT policy checkpoint (no '{FORMAT}' format tag)")
    if ck.get("format_version") != FORMAT_VERSION:
        raise CraftError(f"'{path}' has checkpoint format version {ck.get('format_version')}, this build reads "
                         f"version {FORMAT_VERSION}; re-create it with `craft pretrain`")
    if _family_class(ck.get("family")) is None:
        raise CraftError(f"'{path}' holds a policy of unknown family '{ck.get('family')}' "
                         f"(this build knows {', '.join(families())})")
    return ck


def load_policy(path: str | os.PathLike, family: str | None = None, device: str | torch.device = "cpu"
                ) -> CandidatePolicy:
    """The policy stored at ``path`` (a file, or a folder holding ``policy.pt``), in eval mode.

    family: when given, a checkpoint of another family is an error.
    """
    ck = read_checkpoint(path)
    return policy_from_checkpoint(ck, family=family, device=device, where=str(path))


def policy_from_checkpoint(ck: dict, family: str | None = None, device: str | torch.device = "cpu",
                           where: str = "checkpoint") -> CandidatePolicy:
    fam = ck["family"]
    if not isinstance(ck.get("config"), dict) or not isinstance(ck.get("state_dict"), dict):
        raise CraftError(f"'{where}' is not a complete CRAFT policy checkpoint (config or weights missing)")
    check_finite_weights(ck["state_dict"], f"'{where}'")
    if family is not None and fam != family:
        raise CraftError(f"'{where}' holds a '{fam}' policy, expected family '{family}'")
    cls = _family_class(fam)
    if cls is None:
        raise CraftError(f"'{where}' holds a policy of unknown family '{fam}' (this build knows "
                         f"{', '.join(families())})")
    try:
        cfg = cls.Config(**ck["config"])
    except (TypeError, ValueError, CraftError) as e:
        raise CraftError(f"'{where}': its {fam} config does not match this build ({_one_line(e)})") from None
    try:
        policy = cls(cfg)
    except Exception as e:  # a config that builds no module (e.g. a tampered file, a bad observation config)
        raise CraftError(f"'{where}': its {fam} config cannot build a policy ({_one_line(e)})") from None
    bad = weight_mismatch(policy.state_dict(), ck["state_dict"])
    if bad:
        raise CraftError(f"'{where}': weights do not match the {fam} architecture of its config (mismatched "
                         f"vocabulary or layers?): {bad}")
    try:
        policy.load_state_dict(ck["state_dict"])
    except CraftError as e:
        raise CraftError(f"'{where}': {e}") from None
    except (RuntimeError, TypeError, ValueError, AttributeError, KeyError) as e:
        raise CraftError(f"'{where}': weights do not match the {fam} architecture of its config "
                         f"(mismatched vocabulary or layers?): {_one_line(e)}") from None
    policy.meta = ck.get("meta", {})
    return policy.to(device).eval()


def weight_mismatch(want: dict, got: dict, show: int = 3) -> str:
    """Which weights of ``got`` do not fit a module whose state dict is ``want``: missing and unexpected names,
    and shapes that differ (the first ``show`` of each); "" if they fit."""
    def names(keys: list[str]) -> str:
        return ", ".join(keys[:show]) + (f" and {len(keys) - show} more" if len(keys) > show else "")

    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    shapes = [f"{k} {tuple(got[k].shape)} instead of {tuple(want[k].shape)}" for k in want
              if k in got and isinstance(got[k], torch.Tensor) and got[k].shape != want[k].shape]
    parts = [f"missing {names(missing)}" if missing else "", f"unexpected {names(extra)}" if extra else "",
             f"shape {names(shapes)}" if shapes else ""]
    return "; ".join(p for p in parts if p)


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0][:200] if lines else type(e).__name__)


__all__ = ["CandidateSet", "CandidatePolicy", "register_family", "register_family_module", "build_policy",
           "families", "load_policy", "read_checkpoint", "policy_from_checkpoint", "atomic_save",
           "check_finite_weights", "checkpoint_file", "committed_checkpoint", "weight_mismatch", "PACKAGE_ROOT",
           "FORMAT_VERSION", "WAYPOINT_DT"]
