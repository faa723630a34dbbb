"""``onnxhq repack``: write an existing graph + sidecar pair again with the current writer."""

from __future__ import annotations

from .arguments import add_compressed, subcommand


def add_repack(sub) -> None:
    p = subcommand(sub, "repack", _run_repack)
    add_compressed(p)
    p.add_argument("-o", "--output", required=True, help="the folder to write the new pair into")
    p.add_argument("--name", help="the new pair's file stem (default: the graph's)")


def _run_repack(args) -> int:
    """write a compressed pair again with short names and the current format, no re-quantizing

    Read a compressed graph and the sidecar beside it and write them into the --output folder
    again with the current graph clean-up (short value and node names, no doc strings, default
    attributes or inner shape annotations) and the current graph format. Codebooks and indices
    are kept as they are: the decoded weights are bit-identical, under new names.
    """
    from ..repack import repack_file

    result, _ = repack_file(args.compressed, args.output, name=args.name)
    old, new = sum(result.before.values()), sum(result.after.values())
    for label, files in (("read", result.before), ("wrote", result.after)):
        folder = args.compressed if label == "read" else args.output
        sizes = ", ".join(f"{name} {size:,}" for name, size in files.items())
        print(f"{label} {folder}: {sizes} bytes")
    print(f"{old:,} -> {new:,} bytes ({new - old:+,}); {len(result.names)} quantized weights "
          "renamed, decoded weights unchanged")  # fmt: skip
    return 0
