"""Per-example moving-average state u_i for Discriminative Fine-Tuning (DFT/DFT2).

The paper's Algorithm 1 (Guo et al., ICML 2025, arXiv 2502.18679) keeps one scalar u_i per
training example: a moving average (eq. 10) of the mini-batch estimates ĝ_i of g_i, updated
only when example i is in the batch:

    u_i ← (1-γ)·u_i + γ·ĝ_i

``LogUTable`` stores log u_i (float64, on CPU) and how often each was updated.
The arithmetic lives in ``dftlite.losses.update_log_u``; this table only looks values
up and writes them back. Typical step:

    log_u_prev, gamma = table.lookup(indices, gamma=0.85)
    loss, new_log_u, metrics = dft_loss(pos, neg, ref, log_u_prev, tau, gamma)
    table.update(indices, new_log_u)

The table changes only through ``update``; evaluation passes should not call it.
"""

import torch

INIT_MODES = ("one", "first_batch")


class LogUTable:
    """log u_i for all n training examples.

    Args:
        num_examples: n, the size of the training set.
        init: "one" sets u_0 = 1 (log u = 0) as in Algorithm 1; "first_batch" makes
            ``lookup`` return γ = 1 for examples never updated, so u_i starts at its
            first mini-batch estimate ĝ_i instead of being pulled towards 1.
    Attributes:
        log_u: (n,) float64, log u_i.
        visits: (n,) int64, number of updates of each example.
    """

    def __init__(self, num_examples, init="one"):
        if not isinstance(num_examples, int) or num_examples <= 0:
            raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
        if init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}")
        self.init = init
        self.log_u = torch.zeros(num_examples, dtype=torch.float64)
        self.visits = torch.zeros(num_examples, dtype=torch.int64)

    def __len__(self):
        return self.log_u.numel()

    def lookup(self, indices, gamma):
        """Previous state and per-example γ for a mini-batch.

        Args:
            indices: (S,) distinct example indices in [0, n); tensor or list of ints.
            gamma: the configured moving-average rate, float in (0, 1].
        Returns:
            log_u_prev: (S,) float64 copy of log u_i.
            gamma: (S,) float64; 1.0 for unvisited examples when init="first_batch".
        """
        if not 0.0 < float(gamma) <= 1.0:
            raise ValueError(f"gamma must lie in (0, 1], got {gamma}")
        index = self._check_indices(indices)
        per_example_gamma = torch.full((index.numel(),), float(gamma), dtype=torch.float64)
        if self.init == "first_batch":
            per_example_gamma[self.visits[index] == 0] = 1.0
        return self.log_u[index], per_example_gamma

    def update(self, indices, new_log_u):
        """Write log u_new for a mini-batch and count the visit.

        Args:
            indices: (S,) distinct example indices, as passed to ``lookup``.
            new_log_u: (S,) the ``new_log_u`` returned by the loss; any device/dtype.
        """
        index = self._check_indices(indices)
        values = torch.as_tensor(new_log_u).detach().to(device="cpu", dtype=torch.float64)
        if values.shape != index.shape:
            raise ValueError(f"new_log_u must have shape {tuple(index.shape)}, got {tuple(values.shape)}")
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"new_log_u must be finite, got {values.tolist()}")
        self.log_u[index] = values
        self.visits[index] += 1

    def state_dict(self):
        """Plain tensors (safetensors-friendly); ``init`` comes from the config."""
        return {"log_u": self.log_u.clone(), "visits": self.visits.clone()}

    def load_state_dict(self, state):
        missing = {"log_u", "visits"} - set(state)
        if missing:
            raise KeyError(f"LogUTable state is missing {sorted(missing)}")
        log_u = torch.as_tensor(state["log_u"]).to(device="cpu", dtype=torch.float64)
        visits = torch.as_tensor(state["visits"]).to(device="cpu", dtype=torch.int64)
        if log_u.shape != self.log_u.shape or visits.shape != self.visits.shape:
            raise ValueError(
                f"LogUTable state has shapes log_u {tuple(log_u.shape)}, visits {tuple(visits.shape)}; "
                f"this table has {len(self)} examples"
            )
        if not bool(torch.isfinite(log_u).all()) or bool((visits < 0).any()):
            raise ValueError("LogUTable state has non-finite log_u or negative visits")
        self.log_u = log_u.clone()
        self.visits = visits.clone()

    def _check_indices(self, indices):
        """(S,) int64 CPU index; no negative wrap-around, no repeats."""
        index = torch.as_tensor(indices).to(device="cpu")
        if index.dim() != 1 or index.dtype == torch.bool or index.is_floating_point():
            raise ValueError(f"indices must be a 1-D integer tensor, got {index.dtype} {tuple(index.shape)}")
        index = index.to(torch.int64)
        if index.numel() and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"indices must lie in [0, {len(self)}), got {index.tolist()}")
        # A repeated index would be looked up twice but written once, silently losing a
        # mini-batch estimate; the sampler should never produce one.
        if index.unique().numel() != index.numel():
            raise ValueError(f"indices must be distinct within a mini-batch, got {index.tolist()}")
        return index
