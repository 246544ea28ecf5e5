"""Drafter training loop: regenerated examples in, target features captured online.

Per micro-batch: one no-grad target forward gives the taps and the target's top-k next-token
distributions (dspark/train/online.py), anchors are sampled, and the drafter trains on every
block at once (bf16 autocast where the CPU has it). AdamW (no weight decay), linear warmup
then cosine to 0, grad-norm clip, gradient accumulation. A checkpoint holds everything the
next step depends on (weights, optimizer, scheduler, both RNG states, the data cursor), so a
resumed run continues bit-for-bit; `init_from` starts a new stage from an earlier run's or a
shipped checkpoint's weights with a fresh schedule.

Every `eval_every` steps the held-out examples (never trained on) are scored teacher-forced:
the expected T = 1 acceptance per slot (1 - L1/2) and a greedy accepted-length estimate
(slots whose argmax equals both the data token and the target's argmax, counted up to the
first miss, plus the bonus token) are logged against the anchors seen so far.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from dspark.drafter.checkpoint import CALIBRATION, WEIGHTS_FILE, load_weights, save_drafter
from dspark.drafter.config import CONFIG_FILE, DrafterConfig, default_taps
from dspark.drafter.model import Drafter
from dspark.errors import UserError
from dspark.models.transformer import CausalLM
from dspark.train.anchors import AnchorBatch, block_targets, sample_anchors, valid_anchor_positions
from dspark.train.config import TrainConfig
from dspark.train.examples import Example, token_counts
from dspark.train.losses import TargetTopK, drafter_loss, l1_top_k
from dspark.train.online import TargetBatch, capture

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STATE_FILE = "state.pt"


def lr_factor(step: int, total: int, warmup_frac: float, decay_frac: float = 1.0) -> float:
    """Linear warmup over ceil(warmup_frac * total) steps, then constant, then a cosine from
    1 to 0 over the last decay_frac of the steps (1.0: cosine all the way after warmup; a
    small one is warmup-stable-decay, which lets a long run continue or be cut anywhere)."""
    warm = math.ceil(warmup_frac * total)
    if step < warm:
        return (step + 1) / warm
    start = max(warm, total - math.ceil(decay_frac * total))
    return 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, step - start) / max(1, total - start))))


def choose_vocab(examples: list[Example], vocab_size: int, draft_vocab_size: int | None) -> torch.Tensor | None:
    """Draft vocabulary ids (None = full): the most frequent answer tokens, sorted by id."""
    if draft_vocab_size is None or draft_vocab_size >= vocab_size:
        return None
    freq = token_counts(examples, vocab_size, answers_only=True)
    order = torch.sort(freq, descending=True, stable=True).indices
    return order[:draft_vocab_size].sort().values


def teacher_forced_metrics(out_logits: torch.Tensor, blocks: AnchorBatch, target: TargetTopK,
                           l1: torch.Tensor, vocab_ids: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Per-slot sums for the held-out curve: (expected acceptance (K,), greedy-run hits (K,),
    supervised slots (K,), full blocks, sum of greedy accepted lengths over full blocks)."""
    draft = out_logits.argmax(-1)  # (B, N, K) draft-vocab index
    if vocab_ids is not None:
        draft = vocab_ids[draft]
    sup = blocks.supervised
    hit = (draft == blocks.labels) & (blocks.labels == target.ids[..., 0]) & sup  # greedy acceptance proxy
    run = hit.long().cumprod(-1)  # accepted up to the first miss
    full = sup.all(-1)  # blocks whose K labels all exist
    return (((1 - 0.5 * l1) * sup).sum((0, 1)), run.sum((0, 1)).float(), sup.sum((0, 1)).float(),
            full.sum().float(), (run.sum(-1) * full).sum().float())


def _take(blocks: AnchorBatch, idx: torch.Tensor) -> AnchorBatch:
    """The blocks at anchor indices `idx` (ascending) of every row."""
    return AnchorBatch(*(t[:, idx] for t in (blocks.anchors, blocks.labels, blocks.target_pos, blocks.supervised)))


