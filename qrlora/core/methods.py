"""The method registry: ``--lora_init_method`` name -> how to initialise, what trains, ``dW``, file keys.

Every method is "frozen basis + trainable coefficients" around a frozen base Linear ``W`` (out x in), except
``moe`` (token-dependent, cannot be folded into ``W``) and ``lora`` (the baseline, no basis). Methods know
nothing about backbones or files on disk; they see one weight and a named set of tensors. Tensor names are
the middle of the file keys of docs/ARCHITECTURE.md section 2 (``q`` -> ``P.lora.q.weight``).
"""
from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass, replace
from typing import Mapping

import torch

from . import decompose
from ..errors import UserError

Tensors = Mapping[str, torch.Tensor]
BASES = ("top", "random", "gaussian")  # every frozen-basis kind a method may draw (Method.bases: which ones)
# Where the AdapterConfig being built comes from: None for flags (errors name the flag), else a file (errors name it).
_CONFIG_SOURCE: contextvars.ContextVar[str | None] = contextvars.ContextVar("adapter_config_source", default=None)


@dataclass(frozen=True)
class AdapterConfig:
    """Hyper-parameters of one adapter; stored in every adapter file's metadata."""

    method: str = "deltaR"
    rank: int = 4
    alpha: float | None = None  # None -> alpha = rank (scale 1), as published
    use_zero_init: bool = True
    delta_scale: float = 0.01  # std of the coefficients when use_zero_init is off (published default)
    num_experts: int = 8  # moe only
    seed: int = 0  # seeds ica, moe gates, lora A and non-zero coefficient init, per layer
    # The frozen basis (methods with ``Method.bases``; the disentanglement study's controls and Orthogonal
    # Adaptation): "top" = the paper's top-r singular directions of W; "random" = a seeded random orthonormal basis
    # (basis_seed; for deltaR/svd R = Q^T W / s so that W - s Q R stays the residual); "gaussian" = independent
    # N(0, 1/in) directions. basis_offset k uses directions k+1..k+r (singular ones, or columns of the seeded draw).
    # None = the method's own default (Method.bases[0]; "top" for methods without a basis to choose).
    basis: str | None = None
    basis_offset: int = 0
    basis_seed: int = 0

    @classmethod
    def from_file(cls, source, **fields) -> "AdapterConfig":
        """The config a file describes: the same rules as for flags, but an error names ``source`` (the file) and
        the field, not the flag a user never passed."""
        token = _CONFIG_SOURCE.set(str(source))
        try:
            return cls(**fields)
        finally:
            _CONFIG_SOURCE.reset(token)

    @staticmethod
    def _named(flag: str, field_name: str) -> str:
        source = _CONFIG_SOURCE.get()
        return f"{source}: {field_name}" if source else flag

    def __post_init__(self):
        """Validate as PEFT's ``LoraConfig`` does: a config that exists is one the methods can use. The one place
        the rank, alpha, expert and basis rules live (flags and files alike)."""
        method = get_method(self.method)
        n = self._named
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise UserError(f"{n('--rank', 'rank')} must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise UserError(f"{n('--lora_alpha', 'alpha')} must be a positive number, got {self.alpha!r}")
        if method.uses_experts:
            if self.num_experts < 1 or self.rank % self.num_experts:
                raise UserError(f"{n('--rank', 'rank')} {self.rank} must be a multiple of "
                                f"{n('--moe_num_experts', 'num_experts')} {self.num_experts} "
                                f"(each expert owns rank / experts directions)")
        if not (math.isfinite(self.delta_scale) and self.delta_scale >= 0):
            raise UserError(f"{n('--delta_scale', 'delta_scale')} must be a non-negative number, got {self.delta_scale!r}")
        if self.basis is None:  # frozen dataclass: the one place a field is filled in after construction
            object.__setattr__(self, "basis", method.bases[0] if method.bases else "top")
        if self.basis not in BASES:
            raise UserError(f"{n('--qr_basis', 'basis')} must be one of {', '.join(BASES)}, got {self.basis!r}")
        if isinstance(self.basis_offset, bool) or not isinstance(self.basis_offset, int) or self.basis_offset < 0:
            raise UserError(f"{n('--qr_basis_offset', 'basis_offset')} must be a non-negative integer, got {self.basis_offset!r}")
        if not method.chooses_basis and (self.basis != "top" or self.basis_offset):
            raise UserError(f"{n('--qr_basis / --qr_basis_offset', 'basis')}: {self.method} has no frozen basis to choose "
                            f"(methods that have one: {', '.join(m.name for m in METHODS.values() if m.chooses_basis)})")
        if method.chooses_basis and self.basis not in method.bases:
            raise UserError(f"{n('--qr_basis', 'basis')} {self.basis}: {self.method} draws its frozen basis as "
                            f"{' or '.join(method.bases)}")

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        """``s = alpha / r``."""
        return self.lora_alpha / self.rank

    def with_(self, **changes) -> "AdapterConfig":
        return replace(self, **changes)


def _file_key(name: str) -> str:
    """Key suffix after the module path ``P`` (docs/ARCHITECTURE.md section 2)."""
    special = {"gate_weight": "gate.weight", "gate_bias": "gate.bias", "lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
    return special.get(name, f"lora.{name}.weight")


FILE_KEY_TO_NAME = {
    _file_key(n): n for n in ("q", "base_r", "delta_r", "q0", "r0", "gate_weight", "gate_bias", "lora_A", "lora_B")
}


class Method:
    """Base class of a registry entry. Subclasses fill in the tensor names and the math."""

    name: str = ""
    static: bool = True  # dW independent of the input, so it folds into W
    # The learning-rate multiplier the experiments give this method so that its dW moves at the others' pace (the
    # world experiment and study, the learning tests). The trainer itself applies the --learning_rate it is given.
    lr_factor: float = 1.0
    uses_experts: bool = False  # the rank is split across --moe_num_experts experts with a gate
    trainable: tuple[str, ...] = ()
    basis: tuple[str, ...] = ()  # frozen tensors adapters must share to merge in residual form
    # The tensors' names in the paper's notation, in the order reports show them (file keys keep the published
    # q / base_r / delta_r layout): what plots and reports call them.
    math_names: Mapping[str, str] = {}
    display_name: str = ""  # how reports label an adapter of this method
    family: str = "QR-LoRA"  # the published family it belongs to (the study groups and colours its rows by it)
    # Which side of dW = (output basis) x (input basis) stays frozen: "output" (QR-LoRA's Q), "input" (Orthogonal
    # Adaptation's B, ICA's mixing), or "neither" (LoRA, qr: both sides learned). The study's frozen-side table reads it.
    frozen_side: str = "output"
    bases: tuple[str, ...] = ()  # the AdapterConfig.basis kinds it can draw its frozen basis as, its default first

    @property
    def chooses_basis(self) -> bool:
        """AdapterConfig.basis / basis_offset / basis_seed pick its frozen basis."""
        return bool(self.bases)

    # ---- initialisation -------------------------------------------------------------------------------
    def initialize(self, weight: torch.Tensor, cfg: AdapterConfig, layer_name: str) -> dict[str, torch.Tensor]:
        """All tensors of one layer's adapter (float32, on ``weight``'s device) from the base weight."""
        raise NotImplementedError

    def _coefficients(self, shape, cfg: AdapterConfig, layer_name: str, device) -> torch.Tensor:
        """Zero coefficients (identity at init), or ``N(0, delta_scale^2)`` as published when zero-init is off."""
        if cfg.use_zero_init:
            return torch.zeros(shape, dtype=torch.float32, device=device)
        gen = torch.Generator(device="cpu").manual_seed(decompose.layer_seed(cfg.seed + 1, layer_name))
        return (torch.randn(shape, generator=gen) * cfg.delta_scale).to(device)

    # ---- math -----------------------------------------------------------------------------------------
    def path_tensors(self, t: Tensors) -> Tensors:
        """The tensors ``output`` reads, formed from the stored float32 ones before they are cast to the input's
        dtype (bf16 under autocast): a method whose path is a small difference of large products forms the
        difference here, in float32. Default: the stored tensors."""
        return t

    def output(self, t: Tensors, x: torch.Tensor, scale: float) -> torch.Tensor:
        """The adapter path for input ``x`` (..., in) -> (..., out); added to ``base(x)``."""
        raise NotImplementedError

    def lora_factors(self, t: Tensors, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` with ``B A = dW``: B (out x k), A (k x in). Static methods only."""
        raise ValueError(f"method '{self.name}' is token-dependent and has no weight-space form")

    def require_weight_change(self, who: str, needs: str, way_out: str = "merge it live with --merge_strategy direct") -> None:
        """The one refusal of a token-dependent method where a weight change is needed: ``who`` (a file or a flag)
        is at fault, ``needs`` says what needs ``dW`` ("K-LoRA compares weight changes"), ``way_out`` what to do.

        Raises:
            UserError: this method is not static (``moe``: its change depends on the token, no ``dW`` exists).
        """
        if not self.static:
            raise UserError(f"{who}: {needs}; a {self.name} adapter is token-dependent and has no weight change "
                            f"({way_out})")

    def delta_weight(self, t: Tensors, scale: float) -> torch.Tensor:
        """``dW`` (out x in), from the adapter tensors alone (no base model needed)."""
        B, A = self.lora_factors(t, scale)
        return B @ A

    def basis_product(self, t: Tensors) -> torch.Tensor:
        """The frozen product whose ``s``-multiple the residual removes: ``W_res = W - s * basis_product``."""
        raise NotImplementedError

    def grad_mask(self, name: str, t: Tensors) -> torch.Tensor | None:
        """A 0/1 mask that structurally constrains a trainable tensor, or None."""
        return None

    def shapes(self, out_features: int, in_features: int, cfg: AdapterConfig) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor for a layer of weight shape (out, in): what a file must hold to fit."""
        raise NotImplementedError

    def export_rank(self, cfg: AdapterConfig) -> int:
        """Rank of the standard LoRA this method exports to (the width of ``lora_factors``)."""
        return cfg.rank

    def trains_r_by_in(self, cfg: AdapterConfig, out_features: int = 7, in_features: int = 5) -> bool:
        """True when the trainable tensors are one ``r x in`` matrix (half of LoRA's parameters when square)."""
        shapes = self.shapes(out_features, in_features, cfg)
        return [shapes[n] for n in self.trainable] == [(cfg.rank, in_features)]

    def trainable_count(self, out_features: int, in_features: int, cfg: AdapterConfig) -> int:
        """Trainable scalars on one layer (``r * in`` for deltaR: half of LoRA's ``r * (in + out)`` when square)."""
        shapes = self.shapes(out_features, in_features, cfg)
        return sum(math.prod(shapes[name]) for name in self.trainable)

    def math_name(self, name: str) -> str:
        """``name``'s symbol in the paper's notation (the tensor name itself when the method names none)."""
        return self.math_names.get(name, name)

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """Every tensor the adapter holds: the frozen basis, then the trainable ones."""
        return self.basis + self.trainable


class DeltaR(Method):
    """QR-LoRA: frozen ``Q`` (out x r) and ``R`` (r x in); ``dW = s Q dR`` with trainable ``dR`` (r x in)."""

    name = "deltaR"
    trainable = ("delta_r",)
    basis = ("q", "base_r")
    math_names = {"q": "Q", "base_r": "R", "delta_r": "dR"}
    display_name = "QR-LoRA (deltaR)"
    bases = ("top", "random")

    def frozen_basis(self, weight, cfg, layer_name) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q, R)`` (out x r, r x in): the QR of the top-r core (the paper), or the study's controls."""
        if cfg.basis == "random":
            return _random_basis(weight, cfg, layer_name)
        return decompose.qr_of_core(_singular_directions(weight, cfg), cfg.scale)

    def initialize(self, weight, cfg, layer_name):
        q, r = self.frozen_basis(weight, cfg, layer_name)
        delta = self._coefficients(r.shape, cfg, layer_name, r.device)
        mask = self.grad_mask("delta_r", {"base_r": r})
        return {"q": q, "base_r": r, "delta_r": delta if mask is None else delta * mask}

    def output(self, t, x, scale):
        # (..., in) -> (..., r) -> (..., out); s applied on the small r-dim intermediate.
        return ((x @ t["delta_r"].T) * scale) @ t["q"].T

    def lora_factors(self, t, scale):
        return t["q"] * scale, t["delta_r"]

    def basis_product(self, t):
        return t["q"] @ t["base_r"]

    def shapes(self, out_features, in_features, cfg):
        r = cfg.rank
        return {"q": (out_features, r), "base_r": (r, in_features), "delta_r": (r, in_features)}



class TriuDeltaR(DeltaR):
    """``dR`` kept upper-triangular (mask ``j >= i``), matching the structure of ``R`` itself."""

    name = "triu_deltaR"
    display_name = "QR-LoRA (triu_deltaR)"

    def grad_mask(self, name, t):
        return _upper_triangle(t) if name == "delta_r" else None


def _upper_triangle(t: Tensors) -> torch.Tensor:
    """The 0/1 mask ``j >= i`` of ``delta_r``, shaped as the frozen ``base_r`` (r x n): R's own structure."""
    r, n = t["base_r"].shape
    return torch.ones(r, n, dtype=torch.float32, device=t["base_r"].device).triu()


class QRJoint(Method):
    """Fast-convergence mode: ``Q`` and ``R`` themselves train; ``dW = s (Q R - Q0 R0)``."""

    name = "qr"
    trainable = ("q", "base_r")
    basis = ("q0", "r0")
    math_names = {"q": "Q", "base_r": "R", "q0": "Q0", "r0": "R0"}
    display_name = "QR-LoRA (qr)"
    frozen_side = "neither"

    def initialize(self, weight, cfg, layer_name):
        q, r = decompose.qr_of_core(decompose.truncated_svd(weight, cfg.rank), cfg.scale)
        return {"q": q.clone(), "base_r": r.clone(), "q0": q, "r0": r}

    def path_tensors(self, t):
        # Q R - Q0 R0 = (Q - Q0) R + Q0 (R - R0): the differences dQ (out x r) and dR (r x in) are formed in float32,
        # so the path never subtracts two full products, which in bf16 cancel catastrophically (20 % off after one
        # step on a synthetic R, issue 28). Both are exactly 0 at init (bit-identity).
        return {**t, "dq": t["q"] - t["q0"], "dr": t["base_r"] - t["r0"]}

    def output(self, t, x, scale):
        return ((x @ t["base_r"].T) @ t["dq"].T + (x @ t["dr"].T) @ t["q0"].T) * scale

    def delta_weight(self, t, scale):
        return ((t["q"] - t["q0"]) @ t["base_r"] + t["q0"] @ (t["base_r"] - t["r0"])) * scale

    def export_rank(self, cfg):
        return 2 * cfg.rank

    def lora_factors(self, t, scale):
        # Rank 2r: [Q, -Q0] (out x 2r) times [R; R0] (2r x in).
        return torch.cat([t["q"], -t["q0"]], dim=1) * scale, torch.cat([t["base_r"], t["r0"]], dim=0)

    def basis_product(self, t):
        return t["q0"] @ t["r0"]

    def shapes(self, out_features, in_features, cfg):
        r = cfg.rank
        return {"q0": (out_features, r), "r0": (r, in_features), "q": (out_features, r), "base_r": (r, in_features)}



class QRInputFrozen(DeltaR):
    """The input-frozen transpose of QR-LoRA (issue 32): the QR of the top-r core's transpose, ``C^T = Q R``, gives
    ``C = R^T Q^T`` with ``Q`` (in x r, orthonormal, spanning the top-r right singular vectors) and ``R`` (r x out);
    both stay frozen and ``dR`` (r x out) trains, so ``dW = s dR^T Q^T``: the *input* basis is frozen and the output
    side is learned, as in Orthogonal Adaptation (Po et al., CVPR 2024), with QR-LoRA's parameter count (``r * out``)
    and its residual ``W - s R^T Q^T``. ``basis_offset`` k uses right singular directions k+1..k+r."""

    name = "qr_input_frozen"
    math_names = {"q": "Q_in", "base_r": "R_in", "delta_r": "dR_in"}
    display_name = "QR-LoRA input-frozen"
    frozen_side = "input"
    bases = ("top",)

    def frozen_basis(self, weight, cfg, layer_name):
        svd = _singular_directions(weight, cfg)
        transposed = decompose.TruncatedSVD(svd.Vh.T, svd.S, svd.U.T)  # C^T = V diag(S) U^T
        return decompose.qr_of_core(transposed, cfg.scale)  # Q (in x r), R (r x out)

    def output(self, t, x, scale):
        # (..., in) -> (..., r) -> (..., out)
        return ((x @ t["q"]) * scale) @ t["delta_r"]

    def lora_factors(self, t, scale):
        return t["delta_r"].T * scale, t["q"].T  # B (out x r), A (r x in)

    def basis_product(self, t):
        return t["base_r"].T @ t["q"].T

    def shapes(self, out_features, in_features, cfg):
        r = cfg.rank
        return {"q": (in_features, r), "base_r": (r, out_features), "delta_r": (r, out_features)}


class TriuQRInputFrozen(QRInputFrozen):
    """``qr_input_frozen`` with ``dR`` (r x out) kept upper-triangular like ``R``: the exact transpose of
    ``triu_deltaR`` (the issue's ``triu_deltaQ``), ``dW = s dR^T Q^T`` with ``dR^T`` lower-triangular."""

    name = "triu_qr_input_frozen"
    display_name = "QR-LoRA input-frozen (triu)"

    def grad_mask(self, name, t):
        return _upper_triangle(t) if name == "delta_r" else None


class SVDCoefficients(DeltaR):
    """SVD basis: frozen ``U_r`` and ``M0 = diag(S_r/s) V_r^T``; ``dW = s U_r dM``."""

    name = "svd"
    math_names = {"q": "U", "base_r": "M0", "delta_r": "dM"}
    display_name = "QR-LoRA (svd)"

    def frozen_basis(self, weight, cfg, layer_name):
        if cfg.basis == "random":
            return _random_basis(weight, cfg, layer_name)
        svd = _singular_directions(weight, cfg)
        return svd.U, (svd.S / cfg.scale).unsqueeze(1) * svd.Vh

    def initialize(self, weight, cfg, layer_name):
        u, m0 = self.frozen_basis(weight, cfg, layer_name)
        return {"q": u, "base_r": m0, "delta_r": self._coefficients(m0.shape, cfg, layer_name, m0.device)}


class ICA(Method):
    """ICA basis: mixing ``A`` (in x r, key q), sources ``S0`` (out x r, key base_r); ``dW = s dS A^T``."""

    name = "ica"
    trainable = ("delta_r",)
    basis = ("q", "base_r")
    math_names = {"q": "A", "base_r": "S0", "delta_r": "dS"}
    display_name = "QR-LoRA (ica)"
    frozen_side = "input"  # dW = s dS A^T: the mixing A (in x r) is frozen, the sources' change dS (out x r) trains
    # dW = s dS A^T with |A| ~ S_r / sqrt(out), while Adam moves every dS entry by about lr per step: on the tiny
    # models and the world that makes ICA's effective step ~10x smaller than the other methods'.
    lr_factor = 10.0

    def initialize(self, weight, cfg, layer_name):
        svd = decompose.truncated_svd(weight, cfg.rank)
        mixing, sources = decompose.ica_of_core(svd, cfg.scale, decompose.layer_seed(cfg.seed, layer_name))
        return {"q": mixing, "base_r": sources, "delta_r": self._coefficients(sources.shape, cfg, layer_name, sources.device)}

    def output(self, t, x, scale):
        return ((x @ t["q"]) * scale) @ t["delta_r"].T  # (..., in) -> (..., r) -> (..., out)

    def lora_factors(self, t, scale):
        return t["delta_r"] * scale, t["q"].T

    def basis_product(self, t):
        return t["base_r"] @ t["q"].T

    def shapes(self, out_features, in_features, cfg):
        r = cfg.rank
        return {"q": (in_features, r), "base_r": (out_features, r), "delta_r": (out_features, r)}



class FrequencyMoE(Method):
    """Frequency mixture of experts: expert ``e`` owns the ``e``-th contiguous slice of the spectrum.

    ``Q`` (out x r) and ``R`` (r x in) are the per-expert QR factors side by side; a gate Linear(in, E) weighs
    the experts per token: ``s Q ((dR x) * repeat_interleave(softmax(gate(x)), r/E))``.
    """

    name = "moe"
    static = False
    uses_experts = True
    trainable = ("delta_r", "gate_weight", "gate_bias")
    basis = ("q", "base_r")
    math_names = {"q": "Q", "base_r": "R", "delta_r": "dR", "gate_weight": "gate"}
    display_name = "QR-LoRA (moe)"

    def initialize(self, weight, cfg, layer_name):
        slices = decompose.spectral_slices(cfg.rank, cfg.num_experts)
        svd = decompose.truncated_svd(weight, cfg.rank)
        qs, rs = [], []
        for start, end in slices:
            part = decompose.TruncatedSVD(svd.U[:, start:end], svd.S[start:end], svd.Vh[start:end])
            q, r = decompose.qr_of_core(part, cfg.scale)
            qs.append(q)
            rs.append(r)
        q, r = torch.cat(qs, dim=1), torch.cat(rs, dim=0)
        in_features = weight.shape[1]
        # nn.Linear's default init, drawn from a per-layer generator so every process builds the same gate.
        gen = torch.Generator(device="cpu").manual_seed(decompose.layer_seed(cfg.seed + 2, layer_name))
        bound = 1.0 / math.sqrt(in_features)
        gate_w = (torch.rand(cfg.num_experts, in_features, generator=gen) * 2 - 1) * bound
        gate_b = (torch.rand(cfg.num_experts, generator=gen) * 2 - 1) * bound
        return {
            "q": q,
            "base_r": r,
            "delta_r": self._coefficients(r.shape, cfg, layer_name, r.device),
            "gate_weight": gate_w.to(r.device),
            "gate_bias": gate_b.to(r.device),
        }

    def gate_probabilities(self, t, x):
        """Softmax expert weights per token, (..., E)."""
        return torch.softmax(x @ t["gate_weight"].T + t["gate_bias"], dim=-1)

    def output(self, t, x, scale):
        num_experts = t["gate_weight"].shape[0]
        coeff = x @ t["delta_r"].T  # (..., r)
        gates = self.gate_probabilities(t, x).repeat_interleave(coeff.shape[-1] // num_experts, dim=-1)
        return ((coeff * gates) * scale) @ t["q"].T

    def basis_product(self, t):
        return t["q"] @ t["base_r"]

    def shapes(self, out_features, in_features, cfg):
        r, e = cfg.rank, cfg.num_experts
        return {"q": (out_features, r), "base_r": (r, in_features), "delta_r": (r, in_features),
                "gate_weight": (e, in_features), "gate_bias": (e,)}



class LoRA(Method):
    """Plain LoRA baseline (Hu et al., 2021) as PEFT initialises it: A Kaiming-uniform, B zero; ``dW = s B A``."""

    name = "lora"
    trainable = ("lora_A", "lora_B")
    math_names = {"lora_A": "A", "lora_B": "B"}
    display_name = "LoRA"
    family = "LoRA"
    frozen_side = "neither"

    def initialize(self, weight, cfg, layer_name):
        out_features, in_features = weight.shape
        gen = torch.Generator(device="cpu").manual_seed(decompose.layer_seed(cfg.seed, layer_name))
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on an (r, in) tensor
        lora_a = (torch.rand(cfg.rank, in_features, generator=gen) * 2 - 1) * bound
        return {"lora_A": lora_a.to(weight.device), "lora_B": torch.zeros(out_features, cfg.rank, device=weight.device)}

    def output(self, t, x, scale):
        return ((x @ t["lora_A"].T) * scale) @ t["lora_B"].T

    def lora_factors(self, t, scale):
        return t["lora_B"] * scale, t["lora_A"]

    def basis_product(self, t):
        return torch.zeros(t["lora_B"].shape[0], t["lora_A"].shape[1], dtype=t["lora_A"].dtype, device=t["lora_A"].device)

    def shapes(self, out_features, in_features, cfg):
        return {"lora_A": (cfg.rank, in_features), "lora_B": (out_features, cfg.rank)}



class LoRAFrozenB(LoRA):
    """Control of the disentanglement study: LoRA whose ``B`` (out x r) is frozen at a random init and whose ``A``
    (r x in, zero at init) trains: a frozen output basis like QR-LoRA's ``Q``, but not orthonormal and not from W."""

    name = "lora_frozen_b"
    trainable = ("lora_A",)
    basis = ("lora_B",)
    display_name = "LoRA (frozen random B)"
    frozen_side = "output"

    def initialize(self, weight, cfg, layer_name):
        out_features, in_features = weight.shape
        gen = torch.Generator(device="cpu").manual_seed(decompose.layer_seed(cfg.seed, layer_name))
        bound = 1.0 / math.sqrt(cfg.rank)  # kaiming-uniform on an (out, r) tensor, as PEFT draws A on (r, in)
        lora_b = (torch.rand(out_features, cfg.rank, generator=gen) * 2 - 1) * bound
        return {"lora_A": self._coefficients((cfg.rank, in_features), cfg, layer_name, weight.device),
                "lora_B": lora_b.to(weight.device)}


class OrthogonalAdaptation(LoRA):
    """Orthogonal Adaptation (Po et al., "Orthogonal Adaptation for Modular Customization of Diffusion Models",
    CVPR 2024): ``dW = s A B^T`` with the input basis ``B`` (in x r) frozen and the output side ``A`` (out x r, zero
    at init) learned. In this repository's LoRA layout ``lora_A = B^T`` (r x in, frozen) and ``lora_B = A`` (trained).

    The paper gives each concept its own basis, near-orthogonal to the others': with ``basis`` "random" it is
    columns ``basis_offset + 1 .. basis_offset + r`` of one seeded random orthogonal matrix (``basis_seed``), so two
    adapters with one seed and offsets ``0`` and ``r`` have exactly orthogonal input bases; "gaussian" is the paper's
    cheaper option, ``N(0, 1/in)`` entries (near-orthogonal for different seeds in high dimension). Two adapters
    with the same seed and offset share one basis (the study's control), so independently trained concepts must be
    given different offsets (or seeds)."""

    name = "ortho_adapt"
    trainable = ("lora_B",)
    basis = ("lora_A",)
    math_names = {"lora_A": "B^T", "lora_B": "A"}
    display_name = "Orthogonal Adaptation"
    family = "Orthogonal Adaptation"
    frozen_side = "input"
    bases = ("random", "gaussian")

    def initialize(self, weight, cfg, layer_name):
        out_features, in_features = weight.shape
        columns = cfg.basis_offset + cfg.rank
        if cfg.basis == "random" and columns > in_features:
            raise UserError(f"--qr_basis_offset {cfg.basis_offset} + --rank {cfg.rank} exceeds the {in_features} "
                            f"orthogonal input directions of layer {layer_name}")
        gen = torch.Generator(device="cpu").manual_seed(decompose.layer_seed(cfg.basis_seed + 11, layer_name))
        # (in, offset + r), drawn column by column, so the first columns are the same draw whatever the offset: the
        # QR of the wider draw starts with the narrower one's basis and goes on orthogonally to it.
        draw = torch.randn(columns, in_features, generator=gen).T
        basis = torch.linalg.qr(draw)[0] if cfg.basis == "random" else draw / math.sqrt(in_features)
        return {"lora_A": basis[:, cfg.basis_offset:].T.contiguous().to(weight.device),  # B^T (r, in)
                "lora_B": self._coefficients((out_features, cfg.rank), cfg, layer_name, weight.device)}


def _singular_directions(weight: torch.Tensor, cfg: AdapterConfig) -> decompose.TruncatedSVD:
    """Singular triplets ``basis_offset + 1 .. basis_offset + r`` of ``W`` (the top r when the offset is 0)."""
    k = cfg.basis_offset
    if k == 0:
        return decompose.truncated_svd(weight, cfg.rank)
    if k + cfg.rank > min(weight.shape):
        raise UserError(f"--qr_basis_offset {k} + --rank {cfg.rank} exceeds the layer's {min(weight.shape)} directions")
    svd = decompose.truncated_svd(weight, k + cfg.rank)
    return decompose.TruncatedSVD(svd.U[:, k:], svd.S[k:], svd.Vh[k:])


def _random_basis(weight: torch.Tensor, cfg: AdapterConfig, layer_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random orthonormal ``Q`` (out x r) and ``R = Q^T W / s`` (so ``s Q R`` is W's part in span Q)."""
    w = weight.detach().to(torch.float32)
    gen = torch.Generator(device="cpu").manual_seed(decompose.layer_seed(cfg.basis_seed + 7, layer_name))
    q, _ = torch.linalg.qr(torch.randn(w.shape[0], cfg.rank, generator=gen))
    q = q.to(w.device)
    return q, (q.T @ w) / cfg.scale


METHODS: dict[str, Method] = {m.name: m for m in (DeltaR(), TriuDeltaR(), QRJoint(), SVDCoefficients(), ICA(), FrequencyMoE(), LoRA(),
                                                  LoRAFrozenB(), QRInputFrozen(), TriuQRInputFrozen(),
                                                  OrthogonalAdaptation())}


def get_method(name: str) -> Method:
    """Look up a registry entry by its CLI name."""
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"unknown --lora_init_method '{name}'; choose one of {', '.join(METHODS)}") from None
