"""Huffman coding of quantization indices, the part of the sidecar inside each stream's bytes.

- `huffman`: code lengths (package-merge), canonical codes, bit packing, encoding.
- `huffdecode`: decoding many coded streams at once (its array kernels in `kernels`).
- `layout`: how one stream of indices becomes its header entry and its bytes (run coding, code
  table, block index), its header fields checked, and its size accounting (`StreamLayout`).
- `unpack`: the way back from `layout`, for all streams of a file together.

The container around the streams (prefix, JSON header, offsets, CRCs) is `onnxhq.sidecar`.
"""
