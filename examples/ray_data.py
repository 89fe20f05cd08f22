"""Batch inference with Ray Data: one copy of the model per node, however many actors.

    python examples/ray_data.py

Starts a local Ray, a weightd daemon on every node, publishes a small model once, and runs
``map_batches`` with a pool of actors that each attach it in milliseconds. The same code runs
on a cluster (``ray.init(address="auto")``): every actor finds its own node's daemon.
"""

from __future__ import annotations

import os

import numpy as np
import ray
import torch
from torch import nn

from weightd.client import ray_zerocopy
from weightd.client.ray_zerocopy import ModelWrapper


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))

    def forward(self, x):
        return self.net(x).argmax(-1)


class Predict:
    """A Ray Data UDF, written as for the ray-zerocopy package."""

    def __init__(self, model_wrapper):
        self.model = model_wrapper.load()  # attaches this node's shared copy

    def __call__(self, batch: dict) -> dict:
        with torch.no_grad():
            batch["label"] = self.model(torch.as_tensor(batch["x"], dtype=torch.float32)).numpy()
        batch["pid"] = np.full(len(batch["x"]), os.getpid())
        return batch


def main() -> None:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        print("daemons:", ray_zerocopy.ensure_daemons())
        model = Classifier().eval()
        wrapper = ModelWrapper.from_model(model, mode="actor", name="classifier")

        ds = ray.data.from_items([{"x": np.random.rand(16).astype(np.float32)} for _ in range(256)])
        out = ds.map_batches(
            Predict, fn_constructor_kwargs={"model_wrapper": wrapper}, concurrency=2, batch_size=64
        )
        rows = out.take_all()
        expected = model(torch.as_tensor(np.stack([r["x"] for r in rows]))).numpy()
        assert (np.array([r["label"] for r in rows]) == expected).all()
        print(
            f"{len(rows)} rows labelled by {len({r['pid'] for r in rows})} actors sharing one copy of the "
            "weights"
        )
        wrapper.unload()
    finally:
        ray_zerocopy.shutdown_daemons()
        ray.shutdown()


if __name__ == "__main__":
    main()
