"""The routers' noise: the counter-based standard normal stream of visionmoe.routing.noise, by torch ops and
by the native kernel, against a scalar Python reference, its distribution, and the routers' use of it."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from visionmoe import MoE, native
from visionmoe.layers.router_base import router_noise
from visionmoe.routing.noise import STREAM_MAX, check_stream_length, counter_normal, counter_words, draw_key

needs_kernel = pytest.mark.skipif(not native.available(), reason=f"no native kernel: {native.unavailable_reason()}")

KEYS = [(0, 0), (12345, 67890), (2**32 - 1, 2**31), (3_000_000_000, 7)]


def triple32(x: int) -> int:
    """Wellons' triple32 on a Python int, written out from its definition."""
    x ^= x >> 17
    x = (x * 0xED5AD4BB) % 2**32
    x ^= x >> 11
    x = (x * 0xAC4C1B51) % 2**32
    x ^= x >> 15
    x = (x * 0x31848BAB) % 2**32
    return x ^ (x >> 14)


def word(i: int, key: tuple[int, int]) -> int:
    return triple32(triple32(i ^ key[0]) ^ key[1])


def reference_draws(n: int, key: tuple[int, int]) -> list[float]:
    """Draws 0 .. n - 1 by the stream's definition, in float64: block b's first eight words give
    u = 1 - (w >> 8) / 2²⁴, its last eight v = (w >> 8) / 2²⁴, and Box-Muller r cos 2πv, r sin 2πv."""
    draws = []
    for block in range(-(-n // 16)):
        first = 16 * block
        u = [1 - (word(first + j, key) >> 8) / 2**24 for j in range(8)]
        v = [(word(first + 8 + j, key) >> 8) / 2**24 for j in range(8)]
        r = [math.sqrt(-2 * math.log(x)) for x in u]
        draws += [r[j] * math.cos(2 * math.pi * v[j]) for j in range(8)]
        draws += [r[j] * math.sin(2 * math.pi * v[j]) for j in range(8)]
    return draws[:n]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("first", [0, 2**31 - 8, 2**32 - 40])
def test_words_are_triple32_twice_around_the_key(key, first):
    # also counters past 2³¹ - 1, which torch holds as negative int32
    got = counter_words(40, torch.tensor(key), first=first).to(torch.int64) & 0xFFFFFFFF
    assert got.tolist() == [word(first + i, key) for i in range(40)]


def test_triple32_known_value():
    # worked by hand from the definition: 1 -> 1 ^ 0 = 1; · 0xED5AD4BB; ^ >> 11; · 0xAC4C1B51; ...
    x = 1 * 0xED5AD4BB  # 1 ^ (1 >> 17) = 1
    x ^= x >> 11
    x = (x * 0xAC4C1B51) % 2**32
    x ^= x >> 15
    x = (x * 0x31848BAB) % 2**32
    x ^= x >> 14
    assert triple32(1) == x and triple32(0) == 0
    assert counter_words(2, torch.tensor([0, 0])).tolist() == [0, _int32(triple32(x))]


def _int32(w: int) -> int:
    return w - 2**32 if w >= 2**31 else w


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("n", [1, 15, 16, 17, 40])
def test_torch_ops_give_the_defined_draws(key, n):
    expected = torch.tensor(reference_draws(n, key), dtype=torch.float32)
    torch.testing.assert_close(counter_normal((n,), torch.tensor(key)), expected, rtol=0, atol=2e-6)


def test_key_0_0_starts_at_zero():
    # word 0 of key (0, 0) is triple32(triple32(0)) = 0: u = 1, r = 0, so draws 0 and 8 are zero
    draws = counter_normal((16,), torch.tensor([0, 0]))
    assert draws[0].abs() == 0 and draws[8].abs() == 0 and draws.abs().sum() > 1


@needs_kernel
@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("shape", [(1,), (7, 3), (33,), (129,), (1000, 37), (2, 64, 8)])
def test_native_draws_equal_the_torch_ops_draws(key, shape):
    # the same words; log, sqrt, sin and cos rounded by other polynomials: |draw| <= 5.77, so ~1 ulp apart
    c = native.standard_normal(shape, key)
    assert c.shape == shape and c.dtype == torch.float32
    torch.testing.assert_close(c, counter_normal(shape, torch.tensor(key)), rtol=0, atol=1.5e-6)


@needs_kernel
def test_native_draws_ignore_the_thread_count_and_the_length():
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(native.standard_normal((200_003,), (5, 6)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    # a shorter tensor is the longer one's start (blocks of 64 cut anywhere)
    assert torch.equal(native.standard_normal((37,), (5, 6)), runs[0][:37])


@pytest.mark.parametrize("source", ["torch ops", "native"])
def test_the_draws_are_standard_normal_and_independent(source):
    if source == "native" and not native.available():
        pytest.skip(f"no native kernel: {native.unavailable_reason()}")
    n = 2**20
    key = (2024, 12)
    z = (native.standard_normal((n,), key) if source == "native" else counter_normal((n,), torch.tensor(key))).double()
    z = z.numpy()
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se
    assert stats.kstest(z, "norm").pvalue > 1e-3  # a fixed key: the same draws, the same p every run
    for t in (1, 2, 3):  # tails: the fraction beyond t standard deviations, within 5 binomial std errors
        p = 2 * stats.norm.sf(t)
        assert abs(np.mean(np.abs(z) > t) - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert np.abs(z).max() <= math.sqrt(2 * 24 * math.log(2)) + 1e-5
    # no correlation between neighbours, nor between a Box-Muller pair (lag 8), in values or squares
    for lag in (1, 8, 16):
        for a, b in ((z[:-lag], z[lag:]), (z[:-lag] ** 2, z[lag:] ** 2)):
            assert abs(np.corrcoef(a, b)[0, 1]) < 5 * se, lag
    # keys one bit apart give unrelated streams
    other = counter_normal((n,), torch.tensor([2024 ^ 1, 12])).double().numpy()
    assert abs(np.corrcoef(z, other)[0, 1]) < 5 * se


def test_stream_length_and_key_are_checked():
    assert check_stream_length((2**16, 2**16)) == STREAM_MAX
    with pytest.raises(ValueError, match=r"at most 2\*\*32 draws, got shape=\(65536, 65537\)"):
        check_stream_length((2**16, 2**16 + 1))
    if native.available():
        with pytest.raises(ValueError, match=r"at most 2\*\*32 draws"):
            native.standard_normal((2**16, 2**16 + 1), (0, 0))  # refused before allocating 16 GB
        with pytest.raises(ValueError, match=r"key must be two integers in \[0, 2\*\*32\), got key=\(-1, 0\)"):
            native.standard_normal((4,), (-1, 0))


def test_router_noise_follows_the_seed_and_the_generator_state():
    like = torch.zeros(4, 50, 8)
    torch.manual_seed(3)
    a = router_noise(like)
    state = torch.get_rng_state()
    b = router_noise(like)
    torch.set_rng_state(state)  # a checkpoint's RNG state: the next draws again
    assert torch.equal(router_noise(like), b) and not torch.equal(a, b)
    torch.manual_seed(3)
    assert torch.equal(router_noise(like), a)
    torch.manual_seed(3)
    key = draw_key()
    torch.testing.assert_close(a, counter_normal(like.shape, key), rtol=0, atol=1.5e-6)
    with native.disabled():  # the path without the kernels: the same draws to rounding
        torch.manual_seed(3)
        torch.testing.assert_close(router_noise(like), a, rtol=0, atol=1.5e-6)
    torch.manual_seed(3)
    noise64 = router_noise(like.double())
    assert noise64.dtype == torch.float64
    torch.testing.assert_close(noise64, a.double(), rtol=0, atol=1.5e-6)


def test_router_noise_off_the_cpu_is_randn_and_leaves_the_cpu_generator_alone():
    state = torch.get_rng_state()
    noise = router_noise(torch.zeros(3, 8, device="meta"))
    assert noise.device.type == "meta" and noise.shape == (3, 8)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("fused", [True, False])
def test_the_topk_router_draws_its_noise_from_the_stream(fused):
    # both of TopKRouter's paths (the native fused one, and the ATen one that Batch Prioritized Routing takes)
    options = {"noise_std": 0.5, "batch_priority": not fused}
    layer = MoE(8, 8, 16, k=2, capacity_factor=None, router_options=options).train()
    router = layer.router
    x = torch.randn(2, 24, 8)
    if fused and not router.fused(torch.zeros(1, 1, 8)):
        pytest.skip("no fused router here")
    torch.manual_seed(5)
    gates = router(x).gates
    torch.manual_seed(5)
    noise = counter_normal((2, 24, 8), draw_key())
    with torch.no_grad():
        expected = (router.logits(x) + 0.5 * noise).softmax(-1)
    torch.testing.assert_close(gates, expected, rtol=1e-5, atol=1e-6)
