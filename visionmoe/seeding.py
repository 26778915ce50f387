"""The seed rule: every random stream of a run derived from its one ``train.seed``, in one place.

A run is resumable bit for bit because each random draw is a pure function of where it happens, not
of how many draws came before it:

    loader_seed(seed, epoch)         the permutation of an epoch (visionmoe.data.TensorLoader)
    loader_seed(seed, epoch, step+1) the augmentation of one batch
    step_seed(seed, step)            mixup / cutmix of one training step (visionmoe.train.data.BatchMixer)
    rank_seed(seed, rank)            where rank r's global torch RNG starts (dropout, stochastic routing)

The keys are mixed with large odd multipliers so that nearby (epoch, step) pairs, and nearby seeds,
land on distinct generator seeds. The constants are part of every saved run's identity: changing any
of them changes every batch, so a run would no longer resume or reproduce. Streamed (file-decoding)
loaders seed each image by (seed, epoch, index) instead (``visionmoe.data.stream.sample_seed``), so
their batches do not depend on the number of decoding processes.
"""

from __future__ import annotations

SEED_STRIDE = 1_000_003  # a prime: seed s and s+1 start streams a million keys apart
RANK_SEED_STRIDE = SEED_STRIDE  # rank r's training RNG stream starts at seed + r·stride (rank 0: the seed)
_KEY_MULTIPLIERS = (7_919, 104_729)  # the 1000th and 10000th primes: epoch and step keys do not collide


def loader_seed(seed: int, *key: int) -> int:
    """The generator seed of a loader's draw at ``key`` = (epoch,) or (epoch, step), in [0, 2**63).

    >>> loader_seed(0, 1), loader_seed(0, 1, 2), loader_seed(1, 0)
    (7919, 217377, 1000003)
    """
    if len(key) > len(_KEY_MULTIPLIERS):
        raise ValueError(f"a loader key is (epoch,) or (epoch, step), got key={key!r}")
    value = seed * SEED_STRIDE + sum(k * m for k, m in zip(key, _KEY_MULTIPLIERS, strict=False))
    return value % (2**63)


def step_seed(seed: int, step: int) -> int:
    """The seed of training step ``step``'s mixup / cutmix draw (BatchMixer reduces it mod 2**32).

    >>> step_seed(0, 5), step_seed(2, 5)
    (5, 2000011)
    """
    return seed * SEED_STRIDE + step


def rank_seed(seed: int, rank: int) -> int:
    """Where rank ``rank``'s global torch RNG starts; rank 0 (and a one-process run) starts at ``seed``.

    >>> rank_seed(7, 0), rank_seed(7, 3)
    (7, 3000016)
    """
    return seed + RANK_SEED_STRIDE * rank
