"""Drafter checkpoints: `config.json` (DrafterConfig) + `model.safetensors`.

Only the drafter's own tensors are written (trainable weights, calibration temperatures and
the draft-vocabulary ids); the frozen embeddings and LM head stay the target's, and loading
attaches the drafter to a live target model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dspark.drafter.config import DrafterConfig
from dspark.drafter.model import Drafter
from dspark.errors import UserError
from dspark.models.transformer import CausalLM
from dspark.paths import repo_root

WEIGHTS_FILE = "model.safetensors"
KEEP_FP32 = ("conf.", "conf_temperature", "conf_offset", "draft_vocab_ids")  # small and precision-sensitive
CALIBRATION = ("conf_temperature", "conf_offset", "conf_temperature_greedy", "conf_offset_greedy")


def default_checkpoint(target_name: str, method: str) -> Path:
    """Shipped checkpoints: dspark/drafter/checkpoints/<target-name>/<dspark|dflash>/."""
    return repo_root() / "dspark" / "drafter" / "checkpoints" / target_name / method


def save_drafter(drafter: Drafter, directory: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, t in drafter.state_dict().items():
        keep = name.startswith(KEEP_FP32) or not t.is_floating_point()
        state[name] = (t if keep else t.to(dtype)).detach().cpu().contiguous()
    save_file(state, str(out / WEIGHTS_FILE))
    drafter.cfg.save(out)
    return out


def load_drafter(directory: str | Path, target: CausalLM, dtype: torch.dtype | None = None) -> Drafter:
    """Build the drafter for `target` from a checkpoint directory (weights cast to `dtype`,
    default the target's dtype; the confidence head stays float32)."""
    path = Path(directory)
    if not (path / WEIGHTS_FILE).is_file():
        raise UserError(f"no drafter checkpoint at {path} (train one with `dspark train`)")
    cfg = DrafterConfig.load(path)
    dtype = dtype or target.lm_head.weight.dtype
    device = target.lm_head.weight.device
    drafter = Drafter(cfg, target)
    load_weights(drafter, load_file(str(path / WEIGHTS_FILE)))
    drafter.to(device=device, dtype=dtype)
    for name in CALIBRATION:
        getattr(drafter, name).data = getattr(drafter, name).float()
    if cfg.confidence_head:
        drafter.conf.float()
    drafter.draft_vocab_ids.data = drafter.draft_vocab_ids.long()
    if cfg.draft_vocab_size is not None and not bool((drafter.draft_vocab_ids.diff() > 0).all()):
        # Greedy drafting breaks argmax ties by the lowest draft index: that is the lowest target
        # id, as over the full vocabulary, only when the ids ascend (training writes them so).
        raise UserError(f"{path}: the draft vocabulary ids must be strictly increasing")
    return drafter.eval().requires_grad_(False)


def load_weights(drafter: Drafter, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load a drafter state dict. States from before calibration offsets get offsets 0; from
    before the greedy calibration, the greedy one starts as a copy of the sampled one.
    `strict=False` admits only missing layers (a drafter grown by layers the state lacks)."""
    state = {"conf_offset": torch.zeros(drafter.cfg.block_size), **state}
    state.setdefault("conf_temperature_greedy", state["conf_temperature"].clone())
    state.setdefault("conf_offset_greedy", state["conf_offset"].clone())
    missing, unexpected = drafter.load_state_dict(state, strict=strict)
    have = {k.split(".")[1] for k in state if k.startswith("layers.")}  # layer indices the state holds
    other = [k for k in missing if not (k.startswith("layers.") and k.split(".")[1] not in have)] + unexpected
    if other:
        raise ValueError(f"drafter state does not match: {other[:8]}")


def save_calibration(directory: str | Path, temperatures: torch.Tensor, offsets: torch.Tensor,
                     greedy: bool = False) -> None:
    """Overwrite the calibration T_1..T_K and offsets b_1..b_K (of greedy or of sampled rounds)
    stored in a checkpoint."""
    file = Path(directory) / WEIGHTS_FILE
    state = load_file(str(file))
    if state["conf_temperature"].shape != temperatures.shape or offsets.shape != temperatures.shape:
        raise ValueError("temperature / offset count does not match the block size")
    state.setdefault("conf_temperature_greedy", state["conf_temperature"].clone())
    state.setdefault("conf_offset_greedy", state.get("conf_offset", torch.zeros_like(temperatures)).clone())
    suffix = "_greedy" if greedy else ""
    state["conf_temperature" + suffix] = temperatures.float().cpu().contiguous()
    state["conf_offset" + suffix] = offsets.float().cpu().contiguous()
    save_file(state, str(file))
