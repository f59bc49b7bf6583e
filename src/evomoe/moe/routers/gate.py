"""The linear gate shared by learned routers: z = fp32(x) @ W_g, always in float32, no bias."""

from __future__ import annotations

import torch
from torch import nn


class LinearGate(nn.Module):
    def __init__(self, d_model: int, num_experts: int, init: str = "zeros") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, dtype=torch.float32))
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init == "zeros":  # "auto" is resolved by the router before it gets here
            nn.init.zeros_(self.weight)
        else:
            nn.init.normal_(self.weight, std=0.02)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return x_TD.float() @ self.weight.float().t()


def gumbel_like(z: torch.Tensor) -> torch.Tensor:
    """i.i.d. Gumbel(0, 1) noise from the global RNG (saved in checkpoints for exact resume)."""
    u = torch.rand_like(z).clamp_(1e-10, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))
