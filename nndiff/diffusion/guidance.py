"""Guidance as model wrappers: classifier-free guidance and classifier guidance.

A *model function* is ``model_fn(x, t_net, cond) -> output``: the network (plus whatever the task
family wraps around it) evaluated at the noisy sample ``x``, the network time input ``t_net``
(``process.model_time(t)``, one float per sample) and an opaque condition ``cond`` (class labels,
conditioning images, a dict, or None). Both wrappers below are model functions themselves, so they
compose and every sampler honours them.

- Classifier-free guidance (Ho & Salimans 2022): out = out(null) + w (out(cond) - out(null)).
  w = 1 is the conditional model, w = 0 the unconditional one. The combination is affine with
  weights summing to one, so it means the same in eps, x0, v and score space.
- Classifier guidance (Dhariwal & Nichol 2021, Song et al. 2021 Sec. 5): the score gains
  w * grad_x log p(y | x_t); in eps space eps_hat = eps - sigma_t w grad. The gradient comes from
  any callable ``grad_fn(x, t_net, cond) -> tensor``; :func:`grad_of_log_prob` builds one from a
  log-likelihood with autograd.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from nndiff.diffusion._tensor import per_sample
from nndiff.diffusion.options import Parameterization, parse_option
from nndiff.diffusion.parameterization import from_x0_eps, to_x0_eps
from nndiff.diffusion.processes import DiffusionProcess

Tensor = torch.Tensor


class ModelFn(Protocol):
    def __call__(self, x: Tensor, t_net: Tensor, cond: Any) -> Tensor: ...


GradFn = Callable[[Tensor, Tensor, Any], Tensor]


class ClassifierFreeGuidance:
    """Wrap ``model_fn`` with classifier-free guidance of ``scale`` against ``null_cond``.

    ``batched=True`` evaluates conditional and unconditional halves in one call when ``cond`` and
    ``null_cond`` are tensors (concatenated along the batch axis); otherwise two calls are made.
    """

    def __init__(self, model_fn: ModelFn, scale: float, null_cond: Any = None, batched: bool = False):
        self.model_fn = model_fn
        self.scale = float(scale)
        self.null_cond = null_cond
        self.batched = batched

    def __call__(self, x: Tensor, t_net: Tensor, cond: Any) -> Tensor:
        if self.scale == 1.0:
            return self.model_fn(x, t_net, cond)
        if self.scale == 0.0:
            return self.model_fn(x, t_net, self.null_cond)
        if self.batched and isinstance(cond, Tensor) and isinstance(self.null_cond, Tensor):
            both = self.model_fn(torch.cat([x, x]), torch.cat([t_net, t_net]), torch.cat([cond, self.null_cond]))
            out_c, out_u = both.chunk(2)
        else:
            out_c = self.model_fn(x, t_net, cond)
            out_u = self.model_fn(x, t_net, self.null_cond)
        return out_u + self.scale * (out_c - out_u)


class ClassifierGuidance:
    """Wrap ``model_fn`` so that its score includes ``scale * grad_fn(x, t_net, cond)``.

    ``grad_fn`` returns grad_x log p(y | x_t) (same shape as x). The output is converted to
    (x0, eps) with the process coefficients at ``t_net``, eps is shifted by -sigma * scale * grad
    and converted back to ``parameterization``.
    """

    def __init__(
        self,
        model_fn: ModelFn,
        process: DiffusionProcess,
        parameterization: Parameterization | str,
        grad_fn: GradFn,
        scale: float = 1.0,
    ):
        self.model_fn = model_fn
        self.process = process
        self.parameterization = parse_option(Parameterization, parameterization, "parameterization")
        self.grad_fn = grad_fn
        self.scale = float(scale)

    def __call__(self, x: Tensor, t_net: Tensor, cond: Any) -> Tensor:
        out = self.model_fn(x, t_net, cond)
        if self.scale == 0.0:
            return out
        alpha, sigma = self.process.alpha_sigma_from_model_time(t_net)
        grad = self.grad_fn(x, t_net, cond).to(x.dtype)
        _, eps = to_x0_eps(out, x, alpha.to(x.device), sigma.to(x.device), self.parameterization)
        eps = eps - per_sample(sigma, x) * self.scale * grad
        x0 = (x - per_sample(sigma, x) * eps) / per_sample(alpha, x)
        return from_x0_eps(x0, eps, alpha.to(x.device), sigma.to(x.device), self.parameterization)


def grad_of_log_prob(log_prob_fn: Callable[[Tensor, Tensor, Any], Tensor]) -> GradFn:
    """Turn ``log_prob_fn(x, t_net, cond) -> (B,)`` (log p(y | x_t) per sample) into a gradient function."""

    def grad_fn(x: Tensor, t_net: Tensor, cond: Any) -> Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logp = log_prob_fn(xg, t_net, cond)
            (grad,) = torch.autograd.grad(logp.sum(), xg)
        return grad.detach()

    return grad_fn
