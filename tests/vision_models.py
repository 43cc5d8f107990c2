"""Vision models for the tests: small ones written here, and torchvision's when installed.

* :class:`TinyViT`: patch embedding (Conv2d), class token, position embedding, pre-norm
  encoder blocks with ``nn.MultiheadAttention`` (batch_first) and a GELU MLP, a Linear
  head; ``[N, 3, 32, 32] -> [N, 10]``.
* :class:`SmallBNCNN`: MobileNet-like: conv-BN-ReLU stem, depthwise 3x3 conv-BN-Hardswish,
  pointwise conv-BN, a squeeze-excitation, residual, pool, Linear; ``[N, 3, 32, 32] -> [N, 10]``.
* :func:`torchvision_or_skip` and :func:`tv_model`: seeded random-weight torchvision models
  (ResNet-18, MobileNetV3 small/large, a small ``VisionTransformer``, ViT-B/16); no
  pretrained weights are downloaded.

torchvision on PyPI is built against CUDA torch: with the CPU torch wheel its ``_C``
extension does not load, and torchvision 0.28's ``_meta_registrations`` then fails at import
("operator torchvision::nms does not exist") because its ``register_fake`` for ``nms`` and
``qnms`` is not guarded by ``_has_ops()``; transformers, which imports torchvision whenever
it is installed, then fails too, so ``make setup`` uninstalls such a torchvision and these
tests skip. Where one is importable anyway (on ``PYTHONPATH``, e.g. ``pip install --no-deps
--target DIR torchvision==0.28.0``), :func:`torchvision_or_skip` declares the two operator
schemas (no kernels: detection ops would fail, classifiers never call them) and imports
again. Only test code does this.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

IMAGE = 32  # the small models' input size


class TinyViT(nn.Module):
    """A ViT-like classifier with ``nn.MultiheadAttention``: ``[N, 3, 32, 32] -> [N, 10]``."""

    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2, patch: int = 8,
                 mlp: int = 128, classes: int = 10, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        n = (IMAGE // patch) ** 2 + 1
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embedding = nn.Parameter(torch.randn(1, n, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embedding
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x)[:, 0])


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class SmallBNCNN(nn.Module):
    """Conv/BatchNorm/depthwise/squeeze-excitation CNN: ``[N, 3, 32, 32] -> [N, 10]``."""

    def __init__(self, classes: int = 10, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
                                nn.BatchNorm2d(16), nn.Hardswish())
        self.se_reduce, self.se_expand = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)
        self.pw = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, classes)
        with torch.no_grad():  # non-trivial BatchNorm statistics, as a trained net has
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dw(x)
        s = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(y.mean((2, 3), True)))))
        x = x + self.pw(y * s)
        return self.head(x.mean((2, 3)))


def images(n: int = 2, size: int = IMAGE, seed: int = 0) -> torch.Tensor:
    """Seeded ``[n, 3, size, size]`` inputs."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def calib_loop(size: int = IMAGE, batches: int = 2, n: int = 2):
    """A forward_loop over ``batches`` seeded batches of images (seeds 1..batches)."""
    def loop(model):
        for s in range(1, batches + 1):
            model(images(n, size, s))
    return loop


_TV_REASON = ""


def torchvision_or_skip():
    """The ``torchvision`` module, or ``pytest.skip`` with the reason (see the module doc)."""
    global _TV_REASON
    if "torchvision" in sys.modules and sys.modules["torchvision"] is not None and \
            hasattr(sys.modules["torchvision"], "models"):
        return sys.modules["torchvision"]
    if _TV_REASON:
        pytest.skip(_TV_REASON)
    try:
        import torchvision
        return torchvision
    except ImportError:
        _TV_REASON = ("torchvision is not installed (optional extra `vision`; `make setup` "
                      "keeps it only when it imports: PyPI's build needs CUDA torch)")
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        _declare_torchvision_ops()
        try:
            import torchvision
            return torchvision
        except Exception as e2:  # noqa: BLE001 - the reason is the skip message
            _TV_REASON = f"torchvision does not import with this torch: {e2}"
    pytest.skip(_TV_REASON)


_LIB = None


def _declare_torchvision_ops() -> None:
    global _LIB
    if _LIB is None:
        _LIB = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _LIB.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


TV_MODELS = ("resnet18", "mobilenet_v3_small", "mobilenet_v3_large", "vit_small", "vit_b_16")
TV_SIZES = {"resnet18": 64, "mobilenet_v3_small": 64, "mobilenet_v3_large": 64,
            "vit_small": 32, "vit_b_16": 224}


def tv_model(name: str, seed: int = 0) -> nn.Module:
    """A torchvision classifier with seeded random weights, in eval mode; ``vit_small`` is
    ``VisionTransformer(image_size=32, patch_size=8, 2 layers, 4 heads, hidden 64, MLP 128,
    10 classes)``. Input size: ``TV_SIZES[name]``."""
    tv = torchvision_or_skip()
    torch.manual_seed(seed)
    if name == "vit_small":
        from torchvision.models.vision_transformer import VisionTransformer

        m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                              hidden_dim=64, mlp_dim=128, num_classes=10)
    else:
        m = getattr(tv.models, name)(weights=None)
    with torch.no_grad():  # non-trivial BatchNorm statistics and heads, as a trained net has
        if name.startswith("vit"):  # torchvision zero-initialises the ViT head
            nn.init.normal_(m.heads.head.weight, std=0.02)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()
