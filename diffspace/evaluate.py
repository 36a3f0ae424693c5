"""Sample-quality measures, always next to their noise floor.

* `sliced_wasserstein`: SW2 between two point clouds (Bonneel et al. 2015), the 2-D and
  low-dimensional workhorse; `noise_floor` is the same distance between two independent true
  sample sets of the same size, the value a perfect model would get.
* `DigitsClassifier`: a logistic-regression classifier fit on the real scikit-learn digits; it
  reports how many generated digits it recognises confidently and how the classes are covered.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def sliced_wasserstein(a: Tensor, b: Tensor, n_proj: int = 512, generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance sqrt(E_theta W2^2(theta.a, theta.b)) over random unit directions
    theta (Bonneel et al. 2015; Rabin et al. 2011). a, b: (N, ...) with the same N (flattened per sample);
    in 1-D, W2 between equal-size empirical measures pairs the sorted values."""
    a, b = a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double()
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal-size sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    theta = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(a.device)
    pa, _ = torch.sort(a @ theta, dim=0)
    pb, _ = torch.sort(b @ theta, dim=0)
    return float(((pa - pb) ** 2).mean().sqrt())


def noise_floor(sample_true, n: int, seed: int = 0, n_proj: int = 512) -> float:
    """SW2 between two independent true sample sets of size n: `sample_true(n, generator)`."""
    g1, g2 = torch.Generator().manual_seed(seed + 101), torch.Generator().manual_seed(seed + 202)
    return sliced_wasserstein(sample_true(n, g1), sample_true(n, g2), n_proj)


class DigitsClassifier:
    """Multinomial logistic regression on the real 8x8 digits, scaled as data.load('digits') does
    (x / 8 - 1 in [-1, 1]). Its test accuracy on held-out real digits is in `accuracy`."""

    def __init__(self, seed: int = 0):
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split

        raw = load_digits()
        x = raw.data / 8.0 - 1.0
        xtr, xte, ytr, yte = train_test_split(x, raw.target, test_size=0.25, random_state=seed, stratify=raw.target)
        self.model = LogisticRegression(max_iter=2000, C=1.0).fit(xtr, ytr)
        self.accuracy = float(self.model.score(xte, yte))

    def probabilities(self, images: Tensor):
        """Class probabilities (N, 10) of images (N, 1, 8, 8) in [-1, 1] (clamped)."""
        x = images.detach().float().clamp(-1, 1).reshape(len(images), -1).cpu().numpy()
        return self.model.predict_proba(x)

    def report(self, images: Tensor, threshold: float = 0.8) -> dict:
        """confident: fraction with top probability >= threshold; class_fractions: predicted-class shares."""
        p = self.probabilities(images)
        top = p.argmax(1)
        fractions = [float((top == k).mean()) for k in range(p.shape[1])]
        return {
            "n": len(p),
            "confident": float((p.max(1) >= threshold).mean()),
            "class_fractions": fractions,
            "min_class_fraction": min(fractions),
            "classifier_accuracy": self.accuracy,
        }
