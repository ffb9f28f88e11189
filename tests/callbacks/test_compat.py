"""The callback drop-in on Lightning code written the way users write it, with either Lightning package.

A table of styles (module with and without ``forward``, dict and ``(x, y, idx)`` batches, a validation
loop, gradient accumulation, manual optimization, an iterable dataset with ``max_steps``, bf16 on CPU,
functional ReLUs with a reused ReLU module, ResNet-18- and MobileNetV2-shaped models), each run by a
real ``Trainer`` of every installed Lightning package. Each asserts that probe records exist for every
site at every expected step, and that the recorded bits, labels and sample ids equal an independent
recomputation: the saved weights of each step run through a fresh copy of the module with the test's
own hooks, packed with ``np.packbits``. Then every setup mistake of the issue: fit raises before the
first optimizer step, with a message that names the fix.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import logging
import shutil
import textwrap
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from actpat.callbacks import ActivationPatternCallback
from actpat.recorder import open_run

PACKAGES = [name for name in ("lightning.pytorch", "pytorch_lightning") if importlib.util.find_spec(name.split(".")[0])]
N_PROBE = 12
BATCH = 8


@pytest.fixture(params=PACKAGES)
def package(request) -> str:
    return request.param


# ---------------------------------------------------------------------- networks (plain torch)
class SmallCNN(nn.Module):
    """Conv + BatchNorm + ReLU, a dense ReLU, Dropout after the last site."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(64, 10), nn.ReLU(), nn.Dropout(0.3), nn.Linear(10, 3))

    def forward(self, x):
        return self.head(self.features(x))


class FunctionalBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.conv2(h) + x)


