"""The routers' noise: standard normal draws from a counter-based stream.

Draw i of the stream keyed by two 32-bit integers (k0, k1) is a function of i and the key alone. Word i is
``mix(mix(i ^ k0) ^ k1)``, ``mix`` being Chris Wellons' *triple32* integer hash (a bijection of 32-bit words
with near-ideal avalanche); block b of 16 draws takes words 16b to 16b + 15, the first eight give
u = 1 - (w >> 8) 2⁻²⁴ in (0, 1], the last eight v = (w >> 8) 2⁻²⁴ in [0, 1), and the Box-Muller transform
gives draw 16b + j = r cos 2πv and draw 16b + 8 + j = r sin 2πv with r = √(-2 log u): |draw| ≤ 5.77, the
bound of ``torch.randn``'s own 24-bit uniforms.

Why not ``torch.randn``: on CNN feature maps the noisy top-k router draws (tokens, E) normals per layer
and step, as many values as the feature map has; ``torch.randn`` draws them on one thread at ~7.5 ns each
here, 7% of the width-8 depthwise CNN's training step (BENCHMARKS.md, eleventh pass). The native kernel
(:func:`visionmoe.native.standard_normal`) computes this stream in vectorised C on every thread (0.14 of
``torch.randn``'s time for 524,288 draws on 2 threads), and :func:`counter_normal` computes the same words
with torch ops where the kernel is not used on the CPU (``VISIONMOE_NATIVE=0``, no C compiler, float64):
the two differ by the rounding of log, sin and cos only, so a run's noise is the same with and without the
kernels and at any thread count. The torch ops cost 3-12 times ``torch.randn``'s time
(``benchmarks/router_noise.py``): on GPUs, where one ``torch.randn`` kernel is cheaper than their
launches, :func:`visionmoe.layers.router_base.router_noise` keeps ``torch.randn`` (whose CUDA stream differs
from the CPU's in any case). The key is drawn from the CPU's default generator (:func:`draw_key`), so
``torch.manual_seed`` fixes the noise and a checkpoint's RNG state resumes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

STREAM_MAX = 2**32
"""The most draws one key gives (the counter is a 32-bit word)."""

_TRIPLE32 = ((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB))
_HALF_PI = float(torch.tensor(math.pi / 2, dtype=torch.float32))  # π/2 rounded to float32, as moe.c has it


def _int32(value: int) -> int:
    """The int32 holding the bits of the 32-bit word ``value``."""
    return value - 2**32 if value >= 2**31 else value


def check_stream_length(shape: Sequence[int]) -> int:
    """The number of draws ``shape`` holds; a ValueError past :data:`STREAM_MAX`."""
    n = math.prod(shape)
    if n > STREAM_MAX:
        raise ValueError(f"one noise stream gives at most 2**32 draws, got shape={tuple(shape)} ({n} draws)")
    return n


def _as_int32(words: Tensor) -> Tensor:
    """int64 32-bit words as the int32 holding their bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _shift(x: Tensor, bits: int) -> Tensor:
    """The logical right shift of 32-bit words held in int32 (``>>`` on int32 is arithmetic)."""
    return (x >> bits) & ((1 << (32 - bits)) - 1)


def _triple32(x: Tensor) -> Tensor:
    # int32 products wrap modulo 2³² (two's complement), as uint32 ones would: the same bits
    for bits, multiplier in _TRIPLE32:
        x = (x ^ _shift(x, bits)) * _int32(multiplier)
    return x ^ _shift(x, 14)


def counter_words(n: int, key: Tensor, first: int = 0) -> Tensor:
    """Words ``first`` .. ``first + n - 1`` of the stream keyed by ``key`` ((2,) int64 in [0, 2³²)) as int32
    holding their bits, on the key's device."""
    if first + n <= 2**31:
        i = torch.arange(first, first + n, dtype=torch.int32, device=key.device)
    else:  # counters past 2³¹ - 1 as the int32 holding their bits
        i = _as_int32(torch.arange(first, first + n, dtype=torch.int64, device=key.device))
    key = _as_int32(key)
    return _triple32(_triple32(i ^ key[0]) ^ key[1])


def counter_normal(shape: Sequence[int], key: Tensor) -> Tensor:
    """Draws 0 .. n - 1 of the stream keyed by ``key`` ((2,) int64 in [0, 2³²), on the device wanted) as a
    float32 tensor of ``shape``, by torch ops (see the module's docstring)."""
    n = check_stream_length(shape)
    blocks = -(-n // 16)
    words = counter_words(16 * blocks, key).view(blocks, 2, 8)
    ulp = 2.0**-24
    u = 1.0 - _shift(words[:, 0], 8).to(torch.float32) * ulp
    v = _shift(words[:, 1], 8).to(torch.float32) * ulp
    r = torch.sqrt(torch.log(u) * -2.0)
    # 2πv = q π/2 + φ: q the nearest integer to 4v (ties to even), φ = (4v - q) π/2 in [-π/4, π/4]
    y = v * 4.0
    q = torch.round(y)
    phi = (y - q) * _HALF_PI
    s, c = torch.sin(phi), torch.cos(phi)
    # rotate by q quarter turns: (cos, sin) = (c, s), (-s, c), (-c, -s), (s, -c); the signs are exact ±1
    q = q.to(torch.int32)
    odd = (q & 1).bool()
    cos = torch.where(odd, s, c) * (1 - 2 * (((q + 1) >> 1) & 1))
    sin = torch.where(odd, c, s) * (1 - 2 * ((q >> 1) & 1))
    return torch.stack((r * cos, r * sin), dim=1).reshape(-1)[:n].reshape(tuple(shape))


def draw_key() -> Tensor:
    """A stream key, (2,) int64 in [0, 2³²), drawn from the CPU's default generator."""
    return torch.randint(0, STREAM_MAX, (2,), dtype=torch.int64)
