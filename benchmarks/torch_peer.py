"""The PyTorch peers of the seed model, for the GPU benchmarks: eager with cuDNN, and ``torch.compile``.

The same network as ``gpucnn.cli.seed_model`` (NCHW, PyTorch's usual layout), RMSprop with Keras's
settings (lr 1e-3, rho 0.9, epsilon 1e-7 — PyTorch adds epsilon outside the square root, Keras inside),
the whole training set resident on the GPU and shuffled there, metrics accumulated on the GPU and read
once per epoch: the same shape of loop as ``model.fit``. FP32 throughout (TF32 off), as gpucnn.
"""
import time

import numpy as np


def seed_network(torch, side=28):
    nn = torch.nn
    flat = ((((side - 2) // 2 - 2) // 2) - 2) ** 2 * 64
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(flat, 64), nn.ReLU(), nn.Linear(64, 10))


def fp32_settings(torch):
    torch.backends.cudnn.enabled = True
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return {"cudnn.benchmark": True, "cudnn.allow_tf32": False, "cuda.matmul.allow_tf32": False}


class TorchTrainer:
    """One network, its optimizer and a (possibly compiled) training step. ``reset(seed)`` re-initialises
    the weights in place and starts a new optimizer, so a compiled step is reused without recompiling."""

    def __init__(self, torch, side=28, compile_mode=None, device="cuda"):
        self.torch, self.compile_mode, self.device = torch, compile_mode, device
        self.net = seed_network(torch, side).to(device)
        loss_fn = torch.nn.CrossEntropyLoss()
        net = self.net

        def step(xb, yb):
            logits = net(xb)
            return loss_fn(logits, yb), (logits.argmax(1) == yb).sum()

        self._step = torch.compile(step, mode=compile_mode) if compile_mode else step
        self.reset(0)

    def reset(self, seed):
        torch = self.torch
        torch.manual_seed(seed)
        with torch.no_grad():
            for m in self.net.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        self.opt = torch.optim.RMSprop(self.net.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)

    def train_steps(self, x, y, batch, order):
        """One pass over ``order`` (a device permutation); returns (loss sum, correct count) on the device."""
        torch = self.torch
        self.net.train()
        loss_total = torch.zeros((), device=self.device)
        correct_total = torch.zeros((), dtype=torch.int64, device=self.device)
        mark = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            xb, yb = x[idx], y[idx]
            if self.compile_mode and mark is not None:
                mark()
            loss, correct = self._step(xb, yb)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            loss_total += loss.detach() * len(idx)
            correct_total += correct
        return loss_total, correct_total

    def warm_up(self, x, y, batch, n_total):
        """Compile (and autotune cuDNN) for the full batch and for the epoch's last, smaller batch."""
        torch = self.torch
        start = time.perf_counter()
        tail = n_total % batch
        for size in [batch * 3] + ([tail] if tail else []):
            self.train_steps(x, y, batch, torch.arange(size, device=self.device))
        self._sync()
        return time.perf_counter() - start

    def epoch(self, x, y, batch):
        """Wall seconds of one epoch over (x, y) and its training accuracy."""
        torch = self.torch
        self._sync()
        start = time.perf_counter()
        order = torch.randperm(len(x), device=self.device)
        _, correct = self.train_steps(x, y, batch, order)
        accuracy = int(correct) / len(x)  # reads the device: waits for the epoch to finish
        self._sync()
        return time.perf_counter() - start, accuracy

    def _sync(self):
        if self.device != "cpu":
            self.torch.cuda.synchronize()

    def evaluate(self, x, y, batch=1000):
        torch = self.torch
        self.net.eval()
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        with torch.no_grad():
            for i in range(0, len(x), batch):
                correct += (self.net(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()
        return int(correct) / len(x)


def to_device(torch, x, y, device="cuda"):
    """NHWC float32 images and one-hot labels (NumPy) as NCHW and class-index tensors on the GPU."""
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
    yt = torch.from_numpy(np.asarray(y).argmax(1) if np.ndim(y) == 2 else np.asarray(y)).long().to(device)
    return xt, yt