class FunctionalNet(nn.Module):
    """Blocks that call ``F.relu``/``torch.relu``, and one ReLU module reused after the stem and every block."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.act = nn.ReLU()
        self.blocks = nn.ModuleList([FunctionalBlock(width), FunctionalBlock(width)])
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.act(self.stem(x))
        for block in self.blocks:
            x = self.act(block(x))
        return self.pool(x).flatten(1)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: one in-place ReLU module called twice."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18Shaped(nn.Module):
    """ResNet-18's topology (stem, max-pool, 4 stages of 2 BasicBlocks, avg-pool, fc) at width 4."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [width, 2 * width, 4 * width, 8 * width]
        c_in, stages = width, []
        for i, c_out in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(c_in, c_out, 1 if i == 0 else 2), BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def conv_bn_relu6(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        layers = [conv_bn_relu6(c_in, hidden, 1)] if expand != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, c_out, 1, bias=False),
                   nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2Shaped(nn.Module):
    """MobileNetV2's topology (ConvBNReLU6 stem, inverted residuals, 1x1 head, dropout + linear), tiny widths."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        layers, c_in = [conv_bn_relu6(3, 8, stride=2)], 8
        for expand, c_out, repeats, stride in ((1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 1)):
            for i in range(repeats):
                layers.append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, expand))
                c_in = c_out
        layers.append(conv_bn_relu6(c_in, 32, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


# ---------------------------------------------------------------------- LightningModules of each package
@cache
def modules(package: str) -> dict[str, type]:
    """The LightningModule styles, as subclasses of ``package``'s LightningModule."""
    pl = importlib.import_module(package)

    class Base(pl.LightningModule):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class WithForward(Base):
        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("loss", loss)
            return loss

    class WithoutForward(Base):
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss, prog_bar=True)
            self.log_dict({"epoch_seen": float(self.current_epoch), "step_seen": float(self.trainer.global_step)})
            return loss

    class DictBatches(WithForward):
        def training_step(self, batch, batch_idx):
            assert isinstance(batch["names"], list)
            return F.cross_entropy(self(batch["pixels"]), batch["target"])

    class WithIndex(WithForward):
        def training_step(self, batch, batch_idx):
            x, y, idx = batch
            return F.cross_entropy(self(x), y) + 0 * idx.sum()

    class WithValidation(WithForward):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    class Manual(Base):
        def __init__(self, net: nn.Module) -> None:
            super().__init__(net)
            self.automatic_optimization = False

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 2)]

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            self.toggle_optimizer(opt)

            def closure():  # the forward runs inside the optimizer's step
                loss = F.cross_entropy(self.net(batch[0]), batch[1])
                opt.zero_grad()
                self.manual_backward(loss)
                self.clip_gradients(opt, gradient_clip_val=1.0)
                self.log("loss", loss)
                return loss

            opt.step(closure=closure)
            self.untoggle_optimizer(opt)
            self.lr_schedulers().step()
            self.trainer.should_stop = self.trainer.should_stop  # a write, ignored on the probe copy

    class Hinge(Base):
        """Root forward calls ``F.relu``; the multi-class hinge loss in training_step calls it too."""

        def __init__(self, net: nn.Module) -> None:
            super().__init__(net)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(F.relu(self.net(x) - 0.1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            scores = self(x)
            correct = scores.gather(1, y[:, None])
            return F.relu(1 + scores - correct).sum(1).mean()

    return {cls.__name__: cls for cls in (WithForward, WithoutForward, DictBatches, WithIndex, WithValidation, Manual, Hinge)}


# ---------------------------------------------------------------------- data
def images(n: int, shape=(1, 4, 4), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 3, (n,), generator=g)


class ImageSet(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.x, self.y = images(n, seed=seed)

    def __len__(self):
        return len(self.y)


class DictSet(ImageSet):
    """Dict samples with keys the callback does not know, a string and an index."""

    def __getitem__(self, i):
        return {"pixels": self.x[i], "target": self.y[i], "names": f"sample-{i}", "index": i}


class UnknownLabelKeySet(ImageSet):
    """Dict samples whose labels sit under a key the callback does not know."""

    def __getitem__(self, i):
        return {"pixels": self.x[i], "cls": self.y[i]}


class IndexedSet(ImageSet):
    def __getitem__(self, i):
        return self.x[i], self.y[i], i


class Stream(IterableDataset):
    """An iterable training set without ``__len__`` (the epoch length is unknown)."""

    def __init__(self, n: int = 64) -> None:
        self.x, self.y = images(n)

    def __iter__(self):
        return zip(self.x, self.y)


# ---------------------------------------------------------------------- the test's own truth
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6)
_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.Tensor.relu: "relu", F.relu6: "relu6"}


class Taps(TorchFunctionMode):
    """Every ReLU-family pre-activation of a forward of ``root``, named by the README's site table.

    Its own module hooks and function mode, independent of the library's: a module site is its path
    (``#k`` for the k-th further call in one forward), a functional call made inside a module's forward
    is ``<path>:<fn>#k``, one outside every forward is no site.
    """

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self.paths = {id(m): name for name, m in root.named_modules()}
        self.modules = list(root.modules())
        self.stack: list[nn.Module] = []
        self.calls: Counter = Counter()
        self.z: dict[str, torch.Tensor] = {}

    def __enter__(self):
        self.handles = [m.register_forward_pre_hook(self._pre) for m in self.modules]
        self.handles += [m.register_forward_hook(self._post) for m in self.modules]
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return super().__exit__(*exc)

    def _pre(self, module, args):
        if not self.stack:
            self.calls.clear()
        self.stack.append(module)
        if isinstance(module, _ACTIVATION_MODULES):
            path, k = self.paths[id(module)], self.calls[id(module)]
            self.calls[id(module)] += 1
            self.z[path if k == 0 else f"{path}#{k}"] = args[0].detach().float().clone()

    def _post(self, module, args, output):
        self.stack.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _FUNCTIONS and self.stack and not isinstance(self.stack[-1], _ACTIVATION_MODULES):
            enclosing, name = self.paths[id(self.stack[-1])], _FUNCTIONS[func]
            k = self.calls[(enclosing, name)]
            self.calls[(enclosing, name)] += 1
            self.z[f"{enclosing}:{name}#{k}" if enclosing else f"{name}#{k}"] = args[0].detach().float().clone()
        return func(*args, **(kwargs or {}))


def channel_bits(z: torch.Tensor) -> np.ndarray:
    on = (z > 0).cpu().numpy()
    if on.ndim > 2:
        on = np.moveaxis(on, 1, -1).reshape(-1, on.shape[1])
    return np.packbits(on, axis=1, bitorder="little")


def patterns(module: nn.Module, call, batches: list[torch.Tensor], *, bf16: bool = False) -> dict[str, np.ndarray]:
    """Channel bits of every site over ``batches``, each batch one forward (BatchNorm sees that batch)."""
    parts: dict[str, list] = {}
    with torch.no_grad():
        for x in batches:
            with Taps(module) as taps, torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                call(module, x)
            for site, z in taps.z.items():
                parts.setdefault(site, []).append(channel_bits(z))
    return {site: np.concatenate(p) for site, p in parts.items()}


class SaveWeights:
    """Weights at every optimizer step, and the inputs of the training batches of every step."""

    def __init__(self) -> None:
        self.weights: dict[int, dict] = {}
        self.batches: dict[int, list] = {}

    def callback(self, package: str):
        pl = importlib.import_module(package)
        saver = self

        class Saver(pl.Callback):
            def on_train_start(self, trainer, pl_module):
                saver.weights[trainer.global_step] = copy.deepcopy(pl_module.state_dict())

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                saver.batches.setdefault(trainer.global_step, []).append(batch)
                saver.weights.setdefault(trainer.global_step, copy.deepcopy(pl_module.state_dict()))

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                saver.weights[trainer.global_step] = copy.deepcopy(pl_module.state_dict())

        return Saver()


class OptimizerSteps:
    """Counts optimizer steps, to show that a setup mistake stops fit before the first."""

    def __init__(self, package: str) -> None:
        pl = importlib.import_module(package)
        self.count = 0
        counter = self

        class Counter_(pl.Callback):
            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                counter.count += 1

        self.callback = Counter_()


def trainer(package: str, root: Path, callbacks: list, **options) -> Any:
    pl = importlib.import_module(package)
    kwargs = dict(
        max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=root, accelerator="cpu", devices=1, num_sanity_val_steps=0,
    )
    kwargs.update(options)
    return pl.Trainer(callbacks=callbacks, **kwargs)


# ---------------------------------------------------------------------- the table of styles
@dataclass
class Style:
    module: str
    net: Callable[[], nn.Module]
    train: Callable[[], Any]  # the training DataLoader
    probe: Callable[[], Dataset]
    probe_x: Callable[[Dataset], torch.Tensor]  # the probe set's inputs, in order
    probe_y: Callable[[Dataset], torch.Tensor]
    probe_steps: list[int]
    callback: dict = field(default_factory=dict)
    fit: dict = field(default_factory=dict)
    call: Callable = staticmethod(lambda module, x: module(x))  # what the probe runs, for the truth
    batch_steps: Optional[list[int]] = None  # with batch mode: steps and samples per recorded step
    batch_samples: int = BATCH
    batch_xy: Callable[[Any], tuple] = staticmethod(lambda batch: (batch[0], batch[1]))
    sites: Optional[list[str]] = None  # the site names, written out by hand where the naming is the point
    after_fit: Optional[Callable[[Any], bool]] = None  # what the probe must not have changed on the real side


def _tensors(n: int, seed: int, shape=(1, 4, 4)) -> TensorDataset:
    return TensorDataset(*images(n, shape, seed))


def _loader(dataset, **kwargs) -> DataLoader:
    return DataLoader(dataset, batch_size=BATCH, **kwargs)


_TENSOR_PROBE = dict(probe=lambda: _tensors(N_PROBE, 1), probe_x=lambda d: d.tensors[0], probe_y=lambda d: d.tensors[1])
_RGB_PROBE = dict(probe=lambda: _tensors(N_PROBE, 1, (3, 8, 8)), probe_x=lambda d: d.tensors[0], probe_y=lambda d: d.tensors[1])
_NET_CALL = staticmethod(lambda module, x: module.net(x))

STYLES = {
    "forward": Style(
        "WithForward", SmallCNN, lambda: _loader(_tensors(32, 0), shuffle=True), **_TENSOR_PROBE,
        probe_steps=[0, 2, 4, 6, 8], callback=dict(batch_every_n_steps=3), batch_steps=[0, 3, 6],
    ),
    "no_forward": Style(
        "WithoutForward", SmallCNN, lambda: _loader(_tensors(32, 0), shuffle=True), **_TENSOR_PROBE,
        probe_steps=[0, 2, 4, 6, 8], call=_NET_CALL, callback=dict(probe_mode="eval"),
    ),
    "dict_batches": Style(
        "DictBatches", SmallCNN, lambda: _loader(DictSet(32, 0), shuffle=True), probe=lambda: DictSet(N_PROBE, 1),
        probe_x=lambda d: d.x, probe_y=lambda d: d.y, probe_steps=[0, 2, 4, 6, 8],
        callback=dict(inputs_from=lambda batch: batch["pixels"], batch_every_n_steps=4), batch_steps=[0, 4],
        batch_xy=lambda batch: (batch["pixels"], batch["target"]),
    ),
    "tuple_with_index": Style(
        "WithIndex", SmallCNN, lambda: _loader(IndexedSet(32, 0), shuffle=True), probe=lambda: IndexedSet(N_PROBE, 1),
        probe_x=lambda d: d.x, probe_y=lambda d: d.y, probe_steps=[0, 3, 6, 8], callback=dict(probe_every=3),
    ),
    "validation_loop": Style(
        "WithValidation", SmallCNN, lambda: _loader(_tensors(32, 0), shuffle=True), **_TENSOR_PROBE,
        probe_steps=[0, 2, 4, 6, 8], callback=dict(batch_every_n_steps=2), batch_steps=[0, 2, 4, 6],
        fit=dict(val_check_interval=0.5, limit_val_batches=2),
    ),
    "gradient_accumulation": Style(
        "WithForward", SmallCNN, lambda: _loader(_tensors(32, 0), shuffle=True), **_TENSOR_PROBE,
        probe_steps=[0, 1, 2, 3, 4], callback=dict(batch_every_n_steps=2), batch_steps=[0, 2],
        batch_samples=2 * BATCH, fit=dict(accumulate_grad_batches=2),
    ),
    "manual_optimization": Style(
        "Manual", SmallCNN, lambda: _loader(_tensors(32, 0), shuffle=True), **_TENSOR_PROBE,
        probe_steps=[0, 2, 4, 6, 8], call=_NET_CALL, callback=dict(batch_every_n_steps=4), batch_steps=[0, 4],
        after_fit=lambda model: model.lr_schedulers().last_epoch == 8 and not model.trainer.should_stop,
    ),
    "iterable_max_steps": Style(
        "WithForward", SmallCNN, lambda: _loader(Stream()), **_TENSOR_PROBE,
        probe_steps=[0, 2, 4, 6], callback=dict(probe_every=2), fit=dict(max_steps=6, max_epochs=-1),
    ),
    "bf16_mixed": Style(
        "WithForward", SmallCNN, lambda: _loader(_tensors(32, 0), shuffle=True), **_TENSOR_PROBE,
        probe_steps=[0, 2, 4, 6, 8], fit=dict(precision="bf16-mixed"),
    ),
    "functional_and_reused_relu": Style(
        "Hinge", FunctionalNet, lambda: _loader(_tensors(32, 0), shuffle=True), **_TENSOR_PROBE,
        probe_steps=[0, 2, 4, 6, 8], callback=dict(batch_every_n_steps=4), batch_steps=[0, 4],
        sites=["net.act", "net.blocks.0:relu#0", "net.blocks.0:relu#1", "net.act#1", "net.blocks.1:relu#0",
               "net.blocks.1:relu#1", "net.act#2", "relu#0"],
    ),
    "resnet18_shaped": Style(
        "WithForward", ResNet18Shaped, lambda: _loader(_tensors(32, 0, (3, 8, 8)), shuffle=True), **_RGB_PROBE,
        probe_steps=[0, 2, 4], fit=dict(max_epochs=1), callback=dict(probe_mode="eval"),
    ),
    "mobilenetv2_shaped": Style(
        "WithoutForward", MobileNetV2Shaped, lambda: _loader(_tensors(32, 0, (3, 8, 8)), shuffle=True), **_RGB_PROBE,
        probe_steps=[0, 2, 4], call=_NET_CALL, fit=dict(max_epochs=1),
    ),
}


def _fit_style(style: Style, package: str, root: Path, callbacks: list, **fit_options):
    torch.manual_seed(0)
    model = modules(package)[style.module](style.net())
    trainer(package, root, callbacks, **{**style.fit, **fit_options}).fit(model, style.train())
    return model


def _truth_module(model: nn.Module, weights: dict, mode: str, device: str = "cpu") -> nn.Module:
    module = copy.deepcopy(model).to(device)
    module.load_state_dict(weights)
    module.train(mode == "train")
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            sub.eval()
    return module


@pytest.mark.parametrize("name", list(STYLES))
def test_style_records_every_site_at_every_step_exactly(name, package, tmp_path):
    _check_style(name, package, tmp_path)


@pytest.mark.parametrize("name", ["no_forward", "manual_optimization"])
def test_style_without_a_probe_copy_records_exactly_and_trains_bit_identically(name, tmp_path):
    """The probe runs on the module itself (its `training_step` too): nothing of training may change."""
    package = PACKAGES[0]
    model = _check_style(name, package, tmp_path / "probed", probe_copy=False)
    plain = _fit_style(STYLES[name], package, tmp_path / "plain", [])
    for (key, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "name, probe_copy",
    [("forward", True), ("forward", False), ("no_forward", False), ("dict_batches", True),
     ("functional_and_reused_relu", False), ("bf16_mixed", True), ("resnet18_shaped", False)],
)
def test_style_on_a_gpu_records_exactly_and_trains_bit_identically(name, probe_copy, package, tmp_path, monkeypatch):
    """The fit on a GPU: records against the truth computed on the same GPU, training unchanged."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # the same kernels for fit and truth
    model = _check_style(name, package, tmp_path / "probed", device="cuda", probe_copy=probe_copy)
    plain = _fit_style(STYLES[name], package, tmp_path / "plain", [], accelerator="gpu")
    for (key, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), key


def _check_style(name: str, package: str, tmp_path: Path, device: str = "cpu", **options) -> Any:
    """Fit a style with the callback on ``device``; every record must equal the truth from the saved weights,
    computed on the same device."""
    style = STYLES[name]
    probe = style.probe()
    cb = ActivationPatternCallback(probe=probe, **{"probe_every": 0.5, "live_stats": False, **style.callback, **options})
    saver = SaveWeights()
    accelerator = {"accelerator": "gpu"} if device == "cuda" else {}
    model = _fit_style(style, package, tmp_path, [cb, saver.callback(package)], **accelerator)
    run = open_run(cb.run_dir)
    assert run.losses == []  # every step of several records (probe batches, micro-batches) ends on disk
    x, y = style.probe_x(probe), style.probe_y(probe)
    batches = [x[i : i + BATCH].to(device) for i in range(0, len(x), BATCH)]  # the default probe batch: BATCH
    bf16 = style.fit.get("precision") == "bf16-mixed"
    mode = style.callback.get("probe_mode", "train")
    truth_sites = None
    for step in style.probe_steps:
        truth = patterns(_truth_module(model, saver.weights[step], mode, device), style.call, batches, bf16=bf16)
        truth_sites = truth_sites or list(truth)
        assert sorted(run.sites) == sorted(truth), (step, run.sites)
        for site, bits in truth.items():
            assert run.steps(site, "probe").tolist() == style.probe_steps, site
            p = run.read(site, step, "probe")
            np.testing.assert_array_equal(p.bits, bits, err_msg=f"{name}: {site} at step {step}")
            positions = len(bits) // N_PROBE
            np.testing.assert_array_equal(p.sample_ids, np.repeat(np.arange(N_PROBE), positions))
            np.testing.assert_array_equal(p.labels, np.repeat(y.numpy(), positions))
    if style.sites is not None:
        assert sorted(truth_sites) == sorted(style.sites)
    if style.after_fit is not None:
        assert style.after_fit(model)
    if style.batch_steps is None:
        assert "train" not in run.splits
        return model
    for step in style.batch_steps:
        module = _truth_module(model, saver.weights[step], "train", device)
        inputs, labels = zip(*(style.batch_xy(batch) for batch in saver.batches[step]))
        labels = [label.cpu() for label in labels]
        assert sum(map(len, labels)) == style.batch_samples  # every micro-batch of the step
        truth = patterns(module, style.call, list(inputs))
        assert sorted(run.sites) == sorted(truth)
        for site, bits in truth.items():
            assert run.steps(site, "train").tolist() == style.batch_steps, site
            p = run.read(site, step, "train")
            np.testing.assert_array_equal(p.bits, bits, err_msg=f"{name}: training batch, {site} at step {step}")
            positions = len(bits) // style.batch_samples
            np.testing.assert_array_equal(p.labels, np.repeat(torch.cat(labels).numpy(), positions))
    return model


@pytest.mark.parametrize("style", ["gradient_accumulation", "manual_optimization"])
def test_a_fit_that_dies_in_the_middle_of_a_step_leaves_that_step_reported(style, package, tmp_path):
    """With several batches per optimizer step (or steps the module takes itself), a step is whole only once
    the optimizer has stepped: a fit that dies after its first micro-batch leaves it reported incomplete."""
    calls = []

    class Dies(modules(package)[STYLES[style].module]):
        def training_step(self, batch, batch_idx):
            calls.append(batch_idx)
            loss = super().training_step(batch, batch_idx)
            if len(calls) == 6:  # after the second micro-batch of step 2; after step 5 of the manual style
                raise RuntimeError("the process dies here")
            return loss

    cb = ActivationPatternCallback(batch_every_n_steps=1)
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="the process dies here"):
        trainer(package, tmp_path, [cb], **STYLES[style].fit).fit(Dies(SmallCNN()), STYLES[style].train())
    run = open_run(cb.run_dir)
    last = 2 if style == "gradient_accumulation" else 5
    assert run.steps(run.sites[0], "train").tolist() == list(range(last + 1))
    assert {(loss.step, loss.kind) for loss in run.losses} == {(last, "incomplete")}
    for step in range(last + 1):  # the steps before are whole, the last is flagged
        assert (run.read(run.sites[0], step, "train").lost_records > 0) == (step == last)


def test_a_step_the_fit_ends_in_without_an_optimizer_step_is_whole(package, tmp_path):
    """Manual optimization stepping every second batch, over 3 batches: the fit ends after batch 2's forward,
    which no optimizer step follows; the fit ended normally, so that step is whole."""

    class EverySecond(modules(package)["Manual"]):
        def training_step(self, batch, batch_idx):
            self.manual_backward(F.cross_entropy(self.net(batch[0]), batch[1]))
            if batch_idx % 2:
                self.optimizers().step()
                self.optimizers().zero_grad()

    cb = ActivationPatternCallback(batch_every_n_steps=1)
    trainer(package, tmp_path, [cb], max_epochs=1).fit(EverySecond(SmallCNN()), _loader(_tensors(24, 0)))
    run = open_run(cb.run_dir)
    assert run.losses == []
    assert run.steps(run.sites[0], "train").tolist() == [0, 1]
    rows = [len(run.read(run.sites[0], step, "train").labels) for step in (0, 1)]
    assert rows[0] == 2 * rows[1] > 0  # two batches, then one


def test_fast_dev_run_records_under_the_root_directory(package, tmp_path, monkeypatch):
    """fast_dev_run's stand-in logger has no directory (trainer.log_dir is None): the callback failed in setup
    with a bare TypeError; it records under default_root_dir, as with logger=False."""
    monkeypatch.chdir(tmp_path)
    net = SmallCNN()
    seen: list[np.ndarray] = []
    net.features[2].register_forward_pre_hook(lambda module, args: seen.append(channel_bits(args[0])))
    cb = ActivationPatternCallback(batch_every_n_steps=1)
    fit = trainer(package, tmp_path / "root", [cb], logger=True, fast_dev_run=True)
    fit.fit(modules(package)["WithForward"](net), _loader(_tensors(24, 0)))
    assert cb.run_dir == tmp_path / "root" / "activation_patterns"
    run = open_run(cb.run_dir)
    assert run.steps("net.features.2", "train").tolist() == [0]
    np.testing.assert_array_equal(run.read("net.features.2", 0, "train").bits, seen[0])


def test_resume_with_ckpt_path_continues_the_schedule_exactly(package, tmp_path):
    pl = importlib.import_module(package)
    style = STYLES["forward"]
    probe = style.probe()
    options = dict(probe=probe, probe_every=3, batch_every_n_steps=2, live_stats=False)
    saver = SaveWeights()
    first = ActivationPatternCallback(**options)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    _fit_style(style, package, tmp_path, [first, saver.callback(package), checkpoints], max_epochs=1,
               enable_checkpointing=True)
    ckpt = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    assert ckpt.exists()
    second = ActivationPatternCallback(**options)
    torch.manual_seed(0)
    model = modules(package)["WithForward"](style.net())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer(package, tmp_path, [second, saver.callback(package)], max_epochs=2).fit(model, style.train(), ckpt_path=ckpt)
    assert not [w for w in seen if "where this fit resumes" in str(w.message)]  # the end-of-fit probe is at step 4
    assert second.run_dir == first.run_dir
    run = open_run(second.run_dir)
    batches = [probe.tensors[0][i : i + BATCH] for i in range(0, N_PROBE, BATCH)]
    for step in (0, 3, 4, 6, 8):  # the end of the first fit (4) is recorded once; the second fit goes on
        truth = patterns(_truth_module(model, saver.weights[step], "train"), style.call, batches)
        for site, bits in truth.items():
            assert run.steps(site, "probe").tolist() == [0, 3, 4, 6, 8]
            assert run.steps(site, "train").tolist() == [0, 2, 4, 6]
            np.testing.assert_array_equal(run.read(site, step, "probe").bits, bits, err_msg=f"{site} at {step}")
    # Resumed once more from that checkpoint, now older than the run: the second fit's records after it
    # are kept (never twice), and said so for both splits.
    third = ActivationPatternCallback(**options)
    with pytest.warns(UserWarning) as caught:
        trainer(package, tmp_path, [third], max_epochs=2).fit(
            modules(package)["WithForward"](style.net()), style.train(), ckpt_path=ckpt
        )
    notes = " ".join(str(w.message) for w in caught)
    assert "probe records at 2 steps after step 4, where this fit resumes: steps 6, 8," in notes
    assert "train records at 1 step after step 4, where this fit resumes: step 6," in notes
    again = open_run(third.run_dir)
    assert all(again.steps(site, "probe").tolist() == [0, 3, 4, 6, 8] for site in again.sites)
    # A resumed fit's first probe ran before the checkpoint; a mistake is still caught before its first step.
    wrong = ActivationPatternCallback(**options, sites=["net.head.9"])
    _fails_before_the_first_step(package, tmp_path, wrong, r"\['net.head.9'\] is not.*probe on its first batch", ckpt, 3)


def _fails_before_the_first_step(package, root, callback, match, ckpt_path, max_epochs) -> None:
    """A fit of the "forward" style resumed from ``ckpt_path`` raises ``match`` before any optimizer step."""
    style = STYLES["forward"]
    steps = OptimizerSteps(package)
    with pytest.raises(ValueError, match=match):
        trainer(package, root, [callback, steps.callback], max_epochs=max_epochs).fit(
            modules(package)["WithForward"](style.net()), style.train(), ckpt_path=ckpt_path
        )
    assert steps.count == 0


def test_a_resume_whose_checkpoint_has_no_state_of_the_callback_says_so(package, tmp_path):
    """Other arguments, another state key: the checkpoint's state is not this callback's, which starts afresh."""
    pl = importlib.import_module(package)
    style = STYLES["forward"]
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    first = ActivationPatternCallback(out_dir=tmp_path / "a", batch_every_n_steps=2)
    _fit_style(style, package, tmp_path, [first, checkpoints], max_epochs=1, enable_checkpointing=True)
    changed = ActivationPatternCallback(out_dir=tmp_path / "b", batch_every_n_steps=3)
    with pytest.warns(UserWarning, match=r"holds no state of this callback under its key .*records as a new fit"):
        trainer(package, tmp_path, [changed], max_epochs=2).fit(
            modules(package)["WithForward"](style.net()), style.train(), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
        )
    same = ActivationPatternCallback(out_dir=tmp_path / "a", batch_every_n_steps=2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer(package, tmp_path, [same], max_epochs=2).fit(
            modules(package)["WithForward"](style.net()), style.train(), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
        )
    assert not [w for w in seen if "holds no state" in str(w.message)]
    # Into the directory the checkpoint's fit wrote, the changed callback would pool its records with that
    # fit's: it fails before training, naming the likely cause, and so does a new fit there.
    for ckpt_path, cause in ((tmp_path / "ckpt" / "epoch=0-step=4.ckpt", "holds no state of this callback"),
                             (None, "this is a new fit")):  # fmt: skip
        wrong = ActivationPatternCallback(out_dir=tmp_path / "a", batch_every_n_steps=3)
        match = rf"hold no train records at or after step \d+.*{cause}.*another `out_dir`"
        _fails_before_the_first_step(package, tmp_path, wrong, match, ckpt_path, 2)


def test_a_resumed_fit_reads_its_run_once_and_warns_of_each_loss_once(package, tmp_path, caplog):
    """The training side and the prober of a resumed fit share one open of the run it continues: a damaged
    record is warned of once, not once per reader."""
    import h5py

    from actpat.recorder import schema

    pl = importlib.import_module(package)
    style = STYLES["forward"]
    options = dict(out_dir=tmp_path / "run", probe=style.probe(), probe_every=3, batch_every_n_steps=1, live_stats=False)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    _fit_style(style, package, tmp_path, [ActivationPatternCallback(**options), checkpoints], max_epochs=1,
               enable_checkpointing=True)
    (shard,) = (tmp_path / "run").glob("*.h5")
    site = open_run(tmp_path / "run").sites[0]
    with h5py.File(shard, "r+") as handle:
        records = handle["sites"][schema.site_key(site)]["records"]
        row = records[0]
        row["nan_count"] += 1  # fails its checksum
        records[0] = row
    with caplog.at_level(logging.WARNING, logger="actpat"):
        trainer(package, tmp_path, [ActivationPatternCallback(**options)], max_epochs=2).fit(
            modules(package)["WithForward"](style.net()), style.train(), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
        )
    messages = [r.getMessage() for r in caplog.records]
    skipped = [m for m in messages if m.startswith(f"actpat: skipping records of {shard}")]
    incomplete = [m for m in messages if m.startswith("actpat: records lost in split 'probe', 1 incomplete step(s)")]
    losses = open_run(tmp_path / "run").losses
    assert sorted(loss.kind for loss in losses) == ["corrupt", "incomplete"]  # the row, and the step it belonged to
    assert len(skipped) == len(incomplete) == 1, messages  # once each, though the fit reads the run more than once


def test_a_resume_names_training_records_its_checkpoint_has_that_never_reached_the_disk(package, tmp_path):
    pl = importlib.import_module(package)
    style = STYLES["forward"]
    options = dict(out_dir=tmp_path / "run", batch_every_n_steps=1)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    _fit_style(style, package, tmp_path, [ActivationPatternCallback(**options), checkpoints], max_epochs=1,
               enable_checkpointing=True)
    # As if the last records of that fit (steps 2 and 3) had died with its process: only steps 0-1 are on disk.
    shutil.rmtree(tmp_path / "run")
    _fit_style(style, package, tmp_path, [ActivationPatternCallback(**options)], max_steps=2)
    with pytest.warns(UserWarning, match=r"recorded train records at steps 2, 3 \(its checkpoint says so\), but .* "
                                         r"holds none there: they never reached the disk"):
        trainer(package, tmp_path, [ActivationPatternCallback(**options)], max_epochs=2).fit(
            modules(package)["WithForward"](style.net()), style.train(), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
        )


def test_a_resumed_batch_only_fit_checks_its_sites_before_its_first_step(package, tmp_path):
    """The resumed fit's first batches were recorded by the fit it resumes: checked all the same, recording nothing."""
    pl = importlib.import_module(package)
    options = dict(out_dir=tmp_path / "run", batch_every_n_steps=1, probe=None, live_stats=False)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=2)
    torch.manual_seed(0)
    trainer(package, tmp_path, [ActivationPatternCallback(**options), checkpoints], max_steps=6,
            enable_checkpointing=True).fit(modules(package)["WithForward"](SmallCNN()), _loader(_tensors(32, 0)))
    ckpt = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    steps = OptimizerSteps(package)
    wrong = ActivationPatternCallback(**options, sites=["net.features.2", "net.head.0"])
    with pytest.raises(ValueError, match=r"\['net.head.0'\] is not.*first training batch"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the note that the run holds records after step 2
            trainer(package, tmp_path, [wrong, steps.callback], max_steps=8).fit(
                modules(package)["WithForward"](SmallCNN()), _loader(_tensors(32, 0)), ckpt_path=ckpt
            )
    assert steps.count == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before  # nothing written
    fixed = ActivationPatternCallback(**options, sites=["net.features.2"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(package, tmp_path, [fixed], max_steps=8).fit(
            modules(package)["WithForward"](SmallCNN()), _loader(_tensors(32, 0)), ckpt_path=ckpt
        )
    assert open_run(tmp_path / "run").steps("net.features.2", "train").tolist() == list(range(8))


class _VmapNet(nn.Module):
    """Its activation runs inside torch.func.vmap, which the recorder refuses to record (a clear error)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 3)

    def forward(self, x):
        return torch.func.vmap(lambda row: F.relu(self.lin(row)))(x.flatten(1))


def test_a_check_only_first_batch_does_not_count_as_recording_that_worked(package, tmp_path):
    """A resumed fit whose first batch is only checked still stops at a failure of its first recorded
    batch, whatever `on_error` says: recording has not worked once in this fit."""
    pl = importlib.import_module(package)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=4)
    torch.manual_seed(0)
    trainer(package, tmp_path, [checkpoints], max_steps=4, enable_checkpointing=True).fit(
        modules(package)["WithForward"](_VmapNet()), _loader(_tensors(32, 0))
    )
    steps = OptimizerSteps(package)
    cb = ActivationPatternCallback(out_dir=tmp_path / "run", batch_every_n_steps=3, probe=None, live_stats=False)
    with pytest.raises(RuntimeError, match=r"recording the first training batch at step 6 failed.*torch.func"):
        trainer(package, tmp_path, [cb, steps.callback], max_steps=12).fit(
            modules(package)["WithForward"](_VmapNet()), _loader(_tensors(32, 0)),
            ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt",
        )
    assert steps.count == 2  # steps 4 (its batch checked) and 5; stopped at 6, the first recorded batch


def test_single_callback_not_in_a_list_and_its_checkpoint_key(package, tmp_path):
    """Each package's Trainer wraps a lone callback only if it is that package's Callback."""
    pl = importlib.import_module(package)
    cb = ActivationPatternCallback(batch_every_n_steps=2, live_stats=False)
    assert isinstance(cb, pl.Callback)
    torch.manual_seed(0)
    model = modules(package)["WithForward"](SmallCNN())
    fit_trainer = trainer(package, tmp_path, cb, max_epochs=1)
    fit_trainer.fit(model, _loader(_tensors(32, 0)))
    assert open_run(cb.run_dir).steps("net.features.2", "train").tolist() == [0, 2]
    fit_trainer.save_checkpoint(tmp_path / "last.ckpt")
    stored = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"][cb.state_key]
    assert stored["last_batch_step"] == 2 and stored["run_dir"] == str(cb.run_dir)


# ---------------------------------------------------------------------- LightningCLI and TensorBoard
_CLI_MODULE = """\
import torch
from torch.utils.data import TensorDataset


class ProbeSet(TensorDataset):
    def __init__(self, n: int = 12):
        g = torch.Generator().manual_seed(1)
        super().__init__(torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
"""


@pytest.mark.usefixtures("every_probe_gets_statistics")
def test_lightning_cli_class_path_and_tensorboard_layout(package, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl = importlib.import_module(package)
    cli_module = importlib.import_module(f"{package}.cli")
    (tmp_path / "compat_probe_set.py").write_text(_CLI_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))

    class Model(modules(package)["WithForward"]):
        def __init__(self) -> None:
            super().__init__(SmallCNN())

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return _loader(_tensors(32, 0), shuffle=True)

    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""\
        trainer:
          max_epochs: 1
          accelerator: cpu
          enable_progress_bar: false
          enable_model_summary: false
          enable_checkpointing: false
          default_root_dir: {tmp_path}
          callbacks:
            - class_path: actpat.callbacks.ActivationPatternCallback
              init_args:
                probe:
                  class_path: compat_probe_set.ProbeSet
                probe_every: 0.5
                batch_every_n_steps: 2
        """))
    cli = cli_module.LightningCLI(Model, Data, args=["fit", "--config", str(config)], save_config_callback=None)
    cb = [c for c in cli.trainer.callbacks if isinstance(c, ActivationPatternCallback)]
    assert len(cb) == 1
    logger = cli.trainer.logger
    assert isinstance(logger, importlib.import_module(f"{package}.loggers").TensorBoardLogger)
    run = open_run(cb[0].run_dir)
    assert run.steps("net.features.2", "probe").tolist() == [0, 2, 4]
    assert run.steps("net.features.2", "train").tolist() == [0, 2]
    events = EventAccumulator(logger.log_dir).Reload()
    assert [e.step for e in events.Scalars("actpat/entropy/net.head.1")] == [0, 2, 4]
    event_files = [p for p in Path(logger.log_dir).iterdir() if p.name.startswith("events")]
    assert b"custom_scalars" in b"".join(p.read_bytes() for p in event_files)


# ---------------------------------------------------------------------- setup mistakes: raise before step 1
class SwappedSet(TensorDataset):
    """Items in another order: ``(label, image)``."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return y, x


class FloatLabels(TensorDataset):
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x, y.float() / 3


class SoftLabels(TensorDataset):
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x, torch.full((3,), 1 / 3)


def _no_site_module(package: str) -> type:
    pl = importlib.import_module(package)

    class NoForwardNoModules(pl.LightningModule):
        """training_step computes with bare parameters: no module forward runs at all."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 16))

        def training_step(self, batch, batch_idx):
            return F.relu(F.linear(batch[0].flatten(1), self.weight)).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return NoForwardNoModules


def _tanh_module(package: str) -> type:
    class TanhOnly(modules(package)["WithForward"]):
        def __init__(self) -> None:
            super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)))

    return TanhOnly


