"""Compares two training runs by the updates they made, not by the parameters they hold.

Tests that a sharded or accumulated step equals the plain one used to compare parameters
after two AdamW steps. That check is at the mercy of the CPU: Adam divides each gradient
by its own running RMS, so an element whose true gradient is ~0 moves by ~lr in a
direction set by round-off, and which round-off depends on the SIMD width (AVX-512 and
AVX2 machines disagreed in the 5th digit of one value kernel). With plain SGD the update
is linear in the gradient, so comparing updates compares the gradients themselves, at a
tolerance that means the same on every machine.
"""

import jax
import numpy as np

# Plain SGD with momentum, constant lr, no weight decay: every update is lr times the
# (clipped, momentum-summed) gradient and nothing else.
SGD_OVERRIDES = [
    "optim.name=sgd",
    "optim.lr=0.5",
    "optim.schedule=constant",
    "optim.warmup_steps=0",
    "optim.weight_decay=0",
]


def assert_same_updates(params, ref_params, init_params, rtol=1e-5, floor=1e-6):
    """Asserts each leaf moved from ``init_params`` by the same amount in both runs.

    Per leaf, with ``d = params - init_params``: ``||d - d_ref|| <= rtol * ||d_ref|| +
    floor * L``, where ``L`` is the largest leaf's ``||d_ref||``. The floor covers leaves
    whose updates are tiny next to the rest and so are fp32 round-off (eps 1.2e-7) summed
    over every token: a norm scale's gradient is such a sum with heavy cancellation (the
    ring-attention run's first MLP norm moved 1.5e-3 of L and differed by 6e-8 of L), and
    GPT-2's key bias has a true gradient of exactly 0 (a constant added to every key's
    logit cancels in the softmax). A wrong gradient differs by the size of the update
    itself, far above both terms.
    """
    init = jax.tree.leaves(init_params)
    leaves = zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), init, strict=True)
    moved = [(np.asarray(p) - p0, np.asarray(r) - p0) for p, r, p0 in leaves]
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(ref_params)]
    largest = max(float(np.linalg.norm(r)) for _, r in moved)
    assert largest > 0, "the reference run did not move any parameter"
    for path, (d, r) in zip(paths, moved, strict=True):
        diff, norm = float(np.linalg.norm(d - r)), float(np.linalg.norm(r))
        assert diff <= rtol * norm + floor * largest, (
            f"{path}: updates differ by {diff:.2e} (norm {norm:.2e}, largest {largest:.2e})"
        )
