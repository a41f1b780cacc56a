"""Closed-form models for the diffusion tests: Gaussian and two-component Gaussian-mixture data.

For x0 ~ N(mu, s0^2 I) and x_t = alpha x0 + sigma eps the exact posterior mean is
E[x0 | x_t] = mu + k (x_t - alpha mu), k = alpha s0^2 / (alpha^2 s0^2 + sigma^2), which gives the exact
eps / x0 / v / score. The probability-flow ODE in y = x/alpha, s = sigma/alpha is affine:
y(s) = mu + (y(s') - mu) sqrt(s0^2 + s^2) / sqrt(s0^2 + s'^2).
"""
from __future__ import annotations

import math

import torch

from nndiff.diffusion.parameterization import from_x0_eps
from nndiff.diffusion._tensor import per_sample


def _coefs(process, t_net, x):
    alpha, sigma = process.alpha_sigma_from_model_time(t_net)
    return per_sample(alpha.to(x.device), x), per_sample(sigma.to(x.device), x)


class GaussianModel:
    """Exact network output for data x0 ~ N(mu, std^2 I) (``mu`` broadcast against the sample)."""

    def __init__(self, process, parameterization, mu, std):
        self.process, self.parameterization = process, parameterization
        self.mu, self.std = mu, float(std)
        self.calls = 0

    def posterior_mean(self, x, alpha, sigma):
        v0 = self.std**2
        k = alpha * v0 / (alpha**2 * v0 + sigma**2)
        return self.mu + k * (x - alpha * self.mu)

    def __call__(self, x, t_net, cond=None):
        self.calls += 1
        alpha, sigma = _coefs(self.process, t_net, x)
        x0 = self.posterior_mean(x, alpha, sigma)
        eps = (x - alpha * x0) / sigma
        return from_x0_eps(x0, eps, alpha.flatten(), sigma.flatten(), self.parameterization)

    def ode_map(self, x, coef_from, coef_to):
        """Exact PF-ODE transport of x from (alpha, sigma) = coef_from to coef_to (alpha > 0)."""
        (a0, s0), (a1, s1) = coef_from, coef_to
        y = x / a0
        ratio = math.sqrt(self.std**2 + (s1 / a1) ** 2) / math.sqrt(self.std**2 + (s0 / a0) ** 2)
        return a1 * (self.mu + (y - self.mu) * ratio)

    def marginal_sample(self, shape, coef, generator, dtype=torch.float64):
        alpha, sigma = coef
        z = torch.randn(shape, generator=generator, dtype=dtype)
        return alpha * self.mu + math.sqrt(alpha**2 * self.std**2 + sigma**2) * z


class MixtureModel:
    """Exact output for iid pixels from sum_k w_k N(mu_k, s_k^2) (two or more components)."""

    def __init__(self, process, parameterization, weights, means, stds):
        self.process, self.parameterization = process, parameterization
        self.w = torch.tensor(weights, dtype=torch.float64)
        self.m = torch.tensor(means, dtype=torch.float64)
        self.s = torch.tensor(stds, dtype=torch.float64)

    def posterior_mean(self, x, alpha, sigma):
        shape = (-1,) + (1,) * x.ndim
        w, m, s = self.w.view(shape), self.m.view(shape), self.s.view(shape)
        var = alpha**2 * s**2 + sigma**2
        logp = torch.log(w) - 0.5 * (x - alpha * m) ** 2 / var - 0.5 * torch.log(var)
        resp = torch.softmax(logp, dim=0)
        comp = m + alpha * s**2 / var * (x - alpha * m)
        return (resp * comp).sum(dim=0)

    def __call__(self, x, t_net, cond=None):
        alpha, sigma = _coefs(self.process, t_net, x)
        x0 = self.posterior_mean(x, alpha, sigma)
        eps = (x - alpha * x0) / sigma
        return from_x0_eps(x0, eps, alpha.flatten(), sigma.flatten(), self.parameterization)

    def marginal_sample(self, shape, coef, generator):
        alpha, sigma = coef
        k = torch.multinomial(self.w, math.prod(shape), replacement=True, generator=generator).view(shape)
        z = torch.randn(shape, generator=generator, dtype=torch.float64)
        return alpha * self.m[k] + torch.sqrt(alpha**2 * self.s[k] ** 2 + sigma**2) * z
