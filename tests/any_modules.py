"""Ordinary torch modules that the old layer whitelist could not express: GELU + LayerNorm, concat, attention.

Shared by the export tests and the end-to-end test that serves them; each
case is (name, stages, branches) with inputs of shape (3, 16, 16) and five
classes.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (3, 16, 16)
NORM = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
CLASSES = [f"c{i}" for i in range(5)]


class GeluNorm(nn.Module):  # conv, LayerNorm over channels, GELU
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        x = self.conv(x).permute(0, 2, 3, 1)
        return nn.functional.gelu(self.norm(x)).permute(0, 3, 1, 2)


class Inception(nn.Module):  # torch.cat of two conv paths
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SiLU())

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


class Attention(nn.Module):  # hand-written attention + residual adds on tokens
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.norm, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))

    def forward(self, tokens):
        q, k, v = self.qkv(self.norm(tokens)).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1)
        tokens = tokens + self.proj(weights @ v)
        return tokens + self.mlp(tokens)


class PatchEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 4, stride=4)

    def forward(self, x):
        return self.conv(x).flatten(2).transpose(1, 2)


class TokenHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(16), nn.Linear(16, 5)

    def forward(self, tokens):
        return self.fc(self.norm(tokens).mean(dim=1))


def pool_head(channels: int) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 5))


def cases():
    torch.manual_seed(0)
    yield "gelu_layernorm", [nn.Sequential(nn.Conv2d(3, 3, 1)), GeluNorm(3), pool_head(8)], {2: pool_head(8)}
    yield "concat", [nn.Conv2d(3, 3, 3, padding=1), Inception(), pool_head(8)], {2: pool_head(8)}
    yield "attention", [PatchEmbed(), Attention(), Attention(), TokenHead()], {2: TokenHead()}
