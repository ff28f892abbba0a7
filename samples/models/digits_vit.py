"""A tiny vision transformer for 3x32x32 digits (no BatchNorm).

Patch embedding as a Conv2d (4x4 patches, stride 4 -> 64 tokens), a learned class
token and position embedding, 4 pre-norm encoder blocks of width 64 with 4 heads
(explicit Linear q/k/v/out projections and softmax attention, so every weight is a
plain Conv2d/Linear that mapc can mask), MLP ratio 2, a final LayerNorm and a Linear
head on the class token. Written with plain torch modules that torch.export,
TorchScript (``torch.jit.script``) and the ONNX dynamo exporter all handle.

Use with ``mapc compile samples/models/digits_vit.state_dict.pt --arch samples.models.digits_vit:build``.
"""
import torch
import torch.nn as nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = float(self.head_dim) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        c = x.shape[2]
        q = self.q(x).reshape(-1, n, self.heads, self.head_dim).transpose(1, 2)  # B,h,N,d
        k = self.k(x).reshape(-1, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).reshape(-1, n, self.heads, self.head_dim).transpose(1, 2)
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        y = torch.matmul(attn, v).transpose(1, 2).reshape(-1, n, c)
        return self.out(y)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class DigitsViT(nn.Module):
    def __init__(self, num_classes: int = 10, image_size: int = 32, patch: int = 4, dim: int = 64,
                 depth: int = 4, heads: int = 4, mlp_ratio: int = 2):
        super().__init__()
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        # names deliberately not ending in "weight": these are not masked
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        # Conv2d/Linear keep PyTorch's default init: on 8,000 digits it starts learning
        # far sooner than the usual ViT trunc_normal(0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # B,64,dim
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, 0]))


def build(num_classes: int = 10) -> DigitsViT:
    return DigitsViT(num_classes)
