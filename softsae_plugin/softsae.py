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

import math
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
from typing_extensions import override

from softsae_plugin.checks import check_finite, check_types
from softsae_plugin.collectives import gather_rows, sum_over_ranks
from softsae_plugin.lapsum import soft_topk
from softsae_plugin.sparsity_control import (
    calibrated_offset,
    constrained_k,
    constraint_shift,
    k_from_logit,
    rounded_k,
    shift_update,
)
from softsae_plugin.unit_decoder import keep_decoder_rows_unit

SUPPORTED_NORMALIZATIONS = ("none", "expected_average_only_in")
SPARSITY_CONTROLS = ("constraint", "softplus")
# Buffers that exist only while training (the inference model drops them).
TRAINING_BUFFERS = ("b_dec_initialised", "k_head_frozen")
# `sparse_decode=None` decodes from the kept codes when d_sae is at least this many times k_max.
SPARSE_DECODE_MIN_RATIO = 8
# Decoder rows whose norms agree to this relative tolerance share one norm (training keeps them equal to rounding).
SHARED_NORM_RTOL = 1e-4


def _check_inference_fields(cfg: SoftSAEConfig | SoftTrainingSAEConfig) -> None:
    # The sizes enter softsae's arithmetic; SAE-Lens' other fields (dtype, device, ...) are its to check.
    check_types(cfg, __name__, extra=("d_in", "d_sae"))
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
        sparse_decode: decode from the kept codes alone (gathering their decoder rows) instead of a dense product;
            None chooses by shape (d_sae >= 8 k_max), the same result to float rounding.
    """

    k: float = 32
    k_max: int | None = None
    k_head_hidden: int | None = None
    sparse_decode: bool | None = None

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
        sparsity_control: how the soft phase holds the batch mean of k_hat at the target: "constraint" (default)
            shifts the k head's logits so that every batch's mean k_hat equals the target exactly, differentiating
            through the shift, so the k head learns only how to share the features among inputs; "softplus" is the
            paper's one-sided budget (for reproducing the paper: it settles below the target).
        calibrate_hard_l0: in the hard phase, keep shifting the frozen k head's output bias so that the mean number
            of kept codes on training batches (rounding, clamping and the positive-code cap included) equals k.
            None (the default) means on for "constraint" and off for "softplus", which is the paper's method as
            published; set it to True to calibrate the paper's budget too. The saved config records the choice.
        sparsity_coefficient: lambda, the weight of the softplus budget term (sparsity_control="softplus").
        sparsity_beta: beta, the sharpness of the softplus budget term (sparsity_control="softplus").
        aux_loss_coefficient: the weight of the AuxK dead-latent loss (normalised MSE).
        k_aux: how many dead latents the AuxK loss uses; None means d_in // 2.
        detach_soft_topk_scores: pass a detached copy of the codes to soft top-k, so gradient reaches
            the codes only through the product a * p (and k_hat through dL/dk). Measured to train
            better: without it, near-ties at the threshold produce 1/(2 tau) gradient spikes.
        sparse_decode: decode hard codes (the hard phase; inference) from the kept codes alone; None chooses by
            shape (d_sae >= 8 k_max).
        fuse_soft_topk: run soft top-k's passes over the codes as torch.compile'd loops (same results to
            float rounding, several times faster; compiling takes seconds to a minute once per process);
            None turns it on when the run is long enough to repay that (see FUSE_MIN_SCORES).
        total_training_steps: the run's length; every schedule is a function of (step, this). Set by
            `sae-lens train` and `train_on_activations`; set it yourself in a custom loop.
    """

    k: float = 32
    k_max: int | None = None
    k_head_hidden: int | None = None
    sparse_decode: bool | None = None
    tau: float = 0.005
    tau_start: float | None = 0.05
    tau_anneal_steps: int | None = None
    k_start: float | None = None
    k_anneal_steps: int | None = None
    hard_topk_steps: int | None = None
    sparsity_control: str = "constraint"
    calibrate_hard_l0: bool | None = None
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
        if self.calibrate_hard_l0 is None:
            self.calibrate_hard_l0 = self.sparsity_control == "constraint"
        checks = {
            "tau": (self.tau, self.tau > 0, "> 0"),
            "tau_start": (self.tau_start, self.tau_start is None or self.tau_start > 0, "> 0 or None"),
            "sparsity_beta": (self.sparsity_beta, self.sparsity_beta > 0, "> 0"),
            "sparsity_control": (
                self.sparsity_control,
                self.sparsity_control in SPARSITY_CONTROLS,
                f"one of {SPARSITY_CONTROLS}",
            ),
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
                "softsae: total_training_steps is not set, and every schedule (tau, target k, the hard phase) is a "
                "function of it. `sae-lens train` and `softsae_plugin.train_on_activations` set it; with SAE-Lens' "
                "runner in Python, set it from the runner's config before running: "
                "`cfg.sae.total_training_steps = cfg.total_training_steps`"
            )
        tau_steps = self.tau_anneal_steps if self.tau_anneal_steps is not None else round(0.02 * total)
        k_steps = self.k_anneal_steps if self.k_anneal_steps is not None else round(0.01 * total)
        hard_steps = self.hard_topk_steps if self.hard_topk_steps is not None else round(0.1 * total)
        tau_start = self.tau if self.tau_start is None else self.tau_start
        k_start = self.k_max if self.k_start is None else self.k_start
        return Schedule(
            tau=_linear(tau_start, self.tau, step, tau_steps),
            target_k=_linear(k_start, self.k, step, k_steps),
            hard_step=step - (total - hard_steps) if step >= total - hard_steps else None,
        )


