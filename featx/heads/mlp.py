"""A small torch MLP: standardised features -> one hidden layer with dropout, early-stopped on held-out rows."""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np

from featx import threads
from featx.devices import resolve_device
from .base import Head, class_weights
from .selection import holdout
from .solvers import scaling, softmax

if TYPE_CHECKING:
    import torch

FALLBACK_EPOCHS = 30  # trained for when no held-out row exists to stop early on


def mlp_module(dim: int, hidden: int, classes: int, dropout: float) -> torch.nn.Module:
    """The MLP head as a torch module (its tensors named ``net.1.weight`` ..., as model files store them)."""
    from torch import nn

    return nn.Sequential(OrderedDict(net=nn.Sequential(nn.Dropout(dropout / 2), nn.Linear(dim, hidden), nn.ReLU(),
                                                       nn.Dropout(dropout), nn.Linear(hidden, classes))))


def mlp_arrays(mean: np.ndarray, scale: np.ndarray, state: dict) -> dict:
    """An MLP's scaler and state dict in the flat array form MLPHead stores (dots become '__')."""
    return {"mean": np.asarray(mean, np.float64), "scale": np.asarray(scale, np.float64),
            **{k.replace(".", "__"): v.detach().cpu().numpy() for k, v in state.items()}}


class AdamW:
    """torch's AdamW step (``torch.optim.adamw.adamw``, the function ``torch.optim.AdamW.step`` runs), fused
    where torch has a fused kernel (CPU, CUDA), without the optimiser class, whose construction imports
    torch._dynamo (874 modules) in every fresh process that fits an MLP. Fused, a step of the 1,280 x 512 head
    took 0.39 ms against 4.2 ms one tensor at a time (the class's CPU default). Every parameter has a gradient
    here, which the functional form needs."""

    def __init__(self, params, lr: float, weight_decay: float):
        import torch

        self.params, self.lr, self.weight_decay = list(params), lr, weight_decay
        self.fused = all(p.device.type in ("cpu", "cuda") for p in self.params) or None
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device if self.fused else "cpu")
                      for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        import torch
        from torch.optim.adamw import adamw

        with torch.no_grad():
            adamw(self.params, [p.grad for p in self.params], self.exp_avgs, self.exp_avg_sqs, [], self.steps,
                  fused=self.fused, amsgrad=False, beta1=0.9, beta2=0.999, lr=self.lr,
                  weight_decay=self.weight_decay, eps=1e-8, maximize=False)