def with_target_labels(blocks: AnchorBatch, tb: TargetBatch, flags: list[bool],
                       greedy_chains: bool = False) -> AnchorBatch:
    """Rows flagged (teacher-forced text) take the target's argmax at a + j as the label of
    slot j instead of the data token at a + j + 1.

    Slot j's label is then the target's argmax given the TEXT's tokens a+1..a+j, which the
    target would not always have written. With `greedy_chains`, slot j of a flagged row stays
    supervised only while text token a+i equals the argmax at a+i-1 for every i <= j: the
    supervised labels are exactly the target's own greedy continuation of the prefix (what
    a verified draft must match), and the chain stops at the first disagreement."""
    if not any(flags):
        return blocks
    B, N, K = blocks.target_pos.shape
    top1_all = tb.top_ids[..., 0].cpu()  # (B, S) argmax at every answer position (0 elsewhere)
    top1 = top1_all.gather(1, blocks.target_pos.view(B, -1)).view(B, N, K)
    flagged = torch.tensor(flags)[:, None, None]
    supervised = blocks.supervised
    if greedy_chains:
        ids = tb.input_ids.cpu()
        agree = torch.zeros_like(top1_all, dtype=torch.bool)  # agree[p]: text token p+1 == argmax at p
        agree[:, :-1] = ids[:, 1:] == top1_all[:, :-1]
        slot_agrees = agree.gather(1, blocks.target_pos.view(B, -1)).view(B, N, K)  # at a + j
        chain = torch.ones_like(slot_agrees)
        chain[..., 1:] = slot_agrees[..., :-1].long().cumprod(-1).bool()  # slot j needs agreement at a..a+j-1
        supervised = torch.where(flagged, supervised & chain, supervised)
    labels = torch.where(flagged, top1, blocks.labels).masked_fill(~supervised, 0)
    return dataclasses.replace(blocks, labels=labels, supervised=supervised)


