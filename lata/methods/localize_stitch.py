"""Localize-and-Stitch (He et al., 2024), its data-free variant ("Dataless Localize-and-Stitch"):
localize each expert to the top ``density`` fraction of its vector by magnitude, then stitch the
localized values together, averaging where the experts' regions overlap.

  kept_k = v_k where |v_k| >= t_k, else 0    (t_k: the k-th largest |v_k| of the tensor,
                                              k = ceil(density * n); TIES's trim)
  u_k    = lambda_k kept_k
  delta  = sum_k u_k / max(c, 1),   c = #{k : u_k != 0} at that position.

Decisions:
- The localization is per tensor, as TIES trims (the paper and MergeBench select over the whole
  model's vector, embeddings left out); the keep count is ceil(density * n), as TIES's, where
  MergeBench's code takes floor(sparsity * n). Values tied with the threshold are all kept.
- The overlap count c is the number of experts whose kept value is non-zero there: the paper's
  stitching weight 1 / (the number of masks holding) for a mask that holds where the expert
  changes the weights. (MergeBench's copy of the stitcher adds the intersection with the last
  other expert only; it agrees with the paper for two experts.)
- lambda_k scales expert k's stitched value (the paper has no lambda: lambda_k = 1).
- Default ``density`` 0.1: MergeBench's ``sparsity`` for the data-free variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from lata.methods import MergeMethod, merge_method, summed
from lata.methods.ties import trim
from lata.registry import in_range
from lata.selection import keep_count


def stitched(us: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_k u_k divided, where more than one u_k is non-zero, by their number (in place in the
    first u_k)."""
    count = None
    for u in us:
        c = torch.ne(u, 0).to(u.dtype)
        count = c if count is None else count.add_(c)
    return summed(us).div_(count.clamp_(min=1.0))


@merge_method("localize_stitch")
@dataclass(frozen=True)
class LocalizeStitch(MergeMethod):
    """Dataless Localize-and-Stitch: keep the ``density`` fraction of each v_k by magnitude (per
    tensor), lambda-scale, sum, and divide by the number of experts kept at each position."""

    density: float = 0.1
    consensus: ClassVar = staticmethod(stitched)

    def check(self):
        in_range("merge.density", self.density, 0.0, 1.0, low_open=True)

    def prepare(self, vectors, lams, experts, tensor, thresholds=None):
        """Each expert's magnitude threshold: its k-th largest |v| in the tensor."""
        return vectors.kth_largest_magnitudes(keep_count(vectors.shape.numel(), self.density))

    def kept(self, v, threshold, start, stop):
        return trim(v, threshold)