def _bad_training_step_module(package: str) -> type:
    class DictInTrainingStep(modules(package)["WithoutForward"]):
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch["image"]), batch["label"])

    return DictInTrainingStep


MISTAKES = {
    # name: (model factory, training loader, callback options, expected message)
    "dict_probe_with_other_keys": (
        lambda p: modules(p)["WithForward"](SmallCNN()), None, dict(probe=DictSet(N_PROBE, 1)), r"inputs_from",
    ),
    "dict_probe_with_an_unknown_label_key": (
        lambda p: modules(p)["WithForward"](SmallCNN()), None,
        dict(probe=UnknownLabelKeySet(N_PROBE, 1), inputs_from=lambda batch: batch["pixels"]),
        r"labels of a dict batch under one of the keys.*\['pixels', 'cls'\].*labels_from=lambda batch: batch\[KEY\]",
    ),
    "iterable_dataset_with_float_probe_every": (
        lambda p: modules(p)["WithForward"](SmallCNN()), lambda: _loader(Stream()),
        dict(probe=_tensors(N_PROBE, 1), probe_every=0.5), r"int `probe_every`",
    ),
    "probe_items_in_another_order": (
        lambda p: modules(p)["WithForward"](SmallCNN()), None, dict(probe=SwappedSet(*images(N_PROBE, seed=1))),
        r"shape \(8, 1, 4, 4\) from batch\[1\].*labels_from",
    ),
    "probe_items_in_another_order_without_labels": (
        lambda p: modules(p)["WithForward"](SmallCNN()), None,
        dict(probe=SwappedSet(*images(N_PROBE, seed=1)), labels_from=lambda batch: None),
        r"module\(inputs\).*Tensor\[8\] int64.*inputs_from.*probe_forward",
    ),
    "float_labels": (
        lambda p: modules(p)["WithForward"](SmallCNN()), None, dict(probe=FloatLabels(*images(N_PROBE, seed=1))),
        r"float labels \(torch.float32\) of shape \(8,\) from batch\[1\].*labels_from",
    ),
    "soft_labels": (
        lambda p: modules(p)["WithForward"](SmallCNN()), None, dict(probe=SoftLabels(*images(N_PROBE, seed=1))),
        r"shape \(8,\) or one-hot \(8, K\), but got shape \(8, 3\).*labels_from",
    ),
    "labels_of_another_length": (
        lambda p: modules(p)["WithForward"](SmallCNN()), None,
        dict(probe=_tensors(N_PROBE, 1), labels_from=lambda batch: batch[1][:3]), r"8 for this batch.*shape \(3,\)",
    ),
    "float_labels_in_training_batches": (
        lambda p: modules(p)["WithForward"](SmallCNN()), None,
        dict(batch_every_n_steps=1, labels_from=lambda batch: batch[1].float()), r"float labels.*labels_from",
    ),
    "sites_filter_matches_nothing": (
        lambda p: modules(p)["WithForward"](SmallCNN()), None, dict(probe=_tensors(N_PROBE, 1), sites="layer*"),
        r"sites='layer\*'.*\['net.features.2', 'net.head.1'\]",
    ),
    "named_site_does_not_exist": (
        lambda p: modules(p)["WithForward"](SmallCNN()), None,
        dict(probe=_tensors(N_PROBE, 1), sites=["net.features.2", "net.head.0"]),
        r"\['net.head.0'\] is not.*\['net.features.2', 'net.head.1'\]",
    ),
    "named_site_does_not_exist_batch_mode": (
        lambda p: modules(p)["WithForward"](SmallCNN()), None, dict(batch_every_n_steps=1, sites=["net.head.1", "relu"]),
        r"\['relu'\] is not.*first training batch.*\['net.features.2', 'net.head.1'\]",
    ),
    "no_module_forward_runs": (
        lambda p: _no_site_module(p)(), None, dict(probe=_tensors(N_PROBE, 1)), r"none ran inside a module forward.*probe_forward",
    ),
    "no_activation_site": (
        lambda p: _tanh_module(p)(), None, dict(probe=_tensors(N_PROBE, 1)), r"module_types=",
    ),
    "training_step_cannot_take_the_probe_batch": (
        lambda p: _bad_training_step_module(p)(SmallCNN()), lambda: _loader(DictSet(32, 0)),
        dict(probe=_tensors(N_PROBE, 1)), r"training_step\(batch, 0\).*does not override `forward`.*probe_forward=",
    ),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_setup_mistake_raises_before_the_first_optimizer_step(name, tmp_path):
    package = PACKAGES[0]
    make_model, make_loader, options, message = MISTAKES[name]
    options = {"live_stats": False, **options}
    steps = OptimizerSteps(package)
    cb = ActivationPatternCallback(**options)
    torch.manual_seed(0)
    fit_trainer = trainer(package, tmp_path, [cb, steps.callback])
    loader = make_loader() if make_loader else _loader(_tensors(32, 0), shuffle=True)
    with pytest.raises((ValueError, RuntimeError), match=message) as error:
        fit_trainer.fit(make_model(package), loader)
    assert steps.count == 0, error.value
    assert fit_trainer.global_step == 0
    assert not list(tmp_path.rglob("*.h5*")), "a setup mistake wrote records"


@pytest.mark.parametrize("mode", ["batch", "probe"])
def test_a_sites_mistake_leaves_out_dir_for_the_corrected_run(package, mode, tmp_path):
    """A wrong name beside a right one: the first capture's records of the right one are not written."""
    options = dict(out_dir=tmp_path / "run", live_stats=False)
    options.update(dict(batch_every_n_steps=1) if mode == "batch" else dict(probe=_tensors(N_PROBE, 1)))
    wrong = ActivationPatternCallback(**options, sites=["net.features.2", "net.head.0"])
    with pytest.raises(ValueError, match=r"\['net.head.0'\] is not") as error:
        trainer(package, tmp_path, [wrong], max_steps=2).fit(
            modules(package)["WithForward"](SmallCNN()), _loader(_tensors(32, 0))
        )
    assert error.value.__cause__ is None  # said once, not again as its own cause
    assert not list((tmp_path / "run").rglob("*.h5*"))
    fixed = ActivationPatternCallback(**options, sites=["net.features.2", "net.head.1"])
    trainer(package, tmp_path, [fixed], max_steps=2).fit(modules(package)["WithForward"](SmallCNN()), _loader(_tensors(32, 0)))
    split = "train" if mode == "batch" else "probe"
    run = open_run(tmp_path / "run")
    assert sorted(run.sites) == ["net.features.2", "net.head.1"]
    # Batch mode records steps 0 and 1 of max_steps=2; the probe also runs at the end of fit.
    assert run.steps("net.features.2", split).tolist() == ([0, 1] if mode == "batch" else [0, 1, 2])


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(max_observations=0), r"`max_observations` to be an int >= 1, but got 0"),
        (dict(compression="snappy"), r"`compression`.*'snappy'"),
        (dict(probe_values="some"), r"`probe_values`.*'some'"),
        (dict(probe_values=4, probe=None, batch_every_n_steps=1), r"`probe` set for `probe_values=4`"),
        (dict(probe_batch_size=4, probe=DataLoader(_tensors(4, 0), batch_size=2)), r"probe_batch_size=None"),
        (dict(probe_every=0), r"`probe_every`.*but got 0"),
        (dict(probe_every=True), r"`probe_every`.*but got True"),
        (dict(batch_every_n_steps=1.5), r"`batch_every_n_steps` to be an int >= 0, but got 1.5"),
        (dict(probe_mode="test"), r"`probe_mode`.*'test'"),
        (dict(pattern="dense"), r"`pattern`.*'dense'"),
        (dict(on_error="ignore"), r"`on_error`.*'ignore'"),
        (dict(live_stats="yes"), r"`live_stats` to be True or False"),
        (dict(inputs_from="x"), r"`inputs_from` to be None or a callable"),
        (dict(probe_forward=3), r"`probe_forward` to be None or a callable"),
        (dict(module_types=[nn.Tanh, "Tanh"]), r"`module_types`"),
        (dict(sites=[1, 2]), r"`sites`"),
        (dict(out_dir=3), r"`out_dir`"),
        (dict(probe=torch.utils.data.Subset(_tensors(4, 0), [])), r"probe set with at least one sample.*empty"),
        (dict(probe=[torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)]),
         r"list of tensors with shapes \[\(4, 1, 8, 8\), \(4,\)\].*TensorDataset\(inputs, labels\)"),
    ],
)
def test_invalid_arguments_fail_at_construction(options, message):
    options = {"probe": _tensors(4, 0), **options}
    with pytest.raises(ValueError, match=message):
        ActivationPatternCallback(**options)


