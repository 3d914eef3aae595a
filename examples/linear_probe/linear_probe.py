"""A linear probe: multinomial logistic regression on the frozen backbone's L2-normalised image
features (the evaluation view of the few-shot train images), full-batch Adam, no text encoder.
An example of a method that lives outside the harness: see README "Add your method"."""

import torch
import torch.nn.functional as F

from methods import ImageSet, Method, Task, register
from methods.hparams import Param


@register
class LinearProbe(Method):
    name = "linear_probe"
    paper = "Radford et al., Learning Transferable Visual Models From Natural Language Supervision, ICML 2021 (linear probe)"
    deviations = "full-batch Adam with a fixed weight decay instead of L-BFGS with a C search on val"
    defaults = {"steps": 300, "lr": 0.01, "weight_decay": 1e-4, "scale": 10.0}
    schema = {"steps": Param(int, ge=1), "lr": Param(float, gt=0), "weight_decay": Param(float, ge=0), "scale": Param(float, gt=0)}
    uses_shots = True
    open_vocabulary = False  # a head over the training classes only

    def fit(self, task: Task) -> None:
        x = self.hp["scale"] * task.frozen_features(task.train)  # [N, D], cached per sweep
        y = task.train.labels.to(task.device)
        self.head = torch.nn.Linear(x.shape[1], len(task.classnames)).to(task.device)
        opt = torch.optim.Adam(self.head.parameters(), lr=self.hp["lr"], weight_decay=self.hp["weight_decay"])
        for _ in range(self.hp["steps"]):
            loss = F.cross_entropy(self.head(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    @torch.no_grad()
    def predict(self, task: Task, images: ImageSet, classnames: list[str] | None = None) -> torch.Tensor:
        return self.head(self.hp["scale"] * task.frozen_features(images))

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.head.parameters()) if hasattr(self, "head") else 0
