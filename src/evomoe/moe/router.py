"""The router interface: routers turn hidden states into (token, expert, weight) pairs.

Legend: T tokens (flattened B*S), E experts, D model width, P routed (token, expert) pairs.
A router may give a token any number of experts, 0..E; the dispatcher computes exactly the pairs.

A router is one file: a ``Router`` subclass registered with ``@ROUTERS.register(name)``. It declares what
it needs instead of the trainer knowing its name:
- ``Options``: a dataclass of its settings; the config gets the table ``[router.<name>]`` and validates it
  with ``Options.validate(cfg, prefix)`` when defined;
- ``needs``: inputs beyond the hidden states: ``"token_ids"`` (``RouterContext.token_ids_T``),
  ``"token_counts"`` (training-set frequency of each token id, in ``RouterSpec.token_counts``);
- ``dense_to_sparse``: it has a soft phase driven by the ``[gate]`` temperature schedule (``GateState``);
- ``on_step(step)``: called after every optimizer step (bias updates, adaptive coefficients, hardening);
- ``link(routers)``: called once all the model's routers exist (state shared across layers);
- ``loss_weights()``: the coefficient of each aux loss it returns (losses come unscaled);
- ``export_routing(hard)``: its evaluation routing as a softmax top-k (for export to transformers).
State that must survive a checkpoint lives in parameters or persistent buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class GateState:
    """Schedule values the trainer hands to every router for the current step.

    ``spawn_step`` and ``total_steps`` are the run's plan (fixed when the run starts, saved in checkpoints):
    routers with stages of their own (StableMoE) derive them from ``step`` and the plan. ``progress`` is the
    share of the temperature decay done (0 at the spawn, 1 at its end; by steps or by FLOPs), for routers
    that decay something else along with it. ``train_selection``: an evaluation that asks the router to
    select as in training (``eval.router = "train"``).
    """

    tau: float = 1.0
    hard: bool = False
    step: int = 0
    spawn_step: int = 0
    total_steps: int = 1
    progress: float = 0.0
    train_selection: bool = False


@dataclass
class RouterContext:
    """What a router may need beyond the hidden states, per forward."""

    gate: GateState = field(default_factory=GateState)
    token_ids_T: torch.Tensor | None = None  # long, the input token ids (hash, StableMoE)
    valid_T: torch.Tensor | None = None  # bool, False for padding: never routed, not in aux losses
    shape: tuple[int, int] | None = None  # (B, S) of the flattened tokens: sequence-aware routers


@dataclass
class RouterSpec:
    """What a router is built from (one MoE layer)."""

    d_model: int
    num_experts: int
    options: Any = None  # the router's own Options ([router.<name>]), or None
    gate_init: str = "auto"  # router.gate_init: auto | zeros | normal
    layer_idx: int = 0  # index among the model's MoE layers
    num_moe_layers: int = 1
    vocab_size: int = 0
    token_counts: torch.Tensor | None = None  # [V] training-set counts, when ``needs`` has token_counts


@dataclass
class Routing:
    """Router output. ``weight_P`` carries the gate's gradient; the indices carry none.

    aux: unscaled auxiliary losses by name (coefficients: ``Router.loss_weights``).
    probs_TE: the router's clean distribution over experts (detached), for entropy stats; or None.
    dropped: count of (token, expert) pairs a router chose but dropped for capacity, as a 0-d tensor.
    fixed_k: set when every token has exactly this many pairs in token-major order (pair p belongs to
    token p // fixed_k); the dispatcher then folds rows back by a reshape instead of a sort by token.
    """

    token_idx_P: torch.Tensor
    expert_idx_P: torch.Tensor
    weight_P: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    probs_TE: torch.Tensor | None = None
    dropped: torch.Tensor | None = None
    fixed_k: int | None = None


class Router(nn.Module):
    """Base class. Subclasses implement ``forward(x_TD, ctx) -> Routing``."""

    Options: ClassVar[type | None] = None
    needs: ClassVar[frozenset[str]] = frozenset()
    dense_to_sparse: ClassVar[bool] = False
    default_gate_init: ClassVar[str] = "normal"  # what router.gate_init = auto means for this router

    def __init__(self, spec: RouterSpec) -> None:
        super().__init__()
        self.spec = spec
        self.d_model = spec.d_model
        self.num_experts = spec.num_experts
        self.opts = spec.options if spec.options is not None else (self.Options() if self.Options else None)

    @classmethod
    def from_config(cls, router_cfg: Any, d_model: int, num_experts: int, **info: Any) -> Router:
        """Build from a config's ``[router]`` section: this router's own table and ``gate_init``; ``info``:
        the other ``RouterSpec`` fields."""
        options = getattr(router_cfg, getattr(cls, "registered_name", ""), None)
        return cls(RouterSpec(d_model, num_experts, options, router_cfg.gate_init, **info))

    @property
    def gate_init(self) -> str:
        return self.default_gate_init if self.spec.gate_init == "auto" else self.spec.gate_init

    def loss_weights(self) -> dict[str, float]:
        """Coefficient of each aux loss this router returns (names as in ``Routing.aux``)."""
        return {}

    def on_step(self, step: int) -> None:
        """Called after optimizer step ``step`` (0-based) of training; default: nothing."""

    def link(self, routers: list[Router]) -> None:
        """Called once every MoE layer of the model has its router (``routers``, in layer order, this one
        among them), for state that spans layers (ReMoE's model-wide lambda); default: nothing."""

    def export_routing(self, hard: bool) -> tuple[int, bool]:
        """Evaluation routing as ``softmax(x W_g)``, top-k, weights renormalised or not: (k, renormalised),
        the semantics of the Hugging Face MoE classes. ``hard``: the gate's one-way hard flag at the
        checkpoint. Raises ValueError saying why a router's routing is not of that form."""
        raise ValueError(f"{type(self).__name__} routing is not a softmax top-k of a linear gate")

    def forward(self, x_TD: torch.Tensor, ctx: RouterContext) -> Routing:  # pragma: no cover
        raise NotImplementedError


def pairs_from_mask(mask_TE: torch.Tensor, weight_TE: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Selected (token, expert) pairs of a boolean mask, token-major order, with their weights."""
    token_idx_P, expert_idx_P = mask_TE.nonzero(as_tuple=True)
    return token_idx_P, expert_idx_P, weight_TE[token_idx_P, expert_idx_P]


def pairs_from_topk(expert_TK: torch.Tensor, weight_TK: torch.Tensor, keep_TK: torch.Tensor | None = None):
    """Pairs from a [T, K] choice of experts; ``keep_TK`` drops pairs (capacity, padding)."""
    T, K = expert_TK.shape
    token_TK = torch.arange(T, device=expert_TK.device).unsqueeze(1).expand(T, K)
    if keep_TK is None:
        return token_TK.reshape(-1), expert_TK.reshape(-1), weight_TK.reshape(-1)
    return token_TK[keep_TK], expert_TK[keep_TK], weight_TK[keep_TK]


def valid_tokens(ctx: RouterContext, num_tokens: int, device: torch.device) -> torch.Tensor:
    """Indices of the tokens to route (all, or those with ``ctx.valid_T`` True), ascending."""
    if ctx.valid_T is None:
        return torch.arange(num_tokens, device=device)
    return ctx.valid_T.nonzero().squeeze(1)