@dataclass(frozen=True)
class Schedule:
    """The schedule values in force at one training step."""

    tau: float
    target_k: float
    hard_step: int | None  # steps since the hard phase began, None before it

    @property
    def hard(self) -> bool:
        """Whether this step is in the hard phase."""
        return self.hard_step is not None


def _linear(start: float, end: float, step: int, steps: int) -> float:
    if steps <= 0 or step >= steps:
        return float(end)
    return float(start + (end - start) * step / steps)


def hard_topk_per_row(acts: torch.Tensor, k: torch.Tensor, k_bound: int | None = None) -> torch.Tensor:
    """Keep the k[row] largest entries of each row of `acts` (..., d_sae) and zero the rest.

    `k` holds integer counts of shape acts.shape[:-1]. Entries are kept unscaled, so gradient flows
    to the kept entries; with ReLU codes a row keeps fewer than k non-zeros only when it has fewer
    positive entries. `k_bound`: a bound on every k known to the caller (the SAE's k_max), which saves reading
    max(k) from the device (a sync); None reads it.
    """
    if k_bound is None:
        k_bound = int(k.max().item()) if k.numel() else 0
    k_batch = min(k_bound, acts.shape[-1])
    values, indices = acts.topk(k_batch, dim=-1, sorted=True)
    rank = torch.arange(k_batch, device=acts.device)
    values = values * (rank < k.unsqueeze(-1)).to(values.dtype)
    return torch.zeros_like(acts).scatter(-1, indices, values)


# Where the SAE's top-k selections use k_max as a static bound (see `static_bound`); eval/bench_dispatch.py turns it on
# to count on CPU what an accelerator launches.
STATIC_BOUNDS_ON_CPU = False


def static_bound(x: torch.Tensor, k_max: int) -> int | None:
    """k_max as the bound of the top-k selections over `x` where reading the batch's largest k would stall a device
    (an accelerator, or a graph being compiled), else None (read it: on CPU the read costs nothing and the smaller
    selection is faster)."""
    if x.device.type != "cpu" or STATIC_BOUNDS_ON_CPU or torch.compiler.is_compiling():
        return k_max
    return None


