"""The pretrained-pair recipe: how a generator and a frozen reasoner, both pretrained, become a personalised pair.

The paper's recipe (`projection="pad"`, one joint stage) measured at chance on a pretrained SmolLM2 pair
(docs/fusion.md). What works, as named building blocks (each usable alone) and one named recipe that chains them:

1. :func:`build_pair`: the pair starts *exactly* at its generator: a zero-initialised projection
   (``projection="zero"``) on standardised reasoner latents (``latent_norm="standardize"``), LoRA on the generator,
   the reasoner frozen.
2. :func:`calibrate`: the standardisation statistics from the reasoner's latents at the reply boundary of the
   training views (``flythinker.latent_norm.calibrate_latent_norm(positions="boundary")``).
3. Stage 1 (:func:`train_stage` on ``model.generator``): the generator's LoRA alone, on what the generator reads
   (the query), plain mean loss, at ``stage1_lr``.
4. Stage 2 (:func:`train_stage` on the pair): the fusion at ``fusion_lr`` and the generator's LoRA at
   ``stage2_lora_lr``, on :func:`~flythinker.training.opening_loss.opening_weighted_loss` (the reply's opening,
   where the strategy is decided, weighs ``opening_weight`` x), with the frozen reasoner's latents cached
   (``flythinker.training.reasoner_cache``: a second pass over the same batches does not run it again).

Both stages run through HF `Trainer` (:class:`RecipeTrainer`, a :class:`~flythinker.training.FlyThinkerTrainer`):
per-part learning rates, a warm-up + cosine schedule (transformers'), a seeded data order that repeats the same
batches every epoch (so the latent cache hits), gradient clipping at 1.

    from flythinker.training.recipe import RECIPES, run_recipe
    model, tok, report = run_recipe("smollm2-135m-instruct", "smollm2-135m-instruct", records,
                                    RECIPES["persona-pair"], output_dir="runs/pair")

or ``flythinker train --recipe persona-pair --generator smollm2-135m-instruct --data records.jsonl --output-dir
runs/pair``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flythinker.options import LORA_TARGETS


@dataclass(frozen=True)
class PairRecipe:
    """Every number of the pretrained-pair recipe (module docstring); defaults: the shipped pair's.

    Args:
        lora_rank / lora_targets: the generator's LoRA (alpha = 2 x rank) on these linear maps of every layer.
        fusion_lambda: the pair's lambda.
        stage1_steps / stage1_lr: the generator's LoRA alone (0 steps: skip stage 1).
        stage2_steps / fusion_lr / stage2_lora_lr: the fusion (and the generator's LoRA unless 0).
        batch_size / warmup_steps: per stage; linear warm-up, then cosine decay to 0.
        opening_tokens / opening_weight: stage 2's loss (``opening_weight`` 1: the plain mean).
        calibration_batches / calibrate_on: batches and positions of the latent statistics.
        max_reasoner_tokens / max_generator_tokens: the persona views' prompt budgets.
        reasoner_lora_rank / reasoner_lora_layers / reasoner_lr: 0 (default): the reasoner stays frozen (its
            latents are cached in stage 2). Otherwise stage 2 also trains a LoRA of this rank on the reasoner's top
            ``reasoner_lora_layers`` layers, at ``reasoner_lr``: for data on which the frozen reasoner's boundary
            latent does not carry the trait (a linear probe at chance, ``benchmarks/latent_probe_smollm2.py``), no
            projection can pass it on. Only the top layers adapt so the backward pass stops there.
        seed: LoRA initialisation and data order.
    """

    lora_rank: int = 8
    lora_targets: tuple[str, ...] = LORA_TARGETS
    fusion_lambda: float = 1.0
    stage1_steps: int = 120
    stage1_lr: float = 1e-3
    stage2_steps: int = 240
    fusion_lr: float = 3e-3
    stage2_lora_lr: float = 3e-4
    batch_size: int = 8
    warmup_steps: int = 8
    opening_tokens: int = 4
    opening_weight: float = 10.0
    calibration_batches: int = 8
    calibrate_on: str = "boundary"
    max_reasoner_tokens: int = 160
    max_generator_tokens: int | None = None
    reasoner_lora_rank: int = 0
    reasoner_lora_layers: int = 8
    reasoner_lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.stage1_steps < 0 or self.stage2_steps < 1:
            raise ValueError(f"need stage1_steps >= 0 and stage2_steps >= 1, got {self.stage1_steps}, "
                             f"{self.stage2_steps}")
        for name in ("stage1_lr", "fusion_lr", "opening_weight"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.stage2_lora_lr < 0 or self.batch_size < 1 or self.warmup_steps < 1 or self.lora_rank < 1:
            raise ValueError("need stage2_lora_lr >= 0, batch_size >= 1, warmup_steps >= 1 and lora_rank >= 1")
        if self.reasoner_lora_rank < 0 or self.reasoner_lora_layers < 1 or not self.reasoner_lr > 0:
            raise ValueError("need reasoner_lora_rank >= 0, reasoner_lora_layers >= 1 and reasoner_lr > 0")
        if self.calibrate_on not in ("boundary", "fused"):
            raise ValueError(f"calibrate_on must be 'boundary' or 'fused', got {self.calibrate_on!r}")

    def replace(self, **changes: Any) -> PairRecipe:
        """A copy with `changes` (unknown names: TypeError)."""
        return dataclasses.replace(self, **changes)


RECIPES: dict[str, PairRecipe] = {"persona-pair": PairRecipe()}


# ---- building blocks ----------------------------------------------------------------------------------------
def build_pair(generator: nn.Module | str, reasoner: nn.Module | str, recipe: PairRecipe) -> nn.Module:
    """A FlyThinker pair that computes exactly what `generator` computes until trained: zero projection on
    standardised latents, LoRA (rank ``recipe.lora_rank``) on the generator, the reasoner frozen, or with a
    zero-initialised LoRA on its top layers when ``recipe.reasoner_lora_rank`` (still the generator's output).

    `generator` / `reasoner`: model objects or names/folders (``flythinker.hub.load_pretrained`` short names)."""
    from flythinker.modeling import FlyThinkerForCausalLM
    from flythinker.training.trainable import apply_lora, set_trainable

    gen, rsn = (_model(m) for m in (generator, reasoner))
    model = FlyThinkerForCausalLM.from_pair(gen, rsn, fusion_lambda=recipe.fusion_lambda, projection="zero",
                                            latent_norm="standardize", parallel="off", loss_impl="naive")
    torch.manual_seed(recipe.seed)  # the same LoRA initialisation for the same seed
    apply_lora(model, "generator", r=recipe.lora_rank, alpha=2 * recipe.lora_rank,
               target_modules=list(recipe.lora_targets))
    if recipe.reasoner_lora_rank:
        n = model.reasoner.config.num_hidden_layers
        apply_lora(model, "reasoner", r=recipe.reasoner_lora_rank, alpha=2 * recipe.reasoner_lora_rank,
                   target_modules=list(recipe.lora_targets), layers=range(max(0, n - recipe.reasoner_lora_layers), n))
    set_trainable(model, stage2_parts(recipe))
    return model


def stage2_parts(recipe: PairRecipe) -> tuple[str, ...]:
    """The parts stage 2 trains: the fusion, the generator's LoRA unless ``stage2_lora_lr`` is 0, the reasoner's
    LoRA when the recipe has one."""
    return (("generator",) if recipe.stage2_lora_lr > 0 else ()) + ("projection",) + \
        (("reasoner",) if recipe.reasoner_lora_rank else ())


def _model(m: nn.Module | str) -> nn.Module:
    if not isinstance(m, str):
        return m
    from flythinker.hub import load_pretrained

    return load_pretrained(m)[0]


def record_features(records: Sequence, tokenizer, recipe: PairRecipe, context: str) -> list[dict]:
    """Persona records -> collator features (``Views.example(context)``): ``"split"`` for the pair,
    ``"generator"`` for the generator alone (the query view), ``"shared"`` for a model reading the history."""
    from flythinker.persona import build_views

    return [build_views(r, tokenizer, mode="split", max_reasoner_tokens=recipe.max_reasoner_tokens,
                        max_generator_tokens=recipe.max_generator_tokens, warn=False).example(context)
            for r in records]


def calibrate(model: nn.Module, features: Sequence[dict], collator, recipe: PairRecipe) -> dict[str, float]:
    """Set the pair's latent statistics from ``recipe.calibration_batches`` seeded batches of `features`
    (split-context features); returns the statistics' summary + seconds."""
    from flythinker.latent_norm import calibrate_latent_norm
    from flythinker.training.loop import batch_indices

    start = time.perf_counter()
    order = batch_indices(len(features), recipe.calibration_batches, min(recipe.batch_size, len(features)),
                          seed=recipe.seed + 1)
    out = calibrate_latent_norm(model, (collator([features[i] for i in b]) for b in order),
                                positions=recipe.calibrate_on)
    return {**out, "seconds": time.perf_counter() - start}


class RepeatedPermutationSampler(torch.utils.data.Sampler[int]):
    """One seeded permutation of ``range(n)``, the same every epoch: epoch k sees epoch 1's batches (what lets a
    frozen reasoner's latents be reused)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def _trainer_class():
    from flythinker.training.trainer import FlyThinkerTrainer

    class RecipeTrainer(FlyThinkerTrainer):
        """FlyThinkerTrainer with a custom loss (`loss_fn(model, batch) -> scalar`), per-part learning rates
        (`part_lrs`: generator / projection / reasoner) and :class:`RepeatedPermutationSampler` data order."""

        def __init__(self, *args: Any, loss_fn: Callable | None = None, part_lrs: Mapping[str, float] | None = None,
                     order_seed: int = 0, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.loss_fn, self.part_lrs, self.order_seed = loss_fn, dict(part_lrs or {}), order_seed
            if loss_fn is not None:  # a mean loss: Trainer scales it for gradient accumulation itself
                self.model_accepts_loss_kwargs = False

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            return RepeatedPermutationSampler(len(dataset), self.order_seed)

        def create_optimizer(self, model=None):
            if self.optimizer is None and self.part_lrs:
                from flythinker.training.loop import param_groups

                groups = param_groups(self.model if model is None else model, self.args.learning_rate,
                                      fusion_lr=self.part_lrs.get("projection"),
                                      reasoner_lr=self.part_lrs.get("reasoner"))
                self.optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "part"} for g in groups],
                                                   lr=self.args.learning_rate,
                                                   weight_decay=self.args.weight_decay)
            return super().create_optimizer(model)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.loss_fn is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = self.loss_fn(model, inputs)
            return (loss, None) if return_outputs else loss

    return RecipeTrainer


def train_stage(model: nn.Module, features: Sequence[dict], collator, *, steps: int, lr: float, recipe: PairRecipe,
                output_dir: str | Path, fusion_lr: float | None = None, reasoner_lr: float | None = None,
                loss_fn: Callable | None = None, cache_latents: bool = False, callbacks: Sequence = ()
                ) -> dict[str, Any]:
    """One stage through HF `Trainer`: `steps` optimizer steps over `features` (repeated seeded order) at peak
    `lr` for the generator (`fusion_lr` for the fusion parameters, `reasoner_lr` for the reasoner's), warm-up
    ``recipe.warmup_steps`` then cosine.

    `model`: a pair, or ``pair.generator`` (stage 1). `cache_latents`: reuse the frozen reasoner's latents.
    Returns ``{"losses": [per logged step], "seconds", "steps", "reasoner_cache"?}``; logs go to
    ``<output_dir>/train_log.jsonl``. Nothing is saved: the caller saves the final model."""
    from transformers import TrainingArguments

    from flythinker.training.reasoner_cache import cached_reasoner_latents
    from flythinker.training.trainer import JsonlLogCallback

    out = Path(output_dir)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=recipe.batch_size, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=recipe.warmup_steps, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", seed=recipe.seed, data_seed=recipe.seed, use_cpu=not
        torch.cuda.is_available(), remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
        report_to="none", ddp_find_unused_parameters=False)
    part_lrs = {k: v for k, v in (("projection", fusion_lr), ("reasoner", reasoner_lr)) if v is not None}
    trainer = _trainer_class()(model=model, args=args, train_dataset=list(features), data_collator=collator,
                               callbacks=[JsonlLogCallback(out / "train_log.jsonl"), *callbacks], loss_fn=loss_fn,
                               part_lrs=part_lrs or {"generator": lr}, order_seed=recipe.seed)
    start = time.perf_counter()
    with cached_reasoner_latents(model) if cache_latents else nullcontext() as store:
        trainer.train()
    report: dict[str, Any] = {"steps": steps, "seconds": time.perf_counter() - start,
                              "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e]}
    if store is not None:
        report["reasoner_cache"] = {"misses": store.misses, "hits": store.hits}
    model.eval()
    return report


def train_stage1(model: nn.Module, records: Sequence, tokenizer, collator, recipe: PairRecipe,
                 output_dir: str | Path, callbacks: Sequence = ()) -> dict[str, Any]:
    """Stage 1: the pair's generator LoRA alone on what the generator reads (the query view of `records`), plain
    mean loss, ``recipe.stage1_steps`` steps at ``recipe.stage1_lr``. Returns :func:`train_stage`'s report."""
    from flythinker.training.trainable import set_trainable

    set_trainable(model, ("generator",))
    return train_stage(model.generator, record_features(records, tokenizer, recipe, "generator"), collator,
                       steps=recipe.stage1_steps, lr=recipe.stage1_lr, recipe=recipe, output_dir=output_dir,
                       callbacks=callbacks)


def train_stage2(model: nn.Module, features: Sequence[dict], collator, recipe: PairRecipe, output_dir: str | Path,
                 callbacks: Sequence = ()) -> dict[str, Any]:
    """Stage 2 on split-context `features`: :func:`stage2_parts` at their own rates (fusion ``fusion_lr``, generator
    LoRA ``stage2_lora_lr``, reasoner LoRA ``reasoner_lr``) on the opening-weighted loss, the frozen reasoner's
    latents cached (not when it has a LoRA). Returns :func:`train_stage`'s report."""
    from flythinker.training.opening_loss import opening_weighted_loss
    from flythinker.training.trainable import set_trainable

    set_trainable(model, stage2_parts(recipe))
    return train_stage(model, features, collator, steps=recipe.stage2_steps,
                       lr=recipe.stage2_lora_lr or recipe.fusion_lr, fusion_lr=recipe.fusion_lr,
                       reasoner_lr=recipe.reasoner_lr if recipe.reasoner_lora_rank else None, recipe=recipe,
                       output_dir=output_dir, cache_latents=not recipe.reasoner_lora_rank,
                       loss_fn=opening_weighted_loss(recipe.opening_tokens, recipe.opening_weight),
                       callbacks=callbacks)


def run_recipe(generator: nn.Module | str, reasoner: nn.Module | str, records: Sequence, recipe: PairRecipe,
               *, output_dir: str | Path, tokenizer=None, log: Callable[[str], None] = print
               ) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The named recipe end to end on persona `records` (split context): build, calibrate, stage 1, stage 2.

    Returns ``(pair with LoRA still unmerged, tokenizer, report)``; the report (losses per step, seconds per
    stage, calibration, the recipe) is also written to ``<output_dir>/recipe_report.json``."""
    from flythinker.hub import atomic_write_json
    from flythinker.training.collator import FlyThinkerCollator

    if not records:
        raise ValueError("run_recipe needs at least one training record")
    if tokenizer is None:
        from flythinker.hub import load_tokenizer

        tokenizer = load_tokenizer(generator if isinstance(generator, str) else generator.name_or_path)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    model = build_pair(generator, reasoner, recipe)
    collator = FlyThinkerCollator(tokenizer=tokenizer, add_eos=True)
    split = record_features(records, tokenizer, recipe, "split")
    report: dict[str, Any] = {"recipe": dataclasses.asdict(recipe), "records": len(records),
                              "users": len({r.user_id for r in records})}
    report["calibration"] = calibrate(model, split, collator, recipe)
    log(f"calibrated latent statistics: {report['calibration']}")
    if recipe.stage1_steps:
        report["stage1"] = train_stage1(model, records, tokenizer, collator, recipe, out / "stage1")
        log(f"stage 1 (generator LoRA): {recipe.stage1_steps} steps in {report['stage1']['seconds']:.0f} s")
    report["stage2"] = train_stage2(model, split, collator, recipe, out / "stage2")
    parts = "fusion + generator LoRA" + (" + reasoner LoRA" if recipe.reasoner_lora_rank else "")
    log(f"stage 2 ({parts}): {recipe.stage2_steps} steps in {report['stage2']['seconds']:.0f} s")
    report["seconds"] = time.perf_counter() - wall
    atomic_write_json(out / "recipe_report.json", report)
    return model, tokenizer, report


# ---- the shipped-pair format --------------------------------------------------------------------------------
def save_pair_deltas(model: nn.Module, folder: str | Path, recipe: PairRecipe, *, base: str,
                     info: Mapping[str, Any] | None = None) -> Path:
    """Write a recipe-trained pair in the shipped-pair format (``flythinker/pretrained/<name>``): its
    generator's LoRA factors (fp16) and fusion tensors as ``deltas.safetensors``, and ``pair.json`` (the fusion,
    LoRA, context and budget `FlyThinkerForCausalLM.from_pretrained("<name>")` rebuilds it from, plus `info`),
    each atomically. The LoRA must still be unmerged."""
    from safetensors.torch import save

    from flythinker.hub import atomic_write_bytes, atomic_write_json

    folder = Path(folder)
    tensors = {}
    for k, v in model.state_dict().items():  # [model.]generator.<module>.lora_A.default.weight -> <module>.lora_A
        k = k.removeprefix("model.")  # the deltas are keyed like the fused pair's (checkpoint) names
        if ".lora_A." in k or ".lora_B." in k:
            mod, ab = k.split(".lora_")
            tensors[f"{mod}.lora_{ab.split('.')[0]}"] = v
    if not tensors:
        raise ValueError("save_pair_deltas: the model has no LoRA factors (merged already?)")
    if any(k.startswith("reasoner.") for k in tensors):
        raise ValueError("save_pair_deltas: the shipped-pair format carries the generator's LoRA only; a pair with a "
                         "trained reasoner LoRA is saved merged (merge_lora + save_pretrained)")
    tensors.update(model.fusion_state_dict())
    tensors = {k: v.detach().to(torch.float16 if v.dim() == 2 else torch.float32).contiguous()
               for k, v in tensors.items()}
    atomic_write_bytes(folder / "deltas.safetensors", save(tensors))
    pair = {"base": base,
            "fusion": {"fusion_lambda": recipe.fusion_lambda, "projection": "zero", "latent_norm": "standardize"},
            "context": "split", "max_reasoner_tokens": recipe.max_reasoner_tokens,
            "lora": {"scaling": 2.0, "rank": recipe.lora_rank, "targets": list(recipe.lora_targets),
                     "part": "generator"},
            **dict(info or {})}
    atomic_write_json(folder / "pair.json", pair)
    return folder


def select_per_user(records: Sequence, per_user: int, users: int) -> list:
    """The first `per_user` records of each of the first `users` users, in file order (records grouped by user)."""
    by_user: dict[str, list] = {}
    for r in records:
        by_user.setdefault(r.user_id, []).append(r)
    return [r for rs in list(by_user.values())[:users] for r in rs[:per_user]]


# The shipped pair's training data and recipe (pair.json "recipe_spec" overrides any of these)
SHIPPED_SPEC = {"recipe": "persona-pair", "dataset": "persona-empathy", "version": 1, "train_users": 480,
                "per_user": 2, "changes": {}}


def retrain_shipped(info: Mapping[str, Any], folder: str | Path, *, log: Callable[[str], None] = print) -> Path:
    """Rerun a shipped pair's recipe (``info``: its pair.json; ``info["recipe_spec"]``: recipe name, bundled data
    set version, users and records per user, recipe changes; :data:`SHIPPED_SPEC` when absent) into `folder`
    (pair.json + deltas, the run's logs under ``folder/run``); returns `folder`."""
    from flythinker.persona import load_dataset

    spec = {**SHIPPED_SPEC, **dict(info.get("recipe_spec") or {})}
    recipe = RECIPES[spec["recipe"]].replace(**spec["changes"])
    data = load_dataset(spec["dataset"], "train", **({"version": spec["version"]} if spec["version"] != 1 else {}))
    records = select_per_user(data, spec["per_user"], spec["train_users"])
    model, _, report = run_recipe(info["base"], info["base"], records, recipe, output_dir=Path(folder) / "run",
                                  log=log)
    keep = {k: v for k, v in info.items() if k not in ("fusion", "lora", "context", "max_reasoner_tokens", "base")}
    return save_pair_deltas(model, folder, recipe, base=info["base"],
                            info={**keep, "recipe_spec": spec, "retrained_seconds": report["seconds"]})


def recipe_from_json(path: str | Path) -> PairRecipe:
    """A :class:`PairRecipe` from a JSON object of its fields (e.g. ``recipe_report.json``'s ``"recipe"``)."""
    data = json.loads(Path(path).read_text())
    data = data.get("recipe", data)
    data["lora_targets"] = tuple(data.get("lora_targets", LORA_TARGETS))
    return PairRecipe(**data)


__all__ = ["LORA_TARGETS", "RECIPES", "PairRecipe", "RepeatedPermutationSampler", "build_pair", "calibrate",
           "record_features", "recipe_from_json", "retrain_shipped", "run_recipe", "save_pair_deltas",
           "select_per_user", "stage2_parts", "train_stage", "train_stage1", "train_stage2", "SHIPPED_SPEC"]
