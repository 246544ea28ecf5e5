"""Drafter training loop over a target cache.

AdamW (no weight decay), linear warmup then cosine to 0, grad-norm clip, gradient
accumulation. A checkpoint holds everything the next step depends on (weights, optimizer,
scheduler, both RNG states, the data cursor), so a resumed run continues bit-for-bit.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dspark.drafter.checkpoint import load_weights, save_drafter
from dspark.drafter.config import DrafterConfig
from dspark.drafter.model import Drafter
from dspark.errors import UserError
from dspark.models.transformer import CausalLM
from dspark.train.anchors import block_targets, sample_anchors, valid_anchor_positions
from dspark.train.config import TrainConfig
from dspark.train.losses import drafter_loss
from dspark.train.target_cache import TargetCache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STATE_FILE = "state.pt"


def lr_factor(step: int, total: int, warmup_frac: float) -> float:
    """Linear warmup over ceil(warmup_frac * total) steps, then cosine from 1 to 0."""
    warm = math.ceil(warmup_frac * total)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def choose_vocab(cache: TargetCache, vocab_size: int,
                 draft_vocab_size: int | None) -> tuple[int, torch.Tensor | None]:
    """(MASK id, draft vocabulary ids or None). MASK = the highest id never seen in the data;
    the draft vocabulary = the most frequent assistant tokens, sorted by id."""
    seen = cache.token_counts(vocab_size)
    unused = (seen == 0).nonzero().squeeze(1)
    mask_id = int(unused[-1]) if unused.numel() else int(seen.argmin())
    if draft_vocab_size is None or draft_vocab_size >= vocab_size:
        return mask_id, None
    freq = cache.token_counts(vocab_size, masked_only=True)
    order = torch.sort(freq, descending=True, stable=True).indices
    return mask_id, order[:draft_vocab_size].sort().values


class Trainer:
    def __init__(self, cfg: TrainConfig, target: CausalLM, cache: TargetCache) -> None:
        self.cfg, self.target, self.cache = cfg, target.requires_grad_(False), cache
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(cfg.device)
        self.seqs = [i for i in range(len(cache)) if self._has_anchor(i)]
        self.drafter = self._build_drafter().to(self.device, DTYPES[cfg.dtype])
        self.drafter.conf_temperature.data = self.drafter.conf_temperature.float()
        self.drafter.conf_offset.data = self.drafter.conf_offset.float()
        self.opt = torch.optim.AdamW([p for p in self.drafter.parameters() if p.requires_grad],
                                     lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
        per_step = cfg.batch_size * cfg.grad_accum
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(self.seqs) / per_step))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, self.total_steps, cfg.warmup_frac))
        self.anchor_gen = torch.Generator().manual_seed(cfg.seed)
        self.step, self.epoch, self.cursor = 0, 0, 0
        self._order = self._epoch_order(0)

    # -- setup -------------------------------------------------------------------------
    def _has_anchor(self, i: int) -> bool:
        mask = self.cache[i]["loss_mask"]
        return valid_anchor_positions(mask, mask.numel()).numel() > 0

    def _build_drafter(self) -> Drafter:
        if self.cfg.init_from:
            return self._warm_start(Path(self.cfg.init_from))
        cfg, shape = self.cfg, self.cfg.drafter
        mask_id, vocab_ids = choose_vocab(self.cache, self.target.cfg.vocab_size, shape.draft_vocab_size)
        dflash = cfg.method == "dflash"
        dcfg = DrafterConfig.for_target(
            cfg.model, self.target.cfg, taps=self.cache.taps, num_layers=shape.num_layers,
            block_size=shape.block_size, markov_rank=0 if dflash else shape.markov_rank,
            confidence_head=not dflash, gamma=shape.gamma, mask_token_id=mask_id,
            draft_vocab_size=None if vocab_ids is None else vocab_ids.numel())
        torch.manual_seed(cfg.seed)
        drafter = Drafter(dcfg, self.target)
        if vocab_ids is not None:
            drafter.draft_vocab_ids.copy_(vocab_ids)
        return drafter

    def _warm_start(self, run: Path) -> Drafter:
        """The last weights of an earlier run (its fp32 training state, not the bf16 export),
        with its draft vocabulary and MASK id, which must still be unused in this data."""
        path = run / "checkpoint" / STATE_FILE
        if not path.is_file():
            raise UserError(f"init_from: no training checkpoint at {path}")
        st = torch.load(path, weights_only=False)
        dcfg = DrafterConfig.model_validate(st["drafter_config"])
        shape, dflash = self.cfg.drafter, self.cfg.method == "dflash"
        want = (shape.num_layers, shape.block_size, 0 if dflash else shape.markov_rank, not dflash,
                shape.gamma, shape.draft_vocab_size, self.cache.taps)
        got = (dcfg.num_layers, dcfg.block_size, dcfg.markov_rank, dcfg.confidence_head, dcfg.gamma,
               dcfg.draft_vocab_size, dcfg.taps)
        if got != want:
            raise UserError(f"init_from {run}: (layers, K, rank, confidence, gamma, draft vocab, taps) "
                            f"{got} != this config's {want}")
        if self.cache.token_counts(dcfg.vocab_size)[dcfg.mask_token_id] > 0:
            raise UserError(f"init_from {run}: its MASK id {dcfg.mask_token_id} occurs in this data")
        drafter = Drafter(dcfg, self.target)
        load_weights(drafter, st["drafter"])
        return drafter

    def _epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return [self.seqs[i] for i in torch.randperm(len(self.seqs), generator=g).tolist()]

    def _next_indices(self, n: int) -> list[int]:
        picked = []
        while len(picked) < n:
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            picked.append(self._order[self.cursor])
            self.cursor += 1
        return picked

    # -- one step ------------------------------------------------------------------------
    def _micro_batch(self, indices: list[int]) -> dict[str, Any]:
        items = [self.cache[i] for i in indices]
        lengths = [int(it["input_ids"].numel()) for it in items]
        B, S = len(items), max(lengths)
        m, d = items[0]["taps"].shape[1:]
        ids = torch.zeros(B, S, dtype=torch.long)
        mask = torch.zeros(B, S, dtype=torch.long)
        taps = torch.zeros(B, S, m, d, dtype=torch.bfloat16)
        final = torch.zeros(B, S, d, dtype=torch.bfloat16)
        for b, (it, n) in enumerate(zip(items, lengths, strict=True)):
            ids[b, :n], mask[b, :n] = it["input_ids"].long(), it["loss_mask"].long()
            taps[b, :n], final[b, :n] = it["taps"], it["final"]
        anchors = [sample_anchors(mask[b], n, self.cfg.anchors_per_seq, self.anchor_gen)
                   for b, n in enumerate(lengths)]
        blocks = block_targets(ids, mask, lengths, anchors, self.drafter.cfg.block_size)
        return {"ids": ids, "taps": taps, "final": final, "blocks": blocks}

    def _loss(self, mb: dict[str, Any]):
        dev, blocks = self.device, mb["blocks"]
        out = self.drafter.forward_train(mb["taps"].to(dev), mb["ids"].to(dev), blocks.anchors.to(dev))
        target_probs = None
        if self.cfg.method == "dspark":
            with torch.no_grad():  # p_t at a + j, from the stored final-normed hidden state
                B, N, K = blocks.target_pos.shape
                final = mb["final"].to(dev)  # (B, S, d)
                rows = blocks.target_pos.view(B, -1, 1).expand(-1, -1, final.shape[-1]).to(dev)
                h = final.gather(1, rows).view(B, N, K, -1).to(self.target.lm_head.weight.dtype)
                target_probs = torch.softmax(self.target.logits(h), dim=-1)  # (B, N, K, V)
        vocab = None if self.drafter.cfg.draft_vocab_size is None else self.drafter.draft_vocab_ids
        return drafter_loss(out.logits, out.conf_logits, target_probs, blocks.labels.to(dev),
                            blocks.supervised.to(dev), self.drafter.cfg.gamma, vocab,
                            ce_only=self.cfg.method == "dflash")

    @torch.enable_grad()  # whatever grad mode the caller's process is in
    def train_step(self) -> dict[str, Any]:
        self.drafter.train()
        sums: dict[str, float] = {}
        acc = torch.zeros(self.drafter.cfg.block_size)
        cnt = torch.zeros(self.drafter.cfg.block_size)
        for _ in range(self.cfg.grad_accum):
            terms = self._loss(self._micro_batch(self._next_indices(self.cfg.batch_size)))
            (terms.total / self.cfg.grad_accum).backward()
            for name in ("total", "ce", "tv", "conf", "conf_kl"):
                v = getattr(terms, name)
                if v is not None:
                    sums[name] = sums.get(name, 0.0) + float(v.detach()) / self.cfg.grad_accum
            acc += (terms.accept_per_pos * terms.count_per_pos).detach().cpu()
            cnt += terms.count_per_pos.detach().cpu()
        norm = torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), self.cfg.clip_norm)
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        record = {"step": self.step, "epoch": self.epoch, "lr": lr, "grad_norm": float(norm),
                  **{f"loss_{k}": v for k, v in sums.items()}}
        if self.cfg.method == "dspark":
            record["accept_per_pos"] = [round(float(a), 4) for a in acc / cnt.clamp_min(1)]
        return record

    # -- run, checkpoint, export -----------------------------------------------------------
    def train(self, stop_after: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
        """Run to the end (or `stop_after` more steps); returns this call's log records."""
        end = self.total_steps if stop_after is None else min(self.total_steps, self.step + stop_after)
        records = []
        t0 = time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not progress)
        with open(self.out / "log.jsonl", "a") as log:
            while self.step < end:
                rec = self.train_step()
                rec["elapsed_s"] = round(time.perf_counter() - t0, 3)
                records.append(rec)
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss_total']:.3f}")
                if self.step % self.cfg.checkpoint_every == 0 or self.step == end:
                    self.save_checkpoint()
        bar.close()
        return records

    def state(self) -> dict[str, Any]:
        return {"drafter": self.drafter.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "anchor_rng": self.anchor_gen.get_state(),
                "torch_rng": torch.get_rng_state(), "step": self.step, "epoch": self.epoch,
                "cursor": self.cursor, "drafter_config": self.drafter.cfg.model_dump(),
                "train_config": self.cfg.model_dump()}

    def save_checkpoint(self) -> Path:
        directory = self.out / "checkpoint"
        directory.mkdir(exist_ok=True)
        tmp = directory / (STATE_FILE + ".tmp")
        torch.save(self.state(), tmp)
        os.replace(tmp, directory / STATE_FILE)
        return directory / STATE_FILE

    def resume(self) -> bool:
        """Load `out/checkpoint/state.pt` if present; True when resumed."""
        path = self.out / "checkpoint" / STATE_FILE
        if not path.is_file():
            return False
        st = torch.load(path, weights_only=False)
        if st["drafter_config"] != self.drafter.cfg.model_dump():
            raise ValueError(f"{path} was written for a different drafter configuration")
        self.drafter.load_state_dict(st["drafter"])
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.anchor_gen.set_state(st["anchor_rng"])
        torch.set_rng_state(st["torch_rng"])
        self.step, self.epoch, self.cursor = st["step"], st["epoch"], st["cursor"]
        self._order = self._epoch_order(self.epoch)
        self._truncate_log()
        return True

    def _truncate_log(self) -> None:
        """Drop log lines written after the checkpoint (they will be recomputed)."""
        log = self.out / "log.jsonl"
        if log.is_file():
            lines = [ln for ln in log.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            log.write_text("".join(ln + "\n" for ln in lines))

    def export(self, directory: str | Path | None = None) -> Path:
        return save_drafter(self.drafter, directory or self.out / "drafter", DTYPES[self.cfg.export_dtype])
