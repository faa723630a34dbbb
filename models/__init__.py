"""Builders of the reference networks (:mod:`models.lenet`, :mod:`models.resnet_cifar`).

The bundled ``.onnx`` and ``.npz`` files beside them are described in ``models/README.md``.
"""
