"""The parameter-free ("option A") residual shortcut as a module whose channel padding can be pruned.

He et al. (CVPR 2016, Sec. 4.2) widen the residual stream of a CIFAR ResNet
without parameters: the shortcut subsamples the stage's input spatially and
appends zero channels, ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))``. Written
inline, the pad amounts are constants of ``forward()`` that pruning cannot
change. Written as :class:`ZeroPadShortcut`, site discovery sees one module
(a leaf of the traced graph) and surgery rebuilds it with fewer zero channels
(:func:`subprune.surgery.prune_site_`): the residual channels of stage s lie at
``front .. front + C_in - 1`` of stage s + 1 and are pruned together with them;
the zero channels before and after are pruned as their own coupled sites.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ZeroPadShortcut(nn.Module):
    """x -> zero-pad(x[:, :, ::stride, ::stride]) along channels: ``front`` zeros, x, ``back`` zeros.

    Parameters
    ----------
    stride : int
        Spatial subsampling step (2 at a stage transition, 1 for none).
    front, back : int
        Zero channels before and after the input's channels (>= 0).

    Input (N, C, H, W) -> output (N, front + C + back, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, stride: int = 2, front: int = 0, back: int = 0):
        super().__init__()
        for label, value in (("stride", stride), ("front", front), ("back", back)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if label == "stride" else 0):
                raise ValueError(f"ZeroPadShortcut: {label}={value!r} must be an integer >= "
                                 f"{1 if label == 'stride' else 0}")
        self.stride, self.front, self.back = stride, front, back

    def forward(self, x: Tensor) -> Tensor:
        s = self.stride
        return F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, self.front, self.back))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, front={self.front}, back={self.back}"
