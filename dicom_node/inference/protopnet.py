"""A prototype network ("this looks like that", Chen et al. 2019) for multi-label radiographs.

A small conv backbone (the blocks of :class:`~dicom_node.inference.architectures.CompactCNN`),
add-on 1x1 layers ending in a sigmoid, and a prototype layer: ``per_label`` prototype vectors of
shape (dim, 1, 1) per label. Each prototype is compared with every cell of the feature grid by
squared L2 distance, turned into a similarity ``log((d + 1) / (d + eps))``; the similarity map is
max-pooled over the grid, and a linear layer (the class connection) gives one logit per label
(sigmoid, multi-label). After training, every prototype is projected onto the feature of one
training patch ("push"), so each prototype is a patch of a training image; its identity is
kept next to the weights (``prototypes.json``).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dicom_node.inference.architectures import conv_blocks

EPSILON = 1e-4  # in the similarity log((d + 1) / (d + eps)): its ceiling is log(1 / eps) at d = 0


@dataclass(frozen=True)
class PrototypeOutput:
    """One forward pass, with what an explanation needs.

    Attributes
    ----------
    logits
        (batch, labels).
    distances
        (batch, prototypes, h, w) squared L2 distance of each prototype to each feature cell.
    similarity_maps
        (batch, prototypes, h, w) ``log((d + 1) / (d + eps))``.
    similarities
        (batch, prototypes) the maps' maxima (the max-pooled similarity).
    """

    logits: torch.Tensor
    distances: torch.Tensor
    similarity_maps: torch.Tensor
    similarities: torch.Tensor


def similarity(distances: torch.Tensor) -> torch.Tensor:
    """ProtoPNet's similarity of a squared distance: large near 0, falling towards 0 far away."""
    return torch.log((distances + 1) / (distances + EPSILON))


def _first(value: object) -> int:
    """A layer's kernel size, stride or padding along the first axis (square layers here)."""
    if isinstance(value, int):
        return value
    if isinstance(value, tuple) and value and isinstance(value[0], int):
        return value[0]
    raise ValueError(f"expected an integer size, stride or padding, got {value!r}")


class ProtoPNet(nn.Module):
    """Backbone, add-on layers, prototype layer and class connection.

    Parameters
    ----------
    num_labels
        Outputs (one logit each).
    in_channels
        Input channels (1 for grayscale).
    per_label
        Prototypes of each label; prototype ``j`` belongs to label ``j // per_label``.
    dim
        Channels of the add-on output, and so of each prototype vector.

    Modules are named ``features.conv1`` ... ``features.relu4`` (the CAM layer, a quarter of the
    input side), ``add_on``, ``prototypes`` (a parameter of shape (prototypes, dim, 1, 1)) and
    ``last_layer``. ``prototype_labels`` (a buffer) is the one-hot label of each prototype.
    """

    def __init__(self, num_labels: int, in_channels: int = 1, per_label: int = 5, dim: int = 32,
                 widths: tuple[int, ...] = (8, 16, 32, 64), pools: int = 2) -> None:
        super().__init__()
        if num_labels < 1 or per_label < 1 or dim < 1:
            raise ValueError(f"num_labels, per_label and dim must be positive, "
                             f"got {num_labels}, {per_label}, {dim}")
        self.features = conv_blocks(in_channels, widths, pools)
        self.add_on = nn.Sequential(nn.Conv2d(widths[-1], dim, 1), nn.ReLU(), nn.Conv2d(dim, dim, 1),
                                    nn.Sigmoid())
        count = num_labels * per_label
        self.prototypes = nn.Parameter(torch.rand(count, dim, 1, 1))
        owners = torch.arange(count) // per_label
        self.register_buffer("prototype_labels", F.one_hot(owners, num_labels).float())
        self.last_layer = nn.Linear(count, num_labels)
        self.set_class_connection(-0.5)
        self.per_label = per_label
        self.stride = 2**pools

    prototype_labels: torch.Tensor

    def set_class_connection(self, other: float) -> None:
        """The last layer's weights (1 to a prototype's own label, ``other`` elsewhere), bias 0."""
        with torch.no_grad():
            identity = self.prototype_labels.T
            self.last_layer.weight.copy_(identity + other * (1 - identity))
            self.last_layer.bias.zero_()

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, dim, h, w): the add-on output, one vector per cell of the feature grid."""
        return self.add_on(self.features(x))

    def prototype_distances(self, z: torch.Tensor) -> torch.Tensor:
        """Squared L2 distances (batch, prototypes, h, w) of the prototypes to the cells of ``z``."""
        z2 = (z * z).sum(dim=1, keepdim=True)
        p2 = (self.prototypes * self.prototypes).sum(dim=(1, 2, 3)).view(1, -1, 1, 1)
        return F.relu(z2 - 2 * F.conv2d(z, self.prototypes) + p2)

    def explain(self, x: torch.Tensor) -> PrototypeOutput:
        """The logits with the distance and similarity maps and the pooled similarities."""
        distances = self.prototype_distances(self.patch_features(x))
        maps = similarity(distances)
        pooled = similarity(distances.flatten(2).min(dim=2).values)
        return PrototypeOutput(self.last_layer(pooled), distances, maps, pooled)

    def receptive_field(self) -> tuple[int, int, float]:
        """Side, stride and the first cell's centre (continuous input coordinates, pixel ``i``
        spanning [i, i + 1)) of the input patch each feature cell sees."""
        side, stride, centre = 1, 1, 0.5
        for module in self.features:
            if isinstance(module, nn.Conv2d | nn.MaxPool2d):
                k, s, p = _first(module.kernel_size), _first(module.stride), _first(module.padding)
                side, centre = side + (k - 1) * stride, centre + ((k - 1) / 2 - p) * stride
                stride *= s
        return side, stride, centre

    def patch_box(self, row: int, column: int, size: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), end exclusive, of the input patch that cell (``row``, ``column``)
        sees, clipped to a ``size`` x ``size`` input."""
        side, stride, centre = self.receptive_field()
        half = side / 2

        def span(cell: int) -> tuple[int, int]:
            middle = centre + cell * stride
            return max(0, round(middle - half)), min(size, round(middle + half))

        (x0, x1), (y0, y1) = span(column), span(row)
        return x0, y0, x1, y1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.explain(x).logits
