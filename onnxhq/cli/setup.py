"""``onnxhq setup-training``: create, once, the environment the gradient worker runs in.

onnxruntime-training provides the module ``onnxruntime`` too, so it gets its own virtual
environment (default ``$XDG_CACHE_HOME/onnxhq/training``), never the user's; see
`onnxhq.training.worker`.
"""

from __future__ import annotations

from .arguments import subcommand


def add_setup_training(sub) -> None:
    p = subcommand(sub, "setup-training", _run_setup_training)
    p.add_argument(
        "--python",
        help="the interpreter to create it with (one onnxruntime-training has wheels for: "
        "CPython 3.8-3.12; default this one)",
    )
    p.add_argument("--env", help="the folder to create (default: the cache folder onnxhq looks in)")


def _run_setup_training(args) -> int:
    """create the separate environment with onnxruntime-training that gradients need

    Create a virtual environment with onnxruntime-training (and onnx, numpy) for the gradient
    worker: --hessian fisher, empirical-fisher, hutchinson, gauss-newton, pruning and fine-tuning
    use it. Your own onnxruntime is left as it is. Needs the network once; does nothing when the
    environment already works.
    """
    from pathlib import Path

    from ..training import worker

    env = Path(args.env).absolute() if args.env else worker.cache_env()
    python = worker.env_python(env)
    if not (python.is_file() and worker.serves_gradients(str(python))):
        python = worker.setup_training(env, python=args.python)
    print(f"onnxruntime-training is ready: {python}")
    if args.env:
        print(f"point onnxhq at it with: export {worker.ENV_PYTHON}={python}")
    return 0
