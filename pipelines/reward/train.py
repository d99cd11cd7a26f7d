"""Reward-model training (InstructGPT §3.5), in one file in the manner of CleanRL's ppo.py.

The RM maps a rendered (prompt, answer) to a scalar r_θ. For a prompt whose K answers a labeler ranked,
InstructGPT's loss is

    loss(θ) = − 1/C(K,2) · E_{(x, y_w, y_l) ~ D} [ log σ( r_θ(x, y_w) − r_θ(x, y_l) ) ]

with all C(K,2) comparisons of one ranking kept together as ONE batch element: each of the K answers is
forwarded once (K forward passes, not 2·C(K,2)), and the ranking is not counted C(K,2) times, which the paper
found to overfit. Here a batch is `batch_size` such groups; its loss is the mean over groups of the mean
over each group's pairs. A comparison, a thumbs pair or an HH-RLHF line is a group of one pair.

Optionally, unpaired thumbs and ratings add a pointwise logistic term,
    pointwise_weight · BCE(σ(r_θ(x, y)), label),    label ∈ [0, 1],
so feedback on a prompt with a single answer is not wasted (see Args.pointwise_weight).

After training the reward is shifted so that the training answers score 0 on average (InstructGPT
normalises its RM before RL so that labeler demonstrations average 0), and the model is saved with
`RewardModel.save`, the format the reward service loads. `run` then hands it to `publish` for MLflow and the
champion gate.
"""

from __future__ import annotations

import math
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from alignloop import progress
from alignloop.config import Settings
from alignloop.console_progress import ProgressBar
from alignloop.reward_model import DEFAULT_BACKBONE, RewardModel, default_backbone_path
from pipelines.reward import publish
from pipelines.reward.datasets import PointwiseExample, PreferenceGroup, RewardData
from pipelines.training import configure_threads, linear_schedule, pick_device, seed_everything


@dataclass
class Args:
    """Every hyper-parameter of a reward-model training run (logged to MLflow as params)."""

    # model
    backbone: str | None = None  # a transformers folder, a saved RM folder, or "@ALIAS" of the registered RM
    max_length: int = 512  # tokens per answer (prompt + response, truncated on the left: the response stays)
    disable_dropout: bool = True  # as TRL's RewardTrainer: the K answers of a group see the same network
    # The embeddings and the first N transformer blocks keep their pretrained weights (0: all train). Fewer
    # weights to fit from little data, and no backward pass through the frozen blocks.
    freeze_layers: int = 0
    # optimisation (AdamW, linear warmup then linear decay to 0)
    lr: float = 2e-5
    # The scalar head's learning rate (None: lr). The head starts random and is small, so a larger rate lets
    # it find its direction before the backbone has bent towards a random one; on HH-RLHF with MiniLM, 20x lr
    # gained nothing (README), hence the default.
    head_lr: float | None = None
    batch_size: int = 8  # preference groups (a whole ranking each) + pointwise rows per optimizer step
    epochs: int = 1  # InstructGPT trains its RM for one epoch: more overfits
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    # 0.1: pairs (what the gate measures) dominate, yet a thumb or a rating with nothing to pair it with still
    # teaches something; 0 trains on pairs alone, exactly InstructGPT's loss.
    pointwise_weight: float = 0.1
    # data
    eval_fraction: float = 0.1  # snapshots: share of groups held out (by a hash of the group id)
    limit: int | None = None  # at most this many training pairs (whole groups) and pointwise rows
    eval_limit: int | None = None  # at most this many held-out pairs
    # engineering
    seed: int = 0
    # Answers of one step are sorted by length and forwarded in chunks of at most this many padded tokens;
    # the loss and gradient are those of one big forward pass, with far less padding (HH-RLHF, 8 pairs a step:
    # 71% of the computed tokens are real at 2048, 43% when everything is padded to the longest).
    # None: 2048 on CPU, where small chunks cost nothing extra; 16384 on CUDA, where big ones keep it busy.
    forward_tokens: int | None = None
    eval_batch_size: int = 32
    shift_sample: int = 4096  # training answers scored to set reward_shift (a seeded sample when more)
    device: str = "auto"  # "auto": cuda when available, else cpu
    threads: int | None = None  # torch intra-op threads on CPU; None: the cores this process may use


