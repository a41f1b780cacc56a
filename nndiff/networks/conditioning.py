"""Class and continuous-metadata conditioning with learned null embeddings (for CFG).

Conventions (also in ``documentation/networks.md``):

- ``class_labels``: ``(B,)`` integer tensor. Index ``num_classes`` is the learned null token;
  :data:`NULL_LABEL` (-1, any negative value) is an alias for it, so code that drops labels
  does not need to know ``num_classes``.
- ``continuous``: ``(B, num_continuous_conditions)`` float tensor. A row containing NaN
  selects the learned null embedding for that sample (NaN = "unknown"; missing metadata in a
  dataset can be passed the same way).
- ``None`` for a conditioning the network has means "null for every sample".
"""
from __future__ import annotations

import torch
from torch import nn

#: Label value that selects the learned null class token (alias of index ``num_classes``).
NULL_LABEL = -1


class ConditionEmbedding(nn.Module):
    """Embeds class labels and continuous metadata into the time-embedding space (summed).

    Both parts are always evaluated, even when every sample is null, so every parameter takes
    part in every step (DDP without ``find_unused_parameters``) and the graph does not depend
    on the data.
    """

    def __init__(self, emb_dim: int, num_classes: int | None, num_continuous: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_continuous = num_continuous
        # Row num_classes is the null token.
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.continuous_mlp: nn.Sequential | None = None
        self.continuous_null: nn.Parameter | None = None
        if num_continuous:
            self.continuous_mlp = nn.Sequential(
                nn.Linear(num_continuous, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
            )
            # Small like the MLP's initial outputs, so null and real metadata start comparable.
            self.continuous_null = nn.Parameter(torch.randn(emb_dim) * 0.02)

    def embed_classes(self, class_labels: torch.Tensor | None, batch_size: int,
                      device: torch.device) -> torch.Tensor:
        """(B, emb_dim) class embedding; ``None`` or negative labels give the null token."""
        assert self.class_embed is not None and self.num_classes is not None
        if class_labels is None:
            class_labels = torch.full((batch_size,), self.num_classes, device=device, dtype=torch.long)
        elif class_labels.shape != (batch_size,):
            raise ValueError(f"class_labels must have shape ({batch_size},), got {tuple(class_labels.shape)}")
        labels = class_labels.long()
        labels = torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels)
        return self.class_embed(labels)

    def embed_continuous(self, continuous: torch.Tensor | None, batch_size: int,
                         device: torch.device) -> torch.Tensor:
        """(B, emb_dim) metadata embedding; ``None`` or a row with NaN gives the null embedding."""
        assert self.continuous_mlp is not None and self.continuous_null is not None
        shape = (batch_size, self.num_continuous)
        if continuous is None:
            continuous = torch.full(shape, float("nan"), device=device)
        elif continuous.shape != shape:
            raise ValueError(f"continuous must have shape {shape}, got {tuple(continuous.shape)}")
        values = continuous.float()
        is_null = torch.isnan(values).any(dim=1, keepdim=True)
        # NaNs are zeroed before the MLP so they cannot reach gradients through torch.where.
        embedded = self.continuous_mlp(torch.nan_to_num(values, nan=0.0))
        return torch.where(is_null, self.continuous_null.to(embedded.dtype), embedded)

    def forward(self, class_labels: torch.Tensor | None, continuous: torch.Tensor | None,
                batch_size: int, device: torch.device) -> torch.Tensor | None:
        """Sum of the configured embeddings, or ``None`` when the network has no conditioning."""
        parts: list[torch.Tensor] = []
        if self.class_embed is not None:
            parts.append(self.embed_classes(class_labels, batch_size, device))
        elif class_labels is not None:
            raise ValueError("class_labels given but the network has no class embedding "
                             "(num_classes is null in the plan)")
        if self.continuous_mlp is not None:
            parts.append(self.embed_continuous(continuous, batch_size, device))
        elif continuous is not None:
            raise ValueError("continuous conditions given but the network has none "
                             "(num_continuous_conditions is 0 in the plan)")
        if not parts:
            return None
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total


def drop_conditions(
    class_labels: torch.Tensor | None,
    continuous: torch.Tensor | None,
    p: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Replace each sample's conditions by the null ones with probability ``p`` (CFG training).

    One Bernoulli draw per sample drops class label *and* metadata together, so the network
    learns a fully unconditional mode for classifier-free guidance. Dropped labels become
    :data:`NULL_LABEL`, dropped metadata rows become NaN. ``p=1`` gives all-null conditions
    (the unconditional half of a batched CFG step). Inputs are not modified. ``generator``
    may live on another device than the tensors (e.g. a CPU generator for CUDA data).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop probability p must be in [0, 1], got {p}")
    reference = class_labels if class_labels is not None else continuous
    if reference is None:
        return None, None
    batch_size = reference.shape[0]
    if class_labels is not None and continuous is not None and continuous.shape[0] != batch_size:
        raise ValueError(f"class_labels has {batch_size} samples but continuous has {continuous.shape[0]}")
    draw_device = generator.device if generator is not None else reference.device
    drop = (torch.rand(batch_size, generator=generator, device=draw_device) < p).to(reference.device)
    if class_labels is not None:
        class_labels = torch.where(drop, torch.full_like(class_labels, NULL_LABEL), class_labels)
    if continuous is not None:
        continuous = torch.where(drop[:, None], torch.full_like(continuous, float("nan")), continuous)
    return class_labels, continuous
