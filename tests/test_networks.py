"""Scoring networks that are not the zoo's architecture: TorchScript, torch.export, --model-def."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from detector.cli import main
from modelzoo.architectures import build_model
from tests.test_detector import STRONG, WEAK, real_zoo  # noqa: F401  (a fixture, used by name)


class DeeperNet(nn.Module):
    """A user's network of another layout: four padded convolutions, global pooling, own names."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                    nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                    nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


class GreyNet(nn.Module):
    """Takes one grey channel: the battery's colour images do not fit it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.out = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(x).mean(dim=(2, 3)))


def train_deeper(mnist, sigma2: float) -> DeeperNet:
    """The user's own loop on their own draw of ColoredMNIST (pool B, 2,048 digits, SGD)."""
    from modelzoo.datasets import load_imageset

    data = load_imageset(mnist, "colored_mnist", "train", sigma2, "B", seed=0)
    generator = torch.Generator().manual_seed(3)
    rows = torch.randperm(len(data.labels), generator=generator)[:2048].numpy()
    images, targets = torch.as_tensor(data.images[rows]).float() / 255, torch.as_tensor(data.labels[rows])
    torch.manual_seed(3)
    model = DeeperNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        for batch in torch.randperm(len(targets), generator=generator).split(32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[batch]), targets[batch]).backward()
            optimizer.step()
    return model.eval()


@pytest.mark.slow
def test_a_probe_detector_judges_networks_of_another_architecture(real_zoo: Path, mnist, tmp_path: Path,  # noqa: F811
                                                                   capsys) -> None:
    det = tmp_path / "det"
    assert main(["detector", "train", str(real_zoo), "--out", str(det), "--detector", "probe",
                 "--target", "biased"]) == 0
    capsys.readouterr()
    example = torch.zeros(1, 3, 28, 28)
    p_biased = {}
    for sigma2 in (STRONG, WEAK):
        model = train_deeper(mnist, sigma2)
        weights, script, program = (tmp_path / f"{sigma2}{end}" for end in (".pt", "_script.pt", ".pt2"))
        torch.save(model.state_dict(), weights)
        torch.jit.trace(model, example).save(str(script))
        torch.export.save(torch.export.export(model, (example,)), str(program))

        assert main(["score", str(weights), "--detector", str(det), "--json",
                     "--model-def", "tests.test_networks:DeeperNet"]) == 0
        defined = json.loads(capsys.readouterr().out)
        assert defined["arch"] == "tests.test_networks:DeeperNet" and defined["probability"] is None
        assert defined["ood"]["in_distribution"] is False
        assert defined["ood"]["reasons"] == ["uncalibrated architecture: a tests.test_networks:DeeperNet, "
                                             "which the detector's zoo (digit-cnn) does not hold"]
        assert set(defined["percentiles"]) == {"biased", "unbiased"} and 0 < defined["agreement"] <= 1
        p_biased[sigma2] = defined["uncalibrated"]["probability"]

        assert main(["score", str(script), str(program), "--detector", str(det), "--json"]) == 0
        kinds = ("TorchScript", "torch.export")
        for line, kind in zip(capsys.readouterr().out.splitlines(), kinds, strict=True):
            compiled = json.loads(line)
            assert compiled["arch"] == f"{kind} program" and compiled["verdict"] in ("biased", "unbiased")
            assert "compiled graph" in compiled["ood"]["reasons"][1]
            assert 0 <= compiled["percentiles"]["biased"] <= 100
    # what it does still ranks the colour-driven network above the shape-driven one
    assert p_biased[STRONG] > p_biased[WEAK], p_biased

    untrained = tmp_path / "untrained.pt"  # the zoo's own architecture, never trained
    torch.save(build_model("digit-cnn", 0.5).state_dict(), untrained)
    assert main(["score", str(untrained), "--detector", str(det), "--json"]) == 0
    empty = json.loads(capsys.readouterr().out)
    assert empty["ood"]["in_distribution"] is False and empty["ood"]["task_accuracy"]["barely_learned"]
    assert empty["ood"]["reasons"][0].startswith("it has barely learned its task: it answers")

    grey = tmp_path / "grey.pt"
    torch.save(GreyNet().state_dict(), grey)
    assert main(["score", str(grey), "--detector", str(det), "--model-def",
                 "tests.test_networks:GreyNet"]) == 2
    assert "does not take the battery's 3×28×28 images" in capsys.readouterr().out
    boosting = tmp_path / "boosting"
    assert main(["detector", "train", str(real_zoo), "--out", str(boosting), "--detector", "boosting",
                 "--target", "biased"]) == 0
    capsys.readouterr()
    assert main(["score", str(weights), "--detector", str(boosting), "--model-def",
                 "tests.test_networks:DeeperNet"]) == 2
    assert "only a probe detector judges a network" in capsys.readouterr().out