class Trainer:
    def __init__(self, cfg: TrainConfig, target: CausalLM, examples: list[Example],
                 heldout: list[Example] | None = None) -> None:
        """`heldout` (default: the last `cfg.heldout` examples) is never trained on."""
        self.cfg, self.target = cfg, target.requires_grad_(False)
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(cfg.device)
        usable = [e for e in examples if self._has_anchor(e)]
        if heldout is None:
            n_held = min(cfg.heldout, max(0, len(usable) - 1))
            usable, heldout = usable[: len(usable) - n_held], usable[len(usable) - n_held:]
        self.heldout = [e for e in heldout if self._has_anchor(e)][: cfg.heldout]
        held_ids = {e.id for e in self.heldout}
        self.examples = [e for e in usable if e.id not in held_ids]
        if not self.examples:
            raise UserError("no training example has an anchor with a label")
        self.seqs = list(range(len(self.examples)))
        self.drafter = self._build_drafter().to(self.device, DTYPES[cfg.dtype])
        for name in CALIBRATION:
            getattr(self.drafter, name).data = getattr(self.drafter, name).float()
        self.opt = torch.optim.AdamW([p for p in self.drafter.parameters() if p.requires_grad],
                                     lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
        per_step = cfg.batch_size * cfg.grad_accum
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(self.seqs) / per_step))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, self.total_steps, cfg.warmup_frac, cfg.decay_frac))
        self.anchor_gen = torch.Generator().manual_seed(cfg.seed)
        self.step, self.epoch, self.cursor, self.anchors_seen = 0, 0, 0, 0
        self._pending: list[tuple[TargetBatch, AnchorBatch]] = []  # slices of the current capture
        self._order = self._epoch_order(0)

    # -- setup -------------------------------------------------------------------------
    @staticmethod
    def _has_anchor(ex: Example) -> bool:
        return valid_anchor_positions(ex.loss_mask, len(ex)).numel() > 0

    def _build_drafter(self) -> Drafter:
        if self.cfg.init_from:
            return self._warm_start(Path(self.cfg.init_from))
        cfg, shape = self.cfg, self.cfg.drafter
        vocab_ids = choose_vocab(self.examples, self.target.cfg.vocab_size, shape.draft_vocab_size)
        dflash = cfg.method == "dflash"
        dcfg = DrafterConfig.for_target(
            cfg.model, self.target.cfg, taps=default_taps(self.target.cfg.num_layers),
            num_layers=shape.num_layers, block_size=shape.block_size,
            markov_rank=0 if dflash else shape.markov_rank, confidence_head=not dflash, gamma=shape.gamma,
            mask_token_id=self.target.cfg.vocab_size,  # a dedicated row: no text can produce it
            direct_path=shape.direct_path, draft_vocab_size=None if vocab_ids is None else vocab_ids.numel())
        torch.manual_seed(cfg.seed)
        drafter = Drafter(dcfg, self.target)
        if vocab_ids is not None:
            drafter.draft_vocab_ids.copy_(vocab_ids)
        return drafter

    def _warm_start(self, run: Path) -> Drafter:
        """The last weights of an earlier run (its fp32 training state) or of a drafter
        checkpoint directory, with its draft vocabulary and MASK id (which must not occur
        in this data)."""
        state_path = run / "checkpoint" / STATE_FILE
        if state_path.is_file():
            st = torch.load(state_path, weights_only=False)
            dcfg, weights = DrafterConfig.model_validate(st["drafter_config"]), st["drafter"]
        elif (run / WEIGHTS_FILE).is_file() and (run / CONFIG_FILE).is_file():
            dcfg, weights = DrafterConfig.load(run), load_file(str(run / WEIGHTS_FILE))
        else:
            raise UserError(f"init_from: neither a training checkpoint ({state_path}) nor a drafter "
                            f"checkpoint at {run}")
        shape, dflash = self.cfg.drafter, self.cfg.method == "dflash"
        want = (shape.block_size, 0 if dflash else shape.markov_rank, not dflash,
                shape.gamma, shape.draft_vocab_size, shape.direct_path)
        got = (dcfg.block_size, dcfg.markov_rank, dcfg.confidence_head, dcfg.gamma,
               dcfg.draft_vocab_size, dcfg.direct_path)
        if got != want or dcfg.num_layers > shape.num_layers:
            raise UserError(f"init_from {run}: (K, rank, confidence, gamma, draft vocab, direct path) {got} "
                            f"must equal this config's {want} and its {dcfg.num_layers} layers be at most "
                            f"this config's {shape.num_layers}")
        if dcfg.mask_token_id < dcfg.vocab_size and token_counts(self.examples, dcfg.vocab_size)[dcfg.mask_token_id]:
            raise UserError(f"init_from {run}: its MASK id {dcfg.mask_token_id} occurs in this data")
        old_layers = dcfg.num_layers
        drafter = Drafter(dcfg.model_copy(update={"num_layers": shape.num_layers}), self.target)
        load_weights(drafter, {k: v.float() if v.is_floating_point() else v for k, v in weights.items()},
                     strict=old_layers == shape.num_layers)
        # Growing: the new layers go on top, started from the target's last layers with their
        # residual outputs at zero, so step 0 drafts exactly as the checkpoint did.
        n_target = self.target.cfg.num_layers
        for i in range(old_layers, shape.num_layers):
            drafter.init_layer_from_target(i, n_target - shape.num_layers + i)
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
    def _micro_batch(self, examples: list[Example]) -> tuple[TargetBatch, AnchorBatch]:
        tb = capture(self.target, examples, tuple(self.drafter.cfg.taps), self.cfg.top_k)
        anchors = [sample_anchors(tb.loss_mask[b].cpu(), n, self.cfg.anchors_per_seq, self.anchor_gen)
                   for b, n in enumerate(tb.lengths)]
        blocks = block_targets(tb.input_ids.cpu(), tb.loss_mask.cpu(), tb.lengths, anchors,
                               self.drafter.cfg.block_size)
        return tb, with_target_labels(blocks, tb, [e.target_labels for e in examples], self.cfg.greedy_chains)

    def _next_micro_batch(self) -> tuple[TargetBatch, AnchorBatch]:
        """The next slice of the current capture. One target forward serves
        `steps_per_capture` micro-batches: its anchors are shuffled (sampling already drew
        them at random) and split, so the capture is paid once while the optimizer takes
        several smaller steps (Adam's progress is per step; a 3,500-slot step bought little
        more than a 900-slot one)."""
        if not self._pending:
            tb, blocks = self._micro_batch([self.examples[i] for i in self._next_indices(self.cfg.batch_size)])
            n = blocks.anchors.shape[1]
            parts = max(1, min(self.cfg.steps_per_capture, n))
            order = torch.randperm(n, generator=self.anchor_gen)
            self._pending = [(tb, _take(blocks, idx.sort().values)) for idx in order.chunk(parts)]
        return self._pending.pop(0)

    def _forward(self, tb: TargetBatch, blocks: AnchorBatch):
        """(draft output, TargetTopK per slot) for one micro-batch."""
        dev = self.device
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.cfg.autocast):
            out = self.drafter.forward_train(tb.taps, tb.input_ids, blocks.anchors.to(dev))
        B, N, K = blocks.target_pos.shape
        pos = blocks.target_pos.to(dev).view(B, N * K)  # p_t at a + j
        k = tb.top_ids.shape[-1]
        gather = lambda t: t.gather(1, pos[..., None].expand(-1, -1, k)).view(B, N, K, k)  # noqa: E731
        target = TargetTopK(gather(tb.top_ids), gather(tb.top_probs), tb.tail.gather(1, pos).view(B, N, K))
        return out, target, pos

    def _target_hidden(self, tb: TargetBatch, pos: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
        """The target's LM-head input at a + j, (B, N, K, d): the feature term's target."""
        if self.cfg.feature_weight == 0:
            return None
        d = tb.final.shape[-1]
        return tb.final.gather(1, pos[..., None].expand(-1, -1, d)).view(*shape, d)

    def _loss(self, tb: TargetBatch, blocks: AnchorBatch):
        out, target, pos = self._forward(tb, blocks)
        vocab = None if self.drafter.cfg.draft_vocab_size is None else self.drafter.draft_vocab_ids
        dev = self.device
        return drafter_loss(out.logits, out.conf_logits, None if self.cfg.method == "dflash" else target,
                            blocks.labels.to(dev), blocks.supervised.to(dev), self.drafter.cfg.gamma, vocab,
                            ce_only=self.cfg.method == "dflash", hidden=out.hidden,
                            target_hidden=self._target_hidden(tb, pos, blocks.labels.shape),
                            feature_weight=self.cfg.feature_weight)

    @torch.enable_grad()  # whatever grad mode the caller's process is in
    def train_step(self) -> dict[str, Any]:
        self.drafter.train()
        sums: dict[str, float] = {}
        acc = torch.zeros(self.drafter.cfg.block_size)
        cnt = torch.zeros(self.drafter.cfg.block_size)
        anchors = slots = 0
        for _ in range(self.cfg.grad_accum):
            tb, blocks = self._next_micro_batch()
            anchors += int(blocks.supervised[..., 0].sum())
            slots += int(blocks.supervised.sum())
            terms = self._loss(tb, blocks)
            (terms.total / self.cfg.grad_accum).backward()
            for name in ("total", "ce", "tv", "conf", "conf_kl", "feat"):
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
        self.anchors_seen += anchors
        record = {"step": self.step, "epoch": self.epoch, "lr": lr, "grad_norm": float(norm),
                  "anchors_seen": self.anchors_seen, "slots": slots, **{f"loss_{k}": v for k, v in sums.items()}}
        if self.cfg.method == "dspark":
            record["accept_per_pos"] = [round(float(a), 4) for a in acc / cnt.clamp_min(1)]
        return record

    # -- held-out learning curve ----------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Teacher-forced metrics on the held-out examples, every anchor (see module doc)."""
        K = self.drafter.cfg.block_size
        acc, run, cnt = torch.zeros(K), torch.zeros(K), torch.zeros(K)
        full, run_len = 0.0, 0.0
        vocab = None if self.drafter.cfg.draft_vocab_size is None else self.drafter.draft_vocab_ids
        self.drafter.eval()
        gen = torch.Generator().manual_seed(0)
        for ex in self.heldout:
            tb = capture(self.target, [ex], tuple(self.drafter.cfg.taps), self.cfg.top_k)
            anchors = [sample_anchors(tb.loss_mask[0].cpu(), len(ex), 10**9, gen)]
            blocks = block_targets(tb.input_ids.cpu(), tb.loss_mask.cpu(), tb.lengths, anchors, K)
            blocks = with_target_labels(blocks, tb, [ex.target_labels])
            out, target, _ = self._forward(tb, blocks)
            log_p = torch.log_softmax(out.logits.float(), -1)
            idx = target.ids if vocab is None else self._lookup()[target.ids]
            l1 = l1_top_k(log_p, idx, target.probs, target.tail)
            parts = teacher_forced_metrics(out.logits, blocks, target, l1, vocab)
            acc += parts[0].cpu()
            run += parts[1].cpu()
            cnt += parts[2].cpu()
            full += float(parts[3])
            run_len += float(parts[4])
        self.drafter.train()
        return {"step": self.step, "anchors_seen": self.anchors_seen,
                "heldout_accept_per_pos": [round(float(a), 4) for a in acc / cnt.clamp_min(1)],
                "heldout_greedy_per_pos": [round(float(a), 4) for a in run / cnt.clamp_min(1)],
                "heldout_tau_tf": round(1 + run_len / max(1.0, full), 4)}

    def _lookup(self) -> torch.Tensor:
        if getattr(self, "_lookup_t", None) is None:
            from dspark.train.losses import draft_index
            self._lookup_t = draft_index(self.drafter.draft_vocab_ids, self.target.cfg.vocab_size)
        return self._lookup_t

    # -- run, checkpoint, export -----------------------------------------------------------
    def train(self, stop_after: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
        """Run to the end (or `stop_after` more steps); returns this call's log records."""
        end = self.total_steps if stop_after is None else min(self.total_steps, self.step + stop_after)
        records = []
        t0 = time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not progress)
        with open(self.out / "log.jsonl", "a") as log, open(self.out / "eval.jsonl", "a") as ev:
            if self.heldout and self.step == 0 and self.cfg.init_from:  # where a warm start begins
                ev.write(json.dumps(self.evaluate()) + "\n")
                ev.flush()
            while self.step < end or (self._pending and self.step < self.total_steps):  # finish a capture
                rec = self.train_step()
                rec["elapsed_s"] = round(time.perf_counter() - t0, 3)
                records.append(rec)
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss_total']:.3f}")
                if self.heldout and (self.step % self.cfg.eval_every == 0 or self.step == end):
                    e = self.evaluate()
                    ev.write(json.dumps(e) + "\n")
                    ev.flush()
                    bar.write(f"step {self.step}: held-out tau (teacher-forced) {e['heldout_tau_tf']}, "
                              f"accept {e['heldout_accept_per_pos'][:3]}")
                due = self.step % self.cfg.checkpoint_every == 0 or self.step == end
                if due and not self._pending:  # only between captures: a checkpoint never holds one
                    self.save_checkpoint()
                elif due:
                    self._checkpoint_owed = True
                if getattr(self, "_checkpoint_owed", False) and not self._pending:
                    self._checkpoint_owed = False
                    self.save_checkpoint()
        bar.close()
        return records

    def state(self) -> dict[str, Any]:
        return {"drafter": self.drafter.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "anchor_rng": self.anchor_gen.get_state(),
                "torch_rng": torch.get_rng_state(), "step": self.step, "epoch": self.epoch,
                "cursor": self.cursor, "anchors_seen": self.anchors_seen,
                "drafter_config": self.drafter.cfg.model_dump(), "train_config": self.cfg.model_dump()}

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
        load_weights(self.drafter, st["drafter"])  # fills calibration buffers added since
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.anchor_gen.set_state(st["anchor_rng"])
        torch.set_rng_state(st["torch_rng"])
        self.step, self.epoch, self.cursor = st["step"], st["epoch"], st["cursor"]
        self.anchors_seen = st.get("anchors_seen", 0)
        self._order = self._epoch_order(self.epoch)
        self._truncate_log("log.jsonl")
        self._truncate_log("eval.jsonl")
        return True

    def _truncate_log(self, name: str) -> None:
        """Drop log lines written after the checkpoint (they will be recomputed)."""
        log = self.out / name
        if log.is_file():
            lines = [ln for ln in log.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            log.write_text("".join(ln + "\n" for ln in lines))

    def export(self, directory: str | Path | None = None) -> Path:
        return save_drafter(self.drafter, directory or self.out / "drafter", DTYPES[self.cfg.export_dtype])