# ---- setup -----------------------------------------------------------------------------------------------
def load_start(backbone: str | Path, args: Args, device: torch.device) -> tuple[RewardModel, object]:
    """The model training starts from: a fresh head on a transformers backbone, or a saved RM (fine-tuning,
    head included). Returns (model in train mode on `device`, tokenizer)."""
    path = Path(backbone)
    if (path / "reward_config.json").exists():
        model, tokenizer = RewardModel.load(path, device=device)
    else:
        model, tokenizer = RewardModel.from_backbone(path)
        model.config.backbone = DEFAULT_BACKBONE if path == default_backbone_path() else path.name
    limits = [args.max_length, getattr(model.backbone.config, "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    model.config.max_length = min(x for x in limits if x)
    if args.disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    freeze_lower_layers(model.backbone, args.freeze_layers)
    return model.to(device).train(), tokenizer


class BackboneMismatch(ValueError):
    """A setting the chosen backbone cannot take (it is known only once the backbone is loaded)."""


def freeze_lower_layers(backbone: torch.nn.Module, n: int) -> list[str]:
    """Stops training the embeddings and the first `n` transformer blocks of `backbone` (any transformers
    encoder or decoder: the blocks are its ModuleList of num_hidden_layers entries; everything registered
    before the first block is the embeddings). Returns the names of the frozen parameters."""
    if n == 0:  # asks nothing of the backbone: any architecture trains whole
        return []
    layers = getattr(backbone.config, "num_hidden_layers", None)
    blocks = next((m for m in backbone.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == layers),
                  None) if layers else None
    if blocks is None:
        raise BackboneMismatch(f"freeze_layers: {type(backbone).__name__} has no list of num_hidden_layers "
                               f"blocks to freeze")
    if not 0 <= n <= layers:
        raise BackboneMismatch(f"freeze_layers must be between 0 and the backbone's {layers} layers, not {n}")
    first = next(blocks[0].parameters())
    lower = {id(w) for block in blocks[:n] for w in block.parameters()}
    frozen, before_blocks = [], True
    for name, weight in backbone.named_parameters():
        before_blocks = before_blocks and weight is not first
        if before_blocks or id(weight) in lower:
            weight.requires_grad_(False)
            frozen.append(name)
    return frozen


# ---- batches -----------------------------------------------------------------------------------------------
class TokenTable:
    """Every distinct text, tokenized once up front (as the reward service will: same tokenizer, same
    max_length, truncated on the left)."""

    def __init__(self, tokenizer, texts: Sequence[str], max_length: int, chunk: int = 1024) -> None:
        self.index: dict[str, int] = {}
        for t in texts:
            self.index.setdefault(t, len(self.index))
        unique = list(self.index)
        self.ids: list[list[int]] = []
        for start in range(0, len(unique), chunk):
            enc = tokenizer(unique[start:start + chunk], truncation=True, max_length=max_length)
            self.ids.extend(enc["input_ids"])
        self.pad_id = tokenizer.pad_token_id
        self.pad_left = tokenizer.padding_side == "left"


@dataclass
class Batch:
    """The distinct answers of a step (rows) and what the loss needs to know about them."""

    rows: list[int]  # TokenTable ids, one forward row each
    winners: torch.Tensor  # [pairs] row of the preferred answer
    losers: torch.Tensor  # [pairs] row of the other one
    pair_group: torch.Tensor  # [pairs] which group (0..n_groups-1) the pair belongs to
    n_groups: int
    point_rows: torch.Tensor  # [points] rows of pointwise answers
    point_labels: torch.Tensor  # [points] their labels in [0, 1]

    @property
    def n_pairs(self) -> int:
        return int(self.winners.numel())


def make_batch(items: Sequence[PreferenceGroup | PointwiseExample], table: TokenTable) -> Batch:
    """Collects the distinct answers of `items` (each forwarded once, however many pairs it is in)."""
    rows: dict[int, int] = {}  # TokenTable id -> row

    def row(text: str) -> int:
        return rows.setdefault(table.index[text], len(rows))

    winners, losers, pair_group, point_rows, labels = [], [], [], [], []
    n_groups = 0
    for item in items:
        if isinstance(item, PreferenceGroup):
            local = [row(t) for t in item.texts]
            for w, lo in item.pairs:
                winners.append(local[w])
                losers.append(local[lo])
                pair_group.append(n_groups)
            n_groups += 1
        else:
            point_rows.append(row(item.text))
            labels.append(item.label)
    long = dict(dtype=torch.long)
    return Batch(list(rows), torch.tensor(winners, **long), torch.tensor(losers, **long),
                 torch.tensor(pair_group, **long), n_groups, torch.tensor(point_rows, **long),
                 torch.tensor(labels, dtype=torch.float32))


def chunks_by_length(rows: Sequence[int], table: TokenTable, forward_tokens: int) -> list[list[int]]:
    """Positions into `rows`, sorted by length and cut so that each chunk pads to at most `forward_tokens`."""
    order = sorted(range(len(rows)), key=lambda i: len(table.ids[rows[i]]))
    out: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = len(table.ids[rows[i]])  # sorted: the newcomer is the longest
        if current and (len(current) + 1) * longest > forward_tokens:
            out.append(current)
            current = []
        current.append(i)
    if current:
        out.append(current)
    return out


def pad(ids: Sequence[Sequence[int]], table: TokenTable, device: torch.device) -> tuple[torch.Tensor, ...]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), table.pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        sl = slice(width - len(x), width) if table.pad_left else slice(0, len(x))
        input_ids[i, sl] = torch.tensor(x)
        mask[i, sl] = 1
    return input_ids.to(device), mask.to(device)


def forward_rows(model: RewardModel, rows: Sequence[int], table: TokenTable, forward_tokens: int,
                 device: torch.device) -> torch.Tensor:
    """Raw rewards of the answers `rows`, in that order, as one differentiable tensor."""
    rewards = torch.empty(len(rows), device=device)
    parts, where = [], []
    for chunk in chunks_by_length(rows, table, forward_tokens):
        parts.append(model(*pad([table.ids[rows[i]] for i in chunk], table, device)))
        where.append(torch.tensor(chunk, device=device))
    return rewards.index_copy(0, torch.cat(where), torch.cat(parts).float())


# ---- losses --------------------------------------------------------------------------------------------
def preference_loss(rewards: torch.Tensor, winners: torch.Tensor, losers: torch.Tensor,
                    pair_group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """−mean over groups of mean over the group's pairs of log σ(r_w − r_l) (InstructGPT eq. 1)."""
    if n_groups == 0:
        return rewards.sum() * 0.0
    per_pair = -F.logsigmoid(rewards[winners] - rewards[losers])
    sums = torch.zeros(n_groups, device=rewards.device, dtype=per_pair.dtype)
    sums = sums.index_add(0, pair_group, per_pair)
    counts = torch.bincount(pair_group, minlength=n_groups).to(per_pair.dtype)
    return (sums / counts).mean()


def pointwise_loss(rewards: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean BCE(σ(r), label): thumbs and ratings as calibrated probabilities of "good"."""
    if rows.numel() == 0:
        return rewards.sum() * 0.0
    return F.binary_cross_entropy_with_logits(rewards[rows], labels.to(rewards.device))


# ---- evaluation ------------------------------------------------------------------------------------------
OnBatch = Callable[[int, int], None]  # (answers scored so far, answers to score)


@contextmanager
def scoring_progress(console: Console, label: str, stage: OnBatch | None = None) -> Iterator[OnBatch]:
    """Yields an `on_batch` callback that shows how many answers of `label` are scored. On a terminal it
    is a bar; in a log file, a line at each tenth (alignloop.console_progress). `stage` also hears of each
    batch (the job's share of the pipeline runner's progress, alignloop.progress.Stages)."""
    with ProgressBar(console, label, unit=" answers scored") as bar:
        def on_batch(done: int, total: int) -> None:
            bar.update(done, total=total)
            if stage:
                stage(done, total)
        yield on_batch


@torch.inference_mode()
def score_texts(model: RewardModel, tokenizer, texts: Sequence[str], batch_size: int = 32,
                on_batch: OnBatch | None = None) -> list[float]:
    """`RewardModel.score` (what serving computes: normalised rewards) in eval mode; the mode is restored."""
    was_training = model.training
    model.eval()
    scores = model.score(tokenizer, texts, batch_size=batch_size, on_batch=on_batch)
    model.train(was_training)
    return scores


def pair_margins(model: RewardModel, tokenizer, groups: Sequence[PreferenceGroup],
                 batch_size: int = 32, on_batch: OnBatch | None = None) -> list[tuple[str, float]]:
    """(the group's source, r_chosen - r_rejected) for every pair of `groups`; each distinct answer is
    scored once, however many pairs it is in."""
    if not any(g.pairs for g in groups):
        return []
    texts = list(dict.fromkeys(t for g in groups for t in g.texts))
    scores = dict(zip(texts, score_texts(model, tokenizer, texts, batch_size, on_batch), strict=True))
    return [(g.source, scores[g.texts[w]] - scores[g.texts[lo]]) for g in groups for w, lo in g.pairs]


def accuracy_and_loss(margins: Sequence[float]) -> tuple[float | None, float | None]:
    """(share of margins > 0, mean -log sigmoid(margin)); (None, None) for no margins. A tie counts as
    wrong: a constant model scores 0, not 0.5."""
    if not margins:
        return None, None
    right = sum(m > 0 for m in margins)
    return right / len(margins), -F.logsigmoid(torch.tensor(margins, dtype=torch.float64)).mean().item()


def accuracy_by_source(margins: Sequence[tuple[str, float]]) -> dict[str, dict]:
    """{source: {"pairs": n, "eval_accuracy": share right}} from `pair_margins`: feedback's kinds (ranking,
    comparison, thumbs) or HH-RLHF's files can disagree, and their mean hides it."""
    by_source: dict[str, list[float]] = {}
    for source, margin in margins:
        by_source.setdefault(source, []).append(margin)
    return {source: {"pairs": len(ms), "eval_accuracy": accuracy_and_loss(ms)[0]}
            for source, ms in sorted(by_source.items())}


def source_metrics(by_source: dict[str, dict]) -> dict[str, float]:
    """`accuracy_by_source` as MLflow metrics, "eval_accuracy/SOURCE". A source can be any file name, but
    MLflow refuses a metric name with characters other than letters, digits and `_-. /:`, and would refuse it
    only after the training: every other character becomes "_"."""
    return {"eval_accuracy/" + re.sub(r"[^\w.\- ]", "_", name).strip(". "): v["eval_accuracy"]
            for name, v in by_source.items() if name.strip(". ")}


def pair_accuracy(model: RewardModel, tokenizer, groups: Sequence[PreferenceGroup],
                  batch_size: int = 32, on_batch: OnBatch | None = None) -> tuple[float | None, float | None]:
    """(share of held-out pairs with r_chosen > r_rejected, mean pair loss); (None, None) without pairs.
    A tie counts as wrong: a constant model scores 0, not 0.5."""
    return accuracy_and_loss([m for _, m in pair_margins(model, tokenizer, groups, batch_size, on_batch)])


def champion_accuracy(model: RewardModel, tokenizer, groups: Sequence[PreferenceGroup], batch_size: int,
                      console: Console, stage: OnBatch | None = None) -> float | None:
    """The champion's accuracy on the new model's held-out pairs (the gate's yardstick), with progress."""
    with scoring_progress(console, "scoring the champion on the same held-out answers", stage) as on_batch:
        return pair_accuracy(model, tokenizer, groups, batch_size, on_batch)[0]


def mean_raw_reward(model: RewardModel, tokenizer, texts: Sequence[str], sample: int, seed: int,
                    batch_size: int = 32, on_batch: OnBatch | None = None) -> float:
    """Mean raw reward (reward_shift not applied) over `texts`, or over a seeded sample of `sample`."""
    texts = list(dict.fromkeys(texts))
    if not texts:
        return 0.0
    if len(texts) > sample:
        texts = random.Random(seed).sample(texts, sample)
    shift, model.config.reward_shift = model.config.reward_shift, 0.0
    try:
        return sum(score_texts(model, tokenizer, texts, batch_size, on_batch)) / len(texts)
    finally:
        model.config.reward_shift = shift


# ---- training ----------------------------------------------------------------------------------------------
@dataclass
class TrainStats:
    steps: int
    pairs: int  # training pairs seen (all epochs)
    seconds: float
    last_loss: float | None

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else 0.0


def train(model: RewardModel, tokenizer, data: RewardData, args: Args, device: torch.device, *,
          on_step: Callable[[int, dict[str, float]], None] | None = None,
          console: Console | None = None, stage: Callable[[int, int], None] | None = None) -> TrainStats:
    """`args.epochs` passes over the training groups (and pointwise rows, if pointwise_weight > 0).
    `stage(steps done, steps)` hears of each step, as `on_step` does with its metrics."""
    items: list[PreferenceGroup | PointwiseExample] = list(data.train_groups)
    if args.pointwise_weight > 0:
        items += data.train_pointwise
    table = TokenTable(tokenizer, [t for g in data.train_groups for t in g.texts]
                       + [p.text for p in data.train_pointwise if args.pointwise_weight > 0],
                       model.config.max_length)
    steps_per_epoch = math.ceil(len(items) / args.batch_size) if items else 0
    total = steps_per_epoch * args.epochs
    warmup = max(1, round(args.warmup_ratio * total)) if args.warmup_ratio > 0 else 0

    # No weight decay on biases and LayerNorm weights (as BERT, and TRL through transformers' Trainer).
    head_lr = args.lr if args.head_lr is None else args.head_lr
    groups = []
    for module, lr in ((model.backbone, args.lr), (model.head, head_lr)):
        weights = [w for w in module.parameters() if w.requires_grad]
        groups += [{"params": [w for w in weights if w.ndim >= 2], "lr": lr,
                    "weight_decay": args.weight_decay},
                   {"params": [w for w in weights if w.ndim < 2], "lr": lr, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=args.adam_betas, eps=args.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_schedule(s, total, warmup))
    rng = random.Random(args.seed)
    forward_tokens = args.forward_tokens or (16384 if device.type == "cuda" else 2048)

    step, pairs_seen, last_loss = 0, 0, None
    console = console or Console(stderr=True)
    model.train()
    started = time.perf_counter()
    # On a terminal a bar; in a log file (a pipeline step's) a line at each twentieth.
    with ProgressBar(console, "training the RM", total, unit=" steps", lines=20) as bar:
        for epoch in range(args.epochs):
            order = list(items)
            rng.shuffle(order)
            for start in range(0, len(order), args.batch_size):
                batch = make_batch(order[start:start + args.batch_size], table)
                rewards = forward_rows(model, batch.rows, table, forward_tokens, device)
                pref = preference_loss(rewards, batch.winners.to(device), batch.losers.to(device),
                                       batch.pair_group.to(device), batch.n_groups)
                point = pointwise_loss(rewards, batch.point_rows.to(device), batch.point_labels)
                loss = pref + args.pointwise_weight * point

                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()

                step += 1
                pairs_seen += batch.n_pairs
                last_loss = loss.item()
                rate = pairs_seen / (time.perf_counter() - started)
                bar.update(step, f"loss {last_loss:.4f}  {rate:.1f} pairs/s")
                if stage:
                    stage(step, total)
                if on_step:
                    on_step(step, {"loss": last_loss, "preference_loss": pref.item(),
                                   "pointwise_loss": point.item(), "grad_norm": float(grad_norm),
                                   "lr": scheduler.get_last_lr()[0], "epoch": epoch, "pairs_per_s": rate})
    return TrainStats(step, pairs_seen, time.perf_counter() - started, last_loss)


# ---- the whole job -------------------------------------------------------------------------------------
def job_stages(data: RewardData, args: Args, train_texts: Sequence[str], *,
               champion: bool) -> progress.Stages:
    """The job's stages for the pipeline runner's progress, weighted in answers forwarded: a training step
    runs each distinct answer of its batch forward and backward (about three forwards), scoring runs it
    forward once. The champion is scored only when the job registers (and there is one)."""
    eval_answers = len({t for g in data.eval_groups for t in g.texts})
    distinct_train = len(set(train_texts))
    trained = 3 * args.epochs * (distinct_train if args.pointwise_weight > 0 else
                                 len({t for g in data.train_groups for t in g.texts}))
    return progress.Stages(training=trained, **{"held-out": eval_answers},
                           reward_shift=min(distinct_train, args.shift_sample),
                           champion=eval_answers if champion else 0)


def run(settings: Settings, data: RewardData, args: Args, *, register: bool = True,
        gate_tolerance: float | None = None, out: Path | None = None,
        console: Console | None = None, promote: bool = True) -> dict:
    """Trains on `data`, evaluates on its held-out pairs, sets reward_shift and saves the model; with
    `register`, logs the run to MLflow (experiment "alignloop-reward"), registers a new version of
    settings.reward_model_name and moves @champion to it if it passes the gate (with `promote`; else the
    verdict is only recorded). Returns the summary the CLI prints as its last line."""
    console = console or Console(stderr=True)
    seed_everything(args.seed)
    device = pick_device(settings.reward_device if args.device == "auto" else args.device)
    threads = configure_threads(args.threads) if device.type == "cpu" else None
    tolerance = settings.reward_gate_tolerance if gate_tolerance is None else gate_tolerance

    base_version = None
    backbone = args.backbone or str(default_backbone_path())
    if backbone.startswith("@"):
        base_ref, backbone = publish.fetch_alias(settings, backbone[1:])
        base_version = base_ref.version
    model, tokenizer = load_start(backbone, args, device)
    console.print(f"RM on {model.config.backbone} ({device}{f', {threads} threads' if threads else ''}): "
                  f"{data.train_pairs} training pairs in {len(data.train_groups)} groups, "
                  f"{len(data.train_pointwise)} pointwise rows, {data.eval_pairs} held-out pairs"
                  + (f"; dropped {data.dropped}" if any(data.dropped.values()) else ""))

    keep = out is not None or not register
    folder = Path(out) if out else settings.home / "runs" / f"reward-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    scratch = None if keep else tempfile.TemporaryDirectory(dir=settings.cache_dir, prefix="reward-")
    if scratch:
        folder = Path(scratch.name) / "model"

    params = {k: v for k, v in asdict(args).items()} | {
        "backbone": backbone, "base_reward_version": base_version, "dataset": data.name,
        "dataset_hash": data.hash, "train_pairs": data.train_pairs, "train_groups": len(data.train_groups),
        "eval_pairs": data.eval_pairs, "pointwise_rows": len(data.train_pointwise), "device": str(device),
        "threads": threads, "gate_tolerance": tolerance}
    train_texts = [t for g in data.train_groups for t in g.texts] + [p.text for p in data.train_pointwise]
    stages = job_stages(data, args, train_texts, champion=register)
    tracker = publish.Tracker(settings.tracking_uri, enabled=register)
    with tracker.run(run_name=f"reward-{data.digest}", params=params, data=data):
        stats = train(model, tokenizer, data, args, device, on_step=tracker.log_step, console=console,
                      stage=stages.stage("training"))
        with scoring_progress(console, "scoring the held-out answers", stages.stage("held-out")) as on_batch:
            margins = pair_margins(model, tokenizer, data.eval_groups, args.eval_batch_size, on_batch)
        eval_accuracy, eval_loss = accuracy_and_loss([m for _, m in margins])
        by_source = accuracy_by_source(margins)
        with scoring_progress(console, "scoring training answers for reward_shift",
                              stages.stage("reward_shift")) as on_batch:
            model.config.reward_shift = mean_raw_reward(model, tokenizer, train_texts, args.shift_sample,
                                                        args.seed, args.eval_batch_size, on_batch)
        model.config.extra = {**model.config.extra, "dataset_hash": data.hash, "eval_accuracy": eval_accuracy,
                              "base_reward_version": base_version}
        model.save(folder, tokenizer)
        summary = {
            "eval_accuracy": eval_accuracy, "eval_loss": eval_loss, "eval_accuracy_by_source": by_source,
            "model_version": None, "promoted": False,
            "gate_passed": None,
            "champion_eval_accuracy": None, "champion_version": None,
            "gate": "not registered (--no-register)",
            "pairs_per_s": round(stats.pairs_per_s, 3), "train_pairs": data.train_pairs,
            "eval_pairs": data.eval_pairs, "train_groups": len(data.train_groups),
            "eval_groups": len(data.eval_groups), "pointwise_rows": len(data.train_pointwise),
            "steps": stats.steps, "train_seconds": round(stats.seconds, 3), "final_loss": stats.last_loss,
            "reward_shift": model.config.reward_shift, "dataset_hash": data.hash,
            "model_dir": str(folder) if keep else None, "run_id": tracker.run_id,
        }
        tracker.log_metrics({"eval_accuracy": eval_accuracy, "eval_loss": eval_loss,
                             "pairs_per_s": stats.pairs_per_s, "reward_shift": model.config.reward_shift,
                             "train_seconds": stats.seconds} | source_metrics(by_source))
        if register:
            summary |= publish.register_and_gate(
                settings, tracker, folder, data=data, eval_accuracy=eval_accuracy,
                score=lambda m, tok: champion_accuracy(m, tok, data.eval_groups, args.eval_batch_size,
                                                       console, stages.stage("champion")),
                tolerance=tolerance, untrained=stats.steps == 0, base_version=base_version,
                backbone=model.config.backbone, reward_shift=model.config.reward_shift, device=device,
                console=console, promote=promote)
    if scratch:
        scratch.cleanup()
    return summary
