"""Argument checks shared by the public GEMMs; every failure is a ValueError that names the argument."""

from __future__ import annotations

import torch

from .casting import unpack_ue8m0_from_int
from .layout import ceil_div

BF16 = torch.bfloat16
FP32 = torch.float32


def split_pair(name: str, pair) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise ValueError(f"{name}: expected a (tensor, scales) pair, got {type(pair).__name__}")
    return pair[0], pair[1]


def check_tensor(name: str, t, dtypes: tuple[torch.dtype, ...], ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name}: expected dtype {want}, got {str(t.dtype).replace('torch.', '')}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    return t


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def check_scales(name: str, sf, shape: tuple[int, ...]) -> torch.Tensor:
    """fp32 scales of exactly `shape` (any strides), or UE8M0 scales packed four per int32 along the last axis."""
    if not isinstance(sf, torch.Tensor):
        raise ValueError(f"{name}: expected a scale tensor, got {type(sf).__name__}")
    if sf.dtype == torch.int32:
        packed = (*shape[:-1], ceil_div(shape[-1], 4))
        if tuple(sf.shape) != packed:
            raise ValueError(f"{name}: expected packed UE8M0 shape {packed}, got {tuple(sf.shape)}")
        return unpack_ue8m0_from_int(sf)[..., : shape[-1]]
    if sf.dtype != FP32:
        raise ValueError(f"{name}: expected float32 scales (or int32 packed UE8M0), got {sf.dtype}")
    check_shape(name, sf, shape)
    return sf


def check_k(name: str, k_got: int, k_want: int) -> None:
    if k_got != k_want:
        raise ValueError(f"{name}: K={k_got} does not match the LHS K={k_want}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name}: on {dev}, other operands on {first}")


def b_granularity(name: str, sfb: torch.Tensor, n: int, kb: int, recipe, batch: tuple[int, ...] = ()) -> int:
    """1 for 1x128 RHS scales ([n, kb]), 128 for 128x128 blocks ([ceil(n/128), kb]); from `recipe` or the shape."""
    if recipe is not None:
        if tuple(recipe) not in ((1, 128, 128), (1, 1, 128)):
            raise ValueError(f"recipe: expected (1, 128, 128) or (1, 1, 128), got {recipe!r}")
        return recipe[1]
    if not isinstance(sfb, torch.Tensor):
        raise ValueError(f"{name}: expected a scale tensor, got {type(sfb).__name__}")
    rows = ceil_div(n, 128)
    last = sfb.shape[-1] if sfb.dtype != torch.int32 else kb
    if tuple(sfb.shape[:-1]) == (*batch, rows) and last in (kb, ceil_div(kb, 4)):
        return 128
    if tuple(sfb.shape[:-1]) == (*batch, n):
        return 1
    raise ValueError(
        f"{name}: expected shape {(*batch, rows, kb)} (128x128 blocks) or {(*batch, n, kb)} (1x128), "
        f"got {tuple(sfb.shape)}"
    )


def resolve_recipe(recipe, recipe_a=None, recipe_b=None):
    """DeepGEMM's `recipe` (1, gran_n, 128) or the per-operand pair `recipe_a` (1, 128) / `recipe_b`
    ((128, 128) or (1, 128)), as one `recipe` triple (None: infer from the scale shapes)."""
    if recipe_a is None and recipe_b is None:
        return recipe
    if recipe is not None:
        raise ValueError("recipe: give either recipe or recipe_a/recipe_b, not both")
    if recipe_a is not None and tuple(recipe_a) != (1, 128):
        raise ValueError(f"recipe_a: only 1x128 activation scales, (1, 128), are supported, got {recipe_a!r}")
    if recipe_b is None:
        return None
    if tuple(recipe_b) not in ((128, 128), (1, 128)):
        raise ValueError(f"recipe_b: expected (128, 128) or (1, 128), got {recipe_b!r}")
    return (1, recipe_b[0], 128)


def check_c(name: str, c, shape: tuple[int, ...]) -> None:
    if c is None:
        return
    check_tensor(name, c, (FP32,), len(shape))
    check_shape(name, c, shape)


def check_index(name: str, t, ndim: int = 1) -> torch.Tensor:
    return check_tensor(name, t, (torch.int32, torch.int64), ndim)
