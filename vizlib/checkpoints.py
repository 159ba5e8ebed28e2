"""The bundled checkpoint format: ``<id>.safetensors`` + ``<id>.json`` (metadata) + ``<id>.md`` (card).

Weights are safetensors so loading a checkpoint never executes code. The JSON sidecar says which
registered model (and constructor kwargs) the tensors belong to, so one loader serves every family.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
CHECKPOINT_DIR = ASSETS_DIR / "checkpoints"
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]


@dataclass
class CheckpointInfo:
    """Metadata of one bundled checkpoint (the JSON sidecar)."""

    checkpoint_id: str
    model: str  # registered timm name
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    test_accuracy: float | None = None  # percent, on the data named below
    data: str = ""
    recipe: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None
    wall_time_s: float | None = None
    hardware: str = ""
    seed: int | None = None
    command: str = ""
    notes: str = ""

    @property
    def weights_path(self) -> Path:
        return CHECKPOINT_DIR / f"{self.checkpoint_id}.safetensors"


def save_checkpoint(
    state_dict: dict[str, torch.Tensor], info: CheckpointInfo, out_dir: Path, half: bool = True
) -> Path:
    """Write weights (fp16 floats when ``half``), JSON metadata and a Markdown model card."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in state_dict.items():
        value = value.detach().cpu().contiguous()
        if half and value.is_floating_point():
            value = value.half()
        tensors[key] = value
    weights = out_dir / f"{info.checkpoint_id}.safetensors"
    save_file(tensors, str(weights), metadata={"model": info.model})
    (out_dir / f"{info.checkpoint_id}.json").write_text(json.dumps(asdict(info), indent=2) + "\n")
    (out_dir / f"{info.checkpoint_id}.md").write_text(model_card(info))
    return weights


def model_card(info: CheckpointInfo) -> str:
    accuracy = "not measured" if info.test_accuracy is None else f"{info.test_accuracy:.2f}%"
    minutes = "?" if info.wall_time_s is None else f"{info.wall_time_s / 60:.1f} min"
    recipe = "\n".join(f"- {k}: {_recipe_value(v)}" for k, v in sorted(info.recipe.items())) or "- (none)"
    kwargs = json.dumps(info.model_kwargs) if info.model_kwargs else "{}"
    return f"""# {info.checkpoint_id}

Model `{info.model}` with constructor kwargs `{kwargs}`, bundled with HybridLens as an offline demo.

| | |
|---|---|
| data | {info.data} |
| test accuracy | {accuracy} |
| epochs | {info.epochs} |
| wall time | {minutes} |
| hardware | {info.hardware} |
| seed | {info.seed} |
| classes | {", ".join(info.class_names)} |

## Recipe
{recipe}

## Reproduce
```
{info.command}
```
Check the accuracy with `python scripts/evaluate.py --checkpoint {info.checkpoint_id} --data <CIFAR-10-images>/test`.

{info.notes}
"""


def _recipe_value(value: Any) -> str:
    """An earlier training stage (train.py --init) in one line; its full recipe stays in the JSON."""
    if isinstance(value, dict) and {"checkpoint", "test_accuracy", "epochs"} <= value.keys():
        return (f"{value['checkpoint']} ({value['test_accuracy']}% after {value['epochs']} epochs; "
                "its recipe is in the JSON sidecar)")
    return str(value)


def read_info(path: Path) -> CheckpointInfo:
    raw = json.loads(path.read_text())
    known = {f for f in CheckpointInfo.__dataclass_fields__}
    return CheckpointInfo(**{k: v for k, v in raw.items() if k in known})


def list_checkpoints(directory: Path = CHECKPOINT_DIR) -> list[CheckpointInfo]:
    """Every bundled checkpoint whose weights file is present, sorted by id."""
    infos = [read_info(p) for p in sorted(directory.glob("*.json"))]
    return [i for i in infos if (directory / f"{i.checkpoint_id}.safetensors").exists()]


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load safetensors weights as float32 (bundled files store fp16 to stay small)."""
    tensors = load_file(str(path))
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
