"""The names the options take, and their defaults: one place for the API, the CLI and the tools."""

from __future__ import annotations

#: Quantizers: plain k-means, Hessian-weighted k-means, uniform cells, entropy-constrained.
METHODS = ("kmeans", "hkmeans", "uniform", "ecsq")
#: Methods whose objective weights each error by a Hessian estimate.
WEIGHTED_METHODS = ("hkmeans", "uniform", "ecsq")
#: Codebook scopes: one for the network, one per tensor, one per tensor with the rates allocated
#: by one Hessian slope (uniform at target_bits), one per group of output channels.
SCOPES = ("network", "layer", "allocated", "channel-group")
#: Hessian estimators of `onnxhq.hessian.METHODS` (``none``: no weighting).
HESSIAN_METHODS = (
    "fisher",
    "empirical-fisher",
    "hutchinson",
    "gauss-newton",
    "activations",
    "adam",
    "none",
)
#: The estimators that draw samples from data (and so take ``samples``).
SAMPLING_HESSIANS = ("fisher", "empirical-fisher", "hutchinson", "gauss-newton", "activations")
#: The sampling estimators that take a ``batch_size`` (empirical-fisher: per-sample gradients).
BATCHED_HESSIANS = ("fisher", "hutchinson", "gauss-newton", "activations")
#: The estimators that differentiate the model (they need onnxruntime-training's gradient graph).
GRADIENT_HESSIANS = ("fisher", "empirical-fisher", "hutchinson", "gauss-newton")
#: The Hessian `compress` estimates unless told, and the one it falls back to when the model
#: has no gradient graph (an op without a gradient, or no onnxruntime-training).
DEFAULT_HESSIAN = "fisher"
FALLBACK_HESSIAN = "activations"
#: Output kinds (`onnxhq.outputs.OutputSpec`): class scores (softmax over the last axis, every
#: other axis a sample), Bernoulli scores (sigmoid per entry), real values (embeddings, boxes).
OUTPUT_KINDS = ("classes", "bernoulli", "real")
#: How in-memory inputs appear in `CompressOptions.to_dict`, and the Hessian source they make.
SUPPLIED = "supplied"
#: What `HessianSource.method` may be: an estimator, or diagonals given by the caller.
HESSIAN_SOURCES = (*HESSIAN_METHODS, SUPPLIED)
#: Pruning criteria and scopes of `onnxhq.prune`.
PRUNE_CRITERIA = ("magnitude", "saliency", "obs")
PRUNE_SCOPES = ("global", "layer")
#: Op types whose weights a user may opt into (`onnxhq.model.OPTIONAL_WEIGHT_SLOTS`).
EXTRA_OPS = ("Einsum", "GRU", "Gather", "LSTM", "RNN")
#: The ways to give a rate, as `compress` keywords.
RATES = ("k", "bits", "lam", "target_bits")
#: The value each cell of the uniform quantizer puts in the codebook: the importance-weighted
#: mean of its weights (the paper's; least error), or the grid point ``step * j`` (levels that
#: `decode --target int8|int4` writes as onnxruntime's native integer forms).
CELL_VALUES = ("mean", "grid")
#: Forms `decode` writes the weights in (`onnxhq.native`): onnxhq's codebook lookups (any
#: codebook; ``gather-unpacked``: a byte per index, no 4-bit packing, for less session memory),
#: or onnxruntime's int8 / int4 forms (codebooks on a uniform grid).
DECODE_TARGETS = ("gather", "gather-unpacked", "int8", "int4")
#: `onnxhq lowbit`: bits per weight of its block grids, and the block sizes (MatMulNBits wants
#: a power of two of at least 16).
LOWBIT_BITS = (4, 8)
LOWBIT_BLOCKS = (16, 32, 64, 128, 256)

#: Defaults, from the measurements in tools/RESULTS.md: at equal coded bits per weight, Hessian-
#: weighted uniform quantization keeps more accuracy than k-means (as the paper found). 4 bits per
#: weight (entropy of the indices) lost nothing on the dense LeNet-5 and 0.9 point on ResNet-32
#: (0.4 with --scope layer), where 3 bits lost 12 points; lower rates want pruning and fine-tuning.
DEFAULT_METHOD = "uniform"
DEFAULT_TARGET_BITS = 4.0
DEFAULT_K = 32
DEFAULT_HESSIAN_SAMPLES = 1000
#: Unless told, the Hessian draws fewer samples on a model whose samples are costly
#: (`onnxhq.hessian.cost`), down to this many.
MIN_HESSIAN_SAMPLES = 64
DEFAULT_FINETUNE_LR = 1e-4