def decode_kept_codes(
    codes: torch.Tensor, W_dec: torch.Tensor, k_max: int, *, check: bool = True
) -> torch.Tensor | None:
    """codes @ W_dec from the (at most k_max) non-zero codes of each row alone, or None when a row has more.

    The k_max largest codes by magnitude are gathered and their decoder rows summed with `embedding_bag`, whose
    backward touches only those rows: B * k_max * d_in work instead of the dense product's B * d_sae * d_in. Equal
    to the dense product to float rounding (another summation order), gradients included. `check=False` skips
    counting the non-zeros (a device sync) for codes known to have at most k_max per row.
    """
    rows = codes.reshape(-1, codes.shape[-1])
    if check and bool(((rows != 0).sum(-1) > k_max).any()):
        return None
    indices = rows.detach().abs().topk(min(k_max, rows.shape[-1]), dim=-1).indices
    values = rows.gather(-1, indices).to(W_dec.dtype)
    decoded = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")
    return decoded.reshape(*codes.shape[:-1], W_dec.shape[-1])


def _decodes_sparsely(cfg: SoftSAEConfig | SoftTrainingSAEConfig) -> bool:
    # Measured on CPU (eval/README.md): gathering k_max rows beats the dense product by 3-18x at d_sae / k_max of
    # 36-256; below SPARSE_DECODE_MIN_RATIO the dense product's efficiency wins.
    if cfg.sparse_decode is not None:
        return cfg.sparse_decode
    return cfg.d_sae >= SPARSE_DECODE_MIN_RATIO * (cfg.k_max or 0)


def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """The geometric median of the rows of `points` by Weiszfeld's iteration (float64 inside), stopped at the first
    step that moves it by at most `tol` relative (or after `max_iter`)."""
    x = points.detach().double()
    median = x.mean(0)
    done = torch.zeros((), dtype=torch.bool, device=x.device)
    # Converged iterations keep the median where it stopped instead of breaking out, which would read the device.
    for _ in range(max_iter):
        weights = 1.0 / (x - median).norm(dim=-1).clamp_min(1e-12)
        updated = torch.where(done, median, (weights[:, None] * x).sum(0) / weights.sum())
        done = done | ((updated - median).norm() <= tol * median.norm().clamp_min(1.0))
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


def _check_codes(sae: SoftSAE | SoftTrainingSAE, feature_acts: torch.Tensor) -> None:
    if feature_acts.shape[-1] != sae.cfg.d_sae:
        raise ValueError(
            f"softsae decode: expected codes of shape (..., d_sae={sae.cfg.d_sae}), got {tuple(feature_acts.shape)}"
        )


# Fusing soft top-k (soft_topk(fused=True)) compiles once per process, about 80 s cold on 2 CPU cores (seconds with
# the compiler's cache warm), and saves 5-20 ns per score per step there (eval/README.md): it pays back from 2^32 to
# 2^34 scores over the whole run. The paper's runs (2^40 and more) are far above that; the quickstart (2^30) below.
FUSE_MIN_SCORES = 2**34


def _fuse_soft_topk(cfg: SoftTrainingSAEConfig, scores: torch.Tensor) -> bool:
    if cfg.fuse_soft_topk is not None:
        return cfg.fuse_soft_topk
    return (cfg.total_training_steps or 0) * scores.numel() >= FUSE_MIN_SCORES


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


def shared_row_norm(W_dec: torch.Tensor, rtol: float = SHARED_NORM_RTOL) -> float | None:
    """The norm every row of `W_dec` has (to `rtol`), or None when the rows' norms differ."""
    norms = W_dec.detach().norm(dim=-1)
    low, high = float(norms.min()), float(norms.max())
    return (low + high) / 2 if high - low <= rtol * high else None


