"""Power-function EMA and post-hoc EMA reconstruction (Karras et al. 2024, EDM2).

"Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2), Section 3 and
Appendix C, lets the EMA length be chosen *after* training:

1. During training, track a couple of *power-function* EMA profiles (``PowerEMA``, default
   relative widths sigma_rel = 0.05 and 0.10; each profile is a ``ModelEMA`` with the
   registered ``power`` schedule, ``power_profile``, and all of them, with any classic EMAs
   put ``alongside``, are updated by one ``MultiEMA`` in one fused pass) and save their weights every few steps
   (``SnapshotWriter``, fp16 by default, one file per snapshot and profile).
2. Afterwards, any other profile is approximated as a linear combination of the stored
   snapshots; the coefficients come from a least-squares fit of the *response functions*
   (``solve_posthoc_coefficients``), which only depend on (step, sigma_rel) of each
   snapshot, and the weights are combined by streaming the files (``reconstruct``).

Vocabulary
----------
* ``step`` (t): number of EMA updates so far, 1-based; the first update copies the model.
* ``gamma``: exponent of the power-function profile. At step t the power EMA is the
  average of the past weights theta_tau with density p_t(tau) = (gamma+1) tau^gamma /
  t^(gamma+1) on [0, t] (EDM2 Eq. 121/108).
* ``sigma_rel``: standard deviation of that density divided by t (EDM2 Eq. 123); it is
  the "EMA length" that does not depend on the training length.

Mapping to the classic EMA
--------------------------
A classic EMA with per-update decay beta weighs the weights of age k (in updates) by
(1-beta) beta^k: a geometric profile whose standard deviation is sqrt(beta) / (1-beta)
updates. ``decay_to_sigma_rel(beta, t)`` divides that by t; ``sigma_rel_to_decay``
inverts it in closed form. This matches the *width* (std) of the two profiles, which is
EDM2's definition of EMA length; the shapes differ (exponential vs power function).
The formula assumes the EMA has run long enough that the part of the geometric profile
cut off by the start of training is negligible (beta^t << 1); for an EMA whose time
constant is comparable to t the real (truncated) profile is narrower than the formula says.

Snapshot folder layout
----------------------
``<dir>/posthoc-<step:09d>-s<sigma_rel:.6f>.pt``, each a ``torch.save`` of a plain dict
(loadable with ``weights_only=True``)::

    {"format": "emakit.posthoc", "version": 1, "step": int, "sigma_rel": float,
     "gamma": float, "dtype": "float16", "state_dict": {name: tensor}}

The folder alone is enough to reconstruct. Its size is linear in the number of snapshot
steps (``estimate_footprint``). A disk budget (``PosthocBudget``: bytes, or a multiple of
the model's float32 bytes) becomes a cap on snapshot steps (``budget_max_snapshots``);
``SnapshotWriter(max_snapshots=N)`` keeps the folder under it: ``plan(total_steps)`` widens
the interval (doubling it, so earlier snapshots stay on the grid) until the planned run fits
and deletes the snapshots off that grid, and a save that would overflow the cap thins the
same way. The folder always holds the multiples of the interval plus the newest step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .checkpoint import CheckpointError, UnsafeCheckpointError, describe_nonfinite, safe_torch_load, save_torch_file
from .ema import ModelEMA, MultiEMA, unwrap_model
from .schedules import get_schedule
# One definition of the half-life <-> decay formulas for the package (Composer's convention:
# decay = 0.5 ** (1 / half_life), half_life = ln 0.5 / ln decay, in updates); re-exported here.
from .schedules import decay_to_half_life, half_life_to_decay

__all__ = ["SIGMA_REL_MAX", "DTYPES", "sigma_rel_to_gamma", "gamma_to_sigma_rel", "power_beta", "decay_to_sigma_rel",
           "sigma_rel_to_decay", "decay_to_half_life", "half_life_to_decay", "half_life_to_sigma_rel",
           "sigma_rel_to_half_life", "power_function_correlation", "solve_posthoc_coefficients", "power_profile",
           "PowerEMA", "SnapshotInfo", "Footprint", "PosthocBudget", "human_bytes", "parse_budget",
           "model_fp32_bytes", "budget_max_snapshots", "SnapshotWriter", "estimate_footprint", "snapshot_count",
           "list_snapshots", "reconstruct", "reconstruct_many"]

_logger = logging.getLogger(__name__)

# gamma = 0 is the uniform average of all past weights, the widest profile we accept:
# sigma_rel(0) = sqrt(1 / (2^2 * 3)) = 1/sqrt(12) ~ 0.2887 (EDM2 caps it at 0.289).
# Wider values need gamma < 0: those profiles weigh *early* weights more than recent ones,
# sigma_rel(gamma) is no longer one-to-one below gamma = (sqrt(5) - 3) / 2 ~ -0.382
# (maximum sigma_rel ~ 0.3003), and the closed-form inner product below needs
# gamma_a + gamma_b + 1 > 0. None of that is a moving average worth reconstructing.
SIGMA_REL_MAX: float = 1.0 / math.sqrt(12.0)

_FORMAT = "emakit.posthoc"
_VERSION = 1
_FILE_RE = re.compile(r"posthoc-(\d+)-s(\d+\.\d+)\.pt")
# The floating dtypes by the names emakit's flags use (--posthoc-dtype, --amp-dtype): the one table.
DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


if TYPE_CHECKING:  # numpy is imported by the functions that do the post-hoc math
    import numpy as np

# --------------------------------------------------------------------------------------
# sigma_rel <-> gamma <-> decay <-> half-life
# --------------------------------------------------------------------------------------


def _check_sigma_rel(sigma_rel: float, name: str = "sigma_rel") -> float:
    s = float(sigma_rel)
    # A relative tolerance lets the exact uniform average 1/sqrt(12) round-trip.
    if not (math.isfinite(s) and 0.0 < s <= SIGMA_REL_MAX * (1.0 + 1e-9)):
        raise ValueError(f"{name} must be in (0, {SIGMA_REL_MAX:.4f}] (the uniform average), got {sigma_rel!r}")
    return s


def _check_gamma(gamma: float, name: str = "gamma") -> float:
    g = float(gamma)
    if not (math.isfinite(g) and g >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0, got {gamma!r}")
    return g


def _check_step(step: int, name: str = "step") -> int:
    if isinstance(step, bool) or int(step) != step or int(step) < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {step!r}")
    return int(step)


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power-function profile with exponent ``gamma``.

    sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3)))  (EDM2 Eq. 123).
    ``gamma`` must be >= 0 (0 = uniform average, sigma_rel = 1/sqrt(12)).
    """
    g = _check_gamma(gamma)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent ``gamma`` >= 0 of the power-function profile with relative std ``sigma_rel``.

    Squaring Eq. 123 and clearing denominators gives the cubic (EDM2 Eq. 126)
    gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0; its largest real root is
    the one on the branch where sigma_rel decreases with gamma. Valid range:
    0 < sigma_rel <= 1/sqrt(12) (``SIGMA_REL_MAX``).
    """
    import numpy as np

    inv = _check_sigma_rel(sigma_rel) ** -2.0
    # The other two roots are real negative or a complex pair with real part
    # -(7 + gamma)/2 < 0 (the roots sum to -7), so the largest real part is the one we want.
    g = float(np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv]).real.max())
    # Newton polish in float64: np.roots goes through an eigenvalue solve, whose error
    # grows with gamma (large gamma = tiny sigma_rel).
    for _ in range(3):
        f = ((g + 7.0) * g + 16.0 - inv) * g + 12.0 - inv
        df = (3.0 * g + 14.0) * g + 16.0 - inv
        if df == 0.0:
            break
        g -= f / df
    return max(g, 0.0)


def power_beta(step: int, gamma: float) -> float:
    """Per-update decay of the power EMA at update number ``step`` (1-based).

    beta_t = (1 - 1/t)^(gamma+1)  (EDM2 Eq. 127 with one update per step). beta_1 = 0, so
    the first update copies the model. Unrolled, the EMA at step t weighs the weights of
    step tau by (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1): the integral of the
    continuous profile (gamma+1) x^gamma / t^(gamma+1) over (tau-1, tau].
    """
    # schedules.py holds the formula
    return get_schedule("power")(0.0, _check_step(step) - 1, None, gamma=_check_gamma(gamma))


def decay_to_sigma_rel(decay: float, step: int) -> float:
    """sigma_rel of a classic EMA with per-update ``decay``, measured at update ``step``.

    The classic EMA weighs age k by (1-decay) decay^k, a geometric profile with standard
    deviation sqrt(decay) / (1 - decay) updates, so sigma_rel = sqrt(decay) / ((1-decay) t).
    Example: decay 0.9998 -> std ~5000 updates -> sigma_rel 0.05 at step 100_000.
    Assumes decay^step << 1 (see the module docstring). The result may exceed
    ``SIGMA_REL_MAX`` when the EMA is long for the run; such a width has no
    power-function equivalent.
    """
    d = float(decay)
    if not (0.0 < d < 1.0):
        raise ValueError(f"decay must be in (0, 1), got {decay!r}")
    t = _check_step(step)
    return math.sqrt(d) / (1.0 - d) / t


def sigma_rel_to_decay(sigma_rel: float, step: int) -> float:
    """Per-update decay of the classic EMA whose relative std at ``step`` is ``sigma_rel``.

    Inverse of ``decay_to_sigma_rel``: with sigma = sigma_rel * t updates and u = sqrt(decay),
    sqrt(decay)/(1-decay) = sigma is the quadratic sigma u^2 + u - sigma = 0, whose
    positive root is u = 2 sigma / (1 + sqrt(1 + 4 sigma^2)); decay = u^2.
    """
    s = float(sigma_rel)
    if not (math.isfinite(s) and s > 0.0):
        raise ValueError(f"sigma_rel must be a finite number > 0, got {sigma_rel!r}")
    sigma = s * _check_step(step)
    u = 2.0 * sigma / (1.0 + math.sqrt(1.0 + 4.0 * sigma * sigma))
    return u * u


def half_life_to_sigma_rel(half_life: float, step: int) -> float:
    """sigma_rel at ``step`` of a classic EMA with the given half-life (in updates)."""
    return decay_to_sigma_rel(half_life_to_decay(half_life), step)


def sigma_rel_to_half_life(sigma_rel: float, step: int) -> float:
    """Half-life (in updates) of the classic EMA matching ``sigma_rel`` at ``step``."""
    return decay_to_half_life(sigma_rel_to_decay(sigma_rel, step))


# --------------------------------------------------------------------------------------
# Least-squares reconstruction coefficients (EDM2 Appendix C.3, Algorithm 3)
# --------------------------------------------------------------------------------------


def power_function_correlation(a_step: np.ndarray | float, a_gamma: np.ndarray | float,
                               b_step: np.ndarray | float, b_gamma: np.ndarray | float) -> np.ndarray:
    """Inner product over [0, inf) of two power-function responses (broadcasting).

    With p_i(tau) = (g_i+1) tau^g_i / t_i^(g_i+1) on [0, t_i], and t_a <= t_b,
    integral p_a p_b dtau = (g_a+1)(g_b+1) / ((g_a+g_b+1) t_b) * (t_a/t_b)^g_b  (EDM2 Eq. 151);
    the other order swaps the roles. Float64 throughout.
    """
    import numpy as np

    ta, ga, tb, gb = (np.asarray(x, dtype=np.float64) for x in (a_step, a_gamma, b_step, b_gamma))
    t_lo, t_hi = np.minimum(ta, tb), np.maximum(ta, tb)
    g_hi = np.where(ta <= tb, gb, ga)  # exponent of the profile that runs to the later step
    return (ga + 1.0) * (gb + 1.0) / ((ga + gb + 1.0) * t_hi) * (t_lo / t_hi) ** g_hi


def solve_posthoc_coefficients(in_steps: Sequence[int], in_sigma_rels: Sequence[float] | float,
                               out_steps: Sequence[int] | int, out_sigma_rels: Sequence[float] | float) -> np.ndarray:
    """Least-squares coefficients that combine stored profiles into requested ones.

    Snapshot i is the power EMA with relative width ``in_sigma_rels[i]`` at step
    ``in_steps[i]``; its response p_i is a density on [0, in_steps[i]]. For each output
    profile q_j the coefficients x_j minimise || sum_i x_ij p_i - q_j ||^2 in L2[0, inf),
    i.e. solve A x_j = b_j with A_ik = <p_i, p_k> and b_ij = <p_i, q_j> in closed form
    (``power_function_correlation``), using ``numpy.linalg.lstsq`` in float64 so that
    near-duplicate snapshots do not break the solve. Each column is then rescaled to sum
    to 1, so the reconstructed response integrates to 1 like every EMA (EDM2 Algorithm 3).

    Scalars broadcast against the sequences. Returns an array of shape [n_in, n_out].
    """
    import numpy as np

    ts_in, sr_in = np.broadcast_arrays(np.asarray(in_steps, np.float64).reshape(-1),
                                       np.asarray(in_sigma_rels, np.float64).reshape(-1))
    ts_out, sr_out = np.broadcast_arrays(np.asarray(out_steps, np.float64).reshape(-1),
                                         np.asarray(out_sigma_rels, np.float64).reshape(-1))
    if ts_in.size == 0:
        raise ValueError("in_steps must hold at least one snapshot step")
    if ts_out.size == 0:
        raise ValueError("out_steps must hold at least one step")
    for name, ts in (("in_steps", ts_in), ("out_steps", ts_out)):
        if not np.all(np.isfinite(ts) & (ts > 0)):
            raise ValueError(f"{name} must be positive steps, got {ts.tolist()}")
    g_in = np.array([sigma_rel_to_gamma(_check_sigma_rel(s, "in_sigma_rels")) for s in sr_in])
    g_out = np.array([sigma_rel_to_gamma(_check_sigma_rel(s, "out_sigma_rels")) for s in sr_out])
    col = lambda x: x.reshape(-1, 1)  # noqa: E731
    row = lambda x: x.reshape(1, -1)  # noqa: E731
    gram = power_function_correlation(col(ts_in), col(g_in), row(ts_in), row(g_in))
    rhs = power_function_correlation(col(ts_in), col(g_in), row(ts_out), row(g_out))
    coefs = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    return coefs / coefs.sum(axis=0, keepdims=True)


# --------------------------------------------------------------------------------------
# Tracking power EMAs during training
# --------------------------------------------------------------------------------------


def power_profile(sigma_rel: float, *, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> dict[str, Any]:
    """:class:`~emakit.ModelEMA` arguments of the power-function EMA of relative width
    ``sigma_rel``: the registered ``power`` schedule with ``gamma = sigma_rel_to_gamma(sigma_rel)``,
    averaging every update from the first (which copies the model), float tensors and float
    buffers kept in ``dtype``. ``ModelEMA(model, **power_profile(0.05))`` tracks one profile;
    a list of them as ``MultiEMA(model, members=[...])`` members (beside classic EMAs, too)
    updates every profile in one fused pass.
    """
    s = _check_sigma_rel(sigma_rel, "sigma_rels")
    return {"schedule": "power", "gamma": sigma_rel_to_gamma(s), "update_every": 1, "update_after_step": 0,
            "copy_first": False, "buffers": "average", "dtype": dtype, "device": device}


class PowerEMA:
    """Several power-function EMAs of one model, updated together (EDM2 Section 3.1).

    Each profile is a :class:`~emakit.ModelEMA` with the ``power`` schedule
    (:func:`power_profile`), and all of them are members of one :class:`~emakit.MultiEMA`
    (``engine``): ``update(model)`` counts the step and applies, for each profile, the
    per-update decay beta_t = (1 - 1/t)^(gamma+1) (``power_beta``) in one fused
    foreach-lerp pass. The first update copies the model, and at step t the EMA weighs
    past weights in proportion to the integral of tau^gamma over each step. Float tensors
    are averaged in ``dtype`` (fp32 by default, even for a bf16/fp16 model, since
    (1-beta) * delta underflows in half precision); non-float buffers (``num_batches_tracked``)
    are copied. DDP / DataParallel and ``torch.compile`` wrappers are unwrapped; keys carry
    no wrapper prefix. State dicts hold the model's ``state_dict`` keys (parameters and
    persistent buffers); non-persistent buffers are averaged too but, like in the model's
    ``state_dict``, not saved.

    Args:
        model: the model to track (any wrapping).
        sigma_rels: relative widths of the tracked profiles, each in (0, 1/sqrt(12)].
        dtype: storage/accumulation dtype for float tensors.
        device: where the EMA weights live (default: next to the model's tensors).
        alongside: other :class:`~emakit.ModelEMA` s of the same model (e.g. a trainer's EMAs)
            to put in the same engine: :meth:`update` then advances them in the same fused
            pass, and they must not be updated separately. They stay out of this object's
            ``members``, ``state_dict`` and snapshots. Default: none.
    """

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float] = (0.05, 0.10), *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 alongside: Sequence[ModelEMA] = ()) -> None:
        if isinstance(sigma_rels, (int, float)):
            sigma_rels = (sigma_rels,)
        self.sigma_rels: tuple[float, ...] = tuple(_check_sigma_rel(s, "sigma_rels") for s in sigma_rels)
        if not self.sigma_rels:
            raise ValueError("sigma_rels must name at least one profile")
        if len({f"{s:.6f}" for s in self.sigma_rels}) != len(self.sigma_rels):
            raise ValueError(f"sigma_rels must be distinct (to 6 decimals), got {list(self.sigma_rels)}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        self.gammas: tuple[float, ...] = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.dtype = dtype
        self.members: list[ModelEMA] = [ModelEMA(model, **power_profile(s, dtype=dtype, device=device))
                                        for s in self.sigma_rels]
        self.engine = MultiEMA(members=[*alongside, *self.members])
        self.keys: list[str] = list(self.members[0].state_dict_ema(full=False).keys())  # no collective

    @property
    def step(self) -> int:
        """Updates so far (1-based step of the last one; 0 before the first)."""
        return self.members[0].num_updates

    @step.setter
    def step(self, value: int) -> None:
        for member in self.members:
            member.num_updates = value

    @property
    def sharded(self) -> bool:
        """True when tracking a sharded (FSDP2) model: each profile holds this rank's shards."""
        return self.members[0].sharded

    @property
    def profiles(self) -> list[list[torch.Tensor]]:
        """``profiles[k][i]``: profile k's tensor under ``keys[i]`` (shares storage). For a
        sharded model, DTensors over this rank's shards (global shapes, no communication)."""
        return [list(self.profile_state_dict(k, full=False).values()) for k in range(len(self.members))]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Advance every profile (and the ``alongside`` EMAs) by one step towards ``model``'s
        current weights, in one fused pass."""
        self.engine.update(model)

    def profile_state_dict(self, index: int, full: bool = True, rank0_only: bool = False) -> dict[str, torch.Tensor]:
        """Profile ``index``'s current weights as a ``state_dict`` (shares storage). A sharded
        model's profile as ``ModelEMA.state_dict_ema(full, rank0_only)``: whole CPU tensors
        gathered (*collective*: every rank calls it; with ``rank0_only`` the others get ``{}``),
        or DTensors over this rank's shards with ``full=False``."""
        return self.members[index].state_dict_ema(full, rank0_only)

    def gathered_profiles(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """``(k, profile k's state_dict)`` for every profile, one at a time: a sharded model's
        profile is gathered to rank 0 (CPU tensors; ``{}`` on the other ranks) just before it is
        yielded, so no rank holds more than one whole profile. *Collective* for a sharded model:
        every rank iterates to the end."""
        for k in range(len(self.members)):
            yield k, self.profile_state_dict(k, full=True, rank0_only=True)

    @torch.no_grad()
    def copy_to(self, model: nn.Module, index: int = 0) -> None:
        """Write profile ``index``'s weights into ``model`` in place (any wrapping)."""
        self.members[index].copy_to(model)

    def state_dict(self, full: bool = True, rank0_only: bool = False) -> dict[str, Any]:
        """Plain types and tensors only, so it loads with ``torch.load(weights_only=True)``.
        ``full`` / ``rank0_only`` as in :meth:`profile_state_dict` (they matter for a sharded
        model only: gathered profiles, *collective*, or DTensors for a DCP folder)."""
        return {"step": self.step, "sigma_rels": list(self.sigma_rels),
                "profiles": [self.profile_state_dict(k, full, rank0_only) for k in range(len(self.sigma_rels))]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output exactly (step counter and every profile)."""
        got = [float(s) for s in state["sigma_rels"]]
        if got != list(self.sigma_rels):
            raise ValueError(f"state sigma_rels {got} do not match this PowerEMA's {list(self.sigma_rels)}")
        for k, saved in enumerate(state["profiles"]):
            if set(saved.keys()) != set(self.keys):  # by name: a DCP folder's conversion may reorder them
                raise ValueError(f"state profile {k} has different keys than the tracked model")
        for member, saved in zip(self.members, state["profiles"]):
            member.load_checkpoint_state(saved)
        self.step = int(state["step"])


def _model_state(model: nn.Module | PowerEMA) -> list[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of the bare model's ``state_dict`` (tensors only, no copy), or of a
    ``PowerEMA``'s first profile (this rank's shards for a sharded model)."""
    if isinstance(model, PowerEMA):
        return list(zip(model.keys, model.profiles[0]))
    return [(k, t) for k, t in unwrap_model(model).state_dict().items() if isinstance(t, torch.Tensor)]


# --------------------------------------------------------------------------------------
# Snapshots on disk
# --------------------------------------------------------------------------------------


_SIZE_RE = re.compile(r"(?i)\s*(\d+(?:\.\d*)?|\.\d+)\s*(x|b|kib|mib|gib|tib|kb|mb|gb|tb|k|m|g|t)?\s*")
_UNITS = {None: 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20,
          "g": 2**30, "t": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


@dataclasses.dataclass(frozen=True)
class PosthocBudget:
    """A bound on a snapshot folder's bytes: ``nbytes`` outright, or ``multiple`` times the
    model's float32 bytes (``model_fp32_bytes``); neither set means unbounded.

    Built by :func:`parse_budget` from ``"512MiB"``, ``"2GB"``, ``"17x"``, ``"none"``.
    """

    nbytes: int | None = None
    multiple: float | None = None

    @property
    def unbounded(self) -> bool:
        """True for ``none``: no bound."""
        return self.nbytes is None and self.multiple is None

    def resolve(self, model_bytes: int) -> int | None:
        """The bound in bytes for a model of ``model_bytes`` float32 bytes (None: unbounded)."""
        return int(self.multiple * int(model_bytes)) if self.multiple is not None else self.nbytes

    def __str__(self) -> str:
        if self.unbounded:
            return "none"
        return f"{self.multiple:g}x" if self.multiple is not None else human_bytes(self.nbytes)


def parse_budget(text: str | int | float | None) -> PosthocBudget:
    """Parse a snapshot disk budget: ``none`` (unbounded), a multiple of the model's float32
    bytes (``8x``, ``16.5x``) or a size (``512MiB``, ``2GiB``, ``1.5G`` = binary units;
    ``500MB``, ``2GB`` = decimal; a bare number = bytes). ``ValueError`` for anything else
    or for a zero / negative budget.
    """
    if text is None or (isinstance(text, str) and text.strip().lower() in ("none", "unbounded", "off")):
        return PosthocBudget()
    if isinstance(text, bool):
        raise ValueError(f"budget must be a size such as 512MiB, a multiple such as 8x, or none, got {text!r}")
    m = _SIZE_RE.fullmatch(str(text))
    if not m:
        raise ValueError(f"budget must be a size such as 512MiB or 2GB, a multiple of the model's float32 "
                         f"bytes such as 8x, or none, got {text!r}")
    value, unit = float(m.group(1)), (m.group(2) or "").lower() or None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"budget must be positive, got {text!r}")
    return PosthocBudget(multiple=value) if unit == "x" else PosthocBudget(nbytes=int(value * _UNITS[unit]))


def model_fp32_bytes(model: nn.Module | PowerEMA) -> int:
    """Bytes of the model's state (parameters and persistent buffers) with every float
    tensor in float32: the unit of a ``PosthocBudget`` multiple such as ``8x``."""
    return sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for _, t in _model_state(model))


def budget_max_snapshots(budget_bytes: int | None, bytes_per_snapshot: int) -> int | None:
    """How many snapshot steps of ``bytes_per_snapshot`` (all profiles) fit in
    ``budget_bytes`` (None: unbounded)."""
    if budget_bytes is None:
        return None
    if bytes_per_snapshot <= 0:
        raise ValueError(f"bytes_per_snapshot must be > 0, got {bytes_per_snapshot!r}")
    return int(budget_bytes) // int(bytes_per_snapshot)


@dataclasses.dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot file: its path, step and profile width (as encoded in the name)."""

    path: str
    step: int
    sigma_rel: float


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Disk use of a snapshot folder: ``n_snapshots`` steps x ``files_per_snapshot`` files."""

    bytes_per_file: int
    files_per_snapshot: int
    n_snapshots: int

    @property
    def bytes_per_snapshot(self) -> int:
        """Bytes written at one snapshot step (all profiles)."""
        return self.bytes_per_file * self.files_per_snapshot

    @property
    def total_bytes(self) -> int:
        """Bytes of the whole folder."""
        return self.bytes_per_snapshot * self.n_snapshots

    def __str__(self) -> str:
        return (f"{self.n_snapshots} snapshots x {self.files_per_snapshot} profiles x "
                f"{human_bytes(self.bytes_per_file)} = {human_bytes(self.total_bytes)}")


def human_bytes(n: float) -> str:
    """``n`` bytes as ``512 B``, ``1.5 KiB``, ``42.7 MiB``, ``1.8 GiB`` (binary units)."""
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# torch.save writes a zip: per tensor, a storage record aligned to 64 bytes plus local and
# central-directory headers (~200 bytes) and the key in the pickle; the
# fixed part is the pickle frame, metadata and zip trailer. Measured on torch 2.4-2.15;
# the test checks the estimate against bytes on disk.
_BYTES_PER_TENSOR = 260
_BYTES_FIXED = 1080  # with the 80-byte checksum comment (checkpoint.save_torch_file)


def _file_bytes(tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype) -> int:
    total = _BYTES_FIXED
    for name, t in tensors:
        size = t.element_size() if not t.is_floating_point() else torch.empty((), dtype=dtype).element_size()
        total += t.numel() * size + _BYTES_PER_TENSOR + len(name)
    return total


def estimate_footprint(model: nn.Module | PowerEMA, n_snapshots: int, n_profiles: int = 2,
                       dtype: torch.dtype = torch.float16) -> Footprint:
    """Projected disk use of ``n_snapshots`` snapshot steps of ``n_profiles`` profiles.

    Each file holds every state tensor (float ones cast to ``dtype``) plus a small,
    estimated torch.save overhead; the total is linear in ``n_snapshots``
    (see ``snapshot_count`` for the count a training run produces).
    """
    if isinstance(n_snapshots, bool) or int(n_snapshots) != n_snapshots or n_snapshots < 0:
        raise ValueError(f"n_snapshots must be an integer >= 0, got {n_snapshots!r}")
    _check_step(n_profiles, "n_profiles")
    return Footprint(_file_bytes(_model_state(model), dtype), int(n_profiles), int(n_snapshots))


def snapshot_count(total_steps: int, every: int, max_snapshots: int | None = None) -> int:
    """Snapshot steps kept in the folder after ``total_steps`` updates.

    Without a cap: total_steps // every. With ``max_snapshots``, the writer doubles its
    interval (dropping every other snapshot) whenever the count would exceed the cap, so
    the folder always holds the multiples of every * 2^k up to the current step, with k
    the smallest integer giving at most ``max_snapshots`` of them.
    """
    every = _check_step(every, "every")
    n = int(total_steps) // every
    while max_snapshots is not None and n > max_snapshots:
        every *= 2
        n = int(total_steps) // every
    return n


def _atomic_save(obj: Any, path: str) -> None:
    """torch.save through :func:`emakit.checkpoint.save_torch_file` (temp file, fsync, replace,
    with the checksum a full read checks)."""
    save_torch_file(obj, path, through_handle=True)  # the footprint estimate assumes its layout


class SnapshotWriter:
    """Saves every profile of a ``PowerEMA`` every ``every`` steps into ``folder``.

    One file per (step, profile), written atomically, named
    ``posthoc-<step:09d>-s<sigma_rel:.6f>.pt``. Float tensors are stored in ``dtype``
    (fp16 by default, as EDM2 does; ``torch.float32`` for exact storage).

    The folder grows linearly with the number of snapshots (``footprint``). With
    ``max_snapshots`` it stays bounded: ``plan(total_steps)`` widens the interval up front
    so that a run of that length fits, and a save that would still exceed the cap deletes
    every other stored step and doubles the interval; either way the snapshots keep
    covering the whole run at a coarser spacing (reconstruction only needs coverage; EDM2
    uses a few hundred, ``bench/posthoc_budget.py`` measures how few suffice). The folder
    then holds the multiples of the interval plus the newest step (a run's off-interval
    last step), at most ``max_snapshots``. Call ``maybe_save(ema)`` after each ``ema.update``.
    """

    def __init__(self, folder: str | os.PathLike, every: int, *, dtype: torch.dtype = torch.float16,
                 max_snapshots: int | None = None) -> None:
        self.folder = os.fspath(folder)
        self.every = _check_step(every, "every")
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of float16, bfloat16, float32, got {dtype}")
        if max_snapshots is not None and (isinstance(max_snapshots, bool) or int(max_snapshots) < 2):
            raise ValueError(f"max_snapshots must be None or an integer >= 2, got {max_snapshots!r}")
        self.dtype = dtype
        self.max_snapshots = max_snapshots
        self.bytes_per_file: int | None = None  # measured after the first save
        os.makedirs(self.folder, exist_ok=True)
        # Resume: an earlier thinning may have doubled the interval already (the newest
        # step may be a run's off-interval last step, so it does not count).
        grid = sorted({s.step for s in list_snapshots(self.folder, missing_ok=True)})[:-1]
        while max_snapshots is not None and len(grid) > 1 and all(s % (2 * self.every) == 0 for s in grid):
            self.every *= 2

    def maybe_save(self, ema: PowerEMA) -> list[str]:
        """Save ``ema``'s profiles if its step is a multiple of the interval; return paths."""
        return [] if ema.step == 0 or ema.step % self.every else self.save(ema)

    @torch.no_grad()
    def save(self, ema: PowerEMA) -> list[str]:
        """Save every profile of ``ema`` at its current step now (then thin if capped)."""
        if ema.step < 1:
            raise ValueError("ema.step must be >= 1 to save a snapshot (call ema.update first)")
        paths, error = [], None
        dtype_name = next(k for k, v in DTYPES.items() if v == self.dtype)
        for k, profile in ema.gathered_profiles():  # a sharded model: one profile gathered at a time
            if error is not None:
                continue  # every profile is still gathered, so the other ranks are not left waiting
            sigma_rel, gamma = ema.sigma_rels[k], ema.gammas[k]
            state = {}
            for key in ema.keys:
                t = profile[key].detach().to("cpu")
                state[key] = t.to(self.dtype) if t.is_floating_point() else t.clone()
                if self.dtype != torch.float32 and not torch.isfinite(state[key]).all() \
                        and torch.isfinite(t).all():
                    _logger.warning("post-hoc snapshot: %s overflows %s; store float32 instead", key, dtype_name)
            payload = {"format": _FORMAT, "version": _VERSION, "step": int(ema.step), "sigma_rel": float(sigma_rel),
                       "gamma": float(gamma), "dtype": dtype_name, "state_dict": state}
            path = os.path.join(self.folder, f"posthoc-{ema.step:09d}-s{sigma_rel:.6f}.pt")  # see _FILE_RE
            try:
                _atomic_save(payload, path)
            except OSError as e:
                error = e
                continue
            self.bytes_per_file = os.path.getsize(path)
            paths.append(path)
        if error is not None:
            raise error
        self._thin()
        return paths

    def _kept_steps(self, steps: list[int]) -> list[int]:
        """The steps the folder keeps at the current interval: its multiples and the newest."""
        newest = max(steps, default=None)
        return [t for t in steps if t % self.every == 0 or t == newest]

    def _remove_except(self, keep: set[int]) -> None:
        for s in list_snapshots(self.folder, missing_ok=True):
            if s.step not in keep:
                os.remove(s.path)

    def _thin(self) -> None:
        """With a cap: drop steps off the interval (but the newest), doubling the interval
        until the kept steps fit. Without one, nothing is ever deleted."""
        if self.max_snapshots is None:
            return
        steps = sorted({s.step for s in list_snapshots(self.folder, missing_ok=True)})
        kept = self._kept_steps(steps)
        while len(kept) > self.max_snapshots:
            self.every *= 2
            kept = self._kept_steps(steps)
            _logger.info("post-hoc snapshots thinned: interval now %d steps", self.every)
        if len(kept) != len(steps):
            self._remove_except(set(kept))

    def plan(self, total_steps: int) -> int:
        """Fit a run of ``total_steps`` updates into the cap: double the interval until the
        run's snapshot steps (multiples of the interval plus the last step, ceil(total /
        every) of them) fit in ``max_snapshots``, and delete stored snapshots off that
        interval right away (e.g. when a resumed run is extended). Without a cap it changes
        nothing. Returns the interval."""
        total = _check_step(total_steps, "total_steps")
        if self.max_snapshots is None:
            return self.every
        while -(-total // self.every) > self.max_snapshots:
            self.every *= 2
        self._remove_except({s.step for s in list_snapshots(self.folder, missing_ok=True) if s.step % self.every == 0})
        return self.every

    def prune_after(self, step: int) -> int:
        """Delete snapshots newer than ``step`` (e.g. left by a crashed run before resume)."""
        stale = [s for s in list_snapshots(self.folder, missing_ok=True) if s.step > step]
        for s in stale:
            os.remove(s.path)
        return len(stale)

    def disk_usage(self) -> int:
        """Bytes currently taken by the snapshot files in the folder."""
        return sum(os.path.getsize(s.path) for s in list_snapshots(self.folder, missing_ok=True))

    def footprint(self, ema: PowerEMA, total_steps: int) -> Footprint:
        """Projected folder size at the end of a ``total_steps``-update run.

        Uses the measured file size once a snapshot was written, else the estimate.
        """
        n = snapshot_count(total_steps, self.every, self.max_snapshots)
        est = estimate_footprint(ema, n, len(ema.sigma_rels), self.dtype)
        return est if self.bytes_per_file is None else dataclasses.replace(est, bytes_per_file=self.bytes_per_file)


def list_snapshots(snapshot_dir: str | os.PathLike, *, missing_ok: bool = False) -> list[SnapshotInfo]:
    """Snapshot files in ``snapshot_dir``, sorted by (step, sigma_rel).

    Raises ``ValueError`` if the folder does not exist (unless ``missing_ok``).
    """
    folder = os.fspath(snapshot_dir)
    if not os.path.isdir(folder):
        if missing_ok:
            return []
        raise ValueError(f"snapshot_dir {folder!r} is not a directory")
    found = []
    with os.scandir(folder) as it:
        for e in it:
            m = _FILE_RE.fullmatch(e.name)
            if m and e.is_file():
                found.append(SnapshotInfo(e.path, int(m.group(1)), float(m.group(2))))
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


# --------------------------------------------------------------------------------------
# Reconstruction
# --------------------------------------------------------------------------------------


def _load(path: str, mmap: bool = False) -> dict[str, Any]:
    """One snapshot file; ``ValueError`` naming it if it cannot be read or is not a snapshot."""
    fix = "move it out of the folder to reconstruct from the others"
    try:
        obj = safe_torch_load(path, "cpu", mmap=mmap)
    except UnsafeCheckpointError as e:  # weights_only refused it: code, not damage
        raise ValueError(f"refused snapshot {path} as unsafe: it asks to import or run code{e.code}, which "
                         "torch.load(weights_only=True) refused, so nothing in it was run; it is not one of "
                         f"our snapshots: {fix}") from None
    except CheckpointError as e:  # truncated, corrupt, not a torch file, or its checksum fails
        checksum = " (its checksum does not match)" if "checksum" in str(e) else ""
        raise ValueError(f"cannot read snapshot {path}: the file is damaged or not a torch file{checksum}; "
                         f"{fix}") from None
    except OSError as e:
        raise ValueError(f"cannot read snapshot {path}: {e.strerror or e}; {fix}") from None
    if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
        raise ValueError(f"snapshot file {path!r} is not an emakit post-hoc snapshot; {fix}")
    state_dict = obj.get("state_dict")
    if (isinstance(obj.get("step"), bool) or not isinstance(obj.get("step"), int)
            or not isinstance(obj.get("sigma_rel"), (int, float)) or not isinstance(state_dict, dict)
            or not all(isinstance(t, torch.Tensor) for t in state_dict.values())):
        raise ValueError(f"snapshot file {path!r} is malformed (needs an int step, a float sigma_rel and a "
                         f"state_dict of tensors); {fix}")
    return obj


def _select_inputs(snapshot_dir: str | os.PathLike, step: int | None) -> tuple[list[SnapshotInfo], int]:
    snaps = list_snapshots(snapshot_dir)
    if not snaps:
        raise ValueError(f"snapshot_dir {os.fspath(snapshot_dir)!r} holds no post-hoc snapshots "
                         "(files named posthoc-<step>-s<sigma_rel>.pt)")
    steps = sorted({s.step for s in snaps})
    step = _check_step(steps[-1] if step is None else step)
    if step > steps[-1]:
        raise ValueError(f"step={step} is beyond the last snapshot step {steps[-1]} "
                         f"in {os.fspath(snapshot_dir)!r}")
    if step not in steps:
        # Between snapshots the training trajectory was not recorded; a profile ending
        # there would be extrapolated, not reconstructed.
        lower = max(s for s in steps if s < step) if steps[0] < step else None
        upper = min(s for s in steps if s > step)
        near = ", ".join(str(s) for s in (lower, upper) if s is not None)
        raise ValueError(f"step={step} is not a snapshot step; nearest: {near}")
    # Later snapshots average weights from after `step`, so they cannot be used.
    return [s for s in snaps if s.step <= step], step


@torch.no_grad()
def reconstruct_many(snapshot_dir: str | os.PathLike, sigma_rels: Sequence[float],
                     step: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Post-hoc EMAs for several ``sigma_rels`` at ``step`` in one pass over the files.

    Memory: one fp32 model per requested profile plus one snapshot. Float tensors are
    accumulated in fp32 on CPU; non-float tensors come from the last snapshot used.
    ``step`` defaults to the last snapshot step and must be one of the snapshot steps.
    """
    import numpy as np

    sigma_rels = [_check_sigma_rel(s, "sigma_rel") for s in sigma_rels]
    if not sigma_rels:
        raise ValueError("sigma_rel must name at least one profile")
    inputs, step = _select_inputs(snapshot_dir, step)
    # First pass reads only metadata (mmap: tensor data is not read) for the exact widths.
    meta = [(int(obj["step"]), float(obj["sigma_rel"])) for obj in (_load(s.path, mmap=True) for s in inputs)]
    coefs = solve_posthoc_coefficients([m[0] for m in meta], [m[1] for m in meta], step, sigma_rels)
    spread = float(np.abs(coefs).sum(axis=0).max())
    if spread > 1e3:
        # Large alternating coefficients amplify storage rounding (fp16) in the result.
        _logger.warning("post-hoc reconstruction is ill-conditioned (sum |coef| = %.3g); "
                        "snapshots may be too dense or the requested sigma_rel too small", spread)
    outs: list[dict[str, torch.Tensor]] = []
    keys: list[str] | None = None
    for i, s in enumerate(inputs):
        sd = _load(s.path)["state_dict"]
        if problem := describe_nonfinite(sd):
            raise ValueError(f"snapshot {s.path}: {problem}, so every reconstruction from it would too; "
                             "move it out of the folder to reconstruct from the others")
        if keys is None:
            keys = list(sd.keys())
            outs = [{k: torch.zeros(t.shape, dtype=torch.float32) if t.is_floating_point() else t.clone()
                     for k, t in sd.items()} for _ in sigma_rels]
        elif list(sd.keys()) != keys:
            raise ValueError(f"snapshot {s.path!r} holds other tensors than the first snapshot")
        for j, out in enumerate(outs):
            c = float(coefs[i, j])
            for k, t in sd.items():
                if t.is_floating_point():
                    out[k].add_(t.to(torch.float32), alpha=c)
                else:
                    out[k].copy_(t)  # the last (latest) snapshot's value wins
        del sd
    return outs


def reconstruct(snapshot_dir: str | os.PathLike, sigma_rel: float,
                step: int | None = None) -> dict[str, torch.Tensor]:
    """Post-hoc EMA with relative width ``sigma_rel`` at ``step`` as an fp32 ``state_dict``.

    Streams the snapshots of ``snapshot_dir`` with step <= ``step`` one at a time
    (memory: one fp32 model plus one snapshot) and combines them with
    ``solve_posthoc_coefficients``. ``step`` defaults to the last snapshot step.
    """
    return reconstruct_many(snapshot_dir, [sigma_rel], step)[0]