class MLPHead(Head):
    """Standardised features -> one hidden layer with dropout, AdamW, early stopping on held-out rows:
    ``cv``'s val rows when it is a split object (``--select-on val``), else ``holdout`` of each class
    that has images to spare. With nothing to hold out it trains ``FALLBACK_EPOCHS`` epochs and says so.
    Seeded; on the GPU when present."""

    kind = "mlp"
    preprocessing = "standardise"

    def __init__(self, hidden: int = 512, dropout: float = 0.5, lr: float = 1e-3, weight_decay: float = 1e-2,
                 max_epochs: int = 200, patience: int = 15, batch_size: int = 64, holdout: float = 0.15,
                 cv=5, device: str = "auto", random_state: int = 0, class_weight: str | None = None):
        self.hidden, self.dropout, self.lr, self.weight_decay = hidden, dropout, lr, weight_decay
        self.max_epochs, self.patience, self.batch_size, self.holdout = max_epochs, patience, batch_size, holdout
        self.cv, self.device, self.random_state, self.class_weight = cv, device, random_state, class_weight

    def fit(self, X, y):
        """Early stopping on the held-out rows picks the number of epochs; the head is then trained afresh on
        every row (train + val under ``--select-on val``) for that many epochs."""
        X, codes = self._fit_data(X, y)
        train, held, how = holdout(self.cv, codes, self.holdout)
        max_epochs = self.max_epochs if len(held) else min(self.max_epochs, FALLBACK_EPOCHS)
        with threads.limited(threads.for_fit(self.kind, *X.shape, self.hidden), uses_torch=True):
            epochs, best, proba = self._train(X, codes, train, held, max_epochs)
            if len(held):
                self._train(X, codes, np.arange(len(X)), np.array([], int), epochs)
        self.held_out_ = (held, proba) if len(held) else None
        self.held_out_right_ = proba.argmax(1) == codes[held] if len(held) else None
        self.selected_ = {"epochs": epochs, "best_holdout_loss": best, "holdout": len(held), "selection": how,
                          "cv_accuracy": float((proba.argmax(1) == codes[held]).mean()) if len(held) else None,
                          "scored_rows": len(held),
                          "refit": f"on all {len(X)} rows for {epochs} epochs" if len(held) else "none"}
        return self

    def _train(self, X, codes, train: np.ndarray, held: np.ndarray, max_epochs: int) -> tuple[int, float | None, np.ndarray]:
        """Train a fresh, seeded MLP on ``train`` rows, standardised on them, for up to ``max_epochs``; with
        ``held`` rows, stop ``patience`` epochs after their loss last improved and keep the best epoch's
        weights. Stores the arrays; returns (epochs kept, best held-out loss, held-out probabilities then)."""
        import torch

        device = resolve_device(self.device)
        torch.manual_seed(self.random_state)
        mean, scale = scaling(X[train])
        Xs = torch.as_tensor((X - mean) / scale, dtype=torch.float32, device=device)
        ys = torch.as_tensor(codes, device=device)
        net = mlp_module(X.shape[1], self.hidden, len(self.classes_), self.dropout).to(device)
        opt = AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        weights = class_weights(self.class_weight, codes[train], list(self.classes_))
        loss_fn = torch.nn.CrossEntropyLoss(weight=None if weights is None else
                                            torch.as_tensor(weights, dtype=torch.float32, device=device))
        generator = torch.Generator().manual_seed(self.random_state)
        train_t, held_t = torch.as_tensor(train, device=device), torch.as_tensor(held, device=device)
        best, best_state, best_epochs, since, best_proba = np.inf, None, 0, 0, None
        for epoch in range(max_epochs):
            net.train()
            order = train_t[torch.randperm(len(train), generator=generator).to(device)]
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                opt.zero_grad()
                loss_fn(net(Xs[batch]), ys[batch]).backward()
                opt.step()
            if not len(held):
                continue
            net.eval()
            with torch.no_grad():
                logits = net(Xs[held_t])
                loss = loss_fn(logits, ys[held_t]).item()
            if loss < best - 1e-4:
                best, best_epochs, since = loss, epoch + 1, 0
                best_proba = torch.softmax(logits.double(), 1).cpu().numpy()
                best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            else:
                since += 1
                if since >= self.patience:
                    break
        if best_state is None:  # nothing held out: the last epoch's weights
            best_epochs, best_state = max_epochs, {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        self.load_arrays(mlp_arrays(mean, scale, best_state))
        return best_epochs, float(best) if len(held) else None, best_proba

    def load_arrays(self, arrays: dict) -> None:
        arrays = dict(arrays)
        self.mean_, self.scale_ = arrays.pop("mean"), arrays.pop("scale")
        self.state_ = {k: np.asarray(v) for k, v in arrays.items()}

    def torch_logits(self, dtype=None) -> torch.nn.Module:
        """Standardisation then the fitted network, features -> logits, in eval mode (the fine-tuning warm start
        trains it; ``dtype``: the standardisation's, float32 by default)."""
        import torch
        from torch import nn

        from .torch_forms import Standardise

        (hidden, dim), classes = self.state_["net__1__weight"].shape, self.state_["net__4__weight"].shape[0]
        net = mlp_module(dim, hidden, classes, self.dropout)
        net.load_state_dict({k.replace("__", "."): torch.as_tensor(v) for k, v in self.state_.items()})
        return nn.Sequential(Standardise(self.mean_, self.scale_, dtype or torch.float32), net).eval()

    def to_torch(self) -> torch.nn.Module:
        """What ``predict_proba`` computes: standardised in float64, the network in float32, softmax in float64."""
        import torch

        from .torch_forms import Cast, probabilities

        standardise, net = self.torch_logits(torch.float64)
        return probabilities(torch.nn.Sequential(standardise, Cast(torch.float32), net, Cast(torch.float64))).eval()

    def predict_proba(self, X) -> np.ndarray:
        """The eval-mode forward pass (dropout off) in float32, as torch computed it in training."""
        x = ((self._data(X) - self.mean_) / self.scale_).astype(np.float32)  # checks fitting and input first
        s = {k: v.astype(np.float32, copy=False) for k, v in self.state_.items()}
        hidden = np.maximum(x @ s["net__1__weight"].T + s["net__1__bias"], 0)
        return softmax((hidden @ s["net__4__weight"].T + s["net__4__bias"]).astype(np.float64))

    def arrays(self) -> dict:
        return {"mean": self.mean_, "scale": self.scale_, **self.state_}