# ---------------------------------------------------------------------- labels
class OneHotSet(TensorDataset):
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x, F.one_hot(y, 3).float()


def test_one_hot_labels_are_recorded_as_class_indices_and_said_once(tmp_path):
    package = PACKAGES[0]
    x, y = images(N_PROBE, seed=1)
    cb = ActivationPatternCallback(probe=OneHotSet(x, y), probe_every=0.5, live_stats=False)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="one-hot") as record:
        trainer(package, tmp_path, [cb], max_epochs=1).fit(modules(package)["WithForward"](SmallCNN()),
                                                          _loader(_tensors(32, 0)))
    assert sum("one-hot" in str(w.message) for w in record) == 1
    run = open_run(cb.run_dir)
    for step in (0, 2, 4):
        np.testing.assert_array_equal(run.read("net.head.1", step, "probe").labels, y.numpy())


def test_probe_forward_option_replaces_the_default_rule(tmp_path):
    package = PACKAGES[0]
    seen = []

    def probe_forward(module, batch):
        seen.append(type(batch).__name__)
        module.net.features(batch["pixels"])  # only the first site

    cb = ActivationPatternCallback(probe=DictSet(N_PROBE, 1), probe_every=1.0, probe_forward=probe_forward,
                                   live_stats=False)
    torch.manual_seed(0)
    trainer(package, tmp_path, [cb], max_epochs=1).fit(modules(package)["WithForward"](SmallCNN()),
                                                      _loader(_tensors(32, 0)))
    run = open_run(cb.run_dir)
    assert run.sites == ["net.features.2"] and run.steps("net.features.2", "probe").tolist() == [0, 4]
    np.testing.assert_array_equal(run.read("net.features.2", 4, "probe").labels, np.repeat(DictSet(N_PROBE, 1).y.numpy(), 16))
    assert set(seen) == {"dict"}


def test_training_step_run_through_the_modules_call_by_a_strategy_is_not_a_forward(package, tmp_path):
    """DDP and FSDP run training_step through the module's call (Lightning's forward redirection, so that the
    wrapper sees it): a hinge loss's F.relu there was recorded as the root's site `relu#0` under DDP alone."""
    from actpat.recorder import ActivationRecorder

    redirection = importlib.import_module(f"{package}.strategies.strategy")._ForwardRedirection
    lightning = importlib.import_module(package)

    class Hinge(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

        def training_step(self, batch, batch_idx):
            x, y = batch
            scores = self.net(x)
            return F.relu(1 + scores - scores.gather(1, y[:, None])).mean()  # a hinge loss: not a site

    class Wrapper(nn.Module):  # calls the module, as DistributedDataParallel does
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, *args):
            return self.module(*args)

    module = Hinge()
    batch = (torch.randn(5, 4), torch.randint(0, 3, (5,)))
    with ActivationRecorder(module, tmp_path) as recorder, recorder.capture(0):
        redirection()(Wrapper(module), module, "training_step", batch, 0)
    assert open_run(tmp_path).sites == ["net.1"]