class _SoftSAEBase:
    """What the inference and the training SoftSAE share: the k head, the encoding, the decoding and the folds.

    A mixin placed before SAE-Lens' base class, so that its methods override SAE-Lens' and call them with super().
    """

    cfg: SoftSAEConfig | SoftTrainingSAEConfig
    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter
    W_k_in: nn.Parameter
    b_k_in: nn.Parameter
    w_k_out: nn.Parameter
    b_k_out: nn.Parameter
    k_centre: torch.Tensor

    def k_head_centre(self) -> torch.Tensor:
        """What the k head subtracts from its (processed) input."""
        return self.k_centre

    def sae_input(self, x: torch.Tensor) -> torch.Tensor:
        """SAE-Lens' processed input (hooks, head reshaping, minus b_dec): what the encoder and the k head read."""
        if self.cfg.reshape_activations == "none":
            _check_last_dim(self, x, "")
        sae_in = self.process_sae_in(x)  # type: ignore[attr-defined]
        _check_last_dim(self, sae_in, " after reshaping its heads")
        return sae_in

    def k_logit(self, sae_in: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The k head's logit per input, from the processed input `sae_in` (see `sae_input`)."""
        # sae_in is the processed input minus b_dec (if applied); the k head reads it minus its own centre instead.
        # (In training the centre is b_dec itself, and the difference is exactly 0.)
        offset = self.b_dec * self.cfg.apply_b_dec_to_input - self.k_head_centre()
        hidden = F.relu((sae_in + offset) @ self.W_k_in + self.b_k_in)
        product = hidden @ self.w_k_out
        if product.dtype != self.w_k_out.dtype:  # autocast: redo it in the weights' precision (a cheap matrix-vector
            with torch.autocast(sae_in.device.type, enabled=False):  # product); bfloat16 k_hat steps by k_max/256
                product = hidden.to(self.w_k_out.dtype) @ self.w_k_out
        return product + (self.b_k_out if bias is None else bias)

    def k_from_logit(self, logit: torch.Tensor) -> torch.Tensor:
        """k_hat from the k head's logit: k_max * sigmoid(logit), clamped to [1, d_sae]."""
        return k_from_logit(logit, self.cfg.k_max, self.cfg.d_sae)

    def predict_k(self, x: torch.Tensor) -> torch.Tensor:
        """The continuous number of active features k_hat for each input, of shape x.shape[:-1]."""
        return self.k_from_logit(self.k_logit(self.sae_input(x)))

    def encode_hard(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inference codes (the round(k_hat) largest ReLU codes of each input, unscaled) and the pre-activations."""
        sae_in = self.sae_input(x)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)  # type: ignore[attr-defined]
        k = rounded_k(self.k_from_logit(self.k_logit(sae_in)), self.cfg.k_max).long()
        acts = F.relu(hidden_pre)
        codes = self.hook_sae_acts_post(hard_topk_per_row(acts, k, static_bound(acts, self.cfg.k_max)))  # type: ignore[attr-defined]
        # decode may skip counting these codes' non-zeros (a sync) while they are unchanged (their version counter).
        # Tensors made under torch.inference_mode() (SAEBench's evals) have no version counter: decode counts those.
        if codes.is_inference():
            _LAST_CODES.pop(self, None)
        else:
            _LAST_CODES[self] = (weakref.ref(codes), codes._version)
        return codes, hidden_pre

    def _encoded_here(self, codes: torch.Tensor) -> bool:
        """Whether `codes` is the tensor this SAE's last encode returned, unmodified since (at most k_max per row)."""
        last = _LAST_CODES.get(self)
        return last is not None and last[0]() is codes and codes._version == last[1]

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Reconstruct inputs from codes of shape (..., d_sae).

        Codes with at most k_max non-zeros per input (what `encode` gives) are decoded from the kept codes alone when
        the dictionary is wide enough for that to pay (see `sparse_decode`); any other codes densely.
        """
        _check_codes(self, feature_acts)  # type: ignore[arg-type]
        sparse = _decodes_sparsely(self.cfg)
        return self._decode(feature_acts, sparse=sparse, check=not (sparse and self._encoded_here(feature_acts)))

    def _decode(self, feature_acts: torch.Tensor, *, sparse: bool, check: bool = True) -> torch.Tensor:
        decoded = decode_kept_codes(feature_acts, self.W_dec, self.cfg.k_max, check=check) if sparse else None
        if decoded is None:
            decoded = feature_acts @ self.W_dec
        sae_out = self.hook_sae_recons(decoded + self.b_dec)  # type: ignore[attr-defined]
        return self.reshape_fn_out(self.run_time_activation_norm_fn_out(sae_out), self.d_head)  # type: ignore[attr-defined]

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Fold the decoder rows' norm into the encoder (SAE-Lens' fold), allowed when every row has the same norm.

        One shared norm scales every code by one factor, which changes no input's top-k, no k_hat and no
        reconstruction; rows of different norms would reorder the codes, so that is refused.
        """
        if shared_row_norm(self.W_dec) is None:
            norms = self.W_dec.norm(dim=-1)
            raise NotImplementedError(
                "softsae: fold_W_dec_norm needs decoder rows of one shared norm (they range from "
                f"{float(norms.min()):.6g} to {float(norms.max()):.6g}): folding different norms would rescale the "
                "codes unequally and change which features are in each input's top-k"
            )
        super().fold_W_dec_norm()  # type: ignore[misc]

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Fold the input scaling into the weights (k head included), then the rows' shared norm 1/s into the encoder:
        the SAE takes raw activations and keeps unit-norm decoder rows, as SAEBench expects."""
        super().fold_activation_norm_scaling_factor(scaling_factor)  # type: ignore[misc]
        _fold_norm_scaling_into_k_head(self, scaling_factor)  # type: ignore[arg-type]
        if shared_row_norm(self.W_dec) is not None:
            self.fold_W_dec_norm()

    @torch.no_grad()
    def fold_activation_whitening(
        self, mean: torch.Tensor, whitening_matrix: torch.Tensor, unwhitening_matrix: torch.Tensor
    ) -> None:
        """Fold an affine whitening of the inputs into the weights, the k head's included."""
        super().fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)  # type: ignore[misc]
        _fold_whitening_into_k_head(self, mean, whitening_matrix, unwhitening_matrix)  # type: ignore[arg-type]


# Each SAE's last encoded codes, outside the module so that it still pickles and copies as before.
_LAST_CODES: weakref.WeakKeyDictionary[Any, tuple[weakref.ref[torch.Tensor], int]] = weakref.WeakKeyDictionary()


def _check_last_dim(sae: Any, x: torch.Tensor, after: str) -> None:
    if x.shape[-1] != sae.cfg.d_in:
        raise ValueError(f"softsae: expected input of shape (..., d_in={sae.cfg.d_in}){after}, got {tuple(x.shape)}")


def _unit_rows_on_load(state_dict: dict[str, Any]) -> None:
    # Folders saved before unit rows were folded in at save time hold rows of one norm 1/s: fold it the same way.
    norm = shared_row_norm(state_dict["W_dec"])
    if norm is not None and abs(norm - 1) > SHARED_NORM_RTOL:
        state_dict["W_dec"] = state_dict["W_dec"] / norm
        state_dict["W_enc"] = state_dict["W_enc"] * norm
        state_dict["b_enc"] = state_dict["b_enc"] * norm


class SoftSAE(_SoftSAEBase, SAE[SoftSAEConfig]):
    """Inference SoftSAE: exact top-round(k_hat) per input, k_hat from the dynamic-sparsity head.

    `encode` keeps the round(k_hat) largest ReLU codes of each input (clamped to [1, k_max]) and zeroes
    the rest, without reweighting; `predict_k` gives the continuous k_hat. Decoder rows have unit norm.
    """

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        _init_soft_weights(self)

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of shape (..., d_sae) with round(k_hat) non-zeros per input (fewer only if fewer are positive)."""
        return self.encode_hard(x)[0]

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        training_only = sorted(set(TRAINING_BUFFERS) & set(state_dict))
        if training_only:
            raise ValueError(
                f"softsae: these weights are a training checkpoint (they hold the training-only buffers "
                f"{training_only}), in the trainer's scaled units: load them with TrainingSAE.load_from_disk to "
                "continue training, or load the inference SAE a finished run saved (its output_path)"
            )
        _check_weights_to_load(self, state_dict)
        _unit_rows_on_load(state_dict)

    @override
    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        check_finite(state_dict, "softsae: refusing to save this SAE")


def _read_training_flags(sae: SoftTrainingSAE, _: Any) -> None:
    # After loading a state dict: the Python mirrors of the training flags follow the loaded buffers (one read, at
    # load time).
    sae._b_dec_initialised = bool(sae.b_dec_initialised)
    sae._k_head_frozen = bool(sae.k_head_frozen)


class SoftTrainingSAE(_SoftSAEBase, TrainingSAE[SoftTrainingSAEConfig]):
    """Training SoftSAE: LapSum soft top-k with a learned k_hat, then a hard top-k final phase.

    Soft phase: f = a * soft_topk(a, k_hat, tau) with gradient into k_hat, the batch mean of k_hat held at the
    target (see `sparsity_control`). Hard phase (the last `hard_topk_steps`): f = top-round(k_hat) of a with the k
    head and the centring it reads frozen (its output bias calibrated so that L0 = k), while encoder and decoder
    keep learning. The codes SAE-Lens' trainer counts as firing (dead latents, L0, sparsity file) are the hard
    codes in both phases.
    """

    b_dec_initialised: torch.Tensor
    k_head_frozen: torch.Tensor

    def __init__(self, cfg: SoftTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self._constraint_multiplier = torch.tensor(float("nan"))
        # The training flags as Python state, mirroring their buffers (which are what is saved): reading a buffer
        # every step would wait for the device. Set from the buffers whenever a state dict is loaded.
        self._b_dec_initialised = self._k_head_frozen = False
        self.register_load_state_dict_post_hook(_read_training_flags)
        keep_decoder_rows_unit(self)

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        _init_soft_weights(self)
        for name in TRAINING_BUFFERS:
            self.register_buffer(name, torch.zeros((), dtype=torch.bool, device=self.device))

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {}

    @override
    def k_head_centre(self) -> torch.Tensor:
        """What the k head subtracts from its input: b_dec while it trains, its snapshot once frozen."""
        return self.k_centre if self._k_head_frozen else self.b_dec

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inference encoding (hard top-round(k_hat)) and the pre-activations."""
        return self.encode_hard(x)

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """One training step's forward pass and losses, following the schedule at this step.

        Training state (b_dec's initialisation, the hard phase's freeze, the k head's running shift) moves only in
        training mode with gradients enabled: a call under torch.no_grad() (a validation loss) changes no parameter
        or buffer, and returns what the step would have computed.
        """
        schedule = self.cfg.schedule(step_input.n_training_steps)
        x = step_input.sae_in
        updating = self.training and torch.is_grad_enabled()
        if updating and not self._b_dec_initialised:
            self._initialise_b_dec(x)
        if updating and schedule.hard and not self._k_head_frozen:
            self._freeze_k_head()

        sae_in = self.sae_input(x)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        acts = F.relu(hidden_pre)
        if schedule.hard:
            with torch.no_grad():
                logit = self.k_logit(sae_in)
                if self.cfg.calibrate_hard_l0:
                    n_positive = (acts > 0).sum(-1)
                    offset = calibrated_offset(logit, n_positive, self.cfg.k, self.cfg.k_max, self.cfg.d_sae)
                    shift = shift_update(offset, schedule.hard_step)
                    self._move_running_shift(shift, updating)
                    logit = logit + shift
                k_hat = self.k_from_logit(logit)
        elif self.cfg.sparsity_control == "softplus":
            k_hat = self.k_from_logit(self.k_logit(sae_in))
        else:
            # The constraint's shift makes any common offset of the logits irrelevant, so the output bias is not
            # trained: it keeps the running shift, which is what the inference model and the hard phase use.
            logit = self.k_logit(sae_in, bias=self.b_k_out.detach())
            shift = constraint_shift(logit, schedule.target_k, self.cfg.k_max, self.cfg.d_sae)
            self._move_running_shift(shift_update(shift, None), updating)
            k_hat = constrained_k(
                logit, schedule.target_k, self.cfg.k_max, self.cfg.d_sae, self._record_multiplier, shift=shift
            )
        bound = static_bound(acts, self.cfg.k_max)
        hard_acts = hard_topk_per_row(acts, rounded_k(k_hat, self.cfg.k_max).long(), bound)
        if schedule.hard:
            feature_acts = hard_acts
        else:
            scores = acts.detach() if self.cfg.detach_soft_topk_scores else acts
            fused = _fuse_soft_topk(self.cfg, scores)
            # On a device, k_max bounds k_hat: a static size for soft top-k's candidates (no sync), the same solve.
            feature_acts = acts * soft_topk(scores, k_hat.to(torch.float32), schedule.tau, fused=fused, k_bound=bound)
        feature_acts = self.hook_sae_acts_post(feature_acts)
        # Hard codes keep at most k_max per row: the sparse decode need not count them.
        sae_out = self._decode(feature_acts, sparse=schedule.hard and _decodes_sparsely(self.cfg), check=False)

        mse_loss = self.mse_loss_fn(sae_out, x).sum(dim=-1).mean()
        gap = gather_rows(k_hat).mean() - schedule.target_k  # the global batch's, under data-parallel training
        if not schedule.hard and self.cfg.sparsity_control == "softplus":
            # The paper's loss is on unit-norm inputs; ours are d_in times larger in squared error.
            sparsity_loss = self.cfg.d_in * self.cfg.sparsity_coefficient * F.softplus(gap, beta=self.cfg.sparsity_beta)
            # The budget's gradient on mean(k_hat), in the same units as the constraint's multiplier.
            self._constraint_multiplier = self.cfg.sparsity_coefficient * torch.sigmoid(self.cfg.sparsity_beta * gap)
        else:
            sparsity_loss = mse_loss.new_zeros(())
        losses = {
            "mse_loss": mse_loss,
            "sparsity_loss": sparsity_loss,
            **self.calculate_aux_loss(step_input, feature_acts, hidden_pre, sae_out),
        }
        k_hat = k_hat.detach().float()
        return TrainStepOutput(
            sae_in=x,
            sae_out=sae_out,
            feature_acts=hard_acts.detach(),
            hidden_pre=hidden_pre,
            loss=sum(losses.values()),  # type: ignore[arg-type]
            losses=losses,
            metrics={
                "k_hat_mean": k_hat.mean(),
                "k_hat_std": k_hat.std() if k_hat.numel() > 1 else torch.zeros(()),
                "k_hat_minus_target": gap.detach(),
                "k_hat_saturated_fraction": (k_hat >= self.cfg.k_max - 1).float().mean(),
                # Only computed when SAE-Lens logs it (it unwraps callables).
                "hard_l0": lambda: (hard_acts != 0).sum(-1).float().mean(),
                # Read after the backward pass, which measures the constraint's.
                "sparsity_multiplier": lambda: self._constraint_multiplier,
                "tau": schedule.tau,
                "target_k": schedule.target_k,
                "hard_phase": int(schedule.hard),
            },
        )

    @torch.no_grad()
    def _move_running_shift(self, shift: torch.Tensor, updating: bool) -> None:
        # The controller's state, moved here in plain sight (never from inside an autograd function), and only by a
        # training step with gradients.
        if updating:
            self.b_k_out.add_(shift.to(self.b_k_out.dtype))

    def _record_multiplier(self, *, multiplier: torch.Tensor | None = None, **_: Any) -> None:
        if multiplier is not None:  # in the paper's units, like the softplus budget's lambda
            self._constraint_multiplier = multiplier.detach() / self.cfg.d_in

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The AuxK dead-latent loss (Gao et al.): the top-k_aux dead latents reconstruct the detached residual, as a
        normalised MSE scaled down while few latents are dead, times d_in (the paper's units, see the module)."""
        # "Dead" comes from SAE-Lens' counters, which count the hard code, so a latent with only a negligible soft
        # weight counts as dead.
        dead = step_input.dead_neuron_mask
        if self.cfg.aux_loss_coefficient == 0 or dead is None:
            return {"auxiliary_reconstruction_loss": sae_out.new_zeros(())}
        k_aux = self.cfg.k_aux or self.cfg.d_in // 2
        if torch.compiler.is_compiling():
            # A compiled graph cannot branch on the number of dead latents (a read from the device): it always takes
            # the top k_aux pre-activations among the dead ones, zeroes the picks beyond them, and scales the loss by
            # min(dead / k_aux, 1), so that no dead latent gives exactly 0, as below.
            n_dead = dead.sum()
            scale: torch.Tensor | float = (n_dead / k_aux).clamp(max=1.0)
            top = torch.where(dead, hidden_pre, -torch.inf).topk(min(k_aux, self.cfg.d_sae), dim=-1, sorted=False)
            picked = torch.where(top.values > -torch.inf, top.values, 0.0)
            aux_acts = torch.zeros_like(hidden_pre).scatter(-1, top.indices, picked)
        else:
            # Eager: with no dead latent (most steps) the loss is skipped, which is worth this step's one read.
            n_dead = int(dead.sum())
            if n_dead == 0:
                return {"auxiliary_reconstruction_loss": sae_out.new_zeros(())}
            scale = min(n_dead / k_aux, 1.0)
            aux_acts = calculate_topk_aux_acts(k_aux=min(k_aux, n_dead), hidden_pre=hidden_pre, dead_neuron_mask=dead)
        residual = (step_input.sae_in - sae_out).detach().reshape(-1, self.cfg.d_in)
        recons = aux_acts.reshape(-1, self.cfg.d_sae) @ self.W_dec
        # The residual's variance over the global batch under data-parallel training (one process: this batch's).
        rows = sum_over_ranks(residual.new_full((), float(residual.shape[0])))
        centred = residual - sum_over_ranks(residual.sum(0)) / rows
        variance = sum_over_ranks(centred.pow(2).sum()) / rows
        nmse = (recons - residual).pow(2).sum(-1).mean() / variance.clamp_min(1e-12)
        return {"auxiliary_reconstruction_loss": self.cfg.d_in * self.cfg.aux_loss_coefficient * scale * nmse}

    @torch.no_grad()
    def _initialise_b_dec(self, x: torch.Tensor) -> None:
        first_batch = gather_rows(x.reshape(-1, self.cfg.d_in))  # the global batch, under data-parallel training
        self.b_dec.data.copy_(geometric_median(first_batch).to(self.b_dec.dtype))
        self.b_dec_initialised.fill_(True)
        self._b_dec_initialised = True

    @torch.no_grad()
    def _freeze_k_head(self) -> None:
        self.k_centre.copy_(self.b_dec)
        self.k_head_frozen.fill_(True)
        self._k_head_frozen = True
        for p in self._k_head_params():
            p.requires_grad_(False)

    def _k_head_params(self) -> list[nn.Parameter]:
        return [self.W_k_in, self.b_k_in, self.w_k_out, self.b_k_out]

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        # An inference checkpoint (fine-tuning from it) has no training flags: its b_dec is trained.
        state_dict.setdefault("b_dec_initialised", torch.ones((), dtype=torch.bool))
        state_dict.setdefault("k_head_frozen", torch.zeros((), dtype=torch.bool))
        # SAE-Lens' disk loader casts every tensor to the config's dtype; these flags are booleans.
        for name in TRAINING_BUFFERS:
            state_dict[name] = state_dict[name].bool()
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
        for name in TRAINING_BUFFERS:
            del state_dict[name]
