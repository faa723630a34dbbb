"""Reproduce Choi et al.'s Table 1 with onnxhq: prune, quantize 5 ways, fine-tune, Huffman-code.

    python -m tools.reproduce_table [--nets lenet5 lenet300 resnet32]
                                    [--stages prune curves compensate table report]
                                    [--compensate-methods uniform] [--smoke]

For each network: the float model's accuracy; a pruned model (Hessian-saliency, iterative, masked
retraining); rate-accuracy curves without fine-tuning for each method, with and without pruning;
the same points again with error compensation (``--compensate``, tools/table_compensate.py);
then, per method, the lowest rate whose *fine-tuned* accuracy stays within 0.1 point of the float
model, its accuracy and its compression ratio counting every byte. The best artifacts go to
models/compressed/<net>/, the curves to tools/curves_<net>.png. Every step is cached in
tools/_cache/table/<net>/ (JSON + ONNX) and resumes from there. The networks and their settings
are in tools/table_nets.py, the cache, tables and plots in tools/table_report.py. Needs the shared
data (MNIST, CIFAR-10, the pretrained ResNet-32; see tools/datasets.py). ``--smoke``: LeNet-5 on the
bundled sample, every stage in seconds, everything written to a temporary folder.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

import onnxhq
from onnxhq.data import Dataset
from onnxhq.evaluate import accuracy
from onnxhq.hessian import estimate
from onnxhq.importances import quantized_names
from onnxhq.model import (
    load_model,
    quantizable_weights,
    read_initializers,
    replace_initializers,
    save_model,
)
from onnxhq.prune import prune_model
from onnxhq.training.engine import GradientEngine
from onnxhq.training.train import (
    TrainState,
    cosine_lr,
    load_checkpoint,
    save_checkpoint,
    start_training,
    train_steps,
)
from tools.table_compensate import compensate_stage
from tools.table_nets import METHODS, NAMES, Net, nets
from tools.table_report import Cache, Where, report_stage

STAGES = ("prune", "curves", "compensate", "table", "report")
TAGS = ("dense", "pruned")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prune_stage(net: Net, cache: Cache, train: Dataset, test: Dataset):
    path = cache.dir / "pruned.onnx"
    if not path.is_file():
        t0 = time.time()
        pruned, masks = prune_model(
            net.model(),
            train,
            sparsity=net.sparsity,
            criterion=net.criterion,
            steps=net.prune_steps,
            retrain_epochs=net.retrain_epochs,
            lr=net.prune_lr,
            augment=net.augment,
            seed=0,
        )
        save_model(pruned, path)
        cache.put(
            "pruned",
            {
                "sparsity": float(
                    1 - sum(m.sum() for m in masks.values()) / sum(m.size for m in masks.values())
                ),
                "accuracy": accuracy(pruned, test),
                "seconds": time.time() - t0,
            },
        )
    log(f"{net.name}: pruned {cache.get('pruned')}")
    if net.polish_epochs:
        return polish(net, cache, load_model(path), train, test)
    return load_model(path)


def polish(net: Net, cache: Cache, pruned, train: Dataset, test: Dataset):
    """Masked Adam retraining of the pruned model for ``net.polish_epochs`` epochs (cosine lr).

    One resumable `onnxhq.training.train` run, checkpointed every ``net.polish_chunk`` epochs in
    ``polish_run.npz``, so a killed polish resumes where the last checkpoint left it, with the
    steps it would have taken. Raising ``polish_epochs`` later stretches the run (and its cosine
    schedule) from the checkpoint; the new polished model then replaces the old one, and the
    pruned model's curves and table (now stale) are dropped.
    """
    path, checkpoint = cache.dir / "pruned_polished.onnx", cache.dir / "polish_run.npz"
    done_before = (cache.get("polished") or {}).get("epochs", 0.0)
    if not path.is_file() or done_before < net.polish_epochs:
        names = [w.name for w in quantizable_weights(pruned)]
        masks = {n: w != 0 for n, w in read_initializers(pruned, names).items()}
        engine = GradientEngine(pruned)
        assert train.labels is not None  # the networks' training data is labelled
        run = _polish_run(net, engine, masks, len(train), checkpoint, path, done_before)
        t0, lr = time.time(), cosine_lr(net.polish_lr)  # one schedule over the whole polish
        chunk = max(1, round(net.polish_chunk * run.steps_per_epoch)) if net.polish_chunk else None
        while not run.finished:
            run = train_steps(
                engine,
                train.inputs,
                train.labels,
                run,
                steps=chunk,
                lr=lr,
                masks=masks,
                augment=net.augment,
            )
            save_checkpoint(checkpoint, run)
            seconds = time.time() - t0
            log(f"{net.name}: polished {run.done} of {run.total} steps ({seconds:.0f} s this run)")
        polished = replace_initializers(pruned, run.params)
        save_model(polished, path)
        for key in [
            k
            for k in cache.data
            if k.startswith(("curve/pruned", "compensated/pruned", "table/", "best/", "extra/"))
            or k in ("threshold", "best")
        ]:  # everything made from the pruned model ("extra@dense/" is not)
            cache.drop(key)
        (cache.dir / "fisher_pruned.npz").unlink(missing_ok=True)
        (cache.dir / "layers_pruned.npz").unlink(missing_ok=True)
        cache.put(
            "polished",
            {
                "accuracy": accuracy(polished, test),
                "epochs": net.polish_epochs,
                "seconds": time.time() - t0,
            },
        )
    log(f"{net.name}: polished {cache.get('polished')}")
    return load_model(path)


def _polish_run(
    net: Net,
    engine: GradientEngine,
    masks: dict,
    samples: int,
    checkpoint: Path,
    path: Path,
    done_before: float,
) -> TrainState:
    """The polish run to continue: the checkpoint's, stretched to ``net.polish_epochs``; else one
    from the polished model of an earlier, shorter polish (fresh Adam moments); else a new one."""
    if checkpoint.is_file():
        run = load_checkpoint(checkpoint)
        total = max(round(net.polish_epochs * run.steps_per_epoch), run.done)
        log(f"{net.name}: polish resumes after {run.done} of {total} steps")
        return replace(run, total=total)
    params, done = dict(engine.values), 0.0
    if path.is_file():  # polished before checkpoints: continue from it, Adam moments anew
        params, done = read_initializers(load_model(path), list(params)), done_before
        log(f"{net.name}: polish continues from the {done:g}-epoch model")
    run = start_training(params, samples, epochs=net.polish_epochs, seed=1, masks=masks)
    return replace(run, done=min(round(done * run.steps_per_epoch), run.total))


def hessians(net: Net, model, tag: str, calib: Dataset, cache: Cache) -> dict[str, dict]:
    """Fisher (cached as npz) and the Adam state, for the quantizable weights (and biases)."""
    names = quantized_names(model, include_biases=True)
    path = cache.dir / f"fisher_{tag}.npz"
    if not path.is_file():
        engine = GradientEngine(model, params=names)
        diag = estimate("fisher", engine, calib, params=names, samples=len(calib), seed=0)
        assert diag is not None  # only "none" gives None
        np.savez(path, **diag)
    with np.load(path) as z:
        out = {"fisher": {k: z[k] for k in z.files}}
    if net.adam_state is not None and net.adam_state.is_file():
        adam = estimate("adam", None, None, params=names, model=model, adam_state=net.adam_state)
        assert adam is not None
        out["adam"] = adam
    return out


def run(
    model,
    diag,
    label: str,
    rate: tuple[str, float],
    test: Dataset,
    *,
    train=None,
    epochs=0.0,
    lr=1e-4,
    scope="network",
):
    method, hessian = METHODS[label]
    options: dict = {rate[0]: rate[1]}
    if hessian != "none":
        options["hessian"] = diag[hessian]
    if epochs:  # compress refuses fine-tuning settings without fine-tuning
        options.update(finetune_epochs=epochs, finetune_lr=lr, train_data=train)
    t0 = time.time()
    result = onnxhq.compress(
        model, method=method, include_biases=True, eval_data=None, scope=scope, **options
    )
    rep = result.report
    quantized_bits = 8 * sum(r.coded_bytes for r in rep.layers) / max(rep.quantized_params, 1)
    acc = accuracy(result.model(), test)
    return result, {
        "accuracy": acc,
        "bytes": rep.compressed_bytes,
        "ratio": rep.compression_ratio,
        "paper_ratio": rep.paper_ratio,
        "bits_per_weight": quantized_bits,
        "seconds": time.time() - t0,
    }


def curves_stage(
    net: Net, cache: Cache, models: dict, diags: dict, test: Dataset, methods, scope="network"
) -> None:
    """Rate-accuracy points without fine-tuning; keys ``curve/<tag>[@scope]/<method>/<rate>``."""
    for tag, model in models.items():
        for label in methods:
            if METHODS[label][1] not in ("none",) and METHODS[label][1] not in diags[tag]:
                continue
            for rate in net.rates(label, tag):
                where = tag if scope == "network" else f"{tag}@{scope}"
                key = f"curve/{where}/{label}/{rate[0]}={rate[1]}"
                if cache.get(key) is None:
                    try:
                        _, row = run(model, diags[tag], label, rate, test, scope=scope)
                    except onnxhq.OnnxhqError as exc:
                        row = {"error": str(exc)}
                    cache.put(key, row)
                log(f"{net.name} {key}: {cache.get(key)}")


def table_stage(
    net: Net,
    cache: Cache,
    models: dict,
    diags: dict,
    data: tuple[Dataset, Dataset],
    float_acc: float,
    methods,
    tag: str = "pruned",
    *,
    where: Where,
) -> None:
    """Per method: from the curve's first passing rate, fine-tune rates, keep the lowest passing.

    ``data`` is (train, test). ``tag`` picks the model quantized: "pruned" (keys ``table/…``,
    ``best/…``) or "dense" (keys ``table@dense/…``). Passing means within 0.1 point of the float
    model; where the pruned model itself is further below, within 0.1 point of the pruned model
    (and the table says so). The best artifact of all goes to ``where.compressed/<net>``.
    """
    suffix = "" if tag == "pruned" else f"@{tag}"
    pruned = cache.get("polished") or cache.get("pruned")
    base_acc = pruned["accuracy"] if tag == "pruned" else float_acc
    threshold = float_acc - 0.001 if base_acc >= float_acc - 0.001 else base_acc - 0.001
    relative = "float" if threshold == float_acc - 0.001 else "pruned"
    cache.put(f"threshold{suffix}", {"accuracy": threshold, "relative_to": relative})
    for label in methods:
        if METHODS[label][1] != "none" and METHODS[label][1] not in diags[tag]:
            continue
        rates = net.rates(label, tag)
        scoped = tag if net.scope == "network" else f"{tag}@{net.scope}"
        curve = [cache.get(f"curve/{scoped}/{label}/{r[0]}={r[1]}") for r in rates]
        ok = [
            i
            for i, row in enumerate(curve)
            if row and "accuracy" in row and row["accuracy"] >= threshold - 0.002
        ]
        step = TableStep(net, cache, models[tag], diags[tag], label, suffix, threshold, data)
        chosen = step.walk(rates, ok[0] if ok else len(rates) - 1)
        cache.put(f"best{suffix}/{label}", chosen and {"key": chosen[0], **chosen[1]})
    publish_best(net, cache, where)


@dataclass
class TableStep:
    """Fine-tuned runs of one method on one model, cached by rate."""

    net: Net
    cache: Cache
    model: object
    diag: dict
    label: str
    suffix: str
    threshold: float
    data: tuple[Dataset, Dataset]  # train, test

    def finetuned(self, rate: tuple[str, float]) -> tuple[str, dict] | None:
        """(key, row) of the fine-tuned run at ``rate`` if it passes, else None."""
        key = f"table{self.suffix}/{self.label}/{rate[0]}={rate[1]}"
        row = self.cache.get(key)
        if row is None:
            train, test = self.data
            result, row = run(
                self.model,
                self.diag,
                self.label,
                rate,
                test,
                train=train,
                epochs=self.net.finetune_epochs,
                lr=self.net.finetune_lr,
                scope=self.net.scope,
            )
            result.save(self.cache.artifacts(key))
            self.cache.put(key, row)
        log(f"{self.net.name} {key}: {row}")
        return (key, row) if row["accuracy"] >= self.threshold else None

    def walk(self, rates: list[tuple[str, float]], start: int) -> tuple[str, dict] | None:
        """From ``start``, go down while fine-tuned models pass; if it fails, go up (2 at most)."""
        chosen, i = self.finetuned(rates[start]), start
        while chosen and i > 0:
            lower = self.finetuned(rates[i - 1])
            if not lower:
                break
            chosen, i = lower, i - 1
        while not chosen and i < min(len(rates) - 1, start + 2):
            i += 1
            chosen = self.finetuned(rates[i])
        return chosen


def publish_best(net: Net, cache: Cache, where: Where) -> None:
    """Copy the artifact to commit: the highest ratio within 0.1 point of the float model, else
    the highest ratio."""
    bests = []
    for s in ("", "@dense"):
        relative = (cache.get(f"threshold{s}") or {}).get("relative_to")
        found = [cache.get(f"best{s}/{m}") for m in METHODS]
        bests += [(relative == "float", b["ratio"], b["key"]) for b in found if b]
    if not bests:
        return
    _, _, key = max(bests)
    dst = where.compressed / net.name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(cache.artifacts(key), dst)
    cache.put("best", {"key": key, **cache.get(key)})
    log(f"{net.name}: best {cache.get('best')} -> {dst}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--nets", nargs="+", default=["lenet5", "lenet300", "resnet32"], choices=NAMES)
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--calib", type=int, default=1000, help="training images for the Fisher")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument(
        "--compensate-methods",
        nargs="+",
        default=["uniform"],
        choices=list(METHODS),
        help="methods whose curve points the compensate stage runs again with --compensate",
    )
    ap.add_argument(
        "--scope",
        default=None,
        choices=["network", "layer"],
        help="codebook scope of the curves (default: the network's table scope)",
    )
    ap.add_argument(
        "--tags",
        nargs="+",
        default=list(TAGS),
        choices=TAGS,
        help="which models the curves cover",
    )
    ap.add_argument(
        "--table-tags",
        nargs="+",
        default=["pruned"],
        choices=TAGS,
        help="which models the table fine-tunes and ranks",
    )
    ap.add_argument("--smoke", action="store_true", help="LeNet-5 on the bundled sample, seconds")
    args = ap.parse_args(argv)
    if not args.smoke:
        return run_nets(args, nets(), Where())
    args.nets, args.calib = ["lenet5"], 100
    with tempfile.TemporaryDirectory(prefix="onnxhq-smoke-") as tmp:
        return run_nets(args, nets(smoke=True), Where.under(Path(tmp)))


def run_nets(args: argparse.Namespace, table: dict[str, Net], where: Where) -> int:
    for name in args.nets:
        net = table[name]
        cache = Cache(name, where.cache)
        train, test = net.train(), net.test()
        calib = train.subset(np.random.default_rng(0).permutation(len(train))[: args.calib])
        float_model = net.model()
        if cache.get("float") is None:
            cache.put("float", {"accuracy": accuracy(float_model, test)})
        float_acc = cache.get("float")["accuracy"]
        log(f"{name}: float accuracy {float_acc:.4f}")
        models = {"dense": float_model}
        if "prune" in args.stages or (cache.dir / "pruned.onnx").is_file():
            models["pruned"] = prune_stage(net, cache, train, test)
        diags = {tag: hessians(net, m, tag, calib, cache) for tag, m in models.items()}
        if "curves" in args.stages:
            chosen = {t: m for t, m in models.items() if t in args.tags}
            scope = args.scope or net.scope
            curves_stage(net, cache, chosen, diags, test, args.methods, scope)
        if "compensate" in args.stages:
            chosen = {t: m for t, m in models.items() if t in args.tags}
            methods = args.compensate_methods
            scope = args.scope or net.scope
            compensate_stage(net, cache, chosen, diags, (calib, test), methods, scope, log)
        for tag in args.table_tags if "table" in args.stages else ():
            if tag in models:
                table_stage(
                    net,
                    cache,
                    models,
                    diags,
                    (train, test),
                    float_acc,
                    args.methods,
                    tag,
                    where=where,
                )
        if "report" in args.stages:
            report_stage(net, cache, where.plots)
        if args.smoke:  # every rate of the smoke network is reachable: an error is a failure
            failed = {k: v["error"] for k, v in cache.data.items() if "error" in (v or {})}
            if failed:
                print(f"smoke: {len(failed)} steps failed, e.g. {next(iter(failed.items()))}")
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
