"""SoftSAE: a sparse autoencoder whose number of active features is predicted per input.

One file in SAE-Lens' own style (compare `sae_lens/saes/topk_sae.py`): the inference config and class,
the training config and class, and the helpers they share. Registration with SAE-Lens' registry lives
in `softsae_plugin/__init__.py`.

Units. Every scale here (`tau`, the budget, the auxiliary loss) refers to the activations the SAE sees
during training. The default `normalize_activations="expected_average_only_in"` makes SAE-Lens scale
inputs to a mean norm of sqrt(d_in), so a coordinate is O(1); the paper instead scales inputs to unit
mean norm. Its tau = 1e-4 therefore corresponds to about 1e-4 * sqrt(d_in) here, and its squared error is
d_in times smaller than SAE-Lens' `mse_loss`: the budget and auxiliary terms are multiplied by d_in so
that `sparsity_coefficient`, `sparsity_beta` and `aux_loss_coefficient` keep the paper's meaning.
"""

from __future__ import annotations

import functools
import math
import numbers
import types
import typing
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.saes.sae import (
    SAE,
    SAEConfig,
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from sae_lens.saes.topk_sae import calculate_topk_aux_acts
from torch import nn
from torch.nn import functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from typing_extensions import override

from softsae_plugin.lapsum import soft_topk
from softsae_plugin.reliability import check_finite

SUPPORTED_NORMALIZATIONS = ("none", "expected_average_only_in")
FOLD_W_DEC_NORM_REFUSAL = (
    "Folding W_dec norms into a SoftSAE would rescale its codes and change which features are in "
    "each input's top-k; SoftSAE decoders are trained with unit-norm rows already"
)


@functools.cache
def _field_types(cls: type) -> dict[str, tuple[type, ...]]:
    """The allowed types of the sizes and of every field softsae declares (int, float, bool, str or None)."""
    hints = typing.get_type_hints(cls)
    # SAE-Lens' own fields (dtype, device, ...) are its to check; the sizes enter softsae's arithmetic.
    own = {"d_in", "d_sae"}.union(
        *(vars(klass).get("__annotations__", {}) for klass in cls.__mro__[:-1] if klass.__module__ == __name__)
    )
    allowed = {}
    for name in own:
        hint = hints[name]
        allowed[name] = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return allowed


def _has_type(value: Any, expected: type) -> bool:
    # bool is an int to Python, and numpy scalars are not int or float: compare by the numbers hierarchy.
    if expected in (int, float) and isinstance(value, bool):
        return False
    if expected is int:
        return isinstance(value, numbers.Integral)
    if expected is float:
        return isinstance(value, numbers.Real)
    return value is None if expected is type(None) else isinstance(value, expected)


def _check_types(cfg: SoftSAEConfig | SoftTrainingSAEConfig) -> None:
    # Before any arithmetic: a string k or a float step count would otherwise fail later with a bare
    # TypeError, or train on a schedule silently computed from the wrong value.
    for name, options in _field_types(type(cfg)).items():
        value = getattr(cfg, name)
        if not any(_has_type(value, option) for option in options):
            expected = " or ".join("None" if option is type(None) else option.__name__ for option in options)
            raise TypeError(f"softsae: {name}={value!r} has type {type(value).__name__}; expected {expected}")
        if isinstance(value, numbers.Real) and not math.isfinite(value):
            raise ValueError(f"softsae: {name}={value!r} is invalid; expected a finite number")


def _check_inference_fields(cfg: SoftSAEConfig | SoftTrainingSAEConfig) -> None:
    _check_types(cfg)
    if cfg.k_max is None:
        cfg.k_max = math.ceil(2 * cfg.k)
    if not 1 <= cfg.k <= cfg.k_max <= cfg.d_sae:
        raise ValueError(f"softsae needs 1 <= k <= k_max <= d_sae; got k={cfg.k}, k_max={cfg.k_max}, d_sae={cfg.d_sae}")
    if cfg.k_head_hidden is not None and not 1 <= cfg.k_head_hidden <= cfg.d_sae:
        raise ValueError(
            f"softsae: k_head_hidden={cfg.k_head_hidden} is invalid; expected in [1, d_sae={cfg.d_sae}] or None"
        )
    if cfg.normalize_activations not in SUPPORTED_NORMALIZATIONS:
        raise ValueError(
            f"normalize_activations={cfg.normalize_activations!r} is not supported by softsae; "
            f"expected one of {SUPPORTED_NORMALIZATIONS} (tau is a scale on the normalised inputs)"
        )


@dataclass
class SoftSAEConfig(SAEConfig):
    """Inference configuration of a SoftSAE.

    Args:
        k: the target mean number of active features the SAE was trained for (recorded, not used to encode).
        k_max: the upper bound of the predicted number of active features; defaults to ceil(2k).
        k_head_hidden: the width of the k head's hidden layer; None means d_sae (the paper's head).
    """

    k: float = 32
    k_max: int | None = None
    k_head_hidden: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_inference_fields(self)

    @override
    @classmethod
    def architecture(cls) -> str:
        return "softsae"


@dataclass
class SoftTrainingSAEConfig(TrainingSAEConfig):
    """Training configuration of a SoftSAE (paper: "SoftSAE: Dynamic Top-K Selection").

    Args:
        k: the target mean number of active features (the budget on the batch mean of k_hat).
        k_max: upper bound of the predicted k_hat; defaults to ceil(2k).
        k_head_hidden: the width of the k head's hidden layer; None means d_sae, the paper's head (a third
            d_in x d_sae matmul); a narrower head (e.g. 256) costs little and starts from that many encoder rows.
        tau: the final LapSum temperature, a scale on the pre-activations (see the module docstring).
        tau_start: the temperature at step 0, annealed linearly to `tau`; None keeps tau constant.
        tau_anneal_steps: steps of the tau anneal; None means 2 percent of the run.
        k_start: the budget's target at step 0, annealed linearly to `k`; None means k_max.
        k_anneal_steps: steps of the target-k anneal; None means 1 percent of the run.
        hard_topk_steps: the last N steps train with hard top-round(k_hat) and a frozen k head;
            None means 10 percent of the run, 0 turns the hard phase off.
        sparsity_coefficient: lambda, the weight of the softplus budget term.
        sparsity_beta: beta, the sharpness of the softplus budget term.
        aux_loss_coefficient: the weight of the AuxK dead-latent loss (normalised MSE).
        k_aux: how many dead latents the AuxK loss uses; None means d_in // 2.
        detach_soft_topk_scores: pass a detached copy of the codes to soft top-k, so gradient reaches
            the codes only through the product a * p (and k_hat through dL/dk). Measured to train
            better: without it, near-ties at the threshold produce 1/(2 tau) gradient spikes.
        fuse_soft_topk: run soft top-k's passes over the codes as torch.compile'd loops (same results to
            float rounding, several times faster; compiling takes seconds to a minute once per process);
            None turns it on when the run is long enough to repay that (see FUSE_MIN_SCORES).
        total_training_steps: the run's length; every schedule is a function of (step, this). Set by
            `sae-lens train` and `train_on_activations`; set it yourself in a custom loop.
    """

    k: float = 32
    k_max: int | None = None
    k_head_hidden: int | None = None
    tau: float = 0.005
    tau_start: float | None = 0.05
    tau_anneal_steps: int | None = None
    k_start: float | None = None
    k_anneal_steps: int | None = None
    hard_topk_steps: int | None = None
    sparsity_coefficient: float = 1.0
    sparsity_beta: float = 5.0
    aux_loss_coefficient: float = 1 / 32
    k_aux: int | None = None
    detach_soft_topk_scores: bool = True
    fuse_soft_topk: bool | None = None
    total_training_steps: int | None = None
    decoder_init_norm: float | None = 1.0
    normalize_activations: str = "expected_average_only_in"  # type: ignore[assignment]

    def __post_init__(self) -> None:
        _check_inference_fields(self)
        checks = {
            "tau": (self.tau, self.tau > 0, "> 0"),
            "tau_start": (self.tau_start, self.tau_start is None or self.tau_start > 0, "> 0 or None"),
            "sparsity_beta": (self.sparsity_beta, self.sparsity_beta > 0, "> 0"),
            "sparsity_coefficient": (self.sparsity_coefficient, self.sparsity_coefficient >= 0, ">= 0"),
            "aux_loss_coefficient": (self.aux_loss_coefficient, self.aux_loss_coefficient >= 0, ">= 0"),
            "k_start": (
                self.k_start,
                self.k_start is None or 1 <= self.k_start <= self.d_sae,
                f"in [1, d_sae={self.d_sae}] or None",
            ),
            "k_aux": (self.k_aux, self.k_aux is None or 1 <= self.k_aux <= self.d_sae, "in [1, d_sae] or None"),
            "total_training_steps": (
                self.total_training_steps,
                self.total_training_steps is None or self.total_training_steps > 0,
                "> 0 or None",
            ),
        }
        for name in ("tau_anneal_steps", "k_anneal_steps", "hard_topk_steps"):
            value = getattr(self, name)
            checks[name] = (value, value is None or value >= 0, ">= 0 or None")
        for name, (value, ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"softsae: {name}={value!r} is invalid; expected {expected}")
        if (
            self.hard_topk_steps is not None
            and self.total_training_steps is not None
            and self.hard_topk_steps > self.total_training_steps
        ):
            raise ValueError(
                f"softsae: hard_topk_steps={self.hard_topk_steps} is longer than the run "
                f"(total_training_steps={self.total_training_steps}); expected <= total_training_steps"
            )
        super().__post_init__()

    @override
    @classmethod
    def architecture(cls) -> str:
        return "softsae"

    def schedule(self, step: int) -> Schedule:
        """The training schedule at `step`: temperature, budget target and phase.

        Every schedule is a function of the step and `total_training_steps` only, so a resumed run
        continues exactly where it stopped.
        """
        total = self.total_training_steps
        if total is None:
            raise ValueError(
                "softsae: total_training_steps is not set; train through `sae-lens train` or "
                "`softsae_plugin.train_on_activations`, or set cfg.total_training_steps yourself"
            )
        tau_steps = self.tau_anneal_steps if self.tau_anneal_steps is not None else round(0.02 * total)
        k_steps = self.k_anneal_steps if self.k_anneal_steps is not None else round(0.01 * total)
        hard_steps = self.hard_topk_steps if self.hard_topk_steps is not None else round(0.1 * total)
        tau_start = self.tau if self.tau_start is None else self.tau_start
        k_start = self.k_max if self.k_start is None else self.k_start
        return Schedule(
            tau=_linear(tau_start, self.tau, step, tau_steps),
            target_k=_linear(k_start, self.k, step, k_steps),
            hard=step >= total - hard_steps,
        )


@dataclass(frozen=True)
class Schedule:
    """The schedule values in force at one training step."""

    tau: float
    target_k: float
    hard: bool


def _linear(start: float, end: float, step: int, steps: int) -> float:
    if steps <= 0 or step >= steps:
        return float(end)
    return float(start + (end - start) * step / steps)


def hard_topk_per_row(acts: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep the k[row] largest entries of each row of `acts` (..., d_sae) and zero the rest.

    `k` holds integer counts of shape acts.shape[:-1]. Entries are kept unscaled, so gradient flows
    to the kept entries; with ReLU codes a row keeps fewer than k non-zeros only when it has fewer
    positive entries.
    """
    k_batch = int(k.max().item()) if k.numel() else 0
    values, indices = acts.topk(k_batch, dim=-1, sorted=True)
    rank = torch.arange(k_batch, device=acts.device)
    values = values * (rank < k.unsqueeze(-1)).to(values.dtype)
    return torch.zeros_like(acts).scatter(-1, indices, values)


def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """The geometric median of the rows of `points` by Weiszfeld's iteration (float64 inside)."""
    x = points.detach().double()
    median = x.mean(0)
    for _ in range(max_iter):
        weights = 1.0 / (x - median).norm(dim=-1).clamp_min(1e-12)
        updated = (weights[:, None] * x).sum(0) / weights.sum()
        if (updated - median).norm() <= tol * median.norm().clamp_min(1.0):
            median = updated
            break
        median = updated
    return median.to(points.dtype)


def _init_soft_weights(sae: SoftSAE | SoftTrainingSAE) -> None:
    # W_enc is W_dec^T from the base init; the k head starts as a copy of the encoder (its first
    # k_head_hidden rows) so that its hidden layer reads the same directions, at k_hat = k_max / 2.
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    hidden = sae.cfg.k_head_hidden or d_sae
    kw: dict[str, Any] = {"dtype": sae.dtype, "device": sae.device}
    sae.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
    sae.W_k_in = nn.Parameter(sae.W_enc.detach()[:, :hidden].clone())
    sae.b_k_in = nn.Parameter(torch.zeros(hidden, **kw))
    sae.w_k_out = nn.Parameter(torch.zeros(hidden, **kw))
    sae.b_k_out = nn.Parameter(torch.zeros((), **kw))
    sae.register_buffer("k_centre", torch.zeros(d_in, **kw))


def _check_last_dim(sae: SoftSAE | SoftTrainingSAE, x: torch.Tensor, what: str) -> None:
    if x.shape[-1] != sae.cfg.d_in:
        raise ValueError(f"softsae {what}: expected input of shape (..., d_in={sae.cfg.d_in}), got {tuple(x.shape)}")


def _check_codes(sae: SoftSAE | SoftTrainingSAE, feature_acts: torch.Tensor) -> None:
    if feature_acts.shape[-1] != sae.cfg.d_sae:
        raise ValueError(
            f"softsae decode: expected codes of shape (..., d_sae={sae.cfg.d_sae}), got {tuple(feature_acts.shape)}"
        )


def _k_head(sae: SoftSAE | SoftTrainingSAE, x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    hidden = F.relu((x.to(sae.dtype) - centre) @ sae.W_k_in + sae.b_k_in)
    product = hidden @ sae.w_k_out
    if product.dtype != sae.w_k_out.dtype:  # autocast: redo it in the weights' precision (a cheap matrix-vector
        with torch.autocast(x.device.type, enabled=False):  # product); in bfloat16 k_hat moves in steps of k_max/256
            product = hidden.to(sae.w_k_out.dtype) @ sae.w_k_out
    k_hat = sae.cfg.k_max * torch.sigmoid(product + sae.b_k_out)
    return k_hat.clamp(1.0, float(sae.cfg.d_sae))


# Fusing soft top-k (soft_topk(fused=True)) compiles once per process, about 80 s cold on 2 CPU cores (seconds with
# the compiler's cache warm), and saves 5-20 ns per score per step there (eval/README.md): it pays back from 2^32 to
# 2^34 scores over the whole run. The paper's runs (2^40 and more) are far above that; the quickstart (2^30) below.
FUSE_MIN_SCORES = 2**34


def _fuse_soft_topk(cfg: SoftTrainingSAEConfig, scores: torch.Tensor) -> bool:
    if cfg.fuse_soft_topk is not None:
        return cfg.fuse_soft_topk
    return (cfg.total_training_steps or 0) * scores.numel() >= FUSE_MIN_SCORES


def _round_k(sae: SoftSAE | SoftTrainingSAE, k_hat: torch.Tensor) -> torch.Tensor:
    return k_hat.detach().round().clamp(1, sae.cfg.k_max).long()


def _check_weights_to_load(sae: SoftSAE | SoftTrainingSAE, state_dict: dict[str, Any]) -> None:
    # SAE-Lens picks the class from cfg.json alone: weights of another architecture would otherwise fail in
    # load_state_dict with a bare list of keys, and NaN weights would load silently and encode to NaN.
    expected = set(sae.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(
            f"softsae: the weights file is not a SoftSAE's (missing {missing}, unexpected {unexpected}); cfg.json "
            "says architecture 'softsae', so expected its parameters: the weights belong to another architecture"
        )
    check_finite(state_dict, "softsae: refusing to load these weights")


def _fold_norm_scaling_into_k_head(sae: SoftSAE | SoftTrainingSAE, scaling_factor: float) -> None:
    # The k head reads (s * x_raw - c) @ W = (x_raw - c / s) @ (s * W).
    sae.W_k_in.data *= scaling_factor
    sae.k_centre.data /= scaling_factor


def _fold_whitening_into_k_head(
    sae: SoftSAE | SoftTrainingSAE, mean: torch.Tensor, whitening: torch.Tensor, unwhitening: torch.Tensor
) -> None:
    # ((x - m) M - c) @ W = (x - (m + c M^-1)) @ (M W): the same map as SAE-Lens applies to b_dec.
    dtype = torch.promote_types(sae.W_k_in.dtype, whitening.dtype)
    whitening, unwhitening, mean = (t.to(sae.device, dtype) for t in (whitening, unwhitening, mean))
    sae.W_k_in.data.copy_(whitening @ sae.W_k_in.data.to(dtype))
    sae.k_centre.data.copy_(sae.k_centre.data.to(dtype) @ unwhitening + mean)


class SoftSAE(SAE[SoftSAEConfig]):
    """Inference SoftSAE: exact top-round(k_hat) per input, k_hat from the dynamic-sparsity head.

    `encode` keeps the round(k_hat) largest ReLU codes of each input (clamped to [1, k_max]) and zeroes
    the rest, without reweighting; `predict_k` gives the continuous k_hat.
    """

    b_enc: nn.Parameter
    W_k_in: nn.Parameter
    b_k_in: nn.Parameter
    w_k_out: nn.Parameter
    b_k_out: nn.Parameter
    k_centre: torch.Tensor

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        _init_soft_weights(self)

    def predict_k(self, x: torch.Tensor) -> torch.Tensor:
        """The continuous number of active features k_hat for each input, of shape x.shape[:-1]."""
        _check_last_dim(self, x, "predict_k")
        return _k_head(self, x, self.k_centre)

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of shape (..., d_sae) with round(k_hat) non-zeros per input (fewer only if fewer are positive)."""
        _check_last_dim(self, x, "encode")
        hidden_pre = self.hook_sae_acts_pre(self.process_sae_in(x) @ self.W_enc + self.b_enc)
        k = _round_k(self, self.predict_k(x))
        return self.hook_sae_acts_post(hard_topk_per_row(F.relu(hidden_pre), k))

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Reconstruct inputs from codes of shape (..., d_sae)."""
        _check_codes(self, feature_acts)
        sae_out = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        return self.reshape_fn_out(self.run_time_activation_norm_fn_out(sae_out), self.d_head)

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        _check_weights_to_load(self, state_dict)

    @override
    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        check_finite(state_dict, "softsae: refusing to save this SAE")

    @override
    def fold_W_dec_norm(self) -> None:
        raise NotImplementedError(FOLD_W_DEC_NORM_REFUSAL)

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)
        _fold_norm_scaling_into_k_head(self, scaling_factor)

    @override
    @torch.no_grad()
    def fold_activation_whitening(
        self, mean: torch.Tensor, whitening_matrix: torch.Tensor, unwhitening_matrix: torch.Tensor
    ) -> None:
        super().fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)
        _fold_whitening_into_k_head(self, mean, whitening_matrix, unwhitening_matrix)


# SAE-Lens' trainer never hands the SAE its optimizer, so the unit-norm decoder constraint (project
# out the radial part of the gradient before the step, renormalise the rows after it) runs from
# global optimizer hooks that act only on optimizers holding a live SoftTrainingSAE's W_dec.
_LIVE_TRAINING_SAES: weakref.WeakSet[SoftTrainingSAE] = weakref.WeakSet()
_HOOKS_INSTALLED = False


def _saes_in(optimizer: torch.optim.Optimizer) -> list[SoftTrainingSAE]:
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [sae for sae in list(_LIVE_TRAINING_SAES) if id(sae.W_dec) in params]


def _project_decoder_grads(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    for sae in _saes_in(optimizer):
        sae.remove_radial_decoder_grad()


def _renormalise_decoders(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    for sae in _saes_in(optimizer):
        sae.normalise_decoder_rows()


def _install_optimizer_hooks() -> None:
    global _HOOKS_INSTALLED
    if not _HOOKS_INSTALLED:
        register_optimizer_step_pre_hook(_project_decoder_grads)
        register_optimizer_step_post_hook(_renormalise_decoders)
        _HOOKS_INSTALLED = True


class SoftTrainingSAE(TrainingSAE[SoftTrainingSAEConfig]):
    """Training SoftSAE: LapSum soft top-k with a learned k_hat, then a hard top-k final phase.

    Soft phase: f = a * soft_topk(a, k_hat, tau) with gradient into k_hat, plus the softplus budget on the
    batch mean of k_hat. Hard phase (the last `hard_topk_steps`): f = top-round(k_hat) of a with the k head
    and the centring it reads frozen, while encoder and decoder keep learning. The codes SAE-Lens' trainer
    counts as firing (dead latents, L0, sparsity file) are the hard codes in both phases.
    """

    b_enc: nn.Parameter
    W_k_in: nn.Parameter
    b_k_in: nn.Parameter
    w_k_out: nn.Parameter
    b_k_out: nn.Parameter
    k_centre: torch.Tensor
    b_dec_initialised: torch.Tensor
    k_head_frozen: torch.Tensor

    def __init__(self, cfg: SoftTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        _LIVE_TRAINING_SAES.add(self)
        _install_optimizer_hooks()

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        _init_soft_weights(self)
        self.register_buffer("b_dec_initialised", torch.zeros((), dtype=torch.bool, device=self.device))
        self.register_buffer("k_head_frozen", torch.zeros((), dtype=torch.bool, device=self.device))

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {}

    def k_head_centre(self) -> torch.Tensor:
        """What the k head subtracts from its input: b_dec while it trains, its snapshot once frozen."""
        return torch.where(self.k_head_frozen, self.k_centre, self.b_dec)

    def predict_k(self, x: torch.Tensor) -> torch.Tensor:
        """The continuous number of active features k_hat for each input, of shape x.shape[:-1]."""
        _check_last_dim(self, x, "predict_k")
        return _k_head(self, x, self.k_head_centre())

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inference encoding (hard top-round(k_hat)) and the pre-activations."""
        _check_last_dim(self, x, "encode")
        hidden_pre = self.hook_sae_acts_pre(self.process_sae_in(x) @ self.W_enc + self.b_enc)
        k = _round_k(self, self.predict_k(x))
        return self.hook_sae_acts_post(hard_topk_per_row(F.relu(hidden_pre), k)), hidden_pre

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Reconstruct inputs from codes of shape (..., d_sae)."""
        _check_codes(self, feature_acts)
        return super().decode(feature_acts)

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """One training step's forward pass and losses, following the schedule at this step."""
        schedule = self.cfg.schedule(step_input.n_training_steps)
        x = step_input.sae_in
        _check_last_dim(self, x, "training_forward_pass")
        if not bool(self.b_dec_initialised):
            self._initialise_b_dec(x)
        if schedule.hard and not bool(self.k_head_frozen):
            self._freeze_k_head()

        hidden_pre = self.hook_sae_acts_pre(self.process_sae_in(x) @ self.W_enc + self.b_enc)
        acts = F.relu(hidden_pre)
        if schedule.hard:
            with torch.no_grad():
                k_hat = self.predict_k(x)
        else:
            k_hat = self.predict_k(x)
        k_int = _round_k(self, k_hat)
        hard_acts = hard_topk_per_row(acts, k_int)
        if schedule.hard:
            feature_acts = hard_acts
        else:
            scores = acts.detach() if self.cfg.detach_soft_topk_scores else acts
            fused = _fuse_soft_topk(self.cfg, scores)
            feature_acts = acts * soft_topk(scores, k_hat.to(torch.float32), schedule.tau, fused=fused)
        feature_acts = self.hook_sae_acts_post(feature_acts)
        sae_out = self.decode(feature_acts)

        mse_loss = self.mse_loss_fn(sae_out, x).sum(dim=-1).mean()
        # The paper's loss is on unit-norm inputs; ours are d_in times larger in squared error.
        paper_scale = float(self.cfg.d_in)
        if schedule.hard:
            sparsity_loss = mse_loss.new_zeros(())
        else:
            overshoot = k_hat.mean() - schedule.target_k
            sparsity_loss = (
                paper_scale * self.cfg.sparsity_coefficient * F.softplus(overshoot, beta=self.cfg.sparsity_beta)
            )
        aux_loss = paper_scale * self._aux_loss(x, sae_out, hidden_pre, step_input.dead_neuron_mask)
        losses = {
            "mse_loss": mse_loss,
            "sparsity_loss": sparsity_loss,
            "auxiliary_reconstruction_loss": aux_loss,
        }
        k_hat = k_hat.detach().float()
        return TrainStepOutput(
            sae_in=x,
            sae_out=sae_out,
            feature_acts=hard_acts.detach(),
            hidden_pre=hidden_pre,
            loss=mse_loss + sparsity_loss + aux_loss,
            losses=losses,
            metrics={
                "k_hat_mean": k_hat.mean(),
                "k_hat_std": k_hat.std() if k_hat.numel() > 1 else torch.zeros(()),
                "k_hat_saturated_fraction": (k_hat >= self.cfg.k_max - 1).float().mean(),
                "tau": schedule.tau,
                "target_k": schedule.target_k,
                "hard_phase": int(schedule.hard),
            },
        )

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        return {
            "auxiliary_reconstruction_loss": self._aux_loss(
                step_input.sae_in, sae_out, hidden_pre, step_input.dead_neuron_mask
            )
        }

    def _aux_loss(
        self, sae_in: torch.Tensor, sae_out: torch.Tensor, hidden_pre: torch.Tensor, dead: torch.Tensor | None
    ) -> torch.Tensor:
        # AuxK (Gao et al.): the top-k_aux dead latents reconstruct the detached residual, as a
        # normalised MSE, scaled down while few latents are dead. "Dead" comes from SAE-Lens' counters,
        # which count the hard code, so a latent with only a negligible soft weight counts as dead.
        if self.cfg.aux_loss_coefficient == 0 or dead is None or (n_dead := int(dead.sum())) == 0:
            return sae_out.new_zeros(())
        k_aux = self.cfg.k_aux or self.cfg.d_in // 2
        scale = min(n_dead / k_aux, 1.0)
        aux_acts = calculate_topk_aux_acts(min(k_aux, n_dead), hidden_pre, dead)
        residual = (sae_in - sae_out).detach()
        recons = aux_acts @ self.W_dec
        nmse = (recons - residual).pow(2).sum(-1).mean() / (
            (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        )
        return self.cfg.aux_loss_coefficient * scale * nmse

    @torch.no_grad()
    def _initialise_b_dec(self, x: torch.Tensor) -> None:
        self.b_dec.data.copy_(geometric_median(x.reshape(-1, self.cfg.d_in)).to(self.b_dec.dtype))
        self.b_dec_initialised.fill_(True)

    @torch.no_grad()
    def _freeze_k_head(self) -> None:
        self.k_centre.copy_(self.b_dec)
        self.k_head_frozen.fill_(True)
        for p in self._k_head_params():
            p.requires_grad_(False)

    def _k_head_params(self) -> list[nn.Parameter]:
        return [self.W_k_in, self.b_k_in, self.w_k_out, self.b_k_out]

    @torch.no_grad()
    def remove_radial_decoder_grad(self) -> None:
        """Remove the component of W_dec's gradient along each row (rows stay on the unit sphere)."""
        if self.W_dec.grad is not None:
            # grad -= (grad . w) w / |w|^2 per row, in three passes over W_dec and no temporary of its size.
            along = torch.linalg.vecdot(self.W_dec.grad, self.W_dec) / self.W_dec.norm(dim=-1).clamp_min(1e-12).square()
            self.W_dec.grad.addcmul_(self.W_dec, along.unsqueeze(-1), value=-1)

    @torch.no_grad()
    def normalise_decoder_rows(self) -> None:
        """Rescale every decoder row to unit norm."""
        self.W_dec.data /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        # An inference checkpoint (fine-tuning from it) has no training flags: its b_dec is trained.
        state_dict.setdefault("b_dec_initialised", torch.ones((), dtype=torch.bool))
        state_dict.setdefault("k_head_frozen", torch.zeros((), dtype=torch.bool))
        _check_weights_to_load(self, state_dict)
        if bool(state_dict["k_head_frozen"]):
            for p in self._k_head_params():
                p.requires_grad_(False)

    @override
    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        # Until the hard phase freezes it, the k head reads the live b_dec: save that as its centre.
        if not bool(state_dict["k_head_frozen"]):
            state_dict["k_centre"] = state_dict["b_dec"].clone()
        check_finite(state_dict, "softsae: refusing to save this SAE")

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        self.process_state_dict_for_saving(state_dict)
        del state_dict["b_dec_initialised"], state_dict["k_head_frozen"]

    @override
    def fold_W_dec_norm(self) -> None:
        raise NotImplementedError(FOLD_W_DEC_NORM_REFUSAL)

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)
        _fold_norm_scaling_into_k_head(self, scaling_factor)

    @override
    @torch.no_grad()
    def fold_activation_whitening(
        self, mean: torch.Tensor, whitening_matrix: torch.Tensor, unwhitening_matrix: torch.Tensor
    ) -> None:
        super().fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)
        _fold_whitening_into_k_head(self, mean, whitening_matrix, unwhitening_matrix)
